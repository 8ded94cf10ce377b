"""A workflow instance: evQueue's instance document, driven as a pure state machine.

The instance *is* its lxml document, with evQueue's element and attribute names (reference/evqueue.md §2.6), so
`to_xml()` is what `instance query` returns and what is saved for crash recovery. Nothing here does I/O: the engine
calls `launch`, `task_started`, `task_progress`, `task_ended`, `retry_due`, `cancel` with the time, and applies the
actions they return (RunTask: submit a jobd job; RetryLater: call `retry_due` after the delay; DequeueTask: cancel
the job of a task still queued; InstanceFinished).

Decisions that differ from evQueue, and why:
* retval is the exit code 0–255 exactly (evQueue stored it in a signed char); a task killed by a signal, or lost
  with a crash of jobd, ends with retval -1 (evQueue's value for a killed task) and its <output> gets `signal="N"`.
* Task output is bytes; it is made safe for XML once, when stored: invalid UTF-8 becomes U+FFFD, and each control
  character other than tab, LF and CR becomes its Unicode "control picture" (NUL → U+2400 ␀, ESC → U+241B ␛, …),
  which shows what the byte was and is valid XML. Nothing is logged per byte.
* `value select` / `{xpath}` attributes accept string, number and boolean results, not only nodes.
* An error evaluating one node aborts that node (counted as one error) and its siblings still run; a task whose
  retval does not match retry_retval counts as an error (evQueue forgot to count it).
* Nodes copied into an input by <copy>, and XML imported from a task's output, lose any `evqid`: evqids stay
  unique, so `task_ended(evqid)` and `evqGetContext()` always mean one node.
* Remote execution is not supported yet: a task with a host (its own or the instance's) is ABORTED at enqueue, and
  so is one with a user (evQueue ran it locally, ignoring the user; jobd does not run it as another user than asked).
  queue_host and use-agent, which evQueue ignored for a task without a host, are ignored too.
* The root carries `cancelling="yes"` after `cancel()`, so a restored instance still refuses new tasks, and
  `next-evqid`, the number its next node gets: a restart then numbers nodes as the first run did, though the highest
  number in use may have left the document (a node a loop over nothing removed). A task's job key holds its number.
* A task waiting to be retried carries `retry-at-unix` beside evQueue's `retry_at`: the moment exactly, in seconds
  since the epoch. `retry_at` is local time in whole seconds, which names two moments in the hour a DST change
  repeats and none in the hour it skips, so a restart reading it could retry an hour off (or up to a second early).

Counters (running_tasks, queued_tasks, retrying_tasks, error_tasks, waiting_conditions) are kept by
jobd/engine/instance_counters.py: every node whose status may change is touched, and each event ends by moving the
touched nodes' changes up to their jobs, so an event costs the same however large the instance has grown. A restored
document is counted again from its node statuses, so it cannot disagree with its counters.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lxml import etree

from jobd import safexml
from jobd.engine.instance_counters import COUNTERS, Counters, structural_nodes
from jobd.engine.xpath import (
    EvalContext,
    WaitRequested,
    XPathError,
    evaluate_boolean,
    evaluate_nodes,
    evaluate_string,
    evaluate_strings,
    expand_braces,
    node_string,
)
from jobd.errors import ConfigError, InvalidWorkflowParameters, InvalidXml
from jobd.model import (
    ENV_NAME,
    Outcome,
    ParameterMode,
    RetryPolicy,
    RetrySchedule,
    TaskDef,
    WorkflowDef,
    evqueue_boolean,
)
from jobd.workflowdef import split_command

LOCAL_TIME = "%Y-%m-%d %H:%M:%S"  # evQueue's timestamps: local time, whole seconds
NEXT_EVQID = "next-evqid"  # on the root: the number the next node gets (a jobd attribute; see the module's notes)
RETRY_AT_UNIX = "retry-at-unix"  # on a task waiting to be retried: when, exactly (a jobd attribute; see the notes)
KILLED_RETVAL = -1  # retval of a task killed by a signal or lost: evQueue's value, outside 0–255 on purpose
COMPAT_ENV = {"EVQUEUE_ENV": "true", "EVQUEUE_IPC_QID": "0"}  # what evQueue gives every task; scripts test it

ABORTED_BY_USER = "Aborted on user request"
NO_RETRY_CANCELLING = "Won't retry because workflow is cancelling"
INVALID_XML = "Invalid XML returned"
OUTPUT_MISSING = "Output missing"  # jobd wrote the task's output, and it was removed before the task's end was read
# The instance document is saved whole as the instance changes, so what it holds of task outputs is bounded:
# this much of each stream as text, then TRUNCATED_MARK; an XML output (parsed, for later tasks to query) up to
# MAX_DOCUMENT_XML bytes, a larger one is refused by name (15 MB of XML held jobd's loop ~1 s at each save).
MAX_DOCUMENT_TEXT = 1024 * 1024
MAX_DOCUMENT_XML = 4 * 1024 * 1024
TRUNCATED_MARK = "\n...TRUNCATED...\n"
# How deep an instance document may nest its elements, so that whoever reads it back can: libxml2 reads 256 levels
# (more only with XML_PARSE_HUGE, which jobd leaves off, task outputs being untrusted, and which evQueue's PHP
# clients do not set), and evQueue's `instance query` answers the document inside <response>, one level more. A
# task's XML output or a <copy> that would nest it deeper is refused (a restart, instance.get and debugresume
# could no longer read the instance).
MAX_DOCUMENT_DEPTH = 255
# evQueue read a DTD in a task's output; jobd does not (its entities could expand without bound: jobd/safexml.py).
DTD_IN_OUTPUT = "its output has a DTD, <!DOCTYPE …> or <!ENTITY …>: jobd reads task outputs without one"
UNKNOWN_QUEUE = "Unknown queue name"
REMOTE_UNSUPPORTED = "remote execution is not supported"


class InstanceStatus(StrEnum):
    EXECUTING = "EXECUTING"
    TERMINATED = "TERMINATED"


class OutputCut(StrEnum):
    """Why a task's stdout is not whole, as its job's record tells."""

    MAX_OUTPUT = "max_output"  # it went beyond the job's max_output: jobd kept that much and dropped the rest
    UNWRITTEN = "unwritten"  # jobd could not write it all (its output disk was full): what came after was dropped


class NodeStatus(StrEnum):
    """The `status` attribute of a <task> (all of them) or a <job> (SKIPPED, ABORTED, WAITING)."""

    QUEUED = "QUEUED"
    EXECUTING = "EXECUTING"
    TERMINATED = "TERMINATED"
    ABORTED = "ABORTED"
    SKIPPED = "SKIPPED"
    WAITING = "WAITING"


# ------------------------------------------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class TaskResult:
    """How the job running a task ended, as the engine saw it.

    `retval` is the exit code (0–255), or KILLED_RETVAL (-1) when the process was killed by a signal (`signal`
    says which) or lost (jobd crashed while it ran: `outcome` is Outcome.LOST).
    """

    retval: int
    stdout: bytes = b""
    stderr: bytes = b""
    log: str = ""  # the fd 3 lines that were not progress, joined with their newlines
    stdout_cut: OutputCut | None = None  # why what is kept of the job's stdout is not all of it, if it is not
    started_at: float | None = None
    ended_at: float | None = None
    signal: int | None = None
    outcome: Outcome | None = None
    output_missing: str = ""  # why a stream jobd wrote could not be read at the end (OutputMissing), if one could not

    @classmethod
    def exited(cls, exit_code: int, **streams: Any) -> TaskResult:
        if not 0 <= exit_code <= 255:
            raise ValueError(f"an exit code is 0–255, not {exit_code}")
        return cls(exit_code, **streams)

    @classmethod
    def killed(cls, signal: int, **streams: Any) -> TaskResult:
        return cls(KILLED_RETVAL, signal=signal, outcome=Outcome.FAILED, **streams)

    @classmethod
    def stopped(cls, signal: int | None, **streams: Any) -> TaskResult:
        """Ended by jobd (killtask, or its time limit), whatever its exit code: a task that exits 0 at the SIGTERM
        has still not succeeded. evQueue's monitor SIGKILLs a killed task, so its retval is always -1."""
        return cls(KILLED_RETVAL, signal=signal, outcome=Outcome.FAILED, **streams)

    @classmethod
    def lost(cls, **streams: Any) -> TaskResult:
        return cls(KILLED_RETVAL, outcome=Outcome.LOST, **streams)


