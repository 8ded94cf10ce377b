"""Helpers shared by test_reload.py and test_recovery.py: a NOTIFY_SOCKET reader thread, lock-file gates, pidfds.

Why a reader thread: jobd sends a `STATUS=` datagram whenever its job counts change, and a sender on a connected
AF_UNIX datagram socket blocks once the receiver has `net.unix.max_dgram_qlen` (often 10) datagrams unread. A test
that only reads the notify socket when it wants something would freeze the daemon after a handful of jobs, so
every daemon these tests start gets a `Pump` that drains the socket as datagrams arrive and lets the test wait for
a line with a deadline (a blocking wait on a condition, never a sleep).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harness import Daemon
from inotify_simple import INotify, flags

WAIT = 20.0


class Pump:
    """Reads every datagram of one daemon's NOTIFY_SOCKET; `wait_for` consumes lines in arrival order."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.notify is not None, "the daemon is not running"
        self._notify = daemon.notify
        self._sock: socket.socket = daemon.notify.sock
        self._sock.settimeout(None)  # the thread owns the socket now; stop() wakes it with shutdown()
        self._cond = threading.Condition()
        self._lines: list[str] = []
        self._cursor = 0
        self._ended = False
        self._error: OSError | None = None  # what ended the reading, if not stop()
        self._thread = threading.Thread(target=self._run, name=f"notify-{daemon.pid}", daemon=True)
        daemon.notify.reader = self._thread  # closing the socket ends the thread first (harness.Notifications.close)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError as error:
                self._error = error
                data = b""
            with self._cond:
                if not data:  # shut down by stop() (jobd never sends an empty datagram)
                    self._ended = True
                    self._cond.notify_all()
                    return
                self._lines.extend(data.decode(errors="replace").splitlines())
                self._cond.notify_all()

    def skip(self) -> None:
        """Forget what arrived so far: the next wait_for looks only at later lines."""
        with self._cond:
            self._cursor = len(self._lines)

    def wait_for(self, match: str | Callable[[str], bool], timeout: float = WAIT) -> str:
        """The next line (after the last one returned) that starts with `match` or satisfies it."""
        test = match if callable(match) else (lambda line: line.startswith(match))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self._lines):
                    line = self._lines[self._cursor]
                    self._cursor += 1
                    if test(line):
                        return line
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    raise AssertionError(f"no notify line matching {match!r}; last lines: {self._lines[-15:]}")
                self._cond.wait(left)

    def arrived(self, prefix: str) -> bool:
        """Whether a line starting with `prefix` came after the last one wait_for returned (none is consumed)."""
        with self._cond:
            return any(line.startswith(prefix) for line in self._lines[self._cursor :])

    def state(self) -> str:
        with self._cond:
            ended = f"ended ({self._error!r})" if self._ended else "reading"
            return f"{ended}, {len(self._lines)} lines, cursor {self._cursor}"

    def stop(self) -> None:
        self._notify.end_reader()


def attach(daemon: Daemon) -> Pump:
    pump = Pump(daemon)
    daemon.pump = pump  # type: ignore[attr-defined]
    return pump


def pump_of(daemon: Daemon) -> Pump:
    pump: Pump = daemon.pump  # type: ignore[attr-defined]
    return pump


def start(daemon: Daemon) -> Pump:
    """Start (again, on the same state) and drain its notify socket from READY=1 on."""
    daemon.start()
    return attach(daemon)


def kill9(daemon: Daemon) -> None:
    pump_of(daemon).stop()
    daemon.kill9()


def terminate(daemon: Daemon, timeout: float = 30) -> int:
    """SIGTERM; checks STOPPING=1 arrives; returns jobd's exit code."""
    pump = pump_of(daemon)
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    try:
        pump.wait_for("STOPPING=1")
    except AssertionError as error:  # what a rare miss needs to be understood: was jobd still there, what it logged
        state = "running" if daemon.process.poll() is None else f"exited with {daemon.process.returncode}"
        log_end = daemon.log()[-3000:]
        raise AssertionError(f"{error}; jobd {state}; pump {pump.state()}; its log ends:\n{log_end}") from None
    code = daemon.process.wait(timeout)
    pump.stop()
    daemon.stop()  # already exited: only closes the harness's end of the notify socket
    return code


def stop_pumps(daemons: Iterable[Daemon]) -> None:
    for daemon in daemons:
        pump = getattr(daemon, "pump", None)
        if pump is not None:
            pump.stop()


