"""SIGTERM, SIGINT and SIGHUP handled on jobd's event loop, none of them ever lost.

asyncio's `loop.add_signal_handler` learns which signal came from a byte that the C-level handler writes into the
loop's wake-up socket: when that socket is full, the byte is dropped, and so is the signal. A burst of SIGHUPs (a
script reloading in a loop; a few hundred unread bytes fill a Unix socket) then swallowed a SIGTERM sent among them:
jobd ran on, and systemd SIGKILLed it after TimeoutStopSec=, its running jobs found `lost` at the next start. Python
also printed "Exception ignored when trying to write to the signal wakeup fd" to the journal for every byte dropped.

Here the interpreter's own flag for each signal says which came, and the wake-up socket only wakes the loop, which a
full socket does as well as a byte. A signal that comes again before its handler has run is merged into that run, as
the kernel merges a signal already pending: a burst of SIGHUPs reloads once or twice, not once per signal.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any


class LoopSignals:
    """Route each signal of `handlers` to its handler, run by `loop` in its turn; close() puts back what was before.
    Signal handlers run in the main thread only, which must be the loop's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handlers: Mapping[int, Callable[[], None]]) -> None:
        self._loop = loop
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        loop.add_reader(self._wake_read.fileno(), self._drain)
        # A signal that interrupts another thread (an executor's fsync) must still wake the loop from epoll_wait().
        self._previous_wakeup = signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        self._queued: set[int] = set()  # signals whose handler waits for its turn
        self._previous: dict[int, Any] = {}
        for number, handler in handlers.items():
            self._previous[number] = signal.signal(number, self._queue(handler))

    def _queue(self, handler: Callable[[], None]) -> Callable[[int, FrameType | None], None]:
        def run(number: int) -> None:
            self._queued.discard(number)  # first: the same signal coming while the handler runs is run again after
            handler()

        def received(number: int, _frame: FrameType | None) -> None:
            # Python runs this between two bytecodes of whatever the main thread was doing, the loop's own work
            # included: the handler waits for its turn. The byte the signal wrote makes that turn come at once.
            if number in self._queued or self._loop.is_closed():  # closed: jobd is exiting, nothing to stop or reload
                return
            self._queued.add(number)
            self._loop.call_soon(run, number)

        return received

    def _drain(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        signal.set_wakeup_fd(self._previous_wakeup)
        if not self._loop.is_closed():
            self._loop.remove_reader(self._wake_read.fileno())
        self._wake_read.close()
        self._wake_write.close()
