"""Jobs end to end against a real jobd: real children, real signals, real pipes and FIFOs, real uids.

Nothing here sleeps and polls. A test waits on the daemon (`job.wait`, event subscriptions), on the kernel (a pidfd
in select() with a deadline) or on a FIFO it holds. Timings are asserted only as lower bounds, and only where a
delay is the very behaviour under test (a job's delay, a retry back-off, a kill grace).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from recovery.support import wait_for_log

from jobd.client import Client, RemoteError, Reply, encode_message

CONFIG = """
[queue.default]
concurrency = 2

[queue.serial]
concurrency = 1

[queue.fifo]
concurrency = 1
scheduler = "fifo"

[task.echo]
command = ["/bin/echo"]

[task.envtask]
command = ["/bin/sh", "-c", 'echo "A=$A B=$B C=$C"']
parameters = "env"

[task.argtask]
command = ["/bin/sh", "-c", 'for a in "$@"; do echo "<$a>"; done', "argtask"]
"""

EVENT_TIMEOUT = 20.0
FINISHED = ("succeeded", "failed", "timed_out", "cancelled")
KILL_GRACE = 2.0  # what the harness's BASE_CONFIG sets (tests/harness.py)
MAX_PRIORITY = 2**32 - 1


@pytest.fixture
def server(make_daemon: Any) -> Any:
    # Nobody reads the daemon's NOTIFY_SOCKET after READY=1: the datagram queue fills after ~10 STATUS= updates,
    # and jobd must go on regardless (several tests here make far more than 10 state changes).
    return make_daemon(CONFIG)


# -- helpers -------------------------------------------------------------------------------------------------------


def sh(script: str, *args: str) -> list[str]:
    """An ad-hoc argv running `script` with /bin/sh; `args` become $1, $2, …"""
    return ["/bin/sh", "-c", script, "sh", *args]


def ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def get(server: Any, job_id: int) -> dict[str, Any]:
    job: dict[str, Any] = server.call("job.get", {"id": job_id})
    return job


def run(server: Any, **params: Any) -> dict[str, Any]:
    """Submit (`params` are job.submit's), wait for the end, return the job with its `tries`."""
    job = server.submit(**params)
    server.wait(job["id"])
    return get(server, job["id"])


def remote_error(server: Any, method: str, params: dict[str, Any]) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        server.call(method, params)
    return info.value


def next_matching(client: Client, wanted: Callable[[dict[str, Any]], bool], timeout: float = EVENT_TIMEOUT) -> dict:
    """The next event satisfying `wanted`, read with a deadline; the others on the way are skipped."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            event = client.next_event(timeout=max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"no matching event within {timeout}s; saw: {seen}") from None
        if wanted(event):
            return event
        seen.append(event)


def is_state(job_id: int, state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("type") == "job.state" and e["job"]["id"] == job_id and e["job"]["state"] == state


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie. An orphaned grandchild is reaped by init, not by jobd, so a
    zombie left for init counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_exit(pid: int, timeout: float = 10.0) -> None:
    """Block on a pidfd (with a deadline) until `pid` has exited; fail if it still runs by then."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        assert readable, f"process {pid} still runs {timeout}s later"
    finally:
        os.close(fd)
    assert not alive(pid)


@contextlib.contextmanager
def held_fifo(path: Path) -> Iterator[Callable[[], None]]:
    """A FIFO the test holds open for writing: a job's `read < FIFO` blocks until release() is called.

    Opened O_RDWR so opening never blocks; closing it at the end gives a still-blocked job EOF, so a failing test
    never leaves a job hanging.
    """
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)

    def release() -> None:
        os.write(fd, b"go\n")

    try:
        yield release
    finally:
        os.close(fd)


def read_pid(path: Path) -> int:
    text = path.read_text().strip()
    assert text.isdigit(), f"{path} holds {text!r}, not a pid"
    return int(text)


# -- 1. a job that succeeds --------------------------------------------------------------------------------------


def test_task_job_succeeds_with_output_and_a_complete_attempt_record(server: Any) -> None:
    job = server.submit(task="echo", args=["hello", "world"], context="user-17")
    assert job["state"] in ("queued", "running")
    assert job["task"] == "echo"
    assert job["command"] == ["/bin/echo", "hello", "world"]  # args are appended to the task's argv
    assert job["queue"] == "default" and job["priority"] == 1024 and job["context"] == "user-17"
    server.wait(job["id"])
    job = get(server, job["id"])
    assert job["state"] == "succeeded"
    assert job["exit_code"] == 0 and job["signal"] is None and job["attempts"] == 1
    assert job["started_at"] is not None and job["finished_at"] is not None
    assert ts(job["created_at"]) <= ts(job["started_at"]) <= ts(job["finished_at"])
    assert server.output(job["id"]) == "hello world\n"
    assert server.output(job["id"], "stderr") == ""
    [attempt] = job["tries"]
    assert attempt["number"] == 1 and attempt["job_id"] == job["id"]
    assert attempt["outcome"] == "succeeded" and attempt["exit_code"] == 0 and attempt["signal"] is None
    assert isinstance(attempt["pid"], int) and attempt["pid"] > 0
    assert isinstance(attempt["cpu_user"], float) and attempt["cpu_user"] >= 0
    assert isinstance(attempt["cpu_system"], float) and attempt["cpu_system"] >= 0
    assert isinstance(attempt["max_rss_kib"], int) and attempt["max_rss_kib"] > 0
    assert isinstance(attempt["wall_seconds"], float) and attempt["wall_seconds"] >= 0
    assert attempt["wall_seconds"] == pytest.approx(ts(attempt["finished_at"]) - ts(attempt["started_at"]), abs=1e-5)
    assert attempt["stdout_bytes"] == len("hello world\n") and attempt["stderr_bytes"] == 0
    assert attempt["truncated"] is False and attempt["error"] is None


def test_params_are_exported_as_environment_for_an_env_task(server: Any) -> None:
    job = run(server, task="envtask", params={"A": "1", "B": "two words"}, env={"C": "see"})
    assert job["state"] == "succeeded"
    assert job["command"] == ["/bin/sh", "-c", 'echo "A=$A B=$B C=$C"']  # nothing appended to argv
    assert server.output(job["id"]) == "A=1 B=two words C=see\n"


def test_params_are_appended_in_order_for_an_args_task(server: Any) -> None:
    job = run(server, task="argtask", params={"z": "last letter", "a": "first letter"})
    assert job["state"] == "succeeded"
    assert server.output(job["id"]) == "<last letter>\n<first letter>\n"


def test_env_option_reaches_an_ad_hoc_command(server: Any) -> None:
    job = run(server, command=sh('printf "%s|" "$FOO" "$EMPTY"'), env={"FOO": "bar baz", "EMPTY": ""})
    assert job["state"] == "succeeded"
    assert server.output(job["id"]) == "bar baz||"


def test_stdin_text_is_fed_to_the_job(server: Any) -> None:
    text = "héllo wörld\nsecond line\n"
    job = run(server, command=["/bin/cat"], stdin=text)
    assert job["state"] == "succeeded"
    assert server.output(job["id"]) == text
    assert job["tries"][0]["stdout_bytes"] == len(text.encode())


def test_stdin_base64_feeds_binary_input(server: Any) -> None:
    data = bytes(range(256)) * 4
    job = run(server, command=["/bin/cat"], stdin_base64=base64.b64encode(data).decode())
    assert job["state"] == "succeeded"
    reply = server.call("job.output", {"id": job["id"], "encoding": "base64", "limit": 65536})
    assert base64.b64decode(reply["data"]) == data
    assert reply["size"] == len(data) and reply["complete"] is True


def test_without_stdin_a_job_reads_end_of_file_at_once(server: Any) -> None:
    job = run(server, command=["/bin/cat"], timeout=10)
    assert job["state"] == "succeeded"
    assert server.output(job["id"]) == ""


def test_jobd_variables_are_in_the_environment_and_the_daemons_are_not(server: Any) -> None:
    job = run(server, command=["/usr/bin/env"], queue="serial")
    assert job["state"] == "succeeded"
    env = dict(line.split("=", 1) for line in server.output(job["id"]).splitlines())
    assert env["JOBD_JOB_ID"] == str(job["id"])
    assert env["JOBD_QUEUE"] == "serial"
    assert env["JOBD_ATTEMPT"] == "1"
    assert "PATH" in env
    # jobd's own systemd notification socket must not leak: a job could speak to systemd in jobd's name.
    assert "NOTIFY_SOCKET" not in env


