"""Workflow instance events (docs/http.md, Events; docs/protocol.md, events.subscribe) against a real jobd: an
instance's `instance.state` and `instance.progress` events arrive in order on GET /events and on events.subscribe,
end with its termination (errors counted), agree with instance.get, survive a reconnect with Last-Event-ID, are
filtered by `instances`/`workflows`/`types`, and are shown only to who may read the workflow. Every read blocks with
a deadline; nothing sleeps or polls."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from test_http_api import ADMIN_TOKEN, TIMEOUT, Events, request

from jobd.client import RemoteError

WEB_TOKEN = "web-token"
CONFIG = f"""
[http]
listen = "127.0.0.1:0"

[http.tokens.ops]
token_sha256 = "{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}"
user = "root"
admin = true

[http.tokens.web]
token_sha256 = "{hashlib.sha256(WEB_TOKEN.encode()).hexdigest()}"
user = "webapp"   # not a local account; may follow the workflow `steps` and nothing else

[[access.grant]]
users = ["webapp"]
rights = ["read", "exec"]
workflows = ["steps"]

[queue.default]
concurrency = 2

[task.step]
# Progress on fd 3, then the exit code the workflow asks for.
command = ["/bin/sh", "-c", 'for p in 30 60 90; do echo "%$p" >&3; done; exit "${{FAIL:-0}}"']
parameters = "env"

[queue.serial]
concurrency = 1

[task.items]
command = ["/bin/echo", "<items><i/><i/><i/></items>"]
queue = "serial"

[task.gate]
# Ends once something is written to the FIFO named by GATE (a stop of jobd kills it; it runs again after).
command = ["/bin/sh", "-c", 'cat "$GATE" > /dev/null']
parameters = "env"

[task.lister]
command = ["/bin/sh", "-c", 'echo "<items>"; seq 100 | sed "s|.*|<i/>|"; echo "</items>"']

[queue.held]
concurrency = 1
paused = true

[task.half]
# Half way, then done.
command = ["/bin/sh", "-c", 'echo "%50" >&3']
queue = "held"
"""
STEPS = """<workflow>
  <parameters><parameter name="fail"/></parameters>
  <subjobs>
    <job name="first">
      <tasks>
        <task task="step" name="one">
          <input name="FAIL"><value select="evqGetWorkflowParameter('fail')"/></input>
        </task>
      </tasks>
      <subjobs>
        <job name="second">
          <tasks>
            <task task="step" name="two"/>
            <task task="step" name="three"/>
          </tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""
OTHER = '<workflow><subjobs><job name="j"><tasks><task task="step" name="other"/></tasks></job></subjobs></workflow>'
# Tasks that wait their turn in a queue of one slot, one skipped by its condition, and a loop over a's output.
MANY = """<workflow>
  <subjobs>
    <job name="first">
      <tasks>
        <task task="items" name="a" output-method="XML"/>
        <task task="items" name="b"/>
        <task task="items" name="c" condition="1 = 2"/>
      </tasks>
      <subjobs>
        <job name="each" loop="evqGetParentJob()/evqGetOutput('a')/items/i">
          <tasks><task task="items" name="each"/></tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""
GATE = """<workflow>
  <parameters><parameter name="fifo"/></parameters>
  <subjobs>
    <job name="first">
      <tasks><task task="step" name="one"/></tasks>
      <subjobs>
        <job name="then">
          <tasks>
            <task task="gate" name="gate">
              <input name="GATE"><value select="evqGetWorkflowParameter('fifo')"/></input>
            </task>
          </tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""
