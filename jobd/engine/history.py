"""History retention: finished jobs expire after `keep_days`, or beyond the `keep_last` that finished last.

No periodic sweep: one loop timer sleeps until the oldest finished job is due, trims, and sleeps again until the
next one is. `keep_last` is applied after jobs finish (once per turn of the loop, however many finished in it), at
start-up and at a reload. The finished jobs are counted here, so applying it costs an index lookup, not a count.
Each trim deletes at most TRIM_BATCH jobs and goes on in the next turn of the loop: a first trim of a long
history (a reload that lowers keep_last) does not hold the loop for seconds. A deletion the store refuses (a full
disk) is tried again every STORE_RETRY_SECONDS until it is taken. A job whose callbacks are still pending is kept
until they are done, and does not count towards keep_last meanwhile: the store leaves it out of what retention
reads (its index of jobs that may expire), so however many wait for a callback URL that is down, a trim reads only
the jobs it may take; jobd.engine.callbacks tells the keeper when a job leaves that index and when it comes back.
A job held (hold(), release()) is kept until it is released: a workflow instance was told of its end, and the
document it saved does not show that end yet.

`keep_days` also applies to ended workflow instances and to audit log entries (keep_last counts jobs only): the
same timer sleeps until the oldest of them is due too, and each trim takes at most TRIM_BATCH of each kind. Left
alone, both grew with every instance and every command for the life of the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from jobd.model import History
from jobd.store import STORE_RETRY_SECONDS, Store, store_failure

SECONDS_PER_DAY = 86400
# Jobs deleted per turn of the loop. Removing their output directories takes most of it (a job's two or three
# files each): a thousand held the loop 0.4-0.8 s.
TRIM_BATCH = 100
# ... and bytes of ended workflow instances' documents per turn: deleting a document reads each of its pages, and
# they hold up to 1 MiB of each task's output (100 of 5 MB held the loop 3.7 s).
TRIM_DOCUMENT_BYTES = 8 * 1024 * 1024


class HistoryKeeper:
    def __init__(
        self,
        store: Store,
        rules: History,
        clock: Callable[[], float],
        remove_output: Callable[[int], None],
        store_failed: Callable[[str, Exception], None],
        store_works: Callable[[], None],
    ) -> None:
        self._store = store
        self._rules = rules
        self._clock = clock
        self._remove_output = remove_output
        # A write the store refused is told here (logged once, shown in the status line), and one that works.
        self._store_failed = store_failed
        self._store_works = store_works
        self._timer: asyncio.TimerHandle | None = None
        self._trim_soon: asyncio.Handle | None = None
        self._finished: int | None = None  # jobs that may expire, counted from the store when first needed
        self._held: set[int] = set()  # finished jobs kept whatever the rules, until released (few: see hold())
        # When the oldest ended instance or audit entry is due under keep_days (None: none is): until then a trim does
        # not look for them, so the trims keep_last makes as jobs finish cost no more than before.
        self._others_due: float | None = None
        self._stopped = False  # jobd is stopping: nothing is trimmed any more, whatever is released

    def configure(self, rules: History) -> None:
        """New retention rules (a reload): applied at once."""
        self._rules = rules
        self.rearm()

    def hold(self, job_id: int) -> None:
        """Keep a finished job whatever the rules until release(): a workflow instance has been told of its end, and
        the document it saved does not show it yet. A restart after a crash replays that end from the job, and
        finds the jobs the instance submitted by their keys: a job expired by then was taken for lost, or its
        task run again. Instances release their jobs as they save, within a fraction of a second mostly."""
        self._held.add(job_id)

    def release(self, job_ids: Iterable[int]) -> None:
        """The ends of these jobs are saved: they follow the rules again, and those the rules no longer keep go."""
        released = self._held.intersection(job_ids)
        if released:
            self._held -= released
            self.rearm()

    def held_for_callbacks(self) -> None:
        """A finished job's callbacks were queued: the store keeps it until they are done, outside the count."""
        if self._finished is not None:
            self._finished -= 1

    def callbacks_done(self) -> None:
        """The last pending callback delivery of a finished job is done: the job follows the rules again."""
        if self._finished is not None:
            self._finished += 1
        self.rearm()

    def audit_written(self) -> None:
        """Audit entries were written (Store.audit_written): with no timer armed (nothing else is due), the oldest
        of them would otherwise wait for the next job to finish, or for the next reload or start."""
        if self._timer is None and self._rules.keep_days is not None and not self._stopped:
            self.rearm()

    def job_finished(self) -> None:
        if self._finished is not None:
            self._finished += 1
        if self._rules.keep_last is not None:
            # After this turn of the loop: what reads a finished job's output as it finishes (a workflow instance
            # taking its task's output) runs first, and the finishes of one turn share one trim.
            self._schedule_trim()
        if self._timer is None and self._rules.keep_days is not None:
            self.rearm()

    def rearm(self) -> None:
        """Apply keep_last soon, and sleep until the oldest finished job, ended instance or audit entry expires."""
        self.disarm()
        if self._stopped:
            return
        if self._rules.keep_last is not None:
            self._schedule_trim()
        self._others_due = None
        if self._rules.keep_days is None:
            return
        keep = self._rules.keep_days * SECONDS_PER_DAY
        others = self._store.oldest_instance_or_audit_at()
        if others is not None:
            self._others_due = others + keep
        oldest = [moment for moment in (self._store.oldest_expirable_at(self._held), others) if moment is not None]
        if not oldest:
            return
        due = min(oldest) + keep
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - self._clock()), self._due)

    def shut_down(self) -> None:
        """jobd is stopping: no trim from now on (the store closes soon), whatever is finished or released."""
        self._stopped = True
        self.disarm()

    def disarm(self) -> None:
        """Cancel the timer and the trim to come (rearm() makes them again; shut_down() for good)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._trim_soon is not None:
            self._trim_soon.cancel()
            self._trim_soon = None

    def _schedule_trim(self) -> None:
        if self._trim_soon is None and not self._stopped:
            self._trim_soon = asyncio.get_running_loop().call_soon(self._trim)

    def _due(self) -> None:
        self._timer = None
        self._trim_then_rearm()

    def _trim_then_rearm(self) -> None:
        if not self._trim():
            self.rearm()  # else the next batch, scheduled by _trim, rearms

    def _trim(self) -> bool:
        """Delete a batch of what the rules no longer keep; True if more is left (its batch is scheduled), or if
        the store refused the deletion (a full disk: tried again every STORE_RETRY_SECONDS)."""
        self._trim_soon = None
        try:
            doomed = self._trim_batch()
            others, more_others = self._trim_others()
        except Exception as error:
            if store_failure(error) is None:
                raise  # a bug, with its traceback
            self._store_failed("cannot expire finished jobs, ended instances or audit entries from the history", error)
            self._trim_soon = asyncio.get_running_loop().call_later(STORE_RETRY_SECONDS, self._trim_then_rearm)
            return True
        if doomed or others:  # a write was made and taken (an empty trim writes nothing, so it tells nothing)
            self._store_works()
        if len(doomed) < TRIM_BATCH and not more_others:
            return False
        self._trim_soon = asyncio.get_running_loop().call_soon(self._trim_then_rearm)
        return True

    def _trim_batch(self) -> list[int]:
        """Delete up to TRIM_BATCH of the jobs the rules no longer keep; the ids deleted."""
        doomed: list[int] = []
        # Asked for as many more as are held, which are then left out: a batch is still TRIM_BATCH when it can be.
        wanted = TRIM_BATCH + len(self._held)
        if self._rules.keep_days is not None:
            cutoff = self._clock() - self._rules.keep_days * SECONDS_PER_DAY
            doomed = self._unheld(self._store.expirable_before(cutoff, wanted))
        if self._rules.keep_last is not None and len(doomed) < TRIM_BATCH:
            if self._finished is None:
                self._finished = self._store.expirable_count()
            excess = self._finished - self._rules.keep_last
            if excess > len(doomed):  # the oldest finishes, which begin with those too old already; a held job is
                doomed = self._unheld(self._store.oldest_expirable(min(excess, wanted)))  # one of the excess
        # Output first: a crash between the two then leaves rows without output, about to go anyway, rather than
        # output directories that no row names and nothing would ever remove.
        for job_id in doomed:
            self._remove_output(job_id)
        self._store.delete_jobs(doomed)
        if self._finished is not None:
            self._finished -= len(doomed)
        return doomed

    def _trim_others(self) -> tuple[int, bool]:
        """Delete up to TRIM_BATCH each of the ended workflow instances (and TRIM_DOCUMENT_BYTES of their documents)
        and the audit entries older than keep_days, once the oldest of them is due: how many went, and whether more
        may be due."""
        if self._rules.keep_days is None or self._others_due is None or self._clock() < self._others_due:
            return 0, False
        cutoff = self._clock() - self._rules.keep_days * SECONDS_PER_DAY
        instances, more = self._store.expire_instances(cutoff, TRIM_BATCH, TRIM_DOCUMENT_BYTES)
        entries = self._store.expire_audit(cutoff, TRIM_BATCH)
        more = more or entries == TRIM_BATCH
        if not more:
            self._others_due = None  # none is due any more: the next rearm says when one is
        return instances + entries, more

    def _unheld(self, job_ids: list[int]) -> list[int]:
        return [job_id for job_id in job_ids if job_id not in self._held][:TRIM_BATCH]
