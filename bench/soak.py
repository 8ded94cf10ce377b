"""A real jobd under a steady mixed load, its resident memory sampled: does it grow, and does it stop growing?

    python bench/soak.py [--minutes 30] [--http] [--every 60] [--keep DIR] [--tree DIR] [--env NAME=VALUE ...]

Every `--every` seconds one line: minutes since the load began, VmRSS, the Rss of glibc's heap ([heap]) and of the
anonymous mappings (Python's arenas among them), from /proc/PID/smaps, and the daemon's queued/running/delayed
counts and history size (a backlog growing under the load would be jobs, not a leak). docs/BENCHMARKS.md, "Memory
under a steady load", says what the figures were and what bounds them.

The load, from one thread per kind of client, each paced to a steady rate: serial submits on one long-lived
connection (`/bin/true`, a task writing stdout, stderr, progress and a log line on fd 3, a task that fails and is
retried); batches of 20 on a new connection each; submit, `job.wait`, `job.output` and `job.get` on one connection;
`job.output` with `wait` following a running job; `events.subscribe` connections that read a few events and close;
one connection per request as a web page makes (`job.list`, `daemon.status`, `queue.list`, `job.get`); jobs that
time out; cancels of a delayed and of a running job; `job.wait` with a short timeout; waits whose client hangs up;
`daemon.reload` every 10 s; workflow instances launched by JSON-RPC and on the evQueue socket. The history keeps
300 jobs and 0.002 days (173 s), so old jobs are deleted all along. `--http` adds the HTTP listener (submits,
`/jobs/status`, `GET /events` streams dropped after a few events), exec callbacks and two schedules.

`--tree` runs the jobd package of another tree (a `git worktree` of an older commit), `--env` adds variables to the
daemon's environment (`PYTHONMALLOC=malloc`), so two soaks run side by side can compare them.

This is a script, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Daemon

from jobd.client import Client, RemoteError
from jobd.protocol.evqueue import XmlFramer

CONFIG = """
[queue.default]
concurrency = 2
[queue.slow]
concurrency = 2
[task.noisy]
command = ["sh", "-c", "echo out $0; echo err >&2; echo %30 >&3; echo a log line >&3; echo %100 >&3"]
[task.flaky]
command = ["sh", "-c", "exit 3"]
retry = { times = 2, delay = 0.05 }
[task.slow]
command = ["sleep", "5"]
queue = "slow"
timeout = 0.3
kill_grace = 0.2
[task.sleeper]
command = ["sleep", "30"]
queue = "slow"
"""

HTTP_CONFIG = """
[http]
listen = "{socket}"
[task.called]
command = ["/bin/true"]
on_finish = [{{ exec = ["/bin/true"] }}]
[schedule.tick]
task = "noisy"
calendar = ";;;;;"
[schedule.workflow_tick]
workflow = "trio"
calendar = "*/5 * * * * *"
"""

TRIO = (
    '<workflow><subjobs><job><tasks><task name="a" path="/bin/echo" queue="default" wd="/"/></tasks>'
    '<subjobs><job><tasks><task name="b" path="/bin/true" queue="default" wd="/"/>'
    '<task name="c" path="/bin/true" queue="default" wd="/"/></tasks></job></subjobs></job></subjobs></workflow>'
)

Load = Callable[[random.Random], None]


class Soak:
    def __init__(self, daemon: Daemon, http_socket: Path | None) -> None:
        self.daemon = daemon
        self.http_socket = http_socket
        self.stop = threading.Event()
        self.done: dict[str, int] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._serial = daemon.client()  # one long-lived connection, as a worker process keeps

    def loads(self) -> dict[str, tuple[float, Load]]:
        """Each kind of client: the seconds between its rounds, and a round."""
        loads: dict[str, tuple[float, Load]] = {
            "serial": (0.02, self.serial),
            "batch": (1.0, self.batch),
            "wait_output": (0.1, self.wait_output),
            "follow": (0.2, self.follow),
            "subscribe": (0.3, self.subscribe),
            "web_page": (0.05, self.web_page),
            "timeout": (0.5, lambda _: self.call("job.submit", {"task": "slow"})),
            "cancel": (0.3, self.cancel),
            "wait_timeout": (0.5, self.wait_timeout),
            "hang_up": (0.5, self.hang_up),
            "reload": (10.0, lambda _: self.call("daemon.reload")),
            "workflow": (1.0, self.workflow),
            "evqueue": (2.0, self.evqueue),
        }
        if self.http_socket is not None:
            loads |= {"http_submit": (0.2, self.http_submit), "http_events": (0.5, self.http_events)}
        return loads

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.daemon.client() as client:
            return client.call(method, params, timeout=60)

    def run(self, name: str, pause: float, load: Load) -> None:
        rng = random.Random(name)
        while not self.stop.is_set():
            try:
                load(rng)
            except (OSError, RemoteError, TimeoutError) as error:
                with self._lock:
                    self.errors.append(f"{name}: {error!r}")
            with self._lock:
                self.done[name] = self.done.get(name, 0) + 1
            self.stop.wait(pause)  # pacing the load to a steady rate, not waiting for a condition

    # -- the clients ---------------------------------------------------------------------------------------------

    def serial(self, rng: random.Random) -> None:
        kind = rng.random()
        if kind < 0.6:
            self._serial.call("job.submit", {"command": ["/bin/true"]})
        elif kind < 0.85:
            self._serial.call("job.submit", {"task": "noisy", "args": [str(rng.random())]})
        else:
            self._serial.call("job.submit", {"task": "flaky"})

    def batch(self, rng: random.Random) -> None:
        jobs = [{"command": ["/bin/true"], "context": f"batch-{rng.randrange(100)}"} for _ in range(20)]
        self.call("job.submit", {"jobs": jobs})

    def wait_output(self, _: random.Random) -> None:
        with self.daemon.client() as client:
            job = client.call("job.submit", {"task": "noisy", "args": ["waited"]})
            client.call("job.wait", {"id": job["id"], "timeout": 60}, timeout=70)
            client.call("job.output", {"id": job["id"]})
            client.call("job.output", {"id": job["id"], "stream": "log"})
            client.call("job.get", {"id": job["id"]})

    @staticmethod
    def until_started(client: Client, job_id: int) -> None:
        """Until the job has left the queue, told by its events."""
        client.call("events.subscribe", {"jobs": [job_id], "types": ["job.state"]})
        state = client.call("job.get", {"id": job_id})["state"]
        while state in ("queued", "delayed"):
            state = client.next_event(timeout=60)["job"]["state"]

    def follow(self, _: random.Random) -> None:
        with self.daemon.client() as client:
            job = client.call("job.submit", {"task": "noisy", "args": ["followed"], "delay": 0.05})
            self.until_started(client, job["id"])
            offset = 0
            while True:
                chunk = client.call("job.output", {"id": job["id"], "offset": offset, "wait": True}, timeout=60)
                offset = chunk["next_offset"]
                if chunk["complete"]:
                    return

    def subscribe(self, rng: random.Random) -> None:
        with self.daemon.client() as client:
            client.call("events.subscribe", {"types": ["job.state", "job.progress", "job.log"]})
            client.call("events.subscribe", {"queues": ["slow"]})
            for _ in range(rng.randrange(1, 20)):
                client.next_event(timeout=60)

    def web_page(self, rng: random.Random) -> None:
        request = rng.choice(
            [
                ("job.list", {}),
                ("job.list", {"state": ["queued", "running"], "limit": 10}),
                ("daemon.status", None),
                ("queue.list", None),
                ("job.get", {"id": rng.randrange(1, 1 + self.done.get("serial", 1))}),
            ]
        )
        try:
            self.call(*request)
        except RemoteError as error:
            if error.code != "UNKNOWN_JOB":  # expired from the history: what the page would show
                raise

    def cancel(self, _: random.Random) -> None:
        with self.daemon.client() as client:
            delayed = client.call("job.submit", {"command": ["/bin/true"], "delay": 60})
            client.call("job.cancel", {"id": delayed["id"]})
            running = client.call("job.submit", {"task": "sleeper"})
            self.until_started(client, running["id"])
            client.call("job.cancel", {"id": running["id"]}, timeout=60)

    def wait_timeout(self, _: random.Random) -> None:
        with self.daemon.client() as client:
            job = client.call("job.submit", {"command": ["/bin/true"], "delay": 30})
            client.call("job.wait", {"id": job["id"], "timeout": 0.05})
            client.call("job.cancel", {"id": job["id"]})

    def hang_up(self, _: random.Random) -> None:
        """A client that asks to wait for a job and for its output, then closes the connection before it ends."""
        client = self.daemon.client()
        job = client.call("job.submit", {"command": ["/bin/true"], "delay": 0.5})
        client.send_request("job.wait", {"id": job["id"]})
        client.send_request("job.output", {"id": job["id"], "wait": True})
        client.close()

    def workflow(self, _: random.Random) -> None:
        with self.daemon.client() as client:
            instance = client.call("instance.launch", {"workflow": "trio"})
            client.call("instance.wait", {"id": instance["id"], "timeout": 60}, timeout=70)
            client.call("instance.get", {"id": instance["id"]})

    def evqueue(self, _: random.Random) -> None:
        """A synchronous launch and a status request on the evQueue socket, each answer read whole."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(self.daemon.evqueue_socket))
            framer = XmlFramer()
            documents: list[bytes] = []

            def answer() -> None:
                while not documents:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("jobd closed the evQueue connection")
                    documents.extend(framer.feed(chunk))
                documents.pop(0)

            answer()  # the greeting
            sock.sendall(b'<instance action="launch" name="trio" mode="synchronous" timeout="30"/>')
            answer()
            sock.sendall(b'<status type="workflows"/>')
            answer()

    def http(self, request: bytes, events: int | None = None) -> bytes:
        """One request on a connection of its own; for an event stream, until `events` events have come."""
        assert self.http_socket is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(str(self.http_socket))
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
                if events is not None and received.count(b"data:") >= events:
                    break
        if b" 200 " not in received.split(b"\r\n", 1)[0]:
            raise RemoteError("HTTP", received[:200].decode(errors="replace"))
        return received

    def http_submit(self, _: random.Random) -> None:
        body = json.dumps({"task": "called"}).encode()
        head = "POST /api/job.submit HTTP/1.1\r\nHost: jobd\r\nContent-Type: application/json\r\n"
        self.http(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        self.http(b"GET /jobs/status HTTP/1.1\r\nHost: jobd\r\nConnection: close\r\n\r\n")

    def http_events(self, rng: random.Random) -> None:
        self.http(b"GET /events HTTP/1.1\r\nHost: jobd\r\nConnection: close\r\n\r\n", events=rng.randrange(1, 10))


def memory(pid: int) -> tuple[int, int, int]:
    """VmRSS, and the Rss of the heap and of the anonymous mappings, in kB."""
    total = heap = anonymous = 0
    name = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line: range, ..., [path]
                name = fields[5] if len(fields) > 5 else ""
            elif fields[0] == "Rss:":
                size = int(fields[1])
                total += size
                heap += size if name == "[heap]" else 0
                anonymous += size if name == "" else 0
    return total, heap, anonymous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every", type=float, default=60, help="seconds between samples")
    parser.add_argument("--http", action="store_true", help="also the HTTP listener, callbacks and schedules")
    parser.add_argument("--keep", type=Path, help="run in this directory and leave it (the daemon's log, state)")
    parser.add_argument("--tree", type=Path, help="a directory holding the jobd package to run (default: this one)")
    parser.add_argument("--env", nargs="+", default=[], metavar="NAME=VALUE", help="added to the daemon's environment")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="jobd-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    http_socket = root / "http.sock" if args.http else None
    config = CONFIG + (HTTP_CONFIG.format(socket=http_socket) if http_socket else "")
    daemon = Daemon(root, config, daemon_extra="history = { keep_last = 300, keep_days = 0.002 }\n")
    daemon.log_level = "info"  # as in production
    daemon.env = dict(assignment.split("=", 1) for assignment in args.env)
    if args.tree is not None:
        daemon.env["PYTHONPATH"] = str(args.tree.resolve())
    daemon.write_workflows(trio=TRIO)
    daemon.start()
    soak = Soak(daemon, http_socket)
    threads = [
        threading.Thread(target=soak.run, args=(name, pause, load), name=name, daemon=True)
        for name, (pause, load) in soak.loads().items()
    ]
    print(f"jobd pid {daemon.pid} in {root}\nminutes\tVmRSS kB\theap kB\tanon kB\tqueued\trunning\tdelayed\thistory")
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        while not soak.stop.wait(args.every):  # sampling: the figure is the memory over time
            status = daemon.call("daemon.status")
            minutes = (time.monotonic() - started) / 60
            row = [*memory(daemon.pid), *(status[key] for key in ("queued", "running", "delayed"))]
            print(f"{minutes:.1f}", *row, sum(status["jobs"].values()), sep="\t", flush=True)
            if minutes >= args.minutes:
                soak.stop.set()
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join(90)
        daemon.stop(60)
        if args.keep is None:
            shutil.rmtree(root)
    print("rounds:", json.dumps(soak.done))
    print(f"errors: {len(soak.errors)}", *soak.errors[:20], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
