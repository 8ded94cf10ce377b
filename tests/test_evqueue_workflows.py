"""evQueue workflow files as their authors write them, launched through evQueue's socket on a real daemon, compared
with what evQueue 3.3 does with them (reference/evqueue.md §2, and evQueue's source where the reference is silent).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harness import Daemon
from lxml import etree
from test_evqueue_protocol import EvqClient, ok

QUEUES = "[queue.default]\nconcurrency = 2\n"


def _daemon(make_daemon: Any, **workflows: str) -> Daemon:
    daemon: Daemon = make_daemon(QUEUES, start=False)
    daemon.write_workflows(**workflows)
    daemon.start()
    return daemon


def _launch(name: str, mode: str = "asynchronous", **parameters: str) -> bytes:
    given = "".join(f'<parameter name="{key}" value="{value}"/>' for key, value in parameters.items())
    return f'<instance action="launch" name="{name}" mode="{mode}" timeout="60">{given}</instance>'.encode()


def _run(daemon: Daemon, name: str, **parameters: str) -> etree._Element:
    """A synchronous `instance launch`, as evQueue's PHP class sends it, then the instance document it ended with."""
    with EvqClient(daemon.evqueue_socket) as evqueue:
        launched = ok(evqueue.ask(_launch(name, "synchronous", **parameters)))
        assert launched.get("wait") is None, etree.tostring(launched)
        answer = ok(evqueue.ask(b'<instance action="query" id="%s"/>' % launched.get("workflow-instance-id").encode()))
    document = answer.find("workflow")
    assert document is not None and document.get("status") == "TERMINATED", etree.tostring(answer)
    return document


def _tasks(document: etree._Element) -> dict[str, etree._Element]:
    return {task.get("name", ""): task for task in document.iter("task")}


# evQueue's Task::GetHost reads `host` (the task's, else the instance's) alone: `queue_host` only picks the per-host
# queue of a queue with dynamic="yes", `use-agent` only says how an SSH task runs. A task with either and no host
# ran here, in its queue.
LOCAL_WITH_QUEUE_HOST = """<workflow>
  <parameters><parameter name="server"/></parameters>
  <subjobs>
    <job name="per-server">
      <tasks>
        <task name="api" path="/bin/echo called" queue="default" queue_host="{evqGetWorkflowParameter('server')}"/>
        <task name="agent" path="/bin/echo agent" queue="default" use-agent="yes"/>
      </tasks>
      <subjobs>
        <job name="after"><tasks><task name="after" path="/bin/echo after" queue="default"/></tasks></job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_a_task_with_a_queue_host_or_use_agent_and_no_host_runs_here_as_in_evqueue(make_daemon: Any) -> None:
    """They were ABORTED with `remote execution is not supported`, and the subjobs never ran: a workflow that
    worked on evQueue (a queue_host to bound calls per server, say) failed on jobd."""
    daemon = _daemon(make_daemon, servers=LOCAL_WITH_QUEUE_HOST)
    document = _run(daemon, "servers", server="db1")
    tasks = _tasks(document)
    assert document.get("errors") == "0", etree.tostring(document)
    assert (tasks["api"].get("status"), tasks["api"].get("retval")) == ("TERMINATED", "0")
    assert tasks["api"].get("queue_host") == "db1"  # computed, as evQueue does before it enqueues
    assert tasks["api"].findtext("output") == "called\n"
    assert (tasks["agent"].get("status"), tasks["agent"].findtext("output")) == ("TERMINATED", "agent\n")
    assert tasks["after"].findtext("output") == "after\n"


# evQueue reads merge-stderr and use-agent with XMLUtils::GetAttributeBool: `yes`, `no`, or an integer.
INTEGER_BOOLEANS = """<workflow>
  <subjobs>
    <job name="streams">
      <tasks>
        <task name="merged" path="/bin/sh -c 'echo out; echo err &gt;&amp;2'" queue="default" merge-stderr="1"/>
        <task name="apart" path="/bin/sh -c 'echo out; echo err &gt;&amp;2'" queue="default" merge-stderr="0"
              use-agent="0"/>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""


