"""evQueue's XML socket protocol: framing, request decoding into commands, responses, the greeting, error codes.

Bytes in, values out, bytes back: nothing here calls the engine or touches a socket. A connection feeds what it
reads to an `XmlFramer`, which cuts the stream into one XML document per request; `parse_request` parses a document
with jobd's hardened parser (`jobd.safexml`) into a `Request`; `decode_command` turns that into one frozen command
value (`InstanceLaunch`, `InstancesList`, …) or raises the error evQueue would answer. `response_element` (then
`serialize`), `response_error` and `greeting` make the bytes sent back. docs/evqueue-protocol.md is the user-facing
account.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum, auto
from types import MappingProxyType
from typing import ClassVar, Final

from lxml import etree

from jobd import safexml
from jobd.errors import FrameTooLarge, InvalidParams, InvalidXml, JobdError, UnknownCommand
from jobd.model import MAX_PAGE, OBJECT_NAME, OBJECT_NAME_RULE, evqueue_boolean
from jobd.xpathdocument import selects_the_document
from jobd.xpathlex import NODE_TYPES, XPathError, number_string, tokenize

MAX_FRAME: Final = 1024 * 1024  # bytes in one request document, from its first `<` to the `>` closing its root
MAX_DEPTH: Final = 64  # elements nested in a request; evQueue's requests use two levels
MAX_XPATHFILTER: Final = 4096  # characters in an xpathfilter expression
# Attributes on a request's root element. evQueue's requests carry a few (its web UI's `instances list`, the most, about
# twenty); reading them is quadratic in lxml (each value is looked up by name along the element's attribute list), so
# a request of 1 MiB made of tiny attributes would hold jobd's event loop for tens of seconds, for every client.
MAX_ATTRIBUTES: Final = 256

KEEPALIVE: Final = b"<ping />\n"  # written while a client waits (synchronous launch, instance wait)


# ---------------------------------------------------------------------------------------------------------------
# Errors only this protocol distinguishes. They are INVALID_PARAMS to the rest of jobd; evQueue clients see the
# finer code evQueue sends (`evqueue_code`).


class MissingParameter(InvalidParams):
    evqueue_code: ClassVar[str] = "MISSING_PARAMETER"


class InvalidInteger(InvalidParams):
    evqueue_code: ClassVar[str] = "INVALID_INTEGER"


class InvalidBoolean(InvalidParams):
    evqueue_code: ClassVar[str] = "INVALID_BOOLEAN"


class UnknownType(InvalidParams):
    """`status query` or `statistics query` with a `type` that does not exist."""

    evqueue_code: ClassVar[str] = "UNKNOWN_TYPE"


class InvalidModule(InvalidParams):
    """`control reload` with a `module` that does not exist."""

    evqueue_code: ClassVar[str] = "INVALID_MODULE"


class UnknownObject(InvalidParams):
    """`queue get`, `workflow_schedule get` or `retry_schedule get` with an id that numbers nothing: evQueue's code
    for an id its list of such objects does not hold."""

    evqueue_code: ClassVar[str] = "UNKNOWN_OBJECT"


# jobd's codes that evQueue spells differently. Codes evQueue shares with jobd (UNKNOWN_QUEUE, UNKNOWN_INSTANCE,
# UNKNOWN_WORKFLOW, INVALID_WORKFLOW_PARAMETERS, TIMED_OUT, INSUFFICIENT_RIGHTS, INVALID_XML, UNKNOWN_COMMAND) and
# jobd's own conditions evQueue has no code for (FRAME_TOO_LARGE, SHUTTING_DOWN, …) go out unchanged.
_EVQUEUE_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "INVALID_PARAMS": "INVALID_PARAMETER",
        "PARSE_ERROR": "INVALID_XML",
        "INVALID_REQUEST": "INVALID_XML",
        "METHOD_NOT_FOUND": "UNKNOWN_COMMAND",
        "INTERNAL_ERROR": "UNEXPECTED_EXCEPTION",
    }
)


def evqueue_code(error: JobdError) -> str:
    """The `error-code` an evQueue client sees for `error`."""
    refined = getattr(type(error), "evqueue_code", None)
    if isinstance(refined, str):
        return refined
    return _EVQUEUE_CODES.get(error.code, error.code)


# ---------------------------------------------------------------------------------------------------------------
# Framing


class _Scan(Enum):
    """Where the framer is in the byte stream."""

    OUTSIDE_ROOT = auto()  # between documents, or in a prolog (XML declaration, comments, PIs) before the root
    CONTENT = auto()  # inside the root element, between markup
    START_TAG = auto()  # after `<name`, until the `>` not inside a quoted attribute value
    END_TAG = auto()  # after `</`, until `>`
    COMMENT = auto()  # after `<!--`, until `-->`
    PROCESSING_INSTRUCTION = auto()  # after `<?`, until `?>`
    CDATA = auto()  # after `<![CDATA[`, until `]]>`


_NOT_WHITESPACE: Final = re.compile(rb"[^ \t\r\n]")
_COMMENT_OPEN: Final = b"<!--"
_CDATA_OPEN: Final = b"<![CDATA["
_TAG_END_OR_QUOTE: Final = re.compile(rb"[>\"']")
_CLOSERS: Final[Mapping[_Scan, bytes]] = MappingProxyType(
    {
        _Scan.END_TAG: b">",
        _Scan.COMMENT: b"-->",
        _Scan.PROCESSING_INSTRUCTION: b"?>",
        _Scan.CDATA: b"]]>",
    }
)


def _starts_name(byte: int) -> bool:
    # A name may start with any non-ASCII character; in ASCII only letters, `_` and `:`.
    return byte >= 0x80 or chr(byte).isalpha() or byte in b"_:"


_BOM: Final = b"\xef\xbb\xbf"
_DECLARATION: Final = b"<?xml "  # or another blank after `xml`: see _is_declaration


def _is_declaration(buffer: bytearray, start: int) -> bool:
    """Whether the `<?` at `start` opens an XML declaration (`<?xml` and a blank), not a processing instruction whose
    target merely begins with xml."""
    return buffer[start : start + 5] == b"<?xml" and bytes(buffer[start + 5 : start + 6]) in (b" ", b"\t", b"\r", b"\n")


class XmlFramer:
    """Cuts a byte stream into request documents, each complete as soon as its root element closes.

    The scanner never parses: it follows tags, quoted attribute values, comments, processing instructions and CDATA
    sections far enough to know the element depth, so that `>` or `/>` inside a comment or a value cannot end a
    document early and entities never come into play. Well-formedness is left to `parse_request`; a document that
    fails there is answered with an error and the stream goes on, because its end was found. A framing error (a
    document over the size limit, too deep, or bytes that cannot start a document such as text or a DOCTYPE) is
    different: the rest of the stream cannot be told apart, so the connection answers the error and closes.
    """

    def __init__(self, max_frame: int = MAX_FRAME, max_depth: int = MAX_DEPTH) -> None:
        self.max_frame = max_frame
        self.max_depth = max_depth
        self._buffer = bytearray()
        self._scan = _Scan.OUTSIDE_ROOT
        self._pos = 0  # next byte of _buffer to look at
        self._document_start: int | None = None  # index of the current document's first `<`
        self._depth = 0
        self._quote: int | None = None  # the quote byte of the attribute value being scanned, in START_TAG
        self._tag_start = 0  # index of the `<` of the start tag being scanned
        self._failure: JobdError | None = None
        self._stopped_at_limit = False  # the last feed returned its `limit` of documents, maybe before the end

    @property
    def holds_more(self) -> bool:
        """The last `feed` stopped at its `limit`: the bytes it was given may hold more documents (or an error),
        which the next call (`feed(b"")` will do) cuts out."""
        return self._stopped_at_limit

    @property
    def failed(self) -> bool:
        """A framing error was met; `feed` raises it (again) on every call."""
        return self._failure is not None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete document held back (at end of stream: a request cut short)."""
        return 0 if self._document_start is None else len(self._buffer) - self._document_start

    def feed(self, data: bytes, limit: int | None = None) -> list[bytes]:
        """Add bytes read from the peer; return every request document they complete, in order, or the first
        `limit` of them: the bytes after those are scanned by the next call (`holds_more` says there may be some).
        One read holds up to 65,000 tiny documents, and cutting them all at once takes a third of a second.

        A framing error raises FrameTooLarge or InvalidXml. When documents completed before the error in the same
        call, they are returned first and the error is raised by the next call: the caller answers them, sees
        `failed`, and calls `feed(b"")` to get the error to answer before closing.
        """
        if self._failure is not None:
            raise self._failure
        self._buffer += data
        documents: list[bytes] = []
        self._stopped_at_limit = False
        try:
            while limit is None or len(documents) < limit:
                if (document := self._next_document()) is None:
                    break
                documents.append(document)
            else:
                self._stopped_at_limit = True
        except JobdError as error:
            self._failure = error
            self._buffer.clear()
            if not documents:
                raise
        self._drop_consumed()
        return documents

    def _drop_consumed(self) -> None:
        keep_from = self._pos if self._document_start is None else self._document_start
        if keep_from:
            del self._buffer[:keep_from]
            self._pos -= keep_from
            self._tag_start -= keep_from
            if self._document_start is not None:
                self._document_start -= keep_from

    def _next_document(self) -> bytes | None:
        """Scan on from `_pos`; return the document whose root just closed, or None when more bytes are needed."""
        buffer = self._buffer
        while self._pos < len(buffer):
            if self._scan is _Scan.OUTSIDE_ROOT:
                if not self._outside_root():
                    break
            elif self._scan is _Scan.CONTENT:
                if not self._in_content():
                    break
            elif self._scan is _Scan.START_TAG:
                if not self._in_start_tag():
                    break
                if self._depth == 0:
                    return self._take_document()
            else:
                closer = _CLOSERS[self._scan]
                end = buffer.find(closer, self._pos)
                if end < 0:
                    # The closer may be cut between two reads: look again at its first bytes next time.
                    self._pos = max(self._pos, len(buffer) - len(closer) + 1)
                    break
                self._pos = end + len(closer)
                if self._scan is _Scan.END_TAG:
                    self._depth -= 1
                    if self._depth == 0:
                        self._scan = _Scan.OUTSIDE_ROOT
                        return self._take_document()
                self._scan = _Scan.CONTENT if self._depth else _Scan.OUTSIDE_ROOT
        self._check_size(len(buffer))
        return None

    def _take_document(self) -> bytes:
        assert self._document_start is not None
        self._check_size(self._pos)
        document = bytes(self._buffer[self._document_start : self._pos])
        self._document_start = None
        return document

    def _check_size(self, end: int) -> None:
        if self._document_start is not None and end - self._document_start > self.max_frame:
            raise FrameTooLarge(f"request is larger than {self.max_frame} bytes", limit=self.max_frame)

    def _outside_root(self) -> bool:
        """Between documents or in a prolog: whitespace, `<?…?>`, `<!--…-->`, then the root's start tag."""
        buffer = self._buffer
        found = _NOT_WHITESPACE.search(buffer, self._pos)
        if found is None:
            self._pos = len(buffer)  # dropped with the consumed bytes unless a prolog has begun
            return False
        self._pos = found.start()
        byte = buffer[self._pos]
        if byte == _BOM[0]:
            # A UTF-8 byte order mark, which some clients put before each document: not text, and not kept. It only
            # ever starts a document: markup scanned since the last one was that one's trailing markup (see below).
            seen = bytes(buffer[self._pos : self._pos + len(_BOM)])
            if seen == _BOM:
                self._document_start = None
                self._pos += len(_BOM)
                return True
            if _BOM.startswith(seen):
                return False  # the rest of it is still to come
        if byte != ord("<"):
            raise InvalidXml(f"text outside the root element (byte {bytes([byte])!r}); a request is one XML element")
        if self._pos + 1 >= len(buffer):
            return False
        follower = buffer[self._pos + 1]
        if follower == ord("?"):
            seen = bytes(buffer[self._pos : self._pos + len(_DECLARATION)])
            if _DECLARATION.startswith(seen) and len(seen) < len(_DECLARATION):
                return False  # could still be a declaration: wait for the bytes that tell
            if _is_declaration(buffer, self._pos) and self._document_start is not None:
                # An XML declaration only ever starts a document: the comments or processing instructions scanned
                # since the last one were that one's trailing markup (legal after its root), not this one's prolog.
                self._document_start = None
            return self._open(_Scan.PROCESSING_INSTRUCTION, 2)
        if follower == ord("!"):
            opening = bytes(buffer[self._pos : self._pos + len(_COMMENT_OPEN)])
            if opening == _COMMENT_OPEN:
                return self._open(_Scan.COMMENT, len(_COMMENT_OPEN))
            if _COMMENT_OPEN.startswith(opening):
                return False
            if opening.startswith(b"<!D"):
                raise InvalidXml(f"request: {safexml.DTD_REFUSED}")
            raise InvalidXml(f"request: markup {opening!r} is not allowed before the root element")
        if follower == ord("/"):
            raise InvalidXml("end tag outside the root element")
        if not _starts_name(follower):
            raise InvalidXml(f"{bytes(buffer[self._pos : self._pos + 2])!r} does not start an element")
        self._start_tag()
        return True

    def _in_content(self) -> bool:
        """Inside the root: skip text up to the next `<` and find out what it opens."""
        buffer = self._buffer
        less_than = buffer.find(b"<", self._pos)
        if less_than < 0:
            self._pos = len(buffer)
            return False
        self._pos = less_than
        if less_than + 1 >= len(buffer):
            return False
        follower = buffer[less_than + 1]
        if follower == ord("/"):
            return self._open(_Scan.END_TAG, 2)
        if follower == ord("?"):
            return self._open(_Scan.PROCESSING_INSTRUCTION, 2)
        if follower == ord("!"):
            for opening, scan in ((_COMMENT_OPEN, _Scan.COMMENT), (_CDATA_OPEN, _Scan.CDATA)):
                seen = bytes(buffer[less_than : less_than + len(opening)])
                if seen == opening:
                    return self._open(scan, len(opening))
                if opening.startswith(seen):
                    return False  # could still become this opening: wait for more bytes
            raise InvalidXml(f"request: {safexml.DTD_REFUSED}")
        if not _starts_name(follower):
            raise InvalidXml(f"{bytes(buffer[less_than : less_than + 2])!r} does not start an element")
        self._start_tag()
        return True

    def _open(self, scan: _Scan, opening_length: int) -> bool:
        if self._document_start is None:
            self._document_start = self._pos
        self._scan = scan
        self._pos += opening_length
        return True

    def _start_tag(self) -> None:
        if self._document_start is None:
            self._document_start = self._pos
        self._tag_start = self._pos
        self._scan = _Scan.START_TAG
        self._quote = None
        self._pos += 1

    def _in_start_tag(self) -> bool:
        """Find the `>` ending the start tag, skipping quoted values; True once it is found."""
        buffer = self._buffer
        while True:
            if self._quote is not None:
                closing = buffer.find(self._quote, self._pos)
                if closing < 0:
                    self._pos = len(buffer)
                    return False
                self._pos = closing + 1
                self._quote = None
            found = _TAG_END_OR_QUOTE.search(buffer, self._pos)
            if found is None:
                self._pos = len(buffer)
                return False
            if found.group() != b">":
                self._quote = found.group()[0]
                self._pos = found.end()
                continue
            greater_than = found.start()
            self._pos = greater_than + 1
            # `/` right before `>` and outside a value (a value ends with its quote) makes an empty-element tag.
            empty = greater_than - 1 > self._tag_start and buffer[greater_than - 1] == ord("/")
            if not empty:
                self._depth += 1
                if self._depth > self.max_depth:
                    raise InvalidXml(f"request nests elements more than {self.max_depth} deep")
            self._scan = _Scan.CONTENT if self._depth else _Scan.OUTSIDE_ROOT
            return True


