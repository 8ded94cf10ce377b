"""jobd.loop_signals in this process: signals reach their handlers on the loop, none lost, bursts merged."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobd.loop_signals import LoopSignals

DEADLINE = 10.0  # for a handler that should run in the loop's next turn; only a lost signal waits this long


def run_with_signals(scenario: Callable[[LoopSignals, dict[int, int], asyncio.Event], Any]) -> dict[int, int]:
    """Run `scenario(signals, calls, called)` on a fresh loop with SIGUSR1 and SIGUSR2 routed to counters."""
    calls = {signal.SIGUSR1: 0, signal.SIGUSR2: 0}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        called = asyncio.Event()

        def count(number: int) -> Callable[[], None]:
            def handler() -> None:
                calls[number] += 1
                called.set()

            return handler

        signals = LoopSignals(loop, {number: count(number) for number in calls})
        try:
            await scenario(signals, calls, called)
        finally:
            signals.close()

    before = {number: signal.getsignal(number) for number in calls}
    asyncio.run(main())
    assert {number: signal.getsignal(number) for number in calls} == before  # close() put them back
    return calls


def test_a_signal_is_not_lost_when_the_wakeup_socket_is_full() -> None:
    """What asyncio's add_signal_handler lost: its byte finds the socket full, and it told which signal came."""

    async def scenario(signals: LoopSignals, calls: dict[int, int], called: asyncio.Event) -> None:
        with pytest.raises(BlockingIOError):
            while True:
                signals._wake_write.send(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.wait_for(called.wait(), DEADLINE)

    assert run_with_signals(scenario) == {signal.SIGUSR1: 1, signal.SIGUSR2: 0}


def test_a_signal_taken_by_another_thread_wakes_the_loop_from_epoll_wait() -> None:
    """Delivered to another thread (an executor's) while the loop sleeps in epoll_wait(): the interpreter runs the
    handler in the main thread only, so only the byte the signal writes into the wake-up socket ends that wait.
    Without it the loop slept on (here until the deadline; in jobd, its next timer: a day, for a SIGTERM)."""

    async def scenario(signals: LoopSignals, calls: dict[int, int], called: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_native_id()
        handled = threading.Event()
        missed: list[str] = []

        def signal_once_the_loop_sleeps() -> None:
            wchan = Path(f"/proc/self/task/{loop_thread}/wchan")
            deadline = time.monotonic() + DEADLINE
            while "epoll" not in wchan.read_text() and time.monotonic() < deadline:
                os.sched_yield()  # the loop is about to sleep: microseconds
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)  # to this thread, not the loop's
            if not handled.wait(DEADLINE):
                missed.append("the loop slept on after the signal")
                loop.call_soon_threadsafe(called.set)  # end the test, which fails below

        sender = threading.Thread(target=signal_once_the_loop_sleeps)
        sender.start()
        # No timer on the loop: only the signal's wake-up, or the sender giving up, ends this wait.
        await called.wait()
        handled.set()
        sender.join()
        assert not missed, missed

    assert run_with_signals(scenario) == {signal.SIGUSR1: 0, signal.SIGUSR2: 1}


def test_a_signal_repeated_before_its_handler_ran_is_merged_and_others_are_kept() -> None:
    async def scenario(signals: LoopSignals, calls: dict[int, int], called: asyncio.Event) -> None:
        for _ in range(5):  # all before the loop's next turn: one run of the handler
            os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        await asyncio.wait_for(called.wait(), DEADLINE)
        await asyncio.sleep(0)  # one more turn: both handlers were queued in the same one
        assert calls == {signal.SIGUSR1: 1, signal.SIGUSR2: 1}
        called.clear()
        os.kill(os.getpid(), signal.SIGUSR1)  # after its run: a new one
        await asyncio.wait_for(called.wait(), DEADLINE)

    assert run_with_signals(scenario) == {signal.SIGUSR1: 2, signal.SIGUSR2: 1}
