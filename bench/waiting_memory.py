"""What a waiting job costs in jobd's memory, which holds every unfinished job (docs/jobs.md gives the figures).

    python bench/waiting_memory.py [--jobs 100000]

For each kind of job (a bare `/bin/true`; a mailing's job: a three-word command, its address in `env`, a
`context`) and each waiting state (queued in a paused queue; delayed a day), a fresh jobd gets `--jobs` of them in
`job.submit` batches of 1,000. Its resident memory (`VmRSS`) is read three times, each once jobd has been quiet and
given its free heap back (jobd/heap.py's debug line, waited for by inotify): with no job, after the submits, and
after a restart, which loads the jobs back from the database. The cost per job is the difference to the first,
divided by the count. This is a script, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Daemon
from recovery.support import wait_for_log

QUEUE = "[queue.mail]\nconcurrency = 4\npaused = true\n"
TRIMMED = "free heap memory given back"
BATCH = 1000


def bare_job(_: int) -> dict[str, Any]:
    return {"command": ["/bin/true"], "queue": "mail"}


def mailing_job(index: int) -> dict[str, Any]:
    return {
        "command": ["/usr/local/bin/send-mail", "--template", "welcome"],
        "queue": "mail",
        "env": {"TO": f"user{index:06d}@example.com"},
        "context": "mailing-2026-12",
    }


def resident_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def quiet_resident_kb(daemon: Daemon) -> int:
    """VmRSS once jobd has next given its free heap back (after QUIET_SECONDS without I/O)."""
    wait_for_log(daemon, TRIMMED, timeout=300, count=daemon.log().count(TRIMMED) + 1)
    return resident_kb(daemon.pid)


def measure(root: Path, make_job: Any, delay: float | None, count: int) -> str:
    daemon = Daemon(root, QUEUE)  # logs at debug: the trim's line is a debug line
    daemon.start()
    try:
        empty = quiet_resident_kb(daemon)
        with daemon.client() as client:
            for first in range(0, count, BATCH):
                jobs = [make_job(index) for index in range(first, min(count, first + BATCH))]
                if delay is not None:
                    jobs = [{**job, "delay": delay} for job in jobs]
                client.call("job.submit", {"jobs": jobs}, timeout=120)
        submitted = quiet_resident_kb(daemon)
        daemon.stop()
        began = time.monotonic()
        daemon.start()
        ready = time.monotonic() - began
        restarted = quiet_resident_kb(daemon)
    finally:
        if daemon.running():
            daemon.stop()

    def per_job(kb: int) -> str:
        return f"{(kb - empty) * 1024 / count:,.0f} B/job"

    return (
        f"none {empty:,} kB; submitted {submitted:,} kB ({per_job(submitted)}); "
        f"restarted {restarted:,} kB ({per_job(restarted)}), READY after {ready:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jobd-waiting-memory-") as tmp:
        for kind, make_job in (("bare", bare_job), ("mailing", mailing_job)):
            for state, delay in (("queued", None), ("delayed", 86400.0)):
                result = measure(Path(tmp) / f"{kind}-{state}", make_job, delay, args.jobs)
                print(f"{kind:8} {state:8} {result}", flush=True)


if __name__ == "__main__":
    main()
