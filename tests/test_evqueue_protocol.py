"""evQueue's XML protocol as a client sees it, on a real daemon's sockets: the greeting socket and the API socket.

Answers are cut into documents with the codec's own framer (a document ends when its root closes, as evQueue's
clients read them); every read blocks on the socket with a deadline, so a missing answer fails the test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import pytest
from lxml import etree

from jobd.api_evqueue import EvQueue
from jobd.client import RemoteError
from jobd.protocol.evqueue import XmlFramer

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0
CORPUS = Path(__file__).resolve().parent / "workflows"
KEEPALIVE_INTERVAL = 0.2  # the daemon's JOBD_EVQUEUE_KEEPALIVE_INTERVAL in the tests that wait

SLOW_WORKFLOW = b"""<workflow>
  <parameters><parameter name="seconds"/></parameters>
  <subjobs>
    <job name="nap">
      <tasks>
        <task path="/bin/sleep" queue="default">
          <input name="seconds"><value select="evqGetWorkflowParameter('seconds')"/></input>
        </task>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""

# Its middle task succeeds once the file named by `flag` exists; `checks` counts the runs of that task.
FLAGGED_WORKFLOW = b"""<workflow>
  <parameters><parameter name="flag"/></parameters>
  <custom-attributes><custom-attribute name="checks" select="count(//task[@name='check']/output)"/></custom-attributes>
  <subjobs>
    <job name="one">
      <tasks><task name="first" path="/bin/echo first" queue="default"/></tasks>
      <subjobs>
        <job name="two">
          <tasks><task name="check" path="/usr/bin/test -e" queue="default">
            <input name="flag"><value select="evqGetWorkflowParameter('flag')"/></input>
          </task></tasks>
          <subjobs>
            <job name="three"><tasks><task name="last" path="/bin/echo last" queue="default"/></tasks></job>
          </subjobs>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


class Closed(Exception):
    """The daemon closed the connection."""


class EvqClient:
    """A raw evQueue connection: bytes out as given, answers in as whole documents."""

    def __init__(self, path: Any, *, greeted: bool = True) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        self._take(sock)
        self.greeting = self.document() if greeted else None

    def _take(self, sock: socket.socket) -> None:
        self.sock = sock
        self.framer = XmlFramer()
        self.documents: list[bytes] = []
        self.received = bytearray()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(DEADLINE)
        self.sock.sendall(data)

    def document(self, timeout: float = DEADLINE) -> etree._Element:
        deadline = time.monotonic() + timeout
        while not self.documents:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete answer; got so far: {bytes(self.received[-300:])!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"jobd closed the connection; received: {bytes(self.received[-300:])!r}")
            self.received += chunk
            assert b"Traceback" not in self.received
            self.documents += self.framer.feed(chunk)
        return etree.fromstring(self.documents.pop(0))

    def answer(self, timeout: float = DEADLINE) -> tuple[etree._Element, int]:
        """The next response, skipping `<ping />` keep-alives; and how many were skipped."""
        pings = 0
        while (root := self.document(timeout)).tag == "ping":
            pings += 1
        return root, pings

    def ask(self, request: bytes) -> etree._Element:
        self.send(request)
        root, _ = self.answer()
        return root

    def closed_after(self, timeout: float = DEADLINE) -> list[etree._Element]:
        """Every answer until the daemon closes the connection (fails if it does not)."""
        answers = []
        while True:
            try:
                answers.append(self.document(timeout))
            except Closed:
                return answers


def ok(root: etree._Element) -> etree._Element:
    assert root.tag == "response" and root.get("status") == "OK", etree.tostring(root)
    return root


def ko(root: etree._Element, code: str) -> etree._Element:
    assert root.tag == "response" and root.get("status") == "KO", etree.tostring(root)
    assert root.get("error-code") == code, etree.tostring(root)
    assert root.get("error"), etree.tostring(root)
    return root


def assert_alive(daemon: Any) -> None:
    assert daemon.running(), daemon.log()
    with EvqClient(daemon.evqueue_socket) as client:
        ok(client.ask(b"<ping/>"))


@pytest.fixture
def corpus_daemon(make_daemon: Any) -> Any:
    """A daemon running the workflow corpus of tests/workflows plus `slow`, with short keep-alive intervals."""
    daemon = make_daemon(
        (CORPUS / "corpus.toml").read_text(), start=False, daemon_extra=f'tasks_directory = "{CORPUS / "tasks"}"'
    )
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    for path in CORPUS.glob("*.xml"):
        shutil.copy(path, workflows / path.name)
    (workflows / "slow.xml").write_bytes(SLOW_WORKFLOW)
    (workflows / "flagged.xml").write_bytes(FLAGGED_WORKFLOW)
    daemon.env["JOBD_EVQUEUE_KEEPALIVE_INTERVAL"] = str(KEEPALIVE_INTERVAL)
    daemon.start()
    return daemon


# -- the conversation ----------------------------------------------------------------------------------------------


def test_the_evqueue_socket_greets_at_once_and_is_0660(daemon: Any) -> None:
    assert os.stat(daemon.evqueue_socket).st_mode & 0o777 == 0o660
    with EvqClient(daemon.evqueue_socket) as client:
        ready = client.greeting
        assert ready is not None and ready.tag == "ready", client.received
        assert ready.get("status") == "OK" and ready.get("profile") == "ADMIN"  # the suite runs as root
        assert ready.get("version") and ready.get("node") and ready.get("time")
        assert ready.find("modules") is not None
        pong = ok(client.ask(b'<?xml version="1.0" encoding="utf-8"?>\n<ping />\n'))
        assert pong.get("version") == ready.get("version")
        assert int(pong.get("uptime", "-1")) >= 0


def test_the_api_socket_speaks_xml_when_the_first_byte_is_lt(daemon: Any) -> None:
    with EvqClient(daemon.socket_path, greeted=False) as client:
        ok(client.ask(b"<ping/>"))
        queues = ok(client.ask(b'<queuepool action="list"/>'))
        assert [queue.get("name") for queue in queues] == ["default", "serial"]
    assert daemon.call("ping")["pong"] is True  # JSON still served beside it


def test_pipelined_requests_in_one_write_are_answered_in_order(daemon: Any) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        client.send(
            b"<ping/><queuepool action='list'/>\n<foo action='x'/>"
            b"<statistics action='query' type='queue'/><status action='query' type='scheduler'/>"
            b"<!-- a comment --><workflow_schedules action='list'/><ping/>"
        )
        answers = [client.answer()[0] for _ in range(7)]
    ok(answers[0])
    assert answers[0].get("version")
    assert [queue.get("name") for queue in ok(answers[1])] == ["default", "serial"]
    ko(answers[2], "UNKNOWN_COMMAND")
    assert ok(answers[3])[0].tag == "statistics"
    assert etree.tostring(ok(answers[4])[0]) == b"<status/>"
    assert len(ok(answers[5])) == 0
    assert ok(answers[6]).get("version")


def test_a_request_split_byte_by_byte_is_answered(daemon: Any) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        for byte in b'<statistics action="query" type="queue"/>':
            client.send(bytes([byte]))
        assert ok(client.answer()[0])[0].tag == "statistics"


def test_queuepool_and_queue_statistics(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sleep", "30"], queue="serial")
    daemon.submit(command=["/bin/true"], queue="serial")
    with EvqClient(daemon.evqueue_socket) as client:
        pool = ok(client.ask(b'<queuepool action="list"/>'))
        assert [dict(queue.attrib) for queue in pool] == [
            {"concurrency": "2", "dynamic": "no", "id": "1", "name": "default", "scheduler": "prio"},
            {"concurrency": "1", "dynamic": "no", "id": "2", "name": "serial", "scheduler": "prio"},
        ]
        statistics = ok(client.ask(b'<statistics action="query" type="queue"/>'))[0]
        queues = {queue.get("name"): dict(queue.attrib) for queue in statistics}
        assert queues["serial"] == {
            "name": "serial",
            "concurrency": "1",
            "size": "1",
            "running_tasks": "1",
            "scheduler": "prio",
        }
        assert queues["default"]["running_tasks"] == "0"
        totals = ok(client.ask(b'<statistics action="query" type="global"/>'))[0]
        assert int(totals.get("api_queries", "0")) >= 3 and totals.get("current_api_connections") == "1"
    daemon.call("job.cancel", {"id": job["id"]})


def test_unknown_commands_and_bad_attributes_leave_the_connection_open(daemon: Any) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        ko(client.ask(b'<foo action="x"/>'), "UNKNOWN_COMMAND")
        ko(client.ask(b'<queue action="create" name="q"/>'), "UNKNOWN_COMMAND")
        ko(client.ask(b'<instance action="query"/>'), "MISSING_PARAMETER")
        ko(client.ask(b'<instance action="query" id="12abc"/>'), "INVALID_INTEGER")
        ko(client.ask(b'<status action="query" type="nope"/>'), "UNKNOWN_TYPE")
        ko(client.ask(b'<control action="reload" module="bogus"/>'), "INVALID_MODULE")
        ko(client.ask(b'<ping xpathfilter="count(/"/>'), "INVALID_PARAMETER")
        ko(client.ask(b"<ping></pong>"), "INVALID_XML")  # ill-formed, but its end was found
        ko(client.ask(b"<ping>&xxe;</ping>"), "INVALID_XML")
        assert ok(client.ask(b"<ping/>")).get("version")


def test_xpathfilter_selects_part_of_the_answer(daemon: Any) -> None:
    # evQueue puts what the filter selects into a new <response status="OK">, which its clients check as any answer
    # (the PHP class reads status from the root, its C++ client refuses a root other than <response>). jobd sent the
    # selected element alone: both clients took every filtered answer for an error.
    with EvqClient(daemon.evqueue_socket) as client:
        filtered = ok(client.ask(b'<queuepool action="list" xpathfilter="/response/queue[@name=\'serial\']"/>'))
        assert filtered.get("node") and [queue.get("name") for queue in filtered] == ["serial"]
        assert filtered[0].get("concurrency") == "1" and filtered.get("rows") is None
        counted = ok(client.ask(b'<queuepool action="list" xpathfilter="count(/response/queue)"/>'))
        assert (counted.text, len(counted)) == ("2", 0)
        attribute = ok(client.ask(b'<queuepool action="list" xpathfilter="/response/queue[1]/@name"/>'))
        assert (attribute.text, len(attribute)) == ("default", 0)
        nothing = ok(client.ask(b'<queuepool action="list" xpathfilter="/response/queue[@name=\'nosuch\']"/>'))
        assert (nothing.text, len(nothing)) == (None, 0)
        # `/`, the root: the whole answer (it was empty, lxml leaving the document node out), as `/*` gives it.
        whole = ok(client.ask(b'<queuepool action="list" xpathfilter="/"/>'))
        assert [child.tag for child in whole] == ["response"] and whole[0].get("status") == "OK"
        assert [queue.get("name") for queue in whole[0]] == ["default", "serial"]
        # A namespace node is its URI (lxml hands it over as a tuple, which was written as Python shows one).
        namespace = ok(client.ask(b'<ping xpathfilter="/response/namespace::*"/>'))
        assert namespace.text == "http://www.w3.org/XML/1998/namespace"
        ko(client.ask(b'<instance action="query" id="999" xpathfilter="/response/workflow"/>'), "UNKNOWN_INSTANCE")
        # Any client may send one: an expression that would run for ages is refused, and jobd goes on.
        endless = ("/*" + "[count(//*|//@*" * 12 + ")]" * 12).encode()
        refused = ko(client.ask(b'<ping xpathfilter="%s"/>' % endless), "INVALID_PARAMETER")
        assert "took longer than 0.5 s to evaluate" in refused.get("error", "")
        # A call of the function jobd adds to each step: refused as the client's mistake, in words about XPath.
        private = ko(client.ask(b'<ping xpathfilter="jobd:tick(1)"/>'), "INVALID_PARAMETER")
        assert "jobd:tick() is jobd's own function, which takes no arguments" in private.get("error", "")
        ok(client.ask(b"<ping/>"))


def test_a_fault_in_jobds_own_xpathfilter_code_is_logged_and_answered_as_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The filter runs in a forked child (jobd/forked.py), whose every exception came back as INVALID_PARAMETER with
    its message: a bug of jobd's was the client's mistake, and nobody saw its traceback. No request makes jobd's
    filtering fail today, so this gives the evaluation, in a real child, what no handler answers: something that is
    not an element (lxml's TypeError), as a handler's bug would."""
    evqueue = EvQueue(None, "here")  # type: ignore[arg-type]  # filtering reads nothing of the API
    with caplog.at_level(logging.ERROR, logger="jobd.evqueue"):
        answer = asyncio.run(evqueue._filtered_later(None, "/response"))  # type: ignore[arg-type]
    root = ko(etree.fromstring(answer), "UNEXPECTED_EXCEPTION")  # as every internal error on this socket
    assert root.get("error") == "internal error: TypeError: Invalid input object: NoneType"
    [record] = caplog.records
    assert record.getMessage().startswith("internal error filtering an evQueue answer by xpathfilter '/response'\n")
    assert "Traceback (most recent call last):" in record.getMessage()
    assert "in apply_xpathfilter\n" in record.getMessage()


