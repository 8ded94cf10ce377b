"""JSON-RPC 2.0 framing: one JSON text per line, batches, size and depth limits, errors that never leak a traceback."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobd.errors import InvalidParams, InvalidRequest, JobdError, ParseError, TooLarge, json_repr
from jobd.model import printable
from jobd.values import value

MAX_FRAME = 1024 * 1024  # bytes in one line, newline excluded
MAX_DEPTH = 64  # arrays and objects nested in one request; jobd's deepest use nine (docs/protocol.md)
# Members of one batch. Each is answered, even past the 4 MiB a batch's answer may hold (server.MAX_BATCH_ANSWER):
# a refusal of a hundred bytes or more for a member sent in two (`1,`), so a 1 MiB line of them was answered in
# 126 MB, all made before a byte was sent (jobd's peak memory grew by 700 MB, its loop stopped for seconds).
MAX_BATCH = 10000  # as many as one job.submit's `jobs`


@value
class Request:
    method: str
    params: dict[str, Any]
    id: Any  # None for a notification
    is_notification: bool


@dataclass(frozen=True, slots=True)
class Invalid:
    """A member that could not be made into a request; it is answered with `error`, unless it is a notification
    (a valid request without an id, whose method cannot take it): those are never answered."""

    id: Any
    error: JobdError
    answered: bool = True


Member = Request | Invalid


@dataclass(frozen=True, slots=True)
class Frame:
    members: list[Member]
    is_batch: bool


# JSON may spell a surrogate half as an escape; paired halves make a character, a lone one makes a string that
# cannot be stored or sent back. Only requests that contain such an escape pay for the walk below.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _is_unicode(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_is_unicode(key) and _is_unicode(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_is_unicode(item) for item in value)
    return True


_BRACKETS_AND_QUOTES = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKET_OR_QUOTE = bytes(byte for byte in range(256) if byte not in b'[]{}"')


def _too_deep(line: bytes) -> bool:
    """Whether `line` nests arrays and objects more than MAX_DEPTH deep, found without parsing.

    Only a line with more than MAX_DEPTH opening brackets can be too deep, so the common request pays for two
    `count`s. The others lose their escaped backslashes and quotes, then everything but brackets and quotes, then
    the strings (every other piece between quotes): what is left is the nesting. Each pass of `replace` removes the
    innermost pairs, one level: a structure whose pairs are not all gone after MAX_DEPTH passes is deeper than
    that (as is one left with more than MAX_DEPTH brackets that never close). All of it runs at C speed.
    """
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False
    unescaped = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.translate(_BRACKETS_AND_QUOTES, _NOT_BRACKET_OR_QUOTE).split(b'"')[::2])
    for _ in range(MAX_DEPTH):
        shallower = brackets.replace(b"()", b"")
        if len(shallower) == len(brackets):
            break
        brackets = shallower
    return b"()" in brackets or brackets.count(b"(") > MAX_DEPTH


# int()'s refusal of a number too long to convert in linear time (CVE-2020-10735), as json.loads() passes it on.
_TOO_MANY_DIGITS = re.compile(r"Exceeds the limit \(\d+ digits\) for integer string conversion")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _number(text: str) -> float:
    """A JSON number with a fraction or an exponent. One too large for a float (`1e400`) is valid JSON, and stays a
    request's (its id answered): infinity, as Python's json reads it, refused as any out-of-range value is by what
    takes it, but quoted as the client wrote it (TooLarge), not as `Infinity`."""
    number = float(text)
    return number if math.isfinite(number) else TooLarge(text)


class _Duplicated(dict[str, Any]):
    """An object that gives a name twice, `duplicate` the first such name. Python's json (and JavaScript's
    JSON.parse) would keep the last value and drop the first without a word, so `{"id": 1, "id": 2}` would cancel a
    job the client's own code (or a proxy's check) may have read as the other one; RFC 8259 leaves such an object to
    the receiver, and jobd refuses it (a request's as INVALID_REQUEST, one in its params as INVALID_PARAMS)."""

    def __init__(self, pairs: list[tuple[str, Any]], duplicate: str) -> None:
        super().__init__(pairs)
        self.duplicate = duplicate


# The objects of the text being decoded that give a name twice, in the order they end. Only the event loop's thread
# decodes clients' JSON, one text at a time: parse() empties it before each, and it is emptied once read.
_duplicated: list[_Duplicated] = []


def _object_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) == len(pairs):
        return members
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            break
        seen.add(name)
    marked = _Duplicated(pairs, name)
    _duplicated.append(marked)
    return marked


