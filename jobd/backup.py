"""A consistent copy of jobd's database, taken while jobd runs its jobs (`jobctl backup`, daemon.backup).

jobd holds its database exclusively (SQLite's locking_mode=EXCLUSIVE), so no other program can read it while jobd
runs, and stopping jobd to copy it stops every running job. So jobd copies it itself, without making its clients
wait: a worker thread copies it through jobd's own connection with SQLite's online backup API, STEP_PAGES pages at a
time, and lets the event loop have a turn between two steps. The loop waits at most for one step, when it uses the
database meanwhile. (The file itself was copied once a checkpoint had put the WAL into it, on the event loop: up to
WAL_AUTOCHECKPOINT pages written and synced, 50-110 ms on a long history, every client waiting.)
SQLite keeps the copy consistent: what the loop commits between two steps is carried into the pages copied
already, a step is refused while a transaction of the loop is open, and a rollback (jobd rolls back only on an
error: a full disk) starts the copy again; so the copy is the database as committed when its last step was made.
The copy is made beside its destination and renamed over it once whole, checked and on disk: the destination is
always a complete copy, the new one or the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from jobd.errors import ShuttingDown, StoreFailed
from jobd.store import DAMAGED_ADVICE, SCHEMA_VERSION, Store, damaged, fsync_directory_of

log = logging.getLogger("jobd.backup")

BACKUP_DIR = "backup"
BACKUP_DIR_MODE = 0o700
PARTIAL = ".partial"  # the copy being made, beside its destination
# Pages copied per step, a step per turn of the loop: 256 KiB of jobd's 1 KiB pages. A loop that uses the database
# during a step waits for it: a commit waited 5-8 ms at most with 256 pages, 10-12 ms with 1,024 (an 80 MB copy).
STEP_PAGES = 256


class Stopped(Exception):
    """jobd began to stop while the copy was being made: the partial copy is removed."""


class Backups:
    """Makes copies of the database in STATE_DIR/backup/, one at a time: a request that comes while a copy is
    being made gets that copy's answer."""

    def __init__(self, store: Store, state_dir: str) -> None:
        self._store = store
        self.directory = os.path.join(state_dir, BACKUP_DIR)
        self.path = os.path.join(self.directory, os.path.basename(store.path))
        self._under_way: asyncio.Future[dict[str, Any]] | None = None
        self._stopping = threading.Event()

    def remove_leftovers(self) -> None:
        """Remove what a copy that jobd did not finish left in backup/ (jobd killed, or the machine stopped, during
        a backup): the partial copy and SQLite's files beside it. Called at start-up, with the state directory
        locked: no copy is under way. Left alone in a backup/ someone else could change (the next backup refuses
        it, saying why): jobd removes nothing by name there."""
        try:
            _check_directory(self.directory)
        except (OSError, StoreFailed):  # none (the usual case), or one the next backup refuses
            return
        removed = _remove(self.path + PARTIAL)
        if removed:
            log.warning(
                "removed %s from %s: left by a copy of the database that was not finished (jobd was killed during "
                "a backup?)",
                ", ".join(removed),
                self.directory,
            )

    async def take(self) -> dict[str, Any]:
        if self._stopping.is_set():
            raise ShuttingDown("jobd is stopping: once it has stopped, copy its database with cp")
        if self._under_way is None:
            self._under_way = asyncio.ensure_future(self._take())
            self._under_way.add_done_callback(self._done)
        return await asyncio.shield(self._under_way)

    def _done(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self._under_way = None
        if not future.cancelled():
            future.exception()  # retrieved: each caller has been given it already

    async def stop(self) -> None:
        """Give up a copy under way (its partial file is removed) and wait until the store is let go: the store
        checkpoints when it closes, which would change the file under the copy."""
        self._stopping.set()
        if self._under_way is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self._under_way)

    async def _take(self) -> dict[str, Any]:
        began = time.monotonic()
        try:
            os.makedirs(self.directory, mode=BACKUP_DIR_MODE, exist_ok=True)
            _check_directory(self.directory, tighten=True)
            source = self._store.source_for_copy()
            loop = asyncio.get_running_loop()
            size = await asyncio.to_thread(
                copy_database, source, self.path, self._stopping, lambda: _wait_for_a_turn_of(loop)
            )
        except Stopped:
            raise ShuttingDown("jobd began to stop during the copy; nothing was written") from None
        except (OSError, sqlite3.Error, StoreFailed, CopyDamaged) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            if isinstance(error, CopyDamaged) or damaged(error):
                # The pages are copied as they are: a copy that reads as damaged is a damaged database's. "Could not
                # be written" sent its reader to the backup's disk, and a backup kept from before was the remedy.
                message = (
                    f"the copy of the database made to {self.path} reads as damaged ({reason}), so jobd's database "
                    f"most likely does too: {DAMAGED_ADVICE} older than this one; the copy is not kept"
                )
            else:
                message = f"the copy of the database could not be written to {self.path}: {reason}"
            log.error("%s", message)
            raise StoreFailed(f"{message}; the database itself is unchanged") from None
        seconds = time.monotonic() - began
        log.info("the database is copied to %s (%d bytes, %.3f s)", self.path, size, seconds)
        return {"path": self.path, "bytes": size, "schema_version": SCHEMA_VERSION, "seconds": round(seconds, 3)}


class CopyDamaged(Exception):
    """The copy, once made, is not a sound database (SQLite's quick_check names what it found)."""