@pytest.mark.parametrize(
    "attack",
    [
        b"hello",
        b"</ping>",
        b'<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><ping>&b;</ping>',
        b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><ping>&x;</ping>',
        b'<ping><!DOCTYPE r SYSTEM "http://example.invalid/x.dtd"></ping>',
        b"<a>" * 100,
    ],
)
def test_framing_errors_and_dtds_are_answered_then_the_connection_closes(daemon: Any, attack: bytes) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        client.send(b"<ping/>" + attack)
        answers = client.closed_after()
    assert len(answers) == 2, answers
    ok(answers[0])
    ko(answers[1], "INVALID_XML")
    assert b"root:" not in b"".join(etree.tostring(answer) for answer in answers)
    assert_alive(daemon)


def test_an_oversized_request_is_refused_and_the_connection_closed(daemon: Any) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        client.send(b'<ping comment="' + b"x" * (1024 * 1024 + 10))
        answers = client.closed_after()
    assert len(answers) == 1
    ko(answers[0], "FRAME_TOO_LARGE")
    assert_alive(daemon)


def test_quit_closes_without_an_answer(daemon: Any) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        client.send(b"<ping/><quit/><ping/>")
        answers = client.closed_after()
    assert len(answers) == 1 and ok(answers[0]).get("version")


