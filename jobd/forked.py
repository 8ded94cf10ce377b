"""Work a client can make run away, done in a forked copy of jobd that the kernel bounds in time and memory.

Some work a client asks for cannot be cut short from Python once it has started: an evQueue `xpathfilter` is
evaluated by libxml2, whose string functions (contains, substring-before, translate, concat) and node-set
comparisons run in C for as long as their arguments make them, the square of a response's text or node count
(a `contains()` on a 400 KB instance parameter held jobd's event loop 55 s: longer than the watchdog). Done in the
event loop, every client, job end and watchdog ping waits for it. Done in a child made by fork(2), it runs on a copy
of the data it needs, the loop goes on meanwhile, and the child is killed (SIGKILL through its pidfd) once its time
is up; its address space is limited as well (RLIMIT_AS), so that it cannot take the machine's memory either.

The child answers through a pipe: `=` and the work's bytes; `!` and the message of a refusal (a JobdError the work
raised: the client's request was wrong, or its memory ran out); or `#`, the type and message of any other exception
(a bug in jobd, which its parent logs with the traceback that follows them after a NUL). It ends with os._exit(),
running none of jobd's exit handlers, and touches nothing it inherited but that pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import signal
import traceback
from collections.abc import Callable

from jobd.errors import JobdError, OutOfResources

_READ_CHUNK = 1 << 16


class TooLong(Exception):
    """The work did not end within its time: the child was killed."""


class Refused(Exception):
    """The work refused what it was given: it raised a JobdError (whose message is this one's) or ran out of memory."""


class Faulted(Exception):
    """The work raised any other exception: a bug. The message is its type and message, `traceback` the child's."""

    def __init__(self, message: str, traceback: str) -> None:
        super().__init__(message)
        self.traceback = traceback


class Failed(Exception):
    """The child ended without an answer (killed by a signal: its memory ran out in C code, which then crashed)."""


async def run(work: Callable[[], bytes], *, seconds: float, memory: int) -> bytes:
    """`work()`'s bytes, computed in a forked child given `seconds` and `memory` bytes more than it starts with.

    TooLong once `seconds` have passed, Refused or Faulted if the work raised (a JobdError or MemoryError, or any
    other exception), Failed if the child died, OutOfResources if no child can be made now. Cancelled, the child is
    killed."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as error:
        os.close(read_fd)
        os.close(write_fd)
        raise OutOfResources(f"cannot fork to evaluate the request: {error.strerror}; ask again later") from None
    if pid == 0:  # pragma: no cover - the child; it never returns
        os.close(read_fd)
        _child(work, write_fd, seconds, memory)
    os.close(write_fd)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # no descriptor for it: the child cannot be watched, so it must not run
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # it is dying of SIGKILL: this returns at once
        os.close(read_fd)
        raise
    os.set_blocking(read_fd, False)
    received: list[bytes] = []
    exited: asyncio.Future[None] = loop.create_future()
    loop.add_reader(read_fd, _read_into, read_fd, received)
    loop.add_reader(pidfd, _settle, exited)
    reaped = False
    try:
        await asyncio.wait_for(exited, seconds)
        _, status = os.waitpid(pid, 0)  # its pidfd is readable: it has exited, and this returns at once
        reaped = True
    except TimeoutError:
        raise TooLong from None
    finally:
        loop.remove_reader(read_fd)
        loop.remove_reader(pidfd)
        if reaped:
            os.close(pidfd)
        else:  # out of time, or cancelled: killed, and reaped once it is gone
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            loop.add_reader(pidfd, _reap, loop, pidfd, pid)
    # Every writer is gone: what is left in the pipe is read without waiting, up to its end of file.
    while _read_into(read_fd, received):
        pass
    os.close(read_fd)
    answer = b"".join(received)
    if os.WIFSIGNALED(status) or not answer:
        raise Failed(f"it ended with {_ending(status)}")
    if answer[:1] == b"!":
        raise Refused(answer[1:].decode(errors="replace"))
    if answer[:1] == b"#":
        summary, _, child_traceback = answer[1:].decode(errors="replace").partition("\0")
        raise Faulted(summary, child_traceback)
    return answer[1:]


def _read_into(fd: int, received: list[bytes]) -> bool:
    """Read what the pipe holds now into `received`; False at its end of file (or nothing to read now)."""
    try:
        data = os.read(fd, _READ_CHUNK)
    except BlockingIOError:
        return False
    received.append(data)
    return bool(data)


def _settle(exited: asyncio.Future[None]) -> None:
    if not exited.done():
        exited.set_result(None)


def _reap(loop: asyncio.AbstractEventLoop, pidfd: int, pid: int) -> None:
    loop.remove_reader(pidfd)
    os.waitpid(pid, 0)
    os.close(pidfd)


def _ending(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)} and no answer"


def _child(work: Callable[[], bytes], write_fd: int, seconds: float, memory: int) -> None:  # pragma: no cover
    """The forked child's life: `work`'s answer written to `write_fd`, then its end."""
    status = 70  # EX_SOFTWARE, should even the answer fail to be written
    try:
        # jobd's signal handlers would wake its loop through the wake-up socket the child shares with it.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        signal.set_wakeup_fd(-1)
        # Nothing of jobd's but the pipe: a child that outlived a killed jobd would otherwise hold the lock on the
        # state directory and the listening sockets, and the next jobd could not start until it ended.
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
        # Nor does it outlive its time when nobody is left to kill it: the kernel does (SIGXCPU, then SIGKILL).
        cpu = math.ceil(seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        with open("/proc/self/statm", "rb") as statm:
            size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + memory, resource.RLIM_INFINITY))
        try:
            answer = b"=" + work()
        except MemoryError:
            answer = b"!it needs more memory than the " + str(memory >> 20).encode() + b" MiB it may have"
        except JobdError as refusal:
            answer = b"!" + str(refusal).encode(errors="replace")
        except Exception as error:
            fault = f"{type(error).__name__}: {error}\0{traceback.format_exc()}"
            answer = b"#" + fault.encode(errors="replace")
        view = memoryview(answer)
        while view:
            view = view[os.write(write_fd, view) :]
        status = 0
    finally:
        with contextlib.suppress(BaseException):
            os._exit(status)
