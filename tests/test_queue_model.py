"""A randomized, model-based test of jobd's queue semantics against a real daemon.

A reference model in the test holds what every queue must hold (ready jobs in scheduler order, delayed and running
jobs, concurrency, scheduler, pause, removed-and-draining) and which job must start next. Random operations drive
the daemon: submits (single and batches; random priorities, delays, keys, retry policies; refused ones), cancels of
waiting and running jobs (some ignore SIGTERM: SIGKILL after their kill_grace), pause and resume, reloads that
change a queue's concurrency, scheduler or `paused` key or remove and add back a queue, restarts of jobd (with the
configuration edited while it is stopped, at times), and ends of running jobs with an exit code the test chooses
(retried as their policy says, at once or after a short delay).

Every job blocks reading a FIFO of the test's (`read code < FIFO; exit $code`), so a running job ends only when the
test writes its exit code there, or when a cancel or a stop ends it. Starts are observed through events.subscribe on the
same connection the operations are sent on: jobd writes events and replies to one connection in the order it
handled them, so the stream is one total order of what happened, and the model follows it event by event. Delays
are real time (kept short): their ends are events like any other, checked when they come. An operation that
changes what may start (pause, resume, a reload, a cancel of a waiting job) took effect somewhere among the events
that came before its reply: the model accepts the first place where everything fits.

After each operation a ping's reply marks a moment at which jobd has done everything the operation caused; then no
queue may have a free slot and a ready job, and queue.list and job.list (at times with a random filter, page by
page) must equal the model. At the end, every
job's state and attempts are checked, and `jobctl queues`, daemon.status and systemd's STATUS= line against the
model.

The seed and the operation log are printed on failure; JOBD_MODEL_SEEDS="1-500" (or "7,12") and
JOBD_MODEL_STEPS=N run more, outside the suite's default few seeds.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, in_user_namespace
from recovery.support import Pump, attach, start, stop_pumps, terminate

from jobd.client import Client, RemoteError, Reply

QUEUE_NAMES = ("a", "b", "c")
Definition = tuple[int, str, bool]  # a queue's concurrency, scheduler and `paused` in the configuration file
PRIORITIES = (0, 1, 5, 1024, 1024, 4294967295)
EVENT_WAIT = 30.0  # seconds an awaited event may take on a loaded machine (a deadline, never a pace)
# The job: blocks until the test writes its exit code into the FIFO named by $0.
BLOCKER = 'read code < "$0" && exit "$code"'
FINAL = ("succeeded", "failed", "timed_out", "cancelled")
ALL_STATES = ["delayed", "queued", "running", "succeeded", "failed", "timed_out", "cancelled"]


class ModelError(AssertionError):
    """jobd did something the model does not allow."""


@dataclass
class MQueue:
    name: str
    concurrency: int = 1
    scheduler: str = "priority"
    file_paused: bool = False  # its `paused` key
    paused: bool = False
    closed: bool = False  # removed from the configuration, still draining
    ready: set[int] = field(default_factory=set)
    running: set[int] = field(default_factory=set)
    delayed: set[int] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.ready or self.running or self.delayed)


@dataclass
class MJob:
    id: int
    queue: str
    priority: int
    state: str
    fifo: Path
    retry_times: int
    retry_delay: float
    key: str | None
    retry_codes: tuple[int, ...] = ()  # its retry's on_exit_codes (empty: any failure is retried)
    stubborn: bool = False  # it ignores SIGTERM: a cancel or a stop ends it with SIGKILL after its kill_grace
    timeout: float | None = None  # its time limit: it ends by it (the test never ends it), or by a cancel
    announced: bool = False  # its first job.state event came
    attempts: list[tuple[str, int | None, int | None]] = field(default_factory=list)  # (outcome, exit code, signal)
    ending: int | str | None = None  # what the test made its running attempt end with: an exit code, or "cancel"

    def stop_signal(self) -> int | None:
        """The signal that ends it when jobd stops it. None: SIGKILL, or SIGTERM when that came before the job's
        shell had set its trap (the job had just started)."""
        return None if self.stubborn else 15


class Model:
    def __init__(self) -> None:
        self.queues: dict[str, MQueue] = {"default": MQueue("default")}
        self.jobs: dict[int, MJob] = {}
        self.keys: dict[str, int] = {}
        self.trace: list[str] = []  # the events, for the operation log

    # -- views ------------------------------------------------------------------------------------------------

    def order(self, queue: MQueue, job_id: int) -> tuple[int, ...]:
        return (job_id,) if queue.scheduler == "fifo" else (self.jobs[job_id].priority, job_id)

    def next_ready(self, queue: MQueue) -> int | None:
        return min(queue.ready, key=lambda job_id: self.order(queue, job_id), default=None)

    def queue_list(self) -> list[dict[str, Any]]:
        return [
            {
                "name": q.name,
                "concurrency": q.concurrency,
                "scheduler": q.scheduler,
                "paused": q.paused,
                "closed": q.closed,
                "queued": len(q.ready),
                "delayed": len(q.delayed),
                "running": len(q.running),
            }
            for q in sorted(self.queues.values(), key=lambda q: q.name)
        ]

    def unfinished(self) -> dict[int, str]:
        return {j.id: j.state for j in self.jobs.values() if j.state not in FINAL}

    def pending_timers(self) -> bool:
        """Whether something will change by itself: a delay or a running job's time limit."""
        return any(j.state == "delayed" or (j.state == "running" and j.timeout) for j in self.jobs.values())

    def check_settled(self) -> None:
        """At a moment when jobd has done all it had to: no queue leaves a slot free while a job is ready."""
        for q in self.queues.values():
            if q.ready and not q.paused and len(q.running) < q.concurrency:
                raise ModelError(
                    f"queue {q.name}: {len(q.running)} of {q.concurrency} running, not paused, yet ready jobs "
                    f"{sorted(q.ready)} wait"
                )

    # -- changes ----------------------------------------------------------------------------------------------

    def _place(self, job: MJob, state: str) -> None:
        q = self.queues[job.queue]
        for group in (q.ready, q.running, q.delayed):
            group.discard(job.id)
        job.state = state
        if state == "queued":
            q.ready.add(job.id)
        elif state == "running":
            q.running.add(job.id)
        elif state == "delayed":
            q.delayed.add(job.id)
        if state in FINAL:
            self._forget_if_drained(q)

    def _forget_if_drained(self, q: MQueue) -> None:
        if q.closed and q.empty():
            del self.queues[q.name]

    def submitted(self, jobs: list[MJob]) -> None:
        for job in jobs:
            self.jobs[job.id] = job
            if job.key is not None:
                self.keys[job.key] = job.id
            self._place(job, job.state)

    def event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "job.state":
            return
        seen = event["job"]
        job_id, state = seen["id"], seen["state"]
        self.trace.append(f"event: job {job_id} {state}")
        job = self.jobs.get(job_id)
        if job is None:
            raise ModelError(f"job.state {state} of job {job_id}, which the model does not know")
        if seen["queue"] != job.queue:
            raise ModelError(f"job {job_id}: event says queue {seen['queue']}, submitted to {job.queue}")
        if not job.announced:
            job.announced = True
            if state != job.state:
                raise ModelError(f"job {job_id}: first event {state}, submitted {job.state}")
            return
        q = self.queues.get(job.queue)
        if q is None:
            raise ModelError(f"job {job_id}: {state}, in queue {job.queue} that the model no longer has")
        if seen["priority"] != job.priority:
            raise ModelError(f"job {job_id}: event says priority {seen['priority']}, submitted {job.priority}")
        if state == "running":
            self._start(q, job)
            if seen["attempts"] != len(job.attempts) + 1:
                raise ModelError(f"job {job_id} started as attempt {seen['attempts']}, after {job.attempts}")
        elif job.state == "running":
            self._end(job, state, seen)
        elif state == "queued":
            if job.state != "delayed":
                raise ModelError(f"job {job_id}: queued from {job.state}")
            self._place(job, "queued")
        elif state == "cancelled":
            if job.ending != "cancel":
                raise ModelError(f"job {job_id}: cancelled from {job.state}, never cancelled by the test")
            job.ending = None
            self._place(job, "cancelled")
        else:
            raise ModelError(f"job {job_id}: {job.state} -> {state}")

    def _start(self, q: MQueue, job: MJob) -> None:
        if job.state != "queued":
            raise ModelError(f"job {job.id} started from {job.state}")
        if q.paused:
            raise ModelError(f"job {job.id} started in paused queue {q.name}")
        if len(q.running) >= q.concurrency:
            raise ModelError(
                f"job {job.id} started in queue {q.name} whose {q.concurrency} slots run {sorted(q.running)}"
            )
        best = self.next_ready(q)
        if best != job.id:
            ranked = sorted(q.ready, key=lambda job_id: self.order(q, job_id))
            raise ModelError(
                f"job {job.id} started in queue {q.name} ({q.scheduler}) before job {best}; ready by the model, "
                f"in order: {[(i, self.jobs[i].priority) for i in ranked]} (id, priority)"
            )
        self._place(job, "running")

    def _end(self, job: MJob, state: str, seen: dict[str, Any]) -> None:
        ending = job.ending
        job.ending = None
        if ending is None and job.timeout is None:
            raise ModelError(f"job {job.id} ended ({state}) though the test did not end it")
        signal = None
        if ending == "cancel":
            expected, outcome, code, signal = "cancelled", "killed", None, job.stop_signal()
            if job.timeout is not None:
                outcome = "stopped"  # killed, or timed_out: its time limit may have fallen just before the cancel
        elif ending is None:  # its time limit; timeouts are retried whatever on_exit_codes says
            outcome, code, signal = "timed_out", None, job.stop_signal()
            tries = 1 + sum(1 for o, _, _ in job.attempts if o in ("failed", "timed_out"))
            retried = "delayed" if job.retry_delay > 0 else "queued"
            expected = retried if tries <= job.retry_times else "timed_out"
        elif ending == 0:
            expected, outcome, code = "succeeded", "succeeded", 0
        else:
            assert isinstance(ending, int)
            outcome, code = "failed", ending
            tries = 1 + sum(1 for o, _, _ in job.attempts if o in ("failed", "timed_out"))
            retried = "delayed" if job.retry_delay > 0 else "queued"
            retryable = not job.retry_codes or code in job.retry_codes
            expected = retried if tries <= job.retry_times and retryable else "failed"
        if state != expected:
            raise ModelError(f"job {job.id}: ended as {state}, the model expected {expected} (ending {ending!r})")
        if seen.get("exit_code") != code:
            raise ModelError(f"job {job.id}: exit code {seen.get('exit_code')}, written {code}")
        if signal is None and outcome != "succeeded" and code is None and seen.get("signal") in (9, 15):
            signal = seen["signal"]
        if seen.get("signal") != signal:
            raise ModelError(f"job {job.id}: ended by signal {seen.get('signal')}, the model expected {signal}")
        job.attempts.append((outcome, code, signal))
        self._place(job, state)

    def restarted(self) -> None:
        """jobd stopped (SIGTERM) and started again on its state (a configuration changed meanwhile is applied
        first, by reload()). Its stop ended the running jobs (`killed`, not counted against their retries) and put
        them back in their queues; the start finds every job again, and a queue removed from the configuration that
        still holds jobs drains with concurrency 1 and the priority scheduler (jobd keeps no queue definitions of
        its own). Then every queue that is not paused starts what it has room for."""
        for job in self.jobs.values():
            if job.state == "running":
                job.attempts.append(("killed", None, job.stop_signal()))
                self._place(job, "queued")
        for q in self.queues.values():
            if q.closed:
                q.concurrency, q.scheduler, q.paused = 1, "priority", False
            while not q.paused and q.ready and len(q.running) < q.concurrency:
                best = self.next_ready(q)
                assert best is not None
                self._place(self.jobs[best], "running")

    # -- operations the test makes (applied where jobd took them) ---------------------------------------------

    def pause(self, name: str, reply: Any) -> None:
        q = self.queues.get(name)
        if q is None:
            _expect_error(reply, "UNKNOWN_QUEUE", f"pause {name}")
            return
        if q.closed:
            _expect_error(reply, "QUEUE_CLOSED", f"pause {name}")
            return
        if isinstance(reply, RemoteError):
            raise ModelError(f"pause {name}: refused with {reply}")
        q.paused = True

    def resume(self, name: str, reply: Any) -> None:
        q = self.queues.get(name)
        if q is None:
            _expect_error(reply, "UNKNOWN_QUEUE", f"resume {name}")
            return
        if isinstance(reply, RemoteError):
            raise ModelError(f"resume {name}: refused with {reply}")
        q.paused = False

    def queue_reply(self, reply: dict[str, Any]) -> None:
        expected = next((entry for entry in self.queue_list() if entry["name"] == reply["name"]), None)
        if reply != expected:
            raise ModelError(f"queue {reply['name']}: answered {reply}, the model holds {expected}")

    def cancel(self, job_id: int, reply: Any) -> None:
        """Where jobd took a cancel: a waiting job's `cancelled` event follows at once, a running job's once its
        process has ended."""
        job = self.jobs[job_id]
        if job.state in FINAL:
            _expect_error(reply, "JOB_FINISHED", f"cancel of job {job_id}")
            return
        job.ending = "cancel"

    def cancelled(self, job_id: int, reply: Any) -> None:
        """After a cancel's reply: the job is cancelled, and the reply says so."""
        job = self.jobs[job_id]
        if isinstance(reply, RemoteError):
            return  # checked by cancel()
        if job.state != "cancelled" or reply.get("state") != "cancelled":
            raise ModelError(f"cancel of job {job_id}: answered {reply}; the model has it {job.state}")

    def reload(self, definitions: dict[str, Definition], reply: Any) -> None:
        if isinstance(reply, RemoteError):
            raise ModelError(f"reload refused: {reply}")
        for name, q in list(self.queues.items()):
            if name == "default":
                continue
            if name not in definitions:
                q.paused = False  # a removed queue drains; its API pause is dropped with it
                q.closed = True
                self._forget_if_drained(q)
        for name, (concurrency, scheduler, paused) in definitions.items():
            q = self.queues.get(name)
            if q is None:
                self.queues[name] = MQueue(name, concurrency, scheduler, file_paused=paused, paused=paused)
                continue
            if q.closed or paused != q.file_paused:
                # Added back while draining: as its file says. Its file's `paused` changed: that newer word
                # overrides an API pause or resume.
                q.paused = paused
            q.concurrency, q.scheduler, q.file_paused, q.closed = concurrency, scheduler, paused, False


