"""jobd/forked.py: work done in a forked child that the kernel bounds. Real forks, real pipes, real signals."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from jobd import forked
from jobd.errors import InvalidParams

MEMORY = 64 * 1024 * 1024


def run(work: Callable[[], bytes], seconds: float = 30.0) -> bytes:
    return asyncio.run(forked.run(work, seconds=seconds, memory=MEMORY))


def _open_files() -> bytes:
    """What the child holds open: descriptor -> what it leads to (the listing's own descriptor left out)."""
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
        if target != f"/proc/{os.getpid()}/fd":
            held[int(name)] = target
    return json.dumps(held).encode()


def test_the_answer_of_the_work_comes_back() -> None:
    assert run(lambda: b"x" * 300_000) == b"x" * 300_000  # more than a pipe holds: read while it is written


def test_the_child_holds_nothing_of_its_parent_but_its_pipe(tmp_path: Path) -> None:
    """A child that outlived a killed jobd held the lock on its state directory and its listening sockets: the next
    jobd could not start until it ended."""
    with open(tmp_path / "jobd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = {int(fd): target for fd, target in json.loads(run(_open_files)).items()}
    beyond_stdio = [target for fd, target in held.items() if fd > 2]
    assert len(beyond_stdio) == 1 and beyond_stdio[0].startswith("pipe:"), held


def test_the_child_has_its_time_and_memory_bounded_by_the_kernel() -> None:
    def limits() -> bytes:
        with open("/proc/self/statm", "rb") as statm:
            size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        cpu = resource.getrlimit(resource.RLIMIT_CPU)
        address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
        return json.dumps([cpu, address_space - size]).encode()

    cpu, room = json.loads(run(limits, seconds=0.5))
    assert cpu == [2, 3]  # 0.5 s rounded up, and one more: SIGXCPU, then SIGKILL a second later
    assert 0 < room <= MEMORY


def test_work_that_does_not_end_in_time_is_killed() -> None:
    with pytest.raises(forked.TooLong):
        # A read of a pipe whose writer is the reader itself: it blocks in the kernel, as libxml2 runs on in C.
        run(lambda: os.read(os.pipe()[0], 1), seconds=0.2)


def test_a_refusal_by_the_work_comes_back_as_its_message() -> None:
    def refuse() -> bytes:
        raise InvalidParams("no such thing", parameter="x")

    with pytest.raises(forked.Refused, match=r"^no such thing$"):
        run(refuse)


def test_any_other_exception_in_the_work_comes_back_as_a_fault_with_its_traceback() -> None:
    """A bug in the work came back as its message alone, as a refusal does: its caller told the client it had asked
    for something wrong, and nobody saw the traceback."""

    def faulty() -> bytes:
        return etree.tostring(etree.XPath("/response")(None))  # lxml's TypeError: no document to search

    with pytest.raises(forked.Faulted, match=r"^TypeError: Invalid input object: NoneType$") as caught:
        run(faulty)
    assert caught.value.traceback.startswith("Traceback (most recent call last):\n")
    assert ", in faulty\n" in caught.value.traceback
    assert caught.value.traceback.endswith("TypeError: Invalid input object: NoneType\n")


def test_a_child_that_dies_without_answering_is_said_to() -> None:
    with pytest.raises(forked.Failed, match=r"^it ended with signal SIGKILL$"):
        run(lambda: os.kill(os.getpid(), signal.SIGKILL) or b"")
