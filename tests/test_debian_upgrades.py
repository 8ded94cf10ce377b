"""Upgrades of the Debian package (debian/) in a throw-away systemd (tests/debian_support.py says how): over the
installed package while jobs run and clients wait, then remove and install again; from the previous version, the
first packaged jobd, built from git history as 0.1.0~prev; and to a next version, this checkout as 0.1.0+next with
a changed /etc/jobd/jobd.toml. Installing, using and purging: tests/test_debian_package.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from debian_support import (
    CLEAN_ENV,
    MARKS,
    NO_SOURCES,
    TIMEOUT,
    Sdns,
    booted,
    build,
    copy_checkout,
    run,
    version_ge,
)
from harness import REPO

from jobd.store import SCHEMA_VERSION

pytestmark = MARKS


@pytest.fixture
def sd() -> Iterator[Sdns]:
    with booted() as system:
        yield system


# A job that tells the test, through FIFOs, that it runs and that it got SIGTERM, and after SIGTERM waits for the
# test's word before it goes (its kill_grace is long enough for the test to act meanwhile). Once the test removed
# the FIFOs' directory it just goes.
HOLD = r"""
trap 'echo stopping >/run/jobd-test/stopping && read _ </run/jobd-test/release; exit 0' TERM
echo running >/run/jobd-test/running
while :; do sleep 1000 & wait $!; done
"""


def _stopping_the_held_job(sd: Sdns, args: list[str], meanwhile: Callable[[], None] = lambda: None) -> None:
    """Run `args` (dpkg or apt-get), which stops jobd and so the HOLD job: once the job has SIGTERM (the old jobd
    no longer listens), call `meanwhile`, then let the job go and wait for `args` to end."""
    command = subprocess.Popen(
        sd.enter(*args), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=CLEAN_ENV
    )
    try:
        assert sd.ns("cat", "/run/jobd-test/stopping") == "stopping\n"
        meanwhile()
        sd.ns("sh", "-c", "echo go >/run/jobd-test/release")
        assert command.wait(TIMEOUT) == 0, command.communicate()[0]
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(TIMEOUT)


def test_upgrade_and_remove_keep_jobs_configuration_and_waiting_clients(deb: Path, sd: Sdns) -> None:
    """dpkg -i over the installed package while a job runs and another waits: jobd.service restarts (the new jobd
    runs), the running job is stopped and runs again from the start, the queued one keeps its place, the
    administrator's change to the conffile stays, and a client that connected while the old jobd stopped is
    answered by the new one (jobd.socket is not restarted). Then apt-get remove stops both units and keeps all
    that, and installing again resumes it."""
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    sd.ns("sh", "-ec", "mkdir -m 0700 /run/jobd-test && cd /run/jobd-test && mkfifo running stopping release")
    drop_in = Path(f"{sd.root}/etc/jobd/jobd.d/50-local.toml")
    drop_in.parent.mkdir()
    hold = f'[task.hold]\ncommand = ["/bin/sh", "-c", {json.dumps(HOLD)}]\nuser = "root"\nkill_grace = 600\n'
    drop_in.write_text(f'{hold}\n[task.after]\ncommand = ["/bin/true"]\n')
    conffile = Path(f"{sd.root}/etc/jobd/jobd.toml")
    edited = conffile.read_text().replace("concurrency = 1", "concurrency = 1  # the administrator's", 1)
    conffile.write_text(edited)
    sd.ns("jobctl", "reload")
    held = json.loads(sd.ns("jobctl", "--json", "submit", "hold"))["id"]
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    queued = json.loads(sd.ns("jobctl", "--json", "submit", "after"))["id"]
    old_pid = sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip()

    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(TIMEOUT)  # hang guard

        def connect() -> None:  # into the listening socket's queue, while no jobd accepts
            client.connect(f"{sd.root}/run/jobd/jobd.sock")
            client.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')

        _stopping_the_held_job(sd, ["dpkg", "-i", str(deb)], connect)
        answer = client.makefile("rb").readline()
    assert answer and "result" in json.loads(answer), answer

    assert sd.ns("systemctl", "is-active", "jobd.socket", "jobd.service").split() == ["active", "active"]
    assert sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip() != old_pid
    # The job the restart stopped runs again, from the start, under the new jobd; the queued one still waits.
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    job = json.loads(sd.ns("jobctl", "--json", "status", str(held)))
    assert job["state"] == "running" and job["attempts"] == 2, job
    assert json.loads(sd.ns("jobctl", "--json", "status", str(queued)))["state"] == "queued"
    assert conffile.read_text() == edited

    _stopping_the_held_job(sd, ["apt-get", "remove", "--yes", "jobd"])
    assert sd.ns("dpkg-query", "-W", "-f", "${Status}", "jobd") == "deinstall ok config-files"
    assert sd.run("systemctl", "is-active", "jobd.socket", "jobd.service").stdout.split() == ["inactive"] * 2
    assert conffile.read_text() == edited and sd.exists("/var/lib/jobd/jobd.sqlite3")
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    assert json.loads(sd.ns("jobctl", "--json", "status", str(held)))["attempts"] == 3
    assert json.loads(sd.ns("jobctl", "--json", "status", str(queued)))["state"] == "queued"
    sd.ns("rm", "-r", "/run/jobd-test")  # the job goes at once when stopped (at sd_down)


# The fleet's previous version: the first packaged jobd (debian/ came with this commit), whose database is at schema
# version 11. Built from git history as 0.1.0~prev, a lower version than this checkout's, so that installing this
# checkout's package over it is an upgrade, with the previous package's maintainer scripts and jobd.
PREVIOUS = "5bb66c42e0d8a76a1d651417033721306e90fbe7"
PREVIOUS_VERSION = "0.1.0~prev"
PREVIOUS_SCHEMA = 11


@pytest.fixture(scope="module")
def previous_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("previous-deb") / "jobd"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True, timeout=TIMEOUT, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, timeout=TIMEOUT, check=True)
    return build(source, PREVIOUS_VERSION)


def _schema_version(sd: Sdns) -> int:
    """The database's schema version (SQLite's user_version); jobd must be stopped (it holds the file exclusively)."""
    database = "sqlite3.connect('/var/lib/jobd/jobd.sqlite3')"
    read = f"import sqlite3; print({database}.execute('PRAGMA user_version').fetchone()[0])"
    return int(sd.ns("python3", "-c", read))


def test_upgrade_from_the_previous_version_migrates_the_database_and_keeps_the_jobs(
    deb: Path, previous_deb: Path, sd: Sdns
) -> None:
    """dpkg -i of this checkout's package over the previous version's, with a job running, jobs queued behind it and
    one finished: the new jobd, restarted once by the postinst, brings the database to its schema, keeps every job
    and their output, runs the stopped job again and then the queued ones."""
    new_version = run(["dpkg-deb", "--field", str(deb), "Version"]).stdout.strip()
    assert not version_ge(PREVIOUS_VERSION, new_version), (PREVIOUS_VERSION, new_version)
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(previous_deb))
    assert sd.ns("dpkg-query", "-W", "-f", "${Version}", "jobd") == PREVIOUS_VERSION
    sd.ns("systemctl", "stop", "jobd.service")
    assert _schema_version(sd) == PREVIOUS_SCHEMA  # made by the previous jobd
    sd.ns("systemctl", "start", "jobd.service")

    sd.ns("sh", "-ec", "mkdir -m 0700 /run/jobd-test && cd /run/jobd-test && mkfifo running stopping release")
    drop_in = Path(f"{sd.root}/etc/jobd/jobd.d/50-local.toml")
    drop_in.parent.mkdir()
    hold = f'[task.hold]\ncommand = ["/bin/sh", "-c", {json.dumps(HOLD)}]\nuser = "root"\nkill_grace = 600\n'
    drop_in.write_text(f'{hold}\n[task.after]\ncommand = ["/bin/echo", "after"]\n')
    sd.ns("jobctl", "reload")
    token = f"before-the-upgrade-{os.getpid()}"
    finished = json.loads(sd.ns("jobctl", "--json", "run", "--", "/bin/echo", token))["id"]
    sd.ns("jobctl", "wait", str(finished))
    held = json.loads(sd.ns("jobctl", "--json", "submit", "hold"))["id"]
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    queued = [json.loads(sd.ns("jobctl", "--json", "submit", "after"))["id"] for _ in range(3)]
    cursor = sd.ns("journalctl", "-q", "-n", "0", "--show-cursor").strip().removeprefix("-- cursor: ")

    _stopping_the_held_job(sd, ["dpkg", "-i", str(deb)])

    assert sd.ns("dpkg-query", "-W", "-f", "${Version}", "jobd") == new_version
    assert sd.ns("systemctl", "is-active", "jobd.socket", "jobd.service").split() == ["active", "active"]
    # The unit's entries are picked here, not by `-u`: systemd 252's journalctl --after-cursor with a match skips the
    # first matching entry when the cursor's own entry does not match.
    entries = [
        json.loads(line) for line in sd.ns("journalctl", "-q", "-o", "json", f"--after-cursor={cursor}").splitlines()
    ]
    messages = [
        str(entry.get("MESSAGE"))
        for entry in entries
        if "jobd.service" in (entry.get("_SYSTEMD_UNIT"), entry.get("UNIT"))
    ]
    assert [m for m in messages if m == "stopped" or " ready: socket " in m][-2:] == [
        "stopped",
        f"jobd {new_version} ready: socket /run/jobd/jobd.sock, state /var/lib/jobd",
    ], messages
    assert len([m for m in messages if " ready: socket " in m]) == 1, messages  # restarted once
    assert sd.ns("getent", "group", "jobd-admin").startswith("jobd-admin:")  # the new sysusers.d entry
    # The stopped job runs again, from the start, under the new jobd; the queued ones wait behind it; the finished
    # one and its output are there.
    assert sd.ns("cat", "/run/jobd-test/running") == "running\n"
    job = json.loads(sd.ns("jobctl", "--json", "status", str(held)))
    assert (job["state"], job["attempts"]) == ("running", 2), job
    assert [json.loads(sd.ns("jobctl", "--json", "status", str(i)))["state"] for i in queued] == ["queued"] * 3
    assert json.loads(sd.ns("jobctl", "--json", "status", str(finished)))["state"] == "succeeded"
    assert sd.ns("jobctl", "log", str(finished)) == f"{token}\n"
    sd.ns("rm", "-r", "/run/jobd-test")  # the held job now goes at once when cancelled
    sd.ns("jobctl", "cancel", str(held))
    for job_id in queued:
        sd.ns("jobctl", "wait", str(job_id))
        assert sd.ns("jobctl", "log", str(job_id)) == "after\n"
    sd.ns("systemctl", "stop", "jobd.service")
    assert _schema_version(sd) == SCHEMA_VERSION


@pytest.fixture(scope="module")
def next_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's package as a next version, 0.1.0+next, whose /etc/jobd/jobd.toml has one line more."""
    source = tmp_path_factory.mktemp("next-deb") / "jobd"
    copy_checkout(source)
    with (source / "examples" / "jobd.toml").open("a") as shipped:
        shipped.write("# a line the next version adds\n")
    return build(source, "0.1.0+next")


