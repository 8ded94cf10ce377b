"""Who is asking: the `Peer` of a request, identified once per connection.

A local client is known by its socket's credentials (SO_PEERCRED: pid, uid, gid): `identify_peer` adds its user
name, its groups and whether it is an admin (`[access] admins`, jobd's own uid). A client that logs in (evQueue's
TCP login, an HTTP bearer token) is made a Peer by the listener that checked the login: uid -1 for a remote user.
What a peer may do is jobd.engine.access's to say.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from jobd import users
from jobd.engine import access as access_rules
from jobd.errors import shortage
from jobd.model import AccessDef


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asking: a local process known by SO_PEERCRED, or a remote login (uid -1, `user` its login)."""

    uid: int
    gid: int
    pid: int
    is_admin: bool
    user: str = ""  # the user name (of the uid, or the login of a remote client)
    groups: frozenset[str] = frozenset()  # names of the primary and supplementary groups

    def under(self, access: AccessDef) -> Peer:
        """This local peer as `access` sees it: after a reload, a connection's process is who it was, but whether
        it is an admin is what the new `[access] admins` says. A remote login (uid -1) is its login's, unchanged."""
        if self.uid < 0:
            return self
        admin = _local_admin(self.uid, self.user, self.groups, access)
        return self if admin == self.is_admin else dataclasses.replace(self, is_admin=admin)


def identify_peer(pid: int, uid: int, gid: int, access: AccessDef | None = None) -> Peer:
    """Who a local client is (SO_PEERCRED's pid, uid and gid), its groups, and whether it is an admin: jobd's own
    uid always is, other users when `[access] admins` names them or one of their groups.

    The groups are those of the process (`Groups:` of /proc/PID/status: what `setgroups` left it, which may be
    fewer than the user's), read only while that pid is still a process of `uid`; otherwise (the client is gone,
    or its pid is in another pid namespace) the user's groups from the group database.

    OutOfResources when jobd has no descriptor to spare to read them with: glibc then says "no such user" and
    "no such group", and the client would be served for its connection's life as a user of no name, in groups of
    no name, whom no rule of `[access]` names: no admin, refused what its user may do, for a misleading reason.
    """
    user = _user_name(uid)
    gids = _process_groups(pid, uid)
    if gids is None:
        gids = _database_groups(user, uid, gid)
    groups = frozenset(_group_name(number) for number in {gid, *gids})
    admin = _local_admin(uid, user, groups, access or AccessDef())
    return Peer(uid=uid, gid=gid, pid=pid, is_admin=admin, user=user, groups=groups)


def _local_admin(uid: int, user: str, groups: frozenset[str], access: AccessDef) -> bool:
    return uid == os.getuid() or access_rules.is_admin(access, user, groups)


# What becomes of a client jobd cannot identify now (identify_peer).
_NOT_SERVED = "the client is not served now: try again later"


def _user_name(uid: int) -> str:
    name = users.user_name(uid, _NOT_SERVED)
    return name if name is not None else str(uid)


def _group_name(gid: int) -> str:
    name = users.group_name(gid, _NOT_SERVED)
    return name if name is not None else str(gid)


def _process_groups(pid: int, uid: int) -> list[int] | None:
    if pid <= 0:
        return None
    # Read as bytes with os.open/os.read and only the two fields wanted picked out: every connection pays for this,
    # and a text file object splitting all fifty-odd lines cost three times as much.
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        # Short of descriptors, the group database would answer the user's groups: more than the process may have.
        short = shortage(f"cannot read the groups of pid {pid}", error, _NOT_SERVED)
        if short is not None:
            raise short from None
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 16384):  # one read but for a process with thousands of groups
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    status = b"".join(chunks)
    # The pid may have been reused since connect(): trust it only while it still runs as the peer's uid (the
    # effective uid, which SO_PEERCRED reports, is the second of Uid:'s four).
    uids = _status_field(status, b"Uid")
    if len(uids) < 2 or uids[1] != str(uid).encode():
        return None
    try:
        return [int(number) for number in _status_field(status, b"Groups")]
    except ValueError:
        return None


def _status_field(status: bytes, name: bytes) -> list[bytes]:
    """The words of field `name` in a /proc/PID/status text (none if it is missing)."""
    key = b"\n" + name + b":"
    start = status.find(key)
    if start < 0:
        return []
    start += len(key)
    end = status.find(b"\n", start)
    return status[start : end if end >= 0 else len(status)].split()


def _database_groups(user: str, uid: int, gid: int) -> list[int]:
    if user == str(uid):  # no passwd entry: only the primary group is known
        return [gid]
    try:
        return list(users.groups_of(user, gid, _NOT_SERVED))
    except OSError:
        return [gid]
