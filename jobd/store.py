"""The durable history: SQLite through peewee, schema migrations, transactions and group commit.

Only model values (jobd.model) leave this module; peewee rows never do. The database runs in WAL mode with
synchronous=NORMAL: a committed transaction is in the WAL file once COMMIT returns, so it survives any crash of the
jobd process. For `durability = "fsync"` callers also await `flush()`, which fsyncs the WAL; every caller waiting
at that moment shares one fsync (group commit), so many concurrent clients cost one flush.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import inotify_simple
import peewee

from jobd import logline
from jobd.errors import InvalidParams, ShuttingDown, StartupError, StoreFailed
from jobd.model import (
    NO_RETRY,
    Attempt,
    AuditEntry,
    InstanceSummary,
    InStore,
    Job,
    JobSpec,
    JobState,
    Outcome,
    RetryPolicy,
    ScheduleState,
)
from jobd.values import evolve

log = logging.getLogger("jobd.store")
# What reading a file that is not jobd's SQLite database, or a damaged one, raises (jobd then does not start).
DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.DatabaseError, peewee.DatabaseError)
AUDIT_WRITE_BEHIND = 0.05  # seconds an audit entry may wait to share a commit with the next ones
AUDIT_BATCH = 256  # entries written at once, without waiting longer
# Entries held in memory while the database cannot be written (a full disk), written once it can; beyond this many
# the oldest are dropped (and counted in the log), so that a disk full for days cannot exhaust jobd's memory.
AUDIT_KEPT_AT_MOST = 100_000
WAL_AUTOCHECKPOINT = 10000  # pages the WAL may hold before SQLite copies it into the database (Store.__init__)
_db = peewee.DatabaseProxy()

# sqlite3 binds an int, float, str or bytes as it is, but any other value (None, bool) only after a miss in its
# adapter registry and two attribute lookups on the value and the protocol. Most of a job's columns are None: on a
# submit's INSERT that miss cost more than binding all the rest. A registered adapter is found by the first lookup.
# None's is a function written in C that returns None for None (an empty dict's get): a Python function (a lambda)
# cost a call frame for every NULL column, 1 % of a serial submit's instructions (callgrind).
_NO_KEYS: dict[None, None] = {}
_bind_none: Callable[[None], None] = _NO_KEYS.get
sqlite3.register_adapter(type(None), _bind_none)
sqlite3.register_adapter(bool, int)  # stored as SQLite stores a bool: 1 or 0


class _Base(peewee.Model):
    class Meta:
        database = _db
        legacy_table_names = False


class JobRow(_Base):
    id = peewee.AutoField()
    task = peewee.TextField(null=True)
    command = peewee.TextField()  # JSON list
    queue = peewee.TextField()
    priority = peewee.BigIntegerField()
    state = peewee.TextField()
    context = peewee.TextField(null=True)
    key = peewee.TextField(null=True, unique=True)
    created_at = peewee.DoubleField()
    run_at = peewee.DoubleField()
    started_at = peewee.DoubleField(null=True)
    finished_at = peewee.DoubleField(null=True)
    attempts = peewee.IntegerField(default=0)
    exit_code = peewee.IntegerField(null=True)
    signal = peewee.IntegerField(null=True)
    progress = peewee.IntegerField(default=0)
    error = peewee.TextField(null=True)
    env = peewee.TextField()  # JSON object
    stdin = peewee.BlobField(null=True)
    working_dir = peewee.TextField(null=True)
    timeout = peewee.DoubleField(null=True)
    kill_grace = peewee.DoubleField()
    retry = peewee.TextField()  # JSON object
    max_output = peewee.BigIntegerField()
    submitted_by = peewee.IntegerField(null=True)
    merge_stderr = peewee.BooleanField(default=False)  # since schema version 4
    run_as_uid = peewee.IntegerField(null=True)  # since schema version 8
    run_as_gid = peewee.IntegerField(null=True)  # since schema version 8
    http = peewee.TextField(null=True)  # JSON; since schema version 9
    callbacks = peewee.TextField(null=True)  # JSON; since schema version 10
    # 1 once the job's callback rows were created (since schema version 11): see _CALLBACKS_UNQUEUED.
    callbacks_queued = peewee.IntegerField(default=0)
    # 1 while the job has callback deliveries pending (since schema version 17): retention keeps it, see _EXPIRABLE.
    callbacks_pending = peewee.IntegerField(default=0)

    class Meta:
        table_name = "job"
        indexes = ((("state", "queue"), False), (("context",), False), (("task",), False))


class AttemptRow(_Base):
    job = peewee.ForeignKeyField(JobRow, on_delete="CASCADE", column_name="job_id")
    job_id: int  # peewee's accessor for the raw foreign key value
    number = peewee.IntegerField()
    started_at = peewee.DoubleField()
    finished_at = peewee.DoubleField(null=True)
    outcome = peewee.TextField(null=True)
    exit_code = peewee.IntegerField(null=True)
    signal = peewee.IntegerField(null=True)
    pid = peewee.IntegerField(null=True)
    pid_start = peewee.BigIntegerField(null=True)  # the process's start time in clock ticks: tells pid reuse apart
    cpu_user = peewee.DoubleField(null=True)
    cpu_system = peewee.DoubleField(null=True)
    max_rss_kib = peewee.IntegerField(null=True)
    stdout_bytes = peewee.BigIntegerField(default=0)
    stderr_bytes = peewee.BigIntegerField(default=0)
    truncated = peewee.IntegerField(default=0)  # the streams cut, as _CUT_STREAM bits (schema 16; 0/1 before)
    error = peewee.TextField(null=True)
    # 1 once a cancel is being carried out (SIGTERM sent, kill_grace running): a jobd that dies meanwhile must not
    # retry the job after its restart (since schema version 12).
    cancel_requested = peewee.IntegerField(default=0)
    # 1 once its time limit has stopped it (SIGTERM sent, kill_grace running): a jobd that dies meanwhile ends the
    # attempt `timed_out` after its restart, not `lost` (since schema version 25).
    time_limit_reached = peewee.IntegerField(default=0)

    class Meta:
        table_name = "attempt"
        indexes = ((("job", "number"), True),)


class QueueStateRow(_Base):
    name = peewee.TextField(primary_key=True)
    paused = peewee.BooleanField()
    # The configuration's `paused` when the API pause was recorded: a file changed since, even while jobd was
    # stopped, overrides it (since schema version 15; NULL for older rows, whose API pause stays).
    config_paused = peewee.BooleanField(null=True)

    class Meta:
        table_name = "queue_state"


def _migration_1(db: peewee.SqliteDatabase) -> None:
    # The tables as the first release made them: later columns are added by their own migrations.
    db.execute_sql(  # type: ignore[no-untyped-call]
        'CREATE TABLE IF NOT EXISTS "job" ("id" INTEGER NOT NULL PRIMARY KEY, "task" TEXT, "command" TEXT NOT NULL, '
        '"queue" TEXT NOT NULL, "priority" INTEGER NOT NULL, "state" TEXT NOT NULL, "context" TEXT, "key" TEXT, '
        '"created_at" REAL NOT NULL, "run_at" REAL NOT NULL, "started_at" REAL, "finished_at" REAL, '
        '"attempts" INTEGER NOT NULL, "exit_code" INTEGER, "signal" INTEGER, "progress" INTEGER NOT NULL, '
        '"error" TEXT, "env" TEXT NOT NULL, "stdin" BLOB, "working_dir" TEXT, "timeout" REAL, '
        '"kill_grace" REAL NOT NULL, "retry" TEXT NOT NULL, "max_output" INTEGER NOT NULL, "submitted_by" INTEGER)'
    )
    for statement in (
        'CREATE UNIQUE INDEX IF NOT EXISTS "job_key" ON "job" ("key")',
        'CREATE INDEX IF NOT EXISTS "job_state_queue" ON "job" ("state", "queue")',
        'CREATE INDEX IF NOT EXISTS "job_context" ON "job" ("context")',
        'CREATE INDEX IF NOT EXISTS "job_task" ON "job" ("task")',
    ):
        db.execute_sql(statement)  # type: ignore[no-untyped-call]
    db.execute_sql(  # type: ignore[no-untyped-call]
        'CREATE TABLE IF NOT EXISTS "attempt" ("id" INTEGER NOT NULL PRIMARY KEY, "job_id" INTEGER NOT NULL, '
        '"number" INTEGER NOT NULL, "started_at" REAL NOT NULL, "finished_at" REAL, "outcome" TEXT, '
        '"exit_code" INTEGER, "signal" INTEGER, "pid" INTEGER, "pid_start" INTEGER, "cpu_user" REAL, '
        '"cpu_system" REAL, "max_rss_kib" INTEGER, "stdout_bytes" INTEGER NOT NULL, "stderr_bytes" INTEGER NOT NULL, '
        '"truncated" INTEGER NOT NULL, "error" TEXT, '
        'FOREIGN KEY ("job_id") REFERENCES "job" ("id") ON DELETE CASCADE)'
    )
    for statement in (
        'CREATE INDEX IF NOT EXISTS "attempt_job_id" ON "attempt" ("job_id")',
        'CREATE UNIQUE INDEX IF NOT EXISTS "attempt_job_id_number" ON "attempt" ("job_id", "number")',
    ):
        db.execute_sql(statement)  # type: ignore[no-untyped-call]
    db.execute_sql(  # type: ignore[no-untyped-call]
        'CREATE TABLE IF NOT EXISTS "queue_state" ("name" TEXT NOT NULL PRIMARY KEY, "paused" INTEGER NOT NULL)'
    )


def _migration_2(db: peewee.SqliteDatabase) -> None:
    # Most jobs have no key, context or task name, yet SQLite indexes NULLs too: each of these indexes cost every
    # submit one more page written to the WAL. Partial indexes hold only the rows that can match a lookup
    # (`key = ?` implies `key IS NOT NULL`, so the planner still uses them). attempt_job_id duplicated the
    # leading column of the unique (job_id, number) index.
    for statement in (
        'DROP INDEX "job_key"',
        'CREATE UNIQUE INDEX "job_key" ON "job" ("key") WHERE "key" IS NOT NULL',
        'DROP INDEX "job_context"',
        'CREATE INDEX "job_context" ON "job" ("context") WHERE "context" IS NOT NULL',
        'DROP INDEX "job_task"',
        'CREATE INDEX "job_task" ON "job" ("task") WHERE "task" IS NOT NULL',
        'DROP INDEX "attempt_job_id"',
    ):
        db.execute_sql(statement)  # type: ignore[no-untyped-call]


class InstanceRow(_Base):
    id = peewee.AutoField()
    workflow = peewee.TextField()
    status = peewee.TextField()
    errors = peewee.IntegerField(default=0)
    started_at = peewee.DoubleField()
    ended_at = peewee.DoubleField(null=True)
    comment = peewee.TextField(null=True)
    host = peewee.TextField(null=True)
    user = peewee.TextField(null=True)
    launched_by = peewee.IntegerField(null=True)
    parameters = peewee.TextField()  # JSON object
    tags = peewee.TextField(default="[]")  # JSON list
    document = peewee.BlobField()  # the evQueue instance document, saved as it changes (Instances._save)
    custom_attributes = peewee.TextField(default="[]")  # JSON list of [name, value]; since schema version 5

    class Meta:
        table_name = "instance"
        indexes = ((("status",), False), (("workflow",), False))


def _migration_3(db: peewee.SqliteDatabase) -> None:
    # The table as schema version 3 had it: later columns come with their own migrations.
    db.execute_sql(  # type: ignore[no-untyped-call]
        'CREATE TABLE IF NOT EXISTS "instance" ("id" INTEGER NOT NULL PRIMARY KEY, "workflow" TEXT NOT NULL, '
        '"status" TEXT NOT NULL, "errors" INTEGER NOT NULL, "started_at" REAL NOT NULL, "ended_at" REAL, '
        '"comment" TEXT, "host" TEXT, "user" TEXT, "launched_by" INTEGER, "parameters" TEXT NOT NULL, '
        '"tags" TEXT NOT NULL, "document" BLOB NOT NULL)'
    )
    db.execute_sql('CREATE INDEX IF NOT EXISTS "instance_status" ON "instance" ("status")')  # type: ignore[no-untyped-call]
    db.execute_sql('CREATE INDEX IF NOT EXISTS "instance_workflow" ON "instance" ("workflow")')  # type: ignore[no-untyped-call]


def _migration_4(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "job" ADD COLUMN "merge_stderr" INTEGER NOT NULL DEFAULT 0')  # type: ignore[no-untyped-call]


def _migration_5(db: peewee.SqliteDatabase) -> None:
    db.execute_sql("""ALTER TABLE "instance" ADD COLUMN "custom_attributes" TEXT NOT NULL DEFAULT '[]'""")  # type: ignore[no-untyped-call]


class ScheduleRow(_Base):
    name = peewee.TextField(primary_key=True)
    last_run = peewee.DoubleField(null=True)
    last_result = peewee.TextField(null=True)
    last_run_id = peewee.IntegerField(null=True)
    next_run = peewee.DoubleField(null=True)
    suspended = peewee.BooleanField(default=False)
    enabled = peewee.BooleanField(null=True)
    config_enabled = peewee.BooleanField(null=True)  # since schema version 19
    last_due = peewee.DoubleField(null=True)  # since schema version 20
    after_run = peewee.BooleanField(null=True)  # since schema version 21
    last_run_kind = peewee.TextField(null=True)  # since schema version 22
    pending = peewee.DoubleField(null=True)  # since schema version 23

    class Meta:
        table_name = "schedule"


def _migration_6(db: peewee.SqliteDatabase) -> None:
    # The table as schema version 6 had it, spelled out: built from ScheduleRow, it would take the columns later
    # migrations add, and those would then fail on a new database.
    db.execute_sql(  # type: ignore[no-untyped-call]
        'CREATE TABLE IF NOT EXISTS "schedule" ("name" TEXT NOT NULL PRIMARY KEY, "last_run" REAL, '
        '"last_result" TEXT, "last_run_id" INTEGER, "next_run" REAL, "suspended" INTEGER NOT NULL, "enabled" INTEGER)'
    )


class AuditRow(_Base):
    id = peewee.AutoField()
    at = peewee.DoubleField()
    uid = peewee.IntegerField(null=True)  # None for a remote login
    user = peewee.TextField()
    command = peewee.TextField()  # the method or evQueue command, e.g. "job.cancel", "instance launch"
    target = peewee.TextField(null=True)  # what it acted on, e.g. "job 42", "queue photo"
    result = peewee.TextField()  # "ok" or the error code
    message = peewee.TextField(null=True)  # the error message, if any

    class Meta:
        table_name = "audit"
        indexes = ((("at",), False),)


def _migration_7(db: peewee.SqliteDatabase) -> None:
    db.create_tables([AuditRow])


def _migration_8(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "job" ADD COLUMN "run_as_uid" INTEGER')  # type: ignore[no-untyped-call]
    db.execute_sql('ALTER TABLE "job" ADD COLUMN "run_as_gid" INTEGER')  # type: ignore[no-untyped-call]


def _migration_9(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "job" ADD COLUMN "http" TEXT')  # type: ignore[no-untyped-call]


class CallbackRow(_Base):
    """One delivery of a completion callback: what was sent where, each try's result (audit of deliveries)."""

    id = peewee.AutoField()
    job_id = peewee.IntegerField()
    event = peewee.TextField()  # on_success | on_failure | on_finish
    target = peewee.TextField()  # the URL or the argv, for people
    state = peewee.TextField()  # pending | delivered | failed
    tries = peewee.IntegerField(default=0)
    next_try_at = peewee.DoubleField(null=True)
    last_error = peewee.TextField(null=True)
    spec = peewee.TextField()  # JSON: the callback definition
    created_at = peewee.DoubleField()
    delivered_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "callback"
        indexes = ((("state",), False), (("job_id",), False))


