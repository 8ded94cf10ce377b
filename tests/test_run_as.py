"""Run as, sockets and files (docs/config.md "Run as", "Files and sockets"), on a real daemon running as root.

A test user (with an extra supplementary group) and the group `jobd` are created for the module and removed after.
What a job runs as is what the job itself reports (`id`, `$HOME`, `pwd`). A non-root client connects through the
real socket under setpriv, with the system Python (the test venv's may live where that user cannot go).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import http.client
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SOCKET_GROUP, Daemon, account_prefix, in_user_namespace, remove_stale_accounts, socket_group
from recovery.support import WAIT, one_descriptor_left, out_of_descriptors, wait_for_log

from jobd import config
from jobd.client import Client

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="run-as needs root (useradd, setuid)")

USER = account_prefix() + "runas"  # this test process's own: two suites at once do not share it
EXTRA_GROUP = account_prefix() + "extra"
REPORT = 'id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME"; pwd'
SYSTEM_PYTHON = "/usr/bin/python3"
COMMAND = f'command = ["/bin/sh", "-c", \'{REPORT}\']\n'  # a TOML literal string: no escapes


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def test_user() -> Iterator[pwd.struct_passwd]:
    remove_stale_accounts()
    with socket_group():
        try:
            _run("groupadd", EXTRA_GROUP)
            _run("useradd", "-m", "-U", "-G", f"{EXTRA_GROUP},{SOCKET_GROUP}", "-s", "/bin/sh", USER)
            yield pwd.getpwnam(USER)
        finally:
            subprocess.run(["userdel", "-r", USER], capture_output=True)
            subprocess.run(["groupdel", EXTRA_GROUP], capture_output=True)


def _real_defaults(daemon: Daemon) -> None:
    """Take the harness's `default_user = "root"` out again: the daemon gets jobd's real default."""
    path = daemon.config_dir / "jobd.toml"
    text = path.read_text()
    assert 'default_user = "root"\n' in text
    path.write_text(text.replace('default_user = "root"\n', ""))


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is root's alone), for a socket they connect to."""
    directory = Path(tempfile.mkdtemp(prefix="jobd-run-as-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _start(make_daemon: Any, toml: str, *, real_defaults: bool = True, socket_dir: Path | None = None) -> Daemon:
    daemon: Daemon = make_daemon(toml, start=False)
    if socket_dir is not None:
        daemon.socket_path = socket_dir / "jobd.sock"
        daemon.write_config(toml)
    if real_defaults:
        _real_defaults(daemon)
    daemon.start()
    return daemon


def _report(daemon: Daemon, **submit: Any) -> list[str]:
    job = daemon.submit(**submit)
    done = daemon.wait(job["id"])
    assert done["state"] == "succeeded", (done, daemon.output(job["id"], "stderr"))
    return daemon.output(job["id"]).splitlines()


def test_a_task_runs_as_its_user_with_supplementary_groups_home_and_environment(
    make_daemon: Any, test_user: pwd.struct_passwd
) -> None:
    daemon = _start(make_daemon, f'[task.whoami]\n{COMMAND}user = "{USER}"\n')
    uid, gid, groups, env, cwd = _report(daemon, task="whoami")
    assert int(uid) == test_user.pw_uid
    assert int(gid) == test_user.pw_gid
    expected = {test_user.pw_gid, grp.getgrnam(EXTRA_GROUP).gr_gid, grp.getgrnam(SOCKET_GROUP).gr_gid}
    assert set(map(int, groups.split())) == expected  # initgroups: the group database's list, nothing of root's
    assert env == f"{test_user.pw_dir}|{USER}|{USER}"
    assert cwd == test_user.pw_dir  # no working_dir: the user's home


def test_a_task_started_while_jobd_is_out_of_descriptors_waits_and_runs_with_its_supplementary_groups(
    make_daemon: Any, test_user: pwd.struct_passwd
) -> None:
    # Without a descriptor to spare, glibc cannot read /etc/passwd and /etc/group: the user's account came back as
    # "no such uid", made of its uid and primary gid alone, and would have run without its supplementary groups,
    # "/" for its home. (Here the spawn that followed failed too, for want of pipes, and was tried again a second
    # later with an account looked up anew.) Now the start is a shortage: the job waits untried, no job starts for
    # a second, and it runs once jobd can look its account up.
    daemon = _start(make_daemon, f'[task.whoami]\n{COMMAND}user = "{USER}"\n')
    with daemon.client() as client:
        client.call("ping")  # accepted (not left in the listen backlog) before the descriptors run out
        with out_of_descriptors(daemon):
            job = client.call("job.submit", {"task": "whoami"})
            wait_for_log(
                daemon,
                f"job={job['id']} not started yet: cannot look up the account of uid {test_user.pw_uid}: "
                "Too many open files",
            )
        done = client.call("job.wait", {"id": job["id"], "timeout": WAIT}, timeout=WAIT + 5)
    assert done["state"] == "succeeded", (done, daemon.output(job["id"], "stderr"))
    uid, gid, groups, env, _ = daemon.output(job["id"]).splitlines()
    assert (int(uid), int(gid)) == (test_user.pw_uid, test_user.pw_gid)
    expected = {test_user.pw_gid, grp.getgrnam(EXTRA_GROUP).gr_gid, grp.getgrnam(SOCKET_GROUP).gr_gid}
    assert set(map(int, groups.split())) == expected
    assert env == f"{test_user.pw_dir}|{USER}|{USER}"
    assert [t["outcome"] for t in daemon.call("job.get", {"id": job["id"]})["tries"]] == ["succeeded"]


def test_a_task_group_replaces_the_primary_group(make_daemon: Any, test_user: pwd.struct_passwd) -> None:
    daemon = _start(
        make_daemon,
        f'[task.whoami]\n{COMMAND}user = "{USER}"\ngroup = "{EXTRA_GROUP}"\nworking_dir = "/tmp"\n',
    )
    uid, gid, groups, _, cwd = _report(daemon, task="whoami")
    assert int(uid) == test_user.pw_uid
    assert int(gid) == grp.getgrnam(EXTRA_GROUP).gr_gid
    assert grp.getgrnam(EXTRA_GROUP).gr_gid in set(map(int, groups.split()))
    assert cwd == "/tmp"


def test_a_working_directory_is_entered_as_the_jobs_user_not_as_root(
    make_daemon: Any, test_user: pwd.struct_passwd, tmp_path: Path
) -> None:
    # Popen entered the working directory before switching to the job's user: as root, so a job started in a
    # directory its user may not enter (behind one only root may traverse) and read what lay there by relative path.
    closed = tmp_path / "closed"  # pytest's tmp_path is root's alone (0700)
    inside = closed / "inside"
    inside.mkdir(parents=True)
    inside.chmod(0o755)
    (inside / "data").write_text("root's business\n")
    (inside / "data").chmod(0o644)
    toml = f'[task.peek]\ncommand = ["/bin/cat", "data"]\nuser = "{USER}"\nworking_dir = "{inside}"\n'
    toml += f'[task.missing]\ncommand = ["/bin/true"]\nuser = "{USER}"\nworking_dir = "{tmp_path / "none"}"\n'
    daemon = _start(make_daemon, toml)
    peek = daemon.wait(daemon.submit(task="peek")["id"])
    assert peek["state"] == "failed" and daemon.output(peek["id"]) == "", peek
    assert (
        peek["error"]
        == f"cannot change to working directory {str(inside)!r}: Permission denied to uid {test_user.pw_uid}"
    )
    missing = daemon.wait(daemon.submit(task="missing")["id"])
    assert (
        missing["error"] == f"cannot change to working directory {str(tmp_path / 'none')!r}: No such file or directory"
    )
    # Its home, when it may not enter it, is not a reason to fail: "/" instead, as for a login.
    home = Path(test_user.pw_dir)
    mode = home.stat().st_mode
    home.chmod(0o700)
    os.chown(home, 0, 0)
    try:
        assert _report(daemon, command=["/bin/true"]) == []  # root's own job: unchanged
        daemon.write_config(f'[task.whoami]\n{COMMAND}user = "{USER}"\n')
        _real_defaults(daemon)
        daemon.call("daemon.reload")
        assert _report(daemon, task="whoami")[-1] == "/"
    finally:
        os.chown(home, test_user.pw_uid, test_user.pw_gid)
        home.chmod(stat.S_IMODE(mode))


def test_tasks_that_name_no_user_run_as_nobody_never_as_root(make_daemon: Any) -> None:
    nobody = pwd.getpwnam("nobody")
    daemon = _start(
        make_daemon,
        f'[task.plain]\n{COMMAND}[task.root]\n{COMMAND}user = "root"\n',
    )
    uid, gid, groups, env, cwd = _report(daemon, task="plain")
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert 0 not in set(map(int, groups.split()))
    assert env == f"{nobody.pw_dir}|nobody|nobody"
    assert cwd == (nobody.pw_dir if os.path.isdir(nobody.pw_dir) else "/")
    assert _report(daemon, task="root")[0] == "0"  # root only when a task says so
    # An ad-hoc command runs as the admin who submits it: root here.
    assert _report(daemon, command=["/bin/sh", "-c", "id -u"]) == ["0"]


def test_default_user_applies_to_tasks_without_a_user(make_daemon: Any, test_user: pwd.struct_passwd) -> None:
    daemon = _start(make_daemon, f"[task.whoami]\n{COMMAND}")
    (daemon.config_dir / "jobd.d" / "50-user.toml").write_text(f'[daemon]\ndefault_user = "{USER}"\n')
    daemon.call("daemon.reload")
    assert int(_report(daemon, task="whoami")[0]) == test_user.pw_uid


def test_unknown_user_or_group_is_refused_at_load_naming_the_key(tmp_path: Path) -> None:
    cases = {
        '[task.t]\ncommand = ["/bin/true"]\nuser = "no-such-user-x"\n': "task.t.user",
        '[task.t]\ncommand = ["/bin/true"]\ngroup = "no-such-group-x"\n': "task.t.group",
        '[daemon]\ndefault_user = "no-such-user-x"\n': "daemon.default_user",
        '[task.t]\ncommand = ["/bin/true"]\nrun_as = "caller"\nuser = "root"\n': "task.t.run_as",
        '[task.t]\ncommand = ["/bin/true"]\nrun_as = "me"\n': "task.t.run_as",
        "[daemon]\nsocket_mode = 0o1777\n": "daemon.socket_mode",
    }
    for text, key in cases.items():
        (tmp_path / "jobd.toml").write_text(text)
        with pytest.raises(config.ConfigError) as raised:
            config.load_dir(str(tmp_path))
        assert raised.value.details["key"] == key, raised.value.message
        assert f"{tmp_path}/jobd.toml:" in raised.value.message
    (tmp_path / "jobd.toml").write_text("[daemon]\nsocket_mode = 0o1777\n")
    with pytest.raises(config.ConfigError) as raised:
        config.load_dir(str(tmp_path))
    assert raised.value.message.endswith("got 0o1777"), raised.value.message  # in octal, as it was written


def _submit_as(user: pwd.struct_passwd, socket_path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """job.submit sent by a process of `user` (setpriv, its own groups) through the real socket."""
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "job.submit", "params": params})
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(socket_path)!r})\n"
        f"s.sendall({request!r}.encode() + b'\\n')\n"
        "data = b''\n"
        "while not data.endswith(b'\\n'):\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "sys.stdout.write(data.decode())\n"
    )
    done = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", SYSTEM_PYTHON, "-c", script],
        capture_output=True,
        check=True,
        timeout=30,
        cwd="/",
    )
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs the system python3 for the client")
def test_run_as_caller_runs_as_the_uid_that_submitted(
    make_daemon: Any, test_user: pwd.struct_passwd, public_dir: Path
) -> None:
    grant = ""
    if "access" in config.SECTIONS:  # the rights model: the test user may run the task
        grant = f'[[access.grant]]\nusers = ["{USER}"]\nrights = ["read", "exec"]\ntasks = ["whoami"]\n'
    daemon = _start(
        make_daemon,
        f'[task.whoami]\n{COMMAND}run_as = "caller"\n' + grant,
        socket_dir=public_dir,
    )
    reply = _submit_as(test_user, daemon.socket_path, {"task": "whoami"})
    assert "result" in reply, reply
    uid, gid, groups, env, _ = _report_of(daemon, reply["result"]["id"])
    assert (int(uid), int(gid)) == (test_user.pw_uid, test_user.pw_gid)
    assert grp.getgrnam(EXTRA_GROUP).gr_gid in set(map(int, groups.split()))
    assert env == f"{test_user.pw_dir}|{USER}|{USER}"
    # The same task submitted by root runs as root: the caller.
    assert _report(daemon, task="whoami")[0] == "0"


