"""Live reload of a real jobd: daemon.reload, inotify, SIGHUP; broken files; queue changes; running jobs untouched.

Jobs that must stay running are held by lock files the test owns (`flock`), so the test decides when they end.
Reloads are awaited through the daemon's own signals: the reply to daemon.reload, or the RELOADING=1 / READY=1 pair
it sends over NOTIFY_SOCKET.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Daemon, in_user_namespace
from recovery.support import Gate, gated, kill9, pump_of, start, terminate, wait_for_log

from jobd.client import RemoteError
from jobd.daemon import RESTART_ONLY_DAEMON_KEYS

TASKS = """
[task.echo]
command = ["/bin/echo"]
"""


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Callable[[str], Gate]]:
    made: list[Gate] = []

    def make(name: str) -> Gate:
        gate = Gate(tmp_path / f"{name}.lock")
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.release()


def remote_error(daemon: Daemon, method: str, params: dict[str, Any] | None = None) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        daemon.call(method, params)
    return info.value


def queue(daemon: Daemon, name: str) -> dict[str, Any]:
    queues = {q["name"]: q for q in daemon.call("queue.list")["queues"]}
    assert name in queues, f"queue {name!r} not listed: {sorted(queues)}"
    found: dict[str, Any] = queues[name]
    return found


def queue_names(daemon: Daemon) -> set[str]:
    return {q["name"] for q in daemon.call("queue.list")["queues"]}


def states(daemon: Daemon, ids: list[int]) -> list[str]:
    return [daemon.call("job.get", {"id": job_id})["state"] for job_id in ids]


def atomic_write(path: Path, text: str) -> None:
    """As editors and config tools do: a hidden temporary file renamed over the real one."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


# --- daemon.reload ------------------------------------------------------------------------------------------


