"""api.AfterReplyWork, the work a call hands over to be done once its reply is on its way: a piece that fails is
logged and the pieces after it still run (each committed job must still be queued), and outside a call work is
done at once. The daemon's side of it (replies before events, cancel right behind a submit) is in test_protocol.py.
"""

from __future__ import annotations

import logging

import pytest

from jobd.api import AfterReplyWork


def test_a_failing_piece_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    def broken() -> None:
        done.append("broken")
        raise RuntimeError("the engine could not queue job 2")

    work = AfterReplyWork()
    work.begin()
    work.add(lambda: done.append("job 1"))
    work.add(broken)
    work.add(lambda: done.append("job 3"))
    assert done == []  # kept until the reply is made
    with caplog.at_level(logging.ERROR, logger="jobd.api"):
        work.run()
    assert done == ["job 1", "broken", "job 3"]
    [record] = [r for r in caplog.records if r.name == "jobd.api"]
    assert record.getMessage() == "the work after a reply failed"
    assert record.exc_info is not None and "could not queue job 2" in str(record.exc_info[1])


def test_outside_a_call_work_is_done_at_once() -> None:
    done: list[int] = []
    work = AfterReplyWork()
    work.add(lambda: done.append(1))  # before any call
    assert done == [1]
    work.begin()
    work.add(lambda: done.append(2))
    work.run()
    work.add(lambda: done.append(3))  # after the reply: a waiting method's later part
    assert done == [1, 2, 3]
    work.run()  # nothing left over to run twice
    assert done == [1, 2, 3]
