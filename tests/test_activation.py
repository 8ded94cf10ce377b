"""Socket activation and the watchdog (jobd/activation.py): real listening sockets handed to a real jobd process.

Two senders of the protocol are used: systemd's own `systemd-socket-activate` (it listens, and execs jobd at the
first connection with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES set), and `PASS_FDS` below, a few lines that do what
systemd does for a service with several socket units (the sockets moved to fd 3 and up, LISTEN_PID its own pid,
then exec) — systemd-socket-activate cannot name sockets of different kinds.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from harness import READY_TIMEOUT, REPO, Daemon, Notifications, open_descriptors
from recovery.support import wait_for_log

from jobd import activation
from jobd.client import Client
from jobd.daemon import EXIT_CONFIG
from jobd.errors import StartupError

TOKEN = "activation-test-token"
HTTP_TOKEN_CONFIG = f"""
[http.tokens.ops]
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
admin = true
"""

# argv: FD... -- COMMAND...: each FD becomes 3, 4, … in order, the rest of the environment is kept, LISTEN_PID is
# this process's pid (unchanged by exec), and COMMAND is exec'd.
PASS_FDS = """
import fcntl, os, sys
split = sys.argv.index("--")
fds = [int(fd) for fd in sys.argv[1:split]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, … first
for fd in fds:
    os.close(fd)
for number, fd in enumerate(high):
    os.dup2(fd, 3 + number)  # inheritable
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[split + 1], sys.argv[split + 1 :])
"""

JOBD = [sys.executable, "-m", "jobd.daemon"]


def _env(daemon: Daemon, notify: Notifications | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("JOURNAL_STREAM", "INVOCATION_ID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        env.pop(name, None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    return {**env, **extra}


class Activated:
    """A jobd started with sockets passed to it; stopped (SIGTERM, exit 0 expected) at teardown."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.process: subprocess.Popen[bytes] | None = None
        self.notify: Notifications | None = None
        self.copier: threading.Thread | None = None

    def start(
        self,
        prefix: list[str],
        *,
        pass_fds: tuple[int, ...] = (),
        wait_ready: bool = True,
        listening: bool = False,
        **env: str,
    ) -> None:
        """`listening`: the prefix is systemd-socket-activate; return once it says it listens (its first line on
        stderr), the rest of which (jobd's log, after the exec) a thread copies to the log file."""
        self.notify = Notifications(self.daemon.root / "notify")
        argv = [*prefix, *JOBD, "--config-dir", str(self.daemon.config_dir), "--log-level", "debug"]
        with open(self.daemon.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                env=_env(self.daemon, self.notify, **env),
                stdout=log,
                stderr=subprocess.PIPE if listening else log,
                pass_fds=pass_fds,
                cwd=self.daemon.root,
            )
        if listening:
            assert self.process.stderr is not None
            first = self.process.stderr.readline()
            assert first.startswith(b"Listening on "), first
            self.copier = threading.Thread(target=self._copy_log, args=(self.process.stderr,), daemon=True)
            self.copier.start()
        if wait_ready:
            self.ready()

    def _copy_log(self, pipe: IO[bytes]) -> None:
        with open(self.daemon.log_path, "ab", buffering=0) as log:
            for line in pipe:
                log.write(line)

    def ready(self) -> None:
        assert self.notify is not None
        try:
            self.notify.wait_for("READY=1")
        except TimeoutError:
            raise AssertionError(f"jobd did not become ready; its log:\n{self.daemon.log()}") from None

    def exit_code(self) -> int:
        assert self.process is not None
        return self.process.wait(READY_TIMEOUT)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(READY_TIMEOUT)
        if self.copier is not None:
            self.copier.join(READY_TIMEOUT)  # the log is complete once the pipe is at EOF
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return code


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Any]:
    made: list[Activated] = []

    def make(config: str = "") -> Activated:
        daemon = Daemon(tmp_path / f"d{len(made)}", config)
        made.append(Activated(daemon))
        return made[-1]

    yield make
    for one in made:
        if one.process is not None and one.process.poll() is None:
            assert one.stop() == 0, one.daemon.log()


