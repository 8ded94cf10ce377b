"""The TCP listener for evQueue clients, on a real daemon bound to 127.0.0.1: evQueue's challenge / HMAC-SHA1 login
(computed here as evQueue's PHP class does, and by tests/php/evqueue_client.php itself), its refusals, the slow-down
of failed logins, reload, bind failure and the listener being off by default.

`listen = "127.0.0.1:0"` binds a free port, which daemon.status reports as `tcp_listen`. Every read blocks on the
socket with a deadline; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Daemon, open_descriptors
from lxml import etree
from recovery.support import wait_for_log
from test_evqueue_protocol import Closed, EvqClient

from jobd import config
from jobd.errors import ConfigError
from jobd.protocol.evqueue_auth import LoginThrottle, expected_response, verify
from jobd.server import LOGINS_UNDER_WAY, LOGINS_UNDER_WAY_PER_ADDRESS

pytestmark = pytest.mark.timeout(120)

DEADLINE = 10.0
PHP = shutil.which("php")
CLIENT = Path(__file__).resolve().parent / "php" / "evqueue_client.php"


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


USERS = f"""
[tcp.users.admin]
password_sha1 = "{sha1("admin").upper()}"
admin = true

[tcp.users.alice]
password_sha1 = "{sha1("wonderland")}"
groups = ["ops"]
"""

SLOW_WORKFLOW = b"""<workflow><subjobs><job name="nap"><tasks>
  <task name="nap" path="/bin/sleep 300" queue="default"/>
</tasks></job></subjobs></workflow>
"""

HELLO_WORKFLOW = b"""<workflow>
  <parameters><parameter name="word"/></parameters>
  <subjobs>
    <job name="say">
      <tasks>
        <task name="say" path="/bin/echo" queue="default">
          <input name="word"><value select="evqGetWorkflowParameter('word')"/></input>
        </task>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""


class TcpClient(EvqClient):
    """A raw evQueue TCP connection, first answered with evQueue's challenge."""

    def __init__(self, address: tuple[str, int], source: str = "") -> None:
        self._take(socket.create_connection(address, timeout=DEADLINE, source_address=(source, 0) if source else None))
        self.challenge = self.document()

    def closed(self) -> bool:
        """Whether jobd ends the connection now that it has answered (EOF within the deadline)."""
        try:
            self.document()
        except Closed:
            return True
        return False

    def login(self, user: str, password: str) -> etree._Element:
        response = expected_response(sha1(password), self.challenge.get("challenge", ""))
        return self.ask(f"<auth response='{response}' user='{user}' />".encode())


def jobd_sockets(pid: int) -> int:
    """How many sockets the process holds open."""
    return sum(1 for target in open_descriptors(pid).values() if target.startswith("socket:"))


def tcp_address(daemon: Daemon) -> tuple[str, int]:
    listen = daemon.call("daemon.status")["tcp_listen"]
    host, port = listen.rsplit(":", 1)
    return host, int(port)


