"""The audit log: every mutating command of both protocols, who asked, what it acted on, when, and how it ended.

Each protocol records in one place around its dispatch (`Api.call` for JSON-RPC, `EvQueue.answer` for evQueue's
XML) with the tables below: a command that is not in its protocol's table is read-only and leaves no entry. An
entry is written once the result is known: at once for a method that answers at once, when its coroutine ends for
one that waits. Refusals (INSUFFICIENT_RIGHTS), bad parameters and failures are recorded with their error code.

Targets are built from what the client sent (and, once known, from the result: the ids of submitted jobs), so
they are never trusted: every piece is cut to a bounded length.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pwd
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final

from jobd.durable import DurableReply
from jobd.engine.core import AfterReply
from jobd.errors import JobdError, memory_shortage
from jobd.model import AuditEntry, printable
from jobd.peer import Peer
from jobd.store import Store, store_failure

log = logging.getLogger("jobd.audit")

MAX_PIECE: Final = 80  # characters of one client-given name or value in a target
MAX_TARGET: Final = 400
MAX_MESSAGE: Final = 1000

# (what the client sent, the result or None when it failed) -> the target
Target = Callable[[Mapping[str, Any], Any], str | None]


def _cut(value: Any, limit: int = MAX_PIECE) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _named(kind: str, key: str) -> Target:
    """`kind VALUE` from the request's `key` (e.g. "job 42", "queue photo")."""

    def target(params: Mapping[str, Any], result: Any) -> str | None:
        value = params.get(key)
        return None if value is None else f"{kind} {_cut(value)}"

    return target


