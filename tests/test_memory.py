"""A real jobd gives the C library's free heap memory back to the system once it goes quiet after a burst (jobd.heap).

The drop is read two ways: by jobd itself, its resident memory just before and just after malloc_trim (the debug
line, which also tells that the trim happened and when), and from outside, /proc/PID/status once the line is written.
Nothing here depends on how long anything takes: the waits are for the log line, woken by inotify.
"""

from __future__ import annotations

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
