"""Workflow instances run by a real daemon: tasks as real jobs, the instance document, cancel, crash recovery.

The corpus (tests/workflows/) is installed as the daemon's workflows/ directory with corpus.toml as its queues and
tasks; its relative programs (list.sh, show.sh, fail.sh) are found in tasks_directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon
from lxml import etree
from recovery.support import Gate, attach, kill9, out_of_descriptors, start, terminate
from test_evqueue_protocol import EvqClient, ok
from test_jobs import next_matching
from test_workflow_engine import assert_same_instance, normalised

from jobd import safexml
from jobd.client import RemoteError
from jobd.protocol.evqueue import XmlFramer

CORPUS = Path(__file__).parent / "workflows"
EXPECTED = Path(__file__).parent / "workflow_corpus"

SLOW_WORKFLOW = """<workflow>
  <parameters><parameter name="seconds"/></parameters>
  <subjobs>
    <job name="first">
      <tasks><task name="sleeper" path="/bin/sleep" queue="default">
        <input name="s"><value select="evqGetWorkflowParameter('seconds')"/></input>
      </task></tasks>
      <subjobs>
        <job name="after"><tasks><task name="done" path="/bin/echo after" queue="default"/></tasks></job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


# Its second task blocks reading the FIFO named by `gate` until the test writes a line: a task that is running for
# as long as the test needs, without sleeping. It may be retried once.
RESUMABLE_WORKFLOW = """<workflow>
  <parameters><parameter name="gate"/></parameters>
  <subjobs>
    <job name="one">
      <tasks><task name="first" path="/bin/echo first" queue="default"/></tasks>
      <subjobs>
        <job name="two">
          <tasks><task name="read-gate" path="/usr/bin/head -n 1" queue="default" retry_times="1" retry_delay="1">
            <input name="gate"><value select="evqGetWorkflowParameter('gate')"/></input>
          </task></tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""

EDGES_WORKFLOW = """<workflow>
  <subjobs>
    <job name="edges">
      <tasks>
        <task name="big" path="/bin/sh -c 'exit 200'" queue="default"/>
        <task name="merged" path="/bin/sh -c 'echo out; echo err >&amp;2'" merge-stderr="yes" queue="default"/>
        <task name="binary" path="/usr/bin/printf 'a\\001b\\377c'" queue="default"/>
        <task name="badxml" path="/bin/echo '&lt;unclosed&gt;'" output-method="XML" queue="default"/>
        <task name="far" path="/bin/true" host="example.org" queue="default"/>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""