# ---------------------------------------------------------------------------------------------------------------
# Requests


_INTEGER: Final = re.compile(r"[+-]?[0-9]{1,19}")
_INT64: Final = range(-(2**63), 2**63)
_DATE_FORMATS: Final = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request: evQueue's meaning comes from the root's name (the group) and attributes only."""

    group: str
    action: str  # "" when the root has no action attribute (ping, quit)
    attributes: Mapping[str, str]
    parameters: Mapping[str, str]  # <parameter name="…" value="…"/> children of the root, in document order
    xpathfilter: str | None = None

    def optional_string(self, name: str) -> str | None:
        return self.attributes.get(name)

    def string(self, name: str) -> str:
        value = self.attributes.get(name)
        if value is None:
            raise MissingParameter(f"Missing parameter '{name}'", parameter=name)
        return value

    def optional_integer(
        self, name: str, default: int | None = None, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        text = self.attributes.get(name)
        if text is None:
            return default
        stripped = text.strip()
        if not _INTEGER.fullmatch(stripped) or int(stripped) not in _INT64:
            raise InvalidInteger(f"Parameter '{name}' must be an integer, not '{text}'", parameter=name)
        value = int(stripped)
        if minimum is not None and value < minimum:
            raise InvalidParams(f"Parameter '{name}' must be at least {minimum}, not {value}", parameter=name)
        if maximum is not None and value > maximum:
            raise InvalidParams(f"Parameter '{name}' must be at most {maximum}, not {value}", parameter=name)
        return value

    def object_name(self, name: str) -> str:
        """A workflow's name: what a workflow file could be called, nothing else (no NUL, `/` or `..`)."""
        value = self.string(name)
        if not OBJECT_NAME.fullmatch(value):
            raise InvalidParams(f"Parameter '{name}' must be {OBJECT_NAME_RULE}, not '{value}'", parameter=name)
        return value

    def integer(self, name: str, minimum: int | None = None) -> int:
        self.string(name)
        value = self.optional_integer(name, minimum=minimum)
        assert value is not None
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """evQueue's booleans: `yes`, `no`, or an integer (non-zero is true)."""
        text = self.attributes.get(name)
        if text is None:
            return default
        value = evqueue_boolean(text)
        if value is not None:
            return value
        raise InvalidBoolean(f"Parameter '{name}' must be 'yes', 'no' or an integer, not '{text}'", parameter=name)

    def choice(
        self,
        name: str,
        allowed: Iterable[str],
        default: str | None = None,
        error: type[InvalidParams] = InvalidParams,
        *,
        ignore_case: bool = False,
    ) -> str:
        """One of `allowed` (in its spelling there, with `ignore_case`); missing means `default`, or
        MISSING_PARAMETER when there is none. A refused value is quoted as the client sent it."""
        options = tuple(allowed)
        text = self.attributes.get(name)
        if text is None:
            if default is None:
                raise MissingParameter(f"Missing parameter '{name}'; allowed: {', '.join(options)}", parameter=name)
            return default
        chosen = text
        if ignore_case:
            chosen = next((option for option in options if option.casefold() == text.casefold()), text)
        if chosen not in options:
            raise error(
                f"Invalid value '{text}' for parameter '{name}'; allowed: {', '.join(options)}",
                parameter=name,
                allowed=list(options),
            )
        return chosen

    def optional_datetime(self, name: str) -> datetime | None:
        """A local time as evQueue writes them, `YYYY-MM-DD HH:MM:SS` (seconds, or the time, may be left out)."""
        text = self.attributes.get(name)
        if text is None or text == "":
            return None
        for layout in _DATE_FORMATS:
            try:
                return datetime.strptime(text, layout)
            except ValueError:
                continue
        raise InvalidParams(
            f"Parameter '{name}' must be a date 'YYYY-MM-DD HH:MM:SS' (or 'YYYY-MM-DD HH:MM', 'YYYY-MM-DD'), "
            f"not '{text}'",
            parameter=name,
        )

    def prefixed(self, prefix: str) -> Mapping[str, str]:
        """Attributes named `<prefix><name>`, keyed by name (evQueue's `parameter_…`, `customattribute_…`)."""
        return MappingProxyType(
            {
                key[len(prefix) :]: value
                for key, value in self.attributes.items()
                if key.startswith(prefix) and key != prefix
            }
        )


