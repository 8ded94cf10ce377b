"""jobd's units under a real systemd: ../shared/tools/sdns.sh boots one as PID 1 of private namespaces.

The units in systemd/ are installed unchanged, with one drop-in (a short WatchdogSec=, so a hang is found in
seconds). Inside the namespace, overlay mounts (seen by nothing outside it) put this checkout's jobd at
/usr/bin/jobd (and jobctl, the unit's ExecReload=, at /usr/bin/jobctl) and keep what the units create away from the
host: /etc (jobd.sysusers' group, /etc/jobd) and /var/lib (/var/lib/jobd). So jobd runs with its real default
paths: config in /etc/jobd, state in /var/lib/jobd, the API socket from jobd.socket at /run/jobd/jobd.sock.

Waiting is done on what systemd and jobd report: `journalctl -f` read line by line until the expected line comes,
systemctl's own blocking verbs, and jobd's job.wait. sd_down runs when the module's tests end however they end
(the bash process that ran sd_up runs sd_down when its stdin closes, so even a killed pytest leaves nothing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sdns_driver
from harness import REPO, SDNS

from jobd.client import Client

UNITS = REPO / "systemd"
JOBD = REPO / ".venv" / "bin" / "jobd"
JOBCTL = REPO / ".venv" / "bin" / "jobctl"
WATCHDOG_SEC = 3
TIMEOUT = 60.0  # hang guard for anything awaited; never a measurement

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not SDNS.exists() or not Path("/lib/systemd/systemd").exists() or not JOBD.exists(),
    reason=f"needs root, sdns.sh (not at {SDNS}; set SDNS_SH), Debian's systemd and the .venv's jobd",
)

CONFIG = """\
[daemon]
kill_grace = 1
# The test's jobs are /bin tools; they run as root so that nothing about users is in the way.
default_user = "root"

[queue.default]
concurrency = 1

[queue.held]
concurrency = 1
paused = true

[task.sleep]
command = ["/bin/sleep"]

[task.held]
command = ["/bin/true"]
queue = "held"

[task.stubborn]
# Ignores SIGTERM (so does its sleep, which inherits the ignored disposition): only the SIGKILL after kill_grace
# ends it.
command = ["/bin/sh", "-c", "trap '' TERM; /bin/sleep 300"]

[task.stubborn_long]
# The same with a kill_grace longer than the TimeoutStopSec= of test_a_long_kill_grace_extends_the_stop_timeout.
command = ["/bin/sh", "-c", "trap '' TERM; /bin/sleep 300"]
kill_grace = 4

[task.escapee]
# Leaves a process in a session of its own, out of reach of jobd's signals to the job's process group.
command = ["/bin/sh", "-c", "/usr/bin/setsid /bin/sleep 300 </dev/null >/dev/null 2>&1 & echo $!; wait"]
queue = "side"

[queue.side]
concurrency = 1

[task.ok]
command = ["/bin/true"]

