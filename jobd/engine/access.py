"""Who may do what: admins, and the grants of `[access]` (docs/config.md), evaluated for one peer.

Pure: the running `AccessDef` and the peer come in, a yes or no (or an `InsufficientRights` naming the missing right)
comes out. evQueue's model (reference/evqueue.md §6): admins may do everything; everybody else has `read`, `exec`,
`kill` and `edit` rights on the workflows, tasks and queues their grants name. What an object's right covers:

- a workflow: its definition, and its instances (read: get/list/wait; exec: launch, debug-resume; kill: cancel,
  kill a task);
- a task: submitting it (exec), and its jobs (read: get/list/output/wait/events; kill: cancel);
- a queue: its state (read: list; edit: pause/resume), and every job in it, ad-hoc ones included (read, kill);
- a schedule has the rights of what it starts (read: list; exec: trigger; edit: enable/disable).

So a right on a job is a right on its task OR on its queue. Submitting needs `exec` on the task, and on the queue
too when the submit names a queue other than the task's own. Ad-hoc commands, extra environment variables and
everything about the daemon itself (reload, its configuration, the audit log) are for admins only.

Names in grants may hold the wildcards `*` and `?` (shell-style, matched case-sensitively by `fnmatchcase`);
`glob_patterns` hands the same patterns to SQLite's GLOB, which reads `*` and `?` the same way, so lists can be
filtered in the query and still page correctly.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from jobd.errors import InsufficientRights
from jobd.model import AccessDef, Grant, ObjectKind, Right

if TYPE_CHECKING:  # jobd.peer asks this module who is an admin
    from jobd.peer import Peer


def is_admin(access: AccessDef, user: str, groups: Iterable[str]) -> bool:
    """Whether a user (by name, with the names of its groups) is one of `[access] admins`."""
    return user in access.admin_users or not access.admin_groups.isdisjoint(groups)


def _applies(grant: Grant, peer: Peer) -> bool:
    return peer.user in grant.users or not grant.groups.isdisjoint(peer.groups)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def may(access: AccessDef, peer: Peer, right: Right, kind: ObjectKind, name: str) -> bool:
    """Whether `peer` has `right` on the `kind` called `name`."""
    if peer.is_admin:
        return True
    return any(
        right in grant.rights and _applies(grant, peer) and _matches(name, grant.patterns(kind))
        for grant in access.grants
    )


def who(peer: Peer) -> str:
    if peer.uid < 0:
        return f"user {peer.user or '?'} (remote login)"
    return f"user {peer.user or peer.uid} (uid {peer.uid})"


def require(access: AccessDef, peer: Peer, right: Right, kind: ObjectKind, name: str, **details: Any) -> None:
    """Raise InsufficientRights (naming the missing right) unless `peer` has `right` on the `kind` `name`;
    `details` go into the refusal's data too (`param`: the request's parameter that named the object)."""
    if not may(access, peer, right, kind, name):
        raise InsufficientRights(
            f"{who(peer)} may not {right} {kind} {name}: the {right} right is missing",
            missing=str(right),
            kind=str(kind),
            name=name,
            **details,
        )


def may_job(access: AccessDef, peer: Peer, right: Right, task: str | None, queue: str) -> bool:
    """A right on a job is a right on its task or on its queue (an ad-hoc job has only its queue)."""
    return (task is not None and may(access, peer, right, ObjectKind.TASK, task)) or may(
        access, peer, right, ObjectKind.QUEUE, queue
    )


def require_job(access: AccessDef, peer: Peer, right: Right, job_id: int, task: str | None, queue: str) -> None:
    """Refuse unless `peer` has `right` on the job. The refusal names the job's task and queue only to a peer that
    may read the job: job ids count up, so naming them to anyone else would list every task and queue, and tell
    what ran when, to a peer with no right at all."""
    if not may_job(access, peer, right, task, queue):
        on = ""
        if may_job(access, peer, Right.READ, task, queue):
            on = f" on task {task} or on queue {queue}" if task is not None else f" on queue {queue} (an ad-hoc job)"
        raise refused(peer, right, "job", job_id, on)


def refused(peer: Peer, right: Right, kind: str, object_id: int, on: str = "") -> InsufficientRights:
    """The refusal of `right` on the job or instance `object_id`; `on` says where the right is missing, and is
    given only to a peer that may read the object. Without it, this is also the refusal of an id that names
    nothing, to a peer that is not an admin: ids count up, and a refusal told apart from "no such id" would show
    how many jobs or instances others have, and when they were made."""
    return InsufficientRights(
        f"{who(peer)} may not {right} {kind} {object_id}: the {right} right is missing{on}",
        missing=str(right),
        kind=kind,
        name=str(object_id),
    )


def require_admin(peer: Peer, what: str, **details: Any) -> None:
    """Refuse what only admins may do; `what` completes "may not …" (e.g. "reload the configuration"). `details` go
    into the refusal's data too, as for `require`."""
    if not peer.is_admin:
        raise InsufficientRights(
            f"{who(peer)} may not {what}: that is for admins ([access] admins, and jobd's own user); "
            "the admin right is missing",
            missing="admin",
            **details,
        )


def glob_patterns(access: AccessDef, peer: Peer, right: Right, kind: ObjectKind) -> tuple[str, ...] | None:
    """The name patterns of `kind` on which `peer` has `right`, for filtering a query; None means all (admins)."""
    if peer.is_admin:
        return None
    # Each once, in the grants' order: a dict's keys (a list looked through for each pattern took 6 ms for 1,100
    # patterns, on every request that lists; 0.2 ms so).
    found: dict[str, None] = {}
    for grant in access.grants:
        if right in grant.rights and _applies(grant, peer):
            found.update(dict.fromkeys(grant.patterns(kind)))
    return tuple(found)