# Execs the rest of its arguments with signals ignored and blocked, as a careless starter leaves them (`jobd &` in a
# script ignores SIGINT and SIGQUIT; a supervisor may block signals in its children): the exec keeps both.
WITH_SIGNALS_IGNORED_AND_BLOCKED = """
import os, signal, sys
for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(number, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM})
os.execvp(sys.argv[1], sys.argv[1:])
"""


def test_a_job_has_no_signal_ignored_or_blocked_whatever_jobd_was_started_with(make_daemon: Any) -> None:
    # Jobs inherited what jobd's starter ignored and blocked (an exec resets only handlers): a job with SIGTERM
    # blocked lived through its cancel until the SIGKILL after kill_grace. systemd gives a service none of either.
    daemon = make_daemon(CONFIG, start=False)
    daemon.command_prefix = [sys.executable, "-c", WITH_SIGNALS_IGNORED_AND_BLOCKED]
    daemon.start()
    job = run(daemon, command=["/bin/grep", "^Sig", "/proc/self/status"])  # grep itself ignores and blocks none
    status = dict(line.split(":\t") for line in daemon.output(job["id"]).splitlines())
    # Every signal a program can use, that is: 32 and 33 are the C library's own (glibc's thread cancellation and
    # set*id broadcast), which it sets up itself when it uses them and lets no program change (sigaction(2) refuses
    # them, so Python's signal module does too). GNU make leaves them ignored in what it starts, `make test` included,
    # and they reach the job as jobd got them.
    usable = sum(1 << (number - 1) for number in signal.valid_signals())
    assert (int(status["SigBlk"], 16) & usable, int(status["SigIgn"], 16) & usable) == (0, 0), status
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        job = client.call("job.submit", {"command": ["/bin/sleep", "100"]}, timeout=10)
        next_matching(client, is_state(job["id"], "running"))
        assert client.call("job.cancel", {"id": job["id"]}, timeout=10)["state"] == "cancelled"
    [attempt] = get(daemon, job["id"])["tries"]
    assert attempt["signal"] == signal.SIGTERM, attempt  # not the SIGKILL after kill_grace


def test_a_job_gets_the_documented_variables_and_no_other(make_daemon: Any) -> None:
    """docs/jobs.md lists the whole environment of a job: what else jobd was started with stays with jobd (a
    secret of its starter's, a locale variable other than LANG and LC_ALL, systemd's NOTIFY_SOCKET)."""
    daemon = make_daemon(CONFIG, start=False)
    daemon.env = {"STARTERS_SECRET": "hunter2", "LC_CTYPE": "C", "OLDPWD": "/tmp"}
    daemon.start()
    job = run(daemon, command=["/usr/bin/env", "-0"])
    env = dict(entry.split("=", 1) for entry in daemon.output(job["id"]).split("\0") if entry)
    passed_on = {name for name in ("LANG", "LC_ALL", "TZ") if name in os.environ}
    own = {"PATH", "HOME", "USER", "LOGNAME", "JOBD_JOB_ID", "JOBD_QUEUE", "JOBD_ATTEMPT"}
    assert set(env) == own | passed_on, env
    assert env["PATH"] == os.environ["PATH"] and env["HOME"] == "/root" and env["USER"] == env["LOGNAME"] == "root"


