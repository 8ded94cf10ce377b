"""The timerfd shim against the real kernel: the kernel does the waiting (select), never a sleep."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator

import pytest

from jobd import linux

FLAGS = linux.TFD_CLOEXEC | linux.TFD_NONBLOCK


@pytest.fixture
def timer() -> Iterator[int]:
    fd = linux.timerfd_create(linux.CLOCK_REALTIME, FLAGS)
    yield fd
    os.close(fd)


def test_absolute_timer_expires_at_its_time(timer: int) -> None:
    due = time.clock_gettime(time.CLOCK_REALTIME) + 0.05
    linux.timerfd_settime(timer, linux.TFD_TIMER_ABSTIME, due)
    assert linux.read_expirations(timer) == 0  # not yet: a non-blocking read says nothing expired
    readable, _, _ = select.select([timer], [], [], 5.0)
    assert readable == [timer]
    assert time.clock_gettime(time.CLOCK_REALTIME) >= due
    assert linux.read_expirations(timer) == 1


def test_relative_timer_and_disarm(timer: int) -> None:
    linux.timerfd_settime(timer, 0, 3600.0)
    linux.timerfd_settime(timer, 0, 0.0)  # 0 disarms
    assert select.select([timer], [], [], 0.05)[0] == []
    linux.timerfd_settime(timer, 0, 0.01)
    assert select.select([timer], [], [], 5.0)[0] == [timer]
    assert linux.read_expirations(timer) == 1


def test_flags_are_applied(timer: int) -> None:
    assert os.get_blocking(timer) is False
    assert os.get_inheritable(timer) is False


def test_bad_fd_raises_oserror_with_errno() -> None:
    with pytest.raises(OSError) as raised:
        linux.timerfd_settime(-1, 0, 1.0)
    assert raised.value.errno == 9  # EBADF


@pytest.mark.skipif(os.geteuid() != 0, reason="setting CLOCK_REALTIME needs root")
def test_clock_set_cancels_the_timer(timer: int) -> None:
    """Setting the clock to its own value moves it by microseconds but still counts as a change for the kernel."""
    far = time.clock_gettime(time.CLOCK_REALTIME) + 3600
    linux.timerfd_settime(timer, linux.TFD_TIMER_ABSTIME | linux.TFD_TIMER_CANCEL_ON_SET, far)
    time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))
    assert select.select([timer], [], [], 5.0)[0] == [timer]
    assert linux.read_expirations(timer) is None
    # Re-armed, it waits again.
    linux.timerfd_settime(timer, linux.TFD_TIMER_ABSTIME | linux.TFD_TIMER_CANCEL_ON_SET, far)
    assert linux.read_expirations(timer) == 0
