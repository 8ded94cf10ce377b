"""jobd's log lines as journald and a terminal receive them: one write per record, a priority on every line for
the journal, a timestamp otherwise, whole even when larger than a pipe holds."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator

import pytest

from jobd.logline import HotLog, LineHandler, _sole_line_handler


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"jobd.test_logline.{id(handler)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    return logger


def _read_all(read_fd: int, write_fd: int) -> str:
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_journal_lines_carry_the_priority_of_their_record_on_every_line(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    log = _logger(LineHandler(write_fd, journal=True))
    log.debug("job=%d queued", 1)
    log.info("job=%d running", 1)
    log.warning("reload failed:\n  a.toml: bad key\n  b.toml: bad value")
    log.error("lost")
    log.critical("gone")
    assert _read_all(read_fd, write_fd).splitlines() == [
        "<7>job=1 queued",
        "<6>job=1 running",
        "<4>reload failed:",
        "<4>  a.toml: bad key",
        "<4>  b.toml: bad value",
        "<3>lost",
        "<2>gone",
    ]


def test_a_traceback_is_written_under_its_record_with_its_priority(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    log = _logger(LineHandler(write_fd, journal=True))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("callback failed")
    lines = _read_all(read_fd, write_fd).splitlines()
    assert lines[0] == "<3>callback failed"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines)


def test_terminal_lines_start_with_the_time_and_the_level(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    log = _logger(LineHandler(write_fd, journal=False))
    log.info("jobd %s ready", "0.1.0")
    try:
        raise KeyError("k")
    except KeyError:
        log.error("failed", exc_info=True)
    lines = _read_all(read_fd, write_fd).splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + " INFO jobd 0.1.0 ready", lines[0]), lines[0]
    assert re.fullmatch(stamp + " ERROR failed", lines[1]), lines[1]
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "KeyError: 'k'"


def test_text_that_is_not_utf8_is_escaped_not_dropped(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    log = _logger(LineHandler(write_fd, journal=True))
    name = os.fsdecode(b"caf\xe9")  # a file name that is not UTF-8 arrives as a surrogate escape
    log.info("missing %s", name)
    assert _read_all(read_fd, write_fd) == "<6>missing caf\\xe9\n"  # the byte, as everywhere jobd shows names


def test_a_lone_surrogate_that_is_no_byte_is_shown_as_its_code(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    log = _logger(LineHandler(write_fd, journal=True))
    log.info("odd %s and %s", "\ud800", os.fsdecode(b"\xff"))
    assert _read_all(read_fd, write_fd) == "<6>odd \\ud800 and \\xff\n"


def test_a_record_larger_than_the_pipe_arrives_whole(pipe: tuple[int, int]) -> None:
    """The pipe holds 64 KiB: the write blocks until the reader drains it, and no part is lost or repeated."""
    read_fd, write_fd = pipe
    log = _logger(LineHandler(write_fd, journal=False))
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 4096), b"")))
    reader.start()
    big = "".join(f"{n:07d}" for n in range(40_000))  # 280,000 characters, one line
    log.info("%s", big)
    log.info("after")
    os.close(write_fd)
    reader.join(timeout=30)
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" INFO " + big)
    assert lines[1].endswith(" INFO after")


def test_a_record_that_cannot_be_written_does_not_raise(pipe: tuple[int, int]) -> None:
    """A log line must never take jobd down: a failed write goes to logging's error report, not to the caller."""
    read_fd, write_fd = pipe
    handler = LineHandler(write_fd, journal=True)
    log = _logger(handler)
    os.close(read_fd)  # EPIPE from now on (Python ignores SIGPIPE)
    reported: list[logging.LogRecord] = []
    handler.handleError = reported.append  # type: ignore[method-assign]
    log.info("job=%d succeeded", 7)
    assert [record.getMessage() for record in reported] == ["job=7 succeeded"]


