"""The error tree: every error jobd reports has a stable wire code and a message naming what was wrong."""

from __future__ import annotations

import difflib
import errno
import json
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar


def did_you_mean(word: str, choices: Iterable[str], spelled: str = "{}") -> str:
    """` (did you mean NAME?)` naming the choice closest to a mistyped `word`, or "" when none is close: how every
    message about an unknown name (a key, a macro, an element) suggests the one that was meant."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {spelled.format(close[0])}?)" if close else ""


class JobdError(Exception):
    """Base of every error jobd reports to a client or an administrator.

    `code` is the stable token clients match on (JSON-RPC `error.data.code`); `rpc_code` is the JSON-RPC numeric
    code. `details` travel to the client as extra members of `error.data`.
    """

    code: ClassVar[str] = "INTERNAL_ERROR"
    rpc_code: ClassVar[int] = -32603

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ParseError(JobdError):
    code = "PARSE_ERROR"
    rpc_code = -32700


class InvalidRequest(JobdError):
    code = "INVALID_REQUEST"
    rpc_code = -32600


class FrameTooLarge(JobdError):
    code = "FRAME_TOO_LARGE"
    rpc_code = -32600


class MethodNotFound(JobdError):
    code = "METHOD_NOT_FOUND"
    rpc_code = -32601


class InvalidParams(JobdError):
    code = "INVALID_PARAMS"
    rpc_code = -32602


class UnknownQueue(JobdError):
    code = "UNKNOWN_QUEUE"
    rpc_code = -32001


class UnknownTask(JobdError):
    code = "UNKNOWN_TASK"
    rpc_code = -32002


class UnknownJob(JobdError):
    code = "UNKNOWN_JOB"
    rpc_code = -32003


class QueueClosed(JobdError):
    """The queue was removed from the configuration: it drains what it has and takes nothing new."""

    code = "QUEUE_CLOSED"
    rpc_code = -32004


class JobFinished(JobdError):
    """The request needs a job that has not finished yet (cancel)."""

    code = "JOB_FINISHED"
    rpc_code = -32005


class InsufficientRights(JobdError):
    code = "INSUFFICIENT_RIGHTS"
    rpc_code = -32006


class ShuttingDown(JobdError):
    code = "SHUTTING_DOWN"
    rpc_code = -32007


class ConfigError(JobdError):
    """A configuration file is unreadable or invalid; the message names file, line, key and allowed values."""

    code = "CONFIG_INVALID"
    rpc_code = -32008


class InvalidTransition(JobdError):
    """A programming error: a state change the transition table does not allow."""

    code = "INTERNAL_ERROR"
    rpc_code = -32603


class UnknownWorkflow(JobdError):
    code = "UNKNOWN_WORKFLOW"
    rpc_code = -32009


class UnknownInstance(JobdError):
    code = "UNKNOWN_INSTANCE"
    rpc_code = -32010


class InvalidWorkflowParameters(JobdError):
    """A launch passed parameters the workflow does not declare, or left declared ones out."""

    code = "INVALID_WORKFLOW_PARAMETERS"
    rpc_code = -32011


class InvalidXml(JobdError):
    """An XML request or document is ill-formed, or uses what jobd refuses (DTDs, entities)."""

    code = "INVALID_XML"
    rpc_code = -32700


class UnknownCommand(JobdError):
    """evQueue's protocol: no such group/action pair (JSON-RPC's equivalent is METHOD_NOT_FOUND)."""

    code = "UNKNOWN_COMMAND"
    rpc_code = -32601


class TimedOut(JobdError):
    code = "TIMED_OUT"
    rpc_code = -32012


class UnknownSchedule(JobdError):
    code = "UNKNOWN_SCHEDULE"
    rpc_code = -32013


class TooManyConnections(JobdError):
    """`[daemon] max_connections` clients are connected already: a new one is told so and closed."""

    code = "TOO_MANY_CONNECTIONS"
    rpc_code = -32014


class StoreFailed(JobdError):
    """jobd could not write its database (its disk is full, an I/O error). docs/protocol.md says which requests are
    then left undone and which may have been carried out in part."""

    code = "STORE_FAILED"
    rpc_code = -32015


class OutOfResources(JobdError):
    """jobd is short of a system resource for this request now (open files, memory); nothing was changed, and the
    same request may succeed later. A shortage, not a bug: no traceback is logged for it."""

    code = "OUT_OF_RESOURCES"
    rpc_code = -32016


class OutputMissing(JobdError):
    """An attempt's output file that jobd wrote is no longer there: removed under jobd (its directory deleted by
    hand, the disk holding the state directory replaced). Not the empty output of a job that printed nothing."""

    code = "OUTPUT_MISSING"
    rpc_code = -32017


# Errors of an open, a read or a listing that say jobd lacks a resource now, not that anything is wrong with the file.
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def shortage(what: str, error: OSError, then: str) -> OutOfResources | None:
    """OutOfResources for an OSError that says jobd is short of open files or memory (`what` failed, `then` says
    what becomes of the request), or None for any other error: one about the file itself."""
    if error.errno not in SHORTAGE_ERRNOS:
        return None
    return OutOfResources(f"{what}: {error.strerror} (jobd is short of open files or memory: see LimitNOFILE=); {then}")


def memory_shortage(failure: BaseException) -> OutOfResources | None:
    """OutOfResources for a MemoryError that reached a request's boundary from anywhere but the database (whose own
    store.store_failure names): jobd is short of memory, which is not a bug, and the same request may succeed once
    memory is freed. None for any other failure."""
    if not isinstance(failure, MemoryError):
        return None
    return OutOfResources("jobd ran out of memory answering this (see MemoryMax= and the kernel log); ask again later")


class StartupError(Exception):
    """jobd refuses to start: another jobd owns the state or the socket, the database is from a newer jobd, …

    Not a wire error: it ends the process with a message, before any client is served. `permanent`: starting
    again cannot help until someone changes something (jobd then exits 78, which its unit does not restart on).
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class TooLarge(float):
    """A JSON number too large for a float (`1e400`), as jobd.protocol.jsonrpc reads it: infinity, as Python's json
    makes it, which json.dumps writes `Infinity` (neither JSON nor what the client sent); it keeps the client's
    `text`, for json_repr to quote."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> TooLarge:
        number = super().__new__(cls, text)
        number.text = text
        return number


def json_repr(value: Any) -> str:
    """A value as the client wrote it, in a refusal's message: JSON, not Python (`true`, `"x"`, not `True`, `'x'`),
    as a config file's TOML writes it too; cut to 60 characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:  # it holds a TooLarge: written as the client wrote it, and only as far as is shown
        pieces, length = [], 0
        for piece in _json_pieces(value):
            pieces.append(piece)
            length += len(piece)
            if length > 60:
                break
        text = "".join(pieces)
    except TypeError:  # not JSON-able
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_pieces(value: Any) -> Iterator[str]:
    """The JSON text of `value` as json.dumps writes it, in pieces, but its TooLarge numbers as the client wrote
    them."""
    if isinstance(value, TooLarge):
        yield value.text
    elif isinstance(value, list):
        yield "["
        for place, item in enumerate(value):
            yield ", " if place else ""
            yield from _json_pieces(item)
        yield "]"
    elif isinstance(value, dict):
        yield "{"
        for place, (key, item) in enumerate(value.items()):
            yield (", " if place else "") + json.dumps(key, ensure_ascii=False) + ": "
            yield from _json_pieces(item)
        yield "}"
    else:
        yield json.dumps(value, ensure_ascii=False)
