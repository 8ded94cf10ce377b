"""Completion callbacks (on_success / on_failure / on_finish): an HTTP server inside the test receives them.

Nothing sleeps or polls: the test blocks on the queue its server fills, on job.wait, or on a FIFO.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import sqlite3
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from recovery.support import wait_for_log

from jobd.client import RemoteError
from jobd.job_id_mark import MARK
from tests.harness import Daemon

TIMEOUT = 30


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A loopback HTTP server: every request goes to `requests`; `plan[path]` lists the statuses to answer first."""

    def __init__(self) -> None:
        self.requests: queue.Queue[Received] = queue.Queue()
        self.plan: dict[str, list[int]] = {}
        self.release = threading.Event()  # ends the requests to /hold, which wait for it (at most TIMEOUT)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                planned = receiver.plan.get(path)
                status = planned.pop(0) if planned else 200
                # Recorded before the answer: once jobd has exited, every request it made is in `requests`.
                receiver.requests.put(Received(self.command, self.path, dict(self.headers.items()), body))
                if path == "/hold" and not receiver.release.wait(TIMEOUT):
                    return
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/moved")
                if path == "/endless":  # a body that never ends, until the client goes
                    self.send_header("Content-Type", "application/octet-stream")
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        while True:
                            self.wfile.write(b"x" * 65536)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever,  # no-poll-ok: wakes each 0.5 s to see if shutdown() was asked
            daemon=True,
        )
        self.thread.start()

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def next(self) -> Received:
        return self.requests.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _rows(daemon: Daemon) -> list[dict[str, Any]]:
    """The callback table, read once jobd has stopped (it keeps the database locked while it runs)."""
    # Closed, not just committed: an open WAL connection would keep the next jobd from its exclusive lock.
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute('SELECT * FROM "callback" ORDER BY id')]


def _sql(daemon: Daemon, statement: str) -> int:
    """Change the database of a stopped jobd; the number of rows changed."""
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db, db:
        return db.execute(statement).rowcount


def _post_script(url: str, *, fifo: str | None = None) -> list[str]:
    """An exec callback that POSTs what it got (stdin, JOBD_* variables) to `url`, then reads `fifo` if given."""
    code = (
        "import json, os, sys, urllib.request\n"
        "body = json.dumps({'stdin': json.load(sys.stdin),"
        " 'env': {k: v for k, v in os.environ.items() if k.startswith('JOBD_')}}).encode()\n"
        "urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=body, method='POST'), timeout=30).read()\n"
        "if len(sys.argv) > 2:\n"
        "    open(sys.argv[2]).read()\n"
    )
    return [sys.executable, "-c", code, url, *([fifo] if fifo else [])]


