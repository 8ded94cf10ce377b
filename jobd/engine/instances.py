"""Workflow instances at run time: each task runs as a jobd job in its queue; the pure machine decides the rest.

`jobd.engine.workflow.Instance` holds the evQueue instance document and decides what happens when a task starts,
progresses or ends. This module applies its actions — submit the job of a task, arm a retry timer, drop a queued
job on cancel — feeds it what the engine's jobs do, and saves the document to the store after its changes (see
_save), so a restart (even after `kill -9`) resumes each executing instance from its last saved state.

Subscribers (the HTTP listener's /events, events.subscribe) hear `instance.state` when an instance is launched and
when it ends, and `instance.progress` whenever one of its tasks changes (queued, started, progressed, ended,
skipped, aborted): evQueue's INSTANCE_STARTED/TERMINATED and TASK_ENQUEUE/EXECUTE/PROGRESS/TERMINATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lxml import etree

from jobd import logline, users
from jobd.engine.core import Engine
from jobd.engine.decisions import RESOURCE_RETRY_DELAY
from jobd.engine.workflow import (
    MAX_DOCUMENT_TEXT,
    MAX_DOCUMENT_XML,
    OUTPUT_MISSING,
    Action,
    DequeueTask,
    Instance,
    InstanceFinished,
    InstanceStatus,
    NodeStatus,
    OutputCut,
    RetryLater,
    RunTask,
    TaskResult,
    check_parameters,
    xml_safe_text,
)
from jobd.errors import (
    InsufficientRights,
    InvalidParams,
    JobdError,
    JobFinished,
    OutOfResources,
    OutputMissing,
    ShuttingDown,
    StoreFailed,
    UnknownInstance,
    UnknownJob,
    UnknownWorkflow,
    shortage,
)
from jobd.model import (
    WORKFLOW_SCRIPT_NAME,
    WORKFLOW_TASK_KEY_PREFIX,
    Config,
    InstanceSummary,
    Job,
    JobSpec,
    JobState,
    Outcome,
    RetryPolicy,
)
from jobd.store import STORE_RETRY_SECONDS as RETRY
from jobd.store import InstanceFilter, JobFilter, Store, store_failure

log = logging.getLogger("jobd.instances")
# The scripts directory that cannot be listed is said at most once a minute (_scripts_unlisted): once for each
# instance that ends otherwise.
_unlisted = logline.Throttle(every=60.0)

_DONE = (NodeStatus.TERMINATED, NodeStatus.ABORTED, NodeStatus.SKIPPED)
# After a save of an instance's document that took t seconds, its next save waits SAVE_SPACING × t, so at most a
# tenth of jobd's time goes to saving one busy instance. Saved after every change, a loop of n tasks wrote n ever
# larger documents, n² in all: 2,000 iterations spent 85 % of jobd's time serialising and writing the document.
# A small document (a fraction of a millisecond to save) is still saved within a few milliseconds of its change.
SAVE_SPACING = 9.0
# An event that changed more tasks than this (a loop expanded, a cancel) is told after a walk over the whole document
# rather than task by task, whose document order costs a look along each one's siblings.
_FOLLOW_AT_MOST = 64


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    """What subscribers hear of an instance: `instance.state` (launched or ended; `data` holds the instance object
    and its progress) or `instance.progress` (a task changed; `data` holds the task and the instance's progress)."""

    type: str  # "instance.state" | "instance.progress"
    instance_id: int
    workflow: str
    data: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **self.data}


def task_json(task: etree._Element) -> dict[str, Any]:
    """A <task> as instance.get's tree shows it, and as instance.progress events carry it."""
    retval = task.get("retval")
    return {
        "evqid": int(task.get("evqid", "0")),
        "name": task.get("name") or task.get("task") or task.get("path"),
        "status": task.get("status"),
        "retval": None if retval is None else int(retval),
        "progression": int(task.get("progression", "0")),
        "error": task.get("error"),
        "job_id": int(tid) if (tid := task.get("tid")) else None,
        "tries": len(task.findall("output")),
    }


def _document_position(node: etree._Element) -> tuple[int, ...]:
    """What sorts nodes of one document in document order: each ancestor-or-self's index among its siblings."""
    position: list[int] = []
    parent = node.getparent()
    while parent is not None:
        position.append(parent.index(node))
        node, parent = parent, parent.getparent()
    return tuple(reversed(position))


def _key_prefix(instance_id: int) -> str:
    """How the idempotency keys of an instance's task jobs begin (then the task's evqid, `:try:` and the try)."""
    return f"{WORKFLOW_TASK_KEY_PREFIX}{instance_id}:task:"


def _task_key(task: etree._Element) -> tuple[str | None, ...]:
    """What task_json shows of a task that can change (`tries` changes only with `status`)."""
    return tuple(task.get(name) for name in ("status", "progression", "retval", "error", "tid"))


def _weight(task: etree._Element, dead: bool) -> int:
    """How far a task is, 0–100, for the instance's progress: done (ended, skipped, aborted, or under a job that
    will not run) is 100, running is its progression, anything else (not reached, queued, waiting, waiting to be
    retried) is 0."""
    status = task.get("status")
    if dead or (status in _DONE and task.get("retry_at") is None):
        return 100
    if status == NodeStatus.EXECUTING:
        return min(100, max(0, int(task.get("progression", "0"))))
    return 0


@dataclass
class _Live:
    """An executing instance and what the engine does for it."""

    summary: InstanceSummary
    machine: Instance
    jobs: dict[int, int] = field(default_factory=dict)  # evqid -> id of the job running it
    retry_timers: dict[int, asyncio.TimerHandle] = field(default_factory=dict)  # evqid -> timer
    # An ordered set (O(1) to leave) of the futures of instance.wait; each is given the ended summary.
    waiters: dict[asyncio.Future[InstanceSummary], None] = field(default_factory=dict)
    save_after: float = 0.0  # loop time before which its document is not saved again (SAVE_SPACING)
    saved_with_errors: bool = False  # what the store holds: instance.list's `errors` filter reads it
    # While a restart resumes it: the ends of its tasks' jobs still to tell the machine, as (finished_at, job id,
    # evqid), told in the order they happened (_replay).
    replay: list[tuple[float, int, int]] | None = None
    # What subscribers were last told (Instances._publish): evqid -> _task_key, and each task's part of the progress.
    # Keyed by the evqid attribute as it is (a string), as the walk over the document finds it.
    shown: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    measured: dict[str, Sequence[str | bytes]] = field(default_factory=dict)  # evqid -> its attribute values, last walk
    weights: dict[str, int] = field(default_factory=dict)  # evqid -> _weight
    weight_sum: int = 0  # of `weights`
    # Whether `shown` and `weights` hold the tasks as they are: false from a change nobody listened to (then
    # _publish did not walk) until the next walk that marks; _publish_task may take its short cut only when true.
    current: bool = False

    @property
    def first_error_unsaved(self) -> bool:
        """Its first error is not in the store yet: saved at once, whatever the spacing (instance.list filters on
        it in the store)."""
        return self.machine.errors > 0 and not self.saved_with_errors

    def next_key(self, evqid: int) -> str:
        """The idempotency key of the job of a task's next try: a restart finds that job by it."""
        task = self.machine.task(evqid)
        tries = 0 if task is None else len(task.findall("output"))  # one <output> per ended try
        return f"{_key_prefix(self.summary.id)}{evqid}:try:{tries + 1}"