def test_a_request_cut_by_the_end_of_input_is_refused_after_the_others(daemon: Any) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        client.send(b'<ping/><queuepool action="li')
        client.sock.shutdown(socket.SHUT_WR)
        answers = client.closed_after()
    assert len(answers) == 2
    ok(answers[0])
    ko(answers[1], "INVALID_XML")


def test_status_configuration_and_control_reload(daemon: Any) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        configuration = ok(client.ask(b'<status action="query" type="configuration"/>'))[0]
        entries = {entry.get("name"): entry.get("value") for entry in configuration}
        assert entries["daemon.socket"] == str(daemon.socket_path)
        assert entries["daemon.evqueue_socket"] == str(daemon.evqueue_socket)
        assert entries["queue.serial.concurrency"] == "1"
        assert not any(name.startswith("task.") for name in entries)
        daemon.write_config("[queue.default]\nconcurrency = 3\n")
        ok(client.ask(b'<control action="reload"/>'))
        pool = ok(client.ask(b'<queuepool action="list"/>'))
        assert [(queue.get("name"), queue.get("concurrency")) for queue in pool] == [("default", "3")]
        daemon.write_config("[queue.default]\nconcurrency = 0\n")
        failed = ko(client.ask(b'<control action="reload"/>'), "CONFIG_INVALID")
        assert "concurrency" in (failed.get("error") or "")
        assert ok(client.ask(b'<statistics action="query" type="queue"/>'))[0][0].get("concurrency") == "3"


CLIENT_AS_NOBODY = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(b'<control action="reload"/><queuepool action="list"/><quit/>')
data = b""
while chunk := sock.recv(65536):
    data += chunk
sys.stdout.buffer.write(data)
"""


def test_non_admins_get_the_user_profile_and_no_admin_commands(daemon: Any) -> None:
    # nobody can reach neither pytest's private tmp directory nor this venv's Python: a hard link to the socket in
    # a directory it may enter, and the system's Python.
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the unprivileged client")
    shared = Path(tempfile.mkdtemp(prefix="jobd-evq-"))
    shared.chmod(0o755)
    link = shared / "evqueue.sock"
    os.link(daemon.evqueue_socket, link)
    link.chmod(0o666)
    try:
        done = subprocess.run(
            [python, "-c", CLIENT_AS_NOBODY, str(link)],
            user=65534,
            group=65534,
            capture_output=True,
            timeout=DEADLINE,
            check=True,
            cwd="/",
        )
    finally:
        shutil.rmtree(shared)
    documents = [etree.fromstring(document) for document in XmlFramer().feed(done.stdout)]
    assert [document.tag for document in documents] == ["ready", "response", "response"], done.stdout
    assert documents[0].get("profile") == "USER"
    ko(documents[1], "INSUFFICIENT_RIGHTS")
    ok(documents[2])


def test_the_evqueue_listener_can_be_turned_off(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    text = (daemon.config_dir / "jobd.toml").read_text().replace(f'"{daemon.evqueue_socket}"', "false")
    (daemon.config_dir / "jobd.toml").write_text(text)
    daemon.start()
    assert not daemon.evqueue_socket.exists()
    with EvqClient(daemon.socket_path, greeted=False) as client:
        ok(client.ask(b"<ping/>"))


# -- workflow instances --------------------------------------------------------------------------------------------


def test_workflows_list_and_get(corpus_daemon: Any) -> None:
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        listed = ok(client.ask(b'<workflows action="list"/>'))
        names = [workflow.get("name") for workflow in listed]
        assert names == sorted(names) and "trivial" in names and "slow" in names
        ids = {workflow.get("name"): workflow.get("id") for workflow in listed}
        full = ok(client.ask(b'<workflows action="list" full="yes"/>'))
        assert all(workflow.find("subjobs") is not None for workflow in full)
        by_name = ok(client.ask(b'<workflow action="get" name="trivial"/>'))[0]
        assert by_name.get("id") == ids["trivial"] and by_name[0].tag == "workflow"
        assert by_name[0].find("subjobs/job").get("name") == "hello"
        by_id = ok(client.ask(b'<workflow action="get" id="%s"/>' % ids["trivial"].encode()))[0]
        assert etree.tostring(by_id) == etree.tostring(by_name)
        ko(client.ask(b'<workflow action="get" name="nosuch"/>'), "UNKNOWN_WORKFLOW")


def test_launch_query_and_list(corpus_daemon: Any) -> None:
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        ko(client.ask(b'<instance action="launch" name="nosuch"/>'), "UNKNOWN_WORKFLOW")
        ko(client.ask(b'<instance action="launch" name="slow"/>'), "INVALID_WORKFLOW_PARAMETERS")
        launched = ok(
            client.ask(b'<instance action="launch" name="trivial" mode="synchronous" timeout="20" comment="one"/>')
        )
        instance_id = launched.get("workflow-instance-id")
        assert instance_id and launched.get("wait") is None
        document = ok(client.ask(b'<instance action="query" id="%s"/>' % instance_id.encode()))[0]
        assert document.tag == "workflow" and document.get("status") == "TERMINATED"
        assert document.get("comment") == "one" and document.get("errors") == "0"
        assert document.find(".//task/output").text == "hello world\n"
        listed = ok(client.ask(b'<instances action="list" filter_workflow="trivial"/>'))
        assert listed.get("rows") == "1"
        row = listed[0]
        assert (row.get("id"), row.get("name"), row.get("status")) == (instance_id, "trivial", "TERMINATED")
        assert row.get("end_time") and row.find("tags") is not None
        grouped = ok(client.ask(b'<instances action="list" groupby="day"/>'))
        assert [(group.get("name"), group.get("count")) for group in grouped] == [("trivial", "1")]
        assert grouped[0].get("year") and grouped[0].get("day") and grouped[0].get("hour") is None
        ko(client.ask(b'<instance action="query" id="9999"/>'), "UNKNOWN_INSTANCE")
        ok(client.ask(b'<instance action="delete" id="%s"/>' % instance_id.encode()))
        ko(client.ask(b'<instance action="query" id="%s"/>' % instance_id.encode()), "UNKNOWN_INSTANCE")


def test_a_listed_instance_no_schedule_launched_has_evqueues_attributes_and_no_schedule_id(corpus_daemon: Any) -> None:
    # evQueue writes schedule_id only when the instance's workflow_schedule_id is not NULL, i.e. for an instance a
    # schedule launched (reference/evqueue.md §1.7: the row of an API launch has none). jobd wrote schedule_id=""
    # on every row, so a client testing for the attribute took every instance for a scheduled one.
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        ok(client.ask(b'<instance action="launch" name="trivial" mode="synchronous" timeout="20"/>'))
        row = ok(client.ask(b'<instances action="list"/>'))[0]
    assert sorted(row.attrib) == [
        "comment",
        "end_time",
        "errors",
        "host",
        "id",
        "name",
        "node_name",
        "start_time",
        "status",
    ], etree.tostring(row)


def test_a_comment_xml_cannot_hold_is_kept_as_control_pictures_and_listed(corpus_daemon: Any) -> None:
    """jobd's JSON-RPC takes any string; the instance's document and evQueue's lists are XML. A control character in
    a launch's comment or host was an INTERNAL_ERROR (lxml refused the attribute)."""
    launched = corpus_daemon.call(
        "instance.launch", {"workflow": "trivial", "comment": "a\u0001b\ufffe", "host": "h\u001b"}
    )
    corpus_daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    shown = "a\u2401b\ufffd"
    assert corpus_daemon.call("instance.get", {"id": launched["id"]})["comment"] == shown
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        document = ok(client.ask(b'<instance action="query" id="%d"/>' % launched["id"]))[0]
        assert (document.get("comment"), document.get("host")) == (shown, "h\u241b")
        row = ok(client.ask(b'<instances action="list" filter_workflow="trivial"/>'))[0]
        assert row.get("comment") == shown