# A list of 100 items, then one task per item in a queue that starts paused, beside a job that never runs.
LONG = """<workflow>
  <subjobs>
    <job name="first">
      <tasks><task task="lister" name="list" output-method="XML"/></tasks>
      <subjobs>
        <job name="never" condition="1 = 2">
          <tasks><task task="half" name="n1"/><task task="half" name="n2"/></tasks>
        </job>
        <job name="each" loop="evqGetParentJob()/evqGetOutput('list')/items/i">
          <tasks><task task="half" name="each"/></tasks>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""
STATUS_ORDER = ["QUEUED", "EXECUTING", "TERMINATED"]

Event = tuple[int, str, dict[str, Any]]


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    made = make_daemon(CONFIG, start=False)
    made.write_workflows(steps=STEPS, other=OTHER, many=MANY, gate=GATE, long=LONG)
    made.start()
    return made


def launch(daemon: Any, fail: int = 0, workflow: str = "steps") -> int:
    parameters = {"fail": str(fail)} if workflow == "steps" else {}
    instance: dict[str, Any] = daemon.call("instance.launch", {"workflow": workflow, "parameters": parameters})
    return int(instance["id"])


def instance_of(event: Event) -> int | None:
    _, kind, data = event
    if kind == "instance.state":
        return int(data["instance"]["id"])
    if kind == "instance.progress":
        return int(data["id"])
    return None


def until_terminated(stream: Events, instance_id: int) -> list[Event]:
    seen = []
    while True:
        event = stream.next()
        seen.append(event)
        _, kind, data = event
        if kind == "instance.state" and (data["instance"]["id"], data["instance"]["status"]) == (
            instance_id,
            "TERMINATED",
        ):
            return seen


def tree_tasks(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [task for job in jobs for task in [*job["tasks"], *tree_tasks(job["subjobs"])]]


def check_story(events: list[Event], instance_id: int, daemon: Any, *, loops: bool = False) -> dict[str, Any]:
    """The events of one instance tell its whole life in order, and end as instance.get says it ended."""
    mine = [event for event in events if instance_of(event) == instance_id]
    ids = [event_id for event_id, _, _ in mine]
    assert ids == sorted(set(ids))
    first, last = mine[0][2], mine[-1][2]
    assert (mine[0][1], first["instance"]["status"]) == ("instance.state", "EXECUTING")
    assert (mine[-1][1], last["instance"]["status"]) == ("instance.state", "TERMINATED")
    assert [kind for _, kind, _ in mine[1:-1]] == ["instance.progress"] * (len(mine) - 2)
    progress = [data["progress"] for _, _, data in mine]
    assert progress[-1] == 100 and (loops or progress == sorted(progress))  # only a loop's new tasks set it back
    shown: dict[int, dict[str, Any]] = {}
    for _, _, data in mine[1:-1]:
        task = data["task"]
        before = shown.get(task["evqid"])
        if before is not None:  # each task goes forward: QUEUED, EXECUTING (its progression rising), TERMINATED
            assert STATUS_ORDER.index(task["status"]) >= STATUS_ORDER.index(before["status"]), (before, task)
            assert task["progression"] >= before["progression"] or task["status"] != before["status"]
        else:  # told of from the start: QUEUED, or SKIPPED without ever running
            assert task["status"] in ("QUEUED", "SKIPPED"), task
        shown[task["evqid"]] = task
    got = daemon.call("instance.get", {"id": instance_id})
    assert last["instance"] == {key: value for key, value in got.items() if key != "jobs"}
    reached = {task["evqid"]: task for task in tree_tasks(got["jobs"]) if task["evqid"]}
    assert shown == reached
    return last


def test_an_instance_is_told_in_order_ending_with_its_termination(daemon: Any) -> None:
    stream = Events(daemon)  # every event, job ones too
    instance_id = launch(daemon)
    events = until_terminated(stream, instance_id)
    stream.close()
    last = check_story(events, instance_id, daemon)
    assert last["instance"]["errors"] == 0 and last["progress"] == 100
    progress = [data for _, kind, data in events if kind == "instance.progress"]
    assert {data["task"]["name"] for data in progress} == {"one", "two", "three"}
    assert [data["task"]["progression"] for data in progress if data["task"]["name"] == "one"][:5] == [0, 0, 30, 60, 90]
    # Each task's job is told of between its QUEUED and its TERMINATED: job events and instance events share ids.
    job_ids = {data["task"]["job_id"] for data in progress if data["task"]["job_id"] is not None}
    assert job_ids and job_ids <= {data["job"]["id"] for _, kind, data in events if kind == "job.state"}

    # Filters: the instance alone; its events of one type; jobs alone leave out instance events, and the reverse.
    reference = [event for event in events if instance_of(event) == instance_id]
    only = Events(daemon, query=f"?instances={instance_id}", last_id=0)
    assert until_terminated(only, instance_id) == reference
    only.close()
    states = Events(daemon, query="?workflows=steps&types=instance.state", last_id=0)
    assert until_terminated(states, instance_id) == [event for event in reference if event[1] == "instance.state"]
    states.close()
    job_id = min(job_ids)
    jobs = Events(daemon, query=f"?jobs={job_id}", last_id=0)
    seen = jobs.until_finished(job_id)
    jobs.close()
    assert seen and all(kind.startswith("job.") for _, kind, _ in seen)


def test_a_failed_task_counts_as_an_error_of_the_instance(daemon: Any) -> None:
    stream = Events(daemon, query="?types=instance.state,instance.progress")
    instance_id = launch(daemon, fail=3)
    events = until_terminated(stream, instance_id)
    stream.close()
    last = check_story(events, instance_id, daemon)
    assert last["instance"]["errors"] == 1 and last["instance"]["status"] == "TERMINATED"
    ended = [data["task"] for _, kind, data in events if kind == "instance.progress"][-1]
    assert (ended["name"], ended["status"], ended["retval"]) == ("one", "TERMINATED", 3)
    # "two" and "three" never ran: they were never told of (instance.get shows them without a number).
    assert {data["task"]["name"] for _, kind, data in events if kind == "instance.progress"} == {"one"}


def test_waiting_skipped_and_looped_tasks_are_told_of(daemon: Any) -> None:
    stream = Events(daemon, query="?types=instance.state,instance.progress")
    instance_id = launch(daemon, workflow="many")
    events = until_terminated(stream, instance_id)
    stream.close()
    check_story(events, instance_id, daemon, loops=True)
    told = [(data["task"]["name"], data["task"]["status"]) for _, kind, data in events if kind == "instance.progress"]
    first = {}
    for name, status in told:
        first.setdefault(name, status)
    assert first == {"a": "QUEUED", "b": "QUEUED", "c": "SKIPPED", "each": "QUEUED"}
    assert [name for name, status in told if status == "TERMINATED"] == ["a", "b", "each", "each", "each"]


def test_a_long_loop_is_told_task_by_task_with_the_progress_it_makes(daemon: Any) -> None:
    """A change is told from the tasks it changed, not from a walk over the whole document (which made a loop of n
    tasks cost n² with a subscriber). Each event's progress is what the tasks told so far give: the mean of their
    weights (ended 100, running its progression, else 0), counting the two tasks of a skipped job as ended."""
    stream = Events(daemon, query="?types=instance.state,instance.progress")
    instance_id = launch(daemon, workflow="long")
    events: list[Event] = []
    queued: set[int] = set()
    while len(queued) < 100:  # the loop expanded; its tasks wait in the paused queue
        events.append(stream.next())
        task = events[-1][2].get("task", {})
        if (task.get("name"), task.get("status")) == ("each", "QUEUED"):
            queued.add(task["evqid"])
    daemon.call("queue.resume", {"name": "held"})
    events += until_terminated(stream, instance_id)
    stream.close()
    check_story(events, instance_id, daemon, loops=True)
    every = tree_tasks(daemon.call("instance.get", {"id": instance_id})["jobs"])
    never = [task for task in every if not task["evqid"]]
    assert (len(every), [task["name"] for task in never]) == (103, ["n1", "n2"])

    def weight(task: dict[str, Any]) -> int:
        if task["status"] in ("TERMINATED", "ABORTED", "SKIPPED"):
            return 100
        return int(task["progression"]) if task["status"] == "EXECUTING" else 0

    told: dict[int, dict[str, Any]] = {}
    checked = 0
    for _, kind, data in events:
        if kind != "instance.progress":
            continue
        told[data["task"]["evqid"]] = data["task"]
        if told[min(told)]["status"] == "TERMINATED":  # the list has ended: the loop has its 100 tasks
            assert data["progress"] == (sum(map(weight, told.values())) + 100 * len(never)) // 103, data
            checked += 1
    assert checked >= 1 + 100 * 3  # the list's end, then each item queued, started, half way, ended
    # Each item was told queued with the job that runs it, while the paused queue held that job.
    held = {
        data["task"]["evqid"]
        for _, kind, data in events
        if kind == "instance.progress" and data["task"]["status"] == "QUEUED" and data["task"]["job_id"] is not None
    }
    assert held == queued
    assert all(
        data["task"]["job_id"] is not None
        for _, kind, data in events
        if kind == "instance.progress" and data["task"]["status"] == "EXECUTING"
    )


def test_a_reconnect_with_last_event_id_misses_nothing(daemon: Any) -> None:
    stream = Events(daemon, query="?workflows=steps")
    instance_id = launch(daemon)
    before = [stream.next() for _ in range(3)]  # launched, "one" queued, "one" running: then the client goes away
    stream.close()
    ended = daemon.call("instance.wait", {"id": instance_id, "timeout": TIMEOUT}, timeout=TIMEOUT + 5)
    assert ended["status"] == "TERMINATED"  # everything else happened while nobody listened
    again = Events(daemon, query="?workflows=steps", last_id=before[-1][0])
    after = until_terminated(again, instance_id)
    again.close()
    everything = Events(daemon, query="?workflows=steps", last_id=0)
    reference = until_terminated(everything, instance_id)
    everything.close()
    assert before + after == reference
    check_story(reference, instance_id, daemon)


def test_after_a_restart_the_instance_goes_on_being_told(daemon: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    stream = Events(daemon, query="?workflows=gate")
    instance_id = int(daemon.call("instance.launch", {"workflow": "gate", "parameters": {"fifo": str(fifo)}})["id"])
    task: dict[str, Any] = {}
    while (task.get("name"), task.get("status")) != ("gate", "EXECUTING"):
        task = stream.next()[2].get("task", {})
    job_id = task["job_id"]
    stream.close()
    assert daemon.stop() == 0  # the gate's job goes back to its queue; the instance stays EXECUTING
    daemon.start()
    after = Events(daemon, query=f"?instances={instance_id}")
    running = Events(daemon, query=f"?jobs={job_id}&types=job.state", last_id=0)
    while running.next()[2]["job"]["state"] != "running":
        pass
    running.close()
    with open(fifo, "w") as gate:  # the job runs again: its cat has the FIFO open
        gate.write("go\n")
    events = until_terminated(after, instance_id)
    after.close()
    # No new launch and nothing told again of what had not changed: only the gate's end, then the instance's.
    told = [(kind, data.get("task", {}).get("name")) for _, kind, data in events]
    assert told == [("instance.progress", "gate"), ("instance.state", None)]
    assert events[0][2]["task"]["status"] == "TERMINATED" and events[0][2]["task"]["retval"] == 0
    assert events[-1][2]["instance"]["errors"] == 0


def test_events_subscribe_tells_the_same_story(daemon: Any) -> None:
    stream = Events(daemon, query="?types=instance.state,instance.progress")
    with daemon.client() as client:
        subscription = client.call("events.subscribe", {"workflows": ["steps"]})["subscription"]
        instance_id = launch(daemon)
        notified = []
        while not notified or notified[-1].get("instance", {}).get("status") != "TERMINATED":
            notified.append(client.next_event(TIMEOUT))
        with pytest.raises(RemoteError) as refused:
            client.call("events.subscribe", {"instances": ["one"]})
        assert refused.value.code == "INVALID_PARAMS"
    sse = until_terminated(stream, instance_id)
    stream.close()
    assert all(event.pop("subscription") == subscription for event in notified)
    assert notified == [data for _, _, data in sse]


def test_instance_events_only_for_who_may_read_the_workflow(daemon: Any) -> None:
    web = Events(daemon, token=WEB_TOKEN)  # no filter: whatever it may read
    other_id = launch(daemon, workflow="other")  # webapp has no right on the workflow `other`
    daemon.call("instance.wait", {"id": other_id, "timeout": TIMEOUT}, timeout=TIMEOUT + 5)
    status, body = request(
        daemon, "POST", "/api/instance.launch", {"workflow": "steps", "parameters": {"fail": "0"}}, token=WEB_TOKEN
    )
    assert status == 200
    instance_id = body["result"]["id"]
    events = until_terminated(web, instance_id)
    web.close()
    # Nothing of `other`, and no job events: the grant is on the workflow, not on the task or the queue.
    assert {instance_of(event) for event in events} == {instance_id}
    check_story(events, instance_id, daemon)


# No [http]: an instance has listeners only while a client is subscribed (the HTTP listener would always be one).
LATE_CONFIG = """
[queue.default]
concurrency = 2

