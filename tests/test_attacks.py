"""Hostile clients against a real daemon, on both sockets: the attack corpus of tests/attacks/, the connection limit,
clients that stall or never read, names that try to leave their directory, parameters that try to reach a shell.

Every corpus file (tests/attacks/generate.py says how they are named and made) is sent as it is to the API socket and
to the evQueue socket; each must get a clear error with the code its name carries, read no file (a canary's content
never comes back), reach no network (a local HTTP server counts its requests), and leave the daemon answering with
every job accepted before the attacks intact. Reads block on the socket with a deadline: nothing polls or sleeps.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from lxml import etree

from jobd import server
from jobd.client import Client, RemoteError
from jobd.model import ADMIN_CONNECTIONS
from jobd.protocol import jsonrpc
from jobd.protocol.evqueue import XmlFramer
from jobd.server import REFUSED_LINGERING

pytestmark = pytest.mark.timeout(120)

ATTACKS = Path(__file__).resolve().parent / "attacks"
DEADLINE = 10.0  # seconds any one expected answer may take
CONFIG = """
[queue.default]
concurrency = 4

[task.echo]
command = ["/bin/echo"]

[task.envtask]
command = ["/bin/sh", "-c", 'echo "A=$A"']
parameters = "env"
"""


# -- raw connections ---------------------------------------------------------------------------------------------


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.connect(str(path))
    return sock


def _send_all_then_close_writing(sock: socket.socket, data: bytes) -> None:
    # jobd may stop reading at a framing error and close: the rest of the send may break, its answer is still there.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


def _read_to_eof(sock: socket.socket) -> bytes:
    deadline = time.monotonic() + DEADLINE
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"jobd did not close the connection; received: {bytes(received[-300:])!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


def _xml_documents(data: bytes) -> list[etree._Element]:
    return [etree.fromstring(document) for document in XmlFramer().feed(data)]


def _greeted(path: Path) -> tuple[socket.socket, XmlFramer]:
    """An evQueue connection whose `<ready>` greeting has been read."""
    sock = _connect(path)
    framer = XmlFramer()
    documents: list[bytes] = []
    while not documents:
        chunk = sock.recv(1 << 16)
        assert chunk, "closed before the greeting"
        documents += framer.feed(chunk)
    assert etree.fromstring(documents[0]).tag == "ready", documents
    assert len(documents) == 1
    return sock, framer


def _json_answers(data: bytes) -> list[Any]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def _ping_json(path: Path) -> dict[str, Any]:
    with _connect(path) as sock:
        sock.sendall(b'{"jsonrpc":"2.0","id":"alive","method":"ping"}\n')
        sock.shutdown(socket.SHUT_WR)
        answers = _json_answers(_read_to_eof(sock))
    assert len(answers) == 1 and answers[0]["result"]["pong"] is True, answers
    return answers[0]


def _ping_xml(path: Path) -> None:
    sock, _ = _greeted(path)
    with sock:
        _send_all_then_close_writing(sock, b"<ping/>")
        answers = _xml_documents(_read_to_eof(sock))
    assert [(a.tag, a.get("status")) for a in answers] == [("response", "OK")], answers


def _error_codes_json(answer: Any) -> list[str]:
    members = answer if isinstance(answer, list) else [answer]
    assert all("error" in member and "result" not in member for member in members), answer
    return sorted({member["error"]["data"]["code"] for member in members})


# -- the canary file and the HTTP server no request may reach --------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<!ENTITY x 'REMOTE-CANARY'>")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.hits = []
    thread = threading.Thread(
        target=server.serve_forever,  # no-poll-ok: wakes each 0.5 s to see if shutdown() was asked
        daemon=True,
    )
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", _Recorder.hits
    finally:
        server.shutdown()
        server.server_close()


def _corpus(kind: str) -> list[tuple[str, str, Path]]:
    """(name, expected code, path) of each file of tests/attacks/<kind>/."""
    files = []
    for path in sorted((ATTACKS / kind).glob(f"*.{kind}")):
        name, code = path.name.removesuffix(f".{kind}").rsplit(".", 1)
        files.append((name, code, path))
    assert files, f"no attack files under {ATTACKS / kind}"
    return files


def test_the_corpus_is_what_generate_py_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ATTACKS / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for kind, files in (("json", generate.JSON), ("xml", generate.XML)):
        on_disk = {path.name.removesuffix(f".{kind}"): path.read_bytes() for path in (ATTACKS / kind).iterdir()}
        assert on_disk == files, f"tests/attacks/{kind} is stale: run tests/attacks/generate.py"


# -- the attack corpus -----------------------------------------------------------------------------------------


def _attack_api_socket(daemon: Any, data: bytes, kind: str, code: str) -> bytes:
    """Send one attack to the API socket; check the answer; return everything jobd sent."""
    with _connect(daemon.socket_path) as sock:
        _send_all_then_close_writing(sock, data + (b"\n" if kind == "json" else b""))
        received = _read_to_eof(sock)
    if data.lstrip(b" \t\r\n").startswith(b"<"):  # the first byte after any blanks picks evQueue's protocol
        answers = _xml_documents(received)
        assert answers, "no answer"
        _check_xml_answer(answers[0], code)
    else:
        answers = _json_answers(received)
        assert answers, "no answer"
        expected = code if kind == "json" else "INVALID_REQUEST"  # an XML file that does not start with <
        assert _error_codes_json(answers[0]) == [expected], answers[0]
    return received


def _attack_evqueue_socket(daemon: Any, data: bytes, kind: str, code: str) -> bytes:
    sock, _ = _greeted(daemon.evqueue_socket)
    with sock:
        _send_all_then_close_writing(sock, data)
        received = _read_to_eof(sock)
    answers = _xml_documents(received)
    assert answers, "no answer"
    _check_xml_answer(answers[0], code if kind == "xml" else "INVALID_XML")  # JSON is text outside an element
    return received


def _check_xml_answer(answer: etree._Element, code: str) -> None:
    text = etree.tostring(answer)
    assert answer.tag == "response", text
    if code == "OK":
        assert answer.get("status") == "OK", text
    else:
        assert answer.get("status") == "KO" and answer.get("error-code") == code and answer.get("error"), text


def _jobs_before(daemon: Any) -> dict[str, dict[str, Any]]:
    """A finished job, a running one and a delayed one, accepted before any attack."""
    done = daemon.submit(task="echo", args=["before the attacks"])
    daemon.wait(done["id"])
    running = daemon.submit(command=["/bin/sleep", "300"])
    delayed = daemon.submit(command=["/bin/true"], delay=3600)
    return {name: daemon.call("job.get", {"id": job["id"]}) for name, job in
            (("done", done), ("running", running), ("delayed", delayed))}  # fmt: skip


def _check_jobs_intact(daemon: Any, before: dict[str, dict[str, Any]]) -> None:
    for name, job in before.items():
        now = daemon.call("job.get", {"id": job["id"]})
        assert now == job, (name, job, now)
    assert daemon.output(before["done"]["id"]) == "before the attacks\n"
    fresh = daemon.submit(task="echo", args=["after"])
    assert daemon.wait(fresh["id"])["state"] == "succeeded"
    for name in ("running", "delayed"):
        assert daemon.call("job.cancel", {"id": before[name]["id"]})["state"] == "cancelled"


def test_every_attack_is_refused_clearly_on_both_sockets_and_reads_nothing(
    make_daemon: Any, tmp_path: Path, http_server: tuple[str, list[str]]
) -> None:
    address, hits = http_server
    canary = tmp_path / "canary"
    secret = "CANARY-7f3b9c1e-never-to-be-read"
    canary.write_text(secret + "\n")
    daemon = make_daemon(CONFIG)
    before = _jobs_before(daemon)
    failures = []
    for kind in ("json", "xml"):
        for _name, code, path in _corpus(kind):
            data = path.read_bytes().replace(b"@CANARY@", str(canary).encode()).replace(b"@HTTP@", address.encode())
            for attack in (_attack_api_socket, _attack_evqueue_socket):
                try:
                    received = attack(daemon, data, kind, code)
                    assert secret.encode() not in received and b"REMOTE-CANARY" not in received, received[:500]
                    assert b"Traceback" not in received, received[:2000]
                except (AssertionError, OSError, ValueError, etree.XMLSyntaxError) as failure:
                    failures.append(f"{kind}/{path.name} on {attack.__name__}: {failure!r}"[:800])
    assert not failures, "\n".join(failures)
    assert hits == [], f"jobd fetched {hits} from the network"
    assert daemon.running(), daemon.log()
    _ping_json(daemon.socket_path)
    _ping_xml(daemon.evqueue_socket)
    _check_jobs_intact(daemon, before)
    log = daemon.log()
    assert "Traceback" not in log and secret not in log, log[-4000:]


@pytest.mark.parametrize("socket_name", ["socket_path", "evqueue_socket"])
def test_a_request_one_byte_over_a_mebibyte_is_refused_on_both_sockets(make_daemon: Any, socket_name: str) -> None:
    daemon = make_daemon(CONFIG)
    path = getattr(daemon, socket_name)
    if socket_name == "socket_path":
        padding = jsonrpc.MAX_FRAME + 1 - len(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":""}}')
        line = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"x" * padding + b'"}}'
        assert len(line) == jsonrpc.MAX_FRAME + 1
        with _connect(path) as sock:
            _send_all_then_close_writing(sock, line + b"\n")
            answers = _json_answers(_read_to_eof(sock))
        assert [_error_codes_json(answer) for answer in answers] == [["FRAME_TOO_LARGE"]]
    else:
        document = b'<ping comment="' + b"x" * (1024 * 1024 + 1 - len(b'<ping comment=""/>')) + b'"/>'
        assert len(document) == 1024 * 1024 + 1
        sock, _ = _greeted(path)
        with sock:
            _send_all_then_close_writing(sock, document)
            answers = _xml_documents(_read_to_eof(sock))
        assert len(answers) == 1
        _check_xml_answer(answers[0], "FRAME_TOO_LARGE")
    _ping_json(daemon.socket_path)
    _ping_xml(daemon.evqueue_socket)


def test_json_nesting_up_to_the_limit_is_read_and_beyond_it_refused(daemon: Any) -> None:
    # The request object is one level; params another; 62 arrays inside make 64.
    def line(arrays: int) -> bytes:
        return b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + b"[" * arrays + b"]" * arrays + b"}}\n"

    with _connect(daemon.socket_path) as sock:
        _send_all_then_close_writing(sock, line(jsonrpc.MAX_DEPTH - 2) + line(jsonrpc.MAX_DEPTH - 1))
        first, second = _json_answers(_read_to_eof(sock))
    assert _error_codes_json(first) == ["INVALID_PARAMS"]  # read, then refused by ping: no parameter x
    assert _error_codes_json(second) == ["PARSE_ERROR"]
    assert f"more than {jsonrpc.MAX_DEPTH} deep" in second["error"]["message"]


def test_a_number_too_long_to_read_is_refused_in_the_clients_terms(daemon: Any) -> None:
    # Python's own words came back to the client: "... use sys.set_int_max_str_digits() to increase the limit".
    limit = sys.get_int_max_str_digits()
    with _connect(daemon.socket_path) as sock:
        _send_all_then_close_writing(
            sock,
            b'{"jsonrpc":"2.0","id":' + b"9" * limit + b',"method":"ping"}\n'
            + b'{"jsonrpc":"2.0","id":' + b"9" * (limit + 1) + b',"method":"ping"}\n',
        )  # fmt: skip
        read, refused = _json_answers(_read_to_eof(sock))
    assert read["id"] == int("9" * limit) and read["result"]["pong"] is True
    assert refused == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": -32700,
            "message": f"request holds a number of more than {limit} digits, which jobd does not read",
            "data": {"code": "PARSE_ERROR"},
        },
    }


# -- names and parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "parameter"),
    [
        ("job.submit", {"command": ["/bin/true"], "queue": "../default"}, "queue"),
        ("job.submit", {"task": "echo/../echo"}, "task"),
        ("job.submit", {"task": ".."}, "task"),
        ("job.list", {"queue": "a/b"}, "queue"),
        ("job.list", {"task": "x\u0000"}, "task"),
        ("queue.pause", {"name": "."}, "name"),
        ("queue.resume", {"name": "default\n"}, "name"),
        ("workflow.get", {"name": "../../etc/passwd"}, "name"),
        ("instance.launch", {"workflow": "/etc/passwd"}, "workflow"),
        ("instance.list", {"workflow": "x" * 65}, "workflow"),
        ("schedule.enable", {"name": "a b"}, "name"),
        ("schedule.trigger", {"name": "../s"}, "name"),
        ("events.subscribe", {"queues": ["default", "../x"]}, "queues"),
    ],
)
def test_names_from_clients_are_checked_and_the_error_says_what_is_allowed(
    daemon: Any, method: str, params: dict[str, Any], parameter: str
) -> None:
    with daemon.client() as client, pytest.raises(RemoteError) as raised:
        client.call(method, params, timeout=DEADLINE)
    error = raised.value
    assert error.code == "INVALID_PARAMS", error
    assert error.data.get("param") == parameter, error.data
    assert "1 to 64 characters from A-Z a-z 0-9 _ . -" in str(error), error


def test_valid_unusual_names_still_reach_the_lookup(daemon: Any) -> None:
    """A well-formed name that names nothing is an unknown object, not a refused name."""
    with daemon.client() as client:
        for method, params, code in (
            ("job.submit", {"task": "no-such.task_1"}, "UNKNOWN_TASK"),
            ("workflow.get", {"name": "-dash-first"}, "UNKNOWN_WORKFLOW"),
        ):
            with pytest.raises(RemoteError) as raised:
                client.call(method, params, timeout=DEADLINE)
            assert raised.value.code == code, raised.value


def test_parameters_reach_the_program_verbatim_never_a_shell(daemon: Any, tmp_path: Path) -> None:
    marker = tmp_path / "shell-ran"
    hostile = [
        f"$(touch {marker}); rm -rf /",
        f"`touch {marker}`",
        f"; touch {marker}",
        f"| touch {marker}",
        "&& echo pwned",
        "'\"\\",
        "*",
        "-n",
        "--version",
        "a\nb",
        "",
    ]
    # An argv-mode task and an ad-hoc command: both exec() the argv as given.
    job = daemon.submit(command=["/usr/bin/printf", "%s\\0", *hostile])
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert daemon.output(job["id"]).split("\0")[:-1] == hostile
    job = daemon.submit(task="echo", args=hostile)
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert daemon.output(job["id"]) == " ".join(hostile) + "\n"
    # An env-mode task receives the value as the variable's value; its own script quotes it.
    job = daemon.submit(task="envtask", params={"A": hostile[0]})
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert daemon.output(job["id"]) == f"A={hostile[0]} B=\n"  # the fixture's envtask prints A and B
    assert not marker.exists()


# -- the connection limit -------------------------------------------------------------------------------------------


def _pinged(path: Path) -> socket.socket:
    """A connection to the API socket that jobd has answered: it holds one of jobd's places."""
    sock = _connect(path)
    sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
    assert json.loads(sock.recv(1 << 16))["result"]["pong"] is True
    return sock


