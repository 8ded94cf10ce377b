"""HTTP jobs: a request jobd makes in-process (aiohttp) where a program job would spawn a process.

`check_request` validates the `http` object of a task or of an ad-hoc submit (one set of rules for both).
`HttpRequest` runs one attempt: it looks to the engine like a proc.Child (an `on_exit` callback with an ExitInfo,
`stop()`), and writes the response body to the attempt's stdout file and the status line and headers (or the
error) to its stderr file, so job.output works as for programs.

aiohttp is imported where a request is made, not with this module: it was more than a quarter of jobd's memory
(52 MB with it, 38 without) and half of its start-up, and a daemon whose configuration has no HTTP task, callback
or listener never needs it. `load_aiohttp` imports it at start-up and at reload when the configuration does;
otherwise the first ad-hoc HTTP job or callback imports it, holding the loop once for that (0.1-0.2 s).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jobd import redact
from jobd.errors import SHORTAGE_ERRNOS, did_you_mean, json_repr
from jobd.model import MAX_SECONDS, Config
from jobd.proc import OUTPUT_RETRY_SECONDS, ExitInfo, log_held_output

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("jobd.http")

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
KEYS = ("type", "method", "url", "headers", "params", "body", "timeout", "expect_status")
DEFAULT_TIMEOUT = 3600.0  # the request's own limit when neither it nor the job sets one
JOB_ID = "__JOBID__"
_CHUNK = 65536
STOPPED = "HTTP request stopped by jobd"


class HttpSpecError(ValueError):
    """An invalid `http` object: the message names the key and what is allowed; `key` is that key (None: the object
    as a whole), so that a configuration error can point at its line."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_request(value: object) -> dict[str, Any]:
    """The `http` object, checked and normalised (method upper case, defaults filled in); JSON-able."""
    if not isinstance(value, Mapping):
        raise HttpSpecError("expected a table/object with at least 'url'")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        hint = did_you_mean(unknown[0], KEYS)
        raise HttpSpecError(f"unknown key {unknown[0]!r}{hint}; allowed: {', '.join(KEYS)}", key=unknown[0])
    if value.get("type", "http") != "http":  # Queue Server's command object says "type": "http"
        raise HttpSpecError(
            f"'type': {json_repr(value.get('type'))} is not allowed; allowed: \"http\" (or leave it out)", key="type"
        )
    url = value.get("url")
    if not isinstance(url, str) or not url:
        raise HttpSpecError("'url' is required: an http:// or https:// URL", key="url")
    check_url(url)
    method = value.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise HttpSpecError(
            f"'method': {json_repr(method)} is not allowed; allowed: {', '.join(METHODS)}", key="method"
        )
    headers = _strings(value.get("headers", {}), "headers")
    check_headers(url, headers)
    params = _strings(value.get("params", {}), "params")
    body = value.get("body")
    if body is not None and not isinstance(body, str):
        raise HttpSpecError("'body': expected a string", key="body")
    timeout = value.get("timeout")
    # Capped as every other duration (inf passed `> 0`, and the job's JSON then held a bare Infinity, which strict
    # JSON parsers refuse: one such job broke job.list for PHP and JavaScript clients).
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_SECONDS
    ):
        raise HttpSpecError(
            f"'timeout': expected a number > 0 and <= {MAX_SECONDS}, got {json_repr(timeout)}", key="timeout"
        )
    expect = value.get("expect_status")
    if expect is not None:
        if not isinstance(expect, list) or not expect:
            raise HttpSpecError(
                "'expect_status': expected a non-empty list of status codes 100-599", key="expect_status"
            )
        for status in expect:
            if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
                raise HttpSpecError(
                    f"'expect_status': {json_repr(status)} is not a status code 100-599", key="expect_status"
                )
    return {
        "method": method.upper(),
        "url": url,
        "headers": headers,
        "params": params,
        "body": body,
        "timeout": None if timeout is None else float(timeout),
        "expect_status": None if expect is None else list(expect),
    }


