"""Plain values jobd reasons about: definitions from the config, jobs, attempts, and the job state machine.

Everything here is a frozen dataclass (those made on every job and submit are `@value` classes, frozen for the
type checker: jobd/values.py) or a StrEnum; nothing does I/O. Every change of a job's state goes through
`transition()`, which enforces the table below.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from jobd import redact
from jobd.errors import InvalidTransition
from jobd.values import evolve, value

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # what an environment variable may be called, everywhere
# What a client may give as the name of a queue, task, workflow or schedule: every name the configuration allows
# (config.py, workflowdef.py) and nothing else, so no NUL, no "/", no ".." ever reaches a lookup, a log or a path.
OBJECT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
OBJECT_NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 _ . -, not starting with ."
DEFAULT_PRIORITY = 1024
MAX_PRIORITY = 2**32 - 1
MAX_SECONDS = 100 * 366 * 86400  # delays, timeouts, graces: a century keeps every date representable
# How the idempotency keys of workflow tasks' jobs begin (`instance:ID:task:N:try:T`, jobd.engine.instances). jobd
# alone gives them: job.submit refuses them.
WORKFLOW_TASK_KEY_PREFIX = "instance:"
WORKFLOW_SCRIPT_NAME = re.compile(r"[0-9]+-[0-9]+")  # a SCRIPT task's file in state_dir/scripts: INSTANCE-EVQID
# Places past max_connections that only admins may take: any local user who can reach the socket could otherwise hold
# every place with idle connections and lock out the administrator who would look into it.
ADMIN_CONNECTIONS = 4
# HTTP callback tries under way at most (jobd/engine/callbacks.py), each a connection: jobd/openfiles.py counts them.
HTTP_CALLBACKS_AT_ONCE = 100
MAX_PAGE = 1000  # jobs, instances or audit entries in one list reply
# What the jobs of one job.list page may hold together in argv, environment, context, key, callbacks and HTTP
# request, as stored: each job may hold almost a request's 1 MiB, and a page of 1,000 of them took a gigabyte to read
# and send, the event loop held the while. A page ends before the job that would take it past this (it holds one
# job at least), with `next_before` set for the rest.
MAX_PAGE_TEXT = 4 * 1024 * 1024
# Retries one job may be given: by a submit, a task's `retry`, a level of a retry schedule or a workflow task's
# retry_times. Each try is a row the job keeps and counts as it ends; a million, loaded from a file, kept the loop
# busy for each of that job's ends (docs/BENCHMARKS.md, "A job retried many times").
MAX_RETRY_TIMES = 1000
DEFAULT_KILL_GRACE = 10.0
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
MAX_RETRY_DELAY = 366 * 86400.0  # a retry back-off never waits longer than a year


class InStore(Enum):
    """What a job's spec leaves in the database instead of holding in jobd's memory: the jobs the store returns carry
    it in place of their stdin, which is read back when an attempt starts. A client may give each job up to 1 MiB of
    stdin; held, a backlog of such jobs took that much memory each for as long as it waited (docs/jobs.md)."""

    STDIN = "stdin"


class JobState(StrEnum):
    DELAYED = "delayed"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED})

# Which state may follow which. A retry moves a running job back to delayed (with a back-off) or queued;
# crash recovery does the same from the `running` rows it finds.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.DELAYED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.TIMED_OUT,
            JobState.CANCELLED,
            JobState.DELAYED,
            JobState.QUEUED,
        }
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.TIMED_OUT: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class Outcome(StrEnum):
    """How one attempt ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # non-zero exit code, or killed by a signal nobody sent
    TIMED_OUT = "timed_out"
    KILLED = "killed"  # ended by a cancel or by jobd's shutdown
    LOST = "lost"  # jobd died while it ran
    SPAWN_ERROR = "spawn_error"  # the program could not be started (missing, not executable, bad cwd)


# A failure of these kinds may be retried; a cancel or a program that cannot be started is final.
RETRYABLE_OUTCOMES = frozenset({Outcome.FAILED, Outcome.TIMED_OUT, Outcome.LOST})


