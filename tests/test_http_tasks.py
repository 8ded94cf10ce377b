"""HTTP jobs end to end: a real jobd makes its requests to an HTTP server inside the test, on loopback.

The server thread answers at once or holds a request until the test releases it (threading events and semaphores:
no sleeps, no polling). Timings appear only where a timeout is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from recovery.support import WAIT, out_of_descriptors, wait_for_log

from jobd.client import RemoteError
from jobd.proc import ExitInfo

HOLD_LIMIT = 30.0  # a held request is answered at the latest then (or when the test ends)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class WebServer:
    url: str
    requests: list[Seen] = field(default_factory=list)
    arrivals: queue.Queue[Seen] = field(default_factory=queue.Queue)
    release: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    closing: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0


def _handler(state: WebServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            seen = Seen(self.command, parts.path, parse_qs(parts.query), dict(self.headers), self.rfile.read(length))
            with state.lock:
                state.requests.append(seen)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                state.arrivals.put(seen)
                status, body = 200, b"hello from the test server"
                if parts.path.startswith("/status/"):
                    status, body = int(parts.path.rsplit("/", 1)[1]), b"no luck"
                elif parts.path == "/hold":
                    if not state.release.acquire(timeout=HOLD_LIMIT) or state.closing.is_set():
                        return
                elif parts.path.startswith("/echo"):
                    body = json.dumps({"path": self.path, "body": seen.body.decode()}).encode()
                elif parts.path == "/cookie":  # a session for whoever comes next, were cookies kept
                    self.send_response(200)
                    self.send_header("Set-Cookie", "sid=job-a-secret; Path=/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                elif parts.path == "/latin1":  # a header with a byte that is not UTF-8, as servers send them
                    self.send_response(200)
                    self.send_header("Content-Disposition", "attachment; filename=caf\xe9.txt")  # sent as Latin-1
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                elif parts.path == "/partial":  # the first line of the body, then the rest once released
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(b"first line\nsecond line\n")))
                    self.end_headers()
                    self.wfile.write(b"first line\n")
                    self.wfile.flush()
                    if state.release.acquire(timeout=HOLD_LIMIT) and not state.closing.is_set():
                        self.wfile.write(b"second line\n")
                    return
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("X-Test", "yes")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # jobd went away (cancel, timeout)
                pass
            finally:
                with state.lock:
                    state.in_flight -= 1

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler


@pytest.fixture
def web() -> Iterator[WebServer]:
    state = WebServer("")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever,  # no-poll-ok: wakes each 0.5 s to see if shutdown() was asked
        daemon=True,
    )
    thread.start()
    try:
        yield state
    finally:
        state.closing.set()
        for _ in range(64):
            state.release.release()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


CONFIG = """
[queue.default]
concurrency = 4

[queue.serial]
concurrency = 1

[task.notify]
queue = "default"

[task.notify.http]
method = "POST"
url = "{url}/echo/__JOBID__"
headers = {{ X-Token = "t0k" }}
params = {{ job = "__JOBID__", fixed = "1" }}
body = "job=__JOBID__"
timeout = 30
expect_status = [200, 201]