def test_merge_stderr_and_use_agent_take_evqueues_integer_booleans(make_daemon: Any) -> None:
    """`merge-stderr="1"` and `use-agent="0"` were refused (`allowed yes, no`): the workflow file of an evQueue
    installation did not load, and a reload with it was refused whole."""
    daemon = _daemon(make_daemon, streams=INTEGER_BOOLEANS)
    tasks = _tasks(_run(daemon, "streams"))
    assert (tasks["merged"].findtext("output"), tasks["merged"].findtext("stderr")) == ("out\nerr\n", "")
    assert (tasks["apart"].findtext("output"), tasks["apart"].findtext("stderr")) == ("out\n", "err\n")


# evQueue's handle_loop appends each copy to the looped element's parent, after its other children, and removes
# the original: the copies come after their siblings, and a looped input's values after the task's other inputs.
LOOPS_AMONG_SIBLINGS = """<workflow>
  <subjobs>
    <job name="list">
      <tasks>
        <task name="list" queue="default" output-method="XML"
              path="/bin/echo '&lt;files&gt;&lt;file name=&quot;a.jpg&quot;/&gt;'
                    '&lt;file name=&quot;b.jpg&quot;/&gt;&lt;/files&gt;'"/>
      </tasks>
      <subjobs>
        <job name="each" loop="evqGetParentJob()/evqGetOutput('list')/files/file">
          <tasks>
            <task name="resize" path="/bin/echo resize" queue="default"><input><value select="@name"/></input></task>
          </tasks>
        </job>
        <job name="archive">
          <tasks>
            <task name="tar" path="/bin/echo tar -cf" queue="default">
              <input loop="evqGetParentJob()/evqGetOutput('list')/files/file"><value select="@name"/></input>
              <input>photos.tar</input>
            </task>
            <task name="rm" path="/bin/echo rm" queue="default"
                  loop="evqGetParentJob()/evqGetOutput('list')/files/file">
              <input><value select="@name"/></input>
            </task>
            <task name="done" path="/bin/echo done" queue="default"/>
          </tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_looped_copies_come_after_their_siblings_as_in_evqueue(make_daemon: Any) -> None:
    """jobd put the copies in the looped element's place: `tar -cf` got `a.jpg b.jpg photos.tar` where evQueue gave
    `photos.tar a.jpg b.jpg` (the task's program, written for evQueue, saw its arguments in another order), and the
    instance document listed jobs and tasks in another order than evQueue's."""
    daemon = _daemon(make_daemon, photos=LOOPS_AMONG_SIBLINGS)
    document = _run(daemon, "photos")
    assert document.get("errors") == "0", etree.tostring(document)
    tasks = _tasks(document)
    assert tasks["tar"].findtext("output") == "tar -cf photos.tar a.jpg b.jpg\n"
    assert [item.text for item in tasks["tar"].findall("input")] == ["photos.tar", "a.jpg", "b.jpg"]
    subjobs = document.findall("subjobs/job/subjobs/job")
    assert [job.get("name") for job in subjobs] == ["archive", "each", "each"]
    assert [job.findtext("tasks/task/output") for job in subjobs[1:]] == ["resize a.jpg\n", "resize b.jpg\n"]
    archive = [task.findtext("output") for task in subjobs[0].findall("tasks/task")]
    assert archive == ["tar -cf photos.tar a.jpg b.jpg\n", "done\n", "rm a.jpg\n", "rm b.jpg\n"]


# A task whose XML output is in a default namespace, as an Atom feed or a SOAP answer is. evQueue selects elements
# by their name as written (DOMNode::getNodeName): `feed/entry` finds the entries.
NAMESPACED_OUTPUT = """<workflow>
  <subjobs>
    <job name="fetch">
      <tasks>
        <task name="fetch" queue="default" output-method="XML"
              path="/bin/echo '&lt;feed xmlns=&quot;http://www.w3.org/2005/Atom&quot;&gt;&lt;entry&gt;&lt;title&gt;a&lt;/title&gt;'
                    '&lt;/entry&gt;&lt;entry&gt;&lt;title&gt;b&lt;/title&gt;&lt;/entry&gt;&lt;/feed&gt;'"/>
      </tasks>
      <subjobs>
        <job name="post" loop="evqGetParentJob()/evqGetOutput('fetch')/feed/entry">
          <tasks>
            <task name="post" path="/bin/echo post" queue="default"><input><value select="title"/></input></task>
          </tasks>
        </job>
        <job name="count" condition="count(evqGetParentJob()/evqGetOutput('fetch')/feed/entry) = 2">
          <tasks><task name="two" path="/bin/echo two entries" queue="default"/></tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_elements_of_a_task_output_in_a_default_namespace_are_selected_by_name_as_in_evqueue(
    make_daemon: Any,
) -> None:
    """XPath 1.0's `entry` selects only elements of no namespace: the loop made no copy and the condition was false,
    silently, where the same workflow on evQueue posted both entries."""
    daemon = _daemon(make_daemon, feed=NAMESPACED_OUTPUT)
    document = _run(daemon, "feed")
    assert document.get("errors") == "0", etree.tostring(document)
    posted = [task.findtext("output") for task in document.iterfind(".//job[@name='post']/tasks/task")]
    assert posted == ["post a\n", "post b\n"]
    assert _tasks(document)["two"].findtext("output") == "two entries\n"
    # The output keeps its namespace, as evQueue imports it.
    assert document.find(".//task[@name='fetch']/output/{http://www.w3.org/2005/Atom}feed") is not None


# `retry_retval`: retry only on that exit code. The first task exits 75 ("try again later") once, then succeeds;
# the second exits 3, which is not retried.
RETRY_ON_ONE_CODE = """<workflow>
  <parameters><parameter name="flag"/></parameters>
  <subjobs>
    <job name="sync">
      <tasks>
        <task name="busy-once" queue="default" retry_retval="75" retry_delay="1" retry_times="2"
              path="/bin/sh -c 'test -e &quot;$0&quot; &amp;&amp; exit 0; touch &quot;$0&quot;; exit 75'">
          <input><value select="evqGetWorkflowParameter('flag')"/></input>
        </task>
        <task name="broken" path="/bin/sh -c 'exit 3'" queue="default" retry_retval="75" retry_delay="1"
              retry_times="2"/>
      </tasks>
      <subjobs>
        <job name="after"><tasks><task name="after" path="/bin/echo after" queue="default"/></tasks></job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_retry_retval_retries_that_exit_code_only_and_another_is_an_error(make_daemon: Any, tmp_path: Any) -> None:
    """As docs/workflows.md says: the exit code named is retried (a try appends an <output>); another fails the task
    at once, and counts as an error, where evQueue counted none (its instance ended with errors="0" though the
    job's subjobs never ran)."""
    daemon = _daemon(make_daemon, sync=RETRY_ON_ONE_CODE)
    document = _run(daemon, "sync", flag=str(tmp_path / "flag"))
    tasks = _tasks(document)
    busy = tasks["busy-once"]
    assert (busy.get("status"), busy.get("retval"), busy.get("retry_times")) == ("TERMINATED", "0", "1")
    assert [output.get("retval") for output in busy.findall("output")] == ["75", "0"]
    broken = tasks["broken"]
    assert (broken.get("status"), broken.get("retval"), broken.get("retry_times")) == ("TERMINATED", "3", "2")
    assert [output.get("retval") for output in broken.findall("output")] == ["3"]
    assert "after" not in tasks or tasks["after"].get("status") is None
    assert document.get("errors") == "1"


# evQueue's min() and max() of no nodes give nothing (an empty sequence), so a value of them is empty.
EXTREMES = """<workflow>
  <subjobs>
    <job name="list">
      <tasks>
        <task name="none" path="/bin/echo '&lt;files/&gt;'" queue="default" output-method="XML"/>
        <task name="some" queue="default" output-method="XML"
              path="/bin/echo '&lt;files&gt;&lt;file size=&quot;2.5&quot;/&gt;'
                    '&lt;file size=&quot;10&quot;/&gt;&lt;/files&gt;'"/>
      </tasks>
      <subjobs>
        <job name="report">
          <tasks>
            <task name="report" path="/bin/echo" queue="default">
              <input>largest=<value select="max(evqGetParentJob()/evqGetOutput('none')/files/file/@size)"/></input>
              <input>smallest=<value select="min(evqGetParentJob()/evqGetOutput('none')/files/file/@size)"/></input>
              <input>from=<value select="min(evqGetParentJob()/evqGetOutput('some')/files/file/@size)"/></input>
              <input>to=<value select="max(evqGetParentJob()/evqGetOutput('some')/files/file/@size)"/></input>
            </task>
            <task name="skipped" path="/bin/echo" queue="default"
                  condition="max(evqGetParentJob()/evqGetOutput('none')/files/file/@size) &lt; 100"/>
          </tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_min_and_max_of_no_nodes_give_nothing_as_in_evqueue(make_daemon: Any) -> None:
    """They gave NaN: a task was passed `largest=NaN` where evQueue passed `largest=`. As a number nothing is still
    NaN (the condition, false either way, skips its task); of some nodes the number is exact (evQueue cut 2.5 to 2)."""
    daemon = _daemon(make_daemon, extremes=EXTREMES)
    tasks = _tasks(_run(daemon, "extremes"))
    assert tasks["report"].findtext("output") == "largest= smallest= from=2.5 to=10\n"
    assert tasks["skipped"].get("status") == "SKIPPED"


# A tool that prints a DOCTYPE before its XML (a plist, an XHTML page): well-formed, but jobd reads no DTD.
DOCTYPE_OUTPUT = """<workflow>
  <subjobs>
    <job name="j">
      <tasks>
        <task name="plist" queue="default" output-method="XML"
              path="/bin/echo '&lt;?xml version=&quot;1.0&quot;?&gt;&lt;!DOCTYPE plist&gt;&lt;plist/&gt;'"/>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""


def test_a_task_output_with_a_doctype_is_refused_saying_why(make_daemon: Any) -> None:
    """It was aborted with the bare `Invalid XML returned`, which the docs give to output that is not well-formed,
    for output that is: nothing said that the DOCTYPE was the cause, nor what jobd reads."""
    daemon = _daemon(make_daemon, plist=DOCTYPE_OUTPUT)
    document = _run(daemon, "plist")
    task = _tasks(document)["plist"]
    assert (task.get("status"), task.get("retval"), document.get("errors")) == ("ABORTED", "0", "1")
    assert task.get("error") == (
        "Invalid XML returned (its output has a DTD, <!DOCTYPE …> or <!ENTITY …>: jobd reads task outputs without one)"
    )
    assert task.find("output").get("method") == "text" and "<!DOCTYPE plist>" in task.findtext("output")


# Two steps in a queue that runs one task at a time; each task writes its name to `log` as it runs, and the first
# step of an instance launched with a FIFO as `gate` waits for a line from it.
CHAIN = """<workflow>
  <parameters><parameter name="label"/><parameter name="gate"/><parameter name="log"/></parameters>
  <subjobs>
    <job name="first">
      <tasks>
        <task name="first" queue="one"
              path="/bin/sh -c 'read line &lt; &quot;$0&quot;; echo &quot;$2&quot; &gt;&gt; &quot;$1&quot;'">
          <input><value select="evqGetWorkflowParameter('gate')"/></input>
          <input><value select="evqGetWorkflowParameter('log')"/></input>
          <input><value select="evqGetWorkflowParameter('label')"/>1</input>
        </task>
      </tasks>
      <subjobs>
        <job name="second">
          <tasks>
            <task name="second" queue="one" path="/bin/sh -c 'echo &quot;$1&quot; &gt;&gt; &quot;$0&quot;'">
              <input><value select="evqGetWorkflowParameter('log')"/></input>
              <input><value select="evqGetWorkflowParameter('label')"/>2</input>
            </task>
          </tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


def test_tasks_of_instances_sharing_a_queue_run_in_the_order_they_were_queued(make_daemon: Any, tmp_path: Path) -> None:
    """As docs/evqueue-protocol.md says: jobd's schedulers give every workflow task the same priority, so they run
    as queued, evQueue's `fifo`, where evQueue's `prio` ran the oldest instance's first (A2 before B1)."""
    daemon: Daemon = make_daemon("[queue.one]\nconcurrency = 1\n", start=False)
    daemon.write_workflows(chain=CHAIN)
    daemon.start()
    gate, log = tmp_path / "gate", tmp_path / "log"
    os.mkfifo(gate)
    with EvqClient(daemon.evqueue_socket) as evqueue:
        first = ok(evqueue.ask(_launch("chain", label="A", gate=str(gate), log=str(log))))
        second = ok(evqueue.ask(_launch("chain", label="B", gate="/dev/null", log=str(log))))
        # B's first task is queued behind A's, which waits for the gate: A's second step is queued after it.
        gate.write_text("go\n")
        for launched in (first, second):
            wait = b'<instance action="wait" id="%s" timeout="60"/>' % launched.get("workflow-instance-id").encode()
            ok(evqueue.ask(wait))
    assert log.read_text().split() == ["A1", "B1", "A2", "B2"]