def _unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


def _tcp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _pass(sockets: list[socket.socket]) -> list[str]:
    return [sys.executable, "-c", PASS_FDS, *(str(s.fileno()) for s in sockets), "--"]


def _job_output(client: Client, command: list[str]) -> str:
    job = client.call("job.submit", {"command": command}, timeout=30)
    done = client.call("job.wait", {"id": job["id"], "timeout": 30}, timeout=35)
    assert done["state"] == "succeeded", done
    data: str = client.call("job.output", {"id": job["id"]}, timeout=30)["data"]
    return data


def test_systemd_socket_activate_starts_jobd_on_the_first_client(activated: Any) -> None:
    """systemd's implementation: jobd is exec'd when a client connects, and serves that client on the passed socket
    (its configured `socket` is not used); the evQueue socket, not passed, jobd binds itself."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.fail("systemd-socket-activate (Debian's systemd package, make system-deps) is missing")
    jobd = activated()
    path = jobd.daemon.root / "activated.sock"
    # It passes on only the variables named by -E (and its own LISTEN_*).
    prefix = ["systemd-socket-activate", f"--listen={path}", "--fdname=api", "-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH"]
    jobd.start(prefix, wait_ready=False, listening=True)
    assert not (jobd.notify and jobd.notify.messages)  # nothing started before a client came
    with Client(str(path)) as client:
        assert client.call("ping", timeout=30)["pong"] is True
        jobd.ready()
        status = client.call("daemon.status", timeout=30)
        assert jobd.process is not None and status["pid"] == jobd.process.pid  # exec'd in place
        assert _job_output(client, ["/bin/echo", "served"]) == "served\n"
        # The socket was moved off fd 3 (which holds /dev/null for the jobs' progress pipe) and is close-on-exec.
        assert os.readlink(f"/proc/{status['pid']}/fd/3") == "/dev/null"
        holders = _holders(status["pid"], _listening_inode(status["pid"], path))
        assert len(holders) == 1 and holders[0][0] > 3 and holders[0][1] & os.O_CLOEXEC, holders
    log = jobd.daemon.log()
    assert f"socket activation: serving on api ({path}) passed by systemd" in log
    assert f"ready: socket {path}," in log
    assert not jobd.daemon.socket_path.exists()  # the configured path was never bound
    assert jobd.daemon.evqueue_socket.is_socket()
    assert jobd.stop() == 0
    assert path.is_socket()  # the passed socket is its owner's: not unlinked
    assert not jobd.daemon.evqueue_socket.exists()  # jobd's own socket is removed as before


def _listening_inode(pid: int, path: Path) -> int:
    """The socket inode of the unix socket listening on `path` (/proc/PID/net/unix: flag __SO_ACCEPTCON)."""
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return int(fields[6])
    raise AssertionError(f"nothing listens on {path}")


def _holders(pid: int, inode: int) -> list[tuple[int, int]]:
    """(fd, open flags) of each of the process's descriptors for that socket."""
    found = []
    for fd, target in open_descriptors(pid).items():
        if target == f"socket:[{inode}]":  # the listening socket: jobd holds it open throughout
            flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
            found.append((fd, int(flags, 8)))
    return found