[task.fail]
command = ["/bin/false"]
"""

# A drop-in outside every directory jobd watches, linked into jobd.d: a change to it reaches jobd only through a
# reload that is asked for (inotify sees the link, not its target).
EXTERNAL_DROP_IN = "/etc/jobd-test/50-external.toml"

DROP_IN = f"""\
[Service]
WatchdogSec={WATCHDOG_SEC}s
"""


class Sdns(sdns_driver.Sdns):
    """One throw-away systemd, driven through sdns.sh's functions in bash."""

    def __init__(self) -> None:
        super().__init__(TIMEOUT)

    def _sdns(self, function: str, args: tuple[str, ...], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        script = f'. "$0"; SD_NSPID={self.nspid}; SD_ROOT={self.root}; {function} "$@"'
        return subprocess.run(["bash", "-c", script, str(SDNS), *args], text=True, capture_output=True, **kwargs)

    def ns(self, *args: str, check: bool = True) -> str:
        done = self.run(*args)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done.stdout

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`args` run inside the namespace, whatever their exit; the caller checks it."""
        return self._sdns("sd_ns", args, timeout=TIMEOUT)

    def ctl(self, *args: str, check: bool = True) -> str:
        return self.ns("systemctl", *args, check=check)

    def install(self, *paths: Path) -> None:
        done = self._sdns("sd_install", tuple(map(str, paths)), timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr

    def show(self, prop: str, unit: str = "jobd.service") -> str:
        return self.ctl("show", "-p", prop, "--value", unit).strip()

    def cursor(self) -> str:
        out = self.ns("journalctl", "-q", "-n", "0", "--show-cursor")
        return out.strip().removeprefix("-- cursor: ")

    # Entries are read after a cursor with no journalctl match (FIELD=VALUE, -u, -p) and picked here: systemd 252's
    # journalctl --after-cursor with a match skips the first matching entry when the cursor's entry does not match.
    def follow(self, cursor: str, pattern: str, identifier: str | None = None) -> str:
        """Read the journal after `cursor` as it is written, until a message matches `pattern` (from the program
        `identifier` if given); return it."""
        follower = subprocess.Popen(
            self.enter("journalctl", "-f", "-q", "-o", "json", f"--after-cursor={cursor}"),
            stdout=subprocess.PIPE,
            text=True,
        )
        guard = threading.Timer(TIMEOUT, follower.kill)  # a hang guard: EOF below means the pattern never came
        guard.start()
        seen = []
        try:
            assert follower.stdout is not None
            for line in follower.stdout:
                entry = json.loads(line)
                message = str(entry.get("MESSAGE"))
                seen.append(message)
                if identifier in (None, entry.get("SYSLOG_IDENTIFIER")) and re.search(pattern, message):
                    return message
            raise AssertionError(f"no journal message matched {pattern!r}; seen:\n" + "\n".join(seen))
        finally:
            guard.cancel()
            follower.kill()
            follower.wait()

    def journal(self, cursor: str, unit: str | None = None, priority: int = 7) -> list[dict[str, Any]]:
        """The entries after `cursor`: of `unit` if given (its processes' and systemd's about it, as journalctl -u),
        at `priority` or more urgent (a lower number: 4 is warning)."""
        out = self.ns("journalctl", "-q", "-o", "json", f"--after-cursor={cursor}")
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [
            entry
            for entry in entries
            if unit in (None, entry.get("_SYSTEMD_UNIT"), entry.get("UNIT"))
            and int(entry.get("PRIORITY", 6)) <= priority
        ]


@pytest.fixture(scope="module")
def sd() -> Iterator[Sdns]:
    system = booted()
    try:
        yield system
    finally:
        system.down()


def booted() -> Sdns:
    """A throw-away systemd with jobd's units installed and its configuration in /etc/jobd (not started)."""
    system = Sdns()
    try:
        work = system.work / "overlay"
        (work / "bin").mkdir(parents=True)
        (work / "bin" / "jobd").symlink_to(JOBD)
        (work / "bin" / "jobctl").symlink_to(JOBCTL)
        for name in ("etc", "var"):
            (work / f"{name}.upper").mkdir()
            (work / f"{name}.work").mkdir()
        (work / "keep").mkdir()
        # sdns put a tmpfs on /etc/systemd/system: moved aside while /etc gets its overlay, then back on top.
        system.ns("sh", "-ec", f"""
            mount -t overlay overlay -o lowerdir={work}/bin:/usr/bin /usr/bin
            mount --move /etc/systemd/system {work}/keep
            mount -t overlay overlay -o lowerdir=/etc,upperdir={work}/etc.upper,workdir={work}/etc.work /etc
            mount --move {work}/keep /etc/systemd/system
            mount -t overlay overlay -o lowerdir=/var/lib,upperdir={work}/var.upper,workdir={work}/var.work /var/lib
        """)  # fmt: skip
        # What a package's maintainer scripts do with these two files.
        system.ns("systemd-sysusers", str(UNITS / "jobd.sysusers"))
        system.ns("systemd-tmpfiles", "--create", str(UNITS / "jobd.tmpfiles"))
        etc_jobd = system.root / "etc" / "jobd"
        (etc_jobd / "jobd.d").mkdir(parents=True)
        (etc_jobd / "jobd.toml").write_text(CONFIG)
        external = system.root / EXTERNAL_DROP_IN.lstrip("/")
        external.parent.mkdir()
        external.write_text("")
        (etc_jobd / "jobd.d" / "50-external.toml").symlink_to(EXTERNAL_DROP_IN)
        drop_in = system.root / "etc" / "systemd" / "system" / "jobd.service.d"
        drop_in.mkdir()
        (drop_in / "test.conf").write_text(DROP_IN)
        system.install(UNITS / "jobd.service", UNITS / "jobd.socket")
    except BaseException:
        system.down()
        raise
    return system


def client(sd: Sdns) -> Client:
    c = Client(str(sd.root / "run" / "jobd" / "jobd.sock"))
    c.connect()
    return c


def call(sd: Sdns, method: str, params: dict[str, Any] | None = None) -> Any:
    with client(sd) as c:
        return c.call(method, params, timeout=TIMEOUT)


def started(sd: Sdns) -> int:
    """Start jobd (and jobd.socket, which it requires); systemctl returns once READY=1 came. Its MainPID."""
    sd.ctl("start", "jobd.service")
    assert sd.ctl("is-active", "jobd.service", "jobd.socket").split() == ["active", "active"]
    return int(sd.show("MainPID"))


def status_text(sd: Sdns, wanted: str) -> str:
    """systemd's StatusText once it contains `wanted`. jobd sends STATUS= at most every 0.1 s after the counts
    change, and systemd offers no way to wait for a status change but D-Bus (not running in sdns): so it is read
    again, 0.1 s apart, a bounded number of times."""
    text = ""
    for _ in range(int(TIMEOUT / 0.1)):
        text = sd.show("StatusText")
        if wanted in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"StatusText never contained {wanted!r}: {text!r}")