def _report_of(daemon: Daemon, job_id: int) -> list[str]:
    done = daemon.wait(job_id)
    assert done["state"] == "succeeded", (done, daemon.output(job_id, "stderr"))
    return daemon.output(job_id).splitlines()


def test_sockets_are_0660_root_and_group_jobd(make_daemon: Any, test_user: pwd.struct_passwd) -> None:
    daemon = _start(make_daemon, "")
    jobd_gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    for path in (daemon.socket_path, daemon.evqueue_socket):
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
        assert (info.st_uid, info.st_gid) == (0, jobd_gid)


def test_a_reload_does_not_follow_a_link_put_in_place_of_a_socket(
    make_daemon: Any, test_user: pwd.struct_passwd, public_dir: Path
) -> None:
    """The socket in a directory another user may write (an application's own): that user put a symbolic link to a
    file of root's in its place, and the next reload that changed socket_mode gave that file the socket's mode and
    group (chmod and chown as root follow links): /etc/shadow would have been readable by the group jobd."""
    app_dir = public_dir / "app"
    app_dir.mkdir()
    os.chown(app_dir, test_user.pw_uid, test_user.pw_gid)
    victim = public_dir / "roots-own"
    victim.write_text("root's\n")
    victim.chmod(0o600)
    daemon: Daemon = make_daemon("", start=False)
    daemon.socket_path = app_dir / "jobd.sock"
    daemon.write_config("")
    daemon.start()
    moved = app_dir / "moved.sock"  # still jobd's listening socket, under another name
    swap = f"mv {daemon.socket_path} {moved} && ln -s {victim} {daemon.socket_path}"
    subprocess.run(["setpriv", f"--reuid={test_user.pw_uid}", f"--regid={test_user.pw_gid}", "--init-groups", "/bin/sh",
                    "-c", swap], check=True, capture_output=True)  # fmt: skip
    daemon.write_config("", 'socket_mode = 0o666\nsocket_group = "jobd"')
    with Client(str(moved)) as client:
        assert client.call("daemon.reload")["ok"]
    info = os.stat(victim)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o600, 0), oct(info.st_mode)
    assert f"cannot give {daemon.socket_path} its new socket_mode" in daemon.log()
    assert stat.S_IMODE(os.stat(daemon.evqueue_socket).st_mode) == 0o666  # the other socket, still jobd's, took it