[task.picky]
http = {{ url = "{url}/status/503", expect_status = [201] }}
retry = {{ times = 2, delay = 0 }}
"""


@pytest.fixture
def server(make_daemon: Any, web: WebServer) -> Any:
    return make_daemon(CONFIG.format(url=web.url))


def test_configured_post_with_headers_params_body_and_jobid(server: Any, web: WebServer) -> None:
    job = server.submit(task="notify")
    done = server.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert done["exit_code"] == 0
    [seen] = web.requests
    ident = str(job["id"])
    assert seen.method == "POST"
    assert seen.path == f"/echo/{ident}"
    assert seen.query == {"job": [ident], "fixed": ["1"]}
    assert seen.headers["X-Token"] == "t0k"
    assert seen.body == f"job={ident}".encode()
    body = json.loads(server.output(job["id"]))
    assert body["body"] == f"job={ident}"
    head = server.output(job["id"], "stderr")
    assert head.startswith("HTTP/1.1 200 OK\n"), head
    assert "X-Test: yes" in head


def test_ad_hoc_get_output_and_truncation(server: Any, web: WebServer) -> None:
    job = server.submit(http={"url": f"{web.url}/plain?id=__JOBID__"}, max_output=5)
    assert server.wait(job["id"])["state"] == "succeeded"
    assert web.requests[0].method == "GET"
    assert web.requests[0].query == {"id": [str(job["id"])]}
    chunk = server.call("job.output", {"id": job["id"], "stream": "stdout"})
    assert chunk["data"] == "hello"
    assert chunk["truncated"] is True
    [attempt] = server.call("job.get", {"id": job["id"]})["tries"]
    assert (attempt["stdout_bytes"], attempt["truncated"]) == (5, True)  # what was kept, as for a program


def test_a_response_not_written_for_want_of_disk_space_is_marked_truncated(
    full_output_disk: Path, server: Any, web: WebServer
) -> None:
    # The disk is full before the job runs.
    with open(full_output_disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while filler.write(b"\0" * 4096):  # until ENOSPC (or a write of nothing)
            pass
    job = server.submit(http={"url": f"{web.url}/plain"})
    assert server.wait(job["id"])["state"] == "succeeded"
    assert server.call("job.get", {"id": job["id"]})["tries"][0]["truncated"] is True
    for stream in ("stdout", "stderr"):  # the body, and the response's head
        assert server.call("job.output", {"id": job["id"], "stream": stream})["truncated"] is True, stream


def test_unexpected_status_fails_each_attempt_and_retries(server: Any, web: WebServer) -> None:
    job = server.submit(task="picky")
    done = server.wait(job["id"])
    assert done["state"] == "failed", done
    assert done["attempts"] == 3
    assert done["exit_code"] is None
    assert "503" in done["error"]
    assert len(web.requests) == 3
    assert "HTTP/1.1 503" in server.output(job["id"], "stderr", attempt=2)


def test_expect_status_accepts_a_listed_error_status(server: Any, web: WebServer) -> None:
    job = server.submit(http={"url": f"{web.url}/status/404", "expect_status": [404]})
    assert server.wait(job["id"])["state"] == "succeeded"


def test_connection_refused_fails_the_attempt(server: Any, web: WebServer) -> None:
    import socket

    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        job = server.submit(http={"url": f"http://127.0.0.1:{port}/"})
        done = server.wait(job["id"])
    assert done["state"] == "failed"
    assert "HTTP request failed" in done["error"]


def test_job_timeout_and_http_timeout(server: Any, web: WebServer) -> None:
    job = server.submit(http={"url": f"{web.url}/hold"}, timeout=0.5)
    timed_out = server.wait(job["id"])
    assert timed_out["state"] == "timed_out" and "cancelled" not in (timed_out["error"] or ""), timed_out
    job = server.submit(http={"url": f"{web.url}/hold", "timeout": 0.5})
    done = server.wait(job["id"])
    assert done["state"] == "failed"
    assert "timed out" in done["error"]


# aiohttp's default time limit of a session's requests (5 minutes), made a microsecond: a request bound by it ends
# before the test server can have answered it, however fast the machine.
SHORT_AIOHTTP_TIMEOUT_SHIM = """
import aiohttp.client

aiohttp.client.DEFAULT_TIMEOUT = aiohttp.client.ClientTimeout(total=1e-6)
"""


def test_a_request_takes_its_own_timeout_not_aiohttps_default(make_daemon: Any, web: WebServer, tmp_path: Path) -> None:
    """aiohttp ends every request of a session after 5 minutes unless told otherwise: an HTTP job slower than that
    failed, its error saying it had timed out after its own `timeout` (3600 s by default). Played with aiohttp's
    default made a microsecond: a request the server holds until the test has seen it arrive succeeds within its own
    30 s (bound by that default, it would end before it could be answered)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHORT_AIOHTTP_TIMEOUT_SHIM)
    daemon = make_daemon(start=False)
    daemon.env["PYTHONPATH"] = str(shim)
    daemon.start()
    job = daemon.submit(http={"url": f"{web.url}/hold", "timeout": 30})
    web.arrivals.get(timeout=20)  # held by the server: its answer comes only after the release below
    web.release.release()
    done = daemon.wait(job["id"])
    assert done["state"] == "succeeded", done


def test_cancel_while_the_server_holds_the_request(server: Any, web: WebServer) -> None:
    job = server.submit(http={"url": f"{web.url}/hold"})
    web.arrivals.get(timeout=20)
    done = server.call("job.cancel", {"id": job["id"]})
    assert done["state"] == "cancelled", done
    assert "HTTP request stopped by jobd" in server.output(job["id"], "stderr")