def test_working_dir_of_an_ad_hoc_command(server: Any, tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    job = run(server, command=sh("pwd -P"), working_dir=str(workdir))
    assert job["state"] == "succeeded"
    assert server.output(job["id"]) == f"{os.path.realpath(workdir)}\n"


def test_a_program_that_cannot_be_started_is_a_spawn_error(server: Any) -> None:
    job = run(server, command=["/nonexistent/program"])
    assert job["state"] == "failed"
    [attempt] = job["tries"]
    assert attempt["outcome"] == "spawn_error"
    assert "/nonexistent/program" in attempt["error"]


def test_jobs_that_cannot_start_leave_their_slots_to_the_next(server: Any) -> None:
    # The slots freed by spawn errors must be taken by the jobs behind, with no other event to wake the queue.
    server.call("queue.pause", {"name": "default"})  # concurrency 2
    bad = [server.submit(command=["/nonexistent/program"])["id"] for _ in range(2)]
    good = [server.submit(command=["/bin/echo", str(n)])["id"] for n in range(3)]
    server.call("queue.resume", {"name": "default"})
    assert [server.wait(job_id)["state"] for job_id in bad] == ["failed", "failed"]
    assert [server.wait(job_id)["state"] for job_id in good] == ["succeeded"] * 3


def test_a_job_cancelled_while_it_waits_for_a_retry_says_so(server: Any) -> None:
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        job = server.submit(command=sh("exit 4"), retry={"times": 3, "delay": 3600})
        waiting = next_matching(client, lambda e: e["job"]["id"] == job["id"] and e["job"]["state"] == "delayed")
    assert waiting["job"]["attempts"] == 1, waiting
    cancelled = server.call("job.cancel", {"id": job["id"]})
    assert cancelled["state"] == "cancelled"
    assert cancelled["error"] == "cancelled while it waited to be tried again"
    assert server.call("job.cancel", {"id": server.submit(command=["/bin/true"], delay=3600)["id"]})["error"] == (
        "cancelled before it ran"
    )


def test_a_working_dir_that_cannot_be_entered_is_named_as_the_problem(server: Any) -> None:
    job = run(server, command=["/bin/true"], working_dir="/nonexistent/dir")
    [attempt] = job["tries"]
    assert attempt["outcome"] == "spawn_error"
    assert attempt["error"].startswith("cannot change to working directory '/nonexistent/dir'"), attempt["error"]


@pytest.mark.parametrize("working_dir", ["", "relative/dir", "."])
def test_a_working_dir_that_is_not_absolute_is_refused_at_submit(server: Any, working_dir: str) -> None:
    # Relative to jobd's own working directory, which is none of the client's business: refused, not run.
    error = remote_error(server, "job.submit", {"command": ["/bin/true"], "working_dir": working_dir})
    assert error.data["code"] == "INVALID_PARAMS" and error.data["param"] == "working_dir", error.data
    assert f"working_dir = {json.dumps(working_dir)} is not allowed; expected an absolute path" in error.message


@pytest.mark.parametrize("value", ["", True])
def test_an_empty_or_non_text_key_is_refused(server: Any, value: Any) -> None:
    # An empty key used to name a job like any other: every later submit with "" got that first job back, and ran
    # nothing. Values are quoted as the client wrote them (JSON), not as Python prints them.
    error = remote_error(server, "job.submit", {"command": ["/bin/true"], "key": value})
    assert error.data["code"] == "INVALID_PARAMS" and error.data["param"] == "key", error.data
    assert f"key = {json.dumps(value)} is not allowed" in error.message, error.message


# -- 2. exit codes and signals -----------------------------------------------------------------------------------


def test_exit_codes_are_reported_exactly(server: Any) -> None:
    codes = (0, 1, 77, 254, 255)
    jobs = {code: server.submit(command=sh(f"exit {code}")) for code in codes}
    for code, job in jobs.items():
        server.wait(job["id"])
        job = get(server, job["id"])
        assert job["exit_code"] == code, job
        assert job["signal"] is None
        assert job["state"] == ("succeeded" if code == 0 else "failed")
        [attempt] = job["tries"]
        assert attempt["exit_code"] == code and attempt["signal"] is None
        assert attempt["outcome"] == ("succeeded" if code == 0 else "failed")


def test_a_job_killed_by_its_own_signal_fails_with_that_signal(server: Any) -> None:
    job = run(server, command=sh("kill -9 $$"))
    assert job["state"] == "failed"
    assert job["signal"] == 9 and job["exit_code"] is None
    [attempt] = job["tries"]
    assert attempt["outcome"] == "failed" and attempt["signal"] == 9 and attempt["exit_code"] is None


# -- 3. priority and fifo order ----------------------------------------------------------------------------------


def _start_order(server: Any, tmp_path: Path, queue: str, priorities: list[int | None]) -> tuple[list[int], list[int]]:
    """Submit one job per priority to a paused queue, resume it; returns (ids in submission order, start order)."""
    order_file = tmp_path / f"{queue}.order"
    order_file.touch()
    assert server.call("queue.pause", {"name": queue})["paused"] is True
    ids = []
    for priority in priorities:
        params: dict[str, Any] = {"command": sh('echo "$JOBD_JOB_ID" >> "$1"', str(order_file)), "queue": queue}
        if priority is not None:
            params["priority"] = priority
        job = server.submit(**params)
        assert job["state"] == "queued"
        assert job["priority"] == (1024 if priority is None else priority)
        ids.append(job["id"])
    assert server.call("queue.resume", {"name": queue})["paused"] is False
    for job_id in ids:
        assert server.wait(job_id)["state"] == "succeeded"
    started = [int(line) for line in order_file.read_text().split()]
    return ids, started


def test_priority_queue_starts_lower_priority_values_first_then_in_submission_order(
    server: Any, tmp_path: Path
) -> None:
    priorities: list[int | None] = [500, 10, None, 10, 0, MAX_PRIORITY, 500, 1024, 1023]
    ids, started = _start_order(server, tmp_path, "serial", priorities)
    effective = [1024 if p is None else p for p in priorities]
    expected = [job_id for _, _, job_id in sorted(zip(effective, range(len(ids)), ids, strict=True))]
    assert started == expected


def test_fifo_queue_ignores_priority(server: Any, tmp_path: Path) -> None:
    ids, started = _start_order(server, tmp_path, "fifo", [5000, 1, 3000, 0, None, MAX_PRIORITY])
    assert started == ids


def test_the_jobs_of_one_submit_are_ready_together_and_the_best_starts_first(server: Any, tmp_path: Path) -> None:
    """A batch is committed in one transaction: its jobs become ready together, and an idle queue's free slot goes
    to the best of them. It went to the batch's first job, whatever its priority, which was put in the queue and
    started before the next one was (found by tests/test_queue_model.py)."""
    order_file = tmp_path / "order"
    order_file.touch()
    with held_fifo(tmp_path / "hold") as release:
        script = 'read x < "$1"; echo "$JOBD_JOB_ID" >> "$2"'
        members = [
            {"command": sh(script, str(tmp_path / "hold"), str(order_file)), "queue": "serial", "priority": priority}
            for priority in (500, 10, 10, 0)
        ]
        ids = [job["id"] for job in server.call("job.submit", {"jobs": members})["jobs"]]
        # The submit's own work is done before the daemon reads another request (docs/protocol.md, job.submit).
        assert [get(server, job_id)["state"] for job_id in ids] == ["queued", "queued", "queued", "running"]
        for _ in ids:
            release()
        for job_id in ids:
            assert server.wait(job_id)["state"] == "succeeded"
    assert [int(line) for line in order_file.read_text().split()] == [ids[3], ids[1], ids[2], ids[0]]


# -- 4. concurrency ----------------------------------------------------------------------------------------------

COUNTING_JOB = """
exec 9>>"$1/lock"
flock 9; n=$(( $(cat "$1/count") + 1 )); echo $n > "$1/count"; echo $n >> "$1/seen"; flock -u 9
sleep 0.3
flock 9; n=$(( $(cat "$1/count") - 1 )); echo $n > "$1/count"; flock -u 9
"""


def test_a_queue_never_runs_more_than_its_concurrency(server: Any, tmp_path: Path) -> None:
    (tmp_path / "count").write_text("0\n")
    ids = [server.submit(command=sh(COUNTING_JOB, str(tmp_path)))["id"] for _ in range(6)]
    intervals = []
    for job_id in ids:
        assert server.wait(job_id)["state"] == "succeeded"
        [attempt] = get(server, job_id)["tries"]
        intervals.append((ts(attempt["started_at"]), ts(attempt["finished_at"])))
    # Seen by the jobs themselves, under a lock:
    assert max(int(n) for n in (tmp_path / "seen").read_text().split()) == 2
    # Seen in the attempt records: sweep the intervals, an end before a start at the same instant.
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2


# -- 5. delay ----------------------------------------------------------------------------------------------------


def test_a_delayed_job_waits_its_delay_then_runs(server: Any) -> None:
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        job = client.call("job.submit", {"command": ["/bin/true"], "delay": 1}, timeout=10)
        assert job["state"] == "delayed"
        assert ts(job["run_at"]) - ts(job["created_at"]) == pytest.approx(1.0, abs=1e-3)
        assert client.call("job.get", {"id": job["id"]}, timeout=10)["state"] == "delayed"
        [default] = [q for q in client.call("queue.list", timeout=10)["queues"] if q["name"] == "default"]
        assert default["delayed"] == 1
        states = []
        while not states or states[-1] not in FINISHED:
            event = next_matching(client, lambda e: e["type"] == "job.state" and e["job"]["id"] == job["id"])
            states.append(event["job"]["state"])
    assert states == ["delayed", "queued", "running", "succeeded"]
    job = get(server, job["id"])
    assert ts(job["started_at"]) - ts(job["created_at"]) >= 1.0


# -- 6. timeouts -------------------------------------------------------------------------------------------------


def test_timeout_kills_the_whole_process_group(server: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    job = run(server, command=sh('sleep 1000 & echo $! > "$1"; sleep 1000', str(pid_file)), timeout=0.5)
    assert job["state"] == "timed_out"
    [attempt] = job["tries"]
    assert attempt["outcome"] == "timed_out"
    assert attempt["signal"] == signal.SIGTERM and attempt["exit_code"] is None
    assert ts(attempt["finished_at"]) - ts(attempt["started_at"]) >= 0.5
    wait_exit(read_pid(pid_file))


def test_a_leader_ignoring_sigterm_is_killed_after_the_grace(server: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = """trap '' TERM; sleep 1000 & echo $! > "$1"; wait $!"""
    job = run(server, command=sh(script, str(pid_file)), timeout=0.5)
    assert job["state"] == "timed_out"
    [attempt] = job["tries"]
    assert attempt["outcome"] == "timed_out"
    assert attempt["signal"] == signal.SIGKILL and attempt["exit_code"] is None
    assert ts(attempt["finished_at"]) - ts(attempt["started_at"]) >= 0.5 + KILL_GRACE
    wait_exit(read_pid(pid_file))  # it ignored SIGTERM too: only the SIGKILL to the group ended it


# Made the controlling terminal of the process that runs it, then execs the rest of its arguments (the same pid): a
# jobd run in the foreground on a terminal, as `make run` does.
WITH_A_TERMINAL = """
import fcntl, os, pty, sys, termios
terminal, side = pty.openpty()
# Kept open in jobd, out of the way of the fd 3 it takes for itself: its last close would hang up the terminal.
os.set_inheritable(fcntl.fcntl(terminal, fcntl.F_DUPFD, 100), True)
os.setsid()
fcntl.ioctl(side, termios.TIOCSCTTY, 0)
os.execvp(sys.argv[1], sys.argv[1:])
"""


def test_a_job_does_not_share_the_controlling_terminal_of_a_jobd_run_on_one(make_daemon: Any) -> None:
    # Jobs were put in a process group of their own, but stayed in jobd's session: with jobd started from a terminal,
    # a job (perhaps one running as another user) could open /dev/tty and push input into root's shell (TIOCSTI).
    daemon = make_daemon(CONFIG, start=False)
    daemon.command_prefix = [sys.executable, "-c", WITH_A_TERMINAL]
    daemon.start()
    assert Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()[4] != "0"  # jobd has a terminal
    tty = "if true 2>/dev/null </dev/tty; then echo terminal; else echo none; fi"
    script = f'{tty}; echo $$; cut -d" " -f6 /proc/$$/stat'
    job = run(daemon, command=sh(script))
    assert job["state"] == "succeeded", job
    answer, pid, session = daemon.output(job["id"]).split()
    assert answer == "none"
    assert session == pid  # a session of its own, which it leads (jobd's is another)


# -- 7. a grandchild holding stdout -------------------------------------------------------------------------------


def test_a_grandchild_keeping_stdout_open_does_not_delay_completion(server: Any, tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    try:
        # Every call has a deadline well under the sleeper's 30 s: a jobd that waited for the end of stdout,
        # whether in the job's completion or by blocking its loop, misses one of them.
        with server.client() as client:
            job = client.call(
                "job.submit", {"command": sh('sleep 30 & echo $! > "$1"; echo done', str(pid_file))}, timeout=10
            )
            finished = client.call("job.wait", {"id": job["id"], "timeout": 10}, timeout=15)
            assert finished["state"] == "succeeded", "the job did not complete while its grandchild held stdout"
            assert finished["exit_code"] == 0
            assert client.call("job.output", {"id": job["id"]}, timeout=10)["data"] == "done\n"
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_grandchildren_writing_on_after_the_leader_exits_do_not_hold_jobd(server: Any, tmp_path: Path) -> None:
    # What is in the pipes at the leader's exit is kept, and no more: parsing fd 3 line by line is slower than
    # `yes` writes, so draining "until empty" would keep jobd's event loop in that drain for as long as they write.
    pid_file = tmp_path / "writers.pid"
    floods = 'yes >&3 & echo $! >> "$1"; yes & echo $! >> "$1"; yes >&2 & echo $! >> "$1"; sleep 0.3'
    try:
        with server.client() as client:
            job = client.call("job.submit", {"command": sh(floods, str(pid_file))}, timeout=10)
            finished = client.call("job.wait", {"id": job["id"], "timeout": 20}, timeout=30)
            assert finished["state"] == "succeeded", finished
            assert client.call("ping", timeout=10)["pong"] is True
    finally:
        for line in pid_file.read_text().split() if pid_file.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), signal.SIGKILL)


def test_merge_stderr_puts_both_streams_into_stdout_in_the_order_written(server: Any) -> None:
    job = run(server, command=sh("echo one; echo two >&2; echo three"), merge_stderr=True)
    assert job["state"] == "succeeded"
    assert server.call("job.output", {"id": job["id"]})["data"] == "one\ntwo\nthree\n"
    assert server.call("job.output", {"id": job["id"], "stream": "stderr"})["data"] == ""
    separate = run(server, command=sh("echo one; echo two >&2"))
    assert server.call("job.output", {"id": separate["id"]})["data"] == "one\n"
    assert server.call("job.output", {"id": separate["id"], "stream": "stderr"})["data"] == "two\n"


# -- 8. output limits --------------------------------------------------------------------------------------------


def test_output_beyond_max_output_is_dropped_and_marked_truncated(server: Any) -> None:
    job = run(server, command=sh("yes 0123456789 | head -c 5000000"), max_output=1000)
    assert job["state"] == "succeeded"
    [attempt] = job["tries"]
    assert attempt["stdout_bytes"] == 1000
    assert attempt["truncated"] is True
    reply = server.call("job.output", {"id": job["id"], "limit": 1024 * 1024})
    assert reply["size"] == 1000 and len(reply["data"]) == 1000
    assert reply["data"] == ("0123456789\n" * 100)[:1000]
    assert reply["truncated"] is True and reply["complete"] is True


def test_only_the_stream_that_was_cut_says_so(server: Any) -> None:
    # One stream beyond max_output marks the attempt truncated; job.output (and jobctl log) used to say so of
    # every stream of it, though the others were whole.
    job = run(server, command=sh("echo small; echo note >&3; yes | head -c 20000 >&2"), max_output=1000)
    assert job["tries"][0]["truncated"] is True
    cut = {
        s: server.call("job.output", {"id": job["id"], "stream": s})["truncated"] for s in ("stdout", "stderr", "log")
    }
    assert cut == {"stdout": False, "stderr": True, "log": False}, cut


def test_with_max_output_0_only_the_streams_written_to_say_they_were_cut(server: Any) -> None:
    # Every stream of such a job holds the whole max_output (nothing): which one lost bytes is what jobd recorded.
    job = run(server, command=sh("echo dropped"), max_output=0)
    assert (job["tries"][0]["truncated"], job["tries"][0]["stdout_bytes"]) == (True, 0)
    cut = {
        s: server.call("job.output", {"id": job["id"], "stream": s})["truncated"] for s in ("stdout", "stderr", "log")
    }
    assert cut == {"stdout": True, "stderr": False, "log": False}, cut


def test_a_last_log_line_without_a_newline_is_kept(server: Any) -> None:
    for _ in range(20):  # the pipe's end-of-file and the leader's exit reach jobd in either order
        job = run(server, command=sh("echo first >&3; printf 'last words' >&3"))
        assert server.call("job.output", {"id": job["id"], "stream": "log"})["data"] == "first\nlast words\n"


def test_log_lines_beyond_max_output_are_dropped_and_marked_truncated(server: Any) -> None:
    job = run(server, command=sh("for i in $(seq 10 99); do echo line$i >&3; done"), max_output=70)
    [attempt] = job["tries"]
    assert attempt["truncated"] is True and attempt["stdout_bytes"] == 0
    reply = server.call("job.output", {"id": job["id"], "stream": "log"})
    assert reply["data"] == "".join(f"line{i}\n" for i in range(10, 20)) and reply["truncated"] is True
    whole = run(server, command=sh("echo only >&3"), max_output=70)
    assert whole["tries"][0]["truncated"] is False


def test_log_lines_longer_than_one_read_arrive_whole(server: Any) -> None:
    """fd 3 is read a few KiB at a time (so that a flood of lines cannot hold the loop): a line of 20,000 bytes, and
    the progress line after it, still arrive whole, as one line each."""
    job = run(server, command=sh("head -c 20000 /dev/zero | tr '\\0' x >&3; echo >&3; echo %42 >&3; echo end >&3"))
    lines = server.call("job.output", {"id": job["id"], "stream": "log", "limit": 65536})["data"].split("\n")
    assert [len(line) for line in lines] == [20000, 3, 0] and lines[1] == "end", lines[1:]
    assert job["progress"] == 42


def test_a_progress_line_with_thousands_of_digits_is_100_percent(server: Any) -> None:
    """int() refuses more than 4,300 digits: such a `%NNN…` line (the job's to write) raised in the middle of reading
    fd 3, and the job stayed `running` for ever, its timeout and jobd's stop with it. Leading zeros are no digits."""
    many = "%" + "7" * 5000
    padded = "%" + "0" * 5000 + "42"
    script = 'echo %5 >&3; echo "$1" >&3; echo between >&3; echo "$2" >&3; echo after >&3; echo "$3" >&3'
    job = run(server, command=sh(script, padded, "%" + "0" * 5000, many), timeout=30)
    assert job["state"] == "succeeded", job
    assert job["progress"] == 100
    assert server.call("job.output", {"id": job["id"], "stream": "log"})["data"] == "between\nafter\n"
    zeros = run(server, command=sh('echo "$1" >&3', padded), timeout=30)
    assert zeros["progress"] == 42


def test_utf8_output_read_in_pieces_never_splits_a_character(server: Any) -> None:
    job = run(server, command=["/usr/bin/printf", "a\\303\\251\\342\\202\\254b"])  # "aé€b": 1 + 2 + 3 + 1 bytes
    assert server.output(job["id"]) == "aé€b"

    def piece(offset: int, limit: int) -> tuple[str, int]:
        chunk = server.call("job.output", {"id": job["id"], "offset": offset, "limit": limit})
        return chunk["data"], chunk["next_offset"]

    assert piece(0, 2) == ("a", 1)  # "é" would be cut: it is left for the next piece
    pieces, offset = [], 0
    while offset < 7:
        data, offset = piece(offset, 3)
        pieces.append(data)
    assert pieces == ["aé", "€", "b"]
    assert piece(0, 7) == ("aé€b", 7)
    # A limit shorter than the character at the offset gets that character whole, rather than each read with it
    # splitting the character into U+FFFDs (one per byte) and moving on past it.
    pieces, offset = [], 0
    while offset < 7:
        data, offset = piece(offset, 1)
        pieces.append(data)
    assert pieces == ["a", "é", "€", "b"]


def test_following_utf8_output_waits_for_the_rest_of_a_character(server: Any, tmp_path: Path) -> None:
    """A job that has written only the first byte of "é" so far: a follower waiting at that offset gets the whole
    character once the job writes its second byte, not a U+FFFD for each byte."""
    fifo = tmp_path / "gate"
    with held_fifo(fifo) as release:
        job = server.submit(command=sh('printf "\\303"; read x < "$1"; printf "\\251!"', str(fifo)))
        # The first byte is there (read as bytes, which have no characters to wait for).
        first = server.call("job.output", {"id": job["id"], "encoding": "base64", "wait": True}, timeout=20)
        assert base64.b64decode(first["data"]) == b"\xc3" and first["complete"] is False
        # Without waiting: nothing whole to send yet, so nothing, and the offset stays.
        now = server.call("job.output", {"id": job["id"]})
        assert (now["data"], now["next_offset"], now["complete"]) == ("", 0, False)
        # Past what it has written: nothing yet either.
        later = server.call("job.output", {"id": job["id"], "offset": 1})
        assert (later["data"], later["next_offset"], later["complete"]) == ("", 1, False)
        with server.client() as follower:
            follower.send_raw(
                encode_message(
                    {"jsonrpc": "2.0", "id": 1, "method": "job.output", "params": {"id": job["id"], "wait": True}}
                )
            )
            follower.send_raw(encode_message({"jsonrpc": "2.0", "id": 2, "method": "ping"}))
            assert follower.read_line(timeout=10)["id"] == 2  # job.output waits: the ping overtook it
            release()
            reply = follower.read_line(timeout=20)
        assert reply["id"] == 1, reply
        assert reply["result"]["data"] in ("é", "é!") and reply["result"]["next_offset"] == len(
            reply["result"]["data"].encode()
        )
    assert server.wait(job["id"])["state"] == "succeeded"
    assert server.output(job["id"]) == "é!"


def test_a_huge_output_keeps_the_daemons_memory_flat(server: Any) -> None:
    job = run(server, command=["/usr/bin/head", "-c", "200000000", "/dev/zero"], max_output=1024 * 1024)
    assert job["state"] == "succeeded"
    [attempt] = job["tries"]
    assert attempt["stdout_bytes"] == 1024 * 1024 and attempt["truncated"] is True
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{server.pid}/status").read_text().splitlines() if ":" in line
    )
    peak_kib = int(status["VmHWM"].split()[0])  # the high-water mark: the peak over the daemon's life
    assert peak_kib < 150 * 1024, f"jobd's resident memory peaked at {peak_kib} KiB"


# -- 9. retries --------------------------------------------------------------------------------------------------


def test_retries_back_off_exponentially_then_fail(server: Any) -> None:
    retry = {"times": 2, "delay": 0.2, "backoff": 2}
    job = run(server, command=sh("echo attempt $JOBD_ATTEMPT; exit 5"), retry=retry)
    assert job["state"] == "failed" and job["attempts"] == 3 and job["exit_code"] == 5
    tries = job["tries"]
    assert [t["number"] for t in tries] == [1, 2, 3]
    assert [t["outcome"] for t in tries] == ["failed"] * 3
    assert [t["exit_code"] for t in tries] == [5] * 3
    starts = [ts(t["started_at"]) for t in tries]
    ends = [ts(t["finished_at"]) for t in tries]
    # The back-off counts from the end of the failed attempt; 1 µs for the timestamps' rounding.
    assert starts[1] - ends[0] >= 0.2 - 1e-6
    assert starts[2] - ends[1] >= 0.4 - 1e-6
    assert starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4
    for number in (1, 2, 3):
        assert server.output(job["id"], attempt=number) == f"attempt {number}\n"


def test_a_retry_delay_of_0_stays_0_however_steep_the_back_off(server: Any) -> None:
    """delay × backoff^(n − 1) is 0 for a delay of 0: no try waits, not even once backoff^(n − 1) is past what a
    float holds (3e9^32), where a wait would otherwise be taken as beyond any date and become a year's."""
    retry = {"times": 40, "delay": 0, "backoff": 3e9}
    job = run(server, command=sh("exit 2"), retry=retry)
    assert job["state"] == "failed" and job["attempts"] == 41, job
    assert [t["outcome"] for t in job["tries"]] == ["failed"] * 41


@pytest.mark.parametrize("queue", ["serial", "fifo"])
def test_a_retried_job_keeps_its_place_in_the_queue(server: Any, tmp_path: Path, queue: str) -> None:
    """Ready again for its retry, a job is ordered by its priority and submission as when it was submitted: ahead of
    a job of the same priority submitted after it (docs/jobs.md, Retries)."""
    order_file = tmp_path / "order"
    order_file.touch()
    server.call("queue.pause", {"name": queue})
    first = server.submit(
        command=sh('[ "$JOBD_ATTEMPT" = 1 ] && exit 1; echo "$JOBD_JOB_ID" >> "$1"', str(order_file)),
        queue=queue,
        retry={"times": 1, "delay": 0},
    )
    later = server.submit(command=sh('echo "$JOBD_JOB_ID" >> "$1"', str(order_file)), queue=queue)
    server.call("queue.resume", {"name": queue})
    assert server.wait(first["id"])["state"] == "succeeded" and server.wait(later["id"])["state"] == "succeeded"
    assert [int(line) for line in order_file.read_text().split()] == [first["id"], later["id"]]


def test_on_exit_codes_limits_which_failures_are_retried(server: Any) -> None:
    retry = {"times": 2, "delay": 0.05, "on_exit_codes": [75]}
    other = server.submit(command=sh("exit 3"), retry=retry)
    listed = server.submit(command=sh("exit 75"), retry=retry)
    other = server.wait(other["id"])
    assert other["state"] == "failed" and other["attempts"] == 1 and other["exit_code"] == 3
    listed = server.wait(listed["id"])
    assert listed["state"] == "failed" and listed["attempts"] == 3 and listed["exit_code"] == 75


def test_a_retry_that_succeeds_keeps_each_attempts_output_apart(server: Any) -> None:
    script = 'echo "out $JOBD_ATTEMPT"; echo "err $JOBD_ATTEMPT" >&2; [ "$JOBD_ATTEMPT" -ge 2 ]'
    job = run(server, command=sh(script), retry={"times": 3, "delay": 0.05})
    assert job["state"] == "succeeded" and job["attempts"] == 2 and job["exit_code"] == 0
    assert [t["outcome"] for t in job["tries"]] == ["failed", "succeeded"]
    assert [t["exit_code"] for t in job["tries"]] == [1, 0]
    assert server.output(job["id"], attempt=1) == "out 1\n"
    assert server.output(job["id"], attempt=2) == "out 2\n"
    assert server.output(job["id"], "stderr", attempt=1) == "err 1\n"
    assert server.output(job["id"], "stderr", attempt=2) == "err 2\n"
    assert server.output(job["id"]) == "out 2\n"  # the latest attempt by default
    error = remote_error(server, "job.output", {"id": job["id"], "attempt": 3})
    assert error.data["code"] == "UNKNOWN_JOB"


# -- 10. cancel --------------------------------------------------------------------------------------------------


def test_cancel_a_queued_job_at_once(server: Any) -> None:
    server.call("queue.pause", {"name": "serial"})
    job = server.submit(command=["/bin/true"], queue="serial")
    assert job["state"] == "queued"
    cancelled = server.call("job.cancel", {"id": job["id"]}, timeout=10)
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"] is not None
    server.call("queue.resume", {"name": "serial"})
    after = server.submit(command=["/bin/true"], queue="serial")
    assert server.wait(after["id"])["state"] == "succeeded"
    job = get(server, job["id"])
    assert job["state"] == "cancelled" and job["attempts"] == 0 and job["tries"] == []


def test_cancel_a_delayed_job_at_once(server: Any) -> None:
    job = server.submit(command=["/bin/true"], delay=600)
    assert job["state"] == "delayed"
    cancelled = server.call("job.cancel", {"id": job["id"]}, timeout=10)
    assert cancelled["state"] == "cancelled" and cancelled["attempts"] == 0
    [default] = [q for q in server.call("queue.list")["queues"] if q["name"] == "default"]
    assert default["delayed"] == 0 and default["queued"] == 0


def test_cancel_a_running_job_ends_its_process(server: Any) -> None:
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        job = client.call("job.submit", {"command": ["/bin/sleep", "100"]}, timeout=10)
        next_matching(client, is_state(job["id"], "running"))
        pid = client.call("job.get", {"id": job["id"]}, timeout=10)["tries"][0]["pid"]
        pidfd = os.pidfd_open(pid)
        try:
            cancelled = client.call("job.cancel", {"id": job["id"]}, timeout=10)
            assert cancelled["state"] == "cancelled"
            readable, _, _ = select.select([pidfd], [], [], 10)
            assert readable, "the job's process still runs after the cancel"
        finally:
            os.close(pidfd)
    assert not Path(f"/proc/{pid}").exists(), "jobd did not reap the cancelled job's process"
    [attempt] = get(server, job["id"])["tries"]
    assert attempt["outcome"] == "killed" and attempt["signal"] == signal.SIGTERM


def test_cancel_a_job_ignoring_sigterm_kills_it_after_the_grace(server: Any) -> None:
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.progress"]}, timeout=10)
        job = client.call("job.submit", {"command": sh("trap '' TERM; echo %1 >&3; exec sleep 100")}, timeout=10)
        next_matching(client, lambda e: e["id"] == job["id"] and e["progress"] == 1)  # TERM is ignored now
        begun = time.monotonic()
        cancelled = client.call("job.cancel", {"id": job["id"]}, timeout=KILL_GRACE + 10)
        elapsed = time.monotonic() - begun
    assert cancelled["state"] == "cancelled"
    assert elapsed >= KILL_GRACE - 0.01
    [attempt] = get(server, job["id"])["tries"]
    assert attempt["outcome"] == "killed"
    assert attempt["signal"] == signal.SIGKILL and attempt["exit_code"] is None


def test_a_cancel_during_a_timeouts_grace_ends_the_job_cancelled_without_a_retry(server: Any) -> None:
    """The timeout stopped the attempt first, so it stays `timed_out`; the cancel ends the job there, though its
    policy would retry a timeout, once the grace already running is over (docs/jobs.md, docs/protocol.md)."""
    script = "trap 'echo %2 >&3' TERM; echo %1 >&3; sleep 100 & wait $!; sleep 100 & wait $!"
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.progress"]}, timeout=10)
        params = {"command": sh(script), "timeout": 0.5, "retry": {"times": 3, "delay": 0}}
        job = client.call("job.submit", params, timeout=10)
        next_matching(client, lambda e: e["id"] == job["id"] and e["progress"] == 2)  # the timeout's SIGTERM
        cancelled = client.call("job.cancel", {"id": job["id"]}, timeout=KILL_GRACE + 10)
    assert cancelled["state"] == "cancelled" and cancelled["attempts"] == 1, cancelled
    [attempt] = get(server, job["id"])["tries"]
    assert attempt["outcome"] == "timed_out"
    assert attempt["signal"] == signal.SIGKILL and attempt["exit_code"] is None


def test_a_time_limit_reached_during_a_cancel_does_not_make_it_a_timeout(server: Any) -> None:
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.progress"]}, timeout=10)
        command = sh("trap '' TERM; echo %1 >&3; exec sleep 100")
        job = client.call("job.submit", {"command": command, "timeout": 3, "kill_grace": 5}, timeout=10)
        next_matching(client, lambda e: e["id"] == job["id"] and e["progress"] == 1)  # TERM is ignored now
        # The time limit (3 s: room for the cancel to come first on a busy machine) comes round while the cancel
        # waits out the kill_grace (5 s).
        cancelled = client.call("job.cancel", {"id": job["id"]}, timeout=20)
    assert cancelled["state"] == "cancelled"
    [attempt] = get(server, job["id"])["tries"]
    assert attempt["outcome"] == "killed" and attempt["signal"] == signal.SIGKILL, attempt


@pytest.mark.parametrize("stopped_by", ["timeout", "cancel"])
def test_a_kill_from_outside_during_the_grace_keeps_what_stopped_the_job(server: Any, stopped_by: str) -> None:
    """Someone else's `kill -9` ends the job while jobd waits out the kill_grace of its time limit or of a cancel:
    the stop jobd had begun still names the outcome, whatever signal ended the process (docs/jobs.md)."""
    script = "trap 'echo %2 >&3' TERM; echo $$ >&3; echo %1 >&3; sleep 100 & wait $!; sleep 100 & wait $!"
    params: dict[str, Any] = {"command": sh(script), "kill_grace": 60}
    if stopped_by == "timeout":
        params["timeout"] = 0.5
    else:  # a retry would show a cancel taken for a failure
        params["retry"] = {"times": 3, "delay": 0}
    with server.client() as client, server.client() as canceller:
        client.call("events.subscribe", {"types": ["job.progress", "job.log"]}, timeout=10)
        job = client.call("job.submit", params, timeout=10)
        pid = int(next_matching(client, lambda e: e["id"] == job["id"] and e["type"] == "job.log")["line"])
        next_matching(client, lambda e: e["id"] == job["id"] and e.get("progress") == 1)  # the trap is set
        if stopped_by == "cancel":  # answered once the job has ended: read below
            request = canceller.send_request("job.cancel", {"id": job["id"]})
        next_matching(client, lambda e: e["id"] == job["id"] and e.get("progress") == 2)  # jobd's SIGTERM
        os.kill(pid, signal.SIGKILL)
        if stopped_by == "cancel":
            reply = canceller.next_event_or_reply(request, timeout=20)
            assert isinstance(reply, Reply) and reply.result["state"] == "cancelled", reply
    ended = server.wait(job["id"])
    expected = {"timeout": ("timed_out", "timed_out"), "cancel": ("cancelled", "killed")}[stopped_by]
    assert (ended["state"], ended["attempts"]) == (expected[0], 1), ended
    [attempt] = get(server, job["id"])["tries"]
    assert (attempt["outcome"], attempt["signal"]) == (expected[1], signal.SIGKILL), attempt


def test_cancel_a_finished_job_is_refused(server: Any) -> None:
    job = run(server, command=["/bin/true"])
    error = remote_error(server, "job.cancel", {"id": job["id"]})
    assert error.data["code"] == "JOB_FINISHED"
    assert get(server, job["id"])["state"] == "succeeded"


def test_cancel_an_unknown_job_is_refused(server: Any) -> None:
    error = remote_error(server, "job.cancel", {"id": 987654})
    assert error.data["code"] == "UNKNOWN_JOB"
    assert "987654" in error.message


# -- 11. fd 3: progress and log ----------------------------------------------------------------------------------


def test_progress_and_log_lines_arrive_while_the_job_runs(server: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    script = 'echo %30 >&3; echo "halfway there" >&3; echo "%%x" >&3; read line < "$1"; echo "got $line"'
    with held_fifo(fifo) as release, server.client() as client:
        client.call("events.subscribe", {"types": ["job.progress", "job.log"]}, timeout=10)
        job = client.call("job.submit", {"command": sh(script, str(fifo))}, timeout=10)
        ours = lambda e: e["id"] == job["id"]  # noqa: E731
        progress = next_matching(client, lambda e: ours(e) and e["type"] == "job.progress")
        assert progress["progress"] == 30
        first = next_matching(client, lambda e: ours(e) and e["type"] == "job.log")
        second = next_matching(client, lambda e: ours(e) and e["type"] == "job.log")
        assert (first["line"], second["line"]) == ("halfway there", "%x")
        live = client.call("job.get", {"id": job["id"]}, timeout=10)
        assert live["state"] == "running" and live["progress"] == 30  # still blocked on the FIFO
        release()
        assert server.wait(job["id"])["state"] == "succeeded"
    job = get(server, job["id"])
    assert job["progress"] == 30
    assert server.output(job["id"], "log") == "halfway there\n%x\n"
    assert server.output(job["id"]) == "got go\n"


def events_until_it_succeeds(client: Client, job_id: int) -> list[dict[str, Any]]:
    """The job's events, in order, up to its job.state event for `succeeded` (left out)."""
    events = []
    while True:
        event = next_matching(client, lambda e: e.get("id", e.get("job", {}).get("id")) == job_id)
        if event["type"] == "job.state" and event["job"]["state"] == "succeeded":
            return events
        events.append(event)


def test_log_events_stop_where_max_output_cuts_the_log_and_progress_goes_on(server: Any) -> None:
    """Past max_output the log file keeps nothing more, and subscribers hear no more log lines either: the line at
    which the log is cut comes as what the file kept of it, with "truncated": true, and then only progress (and
    state) events; what they heard is what the file kept (docs/protocol.md, events.subscribe)."""
    # 12 lines of 8 bytes fit in 100; the 13th is cut after 4 bytes ("line"), the rest are dropped.
    script = (
        'i=10; while [ $i -lt 60 ]; do echo "line $i" >&3; i=$((i+1)); done; echo %50 >&3; echo late >&3; echo %70 >&3'
    )
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.progress", "job.log", "job.state"]}, timeout=10)
        job = client.call("job.submit", {"command": sh(script), "max_output": 100}, timeout=10)
        events = events_until_it_succeeds(client, job["id"])
    logs = [event for event in events if event["type"] == "job.log"]
    assert [event["line"] for event in logs] == [f"line {i}" for i in range(10, 22)] + ["line"], logs
    assert [event.get("truncated") for event in logs] == [None] * 12 + [True], logs
    assert [event["progress"] for event in events if event["type"] == "job.progress"] == [50, 70], events
    assert server.output(job["id"], "log") == "".join(f"line {i}\n" for i in range(10, 22)) + "line"
    assert get(server, job["id"])["tries"][0]["truncated"] is True


def test_log_events_of_a_job_within_max_output_are_not_marked_truncated(server: Any) -> None:
    """A log that exactly fills max_output is whole: no event says it was cut."""
    with server.client() as client:
        client.call("events.subscribe", {"types": ["job.log", "job.state"]}, timeout=10)
        job = client.call("job.submit", {"command": sh("echo one >&3; echo two >&3"), "max_output": 8}, timeout=10)
        events = events_until_it_succeeds(client, job["id"])
    assert [(event["line"], "truncated" in event) for event in events if event["type"] == "job.log"] == [
        ("one", False),
        ("two", False),
    ]
    assert server.output(job["id"], "log") == "one\ntwo\n"


# -- 12. following output ----------------------------------------------------------------------------------------


def test_job_output_wait_returns_new_data_while_the_job_runs(server: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    with held_fifo(fifo) as release:
        job = server.submit(command=sh('echo first; read x < "$1"; echo second', str(fifo)))
        first = server.call("job.output", {"id": job["id"], "offset": 0, "wait": True}, timeout=20)
        assert first["data"] == "first\n" and first["next_offset"] == 6 and first["complete"] is False
        with server.client() as follower:
            # Pipelined on one connection: the ping is answered first only if job.output is really waiting.
            follower.send_raw(
                encode_message(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "job.output",
                        "params": {"id": job["id"], "offset": 6, "wait": True},
                    }
                )
            )
            follower.send_raw(encode_message({"jsonrpc": "2.0", "id": 2, "method": "ping"}))
            assert follower.read_line(timeout=10)["id"] == 2
            release()
            reply = follower.read_line(timeout=20)
        assert reply["id"] == 1, reply
        assert reply["result"]["data"] == "second\n"
        assert reply["result"]["offset"] == 6 and reply["result"]["next_offset"] == 13
        assert server.wait(job["id"])["state"] == "succeeded"
    # At the end of a finished attempt, wait=true answers at once: complete, nothing more.
    end = server.call("job.output", {"id": job["id"], "offset": 13, "wait": True}, timeout=10)
    assert end["data"] == "" and end["complete"] is True and end["size"] == 13


# -- 13. idempotency ---------------------------------------------------------------------------------------------


def test_a_second_submit_with_the_same_key_returns_the_first_job(server: Any) -> None:
    first = server.submit(task="echo", args=["one"], key="order-17")
    again = server.submit(task="echo", args=["two"], key="order-17")
    assert first["new"] is True and again["new"] is False  # a script run again can tell which submit made it
    assert again["id"] == first["id"]
    assert again["command"] == ["/bin/echo", "one"] and again["key"] == "order-17"
    other = server.submit(task="echo", args=["three"], key="order-18")
    assert other["id"] != first["id"] and other["new"] is True
    server.wait(first["id"])
    assert server.output(first["id"]) == "one\n"
    once_done = server.submit(task="echo", key="order-17")  # also once it has finished
    assert (once_done["id"], once_done["new"], once_done["state"]) == (first["id"], False, "succeeded")
    assert server.submit(task="echo")["new"] is True  # without a key every submit makes its job


def test_a_key_taken_by_other_work_is_refused_not_answered_with_that_job(server: Any) -> None:
    """A key names one job: a submit of another task (or another ad-hoc command) with a key already taken was answered
    with the job that had it, which its client then took for its own (the mail it asked for never sent): a mistake
    told as one, or a key taken first by another client to have the next one's job answered with theirs."""
    first = server.submit(task="echo", args=["one"], key="order-19")
    command = server.submit(command=["/bin/true"], key="order-20")
    for params, of, named in (
        ({"task": "argtask", "key": "order-19"}, first, "this submit is for task 'argtask'"),
        ({"command": ["/bin/true"], "key": "order-19"}, first, "this submit is for an ad-hoc command"),
        ({"task": "echo", "key": "order-20"}, command, "(an ad-hoc command), and this submit is for task 'echo'"),
        ({"command": ["/bin/false"], "key": "order-20"}, command, "this submit is for another ad-hoc one"),
        (
            {"jobs": [{"task": "echo", "key": "order-21"}, {"task": "argtask", "key": "order-19"}]},
            first,
            "job.submit: jobs[1]: key 'order-19' is already that of job",
        ),
    ):
        error = remote_error(server, "job.submit", params)
        assert (error.data["code"], error.data["param"], error.data["job"]) == ("INVALID_PARAMS", "key", of["id"])
        assert named in error.message and "a key names one job; give this one a key of its own" in error.message
        assert error.data.get("index") == (1 if "jobs" in params else None), error.data
    assert sorted(job["id"] for job in server.call("job.list")["jobs"]) == [first["id"], command["id"]]  # none made
    # The same work again is answered with its job, as before: a client that lost the first reply asks again.
    assert server.submit(task="echo", args=["two"], key="order-19")["id"] == first["id"]
    assert server.submit(command=["/bin/true"], key="order-20")["id"] == command["id"]


def test_a_key_two_members_of_one_batch_give_to_other_work_is_refused(server: Any) -> None:
    """The members of a batch are committed together, after every check: the key of a later member that an earlier
    one also gives was looked up before either was made, found free, and the later member, of other work, was
    answered with the earlier one's job (a key the client took for its own work's), where two submits in a row
    refuse it. The same work under the key twice is one job, as two submits in a row make one."""
    params = {"jobs": [{"command": ["/bin/echo", "a"], "key": "batch-1"}, {"task": "echo", "key": "batch-1"}]}
    error = remote_error(server, "job.submit", params)
    assert (error.data["code"], error.data["param"], error.data["index"], error.data["first"]) == (
        "INVALID_PARAMS",
        "key",
        1,
        0,
    )
    assert error.message.startswith("job.submit: jobs[1]: key 'batch-1' is already that of jobs[0] (an ad-hoc command")
    assert "this member is for task 'echo': a key names one job; give this one a key of its own" in error.message
    listed = server.call("job.list")["jobs"]
    assert not any(job["key"] == "batch-1" for job in listed)  # the batch is refused whole
    twice = server.call("job.submit", {"jobs": [{"task": "echo", "args": ["x"], "key": "batch-2"}] * 2})["jobs"]
    assert twice[0]["id"] == twice[1]["id"]
    assert [job["new"] for job in twice] == [True, False]  # the first member made it, the second was answered it


# -- 14. refusals ------------------------------------------------------------------------------------------------


def test_unknown_queue_is_refused_naming_it(server: Any) -> None:
    error = remote_error(server, "job.submit", {"task": "echo", "queue": "nope"})
    assert error.data["code"] == "UNKNOWN_QUEUE"
    assert "nope" in error.message
    assert error.data.get("queue") == "nope"


def test_unknown_task_is_refused_naming_it(server: Any) -> None:
    error = remote_error(server, "job.submit", {"task": "no_such_task"})
    assert error.data["code"] == "UNKNOWN_TASK"
    assert "no_such_task" in error.message
    assert "echo" in error.data.get("allowed", [])


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"task": "echo", "priority": -1}, ["priority", "-1"]),
        ({"task": "echo", "priority": 2**32}, ["priority", str(2**32)]),
        ({"task": "echo", "priority": "high"}, ["priority", "high"]),
        ({"task": "echo", "colour": "blue"}, ["colour"]),
        ({"task": "echo", "command": ["/bin/true"]}, ["task", "command"]),
        ({"task": "echo", "delay": -5}, ["delay", "-5"]),
        ({"task": "echo", "timeout": 0}, ["timeout"]),
        ({"command": ["/bin/true"], "env": {"JOBD_QUEUE": "x"}}, ["JOBD_QUEUE"]),
    ],
    ids=[
        "priority-negative",
        "priority-2**32",
        "priority-string",
        "unknown-param",
        "task-and-command",
        "delay-negative",
        "timeout-zero",
        "reserved-env",
    ],
)
def test_invalid_submit_params_are_refused_naming_the_bad_value(
    server: Any, params: dict[str, Any], named: list[str]
) -> None:
    error = remote_error(server, "job.submit", params)
    assert error.data["code"] == "INVALID_PARAMS"
    assert error.rpc_code == -32602
    for word in named:
        assert word in error.message, f"{word!r} not in {error.message!r}"
    assert server.call("job.list", {})["jobs"] == []  # nothing was accepted