# Its middle task succeeds once the file named by `flag` exists: the test decides when it would succeed.
FLAGGED_WORKFLOW = """<workflow>
  <parameters><parameter name="flag"/></parameters>
  <subjobs>
    <job name="one">
      <tasks><task name="first" path="/bin/echo first" queue="default"/></tasks>
      <subjobs>
        <job name="two">
          <tasks><task name="check" path="/usr/bin/test -e" queue="default">
            <input name="flag"><value select="evqGetWorkflowParameter('flag')"/></input>
          </task></tasks>
          <subjobs>
            <job name="three"><tasks><task name="last" path="/bin/echo last" queue="default"/></tasks></job>
          </subjobs>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def _install_corpus(daemon: Daemon) -> None:
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    for source in CORPUS.glob("*.xml"):
        shutil.copy(source, workflows / source.name)
    (workflows / "slow.xml").write_text(SLOW_WORKFLOW)
    (workflows / "edges.xml").write_text(EDGES_WORKFLOW)
    (workflows / "resumable.xml").write_text(RESUMABLE_WORKFLOW)
    (workflows / "flagged.xml").write_text(FLAGGED_WORKFLOW)


def _corpus_daemon(make_daemon: Any) -> Daemon:
    daemon: Daemon = make_daemon(
        (CORPUS / "corpus.toml").read_text(),
        start=False,
        daemon_extra=f'tasks_directory = "{CORPUS / "tasks"}"',
    )
    _install_corpus(daemon)
    daemon.start()
    return daemon


def test_a_relative_tasks_directory_is_jobds_not_the_jobs_working_directory(make_daemon: Any) -> None:
    """`tasks_directory = "tasks"` is found from the directory jobd was started in (as its socket and state_dir, and as
    the dev configuration says of its paths), whatever the job's working directory: a task with wd="/" (or run as
    another user, who starts in their home) failed with spawn_error, cannot start 'tasks/hi.sh'."""
    daemon: Daemon = make_daemon("", start=False, daemon_extra='tasks_directory = "tasks"')
    tasks = daemon.root / "tasks"  # the harness starts jobd in daemon.root
    tasks.mkdir()
    (tasks / "hi.sh").write_text('#!/bin/sh\necho "hi from $(pwd)"\n')
    (tasks / "hi.sh").chmod(0o755)
    daemon.write_workflows(
        elsewhere='<workflow><subjobs><job><tasks><task name="hi" path="hi.sh" queue="default" wd="/"/>'
        "</tasks></job></subjobs></workflow>"
    )
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "elsewhere"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), daemon.call("instance.get", {"id": launched["id"]})
    jobs = daemon.call("job.list", {"context": f"instance:{launched['id']}"})["jobs"]
    assert jobs[0]["command"][0] == str(tasks / "hi.sh")
    assert daemon.output(jobs[0]["id"]) == "hi from /\n"


def test_a_script_task_with_a_wd_runs_under_a_relative_state_dir(make_daemon: Any) -> None:
    """A SCRIPT task's file is in STATE_DIR/scripts, and a job running as jobd's user runs it by its path, from its
    own working directory: with a relative state_dir (the dev configuration's `.jobd/state`) and wd="/tmp", it
    failed at once, cannot start '.jobd/state/scripts/1-3': No such file or directory."""
    daemon: Daemon = make_daemon("", start=False)
    # The harness starts jobd in daemon.root: "state" is the same directory as the harness's absolute state_dir.
    (daemon.config_dir / "jobd.d" / "50-relative.toml").write_text('[daemon]\nstate_dir = "state"\n')
    script = '#!/bin/sh\necho "script in $(pwd)"\n'
    daemon.write_workflows(
        scripted='<workflow><subjobs><job><tasks><task name="s" type="SCRIPT" queue="default" wd="/">'
        f"<script>{script}</script></task></tasks></job></subjobs></workflow>"
    )
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "scripted"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), daemon.call("instance.get", {"id": launched["id"]})
    jobs = daemon.call("job.list", {"context": f"instance:{launched['id']}"})["jobs"]
    assert jobs[0]["command"][0] == str(daemon.state_dir / "scripts" / f"{launched['id']}-3")
    assert daemon.output(jobs[0]["id"]) == "script in /\n"


@pytest.fixture
def wf(make_daemon: Any) -> Daemon:
    return _corpus_daemon(make_daemon)


def _workflow_daemon(make_daemon: Any, config: str, daemon_extra: str = "", **workflows: str) -> Daemon:
    """A started daemon with these workflows, its notify socket drained (for kill9, start and terminate)."""
    daemon: Daemon = make_daemon(config, start=False, daemon_extra=daemon_extra)
    daemon.write_workflows(**workflows)
    daemon.start()
    attach(daemon)
    return daemon


def _document(daemon: Daemon, instance_id: int) -> etree._Element:
    reply = daemon.call("instance.get", {"id": instance_id, "format": "xml"})
    return safexml.parse(reply["xml"].encode())


def test_the_trivial_example_runs_and_gives_evqueues_instance_document(wf: Daemon) -> None:
    launched = wf.call("instance.launch", {"workflow": "trivial", "comment": "async one"})
    assert launched["status"] == "EXECUTING" and launched["workflow"] == "trivial"
    done = wf.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert done["status"] == "TERMINATED" and done["errors"] == 0
    expected = etree.fromstring((EXPECTED / "hello_instance.xml").read_bytes())
    assert_same_instance(normalised(_document(wf, launched["id"])), normalised(expected))


def test_the_loopdemo_example_runs_real_scripts_and_gives_evqueues_instance_document(wf: Daemon) -> None:
    launched = wf.call("instance.launch", {"workflow": "loopdemo", "parameters": {"count": "3"}})
    done = wf.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert done["status"] == "TERMINATED" and done["errors"] == 0, _document(wf, launched["id"])
    assert done["tags"] == ["big"]  # automatic-tag big: count(//file) > 2
    expected = etree.fromstring((EXPECTED / "loopdemo_instance.xml").read_bytes())
    assert_same_instance(normalised(_document(wf, launched["id"])), normalised(expected))
    # Every task ran as a jobd job in its queue, under the instance's context.
    jobs = wf.call("job.list", {"context": f"instance:{launched['id']}"})["jobs"]
    assert sorted(job["state"] for job in jobs) == ["succeeded"] * 3


def _documented_examples() -> dict[str, str]:
    """The example workflows of docs/workflows.md and jobd-workflow(5), as a reader would copy them."""
    repo = Path(__file__).resolve().parent.parent
    guide = (repo / "docs/workflows.md").read_text()
    page = (repo / "man/jobd-workflow.5").read_text()
    guide_example = re.search(r"```xml\n(<workflow>.*?</workflow>)\n```", guide, re.S)
    page_example = re.search(r"\.Sh EXAMPLES\n\.Bd -literal -offset indent\n(.*?)\.Ed", page, re.S)
    assert guide_example is not None and page_example is not None
    return {"guide": guide_example.group(1), "page": page_example.group(1)}


def test_the_documented_examples_run_as_written_and_pass_the_count_alone(make_daemon: Any) -> None:
    """Both examples list `count` files and process all but f1.txt. jobd-workflow(5) wrote its <input> over three
    lines, and text around a <value> is kept as written (as in evQueue): list.sh got "\\n            4\\n          "
    as its argument, which dash's `[` happens to accept and bash's refuses ("integer expression expected")."""
    config = (
        CORPUS / "corpus.toml"
    ).read_text() + '[task.resize]\ncommand = ["/bin/echo", "resize"]\nqueue = "default"\n'
    daemon = _workflow_daemon(
        make_daemon, config, daemon_extra=f'tasks_directory = "{CORPUS / "tasks"}"', **_documented_examples()
    )
    for name in ("guide", "page"):
        launched = daemon.call("instance.launch", {"workflow": name, "parameters": {"count": "4"}})
        done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
        assert (done["status"], done["errors"]) == ("TERMINATED", 0), name
        document = _document(daemon, launched["id"])
        assert [item.text for item in document.iterfind(".//task[@name='list']/input")] == ["4"], name
        ran = document.iterfind(".//job[@name='process']/tasks/task[@status='TERMINATED']")
        assert len(list(ran)) == 3, name  # f2.txt, f3.txt and f4.txt


def test_a_workflow_file_from_evqueues_git_repository_runs_as_its_definition(make_daemon: Any) -> None:
    """evQueue 3.3 keeps workflows in its git repository as `<workflow group comment><workflow>…</workflow>
    </workflow>` (Workflow::SaveToXML): jobd refused such a file (unknown attributes group and comment, an unknown
    element <workflow>). It runs as the definition inside, which is what instances and workflow.get see."""
    definition = (CORPUS / "loopdemo.xml").read_text().replace('<?xml version="1.0" encoding="UTF-8"?>', "").strip()
    git_file = f'<workflow group="demo" comment="from evQueue&apos;s git">\n{definition}\n</workflow>\n'
    config = (CORPUS / "corpus.toml").read_text()
    daemon = _workflow_daemon(make_daemon, config, daemon_extra=f'tasks_directory = "{CORPUS / "tasks"}"', git=git_file)
    launched = daemon.call("instance.launch", {"workflow": "git", "parameters": {"count": "3"}})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert (done["status"], done["errors"], done["tags"]) == ("TERMINATED", 0, ["big"]), _document(daemon, done["id"])
    document = _document(daemon, launched["id"])
    assert document.get("group") is None and len(document.findall("subjobs/job/subjobs/job")) == 3
    shown = safexml.parse(daemon.call("workflow.get", {"name": "git"})["xml"].encode())
    assert shown.get("group") is None and [child.tag for child in shown] == [
        "parameters",
        "custom-attributes",
        "automatic-tags",
        "subjobs",
    ]


def test_the_json_tree_shows_jobs_tasks_and_their_job_ids(wf: Daemon) -> None:
    launched = wf.call("instance.launch", {"workflow": "trivial"})
    wf.call("instance.wait", {"id": launched["id"], "timeout": 30})
    tree = wf.call("instance.get", {"id": launched["id"]})
    [job] = tree["jobs"]
    [task] = job["tasks"]
    assert job["name"] == "hello" and task["status"] == "TERMINATED" and task["retval"] == 0
    assert task["progression"] == 100 and task["tries"] == 1


def test_launch_errors_name_the_workflow_and_the_parameters(wf: Daemon) -> None:
    with pytest.raises(RemoteError) as unknown:
        wf.call("instance.launch", {"workflow": "nosuch"})
    assert unknown.value.code == "UNKNOWN_WORKFLOW" and "nosuch" in str(unknown.value)
    with pytest.raises(RemoteError) as missing:
        wf.call("instance.launch", {"workflow": "loopdemo"})
    assert missing.value.code == "INVALID_WORKFLOW_PARAMETERS" and "passed 0, expected 1" in str(missing.value)
    assert wf.call("instance.list", {})["total"] == 0  # refused launches leave nothing behind


def test_workflow_list_and_get(wf: Daemon) -> None:
    names = [w["name"] for w in wf.call("workflow.list")["workflows"]]
    assert "loopdemo" in names and "trivial" in names and "slow" in names
    got = wf.call("workflow.get", {"name": "loopdemo"})
    assert got["parameters"] == ["count"] and "<workflow>" in got["xml"]


def test_cancel_stops_queueing_and_the_instance_ends_once_its_running_task_ends(wf: Daemon) -> None:
    launched = wf.call("instance.launch", {"workflow": "slow", "parameters": {"seconds": "1"}})
    cancelled = wf.call("instance.cancel", {"id": launched["id"]})
    assert cancelled["id"] == launched["id"]
    done = wf.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert done["status"] == "TERMINATED"
    document = _document(wf, launched["id"])
    # The subjob never ran: nothing is queued after a cancel.
    assert document.find(".//job[@name='after']/tasks/task[@status='TERMINATED']") is None


def test_after_kill_9_finished_tasks_keep_their_results_and_a_running_one_follows_its_retry_rules(
    make_daemon: Any, tmp_path: Path
) -> None:
    daemon = _corpus_daemon(make_daemon)
    attach(daemon)  # kill9 and start drain the notify socket through it
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    launched = daemon.call("instance.launch", {"workflow": "resumable", "parameters": {"gate": str(gate)}})
    # Opening the FIFO for writing returns once a reader opened it: the second task is running (the first ended).
    with open(gate, "w"):
        kill9(daemon)
    start(daemon)  # recovery kills the orphaned reader; the task is lost and retried after retry_delay
    with open(gate, "w") as writer:  # the retry's reader
        writer.write("go\n")
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    document = _document(daemon, launched["id"])
    assert done["status"] == "TERMINATED" and done["errors"] == 0, etree.tostring(document)
    first = document.find(".//task[@name='first']")
    assert first is not None and first.get("retval") == "0" and first.findtext("output") == "first\n"
    assert len(first.findall("output")) == 1  # it ran once: its result was kept, not redone
    gated = document.find(".//task[@name='read-gate']")
    assert gated is not None and gated.get("retval") == "0"
    outputs = gated.findall("output")
    assert [o.get("retval") for o in outputs] == ["-1", "0"]  # the lost try, then the retry
    assert outputs[1].text == "go\n"


def first_then(first: str, then: str, parameters: str = "") -> str:
    """A workflow of two jobs, `first` then `then`, each with one task (their <task> elements)."""
    declared = "".join(f'<parameter name="{name}"/>' for name in parameters.split())
    return f"""<workflow>
  <parameters>{declared}</parameters>
  <subjobs>
    <job name="first">
      <tasks>{first}</tasks>
      <subjobs><job name="then"><tasks>{then}</tasks></job></subjobs>
    </job>
  </subjobs>
</workflow>
"""


CLIMBING_WORKFLOW = first_then(
    '<task name="one" path="/bin/true" queue="default"/>',
    """<task name="two" path="/bin/echo" queue="default">
      <input name="above"><value select="evqGetParentJob(number(evqGetWorkflowParameter('up')))/@name"/></input>
    </task>""",
    parameters="up",
)


def test_an_infinite_number_in_an_expression_aborts_its_task_and_the_restart_works(make_daemon: Any) -> None:
    """A launch parameter of 400 digits made evqGetParentJob() raise OverflowError out of the instance's step: the
    instance stayed EXECUTING for good, and its resumption then stopped every start of jobd. It is an error of the
    expression: the task is aborted, the instance ends with an error, and jobd restarts."""
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 2\n", start=False)
    daemon.write_workflows(climbing=CLIMBING_WORKFLOW)
    daemon.start()
    huge = daemon.call("instance.launch", {"workflow": "climbing", "parameters": {"up": "1" + "0" * 400}})
    done = daemon.call("instance.wait", {"id": huge["id"], "timeout": 30})
    task = _document(daemon, huge["id"]).find(".//task[@name='two']")
    assert task is not None and task.get("status") == "ABORTED", etree.tostring(task) if task is not None else None
    assert "is not a number of jobs to climb" in (task.get("error") or ""), etree.tostring(task)
    assert done["status"] == "TERMINATED" and done["errors"] == 1, done
    assert "Traceback" not in daemon.log()

    daemon.stop()
    daemon.start()  # READY=1 again
    fine = daemon.call("instance.launch", {"workflow": "climbing", "parameters": {"up": "0"}})
    assert daemon.call("instance.wait", {"id": fine["id"], "timeout": 30})["errors"] == 0
    two = _document(daemon, fine["id"]).find(".//task[@name='two']")
    assert two is not None and two.findtext("output") == "first\n", etree.tostring(two) if two is not None else None


def _run_alone(make_daemon: Any, **workflow: str) -> tuple[Daemon, dict[str, Any], etree._Element]:
    """A daemon with this one workflow (its default queue) runs an instance of it to its end: the daemon, what
    instance.wait answered, and the instance document."""
    daemon: Daemon = make_daemon("", start=False)
    daemon.write_workflows(**workflow)
    daemon.start()
    (name,) = workflow
    launched = daemon.call("instance.launch", {"workflow": name})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})
    return daemon, done, _document(daemon, launched["id"])


# evq functions as steps after text and attribute nodes: `//evqF()` reaches the text nodes of every element
# (descendant-or-self::node()); the others select text or attribute nodes outright.
STEPS_OVER_TEXT_WORKFLOW = """<workflow>
  <custom-attributes>
    <custom-attribute name="contexts" select="count(//text()/evqGetContext())"/>
    <custom-attribute name="outputs" select="count(//evqGetOutput('t'))"/>
  </custom-attributes>
  <subjobs>
    <job name="top" condition="count(/workflow/@name/evqGetParentJob()) = 0">
      <tasks><task name="t" path="/bin/echo t" queue="default"><input name="a">A</input></task></tasks>
      <subjobs>
        <job name="k" condition="count(//evqGetOutput('t')) = 1">
          <tasks><task name="u" path="/bin/echo" queue="default">
            <input name="inputs"><value select="count(evqGetParentJob()//evqGetInput('/bin/echo t', 'a'))"/></input>
            <input name="parents"><value select="count(//text()/evqGetParentJob())"/></input>
          </task></tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_evq_functions_after_text_and_attribute_nodes_apply_to_elements_only(make_daemon: Any) -> None:
    """`//evqGetOutput('t')` made the functions meet text nodes, `@name/evqGetParentJob()` an attribute: lxml's
    string results have no element methods, and the AttributeError ended the whole instance as a jobd bug (a
    top-level job's condition failed the launch itself, a custom attribute lost the instance's attributes and
    tags). Found by a soak test. Such nodes give nothing; the elements they are mixed with are used as usual."""
    daemon, done, document = _run_alone(make_daemon, steps=STEPS_OVER_TEXT_WORKFLOW)
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), etree.tostring(document)
    assert done["custom_attributes"] == [["contexts", "0"], ["outputs", "1"]]
    task = document.find(".//task[@name='u']")
    assert task is not None and task.get("retval") == "0", etree.tostring(document)
    assert task.findtext("output") == "1 0\n"
    assert "please report" not in daemon.log()


# XPath's document node, `/` (or `..` from the <workflow> root, the context of a top-level job's expressions).
THE_DOCUMENT_WORKFLOW = """<workflow>
  <subjobs>
    <job name="root" condition="/">
      <tasks><task name="r" path="/bin/echo" queue="default">
        <input name="first"><value select="name((/ | /workflow/subjobs)[1]/*)"/></input>
      </task></tasks>
    </job>
    <job name="up" condition="..">
      <tasks><task name="u" path="/bin/cat" queue="default"><stdin><copy select="/"/></stdin></task></tasks>
    </job>
    <job name="each" loop="/">
      <tasks><task name="e" path="/bin/true" queue="default"/></tasks>
    </job>
  </subjobs>
</workflow>
"""