def test_every_listener_by_name(activated: Any) -> None:
    """api, evqueue, http and tcp passed at once: each is served with its protocol, at the passed address, although
    the configuration turns [http] and [tcp] off."""
    jobd = activated(HTTP_TOKEN_CONFIG)
    root = jobd.daemon.root
    api, evqueue = _unix_listener(root / "api.sock"), _unix_listener(root / "evq.sock")
    http_sock, tcp = _tcp_listener(), _tcp_listener()
    sockets = [api, evqueue, http_sock, tcp]
    jobd.start(
        _pass(sockets),
        pass_fds=tuple(s.fileno() for s in sockets),
        LISTEN_FDS="4",
        LISTEN_FDNAMES="api:evqueue:http:tcp",
    )
    http_port, tcp_port = http_sock.getsockname()[1], tcp.getsockname()[1]
    for s in sockets:
        s.close()  # jobd has them now; systemd would keep its copies, which changes nothing here
    with Client(str(root / "api.sock")) as client:
        status = client.call("daemon.status", timeout=30)
    assert status["http_listen"] == f"127.0.0.1:{http_port}"
    assert status["tcp_listen"] == f"127.0.0.1:{tcp_port}"
    with socket.socket(socket.AF_UNIX) as xml:
        xml.settimeout(30)
        xml.connect(str(root / "evq.sock"))
        assert xml.recv(4096).startswith(b"<ready ")
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=30) as remote:
        assert remote.recv(4096).startswith(b"<auth challenge=")
    web = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    web.request("GET", "/jobs/status", headers={"Authorization": f"Bearer {TOKEN}"})
    reply = web.getresponse()
    assert (reply.status, json.loads(reply.read())["status"]) == (200, 200)
    web.close()
    assert jobd.stop() == 0
    assert (root / "api.sock").is_socket() and (root / "evq.sock").is_socket()
    assert not jobd.daemon.socket_path.exists() and not jobd.daemon.evqueue_socket.exists()


def test_http_on_a_passed_unix_socket(activated: Any) -> None:
    """An HTTP listener passed as a unix socket identifies clients by peer credentials, as a configured one."""
    jobd = activated()
    path = jobd.daemon.root / "http.sock"
    listener = _unix_listener(path)
    jobd.start(_pass([listener]), pass_fds=(listener.fileno(),), LISTEN_FDS="1", LISTEN_FDNAMES="http")
    listener.close()
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(30)
        raw.connect(str(path))
        raw.sendall(b"GET /jobs/status HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 200 OK"), reply  # no token: the peer credentials said root
    assert jobd.stop() == 0
    assert path.is_socket()


def test_a_passed_socket_removed_is_left_to_its_socket_unit_with_what_to_do(activated: Any) -> None:
    """jobd cannot make again a socket file systemd passed (systemd would pass its old, pathless socket at the next
    start): at a reload it says the file is gone and what makes it again, and makes none of its own there."""
    jobd = activated()
    path = jobd.daemon.root / "api.sock"
    listener = _unix_listener(path)
    jobd.start(_pass([listener]), pass_fds=(listener.fileno(),), LISTEN_FDS="1", LISTEN_FDNAMES="api")
    listener.close()
    path.unlink()
    assert jobd.process is not None
    os.kill(jobd.process.pid, signal.SIGHUP)
    wait_for_log(
        jobd.daemon,
        f"the socket file {path}, which systemd passed, is no longer there: clients cannot connect; restart its "
        "socket unit and jobd (systemctl restart jobd.socket jobd)",
    )
    assert not path.exists()
    assert jobd.stop() == 0


@pytest.mark.parametrize(
    ("names", "count", "message"),
    [
        ("bogus", "1", "fd 3 is named 'bogus', which jobd does not serve; set FileDescriptorName= to one of api"),
        ("api:api", "2", "two sockets are named 'api'"),
        ("api", "2", "2 sockets passed but 1 names in LISTEN_FDNAMES='api'"),
        (None, "1", "1 sockets passed but 0 names"),
        ("tcp", "1", "the socket named 'tcp' is a unix socket; the evQueue TCP listener ([tcp] listen) must be IPv4"),
    ],
)
def test_malformed_activation_is_a_clear_error(activated: Any, names: str | None, count: str, message: str) -> None:
    jobd = activated()
    one, two = _unix_listener(jobd.daemon.root / "a.sock"), _unix_listener(jobd.daemon.root / "b.sock")
    env = {"LISTEN_FDS": count} if names is None else {"LISTEN_FDS": count, "LISTEN_FDNAMES": names}
    jobd.start(_pass([one, two]), pass_fds=(one.fileno(), two.fileno()), wait_ready=False, **env)
    assert jobd.exit_code() == EXIT_CONFIG
    assert f"not starting: socket activation: {message}" in jobd.daemon.log()


