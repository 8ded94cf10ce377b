"""Kernel interfaces Python 3.11's standard library lacks or hides: peer credentials of a Unix socket, timerfd."""

from __future__ import annotations

import ctypes
import errno
import functools
import math
import os
import socket
import struct
import time
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Who is at the other end of a connected AF_UNIX socket, as the kernel recorded it at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


# --- timerfd ------------------------------------------------------------------------------------------------------
# Schedules wait on one timerfd armed at an absolute CLOCK_REALTIME time with TFD_TIMER_CANCEL_ON_SET: the kernel
# wakes epoll at the due time, and also when the clock is set (settimeofday, an NTP step), so the caller re-arms
# instead of sleeping towards a time that moved. Python gets os.timerfd_* only in 3.13; before that, a ctypes
# binding of the three libc calls is enough (no compiled extension to build or ship).

# Values from <sys/timerfd.h>; TFD_CLOEXEC and TFD_NONBLOCK are defined as O_CLOEXEC and O_NONBLOCK.
TFD_TIMER_ABSTIME = 1 << 0
TFD_TIMER_CANCEL_ON_SET = 1 << 1
TFD_CLOEXEC = os.O_CLOEXEC
TFD_NONBLOCK = os.O_NONBLOCK
CLOCK_REALTIME = time.CLOCK_REALTIME

_EXPIRATIONS = struct.Struct("=Q")  # a read returns the number of expirations as a native uint64


class _Timespec(ctypes.Structure):
    # struct timespec { time_t tv_sec; long tv_nsec; }: time_t is a long on the 64-bit ABIs glibc and musl use.
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    # struct itimerspec { struct timespec it_interval; struct timespec it_value; }: the interval comes FIRST.
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _timespec(seconds: float) -> _Timespec:
    whole = math.floor(seconds)
    nanoseconds = min(round((seconds - whole) * 1e9), 999_999_999)  # rounding must not spill into the next second
    return _Timespec(whole, nanoseconds)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded into this process
    libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.timerfd_create.restype = ctypes.c_int
    libc.timerfd_settime.argtypes = (
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Itimerspec),
        ctypes.POINTER(_Itimerspec),
    )
    libc.timerfd_settime.restype = ctypes.c_int
    return libc


def _check(result: int) -> int:
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def timerfd_create(clockid: int, flags: int = 0) -> int:
    """A new timerfd on `clockid` (CLOCK_REALTIME for calendar times); flags: TFD_CLOEXEC | TFD_NONBLOCK."""
    if hasattr(os, "timerfd_create"):  # Python 3.13+
        fd: int = os.timerfd_create(clockid, flags=flags)
        return fd
    return _check(_libc().timerfd_create(clockid, flags))


def timerfd_settime(fd: int, flags: int, value: float, interval: float = 0.0) -> None:
    """Arm the timer: with TFD_TIMER_ABSTIME `value` is a time on its clock, else seconds from now.

    `value` 0 disarms it (the kernel's rule), so an absolute time is never 0 in practice; one in the past expires
    at once. `interval` > 0 repeats it. Add TFD_TIMER_CANCEL_ON_SET (with an absolute CLOCK_REALTIME time) to
    learn about clock changes through `read_expirations`.
    """
    if hasattr(os, "timerfd_settime"):  # Python 3.13+
        os.timerfd_settime(fd, flags=flags, initial=value, interval=interval)
        return
    new = _Itimerspec(_timespec(interval), _timespec(value))
    _check(_libc().timerfd_settime(fd, flags, ctypes.byref(new), None))


def read_expirations(fd: int) -> int | None:
    """How many times the timer expired since the last read; None when the clock was set (ECANCELED).

    None means a timer armed with TFD_TIMER_CANCEL_ON_SET was cancelled by a change of CLOCK_REALTIME: the caller
    must compute its due time again and re-arm. On a non-blocking fd with nothing expired yet, 0.
    """
    try:
        data = os.read(fd, _EXPIRATIONS.size)
    except BlockingIOError:
        return 0
    except OSError as error:
        if error.errno == errno.ECANCELED:
            return None
        raise
    (count,) = _EXPIRATIONS.unpack(data)
    return int(count)
