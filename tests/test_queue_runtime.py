"""jobd.engine.queues.QueueRuntime in-process: what its ready heap holds, counted, not timed.

A cancelled job leaves the ready set at once, but its heap entry is only dropped when it surfaces at the top, which
never happens while the queue is paused (nothing is taken from it). A paused queue that is submitted to and
cancelled from again and again, a few jobs waiting all along, would hold an entry for every job ever cancelled:
memory growing without bound in a daemon that runs for months. `remove` rebuilds the heap from the ready set once
the stale entries outnumber the live ones (more than twice as many entries as ready jobs, plus 64).
"""

from __future__ import annotations

from jobd.engine.queues import QueueRuntime
from jobd.model import Job, JobSpec, JobState, QueueDef, Scheduler

CYCLES = 10_000  # submit-and-cancel rounds: far more than the bound allows to pile up


def _job(job_id: int, priority: int) -> Job:
    spec = JobSpec(command=("/bin/true",), queue="q", priority=priority)
    return Job(id=job_id, spec=spec, state=JobState.QUEUED, created_at=0.0, run_at=0.0)


def test_cancels_in_a_paused_queue_leave_its_heap_bounded_by_the_jobs_still_waiting() -> None:
    queue = QueueRuntime(QueueDef("q", scheduler=Scheduler.PRIORITY), paused=True)
    waiting = [_job(job_id, priority) for job_id, priority in ((1, 5), (2, 0), (3, 5), (4, 1), (5, 0))]
    for job in waiting:
        queue.push(job)
    largest = 0
    for job_id in range(6, 6 + CYCLES):
        queue.push(_job(job_id, job_id % 7))
        assert queue.remove(job_id)
        largest = max(largest, len(queue._heap))  # the entries held, live and stale
    assert queue.ready_count() == len(waiting)
    # After each cancel at most twice the ready jobs plus 64 entries, not one per job ever cancelled.
    assert largest <= 2 * len(waiting) + 64, largest
    # What was rebuilt still holds every waiting job once, in the scheduler's order (priority, then submission).
    queue.paused = False
    taken = []
    while (job := queue.pop_next()) is not None:
        taken.append(job.id)
    assert taken == [2, 5, 4, 1, 3]
    assert queue.is_idle() and not queue.remove(1)
