"""evQueue's login on the TCP listener: the challenge, the HMAC-SHA1 check and the slow-down of failed logins.

evQueue (reference/evqueue.md §1.3) greets a TCP client with `<auth challenge="40 hex" …/>`; the client answers
`<auth response="hex" user="login"/>` where the response is HMAC-SHA1 keyed with SHA1(password) (20 raw bytes) over
the challenge (20 raw bytes). Unlike evQueue 3.3 there is no literal `hmac` that passes (§8): the only accepted
response is the HMAC, compared in constant time, and an unknown login costs the same work and the same delay as a
wrong password. Pure: no sockets; `LoginThrottle` is told the time and does not sleep.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Final

from jobd.errors import JobdError
from jobd.model import RemoteUser
from jobd.protocol import evqueue

CHALLENGE_BYTES: Final = 20
_RESPONSE: Final = re.compile(r"[0-9a-fA-F]{40}")

# An address whose last failed login is older than this starts again from the first delay.
FORGET_AFTER: Final = 900.0
MAX_ADDRESSES: Final = 4096  # addresses remembered at most; the oldest failure is forgotten first


class AuthError(JobdError):
    """evQueue's AUTH_ERROR: a failed login, or a command sent before logging in. The connection then closes."""

    code: ClassVar[str] = "AUTH_ERROR"


INVALID_AUTHENTICATION: Final = "Invalid authentication"
EXPECTED_AUTH: Final = "Expected 'auth' node"


def new_challenge() -> str:
    """40 hex digits of 20 bytes from the kernel's random source."""
    return os.urandom(CHALLENGE_BYTES).hex()


def challenge_document(node: str, challenge: str) -> bytes:
    """`<auth challenge="…" node="…" status="OK"/>\\n`, the first thing a TCP client reads."""
    return evqueue.serialize(evqueue.element("auth", {"challenge": challenge, "node": node, "status": "OK"}))


def expected_response(password_sha1: str, challenge: str) -> str:
    """What a client that knows the password answers: as evQueue's PHP client computes it,
    `hash_hmac("sha1", hex2bin($challenge), sha1($password, true))`."""
    return hmac.new(bytes.fromhex(password_sha1), bytes.fromhex(challenge), hashlib.sha1).hexdigest()


# The key an unknown login is checked against, so that it costs what a known one does (no user enumeration).
_NOBODY_KEY: Final = os.urandom(20).hex()


def verify(user: RemoteUser | None, challenge: str, response: str) -> bool:
    """Whether `response` is the HMAC of `challenge` under `user`'s password hash. Only 40 hex digits can pass
    (evQueue's literal `hmac` cannot); the comparison takes the same time wherever the first difference is."""
    expected = expected_response(user.password_sha1 if user is not None else _NOBODY_KEY, challenge)
    candidate = response.lower() if _RESPONSE.fullmatch(response) else "0" * 40
    matches = hmac.compare_digest(expected.encode("ascii"), candidate.encode("ascii"))
    return matches and user is not None and _RESPONSE.fullmatch(response) is not None


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Failed logins per source address: the n-th failure in a row is answered after `delay * 2**(n-1)` seconds,
    capped; FORGET_AFTER seconds without a failure start over. A successful login does not: with one account
    of its own, a client alternating its logins with guesses at another's password would guess at the base delay.

    IPv6 clients are counted per /64 (one host usually holds a whole /64). At most MAX_ADDRESSES are remembered.
    """

    def __init__(self) -> None:
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    @staticmethod
    def source(address: str) -> str:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(parsed, ipaddress.IPv6Address):
            if parsed.ipv4_mapped is not None:
                return str(parsed.ipv4_mapped)
            return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
        return str(parsed)

    def failed(self, address: str, now: float, delay: float, cap: float) -> float:
        """Record a failed login from `address` at `now`; return how long to wait before answering it."""
        key = self.source(address)
        entry = self._failures.pop(key, None)
        if entry is None or now - entry.last > FORGET_AFTER:
            entry = _Failures(0, now)
        entry.count += 1
        entry.last = now
        self._failures[key] = entry  # most recent last
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)
        return min(delay * 2.0 ** min(entry.count - 1, 64), cap)

    def failures(self, address: str) -> int:
        entry = self._failures.get(self.source(address))
        return 0 if entry is None else entry.count
