"""Floors: the least a daemon bound by jobd's contract must do per job or per submit, run as jobd runs (in a
process of its own, on an asyncio loop), to show how much of each speed target is left for everything else.

- spawn floor: what DESIGN §3 and issue 2's point 5 ask for each job and nothing more. The job's attempt committed
  before its spawn (together with the end of the job whose slot it takes, as jobd does), `subprocess.Popen` with
  `process_group=0`, stdout and stderr pipes read to their end, the pidfd on the loop, wait4(), the pid committed,
  the end committed. No configuration, events, logs, output files, fd 3, timeouts or retries.
- submit floor: a JSON-lines server whose every request is decoded, committed as one INSERT and answered with the
  job it made. No validation, audit, log line, queue or durability level.

Both use SQLite as jobd's store does (WAL, synchronous=NORMAL, exclusive locking, 1 KiB pages).

    python bench/floor.py spawn COUNT DIRECTORY [EXTRA_US]   prints {"seconds": ..., "cpu": ...}
    python bench/floor.py serve SOCKET DIRECTORY             serves until killed; prints "ready" once it listens

EXTRA_US adds that many µs of CPU per job to the spawn floor (half before the spawn, half after the exit), standing
for the rest of a daemon's work: how the ratio to the bare loop falls as a daemon does more per job.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

_PRAGMAS = (
    "PRAGMA page_size = 1024",
    "PRAGMA locking_mode = exclusive",
    "PRAGMA journal_mode = wal",
    "PRAGMA synchronous = normal",
    "PRAGMA wal_autocheckpoint = 10000",
)
_SCHEMA = (
    'CREATE TABLE "job" ("id" INTEGER PRIMARY KEY, "command" TEXT NOT NULL, "queue" TEXT NOT NULL, '
    '"state" TEXT NOT NULL, "created_at" REAL NOT NULL, "started_at" REAL, "finished_at" REAL, "exit_code" INTEGER)',
    'CREATE INDEX "job_state_queue" ON "job" ("state", "queue")',
    'CREATE TABLE "attempt" ("job_id" INTEGER NOT NULL, "number" INTEGER NOT NULL, "started_at" REAL NOT NULL, '
    '"finished_at" REAL, "pid" INTEGER, "exit_code" INTEGER)',
    'CREATE UNIQUE INDEX "attempt_job_number" ON "attempt" ("job_id", "number")',
)
_COMMAND = json.dumps(["/bin/true"])


def open_store(directory: Path) -> sqlite3.Connection:
    sql = sqlite3.connect(directory / "floor.db", isolation_level=None)  # autocommit: BEGIN/COMMIT said here
    for statement in (*_PRAGMAS, *_SCHEMA):
        sql.execute(statement)
    return sql


class SpawnFloor:
    """`count` /bin/true through two slots, recorded as jobd must record them."""

    def __init__(self, sql: sqlite3.Connection, count: int, loop: asyncio.AbstractEventLoop, extra: float) -> None:
        self.sql = sql
        self.count = count
        self.extra = extra  # seconds of CPU per job beyond the floor's own
        self.loop = loop
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.next_job = 1
        self.ended = 0
        self.done = loop.create_future()
        now = time.time()
        sql.executemany(
            "INSERT INTO job VALUES (?, ?, 'bench', 'queued', ?, NULL, NULL, NULL)",
            [(job_id, _COMMAND, now) for job_id in range(1, count + 1)],
        )

    def start(self) -> None:
        for _ in range(2):
            job_id = self._take()
            if job_id is not None:
                self.sql.execute("BEGIN IMMEDIATE")
                self._record_start(job_id)
                self.sql.execute("COMMIT")
                self._spawn(job_id)

    def _take(self) -> int | None:
        if self.next_job > self.count:
            return None
        self.next_job += 1
        return self.next_job - 1

    def _record_start(self, job_id: int) -> None:
        now = time.time()
        self.sql.execute("UPDATE job SET state = 'running', started_at = ? WHERE id = ?", (now, job_id))
        self.sql.execute("INSERT INTO attempt VALUES (?, 1, ?, NULL, NULL, NULL)", (job_id, now))

    def _spawn(self, job_id: int) -> None:
        _burn(self.extra / 2)
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2)]
        for read_end, _ in pipes:
            os.set_blocking(read_end, False)
        child = subprocess.Popen(
            ["/bin/true"],
            stdin=self.devnull,
            stdout=pipes[0][1],
            stderr=pipes[1][1],
            close_fds=False,
            process_group=0,
            env={"PATH": "/usr/bin:/bin", "JOBD_JOB_ID": str(job_id)},
        )
        for _, write_end in pipes:
            os.close(write_end)
        self.sql.execute("UPDATE attempt SET pid = ? WHERE job_id = ? AND number = 1", (child.pid, job_id))
        pidfd = os.pidfd_open(child.pid)
        self.loop.add_reader(pidfd, self._exited, job_id, child, pidfd, [read_end for read_end, _ in pipes])

    def _exited(self, job_id: int, child: subprocess.Popen[bytes], pidfd: int, pipes: list[int]) -> None:
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        _, status, _ = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        for read_end in pipes:
            try:
                while os.read(read_end, 65536):
                    pass
            except BlockingIOError:
                pass
            os.close(read_end)
        _burn(self.extra / 2)
        now = time.time()
        following = self._take()
        self.sql.execute("BEGIN IMMEDIATE")
        self.sql.execute(
            "UPDATE job SET state = 'succeeded', finished_at = ?, exit_code = ? WHERE id = ?",
            (now, child.returncode, job_id),
        )
        self.sql.execute(
            "UPDATE attempt SET finished_at = ?, exit_code = ? WHERE job_id = ? AND number = 1",
            (now, child.returncode, job_id),
        )
        if following is not None:
            self._record_start(following)
        self.sql.execute("COMMIT")
        self.ended += 1
        if following is not None:
            self._spawn(following)
        elif self.ended == self.count:
            self.done.set_result(None)


def _burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time."""
    if seconds > 0:
        until = time.thread_time() + seconds
        while time.thread_time() < until:
            pass


