"""The HTTP listener (docs/http.md) against a real jobd on 127.0.0.1:0: bearer tokens and rights, the Queue Server
endpoints through curl with its README's payloads unchanged, the JSON endpoints, Server-Sent Events with a
reconnect by Last-Event-ID, and /metrics parsed by prometheus_client. Every read blocks (with a deadline); nothing
sleeps or polls."""

from __future__ import annotations

import contextlib
import grp
import gzip
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from harness import open_descriptors
from prometheus_client.parser import text_string_to_metric_families
from recovery.support import closes_settled, descriptors_limited, wait_for_log

from jobd.config import load_dir
from jobd.errors import ConfigError
from jobd.http_api import EVENT_OVERHEAD, EVENT_RING_BYTES, SSE_QUEUE_BYTES, HttpApi, _Event, _Pending
from jobd.peer import Peer
from tests.http_waits import answer, send_head_identified, send_waiting_request
from tests.test_callbacks import Receiver

ADMIN_TOKEN = "s3cret-admin-token"
CAROL_TOKEN = "carol-token"
CONFIG = f"""
[http]
listen = "127.0.0.1:0"

[http.tokens.ops]
token_sha256 = "{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}"
user = "root"  # a local account: ad-hoc commands run as it
admin = true

[http.tokens.carol]
token_sha256 = "{hashlib.sha256(CAROL_TOKEN.encode()).hexdigest()}"
user = "carol"

[queue.default]
concurrency = 2
"""
TIMEOUT = 30


def address(daemon: Any) -> tuple[str, int]:
    listen = daemon.call("daemon.status")["http_listen"]
    host, port = listen.rsplit(":", 1)
    return host, int(port)


def token_table(name: str, token: str, user: str, admin: bool) -> str:
    """An [http.tokens.NAME] table of `token`."""
    return f"""
[http.tokens.{name}]
token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"
user = "{user}"
admin = {str(admin).lower()}
"""


