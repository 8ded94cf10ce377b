"""Descriptors in an epoll set of jobd's own, which the event loop watches as a single descriptor (epoll waits on
epoll as on any file).

Two uses: the pipes of every running child (proc.py), where loop.add_reader() and remove_reader() would cost several
µs of Python each (a Handle, a selector key, checks for a transport on the fd) against one epoll_ctl() and a dict
entry here; and the sockets of clients whose hang-up jobd looks out for (server.py), registered for no event at all
so that only EPOLLHUP or EPOLLERR wakes the set, which the loop's own selector cannot express.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable


class EpollSet:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()  # close-on-exec, as everything Python opens
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def add(self, fd: int, events: int, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `fd` has one of `events` (EPOLLHUP and EPOLLERR always count) until removed. An
        exception it raises is logged with its traceback, as asyncio logs a callback's, and `fd` leaves the set."""
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        """Stop watching `fd`; call before closing it, or in the callback that closed it."""
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):  # closed already: the kernel took it out of the set itself
                self._epoll.unregister(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._callbacks.clear()

    def _ready(self) -> None:
        # A non-blocking look at what is ready, called only when the loop saw this set readable.
        for fd, _ in self._epoll.poll(0):  # no-poll-ok: the loop's epoll said this set is readable
            # A callback may remove others, or a closed fd's number be registered anew, while the list is handled:
            # one gone is skipped, and a new one woken for nothing finds nothing to do (a pipe: EAGAIN).
            callback = self._callbacks.get(fd)
            if callback is None:
                continue
            try:
                callback()
            except Exception as error:
                # Contained to this descriptor, as asyncio contains a callback of its own: raised on, it skipped the
                # rest of the batch, and a callback raising at every turn (its event is level-triggered) left the
                # others after it unserved for good. Its descriptor leaves the set: kept, it would wake the loop and
                # raise again at every turn (jobd spinning, a traceback each time).
                if self._callbacks.get(fd) is callback:
                    self.remove(fd)
                said = f"Exception in callback {callback!r} (fd {fd}, in jobd's epoll set)"
                self._loop.call_exception_handler({"message": said, "exception": error})
