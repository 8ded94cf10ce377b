"""jobd benchmarks: figures for docs/BENCHMARKS.md, each measured against a reference run in the same process tree.

    python bench/run.py [--jobs 5000] [--only NAME ...]

The machine is shared and noisy, so speed is reported as a ratio to a reference measured in the same run:
- throughput: N `/bin/true` jobs through one queue of concurrency 2, against a bare posix_spawn + pidfd loop
  (also concurrency 2) that does nothing but start and reap the same processes, in alternated rounds (--rounds);
  jobd's CPU time per job from /proc (steadier than wall time on a shared machine, and what the figure is made of);
- submit rates: serial (one request at a time; alternated rounds with the reference server answering pings; jobd's
  CPU time per submit),
  batch (`jobs: [...]`, 100 per request), and for `fsync` also 32 concurrent clients; for each durability level;
  and for `crash` a new connection per submit, as web pages do; then the time of the reads a status page makes
  (job.get of a finished job, job.list of 100), beside a ping on the same connection;
- submit-to-start latency p50/p99 (the daemon's `started_at` minus the client's clock before sending);
- system calls made by an idle daemon over 30 s (strace -c -f);
- workflows: N instances of a workflow of three `/bin/true` tasks (one, then a subjob of two in parallel) through a
  queue of concurrency 2, against the same 3N tasks submitted as plain jobs to the same kind of queue; instances/s
  and the daemon's CPU time per task for both;
- loops: one instance whose first task lists N items and whose loop runs a `/bin/true` task per item (concurrency
  2), with a client following its events, at N and 4N items: tasks/s and the daemon's CPU time per task, whose
  ratio between the two sizes says whether an instance's events cost more as it grows;
- schedules: an every-second schedule of a `/bin/true` task, 60 firings: the delay from the due time (the whole
  second) to the job's `started_at` (p50/p99), and system calls between firings (strace -c -f in windows that
  open after one firing has settled and close before the next is due). Reference: the submit-to-start latency of
  the same job submitted by a client (the part of a firing that is not the timer's).

This is a script, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import multiprocessing
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Daemon

from jobd.client import Client
from jobd.heap import QUIET_SECONDS

FLOOR = Path(__file__).resolve().parent / "floor.py"
SUBMIT = {"command": ["/bin/true"], "queue": "parked"}

QUEUES = """
[queue.bench]
concurrency = 2

[queue.parked]
concurrency = 1
paused = true
"""


# One task, then a subjob whose two tasks run in parallel: three jobs per instance, all in the `bench` queue.
WORKFLOW = """<workflow>
  <subjobs>
    <job name="first">
      <tasks><task name="one" path="/bin/true" queue="bench"/></tasks>
      <subjobs>
        <job name="then">
          <tasks>
            <task name="two" path="/bin/true" queue="bench"/>
            <task name="three" path="/bin/true" queue="bench"/>
          </tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""
TASKS_PER_INSTANCE = 3


def start_daemon(root: Path, durability: str = "crash", workflows: dict[str, str] | None = None) -> Daemon:
    daemon = Daemon(root, QUEUES, daemon_extra=f'durability = "{durability}"\nhistory = {{ keep_days = 1 }}')
    daemon.log_level = "info"  # what a production jobd logs: every job transition
    if workflows:
        (daemon.config_dir / "workflows").mkdir()
        for name, text in workflows.items():
            (daemon.config_dir / "workflows" / f"{name}.xml").write_text(text)
    daemon.start()
    return daemon


def bare_spawn_loop(count: int, concurrency: int) -> float:
    """The reference: spawn /bin/true with posix_spawn, wait on pidfds with epoll-backed select, reap."""
    env = {"PATH": "/usr/bin:/bin"}
    started = time.perf_counter()
    running: dict[int, int] = {}  # pidfd -> pid
    launched = 0
    while launched < count or running:
        while launched < count and len(running) < concurrency:
            pid = os.posix_spawn("/bin/true", ["/bin/true"], env, setpgroup=0)
            running[os.pidfd_open(pid)] = pid
            launched += 1
        ready, _, _ = select.select(list(running), [], [])
        for fd in ready:
            os.waitpid(running.pop(fd), 0)
            os.close(fd)
    return time.perf_counter() - started