def check_url(url: str) -> None:
    """An http:// or https:// URL that aiohttp will take, with a host (and a port from 1 to 65535 if it gives
    one): an HTTP job's, and a callback's. HttpSpecError names what is wrong, the URL's credentials masked (the
    message goes to the client, but also to the audit log and, for a task's url, to the journal and to the admins'
    daemon.status: a failed reload's error)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL", or a netloc bad under NFKC, whose message quotes user:password
        raise HttpSpecError(
            "'url': its host part cannot be read (a bracket left open, or a character not allowed there)", key="url"
        ) from None
    if _has_control(url):
        # Named for what it is: urlsplit (and aiohttp's yarl) drop tabs and line breaks, so the URL quoted back would
        # look sound, and the one requested would not be the one written.
        raise HttpSpecError(
            "'url': holds a control character (a tab, a line break, NUL: U+0000 to U+001F or U+007F), which no URL "
            "may hold",
            key="url",
        )
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HttpSpecError(f"'url': {_quoted(url)} is not an http:// or https:// URL", key="url")
    # What aiohttp refuses at each attempt (no host, a port that is none) fails the job with the whole URL as its
    # error, credentials included, for every reader of the job to see (job JSON masks them, jobd/redact.py).
    try:
        port_ok = parts.port is None or parts.port > 0  # urlsplit raises ValueError for "99999" or "x"
    except ValueError:
        port_ok = False
    if not parts.hostname or not port_ok:
        raise HttpSpecError(
            f"'url': {_quoted(url)} needs a host, and a port from 1 to 65535 if it gives one",
            key="url",
        )
    if not _host_usable(url):
        raise HttpSpecError(
            f"'url': the host of {_quoted(url)} is not one a request can be sent to (a character not allowed in"
            " a host name, an empty label or one over 63 characters, a backslash, a number that is no IPv4 address)",
            key="url",
        )


# What a host name may hold once IDNA-encoded: letters, digits, hyphens and dots, and the underscores /etc/hosts and
# resolvers take in practice.
_HOST_NAME = re.compile(rb"[A-Za-z0-9_.-]+")


def _host_usable(url: str) -> bool:
    """Whether aiohttp will send a request to the URL's host, as it reads it (yarl), rather than refuse it at every
    attempt: yarl takes the URL apart, the resolver encodes the name (IDNA), and a host of digits and dots alone is
    taken for an IPv4 address, which must then be a dotted quad (aiohttp refuses `1.2.3.4.5`, `127.1`, `2130706433`
    and leading zeros; `0x7f.0.0.1` is a name to it, which the resolver reads)."""
    import yarl  # aiohttp's own URL reader, a small module of its dependencies

    try:
        host = yarl.URL(url).raw_host
        if not host:
            return False
        if ":" in host:  # an IPv6 address, which yarl has read already
            return True
        name = host.encode("idna")
    except (ValueError, UnicodeError):
        return False
    if not _HOST_NAME.fullmatch(name):  # the idna codec passes a space, `%`, `<`...: no resolver finds such a name
        return False
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


# Control characters aiohttp (3.9 and later) refuses in a header at every request, a tab in a value aside (RFC 9110,
# 5.5): CR, LF and NUL, but also DEL and the others, which were taken and then failed every attempt or delivery.
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_headers(url: str, headers: Mapping[str, str]) -> None:
    """Header names and values aiohttp will send, beside `url` (checked by check_url)."""
    for name, text in headers.items():
        if not name or _HEADER_CONTROL.search(name) or ":" in name or " " in name or "\t" in name:
            raise HttpSpecError(
                f"'headers': {name!r} is not a valid header name: a name is not empty and holds no ':', space, tab or "
                "other control character",
                key="headers",
            )
        if _HEADER_CONTROL.search(text):
            raise HttpSpecError(
                f"'headers': the value of {name!r} contains CR, LF, NUL or another control character", key="headers"
            )
    if urlsplit(url).username is not None and any(name.lower() == "authorization" for name in headers):
        # aiohttp refuses the pair at every attempt: say so now rather than fail the job each time
        raise HttpSpecError(
            "'url' has credentials (user:password@) and 'headers' an Authorization: give only one", key="url"
        )


def _strings(value: object, key: str) -> dict[str, str]:
    """A table of strings (numbers are taken as their text, as a form would send them)."""
    if not isinstance(value, Mapping):
        raise HttpSpecError(f"'{key}': expected a table/object of strings", key=key)
    out = {}
    for name, item in value.items():
        if isinstance(item, int | float) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(name, str) or not isinstance(item, str):
            raise HttpSpecError(f"'{key}': {name!r}: expected a string", key=key)
        out[name] = item
    return out


def _quoted(url: str) -> str:
    """A refused URL as a message quotes it: JSON-style, as every refused value is, its credentials masked."""
    return json.dumps(redact.url(url), ensure_ascii=False)


def _has_control(text: str) -> bool:
    return any(char < " " or char == "\x7f" for char in text)


def substitute(request: Mapping[str, Any], job_id: int) -> dict[str, Any]:
    """`__JOBID__` replaced by the job id in the URL, the params (names and values) and the body."""
    ident = str(job_id)
    out = dict(request)
    out["url"] = str(request["url"]).replace(JOB_ID, ident)
    out["params"] = {k.replace(JOB_ID, ident): v.replace(JOB_ID, ident) for k, v in request["params"].items()}
    if request.get("body") is not None:
        out["body"] = str(request["body"]).replace(JOB_ID, ident)
    return out


def new_session() -> aiohttp.ClientSession:
    """A session (connection pool) for HTTP jobs, or for callbacks: keep-alive connections shared by their requests.

    No cookie jar: one job's server setting a cookie had it sent with every later request to that host, another
    user's job or callback included. No cap on connections: aiohttp's default of 100 made every request past the
    hundredth wait, unseen, for one of those to end, and time out meanwhile (HTTP jobs are bounded by their queues'
    concurrency; callbacks by their own limit, jobd/engine/callbacks.py). No time limit of the session's own: each
    request has its own (an HTTP job's `timeout`, 3600 s by default; a callback's); aiohttp's default ended every
    request after 5 minutes, an HTTP job's error then naming its own timeout."""
    import aiohttp  # on first use: see the module's docstring

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
    )


