"""Wall-clock schedules at run time: one timerfd, the runs they start, and their durable state.

`jobd.engine.schedule` decides (the calendar's next time, jitter, catch-up); this module applies: it keeps one
timerfd on CLOCK_REALTIME armed (absolute, TFD_TIMER_CANCEL_ON_SET) at the nearest due time of all schedules, and
when it expires fires every schedule that is due — a workflow target launches an instance, a task target submits a
job — following each schedule's overlap and on_failure rules. Between due times it makes no system call: the loop
sleeps in epoll until the timerfd is readable. When someone sets the clock (settimeofday, an NTP step) the kernel
cancels the timer (the read fails with ECANCELED); every due time is then recomputed and the timer re-armed. A
clock set back does not fire again a due time that has fired (see `jobd.engine.schedule.next_run`).

What must survive a restart (last run, its result and id, the next time, the due time last fired, suspended, the
API's enable/disable, the run waiting behind the running one with overlap "queue_one") is saved through the store
on every change and loaded at start, after the engine and the instances have recovered, so a run that was going
when jobd stopped is found again (and followed to its end) by its job or instance id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from jobd import linux
from jobd.engine.core import Engine
from jobd.engine.instances import Instances
from jobd.engine.schedule import (
    MAX_STEP_BACK,
    Calendar,
    catch_up_due,
    next_run,
    set_back,
    still_due,
    waited_for,
)
from jobd.engine.submit import resolve, schedule_request, scheduler_peer
from jobd.errors import JobdError, UnknownInstance, UnknownJob, UnknownSchedule
from jobd.localzone import local_zone
from jobd.model import Config, Job, OnFailure, Overlap, ScheduleDef, ScheduleState, iso
from jobd.store import InstanceFilter, JobFilter, Store, store_failure

log = logging.getLogger("jobd.scheduler")

SUCCEEDED = "succeeded"
FAILED = "failed"
ERROR = "error"  # the run could not be started
LOST = "lost"  # its job or instance is no longer known

# The timer is armed at the due time itself and the kernel fires it at or after that instant, on the same clock
# time.time() reads; the margin only absorbs the float <-> timespec rounding of the armed value.
DUE_MARGIN = 0.001


# A run still going: ("job", job id) or ("instance", instance id). Job and instance ids are counted apart, so the
# same number may name a job and an instance of one schedule at once (its target changed by a reload meanwhile).
Run = tuple[str, int]


def _runs_text(runs: set[Run]) -> str:
    return ", ".join(f"{kind}={run_id}" for kind, run_id in sorted(runs))


@dataclass
class _Schedule:
    """One configured schedule at run time."""

    definition: ScheduleDef
    calendar: Calendar | None  # None: the calendar could not be parsed (logged); it never fires by itself
    state: ScheduleState
    runs: set[Run] = field(default_factory=set)  # each run still going

    @property
    def enabled(self) -> bool:
        return self.definition.enabled if self.state.enabled is None else self.state.enabled

    @property
    def waiting(self) -> bool:
        """Does it fire by itself when its time comes?"""
        return self.enabled and not self.state.suspended and self.calendar is not None

    @property
    def status(self) -> str:
        if self.runs:
            return "running"
        if not self.enabled:
            return "disabled"
        if self.state.suspended:
            return "suspended"
        return "waiting"


@dataclass
class _Removed:
    """A schedule removed from the configuration while runs it started go: kept until they end."""

    state: ScheduleState  # what is kept of its state (saved while its last run goes): that run
    runs: set[Run]  # each run still going


@dataclass(frozen=True, slots=True)
class Triggered:
    """What `Scheduler.trigger` did."""

    started: bool
    run_id: int | None
    queued: bool  # this trigger's run waits for the running one (overlap queue_one); False when one already did


@dataclass
class _RunWatcher:
    """The engine's JobWatcher for the job of one run of a task schedule."""

    scheduler: Scheduler
    name: str
    holds_history = False  # the schedule's state, not the job, records its run

    def job_started(self, job: Job, pid: int) -> None:
        pass

    def job_progress(self, job: Job) -> None:
        pass

    def job_finished(self, job: Job) -> None:
        self.scheduler._run_ended(self.name, ("job", job.id), _job_result(job))

    def retries_off(self) -> bool:
        return False  # the run goes on until the job has finished, its retries included


