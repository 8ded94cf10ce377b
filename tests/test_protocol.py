"""The JSON-RPC 2.0 socket as a client sees it: framing, errors, batches, pipelining, notifications and events.

Everything goes through the daemon's real Unix socket. Where the bytes on the wire matter (framing, malformed
input, several requests in one write) the tests use a raw AF_UNIX socket; every read blocks on the socket with a
deadline, so a missing answer fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from harness import _child_of
from recovery.support import wait_for_log

from jobd.client import Client, RemoteError, Reply
from jobd.model import MAX_PAGE_TEXT
from jobd.protocol.jsonrpc import MAX_FRAME
from jobd.server import MAX_WAITING, REQUESTS_PER_TURN

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0  # seconds a single expected answer may take before the test fails

# The methods docs/protocol.md documents; METHOD_NOT_FOUND's data.allowed must offer them all.
DOCUMENTED_METHODS = {
    "ping",
    "job.submit",
    "job.get",
    "job.list",
    "job.output",
    "job.wait",
    "job.cancel",
    "queue.list",
    "queue.pause",
    "queue.resume",
    "daemon.status",
    "daemon.reload",
    "events.subscribe",
}

STATE_ORDER = ["delayed", "queued", "running", "succeeded", "failed", "timed_out", "cancelled"]
FINISHED = {"succeeded", "failed", "timed_out", "cancelled"}


class Closed(Exception):
    """The daemon closed the connection before a full line arrived."""


class Raw:
    """A raw connection: bytes out as given, lines in as they come, each read bounded by a deadline."""

    def __init__(self, path: Any) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = bytearray()
        self.received = bytearray()  # everything the daemon ever sent on this connection
        self.eof = False

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(DEADLINE)
        self.sock.sendall(data)

    def send_json(self, message: Any) -> None:
        self.send(json.dumps(message).encode() + b"\n")

    def request(self, method: str, params: Any = None, request_id: Any = 1) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send_json(message)

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete line from jobd; got so far: {bytes(self.buffer[:300])!r}")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            raise Closed(f"jobd closed the connection; unfinished: {bytes(self.buffer[:300])!r}")
        self.buffer += chunk
        self.received += chunk
        assert b"Traceback" not in self.received, bytes(self.received[-2000:])

    def line(self, timeout: float = DEADLINE) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line
            self._fill(deadline)

    def message(self, timeout: float = DEADLINE) -> Any:
        return json.loads(self.line(timeout))

    def reply(self, request_id: Any, timeout: float = DEADLINE) -> tuple[dict[str, Any], list[Any]]:
        """The reply with `request_id`, and the messages that came before it."""
        deadline = time.monotonic() + timeout
        before: list[Any] = []
        while True:
            message = self.message(max(0.0, deadline - time.monotonic()))
            if isinstance(message, dict) and message.get("id") == request_id and "method" not in message:
                return message, before
            before.append(message)

    def event(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """The params of the next `event` notification; replies in between are an error."""
        message = self.message(timeout)
        assert message.get("method") == "event" and "id" not in message, message
        params: dict[str, Any] = message["params"]
        return params

    def read_to_eof(self, timeout: float = DEADLINE) -> bytes:
        """Everything until the daemon closes the connection (fails if it does not within the deadline)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._fill(deadline)
        except Closed:
            pass
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest


def ping_line(request_id: Any = "after") -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "ping"}).encode() + b"\n"


def assert_pong(reply: dict[str, Any], request_id: Any) -> None:
    assert reply.get("jsonrpc") == "2.0", reply
    assert reply.get("id") == request_id, reply
    assert reply.get("result", {}).get("pong") is True, reply


def assert_alive(daemon: Any) -> None:
    """The daemon process still runs and answers a ping on a new connection."""
    assert daemon.running(), daemon.log()
    with Raw(daemon.socket_path) as raw:
        raw.send(ping_line("alive"))
        reply, before = raw.reply("alive")
        assert_pong(reply, "alive")
        assert before == []


def error_of(reply: dict[str, Any]) -> dict[str, Any]:
    assert "result" not in reply, reply
    error: dict[str, Any] = reply["error"]
    assert isinstance(error.get("code"), int) and isinstance(error.get("message"), str), reply
    assert isinstance(error.get("data"), dict), reply
    return error


def exchange(daemon: Any, line: bytes) -> dict[str, Any] | None:
    """Sends `line`, then a ping, then closes the write side; returns the answer to `line` (None if there was
    none) after checking that the ping on the same connection was answered too.

    jobd answers everything a client asked before it closed its side, then closes the connection: reading to
    the end collects every answer, whatever their order, without guessing how long a missing one might take.
    """
    with Raw(daemon.socket_path) as raw:
        raw.send(line + b"\n" + ping_line("after"))
        raw.sock.shutdown(socket.SHUT_WR)
        answers = []
        while True:
            try:
                answers.append(raw.message())
            except Closed:
                assert raw.buffer == b"", bytes(raw.buffer[:300])
                break
    pongs = [a for a in answers if isinstance(a, dict) and a.get("id") == "after" and "result" in a]
    assert len(pongs) == 1, answers
    assert_pong(pongs[0], "after")
    others = [a for a in answers if a is not pongs[0]]
    assert len(others) <= 1, others
    return others[0] if others else None


def check_cases(daemon: Any, cases: list[tuple[bytes, str]], expected_id: Any = None) -> None:
    """Each line gets an error with its data.code and the connection answers a ping after it; all the cases
    are tried and every failing one is reported."""
    failures = []
    for line, code in cases:
        try:
            answer = exchange(daemon, line)
            assert answer is not None, "no answer"
            assert error_of(answer)["data"]["code"] == code, answer
            if expected_id != "any":
                assert answer["id"] == expected_id, answer
        except AssertionError as failure:
            failures.append(f"{line[:120]!r}: {failure}")
    assert not failures, "\n".join(failures)


def job_count(daemon: Any) -> int:
    return len(daemon.call("job.list", {"limit": 1000})["jobs"])


def no_traceback_in_log(daemon: Any) -> None:
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]


# -- malformed input --------------------------------------------------------------------------------------------


MALFORMED_JSON = [
    b'{"jsonrpc": "2.0", "id": 1, "method": "ping"',  # cut short
    b"{not json at all}",
    b'{"jsonrpc":"2.0","id":1,"method":"ping"} trailing',
    b'{"jsonrpc":"2.0","id":1,"method":"ping",}',
    b"{'jsonrpc':'2.0','id':1,'method':'ping'}",
    b'{"jsonrpc":"2.0","id":1,"method":"ping"}{"jsonrpc":"2.0","id":2,"method":"ping"}',
]

INVALID_UTF8 = [
    b'{"jsonrpc":"2.0","id":1,"method":"p\xffing"}',  # a byte that never occurs in UTF-8
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xc3"}}',  # a sequence cut short
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xc0\xaf"}}',  # overlong encoding of '/'
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xed\xa0\x80"}}',  # a UTF-16 surrogate, raw
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xf4\x90\x80\x80"}}',  # beyond U+10FFFF
]

NUMBER_CONSTANTS = [
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + constant + b"}}"
    for constant in (b"NaN", b"Infinity", b"-Infinity")
]


def test_malformed_json_is_a_parse_error_and_the_connection_goes_on(daemon: Any) -> None:
    check_cases(daemon, [(line, "PARSE_ERROR") for line in MALFORMED_JSON])
    assert_alive(daemon)


def test_invalid_utf8_is_a_parse_error(daemon: Any) -> None:
    check_cases(daemon, [(line, "PARSE_ERROR") for line in INVALID_UTF8])
    assert_alive(daemon)


def test_non_json_number_constants_are_parse_errors(daemon: Any) -> None:
    check_cases(daemon, [(line, "PARSE_ERROR") for line in NUMBER_CONSTANTS])


