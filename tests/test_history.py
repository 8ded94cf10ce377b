"""History retention's hold (jobd/engine/history.py) on a real store and a real event loop: a held finished job
outlives keep_last and keep_days until it is released, and then goes; the others follow the rules meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from jobd.engine.history import TRIM_BATCH, TRIM_DOCUMENT_BYTES, HistoryKeeper
from jobd.model import Attempt, AuditEntry, History, InstanceSummary, JobSpec, JobState, Outcome, transition
from jobd.store import AuditFilter, CallbackDelivery, Store

DAY = 86400


def _finished_jobs(store: Store, count: int, at: float) -> list[int]:
    """`count` jobs that ran and succeeded, finished one second apart from `at` on."""
    ids = []
    for number in range(count):
        [(queued, _)] = store.insert_jobs([JobSpec(command=("/bin/true",), queue="q")], [JobState.QUEUED], at, [at])
        running = transition(queued, JobState.RUNNING, started_at=at, attempts=1)
        attempt = Attempt(queued.id, 1, at)
        store.start_attempts([(running, attempt)])
        ended = dataclasses.replace(attempt, outcome=Outcome.SUCCEEDED, finished_at=at + number, exit_code=0)
        store.finish_attempt(transition(running, JobState.SUCCEEDED, finished_at=at + number, exit_code=0), ended)
        ids.append(queued.id)
    return ids


def _kept(store: Store, ids: list[int]) -> list[int]:
    return [job_id for job_id in ids if store.get_job(job_id) is not None]


def _on_a_store(
    tmp_path: Path, rules: History, now: float, scenario: Callable[[Store, HistoryKeeper], Coroutine[Any, Any, None]]
) -> None:
    """Run `scenario` on an event loop, with a store in tmp_path and a keeper of `rules` whose clock says `now`."""
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    keeper = HistoryKeeper(store, rules, lambda: now, lambda _: None, lambda *_: None, lambda: None)
    try:
        asyncio.run(scenario(store, keeper))
    finally:
        keeper.disarm()
        store.close()


async def _passes(count: int) -> None:
    for _ in range(count):  # each a pass of the loop: what was due in it has run
        await asyncio.sleep(0)


def test_a_held_job_outlives_keep_last_until_it_is_released(tmp_path: Path) -> None:
    async def scenario(store: Store, keeper: HistoryKeeper) -> None:
        ids = _finished_jobs(store, 4, 1000.0)
        keeper.hold(ids[0])
        keeper.hold(ids[2])
        keeper.rearm()
        await _passes(1)
        assert _kept(store, ids) == [ids[0], ids[2], ids[3]]  # the last, and the held
        keeper.release([ids[2]])
        await _passes(1)
        assert _kept(store, ids) == [ids[0], ids[3]]
        keeper.release([ids[0], 12345])  # what was never held is let be
        await _passes(1)
        assert _kept(store, ids) == [ids[3]]

    _on_a_store(tmp_path, History(keep_days=None, keep_last=1), 2000.0, scenario)


def test_a_held_job_outlives_keep_days_and_its_timer_does_not_spin(tmp_path: Path) -> None:
    async def scenario(store: Store, keeper: HistoryKeeper) -> None:
        ids = _finished_jobs(store, 2, 1000.0)  # both due (keep_days = 1)
        keeper.hold(ids[0])
        keeper.rearm()
        await _passes(5)  # a timer due at once for the held job would fire and trim on every pass
        assert _kept(store, ids) == [ids[0]]
        assert keeper._timer is None  # nothing else can expire: no timer (the held one is not waited for)
        keeper.release(ids[:1])
        await _passes(2)
        assert _kept(store, ids) == []

    _on_a_store(tmp_path, History(keep_days=1, keep_last=None), 1000.0 + 2 * DAY, scenario)


def test_after_shut_down_a_release_trims_nothing(tmp_path: Path) -> None:
    """jobd's stop saves the instances' documents after the engine stopped the history, and each save releases its
    jobs: a release rearmed the trim, which then ran on a store closed meanwhile."""

    async def scenario(store: Store, keeper: HistoryKeeper) -> None:
        ids = _finished_jobs(store, 2, 1000.0)
        failures: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: failures.append(context))
        keeper.hold(ids[0])
        keeper.shut_down()
        keeper.release(ids)
        keeper.job_finished()
        store.close()
        await _passes(3)  # nothing is due: a trim now would raise on the closed store
        assert failures == []

    _on_a_store(tmp_path, History(keep_days=1, keep_last=0), 1000.0 + 2 * DAY, scenario)


# --- jobs waiting for their callbacks ---------------------------------------------------------------------------


def _queue_callbacks(store: Store, job_id: int, count: int) -> list[CallbackDelivery]:
    """`count` pending deliveries of the job's callbacks, as jobd.engine.callbacks queues them when it finishes."""
    wanted = [("on_finish", f"/bin/true {number}", {"exec": ["/bin/true"]}) for number in range(count)]
    return store.insert_callbacks(job_id, wanted, 1000.0)