def _twice(duplicate: str) -> str:
    return f"gives the name {json_repr(duplicate)} twice in one object; give each name once"


# Made once: json.loads() and json.dumps() with options build a new decoder or encoder on every call.
_DECODER = json.JSONDecoder(parse_float=_number, parse_constant=_refuse_constant, object_pairs_hook=_object_of)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# JSONEncoder.encode() builds a new C encoder, a closure and a dict of the containers seen on every call; this one
# is built once, with the same settings, and no such dict (jobd's replies are trees: they cannot hold a cycle).
# A submit's reply encoded this way costs 1.4 µs less (of 5.3). Python without the _json accelerator has none.
_make_c_encoder: Callable[..., Callable[[Any, int], tuple[str, ...]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_C_ENCODER = (
    None
    if _make_c_encoder is None
    else _make_c_encoder(None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
)


def _to_json(message: Any) -> str:
    """`message` as compact JSON text, not ASCII-escaped, as _ENCODER.encode() makes it."""
    if _C_ENCODER is None:
        return _ENCODER.encode(message)
    return "".join(_C_ENCODER(message, 0))


_REQUEST_MEMBERS = frozenset({"jsonrpc", "id", "method", "params"})


def parse(data: bytes, what: str = "request", *, duplicates_marked: bool = False) -> Any:
    """The JSON value in `data` (UTF-8), as jobd takes it from a client: ParseError, whose message calls it `what`,
    if it is not UTF-8 or not JSON, nests more than MAX_DEPTH deep, spells NaN or Infinity, holds a lone surrogate
    escape (SQLite and UTF-8 replies cannot carry one), or gives a name twice in one object (unless
    `duplicates_marked`: such objects are then _Duplicated, for decode() to refuse the request that holds them with
    its id). Never another exception: for the API socket's lines and the HTTP API's bodies alike."""
    _duplicated.clear()
    if _too_deep(data):  # refused before the decoder recurses into it
        raise ParseError(f"{what} nests arrays and objects more than {MAX_DEPTH} deep")
    try:
        text = data.decode("utf-8")
        value = _DECODER.decode(text)
    except UnicodeDecodeError as error:
        raise ParseError(f"{what} is not valid UTF-8 (byte {error.start})") from None
    except RecursionError:
        raise ParseError(f"{what} is nested too deeply") from None
    except ValueError as error:
        if _TOO_MANY_DIGITS.match(str(error)):  # Python's words name a function of its own to call: not the client's
            raise ParseError(
                f"{what} holds a number of more than {sys.get_int_max_str_digits()} digits, which jobd does not read"
            ) from None
        raise ParseError(f"{what} is not valid JSON: {error}") from None
    if _SURROGATE_ESCAPE.search(text) and not _is_unicode(value):
        raise ParseError(f"{what} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not Unicode text")
    if _duplicated and not duplicates_marked:
        first = _duplicated[0].duplicate
        _duplicated.clear()
        raise ParseError(f"{what} {_twice(first)}")
    return value


def decode(line: bytes) -> Frame:
    """Parse one line. A line that is not JSON at all raises ParseError; bad members become Invalid."""
    data = parse(line, duplicates_marked=True)
    duplicates = bool(_duplicated)  # else no member need be searched for them
    _duplicated.clear()
    if isinstance(data, list):
        if not data:
            raise InvalidRequest("an empty batch is not a valid request")
        if len(data) > MAX_BATCH:  # refused whole, nothing run: its members' refusals alone could fill memory
            raise InvalidRequest(
                f"a batch holds at most {MAX_BATCH} requests, this one {len(data)}; send the others in further lines",
                limit=MAX_BATCH,
            )
        return Frame([_member(item, duplicates) for item in data], is_batch=True)
    return Frame([_member(data, duplicates)], is_batch=False)


def _duplicated_in(value: Any) -> _Duplicated | None:
    """The first object in `value` (itself included) that gives a name twice."""
    if isinstance(value, _Duplicated):
        return value
    inside = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next(filter(None, map(_duplicated_in, inside)), None)


def _member(data: Any, duplicates: bool = False) -> Member:
    if not isinstance(data, dict):
        return Invalid(None, InvalidRequest("a request must be a JSON object"))
    if isinstance(data, _Duplicated) and data.duplicate == "id":  # which one to echo? neither
        return Invalid(None, InvalidRequest(f"the request {_twice('id')}"))
    request_id = data.get("id")
    # The id is checked first: whatever else is wrong, an error reply may echo only an id that is one.
    # JSON-RPC 2.0 allows any number (fractions are merely discouraged), so a client can match every reply.
    if isinstance(request_id, bool) or not isinstance(request_id, str | int | float | None):
        return Invalid(None, InvalidRequest('"id" must be a string, a number or null'))
    if isinstance(request_id, float) and not math.isfinite(request_id):
        return Invalid(None, InvalidRequest('"id" must be a finite number'))
    if isinstance(data, _Duplicated):
        return Invalid(request_id, InvalidRequest(f"the request {_twice(data.duplicate)}"))
    if data.get("jsonrpc") != "2.0":
        return Invalid(request_id, InvalidRequest('"jsonrpc" must be "2.0"'))
    method = data.get("method")
    if not isinstance(method, str):
        return Invalid(request_id, InvalidRequest('"method" must be a string'))
    # JSON-RPC 2.0: `params`, if present, is an object or an array; `null` is neither (left out, it means none).
    params = data.get("params", {})
    if isinstance(params, list):  # by-position parameters: a valid request, but no method of jobd takes them
        failure = InvalidParams('"params" must be an object: jobd\'s methods take by-name parameters')
        return Invalid(request_id, failure, answered="id" in data)
    if not isinstance(params, dict):
        return Invalid(request_id, InvalidRequest('"params" must be an object (by-name parameters)'))
    if not data.keys() <= _REQUEST_MEMBERS:
        unknown = set(data) - _REQUEST_MEMBERS
        return Invalid(
            request_id, InvalidRequest(f"unknown members {sorted(unknown)}; allowed: jsonrpc, id, method, params")
        )
    duplicated = _duplicated_in(params) if duplicates else None
    if duplicated is not None:  # data.param: the parameter that holds it (or the name itself, given twice in params)
        param = (
            duplicated.duplicate if duplicated is params else next(k for k, v in params.items() if _duplicated_in(v))
        )
        failure = InvalidParams(f"{method}: the params object {_twice(duplicated.duplicate)}", param=param)
        return Invalid(request_id, failure, answered="id" in data)
    return Request(method, params, request_id, is_notification="id" not in data)


def result(request_id: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": value}


def error(request_id: Any, failure: JobdError) -> dict[str, Any]:
    data = {"code": failure.code, **failure.details}
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": failure.rpc_code, "message": failure.message, "data": data},
    }


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def encode(message: Any) -> bytes:
    """`message` as a line of the API socket."""
    return encode_value(message) + b"\n"


def encode_value(message: Any) -> bytes:
    """`message` as UTF-8 JSON, without the line's end: a member of a batch's answer (`encode_batch`)."""
    text = _to_json(message)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a name the OS gave undecoded reached a reply: JSON text must be Unicode
        return _to_json(_printable_values(message)).encode()


def event_line(subscription: int, event: bytes) -> bytes:
    """The line of an `event` notification for `subscription`, from the event's object as `encode_value` made it,
    once for every subscription it goes to: the bytes of
    `encode(notification("event", {"subscription": subscription, **event_object}))`."""
    return b'{"jsonrpc":"2.0","method":"event","params":{"subscription":%d,%s}\n' % (subscription, event[1:])


def encode_batch(members: list[bytes]) -> bytes:
    """The line answering a batch, from its members' replies made by `encode_value`."""
    return b"[" + b",".join(members) + b"]\n"


def encode_text(value: Any) -> str:
    """JSON text for `value` (compact, not ASCII-escaped) that UTF-8 can carry: names the OS gave undecoded are
    shown as jobd.model.printable shows them (`\\xNN`), as in the socket's replies. For the HTTP API's bodies."""
    text = _to_json(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        return _to_json(_printable_values(value))
    return text


def _printable_values(value: Any) -> Any:
    """`value` with every string in it made printable (jobd.model.printable), keys included."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable_values(key): _printable_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_printable_values(item) for item in value]
    return value