def listening_tcp_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds, read from /proc."""
    inodes = set()
    for target in open_descriptors(pid).values():
        found = re.fullmatch(r"socket:\[(\d+)\]", target)
        if found:
            inodes.add(found[1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # TCP_LISTEN
                    address, port = local.split(":")
                    raw = bytes.fromhex(address)
                    # /proc prints addresses as host-order 32-bit words
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    host = socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)
                    listening.add((host, int(port, 16)))
    return listening


@pytest.fixture
def tcp_daemon(make_daemon: Any) -> Daemon:
    daemon: Daemon = make_daemon(
        '[tcp]\nlisten = "127.0.0.1:0"\nlogin_delay = 0.05\nlogin_delay_max = 0.2\n' + USERS, start=False
    )
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    (workflows / "hello.xml").write_bytes(HELLO_WORKFLOW)
    daemon.start()
    return daemon


# -- the handshake ---------------------------------------------------------------------------------------------------


def test_the_response_is_evqueues_hmac() -> None:
    # The handshake observed on evQueue 3.3 (reference/evqueue.md §1.3), user admin, password admin.
    assert expected_response(sha1("admin"), "809d7b5098524e622b6854b28ee36b9bad3fe116") == (
        "7cc06704e4b1ebbc56d667a8594d42e9192fba6e"
    )


def test_an_admin_logs_in_and_is_served(tcp_daemon: Daemon) -> None:
    with TcpClient(tcp_address(tcp_daemon)) as client:
        challenge = client.challenge
        assert challenge.tag == "auth" and challenge.get("status") == "OK" and challenge.get("node")
        assert re.fullmatch("[0-9a-f]{40}", challenge.get("challenge", ""))
        # computed exactly as evQueue's PHP class: hash_hmac("sha1", hex2bin($challenge), sha1($pwd, true))
        key = hashlib.sha1(b"admin").digest()
        response = hmac.new(key, bytes.fromhex(challenge.get("challenge", "")), hashlib.sha1).hexdigest()
        ready = client.ask(f'<?xml version="1.0"?>\n<auth response="{response}" user="admin"/>'.encode())
        assert (ready.tag, ready.get("status"), ready.get("profile")) == ("ready", "OK", "ADMIN")
        assert ready.find("modules") is not None
        pong = client.ask(b"<ping/>")
        assert pong.get("status") == "OK", etree.tostring(pong)
        assert client.ask(b"<control action='reload'/>").get("status") == "OK"


def refused_at_once(address: tuple[str, int], source: str) -> etree._Element:
    """The answer of a connection from `source` that jobd refuses, read to the end its close makes."""
    with contextlib.closing(socket.create_connection(address, timeout=DEADLINE, source_address=(source, 0))) as sock:
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    return etree.fromstring(answer)


def test_clients_that_do_not_log_in_cannot_lock_out_the_local_sockets(make_daemon: Any) -> None:
    """A TCP client counts against max_connections only once logged in: those still to log in (anyone who can
    reach the port) have LOGINS_UNDER_WAY places of their own, at most LOGINS_UNDER_WAY_PER_ADDRESS from one
    address, and filled max_connections before, refusing the local sockets' clients, root included."""
    daemon: Daemon = make_daemon('[tcp]\nlisten = "127.0.0.1:0"\n' + USERS, daemon_extra="max_connections = 3")
    address = tcp_address(daemon)
    sources = [f"127.0.0.{n}" for n in range(2, 2 + LOGINS_UNDER_WAY // LOGINS_UNDER_WAY_PER_ADDRESS)]
    with contextlib.ExitStack() as held:
        silent = []  # each gets its challenge
        for source in sources:
            silent += [held.enter_context(TcpClient(address, source)) for _ in range(LOGINS_UNDER_WAY_PER_ADDRESS)]
            if source == sources[0]:  # one more from that address is refused, before the places are all taken
                refused = refused_at_once(address, source)
                assert refused.get("error-code") == "TOO_MANY_CONNECTIONS", etree.tostring(refused)
                assert f"evQueue clients from {source} are logging in" in refused.get("error", "")
        assert len(silent) == LOGINS_UNDER_WAY and all(client.challenge.get("challenge") for client in silent)
        assert daemon.call("ping")["pong"] is True  # the API socket still takes clients
        # One more from anywhere: refused at once, closed at once (each held a descriptor for seconds, without
        # limit: jobd ran out of them).
        sockets_before = jobd_sockets(daemon.pid)
        for _ in range(50):
            refused = refused_at_once(address, "127.0.0.200")
            assert f"{LOGINS_UNDER_WAY} evQueue clients are logging in on TCP" in refused.get("error", "")
        assert jobd_sockets(daemon.pid) <= sockets_before, "refused connections still hold descriptors"
        # Logged in, a client takes one of max_connections: with the three taken, the fourth login is refused.
        local = [held.enter_context(daemon.client()) for _ in range(2)]
        assert all(client.call("ping")["pong"] for client in local)
        assert silent[0].login("alice", "wonderland").get("status") == "OK"
        refused = silent[1].login("alice", "wonderland")
        assert refused.get("error-code") == "TOO_MANY_CONNECTIONS" and silent[1].closed(), etree.tostring(refused)


# Run in the daemon's network namespace (nsenter): connections from given sources that stay silent, then one more.
SILENT_FROM_SOURCES = """
import json, socket, sys
host, port, last, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
held, greetings = [], []
for source in sources:
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    held.append(sock)
    greetings.append(sock.recv(4096).decode())
refused = socket.create_connection((host, port), timeout=10, source_address=(last, 0))
answer = b""
try:
    while chunk := refused.recv(1 << 16):
        answer += chunk
except TimeoutError:  # greeted, and left open: not refused
    pass
print(json.dumps({"greetings": greetings, "refused": answer.decode()}))
"""


def test_clients_from_one_ipv6_64_share_the_places_of_one_address(make_daemon: Any) -> None:
    """An IPv6 host usually holds a whole /64: counted by address, it took every place of the clients still to log
    in with addresses of its own. Its clients count as from one address, as the login delay counts them. The daemon
    runs in a network namespace of its own, whose loopback holds three addresses of one /64."""
    net = "fd00:6a6f:6264::"
    addresses = " && ".join(f"ip -6 addr add {net}{n}/64 dev lo nodad" for n in (1, 2, 3))
    setup = f'ip link set lo up && {addresses} && exec "$@"'
    daemon: Daemon = make_daemon(f'[tcp]\nlisten = "[{net}1]:0"\n' + USERS, start=False)
    daemon.command_prefix = ["unshare", "--net", "sh", "-c", setup, "sh"]
    daemon.start()
    host, port = tcp_address(daemon)
    sources = [f"{net}2"] * (LOGINS_UNDER_WAY_PER_ADDRESS // 2) + [f"{net}3"] * (LOGINS_UNDER_WAY_PER_ADDRESS // 2)
    in_its_namespace = ["nsenter", f"--net=/proc/{daemon.pid}/ns/net", sys.executable, "-c", SILENT_FROM_SOURCES]
    found = subprocess.run(
        [*in_its_namespace, host.strip("[]"), str(port), f"{net}3", *sources],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(found.stdout)
    assert len(result["greetings"]) == LOGINS_UNDER_WAY_PER_ADDRESS
    assert all("challenge" in greeting for greeting in result["greetings"]), result
    assert "TOO_MANY_CONNECTIONS" in result["refused"], result
    refused = etree.fromstring(result["refused"].encode())
    assert f"evQueue clients from {net}/64 are logging in" in refused.get("error", ""), result


def test_a_client_that_closes_while_it_waits_is_dropped_at_once(make_daemon: Any) -> None:
    """A TCP peer's close reaches jobd as an end of file, as a half close would: only something written to it (its end
    answers with a reset) tells them apart. jobd writes a keep-alive at once, so the connection goes now; it stayed
    until the next keep-alive (5 s; here, an hour), holding a place of max_connections meanwhile."""
    daemon: Daemon = make_daemon('[tcp]\nlisten = "127.0.0.1:0"\n' + USERS, start=False)
    daemon.write_workflows(nap=SLOW_WORKFLOW)
    daemon.env["JOBD_EVQUEUE_KEEPALIVE_INTERVAL"] = "3600"
    daemon.start()
    address = tcp_address(daemon)
    with TcpClient(address) as kept:
        assert kept.login("admin", "admin").tag == "ready"
        instance_id = kept.ask(b'<instance action="launch" name="nap"/>').get("workflow-instance-id", "")
        with TcpClient(address) as gone:
            assert gone.login("admin", "admin").tag == "ready"
            gone.send(b'<instance action="wait" id="%s"/>' % instance_id.encode())
            assert kept.ask(b"<ping/>").get("status") == "OK"  # the wait was read before this ping was answered
        wait_for_log(daemon, "closed its evQueue connection with a request waiting: dropped")
        statistics = kept.ask(b'<statistics action="query" type="global"/>')[0]
        assert statistics.get("current_api_connections") == "1", etree.tostring(statistics)
        assert kept.ask(b'<instance action="cancel" id="%s"/>' % instance_id.encode()).get("status") == "OK"


def test_every_connection_gets_a_new_challenge(tcp_daemon: Daemon) -> None:
    address = tcp_address(tcp_daemon)
    with TcpClient(address) as one, TcpClient(address) as two:
        assert one.challenge.get("challenge") != two.challenge.get("challenge")


def test_a_user_gets_the_user_profile_and_no_admin_commands(tcp_daemon: Daemon) -> None:
    with TcpClient(tcp_address(tcp_daemon)) as client:
        ready = client.login("alice", "wonderland")
        assert (ready.tag, ready.get("profile")) == ("ready", "USER")
        refused = client.ask(b"<control action='reload'/>")
        assert (refused.get("status"), refused.get("error-code")) == ("KO", "INSUFFICIENT_RIGHTS")
        assert client.ask(b"<ping/>").get("status") == "OK"


def test_requests_sent_with_the_auth_are_answered_after_the_greeting(tcp_daemon: Daemon) -> None:
    with TcpClient(tcp_address(tcp_daemon)) as client:
        response = expected_response(sha1("wonderland"), client.challenge.get("challenge", ""))
        client.send(f"<auth response='{response}' user='alice'/><ping/>".encode())
        assert client.document().tag == "ready"
        assert client.document().get("status") == "OK"


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param(lambda c: f"<auth response='{expected_response(sha1('nope'), c)}' user='admin'/>", id="wrong"),
        pytest.param(lambda c: f"<auth response='{expected_response(sha1('admin'), c)}' user='nobody'/>", id="user"),
        pytest.param(lambda c: "<auth response='hmac' user='admin'/>", id="hmac-bypass"),
        pytest.param(lambda c: f"<auth response='{'zz' * 20}' user='admin'/>", id="not-hex"),
        pytest.param(lambda c: f"<auth response=' {expected_response(sha1('admin'), c)}' user='admin'/>", id="space"),
        pytest.param(lambda c: "<auth response='' user='admin'/>", id="empty"),
        pytest.param(lambda c: "<auth user='admin'/>", id="no-response"),
        pytest.param(lambda c: f"<auth response='{expected_response(sha1('admin'), c)}'/>", id="no-user"),
        pytest.param(
            lambda c: f"<auth response='{expected_response(sha1('admin'), 'ab' * 20)}' user='admin'/>", id="old"
        ),
    ],
)
def test_failed_logins_are_refused_and_closed(tcp_daemon: Daemon, auth: Any) -> None:
    with TcpClient(tcp_address(tcp_daemon)) as client:
        answer = client.ask(auth(client.challenge.get("challenge", "")).encode())
        assert answer.tag == "response"
        assert dict(answer.attrib) == {
            "error": "Invalid authentication",
            "error-code": "AUTH_ERROR",
            "node": client.challenge.get("node"),
            "status": "KO",
        }
        assert client.closed()


def test_a_failed_login_gives_its_place_back_once_its_client_has_gone(tcp_daemon: Daemon) -> None:
    # A refused login's connection lingered 5 s after its client had read the refusal and closed, holding one of its
    # address's 8 login places: a few mistyped passwords locked that address out of logging in meanwhile.
    address = tcp_address(tcp_daemon)
    for _ in range(8):
        with TcpClient(address) as client:
            assert client.login("admin", "wrong").get("error-code") == "AUTH_ERROR"
            assert client.closed()
    # jobd has read each end of file by its second answer after them (the closes take effect one turn later).
    tcp_daemon.call("ping")
    tcp_daemon.call("ping")
    with TcpClient(address) as client:
        assert client.challenge.get("challenge"), etree.tostring(client.challenge)
        assert client.login("admin", "admin").get("profile") == "ADMIN"


@pytest.mark.parametrize("request_", [b"<ping/>", b"<control action='reload'/>", b"<ready/>"])
def test_a_command_before_the_login_is_refused_and_closed(tcp_daemon: Daemon, request_: bytes) -> None:
    started = tcp_daemon.call("daemon.status")
    with TcpClient(tcp_address(tcp_daemon)) as client:
        answer = client.ask(request_)
        assert (answer.get("error"), answer.get("error-code"), answer.get("status")) == (
            "Expected 'auth' node",
            "AUTH_ERROR",
            "KO",
        )
        assert client.closed()
    assert tcp_daemon.call("daemon.status")["last_reload"]["at"] == started["last_reload"]["at"]


def test_ill_formed_xml_before_the_login_is_refused_and_closed(tcp_daemon: Daemon) -> None:
    with TcpClient(tcp_address(tcp_daemon)) as client:
        answer = client.ask(b"<auth response='x' user='admin'></wrong>")
        assert answer.get("status") == "KO"
        assert client.closed()


# -- the slow-down ------------------------------------------------------------------------------------------------


def test_failed_logins_are_slowed_down_per_address_and_a_success_does_not_reset(make_daemon: Any) -> None:
    # A success reset the delay: with an account of its own (alice), a client guessed at admin's password at the
    # base delay, logging in as itself between each two guesses.
    daemon = make_daemon('[tcp]\nlisten = "127.0.0.1:0"\nlogin_delay = 0.3\nlogin_delay_max = 1\n' + USERS)
    address = tcp_address(daemon)
    took = []
    for _ in range(2):
        with TcpClient(address) as client:
            started = time.monotonic()
            answer = client.ask(b"<auth response='hmac' user='admin'/>")
            took.append(time.monotonic() - started)
            assert answer.get("error-code") == "AUTH_ERROR" and client.closed()
    assert took[0] >= 0.3 and took[1] >= 0.6, took
    with TcpClient(address) as client:  # an unknown login costs what a wrong password does
        started = time.monotonic()
        assert client.login("nobody", "admin").get("error-code") == "AUTH_ERROR"
        assert time.monotonic() - started >= 1.0  # 1.2, capped at login_delay_max
    with TcpClient(address) as client:
        assert client.login("alice", "wonderland").tag == "ready"
    with TcpClient(address) as client:
        assert client.login("admin", "wrong").get("error-code") == "AUTH_ERROR"
    delays = re.findall(r"failed evQueue login as '(\w*)' from 127\.0\.0\.1; answered in ([0-9.]+) s", daemon.log())
    assert delays == [("admin", "0.3"), ("admin", "0.6"), ("nobody", "1"), ("admin", "1")], daemon.log()[-2000:]


def test_the_throttle_doubles_caps_forgets_and_groups_ipv6_by_64() -> None:
    throttle = LoginThrottle()
    assert [throttle.failed("192.0.2.1", float(n), 1, 30) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert throttle.failed("192.0.2.2", 7.0, 1, 30) == 1  # per address
    assert throttle.failed("192.0.2.1", 7.0 + 901, 1, 30) == 1  # forgotten after FORGET_AFTER without a failure
    throttle.failed("2001:db8::1", 0.0, 1, 30)
    assert throttle.failures("2001:db8::ffff:2") == 1 and throttle.failures("2001:db8:0:1::1") == 0
    assert throttle.failures("::ffff:192.0.2.2") == 1


def test_verify_accepts_only_the_hmac() -> None:
    from jobd.model import RemoteUser

    user = RemoteUser("admin", sha1("admin"))
    challenge = "ab" * 20
    good = expected_response(sha1("admin"), challenge)
    assert verify(user, challenge, good) and verify(user, challenge, good.upper())
    for bad in ("hmac", "", good[:-1], good + "0", "zz" * 20, good.replace(good[0], "g"), "é" * 40):
        assert not verify(user, challenge, bad), bad
    assert not verify(None, challenge, good)


# -- PHP ---------------------------------------------------------------------------------------------------------------


def run_php(daemon: Daemon, user: str, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    if PHP is None:
        pytest.fail("php is not installed: `make test` installs php-cli and php-xml")
    host, port = tcp_address(daemon)
    env = {**os.environ, "EVQUEUE_USER": user, "EVQUEUE_PASSWORD": password}
    return subprocess.run(
        [PHP, str(CLIENT), f"tcp://{host}:{port}", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_php_client_logs_in_over_tcp_and_launches(tcp_daemon: Daemon) -> None:
    import json

    done = run_php(tcp_daemon, "admin", "admin", "hello", "word=tcp")
    assert done.returncode == 0, f"{done.stderr}\n{tcp_daemon.log()[-3000:]}"
    result = json.loads(done.stdout)
    assert (result["profile"], result["status"], result["errors"]) == ("ADMIN", "TERMINATED", 0)
    assert [task["output"] for task in result["tasks"]] == ["tcp\n"]


def test_php_client_with_a_wrong_password_is_refused(tcp_daemon: Daemon) -> None:
    done = run_php(tcp_daemon, "admin", "nimda", "hello", "word=tcp")
    assert done.returncode == 1 and "Invalid authentication (AUTH_ERROR)" in done.stderr, done.stderr


# -- configuration and life cycle ----------------------------------------------------------------------------------


def test_the_listener_is_off_by_default(daemon: Daemon) -> None:
    assert daemon.call("daemon.status")["tcp_listen"] is None
    assert listening_tcp_sockets(daemon.pid) == set()


def test_the_listener_binds_loopback_only(tcp_daemon: Daemon) -> None:
    host, port = tcp_address(tcp_daemon)
    assert host == "127.0.0.1" and port > 0
    assert listening_tcp_sockets(tcp_daemon.pid) == {("127.0.0.1", port)}
    assert "takes connections from other machines" not in tcp_daemon.log()  # loopback: no warning


def test_a_listener_other_machines_can_reach_is_warned_of_as_clear_text(make_daemon: Any) -> None:
    """Neither evQueue's protocol nor jobd's HTTP is encrypted: bound where other machines reach it, a password can be
    guessed offline from one login seen on the way (SHA-1 and HMAC-SHA1 are fast), and a bearer token is read as it
    is sent. jobd says so as it starts. The daemon runs in a network namespace of its own, binding every address
    there."""
    daemon: Daemon = make_daemon('[tcp]\nlisten = "0.0.0.0:0"\n\n[http]\nlisten = "[::]:0"\n' + USERS, start=False)
    daemon.command_prefix = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    daemon.start()
    status = daemon.call("daemon.status")
    for what, address in (("[tcp] listen", status["tcp_listen"]), ("[http] listen", status["http_listen"])):
        assert f"{what} {address} takes connections from other machines, in clear text: " in daemon.log(), what


def test_a_reload_changes_the_users_for_new_connections(tcp_daemon: Daemon) -> None:
    address = tcp_address(tcp_daemon)
    with TcpClient(address) as before:
        assert before.login("alice", "wonderland").get("profile") == "USER"
        text = (tcp_daemon.config_dir / "jobd.toml").read_text()
        text = text.replace(
            f'password_sha1 = "{sha1("wonderland")}"\n', f'password_sha1 = "{sha1("new")}"\nadmin = true\n'
        )
        text = text.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"')
        (tcp_daemon.config_dir / "jobd.toml").write_text(text)
        tcp_daemon.call("daemon.reload")
        ended = before.document()  # the session of a login the reload changed ends (below)
        assert ended.get("error-code") == "AUTH_ERROR" and before.closed(), etree.tostring(ended)
    assert tcp_address(tcp_daemon) == address  # listen changes at the next restart
    assert "[tcp] listen changed to 127.0.0.1:1; it takes effect at the next restart" in tcp_daemon.log()
    with TcpClient(address) as old:
        assert old.login("alice", "wonderland").get("error-code") == "AUTH_ERROR"
    with TcpClient(address) as new:
        assert new.login("alice", "new").get("profile") == "ADMIN"


SESSIONS = (
    '[tcp]\nlisten = "127.0.0.1:0"\n'
    + USERS
    + f"""
[tcp.users.bob]
password_sha1 = "{sha1("builder")}"

[tcp.users.carol]
password_sha1 = "{sha1("carol")}"
groups = ["reporting"]

[tcp.users.dave]
password_sha1 = "{sha1("dave")}"
"""
)


def test_a_reload_ends_the_sessions_of_the_logins_it_removes_or_changes(make_daemon: Any) -> None:
    """A login removed from the configuration, or given a new password, or made no admin, is revoked: its sessions
    end at the reload, a request still waiting too (answered AUTH_ERROR, not when its instance ends). They went on
    with what the old login gave them, ADMIN included, for as long as their client kept the connection."""
    daemon: Daemon = make_daemon(SESSIONS, start=False)
    daemon.write_workflows(nap=SLOW_WORKFLOW)
    daemon.env["JOBD_EVQUEUE_KEEPALIVE_INTERVAL"] = "3600"  # the wait's first answer is its end, not a <ping/>
    daemon.start()
    address = tcp_address(daemon)
    passwords = {"admin": "admin", "alice": "wonderland", "bob": "builder", "carol": "carol", "dave": "dave"}
    with contextlib.ExitStack() as held:
        sessions = {name: held.enter_context(TcpClient(address)) for name in passwords}
        for name, client in sessions.items():
            assert client.login(name, passwords[name]).tag == "ready"
        launched = sessions["admin"].ask(b'<instance action="launch" name="nap"/>')
        instance_id = launched.get("workflow-instance-id", "")
        assert instance_id, etree.tostring(launched)
        sessions["admin"].send(b'<instance action="wait" id="%s"/>' % instance_id.encode())
        assert sessions["dave"].ask(b"<ping/>").get("status") == "OK"
        text = (daemon.config_dir / "jobd.toml").read_text()
        text = text.replace(f'"{sha1("admin").upper()}"\nadmin = true', f'"{sha1("admin").upper()}"\nadmin = false')
        text = text.replace(sha1("wonderland"), sha1("looking-glass"))
        text = text.replace(f'[tcp.users.bob]\npassword_sha1 = "{sha1("builder")}"\n', "")
        text = text.replace('groups = ["reporting"]', 'groups = ["reporting", "backup"]')
        (daemon.config_dir / "jobd.toml").write_text(text)
        daemon.call("daemon.reload")
        for name, what in (("admin", "changed"), ("alice", "changed"), ("bob", "removed"), ("carol", "changed")):
            ended = sessions[name].document()
            assert (ended.get("status"), ended.get("error-code")) == ("KO", "AUTH_ERROR"), etree.tostring(ended)
            assert f"the login {name} was {what} by a reload" in ended.get("error", ""), etree.tostring(ended)
            assert sessions[name].closed()
        assert sessions["dave"].ask(b"<ping/>").get("status") == "OK"  # unchanged: its session goes on
        wait_for_log(daemon, "ending the evQueue session of the login bob from 127.0.0.1: a reload removed it")
    assert daemon.call("instance.get", {"id": int(instance_id)})["status"] == "EXECUTING"  # it was only waited for
    daemon.call("instance.cancel", {"id": int(instance_id)})
    with TcpClient(address) as again:  # the new password logs in, as what the login now is
        assert again.login("alice", "looking-glass").get("profile") == "USER"


def test_a_password_file_every_user_may_read_is_warned_of(make_daemon: Any) -> None:
    """password_sha1 is all a client needs to log in (it is the HMAC's key, not a check of the password): in a file
    of mode 0644, as an editor makes it under umask 022 and as the Debian package installs jobd.toml, every local
    user could read it and log in over TCP as that login, an admin's too. jobd says so at start and at each reload
    until the file is closed to them; one readable by root alone is not warned of."""
    daemon: Daemon = make_daemon("", start=False)
    logins = daemon.config_dir / "jobd.d" / "50-logins.toml"
    logins.parent.mkdir(exist_ok=True)
    logins.write_text(USERS)
    logins.chmod(0o644)
    (daemon.config_dir / "jobd.d" / "60-listen.toml").write_text('[tcp]\nlisten = "127.0.0.1:0"\n')
    daemon.start()
    warning = (
        f"{logins} is readable by every local user (mode 0644) and holds the password_sha1 of [tcp.users.admin] "
        "and [tcp.users.alice]: that SHA-1 is all a client needs to log in as them over TCP; make the file "
        f"readable by root alone (chmod 600 {logins})"
    )
    assert daemon.log().count(warning) == 1, daemon.log()
    assert str(daemon.config_dir / "jobd.d" / "60-listen.toml") + " is readable" not in daemon.log()
    command = [sys.executable, "-m", "jobd.daemon", "--config-dir", str(daemon.config_dir), "--check-config"]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert checked.returncode == 0 and checked.stderr == f"warning: {warning}\n", checked.stderr
    daemon.call("daemon.reload")
    assert daemon.log().count(warning) == 2  # at each reload, until the file is closed
    logins.chmod(0o600)
    daemon.call("daemon.reload")
    assert daemon.log().count(warning) == 2
    assert "is readable by every local user" not in daemon.log().split("configuration reloaded")[-1]
    with TcpClient(tcp_address(daemon)) as client:
        assert client.login("admin", "admin").get("profile") == "ADMIN"


def test_a_port_in_use_stops_start_up_with_a_clear_error(make_daemon: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = make_daemon(f'[tcp]\nlisten = "127.0.0.1:{port}"\n', start=False).start_refused()
    assert done.returncode == 1
    assert f"not starting: cannot listen for evQueue clients on TCP 127.0.0.1:{port} ([tcp] listen)" in done.stderr
    assert "Address already in use" in done.stderr


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "jobd.toml").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("", None),
        ("[tcp]\nlisten = 5000", ("127.0.0.1", 5000)),
        ('[tcp]\nlisten = "5000"', ("127.0.0.1", 5000)),
        ('[tcp]\nlisten = "0.0.0.0:5000"', ("0.0.0.0", 5000)),
        ('[tcp]\nlisten = "[::]:5000"', ("::", 5000)),
        ('[tcp]\nlisten = "[::1]:0"', ("::1", 0)),
        ("[tcp]\nlisten = false", None),
    ],
)
def test_listen_values(tmp_path: Path, text: str, listen: Any) -> None:
    assert config.load([str(write(tmp_path, text))]).tcp.listen == listen


@pytest.mark.parametrize(
    ("text", "key", "says"),
    [
        ('[tcp]\nlisten = "localhost:5000"', "tcp.listen", "is not allowed"),
        ('[tcp]\nlisten = "999.0.0.1:5000"', "tcp.listen", "is not an IP address"),
        ('[tcp]\nlisten = "::1:5000"', "tcp.listen", "is not allowed"),
        ('[tcp]\nlisten = "[127.0.0.1]:5000"', "tcp.listen", "IPv6 addresses go in brackets"),
        ('[tcp]\nlisten = "127.0.0.1:65536"', "tcp.listen", "out of range"),
        ("[tcp]\nlisten = true", "tcp.listen", "expected a port"),
        ("[tcp]\nport = 5000", "tcp.port", "unknown key"),
        ('[tcp.users.bob]\npassword_sha1 = "abc"', "tcp.users.bob.password_sha1", "40 hexadecimal digits"),
        (f'[tcp.users.bob]\npassword_sha1 = "{"g" * 40}"', "tcp.users.bob.password_sha1", "sha1sum"),
        ("[tcp.users.bob]\nadmin = true", "tcp.users.bob", "missing required key password_sha1"),
        (f'[tcp.users."b/b"]\npassword_sha1 = "{sha1("x")}"', 'tcp.users."b/b"', "invalid name"),
        (f'[tcp.users.bob]\npassword_sha1 = "{sha1("x")}"\nadmin = "yes"', "tcp.users.bob.admin", "true or false"),
        (f'[tcp.users.bob]\npassword_sha1 = "{sha1("x")}"\ngroups = "ops"', "tcp.users.bob.groups", "array"),
        (f'[tcp.users.bob]\npassword_sha1 = "{sha1("x")}"\ngroups = ["../x"]', "tcp.users.bob.groups", "group"),
        (f'[tcp.users.bob]\npassword_sha1 = "{sha1("x")}"\nuid = 0', "tcp.users.bob.uid", "unknown key"),
        ("[tcp]\nusers = 1", "tcp.users", "a table of logins"),
        ("[tcp]\nlogin_delay = -1", "tcp.login_delay", "a number >= 0"),
        ("[tcp]\nlogin_delay = 60", "tcp.login_delay", "more than login_delay_max"),
    ],
)
def test_bad_tcp_settings_are_named(tmp_path: Path, text: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load([str(write(tmp_path, text))])
    assert raised.value.details["key"] == key and says in raised.value.message, raised.value.message
    assert raised.value.details["line"] is not None


def test_users_merge_across_drop_ins(tmp_path: Path) -> None:
    write(tmp_path, f'[tcp]\nlisten = 5000\n[tcp.users.bob]\npassword_sha1 = "{sha1("x")}"\n')
    (tmp_path / "jobd.d").mkdir()
    (tmp_path / "jobd.d" / "10-bob.toml").write_text("[tcp.users.bob]\nadmin = true\ngroups = ['ops']\n")
    bob = config.load([str(tmp_path)]).tcp.users["bob"]
    assert (bob.password_sha1, bob.admin, bob.groups) == (sha1("x"), True, frozenset({"ops"}))


def test_docs_describe_every_tcp_key() -> None:
    text = (REPO / "docs" / "config.md").read_text()
    missing = [key for key in config.TCP_KEYS + config.TCP_USER_KEYS if f"`{key}`" not in text]
    assert missing == [] and "printf %s 'secret' \\| sha1sum" in text


def test_over_max_connections_a_tcp_login_is_refused(make_daemon: Any) -> None:
    """A logged-in TCP client takes one of max_connections; one more is challenged (it does not count until it has
    logged in) and its login is answered TOO_MANY_CONNECTIONS, then the connection ends. An admin's login may still
    take one of the places kept for admins."""
    daemon: Daemon = make_daemon('[tcp]\nlisten = "127.0.0.1:0"\n' + USERS, daemon_extra="max_connections = 1")
    address = tcp_address(daemon)  # daemon.call's own connection has ended by now
    with TcpClient(address) as first:
        assert first.login("alice", "wonderland").get("status") == "OK"
        with TcpClient(address) as second:
            assert second.challenge.tag == "auth"
            refusal = second.login("alice", "wonderland")
            assert refusal.tag == "response" and refusal.get("status") == "KO"
            assert refusal.get("error-code") == "TOO_MANY_CONNECTIONS", etree.tostring(refusal)
            assert second.closed()
        with TcpClient(address) as admin:
            assert admin.login("admin", "admin").get("status") == "OK"


def test_a_tcp_login_holds_at_most_max_connections_per_user(make_daemon: Any) -> None:
    """On the TCP listener a user is a login: past `max_connections_per_user` of alice's, her next login is refused
    (naming her login and the key) while places are left for others; the admin login is not limited by it."""
    users = USERS + f'[tcp.users.bob]\npassword_sha1 = "{sha1("builder")}"\n'
    daemon: Daemon = make_daemon(
        '[tcp]\nlisten = "127.0.0.1:0"\n' + users, daemon_extra="max_connections = 10\nmax_connections_per_user = 1"
    )
    address = tcp_address(daemon)
    with TcpClient(address) as first:
        assert first.login("alice", "wonderland").get("status") == "OK"
        with TcpClient(address) as second:
            refusal = second.login("alice", "wonderland")
            assert refusal.get("error-code") == "TOO_MANY_CONNECTIONS", etree.tostring(refusal)
            message = refusal.get("error") or ""
            assert "the login alice holds 1 already" in message and "max_connections_per_user" in message, message
            assert second.closed()
        with TcpClient(address) as bob, TcpClient(address) as admin, TcpClient(address) as admin_again:
            assert bob.login("bob", "builder").get("status") == "OK"
            assert admin.login("admin", "admin").get("status") == "OK"
            assert admin_again.login("admin", "admin").get("status") == "OK"
    with TcpClient(address) as again:  # her place was given back with her connection
        assert again.login("alice", "wonderland").get("status") == "OK"