# -- 15. rights --------------------------------------------------------------------------------------------------

NOBODY = 65534
NOBODY_CLIENT = """
import json, os
from jobd.client import Client, RemoteError
result = {"uid": os.getuid()}
with Client("jobd.sock") as client:
    try:
        client.call("job.submit", {"command": ["/bin/true"]}, timeout=20)
        result["ad_hoc"] = None
    except RemoteError as error:
        result["ad_hoc"] = {"code": error.data.get("code"), "message": error.message}
    result["task_job"] = client.call("job.submit", {"task": "echo", "args": ["from nobody"]}, timeout=20)
print(json.dumps(result))
"""


# Non-admins may submit only the tasks they are granted (docs/config.md, [access]).
NOBODY_GRANT = '\n[[access.grant]]\nusers = ["nobody"]\nrights = ["read", "exec"]\ntasks = ["echo"]\n'


def test_ad_hoc_commands_are_refused_to_a_non_admin_but_tasks_are_not(make_daemon: Any) -> None:
    server = make_daemon(CONFIG + NOBODY_GRANT)
    os.chmod(server.socket_path, 0o666)
    # tmp_path is 0700; the daemon's own directory is not, so the client starts there and uses a relative path.
    assert os.stat(server.root).st_mode & 0o001
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            NOBODY_CLIENT,
        ],
        cwd=server.root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["uid"] == NOBODY
    assert result["ad_hoc"] is not None, "uid 65534 was allowed to run an ad-hoc command"
    assert result["ad_hoc"]["code"] == "INSUFFICIENT_RIGHTS"
    assert server.call("job.list", {})["jobs"][0]["task"] == "echo"  # the refused command was not recorded
    job = server.wait(result["task_job"]["id"])
    assert job["state"] == "succeeded"
    assert server.output(job["id"]) == "from nobody\n"