def _delivered(store: Store, delivery: CallbackDelivery) -> bool:
    done = dataclasses.replace(delivery, state="delivered", tries=1, next_try_at=None, delivered_at=1000.0)
    return store.record_callback_try(done)


def test_a_job_waiting_for_its_callbacks_is_kept_outside_keep_last_until_they_are_done(tmp_path: Path) -> None:
    async def scenario(store: Store, keeper: HistoryKeeper) -> None:
        a, b, c = _finished_jobs(store, 3, 1000.0)
        keeper.rearm()
        await _passes(1)
        assert _kept(store, [a, b, c]) == [b, c]
        [d] = _finished_jobs(store, 1, 1003.0)  # finishes with two callbacks, told as the engine tells it
        first, second = _queue_callbacks(store, d, 2)
        keeper.held_for_callbacks()
        keeper.job_finished()
        await _passes(1)
        assert _kept(store, [b, c, d]) == [b, c, d]  # d does not count while its callbacks are pending
        assert not _delivered(store, first)  # the other is still pending
        assert _delivered(store, second)
        keeper.callbacks_done()
        await _passes(1)
        assert _kept(store, [b, c, d]) == [c, d]  # d counts again: the oldest goes
        assert keeper._finished == store.expirable_count() == 2

    _on_a_store(tmp_path, History(keep_days=None, keep_last=2), 2000.0, scenario)


def test_a_failed_delivery_lets_its_job_expire_too(tmp_path: Path) -> None:
    async def scenario(store: Store, keeper: HistoryKeeper) -> None:
        [job] = _finished_jobs(store, 1, 1000.0)
        [delivery] = _queue_callbacks(store, job, 1)
        keeper.rearm()
        await _passes(2)
        assert _kept(store, [job]) == [job]  # due, but its callback is pending
        assert keeper._timer is None  # and nothing else is due: no timer
        failed = dataclasses.replace(delivery, state="failed", tries=8, next_try_at=None, last_error="refused")
        assert store.record_callback_try(failed)
        keeper.callbacks_done()
        await _passes(2)
        assert _kept(store, [job]) == []
        assert store.callbacks_of(job) == []  # its deliveries went with it

    _on_a_store(tmp_path, History(keep_days=1, keep_last=None), 1000.0 + 2 * DAY, scenario)


def _retention_reads(store: Store) -> int:
    """SQLite virtual-machine steps the retention queries take on `store`: a measure of the rows they look at that
    does not depend on the machine's speed."""
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    store._connection.set_progress_handler(step, 1)
    try:
        assert len(store.oldest_expirable(100)) == 3
        assert len(store.expirable_before(1e12, 100)) == 3
        assert store.oldest_expirable_at() is not None
    finally:
        store._connection.set_progress_handler(None, 1)
    return steps


def test_retention_reads_only_jobs_that_may_expire_however_many_wait_for_callbacks(tmp_path: Path) -> None:
    """A callback URL down for minutes at a busy site holds thousands of finished jobs. Every trim (after each
    job's end, with keep_last) stepped over all of them, those that finished first: 5 ms a trim at 10,000."""
    reads = []
    for waiting in (100, 800):
        store = Store(str(tmp_path / f"{waiting}.sqlite3"))
        store.open()
        try:
            for job_id in _finished_jobs(store, waiting, 1000.0):  # the oldest finishes
                _queue_callbacks(store, job_id, 1)
            _finished_jobs(store, 3, 5000.0)
            reads.append(_retention_reads(store))
        finally:
            store.close()
    assert reads[1] <= reads[0] * 1.2, reads  # not 8 times as many


