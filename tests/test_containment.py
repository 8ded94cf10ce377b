"""An exception in a job's loop callbacks ends that attempt instead of leaving it `running` for ever (docs/jobs.md,
"When jobd itself fails").

asyncio only logs what escapes a loop callback: whatever the callback was doing is left half done. A `%NN` line of
5,000 digits made int() raise while fd 3 was drained, and its job stayed `running`, its time limit never came, and
jobd's stop waited until systemd's SIGKILL (fixed in 59f31e3). Here a bug is planted in jobd's own fd 3 parser of a
real daemon (a sitecustomize shim, as tests/test_http_api.py plants one in the HTTP API), and the job that reaches it
must end: its attempt `lost` with a reason naming jobd's internal error, its processes killed and reaped, its slot
free for the next job, one ERROR in the log with the traceback, and jobd stopping cleanly at SIGTERM.
"""

from __future__ import annotations

import os
import select
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from harness import open_descriptors
from recovery.support import wait_for_log

from jobd.client import RemoteError

CONFIG = """
[queue.serial]
concurrency = 1
"""

# Plants a bug in jobd: the fd 3 line "a planted bug" raises what no caller expects.
BUG_SHIM = """
from jobd import proc

_line = proc._ProgressReader._line


def _line_with_a_bug(self, raw):
    if raw.strip() == b"a planted bug":
        raise RuntimeError("a bug planted by the test")
    return _line(self, raw)


proc._ProgressReader._line = _line_with_a_bug
"""

STDIN = "a job's stdin, in a memory file of jobd's until the job has it\n"
DEADLINE = 30.0  # for a process the kernel was told to kill; it ends well before


def with_bug(
    make_daemon: Any, tmp_path: Path, shim: str, config: str = "", env: dict[str, str] | None = None, **workflows: str
) -> Any:
    """A started daemon on `config` (and `workflows`, with `env` added to its environment) whose Python runs `shim`
    first, as its sitecustomize."""
    folder = tmp_path / "shim"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(shim)
    daemon = make_daemon(config, start=False)
    daemon.env.update(env or {})
    daemon.env["PYTHONPATH"] = str(folder)
    daemon.write_workflows(**workflows)
    daemon.start()
    return daemon


def _ends(pid: int) -> bool:
    """Whether process `pid` (not our child) has ended or ends within DEADLINE: its pidfd says so."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], DEADLINE)[0])
    finally:
        os.close(pidfd)


def test_a_bug_in_a_jobs_callbacks_ends_its_attempt_and_frees_its_slot(make_daemon: Any, tmp_path: Path) -> None:
    daemon = with_bug(make_daemon, tmp_path, BUG_SHIM, CONFIG)
    pid_file = tmp_path / "grandchild.pid"
    # A grandchild in the job's process group that would outlive the leader, then the line that meets the bug.
    script = 'sleep 600 & echo $! > "$1"; echo "a planted bug" >&3; wait'
    job = daemon.submit(command=["/bin/sh", "-c", script, "sh", str(pid_file)], queue="serial")
    after = daemon.submit(command=["/bin/echo", "next"], queue="serial")  # waits for the one slot
    ended = daemon.wait(job["id"])
    assert ended["state"] == "failed", ended
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["outcome"] == "lost", attempt
    assert attempt["error"] == ("internal error in jobd (see its log): RuntimeError: a bug planted by the test"), (
        attempt
    )
    assert attempt["signal"] == 9, attempt  # the leader was killed, with its group
    assert _ends(int(pid_file.read_text())), "the job's grandchild still runs"
    assert daemon.wait(after["id"])["state"] == "succeeded"  # the slot was freed
    assert daemon.output(after["id"]) == "next\n"
    log = daemon.log()
    assert log.count(" ERROR ") == 1, log
    assert "Traceback" in log and "RuntimeError: a bug planted by the test" in log, log
    assert daemon.stop() == 0, daemon.log()


def test_an_exec_callback_a_bug_broke_is_a_failed_try(make_daemon: Any, tmp_path: Path) -> None:
    """An exec callback runs as a Child too: one that met the bug was counted by its exit status, `delivered` when
    its program had exited 0 before jobd read the line. Its try now fails, saying why."""
    daemon = with_bug(make_daemon, tmp_path, BUG_SHIM, CONFIG)
    script = 'echo "a planted bug" >&3; exit 0'
    daemon.submit(command=["/bin/true"], callbacks={"on_finish": [{"exec": ["/bin/sh", "-c", script]}]})
    wait_for_log(daemon, "try 1 failed (internal error in jobd (see its log): RuntimeError: a bug planted by the test)")
    assert "delivered (try 1)" not in daemon.log()


# Plants a bug in jobd: a task's retry falling due raises what no caller expects.
RETRY_BUG_SHIM = """
from jobd.engine import workflow