def test_a_response_that_comes_while_jobd_is_out_of_descriptors_waits_on_its_connection_and_is_kept(
    server: Any, web: WebServer
) -> None:
    # An HTTP job opens its output files as the response comes. Without a descriptor to spare, the head and body
    # were dropped ("cannot write …: Too many open files") and the attempt marked truncated. Now the response is
    # read no further until the file can be opened, as a program's output waits in its pipe, and is kept whole.
    job = server.submit(http={"url": f"{web.url}/hold"})
    web.arrivals.get(timeout=WAIT)  # connected while jobd had descriptors
    stderr = server.state_dir / "output" / str(job["id"]) / "1.stderr"
    with out_of_descriptors(server):
        web.release.release()  # the response comes now, while jobd cannot open its files
        wait_for_log(server, f"cannot create {stderr}: Too many open files; the job's output waits unread on its")
    done = server.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert server.output(job["id"]) == "hello from the test server"
    assert server.output(job["id"], "stderr").startswith("HTTP/1.1 200 OK\n")
    [attempt] = server.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is False, attempt


def test_an_http_request_stopped_before_its_task_first_ran_still_tells_its_end(tmp_path: Path) -> None:
    # A task cancelled before its first step never runs its coroutine: the request's end was never told, so its job
    # stayed running for good, holding its slot, its cancel unanswered, and jobd's SIGTERM waited for it without
    # end (a soak test hit it with cancels racing starts). In process: the stop in the very turn the request began.
    from jobd.engine.http_task import HttpRequest, check_request, new_session

    async def stop_at_once() -> list[ExitInfo]:
        ends: list[ExitInfo] = []
        async with new_session() as session:
            request = HttpRequest(
                session,
                check_request({"url": "http://127.0.0.1:9/"}),
                1,
                max_output=1024,
                stdout_path=str(tmp_path / "1.stdout"),
                stderr_path=str(tmp_path / "1.stderr"),
                on_exit=ends.append,
                on_output=lambda: None,
            )
            request.stop()
            for _ in range(3):  # the cancelled task's turn, then its done callback's
                await asyncio.sleep(0)
        return ends

    [end] = asyncio.run(stop_at_once())
    assert end.exit_code is None and end.signal is None
    assert (tmp_path / "1.stderr").read_text() == "HTTP request stopped by jobd\n"


def test_http_jobs_share_no_cookies(server: Any, web: WebServer) -> None:
    # One cookie jar served every HTTP job: a session cookie one job's server set went with the next job's request
    # to that host, whoever submitted it. (aiohttp keeps no cookie for a bare IP address: hence localhost.)
    local = web.url.replace("127.0.0.1", "localhost")
    for path in ("/cookie", "/echo"):
        assert server.wait(server.submit(http={"url": local + path})["id"])["state"] == "succeeded"
    assert web.requests[-1].path == "/echo" and "Cookie" not in web.requests[-1].headers, web.requests[-1].headers


def test_a_response_header_that_is_not_utf8_is_kept_as_it_came(server: Any, web: WebServer) -> None:
    # The job failed (a UnicodeEncodeError writing the response's head) although its status was 200.
    job = server.submit(http={"url": f"{web.url}/latin1"})
    assert server.wait(job["id"])["state"] == "succeeded"
    head = server.call("job.output", {"id": job["id"], "stream": "stderr", "encoding": "base64"})
    assert b"filename=caf\xe9.txt" in base64.b64decode(head["data"]), head


def test_a_hundred_held_requests_do_not_hold_up_another_http_job(make_daemon: Any, web: WebServer) -> None:
    # aiohttp's pool gave HTTP jobs 100 connections at most, a limit of its own: the 101st job's request waited,
    # unseen, for one of them to end, and timed out meanwhile. The queues' concurrency is the limit.
    daemon = make_daemon("[queue.wide]\nconcurrency = 101\n")
    held = [daemon.submit(http={"url": f"{web.url}/hold"}, queue="wide")["id"] for _ in range(100)]
    for _ in held:
        web.arrivals.get(timeout=20)
    other = daemon.submit(http={"url": f"{web.url}/plain", "timeout": 10}, queue="wide")
    assert daemon.wait(other["id"], timeout=20)["state"] == "succeeded"
    for job_id in held:
        daemon.call("job.cancel", {"id": job_id})


