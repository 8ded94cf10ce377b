"""jobctl's workflow commands (workflows, launch, instance, instances), the real command line run as a subprocess
against a real daemon that has the workflow corpus of tests/workflows/ (installed as in tests/test_workflows.py).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
from harness import Daemon
from lxml import etree
from test_jobctl import (
    Result,
    ctl,
    on_a_terminal,
    read_rest,
    read_until,
    shown_on_a_terminal,
    stopped_once_drawn,
)
from test_workflows import CORPUS, _install_corpus

pytestmark = pytest.mark.timeout(60)

LAUNCHED = re.compile(r"^instance (\d+) launched: (\S+)$")

# One task fails (fail.sh exits 3, no retry), its sibling succeeds: the instance ends with errors.
BROKEN_WORKFLOW = """<workflow>
  <subjobs>
    <job name="mixed">
      <tasks>
        <task name="breaks" path="fail.sh 3" queue="default"/>
        <task name="works" path="/bin/echo fine" queue="default"/>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""

# Waits until the test writes a line into the FIFO named by its parameter: an instance that stays EXECUTING for
# as long as the test wants, without sleeping.
GATED_WORKFLOW = """<workflow>
  <parameters><parameter name="gate"/></parameters>
  <subjobs>
    <job name="gated">
      <tasks><task name="read-gate" path="/usr/bin/head -n 1" queue="default">
        <input name="gate"><value select="evqGetWorkflowParameter('gate')"/></input>
      </task></tasks>
    </job>
  </subjobs>
</workflow>
"""

# The gated task, and a job whose condition is false beside it: skipped at launch, its task will never run.
SKIPPED_JOB = """    <job name="never" condition="false()">
      <tasks><task name="left-out" path="/bin/true" queue="default"/></tasks>
    </job>
"""
GATED_WITH_A_SKIPPED_JOB = GATED_WORKFLOW.replace("  <subjobs>\n", "  <subjobs>\n" + SKIPPED_JOB, 1)


@pytest.fixture
def wf(make_daemon: Any) -> Daemon:
    daemon: Daemon = make_daemon(
        (CORPUS / "corpus.toml").read_text(),
        start=False,
        daemon_extra=f'tasks_directory = "{CORPUS / "tasks"}"',
    )
    _install_corpus(daemon)
    (daemon.config_dir / "workflows" / "broken.xml").write_text(BROKEN_WORKFLOW)
    (daemon.config_dir / "workflows" / "gated.xml").write_text(GATED_WORKFLOW)
    (daemon.config_dir / "workflows" / "gated-skip.xml").write_text(GATED_WITH_A_SKIPPED_JOB)
    daemon.start()
    return daemon


def launched_id(result: Result) -> int:
    match = LAUNCHED.match(result.out.splitlines()[0] if result.out else "")
    assert match, result
    return int(match.group(1))


# -- workflows --------------------------------------------------------------------------------------------------


