"""What jobctl relies on in each API method's result, checked before jobctl reads a reply.

A socket that is not jobd's (another JSON-RPC 2.0 server behind the path given), or a jobd of another version,
may answer with results of another shape. Read as if they were jobd's, they gave a traceback from deep inside a
table's rendering, or worse a table of blanks and exit code 0 ("job None None in None"). Each result is checked
here against the members jobctl uses to tell what it got (a job's id and state, a list's items, ...); a mismatch
is a ProtocolError naming the method, the member and what jobd sends, which jobctl reports as not talking to
jobd (exit code 3).

Only the members that identify an object are checked, not every member jobctl shows; members beyond them are
welcome (a newer jobd may add some), and a method this table does not name is not checked.
"""

from __future__ import annotations

from typing import Any

from jobd.client import ProtocolError

# A shape: a type (bool is not an int here), a tuple of them, an object whose members have the shapes named
# (other members are not looked at), or a one-item list: a list each of whose items has that shape.
Shape = type | tuple[type, ...] | dict[str, "Shape"] | list["Shape"]

_JOB: dict[str, Shape] = {"id": int, "state": str, "queue": str}
_INSTANCE: dict[str, Shape] = {"id": int, "workflow": str, "status": str}
_NAMED: dict[str, Shape] = {"name": str}

RESULTS: dict[str, Shape] = {
    "job.submit": _JOB,
    "job.get": {**_JOB, "tries": [dict]},
    "job.wait": _JOB,
    "job.cancel": _JOB,
    "job.list": {"jobs": [_JOB], "next_before": (int, type(None))},
    "job.output": {"data": str, "attempt": int, "next_offset": int, "size": int, "complete": bool},
    "queue.list": {"queues": [_NAMED]},
    "queue.pause": _NAMED,
    "queue.resume": _NAMED,
    "task.list": {"tasks": [_NAMED]},
    "workflow.list": {"workflows": [_NAMED]},
    "daemon.status": {"version": str, "pid": int},
    "daemon.reload": {"files": [str]},
    "daemon.backup": {"path": str, "bytes": int, "schema_version": int, "seconds": float},
    "events.subscribe": {"subscription": int},
    "instance.launch": _INSTANCE,
    "instance.get": _INSTANCE,
    "instance.wait": _INSTANCE,
    "instance.list": {"instances": [_INSTANCE], "next_before": (int, type(None))},
    "schedule.list": {"schedules": [_NAMED]},
    "schedule.enable": _NAMED,
    "schedule.disable": _NAMED,
    "schedule.trigger": {"schedule": _NAMED, "started": bool},
    "audit.list": {"entries": [dict], "next_before": (int, type(None))},
}


def checked_result(method: str, result: Any, peer: str) -> Any:
    """`result` as it came, once it has the shape jobd gives `method`'s results; else a ProtocolError."""
    shape = RESULTS.get(method)
    if shape is not None:
        problem = _mismatch(result, shape, "result")
        if problem is not None:
            raise ProtocolError(
                f"{peer} answered {method} with something jobd does not send ({problem}): is it jobd's socket, "
                "and is that jobd as recent as this jobctl?"
            )
    return result


def _mismatch(value: Any, shape: Shape, where: str) -> str | None:
    """What in `value` (at path `where`: "result.jobs[3].state") does not have `shape`; None if it all does."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is {_kind(value)}, not an object"
        for name, member_shape in shape.items():
            if name not in value:
                return f"{where}.{name} is missing"
            problem = _mismatch(value[name], member_shape, f"{where}.{name}")
            if problem is not None:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {_kind(value)}, not a list"
        for index, item in enumerate(value):
            problem = _mismatch(item, shape[0], f"{where}[{index}]")
            if problem is not None:
                return problem
        return None
    types = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, bool) and bool not in types:  # True is an int to Python, not to JSON
        return f"{where} is {_kind(value)}, not {_kinds(types)}"
    if not isinstance(value, types):
        return f"{where} is {_kind(value)}, not {_kinds(types)}"
    return None


_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _kind(value: Any) -> str:
    return _NAMES.get(type(value), type(value).__name__)


def _kinds(types: tuple[type, ...]) -> str:
    return " or ".join(_NAMES.get(t, t.__name__) for t in types)
