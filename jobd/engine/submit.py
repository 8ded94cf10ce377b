"""Turning a submit request into a JobSpec: task lookup, parameters, defaults, who may run ad-hoc commands.

Pure: the configuration and the peer come in, a self-contained JobSpec comes out, so a later reload cannot change
work that was already accepted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import field
from types import MappingProxyType
from typing import Any

from jobd.engine import access as access_rules
from jobd.engine import callbacks as callback_defs
from jobd.errors import InsufficientRights, InvalidParams, UnknownTask, json_repr
from jobd.model import (
    DEFAULT_PRIORITY,
    ENV_NAME,
    NO_RETRY,
    Config,
    JobSpec,
    ObjectKind,
    ParameterMode,
    RetryPolicy,
    Right,
    TaskDef,
)
from jobd.peer import Peer
from jobd.values import value

RESERVED_ENV_PREFIX = "JOBD_"
# Linux's execve() refuses (E2BIG) any one argument or environment string (NAME=value) longer than this, its NUL
# included (MAX_ARG_STRLEN, 32 pages): a job holding one could never start, and failed only when its turn came.
MAX_ARG_STRLEN = 32 * os.sysconf("SC_PAGESIZE")


@value
class SubmitRequest:
    task: str | None = None
    command: tuple[str, ...] | None = None
    queue: str | None = None
    priority: int = DEFAULT_PRIORITY
    delay: float = 0.0
    timeout: float | None = None
    args: tuple[str, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    context: str | None = None
    key: str | None = None
    merge_stderr: bool = False
    # ad-hoc commands only: tasks take these from the configuration
    working_dir: str | None = None
    retry: RetryPolicy | None = None
    kill_grace: float | None = None
    max_output: int | None = None
    callbacks: Mapping[str, object] | None = None  # the job's own, checked by jobd.engine.callbacks
    http: Mapping[str, Any] | None = None  # an ad-hoc HTTP job (checked by jobd.engine.http_task.check_request)


def scheduler_peer() -> Peer:
    """Who submits the job of a task schedule's run: jobd itself, an admin (a task's allowed_params, which bound
    callers who are not admins, do not apply: the schedule's parameters are the configuration's own, and its pid
    is jobd's, which _task_identity reads as "no caller to run as")."""
    return Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), is_admin=True)


def schedule_request(schedule: str, task: str, parameters: Mapping[str, str]) -> SubmitRequest:
    """What a firing of task schedule `schedule` submits. The configuration's load resolves it too, with
    scheduler_peer(), so that a schedule whose task would refuse it at every firing is a load error instead."""
    return SubmitRequest(
        task=task,
        params=dict(parameters),
        context=f"schedule:{schedule}",  # also how the scheduler finds the job again after a crash
    )


_AD_HOC_ONLY = ("working_dir", "retry", "kill_grace", "max_output", "http")
# What an HTTP job takes beside its request: what does not concern a program. Its `retry` retries a failed request,
# its `max_output` caps the response body kept; a program's input and settings have no meaning for it, and
# `kill_grace` none either (a cancel or a timeout abandons the request at once: there is nothing to wait for).
_HTTP_JOB_TAKES = "queue, priority, delay, timeout, retry, max_output, context, key and callbacks"
_NOT_FOR_HTTP = ("args", "params", "env", "stdin", "working_dir", "kill_grace", "merge_stderr")
_WHAT_TO_RUN = ("task", "command", "http")


# Every refusal names the submit's parameter at fault as `param` (docs/protocol.md): a client (or a form) can point
# at it without reading the message.
def resolve(config: Config, request: SubmitRequest, peer: Peer) -> JobSpec:
    chosen = [name for name in _WHAT_TO_RUN if getattr(request, name) is not None]
    if len(chosen) != 1:
        raise InvalidParams(
            "give exactly one of 'task' (a configured task), 'command' (an argv list) or 'http' (a request)"
            + (f"; got {' and '.join(repr(name) for name in chosen)}" if chosen else ""),
            param=chosen[-1] if chosen else "task",  # the one too many, or the one a submit usually gives
            allowed=list(_WHAT_TO_RUN),
        )
    if request.args and request.params:
        raise InvalidParams("give 'args' (a list) or 'params' (an object), not both", param="params")
    _check_env_names(request.env, "env")
    _check_env_names(request.params, "params")
    if not peer.is_admin:
        _check_unprivileged_env(request, peer)
    resolved = _resolve_task if request.task is not None else _resolve_ad_hoc
    spec = resolved(config, request, peer)  # the engine checks the queue: it knows which ones are draining
    _check_exec_strings(request, spec)
    return _with_callbacks(config, request, peer, spec)