def parse_request(document: bytes) -> Request:
    """Parse one framed document (no DTD, no entities, no network) into a Request; InvalidXml if ill-formed."""
    root = safexml.parse(document, "request")
    if not isinstance(root.tag, str):  # pragma: no cover - the root of a parsed document is always an element
        raise InvalidXml("request has no root element")
    count = len(root.attrib)  # counted along the list once, before any value is looked up
    if count > MAX_ATTRIBUTES:
        raise InvalidXml(f"request has {count} attributes on <{root.tag}>; at most {MAX_ATTRIBUTES} are allowed")
    attributes = {str(key): str(value) for key, value in root.attrib.items()}
    parameters: dict[str, str] = {}
    for child in root.iterchildren("parameter"):
        name = child.get("name")
        value = child.get("value", "")  # evQueue reads it through the DOM, where a missing attribute is ""
        if name is None:
            raise MissingParameter("Missing attribute 'name' on <parameter>", parameter="name")
        if name in parameters:
            raise InvalidParams(f"Parameter '{name}' is given twice", parameter=name)
        parameters[name] = value
    xpathfilter = attributes.pop("xpathfilter", None)
    return Request(
        group=root.tag,
        action=attributes.get("action", ""),
        attributes=MappingProxyType(attributes),
        parameters=MappingProxyType(parameters),
        xpathfilter=xpathfilter,
    )


