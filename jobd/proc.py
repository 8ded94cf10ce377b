"""One child process's life as the kernel sees it: spawn, output capture, fd 3 progress, signals, reaping.

Each child is the leader of its own session and process group (`start_new_session`: setsid), so a timeout or a
cancel reaches everything it started, and no job shares jobd's controlling terminal when jobd has one (run in the
foreground: a job, perhaps of another user, could otherwise push input into that terminal with TIOCSTI). Its exit
is observed through a pidfd registered with the asyncio (epoll) loop — no SIGCHLD handler, no thread per child, no
polling — and reaped with wait4() for its resource usage.

stdout and stderr are pipes the daemon drains into files with splice(2) (no copy through user space) up to
`max_output` bytes; beyond that bytes are read and dropped, so memory stays flat however much a job prints. The
job is complete when its leader exits: whatever is still in the pipes is drained and the pipes are closed, so a
grandchild that keeps stdout open cannot delay completion. The pipes of all children are watched in one epoll
set of jobd's own, itself watched by the loop (jobd/epollset.py).

fd 3 carries evQueue's progress/log protocol: a line `%NN` sets progress, `%%text` logs `%text`, `\\close` stops
parsing, any other line is a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import select
import signal
import struct
import subprocess
import termios
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

from jobd import locale_text, logline
from jobd.epollset import EpollSet
from jobd.errors import SHORTAGE_ERRNOS
from jobd.values import value

log = logging.getLogger("jobd.proc")

PROGRESS_FD = 3
MAX_LOG_LINE = 64 * 1024
_SPLICE_CHUNK = 1 << 20
_DISCARD_CHUNK = 1 << 16
# fd 3 is parsed line by line in Python (about a µs a line): a chunk of short lines holds the loop, and every other
# client waits, for as long as it takes. 4 KiB of them is a millisecond or two.
_LOG_CHUNK = 1 << 12
# A stream whose output file could not be created for want of descriptors or memory is read again this long after
# (a timer, one per held stream, for as long as the shortage lasts): no kernel event says a descriptor is free
# again, and jobd frees its own in many places (a job's end, a client leaving). Meanwhile the job blocks on its
# full pipe, and nothing it writes is lost.
OUTPUT_RETRY_SECONDS = 1.0

_slot_devnull: int | None = None


def reserve_progress_fd() -> None:
    """Keep fd 3 of the daemon permanently open on /dev/null, as the slot children's fd 3 is put in.

    subprocess can pass an fd to a child only under its own number. So before each spawn the progress pipe is
    dup2()ed onto fd 3 and afterwards /dev/null is dup2()ed back. dup2 replaces atomically, so no other open() in
    the daemon can ever be given fd 3. Call once at start-up, before anything else opens files (whatever fd 3 held
    then was inherited by accident and is not used by jobd).
    """
    global _slot_devnull
    if _slot_devnull is None:
        _slot_devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if _slot_devnull == PROGRESS_FD:  # fd 3 was free: keep /dev/null there and another copy to restore from
            _slot_devnull = os.dup(PROGRESS_FD)
        os.dup2(_slot_devnull, PROGRESS_FD, inheritable=False)


def close_inherited_fds_on_exec() -> None:
    """Mark every descriptor above stderr close-on-exec: those jobd was started with, too.

    Children are spawned without subprocess's close_fds sweep (see _popen_with_fd3), so what reaches a job is
    decided here and by the rule that every descriptor jobd opens is close-on-exec (Python's default for what it
    opens; O_CLOEXEC, TFD_CLOEXEC, IN_CLOEXEC, MFD_CLOEXEC where jobd asks the kernel itself). Only descriptors
    from whoever started jobd (a shell, a supervisor) could lack the flag: call this at start-up, after systemd's
    sockets are taken and before any job starts.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                os.set_inheritable(fd, False)