def test_clients_over_max_connections_are_refused_clearly_on_both_sockets(make_daemon: Any) -> None:
    daemon = make_daemon(CONFIG, daemon_extra="max_connections = 4")
    with contextlib.ExitStack() as held:
        # Four clients, two per socket, each known to the daemon (it answered them).
        for _ in range(2):
            held.enter_context(_pinged(daemon.socket_path))
            evq, _ = _greeted(daemon.evqueue_socket)
            held.enter_context(evq)
        # This test runs as root, an admin, who may take the places kept for admins too: they go the same way.
        for _ in range(ADMIN_CONNECTIONS):
            held.enter_context(_pinged(daemon.socket_path))
        # The next, on the API socket: a JSON-RPC error at once, before it says anything, then the end.
        with _connect(daemon.socket_path) as sock:
            answers = _json_answers(_read_to_eof(sock))
        assert len(answers) == 1 and _error_codes_json(answers[0]) == ["TOO_MANY_CONNECTIONS"], answers
        assert answers[0]["id"] is None and answers[0]["error"]["data"]["limit"] == 4
        assert "max_connections" in answers[0]["error"]["message"]
        # On the evQueue socket: a KO response where the greeting would be, then the end.
        with _connect(daemon.evqueue_socket) as sock:
            answers_xml = _xml_documents(_read_to_eof(sock))
        assert len(answers_xml) == 1
        _check_xml_answer(answers_xml[0], "TOO_MANY_CONNECTIONS")
        # A client that spoke before reading is refused the same way (its request is not served).
        with _connect(daemon.socket_path) as sock:
            _send_all_then_close_writing(sock, b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
            answers = _json_answers(_read_to_eof(sock))
        assert [_error_codes_json(answer) for answer in answers] == [["TOO_MANY_CONNECTIONS"]]
        # jobd's own client reports it as an error naming the limit.
        with Client(str(daemon.socket_path)) as client, pytest.raises(RemoteError) as raised:
            client.call("ping", timeout=DEADLINE)
        assert raised.value.code == "TOO_MANY_CONNECTIONS"
        held.close()  # (leaving the block would do it too): they all leave
    # Their slots are free again: the connections that count are the ones jobd still has.
    _ping_json(daemon.socket_path)
    _ping_xml(daemon.evqueue_socket)


def test_a_burst_of_refused_clients_does_not_take_jobds_descriptors(make_daemon: Any) -> None:
    # Each refused client lingered 5 s, holding a descriptor, however many there were: a burst (a web server's
    # workers connecting at once) refused faster than that ran jobd out of descriptors, and then it accepted no
    # client, opened no job's output file and started no job. At most server.REFUSED_LINGERING linger now.
    daemon = make_daemon(CONFIG, daemon_extra="max_connections = 1")
    with contextlib.ExitStack() as held:
        first = held.enter_context(_pinged(daemon.socket_path))
        for _ in range(ADMIN_CONNECTIONS):  # root's places kept for admins, taken too
            held.enter_context(_pinged(daemon.socket_path))
        before = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        for number in range(400):  # each told at once, and its connection kept open by the client
            sock = held.enter_context(_connect(daemon.socket_path if number % 2 else daemon.evqueue_socket))
            assert b"TOO_MANY_CONNECTIONS" in sock.recv(1 << 16)
        # The last few may still be closing (their refusal written, their close in jobd's next turn).
        held_by_jobd = len(os.listdir(f"/proc/{daemon.pid}/fd")) - before
        assert held_by_jobd <= REFUSED_LINGERING + 8, f"jobd holds {held_by_jobd} descriptors for 400 refused clients"
        # The client that was accepted is served as before.
        first.sendall(b'{"jsonrpc":"2.0","id":2,"method":"ping"}\n')
        assert json.loads(first.recv(1 << 16))["result"]["pong"] is True


# -- slow clients ----------------------------------------------------------------------------------------------------


def test_stalled_and_non_reading_clients_slow_nobody_down(make_daemon: Any) -> None:
    daemon = make_daemon(CONFIG)
    big = daemon.submit(command=["/usr/bin/head", "-c", str(1 << 20), "/dev/zero"])
    assert daemon.wait(big["id"])["state"] == "succeeded"
    with contextlib.ExitStack() as held:
        # 50 clients that sent half a request and stall, on both sockets.
        stalled_json: list[socket.socket] = []
        stalled_xml: list[socket.socket] = []
        for number in range(50):
            if number % 2:
                sock = held.enter_context(_connect(daemon.socket_path))
                sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"pi')
                stalled_json.append(sock)
            else:
                sock, _ = _greeted(daemon.evqueue_socket)
                held.enter_context(sock)
                sock.sendall(b'<status action="query" type="sched')
                stalled_xml.append(sock)
        # A client that asks for 1 MiB answers (about 6 MiB each as JSON) and reads none: jobd stops reading it
        # once MAX_UNSENT bytes wait for it, so its requests fill the socket and the send blocks.
        hog = held.enter_context(_connect(daemon.socket_path))
        hog.settimeout(2.0)
        request = json.dumps(
            {"jsonrpc": "2.0", "id": "x" * 4000, "method": "job.output", "params": {"id": big["id"], "limit": 1 << 20}}
        ).encode()
        sent = 0
        with pytest.raises(TimeoutError):
            while sent < 1 << 30:  # a bound, so a jobd that never stops reading fails the test instead of hanging
                hog.sendall(request + b"\n")
                sent += 1
        # An XML client that pipelines requests and reads no answer.
        xml_hog, _ = _greeted(daemon.evqueue_socket)
        held.enter_context(xml_hog)
        xml_hog.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                xml_hog.send(b'<status action="query" type="configuration"/>' * 100)
        # Everybody else is served at once.
        started = time.monotonic()
        _ping_json(daemon.socket_path)
        _ping_xml(daemon.evqueue_socket)
        job = daemon.submit(task="echo", args=["served"])
        assert daemon.wait(job["id"], timeout=DEADLINE)["state"] == "succeeded"
        assert daemon.output(job["id"]) == "served\n"
        assert time.monotonic() - started < DEADLINE
        # jobd holds a bounded amount for the hog: MAX_UNSENT and about one answer, not one per request it sent.
        rss_kib = next(
            int(line.split()[1]) for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )  # fmt: skip
        assert rss_kib < 400 * 1024, f"jobd holds {rss_kib} KiB for {sent} unread requests"
        # The stalled ones can still finish their requests.
        _send_all_then_close_writing(stalled_json[0], b'ng"}\n')
        assert _json_answers(_read_to_eof(stalled_json[0]))[0]["result"]["pong"] is True
        _send_all_then_close_writing(stalled_xml[0], b'uler"/>')
        answers = _xml_documents(_read_to_eof(stalled_xml[0]))
        assert [answer.get("status") for answer in answers] == ["OK"], answers
    _ping_json(daemon.socket_path)
    assert daemon.running()


def _status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM), in KiB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1])


