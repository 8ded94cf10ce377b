"""Count what jobd does per job and per submit, in units the machine's load cannot disturb.

    python bench/count.py [--tree DIR] [--jobs 1000] [--submits 1000] [--valgrind PATH] [--opcodes]

Timings on a shared machine drift by tens of per cent within a minute; counts do not. Two counts, each on a daemon
at `--log-level info` (a production jobd's) configured as bench/run.py's:
- instructions (the default): the daemon runs under `valgrind --tool=callgrind --instr-atstart=no`, and counting is
  switched on (`callgrind_control -i on`) only around the work measured: N `/bin/true` jobs through a queue of
  concurrency 2 (submitted in batches beforehand into the paused queue, counted from its resume to the last end,
  after 200 such jobs to warm the daemon), then N serial `job.submit`s (after 300). User-space instructions per job
  and per submit, from the dumps. A job's path needs a valgrind that knows `pidfd_open` (3.19, Debian 12's, does
  not; 3.24 does: `--valgrind` points at another one's `valgrind.bin`, whose tools are found through
  $VALGRIND_LIB, e.g. Debian trixie's package unpacked with `dpkg -x`). Debian 12's `callgrind_control` drives it.
- `--opcodes`: the daemon runs under bench/opcode_trace.py instead, which counts every Python opcode it executes,
  by function: opcodes per job and per submit, and the functions that run the most.

`--tree DIR` measures the jobd package in DIR (a `git worktree` of another commit) instead of this checkout's.
This is a script, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import QUEUES, Daemon

HERE = Path(__file__).resolve().parent
WARM_JOBS, WARM_SUBMITS = 200, 300


def jobs_through_a_queue(daemon: Daemon, count: int, counting: Callable[[bool], None]) -> None:
    with daemon.client() as client:
        for amount, counted in ((WARM_JOBS, False), (count, True)):
            client.call("queue.pause", {"name": "bench"})
            ids: list[int] = []
            for start in range(0, amount, 500):
                batch = [{"command": ["/bin/true"], "queue": "bench"} for _ in range(min(500, amount - start))]
                ids += [job["id"] for job in client.call("job.submit", {"jobs": batch})["jobs"]]
            if counted:
                counting(True)
            client.call("queue.resume", {"name": "bench"})
            for job_id in ids[-2:]:  # jobs start in id order two at a time: once the last two ended, all have
                client.call("job.wait", {"id": job_id}, timeout=3600)
            if counted:
                counting(False)
        succeeded = client.call("daemon.status")["jobs"].get("succeeded")
        if succeeded != WARM_JOBS + count:
            raise RuntimeError(f"{succeeded} jobs succeeded, not {WARM_JOBS + count}")


def serial_submits(daemon: Daemon, count: int, counting: Callable[[bool], None]) -> None:
    with daemon.client() as client:
        for _ in range(WARM_SUBMITS):
            client.call("job.submit", {"command": ["/bin/true"], "queue": "parked"})
        counting(True)
        for _ in range(count):
            client.call("job.submit", {"command": ["/bin/true"], "queue": "parked"})
        counting(False)


def instructions(tree: Path, valgrind: str, work: Callable[[Daemon, int, Callable[[bool], None]], None], n: int) -> int:
    """User-space instructions of the daemon over `work`, counted by callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        daemon = _daemon(tree, Path(tmp))
        # %p: a job's child is the daemon's fork until it execs, and would write its own (empty) profile over ours.
        daemon.command_prefix = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
        daemon.start()
        try:

            def counting(on: bool) -> None:
                control = ["callgrind_control", "-i", "on" if on else "off", str(daemon.pid)]
                subprocess.run(control, check=True, capture_output=True)

            work(daemon, n, counting)
            subprocess.run(["callgrind_control", "-d", str(daemon.pid)], check=True, capture_output=True)
        finally:
            _stop(daemon)
        [dump] = Path(tmp).glob(f"callgrind.out.{daemon.pid}.1")
        totals = [line for line in dump.read_text().splitlines() if line.startswith("totals:")]
        return int(totals[0].split()[1])


def opcodes(
    tree: Path, work: Callable[[Daemon, int, Callable[[bool], None]], None], n: int
) -> list[tuple[int, int, str]]:
    """(opcodes, calls, function) of the daemon over `work`, most opcodes first."""
    with tempfile.TemporaryDirectory() as tmp:
        counts = Path(tmp) / "opcodes.tsv"
        daemon = _daemon(tree, Path(tmp))
        daemon.command_prefix = [sys.executable, str(HERE / "opcode_trace.py")]
        daemon.env["JOBD_OPCODE_COUNTS"] = str(counts)
        daemon.start()
        try:
            work(daemon, n, lambda on: os.kill(daemon.pid, signal.SIGUSR1 if on else signal.SIGUSR2))
            with daemon.client() as client:
                client.call("ping")  # the loop has run the SIGUSR2 handler once it answers: the file is written
        finally:
            _stop(daemon)
        rows = [line.split("\t") for line in counts.read_text().splitlines()]
        return [(int(ops), int(calls), name) for ops, calls, name in rows]


def _daemon(tree: Path, root: Path) -> Daemon:
    daemon = Daemon(root, QUEUES, daemon_extra='durability = "crash"\nhistory = { keep_days = 1 }')
    daemon.log_level = "info"
    daemon.env["PYTHONPATH"] = str(tree)
    return daemon


def _stop(daemon: Daemon) -> None:
    assert daemon.process is not None
    daemon.process.terminate()
    daemon.process.wait(300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="a directory holding the jobd package")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--submits", type=int, default=1000)
    parser.add_argument("--valgrind", default="valgrind", help="valgrind, or another version's valgrind.bin")
    parser.add_argument("--opcodes", action="store_true", help="count Python opcodes by function instead")
    parser.add_argument("--top", type=int, default=25, help="--opcodes: the functions shown")
    args = parser.parse_args()
    tree = args.tree.resolve()
    if not (tree / "jobd" / "__init__.py").is_file():
        parser.error(f"{tree} holds no jobd package (jobd/__init__.py)")
    for label, work, n in (("job", jobs_through_a_queue, args.jobs), ("serial submit", serial_submits, args.submits)):
        if args.opcodes:
            rows = opcodes(tree, work, n)
            print(f"per {label}: {sum(ops for ops, _, _ in rows) / n:,.0f} Python opcodes; the most:")
            for ops, calls, name in rows[: args.top]:
                print(f"  {ops / n:8,.1f} opcodes {calls / n:6.2f} calls  {name}")
        else:
            print(f"per {label}: {instructions(tree, args.valgrind, work, n) / n:,.0f} instructions", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
