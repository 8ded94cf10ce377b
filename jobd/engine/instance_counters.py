"""The counters of a workflow instance document, kept up to date as its nodes change.

evQueue's document carries five counters (running_tasks, queued_tasks, retrying_tasks, error_tasks,
waiting_conditions) on the <workflow> root and on every <job> that has run. A job's counters are the sum of the
*shares* of the structural nodes (the jobs and tasks of the workflow, not those copied into inputs or outputs) at
or below it, and a node's share follows from its own attributes alone (share()).

Counting the whole document again after every event made each event cost in proportion to the instance's size, so
a loop of n tasks took time in n² (2,000 iterations: 159 s, 79 ms of jobd's CPU per task). Instead the machine
names each node it may have changed (touch()), and update() moves the difference between a touched node's share
now and the share last counted for it, taking it from the jobs it was counted in and adding it to the jobs above it
now. recount() counts a document from nothing: at launch, and for a restored or resumed document, whose counters
are not trusted.

Two more figures, for the instance's progress (jobd/engine/instances.py): how many tasks the workflow has (a loop
changes it: expanded()) and how many of those will never run because a job above them was skipped or aborted before
they were reached (ended_unrun()). And the tasks touched since they were last asked for (take_changed_tasks()),
which is what subscribers are told of.
"""

from __future__ import annotations

from collections.abc import Iterator

from lxml import etree

COUNTERS = ("running_tasks", "queued_tasks", "retrying_tasks", "error_tasks", "waiting_conditions")
Share = tuple[int, int, int, int, int]  # one amount per counter, in the order of COUNTERS
_NONE: Share = (0, 0, 0, 0, 0)
_RUNNING: Share = (1, 0, 0, 0, 0)
_RUNNING_QUEUED: Share = (1, 1, 0, 0, 0)
_RETRYING: Share = (0, 0, 1, 0, 0)
_ERROR: Share = (0, 0, 0, 1, 0)
_WAITING: Share = (0, 0, 0, 0, 1)


def share(node: etree._Element) -> Share:
    """What one structural node adds to its own counters (a job's) and to those of every job above it.

    WAITING (a job or a task): a waiting condition; ABORTED: an error; a task QUEUED: running and queued, EXECUTING:
    running; TERMINATED waiting to be retried (`retry_at`): retrying, else an error unless its retval is 0.
    """
    status = node.get("status")
    if status == "WAITING":
        return _WAITING
    if status == "ABORTED":
        return _ERROR
    if node.tag != "task" or status is None:
        return _NONE
    if status == "QUEUED":
        return _RUNNING_QUEUED
    if status == "EXECUTING":
        return _RUNNING
    if status == "TERMINATED":
        if node.get("retry_at") is not None:
            return _RETRYING
        if node.get("retval") != "0":
            return _ERROR
    return _NONE


def structural_nodes(root: etree._Element) -> Iterator[etree._Element]:
    """Jobs and tasks of the workflow in document order, not those copied into inputs or outputs."""

    def walk(parent: etree._Element) -> Iterator[etree._Element]:
        for job in parent.iterfind("subjobs/job"):
            yield job
            yield from job.iterfind("tasks/task")
            yield from walk(job)

    return walk(root)