class HttpRequest:
    """One attempt of an HTTP job, running as a task on the loop. `pid` is None: there is no process."""

    pid: int | None = None
    start_time: int | None = None

    def __init__(
        self,
        session: aiohttp.ClientSession,
        request: Mapping[str, Any],
        job_id: int,
        *,
        max_output: int,
        stdout_path: str,
        stderr_path: str,
        on_exit: Callable[[ExitInfo], None],
        on_output: Callable[[], None],
    ) -> None:
        self._session = session
        self._request = substitute(request, job_id)
        self._max_output = max_output
        self._stdout_path = stdout_path
        self._stderr_path = stderr_path
        self._on_exit = on_exit
        self._on_output = on_output
        self._written: set[str] = set()  # the output files made (at a first byte): see wrote()
        self.error: str | None = None
        self._told = False  # on_exit was called
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._ended)

    def has_ended(self) -> bool:
        """Whether the request has ended (its end is then being told), as proc.Child.has_ended."""
        return self._task.done()

    def wrote(self, stream: str) -> bool:
        """As proc.Child.wrote: whether this request has written to the file of `stream` (it has no `log`)."""
        return {"stdout": self._stdout_path, "stderr": self._stderr_path}.get(stream) in self._written

    def let_go(self) -> None:
        """As proc.Child.let_go: a request's response is not held for want of descriptors; nothing waits."""

    def stop(self, grace: float = 0.0) -> None:
        """Cancel the request (the grace of a process has no meaning here)."""
        self._task.cancel()

    async def _run(self) -> None:
        import aiohttp  # loaded by the caller's ClientSession already: see the module's docstring

        kept = 0  # bytes of the body written to the stdout file, as they came (job.output follows them)
        stdout_whole = True  # no write of it failed (a full disk)
        head = ""
        stderr_whole = True
        size = 0
        exit_code: int | None = None
        try:
            request = self._request
            timeout = request["timeout"] if request["timeout"] is not None else DEFAULT_TIMEOUT
            try:
                async with asyncio.timeout(timeout):
                    async with self._session.request(
                        request["method"],
                        request["url"],
                        headers=request["headers"],
                        params=request["params"] or None,
                        data=None if request["body"] is None else request["body"].encode(),
                        allow_redirects=False,
                    ) as response:
                        version = response.version or aiohttp.HttpVersion11
                        lines = [f"HTTP/{version.major}.{version.minor} {response.status}"]
                        lines[0] += f" {response.reason}" if response.reason else ""
                        lines += [f"{name}: {text}" for name, text in response.headers.items()]
                        head = "\n".join(lines) + "\n"
                        # Header bytes that are not UTF-8 came decoded as lone surrogates: written back as they came.
                        stderr_whole = await self._write_held(
                            self._stderr_path, head.encode("utf-8", "surrogateescape")
                        )
                        async for chunk in response.content.iter_chunked(_CHUNK):
                            room = self._max_output - kept
                            if room > 0 and stdout_whole:
                                stdout_whole = await self._write_held(self._stdout_path, chunk[:room])
                                kept += min(room, len(chunk)) if stdout_whole else 0
                            size += len(chunk)
                        expected = request["expect_status"]
                        ok = response.status in expected if expected is not None else 200 <= response.status < 300
                        if ok:
                            exit_code = 0
                        else:
                            wanted = "2xx" if expected is None else ", ".join(map(str, expected))
                            self.error = f"HTTP status {response.status} (expected {wanted})"
            except TimeoutError:
                self.error = f"HTTP request timed out after {timeout:g}s"
            except (aiohttp.ClientError, OSError, ValueError) as error:
                # The job's error is shown to every reader of the job: aiohttp's InvalidURL is the whole URL
                # (a host yarl refuses, such as one with a backslash), credentials and token parameters included.
                urls = [request["url"]] + ([str(error.url)] if isinstance(error, aiohttp.InvalidURL) else [])
                self.error = "HTTP request failed: " + redact.error(f"{type(error).__name__}: {error}", *urls)
        except asyncio.CancelledError:  # stop(): the engine's time limit, a cancel or a stop, as its outcome says
            self.error = STOPPED
        self._tell(exit_code, head, stderr_whole, stdout_whole and size <= kept)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A request stopped before its task first ran never entered _run, so its end was never told: the job stayed
        running for good, holding its slot, and jobd's stop waited for it without end. Told here, as a bug would be."""
        if self._told:
            return
        if task.cancelled():
            self.error = STOPPED
        else:
            log.error("an HTTP request failed unexpectedly", exc_info=task.exception())
            self.error = "HTTP request failed: " + redact.error(repr(task.exception()), self._request["url"])
        self._tell(None, "", True, True)

    def _tell(self, exit_code: int | None, head: str, stderr_whole: bool, stdout_whole: bool) -> None:
        """Write the error (if any) after the response's head, and tell the engine the attempt's end, once (marked
        told just before: should anything before it raise, the task's done callback tells it instead)."""
        if self.error is not None:
            stderr_whole &= self._write(self._stderr_path, (("\n" if head else "") + self.error + "\n").encode())
        # What was kept, as for a program's streams.
        stdout_size, stderr_size = (
            os.path.getsize(path) if os.path.exists(path) else 0 for path in (self._stdout_path, self._stderr_path)
        )
        self._told = True
        self._on_exit(
            ExitInfo(
                exit_code=exit_code,
                signal=None,
                cpu_user=0.0,
                cpu_system=0.0,
                max_rss_kib=0,
                stdout_bytes=stdout_size,
                stderr_bytes=stderr_size,
                cut_streams=(() if stdout_whole else ("stdout",)) + (() if stderr_whole else ("stderr",)),
            )
        )

    async def _write_held(self, path: str, data: bytes) -> bool:
        """_write, except that while the file cannot be opened for want of descriptors or memory, the response is
        read no further and the write is tried again every OUTPUT_RETRY_SECONDS, as a program's output waits in its
        pipe (proc._OutputSink): the server waits on its full connection meanwhile, nothing is lost, and the
        request's time limit still applies."""
        while True:
            try:
                return self._write(path, data, hold=True)
            except OSError as short:
                log_held_output(path, short, "unread on its connection")
            await asyncio.sleep(OUTPUT_RETRY_SECONDS)  # no-poll-ok: no event says a descriptor is free (proc.py)

    def _write(self, path: str, data: bytes, *, hold: bool = False) -> bool:
        """Append `data` to an output file; False if it could not be written whole (logged: a full disk). With
        `hold`, an open that fails for want of descriptors or memory raises its OSError instead: nothing was written,
        and the caller writes it later."""
        if not data:
            return True
        opened = False
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "ab") as file:
                opened = True
                self._written.add(path)
                file.write(data)
        except OSError as error:
            if hold and not opened and error.errno in SHORTAGE_ERRNOS:
                raise
            log.warning("cannot write %s: %s", path, error)
            return False
        finally:
            self._on_output()
        return True


def uses_http(config: Config) -> bool:
    """Whether the configuration names an HTTP task or callback, or listens for HTTP."""
    tables = [task.callbacks for task in config.tasks.values()] + [queue.callbacks for queue in config.queues.values()]
    callbacks = [target for table in tables for targets in (table or {}).values() for target in targets]
    return (
        config.http.listen is not None
        or any(task.http is not None for task in config.tasks.values())
        or any(isinstance(target, Mapping) and "http" in target for target in callbacks)
    )


def load_aiohttp(config: Config) -> None:
    """Import aiohttp now if `config` will need it, so that its first HTTP request does not hold the loop."""
    if uses_http(config):
        import aiohttp  # noqa: F401 - imported for its side effect: in sys.modules from now on
