"""A real jobd under test or benchmark: temporary directories, NOTIFY_SOCKET pointing here, the real socket.

A caller waits for the daemon's READY=1 datagram (never sleep-and-poll), talks to it through its real Unix socket,
and can SIGTERM, SIGHUP or SIGKILL it and start it again on the same state.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobd.client import Client

REPO = Path(__file__).resolve().parent.parent


# The accounts (users, groups) a test process makes on the machine are named after it: `jobdt<pid>-alice`.
_ACCOUNT_NAME = re.compile(r"jobdt([0-9]+)-[a-z0-9-]+")
SOCKET_GROUP = "jobd"  # jobd's default socket group: a name the tests cannot make their own
_SOCKET_GROUP_LOCK = "/run/lock/jobd-test-socket-group.lock"
_SOCKET_GROUP_MADE = "/run/lock/jobd-test-socket-group.made"  # present: a test made the group, the last one removes it


def account_prefix() -> str:
    """The start of the names of the accounts this test process makes: its pid, so that two suites running at once
    on one machine (two checkouts, two xdist workers) never make or delete the same account, and so that those of a
    run that died before removing its own are known for leftovers (remove_stale_accounts)."""
    return f"jobdt{os.getpid()}-"


def remove_stale_accounts() -> None:
    """Removes the accounts left by test processes that have ended (killed before their clean-up): users first, with
    their home, then the groups left."""
    for database, command in (("/etc/passwd", ["userdel", "--remove"]), ("/etc/group", ["groupdel"])):
        for line in Path(database).read_text().splitlines():
            name = line.split(":", 1)[0]
            made_by = _ACCOUNT_NAME.fullmatch(name)
            if made_by and not _running(int(made_by[1])):
                subprocess.run([*command, name], capture_output=True, timeout=60)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def socket_group() -> Iterator[None]:
    """The group `jobd` exists while this is held: made if the machine lacks it, and shared with the suites running
    at the same time (each holds a shared lock on one file); the last of them to end removes it, if a test made it.
    The kernel releases a lock when its holder ends, however it ends; a group made by a run that was killed is
    removed by the next run's end (the marker file stays)."""
    with open(_SOCKET_GROUP_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            if subprocess.run(["getent", "group", SOCKET_GROUP], capture_output=True, timeout=60).returncode == 2:
                made = subprocess.run(["groupadd", SOCKET_GROUP], capture_output=True, timeout=60)
                if made.returncode == 0:  # 9: another suite made it at the same moment
                    Path(_SOCKET_GROUP_MADE).touch()
            yield
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # none other holds it: the last one out
            except BlockingIOError:
                pass
            else:
                if os.path.exists(_SOCKET_GROUP_MADE):
                    subprocess.run(["groupdel", SOCKET_GROUP], capture_output=True, timeout=60)
                    os.unlink(_SOCKET_GROUP_MADE)


def _find_sdns() -> Path:
    """sdns.sh, the team's throw-away-systemd tool (tests of the units and the .deb): $SDNS_SH if set, else
    ../shared/tools/ beside this checkout (the working copy's layout), else the machines' shared tools directory
    (a clean clone made elsewhere, as CI's). Tests that need it skip, saying so, where none exists."""
    for candidate in (os.environ.get("SDNS_SH"), REPO.parent / "shared/tools/sdns.sh", "/work/shared/tools/sdns.sh"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return REPO.parent / "shared/tools/sdns.sh"


SDNS = _find_sdns()


def in_user_namespace(setup: str = "") -> list[str]:
    """A Daemon.command_prefix that runs jobd in a user namespace of its own, mapping root alone, after the shell
    command `setup` (e.g. a limit of /proc/sys/user/ lowered there). The calling test is skipped, saying why, on a
    machine where no user namespace can be made (user.max_user_namespaces is 0, or all are taken)."""
    refused = _user_namespace_refused()
    if refused is not None:
        pytest.skip(f"needs a user namespace of its own for jobd: `unshare --user` is refused here: {refused}")
    prefix = ["unshare", "--user", "--map-root-user"]
    return [*prefix, "sh", "-c", f'{setup} && exec "$@"', "sh"] if setup else prefix


@functools.cache
def _user_namespace_refused() -> str | None:
    """unshare's error where a user namespace cannot be made, None where it can (tried once)."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, text=True, timeout=60)
    return None if probe.returncode == 0 else probe.stderr.strip() or f"exit status {probe.returncode}"


# A start takes a fraction of a second; the deadline is for a machine loaded by other work (CI on two shared CPUs
# once saw a daemon log "ready" just as 20 s ran out).
READY_TIMEOUT = 45.0

BASE_CONFIG = """
[daemon]
socket = "{socket}"
evqueue_socket = "{evqueue_socket}"
state_dir = "{state}"
kill_grace = 2
# Tests run as root and their tasks write temporary files, read FIFOs…: they run as root, which must be said
# ("never root unless configured so"). tests/test_run_as.py checks the real default.
default_user = "root"
"""


class Notifications:
    """The NOTIFY_SOCKET end: what the daemon tells systemd, datagram by datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.inode = os.fstat(self.sock.fileno()).st_ino  # what a message that never arrives is checked against
        self.messages: list[str] = []
        self.reader: threading.Thread | None = None  # a thread of its own reading the socket (recovery.support.Pump)

    def wait_for(self, prefix: str, timeout: float = READY_TIMEOUT, sender: int | None = None) -> str:
        """Block (in recv, with a deadline) until a datagram holds a line starting with `prefix`. `sender`: a pidfd
        of the process that tells; should it exit with nothing left to read, TimeoutError at once."""
        self.sock.settimeout(timeout)
        while True:
            if sender is not None:
                readable, _, _ = select.select([self.sock, sender], [], [], timeout)
                if self.sock not in readable:
                    raise TimeoutError(f"no {prefix} within {timeout}s" if not readable else "the process ended")
            message = self.sock.recv(65536).decode()
            self.messages.append(message)
            for line in message.splitlines():
                if line.startswith(prefix):
                    return line

    def describe(self) -> str:
        """The harness's end as it is now, against what was bound: for a message jobd sent that never arrived."""
        fd = self.sock.fileno()
        try:
            now = os.fstat(fd).st_ino
        except OSError as error:
            return f"our end, fd {fd}: {error}"
        return f"our end, fd {fd}: inode {now}, bound as {self.inode}, {len(self.messages)} messages read"

    def end_reader(self) -> None:
        """Shut the socket down, which wakes a blocked recv() with end-of-file (close() would not), and wait for the
        reader thread, if any, to end; jobd's later sends fail with EPIPE at once."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.reader is not None:
            self.reader.join(10)
            assert not self.reader.is_alive(), f"the thread reading {self.path} did not end"

    def close(self) -> None:
        """Close the socket, ending its reader thread first. A thread left in recv() on a descriptor closed under it
        stays there; when a signal (a child's SIGCHLD) interrupts it, the kernel restarts the call on the same number,
        by then another test's socket: it took that daemon's READY=1 or STOPPING=1 from the test waiting for it."""
        self.end_reader()
        self.sock.close()


def open_descriptors(pid: int) -> dict[int, str]:
    """What each of a running process's descriptors is (socket:[inode], pipe:[inode], a path…), by number. The
    process goes on working between the listing of /proc/PID/fd and the readlink of each entry: one it closed
    meanwhile is left out, as it would have been had it been listed a moment later."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return found


def _descriptors(pid: int) -> str:
    """What each of a process's descriptors is, for failure messages."""
    try:
        return " ".join(f"{fd}={target}" for fd, target in sorted(open_descriptors(pid).items()))
    except OSError as error:
        return str(error)


def _unix_sockets(pid: int, inode: int) -> str:
    """ss's lines for the Unix sockets of `pid` and for the one of `inode`, with their peers."""
    try:
        listing = subprocess.run(["ss", "-x", "-a", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError as error:  # no iproute2: the failure is still reported, without this part
        return f"(ss: {error})"
    wanted = (f"pid={pid},", f" {inode} ")
    return "\n".join(line for line in listing.splitlines() if any(mark in line for mark in wanted))


class Daemon:
    """One jobd under test. `config` is TOML appended after the [daemon] section."""

    def __init__(self, root: Path, config: str = "", daemon_extra: str = "") -> None:
        self.root = root
        self.config_dir = root / "etc"
        (self.config_dir / "jobd.d").mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.socket_path = root / "jobd.sock"
        self.evqueue_socket = root / "evqueue.sock"  # evQueue's XML protocol, greeting first
        self.env: dict[str, str] = {}  # extra environment for the daemon (e.g. JOBD_EVQUEUE_KEEPALIVE_INTERVAL)
        self.pass_fds: tuple[int, ...] = ()  # descriptors the daemon inherits, as from a careless parent
        self.command_prefix: list[str] = []  # a program that execs jobd (`prlimit --nofile=…`): the same pid
        self.log_path = root / "jobd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_level = "debug"
        self.notify: Notifications | None = None
        self.write_config(config, daemon_extra)

    def write_config(self, config: str, daemon_extra: str = "") -> None:
        text = BASE_CONFIG.format(socket=self.socket_path, evqueue_socket=self.evqueue_socket, state=self.state_dir)
        text += daemon_extra + "\n"
        text += textwrap.dedent(config)
        path = self.config_dir / "jobd.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic, as an administrator's tools should do it

    def write_workflows(self, **documents: str | bytes) -> None:
        """Workflow files, NAME.xml, in the configuration's workflows/ directory (made if missing)."""
        directory = self.config_dir / "workflows"
        directory.mkdir(exist_ok=True)
        for name, document in documents.items():
            (directory / f"{name}.xml").write_bytes(document.encode() if isinstance(document, str) else document)

    def _python_path(self) -> str:
        """This checkout's jobd, after a test's own PYTHONPATH (its shims come first)."""
        return ":".join(filter(None, [self.env.get("PYTHONPATH"), str(REPO)]))

    def start_refused(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """jobd run in the foreground on this configuration, expected not to start (a port taken, another jobd on
        the state, a damaged database): its exit status and output."""
        return subprocess.run(
            [*self.command_prefix, sys.executable, "-m", "jobd.daemon", "--config-dir", str(self.config_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env, "PYTHONPATH": self._python_path()},
            cwd=self.root,
            check=False,
        )

    def start(self, until: str = "READY=1") -> None:
        """Start jobd; return once it has told `until` (a line's start) over NOTIFY_SOCKET."""
        notify_path = self.root / f"notify.{os.getpid()}.{id(self)}"
        notify_path.unlink(missing_ok=True)
        self.notify = Notifications(notify_path)
        env = {**os.environ, **self.env, "NOTIFY_SOCKET": str(notify_path)}
        env["PYTHONPATH"] = self._python_path()
        env.pop("JOURNAL_STREAM", None)
        env.pop("INVOCATION_ID", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon owns it
        self.process = subprocess.Popen(
            [
                *self.command_prefix,
                sys.executable,
                *("-m", "jobd.daemon", "--config-dir", str(self.config_dir), "--log-level", self.log_level),
            ],
            env=env,
            stdout=log,
            stderr=log,
            cwd=self.root,
            pass_fds=self.pass_fds,
        )
        log.close()
        started = time.monotonic()
        pidfd = os.pidfd_open(self.process.pid)  # a daemon that exits ends the wait, not the deadline
        try:
            self.notify.wait_for(until, sender=pidfd)
        except TimeoutError:
            code = self.process.poll()
            raise AssertionError(
                f"jobd did not tell {until} within {time.monotonic() - started:.1f}s (its process "
                f"{'runs' if code is None else f'exited with {code}'}; it told {self.notify.messages!r}; the "
                f"NOTIFY_SOCKET {'is there' if notify_path.is_socket() else 'is gone'}; {self.notify.describe()}; "
                f"jobd's descriptors: {_descriptors(self.process.pid)}; sockets: "
                f"{_unix_sockets(self.process.pid, self.notify.inode)}); its log:\n{self.log()}"
            ) from None
        finally:
            os.close(pidfd)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self) -> Client:
        client = Client(str(self.socket_path))
        client.connect()
        return client

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = 30) -> Any:
        with self.client() as client:
            return client.call(method, params, timeout=timeout)

    def submit(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.call("job.submit", params)
        return result

    def wait(self, job_id: int, timeout: float = 30) -> dict[str, Any]:
        job: dict[str, Any] = self.call("job.wait", {"id": job_id, "timeout": timeout}, timeout=timeout + 5)
        assert job["state"] in ("succeeded", "failed", "timed_out", "cancelled"), job
        return job

    def output(self, job_id: int, stream: str = "stdout", attempt: int | None = None) -> str:
        params: dict[str, Any] = {"id": job_id, "stream": stream, "limit": 1024 * 1024}
        if attempt is not None:
            params["attempt"] = attempt
        data: str = self.call("job.output", params)["data"]
        return data

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def children(self) -> list[tuple[int, str]]:
        """(pid, state letter) of the daemon's direct children, read from /proc."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == self.pid:
                found.append((int(entry.name), fields[0]))
        return found

    def stop(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._closed()
        return code

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self._closed()

    def _closed(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _child_of(tracer: subprocess.Popen[bytes]) -> int | None:
    """The pid of the jobd that strace (`tracer`) runs, or None once it is gone."""
    children = Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()
    return int(children[0]) if children else None


def started_and_stopped(daemon: Daemon) -> bool:
    """Start the daemon under its command_prefix (strace); if it got ready, stop it (SIGTERM to jobd itself: strace
    does not pass it on) and say so; False if it exited before it was ready (daemon.process tells how)."""
    try:
        daemon.start()
    except AssertionError:
        return False
    finally:
        daemon._closed()  # its NOTIFY_SOCKET: the next start makes another
    assert daemon.process is not None
    jobd = _child_of(daemon.process)
    assert jobd is not None
    os.kill(jobd, signal.SIGTERM)
    daemon.process.wait()
    daemon.process = None
    return True