def test_the_ids_and_names_one_connections_subscriptions_select_are_bounded(daemon: Any) -> None:
    # A subscription's line may name 150,000 job ids; 64 subscriptions of 120,000 each grew jobd by 500 MB.
    peak_before = _status_kib(daemon.pid, "VmHWM")
    many = {"jobs": list(range(1_000_000, 1_120_000))}  # a line of 960 KB
    with Client(str(daemon.socket_path)) as client:
        for _ in range(64):
            with pytest.raises(RemoteError) as refused:
                client.call("events.subscribe", many)
            assert refused.value.code == "INVALID_PARAMS" and refused.value.data["limit"] == server.MAX_SELECTED
        assert "at most 10000 may be selected on one connection" in refused.value.message
    assert _status_kib(daemon.pid, "VmHWM") - peak_before < 64 * 1024  # KiB: without the bound, 500 MB

    with Client(str(daemon.socket_path)) as client:  # up to the bound, in any number of subscriptions
        client.call("events.subscribe", {"jobs": list(range(1, 5001)), "queues": ["default"]})
        client.call("events.subscribe", {"instances": list(range(1, 4999)), "workflows": ["w"]})
        with pytest.raises(RemoteError) as refused:
            client.call("events.subscribe", {"jobs": [5001]})
        assert refused.value.code == "INVALID_PARAMS", refused.value
        client.call("events.subscribe", {"types": ["job.state"]})  # selecting nothing more: every job
        job = client.call("job.submit", {"task": "echo"})
        event = client.next_event(timeout=DEADLINE)  # the first subscription selects it too
        assert event["type"] == "job.state" and event["job"]["id"] == job["id"], event