def retry_due(self, evqid, now):
    raise RuntimeError("a bug planted by the test")


workflow.Instance.retry_due = retry_due
"""


def test_a_bug_when_a_tasks_retry_falls_due_ends_its_instance(make_daemon: Any, tmp_path: Path) -> None:
    """A workflow task's retry timer ran outside Instances._supervised: an exception there left the instance
    EXECUTING for good, its task waiting for a retry that never came. Now it ends the instance in error, as a bug
    in any other step of an instance does."""
    flaky = (
        '<workflow><subjobs><job><tasks><task name="flaky" path="/bin/false" queue="default" retry_times="1"'
        ' retry_delay="1"/></tasks></job></subjobs></workflow>'
    )
    daemon = with_bug(make_daemon, tmp_path, RETRY_BUG_SHIM, flaky=flaky)
    launched = daemon.call("instance.launch", {"workflow": "flaky"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert (done["status"], done["errors"]) == ("TERMINATED", 1), daemon.call("instance.get", {"id": launched["id"]})
    log = daemon.log()
    assert f"instance={launched['id']} ended by an error in jobd" in log, log
    assert "RuntimeError: a bug planted by the test" in log, log


# Plants a bug in jobd: a schedule's job request cannot be resolved, with what no caller expects.
SCHEDULE_BUG_SHIM = """
from jobd.engine import scheduler


def resolve(*args, **kwargs):
    raise RuntimeError("a bug planted by the test")


scheduler.resolve = resolve
"""

EVERY_SECOND = """
[task.t]
command = ["/bin/true"]

[schedule.s]
task = "t"
calendar = "* * * * * *"
on_failure = "suspend"
"""


def test_a_bug_in_a_schedules_firing_counts_as_a_run_that_could_not_start(make_daemon: Any, tmp_path: Path) -> None:
    """The exception left the due time the schedule's next: the one-shot timer was armed for it again, expired at
    once, and the firing raised again, for ever (jobd spun, a traceback a turn). Now the firing counts as a run that
    could not start (`error`), which suspends a schedule with on_failure = "suspend"."""
    daemon = with_bug(make_daemon, tmp_path, SCHEDULE_BUG_SHIM, EVERY_SECOND)
    wait_for_log(daemon, "schedule s suspended after a failed run")
    [found] = [s for s in daemon.call("schedule.list")["schedules"] if s["name"] == "s"]
    assert found["state"] == "suspended" and found["last_result"] == "error" and found["next_run"] is None, found
    log = daemon.log()
    assert (
        log.count("schedule s: cannot start its task t: internal error: RuntimeError: a bug planted by the test") == 1
    ), log
    assert log.count("Traceback") == 1, log


# Plants a bug in jobd: a JSON-RPC line holding "planted" raises in the connection's reading, outside any method.
CONNECTION_BUG_SHIM = """
from jobd.protocol import jsonrpc

_decode = jsonrpc.decode


def decode(line):
    if b"planted" in line:
        raise RuntimeError("a bug planted by the test")
    return _decode(line)