def _check_directory(directory: str, *, tighten: bool = False) -> None:
    """Refuse a backup directory that someone other than jobd's user could change; with `tighten`, take from one
    of jobd's what BACKUP_DIR_MODE does not allow (group's and others' read and search). jobd (root) creates, opens
    with SQLite, renames and removes files there by name: in a directory another user may write to, or reached
    through a symlink (whose target's parents jobd does not check), that user could put a file of their own in the
    copy's place between two of those steps (a journal SQLite would play into the copy, or another database for jobd
    to switch to journal mode DELETE), or replace the finished copy that root would later restore. A file system
    mounted on backup/ is a directory, not a symlink."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:  # a symlink is ENOTDIR with O_DIRECTORY, ELOOP without
        if error.errno not in (errno.ELOOP, errno.ENOTDIR) or not os.path.islink(directory):
            raise
        raise StoreFailed(
            f"{directory} is a symbolic link: make it a directory of jobd's, or mount a file system on it to keep "
            "the copies elsewhere"
        ) from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise StoreFailed(
                f"{directory} belongs to uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}: it must be jobd's "
                f"(uid {os.geteuid()}) and writable by jobd alone, so that nobody else can change the copy"
            )
        if tighten:
            # A looser one (an administrator's mkdir, the root of a file system mounted there) is tightened, as the
            # state directory is at each start: BACKUP_DIR_MODE is what docs/protocol.md promises.
            mode = stat.S_IMODE(info.st_mode)
            if mode & ~BACKUP_DIR_MODE:
                log.warning("%s was mode %04o; tightening it to %04o", directory, mode, mode & BACKUP_DIR_MODE)
                os.fchmod(fd, mode & BACKUP_DIR_MODE)
    finally:
        os.close(fd)


def copy_database(
    source: sqlite3.Connection, path: str, stopping: threading.Event, between_steps: Callable[[], None] = lambda: None
) -> int:
    """Copy the database of `source` (jobd's connection, Store.source_for_copy) to `path` (mode 0600) by way of a
    partial file, calling `between_steps` after each step of the copy; make the copy one self-contained file
    (journal mode DELETE) and check it; return its size. Runs in a worker thread."""
    partial = path + PARTIAL
    # Left by a copy a crash cut short: the partial file, and what SQLite had beside it. A -journal is hot (a crash
    # during a write of the copy leaves one): SQLite would play the old copy's pages into the new.
    _remove(partial)
    try:
        _copy_pages(source, partial, stopping, between_steps)
        _make_self_contained_and_check(partial, stopping)
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.rename(partial, path)
    except BaseException:
        _remove(partial, OSError)  # the first error is the one to tell
        raise
    fsync_directory_of(path)  # the rename too
    return size


def _wait_for_a_turn_of(loop: asyncio.AbstractEventLoop) -> None:
    """From the worker thread: return once the event loop has run what was ready when this was called (a turn)."""
    turned = threading.Event()
    loop.call_soon_threadsafe(turned.set)
    turned.wait()


def _remove(partial: str, ignored: type[OSError] = FileNotFoundError) -> list[str]:
    """Remove the partial copy and what SQLite makes beside it while it is switched to journal mode DELETE; return
    the names of those that were there."""
    removed = []
    for leftover in (partial, partial + "-journal", partial + "-wal", partial + "-shm"):
        with contextlib.suppress(ignored):
            os.unlink(leftover)
            removed.append(os.path.basename(leftover))
    return removed


def _copy_pages(
    source: sqlite3.Connection, target: str, stopping: threading.Event, between_steps: Callable[[], None]
) -> None:
    # Made here, empty, mode 0600 (SQLite takes an empty file for a new database, and gives its journal the same
    # mode); never through a symlink someone put there.
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))

    def after_step(status: int, remaining: int, pages: int) -> None:
        if stopping.is_set():
            raise Stopped  # SQLite's copy is given up
        between_steps()

    copy = sqlite3.connect(target, isolation_level=None)
    try:
        # SQLite writes the copy within the step that copies the last pages, holding jobd's connection: with its
        # defaults, that step synced the whole copy, and the event loop waited 80-105 ms for it. The copy is synced
        # once made instead (copy_database), and one cut short is removed: it needs no journal and no sync of its own.
        copy.execute("PRAGMA journal_mode = OFF")
        copy.execute("PRAGMA synchronous = OFF")
        # A step refused while the loop's transaction is open (SQLITE_BUSY) is tried again after the next turn of
        # the loop, not after a sleep.
        source.backup(copy, pages=STEP_PAGES, progress=after_step, sleep=0)
    finally:
        copy.close()


def _make_self_contained_and_check(path: str, stopping: threading.Event) -> None:
    # The file says it is in WAL mode, as jobd keeps it: opened elsewhere it would need -wal and -shm files beside
    # it (and could not be opened read-only at all), so it is switched to SQLite's default journal mode.
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.set_progress_handler(stopping.is_set, 10_000)  # a non-zero answer interrupts the statement
        connection.execute("PRAGMA journal_mode = DELETE")
        problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    except sqlite3.OperationalError:
        if stopping.is_set():
            raise Stopped from None
        raise
    finally:
        connection.close()
    if problems != ["ok"]:
        raise CopyDamaged(f"it failed SQLite's quick_check: {'; '.join(problems[:3])}")