class SpawnError(Exception):
    """The program could not be started (not found, not executable, bad working directory, …).

    `transient` marks a shortage on jobd's side (out of file descriptors, processes, memory): not the job's fault,
    so worth trying again shortly."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@value
class LaunchSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None
    stdin: bytes | None
    stdout_path: str
    stderr_path: str
    log_path: str
    max_output: int
    merge_stderr: bool = False  # the child's stderr is its stdout (2>&1)
    cwd_fallback: str | None = None  # entered instead when `cwd` cannot be (a home its user may not enter: "/")
    # Another user than jobd's to run as (None: jobd's own): uid, gid and supplementary groups (initgroups' list).
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    # argv[0] lies in jobd's state directory, which the user cannot enter: jobd opens it, gives the file to the
    # user (chown, mode 0500) and the child executes it through /proc/self/fd (a script's interpreter reads it there).
    program_by_fd: bool = False


@value
class ExitInfo:
    exit_code: int | None  # 0–255 when the leader exited
    signal: int | None  # the signal that killed the leader
    cpu_user: float
    cpu_system: float
    max_rss_kib: int
    stdout_bytes: int
    stderr_bytes: int
    cut_streams: tuple[str, ...]  # those that lost bytes: beyond max_output, or to a failed write (a full disk)
    internal_error: str | None = None  # a bug of jobd's ended the attempt (Child._broke): what it raised


class _LazyFile:
    """An output file created (with its directory) on the first byte: a silent job costs no file at all.

    A write that fails (disk full, state directory gone) is reported once and the file takes nothing more: the job
    keeps running, and what it prints after that is counted as dropped.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: str | None = None
        self.created = False  # made at a first byte: a file not at `path` since then was removed under jobd
        self._fd: int | None = None

    @property
    def opened(self) -> bool:
        return self._fd is not None

    def fd(self) -> int:
        if self._fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            try:
                self._fd = os.open(self.path, flags, 0o640)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
                self._fd = os.open(self.path, flags, 0o640)
            self.created = True
        return self._fd

    def open_now(self) -> OSError | None:
        """Create the file if it is not yet: the error if jobd is short of descriptors or memory now (to be tried
        again later), None otherwise (the file is open, or failed for good and takes nothing more)."""
        if self.error is None and self._fd is None:
            try:
                self.fd()
            except OSError as error:
                if error.errno in SHORTAGE_ERRNOS:
                    return error
                self.failed(error)
        return None

    def write(self, data: bytes) -> int:
        """Bytes written (fewer than given if the disk filled up)."""
        if self.error is not None:
            return 0
        try:
            written = os.write(self.fd(), data)
        except OSError as error:
            self.failed(error)
            return 0
        if written < len(data):
            # The disk filled up during this write; writing the rest asks the kernel why (ENOSPC, EDQUOT, EFBIG),
            # so that the log names the cause as it does when a write fails outright.
            try:
                written += os.write(self.fd(), data[written:])
            except OSError as error:
                self.failed(error)
                return written
            if written < len(data):
                self.failed(OSError(errno.ENOSPC, "short write (no space left on device?)"))
        return written

    def failed(self, error: OSError) -> None:
        if self.error is None:
            self.error = f"cannot write {self.path}: {error.strerror}"
            _log_output_failure(self.error, error.strerror or str(error))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# A file that cannot be written is said once, but on a full disk every job that prints fails alike, two streams each,
# at hundreds of jobs a second: the first failure of each cause (strerror) is logged, then one line a minute at most.
# Each attempt still records which of its streams lost bytes (job.output's truncated, jobctl log).
_output_failures = logline.Throttle(every=60.0)


def _log_output_failure(message: str, cause: str) -> None:
    due = _output_failures.due(cause)
    if due is None:
        return
    held, seconds = due
    more = f" ({held} more output files failed so in the last {seconds:.0f} s)" if held else ""
    log.error("%s; what the job writes there from now on is dropped%s", message, more)


def log_held_output(path: str, error: OSError, where: str = "in its pipe") -> None:
    """Say that an output file cannot be created now for want of descriptors or memory, and that what goes there
    waits (`where`) meanwhile: the first time for each cause, then at most once a minute."""
    _warn_throttled(
        ("held", error.strerror),
        "output files waited so",
        "cannot create %s: %s; the job's output waits %s until jobd can create it (tried again every %gs)",
        path,
        error.strerror,
        where,
        OUTPUT_RETRY_SECONDS,
    )


def log_ended_waiting(paths: list[str], pid: int) -> None:
    """Say that a job's leader has exited while its output waits for files jobd cannot create yet, and that its end
    waits for them: the first time, then at most once a minute."""
    _warn_throttled(
        "ended waiting",
        "jobs waited so",
        "pid %d has exited; its end waits until jobd can create %s for what it wrote there (tried again every %gs)",
        pid,
        " and ".join(paths),
        OUTPUT_RETRY_SECONDS,
    )


def _warn_throttled(cause: object, counted: str, message: str, *args: object) -> None:
    due = _output_failures.due(cause)
    if due is None:
        return
    held, seconds = due
    more = f" ({held} more {counted} in the last {seconds:.0f} s)" if held else ""
    log.warning(message + "%s", *args, more)


