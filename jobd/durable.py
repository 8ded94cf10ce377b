"""The answer to a command that committed something, held until that commit survives a power cut.

With `[daemon] durability = "fsync"` a client hears of a submit or a launch only once its commit is on the disk
(docs/protocol.md). Protocols wait for such an answer as for any method that waits: it is a coroutine. Unlike the
others, what it answers for has happened before the first wait, and that is what `DurableReply` lets them tell: the
audit records the command as done at once (a client that leaves during the fsync did not undo it), and a
connection refusing more waiting requests than it keeps still owes this one its answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

R = TypeVar("R")


class Delegating(Coroutine[Any, Any, R], Generic[R]):
    """A coroutine that is another one (`_wait`, set by the subclass), under a class of its own: one that its
    caller can tell apart (DurableReply), or that keeps what the wait is made of (api's refusals of a method)."""

    _wait: Coroutine[Any, Any, R]

    def send(self, value: Any) -> Any:
        return self._wait.send(value)

    def throw(self, *args: Any) -> Any:
        return self._wait.throw(*args)

    def close(self) -> None:
        self._wait.close()

    def __await__(self) -> Generator[Any, None, R]:
        return self._wait.__await__()


class DurableReply(Delegating[R]):
    """`result`, once `durable()` returns: a coroutine that delegates to its one wait."""

    def __init__(self, result: R, durable: Callable[[], Awaitable[None]]) -> None:
        self.result = result
        self._wait = self._answer(durable)

    async def _answer(self, durable: Callable[[], Awaitable[None]]) -> R:
        await durable()
        return self.result
