"""docs/from-evqueue.md's example, run as written against a real jobd: the workflow evQueue's `workflow get`
answered, saved as it is, and the drop-in that carries over its queue, retry schedule, workflow schedule, TCP user
and rights. Its `sh` lines run in order (jobd's own `jobctl reload` for `systemctl reload jobd`, which is the unit's
ExecReload), each printing what its `-> ` comment promises; then the web application of the example logs in over TCP
with evQueue's challenge and launches the workflow, and an evQueue client of the Unix socket sees the queue, retry
schedule and workflow schedule the drop-in's comments say evQueue had.

Two things of the example cannot be as written on a test machine, and a later drop-in changes just them: the tasks
directory (report.sh is written into one of the test's) and the TCP port (5000 may be taken: port 0 binds a free one).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Daemon
from lxml import etree
from test_evqueue_protocol import EvqClient, ok
from test_evqueue_tcp import TcpClient, tcp_address
from test_readme_tour import promised

pytestmark = pytest.mark.timeout(120)

DOC = REPO / "docs" / "from-evqueue.md"
DEADLINE = 60.0
# What report.sh, the example's task, prints: its argument (the workflow's parameter) and the user it runs as.
REPORT_SH = '#!/bin/sh\necho "report for $1 by $(id -un)"\n'


def example() -> tuple[str, str, list[tuple[str, str]]]:
    """The example's workflow file, its drop-in, and its shell lines with their comments."""
    section = DOC.read_text().split("## An example", 1)[1]
    [workflow] = re.findall(r"```xml\n(.*?)```", section, re.DOTALL)
    [dropin] = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    [shell] = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    lines = []
    for line in shell.splitlines():
        parts = re.fullmatch(r"(.*?)(?:\s+#\s+(.*))?", line.strip())
        assert parts is not None
        lines.append((parts[1], parts[2] or ""))
    return workflow, dropin, lines


def one_line(text: str) -> str:
    """`text` with its runs of blanks made one space: table columns are padded to their width."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


@pytest.fixture
def tasks_directory() -> Iterator[Path]:
    """evQueue's tasks directory, with report.sh: one www-data may enter (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="jobd-from-evqueue-"))
    directory.chmod(0o755)
    (directory / "report.sh").write_text(REPORT_SH)
    (directory / "report.sh").chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_the_example_parses() -> None:
    workflow, dropin, lines = example()
    assert workflow.startswith('<workflow comment="the day\'s sales" group="reports" id="4" name="nightly_report">')
    assert "[schedule.nightly_report]" in dropin and "[tcp.users.webapp]" in dropin
    assert [command for command, _ in lines][:2] == ["jobd --check-config", "systemctl reload jobd"]
    assert promised(lines[-1][1]) == "instance 1 (nightly_report) succeeded"


def test_the_example_moves_evqueues_definitions_as_written(make_daemon: Any, tasks_directory: Path) -> None:
    workflow, dropin, lines = example()
    daemon: Daemon = make_daemon()  # jobd runs as installed, before the move: the reload below brings it all in
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    (workflows / "nightly_report.xml").write_text(workflow)
    (daemon.config_dir / "jobd.d" / "40-from-evqueue.toml").write_text(dropin)
    (daemon.config_dir / "jobd.d" / "40-from-evqueue.toml").chmod(0o600)  # as the example says: it holds a login
    (daemon.config_dir / "jobd.d" / "90-this-machine.toml").write_text(
        f'[daemon]\ntasks_directory = "{tasks_directory}"\n\n[tcp]\nlisten = "127.0.0.1:0"\n'
    )

    jobd = [sys.executable, "-m", "jobd.daemon", "--config-dir", str(daemon.config_dir)]
    jobctl = [sys.executable, "-m", "jobd.jobctl"]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(JOBD_SOCKET=str(daemon.socket_path), PYTHONPATH=str(REPO))
    for command, comment in lines:
        words = shlex.split(command)
        if words[0] == "jobd":  # the example's is /etc/jobd's; this daemon's configuration is its --config-dir
            argv = jobd + words[1:]
        elif words == ["systemctl", "reload", "jobd"]:
            argv = [*jobctl, "reload"]
        else:
            assert words[0] == "jobctl", command
            argv = jobctl + words[1:]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=DEADLINE)
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{said}\n{daemon.log()}"
        expected = promised(comment)
        assert expected is None or one_line(expected) in one_line(said), f"{command}: {expected!r}, printed:\n{said}"

    # The task ran as evQueue's core.uid, found in its tasks directory, with the workflow's parameter.
    instance = daemon.call("instance.get", {"id": 1, "format": "xml"})
    document = etree.fromstring(instance["xml"].encode())
    [output] = document.iter("output")
    assert output.text == "report for day by www-data\n", instance["xml"]

    # The web application: evQueue's TCP login with its old password, and a launch it has the exec right for. The
    # listener comes with the next start, as the example says (a reload leaves it off, with a warning).
    assert daemon.call("daemon.status")["tcp_listen"] is None
    assert daemon.stop() == 0, daemon.log()
    daemon.start()
    with TcpClient(tcp_address(daemon)) as web:
        greeting = web.login("webapp", "change-me")
        assert (greeting.tag, greeting.get("status"), greeting.get("profile")) == ("ready", "OK", "USER")
        launched = ok(
            web.ask(
                b'<instance action="launch" name="nightly_report" mode="synchronous" timeout="30">'
                b'<parameter name="period" value="week"/></instance>'
            )
        )
        answer = ok(web.ask(b'<instance action="query" id="%s"/>' % launched.get("workflow-instance-id").encode()))
        [ran] = answer
        assert (ran.get("status"), ran.get("errors")) == ("TERMINATED", "0"), etree.tostring(ran)
        assert [output.text for output in ran.iter("output")] == ["report for week by www-data\n"]

    # What evQueue's clients see is what the drop-in's comments say evQueue had.
    with EvqClient(daemon.evqueue_socket) as admin:
        queues = ok(admin.ask(b'<queuepool action="list"/>'))
        assert {queue.get("name"): queue.get("concurrency") for queue in queues}["reports"] == "2"
        [patient] = ok(admin.ask(b'<retry_schedules action="list"/>'))
        levels = [(level.get("retry_delay"), level.get("retry_times")) for level in patient]
        assert (patient.get("name"), levels) == ("patient", [("60", "3"), ("600", "2")]), etree.tostring(patient)
        [schedule] = ok(admin.ask(b'<workflow_schedules action="list" display_parameters="yes"/>'))
        assert (schedule.get("workflow_name"), schedule.get("schedule")) == ("nightly_report", "0;30;2;;;")
        assert (schedule.get("onfailure"), schedule.get("active")) == ("SUSPEND", "1"), etree.tostring(schedule)
        assert [dict(parameter.attrib) for parameter in schedule] == [{"name": "period", "value": "day"}]
        [listed] = ok(admin.ask(b'<workflows action="list"/>'))
        assert (listed.get("name"), listed.get("group"), listed.get("comment")) == (
            "nightly_report",
            "reports",
            "the day's sales",
        )