def spawn_floor(root: Path, count: int) -> tuple[float, float]:
    """The spawn floor of bench/floor.py over `count` jobs, in a process of its own: seconds and its CPU seconds."""
    root.mkdir()
    output = subprocess.run(
        [sys.executable, str(FLOOR), "spawn", str(count), str(root)], check=True, capture_output=True, text=True
    ).stdout
    measured = json.loads(output)
    return measured["seconds"], measured["cpu"]


@contextlib.contextmanager
def submit_floor(root: Path) -> Iterator[str]:
    """The submit floor of bench/floor.py serving on a socket of its own; yields the socket's path."""
    root.mkdir()
    path = str(root / "floor.sock")
    server = subprocess.Popen([sys.executable, str(FLOOR), "serve", path, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the submit floor did not start")
        yield path
    finally:
        server.kill()
        server.wait()


def wait_for_stragglers(client: Client, queue: str) -> None:
    """Wait for the jobs of `queue` that have not ended although the last ones have: a start that failed for want of
    resources on a loaded machine is tried again a second later (docs/jobs.md), after the jobs that came behind it.
    Asked once; on a run without such a job this is one job.list."""
    stragglers = client.call("job.list", {"queue": queue, "state": ["delayed", "queued", "running"], "limit": 1000})
    for job in stragglers["jobs"]:
        client.call("job.wait", {"id": job["id"]}, timeout=600)


def jobd_throughput(daemon: Daemon, count: int) -> tuple[float, float]:
    """Submit `count` jobs into a paused queue, resume it, and time until the last one has finished.

    Returns the seconds from the resume to the end, and jobd's CPU time over the same span."""
    with daemon.client() as client:
        client.call("queue.pause", {"name": "bench"})
        ids: list[int] = []
        for start in range(0, count, 500):
            batch = [{"command": ["/bin/true"], "queue": "bench"} for _ in range(min(500, count - start))]
            ids += [job["id"] for job in client.call("job.submit", {"jobs": batch})["jobs"]]
        started, cpu = time.perf_counter(), cpu_seconds(daemon.pid)
        client.call("queue.resume", {"name": "bench"})
        # Jobs start in id order two at a time, so when the last one started only the one before it could still
        # run: once both have ended, all have. (Waiting on each of them would measure the client's RPCs.)
        for job_id in ids[-2:]:
            client.call("job.wait", {"id": job_id}, timeout=600)
        wait_for_stragglers(client, "bench")
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(daemon.pid) - cpu
        counts = client.call("daemon.status")["jobs"]
        if counts.get("succeeded") != count:
            raise RuntimeError(f"not every job succeeded: {counts}")
        return elapsed, cpu


def serial_submits(daemon: Daemon, count: int) -> tuple[float, float]:
    """Submits per second, one client waiting for each reply, and jobd's CPU seconds per submit."""
    with daemon.client() as client:
        started, cpu = time.perf_counter(), cpu_seconds(daemon.pid)
        for _ in range(count):
            client.call("job.submit", SUBMIT)
        return count / (time.perf_counter() - started), (cpu_seconds(daemon.pid) - cpu) / count


def connection_submits(daemon: Daemon, count: int) -> float:
    """One job per connection: connect, submit, close, as a web page does for each request it serves."""
    started = time.perf_counter()
    for _ in range(count):
        with daemon.client() as client:
            client.call("job.submit", SUBMIT)
    return count / (time.perf_counter() - started)


def pipelined_submits(daemon: Daemon, count: int, window: int = 64) -> float:
    """One job per request on one connection, up to `window` requests in flight (pipelining, as the API allows)."""
    request = b'{"jsonrpc":"2.0","id":1,"method":"job.submit","params":{"command":["/bin/true"],"queue":"parked"}}\n'
    with daemon.client() as client:
        client.call("ping")
        sent = received = 0
        started = time.perf_counter()
        while received < count:
            burst = min(window - (sent - received), count - sent)
            if burst:
                client.send_raw(request * burst)
                sent += burst
            reply = client.read_line(timeout=60)
            if "error" in reply:
                raise RuntimeError(reply["error"])
            received += 1
        return count / (time.perf_counter() - started)


@contextlib.contextmanager
def reference_server(root: Path) -> Iterator[str]:
    """Reference for request rates: a bare asyncio JSON-lines server answering `ping`, no work behind it, in a
    process of its own as jobd is (the client must not share its interpreter lock). Yields its socket path."""
    path = str(root / "echo.sock")
    context = multiprocessing.get_context("fork")
    ready = context.Event()

    def serve() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                request = json.loads(line)
                writer.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {"pong": True}}).encode())
                writer.write(b"\n")

        async def main() -> None:
            server = await asyncio.start_unix_server(handle, path)
            ready.set()
            async with server:
                await asyncio.sleep(3600)

        asyncio.run(main())

    child = context.Process(target=serve, daemon=True)
    child.start()
    try:
        if not ready.wait(10):
            raise RuntimeError("the reference server did not start")
        yield path
    finally:
        child.kill()


