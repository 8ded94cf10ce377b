"""Value classes made on every submit and at every job's start and end, and `evolve`, which makes a changed copy.

`@value` classes are never changed once made: mypy treats them as frozen dataclasses (assigning to a field is a
type error, and `make test` runs `mypy --strict` on jobd/), but at run time they are plain slotted dataclasses
with the frozen ones' equality and hash. A frozen dataclass's `__init__` sets each field through
`object.__setattr__`, and `dataclasses.replace` walks the fields one by one in Python; measured on an attempt
(18 fields), a construction took 1.75 µs frozen against 0.24 µs plain, and a replace 4.3 µs against 0.7 µs by
`evolve`. A job's path makes about ten such values and a submit six (docs/BENCHMARKS.md). Classes that are not on
those paths stay ordinary frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform

_T = TypeVar("_T")
_V = TypeVar("_V")


@dataclass_transform(frozen_default=True)
def value(cls: type[_T]) -> type[_T]:
    """A value class: frozen for the type checker, a plain slotted dataclass at run time (see above)."""
    return dataclasses.dataclass(slots=True, unsafe_hash=True)(cls)


# "Leave this field as it is": the default of every parameter of an evolver.
_KEEP: Any = object()

_evolvers: dict[type, Callable[..., Any]] = {}


def evolve(original: _V, /, **changes: Any) -> _V:
    """A copy of the dataclass value `original` with `changes` (fields by name), as `dataclasses.replace` makes
    it. Each class gets its own evolver, written once, which passes every field to `__init__` in one call: the
    way dataclasses writes `__init__` itself, and what makes it six times faster than `replace`. A name that is
    not a field is a TypeError."""
    cls = type(original)
    evolver = _evolvers.get(cls)
    if evolver is None:
        evolver = _evolvers[cls] = _evolver_for(cls)
    result: _V = evolver(original, **changes)
    return result


def _evolver_for(cls: type) -> Callable[..., Any]:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    parameters = ", ".join(f"{name}=_KEEP" for name in names)
    arguments = ", ".join(f"{name}=_original.{name} if {name} is _KEEP else {name}" for name in names)
    source = f"def evolve(_original, /, *, {parameters}):\n    return _cls({arguments})\n"
    namespace: dict[str, Any] = {"_KEEP": _KEEP, "_cls": cls}
    exec(compile(source, f"<evolve {cls.__qualname__}>", "exec"), namespace)  # only field names go into the source
    evolver: Callable[..., Any] = namespace["evolve"]
    return evolver
