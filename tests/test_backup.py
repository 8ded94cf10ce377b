"""`jobctl backup` (daemon.backup): a consistent copy of the database while jobd runs its jobs, and a restore of it.

jobd holds its database exclusively, so without this the only way to copy it was to stop jobd, and with it every
running job. Real daemons, the real jobctl, the copy opened by sqlite3 and by a second jobd.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon
from inotify_simple import INotify, flags
from recovery.support import WAIT, Gate, finished_jobs_the_oldest_damaged, gated, wait_events, wait_for_log
from test_jobctl import ctl

from jobd.backup import STEP_PAGES, Backups, Stopped, copy_database
from jobd.client import RemoteError
from jobd.job_id_mark import MARK
from jobd.model import JobSpec, JobState
from jobd.store import SCHEMA_VERSION, Store

QUEUES = """
[queue.default]
concurrency = 2

[queue.held]
paused = true
"""


def backup_path(daemon: Daemon) -> Path:
    return daemon.state_dir / "backup" / "jobd.sqlite3"


def test_a_copy_taken_while_a_job_runs_holds_every_job_and_a_jobd_started_on_it_has_them(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = make_daemon(QUEUES)
    done = daemon.wait(daemon.submit(command=["/bin/echo", "before the copy"])["id"])
    held = daemon.submit(command=["/bin/echo", "held"], queue="held")["id"]
    gate = Gate(tmp_path / "gate")
    events = daemon.client()
    events.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
    running = daemon.submit(command=gated(gate, "/bin/echo", "ran through the copy"))["id"]
    wait_events(events, lambda e: e["job"]["id"] == running and e["job"]["state"] == "running", 1)
    events.close()

    copied = ctl(daemon, "backup")
    assert copied.code == 0, copied
    path = backup_path(daemon)
    assert copied.out.startswith(f"copied the database to {path} ("), copied
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not Path(f"{path}.partial").exists()

    # jobd went on: the job running during the copy ends as it would have.
    gate.release()
    job = daemon.wait(running)
    assert job["state"] == "succeeded" and daemon.output(running) == "ran through the copy\n"
    assert [e["command"] for e in daemon.call("audit.list")["entries"]][:1] == ["daemon.backup"]

    # The copy is one self-contained file: its own schema version, no WAL to carry along.
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as copy:
        assert copy.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        states = dict(copy.execute('SELECT "id", "state" FROM "job"').fetchall())
    assert states == {done["id"]: "succeeded", held: "queued", running: "running"}

    # A jobd on the copy has every job as it was then; the one that ran meanwhile is a running attempt of a jobd
    # that is gone, so crash recovery's rule applies (lost, not retried: no retry policy).
    restored = make_daemon(QUEUES, start=False)
    restored.state_dir.mkdir(parents=True)
    shutil.copy(path, restored.state_dir / "jobd.sqlite3")
    restored.start()
    jobs = {job["id"]: job for job in restored.call("job.list")["jobs"]}
    assert {job_id: job["state"] for job_id, job in jobs.items()} == {
        done["id"]: "succeeded",
        held: "queued",
        running: "failed",
    }
    assert restored.call("job.get", {"id": running})["tries"][-1]["outcome"] == "lost"


def _a_job_in_a_backup_and_one_after(daemon: Daemon) -> tuple[dict[str, Any], dict[str, Any]]:
    """A finished job, then `jobctl backup`, then another finished job: the two jobs, the first alone in the copy."""
    first = daemon.wait(daemon.submit(command=["/bin/echo", "in the copy"])["id"])
    assert ctl(daemon, "backup").code == 0
    later = daemon.wait(daemon.submit(command=["/bin/echo", "after the copy"])["id"])
    return first, later


@pytest.mark.parametrize("mark", ["kept", "missing", "stale"])
def test_a_restored_copy_numbers_new_jobs_past_the_output_left_by_later_jobs(
    make_daemon: Callable[..., Daemon], mark: str
) -> None:
    """Jobs made after the copy are not in it, but their output is still in the state directory: a new job given
    one of their ids showed that output (someone else's, perhaps) to its readers until it wrote its first byte.
    The start finds them from the mark of the ids handed out (output/.job-ids); without one, or with one a jobd
    without marks went past (below the database's last job), by listing output/."""
    daemon = make_daemon(QUEUES)
    first, later = _a_job_in_a_backup_and_one_after(daemon)
    assert later["id"] == first["id"] + 1
    marked = daemon.state_dir / "output" / MARK
    assert int(marked.read_text()) >= later["id"]
    assert daemon.stop() == 0
    if mark == "missing":
        marked.unlink()
    elif mark == "stale":
        marked.write_text("0\n")
    _restore(daemon)
    assert "past the last job of the database" in daemon.log()
    with contextlib.suppress(RemoteError):
        daemon.call("job.get", {"id": later["id"]})
        raise AssertionError("a job made after the copy is known to the restored jobd")
    silent = daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    assert silent["id"] == later["id"] + 1
    assert daemon.output(silent["id"]) == ""
    assert int(marked.read_text()) >= silent["id"]  # written anew where it was missing or stale


def test_a_start_does_not_list_the_output_of_every_job_of_the_history(make_daemon: Callable[..., Daemon]) -> None:
    """A start listed output/, one entry per job of the history (0.9 s for 400,000 jobs), before READY=1, to find
    the output of jobs a restored database lacks. The mark of the ids handed out says where to look instead: the
    names between the database's last job and it. Seen by inotify: listing a directory opens it."""
    daemon = make_daemon(QUEUES)
    for text in ("one", "two", "three"):
        assert daemon.output(daemon.wait(daemon.submit(command=["/bin/echo", text])["id"])["id"]) == f"{text}\n"
    daemon.submit(command=["/bin/echo", "waiting"], queue="held")
    assert daemon.stop() == 0
    output = daemon.state_dir / "output"
    with INotify() as inotify:
        inotify.add_watch(output, flags.OPEN)
        daemon.start()
        opened = [event.name for event in inotify.read(timeout=0)]
        assert "" not in opened, opened  # the event of output/ itself has no name; a job's directory has its id
        os.listdir(output)  # the watch sees a listing: the check above could have failed
        assert "" in [event.name for event in inotify.read(timeout=0)]


def test_a_copy_restored_by_a_rename_while_jobd_runs_is_refused_and_not_mixed_with_the_old_wal(
    make_daemon: Callable[..., Daemon],
) -> None:
    """The copy put in place of the database while jobd runs (by a rename, as `mv` and `install` do): jobd refuses
    to write, saying that a restart opens the file now there. Its stop left the replaced database's WAL beside the
    copy, and the next start played that WAL into the copy: a later job appeared in it, and a copy older than the
    last checkpoint came out damaged."""
    daemon = make_daemon(QUEUES)
    first, later = _a_job_in_a_backup_and_one_after(daemon)
    database = daemon.state_dir / "jobd.sqlite3"
    staged = daemon.state_dir / "restoring.sqlite3"
    shutil.copy(backup_path(daemon), staged)
    os.rename(staged, database)
    with pytest.raises(RemoteError) as info:
        daemon.submit(command=["/bin/true"])
    assert info.value.code == "STORE_FAILED", info.value
    assert f"its file {database} was replaced by another while jobd ran" in info.value.message, info.value
    assert "restart jobd, which opens the file now there" in info.value.message, info.value
    assert daemon.stop() == 0
    assert not Path(f"{database}-wal").exists()
    daemon.start()
    assert [job["id"] for job in daemon.call("job.list")["jobs"]] == [first["id"]]
    assert daemon.submit(command=["/bin/true"])["id"] == later["id"] + 1  # past the later job's output


def test_a_database_moved_aside_while_jobd_runs_keeps_what_jobd_saved_and_the_copy_put_in_its_place_is_sound(
    make_daemon: Callable[..., Daemon],
) -> None:
    """`mv jobd.sqlite3 jobd.sqlite3.old; cp backup/jobd.sqlite3 jobd.sqlite3` while jobd runs: jobd went on
    writing into the renamed file, answering submits as saved though a restart opens the copy, and its stop left
    its WAL beside the copy, which the next start played into it. Now jobd refuses to write, puts what its WAL
    held into the renamed file (complete there), and leaves the copy as it was."""
    daemon = make_daemon(QUEUES)
    first, later = _a_job_in_a_backup_and_one_after(daemon)
    database = daemon.state_dir / "jobd.sqlite3"
    aside = daemon.state_dir / "jobd.sqlite3.old"
    os.rename(database, aside)
    shutil.copy(backup_path(daemon), database)
    with pytest.raises(RemoteError) as info:
        daemon.submit(command=["/bin/true"])
    assert info.value.code == "STORE_FAILED", info.value
    assert f"its file {database} was moved away (renamed) while jobd ran" in info.value.message, info.value
    assert daemon.stop() == 0
    assert not Path(f"{database}-wal").exists()
    with contextlib.closing(sqlite3.connect(f"file:{aside}?mode=ro", uri=True)) as old:
        assert [row[0] for row in old.execute('SELECT "id" FROM "job" ORDER BY "id"')] == [first["id"], later["id"]]
    daemon.start()
    assert [job["id"] for job in daemon.call("job.list")["jobs"]] == [first["id"]]


def test_a_copy_that_cannot_be_written_is_a_clear_error_and_jobd_runs_on(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(QUEUES)
    daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    (daemon.state_dir / "backup").write_text("a file where the directory goes\n")
    refused = ctl(daemon, "backup")
    assert refused.code == 1, refused
    assert f"the copy of the database could not be written to {backup_path(daemon)}" in refused.err, refused
    assert "the database itself is unchanged" in refused.err
    try:
        daemon.call("daemon.backup")
        raise AssertionError("daemon.backup succeeded with a file in the way")
    except RemoteError as error:
        assert error.code == "STORE_FAILED", error
    job = daemon.wait(daemon.submit(command=["/bin/echo", "still serving"])["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "still serving\n"
    assert not list(daemon.state_dir.glob("**/*.partial"))
    os.unlink(daemon.state_dir / "backup")
    assert ctl(daemon, "backup").code == 0


def test_a_copy_of_a_damaged_database_is_not_kept_and_says_the_database_is_damaged(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(QUEUES)
    assert ctl(daemon, "backup").code == 0
    sound = backup_path(daemon).read_bytes()
    assert daemon.stop() == 0
    finished_jobs_the_oldest_damaged(daemon.state_dir / "jobd.sqlite3")
    daemon.start()

    refused = ctl(daemon, "backup")
    assert refused.code == 1, refused
    # Not "could not be written", which sent its reader to the backup's disk: the pages copied are the database's.
    wanted = f"the copy of the database made to {backup_path(daemon)} reads as damaged (database disk image is"
    assert f"{wanted} malformed)" in refused.err and "so jobd's database most likely does too" in refused.err, refused
    assert "otherwise restore it from a backup older than this one; the copy is not kept" in refused.err, refused
    assert backup_path(daemon).read_bytes() == sound  # the copy from before stays, to be restored
    assert not list(daemon.state_dir.glob("backup/*.partial*"))
    assert daemon.wait(daemon.submit(command=["/bin/true"])["id"])["state"] == "succeeded"


def _job_ids(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute('SELECT "id" FROM "job" ORDER BY "id"')]


def _insert(store: Store, count: int) -> None:
    for _ in range(count):
        store.insert_jobs([JobSpec(command=("/bin/true",), queue="q")], [JobState.QUEUED], 1.0, [1.0])


def test_a_copy_is_made_a_step_per_turn_of_the_event_loop_and_is_the_database_as_committed_at_its_end(
    tmp_path: Path,
) -> None:
    """The copy used to begin with a checkpoint of the WAL into the database file, on the event loop (50-110 ms on a
    long history, every client waiting). Now SQLite's online backup copies STEP_PAGES pages per step from a worker
    thread, and the loop has a turn between two steps: here each turn commits a job, and one deletes the first
    job and rolls that back (SQLite then starts the copy again). The copy has every job committed before its last
    step, the first among them."""
    database = tmp_path / "jobd.sqlite3"
    store = Store(str(database))
    store.open()
    try:
        spec = JobSpec(command=("/bin/true",), queue="q")
        for _ in range(20):
            store.insert_jobs([spec] * 1000, [JobState.QUEUED] * 1000, 1.0, [1.0] * 1000)
        pages = store.db.pragma("page_count")
        turns = 0

        async def copy_while_committing() -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            copying = asyncio.ensure_future(Backups(store, str(tmp_path)).take())

            def each_turn() -> None:
                nonlocal turns
                if copying.done():
                    return
                turns += 1
                _insert(store, 1)
                if turns == 5:
                    connection = store.db.connection()
                    connection.execute("BEGIN")
                    connection.execute('DELETE FROM "job" WHERE "id" = 1')
                    connection.execute("ROLLBACK")
                loop.call_soon(each_turn)

            loop.call_soon(each_turn)
            return await copying

        copied = asyncio.run(copy_while_committing())
    finally:
        store.close()
    steps = -(-pages // STEP_PAGES)
    assert steps > 10, pages  # enough of them for the turns between to show
    ids = _job_ids(Path(copied["path"]))
    assert ids == list(range(1, len(ids) + 1)), "the copy is not the database as it was at one commit"
    assert len(ids) >= 20_000 + steps - 1, (len(ids), steps)  # a turn of the loop, and a commit, between two steps
    assert len(ids) <= 20_000 + turns


def test_a_copy_given_up_because_jobd_stops_leaves_nothing_behind(tmp_path: Path) -> None:
    database = tmp_path / "jobd.sqlite3"
    store = Store(str(database))
    store.open()
    try:
        _insert(store, 5)
        stopping = threading.Event()
        stopping.set()
        with pytest.raises(Stopped):
            copy_database(store.source_for_copy(), str(tmp_path / "copy.sqlite3"), stopping)
    finally:
        store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobd.sqlite3"]


def test_backups_asked_together_share_one_copy(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(QUEUES)
    with daemon.client() as client:
        client.send_raw(
            b'[{"jsonrpc":"2.0","id":1,"method":"daemon.backup"},{"jsonrpc":"2.0","id":2,"method":"daemon.backup"}]\n'
        )
        replies = client.read_line(timeout=30)
    assert isinstance(replies, list) and len(replies) == 2, replies
    first, second = (reply["result"] for reply in sorted(replies, key=lambda reply: reply["id"]))
    assert first == second and first["path"] == str(backup_path(daemon))


def test_after_a_copy_jobd_still_holds_its_database_so_nothing_else_can_open_it_and_lose_its_commits(
    make_daemon: Callable[..., Daemon],
) -> None:
    """The copy read the database through a descriptor of its own and closed it: closing any descriptor of a file
    drops every POSIX lock the process holds on it, SQLite's exclusive lock among them. Another program (sqlite3
    run by an administrator, here this test's process) could then open the database; closing it, it checkpointed
    jobd's WAL and deleted it, and jobd went on committing into the deleted file: a job accepted then was gone
    after a kill -9."""
    daemon = make_daemon(QUEUES)
    before = daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    database = daemon.state_dir / "jobd.sqlite3"

    def read_from_outside() -> None:
        with contextlib.closing(sqlite3.connect(database, timeout=0)) as other:
            other.execute('SELECT count(*) FROM "job"').fetchone()

    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        read_from_outside()
    assert ctl(daemon, "backup").code == 0
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        read_from_outside()
    assert Path(f"{database}-wal").exists()
    after = daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    daemon.kill9()
    daemon.start()
    assert [job["id"] for job in daemon.call("job.list")["jobs"]] == [after["id"], before["id"]]


def test_a_backup_directory_someone_else_could_change_is_refused(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """jobd (root) makes, opens with SQLite, renames and removes the copy's files by name in backup/: where another
    user may write (a symlink to their directory, or backup/ itself given to them), they could slip a file of their
    own into one of those steps, or replace the finished copy that root later restores."""
    daemon = make_daemon(QUEUES)
    daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    backup = daemon.state_dir / "backup"
    backup.symlink_to(theirs)
    refused = ctl(daemon, "backup")
    assert refused.code == 1, refused
    assert f"{backup} is a symbolic link" in refused.err, refused
    assert list(theirs.iterdir()) == []

    backup.unlink()
    backup.mkdir(mode=0o700)
    for owner, mode in ((65534, 0o700), (0, 0o730), (0, 0o702)):
        os.chown(backup, owner, 0)
        os.chmod(backup, mode)
        refused = ctl(daemon, "backup")
        assert refused.code == 1, (owner, mode, refused)
        assert f"{backup} belongs to uid {owner}, mode {mode:04o}" in refused.err, refused
        assert list(backup.iterdir()) == []
    os.chown(backup, 0, 0)
    os.chmod(backup, 0o750)
    assert ctl(daemon, "backup").code == 0
    assert [path.name for path in backup.iterdir()] == ["jobd.sqlite3"]


def test_a_journal_left_beside_the_partial_copy_by_a_crash_does_not_spoil_the_next_copy(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A crash while the copy is switched to journal mode DELETE leaves a hot journal beside the partial file: the
    next copy removed the partial file but not the journal, and SQLite played the old copy's pages into the new one
    ("database disk image is malformed", or worse, a copy that passes its check)."""
    daemon = make_daemon(QUEUES)
    daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    assert ctl(daemon, "backup").code == 0
    # A hot journal of the last copy, as a process that dies in the middle of a write transaction leaves it.
    old = tmp_path / "old.sqlite3"
    shutil.copy(backup_path(daemon), old)
    spill = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA cache_size = 1')\n"
        "db.execute('BEGIN')\n"
        'db.execute(\'UPDATE "job" SET "command" = hex(randomblob(3000))\')\n'
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", spill, str(old)], check=True)
    shutil.copy(f"{old}-journal", f"{backup_path(daemon)}.partial-journal")
    ids = [daemon.submit(command=["/bin/true"], queue="held")["id"] for _ in range(100)]

    copied = ctl(daemon, "backup")
    assert copied.code == 0, copied
    assert _job_ids(backup_path(daemon)) == [1, *ids]
    assert sorted(path.name for path in backup_path(daemon).parent.iterdir()) == ["jobd.sqlite3"]


def test_a_backup_directory_others_may_read_is_tightened_when_a_copy_is_taken(
    make_daemon: Callable[..., Daemon],
) -> None:
    """The copy is made "in a directory of mode 0700" (docs/protocol.md), but a backup/ of jobd's made by hand with
    a looser mode after jobd started was used as it was: jobd tightened it only at its start."""
    daemon = make_daemon(QUEUES)
    backup = backup_path(daemon).parent
    backup.mkdir()
    os.chmod(backup, 0o755)
    assert ctl(daemon, "backup").code == 0
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    assert f"{backup} was mode 0755; tightening it to 0700" in daemon.log()


# fanotify(7), for OpenGate.
FAN_CLOEXEC = 0x1
FAN_CLASS_CONTENT = 0x4
FAN_MARK_ADD = 0x1
FAN_OPEN_PERM = 0x10000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x1
AT_FDCWD = -100
FAN_EVENT = "IBBHQii"  # struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid


class OpenGate:
    """Every open of a file in `directory`, by any process, waits for this test's answer (fanotify's permission
    events): a process can be held at the open of a file of its choosing, everything it made before in place."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        self.fd = libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        self._held: list[int] = []
        mask = FAN_OPEN_PERM | FAN_EVENT_ON_CHILD
        if libc.fanotify_mark(self.fd, FAN_MARK_ADD, mask, AT_FDCWD, os.fsencode(directory)) < 0:
            error = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(error, f"fanotify_mark {directory}")

    def hold(self, name: str, timeout: float = WAIT) -> None:
        """Let each open through until one of the file `name`, which waits until close()."""
        deadline = time.monotonic() + timeout
        while not self._held:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing opened {name} within {timeout}s"
            if not select.select([self.fd], [], [], left)[0]:
                continue
            data = os.read(self.fd, 4096)
            offset = 0
            while offset < len(data):
                length, _, _, _, _, opened, _ = struct.unpack_from(FAN_EVENT, data, offset)
                offset += length
                if not self._held and os.path.basename(os.readlink(f"/proc/self/fd/{opened}")) == name:
                    self._held.append(opened)
                    continue
                os.write(self.fd, struct.pack("iI", opened, FAN_ALLOW))
                os.close(opened)

    def close(self) -> None:
        """Let every open through: the kernel allows those still waiting when the group is closed."""
        os.close(self.fd)
        for opened in self._held:
            os.close(opened)


def test_the_leftovers_of_a_copy_cut_short_by_a_kill_are_removed_at_the_next_start(
    make_daemon: Callable[..., Daemon],
) -> None:
    """A kill -9 of jobd during a backup left the partial copy, and SQLite's files beside it, in backup/ until the
    next backup, if one ever came: a whole copy of the database for anyone who takes it for the backup."""
    daemon = make_daemon(QUEUES)
    daemon.wait(daemon.submit(command=["/bin/true"])["id"])
    assert ctl(daemon, "backup").code == 0  # a whole copy, which stays
    backup = backup_path(daemon).parent
    gate = OpenGate(backup)
    try:
        with daemon.client() as client:
            client.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"daemon.backup"}\n')
            # Held as SQLite opens the journal of its switch to journal mode DELETE: the partial copy is whole.
            gate.hold("jobd.sqlite3.partial-journal")
            os.kill(daemon.pid, signal.SIGKILL)
    finally:
        gate.close()
    daemon.kill9()
    left = ["jobd.sqlite3", "jobd.sqlite3.partial", "jobd.sqlite3.partial-journal"]
    assert sorted(path.name for path in backup.iterdir()) == left

    daemon.start()
    assert [path.name for path in backup.iterdir()] == ["jobd.sqlite3"]
    assert (
        f"removed jobd.sqlite3.partial, jobd.sqlite3.partial-journal from {backup}: left by a copy of the database "
        "that was not finished"
    ) in daemon.log()
    assert ctl(daemon, "backup").code == 0


SCRIPT_WORKFLOW = """<?xml version="1.0" encoding="UTF-8"?>
<workflow>
  <subjobs>
    <job name="scripted">
      <tasks>
        <task type="SCRIPT" name="hello" queue="held">
          <script>#!/bin/sh
echo "the script ran"
</script>
        </task>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""


def _restore(daemon: Daemon, keep_log_as: str | None = None) -> None:
    """README.Debian's restore: the copy in the database's place, no WAL of the other one beside it. `keep_log_as`:
    the log so far is moved to that name, so that the log then holds the restored jobd's lines alone."""
    assert daemon.stop() == 0
    database = daemon.state_dir / "jobd.sqlite3"
    shutil.copy(backup_path(daemon), database)
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    if keep_log_as is not None:
        daemon.log_path.rename(daemon.log_path.with_name(keep_log_as))
    daemon.start()


# A job that says which timeline it runs in (the file $0 names it): in the one the restore discards, on stderr and fd 3
# too; in the restored one, on stdout only.
TIMELINE_SCRIPT = (
    'echo "${JOBD_ATTEMPT:+attempt }${JOBD_ATTEMPT:-a callback} in the $(cat "$0") timeline"; '
    '[ "$(cat "$0")" = restored ] && exit 0; '
    'echo "stderr of the discarded timeline" >&2; echo "log of the discarded timeline" >&3'
)


@pytest.mark.parametrize("history", [0, 12], ids=["output-listed", "directories-looked-up"])
def test_a_restored_copy_shows_no_output_of_the_attempts_it_has_no_record_of(
    make_daemon: Callable[..., Daemon], tmp_path: Path, history: int
) -> None:
    """A job that ran after the copy runs again under the same attempt number once the copy is restored. A stream
    that stays empty creates no file, so the discarded attempt's stderr and log were shown as the new attempt's
    (whose record said 0 bytes): for a job waiting when the copy was taken, and for the retry of one running then.
    The start finds them by listing output/ when the jobs that may yet write output are many for the history, and
    with a longer history (`history` finished jobs first) by looking up each one's directory."""
    daemon = make_daemon(QUEUES)
    for _ in range(history):
        daemon.wait(daemon.submit(command=["/bin/echo", "history"])["id"])
    timeline = tmp_path / "timeline"
    timeline.write_text("discarded")
    waiting = daemon.submit(command=["/bin/sh", "-c", TIMELINE_SCRIPT, str(timeline)], queue="held")["id"]
    gate = Gate(tmp_path / "gate")
    events = daemon.client()
    events.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
    # Its first attempt fails once the gate opens; its retry, attempt 2, talks.
    retried = daemon.submit(
        command=gated(gate, "/bin/sh", "-c", f'[ "$JOBD_ATTEMPT" = 1 ] && exit 1; {TIMELINE_SCRIPT}', str(timeline)),
        retry={"times": 1, "delay": 0},
    )["id"]
    wait_events(events, lambda e: e["job"]["id"] == retried and e["job"]["state"] == "running", 1)
    events.close()
    assert ctl(daemon, "backup").code == 0

    daemon.call("queue.resume", {"name": "held"})
    gate.release()
    for job_id, attempt in ((waiting, 1), (retried, 2)):
        assert daemon.wait(job_id)["state"] == "succeeded"
        assert daemon.output(job_id, "stderr", attempt) == "stderr of the discarded timeline\n"
        assert daemon.output(job_id, "log", attempt) == "log of the discarded timeline\n"

    timeline.write_text("restored")
    _restore(daemon)
    daemon.call("queue.resume", {"name": "held"})  # as the copy has it: paused
    for job_id, attempt in ((waiting, 1), (retried, 2)):
        job = daemon.wait(job_id)
        assert job["state"] == "succeeded" and job["attempts"] == attempt, job
        [tried] = [t for t in daemon.call("job.get", {"id": job_id})["tries"] if t["number"] == attempt]
        assert tried["stderr_bytes"] == 0, tried
        assert daemon.output(job_id, "stdout", attempt) == f"attempt {attempt} in the restored timeline\n"
        assert daemon.output(job_id, "stderr", attempt) == ""
        assert daemon.output(job_id, "log", attempt) == ""
    shown = ctl(daemon, "log", str(waiting), "--stderr")
    assert shown.code == 0 and shown.out == "", shown
    # The attempt that ran through the copy is the same in both timelines: its output stays, and is its record's.
    lost = daemon.call("job.get", {"id": retried})["tries"][0]
    assert lost["outcome"] == "lost" and lost["stdout_bytes"] == 0 and lost["stderr_bytes"] == 0, lost
    assert "removed 6 output files of 2 jobs" in daemon.log(), daemon.log()


def test_a_restored_copy_shows_no_output_of_the_callback_deliveries_it_has_no_record_of(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Callback deliveries made after the copy have their ids given again once it is restored: a delivery's exec
    callback that wrote nothing on stderr left the discarded one's callback-ID.stderr beside its own stdout."""
    daemon = make_daemon(QUEUES)
    timeline = tmp_path / "timeline"
    timeline.write_text("discarded")
    callback = {"exec": ["/bin/sh", "-c", TIMELINE_SCRIPT, str(timeline)]}
    job = daemon.submit(command=["/bin/true"], queue="held", callbacks={"on_finish": [callback]})["id"]
    assert ctl(daemon, "backup").code == 0
    daemon.call("queue.resume", {"name": "held"})
    assert daemon.wait(job)["state"] == "succeeded"
    wait_for_log(daemon, "delivered (try 1)")  # its process has ended: its output is written
    output = daemon.state_dir / "output" / str(job)
    assert (output / "callback-1.stderr").read_text() == "stderr of the discarded timeline\n"

    timeline.write_text("restored")
    _restore(daemon, keep_log_as="jobd.log.discarded")
    daemon.call("queue.resume", {"name": "held"})
    assert daemon.wait(job)["state"] == "succeeded"
    wait_for_log(daemon, "delivered (try 1)")
    assert sorted(path.name for path in output.iterdir()) == ["callback-1.stdout"]
    assert (output / "callback-1.stdout").read_text() == "a callback in the restored timeline\n"
    assert "removed 3 output files of 1 job" in daemon.log(), daemon.log()


def test_a_restored_instance_whose_script_task_had_not_run_yet_runs_its_script(
    make_daemon: Callable[..., Daemon],
) -> None:
    """The copy holds an instance whose SCRIPT task's job waits in its queue; the instance ended after the copy,
    which removed its scripts. Restored, the job failed: cannot start STATE_DIR/scripts/1-3, no such file."""
    daemon = make_daemon(QUEUES, start=False)
    daemon.write_workflows(hello=SCRIPT_WORKFLOW)
    daemon.start()
    instance = daemon.call("instance.launch", {"workflow": "hello"})["id"]
    assert ctl(daemon, "backup").code == 0
    daemon.call("queue.resume", {"name": "held"})
    assert daemon.call("instance.wait", {"id": instance, "timeout": 30})["errors"] == 0
    assert list((daemon.state_dir / "scripts").iterdir()) == []

    _restore(daemon)
    daemon.call("queue.resume", {"name": "held"})
    ended = daemon.call("instance.wait", {"id": instance, "timeout": 30})
    document = daemon.call("instance.get", {"id": instance, "format": "xml"})["xml"]
    assert ended["errors"] == 0, document
    assert "the script ran" in document and "cannot start" not in document
    assert "its script" in daemon.log() and "was missing; written again" in daemon.log()


def test_jobctl_backup_waits_for_the_copy_however_long_it_takes(make_daemon: Callable[..., Daemon]) -> None:
    """jobctl gave every request but the waiting ones JOBCTL_REPLY_TIMEOUT (60 s): a copy of a large database on a
    slow disk takes longer, and `jobctl backup && cp ...` (README.Debian) failed, exit 3, "is jobd stuck?", while
    jobd went on copying. A reply timeout that no reply can meet stands for a copy that takes longer than it."""
    daemon = make_daemon(QUEUES)
    copied = ctl(daemon, "backup", env={"JOBCTL_REPLY_TIMEOUT": "0.000001"})
    assert copied.code == 0, copied
    assert copied.out.startswith(f"copied the database to {backup_path(daemon)} ("), copied
    refused = ctl(daemon, "status", env={"JOBCTL_REPLY_TIMEOUT": "0.000001"})
    assert refused.code == 3 and "gave no reply to daemon.status" in refused.err, refused