def serial_calls(path: str, count: int, method: str, params: dict[str, Any] | None = None) -> float:
    """Calls per second on one connection, one at a time, through jobd's client."""
    with Client(path) as client:
        started = time.perf_counter()
        for _ in range(count):
            client.call(method, params)
        return count / (time.perf_counter() - started)


def connection_pings(path: str, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        with Client(path) as client:
            client.call("ping")
    return count / (time.perf_counter() - started)


def read_calls(daemon: Daemon, count: int) -> dict[str, float]:
    """µs per call of what a status page asks, one call at a time on one connection, beside a ping there: job.get
    of a finished job (read back from the database, with its attempts) and a page of 100 jobs of job.list."""
    with daemon.client() as client:
        finished = client.call("job.submit", {"command": ["/bin/true"], "queue": "bench"})
        client.call("job.wait", {"id": finished["id"], "timeout": 60})
        calls = {"ping": ("ping", None), "job.get": ("job.get", {"id": finished["id"]}), "job.list": ("job.list", {})}
        per_call = {}
        for name, (method, params) in calls.items():
            started = time.perf_counter()
            for _ in range(count):
                client.call(method, params)
            per_call[name] = (time.perf_counter() - started) / count * 1e6
        return per_call


def batch_submits(daemon: Daemon, count: int, per_request: int = 100) -> float:
    with daemon.client() as client:
        started = time.perf_counter()
        for _ in range(count // per_request):
            jobs = [{"command": ["/bin/true"], "queue": "parked"} for _ in range(per_request)]
            client.call("job.submit", {"jobs": jobs})
        return (count // per_request * per_request) / (time.perf_counter() - started)


def concurrent_submits(daemon: Daemon, clients: int, per_client: int) -> float:
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with daemon.client() as client:
                barrier.wait()
                for _ in range(per_client):
                    client.call("job.submit", SUBMIT)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return clients * per_client / elapsed


def start_latency(daemon: Daemon, samples: int) -> tuple[float, float]:
    latencies = []
    with daemon.client() as client:
        for _ in range(samples):
            before = time.time()
            job = client.call("job.submit", {"command": ["/bin/true"], "queue": "bench"})
            job = client.call("job.wait", {"id": job["id"]})
            started_at = dt.datetime.fromisoformat(job["started_at"].replace("Z", "+00:00")).timestamp()
            latencies.append(started_at - before)
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads, not its reaped children), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd (state) on: utime and stime are 14th, 15th
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipelined_calls(client: Client, method: str, params: list[dict[str, Any]], window: int = 64) -> list[Any]:
    """One request per item on one connection, up to `window` in flight; the results, in the order of `params`."""
    results: list[Any] = [None] * len(params)
    sent = received = 0
    while received < len(params):
        burst = min(window - (sent - received), len(params) - sent)
        if burst:
            requests = [
                json.dumps({"jsonrpc": "2.0", "id": index, "method": method, "params": params[index]}) + "\n"
                for index in range(sent, sent + burst)
            ]
            client.send_raw("".join(requests).encode())
            sent += burst
        reply = client.read_line(timeout=60)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        results[reply["id"]] = reply["result"]
        received += 1
    return results


def plain_tasks(daemon: Daemon, count: int) -> tuple[float, float]:
    """The reference for workflows: `count` jobs submitted one per request (pipelined) into the running queue.

    Returns the seconds from the first submit until the last job ended, and the daemon's CPU seconds meanwhile.
    """
    with daemon.client() as client:
        client.call("ping")
        cpu = cpu_seconds(daemon.pid)
        started = time.perf_counter()
        jobs = pipelined_calls(client, "job.submit", [{"command": ["/bin/true"], "queue": "bench"}] * count)
        for job in jobs[-2:]:  # jobs start in id order two at a time: once the last two have ended, all have
            client.call("job.wait", {"id": job["id"]}, timeout=600)
        wait_for_stragglers(client, "bench")
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(daemon.pid) - cpu
        counts = client.call("daemon.status")["jobs"]
        if counts.get("succeeded") != count:
            raise RuntimeError(f"not every job succeeded: {counts}")
        return elapsed, cpu


def workflow_instances(daemon: Daemon, count: int) -> tuple[float, float]:
    """Launch `count` instances of WORKFLOW (pipelined) into the running queue; time until all are TERMINATED.

    Returns the seconds from the first launch until the last instance ended, and the daemon's CPU seconds meanwhile.
    """
    with daemon.client() as client:
        client.call("ping")
        cpu = cpu_seconds(daemon.pid)
        started = time.perf_counter()
        launched = pipelined_calls(client, "instance.launch", [{"workflow": "bench"}] * count)
        # Unlike plain jobs, instances need not end in launch order: the subjob of an instance is queued when its
        # first task ends, and of two first tasks running side by side either may end first. So wait on the last
        # one launched (nearly all others have ended by then), then on whatever is still executing, until nothing
        # is. Waiting on each of the 1,000 would put 1,000 RPCs in the daemon's CPU time being measured.
        client.call("instance.wait", {"id": launched[-1]["id"]}, timeout=600)
        while executing := client.call("instance.list", {"status": "EXECUTING", "limit": 1000})["instances"]:
            for instance in executing:
                client.call("instance.wait", {"id": instance["id"]}, timeout=600)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(daemon.pid) - cpu
        total = client.call("instance.list", {"status": "TERMINATED", "limit": 1})["total"]
        failed = client.call("instance.list", {"errors": True, "limit": 1})["total"]
        counts = client.call("daemon.status")["jobs"]
        if total != count or failed or counts.get("succeeded") != count * TASKS_PER_INSTANCE:
            raise RuntimeError(f"{total} instances terminated, {failed} with errors; jobs: {counts}")
        return elapsed, cpu


def loop_workflow(directory: Path, items: int) -> str:
    """A workflow whose first task lists `items` items, then runs one /bin/true per item (a loop of jobs)."""
    lister = directory / f"list-{items}.sh"
    lister.write_text(f"#!/bin/sh\necho '<items>'\nseq {items} | sed 's|.*|<i/>|'\necho '</items>'\n")
    lister.chmod(0o755)
    return f"""<workflow><subjobs><job name="list">
  <tasks><task name="list" path="{lister}" queue="bench" output-method="XML"/></tasks>
  <subjobs><job name="each" loop="evqGetParentJob()/evqGetOutput('list')/items/i">
    <tasks><task name="each" path="/bin/true" queue="bench"/></tasks>
  </job></subjobs>
</job></subjobs></workflow>"""


def looping_instance(daemon: Daemon, items: int) -> tuple[float, float]:
    """One instance of `loop_workflow(items)` followed by an events subscriber reading everything, as a dashboard
    would; returns its seconds from launch to end and the daemon's CPU seconds meanwhile."""
    follower = Client(str(daemon.socket_path))
    follower.call("events.subscribe", {"types": ["instance.state", "instance.progress"]}, timeout=10)

    def follow() -> None:
        with contextlib.suppress(OSError, EOFError, ConnectionError):
            while True:
                follower.next_event()

    # It reads until the daemon stops and closes the connection.
    threading.Thread(target=follow, daemon=True).start()
    with daemon.client() as client:
        cpu = cpu_seconds(daemon.pid)
        started = time.perf_counter()
        launched = client.call("instance.launch", {"workflow": f"loop{items}"})
        ended = client.call("instance.wait", {"id": launched["id"], "timeout": 3600}, timeout=3700)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(daemon.pid) - cpu
    if ended["status"] != "TERMINATED" or ended["errors"]:
        raise RuntimeError(f"the loop instance ended as {ended}")
    return elapsed, cpu


def idle_syscalls(daemon: Daemon, seconds: int) -> tuple[int, str]:
    with daemon.client() as client:  # make sure it is idle: nothing queued, nothing running
        client.call("ping")
    # jobd gives its free heap memory back once, QUIET_SECONDS to twice that after its last I/O (jobd.heap): that trim
    # ends the work, and being idle begins after it.
    time.sleep(2 * QUIET_SECONDS + 1)
    trace = subprocess.run(
        ["timeout", "-s", "INT", str(seconds), "strace", "-c", "-f", "-p", str(daemon.pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = trace.stderr
    total = 0
    for line in report.splitlines():
        fields = line.split()
        if fields and fields[-1] == "total":
            total = int(fields[3])  # % time, seconds, usecs/call, calls, [errors], total
    return total, report


SCHEDULE = """
[task.true]
command = ["/bin/true"]
queue = "bench"

[schedule.tick]
task = "true"
calendar = "* * * * * *"
"""


def schedule_firings(daemon: Daemon, firings: int) -> list[float]:
    """Delays (s) from each due time to its job's start, read from the job.state events of `firings` firings.

    The due time is the whole second the start falls in (the calendar's times are whole seconds, and a delay of a
    second or more would show as a missing firing: the test suite checks there is none)."""
    delays = []
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]})
        while len(delays) < firings:
            job = client.next_event(timeout=10).get("job") or {}
            if job.get("state") == "running" and job.get("context") == "schedule:tick":
                started_at = dt.datetime.fromisoformat(job["started_at"].replace("Z", "+00:00")).timestamp()
                delays.append(started_at - math.floor(started_at))
    return delays


def bare_timer_wakeups(count: int) -> list[float]:
    """Reference: the delay from a whole second to the wake-up of a process sleeping in select() on a timerfd armed
    at it (the same shim, flags and clock as jobd's) — what the kernel and the machine cost before jobd does
    anything. On a VM the idle vCPU's wake-up is most of it."""
    from jobd import linux

    fd = linux.timerfd_create(linux.CLOCK_REALTIME, linux.TFD_CLOEXEC | linux.TFD_NONBLOCK)
    delays = []
    try:
        for _ in range(count):
            due = float(math.floor(time.time()) + 1)
            linux.timerfd_settime(fd, linux.TFD_TIMER_ABSTIME | linux.TFD_TIMER_CANCEL_ON_SET, due)
            select.select([fd], [], [])
            delays.append(time.time() - due)
            linux.read_expirations(fd)
    finally:
        os.close(fd)
    return delays


def syscalls_between_firings(daemon: Daemon, windows: int, start: float = 0.4, end: float = 0.9) -> list[int]:
    """strace -c -f on the daemon from `start` to `end` s after a whole second, once per second, `windows` times.

    A firing (timer read, submit, spawn, reap, SQLite commits, log lines) is over within ~10 ms of the whole second,
    and the STATUS= update that follows a change of the job counts goes out 0.1 s later: from 0.4 s on, nothing but
    the timer is due until the next whole second."""
    counts = []
    for _ in range(windows):
        now = time.time()
        time.sleep(math.floor(now) + 1 + start - now)
        trace = subprocess.run(
            ["timeout", "-s", "INT", str(end - start), "strace", "-c", "-f", "-p", str(daemon.pid)],
            capture_output=True,
            text=True,
            check=False,
        )
        total = 0
        for line in trace.stderr.splitlines():
            fields = line.split()
            if fields and fields[-1] == "total":
                total = int(fields[3])
        counts.append(total)
    return counts


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * fraction) - 1)]