@dataclass(frozen=True, slots=True)
class RunTask:
    """Submit a jobd job for task `evqid` in `queue`.

    `argv` is the whole command (program first) for a binary or TOML task. For a SCRIPT task (`script` is not
    None) the engine writes `script` to an executable file and runs `[that file, *argv]`: argv holds only the
    arguments. A relative program is the engine's to resolve (evQueue: against its tasks directory).
    `stdin` None means an empty stdin. `retry` is the jobd retry policy of a TOML task (the job retries inside one
    workflow try); the workflow's own retry_* attributes act on the final result.
    """

    evqid: int
    name: str
    queue: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    working_dir: str | None = None
    script: str | None = None
    merge_stderr: bool = False
    timeout: float | None = None
    retry: RetryPolicy | None = None
    task: str | None = None  # the TOML [task.NAME] it runs, if any
    http: Mapping[str, Any] | None = None  # that task's HTTP request, if it is one (argv is then empty)
    # That task's definition as the machine read it, whole: the engine takes its user, kill_grace and max_output
    # from the same definition as argv, even should a reload come in between.
    definition: TaskDef | None = None


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Call `retry_due(evqid, now)` once `delay` seconds have passed (at `due`, wall clock)."""

    evqid: int
    delay: float
    due: float


@dataclass(frozen=True, slots=True)
class DequeueTask:
    """The instance is cancelled: drop the queued job of this task (it is already ABORTED in the document)."""

    evqid: int


@dataclass(frozen=True, slots=True)
class InstanceFinished:
    status: InstanceStatus
    errors: int
    custom_attributes: tuple[tuple[str, str], ...] = ()  # (name, value), one pair per selected node
    tags: tuple[str, ...] = ()  # automatic tags whose condition held


Action = RunTask | RetryLater | DequeueTask | InstanceFinished


@dataclass(frozen=True, slots=True)
class RestoredTask:
    """A task a restored instance was waiting for: the engine reconciles it with its jobs.

    QUEUED or EXECUTING: `tid` is the job id if one was recorded; if that job is gone, call `resubmit(evqid)`
    (QUEUED, with `now`) or `task_ended(evqid, TaskResult.lost(), now)` (EXECUTING). Retrying (status TERMINATED): call
    `retry_due(evqid, now)` at `retry_at`, but not later than `retry_delay` from now (see `retry_wait`).
    """

    evqid: int
    status: NodeStatus
    tid: int | None = None
    retry_at: float | None = None
    retry_delay: float | None = None  # the delay that retry_at was set for, when the document says it

    def retry_wait(self, now: float) -> float:
        """Seconds from `now` until the retry is due: until `retry_at`, but at most the delay it was set for.

        `retry_at` is on the wall clock of the moment the task ended. Set back since (while jobd was down: an NTP
        step after a boot with the clock ahead, a wrong clock corrected), the clock is behind that end, and the
        wait until `retry_at` is the delay plus however far the clock went back; counted from the end instead,
        it is the delay asked for, as a job's back-off is (jobd.engine.core.Engine._admit)."""
        wait = max(0.0, (self.retry_at or now) - now)
        return wait if self.retry_delay is None else min(wait, self.retry_delay)


class _NodeAborted(Exception):
    """Evaluating something of a node failed: the node becomes ABORTED with this message as its error."""


# ---------------------------------------------------------------------------------------------------- instance