def test_the_body_can_be_followed_while_it_comes(server: Any, web: WebServer) -> None:
    """The body was written to the job's stdout only once the request had ended: job.output showed nothing while
    it ran. It is written as it comes."""
    job = server.submit(http={"url": f"{web.url}/partial"})["id"]
    web.arrivals.get(timeout=20)
    chunk = server.call("job.output", {"id": job, "stream": "stdout", "wait": True})
    assert chunk["data"] == "first line\n" and not chunk["complete"], chunk
    assert server.call("job.get", {"id": job})["state"] == "running"
    web.release.release()
    assert server.wait(job)["state"] == "succeeded"
    assert server.output(job) == "first line\nsecond line\n"


def test_a_queue_of_one_runs_http_jobs_one_at_a_time(server: Any, web: WebServer) -> None:
    ids = [server.submit(http={"url": f"{web.url}/hold"}, queue="serial")["id"] for _ in range(3)]
    for _ in ids:
        web.arrivals.get(timeout=20)
        states = [server.call("job.get", {"id": i})["state"] for i in ids]
        assert states.count("running") == 1, states
        web.release.release()
    assert [server.wait(i)["state"] for i in ids] == ["succeeded"] * 3
    assert web.max_in_flight == 1


def test_queue_server_readme_payload_through_the_ad_hoc_api(server: Any, web: WebServer) -> None:
    # The README's HttpWorker example, with httpbin.org replaced by the test server.
    payload = {
        "priority": 800,
        "context": "MyCoolApp",
        "command": {
            "type": "http",
            "url": "http://httpbin.org/delay/10",
            "method": "GET",
            "timeout": 20,
            "params": {"username": "michael"},
        },
    }
    command = dict(payload["command"])  # type: ignore[call-overload]
    command["url"] = f"{web.url}/delay/10?jobid=__JOBID__"
    job = server.submit(http=command, context=payload["context"])
    assert server.wait(job["id"])["state"] == "succeeded"
    [seen] = web.requests
    assert seen.path == "/delay/10"
    assert seen.query == {"jobid": [str(job["id"])], "username": ["michael"]}


@pytest.mark.parametrize(
    "http",
    [
        {},
        {"url": "ftp://example.org/"},
        {"url": "http://x/", "method": "BREW"},
        {"url": "http://x/", "headers": {"A": "b\r\nEvil: 1"}},
        {"url": "http://x/", "headers": {"Bad\nName": "v"}},
        {"url": "http://x/", "headers": {"A": "b\x7f"}},  # aiohttp refused DEL and such at every attempt
        {"url": "http://x/", "headers": {"A": "\x01"}},
        {"url": "http://x/", "headers": {"Bad\tName": "v"}},
        {"url": "http://x/", "timeout": 0},
        {"url": "http://x/", "timeout": 1e300},  # past a century; inf itself was taken, and JSON cannot carry it
        {"url": "http://x/", "expect_status": [99]},
        {"url": "http://x/", "type": "exec"},
        {"url": "http://x/", "surprise": 1},
        {"url": "http://u:p@x/", "headers": {"Authorization": "Bearer t"}},
        # aiohttp refused these at each attempt, and the job's error was the whole URL, its password included
        {"url": "http://u:s3cret@127.0.0.1:99999/x"},
        {"url": "http://u:s3cret@127.0.0.1:port/x"},
        {"url": "http://u:s3cret@/x"},
        # hosts aiohttp refused at every attempt, after the job (or the callback) was taken
        {"url": "http://u:s3cret@a..b/"},
        {"url": "http://u:s3cret@" + "a" * 64 + ".example/"},
        {"url": "http://u:s3cret@1.2.3.4.5/"},
        {"url": "http://u:s3cret@127.1/"},
        {"url": "http://u:s3cret@0177.0.0.1/"},
        {"url": "http://u:s3cret@a\u200bb/"},
        {"url": "http://u:s3cret@\u2028/"},
        {"url": "http://u:s3cret@127.0.0.1:1\\@x/"},
        {"url": "http://u:s3cret@a\\b.invalid/x?token=t0k3n"},
        # characters the IDNA codec passes but no host name holds: taken, each job then failed at every try
        {"url": "http://u:s3cret@exa mple.com/"},
        {"url": "http://u:s3cret@exa%20mple.com/"},
        {"url": "http://u:s3cret@a<b.example/"},
    ],
)
def test_invalid_http_objects_are_refused(server: Any, http: dict[str, Any]) -> None:
    with pytest.raises(RemoteError) as caught:
        server.submit(http=http)
    assert "http" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_a_refused_url_is_named_without_its_credentials(server: Any, web: WebServer) -> None:
    """A refusal's message goes to the audit log too, and a task's to the journal and to daemon.status."""
    refused = [
        "htp://u:s3cret@127.0.0.1/x",  # not http(s): the message named the URL as given
        "http://u:s3cret@a\u2100b.invalid/x",  # urlsplit's ValueError quoted the netloc: an internal error, logged
        "http://u:s3cret@[::1/x",  # urlsplit's ValueError: an internal error
    ]
    for url in refused:
        with pytest.raises(RemoteError) as caught:
            server.submit(http={"url": url})
        assert caught.value.data["code"] == "INVALID_PARAMS", caught.value
        assert "s3cret" not in str(caught.value)
    messages = [entry["message"] for entry in server.call("audit.list", {})["entries"]]
    assert len(messages) == len(refused) and "s3cret" not in json.dumps(messages)
    for url in refused:
        server.write_config(CONFIG.format(url=web.url) + f"\n[task.broken]\nhttp = {{ url = {json.dumps(url)} }}\n")
        with pytest.raises(RemoteError) as caught:
            server.call("daemon.reload")
        assert "task.broken.http.url" in str(caught.value) and "s3cret" not in str(caught.value)
        assert "s3cret" not in json.dumps(server.call("daemon.status")["last_reload"])
    assert "s3cret" not in server.log()