class Gate:
    """A lock file the test holds; a job running `flock PATH true` blocks until `release()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def gated(gate: Gate, *then: str) -> list[str]:
    """An ad-hoc argv that waits for `gate`, then runs `then` (if any)."""
    script = 'flock "$0" true && exec "$@"' if then else 'exec flock "$0" true'
    return ["/bin/sh", "-c", script, str(gate.path), *then]


def wait_events(client: Any, want: Callable[[dict[str, Any]], bool], count: int, timeout: float = WAIT) -> list[Any]:
    """Reads events from a subscribed client until `count` of them satisfy `want`."""
    deadline = time.monotonic() + timeout
    found: list[Any] = []
    while len(found) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(found)} of {count} awaited events arrived: {found}")
        event = client.next_event(timeout=left)
        if want(event):
            found.append(event)
    return found


class Pidfds:
    """pidfds opened while the processes are known to be alive, so a reused pid can never be mistaken for them."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def watch(self, name: str, pid: int) -> None:
        self.fds[name] = os.pidfd_open(pid)

    def alive(self) -> list[str]:
        """Those not exited yet, checked without waiting."""
        if not self.fds:
            return []
        ready, _, _ = select.select(list(self.fds.values()), [], [], 0)
        return sorted(name for name, fd in self.fds.items() if fd not in ready)

    def wait_exited(self, timeout: float = WAIT) -> list[str]:
        """Blocks until all have exited or the deadline passes; returns those still alive."""
        pending = dict(self.fds)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(pending.values()), [], [], left)
            for name in [name for name, fd in pending.items() if fd in ready]:
                del pending[name]
        return sorted(pending)

    def close(self, kill_survivors: bool = True) -> None:
        for name in self.alive() if kill_survivors else []:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.fds[name], signal.SIGKILL)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its file system is full (ENOSPC); returns it (unlink it for room)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)
    return filler


def wait_for_log(daemon: Daemon, text: str, timeout: float = WAIT, count: int = 1) -> None:
    """Until the daemon's log holds `text` (`count` times): woken by inotify at each write to the file, with a
    deadline."""
    with INotify() as inotify:
        inotify.add_watch(daemon.log_path, flags.MODIFY)
        deadline = time.monotonic() + timeout
        while daemon.log().count(text) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not {count} times in the log within {timeout}s")
            inotify.read(timeout=int(left * 1000) + 1)