jsonrpc.decode = decode
"""


def test_a_bug_in_reading_a_connection_closes_that_connection_only(make_daemon: Any, tmp_path: Path) -> None:
    """Outside a request's method (whose exception answers INTERNAL_ERROR), asyncio contains what a protocol's
    data_received raises: it logs it with its traceback and closes that connection. The other clients go on."""
    daemon = with_bug(make_daemon, tmp_path, CONNECTION_BUG_SHIM)
    with daemon.client() as other, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as broken:
        assert other.call("ping", timeout=DEADLINE) is not None
        broken.settimeout(DEADLINE)
        broken.connect(str(daemon.socket_path))
        broken.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "planted"}\n')
        assert broken.recv(4096) == b""  # closed, with no answer
        assert other.call("ping", timeout=DEADLINE) is not None
    log = daemon.log()
    assert log.count(" ERROR ") == 1 and log.count("RuntimeError: a bug planted by the test") == 1, log


# Plants a bug in jobd: telling an attempt's end raises, after the engine has taken the job off its running ones.
END_BUG_SHIM = """
from jobd.engine import core


def _settled(self, job, attempt):
    raise RuntimeError("a bug planted by the test")


core.Engine._settled = _settled
"""


def test_a_stop_does_not_wait_for_ever_for_an_end_a_bug_left_untold(make_daemon: Any, tmp_path: Path) -> None:
    """A stop (SIGTERM) waits for the end of every job it stops. A bug while the engine recorded and told an end
    left that wait unanswered: jobd never exited, until systemd's SIGKILL. The end now counts as told, the bug is
    logged with its traceback, and jobd exits 0."""
    daemon = with_bug(make_daemon, tmp_path, END_BUG_SHIM)
    job = daemon.submit(command=["/bin/sleep", "600"])
    wait_for_log(daemon, f"job={job['id']} running")
    try:
        assert daemon.stop(timeout=DEADLINE) == 0, daemon.log()
    finally:
        if daemon.running():
            daemon.kill9()
    log = daemon.log()
    assert log.count(f"job={job['id']}: internal error recording its end") == 1, log
    assert "RuntimeError: a bug planted by the test" in log, log


def test_a_database_moved_away_from_under_a_path_no_longer_a_directory_takes_no_writes(make_daemon: Any) -> None:
    """The look at the database file after an inotify event (jobd/store.py, _FileName) took ENOTDIR for a bug: the
    state directory renamed and a plain file put in its place, the callback raised (asyncio logged it), the file was
    not seen as moved away, and the next submit was answered as saved into a file no start would open again."""
    daemon = make_daemon("")
    state = daemon.state_dir
    os.kill(daemon.pid, signal.SIGSTOP)  # the three changes are told to jobd's loop together, as one event
    try:
        os.rename(state / "jobd.sqlite3", state / "moved.sqlite3")
        os.rename(state, state.with_name("state.old"))
        state.write_text("")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    with pytest.raises(RemoteError) as refused:
        daemon.submit(command=["/bin/true"])
    assert refused.value.code == "STORE_FAILED" and "was moved away (renamed) while jobd ran" in str(refused.value)
    assert " ERROR Exception in callback" not in daemon.log()


# Plants a bug in jobd: starting a job's program raises what no caller expects.
START_BUG_SHIM = """
from jobd import proc


def spawn(cls, *args, **kwargs):
    raise RuntimeError("a bug planted by the test")


proc.Child.spawn = classmethod(spawn)
"""


def test_a_bug_in_starting_a_job_is_a_failed_start(make_daemon: Any, tmp_path: Path) -> None:
    """Only SpawnError was expected from a start: anything else left the job `running`, with no process, for good
    (no exit could end it, nor a cancel), its slot taken. It is now a `spawn_error` attempt naming the bug."""
    daemon = with_bug(make_daemon, tmp_path, START_BUG_SHIM, CONFIG)
    job = daemon.submit(command=["/bin/true"], queue="serial")
    assert daemon.wait(job["id"])["state"] == "failed"
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["outcome"] == "spawn_error", attempt
    assert attempt["error"] == "internal error in jobd (see its log): RuntimeError: a bug planted by the test"
    log = daemon.log()
    assert log.count(f"job={job['id']}: internal error starting it") == 1 and log.count("Traceback") == 1, log


# Plants bugs in jobd's start of a job, after its pipes are made and before the child has them: in the spawn itself
# (every pipe and reader made) or in the making of its fd 3 reader (stdout's and stderr's made). The job's last
# argument says where.
PIPES_BUG_SHIM = """
from jobd import proc

