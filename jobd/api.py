"""The API's methods: named, validated parameters in, engine calls, JSON-ready results out.

Protocol-neutral: the JSON-RPC connection (jobd.server) and the HTTP listener's JSON endpoints (jobd.http_api)
decode bytes into a method name and a params object, and call `Api.call`; evQueue's XML commands (jobd.api_evqueue)
have handlers of their own on the same engine. Every parameter is checked here, and a bad one is refused naming what
was wrong and what is allowed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import math
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from lxml import etree

from jobd import __version__, audit, redact, safexml
from jobd.durable import Delegating, DurableReply
from jobd.engine import access
from jobd.engine import callbacks as callback_defs
from jobd.engine.core import STREAMS, Engine, OutputChunk
from jobd.engine.http_task import HttpSpecError, check_request
from jobd.engine.instances import InstanceEvent, Instances, task_json
from jobd.engine.queues import QueueRuntime
from jobd.engine.scheduler import Scheduler
from jobd.engine.submit import SubmitRequest, resolve
from jobd.errors import (
    ConfigError,
    InsufficientRights,
    InvalidParams,
    JobdError,
    MethodNotFound,
    OutOfResources,
    QueueClosed,
    ShuttingDown,
    StoreFailed,
    UnknownInstance,
    UnknownJob,
    UnknownQueue,
    UnknownSchedule,
    UnknownTask,
    UnknownWorkflow,
    json_repr,
)
from jobd.model import (
    MAX_PAGE,
    MAX_PAGE_TEXT,
    MAX_PRIORITY,
    MAX_RETRY_TIMES,
    MAX_SECONDS,
    OBJECT_NAME,
    OBJECT_NAME_RULE,
    WORKFLOW_TASK_KEY_PREFIX,
    AccessDef,
    Job,
    JobSpec,
    JobState,
    ObjectKind,
    ParameterMode,
    RetryPolicy,
    Right,
    WorkflowDef,
)
from jobd.peer import Peer
from jobd.store import AuditFilter, InstanceFilter, JobFilter

MAX_OUTPUT_CHUNK = 1024 * 1024
# A utf-8 chunk is read this far past its limit: the rest of a character the limit cuts (UTF-8's longest is 4 bytes).
MAX_UTF8_EXTRA = 3
T = TypeVar("T")
R = TypeVar("R")
MAX_BATCH = 10_000

log = logging.getLogger("jobd.api")


class DaemonControl(Protocol):
    """What the API needs from the daemon around the engine."""

    def status(self) -> dict[str, Any]: ...

    def reload(self) -> dict[str, Any]: ...

    async def backup(self) -> dict[str, Any]: ...


class Session(Protocol):
    """What the API needs from the connection a call came on."""

    @property
    def peer(self) -> Peer:
        """Who is asking, as the configuration in force sees it: a reload may change it while a call waits."""

    # Methods of METHODS this kind of connection does not serve (HTTP: events.subscribe, for which it has GET
    # /events): left out of the `allowed` list of a METHOD_NOT_FOUND, where the client looks for what it may call.
    methods_not_served: frozenset[str]

    def subscribe(self, selection: EventFilter) -> int: ...

    def after_reply(self, work: Callable[[], None]) -> None:
        """Run `work` once the reply to the call being made is on its way, before the next call of the session
        (or at once): what the client need not wait for, such as a submitted job's start and its audit entry."""

    async def ready_for_reply(self) -> None:
        """Until the client reads its replies again, if it has stopped (at once otherwise): what a method that has
        waited (job.output with `wait`) awaits before it reads what it answers with, so that jobd does not hold
        that data for a client that reads nothing."""


class AfterReplyWork:
    """What a session keeps for Session.after_reply: the work handed over while a call is answered, done by
    `run()` once its reply is made (and, on a socket, sent); outside a call, work is done at once."""

    def __init__(self) -> None:
        self._work: list[Callable[[], None]] | None = None

    def begin(self) -> None:
        """A call is about to be made: keep what it hands over."""
        self._work = []

    def add(self, work: Callable[[], None]) -> None:
        if self._work is None:  # not while a call is answered (a waiting method's later part): now
            work()
        else:
            self._work.append(work)

    def run(self) -> None:
        """Do what the call handed over. Each piece runs even if one before it fails: the call has been answered,
        and each job it committed must still be queued."""
        handed_over, self._work = self._work or [], None
        for work in handed_over:
            try:
                work()
            except Exception:
                log.exception("the work after a reply failed")


# Parameters whose values a refusal does not quote: a job's environment (passwords, tokens) and its stdin. A
# refusal's message is recorded in the audit log, which holds who did what, not the credentials they passed.
SECRET_PARAMS = frozenset({"env", "params", "stdin", "stdin_base64"})