def test_hosts_aiohttp_sends_to_are_taken() -> None:
    # A host of digits and dots must be a dotted quad; anything else is a name, which the resolver reads (aiohttp
    # sends `0x7f.0.0.1` to 127.0.0.1): the check refused it.
    from jobd.engine.http_task import check_url

    for url in (
        "http://0x7f.0.0.1:1/",
        "http://127.0.0.1/",
        "http://[::1]:8/",
        "http://b\u00fccher.example/",
        "http://x_y/",
    ):
        check_url(url)


def test_a_url_with_a_line_break_is_refused_for_it_not_quoted_as_if_sound() -> None:
    """urlsplit drops CR, LF and tabs: the refusal quoted "'http://xy/' is not an http:// or https:// URL", and a tab
    in a URL otherwise sound was dropped by aiohttp too, which requested another URL than the one written."""
    from jobd.engine.http_task import HttpSpecError, check_url

    for url in (
        "http://x\ny/",
        "http://127.0.0.1/a\r",
        "http://127.0.0.1/\0",
        "http://127.0.0.1/a\tb",
        "http://h/\x7f",
    ):
        with pytest.raises(HttpSpecError) as caught:
            check_url(url)
        assert str(caught.value) == (
            "'url': holds a control character (a tab, a line break, NUL: U+0000 to U+001F or U+007F), which no URL "
            "may hold"
        )


def test_a_refused_http_value_is_quoted_as_the_client_wrote_it() -> None:
    """JSON-style, as every other refusal quotes a value (and as TOML writes a string): `"FETCH"`, `"5"`, `true`,
    not Python's `'FETCH'`, `'5'`, `True`."""
    from jobd.engine.http_task import HttpSpecError, check_request

    url = "http://127.0.0.1/"
    for request, says in (
        ({"url": url, "method": "FETCH"}, "'method': \"FETCH\" is not allowed"),
        ({"url": url, "type": "exec"}, "'type': \"exec\" is not allowed"),
        ({"url": url, "timeout": "5"}, 'got "5"'),
        ({"url": url, "expect_status": [True]}, "'expect_status': true is not a status code"),
        ({"url": "ftp://user:secret@h/"}, "'url': \"ftp://***@h/\" is not an http:// or https:// URL"),
        ({"url": "http://h:0/é"}, "'url': \"http://h:0/é\" needs a host"),
    ):
        with pytest.raises(HttpSpecError) as caught:
            check_request(request)
        assert says in str(caught.value), (request, str(caught.value))