def test_socket_mode_and_group_are_configurable_and_a_missing_group_is_a_warning(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon("", start=False, daemon_extra='socket_group = "no-such-group-x"\nsocket_mode = 0o600')
    daemon.start()
    info = os.stat(daemon.socket_path)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_gid == os.getegid()
    assert "socket_group: there is no group no-such-group-x" in daemon.log()
    assert daemon.call("ping") is not None


def test_a_socket_group_that_cannot_be_given_is_named_when_the_start_is_refused(make_daemon: Any) -> None:
    """In a user namespace that maps root alone, the group `daemon` (gid 1) exists but cannot be given to a file:
    the start is refused naming the socket, the group and the key. It said only `[Errno 22] Invalid argument:
    '/proc/self/fd/14'` (met by tests/test_queue_model.py while a `jobd` group existed on the machine)."""
    daemon: Daemon = make_daemon("", start=False, daemon_extra='socket_group = "daemon"')
    daemon.command_prefix = in_user_namespace()
    refused = daemon.start_refused()
    assert refused.returncode != 0
    expected = f"cannot give the socket {daemon.socket_path} the group gid 1 (daemon) ([daemon] socket_group): "
    assert expected + "Invalid argument" in refused.stderr, refused.stderr


def test_state_directory_is_0750_tightened_at_start_and_the_database_0600(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon("", start=False)
    daemon.state_dir.mkdir()
    daemon.state_dir.chmod(0o777)
    (daemon.state_dir / "output").mkdir()
    (daemon.state_dir / "output").chmod(0o755)
    # An empty database file left by an administrator's umask (SQLite takes an empty file as a new database): the
    # start tightens it, as it does the directories. Before, the check below was skipped when the file was absent.
    database = daemon.state_dir / "jobd.sqlite3"
    database.touch()
    database.chmod(0o644)
    daemon.start()
    assert stat.S_IMODE(daemon.state_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE((daemon.state_dir / "output").stat().st_mode) == 0o750
    for name in ("jobd.sqlite3", "jobd.sqlite3-wal"):
        path = daemon.state_dir / name
        assert path.exists(), name  # the WAL is there while jobd has the database open
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (name, oct(path.stat().st_mode))
    assert f"{database} was mode 0644; tightening it to 0600" in daemon.log()
    assert "tightening it to 0750" in daemon.log()


def test_a_new_state_directory_needs_no_tightening_at_the_next_start(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon("")
    assert daemon.wait(daemon.submit(command=["/bin/echo", "out"])["id"])["state"] == "succeeded"
    assert stat.S_IMODE((daemon.state_dir / "output").stat().st_mode) == 0o750
    assert daemon.stop() == 0
    daemon.start()
    assert "tightening" not in daemon.log()


def test_output_files_cannot_be_read_by_another_user(make_daemon: Any, test_user: pwd.struct_passwd) -> None:
    daemon = _start(make_daemon, f'[task.talk]\ncommand = ["/bin/echo", "secret"]\nuser = "{USER}"\n')
    job = daemon.submit(task="talk")
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert daemon.output(job["id"]) == "secret\n"  # written through jobd's pipes although the job is not root
    path = daemon.state_dir / "output" / str(job["id"]) / "1.stdout"
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o007 == 0
    for who in (test_user, pwd.getpwnam("nobody")):
        read = subprocess.run(
            ["setpriv", f"--reuid={who.pw_uid}", f"--regid={who.pw_gid}", "--init-groups", "cat", str(path)],
            capture_output=True,
        )
        assert read.returncode != 0 and b"secret" not in read.stdout


SCRIPT_WORKFLOW = """<?xml version="1.0" encoding="UTF-8"?>
<workflow>
  <subjobs>
    <job name="scripted">
      <tasks>
        <task type="SCRIPT" name="who" queue="default">
          <script>#!/bin/sh
echo "uid=$(id -u) home=$HOME"
</script>
        </task>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""


def test_a_workflow_script_task_runs_as_the_default_user(make_daemon: Any, test_user: pwd.struct_passwd) -> None:
    daemon: Daemon = make_daemon("", start=False)
    _real_defaults(daemon)
    (daemon.config_dir / "jobd.d" / "50-user.toml").write_text(f'[daemon]\ndefault_user = "{USER}"\n')
    (daemon.config_dir / "workflows").mkdir()
    (daemon.config_dir / "workflows" / "who.xml").write_text(SCRIPT_WORKFLOW)
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "who"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    document = daemon.call("instance.get", {"id": launched["id"], "format": "xml"})["xml"]
    assert done["errors"] == 0, document
    assert f"uid={test_user.pw_uid} home={test_user.pw_dir}" in document


HTTP_TOKEN = "jobdrt1-token"
HTTP_CONFIG = f"""
[http]
listen = "127.0.0.1:0"

[http.tokens.rt]
token_sha256 = "{hashlib.sha256(HTTP_TOKEN.encode()).hexdigest()}"
user = "{USER}"  # a local account: ad-hoc commands run as it
admin = true
"""


def _http_post(connection: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {HTTP_TOKEN}"}
    connection.request("POST", path, json.dumps(body), headers)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_an_http_token_of_a_local_user_is_refused_as_a_shortage_while_jobd_cannot_look_the_user_up(
    make_daemon: Any, test_user: pwd.struct_passwd
) -> None:
    # Without a descriptor to spare, glibc cannot read /etc/passwd: the token's user was "no such user", so its
    # client became a remote one (uid -1), and its ad-hoc command was refused as if it had no local account. Now the
    # request is answered 503 OUT_OF_RESOURCES, nothing done, and the same request succeeds once jobd can look up.
    daemon = _start(make_daemon, HTTP_CONFIG)
    host, port = daemon.call("daemon.status")["http_listen"].rsplit(":", 1)
    submit = {"command": ["/usr/bin/id", "-u"]}
    with contextlib.closing(http.client.HTTPConnection(host, int(port), timeout=WAIT)) as connection:
        assert _http_post(connection, "/api/ping", {})[0] == 200  # accepted before the descriptors run out (kept alive)
        with out_of_descriptors(daemon):
            status, body = _http_post(connection, "/api/job.submit", submit)
        assert (status, body["error"]["code"]) == (503, "OUT_OF_RESOURCES"), body
        assert body["error"]["message"] == (
            f"cannot look up the user {USER!r}: Too many open files (jobd is short of open files or memory: see "
            "LimitNOFILE=); ask again later"
        )
        assert daemon.call("job.list", {})["jobs"] == []  # nothing was submitted
        status, body = _http_post(connection, "/api/job.submit", submit)
    assert status == 200, body
    assert daemon.wait(body["result"]["id"])["state"] == "succeeded"
    assert daemon.output(body["result"]["id"]) == f"{test_user.pw_uid}\n"


CALLER_WORKFLOW = (
    '<workflow><subjobs><job name="one"><tasks><task task="whoami" name="whoami"/></tasks></job></subjobs></workflow>'
)


def _caller_workflow_daemon(make_daemon: Any, public_dir: Path) -> Daemon:
    """A jobd whose workflow `who` has one task, run as the user who launched the instance; the test user may launch
    it, through a socket in `public_dir`."""
    toml = f'[task.whoami]\n{COMMAND}run_as = "caller"\n'
    toml += f'[[access.grant]]\nusers = ["{USER}"]\nrights = ["read", "exec"]\nworkflows = ["who"]\n'
    daemon: Daemon = make_daemon(toml, start=False)
    daemon.socket_path = public_dir / "jobd.sock"
    daemon.write_config(toml)
    _real_defaults(daemon)
    daemon.write_workflows(who=CALLER_WORKFLOW)
    daemon.start()
    return daemon


class _UserClient:
    """A client of `user` (setpriv, its own groups) connected to the API socket, answered once (and so accepted and
    identified) before it returns; each request() line it is given is sent, and its reply read."""

    def __init__(self, user: pwd.struct_passwd, socket_path: Path) -> None:
        script = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(socket_path)!r})\n"
            "replies = s.makefile('rb')\n"
            "for line in sys.stdin:\n"
            "    s.sendall(line.encode())\n"
            "    sys.stdout.write(replies.readline().decode()); sys.stdout.flush()\n"
        )
        self.process = subprocess.Popen(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", SYSTEM_PYTHON, "-c",
             script],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
        )  # fmt: skip
        assert "pong" in self.request("ping", {})["result"]

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}) + "\n")
        self.process.stdin.flush()
        reply: dict[str, Any] = json.loads(self.process.stdout.readline())
        return reply

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=WAIT) == 0


def _held_task(daemon: Daemon, instance: int, user: pwd.struct_passwd) -> None:
    """Until the log says the one task of `instance` was held (and not, say, failed), and while it is held."""
    wait_for_log(daemon, f"instance={instance} task ")  # its one task: submitted, held or failed
    told = re.search(rf"instance={instance} task \d+ (.*)", daemon.log())
    assert told is not None and told[1] == (
        f"not submitted yet: cannot look up the account of uid {user.pw_uid}: Too many open files "
        "(jobd is short of open files or memory: see LimitNOFILE=); the task waits to be submitted until jobd can"
    ), told


def _launch_held(daemon: Daemon, client: _UserClient, user: pwd.struct_passwd) -> int:
    """The id of a `who` instance `client` launches while jobd is out of descriptors, once its one task is held."""
    launched = client.request("instance.launch", {"workflow": "who"})
    assert "result" in launched, launched
    instance: int = launched["result"]["id"]
    _held_task(daemon, instance, user)
    return instance


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs the system python3 for the client")
def test_a_workflow_task_run_as_its_caller_waits_while_jobd_cannot_look_the_caller_up(
    make_daemon: Any, test_user: pwd.struct_passwd, public_dir: Path
) -> None:
    # A run_as = "caller" task runs with the primary group of its launcher's passwd entry, looked up as the task is
    # submitted. Without a descriptor to spare, glibc answered "no such uid": the task failed for good, "uid N has no
    # passwd entry to give its group", and its instance with it. Now the task waits QUEUED, without a job, and is
    # submitted once jobd can look its user up.
    daemon = _caller_workflow_daemon(make_daemon, public_dir)
    client = _UserClient(test_user, daemon.socket_path)
    with daemon.client() as root:
        root.call("ping")  # accepted too
        with out_of_descriptors(daemon):
            instance = _launch_held(daemon, client, test_user)
            queued = root.call("instance.get", {"id": instance, "format": "xml"})["xml"]
            assert 'status="QUEUED"' in queued and " tid=" not in queued, queued  # no job yet
    client.close()
    done = daemon.call("instance.wait", {"id": instance, "timeout": WAIT}, timeout=WAIT + 5)
    document = daemon.call("instance.get", {"id": instance, "format": "xml"})["xml"]
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), document
    [job] = daemon.call("job.list", {})["jobs"]  # one try, after the shortage: none failed for it
    assert [t["outcome"] for t in daemon.call("job.get", {"id": job["id"]})["tries"]] == ["succeeded"]
    uid, gid, groups, env, _ = daemon.output(job["id"]).splitlines()
    assert (int(uid), int(gid)) == (test_user.pw_uid, test_user.pw_gid)
    assert grp.getgrnam(EXTRA_GROUP).gr_gid in set(map(int, groups.split()))
    assert env == f"{test_user.pw_dir}|{USER}|{USER}"


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs the system python3 for the client")
def test_a_workflow_task_held_for_want_of_descriptors_is_not_submitted_once_its_instance_is_cancelled(
    make_daemon: Any, test_user: pwd.struct_passwd, public_dir: Path
) -> None:
    # A held task is QUEUED without a job: a cancel aborts it, and the end of the hold submits nothing for it. Another
    # instance's task, held after it, is submitted by the same end of the hold, after it: once that one has run, the
    # first had its turn.
    daemon = _caller_workflow_daemon(make_daemon, public_dir)
    client = _UserClient(test_user, daemon.socket_path)
    with daemon.client() as root:
        root.call("ping")  # accepted too
        with out_of_descriptors(daemon):
            cancelled = _launch_held(daemon, client, test_user)
            # Its end lists the scripts directory, to remove the instance's scripts: that failed too, and the cancel
            # was answered INTERNAL_ERROR, with a traceback logged. They are removed a second later.
            root.call("instance.cancel", {"id": cancelled})
            assert (
                f"cannot remove the scripts of instance {cancelled} now: Too many open files (jobd is short of open "
                "files or memory: see LimitNOFILE=); tried again in 1s"
            ) in daemon.log()
            kept = _launch_held(daemon, client, test_user)
    client.close()
    done = daemon.call("instance.wait", {"id": kept, "timeout": WAIT}, timeout=WAIT + 5)
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), done
    [job] = daemon.call("job.list", {})["jobs"]
    assert job["context"] == f"instance:{kept}", job
    ended = daemon.call("instance.get", {"id": cancelled, "format": "xml"})
    assert ended["status"] == "TERMINATED" and "ABORTED" in ended["xml"] and " tid=" not in ended["xml"], ended
    assert "Traceback" not in daemon.log()


def _exchange_as(user: pwd.struct_passwd, path: Path, request: bytes) -> bytes:
    """What a process of `user` (setpriv, its own groups) reads after sending `request` to the socket at `path`: up
    to the end of the first line, or of the connection."""
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(path)!r})\n"
        f"s.sendall({request!r})\n"
        "data = b''\n"
        "while b'\\n' not in data:\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "sys.stdout.buffer.write(data)\n"
    )
    done = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", SYSTEM_PYTHON, "-c", script],
        capture_output=True,
        check=True,
        timeout=WAIT,
        cwd="/",
    )
    return done.stdout


SHORT_OF_NAMES = (
    "cannot look up the user of uid {uid}: Too many open files (jobd is short of open files or memory: see "
    "LimitNOFILE=); the client is not served now: try again later"
)


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs the system python3 for the client")
def test_a_client_jobd_cannot_look_up_for_want_of_descriptors_is_refused_as_a_shortage(
    make_daemon: Any, test_user: pwd.struct_passwd, public_dir: Path
) -> None:
    # A client's user and groups are looked up by name as it connects, for the rules of [access]. Without a
    # descriptor to spare, glibc answered "no such user": the client was served, for its connection's life, as the
    # user "1001" of groups "1001" and so on, whom no rule names: an admin by `[access] admins` was not one, and its
    # ad-hoc command was refused, INSUFFICIENT_RIGHTS. Now the connection is refused as a shortage (as one over
    # max_connections is: an error with a null id, then the end), and the same client is served once jobd can tell.
    daemon = _start(make_daemon, f'[access]\nadmins = {{ users = ["{USER}"] }}\n', socket_dir=public_dir)
    submit = b'{"jsonrpc": "2.0", "id": 1, "method": "job.submit", "params": {"command": ["/usr/bin/id", "-u"]}}\n'
    with one_descriptor_left(daemon):
        refused = json.loads(_exchange_as(test_user, daemon.socket_path, submit))
    assert refused == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": -32016,
            "message": SHORT_OF_NAMES.format(uid=test_user.pw_uid),
            "data": {"code": "OUT_OF_RESOURCES"},
        },
    }, refused
    assert daemon.call("job.list", {})["jobs"] == []
    served = json.loads(_exchange_as(test_user, daemon.socket_path, submit))
    assert "result" in served, served
    assert daemon.wait(served["result"]["id"])["state"] == "succeeded"
    assert daemon.output(served["result"]["id"]) == f"{test_user.pw_uid}\n"


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs the system python3 for the client")
def test_an_evqueue_client_jobd_cannot_look_up_for_want_of_descriptors_is_refused_as_a_shortage(
    make_daemon: Any, test_user: pwd.struct_passwd, public_dir: Path
) -> None:
    # As above, on evQueue's socket: the client was greeted as profile USER, not the ADMIN its user is.
    daemon: Daemon = make_daemon(f'[access]\nadmins = {{ users = ["{USER}"] }}\n', start=False)
    daemon.socket_path, daemon.evqueue_socket = public_dir / "jobd.sock", public_dir / "evqueue.sock"
    daemon.write_config(f'[access]\nadmins = {{ users = ["{USER}"] }}\n')
    daemon.start()
    with one_descriptor_left(daemon):
        refused = _exchange_as(test_user, daemon.evqueue_socket, b"<ping />").decode()
    message = SHORT_OF_NAMES.format(uid=test_user.pw_uid)
    assert refused.startswith(f'<response error="{message}" error-code="OUT_OF_RESOURCES"'), refused
    assert 'status="KO"' in refused, refused
    greeting = _exchange_as(test_user, daemon.evqueue_socket, b"").decode()
    assert greeting.startswith("<ready ") and 'profile="ADMIN"' in greeting, greeting
