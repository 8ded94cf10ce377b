"""The SQLite store on real files: schema migrations and exclusive ownership of the database."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import os
import random
import sqlite3
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any

import peewee
import pytest

from jobd.errors import ShuttingDown, StartupError
from jobd.model import (
    Attempt,
    AuditEntry,
    InstanceSummary,
    InStore,
    JobSpec,
    JobState,
    Outcome,
    RetryPolicy,
    ScheduleState,
    transition,
)
from jobd.store import (
    _INSTANCES_ENDED_BEFORE,
    _OLDEST_INSTANCE_END,
    MIGRATIONS,
    SCHEMA_VERSION,
    AuditFilter,
    InstanceFilter,
    JobFilter,
    QueuePause,
    Store,
    _db,
    _FileName,
    refused_request,
    store_failure,
)

RETRY_JSON = '{"times": 0, "delay": 1.0, "backoff": 2.0, "on_exit_codes": []}'


def _database_at_schema(path: Path, version: int) -> sqlite3.Connection:
    """A database as a jobd of schema `version` left it (its first `version` migrations), opened raw."""
    store = Store(str(path))
    db = store.db
    _db.initialize(db)
    db.connect()
    db.pragma("page_size", 1024)  # as jobd sets them on every database it opens
    db.pragma("journal_mode", "wal")
    with db.atomic():
        for migration in MIGRATIONS[:version]:
            migration(db)
        db.pragma("user_version", version)
    db.close()
    return sqlite3.connect(path)


def _version_1_database(path: Path) -> None:
    """A database as the first jobd release left it: migration 1 only, one job with a key in it."""
    raw = _database_at_schema(path, 1)
    raw.execute(
        "INSERT INTO job (command, queue, priority, state, key, created_at, run_at, env, kill_grace, retry, "
        "max_output, attempts, progress) VALUES (?, 'q', 1, 'queued', 'k1', 1.0, 1.0, '{}', 10, ?, 1, 0, 0)",
        ('["/bin/true"]', RETRY_JSON),
    )
    raw.commit()
    raw.close()


def _indexes(path: Path) -> dict[str, str]:
    return _schema(path, "index")


def test_a_version_1_database_is_migrated_in_place_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobd.sqlite3"
    _version_1_database(path)
    store = Store(str(path))
    store.open()
    try:
        assert store.db.pragma("user_version") == SCHEMA_VERSION
        [[job]] = store.unfinished_jobs()
        assert job.spec.key == "k1" and job.state is JobState.QUEUED
        # The key still deduplicates through the partial unique index.
        [(again, created)] = store.insert_jobs(
            [JobSpec(command=("/bin/true",), queue="q", key="k1")], [JobState.QUEUED], 2.0, [2.0]
        )
        assert not created and again.id == job.id
    finally:
        store.close()
    indexes = _indexes(path)
    assert "WHERE" in indexes["job_key"] and "WHERE" in indexes["job_context"] and "WHERE" in indexes["job_task"]
    assert "attempt_job_id" not in indexes
    # Retention of ended instances (schema 18) reads them through their own index, never the executing ones' rows.
    assert "WHERE" in indexes["instance_ended_at"]
    raw = sqlite3.connect(path)
    try:
        for query, arguments in ((_INSTANCES_ENDED_BEFORE, (1.0, 10)), (_OLDEST_INSTANCE_END, ())):
            plan = " ".join(row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {query}", arguments))
            assert "instance_ended_at" in plan, (query, plan)
    finally:
        raw.close()


def test_jobs_waiting_for_callbacks_at_an_upgrade_stay_out_of_retention(tmp_path: Path) -> None:
    # Before schema 17 retention looked for pending callback rows itself; migration 17 marks their jobs instead.
    path = tmp_path / "jobd.sqlite3"
    raw = _database_at_schema(path, 16)
    for job_id in (1, 2, 3, 4):  # finished 1 s apart; 4 still runs
        raw.execute(
            "INSERT INTO job (id, command, queue, priority, state, created_at, run_at, env, kill_grace, retry, "
            "max_output, attempts, progress, finished_at) VALUES (?, '[\"/bin/true\"]', 'q', 1, ?, 1.0, 1.0, '{}', "
            "10, ?, 1, 1, 0, ?)",
            (job_id, "running" if job_id == 4 else "succeeded", RETRY_JSON, None if job_id == 4 else 10.0 + job_id),
        )
    for job_id, state in ((1, "pending"), (1, "delivered"), (2, "delivered"), (3, "failed")):
        raw.execute(
            "INSERT INTO callback (job_id, event, target, state, tries, spec, created_at) "
            "VALUES (?, 'on_finish', '/bin/true', ?, 1, '{}', 1.0)",
            (job_id, state),
        )
    raw.commit()
    raw.close()
    store = Store(str(path))
    store.open()
    try:
        assert store.oldest_expirable(10) == [2, 3]  # 1 waits for a delivery; 4 has not finished
        assert store.expirable_count() == 2
        assert store.oldest_expirable_at() == 12.0
    finally:
        store.close()
    indexes = _indexes(path)
    assert "job_finished_at" not in indexes and "WHERE" in indexes["job_expirable"]


def test_an_attempt_recorded_before_streams_were_told_apart_stays_truncated(tmp_path: Path) -> None:
    # Schema 15 kept one flag for an attempt's three streams; after migration 16 the attempt is still truncated,
    # with the streams unknown (job.output then falls back to the stream that holds the whole max_output).
    path = tmp_path / "jobd.sqlite3"
    raw = _database_at_schema(path, 15)
    raw.execute(
        "INSERT INTO job (id, command, queue, priority, state, created_at, run_at, env, kill_grace, retry, "
        "max_output, attempts, progress) VALUES (1, '[\"/bin/true\"]', 'q', 1, 'succeeded', 1.0, 1.0, '{}', 10, ?, "
        "1, 2, 0)",
        (RETRY_JSON,),
    )
    for number, truncated in ((1, 1), (2, 0)):
        raw.execute(
            "INSERT INTO attempt (job_id, number, started_at, finished_at, outcome, stdout_bytes, stderr_bytes, "
            "truncated) VALUES (1, ?, 1.0, 2.0, 'succeeded', 1, 0, ?)",
            (number, truncated),
        )
    raw.commit()
    raw.close()
    store = Store(str(path))
    store.open()
    try:
        first, second = store.attempts(1)
        assert (first.truncated, first.cut_streams) == (True, None)
        assert (second.truncated, second.cut_streams) == (False, ())
    finally:
        store.close()


def _schema(path: Path, kind: str | None = None) -> dict[str, str]:
    """The SQL of the database's tables and indexes (or only those of `kind`: "table", "index"), by name."""
    raw = sqlite3.connect(path)
    try:
        rows = raw.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND (? IS NULL OR type = ?)", (kind, kind)
        ).fetchall()
    finally:
        raw.close()
    return dict(rows)


def test_a_fresh_database_gets_the_same_schema_as_a_migrated_one(tmp_path: Path) -> None:
    migrated, fresh = tmp_path / "migrated.sqlite3", tmp_path / "fresh.sqlite3"
    _version_1_database(migrated)
    for path in (migrated, fresh):
        store = Store(str(path))
        store.open()
        store.close()
    assert _indexes(migrated) == _indexes(fresh)
    assert _schema(migrated) == _schema(fresh)


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_database_of_every_earlier_version_is_upgraded_to_the_schema_of_a_fresh_one(
    tmp_path: Path, version: int
) -> None:
    """Tables and indexes alike, column by column: a migration that built a table from its peewee model (which later
    migrations extend) would give a new database columns an upgraded one gets otherwise, or not at all."""
    older, fresh = tmp_path / "older.sqlite3", tmp_path / "fresh.sqlite3"
    _database_at_schema(older, version).close()
    for path in (older, fresh):
        store = Store(str(path))
        store.open()
        store.close()
    assert _schema(older) == _schema(fresh)


