"""Giving the C library's free memory back to the system once jobd goes quiet after a burst of work.

A burst (thousands of submits and jobs, large job.list pages, many connections) leaves jobd's resident memory well
above what it uses once the burst is over: glibc keeps freed memory in its heap for the next allocations, and gives
back on its own only what lies at the top of the heap, above the last block in use. What a burst freed below a block
still in use (a hole left by a 256 KiB socket read, SQLite's page cache grown meanwhile) stays resident for the life
of the process. malloc_trim(0) hands every free page of every arena back to the kernel (madvise(MADV_DONTNEED); glibc
2.8 and later), at the cost of a walk over the free chunks and of a page fault for each page used again later.

So it is called once, when jobd has gone quiet: no I/O at all on its event loop (no client, no job's pipe or exit,
no inotify, no schedule's timerfd) for QUIET_SECONDS. The event loop tells QuietTrim of each turn that handled I/O
(jobd.eventloop.EventLoop.on_io): the first one after a quiet spell arms a timer; while I/O goes on the timer, when
it fires, only notes that and is armed again (the loop is awake for the work anyway: one timer per QUIET_SECONDS);
once a whole QUIET_SECONDS passed without I/O it trims and is not armed again until I/O comes. An idle jobd is
never woken for this, and a busy one never trims in the middle of its work. docs/BENCHMARKS.md ("Memory under a
steady load", "After a burst") has the figures that chose this over glibc's tunables in the unit's environment
(MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ cost every socket read an mmap), and why PYTHONMALLOC=malloc, which
would let the trim reach Python's own free memory too, is left to the administrator (13-18% more CPU per submit).

Without glibc's malloc_trim (musl), nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger("jobd")

# Seconds without any I/O after which jobd counts as quiet and trims. Long enough that the pauses within a burst (a
# client's think time, a queue waiting for its next job) do not trim between two pieces of work; short enough that
# the memory goes back soon after a burst.
QUIET_SECONDS = 5.0
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(pad), or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library already loaded into this process
    except AttributeError:
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim


def _resident_kb() -> int:
    """This process's resident memory (VmRSS), from /proc/self/statm: one short read."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_KB


class QuietTrim:
    def __init__(self, loop: asyncio.AbstractEventLoop, quiet: float = QUIET_SECONDS) -> None:
        self._loop = loop
        self._quiet = quiet
        self._trim = _malloc_trim()
        self._timer: asyncio.TimerHandle | None = None
        self._io_since_armed = False

    def io_seen(self) -> None:
        """A turn of the event loop handled I/O. Called for each such turn: an attribute set, mostly."""
        if self._timer is None:
            if self._trim is not None:
                self._timer = self._loop.call_later(self._quiet, self._quiet_yet)
        else:
            self._io_since_armed = True

    def close(self) -> None:
        """jobd is stopping: no more trims."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._trim = None

    def _quiet_yet(self) -> None:
        if self._io_since_armed:
            # Still busy: look again in QUIET_SECONDS. No kernel event says "nothing happened for a while"; the timer
            # exists only while I/O goes on, when the loop is awake anyway. no-poll-ok.
            self._io_since_armed = False
            self._timer = self._loop.call_later(self._quiet, self._quiet_yet)
            return
        self._timer = None
        assert self._trim is not None  # close() cancels the timer
        if not log.isEnabledFor(logging.DEBUG):
            self._trim(0)
            return
        before = _resident_kb()
        self._trim(0)
        log.debug(
            "quiet for %gs: free heap memory given back to the system, resident memory %d kB -> %d kB",
            self._quiet,
            before,
            _resident_kb(),
        )