def test_an_http_job_is_refused_what_only_a_program_has(server: Any, web: WebServer) -> None:
    """`kill_grace` (a cancel or a timeout abandons the request at once: there is no grace to wait out) and
    `merge_stderr` (its stderr is the response's head, kept apart) have no meaning for an HTTP job: refused, named,
    with what it takes instead. `retry` and `max_output` are its own (tests above)."""
    url = {"url": f"{web.url}/plain"}
    for params, param, says in (
        ({"http": url, "kill_grace": 5}, "kill_grace", "a cancel or a timeout abandons its request at once"),
        ({"http": url, "kill_grace": 0}, "kill_grace", "'kill_grace' has no meaning for it"),
        ({"http": url, "merge_stderr": True}, "merge_stderr", "'merge_stderr' has no meaning for it"),
        ({"task": "notify", "merge_stderr": True}, "merge_stderr", "it takes no 'args', 'params', 'stdin' or"),
    ):
        with pytest.raises(RemoteError) as caught:
            server.call("job.submit", params)
        error = caught.value
        assert (error.code, error.data["param"]) == ("INVALID_PARAMS", param), error
        assert says in error.message, error
        if "http" in params:  # what it takes instead
            assert "beside 'http' it takes queue, priority, delay, timeout, retry, max_output" in error.message, error
    assert server.call("job.list")["jobs"] == [] and web.requests == []  # nothing was made, nothing was sent
    job = server.submit(http=url, merge_stderr=False, retry={"times": 1}, max_output=3)  # false is the default
    assert server.wait(job["id"])["state"] == "succeeded"
    assert server.output(job["id"]) == "hel"


def test_an_http_task_with_kill_grace_is_a_config_error(tmp_path: Path) -> None:
    """As job.submit refuses it for an ad-hoc HTTP job; an HTTP task without it waits no grace either (its jobs
    stop at once: a stop of jobd asks systemd for no time for them)."""
    from jobd.config import load_dir
    from jobd.errors import ConfigError

    path = tmp_path / "jobd.toml"
    path.write_text(
        '[daemon]\nkill_grace = 30\n\n[task.hook]\nhttp = { url = "http://127.0.0.1:9/" }\nkill_grace = 5\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_dir(str(tmp_path))
    error = caught.value
    assert (error.details["file"], error.details["line"], error.details["key"]) == (
        str(path),
        6,
        "task.hook.kill_grace",
    )
    assert "task.hook.kill_grace: an HTTP task starts no program: a cancel or a timeout abandons its request" in (
        error.message
    ), error
    assert "(its timeout, retry, max_output, queue and callbacks apply as to a program)" in error.message, error
    path.write_text(path.read_text().replace("kill_grace = 5\n", ""))
    assert load_dir(str(tmp_path)).tasks["hook"].kill_grace == 0.0  # not [daemon] kill_grace's 30


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        (
            'parameters = "env"',
            "its jobs take no args or params, which only a program's command line or environment takes",
        ),
        ('allowed_params = ["A"]', "its jobs take no params"),
        ('working_dir = "/tmp"', "no program runs in a directory"),
        ('environment = { A = "1" }', "no program reads an environment"),
        ('user = "nobody"', "jobd makes its request itself, as no user"),
        ('group = "nogroup"', "jobd makes its request itself, as no group"),
        ('run_as = "caller"', "jobd makes its request itself, as no user"),
    ],
)
def test_an_http_task_with_what_only_a_program_has_is_a_config_error(tmp_path: Path, setting: str, why: str) -> None:
    """They were taken and ignored: an administrator who gave an HTTP task an `environment` or a `user` thought they
    did something. Refused as `kill_grace` is, at their line, saying why."""
    from jobd.config import load_dir
    from jobd.errors import ConfigError

    key = setting.split(" ", 1)[0]
    (tmp_path / "jobd.toml").write_text(f'[task.hook]\nhttp = {{ url = "http://127.0.0.1:9/" }}\n{setting}\n')
    with pytest.raises(ConfigError) as caught:
        load_dir(str(tmp_path))
    error = caught.value
    assert (error.details["line"], error.details["key"]) == (3, f"task.hook.{key}"), error
    assert f"task.hook.{key}: an HTTP task starts no program: {why}; remove it" in error.message, error


def test_task_with_invalid_http_is_a_config_error() -> None:
    from jobd.engine.http_task import HttpSpecError, check_request

    with pytest.raises(HttpSpecError, match="url"):
        check_request({"method": "GET"})
    assert check_request({"url": "https://x/a"})["method"] == "GET"