# ---------------------------------------------------------------------------------------------------------------
# Commands: what a request asks for, checked and typed. Handlers elsewhere execute them.


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    """Close the connection without an answer."""


@dataclass(frozen=True, slots=True)
class InstanceLaunch:
    name: str
    synchronous: bool = False
    timeout: int | None = None  # seconds a synchronous launch waits; None: no limit (evQueue's 0)
    user: str | None = None  # default SSH user and host for the instance's tasks
    host: str | None = None
    comment: str | None = None
    parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class InstanceQuery:
    instance_id: int


@dataclass(frozen=True, slots=True)
class InstanceWait:
    instance_id: int
    timeout: int | None = None  # seconds; None: no limit (evQueue's 0 or no attribute)


@dataclass(frozen=True, slots=True)
class InstanceCancel:
    instance_id: int


@dataclass(frozen=True, slots=True)
class InstanceKillTask:
    instance_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class InstanceDelete:
    instance_id: int


@dataclass(frozen=True, slots=True)
class InstanceDebugResume:
    instance_id: int


class InstanceStatus(Enum):
    EXECUTING = "EXECUTING"
    TERMINATED = "TERMINATED"
    ABORTED = "ABORTED"


class GroupBy(Enum):
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"
    YEAR = "year"


_STATUSES: Final = tuple(member.value for member in InstanceStatus)
_GROUPINGS: Final = tuple(member.value for member in GroupBy)


