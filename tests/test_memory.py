"""A real jobd gives the C library's free heap memory back to the system once it goes quiet after a burst (jobd.heap),
and holds no waiting job's stdin in memory.

The drop is read two ways: by jobd itself, its resident memory just before and just after malloc_trim (the debug
line, which also tells that the trim happened and when), and from outside, /proc/PID/status once the line is written.
Nothing here depends on how long anything takes: the waits are for the log line, woken by inotify.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from harness import Daemon
from recovery.support import wait_for_log

TRIMMED = re.compile(r"free heap memory given back to the system, resident memory (\d+) kB -> (\d+) kB")
QUEUE = "[queue.work]\nconcurrency = 2\n"
WAIT = 120.0  # a burst of thousands of jobs on a loaded machine, then QUIET_SECONDS without work


def _trims(daemon: Daemon) -> list[tuple[int, int]]:
    """(resident kB before, after) of each trim jobd logged, in order."""
    return [(int(before), int(after)) for before, after in TRIMMED.findall(daemon.log())]


def _resident_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def _burst(daemon: Daemon) -> None:
    """Thousands of /bin/true jobs, big job.list pages, a hundred connections at once: what fragments the heap."""
    job = {"command": ["/bin/true"], "queue": "work"}
    last = 0
    with daemon.client() as client:
        for _ in range(20):
            last = client.call("job.submit", {"jobs": [job] * 100})["jobs"][-1]["id"]
        for _ in range(500):
            last = client.call("job.submit", job)["id"]
        for _ in range(20):
            client.call("job.list", {"limit": 1000})
    clients = [daemon.client() for _ in range(100)]
    for client in clients:
        client.call("job.list", {"limit": 100})
    for client in clients:
        client.close()
    assert daemon.wait(last, timeout=WAIT)["state"] == "succeeded"


def test_free_heap_memory_goes_back_to_the_system_once_jobd_is_quiet(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(QUEUE)  # logs at debug
    # Start-up's own quiet spell comes first: what reading the configuration and opening the database freed.
    wait_for_log(daemon, "free heap memory given back", timeout=WAIT)
    started = _trims(daemon)
    _burst(daemon)
    # The burst's end is quiet too: one trim more. (Should a loaded machine stall this test's client for the quiet
    # spell in the middle of the burst, that trim comes first: it still has the burst's free memory to give back.)
    wait_for_log(daemon, "free heap memory given back", timeout=WAIT, count=len(started) + 1)
    before, after = _trims(daemon)[len(started)]
    outside = _resident_kb(daemon.pid)
    assert after < before, daemon.log()[-2000:]
    # What jobd said it gave back is gone as the kernel counts it too (the log line itself may touch a page or two).
    assert outside < before, (outside, before)


STDIN_BYTES = 1_000_000  # each job's stdin: near the most one request line may carry (1 MiB)
STDIN_JOBS = 64


def test_the_stdin_of_waiting_jobs_stays_in_the_database_not_in_jobds_memory(
    make_daemon: Callable[..., Daemon],
) -> None:
    """A backlog of jobs with large stdins costs jobd memory for the jobs, not for their stdins: 64 MB of stdin
    waiting in a paused queue (and again after a restart, which reads the backlog back) leaves jobd's resident memory
    within a quarter of that, while each job still gets its own stdin when it starts."""
    daemon = make_daemon("[queue.work]\nconcurrency = 4\n")
    daemon.call("queue.pause", {"name": "work"})
    base = _resident_kb(daemon.pid)
    stdins = [bytes([ord("a") + index % 26]) * (STDIN_BYTES - index) for index in range(STDIN_JOBS)]
    ids = []
    with daemon.client() as client:
        for stdin in stdins:
            job = {"command": ["/usr/bin/sha256sum"], "queue": "work", "stdin": stdin.decode()}
            ids.append(client.call("job.submit", job)["id"])
    bound_kb = STDIN_JOBS * STDIN_BYTES // 1024 // 4
    waiting = _resident_kb(daemon.pid)
    assert waiting - base < bound_kb, (base, waiting)
    daemon.stop()
    daemon.start()
    recovered = _resident_kb(daemon.pid)
    assert recovered - base < bound_kb, (base, recovered)
    daemon.call("queue.resume", {"name": "work"})
    for job_id, stdin in zip(ids, stdins, strict=True):
        assert daemon.wait(job_id, timeout=WAIT)["state"] == "succeeded"
        assert daemon.output(job_id) == f"{hashlib.sha256(stdin).hexdigest()}  -\n"