class Params:
    """Reads a params object key by key; `done()` refuses any key nobody asked for."""

    def __init__(self, method: str, raw: Mapping[str, Any], within: str | None = None) -> None:
        self.method = method
        self.raw = raw
        self.seen: set[str] = set()
        # The parameter these are the keys of (`retry`): what a refusal names as its `param`, the key being in the
        # message (`job.submit: retry: times = …`); None: the keys are the method's own parameters.
        self.within = within

    def take(self, name: str) -> Any:
        self.seen.add(name)
        return self.raw.get(name)

    def bad(self, name: str, allowed: str) -> InvalidParams:
        if name in SECRET_PARAMS:  # the message is the audit entry's too: no value the client meant to keep secret
            return InvalidParams(
                f"{self.method}: {name} is not allowed (value not shown); expected {allowed}", param=self.within or name
            )
        value = json_repr(self.raw.get(name))
        return InvalidParams(
            f"{self.method}: {name} = {value} is not allowed; expected {allowed}", param=self.within or name
        )

    def integer(self, name: str, default: int | None = None, *, low: int = 0, high: int = 2**63 - 1) -> int | None:
        value = self.take(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.bad(name, f"an integer from {low} to {high}")
        return value

    def required_integer(self, name: str, *, low: int = 0, high: int = 2**63 - 1) -> int:
        value = self.integer(name, low=low, high=high)
        if value is None:
            raise InvalidParams(f"{self.method}: missing parameter {name!r} (an integer)", param=name)
        return value

    def number(self, name: str, *, low: float = 0.0, positive: bool = False, high: float = MAX_SECONDS) -> float | None:
        value = self.take(name)
        if value is None:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (positive and value <= 0) or value > high:
            floor = "> 0" if positive else f">= {low:g}"
            raise self.bad(name, f"a number {floor} and <= {high:g}")
        return float(value)

    def text(self, name: str, *, choices: tuple[str, ...] = ()) -> str | None:
        value = self.take(name)
        if value is None:
            return None
        if not isinstance(value, str) or "\0" in value or (choices and value not in choices):
            raise self.bad(name, " | ".join(f'"{c}"' for c in choices) if choices else "a string without NUL")
        return value

    def name(self, name: str) -> str | None:
        """The name of a queue, task, workflow or schedule: only what the configuration could have named."""
        value = self.take(name)
        if value is None:
            return None
        if not isinstance(value, str) or not OBJECT_NAME.fullmatch(value):
            raise self.bad(name, f"a name: {OBJECT_NAME_RULE}")
        return value

    def required_name(self, name: str) -> str:
        self.required_text(name)
        value = self.name(name)
        assert value is not None
        return value

    def names(self, name: str) -> tuple[str, ...] | None:
        values = self.texts(name)
        if values is not None and not all(OBJECT_NAME.fullmatch(value) for value in values):  # NUL: texts() said
            raise self.bad(name, f"a list of names: {OBJECT_NAME_RULE}")
        return values

    def required_text(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise InvalidParams(f"{self.method}: missing parameter {name!r} (a string)", param=name)
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.bad(name, "true or false")
        return value

    def texts(self, name: str, *, one_for_a_list: bool = True) -> tuple[str, ...] | None:
        """A list of strings; a filter may be one string for a list of one. An argv may not: `"ls -l"` would
        run a program of that name."""
        value = self.take(name)
        if value is None:
            return None
        if isinstance(value, str) and one_for_a_list:
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
            raise self.bad(name, "a list of strings without NUL")
        return tuple(value)

    def text_map(self, name: str) -> dict[str, str]:
        value = self.take(name)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) and "\0" not in v for v in value.values()):
            raise self.bad(name, "an object whose values are strings without NUL")
        return dict(value)

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self.take(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.bad(name, "an object")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            allowed = f"allowed: {', '.join(sorted(self.seen))}" if self.seen else "it takes no parameters"
            raise InvalidParams(
                f"{self.method}: unknown parameter {unknown[0]!r}; {allowed}",
                param=self.within or unknown[0],
                allowed=sorted(self.seen),
            )


Handler = Callable[["Api", Session, Params], Any]  # a result, or a coroutine (see Api.call)


@dataclass
class Api:
    engine: Engine
    daemon: DaemonControl
    instances: Instances
    scheduler: Scheduler

    def call(self, session: Session, method: str, raw_params: Mapping[str, Any]) -> Any:
        """The method's result, or a coroutine producing it for a method that has to wait (job.wait, ...).

        Most methods answer at once, so they are plain functions and the connection replies without a task.
        """
        handler = METHODS.get(method)
        if handler is None:
            served = sorted(METHODS.keys() - session.methods_not_served)
            raise MethodNotFound(f"no method {json_repr(method)}; methods: {', '.join(served)}", allowed=served)
        params = Params(method, raw_params)
        target = audit.JSONRPC_MUTATING.get(method)

        def run() -> Any:
            return _naming_the_method(method, lambda: handler(self, session, params))

        try:
            if target is None:  # read-only: not audited
                return run()
            # The one place every mutating method is audited, refusals and failures included.
            return audit.call_jsonrpc(
                self.engine.store, session.peer, method, target, raw_params, run, session.after_reply
            )
        except UNKNOWN_NAME as error:
            raise as_seen_by(self, session.peer, error) from None


def _naming_the_method(method: str, run: Callable[[], Any]) -> Any:
    """`run()`, each of whose refusals starts `METHOD: ` (once), as those of its parameters (Params) do already:
    the engine's (`no job 7`, `unknown queue 'x'`, the rights) said nothing of the method, so a client's log of
    several calls did not tell which was refused. Also when the method refuses after waiting (`job.wait`). A reply
    that waits only for its commit to reach the disk (DurableReply) is left as it is: it refuses nothing."""
    try:
        result = run()
    except JobdError as error:
        raise _of_method(error, method) from None
    if isinstance(result, Coroutine) and not isinstance(result, DurableReply):
        return _NamingTheMethod(method, result)
    return result


class _NamingTheMethod(Delegating[Any]):
    """A waiting method's coroutine (`work`) whose refusals start `METHOD: `. Not a bare `async def` around it:
    closed before it ran (its client left first), it closes `work` too, which would otherwise be left never
    awaited."""

    def __init__(self, method: str, work: Coroutine[Any, Any, Any]) -> None:
        self.work = work
        self._wait = self._answer(method, work)

    @staticmethod
    async def _answer(method: str, work: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await work
        except JobdError as error:
            raise _of_method(error, method) from None

    def close(self) -> None:
        super().close()
        self.work.close()


# Not about the call, nor mended by changing it: jobd's own failures, and a broken configuration (whose message
# starts `FILE:LINE:`, as at jobd's start). Told as they are.
_NOT_REFUSALS = (OutOfResources, StoreFailed, ShuttingDown, ConfigError)


def _of_method(error: JobdError, method: str) -> JobdError:
    """`error`, a refusal of `method`, as a message that starts with the method, once (`events.subscribe is not
    available over HTTP` says it already)."""
    if (
        type(error) is JobdError
        or isinstance(error, _NOT_REFUSALS)
        or error.message.startswith((f"{method}:", f"{method} "))
    ):
        return error
    return type(error)(f"{method}: {error.message}", **error.details)


# An unknown name's error lists the names that exist (`defined tasks: …`): to an admin all of them, to anyone else
# only those it has a right on, as its lists show. A peer learns no more from a typo, or from a wildcard grant
# (`news*`) that lets an unknown name through the rights check, than it may see anyway.
# (An unknown schedule never reaches a non-admin: _schedule_name refuses it as one it may not read.)
UNKNOWN_NAME = (UnknownTask, UnknownWorkflow, UnknownQueue)
_KIND_OF_UNKNOWN: dict[type[JobdError], ObjectKind] = {
    UnknownTask: ObjectKind.TASK,
    UnknownWorkflow: ObjectKind.WORKFLOW,
    UnknownQueue: ObjectKind.QUEUE,
}


def as_seen_by(api: Api, peer: Peer, error: JobdError) -> JobdError:
    """`error` (one of UNKNOWN_NAME) with its list of defined names cut to those `peer` may see."""
    if peer.is_admin:
        return error
    kind = _KIND_OF_UNKNOWN[type(error)]
    rules = api.engine.config.access
    names = error.details.get("allowed") or []
    visible = [name for name in names if any(access.may(rules, peer, right, kind, name) for right in Right)]
    head, _, listed = error.message.partition("; defined ")
    message = f"{head}; defined {listed.partition(':')[0]}: {', '.join(visible) or '(none)'}" if listed else head
    return type(error)(message, **{**error.details, "allowed": visible})


# -- methods ----------------------------------------------------------------------------------------------------


def ping(api: Api, session: Session, p: Params) -> Any:
    p.done()
    return {"pong": True, "version": __version__}


def _submit_request(p: Params) -> tuple[SubmitRequest, float]:
    stdin_text, stdin_b64 = p.text("stdin"), p.text("stdin_base64")
    if stdin_text is not None and stdin_b64 is not None:
        raise InvalidParams(
            f"{p.method}: give 'stdin' (text) or 'stdin_base64' (bytes in base64), not both", param="stdin_base64"
        )
    stdin = stdin_text.encode() if stdin_text is not None else _b64(p, "stdin_base64", stdin_b64)
    command = p.texts("command", one_for_a_list=False)
    if command is not None and (not command or not command[0]):
        raise p.bad("command", "a non-empty list of strings whose first is the program")
    retry_raw = p.mapping("retry")
    http_raw = p.mapping("http")
    try:
        http = None if http_raw is None else check_request(http_raw)
    except HttpSpecError as error:
        raise InvalidParams(f"{p.method}: http: {error}", param="http") from None
    request = SubmitRequest(
        task=p.name("task"),
        command=command,
        queue=p.name("queue"),
        priority=p.integer("priority", 1024, high=MAX_PRIORITY) or 0,
        timeout=p.number("timeout", positive=True),
        args=p.texts("args", one_for_a_list=False) or (),
        params=p.text_map("params"),
        env=p.text_map("env"),
        stdin=stdin,
        context=p.text("context"),
        key=_key(p),
        working_dir=_absolute_dir(p),
        retry=None if retry_raw is None else _retry(p, retry_raw),
        kill_grace=p.number("kill_grace"),
        max_output=p.integer("max_output"),
        merge_stderr=p.flag("merge_stderr"),
        callbacks=_callbacks(p),
        http=http,
    )
    delay = p.number("delay") or 0.0
    return request, delay


def _key(p: Params) -> str | None:
    key = p.text("key")
    if key == "":  # would make every later submit without a key of its own return the first such job
        raise p.bad("key", "a non-empty string (leave it out for no idempotency key)")
    # jobd's keys for workflow tasks' jobs: a job a client submitted with one would be taken, when the instance comes
    # to that task, for the task's own job (its output the task's, the task itself never run).
    if key is not None and key.startswith(WORKFLOW_TASK_KEY_PREFIX):
        allowed = f"a non-empty string not starting with {WORKFLOW_TASK_KEY_PREFIX!r} (jobd's workflow tasks use those)"
        raise p.bad("key", allowed)
    return key


def _absolute_dir(p: Params) -> str | None:
    path = p.text("working_dir")
    if path is not None and not path.startswith("/"):  # jobd's own working directory is no business of clients
        raise p.bad("working_dir", "an absolute path")
    return path


def _callbacks(p: Params) -> dict[str, list[dict[str, Any]]] | None:
    raw = p.take("callbacks")
    if raw is None:
        return None
    try:
        return callback_defs.check_callbacks(raw, f"{p.method}: callbacks")
    except callback_defs.BadCallback as error:  # data.key: the key inside `callbacks` at fault, if not the whole
        raise InvalidParams(str(error), param="callbacks", **({"key": error.dotted} if error.key else {})) from None


def _b64(p: Params, name: str, value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise p.bad(name, "base64 text") from None


def _retry(p: Params, raw: Mapping[str, Any]) -> RetryPolicy:
    sub = Params(f"{p.method}: retry", raw, within="retry")
    default = RetryPolicy()
    codes = sub.take("on_exit_codes") or []
    if not isinstance(codes, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in codes
    ):
        raise sub.bad("on_exit_codes", "a list of exit codes 0-255")
    backoff = sub.number("backoff", low=1.0)
    delay = sub.number("delay")
    policy = RetryPolicy(
        times=sub.integer("times", 0, high=MAX_RETRY_TIMES) or 0,
        delay=default.delay if delay is None else delay,
        backoff=default.backoff if backoff is None else backoff,
        on_exit_codes=tuple(codes),
    )
    sub.done()
    return policy


def job_submit(api: Api, session: Session, p: Params) -> Any:
    batch = p.take("jobs")
    if batch is not None:
        if (
            not isinstance(batch, list)
            or not batch
            or len(batch) > MAX_BATCH
            or not all(isinstance(j, dict) for j in batch)
        ):
            raise p.bad("jobs", f"a list of 1 to {MAX_BATCH} job objects")
        p.done()
        members = [Params(f"{p.method}: jobs[{i}]", raw) for i, raw in enumerate(batch)]
    else:
        members = [p]
    specs, delays = [], []
    for index, member in enumerate(members):
        try:
            request, delay = _submit_request(member)
            member.done()
            spec = _resolve_or_keyed(api, request, session.peer)
            _check_queue(api, spec)
        except JobdError as error:
            if error.details.get("param") == "stdin" and "stdin_base64" in member.raw:
                error.details["param"] = "stdin_base64"  # the one a SubmitRequest's `stdin` came from
            raise error if batch is None else _of_member(error, member.method, index) from None
        specs.append(spec)
        delays.append(delay)
    first_with_key: dict[str, int] = {}  # a key's first member in the batch: the job a later one would be answered
    for index, spec in enumerate(specs):
        if spec.key is not None:
            try:
                _check_key(api, session, spec)
                if spec.key in first_with_key:
                    _check_key_in_batch(api, session, spec, first_with_key[spec.key], specs[first_with_key[spec.key]])
            except JobdError as error:
                raise error if batch is None else _of_member(error, members[index].method, index) from None
            first_with_key.setdefault(spec.key, index)
    submitted = api.engine.submit(specs, delays, after_reply=session.after_reply)
    # `new` tells a submit that made its job from one whose key named a job made before (answered as it is now):
    # a script run again learns that its work was already submitted, and which job that was.
    jobs = [{**job.to_json(), "new": made} for job, made in submitted]
    result = {"jobs": jobs} if batch is not None else jobs[0]
    return once_durable(api.engine, result)


def _of_member(error: JobdError, member: str, index: int) -> JobdError:
    """The refusal of a batch's member `index` (`member` is `job.submit: jobs[3]`): its message starts so, as the
    refusals of its params do already, whichever check made it (the engine's of the task, the queue and the rights
    say nothing of it), and its `data.index` is its place in `jobs`. (A single submit's refusals start `job.submit: `
    as every method's do: Api.call.)"""
    message = error.message if error.message.startswith(f"{member}:") else f"{member}: {error.message}"
    return type(error)(message, **{**error.details, "index": index})


def _check_queue(api: Api, spec: JobSpec) -> None:
    """The engine's refusal of the job's queue (unknown, or removed and draining), named as the submit's `queue`,
    before a batch's later members are read. (Engine.submit checks again, for its other callers.)"""
    try:
        api.engine.check_queue(spec)
    except (UnknownQueue, QueueClosed) as error:
        error.details.setdefault("param", "queue")
        raise


def _resolve_or_keyed(api: Api, request: SubmitRequest, peer: Peer) -> JobSpec:
    """The job `request` asks for; or, when its key is already taken and its task or queue has gone from the
    configuration since, the spec of the job that has the key, which the submit answers with (a client asks again
    with the key when it lost the first reply). Rights are checked as for any submit, and the read right on that
    job then too (_check_key)."""
    try:
        return resolve(api.engine.config, request, peer)
    except (UnknownTask, UnknownQueue):
        existing = None if request.key is None else api.engine.job_with_key(request.key)
        if existing is None or (request.task is not None and request.task != existing.spec.task):
            raise
        return existing.spec


def _check_key(api: Api, session: Session, spec: JobSpec) -> None:
    """A submit whose key is taken answers with the job that has it: only to a peer that may read that job (the
    refusal names neither the job nor its task), and only for the same work: the same task, or the same ad-hoc
    command or HTTP request. Another task with a key already taken is a mistake (or a key taken first by someone
    else, to have the job of whoever comes next answered with theirs): refused, not answered with a job of another
    task the client would take for its own."""
    assert spec.key is not None
    existing = api.engine.job_with_key(spec.key)
    if existing is None:
        return
    _check_may_read_keyed(api, session, spec.key, existing.spec, "another job")
    if _work_of(existing.spec) != _work_of(spec):
        raise InvalidParams(
            f"key {spec.key!r} is already that of job {existing.id} ({_work_named(existing.spec)}), and "
            f"this submit is for {'another ad-hoc one' if _is_ad_hoc_alike(existing.spec, spec) else _work_named(spec)}"
            ": a key names one job; give this one a key of its own",
            param="key",
            job=existing.id,
        )


def _check_key_in_batch(api: Api, session: Session, spec: JobSpec, first: int, first_spec: JobSpec) -> None:
    """A batch's member whose key an earlier member has is answered with that member's job, as a second submit with
    the key is (the members count as submits in a row): only to a peer that may read that job, and only for the same
    work. Both are committed together, after every check, so _check_key found no job with the key yet, and a member
    of other work was answered with the first one's job instead of being refused, and one the peer may not read
    (a right to submit without the one to read) was answered with it where a second submit is refused. The earlier
    member is the peer's own, in this very request: the refusal names it."""
    assert spec.key is not None
    _check_may_read_keyed(api, session, spec.key, first_spec, f"jobs[{first}]", first=first)
    if _work_of(first_spec) != _work_of(spec):
        other = "another ad-hoc one" if _is_ad_hoc_alike(first_spec, spec) else _work_named(spec)
        raise InvalidParams(
            f"key {spec.key!r} is already that of jobs[{first}] ({_work_named(first_spec)}), and this member is for "
            f"{other}: a key names one job; give this one a key of its own",
            param="key",
            first=first,
        )


def _check_may_read_keyed(api: Api, session: Session, key: str, holder: JobSpec, named: str, **details: Any) -> None:
    """A submit with `key` is answered with the job that has it (`holder`, `named` so in the refusal): only if the
    peer may read that job."""
    if not access.may_job(api.engine.config.access, session.peer, Right.READ, holder.task, holder.queue):
        raise InsufficientRights(
            f"{access.who(session.peer)} may not submit with key {key!r}: {named} has it, and the read right is "
            "missing on that job",
            missing=str(Right.READ),
            kind="job",
            param="key",
            **details,
        )


def _work_of(spec: JobSpec) -> tuple[Any, ...]:
    """What a job does, as a key's reuse compares it: its task; or, ad hoc, its HTTP request or its command."""
    if spec.task is not None:
        return ("task", spec.task)
    if spec.http is not None:
        return ("http", spec.http.get("method"), spec.http.get("url"))
    return ("command", spec.command)


def _work_named(spec: JobSpec) -> str:
    if spec.task is not None:
        return f"task {spec.task!r}"
    return "an ad-hoc HTTP request" if spec.http is not None else "an ad-hoc command"


def _is_ad_hoc_alike(one: JobSpec, other: JobSpec) -> bool:
    """Both ad-hoc commands, or both ad-hoc HTTP requests: told apart by what they run, not by what they are."""
    return one.task is None and other.task is None and (one.http is None) == (other.http is None)


def once_durable(engine: Engine, result: R) -> R | DurableReply[R]:
    """The reply to a command that committed something: at once, or with `[daemon] durability = "fsync"` once
    that commit survives a power cut (a coroutine the connection awaits; every protocol goes through here)."""
    if engine.replies_wait_for_fsync:
        return DurableReply(result, engine.made_durable)
    return result


def _job_id(p: Params) -> int:
    return p.required_integer("id", low=1)


def checked_job(api: Api, peer: Peer, right: Right, job_id: int) -> Job:
    """The job, if `peer` has `right` on it (on its task or its queue). To a peer that is not an admin, an id that
    names no job is refused as a job it may not read is (access.refused): told apart, they would show it the ids
    of the jobs of others."""
    try:
        job = api.engine.get(job_id)
    except UnknownJob:
        if peer.is_admin:
            raise
        raise access.refused(peer, right, "job", job_id) from None
    access.require_job(api.engine.config.access, peer, right, job.id, job.spec.task, job.spec.queue)
    return job


def _checked_job(api: Api, session: Session, right: Right, job_id: int) -> Job:
    return checked_job(api, session.peer, right, job_id)


def job_get(api: Api, session: Session, p: Params) -> Any:
    job_id = _job_id(p)
    p.done()
    job = _checked_job(api, session, Right.READ, job_id)
    return {**job.to_json(), "tries": [attempt.to_json() for attempt in api.engine.attempts(job_id)]}


def job_list(api: Api, session: Session, p: Params) -> Any:
    states = p.texts("state") or ()
    allowed_states = tuple(str(s) for s in JobState)
    for state in states:
        if state not in allowed_states:
            raise p.bad("state", " | ".join(allowed_states))
    limit = p.integer("limit", 100, low=1, high=MAX_PAGE) or 100
    where = JobFilter(
        states=tuple(dict.fromkeys(JobState(s) for s in states)),  # each once: the jobs of each are read and merged
        queue=p.name("queue"),
        task=p.name("task"),
        context=p.text("context"),
        before_id=p.integer("before", low=1),
        limit=limit + 1,  # one more than asked: whether there is a next page
        max_text=MAX_PAGE_TEXT,
    )
    p.done()
    where = dataclasses.replace(
        where,
        visible_tasks=_visible(api, session, ObjectKind.TASK),
        visible_queues=_visible(api, session, ObjectKind.QUEUE),
    )
    found, cut = api.engine.page_of_jobs(where)
    jobs, more = _page(found, limit)
    return {"jobs": [job.to_json() for job in jobs], "next_before": jobs[-1].id if more or cut else None}


def _page(rows: list[T], limit: int) -> tuple[list[T], bool]:
    """The first `limit` of `rows` (fetched one more than asked), and whether older rows follow: the `next_before`
    of a reply is set only then, not merely when the page is full."""
    return rows[:limit], len(rows) > limit


def _utf8_length(lead: int) -> int:
    """The length of the UTF-8 character whose first byte is `lead` (1 for ASCII and stray continuation bytes)."""
    return 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _without_cut_character(data: bytes) -> int:
    """The length of `data` without a UTF-8 character whose last bytes are missing at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: no character is cut
            return len(data)
        if byte >= 0xC0:  # the lead byte of the last character says how long it is
            return len(data) - back if back < _utf8_length(byte) else len(data)
    return len(data)  # continuation bytes only: not UTF-8 anyway, for "replace" to show


def _first_character(data: bytes) -> int | None:
    """The length of the character `data` starts with: its lead byte and the continuation bytes after it (fewer than
    the lead byte announces in invalid UTF-8, which "replace" shows as U+FFFD), or None if `data` ends first."""
    length = _utf8_length(data[0])
    for index in range(1, length):
        if index == len(data):
            return None
        if not 0x80 <= data[index] < 0xC0:
            return index
    return length


def _text_chunk(data: bytes, limit: int, ends_stream: bool) -> bytes:
    """What of `data` (read up to MAX_UTF8_EXTRA bytes past `limit`) a utf-8 chunk sends: at most `limit` bytes
    that end with a whole character, so that the next chunk, from next_offset, starts with one (decoded alone, each
    half of a cut character would become U+FFFD). A first character longer than `limit` comes whole, or every read
    with that limit would split it; one the job has not finished writing yet comes once it has (empty until then).
    At the end of a stream nothing more is written to (`ends_stream`), a cut character stays: nothing can complete
    it."""
    if not data or (ends_stream and len(data) <= limit):
        return data
    piece = data[:limit]
    whole = _without_cut_character(piece)
    if whole:
        return piece[:whole]
    first = _first_character(data)
    if first is None:  # the stream ends before the character does: now, or not yet
        return data if ends_stream else b""
    return data[:first]


async def job_output(api: Api, session: Session, p: Params) -> Any:
    job_id = _job_id(p)
    stream = p.text("stream", choices=STREAMS) or "stdout"
    attempt = p.integer("attempt", low=1)
    # Beyond any file (4 EiB), and low enough that offset + limit stays a file offset the kernel takes.
    offset = p.integer("offset", 0, high=2**62) or 0
    limit = p.integer("limit", 65536, low=1, high=MAX_OUTPUT_CHUNK) or 65536
    encoding = p.text("encoding", choices=("utf-8", "base64")) or "utf-8"
    wait = p.flag("wait")
    p.done()
    _checked_job(api, session, Right.READ, job_id)

    async def read() -> tuple[OutputChunk, bytes]:
        """The chunk read, and what of it is answered."""
        if encoding == "base64":
            chunk = await api.engine.read_output(
                job_id, attempt, stream, offset, limit, wait=wait, ready=session.ready_for_reply
            )
            return chunk, chunk.data
        chunk = await api.engine.read_output(
            job_id, attempt, stream, offset, limit + MAX_UTF8_EXTRA, wait=wait, ready=session.ready_for_reply
        )
        data = _text_chunk(chunk.data, limit, chunk.complete)
        # Only part of a character so far: a wait goes on until the job has written the rest (or ended).
        while wait and not data and api.engine.attempt_running(job_id, chunk.attempt):
            await api.engine.wait_output(job_id)
            chunk = await api.engine.read_output(
                job_id, chunk.attempt, stream, offset, limit + MAX_UTF8_EXTRA, wait=True, ready=session.ready_for_reply
            )
            data = _text_chunk(chunk.data, limit, chunk.complete)
        return chunk, data

    if wait:
        chunk, data = await while_allowed(api, read(), lambda: _checked_job(api, session, Right.READ, job_id))
    else:
        chunk, data = await read()
    complete = chunk.complete and len(data) == len(chunk.data)
    return {
        "data": base64.b64encode(data).decode() if encoding == "base64" else data.decode("utf-8", "replace"),
        "offset": offset,
        "next_offset": offset + len(data),
        "size": chunk.size,
        "complete": complete,
        "truncated": chunk.truncated,
        "attempt": chunk.attempt,
    }


async def job_wait(api: Api, session: Session, p: Params) -> Any:
    job_id = _job_id(p)
    timeout = p.number("timeout")
    p.done()
    _checked_job(api, session, Right.READ, job_id)
    job = await while_allowed(
        api, api.engine.wait(job_id, timeout), lambda: _checked_job(api, session, Right.READ, job_id)
    )
    return job.to_json()


async def while_allowed(
    api: Api,
    waiting: Coroutine[Any, Any, T],
    check: Callable[[], object],
    since: asyncio.Future[None] | None = None,
) -> T:
    """What `waiting` returns, as long as `check` (which raises the refusal) lets the client have it: run again at
    each reload while it waits, since a reload may take the right away (grants are the configuration's, and only a
    reload changes them). Refused, the request is answered the refusal a new one would get at once, and `waiting`
    is dropped: not the object once it ends, nor at the time it ends, which would tell when it did.

    `since` is the engine's next_reload() taken when the right was checked, for a caller that has waited since
    (evQueue's commands are checked before their coroutine first runs, a synchronous launch waits for its fsync
    first): a reload meanwhile is checked for at once."""
    task = asyncio.ensure_future(waiting)
    reloaded = since if since is not None else api.engine.next_reload()
    try:
        while not task.done():
            await asyncio.wait((task, reloaded), return_when=asyncio.FIRST_COMPLETED)
            if reloaded.done():
                check()
                reloaded = api.engine.next_reload()
        return task.result()
    finally:
        task.cancel()  # refused (or the request itself is dropped): nobody waits for it any more


async def job_cancel(api: Api, session: Session, p: Params) -> Any:
    job_id = _job_id(p)
    p.done()
    _checked_job(api, session, Right.KILL, job_id)
    return (await api.engine.cancel(job_id)).to_json()


def queue_json(engine: Engine, queue: QueueRuntime) -> dict[str, Any]:
    return {
        "name": queue.name,
        "concurrency": queue.definition.concurrency,
        "scheduler": str(queue.definition.scheduler),
        "paused": queue.paused,
        "closed": queue.closed,
        "queued": queue.ready_count(),
        "delayed": engine.delayed_count(queue.name),
        "running": len(queue.running),
    }


def readable_queues(api: Api, peer: Peer) -> list[QueueRuntime]:
    rules = api.engine.config.access
    return [
        queue for queue in api.engine.queue_list() if access.may(rules, peer, Right.READ, ObjectKind.QUEUE, queue.name)
    ]


def queue_list(api: Api, session: Session, p: Params) -> Any:
    p.done()
    engine = api.engine
    return {"queues": [queue_json(engine, queue) for queue in readable_queues(api, session.peer)]}


def _visible(api: Api, session: Session, kind: ObjectKind) -> tuple[str, ...] | None:
    """Name patterns (SQLite GLOB) of what the peer may read; None for all of it."""
    return access.glob_patterns(api.engine.config.access, session.peer, Right.READ, kind)


def queue_pause(api: Api, session: Session, p: Params) -> Any:
    name = p.required_name("name")
    p.done()
    access.require(api.engine.config.access, session.peer, Right.EDIT, ObjectKind.QUEUE, name)
    return queue_json(api.engine, api.engine.set_paused(name, True))


def queue_resume(api: Api, session: Session, p: Params) -> Any:
    name = p.required_name("name")
    p.done()
    access.require(api.engine.config.access, session.peer, Right.EDIT, ObjectKind.QUEUE, name)
    return queue_json(api.engine, api.engine.set_paused(name, False))


HIDDEN_RELOAD_ERROR = "the configuration has an error (shown to admins, and in jobd's log); the running one is kept"


async def daemon_status(api: Api, session: Session, p: Params) -> Any:
    p.done()
    engine = api.engine
    if session.peer.is_admin:
        jobs = await engine.history_counts()
    else:
        jobs = await engine.history_counts(
            _visible(api, session, ObjectKind.TASK), _visible(api, session, ObjectKind.QUEUE)
        )
    queues = [queue_json(engine, queue) for queue in readable_queues(api, session.peer)]
    # Why a schedule "did not run": those a failed run suspended, of the ones the peer may read (as schedule.list).
    suspended = [
        name
        for name in api.scheduler.suspended()
        if session.peer.is_admin or may_schedule(api, session.peer, Right.READ, api.scheduler.describe(name))
    ]
    status = {**api.daemon.status(), "queues": queues, "jobs": jobs, "suspended_schedules": suspended}
    if not session.peer.is_admin:
        # Which files configure jobd is the admins' business; the counts are of what the peer may read, as its lists.
        del status["config_files"]
        if status["last_reload"]["error"] is not None:
            # The error names a file, a line and a key (`task.NAME.environment.VAR`): tasks the peer may not see.
            status["last_reload"] = {**status["last_reload"], "error": HIDDEN_RELOAD_ERROR}
        # The trouble names the job or queue whose write failed; the failure itself (a full disk) is everyone's.
        status["store_trouble"] = engine.store_trouble_cause
        status["store_internal_error"] = engine.store_internal_error(naming_what=False)
        status.update({count: sum(queue[count] for queue in queues) for count in ("running", "queued", "delayed")})
    return status


def daemon_reload(api: Api, session: Session, p: Params) -> Any:
    p.done()
    access.require_admin(session.peer, "reload the configuration")
    return api.daemon.reload()


def daemon_backup(api: Api, session: Session, p: Params) -> Any:
    p.done()
    access.require_admin(session.peer, "copy the database")
    return api.daemon.backup()


JOB_EVENT_TYPES = ("job.state", "job.progress", "job.log")
INSTANCE_EVENT_TYPES = ("instance.state", "instance.progress")
EVENT_TYPES = JOB_EVENT_TYPES + INSTANCE_EVENT_TYPES


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a subscriber wants, for events.subscribe and GET /events alike (an empty set: no filter).

    `jobs` and `queues` choose among job events, `instances` and `workflows` among instance events; filters of one
    kind alone leave out every event of the other kind (asking for instance 7 is not asking for every job too).
    A peer hears only of the jobs it may read and of the instances of the workflows it may read.
    """

    jobs: frozenset[int] = frozenset()
    queues: frozenset[str] = frozenset()
    instances: frozenset[int] = frozenset()
    workflows: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    @property
    def selected(self) -> int:
        """How many jobs, queues, instances and workflows it names."""
        return len(self.jobs) + len(self.queues) + len(self.instances) + len(self.workflows)

    def wants_job(self, rules: AccessDef, peer: Peer, kind: str, job_id: int, task: str | None, queue: str) -> bool:
        if self.types and kind not in self.types:
            return False
        if self.jobs or self.queues:
            if (self.jobs and job_id not in self.jobs) or (self.queues and queue not in self.queues):
                return False
        elif self.instances or self.workflows:
            return False
        return access.may_job(rules, peer, Right.READ, task, queue)

    def wants_instance(self, rules: AccessDef, peer: Peer, event: InstanceEvent) -> bool:
        if self.types and event.type not in self.types:
            return False
        if self.instances or self.workflows:
            if (self.instances and event.instance_id not in self.instances) or (
                self.workflows and event.workflow not in self.workflows
            ):
                return False
        elif self.jobs or self.queues:
            return False
        return access.may(rules, peer, Right.READ, ObjectKind.WORKFLOW, event.workflow)


def events_subscribe(api: Api, session: Session, p: Params) -> Any:
    ids: dict[str, frozenset[int]] = {}
    for name, what in (("jobs", "job"), ("instances", "instance")):
        value = p.take(name) or []
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise p.bad(name, f"a list of {what} ids")
        ids[name] = frozenset(value)
    queues = p.names("queues") or ()
    workflows = p.names("workflows") or ()
    types = p.texts("types") or ()
    for kind in types:
        if kind not in EVENT_TYPES:
            raise p.bad("types", " | ".join(EVENT_TYPES))
    p.done()
    selection = EventFilter(ids["jobs"], frozenset(queues), ids["instances"], frozenset(workflows), frozenset(types))
    return {"subscription": session.subscribe(selection)}


def task_list(api: Api, session: Session, p: Params) -> Any:
    """The configured tasks the peer may read: what `jobctl submit` (and its shell completion) can offer."""
    p.done()
    tasks = api.engine.config.tasks
    return {
        "tasks": [
            {"name": name, "queue": tasks[name].queue, "parameters": str(tasks[name].parameters)}
            for name in _readable(api, session, ObjectKind.TASK, tasks)
        ]
    }


def _readable(api: Api, session: Session, kind: ObjectKind, names: Iterable[str]) -> list[str]:
    """The names, sorted, of the objects of `kind` the peer may read: what a `*.list` method shows."""
    rules = api.engine.config.access
    return [name for name in sorted(names) if access.may(rules, session.peer, Right.READ, kind, name)]


# -- workflows and instances ------------------------------------------------------------------------------------


def _workflow_json(definition: WorkflowDef, peer: Peer) -> dict[str, Any]:
    shown = {
        "name": definition.name,
        "parameters": list(definition.parameters),
        "group": definition.group,  # those of evQueue's git file (docs/workflows.md); empty for a plain definition
        "comment": definition.comment,
        "path": definition.path,
    }
    if not peer.is_admin:  # which files configure jobd is the admins' business (as daemon.status's config_files)
        del shown["path"]
    return shown


def workflow_list(api: Api, session: Session, p: Params) -> Any:
    p.done()
    workflows = api.engine.config.workflows
    return {
        "workflows": [
            _workflow_json(workflows[name], session.peer)
            for name in _readable(api, session, ObjectKind.WORKFLOW, workflows)
        ]
    }


def _workflow(api: Api, session: Session, p: Params) -> WorkflowDef:
    name = p.required_name("name")
    access.require(api.engine.config.access, session.peer, Right.READ, ObjectKind.WORKFLOW, name)
    definition = api.engine.config.workflows.get(name)
    if definition is None:
        known = sorted(api.engine.config.workflows)
        raise UnknownWorkflow(f"no workflow {name!r}; defined workflows: {', '.join(known) or 'none'}", allowed=known)
    return definition


def workflow_get(api: Api, session: Session, p: Params) -> Any:
    definition = _workflow(api, session, p)
    p.done()
    return {**_workflow_json(definition, session.peer), "xml": definition.source.decode("utf-8", "replace")}


def instance_launch(api: Api, session: Session, p: Params) -> Any:
    name = p.required_name("workflow")
    parameters = p.text_map("parameters")
    # An empty host or user is none, as evQueue's clients send them (the XML protocol reads them so too).
    comment, host, user = p.text("comment"), p.text("host") or None, p.text("user") or None
    p.done()
    check_launch(api, session.peer, name, host, user)
    instance_id = api.instances.launch(
        name, parameters, comment=comment, host=host, user=user, launched_by=session.peer.uid
    )
    result = api.instances.summary(instance_id).to_json()
    return once_durable(api.engine, result)


def check_launch(api: Api, peer: Peer, workflow: str, host: str | None, user: str | None) -> None:
    """`exec` on the workflow; choosing where (`host`) or as whom (`user`) its tasks run is for admins."""
    access.require(api.engine.config.access, peer, Right.EXEC, ObjectKind.WORKFLOW, workflow)
    if host is not None or user is not None:
        access.require_admin(peer, "choose the host or user an instance's tasks run on")


def check_instance(api: Api, peer: Peer, right: Right, instance_id: int) -> None:
    """Refuse unless `peer` has `right` on the workflow the instance runs. The refusal names the workflow only to a
    peer that may read it: instance ids count up, and naming it to anyone else would list every workflow. To a
    peer that is not an admin, an id that names no instance is refused as one it may not read is (access.refused)."""
    try:
        workflow = api.instances.summary(instance_id).workflow
    except UnknownInstance:
        if peer.is_admin:
            raise
        raise access.refused(peer, right, "instance", instance_id) from None
    rules = api.engine.config.access
    if not access.may(rules, peer, right, ObjectKind.WORKFLOW, workflow):
        on = f" on workflow {workflow}" if access.may(rules, peer, Right.READ, ObjectKind.WORKFLOW, workflow) else ""
        raise access.refused(peer, right, "instance", instance_id, on)


def instance_get(api: Api, session: Session, p: Params) -> Any:
    instance_id = p.required_integer("id", low=1)
    form = p.text("format", choices=("json", "xml")) or "json"
    p.done()
    check_instance(api, session.peer, Right.READ, instance_id)
    summary = api.instances.summary(instance_id).to_json()
    document = api.instances.document(instance_id)
    if form == "xml":
        return {**summary, "xml": document.decode("utf-8")}
    return {**summary, "jobs": instance_tree(document)}


def instance_tree(document: bytes) -> list[dict[str, Any]]:
    """The instance document as nested jobs and tasks: what `jobctl instance` draws."""
    root = safexml.parse(document, "instance document")

    def job_json(job: etree._Element) -> dict[str, Any]:
        return {
            "evqid": int(job.get("evqid", "0")),
            "name": job.get("name"),
            "status": job.get("status"),
            "details": job.get("details"),
            "error": job.get("error"),
            "tasks": [task_json(task) for task in job.findall("tasks/task")],
            "subjobs": [job_json(sub) for sub in job.findall("subjobs/job")],
        }

    return [job_json(job) for job in root.findall("subjobs/job")]


async def instance_wait(api: Api, session: Session, p: Params) -> Any:
    instance_id = p.required_integer("id", low=1)
    timeout = p.number("timeout")
    p.done()
    check_instance(api, session.peer, Right.READ, instance_id)
    waiting = api.instances.wait(instance_id, timeout)
    summary = await while_allowed(api, waiting, lambda: check_instance(api, session.peer, Right.READ, instance_id))
    return summary.to_json()


def instance_cancel(api: Api, session: Session, p: Params) -> Any:
    instance_id = p.required_integer("id", low=1)
    p.done()
    check_instance(api, session.peer, Right.KILL, instance_id)
    return api.instances.cancel(instance_id).to_json()


def instance_debug_resume(api: Api, session: Session, p: Params) -> Any:
    instance_id = p.required_integer("id", low=1)
    p.done()
    check_instance(api, session.peer, Right.READ, instance_id)
    check_instance(api, session.peer, Right.EXEC, instance_id)
    resumed = api.instances.debug_resume(instance_id, launched_by=session.peer.uid)
    result = api.instances.summary(resumed).to_json()
    return once_durable(api.engine, result)


INSTANCE_STATUSES = ("EXECUTING", "TERMINATED")


def instance_list(api: Api, session: Session, p: Params) -> Any:
    limit = p.integer("limit", 100, low=1, high=MAX_PAGE) or 100
    errors = p.take("errors")
    if errors is not None and not isinstance(errors, bool):  # null, as every filter left out, does not filter
        raise p.bad("errors", "true (only instances with errors) or false (only those without)")
    where = InstanceFilter(
        workflow=p.name("workflow"),
        status=p.text("status", choices=INSTANCE_STATUSES),
        error=errors,
        before_id=p.integer("before", low=1),
        parameters=p.text_map("parameters"),
        custom_attributes=p.text_map("custom_attributes"),
        limit=limit + 1,
    )
    p.done()
    where = dataclasses.replace(where, visible_workflows=_visible(api, session, ObjectKind.WORKFLOW))
    found, total = api.instances.list_instances(where)
    rows, more = _page(found, limit)
    return {"instances": [row.to_json() for row in rows], "total": total, "next_before": rows[-1].id if more else None}


# -- schedules ---------------------------------------------------------------------------------------------------


def may_schedule(api: Api, peer: Peer, right: Right, schedule: Mapping[str, Any]) -> bool:
    """A schedule has the rights of what it starts: a workflow, or a task."""
    target = schedule["target"]
    kind = ObjectKind.WORKFLOW if target["kind"] == "workflow" else ObjectKind.TASK
    return access.may(api.engine.config.access, peer, right, kind, target["name"])


def schedule_json(api: Api, peer: Peer, schedule: Mapping[str, Any]) -> Mapping[str, Any]:
    """A schedule as `peer` sees it. The parameters of a task that takes them as environment variables
    (`parameters = "env"`) become its jobs' environment, which no job's JSON shows: to anyone but an admin their
    values are masked, as an HTTP job's secrets are (a token the configuration gives a nightly run)."""
    target = schedule["target"]
    if peer.is_admin or target["kind"] != "task" or not target["parameters"]:
        return schedule
    task = api.engine.config.tasks.get(target["name"])
    if task is not None and task.parameters is not ParameterMode.ENV:  # they are its jobs' argv, shown to readers
        return schedule
    return {**schedule, "target": {**target, "parameters": dict.fromkeys(target["parameters"], redact.MASK)}}


def schedule_list(api: Api, session: Session, p: Params) -> Any:
    p.done()
    schedules = api.scheduler.list()
    peer = session.peer
    return {"schedules": [schedule_json(api, peer, s) for s in schedules if may_schedule(api, peer, Right.READ, s)]}


def _schedule_name(api: Api, session: Session, p: Params, right: Right) -> str:
    name = p.required_name("name")
    p.done()
    if session.peer.is_admin:
        return name
    try:
        schedule: Mapping[str, Any] | None = api.scheduler.describe(name)
    except UnknownSchedule:
        schedule = None
    if schedule is None or not may_schedule(api, session.peer, Right.READ, schedule):
        # Rights before names, as for tasks and workflows: whether it exists, and what it starts, are not told.
        raise InsufficientRights(
            f"{access.who(session.peer)} may not {right} schedule {name}: the {right} right is missing",
            missing=str(right),
            kind="schedule",
            name=name,
        )
    if not may_schedule(api, session.peer, right, schedule):
        target = schedule["target"]
        raise InsufficientRights(
            f"{access.who(session.peer)} may not {right} schedule {name}: "
            f"the {right} right is missing on {target['kind']} {target['name']}",
            missing=str(right),
            kind="schedule",
            name=name,
        )
    return name


def schedule_enable(api: Api, session: Session, p: Params) -> Any:
    name = _schedule_name(api, session, p, Right.EDIT)
    return schedule_json(api, session.peer, api.scheduler.enable(name))


def schedule_disable(api: Api, session: Session, p: Params) -> Any:
    name = _schedule_name(api, session, p, Right.EDIT)
    return schedule_json(api, session.peer, api.scheduler.disable(name))


def schedule_trigger(api: Api, session: Session, p: Params) -> Any:
    name = _schedule_name(api, session, p, Right.EXEC)
    triggered = api.scheduler.trigger(name)
    return {
        "schedule": schedule_json(api, session.peer, api.scheduler.describe(name)),
        "started": triggered.started,
        "run_id": triggered.run_id,
        "queued": triggered.queued,
    }


# -- audit ------------------------------------------------------------------------------------------------------


def audit_list(api: Api, session: Session, p: Params) -> Any:
    limit = p.integer("limit", 100, low=1, high=MAX_PAGE) or 100
    since_text = p.text("since")
    where = AuditFilter(
        uid=p.integer("uid", low=-1),
        user=p.text("user"),
        command=p.text("command"),
        since=None if since_text is None else _instant(p, "since", since_text),
        before_id=p.integer("before", low=1),
        limit=limit + 1,
    )
    p.done()
    access.require_admin(session.peer, "read the audit log")
    return _audit_page(api, where, limit)


async def _audit_page(api: Api, where: AuditFilter, limit: int) -> Any:
    entries, more = _page(await api.engine.store.read_audit(where), limit)
    return {"entries": [entry.to_json() for entry in entries], "next_before": entries[-1].id if more else None}


def _instant(p: Params, name: str, text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise p.bad(name, "an ISO 8601 time, e.g. 2026-01-31T12:00:00Z") from None
    return (moment if moment.tzinfo is not None else moment.astimezone()).timestamp()


METHODS: dict[str, Handler] = {
    "ping": ping,
    "job.submit": job_submit,
    "job.get": job_get,
    "job.list": job_list,
    "job.output": job_output,
    "job.wait": job_wait,
    "job.cancel": job_cancel,
    "queue.list": queue_list,
    "queue.pause": queue_pause,
    "queue.resume": queue_resume,
    "daemon.status": daemon_status,
    "daemon.reload": daemon_reload,
    "daemon.backup": daemon_backup,
    "events.subscribe": events_subscribe,
    "task.list": task_list,
    "workflow.list": workflow_list,
    "workflow.get": workflow_get,
    "instance.launch": instance_launch,
    "instance.get": instance_get,
    "instance.wait": instance_wait,
    "instance.cancel": instance_cancel,
    "instance.debug_resume": instance_debug_resume,
    "instance.list": instance_list,
    "schedule.list": schedule_list,
    "schedule.enable": schedule_enable,
    "schedule.disable": schedule_disable,
    "schedule.trigger": schedule_trigger,
    "audit.list": audit_list,
}