# -- 16. no zombies, no leaks ------------------------------------------------------------------------------------


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_many_quick_jobs_leave_no_children_and_no_open_files(server: Any) -> None:
    with server.client() as client:
        warm_up = client.call("job.submit", {"command": ["/bin/true"]}, timeout=10)
        client.call("job.wait", {"id": warm_up["id"], "timeout": 30}, timeout=40)
        fds_before = _open_fds(server.pid)
        ids = [client.call("job.submit", {"command": sh("echo $JOBD_JOB_ID >&3")}, timeout=10)["id"] for _ in range(50)]
        for job_id in ids:
            job = client.call("job.wait", {"id": job_id, "timeout": 30}, timeout=40)
            assert job["state"] == "succeeded", job
        assert server.children() == [], "jobd still has child processes after all its jobs ended"
        assert _open_fds(server.pid) == fds_before, "jobd holds more files than before the jobs ran"


def test_a_job_is_given_its_own_descriptors_and_nothing_of_jobd(make_daemon: Any, tmp_path: Path) -> None:
    """Children are spawned without subprocess's close_fds sweep: whatever jobd holds open (its database, its API,
    evQueue and HTTP sockets, the configuration watch, the schedules' timer, a subscriber's connection, another
    job's pipes, a descriptor jobd itself inherited without close-on-exec) must not reach a job, which gets
    stdin, stdout, stderr and fd 3 only."""
    daemon = make_daemon(
        f"""
        [http]
        listen = "{tmp_path / "http.sock"}"
        [queue.default]
        concurrency = 2
        [task.sleeper]
        command = ["/bin/sleep", "600"]
        [schedule.yearly]  # its timer is armed; it fires at no time a test runs (a firing would take a slot)
        task = "sleeper"
        calendar = "0 0 0 1 1 *"
        """,
        start=False,
    )
    inherited = tmp_path / "inherited-by-jobd"
    inherited.write_text("")
    fd = os.open(inherited, os.O_RDONLY)  # inheritable, as a careless parent would leave one
    daemon.pass_fds = (fd,)
    try:
        daemon.start()
    finally:
        os.close(fd)
    assert os.readlink(f"/proc/{daemon.pid}/fd/{fd}") == str(inherited)  # jobd has it; its jobs must not
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        jobs = [client.call("job.submit", {"task": "sleeper"}, timeout=10) for _ in range(2)]
        for job in jobs:  # the second starts while the first one's pipes are open in jobd
            next_matching(client, is_state(job["id"], "running"))
        for job in jobs:
            pid = client.call("job.get", {"id": job["id"]}, timeout=10)["tries"][0]["pid"]
            given = {int(name): os.readlink(f"/proc/{pid}/fd/{name}") for name in os.listdir(f"/proc/{pid}/fd")}
            assert sorted(given) == [0, 1, 2, 3], given
            assert given[0] == "/dev/null"
            assert all(given[number].startswith("pipe:") for number in (1, 2, 3)), given
            client.call("job.cancel", {"id": job["id"]}, timeout=KILL_GRACE + 10)