def test_an_attempt_running_when_jobd_dies_is_lost_and_retried(server: Any, web: WebServer) -> None:
    job = server.submit(http={"url": f"{web.url}/hold"}, retry={"times": 1, "delay": 0})
    web.arrivals.get(timeout=20)
    server.kill9()
    web.release.release()  # the first request ends with nobody to read the answer
    server.start()
    web.release.release()  # the retry is answered
    done = server.wait(job["id"])
    assert done["state"] == "succeeded", done
    tries = server.call("job.get", {"id": job["id"]})["tries"]
    assert [t["outcome"] for t in tries] == ["lost", "succeeded"]


def test_job_json_shows_the_request_without_its_secrets(server: Any, web: WebServer) -> None:
    import subprocess
    import sys

    secrets = ("pa55word", "k3y", "s3cr3t", "sid=abc", "hunter2", "the body")
    url = web.url.replace("http://", "http://someone:pa55word@") + "/echo/__JOBID__?api_key=k3y&x=1"
    job = server.submit(
        http={
            "method": "post",
            "url": url,
            "headers": {"X-Api-Key": "s3cr3t", "Cookie": "sid=abc", "Accept": "text/plain"},
            "params": {"password": "hunter2", "page": "2"},
            "body": "the body",
            "expect_status": [200],
        }
    )
    assert server.wait(job["id"])["state"] == "succeeded"
    assert web.requests[0].headers["X-Api-Key"] == "s3cr3t"  # sent as given; only the JSON hides it
    assert web.requests[0].headers["Authorization"].startswith("Basic ")  # the URL's user:password
    shown = server.call("job.get", {"id": job["id"]})
    assert shown["http"] == {
        "method": "POST",
        "url": web.url.replace("http://", "http://***@") + "/echo/__JOBID__?api_key=***&x=1",
        "headers": {"X-Api-Key": "***", "Cookie": "***", "Accept": "text/plain"},
        "params": {"password": "***", "page": "2"},
        "body_bytes": 8,
        "timeout": None,
        "expect_status": [200],
    }
    status = subprocess.run(
        [sys.executable, "-m", "jobd.jobctl", "--socket", str(server.socket_path), "--json", "status", str(job["id"])],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    listed = server.call("job.list", {})["jobs"]
    for text in (json.dumps(shown), status.stdout, json.dumps(listed)):
        assert not [secret for secret in secrets if secret in text], text
    assert json.loads(status.stdout)["http"] == shown["http"]
    bearer = server.submit(http={"url": web.url, "headers": {"authorization": "Bearer s3cr3t"}})["id"]
    assert server.call("job.get", {"id": bearer})["http"]["headers"] == {"authorization": "Bearer ***"}
    assert server.call("job.get", {"id": server.submit(command=["/bin/true"])["id"]})["http"] is None
    # Only the secret's value changes: the rest of the query stays as written (not decoded and encoded again). A
    # name is recognised as the server reads it, decoded: `api%5Fkey` is api_key, `se%73sion` session.
    query = "/echo?q=a%20b&token=t0k&flag&x=%2F&api%5Fkey=k3y&se%73sion=s1d"
    delayed = server.submit(http={"url": web.url + query}, delay=3600)["id"]
    assert server.call("job.get", {"id": delayed})["http"]["url"] == (
        web.url + "/echo?q=a%20b&token=***&flag&x=%2F&api%5Fkey=***&se%73sion=***"
    )


def _aiohttp_parser() -> str:
    """The file of aiohttp's compiled HTTP parser, which a process that has imported aiohttp has mapped."""
    spec = importlib.util.find_spec("aiohttp._http_parser")
    if spec is None or spec.origin is None or not spec.origin.endswith(".so"):
        pytest.skip("this aiohttp has no compiled parser to find in a process's memory map")
    return spec.origin


def _has_loaded_aiohttp(daemon: Any) -> bool:
    return _aiohttp_parser() in Path(f"/proc/{daemon.pid}/maps").read_text()


def test_aiohttp_is_loaded_only_by_a_daemon_that_makes_http_requests(make_daemon: Any, web: WebServer) -> None:
    """aiohttp is a quarter of jobd's memory: a daemon without HTTP tasks, callbacks or listener does without it until
    its first ad-hoc HTTP job; one whose configuration has them (from the start, or from a reload) loads it at
    once, so that its first request does not hold the loop for the import."""
    plain = make_daemon("[queue.default]\nconcurrency = 1\n")
    assert plain.wait(plain.submit(command=["/bin/true"])["id"])["state"] == "succeeded"
    assert not _has_loaded_aiohttp(plain)
    assert plain.wait(plain.submit(http={"url": f"{web.url}/plain"})["id"])["state"] == "succeeded"
    assert _has_loaded_aiohttp(plain)

    assert _has_loaded_aiohttp(make_daemon(CONFIG.format(url=web.url)))

    reloaded = make_daemon("[queue.default]\nconcurrency = 1\n")
    assert not _has_loaded_aiohttp(reloaded)
    callbacks_only = f'[queue.default]\nconcurrency = 1\non_finish = [{{ http = {{ url = "{web.url}/done" }} }}]\n'
    reloaded.write_config(callbacks_only)
    reloaded.call("daemon.reload")
    assert _has_loaded_aiohttp(reloaded)


HTTP_WORKFLOW = """<workflow><subjobs><job name="j"><tasks>
  <task name="call" task="notify"/>
  <task name="given" task="notify"><input name="x">1</input></task>
</tasks></job></subjobs></workflow>"""


def test_a_workflow_task_can_be_an_http_task(make_daemon: Any, web: WebServer) -> None:
    """A workflow's <task task="NAME"> naming an HTTP task made a job without a command and without its request:
    its spawn raised, the launch answered INTERNAL_ERROR and the instance stayed EXECUTING. It runs the request
    now, and its output is the response body; one given inputs is refused by name (an HTTP task takes none)."""
    daemon: Any = make_daemon(CONFIG.format(url=web.url), start=False)
    daemon.write_workflows(calls=HTTP_WORKFLOW)
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "calls"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 1), done
    [seen] = web.requests
    assert seen.method == "POST" and seen.body.startswith(b"job=")
    tasks = {task["name"]: task for task in daemon.call("instance.get", {"id": launched["id"]})["jobs"][0]["tasks"]}
    assert (tasks["call"]["status"], tasks["call"]["retval"]) == ("TERMINATED", 0), tasks
    assert tasks["given"]["status"] == "ABORTED"
    assert tasks["given"]["error"] == "task 'notify' is an HTTP request: it takes no inputs and no stdin"
    [job] = daemon.call("job.list", {"context": f"instance:{launched['id']}"})["jobs"]
    output = daemon.call("job.output", {"id": job["id"], "stream": "stdout"})
    assert '"path": "/echo/' in output["data"], output