def test_the_document_node_is_selected_by_conditions_values_and_copies_and_refused_as_a_loop(
    make_daemon: Any,
) -> None:
    """lxml leaves the document node out of the node-sets it returns: `condition="/"` (and `..` from the root) was
    false, the job SKIPPED; `(/ | x)[1]` was x's first node; `<copy select="/">` copied nothing; a loop over `/` ran no
    copy, its job gone without a word. As the evQueue protocol's xpathfilter answers it: a condition on it holds, a
    copy of it is what it holds (the <workflow> root), and a loop over it is aborted, saying what to select."""
    _, done, document = _run_alone(make_daemon, document=THE_DOCUMENT_WORKFLOW)
    shown = etree.tostring(document)
    root, up = document.find("subjobs/job[@name='root']"), document.find("subjobs/job[@name='up']")
    assert root is not None and root.get("details") == "Condition evaluates to true", shown
    assert root.findtext("tasks/task/output") == "workflow\n", shown  # the document's child, not <subjobs>'s
    assert up is not None and up.get("details") == "Condition evaluates to true", shown
    copied = up.findtext("tasks/task/output") or ""
    assert copied.startswith('<stdin mode="xml"><workflow'), shown
    assert etree.fromstring(copied)[0].find("subjobs/job[@name='each']") is not None, copied
    each = document.find("subjobs/job[@name='each']")  # not the one in the copy
    assert each is not None and each.get("status") == "ABORTED", shown
    assert "loop '/' selects the document node (/)" in (each.get("error") or each.get("details") or ""), shown
    assert (done["status"], done["errors"]) == ("TERMINATED", 1), done


@pytest.mark.parametrize(("lines", "aborted"), [(60_000, False), (250_000, True)], ids=["1.3 MB", "5.5 MB"])
def test_an_xml_output_is_read_whole_up_to_what_a_document_keeps(
    make_daemon: Any, tmp_path: Path, lines: int, aborted: bool
) -> None:
    """The instance document keeps a mebibyte of each stream as text; an XML output used to be parsed from that
    copy, so a valid document of 1.3 MB was "Invalid XML returned" and the workflow stopped. It is parsed whole up
    to 4 MiB; beyond, it is refused by name (the document, saved whole at each change, held the loop ~1 s at 15 MB)."""
    script = tmp_path / "list.sh"
    script.write_text(f'#!/bin/sh\necho "<files>"\nseq {lines} | sed \'s/.*/<file name="f&"\\/>/\'\necho "</files>"\n')
    script.chmod(0o755)
    counting = first_then(
        f'<task name="list" path="{script}" queue="default" output-method="XML"/>',
        """<task name="show" path="/bin/echo" queue="default">
      <input name="n"><value select="count(evqGetParentJob()/evqGetOutput('list')/files/file)"/></input>
    </task>""",
    )
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 2\n", start=False)
    daemon.write_workflows(counting=counting)
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "counting"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 60})
    document = _document(daemon, launched["id"])
    listing = document.find(".//task[@name='list']")
    assert listing is not None, etree.tostring(document)[:500]
    show = document.find(".//task[@name='show']")
    if aborted:
        assert listing.get("status") == "ABORTED" and done["errors"] == 1, etree.tostring(listing)[:500]
        assert listing.get("error") == (
            "Invalid XML returned (more than the 4194304 bytes of XML an instance document keeps of an output)"
        )
        assert len(listing.findtext("output") or "") < 1_100_000  # its text copy, cut at 1 MiB
        assert show is None or show.get("status") != "TERMINATED"
    else:
        assert listing.get("status") == "TERMINATED" and done["errors"] == 0, etree.tostring(listing)[:500]
        assert show is not None and show.findtext("output") == f"{lines}\n", etree.tostring(show)


def _listing_cut_short(daemon: Daemon, tmp_path: Path) -> tuple[etree._Element, dict[str, Any]]:
    """Run a workflow whose one task prints a valid XML document of 300 KB, with output-method="XML": its <task>
    element once the instance has ended, and the try of the task's job."""
    script = tmp_path / "list.sh"
    script.write_text('#!/bin/sh\necho "<files>"\nseq 20000 | sed \'s/.*/<file name="f&"\\/>/\'\necho "</files>"\n')
    script.chmod(0o755)
    daemon.write_workflows(
        listing=f'<workflow><subjobs><job name="one"><tasks><task name="list" path="{script}" '
        'queue="default" output-method="XML"/></tasks></job></subjobs></workflow>'
    )
    daemon.start()
    launched = daemon.call("instance.launch", {"workflow": "listing"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 60})
    assert (done["status"], done["errors"]) == ("TERMINATED", 1), done
    listing = _document(daemon, launched["id"]).find(".//task[@name='list']")
    assert listing is not None and listing.get("status") == "ABORTED", etree.tostring(listing)[:500]
    [job] = daemon.call("job.list", {"context": f"instance:{launched['id']}"})["jobs"]
    assert (job["state"], job["exit_code"]) == ("succeeded", 0)  # the task ran well; its output is not whole
    [attempt] = daemon.call("job.get", {"id": job["id"]})["tries"]
    assert attempt["truncated"] is True
    return listing, attempt


def test_an_xml_output_cut_short_by_a_full_output_disk_says_so(
    make_daemon: Any, full_output_disk: Path, tmp_path: Path
) -> None:
    """Before, the task was only "Invalid XML returned", as if the program had printed bad XML: nothing said that
    jobd had lost the end of a valid document for want of disk space."""
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 1\n", start=False)
    assert daemon.state_dir / "output" == full_output_disk
    listing, attempt = _listing_cut_short(daemon, tmp_path)
    kept = attempt["stdout_bytes"]
    assert 0 < kept <= 64 * 1024, attempt
    assert listing.get("error") == (
        f"Invalid XML returned (its output was cut at {kept} bytes: jobd could not write the rest, its disk was full)"
    )
    assert "No space left on device" in daemon.log()


def test_an_xml_output_cut_at_max_output_says_so(make_daemon: Any, tmp_path: Path) -> None:
    """This worked, untested: the cause named is the task's max_output ([daemon] max_output here)."""
    daemon: Daemon = make_daemon("[queue.default]\nconcurrency = 1\n", start=False, daemon_extra="max_output = 1000")
    listing, attempt = _listing_cut_short(daemon, tmp_path)
    assert attempt["stdout_bytes"] == 1000
    assert listing.get("error") == "Invalid XML returned (its output was cut at 1000 bytes: raise its max_output)"


def test_instance_list_filters_by_workflow_and_errors(wf: Daemon) -> None:
    ok = wf.call("instance.launch", {"workflow": "trivial"})
    wf.call("instance.wait", {"id": ok["id"], "timeout": 30})
    listed = wf.call("instance.list", {"workflow": "trivial"})
    assert [i["id"] for i in listed["instances"]] == [ok["id"]] and listed["total"] == 1
    assert wf.call("instance.list", {"errors": True})["total"] == 0
    # null does not filter, as for every other filter (docs/protocol.md); it was refused
    assert wf.call("instance.list", {"errors": None, "status": None})["total"] == 1


def test_exit_codes_merged_stderr_binary_output_bad_xml_and_remote_tasks(wf: Daemon) -> None:
    launched = wf.call("instance.launch", {"workflow": "edges"})
    done = wf.call("instance.wait", {"id": launched["id"], "timeout": 30})
    document = _document(wf, launched["id"])
    tasks = {task.get("name"): task for task in document.iter("task")}
    assert tasks["big"].get("retval") == "200"  # 0-255 exactly (evQueue stored -56)
    assert tasks["merged"].findtext("output") == "out\nerr\n" and not tasks["merged"].findtext("stderr")
    # Control characters and invalid UTF-8 are kept, made safe once: U+2401 for \x01, U+FFFD for \xff.
    assert tasks["binary"].findtext("output") == "a\u2401b\ufffdc"
    assert tasks["badxml"].get("status") == "ABORTED" and tasks["badxml"].get("error") == "Invalid XML returned"
    assert tasks["far"].get("status") == "ABORTED" and "remote execution is not supported" in tasks["far"].get("error")
    assert done["status"] == "TERMINATED" and done["errors"] == 3
    assert wf.log().count("\n") < 200  # a handful of lines, not one per odd byte


def test_debug_resume_runs_the_failed_task_again_and_what_follows_it(wf: Daemon, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    launched = wf.call("instance.launch", {"workflow": "flagged", "parameters": {"flag": str(flag)}, "comment": "c"})
    failed = wf.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert failed["status"] == "TERMINATED" and failed["errors"] == 1
    flag.touch()  # nothing fixed in the workflow: the same task succeeds on its second run
    resumed = wf.call("instance.debug_resume", {"id": launched["id"]})
    assert resumed["id"] != launched["id"] and resumed["workflow"] == "flagged"
    assert resumed["parameters"] == {"flag": str(flag)} and resumed["comment"] == "c"
    done = wf.call("instance.wait", {"id": resumed["id"], "timeout": 30})
    document = _document(wf, resumed["id"])
    assert done["status"] == "TERMINATED" and done["errors"] == 0, etree.tostring(document)
    assert document.get("id") == str(resumed["id"])
    first = document.find(".//task[@name='first']")
    assert first is not None and len(first.findall("output")) == 1 and first.findtext("output") == "first\n"
    check = document.find(".//task[@name='check']")
    assert check is not None and [o.get("retval") for o in check.findall("output")] == ["1", "0"]
    last = document.find(".//task[@name='last']")
    assert last is not None and last.get("retval") == "0" and last.findtext("output") == "last\n"
    # Only the two tasks that ran again are jobs of the new instance.
    jobs = wf.call("job.list", {"context": f"instance:{resumed['id']}"})["jobs"]
    assert sorted(job["command"][0] for job in jobs) == ["/bin/echo", "/usr/bin/test"]
    # The old instance is left as it ended.
    old = wf.call("instance.get", {"id": launched["id"]})
    assert old["errors"] == 1 and old["status"] == "TERMINATED"


def test_debug_resume_of_an_instance_jobd_ended_runs_its_executing_task_again(make_daemon: Any) -> None:
    """An instance that jobd ended by an error of its own (Instances._broken: its jobs cancelled, its document
    TERMINATED as it was) keeps its running task EXECUTING. Its debug-resume copied that task as it was, with no job
    behind it: the new instance never ended, and instance.cancel left it EXECUTING (found by a soak test). Such a
    document is made here from a finished one, as _broken leaves it, since no known error of jobd ends an instance."""
    daemon: Daemon = make_daemon("", start=False)
    daemon.write_workflows(
        once='<workflow><subjobs><job name="j"><tasks><task name="t" path="/bin/echo ran" queue="default"/>'
        "</tasks></job></subjobs></workflow>"
    )
    daemon.start()
    first = daemon.call("instance.launch", {"workflow": "once"})["id"]
    daemon.call("instance.wait", {"id": first, "timeout": 30})
    broken = _document(daemon, first)
    task = broken.find(".//task[@name='t']")
    assert task is not None
    for name in ("retval", "exit_time", "execution_time"):
        task.attrib.pop(name, None)
    for child in [*task.iterfind("output"), *task.iterfind("stderr"), *task.iterfind("log")]:
        task.remove(child)
    task.set("status", "EXECUTING")
    broken.set("errors", "1")
    daemon.stop()
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db, db:
        db.execute("UPDATE instance SET document = ?, errors = 1 WHERE id = ?", (etree.tostring(broken), first))
    daemon.start()

    resumed = daemon.call("instance.debug_resume", {"id": first})
    done = daemon.call("instance.wait", {"id": resumed["id"], "timeout": 30})
    document = _document(daemon, resumed["id"])
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), etree.tostring(document)
    assert [t.findtext("output") for t in document.iter("task")] == ["ran\n"]