class _OutputSink:
    """Drains one pipe into a file, keeping at most `cap` bytes and counting the rest.

    Should the file not be created at the first byte for want of descriptors or memory, that first chunk is held
    (`held`) and the pipe is read no more until resume() can create it: the job blocks on its full pipe meanwhile
    (back-pressure), and nothing it writes is lost."""

    def __init__(self, read_fd: int, path: str, cap: int, on_data: Callable[[], None]) -> None:
        self.read_fd = read_fd
        self.file = _LazyFile(path)
        self.cap = cap
        self.kept = 0
        self.dropped = 0
        self.eof = False
        self.held = b""  # read from the pipe, not written: the file could not be created yet
        self._short: OSError | None = None  # why, while `held`
        self._splice = True
        self._on_data = on_data

    def resume(self) -> bool:
        """Create the file and write what is held; False (and nothing changed) while jobd is still short."""
        self._short = self.file.open_now()
        if self._short is not None:
            return False
        data, self.held = self.held, b""
        written = self.file.write(data)
        self.kept += written
        self.dropped += len(data) - written
        self._on_data()  # those following the output (job.output with wait) see it now
        return True

    def give_up(self) -> None:
        """jobd stops with the file still not created: it takes nothing more, and what is held and what the pipe
        still holds (read by drain_once) are counted as dropped, and said so."""
        if self.held and (short := self.file.open_now()) is not None:
            self.file.failed(short)

    def finish(self) -> None:
        """The job has ended: what is held is written if the file can be created now, else lost, and said so."""
        if self.held and not self.resume():
            assert self._short is not None
            self.file.failed(self._short)
            self.dropped += len(self.held)
            self.held = b""

    def drain_once(self) -> int:
        """Move one chunk: the bytes taken from the pipe, 0 once it is empty (EAGAIN) or closed (EOF), or while
        what was read is held."""
        if self.held and not self.resume():
            return 0
        try:
            n = self._keep() if self.kept < self.cap and self.file.error is None else self._drop()
        except BlockingIOError:
            return 0
        if n == 0:
            self.eof = True
            return 0
        self._on_data()
        return n

    def _keep(self) -> int:
        room = self.cap - self.kept
        if self.file.opened and self._splice:
            try:
                # SPLICE_F_NONBLOCK is needed although the pipe is O_NONBLOCK: splice() ignores that flag.
                n = os.splice(self.read_fd, self.file.fd(), min(room, _SPLICE_CHUNK), flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                raise
            except OSError as error:
                if error.errno != errno.EINVAL:
                    self.file.failed(error)
                    return self._drop()
                self._splice = False  # a file system without splice: copy through user space instead
                return self._keep()
            self.kept += n
            return n
        # The first chunk is read, not spliced, so that a pipe that only reports EOF creates no file.
        data = os.read(self.read_fd, min(room, _DISCARD_CHUNK))
        if data and (short := self.file.open_now()) is not None:
            self.held, self._short = data, short
            log_held_output(self.file.path, short)
            return len(data)
        written = self.file.write(data) if data else 0
        self.kept += written
        self.dropped += len(data) - written
        return len(data)

    def _drop(self) -> int:
        n = len(os.read(self.read_fd, _DISCARD_CHUNK))
        self.dropped += n
        return n

    def close(self) -> None:
        if self.read_fd >= 0:  # once: the number may be another descriptor's by a second call (Child._broke)
            os.close(self.read_fd)
            self.read_fd = -1
        self.file.close()


class _ProgressReader:
    """Parses evQueue's fd 3 protocol from a pipe; log lines go to a capped file and to a callback.

    The callback hears what the file keeps: once a log line does not fit whole under the cap, it hears that line's
    kept part (perhaps empty) with `cut` true, and no log line after it; progress lines go on being told.

    Should the file not be created at the first log line for want of descriptors or memory, that line and those
    after it are held (`held`), unparsed, and the pipe is read no more until resume() can create it, as _OutputSink
    holds its output: the job blocks on its full pipe meanwhile, and its progress and log lines are told later but
    whole and in their order."""

    def __init__(
        self,
        read_fd: int,
        path: str,
        cap: int,
        on_progress: Callable[[int], None],
        on_log: Callable[[str, bool], None],
    ) -> None:
        self.read_fd = read_fd
        self.file = _LazyFile(path)
        self.cap = cap
        self.kept = 0
        self.dropped = 0  # bytes of log lines beyond the cap
        self.eof = False
        self.held: list[bytes] = []  # whole lines read and not yet told: the file could not be created yet
        self._short: OSError | None = None  # why, while `held`
        self._partial = b""
        self._closed_by_job = False
        self._cut = False  # a log line went beyond the cap: later log lines are neither kept nor told
        self._on_progress = on_progress
        self._on_log = on_log

    def resume(self) -> bool:
        """Tell the lines held; False (and nothing told) while jobd still cannot create the file."""
        lines, self.held = self.held, []
        self._tell(lines)
        return not self.held

    def give_up(self) -> None:
        """jobd stops with the file still not created: it takes no line, and the lines held and those the pipe still
        holds (read by drain_once) are told all the same, the file counting them as dropped, and saying so."""
        if self.held and (short := self.file.open_now()) is not None:
            self.file.failed(short)

    def finish(self) -> None:
        """The job has ended: a last line without its newline is a line (no more of it will come, whether or not its
        end-of-file was read), and what is held is told now. Its log lines go to the file if it can be created now;
        if not, the file loses them, and says so, while on_log hears them all the same."""
        if self._partial and not self._closed_by_job:
            self.held.append(self._partial)
        self._partial = b""
        if self.held and not self.resume():
            assert self._short is not None
            self.file.failed(self._short)  # the file takes nothing more: its lines are counted as dropped
            self.resume()

    def drain_once(self) -> int:
        """Read and parse one chunk: the bytes taken from the pipe, 0 once it is empty (EAGAIN) or closed (EOF), or
        while lines are held."""
        if self.held and not self.resume():
            return 0
        try:
            data = os.read(self.read_fd, _LOG_CHUNK)
        except BlockingIOError:
            return 0
        if not data:
            self.eof = True
            if self._partial and not self._closed_by_job:  # a last line without its newline is a line
                self._tell([self._partial])
            self._partial = b""
        elif not self._closed_by_job:
            self._feed(data)
        if self.held:
            assert self._short is not None
            log_held_output(self.file.path, self._short)
        return len(data)

    def _feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LOG_LINE:  # an endless line: cut it rather than buffer it all
            lines.append(self._partial)
            self._partial = b""
        self._tell(lines)

    def _tell(self, lines: list[bytes]) -> None:
        """Tell each line in turn; from a log line whose file cannot be created now on, they are held."""
        for index, line in enumerate(lines):
            if self._closed_by_job:
                break
            if not self._line(line):
                self.held = lines[index:]
                break

    def _line(self, raw: bytes) -> bool:
        """Tell one line; False, and nothing told, if it is a log line whose file cannot be created now."""
        if raw == b"\\close":
            self._closed_by_job = True
            return True
        if raw.startswith(b"%") and not raw.startswith(b"%%"):
            digits = raw[1:].strip()
            if digits.isdigit():  # ASCII digits only, for bytes
                self._on_progress(_percent(digits))
                return True
        if raw.startswith(b"%%"):
            raw = raw[1:]
        if self._cut:  # ~10 µs a line saved for each listener, and listeners see what the file keeps
            self.dropped += len(raw) + 1
            return True
        if self.kept < self.cap and (short := self.file.open_now()) is not None:
            self._short = short
            return False
        written = self._write_log(raw)
        # Cut by the cap, not by a failed write (a full disk): those lines are still told, as the file lost them
        # for want of space, not by the job's choice of max_output.
        self._cut = written <= len(raw) and self.kept >= self.cap
        self._on_log(raw[:written].decode("utf-8", "replace"), self._cut)
        return True

    def _write_log(self, raw: bytes) -> int:
        """Write a log line and its newline as far as the cap allows; the bytes written."""
        line = raw + b"\n"
        room = self.cap - self.kept
        written = self.file.write(line[:room]) if room > 0 else 0
        self.kept += written
        self.dropped += len(line) - written
        return written

    def close(self) -> None:
        if self.read_fd >= 0:  # once: the number may be another descriptor's by a second call (Child._broke)
            os.close(self.read_fd)
            self.read_fd = -1
        self.file.close()


# The pipes of every running child (stdout, stderr, fd 3), registered as it starts and removed as it ends, are in
# one epoll set per loop (jobd/epollset.py): the end-of-file of all three pipes of an exiting child is one callback of
# the loop rather than three. The pidfd stays with the loop itself.
_pipe_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EpollSet] = weakref.WeakKeyDictionary()