def test_output_files_that_cannot_be_written_are_logged_once_not_each(make_daemon: Any, full_output_disk: Path) -> None:
    # Each stream of each job that printed on a full disk was an ERROR line: at hundreds of jobs a second, journald
    # dropped jobd's other lines past its rate limit. Each attempt still says which of its streams lost bytes. The
    # first failure of each cause is logged: where the disk fills in the middle of a write, the short write and then
    # ENOSPC (how much room is left depends on what else output/ holds, output/.job-ids among them).
    daemon = make_daemon("[queue.default]\nconcurrency = 1\n")
    assert daemon.state_dir / "output" == full_output_disk
    filled = daemon.submit(command=["/bin/sh", "-c", "head -c 1000000 /dev/zero"])["id"]
    jobs = [filled] + [daemon.submit(command=["/bin/sh", "-c", "echo out; echo err >&2"])["id"] for _ in range(5)]
    for job in jobs:
        assert daemon.wait(job)["state"] == "succeeded"
        assert daemon.call("job.get", {"id": job})["tries"][0]["truncated"] is True
        assert daemon.call("job.output", {"id": job})["truncated"] is True
    failures = [line for line in daemon.log().splitlines() if "cannot write" in line]
    causes = {line.split(": ", 1)[1] for line in failures}
    assert len(failures) == len(causes) <= 2, daemon.log()  # not one per file: 11 files failed