@dataclass(frozen=True, slots=True)
class InstancesList:
    filter_id: int | None = None
    filter_workflow: str | None = None  # workflow name
    filter_launched_from: datetime | None = None  # local times, as evQueue writes them
    filter_launched_until: datetime | None = None
    filter_ended_from: datetime | None = None
    filter_ended_until: datetime | None = None
    filter_status: InstanceStatus | None = None
    filter_error: bool | None = None  # True: only instances with errors; None: no filter (evQueue's "no" as well)
    filter_schedule_id: int | None = None
    filter_tag_id: int | None = None
    filter_node: str | None = None  # a node name; jobd is one node
    limit: int = 30
    offset: int = 0
    groupby: GroupBy | None = None
    parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # launch parameter values
    custom_attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class StatusWorkflows:
    """The running instances (shallow)."""

    limit: int | None = None


@dataclass(frozen=True, slots=True)
class StatusScheduler:
    """The next run of every active schedule."""


@dataclass(frozen=True, slots=True)
class StatusConfiguration:
    """The running configuration as name/value entries."""


@dataclass(frozen=True, slots=True)
class StatisticsGlobal:
    pass


@dataclass(frozen=True, slots=True)
class StatisticsQueues:
    pass


@dataclass(frozen=True, slots=True)
class QueuePoolList:
    pass


@dataclass(frozen=True, slots=True)
class QueueGet:
    queue_id: int  # as `queuepool list` numbers the queues


@dataclass(frozen=True, slots=True)
class WorkflowsList:
    full: bool = False  # include each workflow's definition


@dataclass(frozen=True, slots=True)
class WorkflowGet:
    """Exactly one of `workflow_id` and `name` is set."""

    workflow_id: int | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowSchedulesList:
    display_parameters: bool = False


@dataclass(frozen=True, slots=True)
class WorkflowScheduleGet:
    schedule_id: int  # as `workflow_schedules list` numbers the schedules


@dataclass(frozen=True, slots=True)
class RetrySchedulesList:
    pass


@dataclass(frozen=True, slots=True)
class RetryScheduleGet:
    schedule_id: int  # as `retry_schedules list` numbers the retry schedules


RELOAD_MODULES: Final = (
    "all",
    "queuepool",
    "workflows",
    "users",
    "tags",
    "notifications",
    "retry_schedules",
    "scheduler",
    "launchers",
    "displays",
    "channels",
    "channel_groups",
    "alerts",
)


@dataclass(frozen=True, slots=True)
class ProcessManagerTail:
    """The end of a task's output: `tid` is the id of the task's job, as its instance document shows it."""

    tid: int
    stream: str  # stdout, stderr or log (evQueue's `type`)


@dataclass(frozen=True, slots=True)
class ControlReload:
    module: str = "all"  # one of RELOAD_MODULES; evQueue reloads that part, jobd may reload everything
    notify: bool = True  # evQueue forwards the reload to its cluster nodes; jobd has no cluster yet


Command = (
    Ping
    | Quit
    | InstanceLaunch
    | InstanceQuery
    | InstanceWait
    | InstanceCancel
    | InstanceKillTask
    | InstanceDelete
    | InstanceDebugResume
    | InstancesList
    | StatusWorkflows
    | StatusScheduler
    | StatusConfiguration
    | StatisticsGlobal
    | StatisticsQueues
    | QueuePoolList
    | QueueGet
    | WorkflowsList
    | WorkflowGet
    | WorkflowSchedulesList
    | WorkflowScheduleGet
    | RetrySchedulesList
    | RetryScheduleGet
    | ProcessManagerTail
    | ControlReload
)


def _timeout(request: Request) -> int | None:
    seconds = request.optional_integer("timeout", minimum=0)
    return seconds or None  # evQueue: 0 means no limit


def _instance_id(request: Request) -> int:
    return request.integer("id", minimum=1)


def _instance_launch(request: Request) -> InstanceLaunch:
    mode = request.choice("mode", ("asynchronous", "synchronous"), default="asynchronous")
    return InstanceLaunch(
        name=request.object_name("name"),
        synchronous=mode == "synchronous",
        timeout=_timeout(request),
        user=request.optional_string("user") or None,
        host=request.optional_string("host") or None,
        comment=request.optional_string("comment"),
        parameters=request.parameters,
    )


_FILTERS: Final = ("filter_", "parameter_", "customattribute_")


def _instances_list(request: Request) -> InstancesList:
    # evQueue's web UI sends every filter, empty when unused: an empty filter is no filter. So are empty
    # `parameter_…` and `customattribute_…` attributes, which evQueue skips (<parameter> children it does not).
    request = replace(
        request,
        attributes=MappingProxyType(
            {key: value for key, value in request.attributes.items() if value or not key.startswith(_FILTERS)}
        ),
    )
    status = None
    if "filter_status" in request.attributes:  # evQueue's MySQL compares it to an ENUM, whose collation ignores case
        status = InstanceStatus(request.choice("filter_status", _STATUSES, ignore_case=True))
    groupby = request.attributes.get("groupby") or None
    # evQueue takes parameter filters both as `parameter_<name>` attributes and as <parameter> children.
    parameters = {**request.prefixed("parameter_"), **request.parameters}
    return InstancesList(
        filter_id=request.optional_integer("filter_id", minimum=0) or None,  # evQueue: 0 is no filter
        filter_workflow=request.optional_string("filter_workflow"),
        filter_launched_from=request.optional_datetime("filter_launched_from"),
        filter_launched_until=request.optional_datetime("filter_launched_until"),
        filter_ended_from=request.optional_datetime("filter_ended_from"),
        filter_ended_until=request.optional_datetime("filter_ended_until"),
        filter_status=status,
        # A switch in evQueue: "yes" keeps the instances with errors, "no" keeps them all (not only those without).
        filter_error=request.boolean("filter_error", False) or None,
        filter_schedule_id=request.optional_integer("filter_schedule_id", minimum=0) or None,
        filter_tag_id=request.optional_integer("filter_tag_id", minimum=0) or None,
        filter_node=request.optional_string("filter_node"),
        # Rows are read and built with the event loop waiting (their summaries parsed): at most a JSON-RPC page's
        # worth in one answer, paged with offset. Groups are counted in slices, the loop running between them.
        limit=request.optional_integer("limit", default=30, minimum=0, maximum=None if groupby else MAX_PAGE) or 0,
        offset=request.optional_integer("offset", default=0, minimum=0) or 0,
        groupby=None if groupby is None else GroupBy(request.choice("groupby", _GROUPINGS)),
        parameters=MappingProxyType(parameters),
        custom_attributes=request.prefixed("customattribute_"),
    )