def _pipe_watch(loop: asyncio.AbstractEventLoop) -> EpollSet:
    """The loop's pipe watch, made on its first child."""
    watch = _pipe_watches.get(loop)
    if watch is None:
        watch = _pipe_watches[loop] = EpollSet(loop)
    return watch


class Child:
    """A spawned job process; `on_exit` is called once, from the loop, after it has been reaped."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        start_time: int | None,
        loop: asyncio.AbstractEventLoop,
        sinks: tuple[_OutputSink, _OutputSink],
        progress: _ProgressReader,
        on_exit: Callable[[ExitInfo], None],
    ) -> None:
        self.pid = popen.pid
        self.start_time = start_time
        self._popen = popen
        self._loop = loop
        self._stdout, self._stderr = sinks
        self._progress = progress
        self._on_exit = on_exit
        self._reaped = False
        self._stopping = False
        # Once the leader is reaped: its exit, and the streams not finished yet (their file cannot be created yet).
        self._exit: tuple[int, resource.struct_rusage] | None = None
        self._open_streams: list[_OutputSink | _ProgressReader] = []
        self._end_timer: asyncio.TimerHandle | None = None
        self._letting_go = False
        self._end_waited = False  # said once
        self._kill_timer: asyncio.TimerHandle | None = None
        self._resume_timers: dict[int, asyncio.TimerHandle] = {}  # by read_fd: the held streams
        self._told = False  # on_exit was called
        self._broken: str | None = None  # what a callback of this child raised (_contained)
        self._pidfd = os.pidfd_open(popen.pid)
        registered: list[int] = []
        try:
            loop.add_reader(self._pidfd, self._contained, self._leader_exited)
            self._pipes = _pipe_watch(loop)
            for reader in (self._stdout, self._stderr, progress):
                self._pipes.add(reader.read_fd, select.EPOLLIN, functools.partial(self._contained, self._drain, reader))
                registered.append(reader.read_fd)
        except BaseException:  # no room for an epoll entry: undone, for spawn() to stop the child it cannot watch
            for fd in registered:
                self._pipes.remove(fd)
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            raise

    @classmethod
    def spawn(
        cls,
        spec: LaunchSpec,
        loop: asyncio.AbstractEventLoop,
        on_exit: Callable[[ExitInfo], None],
        on_progress: Callable[[int], None],
        on_log: Callable[[str, bool], None],
        on_output: Callable[[], None],
    ) -> Child:
        if _slot_devnull is None:
            raise RuntimeError("proc.reserve_progress_fd() must be called before spawning")
        if spec.uid is not None and os.geteuid() != 0:
            raise SpawnError(
                f"jobd runs as uid {os.geteuid()}, not as root, so it can run jobs only as itself, "
                f"not as uid {spec.uid} gid {spec.gid}; run jobd as root or set the task's user to jobd's",
                transient=False,
            )
        parent_ends: list[int] = []  # ours; closed again if the spawn fails
        child_ends: list[int] = []  # the child's copies; always closed here once it has them
        opened: list[_OutputSink | _ProgressReader] = []
        popen: subprocess.Popen[bytes] | None = None
        try:
            child_ends.append(_stdin_fd(spec.stdin))
            for _ in range(3):
                read_end, write_end = _pipe()
                parent_ends.append(read_end)
                child_ends.append(write_end)
            out_r, err_r, log_r = parent_ends
            if spec.merge_stderr:
                # fd 2 shares stdout's pipe; the stderr pipe is closed at once and its reader sees EOF.
                merged = os.dup(child_ends[1])
                os.close(child_ends[2])
                child_ends[2] = merged
            opened.append(_OutputSink(out_r, spec.stdout_path, spec.max_output, on_output))
            opened.append(_OutputSink(err_r, spec.stderr_path, spec.max_output, on_output))
            opened.append(_ProgressReader(log_r, spec.log_path, spec.max_output, on_progress, on_log))
            before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            popen = _popen_with_fd3(spec, *child_ends)
            after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        except UnicodeEncodeError as exc:
            raise SpawnError(_describe_unencodable(spec), transient=False) from exc
        except (OSError, subprocess.SubprocessError) as exc:
            if not isinstance(exc, OSError):  # _enter raised: the one SubprocessError Popen raises here
                raise SpawnError(_cwd_refused(spec), transient=False) from exc
            transient = exc.errno in _SHORT_OF_RESOURCES
            raise SpawnError(_describe_spawn_error(spec, exc), transient=transient) from exc
        finally:
            for fd in child_ends:
                os.close(fd)
            if popen is None:
                # Not started, whatever stopped it (a bug raises anything, not only OSError): our ends are closed
                # too, or jobd would hold three pipes for each failed start until it ran out of descriptors.
                for reader in opened:
                    reader.close()
                for fd in parent_ends[len(opened) :]:
                    os.close(fd)
        stdout, stderr, progress = opened
        assert isinstance(stdout, _OutputSink) and isinstance(stderr, _OutputSink)
        assert isinstance(progress, _ProgressReader)
        try:
            return cls(popen, _spawned_start_time(popen.pid, before, after), loop, (stdout, stderr), progress, on_exit)
        except Exception as exc:
            # The program started, but jobd has no descriptor or memory left to watch it (its pidfd, an epoll
            # entry), or a bug of jobd's stopped the watch being set up. Left running, nothing would ever reap it,
            # stop it at its time limit or record its end: it is killed now, and the start counts as failed.
            _kill_unwatched(popen)
            for reader in opened:
                reader.close()
            if not isinstance(exc, OSError):  # a bug: Engine._spawn records it as one, with its traceback
                raise
            program = spec.argv[0] if spec.argv else "?"
            raise SpawnError(
                f"cannot watch {program!r} once started, so it was stopped: {exc.strerror or exc}",
                transient=exc.errno in _SHORT_OF_RESOURCES,
            ) from exc

    def wrote(self, stream: str) -> bool:
        """Whether the output file of `stream` ("stdout", "stderr" or "log") was created: files are made at the
        first byte, so one that was and is not at its path now was removed."""
        streams: dict[str, _OutputSink | _ProgressReader] = {"stdout": self._stdout, "stderr": self._stderr}
        return streams.get(stream, self._progress).file.created

    def has_ended(self) -> bool:
        """Whether the leader has exited, even if the loop has not handled its exit yet (its pidfd is readable):
        a job that ended on its own just before jobd stops it (a cancel, a time limit, a shutdown) is then left to
        its own exit status, not recorded as stopped by jobd and run again."""
        if self._reaped:
            return True
        # One look at this descriptor, now; the loop keeps waiting on it as before.
        check = select.poll()  # no-poll-ok: a poll(2) set for one zero-timeout look, not a periodic check
        check.register(self._pidfd, select.POLLIN)
        return bool(check.poll(0))  # no-poll-ok: asked once, as a job is stopped; nothing repeats it

    def stop(self, grace: float) -> None:
        """SIGTERM to the whole process group, SIGKILL after `grace` seconds if the leader still lives."""
        if self._reaped or self._stopping:
            return
        self._stopping = True
        self._signal_group(signal.SIGTERM)
        self._kill_timer = self._loop.call_later(grace, self._signal_group, signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        # Safe only while the leader is not reaped: until then its pid, and so the group id, cannot be reused.
        if not self._reaped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def _drain(self, reader: _OutputSink | _ProgressReader) -> None:
        reader.drain_once()
        if reader.held:  # its file cannot be created now: read no more (fd 3 may be at its end-of-file already)
            self._pipes.remove(reader.read_fd)
            self._resume_later(reader)
        elif reader.eof:
            self._pipes.remove(reader.read_fd)

    def _resume_later(self, reader: _OutputSink | _ProgressReader) -> None:
        timer = self._loop.call_later(OUTPUT_RETRY_SECONDS, self._contained, self._resume, reader)
        self._resume_timers[reader.read_fd] = timer

    def _resume(self, reader: _OutputSink | _ProgressReader) -> None:
        del self._resume_timers[reader.read_fd]
        if not reader.resume():
            self._resume_later(reader)
            return
        if reader.eof:  # all of it was read before it was held: nothing more to watch
            return
        try:
            self._pipes.add(reader.read_fd, select.EPOLLIN, functools.partial(self._contained, self._drain, reader))
        except OSError:  # no memory for the epoll entry now: the pipe waits, as it did for its file
            self._resume_later(reader)

    def _leader_exited(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        if self._stopping:
            # The leader is gone but not reaped, so the group id is still ours: take the rest of the group too.
            self._signal_group(signal.SIGKILL)
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._reap()
        for timer in self._resume_timers.values():
            timer.cancel()
        self._resume_timers.clear()
        self._open_streams = [self._stdout, self._stderr, self._progress]
        for reader in self._open_streams:
            if not reader.eof:
                self._pipes.remove(reader.read_fd)
        self._end_streams()

    def _reap(self) -> None:
        # Nothing ever reaps our children but this line (no SIGCHLD handler, no asyncio child watcher).
        _, status, usage = os.wait4(self.pid, 0)
        self._reaped = True
        code = os.waitstatus_to_exitcode(status)
        self._popen.returncode = code  # tell the Popen object its child is reaped
        self._exit = code, usage

    def let_go(self) -> None:
        """jobd stops: an ended job whose output waits for its file to be created (_end_streams) waits no more; what
        cannot be written is counted as dropped, and said so. Also for a job still running, whose end comes later."""
        self._letting_go = True
        if self._end_timer is not None:
            self._end_timer.cancel()
            self._contained(self._end_streams)

    def _end_streams(self) -> None:
        """The leader is reaped: what each pipe holds now goes to its file, then the attempt ends. A held stream is
        written if its file can be created now (the pidfd closed freed a descriptor, and each stream closed frees
        more). One whose file still cannot be (the descriptors freed are above jobd's limit, another process took
        them) keeps its pipe, unread, and the end waits, tried again every OUTPUT_RETRY_SECONDS, as a running job
        waits on its full pipe: what the job wrote to it is not lost. A stop does not wait (let_go)."""
        self._end_timer = None
        while True:
            left = [reader for reader in self._open_streams if not self._stream_ended(reader)]
            if not left or len(left) == len(self._open_streams):  # all done, or none was: no descriptor was freed
                break
            self._open_streams = left  # those closed freed descriptors: the others may create their files now
        self._open_streams = left
        if self._open_streams:
            if not self._end_waited:
                self._end_waited = True
                log_ended_waiting([reader.file.path for reader in self._open_streams], self.pid)
            # no-poll-ok: only while jobd cannot create an ended job's output file (OUTPUT_RETRY_SECONDS says why)
            self._end_timer = self._loop.call_later(OUTPUT_RETRY_SECONDS, self._contained, self._end_streams)
            return
        self._tell_exit(None)

    def _tell_exit(self, internal_error: str | None) -> None:
        """Hand the reaped leader's end to on_exit, once."""
        assert self._exit is not None and not self._told
        self._told = True
        code, usage = self._exit
        info = ExitInfo(
            exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            cpu_user=usage.ru_utime,
            cpu_system=usage.ru_stime,
            max_rss_kib=usage.ru_maxrss,
            stdout_bytes=self._stdout.kept,
            stderr_bytes=self._stderr.kept,
            cut_streams=tuple(
                name
                for name, sink in (("stdout", self._stdout), ("stderr", self._stderr), ("log", self._progress))
                if sink.dropped or sink.file.error
            ),
            internal_error=internal_error,
        )
        self._on_exit(info)

    def _stream_ended(self, reader: _OutputSink | _ProgressReader) -> bool:
        """Whether `reader` is done with: what it held and what its pipe holds now are in its file (or, at a stop,
        counted as dropped), and it is closed. Not while its file still cannot be created."""
        if self._letting_go:
            reader.give_up()
        if reader.held and not reader.resume():
            return False
        if not reader.eof:  # what the pipe holds now, and no more (grandchildren may write to it for ever)
            _drain_what_is_buffered(reader)
            if reader.held:
                return False
        reader.finish()
        reader.close()
        return True

    # The containment of this child's callbacks. Every one the loop calls for it (its pidfd, its pipes, its timers)
    # runs in _contained: an exception there is a bug of jobd's or an input nobody foresaw, and left to asyncio it
    # was only logged, with whatever the callback was doing left half done (a `%NN` line of 5,000 digits stopped
    # the draining of a pipe: the job stayed `running` for ever, its time limit never came, and jobd could not
    # stop). Here it ends the attempt instead: the job's processes are killed, the leader reaped, its pipes closed,
    # and the end told with the error, which the engine records as the attempt's (outcome `lost`).

    def _contained(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception as error:
            self._broke(error)

    def _broke(self, error: Exception) -> None:
        if self._broken is not None:  # a second failure while ending: the first said it all
            log.error("pid %d: internal error again while its attempt ends", self.pid, exc_info=error)
            return
        self._broken = f"{type(error).__name__}: {error}"
        log.error(
            "pid %d: internal error watching the job; its attempt ends, its processes killed", self.pid, exc_info=error
        )
        for timer in (self._kill_timer, self._end_timer, *self._resume_timers.values()):
            if timer is not None:
                timer.cancel()
        self._resume_timers.clear()
        self._end_timer = None
        self._signal_group(signal.SIGKILL)  # the leader is not reaped yet, so the group id is still the job's
        for reader in (self._stdout, self._stderr, self._progress):
            self._pipes.remove(reader.read_fd)
            with contextlib.suppress(OSError):
                reader.close()
        if self._told:
            return  # on_exit itself failed: the end was handed over, the engine's to finish
        if not self._reaped and self._pidfd >= 0:
            # Its end, once SIGKILL has done its work: the pidfd says when, as for any job.
            self._loop.remove_reader(self._pidfd)
            self._loop.add_reader(self._pidfd, self._contained, self._reap_broken)
            return
        self._end_broken()

    def _reap_broken(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._end_broken()

    def _end_broken(self) -> None:
        if not self._reaped:  # the leader has exited (its pidfd was readable), SIGKILL or not
            try:
                self._reap()
            except ChildProcessError:  # reaped by the very code that failed
                self._reaped = True
        if self._exit is None:
            self._exit = -signal.SIGKILL, _NO_USAGE
        assert self._broken is not None
        self._tell_exit(self._broken)


_NO_USAGE = resource.struct_rusage((0.0, 0.0, *(0,) * 14))  # a leader whose end jobd could not read


def _percent(digits: bytes) -> int:
    """The progress a `%NN` line sets, clamped to 0-100. Its digits are the job's to choose, as many as a log line
    holds (64 KiB): int() refuses more than 4,300 of them (Python's guard against quadratic conversions), and its
    ValueError, raised while the job's pipes were drained, left the job `running` for ever and jobd unable to stop."""
    significant = digits.lstrip(b"0")
    return 100 if len(significant) > 3 else min(100, int(significant or b"0"))


def _drain_what_is_buffered(reader: _OutputSink | _ProgressReader) -> None:
    """Take what the pipe holds now, and no more: a grandchild that keeps writing to it after the leader's exit
    would otherwise keep this loop, and with it the whole event loop, busy for as long as it writes."""
    left = struct.unpack("i", fcntl.ioctl(reader.read_fd, termios.FIONREAD, b"\0" * 4))[0]
    while left > 0 and (moved := reader.drain_once()):
        left -= moved


def _pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        os.set_blocking(read_fd, False)
    except BaseException:  # not handed to the caller yet: the caller cannot close them
        os.close(read_fd)
        os.close(write_fd)
        raise
    return read_fd, write_fd


def _stdin_fd(data: bytes | None) -> int:
    if data is None:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    # An anonymous memory file: no pipe to feed (a job that never reads stdin cannot block us) and nothing on disk.
    fd = os.memfd_create("jobd-stdin", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:  # no memory for the data, say: not handed to the caller yet, so closed here
        os.close(fd)
        raise
    return fd


def _popen_with_fd3(spec: LaunchSpec, stdin_fd: int, out_w: int, err_w: int, log_w: int) -> subprocess.Popen[bytes]:
    assert _slot_devnull is not None
    argv = list(spec.argv)
    pass_fds = [PROGRESS_FD]
    program_fd = _open_program_for(spec) if spec.program_by_fd else None
    if program_fd is not None:
        argv[0] = f"/proc/self/fd/{program_fd}"
        pass_fds.append(program_fd)
    # No close_fds sweep for a job of jobd's own user: every other descriptor of jobd is close-on-exec (see
    # close_inherited_fds_on_exec), so the exec itself closes them. The sweep would have the child list
    # /proc/self/fd and close each descriptor before its exec while jobd waits in vfork: a quarter of the CPU
    # time of starting /bin/true, the child's and jobd's together (850-1,030 µs -> 650-720 µs). A job of another
    # user keeps the sweep as a second guard, since a descriptor reaching it would cross a privilege boundary;
    # its spawn cannot use vfork anyway.
    other_user = spec.uid is not None
    try:  # from here on, program_fd is closed and fd 3 given back to /dev/null, however the spawn goes
        os.dup2(log_w, PROGRESS_FD)  # inheritable: besides 0-2, the one descriptor a child is given
        return subprocess.Popen(
            argv,
            stdin=stdin_fd,
            stdout=out_w,
            stderr=err_w,
            close_fds=other_user,
            pass_fds=pass_fds if other_user else (),
            # Popen enters `cwd` before it switches to the job's user: as root, who may enter any directory. A job of
            # another user enters it once it is that user (_enter), and cannot start where that user may not go.
            cwd=None if other_user else spec.cwd,
            preexec_fn=functools.partial(_enter, spec.cwd, spec.cwd_fallback) if other_user and spec.cwd else None,
            env=dict(spec.env),
            start_new_session=True,  # its own process group too, and no controlling terminal (see the top)
            # setgroups, setregid, setreuid in the child, in that order, after the fork and before the exec
            user=spec.uid,
            group=spec.gid,
            extra_groups=list(spec.groups) if spec.uid is not None else None,
        )
    finally:
        os.dup2(_slot_devnull, PROGRESS_FD, inheritable=False)
        if program_fd is not None:
            os.close(program_fd)


def _enter(directory: str, fallback: str | None) -> None:
    """A job's working directory, entered in the child once it runs as the job's user (Popen's preexec_fn, which runs
    after the switch of user: the one piece of Python between a fork and an exec, and only for jobs of another user,
    whose spawn forks anyway). A failure raises, and Popen then raises SubprocessError (see _cwd_refused)."""
    try:
        os.chdir(directory)
    except OSError:
        if fallback is None:
            raise
        os.chdir(fallback)


def _cwd_refused(spec: LaunchSpec) -> str:
    """Why a job of another user could not enter its working directory: Popen says only that _enter raised."""
    assert spec.cwd is not None
    if not os.path.isdir(spec.cwd):
        reason = "No such file or directory" if not os.path.lexists(spec.cwd) else "Not a directory"
    else:
        reason = f"Permission denied to uid {spec.uid}"
    return f"cannot change to working directory {spec.cwd!r}: {reason}"


def _open_program_for(spec: LaunchSpec) -> int:
    fd = os.open(spec.argv[0], os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if spec.uid is not None:
            os.fchown(fd, spec.uid, spec.gid if spec.gid is not None else -1)
        os.fchmod(fd, 0o500)
    except OSError:
        os.close(fd)
        raise
    return fd


# What a spawn fails with when jobd, not the job, is short of something: the job waits and is tried again.
_SHORT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOSPC)


def _kill_unwatched(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a child just started, and reap its leader. The wait blocks, but not for long:
    the child has only just run exec and has no way to outlive SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


# What a start short of a resource ran into, said after the kernel's words: fork()'s EAGAIN, "Resource temporarily
# unavailable", names no resource, and the administrator has to know which limit to raise.
_SHORT_OF = {
    errno.EAGAIN: "too many processes: the pids.max of jobd's cgroup (systemd's TasksMax=), or the user's RLIMIT_NPROC",
    errno.ENOMEM: "out of memory",
}


def _describe_spawn_error(spec: LaunchSpec, exc: OSError) -> str:
    program = spec.argv[0] if spec.argv else "?"
    if isinstance(exc, NotADirectoryError | FileNotFoundError) and spec.cwd is not None and exc.filename == spec.cwd:
        return f"cannot change to working directory {spec.cwd!r}: {exc.strerror}"
    cause = _SHORT_OF.get(exc.errno) if exc.errno is not None else None
    return f"cannot start {program!r}: {exc.strerror or exc}" + (f" ({cause})" if cause else "")


def _describe_unencodable(spec: LaunchSpec) -> str:
    """Why Popen could not encode the job's argv, environment or working directory. Python encodes them in the
    locale's encoding (os.fsencode), as the job, which inherits jobd's LANG and LC_ALL, reads them: in a locale that is
    not UTF-8 (fr_FR.ISO-8859-1), text it lacks ("日本") cannot be passed. Said of the value, not as a bug of jobd's."""
    program = spec.argv[0] if spec.argv else "?"
    values = [(f"argument {index}", item) for index, item in enumerate(spec.argv)]
    values += [(f"environment variable {name}", item) for name, item in spec.env.items()]  # names are ASCII
    values += [("working directory", spec.cwd)] if spec.cwd is not None else []
    what, text = next(((what, text) for what, text in values if not locale_text.encodable(text)), ("a value", ""))
    return f"cannot start {program!r}: its {what} {text!r} holds characters that {locale_text.why_not_encodable()}"


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks after boot, or None if there is no such process.

    A pid is reused once its process is reaped; (pid, start time) names one process for the life of the machine.
    """
    # os.open and one os.read rather than open(): no file object and buffer for one short read, at every spawn.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        raw = os.read(fd, 4096)  # the line is well under 1 KiB: the kernel hands it over whole
    except ProcessLookupError:  # the process went away between open and read
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses; fields after its last ')' are plain.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[19])  # field 22 of stat(5), counted from field 3


_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_boottime_checked = False  # the clock arithmetic below has been checked against /proc once in this process
_boottime_agrees = False


def _spawned_start_time(pid: int, before_ns: int, after_ns: int) -> int | None:
    """The start time of a child forked between two CLOCK_BOOTTIME readings, without reading /proc if possible.

    The kernel stamps a new process with CLOCK_BOOTTIME and /proc/PID/stat shows that stamp in whole clock ticks.
    When both readings fall in the same tick, so does the fork. Reading /proc/PID/stat instead costs tens of µs
    at each spawn (the child is busy exec'ing); it remains for the few spawns that straddle a tick, and the first
    spawn checks the arithmetic against it: a kernel that stamps differently is never trusted.
    """
    global _boottime_checked, _boottime_agrees
    tick = before_ns // _TICK_NS
    if after_ns // _TICK_NS != tick:
        return process_start_time(pid)
    if not _boottime_checked:
        from_proc = process_start_time(pid)
        _boottime_checked = True
        _boottime_agrees = from_proc == tick
        if not _boottime_agrees:
            log.warning("process start times: CLOCK_BOOTTIME gives %d, /proc %s; reading /proc", tick, from_proc)
        return from_proc
    return tick if _boottime_agrees else process_start_time(pid)


def kill_orphan_group(pid: int, start_time: int) -> bool:
    """SIGKILL what is left of the process group a previous jobd started: True if there was any.

    The group's id is its leader's pid. While the leader is that very process (same start time), the group is
    the job's. Once the leader has died (of the SIGPIPE a vanished jobd leaves it, say) its group may live on in
    its children, and a group of that number is still the job's: the kernel hands out no pid, and so no new group
    of that number, while any process is in the group. Only a pid that now names another process says the old
    group is gone (it was freed before that process could get the number). The one case left needs the group to
    die, the pid numbers to go round the whole pid space (kernel.pid_max, 32,768 to 4 million) to a process that
    makes a group of that number and exits, and that group's members to live on, all in the time of a restart.
    """
    found = process_start_time(pid)
    if found is not None and found != start_time:
        return False
    # Checked and signalled in two steps: the window is microseconds, and the leader is not ours to reap.
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