def test_instances_listed_from_or_until_year_1(corpus_daemon: Any) -> None:
    """The first day of year 1, read as local time, falls before what the platform can place: it was an
    UNEXPECTED_EXCEPTION (year 0 is out of range). It lies before every instance."""
    launched = corpus_daemon.call("instance.launch", {"workflow": "trivial"})
    corpus_daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        for request, rows in (
            (b'<instances action="list" filter_launched_from="0001-01-01 00:00:00"/>', "1"),
            (b'<instances action="list" filter_launched_until="0001-01-01 00:00:00"/>', "0"),
            (b'<instances action="list" filter_ended_from="0001-01-01"/>', "1"),
            (b'<instances action="list" filter_launched_from="9999-12-31 23:59:59"/>', "0"),
        ):
            assert ok(client.ask(request)).get("rows") == rows, request


def test_a_synchronous_launch_sends_keepalives_and_holds_later_requests(corpus_daemon: Any) -> None:
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        # The ping behind the launch is answered only after it: evQueue clients match answers by order.
        client.send(
            b'<instance action="launch" name="slow" mode="synchronous">'
            b'<parameter name="seconds" value="1"/></instance><ping/>'
        )
        launched, pings = client.answer()
        assert pings >= 2, client.received
        assert ok(launched).get("workflow-instance-id") and launched.get("wait") is None
        pong, pings_after = client.answer()
        assert ok(pong).get("version") and pings_after == 0


@pytest.mark.parametrize(
    ("socket_name", "request_template"),
    [
        ("evqueue_socket", b'<instance action="wait" id="%s"/><ping/>'),
        ("evqueue_socket", b'<instance action="launch" name="slow" mode="synchronous">%s</instance>'),
        ("socket_path", b'<instance action="wait" id="%s"/>'),
    ],
    ids=["instance wait", "synchronous launch", "instance wait on the API socket"],
)
def test_a_client_that_closes_while_it_waits_frees_its_connection(
    make_daemon: Any, socket_name: str, request_template: bytes
) -> None:
    # Before, the connection (its descriptor, its slot of max_connections, its waiting task) stayed until the next
    # keep-alive failed to be written, 10 s later: with the default max_connections of 256, 26 interrupted waits a
    # second (PHP requests cut short by their own time limit) kept every other client out, admins included.
    daemon = make_daemon(start=False, daemon_extra="max_connections = 2")
    daemon.write_workflows(slow=SLOW_WORKFLOW)
    daemon.start()
    seconds = b'<parameter name="seconds" value="600"/>'
    with EvqClient(daemon.evqueue_socket) as kept:  # one slot, used throughout
        launched = ok(kept.ask(b'<instance action="launch" name="slow">%s</instance>' % seconds))
        instance_id = launched.get("workflow-instance-id", "").encode()
        argument = seconds if b"launch" in request_template else instance_id
        path = getattr(daemon, socket_name)
        with EvqClient(path, greeted=socket_name == "evqueue_socket") as gone:  # the other slot
            if gone.greeting is None:  # the API socket: jobd reads this connection once it has answered on it
                ok(gone.ask(b"<ping/>"))
            gone.send(request_template % argument)
            # Sent before the round trip on the other connection, so read by jobd before it is answered: the request
            # waits (and holds back the <ping/> behind it) when the client goes.
            ok(kept.ask(b"<ping/>"))
        # The hang-up is there before this round trip starts: jobd has seen it, and dropped the connection, by the
        # time it reads the next request on the other one.
        ok(kept.ask(b"<ping/>"))
        statistics = ok(kept.ask(b'<statistics action="query" type="global"/>'))[0]
        assert statistics.get("current_api_connections") == "1", etree.tostring(statistics)
        with EvqClient(daemon.evqueue_socket) as fresh:  # the slot is free again at once, not at the next keep-alive
            ok(fresh.ask(b"<ping/>"))
        ok(kept.ask(b'<instance action="cancel" id="%s"/>' % instance_id))


NAP_WORKFLOW = b"""<workflow><subjobs><job name="nap"><tasks>
  <task name="nap" path="/bin/sleep 1" queue="default"/>
</tasks></job></subjobs></workflow>
"""


@pytest.mark.parametrize("socket_name", ["evqueue_socket", "socket_path"])
def test_a_client_that_only_shuts_down_its_sending_side_reads_its_answer_alone(
    make_daemon: Any, socket_name: str
) -> None:
    # `echo '<instance action="launch" ... mode="synchronous"/>' | nc -NU SOCKET` reads what jobd answers until the
    # end. The keep-alive written at the end of file for TCP's sake (a closed TCP peer answers it with a reset) went to
    # unix sockets too, where the kernel tells a full close by itself: a `<ping />` came before every such answer.
    daemon = make_daemon(start=False)
    daemon.write_workflows(nap=NAP_WORKFLOW)
    daemon.env["JOBD_EVQUEUE_KEEPALIVE_INTERVAL"] = "3600"
    daemon.start()
    with EvqClient(getattr(daemon, socket_name), greeted=socket_name == "evqueue_socket") as client:
        client.send(b'<instance action="launch" name="nap" mode="synchronous"/>')
        client.sock.shutdown(socket.SHUT_WR)
        root, pings = client.answer()
        assert root.get("status") == "OK" and pings == 0, client.received
        with pytest.raises(Closed):
            client.document()


def test_a_synchronous_launch_that_times_out_says_so(corpus_daemon: Any) -> None:
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        launched = ok(
            client.ask(
                b'<instance action="launch" name="slow" mode="synchronous" timeout="1">'
                b'<parameter name="seconds" value="30"/></instance>'
            )
        )
        assert launched.get("wait") == "timedout"
        instance_id = launched.get("workflow-instance-id", "").encode()
        running = ok(client.ask(b'<status action="query" type="workflows"/>'))
        assert running.get("count") == "1" and running[0].get("status") == "EXECUTING"
        assert running[0].get("running_tasks") == "1"
        ko(client.ask(b'<instance action="wait" id="%s" timeout="1"/>' % instance_id), "TIMED_OUT")
        ko(client.ask(b'<instance action="delete" id="%s"/>' % instance_id), "UNKNOWN_INSTANCE")
        assert ok(client.ask(b'<instance action="query" id="%s"/>' % instance_id))[0].get("status") == "EXECUTING"
        ok(client.ask(b'<instance action="cancel" id="%s"/>' % instance_id))
        ko(client.ask(b'<instance action="killtask" id="%s" pid="1"/>' % instance_id), "INVALID_PARAMETER")
        ko(client.ask(b'<instance action="cancel" id="9999"/>'), "UNKNOWN_INSTANCE")