def _status_query(request: Request) -> Command:
    kind = request.choice("type", ("workflows", "scheduler", "configuration"), error=UnknownType)
    if kind == "workflows":
        # evQueue (WorkflowInstances::SendStatus): a limit of 0 is no limit.
        return StatusWorkflows(limit=request.optional_integer("limit", minimum=0) or None)
    return StatusScheduler() if kind == "scheduler" else StatusConfiguration()


def _statistics_query(request: Request) -> Command:
    kind = request.choice("type", ("global", "queue"), error=UnknownType)
    return StatisticsGlobal() if kind == "global" else StatisticsQueues()


def _workflow_get(request: Request) -> WorkflowGet:
    if "id" in request.attributes and "name" in request.attributes:
        raise InvalidParams("Give parameter 'id' or 'name', not both", parameter="id")
    if "name" in request.attributes:
        return WorkflowGet(name=request.object_name("name"))
    if "id" not in request.attributes:
        raise MissingParameter("Missing parameter 'id' (or 'name')", parameter="id")
    return WorkflowGet(workflow_id=request.integer("id", minimum=1))


def _control_reload(request: Request) -> ControlReload:
    return ControlReload(
        module=request.choice("module", RELOAD_MODULES, default="all", error=InvalidModule),
        notify=request.boolean("notify", True),
    )


TAIL_STREAMS: Final = ("stdout", "stderr", "log")  # evQueue's `type`, the names of jobd's output streams

# (group, action) → decoder. ping and quit ignore their action, as evQueue does.
_DECODERS: Final[Mapping[tuple[str, str], Callable[[Request], Command]]] = MappingProxyType(
    {
        ("instance", "launch"): _instance_launch,
        ("instance", "query"): lambda request: InstanceQuery(_instance_id(request)),
        ("instance", "wait"): lambda request: InstanceWait(_instance_id(request), _timeout(request)),
        ("instance", "cancel"): lambda request: InstanceCancel(_instance_id(request)),
        ("instance", "killtask"): lambda request: InstanceKillTask(
            _instance_id(request), request.integer("pid", minimum=1)
        ),
        ("instance", "delete"): lambda request: InstanceDelete(_instance_id(request)),
        ("instance", "debugresume"): lambda request: InstanceDebugResume(_instance_id(request)),
        ("instances", "list"): _instances_list,
        ("status", "query"): _status_query,
        ("statistics", "query"): _statistics_query,
        ("queuepool", "list"): lambda request: QueuePoolList(),
        # evQueue takes any integer id; one that numbers nothing is UNKNOWN_OBJECT (the handlers), 0 as well.
        ("queue", "get"): lambda request: QueueGet(request.integer("id")),
        ("workflows", "list"): lambda request: WorkflowsList(full=request.boolean("full", False)),
        ("workflow", "get"): _workflow_get,
        ("workflow_schedules", "list"): lambda request: WorkflowSchedulesList(
            display_parameters=request.boolean("display_parameters", False)
        ),
        ("workflow_schedule", "get"): lambda request: WorkflowScheduleGet(request.integer("id")),
        ("retry_schedules", "list"): lambda request: RetrySchedulesList(),
        ("retry_schedule", "get"): lambda request: RetryScheduleGet(request.integer("id")),
        ("processmanager", "tail"): lambda request: ProcessManagerTail(
            request.integer("tid", minimum=1), request.choice("type", TAIL_STREAMS)
        ),
        ("control", "reload"): _control_reload,
    }
)

COMMANDS: Final = frozenset({"ping", "quit"} | {f"{group} {action}" for group, action in _DECODERS})

