"""Local users and groups: the names the configuration gives, and the identity a job's process takes.

A job runs as a uid and a gid fixed when it was submitted (`JobSpec.run_as_uid/gid`). What else the process gets
— supplementary groups as initgroups(3) sets them, HOME, USER and LOGNAME — is looked up when it starts, from the
passwd and group databases of that moment.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from jobd.errors import shortage
from jobd.model import JobSpec

NOBODY = "nobody"


@dataclass(frozen=True, slots=True)
class Account:
    """Who a job's process becomes."""

    uid: int
    gid: int
    name: str | None  # None: the uid has no passwd entry
    home: str
    groups: tuple[int, ...]  # supplementary groups, the primary gid included (initgroups' list)


def user_ids(name: str, then: str = "the configuration is not read now") -> tuple[int, int]:
    """(uid, primary gid) of a user; KeyError if there is no such user, OutOfResources if jobd cannot tell now
    (`then` says what becomes of the request)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        _unless_short(f"cannot look up the user {name!r}", then)
        raise
    return entry.pw_uid, entry.pw_gid


def primary_gid(uid: int, then: str) -> int:
    """The primary group of a uid; KeyError if it has no passwd entry, OutOfResources if jobd cannot tell now
    (`then` says what becomes of the request)."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        _unless_short(f"cannot look up the account of uid {uid}", then)
        raise


def group_id(name: str) -> int:
    """The gid of a group; KeyError if there is no such group, OutOfResources if jobd cannot tell now."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        _unless_short(f"cannot look up the group {name!r}")
        raise


def _unless_short(what: str, then: str = "the configuration is not read now") -> None:
    """Python's pwd and grp say "not found" whatever made the lookup fail, and a lookup opens a file (glibc reads
    /etc/passwd, or connects to nscd or sssd): without a descriptor to spare, every name was "not found". Raise
    OutOfResources when no descriptor can be opened now (`then` says what becomes of the request); return when one
    can, and "not found" is the answer."""
    try:
        os.close(os.open("/", os.O_PATH | os.O_CLOEXEC))
    except OSError as error:
        short = shortage(what, error, then)
        if short is None:
            raise
        raise short from None


# What becomes of a job whose account cannot be looked up now (see Engine._take_starts).
_JOB_WAITS = "the job waits in its queue and is started once jobd can look it up"


def account(uid: int, gid: int) -> Account:
    """Who a job of `uid` and `gid` becomes; OutOfResources if jobd cannot tell now.

    A lookup that fails for want of a descriptor is no answer: the uid would seem to have no passwd entry, and so
    no name, "/" for its home and only its primary group, and the job would run without the supplementary groups
    its files may need."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        _unless_short(f"cannot look up the account of uid {uid}", _JOB_WAITS)
        return Account(uid=uid, gid=gid, name=None, home="/", groups=(gid,))
    return Account(uid=uid, gid=gid, name=entry.pw_name, home=entry.pw_dir or "/", groups=groups_of(entry.pw_name, gid))


def job_account(spec: JobSpec) -> Account | None:
    """The user a job runs as, looked up as it starts (None: jobd's own user)."""
    if spec.run_as_uid is None:
        return None
    gid = spec.run_as_gid if spec.run_as_gid is not None else spec.run_as_uid
    if (spec.run_as_uid, gid) == (os.geteuid(), os.getegid()):
        return None
    return account(spec.run_as_uid, gid)


def groups_of(name: str, gid: int, then: str = _JOB_WAITS) -> tuple[int, ...]:
    """The groups initgroups(3) gives the user `name` with the primary group `gid`; OutOfResources if jobd cannot
    tell now (`then` says what becomes of the request). glibc's getgrouplist(3) raises nothing when it cannot read
    /etc/group: it answers the primary group alone, as it does for a user of no other group. That answer is trusted
    only if a descriptor can be opened."""
    groups = tuple(os.getgrouplist(name, gid))
    if set(groups) <= {gid}:
        _unless_short(f"cannot look up the groups of the user {name!r}", then)
    return groups


def user_name(uid: int, then: str) -> str | None:
    """The name of a uid; None if it has no passwd entry, OutOfResources if jobd cannot tell now."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        _unless_short(f"cannot look up the user of uid {uid}", then)
        return None


def group_name(gid: int, then: str) -> str | None:
    """The name of a gid; None if it has no group entry, OutOfResources if jobd cannot tell now."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        _unless_short(f"cannot look up the group of gid {gid}", then)
        return None


def describe(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def describe_group(gid: int) -> str:
    try:
        return f"gid {gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return f"gid {gid}"
