"""The mark of the job ids handed out, beside the jobs' output (jobd.job_id_mark): what a start reads instead of
listing output/. The starts themselves are in tests/test_backup.py (a restored copy, a start that lists nothing)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from jobd.job_id_mark import MARK, STEP, JobIdMark
from jobd.model import JobSpec, JobState
from jobd.store import Store


def test_the_mark_is_raised_before_each_id_past_it_is_handed_out_once_a_step(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.mkdir()
    store = Store(str(tmp_path / "jobd.sqlite3"))
    store.open()
    mark = JobIdMark(str(output))
    marks: list[int] = []

    def cover(highest: int) -> None:
        assert store.last_id("job") < highest  # before the insert
        mark.cover(highest)
        marks.append(int((output / MARK).read_text()))

    store.before_job_ids = cover
    try:
        spec = JobSpec(command=("/bin/true",), queue="q")
        while store.last_id("job") < 2 * STEP + 10:
            store.insert_jobs([spec], [JobState.QUEUED], 1.0, [1.0])
            assert marks[-1] >= store.last_id("job")
            batch = [JobSpec(command=("/bin/true",), queue="q", key=f"k{store.last_id('job') % 7}")] * 3
            store.insert_jobs(batch, [JobState.QUEUED] * 3, 1.0, [1.0] * 3)  # some keys exist: fewer ids than specs
            assert marks[-1] >= store.last_id("job")
    finally:
        store.close()
    assert sorted(set(marks)) == [1 + STEP, 1 + STEP + STEP + 1, 1 + 3 * STEP + 2]


def test_a_mark_that_cannot_be_written_is_removed_so_that_the_next_start_lists_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mark left as it was while ids went past it would hide, after a restore, the output of the jobs above it."""
    output = tmp_path / "output"
    output.mkdir()
    mark = JobIdMark(str(output))
    mark.cover(1)
    assert mark.read() == 1 + STEP
    (output / f"{MARK}.partial").mkdir()  # where the new mark is written: it cannot be opened for writing
    caplog.set_level(logging.WARNING)
    mark.cover(2 + STEP)
    assert not (output / MARK).exists()
    assert (
        f"{output / MARK}, cannot be written (Is a directory): it is removed, and the next start lists" in caplog.text
    )
    assert JobIdMark(str(output)).read() is None
    mark.cover(3 + STEP)  # not tried again at every job, nor said again
    assert caplog.text.count("cannot be written") == 1


@pytest.mark.parametrize("text", ["", "12ab\n", "-5\n"])
def test_a_mark_jobd_did_not_write_is_no_mark(tmp_path: Path, text: str) -> None:
    (tmp_path / MARK).write_text(text)
    assert JobIdMark(str(tmp_path)).read() is None