def _job_result(job: Job) -> str:
    return str(job.state)  # succeeded | failed | timed_out | cancelled


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        instances: Instances,
        store: Store,
        clock: Callable[[], float] = time.time,
        jitter_fraction: Callable[[], float] = random.random,
    ) -> None:
        self.engine = engine
        self.instances = instances
        self.store = store
        self.clock = clock
        self.jitter_fraction = jitter_fraction
        self._schedules: dict[str, _Schedule] = {}
        # Schedules removed from the configuration whose runs still go, until those end: one added again under its
        # name meanwhile takes them back, or its overlap rule would not see them.
        self._removed: dict[str, _Removed] = {}
        self._fd: int | None = None
        self._armed: float | None = None  # the absolute time the timerfd is armed at, None: disarmed
        self._followers: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._peer = scheduler_peer()
        # Told when a schedule is suspended, enabled or disabled: systemd's status line names the suspended ones.
        self.on_suspensions_changed: Callable[[], None] = lambda: None

    # -- start and stop ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the saved state, find runs that were going, catch up what was missed, arm the timer. Call it after
        the engine and the instances have recovered."""
        loop = asyncio.get_running_loop()
        self._fd = linux.timerfd_create(linux.CLOCK_REALTIME, linux.TFD_CLOEXEC | linux.TFD_NONBLOCK)
        loop.add_reader(self._fd, self._expired)
        saved = self.store.schedule_states()
        definitions = self.engine.config.schedules
        for name in sorted(set(saved) - set(definitions)):
            self._recover_removed(saved[name])
        now = self.clock()
        for name in sorted(definitions):
            schedule = self._make(definitions[name], saved.get(name) or ScheduleState(name=name))
            self._schedules[name] = schedule
            self._file_enabled(schedule, schedule.definition)
            self._recover_run(schedule)
            self._start_up(schedule, now)
        self._rearm()

    def stop(self) -> None:
        """Fire no more (at shutdown). Runs in progress are the engine's and the instances' to stop or resume;
        one that ends from here on is recorded by the next start-up, from its job or instance."""
        self._stopped = True
        if self._fd is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        for follower in self._followers:
            follower.cancel()

    def _make(self, definition: ScheduleDef, state: ScheduleState) -> _Schedule:
        try:
            calendar: Calendar | None = Calendar.parse(definition.calendar)
        except (JobdError, ValueError) as error:  # the config validates calendars: this is a safety net
            log.error(
                "schedule %s: calendar %r is invalid, it will not fire: %s", definition.name, definition.calendar, error
            )
            calendar = None
        return _Schedule(definition, calendar, state)

    def _take_back_runs(self, schedule: _Schedule) -> None:
        """A schedule added under the name of one removed while its runs went: those runs are its own again, as a
        restart finds the run it had going, so that its overlap rule sees them and their end is recorded."""
        name = schedule.definition.name
        removed = self._removed.pop(name, None)
        if removed is None:
            return
        schedule.runs = removed.runs
        going = _runs_text(schedule.runs)
        log.info(
            "schedule %s: its run %s, started before it was removed, is still going; followed to its end", name, going
        )
        if _last_run(removed.state) in schedule.runs:
            # Saved, so that a restart from here on follows it too (it looks for the state's last run).
            kept = removed.state
            self._set(schedule, last_run=kept.last_run, last_run_id=kept.last_run_id, last_run_kind=kept.last_run_kind)

    def _file_enabled(self, schedule: _Schedule, definition: ScheduleDef) -> None:
        """The API's enable/disable lasts until the file's `enabled` changes: `definition` is the file's (new, or read
        at start-up), and the state holds the file's value under which the API's word was given.

        A word saved before schema version 19 has no such value: jobd then cannot tell whether the file changed
        while it was stopped for the upgrade, and keeps the API's word, as it did before; the file's value of this
        start is recorded, so that any later change, even made while jobd is stopped, overrides it. (Until then
        that word was cleared by every change jobd saw live, so it was given under the file's value of its time,
        which differs from today's only if the file was edited while jobd was down.)"""
        state = schedule.state
        if state.enabled is None:
            return
        if state.config_enabled is None:
            self._set(schedule, config_enabled=definition.enabled)
        elif state.config_enabled != definition.enabled:
            log.info(
                "schedule %s: `enabled` changed in the configuration to %s: it overrides the API's %s",
                definition.name,
                str(definition.enabled).lower(),
                "enable" if state.enabled else "disable",
            )
            self._set(schedule, enabled=None, config_enabled=None)

    def _adopt_unsaved_run(self, schedule: _Schedule) -> None:
        """A crash between a firing's commit (its job, or its instance) and the state's save leaves a run the state does
        not name: make it the last run, so that a catch-up does not run the same due time a second time.

        Found by what the run carries: a job the schedule in its `context`, an instance in its `comment`. (Asking
        this at start-up, once, costs less than an idempotency key on every firing: the key's lookup is most of a
        firing's time.)"""
        state = schedule.state
        if state.next_run is None:
            return
        name = schedule.definition.name
        run = self._newest_run_since(schedule, state.next_run)
        if run is None:
            return
        kind, run_id, started_at = run
        known = state.last_run_id if (state.last_run_kind or kind) == kind else None
        if run_id > (known or 0):
            log.warning(
                "schedule %s: %s=%d was started for it before jobd stopped; it is its last run", name, kind, run_id
            )
            self._set(schedule, last_run=started_at, last_result=None, last_run_id=run_id, last_run_kind=kind)

    def _newest_run_since(self, schedule: _Schedule, since: float) -> tuple[str, int, float] | None:
        """The newest run started for the schedule at or after `since` (a firing's time, to the timer's rounding):
        its kind, id and start."""
        since -= DUE_MARGIN
        definition = schedule.definition
        mark = f"schedule:{definition.name}"
        if definition.target_kind == "task":
            newest = self.engine.list_jobs(JobFilter(context=mark, limit=1))
            if newest and newest[0].created_at >= since:
                return "job", newest[0].id, newest[0].created_at
            return None
        # Few instances of its workflow start after the time it waited for: those it would have launched since.
        launched, _ = self.instances.list_instances(InstanceFilter(workflow=definition.target, launched_from=since))
        ours = [instance for instance in launched if instance.comment == mark]
        if not ours:
            return None
        return "instance", ours[0].id, ours[0].started_at

    def _recover_run(self, schedule: _Schedule) -> None:
        """A run that had not ended when jobd stopped: follow it if it is still going, else record its result."""
        self._adopt_unsaved_run(schedule)
        state = schedule.state
        if state.last_run_id is None or state.last_result is not None:
            return
        run_id = state.last_run_id
        name = schedule.definition.name
        # The kind saved with the run; a row saved before schema 22 has none, the definition says.
        kind = state.last_run_kind or ("instance" if schedule.definition.target_kind == "workflow" else "job")
        if state.last_run_kind is None:
            self._set(schedule, last_run_kind=kind)  # saved: the end of the run is matched by its kind and id
        result = self._result_of(kind, run_id)
        if result is not None:
            self._ended_while_down(schedule, result)
            return
        log.info("schedule %s: its %s=%d is still going; followed to its end", name, kind, run_id)
        schedule.runs.add((kind, run_id))
        self._follow(name, kind, run_id)

    def _result_of(self, kind: str, run_id: int) -> str | None:
        """The result of a run that has ended (LOST: no longer known), None while it goes."""
        if kind == "instance":
            try:
                summary = self.instances.summary(run_id)
            except UnknownInstance:
                return LOST
            if summary.ended_at is None:
                return None
            return SUCCEEDED if summary.errors == 0 else FAILED
        try:
            job = self.engine.get(run_id)
        except UnknownJob:
            return LOST
        return _job_result(job) if job.state.finished else None

    def _follow(self, name: str, kind: str, run_id: int) -> None:
        if kind == "instance":
            self._follow_instance(name, run_id)
        else:
            self.engine.watch(run_id, _RunWatcher(self, name))

    def _recover_removed(self, state: ScheduleState) -> None:
        """The saved state of a schedule the configuration no longer defines: removed while jobd was down, or
        removed while its run went and kept for that run. Kept while that run goes, so that the schedule added back
        under its name takes it (its overlap rule sees it), as a live reload does; forgotten once it has ended."""
        name, run_id, kind = state.name, state.last_run_id, state.last_run_kind
        ended = state.last_result is not None
        if run_id is not None and kind is not None and not ended and self._result_of(kind, run_id) is None:
            log.info(
                "schedule %s is not in the configuration; its %s=%d is still going: followed to its end, and"
                " taken back if the schedule is added again meanwhile",
                name,
                kind,
                run_id,
            )
            kept = _kept(state)
            self._removed[name] = _Removed(kept, {(kind, run_id)})
            self._follow(name, kind, run_id)
            if kept != state:
                self._save(kept)
            return
        log.info("schedule %s was removed from the configuration: its state is forgotten", name)
        self._forget(name)

    def _ended_while_down(self, schedule: _Schedule, result: str) -> None:
        """Record the result of a run that ended while jobd was down (or stopping), as _run_ended would have."""
        self._set(schedule, last_result=result)
        if result != SUCCEEDED:
            log.warning("schedule %s: its last run ended while jobd was down: %s", schedule.definition.name, result)
            self._failed(schedule)

    def _start_pending(self, schedule: _Schedule, due: float, now: float) -> None:
        """The run that waited (overlap queue_one) when jobd stopped: it waits on for the run still going, or starts
        now if that one ended while jobd was down (a failure that suspends the schedule has dropped it already).
        Dropped if the schedule's overlap was changed to another rule while jobd was down."""
        name = schedule.definition.name
        if schedule.definition.overlap is not Overlap.QUEUE_ONE:
            self._set(schedule, pending=None)
            return
        if schedule.runs:
            log.info(
                "schedule %s: its queued run still waits behind %s (overlap queue_one)", name, _runs_text(schedule.runs)
            )
            return
        log.info("schedule %s: the run it had going ended while jobd was down; its queued run starts now", name)
        self._set(schedule, pending=None)
        self._start_run(schedule, due, now)

    def _start_up(self, schedule: _Schedule, now: float) -> None:
        definition = schedule.definition
        if not schedule.waiting:
            self._set(schedule, next_run=None, pending=None)  # disabled in the file while jobd was down
            return
        if schedule.state.pending is not None:
            self._start_pending(schedule, schedule.state.pending, now)
        if schedule.runs and definition.overlap is Overlap.SKIP:
            self._set(schedule, next_run=None)  # computed when the run ends
            return
        assert schedule.calendar is not None
        # A run still going does not stop the catch-up: the overlap rule decides, as for any due time (skip returned
        # above; allow starts another run; queue_one queues one).
        if catch_up_due(definition, schedule.calendar, schedule.state, now):
            delay = self.jitter_fraction() * definition.jitter
            if delay > 0:
                # As systemd's Persistent= catch-up is by RandomizedDelaySec=: the schedules that missed a time
                # while jobd was down do not all start in the same instant. Due then, it fires as any due time; a
                # restart before it has fired still owes it (catch_up_due, waited_for).
                log.info(
                    "schedule %s: a due time was missed while jobd was down; catching up once in %.0f s (jitter)",
                    definition.name,
                    delay,
                )
                self._set(schedule, next_run=now + delay)
                return
            missed = schedule.state.next_run
            due = missed if missed is not None and missed <= now else now
            log.info("schedule %s: a due time was missed while jobd was down; catching up once now", definition.name)
            self._set(schedule, last_due=due)
            self._fire(schedule, due, now)
            self._after_firing(schedule, now)
            return
        kept = waited_for(definition, schedule.calendar, schedule.state, now)  # a due time delayed past the restart
        self._set(schedule, next_run=kept if kept is not None else self._next(schedule, now))

    # -- the timer -----------------------------------------------------------------------------------------------

    def _expired(self) -> None:
        assert self._fd is not None
        self._armed = None  # an absolute one-shot timer is disarmed once it has expired or been cancelled
        clock_set = linux.read_expirations(self._fd) is None
        try:
            self._fire_due(self.clock(), clock_set)
        finally:
            self._rearm()  # the timer is one-shot: whatever happened above, the next due time must be armed

    def _fire_due(self, now: float, clock_set: bool) -> None:
        """Fire every schedule whose due time has come; when the clock was set, compute the others' again."""
        for name in sorted(self._schedules):
            schedule = self._schedules[name]
            due = schedule.state.next_run
            if not schedule.waiting or due is None:
                continue
            if due <= now + DUE_MARGIN:
                self._set(schedule, last_due=due)  # fired once, whatever the clock does next
                self._fire(schedule, due, now)
                self._after_firing(schedule, now)
            elif clock_set:  # set back: the next time from the new "now" may be sooner (never at or before
                # the due time last fired, within MAX_STEP_BACK: see next_run)
                self._set(schedule, next_run=self._recomputed(schedule, now))
        if clock_set:
            log.info("the system clock was set: due times recomputed, timer re-armed")

    def _rearm(self) -> None:
        if self._fd is None:
            return
        times = [s.state.next_run for s in self._schedules.values() if s.waiting and s.state.next_run is not None]
        nearest = min(times, default=None)
        if nearest == self._armed:
            return
        if nearest is None:
            linux.timerfd_settime(self._fd, 0, 0.0)
        else:
            # Zero would disarm the timer; any time in the past makes it expire at once, as it should.
            linux.timerfd_settime(self._fd, linux.TFD_TIMER_ABSTIME | linux.TFD_TIMER_CANCEL_ON_SET, max(nearest, 1e-9))
        self._armed = nearest

    def _next(self, schedule: _Schedule, now: float) -> float | None:
        assert schedule.calendar is not None
        back = set_back(schedule.state, now)
        if back > MAX_STEP_BACK:
            log.warning(
                "schedule %s: the clock is %.0f s before the due time it last fired (%s), more than %.0f s: its next"
                " time is counted from now and may repeat one already fired",
                schedule.definition.name,
                back,
                iso(schedule.state.last_due),
                MAX_STEP_BACK,
            )
        elif back > DUE_MARGIN:  # not a timer that expired on time, rounded below its due time
            log.info(
                "schedule %s: the clock is %.3f s before the due time it last fired (%s): its next time comes after"
                " that one, not after now",
                schedule.definition.name,
                back,
                iso(schedule.state.last_due),
            )
        return next_run(schedule.definition, schedule.calendar, schedule.state, now, self.jitter_fraction())

    def _recomputed(self, schedule: _Schedule, now: float) -> float | None:
        """The next time computed again (an edit of the schedule, the clock set): after now, unless the due time
        it waited for, whose calendar time has come, comes sooner and it still has that one (see still_due)."""
        waited = still_due(schedule.definition, schedule.calendar, schedule.state, now + DUE_MARGIN)
        computed = self._next(schedule, now)
        return computed if waited is None or computed is None else min(waited, computed)

    def _after_firing(self, schedule: _Schedule, now: float) -> None:
        """The next due time once a due time has fired (whether or not a run started)."""
        if not schedule.waiting:
            self._set(schedule, next_run=None)
        elif schedule.runs and schedule.definition.overlap is Overlap.SKIP:
            self._set(schedule, next_run=None)  # evQueue's rule: computed when the run ends
        else:
            self._set(schedule, next_run=self._next(schedule, now))

    # -- runs ----------------------------------------------------------------------------------------------------

    def _fire(self, schedule: _Schedule, due: float, now: float) -> Triggered:
        """A due time (or a trigger) came: start a run, unless its overlap rule says otherwise."""
        name = schedule.definition.name
        if schedule.runs:
            overlap = schedule.definition.overlap
            going = _runs_text(schedule.runs)
            if overlap is Overlap.SKIP:
                log.info("schedule %s: not started, its run %s is still going (overlap skip)", name, going)
                return Triggered(started=False, run_id=None, queued=False)
            if overlap is Overlap.QUEUE_ONE:
                if schedule.state.pending is None:
                    self._set(schedule, pending=due)
                    log.info("schedule %s: queued behind its run %s (overlap queue_one)", name, going)
                    return Triggered(started=False, run_id=None, queued=True)
                # Dropped: the run that waits already stands for it (and `queued` says that this one was not).
                log.info("schedule %s: not started, one run already waits behind %s (overlap queue_one)", name, going)
                return Triggered(started=False, run_id=None, queued=False)
        run_id = self._start_run(schedule, due, now)
        return Triggered(started=run_id is not None, run_id=run_id, queued=False)

    def _start_run(self, schedule: _Schedule, due: float, now: float) -> int | None:
        """Start a run for the due time `due` (a trigger's is its moment), at `now`."""
        definition = schedule.definition
        name = definition.name
        try:
            if definition.target_kind == "workflow":
                run_id = self.instances.launch(definition.target, definition.parameters, comment=f"schedule:{name}")
                kind = "instance"
            else:
                # The load resolved the same request (jobd.config._check_schedule_submission), so resolve does not
                # refuse it here; the submit still may (a queue that is draining, a full disk...).
                request = schedule_request(name, definition.target, definition.parameters)
                spec = resolve(self.engine.config, request, self._peer)
                [(job, _)] = self.engine.submit([spec], [0.0], _RunWatcher(self, name))
                run_id, kind = job.id, "job"
        except Exception as error:
            failure = error if isinstance(error, JobdError) else store_failure(error)  # a full disk: not a bug
            # Anything else is a bug of jobd's, and counts as a run that could not start all the same. Raised, it
            # left the due time the schedule's next: the one-shot timer was armed for it again, expired at once and
            # raised again, for ever (jobd spun, a traceback a turn); raised at a run's end, a run waiting behind it
            # (overlap queue_one) was lost, and a schedule with overlap skip was never due again.
            why = failure.message if failure is not None else f"internal error: {type(error).__name__}: {error}"
            log.error(
                "schedule %s: cannot start its %s %s: %s",
                name,
                definition.target_kind,
                definition.target,
                why,
                exc_info=error if failure is None else None,
            )
            self._set(schedule, last_run=now, last_result=ERROR, last_run_id=None, last_run_kind=None)
            self._failed(schedule)
            return None
        # The due time and the moment, exact: they show what jobd decided (the next due time is the calendar's
        # first after the moment, or after the run's end with overlap skip), whatever the load of the machine.
        log.info("schedule %s fired: %s=%d (due %s, at %s)", name, kind, run_id, iso(due), iso(now))
        schedule.runs.add((kind, run_id))
        self._set(schedule, last_run=now, last_result=None, last_run_id=run_id, last_run_kind=kind)
        if kind == "instance":
            self._follow_instance(name, run_id)
        return run_id

    def _follow_instance(self, name: str, instance_id: int) -> None:
        async def follow() -> None:
            summary = await self.instances.wait(instance_id, None)
            self._run_ended(name, ("instance", instance_id), SUCCEEDED if summary.errors == 0 else FAILED)

        task = asyncio.get_running_loop().create_task(follow())
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    def _run_ended(self, name: str, run: Run, result: str) -> None:
        if self._stopped:
            return  # shutting down: no queued run may start (nor fail to, and suspend the schedule)
        schedule = self._schedules.get(name)
        if schedule is None:  # removed from the configuration meanwhile: its run was left alone
            removed = self._removed.get(name)
            if removed is not None:
                removed.runs.discard(run)
                if not removed.runs:
                    del self._removed[name]
                    log.info("schedule %s: its run %s=%d, started before it was removed, ended: %s", name, *run, result)
                    self._forget(name)
            return
        if run not in schedule.runs:
            return
        schedule.runs.remove(run)
        now = self.clock()  # the end as the schedule counts it (overlap skip: its next time is the first after it)
        log.log(
            logging.INFO if result == SUCCEEDED else logging.WARNING,
            "schedule %s: run %s=%d ended: %s (at %s)",
            name,
            *run,
            result,
            iso(now),
        )
        if run == _last_run(schedule.state):
            self._set(schedule, last_result=result)
        if result != SUCCEEDED:
            self._failed(schedule)
        due = schedule.state.pending
        if due is not None and not schedule.runs:
            self._set(schedule, pending=None)
            self._start_run(schedule, due, now)
        if schedule.definition.overlap is Overlap.SKIP and not schedule.runs:
            self._after_firing(schedule, now)  # strictly after this end
        self._rearm()

    def _failed(self, schedule: _Schedule) -> None:
        if schedule.definition.on_failure is OnFailure.SUSPEND and not schedule.state.suspended:
            name = schedule.definition.name
            log.warning(
                "schedule %s suspended after a failed run (on_failure = suspend): it fires no more until "
                "`jobctl schedule enable %s`",
                name,
                name,
            )
            self._set(schedule, suspended=True, next_run=None, pending=None)

    def suspended(self) -> list[str]:
        """The schedules a failed run has suspended (on_failure = suspend) and nobody has enabled again, by name;
        a disabled one is not among them: nothing would fire it anyway."""
        return [
            name for name, schedule in sorted(self._schedules.items()) if schedule.enabled and schedule.state.suspended
        ]

    def _set(self, schedule: _Schedule, **changes: Any) -> None:
        """Change a schedule's state and save it (only when something changed).

        Each change of the next time also records why it is None, if it is: waiting for the end of the run going
        (overlap "skip"), or not waiting at all (disabled, suspended); a catch-up at start-up tells them apart."""
        state = replace(schedule.state, **changes)
        if "next_run" in changes:
            definition = schedule.definition
            enabled = definition.enabled if state.enabled is None else state.enabled
            after_run = (
                state.next_run is None
                and bool(schedule.runs)
                and definition.overlap is Overlap.SKIP
                and enabled
                and not state.suspended
                and schedule.calendar is not None
            )
            state = replace(state, after_run=after_run)
        if state != schedule.state:
            suspension_changed = (state.suspended, state.enabled) != (schedule.state.suspended, schedule.state.enabled)
            schedule.state = state
            self._save(state)
            if suspension_changed:
                self.on_suspensions_changed()

    def _save(self, state: ScheduleState) -> None:
        self._write(state.name, "saved", lambda: self.store.save_schedule_state(state))

    def _forget(self, name: str) -> None:
        self._write(name, "forgotten", lambda: self.store.forget_schedule(name))

    def _write(self, name: str, done: str, write: Callable[[], None]) -> None:
        """A write of a schedule's state. On a full disk the schedule goes on as changed: its whole state is saved
        with its next change, and a state to forget is forgotten by the next start; a restart before then starts
        from the state saved last (a run started meanwhile is adopted)."""
        try:
            write()
        except Exception as error:
            if store_failure(error) is None:
                raise
            log.error("schedule %s: its state is not %s: %s", name, done, error)

    # -- commands ------------------------------------------------------------------------------------------------

    def _get(self, name: str) -> _Schedule:
        schedule = self._schedules.get(name)
        if schedule is None:
            known = sorted(self._schedules)
            raise UnknownSchedule(
                f"unknown schedule {name!r}; defined schedules: {', '.join(known) or '(none)'}",
                schedule=name,
                allowed=known,
            )
        return schedule

    def enable(self, name: str) -> dict[str, Any]:
        schedule = self._get(name)
        self._set(schedule, enabled=True, config_enabled=schedule.definition.enabled, suspended=False)
        log.info("schedule %s enabled", name)
        skipping = schedule.runs and schedule.definition.overlap is Overlap.SKIP
        if schedule.state.next_run is None and schedule.waiting:
            # Skipping: still computed when the run ends. Set all the same, so that the state says so (after_run),
            # not what the disable or the suspension it replaces said: a start after that run ended while jobd was
            # down catches up as for a schedule never disabled.
            self._set(schedule, next_run=None if skipping else self._next(schedule, self.clock()))
        self._rearm()
        return self.describe(name)

    def disable(self, name: str) -> dict[str, Any]:
        schedule = self._get(name)
        self._set(schedule, enabled=False, config_enabled=schedule.definition.enabled, next_run=None, pending=None)
        log.info("schedule %s disabled", name)
        self._rearm()
        return self.describe(name)

    def trigger(self, name: str) -> Triggered:
        """Run it now, as if it were due (obeying its overlap rule); its calendar is left as it is."""
        schedule = self._get(name)
        now = self.clock()
        log.info("schedule %s triggered", name)
        triggered = self._fire(schedule, now, now)
        if triggered.started and schedule.definition.overlap is Overlap.SKIP:
            self._set(schedule, next_run=None)  # nothing is due while its run goes
        self._rearm()
        return triggered

    def describe(self, name: str) -> dict[str, Any]:
        return _describe(self._get(name))

    def list(self) -> list[dict[str, Any]]:
        return [_describe(self._schedules[name]) for name in sorted(self._schedules)]

    # -- configuration -------------------------------------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """An edited schedule's next time is recomputed at once; a removed one fires no more (its run is left
        alone and its state forgotten); a new one starts waiting for its first time, and one added back while a
        run it started before its removal goes takes that run back."""
        now = self.clock()
        zone_changed = local_zone.refresh()
        for name in sorted(set(self._schedules) - set(config.schedules)):
            removed = self._schedules.pop(name)
            log.info("schedule %s removed from the configuration%s", name, " (its run goes on)" if removed.runs else "")
            kept = _kept(removed.state)
            if _last_run(removed.state) in removed.runs:
                # Its last run, saved until it ends: a restart meanwhile finds it, and the schedule added back then
                # takes it, as one added back by a reload does (self._removed).
                self._save(kept)
            else:
                self._forget(name)
            if removed.runs:
                self._removed[name] = _Removed(kept, removed.runs)
        for name in sorted(config.schedules):
            definition = config.schedules[name]
            schedule = self._schedules.get(name)
            if schedule is None:
                schedule = self._make(definition, ScheduleState(name=name))
                self._schedules[name] = schedule
                log.info("schedule %s added", name)
                self._take_back_runs(schedule)
            elif schedule.definition != definition:
                self._file_enabled(schedule, definition)
                calendar = self._make(definition, schedule.state).calendar
                schedule.definition, schedule.calendar = definition, calendar
                log.info("schedule %s changed: its next time is recomputed", name)
            elif zone_changed and definition.timezone is None:
                log.info("schedule %s: the machine's time zone changed, its next time is recomputed", name)
            else:
                continue
            if definition.overlap is not Overlap.QUEUE_ONE:  # a run queued under the rule it no longer has
                self._set(schedule, pending=None)
            if not schedule.waiting:
                self._set(schedule, next_run=None, pending=None)
            elif schedule.runs and definition.overlap is Overlap.SKIP:
                self._set(schedule, next_run=None)
            else:
                self._set(schedule, next_run=self._recomputed(schedule, now))
        self._rearm()


def _last_run(state: ScheduleState) -> Run | None:
    """The run the state names last (None: none, or a row saved before schema version 22 whose kind _recover_run
    has not filled in from its definition yet)."""
    if state.last_run_id is None or state.last_run_kind is None:
        return None
    return (state.last_run_kind, state.last_run_id)


def _kept(state: ScheduleState) -> ScheduleState:
    """What is kept of a removed schedule's state while its last run goes: that run, nothing else (its next time,
    enable/disable, suspension and due time last fired are forgotten with it)."""
    return ScheduleState(
        name=state.name, last_run=state.last_run, last_run_id=state.last_run_id, last_run_kind=state.last_run_kind
    )


def _describe(schedule: _Schedule) -> dict[str, Any]:
    definition, state = schedule.definition, schedule.state
    runs = sorted(schedule.runs, key=lambda run: (run[1], run[0]))  # by id, then kind
    return {
        "name": definition.name,
        "target": {
            "kind": str(definition.target_kind),
            "name": definition.target,
            "parameters": dict(definition.parameters),
        },
        "calendar": definition.calendar,
        "timezone": definition.timezone,
        "overlap": str(definition.overlap),
        "on_failure": str(definition.on_failure),
        "catch_up": definition.catch_up,
        "jitter": definition.jitter,
        "enabled": schedule.enabled,
        "suspended": state.suspended,
        "state": schedule.status,
        "next_run": iso(state.next_run),
        "last_run": iso(state.last_run),
        "last_result": state.last_result,
        "last_run_id": state.last_run_id,
        "running": [run_id for _kind, run_id in runs],
        "runs": [{"kind": kind, "id": run_id} for kind, run_id in runs],
        "pending": state.pending is not None,
    }