def held_in_spawn(daemon: Daemon) -> subprocess.Popen[str]:
    """strace on jobd, delaying the return of each vfork by a minute: jobd stays in the spawn under way (its child
    runs), to be killed there. SIGKILL jobd before killing strace, which lets it go when it dies."""
    strace = subprocess.Popen(
        ["strace", "-f", "-e", "trace=vfork", "-e", "inject=vfork:delay_exit=60000000", "-p", str(daemon.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert strace.stderr is not None and "attached" in strace.stderr.readline()  # tracing from here on
    return strace


def closes_settled(daemon: Daemon, held: contextlib.ExitStack) -> None:
    """Return once jobd has closed its end of every connection its clients closed before (a daemon.wait() just
    before): one closed after the limit is set would free a descriptor, and jobd would not be out of them. asyncio
    closes a socket in the loop turn after the one that read its end; two round trips on a client of its own (kept
    open in `held`, a descriptor of jobd's like any other) take two turns, after every end already sent."""
    sock = _answered_client(daemon, held)
    _ping(sock)


def _answered_client(daemon: Daemon, held: contextlib.ExitStack) -> socket.socket:
    """A root client of jobd's socket, kept open in `held`, once jobd has answered it a ping: accepted by then."""
    sock = held.enter_context(socket.socket(socket.AF_UNIX))
    sock.settimeout(WAIT)
    sock.connect(str(daemon.socket_path))
    _ping(sock)
    return sock


def _ping(sock: socket.socket) -> None:
    sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
    assert b'"pong"' in sock.recv(1 << 16)


@contextlib.contextmanager
def out_of_descriptors(daemon: Daemon, limit: int | None = None) -> Any:
    """jobd with no descriptor left: its soft limit on open files lowered to its highest descriptor (or to `limit`:
    the descriptors it holds from there on, once closed, give it none), and clients connected until one is not
    accepted (so every number below the limit is taken). Its limit comes back after."""
    soft_before = soft_limit_on_open_files(daemon.pid)
    with contextlib.ExitStack() as held:
        closes_settled(daemon, held)
        if limit is None:
            limit = max(int(name) for name in os.listdir(f"/proc/{daemon.pid}/fd")) + 1
        subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={limit}:"], check=True)
        try:
            for _ in range(64):  # within the listen backlog: each connect() returns at once, accepted or not
                sock = held.enter_context(socket.socket(socket.AF_UNIX))
                sock.connect(str(daemon.socket_path))
            wait_for_log(daemon, f"cannot accept clients on {daemon.socket_path}: Too many open files")
            yield
        finally:
            if daemon.running():
                subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={soft_before}:"], check=True)


@contextlib.contextmanager
def one_descriptor_left(daemon: Daemon) -> Any:
    """jobd with one descriptor left, for the next client it accepts to take: its soft limit on open files lowered
    to its highest descriptor, root clients connected (each answered) into every number below it, then the limit
    raised by one. Its limit comes back after."""
    soft_before = soft_limit_on_open_files(daemon.pid)
    descriptors = Path(f"/proc/{daemon.pid}/fd")
    with contextlib.ExitStack() as held:
        closes_settled(daemon, held)
        limit = max(int(name) for name in os.listdir(descriptors)) + 1
        subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={limit}:"], check=True)
        try:
            for _ in range(limit - len(os.listdir(descriptors))):  # the gaps below the highest descriptor
                _answered_client(daemon, held)  # accepted: it holds a descriptor
            assert len(os.listdir(descriptors)) == limit, "jobd opened or closed a descriptor meanwhile"
            subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={limit + 1}:"], check=True)
            yield
        finally:
            if daemon.running():
                subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={soft_before}:"], check=True)


@contextlib.contextmanager
def descriptors_limited(daemon: Daemon, more: int) -> Any:
    """jobd allowed `more` descriptors than its highest one: its soft and hard limits on open files set so (the hard
    one too, or a reload would raise the soft one to what the configuration may need). Yields how many it has free
    then (those `more` and the gaps below its highest one). The limits stay: the test may not raise the hard one
    again (that takes CAP_SYS_RESOURCE, which a container may withhold from root)."""
    descriptors = Path(f"/proc/{daemon.pid}/fd")
    with contextlib.ExitStack() as held:
        closes_settled(daemon, held)
        limit = max(int(name) for name in os.listdir(descriptors)) + 1 + more
        subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={limit}:{limit}"], check=True)
        yield limit - len(os.listdir(descriptors))


def soft_limit_on_open_files(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return int(next(line.split()[3] for line in limits if line.startswith("Max open files")))


NO_RETRY_JSON = '{"times": 0, "delay": 1.0, "backoff": 2.0, "on_exit_codes": []}'


def _damage_the_oldest_jobs_page(database: Path) -> None:
    """Make the page that holds the oldest rows of the job table unreadable (its page type byte), so that only a
    read of those jobs finds the damage: a start, which reads the newest and the unfinished ones, does not."""
    with contextlib.closing(sqlite3.connect(database)) as raw:
        page_size = raw.execute("PRAGMA page_size").fetchone()[0]
        root = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'job'").fetchone()[0]
    with open(database, "r+b") as file:
        file.seek((root - 1) * page_size)
        header = file.read(12)
        assert header[0] == 0x05, header  # an interior page: its first cell points to the oldest rows' page
        first_cell = int.from_bytes(file.read(2))  # the cell pointer array follows the 12-byte header
        file.seek((root - 1) * page_size + first_cell)
        oldest = int.from_bytes(file.read(4))
        file.seek((oldest - 1) * page_size)
        file.write(b"\xff")


def finished_jobs_the_oldest_damaged(database: Path) -> None:
    """Put 300 finished jobs (ids 1-300) in a stopped jobd's database, enough for the job table to span many pages,
    then make the page of the oldest unreadable: a start does not read it, the first read of those jobs does."""
    with contextlib.closing(sqlite3.connect(database)) as raw:
        raw.executemany(
            "INSERT INTO job (id, command, queue, priority, state, context, created_at, run_at, started_at, "
            "finished_at, attempts, progress, env, kill_grace, retry, max_output) VALUES (?, '[\"/bin/true\"]', "
            "'default', 1, 'succeeded', ?, 1e9, 1e9, 1e9, ?, 0, 0, '{}', 2, ?, 1048576)",
            [(n, f"filler {n:0100}", time.time(), NO_RETRY_JSON) for n in range(1, 301)],
        )
        raw.commit()
    _damage_the_oldest_jobs_page(database)