def _check_exec_strings(request: SubmitRequest, spec: JobSpec) -> None:
    """Refuse an argument or environment variable Linux would not start a program with (MAX_ARG_STRLEN), naming the
    submit's parameter it came from (`task`: the task's configuration). Every submit passes here: a string of no more
    than a quarter of the limit in characters fits whatever they are (UTF-8 takes at most 4 bytes for one), and only
    a longer one is encoded and traced to its origin."""
    for text in spec.command:
        if len(text) >= _SURELY_FITS and _exec_size(text) > MAX_ARG_STRLEN:
            raise _too_long("an argument", text, _argument_origin(request, text))
    for name, text in spec.env.items():
        if len(name) + len(text) >= _SURELY_FITS and _exec_size(f"{name}={text}") > MAX_ARG_STRLEN:
            origin = "env" if name in request.env else "params" if name in request.params else "task"
            raise _too_long("an environment variable", f"{name}={text}", origin)


_SURELY_FITS = MAX_ARG_STRLEN // 4 - 1  # characters: at most 4 bytes each, with "=" and the NUL


def _exec_size(text: str) -> int:
    return len(text.encode()) + 1  # its NUL


def _too_long(what: str, text: str, param: str) -> InvalidParams:
    return InvalidParams(
        f"{param}: {what} of {_exec_size(text)} bytes with its NUL ({json_repr(text)}); Linux starts no program with "
        f"an argument or environment variable (NAME=value) of more than {MAX_ARG_STRLEN} bytes",
        param=param,
        limit=MAX_ARG_STRLEN,
    )


def _argument_origin(request: SubmitRequest, text: str) -> str:
    if request.command is not None:
        return "command"
    return "args" if text in request.args else "params" if text in request.params.values() else "task"


def _with_callbacks(config: Config, request: SubmitRequest, peer: Peer, spec: JobSpec) -> JobSpec:
    """The task's, the queue's and the job's own completion callbacks, in that order (docs/jobs.md)."""
    if callback_defs.has_exec(request.callbacks):
        access_rules.require_admin(
            peer, "give a job exec callbacks (http callbacks are allowed to all)", param="callbacks"
        )
    task = config.tasks.get(spec.task) if spec.task is not None else None
    queue = config.queues.get(spec.queue)
    callbacks = callback_defs.merge(
        task.callbacks if task is not None else None,
        queue.callbacks if queue is not None else None,
        request.callbacks,
    )
    return spec if callbacks is None else dataclasses.replace(spec, callbacks=callbacks)


def _resolve_task(config: Config, request: SubmitRequest, peer: Peer) -> JobSpec:
    assert request.task is not None
    # Rights first: a peer without them learns nothing about which tasks exist.
    access_rules.require(config.access, peer, Right.EXEC, ObjectKind.TASK, request.task, param="task")
    task = config.tasks.get(request.task)
    if task is None:
        raise UnknownTask(
            f"unknown task {request.task!r}; defined tasks: {', '.join(sorted(config.tasks)) or '(none)'}",
            task=request.task,
            allowed=sorted(config.tasks),
            param="task",
        )
    for name in _AD_HOC_ONLY:
        if getattr(request, name) is not None:
            raise InvalidParams(
                f"'{name}' is set by the task's configuration; it is allowed for ad-hoc jobs only ('command'"
                + (")" if name in _NOT_FOR_HTTP else " or 'http')"),
                param=name,
            )
    if request.queue is not None and request.queue != task.queue:
        access_rules.require(config.access, peer, Right.EXEC, ObjectKind.QUEUE, request.queue, param="queue")
    extra = _given(request, ("args", "params", "stdin", "merge_stderr")) if task.http is not None else None
    if extra is not None:
        raise InvalidParams(
            f"task {task.name!r} makes an HTTP request: it takes no 'args', 'params', 'stdin' or 'merge_stderr'",
            param=extra,
        )
    if task.parameters is ParameterMode.ENV and request.args:
        # Its argv is the configuration's alone: arguments would get past allowed_params (`--config=…` to a program
        # that reads one, run as the task's user).
        raise InvalidParams(
            f"task {task.name!r} takes its parameters as environment variables (parameters = \"env\"): give 'params' "
            "(the names its allowed_params lists), not 'args'; 'args' are for tasks with parameters = \"args\" and "
            "ad-hoc commands",
            param="args",
        )
    argv = task.command + request.args
    env = dict(task.environment)
    if task.parameters is ParameterMode.ENV:
        if not peer.is_admin:
            _check_allowed_params(task, request.params, peer)
        env.update(request.params)
    else:
        argv += tuple(request.params.values())
    env.update(request.env)
    uid, gid = _task_identity(config, task, peer)
    return JobSpec(
        command=argv,
        queue=request.queue or task.queue,
        task=task.name,
        priority=request.priority,
        env=MappingProxyType(env),
        stdin=request.stdin,
        working_dir=task.working_dir,
        timeout=request.timeout if request.timeout is not None else task.timeout,
        kill_grace=task.kill_grace,
        retry=task.retry,
        max_output=task.max_output,
        context=request.context,
        key=request.key,
        submitted_by=peer.uid,
        merge_stderr=request.merge_stderr,
        run_as_uid=uid,
        run_as_gid=gid,
        http=task.http,
    )