def test_debug_resume_refuses_an_executing_instance_and_an_unknown_one(wf: Daemon) -> None:
    launched = wf.call("instance.launch", {"workflow": "slow", "parameters": {"seconds": "30"}})
    with pytest.raises(RemoteError) as executing:
        wf.call("instance.debug_resume", {"id": launched["id"]})
    assert executing.value.code == "INVALID_PARAMS" and "still executing" in str(executing.value)
    with pytest.raises(RemoteError) as unknown:
        wf.call("instance.debug_resume", {"id": 9999})
    assert unknown.value.code == "UNKNOWN_INSTANCE"
    wf.call("instance.cancel", {"id": launched["id"]})
    [job] = wf.call("job.list", {"context": f"instance:{launched['id']}"})["jobs"]
    wf.call("job.cancel", {"id": job["id"]})
    assert wf.call("instance.wait", {"id": launched["id"], "timeout": 30})["status"] == "TERMINATED"


# A custom attribute that selects two nodes: one pair each, under one name.
TWO_VALUED_ATTRIBUTE_WORKFLOW = """<workflow>
  <custom-attributes><custom-attribute name="who" select="//task/@name"/></custom-attributes>
  <subjobs><job name="top"><tasks>
    <task name="alpha" path="/bin/true" queue="default"/><task name="beta" path="/bin/true" queue="default"/>
  </tasks></job></subjobs>
</workflow>
"""


def test_a_custom_attribute_of_several_nodes_is_a_pair_each_and_each_value_finds_the_instance(
    make_daemon: Any,
) -> None:
    """Why `custom_attributes` is a list of pairs in an instance and an object in instance.list (docs/protocol.md):
    the data has a name once per node selected, as evQueue's rows; the filter, as evQueue's customattribute_NAME,
    one value per name, matching any of the pairs."""
    daemon, done, _ = _run_alone(make_daemon, two=TWO_VALUED_ATTRIBUTE_WORKFLOW)
    assert done["custom_attributes"] == [["who", "alpha"], ["who", "beta"]], done

    def ids(**where: Any) -> list[int]:
        return [i["id"] for i in daemon.call("instance.list", where)["instances"]]

    assert ids(custom_attributes={"who": "alpha"}) == ids(custom_attributes={"who": "beta"}) == [done["id"]]
    assert ids(custom_attributes={"who": "gamma"}) == []


def test_custom_attributes_are_stored_and_instances_filter_on_them_and_on_parameters(wf: Daemon) -> None:
    three = wf.call("instance.launch", {"workflow": "loopdemo", "parameters": {"count": "3"}})
    two = wf.call("instance.launch", {"workflow": "loopdemo", "parameters": {"count": "2"}})
    wf.call("instance.wait", {"id": three["id"], "timeout": 30})
    done = wf.call("instance.wait", {"id": two["id"], "timeout": 30})
    assert done["custom_attributes"] == [["nfiles", "2"]]
    assert wf.call("instance.get", {"id": three["id"]})["custom_attributes"] == [["nfiles", "3"]]

    def ids(**where: Any) -> list[int]:
        return [i["id"] for i in wf.call("instance.list", where)["instances"]]

    assert ids(custom_attributes={"nfiles": "3"}) == [three["id"]]
    assert ids(custom_attributes={"nfiles": "2"}) == [two["id"]]
    assert ids(custom_attributes={"nfiles": "4"}) == []
    assert ids(parameters={"count": "2"}) == [two["id"]]
    assert ids(parameters={"count": "3"}, custom_attributes={"nfiles": "3"}) == [three["id"]]
    assert ids(parameters={"count": "3"}, custom_attributes={"nfiles": "2"}) == []
    assert ids(parameters={"nosuch": "3"}) == []
    assert ids(workflow="loopdemo") == [two["id"], three["id"]]
    with pytest.raises(RemoteError) as bad:
        wf.call("instance.list", {"parameters": {"count": 3}})
    assert bad.value.code == "INVALID_PARAMS"


def _looping_daemon(make_daemon: Any, tmp_path: Path, items: int, history: str = "") -> Daemon:
    """A workflow whose first task lists `items` items, then runs one task per item, one at a time; the list also
    carries 400 kB of padding, so that each save of the instance document costs a few milliseconds and the saves are
    spaced out (instances.SAVE_SPACING): the document saved lags behind the tasks."""
    script = tmp_path / "items.sh"
    script.write_text(
        "#!/bin/sh\n"
        'echo "<items><pad>"\n'
        "head -c 400000 /dev/zero | tr '\\0' x\n"
        'echo "</pad>"\n'
        f"seq {items} | sed 's/.*/<i>&<\\/i>/'\n"
        'echo "</items>"\n'
    )
    script.chmod(0o755)
    looping = f"""<workflow><subjobs><job name="list">
  <tasks><task name="list" path="{script}" queue="serial" output-method="XML"/></tasks>
  <subjobs><job name="each" loop="evqGetParentJob()/evqGetOutput('list')/items/i">
    <tasks><task name="each" task="echo"><input name="n"><value select="."/></input></task></tasks>
  </job></subjobs>
</job></subjobs></workflow>"""
    # An attempt lost to a kill -9 is tried again, within its job. Each run of an item is counted in runs.log.
    echo = f'["/bin/sh", "-c", "echo $0 >> {tmp_path}/runs.log; echo $0"]'
    config = f'[queue.serial]\nconcurrency = 1\n[task.echo]\ncommand = {echo}\nqueue = "serial"\n'
    config += "retry = { times = 1 }\n"
    return _workflow_daemon(make_daemon, config, history, looping=looping)


def _launch_until_job_ended(daemon: Daemon, workflow: str, job_id: int) -> int:
    """Launch `workflow` and return its instance id once the job `job_id` (one of its tasks') has succeeded."""
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        launched = daemon.call("instance.launch", {"workflow": workflow})
        ended = next_matching(client, lambda e: e["job"]["id"] == job_id and e["job"]["state"] == "succeeded", 60)
    assert ended["job"]["context"] == f"instance:{launched['id']}", ended
    return int(launched["id"])


def _assert_each_item_ran_once(daemon: Daemon, instance_id: int, items: int) -> None:
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": 120}, timeout=130)
    assert done["status"] == "TERMINATED" and done["errors"] == 0, done
    document = _document(daemon, instance_id)
    tasks = document.findall(".//job[@name='each']/tasks/task")
    assert len(tasks) == items
    for number, task in enumerate(tasks, 1):
        assert task.get("status") == "TERMINATED" and task.get("retval") == "0", etree.tostring(task)
        assert [output.text for output in task.findall("output")] == [f"{number}\n"], etree.tostring(task)
    jobs = daemon.call("job.list", {"context": f"instance:{instance_id}", "limit": 1000})["jobs"]
    assert len(jobs) == items + 1  # the list, and one job per item: none ran twice
    assert sorted(job["state"] for job in jobs) == ["succeeded"] * (items + 1)


def test_a_kill_9_in_the_middle_of_a_long_loop_resumes_it_and_runs_each_item_once(
    make_daemon: Any, tmp_path: Path
) -> None:
    """The document of a busy instance is saved less often than it changes (at most a tenth of jobd's time goes to
    saving it), so after a kill -9 the saved document is behind the jobs: the restart ends the tasks whose jobs
    ended from the jobs' records and finds the jobs already submitted by their keys. Each item runs exactly once."""
    items = 300
    daemon = _looping_daemon(make_daemon, tmp_path, items)
    # Job 1 lists; jobs 2..301 are the items, submitted at once and run in order in a queue of one slot.
    instance_id = _launch_until_job_ended(daemon, "looping", 151)
    kill9(daemon)
    start(daemon)
    _assert_each_item_ran_once(daemon, instance_id, items)


SCRIPT_IN_HELD_QUEUE = """<workflow><subjobs><job name="j"><tasks>
<task type="SCRIPT" name="s" queue="held"><script>#!/bin/sh
echo never
</script></task>
</tasks></job></subjobs></workflow>"""


def test_an_instance_that_cannot_be_resumed_ends_and_leaves_no_script_behind(make_daemon: Any) -> None:
    """A document that cannot be read back at a start ends its instance in error; the script files of its SCRIPT
    tasks stayed in state_dir/scripts for ever."""
    daemon = make_daemon("[queue.default]\n[queue.held]\npaused = true\n")
    daemon.write_workflows(scripted=SCRIPT_IN_HELD_QUEUE)
    daemon.call("daemon.reload")
    instance_id = daemon.call("instance.launch", {"workflow": "scripted"})["id"]
    scripts = daemon.state_dir / "scripts"
    assert [path.name for path in scripts.iterdir()] == [f"{instance_id}-3"]  # written as its task (node 3) was queued
    assert daemon.stop() == 0
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db, db:
        db.execute("UPDATE instance SET document = ? WHERE id = ?", (b"<workflow", instance_id))  # damaged
    daemon.start()
    [listed] = daemon.call("instance.list", {})["instances"]
    assert (listed["id"], listed["status"]) == (instance_id, "TERMINATED")
    assert f"instance={instance_id} cannot be resumed" in daemon.log()
    assert list(scripts.iterdir()) == []


def test_scripts_left_for_want_of_descriptors_until_a_stop_are_removed_by_the_next_start(make_daemon: Any) -> None:
    """An instance's end that cannot list state_dir/scripts for want of a descriptor removes its scripts a second
    later; a stop meanwhile (still short) left them there for ever, and its retry timer outlived the store's close.
    The next start removes them."""
    daemon = make_daemon("[queue.default]\n[queue.held]\npaused = true\n")
    daemon.write_workflows(scripted=SCRIPT_IN_HELD_QUEUE)
    daemon.call("daemon.reload")
    instance_id = daemon.call("instance.launch", {"workflow": "scripted"})["id"]
    scripts = daemon.state_dir / "scripts"
    assert [path.name for path in scripts.iterdir()] == [f"{instance_id}-3"]
    with daemon.client() as root:
        root.call("ping")  # connected before the shortage
        with out_of_descriptors(daemon):
            root.call("instance.cancel", {"id": instance_id})
            assert f"cannot remove the scripts of instance {instance_id} now: Too many open files" in daemon.log()
            assert daemon.stop() == 0
    assert [path.name for path in scripts.iterdir()] == [f"{instance_id}-3"]  # the shortage lasted to the end
    daemon.start()
    assert list(scripts.iterdir()) == []
    assert f"removing the scripts left of ended instances {instance_id}" in daemon.log()
    assert daemon.call("instance.get", {"id": instance_id})["status"] == "TERMINATED"