def test_a_name_given_twice_in_one_object_is_refused_with_the_id_and_nothing_is_done(daemon: Any) -> None:
    """JSON keeps the last of two members of one name and drops the first without a word (Python's json and
    JavaScript's JSON.parse alike): `{"id": 1, "id": 2}` would act on the job the client's own code may have read as
    the other one. jobd refuses the request, naming the name, with its id when it has one id (a pipelining client
    matches the refusal to its request): INVALID_PARAMS for the params, INVALID_REQUEST for the request object."""
    first = daemon.submit(command=["/bin/true"], delay=3600)
    second = daemon.submit(command=["/bin/true"], delay=3600)
    ids = f'{{"id":{first["id"]},"id":{second["id"]}}}'
    twice = "gives the name {} twice in one object; give each name once"
    cases: list[tuple[str, Any, str, str, str | None]] = [  # line, the id answered, code, message, data.param
        (
            f'{{"jsonrpc":"2.0","id":7,"method":"job.cancel","params":{ids}}}',
            7,
            "INVALID_PARAMS",
            "job.cancel: the params object " + twice.format('"id"'),
            "id",
        ),
        (
            '{"jsonrpc":"2.0","id":"s","method":"job.submit","params":{"command":["/bin/true"],"env":{"A":"1","A":""}}}',
            "s",
            "INVALID_PARAMS",
            "job.submit: the params object " + twice.format('"A"'),
            "env",
        ),
        (
            '{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}',
            None,
            "INVALID_REQUEST",
            "the request " + twice.format('"id"'),
            None,
        ),
        (
            f'{{"jsonrpc":"2.0","id":3,"method":"job.cancel","method":"ping","params":{{"id":{first["id"]}}}}}',
            3,
            "INVALID_REQUEST",
            "the request " + twice.format('"method"'),
            None,
        ),
    ]
    for line, request_id, code, message, param in cases:
        answer = exchange(daemon, line.encode())
        assert answer is not None and answer["id"] == request_id, (line, answer)
        error = error_of(answer)
        assert (error["data"]["code"], error["message"], error["data"].get("param")) == (code, message, param), answer
    # In a batch, the member alone; as a notification, no answer and nothing done either.
    with Raw(daemon.socket_path) as raw:
        raw.send(f'[{cases[0][0]},{{"jsonrpc":"2.0","id":8,"method":"ping"}}]\n'.encode())
        refused, pong = raw.message()
        assert (refused["id"], error_of(refused)["data"]["code"]) == (7, "INVALID_PARAMS"), refused
        assert_pong(pong, 8)
        raw.send(f'{{"jsonrpc":"2.0","method":"job.cancel","params":{ids}}}\n'.encode() + ping_line())
        assert_pong(raw.message(), "after")
    assert [daemon.call("job.get", {"id": job["id"]})["state"] for job in (first, second)] == ["delayed"] * 2
    assert job_count(daemon) == 2  # the submit with env given twice made no job
    assert_alive(daemon)


def test_parse_errors_have_the_json_rpc_code(daemon: Any) -> None:
    answer = exchange(daemon, b"{nope")
    assert answer is not None
    assert error_of(answer)["code"] == -32700


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    ],
    ids=["arrays", "objects"],
)
def test_deep_nesting_is_a_parse_error_and_the_daemon_survives(daemon: Any, line: bytes) -> None:
    check_cases(daemon, [(line, "PARSE_ERROR")])
    assert_alive(daemon)
    no_traceback_in_log(daemon)


NOT_REQUESTS = [
    '{"id":1,"method":"ping"}',  # no "jsonrpc"
    '{"jsonrpc":"1.0","id":1,"method":"ping"}',
    '{"jsonrpc":2.0,"id":1,"method":"ping"}',
    '{"jsonrpc":"2.0","id":1}',  # no method
    '{"jsonrpc":"2.0","id":1,"method":5}',
    '{"jsonrpc":"2.0","id":1,"method":null}',
    '{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}',
    '{"jsonrpc":"2.0","id":[1],"method":"ping"}',
    '{"jsonrpc":"2.0","id":true,"method":"ping"}',
    '{"jsonrpc":"1.0","id":{"x":[1]},"method":"ping"}',  # two faults: the id is not echoed either way
    '{"jsonrpc":"2.0","id":1,"method":"ping","params":"x"}',
    '{"jsonrpc":"2.0","id":1,"method":"ping","params":7}',
    '{"jsonrpc":"2.0","id":1,"method":"ping","params":null}',  # JSON-RPC 2.0: an object or an array, if present
    '{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}',
    '{"jsonrpc":"2.0","id":1,"method":"ping","result":1}',
]


def test_json_that_is_not_a_request_is_an_invalid_request(daemon: Any) -> None:
    # The id is echoed when it could be read as a valid id, and null otherwise.
    check_cases(daemon, [(text.encode(), "INVALID_REQUEST") for text in NOT_REQUESTS], expected_id="any")
    for text in NOT_REQUESTS:
        answer = exchange(daemon, text.encode())
        assert answer is not None and answer["id"] in (1, None), answer
        assert error_of(answer)["code"] == -32600


def test_an_unknown_queue_is_named_with_the_defined_ones_by_every_method(daemon: Any) -> None:
    for method, params in (
        ("job.submit", {"command": ["/bin/true"], "queue": "nope"}),
        ("queue.pause", {"name": "nope"}),
        ("queue.resume", {"name": "nope"}),
    ):
        answer = exchange(daemon, json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode())
        assert answer is not None
        data = error_of(answer)["data"]
        named = {"param": "queue"} if method == "job.submit" else {}  # a submit names its parameter at fault
        assert data == {"code": "UNKNOWN_QUEUE", "queue": "nope", "allowed": ["default", "serial"], **named}, data


def test_by_position_params_are_invalid_params(daemon: Any) -> None:
    for text in (
        '{"jsonrpc":"2.0","id":1,"method":"ping","params":[]}',
        '{"jsonrpc":"2.0","id":1,"method":"ping","params":[1,2]}',
    ):
        answer = exchange(daemon, text.encode())
        assert answer is not None and answer["id"] == 1, answer
        assert error_of(answer)["code"] == -32602 and error_of(answer)["data"]["code"] == "INVALID_PARAMS"


def test_a_notification_with_by_position_params_gets_no_answer(daemon: Any) -> None:
    # A valid request without an id is a notification, never answered, even when its method cannot take it.
    with Raw(daemon.socket_path) as raw:
        raw.send(b'{"jsonrpc":"2.0","method":"ping","params":[1]}\n' + ping_line("next"))
        reply, before = raw.reply("next")
        assert_pong(reply, "next")
        assert before == [], before