GATED_HTTP_WORKFLOW = """<workflow><subjobs><job name="first">
  <tasks><task name="gate" path="/usr/bin/head -n 1" queue="default"><input name="g"><value select="'GATE'"/></input>
  </task></tasks>
  <subjobs><job name="then"><tasks><task name="call" task="notify"/></tasks></job></subjobs>
</job></subjobs></workflow>"""


def test_an_http_task_turned_into_a_command_by_a_reload_runs_whole_as_the_command_in_a_running_instance(
    make_daemon: Any, web: WebServer, tmp_path: Path
) -> None:
    """An instance's task takes its [task.NAME] as it is when the task's turn comes, whole (docs/config.md,
    Reloading). A reload that turned notify into a command once made the instance's next notify a job with neither
    (its argv from the old definition, its request from the new one): its spawn raised, and the job stayed running
    for good."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    config = CONFIG.format(url=web.url)
    daemon: Any = make_daemon(config, start=False)
    daemon.write_workflows(gated=GATED_HTTP_WORKFLOW.replace("GATE", str(gate)))
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "gated"})
    daemon.write_config('[queue.default]\nconcurrency = 4\n[task.notify]\nqueue = "default"\ncommand = ["/bin/true"]\n')
    assert daemon.call("daemon.reload")["ok"] is True
    with open(gate, "w") as writer:
        writer.write("go\n")
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), done
    assert web.requests == []  # notify is a command now
    [job] = [job for job in daemon.call("job.list", {"limit": 10})["jobs"] if job["command"] == ["/bin/true"]]
    assert (job["state"], job["http"]) == ("succeeded", None), job
    assert daemon.call("daemon.status")["jobs"].get("running", 0) == 0
