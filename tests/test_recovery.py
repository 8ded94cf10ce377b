"""Crash recovery and shutdown of a real jobd: kill -9 with jobs in every state, kill -9 under load, durability
"fsync", SIGTERM with running jobs, READY=1 after recovery, history retention.

The daemon really dies (SIGKILL) and a new one starts on the same state directory and SQLite file. Processes a
dead jobd left behind are watched through pidfds opened while they were known to be alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import hashlib
import http.client
import itertools
import json
import os
import queue as queues
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import READY_TIMEOUT, REPO, Daemon, Notifications, started_and_stopped
from lxml import etree
from recovery.support import (
    Gate,
    Pidfds,
    fill,
    finished_jobs_the_oldest_damaged,
    gated,
    held_in_spawn,
    kill9,
    pump_of,
    start,
    terminate,
    wait_events,
    wait_for_log,
)

from jobd.client import RemoteError
from jobd.daemon import RECOVERY_EXTEND_SECONDS
from jobd.engine.core import RECOVERY_STEP
from jobd.protocol.evqueue import XmlFramer
from jobd.store import MIGRATIONS, SCHEMA_VERSION, Store

# A job that blocks on its first attempt (after recording its pid and saying "ready" on fd 3) and succeeds at once
# on any later attempt. $0 is a path prefix the test reads the pid from.
HOLD = (
    'if [ "$JOBD_ATTEMPT" -gt 1 ]; then echo "attempt $JOBD_ATTEMPT"; exit 0; fi; '
    'echo $$ > "$0.pid"; echo ready >&3; exec sleep 600'
)
# A process group of two: the leader waits for a background sleep.
GROUP = 'sleep 600 & echo $! > "$0.child"; echo $$ > "$0.pid"; echo ready >&3; wait'
# Appends "JOB_ID ATTEMPT" to the file $0: a record of every run that got as far as its command.
APPEND = 'echo "$JOBD_JOB_ID $JOBD_ATTEMPT" >> "$0"'


@pytest.fixture
def pidfds() -> Iterator[Pidfds]:
    watched = Pidfds()
    yield watched
    watched.close(kill_survivors=True)  # never leave a `sleep 600` behind, whatever the outcome


def all_jobs(daemon: Daemon) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = daemon.call("job.list", {"limit": 1000})["jobs"]
    assert len(jobs) < 1000
    return jobs


def tries(daemon: Daemon, job_id: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = daemon.call("job.get", {"id": job_id})["tries"]
    return found


def queue_info(daemon: Daemon, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(q for q in daemon.call("queue.list")["queues"] if q["name"] == name)
    return found


def subscribe(daemon: Daemon, types: list[str]) -> Any:
    client = daemon.client()
    client.call("events.subscribe", {"types": types}, timeout=10)
    return client


def wait_ready_lines(client: Any, count: int) -> list[int]:
    """Ids of the jobs whose "ready" line on fd 3 arrived as a job.log event."""
    events = wait_events(client, lambda e: e["type"] == "job.log" and e["line"] == "ready", count)
    return [event["id"] for event in events]


def submit_running(daemon: Daemon, **params: Any) -> int:
    """Submit a job whose command says "ready" on fd 3 once it runs; its id, once it has said so."""
    events = subscribe(daemon, ["job.log"])
    job_id: int = daemon.submit(**params)["id"]
    wait_ready_lines(events, 1)
    events.close()
    return job_id


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


# --- kill -9 with jobs in every state -----------------------------------------------------------------------


def test_kill9_with_jobs_in_every_state(jobd: Callable[..., Daemon], pidfds: Pidfds, tmp_path: Path) -> None:
    daemon = jobd(
        """
        [queue.run]
        concurrency = 3

        [queue.held]
        paused = true
        """
    )
    # finished: succeeded, failed, cancelled
    finished = [daemon.submit(command=["/bin/true"])["id"], daemon.submit(command=["/bin/false"])["id"]]
    for job_id in finished:
        daemon.wait(job_id)
    cancelled = daemon.submit(command=["/bin/true"], delay=3600)["id"]
    daemon.call("job.cancel", {"id": cancelled})
    finished.append(cancelled)
    # queued in a paused queue, with priorities that reorder them
    order_file = tmp_path / "order"
    priorities = [10, 5, 10, 1, 5]
    held = [
        daemon.submit(
            command=["/bin/sh", "-c", 'echo "$JOBD_JOB_ID" >> "$0"', str(order_file)], queue="held", priority=p
        )["id"]
        for p in priorities
    ]
    expected_order = [job_id for _, job_id in sorted(zip(priorities, held, strict=True))]
    # delayed far into the future
    delayed = daemon.submit(command=["/bin/true"], delay=3600)
    # running: one allowed a retry, one not, one a process group with a background child
    events = subscribe(daemon, ["job.log"])
    base = {name: tmp_path / name for name in ("retry", "once", "group")}
    retried = daemon.submit(
        command=["/bin/sh", "-c", HOLD, str(base["retry"])], queue="run", retry={"times": 1, "delay": 0}
    )["id"]
    once = daemon.submit(command=["/bin/sh", "-c", HOLD, str(base["once"])], queue="run")["id"]
    group = daemon.submit(command=["/bin/sh", "-c", GROUP, str(base["group"])], queue="run")["id"]
    assert sorted(wait_ready_lines(events, 3)) == [retried, once, group]
    events.close()
    for name, prefix in base.items():
        pidfds.watch(name, read_pid(Path(f"{prefix}.pid")))
    pidfds.watch("group child", read_pid(Path(f"{base['group']}.child")))

    before = {job["id"]: job for job in all_jobs(daemon)}
    assert len(before) == len(finished) + len(held) + 1 + 3
    kill9(daemon)
    assert pidfds.alive() == ["group", "group child", "once", "retry"]  # orphans of the dead daemon, still there

    start(daemon)
    after = {job["id"]: job for job in all_jobs(daemon)}
    assert sorted(after) == sorted(before)  # job.list lists each id once: nothing lost, nothing duplicated
    # The new daemon killed the process groups the dead one left behind.
    assert pidfds.wait_exited() == []

    job = after[delayed["id"]]
    assert (job["state"], job["run_at"]) == ("delayed", delayed["run_at"])
    for job_id in finished:
        assert {k: after[job_id][k] for k in ("state", "finished_at", "attempts", "exit_code")} == {
            k: before[job_id][k] for k in ("state", "finished_at", "attempts", "exit_code")
        }
    assert [after[job_id]["state"] for job_id in held] == ["queued"] * 5
    info = queue_info(daemon, "held")
    assert (info["paused"], info["queued"], info["running"]) == (True, 5, 0), info

    # The running ones: a `lost` attempt each; retried if the policy allows it, else failed.
    for job_id in (once, group):
        job = daemon.wait(job_id)
        assert (job["state"], job["attempts"]) == ("failed", 1), job
        assert job["error"], job
        assert [t["outcome"] for t in tries(daemon, job_id)] == ["lost"]
    job = daemon.wait(retried)
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert [t["outcome"] for t in tries(daemon, retried)] == ["lost", "succeeded"]
    assert daemon.output(retried, attempt=2) == "attempt 2\n"

    # The queued ones run once each, in priority then submission order.
    daemon.call("queue.resume", {"name": "held"})
    for job_id in held:
        assert daemon.wait(job_id)["state"] == "succeeded"
    assert [int(line) for line in order_file.read_text().split()] == expected_order
    assert len(all_jobs(daemon)) == len(before)


def test_ready_only_after_recovery(jobd: Callable[..., Daemon], pidfds: Pidfds, tmp_path: Path) -> None:
    daemon = jobd("[queue.held]\npaused = true\n[queue.run]\nconcurrency = 1\n")
    held = [daemon.submit(command=["/bin/true"], queue="held")["id"] for _ in range(3)]
    delayed = daemon.submit(command=["/bin/true"], delay=3600)["id"]
    events = subscribe(daemon, ["job.log"])
    running = daemon.submit(
        command=["/bin/sh", "-c", HOLD, str(tmp_path / "run")], queue="run", retry={"times": 1, "delay": 0}
    )["id"]
    wait_ready_lines(events, 1)
    events.close()
    pidfds.watch("run", read_pid(tmp_path / "run.pid"))
    kill9(daemon)

    start(daemon)  # returns when READY=1 has arrived: the very first request must see everything recovered
    info = queue_info(daemon, "held")
    assert (info["queued"], info["running"]) == (3, 0), info
    assert daemon.call("daemon.status")["delayed"] == 1
    states = {job["id"]: job["state"] for job in all_jobs(daemon)}
    assert {job_id: states[job_id] for job_id in [*held, delayed]} == {
        **{job_id: "queued" for job_id in held},
        delayed: "delayed",
    }
    assert states[running] in ("queued", "running", "succeeded")  # requeued by the recovery, then run again
    assert tries(daemon, running)[0]["outcome"] == "lost"
    assert daemon.wait(running)["state"] == "succeeded"
    assert pidfds.wait_exited() == []


def test_a_lost_attempt_keeps_what_was_written_of_its_output(
    jobd: Callable[..., Daemon], pidfds: Pidfds, tmp_path: Path
) -> None:
    # Its byte counts come from the files; the stream that holds the whole max_output is the one said to be cut.
    daemon = jobd("[queue.run]\nconcurrency = 1\n")
    script = "echo $$ > \"$0.pid\"; head -c 5000 /dev/zero | tr '\\0' x; exec sleep 600"
    job_id = daemon.submit(command=["/bin/sh", "-c", script, str(tmp_path / "run")], queue="run", max_output=1000)["id"]
    assert daemon.call("job.output", {"id": job_id, "offset": 999, "wait": True})["data"] == "x"  # all 1,000 kept
    pidfds.watch("run", read_pid(tmp_path / "run.pid"))
    kill9(daemon)

    start(daemon)
    [attempt] = tries(daemon, job_id)
    assert (attempt["outcome"], attempt["stdout_bytes"], attempt["stderr_bytes"]) == ("lost", 1000, 0), attempt
    assert attempt["truncated"] is True
    cut = {s: daemon.call("job.output", {"id": job_id, "stream": s})["truncated"] for s in ("stdout", "stderr")}
    assert cut == {"stdout": True, "stderr": False}, cut
    assert pidfds.wait_exited() == []


def test_a_long_recovery_tells_systemd_it_is_still_going(jobd: Callable[..., Daemon]) -> None:
    # Before READY=1, systemd fails a start after TimeoutStartSec=: resuming a backlog of jobs reports its progress
    # with more time asked (EXTEND_TIMEOUT_USEC) every RECOVERY_STEP jobs, and a STATUS= saying how far it is.
    daemon = jobd("[queue.held]\npaused = true\n")
    total = 2 * RECOVERY_STEP + 10
    with daemon.client() as client:
        for first in range(0, total, 1000):
            batch = [{"command": ["/bin/true"], "queue": "held"} for _ in range(min(1000, total - first))]
            client.call("job.submit", {"jobs": batch}, timeout=60)
    kill9(daemon)

    start(daemon)
    assert daemon.notify is not None
    before_ready = [
        line
        for message in daemon.notify.messages[: next(i for i, m in enumerate(daemon.notify.messages) if "READY=1" in m)]
        for line in message.splitlines()
    ]
    assert before_ready == [
        f"EXTEND_TIMEOUT_USEC={RECOVERY_EXTEND_SECONDS * 1_000_000}",
        f"STATUS=recovering: {RECOVERY_STEP} of {total} unfinished jobs resumed",
        f"EXTEND_TIMEOUT_USEC={RECOVERY_EXTEND_SECONDS * 1_000_000}",
        f"STATUS=recovering: {2 * RECOVERY_STEP} of {total} unfinished jobs resumed",
    ]
    assert queue_info(daemon, "held")["queued"] == total


def test_a_stop_asked_for_during_recovery_starts_no_job(jobd: Callable[..., Daemon], tmp_path: Path) -> None:
    """A SIGTERM while a long backlog is put back is noted, not fatal; when the recovery is done jobd stops at once
    and starts none of the jobs (it used to start a queue's worth, and SIGTERM them), nor serves or says READY=1."""
    daemon = jobd("[queue.held]\npaused = true\nconcurrency = 10\n")
    ran = tmp_path / "ran"
    total = 2 * RECOVERY_STEP + 10
    with daemon.client() as client:
        for first in range(0, total, 1000):
            job = {"command": ["/bin/sh", "-c", 'echo "$JOBD_JOB_ID" >> "$0"', str(ran)], "queue": "held"}
            client.call("job.submit", {"jobs": [job] * min(1000, total - first)}, timeout=60)
    daemon.stop()
    daemon.write_config("[queue.held]\nconcurrency = 10\n")  # no longer paused: its jobs would start at once

    daemon.start(until="STATUS=recovering")  # the first page is back; the next ones are being read
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(60) == 0, daemon.log()
    assert not ran.exists(), ran.read_text()
    assert "stopping for shutdown" not in daemon.log()
    # It stopped without serving: systemd heard STOPPING=1, never READY=1.
    assert daemon.notify is not None
    daemon.notify.wait_for("STOPPING=1", timeout=5)  # sent before the exit: already queued on the socket
    assert not any("READY=1" in message for message in daemon.notify.messages), daemon.notify.messages
    assert "a stop was asked for during start-up: stopping without serving" in daemon.log()

    daemon.write_config("[queue.held]\npaused = true\n")
    start(daemon)  # every job was left where it waited, none tried
    assert queue_info(daemon, "held")["queued"] == total
    assert daemon.call("job.list", {"limit": 1})["jobs"][0]["attempts"] == 0


def test_a_delay_that_ran_out_while_jobd_was_down_keeps_its_jobs_priority(
    jobd: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A delayed job whose time came while jobd was stopped is due at the start, in its queue's order with the
    queued jobs: priority 1 before a queued job of priority 2000 (it used to come after every queued job)."""
    daemon = jobd("[queue.one]\nconcurrency = 1\npaused = true\n")
    order = tmp_path / "order"
    command = ["/bin/sh", "-c", 'echo "$JOBD_JOB_ID" >> "$0"', str(order)]
    low = daemon.submit(command=command, queue="one", priority=2000)["id"]
    urgent = daemon.submit(command=command, queue="one", priority=1, delay=2)
    daemon.stop()
    due = datetime.datetime.fromisoformat(urgent["run_at"].replace("Z", "+00:00")).timestamp()
    time.sleep(max(0.0, due - time.time()))  # no-poll-ok: one wait on the clock, for the delay to run out
    daemon.write_config("[queue.one]\nconcurrency = 1\n")
    start(daemon)
    assert daemon.wait(low)["state"] == "succeeded" and daemon.wait(urgent["id"])["state"] == "succeeded"
    assert order.read_text().split() == [str(urgent["id"]), str(low)]


DAY = 86400.0


def _recorded_a_day_ahead(daemon: Daemon, job_id: int, delay: float) -> None:
    """Stop the daemon and leave its database as a clock set back a day since leaves it: each time recorded for
    job `job_id` a day ahead of the clock, its delay (or back-off) ending `delay` seconds after the latest of them."""
    assert daemon.stop() == 0
    database = sqlite3.connect(daemon.state_dir / "jobd.sqlite3")
    database.execute(
        "UPDATE job SET created_at = created_at + ?, started_at = started_at + ? WHERE id = ?", (DAY, DAY, job_id)
    )
    database.execute(
        "UPDATE attempt SET started_at = started_at + ?, finished_at = finished_at + ? WHERE job_id = ?",
        (DAY, DAY, job_id),
    )
    database.execute(
        "UPDATE job SET run_at = MAX(created_at, COALESCE(started_at, created_at)) + ? WHERE id = ?", (delay, job_id)
    )
    database.commit()
    database.close()


def test_a_delay_does_not_wait_longer_than_it_was_set_for_when_the_clock_went_back_while_jobd_was_down(
    jobd: Callable[..., Daemon],
) -> None:
    """The clock set back (an NTP step after a boot with the clock ahead, a wrong clock corrected) while jobd was
    stopped: a delayed job's wall-clock due time was as far ahead of the new clock as the clock went back, and the
    job waited that long (a day here) on top of its delay. Its wait is now counted from the last time jobd recorded
    for it, when the clock is behind that time, so the delay is kept as it was asked for, not stretched."""
    daemon = jobd()
    delayed = daemon.submit(command=["/bin/echo", "delayed"], delay=3600)["id"]
    _recorded_a_day_ahead(daemon, delayed, 1)
    start(daemon)
    job = daemon.wait(delayed)
    assert job["state"] == "succeeded" and daemon.output(delayed) == "delayed\n"


def _waiting_for_its_retry_recorded_a_day_ahead(daemon: Daemon) -> int:
    """A job whose first attempt failed and whose second succeeds, waiting for its back-off (an hour, on record now
    ending a second after the job's latest time), with jobd stopped and every time of the job a day ahead of the
    clock: as if the clock went back a day while jobd was down."""
    command = ["/bin/sh", "-c", 'test "$JOBD_ATTEMPT" -gt 1 && echo retried']
    events = subscribe(daemon, ["job.state"])
    retried: int = daemon.submit(command=command, retry={"times": 1, "delay": 3600})["id"]
    wait_events(events, lambda e: e["job"]["id"] == retried and e["job"]["state"] == "delayed", 1)
    events.close()
    _recorded_a_day_ahead(daemon, retried, 1)
    return retried


def test_a_retry_back_off_does_not_wait_longer_than_it_was_set_for_when_the_clock_went_back_while_jobd_was_down(
    jobd: Callable[..., Daemon],
) -> None:
    daemon = jobd()
    retried = _waiting_for_its_retry_recorded_a_day_ahead(daemon)
    start(daemon)
    job = daemon.wait(retried)
    assert job["state"] == "succeeded" and daemon.output(retried, attempt=2) == "retried\n"
    assert [t["outcome"] for t in tries(daemon, retried)] == ["failed", "succeeded"]


def test_a_retry_back_off_after_a_long_attempt_is_not_stretched_by_its_run_time_when_the_clock_went_back(
    jobd: Callable[..., Daemon],
) -> None:
    """A back-off counts from the end of the attempt that failed. With the clock set back while jobd was stopped,
    the wait was counted from that attempt's start instead, so a job whose attempt had run two hours waited two
    hours more than its one-second back-off."""
    daemon = jobd()
    retried = _waiting_for_its_retry_recorded_a_day_ahead(daemon)
    database = sqlite3.connect(daemon.state_dir / "jobd.sqlite3")  # the first attempt ran two hours
    database.execute("UPDATE attempt SET started_at = finished_at - 7200 WHERE job_id = ?", (retried,))
    database.execute(
        "UPDATE job SET created_at = (SELECT started_at FROM attempt WHERE job_id = job.id), "
        "started_at = (SELECT started_at FROM attempt WHERE job_id = job.id), "
        "run_at = (SELECT finished_at FROM attempt WHERE job_id = job.id) + 1 WHERE id = ?",
        (retried,),
    )
    database.commit()
    database.close()
    start(daemon)
    job = daemon.wait(retried)
    assert job["state"] == "succeeded" and daemon.output(retried, attempt=2) == "retried\n"


# --- kill -9 under load -------------------------------------------------------------------------------------


class Workload:
    """Submits jobs over several connections; a kill of the daemon ends a round, the rest is sent again later
    under the same idempotency keys (as a client that got no reply must do)."""

    CONNECTIONS = 4

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.specs = specs
        self.ids: dict[str, int] = {}  # key -> id, from every submit reply
        self.replies = 0
        self.errors: list[str] = []
        self._cond = threading.Condition()

    def round(self, daemon: Daemon, pending: list[int], kill_after: int | None) -> list[int]:
        """Submits `pending` (indexes into specs); kill -9s the daemon once `kill_after` more replies arrived.
        Returns the indexes that got no reply."""
        work: queues.SimpleQueue[int] = queues.SimpleQueue()
        for index in pending:
            work.put(index)
        unanswered: list[int] = []
        done = [0]
        target = self.replies + (kill_after or 0)

        def worker() -> None:
            try:
                client = daemon.client()
            except OSError:
                return
            try:
                while True:
                    try:
                        index = work.get_nowait()
                    except queues.Empty:
                        return
                    try:
                        job = client.call("job.submit", self.specs[index], timeout=30)
                    except OSError:  # the daemon died under us: no reply, maybe committed
                        with self._cond:
                            unanswered.append(index)
                        return
                    except RemoteError as error:
                        with self._cond:
                            self.errors.append(f"{self.specs[index]['key']}: {error}")
                        return
                    self._record(self.specs[index]["key"], job["id"])
            finally:
                client.close()
                with self._cond:
                    done[0] += 1
                    self._cond.notify_all()

        threads = [threading.Thread(target=worker) for _ in range(self.CONNECTIONS)]
        for thread in threads:
            thread.start()
        if kill_after is not None:
            with self._cond:
                self._cond.wait_for(lambda: self.replies >= target or done[0] == len(threads), timeout=30)
            kill9(daemon)
        for thread in threads:
            thread.join(30)
        while True:
            try:
                unanswered.append(work.get_nowait())
            except queues.Empty:
                break
        return sorted(unanswered)

    def _record(self, key: str, job_id: int) -> None:
        with self._cond:
            if key in self.ids and self.ids[key] != job_id:
                self.errors.append(f"{key}: submitted again, got job {job_id} instead of {self.ids[key]}")
            self.ids[key] = job_id
            self.replies += 1
            self._cond.notify_all()


def kill_while_busy(daemon: Daemon) -> bool:
    """Resumes the queue and kill -9s once a few jobs ended, with many still queued; False (and no kill) if too
    few were queued."""
    events = subscribe(daemon, ["job.state"])
    queued = daemon.call("queue.resume", {"name": "default"})["queued"]
    if queued < 20:
        events.close()
        return False
    # Every job queued now ends with a state event in this daemon's life, so this many will come.
    wait_events(events, lambda e: e["job"]["state"] == "succeeded", min(10, queued // 2))
    kill9(daemon)
    events.close()
    return True


def test_kill9_at_several_points_of_a_workload(jobd: Callable[..., Daemon], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    specs: list[dict[str, Any]] = [
        {
            "command": ["/bin/sh", "-c", APPEND, str(runs)],
            "key": f"w{i}",
            **({"retry": {"times": 2, "delay": 0}} if i % 2 else {}),
        }
        for i in range(200)
    ]
    daemon = jobd("[queue.default]\nconcurrency = 4\n")
    load = Workload(specs)

    pending = list(range(len(specs)))
    # Right after the first reply (three times: jobs are being started while submits still arrive), then midway.
    for kill_after in (1, 1, 1, 60):
        left = len(pending)
        pending = load.round(daemon, pending, kill_after=kill_after)
        assert 0 < len(pending) < left, "the kill did not come in the middle of the submits"
        start(daemon)
    daemon.call("queue.pause", {"name": "default"})  # let a queue build up, to kill while it is busy
    assert load.round(daemon, pending, kill_after=None) == []
    busy_kills = 0
    for _ in range(3):  # while the queue is busy: jobs are started and reaped all the time
        if not kill_while_busy(daemon):
            break
        busy_kills += 1
        start(daemon)
    assert busy_kills > 0, "the queue had drained before the first kill while busy"
    daemon.call("queue.resume", {"name": "default"})

    assert load.errors == []
    assert len(load.ids) == len(specs)
    jobs = all_jobs(daemon)
    ids = [job["id"] for job in jobs]
    assert len(ids) == len(set(ids)) == len(specs), "a job was lost or created twice"
    assert {job["key"]: job["id"] for job in jobs} == load.ids

    finished = {job_id: daemon.wait(job_id) for job_id in load.ids.values()}
    # Read only once every job has ended: the queue was just resumed and its last jobs may still be running.
    lines = Counter(tuple(map(int, line.split())) for line in runs.read_text().splitlines())
    lost = 0
    for i, spec in enumerate(specs):
        job_id = load.ids[spec["key"]]
        job = finished[job_id]
        attempts = tries(daemon, job_id)
        outcomes = [t["outcome"] for t in attempts]
        assert [t["number"] for t in attempts] == list(range(1, job["attempts"] + 1)), attempts
        assert set(outcomes[:-1]) <= {"lost"}, (job, outcomes)  # nothing but a crash ends an attempt early
        lost += outcomes.count("lost")
        times = 2 if i % 2 else 0
        if job["state"] == "succeeded":
            assert outcomes[-1] == "succeeded"
            assert lines[(job_id, job["attempts"])] == 1, (
                f"job {job_id}'s successful attempt ran {lines[(job_id, job['attempts'])]} times"
            )
        else:
            assert (job["state"], outcomes[-1]) == ("failed", "lost"), (job, outcomes)
            assert len(outcomes) == times + 1, f"job {job_id} was not retried as its policy allows: {outcomes}"
        # A command runs at most once per attempt, and never for an attempt jobd does not know of.
        for (line_id, number), count in lines.items():
            if line_id == job_id:
                assert count == 1 and 1 <= number <= job["attempts"], (job_id, number, count, outcomes)
    assert lost > 0, "no kill hit a running job: the test did not exercise recovery"


def evqueue_exchange(daemon: Daemon, request: bytes) -> etree._Element:
    """One request on a new connection to the evQueue socket (after its greeting), and its answer."""
    framer, documents = XmlFramer(), []
    with socket.socket(socket.AF_UNIX) as evq:
        evq.settimeout(60)
        evq.connect(str(daemon.evqueue_socket))
        for send in (b"", request):  # the greeting comes first, unasked
            evq.sendall(send)
            while not documents:
                data = evq.recv(65536)
                assert data, "jobd closed the evQueue connection"
                documents += framer.feed(data)
            answer = documents.pop(0)
    return etree.fromstring(answer)


@pytest.mark.parametrize("damage", ["not a database", "a damaged page"])
def test_a_database_that_cannot_be_used_stops_the_start_with_a_message(
    make_daemon: Callable[..., Daemon], damage: str
) -> None:
    daemon = make_daemon("[queue.default]\n")
    for n in range(300):  # enough rows for the job table to span pages past the first ones
        daemon.submit(command=["/bin/true"], delay=3600, context=f"filler {n:0100}")
    assert daemon.stop() == 0
    database = daemon.state_dir / "jobd.sqlite3"
    data = bytearray(database.read_bytes())
    if damage == "not a database":
        data[:16] = b"not SQLite at al"
    else:
        data[len(data) // 2 : len(data) // 2 + 4096] = b"\xa5" * 4096
    database.write_bytes(data)

    started = daemon.start_refused()
    # 78: permanent, so that systemd does not restart it into its start limit (jobd.service's
    # RestartPreventExitStatus=78).
    assert started.returncode == 78, started
    assert "not starting: the database in" in started.stderr and "Traceback" not in started.stderr, started.stderr
    assert "the file is damaged" in started.stderr and "restore it from a backup" in started.stderr, started.stderr
    assert database.read_bytes() == data  # left as it was, for whoever repairs it
    assert not daemon.socket_path.exists() and not daemon.evqueue_socket.exists()


@pytest.mark.parametrize(
    ("finder", "history", "line"),
    [
        ("the count of the history", "", "counting the jobs on record: "),
        ("retention", "history = { keep_last = 10 }", "cannot expire finished jobs, ended instances or audit entries "),
    ],
)
def test_a_damaged_page_of_finished_jobs_found_after_the_start_is_one_clear_line_and_jobd_serves_on(
    make_daemon: Callable[..., Daemon], finder: str, history: str, line: str
) -> None:
    daemon = make_daemon("[queue.default]\n", daemon_extra=history)
    assert daemon.stop() == 0
    finished_jobs_the_oldest_damaged(daemon.state_dir / "jobd.sqlite3")

    daemon.start()
    # The line says what was found and what to do (SQLite's own words, "database disk image is malformed", do not).
    wait_for_log(daemon, line)
    logged = [text for text in daemon.log().splitlines() if line in text]
    # Which file, as jobd opened it: the one to check, restore or move away.
    damaged = f"jobd's database {daemon.state_dir / 'jobd.sqlite3'} reads as damaged ("
    assert logged and all(damaged in text and "restore it from a backup" in text for text in logged), logged
    assert "Traceback" not in daemon.log(), daemon.log()
    if finder == "the count of the history":
        # daemon.status waits for that count: it says so too.
        with pytest.raises(RemoteError) as refused:
            daemon.call("daemon.status")
        assert refused.value.code == "STORE_FAILED" and damaged in refused.value.message, refused.value.message
    # The rest of the history, and new work, are served as before.
    assert daemon.call("job.get", {"id": 300})["state"] == "succeeded"
    assert daemon.wait(daemon.submit(command=["/bin/true"])["id"])["state"] == "succeeded"


@pytest.mark.parametrize("whose", ["another program's", "a newer jobd's"])
def test_a_database_that_is_not_this_jobds_is_refused_and_left_as_it_was(
    make_daemon: Callable[..., Daemon], whose: str
) -> None:
    # Both in SQLite's default rollback journal mode: WAL mode is written into the file's header, so a jobd that
    # switched to it before refusing the file would leave it changed for good (the man page says it is left as it is).
    daemon = make_daemon("[queue.default]\n", start=False)
    daemon.state_dir.mkdir(parents=True)
    database = daemon.state_dir / "jobd.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as raw:
        if whose == "another program's":
            raw.execute("CREATE TABLE photos (name TEXT)")
            raw.execute("INSERT INTO photos VALUES ('cat.jpg')")
            raw.commit()
        else:
            raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    data = database.read_bytes()
    started = daemon.start_refused()
    assert started.returncode == 78, started  # permanent: restarting cannot mend it
    if whose == "another program's":
        wanted = "it is not jobd's database; move it away to start anew"
    else:  # what it is, and what to do about it
        wanted = (
            f"newer than this jobd understands ({SCHEMA_VERSION}): a newer jobd upgraded it; install that jobd "
            "again, or restore a copy of the database from before the upgrade"
        )
    assert wanted in started.stderr and "Traceback" not in started.stderr, started.stderr
    assert database.read_bytes() == data
    assert not Path(f"{database}-wal").exists() and not daemon.socket_path.exists()


@pytest.mark.parametrize("left", ["output", "WAL"])
def test_a_missing_database_with_its_jobs_leftovers_is_refused(make_daemon: Callable[..., Daemon], left: str) -> None:
    """A new database would give out job ids again: a new job 1 would show the old job 1's output. So a state
    directory that lost its database but not what it recorded is refused (exit 78), until restored or cleared."""
    daemon = make_daemon("[queue.default]\n")
    job = daemon.wait(daemon.submit(command=["/bin/echo", "old job"])["id"])
    assert daemon.stop() == 0
    database = daemon.state_dir / "jobd.sqlite3"
    database.unlink()
    if left == "WAL":  # what a kill -9 leaves: the database's last commits in the WAL only
        shutil.rmtree(daemon.state_dir / "output")
        (daemon.state_dir / "jobd.sqlite3-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(28))
    started = daemon.start_refused()
    assert started.returncode == 78, started
    wanted = "output" if left == "output" else "jobd.sqlite3-wal"
    assert f"the database {database} is missing, but {wanted} in {daemon.state_dir} are left" in started.stderr
    assert "Traceback" not in started.stderr and not database.exists(), started.stderr

    for name in ("output", "jobd.sqlite3-wal", "jobd.sqlite3-shm"):  # cleared: a new start, ids from 1
        path = daemon.state_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    start(daemon)
    fresh = daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    assert fresh["id"] == job["id"] and daemon.output(fresh["id"]) == ""


def test_an_empty_database_with_its_jobs_output_left_is_refused_as_a_missing_one(
    make_daemon: Callable[..., Daemon],
) -> None:
    """SQLite takes an empty file for a new database: what a power cut can leave of a copy just restored. Its jobs'
    output is still there, so it is refused as a missing database is, and left as it is."""
    daemon = make_daemon("[queue.default]\n")
    daemon.wait(daemon.submit(command=["/bin/echo", "old job"])["id"])
    assert daemon.stop() == 0
    database = daemon.state_dir / "jobd.sqlite3"
    database.write_bytes(b"")
    started = daemon.start_refused()
    assert started.returncode == 78, started
    assert f"the database {database} is empty (0 bytes), but output in {daemon.state_dir} are left" in started.stderr
    assert "Traceback" not in started.stderr, started.stderr
    assert database.stat().st_size == 0 and not Path(f"{database}-wal").exists()


def test_a_state_dir_that_is_a_file_is_named_at_start_up(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(start=False)
    daemon.state_dir.parent.mkdir(parents=True, exist_ok=True)
    daemon.state_dir.write_text("not a directory\n")
    started = daemon.start_refused()
    assert started.returncode == 78, started  # permanent: restarting cannot mend it
    assert f"the state directory {daemon.state_dir} ([daemon] state_dir) cannot be made" in started.stderr, started
    assert "exists and is not a directory" in started.stderr and "Traceback" not in started.stderr, started.stderr


@pytest.mark.parametrize("how", ["mounted read-only", "immutable"])
def test_a_database_jobd_may_not_write_is_named_with_what_to_do(make_daemon: Callable[..., Daemon], how: str) -> None:
    daemon = make_daemon("[queue.default]\n")
    done = daemon.submit(command=["/bin/true"])["id"]
    daemon.wait(done)
    assert daemon.stop() == 0
    state, database = daemon.state_dir, daemon.state_dir / "jobd.sqlite3"
    if how == "mounted read-only":
        subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
        undo = ["umount", str(state)]
        subprocess.run(["mount", "-o", "remount,bind,ro", str(state)], check=True)
        wanted = "Read-only file system: '{}'; its file system is mounted read-only: remount it read-write"
    else:
        subprocess.run(["chattr", "+i", str(database)], check=True)
        undo = ["chattr", "-i", str(database)]
        wanted = "Operation not permitted: '{}'; jobd may not change it: check its owner, its mode and its attributes"
    try:
        data = database.read_bytes()
        started = daemon.start_refused()
        assert database.read_bytes() == data
    finally:
        subprocess.run(undo, check=True)
    assert started.returncode == 1, started  # mended by hand, then started again (systemd retries it)
    assert f"not starting: [Errno {errno.EROFS if how == 'mounted read-only' else errno.EPERM}] " in started.stderr
    assert wanted.format(database) in started.stderr and "Traceback" not in started.stderr, started.stderr
    daemon.start()
    assert [job["id"] for job in all_jobs(daemon)] == [done]


@pytest.mark.parametrize("hold", ["BEGIN; SELECT count(*) FROM job", "BEGIN IMMEDIATE"])
def test_a_database_an_sqlite3_shell_holds_at_the_start_is_named_and_used_once_it_is_let_go(
    make_daemon: Callable[..., Daemon], hold: str
) -> None:
    # An administrator's sqlite3 shell left open on the database of a stopped jobd, in a read or a write: the start
    # waits for it (busy_timeout), then says so, and exits 1 (systemd tries again); nothing is changed.
    daemon = make_daemon("[queue.default]\n")
    done = daemon.submit(command=["/bin/true"])["id"]
    daemon.wait(done)
    assert daemon.stop() == 0
    database = daemon.state_dir / "jobd.sqlite3"
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as shell:
        for statement in hold.split("; "):
            shell.execute(statement).fetchall()
        started = daemon.start_refused()
        assert started.returncode == 1, started
        wanted = "cannot be used: database is locked; another process holds it (an sqlite3 shell?): close that and"
        assert wanted in started.stderr and "Traceback" not in started.stderr, started.stderr
        assert shell.execute("SELECT id, state FROM job").fetchall() == [(done, "succeeded")]
        shell.execute("ROLLBACK")
    daemon.start()
    assert [job["id"] for job in all_jobs(daemon)] == [done]


def test_a_start_after_a_crash_whose_writes_the_disk_refuses_is_told_as_a_full_disk(
    make_daemon: Callable[..., Daemon],
) -> None:
    # After a crash a start writes before it serves (the job ids it may have handed out, then recovery): each write
    # SQLite makes from the Nth on fails with ENOSPC (strace's fault injection), N = 1, 2, ... start after start,
    # wherever it falls (a statement, its COMMIT, which SQLite then rolls back itself).
    daemon = make_daemon("[queue.default]\n")
    done = daemon.submit(command=["/bin/true"])["id"]
    daemon.wait(done)
    daemon.kill9()
    refusals = 0
    for write in itertools.count(1):
        daemon.command_prefix = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64"]
        daemon.command_prefix += ["-e", f"inject=pwrite64:error=ENOSPC:when={write}+"]
        if started_and_stopped(daemon):
            break
        assert daemon.process is not None and daemon.process.wait() == 1, daemon.log()
        daemon.process = None
        [told] = [line for line in daemon.log().splitlines() if "not starting" in line][-1:]
        assert "cannot be used: database or disk is full; its file system is full: make room" in told, told
        refusals += 1
    assert refusals > 1
    daemon.command_prefix = []
    daemon.start()
    assert [job["id"] for job in all_jobs(daemon)] == [done]
    assert daemon.submit(command=["/bin/true"])["id"] > done


def test_a_full_disk_at_start_up_is_named_and_loses_nothing(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # Recovery writes (a running attempt becomes `lost`): on a full disk jobd cannot start, and says why and what
    # to do, not that the file may be damaged. Once there is room it starts with every job.
    daemon = jobd("[queue.default]\nconcurrency = 1\n")
    assert daemon.state_dir == small_state_disk
    running = submit_running(daemon, command=["/bin/sh", "-c", "echo ready >&3; exec sleep 300"])
    queued = daemon.submit(command=["/bin/echo", "queued"])["id"]
    daemon.kill9()
    filler = fill(small_state_disk)

    started = daemon.start_refused()
    assert started.returncode == 1, started  # passing trouble: systemd may start it again
    assert "its file system is full: make room" in started.stderr, started.stderr
    assert "damaged" not in started.stderr and "Traceback" not in started.stderr, started.stderr

    filler.unlink()
    daemon.start()
    assert [t["outcome"] for t in tries(daemon, running)] == ["lost"]
    job = daemon.wait(queued)
    assert job["state"] == "succeeded" and daemon.output(queued) == "queued\n"


def test_a_full_disk_at_a_start_that_must_migrate_the_database_is_named_and_loses_nothing(
    make_daemon: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # A database of jobd's first schema, as an upgrade finds it, with no jobd.lock yet (a state directory restored
    # from a copy, or moved): the start wrote the pid into the new, empty lock file before the database was opened,
    # and on a full disk that write failed the start with "not starting: [Errno 28] No space left on device" alone,
    # naming no file and nothing to do. The pid is jobd's note to a second jobd, not the lock: the database says why
    # jobd cannot start (its migration needs room), and once there is room it starts with every job.
    daemon = make_daemon("[queue.q]\n", start=False)
    database = small_state_disk / "jobd.sqlite3"
    store = Store(str(database))
    store.db.connect()
    with store.db.atomic():
        MIGRATIONS[0](store.db)
        store.db.pragma("user_version", 1)
        for n in range(3):
            store.db.execute_sql(
                "INSERT INTO job (command, queue, priority, state, key, created_at, run_at, env, kill_grace, retry, "
                "max_output, attempts, progress) VALUES (?, 'q', 1, 'queued', ?, 1.0, 1.0, '{}', 10, ?, 65536, 0, 0)",
                (
                    json.dumps(["/bin/echo", f"job {n}"]),
                    f"k{n}",
                    json.dumps({"times": 0, "delay": 1.0, "backoff": 2.0, "on_exit_codes": []}),
                ),
            )
    store.db.close()
    filler = fill(small_state_disk)

    started = daemon.start_refused()
    assert started.returncode == 1, started  # passing trouble: systemd may start it again
    assert "its file system is full: make room" in started.stderr, started.stderr
    assert "cannot write jobd's pid into" in started.stderr, started.stderr  # said, and no more than a warning
    assert "Traceback" not in started.stderr, started.stderr

    filler.unlink()
    daemon.start()
    jobs = all_jobs(daemon)
    assert sorted(job["key"] for job in jobs) == ["k0", "k1", "k2"]
    for job in jobs:
        assert daemon.wait(job["id"])["state"] == "succeeded"
        assert daemon.output(job["id"]) == f"job {job['key'][1:]}\n"


def test_a_start_on_a_full_disk_that_needs_no_write_serves_and_refuses_writes_until_there_is_room(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # Nothing to record at this start (no running job was lost): jobd starts on the full disk, answers what it can
    # read, refuses writes with STORE_FAILED, and takes them again once there is room, without a restart. It did
    # not start at all when its pid could not be written into jobd.lock (missing here, as in a restored directory).
    daemon = jobd("[queue.held]\npaused = true\n")
    held = daemon.submit(command=["/bin/echo", "held"], queue="held")["id"]
    daemon.stop()
    (small_state_disk / "jobd.lock").unlink()
    filler = fill(small_state_disk)

    start(daemon)
    assert "cannot write jobd's pid into" in daemon.log()
    assert daemon.call("job.get", {"id": held})["state"] == "queued"
    assert exhaust(daemon, small_state_disk) == filler  # a submit is refused once the WAL has no room left either
    assert f"job.submit: {_not_written(daemon)}" in daemon.log()

    filler.unlink()
    daemon.call("queue.resume", {"name": "held"})
    job = daemon.wait(held)
    assert job["state"] == "succeeded" and daemon.output(held) == "held\n"
    assert daemon.wait(daemon.submit(command=["/bin/true"])["id"])["state"] == "succeeded"


ONE_TASK = b"""<workflow><subjobs><job name="one"><tasks>
  <task path="/bin/true" queue="default"/>
</tasks></job></subjobs></workflow>"""
ONE_TASK_SAYING = b"""<workflow><subjobs><job name="one"><tasks>
  <task path="/bin/echo" parameters-mode="CMDLINE" queue="default"><input name="x">said by the task</input></task>
</tasks></job></subjobs></workflow>"""


def test_a_kill9_while_a_launch_starts_its_first_task_leaves_an_instance_that_resumes(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    # The instance's row was committed with an empty document, which was saved once its first tasks had started: a
    # kill -9 in between left an instance the next start could not read ("cannot be resumed": ended with an error,
    # unreadable by instance.get, its task's job on its own). Here jobd is held in the first task's spawn by strace,
    # which delays the return of its vfork, and killed there, once the task has run.
    ran = tmp_path / "ran"
    os.mkfifo(ran)
    reader = os.open(ran, os.O_RDONLY | os.O_NONBLOCK)  # open throughout: the task's writes never block
    daemon = make_daemon(
        f'[queue.default]\n[task.mark]\ncommand = ["/bin/sh", "-c", "echo ran > {ran}"]\n', start=False
    )
    daemon.write_workflows(
        one=b'<workflow><subjobs><job name="j"><tasks><task task="mark"/></tasks></job></subjobs></workflow>'
    )
    start(daemon)
    strace = held_in_spawn(daemon)
    launched: dict[str, Any] = {}

    def launch() -> None:
        try:
            launched["reply"] = daemon.call("instance.launch", {"workflow": "one"}, timeout=90)
        except Exception as error:  # the connection ends with jobd: expected
            launched["error"] = error

    client = threading.Thread(target=launch)
    try:
        client.start()
        assert select.select([reader], [], [], 60)[0], "the task did not run"  # jobd now waits in its vfork
        assert os.read(reader, 100) == b"ran\n"
        # SIGKILL first: jobd dies as strace lets it go (a tracee's death waits for its tracer to see it).
        os.kill(daemon.pid, signal.SIGKILL)
    finally:
        strace.kill()
        strace.wait(30)
    kill9(daemon)
    client.join(90)
    assert "reply" not in launched, launched  # killed before it answered
    start(daemon)
    instance_id = daemon.call("instance.list")["instances"][0]["id"]
    ended = daemon.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=40)
    assert ended["status"] == "TERMINATED", ended
    assert "cannot be resumed" not in daemon.log()
    assert daemon.call("instance.get", {"id": instance_id})["jobs"], "the instance's tree is readable"
    assert all(job["finished_at"] for job in daemon.call("job.list")["jobs"]), "no job left behind"
    terminate(daemon)
    os.close(reader)


def test_a_kill9_while_a_workflow_starts_its_next_task_runs_neither_task_again_unasked(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    # jobd is held in the spawn of the second task (strace delays its vfork's return), after the first task's end
    # and the second's start were committed and once the second has run, and killed there. The first task does
    # not run again; the second's attempt is `lost` and tried again as its policy allows; the instance ends.
    ran = tmp_path / "ran"
    os.mkfifo(ran)
    reader = os.open(ran, os.O_RDONLY | os.O_NONBLOCK)  # open throughout: the task's writes never block
    record = tmp_path / "record"
    gate = Gate(tmp_path / "gate")
    first = f"flock {gate.path} true; echo first $JOBD_ATTEMPT >> {record}"
    second = f"echo second $JOBD_ATTEMPT >> {record}; echo ran > {ran}"
    daemon = make_daemon(
        f'[queue.default]\n[task.first]\ncommand = ["/bin/sh", "-c", "{first}"]\n'
        f'[task.second]\ncommand = ["/bin/sh", "-c", "{second}"]\nretry = {{ times = 1, delay = 0 }}\n',
        start=False,
    )
    daemon.write_workflows(
        two=b'<workflow><subjobs><job name="a"><tasks><task task="first"/></tasks><subjobs>'
        b'<job name="b"><tasks><task task="second"/></tasks></job></subjobs></job></subjobs></workflow>'
    )
    start(daemon)
    events = subscribe(daemon, ["job.state"])
    instance_id = daemon.call("instance.launch", {"workflow": "two"})["id"]
    wait_events(events, lambda e: e["job"]["state"] == "running", 1)  # the first task waits for the gate
    events.close()
    strace = held_in_spawn(daemon)
    try:
        gate.release()
        assert select.select([reader], [], [], 60)[0], "the second task did not run"  # jobd waits in its vfork
        assert os.read(reader, 100) == b"ran\n"
        os.kill(daemon.pid, signal.SIGKILL)  # first: jobd dies as strace lets it go
    finally:
        strace.kill()
        strace.wait(30)
    kill9(daemon)
    start(daemon)
    ended = daemon.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=40)
    assert (ended["status"], ended["errors"]) == ("TERMINATED", 0), ended
    assert record.read_text().splitlines() == ["first 1", "second 1", "second 2"]
    outcomes = {job["task"]: [t["outcome"] for t in tries(daemon, job["id"])] for job in all_jobs(daemon)}
    assert outcomes == {"first": ["succeeded"], "second": ["lost", "succeeded"]}, outcomes
    terminate(daemon)
    os.close(reader)


@pytest.mark.parametrize("protocol", ["evqueue", "json-rpc"])
def test_with_fsync_a_launch_is_answered_after_the_fsync(
    make_daemon: Callable[..., Daemon], tmp_path: Path, protocol: str
) -> None:
    daemon = make_daemon("[queue.default]\n", start=False, daemon_extra='durability = "fsync"')
    daemon.write_workflows(one=ONE_TASK)
    daemon.start()
    trace = tmp_path / "trace"
    strace = subprocess.Popen(
        [
            "strace",
            "-f",
            "-s",
            "200",
            "-e",
            "trace=fsync,fdatasync,write,sendto",
            "-o",
            str(trace),
            "-p",
            str(daemon.pid),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert strace.stderr is not None and "attached" in strace.stderr.readline()  # tracing from here on
        if protocol == "evqueue":
            assert evqueue_exchange(daemon, b'<instance action="launch" name="one" />').get("status") == "OK"
        else:
            daemon.call("instance.launch", {"workflow": "one"})
    finally:
        strace.send_signal(signal.SIGINT)
        strace.wait(30)
    calls = trace.read_text().splitlines()
    # The reply, as strace shows what jobd sent; the fsync is the group flusher's, in its own thread.
    marker = "workflow-instance-id" if protocol == "evqueue" else '\\"workflow\\":\\"one\\"'
    reply = next(i for i, line in enumerate(calls) if marker in line)
    assert any("sync(" in line for line in calls[:reply]), "\n".join(calls[: reply + 1])


def test_fsync_durability_concurrent_submits_survive_kill9(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd("[queue.held]\npaused = true\n", daemon_extra='durability = "fsync"')
    assert daemon.call("daemon.status")["durability"] == "fsync"
    threads, per_thread = 32, 4
    barrier = threading.Barrier(threads)
    ids: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def submitter(n: int) -> None:
        try:
            with daemon.client() as client:
                barrier.wait(30)
                for i in range(per_thread):
                    job = client.call("job.submit", {"command": ["/bin/echo", f"{n}.{i}"], "queue": "held"}, timeout=30)
                    with lock:
                        ids.append(job["id"])
        except BaseException as error:  # reported below, in the test's thread
            with lock:
                errors.append(error)

    workers = [threading.Thread(target=submitter, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert errors == []
    assert len(ids) == len(set(ids)) == threads * per_thread

    kill9(daemon)
    start(daemon)
    jobs = all_jobs(daemon)
    assert sorted(job["id"] for job in jobs) == sorted(ids)
    assert {job["state"] for job in jobs} == {"queued"}
    assert queue_info(daemon, "held")["queued"] == threads * per_thread


@contextlib.contextmanager
def orphans_come_here() -> Iterator[None]:
    """Make the test process the subreaper of what a killed jobd leaves, as init is on a real machine (here init
    may leave orphans unreaped, and a zombie still shows its start time in /proc): the test then reaps them."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


PR_SET_CHILD_SUBREAPER = 36


def test_a_process_group_outliving_its_leader_is_killed_after_a_crash(
    jobd: Callable[..., Daemon], pidfds: Pidfds, tmp_path: Path
) -> None:
    # The leader ends after jobd's crash (here when the test says so; in life, of the SIGPIPE jobd's vanished
    # pipes give it) and is reaped; its background child lives on in the job's process group.
    outlived = (
        'if [ "$JOBD_ATTEMPT" -gt 1 ]; then exit 0; fi; '
        'sleep 600 & echo $! > "$0.child"; echo $$ > "$0.pid"; echo ready >&3; read line < "$1"'
    )
    base, release = tmp_path / "outlived", tmp_path / "release"
    os.mkfifo(release)
    with orphans_come_here():
        daemon = jobd()
        job_id = submit_running(
            daemon, command=["/bin/sh", "-c", outlived, str(base), str(release)], retry={"times": 1}
        )
        leader, child = read_pid(Path(f"{base}.pid")), read_pid(Path(f"{base}.child"))
        pidfds.watch("group child", child)

        kill9(daemon)
        with open(release, "w") as fifo:
            fifo.write("go\n")
        assert os.waitpid(leader, 0)[0] == leader  # orphaned to us: exited and reaped, its pid free
        assert pidfds.alive() == ["group child"]

        start(daemon)
        assert pidfds.wait_exited() == []  # the new daemon killed what was left of the group
        assert os.waitpid(child, 0)[0] == child
    job = daemon.wait(job_id)
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert [t["outcome"] for t in tries(daemon, job_id)] == ["lost", "succeeded"]


def test_a_full_database_disk_holds_a_job_end_until_there_is_room_again(
    jobd: Callable[..., Daemon], small_state_disk: Path, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    os.mkfifo(release)
    daemon = jobd("[queue.default]\nconcurrency = 1\n")
    assert daemon.state_dir == small_state_disk
    first = submit_running(daemon, command=["/bin/sh", "-c", 'echo ready >&3; read line < "$0"', str(release)])
    second = daemon.submit(command=["/bin/echo", "second"])["id"]
    pump = pump_of(daemon)
    pump.skip()
    filler = fill(small_state_disk)
    with open(release, "w") as fifo:
        fifo.write("go\n")
    # The end cannot be committed: jobd says so, keeps the slot, and starts nothing it could not record.
    status = pump.wait_for(lambda line: line.startswith("STATUS=") and "cannot record the end of job" in line)
    assert f"job {first}" in status, status
    assert daemon.call("daemon.status")["store_trouble"].startswith(f"cannot record the end of job {first}")
    assert daemon.call("job.get", {"id": second})["state"] == "queued"
    assert daemon.call("job.get", {"id": first})["state"] == "running"

    filler.unlink()  # room again: the next try commits, without a restart
    assert daemon.wait(first)["state"] == "succeeded"
    job = daemon.wait(second)
    assert job["state"] == "succeeded" and daemon.output(second) == "second\n"
    assert [t["number"] for t in tries(daemon, second)] == [1]
    assert daemon.call("daemon.status")["store_trouble"] is None
    third = daemon.submit(command=["/bin/true"])["id"]
    assert daemon.wait(third)["state"] == "succeeded"


def _stopped_and_changed(daemon: Daemon, statement: str) -> None:
    """Stop the daemon and run `statement` on its database (jobd holds it in exclusive mode while it runs)."""
    assert daemon.stop() == 0
    database = sqlite3.connect(daemon.state_dir / "jobd.sqlite3")
    database.execute(statement)
    database.commit()
    database.close()


def test_a_write_failed_by_jobds_bug_is_logged_as_one_not_told_as_the_disks_trouble(
    make_daemon: Callable[..., Daemon],
) -> None:
    # A write the engine could not make set store_trouble ("the database takes no writes", in daemon.status and
    # STATUS=) whatever the failure, jobd's own bugs too: an SQLITE_ERROR, a statement SQLite cannot prepare, on a
    # disk that takes every write. The statement here: the start of a job, into the attempt table whose column
    # pid_start was renamed while jobd was stopped (as a migration that lost it would leave the file). It is logged
    # once, with its traceback, as an internal error; nothing says the disk is in trouble; the jobs wait, queued as
    # recorded, and their start is tried again (STORE_RETRY_SECONDS) rather than made without a record.
    daemon = make_daemon("[queue.default]\n")
    _stopped_and_changed(daemon, 'ALTER TABLE "attempt" RENAME COLUMN "pid_start" TO "renamed"')
    daemon.start()
    first = daemon.submit(command=["/bin/true"])["id"]
    bug = (
        "internal error: cannot record the start of jobs of queue default: table attempt has no column named pid_start"
    )
    wait_for_log(daemon, bug)
    second = daemon.submit(command=["/bin/true"])["id"]  # the same write, failed the same way: logged once
    status = daemon.call("daemon.status")
    assert status["store_trouble"] is None and status["jobs"] == {"queued": 2}, status
    listed = [(job["id"], job["state"]) for job in daemon.call("job.list")["jobs"]]
    assert listed == [(second, "queued"), (first, "queued")], listed
    log = daemon.log()
    assert log.count(bug) == 1 and log.count("Traceback") == 1, log
    assert "sqlite3.OperationalError: table attempt has no column named pid_start" in log, log


def test_a_write_sqlite_has_no_memory_for_is_the_machines_trouble_not_jobds_bug(
    make_daemon: Callable[..., Daemon],
) -> None:
    # SQLite out of memory (SQLITE_NOMEM, raised by sqlite3 as MemoryError) was classed as a bug of jobd's: logged
    # with a traceback as an internal error, and daemon.status said nothing. It is a shortage, as a full disk is:
    # store_trouble says so until the write goes through. The shortage is real: jobd's address space is limited
    # (RLIMIT_AS, set on the running daemon) to less than a trigger on a job's end asks SQLite to allocate.
    daemon = make_daemon("[queue.default]\n")
    _stopped_and_changed(
        daemon,
        'CREATE TRIGGER "needs_400_mb" AFTER UPDATE OF "finished_at" ON "job" WHEN NEW."finished_at" IS NOT NULL '
        "BEGIN SELECT length(randomblob(400000000)); END",
    )
    daemon.start()
    with open(f"/proc/{daemon.pid}/stat") as stat:
        mapped = int(stat.read().rsplit(")", 1)[1].split()[20])  # vsize, in bytes
    resource.prlimit(daemon.pid, resource.RLIMIT_AS, (mapped + (128 << 20), resource.RLIM_INFINITY))
    job_id = daemon.submit(command=["/bin/true"])["id"]
    wait_for_log(daemon, f"cannot record the end of job {job_id}: ")
    status = daemon.call("daemon.status")
    trouble = "jobd ran out of memory using its database (see MemoryMax= and the kernel log)"
    assert status["store_trouble"] == f"cannot record the end of job {job_id}: {trouble}", status
    assert daemon.call("job.get", {"id": job_id})["state"] == "running"  # until its end is on record
    log = daemon.log()
    assert "internal error" not in log and "Traceback" not in log, log
    # Memory to spare: the next try goes through.
    resource.prlimit(daemon.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert daemon.wait(job_id)["state"] == "succeeded"
    assert daemon.call("daemon.status")["store_trouble"] is None


def test_a_stop_does_not_wait_for_a_job_end_that_jobds_bug_keeps_from_being_recorded(
    make_daemon: Callable[..., Daemon],
) -> None:
    # A job's end the store refuses keeps its slot and is tried again every STORE_RETRY_SECONDS, and a stop waits for
    # it: room may come on a full disk. A write refused for a bug of jobd's fails the same way at every try: the stop
    # waited for ever, until jobd was killed. It gives up on it instead, says so, and the next start finds the job as
    # the database holds it (running: its attempt lost), as after a crash. The bug: a trigger that fails the end of
    # every job with an SQLITE_ERROR ("malformed JSON"), added while jobd was stopped.
    daemon = make_daemon("[queue.default]\n")
    _stopped_and_changed(
        daemon,
        'CREATE TRIGGER "fails_every_end" AFTER UPDATE OF "finished_at" ON "job" WHEN NEW."finished_at" IS NOT NULL '
        "BEGIN SELECT json(NEW.\"state\" || '{'); END",
    )
    daemon.start()
    job_id = daemon.submit(command=["/bin/true"])["id"]
    wait_for_log(daemon, f"internal error: cannot record the end of job {job_id}: malformed JSON")
    assert daemon.call("job.get", {"id": job_id})["state"] == "running"  # until its end is on record
    assert daemon.stop() == 0
    assert f"cannot record the end of job {job_id} (malformed JSON): jobd stops without it" in daemon.log()
    database = sqlite3.connect(daemon.state_dir / "jobd.sqlite3")
    database.execute('DROP TRIGGER "fails_every_end"')
    database.commit()
    database.close()
    daemon.start()
    daemon.wait(job_id)
    assert [attempt["outcome"] for attempt in tries(daemon, job_id)] == ["lost"]


def test_a_bug_that_fails_every_jobs_end_is_logged_once_and_counted_by_daemon_status(
    jobd: Callable[..., Daemon],
) -> None:
    # A write failed by a bug of jobd's was logged once for each job ("the end of job 17", "... of job 18": one
    # entry kept for good in memory per job while the bug lasted) and daemon.status and STATUS= said nothing of the
    # writes tried again every STORE_RETRY_SECONDS. Now it is logged once for its kind of write and error, the
    # status counts the writes that fail until they go through, and the same bug coming back is logged again. The
    # bug: a trigger that fails every job's end with an SQLITE_ERROR ("malformed JSON") while a job waits in the
    # paused queue `bug` (jobd holds the database in exclusive mode: a client's request is the switch).
    daemon = jobd("[queue.default]\nconcurrency = 3\n[queue.bug]\npaused = true\n")
    _stopped_and_changed(
        daemon,
        'CREATE TRIGGER "fails_ends_while_bug" AFTER UPDATE OF "finished_at" ON "job" WHEN NEW."finished_at" IS NOT '
        """NULL AND EXISTS (SELECT 1 FROM "job" WHERE "queue" = 'bug' AND "state" = 'queued') """
        "BEGIN SELECT json(NEW.\"state\" || '{'); END",
    )
    pump = start(daemon)
    bug = daemon.submit(command=["/bin/true"], queue="bug")["id"]
    ends = [daemon.submit(command=["/bin/true"])["id"] for _ in range(3)]
    line = pump.wait_for(lambda line: line.startswith("STATUS=") and "3 writes failing" in line)
    assert "internal error (see the log): 3 writes failing, the first: cannot record the end of job " in line, line
    assert line.endswith(": OperationalError: malformed JSON"), line
    status = daemon.call("daemon.status")
    failing = status["store_internal_error"]
    assert failing["writes"] == 3 and failing["error"].startswith("cannot record the end of job "), status
    assert status["store_trouble"] is None, status
    told = "internal error: cannot record the end of job "
    log = daemon.log()
    assert log.count(told) == 1 and log.count("Traceback") == 1, log  # the first job's, not the others'

    daemon.call("job.cancel", {"id": bug})  # the bug mended: the next tries go through
    assert [daemon.wait(job_id)["state"] for job_id in ends] == ["succeeded"] * 3
    pump.wait_for(lambda line: line.startswith("STATUS=") and "internal error" not in line)
    assert daemon.call("daemon.status")["store_internal_error"] is None

    daemon.submit(command=["/bin/true"], queue="bug")  # the same bug back: told again
    again = daemon.submit(command=["/bin/true"])["id"]
    wait_for_log(daemon, f"{told}{again}: malformed JSON")
    assert daemon.log().count(told) == 2
    assert daemon.call("daemon.status")["store_internal_error"] == {
        "writes": 1,
        "error": f"cannot record the end of job {again}: OperationalError: malformed JSON",
    }


def _refused_for_a_full_disk(daemon: Daemon, method: str, params: dict[str, Any]) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        daemon.call(method, params)
    assert info.value.code == "STORE_FAILED", info.value
    assert "database or disk is full" in info.value.message
    return info.value


def _not_written(daemon: Daemon) -> str:
    """What a write refused for a full disk says: its database named, as the daemon opened it (the file whose disk
    to look at), and SQLite's words."""
    return f"jobd could not write its database {daemon.state_dir / 'jobd.sqlite3'} (database or disk is full)"


def exhaust(daemon: Daemon, small_state_disk: Path) -> Path:
    """Fill the disk, then submit into a paused queue until jobd's WAL has no room left either: from then on every
    write fails. Returns the filler file (unlink it to make room again)."""
    filler = fill(small_state_disk)
    for _ in range(10_000):
        try:
            daemon.submit(command=["/bin/true"], queue="held")
        except RemoteError as error:
            assert error.code == "STORE_FAILED", error
            return filler
    raise AssertionError("the full disk never refused a submit")


def test_an_api_pause_jobd_could_not_forget_does_not_pause_its_queue_added_again(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    """A reload that removes a queue drops the record of its API pause; on a full disk that write failed, the stale
    record stayed, and the next reload applied it to the queue added again under that name: it started paused,
    holding its jobs, though neither its file nor any client had paused it since."""
    queues = "[queue.held]\npaused = true\n"
    daemon = jobd(queues + "[queue.q]\n")
    daemon.call("queue.pause", {"name": "q"})
    filler = exhaust(daemon, small_state_disk)
    daemon.write_config(queues)
    daemon.call("daemon.reload")
    assert "queue q: cannot forget its API pause" in daemon.log()
    daemon.write_config(queues + "[queue.q]\n")
    daemon.call("daemon.reload")
    [q] = [queue for queue in daemon.call("queue.list")["queues"] if queue["name"] == "q"]
    assert not q["paused"], q
    filler.unlink()
    daemon.call("daemon.reload")  # the record is dropped now that there is room
    assert daemon.wait(daemon.submit(command=["/bin/true"], queue="q")["id"])["state"] == "succeeded"
    assert daemon.stop() == 0
    start(daemon)
    [q] = [queue for queue in daemon.call("queue.list")["queues"] if queue["name"] == "q"]
    assert not q["paused"], q


def test_writes_on_a_full_database_disk_are_refused_and_change_nothing(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n")
    assert daemon.state_dir == small_state_disk
    held = daemon.submit(command=["/bin/echo", "held"], queue="held")["id"]
    filler = exhaust(daemon, small_state_disk)
    submitted = daemon.call("job.list", {"queue": "held", "limit": 1000})["jobs"]

    # Each write is refused with STORE_FAILED, a code a client can act on, and leaves things as they were.
    _refused_for_a_full_disk(daemon, "job.cancel", {"id": held})
    assert daemon.call("job.get", {"id": held})["state"] == "queued"
    _refused_for_a_full_disk(daemon, "queue.pause", {"name": "default"})
    _refused_for_a_full_disk(daemon, "queue.resume", {"name": "held"})
    queues = {q["name"]: q for q in daemon.call("queue.list")["queues"]}
    assert (queues["default"]["paused"], queues["held"]["paused"]) == (False, True)
    _refused_for_a_full_disk(daemon, "job.submit", {"command": ["/bin/true"]})
    assert daemon.call("job.list", {"queue": "held", "limit": 1000})["jobs"] == submitted
    log = daemon.log()
    assert f"job.cancel: {_not_written(daemon)}" in log
    assert "internal error" not in log and "Traceback" not in log
    # daemon.status and STATUS= say why, though jobd itself has nothing to write (it said nothing while it refused).
    trouble = f"job.submit: {_not_written(daemon)}"
    assert daemon.call("daemon.status")["store_trouble"] == trouble
    pump_of(daemon).wait_for(lambda line: line.startswith("STATUS=") and trouble in line)

    filler.unlink()  # room again: the same requests go through, and the job whose cancel failed is still queued
    daemon.call("queue.resume", {"name": "held"})
    assert daemon.call("daemon.status")["store_trouble"] is None
    job = daemon.wait(held)
    assert job["state"] == "succeeded" and daemon.output(held) == "held\n"
    daemon.call("queue.pause", {"name": "default"})
    assert {q["name"]: q["paused"] for q in daemon.call("queue.list")["queues"]}["default"] is True


def test_requests_refused_on_a_full_database_disk_are_logged_once_not_each(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # Each refusal was one ERROR line: clients that go on submitting on a full disk made thousands a second, and
    # journald, past its rate limit, dropped jobd's other lines (the one saying the disk takes writes again among them).
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n")
    filler = exhaust(daemon, small_state_disk)  # its last submit was refused
    with daemon.client() as client:
        for _ in range(50):
            with pytest.raises(RemoteError) as info:
                client.call("job.submit", {"command": ["/bin/true"]})
            assert info.value.code == "STORE_FAILED"
    _refused_for_a_full_disk(daemon, "queue.pause", {"name": "default"})  # another request: said once too
    log = daemon.log()
    assert log.count(f"job.submit: {_not_written(daemon)}") == 1, log
    assert log.count(f"queue.pause: {_not_written(daemon)}") == 1, log
    filler.unlink()
    assert daemon.wait(daemon.submit(command=["/bin/true"])["id"])["state"] == "succeeded"


def test_writes_after_the_database_file_was_deleted_are_refused_not_answered_as_saved(
    jobd: Callable[..., Daemon],
) -> None:
    # SQLite goes on writing into a deleted file: with the state directory removed under a running jobd (by hand, by
    # a cleaning tool), every submit was answered as accepted while none of them existed after the next start.
    daemon = jobd("[queue.default]\nconcurrency = 1\n")
    first = daemon.submit(command=["/bin/echo", "before"])["id"]
    assert daemon.wait(first)["state"] == "succeeded"
    shutil.rmtree(daemon.state_dir)
    with pytest.raises(RemoteError) as info:
        daemon.submit(command=["/bin/echo", "after"])
    assert info.value.code == "STORE_FAILED", info.value
    assert f"its file {daemon.state_dir / 'jobd.sqlite3'} was deleted while jobd ran" in info.value.message
    assert "restart jobd" in info.value.message
    assert daemon.call("job.get", {"id": first})["state"] == "succeeded"  # what it holds can still be read
    assert terminate(daemon) == 0
    # The next start makes a new database: the job the refused submit would have added is not in it, as it said.
    start(daemon)
    assert daemon.call("job.list")["jobs"] == []


def test_a_stop_after_the_database_file_was_deleted_does_not_wait_for_records_it_cannot_make(
    jobd: Callable[..., Daemon], tmp_path: Path
) -> None:
    # A stop waits for the ends a full disk keeps from being recorded, until there is room. With the database file
    # deleted there never is: the stop the error message asks for ("restart jobd") never ended, and jobd had to be
    # killed. Both kinds: a job that ended after the deletion, and one the stop itself ends.
    daemon = jobd("[queue.default]\nconcurrency = 2\n")
    gate = Gate(tmp_path / "gate")
    events = daemon.client()
    events.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
    ended = daemon.submit(command=gated(gate))["id"]
    stopped = daemon.submit(command=["/bin/sleep", "100"])["id"]
    wait_events(events, lambda e: e["job"]["state"] == "running", 2)
    events.close()
    shutil.rmtree(daemon.state_dir)
    gate.release()
    wait_for_log(daemon, f"cannot record the end of job {ended}: its file")
    try:
        code = terminate(daemon)
    except subprocess.TimeoutExpired:
        kill9(daemon)
        raise AssertionError(f"jobd did not stop; its log ends:\n{daemon.log()[-2000:]}") from None
    assert code == 0
    for job_id in (ended, stopped):
        assert f"cannot record the end of job {job_id} (its file" in daemon.log()
    assert "jobd stops without it" in daemon.log()


def test_a_database_file_replaced_by_a_rename_is_refused_as_a_deleted_one_and_a_chmod_is_not(
    jobd: Callable[..., Daemon], tmp_path: Path
) -> None:
    # jobd hears of a deletion from the kernel (inotify's IN_ATTRIB on the file) instead of an fstat() before each
    # write: a chmod sends the same event, and must not be taken for a deletion; a rename over the file is one.
    daemon = jobd("[queue.default]\nconcurrency = 1\n")
    database = daemon.state_dir / "jobd.sqlite3"
    os.chmod(database, 0o600)
    first = daemon.submit(command=["/bin/echo", "before"])["id"]
    assert daemon.wait(first)["state"] == "succeeded"
    other = tmp_path / "other.sqlite3"
    other.write_bytes(b"")
    shutil.copymode(database, other)
    os.rename(other, database)
    with pytest.raises(RemoteError) as info:
        daemon.submit(command=["/bin/echo", "after"])
    assert info.value.code == "STORE_FAILED", info.value
    assert f"its file {database} was replaced by another while jobd ran" in info.value.message
    assert daemon.call("job.get", {"id": first})["state"] == "succeeded"


def test_a_callback_try_ended_on_a_full_database_disk_is_recorded_and_retried_once_there_is_room(
    jobd: Callable[..., Daemon], small_state_disk: Path, tmp_path: Path
) -> None:
    # The record of a callback's try raised out of its delivery task when the store refused it: the delivery was
    # neither recorded nor tried again in this run of jobd ("Task exception was never retrieved" in the log).
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n")
    assert daemon.state_dir == small_state_disk
    started, gate = tmp_path / "started", tmp_path / "gate"
    os.mkfifo(started)
    os.mkfifo(gate)
    # Each try says its number, then waits for the gate, then fails.
    script = f'echo "$JOBD_CALLBACK_TRY" > {started}; read x < {gate}; exit 1'
    job = daemon.submit(command=["/bin/true"], callbacks={"on_finish": [{"exec": ["/bin/sh", "-c", script]}]})["id"]
    with open(started) as told:
        assert told.read() == "1\n"
    filler = exhaust(daemon, small_state_disk)
    with open(gate, "w") as opened:
        opened.write("go\n")  # the first try fails now, on a full disk
    wait_for_log(daemon, f"job={job} on_finish callback")
    wait_for_log(daemon, "cannot record its try 1")
    filler.unlink()
    reader = os.open(started, os.O_RDONLY | os.O_NONBLOCK)  # a deadline for the second try, rather than a hang
    try:
        assert select.select([reader], [], [], 30)[0], "the callback was not tried again"
        assert os.read(reader, 100) == b"2\n"
    finally:
        os.close(reader)
    with open(gate, "w") as opened:
        opened.write("go\n")
    assert terminate(daemon) == 0
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db:
        assert db.execute("SELECT tries, state FROM callback").fetchall() == [(2, "pending")]
    assert "Traceback" not in daemon.log() and "never retrieved" not in daemon.log()


def test_a_delay_that_ends_on_a_full_database_disk_waits_for_room(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # Before, the delay's timer was forgotten when the write failed: the job stayed delayed for good, and a cancel
    # of it failed with an internal error.
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n")
    assert daemon.state_dir == small_state_disk
    pump = pump_of(daemon)
    late = daemon.submit(command=["/bin/echo", "late"], delay=8)["id"]  # due well after the disk is exhausted
    other = daemon.submit(command=["/bin/true"], delay=8)["id"]
    filler = exhaust(daemon, small_state_disk)
    pump.skip()
    status = pump.wait_for(lambda line: line.startswith("STATUS=") and "is due: database or disk is full" in line)
    assert f"cannot record that job {late} is due" in daemon.log(), status
    assert daemon.log().count(f"cannot record that job {late} is due") == 1  # said once, not at every retry
    assert daemon.call("job.get", {"id": late})["state"] == "delayed"
    _refused_for_a_full_disk(daemon, "job.cancel", {"id": other})

    filler.unlink()
    job = daemon.wait(late)
    assert job["state"] == "succeeded" and daemon.output(late) == "late\n"
    assert daemon.wait(other)["state"] == "succeeded"  # its cancel was refused: it ran once its time came


def test_history_expiry_on_a_full_database_disk_waits_for_room(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # Before, the failed deletion raised out of the expiry timer's callback (a traceback in the log) and the timer
    # was not set again: the expired jobs stayed until some later job finished.
    history = "history = { keep_days = 0.00006 }"  # 5.2 s
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n", history)
    assert daemon.state_dir == small_state_disk
    old = daemon.submit(command=["/bin/true"])["id"]
    daemon.wait(old)
    filler = exhaust(daemon, small_state_disk)  # well before the 5.2 s are over
    wait_for_log(
        daemon,
        "cannot expire finished jobs, ended instances or audit entries from the history: database or disk is full",
    )
    assert daemon.call("job.get", {"id": old})["state"] == "succeeded"

    filler.unlink()
    wait_for_log(daemon, "the store takes writes again")  # from the expiry's own retry: nothing else writes
    with pytest.raises(RemoteError) as gone:
        daemon.call("job.get", {"id": old})
    assert gone.value.code == "UNKNOWN_JOB"
    assert "Traceback" not in daemon.log()


def test_audit_entries_wait_for_room_on_a_full_database_disk(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # Before, the entries that could not be written were dropped with one log line: a reload made on a full disk,
    # and the submits refused there, were never in the audit log.
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n")
    assert daemon.state_dir == small_state_disk
    filler = exhaust(daemon, small_state_disk)
    _refused_for_a_full_disk(daemon, "job.submit", {"command": ["/bin/true"]})
    daemon.call("daemon.reload")  # a reload writes nothing: it works on a full disk
    wait_for_log(daemon, "audit log entries wait: cannot write the database: database or disk is full")
    _refused_for_a_full_disk(daemon, "audit.list", {})  # reading it writes what waits first, and cannot yet

    filler.unlink()
    wait_for_log(daemon, "the audit log is written again")  # from its own next try: nothing else writes
    entries = daemon.call("audit.list", {"limit": 2})["entries"]  # newest first; reads are not recorded
    assert [(entry["command"], entry["result"]) for entry in entries] == [
        ("daemon.reload", "ok"),
        ("job.submit", "STORE_FAILED"),
    ], entries
    assert "entries lost" not in daemon.log() and "Traceback" not in daemon.log()


# A program that cannot be started and whose failed start takes far more room to record than its start: the start's
# commit rewrites the job's row, which holds the command (~210 KB in the WAL); the failed start's rewrites that row
# with the error, which names the program, and writes the attempt's row with that error again (~310 KB). Longer
# than PATH_MAX, so that execve() refuses it at once.
UNSTARTABLE = "/" + "n" * 100_000
UNSTARTABLE_WHY = f"cannot start {UNSTARTABLE!r}: File name too long"


def a_failed_start_waiting_for_room(daemon: Daemon, small_state_disk: Path) -> tuple[int, Path]:
    """A job that could not start, on a disk with room to commit its start and not its failed start: its id, and the
    filler file (unlink it to make room). `daemon` has the paused queues `held` and `later`."""
    job_id: int = daemon.submit(command=[UNSTARTABLE, "argument"], queue="later")["id"]
    filler = exhaust(daemon, small_state_disk)
    os.truncate(filler, filler.stat().st_size - 360 * 1024)
    daemon.call("queue.resume", {"name": "later"})  # a small write; then the start's, then the failed start's
    wait_for_log(daemon, f"cannot record that job {job_id} could not start: database or disk is full")
    return job_id, filler


FAILED_START_QUEUES = """
[queue.held]
paused = true
[queue.later]
concurrency = 1
paused = true
"""


def test_a_failed_start_on_a_full_database_disk_is_recorded_once_there_is_room(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # No test reached this path before. job.get then showed the job `running`, with nothing to say that no process
    # ran.
    daemon = jobd(FAILED_START_QUEUES)
    assert daemon.state_dir == small_state_disk
    job_id, filler = a_failed_start_waiting_for_room(daemon, small_state_disk)

    # The record says `running` until the store takes the failed start: job.get says so too (job.wait waits, the
    # job keeps its slot), and its error says that nothing runs, why, and that it is not recorded yet.
    waiting = daemon.call("job.get", {"id": job_id})
    assert waiting["state"] == "running", waiting["state"]
    assert waiting["error"] == (
        f"{UNSTARTABLE_WHY} (not recorded yet: database or disk is full; jobd tries again every 2s)"
    ), str(waiting["error"])[-200:]
    assert [(t["outcome"], t["pid"]) for t in waiting["tries"]] == [(None, None)]
    assert daemon.call("daemon.status")["store_trouble"] == (
        f"cannot record that job {job_id} could not start: database or disk is full"
    )
    _refused_for_a_full_disk(daemon, "job.cancel", {"id": job_id})  # nothing to stop, and its end is not recorded

    filler.unlink()  # room again: the next try records it, without a restart
    job = daemon.wait(job_id)
    assert (job["state"], job["attempts"], job["error"] == UNSTARTABLE_WHY) == ("failed", 1, True), str(job["error"])[
        -200:
    ]
    [attempt] = tries(daemon, job_id)
    assert (attempt["outcome"], attempt["pid"], attempt["error"] == UNSTARTABLE_WHY) == ("spawn_error", None, True)
    # The attempt says when the start failed; the job's finished_at is when its end was recorded, as for every job
    # (the order in which a workflow instance heard of its jobs' ends: see Instances._replay).
    assert attempt["finished_at"] == attempt["started_at"] and job["finished_at"] >= attempt["finished_at"]
    after = daemon.submit(command=["/bin/echo", "after"], queue="later")["id"]  # its slot is free again
    assert daemon.wait(after)["state"] == "succeeded" and daemon.output(after) == "after\n"
    log = daemon.log()
    assert log.count(f"job={job_id} cannot start:") == 1 and log.count(f"job={job_id} failed (attempt 1") == 1
    assert "Traceback" not in log

    recorded = daemon.call("job.get", {"id": job_id})
    assert recorded == {**job, "tries": [attempt]}
    terminate(daemon)
    start(daemon)
    assert daemon.call("job.get", {"id": job_id}) == recorded  # as the database holds it: nothing else happens
    assert [j["id"] for j in daemon.call("job.list", {"queue": "later"})["jobs"]] == [after, job_id]


def test_a_stop_waits_for_a_failed_start_to_be_recorded(jobd: Callable[..., Daemon], small_state_disk: Path) -> None:
    # Before, jobd stopped at once and left the job `running` on record: the next start took its attempt for one
    # that was running when jobd died, and the job failed as `lost` ("jobd stopped while the attempt ran").
    daemon = jobd(FAILED_START_QUEUES)
    job_id, filler = a_failed_start_waiting_for_room(daemon, small_state_disk)
    pump = pump_of(daemon)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    pump.wait_for("STOPPING=1")
    filler.unlink()  # jobd waits for room, as for a job's end, and stops once the failed start is recorded
    assert daemon.process.wait(30) == 0, daemon.log()[-2000:]
    pump.stop()
    daemon.stop()

    start(daemon)
    job = daemon.call("job.get", {"id": job_id})
    assert (job["state"], job["error"] == UNSTARTABLE_WHY) == ("failed", True), str(job["error"])[-200:]
    assert [t["outcome"] for t in job["tries"]] == ["spawn_error"]


PARKED = (
    '<workflow><subjobs><job name="one"><tasks><task name="t" path="/bin/true" '
    'queue="held"/></tasks></job></subjobs></workflow>'
)


def a_parked_instance(daemon: Daemon) -> tuple[int, int]:
    """An instance whose one task's job waits in the paused queue `held`: the instance's id and that job's."""
    daemon.write_workflows(parked=PARKED)
    daemon.call("daemon.reload")
    instance: int = daemon.call("instance.launch", {"workflow": "parked"})["id"]
    [task_job] = daemon.call("job.list", {"queue": "held"})["jobs"]
    return instance, task_job["id"]


def _cancel_refused_for_want_of_room(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> tuple[Daemon, int, int, Path, RemoteError]:
    """A parked instance cancelled on a full database disk: the daemon, the instance, its task's job, the file that
    fills the disk, and the cancel's STORE_FAILED."""
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n")
    instance, task_job = a_parked_instance(daemon)
    filler = exhaust(daemon, small_state_disk)
    refused = _refused_for_a_full_disk(daemon, "instance.cancel", {"id": instance})
    assert (refused.data["id"], refused.data["in_effect"]) == (instance, True), refused.data
    return daemon, instance, task_job, filler, refused


def test_an_instance_cancelled_on_a_full_database_disk_ends_and_its_task_job_goes(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # Before, the cancel answered STORE_FAILED after forgetting the instance (it stayed EXECUTING in the
    # database), and its task's job, whose cancel failed in the background, stayed queued and later ran. Then it
    # was answered OK, though not saved: a stop or a crash before there was room forgot it, unknown to the client.
    # Now the client is told, by STORE_FAILED, that the cancel is in effect and not saved yet.
    daemon, instance, task_job, filler, refused = _cancel_refused_for_want_of_room(jobd, small_state_disk)
    assert refused.message.startswith(
        f"instance {instance} is cancelled, but jobd could not save that (database or disk is full). The cancel is "
        "in effect"
    ), refused.message
    assert "a cancel asked again answers OK once it is" in refused.message
    assert "Should jobd stop or crash before then, its next start resumes the instance" in refused.message
    assert daemon.call("instance.get", {"id": instance})["status"] == "TERMINATED"  # in effect
    assert daemon.call("job.get", {"id": task_job})["state"] == "queued"  # its cancel waits for room
    _refused_for_a_full_disk(daemon, "instance.cancel", {"id": instance})  # asked again: still not saved
    over_evqueue = evqueue_exchange(daemon, f'<instance action="cancel" id="{instance}" />'.encode())
    assert (over_evqueue.get("status"), over_evqueue.get("error-code")) == ("KO", "STORE_FAILED")
    assert "is cancelled, but jobd could not save that" in over_evqueue.get("error", "")

    filler.unlink()
    assert daemon.wait(task_job)["state"] == "cancelled"
    wait_for_log(daemon, "workflow instances are saved again")
    assert daemon.call("instance.cancel", {"id": instance})["status"] == "TERMINATED"  # saved now: OK
    with pytest.raises(RemoteError) as again:  # and as for any ended instance from then on
        daemon.call("instance.cancel", {"id": instance})
    assert again.value.code == "INVALID_PARAMS" and "has already ended (TERMINATED)" in again.value.message
    daemon.call("queue.resume", {"name": "held"})  # the jobs exhaust() left run; the task's does not
    log = daemon.log()
    assert "workflow instances cannot be saved: database or disk is full" in log
    assert "Traceback" not in log and "never retrieved" not in log
    terminate(daemon)
    start(daemon)
    assert daemon.call("instance.get", {"id": instance})["status"] == "TERMINATED"  # saved once there was room
    assert daemon.call("job.get", {"id": task_job})["state"] == "cancelled"


def test_a_cancel_not_saved_for_want_of_room_is_lost_to_a_crash_as_its_answer_said(
    jobd: Callable[..., Daemon], small_state_disk: Path
) -> None:
    # What the STORE_FAILED answer of the test above warns of: the instance resumes as it was last saved.
    daemon, instance, task_job, filler, _ = _cancel_refused_for_want_of_room(jobd, small_state_disk)
    kill9(daemon)
    filler.unlink()
    start(daemon)
    assert daemon.call("instance.get", {"id": instance})["status"] == "EXECUTING"
    assert daemon.call("job.get", {"id": task_job})["state"] == "queued"
    assert daemon.call("instance.cancel", {"id": instance})["status"] == "TERMINATED"  # with room, as usual
    assert daemon.wait(task_job)["state"] == "cancelled"


def test_a_cancel_under_way_when_jobd_dies_is_carried_out_after_the_restart(
    jobd: Callable[..., Daemon], pidfds: Pidfds, tmp_path: Path
) -> None:
    """The job takes SIGTERM as a note on fd 3 and goes on: jobd is killed during its kill_grace. The restart kills
    it and records the attempt `killed`, as the cancel would have (it was recorded `lost`, as if nothing had stopped
    it), and the job ends `cancelled`, not retried."""
    slow_to_die = "trap 'echo got TERM >&3' TERM; echo $$ > \"$0.pid\"; echo ready >&3; while :; do sleep 1; done"
    base = tmp_path / "slow"
    daemon = jobd()
    events = subscribe(daemon, ["job.log"])
    job_id = daemon.submit(command=["/bin/sh", "-c", slow_to_die, str(base)], retry={"times": 3}, kill_grace=60)["id"]
    wait_ready_lines(events, 1)
    pidfds.watch("leader", read_pid(Path(f"{base}.pid")))
    with daemon.client() as canceller:  # job.cancel answers once the job has ended: not waited for here
        canceller.send_raw(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "job.cancel", "params": {"id": job_id}}).encode() + b"\n"
        )
        wait_events(events, lambda e: e["type"] == "job.log" and e["line"] == "got TERM", 1)
        events.close()
        kill9(daemon)

    start(daemon)
    assert pidfds.wait_exited() == []
    job = daemon.wait(job_id)
    assert (job["state"], job["attempts"]) == ("cancelled", 1), job  # not retried
    [attempt] = tries(daemon, job_id)
    assert attempt["outcome"] == "killed", attempt
    assert attempt["error"] == "jobd stopped while a cancel stopped the attempt", attempt


def test_a_time_limit_under_way_when_jobd_dies_ends_the_job_timed_out_after_the_restart(
    jobd: Callable[..., Daemon], pidfds: Pidfds, tmp_path: Path
) -> None:
    """The time limit had fired (SIGTERM sent, kill_grace running) when jobd was killed: the restart records the
    attempt `timed_out`, as the stop under way would have, and the job ends `timed_out` (it ended `failed`, its
    attempt `lost`, as if nothing had stopped it)."""
    slow_to_die = "trap 'echo got TERM >&3' TERM; echo $$ > \"$0.pid\"; echo ready >&3; while :; do sleep 1; done"
    base = tmp_path / "slow"
    daemon = jobd()
    events = subscribe(daemon, ["job.log"])
    job_id = daemon.submit(command=["/bin/sh", "-c", slow_to_die, str(base)], timeout=0.5, kill_grace=60)["id"]
    wait_ready_lines(events, 1)
    pidfds.watch("leader", read_pid(Path(f"{base}.pid")))
    wait_events(events, lambda e: e["type"] == "job.log" and e["line"] == "got TERM", 1)  # the time limit's SIGTERM
    events.close()
    kill9(daemon)

    start(daemon)
    assert pidfds.wait_exited() == []
    job = daemon.wait(job_id)
    assert (job["state"], job["attempts"]) == ("timed_out", 1), job
    [attempt] = tries(daemon, job_id)
    assert attempt["outcome"] == "timed_out", attempt
    assert attempt["error"] == "jobd stopped while its time limit stopped the attempt", attempt


# --- SIGTERM ------------------------------------------------------------------------------------------------


def test_sigterm_stops_running_job_and_requeues_it(jobd: Callable[..., Daemon], pidfds: Pidfds, tmp_path: Path) -> None:
    record = tmp_path / "record"
    trap = (
        'if [ "$JOBD_ATTEMPT" -gt 1 ]; then echo "attempt $JOBD_ATTEMPT" >> "$0"; exit 0; fi; '
        'trap \'echo "got TERM" >> "$0"; exit 0\' TERM; '
        'sleep 600 & echo $! > "$0.child"; echo ready >&3; wait'
    )
    daemon = jobd()
    job_id = submit_running(daemon, command=["/bin/sh", "-c", trap, str(record)])
    pidfds.watch("background sleep", read_pid(Path(f"{record}.child")))

    assert terminate(daemon) == 0  # waits for STOPPING=1, then for the exit
    assert record.read_text() == "got TERM\n"
    assert pidfds.wait_exited() == []  # the SIGTERM went to the whole process group

    start(daemon)
    job = daemon.wait(job_id)
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert [t["outcome"] for t in tries(daemon, job_id)] == ["killed", "succeeded"]
    assert record.read_text() == "got TERM\nattempt 2\n"


def test_sigterm_kills_a_leader_ignoring_it_after_kill_grace(jobd: Callable[..., Daemon], pidfds: Pidfds) -> None:
    stubborn = 'if [ "$JOBD_ATTEMPT" -gt 1 ]; then exit 0; fi; trap "" TERM; echo ready >&3; exec sleep 600'
    daemon = jobd()
    job_id = submit_running(daemon, command=["/bin/sh", "-c", stubborn])
    pidfds.watch("leader", tries(daemon, job_id)[0]["pid"])

    assert terminate(daemon, timeout=20) == 0  # kill_grace is 2 s in the harness
    assert pidfds.alive() == []

    start(daemon)
    first = tries(daemon, job_id)[0]
    assert (first["outcome"], first["signal"], first["exit_code"]) == ("killed", 9, None), first
    job = daemon.wait(job_id)
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job


def test_requests_still_waiting_at_a_stop_are_answered_shutting_down(jobd: Callable[..., Daemon]) -> None:
    """A client waiting in job.wait for a job the stop leaves unfinished (delayed, or running and put back in its
    queue) hears why its connection ends: the error SHUTTING_DOWN, not only the end of the connection. A job.output
    that waits for the running attempt gets that attempt's end, as always."""
    daemon = jobd()
    delayed = daemon.submit(command=["/bin/true"], delay=3600)["id"]
    running = submit_running(daemon, command=["/bin/sh", "-c", "echo ready >&3; exec sleep 600"])
    waiters = []
    for method, params in (
        ("job.wait", {"id": delayed}),
        ("job.wait", {"id": running}),
        ("job.output", {"id": running, "stream": "stdout", "wait": True}),
    ):
        client = daemon.client()
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        client.send_raw(json.dumps(request).encode() + b"\n")
        client.call("ping")  # answered after the request above was read: it waits in jobd now
        waiters.append(client)
    assert terminate(daemon) == 0
    replies = [client.read_line(timeout=10) for client in waiters]
    for client in waiters:
        client.close()
    assert [reply.get("error", {}).get("data", {}).get("code") for reply in replies[:2]] == ["SHUTTING_DOWN"] * 2
    assert replies[2]["result"]["complete"] is True, replies[2]
    start(daemon)
    assert daemon.call("job.get", {"id": delayed})["state"] == "delayed"  # kept as it was
    assert tries(daemon, running)[0]["outcome"] == "killed"  # stopped by the stop, and run again at this start


def test_a_batch_still_waiting_at_a_stop_is_answered(jobd: Callable[..., Daemon]) -> None:
    """A batch is answered once all its members are done: a member waiting at the stop is answered SHUTTING_DOWN,
    and the batch's answer holds it beside the others'."""
    daemon = jobd()
    delayed = daemon.submit(command=["/bin/true"], delay=3600)["id"]
    client = daemon.client()
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "job.wait", "params": {"id": delayed}},
        {"jsonrpc": "2.0", "id": 2, "method": "ping"},
    ]
    client.send_raw(json.dumps(batch).encode() + b"\n")
    client.call("ping")  # answered after the batch was read: its wait waits in jobd now
    assert terminate(daemon) == 0
    answer = client.read_line(timeout=10)
    client.close()
    assert isinstance(answer, list), answer
    by_id = {member["id"]: member for member in answer}
    assert by_id[1]["error"]["data"]["code"] == "SHUTTING_DOWN", answer
    assert by_id[2]["result"]["pong"] is True, answer


def test_an_http_wait_neither_holds_up_the_stop_nor_keeps_the_jobs_running(jobd: Callable[..., Daemon]) -> None:
    """The HTTP listener used to be closed first, and closing waits for the requests in flight: a job.wait there
    kept the running jobs going, unstopped, for up to a minute. The jobs are stopped first; the wait is answered
    SHUTTING_DOWN (409)."""
    token = "stop-test-token"
    sha = hashlib.sha256(token.encode()).hexdigest()
    daemon = jobd(f'[http]\nlisten = "127.0.0.1:0"\n[http.tokens.ops]\ntoken_sha256 = "{sha}"\nadmin = true\n')
    running = submit_running(daemon, command=["/bin/sh", "-c", "echo ready >&3; exec sleep 600"])
    host, port = daemon.call("daemon.status")["http_listen"].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    connection.request("POST", "/api/job.wait", json.dumps({"id": running}), headers)
    # Sent: jobd reads it while the stop waits out the job's kill_grace at the latest, and it waits (the job would
    # run 600 s); no reply can come before the stop.
    assert terminate(daemon) == 0  # within the harness's 30 s: the job was stopped, not waited for
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 409 and body["error"]["code"] == "SHUTTING_DOWN", (response.status, body)
    start(daemon)
    assert tries(daemon, running)[0]["outcome"] == "killed"


# Stands in for tomllib: its first loads() (jobd reading its configuration in main(), past its first lines and
# before it is ready) waits on a FIFO the test opens; everything else is the real module's.
TOML_GATE_SHIM = """
import os, sys
shim = sys.modules["tomllib"]
sys.path.remove(os.path.dirname(__file__))
del sys.modules["tomllib"]
import tomllib as real
held = [True]


def loads(text, **options):
    if held:
        held.clear()
        with open(os.environ["JOBD_TEST_TOML_GATE"]) as gate:
            gate.read()
    return real.loads(text, **options)


load, TOMLDecodeError = real.load, real.TOMLDecodeError
sys.modules["tomllib"] = shim
"""


def signal_while_starting(
    daemon: Daemon, number: int | None, tmp_path: Path, later_config: str = ""
) -> threading.Thread:
    """Starting `daemon` blocks in its first parse of the configuration; meanwhile a drop-in with `later_config`
    is written (too late for that first reading, which listed and read its files before parsing) and `number` is
    sent (None: no signal), then jobd is let go on."""
    gate, shim = tmp_path / "toml-gate", tmp_path / "toml-shim"
    os.mkfifo(gate)
    shim.mkdir()
    (shim / "tomllib.py").write_text(TOML_GATE_SHIM)
    daemon.env.update(PYTHONPATH=str(shim), JOBD_TEST_TOML_GATE=str(gate))

    def answer() -> None:
        with open(gate, "w"):  # returns once jobd opened it: in main(), reading its configuration, not ready
            if later_config:
                later = daemon.config_dir / "jobd.d" / ".50-later.toml.new"
                later.write_text(later_config)
                os.replace(later, daemon.config_dir / "jobd.d" / "50-later.toml")
            assert daemon.process is not None
            if number is not None:
                daemon.process.send_signal(number)

    thread = threading.Thread(target=answer)
    thread.start()
    return thread


def test_a_sighup_while_starting_reloads_once_ready(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = make_daemon(start=False)
    later = '[task.later]\ncommand = ["/bin/echo", "reloaded"]\n'  # only a reading after the start can see it
    answering = signal_while_starting(daemon, signal.SIGHUP, tmp_path, later)
    pump = start(daemon)  # waits for READY=1: the SIGHUP did not kill jobd
    answering.join()
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    job = daemon.wait(daemon.submit(task="later")["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "reloaded\n"
    pump.stop()


def test_a_drop_in_written_while_starting_is_applied_once_ready(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """inotify alone, no signal: a file saved while jobd starts (a long recovery, say) after it read its
    configuration was never applied, since the directories were watched only from READY=1 on."""
    daemon = make_daemon(start=False)
    later = '[task.later]\ncommand = ["/bin/echo", "seen"]\n'
    answering = signal_while_starting(daemon, None, tmp_path, later)
    pump = start(daemon)
    answering.join()
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    job = daemon.wait(daemon.submit(task="later")["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "seen\n"
    pump.stop()


# Stands in for sdnotify, which jobd.daemon imports: holds the import on a FIFO the test opens, then hands over the
# real module. So the test knows jobd is inside the imports of its start-up (past jobd.early_signals).
IMPORT_GATE_SHIM = """
import os, sys
with open(os.environ["JOBD_TEST_IMPORT_GATE"]) as gate:
    gate.read()
sys.path.remove(os.path.dirname(__file__))
del sys.modules["sdnotify"]
import sdnotify as real
sys.modules["sdnotify"] = real
"""


def test_a_sighup_while_jobd_imports_itself_does_not_kill_it(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = make_daemon(start=False)
    gate, shim = tmp_path / "gate", tmp_path / "shim"
    os.mkfifo(gate)
    shim.mkdir()
    (shim / "sdnotify.py").write_text(IMPORT_GATE_SHIM)
    notify = Notifications(tmp_path / "notify.sock")
    env = {**os.environ, "PYTHONPATH": f"{shim}:{REPO}", "NOTIFY_SOCKET": str(notify.path)}
    env["JOBD_TEST_IMPORT_GATE"] = str(gate)
    command = [str(Path(sys.executable).parent / "jobd"), "--config-dir", str(daemon.config_dir)]  # the console script
    with open(daemon.log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        with open(gate, "w"):  # returns once jobd is held in its imports
            process.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")  # the SIGHUP did not kill it...
        notify.wait_for("RELOADING=1")  # ...and was acted on once jobd was ready
        notify.wait_for("READY=1")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, daemon.log()
        notify.close()


def test_a_message_the_service_manager_cannot_take_is_logged_once(make_daemon: Callable[..., Daemon]) -> None:
    """sdnotify dropped a message it could not send without a word (a lost READY=1 left no trace). jobd logs the
    first failure of each kind, and goes on."""
    daemon = make_daemon()
    assert daemon.notify is not None
    daemon.notify.close()  # the service manager's end is gone
    assert daemon.call("daemon.reload")["ok"] is True  # RELOADING=1, READY=1, STATUS=...: none can be sent
    assert daemon.call("daemon.reload")["ok"] is True
    assert daemon.stop() == 0
    told = [line for line in daemon.log().splitlines() if "cannot tell the service manager" in line]
    # Once per reason, of all the messages that follow: the first send finds the socket gone, then ours is disconnected.
    assert len(told) == 2, told
    assert "RELOADING=1: Connection refused" in told[0] and "Transport endpoint is not connected" in told[1], told


def test_a_service_manager_that_cannot_be_reached_is_logged(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """sdnotify, failing to connect to NOTIFY_SOCKET, dropped every message after without a word: under systemd, a
    start killed at TimeoutStartSec= for want of READY=1, and nothing in the log to say why."""
    daemon = make_daemon(start=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    command = [sys.executable, "-m", "jobd.daemon", "--config-dir", str(daemon.config_dir), "--log-level", "info"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    assert process.stderr is not None
    # Read from the descriptor itself: select() on a buffered file misses lines one read() already took into its
    # buffer (two warnings and "ready" written together then waited for in vain).
    logged = b""
    lines: list[str] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not any(" ready: socket " in line for line in lines):
            ready, _, _ = select.select([process.stderr], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"jobd did not log that it is ready; it logged {lines}"
            chunk = os.read(process.stderr.fileno(), 65536)
            assert chunk, f"jobd ended; it logged {lines}"
            logged += chunk
            lines = logged.decode(errors="replace").splitlines(keepends=True)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, lines
        process.stderr.close()
    told = [line for line in lines if "cannot reach the service manager" in line]
    assert told and f"NOTIFY_SOCKET={tmp_path / 'gone.sock'}: No such file or directory" in told[0], lines


def test_a_sigterm_while_starting_stops_jobd_without_serving(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Noted while starting, the stop comes once start-up is done, before jobd serves: STOPPING=1, never READY=1,
    exit 0, and no socket left behind."""
    daemon = make_daemon(start=False)
    answering = signal_while_starting(daemon, signal.SIGTERM, tmp_path)
    daemon.start(until="STOPPING=1")
    answering.join()
    assert daemon.process is not None and daemon.process.wait(30) == 0, daemon.log()
    assert daemon.notify is not None
    assert not any("READY=1" in message for message in daemon.notify.messages), daemon.notify.messages
    assert not daemon.socket_path.exists()
    daemon.stop()


def test_a_launch_while_jobd_stops_is_refused_as_a_submit_is(jobd: Callable[..., Daemon]) -> None:
    """jobd stopping takes no new work: a submit got SHUTTING_DOWN, while an instance.launch on a connection still
    open was taken, its instance made and its tasks left to 'the next start'."""
    stubborn = 'trap "" TERM; echo ready >&3; exec sleep 600'
    daemon = jobd("[queue.default]\nconcurrency = 1\n[queue.held]\nconcurrency = 1\npaused = true\n")
    daemon.write_workflows(parked=PARKED)
    daemon.call("daemon.reload")
    submit_running(daemon, command=["/bin/sh", "-c", stubborn])  # holds the stop for its kill_grace
    pump = pump_of(daemon)
    pump.skip()
    with daemon.client() as client:
        # Answered, so accepted: a connection still in the listening socket's backlog when the stop closes it is
        # reset by the kernel, not answered.
        client.call("ping")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        pump.wait_for("STOPPING=1")
        for method, params in (
            ("instance.launch", {"workflow": "parked"}),
            ("job.submit", {"command": ["/bin/true"]}),
        ):
            with pytest.raises(RemoteError) as refused:
                client.call(method, params)
            assert refused.value.code == "SHUTTING_DOWN", (method, refused.value.message)
    assert daemon.process.wait(30) == 0
    pump.stop()
    daemon.stop()
    start(daemon)
    assert daemon.call("instance.list", {})["instances"] == []  # none was made


def test_signals_while_stopping_neither_reload_nor_hide_the_counts(jobd: Callable[..., Daemon], pidfds: Pidfds) -> None:
    stubborn = 'trap "" TERM; echo ready >&3; exec sleep 600'
    daemon = jobd()
    job_id = submit_running(daemon, command=["/bin/sh", "-c", stubborn])
    pidfds.watch("leader", tries(daemon, job_id)[0]["pid"])
    pump = pump_of(daemon)
    pump.skip()
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    pump.wait_for("STOPPING=1")
    # The STATUS= sent with STOPPING=1 still counts the job that is being stopped (kill_grace: 2 s).
    assert pump.wait_for("STATUS=").startswith("STATUS=stopping: 1 running")
    daemon.process.send_signal(signal.SIGHUP)  # handled by the loop while it waits for the job's end
    assert daemon.process.wait(30) == 0
    pump.stop()
    daemon.stop()
    log = daemon.log()
    assert "SIGHUP while stopping" in log, log
    assert "configuration reloaded" not in log.split("stopping: no new work")[1], log


def test_the_status_line_counts_the_jobs_a_stop_puts_back(jobd: Callable[..., Daemon]) -> None:
    # Before, the jobs a stop put back in their queue were missing from STATUS= ("0 queued"), and the last
    # STATUS=, with nothing running any more, never came: jobd exited before its status timer fired.
    daemon = jobd("[queue.default]\nconcurrency = 2\n")
    stubborn = ["/bin/sh", "-c", 'trap "" TERM; echo ready >&3; exec sleep 600']
    submit_running(daemon, command=stubborn, kill_grace=2)
    submit_running(daemon, command=["/bin/sh", "-c", "echo ready >&3; exec sleep 600"])  # goes at SIGTERM
    pump = pump_of(daemon)
    pump.skip()
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    pump.wait_for("STATUS=stopping: 1 running, 1 queued")
    assert daemon.process.wait(30) == 0
    pump.wait_for("STATUS=stopping: 0 running, 2 queued")
    pump.stop()
    daemon.stop()


# --- history retention ---


def test_history_keep_last(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(daemon_extra="history = { keep_last = 5 }")
    ids = []
    for i in range(10):
        job_id = daemon.submit(command=["/bin/echo", f"job {i}"])["id"]
        assert daemon.wait(job_id)["state"] == "succeeded"
        ids.append(job_id)
    output = daemon.state_dir / "output"

    assert sorted(job["id"] for job in all_jobs(daemon)) == ids[5:]
    for job_id in ids[:5]:
        with pytest.raises(RemoteError) as info:
            daemon.call("job.get", {"id": job_id})
        assert info.value.code == "UNKNOWN_JOB"
        assert not (output / str(job_id)).exists(), f"output of expired job {job_id} is still there"
    for i, job_id in enumerate(ids[5:], start=5):
        assert (output / str(job_id)).is_dir()
        assert daemon.output(job_id) == f"job {i}\n"


def finished_and_gone(daemon: Daemon, job_id: int) -> None:
    """Wait for a job of a daemon that keeps no history: it has ended once it is succeeded or already expired."""
    try:
        assert daemon.wait(job_id)["state"] == "succeeded"
    except RemoteError as gone:
        assert gone.code == "UNKNOWN_JOB", gone


def test_job_ids_are_never_given_twice_even_once_their_rows_are_gone(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(daemon_extra="history = { keep_last = 0 }")  # a finished job is deleted at once
    first = daemon.submit(command=["/bin/echo", "first"])["id"]
    finished_and_gone(daemon, first)
    second = daemon.submit(command=["/bin/true"])["id"]
    assert second > first
    finished_and_gone(daemon, second)
    assert terminate(daemon) == 0
    start(daemon)  # the highest id survives a restart
    assert daemon.submit(command=["/bin/true"])["id"] > second


def test_ids_of_jobs_a_database_lost_with_its_last_commits_are_not_given_again(
    make_daemon: Callable[..., Daemon],
) -> None:
    # A WAL cut short (what a power cut leaves with durability "crash", whose commits are not synced) loses the
    # last jobs. Those waiting for their delay had no output directory, the only trace a start looked for: their ids
    # were given again, and a client holding one (job.get, job.wait) was answered with another job. The mark of the
    # ids handed out (output/.job-ids) says how far they went.
    daemon = make_daemon("[queue.default]\n")
    accepted = [daemon.submit(command=["/bin/true"], delay=3600)["id"] for _ in range(30)]
    daemon.kill9()
    wal = daemon.state_dir / "jobd.sqlite3-wal"
    os.truncate(wal, wal.stat().st_size // 2)
    daemon.start()
    kept = [job["id"] for job in all_jobs(daemon)]
    assert 0 < len(kept) < len(accepted), kept  # the cut WAL did lose jobs
    new = daemon.submit(command=["/bin/true"])["id"]
    assert new > max(accepted), (new, accepted)
    assert "may have been handed out, past the last job of the database" in daemon.log()
    with pytest.raises(RemoteError) as unknown:
        daemon.call("job.get", {"id": max(accepted)})
    assert unknown.value.code == "UNKNOWN_JOB", unknown.value


def test_the_output_of_jobs_a_lost_wal_took_away_is_told_with_both_causes_and_what_to_check(
    make_daemon: Callable[..., Daemon],
) -> None:
    """A WAL deleted after a crash (by a cleaning tool, by hand) takes the jobs committed in it away, and leaves
    their output: the start's warning asked "a database restored from a copy?" only, which sent its reader looking
    for a restore no one made rather than for what removed the WAL."""
    daemon = make_daemon("[queue.default]\n")
    ran = [daemon.wait(daemon.submit(command=["/bin/echo", "in the WAL"])["id"])["id"] for _ in range(2)]
    daemon.kill9()
    database = daemon.state_dir / "jobd.sqlite3"
    os.unlink(f"{database}-wal")
    daemon.start()
    assert all_jobs(daemon) == []  # the WAL held them all
    output = daemon.state_dir / "output"
    assert (
        f"WARNING {output} holds the output of jobs up to {ran[-1]}, past the last job of the database (0): the "
        "database lacks jobs it had, either restored from a copy or having lost its last commits after a crash (its "
        f"WAL, {database}-wal, deleted or cut short). New jobs take ids past {ran[-1]}, so that none shows their "
        "output. If no copy was restored, look for what removed or cut the WAL (a cleaning tool, a script, I/O "
        f"errors in the kernel log); jobs {ran[0]}-{ran[-1]} are unknown to jobd now (their clients may submit them "
        "again) and their output is not any job's (remove it by hand)"
    ) in daemon.log(), daemon.log()
    assert daemon.submit(command=["/bin/true"])["id"] > ran[-1]  # past the mark of the ids handed out, too


def test_a_clean_stop_leaves_no_gap_in_the_job_ids(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("[queue.default]\n")
    first = daemon.submit(command=["/bin/true"], delay=3600)["id"]
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.submit(command=["/bin/true"], delay=3600)["id"] == first + 1
    assert "may have been handed out" not in daemon.log()


def test_instance_ids_are_never_given_twice(make_daemon: Callable[..., Daemon]) -> None:
    # The tasks of an instance are keyed by its id: a new instance with a deleted one's id took its old task's job
    # (and output) instead of running its own.
    daemon = make_daemon("[queue.default]\n", start=False)
    daemon.write_workflows(one=ONE_TASK)
    daemon.start()
    launch = b'<instance action="launch" name="one" mode="synchronous" />'
    old = int(evqueue_exchange(daemon, launch).get("workflow-instance-id"))
    [old_task] = daemon.call("job.list", {"context": f"instance:{old}"})["jobs"]
    assert evqueue_exchange(daemon, f'<instance action="delete" id="{old}" />'.encode()).get("status") == "OK"
    new = int(evqueue_exchange(daemon, launch).get("workflow-instance-id"))
    assert new > old
    [new_task] = daemon.call("job.list", {"context": f"instance:{new}"})["jobs"]
    assert new_task["id"] != old_task["id"] and new_task["state"] == "succeeded"


def test_keep_last_keeps_the_jobs_that_finished_last(jobd: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = jobd("[queue.default]\nconcurrency = 3\n", daemon_extra="history = { keep_last = 2 }")
    gate = Gate(tmp_path / "slow.lock")
    try:
        slow = daemon.submit(command=gated(gate, "/bin/echo", "slow"))["id"]  # the oldest id, finishing last
        quick = []
        for n in range(2):  # one after the other: run together, the second could end first
            quick.append(daemon.submit(command=["/bin/echo", f"quick {n}"])["id"])
            daemon.wait(quick[-1])
    finally:
        gate.release()
    assert daemon.wait(slow)["state"] == "succeeded"
    kept = sorted(job["id"] for job in all_jobs(daemon))
    assert kept == sorted([slow, quick[1]]), kept
    assert daemon.output(slow) == "slow\n"


def test_keep_last_applies_at_a_reload_and_at_a_start(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd()
    ids = [daemon.submit(command=["/bin/true"])["id"] for _ in range(6)]
    for job_id in ids:
        daemon.wait(job_id)
    (daemon.config_dir / "jobd.d" / "50-history.toml").write_text("[daemon]\nhistory = { keep_last = 4 }\n")
    daemon.call("daemon.reload")
    assert sorted(job["id"] for job in all_jobs(daemon)) == ids[2:]
    assert terminate(daemon) == 0
    (daemon.config_dir / "jobd.d" / "50-history.toml").write_text("[daemon]\nhistory = { keep_last = 1 }\n")
    start(daemon)
    assert [job["id"] for job in all_jobs(daemon)] == ids[5:]


def _jobs_run_one_by_one(daemon: Daemon, count: int) -> None:
    """`count` jobs with their output, submitted in batches to a queue that runs one at a time: the last ends last."""
    last = 0
    for _ in range(count // 200):
        batch = [{"command": ["/bin/echo", "x" * 100], "context": "c" * 200} for _ in range(200)]
        last = daemon.call("job.submit", {"jobs": batch})["jobs"][-1]["id"]
    daemon.wait(last)


def test_expired_history_frees_pages_that_new_jobs_fill_and_a_vacuum_by_hand_gives_them_back(
    jobd: Callable[..., Daemon],
) -> None:
    # docs/jobs.md, History: the database file does not shrink as jobs expire, nor grow at a steady pace of jobs.
    daemon = jobd("[queue.default]\nconcurrency = 1\n", daemon_extra="history = { keep_last = 100 }")
    database = daemon.state_dir / "jobd.sqlite3"

    def settled_size() -> int:
        """The file's size once every trim is done (a start applies keep_last) and the WAL is written into it."""
        assert terminate(daemon) == 0
        start(daemon)
        assert terminate(daemon) == 0
        return database.stat().st_size

    # Rounds of 400 jobs: the file holds at most 500 at any moment (the 100 kept, the 400 of the round).
    for _ in range(2):
        _jobs_run_one_by_one(daemon, 400)
    first = settled_size()
    start(daemon)
    for _ in range(2):
        _jobs_run_one_by_one(daemon, 400)
    later = settled_size()
    # 800 more jobs took the pages that expired ones freed: kept apart, they would have doubled the file.
    assert later < first * 1.25, (first, later)
    assert len(list((daemon.state_dir / "output").iterdir())) <= 101  # the jobs' output went with them (and the mark)

    with contextlib.closing(sqlite3.connect(database)) as raw:  # an administrator's VACUUM, while jobd is stopped
        raw.execute("VACUUM")
    assert database.stat().st_size < later / 2
    start(daemon)
    assert len(all_jobs(daemon)) == 100
    assert daemon.wait(daemon.submit(command=["/bin/true"])["id"])["id"] == 1601


def test_keeping_no_history_still_gives_a_workflow_its_tasks_output(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("[queue.default]\n", start=False, daemon_extra="history = { keep_last = 0 }")
    daemon.write_workflows(one=ONE_TASK_SAYING)
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "one"})["id"]
    assert daemon.call("instance.wait", {"id": launched, "timeout": 30})["status"] == "TERMINATED"
    document = daemon.call("instance.get", {"id": launched, "format": "xml"})["xml"]
    assert "said by the task" in document, document


def test_history_keep_days_expires_by_itself(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(daemon_extra="history = { keep_days = 0.00002 }")  # 1.728 s
    old = daemon.submit(command=["/bin/echo", "old"])["id"]
    assert daemon.wait(old)["state"] == "succeeded"
    assert daemon.call("job.get", {"id": old})["state"] == "succeeded"
    output = daemon.state_dir / "output" / str(old)
    assert output.is_dir()

    # No event says "expired": let a job of the daemon's own measure out 3 s, then look.
    clock = daemon.submit(command=["/bin/sleep", "3"])["id"]
    assert daemon.wait(clock)["state"] == "succeeded"
    with pytest.raises(RemoteError) as info:
        daemon.call("job.get", {"id": old})
    assert info.value.code == "UNKNOWN_JOB"
    assert not output.exists()
    assert daemon.call("job.get", {"id": clock})["state"] == "succeeded"  # younger than keep_days: still there


def test_a_wait_read_after_the_stop_answered_the_waits_is_answered_shutting_down(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Found under load: a job.wait or instance.wait read on a connection still open after the stop had answered the
    waits with SHUTTING_DOWN (while it gave a callback under way its seconds to end) waited for a job or instance
    nothing would end in this run: no answer, then the connection cut. It is answered SHUTTING_DOWN at once."""
    gate = Gate(tmp_path / "gate")
    started = tmp_path / "started"
    os.mkfifo(started)
    callback = f'echo up > "{started}"; exec flock "{gate.path}" true'
    daemon = make_daemon(
        f"""
        [queue.default]
        [queue.held]
        paused = true

        [task.t]
        command = ["/bin/true"]
        on_finish = [{{ exec = ["/bin/sh", "-c", {json.dumps(callback)}] }}]
        """,
        start=False,
    )
    daemon.write_workflows(
        held='<workflow><subjobs><job name="j"><tasks><task name="x" path="/bin/true" queue="held"/>'
        "</tasks></job></subjobs></workflow>"
    )
    start(daemon)
    queued = daemon.submit(command=["/bin/true"], queue="held")["id"]
    instance = daemon.call("instance.launch", {"workflow": "held"})["id"]
    daemon.submit(task="t")
    with open(started) as fifo:  # its callback runs, and holds the stop (up to 5 s) until the gate opens
        assert fifo.read() == "up\n"
    early, late_job, late_instance = daemon.client(), daemon.client(), daemon.client()
    try:
        early.send_raw(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "job.wait", "params": {"id": queued}}).encode())
        early.send_raw(b"\n")
        early.call("ping")  # the wait waits in jobd now
        for client in (late_job, late_instance):
            client.call("ping")  # connected and taken before the stop closes the socket
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        answer = early.read_line(timeout=10)  # the stop has answered the waits; the callback holds it still
        assert answer["error"]["data"]["code"] == "SHUTTING_DOWN", answer
        for client, method, target in ((late_job, "job.wait", queued), (late_instance, "instance.wait", instance)):
            with pytest.raises(RemoteError) as refused:
                client.call(method, {"id": target}, timeout=10)
            assert refused.value.code == "SHUTTING_DOWN", (method, refused.value)
    finally:
        gate.release()
        for client in (early, late_job, late_instance):
            client.close()
    assert daemon.process.wait(30) == 0
    pump_of(daemon).stop()
    daemon.stop()
    assert "Traceback" not in daemon.log()


# Its task writes its pid into the FIFO $0.pid, waits for a line from the FIFO $0.go, and fails. Each FIFO blocks the
# task until the test opens its other end: the test knows when the task runs, and says when it ends.
ON_CUE = """<workflow><parameters><parameter name="fifo"/></parameters><subjobs><job name="j"><tasks>
  <task name="t" queue="default"
      path="/bin/sh -c 'echo $$ &gt; &quot;$0.pid&quot;; read go &lt; &quot;$0.go&quot;; exit 1'">
    <input name="fifo"><value select="evqGetWorkflowParameter('fifo')"/></input>
  </task>
</tasks></job></subjobs></workflow>"""


def test_a_task_end_seen_in_the_same_turn_as_a_sigterm_is_saved_before_the_store_closes(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A task's end and the SIGTERM came in one turn of jobd's loop: the stop, which awaited nothing (no job ran, no
    client was connected), closed the store before the instance heard of its task's end, which then failed on the
    closed database ("ended by an error in jobd", with a traceback). Found by a soak test, in about half its rounds.

    jobd is frozen (SIGSTOP) while its task ends and the SIGTERM is sent, so that both wait for it together when it
    goes on (SIGCONT): the signal's handler is queued as the loop reads its events, before the task's end."""
    fifo = tmp_path / "fifo"
    os.mkfifo(f"{fifo}.pid")
    os.mkfifo(f"{fifo}.go")
    daemon = make_daemon(start=False)
    daemon.write_workflows(cue=ON_CUE)
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "cue", "parameters": {"fifo": str(fifo)}})
    task = os.pidfd_open(read_pid(Path(f"{fifo}.pid")))
    try:
        os.kill(daemon.pid, signal.SIGSTOP)
        os.waitid(os.P_PID, daemon.pid, os.WSTOPPED | os.WNOWAIT)  # returns once jobd is stopped
        Path(f"{fifo}.go").write_text("go\n")
        assert select.select([task], [], [], 30)[0] == [task]  # the task has exited (jobd cannot reap it yet)
        os.kill(daemon.pid, signal.SIGTERM)
        os.kill(daemon.pid, signal.SIGCONT)
    finally:
        os.close(task)
    assert daemon.stop() == 0
    log = daemon.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    daemon.start()
    ended = daemon.call("instance.get", {"id": launched["id"]})
    assert (ended["status"], ended["errors"]) == ("TERMINATED", 1), ended
    assert "resumed" not in daemon.log()  # its end was saved at the stop