def test_success_failure_finish_fire_as_documented(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    hooks = f"""
        on_success = [{{ http = {{ url = "{receiver.url("/success")}" }} }}]
        on_failure = [{{ http = {{ url = "{receiver.url("/failure")}" }} }}]
        on_finish = [{{ http = {{ url = "{receiver.url("/finish")}", method = "GET" }} }}]
    """
    d = make_daemon(
        f"""
        [queue.default]
        concurrency = 2

        [task.ok]
        command = ["/bin/true"]
        {hooks}

        [task.bad]
        command = ["/bin/false"]
        {hooks}
        """
    )
    ok = d.submit(task="ok")["id"]
    assert d.wait(ok)["state"] == "succeeded"
    got = sorted([receiver.next(), receiver.next()], key=lambda r: r.path)
    assert got[0].method == "GET" and got[0].path == f"/finish?jobid={ok}"  # as Queue Server's GET callback
    assert got[1].method == "POST" and got[1].path == "/success"
    summary = got[1].json()
    assert summary["id"] == ok and summary["state"] == "succeeded" and summary["exit_code"] == 0
    assert summary["last_attempt"]["number"] == 1 and summary["last_attempt"]["outcome"] == "succeeded"
    # docs/jobs.md: the job as job.get returns it, without its tries, plus last_attempt
    assert set(summary) == set(d.call("job.get", {"id": ok})) - {"tries"} | {"last_attempt"}, sorted(summary)
    assert got[1].headers["X-Jobd-Event"] == "on_success"

    bad = d.submit(task="bad")["id"]
    assert d.wait(bad)["state"] == "failed"
    got = sorted([receiver.next(), receiver.next()], key=lambda r: r.path)
    assert got[0].path == "/failure" and got[0].json()["state"] == "failed" and got[0].json()["exit_code"] == 1
    assert got[1].path == f"/finish?jobid={bad}"  # on_finish fires on failure too (Queue Server's callback_done)

    assert d.stop() == 0
    rows = [(row["job_id"], row["event"], row["state"], row["tries"]) for row in _rows(d)]
    assert rows == [
        (ok, "on_success", "delivered", 1),
        (ok, "on_finish", "delivered", 1),
        (bad, "on_failure", "delivered", 1),
        (bad, "on_finish", "delivered", 1),
    ]


def test_job_callbacks_queue_callbacks_and_exec_stdin(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    d = make_daemon(
        f"""
        [queue.default]
        concurrency = 2
        on_finish = [{{ http = {{ url = "{receiver.url("/queue")}" }} }}]
        """
    )
    job = d.submit(
        command=["/bin/sh", "-c", "exit 3"],
        callbacks={"on_failure": [{"exec": _post_script(receiver.url("/exec"))}]},
    )["id"]
    assert d.wait(job)["state"] == "failed"
    got = {r.path: r for r in (receiver.next(), receiver.next())}
    assert got["/queue"].json()["id"] == job
    exec_got = got["/exec"].json()
    assert exec_got["stdin"]["id"] == job and exec_got["stdin"]["state"] == "failed"
    assert exec_got["stdin"]["last_attempt"]["exit_code"] == 3
    env = exec_got["env"]
    assert env["JOBD_JOB_ID"] == str(job) and env["JOBD_QUEUE"] == "default"
    assert env["JOBD_STATE"] == "failed" and env["JOBD_EXIT_CODE"] == "3"
    d.stop()
    rows = [(row["event"], row["state"]) for row in _rows(d)]
    assert rows == [("on_failure", "delivered"), ("on_finish", "delivered")]


def test_callback_credentials_stay_out_of_the_log_and_the_table(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    """The delivery uses the URL as given; the log line and the callback's row name it without its secrets."""
    secret_url = receiver.url("/cb?token=s3cret-query&page=2").replace("http://", "http://alice:s3cret-pw@")
    d = make_daemon("[queue.default]\n")
    job = d.submit(command=["/bin/true"], callbacks={"on_success": [{"http": {"url": secret_url}}]})["id"]
    got = receiver.next()
    assert got.path == "/cb?token=s3cret-query&page=2" and got.json()["id"] == job
    assert got.headers["Authorization"] == "Basic YWxpY2U6czNjcmV0LXB3"  # alice:s3cret-pw
    d.stop()
    (row,) = _rows(d)
    assert row["state"] == "delivered"
    assert row["target"] == "POST " + receiver.url("/cb?token=***&page=2").replace("http://", "http://***@")
    log = d.log()
    assert f"job={job} on_success callback" in log
    assert "s3cret" not in log and "s3cret" not in row["target"]


def test_urls_aiohttp_would_refuse_are_refused_when_given_without_their_credentials(
    make_daemon: Callable[..., Daemon],
) -> None:
    """aiohttp refused such a URL at every try, with its whole text as the error: the row's last_error and the log
    line said user:password and the token parameter. A port out of range, then a host with an empty label (which
    jobd's check let by, and which failed all 8 tries), are refused at the submit, masked."""
    d = make_daemon("[queue.default]\n")
    port = "http://alice:s3cret-pw@127.0.0.1:99999/cb/__JOBID__?token=s3cret-query&page=2"
    with pytest.raises(RemoteError, match=re.escape('"http://***@127.0.0.1:99999/cb/__JOBID__?token=***&page=2"')):
        d.submit(command=["/bin/true"], callbacks={"on_success": [{"http": {"url": port}}]})
    label = "http://alice:s3cret-pw@ex\u00e9ample..com/cb/__JOBID__?token=s3cret-query&page=2"
    with pytest.raises(RemoteError, match=re.escape('"http://***@ex\u00e9ample..com/cb/__JOBID__?token=***&page=2"')):
        d.submit(command=["/bin/true"], callbacks={"on_success": [{"http": {"url": label}}]})
    assert d.call("job.list")["jobs"] == []
    assert "s3cret" not in d.log()


def test_exec_callback_output_is_kept_beside_the_job_and_expires_with_it(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    # It used to go to STATE_DIR/callbacks/ID.*, which nothing ever removed: files without end.
    d = make_daemon("[queue.default]\nconcurrency = 1\n", daemon_extra="history = { keep_last = 1 }")
    talk = ["/bin/sh", "-c", 'echo said; echo complained >&2; exec "$0" "$@"', *_post_script(receiver.url("/x"))]
    first = d.submit(command=["/bin/true"], callbacks={"on_finish": [{"exec": talk}]})["id"]
    assert d.wait(first)["state"] == "succeeded"
    assert receiver.next().path == "/x"
    wait_for_log(d, "delivered (try 1)")  # the only delivery: its process has ended, its output is written
    kept = d.state_dir / "output" / str(first)
    [stdout] = kept.glob("callback-*.stdout")
    assert stdout.read_text() == "said\n" and stdout.with_suffix(".stderr").read_text() == "complained\n"

    second = d.submit(command=["/bin/true"])["id"]  # keep_last = 1: the first job expires, and its files with it
    assert d.wait(second)["state"] == "succeeded"
    d.stop()
    assert not kept.exists()
    assert not (d.state_dir / "callbacks").exists()


def test_an_exec_callback_try_shows_its_own_output_not_the_try_before(make_daemon: Callable[..., Daemon]) -> None:
    # The tries of a delivery write the same files, made on a stream's first byte: a try that left stderr empty
    # kept the previous try's complaint, shown as its own.
    d = make_daemon("[queue.default]\n")
    script = 'if [ "$JOBD_CALLBACK_TRY" = 1 ]; then echo first try failed >&2; exit 1; fi; echo second try'
    job = d.submit(command=["/bin/true"], callbacks={"on_finish": [{"exec": ["/bin/sh", "-c", script]}]})["id"]
    wait_for_log(d, "delivered (try 2)")
    kept = d.state_dir / "output" / str(job)
    [stdout] = kept.glob("callback-*.stdout")
    assert stdout.read_text() == "second try\n"
    assert not stdout.with_suffix(".stderr").exists()
    d.stop()


def test_a_job_whose_callback_runs_expires_once_it_is_delivered_output_and_all(
    make_daemon: Callable[..., Daemon],
) -> None:
    # keep_last = 1: the next job's end expired the first while its callback slept; the callback's output then made
    # the job's output directory anew, and nothing removed it again. The job is now kept until its delivery is
    # done, and then expires with all its output, once a job that finished after it counts: one whose deliveries
    # are done too (a job waiting for its callbacks does not count towards keep_last).
    slow = json.dumps(["/bin/sh", "-c", "sleep 1; echo late"])
    d = make_daemon(
        f'[queue.default]\nconcurrency = 1\n[task.quick]\ncommand = ["/bin/true"]\non_finish = [{{ exec = {slow} }}]\n',
        daemon_extra="history = { keep_last = 1 }",
    )
    first = d.submit(task="quick")["id"]
    assert d.wait(first)["state"] == "succeeded"
    second = d.submit(task="quick")["id"]
    assert d.wait(second)["state"] == "succeeded"
    assert d.call("job.get", {"id": first})["state"] == "succeeded"  # kept: its callback is still asleep
    wait_for_log(d, f"job={first} on_finish callback")  # its delivery ended
    wait_for_log(d, f"job={second} on_finish callback")  # now second counts, and first expires in a later turn
    d.call("ping")
    with pytest.raises(RemoteError) as gone:
        d.call("job.get", {"id": first})
    assert gone.value.code == "UNKNOWN_JOB"
    assert d.stop() == 0  # deliveries under way end first (docs/jobs.md)
    assert sorted(p.name for p in (d.state_dir / "output").iterdir()) == [MARK, str(second)]


def test_bad_callbacks_are_refused(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[queue.default]\n")
    with pytest.raises(Exception, match="callbacks"):
        d.submit(command=["/bin/true"], callbacks={"on_done": []})
    with pytest.raises(Exception, match="http"):
        d.submit(command=["/bin/true"], callbacks={"on_finish": [{"http": {"url": "ftp://x"}}]})


# A bad value for every key of a callback table, as the lines of its [[…on_success]] table, the bad one last; and
# the key path, below that table, that a refusal names (the deepest key at fault: it named only `on_success[2]`).
_BAD_KEYS: dict[str, list[str]] = {
    "exec": ['exec = ["relative"]'],
    "execx": ['execx = ["/bin/true"]'],  # an unknown key is the key named
    "http": ['http = "http://127.0.0.1/"'],
    "http.url": ['http.url = "ftp://127.0.0.1/"'],
    "http.method": ['http.url = "http://127.0.0.1/"', 'http.method = "PUT"'],
    "http.headers": ['http.url = "http://127.0.0.1/"', 'http.headers = { "Bad Name:" = "v" }'],
    "http.timeout": ['http.url = "http://127.0.0.1/"', "http.timeout = 0"],
    "http.timeoutx": ['http.url = "http://127.0.0.1/"', "http.timeoutx = 1"],
}


def test_the_bad_keys_cover_every_key_of_a_callback() -> None:
    from jobd.engine.callbacks import _HTTP_KEYS

    assert {"exec", "http"} | {f"http.{key}" for key in _HTTP_KEYS} <= set(_BAD_KEYS)


@pytest.mark.parametrize("key", _BAD_KEYS)
def test_a_bad_callback_in_the_configuration_names_its_deepest_key_and_line(tmp_path: Path, key: str) -> None:
    from jobd.config import load
    from jobd.errors import ConfigError

    head = '[task.t]\ncommand = ["/bin/true"]\n\n[[task.t.on_success]]\nexec = ["/bin/true"]\n\n[[task.t.on_success]]\n'
    (tmp_path / "jobd.toml").write_text(head + "".join(f"{line}\n" for line in _BAD_KEYS[key]))
    with pytest.raises(ConfigError) as refused:
        load([str(tmp_path)])
    assert refused.value.details["key"] == f"task.t.on_success[2].{key}", refused.value.message
    assert refused.value.details["line"] == head.count("\n") + len(_BAD_KEYS[key]), refused.value.message
    assert refused.value.message.startswith(
        f"{tmp_path}/jobd.toml:{refused.value.details['line']}: task.t.on_success[2]"
    )


def test_a_bad_callback_of_a_submit_names_its_deepest_key(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("[queue.default]\n")
    refusals = {f"on_success[2].{key}": {"on_success": [{"exec": ["/bin/true"]}, tomllib.loads("\n".join(lines))]}
                for key, lines in _BAD_KEYS.items()}  # fmt: skip
    refusals |= {"on_done": {"on_done": []}, "on_finish": {"on_finish": {}}, "on_failure[1]": {"on_failure": [5]}}
    for key, callbacks in refusals.items():
        with pytest.raises(RemoteError) as refused:
            d.submit(command=["/bin/true"], callbacks=callbacks)
        assert (refused.value.code, refused.value.data.get("param")) == ("INVALID_PARAMS", "callbacks"), key
        assert refused.value.data.get("key") == key, (key, refused.value.message)
    with pytest.raises(RemoteError) as refused:  # the parameter as a whole: no key inside it to name
        d.submit(command=["/bin/true"], callbacks=[])
    assert "key" not in refused.value.data and refused.value.data.get("param") == "callbacks"


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        ({"http": {"url": "http://h/", "method": "PUT"}}, 'expected "POST" or "GET", got "PUT"'),
        ({"http": {"url": "http://h/", "timeout": "30"}}, 'expected a number of seconds > 0 and <= 3600, got "30"'),
        ({"http": {"url": "http://h/", "timeout": True}}, "<= 3600, got true"),
        ({"exec": ["bin/notify"]}, 'the program must be an absolute path, got "bin/notify"'),
    ],
)
def test_a_bad_callback_value_is_quoted_as_the_client_wrote_it(callback: dict[str, Any], message: str) -> None:
    """JSON-style, as every refused value is (`"PUT"`, `"30"`, `true`, not Python's `'PUT'`, `'30'`, `True`); the
    timeout's refusal said nothing of what it got."""
    from jobd.engine.callbacks import check_list

    with pytest.raises(ValueError, match=re.escape(message)):
        check_list([callback], "callbacks.on_finish")


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        ({"http": {"url": "http://h/", "headers": {"Authorization": "Bearer X\nX-Injected: 1"}}}, "contains CR, LF"),
        ({"http": {"url": "http://h/", "headers": {"X-Sig": "a\x7fb"}}}, "another control character"),
        (
            {"http": {"url": "http://h/", "headers": {"Bad Name:": "v"}}},
            "'Bad Name:' is not a valid header name: a name is not empty and holds no ':', space, tab or other",
        ),
        ({"http": {"url": "http://[::1/x"}}, "its host part cannot be read"),
        ({"http": {"url": "http://h:99999/"}}, "a port from 1 to 65535"),
        ({"http": {"url": "http://u:pw@h/", "headers": {"Authorization": "x"}}}, "give only one"),
        ({"exec": ["/bin/echo\0x"]}, "an argument contains NUL"),
    ],
)
def test_a_callback_refused_at_every_delivery_is_refused_at_once(callback: dict[str, Any], message: str) -> None:
    """Checked as an HTTP job's request is: each of these was taken, then failed every delivery (8 tries over
    minutes) with aiohttp's or exec's error."""
    from jobd.engine.callbacks import check_list

    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        check_list([callback], "callbacks.on_finish")
    assert str(refused.value).startswith("callbacks.on_finish[1]")
    assert "pw" not in str(refused.value)  # a URL's credentials are masked


def test_a_hundred_callbacks_to_a_server_that_hangs_delay_another_but_do_not_fail_it(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    # aiohttp's pool held 100 connections at most, and the wait for one counted against a try's timeout: behind a
    # hundred callbacks to a server that hangs, a callback to a healthy one failed its tries without being sent.
    # Now at most HTTP_AT_ONCE tries are under way, and the others wait their turn before their timeout starts.
    d = make_daemon("[queue.default]\nconcurrency = 8\n")
    hold = {"on_finish": [{"http": {"url": receiver.url("/hold"), "timeout": 4}}]}
    for _ in range(100):
        d.submit(command=["/bin/true"], callbacks=hold)
    for _ in range(100):
        assert receiver.next().path == "/hold"
    healthy = {"on_finish": [{"http": {"url": receiver.url("/ok"), "timeout": 1}}]}  # shorter than the hold
    victim = d.submit(command=["/bin/true"], callbacks=healthy)
    arrived = receiver.next()
    while arrived.path == "/hold":  # tries of the held ones, timed out and tried again, may come first
        arrived = receiver.next()
    assert arrived.path == "/ok" and arrived.json()["id"] == victim["id"]
    assert arrived.headers["X-Jobd-Try"] == "1"  # its first try, not a later one after failures unsent
    receiver.release.set()
    d.stop()


def test_failed_deliveries_are_retried_with_backoff(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    receiver.plan["/flaky"] = [503, 500]
    d = make_daemon("[queue.default]\n")
    job = d.submit(command=["/bin/true"], callbacks={"on_success": [{"http": {"url": receiver.url("/flaky")}}]})["id"]
    tries = [receiver.next() for _ in range(3)]
    assert [r.headers["X-Jobd-Try"] for r in tries] == ["1", "2", "3"]
    assert all(r.json()["id"] == job for r in tries)
    d.stop()
    (row,) = _rows(d)
    assert row["state"] == "delivered" and row["tries"] == 3 and row["last_error"] == "HTTP status 500"


def test_redirects_are_failed_tries_not_followed(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    """aiohttp's default followed a 302 (or 301) with a GET without the summary, and the page it landed on counted
    as the delivery."""
    receiver.plan["/hook"] = [302]
    d = make_daemon("[queue.default]\n")
    d.submit(command=["/bin/true"], callbacks={"on_success": [{"http": {"url": receiver.url("/hook")}}]})
    tries = [receiver.next() for _ in range(2)]
    assert [(r.method, r.path.split("?")[0]) for r in tries] == [("POST", "/hook")] * 2, tries
    d.stop()
    (row,) = _rows(d)
    assert row["state"] == "delivered" and row["tries"] == 2 and row["last_error"] == "HTTP status 302", row


def test_an_endless_response_body_is_not_read(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    """The status decides a delivery; the body was read whole into jobd's memory (3 GiB within 11 s here)."""
    d = make_daemon("[queue.default]\n")
    hook = {"http": {"url": receiver.url("/endless"), "timeout": 60}}
    d.submit(command=["/bin/true"], callbacks={"on_success": [hook]})
    assert receiver.next().path.split("?")[0] == "/endless"
    d.stop()  # the delivery is over: recorded, not still reading
    (row,) = _rows(d)
    assert row["state"] == "delivered" and row["tries"] == 1, row


def test_an_exec_callback_running_at_a_stop_is_ended_and_not_counted(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """It got SIGTERM and jobd exited at once: one that ignored it ran on, an orphan, and the next start ran it
    again beside it. jobd now waits for its end (SIGKILL after a second); its try is not counted, and it runs
    again at the next start."""
    started, done, again = tmp_path / "started", tmp_path / "done", tmp_path / "again"
    os.mkfifo(started)
    os.mkfifo(again)
    script = (
        f'if [ -e "{done}" ]; then echo again > "{again}"; exit 0; fi; '
        f'trap "" TERM; echo $$ > "{started}"; exec sleep 600'
    )
    d = make_daemon(
        f"""
        [queue.default]

        [task.t]
        command = ["/bin/true"]
        on_finish = [{{ exec = ["/bin/sh", "-c", {json.dumps(script)}] }}]
        """
    )
    d.submit(task="t")
    with open(started) as fifo:  # the callback runs (and ignores SIGTERM, as does the sleep it becomes)
        pid = int(fifo.read())
    pidfd = os.pidfd_open(pid)
    try:
        assert d.stop() == 0
        ended, _, _ = select.select([pidfd], [], [], 0)  # a pidfd is readable once its process has exited
        assert ended, f"the callback (pid {pid}) outlived jobd"
    finally:
        os.close(pidfd)
    (row,) = _rows(d)
    assert (row["state"], row["tries"]) == ("pending", 0), row
    done.touch()
    d.start()
    with open(again) as fifo:  # run again, under way: the stop lets it end and records it
        assert fifo.read() == "again\n"
    d.stop()
    (row,) = _rows(d)
    assert (row["state"], row["tries"]) == ("delivered", 1), row


def test_a_job_is_kept_until_its_callbacks_are_delivered(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    """With keep_last = 0 a job expired as it finished, before its first delivery, which then never happened (and
    was logged as failed after 8 tries). It is kept until its deliveries are done, then expires."""
    d = make_daemon("[queue.default]\n", daemon_extra="history = { keep_last = 0 }")
    job = d.submit(command=["/bin/true"], callbacks={"on_finish": [{"http": {"url": receiver.url("/done")}}]})["id"]
    assert receiver.next().json()["id"] == job
    d.stop()
    assert f"job={job} on_finish callback 'POST {receiver.url('/done')}' delivered (try 1)" in d.log(), d.log()
    assert "given up" not in d.log() and "failed for good" not in d.log()
    d.start()  # the rules apply at the start: the job, its delivery done, is not kept
    with pytest.raises(RemoteError) as gone:
        d.call("job.get", {"id": job})
    assert gone.value.code == "UNKNOWN_JOB"


def test_a_job_kept_for_its_callback_does_not_push_out_a_newer_one(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    """keep_last = 2: a job kept for its callback counted among the finished jobs, and a job among the last two
    was expired in its place (its output gone as it finished). The newest two stay; the kept one goes once its
    delivery is done."""
    receiver.plan["/hook"] = [500]  # the first try fails; the second, a second later, is the delivery
    d = make_daemon("[queue.default]\n", daemon_extra="history = { keep_last = 2 }")
    first = d.submit(command=["/bin/true"], callbacks={"on_finish": [{"http": {"url": receiver.url("/hook")}}]})["id"]
    assert receiver.next().headers["X-Jobd-Try"] == "1"
    later = [d.wait(d.submit(command=["/bin/echo", "result"])["id"])["id"] for _ in range(2)]
    d.call("ping")  # the trim after their ends has run
    assert [job["id"] for job in d.call("job.list", {})["jobs"]] == [*reversed(later), first]
    assert d.output(later[0]) == "result\n"
    assert receiver.next().headers["X-Jobd-Try"] == "2"
    wait_for_log(d, "delivered (try 2)")
    d.call("ping")  # the trim after the delivery has run
    assert [job["id"] for job in d.call("job.list", {})["jobs"]] == list(reversed(later))


def test_slow_callback_holds_no_slot(make_daemon: Callable[..., Daemon], receiver: Receiver, tmp_path: Path) -> None:
    fifo = str(tmp_path / "release")
    os.mkfifo(fifo)
    d = make_daemon(
        f"""
        [queue.serial]
        concurrency = 1

        [task.first]
        command = ["/bin/true"]
        queue = "serial"
        on_finish = [{{ exec = {json.dumps(_post_script(receiver.url("/started"), fifo=fifo))} }}]

        [task.second]
        command = ["/bin/true"]
        queue = "serial"
        """
    )
    first = d.submit(task="first")["id"]
    started = receiver.next()
    assert started.path == "/started" and started.json()["stdin"]["id"] == first
    # The callback is blocked on the FIFO: the next job of the one-slot queue still runs at once.
    second = d.submit(task="second")["id"]
    assert d.wait(second, timeout=TIMEOUT)["state"] == "succeeded"
    with open(fifo, "w") as release:  # the callback reads it: its open has a reader, so this does not block
        release.write("go")
    d.stop()
    (row,) = _rows(d)
    assert (row["job_id"], row["state"], row["tries"]) == (first, "delivered", 1)


def test_pending_delivery_survives_a_restart(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    receiver.plan["/later"] = [503]
    d = make_daemon("[queue.default]\n")
    job = d.submit(command=["/bin/true"], callbacks={"on_finish": [{"http": {"url": receiver.url("/later")}}]})["id"]
    assert receiver.next().headers["X-Jobd-Try"] == "1"  # refused: the next try is a second away
    d.kill9()
    d.start()
    again = receiver.next()
    assert again.json()["id"] == job and again.json()["state"] == "succeeded"
    d.stop()
    (row,) = _rows(d)
    assert row["state"] == "delivered" and row["tries"] >= 1


def test_config_callbacks_are_checked_and_kept(tmp_path: Path) -> None:
    from jobd import config
    from jobd.errors import ConfigError

    base = f'[daemon]\nstate_dir = "{tmp_path}/state"\nsocket = "{tmp_path}/s"\n[queue.default]\n'
    good = base + (
        'on_failure = [{ http = { url = "http://127.0.0.1:9/q" } }]\n'
        '[task.t]\ncommand = ["/bin/true"]\non_success = [{ exec = ["/usr/bin/notify", "--job"] }]\n'
    )
    (tmp_path / "jobd.toml").write_text(good)
    loaded = config.load([str(tmp_path)])
    assert loaded.tasks["t"].callbacks == {"on_success": [{"exec": ["/usr/bin/notify", "--job"]}]}
    assert loaded.queues["default"].callbacks == {
        "on_failure": [{"http": {"url": "http://127.0.0.1:9/q", "method": "POST"}}]
    }
    (tmp_path / "jobd.toml").write_text(
        base + '[task.t]\ncommand = ["/bin/true"]\non_finish = [{ exec = ["notify"] }]\n'
    )
    with pytest.raises(ConfigError, match=r"task\.t\.on_finish\[1\]\.exec: the program must be an absolute path"):
        config.load([str(tmp_path)])


def test_exec_callbacks_of_a_job_are_for_admins_only(tmp_path: Path) -> None:
    from jobd import config
    from jobd.engine.submit import SubmitRequest, _with_callbacks
    from jobd.errors import InsufficientRights
    from jobd.model import JobSpec
    from jobd.peer import Peer

    (tmp_path / "jobd.toml").write_text(
        f'[daemon]\nstate_dir = "{tmp_path}/state"\nsocket = "{tmp_path}/s"\n[queue.default]\n'
        '[task.t]\ncommand = ["/bin/true"]\non_finish = [{ exec = ["/bin/true"] }]\n'
    )
    loaded = config.load([str(tmp_path)])
    user = Peer(uid=1000, gid=1000, pid=1, is_admin=False)
    spec = JobSpec(command=("/bin/true",), queue="default", task="t")
    http = {"on_success": [{"http": {"url": "http://127.0.0.1:9/", "method": "POST"}}]}
    resolved = _with_callbacks(loaded, SubmitRequest(task="t", callbacks=http), user, spec)
    assert resolved.callbacks == {
        "on_success": http["on_success"],
        "on_finish": [{"exec": ["/bin/true"]}],  # the task's own exec callback is the administrator's
    }
    with pytest.raises(InsufficientRights, match="exec callbacks"):
        _with_callbacks(loaded, SubmitRequest(task="t", callbacks={"on_finish": [{"exec": ["/bin/true"]}]}), user, spec)


def test_backoff_between_tries_is_recorded(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    receiver.plan["/down"] = [503, 502]
    d = make_daemon("[queue.default]\n")
    job = d.submit(command=["/bin/true"], callbacks={"on_success": [{"http": {"url": receiver.url("/down")}}]})["id"]
    assert [receiver.next().headers["X-Jobd-Try"] for _ in range(2)] == ["1", "2"]
    d.stop()  # the try under way is recorded; the third stays pending in the table
    (row,) = _rows(d)
    assert (row["job_id"], row["state"], row["tries"], row["last_error"]) == (job, "pending", 2, "HTTP status 502")
    # Try 1 was made at or after created_at and set the next one 1 s later; try 2 set the next one 2 s after it.
    assert row["next_try_at"] >= row["created_at"] + 1 + 2
    d.start()
    third = receiver.next()
    assert third.headers["X-Jobd-Try"] == "3" and third.json()["id"] == job
    d.stop()
    (row,) = _rows(d)
    assert (row["state"], row["tries"], row["next_try_at"]) == ("delivered", 3, None)
    assert row["delivered_at"] >= row["created_at"] + 3


def test_a_retry_does_not_wait_longer_than_its_back_off_when_the_clock_went_back_while_jobd_was_down(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    """The clock set back (an NTP step after a boot with the clock ahead, a wrong clock corrected) while jobd was
    stopped: a pending delivery's next try was due at its `next_try_at`, as far ahead of the new clock as the clock
    went back, and it waited that long (a day here) on top of its back-off. Its wait is now at most the back-off."""
    receiver.plan["/down"] = [503, 502]
    d = make_daemon("[queue.default]\n")
    job = d.submit(command=["/bin/true"], callbacks={"on_success": [{"http": {"url": receiver.url("/down")}}]})["id"]
    assert [receiver.next().headers["X-Jobd-Try"] for _ in range(2)] == ["1", "2"]
    d.stop()  # the third try, 2 s after the second, stays pending in the table
    day = 86400
    assert _sql(d, f'UPDATE "callback" SET created_at = created_at + {day}, next_try_at = next_try_at + {day}') == 1
    d.start()
    third = receiver.next()
    assert third.headers["X-Jobd-Try"] == "3" and third.json()["id"] == job


def test_callbacks_lost_between_two_commits_are_queued_at_the_next_start(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    d = make_daemon("[queue.default]\nconcurrency = 3\n")
    never = [{"http": {"url": receiver.url("/never")}}]
    ok = d.submit(
        command=["/bin/true"], callbacks={"on_success": [{"http": {"url": receiver.url("/ok")}}], "on_failure": never}
    )["id"]
    bad = d.submit(
        command=["/bin/false"], callbacks={"on_finish": [{"http": {"url": receiver.url("/bad")}}], "on_success": never}
    )["id"]
    unmatched = d.submit(command=["/bin/false"], callbacks={"on_success": never})["id"]
    for job in (ok, bad, unmatched):
        d.wait(job)
    assert sorted(receiver.next().path for _ in range(2)) == ["/bad", "/ok"]
    assert d.stop() == 0
    # What a crash right after each job's final commit leaves: the job finished, its callback rows never made (the
    # transaction that makes them also sets callbacks_queued).
    assert _sql(d, 'DELETE FROM "callback"') == 2
    assert _sql(d, 'UPDATE "job" SET "callbacks_queued" = 0 WHERE "callbacks_queued" = 1') == 2
    d.start()
    got = sorted([receiver.next(), receiver.next()], key=lambda r: r.path)
    assert [(r.path, r.json()["id"], r.json()["state"]) for r in got] == [
        ("/bad", bad, "failed"),
        ("/ok", ok, "succeeded"),
    ]
    assert "callbacks were never queued" in d.log()
    d.stop()
    rows = [(row["job_id"], row["event"], row["state"], row["tries"]) for row in _rows(d)]
    assert rows == [(ok, "on_success", "delivered", 1), (bad, "on_finish", "delivered", 1)]
    d.start()  # once only: the rows are there now
    d.stop()
    assert receiver.requests.empty()
    assert len(_rows(d)) == 2


def test_a_job_lost_in_a_crash_fires_its_callbacks_once(
    make_daemon: Callable[..., Daemon], receiver: Receiver, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    os.mkfifo(started)
    d = make_daemon("[queue.default]\n")
    job = d.submit(
        command=["/bin/sh", "-c", f"echo > {started}; exec sleep 600"],
        callbacks={"on_failure": [{"http": {"url": receiver.url("/lost")}}]},
    )["id"]
    with open(started) as fifo:  # the job is running once it has written
        fifo.read()
    # One request answered after that is one answered after the turn of jobd's loop that started the job, which also
    # committed its pid: killed before, the new jobd would not know what to kill, and its `sleep 600` outlived the
    # test (found orphaned after a clean-clone run).
    d.call("ping")
    d.kill9()
    d.start()  # recovery fails the lost attempt's job: its callback is queued and armed, then start() re-arms
    got = receiver.next()
    assert got.json()["id"] == job and got.json()["state"] == "failed"
    d.stop()
    assert receiver.requests.empty(), receiver.requests.get()  # not a second delivery of the same row
    assert [(row["job_id"], row["state"], row["tries"]) for row in _rows(d)] == [(job, "delivered", 1)]
    assert "killed process group" in d.log()  # the new jobd ended the lost attempt's `sleep 600`


def test_a_version_10_database_gets_the_crash_window_index(tmp_path: Path) -> None:
    from jobd.store import MIGRATIONS, Store, _db

    path = tmp_path / "jobd.sqlite3"
    store = Store(str(path))
    _db.initialize(store.db)
    store.db.connect()
    with store.db.atomic():
        for migration in MIGRATIONS[:10]:
            migration(store.db)
        store.db.pragma("user_version", 10)
    store.db.close()
    retry = '{"times": 0, "delay": 1.0, "backoff": 2.0, "on_exit_codes": []}'
    hooks = json.dumps({"on_finish": [{"http": {"url": "http://127.0.0.1:9/", "method": "POST"}}]})
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        for state in ("succeeded", "failed", "running"):  # 1 has its row; 2 lost it; 3 has not finished
            raw.execute(
                "INSERT INTO job (command, queue, priority, state, created_at, run_at, env, kill_grace, retry, "
                "max_output, attempts, progress, callbacks) "
                "VALUES ('[]', 'q', 1, ?, 1.0, 1.0, '{}', 10, ?, 1, 1, 0, ?)",
                (state, retry, hooks),
            )
        raw.execute(
            "INSERT INTO callback (job_id, event, target, state, tries, spec, created_at) "
            "VALUES (1, 'on_finish', 'POST http://127.0.0.1:9/', 'delivered', 1, '{}', 2.0)"
        )
    store = Store(str(path))
    store.open()
    try:
        # Read through the partial index (INDEXED BY: a missing or unusable index is an error, not a scan).
        assert [job.id for job in store.unqueued_callback_jobs()] == [2]
    finally:
        store.close()