# evQueue commands its clients send that jobd does not serve, each with why and what to use instead: their
# UNKNOWN_COMMAND says so (docs/evqueue-protocol.md, "Commands jobd does not serve").
NOT_SERVED: Final[Mapping[tuple[str, str], str]] = MappingProxyType(
    {
        ("datastore", "get"): (
            "not served by jobd: jobd has no datastore and gives no task output a datastore-id; the instance "
            "document (`instance query`) holds each output, and `jobctl log TID` (JSON-RPC job.output) reads a "
            "task's job's output whole"
        ),
        ("xpath", "parse"): (
            "not served by jobd: workflows are files, whose XPath expressions jobd checks whole when it reads them; "
            "check a workflow with `jobd --check-config`, or by `control reload` (CONFIG_INVALID names the error)"
        ),
        ("control", "retry"): (
            "not served by jobd: no command brings a retry forward; a task waiting for one runs at its retry_at, "
            "which `instance query` shows"
        ),
    }
    # evQueue keeps its definitions in MySQL and edits them through the API; jobd reads them from files. A script or
    # an administrator moving over from evQueue sends these first: say where each definition goes now.
    | {
        (group, action): f"not served by jobd: {where}"
        for group, actions, where in (
            (
                "queue",
                ("create", "edit", "delete"),
                "queues are defined in jobd's configuration: a [queue.NAME] table (concurrency, scheduler) in a "
                "drop-in such as /etc/jobd/jobd.d/queues.toml, applied by `control reload` (jobd.toml(5))",
            ),
            (
                "workflow",
                ("create", "edit", "delete"),
                "workflows are files: save the definition (as `workflow get` shows it) as workflows/NAME.xml in "
                "jobd's configuration directory (/etc/jobd/workflows/NAME.xml), or remove that file, then "
                "`control reload` (jobd-workflow(5))",
            ),
            (
                "workflow_schedule",
                ("create", "edit", "delete"),
                "schedules are defined in jobd's configuration: a [schedule.NAME] table with workflow, calendar "
                "(evQueue's schedule string, as it is), parameters and on_failure, in a drop-in of "
                "/etc/jobd/jobd.d/, applied by `control reload` (jobd.toml(5))",
            ),
            (
                "workflow_schedule",
                ("lock", "unlock"),
                "schedules are named in jobd's configuration: `jobctl schedule disable NAME` locks one and "
                "`jobctl schedule enable NAME` unlocks it (JSON-RPC schedule.disable, schedule.enable)",
            ),
            (
                "retry_schedule",
                ("create", "edit", "delete"),
                "retry schedules are defined in jobd's configuration: a [retry_schedule.NAME] table, "
                "levels = [{ delay = RETRY_DELAY, times = RETRY_TIMES }, ...], in a drop-in of /etc/jobd/jobd.d/, "
                "applied by `control reload` (jobd.toml(5))",
            ),
            (
                "user",
                ("create", "edit", "delete", "change_password", "grant", "revoke", "clear_rights"),
                "local clients are the system's users, named by the kernel; what they may do is [access] in jobd's "
                "configuration ([access] admins, and [[access.grant]] rights read, edit, exec, kill on workflows), "
                "and logins over TCP are [tcp.users.NAME] tables (password_sha1, groups, admin), applied by "
                "`control reload` (jobd.toml(5))",
            ),
        )
        for action in actions
    }
)


def decode_command(request: Request) -> Command:
    """The command a request asks for, its attributes checked; UnknownCommand for what jobd does not serve."""
    if request.group == "ping":
        return Ping()
    if request.group == "quit":
        return Quit()
    decoder = _DECODERS.get((request.group, request.action))
    if decoder is None:
        why = NOT_SERVED.get((request.group, request.action))
        raise UnknownCommand(
            f"Unknown command or action (<{request.group}> action '{request.action}')"
            + ("" if why is None else f": {why}"),
            group=request.group,
            action=request.action,
        )
    return decoder(request)


# ---------------------------------------------------------------------------------------------------------------
# Responses

# Characters XML 1.0 cannot carry, escaped or not: most C0 controls, lone surrogates, U+FFFE and U+FFFF.
_NOT_XML_CHAR: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

AttributeValue = str | int | None


def xml_safe(text: str) -> str:
    """`text` with every character XML 1.0 cannot carry replaced by U+FFFD (a task's output may hold any byte)."""
    return _NOT_XML_CHAR.sub("\ufffd", text)


def _attribute_text(value: str | int) -> str:
    if isinstance(value, bool):  # evQueue writes booleans as yes/no
        return "yes" if value else "no"
    return xml_safe(str(value))


def element(
    tag: str, attrs: Mapping[str, AttributeValue] = MappingProxyType({}), text: str | None = None
) -> etree._Element:
    """An element for a response: attributes in name order (as evQueue sends them), None values left out."""
    made = etree.Element(tag)
    for name in sorted(attrs):
        value = attrs[name]
        if value is not None:
            made.set(name, _attribute_text(value))
    if text is not None:
        made.text = xml_safe(text)
    return made


def response_element(
    node: str,
    attrs: Mapping[str, AttributeValue] = MappingProxyType({}),
    children: Iterable[etree._Element] = (),
    text: str | None = None,
) -> etree._Element:
    """`<response node=… status="OK" …attrs>children</response>`; the children are moved into it."""
    root = element("response", {**attrs, "node": node, "status": "OK"}, text)
    root.extend(children)
    return root


def serialize(root: etree._Element) -> bytes:
    """One answer on the wire: the element, no XML declaration, then a newline."""
    return etree.tostring(root, encoding="UTF-8", xml_declaration=False, with_tail=False) + b"\n"


def response_error(node: str, error: JobdError) -> bytes:
    """`<response error="…" error-code="…" node="…" status="KO"/>`, with evQueue's code for the error."""
    return serialize(
        element("response", {"error": error.message, "error-code": evqueue_code(error), "node": node, "status": "KO"})
    )


PROFILES: Final = ("ADMIN", "USER")