def test_reload_makes_a_new_task_submittable(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(TASKS)
    assert remote_error(daemon, "job.submit", {"task": "hello"}).code == "UNKNOWN_TASK"

    daemon.write_config(TASKS + '\n[task.hello]\ncommand = ["/bin/echo", "hello from the new task"]\n')
    reply = daemon.call("daemon.reload")
    assert reply["ok"] is True
    assert str(daemon.config_dir / "jobd.toml") in reply["files"]

    job = daemon.wait(daemon.submit(task="hello")["id"])
    assert job["state"] == "succeeded", job
    assert daemon.output(job["id"]) == "hello from the new task\n"
    status = daemon.call("daemon.status")
    assert status["last_reload"]["ok"] is True and status["last_reload"]["error"] is None


def test_concurrency_change_applies_at_once(jobd: Callable[..., Daemon], gates: Callable[[str], Gate]) -> None:
    config = "[queue.work]\nconcurrency = {n}\n"
    daemon = jobd(config.format(n=1))
    held = [gates(f"job{i}") for i in range(5)]
    ids = [
        daemon.submit(command=gated(gate, "/bin/echo", f"done {i}"), queue="work")["id"] for i, gate in enumerate(held)
    ]
    assert states(daemon, ids) == ["running"] + ["queued"] * 4

    # Raised: waiting jobs start as part of the reload itself.
    daemon.write_config(config.format(n=3))
    assert daemon.call("daemon.reload")["ok"] is True
    work = queue(daemon, "work")
    assert (work["concurrency"], work["running"], work["queued"]) == (3, 3, 2), work
    running = daemon.call("job.list", {"state": "running", "queue": "work"})["jobs"]
    assert sorted(job["id"] for job in running) == ids[:3]

    # Lowered: the three running jobs go on, untouched; nothing starts until the queue is under the new limit.
    daemon.write_config(config.format(n=1))
    assert daemon.call("daemon.reload")["ok"] is True
    work = queue(daemon, "work")
    assert (work["concurrency"], work["running"], work["queued"]) == (1, 3, 2), work
    for job_id in ids[:3]:
        job = daemon.call("job.get", {"id": job_id})
        assert (job["state"], job["attempts"]) == ("running", 1), job

    for finished, expected in ((0, ["running", "running", "queued", "queued"]), (1, ["running", "queued", "queued"])):
        held[finished].release()
        assert daemon.wait(ids[finished])["state"] == "succeeded"
        # The end of a job is when its queue starts the next one, so this is already the settled picture.
        assert states(daemon, ids[finished + 1 :]) == expected, f"after job {finished + 1} ended"
        assert queue(daemon, "work")["running"] == 3 - (finished + 1)

    held[2].release()
    assert daemon.wait(ids[2])["state"] == "succeeded"
    assert states(daemon, ids[3:]) == ["running", "queued"]  # now under the limit: exactly one starts
    held[3].release()
    held[4].release()
    for i, job_id in enumerate(ids):
        assert daemon.wait(job_id)["state"] == "succeeded"
        assert daemon.output(job_id) == f"done {i}\n"


def test_a_scheduler_change_reorders_the_jobs_already_waiting(
    jobd: Callable[..., Daemon], gates: Callable[[str], Gate]
) -> None:
    # The queue model test changes schedulers among random steps, and its few seeds never caught a reload that
    # kept the waiting jobs in the old scheduler's order.
    config = '[queue.work]\nconcurrency = 1\nscheduler = "{scheduler}"\n'
    daemon = jobd(config.format(scheduler="priority"))
    blocker, *held = [gates(name) for name in ("blocker", "a", "b", "c")]
    first = daemon.submit(command=gated(blocker, "/bin/true"), queue="work")["id"]
    # Submitted a, b, c; by priority (lower first) c, b, a.
    a, b, c = (
        daemon.submit(command=gated(gate, "/bin/true"), queue="work", priority=priority)["id"]
        for gate, priority in zip(held, (30, 20, 10), strict=True)
    )
    assert states(daemon, [first, a, b, c]) == ["running", "queued", "queued", "queued"]

    daemon.write_config(config.format(scheduler="fifo"))
    assert daemon.call("daemon.reload")["ok"] is True
    blocker.release()
    assert daemon.wait(first)["state"] == "succeeded"
    assert states(daemon, [a, b, c]) == ["running", "queued", "queued"]  # submission order: a first

    daemon.write_config(config.format(scheduler="priority"))
    assert daemon.call("daemon.reload")["ok"] is True
    held[0].release()
    assert daemon.wait(a)["state"] == "succeeded"
    assert states(daemon, [b, c]) == ["queued", "running"]  # priority order again: c before b
    held[2].release()
    held[1].release()
    assert [daemon.wait(job_id)["state"] for job_id in (c, b)] == ["succeeded", "succeeded"]


# --- broken files -------------------------------------------------------------------------------------------


def wait_status(daemon: Daemon, match: Callable[[str], bool]) -> str:
    return pump_of(daemon).wait_for(lambda line: line.startswith("STATUS=") and match(line))


def test_broken_drop_in_keeps_the_running_config(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(TASKS)
    drop_ins = daemon.config_dir / "jobd.d"
    bad = drop_ins / "50-bad.toml"
    # Written first, so that no reload can ever see 40-new.toml without the broken file beside it.
    atomic_write(bad, "[queue.default]\nconcurrency = 2\nscheduler = \n")
    atomic_write(drop_ins / "40-new.toml", '[task.fresh]\ncommand = ["/bin/echo", "fresh"]\n')

    # 1. TOML syntax error
    error = remote_error(daemon, "daemon.reload")
    assert error.code == "CONFIG_INVALID", error
    assert error.data["file"] == str(bad)
    assert error.data["line"] == 3
    assert f"{bad}:3" in error.message

    def old_config_works() -> None:
        job = daemon.wait(daemon.submit(task="echo", args=["still", "here"])["id"])
        assert job["state"] == "succeeded" and daemon.output(job["id"]) == "still here\n"
        # All or nothing: the valid new file next to the broken one did not apply either.
        assert remote_error(daemon, "job.submit", {"task": "fresh"}).code == "UNKNOWN_TASK"
        assert queue(daemon, "default")["concurrency"] == 1

    old_config_works()
    last = daemon.call("daemon.status")["last_reload"]
    assert last["ok"] is False and str(bad) in last["error"], last
    line = wait_status(daemon, lambda line: "reload failed" in line)
    assert str(bad) in line, line

    # 2. A semantic error: an unknown key, named with file, line and dotted key.
    atomic_write(bad, "[queue.default]\nconcurrency = 2\nconcurency = 3\n")
    error = remote_error(daemon, "daemon.reload")
    assert error.code == "CONFIG_INVALID", error
    assert (error.data["file"], error.data["line"], error.data["key"]) == (str(bad), 3, "queue.default.concurency")
    assert f"{bad}:3" in error.message and "concurency" in error.message and "concurrency" in error.message
    old_config_works()
    last = daemon.call("daemon.status")["last_reload"]
    assert last["ok"] is False and "queue.default.concurency" in last["error"], last
    wait_status(daemon, lambda line: "reload failed" in line and "concurency" in line)

    # 3. Fixed: the next reload applies everything.
    atomic_write(bad, "[queue.default]\nconcurrency = 2\n")
    reply = daemon.call("daemon.reload")
    assert reply["ok"] is True and str(bad) in reply["files"] and str(drop_ins / "40-new.toml") in reply["files"]
    job = daemon.wait(daemon.submit(task="fresh")["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "fresh\n"
    assert queue(daemon, "default")["concurrency"] == 2
    last = daemon.call("daemon.status")["last_reload"]
    assert last["ok"] is True and last["error"] is None, last
    wait_status(daemon, lambda line: "reload failed" not in line)


@pytest.mark.parametrize(
    ("drop_in", "key", "secret"),
    [
        # the password, or the token, written where its hash goes
        ('[tcp.users.alice]\npassword_sha1 = "hunter2-plain"\n', "tcp.users.alice.password_sha1", "hunter2-plain"),
        ('[http.tokens.ci]\ntoken_sha256 = "my-plain-token"\n', "http.tokens.ci.token_sha256", "my-plain-token"),
        # a numeric secret written without quotes
        (
            '[task.db]\ncommand = ["/bin/true"]\nenvironment = { PGPASSWORD = 918273645 }\n',
            "task.db.environment.PGPASSWORD",
            "918273645",
        ),
        (
            '[task.db]\ncommand = ["/bin/true"]\nparameters = "env"\nallowed_params = ["PIN"]\n'
            '[schedule.db]\ntask = "db"\ncalendar = "0 3 * * *"\nparameters = { PIN = 564738291 }\n',
            "schedule.db.parameters.PIN",
            "564738291",
        ),
    ],
)
def test_a_broken_secret_setting_is_named_without_its_value(
    jobd: Callable[..., Daemon], drop_in: str, key: str, secret: str
) -> None:
    """A reload's error is logged, answered, kept in daemon.status (for every client) and told in systemd's
    STATUS= (for every local user): it names the setting and what is wrong, never the value."""
    daemon = jobd(TASKS)
    atomic_write(daemon.config_dir / "jobd.d" / "50-secret.toml", drop_in)
    error = remote_error(daemon, "daemon.reload")
    assert error.code == "CONFIG_INVALID" and error.data["key"] == key, error
    assert secret not in error.message
    assert secret not in str(daemon.call("daemon.status")["last_reload"])
    assert secret not in wait_status(daemon, lambda line: "reload failed" in line and key in line)
    assert secret not in daemon.log()


def test_a_port_written_in_digits_other_than_ascii_is_a_config_error(jobd: Callable[..., Daemon]) -> None:
    """str.isdigit() says "¹²" (superscripts) is digits, and "٨٠٨٠" (Arabic-Indic); int() refused the first: the
    reload was an INTERNAL_ERROR with a traceback in the log (and jobd did not start with it). A port is ASCII digits:
    both are refused, named, as any bad value, and the running configuration stays."""
    daemon = jobd(TASKS)
    for section, port in (("tcp", "\u00b9\u00b2"), ("http", "\u0668\u0660\u0668\u0660")):
        atomic_write(daemon.config_dir / "jobd.d" / "50-listen.toml", f'[{section}]\nlisten = "{port}"\n')
        error = remote_error(daemon, "daemon.reload")
        assert error.code == "CONFIG_INVALID" and error.data["key"] == f"{section}.listen", error
        assert f"{json.dumps(port)} is not allowed; allowed: a port (" in error.message, error
        assert daemon.wait(daemon.submit(task="echo", args=["still"])["id"])["state"] == "succeeded"
    assert "Traceback" not in daemon.log()


def test_a_fifo_or_an_endless_file_among_the_config_is_refused_without_blocking(jobd: Callable[..., Daemon]) -> None:
    # The daemon reads its configuration on the event loop: a FIFO would hold it in open() until a writer came,
    # /dev/zero would fill its memory. Each is refused by name and the running configuration stays.
    daemon = jobd(TASKS)
    fifo = daemon.config_dir / "jobd.d" / "80-fifo.toml"
    os.mkfifo(fifo)
    error = remote_error(daemon, "daemon.reload")
    assert error.code == "CONFIG_INVALID" and error.data["file"] == str(fifo), error
    assert "FIFO" in error.message and "not a regular file" in error.message, error.message
    fifo.unlink()

    endless = daemon.config_dir / "jobd.d" / "80-zero.toml"
    endless.symlink_to("/dev/zero")
    error = remote_error(daemon, "daemon.reload")
    assert error.data["file"] == str(endless) and "character device" in error.message, error.message
    endless.unlink()

    huge = daemon.config_dir / "jobd.d" / "80-huge.toml"
    with huge.open("wb") as file:
        file.truncate(17 * 1024 * 1024)  # sparse: no 17 MiB written
    error = remote_error(daemon, "daemon.reload")
    assert error.data["file"] == str(huge) and "larger than 16 MiB" in error.message, error.message
    huge.unlink()

    workflows = daemon.config_dir / "workflows"
    workflows.mkdir(exist_ok=True)
    os.mkfifo(workflows / "piped.xml")
    error = remote_error(daemon, "daemon.reload")
    assert error.data["file"] == str(workflows / "piped.xml") and "FIFO" in error.message, error.message
    (workflows / "piped.xml").unlink()

    job = daemon.wait(daemon.submit(task="echo", args=["still", "serving"])["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "still serving\n"
    assert daemon.call("daemon.reload")["ok"] is True


# --- reload triggers ----------------------------------------------------------------------------------------


def test_inotify_reloads_on_a_new_drop_in(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(TASKS)
    assert remote_error(daemon, "job.submit", {"task": "watched"}).code == "UNKNOWN_TASK"
    pump = pump_of(daemon)
    pump.skip()
    drop_in = daemon.config_dir / "jobd.d" / "60-watched.toml"
    atomic_write(drop_in, '[task.watched]\ncommand = ["/bin/echo", "seen by inotify"]\n')

    # No command was sent: only the watcher can have started this reload.
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    assert str(drop_in) in daemon.call("daemon.status")["config_files"]
    job = daemon.wait(daemon.submit(task="watched")["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "seen by inotify\n"


def test_without_inotify_jobd_runs_and_reloads_on_sighup(make_daemon: Callable[..., Daemon]) -> None:
    # Out of inotify instances (the user's fs.inotify.max_user_instances, shared by root's every service and
    # container), jobd refused to start at all. Here the limit is 0 in a user namespace of the daemon's own.
    daemon = make_daemon(TASKS, start=False)
    daemon.command_prefix = in_user_namespace("echo 0 > /proc/sys/user/max_inotify_instances")
    daemon.start()
    assert "the configuration files are not watched (inotify: Too many open files" in daemon.log()
    daemon.write_config(TASKS + '[task.hupped]\ncommand = ["/bin/echo", "after SIGHUP"]\n')
    assert daemon.notify is not None
    os.kill(daemon.pid, signal.SIGHUP)
    daemon.notify.wait_for("RELOADING=1")
    daemon.notify.wait_for("READY=1")
    job = daemon.wait(daemon.submit(task="hupped")["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "after SIGHUP\n"


def test_watches_that_cannot_be_renewed_are_reported_and_the_rest_still_reload(
    make_daemon: Callable[..., Daemon],
) -> None:
    # The daemon's user may place three inotify watches (a user namespace of its own): the config dir, which also
    # stands for the workflows/ directory not made yet, jobd.d, and the database file (jobd/store.py). Making
    # workflows/ makes the watcher place them all again, and the fourth is refused (ENOSPC,
    # fs.inotify.max_user_watches used up). That raised out of the event loop's callback, an "Exception in callback"
    # traceback in the journal and no word of what it meant.
    daemon = make_daemon(TASKS, start=False)
    daemon.command_prefix = in_user_namespace("echo 3 > /proc/sys/user/max_inotify_watches")
    pump = start(daemon)
    assert "not watched" not in daemon.log()
    (daemon.config_dir / "workflows").mkdir()
    pump.wait_for("RELOADING=1")  # the new directory may hold files: reloaded after the watches are placed
    pump.wait_for("READY=1")
    assert f"{daemon.config_dir / 'workflows'} is not watched (inotify: No space left on device" in daemon.log()

    # The watches that could be placed still work: a drop-in is reloaded without a command.
    atomic_write(daemon.config_dir / "jobd.d" / "60-watched.toml", '[task.seen]\ncommand = ["/bin/echo", "seen"]\n')
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    job = daemon.wait(daemon.submit(task="seen")["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "seen\n"

    # Watches to spare again (the limit raised in the daemon's namespace): the next change places them all, and
    # from then on a workflow saved into workflows/ is reloaded by itself.
    raise_limit = "echo 4 > /proc/sys/user/max_inotify_watches"
    subprocess.run(["nsenter", "--user", "-t", str(daemon.pid), "sh", "-c", raise_limit], check=True)
    atomic_write(daemon.config_dir / "jobd.d" / "61-again.toml", "# a change the watcher sees\n")
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    assert "the configuration directories are all watched again" in daemon.log()
    atomic_write(
        daemon.config_dir / "workflows" / "hello.xml",
        '<workflow><subjobs><job name="j"><tasks>'
        '<task name="t" path="/bin/echo hello" queue="default"/></tasks></job></subjobs></workflow>',
    )
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    assert [w["name"] for w in daemon.call("workflow.list")["workflows"]] == ["hello"]
    assert "Traceback" not in daemon.log()


def test_a_reload_makes_again_a_socket_file_removed_while_jobd_ran(
    jobd: Callable[..., Daemon], gates: Callable[[str], Gate]
) -> None:
    """The socket files removed under a running jobd (a cleanup of /run or /tmp): no client could connect, and a
    restart would stop the running jobs. jobctl says a reload makes them again, and it does, the job untouched."""
    daemon = jobd()
    gate = gates("running")
    running = daemon.submit(command=gated(gate, "/bin/echo", "went on"))["id"]
    assert states(daemon, [running]) == ["running"]
    earlier = daemon.client()  # a connection made before: it goes on through the rebinding
    daemon.socket_path.unlink()
    daemon.evqueue_socket.unlink()
    refused = subprocess.run(
        [sys.executable, "-m", "jobd.jobctl", "--socket", str(daemon.socket_path), "queues"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert refused.returncode == 3
    assert refused.stderr.endswith(
        "if jobd runs, its socket file was removed: `systemctl kill --kill-whom=main -s HUP jobd` makes it again, "
        "or logs what to do)\n"
    )

    os.kill(daemon.pid, signal.SIGHUP)
    for path in (daemon.socket_path, daemon.evqueue_socket):
        wait_for_log(daemon, f"the socket file {path} had been removed while jobd ran (no client could connect): made")
    assert daemon.call("ping") is not None
    assert os.stat(daemon.socket_path).st_mode & 0o777 == 0o660  # as at the start
    with socket.socket(socket.AF_UNIX) as evqueue_client:  # the greeting socket greets again
        evqueue_client.connect(str(daemon.evqueue_socket))
        assert evqueue_client.recv(100).startswith(b"<ready ")
    with earlier:
        assert earlier.call("job.get", {"id": running})["state"] == "running"
    gate.release()
    assert daemon.wait(running)["state"] == "succeeded" and daemon.output(running) == "went on\n"

    # Something else in a socket's place is left alone, and said to be there.
    daemon.evqueue_socket.unlink()
    daemon.evqueue_socket.write_text("not jobd's\n")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for_log(daemon, f"{daemon.evqueue_socket} is no longer jobd's socket (something else took its place)")
    assert daemon.evqueue_socket.read_text() == "not jobd's\n"


def test_sighup_reloads(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(TASKS)
    pump = pump_of(daemon)
    # The drop-in is a symlink to a file outside the watched directories: editing that file is invisible to
    # inotify, so only the SIGHUP can make the daemon see the edit.
    outside = daemon.root / "outside.toml"
    outside.write_text("# nothing yet\n")
    link = daemon.config_dir / "jobd.d" / "70-linked.toml"
    pump.skip()
    link.symlink_to(outside)
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    assert str(link) in daemon.call("daemon.status")["config_files"]

    outside.write_text('[task.hupped]\ncommand = ["/bin/echo", "after SIGHUP"]\n')
    assert remote_error(daemon, "job.submit", {"task": "hupped"}).code == "UNKNOWN_TASK"
    os.kill(daemon.pid, signal.SIGHUP)
    pump.wait_for("RELOADING=1")
    pump.wait_for("READY=1")
    job = daemon.wait(daemon.submit(task="hupped")["id"])
    assert job["state"] == "succeeded" and daemon.output(job["id"]) == "after SIGHUP\n"


def test_a_sigterm_among_a_burst_of_sighups_stops_jobd(jobd: Callable[..., Daemon]) -> None:
    """A script reloading in a loop, then stopping. asyncio's signal handling learnt which signal came from a byte
    in its wake-up socket, dropped when that was full (a few hundred signals while the loop was busy), and the
    SIGTERM with it: jobd ran on until systemd's SIGKILL, and Python printed "Exception ignored ... signal wakeup
    fd" for every byte dropped. Here the burst and the SIGTERM all come while jobd reads a long configuration."""
    daemon = jobd(TASKS + "".join(f'[task.t{n}]\ncommand = ["/bin/true"]\n' for n in range(10000)))
    pump = pump_of(daemon)
    pump.skip()
    os.kill(daemon.pid, signal.SIGHUP)
    pump.wait_for("RELOADING=1")  # sent before the files are read: the loop is busy with them from here on
    for _ in range(3000):
        os.kill(daemon.pid, signal.SIGHUP)
    os.kill(daemon.pid, signal.SIGTERM)
    assert not pump.arrived("READY=1"), "the reload ended before the burst did: the test needs a longer configuration"
    pump.wait_for("STOPPING=1")
    assert daemon.process is not None and daemon.process.wait(30) == 0
    pump.stop()
    log = daemon.log()
    assert "stopped" in log and "Exception ignored" not in log and "Traceback" not in log


# --- what a reload does to queues and jobs ------------------------------------------------------------------


def test_removed_queue_drains_and_takes_nothing_new(jobd: Callable[..., Daemon], gates: Callable[[str], Gate]) -> None:
    daemon = jobd(TASKS + "\n[queue.extra]\nconcurrency = 1\n")
    first, second = gates("first"), gates("second")
    a = daemon.submit(command=gated(first, "/bin/echo", "a"), queue="extra")["id"]
    b = daemon.submit(command=gated(second, "/bin/echo", "b"), queue="extra")["id"]
    assert states(daemon, [a, b]) == ["running", "queued"]

    daemon.write_config(TASKS)
    assert daemon.call("daemon.reload")["ok"] is True
    extra = queue(daemon, "extra")
    assert (extra["closed"], extra["running"], extra["queued"]) == (True, 1, 1), extra
    error = remote_error(daemon, "job.submit", {"command": ["/bin/true"], "queue": "extra"})
    assert error.code == "QUEUE_CLOSED", error

    first.release()
    assert daemon.wait(a)["state"] == "succeeded"
    assert states(daemon, [b]) == ["running"]  # the queued one still runs
    extra = queue(daemon, "extra")
    assert (extra["closed"], extra["running"], extra["queued"]) == (True, 1, 0), extra
    assert remote_error(daemon, "job.submit", {"command": ["/bin/true"], "queue": "extra"}).code == "QUEUE_CLOSED"

    second.release()
    assert daemon.wait(b)["state"] == "succeeded"
    assert [daemon.output(a), daemon.output(b)] == ["a\n", "b\n"]
    # Drained: "then it disappears" (docs/config.md).
    assert "extra" not in queue_names(daemon)


def test_a_key_is_answered_with_its_job_after_its_queue_and_task_were_removed(
    jobd: Callable[..., Daemon], gates: Callable[[str], Gate]
) -> None:
    """A client that lost the first reply asks again with the same key, and gets that job: also once a reload has
    closed its queue, removed its task, or both (it was QUEUE_CLOSED, UNKNOWN_TASK, then UNKNOWN_QUEUE)."""
    gate = gates("held")
    extra = "\n[queue.extra]\nconcurrency = 1\n"
    held = f'[task.held]\ncommand = {json.dumps(gated(gate, "/bin/echo", "held"))}\nqueue = "extra"\n'
    daemon = jobd(TASKS + extra + held)
    adhoc = {"command": ["/bin/true"], "queue": "extra", "key": "adhoc-1"}
    first = daemon.submit(task="held", key="task-1")["id"]
    second = daemon.submit(**adhoc)["id"]
    daemon.write_config(TASKS)  # the task goes, and the queue, which drains
    assert daemon.call("daemon.reload")["ok"] is True
    assert daemon.submit(task="held", key="task-1")["id"] == first
    assert daemon.submit(**adhoc)["id"] == second
    assert remote_error(daemon, "job.submit", {"task": "held", "key": "task-2"}).code == "UNKNOWN_TASK"
    assert remote_error(daemon, "job.submit", {**adhoc, "key": "adhoc-2"}).code == "QUEUE_CLOSED"
    gate.release()
    assert [daemon.wait(first)["state"], daemon.wait(second)["state"]] == ["succeeded", "succeeded"]
    assert "extra" not in queue_names(daemon)  # drained, and gone
    assert daemon.submit(task="held", key="task-1")["id"] == first
    assert daemon.submit(**adhoc)["id"] == second
    assert remote_error(daemon, "job.submit", {**adhoc, "key": "adhoc-2"}).code == "UNKNOWN_QUEUE"


def test_running_job_keeps_its_command_and_timeout(jobd: Callable[..., Daemon], gates: Callable[[str], Gate]) -> None:
    task = """
    [queue.default]
    concurrency = 2

    [queue.parked]
    paused = true

    [task.step]
    command = ["/bin/sh", "-c", 'flock "$0" true && echo {version}']
    timeout = {timeout}
    """
    daemon = jobd(task.format(version="v1", timeout=60))
    gate1, gate2 = gates("one"), gates("two")
    one = daemon.submit(task="step", args=[str(gate1.path)])
    # Started right after its reply (the queue has room), before jobd reads another request: running at the reload.
    assert daemon.call("job.get", {"id": one["id"]})["state"] == "running"

    daemon.write_config(task.format(version="v2", timeout=0.3))
    assert daemon.call("daemon.reload")["ok"] is True
    # New jobs get the new definition ...
    parked = daemon.submit(task="step", args=[str(gate2.path)], queue="parked")
    assert parked["command"][2].endswith("echo v2") and parked["timeout"] == 0.3, parked
    daemon.call("job.cancel", {"id": parked["id"]})
    # ... and one of them, blocked on its gate, is timed out by the daemon: time enough for the new 0.3 s limit
    # to have ended job one too, had the reload touched it.
    two = daemon.submit(task="step", args=[str(gate2.path)], timeout=1.5)
    assert daemon.wait(two["id"])["state"] == "timed_out"

    job = daemon.call("job.get", {"id": one["id"]})
    assert (job["state"], job["attempts"], job["timeout"]) == ("running", 1, 60.0), job
    assert job["command"] == one["command"] and job["command"][2].endswith("echo v1")
    gate1.release()
    job = daemon.wait(one["id"])
    assert job["state"] == "succeeded", job
    assert daemon.output(one["id"]) == "v1\n"


def test_paused_queue_from_config_and_api_pause_across_restart(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(
        """
        [queue.held]
        paused = true

        [queue.open]
        concurrency = 1
        """
    )
    held = queue(daemon, "held")
    assert held["paused"] is True
    first = daemon.submit(command=["/bin/echo", "first"], queue="held")
    assert first["state"] == "queued"  # the queue would have started it before replying
    held = queue(daemon, "held")
    assert (held["running"], held["queued"]) == (0, 1), held

    assert daemon.call("queue.resume", {"name": "held"})["paused"] is False
    assert daemon.wait(first["id"])["state"] == "succeeded"

    assert daemon.call("queue.pause", {"name": "open"})["paused"] is True
    waiting = daemon.submit(command=["/bin/echo", "waiting"], queue="open")
    assert waiting["state"] == "queued"

    assert terminate(daemon) == 0
    start(daemon)
    # The API's word survives the restart in both directions: `open` stays paused, `held` stays resumed.
    assert queue(daemon, "open")["paused"] is True
    assert daemon.call("job.get", {"id": waiting["id"]})["state"] == "queued"
    assert queue(daemon, "held")["paused"] is False
    again = daemon.submit(command=["/bin/echo", "again"], queue="held")
    assert daemon.wait(again["id"])["state"] == "succeeded"

    daemon.call("queue.resume", {"name": "open"})
    assert daemon.wait(waiting["id"])["state"] == "succeeded"
    assert daemon.output(waiting["id"]) == "waiting\n"


def test_status_line_shows_queue_counts_as_they_change(jobd: Callable[..., Daemon]) -> None:
    """systemd's STATUS= carries the running/queued/delayed counts and follows every change (rate-limited)."""
    daemon = jobd("[queue.default]\npaused = true\n")

    def status_with(text: str) -> str:
        return pump_of(daemon).wait_for(lambda line: line.startswith("STATUS=") and text in line)

    ids = [daemon.submit(command=["/bin/true"])["id"] for _ in range(3)]
    assert status_with("3 queued") == "STATUS=0 running, 3 queued, 0 delayed (default paused, 0/1 running, 3 queued)"
    delayed = daemon.submit(command=["/bin/true"], delay=3600)["id"]
    assert status_with("1 delayed") == "STATUS=0 running, 3 queued, 1 delayed (default paused, 0/1 running, 3 queued)"
    for job_id in [*ids, delayed]:
        daemon.call("job.cancel", {"id": job_id})
    assert status_with("0 queued, 0 delayed") == "STATUS=0 running, 0 queued, 0 delayed"


def test_a_forgotten_pause_is_named_where_the_operator_looks(jobd: Callable[..., Daemon]) -> None:
    """`systemctl status jobd` and the journal tell why queued jobs do not start when their queue is paused (by
    `jobctl pause` days ago, say): the word, not only "0/2 running, 2 queued", which reads as jobd being stuck."""
    daemon = jobd("[queue.photo]\nconcurrency = 2\n")
    pump = pump_of(daemon)
    daemon.call("queue.pause", {"name": "photo"})
    ids = [daemon.submit(command=["/bin/true"], queue="photo")["id"] for _ in range(2)]
    status = pump.wait_for(lambda line: line.startswith("STATUS=") and "2 queued" in line)
    assert status == "STATUS=0 running, 2 queued, 0 delayed (photo paused, 0/2 running, 2 queued)"
    wait_for_log(
        daemon,
        f"job={ids[0]} queued in queue photo, which is paused: it starts once the queue is resumed "
        "(jobctl resume photo)",
    )
    daemon.call("queue.resume", {"name": "photo"})
    assert [daemon.wait(job_id)["state"] for job_id in ids] == ["succeeded", "succeeded"]
    assert pump.wait_for(lambda line: line.startswith("STATUS=") and "paused" not in line and "0 queued" in line)
    # A queue that is not paused says nothing of a pause when its jobs are queued.
    other = daemon.submit(command=["/bin/true"], queue="photo")["id"]
    wait_for_log(daemon, f"job={other} queued in queue photo\n")
    assert daemon.wait(other)["state"] == "succeeded"


def test_a_paused_key_changed_while_jobd_was_stopped_overrides_the_api(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd("[queue.held]\npaused = true\n")
    assert daemon.call("queue.pause", {"name": "held"})["paused"] is True  # the API's word, under paused = true
    waiting = daemon.submit(command=["/bin/echo", "let out"], queue="held")
    assert terminate(daemon) == 0
    daemon.write_config("[queue.held]\npaused = false\n")  # the administrator's newer word
    start(daemon)
    assert queue(daemon, "held")["paused"] is False
    assert daemon.wait(waiting["id"])["state"] == "succeeded"
    # An unchanged file leaves an API pause alone across a restart.
    assert daemon.call("queue.pause", {"name": "held"})["paused"] is True
    assert terminate(daemon) == 0
    start(daemon)
    assert queue(daemon, "held")["paused"] is True


def test_a_removed_queue_paused_through_the_api_still_drains(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd(TASKS + "\n[queue.extra]\nconcurrency = 1\n")
    daemon.call("queue.pause", {"name": "extra"})
    job = daemon.submit(command=["/bin/echo", "left"], queue="extra")["id"]
    daemon.write_config(TASKS)
    assert daemon.call("daemon.reload")["ok"] is True
    assert daemon.wait(job)["state"] == "succeeded"
    assert "extra" not in queue_names(daemon)


def test_a_draining_queue_cannot_be_paused(jobd: Callable[..., Daemon], gates: Callable[[str], Gate]) -> None:
    """queue.pause of a queue removed from the configuration is refused (QUEUE_CLOSED). It used to be accepted and
    stopped the drain, until any later reload, even of an unrelated file, or a restart silently resumed it."""
    daemon = jobd(TASKS + "\n[queue.extra]\nconcurrency = 1\n")
    gate = gates("first")
    first = daemon.submit(command=gated(gate, "/bin/echo", "first"), queue="extra")["id"]
    second = daemon.submit(command=["/bin/echo", "second"], queue="extra")["id"]
    daemon.write_config(TASKS)
    assert daemon.call("daemon.reload")["ok"] is True

    error = remote_error(daemon, "queue.pause", {"name": "extra"})
    assert error.code == "QUEUE_CLOSED", error
    assert "removed from the configuration" in error.message and "cannot be paused" in error.message, error.message
    extra = queue(daemon, "extra")
    assert (extra["closed"], extra["paused"]) == (True, False), extra
    assert daemon.call("queue.resume", {"name": "extra"})["paused"] is False  # nothing to resume: answered as it is

    gate.release()
    assert [daemon.wait(first)["state"], daemon.wait(second)["state"]] == ["succeeded", "succeeded"]
    assert "extra" not in queue_names(daemon)


def test_an_api_pause_of_a_queue_removed_while_jobd_was_down_is_dropped_with_it(jobd: Callable[..., Daemon]) -> None:
    """A pause set through queue.pause is dropped with the queue (docs/config.md, "Reloading"). Removed while jobd
    was stopped, the queue drained at the start, but its pause stayed on record: added back months later, the
    queue came back paused, by a word older than its removal."""
    extra = TASKS + "\n[queue.extra]\nconcurrency = 1\n"
    daemon = jobd(extra)
    assert daemon.call("queue.pause", {"name": "extra"})["paused"] is True
    left = daemon.submit(command=["/bin/echo", "left"], queue="extra")["id"]
    assert terminate(daemon) == 0
    daemon.write_config(TASKS)
    start(daemon)
    assert daemon.wait(left)["state"] == "succeeded"  # drained, the pause dropped
    assert "extra" not in queue_names(daemon)

    daemon.write_config(extra)
    assert daemon.call("daemon.reload")["ok"] is True
    assert queue(daemon, "extra")["paused"] is False
    again = daemon.submit(command=["/bin/echo", "again"], queue="extra")["id"]
    assert daemon.wait(again)["state"] == "succeeded"
    assert terminate(daemon) == 0  # and no record of it brings the pause back at a start
    start(daemon)
    assert queue(daemon, "extra")["paused"] is False


def test_a_start_that_finds_a_queue_removed_tells_that_it_drains_its_jobs(jobd: Callable[..., Daemon]) -> None:
    """A reload that removes a queue with jobs logs that it drains them; a start that finds it removed while jobd
    was stopped said nothing, and the jobs of a queue no file defines ran, one at a time."""
    daemon = jobd(TASKS + "\n[queue.extra]\nconcurrency = 3\npaused = true\n")
    waiting = [daemon.submit(command=["/bin/echo", str(i)], queue="extra")["id"] for i in range(2)]
    assert terminate(daemon) == 0
    daemon.write_config(TASKS)
    start(daemon)
    told = (
        "queue extra is not in the configuration (removed while jobd was stopped): draining 2 jobs, one at a time "
        "(define it again to drain it faster)"
    )
    assert told in daemon.log()
    assert [daemon.wait(job)["state"] for job in waiting] == ["succeeded", "succeeded"]


def test_a_queue_removed_while_jobd_was_down_whose_jobs_all_ended_at_the_start_disappears(
    jobd: Callable[..., Daemon],
) -> None:
    """Its only job was running at a kill -9 and is found lost at the start, not to be retried: the queue has
    drained. It stayed listed (closed, idle) and refused submits with QUEUE_CLOSED until some reload."""
    daemon = jobd(TASKS + "\n[queue.extra]\nconcurrency = 1\n")
    job = daemon.submit(command=["/bin/sleep", "600"], queue="extra")["id"]
    assert daemon.call("job.get", {"id": job})["state"] == "running"
    kill9(daemon)
    daemon.write_config(TASKS)
    start(daemon)
    assert daemon.call("job.get", {"id": job})["state"] == "failed"
    assert "extra" not in queue_names(daemon)
    assert remote_error(daemon, "job.submit", {"command": ["/bin/true"], "queue": "extra"}).code == "UNKNOWN_QUEUE"


# --- what a reload does to executing workflow instances ----------------------------------------------------


def gated_workflow(gate: Gate, *later_tasks: str) -> str:
    """A workflow whose first task waits for `gate`; `later_tasks` (<task> elements) run after it."""
    return f"""<workflow><subjobs><job name="one">
      <tasks><task name="wait" path="/bin/sh -c 'exec flock &quot;$0&quot; true' {gate.path}" queue="default"/></tasks>
      <subjobs><job name="two"><tasks>{"".join(later_tasks)}</tasks></job></subjobs>
    </job></subjobs></workflow>"""


def tasks_by_name(daemon: Daemon, instance_id: int) -> dict[str, dict[str, Any]]:
    tree = daemon.call("instance.get", {"id": instance_id})

    def walk(jobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for job in jobs:
            yield from job["tasks"]
            yield from walk(job["subjobs"])

    return {task["name"]: task for task in walk(tree["jobs"])}


def test_an_instance_enqueues_its_later_tasks_with_the_task_definition_of_that_time(
    jobd: Callable[..., Daemon], gates: Callable[[str], Gate]
) -> None:
    """A TOML task's job takes its whole definition when the task is enqueued (config.md, "Reloading"), as after a
    restart. Its command, timeout and retry were those at the instance's launch, while its user, kill_grace and
    max_output were the running configuration's: two definitions mixed in one job."""
    task = '[task.second]\ncommand = ["/bin/echo", "{word}"]\ntimeout = {timeout}\n'
    daemon = jobd(task.format(word="old", timeout=60))
    gate = gates("first")
    daemon.write_workflows(flow=gated_workflow(gate, '<task task="second" name="second"/>'))
    assert daemon.call("daemon.reload")["ok"] is True
    instance = daemon.call("instance.launch", {"workflow": "flow"})["id"]

    daemon.write_config(task.format(word="new", timeout=90))
    assert daemon.call("daemon.reload")["ok"] is True
    gate.release()
    done = daemon.call("instance.wait", {"id": instance, "timeout": 30})
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), tasks_by_name(daemon, instance)
    jobs = daemon.call("job.list", {"context": f"instance:{instance}"})["jobs"]
    [job] = [job for job in jobs if job["task"] == "second"]
    assert (job["command"], job["timeout"]) == (["/bin/echo", "new"], 90), job
    assert daemon.output(job["id"]) == "new\n"


def test_a_reload_that_removes_what_an_instance_still_needs_is_logged_and_those_tasks_are_aborted(
    jobd: Callable[..., Daemon], gates: Callable[[str], Gate]
) -> None:
    """The workflow file, with a TOML task and a queue only it used, are removed together while an instance runs.
    Its later tasks are ABORTED with evQueue's reasons, as after a restart, and the reload says so in the log. The
    TOML task used to run all the same, with its launch-time command but as jobd's default user, with the default
    kill_grace and max_output (those were looked up in the new configuration, which no longer had the task); the
    task on the removed queue failed with "jobd could not submit the task"."""
    before = '[queue.wq]\n\n[task.second]\ncommand = ["/bin/echo", "second"]\n'
    daemon = jobd(before)
    gate = gates("first")
    later = ('<task task="second" name="second"/>', '<task name="third" path="/bin/echo third" queue="wq"/>')
    daemon.write_workflows(doomed=gated_workflow(gate, *later))
    assert daemon.call("daemon.reload")["ok"] is True
    instance = daemon.call("instance.launch", {"workflow": "doomed"})["id"]

    (daemon.config_dir / "workflows" / "doomed.xml").unlink()
    daemon.write_config("")
    assert daemon.call("daemon.reload")["ok"] is True
    gate.release()
    done = daemon.call("instance.wait", {"id": instance, "timeout": 30})
    assert (done["status"], done["errors"]) == ("TERMINATED", 2), done
    tasks = tasks_by_name(daemon, instance)
    assert (tasks["second"]["status"], tasks["second"]["error"]) == ("ABORTED", "Unknown task name 'second'"), tasks
    assert (tasks["third"]["status"], tasks["third"]["error"]) == ("ABORTED", "Unknown queue name"), tasks
    jobs = daemon.call("job.list", {"context": f"instance:{instance}"})["jobs"]
    assert [job["command"][0] for job in jobs] == ["/bin/sh"], jobs  # the first task's only: nothing else ran
    wait_for_log(
        daemon,
        f"instance={instance} of workflow doomed: its tasks still to run name queue 'wq', task 'second', which the "
        "configuration no longer defines after this reload: they will be ABORTED when their turn comes",
    )


def test_a_start_that_finds_removed_what_an_instance_still_needs_logs_it_as_a_reload_does(
    jobd: Callable[..., Daemon], gates: Callable[[str], Gate]
) -> None:
    """The same removal made while jobd was stopped: the instance resumes, the task is ABORTED when its turn comes
    (as it always was after a restart), and the start now warns of it as a reload does."""
    daemon = jobd('[queue.wq]\n\n[task.second]\ncommand = ["/bin/echo", "second"]\nqueue = "wq"\n')
    gate = gates("first")
    daemon.write_workflows(doomed=gated_workflow(gate, '<task task="second" name="second"/>'))
    assert daemon.call("daemon.reload")["ok"] is True
    instance = daemon.call("instance.launch", {"workflow": "doomed"})["id"]
    assert terminate(daemon) == 0
    (daemon.config_dir / "workflows" / "doomed.xml").unlink()
    daemon.write_config("")
    start(daemon)
    wait_for_log(
        daemon,
        f"instance={instance} of workflow doomed: its tasks still to run name task 'second', which the configuration "
        "no longer defines at this start: they will be ABORTED when their turn comes",
    )
    gate.release()
    done = daemon.call("instance.wait", {"id": instance, "timeout": 30})
    assert (done["status"], done["errors"]) == ("TERMINATED", 1), done
    second = tasks_by_name(daemon, instance)["second"]
    assert (second["status"], second["error"]) == ("ABORTED", "Unknown task name 'second'"), second


def test_a_drop_in_whose_name_is_not_utf8_is_shown_escaped(jobd: Callable[..., Daemon]) -> None:
    """A file name the OS gives as bytes that are not UTF-8 (a Latin-1 `café.toml`) reaches Python as lone
    surrogates, which JSON and SQLite refuse: daemon.status, a reload's error and the audit log show its bytes as
    \\xNN, and the connection goes on (it used to be closed mid-reply, its pipelined requests lost)."""
    daemon = jobd(TASKS)
    drop_ins = os.fsencode(daemon.config_dir / "jobd.d")
    os.makedirs(drop_ins, exist_ok=True)
    with open(drop_ins + b"/10-caf\xe9.toml", "w") as good:
        good.write("[queue.latin]\nconcurrency = 1\n")
    assert daemon.call("daemon.reload")["ok"] is True
    shown = str(daemon.config_dir / "jobd.d" / "10-caf\\xe9.toml")
    assert shown in daemon.call("daemon.status")["config_files"]

    with open(drop_ins + b"/20-na\xefve.toml", "w") as broken:
        broken.write("[queue.latin]\nconcurrency = 0\n")
    with daemon.client() as client:  # three requests in one write: all are answered
        replies = client.batch([("daemon.reload", None), ("daemon.status", None), ("ping", None)])
    assert isinstance(replies[0], RemoteError) and replies[0].code == "CONFIG_INVALID", replies[0]
    assert "20-na\\xefve.toml" in replies[0].message, replies[0].message
    assert shown in replies[1]["config_files"] and replies[2]["pong"] is True
    [entry] = daemon.call("audit.list", {"command": "daemon.reload", "limit": 1})["entries"]
    assert entry["result"] == "CONFIG_INVALID" and "20-na\\xefve.toml" in entry["message"], entry


def test_a_change_that_needs_a_restart_is_told_against_what_runs(jobd: Callable[..., Daemon]) -> None:
    """[tcp] listen is bound at start-up: a reload that changes it warns, every reload until the restart warns
    again, and putting the running value back warns no more (it compared with the last reload's values)."""
    daemon = jobd(TASKS)
    pump = pump_of(daemon)
    told = "[tcp] listen changed to 127.0.0.1:1; it takes effect at the next restart"

    def reloaded_by_the_watcher(config: str) -> None:
        pump.skip()
        daemon.write_config(config)
        pump.wait_for("RELOADING=1")
        pump.wait_for("READY=1")
        daemon.call("ping")  # answered after the reload's last log line, on the same loop

    reloaded_by_the_watcher(TASKS + '[tcp]\nlisten = "127.0.0.1:1"\n')
    assert daemon.log().count(told) == 1
    daemon.call("daemon.reload")
    assert daemon.log().count(told) == 2  # still not applied
    reloaded_by_the_watcher(TASKS)
    assert daemon.log().count(told) == 2 and "[tcp] listen changed" not in daemon.log().split(told)[-1]


def test_a_reload_keeps_the_sockets_and_state_directory_and_applies_the_rest(jobd: Callable[..., Daemon]) -> None:
    """An administrator who moves the sockets or the state directory in the files: the reload applies everything
    else and warns for each key it cannot apply (docs/config.md, Reloading), and jobd goes on where it started."""
    daemon = jobd(TASKS)
    moved = {key: daemon.root / "moved" / key for key in RESTART_ONLY_DAEMON_KEYS}
    (daemon.config_dir / "jobd.d" / "50-moved.toml").write_text(
        "[daemon]\n" + "".join(f'{key} = "{path}"\n' for key, path in moved.items()) + "[queue.added]\n"
    )
    assert daemon.call("daemon.reload")["ok"] is True
    assert "added" in queue_names(daemon)  # the rest applied
    for key in RESTART_ONLY_DAEMON_KEYS:
        assert f"[daemon] {key} changed; it takes effect at the next restart" in daemon.log()
    assert not (daemon.root / "moved").exists()
    assert daemon.socket_path.is_socket() and daemon.evqueue_socket.is_socket()
    job = daemon.wait(daemon.submit(task="echo", args=["still here"])["id"])
    assert daemon.output(job["id"]) == "still here\n"
    assert (daemon.state_dir / "output" / str(job["id"])).is_dir()


def test_a_config_dir_gone_at_a_reload_keeps_the_running_configuration(jobd: Callable[..., Daemon]) -> None:
    """jobd --config-dir DIR refuses to start when DIR is not there (a typo would run the defaults); a reload once
    DIR is gone (moved away, or between the two renames that swap it for a new one) read the defaults: every queue
    closed, every task, workflow and schedule forgotten. The inotify watcher did that on its own."""
    daemon = jobd("[queue.photo]\nconcurrency = 2\n" + TASKS)
    queues = queue_names(daemon)
    assert "photo" in queues, queues
    moved = daemon.config_dir.with_name("etc-moved")
    daemon.config_dir.rename(moved)
    try:
        error = remote_error(daemon, "daemon.reload")
        assert error.code == "CONFIG_INVALID", error
        assert error.message == (
            f"--config-dir {daemon.config_dir} is no longer a directory: the running configuration stays"
        ), error.message
        assert queue_names(daemon) == queues
        assert daemon.call("daemon.status")["last_reload"]["ok"] is False
    finally:
        moved.rename(daemon.config_dir)
    assert daemon.call("daemon.reload")["ok"]
    assert queue_names(daemon) == queues
    assert daemon.call("job.submit", {"task": "echo"})["state"] in ("queued", "running", "succeeded")
