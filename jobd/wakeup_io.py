"""jobctl's own blocking I/O, its standard input and its output, done so that a signal ends it whenever it comes.

Python runs a signal's handler between two of its own instructions; a system call the signal interrupts returns EINTR
to let it. A signal that comes after the interpreter last looked and before read(2) or write(2) blocks interrupts
nothing, and Ctrl-C's KeyboardInterrupt then waits until the input comes or the output's reader reads again: from a
terminal, or a pager that is not being scrolled, maybe never. So these wait in poll(2), on the descriptor and on the
reading end of Python's signal wake-up pipe (client.woken_by_signals sets it up; Client.signal_fd names it), which the
signal writes to whatever the process is doing, and only then read or write, when that cannot block.
"""

from __future__ import annotations

import contextlib
import os
import select


def read_to_end(fd: int, signal_fd: int | None) -> bytes:
    """All `fd` gives until its end (jobctl's standard input, for --stdin-file -)."""
    poller = _poller(fd, select.POLLIN, signal_fd)
    chunks: list[bytes] = []
    while True:
        if _ready(poller, fd, signal_fd):  # readable, at its end, or failed: read(2) returns at once and tells which
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def write_all(fd: int, data: bytes, signal_fd: int | None) -> None:
    """Writes `data` to `fd` (jobctl's standard output, for `log`), PIPE_BUF bytes at a time: poll(2) reports a pipe
    writable once that much room is free, so no write(2) blocks for a reader that has stopped reading (a pager)."""
    poller = _poller(fd, select.POLLOUT, signal_fd)
    left = memoryview(data)
    while left:
        if _ready(poller, fd, signal_fd):  # room, or an error (no reader left) that write(2) then raises at once
            left = left[os.write(fd, left[: select.PIPE_BUF]) :]


def _poller(fd: int, events: int, signal_fd: int | None) -> select.poll:
    poller = select.poll()  # no-poll-ok: poll(2), the system call: one blocking wait on two descriptors
    poller.register(fd, events)
    if signal_fd is not None:
        poller.register(signal_fd, select.POLLIN)
    return poller


def _ready(poller: select.poll, fd: int, signal_fd: int | None) -> bool:
    """Blocks until `fd` is ready or a signal comes; whether `fd` is ready. A signal's handler has run by the time
    this returns (Python runs pending handlers before its next call): Ctrl-C's raised KeyboardInterrupt there, any
    other lets the caller wait on."""
    ready = dict(poller.poll())  # no-poll-ok: blocks until the descriptor is ready or a signal comes
    if signal_fd is not None and signal_fd in ready:
        drain(signal_fd)
    return fd in ready


def drain(fd: int) -> None:
    """Empties the signal wake-up pipe, so that the next poll(2) blocks until another signal comes."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass
