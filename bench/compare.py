"""Compare two jobd source trees side by side: is a change faster, and by how much?

    python bench/compare.py BEFORE [AFTER] [--only submit throughput] [--bursts 40] [--burst 1000]
        [--before-env NAME=VALUE ...] [--after-env NAME=VALUE ...]

BEFORE and AFTER are directories holding a `jobd/` package (AFTER defaults to this checkout); for instance
`git worktree add /tmp/before HEAD~1`, or `git archive HEAD~1 | tar -x -C /tmp/before`. `--before-env` and
`--after-env` add variables to either side's environment (`--after-env PYTHONMALLOC=malloc`), as `Environment=` in
jobd.service would; the trees may then be the same.

The machine is shared and its speed drifts by tens of per cent within a minute, so figures of two runs made one after
the other say little about a change of a few per cent. Here the two trees are measured interleaved:
- submit: a daemon of each tree runs at once (an idle jobd costs nothing), and one client sends them bursts of serial
  `job.submit`s in turn (A B, then B A, ...). Each pair of bursts gives a ratio AFTER/BEFORE, taken moments apart;
  the median of those ratios is the figure, with its quartiles. Each daemon's CPU time per submit over all its bursts
  is reported too (from /proc, so at the kernel's tick: bursts of a second or more are needed for it to mean much).
- throughput: alternated rounds of N `/bin/true` jobs through a queue of concurrency 2 (as bench/run.py measures
  them), a fresh daemon of either tree each round: jobs/s and jobd's CPU time per job, medians.

This is a script, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import QUEUES, SUBMIT, Daemon, cpu_seconds, jobd_throughput

Sides = tuple[Path, Path]  # before, after
Envs = tuple[dict[str, str], dict[str, str]]


def start(tree: Path, root: Path, env: dict[str, str]) -> Daemon:
    """A daemon running the jobd package of `tree` (first on its PYTHONPATH) with `env` added to its environment,
    configured as bench/run.py does."""
    daemon = Daemon(root, QUEUES, daemon_extra='durability = "crash"\nhistory = { keep_days = 1 }')
    daemon.log_level = "info"  # what a production jobd logs: every job transition
    daemon.env = {**env, "PYTHONPATH": str(tree)}
    daemon.start()
    return daemon


def compare_submits(trees: Sides, envs: Envs, bursts: int, burst: int) -> str:
    with tempfile.TemporaryDirectory(prefix="jobd-compare-") as scratch:
        daemons = [
            start(trees[side], Path(scratch) / name, envs[side]) for side, name in enumerate(("before", "after"))
        ]
        try:
            rates: list[list[float]] = [[], []]
            cpu = [0.0, 0.0]
            with daemons[0].client() as first, daemons[1].client() as second:
                clients = (first, second)
                for client in clients:  # warm up: the first submits of a daemon pay for imports and caches
                    for _ in range(300):
                        client.call("job.submit", SUBMIT)
                for number in range(bursts):
                    for side in (0, 1) if number % 2 == 0 else (1, 0):
                        used = cpu_seconds(daemons[side].pid)
                        started = time.perf_counter()
                        for _ in range(burst):
                            clients[side].call("job.submit", SUBMIT)
                        rates[side].append(burst / (time.perf_counter() - started))
                        cpu[side] += cpu_seconds(daemons[side].pid) - used
        finally:
            for daemon in daemons:
                daemon.stop()
    ratios = [after_rate / before_rate for before_rate, after_rate in zip(*rates, strict=True)]
    quartiles = statistics.quantiles(ratios) if len(ratios) > 1 else ratios * 3
    per_submit = [seconds / (bursts * burst) * 1e6 for seconds in cpu]
    return (
        f"serial submits, {bursts} bursts of {burst} each: before {statistics.median(rates[0]):.0f}/s, after "
        f"{statistics.median(rates[1]):.0f}/s (medians); after/before median {statistics.median(ratios):.3f} "
        f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}); jobd's CPU per submit {per_submit[0]:.0f} µs before, "
        f"{per_submit[1]:.0f} µs after"
    )


def compare_throughput(trees: Sides, envs: Envs, rounds: int, jobs: int) -> str:
    measured: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    with tempfile.TemporaryDirectory(prefix="jobd-compare-") as scratch:
        for number in range(rounds):
            for side in (0, 1) if number % 2 == 0 else (1, 0):
                daemon = start(trees[side], Path(scratch) / f"{number}-{side}", envs[side])
                try:
                    seconds, cpu = jobd_throughput(daemon, jobs)
                finally:
                    daemon.stop()
                measured[side].append((jobs / seconds, cpu / jobs * 1e6))

    def figures(side: int) -> str:
        rate = statistics.median(rate for rate, _ in measured[side])
        cpu = statistics.median(cpu for _, cpu in measured[side])
        return f"{rate:.0f} jobs/s, {cpu:.0f} µs of jobd's CPU per job"

    return (
        f"throughput, {jobs} /bin/true, concurrency 2, {rounds} alternated rounds (medians): before {figures(0)}; "
        f"after {figures(1)}"
    )


def environment(assignments: list[str]) -> dict[str, str]:
    return dict(assignment.split("=", 1) for assignment in assignments)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="a directory holding the jobd package measured first")
    parser.add_argument("after", type=Path, nargs="?", default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--only", nargs="*", default=["submit", "throughput"], choices=["submit", "throughput"])
    parser.add_argument("--bursts", type=int, default=40, help="submit: bursts for each tree")
    parser.add_argument("--burst", type=int, default=1000, help="submit: serial submits in a burst")
    parser.add_argument("--rounds", type=int, default=6, help="throughput: rounds for each tree")
    parser.add_argument("--jobs", type=int, default=3000, help="throughput: jobs in a round")
    for side in ("before", "after"):
        parser.add_argument(
            f"--{side}-env",
            nargs="+",
            default=[],
            metavar="NAME=VALUE",
            help=f"added to the {side} daemons' environment",
        )
    args = parser.parse_args()
    trees = (args.before.resolve(), args.after.resolve())
    envs = (environment(args.before_env), environment(args.after_env))
    for tree in trees:
        if not (tree / "jobd" / "__init__.py").is_file():
            parser.error(f"{tree} holds no jobd package (jobd/__init__.py)")
    if trees[0] == trees[1] and envs[0] == envs[1]:
        print("(both trees are the same: the ratios show the noise of the machine)")
    if "submit" in args.only:
        print(compare_submits(trees, envs, args.bursts, args.burst), flush=True)
    if "throughput" in args.only:
        print(compare_throughput(trees, envs, args.rounds, args.jobs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