def timed(label: str, action: Callable[[], Any]) -> Any:
    print(f"  {label} ...", file=sys.stderr, flush=True)
    return action()


def _span(rates: list[float]) -> str:
    low, high = min(rates), max(rates)
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def _median_and_each(ours: list[float], references: list[float]) -> str:
    ratios = [a / b for a, b in zip(ours, references, strict=True)]
    return f"median {statistics.median(ratios):.2f} (each: {', '.join(f'{r:.2f}' for r in ratios)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--submits", type=int, default=5000)
    parser.add_argument("--idle-seconds", type=int, default=30)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--loop-items", type=int, default=500, help="loops: the smaller size (the larger is 4x)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternated rounds of jobd and its reference: throughput, serial submits, workflows",
    )
    parser.add_argument("--firings", type=int, default=60, help="schedule benchmark: firings measured")
    parser.add_argument(
        "--only", nargs="*", default=["throughput", "submit", "latency", "idle", "workflow", "loop", "schedule"]
    )
    args = parser.parse_args()
    results: list[str] = []
    with tempfile.TemporaryDirectory(prefix="jobd-bench.") as tmp:
        root = Path(tmp)
        if "throughput" in args.only:
            # Alternated rounds, the ratio of each taken against the reference run just before it: the machine's
            # speed drifts by tens of per cent within minutes, in both.
            bare_rates, jobd_rates, jobd_cpu, floor_rates, floor_cpu = [], [], [], [], []
            for round_ in range(args.rounds):
                bare = timed("bare posix_spawn + pidfd loop", lambda: bare_spawn_loop(args.jobs, 2))
                floor, cpu = timed("spawn floor", lambda r=round_: spawn_floor(root / f"floor-{r}", args.jobs))
                floor_rates.append(args.jobs / floor)
                floor_cpu.append(cpu / args.jobs * 1e6)
                daemon = start_daemon(root / f"throughput-{round_}")
                try:
                    ours, cpu = timed("jobd", lambda d=daemon: jobd_throughput(d, args.jobs))
                finally:
                    daemon.stop()
                bare_rates.append(args.jobs / bare)
                jobd_rates.append(args.jobs / ours)
                jobd_cpu.append(cpu / args.jobs * 1e6)
            results.append(
                f"throughput, {args.jobs} /bin/true, concurrency 2, {args.rounds} alternated rounds: "
                f"ratio {_median_and_each(jobd_rates, bare_rates)}; jobd {_span(jobd_rates)} jobs/s "
                f"({_span(jobd_cpu)} µs of jobd's CPU per job), bare loop {_span(bare_rates)} jobs/s"
            )
            results.append(
                f"spawn floor (bench/floor.py: Popen, pipes, pidfd, the commits; nothing else), same rounds: ratio "
                f"to the bare loop {_median_and_each(floor_rates, bare_rates)}, "
                f"{_span(floor_cpu)} µs of its CPU per job"
            )
        if "submit" in args.only:
            with reference_server(root) as reference, submit_floor(root / "submit-floor") as floor_path:
                daemon = start_daemon(root / "submit-crash")
                try:
                    # Serial submits against the reference answering pings serially, in alternated rounds.
                    floors, serials, serial_cpu, submit_floors = [], [], [], []
                    for _ in range(args.rounds):
                        floors.append(
                            timed("reference, serial pings", lambda: serial_calls(reference, args.submits, "ping"))
                        )
                        submit_floors.append(
                            timed(
                                "submit floor, serial",
                                lambda: serial_calls(floor_path, args.submits, "job.submit", SUBMIT),
                            )
                        )
                        rate, cpu = timed("serial submits (crash)", lambda d=daemon: serial_submits(d, args.submits))
                        serials.append(rate)
                        serial_cpu.append(cpu * 1e6)
                    floor_connections = timed(
                        "reference, a connection per ping", lambda: connection_pings(reference, args.submits // 2)
                    )
                    fresh = timed(
                        "a new connection per submit", lambda d=daemon: connection_submits(d, args.submits // 2)
                    )
                    piped = timed("pipelined submits (crash)", lambda d=daemon: pipelined_submits(d, args.submits))
                    batch = timed("batch submits (crash)", lambda d=daemon: batch_submits(d, args.submits * 4))
                    reads = timed("reads", lambda d=daemon: read_calls(d, args.submits // 10))
                finally:
                    daemon.stop()
            results.append(
                f"reference: a bare asyncio JSON-lines ping server answers {_span(floors)} serial requests/s, "
                f"{floor_connections:.0f}/s with a new connection each"
            )
            results.append(
                f"submit, durability crash: serial {_span(serials)}/s (median {statistics.median(serials):.0f}, "
                f"{args.rounds} rounds, {_span(serial_cpu)} µs of jobd's CPU per submit; ratio to the reference "
                f"{_median_and_each(serials, floors)}), "
                f"pipelined {piped:.0f}/s, batch of 100 {batch:.0f} jobs/s, a new connection each {fresh:.0f}/s"
            )
            results.append(
                f"submit floor (bench/floor.py: decode, one committed INSERT, the reply; nothing else), same rounds: "
                f"serial {_span(submit_floors)}/s (median {statistics.median(submit_floors):.0f})"
            )
            results.append(
                f"reads, one at a time: job.get of a finished job {reads['job.get']:.0f} µs, job.list of 100 jobs "
                f"{reads['job.list']:.0f} µs, against ping {reads['ping']:.0f} µs"
            )
            daemon = start_daemon(root / "submit-fsync", "fsync")
            try:
                serial, _ = timed("serial submits (fsync)", lambda: serial_submits(daemon, args.submits))
                piped = timed("pipelined submits (fsync)", lambda: pipelined_submits(daemon, args.submits))
                batch = timed("batch submits (fsync)", lambda: batch_submits(daemon, args.submits * 4))
                parallel = timed("32 concurrent clients", lambda: concurrent_submits(daemon, 32, args.submits // 32))
            finally:
                daemon.stop()
            results.append(
                f"submit, durability fsync: serial {serial:.0f}/s, pipelined {piped:.0f}/s, batch of 100 "
                f"{batch:.0f} jobs/s, 32 concurrent clients {parallel:.0f}/s"
            )
        if "latency" in args.only:
            daemon = start_daemon(root / "latency")
            try:
                p50, p99 = timed("submit-to-start latency", lambda: start_latency(daemon, 500))
            finally:
                daemon.stop()
            results.append(f"submit-to-start latency over 500 jobs: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
        if "idle" in args.only:
            daemon = start_daemon(root / "idle")
            try:
                calls, report = timed(
                    f"idle daemon, {args.idle_seconds} s", lambda: idle_syscalls(daemon, args.idle_seconds)
                )
            finally:
                daemon.stop()
            results.append(f"system calls by an idle daemon over {args.idle_seconds} s: {calls}")
            if calls:
                results.append(report)
        if "workflow" in args.only:
            tasks = args.instances * TASKS_PER_INSTANCE
            measured: dict[str, list[tuple[float, float]]] = {"plain": [], "workflow": []}
            # Alternated rounds, best of each: on a shared machine one run of either can be slowed by a neighbour.
            for round_ in range(args.rounds):
                for kind, run in (("plain", plain_tasks), ("workflow", workflow_instances)):
                    # A fresh daemon each, with the same configuration (the workflow installed in both).
                    daemon = start_daemon(root / f"{kind}-{round_}", workflows={"bench": WORKFLOW})
                    try:
                        count = tasks if kind == "plain" else args.instances
                        measured[kind].append(timed(f"{kind}, {count}", lambda d=daemon, r=run, n=count: r(d, n)))
                    finally:
                        daemon.stop()
            flow, flow_cpu = (min(values) for values in zip(*measured["workflow"], strict=True))
            plain, plain_cpu = (min(values) for values in zip(*measured["plain"], strict=True))
            results.append(
                f"workflow, {args.instances} instances of 1 task + a subjob of 2 parallel tasks ({tasks} /bin/true), "
                f"concurrency 2, best of {args.rounds}: {args.instances / flow:.0f} instances/s = "
                f"{tasks / flow:.0f} tasks/s, daemon CPU {flow_cpu / tasks * 1000:.2f} ms/task; plain jobs (reference) "
                f"{tasks / plain:.0f} jobs/s, daemon CPU {plain_cpu / tasks * 1000:.2f} ms/job; ratio (tasks/s over "
                f"jobs/s) {plain / flow:.2f}, CPU per task over per job {flow_cpu / plain_cpu:.2f}"
            )
        if "loop" in args.only:
            sizes = (args.loop_items, 4 * args.loop_items)
            loops = {f"loop{size}": loop_workflow(root, size) for size in sizes}
            by_size: dict[int, list[tuple[float, float]]] = {size: [] for size in sizes}
            for round_ in range(args.rounds):  # alternated, best of each
                for size in sizes:
                    daemon = start_daemon(root / f"loop-{size}-{round_}", workflows=loops)
                    try:
                        by_size[size].append(timed(f"loop of {size}", lambda d=daemon, n=size: looping_instance(d, n)))
                    finally:
                        daemon.stop()
            figures = []
            for size in sizes:
                seconds, cpu = (min(values) for values in zip(*by_size[size], strict=True))
                figures.append((size, (size + 1) / seconds, cpu / (size + 1)))
            (small, small_rate, small_cpu), (large, large_rate, large_cpu) = figures
            results.append(
                f"loops, one instance with an events subscriber, concurrency 2, best of {args.rounds}: {small} items "
                f"{small_rate:.0f} tasks/s, daemon CPU {small_cpu * 1000:.2f} ms/task; {large} items {large_rate:.0f} "
                f"tasks/s, {large_cpu * 1000:.2f} ms/task; CPU per task at {large} over {small}: "
                f"{large_cpu / small_cpu:.2f} (1 when an event costs the same however large the instance)"
            )
        if "schedule" in args.only:
            daemon = Daemon(root / "schedule", QUEUES + SCHEDULE, daemon_extra="history = { keep_days = 1 }")
            daemon.log_level = "info"
            daemon.start()
            try:
                delays = timed(f"schedule, {args.firings} firings", lambda: schedule_firings(daemon, args.firings))
                windows = timed("system calls between firings", lambda: syscalls_between_firings(daemon, 10))
                daemon.call("schedule.disable", {"name": "tick"})
                reference = timed("submit-to-start of the same job", lambda: start_latency(daemon, 200))
            finally:
                daemon.stop()
            wakeups = timed("bare timerfd wake-ups, 30", lambda: bare_timer_wakeups(30))
            results.append(
                f"schedule, every second, {args.firings} firings: due time to started_at p50 "
                f"{statistics.median(delays) * 1000:.2f} ms, p99 {percentile(delays, 0.99) * 1000:.2f} ms, max "
                f"{max(delays) * 1000:.2f} ms; reference submit-to-start p50 {reference[0] * 1000:.2f} ms, p99 "
                f"{reference[1] * 1000:.2f} ms; bare timerfd wake-up (reference, 30) p50 "
                f"{statistics.median(wakeups) * 1000:.2f} ms, max {max(wakeups) * 1000:.2f} ms; "
                f"system calls in 10 windows 0.4-0.9 s after a firing: {windows}"
            )
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