async def spawn_floor(count: int, directory: Path, extra: float = 0.0) -> dict[str, float]:
    floor = SpawnFloor(open_store(directory), count, asyncio.get_running_loop(), extra)
    started, cpu = time.perf_counter(), time.process_time()
    floor.start()
    await floor.done
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


class SubmitFloor(asyncio.Protocol):
    """Answers every line with the job one committed INSERT made of it."""

    def __init__(self, sql: sqlite3.Connection) -> None:
        self.sql = sql
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\n")) >= 0:
            request = json.loads(self.buffer[:end])
            del self.buffer[: end + 1]
            params = request["params"]
            now = time.time()
            cursor = self.sql.execute(
                "INSERT INTO job VALUES (NULL, ?, ?, 'queued', ?, NULL, NULL, NULL)",
                (json.dumps(params["command"]), params["queue"], now),
            )
            job = {"id": cursor.lastrowid, "state": "queued", "queue": params["queue"], "command": params["command"]}
            assert self.transport is not None
            self.transport.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": job}).encode() + b"\n")


async def serve(socket_path: str, directory: Path) -> None:
    sql = open_store(directory)
    server = await asyncio.get_running_loop().create_unix_server(lambda: SubmitFloor(sql), socket_path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    command, argument, directory = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if command == "spawn":
        extra = float(sys.argv[4]) / 1e6 if len(sys.argv) > 4 else 0.0
        print(json.dumps(asyncio.run(spawn_floor(int(argument), directory, extra))))
    elif command == "serve":
        asyncio.run(serve(argument, directory))
    else:
        raise SystemExit(f"unknown floor {command!r}: spawn or serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
