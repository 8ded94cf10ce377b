"""The Engine: owns every job's state, starts jobs when their queue has room, applies timeouts, retries, cancels.

It runs entirely on the asyncio loop. Waiting is done by the loop: pidfds for exits (through proc.Child), loop
timers for delays, timeouts and retry back-offs, futures for clients waiting on a job. Each state change is
committed to the store before anyone is told about it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from jobd import logline
from jobd.engine.decisions import RESOURCE_RETRY_DELAY, after_attempt, outcome_of
from jobd.engine.history import HistoryKeeper
from jobd.engine.http_task import HttpRequest, new_session
from jobd.engine.queues import QueueRuntime
from jobd.errors import (
    InvalidParams,
    JobFinished,
    OutOfResources,
    OutputMissing,
    QueueClosed,
    ShuttingDown,
    StoreFailed,
    UnknownJob,
    UnknownQueue,
    shortage,
)
from jobd.model import (
    WORKFLOW_SCRIPT_NAME,
    WORKFLOW_TASK_KEY_PREFIX,
    Attempt,
    Config,
    Durability,
    InStore,
    Job,
    JobSpec,
    JobState,
    Outcome,
    QueueDef,
    transition,
)
from jobd.proc import Child, ExitInfo, LaunchSpec, SpawnError, kill_orphan_group
from jobd.store import STORE_RETRY_SECONDS, JobFilter, QueuePause, Store, damaged, store_failure
from jobd.users import Account, account, job_account
from jobd.values import evolve, value

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("jobd.engine")
job_log = logline.HotLog("jobd.engine")  # the lines of every job's transitions

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STREAMS = ("stdout", "stderr", "log")
# What _store_failed is told of writes it retries, {} the job or queue (one wording each, so that a bug that fails
# the same write for every job is logged once).
_DUE = "cannot record that job {} is due"
_STARTS = "cannot record the start of jobs of queue {}"
_NOT_STARTED = "cannot record that job {} could not start"
_END = "cannot record the end of job {}"
RECOVERY_STEP = 5000  # jobs resumed at start-up between two reports of progress (Engine.recover)

# Hands over work that need not delay a client's reply (see Engine.submit); api.Session.after_reply is one.
AfterReply = Callable[[Callable[[], None]], None]


@dataclass(frozen=True, slots=True)
class JobEvent:
    """What subscribers hear: a state change (`job` set), a progress change or a log line."""

    type: str  # "job.state" | "job.progress" | "job.log"
    job: Job
    line: str | None = None
    log_cut: bool = False  # the log line at which the attempt's log reached max_output: the last one told

    def to_json(self) -> dict[str, Any]:
        """The event as events.subscribe and GET /events send it (docs/protocol.md)."""
        job = self.job
        if self.type == "job.state":
            return {"type": self.type, "job": job.to_json()}
        if self.type == "job.progress":
            return {"type": self.type, "id": job.id, "progress": job.progress}
        if self.log_cut:
            return {"type": self.type, "id": job.id, "line": self.line, "truncated": True}
        return {"type": self.type, "id": job.id, "line": self.line}


class JobWatcher(Protocol):
    """Who runs a job and wants to hear how it goes (a workflow instance for its tasks).

    With `holds_history`, a job it hears has finished is held in the history (HistoryKeeper.hold) until the watcher
    releases it: a workflow instance does once its document is saved with the job's end."""

    holds_history: bool

    def job_started(self, job: Job, pid: int) -> None: ...

    def job_progress(self, job: Job) -> None: ...

    def job_finished(self, job: Job) -> None: ...

    def retries_off(self) -> bool:
        """No more tries of the job (asked as an attempt ends, before the retry is decided)."""
        ...


@dataclass(frozen=True, slots=True)
class OutputChunk:
    data: bytes
    size: int  # of the whole stream so far
    complete: bool  # the attempt has ended and `data` reaches the end
    truncated: bool
    attempt: int


_own: Account | None = None


def _own_account() -> Account:
    """jobd's own user, looked up once: what a job that runs as jobd gets as HOME, USER and LOGNAME."""
    global _own
    if _own is None:
        _own = account(os.geteuid(), os.getegid())
    return _own


_W = TypeVar("_W")


def _forget_waiter(waiters: dict[int, dict[_W, None]], job_id: int, waiter: _W) -> None:
    mine = waiters.get(job_id)
    if mine is not None:
        mine.pop(waiter, None)
        if not mine:
            del waiters[job_id]


