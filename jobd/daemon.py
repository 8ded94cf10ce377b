"""jobd's main(): wiring, signals, systemd readiness and status, crash recovery at start, live reload, shutdown.

Start-up order matters: recovery runs before the socket listens, and READY=1 is sent only once both are done, so a
client that systemd lets in finds every accepted job already back in its queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import faulthandler
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterable, Sequence, Set
from typing import TYPE_CHECKING, Any, NoReturn

import sdnotify

from jobd import __version__, activation, config, logline, openfiles, proc
from jobd import early_signals as jobd_early_signals
from jobd.api import Api
from jobd.backup import BACKUP_DIR, BACKUP_DIR_MODE, Backups
from jobd.engine.callbacks import SHUTDOWN_TAKES as CALLBACKS_SHUTDOWN_TAKES
from jobd.engine.callbacks import Callbacks
from jobd.engine.core import STREAMS, Engine
from jobd.engine.http_task import load_aiohttp
from jobd.engine.instances import Instances
from jobd.engine.scheduler import Scheduler
from jobd.errors import ConfigError, OutOfResources, ShuttingDown, StartupError
from jobd.eventloop import EventLoop
from jobd.heap import QuietTrim
from jobd.job_id_mark import JobIdMark
from jobd.loop_signals import LoopSignals
from jobd.model import Config, host_port, iso
from jobd.server import Server
from jobd.store import DATABASE_ERRORS, Store, startup_failure

if TYPE_CHECKING:
    from jobd.http_api import HttpApi

log = logging.getLogger("jobd")

STATUS_INTERVAL = 0.1  # seconds between two STATUS= updates at most
# Seconds asked of systemd beyond what a step of a stop may take (a job's kill_grace, callbacks under way): to record
# the jobs and close down.
STOP_MARGIN = 5.0
# What each report of a start-up's progress asks of systemd (EXTEND_TIMEOUT_USEC): far more than one step of
# recovery takes (a fraction of a second), so only a start-up that stopped making progress runs out of time.
RECOVERY_EXTEND_SECONDS = 30
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: systemd shows it as "configuration error"
# A reload that could not read the files for want of descriptors or memory is done again this long after, as a job
# that could not start is (jobd.engine.decisions.RESOURCE_RETRY_DELAY), until it can be.
RELOAD_RETRY_SECONDS = 1.0
RELOAD_LATER = (
    f"the running configuration stays, and jobd reads the files again every {RELOAD_RETRY_SECONDS:g}s until it can"
)
# [daemon] keys a reload cannot apply: the sockets are bound and the database is held from the start on. A reload
# that changes one applies the rest and warns (as for [tcp] listen and [http] listen); docs/config.md, Reloading.
RESTART_ONLY_DAEMON_KEYS = ("socket", "evqueue_socket", "state_dir")


class _Notifier:
    """sd_notify through sdnotify's connection to NOTIFY_SOCKET, made non-blocking: if nobody reads it, a message is
    dropped rather than stalling the event loop (a blocking send to a full datagram queue waits for the reader
    forever). A message that cannot be sent is logged, once per reason: sdnotify itself would say nothing."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = None  # None: not under a service manager, or it cannot be reached
        self._told: set[int | None] = set()  # errnos already logged
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return
        try:
            # debug=True: sdnotify raises what stops it from connecting, instead of dropping every message after
            # without a word (a service manager never told READY=1 kills the start at its timeout, with no clue).
            self._socket = sdnotify.SystemdNotifier(debug=True).socket
        except OSError as error:
            log.warning(
                "cannot reach the service manager at NOTIFY_SOCKET=%s: %s (nothing will be told to it: not READY=1, "
                "not STATUS=)",
                address,
                error.strerror or error,
            )
            return
        self._socket.setblocking(False)

    def notify(self, text: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send(text.encode("ascii", "backslashreplace"))  # deliverable whatever the text holds
        except OSError as error:
            if error.errno not in self._told:
                self._told.add(error.errno)
                log.warning(
                    "cannot tell the service manager %s: %s (messages that cannot be sent are dropped)",
                    text.split("\n", 1)[0],
                    error.strerror or error,
                )


# What whoever sees the traffic of a listener other machines reach can do (neither protocol is encrypted).
TCP_IN_CLEAR = (
    "whoever sees the traffic reads every request and answer, can take a session over, and can guess a login's "
    "password offline from one login seen (SHA-1 and HMAC-SHA1 are fast); use it on a network you trust, or reach "
    "it through a tunnel (SSH, WireGuard, stunnel) to a loopback address"
)
HTTP_IN_CLEAR = (
    "whoever sees the traffic reads every bearer token sent, and can use it; put a TLS proxy in front of jobd and "
    "have jobd listen on a loopback address or a unix socket path"
)


def _warn_if_reachable_from_afar(what: str, address: tuple[str, int] | str | None, consequences: str) -> None:
    """Warn of a TCP listener bound to an address other than loopback, as it starts: it speaks in clear text."""
    if not isinstance(address, tuple):  # off, or a unix socket path
        return
    try:
        if ipaddress.ip_address(address[0]).is_loopback:
            return
    except ValueError:  # an address with a scope (fe80::1%eth0): a link, not loopback
        pass
    log.warning(
        "%s %s takes connections from other machines, in clear text: %s", what, host_port(*address), consequences
    )


def _warn_of_open_password_files(loaded: Config) -> None:
    """At the start and at each reload, until they are closed: the files every local user may read logins from."""
    for warning in config.open_password_files(loaded):
        log.warning("%s", warning)


def _fit_open_files(configuration: Config) -> None:
    """Raise the soft limit on open files to what `configuration` may need (jobd.openfiles), saying so; warn when the
    hard limit stops short of it."""
    fit = openfiles.fit(configuration)
    if fit.after > fit.before:
        log.info("raised the soft limit on open files from %d to %d", fit.before, fit.after)
    if fit.short:
        log.warning(
            "the configuration may need %d open files (%d per job slot, max_connections clients) but the hard limit "
            "is %d: past it, clients wait to be accepted and jobs are put back to start later; raise LimitNOFILE= "
            "(systemd) or lower queues' concurrency or max_connections",
            fit.needed,
            openfiles.PER_JOB_SLOT,
            fit.hard,
        )


def _lock_state_dir(state_dir: str) -> int:
    """Hold an exclusive lock on the state directory for the life of the process: a second jobd on the same state
    would recover (and kill) the first one's running jobs. The kernel drops the lock when the process dies."""
    path = os.path.join(state_dir, "jobd.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(f"another jobd (pid {holder}) is using the state directory {state_dir}") from None
    # The pid only tells a second jobd whom it found (above); the lock is the flock. A full disk (the lock file
    # empty or missing, or the page the truncation freed taken by whatever fills the disk) must not stop the start
    # for it, with no more than "[Errno 28] No space left on device": the database then says what it needs.
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as error:
        log.warning("cannot write jobd's pid into %s (%s): the lock is held all the same", path, error.strerror)
    return fd


# What may be at most allowed on the state directory's entries (docs/config.md, "Files and sockets"): nobody but
# jobd's user (and, for directories and output, its group) may read job output, scripts or the database.
STATE_MODES = {".": 0o750, "output": 0o750, "scripts": 0o700, BACKUP_DIR: BACKUP_DIR_MODE}
DATABASE_MODE = 0o600
DATABASE = "jobd.sqlite3"


def _refuse_a_lost_database(state_dir: str) -> None:
    """A state directory whose database is gone (or an empty file) but that still holds what it recorded (its WAL,
    its jobs' output) is not a new one: a database made anew would give out job ids again, and a new job 1 would show
    the old job 1's output to whoever may read the new one."""
    database = os.path.join(state_dir, DATABASE)
    # An empty file is no database either (SQLite takes it for a new one): what a power cut can leave of a file just
    # written (a restored copy), or a copy cut short. jobd's own database is never empty once it holds a job.
    try:
        empty = os.lstat(database).st_size == 0
    except FileNotFoundError:
        empty = None
    if empty is False:
        return
    left = [name for name in (DATABASE + "-wal", "output") if _holds_something(os.path.join(state_dir, name))]
    if left:
        what = "is empty (0 bytes)" if empty else "is missing"
        raise StartupError(
            f"the database {database} {what}, but {' and '.join(left)} in {state_dir} are left from it: restore "
            "the database from a backup, or move the state directory's contents away to start anew",
            permanent=True,
        )


def _holds_something(path: str) -> bool:
    """A file that is not empty, or a directory with an entry."""
    try:
        if os.path.isdir(path):
            with os.scandir(path) as entries:
                return any(True for _ in entries)
        return os.path.getsize(path) > 0
    except FileNotFoundError:
        return False


def _secure_state_dir(state_dir: str) -> None:
    """Tighten what an older jobd, or an administrator's umask, left more open; create the database file 0600 (its
    WAL and shared-memory files take its mode from SQLite)."""
    for name, most in STATE_MODES.items():
        _tighten(os.path.join(state_dir, name), most)
    # Made here, not by the first job's output file: os.makedirs gives the mode only to the last directory it makes,
    # and the next start would have tightened output/ with a warning.
    os.makedirs(os.path.join(state_dir, "output"), mode=STATE_MODES["output"], exist_ok=True)
    database = os.path.join(state_dir, DATABASE)
    os.close(os.open(database, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, DATABASE_MODE))
    for suffix in ("", "-wal", "-shm"):
        _tighten(database + suffix, DATABASE_MODE)


# Past this many names between the database's last job and the mark (a copy restored from long ago, a mark edited
# by hand), one listing of output/ costs less than looking each name up.
LOOKUPS_AT_MOST = 200_000
# A name looked up that is not there (an exception in Python) costs about as much as this many entries of a listing.
LOOKUP_COST = 3


def _check_output_against_the_database(store: Store, state_dir: str) -> JobIdMark:
    """Number new jobs past every job whose output directory is left and past every id the mark says may have been
    handed out, and remove the output files the database has no record of (a database restored from a copy), before
    recovery and before any id is handed out. The store raises the mark of the ids handed out (jobd.job_id_mark)
    from then on; it is returned, to be written exactly at a clean stop.

    Only the names between the database's last job and the mark are looked at, not the whole of output/ (one entry
    per job of the history); without a mark that can be trusted, output/ is listed once."""
    output = os.path.join(state_dir, "output")
    mark = JobIdMark(output)
    known = store.last_id("job")
    limit = mark.read()
    present: set[int] | None = None
    if limit is None or limit < known or limit - known > LOOKUPS_AT_MOST:  # < known: a jobd without marks went past
        present = _job_directories(output)
        highest = max(present, default=0)
    else:
        highest = max(
            (i for i in range(known + 1, limit + 1) if os.path.lexists(os.path.join(output, str(i)))), default=0
        )
    _number_jobs_past_their_output(store, output, highest)
    if limit is not None and limit > store.last_id("job"):  # a mark below the database's last job is not jobd's
        _number_jobs_past_the_mark(store, mark.path, limit)
    # Each directory of a job that may yet write output is looked up, unless they are so many that output/, which
    # holds at most one entry per job of the database, is cheaper to list (many jobs waiting, a short history).
    waiting = store.jobs_yet_to_write_output() if present is None or present else []
    if present is None and LOOKUP_COST * len(waiting) > known:
        present = _job_directories(output)
    # Before recovery, which may queue callbacks (under ids the discarded deliveries had) and reads the sizes of
    # the files of the attempts it finds lost.
    _remove_output_the_database_does_not_know(store, output, waiting if present is None else present & set(waiting))
    mark.cover(store.last_id("job"))
    store.before_job_ids = mark.cover
    return mark


def _job_directories(output: str) -> set[int]:
    """The jobs whose output directory is in `output` (one listing of it)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(output) as entries:
        return {number for entry in entries if (number := _number(entry.name)) is not None}
    return set()


def _number(text: str) -> int | None:
    """A decimal number as jobd writes it in a file name, or None."""
    return int(text) if text.isascii() and text.isdigit() else None


def _number_jobs_past_their_output(store: Store, output: str, highest: int) -> None:
    """New jobs take ids past `highest`, the last job whose output directory is left. A database restored from a
    copy (jobctl backup) lacks the jobs made after the copy, whose output is still there; so does one whose WAL was
    lost after a crash (deleted by a cleaning tool or by hand, cut short by a power cut with durability "crash"),
    with the jobs committed in it: a new job given one of their ids would show that job's output to its own readers
    until it writes its first byte. The warning names both causes: looking only for a restore no one made, an
    administrator would not look for what removed the WAL, which may remove it again."""
    known = store.reserve_ids("job", highest)
    if highest > known:
        log.warning(
            "%s holds the output of jobs up to %d, past the last job of the database (%d): the database lacks jobs "
            "it had, either restored from a copy or having lost its last commits after a crash (its WAL, %s-wal, "
            "deleted or cut short). New jobs take ids past %d, so that none shows their output. If no copy was "
            "restored, look for what removed or cut the WAL (a cleaning tool, a script, I/O errors in the kernel "
            "log); jobs %d-%d are unknown to jobd now (their clients may submit them again) and their output is not "
            "any job's (remove it by hand)",
            output,
            highest,
            known,
            store.path,
            highest,
            known + 1,
            highest,
        )


def _number_jobs_past_the_mark(store: Store, mark: str, limit: int) -> None:
    """New jobs take ids past `limit`, the mark of the ids that may have been handed out. A database that lacks its
    last commits (a power cut with durability "crash", a WAL lost or cut short, a copy restored) lacks jobs whose
    ids were answered to clients: given again, such an id would answer a client's job.get or job.wait with
    another job. The mark is written exactly at each clean stop, so only a start after a crash skips ids (fewer
    than jobd.job_id_mark.STEP), and those were perhaps handed out."""
    known = store.reserve_ids("job", limit)
    log.info(
        "%s says job ids up to %d may have been handed out, past the last job of the database (%d): jobd did not "
        "stop cleanly, or the database lost its last commits; new jobs are numbered from %d, so that no id is "
        "given twice",
        mark,
        limit,
        known,
        limit + 1,
    )


CALLBACK_OUTPUT = "callback-"  # STATE_DIR/output/JOB/callback-DELIVERY.stdout|stderr|log (jobd.engine.callbacks)


def _remove_output_the_database_does_not_know(store: Store, output: str, jobs_to_read: Iterable[int]) -> None:
    """Remove the output files of attempts and callback deliveries the database has no record of. A database
    restored from a copy (jobctl backup) lacks what its jobs did after the copy: a job that ran meanwhile runs
    again under the same attempt number, and a callback delivery made meanwhile has its id given again. A stream
    that stays empty creates no file, so the new attempt (or delivery) would show the old one's file as its own.

    Only the directories of `jobs_to_read`, those of the jobs that may yet write output, are read
    (Store.jobs_yet_to_write_output): any other job's attempts and deliveries are all on record. Here, at start-up,
    rather than at each attempt's start: an unlink per spawn would cost every job."""
    removed = 0
    jobs = 0
    for job_id in sorted(jobs_to_read):
        directory = os.path.join(output, str(job_id))
        try:
            with os.scandir(directory) as entries:
                files = [entry.name for entry in entries if not entry.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):  # most jobs waiting to start: their record is not read
            continue
        attempts, deliveries = store.output_on_record(job_id) if files else (0, set())
        stale = [name for name in files if not _on_record(name, attempts, deliveries)]
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed += 1
        jobs += bool(stale)
    if removed:
        log.warning(
            "removed %d output file%s of %d job%s in %s left by attempts or callback deliveries the database has no "
            "record of (a database restored from a copy, or one whose WAL was lost after a crash?): they would "
            "have been shown as the output of the attempts and deliveries to come under the same numbers",
            removed,
            "" if removed == 1 else "s",
            jobs,
            "" if jobs == 1 else "s",
            output,
        )


def _on_record(name: str, attempts: int, deliveries: Set[int]) -> bool:
    """Whether a file in a job's output directory is the output of an attempt or delivery the database records
    (`attempts` of them, the deliveries of those ids); files jobd does not write there are left alone."""
    stem, _, stream = name.rpartition(".")
    if stream not in STREAMS:
        return True
    number = _number(stem)
    if number is not None:
        return number <= attempts
    if stem.startswith(CALLBACK_OUTPUT):
        delivery = _number(stem.removeprefix(CALLBACK_OUTPUT))
        return delivery is None or delivery in deliveries
    return True


def _tighten(path: str, most: int) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~most and not stat.S_ISLNK(info.st_mode):
        log.warning("%s was mode %04o; tightening it to %04o", path, mode, mode & most)
        os.chmod(path, mode & most)


class Daemon:
    def __init__(
        self,
        dirs: Sequence[str],
        initial: Config,
        passed: dict[str, socket.socket] | None = None,
        watchdog: float | None = None,
        early_signals: Sequence[int] = (),
        config_dir: str | None = None,
        watcher: config.ConfigWatcher | None = None,
    ) -> None:
        """`passed`: the sockets systemd handed over, by name (jobd.activation); `watchdog`: the interval within
        which systemd wants WATCHDOG=1, or None; `early_signals`: SIGTERM, SIGINT or SIGHUP received while
        starting, before the event loop handled them (see main); `config_dir`: the --config-dir given, if any;
        `watcher`: watching the configuration since before `initial` was read (see main), or None."""
        self.dirs = list(dirs)
        self.config_dir = config_dir
        self.passed = dict(passed or {})
        self.watchdog = watchdog
        self._watchdog_timer: asyncio.TimerHandle | None = None
        self._quiet_trim: QuietTrim | None = None
        self.config = initial
        self._at_start = initial  # what only a restart changes (sockets, state directory, listeners) is as here
        self.started_at = time.time()
        # Uptime is counted on CLOCK_BOOTTIME, not as the wall clock's difference: that one goes wrong, negative even,
        # once the clock is set (an NTP step, `date -s`); BOOTTIME goes on through a suspend, as uptime(1)'s does.
        self._started_boottime = time.clock_gettime(time.CLOCK_BOOTTIME)
        self.notifier = _Notifier()
        self.last_reload: dict[str, Any] = {"at": iso(self.started_at), "ok": True, "error": None}
        self.stop_requested = asyncio.Event()
        self._early_signals = early_signals  # still filled by main's handlers until run() takes over
        self._ready = False  # READY=1 sent: a SIGHUP before it waits for it
        self._reload_when_ready = False
        self._reload_retry: asyncio.TimerHandle | None = None  # a reload short of descriptors, to be done again
        self._rebinding: asyncio.Task[None] | None = None  # a reload's look for socket files removed (reload)
        self._stopping = False
        state_dir = initial.daemon.state_dir
        try:
            os.makedirs(state_dir, mode=0o750, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # makedirs' own words are "[Errno 17] File exists"
            raise StartupError(
                f"the state directory {state_dir} ([daemon] state_dir) cannot be made: it, or a directory above it, "
                "exists and is not a directory",
                permanent=True,
            ) from None
        _fit_open_files(initial)
        _refuse_a_lost_database(state_dir)
        _secure_state_dir(state_dir)
        self._state_lock = _lock_state_dir(state_dir)
        self.store = Store(os.path.join(state_dir, "jobd.sqlite3"))
        self.store.open()
        self._job_id_mark = _check_output_against_the_database(self.store, state_dir)
        self.backups = Backups(self.store, state_dir)
        self.backups.remove_leftovers()
        load_aiohttp(initial)
        self.engine = Engine(initial, self.store)
        self.callbacks = Callbacks(self.engine, self.store)  # before recovery: a lost job's callbacks are queued
        self.instances = Instances(self.engine, self.store)
        self.scheduler = Scheduler(self.engine, self.instances, self.store)
        api = Api(self.engine, self, self.instances, self.scheduler)
        self.server = Server(api, initial.daemon.socket, self.passed)
        self.http: HttpApi | None = None
        http_socket = self.passed.get("http")
        listen = activation.socket_address(http_socket) if http_socket is not None else initial.http.listen
        if listen is not None:  # a change of [http] listen needs a restart
            from jobd.http_api import HttpApi  # with aiohttp: only when it listens (see jobd/engine/http_task.py)

            self.http = HttpApi(self.server.api, listen, lambda: len(self.server.connections))
        self.watcher = watcher
        self._status_timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        _warn_of_open_password_files(self.config)
        await self.server.bind()  # a socket that cannot be made stops us before recovery starts any job
        try:
            if self.http is not None:
                await self.http.bind(self.passed.get("http"), self.server.access)
            if self.passed:
                log.info(
                    "socket activation: serving on %s passed by systemd",
                    ", ".join(
                        f"{name} ({activation.socket_address(sock)})" for name, sock in sorted(self.passed.items())
                    ),
                )
            self.engine.recover(self._recovery_progress)
            self.instances.recover()
            if not self._stop_noted():  # else what is due waits for the next start, as the jobs put back do
                self.callbacks.start()
                self.scheduler.start()  # after recovery: a run that was going is found by its job or instance
        except BaseException:  # not starting after all: no socket file is left for clients to find
            await self.server.stop_listening()
            raise
        # Until here, SIGTERM, SIGINT and SIGHUP were only noted (jobd.early_signals), even during a long recovery,
        # which runs without the loop: such a signal neither killed jobd in the middle of it nor was lost. A stop
        # asked for by then starts no job: those put back wait in their queues for the next start.
        signals = LoopSignals(
            loop,
            {
                signal.SIGTERM: self.stop_requested.set,
                signal.SIGINT: self.stop_requested.set,
                signal.SIGHUP: self._on_sighup,
            },
        )
        try:
            await self._serve(loop)
        finally:
            signals.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """From recovery done to stopped: the signals noted during start-up first, then serve until a stop."""
        for number in self._early_signals:
            if number == signal.SIGHUP:
                self._on_sighup()
            else:
                self.stop_requested.set()
        if self.stop_requested.is_set():
            # Recovery is done and kept; nothing has started, nothing is served, and systemd is not told READY=1.
            log.info("a stop was asked for during start-up: stopping without serving")
            await self._shutdown()
            return
        self.engine.start_jobs()
        await self.server.start_serving()
        self._watch_config(loop)
        if isinstance(loop, EventLoop):
            # Free heap memory goes back to the system once jobd goes quiet (jobd.heap): what start-up (recovery)
            # freed too, so the first wait for quiet starts now.
            self._quiet_trim = QuietTrim(loop)
            loop.on_io = self._quiet_trim.io_seen
            self._quiet_trim.io_seen()
        self.engine.on_counts_changed = self._counts_changed
        self.scheduler.on_suspensions_changed = self._counts_changed
        daemon = self.config.daemon
        log.info("jobd %s ready: socket %s, state %s", __version__, self.server.path, daemon.state_dir)
        if self.server.tcp_address is not None:
            log.info("listening for evQueue clients on TCP %s", self._tcp_listening())
        _warn_if_reachable_from_afar("[tcp] listen", self.server.tcp_address, TCP_IN_CLEAR)
        _warn_if_reachable_from_afar("[http] listen", self.http.tcp_address if self.http else None, HTTP_IN_CLEAR)
        self.notifier.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self._status_line()}")
        self._ready = True
        # The jobs on record by state (daemon.status, /metrics) are counted once, a slice per turn of the loop, and
        # kept up to date from then on: not before READY=1, which a long history would delay.
        self.store.count_jobs_soon()
        if self._reload_when_ready and not self.stop_requested.is_set():
            self._reload_from_event()
        if self.watchdog is not None:
            # From READY=1 on: before it, start-up (a long recovery) is bounded by TimeoutStartSec=, and an early
            # ping would arm the watchdog while recovery still blocks the loop.
            self._watchdog_ping()
        await self.stop_requested.wait()
        await self._shutdown()

    def _watch_config(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on a change of the files, as watched since main() first read them (or from now on, if it could
        not). Without inotify (the user's fs.inotify.max_user_instances or max_user_watches used up, by containers
        and editors as often as not), jobd runs on: only SIGHUP and daemon.reload read the files again."""
        try:
            if self.watcher is None:
                self.watcher = config.ConfigWatcher(self.dirs)
            self.watcher.start(loop, self._reload_from_event)  # with what changed since it began watching, if any
        except OSError as error:
            if self.watcher is not None:
                self.watcher.close()
                self.watcher = None
            log.warning(
                "the configuration files are not watched (inotify: %s; see fs.inotify.max_user_instances and "
                "max_user_watches): a change applies at `systemctl reload jobd` or `jobctl reload` only",
                error.strerror or error,
            )

    async def _shutdown(self) -> None:
        log.info("stopping: no new work; running jobs get SIGTERM, then SIGKILL after their kill_grace")
        self._stopping = True
        # From here, before a client can learn of the stop: a launch that comes in while the listeners close is
        # refused SHUTTING_DOWN, as a submit is (it used to be taken, its tasks left for the next start).
        self.engine.stop_taking_work()
        self.notifier.notify(f"STOPPING=1\nSTATUS={self._status_line()}")
        self.scheduler.stop()
        self.instances.stop_retries()
        if self._reload_retry is not None:
            self._reload_retry.cancel()
        if self.watcher is not None:
            self.watcher.close()
        await self.server.stop_listening()
        await self.backups.stop()  # before the store closes: its last checkpoint would change the file being copied
        # A job may take its whole kill_grace to go after SIGTERM. systemd would SIGKILL jobd (and the job) once
        # TimeoutStopSec= ran out, and the next start would find the attempt lost: each step of the stop tells it how
        # long the step may take (EXTEND_TIMEOUT_USEC counts from now, and must come again before it runs out;
        # systemd keeps its own timeout when that is longer).
        self._stop_takes(self.engine.longest_kill_grace())
        await self.engine.shutdown()
        # The ends of jobs the engine saw come before the stop's instance steps, though the loop has not told them
        # yet: the instances hear of them now, are saved with them, and answer their waiters with them.
        self.engine.tell_watchers()
        self.instances.stop_waiters()
        self.instances.save_all()
        self._notify_status()  # the jobs stopped are back in their queues: said now, not after the exit
        if self.http is not None:
            # Only now: closing waits for the requests in flight, and a job.wait there waited for a job the stop
            # had not stopped yet (up to aiohttp's minute), while the jobs ran on. They are answered by now.
            from jobd.http_api import SHUTDOWN_TAKES as HTTP_SHUTDOWN_TAKES

            self._stop_takes(HTTP_SHUTDOWN_TAKES)
            await self.http.close()
        self._stop_takes(CALLBACKS_SHUTDOWN_TAKES)
        await self.callbacks.close()
        await self.server.close_connections()
        # Requests served until now may have ended jobs of tasks (a job.cancel): told and saved now. Nothing of the
        # instances runs once the store is closed; what is left waits for the next start.
        self.engine.tell_watchers()
        self.instances.close()
        self.store.close()
        # Exact now that no id can be handed out any more: the next start then skips none (_number_jobs_past_the_mark).
        self._job_id_mark.write(self.store.last_id("job"))
        if self._watchdog_timer is not None:
            self._watchdog_timer.cancel()
        if self._quiet_trim is not None:
            self._quiet_trim.close()
        log.info("stopped")

    def _stop_noted(self) -> bool:
        """Whether SIGTERM or SIGINT came during start-up (jobd.early_signals noted it)."""
        return any(number != signal.SIGHUP for number in self._early_signals)

    def _recovery_progress(self, resumed: int, total: int) -> None:
        """A start-up resuming a long backlog of jobs says how far it is, and that it is still going: systemd fails a
        start that has not sent READY=1 within TimeoutStartSec= (90 s by default), however much work is left."""
        self.notifier.notify(
            f"EXTEND_TIMEOUT_USEC={RECOVERY_EXTEND_SECONDS * 1_000_000}\n"
            f"STATUS=recovering: {resumed} of {total} unfinished jobs resumed"
        )

    def _stop_takes(self, seconds: float) -> None:
        self.notifier.notify(f"EXTEND_TIMEOUT_USEC={round((seconds + STOP_MARGIN) * 1_000_000)}")

    def _watchdog_ping(self) -> None:
        """WATCHDOG=1 now, and again in half the interval systemd asked for.

        This is jobd's one periodic wake-up, and it exists only when systemd set WatchdogSec=: the ping is sent from
        the event loop, so if the loop hangs (a blocking call, a busy loop, SIGSTOP) the pings stop and systemd
        restarts jobd. Half the interval leaves a late wake-up on a loaded machine time to arrive."""
        assert self.watchdog is not None
        self.notifier.notify("WATCHDOG=1")
        # no-poll-ok: systemd's WatchdogSec= asks for this ping; nothing the kernel could wait on stands in for it.
        self._watchdog_timer = asyncio.get_running_loop().call_later(self.watchdog / 2, self._watchdog_ping)

    def _status_line(self) -> str:
        counts = self.engine.counts()
        line = f"{counts['running']} running, {counts['queued']} queued, {counts['delayed']} delayed"
        if self._stopping:  # the jobs still running are being stopped; the waiting ones stay for the next start
            line = f"stopping: {line}"
        # A paused queue says so: "0/4 running, 12 queued" alone reads as jobd failing to start them.
        busy = [
            f"{queue.name} {'paused, ' if queue.paused else ''}"
            f"{len(queue.running)}/{queue.definition.concurrency} running, {queue.ready_count()} queued"
            for queue in self.engine.queue_list()
            if queue.running or queue.ready_count()
        ]
        if busy:
            line += f" ({'; '.join(busy)})"
        if self.engine.store_trouble is not None:  # the database takes no writes (a full disk?): say so first
            line += f"; {self.engine.store_trouble}"
        failing = self.engine.store_internal_error(naming_what=True)
        if failing is not None:  # a bug of jobd's fails writes it tries again: the log has its traceback
            line += f"; internal error (see the log): {failing['writes']} writes failing, the first: {failing['error']}"
        suspended = self.scheduler.suspended()
        if suspended:  # the nightly run that "did not run": said where the operator looks first
            line += f"; schedules suspended after a failed run: {', '.join(suspended)} (jobctl schedule enable NAME)"
        if not self.last_reload["ok"]:
            # STATUS= is one line (a newline would start another assignment); the log has every problem.
            first, *more = str(self.last_reload["error"]).splitlines() or [""]
            line += f"; reload failed: {first}" + (f" (and {len(more)} more lines in the log)" if more else "")
        return line

    def _counts_changed(self) -> None:
        # Under load counts change thousands of times a second; systemd needs a current line, not every step.
        # So one STATUS= at most every STATUS_INTERVAL, armed only by a change (no periodic wake-up when idle).
        if self._status_timer is None:
            self._status_timer = asyncio.get_running_loop().call_later(STATUS_INTERVAL, self._notify_status)

    def _notify_status(self) -> None:
        if self._status_timer is not None:
            self._status_timer.cancel()
            self._status_timer = None
        self.notifier.notify(f"STATUS={self._status_line()}")

    # -- DaemonControl ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": iso(self.started_at),
            "uptime_seconds": round(time.clock_gettime(time.CLOCK_BOOTTIME) - self._started_boottime, 3),
            "durability": str(self.config.daemon.durability),
            "config_files": list(self.config.files),
            "last_reload": self.last_reload,
            "store_trouble": self.engine.store_trouble,
            "store_internal_error": self.engine.store_internal_error(naming_what=True),
            "tcp_listen": self._tcp_listening(),
            "http_listen": self.http.address if self.http is not None else None,
            **self.engine.counts(),
        }

    async def backup(self) -> dict[str, Any]:
        """A copy of the database in STATE_DIR/backup/ (jobd.backup), for the administrator to take away."""
        if self._stopping:
            raise ShuttingDown("jobd is stopping: once it has stopped, copy its database with cp")
        return await self.backups.take()

    def _tcp_listening(self) -> str | None:
        """Where the evQueue TCP listener is bound ("127.0.0.1:5000", "[::1]:5000"), the port resolved; or None."""
        if self.server.tcp_address is None:
            return None
        return host_port(*self.server.tcp_address)

    def reload(self) -> dict[str, Any]:
        """Read the configuration again; all or nothing. Raises ConfigError and keeps the running one if broken;
        raises OutOfResources, keeps the running one and reloads again later if jobd is short of descriptors."""
        if self._stopping:
            raise ShuttingDown("jobd is stopping: the configuration is read again at the next start")
        if self._reload_retry is not None:  # this reload is the one it waited for
            self._reload_retry.cancel()
            self._reload_retry = None
        # A socket file removed while jobd ran is made again, whatever the files say: a SIGHUP is what jobctl's
        # "cannot connect" tells the operator to send (a restart would stop the running jobs).
        if self._rebinding is None or self._rebinding.done():
            self._rebinding = asyncio.get_running_loop().create_task(self.server.rebind_removed_sockets())
        try:
            return self._reload()
        except OutOfResources as error:
            raise self._reload_later(error) from None

    def _reload(self) -> dict[str, Any]:
        self.notifier.notify("RELOADING=1")
        try:
            if self.config_dir is not None and not os.path.isdir(self.config_dir):
                # As at start-up: a --config-dir that is gone (moved, deleted, replaced by two renames) must not
                # turn into the defaults, which would close every queue and forget every task, workflow, schedule.
                raise ConfigError(
                    f"--config-dir {self.config_dir} is no longer a directory: the running configuration stays"
                )
            new = config.load(self.dirs)
        except OutOfResources:  # not the files' fault: reported (and done again) by reload()
            raise
        except ConfigError as error:
            self._reload_failed(error.message)
            raise
        except Exception as error:  # a bug in reading the files: a failed reload too (the traceback is logged
            # where the exception ends: the connection's handler or the event loop's)
            self._reload_failed(f"internal error: {type(error).__name__}: {error}")
            raise
        finally:
            self.notifier.notify("READY=1")
        # Compared with what runs, not with the last reload: a change not yet applied is told at every reload, and a
        # value put back as it runs is not.
        for key in RESTART_ONLY_DAEMON_KEYS:
            if getattr(new.daemon, key) != getattr(self._at_start.daemon, key):
                log.warning("[daemon] %s changed; it takes effect at the next restart", key)
        if new.tcp.listen != self._at_start.tcp.listen:
            log.warning(
                "[tcp] listen changed to %s; it takes effect at the next restart (logins follow the new [tcp.users])",
                new.tcp.listen_text or "off",
            )
        if new.http.listen != self._at_start.http.listen:
            log.warning("[http] listen changed; it takes effect at the next restart (tokens apply at once)")
        self.config = new
        _warn_of_open_password_files(new)
        _fit_open_files(new)
        self.engine.reload(new)
        self.instances.reload(new)
        self.scheduler.reload(new)
        if self.http is not None:
            self.http.reloaded()
        self.server.end_revoked_logins()
        self.server.reapply_socket_access([] if self.http is None else self.http.own_unix_socket())
        load_aiohttp(new)
        self.last_reload = {"at": iso(time.time()), "ok": True, "error": None}
        log.info("configuration reloaded from %d file%s", len(new.files), "" if len(new.files) == 1 else "s")
        self._notify_status()
        return {"ok": True, "files": list(new.files)}

    def _reload_failed(self, message: str) -> None:
        self.last_reload = {"at": iso(time.time()), "ok": False, "error": message}
        log.error("reload failed, keeping the running configuration: %s", message)
        self._notify_status()

    def _reload_later(self, short: OutOfResources) -> OutOfResources:
        """A reload could not read the files for want of descriptors or memory: the files may be sound, and a change
        in them must not be lost (inotify told it once). Reloaded again after RELOAD_RETRY_SECONDS, for as long as
        the shortage lasts, with the running configuration kept meanwhile. Said once, not at every try. Returns
        what the reload answers."""
        message = f"{short.message}; {RELOAD_LATER}"
        if self.last_reload["error"] != message:
            log.warning("reload not done, keeping the running configuration: %s", message)
        self.last_reload = {"at": iso(time.time()), "ok": False, "error": message}
        self._notify_status()
        # A timer: no kernel event says that a descriptor is free again (RLIMIT_NOFILE counts this process's, the
        # system's file table has no waitable counter), and jobd frees its own in many places (a job's end, a
        # client leaving, an output read). It exists only while a reload waits; no-poll-ok.
        self._reload_retry = asyncio.get_running_loop().call_later(RELOAD_RETRY_SECONDS, self._retry_reload)
        return OutOfResources(message)

    def _retry_reload(self) -> None:
        self._reload_retry = None
        self._reload_from_event()

    def _on_sighup(self) -> None:
        if self._stopping:
            log.info("SIGHUP while stopping: nothing to reload")
        elif not self._ready:
            log.info("SIGHUP while starting: the configuration is read again once jobd is ready")
            self._reload_when_ready = True
        else:
            self._reload_from_event()

    def _reload_from_event(self) -> None:
        # Reported by reload(): log, STATUS= and daemon.status; one short of descriptors is done again later.
        with contextlib.suppress(ConfigError, OutOfResources, ShuttingDown):
            self.reload()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage error (exit 2) reaches journald as an error when `journal` (a typo in a
    drop-in's ExecStart=): argparse writes it to stderr itself, before jobd's log is set up, and journald would
    file its lines as info, leaving `journalctl -u jobd -p err` without the reason jobd did not start."""

    def __init__(self, *, journal: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.journal = journal

    def error(self, message: str) -> NoReturn:
        text = f"{self.format_usage()}{self.prog}: error: {message}"
        self.exit(2, logline.journal_text(text, 3) if self.journal else text + "\n")


def parse_args(argv: Sequence[str] | None, *, journal: bool = False) -> argparse.Namespace:
    parser = ArgumentParser(journal=journal, prog="jobd", description="jobd: a Linux-native job daemon")
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="read jobd.toml and jobd.d/*.toml from DIR alone "
        f"(default: the search path {', '.join(config.DEFAULT_SEARCH_PATH)})",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"jobd {__version__}")
    return parser.parse_args(argv)


# What an administrator can do about a file jobd cannot create or write at its start (the error names the file).
_ADVICE = {
    errno.EROFS: "its file system is mounted read-only: remount it read-write, or set [daemon] state_dir elsewhere",
    errno.EACCES: "jobd may not write it: check its owner and mode, and those of its directory",
    errno.EPERM: "jobd may not change it: check its owner, its mode and its attributes (lsattr: immutable)",
    errno.ENOSPC: "its file system is full: make room and start jobd again",
    errno.EDQUOT: "its owner's disk quota is used up: make room and start jobd again",
}


def _what_to_do(error: OSError) -> str:
    advice = _ADVICE.get(error.errno or 0)
    return f"; {advice}" if advice else ""


def main(argv: Sequence[str] | None = None, early_signals: list[int] | None = None) -> int:
    # Until the event loop takes them over (Daemon.run), SIGTERM, SIGINT and SIGHUP are remembered, not fatal: a
    # `kill -HUP` or a stop during start-up must neither kill jobd in the middle of its recovery nor be lost. The
    # `jobd` command installed the handlers before importing this module (jobd.early_signals); `python -m` did not.
    if early_signals is None:
        early_signals = jobd_early_signals.remember()
    # Sockets passed by systemd sit at fd 3 and up: take them (moved elsewhere) before fd 3 is given to /dev/null.
    activation_error: StartupError | None = None
    try:
        passed = activation.take_sockets()
    except StartupError as error:
        passed, activation_error = {}, error
    watchdog = activation.watchdog_interval()
    proc.close_inherited_fds_on_exec()  # nothing jobd was started with reaches its jobs
    proc.reserve_progress_fd()  # first, before anything else can be given fd 3
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    args = parse_args(argv, journal=under_systemd)
    logline.setup(args.log_level, sys.stderr.fileno(), journal=under_systemd)
    # A fatal signal prints every thread's Python stack to the log first: systemd's watchdog ends a hung jobd with
    # SIGABRT, and the stack says where its event loop was stuck.
    faulthandler.enable()
    if activation_error is not None:
        log.error("not starting: %s", activation_error)
        return EXIT_CONFIG
    dirs = [args.config_dir] if args.config_dir else list(config.DEFAULT_SEARCH_PATH)
    # Missing search directories are normal; one named on the command line is a typo more likely than not, and
    # starting from the defaults would take the system's socket and state directory (/run/jobd, /var/lib/jobd).
    if args.config_dir and os.path.lexists(args.config_dir) and not os.path.isdir(args.config_dir):
        # Most likely the file itself (`--config-dir /etc/jobd/jobd.toml`): name the directory that holds it.
        holder = f" ({os.path.dirname(os.path.abspath(args.config_dir))} for this file)"
        log.error(
            "--config-dir %s is not a directory: name the directory that holds jobd.toml%s",
            args.config_dir,
            holder if args.config_dir.endswith(".toml") else "",
        )
        return EXIT_CONFIG
    if args.config_dir and not os.path.isdir(args.config_dir):
        log.error(
            "--config-dir %s does not exist: name the directory that holds jobd.toml (an empty one runs jobd with "
            "the defaults)",
            args.config_dir,
        )
        return EXIT_CONFIG
    # Watched from before the first reading: a file saved while jobd starts (a long recovery takes minutes) is seen,
    # and reloaded once jobd is ready. Watched from READY=1 only, such a change was never applied.
    watcher = None
    if not args.check_config:
        try:
            watcher = config.ConfigWatcher(dirs)
            watcher.watch()
        except OSError:  # out of inotify instances or watches: Daemon._watch_config tries once more, and says so
            if watcher is not None:
                watcher.close()
            watcher = None
    try:
        initial = config.load(dirs)
    except ConfigError as error:
        log.error("%s", error.message)
        return EXIT_CONFIG
    except OutOfResources as error:  # the files may be sound: not EXIT_CONFIG, which systemd would not restart on
        log.error("not starting: %s", error.message)
        return 1
    if args.check_config:
        for warning in config.open_password_files(initial):
            print(f"warning: {warning}", file=sys.stderr)
        print(f"configuration OK: {', '.join(initial.files) or '(no files, defaults)'}")
        return 0

    async def run() -> None:
        config_dir = args.config_dir or None
        await Daemon(dirs, initial, passed, watchdog, early_signals, config_dir=config_dir, watcher=watcher).run()

    try:
        with asyncio.Runner(loop_factory=EventLoop) as runner:  # what asyncio.run() does, on jobd's loop
            runner.run(run())
    except StartupError as error:
        log.error("not starting: %s", error)
        return EXIT_CONFIG if error.permanent else 1
    except OSError as error:  # the socket or state directory cannot be made: a message, not a traceback
        log.error("not starting: %s%s", error, _what_to_do(error))
        return 1
    except DATABASE_ERRORS as error:  # nothing in the file is changed by a start that fails
        advice, permanent = startup_failure(error)
        log.error("not starting: the database in %s cannot be used: %s; %s", initial.daemon.state_dir, error, advice)
        # A damaged file is as permanent as a broken configuration: restarting would only reach systemd's start
        # limit, and take jobd.socket down with it.
        return EXIT_CONFIG if permanent else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
