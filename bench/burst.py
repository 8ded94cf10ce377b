"""A burst of work, then quiet: how much memory does jobd keep, with each remedy for the C library's fragmentation?

    python bench/burst.py BEFORE [--rounds 2] [--jobs 10000] [--quiet 15]

BEFORE is a directory holding the `jobd/` package without the remedy under test (`git worktree add /tmp/before
HEAD~1`); this checkout is the other. One daemon per candidate runs at once, each on its own state:

- `current`: BEFORE as it is;
- BEFORE with `MALLOC_MMAP_THRESHOLD_=131072`, with `MALLOC_TRIM_THRESHOLD_=131072` and with `MALLOC_ARENA_MAX=2` in
  its environment (what a line `Environment=` in jobd.service would give);
- `quiet trim`: this checkout (jobd.heap: malloc_trim(0) once the loop has had no I/O for a few seconds), alone and
  with `MALLOC_MMAP_THRESHOLD_=131072`;
- `PYTHONMALLOC=malloc` (Python's objects from glibc's heap rather than pymalloc's own arenas of 1 MiB, which only
  Python can give back, and only once wholly empty): BEFORE alone, and this checkout with it.

Each round sends every daemon in turn (the order rotates) the same burst: `--jobs` `/bin/true` jobs through a queue
of concurrency 2, half as serial submits on one connection, half in batches of 100 on a connection each; 100
`job.list` pages of 1,000 jobs on a connection each; 200 connections open at once, each asking `daemon.status` and
`job.list`. Once its jobs have all ended, the daemon's memory is read ("burst"); once every daemon has had no work for
`--quiet` seconds, again ("quiet"). Memory: VmRSS, and the Rss of the C library's heap ([heap]) and of the
anonymous mappings (Python's arenas), from /proc/PID/smaps; in kB. CPU: the daemon's seconds over the burst.

This is a script, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Daemon, cpu_seconds, wait_for_stragglers
from soak import memory

HERE = Path(__file__).resolve().parent.parent
QUEUE = "[queue.work]\nconcurrency = 2\n"
THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}
PYTHON_MALLOC = {"PYTHONMALLOC": "malloc"}  # Python's small objects from the C library's malloc, not its own arenas


@dataclass
class Candidate:
    name: str
    tree: Path
    env: dict[str, str]
    daemon: Daemon | None = None
    rows: list[tuple[str, tuple[int, int, int], float]] = field(default_factory=list)


def candidates(before: Path) -> list[Candidate]:
    return [
        Candidate("current", before, {}),
        Candidate("MALLOC_MMAP_THRESHOLD_=131072", before, THRESHOLD),
        Candidate("MALLOC_TRIM_THRESHOLD_=131072", before, {"MALLOC_TRIM_THRESHOLD_": "131072"}),
        Candidate("MALLOC_ARENA_MAX=2", before, {"MALLOC_ARENA_MAX": "2"}),
        Candidate("quiet trim", HERE, {}),
        Candidate("quiet trim + MMAP_THRESHOLD", HERE, THRESHOLD),
        Candidate("PYTHONMALLOC=malloc", before, PYTHON_MALLOC),
        Candidate("quiet trim + PYTHONMALLOC=malloc", HERE, PYTHON_MALLOC),
    ]


def start(candidate: Candidate, root: Path) -> Daemon:
    daemon = Daemon(root, QUEUE)
    daemon.log_level = "info"  # as in production
    daemon.env = {"PYTHONPATH": str(candidate.tree), **candidate.env}
    daemon.start()
    return daemon


def burst(daemon: Daemon, jobs: int) -> None:
    job = {"command": ["/bin/true"], "queue": "work"}
    last = 0
    with daemon.client() as client:
        for _ in range(jobs // 2):
            last = client.call("job.submit", job)["id"]
    for _ in range(jobs // 2 // 100):
        with daemon.client() as client:
            last = client.call("job.submit", {"jobs": [job] * 100})["jobs"][-1]["id"]
    for _ in range(100):
        with daemon.client() as client:
            client.call("job.list", {"limit": 1000})
    clients = [daemon.client() for _ in range(200)]
    for client in clients:
        client.call("daemon.status")
        client.call("job.list", {"limit": 100})
    for client in clients:
        client.close()
    with daemon.client() as client:
        client.call("job.wait", {"id": last}, timeout=600)
        wait_for_stragglers(client, "work")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="a tree whose jobd/ has no remedy")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=10000, help="jobs per burst")
    parser.add_argument("--quiet", type=float, default=15, help="seconds of no work before the second reading")
    parser.add_argument("--only", nargs="+", help="these candidates only (their names as printed)")
    args = parser.parse_args()
    everyone = [c for c in candidates(args.before.resolve()) if args.only is None or c.name in args.only]
    with tempfile.TemporaryDirectory(prefix="jobd-burst-") as scratch:
        try:
            for number, candidate in enumerate(everyone):
                candidate.daemon = start(candidate, Path(scratch) / str(number))
            time.sleep(args.quiet)  # the start-up's own quiet spell, so the first reading is of an idle daemon
            for candidate in everyone:
                assert candidate.daemon is not None
                candidate.rows.append(("started", memory(candidate.daemon.pid), 0.0))
            for round_ in range(1, args.rounds + 1):
                order = everyone[round_ % len(everyone) :] + everyone[: round_ % len(everyone)]
                for candidate in order:
                    assert candidate.daemon is not None
                    cpu = cpu_seconds(candidate.daemon.pid)
                    burst(candidate.daemon, args.jobs)
                    used = cpu_seconds(candidate.daemon.pid) - cpu
                    candidate.rows.append((f"burst {round_}", memory(candidate.daemon.pid), used))
                    print(f"round {round_}: {candidate.name} done", file=sys.stderr, flush=True)
                time.sleep(args.quiet)  # the measure is the memory after this long without work
                for candidate in everyone:
                    assert candidate.daemon is not None
                    candidate.rows.append((f"quiet {round_}", memory(candidate.daemon.pid), 0.0))
        finally:
            for candidate in everyone:
                if candidate.daemon is not None and candidate.daemon.running():
                    candidate.daemon.stop(60)
    print("candidate\treading\tVmRSS kB\theap kB\tanon kB\tCPU s")
    for candidate in everyone:
        for reading, (total, heap, anonymous), used in candidate.rows:
            cpu = f"{used:.1f}" if used else ""
            print(candidate.name, reading, total, heap, anonymous, cpu, sep="\t")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