def _brief(params: dict[str, Any]) -> dict[str, Any]:
    """A submit's parameters for the operation log: the FIFO's name stands for the command."""
    if "jobs" in params:
        return {"jobs": [_brief(spec) for spec in params["jobs"]]}
    return {key: Path(value[-1]).name if key == "command" else value for key, value in params.items()}


def _expect_error(reply: Any, code: str, what: str) -> None:
    if not isinstance(reply, RemoteError) or reply.code != code:
        raise ModelError(f"{what}: answered {reply!r}, the model expected {code}")


# -- the run ------------------------------------------------------------------------------------------------------


# The sockets' group: root, the one group mapped in the daemon's user namespace (a `jobd` group, should the machine
# have one, is not: jobd could not give it the sockets).
DAEMON_EXTRA = 'socket_group = "root"\n'
# JOBD_MODEL_DURABILITY=fsync: a submit's reply waits for the disk, while its jobs may start.
DAEMON_EXTRA += f'durability = "{os.environ.get("JOBD_MODEL_DURABILITY", "crash")}"\n'


def config_text(definitions: dict[str, Definition]) -> str:
    return "".join(
        f'\n[queue.{name}]\nconcurrency = {concurrency}\nscheduler = "{scheduler}"\npaused = {str(paused).lower()}\n'
        for name, (concurrency, scheduler, paused) in sorted(definitions.items())
    )


