"""Property-based fuzzing (hypothesis) of both codecs and of a live daemon's two sockets.

The codecs: `jsonrpc.decode` and evQueue's `XmlFramer` + `parse_request` + `decode_command` never raise anything but
a JobdError, whatever bytes they get (no per-example deadline: timings do not belong in tests, and a loaded CI machine
would make one flaky; a hang still ends the test through pytest-timeout); the JSON depth limit agrees with
the real depth; the XML framer cuts a stream the same way however it is split. The live socket: random byte streams
and random near-valid requests to the API socket and the evQueue socket of one real daemon, which must answer
each with well-formed replies, and end alive, answering ping, with every job accepted before the fuzzing intact.
Example counts are kept small so the whole file runs in well under 30 seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lxml import etree

from jobd import api
from jobd.errors import JobdError, ParseError
from jobd.protocol import evqueue, jsonrpc

pytestmark = pytest.mark.timeout(120)

DEADLINE = 10.0
CODEC = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
LIVE = settings(
    max_examples=120,
    database=None,
    deadline=None,  # each example is bounded by the socket deadline instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# -- strategies ---------------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
METHODS = [
    "ping",
    "job.get",
    "job.list",
    "job.output",
    "job.wait",
    "queue.list",
    "daemon.status",
    "workflow.list",
    "workflow.get",
    "instance.list",
    "instance.get",
    "schedule.list",
    "events.subscribe",
    "no.such.method",
]
PARAM_NAMES = ["id", "limit", "queue", "task", "state", "timeout", "offset", "stream", "name", "workflow", "types", "x"]


@st.composite
def json_requests(draw: Any) -> bytes:
    """A JSON-RPC request, often valid, sometimes with a wrong member, and sometimes cut or garbled as bytes."""
    message: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2]))}
    if draw(st.booleans()):
        message["id"] = draw(st.integers(-(2**70), 2**70) | st.text(max_size=10) | st.none() | json_values)
    message["method"] = draw(st.sampled_from(METHODS) | st.text(max_size=12))
    if draw(st.booleans()):
        message["params"] = draw(
            st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=6), json_values, max_size=4) | json_values
        )
    if message["method"] == "job.wait" and isinstance(message.get("params"), dict):
        message["params"]["timeout"] = 0  # a wait never holds a connection open past the example
    data = json.dumps(message).encode()
    mutation = draw(st.sampled_from(["none", "none", "cut", "insert", "batch"]))
    if mutation == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif mutation == "batch":
        data = b"[" + data + b"," + data + b"]"
    return data


XML_COMMANDS = [
    ("ping", ""),
    ("instance", "query"),
    ("instance", "wait"),
    ("instances", "list"),
    ("status", "query"),
    ("statistics", "query"),
    ("queuepool", "list"),
    ("workflows", "list"),
    ("workflow", "get"),
    ("workflow_schedules", "list"),
    ("nope", "nope"),
]
PARAMETER_NAMES = st.text(alphabet="abcxyz", min_size=1, max_size=5)
XML_ATTRIBUTES = ["id", "name", "type", "limit", "offset", "filter_status", "groupby", "full", "timeout", "xpathfilter"]


@st.composite
def xml_requests(draw: Any) -> bytes:
    group, action = draw(st.sampled_from(XML_COMMANDS))
    attributes = {"action": action} if action else {}
    for name in draw(st.lists(st.sampled_from(XML_ATTRIBUTES) | st.text(alphabet="abz_", min_size=1, max_size=8))):
        attributes[name] = draw(st.text(max_size=12) | st.integers(-5, 10**20).map(str))
    if group == "instance" and action == "wait":
        attributes["timeout"] = "1"  # evQueue's seconds; 0 means forever
    text = "".join(
        f" {name}={quoteattr(''.join(c for c in value if c.isprintable()))}" for name, value in attributes.items()
    )
    children = "".join(
        f"<parameter name={quoteattr(name)} value={quoteattr(value)}/>"
        for name, value in draw(
            st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.just("v"), max_size=2)
        ).items()
    )
    data = (f"<{group}{text}>{children}</{group}>" if children else f"<{group}{text}/>").encode()
    mutation = draw(st.sampled_from(["none", "none", "cut", "insert"]))
    if mutation == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "insert":
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.binary(min_size=1, max_size=4) | st.sampled_from([b"<", b">", b'"', b"&", b"]]>"]))
            + data[at:]
        )
    return data


# -- the codecs -----------------------------------------------------------------------------------------------------


@CODEC
@given(st.binary(max_size=2000) | json_requests())
def test_jsonrpc_decode_raises_nothing_but_jobd_errors(line: bytes) -> None:
    try:
        frame = jsonrpc.decode(line)
    except JobdError:
        return
    assert frame.members
    for member in frame.members:
        assert isinstance(member, jsonrpc.Request | jsonrpc.Invalid)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    return 0


@st.composite
def nested(draw: Any) -> Any:
    """A value nested 0 to 100 deep, with strings that hold brackets, quotes and backslashes on the way."""
    value: Any = draw(json_scalars)
    for _ in range(draw(st.integers(0, 100))):
        noise = draw(st.text(alphabet='[]{}"\\ a', max_size=6))
        value = draw(st.sampled_from([[noise, value], {"k": value, noise: noise}, [value], {noise: value}]))
    return value


@settings(max_examples=200, deadline=None, database=None)
@given(nested())
def test_the_json_depth_limit_is_the_real_depth(value: Any) -> None:
    line = json.dumps(value).encode()
    too_deep = _depth(value) > jsonrpc.MAX_DEPTH
    try:
        jsonrpc.decode(line)
    except ParseError as error:
        assert too_deep == ("deep" in error.message), (error.message, _depth(value))
    else:
        assert not too_deep


@CODEC
@given(
    st.integers(1, 64),
    st.text(min_size=1, max_size=12),
    st.dictionaries(st.text(max_size=8).filter(lambda key: key != "type"), json_values, max_size=4),
)
@example(1, "job.log", {"line": '\u00e9\u202e\x00 \\ "%d %s'})  # what a format string or JSON escape would spoil
def test_an_event_encoded_once_is_the_line_each_subscription_was_sent(
    subscription: int, kind: str, members: dict[str, Any]
) -> None:
    """jobd encodes an event once for all its subscriptions (Server.encoded_event) and splices each one's number in:
    the line is the one the notification, encoded whole for that subscription, would be."""
    event = {"type": kind, **members}
    whole = jsonrpc.encode(jsonrpc.notification("event", {"subscription": subscription, **event}))
    assert jsonrpc.event_line(subscription, jsonrpc.encode_value(event)) == whole


def _decode_all(stream: bytes, cuts: list[int]) -> tuple[list[bytes], str | None]:
    """Feed `stream` to a framer split at `cuts`; the documents and the framing error, if any."""
    framer = evqueue.XmlFramer()
    documents: list[bytes] = []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    try:
        for piece in pieces:
            documents += framer.feed(piece)
        if framer.failed:
            framer.feed(b"")
    except JobdError as error:
        return documents, error.code
    return documents, None


@CODEC
@given(st.lists(xml_requests() | st.binary(max_size=40), min_size=1, max_size=5), st.data())
def test_the_xml_framer_and_parser_raise_nothing_but_jobd_errors_however_the_stream_is_cut(
    parts: list[bytes], data: Any
) -> None:
    stream = b"".join(parts)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=6))))
    whole = _decode_all(stream, [])
    assert _decode_all(stream, cuts) == whole
    for document in whole[0]:
        with contextlib.suppress(JobdError):
            evqueue.decode_command(evqueue.parse_request(document))


def _read_in_chunks(stream: bytes, limits: list[int]) -> list[bytes]:
    """job.output's utf-8 chunks of a finished stream, read from offset 0 with the given limits in turn."""
    pieces, offset = [], 0
    for limit in itertools.cycle(limits):
        if offset >= len(stream):
            return pieces
        read = stream[offset : offset + limit + api.MAX_UTF8_EXTRA]
        piece = api._text_chunk(read, limit, ends_stream=offset + len(read) >= len(stream))
        assert piece, f"no progress at offset {offset} with limit {limit}"
        assert len(piece) <= max(limit, 4)
        pieces.append(piece)
        offset += len(piece)
    raise AssertionError("unreachable")


