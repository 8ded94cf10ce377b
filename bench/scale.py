"""jobd with many definitions and big objects: what one operation costs as they grow, and whether it stalls others.

    python bench/scale.py [--only NAME ...]

Each measure starts a daemon of its own on a temporary state, at a small and a large size where the cost of one
operation could grow with the size (the ratio between the two says whether it does), and times it while a second
connection sends pings back to back: the slowest ping says how long the operation kept the event loop from other
clients. Memory: the daemon's VmHWM (peak resident) and VmRSS, in MB, from /proc.

- definitions: Q queues, Q tasks and Q/2 schedules (ten of them every second, the rest daily) and Q/4
  workflow files: start-up to READY, `daemon.reload` of the same files, one submit to the last task,
  `queue.list`, `schedule.list`, `workflow.list`, and the daemon's CPU per second while the ten fire;
- workflow: one workflow of N tasks in jobs of 20, each the subjob of the one before (N/20 deep): start-up, launch,
  the run (concurrency 4), and `instance.get` of the ended instance;
- subscribers: S connections subscribed to `events.subscribe` (job.state), all read at once by this process, while J
  jobs are submitted in batches of 1,000 to a running queue of concurrency 2: time until every subscriber has seen
  every job end (or was cut off), and the slowest ping;
- big: 100 queued jobs whose argv, params or context fill most of a request (the frame's limit is 1 MiB): a submit,
  then one `job.list` (limit 1,000), the reply's size, and the daemon's peak memory before and after;
- history: H jobs written straight into the database (ended, but H/5 queued in paused queues), then start-up, the
  first `daemon.status` (it waits for the start-up's count of the history), `job.list` of 1,000 with each filter and
  90 % deep in the history (`before`), and the start-up after a `kill -9`.

This is a script, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Daemon
from run import cpu_seconds

SCHEDULE_WINDOW = 10.0  # seconds over which the daemon's CPU is read while its every-second schedules fire


def mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


@contextmanager
def pinger(daemon: Daemon) -> Iterator[list[float]]:
    """Pings back to back on a connection of their own while the block runs; yields the list of their latencies."""
    latencies: list[float] = []
    stop = threading.Event()

    def run() -> None:
        with daemon.client() as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.call("ping", timeout=600)
                latencies.append(time.perf_counter() - started)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join()


def timed(daemon: Daemon, what: Callable[[], Any]) -> tuple[float, float, Any]:
    """Seconds `what` took, the slowest ping meanwhile (seconds), and its result."""
    with pinger(daemon) as latencies:
        started = time.perf_counter()
        result = what()
        elapsed = time.perf_counter() - started
    return elapsed, max(latencies, default=0.0), result


def row(label: str, **figures: Any) -> None:
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(label, shown, flush=True)


def started(daemon: Daemon) -> float:
    began = time.perf_counter()
    daemon.start()
    return time.perf_counter() - began


# -- definitions -----------------------------------------------------------------------------------------------


def definitions_config(count: int) -> str:
    parts = []
    for i in range(count):
        parts.append(f"[queue.q{i}]\nconcurrency = 2\n")
        parts.append(f'[task.t{i}]\ncommand = ["/bin/true"]\nqueue = "q{i}"\n')
    for i in range(count // 2):
        calendar = "* * * * * *" if i < 10 else f"0 {i % 60} {i % 24} * * *"
        parts.append(f'[schedule.s{i}]\ntask = "t{i}"\ncalendar = "{calendar}"\n')
    return "\n".join(parts)


WORKFLOW = """<workflow><subjobs><job name="a"><tasks>
<task name="one" path="/bin/true" queue="q0"/></tasks></job></subjobs></workflow>"""


def definitions(root: Path, count: int) -> None:
    daemon = Daemon(root, definitions_config(count))
    daemon.log_level = "info"
    daemon.write_workflows(**{f"w{i}": WORKFLOW for i in range(count // 4)})
    try:
        startup = started(daemon)
        with daemon.client() as client:
            reload_s, reload_ping, _ = timed(daemon, lambda: client.call("daemon.reload", timeout=600))
            submit_s, _, _ = timed(daemon, lambda: client.call("job.submit", {"task": f"t{count - 1}"}))
            many = [client.call("job.submit", {"task": f"t{i}"}) for i in range(0, count, max(1, count // 200))]
            for job in many[-2:]:
                client.call("job.wait", {"id": job["id"]}, timeout=600)
            queues_s, queues_ping, _ = timed(daemon, lambda: client.call("queue.list", timeout=600))
            sched_s, sched_ping, _ = timed(daemon, lambda: client.call("schedule.list", timeout=600))
            wf_s, wf_ping, _ = timed(daemon, lambda: client.call("workflow.list", timeout=600))
            # Ten schedules fire every second, whatever the size: what the others add to each second's work.
            cpu, began = cpu_seconds(daemon.pid), time.perf_counter()
            time.sleep(SCHEDULE_WINDOW)
            cpu_per_s = (cpu_seconds(daemon.pid) - cpu) / (time.perf_counter() - began)
        row(
            f"definitions {count}",
            startup_s=startup,
            reload_s=reload_s,
            reload_ping_ms=reload_ping * 1000,
            submit_ms=submit_s * 1000,
            queue_list_ms=queues_s * 1000,
            queue_list_ping_ms=queues_ping * 1000,
            schedule_list_ms=sched_s * 1000,
            schedule_list_ping_ms=sched_ping * 1000,
            workflow_list_ms=wf_s * 1000,
            workflow_list_ping_ms=wf_ping * 1000,
            cpu_ms_per_s_firing=cpu_per_s * 1000,
            rss_mb=mb(daemon.pid, "VmRSS"),
            hwm_mb=mb(daemon.pid, "VmHWM"),
        )
    finally:
        daemon.stop(timeout=600)


# -- one big workflow ------------------------------------------------------------------------------------------


PER_JOB = 20  # tasks in each job of the big workflow


def big_workflow(tasks: int) -> str:
    """`tasks` tasks in jobs of PER_JOB, each job the subjob of the one before: tasks/PER_JOB deep (two XML levels
    each: jobd takes documents 255 levels deep)."""
    text = ""
    for level in reversed(range(tasks // PER_JOB)):
        inner = f"<subjobs>{text}</subjobs>" if text else ""
        some = "".join(f'<task name="t{level}_{i}" path="/bin/true" queue="q"/>' for i in range(PER_JOB))
        text = f'<job name="j{level}"><tasks>{some}</tasks>{inner}</job>'
    return f"<workflow><subjobs>{text}</subjobs></workflow>"


def workflow(root: Path, tasks: int) -> None:
    daemon = Daemon(root, "[queue.q]\nconcurrency = 4\n")
    daemon.log_level = "info"
    daemon.write_workflows(big=big_workflow(tasks))
    try:
        startup = started(daemon)
        with daemon.client() as client:
            launch_s, launch_ping, instance = timed(
                daemon, lambda: client.call("instance.launch", {"workflow": "big"}, timeout=600)
            )
            wait_s, wait_ping, _ = timed(
                daemon, lambda: client.call("instance.wait", {"id": instance["id"]}, timeout=3600)
            )
            get_s, get_ping, _ = timed(daemon, lambda: client.call("instance.get", {"id": instance["id"]}))
        row(
            f"workflow {tasks} tasks, {tasks // PER_JOB} deep",
            startup_s=startup,
            launch_ms=launch_s * 1000,
            launch_ping_ms=launch_ping * 1000,
            run_s=wait_s,
            run_ping_ms=wait_ping * 1000,
            get_ms=get_s * 1000,
            get_ping_ms=get_ping * 1000,
            hwm_mb=mb(daemon.pid, "VmHWM"),
        )
    finally:
        daemon.stop(timeout=600)


# -- subscribers -----------------------------------------------------------------------------------------------


def subscribers(root: Path, count: int, jobs: int) -> None:
    daemon = Daemon(root, "[queue.q]\nconcurrency = 2\n", daemon_extra=f"max_connections = {count + 100}")
    daemon.log_level = "info"
    daemon.start()
    sockets: list[socket.socket] = []
    try:
        subscribe = {"jsonrpc": "2.0", "id": 1, "method": "events.subscribe", "params": {"types": ["job.state"]}}
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.socket_path))
            sock.sendall(json.dumps(subscribe).encode() + b"\n")
            sockets.append(sock)
        for sock in sockets:
            reply = b""
            while not reply.endswith(b"\n"):
                reply += sock.recv(4096)
            assert b'"subscription"' in reply, reply
        hwm0 = mb(daemon.pid, "VmHWM")

        def submit() -> None:
            with daemon.client() as client:
                for start in range(0, jobs, 1000):
                    batch = [{"command": ["/bin/true"], "queue": "q"} for _ in range(min(1000, jobs - start))]
                    client.call("job.submit", {"jobs": batch}, timeout=600)

        def burst() -> tuple[int, int]:
            """The jobs submitted (in a thread) while every subscriber is read at once, until it has seen every
            job end or is cut off: (cut off, events)."""
            submitter = threading.Thread(target=submit)
            submitter.start()
            selector = selectors.DefaultSelector()
            for sock in sockets:
                selector.register(sock, selectors.EVENT_READ, [bytearray(), 0])
            cut = events = 0
            while selector.get_map():
                for key, _ in selector.select():
                    sock, (pending, ended) = key.fileobj, key.data
                    assert isinstance(sock, socket.socket)
                    chunk = sock.recv(1 << 16)
                    if not chunk:
                        cut += 1
                        selector.unregister(sock)
                        continue
                    pending += chunk
                    lines = pending.split(b"\n")
                    pending[:] = lines.pop()
                    events += len(lines)
                    key.data[1] = ended = ended + sum(b'"succeeded"' in line for line in lines)
                    if ended == jobs:
                        selector.unregister(sock)
            submitter.join()
            return cut, events

        burst_s, burst_ping, (cut, events) = timed(daemon, burst)
        row(
            f"subscribers {count}, {jobs} jobs",
            burst_s=burst_s,
            ping_ms=burst_ping * 1000,
            events=events,
            cut_off=cut,
            hwm_before_mb=hwm0,
            hwm_mb=mb(daemon.pid, "VmHWM"),
        )
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop(timeout=600)


# -- big objects -----------------------------------------------------------------------------------------------


def big_objects(root: Path, kind: str, jobs: int) -> None:
    daemon = Daemon(root, "[queue.q]\nconcurrency = 1\npaused = true\n")
    daemon.log_level = "info"
    daemon.start()
    size = 1000 * 1000  # bytes of the field; the frame holds 1 MiB
    spec: dict[str, Any] = {"command": ["/bin/true"], "queue": "q"}
    if kind == "argv":
        spec["command"] = ["/bin/true", *["x" * (131072 - 1)] * 7]  # the longest Linux takes, with their NULs
    elif kind == "argv-many":
        spec["command"] = ["/bin/true", *["x"] * (size // 6)]  # `"x", ` each
    elif kind == "params":
        spec["params"] = {f"p{i:x}": "" for i in range(70_000)}  # `"12ab": "", ` each; 100,000 do not fit
    elif kind == "context":
        spec["context"] = "x" * size
    try:
        with daemon.client() as client:
            submit_s, submit_ping, _ = timed(daemon, lambda: client.call("job.submit", spec, timeout=600))
            for _ in range(jobs - 1):
                client.call("job.submit", spec, timeout=600)
            hwm0 = mb(daemon.pid, "VmHWM")
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.socket_path))

            def listing() -> int:
                request = {"jsonrpc": "2.0", "id": 1, "method": "job.list", "params": {"limit": 1000}}
                sock.sendall(json.dumps(request).encode() + b"\n")
                received = 0
                buffered = b""
                while not buffered.endswith(b"\n"):
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    received += len(chunk)
                    buffered = chunk[-1:]
                return received

            list_s, list_ping, reply_bytes = timed(daemon, listing)
            sock.close()
        row(
            f"big {kind}, {jobs} jobs",
            submit_ms=submit_s * 1000,
            submit_ping_ms=submit_ping * 1000,
            list_s=list_s,
            list_ping_ms=list_ping * 1000,
            reply_mb=reply_bytes / 1e6,
            hwm_before_list_mb=hwm0,
            hwm_mb=mb(daemon.pid, "VmHWM"),
        )
    finally:
        daemon.stop(timeout=600)


# -- history ---------------------------------------------------------------------------------------------------


def fill_history(daemon: Daemon, total: int, queued: int) -> None:
    """`total` jobs copied from one real job straight into the database, `queued` of them queued, the rest ended;
    spread over 4 queues, 10 tasks and 100 contexts."""
    db = sqlite3.connect(daemon.state_dir / "jobd.sqlite3")
    columns = [r[1] for r in db.execute('PRAGMA table_info("job")')]
    template = dict(zip(columns, db.execute('SELECT * FROM "job" ORDER BY id DESC LIMIT 1').fetchone(), strict=True))
    ended = {"state": "succeeded", "attempts": 1, "exit_code": 0}
    ended["started_at"] = ended["finished_at"] = template["created_at"]
    rows = []
    for i in range(total):
        values = {**template, **({} if i >= total - queued else ended)}  # the template is queued (paused queues)
        values["id"] = template["id"] + 1 + i
        values["queue"] = f"q{i % 4}"
        values["task"] = f"t{i % 10}"
        values["context"] = f"c{i % 100}"
        values["key"] = None
        rows.append(tuple(values[c] for c in columns))
    db.executemany(f'INSERT INTO "job" VALUES ({",".join("?" * len(columns))})', rows)
    db.commit()
    db.close()


def history(root: Path, total: int, queued: int) -> None:
    tasks = "".join(f'[task.t{i}]\ncommand = ["/bin/true"]\nqueue = "q{i % 4}"\n' for i in range(10))
    queues = "".join(f"[queue.q{i}]\nconcurrency = 2\npaused = true\n" for i in range(4))
    daemon = Daemon(root, queues + tasks)
    daemon.log_level = "info"
    daemon.start()
    job = daemon.submit(task="t0")
    daemon.stop(timeout=600)
    fill_history(daemon, total, queued)
    try:
        startup = started(daemon)
        figures: dict[str, Any] = {"startup_s": startup, "rss_mb": mb(daemon.pid, "VmRSS")}
        deep = job["id"] + total // 10  # a page near the oldest: 90 % of the history is newer
        with daemon.client() as client:
            # The first daemon.status waits for the start-up's count of the history, done in steps after READY=1
            # (Store.jobs_counted); the lists are timed once it is over, as they would be on a jobd running a while.
            status_s, status_ping, _ = timed(daemon, lambda: client.call("daemon.status", timeout=600))
            figures["first_status_s"], figures["first_status_ping_ms"] = status_s, status_ping * 1000
            for label, params in (
                ("all", {}),
                ("state", {"state": "succeeded"}),
                ("queue", {"queue": "q1"}),
                ("task", {"task": "t3"}),
                ("context", {"context": "c42"}),
                ("deep", {"before": deep}),
                ("deep_state", {"state": "succeeded", "before": deep}),
                ("deep_task", {"task": "t3", "before": deep}),
                ("queued", {"state": "queued"}),
                ("none", {"context": "nothing"}),
                ("none_state", {"context": "nothing", "state": "failed"}),
            ):
                page = {**params, "limit": 1000}
                seconds, ping, _ = timed(daemon, lambda p=page: client.call("job.list", p, timeout=600))
                figures[f"{label}_ms"] = seconds * 1000
                figures[f"{label}_ping_ms"] = ping * 1000
            status_s, _, _ = timed(daemon, lambda: client.call("daemon.status", timeout=600))
            figures["status_ms"] = status_s * 1000
        figures["hwm_mb"] = mb(daemon.pid, "VmHWM")
        row(f"history {total}, {queued} queued", **figures)
        daemon.kill9()
        figures = {"recovery_s": started(daemon), "hwm_mb": mb(daemon.pid, "VmHWM")}
        row(f"history {total}, {queued} queued, after kill -9", **figures)
    finally:
        daemon.stop(timeout=600)


MEASURES: dict[str, Callable[[Path], None]] = {
    "definitions": lambda root: [definitions(root / str(n), n) for n in (200, 2000)] and None,
    "workflow": lambda root: [workflow(root / str(n), n) for n in (200, 2000)] and None,
    "subscribers": lambda root: (
        [
            subscribers(root / f"{n}-{jobs}", n, jobs)
            for n, jobs in ((1, 10_000), (100, 10_000), (100, 1000), (1000, 1000))
        ]
        and None
    ),
    "big": lambda root: [big_objects(root / k, k, 100) for k in ("argv", "argv-many", "params", "context")] and None,
    "history": lambda root: [history(root / str(n), n, n // 5) for n in (100_000, 1_000_000)] and None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(MEASURES), default=sorted(MEASURES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jobd-scale-") as tmp:
        for name in args.only:
            (Path(tmp) / name).mkdir()
            MEASURES[name](Path(tmp) / name)


if __name__ == "__main__":
    main()