def test_units_verify_clean(sd: Sdns, tmp_path: Path) -> None:
    """`systemd-analyze verify` prints nothing for either unit: /usr/bin/jobd exists in the namespace, and the man
    pages the units name are found (from man/ of this checkout)."""
    for page in (REPO / "man").glob("*.[1-8]"):
        section = tmp_path / f"man{page.suffix[1:]}"
        section.mkdir(exist_ok=True)
        shutil.copy(page, section)
    for unit in ("jobd.service", "jobd.socket"):
        done = subprocess.run(
            sd.enter("env", f"MANPATH={tmp_path}", "systemd-analyze", "verify", str(UNITS / unit)),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert (done.returncode, done.stdout + done.stderr) == (0, ""), unit
    assert sd.ns("getent", "group", "jobd").startswith("jobd:")
    assert sd.ns("stat", "-c", "%a %U %G", "/run/jobd", "/var/lib/jobd").split("\n")[:2] == [
        "755 root root",
        "750 root root",
    ]


def test_start_is_active_with_queue_counts(sd: Sdns) -> None:
    started(sd)
    assert status_text(sd, "running").startswith("0 running, 0 queued, 0 delayed")
    assert sd.ns("stat", "-c", "%a %G %F", "/run/jobd/jobd.sock").strip() == "660 jobd socket"
    running = call(sd, "job.submit", {"task": "sleep", "args": ["300"]})
    queued = call(sd, "job.submit", {"task": "ok"})
    assert status_text(sd, "1 running, 1 queued").startswith("1 running, 1 queued, 0 delayed (default 1/1 running")
    call(sd, "job.cancel", {"id": running["id"]})
    assert call(sd, "job.wait", {"id": queued["id"], "timeout": TIMEOUT})["state"] == "succeeded"


def test_socket_activation(sd: Sdns) -> None:
    """Service stopped, socket still listening: the first client starts jobd, which answers on that socket."""
    first = started(sd)
    sd.ctl("stop", "jobd.service")
    assert sd.ctl("is-active", "jobd.service", check=False).strip() == "inactive"
    assert sd.ctl("is-active", "jobd.socket").strip() == "active"
    cursor = sd.cursor()
    with client(sd) as c:  # queued in the kernel until jobd takes the socket over
        assert c.call("ping", timeout=TIMEOUT)["pong"] is True
        pid = c.call("daemon.status", timeout=TIMEOUT)["pid"]
    assert sd.ctl("is-active", "jobd.service").strip() == "active"
    assert pid != first
    sd.follow(cursor, r"socket activation: serving on api \(/run/jobd/jobd\.sock\) passed by systemd")
    # jobd bound the evQueue socket itself, not passed by systemd; the API socket stays systemd's on stop.
    assert sd.ns("stat", "-c", "%F", "/run/jobd/evqueue.sock").strip() == "socket"
    sd.ctl("stop", "jobd.service")
    assert sd.ns("stat", "-c", "%F", "/run/jobd/jobd.sock").strip() == "socket"
    assert sd.ns("sh", "-c", "test -e /run/jobd/evqueue.sock || echo gone").strip() == "gone"
    assert call(sd, "ping")["pong"] is True  # and activates jobd again


def test_the_restore_procedures_stop_keeps_jobd_stopped(sd: Sdns) -> None:
    """`systemctl stop jobd` alone leaves jobd.socket listening, and the next client starts jobd again (above). The
    command README.Debian gives to stop jobd before restoring a backup must keep it stopped: no client may start jobd
    on the database being replaced until `systemctl start jobd`, which starts both units again."""
    found = re.search(r"To restore a copy: `([^`]+)`", (REPO / "debian" / "README.Debian").read_text())
    assert found, "README.Debian no longer says how to restore a copy"
    command = found.group(1).split()
    assert command[:2] == ["systemctl", "stop"], command
    started(sd)
    sd.ns(*command)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as refused, pytest.raises(ConnectionRefusedError):
        refused.connect(str(sd.root / "run" / "jobd" / "jobd.sock"))
    assert sd.ctl("is-active", "jobd.service", "jobd.socket", check=False).split() == ["inactive", "inactive"]
    started(sd)  # both active again
    assert call(sd, "ping")["pong"] is True


def test_reload_applies_a_change(sd: Sdns) -> None:
    started(sd)
    assert "reloaded" not in [q["name"] for q in call(sd, "queue.list")["queues"]]
    (sd.root / EXTERNAL_DROP_IN.lstrip("/")).write_text("[queue.reloaded]\nconcurrency = 3\n")
    cursor = sd.cursor()
    sd.ctl("reload", "jobd.service")
    sd.follow(cursor, r"configuration reloaded from \d+ files")
    queues = {q["name"]: q for q in call(sd, "queue.list")["queues"]}
    assert queues["reloaded"]["concurrency"] == 3
    assert call(sd, "daemon.status")["last_reload"]["ok"] is True


def test_a_broken_configuration_fails_systemctl_reload(sd: Sdns) -> None:
    """`systemctl reload jobd` waits for the reload and fails when it fails, naming the problem in the journal;
    jobd runs on, unchanged, with its configuration, and the next good reload succeeds. (ExecReload= sending
    SIGHUP reported every reload as done, broken or not.)"""
    pid = started(sd)
    external = sd.root / EXTERNAL_DROP_IN.lstrip("/")
    external.write_text("[queue.broken]\nconcurrency = 0\n")  # read only at a reload that is asked for
    try:
        cursor = sd.cursor()
        done = sd.run("systemctl", "reload", "jobd.service")
        assert done.returncode != 0, done.stdout + done.stderr
        assert "jobd.service failed" in done.stderr, done.stderr
        # jobd's own line reaches the journal by its stream, maybe after systemctl returned: followed, not read.
        failed = sd.follow(cursor, r"^reload failed, keeping the running configuration: .*concurrency")
        assert failed in [entry["MESSAGE"] for entry in sd.journal(cursor, "jobd.service", priority=3)]
        assert (sd.show("ActiveState"), int(sd.show("MainPID"))) == ("active", pid)
        assert call(sd, "daemon.status")["last_reload"]["ok"] is False
        assert "queue.broken.concurrency" in status_text(sd, "; reload failed: ")  # what `systemctl status` shows
        assert "broken" not in [q["name"] for q in call(sd, "queue.list")["queues"]]
    finally:
        external.write_text("")
    sd.ctl("reload", "jobd.service")  # fails the test (check) unless it succeeds
    assert call(sd, "daemon.status")["last_reload"]["ok"] is True


def test_hung_event_loop_trips_the_watchdog(sd: Sdns) -> None:
    """SIGSTOP freezes jobd for real: no WATCHDOG=1 comes, systemd kills it and Restart=on-failure starts a new one,
    which has every job submitted before."""
    pid = started(sd)
    restarts = int(sd.show("NRestarts"))
    held = [call(sd, "job.submit", {"task": "held"})["id"] for _ in range(3)]
    cursor = sd.cursor()
    running = call(sd, "job.submit", {"task": "sleep", "args": ["300"]})["id"]
    # Frozen only once its attempt is recorded (jobd commits it before the spawn, then logs this line): frozen
    # before, on a loaded machine, the job was still queued, and the new jobd ran its first attempt.
    sd.follow(cursor, rf"job={running} running \(attempt 1, pid \d+\)")
    sd.ns("kill", "-STOP", str(pid))
    sd.follow(cursor, r"jobd\.service: Watchdog timeout")
    sd.follow(cursor, r"jobd \S+ ready: socket /run/jobd/jobd\.sock")
    assert int(sd.show("NRestarts")) == restarts + 1
    new_pid = int(sd.show("MainPID"))
    assert new_pid != pid
    # Python's faulthandler wrote where the loop was when SIGABRT came.
    sd.follow(cursor, r"Fatal Python error: Aborted")
    for job_id in held:
        assert call(sd, "job.get", {"id": job_id})["state"] == "queued"
    lost = call(sd, "job.get", {"id": running})
    assert lost["tries"][0]["outcome"] == "lost"
    call(sd, "queue.resume", {"name": "held"})
    for job_id in held:
        assert call(sd, "job.wait", {"id": job_id, "timeout": TIMEOUT})["state"] == "succeeded"


def test_a_crash_of_jobd_leaves_none_of_its_processes_running(sd: Sdns) -> None:
    """kill -9 of jobd: before Restart=on-failure starts it again, systemd SIGKILLs what is left in its cgroup
    (KillMode=mixed). So nothing runs on unsupervised beside the jobs started again, also what recovery cannot
    find: a process that left its job's process group, or a job whose pid jobd had not yet recorded (docs/jobs.md)."""
    pid = started(sd)
    restarts = int(sd.show("NRestarts"))
    cursor = sd.cursor()
    escapee_job = call(sd, "job.submit", {"task": "escapee"})["id"]
    escapee = call(sd, "job.output", {"id": escapee_job, "wait": True})["data"].strip()
    assert sd.ns("sh", "-c", f"kill -0 {escapee} && echo alive").strip() == "alive"
    sd.ns("kill", "-KILL", str(pid))
    sd.follow(cursor, r"jobd \S+ ready: socket /run/jobd/jobd\.sock")
    assert int(sd.show("NRestarts")) == restarts + 1
    assert sd.ns("sh", "-c", f"kill -0 {escapee} 2>/dev/null || echo gone").strip() == "gone"
    found = call(sd, "job.get", {"id": escapee_job})
    assert (found["state"], found["tries"][0]["outcome"]) == ("failed", "lost")  # no retry policy: it ends there
    sd.ctl("reset-failed", "jobd.service")  # this restart, off the start limit's count for the module's next tests


def test_stop_with_running_jobs(sd: Sdns) -> None:
    """As jobd.service's comment says: SIGTERM to jobd alone, which SIGTERMs each job's process group, SIGKILLs it
    after kill_grace, puts the jobs back in their queue and exits; they run again at the next start. Then systemd
    SIGKILLs what is left in the cgroup (KillMode=mixed): a job's process that escaped its process group."""
    started(sd)
    cursor = sd.cursor()
    job = call(sd, "job.submit", {"task": "stubborn"})["id"]
    escapee_job = call(sd, "job.submit", {"task": "escapee"})["id"]
    sd.follow(cursor, rf"job={job} running")
    sd.follow(cursor, rf"job={escapee_job} running")
    # job.output with wait: the reply comes once the job has printed the pid.
    escapee = call(sd, "job.output", {"id": escapee_job, "wait": True})["data"].strip()
    assert sd.ns("sh", "-c", f"kill -0 {escapee} && echo alive").strip() == "alive"
    sd.ctl("stop", "jobd.service")
    assert sd.ns("sh", "-c", f"kill -0 {escapee} 2>/dev/null || echo gone").strip() == "gone"
    assert sd.show("Result") == "success"
    assert sd.ctl("is-active", "jobd.service", check=False).strip() == "inactive"
    messages = [entry["MESSAGE"] for entry in sd.journal(cursor, "jobd.service")]
    assert f"job={job} stopping for shutdown" in messages
    assert "stopped" in messages
    started(sd)
    found = call(sd, "job.get", {"id": job})
    assert found["tries"][0]["outcome"] == "killed"
    assert found["tries"][0]["signal"] == signal.SIGKILL  # it ignored SIGTERM: killed after its kill_grace
    assert found["state"] in ("queued", "running")
    call(sd, "job.cancel", {"id": job})
    call(sd, "job.cancel", {"id": escapee_job})


def test_a_long_kill_grace_extends_the_stop_timeout(sd: Sdns) -> None:
    """A job whose kill_grace outlasts TimeoutStopSec= still gets it: jobd asks systemd for the time
    (EXTEND_TIMEOUT_USEC), SIGKILLs the job itself and records it, rather than being SIGKILLed with it by systemd
    and finding the attempt lost at the next start."""
    short_stop = sd.root / "etc" / "systemd" / "system" / "jobd.service.d" / "short-stop.conf"
    short_stop.write_text("[Service]\nTimeoutStopSec=2s\n")
    sd.ctl("daemon-reload")
    try:
        started(sd)
        cursor = sd.cursor()
        job = call(sd, "job.submit", {"task": "stubborn_long"})["id"]
        sd.follow(cursor, rf"job={job} running")
        sd.ctl("stop", "jobd.service")  # returns once jobd has exited: after the job's 4 s of grace
        assert sd.show("Result") == "success"
        messages = [entry["MESSAGE"] for entry in sd.journal(cursor, "jobd.service")]
        assert "stopped" in messages
        assert not any("timed out" in message for message in messages), messages
    finally:
        short_stop.unlink()
        sd.ctl("daemon-reload")
    started(sd)
    found = call(sd, "job.get", {"id": job})
    assert found["tries"][0]["outcome"] == "killed"
    assert found["tries"][0]["signal"] == signal.SIGKILL
    call(sd, "job.cancel", {"id": job})


def test_journal_priorities(sd: Sdns) -> None:
    started(sd)
    cursor = sd.cursor()
    good = call(sd, "job.submit", {"task": "ok"})["id"]
    bad = call(sd, "job.submit", {"task": "fail"})["id"]
    call(sd, "job.wait", {"id": bad, "timeout": TIMEOUT})
    sd.follow(cursor, rf"job={bad} failed")
    # A cancel of a running job was asked for: info, as the cancel of a queued one.
    cancelled = call(sd, "job.submit", {"task": "sleep", "args": ["300"]})["id"]
    sd.follow(cursor, rf"job={cancelled} running")
    assert call(sd, "job.cancel", {"id": cancelled})["state"] == "cancelled"
    sd.follow(cursor, rf"job={cancelled} cancelled")
    warnings = [entry["MESSAGE"] for entry in sd.journal(cursor, "jobd.service", priority=4)]
    assert f"job={bad} failed (attempt 1 failed, exit code 1): task fail" in warnings, warnings
    assert not any(message.startswith((f"job={good} ", f"job={cancelled} ")) for message in warnings), warnings
    info = {entry["MESSAGE"]: entry["PRIORITY"] for entry in sd.journal(cursor, "jobd.service")}
    assert info[f"job={good} queued in queue default"] == "6"
    assert any(message.startswith(f"job={good} succeeded") and prio == "6" for message, prio in info.items())
    assert any(message.startswith(f"job={bad} failed") and prio == "4" for message, prio in info.items())
    assert info[f"job={cancelled} cancelled (attempt 1 killed, signal 15)"] == "6"


def test_every_line_of_a_multi_line_error_has_its_priority(sd: Sdns) -> None:
    # journald files each line of a stream as an entry of its own: a reload's second problem must be an error too.
    started(sd)
    workflows = sd.root / "etc" / "jobd" / "workflows"
    workflows.mkdir(exist_ok=True)
    try:
        # inotify starts a reload of its own as the files are written, before or after systemctl's: the message
        # comes once or twice, and each time every line of it must be an error.
        cursor = sd.cursor()
        (workflows / "broken-one.xml").write_text("<workflow>")
        (workflows / "broken-two.xml").write_text("<workflow>")
        sd.ctl("reload", "jobd.service", check=False)  # fails: jobctl reload, the ExecReload=, tells it too
        # The message's second line, from jobd and from jobctl: two streams, which journald reads in any order.
        for teller in ("jobd", "jobctl"):
            sd.follow(cursor, r"broken-two\.xml", teller)
        priorities = {
            name: {entry["PRIORITY"] for entry in sd.journal(cursor, "jobd.service") if name in entry["MESSAGE"]}
            for name in ("broken-one.xml", "broken-two.xml")
        }
        assert priorities == {"broken-one.xml": {"3"}, "broken-two.xml": {"3"}}, priorities
    finally:
        shutil.rmtree(workflows)
        sd.ctl("reload", "jobd.service")


def test_a_broken_configuration_is_not_restarted_into_the_start_limit(sd: Sdns) -> None:
    # Exit 78 (EX_CONFIG): starting again cannot mend it, and hitting the start limit would fail jobd.socket too.
    restarts = stopped_afresh(sd)
    broken = sd.root / "etc" / "jobd" / "jobd.d" / "70-broken.toml"
    broken.write_text("[daemon]\nbogus_key = 1\n")
    try:
        assert_start_fails_for_good(sd, 78, restarts)
    finally:
        broken.unlink()
    sd.ctl("reset-failed", "jobd.service")
    started(sd)


def test_a_bad_option_on_the_command_line_is_not_restarted_into_the_start_limit(sd: Sdns) -> None:
    """A typo in a drop-in's ExecStart= (`--log-level warn`; docs/systemd.md, Logging, suggests such a drop-in) is
    a usage error, exit 2, which starting again cannot mend either: the unit restarted it into the start limit."""
    restarts = stopped_afresh(sd)
    drop_in = sd.root / "etc" / "systemd" / "system" / "jobd.service.d" / "70-bad-option.conf"
    drop_in.write_text("[Service]\nExecStart=\nExecStart=/usr/bin/jobd --log-level warn\n")
    try:
        sd.ctl("daemon-reload")
        cursor = sd.cursor()
        assert_start_fails_for_good(sd, 2, restarts)
        # Why, at priority err, every line of it (argparse's usage and error): `journalctl -u jobd -p err` shows it.
        sd.follow(cursor, r"^jobd: error: argument --log-level: invalid choice: 'warn'")
        told = {
            entry["MESSAGE"]: entry["PRIORITY"]
            for entry in sd.journal(cursor, "jobd.service")
            if entry.get("SYSLOG_IDENTIFIER") == "jobd"
        }
        assert any(message.startswith("usage: jobd ") for message in told), told
        assert set(told.values()) == {"3"}, told
    finally:
        drop_in.unlink()
        sd.ctl("daemon-reload")
    sd.ctl("reset-failed", "jobd.service")
    started(sd)


def test_the_oom_killer_ending_a_job_leaves_jobd_running(sd: Sdns) -> None:
    """systemd's default OOMPolicy=stop stops the whole service when the kernel's OOM killer ends any process of it:
    one job out of memory would stop jobd and every other job. The policy is read as systemd loaded the unit: the
    cgroup2 hierarchy of the test machines has no memory controller, so no OOM kill is seen there (systemd learns of
    them from memory.events), and a real one cannot be made to happen under sdns."""
    assert sd.show("OOMPolicy") == "continue"


def test_jobd_starts_once_the_clock_is_set_and_synchronized_as_calendar_timers_do(sd: Sdns) -> None:
    """Schedules fire at wall-clock times and keep_days expires history by the wall clock: started on a clock far
    ahead (a wrong RTC, which NTP corrects a moment later), jobd expired finished jobs for good and fired schedules
    at its times. systemd orders a timer with OnCalendar= after time-set.target and time-sync.target; jobd.service
    had neither. Read as systemd loaded the unit (a clock not yet synchronized cannot be staged here: it is the
    machine's)."""
    after = sd.show("After").split()
    assert "time-set.target" in after and "time-sync.target" in after, after


def test_a_shutdown_stops_jobd_before_remote_file_systems_and_user_lookups(tmp_path: Path) -> None:
    """Jobs run as users looked up by name (LDAP, sssd) in their homes (NFS): at shutdown jobd and its jobs must
    stop before remote file systems are unmounted and user lookups go, and start after them, as cron does. A
    systemd of its own is powered off: stand-ins for an NFS mount and for sssd, each ordered before its target as
    those are, note whether jobd was still there when they were stopped."""
    system = booted()
    try:
        for target in STAND_INS:
            (system.root / "etc" / "systemd" / "system" / STAND_INS[target]).write_text(
                f"[Unit]\nWants={target}\nBefore={target}\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
                f"ExecStart=/bin/true\nExecStop=/bin/sh -c 'systemctl is-active jobd.service >{tmp_path / target}'\n"
            )
        system.ctl("daemon-reload")
        system.ctl("start", *STAND_INS.values())
        started(system)
    finally:
        system.down()  # powers off: every unit is stopped, in the order the units say
    assert {target: (tmp_path / target).read_text().strip() for target in STAND_INS} == {
        target: "inactive" for target in STAND_INS
    }


STAND_INS = {"remote-fs.target": "stand-in-nfs.service", "nss-user-lookup.target": "stand-in-sssd.service"}


def test_a_failing_start_is_retried_until_it_succeeds(sd: Sdns) -> None:
    """A start that fails for a while (exit 1: a full disk under the database, docs/systemd.md) is retried for as
    long as it fails, never into the start limit (5 starts in 10 s), which would fail jobd.socket too and leave
    clients refused once the disk has room. The stand-in for the full disk: a drop-in's ExecStart= exits 1 while a
    file is there, and runs jobd once it is gone."""
    restarts = stopped_afresh(sd)
    failing = sd.root / "run" / "jobd-test-failing"
    failing.touch()
    drop_in = sd.root / "etc" / "systemd" / "system" / "jobd.service.d" / "70-failing-start.conf"
    drop_in.write_text(
        f"[Service]\nExecStart=\nExecStart=/bin/sh -c 'test -e /{failing.relative_to(sd.root)} && exit 1; "
        "exec /usr/bin/jobd'\n"
    )
    try:
        sd.ctl("daemon-reload")
        cursor = sd.cursor()
        sd.ctl("start", "--no-block", "jobd.service")
        # Past the start limit's 5 starts, or refused for it.
        seen = sd.follow(cursor, rf"restart counter is at {restarts + 6}\.|Start request repeated too quickly")
        assert "restart counter" in seen, seen
        assert sd.ctl("is-active", "jobd.socket").strip() == "active"
        failing.unlink()  # room again: the next try starts jobd
        sd.follow(cursor, r"jobd \S+ ready: socket /run/jobd/jobd\.sock")
        assert call(sd, "ping")["pong"] is True
    finally:
        failing.unlink(missing_ok=True)
        drop_in.unlink()
        sd.ctl("daemon-reload")
    sd.ctl("stop", "jobd.service")
    sd.ctl("reset-failed", "jobd.service")
    started(sd)


def test_the_documented_drop_in_lets_jobs_write_a_directory_under_etc(sd: Sdns) -> None:
    """ProtectSystem=full keeps jobs from writing /etc; docs/systemd.md's drop-in (ReadWritePaths=) opens one
    directory to them, once jobd has restarted."""
    found = re.search(r"\n    \[Service\]\n    ReadWritePaths=(/etc/\S+)\n", (REPO / "docs" / "systemd.md").read_text())
    assert found, "docs/systemd.md no longer shows the ReadWritePaths= drop-in"
    directory = "/etc/jobd-test-writable"  # in place of the example's directory
    (sd.root / directory.lstrip("/")).mkdir()
    drop_in = sd.root / "etc" / "systemd" / "system" / "jobd.service.d" / "70-writable.conf"
    write = ["/bin/sh", "-c", f"echo written >{directory}/file"]
    try:
        started(sd)
        refused = call(sd, "job.submit", {"command": write})["id"]
        assert call(sd, "job.wait", {"id": refused, "timeout": TIMEOUT})["state"] == "failed"
        assert "Read-only file system" in call(sd, "job.output", {"id": refused, "stream": "stderr"})["data"]
        drop_in.write_text(found.group(0).replace(found.group(1), directory).replace("\n    ", "\n").lstrip("\n"))
        sd.ctl("daemon-reload")
        sd.ctl("restart", "jobd.service")
        written = call(sd, "job.submit", {"command": write})["id"]
        assert call(sd, "job.wait", {"id": written, "timeout": TIMEOUT})["state"] == "succeeded"
        assert (sd.root / directory.lstrip("/") / "file").read_text() == "written\n"
    finally:
        drop_in.unlink(missing_ok=True)
        sd.ctl("daemon-reload")
        shutil.rmtree(sd.root / directory.lstrip("/"))
    sd.ctl("restart", "jobd.service")


def stopped_afresh(sd: Sdns) -> int:
    """jobd.service stopped, its start limit's count reset (the module's earlier tests); its NRestarts."""
    started(sd)
    sd.ctl("stop", "jobd.service")
    sd.ctl("reset-failed", "jobd.service")
    return int(sd.show("NRestarts"))


def assert_start_fails_for_good(sd: Sdns, status: int, restarts: int) -> None:
    sd.ctl("start", "jobd.service", check=False)  # fails: the start job ends with the service's exit
    assert sd.show("ExecMainStatus") == str(status)
    # Failed for good, not waiting to be started again ("auto-restart").
    assert (sd.show("ActiveState"), sd.show("SubState")) == ("failed", "failed")
    assert int(sd.show("NRestarts")) == restarts
    assert sd.ctl("is-active", "jobd.socket").strip() == "active"  # clients still wait in its queue


@pytest.mark.parametrize("unit", ["jobd.service", "jobd.socket"])
def test_each_directive_of_a_unit_file_is_set_once(unit: str) -> None:
    """A directive set twice is legal and usually a slip (a block pasted twice): for most settings the later one
    silently wins, and a reader changing the first sees no effect."""
    section, seen, repeated = "", set(), []
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and "=" in line:
            key = (section, line.split("=", 1)[0])
            if key in seen:
                repeated.append(key)
            seen.add(key)
    assert repeated == []