@pytest.mark.parametrize(
    ("first_shut_down", "waits"),
    [(False, 2), (True, 2), (False, MAX_WAITING + 10)],
    ids=["closed", "shut down, then closed", "closed while its reading is held"],
)
def test_a_client_that_closes_with_requests_waiting_frees_its_connection(
    make_daemon: Any, first_shut_down: bool, waits: int
) -> None:
    # Before, the connection stayed until the awaited job ended (its reply then failed): a few interrupted
    # `jobctl wait`s on a long job held every max_connections slot.
    daemon = make_daemon("[queue.default]\nconcurrency = 1\n", daemon_extra="max_connections = 2")
    with Client(str(daemon.socket_path)) as kept:  # one slot, used throughout
        job = kept.call("job.submit", {"command": ["/bin/sleep", "300"]})
        with Raw(daemon.socket_path) as raw:  # the other slot
            requests = [{"jsonrpc": "2.0", "id": 0, "method": "job.output", "params": {"id": job["id"], "wait": True}}]
            requests += [
                {"jsonrpc": "2.0", "id": n, "method": "job.wait", "params": {"id": job["id"]}} for n in range(1, waits)
            ]
            # In one write, read by jobd before the round trips on the other connection are answered: the requests
            # wait (past MAX_WAITING, jobd reads no more of that connection, not even its end-of-file) before the
            # client goes. jobd takes REQUESTS_PER_TURN of them in each turn of its loop, and answers the other
            # connection's ping after the turn in progress when it comes: a round trip for each turn, and one more
            # (the other connection's ping may be read in the turn that reads the first requests, and before them).
            # A round trip on this connection first: jobd reads it from then on (it takes a few turns to set up).
            raw.send(ping_line("set up"))
            assert_pong(raw.reply("set up")[0], "set up")
            raw.send(b"".join(json.dumps(request).encode() + b"\n" for request in requests))
            for _ in range(-(-min(waits, MAX_WAITING) // REQUESTS_PER_TURN) + 1):
                kept.call("ping")
            if first_shut_down:  # EOF, but the client still reads: its answers must still come, so nothing goes
                raw.sock.shutdown(socket.SHUT_WR)
                kept.call("ping")  # a round trip after the EOF, on another connection
                assert "requests waiting: dropped" not in daemon.log()
        wait_for_log(daemon, f"closed its connection with {min(waits, MAX_WAITING)} requests waiting: dropped")
        with Raw(daemon.socket_path) as fresh:  # the slot is free again at once, not when the job ends
            fresh.send(ping_line("free"))
            assert_pong(fresh.reply("free")[0], "free")
        kept.call("job.cancel", {"id": job["id"]})


def test_requests_waiting_on_one_connection_are_bounded(daemon: Any) -> None:
    # A client pipelining job.wait without end used to grow jobd's memory without end (about 4 KiB each). Past
    # MAX_WAITING on a connection, its further requests are read only once one of those is answered: the ping
    # sent after them is answered after the first wait, not at once.
    job = daemon.submit(command=["/bin/sleep", "300"])
    waits = MAX_WAITING + 20
    with Raw(daemon.socket_path) as raw:
        lines = b"".join(
            json.dumps({"jsonrpc": "2.0", "id": n, "method": "job.wait", "params": {"id": job["id"]}}).encode() + b"\n"
            for n in range(waits)
        )
        raw.send(lines + ping_line("behind"))
        daemon.call("job.cancel", {"id": job["id"]})  # on another connection: the waits end
        replies = [raw.message() for _ in range(waits + 1)]
    # Answered in any order once the job ended, but the ping only after the first wait had been answered: it was
    # not read before.
    assert replies[0].get("id") != "behind" and replies[0]["result"]["state"] == "cancelled", replies[0]
    assert_pong(next(r for r in replies if r["id"] == "behind"), "behind")
    assert sorted(r["id"] for r in replies if r["id"] != "behind") == list(range(waits))


def test_a_batch_holding_more_waiting_requests_than_allowed_gets_them_refused(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sleep", "300"])
    wait = {"jsonrpc": "2.0", "method": "job.wait", "params": {"id": job["id"]}}
    batch = [{**wait, "id": n} for n in range(MAX_WAITING + 1)] + [{"jsonrpc": "2.0", "id": "ping", "method": "ping"}]
    with Raw(daemon.socket_path) as raw:
        raw.send_json(batch)
        answers = {answer["id"]: answer for answer in raw.message()}
    assert_pong(answers.pop("ping"), "ping")  # the members that do not wait are done as usual
    assert sorted(answers) == list(range(MAX_WAITING + 1))
    for answer in answers.values():
        assert error_of(answer)["data"]["code"] == "INVALID_REQUEST", answer
        assert f"at most {MAX_WAITING} requests that wait" in error_of(answer)["message"], answer
    daemon.call("job.cancel", {"id": job["id"]})


def test_submits_of_a_batch_over_the_waiting_cap_are_answered_with_their_jobs(make_daemon: Any) -> None:
    # With durability = "fsync" a submit's reply waits for the fsync, but its job is committed (and may run) before:
    # refusing that reply would tell the client a job it made was not, and it would submit it again.
    daemon = make_daemon("[queue.held]\npaused = true\n", daemon_extra='durability = "fsync"')
    submit = {"jsonrpc": "2.0", "method": "job.submit", "params": {"command": ["/bin/true"], "queue": "held"}}
    wait = {"jsonrpc": "2.0", "id": "wait", "method": "job.wait", "params": {"id": 1}}
    with Raw(daemon.socket_path) as raw:
        raw.send_json([{**submit, "id": n} for n in range(MAX_WAITING + 1)] + [wait])
        answers = {answer["id"]: answer for answer in raw.message()}
    assert error_of(answers.pop("wait"))["data"]["code"] == "INVALID_REQUEST"  # a wait has not begun: refused
    assert sorted(answer["result"]["id"] for answer in answers.values()) == list(range(1, MAX_WAITING + 2))
    assert daemon.call("daemon.status")["queued"] == MAX_WAITING + 1


def test_a_submit_whose_client_leaves_during_the_fsync_is_audited_as_done(make_daemon: Any) -> None:
    # The job is committed before the reply waits for the fsync: the client leaving then does not undo it, and the
    # audit says so ("ok"), not INTERRUPTED.
    daemon = make_daemon("[queue.held]\npaused = true\n", daemon_extra='durability = "fsync"')
    with Raw(daemon.socket_path) as listener:
        subscribe(listener, {"types": ["job.state"]})
        for n in range(5):
            with Raw(daemon.socket_path) as raw:
                raw.request("job.submit", {"command": ["/bin/true"], "queue": "held"}, n)
        assert [listener.event()["job"]["state"] for _ in range(5)] == ["queued"] * 5
        listener.request("audit.list", {"limit": 10}, "audit")
        entries = listener.reply("audit")[0]["result"]["entries"]
    assert [(entry["command"], entry["result"]) for entry in entries] == [("job.submit", "ok")] * 5, entries


def test_subscriptions_on_one_connection_are_bounded(daemon: Any) -> None:
    # Every event is offered to every subscription: one client subscribing without end slowed every job down.
    with Client(str(daemon.socket_path)) as client:
        numbers = [client.call("events.subscribe", {"types": ["job.state"]})["subscription"] for _ in range(64)]
        assert numbers == list(range(1, 65))
        with pytest.raises(RemoteError) as refused:
            client.call("events.subscribe", {})
        assert refused.value.code == "INVALID_PARAMS" and "64 subscriptions" in refused.value.message
        job = client.call("job.submit", {"command": ["/bin/true"]})  # the 64 still work
        event = client.next_event(timeout=DEADLINE)
        assert event["type"] == "job.state" and event["job"]["id"] == job["id"], event


def test_the_client_follows_events_until_the_reply_of_a_request_sent_ahead(daemon: Any, tmp_path: Any) -> None:
    """jobctl's progress bar: events.subscribe, job.wait sent without waiting for it, then its events one by one
    until its reply, which ends the job's events; a reply that comes during another call is kept for later."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    script = f'read line < "{gate}"; echo %50 >&3; echo "half way" >&3'
    with Client(str(daemon.socket_path)) as client:
        job_id = client.call("job.submit", {"command": ["/bin/sh", "-c", script]})["id"]
        client.call("events.subscribe", {"jobs": [job_id]})
        wait = client.send_request("job.wait", {"id": job_id})
        assert client.call("ping")["pong"] is True  # answered after jobd took the wait in
        with open(gate, "w") as writer:
            writer.write("go\n")
        seen: list[str] = []
        while not isinstance(message := client.next_event_or_reply(wait, timeout=DEADLINE), Reply):
            seen.append(message["type"])
        assert message.result["id"] == job_id and message.result["state"] == "succeeded", message
        assert "job.progress" in seen and "job.log" in seen, seen

        wait = client.send_request("job.wait", {"id": job_id})  # answered at once: the job has ended
        assert client.call("ping")["pong"] is True  # reads the wait's reply on the way, and keeps it
        reply = client.next_event_or_reply(wait, timeout=DEADLINE)
        assert isinstance(reply, Reply) and reply.result["state"] == "succeeded", reply
        with pytest.raises(RemoteError) as unknown:
            client.next_event_or_reply(client.send_request("job.wait", {"id": 10**9}), timeout=DEADLINE)
        assert unknown.value.code == "UNKNOWN_JOB", unknown.value


def test_an_unknown_parameter_of_a_method_without_any_says_so(daemon: Any) -> None:
    answer = exchange(daemon, b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":1}}')
    assert answer is not None
    assert error_of(answer)["message"] == "ping: unknown parameter 'x'; it takes no parameters", answer


def test_a_fractional_id_is_an_id(daemon: Any) -> None:
    # JSON-RPC 2.0 allows any number as an id (fractions are discouraged, not forbidden).
    answer = exchange(daemon, b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}')
    assert answer is not None and answer["id"] == 1.5 and answer["result"]["pong"] is True, answer


def test_a_json_value_that_is_not_an_object_is_an_invalid_request(daemon: Any) -> None:
    # Sent after a first request, so the connection is already speaking JSON-RPC (the first byte picks it).
    for value in (b'"hello"', b"42", b"null", b"true", b"1.5"):
        with Raw(daemon.socket_path) as raw:
            raw.send(ping_line(1) + value + b"\n" + ping_line(2))
            raw.sock.shutdown(socket.SHUT_WR)
            answers = [raw.message() for _ in range(3)]
            assert raw.read_to_eof() == b""
        errors = [a for a in answers if a["id"] not in (1, 2)]
        assert len(errors) == 1, (value, answers)
        assert errors[0]["id"] is None
        assert error_of(errors[0])["data"]["code"] == "INVALID_REQUEST", (value, errors)
        assert {a["id"] for a in answers if "result" in a} == {1, 2}


def test_an_empty_batch_is_an_invalid_request(daemon: Any) -> None:
    answer = exchange(daemon, b"[]")
    assert isinstance(answer, dict), answer  # one error object, not an array
    assert answer["id"] is None
    assert error_of(answer)["data"]["code"] == "INVALID_REQUEST"


def test_a_batch_of_non_requests_gets_one_error_each(daemon: Any) -> None:
    answer: Any = exchange(daemon, b'[1, "x", {"jsonrpc":"2.0"}]')
    assert isinstance(answer, list) and len(answer) == 3, answer
    for member in answer:
        assert member["id"] is None
        assert error_of(member)["data"]["code"] == "INVALID_REQUEST"


def test_unknown_method_lists_the_methods(daemon: Any) -> None:
    answer = exchange(daemon, b'{"jsonrpc":"2.0","id":"m","method":"job.explode","params":{}}')
    assert answer is not None and answer["id"] == "m"
    error = error_of(answer)
    assert error["data"]["code"] == "METHOD_NOT_FOUND"
    assert error["code"] == -32601
    allowed = error["data"]["allowed"]
    assert isinstance(allowed, list)
    assert set(allowed) >= DOCUMENTED_METHODS, DOCUMENTED_METHODS - set(allowed)
    assert "events.subscribe" in allowed  # served on this socket (not over HTTP)
    # The name quoted as the client wrote it, JSON-style and cut to 60 characters, as every refused value is.
    assert error["message"] == f'no method "job.explode"; methods: {", ".join(allowed)}'
    answer = exchange(daemon, json.dumps({"jsonrpc": "2.0", "id": 2, "method": "x" * 100_000}).encode())
    assert answer is not None and error_of(answer)["message"].startswith('no method "' + "x" * 56 + "...; methods:")


BAD_PARAMS: list[tuple[str, Any, str]] = [
    ("job.get", {}, "id"),
    ("job.get", {"id": "7"}, "id"),
    ("job.get", {"id": 0}, "id"),
    ("job.get", {"id": 1.5}, "id"),
    ("job.get", {"id": True}, "id"),
    ("job.get", {"id": 1, "verbose": True}, "verbose"),
    ("ping", {"bogus": 1}, "bogus"),
    ("job.submit", {"command": ["/bin/true"], "priority": 2**32}, "priority"),
    ("job.submit", {"command": ["/bin/true"], "priority": -1}, "priority"),
    ("job.submit", {"command": ["/bin/true"], "priority": "high"}, "priority"),
    ("job.submit", {"command": ["/bin/true"], "delay": -1}, "delay"),
    ("job.submit", {"command": ["/bin/true"], "timeout": 0}, "timeout"),
    ("job.submit", {"command": [1, 2]}, "command"),
    ("job.submit", {"command": []}, "command"),
    ("job.submit", {"command": ["/bin/true"], "env": {"A": 1}}, "env"),
    ("job.submit", {"command": ["/bin/true"], "args": ["x y"], "params": {"a": "b"}}, "params"),
    ("job.submit", {"command": "/bin/true -x"}, "command"),  # an argv is a list: no program named "/bin/true -x"
    ("job.submit", {"task": "echo", "args": "x y"}, "args"),
    ("job.submit", {"command": ["/bin/true"], "stdin_base64": "***"}, "stdin_base64"),
    ("job.submit", {"command": ["/bin/true"], "retry": {"times": -1}}, "times"),
    ("job.submit", {"command": ["/bin/true"], "colour": "red"}, "colour"),
    ("job.submit", {"jobs": []}, "jobs"),
    ("job.submit", {"jobs": "x"}, "jobs"),
    ("job.submit", {"jobs": [{"command": ["/bin/true"], "nice": 5}]}, "nice"),
    ("job.list", {"state": "nope"}, "state"),
    ("job.list", {"limit": 0}, "limit"),
    ("job.list", {"limit": 1001}, "limit"),
    ("instance.list", {"limit": 0}, "limit"),
    ("instance.list", {"limit": 1001}, "limit"),
    ("instance.list", {"errors": "yes"}, "errors"),
    ("audit.list", {"limit": 1001}, "limit"),
    ("job.output", {"id": 1, "stream": "stdmiddle"}, "stream"),
    ("job.output", {"id": 1, "encoding": "latin-1"}, "encoding"),
    ("job.output", {"id": 1, "limit": 2 * 1024 * 1024}, "limit"),
    ("job.output", {"id": 1, "offset": 2**63 - 1}, "offset"),
    ("job.wait", {"id": 1, "timeout": -1}, "timeout"),
    ("job.cancel", {"id": -3}, "id"),
    ("queue.pause", {}, "name"),
    ("queue.resume", {"name": 5}, "name"),
    ("events.subscribe", {"types": ["job.nope"]}, "types"),
    ("events.subscribe", {"jobs": ["a"]}, "jobs"),
]


def test_bad_params_are_invalid_params_naming_the_parameter(daemon: Any) -> None:
    before = job_count(daemon)
    failures = []
    for method, params, name in BAD_PARAMS:
        line = json.dumps({"jsonrpc": "2.0", "id": 9, "method": method, "params": params}).encode()
        answer = exchange(daemon, line)
        try:
            assert answer is not None and answer["id"] == 9, answer
            error = error_of(answer)
            assert error["data"]["code"] == "INVALID_PARAMS", answer
            assert error["code"] == -32602
            assert name in error["message"], answer
        except AssertionError as failure:
            failures.append(f"{method} {params}: {failure}")
    assert not failures, "\n".join(failures)
    assert job_count(daemon) == before  # a refused submit creates nothing


def test_an_invalid_state_filter_names_the_allowed_states(daemon: Any) -> None:
    answer = exchange(daemon, b'{"jsonrpc":"2.0","id":1,"method":"job.list","params":{"state":"nope"}}')
    assert answer is not None
    message = error_of(answer)["message"]
    for state in STATE_ORDER:
        assert state in message, message


@pytest.mark.parametrize("delay", [1e12, 1e300])
def test_a_delay_beyond_any_date_is_refused_and_creates_no_job(daemon: Any, delay: float) -> None:
    before = job_count(daemon)
    line = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "job.submit", "params": {"command": ["/bin/true"], "delay": delay}}
    )
    answer = exchange(daemon, line.encode())
    assert answer is not None
    error = error_of(answer)
    assert error["data"]["code"] == "INVALID_PARAMS", answer
    assert "delay" in error["message"]
    # Nothing half-accepted: the job list still works and holds no new job.
    assert job_count(daemon) == before
    no_traceback_in_log(daemon)


@pytest.mark.parametrize(
    "line",
    [
        b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"\\udfff":1}}',
        b'{"jsonrpc":"2.0","id":1,"method":"job.submit","params":{"command":["/bin/true"],"context":"a\\ud800b"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"job.submit","params":{"command":["/bin/echo","\\ud83d"]}}',
    ],
    ids=["id", "param-name", "context", "argv"],
)
def test_lone_surrogate_escapes_get_a_clear_error(daemon: Any, line: bytes) -> None:
    """`\\ud800` is valid JSON syntax but no Unicode text: it cannot be stored or sent back as UTF-8."""
    before = job_count(daemon)
    answer = exchange(daemon, line)
    assert answer is not None, "the request got no answer at all"
    error = error_of(answer)
    assert error["data"]["code"] in ("PARSE_ERROR", "INVALID_REQUEST", "INVALID_PARAMS"), answer
    assert job_count(daemon) == before
    no_traceback_in_log(daemon)


def test_domain_errors_carry_their_stable_codes(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        raw.request("job.submit", {"command": ["/bin/true"], "queue": "nope"}, 1)
        error = error_of(raw.reply(1)[0])
        assert error["data"]["code"] == "UNKNOWN_QUEUE"
        assert error["data"]["queue"] == "nope"
        assert set(error["data"]["allowed"]) == {"default", "serial"}
        assert "nope" in error["message"]

        raw.request("job.submit", {"task": "nope"}, 2)
        error = error_of(raw.reply(2)[0])
        assert error["data"]["code"] == "UNKNOWN_TASK"
        assert {"echo", "envtask"} <= set(error["data"]["allowed"])

        raw.request("job.get", {"id": 999_999}, 3)
        assert error_of(raw.reply(3)[0])["data"]["code"] == "UNKNOWN_JOB"

        raw.request("job.submit", {}, 4)
        error = error_of(raw.reply(4)[0])
        assert error["data"]["code"] == "INVALID_PARAMS"
        assert "task" in error["message"] and "command" in error["message"]


# -- framing ---------------------------------------------------------------------------------------------------


def ping_of_size(size: int, request_id: Any = 1) -> bytes:
    """A ping with an unknown parameter `x`, padded to exactly `size` bytes (newline excluded)."""
    head = b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() + b',"method":"ping","params":{"x":"'
    tail = b'"}}'
    line = head + b"a" * (size - len(head) - len(tail)) + tail
    assert len(line) == size
    return line


def send_oversized(raw: Raw, data: bytes) -> None:
    """jobd may close the connection before it has read all we send: that is the point."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.send(data)


def assert_frame_too_large_then_closed(raw: Raw) -> None:
    answer = raw.message()
    assert answer["id"] is None, answer
    error = error_of(answer)
    assert error["data"] == {"code": "FRAME_TOO_LARGE", "limit": MAX_FRAME}, answer  # what a line may hold
    assert raw.read_to_eof() == b""  # and nothing else: the connection is closed


def test_a_line_over_one_mebibyte_is_refused_and_the_connection_closed(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        send_oversized(raw, ping_of_size(MAX_FRAME + 1) + b"\n" + ping_line(2))
        assert_frame_too_large_then_closed(raw)
    assert_alive(daemon)


def test_an_oversized_line_after_a_good_one_is_refused(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        raw.send(ping_line(1))
        assert_pong(raw.reply(1)[0], 1)
        send_oversized(raw, ping_of_size(MAX_FRAME + 1, 2) + b"\n")
        assert_frame_too_large_then_closed(raw)
    assert_alive(daemon)


def test_an_endless_line_without_newline_is_refused(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        send_oversized(raw, b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"a" * (3 * MAX_FRAME))
        assert_frame_too_large_then_closed(raw)
    assert_alive(daemon)


def test_a_line_of_exactly_one_mebibyte_is_processed(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        # First on the connection, then again later: both positions in the stream take the full size.
        raw.send(ping_of_size(MAX_FRAME, 1) + b"\n")
        error = error_of(raw.reply(1)[0])
        assert error["data"]["code"] == "INVALID_PARAMS" and "x" in error["message"]
        raw.send(ping_of_size(MAX_FRAME - 100, 2) + b"\n" + ping_of_size(MAX_FRAME, 3) + b"\n" + ping_line(4))
        for request_id in (2, 3):
            assert error_of(raw.reply(request_id)[0])["data"]["code"] == "INVALID_PARAMS"
        assert_pong(raw.reply(4)[0], 4)


def test_a_submit_of_almost_one_mebibyte_is_accepted(daemon: Any) -> None:
    context = "c" * 1_000_000
    with Raw(daemon.socket_path) as raw:
        raw.request("job.submit", {"command": ["/bin/true"], "context": context, "delay": 3600}, 1)
        reply, _ = raw.reply(1)
        job = reply["result"]
        assert job["context"] == context
        assert job["state"] == "delayed"
    assert daemon.call("job.get", {"id": job["id"]})["context"] == context


def test_many_requests_in_one_write_are_all_answered(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        raw.send(b"".join(ping_line(i) for i in range(1, 51)))
        seen = set()
        for _ in range(50):
            reply = raw.message()
            assert_pong(reply, reply.get("id"))
            seen.add(reply["id"])
        assert seen == set(range(1, 51))


def test_a_request_split_byte_by_byte_is_answered(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        for byte in ping_line(7):
            raw.send(bytes([byte]))
        assert_pong(raw.reply(7)[0], 7)
        # And a line whose end comes with the start of the next one.
        first, second = ping_line(8), ping_line(9)
        raw.send(first[:-5])
        raw.send(first[-5:] + second[:10])
        raw.send(second[10:])
        replies = {raw.message()["id"], raw.message()["id"]}
        assert replies == {8, 9}


def test_a_submit_is_done_once_read_whole_whether_or_not_its_client_stays_for_the_answer(daemon: Any) -> None:
    """A client killed as it wrote (here: it ends its side midway through a batch of two submits) has nothing done;
    one that closes once its submit is sent, before the answer, has its job made, and a submit with the same key
    then answers that job rather than making another (docs/protocol.md, framing)."""
    submit = {"jsonrpc": "2.0", "method": "job.submit", "params": {"command": ["/bin/true"], "key": "lost-answer"}}
    batch = json.dumps([{**submit, "id": 1}, {**submit, "id": 2}]).encode()
    with Raw(daemon.socket_path) as raw:
        raw.send(batch[: len(batch) // 2])
        raw.sock.shutdown(socket.SHUT_WR)
        refused = raw.message()  # answered: this client still reads; a dead one is not, and the rest is the same
        assert (refused["id"], refused["error"]["data"]["code"]) == (None, "PARSE_ERROR"), refused
    assert job_count(daemon) == 0
    with daemon.client() as watcher:
        watcher.call("events.subscribe", {"types": ["job.state"]})
        with Raw(daemon.socket_path) as raw:
            raw.send_json({**submit, "id": 1})
        made = watcher.next_event(timeout=DEADLINE)["job"]  # made though the client is gone
    assert daemon.submit(**submit["params"])["id"] == made["id"]
    assert job_count(daemon) == 1


def test_a_request_followed_by_shutdown_of_the_write_side_is_still_answered(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sh", "-c", "exit 3"])
    with Raw(daemon.socket_path) as raw:
        raw.request("job.wait", {"id": job["id"], "timeout": 20}, 1)
        raw.sock.shutdown(socket.SHUT_WR)
        reply, _ = raw.reply(1)
        assert reply["result"]["state"] == "failed"
        assert reply["result"]["exit_code"] == 3


# -- batches -----------------------------------------------------------------------------------------------------


def test_a_batch_with_a_notification_gets_an_array_of_the_other_answers(daemon: Any) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "ping"},
        {"jsonrpc": "2.0", "method": "ping"},
        {"jsonrpc": "2.0", "id": "b", "method": "queue.list"},
    ]
    with Raw(daemon.socket_path) as raw:
        raw.send_json(batch)
        answer = raw.message()
        assert isinstance(answer, list), answer
        by_id = {reply["id"]: reply for reply in answer}
        assert set(by_id) == {"a", "b"}
        assert_pong(by_id["a"], "a")
        assert {q["name"] for q in by_id["b"]["result"]["queues"]} == {"default", "serial"}


def test_a_batch_mixes_results_and_errors(daemon: Any) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": 2, "method": "job.get", "params": {"id": 999_999}},
        {"jsonrpc": "2.0", "id": 3, "method": "no.such"},
        {"jsonrpc": "2.0", "id": 4},
    ]
    with Raw(daemon.socket_path) as raw:
        raw.send_json(batch)
        answer = raw.message()
        by_id = {reply["id"]: reply for reply in answer}
        assert set(by_id) == {1, 2, 3, 4}
        assert_pong(by_id[1], 1)
        assert error_of(by_id[2])["data"]["code"] == "UNKNOWN_JOB"
        assert error_of(by_id[3])["data"]["code"] == "METHOD_NOT_FOUND"
        assert error_of(by_id[4])["data"]["code"] == "INVALID_REQUEST"


def test_a_batch_of_notifications_gets_no_answer_at_all(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        raw.send_json([{"jsonrpc": "2.0", "method": "ping"}, {"jsonrpc": "2.0", "method": "queue.list"}])
        raw.send(ping_line("after"))
        assert_pong(raw.message(), "after")  # the first line back: no (empty) array for the batch


def test_a_batch_of_submits(daemon: Any) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": n, "method": "job.submit", "params": {"command": ["/bin/echo", f"job {n}"]}}
        for n in range(1, 4)
    ]
    with Raw(daemon.socket_path) as raw:
        raw.send_json(batch)
        answer = raw.message()
    by_id = {reply["id"]: reply["result"] for reply in answer}
    assert set(by_id) == {1, 2, 3}
    assert len({job["id"] for job in by_id.values()}) == 3
    for n, job in by_id.items():
        assert job["command"] == ["/bin/echo", f"job {n}"]
        assert daemon.wait(job["id"])["state"] == "succeeded"
        assert daemon.output(job["id"]) == f"job {n}\n"


def test_a_batch_is_answered_once_all_members_are_done(daemon: Any) -> None:
    sleeper = daemon.submit(command=["/bin/sleep", "30"])
    batch = [
        {"jsonrpc": "2.0", "id": "wait", "method": "job.wait", "params": {"id": sleeper["id"]}},
        {"jsonrpc": "2.0", "id": "ping", "method": "ping"},
    ]
    with Raw(daemon.socket_path) as raw:
        raw.send_json(batch)
        raw.send(ping_line("solo"))
        # The batch waits for job.wait; the request sent after it is not held up by it.
        assert_pong(raw.message(), "solo")
        daemon.call("job.cancel", {"id": sleeper["id"]})
        answer = raw.message()
        by_id = {reply["id"]: reply for reply in answer}
        assert by_id["wait"]["result"]["state"] == "cancelled"
        assert_pong(by_id["ping"], "ping")


def test_the_members_of_a_batch_that_wait_run_together(daemon: Any) -> None:
    # The wait comes first: were the members run in turn, the cancel would never be sent and the batch never end.
    sleeper = daemon.submit(command=["/bin/sleep", "30"])
    batch = [
        {"jsonrpc": "2.0", "id": "wait", "method": "job.wait", "params": {"id": sleeper["id"], "timeout": 25}},
        {"jsonrpc": "2.0", "id": "cancel", "method": "job.cancel", "params": {"id": sleeper["id"]}},
    ]
    with Raw(daemon.socket_path) as raw:
        raw.send_json(batch)
        by_id = {reply["id"]: reply for reply in raw.message()}
    assert by_id["wait"]["result"]["state"] == "cancelled", by_id
    assert by_id["cancel"]["result"]["state"] == "cancelled", by_id


def test_job_list_pages_newest_first_and_says_when_there_is_no_older_page(daemon: Any) -> None:
    ids = [daemon.submit(command=["/bin/true"], delay=3600, context="paged")["id"] for _ in range(4)]
    first = daemon.call("job.list", {"context": "paged", "limit": 2})
    assert [job["id"] for job in first["jobs"]] == ids[:1:-1]
    assert first["next_before"] == ids[2]
    second = daemon.call("job.list", {"context": "paged", "limit": 2, "before": first["next_before"]})
    assert [job["id"] for job in second["jobs"]] == ids[1::-1]
    assert second["next_before"] is None  # the page is full, but nothing older is left
    assert daemon.call("job.list", {"context": "paged", "limit": 5})["next_before"] is None
    assert daemon.call("job.list", {"context": "paged", "state": "queued"})["jobs"] == []
    # docs/protocol.md: null and a state of [] (a form with no state ticked) do not filter.
    unfiltered = {"state": [], "queue": None, "task": None, "before": None, "limit": None}
    assert [job["id"] for job in daemon.call("job.list", {"context": "paged", **unfiltered})["jobs"]] == ids[::-1]


def test_a_page_of_big_jobs_ends_at_its_text_limit_and_the_next_pages_hold_the_rest(daemon: Any) -> None:
    # Each job may hold almost a request's 1 MiB (argv, context, environment...): a page of 1,000 of them was a
    # gigabyte read from the database, built and sent at once. A page now ends before the job that would take the
    # text of its jobs past MAX_PAGE_TEXT, and says where the next page starts.
    context = "x" * 900_000
    per_page = MAX_PAGE_TEXT // len(context)  # each job holds a little more than its context: no more fit
    assert per_page * len(context) < MAX_PAGE_TEXT - 100_000  # ... and this many do
    ids = [daemon.submit(command=["/bin/true"], delay=3600, context=context)["id"] for _ in range(2 * per_page + 1)]
    for where in ({}, {"context": context}, {"state": "delayed"}, {"queue": "default"}):
        pages: list[list[int]] = []
        before = None
        while before is not None or not pages:
            page = daemon.call("job.list", {**where, "limit": 1000, "before": before})
            pages.append([job["id"] for job in page["jobs"]])
            before = page["next_before"]
            assert before is None or before == pages[-1][-1]
        assert [len(page) for page in pages] == [per_page, per_page, 1], where
        assert [job_id for page in pages for job_id in page] == ids[::-1], where
    assert len(daemon.call("job.list", {"limit": 2})["jobs"]) == 2  # the limit still ends a page first


def test_a_job_with_stdin_is_listed(daemon: Any) -> None:
    """A list reads of a job's stdin only whether there is one (a 1): the page's text limit counted it with len(),
    and every job.list that met a job with stdin (each task of a workflow) was an INTERNAL_ERROR."""
    with_stdin = daemon.submit(command=["/bin/cat"], stdin="aGVsbG8K", delay=3600, context="stdin")["id"]
    for where in ({}, {"context": "stdin"}, {"state": "delayed"}, {"queue": "default"}):
        assert [job["id"] for job in daemon.call("job.list", where)["jobs"]] == [with_stdin], where


def test_a_state_named_twice_lists_each_job_once(daemon: Any) -> None:
    # The jobs of each state named were read and merged: a state named twice gave each of its jobs twice (a page of
    # one job shown `limit` times), and a list of one state thousands of times long held the event loop a second.
    ids = [daemon.submit(command=["/bin/true"], delay=3600, context="twice")["id"] for _ in range(2)]
    for where in ({}, {"context": "twice"}, {"queue": "default"}):
        listed = daemon.call("job.list", {**where, "state": ["delayed", "delayed", "queued"], "limit": 5})["jobs"]
        assert [job["id"] for job in listed if job["context"] == "twice"] == ids[::-1], (where, listed)
        assert len({job["id"] for job in listed}) == len(listed), (where, listed)


def test_job_submit_with_jobs_creates_all_of_them(daemon: Any) -> None:
    before = job_count(daemon)
    members = [{"command": ["/bin/true"], "delay": 3600, "context": f"b{n}"} for n in range(100)]
    with Raw(daemon.socket_path) as raw:
        raw.request("job.submit", {"jobs": members}, 1)
        jobs = raw.reply(1)[0]["result"]["jobs"]
    assert len(jobs) == 100
    assert [job["context"] for job in jobs] == [f"b{n}" for n in range(100)]  # in the order given
    assert len({job["id"] for job in jobs}) == 100
    assert all(job["state"] == "delayed" for job in jobs)
    assert job_count(daemon) == before + 100


def test_job_submit_with_jobs_is_all_or_nothing(daemon: Any) -> None:
    daemon.submit(command=["/bin/true"], delay=3600)
    before = job_count(daemon)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"command": ["/bin/true"], "queue": "nope"}, "UNKNOWN_QUEUE"),
        ({"task": "nope"}, "UNKNOWN_TASK"),
        ({"command": ["/bin/true"], "priority": -5}, "INVALID_PARAMS"),
        ({"command": ["/bin/true"], "env": {"BAD=NAME": "x"}}, "INVALID_PARAMS"),
    ]
    for bad, code in cases:
        members: list[dict[str, Any]] = [{"command": ["/bin/true"], "delay": 3600} for _ in range(5)]
        members.insert(3, bad)
        with Raw(daemon.socket_path) as raw:
            raw.request("job.submit", {"jobs": members}, 1)
            error = error_of(raw.reply(1)[0])
        assert error["data"]["code"] == code, (bad, error)
        assert job_count(daemon) == before, bad


# -- pipelining and notifications -------------------------------------------------------------------------------


def test_a_waiting_request_does_not_hold_up_the_next_one(daemon: Any) -> None:
    sleeper = daemon.submit(command=["/bin/sleep", "30"])
    with Raw(daemon.socket_path) as raw:
        raw.request("job.wait", {"id": sleeper["id"]}, 1)
        raw.send(ping_line(2))
        assert_pong(raw.message(), 2)  # the first answer on the connection is the ping's
        daemon.call("job.cancel", {"id": sleeper["id"]})
        reply = raw.message()
        assert reply["id"] == 1
        assert reply["result"]["state"] == "cancelled"


def test_notifications_get_no_answer(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        raw.send_json({"jsonrpc": "2.0", "method": "ping"})
        raw.send_json({"jsonrpc": "2.0", "method": "no.such.method"})
        raw.send_json({"jsonrpc": "2.0", "method": "job.get", "params": {"id": 999_999}})
        raw.send(ping_line("after"))
        assert_pong(raw.message(), "after")


def test_a_message_without_id_that_is_no_request_is_answered_with_a_null_id(daemon: Any) -> None:
    # Not a notification: JSON-RPC 2.0 answers an invalid request with a null id, and docs/protocol.md says so.
    for text in (
        '{"jsonrpc":"2.0","method":5}',
        '{"method":"ping"}',
        '{"jsonrpc":"2.0","method":"ping","x":1}',
        '{"jsonrpc":"2.0","method":"ping","params":7}',
        '{"jsonrpc":"2.0","method":"ping","params":null}',  # was run as a notification without params
    ):
        with Raw(daemon.socket_path) as raw:
            raw.send(text.encode() + b"\n" + ping_line("after"))
            answer = raw.message()
            assert answer["id"] is None and error_of(answer)["data"]["code"] == "INVALID_REQUEST", (text, answer)
            assert_pong(raw.message(), "after")


def test_a_notification_still_does_its_work(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/true"], delay=3600)
    with Raw(daemon.socket_path) as raw:
        raw.send_json({"jsonrpc": "2.0", "method": "job.cancel", "params": {"id": job["id"]}})
        raw.request("job.wait", {"id": job["id"], "timeout": 20}, "w")
        reply, before = raw.reply("w")
        assert before == []
        assert reply["result"]["state"] == "cancelled"


def test_a_null_id_is_a_request_not_a_notification(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        raw.send(b'{"jsonrpc":"2.0","id":null,"method":"ping"}\n')
        assert_pong(raw.message(), None)


def test_string_ids_are_echoed_exactly(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        for request_id in ("abc", "", "ü-1", 0, -7, 2**53):
            raw.send(ping_line(request_id))
            assert_pong(raw.message(), request_id)


# -- events ------------------------------------------------------------------------------------------------------


def subscribe(raw: Raw, params: dict[str, Any]) -> int:
    raw.request("events.subscribe", params, "sub")
    reply, before = raw.reply("sub")
    assert before == []
    number: int = reply["result"]["subscription"]
    return number


def states_until_finished(raw: Raw, job_id: int, subscription: int) -> list[str]:
    states = []
    while True:
        event = raw.event()
        assert event["subscription"] == subscription
        if event["type"] == "job.state" and event["job"]["id"] == job_id:
            states.append(event["job"]["state"])
            if event["job"]["state"] in FINISHED:
                return states


def assert_forward(states: list[str]) -> None:
    ranks = [STATE_ORDER.index(state) for state in states]
    assert ranks == sorted(ranks), states


def test_state_events_follow_a_job_in_order(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        number = subscribe(raw, {})
        job = daemon.submit(command=["/bin/true"])
        states = states_until_finished(raw, job["id"], number)
    assert states[-1] == "succeeded"
    assert "running" in states
    assert_forward(states)
    assert len(states) == len(set(states)), states


def test_a_submit_is_answered_before_the_events_of_its_job(daemon: Any) -> None:
    # On the connection that submits, the reply (with the new job's id) comes before anything said about the job:
    # its `queued` and `running` events, although the queue has room and the job starts at once.
    with Raw(daemon.socket_path) as raw:
        number = subscribe(raw, {})
        raw.request("job.submit", {"command": ["/bin/true"]}, "submit")
        reply, before = raw.reply("submit")
        assert before == []
        job_id = reply["result"]["id"]
        assert reply["result"]["state"] == "queued"
        states = states_until_finished(raw, job_id, number)
    assert states == ["queued", "running", "succeeded"]


def test_subscriptions_are_numbered_per_connection_and_each_gets_its_own_events(daemon: Any) -> None:
    """docs/protocol.md, events.subscribe: a connection's subscriptions are numbered 1, 2, ... in the order it makes
    them, whatever other connections do, and an event goes once to each subscription that selects it. Nothing from
    before a subscription is sent: a job that ended before it is not told of."""
    ended = daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    with Raw(daemon.socket_path) as other, Raw(daemon.socket_path) as raw:
        assert subscribe(other, {}) == 1
        assert [subscribe(raw, {}), subscribe(raw, {"types": ["job.state"]})] == [1, 2]
        assert subscribe(raw, {"jobs": [ended["id"]]}) == 3
        raw.request("job.submit", {"command": ["/bin/true"]}, "submit")
        job_id = raw.reply("submit")[0]["result"]["id"]
        events = [raw.event() for _ in range(6)]
        raw.send(ping_line())
        reply, before = raw.reply("after")
        assert_pong(reply, "after")
        assert before == []  # nothing more: subscription 3 heard nothing of the job that ended before it
    assert [(event["subscription"], event["job"]["id"], event["job"]["state"]) for event in events] == [
        (number, job_id, state) for state in ("queued", "running", "succeeded") for number in (1, 2)
    ]


def test_the_events_of_one_turn_reach_a_subscriber_in_a_few_writes_not_one_each(daemon: Any, tmp_path: Path) -> None:
    """A batch of jobs into a paused queue makes all its `job.state` events in the turn of the loop that commits it:
    they are written to a subscriber together, 16 KiB at a time, after the turn (jobd.server, _send_event). Each was
    a send(2) of its own: 1,000 subscribers of a batch of 1,000 jobs were a million in one turn, every other client
    waiting the while (docs/BENCHMARKS.md, "Scale"). Counted by strace on the subscriber's descriptor."""
    trace = tmp_path / "sends"
    daemon.stop()
    daemon.command_prefix = ["strace", "-f", "-qq", "-s", "80", "-o", str(trace), "-e", "trace=sendto,sendmsg,write"]
    daemon.start()
    try:
        daemon.call("queue.pause", {"name": "default"})
        with daemon.client() as subscriber:
            subscriber.call("events.subscribe", {"types": ["job.state"]})
            jobs = daemon.call("job.submit", {"jobs": [{"command": ["/bin/true"]} for _ in range(200)]})["jobs"]
            told = [subscriber.next_event(timeout=DEADLINE)["job"]["id"] for _ in jobs]
            subscriber.call("ping")  # its answer follows the events: the trace holds every send of theirs
    finally:
        assert daemon.process is not None
        jobd = _child_of(daemon.process)
        if jobd is not None:  # strace does not pass a SIGTERM on
            os.kill(jobd, signal.SIGTERM)
        daemon.process.wait(30)
        daemon._closed()
    assert told == [job["id"] for job in jobs]
    # strace writes the data as a C string: `\"` for each quote.
    lines = trace.read_text().replace('\\"', '"').splitlines()
    sends = [line for line in lines if re.search(r"\b(sendto|sendmsg|write)\(", line)]
    [subscribed] = [index for index, line in enumerate(sends) if '"result":{"subscription":1}' in line]
    descriptor = re.search(r"\((\d+),", sends[subscribed])
    assert descriptor is not None, sends[subscribed]
    to_subscriber = [line for line in sends[subscribed + 1 :] if f"({descriptor[1]}, " in line]
    events = [line for line in to_subscriber if '"method":"event"' in line]
    # 200 events of several hundred bytes each: a few writes of 16 KiB (6 when written); one each, 200.
    assert 1 <= len(events) <= 20, to_subscriber


def test_events_of_a_subscription_made_in_a_batch_come_before_the_batch_answer(daemon: Any) -> None:
    """A batch is answered once all its members are done, and the events of the job it submits are sent as they
    happen: they come first, numbered as the batch's answer will number the subscription (docs/protocol.md)."""
    with Raw(daemon.socket_path) as raw:
        raw.send_json(
            [
                {"jsonrpc": "2.0", "id": "sub", "method": "events.subscribe", "params": {"types": ["job.state"]}},
                {"jsonrpc": "2.0", "id": "submit", "method": "job.submit", "params": {"command": ["/bin/true"]}},
                {"jsonrpc": "2.0", "id": "wait", "method": "job.wait", "params": {"id": 1, "timeout": 30}},
            ]
        )
        events = [raw.event() for _ in range(3)]
        answer = raw.message()
    assert [(event["subscription"], event["job"]["id"], event["job"]["state"]) for event in events] == [
        (1, 1, "queued"),
        (1, 1, "running"),
        (1, 1, "succeeded"),
    ]
    assert [member["id"] for member in answer] == ["sub", "submit", "wait"], answer
    assert answer[0]["result"] == {"subscription": 1}
    assert answer[2]["result"]["state"] == "succeeded"


def test_a_job_submitted_and_cancelled_in_one_write_never_runs(daemon: Any) -> None:
    # The submit's reply goes out before its job is queued; the next request on the connection must find the job
    # queued all the same, so that its cancel takes the job out of the queue for good.
    daemon.call("queue.pause", {"name": "serial"})
    last = daemon.submit(command=["/bin/true"], queue="serial")["id"]
    single = [
        {
            "jsonrpc": "2.0",
            "id": "submit",
            "method": "job.submit",
            "params": {"command": ["/bin/true"], "queue": "serial"},
        },
        {"jsonrpc": "2.0", "id": "cancel", "method": "job.cancel", "params": {"id": last + 1}},
    ]
    with Raw(daemon.socket_path) as raw:
        raw.send(b"".join(json.dumps(request).encode() + b"\n" for request in single))  # two lines, one write
        assert raw.message()["result"]["id"] == last + 1
        assert raw.message()["result"]["state"] == "cancelled"
        # The same within one batch: each member's work is done before the next member runs.
        batch = [
            {**single[0], "id": "batch-submit"},
            {**single[1], "id": "batch-cancel", "params": {"id": last + 2}},
        ]
        raw.send_json(batch)
        by_id = {reply["id"]: reply["result"] for reply in raw.message()}
    assert by_id["batch-submit"]["id"] == last + 2
    assert by_id["batch-cancel"]["state"] == "cancelled"
    serial = next(queue for queue in daemon.call("queue.list")["queues"] if queue["name"] == "serial")
    assert serial["queued"] == 1  # the first job only
    daemon.call("queue.resume", {"name": "serial"})
    sentinel = daemon.submit(command=["/bin/true"], queue="serial")["id"]
    assert daemon.wait(sentinel)["state"] == "succeeded"  # the queue has run all it held before the sentinel
    assert daemon.call("job.get", {"id": last})["state"] == "succeeded"
    for job_id in (last + 1, last + 2):
        job = daemon.call("job.get", {"id": job_id})
        assert (job["state"], job["attempts"]) == ("cancelled", 0)


def test_state_events_of_a_delayed_then_queued_job(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        number = subscribe(raw, {"queues": ["serial"]})
        blocker = daemon.submit(command=["/bin/sleep", "30"], queue="serial")
        job = daemon.submit(command=["/bin/true"], queue="serial", delay=0.05)
        # The job waits for its delay, then for the busy queue: the blocker is cancelled only once it is queued.
        states: list[str] = []
        while not states or states[-1] not in FINISHED:
            event = raw.event()
            assert event["subscription"] == number and event["type"] == "job.state"
            if event["job"]["id"] != job["id"]:
                continue
            states.append(event["job"]["state"])
            if states[-1] == "queued":
                daemon.call("job.cancel", {"id": blocker["id"]})
    assert states == ["delayed", "queued", "running", "succeeded"]


def test_a_queue_filter_keeps_other_queues_out(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        subscribe(raw, {"queues": ["serial"]})
        other = daemon.submit(command=["/bin/true"])
        daemon.wait(other["id"])  # all its events were sent before the next job's
        mine = daemon.submit(command=["/bin/true"], queue="serial")
        while True:
            event = raw.event()
            assert event["job"]["id"] == mine["id"], event
            assert event["job"]["queue"] == "serial"
            if event["job"]["state"] in FINISHED:
                break


def test_a_job_filter_keeps_other_jobs_out(daemon: Any) -> None:
    watched = daemon.submit(command=["/bin/true"], delay=3600)
    with Raw(daemon.socket_path) as raw:
        subscribe(raw, {"jobs": [watched["id"]]})
        other = daemon.submit(command=["/bin/true"])
        daemon.wait(other["id"])
        daemon.call("job.cancel", {"id": watched["id"]})
        event = raw.event()  # the first event is about the watched job: the other one's were filtered out
        assert event["type"] == "job.state"
        assert event["job"]["id"] == watched["id"]
        assert event["job"]["state"] == "cancelled"


def test_a_type_filter_keeps_other_types_out(daemon: Any) -> None:
    script = "echo starting >&3; echo '%50' >&3; echo halfway >&3; echo '%100' >&3"
    with Raw(daemon.socket_path) as raw:
        subscribe(raw, {"types": ["job.progress"]})
        job = daemon.submit(command=["/bin/sh", "-c", script])
        seen: list[int] = []
        while 100 not in seen:
            event = raw.event()
            assert event["type"] == "job.progress", event  # no job.state (it started before %50), no job.log
            assert event["id"] == job["id"]
            seen.append(event["progress"])
        assert seen in ([50, 100], [100]), seen  # a burst may be reported by its latest value
    # Its shell may still be exiting after its last line: waited for, it is no zombie at the fixture's check.
    assert daemon.wait(job["id"])["state"] == "succeeded"


def test_log_events_carry_the_lines(daemon: Any) -> None:
    script = "echo one >&3; echo '%30' >&3; echo two >&3"
    with Raw(daemon.socket_path) as raw:
        number = subscribe(raw, {"types": ["job.log", "job.state"]})
        job = daemon.submit(command=["/bin/sh", "-c", script])
        lines: list[str] = []
        finished = False
        while len(lines) < 2 or not finished:
            event = raw.event()
            assert event["subscription"] == number
            assert event["type"] in ("job.log", "job.state"), event  # the %30 progress line is no job.log
            if event["type"] == "job.log":
                assert event["id"] == job["id"]
                lines.append(event["line"])
            else:
                finished = event["job"]["state"] in FINISHED
    assert lines == ["one", "two"]


def test_events_go_only_to_the_subscribed_connection(daemon: Any) -> None:
    with Raw(daemon.socket_path) as quiet, Raw(daemon.socket_path) as listener:
        quiet.send(ping_line(1))
        assert_pong(quiet.message(), 1)
        subscribe(listener, {})
        job = daemon.submit(command=["/bin/true"])
        daemon.wait(job["id"])
        quiet.send(ping_line(2))
        assert_pong(quiet.message(), 2)  # no event came before it
        assert listener.event()["job"]["id"] == job["id"]


# -- misbehaving clients -----------------------------------------------------------------------------------------


def test_a_stalled_client_does_not_block_others(daemon: Any) -> None:
    with Raw(daemon.socket_path) as stalled, Raw(daemon.socket_path) as other:
        request = ping_line("late")
        stalled.send(request[:20])
        other.send(ping_line("now"))
        assert_pong(other.message(), "now")
        job = daemon.submit(command=["/bin/true"])
        assert daemon.wait(job["id"])["state"] == "succeeded"
        stalled.send(request[20:])  # it can still finish its request
        assert_pong(stalled.message(), "late")


def test_a_client_that_connects_and_leaves_at_once(daemon: Any) -> None:
    for _ in range(20):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemon.socket_path))
        sock.close()
    assert_alive(daemon)


def test_clients_that_leave_mid_conversation(daemon: Any) -> None:
    sleeper = daemon.submit(command=["/bin/sleep", "30"])
    pending = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "job.wait", "params": {"id": sleeper["id"]}})
    for data in (
        b"{",
        pending.encode() + b"\n",
        b"[" * 1000,
        b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n',
    ):
        with Raw(daemon.socket_path) as raw:
            raw.send(data)
        assert_alive(daemon)
    # The subscription of a client that left is gone with it: events for it do not trouble the daemon.
    daemon.call("job.cancel", {"id": sleeper["id"]})
    assert_alive(daemon)
    no_traceback_in_log(daemon)


def test_xml_first_byte_switches_to_evqueues_xml_protocol(daemon: Any) -> None:
    # No greeting on this socket (the client spoke first); tests/test_evqueue_protocol.py covers the XML protocol.
    with Raw(daemon.socket_path) as raw:
        raw.send(b'<status type="scheduler" />\n')
        reply = raw.line()
        assert reply.startswith(b"<response"), reply
        assert b'status="KO"' in reply and b'error-code="UNKNOWN_COMMAND"' in reply
        raw.send(b'<status action="query" type="scheduler" />\n')
        assert raw.line().startswith(b'<response node="'), raw.received
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.read_to_eof() == b""
    assert b"Traceback" not in raw.received
    assert_alive(daemon)


def test_xml_after_blanks_is_evqueues_xml_protocol_too(daemon: Any) -> None:
    """docs/protocol.md: the first byte after any blanks picks the protocol, `<` evQueue's XML. Blanks first made
    the connection JSON-RPC's, and `<ping/>` after them went unanswered (a JSON line waits for its newline), then was
    a PARSE_ERROR. The blanks and the request come in two reads: the choice waits for the byte that makes it."""
    with Raw(daemon.socket_path) as raw:
        raw.send(b"\r\n \t")
        with Raw(daemon.socket_path) as other:  # answered once jobd has read what came before it: the blanks
            other.send(ping_line(1))
            assert_pong(other.message(), 1)
        raw.send(b'\n<status action="query" type="scheduler" />\n')
        assert raw.line().startswith(b'<response node="'), raw.received
        raw.send(b"  <ping/>")
        assert raw.line().startswith(b"<response "), raw.received
    assert_alive(daemon)


def test_an_unknown_first_byte_is_refused_and_the_daemon_stays_up(daemon: Any) -> None:
    for data in (
        b"x",
        b"GET / HTTP/1.0\r\n\r\n",
        b"\x00\xff\xfe",
        b"\x16\x03\x01\x02\x00",
        b'"ping"\n',
        b"\xef\xbb\xbf{}\n",
        # Blanks first choose nothing: what follows them is refused alike (it was taken for JSON-RPC, and answered
        # PARSE_ERROR on a connection left open).
        b"\n x\n",
        b' \r\n\t"ping"\n',
        b"\n\xef\xbb\xbf{}\n",
    ):
        with Raw(daemon.socket_path) as raw:
            raw.send(data)
            reply = raw.read_to_eof()  # refused, and the connection closed
        assert b"Traceback" not in reply
        for line in reply.splitlines():
            assert error_of(json.loads(line))["data"]["code"] == "INVALID_REQUEST", (data, reply)
        assert_alive(daemon)


def test_leading_whitespace_before_json_is_accepted(daemon: Any) -> None:
    with Raw(daemon.socket_path) as raw:
        raw.send(b"\n  \t" + ping_line(1))
        assert_pong(raw.message(), 1)
        # docs/protocol.md: blank lines are skipped, unanswered, and a \r before the \n is a blank (CRLF clients)
        raw.send(b"\n \r\n\t\n" + ping_line(2).replace(b"\n", b"\r\n") + b"\r\n" + ping_line(3))
        assert_pong(raw.message(), 2)
        assert_pong(raw.message(), 3)