def greeting(node: str, profile: str, version: str, now: datetime, modules: Iterable[tuple[str, str]] = ()) -> bytes:
    """The `<ready …>` document a server sends first; evQueue's clients send nothing before it.

    `now` is the local time (evQueue's `time`); `modules` are (name, version) pairs, evQueue's optional features.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
    ready = element(
        "ready",
        {
            "node": node,
            "profile": profile,
            "status": "OK",
            "time": now.strftime("%Y-%m-%d %H:%M:%S"),
            "version": version,
        },
    )
    listed = etree.SubElement(ready, "modules")
    listed.extend(element("module", {"name": name, "version": module_version}) for name, module_version in modules)
    return serialize(ready)


# An xpathfilter comes from any client, and XPath can be made to work for ages: nested predicates multiply (twelve
# `[count(/*/@*[...` levels held the loop 17 s), and so do chained steps (`//*/following::*/following::*...` on a
# long list: 27 s). Every step is given a predicate that keeps every node but looks at the clock, so the evaluation
# ends once it has run this long (a legitimate filter takes well under a millisecond). What runs in C between two
# steps (contains() on long text, a comparison of two large node-sets, concat()) never looks at the clock: jobd
# evaluates a client's filter in a child process (jobd/forked.py), killed after this long too.
XPATHFILTER_SECONDS: Final = 0.5
_TICK_NAMESPACE: Final = "urn:jobd:xpathfilter"
_TICK: Final = "[jobd:tick()]"


TOO_SLOW: Final = f"took longer than {XPATHFILTER_SECONDS} s to evaluate"


class _XPathFilterTooSlow(Exception):
    pass


def xpathfilter_refused(expression: str, why: str) -> InvalidParams:
    """The error for an xpathfilter whose evaluation was given up (`why`: it took too long, ...)."""
    return InvalidParams(f"xpathfilter '{expression}' {why}: refused", parameter="xpathfilter")


def _ticking(expression: str) -> str:
    """`expression` with `[jobd:tick()]` after each step's node test: `a/b[1]` becomes
    `a[jobd:tick()]/b[jobd:tick()][1]`, the same nodes (a predicate that keeps every node leaves their positions as
    they were), with a call per node each step yields. Works on XPath's tokens, so strings are left alone."""
    try:
        tokens = tokenize(expression)
    except XPathError:
        return expression  # lxml refuses it, with its own message
    after: list[int] = []  # offsets in `expression` to insert a tick at
    open_node_tests: list[bool] = []  # for each `(` open: whether it belongs to a node type test (text() ...)
    for index, token in enumerate(tokens):
        if token.kind == "name":  # a name test (`x`, `*`, `ns:x`, the name after `@` or an axis)
            after.append(token.end)
        elif token.kind == "(":
            previous = tokens[index - 1] if index else None
            is_node_test = previous is not None and previous.kind == "function" and previous.text in NODE_TYPES
            open_node_tests.append(is_node_test)
        elif token.kind == ")" and open_node_tests and open_node_tests.pop():
            after.append(token.end)
    pieces, start = [], 0
    for offset in after:
        pieces += [expression[start:offset], _TICK]
        start = offset
    return "".join(pieces) + expression[start:]


def apply_xpathfilter(response_root: etree._Element, expression: str) -> etree._Element:
    """evQueue's `xpathfilter`: the answer becomes a new `<response node=… status="OK">` holding what the expression
    selects in the response (evaluated from its root), as evQueue 3.3 builds it (APISession::QueryReceived imports
    the first result into a fresh response): a copy of the first node selected (of the document node, `/`, the
    `<response>` it holds), the text of an attribute, or the
    value of a string, number (as XPath's string() writes it) or boolean (`true`/`false`); nothing selected leaves it
    empty. Its clients read that answer as any other (status on the root, then its children).

    Raises InvalidParams (INVALID_PARAMETER) when the expression is invalid, too long or too slow; the caller answers
    it as a KO response. Any other exception is a bug of jobd's, for the caller to log. EXSLT regular expressions
    are off: a hostile pattern could otherwise spin the event loop.
    """
    if len(expression) > MAX_XPATHFILTER:
        raise InvalidParams(f"xpathfilter is longer than {MAX_XPATHFILTER} characters", parameter="xpathfilter")
    deadline = time.monotonic() + XPATHFILTER_SECONDS

    def tick(_context: object, *arguments: object) -> bool:
        if arguments:  # the client's own call of it: `jobd:` is bound for the steps jobd adds
            raise InvalidParams(
                f"Invalid xpathfilter '{expression}': jobd:tick() is jobd's own function, which takes no arguments",
                parameter="xpathfilter",
            )
        if time.monotonic() > deadline:
            raise _XPathFilterTooSlow
        return True

    def compiled(text: str) -> etree.XPath:
        return etree.XPath(
            _ticking(text),
            namespaces={"jobd": _TICK_NAMESPACE},
            extensions={(_TICK_NAMESPACE, "tick"): tick},
            regexp=False,
            smart_strings=False,
        )

    # Only lxml's refusals of the expression are the client's mistake: any other exception is a bug in jobd, for
    # the caller to log and answer as one (an internal error), not as an invalid parameter.
    try:
        selector = compiled(expression)
    except (etree.XPathError, ValueError) as error:  # ValueError: a string lxml cannot take (control characters)
        raise InvalidParams(f"Invalid xpathfilter '{expression}': {error}", parameter="xpathfilter") from None
    try:
        result = selector(response_root)
        # lxml leaves the document node out of the node-sets it returns, so `/` came back as empty as what selects
        # nothing, and `/ | x` as x. Selected, it is the first node (document order), and its copy is what it
        # holds, the whole answer (as `/*` gives it), where evQueue's own XPath failed ("Missing node ... after
        # slash"). Only the first node is answered: a list starting with the root element needs no second question.
        first_may_be_the_document = not (isinstance(result, list) and result and result[0] is response_root)
        if first_may_be_the_document and selects_the_document(
            expression, result, lambda query: compiled(query)(response_root)
        ):
            result = [response_root]
    except _XPathFilterTooSlow:
        raise xpathfilter_refused(expression, TOO_SLOW) from None
    except etree.XPathError as error:
        raise InvalidParams(f"Invalid xpathfilter '{expression}': {error}", parameter="xpathfilter") from None
    filtered = response_element(response_root.get("node", ""))
    first = result[0] if isinstance(result, list) and result else result
    if isinstance(first, etree._Element):
        selected = copy.deepcopy(first)
        selected.tail = None
        filtered.append(selected)
    elif not isinstance(first, list):  # an empty node-set adds nothing
        filtered.text = xml_safe(_xpath_text(first))
    return filtered


def _xpath_text(value: object) -> str:
    """A value XPath returned as evQueue writes it into a filtered answer: booleans `true`/`false`, strings and
    attribute values as they are, a namespace node as its URI (its XPath string-value; lxml gives it as a
    (prefix, URI) tuple), numbers as XPath's string() writes them. evQueue wrote its integers so (`count(…)` is 3);
    it failed on every result of `div`, whole or not ("Unknown result type", then closed the connection), where
    jobd gives the exact value (`2`, `0.5`, `Infinity`, `NaN`) rather than cut it down to an integer."""
    if isinstance(value, tuple) and len(value) == 2:
        return str(value[1])
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number_string(value)
    return str(value)