def test_an_upgrade_that_changes_the_edited_conffile_keeps_the_administrators_version(
    deb: Path, next_deb: Path, sd: Sdns
) -> None:
    """The administrator changed /etc/jobd/jobd.toml and the next version ships a changed one: with dpkg's
    --force-confold (what an unattended upgrade passes; dpkg would ask otherwise) the administrator's file stays in
    force, the new one is left beside it as jobd.toml.dpkg-dist, which jobd does not read, and the restarted jobd
    runs with the administrator's configuration."""
    sd.ns("apt-get", *NO_SOURCES, "install", "--yes", "--no-install-recommends", str(deb))
    conffile = Path(f"{sd.root}/etc/jobd/jobd.toml")
    shipped = conffile.read_text()
    edited = shipped.replace("[queue.default]\nconcurrency = 1\n", "[queue.default]\nconcurrency = 3\n", 1)
    assert edited != shipped
    conffile.write_text(edited)
    sd.ns("jobctl", "reload")
    old_pid = sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip()

    sd.ns("dpkg", "--force-confold", "-i", str(next_deb))

    assert sd.ns("dpkg-query", "-W", "-f", "${Version}", "jobd") == "0.1.0+next"
    assert sd.ns("systemctl", "show", "-p", "MainPID", "--value", "jobd.service").strip() != old_pid
    assert conffile.read_text() == edited
    assert Path(f"{sd.root}/etc/jobd/jobd.toml.dpkg-dist").read_text() == f"{shipped}# a line the next version adds\n"
    queues = {queue["name"]: queue for queue in json.loads(sd.ns("jobctl", "--json", "queues"))["queues"]}
    assert queues["default"]["concurrency"] == 3, queues
    assert sd.ns("journalctl", "-q", "-o", "cat", "-u", "jobd.service", "-p", "warning") == ""