def _inherited_environment() -> dict[str, str]:
    """What every job gets of jobd's own environment. Read once: nothing changes jobd's environment while it runs,
    and reading os.environ (which encodes each name it is asked for) was 3 % of the Python a job runs."""
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH)}
    for name in ("LANG", "LC_ALL", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:  # nothing written: output files are created on the first byte
        return 0


def _read_at(path: str, offset: int, limit: int) -> tuple[bytes, int] | None:
    """Up to `limit` bytes of the file from `offset`, and its size; None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size  # jobd alone writes the file, in this thread: it holds this much as it is read
        # No more asked for than the file holds past `offset`: os.pread() allocates all it is asked for, then shrinks
        # it to what came, and a 1 MiB request for a few bytes fragmented the heap (as jobd.conffile.read explains).
        return os.pread(fd, max(0, min(limit, size - offset)), offset), size
    finally:
        os.close(fd)


def _read_output(job_id: int, stream: str, path: str, offset: int, limit: int) -> tuple[bytes, int] | None:
    """_read_at for job.output: a shortage of descriptors or memory is OutOfResources (it was INTERNAL_ERROR, "a
    bug in jobd", with a traceback in the log for each request while jobd had no descriptor left)."""
    try:
        return _read_at(path, offset, limit)
    except OSError as error:
        short = shortage(f"cannot read job {job_id}'s {stream} now", error, "ask again later")
        if short is None:
            raise
        raise short from None


@value
class _BugFailure:
    """A write that failed for a bug of jobd's and is tried again (Engine._failing_for_bugs)."""

    kind: str  # what failed, a job or queue not yet named: "cannot record the end of job {}"
    error: str  # "OperationalError: malformed JSON"


@value
class _Start:
    """A job moved to `running` whose attempt is being committed; then it is launched."""

    job: Job
    attempt: Attempt
    launch: LaunchSpec | None  # None: an HTTP job
    waiting: Job  # the job as it waited in its queue, should the commit fail


@dataclass
class _Running:
    child: Child | HttpRequest
    attempt: Attempt
    timeout_timer: asyncio.TimerHandle | None = None
    ended: asyncio.Future[None] = dataclasses.field(default_factory=lambda: asyncio.get_running_loop().create_future())
    timed_out: bool = False
    cancelled: bool = False
    stopped: bool = False


class Engine:
    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.state_dir = config.daemon.state_dir
        self.output_dir = os.path.join(config.daemon.state_dir, "output")
        # Workflows' SCRIPT tasks (instances.py). Absolute: a job runs its script by this path, from its own working
        # directory (its wd), and state_dir may be relative to jobd's (the dev configuration's `.jobd/state`).
        self.scripts_dir = os.path.join(os.path.abspath(config.daemon.state_dir), "scripts")
        self._inherited_env = _inherited_environment()
        self.stopping = False
        # shutdown() has answered the job.waits with SHUTTING_DOWN: one that comes later (its connection is still
        # open while the stop ends) is answered so at once; nothing would ever end its job in this run.
        self._waiters_released = False
        # Nothing starts before start_jobs(): the daemon first puts back every job the database holds (recover), so
        # that the first free slot goes to the best of them, and a stop asked for meanwhile starts none of them.
        self._holding_starts = True
        # A start failed for want of descriptors, processes or memory: no job of any queue starts until this fires
        # (_hold_starts_while_short).
        self._short_hold: asyncio.TimerHandle | None = None
        self.jobs: dict[int, Job] = {}  # every unfinished job
        self.queues: dict[str, QueueRuntime] = {}
        self._running: dict[int, _Running] = {}
        # Jobs whose process could not be started and whose failed start the store has not taken yet (a full disk):
        # each keeps its slot, and a stop waits for its record as it does for a job's end (see _not_started).
        self._failed_starts: dict[int, asyncio.Future[None]] = {}
        self._delay_timers: dict[int, asyncio.TimerHandle] = {}
        # Waiters by job, each a dict used as an ordered set: one that gives up (a timeout, a client gone) leaves
        # in O(1), however many wait on the same job.
        self._finish_waiters: dict[int, dict[asyncio.Future[Job], None]] = {}
        self._output_waiters: dict[int, dict[asyncio.Future[None], None]] = {}
        self._next_reload: asyncio.Future[None] | None = None  # see next_reload
        # Queues whose API pause record could not be dropped (a full disk): stale, never applied (_forget_queue_pause).
        self._stale_pauses: set[str] = set()
        self._listeners: dict[Callable[[JobEvent], None], None] = {}
        self._watchers: dict[int, JobWatcher] = {}  # job id -> who runs it (a workflow instance's task)
        # Unfinished jobs whose cancel is on its way (withhold): none of them starts again, in the meantime.
        self._withheld: set[int] = set()
        # Finished jobs whose watcher is told in the loop's next turn (_release_finish_waiters), until it is.
        self._untold: dict[int, tuple[JobWatcher, Job]] = {}
        # Told of every job that reaches a final state, just after its commit (completion callbacks).
        self.finish_listeners: list[Callable[[Job], None]] = []
        self._http_session: aiohttp.ClientSession | None = None  # for HTTP jobs, made on first use
        self.history = HistoryKeeper(
            store, config.daemon.history, clock, self._remove_output, self._store_failed, self._store_works
        )
        store.audit_written = self.history.audit_written
        self.on_counts_changed: Callable[[], None] = lambda: None
        # Why the last write to the store failed, while writes fail (the status line shows it); None once one works.
        # It names what was being written (a job, a queue): store_trouble_cause is the failure alone, for those who
        # may not read them.
        self.store_trouble: str | None = None
        self.store_trouble_cause: str | None = None
        self._troubles_told: set[str] = set()  # since the store last worked
        # Writes tried again every STORE_RETRY_SECONDS that failed for a bug of jobd's (what, such as "cannot record
        # the end of job 17" -> the error): daemon.status and STATUS= tell them, as the log did once. One entry per
        # write that waits (a job holding its slot), dropped as soon as it no longer does.
        self._failing_for_bugs: dict[str, _BugFailure] = {}
        # Which kind of write (its wording before the job or queue is named) failed with which type of error: each
        # logged once, with its traceback, not once per job; forgotten once no write of that kind is failing, so
        # that the same bug coming back is logged again.
        self._bugs_told: set[tuple[str, str]] = set()
        self._dispatch_retries: dict[str, asyncio.TimerHandle] = {}
        self._apply_queue_definitions(config, store.queue_pauses())

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    # -- start-up ----------------------------------------------------------------------------------------------

    def recover(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Put back what the database says was accepted, after a clean stop or after `kill -9` alike; nothing
        starts before start_jobs(). A long backlog takes a while: `progress(resumed, total)` is told every
        RECOVERY_STEP jobs."""
        now = self.clock()
        total = self.store.count_unfinished() if progress is not None else 0
        resumed = 0
        for page in self.store.unfinished_jobs(RECOVERY_STEP):
            if progress is not None and resumed:
                progress(resumed, total)
            for job in page:
                self._queue_for_recovered(job.spec.queue)
                if job.state is JobState.RUNNING:
                    self._recover_lost_attempt(job, now)
                else:
                    self.jobs[job.id] = job
                    self._admit(job)
            resumed += len(page)
        # A delay that ran out while jobd was down makes its job due now, in its queue's order with the queued jobs:
        # left to its timer, it would come after every queued job of whatever priority.
        for job_id in [job.id for job in self.jobs.values() if job.state is JobState.DELAYED and job.run_at <= now]:
            self._delay_timers[job_id].cancel()
            self._delay_over(job_id)
        # A queue removed while jobd was down whose every job ended here (lost, not to be retried) has drained: it
        # disappears now, as it would have at its last job's end, rather than stay listed, closed, until a reload.
        for name in list(self.queues):
            self._forget_if_drained(name)
        for name, queue in self.queues.items():
            if queue.closed:  # said at the start as a reload says it: jobs of a queue no file defines will run
                waiting = queue.ready_count() + len(queue.running) + self.delayed_count(name)
                log.info(
                    "queue %s is not in the configuration (removed while jobd was stopped): draining %d jobs, "
                    "one at a time (define it again to drain it faster)",
                    name,
                    waiting,
                )
        self.history.rearm()

    def start_jobs(self) -> None:
        """Let queues start jobs, from now on: what recovery put back first."""
        self._holding_starts = False
        for name in list(self.queues):
            self._dispatch(name)

    def _queue_for_recovered(self, name: str) -> None:
        if name not in self.queues:  # the queue was removed while jobd was down: drain it, take nothing new
            # Its settings left with its file (jobd keeps none of its own): one job at a time never runs more at once
            # than it allowed. Documented in config.md, "Reloading".
            self.queues[name] = QueueRuntime(QueueDef(name=name), closed=True)

    def _recover_lost_attempt(self, job: Job, now: float) -> None:
        attempt = self.store.running_attempt(job.id) or Attempt(job_id=job.id, number=job.attempts, started_at=now)
        if (
            attempt.pid is not None
            and attempt.pid_start is not None
            and kill_orphan_group(attempt.pid, attempt.pid_start)
        ):
            log.warning(
                "job=%d attempt=%d: killed process group %d left by the previous jobd",
                job.id,
                attempt.number,
                attempt.pid,
            )
        # What the previous jobd kept of the output is on disk; which streams it cut died with it: one holding the
        # whole max_output probably was (job.output says so of that stream, as for attempts of an older jobd).
        kept = {stream: _size_of(self.output_path(job.id, attempt.number, stream)) for stream in STREAMS}
        cap = job.spec.max_output
        # Its time limit or a cancel had stopped it (SIGTERM sent, kill_grace running): it ends as that stop would
        # have ended it (the time limit first, as outcome_of ranks them).
        if attempt.time_limit_reached:
            outcome, while_ = Outcome.TIMED_OUT, "its time limit stopped the attempt"
        elif attempt.cancel_requested:
            outcome, while_ = Outcome.KILLED, "a cancel stopped the attempt"
        else:
            outcome, while_ = Outcome.LOST, "the attempt ran"
        attempt = dataclasses.replace(
            attempt,
            outcome=outcome,
            finished_at=now,
            error=f"jobd stopped while {while_}",
            stdout_bytes=kept["stdout"],
            stderr_bytes=kept["stderr"],
            truncated=cap > 0 and any(size >= cap for size in kept.values()),
            cut_streams=None,
        )
        self.jobs[job.id] = job
        self._settle(job, attempt, cancelled=attempt.cancel_requested)  # a cancel under way is carried out

    # -- submit ------------------------------------------------------------------------------------------------

    def submit(
        self,
        specs: Sequence[JobSpec],
        delays: Sequence[float],
        watcher: JobWatcher | None = None,
        after_reply: AfterReply | None = None,
    ) -> list[tuple[Job, bool]]:
        """Commit jobs (all or none) and queue them; each comes with whether this call made it (False: its key
        named a job made before, by an earlier submit or an earlier member of `specs`, which is answered as it is).
        They survive a crash of jobd from here on; with durability `fsync` the reply must also wait for
        `made_durable()`. `watcher` hears about the jobs this call creates from the start (a job may even start
        before this returns, when its queue has a free slot).

        The jobs are the engine's (`job.get`, `job.cancel` find them) as soon as they are committed. Their log
        line, event and place in the queue (or start, when the queue has room) come at once, or through
        `after_reply` when given: a connection runs that once the reply is on its way and before it reads on, so
        the client does not wait for a spawn, and jobd does that work while the client reads its reply."""
        if self.stopping:
            raise ShuttingDown("jobd is stopping and takes no new jobs")
        for spec in specs:
            self.check_queue(spec)
            if not spec.command and spec.http is None:  # the API refuses it; this guards jobd's own callers
                raise InvalidParams("a job needs a command or an HTTP request, and this one has neither")
        now = self.clock()
        states = [JobState.DELAYED if delay > 0 else JobState.QUEUED for delay in delays]
        results = self.store.insert_jobs(specs, states, now, [now + delay for delay in delays])
        self._store_works()
        # The engine's at once: a committed job is found even if the client goes away while its reply waits for
        # the fsync (and a cancel in that window finds it).
        queues: dict[str, None] = {}
        for job, created in results:
            if created:
                self.jobs[job.id] = job
                queues[job.spec.queue] = None
                if watcher is not None:
                    self._watchers[job.id] = watcher
                if after_reply is None:
                    self._announce(job)
                else:  # one piece per job: should one fail, the others are still queued
                    after_reply(functools.partial(self._announce, job))
        # Started once every job of the submit waits in its queue: jobs committed together are ready together, and
        # the best of them takes the first free slot, not the one that came first in the batch.
        if after_reply is None:
            self._dispatch_all(list(queues))
        elif queues:
            after_reply(functools.partial(self._dispatch_all, list(queues)))
        return [(self.jobs.get(job.id, job), created) for job, created in results]

    def _announce(self, job: Job) -> None:
        """Log, tell listeners about and place a job just committed (its queue is dispatched by the caller)."""
        queue = self.queues.get(job.spec.queue)
        if queue is not None and queue.paused:  # why it will not start: the pause may be days old, and forgotten
            job_log.info(
                "job=%d %s in queue %s, which is paused: it starts once the queue is resumed (jobctl resume %s)",
                job.id,
                job.state,
                job.spec.queue,
                job.spec.queue,
            )
        else:
            job_log.info("job=%d %s in queue %s", job.id, job.state, job.spec.queue)
        self._emit("job.state", job)
        self._admit(job, dispatch=False)

    def _dispatch_all(self, queue_names: list[str]) -> None:
        for name in queue_names:
            self._dispatch_if_defined(name)

    @property
    def replies_wait_for_fsync(self) -> bool:
        return self.config.daemon.durability is Durability.FSYNC

    async def made_durable(self) -> None:
        """Return once every commit so far survives a power cut (one fsync shared by all who wait)."""
        await self.store.flush()

    def check_queue(self, spec: JobSpec) -> None:
        """Refuse a job whose queue is unknown, or removed and draining (UnknownQueue, QueueClosed)."""
        try:
            self._check_queue_open(spec.queue)
        except (UnknownQueue, QueueClosed):
            # A key already taken is answered with its job, whatever became of that job's queue since (a client
            # asks again with the key when it lost the first reply). Looked up only then: not on every submit.
            if spec.key is None or self.job_with_key(spec.key) is None:
                raise

    def _check_queue_open(self, name: str) -> None:
        queue = self.queues.get(name)
        if queue is None:
            defined = sorted(self.config.queues)
            raise UnknownQueue(
                f"unknown queue {name!r}; defined queues: {', '.join(defined)}", queue=name, allowed=defined
            )
        if queue.closed:
            raise QueueClosed(
                f"queue {name!r} was removed from the configuration; it drains and takes no new jobs", queue=name
            )

    def _admit(self, job: Job, *, dispatch: bool = True) -> None:
        """Put an unfinished, not running job where it waits: a delay timer or its queue's ready set (and, unless
        told not to, start what its queue has room for)."""
        if job.state is JobState.DELAYED:
            # Counted from the last time recorded for the job when the clock is behind it (set back while jobd was
            # stopped): the wait is at most the delay or back-off asked for, not that plus however far it went back.
            since = max(self.clock(), job.created_at, job.started_at or job.created_at)
            if job.attempts and since > self.clock():
                # A back-off counts from the end of the attempt, not its start: one that ran an hour must not add
                # that hour to the wait. Read only when the clock is behind, as after such a restart.
                since = max(since, self._last_attempt_end(job.id))
            wait = max(0.0, job.run_at - since)
            self._delay_timers[job.id] = self.loop.call_later(wait, self._delay_over, job.id)
        elif job.state is JobState.QUEUED:
            self.queues[job.spec.queue].push(job)
            if dispatch:
                self._dispatch(job.spec.queue)
        self._counts_changed()

    def _last_attempt_end(self, job_id: int) -> float:
        """When the job's latest attempt ended, as recorded (0 when none has an end)."""
        return max((a.finished_at for a in self.store.attempts(job_id) if a.finished_at is not None), default=0.0)

    def _delay_over(self, job_id: int) -> None:
        try:
            job = self._change(self.jobs[job_id], JobState.QUEUED)
        except Exception as error:  # a timer's callback: the job stays delayed and its turn is tried again
            self._store_failed(_DUE, error, job_id)
            self._delay_timers[job_id] = self.loop.call_later(STORE_RETRY_SECONDS, self._delay_over, job_id)
            return
        self._write_made(_DUE, job_id)
        del self._delay_timers[job_id]
        self._admit(job)

    # -- running -----------------------------------------------------------------------------------------------

    def _dispatch(self, queue_name: str) -> None:
        queue = self.queues[queue_name]
        starts = self._take_starts(queue)
        if not starts:  # none to record (the jobs that waited were cancelled, the queue paused)
            self._write_dropped(_STARTS, queue_name)
            return
        try:
            self.store.start_attempts([(start.job, start.attempt) for start in starts])
        except Exception as error:  # the jobs go back to wait; nothing started that is not on record
            self._untake(queue, starts)
            self._store_failed(_STARTS, error, queue_name)
            if queue_name not in self._dispatch_retries:
                self._dispatch_retries[queue_name] = self.loop.call_later(
                    STORE_RETRY_SECONDS, self._retry_dispatch, queue_name
                )
            return
        self._write_made(_STARTS, queue_name)
        self._launch(starts)

    def _retry_dispatch(self, queue_name: str) -> None:
        del self._dispatch_retries[queue_name]
        self._dispatch_if_defined(queue_name)

    def _dispatch_if_defined(self, queue_name: str) -> None:
        if queue_name in self.queues:  # a removed queue that has drained is forgotten
            self._dispatch(queue_name)
        else:
            self._write_dropped(_STARTS, queue_name)

    def _untake(self, queue: QueueRuntime, starts: list[_Start]) -> None:
        """Put jobs _take_starts moved to `running` back where they waited: their commit failed."""
        for start in starts:
            self.jobs[start.job.id] = start.waiting
            queue.running.discard(start.job.id)
            queue.push(start.waiting)

    def _never_recorded(self, what: str, error: Exception) -> bool:
        """Whether jobd gives up recording `what`: it stops, and no try would ever be taken, its database file being
        deleted or replaced (the next start opens another file), or the write failing for a bug of jobd's (not the
        store's trouble: the same write fails the same way). A stop that waited for it, as it waits for room on a
        full disk, never ended: jobd had to be killed. The next start finds the job as the database holds it."""
        if not self.stopping or (store_failure(error) is not None and not self.store.file_lost()):
            return False
        log.error("cannot record %s (%s): jobd stops without it", what, error)
        return True

    def _store_failed(self, kind: str, error: Exception, subject: object = None, *, retried: bool = True) -> None:
        """A write failed (`kind`, naming `subject`). The caller keeps what it was to record as it was and tries the
        write again every STORE_RETRY_SECONDS, so that nothing is lost or told as done before it is on record (or,
        for what only a crash would miss, a child's pid or a cancel's mark, goes on without it).

        `kind` says what failed, with {} where `subject` (a job's id, a queue's name) goes; `retried`: whether the
        caller tries it again (_write_made or _write_dropped then tells when it no longer waits).

        A failure of the store (store_failure: a full disk, an I/O error, no memory left) is the machine's: logged in
        one line, and daemon.status and STATUS= say the database takes no writes until one is taken. Any other is
        jobd's bug (an SQLITE_ERROR, a statement SQLite cannot prepare; a constraint): the disk is not in trouble and
        store_trouble does not say so; it is logged once for its kind of write and type of error, with its
        traceback, as an internal error, and daemon.status and STATUS= count the writes it fails. The write is still
        tried again, the same bug likely failing it each time: going on as if it were made would lose it (a job's
        end) or run what is not on record (a start), and a restart recovers from what the database holds (a stop
        does not wait for it: _never_recorded)."""
        what = kind.format(subject)
        failed = store_failure(error)
        if failed is None:
            told = (kind, type(error).__name__)
            if told not in self._bugs_told:
                self._bugs_told.add(told)
                log.error(
                    "internal error: %s: %s; trying again every %gs", what, error, STORE_RETRY_SECONDS, exc_info=error
                )
            if retried and what not in self._failing_for_bugs:
                self._failing_for_bugs[what] = _BugFailure(kind, f"{type(error).__name__}: {error}")
                self._counts_changed()
            return
        # MemoryError says nothing of itself, and SQLite's word for a damaged file ("database disk image is
        # malformed") not what to do: the store's refusal says both.
        cause = failed.message if damaged(error) else (str(error) or failed.message)
        trouble = f"{what}: {cause}"
        if trouble not in self._troubles_told:  # each said once, not at every retry
            log.error("%s; trying again every %gs", trouble, STORE_RETRY_SECONDS)
            self._troubles_told.add(trouble)
        self.store_trouble = trouble
        self.store_trouble_cause = cause
        self._counts_changed()

    def _write_made(self, kind: str, subject: object) -> None:
        """A write that _store_failed may have been told of went through."""
        self._store_works()
        if self._write_dropped(kind, subject) and all(bug.kind != kind for bug in self._failing_for_bugs.values()):
            self._bugs_told = {told for told in self._bugs_told if told[0] != kind}  # logged again if it comes back

    def _write_dropped(self, kind: str, subject: object) -> bool:
        """A write no longer waits to be tried again (made, or no longer needed); whether it had failed for a bug."""
        if not self._failing_for_bugs or self._failing_for_bugs.pop(kind.format(subject), None) is None:
            return False
        self._counts_changed()
        return True

    def store_internal_error(self, *, naming_what: bool) -> dict[str, Any] | None:
        """daemon.status's store_internal_error: how many writes fail for a bug of jobd's and the error of the first
        (what it writes too if `naming_what`: a job or a queue the peer may not read); None if none does."""
        for what, bug in self._failing_for_bugs.items():
            error = f"{what}: {bug.error}" if naming_what else bug.error
            return {"writes": len(self._failing_for_bugs), "error": error}
        return None

    def write_refused(self, what: str, failure: StoreFailed) -> None:
        """A client's request (`what`) was refused because the database took no write: daemon.status and STATUS= say
        so until a write goes through again (store.refused_request has logged the refusal)."""
        trouble = f"{what}: {failure.message}"
        if trouble != self.store_trouble:
            self.store_trouble = trouble
            self.store_trouble_cause = failure.message
            self._counts_changed()

    def _store_works(self) -> None:
        if self.store_trouble is not None:
            log.info("the store takes writes again")
            self.store_trouble = self.store_trouble_cause = None
            self._troubles_told.clear()
            self._counts_changed()

    def _take_starts(self, queue: QueueRuntime) -> list[_Start]:
        """Move the jobs the queue has room for to `running`, in memory only: the caller commits their attempts
        and then launches them."""
        starts: list[_Start] = []
        passed_over: list[Job] = []  # withheld: their cancel comes in a later turn (withhold)
        while not self.stopping and not self._holding_starts and self._short_hold is None and queue.free_slots() > 0:
            job = queue.pop_next()
            if job is None:
                break
            if job.id in self._withheld:
                passed_over.append(job)
                continue
            number = job.attempts + 1
            now = self.clock()
            try:
                launch = None if job.spec.http is not None else self._launch_spec(job, number)
            except OutOfResources as short:
                # Its user's groups and home cannot be looked up for want of a descriptor: rather than start it
                # with the wrong identity, it waits untried where it was, and no job starts until the hold ends.
                queue.push(job)
                log.warning("job=%d not started yet: %s", job.id, short.message)
                self._hold_starts_while_short()
                break
            waiting = job
            job = transition(
                job, JobState.RUNNING, started_at=now, attempts=number, progress=0, exit_code=None, signal=None
            )
            self.jobs[job.id] = job
            queue.running.add(job.id)
            starts.append(_Start(job, Attempt(job.id, number, now), launch, waiting))
        for job in passed_over:
            queue.push(job)
        return starts

    def _launch(self, starts: list[_Start]) -> None:
        # Only attempts already committed are launched: after a crash at any point, an attempt that may have run
        # is on record (and recovered as `lost`), never silently run a second time under the same number.
        for index, start in enumerate(starts):
            if self._short_hold is not None:
                self._put_back(starts[index:])
                return
            self._launch_one(start)

    def _launch_one(self, start: _Start) -> None:
        if start.launch is None:  # an HTTP job: a request on the loop instead of a process
            self._start_http(start.job, start.attempt)
        else:
            self._spawn(start.job, start.attempt, start.launch)

    def _put_back(self, starts: list[_Start]) -> None:
        """A start of the same batch failed for want of descriptors, processes or memory (the hold is on): the
        others would fail alike, each recorded as a failed attempt, `concurrency` of them a second in every queue.
        Their attempts, committed but never launched, are undone, and the jobs wait in their queues as they did
        until the hold ends: one failed attempt per hold for the whole daemon."""
        try:
            self.store.unstart_attempts([(start.waiting, start.attempt) for start in starts])
        except Exception as error:  # their attempts stay on record, so they are launched as they would have been
            self._store_failed(
                "cannot put back the jobs not started while jobd is short of resources", error, retried=False
            )
            for start in starts:
                self._launch_one(start)
            return
        for start in starts:
            self._untake(self.queues[start.job.spec.queue], [start])

    def _spawn(self, job: Job, attempt: Attempt, launch: LaunchSpec) -> None:
        try:
            if job.spec.stdin is InStore.STDIN:
                launch = evolve(launch, stdin=self._stored_stdin(job.id))
            child = Child.spawn(
                launch,
                self.loop,
                on_exit=lambda info: self._exited(job.id, info),
                on_progress=lambda value: self._progress(job.id, value),
                on_log=lambda line, cut: self._log_line(job.id, line, cut),
                on_output=lambda: self._wake_output_waiters(job.id),
            )
        except SpawnError as error:
            log.warning("job=%d cannot start: %s", job.id, error)
            attempt = dataclasses.replace(
                attempt, outcome=Outcome.SPAWN_ERROR, finished_at=attempt.started_at, error=str(error)
            )
            self._not_started(job, attempt, transient=error.transient)
            return
        except Exception as error:
            # A bug of jobd's, or a failure nobody foresaw (its stdin unreadable from the database, say): the start
            # fails, said with the traceback. Raised, it left the job `running` on record and in memory, with no
            # process, for good: no exit would ever end it, and neither could a cancel.
            log.error("job=%d: internal error starting it", job.id, exc_info=True)
            why = f"internal error in jobd (see its log): {type(error).__name__}: {error}"
            attempt = dataclasses.replace(
                attempt, outcome=Outcome.SPAWN_ERROR, finished_at=attempt.started_at, error=why
            )
            self._not_started(job, attempt, transient=False)
            return
        attempt = evolve(attempt, pid=child.pid, pid_start=child.start_time)
        try:
            self.store.record_process(attempt)
        except Exception as error:  # the job runs on; only a crash of jobd before its end would miss the pid
            self._store_failed("cannot record the process of job {}", error, job.id, retried=False)
        self._started(job, _Running(child, attempt), child.pid)

    def _stored_stdin(self, job_id: int) -> bytes | None:
        """A starting job's stdin, which waited in the database rather than in memory (InStore)."""
        try:
            return self.store.job_stdin(job_id)
        except Exception as error:  # the database could not give it (an I/O error, no memory): jobd's shortage
            raise SpawnError(f"cannot read the job's stdin from the database: {error}", transient=True) from error

    def _not_started(self, job: Job, attempt: Attempt, *, transient: bool) -> None:
        """Record an attempt whose process could not be started, and free its slot. Should the write fail (a full
        disk), the job keeps the slot and the record is tried again every STORE_RETRY_SECONDS, as a job's end is."""
        ended = self._concluded(job, attempt, cancelled=False, jobd_short_of_resources=transient)
        try:
            self.store.finish_attempt(ended, attempt)
        except Exception as error:  # the child-supervision boundary: the failed start is kept, and recorded later
            if self._never_recorded(f"that job {job.id} could not start", error):
                self._write_dropped(_NOT_STARTED, job.id)
                recorded = self._failed_starts.pop(job.id, None)
                if recorded is not None:
                    recorded.set_result(None)
                return
            self._store_failed(_NOT_STARTED, error, job.id)
            if job.id not in self._failed_starts and store_failure(error) is not None:  # a stop waits for room only
                self._failed_starts[job.id] = self.loop.create_future()
                # The record still says `running` (and a restart would find it so): the job stays so until the
                # store takes its end, like a job whose end waits. Nothing runs, though: its error says so, and why.
                note = f"{attempt.error} (not recorded yet: {error}; jobd tries again every {STORE_RETRY_SECONDS:g}s)"
                self.jobs[job.id] = dataclasses.replace(job, error=note)
            self.loop.call_later(STORE_RETRY_SECONDS, lambda: self._not_started(job, attempt, transient=transient))
            return
        self._write_made(_NOT_STARTED, job.id)
        recorded = self._failed_starts.pop(job.id, None)
        if recorded is not None:
            recorded.set_result(None)
        self.queues[job.spec.queue].running.discard(job.id)
        self._settled(ended, attempt)
        if transient:
            self._hold_starts_while_short()
        else:
            # The slot is free again: the next job may take it. On the next turn of the loop, not from within the
            # _launch under way: a queue of unstartable jobs must not recurse.
            self.loop.call_soon(self._dispatch_if_defined, job.spec.queue)

    def _hold_starts_while_short(self) -> None:
        """A start failed for want of descriptors, processes or memory: no job starts, in any queue, for the
        RESOURCE_RETRY_DELAY the failed job waits; then the queues take jobs again, which find out whether the
        shortage is over. Each failed job's own timer used to dispatch its queue, which took other waiting jobs that
        failed alike, each recorded and logged: every waiting job was tried once a second, and 2,000 queued jobs
        under a cgroup's pids.max kept jobd's loop so busy that a ping took 3 to 9 s."""
        if self._short_hold is None:
            log.info("no job starts for %gs: jobd is short of processes, open files or memory", RESOURCE_RETRY_DELAY)
            self._short_hold = self.loop.call_later(RESOURCE_RETRY_DELAY, self._end_short_hold)

    def _end_short_hold(self) -> None:
        self._short_hold = None
        for name in list(self.queues):
            self._dispatch_if_defined(name)

    def _start_http(self, job: Job, attempt: Attempt) -> None:
        assert job.spec.http is not None
        if self._http_session is None:  # one session (connection pool) per daemon, made on first use
            self._http_session = new_session()
        request = HttpRequest(
            self._http_session,
            job.spec.http,
            job.id,
            max_output=job.spec.max_output,
            stdout_path=self.output_path(job.id, attempt.number, "stdout"),
            stderr_path=self.output_path(job.id, attempt.number, "stderr"),
            on_exit=lambda info: self._exited(job.id, info),
            on_output=lambda: self._wake_output_waiters(job.id),
        )
        self._started(job, _Running(request, attempt), 0)

    def _started(self, job: Job, running: _Running, pid: int) -> None:
        if job.spec.timeout is not None:
            running.timeout_timer = self.loop.call_later(job.spec.timeout, self._time_out, job.id)
        self._running[job.id] = running
        job_log.info("job=%d running (attempt %d, pid %d)", job.id, running.attempt.number, pid)
        self._emit("job.state", job)
        watcher = self._watchers.get(job.id)
        if watcher is not None:
            watcher.job_started(job, pid)
        self._counts_changed()

    def _launch_spec(self, job: Job, number: int) -> LaunchSpec:
        user = job_account(job.spec)  # None: jobd's own user
        # Another user cannot enter the state directory: its own home (or /) is its default working directory,
        # and a program jobd wrote there (a workflow's SCRIPT task) is handed over by file descriptor.
        cwd, fallback = job.spec.working_dir, None
        if cwd is None and user is not None:  # as a login does: "/" when the user may not enter its home
            cwd, fallback = (user.home if os.path.isdir(user.home) else "/"), "/"
        return LaunchSpec(
            argv=job.spec.command,
            env=self._environment(job, number, user),
            cwd=cwd,
            cwd_fallback=fallback,
            stdin=None,  # read by _spawn, only for a job that has one: the database holds it (InStore)
            stdout_path=self.output_path(job.id, number, "stdout"),
            stderr_path=self.output_path(job.id, number, "stderr"),
            log_path=self.output_path(job.id, number, "log"),
            max_output=job.spec.max_output,
            merge_stderr=job.spec.merge_stderr,
            uid=user.uid if user is not None else None,
            gid=user.gid if user is not None else None,
            groups=user.groups if user is not None else (),
            program_by_fd=user is not None and self._is_workflow_script(job.spec),
        )

    def _is_workflow_script(self, spec: JobSpec) -> bool:
        """Whether the job is a workflow task running the script jobd wrote for it. Only then is its program opened
        by jobd (root) and given to the job's user (chown, mode 0500): any other path, an admin's ad-hoc command
        such as `STATE_DIR/jobd.sqlite3` or `STATE_DIR/../../etc/shadow`, would have been given to that user too.
        jobd alone gives keys of workflow tasks; `..` is no script's name."""
        folder, name = os.path.split(spec.command[0])
        return (
            (spec.key or "").startswith(WORKFLOW_TASK_KEY_PREFIX)
            and folder == self.scripts_dir
            and WORKFLOW_SCRIPT_NAME.fullmatch(name) is not None
        )

    def _environment(self, job: Job, attempt: int, user: Account | None) -> dict[str, str]:
        env = self._inherited_env.copy()
        who = user or _own_account()
        env["HOME"] = who.home
        if who.name is not None:
            env["USER"] = env["LOGNAME"] = who.name
        env.update(job.spec.env)
        env.update(JOBD_JOB_ID=str(job.id), JOBD_QUEUE=job.spec.queue, JOBD_ATTEMPT=str(attempt))
        return env

    def _time_out(self, job_id: int) -> None:
        running = self._running[job_id]
        running.timeout_timer = None
        if running.child.has_ended():  # within its time: its exit, waiting on the loop, says how it went
            return
        running.timed_out = True
        log.warning("job=%d timed out after %ss", job_id, self.jobs[job_id].spec.timeout)
        try:  # committed before the SIGTERM: a jobd that dies during kill_grace still ends the attempt timed_out
            self.store.record_time_limit_reached(running.attempt)
        except Exception as error:  # the stop goes on; only a crash before the end would forget why
            self._store_failed("cannot record the time limit of job {}", error, job_id, retried=False)
        self._stop(job_id)

    def _stop(self, job_id: int) -> None:
        running = self._running[job_id]
        running.stopped = True
        # Once jobd stops the job (a cancel, its shutdown, or the time limit itself), the time limit can no longer
        # decide the outcome: firing during kill_grace, it would turn a cancel or a shutdown into `timed_out`.
        if running.timeout_timer is not None:
            running.timeout_timer.cancel()
            running.timeout_timer = None
        running.child.stop(self.jobs[job_id].spec.kill_grace)

    def _exited(self, job_id: int, info: ExitInfo) -> None:
        self._record_end(job_id, info, self.clock())

    def _record_end(self, job_id: int, info: ExitInfo, finished_at: float) -> None:
        """_end_attempt, contained: a bug of jobd's while it records and tells a job's end is logged with its
        traceback, and the end counts as told to a stop waiting for it (Engine.shutdown), which would otherwise wait
        for ever. The job stays as far as the bug let it get (on record still `running`, most likely: the next start
        then finds it `lost`, as after a crash)."""
        running = self._running.get(job_id)
        try:
            self._end_attempt(job_id, info, finished_at)
        except Exception:
            log.error("job=%d: internal error recording its end", job_id, exc_info=True)
            if running is not None and not running.ended.done():
                running.ended.set_result(None)

    def _end_attempt(self, job_id: int, info: ExitInfo, finished_at: float) -> None:
        running = self._running.pop(job_id)
        if running.timeout_timer is not None:
            running.timeout_timer.cancel()
        job = self.jobs[job_id]
        queue = self.queues[job.spec.queue]
        queue.running.discard(job_id)
        outcome = outcome_of(info.exit_code, timed_out=running.timed_out, stopped=running.stopped)
        error = running.child.error if isinstance(running.child, HttpRequest) and not running.stopped else None
        if info.internal_error is not None:  # jobd lost the job to a bug of its own (proc.Child._contained)
            outcome, error = Outcome.LOST, f"internal error in jobd (see its log): {info.internal_error}"
        attempt = evolve(
            running.attempt,
            outcome=outcome,
            finished_at=finished_at,
            exit_code=info.exit_code,
            signal=info.signal,
            cpu_user=info.cpu_user,
            cpu_system=info.cpu_system,
            max_rss_kib=info.max_rss_kib,
            stdout_bytes=info.stdout_bytes,
            stderr_bytes=info.stderr_bytes,
            truncated=bool(info.cut_streams),
            cut_streams=info.cut_streams,
            # A request jobd stopped (its time limit, a cancel, a stop) says so by its outcome, as a program does.
            error=error,
        )
        starts: list[_Start] = []
        try:
            job = self._concluded(job, attempt, cancelled=running.cancelled)
            # The jobs that take the freed slot are recorded in the same transaction as this end: one commit
            # instead of two. A job to be retried is committed alone and queued first (by _settled), so that it
            # competes for the slot in the queue's order like any other.
            starts = self._take_starts(queue) if job.state.finished else []
            self.store.finish_attempt(job, attempt, [(start.job, start.attempt) for start in starts])
        except Exception as error:  # the child-supervision boundary: the end is kept, and recorded later
            self._untake(queue, starts)
            if self._never_recorded(f"the end of job {job_id}", error):
                self._write_dropped(_END, job_id)
                running.ended.set_result(None)
                return
            self._running[job_id] = running  # the job keeps its slot meanwhile, and can still be cancelled
            queue.running.add(job_id)
            self._store_failed(_END, error, job_id)
            self.loop.call_later(STORE_RETRY_SECONDS, self._record_end, job_id, info, finished_at)
            return
        self._write_made(_END, job_id)
        self._settled(job, attempt)
        running.ended.set_result(None)
        self._wake_output_waiters(job_id)
        self._launch(starts)  # after this end has been told: subscribers hear of it before the starts
        self._dispatch(queue.name)
        self._forget_if_drained(queue.name)

    def _settle(self, job: Job, attempt: Attempt, *, cancelled: bool, jobd_short_of_resources: bool = False) -> None:
        """Record an ended attempt and move the job on: final state, or back to wait for a retry."""
        job = self._concluded(job, attempt, cancelled=cancelled, jobd_short_of_resources=jobd_short_of_resources)
        self.store.finish_attempt(job, attempt)
        self._settled(job, attempt)

    def _concluded(self, job: Job, attempt: Attempt, *, cancelled: bool, jobd_short_of_resources: bool = False) -> Job:
        """The job's state after an ended attempt (not yet committed)."""
        now = self.clock()
        tries = attempt.number
        if attempt.outcome is not Outcome.SUCCEEDED and attempt.number > 1:
            not_counted = (Outcome.KILLED, Outcome.SPAWN_ERROR)
            tries = 1 + self.store.count_attempts(job.id, before=attempt.number, excluding=not_counted)
        watcher = self._watchers.get(job.id)
        step = after_attempt(
            job,
            attempt,
            now,
            tries=tries,
            cancelled=cancelled,
            shutting_down=self.stopping,
            jobd_short_of_resources=jobd_short_of_resources,
            retries_off=watcher is not None and watcher.retries_off(),
        )
        return transition(
            job,
            step.state,
            run_at=step.run_at,
            finished_at=now if step.state.finished else None,
            exit_code=attempt.exit_code,
            signal=attempt.signal,
            error=step.error,
        )

    def _settled(self, job: Job, attempt: Attempt) -> None:
        """Tell about an ended attempt whose outcome is committed, and put a job to be retried where it waits."""
        self._log_settled(job, attempt)
        if job.state.finished:
            del self.jobs[job.id]
            self._withheld.discard(job.id)
            self._emit("job.state", job)
            self._release_finish_waiters(job)
            self.history.job_finished()
        else:
            self.jobs[job.id] = job
            self._emit("job.state", job)
            if not self.stopping:
                self._admit(job)
            elif job.state is JobState.QUEUED:  # stopped by the shutdown: counted where it waits; nothing starts now
                self.queues[job.spec.queue].push(job)
        self._counts_changed()

    def _log_settled(self, job: Job, attempt: Attempt) -> None:
        how = f"exit code {attempt.exit_code}" if attempt.exit_code is not None else f"signal {attempt.signal}"
        if attempt.outcome is Outcome.SPAWN_ERROR or attempt.outcome is Outcome.LOST:
            how = attempt.error or ""
        # A warning is a job's own failure: an attempt ended by a cancel or by jobd's stop (killed) was asked for,
        # and a restart with many jobs running would bury `journalctl -p warning` under them.
        if attempt.outcome in (Outcome.SUCCEEDED, Outcome.KILLED):
            job_log.info("job=%d %s (attempt %d %s, %s)", job.id, job.state, attempt.number, attempt.outcome, how)
            return
        # A warning names what fails (a task failing every run, in a retry loop, shows as such in `journalctl -p
        # warning`, with no lookup per job id) and, when it is retried, when.
        spec = job.spec
        what = f"task {spec.task}" if spec.task is not None else f"command {spec.command[0] if spec.command else '-'}"
        if job.state is JobState.DELAYED:
            what += f", tried again in {round(max(0.0, job.run_at - self.clock()), 1):g}s"
        job_log.log(
            logging.WARNING,
            "job=%d %s (attempt %d %s, %s): %s",
            job.id,
            job.state,
            attempt.number,
            attempt.outcome,
            how,
            what,
        )

    def _progress(self, job_id: int, value: int) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.progress != value:
            job = evolve(job, progress=value)  # progress is not a state; persisted at the end
            self.jobs[job_id] = job
            self._emit("job.progress", job)
            watcher = self._watchers.get(job_id)
            if watcher is not None:
                watcher.job_progress(job)

    def _log_line(self, job_id: int, line: str, cut: bool) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            self._emit("job.log", job, line, cut)
            self._wake_output_waiters(job_id)

    # -- queries and commands --------------------------------------------------------------------------------

    def job_with_key(self, key: str) -> Job | None:
        """The job an idempotency key names (a submit with it returns that job), if any."""
        found = self.store.job_with_key(key)
        return None if found is None else self.jobs.get(found.id, found)

    def get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id) or self.store.get_job(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id} (never submitted, or expired from the history)", id=job_id)
        return job

    async def wait(self, job_id: int, timeout: float | None) -> Job:
        job = self.get(job_id)
        if job.state.finished:
            return job
        if self._waiters_released:  # shutdown() told the waiters already: this one would wait for nothing
            raise ShuttingDown("jobd is stopping: ask again once it is back")
        waiter: asyncio.Future[Job] = self.loop.create_future()
        self._finish_waiters.setdefault(job_id, {})[waiter] = None
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return self.get(job_id)
        finally:
            _forget_waiter(self._finish_waiters, job_id, waiter)

    def _release_finish_waiters(self, job: Job) -> None:
        for listener in self.finish_listeners:
            listener(job)
        for waiter in self._finish_waiters.pop(job.id, {}):
            if not waiter.done():
                waiter.set_result(job)
        watcher = self._watchers.pop(job.id, None)
        if watcher is not None:
            if watcher.holds_history:
                # From now: a trim already due in this pass of the loop must not take the job (its output) before
                # the watcher, a workflow instance, has read it. It releases the job once its document is saved.
                self.history.hold(job.id)
            # Soon, not now: the watcher may submit jobs, and the engine is in the middle of settling this one.
            self._untold[job.id] = (watcher, job)
            self.loop.call_soon(self._tell_finished, job.id)

    def _tell_finished(self, job_id: int) -> None:
        told = self._untold.pop(job_id, None)  # None: tell_watchers() told it already
        if told is not None:
            watcher, job = told
            watcher.job_finished(job)

    def tell_watchers(self) -> None:
        """Tell the watchers now of the finished jobs they would hear of in the loop's next turn. jobd stops: the
        step of the stop that runs next may close the store without giving the loop a turn (nothing left to await),
        and a watcher told after that would save to a closed store."""
        while self._untold:
            self._tell_finished(next(iter(self._untold)))

    def watch(self, job_id: int, watcher: JobWatcher) -> None:
        """Tell `watcher` when this unfinished job starts, progresses and finishes (a finished job: nothing)."""
        if job_id in self.jobs:
            self._watchers[job_id] = watcher

    def withhold(self, job_id: int) -> None:
        """Start no (further) try of this unfinished job: who runs it cancels it, from the loop's next turn on (a
        workflow instance dropping a task, killtask). Until then a queue with room in this very turn (a resume, a
        job's end, a reload) would have started it, and its program run after the cancel was answered. In memory
        only: the cancel commits the job's end (a crash before then leaves the job as its record has it)."""
        if job_id in self.jobs:  # it waits in its queue as before, counted there, and is passed over (_take_starts)
            self._withheld.add(job_id)

    def running_pid(self, job_id: int) -> int | None:
        running = self._running.get(job_id)
        return None if running is None else running.child.pid

    async def cancel(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job.state.finished:
            raise JobFinished(f"job {job_id} has already finished ({job.state})", id=job_id, state=str(job.state))
        if job.state is JobState.RUNNING:
            running = self._running.get(job_id)
            if running is None:  # its failed start waits to be recorded: the disk is full (_not_started)
                raise StoreFailed(
                    f"job {job_id} could not start and that is not recorded yet: {self.store_trouble_cause}"
                )
            if running.child.has_ended():  # on its own, just before: its end, waiting on the loop, comes first
                await asyncio.shield(running.ended)  # then it is finished, or waits for a retry, or runs it
                return await self.cancel(job_id)
            if not running.cancelled:
                running.cancelled = True
                log.info("job=%d cancel requested: stopping its process group", job_id)
                try:  # committed before the SIGTERM: a jobd that dies during kill_grace still ends the job cancelled
                    self.store.record_cancel_request(running.attempt)
                except Exception as error:  # the cancel goes on; only a crash before the end would forget it
                    self._store_failed("cannot record the cancel of job {}", error, job_id, retried=False)
                self._stop(job_id)
            return await self.wait(job_id, None)
        return self.cancel_waiting(job_id)

    def cancel_waiting(self, job_id: int) -> Job:
        """Cancel a job that is queued or delayed, now (cancel() does any unfinished job, waiting for a running one
        to end)."""
        job = self.get(job_id)
        assert job.state in (JobState.QUEUED, JobState.DELAYED), job
        was_delayed = job.state is JobState.DELAYED
        why = "cancelled before it ran" if job.attempts == 0 else "cancelled while it waited to be tried again"
        # Committed first: should the write fail (a full disk), the job stays queued or delayed as it was.
        job = self._change(job, JobState.CANCELLED, finished_at=self.clock(), error=why)
        if was_delayed:
            self._delay_timers.pop(job_id).cancel()
            self._write_dropped(_DUE, job_id)
        else:
            self.queues[job.spec.queue].remove(job_id)
        del self.jobs[job_id]
        self._withheld.discard(job_id)
        self._release_finish_waiters(job)
        self.history.job_finished()
        self._forget_if_drained(job.spec.queue)
        self._counts_changed()
        return job

    def _change(self, job: Job, state: JobState, **changes: object) -> Job:
        """A state change outside an attempt's end: commit, remember, tell."""
        before = job.state
        job = transition(job, state, **changes)
        self.store.update_job(job, before)
        self._store_works()
        if not state.finished:
            self.jobs[job.id] = job
        job_log.info("job=%d %s", job.id, state)
        self._emit("job.state", job)
        return job

    def set_paused(self, name: str, paused: bool) -> QueueRuntime:
        queue = self.queues.get(name)
        if queue is None:
            known = sorted(self.queues)
            raise UnknownQueue(f"unknown queue {name!r}; defined queues: {', '.join(known)}", queue=name, allowed=known)
        if queue.closed:
            # A removed queue is never paused: its pause would end at whatever reload or restart came next, and kept
            # until it drained, it would hold jobs for good in a queue no file defines any more.
            if paused:
                raise QueueClosed(
                    f"queue {name!r} was removed from the configuration and drains: it cannot be paused; cancel its "
                    "jobs, or define it again in the configuration to pause it"
                )
            return queue  # not paused: nothing to resume
        self.store.set_queue_pause(name, QueuePause(paused, queue.definition.paused))
        self._store_works()
        self._stale_pauses.discard(name)  # the record is this pause's now
        queue.paused = paused
        log.info("queue %s %s", name, "paused" if paused else "resumed")
        self._dispatch(name)
        self._counts_changed()
        return queue

    def delayed_count(self, queue_name: str) -> int:
        return sum(1 for job_id in self._delay_timers if self.jobs[job_id].spec.queue == queue_name)

    def attempts(self, job_id: int) -> list[Attempt]:
        self.get(job_id)  # UNKNOWN_JOB for a job that does not exist
        return self.store.attempts(job_id)

    def list_jobs(self, where: JobFilter) -> list[Job]:
        return self.page_of_jobs(where)[0]

    def page_of_jobs(self, where: JobFilter) -> tuple[list[Job], bool]:
        """The jobs `where` selects, and whether its `max_text` cut them short (Store.page_of_jobs)."""
        jobs, cut = self.store.page_of_jobs(where)
        return [self.jobs.get(job.id, job) for job in jobs], cut  # live progress wins

    async def history_counts(
        self, visible_tasks: Sequence[str] | None = None, visible_queues: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Jobs on record by state; with patterns, those of a task or queue one matches (Store.count_by_state), once
        a start-up's counting of the history is done (Store.jobs_counted)."""
        await self.store.jobs_counted()
        return self.store.count_by_state(visible_tasks, visible_queues)

    def queue_list(self) -> list[QueueRuntime]:
        return [self.queues[name] for name in sorted(self.queues)]

    # -- output ------------------------------------------------------------------------------------------------

    async def read_output(
        self,
        job_id: int,
        attempt: int | None,
        stream: str,
        offset: int,
        limit: int,
        *,
        wait: bool,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> OutputChunk:
        """Up to `limit` bytes of an attempt's stream from `offset`; with `wait`, blocks until there are some or
        the attempt ends (the daemon waits, not the client). `ready` is awaited before each read (api.Session.
        ready_for_reply): what wakes a wait is read only once the client can take it."""
        job = self.get(job_id)
        number = job.attempts if attempt is None else attempt
        if job.attempts == 0:
            # A job that exists but has not started: said so, and in data.attempts, so that a client can tell it
            # from a job that does not exist (jobctl log prints that it has no output).
            raise UnknownJob(
                f"job {job_id} has not run yet ({job.state}): it has no output", id=job_id, attempts=0, state=job.state
            )
        if number == 0 or number > job.attempts:
            raise UnknownJob(
                f"job {job_id} has no attempt {number} (it has {job.attempts})", id=job_id, attempts=job.attempts
            )
        if ready is not None:
            await ready()
        data, size = self.read_attempt_output(job_id, number, stream, offset, limit)
        while wait and not data and self.attempt_running(job_id, number):
            await self.wait_output(job_id)
            if ready is not None:
                await ready()
            data, size = self.read_attempt_output(job_id, number, stream, offset, limit)
        running = self.attempt_running(job_id, number)
        recorded = next((a for a in self.store.attempts(job_id) if a.number == number), None)
        if recorded is None:  # not started yet
            truncated = False
        elif recorded.cut_streams is None:  # an older jobd's record, one flag for all: the cut one holds max_output
            truncated = recorded.truncated and size >= job.spec.max_output
        else:
            truncated = stream in recorded.cut_streams
        complete = not running and offset + len(data) >= size
        return OutputChunk(data=data, size=size, complete=complete, truncated=truncated, attempt=number)

    def read_attempt_output(self, job_id: int, number: int, stream: str, offset: int, limit: int) -> tuple[bytes, int]:
        """_read_output of an attempt's stream. No file is no output (files are made at the first byte), unless
        jobd wrote one: then it was removed under jobd, and that is said (OutputMissing), not answered as an empty
        output: to job.output, and to a workflow task's end (Instances._result)."""
        path = self.output_path(job_id, number, stream)
        found = _read_output(job_id, stream, path, offset, limit)
        if found is not None:
            return found
        if self._output_written(job_id, number, stream, path):
            raise OutputMissing(
                f"job {job_id}'s {stream} of attempt {number} is missing: jobd wrote it to {path}, which is no longer "
                "there (removed, or the disk of jobd's state directory replaced, since)",
                id=job_id,
                attempt=number,
                stream=stream,
                path=path,
            )
        return b"", 0

    def _output_written(self, job_id: int, number: int, stream: str, path: str) -> bool:
        """Whether jobd made the file of an attempt's stream. The running attempt knows; an ended one recorded how
        many bytes of stdout and stderr it kept. The log's bytes are not recorded: its file was made if the job's
        directory, which holds the files of all its attempts, was (a stream of the job kept bytes) and is gone."""
        running = self._running.get(job_id)
        if running is not None and running.attempt.number == number:
            return running.child.wrote(stream)
        attempts = self.store.attempts(job_id)
        recorded = next((a for a in attempts if a.number == number), None)
        if recorded is None:
            return False
        if stream == "stdout":
            return recorded.stdout_bytes > 0
        if stream == "stderr":
            return recorded.stderr_bytes > 0
        return any(a.stdout_bytes or a.stderr_bytes for a in attempts) and not os.path.isdir(os.path.dirname(path))

    def output_path(self, job_id: int, attempt: int, stream: str) -> str:
        return f"{self.output_dir}/{job_id}/{attempt}.{stream}"

    def attempt_running(self, job_id: int, attempt: int) -> bool:
        running = self._running.get(job_id)
        return running is not None and running.attempt.number == attempt

    async def wait_output(self, job_id: int) -> None:
        """Until the running job writes more output or its attempt ends."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._output_waiters.setdefault(job_id, {})[waiter] = None
        try:
            await waiter
        finally:  # woken (it is gone already), or given up
            _forget_waiter(self._output_waiters, job_id, waiter)

    def _wake_output_waiters(self, job_id: int) -> None:
        for waiter in self._output_waiters.pop(job_id, {}):
            if not waiter.done():
                waiter.set_result(None)

    # -- events ------------------------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[JobEvent], None]) -> Callable[[], None]:
        self._listeners[listener] = None
        return lambda: self._listeners.pop(listener, None)

    def _emit(self, kind: str, job: Job, line: str | None = None, log_cut: bool = False) -> None:
        if self._listeners:  # on the spawn/reap path: build nothing when nobody listens
            event = JobEvent(kind, job, line, log_cut)
            for listener in list(self._listeners):
                listener(event)

    def _counts_changed(self) -> None:
        self.on_counts_changed()  # the daemon rate-limits what it tells systemd

    def counts(self) -> dict[str, int]:
        running = len(self._running)
        delayed = len(self._delay_timers)
        queued = sum(queue.ready_count() for queue in self.queues.values())
        return {"running": running, "queued": queued, "delayed": delayed}

    # -- configuration -----------------------------------------------------------------------------------------

    def _forget_queue_pause(self, name: str) -> None:
        """Drop the record of an API pause the configuration overrides. A reload must not stop halfway on it: should
        the write fail (a full disk), the record is stale, and is never applied while jobd runs: a queue removed and
        then added again under its name starts as its file says, not paused by it. Each reload tries to drop it
        again. (Should jobd stop before it can, the next start reads the record as any other: dropped if its queue
        is gone or its file's `paused` changed since, applied otherwise.)"""
        try:
            self.store.set_queue_pause(name, None)
        except Exception as error:
            self._stale_pauses.add(name)
            log.error("queue %s: cannot forget its API pause (it is not applied again): %s", name, error)
        else:
            self._stale_pauses.discard(name)

    def next_reload(self) -> asyncio.Future[None]:
        """Done once the configuration is next reloaded: what a request that waits looks out for, to check again
        that its client may still have the answer (api.while_allowed). One future for all of them."""
        if self._next_reload is None:
            self._next_reload = self.loop.create_future()
        return self._next_reload

    def reload(self, config: Config) -> None:
        """Apply a new configuration: queues change at once; accepted jobs keep the spec they were given."""
        self.config = config
        if self._next_reload is not None:  # its waiters run once the whole reload is applied (callbacks run later)
            self._next_reload.set_result(None)
            self._next_reload = None
        self._apply_queue_definitions(config, self.store.queue_pauses())
        for name in list(self.queues):
            self._dispatch(name)
        self.history.configure(config.daemon.history)
        self._counts_changed()

    def _apply_queue_definitions(self, config: Config, stored: dict[str, QueuePause]) -> None:
        stale = set(self._stale_pauses)
        for name in stale:
            self._forget_queue_pause(name)  # again: there may be room now
        pauses = {name: pause.paused for name, pause in stored.items() if name not in stale}
        for name in sorted(pauses.keys() - config.queues.keys()):
            # An API pause belongs to the queue it paused: removed from the file (now, or while jobd was down), the
            # queue drains, and one added again under that name starts as its file says, not paused by a record
            # older than its removal.
            self._forget_queue_pause(name)
            del pauses[name]
        for name, definition in config.queues.items():
            queue = self.queues.get(name)
            # The file's `paused` under which the API pause was made: the running definition's, or at start-up the
            # one stored with the pause.
            if queue is not None:
                was: bool | None = queue.definition.paused
            else:
                was = stored[name].config_paused if name in stored else None
            if name in pauses and was is not None and definition.paused != was:
                # The administrator changed `paused` in the file since the API pause (during this run, or while
                # jobd was stopped): that newer word overrides it.
                self._forget_queue_pause(name)
                pauses.pop(name)
            if queue is None:
                self.queues[name] = QueueRuntime(definition, paused=pauses.get(name, definition.paused))
                continue
            queue.redefine(definition)
            queue.closed = False
            queue.paused = pauses.get(name, definition.paused)
        for name, queue in list(self.queues.items()):
            if name not in config.queues:
                queue.paused = False  # its API pause, if any, was forgotten above: a removed queue drains
                if queue.is_idle() and not self._has_delayed(name):
                    del self.queues[name]
                elif not queue.closed:
                    waiting = queue.ready_count() + len(queue.running) + self.delayed_count(name)
                    log.info("queue %s removed from the configuration: draining %d jobs", name, waiting)
                    queue.closed = True

    def _forget_if_drained(self, name: str) -> None:
        """A queue removed from the configuration disappears once its last job has ended."""
        queue = self.queues.get(name)
        if queue is not None and queue.closed and queue.is_idle() and not self._has_delayed(name):
            del self.queues[name]
            log.info("queue %s drained and removed", name)

    def _has_delayed(self, queue_name: str) -> bool:
        return self.delayed_count(queue_name) > 0

    def _remove_output(self, job_id: int) -> None:
        shutil.rmtree(os.path.join(self.output_dir, str(job_id)), ignore_errors=True)

    # -- shutdown ----------------------------------------------------------------------------------------------

    def longest_kill_grace(self) -> float:
        """The longest kill_grace among the running jobs (0 when none runs): how long shutdown() may wait for a job
        that ignores SIGTERM before its SIGKILL."""
        return max((self.jobs[job_id].spec.kill_grace for job_id in self._running), default=0.0)

    def stop_taking_work(self) -> None:
        """No submit, launch or start is taken from now on: said as soon as jobd decides to stop, before anything
        of the stop (STOPPING=1 among it) lets a client see that it stops."""
        self.stopping = True

    async def shutdown(self) -> None:
        """Stop taking work, end running jobs by their grace rules, and leave every job recoverable."""
        self.stop_taking_work()
        for timer in self._delay_timers.values():
            timer.cancel()
        self.history.shut_down()
        ended = []
        for job_id, running in list(self._running.items()):  # let_go() may end a job, and forget it, at once
            ended.append(running.ended)
            # An ended job's output that waits for a file jobd cannot create yet (short of descriptors) does not hold
            # the stop: what cannot be written is dropped, and said so, as it was for a job stopped while it waited.
            running.child.let_go()
            if running.child.has_ended():  # on its own, just before: recorded as it ended, not run again
                continue
            log.info("job=%d stopping for shutdown", job_id)
            self._stop(job_id)
        # A job stopped by shutdown goes back to `queued`, not to a final state: wait for its attempt to end. A
        # failed start the store has not taken yet is waited for too: left `running` on record, the next start would
        # call it lost (jobd stopped while it ran), not say why it never started.
        ended.extend(self._failed_starts.values())
        await asyncio.gather(*ended)
        # Whoever still waits for a job to finish (job.wait, over any protocol) hears of the stop now, rather than
        # waiting on until its connection is cut.
        self._waiters_released = True
        for waiters in self._finish_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ShuttingDown("jobd is stopping: ask again once it is back"))
        if self._http_session is not None:
            await self._http_session.close()