def test_a_stop_saves_the_document_as_it_is(make_daemon: Any, tmp_path: Path) -> None:
    """A stop saves every instance's document at once, whatever is left of its spacing between saves: read from the
    database after the stop, the document shows ended exactly the tasks whose jobs ended before it."""
    items = 200
    daemon = _looping_daemon(make_daemon, tmp_path, items)
    instance_id = _launch_until_job_ended(daemon, "looping", 101)
    assert terminate(daemon) == 0
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db:
        succeeded = {
            job_id
            for (job_id,) in db.execute(
                "SELECT id FROM job WHERE context = ? AND state = 'succeeded'", (f"instance:{instance_id}",)
            )
        }
        [(status, document)] = db.execute("SELECT status, document FROM instance WHERE id = ?", (instance_id,))
    assert status == "EXECUTING" and len(succeeded) > 100
    saved = safexml.parse(document)
    ended = {
        int(task.findtext("output") or "0")
        for task in saved.findall(".//job[@name='each']/tasks/task")
        if task.get("status") == "TERMINATED"
    }
    assert ended == {job_id - 1 for job_id in succeeded if job_id > 1}  # item n is job n + 1

    start(daemon)
    _assert_each_item_ran_once(daemon, instance_id, items)


def _padded_daemon(make_daemon: Any, tmp_path: Path, config: str, **workflows: str) -> Daemon:
    """A daemon whose workflows' PADDED task prints 3.5 MB of XML: each save of the instance document then takes
    tens of milliseconds, and the saves of a busy instance are spaced out (instances.SAVE_SPACING)."""
    padded = tmp_path / "padded.sh"
    padded.write_text("#!/bin/sh\necho '<big><pad>'\nhead -c 3500000 /dev/zero | tr '\\0' x\necho '</pad></big>'\n")
    padded.chmod(0o755)
    return _workflow_daemon(
        make_daemon, config, **{name: text.replace("PADDED", str(padded)) for name, text in workflows.items()}
    )


def _stored_document(daemon: Daemon, instance_id: int) -> etree._Element:
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db:
        [(document,)] = db.execute("SELECT document FROM instance WHERE id = ?", (instance_id,))
    return safexml.parse(document)


# Two jobs side by side, each with a subjob; the second's task ends first, so its subjob is numbered first.
CROSSED = """<workflow><subjobs><job name="padded">
  <tasks><task name="padded" path="PADDED" queue="q" output-method="XML"/></tasks>
  <subjobs>
    <job name="J1"><tasks><task name="a" path="/bin/sleep 0.05" queue="q"/></tasks>
      <subjobs><job name="J1s"><tasks><task name="c" path="/bin/echo C" queue="q"/></tasks></job></subjobs>
    </job>
    <job name="J2"><tasks><task name="b" path="/bin/true" queue="q"/></tasks>
      <subjobs>
        <job name="J2s"><tasks><task name="d" path="/bin/sh -c 'echo D; exit 3'" queue="q"/></tasks></job>
      </subjobs>
    </job>
  </subjobs>
</job></subjobs></workflow>"""


def test_after_kill_9_the_ends_saved_late_are_replayed_in_the_order_they_happened(
    make_daemon: Any, tmp_path: Path
) -> None:
    """A task's end numbers the nodes it starts, and a task's key holds its number. A restart from a document
    saved before some ends told them in document order, so the subjobs here were numbered the other way round and
    each task's key found the other's job: c showed D's output and exit code, and d C's. The ends are now told in
    the order their jobs ended. (That b ends before a, whose task sleeps 50 ms, is what makes the old code fail
    here; the test holds whichever ends first.)"""
    daemon = _padded_daemon(make_daemon, tmp_path, "[queue.q]\nconcurrency = 4\n", crossed=CROSSED)
    # Jobs: 1 padded, 2 a, 3 b, 4 d (b ends first), 5 c.
    instance_id = _launch_until_job_ended(daemon, "crossed", 5)
    kill9(daemon)
    start(daemon)
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": 60}, timeout=70)
    assert done["status"] == "TERMINATED" and done["errors"] == 1, done
    document = _document(daemon, instance_id)
    ended = {task.get("name"): (task.get("retval"), task.findtext("output")) for task in document.iter("task")}
    assert (ended["c"], ended["d"]) == (("0", "C\n"), ("3", "D\n")), ended
    jobs = daemon.call("job.list", {"context": f"instance:{instance_id}", "limit": 100})["jobs"]
    assert len(jobs) == 5


CANCELLED = """<workflow><subjobs><job name="padded">
  <tasks><task name="padded" path="PADDED" queue="q" output-method="XML"/></tasks>
  <subjobs><job name="j"><tasks>
    <task name="t1" path="/bin/sleep 30" queue="one"/>
    <task name="t2" path="/bin/echo t2 ran" queue="one" retry_times="2" retry_delay="1"/>
    <task name="t3" path="/bin/echo t3 ran" queue="one"/>
  </tasks></job></subjobs>
</job></subjobs></workflow>"""


def test_a_cancel_is_saved_before_it_is_answered(make_daemon: Any, tmp_path: Path) -> None:
    """Its queued jobs are cancelled from the next pass of the loop on. A crash then could find them cancelled and
    the document not cancelling (its save was spaced out), and t2's retry ran it after the restart; or, saved but
    killed before the jobs were cancelled, find them still queued, and run them. Now the document is saved before
    the answer, and a restart cancels the jobs of tasks a cancel aborted."""
    config = "[queue.q]\nconcurrency = 4\n[queue.one]\nconcurrency = 1\n"
    daemon = _padded_daemon(make_daemon, tmp_path, config, cancelled=CANCELLED)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        instance_id = int(daemon.call("instance.launch", {"workflow": "cancelled"})["id"])
        next_matching(client, lambda e: e["job"]["id"] == 2 and e["job"]["state"] == "running", 60)  # t1
    daemon.call("instance.cancel", {"id": instance_id})
    kill9(daemon)
    saved = _stored_document(daemon, instance_id)
    assert saved.get("cancelling") == "yes"
    assert {task.get("name"): task.get("status") for task in saved.iter("task")} == {
        "padded": "TERMINATED",
        "t1": "EXECUTING",
        "t2": "ABORTED",
        "t3": "ABORTED",
    }
    start(daemon)
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": 60}, timeout=70)
    assert done["status"] == "TERMINATED"
    jobs = daemon.call("job.list", {"context": f"instance:{instance_id}", "limit": 100})["jobs"]
    assert len(jobs) == 4 and not any(job["command"][-1] == "ran" and job["state"] == "succeeded" for job in jobs)


DAY = 86400.0

RETRIED = """<workflow><subjobs><job name="j"><tasks>
  <task name="slow" task="slow"/>
  <task name="flaky" path="/bin/false" queue="q" retry_delay="1" retry_times="1"/>
</tasks></job></subjobs></workflow>"""


def test_a_retry_due_while_jobd_stops_is_kept_for_the_next_start(make_daemon: Any) -> None:
    """flaky failed and is to be tried again a second later; the stop waits 4 s for slow (it ignores SIGTERM). The
    retry fell due during the stop, its submit was refused, and the try was spent: flaky ended with retval -1 and
    was never tried again. Now no retry is armed once jobd stops, and the next start arms it from retry_at."""
    # slow's first attempt outlasts the stop's wait (kill_grace); the one the next start runs (JOBD_ATTEMPT 2), which
    # only holds the instance open, ends at once.
    slow = "trap '' TERM; [ \"$JOBD_ATTEMPT\" != 1 ] || sleep 8"
    config = (
        f'[queue.q]\nconcurrency = 4\n[task.slow]\ncommand = ["/bin/sh", "-c", {json.dumps(slow)}]\n'
        'queue = "q"\nkill_grace = 4\n'
    )
    daemon = _workflow_daemon(make_daemon, config, retried=RETRIED)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        instance_id = int(daemon.call("instance.launch", {"workflow": "retried"})["id"])
        next_matching(client, lambda e: e["job"]["id"] == 2 and e["job"]["state"] == "failed", 20)  # flaky's try
    assert terminate(daemon) == 0
    flaky = _stored_document(daemon, instance_id).find(".//task[@name='flaky']")
    assert flaky is not None and flaky.get("retry_at") is not None, etree.tostring(flaky)
    assert [output.get("retval") for output in flaky.findall("output")] == ["1"]
    start(daemon)
    daemon.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=40)
    flaky = _document(daemon, instance_id).find(".//task[@name='flaky']")
    assert flaky is not None
    assert [output.get("retval") for output in flaky.findall("output")] == ["1", "1"]  # tried again: /bin/false


FAILS_ONCE = """<workflow><subjobs><job name="j"><tasks>
  <task name="flaky" path="/bin/sh -c 'test $JOBD_ATTEMPT -gt 1 || test -e $0 || ! touch $0' MARK" queue="q"
    retry_delay="3600" retry_times="1"/>
</tasks></job></subjobs></workflow>"""


def test_a_retry_does_not_wait_longer_than_its_delay_when_the_clock_went_back_while_jobd_was_down(
    make_daemon: Any, tmp_path: Path
) -> None:
    """The clock set back (an NTP step after a boot with the clock ahead, a wrong clock corrected) while jobd was
    stopped: a task waiting to be retried was due at its retry-at-unix, as far ahead of the new clock as the clock
    went back, and the instance waited that long (a day here) on top of the retry's delay. The wait is now at most
    the delay (as a job's back-off is), counted from the start."""
    mark = tmp_path / "failed-once"
    daemon = _workflow_daemon(make_daemon, "[queue.q]\n", flaky=FAILS_ONCE.replace("MARK", str(mark)))
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        instance_id = int(daemon.call("instance.launch", {"workflow": "flaky"})["id"])
        next_matching(client, lambda e: e["job"]["state"] == "failed", 20)  # its first try
    assert terminate(daemon) == 0
    database = daemon.state_dir / "jobd.sqlite3"
    document = _stored_document(daemon, instance_id)
    flaky = document.find(".//task[@name='flaky']")
    assert flaky is not None and flaky.get("retry-at-unix") is not None, etree.tostring(flaky)
    # As the clock a day ahead would have saved it for a retry a second after the failure.
    flaky.set("retry_delay", "1")
    flaky.set("retry-at-unix", repr(float(flaky.get("retry-at-unix", "")) - 3600 + DAY + 1))
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("UPDATE instance SET document = ? WHERE id = ?", (etree.tostring(document), instance_id))
        db.commit()
    start(daemon)
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 0), done
    flaky = _document(daemon, instance_id).find(".//task[@name='flaky']")
    assert flaky is not None
    assert [output.get("retval") for output in flaky.findall("output")] == ["1", "0"]


