"""What a production jobd must survive: a second jobd on the same state, clients that vanish mid-request, large
replies, recovery order, shutdowns that must not eat retries, fd exhaustion, and unprivileged environment tricks."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pwd
import resource
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Daemon
from recovery.support import (
    WAIT,
    Gate,
    gated,
    out_of_descriptors,
    soft_limit_on_open_files,
    wait_events,
    wait_for_log,
)

from jobd import config, openfiles
from jobd.client import Client, RemoteError

QUEUE = "[queue.default]\nconcurrency = 1\n"


def raw_lines(daemon: Daemon, payload: bytes, count: int) -> list[bytes]:
    """Send `payload` in one write and read `count` reply lines (with a deadline)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket_path))
        sock.sendall(payload)
        buffer = b""
        while buffer.count(b"\n") < count:
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection closed after {len(buffer.splitlines())} of {count} replies"
            buffer += chunk
        return buffer.splitlines()


def request(method: str, params: dict[str, Any], request_id: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode() + b"\n"


def test_a_second_jobd_on_the_same_state_refuses_to_start_and_touches_nothing(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(QUEUE)
    job = daemon.submit(command=["/bin/sleep", "30"])
    second = daemon.start_refused()
    assert second.returncode == 1
    assert "another jobd" in second.stderr and str(daemon.state_dir) in second.stderr
    assert "Traceback" not in second.stderr
    assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"  # its process was not killed
    assert daemon.call("job.cancel", {"id": job["id"]})["state"] == "cancelled"


def test_jobs_of_a_client_that_vanishes_while_its_fsync_is_pending_still_run(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(QUEUE, daemon_extra='durability = "fsync"')
    payload = b"".join(request("job.submit", {"command": ["/bin/true"], "key": f"k{i}"}, i) for i in range(50))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket_path))
        sock.sendall(payload)
        sock.settimeout(30)
        assert sock.recv(1)  # the first reply is on its way: the others are committed or being committed
    # Gone without reading: jobd's next replies fail to send, and the requests still waiting for the fsync end.
    # Whatever was committed before the client left must run; resubmitting the keys finds every job once.
    jobs = [daemon.submit(command=["/bin/true"], key=f"k{i}") for i in range(50)]
    for job in jobs:
        assert daemon.wait(job["id"])["state"] == "succeeded"


def test_submits_ahead_of_an_oversized_frame_are_answered_and_run(make_daemon: Any) -> None:
    """The connection ends at the oversized frame; the requests before it in the same write still count."""
    daemon: Daemon = make_daemon(QUEUE, daemon_extra='durability = "fsync"')
    submits = b"".join(request("job.submit", {"command": ["/bin/true"], "key": f"k{i}"}, i) for i in range(20))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket_path))
        # jobd stops reading at the oversized frame, so the send may break; its replies are still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(submits + b"[" * (2 << 20) + b"\n")
        replies = b""
        while chunk := sock.recv(1 << 16):
            replies += chunk
    answers = [json.loads(line) for line in replies.splitlines()]
    assert sorted(a["id"] for a in answers if "result" in a) == list(range(20))
    assert [a["error"]["data"]["code"] for a in answers if "error" in a] == ["FRAME_TOO_LARGE"]
    for i in range(20):
        job = daemon.submit(command=["/bin/true"], key=f"k{i}")  # the same job again, by its key
        assert daemon.wait(job["id"])["state"] == "succeeded"