def test_a_cancel_or_killtask_of_an_ended_instance_is_unknown_instance_as_in_evqueue(corpus_daemon: Any) -> None:
    # evQueue looks the instance of a cancel or a killtask up among its running instances only: one that has ended
    # is UNKNOWN_INSTANCE ("Unknown workflow instance"). jobd answered INVALID_PARAMETER, which a client that tells
    # "already over" from a real failure by the code took for a failure. (A delete of a running instance, the
    # other way round: test_a_synchronous_launch_that_times_out_says_so.)
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        launched = ok(client.ask(b'<instance action="launch" name="trivial" mode="synchronous" timeout="20"/>'))
        instance_id = launched.get("workflow-instance-id", "").encode()
        for request in (b'<instance action="cancel" id="%s"/>', b'<instance action="killtask" id="%s" pid="1"/>'):
            refused = ko(client.ask(request % instance_id), "UNKNOWN_INSTANCE")
            assert "has already ended (TERMINATED)" in refused.get("error", ""), etree.tostring(refused)
        ok(client.ask(b"<ping/>"))
    # JSON-RPC's answer is its own, and stays INVALID_PARAMS.
    with pytest.raises(RemoteError) as refused_over_json:
        corpus_daemon.call("instance.cancel", {"id": int(instance_id)})
    assert refused_over_json.value.code == "INVALID_PARAMS"


def test_waits_still_pending_at_a_stop_are_answered_and_a_synchronous_launch_with_its_instance(
    corpus_daemon: Any,
) -> None:
    """An evQueue client waiting on an instance when jobd stops gets an error answer with jobd's code SHUTTING_DOWN,
    then the end of the connection; the instance is kept. A synchronous launch is answered as one that timed out:
    OK, with its instance's id and wait="timedout". It was answered SHUTTING_DOWN without the id, though the
    instance was committed and resumed at the next start: a client that launched again made a second one (found
    by a soak test)."""
    seconds = b'<parameter name="seconds" value="600"/>'
    with (
        EvqClient(corpus_daemon.evqueue_socket) as waiting,
        EvqClient(corpus_daemon.evqueue_socket) as launching,
    ):
        launched = ok(waiting.ask(b'<instance action="launch" name="slow">%s</instance>' % seconds))
        instance_id = launched.get("workflow-instance-id", "")
        waiting.send(b'<instance action="wait" id="%s"/>' % instance_id.encode())
        launching.send(b'<instance action="launch" name="slow" mode="synchronous">%s</instance>' % seconds)
        for client in (waiting, launching):
            assert client.document().tag == "ping"  # a keep-alive: jobd is waiting on that request
        assert corpus_daemon.stop() == 0
        answers = {}
        for name, client in (("waiting", waiting), ("launching", launching)):
            answers[name] = [root for root in client.closed_after() if root.tag != "ping"]
            assert len(answers[name]) == 1, [etree.tostring(root) for root in answers[name]]
        ko(answers["waiting"][0], "SHUTTING_DOWN")
        synchronous = ok(answers["launching"][0])
        assert synchronous.get("wait") == "timedout", etree.tostring(synchronous)
        second_id = synchronous.get("workflow-instance-id", "")
        assert second_id and second_id != instance_id, etree.tostring(synchronous)
    corpus_daemon.start()
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        for kept_id in (instance_id, second_id):
            kept = ok(client.ask(b'<instance action="query" id="%s"/>' % kept_id.encode()))[0]
            assert (kept.get("status"), kept.get("name")) == ("EXECUTING", "slow"), etree.tostring(kept)
            ok(client.ask(b'<instance action="cancel" id="%s"/>' % kept_id.encode()))
        listed = ok(client.ask(b'<instances action="list"/>'))
        assert sorted(row.get("id") for row in listed) == sorted([instance_id, second_id])


def test_killtask_stops_the_task_of_a_running_instance(corpus_daemon: Any) -> None:
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        launched = ok(
            client.ask(b'<instance action="launch" name="slow"><parameter name="seconds" value="30"/></instance>')
        )
        instance_id = launched.get("workflow-instance-id", "").encode()
        ko(client.ask(b'<instance action="wait" id="%s" timeout="1"/>' % instance_id), "TIMED_OUT")
        document = ok(client.ask(b'<instance action="query" id="%s"/>' % instance_id))[0]
        task = document.find(".//task")
        assert task is not None and task.get("status") == "EXECUTING", etree.tostring(document)
        pid = task.get("pid", "")
        ok(client.ask(b'<instance action="killtask" id="%s" pid="%s"/>' % (instance_id, pid.encode())))
        ok(client.ask(b'<instance action="wait" id="%s" timeout="20"/>' % instance_id))
        ended = ok(client.ask(b'<instance action="query" id="%s"/>' % instance_id))[0]
        assert ended.get("status") == "TERMINATED" and ended.get("errors") == "1"
        errors = ok(client.ask(b'<instances action="list" filter_error="yes"/>'))
        assert [row.get("id") for row in errors] == [instance_id.decode()]


def test_launch_with_parameters_then_wait(corpus_daemon: Any) -> None:
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        launched = ok(
            client.ask(
                b'<instance action="launch" name="parameters" comment="params">'
                b'<parameter name="greeting" value="hi"/><parameter name="who" value="you"/>'
                b'<parameter name="verbose" value="yes"/></instance>'
            )
        )
        instance_id = launched.get("workflow-instance-id", "").encode()
        ok(client.ask(b'<instance action="wait" id="%s" timeout="20"/>' % instance_id))
        document = ok(client.ask(b'<instance action="query" id="%s"/>' % instance_id))[0]
    assert document.get("status") == "TERMINATED" and document.get("errors") == "0"
    outputs = [output.text for output in document.iter("output")]
    assert "hi dear you (verbose)\n" in outputs, outputs


def test_debugresume_runs_the_failed_task_again_and_lists_filter_on_parameters_and_custom_attributes(
    corpus_daemon: Any, tmp_path: Path
) -> None:
    flag = str(tmp_path / "flag").encode()
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        failed = ok(
            client.ask(
                b'<instance action="launch" name="flagged" mode="synchronous" timeout="20">'
                b'<parameter name="flag" value="%s"/></instance>' % flag
            )
        ).get("workflow-instance-id", "")
        assert ok(client.ask(b'<instance action="query" id="%s"/>' % failed.encode()))[0].get("errors") == "1"
        Path(flag.decode()).touch()
        resumed = ok(client.ask(b'<instance action="debugresume" id="%s"/>' % failed.encode()))
        resumed_id = resumed.get("workflow-instance-id", "")
        assert resumed_id and resumed_id != failed
        ok(client.ask(b'<instance action="wait" id="%s" timeout="20"/>' % resumed_id.encode()))
        document = ok(client.ask(b'<instance action="query" id="%s"/>' % resumed_id.encode()))[0]
        assert (document.get("status"), document.get("errors")) == ("TERMINATED", "0"), etree.tostring(document)
        assert [o.get("retval") for o in document.iterfind(".//task[@name='check']/output")] == ["1", "0"]
        assert len(document.findall(".//task[@name='first']/output")) == 1
        assert document.find(".//task[@name='last']").get("retval") == "0"

        def listed(request: bytes) -> list[str]:
            answer = ok(client.ask(request))
            assert answer.get("rows") == str(len(answer)), etree.tostring(answer)
            return [row.get("id", "") for row in answer]

        assert listed(b'<instances action="list" parameter_flag="%s"/>' % flag) == [resumed_id, failed]
        assert listed(b'<instances action="list"><parameter name="flag" value="%s"/></instances>' % flag) == [
            resumed_id,
            failed,
        ]
        assert listed(b'<instances action="list" parameter_flag="/nosuch"/>') == []
        assert listed(b'<instances action="list" customattribute_checks="2"/>') == [resumed_id]
        assert listed(b'<instances action="list" customattribute_checks="1" filter_workflow="flagged"/>') == [failed]
        assert listed(b'<instances action="list" customattribute_checks="1" parameter_flag="/nosuch"/>') == []

        ko(client.ask(b'<instance action="debugresume" id="9999"/>'), "UNKNOWN_INSTANCE")
        running = ok(
            client.ask(b'<instance action="launch" name="slow"><parameter name="seconds" value="30"/></instance>')
        ).get("workflow-instance-id", "")
        refused = ko(client.ask(b'<instance action="debugresume" id="%s"/>' % running.encode()), "INVALID_PARAMETER")
        assert "still executing" in refused.get("error", "")
        # docs/evqueue-protocol.md: delete refuses an executing instance, as evQueue, which looks it up among the
        # TERMINATED ones only and answers UNKNOWN_INSTANCE.
        refused = ko(client.ask(b'<instance action="delete" id="%s"/>' % running.encode()), "UNKNOWN_INSTANCE")
        assert "still executing" in refused.get("error", "")
        ok(client.ask(b'<instance action="cancel" id="%s"/>' % running.encode()))


