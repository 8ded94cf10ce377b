"""How jobd's log records become lines on standard error: for journald, each line prefixed with its syslog
priority (`<6>`); for a terminal or a file, a timestamp and the level name. One write(2) per record.

Every job transition is logged, so a record sits on the path of every job (two or three per job): the handler
here does what `logging.StreamHandler` and `logging.Formatter` do for jobd's lines at a third less cost (no lock,
no text layer and flush per record, no format string to interpret, the time of day formatted once per second).
`Throttle` keeps a line that may come thousands of times a second (a full disk) from drowning the others.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable
from typing import ClassVar

from jobd.model import printable

# syslog priorities (sd-daemon(3)) by logging level
PRIORITIES: dict[int, int] = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class LineHandler(logging.Handler):
    """Writes each record to the file descriptor `fd` as whole lines, in one write(2) per record so that lines
    stay whole whoever else writes to the descriptor (a crash's stack dump from faulthandler)."""

    # A record's exception and stack go through the standard formatter, which also caches the exception's text.
    _DETAIL: ClassVar[logging.Formatter] = logging.Formatter("%(message)s")

    def __init__(self, fd: int, *, journal: bool) -> None:
        super().__init__()
        self._fd = fd
        self._journal = journal
        self._second = -1
        self._second_text = ""

    def handle(self, record: logging.LogRecord) -> bool:
        # Handler.handle() would take this handler's lock around emit(): the descriptor needs none, since one
        # write(2) carries the whole record, and jobd sets no filters on its handler.
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.line(record))
        except Exception:  # logging's rule: a failed record is reported, never raised
            self.handleError(record)

    def write_message(self, levelno: int, message: str) -> None:
        """A message of level `levelno` written as emit() writes a record's (HotLog, which has no record)."""
        try:
            self._write(self._line(levelno, logging.getLevelName(levelno), time.time(), message))
        except Exception:  # reported as logging reports a failed record
            self.handleError(logging.makeLogRecord({"levelno": levelno, "msg": message}))

    def _write(self, text: str) -> None:
        try:
            data = text.encode()
        except UnicodeEncodeError:  # a name the OS gave undecoded: each of its bytes shown as \xNN
            data = printable(text).encode()
        while data:  # a write to a pipe or socket may be cut short by a signal
            data = data[os.write(self._fd, data) :]

    def line(self, record: logging.LogRecord) -> str:
        """The record as it is written, newline-terminated."""
        if record.exc_info or record.exc_text or record.stack_info:
            message = self._DETAIL.format(record)
        else:
            message = record.getMessage()
        return self._line(record.levelno, record.levelname, record.created, message)

    def _line(self, levelno: int, levelname: str, created: float, message: str) -> str:
        if self._journal:
            return journal_text(message, PRIORITIES.get(levelno, 6))
        return f"{self._time_of(created)} {levelname} {message}\n"

    def _time_of(self, created: float) -> str:
        """`2026-11-29 22:30:04,123`: localtime() and strftime() once per second, not per record."""
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._second_text},{int((created - second) * 1000):03d}"


def journal_text(message: str, priority: int) -> str:
    """`message` as journald files it at syslog `priority` (3: err), newline-terminated. journald takes each line of
    a stream as an entry of its own: every line carries the prefix, or the rest of a multi-line error (a reload's
    list of problems, a traceback, argparse's usage) would be filed as info."""
    prefix = f"<{priority}>"
    return prefix + message.replace("\n", "\n" + prefix) + "\n"


class HotLog:
    """The lines of a logger that come on the path of every job and submit (three per job: queued, running, its
    end), written by jobd's LineHandler directly when it is the one place they go: building a LogRecord and passing
    it down the loggers cost a serial submit 6 % of its instructions (callgrind: 36,000 of 599,000 per submit).
    Wherever else they would go (another handler, a filter: a test's caplog) they take logging's own path."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def info(self, message: str, *args: object) -> None:
        self.log(logging.INFO, message, *args)

    def log(self, level: int, message: str, *args: object) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        handler = _sole_line_handler(logger, level)
        if handler is None:
            logger.log(level, message, *args)
        else:
            handler.write_message(level, message % args)


def _sole_line_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    """The LineHandler that alone takes `logger`'s records of `level`, unfiltered (on the root logger, where setup()
    puts it); None when they would go anywhere else, or through a filter."""
    current = logger
    while not current.handlers:
        if current.filters or current.disabled or not current.propagate or current.parent is None:
            return None
        current = current.parent
    if current.filters or len(current.handlers) != 1 or (current.propagate and current.parent is not None):
        return None
    [handler] = current.handlers
    if type(handler) is not LineHandler or handler.filters or handler.level > level:
        return None
    return handler


class Throttle:
    """Whether a line that can repeat without end is logged now: the first one of each key, then at most one in
    `every` seconds, which tells how many were held back meanwhile. Past journald's rate limit (by default 10,000
    lines in 30 s) jobd's other lines would be dropped, among them the one saying the trouble has ended."""

    KEYS_AT_MOST = 1000  # keys are few (request names, error messages); this only bounds the unforeseen

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[Hashable, tuple[float, int]] = {}  # key: when last logged, lines held back since

    def due(self, key: Hashable) -> tuple[int, float] | None:
        """None to hold this line back (it is counted); else how many were held back since the last line of the key
        was logged, and how many seconds ago that was."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) >= self.KEYS_AT_MOST:
            self._last.clear()
        self._last[key] = (now, 0)
        return (0, 0.0) if last is None else (last[1], now - last[0])


def setup(level: str, fd: int, *, journal: bool) -> None:
    """Send the records of `level` and above to `fd`; `journal`: the lines go to journald (priority prefixes)."""
    # These switches (the logging documentation's "Optimization" section) skip what jobd's lines never show: the
    # caller's source position (a stack walk per record), thread and process names, and getpid() per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=level.upper(), handlers=[LineHandler(fd, journal=journal)])
    logging.getLogger("peewee").setLevel(logging.INFO)  # its DEBUG is every SQL statement