def _ended_instances(store: Store, count: int, at: float) -> list[int]:
    """`count` workflow instances that ended one second apart from `at` on."""
    ids = []
    for number in range(count):
        instance_id = store.insert_instance(
            InstanceSummary(store.next_instance_id(), "w", "EXECUTING", 0, at), b"<workflow/>"
        )
        store.save_instance(instance_id, "TERMINATED", 0, at + number, (), b"<workflow/>")
        ids.append(instance_id)
    return ids


def _audit_entries(store: Store, count: int, at: float) -> None:
    """`count` audit entries written one second apart from `at` on."""
    for number in range(count):
        store.record_audit_soon(AuditEntry(at + number, 0, "root", "job.submit", None, "ok"))
    store.flush_audit()


def test_keep_days_takes_ended_instances_and_audit_entries_in_batches_and_sleeps_until_the_next(
    tmp_path: Path,
) -> None:
    # 250 of each are due (ended or written before the cutoff, 1249.5), 50 are not: three trims of at most
    # TRIM_BATCH each take the 250, then the keeper sleeps until the first of the others is due. Executing instances
    # are never taken.
    async def scenario(store: Store, keeper: HistoryKeeper) -> None:
        instances = _ended_instances(store, 300, 1000.0)
        executing = store.insert_instance(
            InstanceSummary(store.next_instance_id(), "w", "EXECUTING", 0, 900.0), b"<workflow/>"
        )
        _audit_entries(store, 300, 1000.0)
        keeper.rearm()
        await _passes(2)  # the timer's pass (due at once), then the first trim's
        assert _kept_instances(store, instances) == instances[TRIM_BATCH:]
        assert _audit_count(store) == 300 - TRIM_BATCH
        loop = asyncio.get_running_loop()
        before = loop.time()
        await _passes(4)
        assert _kept_instances(store, instances) == instances[250:]
        assert _audit_count(store) == 50
        assert store.instance(executing) is not None
        # Asleep until the next is due, half a second after the timer was armed (the entries and the instance of
        # 1250): no trim meanwhile. Bounded by when the passes began and ended, however long they took.
        assert keeper._timer is not None
        assert before + 0.5 - 1e-6 <= keeper._timer.when() <= loop.time() + 0.5 + 1e-6

    _on_a_store(tmp_path, History(keep_days=1, keep_last=None), 1000.0 + DAY + 249.5, scenario)


def test_a_trim_frees_a_bounded_size_of_instance_documents_each_turn(tmp_path: Path) -> None:
    # Deleting a document reads every page of it, with the event loop held: 100 instances of 5 MB (a document keeps
    # up to 1 MiB of each task's output) took 3.7 s in one trim, 8.8 s from a cold cache.
    document = b"<workflow>" + b"x" * (1 << 20) + b"</workflow>"

    async def scenario(store: Store, keeper: HistoryKeeper) -> None:
        ids = []
        for number in range(30):
            instance_id = store.insert_instance(
                InstanceSummary(store.next_instance_id(), "w", "EXECUTING", 0, 1000.0), b"<workflow/>"
            )
            store.save_instance(instance_id, "TERMINATED", 0, 1000.0 + number, (), document)
            ids.append(instance_id)
        keeper.rearm()
        await _passes(2)  # the timer's pass (due at once), then the first trim's
        gone = len(ids) - len(_kept_instances(store, ids))
        assert 0 < gone <= TRIM_DOCUMENT_BYTES // len(document), gone
        await _passes(20)  # the next batches, a turn each
        assert _kept_instances(store, ids) == []

    _on_a_store(tmp_path, History(keep_days=1, keep_last=None), 1000.0 + 2 * DAY, scenario)


def _kept_instances(store: Store, ids: list[int]) -> list[int]:
    return [instance_id for instance_id in ids if store.instance(instance_id) is not None]


def _audit_count(store: Store) -> int:
    return len(store.audit_entries(AuditFilter(limit=1000)))