def test_instances_list_filters_mean_what_they_mean_to_evqueue(corpus_daemon: Any) -> None:
    """Filters as evQueue 3.3 reads them (WorkflowInstances::HandleQuery): filter_error is a switch whose "no" keeps
    every instance, 0 is no filter for the ids, a node or tag filter jobd cannot match keeps nothing (ignoring it
    listed everything), and times are whole seconds, so the times a row shows find it."""
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        node = client.greeting.get("node", "") if client.greeting is not None else ""
        good = ok(client.ask(b'<instance action="launch" name="trivial" mode="synchronous" timeout="20"/>')).get(
            "workflow-instance-id", ""
        )
        bad = ok(
            client.ask(
                b'<instance action="launch" name="flagged" mode="synchronous" timeout="20">'
                b'<parameter name="flag" value="/nosuch"/></instance>'
            )
        ).get("workflow-instance-id", "")

        def listed(attributes: str) -> list[str]:
            answer = ok(client.ask(b'<instances action="list" %s/>' % attributes.encode()))
            assert answer.get("rows") == str(len(answer)), etree.tostring(answer)
            return [row.get("id", "") for row in answer]

        assert listed("") == [bad, good]
        assert listed('filter_error="yes"') == [bad]
        assert listed('filter_status="terminated"') == [bad, good]
        assert listed('filter_error="no"') == [bad, good]
        assert listed('filter_error="0"') == [bad, good]
        assert listed('filter_id="0" filter_schedule_id="0" filter_tag_id="0"') == [bad, good]
        assert listed(f'filter_node="{node}"') == [bad, good]
        assert listed('filter_node="elsewhere"') == []
        assert listed('filter_tag_id="3"') == []
        assert listed('parameter_flag="" customattribute_checks=""') == [bad, good]  # skipped when empty
        row = ok(client.ask(b'<instances action="list" filter_id="%s"/>' % good.encode()))[0]
        start, end = row.get("start_time", ""), row.get("end_time", "")
        assert good in listed(f'filter_launched_from="{start}" filter_launched_until="{start}"')
        assert good in listed(f'filter_ended_from="{end}" filter_ended_until="{end}"')


def test_status_workflows_with_a_limit_of_0_lists_every_running_instance(corpus_daemon: Any) -> None:
    # evQueue's limit 0 is no limit (WorkflowInstances::SendStatus); jobd listed none.
    seconds = b'<parameter name="seconds" value="600"/>'
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        launched = [
            ok(client.ask(b'<instance action="launch" name="slow">%s</instance>' % seconds)).get("workflow-instance-id")
            for _ in range(2)
        ]
        for limit, shown in ((b' limit="0"', launched), (b"", launched), (b' limit="1"', launched[:1])):
            running = ok(client.ask(b'<status action="query" type="workflows"%s/>' % limit))
            assert running.get("count") == "2" and [row.get("id") for row in running] == shown, etree.tostring(running)
        for instance_id in launched:
            ok(client.ask(b'<instance action="cancel" id="%s"/>' % str(instance_id).encode()))


def test_global_statistics_count_launches_failures_and_instances_as_evqueue_does(corpus_daemon: Any) -> None:
    # evQueue (Statistics.cpp): workflow_queries counts the launches asked for, workflow_exceptions those refused,
    # workflow_instance_launched every instance started and workflow_instance_errors every instance that ended with
    # errors, since the engine started. jobd left the first two at 0, counted only the XML launches, and counted the
    # running instances with errors (none, once they had ended).
    launched = corpus_daemon.call("instance.launch", {"workflow": "trivial"})  # not over XML: counted all the same
    corpus_daemon.call("instance.wait", {"id": launched["id"], "timeout": 20}, timeout=25)
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        ok(client.ask(b'<instance action="launch" name="trivial" mode="synchronous" timeout="20"/>'))
        ok(
            client.ask(
                b'<instance action="launch" name="flagged" mode="synchronous" timeout="20">'
                b'<parameter name="flag" value="/nosuch"/></instance>'
            )
        )
        ko(client.ask(b'<instance action="launch" name="nosuch"/>'), "UNKNOWN_WORKFLOW")
        statistics = ok(client.ask(b'<statistics action="query" type="global"/>'))[0]
    counted = {name: statistics.get(name) for name in ("workflow_queries", "workflow_exceptions")}
    assert counted == {"workflow_queries": "3", "workflow_exceptions": "1"}, etree.tostring(statistics)
    assert statistics.get("workflow_instance_launched") == "3", etree.tostring(statistics)
    assert statistics.get("workflow_instance_errors") == "1", etree.tostring(statistics)
    assert statistics.get("workflow_instance_executing") == "0", etree.tostring(statistics)


def test_global_statistics_count_the_instances_of_this_run_without_reading_the_history(corpus_daemon: Any) -> None:
    # evQueue counts its instances as they start and end, in memory. jobd counted the instances on record that had
    # started or ended with errors since it started, reading every instance row since then (no index has a start
    # time or the errors): 12 ms with 20,000 instances, at every query, the event loop waiting. It counts them as
    # they happen now, as evQueue does: an instance deleted since still counts.
    for launch in ({"workflow": "trivial"}, {"workflow": "flagged", "parameters": {"flag": "/nosuch"}}):
        launched = corpus_daemon.call("instance.launch", launch)
        corpus_daemon.call("instance.wait", {"id": launched["id"], "timeout": 20}, timeout=25)
        with EvqClient(corpus_daemon.evqueue_socket) as client:
            ok(client.ask(b'<instance action="delete" id="%d"/>' % launched["id"]))
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        statistics = ok(client.ask(b'<statistics action="query" type="global"/>'))[0]
    assert statistics.get("workflow_instance_launched") == "2", etree.tostring(statistics)
    assert statistics.get("workflow_instance_errors") == "1", etree.tostring(statistics)


