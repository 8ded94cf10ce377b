"""A database that a jobd of each earlier schema version left, with a history in it (jobs in every state, their
attempts, a paused queue, an instance, a schedule's state, audit entries, callback deliveries), is brought to today's
schema by a real jobd at its start, and every row of it reads back through the API.

The old databases are built from the migration definitions (MIGRATIONS[:version], which are appended to and never
changed in what they make: test_store checks a fresh database against an upgraded one), and the rows are written
with SQL into the columns each version had, as that jobd wrote them."""

from __future__ import annotations

import contextlib
import itertools
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, started_and_stopped
from test_store import RETRY_JSON, _database_at_schema

from jobd.store import SCHEMA_VERSION

CONFIG = """
[queue.held]
concurrency = 1

[task.t]
command = ["/bin/echo", "hello"]

[schedule.nightly]
task = "t"
calendar = "0 30 2 * * *"
"""

# An ended instance's document as jobd saves it.
DOCUMENT = (
    b'<workflow name="hello" id="1" status="TERMINATED" start_time="2026-12-02 10:30:23" next-evqid="4" evqid="1" '
    b'running_tasks="0" queued_tasks="0" retrying_tasks="0" error_tasks="0" waiting_conditions="0" errors="0" '
    b'end_time="2026-12-02 10:30:23"><subjobs><job name="j" context-id="1" evqid="2" running_tasks="0" '
    b'queued_tasks="0" retrying_tasks="0" error_tasks="0" waiting_conditions="0"><tasks><task name="say" '
    b'path="/bin/echo" queue="default" context-id="1" evqid="3" status="TERMINATED" execution_time="2026-12-02 '
    b'10:30:23" retval="0" progression="100"><input mode="text">hi</input><output retval="0" execution_time='
    b'"2026-12-02 10:30:23" exit_time="2026-12-02 10:30:23" method="text">hi\n</output><stderr/><log/></task>'
    b"</tasks></job></subjobs></workflow>"
)

# (id, state, queue, attempts as (outcome, exit_code, signal)); the running one's attempt has not ended.
JOBS = (
    (1, "succeeded", "default", (("failed", 1, None), ("succeeded", 0, None))),
    (2, "failed", "default", (("failed", 3, None),)),
    (3, "timed_out", "default", (("timed_out", None, 15),)),
    (4, "cancelled", "default", (("killed", None, 15),)),
    (5, "queued", "held", ()),
    (6, "delayed", "held", ()),
    (7, "running", "default", ((None, None, None),)),
)