class Counters:
    """The counters of one instance document (its root)."""

    def __init__(self, root: etree._Element) -> None:
        self._root = root
        # Each node whose share is counted: that share, and the jobs (and root) it was added to.
        self._counted: dict[etree._Element, tuple[Share, tuple[etree._Element, ...]]] = {}
        self._touched: dict[etree._Element, None] = {}  # in the order touched; a node once
        self._changed_tasks: dict[etree._Element, None] = {}  # the same for tasks, kept until taken
        self.tasks = 0  # the workflow's tasks (structural: not those copied into inputs or outputs)
        self.never_run = 0  # of them, not reached and under a job that was SKIPPED or ABORTED

    def touch(self, node: etree._Element) -> None:
        """`node` may have changed its share, or been numbered, or be about to leave the document. Only a job or a
        task of the workflow counts: an element of a task's output that a loop numbered to be an iteration's context
        is left alone, even one named <task> or <job>."""
        if not self._structural(node):
            return
        self._touched[node] = None
        if node.tag == "task":
            self._changed_tasks[node] = None

    def copied(self, clone: etree._Element) -> None:
        """`clone` is a copy a loop made of a job or a task: whatever counters it carries are its original's."""
        _erase(clone)

    def take_changed_tasks(self) -> list[etree._Element]:
        """The tasks touched since the last call, in the order first touched (some may have left the document)."""
        changed = list(self._changed_tasks)
        self._changed_tasks.clear()
        return changed

    def expanded(self, node: etree._Element, copies: int) -> None:
        """A loop put `copies` copies of `node` (a job, a task, or an input: no task) in its place."""
        self.tasks += (copies - 1) * sum(1 for _ in _tasks_at_or_below(node))

    def ended_unrun(self, job: etree._Element) -> None:
        """`job` was SKIPPED or ABORTED: the tasks below it that were not reached never will be."""
        self.never_run += sum(1 for task in _tasks_at_or_below(job) if task.get("evqid") is None)

    def waiting(self) -> int:
        """The nodes WAITING for their condition, as of the last update()."""
        return int(self._root.get("waiting_conditions", "0"))

    def recount(self) -> None:
        """Count the whole document from nothing, and write every job's counters."""
        self._touched.clear()
        self._changed_tasks.clear()
        self._counted.clear()
        self.tasks = self.never_run = 0
        totals: dict[etree._Element, list[int]] = {}
        jobs = [self._root]
        ended: set[etree._Element] = set()  # SKIPPED or ABORTED jobs, and the jobs below them
        for node in structural_nodes(self._root):
            above = node.getparent()
            unrun = above is not None and above.getparent() in ended  # job/subjobs/job, job/tasks/task
            if node.tag == "job":
                jobs.append(node)
                if unrun or node.get("status") in ("SKIPPED", "ABORTED"):
                    ended.add(node)
            else:
                self.tasks += 1
                if unrun and node.get("evqid") is None:
                    self.never_run += 1
            part = share(node)
            if part is not _NONE:
                owners = self._owners(node)
                self._counted[node] = (part, owners)
                for owner in owners:
                    total = totals.setdefault(owner, [0] * len(COUNTERS))
                    for position, amount in enumerate(part):
                        total[position] += amount
        for job in jobs:
            if self._carries_counters(job):
                _write(job, totals.get(job, [0] * len(COUNTERS)))
            else:
                _erase(job)
        self._root.set("errors", self._root.get("error_tasks", "0"))

    def update(self) -> None:
        """Bring the counters up to date with the nodes touched since the last update() or recount()."""
        if not self._touched:
            return
        deltas: dict[etree._Element, list[int]] = {}
        attached: list[etree._Element] = []
        for node in self._touched:
            in_document = _within(node, self._root)
            if in_document:
                attached.append(node)
            part = share(node) if in_document else _NONE
            before, owners_before = self._counted.pop(node, (_NONE, ()))
            owners = self._owners(node) if part is not _NONE else ()
            if part is not _NONE:
                self._counted[node] = (part, owners)
            if part == before and owners == owners_before:
                continue
            for owners_of, sign, amounts in ((owners_before, -1, before), (owners, 1, part)):
                for owner in owners_of:
                    delta = deltas.setdefault(owner, [0] * len(COUNTERS))
                    for position, amount in enumerate(amounts):
                        delta[position] += sign * amount
        self._touched.clear()
        for owner, delta in deltas.items():
            if any(delta):
                now = [int(owner.get(name, "0")) + change for name, change in zip(COUNTERS, delta, strict=True)]
                _write(owner, now)
        for node in attached:  # a job numbered (it has run) gets its counters, one skipped has none
            if node.tag == "job":
                if self._carries_counters(node):
                    _write(node, [int(node.get(name, "0")) for name in COUNTERS])
                else:
                    _erase(node)
        self._root.set("errors", self._root.get("error_tasks", "0"))

    def _owners(self, node: etree._Element) -> tuple[etree._Element, ...]:
        """The node itself if it is a job, and every job above it up to the root."""
        owners = [node] if node.tag == "job" else []
        owners.extend(node.iterancestors("job", "workflow"))
        return tuple(owners)

    def _structural(self, node: etree._Element) -> bool:
        """Whether `node` is a job or a task of the workflow: workflow(/subjobs/job)+(/tasks/task)?."""
        if node.tag == "task":
            holder = node.getparent()
            if holder is None or holder.tag != "tasks":
                return False
            job = holder.getparent()
        else:
            job = node
        while job is not None and job.tag == "job":
            holder = job.getparent()
            if holder is None or holder.tag != "subjobs":
                return False
            job = holder.getparent()
            if job is self._root:
                return True
        return False

    def _carries_counters(self, job: etree._Element) -> bool:
        return job is self._root or (job.get("evqid") is not None and job.get("status") != "SKIPPED")


def _tasks_at_or_below(node: etree._Element) -> Iterator[etree._Element]:
    """The structural tasks of a job's subtree, or a task itself."""
    if node.tag == "task":
        yield node
    elif node.tag == "job":
        yield from node.iterfind("tasks/task")
        yield from (below for below in structural_nodes(node) if below.tag == "task")


def _write(job: etree._Element, values: list[int]) -> None:
    for name, value in zip(COUNTERS, values, strict=True):
        job.set(name, str(value))


def _erase(job: etree._Element) -> None:
    for name in COUNTERS:
        if name in job.attrib:
            del job.attrib[name]


def _within(node: etree._Element, root: etree._Element) -> bool:
    top = node
    for ancestor in node.iterancestors():
        top = ancestor
    return top is root