def _migration_10(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "job" ADD COLUMN "callbacks" TEXT')  # type: ignore[no-untyped-call]
    db.create_tables([CallbackRow])


# A finished job whose callbacks match its final state (as callbacks.matching_events says) but whose callback rows
# were never created: jobd died between the job's final commit and the commit of its rows (two transactions: the
# engine's finish path stays lean). A partial index holds exactly such jobs, so the check each start-up makes reads
# only them, however long the history. The query must repeat this text for SQLite to use the index; changing it
# means a new migration that drops and recreates the index (migration 11 builds it from this text).
_CALLBACKS_UNQUEUED = (
    '"callbacks" IS NOT NULL AND "callbacks_queued" = 0 AND ('
    "(\"state\" = 'succeeded' AND (json_array_length(\"callbacks\", '$.on_success') > 0"
    " OR json_array_length(\"callbacks\", '$.on_finish') > 0))"
    " OR (\"state\" IN ('failed', 'timed_out', 'cancelled') AND (json_array_length(\"callbacks\", '$.on_failure') > 0"
    " OR json_array_length(\"callbacks\", '$.on_finish') > 0)))"
)


def _migration_11(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "job" ADD COLUMN "callbacks_queued" INTEGER NOT NULL DEFAULT 0')  # type: ignore[no-untyped-call]
    db.execute_sql(  # type: ignore[no-untyped-call]
        'UPDATE "job" SET "callbacks_queued" = 1 WHERE "id" IN (SELECT "job_id" FROM "callback")'
    )
    db.execute_sql(  # type: ignore[no-untyped-call]
        f'CREATE INDEX "job_callbacks_unqueued" ON "job" ("id") WHERE {_CALLBACKS_UNQUEUED}'
    )


def _migration_12(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "attempt" ADD COLUMN "cancel_requested" INTEGER NOT NULL DEFAULT 0')  # type: ignore[no-untyped-call]


def _migration_13(db: peewee.SqliteDatabase) -> None:
    # The highest job and instance ids (and, since schema 18, audit entry ids) ever handed out, written when rows are
    # deleted: see Store._last_id.
    db.execute_sql('CREATE TABLE "id_floor" ("name" TEXT NOT NULL PRIMARY KEY, "id" INTEGER NOT NULL)')  # type: ignore[no-untyped-call]


# A job has finished once it has a finish time (a retry waiting has none); the partial index job_finished_at held
# exactly those rows for the retention queries, until job_expirable took its place (schema version 17).
_FINISHED = '"finished_at" IS NOT NULL'


def _migration_14(db: peewee.SqliteDatabase) -> None:
    # Retention finds the oldest finishes by it, at each expiry, without reading the whole table.
    db.execute_sql(f'CREATE INDEX "job_finished_at" ON "job" ("finished_at") WHERE {_FINISHED}')  # type: ignore[no-untyped-call]


def _migration_15(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "queue_state" ADD COLUMN "config_paused" INTEGER')  # type: ignore[no-untyped-call]


def _migration_16(db: peewee.SqliteDatabase) -> None:
    # "truncated" names the streams cut (bits, see _CUT_STREAM); its old 1 said only that some stream was.
    db.execute_sql('UPDATE "attempt" SET "truncated" = 8 WHERE "truncated" = 1')  # type: ignore[no-untyped-call]


# A finished job may expire once no callback delivery of its is pending: a delivery needs the job (with keep_last = 0
# every job went before its first delivery, which then never happened). The partial index job_expirable holds
# exactly the jobs that may, so retention reads only those, however many wait for their callbacks: a callback URL
# down for minutes at a busy site holds thousands, and every trim stepped over all of them (5 ms a trim at 10,000).
# The queries must repeat this text for SQLite to use the index; changing it means a migration that rebuilds it.
_EXPIRABLE = '"finished_at" IS NOT NULL AND "callbacks_pending" = 0'


def _migration_17(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "job" ADD COLUMN "callbacks_pending" INTEGER NOT NULL DEFAULT 0')  # type: ignore[no-untyped-call]
    db.execute_sql(  # type: ignore[no-untyped-call]
        'UPDATE "job" SET "callbacks_pending" = 1 WHERE "id" IN '
        """(SELECT "job_id" FROM "callback" WHERE "state" = 'pending')"""
    )
    db.execute_sql(f'CREATE INDEX "job_expirable" ON "job" ("finished_at") WHERE {_EXPIRABLE}')  # type: ignore[no-untyped-call]
    db.execute_sql('DROP INDEX "job_finished_at"')  # type: ignore[no-untyped-call]  # job_expirable does its work


# Ended workflow instances expire after history.keep_days, as jobs do (HistoryKeeper): this partial index holds
# exactly those, so a trim reads only the instances it may take, never the documents of the others. The queries must
# repeat its WHERE text for SQLite to use it.
_INSTANCE_ENDED = '"ended_at" IS NOT NULL'


def _migration_18(db: peewee.SqliteDatabase) -> None:
    db.execute_sql(f'CREATE INDEX "instance_ended_at" ON "instance" ("ended_at") WHERE {_INSTANCE_ENDED}')  # type: ignore[no-untyped-call]


def _migration_19(db: peewee.SqliteDatabase) -> None:
    # The file's `enabled` under which an API enable/disable was given. Rows saved before have NULL: the scheduler
    # takes the file's value at its first start on this schema (Scheduler._file_enabled says why).
    db.execute_sql('ALTER TABLE "schedule" ADD COLUMN "config_enabled" INTEGER')  # type: ignore[no-untyped-call]


def _migration_20(db: peewee.SqliteDatabase) -> None:
    # The due time a schedule last fired, so that setting the clock back does not fire it again. Rows saved before
    # have NULL: their next time is counted from "now", as it was.
    db.execute_sql('ALTER TABLE "schedule" ADD COLUMN "last_due" REAL')  # type: ignore[no-untyped-call]


def _migration_21(db: peewee.SqliteDatabase) -> None:
    # Whether a schedule without a next time waits for the end of its run (overlap "skip") rather than being
    # disabled or suspended. Rows saved before have NULL, not known: catch_up_due decides for them as it did.
    db.execute_sql('ALTER TABLE "schedule" ADD COLUMN "after_run" INTEGER')  # type: ignore[no-untyped-call]


def _migration_22(db: peewee.SqliteDatabase) -> None:
    # Whether a schedule's last run is a job or an instance, so that the row of a schedule removed while its run
    # goes can be kept, and the run followed, without its definition. Rows saved before have NULL: the definition
    # says, as it did.
    db.execute_sql('ALTER TABLE "schedule" ADD COLUMN "last_run_kind" TEXT')  # type: ignore[no-untyped-call]


def _migration_23(db: peewee.SqliteDatabase) -> None:
    # The due time of the run that waits for the running one (overlap "queue_one"), which a restart lost. Rows saved
    # before have NULL: no run waits.
    db.execute_sql('ALTER TABLE "schedule" ADD COLUMN "pending" REAL')  # type: ignore[no-untyped-call]


def _migration_24(db: peewee.SqliteDatabase) -> None:
    # The total of an evQueue instance list filtered on errors or on its start counted every row (Store.
    # _instances_matching): these count the instances that match from the index alone. Neither column changes
    # often: the start never, the errors when a task fails.
    db.execute_sql('CREATE INDEX "instance_errors" ON "instance" ("errors")')  # type: ignore[no-untyped-call]
    db.execute_sql('CREATE INDEX "instance_started_at" ON "instance" ("started_at")')  # type: ignore[no-untyped-call]


def _migration_25(db: peewee.SqliteDatabase) -> None:
    db.execute_sql('ALTER TABLE "attempt" ADD COLUMN "time_limit_reached" INTEGER NOT NULL DEFAULT 0')  # type: ignore[no-untyped-call]


# Index i holds the step from schema version i to i + 1. Append, never edit: databases in the field depend on it.
MIGRATIONS = (
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
    _migration_11,
    _migration_12,
    _migration_13,
    _migration_14,
    _migration_15,
    _migration_16,
    _migration_17,
    _migration_18,
    _migration_19,
    _migration_20,
    _migration_21,
    _migration_22,
    _migration_23,
    _migration_24,
    _migration_25,
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class JobFilter:
    states: tuple[JobState, ...] = ()
    queue: str | None = None
    task: str | None = None
    context: str | None = None
    before_id: int | None = None
    limit: int = 100
    # What a non-admin may read: jobs whose task or queue matches one of these GLOB patterns (None: no limit).
    visible_tasks: tuple[str, ...] | None = None
    visible_queues: tuple[str, ...] | None = None
    # The most text the jobs read may hold together (_text_size); None: no limit. See model.MAX_PAGE_TEXT.
    max_text: int | None = None


class _FileName:
    """Whether an open file has lost its name (unlinked, replaced by a rename, or renamed itself: its path then names
    another file, or none): asked before every write to the database (Store._check_file).

    An fstat() before each write cost a system call on every submit and three on every job. Instead the kernel says
    when the file's link count changes (inotify's IN_ATTRIB, sent by unlink and by a rename over it, and by chmod and
    the like, which are told apart by the fstat() then made) and when it is renamed (IN_MOVE_SELF), and the answer is
    kept. It comes through the event
    loop: a request handled in the same turn of the loop as the deletion may still be answered as saved (it is lost
    with everything the deleted file held); the ones after are refused. Without a running loop (tools and tests
    that use the store directly), or when the kernel refuses the watch (fs.inotify.max_user_instances or
    max_user_watches used up), each write makes the fstat() itself. `on_lost` is told once, when the loss is found.
    """

    def __init__(self, path: str, fd: int, on_lost: Callable[[], None] = lambda: None) -> None:
        self._path = path
        self._fd = fd
        self._lost = False
        self._on_lost = on_lost
        self._inotify: inotify_simple.INotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        inotify: inotify_simple.INotify | None = None
        try:
            inotify = inotify_simple.INotify(nonblocking=True)  # close-on-exec, as everything Python opens
            inotify.add_watch(path, inotify_simple.flags.ATTRIB | inotify_simple.flags.MOVE_SELF)
        except OSError as error:
            if inotify is not None:
                inotify.close()
            log.warning("the database file %s is not watched (inotify: %s): each write checks it first", path, error)
            return
        loop.add_reader(inotify.fileno(), self._changed)
        self._inotify, self._loop = inotify, loop
        self._changed()  # a deletion between the open and the watch was not told

    def lost(self) -> bool:
        if self._inotify is None and not self._lost:
            self._look()
        return self._lost

    def _changed(self) -> None:
        assert self._inotify is not None
        self._inotify.read(timeout=0)  # whatever it says (an overflow too), the link count is looked at
        if not self._lost:
            self._look()

    def _look(self) -> None:
        info = os.fstat(self._fd)
        # Followed: a database path that is a symbolic link to the file names it as well.
        named = _identity(self._path, follow_links=True)
        self._lost = info.st_nlink == 0 or named != (info.st_dev, info.st_ino)
        if self._lost:
            self._on_lost()

    def close(self) -> None:
        if self._inotify is not None:
            assert self._loop is not None
            if not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None


_OUTSIDE_PEEWEE = object()  # what Store._transaction tells peewee its transaction is (it is none of peewee's)


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        # Exclusive locking: jobd is the database's only user (the state directory is flock()ed), so SQLite may
        # keep its lock for the connection's life instead of taking and dropping file locks around every
        # transaction, and keeps the WAL index in private memory rather than a shared -shm file.
        self.db = peewee.SqliteDatabase(
            path,
            # Not page_size and journal_mode: they write to the file, so _migrate sets them once it knows the file
            # is jobd's (a database it refuses is left as it was).
            pragmas={
                "locking_mode": "exclusive",
                "synchronous": "normal",
                # A checkpoint copies the WAL into the database and fsync()s both, on the event loop. Most
                # writes rewrite the same few pages (the newest rows), so a longer WAL (up to ~40 MB) copies each
                # page once for many commits and pays the fsyncs a tenth as often as SQLite's default of 1,000.
                "wal_autocheckpoint": WAL_AUTOCHECKPOINT,
                # A burst (a long history trimmed at once) can grow the WAL far beyond that; once checkpointed it
                # is cut back to this size rather than keeping its high-water mark on disk for good.
                "journal_size_limit": 16 * 1024 * 1024,
                "foreign_keys": 1,
                "busy_timeout": 5000,
            },
            autoconnect=False,
            # jobd.backup's worker thread copies the database through this connection, a step at a time (SQLite's
            # online backup API): SQLite serializes the two threads' use of it (sqlite3.threadsafety 3). Nothing
            # else uses it outside the event loop's thread.
            check_same_thread=False,
        )
        self._flusher: _GroupFlusher | None = None
        self._file: int | None = None  # Store.open: the database file, for _check_file (and SQLite's lock: open)
        self._name: _FileName | None = None  # Store.open: whether that file still has a name (_check_file)
        self._wal: tuple[int, int] | None = None  # Store.open: the WAL's device and inode (_drop_wal)
        self._audit_pending: list[AuditEntry] = []
        self._audit_timer: asyncio.TimerHandle | None = None  # the write-behind, or the next try on a full disk
        self._audit_failing = False  # the last write of entries failed: they wait for room
        self._audit_dropped = 0  # entries dropped meanwhile (AUDIT_KEPT_AT_MOST)
        # Told after entries are written: history retention arms its timer for them (HistoryKeeper.audit_written).
        self.audit_written: Callable[[], None] = lambda: None
        self._counts = _JobCounts()
        self._all_counted: asyncio.Future[None] | None = None  # done once count_jobs_soon has counted every job
        # Told the highest job id an insert may hand out, before it does: the daemon keeps a mark of it beside the
        # jobs' output (jobd.job_id_mark), so that a start need not list that directory.
        self.before_job_ids: Callable[[int], None] = lambda highest: None

    def open(self) -> None:
        _db.initialize(self.db)
        self.db.connect()
        self._connection: sqlite3.Connection = self.db.connection()  # type: ignore[no-untyped-call]
        self._migrate()
        # Ids are handed out by jobd, never reused: SQLite would give a new row the highest id in the table plus one,
        # so after the newest jobs (or instances) were deleted, a new one would get an old one's id, and with it that
        # id's leftovers (an output file, a workflow task's idempotency key, a client's reference).
        self._last_id = {table: self._highest_id(table) for table in ("job", "instance", "audit")}
        self._job_by_id = _PreparedSelect(_select_jobs().where(JobRow.id == 0))
        self._jobs = _PreparedSelect(_select_jobs())  # job.list adds its WHERE clause
        self._attempts_of_job = _PreparedSelect(
            AttemptRow.select().where(AttemptRow.job == 0).order_by(AttemptRow.number)
        )
        fsync_directory_of(self.path)  # the entries of a new database and WAL must be durable too; once is enough
        self._flusher = _GroupFlusher(self.path + "-wal")
        # The file as opened, open until the connection is closed. Closing any
        # descriptor of the file, even one opened only to read it, drops every POSIX lock the process holds on it,
        # SQLite's exclusive lock among them: another program could then open the database, and its last close
        # checkpointed jobd's WAL and deleted it under jobd, which went on committing into the deleted file (lost
        # at the next crash). And each write looks at it first (_check_file): deleted while jobd runs (the state
        # directory removed by hand or by a cleaning tool), SQLite goes on writing into the deleted file without a
        # word, and every commit would be answered as saved while all of it vanished at the next start.
        self._file = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        # The WAL as SQLite made it (it keeps it, by its descriptor, until the connection closes): see _drop_wal.
        self._wal = _identity(self.path + "-wal")
        self._name = _FileName(self.path, self._file, self._drop_wal)

    def _check_file(self) -> None:
        """Refuse a write to a database file that no longer has a name (deleted, or replaced by another file):
        what it would save is gone at the next start. An OperationalError, as SQLite's own refusals are, so every
        caller answers STORE_FAILED and tries again as on a full disk."""
        if self.file_lost():
            assert self._file is not None
            if os.fstat(self._file).st_nlink:  # renamed, not deleted: it holds what jobd saved, under another name
                raise sqlite3.OperationalError(
                    f"its file {self.path} was moved away (renamed) while jobd ran: nothing more is saved in it; "
                    f"restart jobd, which opens what is at {self.path} then (a new, empty database if nothing)"
                )
            if os.path.lexists(self.path):  # a copy restored while jobd ran, most likely
                raise sqlite3.OperationalError(
                    f"its file {self.path} was replaced by another while jobd ran: nothing can be saved any more; "
                    "restart jobd, which opens the file now there (what the replaced one held is gone with it)"
                )
            raise sqlite3.OperationalError(
                f"its file {self.path} was deleted while jobd ran: nothing can be saved any more; restart jobd, which "
                "makes a new, empty database (the jobs it held are gone with the file)"
            )

    def file_lost(self) -> bool:
        """Whether the database file was deleted or replaced while jobd ran: no write can be taken any more."""
        return self._name is not None and self._name.lost()

    def _drop_wal(self) -> None:
        """The database file lost its name. Its WAL, still beside that name, belongs to that file, and SQLite leaves
        it there when it closes a database that was moved: the next start would play it into whatever file is put
        there, a copy restored while jobd ran, whose pages it mixed with the old file's (a damaged database). What it
        holds is first written into the file jobd has (a checkpoint: complete, should it have been renamed away and
        kept), then the WAL is removed (SQLite goes on through its descriptor), so a
        crash leaves none either; unless it is no longer SQLite's (removed by hand already, another put there)."""
        wal = self.path + "-wal"
        if self._wal is None or _identity(wal) != self._wal:
            return
        try:
            self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            log.error("the database file that was moved away or deleted could not be checkpointed: %s", error)
        try:
            os.unlink(wal)
        except OSError as error:
            log.error("cannot remove %s, the WAL of the database file that lost its name: %s", wal, error)
        else:
            log.warning("removed %s: the WAL of the database file that was moved, deleted or replaced", wal)

    def source_for_copy(self) -> sqlite3.Connection:
        """Put the audit entries waiting for their write into the database, and return the connection that a worker
        thread copies the database through with SQLite's online backup API (jobd.backup), a step at a time: SQLite
        serializes the connection's use by the two threads, and carries what is committed meanwhile into the copy."""
        self._flush_audit_or_log()
        return self._connection

    def close(self) -> None:
        if not self.db.is_closed():
            self._flush_audit_or_log(last=True)
        if self._flusher is not None:
            self._flusher.close()
        if not self.db.is_closed():
            self.db.close()
        if self._name is not None:
            self._name.close()
            self._name = None
        if self._file is not None:  # only now: closing it would have dropped SQLite's lock (see open)
            os.close(self._file)
            self._file = None

    def _migrate(self) -> None:
        version = self.db.pragma("user_version")
        if version > SCHEMA_VERSION:
            raise StartupError(
                # What to do, as for the other refusals (docs/systemd.md: "the log says what to do"): a newer jobd
                # upgraded it in place, and only that jobd, or a copy made before, can be used.
                f"{self.path} has schema version {version}, newer than this jobd understands ({SCHEMA_VERSION}): "
                "a newer jobd upgraded it; install that jobd again, or restore a copy of the database from before "
                "the upgrade",
                permanent=True,
            )
        # Version 0 is a new, empty file: one that holds tables is another program's, and would be changed if
        # jobd made its own tables beside them.
        if version == 0 and self._connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StartupError(
                f"{self.path} holds tables but no schema version of jobd's: it is not jobd's database; move it away "
                "to start anew, or set [daemon] state_dir to jobd's own directory",
                permanent=True,
            )
        # Pages of 1 KiB rather than 4: a job's commits rewrite the same five or so pages (its row, its attempt, the
        # index entries its state moves between), each appended whole to the WAL, so the bytes copied and
        # checksummed per commit fall by three quarters (store alone: ~18 % less CPU per job). Rows are a few
        # hundred bytes; the rare large one (stdin) goes to overflow pages. Effective only for a new database (set
        # before its first write, migration 1): an existing one keeps the size it was created with.
        self.db.pragma("page_size", 1024)
        for step in range(version, SCHEMA_VERSION):
            try:
                # Not peewee's atomic(): a COMMIT that fails on the disk (an I/O error, a full disk) is rolled back by
                # SQLite itself, and atomic()'s ROLLBACK then raised "cannot rollback - no transaction is active", an
                # SQLITE_ERROR that hid the disk's trouble and was taken below for a damaged file.
                with self._transaction():
                    MIGRATIONS[step](self.db)
                    self.db.pragma("user_version", step + 1)
            except (sqlite3.OperationalError, peewee.OperationalError) as error:
                if _sqlite_error_name(error) != "SQLITE_ERROR":  # a full disk, an I/O error: see startup_failure()
                    raise
                # No such table or column: each step is all or nothing, so the file is as the last one left it.
                raise StartupError(
                    f"{self.path} cannot be brought from schema version {step} to {step + 1} ({error}): it is damaged "
                    "or not jobd's; restore it from a backup, or move it away to start anew",
                    permanent=True,
                ) from None
        # WAL mode is recorded in the file's header, for good: set only once the file has proved to be jobd's (the
        # refusals above, a migration that fails), or a newer jobd's or another program's database in a rollback
        # journal mode would be left switched to WAL by the jobd refusing it. The steps of a new database (or of
        # one a tool took out of WAL mode) are all or nothing in a rollback journal just as in the WAL.
        self.db.pragma("journal_mode", "wal")

    async def flush(self) -> None:
        """Make every transaction committed so far survive a power cut (one fsync shared by all waiters)."""
        assert self._flusher is not None
        await self._flusher.flush()

    # -- jobs ------------------------------------------------------------------------------------------------

    # The write path (submit, start, finish) runs for every job, so it uses SQL text prepared once below rather
    # than peewee's query builder, which composes each statement anew (~100 µs); sqlite3 caches the compiled
    # statements. Reads and the rare writes use peewee.

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._check_file()
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        # Peewee is told of the transaction: before 3.15 (Debian 12 has 3.14) it commits after each write it makes
        # outside one of its own, so a peewee write in here (queuing a job's callbacks, recording a try, a queue's
        # pause, a schedule's state, a trim) committed the transaction half-way, and its COMMIT then failed ("no
        # transaction is active"): the change was taken for failed (STORE_FAILED, callbacks never delivered).
        self.db.push_transaction(_OUTSIDE_PEEWEE)
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT (a full disk, an I/O error): SQLite may have left the transaction open, and
            # the next BEGIN would fail for good. If it rolled back already, this ROLLBACK fails, harmlessly.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        finally:
            self.db.pop_transaction()  # type: ignore[no-untyped-call]

    def insert_jobs(
        self, specs: Sequence[JobSpec], states: Sequence[JobState], now: float, run_ats: Sequence[float]
    ) -> list[tuple[Job, bool]]:
        """Insert jobs in one transaction; a spec whose idempotency key exists yields (existing job, False)."""
        last_id = self._last_id["job"]
        if len(specs) == 1 and specs[0].key is None:
            # One INSERT is a transaction of its own in autocommit mode: no BEGIN and COMMIT round trips.
            job_id = last_id + 1
            self._check_file()
            self.before_job_ids(job_id)
            self._connection.execute(
                _INSERT_JOB, (job_id, *_spec_values(specs[0]), str(states[0]), now, run_ats[0], 0, 0)
            )
            self._last_id["job"] = job_id
            self._counts.add(job_id, str(states[0]), specs[0].queue, specs[0].task)
            return [(Job(id=job_id, spec=_held(specs[0]), state=states[0], created_at=now, run_at=run_ats[0]), True)]
        jobs: list[tuple[Job, bool]] = []
        self.before_job_ids(last_id + len(specs))  # at most: a spec whose key exists takes no id
        with self._transaction() as sql:
            for spec, state, run_at in zip(specs, states, run_ats, strict=True):
                existing = self.job_with_key(spec.key) if spec.key is not None else None
                if existing is not None:
                    jobs.append((existing, False))
                    continue
                last_id += 1
                sql.execute(_INSERT_JOB, (last_id, *_spec_values(spec), str(state), now, run_at, 0, 0))
                jobs.append((Job(id=last_id, spec=_held(spec), state=state, created_at=now, run_at=run_at), True))
        self._last_id["job"] = last_id  # once committed: a rolled back batch used none
        for job, created in jobs:
            if created:
                self._counts.add(job.id, str(job.state), job.spec.queue, job.spec.task)
        return jobs

    def job_stdin(self, job_id: int) -> bytes | None:
        """The stdin of a job, which the jobs this store returns leave here (InStore.STDIN); None: it has none."""
        found = self._connection.execute('SELECT "stdin" FROM "job" WHERE "id" = ?', (job_id,)).fetchone()
        return None if found is None or found[0] is None else bytes(found[0])

    def job_with_key(self, key: str) -> Job | None:
        """The job an idempotency key names, if any."""
        found = self._connection.execute('SELECT "id" FROM "job" WHERE "key" = ?', (key,)).fetchone()
        return None if found is None else self.get_job(int(found[0]))

    def update_job(self, job: Job, before: JobState) -> None:
        """Record a job's change of state outside an attempt's end; `before` is the state it leaves (for the counts
        by state: the engine holds it, so no read of the row is needed)."""
        with self._transaction() as sql:
            sql.execute(_UPDATE_JOB, (*_job_state_values(job), job.id))
        self._counts.move([self._state_move(job, before)])

    def start_attempts(self, starts: Sequence[tuple[Job, Attempt]]) -> None:
        """Record attempts about to start (jobs now `running`), in one transaction."""
        with self._transaction() as sql:
            moves = self._record_starts(sql, starts)
        self._counts.move(moves)

    def unstart_attempts(self, starts: Sequence[tuple[Job, Attempt]]) -> None:
        """Undo start_attempts for attempts never launched, in one transaction: each job back as it waited (`job`,
        `queued`), its attempt deleted, as if it had not been taken."""
        with self._transaction() as sql:
            moves = []
            for job, attempt in starts:
                moves.append(self._state_move(job, JobState.RUNNING))
                sql.execute(_UPDATE_JOB, (*_job_state_values(job), job.id))
                sql.execute(_DELETE_ATTEMPT, (attempt.job_id, attempt.number))
        self._counts.move(moves)

    def record_cancel_request(self, attempt: Attempt) -> None:
        """Remember that a running attempt is being cancelled, before its process is signalled."""
        self._check_file()
        self._connection.execute(_UPDATE_ATTEMPT_CANCEL, (attempt.job_id, attempt.number))

    def record_time_limit_reached(self, attempt: Attempt) -> None:
        """Remember that a running attempt's time limit is stopping it, before its process is signalled."""
        self._check_file()
        self._connection.execute(_UPDATE_ATTEMPT_TIME_LIMIT, (attempt.job_id, attempt.number))

    def record_process(self, attempt: Attempt) -> None:
        """Remember which process runs an attempt, so a restart after a crash can find and stop it."""
        # One statement: in autocommit mode it is a transaction of its own, without BEGIN and COMMIT calls.
        self._check_file()
        self._connection.execute(
            _UPDATE_ATTEMPT_PROCESS, (attempt.pid, attempt.pid_start, attempt.job_id, attempt.number)
        )

    def finish_attempt(self, job: Job, attempt: Attempt, starts: Sequence[tuple[Job, Attempt]] = ()) -> None:
        """Record an ended attempt and the job's new state; with `starts`, also the attempts that take the slot
        it freed, in the same transaction (one commit, and one WAL write of the pages they share, per job)."""
        with self._transaction() as sql:
            sql.execute(_UPDATE_JOB, (*_job_state_values(job), job.id))
            sql.execute(_UPDATE_ATTEMPT, (*_attempt_values(attempt), attempt.job_id, attempt.number))
            moves = [self._state_move(job, JobState.RUNNING), *self._record_starts(sql, starts)]  # an attempt ran
        self._counts.move(moves)

    def _record_starts(self, sql: sqlite3.Connection, starts: Sequence[tuple[Job, Attempt]]) -> list[_StateMove]:
        """Within a transaction: jobs now `running` (they were `queued`) and the attempts they are about to start."""
        moves = []
        for job, attempt in starts:
            moves.append(self._state_move(job, JobState.QUEUED))
            sql.execute(_UPDATE_JOB, (*_job_state_values(job), job.id))
            sql.execute(_INSERT_ATTEMPT, _attempt_values(attempt))
        return moves

    def _state_move(self, job: Job, before: JobState) -> _StateMove:
        """The state a job leaves and the one it takes, for the counts by state (applied once the transaction is
        committed)."""
        if not self._counts.counted(job.id):
            return None
        return (job.id, str(before), str(job.state), job.spec.queue, job.spec.task)

    def get_job(self, job_id: int) -> Job | None:
        rows = self._job_by_id.rows(self._connection, (job_id,))
        return _job_from_row(rows[0]) if rows else None

    def attempts(self, job_id: int) -> list[Attempt]:
        return [_attempt_from_row(row) for row in self._attempts_of_job.rows(self._connection, (job_id,))]

    def count_attempts(self, job_id: int, before: int, excluding: Sequence[Outcome] = ()) -> int:
        """How many attempts of a job, numbered below `before`, ended with an outcome not in `excluding`. Counted by
        SQLite over the (job, number) index, as each attempt ends: reading them all made Python build 1,000 Attempt
        values at the last end of a job retried 1,000 times (28 ms with the loop waiting; counted, 0.25 ms)."""
        marks = ", ".join("?" for _ in excluding)
        sql = f'SELECT COUNT(*) FROM "attempt" WHERE "job_id" = ? AND "number" < ? AND "outcome" NOT IN ({marks})'
        row = self._connection.execute(sql, (job_id, before, *(str(outcome) for outcome in excluding))).fetchone()
        return int(row[0])

    def list_jobs(self, where: JobFilter) -> list[Job]:
        return self.page_of_jobs(where)[0]

    def page_of_jobs(self, where: JobFilter) -> tuple[list[Job], bool]:
        """The jobs `where` selects, newest first, and whether `where.max_text` cut them short (the jobs left out
        are older than the last one given). The rows are read one at a time, so that those past the limit are not
        read at all."""
        with contextlib.closing(self._job_rows(where)) as rows:
            jobs: list[Job] = []
            total = 0
            for row in rows:
                total += _text_size(row)
                if where.max_text is not None and jobs and total > where.max_text:
                    return jobs, True
                jobs.append(_job_from_row(row))
            return jobs, False

    def _job_rows(self, where: JobFilter) -> Generator[Any, None, None]:
        """The rows of the jobs `where` selects, newest first, each read as the caller takes it."""
        # The condition is written out rather than built with peewee on every call: building it took 0.4-0.6 ms,
        # a sixth of a job.list of 100 jobs.
        conditions: list[str] = []
        params: list[Any] = []
        for column, value in (("task", where.task), ("context", where.context)):
            if value is not None:
                conditions.append(f'"{column}" = ?')
                params.append(value)
        if where.before_id is not None:
            conditions.append('"id" < ?')
            params.append(where.before_id)
        visible = where.visible_tasks is not None or where.visible_queues is not None
        if visible and not where.visible_tasks and not where.visible_queues:
            return  # no pattern, no job (and SQLite finds no plan for a query through an index WHERE 0)
        if visible and not where.states and where.queue is None and where.task is None and where.context is None:
            yield from self._rows_by_id(self._visible_ids(where, conditions, params), newest_first=True)
            return
        if visible:
            condition, patterns = _visible_jobs(where.visible_tasks, where.visible_queues)
            conditions.append(condition)
            params += patterns
        index = self._few_jobs_index(where) if where.states or where.queue is not None else None
        if index is not None:
            # A task or context with few jobs: those, newest first, whatever their state and queue.
            if where.states:
                conditions.append(f'"state" IN ({", ".join("?" * len(where.states))})')
                params += [str(state) for state in where.states]
            if where.queue is not None:
                conditions.append('"queue" = ?')
                params.append(where.queue)
            clause = f'INDEXED BY "{index}" WHERE {" AND ".join(conditions)} ORDER BY "id" DESC LIMIT ?'
            yield from self._jobs.lazy_rows(self._connection, (*params, where.limit), clause)
            return
        if where.states or where.queue is not None:
            states = where.states or tuple(JobState)
            ids = self._ids_by_state(
                states,
                where.queue,
                conditions,
                params,
                newest_first=True,
                limit=where.limit,
                pair_may_match=self._pair_may_match(where),
            )
            yield from self._rows_by_id(ids, newest_first=True)
            return
        # No state or queue: the table itself, newest first, stops after `limit` matches.
        clause = f"WHERE {' AND '.join(conditions)} " if conditions else ""
        yield from self._jobs.lazy_rows(self._connection, (*params, where.limit), f'{clause}ORDER BY "id" DESC LIMIT ?')

    def _few_jobs_index(self, where: JobFilter) -> str | None:
        """The index of the job's task or context (job_task, job_context) the filter names, if that task or context
        has fewer than FEW_JOBS jobs (the fewer of the two); else None.

        With a state or queue besides, the jobs of each (state, queue) pair are read newest first until a page of the
        task or context is found (_ids_by_state): for a context with a few hundred jobs among 400,000 that is the
        whole state (45-300 ms). Reading the few jobs of the task or context instead costs what they are; counting
        them, up to FEW_JOBS entries of its index, a fraction of a millisecond."""
        fewest, most = None, FEW_JOBS
        # The context first, the likelier to be rare: the task's count then stops at the context's.
        for index, column, value in (("job_context", "context", where.context), ("job_task", "task", where.task)):
            if value is not None:
                sql = _COUNT_UP_TO.format(index=index, column=column)
                count = int(self._connection.execute(sql, (value, most)).fetchone()[0])
                if count < most:
                    fewest, most = index, count
        if fewest is None and where.task is not None and self._fewer_by_task(where):
            return "job_task"
        return fewest

    def _fewer_by_task(self, where: JobFilter) -> bool:
        """Whether the task's jobs, read newest first, are expected to be fewer to read for a page than the jobs of
        the (state, queue) pairs that hold some of them (_ids_by_state), by the counts of jobs by (state, queue,
        task); False while the history is still being counted. A task spread over every queue with a few of its jobs
        in the state asked for cost the whole state (130-220 ms for a task with 2,103 of 133,000 failed jobs)."""
        states = {str(state) for state in where.states} if where.states else {str(state) for state in JobState}
        spread = self._counts.task_spread(where.task or "", states, where.queue)
        if spread is None:
            return False
        total, pairs = spread
        wanted = sum(held for _, held in pairs)
        if not wanted:
            return False  # no pair is read at all
        by_task = min(total, where.limit * total / wanted)
        by_pairs = sum(min(size, where.limit * size / held) for size, held in pairs)
        return by_task < by_pairs

    def unfinished_jobs(self, page: int = 2**62) -> Iterator[list[Job]]:
        """Every job that has not reached a final state, in submission order, `page` jobs at a time: what a
        start-up must resume. Each page is read after the one before is used (its jobs' states may change
        meanwhile: a page starts after the last id of the one before, so no job comes twice or is skipped)."""
        last_id = 0
        unfinished = tuple(JobState(state) for state in _UNFINISHED)
        while ids := self._ids_by_state(unfinished, None, ['"id" > ?'], [last_id], newest_first=False, limit=page):
            yield [_job_from_row(row) for row in self._rows_by_id(ids, newest_first=False)]
            last_id = ids[-1]

    def _ids_by_state(
        self,
        states: Sequence[JobState],
        queue: str | None,
        conditions: Sequence[str],
        params: Sequence[Any],
        *,
        newest_first: bool,
        limit: int,
        pair_may_match: Callable[[str, str], bool] = lambda state, queue: True,
    ) -> list[int]:
        """The ids of up to `limit` jobs in one of `states` (and `queue`, if given) that meet `conditions`, newest or
        oldest first.

        The index job_state_queue keeps the ids of each (state, queue) pair in order (SQLite ends every index entry
        with the rowid), but not the ids of a state across its queues: asked for a state's newest jobs in one query,
        SQLite read and sorted every job in that state (110-180 ms for 200,000 finished jobs, with the event loop
        waiting). So each pair is read on its own, in id order and at most `limit` of it, and the runs are merged:
        the work grows with the number of queues, not with the history. A pair for which `pair_may_match` is false
        is not read at all."""
        extra = "".join(f" AND {condition}" for condition in conditions)
        sql = (
            f'SELECT "id" FROM "job" WHERE "state" = ? AND "queue" = ?{extra} '
            f'ORDER BY "id" {"DESC" if newest_first else "ASC"} LIMIT ?'
        )
        runs: list[list[int]] = []
        for state in states:
            for name in (queue,) if queue is not None else self._queues_holding(state):
                if not pair_may_match(str(state), name):
                    continue
                runs.append([row[0] for row in self._connection.execute(sql, (str(state), name, *params, limit))])
        if len(runs) <= 1:
            return runs[0] if runs else []
        return list(itertools.islice(heapq.merge(*runs, reverse=newest_first), limit))

    def _visible_ids(self, where: JobFilter, conditions: Sequence[str], params: Sequence[Any]) -> list[int]:
        """The ids of a non-admin's newest jobs (those of a task or a queue her patterns match) that meet
        `conditions`, when no state, queue, task or context narrows them.

        Read newest first from the whole table, with each job's task and queue matched against the patterns, a page
        cost as many jobs as came since the page's last one: all of them when her jobs are few or none (80 ms with
        400,000 jobs). Instead the jobs of each (state, queue) pair whose queue matches are read from job_state_queue,
        and those of each task name that matches from job_task, each in id order and at most `limit` of it; the runs
        are merged, a job in both a matching queue and a matching task once."""
        extra = "".join(f" AND {condition}" for condition in conditions)
        runs: list[list[int]] = []
        pairs = [(state, queue) for state in JobState for queue in self._queues_holding(state)]
        queues = self._matching({queue for _, queue in pairs}, where.visible_queues or ())
        by_pair = f'SELECT "id" FROM "job" WHERE "state" = ? AND "queue" = ?{extra} ORDER BY "id" DESC LIMIT ?'
        for state, queue in pairs:
            if queue in queues:
                runs.append(
                    [row[0] for row in self._connection.execute(by_pair, (str(state), queue, *params, where.limit))]
                )
        tasks = self._matching(self._task_names(), where.visible_tasks or ())
        by_task = f'SELECT "id" FROM "job" INDEXED BY "job_task" WHERE "task" = ?{extra} ORDER BY "id" DESC LIMIT ?'
        for task in sorted(tasks):
            runs.append([row[0] for row in self._connection.execute(by_task, (task, *params, where.limit))])
        ids: list[int] = []
        for job_id in heapq.merge(*runs, reverse=True):
            if ids and ids[-1] == job_id:
                continue
            if len(ids) == where.limit:
                break
            ids.append(job_id)
        return ids

    def _task_names(self) -> list[str]:
        """The task names jobs have, each found by one step down job_task."""
        return [row[0] for row in self._connection.execute(_TASK_NAMES)]

    def _pair_may_match(self, where: JobFilter) -> Callable[[str, str], bool]:
        """Whether a (state, queue) pair can hold jobs the filter lets through: reading the jobs of one that holds
        none, one by one, to learn that would cost as much as the history holds.

        With queue patterns only (a non-admin with rights on some queues), a queue none of them matches holds none.
        With a task, a pair holds none of its jobs if the counts by (state, queue, task) say so (_JobCounts, once
        the history is counted): a task's failed jobs were looked for among the failed jobs of every queue, those
        of the queues it has no jobs in too (all of them)."""
        patterns = where.visible_queues if where.visible_queues is not None and not where.visible_tasks else None
        held = self._counts.pairs_holding(where.task) if where.task is not None else None

        def may_match(state: str, queue: str) -> bool:
            if held is not None and (state, queue) not in held:
                return False
            return patterns is None or bool(self._matching((queue,), patterns))

        return may_match

    def _queues_holding(self, state: JobState) -> list[str]:
        """The queues that have jobs in `state`, each found by one step down job_state_queue (a skip-scan), not by
        reading every job in that state."""
        return [row[0] for row in self._connection.execute(_QUEUES_HOLDING, (str(state),))]

    def _rows_by_id(self, ids: Sequence[int], *, newest_first: bool) -> Iterator[Any]:
        """The rows of `ids`, which are sorted (descending if `newest_first`, else ascending), in that order, read
        one at a time."""
        order = "DESC" if newest_first else "ASC"
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            yield from self._jobs.lazy_rows(
                self._connection, chunk, f'WHERE "id" IN ({", ".join("?" * len(chunk))}) ORDER BY "id" {order}'
            )

    def count_unfinished(self) -> int:
        return int(JobRow.select().where(JobRow.state.in_(_UNFINISHED)).count())

    def jobs_yet_to_write_output(self) -> list[int]:
        """Jobs that may yet write output files: unfinished ones (attempts to come) and finished ones whose callbacks
        are still to be queued (deliveries to come); any other job's attempts and deliveries are all on record. Read
        from indexes alone (the state index, holding the id; the partial index of unqueued callbacks), however long
        the history."""
        unfinished = self._connection.execute(
            f'SELECT "id" FROM "job" WHERE "state" IN ({", ".join("?" * len(_UNFINISHED))})', _UNFINISHED
        )
        unqueued = self._connection.execute(
            f'SELECT "id" FROM "job" INDEXED BY "job_callbacks_unqueued" WHERE {_CALLBACKS_UNQUEUED}'
        )
        return [row[0] for row in unfinished] + [row[0] for row in unqueued]

    def output_on_record(self, job_id: int) -> tuple[int, set[int]]:
        """How many attempts the database records for a job, and the ids of its callback deliveries: the output
        files in its directory that belong to it (STATE_DIR/output/JOB/ATTEMPT.* and callback-DELIVERY.*)."""
        found = self._connection.execute('SELECT "attempts" FROM "job" WHERE "id" = ?', (job_id,)).fetchone()
        deliveries = self._connection.execute('SELECT "id" FROM "callback" WHERE "job_id" = ?', (job_id,))
        return (0 if found is None else int(found[0])), {int(row[0]) for row in deliveries}

    def running_attempt(self, job_id: int) -> Attempt | None:
        row = (
            AttemptRow.select()
            .where((AttemptRow.job == job_id) & _is_null(AttemptRow.outcome))
            .order_by(AttemptRow.number.desc())
            .first()
        )
        return None if row is None else _attempt_from_row(row)

    def count_by_state(
        self, visible_tasks: Sequence[str] | None = None, visible_queues: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Jobs by state; given patterns (JobFilter's), only the jobs of a task or a queue that one of them matches.

        From counts kept as jobs are written (_JobCounts), not from the table: a GROUP BY over the history took
        30 ms with 400,000 jobs, and 340 ms with a non-admin's patterns, on every daemon.status and every scrape of
        /metrics, with the event loop waiting. What the counts have not reached yet is counted now."""
        while self.count_some_jobs():
            pass
        if visible_tasks is None and visible_queues is None:
            return self._counts.by_state()
        queues, tasks = self._counts.names()
        matching_queues = self._matching(queues, visible_queues or ())
        matching_tasks = self._matching(tasks, visible_tasks or ())
        return self._counts.by_state(lambda queue, task: queue in matching_queues or task in matching_tasks)

    def _matching(self, names: Iterable[str], patterns: Sequence[str]) -> set[str]:
        """The names one of the patterns matches, by SQLite's GLOB (as job.list's conditions are)."""
        if not patterns:
            return set()
        condition, params = _globs('"name"."value"', patterns, flat=len(patterns) <= _FLAT_PATTERNS)
        sql = f'SELECT "name"."value" FROM json_each(?) AS "name" WHERE {condition}'
        return {row[0] for row in self._connection.execute(sql, (json.dumps(list(names)), *params))}

    def count_some_jobs(self) -> bool:
        """Count the next COUNT_SLICE ids of the jobs not counted yet (the history as the store was opened, in id
        order); False once every job is counted. A start-up leaves them to the event loop (count_jobs_soon), a slice
        at a time, rather than reading a long history at once."""
        start = self._counts.counted_to
        if start is None:
            return False
        # From the next job on record: ids may leap (reserve_ids, past the output of jobds restored from a copy).
        following = self._connection.execute(_NEXT_JOB_ID, (start,)).fetchone()[0]
        if following is None:
            self._counts.done()
            return False
        start = following - 1
        end = start + COUNT_SLICE
        self._counts.add_slice(end, self._connection.execute(_COUNT_JOBS_BETWEEN, (start, end)))
        return True

    def count_jobs_soon(self) -> None:
        """Count the jobs on the running loop, a slice per turn, until all are (jobs_counted() waits for that)."""
        if self._all_counted is not None:
            return  # under way or done

        def step() -> None:
            # However the slices end (all counted, the store closed by a stop, a failed read), the waits of
            # jobs_counted end too: count_by_state counts whatever is left, or says why it cannot.
            try:
                more = not self.db.is_closed() and self.count_some_jobs()
            except Exception as error:
                counted.set_result(None)
                # A damaged page of the history (or a failing disk) is the administrator's to mend: one line that
                # says what to do, as for a request, not a traceback. Anything else is jobd's bug, and has one.
                if refused_request("counting the jobs on record", error) is None:
                    raise  # to the loop's exception handler, which logs it
                return
            if more:
                loop.call_soon(step)
            else:
                counted.set_result(None)

        loop = asyncio.get_running_loop()
        counted = self._all_counted = loop.create_future()
        loop.call_soon(step)

    async def jobs_counted(self) -> None:
        """Return once count_jobs_soon has counted every job, so that count_by_state reads no history: counting the
        rest at once, a daemon.status or a scrape of /metrics just after a start held the event loop, and every
        client with it, for seconds (a million jobs: 2-8 s)."""
        self.count_jobs_soon()  # a client served before READY=1 starts it
        assert self._all_counted is not None
        await asyncio.shield(self._all_counted)  # one request given up does not end the wait of the others

    # -- history retention -----------------------------------------------------------------------------------

    # Retention reads only jobs that may expire: finished, with no callback delivery pending (_EXPIRABLE).

    def expirable_count(self) -> int:
        """How many finished jobs the history holds, leaving out those whose callbacks are pending."""
        return int(self._connection.execute(_COUNT_EXPIRABLE).fetchone()[0])

    def expirable_before(self, moment: float, limit: int) -> list[int]:
        """Up to `limit` of the jobs that may expire and finished before `moment`, oldest first."""
        return [row[0] for row in self._connection.execute(_EXPIRABLE_BEFORE, (moment, limit))]

    def oldest_expirable(self, limit: int) -> list[int]:
        """Up to `limit` of the jobs that may expire, oldest first."""
        return [row[0] for row in self._connection.execute(_OLDEST_EXPIRABLE, (limit,))]

    def delete_jobs(self, ids: Sequence[int]) -> None:
        """Delete jobs with their attempts and callback deliveries, in one transaction."""
        if not ids:
            return
        gone: list[tuple[int, str, str, str | None]] = []
        with self._transaction() as sql:
            self._keep_ids_used("job")
            for start in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
                chunk = ids[start : start + 500]
                counted = [job_id for job_id in chunk if self._counts.counted(job_id)]
                if counted:
                    marks = ", ".join("?" * len(counted))
                    gone += sql.execute(_KEYS_OF_JOBS.format(marks=marks), counted).fetchall()
                JobRow.delete().where(JobRow.id.in_(chunk)).execute()
                # Their callback rows go too (no foreign key: the table came later).
                CallbackRow.delete().where(CallbackRow.job_id.in_(chunk)).execute()
        self._counts.remove(gone)

    def oldest_instance_or_audit_at(self) -> float | None:
        """When the workflow instance that ended first ended, or the oldest audit entry was written, whichever came
        first: the next of them that history.keep_days takes (an index lookup each)."""
        ended = self._connection.execute(_OLDEST_INSTANCE_END).fetchone()[0]
        written = self._connection.execute(_OLDEST_AUDIT).fetchone()[0]
        moments = [float(moment) for moment in (ended, written) if moment is not None]
        return min(moments) if moments else None

    def expire_instances(self, moment: float, limit: int, most_bytes: int) -> tuple[int, bool]:
        """Delete the workflow instances that ended before `moment`, oldest first: up to `limit` of them, and no more
        of their documents than `most_bytes` (one at least). How many, and whether a limit left some that are due.

        Freeing a document reads every page of it: 100 documents of 5 MB took 3.7 s (8.8 s from a cold cache), all
        of it with the event loop held."""
        rows = self._connection.execute(_INSTANCES_ENDED_BEFORE, (moment, limit)).fetchall()
        ids: list[int] = []
        size = 0
        for instance_id, length in rows:
            if ids and size + (length or 0) > most_bytes:
                break
            ids.append(instance_id)
            size += length or 0
        if ids:
            with self._transaction() as sql:
                self._keep_ids_used("instance")
                sql.execute(f'DELETE FROM "instance" WHERE "id" IN ({", ".join("?" * len(ids))})', ids)
        return len(ids), len(ids) == limit or len(ids) < len(rows)

    def expire_audit(self, moment: float, limit: int) -> int:
        """Delete up to `limit` of the audit entries written before `moment`, oldest first: how many."""
        ids = [row[0] for row in self._connection.execute(_AUDIT_BEFORE, (moment, limit))]
        if ids:
            with self._transaction() as sql:
                self._keep_ids_used("audit")
                sql.execute(f'DELETE FROM "audit" WHERE "id" IN ({", ".join("?" * len(ids))})', ids)
        return len(ids)

    def oldest_expirable_at(self, skip: Set[int] = frozenset()) -> float | None:
        """When the job that may expire first finished (none of `skip`)."""
        for job_id, finished_at in self._connection.execute(_OLDEST_EXPIRABLE_AT, (len(skip) + 1,)):
            if job_id not in skip:
                return float(finished_at)
        return None

    # -- workflow instances ----------------------------------------------------------------------------------

    def next_instance_id(self) -> int:
        """The id the next instance gets: its document carries it, and is committed with its row (insert_instance)."""
        return self._last_id["instance"] + 1

    def insert_instance(self, summary: InstanceSummary, document: bytes) -> int:
        """Commit a new instance, its row and its first document together; `summary.id` is next_instance_id()."""
        instance_id = self.next_instance_id()
        if summary.id != instance_id:
            raise ValueError(f"instance {summary.id} is not the next instance id ({instance_id})")
        with self._transaction():
            row = InstanceRow.create(
                id=instance_id,
                workflow=summary.workflow,
                status=summary.status,
                errors=summary.errors,
                started_at=summary.started_at,
                comment=summary.comment,
                host=summary.host,
                user=summary.user,
                launched_by=summary.launched_by,
                parameters=json.dumps(dict(summary.parameters)),
                document=document,
            )
        self._last_id["instance"] = instance_id
        return int(row.id)

    def save_instance(
        self,
        instance_id: int,
        status: str,
        errors: int,
        ended_at: float | None,
        tags: Sequence[str],
        document: bytes,
        custom_attributes: Sequence[tuple[str, str]] = (),
    ) -> None:
        with self._transaction() as sql:
            sql.execute(
                "UPDATE instance SET status = ?, errors = ?, ended_at = ?, tags = ?, document = ?, "
                "custom_attributes = ? WHERE id = ?",
                (
                    status,
                    errors,
                    ended_at,
                    json.dumps(list(tags)),
                    document,
                    json.dumps([list(pair) for pair in custom_attributes]),
                    instance_id,
                ),
            )

    def instance(self, instance_id: int) -> tuple[InstanceSummary, bytes] | None:
        row = InstanceRow.get_or_none(InstanceRow.id == instance_id)
        return None if row is None else (_instance_from_row(row), bytes(row.document))

    def executing_instances(self) -> list[tuple[InstanceSummary, bytes]]:
        query = InstanceRow.select().where(InstanceRow.status == "EXECUTING").order_by(InstanceRow.id)
        return [(_instance_from_row(row), bytes(row.document)) for row in query]

    def list_instances(self, where: InstanceFilter) -> tuple[list[InstanceSummary], int]:
        """Newest first (or by end, `where.by_end`), with the number of instances matching regardless of limit and
        offset."""
        fields = [field for field in InstanceRow._meta.sorted_fields if field.name != "document"]
        rows, total = self._instance_rows(where, fields)
        return [_instance_from_row(row) for row in rows], total

    async def read_instance_starts(self, where: InstanceFilter) -> list[tuple[str, float]]:
        """The workflow and start time of each instance list_instances(where) lists, in no particular order: what
        evQueue's `groupby` counts.

        Only the columns it needs: a summary reads the whole of each instance's row, its document too (the custom
        attributes come after it), and parses its JSON (20,000 instances: 480 ms with the event loop waiting). And
        INSTANCE_SLICE ids at a time, newest first, with the loop running between slices: grouping counts every
        instance that matches (up to `where.limit`, in evQueue's order), so however few columns, reading them all at
        once held the loop 100-170 ms for 20,000."""
        fields: list[peewee.Field] = [
            InstanceRow.id,
            InstanceRow.workflow,
            InstanceRow.started_at,
            InstanceRow.ended_at,
        ]
        top = self._last_id["instance"] + 1
        if where.before_id is not None:
            top = min(top, where.before_id)
        slice_of = dataclasses.replace(where, limit=INSTANCE_SLICE, offset=0, by_end=False)
        rows: list[Any] = []
        while top > 0:
            low = max(0, top - INSTANCE_SLICE)
            rows += self._instance_rows(dataclasses.replace(slice_of, before_id=top), fields, total=False, low=low)[0]
            top = low
            if top:
                await self._next_slice()
        if where.offset or len(rows) > where.limit:  # the part of evQueue's order the filter asks for
            rows.sort(key=lambda row: (row.ended_at is not None, row.ended_at or 0.0, row.id), reverse=True)
            rows = rows[where.offset : where.offset + where.limit]
        return [(row.workflow, float(row.started_at)) for row in rows]

    async def count_instance_starts(self, where: InstanceFilter, period: str) -> dict[tuple[str, str], int] | None:
        """How many instances list_instances(where) lists, by workflow and start period: the start time in local
        time as SQLite's strftime(`period`) writes it. What evQueue's `groupby` counts. None if more than
        `where.limit` match, or with an offset: only some of them are counted then, those read_instance_starts
        reads in evQueue's order.

        Counted by SQLite, INSTANCE_SLICE ids at a time with the event loop running between slices: counted in
        Python from the rows, 20,000 instances held the loop up to 76 ms in one turn."""
        if where.offset:
            return None
        top = self._last_id["instance"] + 1
        if where.before_id is not None:
            top = min(top, where.before_id)
        # The start truncated to the second, as time.localtime takes it: SQLite rounds to the millisecond.
        started = peewee.fn.strftime(period, peewee.Cast(InstanceRow.started_at, "INTEGER"), "unixepoch", "localtime")
        counts: dict[tuple[str, str], int] = {}
        counted = 0
        while top > 0:
            low = max(0, top - INSTANCE_SLICE)
            query = self._instances_matching(
                InstanceRow.select(InstanceRow.workflow, started, peewee.fn.COUNT(peewee.SQL("*"))),
                dataclasses.replace(where, before_id=top),
                low,
            ).group_by(InstanceRow.workflow, started)
            sql, params = query.sql()
            for workflow, start, count in self._connection.execute(sql, params):
                counts[(workflow, start)] = counts.get((workflow, start), 0) + count
                counted += count
            if counted > where.limit:
                return None
            top = low
            if top:
                await self._next_slice()
        return counts

    def _instance_rows(
        self, where: InstanceFilter, fields: Sequence[peewee.Field], *, total: bool = True, low: int | None = None
    ) -> tuple[list[Any], int]:
        """The rows of the instances `where` lists (with `fields`; with `low`, only ids from it on), and how many
        match (with `total`; else 0)."""
        query = self._instances_matching(InstanceRow.select(*fields), where, low)
        matching = 0
        if total:
            counted = self._instances_matching(InstanceRow.select(InstanceRow.id), where, low, counting=True)
            matching = int(counted.count())
        if not where.by_end:
            newest = query.order_by(InstanceRow.id.desc()).limit(where.limit).offset(where.offset)
            return self._rows_by(newest, fields), matching
        # evQueue's order: the latest end first, instances still running (no end) last, as MySQL sorts NULLs. In one
        # query SQLite read and sorted every instance that matched, each with its document (24 ms for a page of
        # 20,000 instances); the ended ones are read newest end first from instance_ended_at (whose entries end with
        # the id), up to the page's end, and the running ones from instance_status: an instance has no end exactly
        # while it is EXECUTING (Instances saves its end with its status).
        ended_query = query.where(_is_not_null(InstanceRow.ended_at))
        ended_order = (InstanceRow.ended_at.desc(), InstanceRow.id.desc())
        page = self._rows_by(
            ended_query.order_by(*ended_order).limit(where.limit).offset(where.offset), fields, "instance_ended_at"
        )
        if len(page) < where.limit:
            running_query = query.where((InstanceRow.status == "EXECUTING") & _is_null(InstanceRow.ended_at))
            running = self._rows_by(running_query.order_by(InstanceRow.id.desc()), fields, "instance_status")
            skip = 0
            if where.offset:  # past the ended ones that match, by as many as they fell short of the offset
                ended = matching - len(running) if total else int(ended_query.count())
                skip = max(0, where.offset - ended)
            page += running[skip : skip + where.limit - len(page)]
        return page, matching

    def _instances_matching(
        self,
        query: peewee.ModelSelect[InstanceRow],
        where: InstanceFilter,
        low: int | None = None,
        *,
        counting: bool = False,
    ) -> peewee.ModelSelect[InstanceRow]:
        """`query` limited to the instances `where` lists (with `low`, only ids from it on), in no order.

        The indexes on the errors and the start (migration 24) serve `counting` only, the total of a list: a count of
        the instances with errors, or launched in a period, reads them alone instead of every row (12-25 ms for
        20,000 instances). A page, or a slice of ids, is read in id or end order, from the table or another index:
        through one of these, SQLite would read every instance in the period and sort them for a page of 30."""
        started_at = InstanceRow.started_at if counting else _not_through_an_index(InstanceRow.started_at)
        errors = InstanceRow.errors if counting else _not_through_an_index(InstanceRow.errors)
        conditions = []
        if low is not None:
            conditions.append(InstanceRow.id >= low)
        if where.ids:
            conditions.append(InstanceRow.id.in_(list(where.ids)))
        if where.workflow is not None:
            conditions.append(InstanceRow.workflow == where.workflow)
        if where.status is not None:
            conditions.append(InstanceRow.status == where.status)
        if where.launched_from is not None:
            conditions.append(started_at >= where.launched_from)
        if where.launched_until is not None:
            conditions.append(started_at <= where.launched_until)
        if where.ended_from is not None:
            conditions.append(InstanceRow.ended_at >= where.ended_from)
        if where.ended_until is not None:
            conditions.append(InstanceRow.ended_at <= where.ended_until)
        if where.error is not None:
            conditions.append(errors > 0 if where.error else errors == 0)
        if where.before_id is not None:
            conditions.append(InstanceRow.id < where.before_id)
        if where.visible_workflows is not None:
            conditions.append(_glob_any(InstanceRow.workflow, where.visible_workflows))
        # Exact string matches inside the JSON columns: parameters is an object (name -> value), custom_attributes a
        # list of [name, value] pairs, one of which must match. No index: this scans the instances listed.
        for name, value in where.parameters.items():
            conditions.append(
                _json_exists(
                    InstanceRow.parameters, "pair.key = ? AND pair.type = 'text' AND pair.value = ?", name, value
                )
            )
        for name, value in where.custom_attributes.items():
            conditions.append(
                _json_exists(
                    InstanceRow.custom_attributes,
                    "json_extract(pair.value, '$[0]') = ? AND json_extract(pair.value, '$[1]') = ?",
                    name,
                    value,
                )
            )
        if conditions:
            # One flat AND: where() per condition nests them ((a AND b) AND c)…, one level each, which peewee's SQL
            # writer recurses into and SQLite's parser refuses past about a hundred ("parser stack overflow").
            return query.where(peewee.NodeList(conditions, glue=" AND "))
        return query

    def _rows_by(
        self, query: peewee.ModelSelect[InstanceRow], fields: Sequence[peewee.Field], index: str | None = None
    ) -> list[Any]:
        """The rows of `query` as named tuples of its columns (peewee's model instances cost 15 µs a row), read
        through `index` if given (INDEXED BY: a filter on another indexed column, a workflow, would have SQLite read
        that index instead and sort what it found)."""
        sql, params = query.sql()
        if index is not None:
            table = 'FROM "instance" AS "t1"'
            assert table in sql, sql
            sql = sql.replace(table, f'{table} INDEXED BY "{index}"', 1)
        make_row = _row_maker(tuple(field.column_name for field in fields))
        return list(map(make_row, self._connection.execute(sql, params)))

    def delete_instance(self, instance_id: int) -> None:
        with self._transaction():
            self._keep_ids_used("instance")
            InstanceRow.delete().where(InstanceRow.id == instance_id).execute()

    def _highest_id(self, table: str) -> int:
        """The highest id `table` ever had: its rows', or one deleted since (kept in id_floor)."""
        used = self._connection.execute(f'SELECT MAX("id") FROM "{table}"').fetchone()[0]
        kept = self._connection.execute('SELECT "id" FROM "id_floor" WHERE "name" = ?', (table,)).fetchone()
        return max(used or 0, kept[0] if kept else 0)

    def last_id(self, table: str) -> int:
        """The highest id of `table` handed out so far."""
        return self._last_id[table]

    def reserve_ids(self, table: str, highest: int) -> int:
        """Ids of `table` up to `highest` are never handed out (kept in id_floor); returns the highest id the database
        knew before."""
        known = self._last_id[table]
        if highest > known:
            # Not peewee's atomic(): see _migrate (a COMMIT the disk fails was told as "cannot rollback").
            with self._transaction():
                self._last_id[table] = highest
                self._keep_ids_used(table)
        return known

    def _keep_ids_used(self, table: str) -> None:
        """Within the transaction that deletes rows of `table`: remember its highest id, which may be among them."""
        self._connection.execute(
            'INSERT OR REPLACE INTO "id_floor" ("name", "id") VALUES (?, ?)', (table, self._last_id[table])
        )

    # -- schedules -------------------------------------------------------------------------------------------

    def schedule_states(self) -> dict[str, ScheduleState]:
        return {
            row.name: ScheduleState(
                name=row.name,
                last_run=row.last_run,
                last_result=row.last_result,
                last_run_id=row.last_run_id,
                next_run=row.next_run,
                suspended=bool(row.suspended),
                enabled=None if row.enabled is None else bool(row.enabled),
                config_enabled=None if row.config_enabled is None else bool(row.config_enabled),
                last_due=row.last_due,
                after_run=None if row.after_run is None else bool(row.after_run),
                last_run_kind=row.last_run_kind,
                pending=row.pending,
            )
            for row in ScheduleRow.select()
        }

    def save_schedule_state(self, state: ScheduleState) -> None:
        with self._transaction():
            ScheduleRow.insert(
                name=state.name,
                last_run=state.last_run,
                last_result=state.last_result,
                last_run_id=state.last_run_id,
                next_run=state.next_run,
                suspended=state.suspended,
                enabled=state.enabled,
                config_enabled=state.config_enabled,
                last_due=state.last_due,
                after_run=state.after_run,
                last_run_kind=state.last_run_kind,
                pending=state.pending,
            ).on_conflict_replace().execute()

    def forget_schedule(self, name: str) -> None:
        with self._transaction():
            ScheduleRow.delete().where(ScheduleRow.name == name).execute()

    # -- audit -----------------------------------------------------------------------------------------------

    def record_audit(self, entry: AuditEntry) -> int:
        """Append one entry now: a single prepared INSERT, its own transaction."""
        self.flush_audit()  # entries keep their order
        # Ids are handed out by jobd, as for jobs: SQLite would give the next entry 1 again once retention had taken
        # them all, and a client paging the log with `before` would skip the new ones.
        entry_id = self._last_id["audit"] + 1
        self._check_file()
        self._connection.execute(_INSERT_AUDIT, (entry_id, *_audit_values(entry)))
        self._last_id["audit"] = entry_id
        self.audit_written()
        return entry_id

    def record_audit_soon(self, entry: AuditEntry) -> None:
        """Append an entry within AUDIT_WRITE_BEHIND seconds, in one transaction with the others of that moment.

        Every mutating request is audited, and an entry per commit would cost each submit a second commit (a
        serial client's submits are 20 % slower). Entries are written at most AUDIT_WRITE_BEHIND seconds late (at
        once when AUDIT_BATCH wait, before any read of the log and at close): a `kill -9` can lose that much of the
        log, never a job. The timer is armed only while entries wait; an idle jobd has none.
        """
        self._audit_pending.append(entry)
        if self._audit_failing:  # the next try is armed; trying at each entry would only fail again
            self._drop_oldest_audit()
        elif len(self._audit_pending) >= AUDIT_BATCH:
            self._flush_audit_or_log()
        elif self._audit_timer is None:
            self._audit_timer = asyncio.get_running_loop().call_later(AUDIT_WRITE_BEHIND, self._flush_audit_or_log)

    def _flush_audit_or_log(self, *, last: bool = False) -> None:
        """Write the entries that wait; if the database cannot be written (a full disk), keep them and try again in
        STORE_RETRY_SECONDS, or with `last` (jobd is stopping) say how many are lost."""
        if self._audit_timer is not None:  # the one that called, or a write-behind that this write makes needless
            self._audit_timer.cancel()
            self._audit_timer = None
        waiting = len(self._audit_pending)
        try:
            self.flush_audit()
        except Exception as error:  # the commands have happened: a full disk must not stop the event loop
            if store_failure(error) is None or last:
                self._audit_pending.clear()
                if store_failure(error) is None:
                    log.exception("%d audit log entries lost: could not write them", waiting)
                else:
                    log.error("%d audit log entries lost at the stop: cannot write the database: %s", waiting, error)
                return
            if not self._audit_failing:
                log.error(
                    "%d audit log entries wait: cannot write the database: %s; trying again every %gs",
                    waiting,
                    error,
                    STORE_RETRY_SECONDS,
                )
                self._audit_failing = True
            self._drop_oldest_audit()
            self._audit_timer = asyncio.get_running_loop().call_later(STORE_RETRY_SECONDS, self._flush_audit_or_log)

    def _drop_oldest_audit(self) -> None:
        excess = len(self._audit_pending) - AUDIT_KEPT_AT_MOST
        if excess > 0:
            del self._audit_pending[:excess]
            self._audit_dropped += excess

    def flush_audit(self) -> None:
        """Write the entries that wait, now; raises if the database cannot be written, and they wait on (for the
        timer that is armed, the write-behind or the next try)."""
        if not self._audit_pending:
            return
        pending, self._audit_pending = self._audit_pending, []
        first = self._last_id["audit"] + 1
        try:
            with self._transaction() as sql:
                sql.executemany(
                    _INSERT_AUDIT, [(first + number, *_audit_values(entry)) for number, entry in enumerate(pending)]
                )
        except BaseException:
            self._audit_pending[:0] = pending  # in their order, before those that came meanwhile
            raise
        self._last_id["audit"] = first + len(pending) - 1  # once committed: a rolled back batch used none
        self.audit_written()
        if self._audit_timer is not None:  # written: the write-behind or the next try has nothing left to do
            self._audit_timer.cancel()
            self._audit_timer = None
        if self._audit_failing:
            self._audit_failing = False
            log.info("the audit log is written again (%d entries had waited)", len(pending))
        if self._audit_dropped:
            log.error(
                "%d audit log entries were lost while the database could not be written (more than %d waited)",
                self._audit_dropped,
                AUDIT_KEPT_AT_MOST,
            )
            self._audit_dropped = 0

    async def read_audit(self, where: AuditFilter) -> list[AuditEntry]:
        """Newest first, as audit_entries, AUDIT_SLICE entry ids at a time with the event loop running in between.

        A filter that leaves most entries out (a user, a command, a `since` later than most) read every entry in one
        go until a page was found: with a long log, all of it (27-33 ms for 300,000 entries) while every client and job
        waited. No index serves those filters (each would cost every write of the log), so the log is read in
        slices instead, the newest first; a page of the newest entries is found in the first."""
        self.flush_audit()
        top = self._last_id["audit"] + 1
        if where.before_id is not None:
            top = min(top, where.before_id)
        found: list[AuditEntry] = []
        while True:
            low = max(0, top - AUDIT_SLICE)
            found += self.audit_entries(dataclasses.replace(where, before_id=top, limit=where.limit - len(found)), low)
            if len(found) >= where.limit or low == 0:
                return found
            top = low
            await self._next_slice()

    async def _next_slice(self) -> None:
        """Let the event loop run before the next slice of a long read; refused if the store has closed meanwhile
        (jobd stopping)."""
        await asyncio.sleep(0)  # no-poll-ok: one turn of the loop for other clients between slices, no waiting
        if self.db.is_closed():
            raise ShuttingDown("jobd is stopping: ask again once it is back")

    def audit_entries(self, where: AuditFilter, low: int | None = None) -> list[AuditEntry]:
        """Newest first (with `low`, only entries from that id on)."""
        self.flush_audit()
        query = AuditRow.select()
        if low is not None:
            query = query.where(AuditRow.id >= low)
        if where.before_id is not None:
            query = query.where(AuditRow.id < where.before_id)
        if where.uid is not None:
            query = query.where(AuditRow.uid == where.uid)
        if where.user is not None:
            query = query.where(AuditRow.user == where.user)
        if where.command is not None:
            query = query.where(AuditRow.command == where.command)
        if where.since is not None:
            query = query.where(AuditRow.at >= where.since)
        return [
            AuditEntry(
                id=int(row.id),
                at=float(row.at),
                uid=row.uid,
                user=row.user,
                command=row.command,
                target=row.target,
                result=row.result,
                message=row.message,
            )
            for row in query.order_by(AuditRow.id.desc()).limit(where.limit)
        ]

    # -- callbacks -------------------------------------------------------------------------------------------

    def insert_callbacks(
        self, job_id: int, deliveries: Sequence[tuple[str, str, Mapping[str, Any]]], now: float
    ) -> list[CallbackDelivery]:
        """Queue a finished job's callbacks (event, target, definition), all in one transaction that also marks the
        job as done with (`callbacks_queued`: it leaves the start-up check's index, unqueued_callback_jobs) and as
        waiting for them (`callbacks_pending`: it leaves retention's index until they are done)."""
        rows = []
        with self._transaction():
            JobRow.update(callbacks_queued=1, callbacks_pending=1).where(JobRow.id == job_id).execute()
            for event, target, spec in deliveries:
                row = CallbackRow.create(
                    job_id=job_id,
                    event=event,
                    target=target,
                    state="pending",
                    tries=0,
                    next_try_at=now,
                    spec=json.dumps(dict(spec)),
                    created_at=now,
                )
                rows.append(row)
        return [_callback_from_row(row) for row in rows]

    def unqueued_callback_jobs(self) -> list[Job]:
        """Finished jobs whose matching callbacks have no rows (jobd died in between): read from a partial index.
        INDEXED BY: the planner would rather take the state index on a small table; and should the text ever stop
        matching the index's, SQLite refuses the query instead of quietly scanning the whole history."""
        query = JobRow.raw(
            f'SELECT * FROM "job" INDEXED BY "job_callbacks_unqueued" WHERE {_CALLBACKS_UNQUEUED} ORDER BY "id"'
        )
        return [_job_from_row(row) for row in query]

    def pending_callbacks(self) -> list[CallbackDelivery]:
        query = CallbackRow.select().where(CallbackRow.state == "pending").order_by(CallbackRow.id)
        return [_callback_from_row(row) for row in query]

    def callbacks_of(self, job_id: int) -> list[CallbackDelivery]:
        query = CallbackRow.select().where(CallbackRow.job_id == job_id).order_by(CallbackRow.id)
        return [_callback_from_row(row) for row in query]

    def record_callback_try(self, delivery: CallbackDelivery) -> bool:
        """Record a try; True if it was the job's last pending delivery, so that the job may now expire."""
        with self._transaction() as sql:
            CallbackRow.update(
                state=delivery.state,
                tries=delivery.tries,
                next_try_at=delivery.next_try_at,
                last_error=delivery.last_error,
                delivered_at=delivery.delivered_at,
            ).where(CallbackRow.id == delivery.id).execute()
            if delivery.state == "pending":
                return False
            return sql.execute(_CALLBACKS_DONE, (delivery.job_id, delivery.job_id)).rowcount == 1

    # -- queues ----------------------------------------------------------------------------------------------

    def queue_pauses(self) -> dict[str, QueuePause]:
        return {row.name: QueuePause(row.paused, row.config_paused) for row in QueueStateRow.select()}

    def set_queue_pause(self, name: str, pause: QueuePause | None) -> None:
        """Record a pause or resume from the API; None forgets it (the configuration's `paused` applies)."""
        with self._transaction():
            if pause is None:
                QueueStateRow.delete().where(QueueStateRow.name == name).execute()
            else:
                QueueStateRow.insert(
                    name=name, paused=pause.paused, config_paused=pause.config_paused
                ).on_conflict_replace().execute()


# A job's change of state, for the counts: (id, state before, state after, queue, task); None for a job they have not
# reached yet.
_StateMove = tuple[int, str, str, str, str | None] | None


class _JobCounts:
    """How many jobs the table holds in each (state, queue, task), kept as jobs are inserted, change state and are
    deleted, so that daemon.status and /metrics need not count the history.

    The history a store is opened with is read in id order, a slice at a time (Store.count_some_jobs): `counted_to`
    is the highest id read so far (None once all are). A change to a job above it is left out here, as the reading
    will find the job as it is then."""

    def __init__(self) -> None:
        self._counts: collections.Counter[tuple[str, str, str | None]] = collections.Counter()
        self.counted_to: int | None = 0

    def counted(self, job_id: int) -> bool:
        return self.counted_to is None or job_id <= self.counted_to

    def add_slice(self, end: int, rows: Iterable[tuple[str, str, str | None, int]]) -> None:
        for state, queue, task, count in rows:
            self._counts[state, queue, task] += count
        self.counted_to = end

    def done(self) -> None:
        self.counted_to = None

    def add(self, job_id: int, state: str, queue: str, task: str | None) -> None:
        if self.counted(job_id):
            self._counts[state, queue, task] += 1

    def move(self, moves: Iterable[_StateMove]) -> None:
        for move in moves:
            if move is not None:
                job_id, before, after, queue, task = move
                self._counts[after, queue, task] += 1
                self.remove([(job_id, before, queue, task)])

    def remove(self, rows: Iterable[tuple[int, str, str, str | None]]) -> None:
        for _, state, queue, task in rows:
            key = (state, queue, task)
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]

    def task_spread(self, task: str, states: Set[str], queue: str | None) -> tuple[int, list[tuple[int, int]]] | None:
        """How many jobs `task` has, and for each (state, queue) pair of `states` (and `queue`) that holds some of
        them, how many jobs the pair holds and how many of them are the task's; None while the history is still
        being counted."""
        if self.counted_to is not None:
            return None
        total = 0
        held: collections.Counter[tuple[str, str]] = collections.Counter()
        sizes: collections.Counter[tuple[str, str]] = collections.Counter()
        for (state, of_queue, of_task), count in self._counts.items():
            if of_task == task:
                total += count
            if state in states and queue in (None, of_queue):
                sizes[state, of_queue] += count
                if of_task == task:
                    held[state, of_queue] += count
        return total, [(sizes[pair], count) for pair, count in held.items() if count]

    def pairs_holding(self, task: str) -> set[tuple[str, str]] | None:
        """The (state, queue) pairs that hold jobs of `task`; None while the history is still being counted."""
        if self.counted_to is not None:
            return None
        return {(state, queue) for (state, queue, of), count in self._counts.items() if of == task and count}

    def names(self) -> tuple[set[str], set[str]]:
        """The queues and the task names that jobs have."""
        queues = {queue for _, queue, _ in self._counts}
        tasks = {task for _, _, task in self._counts if task is not None}
        return queues, tasks

    def by_state(self, counts: Callable[[str, str | None], bool] = lambda queue, task: True) -> dict[str, int]:
        """Jobs by state (those with none left out), of the queues and tasks `counts` is true of."""
        totals: collections.Counter[str] = collections.Counter()
        for (state, queue, task), count in self._counts.items():
            if count and counts(queue, task):
                totals[state] += count
        return {state: totals[state] for state in sorted(totals) if totals[state]}


@dataclass(frozen=True, slots=True)
class QueuePause:
    """A pause or resume through the API, and the configuration's `paused` at that moment (None: not known)."""

    paused: bool
    config_paused: bool | None


MAX_VALUE_FILTERS = 100  # launch parameter values, or custom attribute values, one listing may filter on


@dataclass(frozen=True, slots=True)
class InstanceFilter:
    ids: tuple[int, ...] = ()
    workflow: str | None = None
    status: str | None = None
    launched_from: float | None = None
    launched_until: float | None = None
    ended_from: float | None = None
    ended_until: float | None = None
    error: bool | None = None  # True: with errors; False: without
    before_id: int | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)  # launch parameter values, exact match
    custom_attributes: Mapping[str, str] = field(default_factory=dict)  # a custom attribute with that value
    limit: int = 30
    offset: int = 0
    visible_workflows: tuple[str, ...] | None = None  # GLOB patterns of what a non-admin may read; None: all
    by_end: bool = False  # latest end first, running instances last (evQueue's order); else newest first

    def __post_init__(self) -> None:
        # Each filter is a scan of a JSON column per instance and two bound variables (SQLite takes 32766 at most).
        for name, what, given in (
            ("parameters", "launch parameter", self.parameters),
            ("custom_attributes", "custom attribute", self.custom_attributes),
        ):
            if len(given) > MAX_VALUE_FILTERS:
                raise InvalidParams(
                    f"a listing of instances filters on at most {MAX_VALUE_FILTERS} {what} values, not {len(given)}",
                    param=name,
                )


@dataclass(frozen=True, slots=True)
class CallbackDelivery:
    """One completion callback of a finished job and how its delivery goes (a row of the `callback` table)."""

    id: int
    job_id: int
    event: str  # on_success | on_failure | on_finish
    target: str
    state: str  # pending | delivered | failed
    tries: int
    next_try_at: float | None
    last_error: str | None
    spec: Mapping[str, Any]
    created_at: float
    delivered_at: float | None = None


def _callback_from_row(row: CallbackRow) -> CallbackDelivery:
    return CallbackDelivery(
        id=int(row.id),
        job_id=int(row.job_id),
        event=row.event,
        target=row.target,
        state=row.state,
        tries=int(row.tries),
        next_try_at=row.next_try_at,
        last_error=row.last_error,
        spec=json.loads(row.spec),
        created_at=float(row.created_at),
        delivered_at=row.delivered_at,
    )


@dataclass(frozen=True, slots=True)
class AuditFilter:
    uid: int | None = None
    user: str | None = None
    command: str | None = None
    since: float | None = None  # entries at or after this time
    before_id: int | None = None  # entries older than this one (paging)
    limit: int = 100


def _not_through_an_index(column: peewee.Field) -> peewee.NodeList:
    """The column as SQLite reads it from the row, never looking it up in an index (SQLite's unary +)."""
    return peewee.NodeList((peewee.SQL("+"), column), glue="")


def _glob_any(column: peewee.Field, patterns: Sequence[str]) -> peewee.Expression:
    """`column` matches one of the shell-style patterns (GLOB: `*`, `?`, case-sensitive); no pattern, no row.

    A flat OR of a few (nested ORs overflow SQLite's parser past about a hundred); past _FLAT_PATTERNS, as _globs
    writes it (their JSON array)."""
    if not patterns:
        return peewee.Expression(peewee.SQL("1"), "=", 0)
    if len(patterns) > _FLAT_PATTERNS:
        start, end = _GLOB_ANY_OF_JSON.split("{column}")  # the column as peewee writes it, between the two
        exists = peewee.NodeList((peewee.SQL(start, [json.dumps(list(patterns))]), column, peewee.SQL(end)), glue="")
        return exists  # type: ignore[return-value]  # peewee's where() takes any node; its stubs want an Expression
    matches = [peewee.Expression(column, "GLOB", pattern) for pattern in patterns]
    return peewee.NodeList(matches, glue=" OR ", parens=True)  # type: ignore[return-value]  # any node goes in where()


# Up to this many patterns, a condition of them is a flat OR of GLOBs, one parameter each: the fastest (SQLite 3.40,
# 200,000 rows read, none matching 100 patterns: 0.8 s, against 1.4 s as below), but each GLOB is a level of SQLite's
# expression tree, which it refuses past 1,000 ("Expression tree is too large"), and a parameter (999 at most before
# SQLite 3.32). Past it they are one parameter, a JSON array, whose rows SQLite reads once for the statement
# (MATERIALIZED: not once for each row it matches, 3.4 s) and tries in turn: any number of them, in a tree of the
# same depth.
_FLAT_PATTERNS = 200
_GLOB_ANY_OF_JSON = (
    'EXISTS (WITH "granted"("pattern") AS MATERIALIZED (SELECT "value" FROM json_each(?)) '
    'SELECT 1 FROM "granted" WHERE {column} GLOB "granted"."pattern")'
)


def _globs(column: str, patterns: Sequence[str], *, flat: bool) -> tuple[str, list[str]]:
    """SQL true when `column` (an expression) matches one of the patterns, and its parameters: a flat OR of one GLOB
    each if `flat`, else one EXISTS over their JSON array (see _FLAT_PATTERNS); no pattern, false."""
    if not patterns:
        return "0", []
    if flat:
        return " OR ".join([f"{column} GLOB ?"] * len(patterns)), list(patterns)
    return _GLOB_ANY_OF_JSON.format(column=column), [json.dumps(list(patterns))]


class WalNotSynced(Exception):
    """The WAL could not be made durable (durability = "fsync"): the machine's trouble, as a full disk is, answered
    STORE_FAILED naming the file and the system's words (store_failure), not a bug's INTERNAL_ERROR."""

    def __init__(self, doing: str, error: OSError) -> None:
        # What its waiters asked for is committed already: only its surviving a power cut is not known.
        super().__init__(
            f"jobd could not {doing} ({error.strerror or error}): committed, but not known to survive a power cut"
        )


class _GroupFlusher:
    """fsync()s the WAL in a worker thread; callers that arrive during a flush share the next one."""

    def __init__(self, wal_path: str) -> None:
        self._wal_path = wal_path
        self._fd: int | None = None
        self._in_flight = False
        self._closing = False
        self._next: asyncio.Future[None] | None = None

    async def flush(self) -> None:
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
        waiters = self._next  # the flush that starts after this commit; _start() hands it on
        if not self._in_flight:
            self._start(loop)
        await asyncio.shield(waiters)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        # Everything committed before this point is in the WAL file's page cache; this fsync makes it durable.
        waiters, self._next = self._next, None
        assert waiters is not None
        if self._fd is None:
            try:
                self._fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                # The WAL removed under jobd, no descriptor left: the waiters of this flush hear why, and the next
                # flush tries again. Raised with the flush marked under way, it left every later flush waiting for
                # that one to end: each reply that waits for an fsync (durability = "fsync") waited for ever.
                waiters.set_exception(WalNotSynced(f"open its WAL {self._wal_path} to fsync it", error))
                return
        self._in_flight = True
        done = loop.run_in_executor(None, os.fsync, self._fd)
        done.add_done_callback(lambda f: self._finished(loop, waiters, f))

    def _finished(
        self, loop: asyncio.AbstractEventLoop, waiters: asyncio.Future[None], done: asyncio.Future[None]
    ) -> None:
        self._in_flight = False
        error = done.exception()
        if error is not None:
            waiters.set_exception(error)
        else:
            waiters.set_result(None)
        if self._next is not None:
            self._start(loop)
        elif self._closing:
            self._close_fd()

    def close(self) -> None:
        """Close the WAL's descriptor, or, while an fsync of it runs in a worker thread, once that has ended: closed
        under it, the number could be given to another file meanwhile and fsync()ed in its place."""
        self._closing = True
        if not self._in_flight:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_SPEC_COLUMNS = (
    "task", "command", "queue", "priority", "context", "key", "env", "stdin", "working_dir", "timeout", "kill_grace",
    "retry", "max_output", "submitted_by", "merge_stderr", "run_as_uid", "run_as_gid", "http", "callbacks",
)  # fmt: skip
_JOB_STATE_COLUMNS = (
    "state", "run_at", "started_at", "finished_at", "attempts", "exit_code", "signal", "progress", "error",
)  # fmt: skip
_ATTEMPT_COLUMNS = (
    "job_id", "number", "started_at", "finished_at", "outcome", "exit_code", "signal", "pid", "pid_start",
    "cpu_user", "cpu_system", "max_rss_kib", "stdout_bytes", "stderr_bytes", "truncated", "error",
)  # fmt: skip


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    names = ", ".join(f'"{name}"' for name in columns)
    return f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" for _ in columns)})'


def _update_sql(table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
    assignments = ", ".join(f'"{name}" = ?' for name in columns)
    return f'UPDATE "{table}" SET {assignments} WHERE ' + " AND ".join(f'"{key}" = ?' for key in keys)


_INSERT_JOB = _insert_sql("job", ("id", *_SPEC_COLUMNS, "state", "created_at", "run_at", "attempts", "progress"))
_UPDATE_JOB = _update_sql("job", _JOB_STATE_COLUMNS, ("id",))
_INSERT_ATTEMPT = _insert_sql("attempt", _ATTEMPT_COLUMNS)
_UPDATE_ATTEMPT = _update_sql("attempt", _ATTEMPT_COLUMNS, ("job_id", "number"))
_DELETE_ATTEMPT = 'DELETE FROM "attempt" WHERE "job_id" = ? AND "number" = ?'
_UPDATE_ATTEMPT_PROCESS = _update_sql("attempt", ("pid", "pid_start"), ("job_id", "number"))
_UPDATE_ATTEMPT_CANCEL = 'UPDATE "attempt" SET "cancel_requested" = 1 WHERE "job_id" = ? AND "number" = ?'
_UPDATE_ATTEMPT_TIME_LIMIT = 'UPDATE "attempt" SET "time_limit_reached" = 1 WHERE "job_id" = ? AND "number" = ?'
_INSERT_AUDIT = _insert_sql("audit", ("id", "at", "uid", "user", "command", "target", "result", "message"))


class _PreparedSelect:
    """A peewee SELECT made into SQL once (the database must be open) and run with new parameters, its rows read
    as named tuples of the model's columns.

    Building a query costs peewee a few hundred µs a call: most of a job.get, which reads a job and its attempts.
    Model instances cost peewee's per-row work on top (a list of 100 jobs: 5 ms; a start-up resuming 100,000 jobs:
    seconds), so the rows hold the values as SQLite returns them, and `_job_from_row` and `_attempt_from_row` make
    Python values of the few that need it (a boolean, a blob).
    """

    def __init__(self, query: peewee.ModelSelect[Any]) -> None:
        self.sql, self.params = query.sql()
        self._make_row = _row_maker(tuple(field.column_name for field in query.model._meta.sorted_fields))

    def rows(self, connection: sqlite3.Connection, params: Sequence[Any] | None = None, more: str = "") -> list[Any]:
        """The rows, with `params` instead of the query's own if given; `more` (WHERE, ORDER BY, LIMIT) is added to
        a query that has none of its own."""
        sql = f"{self.sql} {more}" if more else self.sql
        return list(map(self._make_row, connection.execute(sql, self.params if params is None else params)))

    def lazy_rows(
        self, connection: sqlite3.Connection, params: Sequence[Any] | None = None, more: str = ""
    ) -> Generator[Any, None, None]:
        """rows(), read one at a time as the caller takes them; closed early, the query ends there."""
        sql = f"{self.sql} {more}" if more else self.sql
        cursor = connection.execute(sql, self.params if params is None else params)
        try:
            yield from map(self._make_row, cursor)
        finally:
            cursor.close()


@functools.cache
def _row_maker(columns: tuple[str, ...]) -> Callable[[Iterable[Any]], Any]:
    """What makes a named tuple of a row with these columns (a plain select() of a model: its fields in order).
    Made once per model: making a named tuple class takes longer than reading a hundred rows."""
    row_type = collections.namedtuple("Row", columns)  # type: ignore[misc]  # columns known only at run time
    make: Callable[[Iterable[Any]], Any] = row_type._make
    return make


# INDEXED BY: should the text ever stop matching the index's, SQLite refuses the query instead of quietly reading
# the whole history on every trim.
_FROM_EXPIRABLE = f'FROM "job" INDEXED BY "job_expirable" WHERE {_EXPIRABLE}'
_COUNT_EXPIRABLE = f"SELECT COUNT(*) {_FROM_EXPIRABLE}"
_OLDEST_EXPIRABLE = f'SELECT "id" {_FROM_EXPIRABLE} ORDER BY "finished_at", "id" LIMIT ?'
_OLDEST_EXPIRABLE_AT = f'SELECT "id", "finished_at" {_FROM_EXPIRABLE} ORDER BY "finished_at" LIMIT ?'
_EXPIRABLE_BEFORE = f'SELECT "id" {_FROM_EXPIRABLE} AND "finished_at" < ? ORDER BY "finished_at", "id" LIMIT ?'
# The queues with jobs in a state (?1): from the smallest, each next one is the least greater than the one before,
# a step down the index job_state_queue each.
_QUEUES_HOLDING = (
    'WITH RECURSIVE "held"("queue") AS (SELECT min("queue") FROM "job" WHERE "state" = ?1 '
    'UNION ALL SELECT (SELECT min("queue") FROM "job" WHERE "state" = ?1 AND "queue" > "held"."queue") '
    'FROM "held" WHERE "held"."queue" IS NOT NULL) SELECT "queue" FROM "held" WHERE "queue" IS NOT NULL'
)
# The task names of jobs: from the smallest, each next one is the least greater than the one before, a step down the
# index job_task each (which holds the jobs with a task name only).
_TASK_NAMES = (
    'WITH RECURSIVE "named"("task") AS (SELECT min("task") FROM "job" INDEXED BY "job_task" WHERE "task" IS NOT NULL '
    'UNION ALL SELECT (SELECT min("task") FROM "job" INDEXED BY "job_task" WHERE "task" > "named"."task") '
    'FROM "named" WHERE "named"."task" IS NOT NULL) SELECT "task" FROM "named" WHERE "task" IS NOT NULL'
)
# How many jobs have a task or a context (?1), counting no more than ?2 entries of its index.
_COUNT_UP_TO = 'SELECT count(*) FROM (SELECT 1 FROM "job" INDEXED BY "{index}" WHERE "{column}" = ?1 LIMIT ?2)'
FEW_JOBS = 2_000  # a task or context with fewer jobs is listed from its own index (Store._few_jobs_index)
_NEXT_JOB_ID = 'SELECT min("id") FROM "job" WHERE "id" > ?'
# The jobs of an id range (?1, ?2] by state, queue and task: a slice of the counts' first reading.
_COUNT_JOBS_BETWEEN = (
    'SELECT "state", "queue", "task", count(*) FROM "job" WHERE "id" > ? AND "id" <= ? '
    'GROUP BY "state", "queue", "task"'
)
_KEYS_OF_JOBS = 'SELECT "id", "state", "queue", "task" FROM "job" WHERE "id" IN ({marks})'
COUNT_SLICE = 5_000  # ids a slice of that reading covers: ~5 ms of the event loop
_IDS_PER_QUERY = 500  # well under SQLite's least limit on a statement's parameters (999 before 3.32)
_OLDEST_INSTANCE_END = f'SELECT MIN("ended_at") FROM "instance" WHERE {_INSTANCE_ENDED}'
_INSTANCES_ENDED_BEFORE = (
    f'SELECT "id", length("document") FROM "instance" WHERE {_INSTANCE_ENDED} AND "ended_at" < ? '
    'ORDER BY "ended_at" LIMIT ?'
)
INSTANCE_SLICE = 1_000  # instance ids evQueue's `groupby` reads at once (Store.read_instance_starts): a few ms
AUDIT_SLICE = 10_000  # audit entry ids a read of the log covers at once (Store.read_audit): a few ms
_OLDEST_AUDIT = 'SELECT MIN("at") FROM "audit"'
_AUDIT_BEFORE = 'SELECT "id" FROM "audit" WHERE "at" < ? ORDER BY "at" LIMIT ?'
_CALLBACKS_DONE = (
    'UPDATE "job" SET "callbacks_pending" = 0 WHERE "id" = ? AND "callbacks_pending" = 1 AND NOT EXISTS '
    """(SELECT 1 FROM "callback" WHERE "job_id" = ? AND "state" = 'pending')"""
)

_NO_RETRY_JSON = json.dumps(NO_RETRY.to_json())  # most jobs: worth not encoding it again on every submit


# A commit the store refused (a full disk, an I/O error) is tried again after this long, for as long as it fails.
# The timer exists only then; meanwhile a job that ended keeps its slot and the jobs that would take it wait.
STORE_RETRY_SECONDS = 2.0


# What to do about a database that reads as damaged. A disk that fails reads shows the same (after an I/O error SQLite
# finds the pages it reads malformed), and a backup restored then would lose what was accepted since it: the disk first.
DAMAGED_ADVICE = (
    "if the kernel log shows I/O errors on its disk, mend that first (the file may well be sound); otherwise restore "
    "it from a backup"
)


def store_failure(failure: Exception) -> StoreFailed | None:
    """What to answer a request that failed on the database (a full disk, an I/O error), or None for any other
    failure: the machine's trouble, to be logged in one line, not a bug with a traceback to read. SQLite reports a
    full disk, an I/O error or a read-only file as OperationalError and a damaged file as DatabaseError itself;
    its other errors (a constraint, a misuse of the API) are jobd's bugs and stay INTERNAL_ERROR. So is an
    OperationalError SQLite names SQLITE_ERROR: a statement jobd built wrong ("no such column", a syntax error,
    "parser stack overflow", "too many SQL variables", "Expression tree is too large"), whatever the disk. Out of
    memory (SQLite's SQLITE_NOMEM, which sqlite3 raises as MemoryError) is the machine's too: a shortage, as a full
    disk is, or SQLite's "unable to open database file" when jobd has no descriptor left, not a bug; the same write
    may succeed once memory is freed. A MemoryError raised anywhere else (reading a job's output, building a
    reply) is not the database's: None (errors.memory_shortage names it at a request's boundary)."""
    if isinstance(failure, WalNotSynced):
        return StoreFailed(str(failure))
    if isinstance(failure, MemoryError):
        if not _raised_using_the_database(failure):
            return None
        return StoreFailed("jobd ran out of memory using its database (see MemoryMax= and the kernel log)")
    environmental = isinstance(failure, sqlite3.OperationalError | peewee.OperationalError) or type(failure) in (
        sqlite3.DatabaseError,
        peewee.DatabaseError,
    )
    if not environmental or _sqlite_error_name(failure).startswith("SQLITE_ERROR"):
        return None
    if damaged(failure):
        # Found by a read as well as by a write: "could not write" would send its reader looking at the disk space.
        # Named as jobd opened it: the file to check, restore or move away, whatever the state directory is.
        return StoreFailed(f"jobd's database{_opened_file()} reads as damaged ({failure}): {DAMAGED_ADVICE}")
    # Named as for a damaged one: the file whose disk, permissions or file system to look at.
    return StoreFailed(f"jobd could not write its database{_opened_file()} ({failure})")


def _opened_file() -> str:
    """The database file the models use (a jobd opens one: Store.open), after a space; "" before one is opened."""
    database = _db.obj
    return f" {database.database}" if database is not None else ""


# Where jobd's database is used from: the store, peewee under it, and the copies of a backup (SQLite's own code
# leaves no Python frame, so one of these called it).
_DATABASE_CODE = frozenset({__file__, peewee.__file__, os.path.join(os.path.dirname(__file__), "backup.py")})


def _raised_using_the_database(failure: BaseException) -> bool:
    """Whether `failure` was raised in the code that uses the database (_DATABASE_CODE), or in SQLite called from it:
    sqlite3 raises SQLite's SQLITE_NOMEM as a plain MemoryError, which only where it was raised tells apart from one
    of any other allocation of jobd's (a MemoryError of os.pread in job.output was "jobd ran out of memory using its
    database", and daemon.status said the database took no writes)."""
    frames = failure.__traceback__
    if frames is None:
        return False
    while frames.tb_next is not None:
        frames = frames.tb_next
    return frames.tb_frame.f_code.co_filename in _DATABASE_CODE


# A request refused for the database's trouble is logged once for each request name and trouble, then one line a
# minute at most: clients that go on submitting on a full disk are refused thousands of times a second.
_refusals = logline.Throttle(every=60.0)


def _identity(path: str, *, follow_links: bool = False) -> tuple[int, int] | None:
    """The device and inode of the file at `path` (a symbolic link itself unless `follow_links`), or None if there
    is none."""
    try:
        info = os.stat(path, follow_symlinks=follow_links)
    except OSError:  # none that jobd can reach: gone, a directory on the way now a file (ENOTDIR), a link loop, ...
        # Raised, ENOTDIR escaped the inotify callback that looks at the database file (_FileName._changed): the
        # file moved away was not seen as such, and writes went on into it, each answered as saved.
        return None
    return info.st_dev, info.st_ino


def fsync_directory_of(path: str) -> None:
    """Make the directory entry of `path` durable (a file just made, or renamed into place)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refused_request(what: str, failure: Exception) -> StoreFailed | None:
    """store_failure(failure), for a request (`what`: its name) that failed on the database, logged as said above;
    None, and nothing logged, for any other failure."""
    failed = store_failure(failure)
    if failed is None:
        return None
    due = _refusals.due((what, failed.message))
    if due is None:
        return failed
    held, seconds = due
    more = f" ({held} more refused so in the last {seconds:.0f} s)" if held else ""
    log.error("%s: %s%s", what, failed.message, more)
    return failed


def startup_failure(failure: Exception) -> tuple[str, bool]:
    """What an administrator should do about a database error that stops jobd's start, and whether it is
    permanent (starting again cannot help: the file is damaged) rather than the machine's passing trouble."""
    if damaged(failure):
        return "the file is damaged or not jobd's: restore it from a backup, or move it away to start anew", True
    name = _sqlite_error_name(failure)
    if name.startswith("SQLITE_FULL"):
        return "its file system is full: make room and start jobd again; nothing accepted is lost", False
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "another process holds it (an sqlite3 shell?): close that and start jobd again", False
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR")):
        return "it cannot be opened or written: check its file system, its permissions and the kernel log", False
    return "nothing was changed", False


def damaged(failure: Exception) -> bool:
    """A database file that is damaged or not SQLite's (a plain DatabaseError says so when SQLite gave no name)."""
    name = _sqlite_error_name(failure)
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    return type(failure) in (sqlite3.DatabaseError, peewee.DatabaseError)


def _sqlite_error_name(failure: Exception) -> str:
    """SQLite's name for an error (`SQLITE_FULL`, ...), also through peewee's wrapper (which keeps the original as
    its first argument, or as the exception it was raised while handling); "" if there is none."""
    for candidate in (failure, *failure.args[:1], failure.__context__):
        name = getattr(candidate, "sqlite_errorname", None)
        if isinstance(name, str):
            return name
    return ""


def _visible_jobs(tasks: Sequence[str] | None, queues: Sequence[str] | None) -> tuple[str, list[str]]:
    """The condition (and its parameters) of the jobs whose task or queue matches one of the shell-style patterns
    (GLOB: `*`, `?`, case-sensitive); no pattern, no job."""
    tasks, queues = tasks or (), queues or ()
    flat = len(tasks) + len(queues) <= _FLAT_PATTERNS  # the two ORs are one
    # The unary + keeps SQLite from reading an index by a pattern's prefix (`mail*` as a range of queues), which
    # loses the id order of the index it would otherwise read: then every match is read and sorted. (Only a pattern
    # of the flat OR could be so read: SQLite knows no pattern of a JSON array when it plans.)
    columns = (('+"task"', tasks), ('+"queue"', queues))
    parts = [_globs(column, patterns, flat=flat) for column, patterns in columns if patterns]
    return f"({' OR '.join(sql for sql, _ in parts) or '0'})", [param for _, params in parts for param in params]


def _is_null(field: peewee.Field) -> peewee.NodeList:
    """`field IS NULL`, as SQL text: peewee 3.14 (Debian 12's python3-peewee, which the package uses) writes
    `field.is_null()` as `IS ?` with a NULL parameter, which SQLite cannot match with a partial index's `IS NULL`
    (an INDEXED BY query then fails "no query solution")."""
    return peewee.NodeList((field, peewee.SQL("IS NULL")))


def _is_not_null(field: peewee.Field) -> peewee.NodeList:
    """`field IS NOT NULL`, as SQL text: see _is_null."""
    return peewee.NodeList((field, peewee.SQL("IS NOT NULL")))


def _select_jobs() -> peewee.ModelSelect[Any]:
    """Every column of the job table, in order, but of the stdin only whether there is one (1 or NULL): a job read
    from here leaves its stdin in the database (InStore.STDIN), and a page of 1,000 jobs does not read 1,000 blobs."""
    has_stdin = peewee.Case(None, ((_is_not_null(JobRow.stdin), peewee.SQL("1")),))
    return JobRow.select(*(has_stdin if field is JobRow.stdin else field for field in JobRow._meta.sorted_fields))


def _held(spec: JobSpec) -> JobSpec:
    """The spec as jobd holds it once committed: its stdin left in the database (InStore.STDIN)."""
    return spec if spec.stdin is None else evolve(spec, stdin=InStore.STDIN)


def _spec_values(spec: JobSpec) -> tuple[Any, ...]:
    if isinstance(spec.stdin, InStore):  # a spec read back from here is never inserted again: its stdin is not in it
        raise TypeError("a job's stdin must be given to be inserted, not left in the database")
    return (
        spec.task,
        json.dumps(list(spec.command)),
        spec.queue,
        spec.priority,
        spec.context,
        spec.key,
        json.dumps(dict(spec.env)) if spec.env else "{}",
        spec.stdin,
        spec.working_dir,
        spec.timeout,
        spec.kill_grace,
        _NO_RETRY_JSON if spec.retry is NO_RETRY or spec.retry == NO_RETRY else json.dumps(spec.retry.to_json()),
        spec.max_output,
        spec.submitted_by,
        spec.merge_stderr,
        spec.run_as_uid,
        spec.run_as_gid,
        None if spec.http is None else json.dumps(dict(spec.http)),
        None if spec.callbacks is None else json.dumps(dict(spec.callbacks)),
    )


def _json_exists(column: peewee.Field, condition: str, *params: str) -> peewee.Expression:
    """`EXISTS (SELECT 1 FROM json_each(column) AS pair WHERE condition)`, with `params` bound to its `?`s."""
    exists = peewee.NodeList(
        (peewee.SQL("EXISTS (SELECT 1 FROM json_each("), column, peewee.SQL(f") AS pair WHERE {condition})", params)),
        glue="",
    )
    return exists  # type: ignore[return-value]  # peewee's where() takes any node; its stubs want an Expression


def _audit_values(entry: AuditEntry) -> tuple[Any, ...]:
    return (entry.at, entry.uid, entry.user, entry.command, entry.target, entry.result, entry.message)


def _instance_from_row(row: Any) -> InstanceSummary:
    """A summary from its row: an InstanceRow or a named tuple of its columns."""
    return InstanceSummary(
        id=int(row.id),
        workflow=row.workflow,
        status=row.status,
        errors=int(row.errors),
        started_at=float(row.started_at),
        ended_at=None if row.ended_at is None else float(row.ended_at),
        comment=row.comment,
        host=row.host,
        user=row.user,
        launched_by=row.launched_by,
        parameters=json.loads(row.parameters),
        tags=tuple(json.loads(row.tags)),
        custom_attributes=tuple((str(name), str(value)) for name, value in json.loads(row.custom_attributes)),
    )


def _job_state_values(job: Job) -> tuple[Any, ...]:
    return (
        str(job.state),
        job.run_at,
        job.started_at,
        job.finished_at,
        job.attempts,
        job.exit_code,
        job.signal,
        job.progress,
        job.error,
    )


def _text_size(row: Any) -> int:
    """The characters of the texts a job's row holds that a client chooses the length of and a list shows. Not its
    stdin: a list reads of it only whether there is one (a 1 in the row; the bytes stay in the database)."""
    texts = (row.command, row.env, row.context, row.key, row.callbacks, row.http)
    return sum(len(text) for text in texts if text is not None)


def _job_from_row(row: Any) -> Job:
    """A job from its row: a JobRow or a _PreparedSelect's named tuple."""
    spec = JobSpec(
        command=tuple(json.loads(row.command)),
        queue=row.queue,
        task=row.task,
        priority=row.priority,
        env=_NO_ENV if row.env == "{}" else MappingProxyType(json.loads(row.env)),  # read-only all the way down
        stdin=None if row.stdin is None else InStore.STDIN,
        working_dir=row.working_dir,
        timeout=row.timeout,
        kill_grace=row.kill_grace,
        retry=_retry_from_json(row.retry),
        max_output=row.max_output,
        context=row.context,
        key=row.key,
        submitted_by=row.submitted_by,
        merge_stderr=bool(row.merge_stderr),
        run_as_uid=row.run_as_uid,
        run_as_gid=row.run_as_gid,
        http=None if row.http is None else json.loads(row.http),
        callbacks=None if row.callbacks is None else json.loads(row.callbacks),
    )
    return Job(
        id=row.id,
        spec=spec,
        state=_STATES[row.state],
        created_at=row.created_at,
        run_at=row.run_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        attempts=row.attempts,
        exit_code=row.exit_code,
        signal=row.signal,
        progress=row.progress,
        error=row.error,
    )


def _attempt_values(attempt: Attempt) -> tuple[Any, ...]:
    return (
        attempt.job_id,
        attempt.number,
        attempt.started_at,
        attempt.finished_at,
        None if attempt.outcome is None else str(attempt.outcome),
        attempt.exit_code,
        attempt.signal,
        attempt.pid,
        attempt.pid_start,
        attempt.cpu_user,
        attempt.cpu_system,
        attempt.max_rss_kib,
        attempt.stdout_bytes,
        attempt.stderr_bytes,
        _cut_bits(attempt),
        attempt.error,
    )


# How the attempt's "truncated" column says which streams lost bytes. Before schema 16 it held 1 for any of them,
# which migration 16 turned into _CUT_UNKNOWN.
_CUT_STREAM = {"stdout": 1, "stderr": 2, "log": 4}
_CUT_UNKNOWN = 8


def _cut_bits(attempt: Attempt) -> int:
    bits = sum(_CUT_STREAM[stream] for stream in attempt.cut_streams or ())
    return _CUT_UNKNOWN if attempt.truncated and not bits else bits


def _cut_streams(bits: int) -> tuple[str, ...] | None:
    if bits & _CUT_UNKNOWN:
        return None
    return tuple(stream for stream, bit in _CUT_STREAM.items() if bits & bit)


_UNFINISHED = (str(JobState.DELAYED), str(JobState.QUEUED), str(JobState.RUNNING))  # what a start-up resumes
_NO_ENV: Mapping[str, str] = MappingProxyType({})
_STATES = {str(state): state for state in JobState}  # JobState(text) takes Enum's slower path, per job read


@functools.lru_cache(maxsize=64)
def _retry_from_json(text: str) -> RetryPolicy:
    """A job's retry policy: the same few texts over and over (a task's policy), and a RetryPolicy is a value."""
    return RetryPolicy.from_json(json.loads(text))


def _attempt_from_row(row: Any) -> Attempt:
    """An attempt from its row: an AttemptRow or a _PreparedSelect's named tuple."""
    return Attempt(
        job_id=row.job_id,
        number=row.number,
        started_at=row.started_at,
        finished_at=row.finished_at,
        outcome=None if row.outcome is None else Outcome(row.outcome),
        exit_code=row.exit_code,
        signal=row.signal,
        pid=row.pid,
        pid_start=row.pid_start,
        cpu_user=row.cpu_user,
        cpu_system=row.cpu_system,
        max_rss_kib=row.max_rss_kib,
        stdout_bytes=row.stdout_bytes,
        stderr_bytes=row.stderr_bytes,
        truncated=bool(row.truncated),
        cut_streams=_cut_streams(row.truncated),
        error=row.error,
        cancel_requested=bool(row.cancel_requested),
        time_limit_reached=bool(row.time_limit_reached),
    )