def _opened_with_a_schedule_row(path: Path, version: int, insert: str) -> Store:
    """A store opened on a database of schema `version` (upgraded by the opening) that holds the row `insert` made."""
    raw = _database_at_schema(path, version)
    raw.execute(insert)
    raw.commit()
    raw.close()
    store = Store(str(path))
    store.open()
    return store


def test_a_schedule_row_from_schema_18_keeps_its_api_word_with_the_files_value_unknown(tmp_path: Path) -> None:
    store = _opened_with_a_schedule_row(
        tmp_path / "jobd.sqlite3",
        18,
        "INSERT INTO schedule (name, last_run, last_result, last_run_id, next_run, suspended, enabled) "
        "VALUES ('nightly', 10.0, 'succeeded', 7, NULL, 0, 0)",
    )
    try:
        assert store.schedule_states()["nightly"] == ScheduleState(
            "nightly",
            last_run=10.0,
            last_result="succeeded",
            last_run_id=7,
            enabled=False,
            config_enabled=None,
            after_run=None,  # schema 21: why it has no next time is not known either
        )
    finally:
        store.close()


def _page_size(path: Path) -> int:
    raw = sqlite3.connect(path)
    try:
        return int(raw.execute("PRAGMA page_size").fetchone()[0])
    finally:
        raw.close()


def test_a_new_database_has_small_pages_and_an_older_one_keeps_its_own(tmp_path: Path) -> None:
    fresh, older = tmp_path / "fresh.sqlite3", tmp_path / "older.sqlite3"
    raw = sqlite3.connect(older)  # as jobd made them before: SQLite's default of 4 KiB
    raw.execute("PRAGMA page_size = 4096")
    raw.execute("PRAGMA user_version = 0")  # writes the file's first page: its page size is fixed from here on
    raw.close()
    _database_at_schema(older, 1).close()
    _version_1_database(fresh)
    assert _page_size(fresh) == 1024
    store = Store(str(older))
    store.open()
    try:
        [(job, created)] = store.insert_jobs(
            [JobSpec(command=("/bin/true",), queue="q", stdin=b"x" * 100_000)], [JobState.QUEUED], 1.0, [1.0]
        )
        assert created
        assert store.get_job(job.id) == job
    finally:
        store.close()
    assert _page_size(older) == 4096
    store = Store(str(fresh))
    store.open()
    try:  # a row much larger than a page goes to overflow pages and comes back whole
        [(job, _)] = store.insert_jobs(
            [JobSpec(command=("/bin/true",), queue="q", stdin=b"y" * 100_000)], [JobState.QUEUED], 1.0, [1.0]
        )
        assert store.get_job(job.id) == job
    finally:
        store.close()