def test_hot_lines_are_the_lines_logging_writes(pipe: tuple[int, int]) -> None:
    """HotLog writes through the LineHandler without a LogRecord: the same line as logging's path, in both forms
    and at both levels a job's end takes."""
    read_fd, write_fd = pipe
    journal = _logger(LineHandler(write_fd, journal=True))
    hot = HotLog(journal.name)
    for level in (logging.INFO, logging.WARNING):
        assert _sole_line_handler(journal, level) is journal.handlers[0]  # the direct path is the one taken
    hot.info("job=%d %s in queue %s", 1, "queued", os.fsdecode(b"caf\xe9"))
    journal.info("job=%d %s in queue %s", 1, "queued", os.fsdecode(b"caf\xe9"))
    hot.log(logging.WARNING, "job=%d %s (attempt %d %s, %s)", 1, "failed", 1, "failed", "exit code 3")
    journal.warning("job=%d %s (attempt %d %s, %s)", 1, "failed", 1, "failed", "exit code 3")
    terminal = _logger(LineHandler(write_fd, journal=False))
    HotLog(terminal.name).info("job=%d running (attempt %d, pid %d)", 1, 1, 4242)
    terminal.info("job=%d running (attempt %d, pid %d)", 1, 1, 4242)
    HotLog(terminal.name).log(logging.WARNING, "job=%d failed", 1)
    terminal.warning("job=%d failed", 1)
    lines = _read_all(read_fd, write_fd).splitlines()
    assert (
        lines[:4] == ["<6>job=1 queued in queue caf\\xe9"] * 2 + ["<4>job=1 failed (attempt 1 failed, exit code 3)"] * 2
    )
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert [
        re.fullmatch(stamp + " INFO job=1 running \\(attempt 1, pid 4242\\)", line) is not None for line in lines[4:6]
    ] == [
        True,
        True,
    ], lines
    assert [re.fullmatch(stamp + " WARNING job=1 failed", line) is not None for line in lines[6:]] == [True, True], (
        lines
    )


def test_hot_lines_go_through_logging_wherever_else_they_would_go(pipe: tuple[int, int]) -> None:
    """Another handler beside the LineHandler (a test's caplog), a filter, or a level that leaves INFO out: the
    lines take logging's own path, so that each of those sees them as it would see any record."""
    read_fd, write_fd = pipe
    log = _logger(LineHandler(write_fd, journal=True))
    hot = HotLog(log.name)
    seen: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = seen.append  # type: ignore[method-assign]
    log.addHandler(collector)
    hot.info("job=%d succeeded", 1)  # both handlers
    log.removeHandler(collector)
    log.addFilter(lambda record: "secret" not in record.getMessage())
    hot.info("job=%d secret", 2)  # filtered out
    log.filters.clear()
    log.setLevel(logging.WARNING)
    hot.info("job=%d succeeded", 3)  # below the level
    log.setLevel(logging.DEBUG)
    log.handlers[0].setLevel(logging.WARNING)  # the handler's own level: INFO goes to logging, which drops it there
    assert _sole_line_handler(log, logging.INFO) is None
    assert _sole_line_handler(log, logging.WARNING) is log.handlers[0]
    hot.info("job=%d succeeded", 5)
    hot.log(logging.WARNING, "job=%d failed", 6)
    log.handlers[0].setLevel(logging.NOTSET)
    child = logging.getLogger(log.name + ".child")  # propagating to the handler's logger: still the direct path
    assert _sole_line_handler(child, logging.INFO) is log.handlers[0]
    HotLog(child.name).info("job=%d succeeded", 4)
    assert [record.getMessage() for record in seen] == ["job=1 succeeded"]
    assert _read_all(read_fd, write_fd).splitlines() == ["<6>job=1 succeeded", "<4>job=6 failed", "<6>job=4 succeeded"]


def test_a_hot_line_that_cannot_be_written_does_not_raise(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    handler = LineHandler(write_fd, journal=True)
    log = _logger(handler)
    os.close(read_fd)  # EPIPE from now on
    reported: list[logging.LogRecord] = []
    handler.handleError = reported.append  # type: ignore[method-assign]
    HotLog(log.name).info("job=%d succeeded", 7)
    assert [record.getMessage() for record in reported] == ["job=7 succeeded"]