class Scheduler(StrEnum):
    PRIORITY = "priority"  # priority (lower first), then submission order
    FIFO = "fifo"  # submission order only


class ParameterMode(StrEnum):
    ARGS = "args"  # appended to argv
    ENV = "env"  # exported as environment variables


class Durability(StrEnum):
    CRASH = "crash"  # WAL, synchronous=NORMAL: a commit survives any crash of jobd
    FSYNC = "fsync"  # the reply waits for an fsync shared by every request waiting (group commit)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    times: int = 0
    delay: float = 1.0
    backoff: float = 2.0
    on_exit_codes: tuple[int, ...] = ()  # empty: any failure is retried

    def next_delay(self, attempt: int) -> float:
        """Delay before the try that follows attempt number `attempt` (1-based), at most MAX_RETRY_DELAY."""
        if self.delay == 0:  # no wait, however many tries: the overflow below would make it a year's
            return 0.0
        try:
            delay = self.delay * self.backoff ** (attempt - 1)
        except OverflowError:  # a steep back-off over many tries: beyond any date
            delay = math.inf
        return float(min(delay, MAX_RETRY_DELAY))

    def allows(self, attempt: int, outcome: Outcome, exit_code: int | None) -> bool:
        if attempt > self.times or outcome not in RETRYABLE_OUTCOMES:
            return False
        if outcome is Outcome.FAILED and self.on_exit_codes:
            return exit_code in self.on_exit_codes
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "times": self.times,
            "delay": self.delay,
            "backoff": self.backoff,
            "on_exit_codes": list(self.on_exit_codes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RetryPolicy:
        return cls(
            times=int(data["times"]),
            delay=float(data["delay"]),
            backoff=float(data["backoff"]),
            on_exit_codes=tuple(int(c) for c in data["on_exit_codes"]),
        )


NO_RETRY = RetryPolicy()  # one value for every job that is not retried, the default of tasks and specs


@dataclass(frozen=True, slots=True)
class QueueDef:
    name: str
    concurrency: int = 1
    scheduler: Scheduler = Scheduler.PRIORITY
    paused: bool = False
    callbacks: Mapping[str, Any] | None = None  # on_success / on_failure / on_finish for every job of the queue


@dataclass(frozen=True, slots=True)
class TaskDef:
    name: str
    command: tuple[str, ...]
    queue: str = "default"
    parameters: ParameterMode = ParameterMode.ARGS
    # With parameters = "env": the `params` names a caller who is not an admin may set (admins may set any).
    allowed_params: tuple[str, ...] = ()
    working_dir: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    kill_grace: float = DEFAULT_KILL_GRACE
    retry: RetryPolicy = NO_RETRY
    max_output: int = DEFAULT_MAX_OUTPUT
    # Who the process runs as (docs/config.md, "Run as"): the names as configured, and the ids they resolved to when
    # the configuration loaded (the [daemon] default_user already applied). uid None: jobd's own user.
    user: str | None = None
    group: str | None = None
    run_as_caller: bool = False  # run_as = "caller": the uid and gid of whoever submits the job
    uid: int | None = None
    gid: int | None = None
    callbacks: Mapping[str, Any] | None = None  # on_success / on_failure / on_finish lists
    http: Mapping[str, Any] | None = None  # an HTTP task (jobd/engine/http_task.py): `command` is then empty


@dataclass(frozen=True, slots=True)
class History:
    keep_days: float | None = 30.0
    keep_last: int | None = None


@dataclass(frozen=True, slots=True)
class DaemonDef:
    socket: str = "/run/jobd/jobd.sock"
    evqueue_socket: str | None = "/run/jobd/evqueue.sock"
    max_connections: int = 256  # clients connected at once, both sockets together; more are refused
    # The most of those places one user who is not an admin may hold (a uid on the sockets, a login on TCP); None:
    # only max_connections bounds them. Without it one user can lock out every other one who is not an admin.
    max_connections_per_user: int | None = None
    tasks_directory: str = "/usr/lib/jobd/tasks"
    state_dir: str = "/var/lib/jobd"
    durability: Durability = Durability.CRASH
    history: History = History()
    kill_grace: float = DEFAULT_KILL_GRACE
    max_output: int = DEFAULT_MAX_OUTPUT
    # Whom tasks run as when they name no user: the name as configured (None: not set, so "nobody" when jobd runs
    # as root and jobd's own user otherwise) and the ids it resolved to (None: jobd's own user).
    default_user: str | None = None
    default_uid: int | None = None
    default_gid: int | None = None
    socket_group: str = "jobd"  # group of the API sockets; jobd's own group (and a warning) if it does not exist
    socket_mode: int = 0o660


@dataclass(frozen=True, slots=True)
class RemoteUser:
    """`[tcp.users.NAME]`: a login for evQueue clients on the TCP listener (docs/config.md)."""

    name: str
    password_sha1: str  # SHA1(password) as 40 lowercase hex digits: evQueue's stored form, the handshake's HMAC key
    groups: frozenset[str] = frozenset()  # for grants, as a local user's groups
    admin: bool = False


def host_port(host: str, port: int) -> str:
    """An address as written in the configuration and the log: `host:port`, `[host]:port` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class TcpDef:
    """`[tcp]`: the optional TCP listener for evQueue clients, with evQueue's challenge/HMAC-SHA1 login."""

    listen: tuple[str, int] | None = None  # (IP address, port); None: no TCP listener (the default)
    login_delay: float = 1.0  # seconds before the first failed login of an address is answered; doubles each time
    login_delay_max: float = 30.0  # the cap of that delay
    users: Mapping[str, RemoteUser] = field(default_factory=dict)
    # file -> the logins whose password_sha1 in force it holds: secrets (config.open_password_files)
    password_files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def listen_text(self) -> str | None:
        if self.listen is None:
            return None
        return host_port(*self.listen)


@dataclass(frozen=True, slots=True)
class RetryLevel:
    """One level of a named retry schedule: `times` more tries, each `delay` seconds after the last failure."""

    delay: float
    times: int


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """`[retry_schedule.NAME] levels = [...]`: evQueue's multi-level retry policy, used by workflow tasks."""

    name: str
    levels: tuple[RetryLevel, ...]


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """A workflow definition from `workflows/NAME.xml`, already validated.

    `source` is the file's bytes (an evQueue 3 `<workflow>` document); each instance is built from a fresh parse of
    it, so no XML tree is shared between instances or with the config.
    """

    name: str
    path: str
    source: bytes
    parameters: tuple[str, ...] = ()  # names of <parameters><parameter name>, in document order
    # What evQueue 3.3's git file holds around the definition (`<workflow group comment>`), shown as evQueue shows
    # them (`workflows list`, `workflow get`); empty for a plain definition, as for an evQueue workflow without them.
    group: str = ""
    comment: str = ""


class Right(StrEnum):
    """What a grant allows on a workflow, task or queue (evQueue's per-workflow rights, docs/config.md)."""

    READ = "read"  # see it: get, list, output, wait
    EXEC = "exec"  # start it: submit a task, launch a workflow, trigger a schedule
    KILL = "kill"  # stop it: cancel a job or an instance, kill an instance's task
    EDIT = "edit"  # change its state: pause/resume a queue, enable/disable a schedule


class ObjectKind(StrEnum):
    """What a grant names: `workflows`, `tasks` or `queues` of `[[access.grant]]`."""

    WORKFLOW = "workflow"
    TASK = "task"
    QUEUE = "queue"


@dataclass(frozen=True, slots=True)
class Grant:
    """One `[[access.grant]]`: `rights` on the named objects (shell-style wildcards) for these users and groups."""

    rights: frozenset[Right]
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    workflows: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()

    def patterns(self, kind: ObjectKind) -> tuple[str, ...]:
        if kind is ObjectKind.WORKFLOW:
            return self.workflows
        return self.tasks if kind is ObjectKind.TASK else self.queues


@dataclass(frozen=True, slots=True)
class AccessDef:
    """`[access]`: who is an admin (may do everything), and the grants of everybody else."""

    admin_users: frozenset[str] = frozenset({"root"})
    admin_groups: frozenset[str] = frozenset({"jobd-admin"})
    grants: tuple[Grant, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpToken:
    """`[http.tokens.NAME]`: a bearer token (kept as its SHA-256) and who its holder is for the rights model."""

    name: str
    token_sha256: str  # lowercase hex
    user: str
    groups: frozenset[str] = frozenset()
    admin: bool = False


@dataclass(frozen=True, slots=True)
class HttpDef:
    """`[http]`: the optional HTTP listener (docs/http.md): an "address:port" or a unix socket path."""

    listen: tuple[str, int] | str | None = None  # (IP address, port), an absolute socket path, or None (off)
    tokens: Mapping[str, HttpToken] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonDef = DaemonDef()
    tcp: TcpDef = TcpDef()
    http: HttpDef = HttpDef()
    queues: Mapping[str, QueueDef] = field(default_factory=dict)
    tasks: Mapping[str, TaskDef] = field(default_factory=dict)
    retry_schedules: Mapping[str, RetrySchedule] = field(default_factory=dict)
    workflows: Mapping[str, WorkflowDef] = field(default_factory=dict)
    schedules: Mapping[str, ScheduleDef] = field(default_factory=dict)
    access: AccessDef = AccessDef()
    files: tuple[str, ...] = ()  # the files it was read from, in the order they applied


@value
class JobSpec:
    """Everything needed to run a job, resolved at submission so a later reload cannot change accepted work."""

    command: tuple[str, ...]
    queue: str
    task: str | None = None
    priority: int = DEFAULT_PRIORITY
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes | InStore | None = None  # InStore.STDIN: the job has stdin, and the database holds it
    working_dir: str | None = None
    timeout: float | None = None
    kill_grace: float = DEFAULT_KILL_GRACE
    retry: RetryPolicy = NO_RETRY
    max_output: int = DEFAULT_MAX_OUTPUT
    context: str | None = None
    key: str | None = None
    submitted_by: int | None = None  # uid of the peer
    merge_stderr: bool = False  # stderr goes to the stdout stream (2>&1)
    run_as_uid: int | None = None  # None: jobd's own user
    run_as_gid: int | None = None
    # An HTTP job: the request jobd makes in-process instead of starting a program (validated at submit; JSON-able).
    http: Mapping[str, Any] | None = None
    # Completion callbacks {"on_success"|"on_failure"|"on_finish": [callback, ...]} (validated at submit; JSON-able).
    callbacks: Mapping[str, Any] | None = None


@value
class Job:
    id: int
    spec: JobSpec
    state: JobState
    created_at: float
    run_at: float  # when a delayed job becomes ready (wall clock)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    exit_code: int | None = None
    signal: int | None = None
    progress: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        created_at = iso(self.created_at)
        return {
            "id": self.id,
            "task": spec.task,
            "command": list(spec.command),
            "queue": spec.queue,
            "priority": spec.priority,
            "state": str(self.state),
            "context": spec.context,
            "key": spec.key,
            "created_at": created_at,
            "run_at": created_at if self.run_at == self.created_at else iso(self.run_at),  # not delayed: same
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "attempts": self.attempts,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "progress": self.progress,
            "error": self.error,
            "timeout": spec.timeout,
            "retry": spec.retry.to_json(),
            # An HTTP job's request, its secrets masked (jobd/redact.py); null for a program.
            "http": None if spec.http is None else redact.http_request(spec.http),
        }


@value
class Attempt:
    job_id: int
    number: int  # 1-based
    started_at: float
    outcome: Outcome | None = None  # None while it runs
    finished_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    pid: int | None = None
    pid_start: int | None = None  # start time of `pid` in clock ticks after boot (/proc/PID/stat field 22)
    cpu_user: float | None = None
    cpu_system: float | None = None
    max_rss_kib: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False  # a stream lost bytes (beyond max_output, or to a failed write)
    # Which: "stdout", "stderr", "log"; None for an attempt recorded before jobd kept them apart (schema 16).
    cut_streams: tuple[str, ...] | None = ()
    error: str | None = None
    cancel_requested: bool = False  # a cancel was being carried out (kept in the store for crash recovery)
    time_limit_reached: bool = False  # its time limit was stopping it (kept in the store for crash recovery)

    def to_json(self) -> dict[str, Any]:
        wall = None if self.finished_at is None else round(self.finished_at - self.started_at, 6)
        return {
            "job_id": self.job_id,
            "number": self.number,
            "outcome": None if self.outcome is None else str(self.outcome),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "wall_seconds": wall,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "pid": self.pid,
            "cpu_user": self.cpu_user,
            "cpu_system": self.cpu_system,
            "max_rss_kib": self.max_rss_kib,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
            "truncated": self.truncated,
            "error": self.error,
        }


_EVQUEUE_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,19}\s*")
EVQUEUE_BOOLEAN_RULE = "yes, no, or an integer (0 is no, any other yes)"


def evqueue_boolean(text: str) -> bool | None:
    """evQueue's booleans, in requests and workflow files alike (XMLUtils::GetAttributeBool): `yes`, `no`, or an
    integer, non-zero being true; None for anything else. A whole integer only: evQueue's stoi took `1abc` as 1."""
    if text in ("yes", "no"):
        return text == "yes"
    if _EVQUEUE_INTEGER.fullmatch(text):
        return int(text) != 0
    return None


def printable(text: str) -> str:
    """`text` made valid Unicode: names the OS gave that are not UTF-8 (a file name, a user name) reach Python with
    their bytes as lone surrogates, which UTF-8, JSON and SQLite refuse; each is shown as `\\xNN` (its byte), any
    other lone surrogate as `\\uNNNN`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_printable_char(char) for char in text)
    return text


def _printable_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as surrogateescape keeps it
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return char


def transition(job: Job, new_state: JobState, **changes: Any) -> Job:
    """The only way a job changes state: checks the table, returns the new value."""
    if new_state not in TRANSITIONS[job.state]:
        raise InvalidTransition(f"job {job.id}: {job.state} -> {new_state} is not a valid transition")
    return evolve(job, state=new_state, **changes)


class _IsoClock:
    """ISO 8601 UTC with microseconds (`2026-11-29T17:00:00.123456Z`; no fraction on a whole second), as
    `datetime.fromtimestamp(t, UTC).isoformat()` spells it, with `Z` for `+00:00`.

    Every job in every reply carries such times (a page of `job.list` has hundreds): the date and time of day are
    formatted once per second and the microseconds added, at a quarter of datetime's cost. They are rounded as
    datetime rounds them: half to even, carrying into the next second.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, timestamp: float | None) -> str | None:
        if timestamp is None:
            return None
        fraction, whole = math.modf(timestamp)
        second, micro = int(whole), round(fraction * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        elif micro < 0:  # before 1970: the fraction counts back from the next second
            second, micro = second - 1, micro + 1_000_000
        if second != self._second:
            t = time.gmtime(second)  # (strftime's %Y would not pad a year before 1000 to four digits)
            self._text = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
            self._second = second
        return f"{self._text}.{micro:06d}Z" if micro else f"{self._text}Z"


iso = _IsoClock()


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """A workflow instance as lists and waits report it; the whole document is `Instances.document()`."""

    id: int
    workflow: str
    status: str  # evQueue's: EXECUTING | TERMINATED
    errors: int
    started_at: float
    ended_at: float | None = None
    comment: str | None = None
    host: str | None = None
    user: str | None = None
    launched_by: int | None = None  # uid of the peer
    parameters: Mapping[str, str] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    custom_attributes: tuple[tuple[str, str], ...] = ()  # (name, value) pairs computed when it ended

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workflow": self.workflow,
            "status": self.status,
            "errors": self.errors,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "comment": self.comment,
            "host": self.host,
            "user": self.user,
            "parameters": dict(self.parameters),
            "counters": dict(self.counters),
            "tags": list(self.tags),
            "custom_attributes": [list(pair) for pair in self.custom_attributes],
        }


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What jobd remembers of a `[schedule.NAME]` across restarts (the definition itself is in the config)."""

    name: str
    last_run: float | None = None  # when it last fired (wall clock)
    last_result: str | None = None  # e.g. "succeeded", "failed", "skipped": set when that run ended
    last_run_id: int | None = None  # the job or instance it started
    next_run: float | None = None  # the due time computed last
    suspended: bool = False  # on_failure = "suspend" stopped it after a failure
    enabled: bool | None = None  # schedule.enable/disable from the API; None: the config's `enabled` applies
    # The config's `enabled` when the API's word was given: a file changed since, even while jobd was stopped,
    # overrides that word. None with `enabled` set: not known (a row saved before schema version 19).
    config_enabled: bool | None = None
    # The due time the calendar last fired (whether a run started, was skipped or queued; a trigger is not one): no
    # due time at or before it fires again when the clock is set back by up to MAX_STEP_BACK (jobd.engine.schedule).
    last_due: float | None = None
    # `next_run` is None because the next time is computed when the run going ends (overlap "skip"), not because
    # the schedule is disabled or suspended: a catch-up at start-up counts from the last run only then. None: not
    # known (a row saved before schema version 21).
    after_run: bool | None = False
    # What `last_run_id` names: "job" or "instance" (None: no run, or a row saved before schema version 22). Saved
    # so that a run is found again after a restart even when no definition says (its schedule removed meanwhile).
    last_run_kind: str | None = None
    # overlap "queue_one": the due time of the one run that waits for the running one to end (None: none waits).
    # Saved, so that a restart of jobd while it waits keeps it (before schema version 23 it was lost).
    pending: float | None = None


class Overlap(StrEnum):
    """What a schedule does when its time comes while its previous run is still going."""

    SKIP = "skip"  # evQueue's rule: the next time is computed when the running one ends
    QUEUE_ONE = "queue_one"  # remember one due time and start it when the running one ends
    ALLOW = "allow"  # start another run regardless


class OnFailure(StrEnum):
    CONTINUE = "continue"  # keep firing after a failed run
    SUSPEND = "suspend"  # a failed run stops the schedule until it is enabled again


@dataclass(frozen=True, slots=True)
class ScheduleDef:
    """`[schedule.NAME]`: when to start a workflow or a task, checked against the rest of the config.

    `calendar` is the text as written (cron, `@daily`-style macro or evQueue's `sec;min;hour;day;month;wday`);
    `jobd.engine.schedule.Calendar.parse` turns it into something that computes due times.
    """

    name: str
    calendar: str
    target_kind: str  # "workflow" | "task"
    target: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    timezone: str | None = None  # an IANA name; None: the machine's local time
    overlap: Overlap = Overlap.SKIP
    on_failure: OnFailure = OnFailure.CONTINUE
    catch_up: bool = False  # systemd's Persistent=: one run at start-up when a due time was missed while down
    jitter: float = 0.0  # seconds: each due time is delayed by a random amount up to this
    enabled: bool = True


@value
class AuditEntry:
    """One mutating command as the audit log keeps it: who, what, when, and how it ended."""

    at: float  # when its result was known (wall clock)
    uid: int | None  # the peer's uid; None for a remote login
    user: str  # the user name (or a remote client's login)
    command: str  # the JSON-RPC method or evQueue command, e.g. "job.cancel", "instance launch"
    target: str | None  # what it acted on, e.g. "job 42", "workflow loopdemo"
    result: str  # "ok" or the error code, e.g. "INSUFFICIENT_RIGHTS"
    message: str | None = None  # the error message; for a successful launch, the instance started
    id: int | None = None  # set once stored

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": iso(self.at),
            "uid": self.uid,
            "user": self.user,
            "command": self.command,
            "target": self.target,
            "result": self.result,
            "message": self.message,
        }