def _insert(raw: sqlite3.Connection, table: str, **values: Any) -> None:
    """A row with the values of the columns `table` has at this version (the others came later)."""
    columns = {row[1] for row in raw.execute(f'PRAGMA table_info("{table}")')}
    kept = {name: value for name, value in values.items() if name in columns}
    names = ", ".join(f'"{name}"' for name in kept)
    raw.execute(f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" * len(kept))})', tuple(kept.values()))


def _tables(raw: sqlite3.Connection) -> set[str]:
    return {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _history_at_schema(path: Path, version: int, now: float) -> None:
    raw = _database_at_schema(path, version)
    for job_id, state, queue, attempts in JOBS:
        finished = state in ("succeeded", "failed", "timed_out", "cancelled")
        _insert(
            raw,
            "job",
            id=job_id,
            task="t",
            command='["/bin/echo", "hello"]',
            queue=queue,
            priority=7 if job_id == 5 else 1024,
            state=state,
            context="ctx-5" if job_id == 5 else None,
            key="key-5" if job_id == 5 else None,
            created_at=now - 600 + job_id,
            run_at=now + 86400 if state == "delayed" else now - 600 + job_id,
            started_at=now - 500 + job_id if attempts else None,
            finished_at=now - 400 + job_id if finished else None,
            attempts=len(attempts),
            exit_code=attempts[-1][1] if finished else None,
            signal=attempts[-1][2] if finished else None,
            progress=0,
            error=None,
            env="{}",
            stdin=None,
            working_dir=None,
            timeout=None,
            kill_grace=2.0,
            retry=RETRY_JSON,
            max_output=1048576,
            submitted_by=0,
            merge_stderr=0,
            callbacks_queued=1 if job_id == 1 else 0,
            callbacks='{"on_finish": [{"argv": ["/bin/true"]}]}' if job_id == 1 else None,
        )
        for number, (outcome, exit_code, killed_by) in enumerate(attempts, start=1):
            _insert(
                raw,
                "attempt",
                job_id=job_id,
                number=number,
                started_at=now - 500 + job_id,
                finished_at=None if outcome is None else now - 400 + job_id,
                outcome=outcome,
                exit_code=exit_code,
                signal=killed_by,
                pid=None,
                pid_start=None,
                stdout_bytes=0,
                stderr_bytes=0,
                truncated=0,
                cancel_requested=0,
            )
    _insert(raw, "queue_state", name="held", paused=1, config_paused=0)
    tables = _tables(raw)
    if "instance" in tables:
        _insert(
            raw,
            "instance",
            id=1,
            workflow="hello",
            status="TERMINATED",
            errors=0,
            started_at=now - 300,
            ended_at=now - 299,
            parameters="{}",
            tags="[]",
            document=DOCUMENT,
            custom_attributes="[]",
        )
    if "schedule" in tables:
        _insert(
            raw,
            "schedule",
            name="nightly",
            last_run=now - 200,
            last_result="succeeded",
            last_run_id=1,
            next_run=now + 86400,
            suspended=0,
            enabled=1,
            config_enabled=1,
            last_run_kind="job",
        )
    if "audit" in tables:
        for entry_id, command in ((1, "job.submit"), (2, "queue.pause")):
            _insert(
                raw,
                "audit",
                id=entry_id,
                at=now - 100 + entry_id,
                uid=0,
                user="root",
                command=command,
                target="job 5" if entry_id == 1 else "queue held",
                result="ok",
            )
    if "callback" in tables:
        _insert(
            raw,
            "callback",
            job_id=1,
            event="on_finish",
            target="/bin/true",
            state="delivered",
            tries=1,
            spec='{"argv": ["/bin/true"]}',
            created_at=now - 399,
            delivered_at=now - 398,
        )
    if "id_floor" in tables:
        _insert(raw, "id_floor", name="job", id=20)
    raw.commit()
    raw.close()


def _assert_the_history_reads_back(daemon: Daemon, tables: set[str], *, crashed: bool = False) -> None:
    """Every row _history_at_schema wrote (of the `tables` its version had), through the API of a jobd that upgraded
    the database; then a new job, with the id after the history's (after a jobd that `crashed`, one further on:
    the ids it may have handed out are skipped, docs/jobs.md)."""
    jobs = {job["id"]: job for job in daemon.call("job.list", {"limit": 1000})["jobs"]}
    assert sorted(jobs) == [job_id for job_id, *_ in JOBS]
    for job_id, state, queue, attempts in JOBS:
        job = daemon.call("job.get", {"id": job_id})
        assert (job["task"], job["queue"], job["command"]) == ("t", queue, ["/bin/echo", "hello"])
        tries = [(attempt["number"], attempt["outcome"]) for attempt in job["tries"]]
        if state == "running":
            # jobd was not there to see it end: lost, and not retried (its policy has no retry).
            assert job["state"] == "failed" and tries == [(1, "lost")], job
            continue
        assert job["state"] == state, job
        assert tries == [(number, outcome) for number, (outcome, *_) in enumerate(attempts, start=1)], job
    held = daemon.call("job.get", {"id": 5})
    assert (held["priority"], held["context"], held["key"]) == (7, "ctx-5", "key-5")
    assert {queue["name"]: queue["paused"] for queue in daemon.call("queue.list")["queues"]}["held"] is True
    # The key still finds its job.
    assert daemon.submit(task="t", queue="held", key="key-5")["id"] == 5

    if "instance" in tables:
        instance = daemon.call("instance.get", {"id": 1})
        assert (instance["workflow"], instance["status"]) == ("hello", "TERMINATED")
        assert [task["name"] for task in instance["jobs"][0]["tasks"]] == ["say"]
        assert [row["id"] for row in daemon.call("instance.list")["instances"]] == [1]
    if "schedule" in tables:
        [schedule] = daemon.call("schedule.list")["schedules"]
        assert schedule["name"] == "nightly", schedule
        assert schedule["last_result"] == "succeeded" and schedule["last_run_id"] == 1, schedule
    if "audit" in tables:
        entries = daemon.call("audit.list", {"limit": 1000})["entries"]
        old = [(entry["id"], entry["command"], entry["target"]) for entry in entries if entry["id"] <= 2]
        assert old == [(2, "queue.pause", "queue held"), (1, "job.submit", "job 5")], entries

    # New work goes on past every id the history used.
    new = daemon.submit(task="t")
    following = 21 if "id_floor" in tables else 8
    assert new["id"] >= following if crashed else new["id"] == following
    assert daemon.wait(new["id"])["state"] == "succeeded"


def _old_history(daemon: Daemon, version: int) -> tuple[Path, set[str]]:
    """The daemon's database, as a jobd of schema `version` left it with a history; and the tables it has."""
    daemon.state_dir.mkdir(parents=True, exist_ok=True)
    database = daemon.state_dir / "jobd.sqlite3"
    _history_at_schema(database, version, time.time())
    with contextlib.closing(sqlite3.connect(database)) as raw:
        return database, _tables(raw)


def _finished_upgrade(daemon: Daemon, database: Path, tables: set[str]) -> None:
    assert daemon.stop() == 0
    with contextlib.closing(sqlite3.connect(database)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        if "callback" in tables:
            assert raw.execute("SELECT job_id, state FROM callback").fetchall() == [(1, "delivered")]


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_history_left_by_every_earlier_schema_version_reads_back_whole_after_the_upgrade(
    make_daemon: Callable[..., Daemon], version: int
) -> None:
    daemon: Daemon = make_daemon(CONFIG, start=False)
    database, tables = _old_history(daemon, version)
    daemon.start()
    _assert_the_history_reads_back(daemon, tables)
    _finished_upgrade(daemon, database, tables)


def test_an_upgrade_killed_at_any_write_leaves_a_sound_database_that_the_next_start_upgrades_whole(
    make_daemon: Callable[..., Daemon],
) -> None:
    """SIGKILL at the Nth write SQLite makes (strace's fault injection), for N = 2, 5, 8, ...: each leaves the database
    sound, at the schema version of the last step committed, and the next start carries on from there, until one
    gets through every step. Then the history reads back whole."""
    daemon: Daemon = make_daemon(CONFIG, start=False)
    database, tables = _old_history(daemon, 1)
    versions = []
    for write in itertools.count(2, 3):
        daemon.command_prefix = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64"]
        daemon.command_prefix += ["-e", f"inject=pwrite64:signal=KILL:when={write}"]
        if not started_and_stopped(daemon):  # killed before it was ready, until a start gets far enough
            assert daemon.process is not None and daemon.process.wait() == -signal.SIGKILL, daemon.log()
            daemon.process = None
        with contextlib.closing(sqlite3.connect(database)) as raw:
            assert raw.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            version = raw.execute("PRAGMA user_version").fetchone()[0]
        assert version >= (versions[-1] if versions else 1)
        versions.append(version)
        if version == SCHEMA_VERSION:
            break
    assert len(set(versions)) > 3, versions  # killed between steps, at several of them
    assert "Traceback" not in daemon.log()
    daemon.command_prefix = []
    daemon.start()
    _assert_the_history_reads_back(daemon, tables, crashed=True)
    _finished_upgrade(daemon, database, tables)


@pytest.mark.parametrize(
    ("errno_name", "advice"),
    [
        ("ENOSPC", "database or disk is full; its file system is full: make room and start jobd again"),
        (
            "EIO",
            "disk I/O error; it cannot be opened or written: check its file system, its permissions and the kernel",
        ),
    ],
)
def test_an_upgrade_the_disk_fails_is_told_as_the_disks_trouble_and_carried_on_once_it_works(
    make_daemon: Callable[..., Daemon], errno_name: str, advice: str
) -> None:
    """Every write SQLite makes fails from the Nth on (strace's fault injection), for N = 2, 5, 8, ..., start after
    start: wherever that falls in a step (a statement, its COMMIT), the start is refused as the disk's trouble, to be
    tried again (exit 1, not 78: not "damaged", nor "move it away to start anew", which would lose the history), the
    file is left sound at the last step committed, and a start on a working disk upgrades it whole."""
    daemon: Daemon = make_daemon(CONFIG, start=False)
    database, tables = _old_history(daemon, 1)
    version = 1
    for write in itertools.count(2, 3):
        daemon.command_prefix = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64"]
        daemon.command_prefix += ["-e", f"inject=pwrite64:error={errno_name}:when={write}+"]
        if started_and_stopped(daemon):
            break  # every step was committed before the Nth write, and jobd served: nothing more to fail
        assert daemon.process is not None and daemon.process.wait() == 1, daemon.log()
        [told] = [line for line in daemon.log().splitlines() if "not starting" in line][-1:]
        assert f"not starting: the database in {daemon.state_dir} cannot be used: {advice}" in told, told
        assert "damaged" not in told and "Traceback" not in daemon.log(), daemon.log()
        daemon.process = None
        with contextlib.closing(sqlite3.connect(database)) as raw:
            assert raw.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            reached = raw.execute("PRAGMA user_version").fetchone()[0]
        assert reached >= version
        version = reached
    assert version > 3, version  # refused after some steps were committed, not only before the first
    daemon.command_prefix = []
    daemon.start()
    _assert_the_history_reads_back(daemon, tables)
    _finished_upgrade(daemon, database, tables)