_spawn = proc.Child.spawn.__func__
_popen_with_fd3 = proc._popen_with_fd3
_ProgressReader = proc._ProgressReader
planted = []


def spawn(cls, spec, *args, **kwargs):
    planted[:] = spec.argv[-1:]
    return _spawn(cls, spec, *args, **kwargs)


def popen_with_fd3(spec, *fds):
    if planted == ["bug in the spawn"]:
        raise RuntimeError("a bug planted by the test")
    return _popen_with_fd3(spec, *fds)


class ProgressReader(_ProgressReader):
    def __init__(self, *args, **kwargs):
        if planted == ["bug in the fd 3 reader"]:
            raise RuntimeError("a bug planted by the test")
        super().__init__(*args, **kwargs)


proc.Child.spawn = classmethod(spawn)
proc._popen_with_fd3 = popen_with_fd3
proc._ProgressReader = ProgressReader
"""


def _pipes(pid: int) -> list[str]:
    """The pipes (and memory files, a job's stdin) a process holds open."""
    return sorted(target for target in open_descriptors(pid).values() if target.startswith(("pipe:", "/memfd:")))


@pytest.mark.parametrize("where", ["bug in the spawn", "bug in the fd 3 reader"])
def test_a_bug_in_starting_a_job_leaves_none_of_its_pipes_open_in_jobd(
    make_daemon: Any, tmp_path: Path, where: str
) -> None:
    """Only an OSError (or Popen's SubprocessError) closed the pipes made for a job whose start failed: any other
    exception left jobd holding their read ends, three a start, until it ran out of descriptors."""
    daemon = with_bug(make_daemon, tmp_path, PIPES_BUG_SHIM, CONFIG)
    warm_up = daemon.submit(command=["/bin/echo", "no bug"], stdin=STDIN, queue="serial")
    assert daemon.wait(warm_up["id"])["state"] == "succeeded"  # whatever a first start sets up for good is there
    before = _pipes(daemon.pid)
    for _ in range(3):
        job = daemon.submit(command=["/bin/echo", where], stdin=STDIN, queue="serial")
        assert daemon.wait(job["id"])["state"] == "failed"
        [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
        assert attempt["error"] == "internal error in jobd (see its log): RuntimeError: a bug planted by the test"
    assert _pipes(daemon.pid) == before


def test_a_flush_that_cannot_open_the_wal_leaves_the_next_ones_free_to_run(make_daemon: Any) -> None:
    """durability = "fsync": the first reply opens the WAL to fsync it. That open failing (the WAL removed under
    jobd, or no descriptor left) raised with the flush marked under way, and every later reply waited for that
    flush to end: for ever. Each is now answered: here the WAL stays gone, so each says so. It is the machine's
    trouble, not a bug of jobd's: STORE_FAILED naming the file and the system's words, one line logged, no
    traceback (it was INTERNAL_ERROR, with a traceback logged for each)."""
    daemon = make_daemon("", daemon_extra='durability = "fsync"')
    wal = daemon.state_dir / "jobd.sqlite3-wal"
    wal.unlink()
    said = (
        f"jobd could not open its WAL {wal} to fsync it (No such file or directory): committed, but not known to "
        "survive a power cut"
    )
    for _ in range(2):
        with pytest.raises(RemoteError) as failed:
            daemon.call("job.submit", {"command": ["/bin/true"]}, timeout=DEADLINE)
        assert (failed.value.code, failed.value.message) == ("STORE_FAILED", said), failed.value
    log = daemon.log()
    assert log.count(f"job.submit: {said}") == 1 and "Traceback" not in log, log


# Plants a bug in jobd: Child.__init__, the program started, meets what no caller expects once the job has told (by
# writing to the FIFO $JOBD_TEST_FIFO) its own pid and its grandchild's, which the bug writes down beside it.
WATCH_BUG_SHIM = """
import os
from jobd import proc


def _pipe_watch(loop):
    fifo = os.environ["JOBD_TEST_FIFO"]
    with open(fifo) as told:  # the open waits for the job to open it, the read for the job to close it
        pids = told.read()
    with open(fifo + ".pids", "w") as noted:
        noted.write(pids)
    raise RuntimeError("a bug planted by the test")


proc._pipe_watch = _pipe_watch
"""


def test_a_bug_in_watching_a_started_job_kills_and_reaps_it(make_daemon: Any, tmp_path: Path) -> None:
    """Child.spawn stopped a program it could not watch only for an OSError (no descriptor, no memory): any other
    exception of Child.__init__ (the program started) left the program running, its group too, unwatched, never
    reaped, while the engine recorded a failed start. Now its group is SIGKILLed and its leader reaped first."""
    fifo = tmp_path / "told"
    os.mkfifo(fifo)
    daemon = with_bug(make_daemon, tmp_path, WATCH_BUG_SHIM, CONFIG, env={"JOBD_TEST_FIFO": str(fifo)})
    script = 'sleep 600 & echo $$ $! > "$1"; wait'
    job = daemon.submit(command=["/bin/sh", "-c", script, "sh", str(fifo)], queue="serial")
    assert daemon.wait(job["id"])["state"] == "failed"
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["outcome"] == "spawn_error", attempt
    assert attempt["error"] == "internal error in jobd (see its log): RuntimeError: a bug planted by the test"
    leader, grandchild = (int(pid) for pid in Path(f"{fifo}.pids").read_text().split())
    try:
        # Reaped before the start was recorded as failed: no longer jobd's child, not even a zombie.
        assert leader not in dict(daemon.children()), f"the job's process {leader} was left to run, or unreaped"
        assert _ends(grandchild), "the job's grandchild still runs"
    finally:
        if leader in dict(daemon.children()):  # left running by jobd: not by the test, nor for the next one
            os.killpg(leader, signal.SIGKILL)
    log = daemon.log()
    assert log.count(f"job={job['id']}: internal error starting it") == 1 and log.count("Traceback") == 1, log
    assert daemon.stop() == 0, daemon.log()


# Plants a bug in jobd: the hang-up of a client with one request waiting raises what no caller expects.
HANGUP_BUG_SHIM = """
from jobd import server

_hung_up = server.Connection._hung_up


def _hung_up_with_a_bug(self):
    if self._waiting == 1:
        raise RuntimeError("a bug planted by the test")
    _hung_up(self)


server.Connection._hung_up = _hung_up_with_a_bug
"""


def _waiting(daemon: Any, waits: int, job_id: int) -> socket.socket:
    """A connection with `waits` job.wait requests for `job_id` waiting, watched for its hang-up once this returns: a
    ping sent after them is answered, so they were taken (in order) before it."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(DEADLINE)
    client.connect(str(daemon.socket_path))
    lines = [
        f'{{"jsonrpc": "2.0", "id": {n}, "method": "job.wait", "params": {{"id": {job_id}}}}}\n' for n in range(waits)
    ]
    client.sendall("".join(lines).encode() + b'{"jsonrpc": "2.0", "id": "ping", "method": "ping"}\n')
    answer = b""
    while b'"ping"' not in answer:
        answer += client.recv(4096)
    return client


def test_a_bug_in_one_hang_up_leaves_the_others_of_its_turn_handled(make_daemon: Any, tmp_path: Path) -> None:
    """The hang-ups of clients are one epoll set (jobd/epollset.py), whose ready descriptors the loop hands over in
    one batch. A callback that raised ended the batch: the hang-ups after it were not handled that turn, and, the
    one that raised being reported first again at every turn, never. Here two clients hang up at once, the first
    one's callback meets the bug, and the second one's requests are dropped all the same."""
    daemon = with_bug(make_daemon, tmp_path, HANGUP_BUG_SHIM)
    job = daemon.submit(command=["/bin/sleep", "600"])
    first, second = _waiting(daemon, 1, job["id"]), _waiting(daemon, 2, job["id"])
    os.kill(daemon.pid, signal.SIGSTOP)  # both hang-ups are in jobd's set, in this order, before it looks
    try:
        first.close()
        second.close()
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    wait_for_log(daemon, "closed its connection with 2 requests waiting: dropped")
    assert daemon.call("job.cancel", {"id": job["id"]}) is not None
    daemon.wait(job["id"])
    log = daemon.log()
    assert log.count("RuntimeError: a bug planted by the test") == 1, log  # logged once: its socket left the set