class Instance:
    """One workflow instance. Every public method takes the time it happens at and returns what to do."""

    def __init__(
        self,
        root: etree._Element,
        *,
        queues: Set[str],
        tasks: Mapping[str, TaskDef],
        retry_schedules: Mapping[str, RetrySchedule],
    ) -> None:
        self.root = root
        self._queues = queues
        self._tasks = tasks
        self._retry_schedules = retry_schedules
        highest = max((int(e.get("evqid", "0")) for e in _elements(root) if e.get("evqid")), default=0)
        self._next_evqid = max(highest + 1, int(root.get(NEXT_EVQID, "1")))
        self._index: dict[int, etree._Element] = {}
        self._actions: list[Action] = []
        self._counters = Counters(root)

    def reconfigure(
        self, queues: Set[str], tasks: Mapping[str, TaskDef], retry_schedules: Mapping[str, RetrySchedule]
    ) -> None:
        """A reload: the tasks enqueued from now on take the queues and TOML tasks of the new configuration, as
        they would after a restart (the document itself, copied at launch, does not change)."""
        self._queues = queues
        self._tasks = tasks
        self._retry_schedules = retry_schedules

    def undefined_names(self) -> list[str]:
        """The queues and TOML tasks that tasks still to be enqueued (not started yet, or waiting for a retry) name
        and the configuration does not define: each such task is ABORTED when its turn comes."""
        missing: set[str] = set()
        for task, dead in self.task_nodes():
            if dead or (task.get("status") is not None and not _is_retrying(task)):
                continue
            toml_name = task.get("task")
            definition = self._tasks.get(toml_name) if toml_name is not None else None
            if toml_name is not None and definition is None:
                missing.add(f"task {toml_name!r}")
                continue
            queue = task.get("queue") or (definition.queue if definition else "")
            if queue not in self._queues:
                missing.add(f"queue {queue!r}")
        return sorted(missing)

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def launch(
        cls,
        definition: WorkflowDef,
        parameters: Mapping[str, str],
        *,
        instance_id: int,
        now: float,
        queues: Set[str],
        tasks: Mapping[str, TaskDef] | None = None,
        retry_schedules: Mapping[str, RetrySchedule] | None = None,
        comment: str | None = None,
        host: str | None = None,
        user: str | None = None,
    ) -> tuple[Instance, list[Action]]:
        """Start an instance of `definition`. Raises InvalidWorkflowParameters (evQueue's messages) or ConfigError
        (a retry_schedule that is not defined)."""
        root = safexml.parse(definition.source, f"workflow {definition.name}")
        _fill_parameters(root, definition.name, parameters)
        root.set("name", definition.name)
        if host:
            root.set("host", host)
            if user:
                root.set("user", user)
        if comment:
            root.set("comment", comment)
        root.set("id", str(instance_id))
        instance = cls(root, queues=queues, tasks=tasks or {}, retry_schedules=retry_schedules or {})
        instance._copy_retry_schedules(definition.name)
        root.set("status", InstanceStatus.EXECUTING)
        root.set("start_time", local_time(now))
        instance._run_subjobs(root)
        instance._counters.recount()
        return instance, instance._settle(now)

    @classmethod
    def restore(
        cls,
        xml: bytes,
        *,
        queues: Set[str],
        tasks: Mapping[str, TaskDef] | None = None,
        retry_schedules: Mapping[str, RetrySchedule] | None = None,
    ) -> tuple[Instance, list[RestoredTask]]:
        """Rebuild an instance from `to_xml()` after a restart; the tasks it waits for are returned to reconcile."""
        root = safexml.parse(xml, "saved workflow instance")
        instance = cls(root, queues=queues, tasks=tasks or {}, retry_schedules=retry_schedules or {})
        instance._counters.recount()
        pending: list[RestoredTask] = []
        if instance.status is InstanceStatus.EXECUTING:
            for task in instance._all_tasks():
                status = task.get("status")
                tid = task.get("tid")
                if status in (NodeStatus.QUEUED, NodeStatus.EXECUTING):
                    pending.append(RestoredTask(_evqid(task), NodeStatus(status), int(tid) if tid else None))
                elif _is_retrying(task):
                    pending.append(
                        RestoredTask(
                            _evqid(task),
                            NodeStatus.TERMINATED,
                            retry_at=_retry_due(task),
                            retry_delay=_retry_delay(task),
                        )
                    )
        return instance, pending

    @classmethod
    def debug_resume(
        cls,
        document: bytes,
        *,
        instance_id: int,
        now: float,
        queues: Set[str],
        tasks: Mapping[str, TaskDef] | None = None,
        retry_schedules: Mapping[str, RetrySchedule] | None = None,
    ) -> tuple[Instance, list[Action]]:
        """evQueue's `instance debugresume`: a new instance from the document of a TERMINATED one.

        What succeeded stays as it is: tasks that ended with retval 0, skipped jobs and tasks, and their outputs
        (later tasks read them). Tasks that failed (retval != 0, killed, lost) or were ABORTED when they were
        enqueued or ran (cancel, invalid XML output, unknown queue, ...) run again, and QUEUED ones are enqueued;
        each keeps its earlier <output>/<stderr>/<log> triplets, the new try appends one, as a retry does. Once a
        job's tasks all succeed, its subjobs start as usual. Left as they are: ABORTED jobs, and tasks ABORTED
        while their condition, loop or inputs were evaluated (the loop is already expanded and the inputs half
        computed, so running them again would not mean what the workflow says); they count as errors again.
        A resumed task keeps its retry state: retries it used up are not given back. A task still EXECUTING, or
        waiting for a retry, in a TERMINATED document is one whose run jobd ended by an error of its own (the
        instance was ended and the task's job cancelled, Instances._broken): it runs again, as a failed one. Raises
        ValueError for a document that is not a TERMINATED instance.
        """
        root = safexml.parse(document, "workflow instance to resume")
        if root.tag != "workflow" or root.get("status") != InstanceStatus.TERMINATED:
            raise ValueError("only a TERMINATED workflow instance can be resumed")
        for name in ("end_time", "cancelling", "errors", *COUNTERS):
            _drop(root, name)
        root.set("id", str(instance_id))
        root.set("status", InstanceStatus.EXECUTING)
        root.set("start_time", local_time(now))
        instance = cls(root, queues=queues, tasks=tasks or {}, retry_schedules=retry_schedules or {})
        for task in list(instance._all_tasks()):
            status = task.get("status")
            # QUEUED, EXECUTING or waiting for a retry: a run that never ended, since an instance that ends by
            # itself waits for all of them. Left as they were, the new instance would wait for a job it never
            # submitted, and never end (a cancel neither: there is no job to stop).
            unfinished = status in (NodeStatus.QUEUED, NodeStatus.EXECUTING) or _is_retrying(task)
            if unfinished or _resumable_failure(task):
                _drop(task, *_RUN_ATTRIBUTES, "status", "retval", "error", "progression", "execution_time")
                instance._enqueue(task)
        instance._counters.recount()  # the counters it was saved with are those of the instance that ended
        return instance, instance._settle(now)

    # ------------------------------------------------------------------------------------------------ state

    @property
    def status(self) -> InstanceStatus:
        return InstanceStatus(self.root.get("status", InstanceStatus.EXECUTING))

    @property
    def errors(self) -> int:
        return int(self.root.get("error_tasks", "0"))

    @property
    def cancelling(self) -> bool:
        return self.root.get("cancelling") == "yes"

    def counters(self) -> dict[str, int]:
        return {name: int(self.root.get(name, "0")) for name in COUNTERS}

    @property
    def task_count(self) -> int:
        """The workflow's tasks, those loops added included (not copies in inputs or outputs)."""
        return self._counters.tasks

    @property
    def never_run(self) -> int:
        """The tasks that will never run because a job above them was SKIPPED or ABORTED before they were reached."""
        return self._counters.never_run

    def take_changed_tasks(self) -> list[etree._Element]:
        """The tasks whose status, job or result changed since the last call (a task that left the document, a
        loop's original, may be among them); their progression is not followed here (task_progress)."""
        return self._counters.take_changed_tasks()

    def task(self, evqid: int) -> etree._Element | None:
        """The <task> element with that evqid (read it, do not change it)."""
        node = self._find(evqid)
        return node if node is not None and node.tag == "task" else None

    def script(self, evqid: int) -> str | None:
        """The script a SCRIPT task's job runs, as evaluated when the task was queued (its element keeps it), or
        None for a task of another kind."""
        task = self.task(evqid)
        if task is None or task.get("task") is not None or task.get("type") != "SCRIPT":
            return None
        element = task.find("script")
        return node_string(element) if element is not None else ""

    def to_xml(self) -> bytes:
        return etree.tostring(self.root, encoding="utf-8")

    def custom_attributes(self) -> tuple[tuple[str, str], ...]:
        """(name, value) for each node a custom-attribute selects (a string or number result: one value).
        An expression that fails gives nothing, as evQueue only logged it."""
        values: list[tuple[str, str]] = []
        context = EvalContext.for_summary(self.root, self._find)
        for attribute in self.root.iterfind("custom-attributes/custom-attribute"):
            name, select = attribute.get("name", ""), attribute.get("select", "")
            try:
                values.extend((name, value) for value in evaluate_strings(select, self.root, context))
            except (XPathError, WaitRequested):
                continue
        return tuple(values)

    def automatic_tags(self) -> tuple[str, ...]:
        tags: list[str] = []
        context = EvalContext.for_summary(self.root, self._find)
        for tag in self.root.iterfind("automatic-tags/automatic-tag"):
            try:
                if evaluate_boolean(tag.get("condition", "false()"), self.root, context):
                    tags.append(tag.get("name", ""))
            except (XPathError, WaitRequested):
                continue
        return tuple(tags)

    # --------------------------------------------------------------------------------------------- events

    def job_assigned(self, evqid: int, job_id: int) -> None:
        """The engine submitted the job running a QUEUED task: recorded in `tid` so a restart can find it."""
        task = self.task(evqid)
        if task is not None and task.get("status") == NodeStatus.QUEUED:
            task.set("tid", str(job_id))
            self._counters.touch(task)  # subscribers are told of its job

    def task_started(self, evqid: int, job_id: int, now: float) -> list[Action]:
        task = self.task(evqid)
        if task is None or task.get("status") != NodeStatus.QUEUED:
            return []  # a task aborted by a cancel while its job was starting: its end will be ignored too
        task.set("status", NodeStatus.EXECUTING)
        self._counters.touch(task)
        task.set("tid", str(job_id))
        task.set("execution_time", local_time(now))
        return self._settle(now)

    def task_progress(self, evqid: int, percent: int) -> None:
        """A `%NN` line on the task's fd 3."""
        task = self.task(evqid)
        if task is not None and task.get("status") in (NodeStatus.QUEUED, NodeStatus.EXECUTING):
            task.set("progression", str(min(100, max(0, percent))))

    def parses_output(self, evqid: int) -> bool:
        """Whether the task's stdout is parsed as XML should it succeed (output-method="XML"): only then does its
        TaskResult need `stdout_cut`."""
        task = self.task(evqid)
        return task is not None and task.get("output-method") == "XML"

    def task_ended(self, evqid: int, result: TaskResult, now: float) -> list[Action]:
        task = self.task(evqid)
        if task is None or task.get("status") not in (NodeStatus.QUEUED, NodeStatus.EXECUTING):
            return []
        retval = result.retval
        self._counters.touch(task)
        task.set("status", NodeStatus.TERMINATED)
        task.set("retval", str(retval))
        _drop(task, *_RUN_ATTRIBUTES)
        task.set("progression", "100")
        started = result.started_at if result.started_at is not None else now
        if task.get("execution_time") is None:
            task.set("execution_time", local_time(started))
        output = etree.SubElement(task, "output")
        output.set("retval", str(retval))
        output.set("execution_time", task.get("execution_time", local_time(started)))
        output.set("exit_time", local_time(result.ended_at if result.ended_at is not None else now))
        if result.signal is not None:
            output.set("signal", str(result.signal))
        if result.output_missing:
            # Not taken for a task that printed nothing (later tasks would read that as its output), whatever it
            # exited with: aborted as one whose XML is invalid, and not retried (debugresume runs it again).
            output.set("method", "text")
            output.text = document_text(result.stdout) or None
            task.set("status", NodeStatus.ABORTED)
            task.set("error", f"{OUTPUT_MISSING} ({result.output_missing})")
        elif retval == 0 and task.get("output-method") == "XML":
            self._store_xml_output(task, output, result)
        else:
            output.set("method", "text")
            output.text = document_text(result.stdout) or None
        if retval != 0 and not result.output_missing:
            if self.cancelling:
                task.set("error", NO_RETRY_CANCELLING)
            else:
                self._retry_or_fail(task, retval, now)
        etree.SubElement(task, "stderr").text = document_text(result.stderr) or None
        etree.SubElement(task, "log").text = document_text(result.log) or None
        self._after_task_settled(_job_of_task(task))
        self._reevaluate_waiting()
        return self._settle(now)

    def retry_due(self, evqid: int, now: float) -> list[Action]:
        task = self.task(evqid)
        if task is None or not _is_retrying(task):
            return []  # cancelled meanwhile, or a timer fired twice
        self._enqueue(task)
        return self._settle(now)

    def resubmit(self, evqid: int, now: float) -> list[Action]:
        """RunTask again for a QUEUED task whose job was lost before it was recorded (crash recovery)."""
        task = self.task(evqid)
        if task is None or task.get("status") != NodeStatus.QUEUED:
            return []
        _drop(task, "tid")
        try:
            return [self._run_task_action(task)]
        except _NodeAborted as error:
            self._abort(task, str(error))
            return self._settle(now)

    def cancel(self, now: float) -> list[Action]:
        """evQueue's cancel: queue nothing more, dequeue what is queued, retry nothing; running tasks finish."""
        if self.cancelling or self.status is InstanceStatus.TERMINATED:
            return []
        self.root.set("cancelling", "yes")
        for task in self._all_tasks():
            if task.get("status") == NodeStatus.QUEUED:
                _drop(task, "tid")
                self._abort(task, ABORTED_BY_USER)
                self._actions.append(DequeueTask(_evqid(task)))
            elif _is_retrying(task):
                _drop(task, "retry_at", RETRY_AT_UNIX)
                self._abort(task, ABORTED_BY_USER)
        return self._settle(now)

    # ---------------------------------------------------------------------------------------- running jobs

    def _run_subjobs(self, parent: etree._Element) -> None:
        for job in parent.findall("subjobs/job"):
            # A job runs once: later calls find it (or its clones) with its context set. Not "numbered": a job a
            # loop selected as its items is numbered to be their context, and still has to run.
            if job.get("context-id") is None:
                self._run_subjob(job, parent)

    def _run_subjob(self, job: etree._Element, context_node: etree._Element) -> None:
        job.set("context-id", str(self._evqid_of(context_node)))
        self._evqid_of(job)
        self._counters.touch(job)  # numbered: it gets counters (and loses them if skipped)
        if not self._condition_holds(job, context_node):
            return
        try:
            iterations = self._expand_loop(job, context_node)
        except _NodeAborted as error:
            self._abort(job, f"Error evaluating loop : {error}")
            return
        for clone, item in iterations:
            if clone is not job:
                self._counters.copied(clone)
            self._counters.touch(clone)
            if clone is not job:
                clone.set("context-id", str(self._evqid_of(item)))
                if clone is not iterations[0][0]:
                    self._renumber(clone)
            if self._condition_holds(clone, item):
                self._run_tasks(clone, item)

    def _run_tasks(self, job: etree._Element, context_node: etree._Element) -> None:
        for task in job.findall("tasks/task"):
            self._run_task(task, context_node)
        self._after_task_settled(job)

    def _after_task_settled(self, job: etree._Element) -> None:
        """A job's subjobs start once every task of it ended with retval 0 or was skipped."""
        # From the last: the tasks of a loop end about in order, so one still to run is found at once there, where
        # looking from the first went over every ended task at each task's end (n² for a loop of n tasks).
        tasks = job.find("tasks")
        if tasks is None or all(_succeeded(task) for task in tasks.iterchildren("task", reversed=True)):
            self._run_subjobs(job)

    def _run_task(self, task: etree._Element, context_node: etree._Element) -> None:
        if task.get("status") == NodeStatus.TERMINATED:
            return
        task.set("context-id", str(self._evqid_of(context_node)))
        self._evqid_of(task)
        if not self._condition_holds(task, context_node):
            return
        try:
            iterations = self._expand_loop(task, context_node)
        except _NodeAborted as error:
            self._abort(task, f"Error evaluating loop : {error}")
            return
        for clone, item in iterations:
            if clone is not task:
                clone.set("context-id", str(self._evqid_of(item)))
                if clone is not iterations[0][0]:
                    self._renumber(clone)
            if not self._condition_holds(clone, item):
                continue
            try:
                self._evaluate_values(clone, item)
            except _NodeAborted as error:
                self._abort(clone, str(error))
                continue
            self._enqueue(clone)

    def _condition_holds(self, node: etree._Element, context_node: etree._Element, *, can_wait: bool = True) -> bool:
        """Decide `condition`: True to go on; False when the node was SKIPPED, put WAITING or ABORTED."""
        condition = node.get("condition")
        if condition is None:
            return True
        try:
            holds = evaluate_boolean(condition, context_node, self._context_for(node))
        except WaitRequested:
            if not can_wait:
                raise _NodeAborted("evqWait() cannot be used here") from None
            node.set("status", NodeStatus.WAITING)
            self._counters.touch(node)
            node.set("details", "Waiting for condition to become true")
            return False
        except XPathError as error:
            if not can_wait:  # an input: its task is aborted by the caller
                raise _NodeAborted(f"Error computing condition : {error}") from None
            self._abort(node, f"Error evaluating condition : {error}")
            return False
        if not holds:
            node.set("status", NodeStatus.SKIPPED)
            self._counters.touch(node)
            if node.tag == "job":
                self._counters.ended_unrun(node)
            node.set("details", "Condition evaluates to false")
            return False
        del node.attrib["condition"]
        node.set("details", "Condition evaluates to true")
        return True

    def _expand_loop(
        self, node: etree._Element, context_node: etree._Element
    ) -> list[tuple[etree._Element, etree._Element]]:
        """(node, context) pairs to run: the node itself, or one clone per node the loop selects.

        As evQueue's handle_loop does, the clones go at the end of the node's parent, after its other children, and
        the node leaves: a looped <input> passes its values after the task's other inputs (CMDLINE), and looped jobs
        and tasks come after their siblings in the instance document."""
        loop = node.get("loop")
        if loop is None:
            return [(node, context_node)]
        del node.attrib["loop"]
        iteration_condition = node.get("iteration-condition")
        _drop(node, "iteration-condition")
        try:
            items = evaluate_nodes(loop, context_node, self._context_for(node))
        except (XPathError, WaitRequested) as error:
            raise _NodeAborted(str(error) or "evqWait() cannot be used in a loop") from None
        if any(isinstance(item, etree._ElementTree) for item in items):
            # libxml2 evaluates from an element, never from the document node: `.` and `@x` would not mean what
            # XPath says for it, and its copy would have no evqid for evqGetContext().
            raise _NodeAborted(
                f"loop '{loop}' selects the document node (/), which cannot be an iteration's context: select "
                "elements (/* is the document's <workflow> element)"
            )
        if any(not isinstance(item, etree._Element) for item in items):
            raise _NodeAborted(f"loop '{loop}' must select elements, to give each iteration its context")
        clones: list[tuple[etree._Element, etree._Element]] = []
        parent = node.getparent()
        assert parent is not None, "a looped job, task or input is always inside its parent"
        last = parent[-1]
        # The blanks between siblings (the node's tail) go after each clone; those that closed the parent, after the
        # last one: the instance document stays indented as its definition was.
        gap, closing = node.tail, last.tail
        for item in items:
            clone = copy.deepcopy(node)
            if iteration_condition is not None:
                clone.set("condition", iteration_condition)
            clone.tail = gap
            parent.append(clone)
            clones.append((clone, item))
        if clones:
            clones[-1][0].tail = closing
            if last is not node:
                last.tail = gap
            node.tail = None  # the clones carry it
        self._counters.expanded(node, len(clones))
        _remove(node)
        if clones:
            # The first clone takes the original's number, as evQueue's does.
            self._index[_evqid(clones[0][0])] = clones[0][0]
        return clones

    def _renumber(self, clone: etree._Element) -> None:
        """A loop's copy gets numbers of its own: itself, and whatever in it was numbered already (a task that
        another loop took as an item, say), so that no two nodes, and no two tasks' jobs, share one."""
        renumbered: dict[str, str] = {}
        for element in _elements(clone):
            old = element.get("evqid")
            if old is not None:
                renumbered[old] = str(self._new_evqid())
                element.set("evqid", renumbered[old])
                self._index[int(renumbered[old])] = element
                self._counters.touch(element)
        for element in _elements(clone):
            context = element.get("context-id")
            if context in renumbered and element is not clone:
                element.set("context-id", renumbered[context])

    def _context_for(self, node: etree._Element) -> EvalContext:
        return EvalContext.for_node(node, self.root, self._find)

    # --------------------------------------------------------------------------------------- input values

    def _evaluate_values(self, task: etree._Element, context_node: etree._Element) -> None:
        """Compute what a task is given, when it is enqueued: {xpath} attributes, inputs, stdin, script."""
        context = self._context_for(task)
        for attribute, what in (("host", "dynamic host"), ("queue_host", "dynamic queue host"), ("user", "user")):
            value = task.get(attribute)
            if value is not None:
                try:
                    task.set(attribute, expand_braces(value, context_node, context))
                except (XPathError, WaitRequested) as error:
                    raise _NodeAborted(f"Error computing {what} : {error}") from None
        for name in ("input", "stdin", "script"):
            for element in task.findall(name):
                self._evaluate_value(element, context_node)

    def _evaluate_value(self, element: etree._Element, context_node: etree._Element) -> None:
        if not self._condition_holds(element, context_node, can_wait=False):
            return
        try:
            iterations = self._expand_loop(element, context_node)
        except _NodeAborted as error:
            raise _NodeAborted(f"Error evaluating loop : {error}") from None
        context = self._context_for(element)
        for clone, item in iterations:
            clone.set("mode", "text")
            try:
                for value in list(clone.iter("value")):
                    _replace_with_text(value, evaluate_string(value.get("select", ""), item, context))
                for copy_element in list(clone.iter("copy")):
                    clone.set("mode", "xml")
                    room = MAX_DOCUMENT_DEPTH - _level(copy_element) + 1  # copies take the <copy>'s place
                    for selected in evaluate_nodes(copy_element.get("select", ""), item, context):
                        if isinstance(selected, etree._ElementTree):  # the document: what it holds, as `/*`
                            selected = selected.getroot()
                        nested = _depth(selected) if isinstance(selected, etree._Element) else 0
                        if nested > room:
                            raise _NodeAborted(
                                f"Error computing input value : <copy select> took elements that nest {nested} "
                                f"deep, where they can nest {room}: an instance document is kept within the "
                                f"{MAX_DOCUMENT_DEPTH} levels XML parsers read back"
                            )
                        _insert_copy_before(copy_element, selected)
                    _remove(copy_element)
            except (XPathError, WaitRequested) as error:
                raise _NodeAborted(f"Error computing input value : {error}") from None

    # -------------------------------------------------------------------------------------------- enqueue

    def _enqueue(self, task: etree._Element) -> None:
        if self.cancelling:
            self._abort(task, ABORTED_BY_USER)
            return
        try:
            action = self._run_task_action(task)
        except _NodeAborted as error:
            self._abort(task, str(error))
            return
        task.set("status", NodeStatus.QUEUED)
        self._counters.touch(task)
        self._actions.append(action)

    def _run_task_action(self, task: etree._Element) -> RunTask:
        """The job that runs a task, from the task's element alone (so a restored instance builds the same)."""
        # Only a host makes a task remote (evQueue's Task::GetHost). queue_host names the per-host queue of an evQueue
        # queue with dynamic="yes", and use-agent how a remote task is run: evQueue ignored both for a task without
        # a host, as jobd does (its queues are not dynamic). A user without a host is refused (see the notes).
        if task.get("host") or task.get("user") or self.root.get("host"):
            raise _NodeAborted(REMOTE_UNSUPPORTED)
        toml_name = task.get("task")
        definition = None
        if toml_name is not None:
            definition = self._tasks.get(toml_name)
            if definition is None:
                raise _NodeAborted(f"Unknown task name '{toml_name}'")
        queue = task.get("queue") or (definition.queue if definition else "")
        if queue not in self._queues:
            raise _NodeAborted(UNKNOWN_QUEUE)
        mode = task.get("parameters-mode")
        if mode is None:
            mode = "ENV" if definition is not None and definition.parameters is ParameterMode.ENV else "CMDLINE"
        inputs = [
            (item.get("name", ""), node_string(item))
            for item in task.findall("input")
            if item.get("status") not in (NodeStatus.SKIPPED, NodeStatus.ABORTED)
        ]
        if definition is not None and definition.http is not None and (inputs or task.find("stdin") is not None):
            raise _NodeAborted(f"task '{toml_name}' is an HTTP request: it takes no inputs and no stdin")
        env = dict(COMPAT_ENV)
        if definition is not None:
            env.update(definition.environment)
        arguments: list[str] = []
        if mode == "ENV":
            for name, value in inputs:
                if not ENV_NAME.fullmatch(name):
                    raise _NodeAborted(f"input name '{name}' is not an environment variable name")
                env[name] = value
        else:
            arguments = [value for _name, value in inputs]
        script = None
        if definition is not None:
            argv = (*definition.command, *arguments)
        elif task.get("type") == "SCRIPT":
            script_element = task.find("script")
            script = node_string(script_element) if script_element is not None else ""
            argv = tuple(arguments)
        else:
            try:
                argv = (*split_command(task.get("path", "")), *arguments)
            except ValueError as error:
                raise _NodeAborted(f"Error expanding task command line : {error}") from None
            if not argv:
                raise _NodeAborted("Error expanding task command line : empty path")
        return RunTask(
            evqid=_evqid(task),
            name=task.get("name") or task.get("path") or toml_name or "",
            queue=queue,
            argv=argv,
            env=env,
            stdin=_stdin_of(task),
            working_dir=task.get("wd") or (definition.working_dir if definition else None),
            script=script,
            merge_stderr=evqueue_boolean(task.get("merge-stderr", "no")) is True,
            timeout=definition.timeout if definition else None,
            # The workflow's own retries, when it gives any, replace the TOML task's (docs/workflows.md): both would
            # multiply, each try of evQueue's being retried by jobd's.
            retry=definition.retry if definition is not None and not _retries_given(task) else None,
            task=toml_name,
            http=definition.http if definition else None,
            definition=definition,
        )

    # ---------------------------------------------------------------------------------------- task results

    def _store_xml_output(self, task: etree._Element, output: etree._Element, result: TaskResult) -> None:
        why = ""
        if len(result.stdout) > MAX_DOCUMENT_XML:
            why = f" (more than the {MAX_DOCUMENT_XML} bytes of XML an instance document keeps of an output)"
        elif result.stdout_cut is OutputCut.MAX_OUTPUT:
            why = f" (its output was cut at {len(result.stdout)} bytes: raise its max_output)"
        elif result.stdout_cut is OutputCut.UNWRITTEN:
            # Said whether or not what was kept parses: what followed it is gone, and later tasks would read less.
            why = (
                f" (its output was cut at {len(result.stdout)} bytes: jobd could not write the rest, its disk was full)"
            )
        try:
            if why:
                raise InvalidXml(why)
            document = safexml.parse(result.stdout, "task output")
            nested, room = _depth(document), MAX_DOCUMENT_DEPTH - _level(output)
            if nested > room:
                why = (
                    f" (its elements nest {nested} deep, where an output can nest {room}: an instance "
                    f"document is kept within the {MAX_DOCUMENT_DEPTH} levels XML parsers read back)"
                )
                raise InvalidXml(why)
        except InvalidXml as error:
            if isinstance(error, safexml.DtdRefused):  # well-formed, maybe: say why it is refused all the same
                why = f" ({DTD_IN_OUTPUT})"
            # The task succeeded but later tasks may need its XML: the workflow cannot go on past it.
            output.set("method", "text")
            output.text = document_text(result.stdout) or None
            task.set("status", NodeStatus.ABORTED)
            task.set("error", INVALID_XML + why)
            return
        output.set("method", "xml")
        for element in document.iter():
            if isinstance(element.tag, str):
                _drop(element, "evqid")
        output.append(document)

    def _retry_or_fail(self, task: etree._Element, retval: int, now: float) -> None:
        """evQueue's retry rules (§5.2): a named schedule walked level by level, else retry_delay × retry_times."""
        schedule = task.get("retry_schedule")
        level = int(task.get("retry_schedule_level", "0"))
        if schedule and level == 0:
            delay, times = self._next_schedule_level(task, schedule)
        else:
            if task.get("retry_delay") is None or task.get("retry_times") is None:
                return  # no retry policy: the task failed
            delay, times = float(task.get("retry_delay", "0")), int(task.get("retry_times", "0"))
        if schedule and times == 0:
            delay, times = self._next_schedule_level(task, schedule)
        if delay <= 0 or times <= 0:
            return
        wanted = task.get("retry_retval")
        if wanted is not None and wanted.strip() != str(retval):
            return
        task.set("retry_at", local_time(now + delay))
        task.set(RETRY_AT_UNIX, repr(now + delay))
        task.set("retry_times", str(times - 1))
        self._actions.append(RetryLater(_evqid(task), delay, now + delay))

    def _next_schedule_level(self, task: etree._Element, schedule: str) -> tuple[float, int]:
        """The next level of the instance's copy of the schedule: its delay (seconds, a fraction for a TOML level
        such as `delay = 0.5`) and times; (0, 0) after the last level."""
        level = int(task.get("retry_schedule_level", "0")) + 1
        task.set("retry_schedule_level", str(level))
        levels = self.root.findall(f"schedules/schedule[@name={_xpath_literal(schedule)}]/level")
        if level > len(levels):
            return 0, 0
        chosen = levels[level - 1]
        task.set("retry_delay", chosen.get("retry_delay", "0"))
        task.set("retry_times", chosen.get("retry_times", "0"))
        return float(chosen.get("retry_delay", "0")), int(chosen.get("retry_times", "0"))

    def _copy_retry_schedules(self, workflow: str) -> None:
        """Each named retry schedule used is copied into the instance, so a reload cannot change a running one."""
        wanted: list[str] = []
        for task in self.root.iter("task"):
            name = task.get("retry_schedule")
            if name and name not in wanted:
                wanted.append(name)
        if not wanted:
            return
        schedules = self.root.find("schedules")
        if schedules is None:
            schedules = etree.SubElement(self.root, "schedules")
        for name in wanted:
            definition = self._retry_schedules.get(name)
            if definition is None:
                defined = ", ".join(sorted(self._retry_schedules)) or "none"
                raise ConfigError(
                    f"workflow {workflow}: retry_schedule '{name}' is not a defined [retry_schedule.NAME] "
                    f"(defined: {defined})"
                )
            etree.SubElement(schedules, "schedule", name=name).extend(retry_levels(definition))

    # ----------------------------------------------------------------------------------------- waiting nodes

    def _reevaluate_waiting(self) -> None:
        """evqWait(): every WAITING job and task is decided again after each task end, in document order."""
        self._counters.update()
        if not self._counters.waiting():
            return  # nothing waits: no walk over the whole document
        for node in [*structural_nodes(self.root)]:
            if node.get("status") != NodeStatus.WAITING:
                continue
            del node.attrib["status"]
            self._counters.touch(node)
            _drop(node, "details")
            found = self._find(int(node.get("context-id", "0")))
            context_node = found if found is not None else self.root
            if node.tag == "task":
                self._run_task(node, context_node)
                self._after_task_settled(_job_of_task(node))
            else:
                self._run_subjob(node, context_node)

    # ------------------------------------------------------------------------------------------ bookkeeping

    def _abort(self, node: etree._Element, error: str) -> None:
        node.set("status", NodeStatus.ABORTED)
        node.set("error", error)
        self._counters.touch(node)
        if node.tag == "job":
            self._counters.ended_unrun(node)

    def ended_by_jobd(self, now: float, errors: int) -> None:
        """jobd itself failed this instance (a bug, Instances._broken): the document ends as the summary does, with
        `errors` (the error that ended it counted), however far its tasks had come."""
        self.root.set("status", InstanceStatus.TERMINATED)
        self.root.set("end_time", local_time(now))
        self.root.set("errors", str(errors))

    def _settle(self, now: float) -> list[Action]:
        """End of an event: count its changes, finish the instance if nothing runs or waits to retry, hand over
        actions."""
        self._counters.update()
        counters = self.counters()
        if (
            self.status is InstanceStatus.EXECUTING
            and counters["running_tasks"] == 0
            and counters["retrying_tasks"] == 0
        ):
            self.root.set("status", InstanceStatus.TERMINATED)
            self.root.set("end_time", local_time(now))
            self.root.set("errors", str(counters["error_tasks"]))
            self._actions.append(
                InstanceFinished(
                    InstanceStatus.TERMINATED,
                    counters["error_tasks"],
                    self.custom_attributes(),
                    self.automatic_tags(),
                )
            )
        actions, self._actions = self._actions, []
        return actions

    def _all_tasks(self) -> Iterator[etree._Element]:
        return (node for node in structural_nodes(self.root) if node.tag == "task")

    def task_nodes(self) -> Iterator[tuple[etree._Element, bool]]:
        """Every <task> of the workflow in document order (read them, do not change them), each with whether it
        will never run because a job above it was SKIPPED or ABORTED."""

        def walk(parent: etree._Element, dead: bool) -> Iterator[tuple[etree._Element, bool]]:
            for job in parent.iterfind("subjobs/job"):
                gone = dead or job.get("status") in (NodeStatus.SKIPPED, NodeStatus.ABORTED)
                for task in job.iterfind("tasks/task"):
                    yield task, gone
                yield from walk(job, gone)

        return walk(self.root, False)

    def _evqid_of(self, node: etree._Element) -> int:
        """A node's evqid, numbering it first if it has none (evQueue numbers nodes as they are first used)."""
        existing = node.get("evqid")
        if existing is not None:
            return int(existing)
        number = self._new_evqid()
        node.set("evqid", str(number))
        self._index[number] = node
        self._counters.touch(node)  # a job numbered gets counters
        return number

    def _new_evqid(self) -> int:
        number = self._next_evqid
        self._next_evqid += 1
        self.root.set(NEXT_EVQID, str(self._next_evqid))
        return number

    def _find(self, evqid: int) -> etree._Element | None:
        node = self._index.get(evqid)
        if node is not None and node.get("evqid") == str(evqid) and _within(node, self.root):
            return node
        # Not indexed yet (a restored or resumed instance indexes nothing), or gone from the document (a loop's
        # first copy takes the place of the node it copies, with the numbered nodes inside it): one walk indexes
        # every numbered node, the first in document order for a number, so that the next lookups are direct. A
        # loop over n items calling evqGetContext() walked the document at each call (n², the daemon froze).
        self._index = {}
        for element in _elements(self.root):
            number = element.get("evqid")
            if number is not None:
                self._index.setdefault(int(number), element)
        return self._index.get(evqid)