def test_instances_list_rows_come_latest_end_first_as_in_evqueue(corpus_daemon: Any) -> None:
    # evQueue: ORDER BY workflow_instance_end DESC, so the first row is the instance that ended last (a script's
    # "did the last run succeed?" with limit="1"), and running instances (no end) come last. jobd listed by id.
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        early = ok(
            client.ask(b'<instance action="launch" name="slow"><parameter name="seconds" value="600"/></instance>')
        ).get("workflow-instance-id", "")
        late = ok(client.ask(b'<instance action="launch" name="trivial" mode="synchronous" timeout="20"/>')).get(
            "workflow-instance-id", ""
        )

        def listed() -> list[str]:
            return [row.get("id", "") for row in ok(client.ask(b'<instances action="list"/>'))]

        assert listed() == [late, early]  # the one still running last
        task = ok(client.ask(b'<instance action="query" id="%s"/>' % early.encode()))[0].find(".//task")
        assert task is not None and task.get("pid"), "the slow task runs"
        ok(
            client.ask(
                b'<instance action="killtask" id="%s" pid="%s"/>' % (early.encode(), task.get("pid", "").encode())
            )
        )
        ok(client.ask(b'<instance action="wait" id="%s" timeout="20"/>' % early.encode()))
        assert listed() == [early, late]  # launched first, ended last
        first = ok(client.ask(b'<instances action="list" limit="1"/>'))
        assert first.get("rows") == "2" and [row.get("id") for row in first] == [early]


def test_retry_schedules_are_listed_as_evqueue_lists_them(corpus_daemon: Any) -> None:
    # evQueue's `retry_schedules list` (its web UI's retry schedules page) was UNKNOWN_COMMAND, though jobd has
    # retry schedules ([retry_schedule.NAME] in tests/workflows/corpus.toml): each is evQueue's
    # <schedule id name><level retry_delay retry_times/>…</schedule>, ids numbering them by name.
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        listed = ok(client.ask(b'<?xml version="1.0" encoding="utf-8"?>\n<retry_schedules action="list"/>\n'))
    assert [etree.tostring(schedule) for schedule in listed] == [
        b'<schedule id="1" name="fast_then_slow"><level retry_delay="1" retry_times="2"/>'
        b'<level retry_delay="5" retry_times="1"/></schedule>',
        b'<schedule id="2" name="patient"><level retry_delay="0.5" retry_times="1"/></schedule>',
    ]


def test_workflow_schedules_show_their_calendar_in_evqueues_format(make_daemon: Any) -> None:
    # evQueue's clients read `schedule` as sec;min;hour;day;month;wday (its web UI parses it to show and edit it);
    # jobd sent a cron calendar as written, which they cannot read. A calendar that format cannot say (cron's OR of
    # day and weekday, `L`) still goes as written.
    daemon = make_daemon(
        """
        [schedule.cron]
        workflow = "trivial"
        calendar = "30 2 1,15 */2 *"

        [schedule.evqueue]
        workflow = "trivial"
        calendar = "0;0;3;;;1,2,3,4,5"

        [schedule.last_day]
        workflow = "trivial"
        calendar = "0 0 L * *"

        [schedule.seconds]
        workflow = "trivial"
        calendar = "*/20 0 12 * * sun"
        """,
        start=False,
    )
    daemon.write_workflows(trivial=(CORPUS / "trivial.xml").read_bytes())
    daemon.start()
    with EvqClient(daemon.evqueue_socket) as client:
        listed = ok(client.ask(b'<workflow_schedules action="list"/>'))
        scheduled = ok(client.ask(b'<status action="query" type="scheduler"/>'))[0]
    calendars = {row.get("comment"): row.get("schedule") for row in listed}
    assert calendars == {
        "cron": "0;30;2;0,14;0,2,4,6,8,10;",
        "evqueue": "0;0;3;;;1,2,3,4,5",
        "last_day": "0 0 L * *",
        "seconds": "0,20,40;0;12;;;0",
    }
    assert [row.get("workflow_name") for row in listed] == ["trivial"] * 4
    assert sorted(row.get("workflow_schedule_id", "") for row in scheduled) == ["1", "2", "3", "4"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row.get("scheduled_at", "")) for row in scheduled)


# -- get by id: what evQueue's PHP classes and admin scripts ask after listing ------------------------------------


def got_by_id(client: EvqClient, group: bytes, listed: etree._Element) -> list[etree._Element]:
    """What `<GROUP action="get" id="…"/>` answers for each row of a list, asked by the row's id: one element each."""
    answers = [ok(client.ask(b'<%s action="get" id="%s"/>' % (group, row.get("id", "").encode()))) for row in listed]
    assert all(len(answer) == 1 for answer in answers), [etree.tostring(answer) for answer in answers]
    return [answer[0] for answer in answers]


def test_queue_get_answers_the_row_queuepool_list_shows_under_that_id(daemon: Any) -> None:
    # `<queue action="get" id="…"/>` was UNKNOWN_COMMAND. evQueue answers <queue id name concurrency scheduler
    # dynamic/> (QueuePool::GetQueue), the row its `queuepool list` shows; an id naming no queue is UNKNOWN_OBJECT.
    with EvqClient(daemon.evqueue_socket) as client:
        pool = ok(client.ask(b'<queuepool action="list"/>'))
        assert [queue.get("name") for queue in pool] == ["default", "serial"]
        for row, got in zip(pool, got_by_id(client, b"queue", pool), strict=True):
            assert got.tag == "queue" and set(got.attrib) == {"id", "name", "concurrency", "scheduler", "dynamic"}
            for name, value in row.attrib.items():
                assert got.get(name) == value, (name, etree.tostring(got), etree.tostring(row))
        for unknown in (b"0", b"3", b"-1"):
            refused = ko(client.ask(b'<queue action="get" id="%s"/>' % unknown), "UNKNOWN_OBJECT")
            assert refused.get("error") == f"Unknown queue id {int(unknown)}; queuepool list lists ids 1 to 2"
        ko(client.ask(b'<queue action="get"/>'), "MISSING_PARAMETER")
        ko(client.ask(b'<queue action="get" id="one"/>'), "INVALID_INTEGER")
        ko(client.ask(b'<queue action="create" name="q"/>'), "UNKNOWN_COMMAND")  # queues are defined in files
    assert_alive(daemon)


def test_retry_schedule_get_answers_the_row_retry_schedules_list_shows_under_that_id(corpus_daemon: Any) -> None:
    # evQueue's RetrySchedule::Get: the schedule's <schedule> document with its id and name, as listed.
    with EvqClient(corpus_daemon.evqueue_socket) as client:
        listed = ok(client.ask(b'<retry_schedules action="list"/>'))
        assert [row.get("name") for row in listed] == ["fast_then_slow", "patient"]
        for row, got in zip(listed, got_by_id(client, b"retry_schedule", listed), strict=True):
            assert got.tag == "schedule", etree.tostring(got)
            assert dict(got.attrib) == dict(row.attrib) == {"id": row.get("id"), "name": row.get("name")}
            assert [dict(level.attrib) for level in got] == [dict(level.attrib) for level in row]
            assert [level.tag for level in got] == ["level"] * len(row) and len(row) > 0
        refused = ko(client.ask(b'<retry_schedule action="get" id="3"/>'), "UNKNOWN_OBJECT")
        assert refused.get("error") == "Unknown retry schedule id 3; retry_schedules list lists ids 1 to 2"