class Run:
    def __init__(self, daemon: Daemon, pump: Pump, seed: int, fifos: Path) -> None:
        self.daemon = daemon
        self.pump = pump
        self.rng = random.Random(seed)
        self.seed = seed
        self.fifos = fifos
        self.model = Model()
        self.log: list[str] = []
        self.tokens = 0
        self.keys_made: list[str] = []
        self.key_commands: dict[str, list[str]] = {}  # the command each key was first submitted with
        self.client = Client(str(daemon.socket_path))
        self.client.connect()
        self.client.call("events.subscribe", {"types": ["job.state"]})
        self.definitions: dict[str, Definition] = {}
        # Our end of each job's FIFO, open (O_RDWR: never blocks) from its making until the job has finished: a
        # retry's `read` that opened the FIFO as the last writer closed would read an end of file, and fail.
        self.writers: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self.writers.values():
            os.close(fd)
        self.client.close()

    # -- talking to jobd --------------------------------------------------------------------------------------

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], Any]:
        """Send one request; return the events that came before its reply, and the reply (or its RemoteError)."""
        request_id = self.client.send_request(method, params)
        events: list[dict[str, Any]] = []
        while True:
            try:
                message = self.client.next_event_or_reply(request_id, timeout=EVENT_WAIT)
            except RemoteError as error:
                return events, error
            if isinstance(message, Reply):
                return events, message.result
            events.append(message)

    def live(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """A request whose events are applied as they come (what it changes is applied by the caller)."""
        events, reply = self.request(method, params)
        for event in events:
            self.model.event(event)
        return reply

    def placed(
        self,
        method: str,
        params: dict[str, Any] | None,
        apply: Callable[[Model, Any], None],
        after: Callable[[Model, Any], None] = lambda model, reply: None,
    ) -> None:
        """A request that took effect at some point among the events before its reply (a timer's event may come
        before it, what it caused after): the model takes the first point where everything fits. A queue in the
        reply is as it is once all that is done."""
        events, reply = self.request(method, params)
        self.fit(f"{method} {params}", events, reply, apply, after)

    def fit(
        self,
        what: str,
        events: list[dict[str, Any]],
        reply: Any,
        apply: Callable[[Model, Any], None],
        after: Callable[[Model, Any], None] = lambda model, reply: None,
    ) -> None:
        """Apply `events`, and a request's effect at the first place among them where everything fits."""
        errors = []
        for split in range(len(events) + 1):
            model = copy.deepcopy(self.model)
            try:
                for event in events[:split]:
                    model.event(event)
                apply(model, reply)
                for event in events[split:]:
                    model.event(event)
                if isinstance(reply, dict) and "concurrency" in reply:
                    model.queue_reply(reply)
                after(model, reply)
            except ModelError as error:
                errors.append(f"  taken after {split} events: {error}")
                continue
            self.model = model
            return
        raise ModelError(f"{what}: no place among {events} fits:\n" + "\n".join(errors))

    def settle(self) -> None:
        """A ping's reply: jobd has done all that what came before it caused. Then compare."""
        self.live("ping")
        used = {job.fifo for job in self.model.jobs.values() if job.state not in FINAL}
        for fifo in set(self.writers) - used:  # a finished job's, or one of a refused submit
            os.close(self.writers.pop(fifo))
        self.model.check_settled()
        queues = self.live("queue.list")["queues"]
        if queues != self.model.queue_list():
            raise ModelError(f"queue.list {queues}\n  the model: {self.model.queue_list()}")
        listed = self.live("job.list", {"state": ["queued", "delayed", "running"], "limit": 1000})["jobs"]
        found = {job["id"]: job["state"] for job in listed}
        if found != self.model.unfinished():
            raise ModelError(f"job.list of unfinished jobs {found}\n  the model: {self.model.unfinished()}")
        if self.rng.random() < 0.3 and not self.model.pending_timers():
            self.check_job_list()  # nothing changes between its pages but what the test does

    def check_job_list(self) -> None:
        """job.list with a random filter, page by page: every job that matches, newest first, in its state."""
        states = self.rng.sample(ALL_STATES, self.rng.randint(0, 3))
        queue = self.rng.choice((None, *QUEUE_NAMES))
        limit = self.rng.choice((2, 5, 17, 1000))
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states if len(states) > 1 or self.rng.random() < 0.5 else states[0]
        if queue is not None:
            params["queue"] = queue
        found: list[tuple[int, str]] = []
        while True:
            page = self.live("job.list", params)
            found += [(job["id"], job["state"]) for job in page["jobs"]]
            more = page["next_before"]
            if len(page["jobs"]) > limit or (more is not None and more != found[-1][0]):
                raise ModelError(f"job.list {params}: a page of {len(page['jobs'])} jobs, next_before {more}")
            if more is None:
                break
            params["before"] = page["next_before"]
        expected = [
            (job.id, job.state)
            for job in sorted(self.model.jobs.values(), key=lambda job: -job.id)
            if (not states or job.state in states) and (queue is None or job.queue == queue)
        ]
        if found != expected:
            raise ModelError(f"job.list {params}: {found}\n  the model: {expected}")

    def next_event(self) -> None:
        self.model.event(self.client.next_event(timeout=EVENT_WAIT))

    # -- operations -------------------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.log.extend(self.model.trace)
        self.model.trace.clear()
        self.log.append(text)

    def new_job(self, queue: str) -> tuple[dict[str, Any], Path]:
        self.tokens += 1
        fifo = self.fifos / f"f{self.tokens}"
        os.mkfifo(fifo)
        self.writers[fifo] = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        blocker = BLOCKER
        spec: dict[str, Any] = {"queue": queue}
        if self.rng.random() < 0.15:  # ignores SIGTERM: a cancel ends it with SIGKILL, after its kill_grace
            blocker = f"trap '' TERM; {BLOCKER}"
            spec["kill_grace"] = self.rng.choice((0.05, 0.2))
        spec["command"] = ["/bin/sh", "-c", blocker, str(fifo)]
        spec["priority"] = self.rng.choice(PRIORITIES)
        if self.rng.random() < 0.25:
            spec["delay"] = self.rng.choice((0.02, 0.05, 0.1, 0.2))
        if self.rng.random() < 0.1:
            spec["timeout"] = self.rng.choice((0.05, 0.2))
        if self.rng.random() < 0.4:
            spec["retry"] = {"times": self.rng.randint(1, 2), "delay": self.rng.choice((0, 0, 0.05, 0.1)), "backoff": 1}
            if self.rng.random() < 0.3:
                spec["retry"]["on_exit_codes"] = [3]
        return spec, fifo

    def queue_choice(self) -> str:
        names = [name for name, q in self.model.queues.items() if name != "default" and not q.closed]
        others = [name for name in (*QUEUE_NAMES, "nosuch") if name not in names]
        if names and self.rng.random() < 0.9:
            return self.rng.choice(names)
        return self.rng.choice(others)

    def op_submit(self) -> None:
        count = 1 if self.rng.random() < 0.6 else self.rng.randint(2, 5)
        made = [self.new_job(self.queue_choice()) for _ in range(count)]
        for spec, _ in made:
            if self.keys_made and self.rng.random() < 0.2:
                # Taken: answered with its job, whatever its queue, when it asks for the same work (a key given
                # with other work is refused, tests/test_jobs.py): a client asking again for what it submitted.
                spec["key"] = self.rng.choice(self.keys_made)
                spec["command"] = self.key_commands[spec["key"]]
            elif self.rng.random() < 0.25:
                self.tokens += 1
                spec["key"] = f"k{self.tokens}"
        params: dict[str, Any] = made[0][0] if count == 1 else {"jobs": [spec for spec, _ in made]}
        self.note(f"submit {json.dumps(_brief(params))}")
        # With durability "fsync" the jobs are queued, and may start, while the reply waits for the disk: the submit
        # took effect somewhere among the events before its reply, as placed() finds.
        events, reply = self.request("job.submit", params)
        taken = [spec.get("key") in self.model.keys for spec, _ in made]
        for (spec, _), is_taken in zip(made, taken, strict=True):
            # The first new job whose queue is unknown or draining refuses the whole submit.
            q = self.model.queues.get(spec["queue"])
            if not is_taken and (q is None or q.closed):
                _expect_error(reply, "UNKNOWN_QUEUE" if q is None else "QUEUE_CLOSED", "submit")
                self.fit("a refused submit", events, reply, lambda model, reply: None)
                return
        if isinstance(reply, RemoteError):
            raise ModelError(f"submit refused: {reply}")
        replies = reply["jobs"] if count > 1 else [reply]
        jobs = []
        answered_taken = []
        for (spec, fifo), is_taken, job in zip(made, taken, replies, strict=True):
            if is_taken:
                answered_taken.append((spec["key"], job))
                continue
            expected = "delayed" if spec.get("delay") else "queued"
            if job["state"] != expected or job["priority"] != spec["priority"] or job["queue"] != spec["queue"]:
                raise ModelError(f"submitted {spec}: answered {job}")
            retry = spec.get("retry", {"times": 0, "delay": 0})
            jobs.append(
                MJob(
                    job["id"],
                    spec["queue"],
                    spec["priority"],
                    expected,
                    fifo,
                    retry["times"],
                    retry["delay"],
                    spec.get("key"),
                    tuple(retry.get("on_exit_codes", ())),
                    "kill_grace" in spec,
                    spec.get("timeout"),
                )
            )
            if spec.get("key"):
                self.keys_made.append(spec["key"])
                self.key_commands[spec["key"]] = spec["command"]
        self.note(f"  -> jobs {[job.id for job in jobs]}")

        def submitted(model: Model, reply: Any) -> None:
            for key, job in answered_taken:  # as the key's job was when jobd took the submit
                first = model.jobs[model.keys[key]]
                if job["id"] != first.id or job["state"] != first.state:
                    raise ModelError(f"a submit with taken key {key}: answered {job}, the model has {first}")
            model.submitted(copy.deepcopy(jobs))

        self.fit("submit", events, reply, submitted)

    def op_end(self) -> None:
        """End one running job, or a few at once (their ends may come in any order, or in one turn of jobd's loop)."""
        running = sorted(j.id for j in self.model.jobs.values() if j.state == "running" and j.timeout is None)
        if not running:
            return
        chosen = self.rng.sample(running, 1 if self.rng.random() < 0.7 else min(len(running), self.rng.randint(2, 4)))
        self.end([(self.model.jobs[job_id], self.rng.choice((0, 0, 1, 3))) for job_id in chosen])

    def end(self, endings: list[tuple[MJob, int]]) -> None:
        self.note("end " + ", ".join(f"job {job.id} with exit code {code}" for job, code in endings))
        attempts = {job.id: len(job.attempts) for job, _ in endings}
        for job, code in endings:
            job.ending = code
            os.write(self.writers[job.fifo], f"{code}\n".encode())  # the job reads this line, and no more
        while any(len(job.attempts) == attempts[job.id] for job, _ in endings):
            self.next_event()

    def op_cancel(self) -> None:
        unfinished = sorted(self.model.unfinished())
        if not unfinished:
            return
        job_id = self.rng.choice(unfinished)
        job = self.model.jobs[job_id]
        self.note(f"cancel job {job_id} ({job.state})")
        # A delay may end, and the job start, before jobd takes the cancel: then it is a running job's.
        self.placed(
            "job.cancel",
            {"id": job_id},
            lambda model, reply: model.cancel(job_id, reply),
            lambda model, reply: model.cancelled(job_id, reply),
        )

    def op_pause(self) -> None:
        name = self.rng.choice(QUEUE_NAMES)
        pause = self.rng.random() < 0.5
        self.note(f"{'pause' if pause else 'resume'} {name}")
        method = "queue.pause" if pause else "queue.resume"
        apply = (lambda m, r: m.pause(name, r)) if pause else (lambda m, r: m.resume(name, r))
        self.placed(method, {"name": name}, apply)

    def op_reload(self) -> None:
        self.reload(self.changed_definitions())

    def changed_definitions(self) -> dict[str, Definition]:
        """The queues' definitions with one queue changed, removed or added."""
        definitions = dict(self.definitions)
        name = self.rng.choice(QUEUE_NAMES)
        if name in definitions:
            concurrency, scheduler, paused = definitions[name]
            change = self.rng.choice(("concurrency", "scheduler", "paused", "remove"))
            if change == "concurrency":
                definitions[name] = (self.rng.randint(1, 3), scheduler, paused)
            elif change == "scheduler":
                definitions[name] = (concurrency, "fifo" if scheduler == "priority" else "priority", paused)
            elif change == "paused":
                definitions[name] = (concurrency, scheduler, not paused)
            else:
                del definitions[name]
        else:
            definitions[name] = (self.rng.randint(1, 3), self.rng.choice(("priority", "fifo")), self.rng.random() < 0.2)
        return definitions

    def reload(self, definitions: dict[str, Definition]) -> None:
        self.note(f"reload {definitions}")
        self.definitions = definitions
        self.daemon.write_config(config_text(definitions), DAEMON_EXTRA)
        self.placed("daemon.reload", None, lambda model, reply: model.reload(definitions, reply))

    def op_restart(self) -> None:
        """Stop jobd and start it again. The queues that may start jobs are paused through the API first (such a
        pause lasts across a restart), so that nothing starts before the test listens again, but for the removed
        queues that drain, which cannot be paused: what they start at once the model starts too."""
        closed = {name for name, q in self.model.queues.items() if q.closed}
        if any(j.timeout and j.state == "queued" and j.queue in closed for j in self.model.jobs.values()):
            return  # it would start before the test listens again, and could time out unseen
        self.quiet()
        held = []
        for name, q in sorted(self.model.queues.items()):
            if not q.closed and not q.paused:
                self.placed("queue.pause", {"name": name}, lambda m, r, name=name: m.pause(name, r))
                held.append(name)
        self.settle()
        self.note(f"restart (held: {held})")
        self.client.close()
        code = terminate(self.daemon)
        if code != 0:
            raise ModelError(f"jobd exited with {code} at SIGTERM")
        if self.rng.random() < 0.4:  # the configuration edited while jobd was stopped
            self.definitions = self.changed_definitions()
            self.note(f"  configuration while stopped: {self.definitions}")
            self.daemon.write_config(config_text(self.definitions), DAEMON_EXTRA)
            self.model.reload(self.definitions, {})
        self.model.restarted()
        self.pump = start(self.daemon)
        self.client = Client(str(self.daemon.socket_path))
        self.client.connect()
        self.client.call("events.subscribe", {"types": ["job.state"]})
        self.settle()
        for name in held:
            if self.model.queues.get(name) is None or self.model.queues[name].closed:
                continue
            self.note(f"resume {name}")
            self.placed("queue.resume", {"name": name}, lambda m, r, name=name: m.resume(name, r))

    def op_wait_event(self) -> None:
        """Let a delay or a time limit end: wait for the next event, when one runs."""
        if self.model.pending_timers():
            self.note("wait for an event")
            self.next_event()

    def step(self) -> None:
        ops: list[tuple[float, Callable[[], None]]] = [
            (5, self.op_submit),
            (4, self.op_end),
            (1.5, self.op_cancel),
            (1.2, self.op_pause),
            (1, self.op_reload),
            (0.8, self.op_wait_event),
            (0.2, self.op_restart),
        ]
        op = self.rng.choices([op for _, op in ops], weights=[w for w, _ in ops])[0]
        op()
        self.settle()

    # -- the end ----------------------------------------------------------------------------------------------

    def quiet(self) -> None:
        """Let every delay and every running job's time limit end; then nothing changes until the test acts."""
        self.settle()
        while self.model.pending_timers():
            self.next_event()
            self.settle()  # the events that came with it (a delay's end and the start it made) are applied

    def drain(self) -> None:
        for name, q in sorted(self.model.queues.items()):
            if q.paused:
                self.note(f"resume {name}")
                self.placed("queue.resume", {"name": name}, lambda m, r, name=name: m.resume(name, r))
        while self.model.unfinished():
            running = sorted(j.id for j in self.model.jobs.values() if j.state == "running" and j.timeout is None)
            if running:
                self.end([(self.model.jobs[running[0]], self.rng.choice((0, 1)))])
            else:
                self.note("wait for an event")
                self.next_event()
            self.settle()

    def check_jobs(self) -> None:
        for job in self.model.jobs.values():
            got = self.live("job.get", {"id": job.id})
            tries = [(t["outcome"], t["exit_code"], t["signal"]) for t in got["tries"]]
            # Where the model knows only that jobd stopped the job: SIGKILL, or SIGTERM before the trap of a job
            # that ignores it was set (None); killed or timed_out, when a cancel met its time limit ("stopped").
            tries = [
                (
                    "stopped" if expected and expected[0] == "stopped" and o in ("killed", "timed_out") else o,
                    code,
                    None if expected and expected[2] is None and code is None and sig in (9, 15) else sig,
                )
                for (o, code, sig), expected in zip(tries, [*job.attempts, *[None] * len(tries)], strict=False)
            ]
            if got["state"] != job.state or tries != job.attempts or got["attempts"] != len(job.attempts):
                raise ModelError(
                    f"job {job.id}: jobd has {got['state']}, {got['attempts']} attempts {tries}; "
                    f"the model {job.state}, {job.attempts}"
                )

    def check_views(self) -> None:
        """jobctl queues, daemon.status and STATUS= against the model (at a quiet moment)."""
        model = self.model.queue_list()
        status = self.live("daemon.status")
        if status["queues"] != model:
            raise ModelError(f"daemon.status queues {status['queues']}\n  the model: {model}")
        totals = {key: sum(q[key] for q in model) for key in ("running", "queued", "delayed")}
        if {key: status[key] for key in totals} != totals:
            raise ModelError(f"daemon.status counts {status}, the model {totals}")
        argv = [sys.executable, "-m", "jobd.jobctl", "--socket", str(self.daemon.socket_path)]
        shown = subprocess.run([*argv, "--json", "queues"], capture_output=True, text=True, timeout=60, check=True)
        if json.loads(shown.stdout) != {"queues": model}:
            raise ModelError(f"jobctl --json queues: {shown.stdout}\n  the model: {model}")
        table = subprocess.run([*argv, "queues"], capture_output=True, text=True, timeout=60, check=True)
        rows = [line.split() for line in table.stdout.splitlines()[1:]]
        expected_rows = [
            [
                q["name"],
                str(q["concurrency"]),
                q["scheduler"],
                str(q["running"]),
                str(q["queued"]),
                str(q["delayed"]),
                ",".join(f for f in ("paused", "closed") if q[f]) or "-",
            ]
            for q in model
        ]
        if rows != expected_rows:
            raise ModelError(f"jobctl queues:\n{table.stdout}\n  the model: {expected_rows}")
        # STATUS= follows every change of the counts (at most every 0.1 s), and a pause and resume of the idle queue
        # `default` makes jobd tell them once more: a line as the model has it must come. (One read late by the
        # thread that drains the socket may tell an earlier moment: not the one waited for.)
        busy = "; ".join(
            f"{q['name']} {'paused, ' if q['paused'] else ''}"
            f"{q['running']}/{q['concurrency']} running, {q['queued']} queued"
            for q in model
            if q["running"] or q["queued"]
        )
        expected = f"STATUS={totals['running']} running, {totals['queued']} queued, {totals['delayed']} delayed"
        expected += f" ({busy})" if busy else ""
        self.pump.skip()
        self.live("queue.pause", {"name": "default"})
        self.live("queue.resume", {"name": "default"})
        try:
            self.pump.wait_for(lambda line: line == expected)
        except AssertionError as error:
            raise ModelError(f"no {expected!r} from jobd: {error}") from None


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


SEEDS = parse_seeds(os.environ.get("JOBD_MODEL_SEEDS", "1-3"))
STEPS = int(os.environ.get("JOBD_MODEL_STEPS", "100"))


@pytest.fixture
def model_daemon(make_daemon: Callable[..., Daemon]) -> Iterator[tuple[Daemon, Pump]]:
    """A jobd whose configuration changes only when the test reloads it: without inotify (no instance may be made in
    its user namespace), so that no reload of the watcher's applies a file before the test's daemon.reload."""
    daemon = make_daemon(start=False, daemon_extra=DAEMON_EXTRA)
    daemon.command_prefix = in_user_namespace("echo 0 > /proc/sys/user/max_inotify_instances")
    daemon.start()
    pump = attach(daemon)
    yield daemon, pump
    stop_pumps([daemon])


# Only a hang guard: every wait has a deadline of its own. A seed's STEPS operations (restarts among them) take 15-30 s
# on a quiet machine; beside a loaded run of other tests two seeds of forty took over the suite's 120 s, each ended
# by it in its last checks.
@pytest.mark.timeout(120 + 6 * STEPS)
@pytest.mark.parametrize("seed", SEEDS)
def test_queues_follow_the_model(model_daemon: tuple[Daemon, Pump], tmp_path: Path, seed: int) -> None:
    daemon, pump = model_daemon
    fifos = tmp_path / "fifos"
    fifos.mkdir()
    run = Run(daemon, pump, seed, fifos)
    try:
        rng = run.rng
        run.reload({"a": (rng.randint(1, 3), rng.choice(("priority", "fifo")), False), "b": (1, "priority", False)})
        run.settle()
        for _ in range(STEPS):
            run.step()
        run.quiet()
        run.check_views()
        run.drain()
        run.check_jobs()
        run.check_views()
    except (ModelError, AssertionError, TimeoutError) as error:
        run.log.extend(run.model.trace)
        log = "\n".join(f"  {line}" for line in run.log[-120:])
        raise AssertionError(
            f"seed {seed} (replay: JOBD_MODEL_SEEDS={seed} JOBD_MODEL_STEPS={STEPS}): {error}\n"
            f"operations and events (last 120 of {len(run.log)}):\n{log}"
        ) from error
    finally:
        run.close()