def _ids_made_while_a_client_pipelines(daemon: Any, pipelined: bytes, socket_path: Path, other: bytes) -> bytes:
    """What jobd answers `other`, sent on a second connection right after `pipelined` (many requests in one write)
    on a first one on `socket_path`, both written while jobd is stopped (SIGSTOP): it wakes to both at once, the
    pipeline's first (the kernel reports ready sockets in the order their data came), and answers both to the end."""
    first = _connect(socket_path)
    second = _connect(daemon.socket_path)
    with first, second:
        # Answered: jobd has taken both connections. The second first: the socket jobd last read from may stay at
        # the head of the kernel's ready list (level-triggered epoll lists it again), until jobd next waits.
        _ping_on(second)
        if socket_path == daemon.evqueue_socket:
            _xml_ping_on(first)
        else:
            _ping_on(first)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            first.sendall(pipelined)
            first.shutdown(socket.SHUT_WR)
            second.sendall(other)
            second.shutdown(socket.SHUT_WR)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        answer = _read_to_eof(second)
        _read_to_eof(first)
    return answer


def _xml_ping_on(sock: socket.socket) -> None:
    """Read the greeting, then have a `<ping/>` answered."""
    framer = XmlFramer()
    documents: list[bytes] = []
    while not documents:  # the greeting may come in pieces: read until its document is whole
        documents += framer.feed(sock.recv(4096))
    sock.sendall(b"<ping/>")
    while len(documents) < 2:
        documents += framer.feed(sock.recv(4096))
    assert b'status="OK"' in documents[1], documents