def test_the_database_is_held_exclusively_while_jobd_has_it_open(tmp_path: Path) -> None:
    path = tmp_path / "jobd.sqlite3"
    store = Store(str(path))
    store.open()
    try:
        store.insert_jobs([JobSpec(command=("/bin/true",), queue="q")], [JobState.QUEUED], 1.0, [1.0])
        other = sqlite3.connect(path, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("SELECT count(*) FROM job").fetchall()
        other.close()
    finally:
        store.close()
    other = sqlite3.connect(path)  # once jobd let go, anybody may read it
    assert other.execute("SELECT count(*) FROM job").fetchone() == (1,)
    other.close()


def test_peewee_writes_inside_a_transaction_are_committed_with_it_as_before_peewee_3_15(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's peewee (3.14) commits after each write it makes outside one of its own transactions; the store's
    transactions are its own BEGIN IMMEDIATE, and peewee's commit there ended them half-way: their COMMIT failed ("no
    transaction is active"), and queuing a job's callbacks, a queue's pause or a schedule's state was STORE_FAILED
    (the Debian package never delivered a callback; found by a soak test with Debian's python3-peewee). Peewee 3.14's
    rule is played here over the peewee the suite has."""
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        execute_sql = store.db.execute_sql

        def as_peewee_3_14(sql: str, params: object = None, **options: object) -> object:
            cursor = execute_sql(sql, params, **options)  # options: 3.14's own `commit`, when it is 3.14
            if not store.db.in_transaction() and not sql[:6].lower().startswith("select"):
                store.db.commit()
            return cursor

        monkeypatch.setattr(store.db, "execute_sql", as_peewee_3_14)
        store.set_queue_pause("q", QueuePause(paused=True, config_paused=False))
        assert store.queue_pauses() == {"q": QueuePause(paused=True, config_paused=False)}
        [(job, _)] = store.insert_jobs([JobSpec(command=("/bin/true",), queue="q")], [JobState.QUEUED], 1.0, [1.0])
        [delivery] = store.insert_callbacks(
            job.id, [("on_finish", "GET http://x/", {"http": {"url": "http://x/"}})], 2.0
        )
        assert [pending.id for pending in store.pending_callbacks()] == [delivery.id]
    finally:
        store.close()


def test_a_store_used_without_an_event_loop_looks_at_its_file_before_each_write(tmp_path: Path) -> None:
    # jobd hears of its database's deletion from inotify, through its event loop; a store opened without one (a tool,
    # a test) has nobody to read that, and looks at the file's link count itself before each write.
    path = tmp_path / "jobd.sqlite3"
    store = Store(str(path))
    store.open()
    try:
        spec = JobSpec(command=("/bin/true",), queue="q")
        store.insert_jobs([spec], [JobState.QUEUED], 1.0, [1.0])
        os.unlink(path)
        with pytest.raises(sqlite3.OperationalError, match="was deleted while jobd ran"):
            store.insert_jobs([spec], [JobState.QUEUED], 2.0, [2.0])
        with pytest.raises(sqlite3.OperationalError, match="was deleted while jobd ran"):
            store.record_audit(AuditEntry(3.0, 0, "root", "queue.pause", "queue q", "ok"))
    finally:
        store.close()


def test_a_database_file_the_kernel_will_not_watch_is_looked_at_before_each_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # With inotify refused (here: the watch of a path that is gone; in life, fs.inotify.max_user_watches used up),
    # jobd says so and falls back to an fstat() before each write, rather than never noticing a deletion.
    path = tmp_path / "jobd.sqlite3"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)

    async def watch_and_delete() -> tuple[bool, bool]:
        gone = tmp_path / "gone"
        name = _FileName(str(gone), fd)
        os.link(path, gone)  # from now on the watched path names the file the descriptor has
        before = name.lost()
        os.unlink(path)
        os.unlink(gone)
        return before, name.lost()  # at once: no turn of the loop needed without a watch

    try:
        assert asyncio.run(watch_and_delete()) == (False, True)
    finally:
        os.close(fd)
    assert f"the database file {tmp_path / 'gone'} is not watched (inotify: " in caplog.text


def test_a_database_path_that_is_a_symbolic_link_to_the_file_takes_writes(tmp_path: Path) -> None:
    """A path that names the file through a symbolic link (the database put on another disk) names it: the look
    at whether the file was moved away compared the link itself with the file, and refused every write."""
    real = tmp_path / "disk" / "jobd.sqlite3"
    real.parent.mkdir()
    path = tmp_path / "jobd.sqlite3"
    path.symlink_to(real)
    store = Store(str(path))
    store.open()  # no event loop: the file is looked at before each write
    try:
        [(job, created)] = store.insert_jobs(
            [JobSpec(command=("/bin/true",), queue="q")], [JobState.QUEUED], 1.0, [1.0]
        )
        assert created and store.get_job(job.id).spec.command == ("/bin/true",)
    finally:
        store.close()


def test_a_store_closed_while_an_fsync_runs_keeps_the_wal_open_until_it_ends(tmp_path: Path) -> None:
    """`durability = "fsync"` at shutdown: the WAL's descriptor, closed under the worker thread's fsync, could be
    handed to another file meanwhile and fsync()ed in its place. It is closed once the fsync has ended."""
    path = tmp_path / "jobd.sqlite3"
    store = Store(str(path))
    store.open()
    gate = threading.Event()

    async def close_during_fsync() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as executor:
            loop.set_default_executor(executor)
            held = loop.run_in_executor(None, gate.wait)  # the one worker is busy: the fsync waits behind it
            try:
                store.insert_jobs([JobSpec(command=("/bin/true",), queue="q")], [JobState.QUEUED], 1.0, [1.0])
                flush = asyncio.ensure_future(store.flush())
                await asyncio.sleep(0)  # one turn of the loop: the flush hands its fsync to the executor
                wal = store._flusher._fd if store._flusher is not None else None
                assert wal is not None
                store.close()
                assert os.readlink(f"/proc/self/fd/{wal}").startswith(f"{path}-wal")  # still the WAL's
            finally:
                gate.set()  # (also when an assertion failed: the executor's exit waits for its worker)
            await held
            await flush  # the fsync had its descriptor: no EBADF, nothing else synced
            assert store._flusher is not None and store._flusher._fd is None  # and now it is closed

    asyncio.run(close_during_fsync())


def test_a_database_from_a_newer_jobd_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    # In a rollback journal mode (SQLite's default), as a newer jobd might keep it: the refusal must not switch
    # it to WAL, which is written into the file's header and stays.
    path = tmp_path / "jobd.sqlite3"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    data = path.read_bytes()
    store = Store(str(path))
    with pytest.raises(StartupError, match="newer than this jobd") as refused:
        store.open()
    assert refused.value.permanent  # jobd exits 78: restarting cannot mend it
    store.db.close()
    assert path.read_bytes() == data


@pytest.mark.parametrize("version", [0, 3])
def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path: Path, version: int) -> None:
    """A state_dir pointed at another program's SQLite file: at version 0 jobd made its tables beside the others,
    from another version its migrations failed half-way; either way the start failed with "nothing was changed"
    and exit 1 (systemd restarts that), or not at all."""
    path = tmp_path / "jobd.sqlite3"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE foo (x)")
    raw.execute(f"PRAGMA user_version = {version}")
    raw.commit()
    raw.close()
    data = path.read_bytes()  # in SQLite's default rollback journal mode, as the other program keeps it
    store = Store(str(path))
    with pytest.raises(StartupError, match="not jobd's") as refused:
        store.open()
    assert refused.value.permanent  # jobd exits 78: restarting cannot mend it
    store.db.close()
    assert path.read_bytes() == data  # no table, no version, and not switched to WAL (the other program's choice)


def test_a_schedule_row_from_schema_22_has_no_run_waiting(tmp_path: Path) -> None:
    store = _opened_with_a_schedule_row(
        tmp_path / "jobd.sqlite3",
        22,
        "INSERT INTO schedule (name, last_run, last_result, last_run_id, next_run, suspended, last_run_kind) "
        "VALUES ('q', 10.0, NULL, 7, 20.0, 0, 'job')",
    )
    try:
        state = store.schedule_states()["q"]
        assert (state.last_run_id, state.last_run_kind, state.pending) == (7, "job", None)
        store.save_schedule_state(dataclasses.replace(state, pending=15.0))
        assert store.schedule_states()["q"].pending == 15.0
    finally:
        store.close()


def test_schedule_state_survives_reopening_and_can_be_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "jobd.sqlite3"
    state = ScheduleState(
        "nightly", last_run=10.0, last_result="failed", last_run_id=7, next_run=20.0, suspended=True, pending=15.0
    )
    store = Store(str(path))
    store.open()
    store.save_schedule_state(state)
    store.save_schedule_state(ScheduleState("hourly", enabled=False, config_enabled=True))
    store.close()
    store = Store(str(path))
    store.open()
    try:
        states = store.schedule_states()
        assert states["nightly"] == state and states["hourly"] == ScheduleState(
            "hourly", enabled=False, config_enabled=True
        )
        store.forget_schedule("hourly")
        assert set(store.schedule_states()) == {"nightly"}
    finally:
        store.close()


def test_audit_entries_are_kept_across_a_reopen_and_filtered_newest_first(tmp_path: Path) -> None:
    path = str(tmp_path / "jobd.db")
    store = Store(path)
    store.open()
    made = [
        AuditEntry(at=100.0, uid=0, user="root", command="queue.pause", target="queue q", result="ok"),
        AuditEntry(at=200.0, uid=1000, user="alice", command="job.submit", target="command /bin/sh",
                   result="INSUFFICIENT_RIGHTS", message="for admins"),
        AuditEntry(at=300.0, uid=None, user="remote", command="instance launch", target="workflow w", result="ok"),
    ]  # fmt: skip
    ids = [store.record_audit(entry) for entry in made]
    store.close()
    store = Store(path)
    store.open()
    try:
        everything = store.audit_entries(AuditFilter())
        assert [entry.id for entry in everything] == ids[::-1]
        assert everything[1] == AuditEntry(
            id=ids[1], at=200.0, uid=1000, user="alice", command="job.submit", target="command /bin/sh",
            result="INSUFFICIENT_RIGHTS", message="for admins",
        )  # fmt: skip
        assert [e.user for e in store.audit_entries(AuditFilter(uid=1000))] == ["alice"]
        assert [e.user for e in store.audit_entries(AuditFilter(user="remote"))] == ["remote"]
        assert [e.command for e in store.audit_entries(AuditFilter(command="queue.pause"))] == ["queue.pause"]
        assert [e.at for e in store.audit_entries(AuditFilter(since=200.0))] == [300.0, 200.0]
        assert [e.id for e in store.audit_entries(AuditFilter(before_id=ids[2], limit=1))] == [ids[1]]
    finally:
        store.close()


def test_a_job_and_its_attempts_read_back_as_written(tmp_path: Path) -> None:
    # get_job() and attempts() run prepared SQL rather than peewee queries: every kind of column must come back
    # with the type it went in with (booleans as booleans, blobs as bytes, JSON as values).
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        spec = JobSpec(
            command=("/bin/echo", "é"),
            queue="q",
            task="t",
            priority=7,
            env=MappingProxyType({"A": "1"}),
            stdin=b"\x00\xffin",
            working_dir="/tmp",
            timeout=1.5,
            kill_grace=3.0,
            retry=RetryPolicy(times=2, delay=0.5, backoff=3.0, on_exit_codes=(75,)),
            max_output=1000,
            context="ctx",
            key="k",
            submitted_by=1000,
            merge_stderr=True,
            run_as_uid=1001,
            run_as_gid=1002,
            callbacks={"on_success": [{"http": {"url": "http://127.0.0.1:1/"}}]},
        )
        [(queued, _)] = store.insert_jobs([spec], [JobState.QUEUED], 1.0, [2.0])
        running = transition(queued, JobState.RUNNING, started_at=3.0, attempts=1, progress=40)
        first = Attempt(queued.id, 1, 3.0, pid=123, pid_start=456)
        store.start_attempts([(running, first)])
        store.record_process(first)
        store.record_cancel_request(first)
        store.record_time_limit_reached(first)
        ended = dataclasses.replace(
            first, outcome=Outcome.FAILED, finished_at=4.0, exit_code=75, cpu_user=0.25, cpu_system=0.5,
            max_rss_kib=2048, stdout_bytes=10, stderr_bytes=20, truncated=True, cut_streams=("stderr", "log"),
            error="boom",
        )  # fmt: skip
        failed = transition(running, JobState.FAILED, finished_at=4.0, exit_code=75, error="boom")
        store.finish_attempt(failed, ended)
        assert store.get_job(queued.id) == failed
        assert failed.spec.stdin is InStore.STDIN  # left in the database, read back as an attempt starts
        assert store.job_stdin(queued.id) == b"\x00\xffin"
        [read] = store.attempts(queued.id)
        assert read == dataclasses.replace(ended, cancel_requested=True, time_limit_reached=True)
        assert read.truncated is True and read.cut_streams == ("stderr", "log") and read.cancel_requested is True
        assert store.get_job(queued.id + 1) is None and store.attempts(queued.id + 1) == []
    finally:
        store.close()


def test_count_attempts_counts_the_earlier_ones_that_ended_otherwise_than_excluded(tmp_path: Path) -> None:
    """What Engine._concluded counts as a job's tries (a shutdown's `killed`, a failed start's `spawn_error` not)."""
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        [(job, _)] = store.insert_jobs([JobSpec(command=("/bin/false",), queue="q")], [JobState.QUEUED], 1.0, [1.0])
        outcomes = [Outcome.FAILED, Outcome.KILLED, Outcome.TIMED_OUT, Outcome.SPAWN_ERROR, Outcome.LOST, None]
        for number, outcome in enumerate(outcomes, start=1):
            running = transition(job, JobState.RUNNING, started_at=2.0, attempts=number)
            attempt = Attempt(job.id, number, 2.0)
            store.start_attempts([(running, attempt)])
            if outcome is not None:  # the last one still runs
                job = transition(running, JobState.QUEUED)
                store.finish_attempt(job, dataclasses.replace(attempt, outcome=outcome, finished_at=3.0))
        not_counted = (Outcome.KILLED, Outcome.SPAWN_ERROR)
        assert store.count_attempts(job.id, before=6, excluding=not_counted) == 3  # failed, timed_out, lost
        assert store.count_attempts(job.id, before=4, excluding=not_counted) == 2
        assert store.count_attempts(job.id, before=6) == 5
        assert store.count_attempts(job.id, before=1, excluding=not_counted) == 0
        assert store.count_attempts(job.id + 1, before=6) == 0
    finally:
        store.close()


@contextlib.contextmanager
def _traced(connection: sqlite3.Connection) -> Iterator[list[str]]:
    """The statements `connection` runs meanwhile, as SQLite ran them (their parameters in place)."""
    statements: list[str] = []
    connection.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        connection.set_trace_callback(None)


def _plans(connection: sqlite3.Connection, statements: list[str]) -> dict[str, list[str]]:
    """SQLite's query plan of each statement that reads (SELECT, WITH): what each step reads, and how."""
    return {
        sql: [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}")]
        for sql in statements
        if sql.lstrip().upper().startswith(("SELECT", "WITH"))
    }


def _history(store: Store, seed: int) -> list[tuple[int, str, str, str | None, str | None]]:
    """Random jobs over a few queues, states, tasks and contexts, inserted in batches: (id, state, queue, task,
    context) of each, in id order."""
    rng = random.Random(seed)
    jobs: list[tuple[int, str, str, str | None, str | None]] = []
    for _ in range(12):
        specs, states = [], []
        for _ in range(rng.randrange(1, 40)):
            # Most jobs in two queues, a few in the others: the rare ones' jobs are far apart in id order.
            queues = ["default", "mail", "mailing", "img", "rare"] if rng.random() < 0.05 else ["mail", "img"]
            context = rng.choice([None, "u1", "u2"])
            task = rng.choice([None, "resize", "send"])
            specs.append(JobSpec(command=("/bin/true",), queue=rng.choice(queues), task=task, context=context))
            states.append(rng.choice(list(JobState)))
        for job, _ in store.insert_jobs(specs, states, 1.0, [1.0] * len(specs)):
            jobs.append((job.id, str(job.state), job.spec.queue, job.spec.task, job.spec.context))
    return jobs


# Patterns no name here matches, as many as a user's grants may hold: past SQLite's expression depth (1,000) were
# they one GLOB each of a flat OR, past _FLAT_PATTERNS (200) given to SQLite as one JSON array.
UNMATCHED = tuple(f"nothing-{number}-*" for number in range(1100))


def _many(rng: random.Random, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """`patterns` as they are, or among more than _FLAT_PATTERNS (or more than a thousand) that match nothing."""
    extra = rng.choice([0, 0, 0, 150, 1100])
    return tuple(rng.sample([*patterns, *UNMATCHED[:extra]], len(patterns) + extra))


def _random_filter(rng: random.Random, highest_id: int) -> JobFilter:
    visible: dict[str, tuple[str, ...] | None] = {"visible_tasks": None, "visible_queues": None}
    if rng.random() < 0.3:
        visible = {
            "visible_tasks": _many(rng, tuple(rng.sample(["resize", "s*", "nothing"], rng.randrange(0, 2)))),
            "visible_queues": _many(rng, tuple(rng.sample(["mail*", "img", "r?re", "[dr]*"], rng.randrange(0, 3)))),
        }
    return JobFilter(
        states=tuple(rng.sample(list(JobState), rng.choice([0, 0, 1, 1, 2, 3]))),
        queue=rng.choice([None, None, "mail", "img", "rare", "nowhere"]),
        task=rng.choice([None, None, None, "resize"]),
        context=rng.choice([None, None, None, "u2"]),
        before_id=rng.choice([None, None, rng.randrange(1, highest_id + 2)]),
        limit=rng.choice([1, 3, 10, 101, 1001]),
        **visible,
    )


@functools.cache
def _glob(text: str | None, pattern: str) -> bool:
    """SQLite's GLOB (as job.list's patterns are), asked of SQLite itself (once for each text and pattern)."""
    if text is None:
        return False
    return bool(sqlite3.connect(":memory:").execute("SELECT ? GLOB ?", (text, pattern)).fetchone()[0])


@functools.cache
def _glob_any(text: str | None, patterns: tuple[str, ...]) -> bool:
    """Whether `text` matches one of `patterns` (_glob), answered once for each text and tuple of patterns: the
    oracles below ask it of every job or instance for each filter, with up to 1,100 patterns, of a few names."""
    return any(_glob(text, pattern) for pattern in patterns)


@pytest.mark.parametrize("counted", [False, True], ids=["history-being-counted", "history-counted"])
def test_job_list_returns_the_newest_matching_jobs_for_any_filter(tmp_path: Path, counted: bool) -> None:
    # Once the history is counted by (state, queue, task), a task's list skips the pairs that hold none of its jobs
    # and reads the task's own index when that is expected to be cheaper (Store._pair_may_match, _fewer_by_task).
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        jobs = _history(store, seed=7)
        if counted:
            store.count_by_state()
        rng = random.Random(11)
        for _ in range(400):
            where = _random_filter(rng, jobs[-1][0])

            def wanted(job: tuple[int, str, str, str | None, str | None], where: JobFilter = where) -> bool:
                job_id, state, queue, task, context = job
                visible = (
                    (where.visible_tasks is None and where.visible_queues is None)
                    or _glob_any(task, where.visible_tasks or ())
                    or _glob_any(queue, where.visible_queues or ())
                )
                return (
                    (not where.states or state in where.states)
                    and where.queue in (None, queue)
                    and where.task in (None, task)
                    and where.context in (None, context)
                    and (where.before_id is None or job_id < where.before_id)
                    and visible
                )

            expected = [job[0] for job in reversed(jobs) if wanted(job)][: where.limit]
            assert [job.id for job in store.list_jobs(where)] == expected, where
        assert [job.id for page in store.unfinished_jobs(page=7) for job in page] == [
            job[0] for job in jobs if job[1] in ("delayed", "queued", "running")
        ]
    finally:
        store.close()


def test_job_list_never_reads_and_sorts_every_match_of_a_filter(tmp_path: Path) -> None:
    # A state's newest jobs were found by reading every job in that state and sorting them (110-180 ms with
    # 200,000 finished jobs): each query job.list and a start-up make must read in id order from an index, stopping
    # at the page's end. SQLite's plan says whether it sorts ("USE TEMP B-TREE FOR ORDER BY").
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        jobs = _history(store, seed=3)
        rng = random.Random(5)
        with _traced(store._connection) as statements:
            for _ in range(200):
                store.list_jobs(_random_filter(rng, jobs[-1][0]))
            for _ in store.unfinished_jobs(page=5):
                pass
        plans = _plans(store._connection, statements)
        sorting = {sql for sql, steps in plans.items() if any("TEMP B-TREE" in step for step in steps)}
        assert len(plans) > 400 and not sorting, sorted(sorting)[:5]
        # Among them, those with more patterns than a flat OR takes (their JSON array): read in id order as well.
        assert sum("json_each('[\"" in sql for sql in plans) > 20
    finally:
        store.close()


def _counts_in_table(connection: sqlite3.Connection, tasks: tuple[str, ...] | None, queues: tuple[str, ...] | None):
    """What count_by_state must say, counted from the table itself (each job's task and queue matched against the
    patterns one by one: they may be more than a query of one GLOB each can hold)."""
    counts: dict[str, int] = {}
    for state, queue, task in connection.execute('SELECT "state", "queue", "task" FROM "job"'):
        if (tasks is None and queues is None) or _glob_any(task, tasks or ()) or _glob_any(queue, queues or ()):
            counts[state] = counts.get(state, 0) + 1
    return counts


def test_counts_by_state_follow_every_change_of_the_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # daemon.status and /metrics read the counts the store keeps as jobs are inserted, change state and expire; the
    # history it was opened with is counted a slice at a time meanwhile: whatever happens between slices, each count
    # (an admin's, and a non-admin's by patterns) is what the table holds.
    monkeypatch.setattr("jobd.store.COUNT_SLICE", 7)
    path = str(tmp_path / "jobd.sqlite3")
    store = Store(path)
    store.open()
    _history(store, seed=13)
    store.close()
    store = Store(path)
    store.open()
    rng = random.Random(17)
    numbers = itertools.count(1)  # attempt numbers, unique whatever the job
    checked = 0
    try:
        for step in range(300):
            live = [
                job for job in store.list_jobs(JobFilter(limit=10_000)) if not job.state.finished or rng.random() < 0.05
            ]
            action = rng.randrange(6)
            if action == 0 or not live:
                specs = [
                    JobSpec(
                        command=("/bin/true",),
                        queue=rng.choice(["mail", "img", "rare"]),
                        task=rng.choice([None, "send"]),
                    )
                    for _ in range(rng.choice([1, 1, 3]))
                ]
                store.insert_jobs(specs, [JobState.QUEUED] * len(specs), 1.0, [1.0] * len(specs))
            elif action == 1:
                queued = [job for job in live if job.state is JobState.QUEUED][:3]
                store.start_attempts(
                    [
                        (dataclasses.replace(job, state=JobState.RUNNING), Attempt(job.id, next(numbers), 2.0))
                        for job in queued
                    ]
                )
            elif action == 2:
                running = [job for job in live if job.state is JobState.RUNNING]
                queued = [job for job in live if job.state is JobState.QUEUED][:1]
                if running:
                    job = running[0]
                    ended = dataclasses.replace(
                        job, state=rng.choice([JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED])
                    )
                    attempt = Attempt(job.id, next(numbers), 2.0, Outcome.SUCCEEDED, 3.0)
                    store.finish_attempt(
                        ended,
                        attempt,
                        [
                            (dataclasses.replace(q, state=JobState.RUNNING), Attempt(q.id, next(numbers), 3.0))
                            for q in queued
                        ],
                    )
            elif action == 3:
                waiting = [job for job in live if job.state in (JobState.QUEUED, JobState.DELAYED)]
                if waiting:
                    store.update_job(
                        dataclasses.replace(waiting[-1], state=JobState.CANCELLED, finished_at=4.0), waiting[-1].state
                    )
            elif action == 4:
                finished = [job.id for job in live if job.state.finished]
                store.delete_jobs(rng.sample(finished, min(len(finished), rng.randrange(1, 5))))
            else:
                store.count_some_jobs()  # a slice, as the loop would make it
            if step == 150:
                assert store._counts.counted_to is not None  # the changes so far met a history still being counted
            if step > 150 and rng.random() < 0.2:  # the first half counts the rest of the history in slices
                tasks = _many(rng, tuple(rng.sample(["send", "s*", "resize", "nothing"], rng.randrange(0, 3))))
                queues = _many(rng, tuple(rng.sample(["mail*", "img", "r?re", "[dr]*"], rng.randrange(0, 3))))
                visible = rng.choice([(None, None), (tasks, queues), ((), queues), (tasks, ())])
                assert store.count_by_state(*visible) == _counts_in_table(store._connection, *visible), visible
                checked += 1
        assert store.count_by_state() == _counts_in_table(store._connection, None, None)
        assert checked > 20
    finally:
        store.close()


def test_counts_by_state_read_no_row_of_the_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # daemon.status (every dashboard's refresh) and each scrape of /metrics counted the whole history by state, a
    # non-admin's by GLOB patterns row by row (30 and 340 ms with 400,000 jobs, the event loop waiting). Once counted,
    # counting reads no job at all; the first count is made a slice of ids per turn of the loop, after READY=1.
    monkeypatch.setattr("jobd.store.COUNT_SLICE", 50)
    path = str(tmp_path / "jobd.sqlite3")
    store = Store(path)
    store.open()
    highest = _history(store, seed=3)[-1][0]
    store.close()

    async def count_in_the_loop() -> list[int | None]:
        store.open()
        reached = []
        store.count_jobs_soon()
        while store._counts.counted_to is not None:
            await asyncio.sleep(0)  # one turn of the loop: one slice at most
            reached.append(store._counts.counted_to)
        return reached

    store = Store(path)
    statements: list[str] = []
    try:
        reached = asyncio.run(count_in_the_loop())
        assert reached[:-1] == [50 * (turn + 1) for turn in range(len(reached) - 1)] and len(reached) > 3, reached
        assert reached[-2] >= highest
        connection = store._connection
        connection.set_trace_callback(statements.append)
        store.count_by_state()
        store.count_by_state(("s*",), ("mail*", "r?re"))
        store.count_by_state((), ("img",))
        many = store.count_by_state(("s*", *UNMATCHED), ("mail*", *UNMATCHED))
        connection.set_trace_callback(None)
        assert many == _counts_in_table(connection, ("s*",), ("mail*",)) and many
        reading_jobs = {
            sql
            for sql in statements
            for plan in connection.execute(f"EXPLAIN QUERY PLAN {sql}")
            if " job" in plan[3] or "job_" in plan[3]
        }
        assert not reading_jobs, reading_jobs
        # Ids that leap (reserved past the output of a database restored from a copy) cost no slice each.
        store.reserve_ids("job", 10**15)
        store.insert_jobs([JobSpec(command=("/bin/true",), queue="leap")], [JobState.QUEUED], 1.0, [1.0])
        store.close()
        store = Store(path)
        store.open()
        slices = 0
        while store.count_some_jobs():
            slices += 1
            assert slices <= highest // 50 + 2, "a slice for each id past the history"
        assert store.count_by_state((), ("leap",)) == {"queued": 1}
        assert store.count_by_state() == _counts_in_table(store._connection, None, None)
    finally:
        store.close()


def _instances(store: Store, seed: int) -> list[tuple[int, str, float | None, int]]:
    """Random instances of a few workflows, some still running, ended in an order of their own: (id, workflow,
    ended_at, errors) of each."""
    rng = random.Random(seed)
    made = []
    for _ in range(150):
        workflow = rng.choice(["etl", "etl", "deploy", "report"])
        summary = InstanceSummary(
            id=store.next_instance_id(), workflow=workflow, status="EXECUTING", errors=0, started_at=float(len(made))
        )
        instance_id = store.insert_instance(summary, b"<workflow/>" + b" " * rng.randrange(3000))
        ended_at, errors = None, 0
        if rng.random() < 0.85:
            ended_at, errors = float(rng.randrange(40)), rng.choice([0, 0, 1])  # ends the same second, too
            store.save_instance(instance_id, "TERMINATED", errors, ended_at, (), b"<workflow/>")
        made.append((instance_id, workflow, ended_at, errors))
    return made


def test_instances_by_end_are_read_in_order_from_the_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # evQueue's instances list (the latest end first, running ones last) read and sorted every matching instance,
    # each with its document (24 ms a page with 20,000 instances): now the ended ones come in order from
    # instance_ended_at and the running ones from instance_status, the same rows as before in the same order. What
    # `groupby` counts is read a range of ids at a time.
    monkeypatch.setattr("jobd.store.INSTANCE_SLICE", 20)
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    statements: list[str] = []
    try:
        made = _instances(store, seed=5)
        rng = random.Random(9)
        connection = store._connection
        connection.set_trace_callback(statements.append)
        for _ in range(200):
            where = InstanceFilter(
                workflow=rng.choice([None, None, "etl", "report"]),
                status=rng.choice([None, None, "EXECUTING", "TERMINATED"]),
                error=rng.choice([None, None, True, False]),
                limit=rng.choice([0, 1, 7, 30, 200]),
                offset=rng.choice([0, 0, 3, 60, 125, 140, 400]),
                by_end=True,
                # A non-admin's: a few patterns (a flat OR), or more than it takes (their JSON array).
                visible_workflows=rng.choice([None, None, ("e*",), ("re?ort", "d*"), _many(rng, ("e*",))]),
            )

            def wanted(instance: tuple[int, str, float | None, int], where: InstanceFilter = where) -> bool:
                _, workflow, ended_at, errors = instance
                status = "EXECUTING" if ended_at is None else "TERMINATED"
                return (
                    where.workflow in (None, workflow)
                    and where.status in (None, status)
                    and (where.error is None or (errors > 0) == where.error)
                    and (where.visible_workflows is None or _glob_any(workflow, where.visible_workflows))
                )

            # As SQLite sorts: NULL below every end, so last when descending; then the highest id first.
            expected = sorted(
                (instance for instance in made if wanted(instance)),
                key=lambda instance: (instance[2] is not None, instance[2] or 0.0, instance[0]),
                reverse=True,
            )
            rows, total = store.list_instances(where)
            assert total == len(expected), where
            page = expected[where.offset : where.offset + where.limit]
            assert [row.id for row in rows] == [instance[0] for instance in page], where
            starts = asyncio.run(store.read_instance_starts(where))
            assert sorted(starts) == sorted((instance[1], float(instance[0] - 1)) for instance in page), where
        connection.set_trace_callback(None)
        sorting = {
            sql
            for sql in statements
            if sql.lstrip().upper().startswith("SELECT") and "ORDER BY" in sql
            for plan in connection.execute(f"EXPLAIN QUERY PLAN {sql}")
            # A JSON array of patterns is read whole (once for the statement), the instances never
            if "TEMP B-TREE" in plan[3]
            or (plan[3].startswith("SCAN") and not plan[3].startswith(("SCAN json_each", "SCAN granted")))
        }
        assert not sorting, sorted(sorting)[:3]
        assert any("json_each('[" in sql for sql in statements)
        statements.clear()
        connection.set_trace_callback(statements.append)
        asyncio.run(store.read_instance_starts(InstanceFilter(limit=1000, by_end=True)))
        connection.set_trace_callback(None)
        reads = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
        plans = {plan[3] for sql in reads for plan in connection.execute(f"EXPLAIN QUERY PLAN {sql}")}
        assert len(reads) == 8 and plans == {"SEARCH t1 USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"}, plans
    finally:
        store.close()


def test_the_total_of_an_instance_list_on_errors_or_start_counts_from_an_index(tmp_path: Path) -> None:
    # The total of a list filtered on errors or on the start read every instance row (12-35 ms for 20,000): the
    # indexes of migration 24 count them. The pages are the same as a sort in Python, and neither they nor the
    # slices of groupby are read through those indexes (SQLite would read a whole period and sort it for a page).
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    statements: list[str] = []
    try:
        made = _instances(store, seed=7)
        rng = random.Random(11)
        connection = store._connection
        for _ in range(150):
            where = InstanceFilter(
                workflow=rng.choice([None, None, None, "etl"]),
                error=rng.choice([None, True, False]),
                launched_from=rng.choice([None, float(rng.randrange(150))]),
                launched_until=rng.choice([None, None, float(rng.randrange(150))]),
                limit=rng.choice([1, 7, 30, 200]),
                offset=rng.choice([0, 0, 3, 60]),
                by_end=rng.choice([True, False]),
            )

            def wanted(instance: tuple[int, str, float | None, int], where: InstanceFilter = where) -> bool:
                instance_id, workflow, _, errors = instance
                started_at = float(instance_id - 1)  # as _instances makes them
                return (
                    where.workflow in (None, workflow)
                    and (where.error is None or (errors > 0) == where.error)
                    and (where.launched_from is None or started_at >= where.launched_from)
                    and (where.launched_until is None or started_at <= where.launched_until)
                )

            if where.by_end:
                order = lambda instance: (instance[2] is not None, instance[2] or 0.0, instance[0])  # noqa: E731
            else:
                order = lambda instance: (True, 0.0, instance[0])  # noqa: E731
            expected = sorted((instance for instance in made if wanted(instance)), key=order, reverse=True)
            connection.set_trace_callback(statements.append)
            rows, total = store.list_instances(where)
            connection.set_trace_callback(None)
            assert total == len(expected), where
            page = expected[where.offset : where.offset + where.limit]
            assert [row.id for row in rows] == [instance[0] for instance in page], where
            plans = {sql: [plan[3] for plan in connection.execute(f"EXPLAIN QUERY PLAN {sql}")] for sql in statements}
            statements.clear()
            for sql, plan in plans.items():
                if "COUNT(" in sql and where.workflow is None and (where.error is not None or where.launched_from):
                    assert not any(step.startswith("SCAN") for step in plan), (sql, plan)
                    # From one of them (covering, with one filter; with both, the rows it finds are read for the other)
                    assert any("INDEX instance_errors" in step or "INDEX instance_started_at" in step for step in plan)
                elif "COUNT(" not in sql:
                    assert not any("instance_errors" in step or "instance_started_at" in step for step in plan), plan
                    assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)
    finally:
        store.close()


def test_a_schema_23_database_with_instances_gets_the_indexes_that_count_them(tmp_path: Path) -> None:
    path = tmp_path / "jobd.sqlite3"
    store = Store(str(path))
    store.open()
    made = _instances(store, seed=3)
    store.close()
    raw = sqlite3.connect(path)  # as a jobd of schema 23 left it: without the two indexes and what came after them
    raw.execute('DROP INDEX "instance_errors"')
    raw.execute('DROP INDEX "instance_started_at"')
    raw.execute('ALTER TABLE "attempt" DROP COLUMN "time_limit_reached"')  # schema 25
    raw.execute("PRAGMA user_version = 23")
    raw.commit()
    raw.close()
    store = Store(str(path))
    store.open()
    try:
        assert store.db.pragma("user_version") == SCHEMA_VERSION
        with_errors = store.list_instances(InstanceFilter(error=True))[1]
        assert with_errors == sum(1 for instance in made if instance[3] > 0) > 0
        assert store.list_instances(InstanceFilter(launched_from=100.0))[1] == len(made) - 100
    finally:
        store.close()
    indexes = _indexes(path)
    assert indexes["instance_errors"] == 'CREATE INDEX "instance_errors" ON "instance" ("errors")'
    assert indexes["instance_started_at"] == 'CREATE INDEX "instance_started_at" ON "instance" ("started_at")'


@pytest.fixture
def paris_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time with summer time (both Python's time.localtime and SQLite's 'localtime' follow TZ)."""
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("paris_time")
def test_instances_are_counted_by_start_period_in_sql_as_in_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # evQueue's `groupby` read the workflow and start of every matching instance and counted them in Python in one
    # turn of the event loop (up to 76 ms for 20,000 instances). SQLite counts them now, a range of ids at a time:
    # the same counts as Python's time.localtime gives, for random filters and starts (across summer time changes,
    # and a fraction of a second before a new hour, which SQLite rounds to the millisecond).
    monkeypatch.setattr("jobd.store.INSTANCE_SLICE", 20)
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    rng = random.Random(31)
    made = []
    try:
        for _ in range(300):
            started_at = rng.choice([1_700_000_000 + 3600 * rng.randrange(20_000), 1_711_846_800, 1_729_990_800])
            started_at += rng.choice([0.0, 0.25, 3599.9996, 3599.0, rng.random() * 3600])
            workflow = rng.choice(["etl", "etl", "deploy", "report"])
            summary = InstanceSummary(
                id=store.next_instance_id(), workflow=workflow, status="EXECUTING", errors=0, started_at=started_at
            )
            instance_id = store.insert_instance(summary, b"<workflow/>")
            errors = 0
            if rng.random() < 0.8:
                errors = rng.choice([0, 0, 1])
                store.save_instance(instance_id, "TERMINATED", errors, started_at + 5, (), b"<workflow/>")
            made.append((instance_id, workflow, started_at, errors))
        connection = store._connection
        statements: list[str] = []
        connection.set_trace_callback(statements.append)
        fields = {
            "%Y": ("tm_year",),
            "%Y %m": ("tm_year", "tm_mon"),
            "%Y %m %d %H": ("tm_year", "tm_mon", "tm_mday", "tm_hour"),
        }
        for _ in range(60):
            where = InstanceFilter(
                workflow=rng.choice([None, None, "etl", "report"]),
                error=rng.choice([None, None, True, False]),
                launched_from=rng.choice([None, None, 1_710_000_000.0]),
                limit=1000,
            )
            period = rng.choice(list(fields))
            expected: dict[tuple[str, str], int] = {}
            for _, workflow, started_at, errors in made:
                if where.workflow not in (None, workflow) or (where.error is not None and (errors > 0) != where.error):
                    continue
                if where.launched_from is not None and started_at < where.launched_from:
                    continue
                start = time.localtime(started_at)
                key = (workflow, " ".join(f"{getattr(start, name):02d}" for name in fields[period]))
                expected[key] = expected.get(key, 0) + 1
            assert asyncio.run(store.count_instance_starts(where, period)) == expected, (where, period)
            assert sum(expected.values()) == store.list_instances(where)[1]
            if sum(expected.values()) > 1:  # more than the limit: evQueue counts only the first in its order
                fewer = dataclasses.replace(where, limit=sum(expected.values()) - 1)
                assert asyncio.run(store.count_instance_starts(fewer, period)) is None
        connection.set_trace_callback(None)
        counts = [sql for sql in statements if "strftime" in sql]
        plans = {plan[3] for sql in counts for plan in connection.execute(f"EXPLAIN QUERY PLAN {sql}")}
        # Each a range of ids (through the workflow's index, with one), its rows grouped: never the whole table.
        ranges = {plan for plan in plans if plan.startswith("SEARCH t1 USING") and "rowid>? AND rowid<?)" in plan}
        assert ranges and plans - ranges == {"USE TEMP B-TREE FOR GROUP BY"}, plans
    finally:
        store.close()


def test_a_non_admins_job_list_reads_only_the_jobs_she_may_read(tmp_path: Path) -> None:
    # A non-admin's job.list without a state, queue, task or context read the whole table newest first, matching
    # each job's task and queue against her patterns: with few jobs of hers, a page read the history (80 ms with
    # 400,000 jobs, the event loop waiting). Now no query of such a page scans the table: each reads the jobs of a
    # queue or a task she may read, from an index.
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        jobs = _history(store, seed=21)
        rng = random.Random(23)
        with _traced(store._connection) as statements:
            for _ in range(100):
                where = dataclasses.replace(
                    _random_filter(rng, jobs[-1][0]),
                    states=(),
                    queue=None,
                    task=None,
                    context=None,
                    visible_tasks=tuple(rng.sample(["resize", "s*", "nothing"], rng.randrange(0, 3))),
                    visible_queues=tuple(rng.sample(["mail*", "img", "r?re", "[dr]*"], rng.randrange(0, 3))),
                )
                store.list_jobs(where)
        scanning = {
            sql
            for sql, steps in _plans(store._connection, statements).items()
            if any(step.split()[:2] in (["SCAN", "job"], ["SCAN", "t1"]) or "TEMP B-TREE" in step for step in steps)
        }
        assert len(statements) >= 100 and not scanning, sorted(scanning)[:3]
    finally:
        store.close()


def test_a_state_and_a_rare_task_or_context_read_only_that_task_or_contexts_jobs(tmp_path: Path) -> None:
    # job.list with a state and a context (or task) read the state's jobs newest first, queue by queue, until a page
    # of the context's was found: for a context with a few jobs among a long history, every job in the state (45 ms
    # with 400,000 jobs). Now a task or context with few jobs is read from its own index: SQLite executes fewer
    # instructions than the state has jobs (the progress handler counts them).
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        rare = [JobSpec(command=("/bin/true",), queue="mail", task="rare", context="c1") for _ in range(5)]
        common = [JobSpec(command=("/bin/true",), queue=queue, task="send") for queue in ("mail", "img") * 1500]
        specs = rare + common
        store.insert_jobs(specs, [JobState.SUCCEEDED] * len(specs), 1.0, [1.0] * len(specs))
        steps = 0

        def step() -> int:
            nonlocal steps
            steps += 1
            return 0

        store._connection.set_progress_handler(step, 1)
        for where, expected in (
            (JobFilter(states=(JobState.SUCCEEDED,), context="c1"), [5, 4, 3, 2, 1]),
            (JobFilter(states=(JobState.SUCCEEDED, JobState.FAILED), task="rare"), [5, 4, 3, 2, 1]),
            (JobFilter(queue="mail", context="c1", limit=3), [5, 4, 3]),
            (JobFilter(states=(JobState.SUCCEEDED,), task="send", context="c1"), []),
            (JobFilter(states=(JobState.FAILED,), task="rare"), []),
        ):
            steps = 0
            assert [job.id for job in store.list_jobs(where)] == expected, where
            assert steps < len(common), (where, steps)
    finally:
        store.close()


def test_a_state_and_a_common_task_read_only_the_pairs_or_the_index_that_hold_the_tasks_jobs(tmp_path: Path) -> None:
    # job.list with a state and a task of more than FEW_JOBS jobs read the state's jobs of every queue newest first
    # until a page of the task's was found: those of the queues the task has no jobs in to the end (350-740 ms with
    # 400,000 jobs), and for a task spread thin over every queue most of the state (130-220 ms). With the history
    # counted, the pairs that hold none of its jobs are skipped, and a task whose own jobs are fewer to read is
    # read from job_task: SQLite executes fewer instructions than the state has jobs (the progress handler).
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    try:
        specs, states = [], []
        for i in range(60_000):
            queue = ("mail", "img", "pdf", "zip")[i % 4]
            task = "report" if queue == "img" else ("thin" if i % 97 == 0 else f"t{i % 13}")
            specs.append(JobSpec(command=("/bin/true",), queue=queue, task=task))
            states.append(JobState.FAILED if i % 3 == 0 else JobState.SUCCEEDED)
        made = [job.id for job, _ in store.insert_jobs(specs, states, 1.0, [1.0] * len(specs))]
        store.count_by_state()
        failed = sum(1 for state in states if state is JobState.FAILED)
        steps = 0

        def step() -> int:
            nonlocal steps
            steps += 1
            return 0

        store._connection.set_progress_handler(step, 1)
        for task in ("report", "thin"):
            where = JobFilter(states=(JobState.FAILED,), task=task, limit=50)
            expected = [
                job_id
                for job_id, spec, state in reversed(list(zip(made, specs, states, strict=True)))
                if spec.task == task and state is JobState.FAILED
            ][:50]
            steps = 0
            assert [job.id for job in store.list_jobs(where)] == expected, where
            assert len(expected) == 50 and steps < failed, (task, steps, failed)
    finally:
        store.close()


def test_a_filtered_read_of_the_audit_log_goes_a_slice_of_ids_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # audit.list with a user, a command or a `since` that leaves most entries out read the whole log at once until a
    # page was found (27-33 ms for 300,000 entries, every client and job waiting). It reads a slice of ids at a
    # time now, the event loop running other work in between, and finds the same entries.
    monkeypatch.setattr("jobd.store.AUDIT_SLICE", 100)
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    statements: list[str] = []
    try:
        rng = random.Random(31)
        for number in range(1500):
            user = rng.choices(["root", "alice", "deploy"], [80, 19, 1])[0]
            command = rng.choices(["job.submit", "daemon.reload"], [99, 1])[0]
            store.record_audit(
                AuditEntry(at=float(number), uid=0, user=user, command=command, target=None, result="ok")
            )
        connection = store._connection

        async def read(where: AuditFilter) -> tuple[list[AuditEntry], int]:
            turns = 0

            async def other_work() -> None:
                nonlocal turns
                while True:
                    await asyncio.sleep(0)
                    turns += 1

            worker = asyncio.ensure_future(other_work())
            await asyncio.sleep(0)
            try:
                return await store.read_audit(where), turns
            finally:
                worker.cancel()

        for where in (
            AuditFilter(user="nobody"),
            AuditFilter(user="deploy", limit=5),
            AuditFilter(command="daemon.reload", before_id=1000),
            AuditFilter(since=1400.0, limit=1000),
            AuditFilter(user="alice", before_id=10**9, limit=30),
            AuditFilter(limit=3),
        ):
            statements.clear()
            connection.set_trace_callback(statements.append)
            found, turns = asyncio.run(read(where))
            connection.set_trace_callback(None)
            assert found == store.audit_entries(where), where
            reads = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
            assert turns >= len(reads) - 1, (where, turns, len(reads))  # the loop ran between the slices
            for sql in reads:
                plans = [plan[3] for plan in connection.execute(f"EXPLAIN QUERY PLAN {sql}")]
                assert plans == ["SEARCH t1 USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"], (sql, plans)
        assert len(reads) == 1  # the newest entries: one slice
    finally:
        store.close()


def test_a_long_read_refuses_its_next_slice_once_the_store_has_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between two slices of the audit log or of evQueue's groupby, jobd may stop and close its store: the read is
    # answered SHUTTING_DOWN rather than failing on a closed database as an internal error.
    monkeypatch.setattr("jobd.store.AUDIT_SLICE", 10)
    monkeypatch.setattr("jobd.store.INSTANCE_SLICE", 10)
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    for number in range(50):
        store.record_audit(AuditEntry(at=float(number), uid=0, user="root", command="c", target=None, result="ok"))
    _instances(store, seed=1)

    async def closed_during(read: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(read)
        await asyncio.sleep(0)  # its first slice
        store.close()
        with pytest.raises(ShuttingDown):
            await task

    try:
        asyncio.run(closed_during(store.read_audit(AuditFilter(user="nobody"))))
        store.open()
        asyncio.run(closed_during(store.read_instance_starts(InstanceFilter(limit=1000))))
    finally:
        store.close()


def _refusal(connection: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Error:
    """What real SQLite raises for `sql` on `connection`."""
    with pytest.raises(sqlite3.Error) as raised:
        connection.execute(sql, params)
    return raised.value


def test_a_statement_sqlite_cannot_build_is_jobds_bug_and_a_disk_it_cannot_write_is_the_stores_trouble(
    tmp_path: Path,
) -> None:
    # SQLite's OperationalError stands for a full disk or an I/O error, and also for a statement jobd built wrong:
    # the latter were answered STORE_FAILED ("jobd could not write its database"), the store shown in trouble. They
    # are jobd's bugs (INTERNAL_ERROR, with a traceback): SQLite names them SQLITE_ERROR. Errors of real SQLite on a
    # real file, as they are raised on jobd's own connection and as peewee wraps them.
    path = tmp_path / "jobd.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE job (id INTEGER PRIMARY KEY, task TEXT)")
    connection.commit()
    built_wrong = [
        _refusal(connection, "SELECT no_such_column FROM job"),
        _refusal(connection, "SELEC id FROM job"),
        _refusal(connection, "SELECT " + "(" * 2000 + "1" + ")" * 2000),  # parser stack overflow
        _refusal(connection, "SELECT id FROM job WHERE " + " OR ".join(["task GLOB ?"] * 1100), ("x",) * 1100),
        _refusal(connection, "SELECT ?" + ", ?" * 300_000, (1,) * 300_001),  # too many SQL variables
    ]
    messages = [str(error) for error in built_wrong]
    assert messages == [
        "no such column: no_such_column",
        'near "SELEC": syntax error',
        "parser stack overflow",
        "Expression tree is too large (maximum depth 1000)",
        "too many SQL variables",
    ]
    db = peewee.SqliteDatabase(str(path))
    with pytest.raises(peewee.OperationalError) as wrapped:
        db.execute_sql("SELECT no_such_column FROM job")
    db.close()
    for error in [*built_wrong, wrapped.value]:
        assert isinstance(error, sqlite3.OperationalError | peewee.OperationalError)
        assert store_failure(error) is None, error
        assert refused_request("job.list", error) is None, error
    connection.close()
    read_only = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    not_written = _refusal(read_only, "INSERT INTO job (task) VALUES ('t')")  # the machine's trouble: still so
    read_only.close()
    # Said naming the database jobd opened: the file whose disk, permissions or file system to look at.
    store = Store(str(tmp_path / "opened.sqlite3"))
    store.open()
    try:
        failed = store_failure(not_written)
    finally:
        store.close()
    assert failed is not None and failed.message == (
        f"jobd could not write its database {tmp_path / 'opened.sqlite3'} (attempt to write a readonly database)"
    ), failed


def test_a_wait_for_the_start_count_ends_when_the_store_closes_before_it_is_done(tmp_path: Path) -> None:
    """daemon.status waits for the start's count of the history (jobs_counted); a stop that closes the store before
    the count is done ended the slices without telling the waits, which then lasted until their clients gave up."""
    path = str(tmp_path / "jobd.sqlite3")
    store = Store(path)
    store.open()
    _history(store, seed=5)
    store.close()

    async def wait_across_a_close() -> None:
        store.open()
        waiting = asyncio.ensure_future(store.jobs_counted())  # starts the count: its first slice is a turn away
        store.close()  # as a stop does, before that turn
        await asyncio.wait_for(waiting, 60)  # a deadline for the failure only: it ends in the next turns

    store = Store(path)
    asyncio.run(wait_across_a_close())