def test_a_full_disk_drops_output_but_not_the_job(make_daemon: Any, full_output_disk: Path) -> None:
    """ENOSPC on an output file: the job runs to its end, the attempt says its output is truncated, jobd lives."""
    daemon = make_daemon("[queue.default]\nconcurrency = 1\n")
    assert daemon.state_dir / "output" == full_output_disk
    job = daemon.submit(command=["/bin/sh", "-c", "head -c 1000000 /dev/zero; echo done >&2; exit 7"])
    finished = daemon.wait(job["id"])
    assert (finished["state"], finished["exit_code"]) == ("failed", 7)
    attempt = daemon.call("job.get", {"id": job["id"]})["tries"][0]
    assert attempt["truncated"] is True
    assert 0 < attempt["stdout_bytes"] <= 64 * 1024
    assert attempt["stdout_bytes"] == (full_output_disk / str(job["id"]) / "1.stdout").stat().st_size
    assert "cannot write" in daemon.log() and "No space left on device" in daemon.log()
    assert daemon.call("ping")["pong"] is True


def test_a_cancel_and_a_stop_of_running_jobs_are_logged_as_info_not_warnings(make_daemon: Any) -> None:
    """`journalctl -p warning` is for what went wrong: a job cancelled while it ran, or stopped (and put back) by
    jobd's own stop, was asked for, like the cancel of a queued job, which was already info. A failure stays a
    warning."""
    daemon = make_daemon("[queue.two]\nconcurrency = 2\n")
    cancelled, stopped = (daemon.submit(command=["/bin/sleep", "300"], queue="two")["id"] for _ in range(2))
    failed = daemon.submit(command=["/bin/false"])["id"]
    assert daemon.wait(failed)["state"] == "failed"
    for job_id in (cancelled, stopped):
        wait_for_log(daemon, f"job={job_id} running")
    assert daemon.call("job.cancel", {"id": cancelled})["state"] == "cancelled"
    assert daemon.stop() == 0
    log = daemon.log()
    assert f" INFO job={cancelled} cancelled (attempt 1 killed, signal 15)\n" in log, log
    assert f" INFO job={stopped} queued (attempt 1 killed, signal 15)\n" in log, log
    assert f" WARNING job={failed} failed (attempt 1 failed, exit code 1): command /bin/false\n" in log, log


def test_a_failure_is_logged_with_its_task_and_when_it_is_tried_again(make_daemon: Any) -> None:
    """`journalctl -p warning` in a retry loop: each line names the task that fails (or the program of an ad-hoc
    job) and when the next try comes, without a `jobctl status` per job id."""
    daemon = make_daemon('[task.flaky]\ncommand = ["/bin/false"]\nretry = { times = 1, delay = 3600 }\n')
    retried = daemon.submit(task="flaky")["id"]
    ad_hoc = daemon.submit(command=["/bin/false"])["id"]
    assert daemon.wait(ad_hoc)["state"] == "failed"
    head = f" WARNING job={retried} delayed (attempt 1 failed, exit code 1): task flaky, tried again in "
    wait_for_log(daemon, head)
    when = re.search(re.escape(head) + r"([0-9.]+)s\n", daemon.log())
    assert when is not None and 3590 <= float(when.group(1)) <= 3600, daemon.log()
    assert f" WARNING job={ad_hoc} failed (attempt 1 failed, exit code 1): command /bin/false\n" in daemon.log()
    assert daemon.call("job.cancel", {"id": retried})["state"] == "cancelled"