def _ping_on(sock: socket.socket) -> None:
    sock.sendall(b'{"jsonrpc":"2.0","id":"alive","method":"ping"}\n')
    assert b'"pong":true' in sock.recv(4096)


def test_a_client_pipelining_many_json_requests_lets_others_be_answered_meanwhile(make_daemon: Any) -> None:
    # A read brings up to 256 KiB of requests; all of them were answered in one callback, nobody else meanwhile:
    # 87,000 lines `{}` stopped jobd for 0.6 s, and a client could send such reads without end. Submits show the
    # order: jobd numbers jobs as it takes them.
    daemon = make_daemon(CONFIG)
    submit = {"jsonrpc": "2.0", "method": "job.submit", "params": {"task": "echo", "delay": 86400}}
    pipelined = b"".join(json.dumps({**submit, "id": number}).encode() + b"\n" for number in range(1000))
    other = json.dumps({**submit, "id": "other", "params": {**submit["params"], "context": "other"}}).encode() + b"\n"
    (answer,) = _json_answers(_ids_made_while_a_client_pipelines(daemon, pipelined, daemon.socket_path, other))
    ids = [job["id"] for job in daemon.call("job.list", {"limit": 1000})["jobs"]]  # the newest 1000 of 1001
    first = min(ids) - 1
    assert len(ids) == 1000 and max(ids) == first + 1000
    # Taken after the pipeline's first turn of requests, long before its last (without turns: after all of them,
    # and in a read of its own, it was answered only after them).
    assert first < answer["result"]["id"] < max(ids), (answer, first)  # not after the whole pipeline
    assert answer["result"]["id"] <= first + 2 * server.REQUESTS_PER_TURN, (answer, first)  # in its first turns


def test_a_client_pipelining_many_evqueue_requests_lets_others_be_answered_meanwhile(make_daemon: Any) -> None:
    # As above, on the evQueue protocol: 65,000 documents `<x/>` in one read stopped jobd for 2 to 5 s.
    daemon = make_daemon(CONFIG + "\n[queue.held]\nconcurrency = 1\n", start=False)
    daemon.write_workflows(
        held="<workflow><subjobs><job><tasks><task path='/bin/true' queue='held'/></tasks></job></subjobs></workflow>"
    )
    daemon.start()
    daemon.call("queue.pause", {"name": "held"})  # the instances' tasks wait: only the launches count
    pipelined = b'<instance action="launch" name="held"/>' * 1000
    other = b'{"jsonrpc":"2.0","id":"other","method":"instance.launch","params":{"workflow":"held"}}\n'
    (answer,) = _json_answers(_ids_made_while_a_client_pipelines(daemon, pipelined, daemon.evqueue_socket, other))
    ids = [instance["id"] for instance in daemon.call("instance.list", {"limit": 1000})["instances"]]
    first = min(ids) - 1  # the newest 1000 of 1001
    assert len(ids) == 1000 and max(ids) == first + 1000
    assert first < answer["result"]["id"] < max(ids), (answer, first)  # not after the whole pipeline
    assert answer["result"]["id"] <= first + 2 * server.REQUESTS_PER_TURN, (answer, first)  # in its first turns