def test_a_function_used_as_a_path_step_is_refused_with_what_to_write_instead(wf: Daemon) -> None:
    """evQueue's dialect took `file/name()` (a function as a step, XPath 2 style); XPath 1.0 does not, and the
    reload was refused with libxml2's bare "Invalid expression", which named neither the step nor its fix."""
    before = sorted(w["name"] for w in wf.call("workflow.list")["workflows"])
    path = wf.config_dir / "workflows" / "named.xml"
    path.write_text(
        "<workflow><subjobs>\n"
        "<job name=\"j\" condition=\"evqGetOutput('list')/files/file/name() = 'f1.txt'\"><tasks>"
        '<task name="t" path="/bin/true" queue="default"/></tasks></job>\n'
        "</subjobs></workflow>\n"
    )
    with pytest.raises(RemoteError) as refused:
        wf.call("daemon.reload")
    expression = "evqGetOutput('list')/files/file/name() = 'f1.txt'"
    assert refused.value.code == "CONFIG_INVALID", refused.value
    assert refused.value.message == (
        f'{path}:2: <job> attribute condition="{expression}": invalid XPath expression "{expression}": name() at '
        "character 33 is a path step (evqGetOutput('list')/files/file/name()), which XPath 1.0 does not allow: "
        "write name(evqGetOutput('list')/files/file) for the name of its first node, or "
        "evqGetOutput('list')/files/file[name() = '…'] for the nodes whose name is '…' "
        "(evQueue's evqGetOutput('list')/files/file/name() was the name of each node)"
    ), refused.value.message
    # Refused whole: the daemon goes on with the workflows it had.
    assert sorted(w["name"] for w in wf.call("workflow.list")["workflows"]) == before
    path.write_text(path.read_text().replace("files/file/name() = 'f1.txt'", "files/file[name() = 'f1.txt']"))
    wf.call("daemon.reload")
    assert "named" in [w["name"] for w in wf.call("workflow.list")["workflows"]]


def test_a_retry_schedule_with_a_fraction_of_a_second_retries_its_task(wf: Daemon) -> None:
    """config.md allows a level's `delay` to be any number > 0, as corpus.toml's `patient` (0.5 s x 1): the task's
    first failure read the level's "0.5" with int() and the instance ended by an error in jobd, with the task never
    tried again and the document left EXECUTING."""
    source = (
        '<workflow><subjobs><job name="j"><tasks>'
        '<task name="patient" path="fail.sh 2" queue="default" retry_schedule="patient"/>'
        "</tasks></job></subjobs></workflow>"
    )
    (wf.config_dir / "workflows" / "patient.xml").write_text(source)
    wf.call("daemon.reload")
    launched = wf.call("instance.launch", {"workflow": "patient"})
    done = wf.call("instance.wait", {"id": launched["id"], "timeout": 30})
    assert (done["status"], done["errors"]) == ("TERMINATED", 1)
    document = _document(wf, launched["id"])
    assert document.get("status") == "TERMINATED"
    task = document.find(".//task[@name='patient']")
    assert task is not None
    assert [output.get("retval") for output in task.findall("output")] == ["2", "2"]  # tried again once
    # past its last level, as evQueue leaves fast_then_slow at level 3
    assert (task.get("retry_schedule_level"), task.get("retry_delay"), task.get("retry_times")) == ("2", "0.5", "0")
    assert "error in jobd" not in wf.log()


FAILING_EARLY = """<workflow>
  <parameters><parameter name="gate"/></parameters>
  <subjobs><job name="padded">
    <tasks><task name="padded" path="PADDED" queue="q" output-method="XML"/></tasks>
    <subjobs><job name="j"><tasks>
      <task name="fails" path="/bin/false" queue="q"/>
      <task name="waits" path="/usr/bin/head -n 1" queue="q">
        <input name="gate"><value select="evqGetWorkflowParameter('gate')"/></input>
      </task>
    </tasks></job></subjobs>
  </job></subjobs>
</workflow>"""


def test_the_first_error_of_a_busy_instance_is_saved_at_once_for_the_errors_filter(
    make_daemon: Any, tmp_path: Path
) -> None:
    """instance.list's `errors` filter reads the store, where a large instance's document, and its error count, are
    saved spaced out: its first error is saved at once."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    daemon = _padded_daemon(make_daemon, tmp_path, "[queue.q]\nconcurrency = 4\n", failing=FAILING_EARLY)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        launched = daemon.call("instance.launch", {"workflow": "failing", "parameters": {"gate": str(gate)}})
        next_matching(client, lambda e: e["job"]["id"] == 2 and e["job"]["state"] == "failed", 60)
    listed = daemon.call("instance.list", {"errors": True, "status": "EXECUTING"})["instances"]
    assert [(instance["id"], instance["errors"]) for instance in listed] == [(launched["id"], 1)]
    with open(gate, "w") as writer:
        writer.write("go\n")
    assert daemon.call("instance.wait", {"id": launched["id"], "timeout": 30})["errors"] == 1


def test_with_keep_last_0_a_kill_9_in_the_middle_of_a_long_loop_loses_no_task_and_runs_none_twice(
    make_daemon: Any, tmp_path: Path
) -> None:
    """keep_last = 0 expires a job as it finishes. The restart replays the ends its instance's saved document does
    not show yet from the jobs, and finds the jobs it submitted by their keys: a job expired by then made its task
    lost, or run again. A job is held in the history until its end is saved. (Without the hold, the trim due in the
    pass of the loop where a job ended also took the output of one ending beside it before its instance read it.)"""
    items = 300
    daemon = _looping_daemon(make_daemon, tmp_path, items, history="history = { keep_last = 0 }")
    instance_id = _launch_until_job_ended(daemon, "looping", 151)
    kill9(daemon)
    start(daemon)
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": 120}, timeout=130)
    assert done["status"] == "TERMINATED" and done["errors"] == 0, done
    tasks = _document(daemon, instance_id).findall(".//job[@name='each']/tasks/task")
    assert [task.findtext("output") for task in tasks] == [f"{number}\n" for number in range(1, items + 1)]
    runs = Counter((tmp_path / "runs.log").read_text().split())
    assert set(runs) == {str(number) for number in range(1, items + 1)}
    # Once each, but for the one running at the kill: its attempt was lost and tried again, within its job.
    assert sorted(runs.values())[-2:] in ([1, 1], [1, 2]), runs.most_common(3)


def _live_document(daemon: Daemon, instance_id: int) -> bytes:
    return str(daemon.call("instance.get", {"id": instance_id, "format": "xml"})["xml"]).encode()


# Holds an instance open across a crash: its job waits in a paused queue (resumed after the restart).
HOLD = '<job name="H"><tasks><task name="hold" path="/bin/true" queue="held"/></tasks></job>'
HELD = "[queue.q]\nconcurrency = 4\n[queue.held]\nconcurrency = 1\npaused = true\n"


def _crash_with_document(daemon: Daemon, instance_id: int, document: bytes) -> dict[str, Any]:
    """kill -9, then put `document` (the instance as it was earlier) in the store as its last save, and start
    again: a crash while the saved document was that far behind, made without waiting for a spaced save. Then
    let the held task run (HOLD); returns the instance once it has ended."""
    kill9(daemon)
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as db, db:
        [(status,)] = db.execute("SELECT status FROM instance WHERE id = ?", (instance_id,))
        assert status == "EXECUTING"
        db.execute("UPDATE instance SET document = ? WHERE id = ?", (document, instance_id))
    start(daemon)
    daemon.call("queue.resume", {"name": "held"})
    return dict(daemon.call("instance.wait", {"id": instance_id, "timeout": 60}, timeout=70))


def _gate(path: Path) -> str:
    return f"""<input name="g"><value select="'{path}'"/></input>"""


def test_a_retry_that_fell_due_before_the_crash_is_replayed_among_the_ends(make_daemon: Any, tmp_path: Path) -> None:
    """a fails, is tried again and succeeds, and c follows it; then b ends, and d follows it. From a document saved
    while a and b ran, the restart armed a's retry as a timer, which fired after the ends were all replayed: b's
    subjob was numbered first, and c and d found each other's jobs. A retry whose job exists is now tried at once
    during the replay, so its job's end takes its place among the others'."""
    gate_a, gate_b, flag = tmp_path / "gate-a", tmp_path / "gate-b", tmp_path / "flag"
    for gate in (gate_a, gate_b):
        os.mkfifo(gate)
    crossed = f"""<workflow><subjobs>{HOLD}
  <job name="J1">
    <tasks><task name="a" path="/bin/sh -c 'head -n 1 &quot;$0&quot;; test -e {flag} || {{ touch {flag}; exit 1; }}'"
      queue="q" retry_times="1" retry_delay="1">{_gate(gate_a)}</task></tasks>
    <subjobs><job name="J1s"><tasks><task name="c" path="/bin/echo C" queue="q"/></tasks></job></subjobs>
  </job>
  <job name="J2">
    <tasks><task name="b" path="/usr/bin/head -n 1" queue="q">{_gate(gate_b)}</task></tasks>
    <subjobs>
      <job name="J2s"><tasks><task name="d" path="/bin/sh -c 'echo D; exit 3'" queue="q"/></tasks></job>
    </subjobs>
  </job>
