"""evQueue's XML protocol as bytes: framing, hostile input, request decoding, error codes, responses, greeting.

Pure byte handling: no daemon, no socket. The framer is fed the way a socket delivers data — whole, pipelined,
split at every offset, byte by byte — and must return exactly the documents a client sent, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

import pytest
from lxml import etree

from jobd import errors
from jobd.protocol import evqueue
from jobd.protocol.evqueue import (
    KEEPALIVE,
    AttributeValue,
    ControlReload,
    GroupBy,
    InstanceCancel,
    InstanceDebugResume,
    InstanceDelete,
    InstanceKillTask,
    InstanceLaunch,
    InstanceQuery,
    InstancesList,
    InstanceStatus,
    InstanceWait,
    Ping,
    QueuePoolList,
    Quit,
    StatisticsGlobal,
    StatisticsQueues,
    StatusConfiguration,
    StatusScheduler,
    StatusWorkflows,
    WorkflowGet,
    WorkflowSchedulesList,
    WorkflowsList,
    XmlFramer,
    apply_xpathfilter,
    decode_command,
    element,
    evqueue_code,
    greeting,
    parse_request,
    response_element,
    response_error,
    serialize,
)

# ---------------------------------------------------------------------------------------------------------------
# Framing

TRICKY = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b"<!-- a comment before the root: <not/> a tag -->"
    b'<instance action="launch" name="a/>b" comment=\'say "x>y" /> \'>'
    b"<!-- </instance> -->"
    b"<?pi </instance> ?>"
    b"<![CDATA[ </instance> ]] > ]]>"
    b'<parameter name="p" value="&lt;/instance&gt;"/>'
    b"text &amp; more"
    b"</instance>"
)


def feed_all(framer: XmlFramer, chunks: list[bytes]) -> list[bytes]:
    documents: list[bytes] = []
    for chunk in chunks:
        documents += framer.feed(chunk)
    return documents


def test_a_document_comes_out_as_soon_as_its_root_closes() -> None:
    assert XmlFramer().feed(b"<ping/>") == [b"<ping/>"]
    assert XmlFramer().feed(b"<quit/>\n") == [b"<quit/>"]
    assert XmlFramer().feed(b'<?xml version="1.0"?>\n<ping />') == [b'<?xml version="1.0"?>\n<ping />']
    assert XmlFramer().feed(b"<foo />\n") == [b"<foo />"]


def test_an_incomplete_document_waits_for_more_bytes() -> None:
    framer = XmlFramer()
    assert framer.feed(b'<instance action="query" id="1"') == []
    assert framer.buffered > 0
    assert framer.feed(b"/>") == [b'<instance action="query" id="1"/>']
    assert framer.buffered == 0


def test_pipelined_documents_all_come_out_in_order() -> None:
    stream = b'<ping/><quit/>\n\n<?xml version="1.0"?><a x="1"><b/></a>  \r\n\t<c></c>'
    assert XmlFramer().feed(stream) == [b"<ping/>", b"<quit/>", b'<?xml version="1.0"?><a x="1"><b/></a>', b"<c></c>"]


def test_markup_holding_angle_brackets_and_slashes_does_not_end_a_document() -> None:
    assert XmlFramer().feed(TRICKY + b"<ping/>") == [TRICKY, b"<ping/>"]


@pytest.mark.parametrize("split", range(1, len(TRICKY)))
def test_a_document_split_anywhere_comes_out_whole(split: int) -> None:
    framer = XmlFramer()
    assert feed_all(framer, [TRICKY[:split], TRICKY[split:] + b"\n<ping/>"]) == [TRICKY, b"<ping/>"]


def test_a_document_fed_byte_by_byte_comes_out_whole() -> None:
    stream = TRICKY + b"\n" + TRICKY + b"<quit/>"
    framer = XmlFramer()
    assert feed_all(framer, [stream[i : i + 1] for i in range(len(stream))]) == [TRICKY, TRICKY, b"<quit/>"]


def test_whitespace_between_documents_is_not_kept() -> None:
    framer = XmlFramer()
    assert framer.feed(b"\n" * 5000) == []
    assert framer.buffered == 0
    assert framer.feed(b" <ping/>") == [b"<ping/>"]


def test_markup_after_a_root_is_not_glued_to_a_next_document_that_declares_itself() -> None:
    """A comment or processing instruction after a root element is legal XML, and was taken as the next document's
    prolog: the next request, sent with an XML declaration as evQueue's PHP class sends each, then had the
    declaration in its middle ("XML declaration allowed only at the start")."""
    stream = b'<?xml version="1.0"?><ping/><!-- x --><?pi y?>\n<?xml version="1.0"?><ping a="1"/><!-- z --><quit/>'
    expected = [b'<?xml version="1.0"?><ping/>', b'<?xml version="1.0"?><ping a="1"/>', b"<!-- z --><quit/>"]
    assert XmlFramer().feed(stream) == expected
    framer = XmlFramer()
    assert feed_all(framer, [stream[i : i + 1] for i in range(len(stream))]) == expected
    for document in expected:
        assert etree.fromstring(document) is not None
    # A processing instruction whose target only begins with xml is no declaration: it stays the prolog it is.
    assert XmlFramer().feed(b"<a/><?xml-stylesheet href='s'?><b/>") == [b"<a/>", b"<?xml-stylesheet href='s'?><b/>"]


def test_a_byte_order_mark_before_a_document_is_dropped() -> None:
    """Some clients write a UTF-8 BOM before each document: it was "text outside the root element", and the
    connection was closed."""
    stream = b'\xef\xbb\xbf<ping/>\xef\xbb\xbf<?xml version="1.0"?><quit/>'
    expected = [b"<ping/>", b'<?xml version="1.0"?><quit/>']
    assert XmlFramer().feed(stream) == expected
    framer = XmlFramer()
    assert feed_all(framer, [stream[i : i + 1] for i in range(len(stream))]) == expected
    with pytest.raises(errors.InvalidXml, match="text outside the root"):
        XmlFramer().feed(b"\xef\xbb<ping/>")  # not a whole BOM
    # After markup that trailed the last request, a BOM starts the next one: that markup was the last one's.
    trailing = b'<ping/><!-- c -->\xef\xbb\xbf<?xml version="1.0"?><ping/><?pi x?>\xef\xbb\xbf<quit/>'
    assert XmlFramer().feed(trailing) == [b"<ping/>", b'<?xml version="1.0"?><ping/>', b"<quit/>"]


def test_an_xml_parser_accepts_every_framed_document() -> None:
    documents = XmlFramer().feed(TRICKY + b'<?xml version="1.0"?><a x="/>"><b/></a>')
    # Each a whole document (fromstring raises otherwise), and both there: no document is a pass, not of this test.
    assert [etree.fromstring(document).tag for document in documents] == ["instance", "a"]


def test_a_document_over_the_size_limit_is_refused_before_it_ends() -> None:
    framer = XmlFramer(max_frame=100)
    with pytest.raises(errors.FrameTooLarge, match="100 bytes"):
        framer.feed(b'<a x="' + b"y" * 200)
    assert framer.failed
    with pytest.raises(errors.FrameTooLarge):
        framer.feed(b'"/>')


def test_the_default_size_limit_is_one_mebibyte() -> None:
    value = b"y" * (evqueue.MAX_FRAME - 20)
    document = b'<a x="' + value + b'"/>'
    assert XmlFramer().feed(document) == [document]
    with pytest.raises(errors.FrameTooLarge):
        XmlFramer().feed(b'<a x="' + value + b'" padding="more than twenty bytes"/>')


def test_documents_before_a_framing_error_are_returned_and_the_error_comes_next() -> None:
    framer = XmlFramer()
    assert framer.feed(b"<ping/><ping/>oops") == [b"<ping/>", b"<ping/>"]
    assert framer.failed
    with pytest.raises(errors.InvalidXml, match="text outside the root"):
        framer.feed(b"")


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"hello", "text outside the root"),
        (b'<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>', "DTDs"),
        (b'<!ENTITY x "y">', "not allowed before the root"),
        (b"<![CDATA[x]]>", "not allowed before the root"),
        (b"</a>", "end tag outside"),
        (b"<1a/>", "does not start an element"),
        (b'<a><!DOCTYPE a [<!ENTITY x "y">]></a>', "DTDs"),
        (b"<a>< b/></a>", "does not start an element"),
    ],
)
def test_bytes_that_cannot_start_a_document_are_refused(stream: bytes, reason: str) -> None:
    framer = XmlFramer()
    with pytest.raises(errors.InvalidXml, match=reason):
        framer.feed(stream)
    assert framer.failed


def test_deep_nesting_is_refused_by_the_framer() -> None:
    with pytest.raises(errors.InvalidXml, match="more than 64 deep"):
        XmlFramer().feed(b"<a>" * 10_000)
    assert XmlFramer().feed(b"<a>" * 64 + b"</a>" * 64) == [b"<a>" * 64 + b"</a>" * 64]


def test_nul_bytes_and_invalid_utf8_are_framed_then_refused_by_the_parser() -> None:
    for bad in (b"<a>\x00</a>", b'<a x="\xff\xfe"/>', b"<a>\xc3</a>", b"<a\x00/>"):
        documents = XmlFramer().feed(bad)
        assert documents == [bad]
        with pytest.raises(errors.InvalidXml, match="not well-formed"):
            parse_request(documents[0])


# ---------------------------------------------------------------------------------------------------------------
# Hostile documents handed to the parser directly (the framer already refuses DOCTYPEs)

BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "lol">'
    + b"".join(b'<!ENTITY lol%d "%s">' % (level, b"&lol%d;" % (level - 1) * 10) for level in range(1, 10))
    + b']><lolz action="x">&lol9;</lolz>'
)
QUADRATIC = b'<!DOCTYPE a [<!ENTITY big "' + b"x" * 50_000 + b'">]><a>' + b"&big;" * 10_000 + b"</a>"


def external_entity(url: str) -> bytes:
    return f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "{url}">]><a name="&xxe;">&xxe;</a>'.encode()


@pytest.mark.parametrize(
    "document",
    [
        BILLION_LAUGHS,
        QUADRATIC,
        external_entity("file:///etc/passwd"),
        external_entity("http://127.0.0.1:9/evil.xml"),
        b'<!DOCTYPE a SYSTEM "http://127.0.0.1:9/a.dtd"><a/>',
    ],
)
def test_dtds_and_entities_are_refused_by_framer_and_parser(document: bytes) -> None:
    with pytest.raises(errors.InvalidXml, match="DTDs"):
        XmlFramer().feed(document)
    with pytest.raises(errors.InvalidXml, match="DTDs"):
        parse_request(document)


def test_no_file_is_read_through_an_entity(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-MARKER")
    for document in (external_entity(secret.as_uri()), f"<a>&xxe;<b>{secret.as_uri()}</b></a>".encode()):
        with pytest.raises(errors.InvalidXml) as caught:
            parse_request(document)
        assert "TOP-SECRET-MARKER" not in caught.value.message
        assert b"TOP-SECRET-MARKER" not in response_error("n", caught.value)


def test_an_undeclared_entity_is_an_error_not_an_expansion() -> None:
    with pytest.raises(errors.InvalidXml, match="xxe"):
        parse_request(b'<instance action="launch" name="&xxe;"/>')


def test_the_parser_refuses_deep_nesting_without_the_framer() -> None:
    with pytest.raises(errors.InvalidXml):
        parse_request(b"<a>" * 5000 + b"</a>" * 5000)


# ---------------------------------------------------------------------------------------------------------------
# Requests


def test_a_request_is_its_root_name_attributes_and_parameter_children() -> None:
    request = parse_request(
        b'<?xml version="1.0" encoding="utf-8"?>\n'
        b'<instance action="launch" name="loop" xpathfilter="/response">'
        b'<parameter name="count" value="4"/><parameter name="who" value="caf\xc3\xa9 &amp; &#x263A;"/>'
        b"<other/></instance>"
    )
    assert request.group == "instance"
    assert request.action == "launch"
    assert dict(request.attributes) == {"action": "launch", "name": "loop"}
    assert dict(request.parameters) == {"count": "4", "who": "café & \u263a"}
    assert request.xpathfilter == "/response"


def test_a_request_without_action_has_an_empty_action() -> None:
    assert parse_request(b"<ping/>").action == ""


@pytest.mark.parametrize(
    ("document", "code", "message"),
    [
        (b'<instance action="launch" name="w"><parameter value="1"/></instance>', "MISSING_PARAMETER", "'name'"),
        (
            b'<instance action="launch" name="w"><parameter name="p" value="1"/><parameter name="p" value="2"/>'
            b"</instance>",
            "INVALID_PARAMETER",
            "given twice",
        ),
    ],
)
def test_bad_parameter_children_are_refused(document: bytes, code: str, message: str) -> None:
    with pytest.raises(errors.InvalidParams, match=message) as caught:
        parse_request(document)
    assert evqueue_code(caught.value) == code


def test_a_parameter_without_value_is_the_empty_string_as_in_evqueue() -> None:
    # evQueue reads the attribute through its DOM, which gives "" for a missing one; jobd refused the launch.
    request = parse_request(b'<instance action="launch" name="w"><parameter name="p"/></instance>')
    assert dict(request.parameters) == {"p": ""}


def request(
    attributes: dict[str, str], group: str = "test", parameters: dict[str, str] | None = None
) -> evqueue.Request:
    return evqueue.Request(
        group=group,
        action=attributes.get("action", ""),
        attributes=MappingProxyType(attributes),
        parameters=MappingProxyType(parameters or {}),
    )


def test_typed_getters() -> None:
    req = request({"s": "text", "i": " -42 ", "yes": "yes", "no": "no", "one": "1", "zero": "0", "e": "b"})
    assert req.string("s") == "text"
    assert req.optional_string("absent") is None
    assert req.integer("i") == -42
    assert req.optional_integer("absent", default=7) == 7
    assert [req.boolean(name, False) for name in ("yes", "no", "one", "zero")] == [True, False, True, False]
    assert req.boolean("absent", True) is True
    assert req.choice("e", ("a", "b")) == "b"
    assert req.choice("absent", ("a", "b"), default="a") == "a"


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (lambda r: r.string("id"), "MISSING_PARAMETER", "Missing parameter 'id'"),
        (lambda r: r.integer("id"), "MISSING_PARAMETER", "Missing parameter 'id'"),
        (lambda r: r.integer("word"), "INVALID_INTEGER", "'word' must be an integer, not 'abc'"),
        (lambda r: r.integer("trailing"), "INVALID_INTEGER", "not '12abc'"),
        (lambda r: r.integer("huge"), "INVALID_INTEGER", "must be an integer"),
        (lambda r: r.integer("negative", minimum=0), "INVALID_PARAMETER", "at least 0, not -1"),
        (lambda r: r.boolean("word", False), "INVALID_BOOLEAN", "'yes', 'no' or an integer, not 'abc'"),
        (lambda r: r.boolean("true", False), "INVALID_BOOLEAN", "not 'true'"),
        (lambda r: r.choice("word", ("a", "b")), "INVALID_PARAMETER", "Invalid value 'abc' .*allowed: a, b"),
        (lambda r: r.choice("id", ("a", "b")), "MISSING_PARAMETER", "Missing parameter 'id'; allowed: a, b"),
        (lambda r: r.optional_datetime("word"), "INVALID_PARAMETER", "YYYY-MM-DD HH:MM:SS"),
    ],
)
def test_typed_getters_raise_evqueue_errors(call, code: str, message: str) -> None:  # type: ignore[no-untyped-def]
    req = request({"word": "abc", "trailing": "12abc", "huge": "9" * 30, "negative": "-1", "true": "true"})
    with pytest.raises(errors.InvalidParams, match=message) as caught:
        call(req)
    assert evqueue_code(caught.value) == code
    assert caught.value.code == "INVALID_PARAMS"  # to the rest of jobd (JSON-RPC) it stays INVALID_PARAMS


def decode(document: bytes) -> evqueue.Command:
    return decode_command(parse_request(document))


@pytest.mark.parametrize(
    ("document", "command"),
    [
        (b"<ping />", Ping()),
        (b'<ping action="anything"/>', Ping()),
        (b"<quit/>", Quit()),
        (b'<instance action="launch" name="trivial"/>', InstanceLaunch(name="trivial")),
        (
            b'<instance action="launch" name="loopdemo" mode="synchronous" timeout="30" comment="loop test" '
            b'user="deploy" host="web1"><parameter name="count" value="4"/></instance>',
            InstanceLaunch(
                name="loopdemo",
                synchronous=True,
                timeout=30,
                user="deploy",
                host="web1",
                comment="loop test",
                parameters=MappingProxyType({"count": "4"}),
            ),
        ),
        (b'<instance action="launch" name="t" mode="synchronous" timeout="0" user=""/>', InstanceLaunch("t", True)),
        (b'<instance action="query" id="2"/>', InstanceQuery(2)),
        (b'<instance action="wait" id="2" timeout="10"/>', InstanceWait(2, 10)),
        (b'<instance action="wait" id="2"/>', InstanceWait(2, None)),
        (b'<instance action="cancel" id="3"/>', InstanceCancel(3)),
        (b'<instance action="killtask" id="3" pid="1234"/>', InstanceKillTask(3, 1234)),
        (b'<instance action="delete" id="3"/>', InstanceDelete(3)),
        (b'<instance action="debugresume" id="3"/>', InstanceDebugResume(3)),
        (b'<instances action="list"/>', InstancesList()),
        (
            b'<instances action="list" filter_id="" filter_workflow="" filter_status="" filter_error="" '
            b'filter_launched_from="" groupby=""/>',
            InstancesList(),
        ),
        (b'<instances action="list" filter_error="yes" limit="5"/>', InstancesList(filter_error=True, limit=5)),
        (b'<instances action="list" filter_error="0" filter_id="0" filter_tag_id="0"/>', InstancesList()),
        (b'<instances action="list" filter_tag_id="3"/>', InstancesList(filter_tag_id=3)),
        (
            b'<instances action="list" filter_status="Executing"/>',
            InstancesList(filter_status=InstanceStatus.EXECUTING),
        ),
        (b'<instances action="list" parameter_a="" customattribute_b=""/>', InstancesList()),
        (b'<instances action="list" groupby="day"/>', InstancesList(groupby=GroupBy.DAY)),
        (b'<instances action="list" limit="1000"/>', InstancesList(limit=1000)),  # rows: a JSON-RPC page at most
        (b'<instances action="list" groupby="hour" limit="9000"/>', InstancesList(groupby=GroupBy.HOUR, limit=9000)),
        (
            b'<instances action="list" filter_id="9" filter_workflow="trivial" filter_status="TERMINATED" '
            b'filter_error="no" filter_launched_from="2026-11-29 16:06:09" filter_launched_until="2026-11-30" '
            b'filter_ended_from="2026-11-29 10:00" filter_ended_until="2026-12-01 00:00:00" filter_schedule_id="4" '
            b'limit="10" offset="20" parameter_count="4" customattribute_owner="bob" filter_node="any">'
            b'<parameter name="size" value="big"/></instances>',
            InstancesList(
                filter_id=9,
                filter_workflow="trivial",
                filter_launched_from=datetime(2026, 11, 29, 16, 6, 9),
                filter_launched_until=datetime(2026, 11, 30),
                filter_ended_from=datetime(2026, 11, 29, 10, 0),
                filter_ended_until=datetime(2026, 12, 1),
                filter_status=InstanceStatus.TERMINATED,
                filter_error=None,  # evQueue's "no": no filter
                filter_schedule_id=4,
                filter_node="any",
                limit=10,
                offset=20,
                parameters=MappingProxyType({"count": "4", "size": "big"}),
                custom_attributes=MappingProxyType({"owner": "bob"}),
            ),
        ),
        (b'<status action="query" type="workflows"/>', StatusWorkflows()),
        (b'<status action="query" type="workflows" limit="5"/>', StatusWorkflows(5)),
        (b'<status action="query" type="workflows" limit="0"/>', StatusWorkflows()),
        (b'<status action="query" type="scheduler"/>', StatusScheduler()),
        (b'<status action="query" type="configuration"/>', StatusConfiguration()),
        (b'<statistics action="query" type="global"/>', StatisticsGlobal()),
        (b'<statistics action="query" type="queue"/>', StatisticsQueues()),
        (b'<queuepool action="list" />', QueuePoolList()),
        (b'<workflows action="list"/>', WorkflowsList()),
        (b'<workflows action="list" full="yes"/>', WorkflowsList(full=True)),
        (b'<workflow action="get" id="2"/>', WorkflowGet(workflow_id=2)),
        (b'<workflow action="get" name="trivial"/>', WorkflowGet(name="trivial")),
        (b'<workflow_schedules action="list"/>', WorkflowSchedulesList()),
        (b'<workflow_schedules action="list" display_parameters="1"/>', WorkflowSchedulesList(True)),
        (b'<control action="reload"/>', ControlReload()),
        (b'<control action="reload" module="scheduler" notify="no"/>', ControlReload("scheduler", False)),
    ],
)
def test_every_command_decodes(document: bytes, command: evqueue.Command) -> None:
    assert decode(document) == command


@pytest.mark.parametrize(
    ("document", "code", "message"),
    [
        (b'<foo action="x" />', "UNKNOWN_COMMAND", "Unknown command or action"),
        (b"<instance/>", "UNKNOWN_COMMAND", "Unknown command or action"),
        (b'<instance action="migrate" id="1"/>', "UNKNOWN_COMMAND", "action 'migrate'"),
        (b'<workflow action="create" name="x" content=""/>', "UNKNOWN_COMMAND", "<workflow>"),
        (b'<x:ping xmlns:x="urn:x"/>', "UNKNOWN_COMMAND", "Unknown command"),
        (b'<instance action="launch"/>', "MISSING_PARAMETER", "Missing parameter 'name'"),
        (b'<instance action="launch" name="w" mode="sync"/>', "INVALID_PARAMETER", "asynchronous, synchronous"),
        (b'<instance action="launch" name="w" timeout="soon"/>', "INVALID_INTEGER", "'timeout'"),
        (b'<instance action="launch" name="w" timeout="-1"/>', "INVALID_PARAMETER", "'timeout' must be at least 0"),
        (b'<instance action="query"/>', "MISSING_PARAMETER", "Missing parameter 'id'"),
        (b'<instance action="query" id="x"/>', "INVALID_INTEGER", "'id' must be an integer"),
        (b'<instance action="query" id="0"/>', "INVALID_PARAMETER", "at least 1"),
        (b'<instance action="wait" id="1" timeout="1.5"/>', "INVALID_INTEGER", "'timeout'"),
        (b'<instance action="killtask" id="1"/>', "MISSING_PARAMETER", "Missing parameter 'pid'"),
        (b'<instance action="cancel"/>', "MISSING_PARAMETER", "'id'"),
        (b'<instance action="delete" id=""/>', "INVALID_INTEGER", "'id'"),
        (b'<instance action="debugresume"/>', "MISSING_PARAMETER", "'id'"),
        (b'<instances action="list" limit="many"/>', "INVALID_INTEGER", "'limit'"),
        (b'<instances action="list" offset="-3"/>', "INVALID_PARAMETER", "'offset'"),
        (b'<instances action="list" limit="1001"/>', "INVALID_PARAMETER", "'limit' must be at most 1000, not 1001"),
        (b'<instances action="list" groupby="week"/>', "INVALID_PARAMETER", "hour, day, month, year"),
        (b'<instances action="list" filter_status="RUNNING"/>', "INVALID_PARAMETER", "EXECUTING, TERMINATED, ABORTED"),
        (b'<instances action="list" filter_error="maybe"/>', "INVALID_BOOLEAN", "'filter_error'"),
        (b'<instances action="list" filter_ended_until="yesterday"/>', "INVALID_PARAMETER", "'filter_ended_until'"),
        (b'<status action="query"/>', "MISSING_PARAMETER", "'type'"),
        (b'<status action="query" type="tasks"/>', "UNKNOWN_TYPE", "workflows, scheduler, configuration"),
        (b'<status action="query" type="workflows" limit="x"/>', "INVALID_INTEGER", "'limit'"),
        (b'<statistics action="query" type="users"/>', "UNKNOWN_TYPE", "global, queue"),
        (b'<workflows action="list" full="maybe"/>', "INVALID_BOOLEAN", "'full'"),
        (b'<workflow action="get"/>', "MISSING_PARAMETER", "Missing parameter 'id' \\(or 'name'\\)"),
        (b'<workflow action="get" id="1" name="x"/>', "INVALID_PARAMETER", "not both"),
        (b'<workflow action="get" id="one"/>', "INVALID_INTEGER", "'id'"),
        (b'<control action="reload" module="bogus"/>', "INVALID_MODULE", "'bogus'.*queuepool"),
        (b'<control action="reload" notify="perhaps"/>', "INVALID_BOOLEAN", "'notify'"),
    ],
)
def test_command_errors_carry_evqueue_codes(document: bytes, code: str, message: str) -> None:
    with pytest.raises(errors.JobdError, match=message) as caught:
        decode(document)
    assert evqueue_code(caught.value) == code


def test_commands_are_frozen_values() -> None:
    launch = decode(b'<instance action="launch" name="w"><parameter name="a" value="1"/></instance>')
    assert isinstance(launch, InstanceLaunch)
    with pytest.raises(AttributeError):
        launch.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        launch.parameters["a"] = "2"  # type: ignore[index]


def test_the_command_table_lists_what_jobd_serves() -> None:
    served = evqueue.COMMANDS
    assert served == {
        "ping",
        "quit",
        "instance launch",
        "instance query",
        "instance wait",
        "instance cancel",
        "instance killtask",
        "instance delete",
        "instance debugresume",
        "instances list",
        "status query",
        "statistics query",
        "queuepool list",
        "queue get",
        "workflows list",
        "workflow get",
        "workflow_schedules list",
        "workflow_schedule get",
        "retry_schedules list",
        "retry_schedule get",
        "processmanager tail",
        "control reload",
    }


# ---------------------------------------------------------------------------------------------------------------
# Error codes


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidParams("x"), "INVALID_PARAMETER"),
        (errors.UnknownQueue("x"), "UNKNOWN_QUEUE"),
        (errors.UnknownInstance("x"), "UNKNOWN_INSTANCE"),
        (errors.UnknownWorkflow("x"), "UNKNOWN_WORKFLOW"),
        (errors.InvalidWorkflowParameters("x"), "INVALID_WORKFLOW_PARAMETERS"),
        (errors.TimedOut("x"), "TIMED_OUT"),
        (errors.InsufficientRights("x"), "INSUFFICIENT_RIGHTS"),
        (errors.InvalidXml("x"), "INVALID_XML"),
        (errors.ParseError("x"), "INVALID_XML"),
        (errors.InvalidRequest("x"), "INVALID_XML"),
        (errors.UnknownCommand("x"), "UNKNOWN_COMMAND"),
        (errors.MethodNotFound("x"), "UNKNOWN_COMMAND"),
        (errors.JobdError("x"), "UNEXPECTED_EXCEPTION"),
        (errors.InvalidTransition("x"), "UNEXPECTED_EXCEPTION"),
        (errors.FrameTooLarge("x"), "FRAME_TOO_LARGE"),
        (errors.ShuttingDown("x"), "SHUTTING_DOWN"),
        (errors.ConfigError("x"), "CONFIG_INVALID"),
        (evqueue.MissingParameter("x"), "MISSING_PARAMETER"),
        (evqueue.InvalidInteger("x"), "INVALID_INTEGER"),
        (evqueue.InvalidBoolean("x"), "INVALID_BOOLEAN"),
        (evqueue.UnknownType("x"), "UNKNOWN_TYPE"),
        (evqueue.InvalidModule("x"), "INVALID_MODULE"),
    ],
)
def test_error_codes_on_the_wire(error: errors.JobdError, code: str) -> None:
    assert evqueue_code(error) == code


def test_an_unknown_workflow_is_answered_with_the_correctly_spelled_code() -> None:
    answer = response_error("localhost", errors.UnknownWorkflow("Unknown Workflow name : nosuch"))
    assert answer == (
        b'<response error="Unknown Workflow name : nosuch" error-code="UNKNOWN_WORKFLOW" node="localhost" '
        b'status="KO"/>\n'
    )
    assert b"UKNOWN_OBJECT" not in answer


# ---------------------------------------------------------------------------------------------------------------
# Responses and greeting


def ok_bytes(
    node: str,
    attrs: dict[str, AttributeValue] | None = None,
    children: Sequence[etree._Element] = (),
    text: str | None = None,
) -> bytes:
    """An OK response as jobd sends one (api_evqueue): the element, then its bytes."""
    return serialize(response_element(node, attrs or {}, children, text))


def test_response_ok_bytes_match_evqueue() -> None:
    assert ok_bytes("localhost") == b'<response node="localhost" status="OK"/>\n'
    assert ok_bytes("localhost", {"workflow-instance-id": 25}) == (
        b'<response node="localhost" status="OK" workflow-instance-id="25"/>\n'
    )
    assert ok_bytes("localhost", {"version": "3.3", "uptime": 11, "git-support": "disabled"}) == (
        b'<response git-support="disabled" node="localhost" status="OK" uptime="11" version="3.3"/>\n'
    )


def test_response_with_children_none_and_booleans() -> None:
    children = [
        element("queue", {"name": "default", "concurrency": 1, "dynamic": False, "id": 1}),
        element("queue", {"name": "q2", "concurrency": 2, "dynamic": True, "comment": None}),
    ]
    assert ok_bytes("n", {"count": 2, "absent": None}, children) == (
        b'<response count="2" node="n" status="OK">'
        b'<queue concurrency="1" dynamic="no" id="1" name="default"/>'
        b'<queue concurrency="2" dynamic="yes" name="q2"/></response>\n'
    )


def test_response_with_text() -> None:
    assert ok_bytes("n", text="step 25\nstep 50\n") == b'<response node="n" status="OK">step 25\nstep 50\n</response>\n'


def test_attribute_values_are_escaped() -> None:
    answer = ok_bytes("n", {"comment": "a \"quoted\" <b> & 'c'\n\ttab", "name": "caf\u00e9 \u263a"})
    assert answer == (
        b"<response comment=\"a &quot;quoted&quot; &lt;b&gt; &amp; 'c'&#10;&#9;tab\" "
        b'name="caf\xc3\xa9 \xe2\x98\xba" node="n" status="OK"/>\n'
    )
    assert etree.fromstring(answer).get("comment") == "a \"quoted\" <b> & 'c'\n\ttab"


def test_characters_xml_cannot_carry_are_replaced_not_fatal() -> None:
    hostile = "nul\x00 bell\x07 esc\x1b lone\ud800 nonchar\uffff ok\u00e9\U0001f600"
    answer = ok_bytes("n", {"output": hostile}, [element("output", text=hostile)])
    parsed = etree.fromstring(answer)
    expected = "nul\ufffd bell\ufffd esc\ufffd lone\ufffd nonchar\ufffd ok\u00e9\U0001f600"
    assert parsed.get("output") == expected
    assert parsed[0].text == expected
    failure = response_error("n\x01", errors.InvalidParams("bad value '\x00\x1f'"))
    assert etree.fromstring(failure).get("error") == "bad value '\ufffd\ufffd'"


def test_response_error_bytes_match_evqueue() -> None:
    assert response_error("localhost", errors.InsufficientRights("insufficient rights")) == (
        b'<response error="insufficient rights" error-code="INSUFFICIENT_RIGHTS" node="localhost" status="KO"/>\n'
    )
    assert response_error("localhost", evqueue.InvalidModule("Invalid module : bogus")) == (
        b'<response error="Invalid module : bogus" error-code="INVALID_MODULE" node="localhost" status="KO"/>\n'
    )


def test_greeting_bytes_match_evqueue() -> None:
    now = datetime(2026, 11, 29, 16, 4, 39)
    assert greeting("localhost", "ADMIN", "3.3", now, [("git", "3.3"), ("storage", "3.3")]) == (
        b'<ready node="localhost" profile="ADMIN" status="OK" time="2026-11-29 16:04:39" version="3.3">'
        b'<modules><module name="git" version="3.3"/><module name="storage" version="3.3"/></modules></ready>\n'
    )
    assert greeting("web1", "USER", "0.1.0", now) == (
        b'<ready node="web1" profile="USER" status="OK" time="2026-11-29 16:04:39" version="0.1.0"><modules/></ready>\n'
    )
    with pytest.raises(ValueError, match="ADMIN"):
        greeting("web1", "ROOT", "0.1.0", now)


def test_keepalive_is_what_evqueue_clients_skip() -> None:
    assert KEEPALIVE == b"<ping />\n"
    assert etree.fromstring(KEEPALIVE).tag == "ping"


# ---------------------------------------------------------------------------------------------------------------
# xpathfilter


def listing() -> etree._Element:
    return response_element(
        "n",
        {"rows": 2},
        [element("workflow", {"id": 1, "name": "a"}), element("workflow", {"id": 2, "name": "b"})],
    )


def filtered(expression: str) -> bytes:
    """The answer `expression` makes of listing(), without its `<response node="n" status="OK">` wrapper."""
    answer = serialize(apply_xpathfilter(listing(), expression))
    wrapper = b'<response node="n" status="OK"'
    assert answer.startswith(wrapper), answer
    if answer == wrapper + b"/>\n":
        return b""
    assert answer.endswith(b"</response>\n"), answer
    return answer[len(wrapper) + 1 : -len(b"</response>\n")]


def test_xpathfilter_answers_a_new_response_holding_the_first_selected_node() -> None:
    # evQueue 3.3 (APISession::QueryReceived, DOMDocument::ImportXPathResult): a fresh <response> with the node and
    # status, into which the first result is imported.
    assert filtered("/response/workflow[@name='b']") == b'<workflow id="2" name="b"/>'
    assert filtered("workflow") == b'<workflow id="1" name="a"/>'
    assert filtered("/response").startswith(b'<response node="n" rows="2"')


def test_xpathfilter_values_are_answered_as_text_and_nothing_as_an_empty_response() -> None:
    assert filtered("workflow/@id") == b"1"
    assert filtered("count(workflow)") == b"2"
    # Numbers as XPath's string() writes them: evQueue's integers as integers, and what evQueue failed on (any `div`
    # result) exactly, not cut down to an integer.
    assert filtered("count(workflow) div 4") == b"0.5"
    assert filtered("count(workflow) div 2") == b"1"
    assert filtered("string(workflow[2]/@name)") == b"b"
    assert filtered("count(workflow) = 2") == b"true"
    assert filtered("1 div 0") == b"Infinity"
    assert filtered("nothing") == b""
    assert filtered("/response/comment()") == b""
    assert filtered("concat('<', '&')") == b"&lt;&amp;"


def test_xpathfilter_of_the_root_answers_the_whole_response() -> None:
    """XPath's `/` selects the document node, which lxml leaves out of a node-set: the answer was empty, as if it
    selected nothing. Its copy is the `<response>` it holds, as `/*` answers it; it is first in document order."""
    whole = filtered("/*")
    assert whole.startswith(b'<response node="n" rows="2" status="OK"><workflow id="1" name="a"/>'), whole
    for expression in ("/", "(/)", "/.", "/self::node()", "/response/..", "/ | //workflow", "//node()"):
        assert filtered(expression) == whole, expression
    assert filtered("//workflow/ancestor::node()[last()]") == whole  # the farthest ancestor: the document
    assert filtered("count(/) + count(/response/..)") == b"2"
    assert filtered("/response/workflow | /response/workflow/@id") == b'<workflow id="1" name="a"/>'


def test_xpathfilter_leaves_the_response_untouched() -> None:
    root = listing()
    apply_xpathfilter(root, "workflow")
    assert len(root) == 2


def test_xpathfilter_predicates_keep_their_meaning() -> None:
    """Each step gets a predicate that keeps every node and lets the evaluation be cut short; positions (forward
    and reverse axes), unions, node type tests and brackets inside strings are untouched by it."""
    b = b'<workflow id="2" name="b"/>'
    assert filtered("/response/workflow[2]/preceding-sibling::*[1]") == b'<workflow id="1" name="a"/>'
    assert filtered("//workflow[@id='2']/ancestor-or-self::*[last()]").startswith(b'<response node="n"')
    assert filtered("(//workflow[@name='b'] | //nothing)[1]") == b
    assert filtered("/response/node()[2]") == b
    assert filtered("/response/workflow[2]") == b
    assert filtered("(/response/workflow)[last()]") == b
    assert filtered("/response/workflow[position() > 1][1]") == b
    assert filtered("/response/workflow[@name != ']' and @id = '2']") == b
    assert filtered('/response/workflow[@name = "b" or @name = "["]') == b


@pytest.mark.parametrize(
    ("rows", "expression"),
    [
        (30, "/*" + "[count(//*" * 10 + ")]" * 10),  # nested predicates multiply: 12 levels held the loop 17 s
        (3000, "//*" + "/following::*" * 40),  # and so do chained steps: 27 s on a list of 1,500 instances
    ],
    ids=["nested predicates", "chained steps"],
)
def test_an_xpathfilter_that_would_run_for_ages_is_cut_short(rows: int, expression: str) -> None:
    big = response_element("n", {"rows": rows}, [element("workflow", {"id": n, "name": str(n)}) for n in range(rows)])
    with pytest.raises(errors.InvalidParams, match=r"took longer than 0.5 s to evaluate: refused") as caught:
        apply_xpathfilter(big, expression)
    assert evqueue_code(caught.value) == "INVALID_PARAMETER"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("workflow[", "Invalid xpathfilter"),
        ("re:test('a', '(a+)+$')", "Invalid xpathfilter"),
        ("document('file:///etc/passwd')", "Invalid xpathfilter"),
        ("x" * 5000, "longer than 4096"),
        # `jobd:` is bound for the steps jobd adds; a client's call of its function was refused with Python's words
        # about apply_xpathfilter.<locals>.tick(): its TypeError was taken for lxml's refusal of the expression.
        ("workflow[jobd:tick(.)]", r"jobd:tick\(\) is jobd's own function, which takes no arguments"),
    ],
)
def test_xpathfilter_errors_are_clear_invalid_parameter_errors(expression: str, message: str) -> None:
    with pytest.raises(errors.InvalidParams, match=message) as caught:
        apply_xpathfilter(listing(), expression)
    assert evqueue_code(caught.value) == "INVALID_PARAMETER"
    assert b'status="KO"' in response_error("n", caught.value)


@pytest.mark.parametrize("not_a_response", [None, "<response/>"])
def test_xpathfilter_failures_that_are_not_the_expressions_are_not_called_invalid_parameters(
    not_a_response: object,
) -> None:
    """lxml's TypeError on what it is asked to search, a bug of jobd's own, was answered as an invalid xpathfilter
    (every TypeError and ValueError was taken for one): it reaches the caller as it is, to be logged as a bug."""
    with pytest.raises(TypeError, match=r"^Invalid input object"):
        apply_xpathfilter(not_a_response, "/response")  # type: ignore[arg-type]