def test_workflows_lists_names_and_parameters(wf: Daemon) -> None:
    result = ctl(wf, "workflows")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0].split() == ["NAME", "PARAMETERS"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["loopdemo"] == ["count"]
    assert rows["parameters"] == ["greeting", "who", "verbose"]
    assert rows["trivial"] == ["-"]

    as_json = json.loads(ctl(wf, "--json", "workflows").out)
    assert {w["name"] for w in as_json["workflows"]} == set(rows)


def test_workflows_shows_the_group_and_comment_of_evqueue_git_files(make_daemon: Any) -> None:
    """evQueue 3.3's git files carry a group and a comment, which workflow.list gives: the table left them out."""
    daemon: Daemon = make_daemon(start=False)
    definition = BROKEN_WORKFLOW  # any definition will do
    daemon.write_workflows(
        backup=f'<workflow group="nightly" comment="copies the databases off site">{definition}</workflow>',
        grouped=f'<workflow group="nightly">{definition}</workflow>',
        plain=definition,
    )
    daemon.start()
    result = ctl(daemon, "workflows", env={"COLUMNS": "200"})
    assert result.code == 0, result
    assert result.out.splitlines() == [
        "NAME     PARAMETERS  GROUP    COMMENT",
        "backup   -           nightly  copies the databases off site",
        "grouped  -           nightly  -",
        "plain    -           -        -",
    ]
    # The comment is the column cut to fit the terminal.
    narrow = ctl(daemon, "workflows", env={"COLUMNS": "40"}).out.splitlines()
    assert narrow[1] == "backup   -           nightly  copies th…"
    listed = json.loads(ctl(daemon, "--json", "workflows").out)["workflows"]
    assert [(w["name"], w["group"], w["comment"]) for w in listed] == [
        ("backup", "nightly", "copies the databases off site"),
        ("grouped", "nightly", ""),
        ("plain", "", ""),
    ]


# -- launch -----------------------------------------------------------------------------------------------------


def test_launch_prints_the_instance_id(wf: Daemon) -> None:
    result = ctl(wf, "launch", "trivial", "--comment", "from jobctl")
    assert result.code == 0, result
    assert result.out.count("\n") == 1, result
    instance_id = launched_id(result)
    done = wf.call("instance.wait", {"id": instance_id, "timeout": 30})
    assert done["workflow"] == "trivial" and done["comment"] == "from jobctl" and done["errors"] == 0


def test_launch_with_parameters_and_wait_exits_0(wf: Daemon) -> None:
    result = ctl(wf, "launch", "parameters", "-p", "greeting=hello", "-p", "who=you=me", "-p", "verbose=", "--wait")
    assert result.code == 0, result
    instance_id = launched_id(result)
    assert f"instance {instance_id} (parameters) succeeded in " in result.err, result
    instance = wf.call("instance.get", {"id": instance_id})
    assert instance["status"] == "TERMINATED" and instance["errors"] == 0
    assert instance["parameters"] == {"greeting": "hello", "who": "you=me", "verbose": ""}
    # The task's output, from evQueue's document as `instance --xml` prints it.
    document = etree.fromstring(ctl(wf, "instance", "--xml", str(instance_id)).stdout)
    assert document.findtext(".//task[@name='say']/output") == "hello dear you=me\n"


def test_launch_wait_exits_1_when_the_instance_ends_with_errors(wf: Daemon) -> None:
    result = ctl(wf, "launch", "broken", "--wait")
    assert result.code == 1, result
    instance_id = launched_id(result)
    assert f"instance {instance_id} (broken) ended with 1 error in " in result.err, result
    assert wf.call("instance.get", {"id": instance_id})["errors"] == 1


def test_launch_wait_json_prints_only_the_final_instance(wf: Daemon) -> None:
    result = ctl(wf, "--json", "launch", "broken", "--wait")
    assert result.code == 1, result
    instance = json.loads(result.out)
    assert instance["status"] == "TERMINATED" and instance["errors"] == 1 and instance["workflow"] == "broken"
    assert result.err == ""


def test_launch_wait_timeout_exits_4_and_the_instance_goes_on(wf: Daemon, tmp_path: Any) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    result = ctl(wf, "launch", "gated", "-p", f"gate={gate}", "--wait", "--timeout", "0.2")
    assert result.code == 4, result
    instance_id = launched_id(result)
    assert f"jobctl: instance {instance_id} is still EXECUTING after 0.2s" in result.err, result
    with open(gate, "w") as writer:  # blocks until the task has opened the FIFO: it is running
        writer.write("go\n")
    done = wf.call("instance.wait", {"id": instance_id, "timeout": 30})
    assert done["status"] == "TERMINATED" and done["errors"] == 0


def test_launch_json_gives_the_instance(wf: Daemon) -> None:
    result = ctl(wf, "launch", "--json", "trivial")
    assert result.code == 0, result
    instance = json.loads(result.out)
    assert instance["workflow"] == "trivial" and instance["status"] in ("EXECUTING", "TERMINATED")
    wf.call("instance.wait", {"id": instance["id"], "timeout": 30})


def launch_gated_on_a_terminal(wf: Daemon, tmp_path: Any, workflow: str) -> tuple[int, str]:
    """`jobctl launch WORKFLOW -p gate=FIFO --wait` on a terminal; the instance stays EXECUTING until the line has
    been drawn and the test writes into the FIFO (no race with a fast workflow). Its id and what the terminal got."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    process, master = on_a_terminal(wf, "launch", workflow, "-p", f"gate={gate}", "--wait")
    try:
        terminal = read_until(master, b"% EXECUTING", timeout=20)
        with open(gate, "w") as writer:
            writer.write("go\n")
        out, _ = process.communicate(timeout=30)
        terminal += read_rest(master)
    finally:
        os.close(master)
    text = terminal.decode(errors="replace")
    assert process.returncode == 0, text
    return int(out.split()[1]), text


def test_launch_wait_draws_a_progress_line_on_a_terminal(wf: Daemon, tmp_path: Any) -> None:
    instance_id, text = launch_gated_on_a_terminal(wf, tmp_path, "gated")
    assert f"\rinstance {instance_id} [" in text, text
    assert "% EXECUTING" in text, text
    assert f"instance {instance_id} (gated) succeeded in " in text, text
    assert "Traceback" not in text


def test_the_progress_line_counts_a_skipped_task_as_done_not_as_one_still_to_end(wf: Daemon, tmp_path: Any) -> None:
    """A task that will never run (its job's condition was false) is done and weighs 100 in the percentage, as in
    jobd's own instance progress: the line said 0% and "0/2 tasks ended" while the one task that runs had not ended,
    and could never reach 100% (the README's greet-and-count ended at 80%, "4/5 tasks ended")."""
    instance_id, text = launch_gated_on_a_terminal(wf, tmp_path, "gated-skip")  # its skipped job decided at launch
    assert f"instance {instance_id} [##########----------]  50% EXECUTING  1/2 tasks done" in text, text
    assert " 0% EXECUTING" not in text and "tasks ended" not in text, text
    assert f"instance {instance_id} (gated-skip) succeeded in " in text, text


def test_launch_wait_on_a_terminal_at_a_stop_says_shutting_down(wf: Daemon, tmp_path: Any) -> None:
    """As without a terminal, the end is instance.wait's answer: SHUTTING_DOWN (exit 1) when jobd stops."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)  # never written: the instance is still EXECUTING when jobd stops
    process, master = on_a_terminal(wf, "launch", "gated", "-p", f"gate={gate}", "--wait")
    text = stopped_once_drawn(wf, process, master, b"% EXECUTING")
    assert process.returncode == 1, text
    assert "jobctl: SHUTTING_DOWN: " in text and "Traceback" not in text, text


def test_launch_an_unknown_workflow_exits_1_with_the_code(wf: Daemon) -> None:
    result = ctl(wf, "launch", "nosuch")
    assert result.code == 1, result
    assert result.err.startswith("jobctl: UNKNOWN_WORKFLOW: ") and "nosuch" in result.err, result
    assert result.out == ""
    as_json = ctl(wf, "--json", "launch", "nosuch", "--wait")
    assert as_json.code == 1 and json.loads(as_json.err)["error"]["code"] == "UNKNOWN_WORKFLOW", as_json
    missing = ctl(wf, "launch", "loopdemo")
    assert missing.code == 1 and "INVALID_WORKFLOW_PARAMETERS" in missing.err, missing
    assert wf.call("instance.list", {})["total"] == 0


def test_a_refused_launch_names_the_parameters_and_takes_no_instance_id(wf: Daemon) -> None:
    """A launch refused for its parameters says which the workflow takes, and leaves no gap in the instance ids:
    the next launch is instance 1, as a first launch is (README's tour shows `jobctl instance 1`)."""
    missing = ctl(wf, "launch", "loopdemo")
    assert missing.code == 1, missing
    assert missing.err == (
        "jobctl: INVALID_WORKFLOW_PARAMETERS: instance.launch: Invalid number of parameters passed to workflow"
        " (passed 0, expected 1); loopdemo takes: count (missing: count)\n"
    ), missing
    misspelt = ctl(wf, "launch", "parameters", "-p", "greeting=hi", "-p", "whom=you", "-p", "verbose=no")
    assert misspelt.code == 1, misspelt
    assert misspelt.err == (
        "jobctl: INVALID_WORKFLOW_PARAMETERS: instance.launch: Unknown parameter : whom; parameters takes: greeting,"
        " who, verbose\n"
    ), misspelt
    extra = ctl(wf, "--json", "launch", "trivial", "-p", "x=1")
    assert (
        json.loads(extra.err)["error"]["message"]
        == "instance.launch: Unknown parameter : x; trivial takes no parameters"
    ), extra
    launched = ctl(wf, "launch", "trivial")
    assert launched.code == 0, launched
    assert launched_id(launched) == 1, launched
    wf.call("instance.wait", {"id": 1, "timeout": 30})


@pytest.mark.parametrize(
    "args",
    [
        ["launch", "loopdemo", "-p", "count"],  # no =
        ["launch", "loopdemo", "-p", "=3"],  # no name
        ["launch"],  # no workflow
        ["launch", "trivial", "--timeout", "5"],  # --timeout without --wait
        ["launch", "trivial", "--wait", "--timeout", "-1"],
        ["instance"],
        ["instance", "0"],
        ["instances", "--status", "RUNNING"],
        ["instances", "--errors", "--no-errors"],
        ["instances", "--limit", "0"],
    ],
)
def test_bad_command_lines_exit_2(wf: Daemon, args: list[str]) -> None:
    result = ctl(wf, *args)
    assert result.code == 2, result
    assert result.out == ""
    assert wf.call("instance.list", {})["total"] == 0


# -- instance ---------------------------------------------------------------------------------------------------


def test_instance_shows_the_tree_of_jobs_and_tasks(wf: Daemon) -> None:
    instance_id = launched_id(ctl(wf, "launch", "parameters", "-p", "greeting=hi", "-p", "who=x", "-p", "verbose=no"))
    wf.call("instance.wait", {"id": instance_id, "timeout": 30})
    result = ctl(wf, "instance", str(instance_id))
    assert result.code == 0, result
    lines = result.out.splitlines()
    fields = dict(line.split(":", 1) for line in lines[: lines.index("")])
    assert fields["workflow"].strip() == "parameters" and fields["status"].strip() == "TERMINATED"
    assert fields["errors"].strip() == "0" and fields["parameters"].strip() == "greeting=hi who=x verbose=no"
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["JOB/TASK", "STATUS", "PROGRESS", "RETVAL", "TRIES", "JOBD", "JOB", "ERROR"]
    # Jobs, their tasks one level in, subjobs one level in under their parent, in document order.
    names = [(len(row) - len(row.lstrip()), " ".join(row.split()[:2])) for row in table[1:]]
    assert names == [
        (0, "job greet"),
        (2, "task say"),
        (2, "task list"),
        (2, "job each"),
        (4, "task names"),
    ], result.out
    say = table[2].split()
    # An ended task no longer names a jobd job (evQueue keeps `tid` only while the task runs).
    assert say[2:] == ["TERMINATED", "100%", "0", "1", "-"], result.out


def test_instance_shows_retvals_and_errors_of_failed_tasks(wf: Daemon) -> None:
    instance_id = launched_id(ctl(wf, "launch", "broken", "--wait"))
    result = ctl(wf, "instance", str(instance_id))
    assert result.code == 0, result
    [breaks] = [line for line in result.out.splitlines() if "task breaks" in line]
    assert breaks.split()[2:5] == ["TERMINATED", "100%", "3"], result.out
    [works] = [line for line in result.out.splitlines() if "task works" in line]
    assert works.split()[4] == "0", result.out
    assert re.search(r"^errors:\s+1$", result.out, re.M), result.out


def test_instance_json_and_xml(wf: Daemon) -> None:
    instance_id = launched_id(ctl(wf, "launch", "trivial", "--wait"))
    as_json = ctl(wf, "--json", "instance", str(instance_id))
    assert as_json.code == 0, as_json
    assert json.loads(as_json.out) == wf.call("instance.get", {"id": instance_id})
    as_xml = ctl(wf, "instance", str(instance_id), "--xml")
    assert as_xml.code == 0, as_xml
    document = etree.fromstring(as_xml.stdout)
    assert document.tag == "workflow" and document.find(".//task[@status='TERMINATED']") is not None
    xml_json = json.loads(ctl(wf, "instance", "--xml", "--json", str(instance_id)).out)
    assert xml_json["xml"] == wf.call("instance.get", {"id": instance_id, "format": "xml"})["xml"]


def test_instance_xml_on_a_terminal_shows_the_control_characters_of_task_output_escaped(make_daemon: Any) -> None:
    """A task's output is in the instance document. The control characters XML 1.0 cannot carry are control pictures
    there (ESC is ␛), but it carries C1 controls and bidi overrides: on a terminal `instance --xml` shows them
    escaped, as `log` does (xterm takes U+009B as CSI, the start of an escape sequence); piped, as they are."""
    daemon = make_daemon("[queue.default]\nconcurrency = 1\n", start=False)
    daemon.write_workflows(
        hostile="""<workflow version="3.3"><subjobs><job name="j"><tasks>
        <task name="say" path="/usr/bin/printf" queue="default">
          <input name="what">red\\302\\23331m\\033[0m \\342\\200\\256evil</input>
        </task></tasks></job></subjobs></workflow>"""
    )
    daemon.start()
    instance_id = launched_id(ctl(daemon, "launch", "hostile", "--wait"))
    piped = ctl(daemon, "instance", str(instance_id), "--xml")
    assert piped.code == 0 and "<output" in piped.out, piped
    assert "red\u009b31m\u241b[0m \u202eevil</output>" in piped.out, piped
    shown, result = shown_on_a_terminal(daemon, "instance", str(instance_id), "--xml")
    assert result.code == 0, result
    assert "red\\x9b31m\u241b[0m \\u202eevil</output>" in shown.decode(), shown
    assert "\u009b" not in shown.decode() and "\u202e" not in shown.decode(), shown


def test_an_unknown_instance_exits_1(wf: Daemon) -> None:
    result = ctl(wf, "instance", "999")
    assert result.code == 1, result
    assert re.match(r"jobctl: [A-Z_]+: ", result.err), result


# -- instances --------------------------------------------------------------------------------------------------


def test_instances_lists_and_filters(wf: Daemon, tmp_path: Any) -> None:
    empty = ctl(wf, "instances")
    assert empty.code == 0 and empty.out == "" and "no instances" in empty.err, empty
    ok = launched_id(ctl(wf, "launch", "trivial", "--wait", "--comment", "the good one"))
    bad = launched_id(ctl(wf, "launch", "broken", "--wait"))
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    running = launched_id(ctl(wf, "launch", "gated", "-p", f"gate={gate}"))
    try:
        result = ctl(wf, "instances")
        assert result.code == 0, result
        lines = result.out.splitlines()
        assert lines[0].split() == ["ID", "WORKFLOW", "STATUS", "ERRORS", "STARTED", "TOOK", "PARAMETERS", "COMMENT"]
        rows = [line.split() for line in lines[1:]]
        assert [int(row[0]) for row in rows] == [running, bad, ok]  # newest first
        assert rows[0][1:4] == ["gated", "EXECUTING", "0"]
        assert rows[1][1:4] == ["broken", "TERMINATED", "1"]
        assert rows[2][1:4] == ["trivial", "TERMINATED", "0"] and lines[3].endswith("the good one")

        def ids(*args: str) -> list[int]:
            listed = ctl(wf, "--json", "instances", *args)
            assert listed.code == 0, listed
            return [instance["id"] for instance in json.loads(listed.out)["instances"]]

        assert ids("--workflow", "trivial") == [ok]
        assert ids("--errors") == [bad]
        assert ids("--no-errors") == [running, ok]
        assert ids("--status", "EXECUTING") == [running]
        assert ids("--status", "TERMINATED", "--no-errors") == [ok]
        assert ids("--workflow", "nosuch") == []

        paged = ctl(wf, "instances", "--limit", "2")
        assert [int(line.split()[0]) for line in paged.out.splitlines()[1:]] == [running, bad]
        assert f"repeat with --before {bad}" in paged.err, paged
        assert ids("--before", str(bad)) == [ok]
    finally:
        with open(gate, "w") as writer:
            writer.write("go\n")
        wf.call("instance.wait", {"id": running, "timeout": 30})