</subjobs></workflow>"""
    daemon = _workflow_daemon(make_daemon, HELD, crossed=crossed)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        instance_id = int(daemon.call("instance.launch", {"workflow": "crossed"})["id"])
        next_matching(client, lambda e: e["job"]["id"] == 3 and e["job"]["state"] == "running", 30)  # a, then b
        behind = _live_document(daemon, instance_id)  # a and b running
        with open(gate_a, "w") as writer:  # a's first try fails
            writer.write("go\n")
        retry = f"instance:{instance_id}:task:5:try:2"  # a second later
        next_matching(client, lambda e: e["job"]["key"] == retry and e["job"]["state"] == "running", 30)
        with open(gate_a, "w") as writer:  # and succeeds
            writer.write("go\n")
        next_matching(client, lambda e: e["job"]["command"] == ["/bin/echo", "C"] and e["job"]["state"] == "succeeded")
        with open(gate_b, "w") as writer:
            writer.write("go\n")
        next_matching(client, lambda e: e["job"]["command"][-1] == "echo D; exit 3" and e["job"]["state"] == "failed")
    jobs_before = daemon.call("job.list", {"context": f"instance:{instance_id}", "limit": 100})["jobs"]
    done = _crash_with_document(daemon, instance_id, behind)
    document = _document(daemon, instance_id)
    ended = {task.get("name"): (task.get("retval"), task.findtext("output")) for task in document.iter("task")}
    expected = {"hold": ("0", ""), "a": ("0", "go\n"), "b": ("0", "go\n"), "c": ("0", "C\n"), "d": ("3", "D\n")}
    assert ended == expected, ended
    assert done["errors"] == 1
    jobs = daemon.call("job.list", {"context": f"instance:{instance_id}", "limit": 100})["jobs"]
    assert len(jobs) == len(jobs_before) == 6  # hold, a twice, b, c, d: nothing ran again


def test_a_restart_numbers_nodes_as_the_first_run_did_though_a_loop_over_nothing_took_a_number(
    make_daemon: Any, tmp_path: Path
) -> None:
    """E loops over nothing: it is numbered, then removed. Its number was the highest when the document was saved,
    and a restored document numbered from its highest number: c was numbered one lower on the restart than in the
    first run, its key found nothing, and it ran twice. The document now keeps the next number (next-evqid)."""
    log, gate = tmp_path / "c.log", tmp_path / "gate"
    os.mkfifo(gate)
    gapped = f"""<workflow><subjobs>{HOLD}<job name="A">
  <tasks><task name="a" path="/bin/true" queue="q"/></tasks>
  <subjobs>
    <job name="B">
      <tasks><task name="b" path="/usr/bin/head -n 1" queue="q">{_gate(gate)}</task></tasks>
      <subjobs>
        <job name="C"><tasks><task name="c" path="/bin/sh -c 'echo ran >> {log}'" queue="q"/></tasks></job>
      </subjobs>
    </job>
    <job name="E" loop="/nothing"><tasks><task name="e" path="/bin/echo e" queue="q"/></tasks></job>
  </subjobs>
</job></subjobs></workflow>"""
    daemon = _workflow_daemon(make_daemon, HELD, gapped=gapped)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        instance_id = int(daemon.call("instance.launch", {"workflow": "gapped"})["id"])
        next_matching(client, lambda e: e["job"]["id"] == 3 and e["job"]["state"] == "running", 30)  # hold, a, b
        behind = _live_document(daemon, instance_id)  # b running, E numbered and gone
        with open(gate, "w") as writer:
            writer.write("go\n")
        next_matching(client, lambda e: e["job"]["id"] == 4 and e["job"]["state"] == "succeeded", 30)  # c
    assert _crash_with_document(daemon, instance_id, behind)["errors"] == 0
    assert log.read_text() == "ran\n"
    assert len(daemon.call("job.list", {"context": f"instance:{instance_id}", "limit": 100})["jobs"]) == 4


def _toml_retry_daemon(make_daemon: Any, tmp_path: Path, gate: Path, delay: int = 600) -> Daemon:
    """A TOML task whose `retry` tries a failure again after `delay` (by default a long one): each run is a line of
    runs.log, and waits for `gate` (a lock the test may hold)."""
    fails = f'["/bin/sh", "-c", "echo run >> {tmp_path}/runs.log; flock {gate} true; exit 3"]'
    config = f'[queue.q]\nconcurrency = 2\n[task.fails]\ncommand = {fails}\nqueue = "q"\n'
    config += f"retry = {{ times = 3, delay = {delay} }}\n"
    own = '<workflow><subjobs><job name="j"><tasks><task name="t" task="fails" retry_times="1" retry_delay="1"/>'
    toml = '<workflow><subjobs><job name="j"><tasks><task name="t" task="fails"/>'
    end = "</tasks></job></subjobs></workflow>"
    return _workflow_daemon(make_daemon, config, own=own + end, toml=toml + end)


def _runs(tmp_path: Path) -> int:
    return len((tmp_path / "runs.log").read_text().splitlines())


def test_a_workflows_own_retries_replace_its_toml_tasks(make_daemon: Any, tmp_path: Path) -> None:
    """retry_times/retry_delay on the task replace the TOML task's `retry` (docs/workflows.md): each of the
    workflow's tries was also retried by jobd, 2 x 4 runs where 2 were asked for."""
    daemon = _toml_retry_daemon(make_daemon, tmp_path, tmp_path / "open")
    launched = daemon.call("instance.launch", {"workflow": "own"})
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 1)
    assert _runs(tmp_path) == 2
    task = _document(daemon, launched["id"]).find(".//task[@name='t']")
    assert task is not None and [out.get("retval") for out in task.findall("output")] == ["3", "3"]


@pytest.mark.parametrize(("when", "delay"), [("waiting to retry", 600), ("running", 600), ("running", 0)])
def test_a_cancel_stops_the_toml_retries_of_a_task(make_daemon: Any, tmp_path: Path, when: str, delay: int) -> None:
    """A task's TOML `retry` is jobd's retry of its job. A cancel left it on: the task ran again after its delay
    (3 more times here, 10 minutes apart, or at once), and the instance only ended then. Now retries are off, as
    evQueue's are at a cancel: a job waiting for its retry is cancelled at once, and one still running when the
    cancel came ends with the try that fails."""
    gate = Gate(tmp_path / "gate") if when == "running" else None  # held: the first try runs until released
    daemon = _toml_retry_daemon(make_daemon, tmp_path, tmp_path / "gate", delay)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        launched = daemon.call("instance.launch", {"workflow": "toml"})
        state = "delayed" if when == "waiting to retry" else "running"
        job = next_matching(client, lambda e: e["job"]["state"] == state, 30)["job"]
        daemon.call("instance.cancel", {"id": launched["id"]})
        if gate is not None:
            gate.release()
        done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 1)
    assert _runs(tmp_path) == 1
    ended = "cancelled" if when == "waiting to retry" else "failed"  # cancelled in its wait, or failed, not retried
    assert daemon.call("job.get", {"id": job["id"]})["state"] == ended
    task = _document(daemon, launched["id"]).find(".//task[@name='t']")
    assert task is not None and [out.get("retval") for out in task.findall("output")] == ["3"]


def test_killtask_with_the_pid_shown_stops_a_task_waiting_for_its_toml_retry(make_daemon: Any, tmp_path: Path) -> None:
    """While its job waits for the next try, the task is still EXECUTING and shows the pid of the try that failed:
    evQueue's killtask with that pid was refused ("no task runs as pid"), and nothing could stop the task."""
    daemon = _toml_retry_daemon(make_daemon, tmp_path, tmp_path / "open")
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        launched = daemon.call("instance.launch", {"workflow": "toml"})
        next_matching(client, lambda e: e["job"]["state"] == "delayed", 30)
    task = _document(daemon, launched["id"]).find(".//task[@name='t']")
    assert task is not None and task.get("status") == "EXECUTING" and task.get("pid"), etree.tostring(task)
    with EvqClient(daemon.evqueue_socket) as evqueue:
        request = b'<instance action="killtask" id="%d" pid="%s"/>' % (launched["id"], task.get("pid").encode())
        ok(evqueue.ask(request))
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 1)
    assert _runs(tmp_path) == 1


# Its task says it is up (a line into the FIFO `ready`, which blocks until the test reads it) once its trap is set:
# at SIGTERM it exits 0.
GRACEFUL_WORKFLOW = """<workflow>
  <parameters><parameter name="ready"/></parameters>
  <subjobs>
    <job name="j">
      <tasks><task name="graceful" queue="default"
          path="/bin/sh -c 'trap &quot;exit 0&quot; TERM; echo up &gt; &quot;$0&quot;; sleep 600 &amp; wait'">
        <input name="ready"><value select="evqGetWorkflowParameter('ready')"/></input>
      </task></tasks>
      <subjobs>
        <job name="after"><tasks><task name="after" path="/bin/echo after" queue="default"/></tasks></job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_killtask_of_a_task_that_exits_0_at_sigterm_fails_it_and_blocks_its_subjobs(
    make_daemon: Any, tmp_path: Path
) -> None:
    """The task was TERMINATED with retval 0 and its subjob ran (errors 0), while its job said `cancelled`: a killed
    task's retval is -1, whatever it exits with (evQueue's monitor SIGKILLs it). Found by a soak test."""
    ready = tmp_path / "ready"
    os.mkfifo(ready)
    daemon = _workflow_daemon(make_daemon, "[queue.default]\nconcurrency = 2\n", graceful=GRACEFUL_WORKFLOW)
    launched = daemon.call("instance.launch", {"workflow": "graceful", "parameters": {"ready": str(ready)}})
    assert ready.read_text() == "up\n"  # the trap is set
    task = _document(daemon, launched["id"]).find(".//task[@name='graceful']")
    assert task is not None and task.get("pid"), etree.tostring(task)
    with EvqClient(daemon.evqueue_socket) as evqueue:
        ok(evqueue.ask(b'<instance action="killtask" id="%d" pid="%s"/>' % (launched["id"], task.get("pid").encode())))
    _failed_with_its_subjob_not_run(daemon, launched["id"], "graceful", "cancelled")


def test_a_task_its_time_limit_ends_fails_though_it_exits_0_at_sigterm(make_daemon: Any) -> None:
    """The same as a killtask for a TOML task's `timeout`: its task was TERMINATED with retval 0 and its subjob ran,
    while its job said `timed_out`."""
    command = '["/bin/sh", "-c", "trap \'exit 0\' TERM; sleep 600 & wait"]'
    config = f'[queue.default]\nconcurrency = 2\n[task.graceful]\ncommand = {command}\nqueue = "default"\ntimeout = 1\n'
    timed = (
        '<workflow><subjobs><job name="j"><tasks><task name="t" task="graceful"/></tasks><subjobs>'
        '<job name="after"><tasks><task name="after" path="/bin/echo after" queue="default"/></tasks></job>'
        "</subjobs></job></subjobs></workflow>"
    )
    daemon = _workflow_daemon(make_daemon, config, timed=timed)
    launched = daemon.call("instance.launch", {"workflow": "timed"})
    _failed_with_its_subjob_not_run(daemon, launched["id"], "t", "timed_out")


def _failed_with_its_subjob_not_run(daemon: Any, instance_id: int, task: str, job_state: str) -> None:
    """The instance ends with one error: its task `task` TERMINATED with retval -1 (its job, alone, in `job_state`
    though it exited 0), and the subjob `after` never started."""
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 1)
    document = _document(daemon, instance_id)
    ended = document.find(f".//task[@name='{task}']")
    assert ended is not None and (ended.get("status"), ended.get("retval")) == ("TERMINATED", "-1")
    assert document.find(".//job[@name='after']/tasks/task[@status]") is None, etree.tostring(document)
    [job] = daemon.call("job.list", {})["jobs"]
    assert (job["state"], job["exit_code"]) == (job_state, 0)


# Its task `deep` prints an XML document nested `depth` elements deep; `held` waits for the lock `gate`. The
# subjob runs once both have succeeded.
DEEP_WORKFLOW = """<workflow>
  <parameters><parameter name="depth"/><parameter name="gate"/></parameters>
  <subjobs>
    <job name="j">
      <tasks>
        <task name="deep" path="{deep}" queue="default" output-method="XML">
          <input name="depth"><value select="evqGetWorkflowParameter('depth')"/></input>
        </task>
        <task name="held" path="/usr/bin/flock" queue="default">
          <input name="gate"><value select="evqGetWorkflowParameter('gate')"/></input><input>true</input>
        </task>
      </tasks>
      <subjobs>
        <job name="after"><tasks><task name="after" path="/bin/echo after" queue="default"/></tasks></job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""