def _task_identity(config: Config, task: TaskDef, peer: Peer) -> tuple[int | None, int | None]:
    """Who a task's job runs as: its configured user (the default user applied at load), or its caller."""
    if not task.run_as_caller:
        return task.uid, task.gid
    if peer.pid == os.getpid():  # jobd itself submits (a schedule): there is no caller to run as
        return config.daemon.default_uid, config.daemon.default_gid
    if peer.uid < 0:
        raise InsufficientRights(
            f'task {task.name!r} runs as the user who submits it (run_as = "caller"), '
            "and a remote client has no local user to run it as; submit it as a local user (over the unix socket, "
            "or with a token whose user is a local account)",
            missing="local user",
            task=task.name,
            param="task",
        )
    return peer.uid, peer.gid


def _resolve_ad_hoc(config: Config, request: SubmitRequest, peer: Peer) -> JobSpec:
    what = "http" if request.http is not None else "command"
    access_rules.require_admin(peer, "run ad-hoc commands (submit a configured task instead)", param=what)
    if request.http is not None:
        return _resolve_ad_hoc_http(config, request, peer)
    assert request.command is not None
    if peer.uid < 0:
        raise InsufficientRights(
            "ad-hoc commands run as the admin who submits them, and a remote client has no local user; "
            "submit a configured task instead",
            missing="local user",
            param="command",
        )
    return JobSpec(
        command=request.command + request.args,
        queue=request.queue or "default",
        priority=request.priority,
        env=MappingProxyType({**request.params, **request.env}),
        stdin=request.stdin,
        working_dir=request.working_dir,
        timeout=request.timeout,
        kill_grace=request.kill_grace if request.kill_grace is not None else config.daemon.kill_grace,
        retry=request.retry or NO_RETRY,
        max_output=request.max_output if request.max_output is not None else config.daemon.max_output,
        context=request.context,
        key=request.key,
        submitted_by=peer.uid,
        merge_stderr=request.merge_stderr,
        run_as_uid=peer.uid,  # the calling admin
        run_as_gid=peer.gid,
    )


def _resolve_ad_hoc_http(config: Config, request: SubmitRequest, peer: Peer) -> JobSpec:
    assert request.http is not None
    extra = _given(request, _NOT_FOR_HTTP)
    if extra is not None:
        raise InvalidParams(
            f"an HTTP job starts no program, so {extra!r} has no meaning for it (it takes none of "
            f"{', '.join(repr(name) for name in _NOT_FOR_HTTP)}: a cancel or a timeout abandons its request at once, "
            f"with no kill_grace to wait out); beside 'http' it takes {_HTTP_JOB_TAKES}",
            param=extra,
        )
    return JobSpec(
        command=(),
        queue=request.queue or "default",
        priority=request.priority,
        timeout=request.timeout,
        kill_grace=0.0,
        retry=request.retry or NO_RETRY,
        max_output=request.max_output if request.max_output is not None else config.daemon.max_output,
        context=request.context,
        key=request.key,
        submitted_by=peer.uid,
        http=MappingProxyType(dict(request.http)),
    )


def _given(request: SubmitRequest, names: tuple[str, ...]) -> str | None:
    """The first of `names` the request sets: a value other than None, False, an empty list or an empty object."""
    for name in names:
        value = getattr(request, name)
        if value is not None and value is not False and not (isinstance(value, tuple | Mapping) and not value):
            return name
    return None


def _check_unprivileged_env(request: SubmitRequest, peer: Peer) -> None:
    if request.env:
        raise InsufficientRights(
            f"{access_rules.who(peer)} may not set 'env': extra environment variables are for admins, "
            "the admin right is missing; pass values as the task's 'params' instead",
            missing="admin",
            param="env",
        )


def _check_allowed_params(task: TaskDef, params: Mapping[str, str], peer: Peer) -> None:
    """A caller who is not an admin sets only the variables the task allows: any other could steer the program
    (PHPRC, LD_PRELOAD, PYTHONPATH…), and no list of those is ever complete."""
    for name in params:
        if name not in task.allowed_params:
            allowed = ", ".join(task.allowed_params) or "none"
            raise InsufficientRights(
                f"params: {access_rules.who(peer)} may not set {json_repr(name)} for task {task.name!r}: only the "
                f"names in its allowed_params ({allowed}); others are for admins: the admin right is missing",
                missing="admin",
                param=name,
                allowed=list(task.allowed_params),
            )


def _check_env_names(variables: Mapping[str, str], what: str) -> None:
    # A name is the client's text, quoted as its values are (JSON-style, cut to 60 characters): a name of a
    # mebibyte was sent back whole, in Python's quotes.
    for name in variables:
        if not ENV_NAME.fullmatch(name):
            raise InvalidParams(
                f"{what}: {json_repr(name)} is not a valid environment variable name; allowed: [A-Za-z_][A-Za-z0-9_]*",
                param=what,
            )
        if name.startswith(RESERVED_ENV_PREFIX):
            raise InvalidParams(
                f"{what}: {json_repr(name)}: names starting with JOBD_ are set by jobd itself; allowed: "
                "[A-Za-z_][A-Za-z0-9_]* not starting with JOBD_",
                param=what,
            )