# ----------------------------------------------------------------------------------------------------- helpers


def local_time(timestamp: float) -> str:
    return time.strftime(LOCAL_TIME, time.localtime(timestamp))


# Control characters XML 1.0 cannot hold become their Unicode control pictures (U+2400 + code); the two
# non-characters U+FFFE/U+FFFF become the replacement character. One translate() pass, whatever the size.
_XML_SAFE = {code: 0x2400 + code for code in range(0x20) if code not in (0x09, 0x0A, 0x0D)}
_XML_SAFE.update({0xFFFE: 0xFFFD, 0xFFFF: 0xFFFD})


def document_text(data: bytes | str) -> str:
    """A stream as the instance document keeps it: at most MAX_DOCUMENT_TEXT of it, made XML-safe."""
    if len(data) > MAX_DOCUMENT_TEXT:
        cut = data[:MAX_DOCUMENT_TEXT]
        return xml_safe_text(cut.decode("utf-8", "replace") if isinstance(cut, bytes) else cut) + TRUNCATED_MARK
    return xml_safe_text(data)


def _retries_given(task: etree._Element) -> bool:
    return any(task.get(name) is not None for name in ("retry_times", "retry_delay", "retry_schedule"))


def xml_safe_text(data: bytes | str) -> str:
    """Task output as text an XML document can hold: invalid UTF-8 → U+FFFD, control characters → ␀…␟."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    return text.translate(_XML_SAFE)


def check_parameters(workflow: str, declared: Sequence[str], given: Mapping[str, str]) -> None:
    """A launch's parameters against those the workflow declares: InvalidWorkflowParameters with evQueue's message,
    then what the workflow takes (as UNKNOWN_WORKFLOW's message names the workflows there are)."""
    takes = f"; {workflow} takes: {', '.join(declared)}" if declared else f"; {workflow} takes no parameters"
    for name in given:
        if name not in declared:
            message = f"Unknown parameter : {name}{takes}"
            raise InvalidWorkflowParameters(message, parameter=name, expected=list(declared))
    if len(given) != len(declared):
        missing = [name for name in declared if name not in given]
        raise InvalidWorkflowParameters(
            f"Invalid number of parameters passed to workflow (passed {len(given)}, expected {len(declared)})"
            f"{takes} (missing: {', '.join(missing)})",
            expected=list(declared),
        )


def _fill_parameters(root: etree._Element, workflow: str, given: Mapping[str, str]) -> None:
    declared = {element.get("name", ""): element for element in root.iterfind("parameters/parameter")}
    check_parameters(workflow, list(declared), given)
    for name, value in given.items():
        element = declared[name]
        for child in list(element):
            element.remove(child)
        element.text = xml_safe_text(value)


def _drop(element: etree._Element, *names: str) -> None:
    for name in names:
        if name in element.attrib:
            del element.attrib[name]


def _level(element: etree._Element) -> int:
    """How deep `element` is in its document: 1 for the root."""
    return 1 + sum(1 for _ in element.iterancestors())


def _depth(element: etree._Element) -> int:
    """How many levels of elements `element` and its descendants make: 1 for an element without children."""
    deepest = level = 0
    for event, _ in etree.iterwalk(element, events=("start", "end")):
        level += 1 if event == "start" else -1
        deepest = max(deepest, level)
    return deepest


def _elements(root: etree._Element) -> Iterator[etree._Element]:
    return (element for element in root.iter() if isinstance(element.tag, str))


def _evqid(node: etree._Element) -> int:
    return int(node.get("evqid", "0"))


def _within(node: etree._Element, root: etree._Element) -> bool:
    top = node
    for ancestor in node.iterancestors():
        top = ancestor
    return top is root


def _job_of_task(task: etree._Element) -> etree._Element:
    tasks = task.getparent()
    job = tasks.getparent() if tasks is not None else None
    assert job is not None, "a task is always inside job/tasks"
    return job


def _succeeded(task: etree._Element) -> bool:
    status = task.get("status")
    return status == NodeStatus.SKIPPED or (status == NodeStatus.TERMINATED and task.get("retval") == "0")


# What a task aborted before it was enqueued says (see debug_resume): its condition, loop or inputs failed.
_ABORTED_BEFORE_ENQUEUE = ("Error evaluating", "Error computing", "evqWait()")
_RUN_ATTRIBUTES = ("tid", "pid", "retry_at", RETRY_AT_UNIX)  # what a task's run under way adds, gone once it ends


def _resumable_failure(task: etree._Element) -> bool:
    """A task debug_resume runs again: it failed, or was aborted once its values were computed."""
    status = task.get("status")
    if status == NodeStatus.TERMINATED:
        return task.get("retval") != "0" and task.get("retry_at") is None
    return status == NodeStatus.ABORTED and not task.get("error", "").startswith(_ABORTED_BEFORE_ENQUEUE)


def _is_retrying(task: etree._Element) -> bool:
    return task.get("status") == NodeStatus.TERMINATED and task.get("retry_at") is not None


def _retry_due(task: etree._Element) -> float:
    """When a task waiting to be retried is due; from retry_at in a document saved before retry-at-unix existed."""
    exact = task.get(RETRY_AT_UNIX)
    if exact is not None:
        return float(exact)
    return time.mktime(time.strptime(task.get("retry_at", ""), LOCAL_TIME))


def _retry_delay(task: etree._Element) -> float | None:
    """The delay the retry of a task waiting to be retried was set for (`_retry_or_fail` leaves it in `retry_delay`,
    a retry schedule's level's included); None when the document does not say it as a number."""
    try:
        delay = float(task.get("retry_delay", ""))
    except ValueError:
        return None
    return delay if math.isfinite(delay) and delay >= 0 else None


def _stdin_of(task: etree._Element) -> bytes | None:
    element = task.find("stdin")
    if element is None:
        return None
    if element.get("mode") == "xml":
        return etree.tostring(element, encoding="utf-8", with_tail=False)
    return node_string(element).encode("utf-8")


def _remove(element: etree._Element) -> None:
    """Remove an element but keep the text that followed it (lxml's remove() drops the tail with it)."""
    parent = element.getparent()
    if parent is None:
        return
    _append_text_before(element, element.tail or "")
    parent.remove(element)


def _replace_with_text(element: etree._Element, text: str) -> None:
    _append_text_before(element, text + (element.tail or ""))
    parent = element.getparent()
    if parent is not None:
        parent.remove(element)


def _append_text_before(element: etree._Element, text: str) -> None:
    if not text:
        return
    previous = element.getprevious()
    if previous is not None:
        previous.tail = (previous.tail or "") + text
    else:
        parent = element.getparent()
        if parent is not None:
            parent.text = (parent.text or "") + text


def _insert_copy_before(anchor: etree._Element, selected: Any) -> None:
    """<copy select>: a deep copy of an element (without evqids, which must stay unique), else its text."""
    if isinstance(selected, etree._Element):
        duplicate = copy.deepcopy(selected)
        duplicate.tail = None
        for element in _elements(duplicate):
            _drop(element, "evqid")
        anchor.addprevious(duplicate)
    else:
        _append_text_before(anchor, str(selected))


def _xpath_literal(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return "concat('" + "', \"'\", '".join(value.split("'")) + "')"


def retry_levels(schedule: RetrySchedule) -> list[etree._Element]:
    """A retry schedule's levels as evQueue writes them, `<level retry_delay retry_times/>` each: in the copy an
    instance keeps of the schedules its tasks use, and in evQueue's `retry_schedules list`."""
    return [
        etree.Element("level", retry_delay=_whole(level.delay), retry_times=str(level.times))
        for level in schedule.levels
    ]


def _whole(number: float) -> str:
    return str(int(number)) if number == int(number) else str(number)