DEEP_PRINTER = (
    'i=0; while [ $i -lt "$1" ]; do printf "<a>"; i=$((i+1)); done\n'
    'i=0; while [ $i -lt "$1" ]; do printf "</a>"; i=$((i+1)); done; echo\n'
)


def test_an_xml_output_nesting_the_document_deeper_than_parsers_read_is_refused_and_the_rest_reads_back(
    make_daemon: Any, tmp_path: Path
) -> None:
    """An output 252 elements deep was taken: then the instance document could not be read back (libxml2 reads 256
    levels): instance.get and evQueue's `instance query` failed (INVALID_XML "Excessive depth"), and a restart could
    not resume the instance ("cannot be resumed", ended with an error). Found by a soak test. An output as deep as
    there is room for (249 under a top-level job's task) is taken, and evQueue's answer (one level more) parses."""
    deep = tmp_path / "deep.sh"
    deep.write_text("#!/bin/sh\n" + DEEP_PRINTER)
    deep.chmod(0o755)
    daemon = _workflow_daemon(make_daemon, "[queue.default]\nconcurrency = 4\n", deep=DEEP_WORKFLOW.format(deep=deep))
    open_gate = str(tmp_path / "open")
    fits = daemon.call("instance.launch", {"workflow": "deep", "parameters": {"depth": "249", "gate": open_gate}})
    done = daemon.call("instance.wait", {"id": fits["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 0)
    with EvqClient(daemon.evqueue_socket) as evqueue:
        evqueue.framer = XmlFramer(max_depth=1000)  # the test's reader; jobd's own requests stay shallow
        answer = ok(evqueue.ask(b'<instance action="query" id="%d"/>' % fits["id"]))
    output = answer.find(".//task[@name='deep']/output")
    assert output is not None and output.get("method") == "xml" and len(list(output.iter("a"))) == 249

    gate = Gate(tmp_path / "gate")
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        parameters = {"depth": "252", "gate": str(gate.path)}
        too_deep = daemon.call("instance.launch", {"workflow": "deep", "parameters": parameters})
        next_matching(client, lambda event: event["job"]["state"] == "succeeded", 30)  # `deep` printed it
    assert terminate(daemon) == 0  # `held` still runs: the instance is saved, to be resumed
    start(daemon)
    gate.release()
    done = daemon.call("instance.wait", {"id": too_deep["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 1)
    tasks = {
        task["name"]: task
        for job in daemon.call("instance.get", {"id": too_deep["id"]})["jobs"]
        for task in job["tasks"]
    }
    assert (tasks["deep"]["status"], tasks["held"]["status"], tasks["held"]["retval"]) == ("ABORTED", "TERMINATED", 0)
    assert tasks["deep"]["error"].startswith(
        "Invalid XML returned (its elements nest 252 deep, where an output can nest 249"
    )
    assert "cannot be resumed" not in daemon.log()


HELD_TASK = """<workflow><subjobs><job name="j"><tasks>
  <task name="t" path="/bin/true" queue="held"/>
</tasks></job></subjobs></workflow>"""


def test_a_task_dequeued_by_a_cancel_never_starts_though_its_queue_has_room_in_the_same_turn(
    make_daemon: Any,
) -> None:
    """instance.cancel drops its queued tasks, whose jobs were cancelled from the loop's next turn on: a queue that
    had room in the same turn (a resume, a job's end, a reload) started the job meanwhile, and the task's program ran
    after the cancel was answered (then killed, `cancelled while running`). The cancel and the resume come on one
    line, a batch: the loop runs both before any other work."""
    daemon = _workflow_daemon(make_daemon, "[queue.default]\n[queue.held]\npaused = true\n", held=HELD_TASK)
    instance_id = daemon.call("instance.launch", {"workflow": "held"})["id"]
    [job] = daemon.call("job.list", {"context": f"instance:{instance_id}"})["jobs"]
    assert job["state"] == "queued"
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "instance.cancel", "params": {"id": instance_id}},
        {"jsonrpc": "2.0", "id": 2, "method": "queue.resume", "params": {"name": "held"}},
    ]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket_path))
        sock.sendall(json.dumps(batch).encode() + b"\n")
        with sock.makefile("rb") as replies:
            answered = json.loads(replies.readline())
    assert [reply.get("error") for reply in answered] == [None, None], answered
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": 30}, timeout=40)
    assert done["status"] == "TERMINATED", done
    ended = daemon.call("job.get", {"id": job["id"]})
    assert (ended["state"], ended["attempts"]) == ("cancelled", 0), ended


def test_killtask_read_in_the_turn_its_try_fails_lets_no_next_try_start(make_daemon: Any, tmp_path: Path) -> None:
    """killtask cancels the task's job from the loop's next turn on. A try that failed in the same turn was queued
    again at once (its TOML `retry`, no delay) and started, to be killed in the next turn: a second run of the task
    after the killtask was answered, and the task ended as killed (-1) instead of with the failed try's result.

    jobd is frozen (SIGSTOP) while the killtask is written to its socket and then the try exits, so that it reads
    both in one turn, the killtask first (the kernel reports them in the order they came)."""
    gate = Gate(tmp_path / "gate")  # held: the first try runs until released
    daemon = _toml_retry_daemon(make_daemon, tmp_path, gate.path, delay=0)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        launched = daemon.call("instance.launch", {"workflow": "toml"})
        job = next_matching(client, lambda e: e["job"]["state"] == "running", 30)["job"]
    task = _document(daemon, launched["id"]).find(".//task[@name='t']")
    assert task is not None and task.get("pid"), etree.tostring(task)
    leader = os.pidfd_open(int(task.get("pid")))
    try:
        with EvqClient(daemon.evqueue_socket) as evqueue:
            # Answered once jobd reads the connection: asyncio watches a new one from the turn after its greeting, and
            # watched only after SIGCONT, it would come after the try's end.
            ok(evqueue.ask(b"<ping/>"))
            os.kill(daemon.pid, signal.SIGSTOP)
            os.waitid(os.P_PID, daemon.pid, os.WSTOPPED | os.WNOWAIT)  # returns once jobd is stopped
            try:
                evqueue.send(
                    b'<instance action="killtask" id="%d" pid="%s"/>' % (launched["id"], task.get("pid").encode())
                )
                gate.release()
                assert select.select([leader], [], [], 30)[0] == [leader]  # the try has exited (not reaped yet)
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            ok(evqueue.document())
    finally:
        os.close(leader)
    done = daemon.call("instance.wait", {"id": launched["id"], "timeout": 30}, timeout=40)
    assert (done["status"], done["errors"]) == ("TERMINATED", 1)
    ended = daemon.call("job.get", {"id": job["id"]})
    assert (ended["state"], ended["attempts"]) == ("cancelled", 1), ended
    task = _document(daemon, launched["id"]).find(".//task[@name='t']")
    assert task is not None and [out.get("retval") for out in task.findall("output")] == ["3"]


def test_a_dropped_task_whose_removed_queue_drains_in_the_same_turn_is_cancelled(
    make_daemon: Any, tmp_path: Path
) -> None:
    """A job withheld for its cancel (Engine.withhold) still waits in its queue until the cancel: taken out of it, its
    queue, removed from the configuration, looked drained once the job before it ended in the same turn, and was
    forgotten; the cancel then failed on the missing queue (a KeyError in a task nobody awaited), and the job stayed
    queued for good. jobd is frozen (SIGSTOP) while the instance.cancel is written and the running job then exits."""
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    gate = Gate(tmp_path / "gate")
    daemon = _workflow_daemon(make_daemon, "[queue.default]\n[queue.q]\n", held=HELD_TASK.replace("held", "q"))
    first = daemon.submit(
        command=["/bin/sh", "-c", 'echo $$ > "$0"; flock "$1" true', str(fifo), str(gate.path)], queue="q"
    )
    leader = os.pidfd_open(int(fifo.read_text()))
    try:
        instance_id = daemon.call("instance.launch", {"workflow": "held"})["id"]
        [job] = daemon.call("job.list", {"context": f"instance:{instance_id}"})["jobs"]
        daemon.write_config("[queue.default]\n")  # q removed: it drains, one job at a time
        daemon.write_workflows(held=HELD_TASK.replace("held", "default"))  # which no longer names q
        daemon.call("daemon.reload")
        [listed] = [queue for queue in daemon.call("queue.list")["queues"] if queue["name"] == "q"]
        assert (listed["closed"], listed["running"], listed["queued"]) == (True, 1, 1), listed
        with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rb") as replies:
            sock.connect(str(daemon.socket_path))
            sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')  # answered: jobd watches the connection
            assert json.loads(replies.readline())["id"] == 1
            os.kill(daemon.pid, signal.SIGSTOP)
            os.waitid(os.P_PID, daemon.pid, os.WSTOPPED | os.WNOWAIT)  # returns once jobd is stopped
            try:
                cancel = {"jsonrpc": "2.0", "id": 2, "method": "instance.cancel", "params": {"id": instance_id}}
                sock.sendall(json.dumps(cancel).encode() + b"\n")
                gate.release()
                assert select.select([leader], [], [], 30)[0] == [leader]  # the first job has exited (not reaped yet)
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            assert "error" not in json.loads(replies.readline())
    finally:
        os.close(leader)
    assert daemon.wait(first["id"])["state"] == "succeeded"
    ended = daemon.call("job.wait", {"id": job["id"], "timeout": 30}, timeout=40)
    assert (ended["state"], ended["attempts"]) == ("cancelled", 0), ended
    assert "q" not in [queue["name"] for queue in daemon.call("queue.list")["queues"]]  # drained, then forgotten
    assert "Traceback" not in daemon.log()