def test_workflow_schedule_get_answers_evqueues_attributes_of_the_listed_schedule(make_daemon: Any) -> None:
    # evQueue's WorkflowSchedule::Get answers <workflow_schedule workflow_id schedule onfailure user host active
    # comment node> and always its <parameter name value/> children: the list row without its id and the
    # workflow's name and group.
    daemon = make_daemon(
        """
        [schedule.loops]
        workflow = "loopdemo"
        calendar = "0 3 * * mon-fri"
        on_failure = "suspend"
        parameters = { count = "2" }

        [schedule.plain]
        workflow = "trivial"
        calendar = "*/5 * * * *"
        enabled = false
        """,
        start=False,
    )
    daemon.write_workflows(
        trivial=(CORPUS / "trivial.xml").read_bytes(), loopdemo=(CORPUS / "loopdemo.xml").read_bytes()
    )
    daemon.start()
    evqueues = {"workflow_id", "schedule", "onfailure", "user", "host", "active", "comment", "node"}
    with EvqClient(daemon.evqueue_socket) as client:
        listed = ok(client.ask(b'<workflow_schedules action="list" display_parameters="yes"/>'))
        assert [row.get("comment") for row in listed] == ["loops", "plain"]
        gets = got_by_id(client, b"workflow_schedule", listed)
        refused = ko(client.ask(b'<workflow_schedule action="get" id="3"/>'), "UNKNOWN_OBJECT")
    assert refused.get("error") == "Unknown workflow schedule id 3; workflow_schedules list lists ids 1 to 2"
    for row, got in zip(listed, gets, strict=True):
        assert got.tag == "workflow_schedule" and set(got.attrib) == evqueues, etree.tostring(got)
        for name in evqueues:
            assert got.get(name) == row.get(name), (name, etree.tostring(got), etree.tostring(row))
        assert [dict(parameter.attrib) for parameter in got] == [dict(parameter.attrib) for parameter in row]
    loops, plain = gets
    assert dict(loops.attrib) == {
        "workflow_id": "1",  # loopdemo sorts before trivial
        "schedule": "0;0;3;;;1,2,3,4,5",
        "onfailure": "SUSPEND",
        "user": "",
        "host": "",
        "active": "1",
        "comment": "loops",
        "node": "any",
    }
    assert [etree.tostring(parameter) for parameter in loops] == [b'<parameter name="count" value="2"/>']
    assert plain.get("active") == "0" and plain.get("workflow_id") == "2" and len(plain) == 0


@pytest.mark.parametrize(
    ("request_", "instead"),
    [
        (b'<datastore action="get" id="1"/>', "jobctl log TID"),
        (b'<xpath action="parse" expression="count(/a"/>', "jobd --check-config"),
        (b'<control action="retry"/>', "retry_at"),
        # evQueue's definitions are rows edited through the API; jobd's are files. An administrator moving over
        # (or evQueue's scripts) sends these first, and learns where the definition goes now.
        (b'<queue action="create" name="q3" concurrency="2" scheduler="fifo" dynamic="no"/>', "[queue.NAME]"),
        (b'<queue action="edit" id="1" name="default" concurrency="4" scheduler="fifo"/>', "[queue.NAME]"),
        (b'<queue action="delete" id="1"/>', "[queue.NAME]"),
        (b'<workflow action="create" name="w" content="PHdvcmtmbG93Lz4="/>', "workflows/NAME.xml"),
        (b'<workflow action="edit" name="w" content="PHdvcmtmbG93Lz4="/>', "workflows/NAME.xml"),
        (b'<workflow action="delete" name="w"/>', "workflows/NAME.xml"),
        (
            b'<workflow_schedule action="create" workflow_id="1" schedule="0;0;3;;;" onfailure="SUSPEND"/>',
            "[schedule.NAME]",
        ),
        (b'<workflow_schedule action="delete" id="1"/>', "[schedule.NAME]"),
        (b'<workflow_schedule action="lock" id="1"/>', "jobctl schedule disable NAME"),
        (b'<workflow_schedule action="unlock" id="1"/>', "jobctl schedule enable NAME"),
        (b'<retry_schedule action="create" name="r" content="PHNjaGVkdWxlLz4="/>', "[retry_schedule.NAME]"),
        (b'<user action="create" name="bob" password="x" profile="USER"/>', "[tcp.users.NAME]"),
        (
            b'<user action="grant" id="2" workflow_id="1" edit="no" read="yes" exec="yes" kill="no"/>',
            "[[access.grant]]",
        ),
    ],
)
def test_evqueue_commands_jobd_does_not_serve_say_why_and_what_to_use(
    daemon: Any, request_: bytes, instead: str
) -> None:
    with EvqClient(daemon.evqueue_socket) as client:
        refused = ko(client.ask(request_), "UNKNOWN_COMMAND")
        error = refused.get("error", "")
        assert error.startswith("Unknown command or action (<") and ": not served by jobd: " in error, error
        assert instead in error, error
        assert ok(client.ask(b"<ping/>")).get("version")


def test_processmanager_tail_answers_the_end_of_a_tasks_job_output(daemon: Any) -> None:
    # evQueue's admin scripts follow a running task with `<processmanager action="tail" tid type/>`: the last 20 KiB
    # of its stdout, stderr or log as text. A task's tid is its job's id in jobd (the instance document shows it);
    # jobd answered UNKNOWN_COMMAND.
    running = daemon.submit(command=["/bin/sh", "-c", "printf 'step 25\\nstep 50\\n'; exec sleep 30"])
    written = daemon.call("job.output", {"id": running["id"], "wait": True})  # the kernel wakes it at the write
    assert written["data"] == "step 25\nstep 50\n", written
    program = "import sys; sys.stdout.write(''.join(f'{i:07d}\\n' for i in range(4000))); sys.stderr.write('err')"
    ended = daemon.submit(command=[sys.executable, "-c", program])
    daemon.call("job.wait", {"id": ended["id"]})
    everything = "".join(f"{i:07d}\n" for i in range(4000))  # 32000 bytes: more than the 20 KiB a tail answers
    with EvqClient(daemon.evqueue_socket) as client:
        tail = ok(client.ask(b'<processmanager action="tail" tid="%d" type="stdout"/>' % running["id"]))
        assert tail.text == "step 25\nstep 50\n" and len(tail) == 0, etree.tostring(tail)
        tail = ok(client.ask(b'<processmanager action="tail" tid="%d" type="stdout"/>' % ended["id"]))
        assert tail.text == everything[-20 * 1024 :], len(tail.text or "")
        stderr = ok(client.ask(b'<processmanager action="tail" tid="%d" type="stderr"/>' % ended["id"]))
        assert stderr.text == "err", etree.tostring(stderr)
        log = ok(client.ask(b'<processmanager action="tail" tid="%d" type="log"/>' % ended["id"]))
        assert log.text is None and log.get("status") == "OK", etree.tostring(log)  # it wrote nothing to fd 3
        unknown = ko(client.ask(b'<processmanager action="tail" tid="999" type="stdout"/>'), "UNKNOWN_JOB")
        assert "no job 999" in (unknown.get("error") or ""), etree.tostring(unknown)
        bad = ko(client.ask(b'<processmanager action="tail" tid="1" type="fd3"/>'), "INVALID_PARAMETER")
        assert "stdout, stderr, log" in (bad.get("error") or ""), etree.tostring(bad)
        ko(client.ask(b'<processmanager action="tail" tid="1"/>'), "MISSING_PARAMETER")
    daemon.call("job.cancel", {"id": running["id"]})