def request(daemon: Any, method: str, path: str, body: Any = None, token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(*address(daemon), timeout=TIMEOUT)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connection.request(method, path, None if body is None else json.dumps(body), headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    text = data.decode()
    return response.status, (
        json.loads(text) if response.getheader("Content-Type", "").startswith("application/json") else text
    )


def curl(daemon: Any, *args: str) -> Any:
    host, port = address(daemon)
    out = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: Bearer {ADMIN_TOKEN}", *args[:-1], f"http://{host}:{port}{args[-1]}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert '"error"' not in out.stdout, out.stdout
    return json.loads(out.stdout)


class Events:
    """A GET /events stream read event by event (blocking reads with a deadline)."""

    def __init__(
        self, daemon: Any, query: str = "", last_id: int | bytes | None = None, token: str = ADMIN_TOKEN
    ) -> None:
        self.connection = http.client.HTTPConnection(*address(daemon), timeout=TIMEOUT)
        headers: dict[str, str | bytes] = {"Authorization": f"Bearer {token}"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id if isinstance(last_id, bytes) else str(last_id)
        self.connection.request("GET", "/events" + query, headers=headers)
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")
        assert self.response.readline() == b": jobd events\n"
        assert self.response.readline() == b"\n"

    def next(self) -> tuple[int, str, dict[str, Any]]:
        """The next event; comments (a quiet stream's keep-alive) are passed over, as EventSource does."""
        while True:
            fields = self.block()
            if set(fields) != {""}:
                return int(fields["id"]), fields["event"], json.loads(fields["data"])

    def block(self) -> dict[str, str]:
        """The fields of the next block of lines up to a blank one; a comment's text under the name ""."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline().decode()
            assert line, "the event stream ended"
            if line == "\n":
                return fields
            name, _, value = line.rstrip("\n").partition(": ")
            fields[name] = value

    def until_finished(self, job_id: int) -> list[tuple[int, str, dict[str, Any]]]:
        seen = []
        while True:
            event = self.next()
            seen.append(event)
            _, kind, data = event
            if kind == "job.state" and data["job"]["id"] == job_id and data["job"]["finished_at"] is not None:
                return seen

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    return make_daemon(CONFIG)


def test_a_port_in_use_stops_start_up_with_a_clear_error(make_daemon: Any) -> None:
    """As for [tcp] listen: the address as written in the configuration, and the kernel's reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = make_daemon(f'[http]\nlisten = "127.0.0.1:{port}"\n', start=False).start_refused()
    assert done.returncode == 1
    assert (
        f"not starting: cannot listen for HTTP on 127.0.0.1:{port} ([http] listen): Address already in use\n"
        in done.stderr
    )


def test_authentication_and_rights(daemon: Any) -> None:
    status, body = request(daemon, "GET", "/jobs/status", token=None)
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    status, body = request(daemon, "GET", "/jobs/status", token="wrong")
    assert status == 401
    job = daemon.submit(command=["true"])
    status, body = request(daemon, "GET", f"/jobs/status/{job['id']}", token=CAROL_TOKEN)
    assert status == 403 and body["error"]["code"] == "INSUFFICIENT_RIGHTS"
    assert body["error"]["missing"] == "read" and "read right is missing" in body["error"]["message"]
    # An id that names no job is refused to carol as the job she may not read is (it was a 404 UNKNOWN_JOB: she
    # could tell the ids of the jobs of others from those of none).
    hidden = body["error"]
    status, body = request(daemon, "GET", "/jobs/status/999999", token=CAROL_TOKEN)
    message = hidden["message"].replace(f"job {job['id']}:", "job 999999:")
    assert status == 403 and body["error"] == {**hidden, "message": message, "name": "999999"}, (body, hidden)
    for job_id in (job["id"], 999999):
        status, body = request(daemon, "POST", "/api/job.get", {"id": job_id}, token=CAROL_TOKEN)
        assert status == 403 and body["error"]["code"] == "INSUFFICIENT_RIGHTS", body
    status, body = request(daemon, "GET", "/jobs/status/999999")  # the admin is told there is none
    assert status == 404 and body["error"]["code"] == "UNKNOWN_JOB"
    status, body = request(daemon, "POST", "/api/job.submit", {"command": ["true"]}, token=CAROL_TOKEN)
    assert status == 403 and body["error"]["missing"] == "admin"
    status, body = request(daemon, "GET", "/metrics", token=CAROL_TOKEN)
    assert status == 403


def test_queue_server_payloads_through_curl(daemon: Any) -> None:
    daemon.call("queue.pause", {"name": "default"})  # the jobs stay queued: what was stored is what is checked
    http_payload = (
        '{"priority": 800, "context": "MyCoolApp", '
        '"command": {"type": "http", "url": "http://127.0.0.1:9/job?jobid=__JOBID__", "method": "GET", '
        '"timeout": 20, "params": {"a": "1"}}, '
        '"callback_done": {"type": "http", "url": "http://127.0.0.1:9/done", "method": "GET"}}'
    )
    added = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json", "-d", http_payload, "/jobs/add")
    assert added["status"] == "OK"
    exec_payload = '{"context": "MyCoolApp", "command": {"type": "exec", "cmd": "echo hello"}}'
    second = curl(daemon, "-X", "POST", "-d", exec_payload, "/jobs/add")
    status = curl(daemon, "/jobs/status")
    assert status == {"status": 200, "data": {"waiting": 2, "working": 0, "max_threads": 2, "free_threads": 2}}
    first = daemon.call("job.get", {"id": added["job_id"]})
    assert first["context"] == "MyCoolApp" and first["command"] == []
    assert first["priority"] == 1024 - 300  # Queue Server 800 (higher first) onto jobd's lower-first order
    assert daemon.call("job.get", {"id": second["job_id"]})["priority"] == 1024  # its default 500
    one = curl(daemon, f"/jobs/status/{added['job_id']}")
    assert one["id"] == added["job_id"] and one["worker_status"] == 0 and one["priority"] == 724
    daemon.call("job.cancel", {"id": added["job_id"]})
    daemon.call("queue.resume", {"name": "default"})
    assert daemon.wait(second["job_id"])["state"] == "succeeded"
    assert daemon.output(second["job_id"]) == "hello\n"
    assert curl(daemon, f"/jobs/status/{second['job_id']}")["worker_status"] == 3
    status_code, body = request(daemon, "GET", "/jobs/status/999999")
    assert status_code == 404 and body["error"]["code"] == "UNKNOWN_JOB"


def test_json_endpoints(daemon: Any) -> None:
    status, body = request(daemon, "POST", "/api/job.submit", {"command": ["sh", "-c", "echo hi"]})
    assert status == 200
    assert body["result"]["state"] == "queued"  # as committed, as over the socket: it starts right after
    job_id = body["result"]["id"]
    status, body = request(daemon, "POST", "/api/job.wait", {"id": job_id, "timeout": 20})
    assert status == 200 and body["result"]["state"] == "succeeded"
    status, body = request(daemon, "POST", "/api/job.get", {"id": 424242})
    assert status == 404 and body["error"]["code"] == "UNKNOWN_JOB"
    status, body = request(daemon, "POST", "/api/job.get", {"id": "x"})
    assert status == 400 and body["error"]["code"] == "INVALID_PARAMS"
    status, body = request(daemon, "POST", "/api/no.such", {})
    assert status == 404 and body["error"]["code"] == "METHOD_NOT_FOUND"
    # What may be called here: the socket's methods but events.subscribe, which HTTP serves as GET /events.
    offered = body["error"]["allowed"]
    assert "job.submit" in offered and "events.subscribe" not in offered, offered
    assert body["error"]["message"] == f'no method "no.such"; methods: {", ".join(offered)}'
    status, body = request(daemon, "POST", "/api/queue.list", None)
    assert status == 200 and any(queue["name"] == "default" for queue in body["result"]["queues"])


def test_events_subscribe_is_refused_naming_it_and_get_events(daemon: Any) -> None:
    """docs/http.md: `events.subscribe` is not available as POST /api/events.subscribe; the refusal names the method
    as the client called it and says what to use instead."""
    status, body = request(daemon, "POST", "/api/events.subscribe", {})
    assert status == 400 and body["error"]["code"] == "INVALID_PARAMS"
    assert body["error"]["message"].startswith("events.subscribe is not available over HTTP; use GET /events")


def test_names_the_os_gave_undecoded_are_shown_as_over_the_socket(daemon: Any) -> None:
    """A drop-in named in Latin-1 (`café.toml`): its name reaches the HTTP API's JSON as the socket API shows it,
    `\\xe9`, not as JSON's `\\udce9` escape of a lone surrogate, which many decoders refuse."""
    with open(os.fsencode(daemon.config_dir / "jobd.d") + b"/10-caf\xe9.toml", "w") as drop_in:
        drop_in.write("[queue.latin]\nconcurrency = 1\n")
    assert daemon.call("daemon.reload")["ok"] is True
    connection = http.client.HTTPConnection(*address(daemon), timeout=TIMEOUT)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"}
    connection.request("POST", "/api/daemon.status", "{}", headers)
    raw = connection.getresponse().read()
    connection.close()
    assert b"\\udc" not in raw, raw
    shown = str(daemon.config_dir / "jobd.d" / "10-caf\\xe9.toml")
    assert shown in json.loads(raw.decode("utf-8"))["result"]["config_files"], raw
    assert shown in daemon.call("daemon.status")["config_files"]  # the same over the socket


def test_events_in_order_and_replayed_after_a_reconnect(daemon: Any) -> None:
    stream = Events(daemon)
    first = daemon.submit(command=["sh", "-c", "echo one"])
    seen = stream.until_finished(first["id"])
    ids = [event_id for event_id, _, _ in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    states = [data["job"]["state"] for _, kind, data in seen if kind == "job.state"]
    assert states == ["queued", "running", "succeeded"]  # Events() read the opening comment: nothing was missed
    last_seen = ids[-1]
    stream.close()
    # Missed while disconnected: the second job's whole life.
    second = daemon.submit(command=["sh", "-c", "echo two"])
    daemon.wait(second["id"])
    everything = Events(daemon, last_id=0)  # the whole ring: the reference for what was missed
    reference = everything.until_finished(second["id"])
    everything.close()
    missed = [event for event in reference if event[0] > last_seen]
    assert missed and all(event[2].get("id", event[2].get("job", {}).get("id")) == second["id"] for event in missed)
    again = Events(daemon, last_id=last_seen)
    assert again.until_finished(second["id"]) == missed
    again.close()
    # EventSource polyfills that cannot set a header send the id as a query parameter instead.
    polyfilled = Events(daemon, query=f"?lastEventId={last_seen}")
    assert polyfilled.until_finished(second["id"]) == missed
    polyfilled.close()
    only = Events(daemon, query=f"?jobs={second['id']}&types=job.state", last_id=0)
    filtered = only.until_finished(second["id"])
    only.close()
    assert filtered == [
        event for event in reference if event[1] == "job.state" and event[2]["job"]["id"] == second["id"]
    ]


def test_a_reload_ends_the_streams_of_a_removed_token_and_applies_to_the_others(daemon: Any) -> None:
    # An /events stream kept the identity its token had when it connected: a token removed from the configuration
    # (leaked, say) went on receiving every event for as long as its client held the connection.
    gone, demoted, kept = "a-token-to-remove", "a-token-to-demote", "a-token-to-keep"

    def tokens(demoted_is_admin: bool, with_gone: bool) -> str:
        text = """
[queue.visible]
concurrency = 1

[[access.grant]]
users = ["nobody"]
rights = ["read"]
queues = ["visible"]
"""
        text += token_table("demoted", demoted, "nobody", demoted_is_admin) + token_table("kept", kept, "nobody", True)
        return text + (token_table("gone", gone, "root", True) if with_gone else "")

    drop_in = daemon.config_dir / "jobd.d" / "tokens.toml"
    drop_in.write_text(tokens(demoted_is_admin=True, with_gone=True))
    assert daemon.call("daemon.reload")["ok"]
    removed, lowered = Events(daemon, "?types=job.state", token=gone), Events(daemon, "?types=job.state", token=demoted)
    unchanged = Events(daemon, "?types=job.state", token=kept)
    first = daemon.submit(command=["true"])  # an ad-hoc job: only admins may read it
    daemon.wait(first["id"])
    for stream in (removed, lowered, unchanged):
        assert stream.until_finished(first["id"])
    drop_in.write_text(tokens(demoted_is_admin=False, with_gone=False))
    assert daemon.call("daemon.reload")["ok"]
    hidden = daemon.submit(command=["true"])
    daemon.wait(hidden["id"])
    shown = daemon.submit(command=["true"], queue="visible")
    daemon.wait(shown["id"])
    # The demoted token's stream goes on, as a client that may read queue `visible` only; the unchanged one's as an
    # admin still (its table says so, though its user is none).
    assert {data["job"]["id"] for _, _, data in lowered.until_finished(shown["id"])} == {shown["id"]}
    lowered.close()
    assert {data["job"]["id"] for _, _, data in unchanged.until_finished(shown["id"])} == {hidden["id"], shown["id"]}
    unchanged.close()
    # The removed token's stream has ended, at the reload: nothing of the later jobs reached it.
    rest = b""
    with contextlib.suppress(http.client.IncompleteRead):  # its end is its connection's
        while line := removed.response.readline():
            rest += line
    removed.close()
    assert rest == b""
    assert "a GET /events client's token is no longer configured; disconnecting it" in daemon.log()


def waiting_request(daemon: Any, token: str, method: str, params: dict[str, Any]) -> socket.socket:
    """A connection to jobd's HTTP listener whose request `method` is sent, its client identified (http_waits)."""
    connection = socket.create_connection(address(daemon), timeout=TIMEOUT)
    send_waiting_request(connection, method, params, token)
    return connection


def test_a_request_waiting_when_a_reload_changes_or_removes_its_token_is_answered_as_a_new_one_is(daemon: Any) -> None:
    """A job.wait or job.output with `wait` over HTTP was checked again at a reload with the identity its token had
    when the request came: a token removed from the configuration (leaked, say), or no longer an admin's, went on
    waiting, and was answered the job once it ended, telling when it did. It is checked as its token is now: a
    removed token's request is answered 401 at the reload, a demoted one's the refusal a new request gets."""
    removed, demoted = "a-waiting-token-to-remove", "a-waiting-token-to-demote"

    def tokens(with_removed: bool) -> str:
        text = token_table("demoted", demoted, "nobody", admin=with_removed)
        return text + (token_table("removed", removed, "root", admin=True) if with_removed else "")

    drop_in = daemon.config_dir / "jobd.d" / "tokens.toml"
    drop_in.write_text(tokens(with_removed=True))
    assert daemon.call("daemon.reload")["ok"]
    job = daemon.submit(command=["sleep", "120"])  # an ad-hoc job: only admins may read it
    waits = {
        removed: waiting_request(daemon, removed, "job.wait", {"id": job["id"], "timeout": 120}),
        demoted: waiting_request(daemon, demoted, "job.output", {"id": job["id"], "wait": True}),
    }
    try:
        drop_in.write_text(tokens(with_removed=False))
        assert daemon.call("daemon.reload")["ok"]
        got = {token: answer(connection) for token, connection in waits.items()}
        # Answered at the reload, while the job still runs: not when it ends.
        assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"
    finally:
        for connection in waits.values():
            connection.close()
        daemon.call("job.cancel", {"id": job["id"]})
    assert got[removed] == request(daemon, "POST", "/api/job.wait", {"id": job["id"]}, token=removed)
    assert got[removed][0] == 401, got
    assert got[demoted] == request(daemon, "POST", "/api/job.output", {"id": job["id"]}, token=demoted)
    assert got[demoted][0] == 403 and got[demoted][1]["error"]["missing"] == "read", got


SLOW_WORKFLOW = (
    '<workflow><subjobs><job name="one"><tasks><task name="slow" path="/bin/sleep 120" queue="default"/>'
    "</tasks></job></subjobs></workflow>"
)


def test_an_output_or_instance_wait_whose_token_a_reload_removes_is_answered_401_at_the_reload(
    make_daemon: Any,
) -> None:
    """A job.output with `wait` and an instance.wait are checked again at a reload as their token now is, as a
    job.wait is: a token the reload removed is answered 401 at once, as a new request with it is, not the output or
    the instance once they come."""
    daemon = make_daemon(CONFIG, start=False)
    daemon.write_workflows(slow=SLOW_WORKFLOW)
    daemon.start()
    for_output, for_instance = "a-token-waiting-for-output", "a-token-waiting-for-an-instance"
    drop_in = daemon.config_dir / "jobd.d" / "tokens.toml"
    drop_in.write_text(
        token_table("output", for_output, "root", admin=True) + token_table("instance", for_instance, "root", True)
    )
    assert daemon.call("daemon.reload")["ok"]
    job = daemon.submit(command=["sleep", "120"])  # it writes nothing: job.output waits until it ends
    instance = daemon.call("instance.launch", {"workflow": "slow"})
    asked = {
        for_output: ("job.output", {"id": job["id"], "wait": True}),
        for_instance: ("instance.wait", {"id": instance["id"], "timeout": 120}),
    }
    waits = {token: waiting_request(daemon, token, method, params) for token, (method, params) in asked.items()}
    try:
        drop_in.write_text("")
        assert daemon.call("daemon.reload")["ok"]
        got = {token: answer(connection) for token, connection in waits.items()}
        # Answered at the reload, while the job and the instance still run: not when they end.
        assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"
        assert daemon.call("instance.get", {"id": instance["id"]})["status"] != "TERMINATED"
    finally:
        for connection in waits.values():
            connection.close()
        daemon.call("job.cancel", {"id": job["id"]})
        daemon.call("instance.cancel", {"id": instance["id"]})
    for token, (method, params) in asked.items():
        assert got[token] == request(daemon, "POST", f"/api/{method}", params, token=token)
        assert got[token][0] == 401, got


def test_a_cancel_whose_token_a_reload_removed_while_its_body_came_is_answered_401_and_cancels_nothing(
    daemon: Any,
) -> None:
    """A request is identified by its token when its head comes, and runs once its body has: a reload in between
    that removed the token has it answered 401, as a new request with that token is, with nothing done. A job.cancel
    so refused cancels nothing and, as any request without a valid token, leaves no audit entry; jobd logs it, as
    it does an event stream it ends for its token."""
    removed = "a-cancelling-token-to-remove"
    drop_in = daemon.config_dir / "jobd.d" / "tokens.toml"
    drop_in.write_text(token_table("removed", removed, "root", admin=True))
    assert daemon.call("daemon.reload")["ok"]
    job = daemon.submit(command=["sleep", "120"])
    try:
        with socket.create_connection(address(daemon), timeout=TIMEOUT) as connection:
            body = send_head_identified(connection, "job.cancel", removed, {"id": job["id"]})
            drop_in.write_text("")
            assert daemon.call("daemon.reload")["ok"]
            connection.sendall(body)
            got = answer(connection)
        assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"
    finally:
        if daemon.call("job.get", {"id": job["id"]})["state"] == "running":
            daemon.call("job.cancel", {"id": job["id"]})
    assert got == request(daemon, "POST", "/api/job.cancel", {"id": job["id"]}, token=removed)
    assert got[0] == 401, got
    cancels = daemon.call("audit.list", {"command": "job.cancel"})["entries"]
    assert [entry["result"] for entry in cancels] == ["ok"], cancels  # the test's own, as root
    log = daemon.log()
    assert "a POST /api/job.cancel client's token is no longer configured; answered 401" in log, log
    assert "internal error" not in log, log


def test_a_wait_whose_token_jobd_cannot_look_up_at_a_reload_is_answered_503(make_daemon: Any) -> None:
    """A request waiting at a reload is checked as its token now is, and a token's `user` is looked up again then.
    Without a descriptor to spare to read the passwd database with, glibc says "no such user", which would make the
    token's local user a remote client: the wait is answered 503 OUT_OF_RESOURCES instead, as a new request is then.

    jobd is left a few descriptors (enough to read its files at the reload) and stopped (SIGSTOP) while the test
    sends it a daemon.reload, then connects more HTTP clients than it has descriptors: jobd reads the reload, then
    accepts those clients until it has no descriptor left, in the same turn of its loop, before the wait's check.
    The token's user is `daemon`, an account of /etc/passwd alone (glibc's systemd module makes up `root` and
    `nobody` without opening anything)."""
    token = "a-token-of-the-daemon-account"
    daemon = make_daemon(CONFIG + token_table("daemon", token, "daemon", admin=True))
    job = daemon.submit(command=["sleep", "120"])  # an ad-hoc job: the token is an admin's, and may wait for it
    wait = waiting_request(daemon, token, "job.wait", {"id": job["id"], "timeout": 120})
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin.connect(str(daemon.socket_path))
    replies = admin.makefile("rb")
    admin.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')
    assert json.loads(replies.readline())["id"] == 1  # the connection is taken: its next request is read at once
    listener = address(daemon)
    daemon.call("audit.list", {"limit": 1})  # the entries waiting are written now, not once jobd has few descriptors
    try:
        # 16 more: what reading the configuration takes at once, and more.
        with contextlib.ExitStack() as clients, descriptors_limited(daemon, 16) as free:
            # The admin's connection is not on epoll's list of ready ones (jobd has asked epoll again since it read
            # the ping), so it comes before the HTTP listener in it once both are ready.
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                os.waitid(os.P_PID, daemon.pid, os.WSTOPPED | os.WNOWAIT)  # returns once jobd is stopped
                admin.sendall(b'{"jsonrpc": "2.0", "id": 2, "method": "daemon.reload"}\n')
                for _ in range(free + 16):  # queued by the kernel (the listen backlog, 100), to be accepted
                    clients.enter_context(socket.create_connection(listener, timeout=TIMEOUT))
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            assert json.loads(replies.readline())["result"]["ok"] is True
            status, body = answer(wait)
        # Answered at the reload, while the job still runs (asked once the clients that held jobd's descriptors
        # have gone).
        assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"
    finally:
        admin.close()
        wait.close()
        daemon.call("job.cancel", {"id": job["id"]})
    assert (status, body["error"]["code"]) == (503, "OUT_OF_RESOURCES"), (status, body)
    assert body["error"]["message"] == (
        "cannot look up the user 'daemon': Too many open files (jobd is short of open files or memory: see "
        "LimitNOFILE=); ask again later"
    )
    assert "internal error" not in daemon.log()


def test_events_filters_that_are_not_understood_are_refused(daemon: Any) -> None:
    """A filter jobd cannot read is an error, as for events.subscribe: dropped, it would widen the stream to every
    event the client may read."""
    for query, param, named in (
        # A value is quoted as the client sent it, JSON-style as in every refusal of jobd (not Python's 'seven').
        ("?instances=seven", "instances", 'instances = "seven" is not allowed; expected instance ids'),
        ("?jobs=1,x", "jobs", 'jobs = "1,x" is not allowed; expected job ids, comma-separated'),
        ("?types=job.stat", "types", 'types = "job.stat" is not allowed; expected job.state | '),
        ("?types=it's", "types", 'types = "it\'s" is not allowed'),  # repr would have switched to double quotes
        ('?jobs="1"', "jobs", 'jobs = "\\"1\\"" is not allowed'),  # and kept these unescaped in single ones
        # A name it does not know: dropped, it was every event. Named as job.submit names one, with the allowed.
        ("?job=3", "job", "GET /events: unknown parameter 'job'; allowed: instances, jobs, lastEventId, queues, "),
        ("?queues=a&type=job.state", "type", "unknown parameter 'type'; allowed: "),
    ):
        status, body = request(daemon, "GET", "/events" + query.replace('"', "%22"))
        assert (status, body["error"]["code"], body["error"]["param"]) == (400, "INVALID_PARAMS", param), body
        assert named in body["error"]["message"], body
    assert "instance.state" in request(daemon, "GET", "/events?types=nope")[1]["error"]["message"]  # the allowed
    unknown = request(daemon, "GET", "/events?job=3")[1]["error"]
    assert unknown["allowed"] == ["instances", "jobs", "lastEventId", "queues", "types", "workflows"], unknown


def test_an_event_stream_its_client_left_frees_its_connection(make_daemon: Any) -> None:
    """A stream that nothing is sent on (its filter matches nothing now) ends when its client goes away: it does not
    keep counting against max_connections until some event would have been written to it."""
    daemon = make_daemon(CONFIG, daemon_extra="max_connections = 2\n")
    for _ in range(3):
        stream = Events(daemon, query="?instances=999")
        stream.close()
    status, _ = request(daemon, "GET", "/metrics")
    assert status == 200


def test_a_stop_ends_the_http_clients_that_would_hold_it_up(make_daemon: Any) -> None:
    """jobd's stop ends a stream whose client does not read, a request whose body does not come, and a connection
    kept alive after its answer, within a moment. The first held the stop until aiohttp's minute had run out twice
    (aiohttp 3.9 and later), the second for one minute; on Debian 12's aiohttp 3.8 the third held jobd's exit for
    75 s (its keep-alive timeout). systemd SIGKILLed jobd at TimeoutStopSec= (30 s) instead."""
    daemon = make_daemon(CONFIG)
    token = b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
    stalled = socket.create_connection(address(daemon), timeout=TIMEOUT)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"GET /events HTTP/1.1\r\nHost: jobd\r\n" + token + b"\r\n")
    daemon.wait(daemon.submit(command=_long_log_lines(200))["id"])  # 12 MB of events it does not read
    uploading = socket.create_connection(address(daemon), timeout=TIMEOUT)
    uploading.sendall(b"POST /api/job.list HTTP/1.1\r\nHost: jobd\r\n" + token + b"Content-Length: 100\r\n\r\n{")
    waiting = socket.create_connection(address(daemon), timeout=TIMEOUT)
    job = daemon.submit(command=["sleep", "60"])
    body = json.dumps({"id": job["id"], "timeout": 600}).encode()
    waiting.sendall(
        b"POST /api/job.wait HTTP/1.1\r\nHost: jobd\r\n" + token + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    waiting.sendall(body)
    assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"
    assert daemon.stop(timeout=10) == 0
    assert b" 409 " in waiting.recv(65536).split(b"\r\n")[0]  # SHUTTING_DOWN, then the end of the connection
    for connection in (stalled, uploading, waiting):
        connection.close()


# aiohttp as Debian 12 has it (3.8): it does not cancel the handler of a request whose client has gone.
NO_HANDLER_CANCELLATION_SHIM = """
from jobd import http_api

http_api._RUNNER_OPTIONS = {}
"""


def _started_with_shim(make_daemon: Any, tmp_path: Path, shim_text: str, daemon_extra: str = "") -> Any:
    """A daemon of CONFIG started with `shim_text` as its sitecustomize (run first as Python starts)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(shim_text)
    daemon = make_daemon(CONFIG, start=False, daemon_extra=daemon_extra)
    daemon.env["PYTHONPATH"] = str(shim)
    daemon.start()
    return daemon


HANDLERS_COUNTED_SHIM = """
import gc
import logging
import signal


def count_handlers(_number, _frame):
    from aiohttp.web_protocol import RequestHandler

    gc.collect()
    alive = sum(isinstance(thing, RequestHandler) for thing in gc.get_objects())
    logging.getLogger("jobd.test").warning("test probe: %d HTTP connection handlers alive", alive)


signal.signal(signal.SIGUSR2, count_handlers)
"""


def test_closed_connections_leave_no_handler_behind(make_daemon: Any, tmp_path: Path) -> None:
    """An HTTP connection's handler goes with the connection. Each connection's timer that closes it if no request
    comes within 30 s kept its handler alive for those 30 s after the connection had closed: at a web page's rate of
    requests, thousands of them (13 MB after 5,400 connections in half a minute). A shim in jobd counts the handlers
    alive once 300 connections that each made a request and 300 that made none have closed."""
    daemon = _started_with_shim(make_daemon, tmp_path, HANDLERS_COUNTED_SHIM)
    for _ in range(300):
        assert request(daemon, "GET", "/jobs/status")[0] == 200
        socket.create_connection(address(daemon), timeout=TIMEOUT).close()
    with contextlib.ExitStack() as held:
        closes_settled(daemon, held)
        os.kill(daemon.pid, signal.SIGUSR2)
        wait_for_log(daemon, "test probe:")
    counted = re.search(r"test probe: (\d+) HTTP connection handlers alive", daemon.log())
    # 600 before; the last connection's request may still be ending (aiohttp's task of it ends a turn later).
    assert counted is not None and int(counted[1]) < 10, daemon.log()[-2000:]


def test_a_gone_clients_request_is_cancelled_where_aiohttp_does_not_do_it(make_daemon: Any, tmp_path: Path) -> None:
    """Debian 12's aiohttp (3.8) lets the handler of a request whose client has gone run on, which jobd counts
    against max_connections: two streams whose clients had left (their filter matching nothing) had every later
    request answered 503, for good; and a client gone in the middle of its body was logged as a bug in jobd, with
    its traceback. jobd cancels such a request itself; aiohttp from 3.9 on is asked to, and is told not to here."""
    daemon = _started_with_shim(make_daemon, tmp_path, NO_HANDLER_CANCELLATION_SHIM, "max_connections = 2\n")
    for _ in range(3):
        stream = Events(daemon, query="?instances=999")
        stream.close()
    with socket.create_connection(address(daemon), timeout=TIMEOUT) as connection:
        token = b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
        connection.sendall(b"POST /api/job.list HTTP/1.1\r\nHost: jobd\r\n" + token + b"Content-Length: 9\r\n\r\n{")
    assert request(daemon, "GET", "/metrics")[0] == 200
    assert "Traceback" not in daemon.log() and " ERROR " not in daemon.log(), daemon.log()


def _long_log_lines(count: int) -> list[str]:
    """A command printing `count` log lines of LONG_LINE characters on fd 3 (jobd keeps lines up to 64 KiB whole)."""
    return [
        "/bin/sh",
        "-c",
        f"l=$(head -c {LONG_LINE} /dev/zero | tr '\\0' x); for i in $(seq {count}); do echo $l >&3; done",
    ]


LONG_LINE = 64_000


def test_the_event_ring_holds_at_most_its_bytes_of_long_log_lines(daemon: Any) -> None:
    # Counted in events alone, the ring kept the last 10,000 whatever their size: a job printing long log lines left
    # 10,000 of 64 KB in jobd's memory (690 MB) until 10,000 other events pushed them out.
    job = daemon.submit(command=_long_log_lines(400))  # 25.6 MB of log lines
    daemon.wait(job["id"])
    replay = Events(daemon, query=f"?jobs={job['id']}", last_id=0)
    kept = [data["line"] for _, kind, data in replay.until_finished(job["id"]) if kind == "job.log"]
    replay.close()
    assert 0 < len(kept) < 400 and sum(map(len, kept)) <= EVENT_RING_BYTES
    assert len(kept) * (LONG_LINE + EVENT_OVERHEAD) > EVENT_RING_BYTES - 2 * (LONG_LINE + EVENT_OVERHEAD)  # the newest


def test_the_event_ring_counts_the_texts_a_client_gave_its_jobs(daemon: Any) -> None:
    # Only a state event's command was counted: 40 jobs with a context of 900 KB (a request's 1 MiB allows it) left
    # their 120 state events, 108 MB, in the ring, counted as 120 KiB; 300 such jobs took jobd from 51 to 318 MB.
    context = "c" * 900_000
    with daemon.client() as client:
        ids = [
            client.call("job.submit", {"command": ["/bin/true"], "context": f"{n}-{context}"})["id"] for n in range(40)
        ]
        for job_id in ids:
            client.call("job.wait", {"id": job_id, "timeout": TIMEOUT}, timeout=TIMEOUT + 5)
    replay = Events(daemon, last_id=0)
    kept = replay.until_finished(ids[-1])
    replay.close()
    assert sum(len(data["job"]["context"] or "") for _, _, data in kept) <= EVENT_RING_BYTES, len(kept)


def test_a_client_that_lets_its_bytes_of_events_pile_up_unread_is_cut_off(daemon: Any) -> None:
    # The events of a client that did not read stayed alive for it up to 10,000 of them, whatever their size, after
    # the ring had let them go. 700 lines of 64 KB are far more than what the socket's buffers hold besides
    # SSE_QUEUE_BYTES: the stream ends before the job's end.
    stream = Events(daemon)  # not read from while the job runs
    assert _holds_connection(daemon, stream)
    # A max_output above the 44.8 MB: jobd tells only the log lines it keeps (docs/protocol.md, events.subscribe).
    job = daemon.submit(command=_long_log_lines(700), max_output=64 * 1024 * 1024)
    daemon.wait(job["id"])
    # Its connection went with its events: it stayed open, with its buffers, until the client read or went.
    daemon.call("ping")  # the close follows the cut-off by one turn of jobd's loop
    assert not _holds_connection(daemon, stream)
    kinds, fields = [], {}
    with contextlib.suppress(http.client.IncompleteRead):  # the stream's end is its connection's
        while line := stream.response.readline():  # what was written before the cut
            if line == b"\n":
                kinds.append((fields["event"], json.loads(fields["data"]).get("job", {}).get("finished_at")))
            else:
                name, _, value = line.decode().rstrip("\n").partition(": ")
                fields[name] = value
    stream.close()
    assert ("job.log", None) in kinds and not [finished for kind, finished in kinds if finished is not None]
    assert "a GET /events client does not read its events" in daemon.log()


def _holds_connection(daemon: Any, stream: Events) -> bool:
    """Whether jobd has a descriptor for its end of the stream's TCP connection."""
    client_port = stream.connection.sock.getsockname()[1]
    server_port = address(daemon)[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(f"socket:[{inode}]")
    return bool(inodes & set(open_descriptors(daemon.pid).values()))


def test_a_client_cut_off_keeps_none_of_its_events_alive() -> None:
    # Cut off, a client not reading was sent None behind its events, which stayed alive for it (up to
    # SSE_QUEUE_BYTES each) as long as its handler waited for a write the client never let finish: the connection
    # stays open (its kernel buffers full) until the client reads or goes, and each such client kept 16 MiB.
    def subscribe(_: Any) -> Any:
        return lambda: None

    engine = SimpleNamespace(subscribe=subscribe)
    http = HttpApi(SimpleNamespace(engine=engine, instances=engine), ("127.0.0.1", 0), lambda: 0)  # type: ignore[arg-type]
    pending = _Pending(Peer(uid=0, gid=0, pid=0, is_admin=True))
    http.clients.add(pending)
    size = EVENT_OVERHEAD + 64_000
    for _ in range(SSE_QUEUE_BYTES // size + 1):
        http._add(_Event(http.next_id, "job.log", {}, job=(1, None, "default"), size=size))
    assert pending not in http.clients
    assert pending.qsize() == 1 and pending.get_nowait() is None and pending.size == 0


def test_metrics_parse_with_prometheus_client(daemon: Any) -> None:
    for command in (["true"], ["sh", "-c", "exit 3"], ["/nonexistent/program"]):
        daemon.wait(daemon.submit(command=command)["id"])
    with socket.socket() as unused:  # an HTTP job whose request fails: no exit status either, but it ran
        unused.bind(("127.0.0.1", 0))
        daemon.wait(daemon.submit(http={"url": f"http://127.0.0.1:{unused.getsockname()[1]}/"})["id"])
    daemon.call("queue.pause", {"name": "default"})
    waiting = [daemon.submit(command=["true"]) for _ in range(2)]
    status, text = request(daemon, "GET", "/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {
        "jobd_jobs",
        "jobd_queue_depth",
        "jobd_queue_running",
        "jobd_queue_concurrency",
        "jobd_job_duration_seconds",
        "jobd_spawn_failures",
    } <= set(families)
    jobs = {sample.labels["state"]: sample.value for sample in families["jobd_jobs"].samples}
    assert jobs["succeeded"] == 1 and jobs["failed"] == 3 and jobs["queued"] == 2 and jobs["running"] == 0, text
    depth = {s.labels["queue"]: s.value for s in families["jobd_queue_depth"].samples}
    running = {s.labels["queue"]: s.value for s in families["jobd_queue_running"].samples}
    assert (depth["default"], running["default"]) == (len(waiting), 0)
    concurrency = {s.labels["queue"]: s.value for s in families["jobd_queue_concurrency"].samples}
    assert concurrency["default"] == 2
    durations = {s.name: s.value for s in families["jobd_job_duration_seconds"].samples if "le" not in s.labels}
    assert durations["jobd_job_duration_seconds_count"] == 3  # the spawn failure never ran
    assert families["jobd_job_duration_seconds"].type == "histogram"
    spawn = families["jobd_spawn_failures"]
    assert spawn.type == "counter" and spawn.samples[0].value == 1


def test_unix_socket_identifies_by_peer_credentials(make_daemon: Any, tmp_path: Any) -> None:
    path = tmp_path / "http.sock"
    daemon = make_daemon(f'[http]\nlisten = "{path}"\n', daemon_extra='socket_group = "daemon"\nsocket_mode = 0o660')
    assert daemon.call("daemon.status")["http_listen"] == str(path)
    # The API socket's mode and group (it had jobd's own group: the group's members could not connect).
    info = os.stat(path)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, grp.getgrnam("daemon").gr_gid), info
    assert info.st_gid == os.stat(daemon.socket_path).st_gid
    out = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(path), "http://jobd/jobs/status"],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    # The test runs as jobd's own user: an admin, with no token.
    assert json.loads(out.stdout) == {
        "status": 200,
        "data": {"waiting": 0, "working": 0, "max_threads": 1, "free_threads": 1},
    }


def test_a_reload_gives_the_sockets_a_new_socket_mode_and_group(make_daemon: Any, tmp_path: Any) -> None:
    """The mode and group were given at bind only: a reload that tightened socket_mode said "reloaded" and left
    the sockets open to whoever could connect before."""
    path = tmp_path / "http.sock"
    http = f'[http]\nlisten = "{path}"\n'
    daemon = make_daemon(http, daemon_extra='socket_group = "daemon"\nsocket_mode = 0o666')
    sockets = [daemon.socket_path, daemon.evqueue_socket, path]
    daemon_gid = grp.getgrnam("daemon").gr_gid
    assert [(stat.S_IMODE(os.stat(s).st_mode), os.stat(s).st_gid) for s in sockets] == [(0o666, daemon_gid)] * 3
    daemon.write_config(http, daemon_extra='socket_group = "root"\nsocket_mode = 0o600')
    assert daemon.call("daemon.reload")["ok"] is True
    assert [(stat.S_IMODE(os.stat(s).st_mode), os.stat(s).st_gid) for s in sockets] == [(0o600, 0)] * 3
    assert "socket_mode 0o600 and socket_group applied to the sockets" in daemon.log()
    assert daemon.call("ping")["pong"] is True  # jobd (root) still connects
    # A group that does not exist: jobd's own, as at a start, not the one before.
    daemon.write_config(http, daemon_extra='socket_group = "daemon"\nsocket_mode = 0o660')
    assert daemon.call("daemon.reload")["ok"] is True
    daemon.write_config(http, daemon_extra='socket_group = "no-such-group-x"\nsocket_mode = 0o660')
    assert daemon.call("daemon.reload")["ok"] is True
    gids = [os.stat(s).st_gid for s in sockets]
    assert gids == [os.getegid()] * 3, gids


def test_http_connections_past_max_connections_are_refused_at_once(make_daemon: Any) -> None:
    """Connections on which nothing is sent held a descriptor each, without limit, until jobd had none left for
    anyone. Past max_connections open HTTP connections, a new one gets 503 and is closed."""
    daemon = make_daemon(CONFIG, daemon_extra="max_connections = 4")
    idle = [socket.create_connection(address(daemon), timeout=TIMEOUT) for _ in range(4)]
    try:
        for connection in idle:  # every one is taken in: each still answers a request of its own
            connection.sendall(b"GET /jobs/status HTTP/1.1\r\nHost: jobd\r\n\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 "), connection
        status, body = request(daemon, "POST", "/api/ping", {})
        assert status == 503 and body["error"]["code"] == "TOO_MANY_CONNECTIONS", body
        assert "4 HTTP connections are open ([daemon] max_connections)" in body["error"]["message"], body
    finally:
        for connection in idle:
            connection.close()
    # The room comes back as they close. Two pings on the API socket: the second is read in a loop turn after the
    # one that saw the closes, so they are all handled by then.
    daemon.call("ping")
    daemon.call("ping")
    status, body = request(daemon, "POST", "/api/ping", {})
    assert status == 200 and body["result"]["pong"] is True, body


def test_a_refused_http_connection_is_not_reset_by_the_request_its_client_sends_after_the_503(
    make_daemon: Any,
) -> None:
    """A connection past max_connections was closed as soon as its 503 was written. A client that sent its request
    after that (on a busy machine, jobd answers before the client has sent anything) met a reset: http.client failed
    with a broken pipe, not the 503. jobd reads and drops what the client sends until the client closes its side."""
    daemon = make_daemon(CONFIG, daemon_extra="max_connections = 1")
    held = socket.create_connection(address(daemon), timeout=TIMEOUT)
    try:
        held.sendall(f"GET /jobs/status HTTP/1.1\r\nHost: jobd\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode())
        assert held.recv(65536).startswith(b"HTTP/1.1 200 "), "the one place is taken"
        with socket.create_connection(address(daemon), timeout=TIMEOUT) as late:
            answer = b""
            while chunk := late.recv(65536):  # the refusal, then jobd's end of file: all before any request
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 ") and b"TOO_MANY_CONNECTIONS" in answer, answer
            # Sent now, in two writes as http.client sends a request with a body: a reset after the first (jobd's
            # socket closed) fails the second with EPIPE.
            late.sendall(b"POST /api/ping HTTP/1.1\r\nHost: jobd\r\nContent-Length: 2\r\n\r\n")
            late.sendall(b"{}")
            late.shutdown(socket.SHUT_WR)
            assert late.recv(65536) == b""
            assert late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        held.close()


def test_idle_connections_are_closed_and_a_burst_gets_no_more_than_max_connections(make_daemon: Any) -> None:
    """A connection that sends no request is closed after FIRST_REQUEST_SECONDS (here 1 s): idle ones kept the
    places of clients with requests, for good. And a burst of connections taken in one turn of jobd's loop was
    counted only afterwards: 35 held places with max_connections = 20."""
    daemon = make_daemon(CONFIG, daemon_extra="max_connections = 20", start=False)
    daemon.env["JOBD_HTTP_FIRST_REQUEST_SECONDS"] = "1"
    daemon.start()
    burst = [socket.create_connection(address(daemon), timeout=TIMEOUT) for _ in range(40)]
    answers = []
    for connection in burst:
        data = b""
        while chunk := connection.recv(65536):  # to the end: a refusal at once, or the close of an idle one
            data += chunk
        answers.append(data)
        connection.close()
    refused = [data for data in answers if data.startswith(b"HTTP/1.1 503")]
    assert len(refused) >= 20 and all(data in refused or data == b"" for data in answers), answers
    daemon.call("ping")
    daemon.call("ping")  # the closes are handled: the places are free again
    status, body = request(daemon, "POST", "/api/ping", {})
    assert status == 200 and body["result"]["pong"] is True, body


def test_http_config_is_checked(tmp_path: Path) -> None:
    (tmp_path / "jobd.toml").write_text(
        '[http]\nlisten = "8080"\n[http.tokens.app]\ntoken_sha256 = "' + "AB" * 32 + '"\ngroups = ["web"]\n'
    )
    http = load_dir(str(tmp_path)).http
    assert http.listen == ("127.0.0.1", 8080)
    token = http.tokens["app"]
    assert (token.user, token.groups, token.admin, token.token_sha256) == ("app", frozenset({"web"}), False, "ab" * 32)
    (tmp_path / "jobd.toml").write_text('[http]\nlisten = "/run/jobd/http.sock"\n')
    assert load_dir(str(tmp_path)).http.listen == "/run/jobd/http.sock"
    for text, words in (
        ('[http.tokens.app]\ntoken_sha256 = "abc"\n', "64 hexadecimal digits"),
        ("[http]\nport = 1\n", "port"),
        ('[http]\nlisten = "localhost:80"\n', "localhost"),
    ):
        (tmp_path / "jobd.toml").write_text(text)
        with pytest.raises(ConfigError, match=words):
            load_dir(str(tmp_path))


def test_queue_server_callback_done_fires_when_the_job_succeeds_and_when_it_fails(daemon: Any, tmp_path: Path) -> None:
    # The README's payloads through curl, only httpbin.org (and the exec job's script) replaced by the test's own.
    receiver = Receiver()
    try:
        base = receiver.url("")
        readme = (
            '{"priority" : 800, "context" : "MyCoolApp", '
            '"command": {"type": "http", "url": "%s", "method": "GET", "timeout": 20, '
            '"params": {"username": "michael"}}, '
            '"callback_done": {"type": "http", "url": "%s/get?job=done", "method": "GET"}}'
        )
        receiver.plan["/fail"] = [500]
        ids = {}
        for name, url in (("ok", base + "/delay/10"), ("bad", base + "/fail")):
            added = curl(daemon, "-X", "POST", "-d", readme % (url, base), "/jobs/add")
            ids[name] = added["job_id"]
            work, done = receiver.next(), receiver.next()  # the job's request, then its callback
            assert (work.method, urlsplit(work.path).path) == ("GET", urlsplit(url).path)
            assert parse_qs(urlsplit(work.path).query) == {"username": ["michael"]}
            assert done.method == "GET" and urlsplit(done.path).path == "/get"
            assert parse_qs(urlsplit(done.path).query) == {"job": ["done"], "jobid": [str(added["job_id"])]}
            assert done.headers["X-Jobd-Event"] == "on_finish"
        assert daemon.wait(ids["ok"])["state"] == "succeeded"
        assert daemon.wait(ids["bad"])["state"] == "failed"  # and callback_done was called all the same
        assert curl(daemon, f"/jobs/status/{ids['bad']}")["worker_status"] == 99
        status, body = request(daemon, "POST", "/api/audit.list", {})  # /jobs/add is job.submit, audited as such
        audited = {(entry["command"], entry["target"], entry["result"]) for entry in body["result"]["entries"]}
        assert {("job.submit", f"job {ids[name]}", "ok") for name in ids} <= audited, audited
        status, body = request(daemon, "POST", "/api/job.get", {"id": ids["ok"]})
        assert status == 200 and body["result"]["http"]["params"] == {"username": "michael"}
        assert body["result"]["http"]["timeout"] == 20.0 and body["result"]["context"] == "MyCoolApp"

        # A POST sends its params as a form, as Queue Server's worker (Guzzle's form_params) does.
        form = (
            '{"command": {"type": "http", "url": "%s/form?jobid=__JOBID__", "method": "POST", "params": {"a": "1 2"}}}'
        )
        added = curl(daemon, "-X", "POST", "-d", form % base, "/jobs/add")
        posted = receiver.next()
        assert posted.method == "POST" and posted.path == f"/form?jobid={added['job_id']}"
        assert posted.headers["Content-Type"] == "application/x-www-form-urlencoded" and posted.body == b"a=1+2"
        assert daemon.wait(added["job_id"])["state"] == "succeeded"

        script = tmp_path / "somescript.sh"
        script.write_text("#!/bin/sh\nexit 3\n")
        script.chmod(0o755)
        notify = f'curl -sS -o /dev/null "{base}/exec-done?jobid=$JOBD_JOB_ID&state=$JOBD_STATE"'
        exec_payload = {
            "command": {"type": "exec", "cmd": str(script)},
            "callback_done": {"type": "exec", "cmd": notify},
        }
        added = curl(daemon, "-X", "POST", "-d", json.dumps(exec_payload), "/jobs/add")
        done = receiver.next()
        assert parse_qs(urlsplit(done.path).query) == {"jobid": [str(added["job_id"])], "state": ["failed"]}
        assert daemon.wait(added["job_id"])["exit_code"] == 3
    finally:
        receiver.close()


def test_json_endpoints_for_workflow_instances_and_schedules(make_daemon: Any) -> None:
    d = make_daemon(
        CONFIG + '[task.hello]\ncommand = ["/bin/echo", "hello"]\n'
        '[schedule.nightly]\ntask = "hello"\ncalendar = "0 30 2 * * *"\n',
        start=False,
    )
    (d.config_dir / "workflows").mkdir()
    (d.config_dir / "workflows" / "greet.xml").write_text(
        '<workflow><subjobs><job name="one"><tasks><task name="hi" path="/bin/echo hi" queue="default"/>'
        "</tasks></job></subjobs></workflow>"
    )
    d.start()
    status, body = request(d, "POST", "/api/instance.launch", {"workflow": "greet"})
    assert status == 200 and body["result"]["workflow"] == "greet"
    instance = body["result"]["id"]
    status, body = request(d, "POST", "/api/instance.wait", {"id": instance, "timeout": 20})
    assert status == 200 and body["result"]["status"] == "TERMINATED" and body["result"]["errors"] == 0
    status, body = request(d, "POST", "/api/instance.get", {"id": instance})
    assert status == 200 and body["result"]["id"] == instance
    status, body = request(d, "POST", "/api/instance.list", {})
    assert status == 200 and [row["id"] for row in body["result"]["instances"]] == [instance]
    status, body = request(d, "POST", "/api/instance.get", {"id": 999})
    assert status == 404 and body["error"]["code"] == "UNKNOWN_INSTANCE"
    status, body = request(d, "POST", "/api/schedule.list", {})
    assert status == 200 and [row["name"] for row in body["result"]["schedules"]] == ["nightly"]
    status, body = request(d, "POST", "/api/schedule.trigger", {"name": "nightly"})
    assert status == 200 and body["result"]["started"] is True
    assert d.wait(body["result"]["run_id"])["state"] == "succeeded"
    status, body = request(d, "POST", "/api/schedule.disable", {"name": "nightly"})
    assert status == 200
    status, body = request(d, "POST", "/api/schedule.enable", {"name": "nope"})
    assert status == 404 and body["error"]["code"] == "UNKNOWN_SCHEDULE"
    # The same rights as on the socket: carol may read none of these.
    for method, params in (("instance.launch", {"workflow": "greet"}), ("schedule.trigger", {"name": "nightly"})):
        status, body = request(d, "POST", f"/api/{method}", params, token=CAROL_TOKEN)
        assert status == 403 and body["error"]["code"] == "INSUFFICIENT_RIGHTS", body


def test_a_run_as_caller_task_of_an_instance_a_remote_client_launched_says_why_it_cannot_run(make_daemon: Any) -> None:
    """A token of no local account is a remote client (uid -1): a workflow's run_as = "caller" task has nobody to run
    as. Its error said "uid -1 has no passwd entry to give its group", as if a local user had lost its account."""
    d = make_daemon(
        CONFIG + '[task.who]\ncommand = ["/usr/bin/id"]\nrun_as = "caller"\n'
        '[[access.grant]]\nusers = ["carol"]\nrights = ["read", "exec"]\nworkflows = ["greet"]\n',
        start=False,
    )
    d.write_workflows(
        greet='<workflow><subjobs><job name="one"><tasks><task task="who" name="who"/></tasks></job></subjobs>'
        "</workflow>"
    )
    d.start()
    status, body = request(d, "POST", "/api/instance.launch", {"workflow": "greet"}, token=CAROL_TOKEN)
    assert status == 200, body
    instance = body["result"]["id"]
    status, body = request(d, "POST", "/api/instance.wait", {"id": instance, "timeout": 20}, token=CAROL_TOKEN)
    assert status == 200 and body["result"]["errors"] == 1, body
    status, body = request(d, "POST", "/api/instance.get", {"id": instance, "format": "xml"}, token=CAROL_TOKEN)
    assert "a remote client launched it, which has no local user to run it as" in body["result"]["xml"], body
    assert "uid -1" not in body["result"]["xml"]


def test_peer_credentials_on_a_unix_socket_get_the_socket_apis_rights(make_daemon: Any) -> None:
    # nobody (an account every Debian system has) may read and run the task `hello` only; it connects as itself.
    d = make_daemon(start=False)
    d.write_config(
        f'[http]\nlisten = "{d.root}/http.sock"\n'
        "[queue.default]\n[queue.other]\nconcurrency = 3\n"
        '[task.hello]\ncommand = ["/bin/echo", "hello"]\n[task.secret]\ncommand = ["/bin/true"]\n'
        '[[access.grant]]\nusers = ["nobody"]\nrights = ["read", "exec"]\ntasks = ["hello"]\nqueues = ["default"]\n'
    )
    d.start()
    d.root.chmod(0o755)  # curl starts in it and uses a relative path: its parents stay private
    (d.root / "http.sock").chmod(0o666)

    def as_nobody(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "curl", "-sS", "-X", method]
        argv += ["--unix-socket", "http.sock", "-w", "\\n%{http_code}", f"http://jobd{path}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        out = subprocess.run(argv, cwd=d.root, capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
        text, _, code = out.rpartition("\n")
        return int(code), json.loads(text) if text.startswith("{") else text

    status, body = as_nobody("POST", "/api/job.submit", {"task": "hello"})
    assert status == 200, body
    assert d.wait(body["result"]["id"])["state"] == "succeeded"
    status, body = as_nobody("POST", "/api/job.get", {"id": body["result"]["id"]})
    assert status == 200 and body["result"]["task"] == "hello"
    for payload, missing in (({"task": "secret"}, "exec"), ({"command": ["/bin/true"]}, "admin")):
        status, body = as_nobody("POST", "/api/job.submit", payload)
        assert status == 403 and body["error"]["missing"] == missing, body
    status, body = as_nobody("POST", "/jobs/add", {"command": {"type": "exec", "cmd": "true"}})
    assert status == 403 and body["error"]["missing"] == "admin"
    status, body = as_nobody("GET", "/jobs/status")  # the queues nobody may read: `default` only
    assert (status, body["data"]["max_threads"]) == (200, 1)
    assert as_nobody("GET", "/metrics")[0] == 403


# -- what a client sends that jobd cannot take: its mistake, answered as docs/http.md says, never a 500 ------------


def exchange(
    daemon: Any, method: str, path: str, body: bytes = b"", *headers: bytes, token: bytes | None = ADMIN_TOKEN.encode()
) -> Any:
    """One request sent as raw bytes (some that http.client would not send), on a connection of its own read to its
    end: by then jobd has logged all it will about it (aiohttp reads a body left unread after the answer). Answers
    (status, the JSON body or the text) and jobd's log meanwhile."""
    logged = len(daemon.log())
    head = f"{method} {path} HTTP/1.1\r\nHost: jobd\r\nConnection: close\r\nContent-Length: {len(body)}\r\n".encode()
    if token is not None:
        head += b"Authorization: Bearer " + token + b"\r\n"
    head += b"".join(header + b"\r\n" for header in headers)
    with socket.create_connection(address(daemon), timeout=TIMEOUT) as connection:
        connection.sendall(head + b"\r\n" + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    top, _, content = answer.partition(b"\r\n\r\n")
    status = int(top.split(b" ", 2)[1])
    text = content.decode(errors="replace")
    data = json.loads(text) if b"application/json" in top else text
    return status, data, daemon.log()[logged:]


JSON = b"Content-Type: application/json"
EXEC = b'"command": {"type": "exec", "cmd": "true"}'


@pytest.mark.parametrize(
    ("path", "body", "headers", "message"),
    [
        ("/api/job.submit", b'{"command": ["true"], "context": "\xff"}', (JSON,), "the body is not valid UTF-8"),
        ("/jobs/add", b'{"context": "caf\xe9", ' + EXEC + b"}", (JSON,), "the body is not valid UTF-8"),
        ("/api/queue.list", b"{}", (JSON + b"; charset=bogus",), "charset=bogus is not a known character set"),
        # Host names' encodings, decoded in time growing with the square of the length: a 1 MiB body held jobd 26 s
        ("/api/queue.list", b"-" + b"a" * 1_000_000, (JSON + b"; charset=punycode",), "charset=punycode is not a kn"),
        ("/api/queue.list", b"{}", (JSON + b"; charset=IDNA",), "charset=IDNA is not a known character set"),
        ("/api/queue.list", b"[" * 100_000 + b"]" * 100_000, (JSON,), "the body nests arrays and objects more"),
        ("/api/job.submit", b'{"command": ["true"], "context": "\\ud800"}', (JSON,), "lone UTF-16 surrogate"),
        ("/jobs/add", b'{"context": "\\udfff", ' + EXEC + b"}", (JSON,), "lone UTF-16 surrogate"),
        ("/api/queue.list", b"{}", (JSON, b"Content-Encoding: gzip"), "the body cannot be read"),
        ("/api/job.submit", b'{"command": ["true"], "command": ["false"]}', (JSON,), 'the body gives the name "co'),
        ("/jobs/add", b'{"context": "a", "context": "b", ' + EXEC + b"}", (JSON,), 'the body gives the name "c'),
        ("/jobs/add", b'{"priority": "--5", ' + EXEC + b"}", (JSON,), "priority: expected an integer"),
        ("/jobs/add", '{"priority": "²", '.encode() + EXEC + b"}", (JSON,), "priority: expected an integer"),
        ("/api/job.submit", b" " * (1024 * 1024 + 1), (JSON,), "the body is over 1 MiB"),  # aiohttp's text/plain 413
    ],
    ids=[
        "not-utf8",
        "latin1",
        "charset",
        "punycode",
        "idna",
        "deep",
        "surrogate",
        "surrogate-qs",
        "not-gzip",
        "name-twice",
        "name-twice-qs",
        "priority",
        "superscript",
        "over-1-MiB",
    ],
)
def test_bodies_jobd_cannot_take_are_400(
    daemon: Any, path: str, body: bytes, headers: tuple[bytes, ...], message: str
) -> None:
    """Each was aiohttp's 500 "Server got itself in trouble" and a traceback in jobd's log: a body that is not
    UTF-8, or names a charset Python does not know (or one that encodes host names: punycode took 26 s of jobd's
    loop for 1 MiB), nests 100,000 deep (RecursionError), holds a lone surrogate
    escape (SQLite refused to store it), is not in its Content-Encoding, or a Queue Server priority int() took
    for a number. Bodies are read as the socket reads a request (jsonrpc.parse), the same limits and words."""
    status, answer, log = exchange(daemon, "POST", path, body, *headers)
    assert (status, answer["error"]["code"]) == (400, "INVALID_PARAMS"), answer
    assert answer["error"]["message"].startswith(message) or message in answer["error"]["message"], answer
    assert "Traceback" not in log and " ERROR " not in log, log
    assert daemon.call("job.list")["jobs"] == []  # nothing was stored


def _answer_with_headers(connection: socket.socket) -> tuple[int, Any, http.client.HTTPResponse]:
    """The status, JSON body and response of the answer on `connection`, read as far as its Content-Length."""
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, json.loads(response.read()), response


@pytest.mark.parametrize("path", ["/api/job.submit", "/jobs/add"])
def test_a_body_declared_over_a_mebibyte_is_refused_before_it_comes(daemon: Any, path: str) -> None:
    """A Content-Length over the 1 MiB jobd takes, with no body sent: jobd waited for the body, for good (aiohttp
    refuses a body only once more than its limit has come), the request holding its place against max_connections.
    It is refused at once, as a body over 1 MiB that does come is."""
    head = f"POST {path} HTTP/1.1\r\nHost: jobd\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n"
    with socket.create_connection(address(daemon), timeout=TIMEOUT) as connection:
        connection.sendall(head.encode() + b'{"command": ["true"]')  # and never the rest
        status, body, response = _answer_with_headers(connection)
    assert (status, body["error"]["code"], body["error"]["limit"]) == (400, "INVALID_PARAMS", 1024 * 1024), body
    assert body["error"]["message"] == (
        "the body is over 1 MiB (1048576 bytes): its Content-Length is 1073741824; send at most 1048576"
    ), body
    assert response.getheader("Connection") == "close"  # what follows on the connection is no next request
    assert daemon.call("job.list")["jobs"] == []


def test_a_body_that_does_not_come_is_answered_408_within_the_deadline(make_daemon: Any) -> None:
    """A request whose body does not come whole (its Content-Length says 100 bytes, one is sent) waited for it for
    good, holding its place against max_connections, as idle connections did before the first-request deadline.
    The body has as long as the first request (JOBD_HTTP_FIRST_REQUEST_SECONDS, here 1 s)."""
    daemon = make_daemon(CONFIG, start=False)
    daemon.env["JOBD_HTTP_FIRST_REQUEST_SECONDS"] = "1"
    daemon.start()
    head = f"POST /api/job.submit HTTP/1.1\r\nHost: jobd\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(address(daemon), timeout=TIMEOUT) as connection:
        connection.sendall(head.encode() + b"{")
        status, body, response = _answer_with_headers(connection)
    assert (status, body["error"]["code"]) == (408, "TIMED_OUT"), body
    assert (
        body["error"]["message"]
        == "the body did not come whole within 1 s of the request's head; send it with the head"
    )
    assert response.getheader("Connection") == "close"
    assert daemon.call("job.list")["jobs"] == []
    status, body = request(daemon, "POST", "/api/ping", {})  # a body that comes is taken as before
    assert status == 200 and body["result"]["pong"] is True, body


def test_a_queue_server_priority_sent_as_a_string_is_taken_as_before(daemon: Any) -> None:
    daemon.call("queue.pause", {"name": "default"})
    for sent, stored in (("800", 724), ("-5", 1529)):
        status, answer, _ = exchange(daemon, "POST", "/jobs/add", f'{{"priority": "{sent}", {EXEC.decode()}}}'.encode())
        assert status == 200, answer
        assert daemon.call("job.get", {"id": answer["job_id"]})["priority"] == stored


def test_a_queue_server_context_that_is_not_a_string_is_kept_as_its_json(daemon: Any) -> None:
    """Queue Server's context is a free label, which PHP clients send as a number or an object too: it was stored
    as Python's text of the value (`{'user': 17}`, `True`), which no client could parse back."""
    daemon.call("queue.pause", {"name": "default"})
    for sent, stored in (("17", "17"), ("true", "true"), ('{"user": 17, "page": "é"}', '{"user":17,"page":"é"}')):
        body = f'{{"context": {sent}, {EXEC.decode()}}}'.encode()
        status, answer, _ = exchange(daemon, "POST", "/jobs/add", body)
        assert status == 200, answer
        assert daemon.call("job.get", {"id": answer["job_id"]})["context"] == stored


def test_job_ids_that_are_not_plain_numbers_or_too_large_are_unknown_jobs(daemon: Any) -> None:
    """GET /jobs/status/{id}: 2**63 was SQLite's OverflowError (a 500); int() read "0_1", "+1", " 1" and the
    Arabic-Indic "١" as job 1. An id is ASCII digits, and one that cannot be a job's is no job."""
    job = daemon.submit(command=["true"])
    assert job["id"] == 1
    assert exchange(daemon, "GET", "/jobs/status/1")[0] == 200
    for path in ("9223372036854775808", "0_1", "+1", "%201", "%D9%A1", "9" * 5000):
        status, answer, log = exchange(daemon, "GET", f"/jobs/status/{path}")
        assert (status, answer["error"]["code"]) == (404, "UNKNOWN_JOB"), (path, answer)
        assert "Traceback" not in log, log


@pytest.mark.parametrize("last_id", ["²".encode(), b"-1"], ids=["superscript", "negative"])
def test_an_unreadable_last_event_id_replays_nothing(daemon: Any, last_id: bytes) -> None:
    """`Last-Event-ID: ²` with events in the ring: int() raised (a 500). It is unreadable, as `x` is: the stream
    starts with live events. So is `-1`, which no event id is (read as a number, it replayed the whole ring)."""
    daemon.wait(daemon.submit(command=["true"])["id"])  # events in the ring
    stream = Events(daemon, last_id=last_id)  # as UTF-8: http.client would send a str as Latin-1
    job = daemon.submit(command=["true"])
    assert stream.next()[2]["job"]["id"] == job["id"]  # live: nothing replayed
    stream.close()
    assert "Traceback" not in daemon.log()


def test_head_of_the_event_stream_is_refused(daemon: Any) -> None:
    """HEAD /events ran the stream: its events followed the headers as a body, which a HEAD answer may not have (a
    client reading the next answer on the connection read them instead)."""
    status, answer, _ = exchange(daemon, "HEAD", "/events")
    assert status == 405 and answer == "", answer


def test_an_event_filter_id_too_long_for_int_is_refused(daemon: Any) -> None:
    status, answer, log = exchange(daemon, "GET", "/events?jobs=" + "1" * 5000)  # int() refuses 4,300 digits
    assert (status, answer["error"]["param"]) == (400, "jobs"), answer
    assert "Traceback" not in log


def test_a_token_that_is_not_utf8_is_a_bad_token_logged_nowhere(daemon: Any) -> None:
    """`Authorization: Bearer \xff` from anyone who reaches the port was a 500 and a traceback per request."""
    status, answer, log = exchange(daemon, "GET", "/jobs/status", token=b"\xff")
    assert (status, answer["error"]["code"]) == (401, "UNAUTHORIZED"), answer
    assert "Traceback" not in log and " ERROR " not in log, log


def test_requests_aiohttp_cannot_read_leave_no_traceback_in_the_log(daemon: Any) -> None:
    """Without a token: a request line with a raw non-ASCII byte (aiohttp answers 400), and a body that is not the
    gzip its Content-Encoding says, left unread by the 401 (aiohttp reads it after the answer). aiohttp logged each
    as an error with its traceback: anyone who reaches the port could fill the log."""
    status, _, log = exchange(daemon, "GET", "/jobs/status/²", token=None)  # sent as UTF-8, not %-escaped
    # aiohttp 3.9 and later refuse the byte (400); Debian 12's 3.8 reads the request, which has no token (401)
    assert status in (400, 401) and "Traceback" not in log and " ERROR " not in log, log
    status, _, log = exchange(daemon, "POST", "/api/queue.list", b"{}", b"Content-Encoding: gzip", token=b"wrong")
    assert status == 401 and "Traceback" not in log and " ERROR " not in log, log


def _answers(answer: bytes) -> list[tuple[int, Any]]:
    """The (status, JSON body) of each HTTP answer in `answer`, as read off a connection to its end."""
    found = []
    while answer:
        top, _, rest = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)", top, re.IGNORECASE)[1])  # type: ignore[index]
        found.append((int(top.split(b" ", 2)[1]), json.loads(rest[:length])))
        answer = rest[length:]
    return found


def _then_another(daemon: Any, body: bytes, *headers: bytes, token: bytes | None) -> list[tuple[int, Any]]:
    """POST `body` to queue.list, then, on the same connection, a plain queue.list: the answers that came back."""
    first = b"POST /api/queue.list HTTP/1.1\r\nHost: jobd\r\nContent-Length: %d\r\n" % len(body)
    if token is not None:
        first += b"Authorization: Bearer " + token + b"\r\n"
    first += b"".join(header + b"\r\n" for header in headers) + b"\r\n" + body
    second = b"POST /api/queue.list HTTP/1.1\r\nHost: jobd\r\nConnection: close\r\nContent-Length: 2\r\n"
    second += b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n" + JSON + b"\r\n\r\n{}"
    with socket.create_connection(address(daemon), timeout=TIMEOUT) as connection:
        connection.sendall(first + second)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return _answers(answer)


def gzip_of_spaces(size: int, piece: int = 1 << 24) -> bytes:
    """A gzip member of `size` spaces (a multiple of `piece`), as gzip.compress(b" " * size, 9) would be but made
    without holding or compressing them all: one piece is compressed and ended with a full flush, after which the
    compressor starts afresh, so every further piece compresses to the same bytes. The trailer is the true CRC-32
    and length of all of it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate: the gzip header is written here
    spaces = b" " * piece
    compressed = compressor.compress(spaces) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // piece):
        crc = zlib.crc32(spaces, crc)
    header = gzip.compress(b"", mtime=0)[:10]
    return header + compressed * (size // piece) + compressor.flush() + struct.pack("<II", crc, size & 0xFFFFFFFF)


def test_the_gzip_of_spaces_is_what_gzip_makes_of_them() -> None:
    """The stand-in for gzip.compress of a gibibyte (which takes seconds and a gibibyte of memory) inflates to the
    same spaces and ends with the same trailer."""
    made = gzip_of_spaces(1 << 26, piece=1 << 20)
    assert gzip.decompress(made) == b" " * (1 << 26)
    assert made[-8:] == gzip.compress(b" " * (1 << 26), 9)[-8:]


def test_a_compressed_body_is_inflated_no_further_than_the_mebibyte_jobd_takes(daemon: Any) -> None:
    """A mebibyte of gzip inflates to a gibibyte. aiohttp inflated all of it as it came, also for a client without a
    token, answered 401 before its body was read (aiohttp reads the rest after the answer): 8 s of work in jobd's
    event loop, which every other client waited on for up to 2 s at a time, for each such request from anyone who
    reaches the port. jobd now inflates a body itself, no further than the mebibyte it takes.

    What shows it: the bomb's gzip checksum, at its very end, is wrong, which only inflating all of it can find.
    aiohttp, inflating a body, finds it and closes the connection (the next request on it was never answered);
    jobd, inflating it to its end, would call it unreadable. It is instead a body over 1 MiB, and the connection
    serves the next request, whether the bomb came with a token or was left unread by the 401."""
    bomb = bytearray(gzip_of_spaces(1 << 30))
    assert len(bomb) < 1024 * 1024
    bomb[-8] ^= 0xFF  # the CRC-32 of gzip's trailer
    gzipped = (JSON, b"Content-Encoding: gzip")
    listed = (200, {"result": daemon.call("queue.list")})
    answers = _then_another(daemon, bytes(bomb), *gzipped, token=None)
    assert len(answers) == 2 and answers[0][0] == 401 and answers[1] == listed, answers
    answers = _then_another(daemon, bytes(bomb), *gzipped, token=ADMIN_TOKEN.encode())
    too_large = (400, {"error": {"code": "INVALID_PARAMS", "message": "the body is over 1 MiB (1048576 bytes)"}})
    assert answers == [too_large, listed], answers
    assert "Traceback" not in daemon.log() and " ERROR " not in daemon.log()
    # A wrong checksum is found where a body is inflated to its end: one under 1 MiB inflated.
    small = bytearray(gzip.compress(b"{}"))
    small[-8] ^= 0xFF
    status, answer, _ = exchange(daemon, "POST", "/api/queue.list", bytes(small), *gzipped)
    assert status == 400 and answer["error"]["message"].startswith("the body cannot be read"), answer
    # What it takes is taken as before: gzip, deflate (with zlib's header or without), and nothing else.
    for encoding, body in (
        (b"gzip", gzip.compress(b"{}")),
        (b"x-gzip", gzip.compress(b"{}")),
        (b"deflate", zlib.compress(b"{}")),
        (b"deflate", zlib.compress(b"{}")[2:-4]),
        (b"identity", b"{}"),
    ):
        status, answer, _ = exchange(daemon, "POST", "/api/queue.list", body, JSON, b"Content-Encoding: " + encoding)
        assert status == 200 and "queues" in answer["result"], (encoding, answer)
    status, answer, _ = exchange(daemon, "POST", "/api/queue.list", b"{}", JSON, b"Content-Encoding: br")
    assert (status, answer["error"]["message"]) == (
        400,
        "Content-Encoding: br is not supported; send the body as it is, or in gzip or deflate",
    ), answer
    status, answer, _ = exchange(
        daemon, "POST", "/api/queue.list", gzip.compress(b"{}")[:-8], JSON, b"Content-Encoding: gzip"
    )
    assert status == 400 and answer["error"]["message"].startswith("the body cannot be read"), answer


# Plants a bug in jobd: GET /jobs/status raises what no handler expects.
BUG_SHIM = """
from jobd import http_api


async def jobs_status(self, request):
    raise RuntimeError("a bug planted by the test")


http_api.HttpApi.jobs_status = jobs_status
"""


def test_a_bug_is_a_json_internal_error_logged_once(make_daemon: Any, tmp_path: Path) -> None:
    """docs/http.md: a bug in jobd is 500 `INTERNAL_ERROR` with the JSON error body, as over the socket, and one
    entry in the log naming the request; it was aiohttp's text/plain 500."""
    d = _started_with_shim(make_daemon, tmp_path, BUG_SHIM)
    status, answer, log = exchange(d, "GET", "/jobs/status")
    assert status == 500, answer
    assert answer["error"] == {
        "code": "INTERNAL_ERROR",
        "message": "internal error: RuntimeError: a bug planted by the test",
    }
    assert log.count(" ERROR ") == 1 and "ERROR internal error in GET /jobs/status\n" in log, log
    assert exchange(d, "GET", "/jobs/status/1")[0] == 404  # the daemon serves on


def test_a_quiet_event_stream_gets_a_comment_now_and_then(make_daemon: Any) -> None:
    """A GET /events stream with nothing to send wrote nothing at all: a proxy in front of jobd closes a response
    silent for a minute (nginx's proxy_read_timeout), and a client gone without a word was never found. A quiet
    stream now gets a comment line every KEEPALIVE_SECONDS (here 0.2 s); the events still come between them."""
    daemon = make_daemon(CONFIG, start=False)
    daemon.env["JOBD_HTTP_KEEPALIVE_SECONDS"] = "0.2"
    daemon.start()
    events = Events(daemon, "?types=job.state")
    try:
        assert events.block() == {"": "keep-alive"}
        assert events.block() == {"": "keep-alive"}
        job_id = daemon.submit(command=["/bin/true"])["id"]
        assert events.until_finished(job_id)[-1][2]["job"]["state"] == "succeeded"
        assert events.block() == {"": "keep-alive"}
    finally:
        events.close()


def test_a_query_sqlite_refuses_to_prepare_is_jobds_bug_not_the_disks_trouble(make_daemon: Any) -> None:
    # SQLite names SQLITE_ERROR a statement it refuses to prepare: jobd's bug (a query it built wrong, or one its
    # schema cannot serve), whatever the disk. That OperationalError was taken for the disk's trouble: 503
    # STORE_FAILED ("jobd could not write its database"), the store shown in trouble in daemon.status and STATUS=,
    # logged as a refusal without a traceback. It is INTERNAL_ERROR, its traceback logged. The statement here: a
    # task's jobs in a state are read through the index job_task (named: INDEXED BY), dropped while jobd was
    # stopped, as a migration that lost it would leave the file.
    daemon = make_daemon(CONFIG)
    assert daemon.stop() == 0
    database = sqlite3.connect(daemon.state_dir / "jobd.sqlite3")
    database.execute('DROP INDEX "job_task"')
    database.commit()
    database.close()
    daemon.start()
    status, reply = request(daemon, "POST", "/api/job.list", {"task": "report", "state": ["succeeded"]})
    assert (status, reply["error"]["code"]) == (500, "INTERNAL_ERROR"), (status, reply)
    assert reply["error"]["message"] == "internal error: OperationalError: no such index: job_task", reply
    assert daemon.call("daemon.status")["store_trouble"] is None
    log = daemon.log()
    assert log.count("Traceback") == 1 and "sqlite3.OperationalError: no such index: job_task" in log, log
    assert "could not write its database" not in log, log
