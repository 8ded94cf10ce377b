"""The event loop jobd runs on: asyncio's selector loop, with an accept() short of descriptors said once.

When accept() fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), asyncio (3.11 to 3.13) stops
watching the listening socket for a second and reports the failure, with a traceback, to the exception handler. But
it goes on calling accept() up to `backlog` (100) times in the same turn, each failing alike, each reported, and each
arming a timer of its own that starts watching again: every one of those wake-ups fails a hundred times more. While
the shortage lasted, the log grew by a hundred tracebacks more every second (30,000 lines, 12 MB in 30 s) and the
loop's work with it. Here the first failure of a turn ends that turn's accepts (the next accept() reports nothing
waiting, which asyncio takes as the end of the queue), so one timer looks again each second; the shortage is logged
once, as a warning, and its end as it ends.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("jobd")

_SHORT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})  # asyncio's own list
_REPORTED = "socket.accept() out of system resource"  # asyncio's message for them
_accept_connection: Callable[..., None] = asyncio.selector_events.BaseSelectorEventLoop._accept_connection  # type: ignore[attr-defined]


class _Listener:
    """A listening socket as asyncio's accepts of one turn see it: once an accept() is short of resources, the next
    ones report nothing waiting. Anything else is the socket's own."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.short: OSError | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        if self.short is not None:
            raise BlockingIOError(errno.EAGAIN, "not tried again in this turn")
        try:
            return self.sock.accept()
        except OSError as error:
            if error.errno in _SHORT:
                self.short = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class EventLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._short: set[int] = set()  # listening sockets whose last accept() was short of resources
        # Called in each turn of the loop that handles I/O (jobd.heap.QuietTrim.io_seen), or None. Timers are not
        # I/O: a turn that only runs them does not count.
        self.on_io: Callable[[], None] | None = None

    def _process_events(self, event_list: list[Any]) -> None:
        if event_list and self.on_io is not None:
            self.on_io()
        super()._process_events(event_list)  # type: ignore[misc]

    def _accept_connection(self, protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> None:
        # asyncio passes on what it was given, the _Listener of an earlier turn included (its retry timer).
        listener = _Listener(sock.sock if isinstance(sock, _Listener) else sock)
        _accept_connection(self, protocol_factory, listener, *args, **kwargs)
        fd = listener.sock.fileno()
        if listener.short is not None:
            if fd not in self._short:
                self._short.add(fd)
                log.warning(
                    "cannot accept clients on %s: %s; they wait to be accepted, tried again every second (open "
                    "files: see LimitNOFILE= and [daemon] max_connections)",
                    _where(listener.sock),
                    listener.short.strerror or listener.short,
                )
        elif fd in self._short:
            self._short.discard(fd)
            log.info("accepting clients on %s again", _where(listener.sock))

    def _start_serving(self, protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> None:
        # Also the retry of a listener short of resources, a second later: a stop may have closed the listener by
        # then (its jobs' kill_grace keeps the loop running), and asyncio watched descriptor -1, logging a ValueError
        # with its traceback for each listener.
        if (sock.sock if isinstance(sock, _Listener) else sock).fileno() < 0:
            return
        super()._start_serving(protocol_factory, sock, *args, **kwargs)  # type: ignore[misc]

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if context.get("message") == _REPORTED:
            return  # said once by _accept_connection, without a traceback a second
        super().call_exception_handler(context)


def _where(sock: socket.socket) -> str:
    try:
        address = sock.getsockname()
    except OSError:
        return f"descriptor {sock.fileno()}"
    if isinstance(address, bytes):  # an abstract unix socket
        return os.fsdecode(address)
    if isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}" if ":" in str(address[0]) else f"{address[0]}:{address[1]}"
    return str(address)