[task.gate]
command = ["/bin/sh", "-c", 'cat "$GATE" > /dev/null']
parameters = "env"

[task.twostep]
# %10, then %50 once its first FIFO is written to, then ends once its second one is.
command = ["/bin/sh", "-c", 'echo %10 >&3; cat "$GATE" > /dev/null; echo %50 >&3; cat "$GATE2" > /dev/null']
parameters = "env"
"""
LATE = """<workflow>
  <parameters><parameter name="a"/><parameter name="b"/><parameter name="c"/></parameters>
  <subjobs>
    <job name="both">
      <tasks>
        <task task="gate" name="a">
          <input name="GATE"><value select="evqGetWorkflowParameter('a')"/></input>
        </task>
        <task task="twostep" name="b">
          <input name="GATE"><value select="evqGetWorkflowParameter('b')"/></input>
          <input name="GATE2"><value select="evqGetWorkflowParameter('c')"/></input>
        </task>
      </tasks>
    </job>
  </subjobs>
</workflow>
"""


def test_a_later_subscriber_first_hears_what_changed_while_nobody_listened(make_daemon: Any, tmp_path: Path) -> None:
    daemon = make_daemon(LATE_CONFIG, start=False)
    daemon.write_workflows(late=LATE)
    daemon.start()
    fifos = {name: tmp_path / name for name in "abc"}
    for fifo in fifos.values():
        os.mkfifo(fifo)
    parameters = {name: str(fifo) for name, fifo in fifos.items()}
    tasks: dict[str, dict[str, Any]] = {}
    with daemon.client() as first:
        first.call("events.subscribe", {"workflows": ["late"]})
        instance_id = int(daemon.call("instance.launch", {"workflow": "late", "parameters": parameters})["id"])
        while tasks.get("a", {}).get("status") != "EXECUTING" or tasks.get("b", {}).get("progression") != 10:
            event = first.next_event(TIMEOUT)
            if event["type"] == "instance.progress":
                tasks[event["task"]["name"]] = event["task"]
    # Nobody listens while `a` ends (job.wait answers once the instance has taken its end in).
    with open(fifos["a"], "w") as gate:
        gate.write("go\n")
    assert daemon.call("job.wait", {"id": tasks["a"]["job_id"], "timeout": TIMEOUT}, timeout=TIMEOUT + 5)["state"] == (
        "succeeded"
    )
    with daemon.client() as second:
        second.call("events.subscribe", {"workflows": ["late"]})
        with open(fifos["b"], "w") as gate:  # `b` says %50
            gate.write("go\n")
        told = []
        while not told or told[-1]["task"]["progression"] != 50:
            told.append(second.next_event(TIMEOUT))
        # Told in the order things happened, with the instance's progress as it is: a done (100), b at 50.
        assert [(e["task"]["name"], e["task"]["status"], e["progress"]) for e in told] == [
            ("a", "TERMINATED", 75),
            ("b", "EXECUTING", 75),
        ]
        with open(fifos["c"], "w") as gate:
            gate.write("go\n")
        while told[-1].get("instance", {}).get("status") != "TERMINATED":
            told.append(second.next_event(TIMEOUT))
    assert told[-1]["instance"]["id"] == instance_id and told[-1]["progress"] == 100