def test_a_cancel_right_behind_its_submit_in_one_write_cancels_it(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(QUEUE + "paused = true\n", daemon_extra='durability = "fsync"')
    lines = raw_lines(
        daemon, request("job.submit", {"command": ["/bin/true"]}, 1) + request("job.cancel", {"id": 1}, 2), 2
    )
    assert all("result" in json.loads(line) for line in lines), lines
    assert daemon.call("job.get", {"id": 1})["state"] == "cancelled"
    daemon.call("queue.resume", {"name": "default"})
    assert daemon.wait(1)["state"] == "cancelled"


def test_a_reply_larger_than_the_unsent_limit_reaches_a_reading_client(make_daemon: Any) -> None:
    """1 MiB of NUL bytes is ~6 MiB of escaped JSON: more than the 4 MiB after which a silent subscriber is cut."""
    daemon: Daemon = make_daemon(QUEUE)
    job = daemon.submit(command=["/usr/bin/head", "-c", str(1 << 20), "/dev/zero"])
    daemon.wait(job["id"])
    with daemon.client() as client:
        reply = client.call("job.output", {"id": job["id"], "limit": 1 << 20}, timeout=30)
        assert reply["data"] == "\0" * (1 << 20)
        assert client.call("ping")["pong"] is True


def test_recovery_starts_the_best_job_first(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(QUEUE + "paused = true\n")
    late = daemon.submit(command=["/bin/true"], priority=2000)
    urgent = daemon.submit(command=["/bin/true"], priority=10)
    daemon.kill9()
    daemon.write_config(QUEUE)  # unpaused from the start
    daemon.start()
    daemon.wait(late["id"])
    first, second = (daemon.call("job.get", {"id": job["id"]}) for job in (urgent, late))
    assert first["started_at"] < second["started_at"]


def test_keep_last_does_not_stop_keep_days_expiry(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(QUEUE, daemon_extra="history = { keep_days = 0.00002, keep_last = 1000 }")
    old = daemon.submit(command=["/bin/true"])
    daemon.wait(old["id"])
    # keep_days is 1.7 s. While nothing else finishes (so no later job's end trims the history), the first job
    # must expire on the daemon's own timer: wait 3 s on a job that keeps running.
    later = daemon.submit(command=["/bin/sleep", "30"])
    assert daemon.call("job.wait", {"id": later["id"], "timeout": 3})["state"] == "running"
    with pytest.raises(RemoteError) as error:
        daemon.call("job.get", {"id": old["id"]})
    assert error.value.code == "UNKNOWN_JOB"
    daemon.call("job.cancel", {"id": later["id"]})


ECHO_WORKFLOW = """<workflow><subjobs><job name="only"><tasks>
  <task name="echo" queue="default" path="/bin/echo hello"/>
</tasks></job></subjobs></workflow>"""


def test_keep_days_takes_ended_instances_and_audit_entries_too(make_daemon: Any) -> None:
    # Before, only jobs expired: every workflow instance (its document) and every audit entry (one per command, a
    # submit included) stayed for the life of the database, which grew without end at a busy site.
    daemon: Daemon = make_daemon(QUEUE, start=False, daemon_extra="history = { keep_days = false }")
    daemon.write_workflows(echo=ECHO_WORKFLOW)
    daemon.start()
    with daemon.client() as client:
        launched = [client.call("instance.launch", {"workflow": "echo"})["id"] for _ in range(3)]
        for instance_id in launched:
            assert (
                client.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=35)["status"] == "TERMINATED"
            )
        for _ in range(2):  # refused: audit entries that no job comes with
            with pytest.raises(RemoteError):
                client.call("job.submit", {"command": ["/bin/true"], "queue": "nope"})
        before = client.call("audit.list", {"limit": 100})["entries"]
        assert [entry["command"] for entry in before] == ["job.submit"] * 2 + ["instance.launch"] * 3
        assert client.call("instance.list", {"limit": 100})["total"] == 3
    daemon.write_config(QUEUE, daemon_extra="history = { keep_days = 0 }")
    daemon.call("daemon.reload")
    # The reload armed retention's timer for what is due now; it ran before jobd read this connection's requests.
    with daemon.client() as client:
        assert client.call("instance.list", {"limit": 100})["total"] == 0
        for instance_id in launched:
            with pytest.raises(RemoteError) as error:
                client.call("instance.get", {"id": instance_id})
            assert error.value.code == "UNKNOWN_INSTANCE"
        # The reload's own entry is written within 50 ms (audit write-behind): before the trim's last slice or
        # after it, as the machine's load decides; the entries from before the reload are gone either way.
        after = client.call("audit.list", {"limit": 100})["entries"]
        assert [entry["command"] for entry in after if entry["command"] != "daemon.reload"] == [], after
        assert client.call("job.list", {"limit": 100})["jobs"] == []
    daemon.write_config(QUEUE, daemon_extra="history = { keep_days = false }")  # nothing expires from here on
    daemon.call("daemon.reload")
    with daemon.client() as client:
        with pytest.raises(RemoteError):
            client.call("job.submit", {"command": ["/bin/true"], "queue": "nope"})
        [newest] = client.call("audit.list", {"limit": 1})["entries"]
    assert newest["command"] == "job.submit" and newest["id"] > before[0]["id"], newest  # ids are never reused


NAP_WORKFLOW = """<workflow><subjobs><job name="only"><tasks>
  <task name="nap" queue="default" path="/bin/sleep 0.3"/>
</tasks></job></subjobs></workflow>"""


def test_with_keep_days_0_a_wait_for_an_instance_still_gets_its_end(make_daemon: Any) -> None:
    # The wait read the instance again once woken, by which time the trim its end armed (due at once) had deleted
    # it: instance.wait answered UNKNOWN_INSTANCE, and a workflow schedule's follower died with that error, leaving
    # the schedule "running" its first instance for ever (no firing after it).
    from recovery.support import start, stop_pumps
    from test_schedules import BASE, HELLO, schedule

    daemon: Daemon = make_daemon(
        BASE + schedule("wf", "workflow:hello", ";;;;;"), start=False, daemon_extra="history = { keep_days = 0 }"
    )
    daemon.write_workflows(nap=NAP_WORKFLOW, hello=HELLO)
    start(daemon)  # its notify socket drained: the schedule makes jobs each second
    with daemon.client() as watcher:
        watcher.call("events.subscribe", {"types": ["instance.state"]})
        with daemon.client() as client:
            for _ in range(3):
                instance_id = client.call("instance.launch", {"workflow": "nap"})["id"]
                done = client.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=35)
                assert done["status"] == "TERMINATED" and done["id"] == instance_id, done
        # With overlap "skip" the schedule launches `hello` again only once its follower has seen the run going
        # end: a second instance of it told of is a firing after an end. Before, stuck on its first run.
        scheduled: set[int] = set()
        deadline = time.monotonic() + 20
        while len(scheduled) < 2:
            left = deadline - time.monotonic()
            assert left > 0, f"the schedule fired once and no more: instances {scheduled}"
            instance = watcher.next_event(timeout=left)["instance"]
            if instance["workflow"] == "hello":
                scheduled.add(instance["id"])
    daemon.call("schedule.disable", {"name": "wf"})
    stop_pumps([daemon])
    assert "Task exception was never retrieved" not in daemon.log()


def test_an_attempt_stopped_by_shutdown_does_not_use_up_a_retry(make_daemon: Any, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    daemon: Daemon = make_daemon(QUEUE)
    script = f'if [ "$JOBD_ATTEMPT" = 1 ]; then touch {marker}; exec sleep 30; fi; exit 3'
    with Client(str(daemon.socket_path)) as client:
        client.call("events.subscribe", {"types": ["job.state"]})
        job = client.call("job.submit", {"command": ["/bin/sh", "-c", script], "retry": {"times": 1, "delay": 0}})
        while client.next_event(timeout=10)["job"]["state"] != "running":
            pass
    assert daemon.stop() == 0
    daemon.start()
    finished = daemon.wait(job["id"])
    outcomes = [t["outcome"] for t in daemon.call("job.get", {"id": job["id"]})["tries"]]
    # killed by shutdown, then a real failure, then the one retry its policy allows
    assert outcomes == ["killed", "failed", "failed"], outcomes
    assert finished["state"] == "failed"


def test_a_time_limit_reached_while_shutdown_waits_does_not_end_the_job(make_daemon: Any) -> None:
    # The first attempt ignores SIGTERM: jobd's stop waits out its kill_grace (5 s), during which its time limit
    # (3 s: room for the stop to come first on a busy machine) comes round. The stop decides: the attempt was
    # killed by the shutdown and the job runs again.
    daemon: Daemon = make_daemon(QUEUE)
    script = 'if [ "$JOBD_ATTEMPT" = 1 ]; then trap "" TERM; echo %1 >&3; sleep 30; fi'
    with Client(str(daemon.socket_path)) as client:
        client.call("events.subscribe", {"types": ["job.progress"]})
        job = client.call("job.submit", {"command": ["/bin/sh", "-c", script], "timeout": 3, "kill_grace": 5})
        while client.next_event(timeout=10)["progress"] != 1:  # SIGTERM is ignored from now on
            pass
    assert daemon.stop() == 0
    daemon.start()
    finished = daemon.wait(job["id"])
    outcomes = [t["outcome"] for t in daemon.call("job.get", {"id": job["id"]})["tries"]]
    assert outcomes == ["killed", "succeeded"], outcomes
    assert finished["state"] == "succeeded"


def test_running_out_of_file_descriptors_delays_jobs_instead_of_failing_them(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 20\n")
    with daemon.client() as client:  # the connection is made before the limit falls
        open_now = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        soft_before = next(
            line.split()[3] for line in Path(f"/proc/{daemon.pid}/limits").read_text().splitlines()
            if line.startswith("Max open files")
        )  # fmt: skip
        # Room for a few jobs at once, not for twenty: each holds a pidfd and three pipe ends while it runs, and more
        # while it is being started (+12 left room for one at a time: twenty rounds of RESOURCE_RETRY_DELAY).
        limit = open_now + 40
        subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={limit}:"], check=True)  # the soft limit
        jobs = client.call("job.submit", {"jobs": [{"command": ["/bin/sleep", "0.3"]} for _ in range(20)]})["jobs"]
        states = [client.call("job.wait", {"id": job["id"], "timeout": 60}, timeout=70)["state"] for job in jobs]
        tries = [client.call("job.get", {"id": job["id"]})["tries"] for job in jobs]
    subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={soft_before}:"], check=True)
    assert states == ["succeeded"] * 20
    assert any(t["outcome"] == "spawn_error" for job_tries in tries for t in job_tries), "the limit was never hit"
    assert "Too many open files" in daemon.log()


def test_clients_that_cannot_be_accepted_for_want_of_descriptors_are_logged_once(make_daemon: Any) -> None:
    # asyncio went on calling accept() a hundred times a turn after EMFILE, logging each failure with its traceback
    # and arming a timer for each, each of which failed a hundred times more: the log grew by a hundred tracebacks
    # more every second for as long as the shortage lasted (jobd.eventloop).
    daemon: Daemon = make_daemon(QUEUE)
    soft_before = soft_limit_on_open_files(daemon.pid)
    # No descriptor number left below the limit, once the few gaps below the highest are taken by clients.
    highest = max(int(name) for name in os.listdir(f"/proc/{daemon.pid}/fd"))
    subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={highest + 1}:"], check=True)
    with contextlib.ExitStack() as held:
        clients = []
        for _ in range(40):  # within the listen backlog: each connect() returns at once, accepted or not
            sock = held.enter_context(socket.socket(socket.AF_UNIX))
            sock.settimeout(WAIT)
            sock.connect(str(daemon.socket_path))
            sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
            clients.append(sock)
        wait_for_log(daemon, f"cannot accept clients on {daemon.socket_path}: Too many open files")
        subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={soft_before}:"], check=True)
        for sock in clients:  # all of them answered: those that waited are accepted once there are descriptors
            assert json.loads(sock.recv(1 << 16))["result"]["pong"] is True
    wait_for_log(daemon, f"accepting clients on {daemon.socket_path} again")
    log = daemon.log()
    assert log.count("cannot accept clients") == 1, log
    assert "out of system resource" not in log and "Traceback" not in log, log


def test_a_first_wait_while_jobd_is_out_of_descriptors_is_answered(make_daemon: Any) -> None:
    # The set of clients whose hang-up jobd looks out for was made at the first request that waits: made when jobd
    # had no descriptor left, it failed in the middle of that request, and the client's connection was dropped
    # without an answer (logged at debug level only).
    daemon: Daemon = make_daemon(QUEUE)
    job = daemon.submit(command=["/bin/true"], delay=86400)
    with daemon.client() as client, out_of_descriptors(daemon):
        waited = client.call("job.wait", {"id": job["id"], "timeout": 0})  # a wait, answered as the job is now
    assert waited["state"] == "delayed"
    assert "[Errno 24]" not in daemon.log()  # no request failed for want of a descriptor


def test_a_stop_while_clients_wait_to_be_accepted_logs_no_traceback(make_daemon: Any) -> None:
    # asyncio tries a listener short of descriptors again a second later. A stop closes the listeners first, then
    # waits for its jobs (here the whole kill_grace, 2 s): that retry came after the close, watched descriptor -1,
    # and logged "Exception in callback" with a ValueError traceback for each listener.
    daemon: Daemon = make_daemon(QUEUE)
    with daemon.client() as client:
        job = client.call("job.submit", {"command": ["sh", "-c", "trap '' TERM; echo up; exec sleep 600"]})
        assert client.call("job.output", {"id": job["id"], "wait": True}, timeout=WAIT)["data"] == "up\n"
    with out_of_descriptors(daemon):
        assert daemon.stop() == 0
    log = daemon.log()
    assert "(attempt 1 killed, signal 9)" in log, log  # the stop waited the whole kill_grace
    assert "Traceback" not in log and "Exception in callback" not in log, log


def test_output_asked_for_while_jobd_is_out_of_descriptors_is_refused_as_a_shortage_not_a_bug(make_daemon: Any) -> None:
    # job.output opens the output file: without a descriptor to spare, it answered INTERNAL_ERROR ("a bug in jobd")
    # and logged a traceback for each request.
    daemon: Daemon = make_daemon(QUEUE)
    job = daemon.submit(command=["/bin/echo", "kept"])
    assert daemon.wait(job["id"])["state"] == "succeeded"
    with daemon.client() as client:
        with out_of_descriptors(daemon), pytest.raises(RemoteError) as refused:
            client.call("job.output", {"id": job["id"]})
        assert refused.value.code == "OUT_OF_RESOURCES", refused.value
        assert str(refused.value).endswith(
            f"cannot read job {job['id']}'s stdout now: Too many open files (jobd is short of open files or memory: "
            "see LimitNOFILE=); ask again later"
        )
        assert client.call("job.output", {"id": job["id"]})["data"] == "kept\n"  # once there are descriptors again
    assert "Traceback" not in daemon.log() and "internal error" not in daemon.log()


def test_output_asked_for_while_jobd_has_no_memory_to_read_it_with_is_refused_as_a_shortage_not_the_databases(
    make_daemon: Any,
) -> None:
    # Any MemoryError that reached a request's boundary was named "jobd ran out of memory using its database"
    # (STORE_FAILED), and daemon.status's store_trouble then said the database took no writes: here os.pread of
    # job.output, far from SQLite. Now it is OUT_OF_RESOURCES, saying jobd ran out of memory, and the database is not
    # blamed. The shortage is real: jobd's address space is limited (RLIMIT_AS, on the running daemon) to what it
    # has mapped, so the MiB the read asks for cannot be had.
    daemon: Daemon = make_daemon(QUEUE)
    job = daemon.submit(command=["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"])
    assert daemon.wait(job["id"])["state"] == "succeeded"
    asked = {"id": job["id"], "limit": 1 << 20}
    with daemon.client() as client:
        client.call("ping")  # accepted, and answered, before the limit
        with open(f"/proc/{daemon.pid}/stat") as stat:
            mapped = int(stat.read().rsplit(")", 1)[1].split()[20])  # vsize, in bytes
        resource.prlimit(daemon.pid, resource.RLIMIT_AS, (mapped, resource.RLIM_INFINITY))
        try:
            with pytest.raises(RemoteError) as refused:
                client.call("job.output", asked)
        finally:
            resource.prlimit(daemon.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert refused.value.code == "OUT_OF_RESOURCES", refused.value
        assert str(refused.value).endswith(
            "jobd ran out of memory answering this (see MemoryMax= and the kernel log); ask again later"
        ), refused.value
        assert client.call("daemon.status")["store_trouble"] is None
        assert client.call("job.output", asked)["data"] == "x" * (1 << 20)  # memory to spare again
    log = daemon.log()
    assert "using its database" not in log and "internal error" not in log and "Traceback" not in log, log


def _writing_while_out_of_descriptors(daemon: Daemon, gate_path: Path, argv: list[str], until: str) -> dict[str, Any]:
    """A job `argv` started while jobd had descriptors, let go (a lock the test held) once it has none: the job,
    once `until` (JOB: its id) is in the log, jobd's descriptors back."""
    gate = Gate(gate_path)
    try:
        job = daemon.submit(command=gated(gate, *argv))
        wait_for_log(daemon, f"job={job['id']} running")
        with out_of_descriptors(daemon):
            gate.release()  # the job writes now, while jobd cannot make its file
            wait_for_log(daemon, until.replace("JOB", str(job["id"])))
    finally:
        gate.release()
    return job


def test_output_written_while_jobd_is_out_of_descriptors_waits_in_its_pipe_and_is_kept_whole(
    make_daemon: Any, tmp_path: Path
) -> None:
    # A job's output file is made at its first byte on that stream. Without a descriptor to spare, the stream was
    # given up ("cannot write …: Too many open files; what the job writes there from now on is dropped") and marked
    # truncated: the output was lost. Now what was read is held and the pipe is read no more until the file can be
    # made: the job blocks on its full pipe meanwhile, and its output is kept whole.
    daemon: Daemon = make_daemon(QUEUE)
    stdout = daemon.state_dir / "output" / "JOB" / "1.stdout"
    argv = ["seq", "100000"]  # 588,895 bytes: many times a pipe's 64 KiB
    job = _writing_while_out_of_descriptors(daemon, tmp_path / "gate", argv, f"{stdout}: Too many open files")
    finished = daemon.wait(job["id"])
    assert finished["state"] == "succeeded", finished
    assert daemon.output(job["id"]) == "".join(f"{number}\n" for number in range(1, 100001))
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is False and attempt["stdout_bytes"] == 588_895, attempt


def test_output_held_for_want_of_descriptors_when_its_job_ends_is_written_at_the_end(
    make_daemon: Any, tmp_path: Path
) -> None:
    # The job writes a few bytes and exits while jobd has no descriptor for its file: the descriptor its end frees
    # (the job's pidfd) makes the file, and what was held is written before the end is recorded.
    daemon: Daemon = make_daemon(QUEUE)
    # Ended, and recorded, while jobd is still short.
    job = _writing_while_out_of_descriptors(daemon, tmp_path / "gate", ["echo", "kept"], "job=JOB succeeded")
    assert daemon.output(job["id"]) == "kept\n"
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is False and attempt["stdout_bytes"] == 5, attempt


def test_log_lines_written_while_jobd_is_out_of_descriptors_wait_in_their_pipe_and_are_kept_whole(
    make_daemon: Any, tmp_path: Path
) -> None:
    # The fd 3 log file is made at the first log line. Without a descriptor to spare, it was given up ("cannot
    # write …: Too many open files; what the job writes there from now on is dropped"): every log line of the
    # attempt was missing from it, and the attempt marked truncated. Now the lines are held, as stdout's bytes are,
    # and told (to the file and to listeners) in their order once the file can be made.
    daemon: Daemon = make_daemon(QUEUE)
    log = daemon.state_dir / "output" / "JOB" / "1.log"
    argv = ["sh", "-c", "seq 20000 >&3; echo %40 >&3"]  # 108,894 bytes of log lines: more than a pipe holds
    job = _writing_while_out_of_descriptors(daemon, tmp_path / "gate", argv, f"cannot create {log}: Too many open")
    finished = daemon.wait(job["id"])
    assert finished["state"] == "succeeded" and finished["progress"] == 40, finished
    assert daemon.output(job["id"], "log") == "".join(f"{number}\n" for number in range(1, 20001))
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is False, attempt
    assert "Too many open files; what the job writes there from now on is dropped" not in daemon.log()


def test_log_lines_held_for_want_of_descriptors_when_their_job_ends_are_written_at_the_end(
    make_daemon: Any, tmp_path: Path
) -> None:
    # The job logs a line, and a last one without its newline, and exits while jobd has no descriptor for the log
    # file: the descriptor its end frees makes the file, and both lines are written before the end is recorded.
    daemon: Daemon = make_daemon(QUEUE)
    argv = ["sh", "-c", "printf 'kept\\nlast words' >&3"]
    job = _writing_while_out_of_descriptors(daemon, tmp_path / "gate", argv, "job=JOB succeeded")
    assert "cannot create " in daemon.log()  # it was held
    assert daemon.output(job["id"], "log") == "kept\nlast words\n"
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is False, attempt


def _past_the_job(daemon: Daemon, before: set[int]) -> int:
    """The lowest of the descriptors jobd opened since `before` (those of the job started since: its pipes, its
    pidfd): at that limit, their numbers freed by the job's end give jobd none to use."""
    return min({int(name) for name in os.listdir(f"/proc/{daemon.pid}/fd")} - before)


@contextlib.contextmanager
def _ended_waiting_for_its_files(daemon: Daemon, gate_path: Path, script: str, files: str) -> Iterator[dict[str, Any]]:
    """A job running `script` (sh), let go once jobd is short of descriptors for good (its limit lowered to the
    job's own lowest descriptor: those its end frees give jobd none), yielded once its leader has exited and its
    end waits for `files` ("1.stdout and 1.log": in its output directory); jobd's descriptors come back after."""
    gate = Gate(gate_path)
    try:
        before = {int(name) for name in os.listdir(f"/proc/{daemon.pid}/fd")}
        job = daemon.submit(command=gated(gate, "sh", "-c", script))
        output = daemon.state_dir / "output" / str(job["id"])
        wait_for_log(daemon, f"job={job['id']} running")
        pid = int(daemon.log().split(f"job={job['id']} running (attempt 1, pid ")[1].split(")")[0])
        waited = " and ".join(f"{output}/{name}" for name in files.split(" and "))
        with out_of_descriptors(daemon, _past_the_job(daemon, before)):
            gate.release()
            wait_for_log(daemon, f"pid {pid} has exited; its end waits until jobd can create {waited} ")
            yield job
    finally:
        gate.release()


def test_log_lines_left_in_fd_3_when_a_job_ends_still_short_of_descriptors_are_written_once_jobd_can(
    make_daemon: Any, tmp_path: Path
) -> None:
    # The job prints and logs 5,000 lines and its progress, all of it in its stdout and fd 3 pipes, and exits while
    # jobd cannot create their files, nor can once the job's descriptors are closed (its end frees only numbers
    # above jobd's limit). What jobd had read of the pipes was counted as dropped (and fd 3's told), and the rest,
    # left in the pipes, was never read: the progress of 40 was lost, the files missing, and nothing said so. Now
    # the end waits, its pipes unread, until the files can be created, as a running job's output waits: nothing is
    # lost.
    daemon: Daemon = make_daemon(QUEUE)
    script = "seq 5000; seq 5000 >&3; echo %40 >&3"  # 23,893 bytes each: within what a pipe holds
    with _ended_waiting_for_its_files(daemon, tmp_path / "gate", script, "1.stdout and 1.log") as job:
        pass
    finished = daemon.wait(job["id"])
    assert (finished["state"], finished["progress"]) == ("succeeded", 40), finished
    lines = "".join(f"{number}\n" for number in range(1, 5001))
    assert daemon.output(job["id"]) == daemon.output(job["id"], "log") == lines
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert (attempt["truncated"], attempt["stdout_bytes"]) == (False, 23_893), attempt
    assert "what the job writes there from now on is dropped" not in daemon.log()


def test_a_stop_does_not_wait_for_the_file_of_an_ended_jobs_output(make_daemon: Any, tmp_path: Path) -> None:
    # An ended job whose fd 3 output waits for its file (jobd still short of descriptors, and still after the stop
    # closed its sockets) does not hold a stop: its end is recorded at once, the log lines the file could not take
    # counted as dropped (the attempt is truncated), and the log says so; its progress, read from the pipe, is kept.
    daemon: Daemon = make_daemon(QUEUE)
    with _ended_waiting_for_its_files(daemon, tmp_path / "gate", "seq 5000 >&3; echo %40 >&3", "1.log") as job:
        # Nor can any descriptor the stop frees (the listening sockets, the clients') be used.
        subprocess.run(["prlimit", f"--pid={daemon.pid}", "--nofile=3:"], check=True)
        assert daemon.stop() == 0
    log = daemon.state_dir / "output" / str(job["id"]) / "1.log"
    assert f"cannot write {log}: Too many open files; what the job writes there from now on is dropped" in daemon.log()
    daemon.start()
    finished = daemon.wait(job["id"])
    assert (finished["state"], finished["progress"]) == ("succeeded", 40), finished
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is True, attempt


def test_a_cancel_of_a_job_whose_end_waits_for_its_output_file_is_answered_once_that_end_is_recorded(
    make_daemon: Any, tmp_path: Path
) -> None:
    # The job's leader has exited on its own; its end waits for the log file jobd cannot create yet. A cancel
    # then has nothing to stop: it waits for that end, as for any job whose exit jobd has not handled yet, and is
    # answered JOB_FINISHED (and audited so) once it is recorded, with what the job wrote kept whole.
    daemon: Daemon = make_daemon(QUEUE)
    with daemon.client() as canceller, daemon.client() as asker:
        with _ended_waiting_for_its_files(daemon, tmp_path / "gate", "seq 5000 >&3; echo %40 >&3", "1.log") as job:
            cancel = canceller.send_request("job.cancel", {"id": job["id"]})
            assert asker.call("job.get", {"id": job["id"]})["state"] == "running"  # it waits for its file
        with pytest.raises(RemoteError) as refused:
            canceller.next_event_or_reply(cancel, timeout=WAIT)
    assert (refused.value.code, refused.value.data["state"]) == ("JOB_FINISHED", "succeeded"), refused.value
    finished = daemon.wait(job["id"])
    assert (finished["state"], finished["progress"]) == ("succeeded", 40), finished
    assert daemon.output(job["id"], "log") == "".join(f"{number}\n" for number in range(1, 5001))
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is False, attempt
    [entry] = daemon.call("audit.list", {"command": "job.cancel"})["entries"]
    assert (entry["target"], entry["result"]) == (f"job {job['id']}", "JOB_FINISHED"), entry
    assert "cancel requested" not in daemon.log()  # nothing was signalled


def test_a_stop_while_a_cancel_waits_for_the_end_of_a_job_whose_output_file_cannot_be_created_answers_it(
    make_daemon: Any, tmp_path: Path
) -> None:
    # A stop does not wait for the file (let_go): the end is recorded at once, the log lines the file could not take
    # counted as dropped and said so, and the cancel that waited for that end is answered (JOB_FINISHED, audited)
    # before jobd exits, not left without a reply.
    daemon: Daemon = make_daemon(QUEUE)
    with daemon.client() as canceller:
        with _ended_waiting_for_its_files(daemon, tmp_path / "gate", "seq 5000 >&3; echo %40 >&3", "1.log") as job:
            cancel = canceller.send_request("job.cancel", {"id": job["id"]})
            subprocess.run(["prlimit", f"--pid={daemon.pid}", "--nofile=3:"], check=True)  # the stop frees none
            assert daemon.stop() == 0
        with pytest.raises(RemoteError) as refused:
            canceller.next_event_or_reply(cancel, timeout=WAIT)
    assert (refused.value.code, refused.value.data["state"]) == ("JOB_FINISHED", "succeeded"), refused.value
    log = daemon.state_dir / "output" / str(job["id"]) / "1.log"
    assert f"cannot write {log}: Too many open files; what the job writes there from now on is dropped" in daemon.log()
    daemon.start()
    finished = daemon.wait(job["id"])
    assert (finished["state"], finished["progress"]) == ("succeeded", 40), finished
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is True, attempt
    [entry] = daemon.call("audit.list", {"command": "job.cancel"})["entries"]
    assert (entry["target"], entry["result"]) == (f"job {job['id']}", "JOB_FINISHED"), entry


def test_a_last_log_line_without_its_newline_is_a_line_when_its_jobs_end_waits_for_the_log_file(
    make_daemon: Any, tmp_path: Path
) -> None:
    # As a job's last fd 3 line without its newline is a log line when jobd has its descriptors (test_jobs.py), it is
    # one when the job ends while jobd cannot create the log file and its end waits for it: written to the file with
    # its newline, and told to listeners, once jobd can create the file.
    daemon: Daemon = make_daemon(QUEUE)
    with daemon.client() as listener:
        listener.call("events.subscribe", {"types": ["job.log"]})
        script = "seq 3 >&3; printf 'last words' >&3"
        with _ended_waiting_for_its_files(daemon, tmp_path / "gate", script, "1.log") as job:
            pass
        told = [event["line"] for event in wait_events(listener, lambda event: event["id"] == job["id"], 4)]
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert daemon.output(job["id"], "log") == "1\n2\n3\nlast words\n"
    assert told == ["1", "2", "3", "last words"], told
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is False, attempt


def test_output_to_stderr_alone_waits_for_its_file_when_its_jobs_end_does(make_daemon: Any, tmp_path: Path) -> None:
    # A job that writes to stderr only, and ends while jobd cannot create that file: its end waits for the stderr
    # file alone (no stdout or log file is made), and what the job wrote there is kept whole once jobd can.
    daemon: Daemon = make_daemon(QUEUE)
    with _ended_waiting_for_its_files(daemon, tmp_path / "gate", "seq 5000 >&2; exit 3", "1.stderr") as job:
        pass
    finished = daemon.wait(job["id"])
    assert (finished["state"], finished["exit_code"]) == ("failed", 3), finished
    assert daemon.output(job["id"], "stderr") == "".join(f"{number}\n" for number in range(1, 5001))
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert (attempt["truncated"], attempt["stdout_bytes"], attempt["stderr_bytes"]) == (False, 0, 23_893), attempt
    assert sorted(os.listdir(daemon.state_dir / "output" / str(job["id"]))) == ["1.stderr"]
    assert "what the job writes there from now on is dropped" not in daemon.log()


def test_a_last_log_line_held_at_the_end_of_fd_3_is_written_while_its_job_runs_on(
    make_daemon: Any, tmp_path: Path
) -> None:
    # A job that closes fd 3 after a line without its newline, and runs on: that line is told at the pipe's
    # end-of-file. Held there for want of a descriptor, it is written once the file can be made, not at the job's end.
    daemon: Daemon = make_daemon(QUEUE)
    log = daemon.state_dir / "output" / "JOB" / "1.log"
    holding = Gate(tmp_path / "holding")  # keeps the job running once it has closed fd 3
    try:
        script = 'printf "last words" >&3; exec 3>&-; exec flock "$0" true'
        argv = ["sh", "-c", script, str(holding.path)]
        job = _writing_while_out_of_descriptors(daemon, tmp_path / "gate", argv, f"cannot create {log}: Too many open")
        with daemon.client() as client:
            written = client.call("job.output", {"id": job["id"], "stream": "log", "wait": True}, timeout=WAIT)
            assert written["data"] == "last words\n", written
            assert client.call("job.get", {"id": job["id"]})["state"] == "running"
    finally:
        holding.release()
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert daemon.output(job["id"], "log") == "last words\n"


def test_a_reload_asked_for_while_jobd_is_out_of_descriptors_is_refused_as_a_shortage(make_daemon: Any) -> None:
    # daemon.reload answered CONFIG_INVALID, "…/jobd.d: cannot list: Too many open files", and logged "reload
    # failed": the files were sound, jobd only had no descriptor to open them with.
    daemon: Daemon = make_daemon(QUEUE)
    with daemon.client() as client:
        client.call("ping")  # accepted (not left in the listen backlog) before the limit falls
        with out_of_descriptors(daemon), pytest.raises(RemoteError) as refused:
            client.call("daemon.reload", timeout=WAIT)
        assert refused.value.code == "OUT_OF_RESOURCES", refused.value
        assert "cannot list: Too many open files (jobd is short of open files or memory" in str(refused.value)
        assert str(refused.value).endswith(
            "the running configuration stays, and jobd reads the files again every 1s until it can"
        )
        assert {queue["name"] for queue in client.call("queue.list")["queues"]} == {"default"}
        reloaded = client.call("daemon.status")["last_reload"]
    log = daemon.log()
    assert "reload not done, keeping the running configuration: " in log, log
    assert "reload failed" not in log and "CONFIG_INVALID" not in log and "Traceback" not in log, log
    # Done again once jobd had descriptors: a success, with the same files.
    wait_for_log(daemon, "configuration reloaded from 1 file")
    assert reloaded["ok"] is False and "Too many open files" in reloaded["error"]
    assert daemon.call("daemon.status")["last_reload"]["ok"] is True


def test_a_change_seen_while_jobd_is_out_of_descriptors_is_applied_once_it_can_be(make_daemon: Any) -> None:
    # A change inotify told of while jobd had no descriptor was reloaded once, failed ("cannot list: Too many open
    # files", as if the files were broken), and was never applied: inotify tells a change once.
    daemon: Daemon = make_daemon(QUEUE)
    drop_in = daemon.config_dir / "jobd.d" / "60-more.toml"
    with out_of_descriptors(daemon):
        temporary = drop_in.with_name(".60-more.toml.tmp")
        temporary.write_text("[queue.more]\nconcurrency = 1\n")
        os.replace(temporary, drop_in)
        assert daemon.notify is not None
        daemon.notify.wait_for("RELOADING=1")  # the reload inotify asked for, while jobd has no descriptor…
        daemon.notify.wait_for("READY=1")  # …is over
    wait_for_log(daemon, "configuration reloaded from 2 files")  # done again once jobd had descriptors
    assert {queue["name"] for queue in daemon.call("queue.list")["queues"]} == {"default", "more"}
    log = daemon.log()
    assert "reload not done, keeping the running configuration: " in log and "reload failed" not in log, log


def _printed_short_of_descriptors(setup: str, short: str, after: str) -> list[str]:
    """The lines printed by Python code run in a process of its own: `setup`, then `short` with every descriptor
    below its lowered limit taken, then `after` with them given back."""
    script = "\n".join(
        [
            "import os, resource",
            textwrap.dedent(setup),
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))",
            "taken = []",
            "try:",
            "    while True:",
            '        taken.append(os.open("/dev/null", os.O_RDONLY))',
            "except OSError:",
            "    pass",
            textwrap.dedent(short),
            "for fd in taken:",
            "    os.close(fd)",
            textwrap.dedent(after),
        ]
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return ran.stdout.splitlines()


def test_a_user_looked_up_without_a_descriptor_to_spare_is_a_shortage_not_a_missing_user() -> None:
    # Python's pwd and grp say "name not found" whatever made glibc's lookup fail: without a descriptor to open
    # /etc/passwd with, a configuration naming `root` was invalid ("there is no user \"root\" on this system").
    printed = _printed_short_of_descriptors(
        "from jobd import users\nfrom jobd.errors import OutOfResources",
        """
        for lookup, name in ((users.user_ids, "root"), (users.group_id, "root")):
            try:
                lookup(name)
            except OutOfResources as error:
                print(error.message)
        """,
        'print(users.user_ids("root"), users.group_id("root"))',
    )
    assert printed == [
        "cannot look up the user 'root': Too many open files (jobd is short of open files or memory: see "
        "LimitNOFILE=); the configuration is not read now",
        "cannot look up the group 'root': Too many open files (jobd is short of open files or memory: see "
        "LimitNOFILE=); the configuration is not read now",
        "(0, 0) 0",
    ]


def test_an_account_looked_up_without_a_descriptor_to_spare_is_a_shortage_not_an_account_without_groups() -> None:
    # A job's account (its name, home and supplementary groups) is looked up as it starts. Without a descriptor to
    # open /etc/passwd with, glibc found no such uid, and the job's account was made of its uid and primary gid
    # alone: no name, "/" for its home, no supplementary group. getgrouplist(3) raises nothing either: without
    # /etc/group it answers the primary group alone. What each lookup answered, or the shortage it raised, is printed.
    printed = _printed_short_of_descriptors(
        "from jobd import users\nfrom jobd.errors import OutOfResources",
        """
        for lookup, arguments in ((users.account, (0, 0)), (users.groups_of, ("root", 0))):
            try:
                print("answered", lookup(*arguments))
            except OutOfResources as error:
                print(error.message)
        """,
        "print(users.account(0, 0))",
    )
    root = pwd.getpwuid(0)
    assert printed == [
        "cannot look up the account of uid 0: Too many open files (jobd is short of open files or memory: see "
        "LimitNOFILE=); the job waits in its queue and is started once jobd can look it up",
        "cannot look up the groups of the user 'root': Too many open files (jobd is short of open files or memory: "
        "see LimitNOFILE=); the job waits in its queue and is started once jobd can look it up",
        f"Account(uid=0, gid=0, name='root', home='{root.pw_dir}', groups={tuple(os.getgrouplist('root', 0))})",
    ]


def test_an_audit_entrys_user_looked_up_without_a_descriptor_to_spare_is_not_kept_as_its_uid() -> None:
    # An audit entry of a peer known by its uid alone (jobd itself, for a schedule) names its user, looked up once
    # and kept. Looked up without a descriptor to spare, "no such uid" was kept too: every entry after it named the
    # user by its number, for jobd's life.
    daemon_user = pwd.getpwnam("daemon")  # in /etc/passwd alone: nss-systemd answers root and nobody without a file
    setup = f"""
    from jobd import audit
    from jobd.peer import Peer
    peer = Peer(uid={daemon_user.pw_uid}, gid={daemon_user.pw_gid}, pid=0, is_admin=False)
    """
    printed = _printed_short_of_descriptors(setup, "print(audit.who(peer))", "print(audit.who(peer))")
    uid = daemon_user.pw_uid
    assert printed == [f"({uid}, '{uid}')", f"({uid}, 'daemon')"]


def test_a_job_that_starts_while_jobd_is_out_of_descriptors_waits_untried_and_gets_its_home_and_user_name(
    make_daemon: Any,
) -> None:
    # jobd looks its own account up once, at the first start of a job that runs as jobd, for the HOME, USER and
    # LOGNAME of such jobs. Looked up without a descriptor to spare, a user of /etc/passwd was "no such uid", and
    # that answer was kept for jobd's life: every job of jobd's user would have run with HOME=/ and neither USER nor
    # LOGNAME. (root, which jobd runs as here, is also answered by nss-systemd without a file; its groups are not.)
    # Now the job waits untried, with no spawn_error attempt, until the lookup can be made.
    daemon: Daemon = make_daemon(QUEUE)
    me = pwd.getpwuid(os.geteuid())
    with daemon.client() as client:
        client.call("ping")  # accepted (not left in the listen backlog) before the descriptors run out
        with out_of_descriptors(daemon):
            job = client.call("job.submit", {"command": ["/bin/sh", "-c", 'echo "$HOME|$USER|$LOGNAME"']})
            wait_for_log(daemon, f"job={job['id']} not started yet: cannot look up the ")
            wait_for_log(daemon, "no job starts for 1s: jobd is short of processes, open files or memory")
        finished = client.call("job.wait", {"id": job["id"], "timeout": WAIT}, timeout=WAIT + 5)
    assert finished["state"] == "succeeded", finished
    assert daemon.output(job["id"]) == f"{me.pw_dir}|{me.pw_name}|{me.pw_name}\n"
    assert [t["outcome"] for t in daemon.call("job.get", {"id": job["id"]})["tries"]] == ["succeeded"]


SCRIPT_WORKFLOW = """<workflow><subjobs><job name="one"><tasks>
<task type="SCRIPT" name="scripted" queue="default"><script>#!/bin/sh
echo scripted
</script></task>
</tasks></job></subjobs></workflow>"""


def test_a_workflow_script_task_whose_script_jobd_cannot_write_waits_for_a_descriptor(make_daemon: Any) -> None:
    # A SCRIPT task's script is written to a file as its job is submitted. Without a descriptor to spare the open
    # raised EMFILE out of the instance's launch: answered INTERNAL_ERROR, a traceback logged, and its task never
    # ran. Now the task waits QUEUED, without a job, and is submitted once jobd can write the script.
    daemon: Daemon = make_daemon(QUEUE, start=False)
    daemon.write_workflows(scripted=SCRIPT_WORKFLOW)
    daemon.start()
    with daemon.client() as client:
        client.call("ping")  # accepted (not left in the listen backlog) before the descriptors run out
        with out_of_descriptors(daemon):
            instance = client.call("instance.launch", {"workflow": "scripted"})["id"]
            wait_for_log(daemon, f"instance={instance} task ")
            assert (
                "not submitted yet: cannot write the script " + str(daemon.state_dir / "scripts" / f"{instance}-")
            ) in daemon.log()
        done = client.call("instance.wait", {"id": instance, "timeout": WAIT}, timeout=WAIT + 5)
        document = client.call("instance.get", {"id": instance, "format": "xml"})["xml"]
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), document
    assert "scripted" in document
    assert "Traceback" not in daemon.log()


BINARY_WORKFLOW = """<workflow><subjobs><job name="one"><tasks>
<task name="binary" path="/bin/true" queue="default"/>
</tasks></job></subjobs></workflow>"""


def _ran(client: Client, workflow: str) -> dict[str, Any]:
    """An instance of `workflow`, launched and waited for: as it ended."""
    launched = client.call("instance.launch", {"workflow": workflow})["id"]
    ended: dict[str, Any] = client.call("instance.wait", {"id": launched, "timeout": WAIT}, timeout=WAIT + 5)
    return ended


@pytest.mark.parametrize(
    ("in_its_place", "cause"),
    [("file", "Not a directory"), ("link to itself", "Too many levels of symbolic links")],
)
def test_a_scripts_directory_that_is_no_directory_does_not_stop_jobd_and_fails_script_tasks_saying_why(
    make_daemon: Any, in_its_place: str, cause: str
) -> None:
    # At its start jobd lists STATE_DIR/scripts for the scripts of instances that ended while it could not remove
    # them. Something else in its place stopped the start ("not starting: [Errno 20] Not a directory: …/scripts",
    # naming neither what jobd did nor what to do), and a SCRIPT task then failed its instance as "an error in jobd
    # (please report it)" with a traceback. Now jobd starts, says which directory cannot be listed and why, runs
    # every other task, and a SCRIPT task fails to start saying why; once mended, SCRIPT tasks run again.
    daemon: Daemon = make_daemon(QUEUE, start=False)
    daemon.write_workflows(scripted=SCRIPT_WORKFLOW, binary=BINARY_WORKFLOW)
    scripts = daemon.state_dir / "scripts"
    daemon.state_dir.mkdir(parents=True, exist_ok=True)
    if in_its_place == "file":
        scripts.write_text("not a directory\n")
    else:
        scripts.symlink_to("scripts")
    daemon.start()
    assert f"cannot list {scripts}, where SCRIPT tasks' scripts are written: {cause}; " in daemon.log()
    with daemon.client() as client:
        assert _ran(client, "binary")["errors"] == 0
        failed = _ran(client, "scripted")
        assert failed["errors"] == 1
        document = client.call("instance.get", {"id": failed["id"], "format": "xml"})["xml"]
        why = f"jobd could not submit the task: cannot write the script {scripts}/{failed['id']}-3: {cause}"
        assert why in document, document
        scripts.unlink()  # mended: jobd makes the directory again
        assert _ran(client, "scripted")["errors"] == 0
    log = daemon.log()
    assert "Traceback" not in log and "error in jobd" not in log, log


def test_a_scripts_directory_replaced_by_a_file_while_jobd_runs_does_not_fail_the_end_of_instances(
    make_daemon: Any,
) -> None:
    # An instance's end lists STATE_DIR/scripts to remove its scripts: a file put in its place made every instance's
    # end "an error in jobd (please report it)", with a traceback. Now the instance ends as it ran, and the log says
    # which directory cannot be listed and why.
    daemon: Daemon = make_daemon(QUEUE, start=False)
    daemon.write_workflows(binary=BINARY_WORKFLOW)
    daemon.start()
    scripts = daemon.state_dir / "scripts"
    scripts.write_text("not a directory\n")
    with daemon.client() as client:
        ended = _ran(client, "binary")
    assert (ended["status"], ended["errors"]) == ("TERMINATED", 0), ended
    wait_for_log(daemon, f"cannot list {scripts}, where SCRIPT tasks' scripts are written: Not a directory; ")
    log = daemon.log()
    assert "Traceback" not in log and "error in jobd" not in log, log


def test_a_scripts_directory_jobd_may_not_list_does_not_stop_its_start_and_is_cleaned_at_the_next_start_that_can(
    make_daemon: Any,
) -> None:
    # The same for a directory whose mode shuts jobd out: jobd is run as root without the capabilities that let root
    # pass over a file's mode (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so that mode 0000 refuses it the listing.
    daemon: Daemon = make_daemon(QUEUE, start=False)
    scripts = daemon.state_dir / "scripts"
    scripts.mkdir(parents=True)
    left = scripts / "7-3"  # the script of an instance that has ended (jobd knows no instance 7)
    left.write_text("#!/bin/sh\n")
    scripts.chmod(0)
    shut_out = "-dac_override,-dac_read_search"
    daemon.command_prefix = ["setpriv", f"--inh-caps={shut_out}", f"--bounding-set={shut_out}", "--"]
    daemon.start()
    assert f"cannot list {scripts}, where SCRIPT tasks' scripts are written: Permission denied; " in daemon.log()
    assert daemon.call("ping")["pong"] is True
    assert daemon.stop() == 0
    assert left.exists()
    scripts.chmod(0o700)
    daemon.start()
    wait_for_log(daemon, "removing the scripts left of ended instances 7")
    assert not left.exists()
    assert "Traceback" not in daemon.log()


PIDS_HIERARCHY = Path("/sys/fs/cgroup/pids")  # cgroup v1's pids controller, where a private cgroup can be made


def test_a_job_jobd_cannot_fork_for_a_process_limit_waits_and_the_error_names_the_limit(make_daemon: Any) -> None:
    # fork() failing with EAGAIN (a cgroup's pids.max, systemd's TasksMax=) was recorded and logged as "Resource
    # temporarily unavailable", which names no resource: now the error says which limits those are.
    daemon: Daemon = make_daemon(QUEUE)
    with _in_pids_cgroup(daemon) as cgroup:
        job = daemon.submit(command=["/bin/true"])
        wait_for_log(daemon, f"job={job['id']} delayed (attempt 1 spawn_error")
        (cgroup / "pids.max").write_text("max")
        assert daemon.wait(job["id"])["state"] == "succeeded"
    tries = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert tries[0]["outcome"] == "spawn_error"
    assert tries[0]["error"] == (
        "cannot start '/bin/true': Resource temporarily unavailable (too many processes: the pids.max of jobd's "
        "cgroup (systemd's TasksMax=), or the user's RLIMIT_NPROC)"
    )
    assert tries[-1]["outcome"] == "succeeded"


@contextlib.contextmanager
def _in_pids_cgroup(daemon: Daemon) -> Any:
    """The daemon in a cgroup v1 pids cgroup of its own whose pids.max is what jobd runs now (its threads): no fork
    succeeds. Yields the cgroup's directory, to lift the limit (`pids.max` = `max`); back where it was after."""
    if not os.access(PIDS_HIERARCHY / "cgroup.procs", os.W_OK):
        pytest.skip(f"no writable cgroup v1 pids hierarchy at {PIDS_HIERARCHY} to make a private cgroup in")
    cgroup = PIDS_HIERARCHY / f"jobd-test-{daemon.pid}"
    home = next(line.split(":", 2)[2] for line in Path(f"/proc/{daemon.pid}/cgroup").read_text().splitlines()
                if line.split(":")[1] == "pids")  # fmt: skip
    cgroup.mkdir()
    try:
        (cgroup / "cgroup.procs").write_text(str(daemon.pid))
        (cgroup / "pids.max").write_text((cgroup / "pids.current").read_text())
        yield cgroup
    finally:
        (cgroup / "pids.max").write_text("max")
        (PIDS_HIERARCHY / home.lstrip("/") / "cgroup.procs").write_text(str(daemon.pid))
        cgroup.rmdir()


def test_while_jobd_cannot_fork_it_tries_one_batch_a_second_not_every_waiting_job(make_daemon: Any) -> None:
    # Each job that could not start waited a second, and its timer then had its queue take more waiting jobs, which
    # failed alike: every waiting job was tried, recorded and logged once a second. 2,000 queued jobs under a
    # cgroup's pids.max kept jobd's loop so busy that a ping took 3 to 9 s. Now a failed start holds every start for
    # that second, and the queues then take what they have room for: at most `concurrency` tries a second.
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 4\n")
    with _in_pids_cgroup(daemon) as cgroup:
        jobs = daemon.call("job.submit", {"jobs": [{"command": ["/bin/true"]} for _ in range(40)]})["jobs"]
        first = jobs[0]["id"]
        third_try = f"job={first} delayed (attempt 3 spawn_error"
        wait_for_log(daemon, third_try)
        log = daemon.log()
        tried = log[: log.index(third_try)].count(" spawn_error, ") + 1  # the tries up to the first job's third
        (cgroup / "pids.max").write_text("max")
        states = [daemon.wait(job["id"], timeout=60)["state"] for job in jobs]
    assert tried <= 3 * 4, f"{tried} tries in the first three seconds of the shortage"
    assert states == ["succeeded"] * 40  # nothing lost once the processes are there


def test_while_jobd_cannot_fork_one_start_is_tried_per_hold_in_the_whole_daemon(make_daemon: Any) -> None:
    # After a start failed for want of processes, the other starts of the same batch were still tried, and so were
    # those of every other queue when the hold ended: each queue recorded up to `concurrency` failed attempts a
    # second. Now the batch's other starts are put back untried, and the other queues take nothing meanwhile.
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 4\n[queue.other]\nconcurrency = 4\n")
    hold = "no job starts for 1s: jobd is short of processes, open files or memory"
    with _in_pids_cgroup(daemon) as cgroup:
        specs = [{"command": ["/bin/true"], "queue": queue} for queue in ("default", "other") for _ in range(8)]
        jobs = daemon.call("job.submit", {"jobs": specs})["jobs"]
        wait_for_log(daemon, hold, count=4)
        (cgroup / "pids.max").write_text("max")
        states = [daemon.wait(job["id"], timeout=60)["state"] for job in jobs]
    log = daemon.log()
    holds = log.split(hold)
    assert len(holds) > 4
    failed_per_hold = [piece.count(" spawn_error, ") for piece in holds[:4]]
    assert failed_per_hold == [1, 1, 1, 1], failed_per_hold
    assert states == ["succeeded"] * 16  # nothing lost once the processes are there


def test_jobd_raises_its_soft_limit_on_open_files_to_what_its_queues_may_need(make_daemon: Any) -> None:
    # Started with systemd's soft limit of 1024 (here 256), jobd hit it at a few hundred job slots: jobs were put back
    # to start again later, each failed start recorded as a spawn_error attempt, and clients waited to be accepted.
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 100\n", start=False)
    daemon.command_prefix = ["prlimit", "--nofile=256:8192", "--"]
    daemon.start()
    needed = openfiles.needed(config.load([str(daemon.config_dir)]))
    assert 256 < needed < 8192
    assert soft_limit_on_open_files(daemon.pid) == needed
    assert f"raised the soft limit on open files from 256 to {needed}" in daemon.log()
    with daemon.client() as watcher, daemon.client() as client:
        watcher.call("events.subscribe", {"types": ["job.progress"]})
        # Each job holds all it can at once: its three pipes, its pidfd, and its stdout and stderr files (made on
        # their first byte, before the progress line that says so).
        command = ["sh", "-c", "echo out; echo err >&2; echo %50 >&3; exec sleep 600"]
        jobs = client.call("job.submit", {"jobs": [{"command": command} for _ in range(100)]})["jobs"]
        for _ in jobs:
            watcher.next_event(timeout=60)
        assert len(os.listdir(f"/proc/{daemon.pid}/fd")) > 256 + 100  # far past the soft limit it was given
        for job in jobs:
            client.call("job.cancel", {"id": job["id"]})
            ended = client.call("job.wait", {"id": job["id"], "timeout": 60}, timeout=70)
            assert (ended["state"], ended["attempts"]) == ("cancelled", 1), ended
    assert "Too many open files" not in daemon.log()


def test_an_unlimited_soft_limit_on_open_files_is_not_short() -> None:
    # RLIM_INFINITY is -1 in Python: compared as a number, it was below any need (a warning of a hard limit of -1).
    assert not openfiles.Fit(needed=600, before=resource.RLIM_INFINITY, after=resource.RLIM_INFINITY, hard=-1).short
    assert openfiles.Fit(needed=600, before=256, after=512, hard=512).short


def test_a_hard_limit_on_open_files_below_what_the_queues_may_need_is_warned_about(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 100\n", start=False)
    daemon.command_prefix = ["prlimit", "--nofile=256:700", "--"]
    daemon.start()
    needed = openfiles.needed(config.load([str(daemon.config_dir)]))
    assert soft_limit_on_open_files(daemon.pid) == 700  # as far as it could
    assert f"the configuration may need {needed} open files" in daemon.log()
    assert "the hard limit is 700" in daemon.log()
    # A reload to what fits says nothing more; one that needs more again warns again.
    daemon.write_config("[queue.default]\nconcurrency = 10\n")
    daemon.call("daemon.reload")
    assert daemon.log().count("may need") == 1
    daemon.write_config("[queue.default]\nconcurrency = 200\n")
    daemon.call("daemon.reload")
    assert daemon.log().count("may need") == 2


def _as_nobody(daemon: Daemon, program: str, argument: Any) -> Any:
    """What `program` (Python, given the socket's name and `argument` as JSON) prints as JSON, run by the user nobody
    in the daemon's directory."""
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", program,
         "jobd.sock", json.dumps(argument)],
        cwd=daemon.root,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


def test_a_task_with_parameters_env_takes_no_args(make_daemon: Any) -> None:
    """An env task's argv is its configuration's: its callers set only the variables allowed_params names. 'args'
    were appended to its argv all the same (documented for parameters = "args" and ad-hoc commands only), so a
    caller who was not an admin could hand the program options of its choosing, run as the task's user."""
    grant = '[[access.grant]]\nusers = ["nobody"]\nrights = ["read", "exec"]\ntasks = ["deploy"]\n'
    task = '[task.deploy]\ncommand = ["/bin/echo", "deploy"]\nparameters = "env"\nallowed_params = ["VERSION"]\n'
    daemon: Daemon = make_daemon(QUEUE + task + grant)
    os.chmod(daemon.socket_path, 0o666)
    program = (
        "import json, sys\n"
        "from jobd.client import Client, RemoteError\n"
        "with Client(sys.argv[1]) as c:\n"
        "    try:\n"
        "        print(json.dumps(c.call('job.submit', json.loads(sys.argv[2]))))\n"
        "    except RemoteError as e:\n"
        "        print(json.dumps({'code': e.code, 'message': e.message, 'param': e.data.get('param')}))\n"
    )
    submit = {"task": "deploy", "args": ["--config=/tmp/mine"]}
    refused = _as_nobody(daemon, program, submit)
    assert refused["code"] == "INVALID_PARAMS" and refused["param"] == "args", refused
    assert 'parameters = "env"' in refused["message"] and "give 'params'" in refused["message"], refused
    assert daemon.call("job.list", {})["jobs"] == []
    with pytest.raises(RemoteError, match="not 'args'"):  # nor for an admin: the docs never allowed it
        daemon.submit(task="deploy", args=["--config=/tmp/mine"])
    done = daemon.wait(daemon.submit(task="deploy", params={"VERSION": "2"})["id"])
    assert done["command"] == ["/bin/echo", "deploy"] and daemon.output(done["id"]) == "deploy\n"


def test_unprivileged_clients_set_only_the_variables_a_task_allows(make_daemon: Any) -> None:
    """A caller who is not an admin sets only the params a task's allowed_params names: any other could steer the
    program (PHPRC made php load the caller's code, as the task's user, while only a list of such names was
    refused). Admins may set any."""
    grant = '[[access.grant]]\nusers = ["nobody"]\nrights = ["read", "exec"]\ntasks = ["envtask", "closed"]\n'
    tasks = (
        '[task.envtask]\ncommand = ["/usr/bin/env"]\nparameters = "env"\nallowed_params = ["COLOUR", "SIZE"]\n'
        '[task.closed]\ncommand = ["/usr/bin/env"]\nparameters = "env"\n'
    )
    daemon: Daemon = make_daemon(QUEUE + tasks + grant)
    os.chmod(daemon.socket_path, 0o666)
    program = (
        "import json, sys\n"
        "from jobd.client import Client, RemoteError\n"
        "out = []\n"
        "with Client(sys.argv[1]) as c:\n"
        "    for params in json.loads(sys.argv[2]):\n"
        "        try:\n"
        "            out.append(c.call('job.submit', params)['id'])\n"
        "        except RemoteError as e:\n"
        "            out.append(e.code)\n"
        "print(json.dumps(out))\n"
    )
    attempts = [
        {"task": "envtask", "params": {"LD_PRELOAD": "/tmp/evil.so"}},
        {"task": "envtask", "params": {"PATH": "/tmp"}},
        {"task": "envtask", "params": {"PYTHONPATH": "/tmp"}},
        {"task": "envtask", "params": {"PHPRC": "/tmp", "COLOUR": "blue"}},
        {"task": "envtask", "params": {"OPENSSL_CONF": "/tmp/evil.cnf"}},
        {"task": "closed", "params": {"COLOUR": "blue"}},
        {"task": "envtask", "env": {"COLOUR": "blue"}},
        {"task": "envtask", "params": {"COLOUR": "blue", "SIZE": "25%"}},
        {"task": "closed"},
    ]
    codes = _as_nobody(daemon, program, attempts)
    assert codes[:7] == ["INSUFFICIENT_RIGHTS"] * 7, codes
    allowed, without_params = codes[7:]
    assert isinstance(allowed, int) and isinstance(without_params, int), codes
    output = daemon.output(daemon.wait(allowed)["id"])
    assert "COLOUR=blue\n" in output and "SIZE=25%\n" in output, output
    # An admin sets any name, allowed or not.
    job = daemon.submit(task="closed", params={"PHPRC": "/etc/php"})["id"]
    assert "PHPRC=/etc/php\n" in daemon.output(daemon.wait(job)["id"])


# The reads of the test below, measured in a Python of its own: tracemalloc counts the allocations of every thread of
# its process, and a thread of the test process could allocate that much meanwhile (a notify pump's recv(65536) as a
# datagram comes, pytest-xdist's receiver reading the next tests), failing the test for what jobd did not do.
_PEAK_OF_READS = """
import sys, tracemalloc
from jobd.engine.core import _read_at
output, unwritten = sys.argv[1:]
tracemalloc.start()
tracemalloc.reset_peak()
reads = [
    _read_at(output, 0, 1 << 20),
    _read_at(output, 2, 1 << 20),
    _read_at(output, 2, 2),
    _read_at(output, 9, 1 << 20),
    _read_at(unwritten, 0, 1 << 20),
]
_, peak = tracemalloc.get_traced_memory()
print(repr((reads, peak)))
"""


def test_reading_output_asks_for_what_the_file_holds_not_the_limit(tmp_path: Path) -> None:
    """job.output's `limit` goes up to 1 MiB: os.pread() allocated all of it for every read, however few bytes the
    file held, and each buffer cut down to those bytes left jobd's heap more fragmented (jobd.conffile.read)."""
    output = tmp_path / "1.stdout"
    output.write_bytes(b"done\n")
    measured = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_READS, str(output), str(tmp_path / "2.stdout")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    reads, peak = ast.literal_eval(measured.stdout)
    assert reads == [
        (b"done\n", 5),
        (b"ne\n", 5),
        (b"ne", 5),
        (b"", 5),  # past the end
        None,  # no file: the caller tells why (OUTPUT_MISSING)
    ]
    assert peak < 64 * 1024, f"reading 5 bytes took {peak} bytes at its peak"


def test_a_started_program_jobd_cannot_watch_is_stopped_and_its_job_tried_again(make_daemon: Any) -> None:
    # A pidfd_open() that failed after the spawn (no descriptor or memory left for it) escaped as an internal error:
    # the program ran on with nothing to reap it or record its end, and its job stayed `running` for good. strace
    # makes the first pidfd_open() jobd calls fail with EMFILE.
    daemon: Daemon = make_daemon(QUEUE)
    strace = subprocess.Popen(
        ["strace", "-e", "trace=pidfd_open", "-e", "inject=pidfd_open:error=EMFILE:when=1", "-p", str(daemon.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert strace.stderr is not None and "attached" in strace.stderr.readline()  # tracing from here on
        script = 'if [ "$JOBD_ATTEMPT" = 1 ]; then exec sleep 600; fi; echo done'
        job_id = daemon.submit(command=["/bin/sh", "-c", script])["id"]
        finished = daemon.wait(job_id)
    finally:
        strace.terminate()
        strace.wait()
    tries = daemon.call("job.get", {"id": job_id})["tries"]
    assert finished["state"] == "succeeded" and daemon.output(job_id) == "done\n", (finished, tries)
    first = tries[0]
    assert [t["outcome"] for t in tries] == ["spawn_error", "succeeded"], tries
    assert first["error"] == "cannot watch '/bin/sh' once started, so it was stopped: Too many open files", first
    assert daemon.children() == [], daemon.children()  # the first try's sleep was killed and reaped
    assert "internal error" not in daemon.log() and "Traceback" not in daemon.log()