# What becomes of a task that cannot be submitted for want of a descriptor (Instances._hold_while_short).
_TASK_WAITS = "the task waits to be submitted until jobd can"


class Instances:
    def __init__(self, engine: Engine, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.scripts_dir = engine.scripts_dir  # absolute, as the jobs run their scripts by it
        self._live: dict[int, _Live] = {}
        self._waiters_stopped = False  # stop_waiters() has answered the instance.waits: later ones are answered so
        self._unsaved: set[int] = set()  # instances changed since the last save
        self._save_handle: asyncio.Handle | None = None  # the coming _save_changed, at the loop time _save_when
        self._save_when = 0.0  # 0: at the end of this pass of the loop
        self._save_retry: asyncio.TimerHandle | None = None  # while the store refuses writes (a full disk)
        self._save_failing = False
        self._save_trouble = ""  # why the last save failed, while saves fail
        # Instances cancelled whose document has not been saved since (a full disk): a crash would forget the cancel.
        self._cancels_unsaved: set[int] = set()
        # Instances whose cancel was answered STORE_FAILED: a cancel asked again answers OK once the first is saved,
        # even if the instance has ended meanwhile (rather than INVALID_PARAMS, "already ended").
        self._cancels_refused: set[int] = set()
        # Instances that have ended and whose end could not be saved yet: what they are, until it is.
        self._ended_unsaved: dict[int, tuple[InstanceSummary, bytes]] = {}
        self._listeners: dict[Callable[[InstanceEvent], None], None] = {}
        self._stopping = False  # jobd is stopping: no retry is armed (stop_retries)
        # Tasks not submitted for want of a descriptor, as (instance id, evqid) in order, an ordered set: QUEUED
        # without a job, submitted again when _short_hold ends (_hold_while_short).
        self._held: dict[tuple[int, int], None] = {}
        self._short_hold: asyncio.TimerHandle | None = None
        self._closed = False  # jobd's store is closed or closing (close()): nothing more is done or saved
        # Ended instances whose scripts could not be removed for want of a descriptor, and the next try.
        self._scripts_left: set[int] = set()
        self._scripts_retry: asyncio.TimerHandle | None = None
        # The jobs whose ends each instance was told of since it was last saved: held in the history until it is.
        self._ends_unsaved: dict[int, list[int]] = {}
        # Since jobd started, for evQueue's global statistics: instances started (however: launches, schedules, debug
        # resumes) and instances that ended with errors. Counted as they happen: counting them in the store read every
        # instance since the start (no index has the start time or the errors).
        self.launched = 0
        self.ended_with_errors = 0

    # -- launching -----------------------------------------------------------------------------------------------

    def launch(
        self,
        workflow: str,
        parameters: Mapping[str, str],
        *,
        comment: str | None = None,
        host: str | None = None,
        user: str | None = None,
        launched_by: int | None = None,
    ) -> int:
        self._refuse_while_stopping()
        # As parameter values are: characters an XML document cannot hold become control pictures (jobd's JSON-RPC
        # takes them; the instance's document, and evQueue's lists, could not carry them).
        comment, host, user = (None if text is None else xml_safe_text(text) for text in (comment, host, user))
        config = self.engine.config
        definition = config.workflows.get(workflow)
        if definition is None:
            known = sorted(config.workflows)
            raise UnknownWorkflow(
                f"Unknown workflow name : {workflow}; defined workflows: {', '.join(known) or 'none'}",
                workflow=workflow,
                allowed=known,
            )
        # Refused parameters are told before the instance row takes an id: ids are never reused, so a launch that
        # was refused would otherwise leave a gap in them (the next instance is not the one the user expects).
        check_parameters(workflow, definition.parameters, parameters)
        now = self.clock()
        instance_id = self.store.next_instance_id()
        summary = InstanceSummary(
            id=instance_id,
            workflow=workflow,
            status=str(InstanceStatus.EXECUTING),
            errors=0,
            started_at=now,
            comment=comment,
            host=host,
            user=user,
            launched_by=launched_by,
            parameters=dict(parameters),
        )
        machine, actions = Instance.launch(
            definition,
            parameters,
            instance_id=instance_id,
            now=now,
            queues=set(config.queues),
            tasks=config.tasks,
            retry_schedules=config.retry_schedules,
            comment=comment,
            host=host,
            user=user,
        )
        self._begin(summary, machine, actions, f"instance={instance_id} of workflow {workflow} launched")
        return instance_id

    def debug_resume(self, instance_id: int, *, launched_by: int | None = None) -> int:
        """evQueue's `instance debugresume`: a new instance cloned from an ended one, whose failed tasks run again
        (see `Instance.debug_resume`); the old instance is left as it is. Returns the new instance's id."""
        self._refuse_while_stopping()
        if instance_id in self._live:
            raise InvalidParams(
                f"instance {instance_id} is still executing; only a TERMINATED instance can be debug-resumed",
                id=instance_id,
            )
        old, document = self._stored(instance_id)
        if old.status != str(InstanceStatus.TERMINATED) or not document:
            raise InvalidParams(
                f"instance {instance_id} is {old.status}; only a TERMINATED instance can be debug-resumed",
                id=instance_id,
            )
        config = self.engine.config
        now = self.clock()
        new_id = self.store.next_instance_id()
        summary = InstanceSummary(
            id=new_id,
            workflow=old.workflow,
            status=str(InstanceStatus.EXECUTING),
            errors=0,
            started_at=now,
            comment=old.comment,
            host=old.host,
            user=old.user,
            launched_by=launched_by,
            parameters=dict(old.parameters),
        )
        try:
            machine, actions = Instance.debug_resume(
                document,
                instance_id=new_id,
                now=now,
                queues=set(config.queues),
                tasks=config.tasks,
                retry_schedules=config.retry_schedules,
            )
        except ValueError as error:
            raise InvalidParams(f"instance {instance_id} cannot be debug-resumed: {error}", id=instance_id) from None
        self._begin(
            summary,
            machine,
            actions,
            f"instance={new_id} debug-resumed from instance={instance_id} (workflow {old.workflow})",
        )
        return new_id

    def _begin(self, summary: InstanceSummary, machine: Instance, actions: list[Action], told: str) -> None:
        """Commit a new instance and start it (a launch, a debug-resume); `told` is its log line.

        The row and its first document are one commit, made before any of its tasks is submitted: neither a crash
        nor a full disk can leave a row without its document (unreadable at the next start, its tasks' jobs
        orphaned), and an instance the store cannot take is refused (STORE_FAILED) with nothing of it run."""
        self.store.insert_instance(summary, machine.to_xml())
        self.launched += 1
        live = _Live(summary, machine)
        self._live[summary.id] = live
        log.info("%s", told)
        self._emit_state(live, self._live_summary(live))
        self._supervised(summary.id, lambda _: self._apply(live, actions))
        self._save_changed()  # at once: what its first tasks did

    def _refuse_while_stopping(self) -> None:
        """A new instance is new work, which a stopping jobd takes no more of, as it takes no submit: made now, its
        tasks would only be queued for the next start."""
        if self.engine.stopping:
            raise ShuttingDown("jobd is stopping and launches no new instance")

    def reload(self, config: Config) -> None:
        """A new configuration: executing instances enqueue their next tasks with it, as after a restart. A reload
        that removes what their tasks still to run name is not refused (the workflow file that named it may be
        gone with it), but logged: those tasks will be ABORTED."""
        for live in self._live.values():
            live.machine.reconfigure(set(config.queues), config.tasks, config.retry_schedules)
            self._warn_undefined(live, "after this reload")

    def _warn_undefined(self, live: _Live, when: str) -> None:
        missing = live.machine.undefined_names()
        if missing:
            log.warning(
                "instance=%d of workflow %s: its tasks still to run name %s, which the configuration no longer "
                "defines %s: they will be ABORTED when their turn comes",
                live.summary.id,
                live.summary.workflow,
                ", ".join(missing),
                when,
            )

    # -- reading ---------------------------------------------------------------------------------------------

    def summary(self, instance_id: int) -> InstanceSummary:
        live = self._live.get(instance_id)
        if live is not None:
            return self._live_summary(live)
        if instance_id in self._ended_unsaved:
            return self._ended_unsaved[instance_id][0]
        return self._stored(instance_id)[0]

    def document(self, instance_id: int) -> bytes:
        live = self._live.get(instance_id)
        if live is not None:
            return live.machine.to_xml()
        if instance_id in self._ended_unsaved:
            return self._ended_unsaved[instance_id][1]
        return self._stored(instance_id)[1]

    def _stored(self, instance_id: int) -> tuple[InstanceSummary, bytes]:
        found = self.store.instance(instance_id)
        if found is None:
            raise UnknownInstance(f"Unknown workflow instance {instance_id}", id=instance_id)
        return found

    def list_instances(self, where: InstanceFilter) -> tuple[list[InstanceSummary], int]:
        rows, total = self.store.list_instances(where)
        return [self.summary(row.id) if row.id in self._live else row for row in rows], total

    async def read_instance_starts(self, where: InstanceFilter) -> list[tuple[str, float]]:
        """The workflow and start time of each instance list_instances lists (neither changes as it runs)."""
        return await self.store.read_instance_starts(where)

    async def count_instance_starts(self, where: InstanceFilter, period: str) -> dict[tuple[str, str], int] | None:
        """The instances list_instances lists, counted by workflow and start period (Store.count_instance_starts)."""
        return await self.store.count_instance_starts(where, period)

    def running(self) -> list[InstanceSummary]:
        return [self._live_summary(live) for live in self._live.values()]

    def _live_summary(self, live: _Live) -> InstanceSummary:
        machine = live.machine
        return replace(live.summary, status=str(machine.status), errors=machine.errors, counters=machine.counters())

    def stop_retries(self) -> None:
        """jobd is stopping: no task is tried again now. Its submit would fail (jobd no longer takes jobs) and use
        up the try; the task keeps its `retry_at` in the document, and the next start arms it again."""
        self._stopping = True
        if self._short_hold is not None:  # the tasks held stay QUEUED without a job: the next start submits them
            self._short_hold.cancel()
            self._short_hold = None
        for live in self._live.values():
            for timer in live.retry_timers.values():
                timer.cancel()
            live.retry_timers.clear()

    def stop_waiters(self) -> None:
        """jobd is stopping: whoever waits for an instance to end (instance.wait) hears of it now."""
        self._waiters_stopped = True
        for live in self._live.values():
            for waiter in live.waiters:
                if not waiter.done():
                    waiter.set_exception(ShuttingDown("jobd is stopping: ask again once it is back"))

    async def wait(self, instance_id: int, timeout: float | None) -> InstanceSummary:
        """The instance once it has ended, or as it is when `timeout` seconds have passed."""
        live = self._live.get(instance_id)
        if live is None:
            return self.summary(instance_id)
        if self._waiters_stopped:  # stop_waiters() has run: nothing would answer this one (the stop goes on)
            raise ShuttingDown("jobd is stopping: ask again once it is back")
        waiter: asyncio.Future[InstanceSummary] = asyncio.get_running_loop().create_future()
        live.waiters[waiter] = None
        try:
            with contextlib.suppress(TimeoutError):
                # The summary the end handed over, not one read again now: with a short history.keep_days the
                # instance may have expired (its row deleted) before this task runs again.
                return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        finally:
            live.waiters.pop(waiter, None)
        return self.summary(instance_id)

    # -- commands --------------------------------------------------------------------------------------------

    def cancel(self, instance_id: int) -> InstanceSummary:
        """Cancel an instance, and answer once the cancel is saved. Should the save fail (a full disk), the cancel
        stays in effect and is saved as soon as the store takes writes, but StoreFailed tells the client that a stop
        or a crash before then would forget it."""
        live = self._live.get(instance_id)
        if live is not None:
            if not live.machine.cancelling:
                log.info("instance=%d cancel requested", instance_id)
                self._cancels_unsaved.add(instance_id)  # before _apply: the instance may end, and be saved, there
            self._apply(live, live.machine.cancel(self.clock()))
            for job_id in list(live.jobs.values()):  # a task's job waiting for its next try: retries are off now
                if self._waits_to_retry(job_id):
                    self._cancel_job(job_id)
        elif instance_id not in self._cancels_refused:
            summary = self.summary(instance_id)  # raises for an unknown id
            raise InvalidParams(f"instance {instance_id} has already ended ({summary.status})", id=instance_id)
        # Saved now, before its queued jobs are cancelled (that happens from the next pass on): a crash in between
        # must not find those jobs cancelled and the document not cancelling, which runs the tasks again.
        self._save_changed(only=instance_id)
        if instance_id in self._cancels_unsaved:
            self._cancels_refused.add(instance_id)
            raise StoreFailed(
                f"instance {instance_id} is cancelled, but jobd could not save that ({self._save_trouble}). The cancel "
                "is in effect: nothing more of it is queued, and the jobs of its queued tasks are cancelled as soon as "
                f"the store takes writes. It is saved then too (jobd tries every {RETRY:g}s), and a cancel asked again "
                "answers OK once it is. Should jobd stop or crash before then, its next start resumes the instance "
                "as it was last saved, not cancelled",
                id=instance_id,
                in_effect=True,
            )
        self._cancels_refused.discard(instance_id)
        return self.summary(instance_id)

    def kill_task(self, instance_id: int, pid: int) -> None:
        """Stop the running task whose process is `pid` (evQueue's killtask): its job is cancelled."""
        live = self._live.get(instance_id)
        if live is None:
            self.summary(instance_id)
            raise InvalidParams(f"instance {instance_id} has ended: no task runs", id=instance_id)
        for job_id in live.jobs.values():
            if self.engine.running_pid(job_id) == pid or self._waits_to_retry_after(job_id, pid):
                log.info("instance=%d killtask: stopping job=%d (pid %d)", instance_id, job_id, pid)
                self._cancel_job(job_id)
                return
        raise InvalidParams(f"no task of instance {instance_id} runs as pid {pid}", id=instance_id, pid=pid)

    def _waits_to_retry(self, job_id: int) -> bool:
        """Whether a task's job has had a try and waits for the next (its TOML task's `retry`): after its delay, or
        in its queue."""
        job = self.engine.jobs.get(job_id)
        return job is not None and job.attempts > 0 and job.state in (JobState.DELAYED, JobState.QUEUED)

    def _waits_to_retry_after(self, job_id: int, pid: int) -> bool:
        """Whether the job waits for its next try after a try that ran as `pid`: its task, still EXECUTING, shows
        that pid, which is what an evQueue client passes to killtask."""
        if not self._waits_to_retry(job_id):
            return False
        attempts = self.store.attempts(job_id)
        return bool(attempts) and attempts[-1].pid == pid

    def delete(self, instance_id: int) -> None:
        if instance_id in self._live:
            raise InvalidParams(f"instance {instance_id} is still executing; only ended instances can be deleted")
        self._stored(instance_id)
        self.store.delete_instance(instance_id)
        self._cancels_refused.discard(instance_id)

    # -- applying the machine's decisions --------------------------------------------------------------------

    def _apply(self, live: _Live, actions: list[Action]) -> None:
        retried: list[int] = []
        for action in actions:
            if isinstance(action, RunTask):
                self._run_task(live, action)
            elif isinstance(action, RetryLater):
                if live.replay is not None and self._retried_before(live, action.evqid):
                    retried.append(action.evqid)
                    continue
                if self._stopping:
                    continue  # armed again from the document's retry_at at the next start (stop_retries)
                loop = asyncio.get_running_loop()
                live.retry_timers[action.evqid] = loop.call_later(
                    max(0.0, action.delay), self._supervised, live.summary.id, self._retry_due, action.evqid
                )
            elif isinstance(action, DequeueTask):
                job_id = live.jobs.pop(action.evqid, None)
                if job_id is not None:
                    self._cancel_job(job_id)
            elif isinstance(action, InstanceFinished):
                self._finished(live, action)
                return
        for evqid in retried:
            self._apply(live, live.machine.retry_due(evqid, self.clock()))
        self._publish(live)
        self._save(live)

    def _retried_before(self, live: _Live, evqid: int) -> bool:
        """Whether the next try of a task to be retried has a job already: the first run's retry fell due before
        the crash, where the saved document did not say so yet. A replay tries it again at once, so that the job's
        end takes its place among the others' (_replay), rather than a timer's after them."""
        return self.engine.job_with_key(live.next_key(evqid)) is not None

    def _run_task(self, live: _Live, action: RunTask) -> None:
        instance_id = live.summary.id
        self._publish_task(live, action.evqid)  # QUEUED, before its job may start (and be told) in the submit
        try:
            spec = self._job_spec(live, action)
            watcher = _TaskWatcher(self, instance_id, action.evqid)
            [(job, _)] = self.engine.submit([spec], [0.0], watcher)
        except ShuttingDown:
            # jobd stops (an end told during the stop started this task): the task stays QUEUED without a job, and
            # the next start submits it (Instance.resubmit).
            log.info("instance=%d task %d: submitted at the next start (jobd is stopping)", instance_id, action.evqid)
            return
        except OutOfResources as short:
            # Its user cannot be looked up, or its script written, for want of a descriptor: no reason to fail the
            # task. It stays QUEUED without a job, as a job whose account cannot be looked up waits in its queue
            # (Engine._take_starts).
            log.warning("instance=%d task %d not submitted yet: %s", instance_id, action.evqid, short.message)
            self._hold_while_short(instance_id, action.evqid)
            return
        except Exception as error:
            failure = error if isinstance(error, JobdError) else store_failure(error)
            if failure is None:
                raise
            error = failure
            # The queue vanished in a reload, jobd is stopping, the disk is full...: the task fails to start.
            log.warning("instance=%d task %d cannot be submitted: %s", instance_id, action.evqid, error.message)
            result = TaskResult.lost(stderr=f"jobd could not submit the task: {error.message}\n".encode())
            self._apply(live, live.machine.task_ended(action.evqid, result, self.clock()))
            return
        live.jobs[action.evqid] = job.id
        live.machine.job_assigned(action.evqid, job.id)
        if job.state.finished:  # the key found this try's job from before a crash, and it has ended already
            if live.replay is not None:
                heapq.heappush(live.replay, (job.finished_at or 0.0, job.id, action.evqid))
            else:
                asyncio.get_running_loop().call_soon(
                    self._supervised, instance_id, self._task_finished, action.evqid, job
                )
            return
        if job.state is JobState.RUNNING and watcher.started is None:  # found by its key, already running
            self._task_started(instance_id, action.evqid, job, self.engine.running_pid(job.id) or 0)
        # A job the key found (queued, delayed or running since before a crash) was not created by this submit, so
        # nobody watches it yet; for a new one this changes nothing.
        self.engine.watch(job.id, watcher)

    def _hold_while_short(self, instance_id: int, evqid: int) -> None:
        """A task waits to be submitted until jobd can look its user up: all such tasks are tried again once, in
        order, RESOURCE_RETRY_DELAY from the first, as the engine holds job starts (Engine._hold_starts_while_short)."""
        self._held[instance_id, evqid] = None
        if self._short_hold is None and not self._stopping:
            self._short_hold = asyncio.get_running_loop().call_later(RESOURCE_RETRY_DELAY, self._end_short_hold)

    def _end_short_hold(self) -> None:
        self._short_hold = None
        held, self._held = self._held, {}
        for instance_id, evqid in held:
            if self._short_hold is not None:  # still short: the rest wait for the next hold to end, untried
                self._held[instance_id, evqid] = None
                continue
            live = self._live.get(instance_id)
            if live is not None:  # resubmit answers nothing for a task no longer QUEUED (its instance was cancelled)
                self._apply(live, live.machine.resubmit(evqid, self.clock()))

    def _job_spec(self, live: _Live, action: RunTask) -> JobSpec:
        config = self.engine.config
        argv = list(action.argv)
        if action.script is not None:
            argv.insert(0, self._write_script(live.summary.id, action.evqid, action.script))
        elif argv and not os.path.isabs(argv[0]) and action.task is None:
            # evQueue's tasks directory; a relative one is jobd's (the dev configuration's), not the job's working
            # directory (its wd, or the home of the user it runs as)
            argv[0] = os.path.join(os.path.abspath(config.daemon.tasks_directory), argv[0])
        defined = action.definition
        run_as = self._run_as(live, action)
        return JobSpec(
            command=tuple(argv),
            queue=action.queue,
            task=action.task,
            env=dict(action.env),
            stdin=action.stdin,
            working_dir=action.working_dir,
            timeout=action.timeout,
            kill_grace=defined.kill_grace if defined is not None else config.daemon.kill_grace,
            retry=action.retry or RetryPolicy(),
            max_output=defined.max_output if defined is not None else config.daemon.max_output,
            merge_stderr=action.merge_stderr,
            context=f"instance:{live.summary.id}",
            # The key makes the submit idempotent: after a crash between this commit and the next save of the
            # document (which records the job id in `tid`), resubmitting the task finds this job, not a twin.
            key=live.next_key(action.evqid),
            http=action.http,  # from the definition the machine built argv from (a reload may have changed it)
            submitted_by=live.summary.launched_by,
            run_as_uid=run_as[0],
            run_as_gid=run_as[1],
        )

    def _run_as(self, live: _Live, action: RunTask) -> tuple[int | None, int | None]:
        """A TOML task (task="NAME") runs as that task's user; a BINARY or SCRIPT task as the default user."""
        daemon = self.engine.config.daemon
        defined = action.definition
        if defined is None:
            return daemon.default_uid, daemon.default_gid
        if not defined.run_as_caller:
            return defined.uid, defined.gid
        launcher = live.summary.launched_by
        if launcher is None:  # launched by jobd itself (a schedule): there is no caller
            return daemon.default_uid, daemon.default_gid
        if launcher < 0:  # a remote client (a TCP login, an HTTP token of no local account): uid -1
            raise InsufficientRights(
                f'task {defined.name!r} runs as the user who launched the instance (run_as = "caller"), '
                "and a remote client launched it, which has no local user to run it as",
                missing="local user",
            )
        try:
            gid = users.primary_gid(launcher, _TASK_WAITS)
        except KeyError:
            raise InsufficientRights(
                f'task {defined.name!r} runs as the user who launched the instance (run_as = "caller"), '
                f"and uid {launcher} has no passwd entry to give its group",
                missing="local user",
            ) from None
        return launcher, gid

    def _write_script(self, instance_id: int, evqid: int, script: str) -> str:
        """The script's file, written; OutOfResources if jobd is short of descriptors (the task waits, _run_task, as
        for its user's look-up), JobdError if it cannot be written (the task fails to start, saying why: it was
        "an error in jobd", with a traceback, for a scripts directory jobd cannot use)."""
        path = os.path.join(self.scripts_dir, f"{instance_id}-{evqid}")
        try:
            with contextlib.suppress(FileExistsError):  # something else in its place: the open says what (ENOTDIR)
                os.makedirs(self.scripts_dir, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o700)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(script)
        except OSError as error:
            short = shortage(f"cannot write the script {path}", error, _TASK_WAITS)
            if short is None:
                raise JobdError(f"cannot write the script {path}: {error.strerror}") from None
            raise short from None
        return path

    def _retry_due(self, instance_id: int, evqid: int) -> None:
        live = self._live.get(instance_id)
        if live is not None:
            live.retry_timers.pop(evqid, None)
            self._apply(live, live.machine.retry_due(evqid, self.clock()))

    def _cancel_job(self, job_id: int) -> None:
        """Cancel a task's job, from the loop's next turn on (the caller may save the document first); it starts
        no try from now on (Engine.withhold)."""
        self.engine.withhold(job_id)

        async def cancel() -> None:
            told = False
            while True:
                try:
                    await self.engine.cancel(job_id)
                    return
                except (JobFinished, UnknownJob):
                    return
                except Exception as error:
                    if store_failure(error) is None and not isinstance(error, StoreFailed):
                        raise
                    # A full disk: the task's job must still go (its instance is over). Tried again while the
                    # store refuses writes, and only then.
                    if not told:
                        log.error("job=%d: cannot cancel the task's job: %s; retried every %gs", job_id, error, RETRY)
                        told = True
                    await asyncio.sleep(RETRY)  # no-poll-ok: a retry only while the disk refuses writes

        asyncio.get_running_loop().create_task(cancel())

    def _finished(self, live: _Live, finished: InstanceFinished) -> None:
        instance_id = live.summary.id
        now = self.clock()
        for timer in live.retry_timers.values():
            timer.cancel()
        del self._live[instance_id]
        document = live.machine.to_xml()
        ended = replace(
            live.summary,
            status=str(finished.status),
            errors=finished.errors,
            ended_at=now,
            counters={},
            tags=finished.tags,
            custom_attributes=finished.custom_attributes,
        )
        self._ended_unsaved[instance_id] = (ended, document)
        if finished.errors:
            self.ended_with_errors += 1
        self._save_changed()
        level = logging.INFO if finished.errors == 0 else logging.WARNING
        log.log(
            level,
            "instance=%d of workflow %s ended with %d errors",
            instance_id,
            live.summary.workflow,
            finished.errors,
        )
        if self._listeners:  # the last tasks' changes, then the end: what the store now holds (as instance.get)
            self._publish(live)
            self._emit_state(live, ended)
        for waiter in live.waiters:
            if not waiter.done():
                waiter.set_result(ended)
        self._remove_scripts(instance_id)

    def _remove_scripts(self, instance_id: int) -> None:
        """Remove the scripts of an instance that ended: nothing runs them any more."""
        self._scripts_left.add(instance_id)
        if self._scripts_retry is None:  # else they go with the others at the coming try
            self._remove_scripts_left()

    def _remove_scripts_left(self) -> None:
        self._scripts_retry = None
        try:
            names = os.listdir(self.scripts_dir)
        except FileNotFoundError:
            names = []
        except OSError as error:
            # No descriptor to list the directory with: an instance's end (a cancel, its last task's end) answered
            # INTERNAL_ERROR and logged a traceback, its scripts left behind. They are removed a little later (or, if
            # jobd stops first, by the next start).
            ids = ", ".join(map(str, sorted(self._scripts_left)))
            what = f"cannot remove the scripts of instance{'s' if len(self._scripts_left) > 1 else ''} {ids} now"
            short = shortage(what, error, f"tried again in {RESOURCE_RETRY_DELAY:g}s")
            if short is None:  # kept in _scripts_left: removed at the next listing that works
                self._scripts_unlisted(error)
                return
            log.warning("%s", short.message)
            if not self._closed:
                # no-poll-ok: tried again only while jobd is short of descriptors, as a held job start is
                self._scripts_retry = self.engine.loop.call_later(RESOURCE_RETRY_DELAY, self._remove_scripts_left)
            return
        for name in names:
            if WORKFLOW_SCRIPT_NAME.fullmatch(name) and int(name.split("-")[0]) in self._scripts_left:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.scripts_dir, name))
        self._scripts_left.clear()

    def _scripts_unlisted(self, error: OSError) -> None:
        """Say that the scripts directory cannot be listed for a reason of its own, not a passing shortage: a file,
        or a link that leads nowhere jobd can list, in its place, or a mode that shuts jobd out. It failed jobd's
        start ("not starting: [Errno 20] Not a directory: …", naming neither what jobd did nor what to do), and the
        end of every instance after it. The first time for each cause, then at most once a minute."""
        due = _unlisted.due(error.strerror)
        if due is None:
            return
        held, seconds = due
        more = f" ({held} more times in the last {seconds:.0f} s)" if held else ""
        log.error(
            "cannot list %s, where SCRIPT tasks' scripts are written: %s; the scripts of ended instances are left "
            "there, and SCRIPT tasks cannot run, until it is a directory jobd can list and write to (mode 0700, "
            "jobd's own)%s",
            self.scripts_dir,
            error.strerror,
            more,
        )

    def _remove_scripts_of_ended(self) -> None:
        """At a start: remove the scripts of every instance that is not executing, left by a stop while jobd was short
        of descriptors (or by a crash between an instance's end and the removal of its scripts)."""
        try:
            names = os.listdir(self.scripts_dir)
        except FileNotFoundError:
            return
        except OSError as error:
            short = shortage("cannot look for scripts left of ended instances", error, "the next start will")
            if short is None:  # jobd starts all the same: only those scripts are left, and SCRIPT tasks fail
                self._scripts_unlisted(error)
                return
            log.warning("%s", short.message)
            return
        self._scripts_left = {
            int(name.split("-")[0]) for name in names if WORKFLOW_SCRIPT_NAME.fullmatch(name)
        } - self._live.keys()
        if self._scripts_left:
            log.info("removing the scripts left of ended instances %s", ", ".join(map(str, sorted(self._scripts_left))))
            self._remove_scripts_left()

    def _save(self, live: _Live) -> None:
        """Save the document once this pass of the event loop is over, however many events changed it, or once its
        SAVE_SPACING after the last save is over.

        Losing the latest changes to a crash is safe: a restart reconciles every task with its job (a task whose job
        has ended meanwhile is ended from the job's record; one started again finds its job by its idempotency key),
        so the saved document may lag behind. An instance's end is saved at once (_finished), and at a stop every
        document is (save_all).
        """
        self._unsaved.add(live.summary.id)
        if self._save_retry is None:  # else the store refuses writes: the next try (_save_again) saves it
            self._save_by(0.0 if live.first_error_unsaved else live.save_after)

    def _save_by(self, when: float) -> None:
        """Have _save_changed run at loop time `when`, or at the end of this pass if that time has come."""
        loop = asyncio.get_running_loop()
        due = when if when > loop.time() else 0.0
        if self._save_handle is not None:
            if self._save_when <= due:
                return
            self._save_handle.cancel()
        self._save_when = due
        self._save_handle = loop.call_at(due, self._save_changed) if due else loop.call_soon(self._save_changed)

    def save_all(self) -> None:
        """jobd is stopping: every changed document now, whatever its SAVE_SPACING."""
        self._save_changed(spaced=False)

    def close(self) -> None:
        """jobd's store closes: every changed document is saved now, and nothing is done from here on. What the loop
        may still hold for the instances (a job's end) is left to the next start, which reconciles each task with
        its job's record, as after a crash."""
        self.save_all()
        self._closed = True
        # Scripts still left (jobd short of descriptors until the end) are removed by the next start (recover).
        for handle in (self._save_handle, self._save_retry, self._scripts_retry):
            if handle is not None:
                handle.cancel()

    def _save_changed(self, *, spaced: bool = True, only: int | None = None) -> None:
        """Save the ended instances waiting to be, and the changed ones whose spacing is over (all of them without
        `spaced`; with `only`, that one now and no other changed one)."""
        if self._closed:
            return
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        loop = asyncio.get_running_loop()
        try:
            for instance_id, (ended, document) in sorted(self._ended_unsaved.items()):
                self.store.save_instance(
                    instance_id,
                    ended.status,
                    ended.errors,
                    ended.ended_at,
                    ended.tags,
                    document,
                    custom_attributes=ended.custom_attributes,
                )
                del self._ended_unsaved[instance_id]
                self._unsaved.discard(instance_id)
                self._cancels_unsaved.discard(instance_id)
                self._saved_ends(instance_id)
            for instance_id in sorted(self._unsaved) if only is None else [only]:
                live = self._live.get(instance_id)
                if live is not None:
                    at_once = not spaced or instance_id == only or live.first_error_unsaved
                    if live.save_after > loop.time() and not at_once:
                        continue
                    started = loop.time()
                    machine = live.machine
                    self.store.save_instance(
                        instance_id, str(machine.status), machine.errors, None, (), machine.to_xml()
                    )
                    saved = loop.time()
                    live.save_after = saved + (saved - started) * SAVE_SPACING
                    live.saved_with_errors = machine.errors > 0
                    self._cancels_unsaved.discard(instance_id)
                    self._saved_ends(instance_id)
                self._unsaved.discard(instance_id)
        except Exception as error:
            if store_failure(error) is None:
                raise
            # A full disk: the instances go on in memory; what is unsaved is saved again in RETRY seconds (a wake-up
            # that exists only while the store refuses writes). A crash meanwhile resumes them from the last save.
            if not self._save_failing:
                log.error("workflow instances cannot be saved: %s; trying again every %gs", error, RETRY)
                self._save_failing = True
            self._save_trouble = str(error)
            if self._save_retry is None:
                self._save_retry = asyncio.get_running_loop().call_later(RETRY, self._save_again)
            return
        if self._save_failing:
            log.info("workflow instances are saved again")
            self._save_failing = False
        spaced_out = [self._live[number].save_after for number in self._unsaved if number in self._live]
        if spaced_out:
            self._save_by(min(spaced_out))

    def _saved_ends(self, instance_id: int) -> None:
        ends = self._ends_unsaved.pop(instance_id, None)
        if ends:
            self.engine.history.release(ends)

    def _save_again(self) -> None:
        self._save_retry = None
        self._save_changed()

    # -- what the engine tells about the jobs of tasks (through _TaskWatcher) ------------------------------

    def _task_started(self, instance_id: int, evqid: int, job: Job, pid: int) -> None:
        live = self._live.get(instance_id)
        if live is None:
            return
        actions = live.machine.task_started(evqid, job.id, self.clock())
        task = live.machine.task(evqid)
        if task is not None and task.get("status") == NodeStatus.EXECUTING:
            task.set("pid", str(pid))  # what evQueue clients pass to killtask
        self._apply(live, actions)

    def _task_progress(self, instance_id: int, evqid: int, job: Job) -> None:
        live = self._live.get(instance_id)
        if live is not None:
            live.machine.task_progress(evqid, job.progress)
            self._publish_task(live, evqid)

    def _task_finished(self, instance_id: int, evqid: int, job: Job) -> None:
        live = self._live.get(instance_id)
        if live is None or live.jobs.get(evqid) != job.id:  # the instance ended, or a cancel dropped the task
            self.engine.history.release([job.id])
            return
        del live.jobs[evqid]
        # Held in the history until the document is saved with this end (the engine holds a job it tells a watcher
        # of; one a restart replays, it did not).
        self.engine.history.hold(job.id)
        self._ends_unsaved.setdefault(instance_id, []).append(job.id)
        result = self._result(job, parsed=live.machine.parses_output(evqid))
        if result.output_missing:
            log.error("instance=%d task %d: %s (%s)", instance_id, evqid, OUTPUT_MISSING, result.output_missing)
        self._apply(live, live.machine.task_ended(evqid, result, self.clock()))

    def retries_off(self, instance_id: int) -> bool:
        """A task's job gets no more tries by its TOML task's `retry` once its instance is being cancelled, as
        evQueue's retries are turned off then: a try that fails ends the task with that try's result."""
        live = self._live.get(instance_id)
        return live is not None and live.machine.cancelling

    def _result(self, job: Job, *, parsed: bool) -> TaskResult:
        """How the job of a task ended; with `parsed` (its stdout is XML to parse), also whether that stdout is
        whole, from the job's record."""
        missing: list[str] = []
        streams: dict[str, Any] = {
            # An XML output is parsed from up to MAX_DOCUMENT_XML bytes (one more tells a larger one); the document
            # keeps at most MAX_DOCUMENT_TEXT bytes of each stream as text.
            "stdout": self._read_stream(job, "stdout", MAX_DOCUMENT_XML, missing),
            "stderr": self._read_stream(job, "stderr", MAX_DOCUMENT_TEXT, missing),
            "log": self._read_stream(job, "log", MAX_DOCUMENT_TEXT, missing).decode("utf-8", "replace"),
            "started_at": job.started_at,
            "ended_at": job.finished_at,
            "output_missing": "; ".join(missing),
        }
        streams["stdout_cut"] = self._stdout_cut(job) if parsed else None
        if self._stopped_by_jobd(job):
            return TaskResult.stopped(job.signal, **streams)
        if job.exit_code is not None:
            return TaskResult.exited(job.exit_code, **streams)
        if job.signal is not None:
            return TaskResult.killed(job.signal, **streams)
        # Never ran to an exit: cannot be started, cancelled while queued, or lost in a crash of jobd.
        why = f"{job.error or job.state}\n".encode()
        streams["stderr"] += why
        return TaskResult.lost(**streams)

    def _stopped_by_jobd(self, job: Job) -> bool:
        """Whether jobd ended the job's last try while it ran: killtask (a cancel of the job) or its time limit. A
        job cancelled while it waited for its next try (its TOML task's `retry`) ends with that try's result."""
        if job.state is JobState.TIMED_OUT:
            return True
        if job.state is not JobState.CANCELLED or job.attempts == 0:
            return False
        attempts = self.store.attempts(job.id)  # only for a cancelled job: a query no other end pays for
        return bool(attempts) and attempts[-1].outcome is Outcome.KILLED

    def _stdout_cut(self, job: Job) -> OutputCut | None:
        """Why the last attempt's stdout was cut, as its record says; None if it was not."""
        attempts = self.store.attempts(job.id)
        if not attempts or "stdout" not in (attempts[-1].cut_streams or ()):
            return None
        # Bytes are dropped for max_output only once that much is kept: fewer kept means a write failed first.
        return OutputCut.MAX_OUTPUT if attempts[-1].stdout_bytes >= job.spec.max_output else OutputCut.UNWRITTEN

    def _read_stream(self, job: Job, stream: str, most: int, missing: list[str]) -> bytes:
        """The stream of the job's last attempt: at most `most` bytes and one more (a longer one is cut later). No
        file is no output, unless jobd wrote one (an administrator removed it while the task ran): why is added to
        `missing`, and the task ends in error (WorkflowMachine.task_ended), not as one that printed nothing."""
        if job.attempts == 0:
            return b""
        try:
            data, _ = self.engine.read_attempt_output(job.id, job.attempts, stream, 0, most + 1)
        except OutputMissing as error:
            missing.append(error.message)
            return b""
        return data

    # -- events ----------------------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[InstanceEvent], None]) -> Callable[[], None]:
        self._listeners[listener] = None
        return lambda: self._listeners.pop(listener, None)

    def _emit(self, event: InstanceEvent) -> None:
        for listener in list(self._listeners):
            listener(event)

    def _emit_state(self, live: _Live, summary: InstanceSummary) -> None:
        if self._listeners:
            if live.summary.id in self._live:
                self._measure(live, mark=False)  # the progress as it stands; the next _publish tells of the tasks
            data = {"instance": summary.to_json(), "progress": self._progress(live)}
            self._emit(InstanceEvent("instance.state", live.summary.id, live.summary.workflow, data))

    def _progress(self, live: _Live) -> int:
        """The instance's progress, 0–100: the mean of its tasks' (see _weight); 100 once it has ended. Tasks a
        loop adds as it expands count from then on, so the figure can go down. The tasks not reached yet are not in
        `weights`: those that never will be weigh 100, the others 0."""
        if live.summary.id not in self._live:
            return 100
        machine = live.machine
        count = machine.task_count
        return (live.weight_sum + 100 * machine.never_run) // count if count else 0

    def _publish(self, live: _Live, *, quiet: bool = False) -> None:
        """Tell subscribers of every task changed since they were last told (one instance.progress each, in document
        order).

        The tasks the machine changed are looked at, and only they (_follow); nothing at all is done when nobody
        listens (what was last told is then stale, and a later subscriber hears each task once as it is now: one
        walk over the whole document, _measure). With `quiet`, only remember the tasks as they are.
        """
        changed = live.machine.take_changed_tasks()
        if not self._listeners and not quiet:
            live.current = False
            return
        if live.current and len(changed) <= _FOLLOW_AT_MOST:
            told = self._follow(live, changed)
        else:
            told = self._measure(live, mark=True)
        for task in told:
            if not quiet:
                self._emit_task(live, task)

    def _follow(self, live: _Live, changed: list[etree._Element]) -> list[etree._Element]:
        """_measure for the tasks an event changed, when the rest are as last shown: their weights, and those
        whose key changed (shown from now on), in document order."""
        told: list[etree._Element] = []
        for task in changed:
            evqid = task.get("evqid")
            if evqid is None or live.machine.task(int(evqid)) is not task:  # not reached, or a loop's original
                continue
            weight = _weight(task, False)  # a task reached is never under a job that will not run
            live.weight_sum += weight - live.weights.get(evqid, 0)
            live.weights[evqid] = weight
            key = _task_key(task)
            if live.shown.get(evqid) != key:
                live.shown[evqid] = key
                told.append(task)
        told.sort(key=_document_position)
        return told

    def _measure(self, live: _Live, *, mark: bool) -> list[etree._Element]:
        """Recompute the tasks' parts of the progress; the tasks changed since last shown (with `mark`, they are
        shown from now on).

        `live.measured` holds the attributes of the tasks that were as shown at the last walk: such a task whose
        attributes are all the same has neither changed nor been weighed differently (a numbered task is never put
        under a skipped job afterwards), so most tasks cost one read of their attributes. A task not reached yet
        has no status: it weighs 100 under a job that will not run, else 0.
        """
        changed: list[etree._Element] = []
        measured: dict[str, Sequence[str | bytes]] = {}
        weights: dict[str, int] = {}
        before, weighed, shown = live.measured, live.weights, live.shown
        for task, dead in live.machine.task_nodes():
            evqid = task.get("evqid")
            if evqid is None:  # not reached: counted by the machine (Instance.never_run)
                continue
            attributes = task.values()
            if before.get(evqid) == attributes and evqid in weighed:
                weights[evqid] = weighed[evqid]
                measured[evqid] = attributes
                continue
            weights[evqid] = _weight(task, dead)
            key = _task_key(task)
            if shown.get(evqid) != key:
                changed.append(task)
                if not mark:
                    continue  # not as shown: weighed again next time
                shown[evqid] = key
            measured[evqid] = attributes
        live.measured, live.weights = measured, weights
        live.weight_sum = sum(weights.values())
        live.current = mark or not changed
        return changed

    def _publish_task(self, live: _Live, number: int) -> None:
        """_publish for a change to one task that changes nothing else (a progress line, a task queued)."""
        task = live.machine.task(number)
        evqid = str(number)
        if not self._listeners or task is None or evqid not in live.weights or not live.current:
            self._publish(live)  # and tasks that changed unheard are told first, in document order
            return
        key = _task_key(task)
        if live.shown.get(evqid) == key:
            return
        live.shown[evqid] = key
        weight = _weight(task, False)  # queued or running: no job above it was skipped
        live.weight_sum += weight - live.weights[evqid]
        live.weights[evqid] = weight
        self._emit_task(live, task)

    def _emit_task(self, live: _Live, task: etree._Element) -> None:
        summary = live.summary
        data = {"id": summary.id, "workflow": summary.workflow, "progress": self._progress(live)}
        data["task"] = task_json(task)
        self._emit(InstanceEvent("instance.progress", summary.id, summary.workflow, data))

    # -- start-up --------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Resume every instance that was executing when jobd stopped (after the engine has recovered its jobs)."""
        now = self.clock()
        for summary, document in self.store.executing_instances():
            try:
                self._resume(summary, document, now)
            except Exception as error:  # that instance ends in error; jobd still starts, and so do the others
                if summary.id in self._live:  # a bug in one of its steps
                    self._broken(summary.id, error)
                    continue
                if isinstance(error, JobdError):  # its document does not fit the configuration any more
                    log.error("instance=%d cannot be resumed: %s", summary.id, error.message)
                else:
                    log.error("instance=%d cannot be resumed (an error in jobd): %r", summary.id, error, exc_info=error)
                self._end_unresumed(summary, document, now)
        self._remove_scripts_of_ended()

    def _restore_script(self, live: _Live, evqid: int, job: Job) -> None:
        """Write again the script of a task whose job has yet to run (queued, or to be tried again) if it is gone.
        A database restored from a copy (jobctl backup) brings back instances that ended after the copy was taken,
        and an instance's end removed its scripts: the job failed, "cannot start ...: No such file or directory"."""
        path = os.path.join(self.scripts_dir, f"{live.summary.id}-{evqid}")
        script = live.machine.script(evqid)
        if script is None or job.spec.command[:1] != (path,) or os.path.lexists(path):
            return
        log.warning("instance=%d task %d: its script %s was missing; written again", live.summary.id, evqid, path)
        self._write_script(live.summary.id, evqid, script)

    def _end_unresumed(self, summary: InstanceSummary, document: bytes, now: float) -> None:
        self.store.save_instance(summary.id, str(InstanceStatus.TERMINATED), summary.errors + 1, now, (), document)
        self.ended_with_errors += 1
        self._remove_scripts(summary.id)  # as at any instance's end: nothing runs them any more

    def _resume(self, summary: InstanceSummary, document: bytes, now: float) -> None:
        config = self.engine.config
        machine, pending = Instance.restore(
            document, queues=set(config.queues), tasks=config.tasks, retry_schedules=config.retry_schedules
        )
        replay: list[tuple[float, int, int]] = []
        live = _Live(summary, machine, replay=replay)
        self._live[summary.id] = live
        self._publish(live, quiet=True)  # subscribers hear what changes from here on
        actions: list[Action] = []
        for task in pending:
            if task.status is NodeStatus.TERMINATED:  # waiting for a retry
                actions.append(RetryLater(task.evqid, task.retry_wait(now), task.retry_at or now))
                continue
            job = self._job_or_none(task.tid)
            if job is None:
                if task.status is NodeStatus.QUEUED:
                    actions += machine.resubmit(task.evqid, now)
                else:
                    actions += machine.task_ended(task.evqid, TaskResult.lost(), now)
            elif job.state.finished:
                live.jobs[task.evqid] = job.id
                heapq.heappush(replay, (job.finished_at or 0.0, job.id, task.evqid))
            else:
                live.jobs[task.evqid] = job.id
                self._restore_script(live, task.evqid, job)
                self.engine.watch(job.id, _TaskWatcher(self, summary.id, task.evqid))
                if job.state is JobState.RUNNING and task.status is NodeStatus.QUEUED:
                    actions += machine.task_started(task.evqid, job.id, now)
        log.info("instance=%d of workflow %s resumed", summary.id, summary.workflow)
        self._warn_undefined(live, "at this start")
        self._apply(live, actions)
        self._replay(live)
        if machine.cancelling:
            self._cancel_dequeued(live)

    def _cancel_dequeued(self, live: _Live) -> None:
        """A cancel aborts the queued tasks and cancels their jobs from the next pass of the loop on: after a crash
        in between, those jobs still wait in their queues. They are cancelled now, before the queues start jobs
        (found by the task their key names, which is ABORTED)."""
        prefix = _key_prefix(live.summary.id)
        unfinished = (JobState.DELAYED, JobState.QUEUED, JobState.RUNNING)
        where = JobFilter(states=unfinished, context=f"instance:{live.summary.id}", limit=1000)
        while page := self.engine.list_jobs(where):
            for job in page:
                evqid = (job.spec.key or "").removeprefix(prefix).partition(":")[0]
                task = live.machine.task(int(evqid)) if evqid.isdigit() else None
                if task is not None and task.get("status") == NodeStatus.ABORTED and job.id not in live.jobs.values():
                    log.info(
                        "instance=%d task %s: cancelling job=%d (the instance was cancelled)",
                        live.summary.id,
                        evqid,
                        job.id,
                    )
                    self._cancel_at_start(job)
            where = replace(where, before_id=page[-1].id)

    def _cancel_at_start(self, job: Job) -> None:
        if job.state is JobState.RUNNING:  # not after the engine's recovery; but should it be, as any other
            self._cancel_job(job.id)
            return
        try:
            self.engine.cancel_waiting(job.id)
        except Exception as error:
            if store_failure(error) is None and not isinstance(error, StoreFailed):
                raise
            self._cancel_job(job.id)  # a full disk: tried again while the store refuses writes

    def _replay(self, live: _Live) -> None:
        """Tell the machine of the jobs that ended while the saved document did not say so yet, in the order they
        ended, and of those their ends lead to (found by their keys), until none is left.

        The order matters: a task's end numbers the nodes it starts (subjobs, a loop's copies), and a task's key
        holds its number. Told in another order than the first run, the same tasks would get other numbers, and a
        key could find another task's job. Each job's end is recorded (finished_at) before the machine hears of it,
        and a job that a task's end starts ends after it, so the order of the records is the order of the first run.
        """
        pending = live.replay
        assert pending is not None
        try:
            while pending and live.summary.id in self._live:
                _, job_id, evqid = heapq.heappop(pending)
                job = self._job_or_none(job_id)
                if job is not None:
                    self._task_finished(live.summary.id, evqid, job)
        finally:
            live.replay = None  # from now on, a job its key finds ended is told at once (_run_task)

    def _supervised(self, instance_id: int, step: Callable[..., None], *args: Any) -> None:
        """One step of an instance, on a job's news or a task's retry falling due. An exception there is a bug in
        jobd: it ends that instance in error (its jobs cancelled, its waiters answered) rather than leaving it
        executing for good."""
        if self._closed:  # the news waits for the next start (close())
            return
        try:
            step(instance_id, *args)
        except Exception as error:
            self._broken(instance_id, error)

    def _broken(self, instance_id: int, error: Exception) -> None:
        log.error("instance=%d ended by an error in jobd (please report it): %r", instance_id, error, exc_info=error)
        live = self._live.get(instance_id)
        if live is None:
            return
        for job_id in live.jobs.values():
            self._cancel_job(job_id)
        live.jobs.clear()
        errors = live.machine.errors + 1
        live.machine.ended_by_jobd(self.clock(), errors)  # its document says what its summary says
        self._finished(live, InstanceFinished(InstanceStatus.TERMINATED, errors))

    def _job_or_none(self, job_id: int | None) -> Job | None:
        if job_id is None:
            return None
        try:
            return self.engine.get(job_id)
        except UnknownJob:
            return None


@dataclass
class _TaskWatcher:
    """The engine's JobWatcher for the job of one task: knows which instance and task the job runs. Each call is a
    step of that instance, run under Instances._supervised."""

    instances: Instances
    instance_id: int
    evqid: int
    started: int | None = None  # pid, once the job has started
    holds_history = True  # until the instance's document is saved with the job's end (Instances._saved_ends)

    def job_started(self, job: Job, pid: int) -> None:
        self.started = pid
        self.instances._supervised(self.instance_id, self.instances._task_started, self.evqid, job, pid)

    def job_progress(self, job: Job) -> None:
        self.instances._supervised(self.instance_id, self.instances._task_progress, self.evqid, job)

    def job_finished(self, job: Job) -> None:
        self.instances._supervised(self.instance_id, self.instances._task_finished, self.evqid, job)

    def retries_off(self) -> bool:
        return self.instances.retries_off(self.instance_id)