def test_a_socket_that_does_not_listen_is_refused(activated: Any) -> None:
    jobd = activated()
    left, right = socket.socketpair()
    with left, right:
        jobd.start(_pass([left]), pass_fds=(left.fileno(),), wait_ready=False, LISTEN_FDS="1", LISTEN_FDNAMES="api")
        assert jobd.exit_code() == EXIT_CONFIG
    assert "fd 3 ('api') is not a listening stream socket" in jobd.daemon.log()


def test_variables_for_another_process_are_ignored_and_removed(activated: Any) -> None:
    """LISTEN_PID naming another process: not ours (sd_listen_fds' rule): fd 3 is left alone and jobd binds its own
    socket."""
    jobd = activated()
    jobd.start([], LISTEN_PID="1", LISTEN_FDS="1", LISTEN_FDNAMES="api")
    with Client(str(jobd.daemon.socket_path)) as client:
        assert client.call("ping", timeout=30)["pong"] is True
    assert "socket activation" not in jobd.daemon.log()
    assert jobd.stop() == 0


def test_watchdog_pings_when_asked(activated: Any) -> None:
    """WATCHDOG_USEC set: WATCHDOG=1 comes again and again (every half interval), from the running event loop."""
    jobd = activated()
    jobd.start([], WATCHDOG_USEC="200000")
    assert jobd.notify is not None
    for _ in range(3):
        assert jobd.notify.wait_for("WATCHDOG=1") == "WATCHDOG=1"
    assert jobd.stop() == 0


# -- the module's functions, in this process --------------------------------------------------------------------


def test_take_sockets_without_activation() -> None:
    assert activation.take_sockets({}) == {}
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api", "OTHER": "x"}
    assert activation.take_sockets(env) == {}
    assert env == {"OTHER": "x"}
    assert activation.take_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == {}
    with pytest.raises(StartupError, match="LISTEN_FDS='x' is not a number"):
        activation.take_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})


def test_watchdog_interval() -> None:
    env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert activation.watchdog_interval(env) == 3.0
    assert env == {}
    assert activation.watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.5
    assert activation.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}) is None
    assert activation.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert activation.watchdog_interval({}) is None


HISTORY = 100_000  # finished jobs on record: their counting at start-up takes 20 turns of jobd's loop (COUNT_SLICE)


def test_a_status_asked_for_while_the_history_is_counted_waits_without_holding_other_requests(activated: Any) -> None:
    """daemon.status counts the jobs on record by state. A start-up counts a long history a slice per turn of the
    loop; a status asked for meanwhile waits for that counting to end, rather than counting the rest at once with
    every other client waiting: a ping sent right behind it, on the same connection, is answered first. The client
    connects and writes both before jobd starts (the socket is passed to it, as systemd does), so they reach jobd
    while the counting has barely begun, however loaded the machine is."""
    jobd = activated("")
    daemon = jobd.daemon
    daemon.start()
    daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    daemon.stop()
    with sqlite3.connect(daemon.state_dir / "jobd.sqlite3") as database:  # copies of that job, as a history
        columns = ", ".join(f'"{row[1]}"' for row in database.execute('PRAGMA table_info("job")') if row[1] != "id")
        database.execute(
            f'WITH RECURSIVE "n"("id") AS (SELECT 2 UNION ALL SELECT "id" + 1 FROM "n" WHERE "id" < {HISTORY}) '
            f'INSERT INTO "job" ("id", {columns}) SELECT "n"."id", {columns} FROM "n", "job" WHERE "job"."id" = 1'
        )
    database.close()
    listener = _unix_listener(daemon.root / "api.sock")
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(READY_TIMEOUT)
        client.connect(str(daemon.root / "api.sock"))
        client.sendall(
            b'{"jsonrpc": "2.0", "id": 1, "method": "daemon.status"}\n{"jsonrpc": "2.0", "id": 2, "method": "ping"}\n'
        )
        jobd.start(_pass([listener]), pass_fds=(listener.fileno(),), LISTEN_FDS="1", LISTEN_FDNAMES="api")
        listener.close()
        reader = client.makefile("rb")
        replies = [json.loads(reader.readline()) for _ in range(2)]
    assert [reply["id"] for reply in replies] == [2, 1], replies
    assert replies[1]["result"]["jobs"] == {"succeeded": HISTORY}