SO_SNDBUFFORCE = 32  # Linux's <asm-generic/socket.h>; Python's socket module does not name it


@pytest.mark.parametrize("writes", ["one", "many"])
def test_evqueue_requests_read_behind_a_waiting_one_are_cut_out_a_turn_at_a_time(make_daemon: Any, writes: str) -> None:
    # The framer cut a whole read into documents at once: 65,000 documents `<x/>` in one read of 256 KiB held every
    # other client up for a third of a second. Behind a request that waits, the documents cut were kept until it was
    # answered, up to 4 MiB of them (MAX_UNSENT): a million objects, 60 MB of jobd's memory for 4 MiB sent, whether
    # in one write or in many small ones. Now the framer cuts no more than REQUESTS_PER_TURN documents ahead of
    # those answered, and jobd reads no more of the connection until they are.
    daemon = make_daemon(CONFIG + "\n[queue.held]\nconcurrency = 1\n", start=False)
    daemon.write_workflows(
        held="<workflow><subjobs><job><tasks><task path='/bin/true' queue='held'/></tasks></job></subjobs></workflow>"
    )
    daemon.start()
    daemon.call("queue.pause", {"name": "held"})  # the synchronous launch waits until the queue resumes
    small = b"<x/>" * (server.REQUESTS_PER_TURN - 1)  # each write is less than a turn's worth
    flood = b"<x/>" * (server.MAX_UNSENT // 4) if writes == "one" else small * 10000
    sock, _ = _greeted(daemon.evqueue_socket)
    with sock, _connect(daemon.socket_path) as other:
        # The kernel takes all that is written at once (root may raise its socket's buffer past the usual maximum):
        # what jobd reads of it is up to jobd, not to how fast the test writes.
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 256 * 1024 * 1024)  # small writes take 1 KiB each
        peak_before = _status_kib(daemon.pid, "VmHWM")
        sock.sendall(b'<instance action="launch" name="held" mode="synchronous"/>')
        _ping_on(other)
        _ping_on(other)  # the launch is read (see below), alone, and waits
        # jobd reads at most 256 KiB of a connection in a turn of its loop, in every turn while it reads it at all
        # (the kernel lists a socket with data as ready each time jobd asks). A round trip on another connection ends
        # in a turn, the next one's answer in a later one: the turn of the first has read what was written before it.
        if writes == "one":
            sock.sendall(flood)
            for _ in range(2 * len(flood) // (256 * 1024)):
                _ping_on(other)
        else:  # and read alone, each write: in one read, two would be more than a turn's worth
            for _ in range(len(flood) // len(small)):
                sock.sendall(small)
                _ping_on(other)
                _ping_on(other)
        grown = _status_kib(daemon.pid, "VmHWM") - peak_before
    assert grown < 16 * 1024, grown  # KiB: cut all at once, 60 MB
    _ping_xml(daemon.evqueue_socket)


def test_evqueue_requests_cut_out_over_many_turns_keep_their_order_and_framing_errors(daemon: Any) -> None:
    # More requests in one write than are cut out in a turn (REQUESTS_PER_TURN): answered in order, then a framing
    # error after them, or a request the end of file cut short, as when they all came in one turn.
    count = 5 * server.REQUESTS_PER_TURN + 1
    requests = b"".join(b'<ping comment="%d"/>' % number for number in range(count))
    for tail, code in ((b"stray text", "INVALID_XML"), (b"<ping", "INVALID_XML"), (b"", None)):
        sock, _ = _greeted(daemon.evqueue_socket)
        with sock:
            _send_all_then_close_writing(sock, requests + tail)
            answers = _xml_documents(_read_to_eof(sock))
        assert len(answers) == count + (code is not None), (tail, len(answers))
        for answer in answers[:count]:
            _check_xml_answer(answer, "OK")
        if code is not None:
            _check_xml_answer(answers[-1], code)
    _ping_json(daemon.socket_path)


@pytest.mark.parametrize("method", ["job.get", "job.output"])
def test_a_batch_is_answered_up_to_4_mib_and_its_other_members_refused_unrun(make_daemon: Any, method: str) -> None:
    # A line of 1,000 job.gets of a job with a 400 KB command (70 KB sent) was answered in 400 MB, made whole at once
    # (jobd's peak grew by a gigabyte, its loop stopped for seconds meanwhile); a line of job.outputs of a MiB of
    # NULs (each sent as six bytes, \u0000), in as much. A few such clients had jobd killed for want of memory.
    daemon = make_daemon(CONFIG)
    if method == "job.get":
        # Four arguments of 100 KB: Linux takes none longer than 128 KiB (job.submit refuses them).
        big = daemon.submit(command=["/bin/true", *["x" * 100_000] * 4], delay=86400)  # never runs: only read
        params: dict[str, Any] = {"id": big["id"]}
    else:
        big = daemon.submit(command=["/usr/bin/head", "-c", str(1 << 20), "/dev/zero"])
        assert daemon.wait(big["id"])["state"] == "succeeded"
        params = {"id": big["id"], "limit": 1 << 20}
    peak_before = _status_kib(daemon.pid, "VmHWM")
    members = 1000 if method == "job.get" else 256  # job.output waits for its read: at most 256 in a batch
    batch = [{"jsonrpc": "2.0", "id": number, "method": method, "params": params} for number in range(members)]
    with _connect(daemon.socket_path) as sock:
        _send_all_then_close_writing(sock, json.dumps(batch).encode() + b"\n")
        answer = _read_to_eof(sock)
    replies = json.loads(answer)
    assert [reply["id"] for reply in replies] == [member["id"] for member in batch]
    answered = [reply for reply in replies if "result" in reply]
    refused = [reply for reply in replies if "error" in reply]
    # Members are answered until the answer holds 4 MiB; the member that passes it is answered whole.
    assert 1 <= len(answered) <= 4 * 1024 * 1024 // 400_000 + 1, len(answered)
    assert replies[: len(answered)] == answered
    assert {(reply["error"]["data"]["code"], reply["error"]["data"]["limit"]) for reply in refused} == {
        ("INVALID_REQUEST", 4 * 1024 * 1024)
    }
    assert "ask for the rest in another request" in refused[0]["error"]["message"]
    assert len(answer) < 4 * 1024 * 1024 + 8 * 1024 * 1024  # 4 MiB, a member's reply, and the refusals
    assert _status_kib(daemon.pid, "VmHWM") - peak_before < 64 * 1024  # KiB: without the cap, over a gigabyte
    _ping_json(daemon.socket_path)


def test_members_of_a_batch_past_its_4_mib_are_not_run(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/true", *["x" * 100_000] * 4], delay=86400)  # 400 KB; never runs: only read
    read = {"jsonrpc": "2.0", "id": "read", "method": "job.get", "params": {"id": job["id"]}}
    submit = {"jsonrpc": "2.0", "id": "submit", "method": "job.submit", "params": {"task": "echo"}}
    notified = {"jsonrpc": "2.0", "method": "job.submit", "params": {"task": "echo"}}  # a notification: no answer
    with _connect(daemon.socket_path) as sock:
        _send_all_then_close_writing(sock, json.dumps([read] * 11 + [submit, notified]).encode() + b"\n")
        replies = json.loads(_read_to_eof(sock))
    assert ["result" in reply for reply in replies] == [True] * 11 + [False]
    assert replies[-1]["id"] == "submit" and replies[-1]["error"]["data"]["code"] == "INVALID_REQUEST"
    assert [found["id"] for found in daemon.call("job.list")["jobs"]] == [job["id"]]  # neither submit was run


def test_a_batch_of_more_members_than_allowed_is_refused_whole_in_one_short_answer(daemon: Any) -> None:
    # A line of 524,288 members of two bytes (`1,`) was answered in 126 MB of refusals, one per member, made whole
    # before a byte was sent: jobd's peak memory grew by 700 MB and it answered nobody else for seconds.
    peak_before = _status_kib(daemon.pid, "VmHWM")
    members = (jsonrpc.MAX_FRAME - 2) // 2
    with _connect(daemon.socket_path) as sock:
        _send_all_then_close_writing(sock, b"[" + b",".join([b"1"] * members) + b"]\n")
        (answer,) = _json_answers(_read_to_eof(sock))
    assert answer["id"] is None and answer["error"]["data"] == {"code": "INVALID_REQUEST", "limit": jsonrpc.MAX_BATCH}
    assert f"at most {jsonrpc.MAX_BATCH} requests, this one {members}" in answer["error"]["message"]
    assert _status_kib(daemon.pid, "VmHWM") - peak_before < 64 * 1024  # KiB: without the cap, 700 MB

    submit = {"jsonrpc": "2.0", "id": "submit", "method": "job.submit", "params": {"task": "echo"}}
    ping = {"jsonrpc": "2.0", "id": 0, "method": "ping"}
    with _connect(daemon.socket_path) as sock:  # one member too many: none is run, the submit neither
        _send_all_then_close_writing(sock, json.dumps([submit] + [ping] * jsonrpc.MAX_BATCH).encode() + b"\n")
        (answer,) = _json_answers(_read_to_eof(sock))
    assert answer["error"]["data"] == {"code": "INVALID_REQUEST", "limit": jsonrpc.MAX_BATCH}
    assert daemon.call("job.list")["jobs"] == []
    with _connect(daemon.socket_path) as sock:  # as many as allowed: each is answered
        _send_all_then_close_writing(sock, json.dumps([ping] * jsonrpc.MAX_BATCH).encode() + b"\n")
        (answer,) = _json_answers(_read_to_eof(sock))
    assert [reply["result"]["pong"] for reply in answer] == [True] * jsonrpc.MAX_BATCH


def test_answers_made_while_a_client_reads_nothing_wait_for_it_unmade(make_daemon: Any, tmp_path: Path) -> None:
    # A client that asked for a job's output as it comes (job.output with wait), many times, and read nothing: when
    # the job wrote, every waiting request read what it wrote and wrote its answer at once, past the 4 MiB that
    # stops jobd reading a client's requests (100 MB for one client in a soak test; 256 clients could take 25 GB).
    # Now what a wait wakes for is read once the client reads again, and an answer made meanwhile waits unencoded.
    daemon = make_daemon(CONFIG)
    zeros = daemon.submit(command=["/usr/bin/head", "-c", str(1 << 20), "/dev/zero"])  # answered in 6 MiB of \u0000
    assert daemon.wait(zeros["id"])["state"] == "succeeded"
    go, written = tmp_path / "go", tmp_path / "written"
    os.mkfifo(go)
    os.mkfifo(written)
    # The job writes a line (its output file is made), then, when told, a MiB of NULs into its stdout pipe in one
    # write: its pipe is made large enough to take them while jobd is stopped, so that they come to jobd at once.
    program = (
        "import fcntl, os, sys\n"
        "fcntl.fcntl(1, 1031, 1 << 20)\n"  # F_SETPIPE_SZ
        "os.write(1, b'x\\n')\n"
        f"open({str(go)!r}).read()\n"
        "os.write(1, bytes((1 << 20) - 4096))\n"
        f"open({str(written)!r}, 'w').close()\n"
    )
    writer = daemon.submit(command=[sys.executable, "-c", program])
    followers = 64
    with daemon.client() as client, _connect(daemon.socket_path) as hog:
        first = client.call("job.output", {"id": writer["id"], "wait": True}, timeout=DEADLINE)
        assert first["data"] == "x\n"  # running, its file made
        follow = {"id": writer["id"], "offset": 2, "limit": 1 << 20, "encoding": "base64", "wait": True}
        hog.sendall(b"".join(
            jsonrpc.encode({"jsonrpc": "2.0", "id": number, "method": "job.output", "params": follow})
            for number in range(followers)
        ))  # fmt: skip
        client.call("ping")
        client.call("ping")  # two turns of jobd's loop: the hog's requests are read and waiting
        hog.sendall(jsonrpc.encode({"jsonrpc": "2.0", "id": "zeros", "method": "job.output",
                                    "params": {"id": zeros["id"], "limit": 1 << 20}}))  # fmt: skip
        client.call("ping")
        client.call("ping")  # answered: 6 MiB unsent, past 4 MiB, so jobd waits for the hog to read
        resident = _status_kib(daemon.pid, "VmRSS")
        os.kill(daemon.pid, signal.SIGSTOP)  # the job writes its MiB while jobd cannot read any of it
        try:
            with open(go, "w") as release:
                release.write("go\n")
            with open(written) as done:
                done.read()
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert client.call("job.wait", {"id": writer["id"], "timeout": 60}, timeout=70)["state"] == "succeeded"
        client.call("ping")
        client.call("ping")  # every follower has been woken
        # Without waiting for the client, each of the 64 answers held the MiB it read, and wrote it: over 85 MB.
        assert _status_kib(daemon.pid, "VmRSS") - resident < 32 * 1024, "jobd holds what the hog does not read"
        # Nothing is lost: once the hog reads, every answer comes, each with what the job wrote.
        hog.shutdown(socket.SHUT_WR)
        lines = _read_to_eof_lines(hog)
    assert len(lines) == followers + 1
    assert sorted(line[: line.index(b',"result"')] for line in lines) == sorted(
        b'{"jsonrpc":"2.0","id":' + json.dumps(number).encode() for number in [*range(followers), "zeros"]
    )
    assert all(line.count(b"AAAA" if b'"id":"zeros"' not in line else b"\\u0000") > 1000 for line in lines)
    _ping_json(daemon.socket_path)


def test_requests_held_while_a_client_reads_nothing_run_one_by_one_when_it_reads(make_daemon: Any) -> None:
    # Requests read before a client stopped reading wait to run until it reads again. Its reading woke them all at
    # once, and each wrote its answer: 200 job.outputs of a MiB of NULs (6 MiB each) took 1.2 GB of jobd's memory
    # as soon as the client had read 8 MiB (here 64 of a MiB in base64: 85 MB).
    daemon = make_daemon(CONFIG)
    zeros = daemon.submit(command=["/usr/bin/head", "-c", str(1 << 20), "/dev/zero"])
    assert daemon.wait(zeros["id"])["state"] == "succeeded"
    requests = 64
    with daemon.client() as client, _connect(daemon.socket_path) as hog:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.sendall(b"".join(
            jsonrpc.encode({"jsonrpc": "2.0", "id": number, "method": "job.output",
                            "params": {"id": zeros["id"], "limit": 1 << 20, "encoding": "base64"}})
            for number in range(requests)
        ))  # fmt: skip
        client.call("ping")
        client.call("ping")  # two turns of jobd's loop: all read, the first answered, the others held
        resident = _status_kib(daemon.pid, "VmRSS")
        received = bytearray()
        while len(received) < 8 << 20:  # a little of what waits: jobd sees the client read again
            received += hog.recv(1 << 20)
        client.call("ping")
        client.call("ping")
        assert _status_kib(daemon.pid, "VmRSS") - resident < 32 * 1024, "the held requests ran all at once"
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        hog.shutdown(socket.SHUT_WR)
        lines = _read_to_eof_lines(hog, bytes(received))
    ids = [int(match[1]) for line in lines if (match := re.match(rb'\{"jsonrpc":"2.0","id":(\d+),"result"', line))]
    assert len(lines) == requests and sorted(ids) == list(range(requests)), ids  # every request is answered
    _ping_json(daemon.socket_path)


def _read_to_eof_lines(sock: socket.socket, start: bytes = b"") -> list[bytes]:
    """The lines a client reads to the end of file, after `start` it read before: each a whole answer, kept as it
    came (no JSON decoded)."""
    sock.settimeout(DEADLINE)
    pending = bytearray(start)
    lines: list[bytes] = []
    while chunk := sock.recv(1 << 20):
        pending += chunk
        end = pending.rfind(b"\n") + 1
        lines += bytes(pending[:end]).splitlines()
        del pending[:end]
    assert not pending
    return lines
