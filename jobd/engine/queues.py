"""One queue at run time: its definition, the jobs ready to run in scheduler order, and the jobs it runs."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from jobd.model import Job, QueueDef, Scheduler


def order_key(scheduler: Scheduler, job: Job) -> tuple[int, ...]:
    """Position of a ready job: submission order (ids grow with submission), after the priority value (lower first)
    unless the queue's scheduler is FIFO."""
    if scheduler is Scheduler.FIFO:
        return (job.id,)
    return (job.spec.priority, job.id)


@dataclass
class QueueRuntime:
    definition: QueueDef
    paused: bool = False
    closed: bool = False  # removed from the configuration: drains, takes nothing new
    running: set[int] = field(default_factory=set)
    _heap: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    _ready: dict[int, Job] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.definition.name

    def push(self, job: Job) -> None:
        self._ready[job.id] = job
        heapq.heappush(self._heap, (order_key(self.definition.scheduler, job), job.id))

    def remove(self, job_id: int) -> bool:
        """Take a job out of the ready set (cancel); its heap entry is skipped when it surfaces."""
        removed = self._ready.pop(job_id, None) is not None
        if len(self._heap) > 2 * len(self._ready) + 64:  # a paused queue with many cancels: keep memory bounded
            self._rebuild()
        return removed

    def _rebuild(self) -> None:
        self._heap = [(order_key(self.definition.scheduler, job), job.id) for job in self._ready.values()]
        heapq.heapify(self._heap)

    def ready_count(self) -> int:
        return len(self._ready)

    def free_slots(self) -> int:
        if self.paused:
            return 0
        return max(0, self.definition.concurrency - len(self.running))

    def pop_next(self) -> Job | None:
        while self._heap:
            _, job_id = heapq.heappop(self._heap)
            job = self._ready.pop(job_id, None)
            if job is not None:
                return job
        return None

    def redefine(self, definition: QueueDef) -> None:
        """Apply a reloaded definition; the ready order is rebuilt if the scheduler changed."""
        old_scheduler = self.definition.scheduler
        self.definition = definition
        if definition.scheduler is not old_scheduler:
            self._rebuild()

    def is_idle(self) -> bool:
        return not self._ready and not self.running