def id_ranges(ids: list[int]) -> str:
    """ "42", "42-45", "42-45,50": the ids of a batch, consecutive runs folded."""
    runs: list[str] = []
    start = previous = ids[0]
    for number in [*ids[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ",".join(runs)


def _what(member: Any) -> str:
    """What one job.submit request asked for, before it was accepted: its task or its program."""
    if not isinstance(member, Mapping):
        return "?"
    task = member.get("task")
    if task is not None:
        return f"task {_cut(task)}"
    command = member.get("command")
    if isinstance(command, list) and command:
        return f"command {_cut(command[0])}"
    return "?"


def _submitted(params: Mapping[str, Any], result: Any) -> str | None:
    if isinstance(result, Mapping):  # accepted: the jobs' ids
        if "jobs" in result:
            return f"jobs {id_ranges([int(job['id']) for job in result['jobs']])}"
        return f"job {result['id']}"
    batch = params.get("jobs")
    if batch is None:
        return _what(params)
    if not isinstance(batch, list):
        return "batch"
    seen: dict[str, None] = {}
    for member in batch:
        seen.setdefault(_what(member))
        if len(seen) > 5:
            break
    return _cut(f"{len(batch)} jobs: {', '.join(seen)}", MAX_TARGET)


# JSON-RPC methods that change something, with how to name what they act on.
JSONRPC_MUTATING: Final[Mapping[str, Target]] = {
    "job.submit": _submitted,
    "job.cancel": _named("job", "id"),
    "queue.pause": _named("queue", "name"),
    "queue.resume": _named("queue", "name"),
    "daemon.reload": lambda params, result: None,
    "daemon.backup": lambda params, result: None,
    "instance.launch": _named("workflow", "workflow"),
    "instance.cancel": _named("instance", "id"),
    "instance.debug_resume": _named("instance", "id"),
    "schedule.enable": _named("schedule", "name"),
    "schedule.disable": _named("schedule", "name"),
    "schedule.trigger": _named("schedule", "name"),
}

# What a successful call adds as the entry's message: what it started (JSON-RPC methods and evQueue commands alike).
_STARTED: Final[Mapping[str, Callable[[Any], str | None]]] = {
    "instance.launch": lambda result: f"instance {result['id']}",
    "instance.debug_resume": lambda result: f"instance {result['id']}",
    "schedule.trigger": lambda result: (
        f"run {result['run_id']}" if result.get("started") else "queued" if result.get("queued") else "not started"
    ),
    # evQueue's answers are elements (a synchronous launch's is a coroutine: no message)
    "instance launch": lambda answer: f"instance {answer.get('workflow-instance-id')}",
    "instance debugresume": lambda answer: f"instance {answer.get('workflow-instance-id')}",
}


def _killtask(attributes: Mapping[str, str], result: Any) -> str | None:
    return f"instance {_cut(attributes.get('id'))} pid {_cut(attributes.get('pid'))}"


# evQueue's XML commands (group, action) that change something; targets from the request's attributes.
XML_MUTATING: Final[Mapping[tuple[str, str], Target]] = {
    ("instance", "launch"): _named("workflow", "name"),
    ("instance", "cancel"): _named("instance", "id"),
    ("instance", "killtask"): _killtask,
    ("instance", "delete"): _named("instance", "id"),
    ("instance", "debugresume"): _named("instance", "id"),
    ("control", "reload"): _named("module", "module"),
}


def _user_name(uid: int) -> str:
    try:
        return _passwd_name(uid)
    except KeyError:  # no passwd entry, or none jobd could read now (short of descriptors): asked again next time
        return str(uid)


@functools.lru_cache(maxsize=256)
def _passwd_name(uid: int) -> str:
    """Only names found are kept: pwd says "not found" when jobd has no descriptor to read /etc/passwd with too,
    and the uid's number, kept, would have stood for its user in every entry after it, for jobd's life."""
    return pwd.getpwuid(uid).pw_name


def who(peer: Peer) -> tuple[int | None, str]:
    """(uid, user name) for an entry: a remote login has no uid."""
    if peer.uid < 0:
        return None, peer.user or "?"
    return peer.uid, peer.user or _user_name(peer.uid)


def _describe(target: Target, params: Mapping[str, Any], result: Any) -> str | None:
    try:
        text = target(params, result)
    except Exception:  # a malformed request the method refused: it is named by what can be read of it
        return None
    return None if text is None else _cut(text, MAX_TARGET)


def record(
    store: Store,
    peer: Peer,
    command: str,
    target: str | None,
    result: str,
    message: str | None = None,
) -> None:
    uid, user = who(peer)
    # Printable: SQLite refuses a lone surrogate, and with it the whole batch of entries this one is written in.
    entry = AuditEntry(
        at=time.time(),
        uid=uid,
        user=printable(user),
        command=command,
        target=None if target is None else printable(target),
        result=result,
        message=None if message is None else printable(_cut(message, MAX_MESSAGE)),
    )
    try:
        store.record_audit_soon(entry)
    except Exception:  # the command has happened: its answer must not be lost because its entry was
        log.exception("could not record %s by uid %s in the audit log", command, uid)


def _code(failure: BaseException) -> tuple[str, str]:
    if isinstance(failure, JobdError):
        return failure.code, failure.message
    if isinstance(failure, Exception) and (store_failed := store_failure(failure)) is not None:
        return store_failed.code, store_failed.message
    if (short := memory_shortage(failure)) is not None:
        return short.code, short.message
    if isinstance(failure, asyncio.CancelledError):
        return "INTERRUPTED", "the connection closed before the result was known"
    return JobdError.code, f"internal error: {type(failure).__name__}: {failure}"


def failed(
    store: Store, peer: Peer, command: str, target: Target, params: Mapping[str, Any], failure: BaseException
) -> None:
    code, message = _code(failure)
    record(store, peer, command, _describe(target, params, None), code, message)


def succeeded(store: Store, peer: Peer, command: str, target: Target, params: Mapping[str, Any], result: Any) -> None:
    started = _STARTED.get(command)
    message = None
    if started is not None:
        try:
            message = started(result)
        except Exception:
            message = None
    record(store, peer, command, _describe(target, params, result), "ok", message)


async def when_known(
    store: Store,
    peer: Peer,
    command: str,
    target: Target,
    params: Mapping[str, Any],
    result: Coroutine[Any, Any, Any],
) -> Any:
    """Await a waiting method's result, then record it."""
    try:
        value = await result
    except BaseException as failure:
        failed(store, peer, command, target, params, failure)
        raise
    succeeded(store, peer, command, target, params, value)
    return value


def call_jsonrpc(
    store: Store,
    peer: Peer,
    method: str,
    target: Target,
    params: Mapping[str, Any],
    run: Callable[[], Any],
    after_reply: AfterReply,
) -> Any:
    """Run a mutating JSON-RPC method and record it once the reply is on its way (a coroutine result: when it
    ends, but a reply waiting only for the fsync of what the method did is recorded as that is done)."""
    try:
        result = run()
    except Exception as failure:
        failed(store, peer, method, target, params, failure)
        raise
    if isinstance(result, DurableReply):
        done = result.result
        after_reply(lambda: succeeded(store, peer, method, target, params, done))
        return result
    if isinstance(result, Coroutine):
        return when_known(store, peer, method, target, params, result)
    after_reply(lambda: succeeded(store, peer, method, target, params, result))
    return result


def call_xml(
    store: Store,
    peer: Peer,
    command: str,
    target: Target,
    attributes: Mapping[str, str],
    run: Callable[[], Any],
) -> Any:
    """Run a mutating evQueue command and record it at once: its change is made before any waiting (a
    synchronous launch waits for the instance it has started)."""
    try:
        result = run()
    except Exception as failure:
        failed(store, peer, command, target, attributes, failure)
        raise
    if isinstance(result, Coroutine):
        succeeded(store, peer, command, target, attributes, None)
    else:
        succeeded(store, peer, command, target, attributes, result)
    return result