@CODEC
@given(st.text(max_size=300), st.lists(st.integers(1, 12), min_size=1, max_size=8))
@example(text="aé€😀b", limits=[1])
def test_utf8_output_read_in_any_chunks_is_the_text(text: str, limits: list[int]) -> None:
    # Each piece decodes strictly: none splits a character, whatever the limits.
    assert "".join(piece.decode() for piece in _read_in_chunks(text.encode(), limits)) == text


@CODEC
@given(st.binary(max_size=300), st.lists(st.integers(1, 12), min_size=1, max_size=8))
@example(stream=b"\xe0\x80", limits=[1])  # a character the stream's end cuts, longer than the limit
def test_output_of_any_bytes_read_in_utf8_chunks_loses_and_repeats_nothing(stream: bytes, limits: list[int]) -> None:
    assert b"".join(_read_in_chunks(stream, limits)) == stream


# -- the live daemon ----------------------------------------------------------------------------------------------


def _exchange(path: Any, data: bytes, *, greeted: bool) -> bytes:
    """Send `data`, close our side, read everything until jobd closes (within the deadline)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # jobd refused the stream and closed: its answer is still there to read
        deadline = time.monotonic() + DEADLINE
        received = bytearray()
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer and close within {DEADLINE}s: {bytes(received)[:300]!r}") from None
            if not chunk:
                break
            received += chunk
    assert b"Traceback" not in received
    return bytes(received)


def _check_json_replies(received: bytes) -> None:
    for line in received.splitlines():
        if line.startswith(b"<"):  # the first byte chose evQueue's protocol
            _check_xml_replies(received)
            return
        message = json.loads(line)
        for reply in message if isinstance(message, list) else [message]:
            assert reply["jsonrpc"] == "2.0" and ("result" in reply) != ("error" in reply), reply


def _check_xml_replies(received: bytes) -> None:
    for document in evqueue.XmlFramer().feed(received):
        root = etree.fromstring(document)
        assert root.tag in ("response", "ready", "ping"), document
        if root.tag == "response" and root.get("status") == "KO":
            assert root.get("error") and root.get("error-code"), document


def test_live_sockets_survive_random_and_near_valid_streams(make_daemon: Any) -> None:
    daemon = make_daemon(
        """
        [queue.default]
        concurrency = 2

        [task.echo]
        command = ["/bin/echo"]
        """
    )
    done = daemon.submit(task="echo", args=["kept"])
    daemon.wait(done["id"])
    running = daemon.submit(command=["/bin/sleep", "300"])
    delayed = daemon.submit(command=["/bin/true"], delay=3600)
    before = {job["id"]: daemon.call("job.get", {"id": job["id"]}) for job in (done, running, delayed)}

    streams = st.binary(max_size=600) | json_requests() | xml_requests()
    separators = st.sampled_from([b"\n", b"", b"\r\n", b" "])

    @LIVE
    @given(st.lists(streams, min_size=1, max_size=4), separators)
    def fuzz(parts: list[bytes], separator: bytes) -> None:
        stream = separator.join(parts) + separator
        _check_json_replies(_exchange(daemon.socket_path, stream, greeted=False))
        _check_xml_replies(_exchange(daemon.evqueue_socket, stream, greeted=True))

    fuzz()

    assert daemon.running(), daemon.log()[-4000:]
    assert daemon.call("ping")["pong"] is True
    _check_xml_replies(_exchange(daemon.evqueue_socket, b"<ping/>", greeted=True))
    for job_id, job in before.items():
        assert daemon.call("job.get", {"id": job_id}) == job
    assert daemon.output(done["id"]) == "kept\n"
    for job in (running, delayed):
        assert daemon.call("job.cancel", {"id": job["id"]})["state"] == "cancelled"
    assert "Traceback" not in daemon.log()
