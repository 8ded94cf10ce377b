"""Schedules run by a real daemon: firings each second, overlap policies, suspend on failure, catch-up, durable
state, reload, the clock-change re-arm, the schedule.* API, jobctl and evQueue's XML commands.

Firings are observed as they happen, through `events.subscribe` (job.state notifications) read with a deadline;
a run that must last is a task blocked on a lock file the test holds (tests/recovery/support.py's Gate). Where a
test must let wall-clock time pass (to show that nothing fires), it waits for an event with a deadline. What a
daemon cannot be made to do on cue (a due time coming while a reload holds the loop; a random draw) is shown on a
Scheduler in-process, its clock and draw given (InProcess).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import math
import os
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import time
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from harness import Daemon
from lxml import etree
from recovery.support import Gate, fill, held_in_spawn, kill9, pump_of, start, stop_pumps, terminate, wait_for_log
from test_evqueue_protocol import EvqClient, ok
from test_jobctl import run_jobctl
from test_jobs import next_matching

from jobd import config as jobd_config
from jobd.client import Client, RemoteError
from jobd.engine.scheduler import DUE_MARGIN, Scheduler
from jobd.model import ScheduleState
from jobd.store import Store

pytestmark = pytest.mark.timeout(120)

WAIT = 20.0

BASE = """
[queue.default]
concurrency = 4

[task.true]
command = ["/bin/true"]

[task.fail]
command = ["/bin/false"]

# Blocks until the test releases the lock file passed as its parameter (a run that lasts as long as needed).
[task.gated]
command = ["/bin/sh", "-c", 'exec flock "$0" true']
"""

HELLO = """<workflow>
  <subjobs><job name="one"><tasks><task name="t" path="/bin/true" queue="default"/></tasks></job></subjobs>
</workflow>
"""

BROKEN = """<workflow>
  <subjobs><job name="one"><tasks><task name="t" path="/bin/false" queue="default"/></tasks></job></subjobs>
</workflow>
"""


def schedule(name: str, target: str, calendar: str, **keys: Any) -> str:
    kind, _, what = target.partition(":")
    lines = [f"[schedule.{name}]", f'{kind} = "{what}"', f'calendar = "{calendar}"']
    for key, value in keys.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, dict):
            inner = ", ".join(f'{k} = "{v}"' for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def sched(make_daemon: Any) -> Iterator[Any]:
    """make(schedules_toml) -> a started daemon with BASE's queue and tasks, the workflows `hello` and `broken`,
    and its notify socket drained (a schedule runs many jobs, each one a STATUS= datagram)."""
    made: list[Daemon] = []

    def make(schedules: str = "") -> Daemon:
        daemon: Daemon = make_daemon(BASE + schedules, start=False)
        workflows = daemon.config_dir / "workflows"
        workflows.mkdir()
        (workflows / "hello.xml").write_text(HELLO)
        (workflows / "broken.xml").write_text(BROKEN)
        start(daemon)
        made.append(daemon)
        return daemon

    yield make
    stop_pumps(made)


def rewrite(daemon: Daemon, schedules: str) -> None:
    daemon.write_config(BASE + schedules)


def subscribe(daemon: Daemon) -> Client:
    client = daemon.client()
    client.call("events.subscribe", {"types": ["job.state"]}, timeout=WAIT)
    return client


def next_state(client: Client, state: str, context: str, timeout: float = WAIT) -> dict[str, Any]:
    """The next job of `context` (ending with `*`: a prefix) reaching `state`, as the event carried it."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no job of {context} became {state} within {timeout}s")
        event = client.next_event(timeout=left)
        job = event.get("job") or {}
        found = str(job.get("context"))
        if job.get("state") == state and (
            found == context or (context.endswith("*") and found.startswith(context[:-1]))
        ):
            return job


def nothing_for(client: Client, seconds: float, context: str) -> None:
    """No job of `context` changes state for `seconds` (a wait with a deadline, not a sleep-and-poll)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = client.next_event(timeout=left)
        except TimeoutError:
            return
        assert (event.get("job") or {}).get("context") != context, event


def epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def listed(daemon: Daemon, name: str) -> dict[str, Any]:
    [found] = [s for s in daemon.call("schedule.list")["schedules"] if s["name"] == name]
    return found


def quiesce(daemon: Daemon, *names: str) -> None:
    """Disable the schedules and wait for their runs to end: an every-second schedule left firing would have a
    child exiting (a zombie for an instant) whenever the teardown looks."""
    for name in names:
        for run in daemon.call("schedule.disable", {"name": name})["running"]:
            daemon.wait(run)


FIRED = re.compile(r"schedule (\S+) fired: (?:job|instance)=(\d+) \(due (\S+), at (\S+)\)")
ENDED = re.compile(r"schedule (\S+): run (?:job|instance)=(\d+) ended: \w+ \(at (\S+)\)")


def firings(daemon: Daemon, name: str) -> list[tuple[int, float, float]]:
    """(run id, due time, moment it fired) of each run the schedule started, in order, as jobd logged them: what
    jobd decided, where the runs' own times also tell how fast the machine was."""
    return [(int(m[2]), epoch(m[3]), epoch(m[4])) for m in FIRED.finditer(daemon.log()) if m[1] == name]


def run_ends(daemon: Daemon, name: str) -> dict[int, float]:
    """Run id -> the moment the schedule counted its run ended (with overlap skip its next time is the first after
    it), as jobd logged it."""
    return {int(m[2]): epoch(m[3]) for m in ENDED.finditer(daemon.log()) if m[1] == name}


def assert_first_after(previous: float, due: float) -> None:
    """`due` is the calendar `* * * * * *`'s first time after `previous`: a whole second, none passed over."""
    assert due == math.floor(previous) + 1, (iso_text(previous), iso_text(due))


def iso_text(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat()


def jobs_of(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = daemon.call("job.list", {"context": f"schedule:{name}", "limit": 1000})["jobs"]
    return jobs


# -- firing ------------------------------------------------------------------------------------------------------


def test_an_every_second_schedule_is_due_at_each_whole_second_after_its_last_run(sched: Any) -> None:
    """Each due time is a whole second, fired at or after it, and the first second after the end of the run before
    it (overlap "skip"): one a second while its runs are short, none passed over, none fired twice. Checked on the
    due times and moments jobd logged, not on how soon the machine started each run."""
    daemon = sched(schedule("tick", "task:true", "* * * * * *"))
    with subscribe(daemon) as client:
        started = [next_state(client, "running", "schedule:tick") for _ in range(4)]
    tick = listed(daemon, "tick")
    assert tick["state"] in ("waiting", "running") and tick["enabled"] and not tick["suspended"]
    assert tick["last_run"] is not None
    # overlap "skip": while a run goes there is no next time yet; it is computed when the run ends
    assert (tick["next_run"] is None) == (tick["state"] == "running"), tick
    assert tick["target"] == {"kind": "task", "name": "true", "parameters": {}}
    quiesce(daemon, "tick")
    fired, ended = firings(daemon, "tick"), run_ends(daemon, "tick")
    runs = [job["id"] for job in started]
    first = [run for run, _, _ in fired].index(runs[0])  # a run may have started before the subscription
    followed = fired[first : first + 4]
    assert [run for run, _, _ in followed] == runs, fired  # each due time one run, in order
    for (_, due, moment), job in zip(followed, started, strict=True):
        assert due == math.floor(due) and moment >= due - DUE_MARGIN, (due, moment)  # not before its time
        assert epoch(job["started_at"]) >= due - DUE_MARGIN, job
    for (run, due, _), (_, next_due, _) in itertools.pairwise(followed):
        assert next_due > due
        assert_first_after(ended[run], next_due)


def test_a_workflow_schedule_launches_instances_with_its_parameters_and_follows_them(sched: Any) -> None:
    daemon = sched(schedule("wf", "workflow:hello", ";;;;;"))
    with subscribe(daemon) as client:
        job = next_state(client, "succeeded", "instance:*")
    instance_id = int(job["context"].split(":")[1])
    done = daemon.call("instance.wait", {"id": instance_id, "timeout": WAIT})
    assert done["status"] == "TERMINATED" and done["errors"] == 0 and done["comment"] == "schedule:wf"
    daemon.call("schedule.disable", {"name": "wf"})
    last = listed(daemon, "wf")
    assert last["last_run_id"] >= instance_id and last["target"]["kind"] == "workflow"


# -- overlap -----------------------------------------------------------------------------------------------------


def test_overlap_skip_waits_for_the_run_to_end_then_the_next_second_after_its_end(sched: Any, tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("slow", "task:gated", "* * * * * *", parameters={"lock": gate.path}))
    with subscribe(daemon) as client:
        first = next_state(client, "running", "schedule:slow")
        nothing_for(client, 2.5, "schedule:slow")  # two due times pass while it runs: nothing else starts
        slow = listed(daemon, "slow")
        assert slow["state"] == "running" and slow["running"] == [first["id"]] and slow["next_run"] is None
        gate.release()
        ended = next_state(client, "succeeded", "schedule:slow")
        second = next_state(client, "running", "schedule:slow")
    assert ended["id"] == first["id"] and second["id"] != first["id"]
    assert len(jobs_of(daemon, "slow")) >= 2
    quiesce(daemon, "slow")
    [due] = [due for run, due, _ in firings(daemon, "slow") if run == second["id"]]
    assert_first_after(run_ends(daemon, "slow")[first["id"]], due)  # the first second strictly after the end
    assert listed(daemon, "slow")["last_result"] in (None, "succeeded")


def test_overlap_queue_one_keeps_one_pending_run_of_the_due_times_that_come_while_its_run_goes(
    sched: Any, tmp_path: Path
) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched()
    with subscribe(daemon) as client:
        # Added once the client follows the events: a schedule there from the start could start its first run
        # before the subscription, on a loaded machine, and that run's "running" would never come to the client.
        rewrite(
            daemon, schedule("q1", "task:gated", "* * * * * *", parameters={"lock": gate.path}, overlap="queue_one")
        )
        first = next_state(client, "running", "schedule:q1")
        nothing_for(client, 2.5, "schedule:q1")  # two due times: one queued, the other dropped
        q1 = listed(daemon, "q1")
        assert q1["pending"] and q1["running"] == [first["id"]] and q1["next_run"] is not None
        assert len(jobs_of(daemon, "q1")) == 1
    assert "queued behind its run" in daemon.log() and "one run already waits" in daemon.log()
    gate.release()
    quiesce(daemon, "q1")


def test_overlap_queue_one_starts_its_pending_run_when_the_running_one_ends(sched: Any, tmp_path: Path) -> None:
    """At once, not at the next due time: the schedule has none in the test's time (its calendar is yearly), so
    the run that starts after the first ends can only be the one that waited. Triggers go through the overlap rule
    as due times do (docs/config.md, `overlap`)."""
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("q1", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, overlap="queue_one"))
    with subscribe(daemon) as client:
        triggered = daemon.call("schedule.trigger", {"name": "q1"})
        assert triggered["started"], triggered
        first = next_state(client, "running", "schedule:q1")
        assert first["id"] == triggered["run_id"]
        for queued in (True, False):  # the first waits; the second is dropped, the first standing for it
            again = daemon.call("schedule.trigger", {"name": "q1"})
            assert (again["started"], again["run_id"], again["queued"]) == (False, None, queued), again
        assert listed(daemon, "q1")["pending"]
        gate.release()
        ended = next_state(client, "succeeded", "schedule:q1")
        waited = next_state(client, "running", "schedule:q1")
        assert ended["id"] == first["id"] and waited["id"] != first["id"]
        assert next_state(client, "succeeded", "schedule:q1")["id"] == waited["id"]
    q1 = listed(daemon, "q1")
    assert not q1["pending"] and q1["last_run_id"] == waited["id"]
    assert [job["id"] for job in jobs_of(daemon, "q1")] == [waited["id"], first["id"]]  # newest first
    assert "one run already waits" in daemon.log()


def test_overlap_allow_starts_runs_while_the_previous_one_goes(sched: Any, tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("many", "task:gated", "* * * * * *", parameters={"lock": gate.path}, overlap="allow"))
    with subscribe(daemon) as client:
        first = next_state(client, "running", "schedule:many")
        second = next_state(client, "running", "schedule:many")
        many = listed(daemon, "many")
        assert {first["id"], second["id"]} <= set(many["running"]) and many["state"] == "running"
        daemon.call("schedule.disable", {"name": "many"})
        gate.release()
        ended: set[int] = set()
        while not {first["id"], second["id"]} <= ended:
            ended.add(next_state(client, "succeeded", "schedule:many")["id"])
    quiesce(daemon, "many")


GATED_WORKFLOW = """<workflow>
  <subjobs><job name="one"><tasks><task name="t" task="gated"><input>{lock}</input></task></tasks></job></subjobs>
</workflow>
"""


def test_a_job_and_an_instance_of_the_same_id_are_two_runs_of_one_schedule(sched: Any, tmp_path: Path) -> None:
    """Runs were kept by id alone: a schedule turned from a task into a workflow by a reload while its job 1 went
    started instance 1, listed one run, and the end of instance 1 ended both (job 1's end was never recorded)."""
    job_gate, instance_gate = Gate(tmp_path / "job"), Gate(tmp_path / "instance")
    daemon = sched(schedule("s", "task:gated", "0 0 1 1 *", parameters={"lock": job_gate.path}, overlap="allow"))
    job = daemon.call("schedule.trigger", {"name": "s"})["run_id"]
    (daemon.config_dir / "workflows" / "gated.xml").write_text(GATED_WORKFLOW.format(lock=instance_gate.path))
    rewrite(daemon, schedule("s", "workflow:gated", "0 0 1 1 *", overlap="allow"))
    daemon.call("daemon.reload")
    instance = daemon.call("schedule.trigger", {"name": "s"})["run_id"]
    assert instance == job  # job and instance ids are counted apart: the first of each
    both = listed(daemon, "s")
    assert (both["running"], both["state"]) == ([job, instance], "running"), both  # two runs, not one
    assert both["runs"] == [{"kind": "instance", "id": instance}, {"kind": "job", "id": job}], both
    instance_gate.release()
    wait_for_log(daemon, f"schedule s: run instance={instance} ended: succeeded")
    left = listed(daemon, "s")  # the job still goes
    assert (left["runs"], left["running"], left["state"]) == ([{"kind": "job", "id": job}], [job], "running"), left
    assert (left["last_run_id"], left["last_result"]) == (instance, "succeeded"), left
    job_gate.release()
    wait_for_log(daemon, f"schedule s: run job={job} ended: succeeded")
    after = listed(daemon, "s")
    assert (after["runs"], after["running"], after["state"]) == ([], [], "waiting"), after


def test_evqueues_scheduler_status_names_no_job_as_the_instance_of_a_workflow_schedule(
    sched: Any, tmp_path: Path
) -> None:
    """A task schedule turned into a workflow schedule by a reload while its jobs 1 and 2 went: evQueue's
    `<status type="scheduler"/>` showed it running with workflow_instance_id="2", the id of a job (no such instance,
    or another workflow's)."""
    gate = Gate(tmp_path / "job")
    daemon = sched(schedule("s", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, overlap="allow"))
    jobs = [daemon.call("schedule.trigger", {"name": "s"})["run_id"] for _ in range(2)]
    rewrite(daemon, schedule("s", "workflow:hello", "0 0 1 1 *", overlap="allow"))
    daemon.call("daemon.reload")
    with EvqClient(daemon.evqueue_socket) as client:
        entry = ok(client.ask(b'<status action="query" type="scheduler"/>'))[0][0]
    assert entry.get("workflow_instance_id") is None, entry.attrib
    assert entry.get("scheduled_at") == time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(epoch(listed(daemon, "s")["next_run"]))
    )
    instance = daemon.call("schedule.trigger", {"name": "s"})["run_id"]
    daemon.call("instance.wait", {"id": instance, "timeout": WAIT}, timeout=WAIT + 5)
    gate.release()
    for job in jobs:
        daemon.wait(job)


# -- failure, suspend --------------------------------------------------------------------------------------------


def test_on_failure_suspend_stops_the_schedule_until_it_is_enabled_again(sched: Any) -> None:
    daemon = sched()
    with subscribe(daemon) as client:
        # Added once the client follows the events: a schedule there from the start could fail and suspend itself
        # before the subscription, on a loaded machine, and no failure would come for the client to see.
        rewrite(daemon, schedule("flaky", "task:fail", "* * * * * *", on_failure="suspend"))
        failed = next_state(client, "failed", "schedule:flaky")
        nothing_for(client, 2.0, "schedule:flaky")
        flaky = listed(daemon, "flaky")
        assert flaky["state"] == "suspended" and flaky["suspended"] and flaky["next_run"] is None
        assert flaky["last_result"] == "failed" and flaky["last_run_id"] == failed["id"]
        enabled = daemon.call("schedule.enable", {"name": "flaky"})
        assert (
            not enabled["suspended"] and enabled["next_run"] is not None and enabled["state"] in ("waiting", "running")
        )
        again = next_state(client, "failed", "schedule:flaky")
    assert again["id"] != failed["id"]
    assert "suspended after a failed run" in daemon.log()


def test_a_workflow_that_ends_with_errors_suspends_its_schedule(sched: Any) -> None:
    daemon = sched()
    with subscribe(daemon) as client:
        rewrite(daemon, schedule("bad", "workflow:broken", ";;;;;", on_failure="suspend"))  # see the test above
        next_state(client, "failed", "instance:*")
        # The instance ends after its task's job, and the schedule hears of it after that: its end is awaited.
        wait_for_log(daemon, "schedule bad suspended after a failed run")
        nothing_for(client, 1.5, "none")  # time for a second run, were the schedule due still
    bad = listed(daemon, "bad")
    assert bad["suspended"] and bad["last_result"] == "failed"
    assert daemon.call("instance.list", {})["total"] == 1


def test_a_suspended_schedule_is_named_in_the_status_line_until_enabled_or_disabled(sched: Any) -> None:
    """ "The nightly run did not run": `systemctl status jobd` names the schedule a failure suspended and how to
    enable it again, and the journal's warning says so too, rather than leave it to `jobctl schedules`."""
    daemon = sched(schedule("nightly", "task:fail", "* * * * * *", on_failure="suspend"))
    pump = pump_of(daemon)
    named = "; schedules suspended after a failed run: nightly (jobctl schedule enable NAME)"
    assert pump.wait_for(lambda line: line.startswith("STATUS=") and "suspended" in line).endswith(named)
    wait_for_log(
        daemon,
        "WARNING schedule nightly suspended after a failed run (on_failure = suspend): it fires no more until "
        "`jobctl schedule enable nightly`",
    )
    # `jobctl status` says it too (daemon.status's suspended_schedules).
    assert daemon.call("daemon.status")["suspended_schedules"] == ["nightly"]
    told = run_jobctl("--socket", str(daemon.socket_path), "status")
    assert told.code == 0 and (
        "schedules:   suspended after a failed run: nightly (jobctl schedule enable NAME)\n" in told.out
    ), told
    daemon.call("schedule.disable", {"name": "nightly"})  # disabled: nothing would fire it, suspended or not
    assert pump.wait_for(lambda line: line.startswith("STATUS=") and "suspended" not in line)
    assert daemon.call("daemon.status")["suspended_schedules"] == []
    assert "schedules:" not in run_jobctl("--socket", str(daemon.socket_path), "status").out
    daemon.call("schedule.enable", {"name": "nightly"})  # it fires, fails and is suspended again
    assert pump.wait_for(lambda line: line.startswith("STATUS=") and "suspended" in line).endswith(named)


# -- restarts ----------------------------------------------------------------------------------------------------


def passed_while_down(daemon: Daemon, *names: str) -> float:
    """For a stopped jobd whose schedules (calendar YEARLY, in UTC) wait for the next 1 January: make that wait one
    that passed while jobd was down, as if it had stopped a year ago, by moving the saved state (the time waited for
    and the last run) back a year; no sleep until a due time. Returns the due time that passed."""
    now = dt.datetime.now(dt.UTC)
    passed = dt.datetime(now.year, 1, 1, tzinfo=dt.UTC).timestamp()
    coming = dt.datetime(now.year + 1, 1, 1, tzinfo=dt.UTC).timestamp()
    for name in names:
        row = saved_row(daemon, name)
        assert row["next_run"] == coming, row  # what jobd waited for is in its database
        set_saved(daemon, name, next_run=passed, last_run=row["last_run"] - (coming - passed))
    return passed


YEARLY = "0 0 1 1 *"


def test_catch_up_runs_once_at_start_up_when_a_due_time_passed_while_jobd_was_down(sched: Any) -> None:
    daemon = sched(
        schedule("late", "task:true", YEARLY, catch_up=True, timezone="UTC")
        + schedule("plain", "task:true", YEARLY, timezone="UTC")
    )
    triggered = {name: daemon.call("schedule.trigger", {"name": name}) for name in ("late", "plain")}
    for result in triggered.values():
        assert result["started"] and result["run_id"], result
        daemon.wait(result["run_id"])
    assert terminate(daemon) == 0
    due = passed_while_down(daemon, "late", "plain")
    start(daemon)
    late = listed(daemon, "late")
    assert late["last_run_id"] != triggered["late"]["run_id"]  # caught up at once, not waiting a year
    assert epoch(late["last_run"]) > due
    assert daemon.wait(late["last_run_id"])["state"] == "succeeded"
    assert len(jobs_of(daemon, "late")) == 2 and len(jobs_of(daemon, "plain")) == 1  # no catch_up: no run
    assert epoch(listed(daemon, "plain")["next_run"]) > time.time()
    assert "catching up once now" in daemon.log()


def test_catch_up_with_a_run_still_going_follows_the_overlap_rule(sched: Any, tmp_path: Path) -> None:
    """A run started before the stop, still going after it (back in its queue), made the catch-up skip the missed
    due time whatever the overlap rule: "allow" must start another run, "queue_one" queue one."""
    gate = Gate(tmp_path / "gate")
    keys: dict[str, Any] = {"catch_up": True, "parameters": {"lock": gate.path}, "timezone": "UTC"}
    daemon = sched(
        schedule("allowed", "task:gated", YEARLY, overlap="allow", **keys)
        + schedule("queued", "task:gated", YEARLY, overlap="queue_one", **keys)
    )
    first = {name: daemon.call("schedule.trigger", {"name": name})["run_id"] for name in ("allowed", "queued")}
    assert terminate(daemon) == 0  # their jobs go back to queued: the runs still go
    passed_while_down(daemon, "allowed", "queued")
    start(daemon)
    assert "catching up once now" in daemon.log()
    allowed, queued = listed(daemon, "allowed"), listed(daemon, "queued")
    assert [job["id"] for job in jobs_of(daemon, "allowed")][-1] == first["allowed"]
    assert len(jobs_of(daemon, "allowed")) == 2, allowed  # another run, beside the one still going
    assert (queued["pending"], queued["running"]) == (True, [first["queued"]]), queued
    gate.release()
    for job in jobs_of(daemon, "allowed"):
        assert daemon.wait(job["id"])["state"] == "succeeded"


def test_a_workflow_run_started_just_before_a_crash_is_not_run_again_by_the_catch_up(
    make_daemon: Any, tmp_path: Path
) -> None:
    """A kill -9 after a firing had launched its instance but before the schedule's state named it: the catch-up at
    the next start launched a second instance for the same due time (only a task's job was recognised as the run).
    jobd is held in the instance's first spawn by strace (which delays the return of its vfork) and killed there."""
    ran = tmp_path / "ran"
    os.mkfifo(ran)
    reader = os.open(ran, os.O_RDONLY | os.O_NONBLOCK)  # open throughout: the task's writes never block
    due_second = (int(time.time()) + 4) % 60
    daemon = make_daemon(
        BASE
        + f'[task.mark]\ncommand = ["/bin/sh", "-c", "echo ran > {ran}"]\n'
        + schedule("wf", "workflow:marked", f"{due_second} * * * * *", catch_up=True, overlap="allow"),
        start=False,
    )
    daemon.write_workflows(
        marked='<workflow><subjobs><job name="j"><tasks><task task="mark"/></tasks></job></subjobs></workflow>'
    )
    start(daemon)
    strace = held_in_spawn(daemon)
    try:
        # jobd waits in its vfork. Its first due time, or, if a loaded machine made the start outlast the seconds
        # given, the same second of the next minute: either is a firing whose instance jobd must not launch twice.
        assert select.select([reader], [], [], 90)[0], "the schedule's task did not run"
        os.kill(daemon.pid, signal.SIGKILL)  # first: jobd dies as strace lets it go
    finally:
        strace.kill()
        strace.wait(30)
    kill9(daemon)
    start(daemon)
    launched = daemon.call("instance.list", {"limit": 100})["instances"]
    assert [instance["comment"] for instance in launched] == ["schedule:wf"], launched
    assert "schedule wf: instance=1 was started for it before jobd stopped; it is its last run" in daemon.log()
    assert daemon.call("instance.wait", {"id": launched[0]["id"], "timeout": 30}, timeout=40)["status"] == "TERMINATED"
    terminate(daemon)
    os.close(reader)


def test_a_due_time_delayed_by_jitter_past_a_restart_still_runs(sched: Any) -> None:
    """Restarted after a calendar time but before its jitter had passed, jobd computed the next time from now (the
    next minute plus a new jitter), and that run was lost, with catch_up too. The time it waited for is kept. Here
    the calendar's time (midnight, UTC) has passed, and the time waited for, that midnight delayed by a jitter of up
    to a day, is made a few seconds after the restart in the saved state while jobd is down: no sleep."""
    daemon = sched(schedule("j", "task:true", "0 0 * * *", jitter=86400, timezone="UTC"))
    assert terminate(daemon) == 0
    waited = float(math.ceil(time.time()) + 10)  # room for the start, on a loaded machine too
    set_saved(daemon, "j", next_run=waited)
    start(daemon)
    assert epoch(listed(daemon, "j")["next_run"]) == waited  # not the next midnight plus a new jitter
    with subscribe(daemon) as client:
        job = next_state(client, "succeeded", "schedule:j", timeout=waited - time.time() + WAIT)
    assert epoch(job["created_at"]) >= waited  # that due time's run, not one started before it


def test_state_survives_a_restart(sched: Any) -> None:
    daemon = sched(
        schedule("kept", "task:true", "0 0 1 1 *")
        + schedule("off", "task:true", "0 0 1 1 *")
        + schedule("broke", "task:fail", "0 0 1 1 *", on_failure="suspend")
    )
    run = daemon.call("schedule.trigger", {"name": "kept"})["run_id"]
    daemon.wait(run)
    daemon.call("schedule.disable", {"name": "off"})
    failing = daemon.call("schedule.trigger", {"name": "broke"})["run_id"]
    daemon.wait(failing)
    before = {s["name"]: s for s in daemon.call("schedule.list")["schedules"]}
    assert before["kept"]["last_result"] == "succeeded" and before["broke"]["suspended"]
    assert terminate(daemon) == 0
    start(daemon)
    after = {s["name"]: s for s in daemon.call("schedule.list")["schedules"]}
    for name in ("kept", "off", "broke"):
        for key in ("last_run", "last_result", "last_run_id", "enabled", "suspended", "state", "next_run"):
            assert after[name][key] == before[name][key], (name, key)
    assert after["off"]["state"] == "disabled" and after["broke"]["state"] == "suspended"


def test_a_run_going_at_shutdown_is_followed_after_the_restart(sched: Any, tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("long", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}))
    run = daemon.call("schedule.trigger", {"name": "long"})["run_id"]
    assert terminate(daemon) == 0  # the job goes back to queued, the schedule's last_result stays open
    start(daemon)
    long = listed(daemon, "long")
    assert long["state"] == "running" and long["running"] == [run] and long["last_result"] is None
    gate.release()
    assert daemon.wait(run)["state"] == "succeeded"
    assert listed(daemon, "long")["last_result"] == "succeeded"
    assert "followed to its end" in daemon.log()


def test_a_queued_run_waits_on_across_a_restart_and_starts_when_the_running_one_ends(
    sched: Any, tmp_path: Path
) -> None:
    """overlap = "queue_one": the run waiting for the running one was kept in memory only, and a restart of jobd lost
    it without a word (pending false, nothing started when the first run ended)."""
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("q", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, overlap="queue_one"))
    first = daemon.call("schedule.trigger", {"name": "q"})["run_id"]
    assert daemon.call("schedule.trigger", {"name": "q"})["queued"] is True
    assert terminate(daemon) == 0
    start(daemon)
    q = listed(daemon, "q")
    assert (q["pending"], q["running"], q["state"]) == (True, [first], "running"), q
    assert "schedule q: its queued run still waits behind job=" in daemon.log()
    gate.release()
    assert daemon.wait(first)["state"] == "succeeded"
    queued = first + 1  # the next job: nothing else submits any
    wait_for_log(daemon, f"schedule q fired: job={queued}")
    assert daemon.wait(queued)["state"] == "succeeded"
    assert [job["id"] for job in jobs_of(daemon, "q")] == [queued, first]
    assert listed(daemon, "q")["pending"] is False


def test_a_queued_run_is_dropped_when_the_schedule_no_longer_queues(sched: Any, tmp_path: Path) -> None:
    """Queued under overlap = "queue_one", the run waiting started all the same after a reload (or a restart) that
    changed the rule to "skip", which never queues (found by a review)."""
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("q", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, overlap="queue_one"))
    first = daemon.call("schedule.trigger", {"name": "q"})["run_id"]
    assert daemon.call("schedule.trigger", {"name": "q"})["queued"] is True
    rewrite(daemon, schedule("q", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, overlap="skip"))
    daemon.call("daemon.reload")
    assert listed(daemon, "q")["pending"] is False
    with subscribe(daemon) as client:
        gate.release()
        assert next_state(client, "succeeded", "schedule:q")["id"] == first
        nothing_for(client, 1.0, "schedule:q")  # no queued run starts after it
    assert [job["id"] for job in jobs_of(daemon, "q")] == [first]


def test_a_queued_run_whose_running_one_ended_while_jobd_was_down_starts_at_the_start(
    sched: Any, tmp_path: Path
) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("q", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, overlap="queue_one"))
    first = daemon.call("schedule.trigger", {"name": "q"})["run_id"]
    assert daemon.call("schedule.trigger", {"name": "q"})["queued"] is True
    kill9(daemon)
    gate.release()  # the first run ends while jobd is down
    start(daemon)
    wait_for_log(daemon, "schedule q fired: job=", count=2)
    queued = int(daemon.log().rsplit("schedule q fired: job=", 1)[1].split()[0])
    assert queued > first  # numbered past the ids the killed jobd may have handed out: not always first + 1
    assert "schedule q: the run it had going ended while jobd was down; its queued run starts now" in daemon.log()
    assert daemon.wait(queued)["state"] == "succeeded"
    q = listed(daemon, "q")
    assert (q["pending"], q["last_run_id"], q["last_result"]) == (False, queued, "succeeded"), q
    assert [job["id"] for job in jobs_of(daemon, "q")] == [queued, first]


def test_a_run_going_at_kill_9_gets_its_result_from_the_recovered_job(sched: Any, tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("crash", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}))
    run = daemon.call("schedule.trigger", {"name": "crash"})["run_id"]
    kill9(daemon)
    gate.release()
    start(daemon)
    job = daemon.wait(run)  # recovered as a lost attempt; no retry policy: it has ended
    crash = listed(daemon, "crash")
    assert crash["last_run_id"] == run and crash["last_result"] == job["state"] and crash["state"] == "waiting"


def test_a_run_that_failed_while_jobd_was_down_suspends_its_schedule(sched: Any, tmp_path: Path) -> None:
    """on_failure = "suspend" held only for a run that ended while jobd ran: one found failed at the start (lost in
    a crash here) left the schedule waiting."""
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("crash", "task:gated", "* * * * *", parameters={"lock": gate.path}, on_failure="suspend"))
    run = daemon.call("schedule.trigger", {"name": "crash"})["run_id"]
    kill9(daemon)
    gate.release()
    start(daemon)
    assert daemon.wait(run)["state"] == "failed"  # recovered as a lost attempt; no retry policy: it has ended
    crash = listed(daemon, "crash")
    assert (crash["state"], crash["suspended"], crash["next_run"]) == ("suspended", True, None), crash
    assert crash["last_run_id"] == run and crash["last_result"] == "failed", crash
    assert "its last run ended while jobd was down: failed" in daemon.log()


# -- reload ------------------------------------------------------------------------------------------------------


def test_reload_recomputes_an_edited_schedule_forgets_a_removed_one_and_starts_a_new_one(
    sched: Any, tmp_path: Path
) -> None:
    gate = Gate(tmp_path / "gate")
    yearly = schedule("edit", "task:true", "0 0 1 1 *")
    busy = schedule("gone", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path})
    daemon = sched(yearly + busy)
    assert epoch(listed(daemon, "edit")["next_run"]) > time.time() + 60
    running = daemon.call("schedule.trigger", {"name": "gone"})["run_id"]
    # overlap "allow" for "edit": with "skip", next_run is null while a run goes, and the listing below could come
    # during its first run.
    edited = schedule("edit", "task:true", "* * * * * *", overlap="allow")
    rewrite(daemon, edited + schedule("new", "task:true", "* * * * * *"))
    daemon.call("daemon.reload")
    names = [s["name"] for s in daemon.call("schedule.list")["schedules"]]
    assert names == ["edit", "new"]
    assert epoch(listed(daemon, "edit")["next_run"]) <= time.time() + 1.5  # recomputed at once
    with subscribe(daemon) as client:
        next_state(client, "running", "schedule:edit")
        next_state(client, "running", "schedule:new")
        assert daemon.call("job.get", {"id": running})["state"] == "running"  # left alone
        gate.release()
        assert next_state(client, "succeeded", "schedule:gone")["id"] == running
        nothing_for(client, 1.5, "schedule:gone")  # fires no more
    assert len(jobs_of(daemon, "gone")) == 1
    quiesce(daemon, "edit", "new")
    with pytest.raises(RemoteError) as gone:
        daemon.call("schedule.trigger", {"name": "gone"})
    assert gone.value.code == "UNKNOWN_SCHEDULE"


def test_a_reload_that_would_make_a_schedule_fail_at_every_firing_is_refused_whole(sched: Any) -> None:
    """The schedule's parameters are checked against its task as job.submit checks them: a task turned into an HTTP
    request (which takes no params) passed the reload, and every firing then failed with "cannot start its task"."""
    env_task = '[task.notify]\ncommand = ["/bin/true"]\nparameters = "env"\n\n'
    notify = schedule("notify", "task:notify", "0 0 1 1 *", parameters={"A": "1"})
    daemon = sched(env_task + notify)
    rewrite(daemon, '[task.notify]\nhttp = { url = "http://127.0.0.1:9/" }\n\n' + notify)
    with pytest.raises(RemoteError) as refused:
        daemon.call("daemon.reload")
    error = refused.value
    path = daemon.config_dir / "jobd.toml"
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("parameters = {"))
    assert error.code == "CONFIG_INVALID", error
    assert (error.data["file"], error.data["line"], error.data["key"]) == (
        str(path),
        line,
        "schedule.notify.parameters",
    )
    assert (
        "task 'notify' makes an HTTP request: it takes no 'args', 'params', 'stdin' or 'merge_stderr'" in error.message
    )
    # The running configuration is kept: its schedule still starts its command task.
    run = daemon.call("schedule.trigger", {"name": "notify"})["run_id"]
    assert daemon.wait(run)["state"] == "succeeded"
    assert listed(daemon, "notify")["last_result"] == "succeeded"


def test_a_schedule_removed_and_added_back_while_its_run_goes_finds_that_run(sched: Any, tmp_path: Path) -> None:
    """Its runs were forgotten with it: added back, it saw none going and, with overlap "skip", started a second
    run beside the first. It takes them back, as a restart finds the run it had going."""
    gate = Gate(tmp_path / "gate")
    slow = schedule("slow", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path})
    daemon = sched(slow)
    run = daemon.call("schedule.trigger", {"name": "slow"})["run_id"]
    rewrite(daemon, "")
    daemon.call("daemon.reload")
    rewrite(daemon, slow)
    daemon.call("daemon.reload")
    back = listed(daemon, "slow")
    assert (back["state"], back["running"], back["last_run_id"], back["next_run"]) == ("running", [run], run, None)
    triggered = daemon.call("schedule.trigger", {"name": "slow"})
    assert (triggered["started"], triggered["run_id"]) == (False, None), triggered  # overlap "skip"
    assert terminate(daemon) == 0  # the run is in the saved state: a restart follows it as well
    start(daemon)
    assert listed(daemon, "slow")["running"] == [run]
    gate.release()
    assert daemon.wait(run)["state"] == "succeeded"
    after = listed(daemon, "slow")
    assert (after["state"], after["last_result"]) == ("waiting", "succeeded"), after
    assert [job["id"] for job in jobs_of(daemon, "slow")] == [run]


def test_a_schedule_removed_while_its_run_goes_finds_that_run_when_added_back_after_a_restart(
    sched: Any, tmp_path: Path
) -> None:
    """Its state, with the link to its run, was deleted at the removal (and at a start that found it removed): added
    back after a restart, by a reload or while jobd was down, it saw no run going and, with overlap "skip", started
    a second one beside the first. Its last run is kept saved while it goes."""
    gate = Gate(tmp_path / "gate")
    slow = schedule("slow", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, on_failure="suspend")
    daemon = sched(slow)
    run = daemon.call("schedule.trigger", {"name": "slow"})["run_id"]
    rewrite(daemon, "")
    daemon.call("daemon.reload")
    assert terminate(daemon) == 0
    start(daemon)  # removed: not listed, its run followed
    assert daemon.call("schedule.list")["schedules"] == []
    assert f"schedule slow is not in the configuration; its job={run} is still going" in daemon.log()
    rewrite(daemon, slow)
    daemon.call("daemon.reload")  # added back by a reload
    back = listed(daemon, "slow")
    assert (back["state"], back["running"], back["last_run_id"], back["next_run"]) == ("running", [run], run, None)
    assert daemon.call("schedule.trigger", {"name": "slow"})["started"] is False  # overlap "skip"
    rewrite(daemon, "")
    daemon.call("daemon.reload")
    assert terminate(daemon) == 0
    rewrite(daemon, slow)  # added back while jobd was down
    start(daemon)
    back = listed(daemon, "slow")
    assert (back["state"], back["running"], back["last_run_id"], back["next_run"]) == ("running", [run], run, None)
    assert daemon.call("schedule.trigger", {"name": "slow"})["started"] is False
    gate.release()
    assert daemon.wait(run)["state"] == "succeeded"
    after = listed(daemon, "slow")
    assert (after["state"], after["last_result"], after["suspended"]) == ("waiting", "succeeded", False), after
    assert [job["id"] for job in jobs_of(daemon, "slow")] == [run]


def test_the_kept_state_of_a_removed_schedule_is_forgotten_when_its_run_ends(sched: Any, tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("slow", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}))
    run = daemon.call("schedule.trigger", {"name": "slow"})["run_id"]
    rewrite(daemon, "")
    daemon.call("daemon.reload")
    assert terminate(daemon) == 0
    assert saved_row(daemon, "slow")["last_run_id"] == run  # kept while the run goes
    start(daemon)
    gate.release()
    assert daemon.wait(run)["state"] == "succeeded"
    wait_for_log(daemon, f"schedule slow: its run job={run}, started before it was removed, ended: succeeded")
    assert terminate(daemon) == 0
    assert saved_row(daemon, "slow") == {}


def test_an_edit_of_enabled_in_the_file_overrides_the_apis_word(sched: Any) -> None:
    daemon = sched(schedule("s", "task:true", "0 0 1 1 *"))
    daemon.call("schedule.disable", {"name": "s"})
    rewrite(daemon, schedule("s", "task:true", "0 0 1 1 *", jitter=0))  # same meaning: the API's word stays
    daemon.call("daemon.reload")
    assert listed(daemon, "s")["state"] == "disabled"
    rewrite(daemon, schedule("s", "task:true", "0 0 1 1 *", enabled=False))
    daemon.call("daemon.reload")
    rewrite(daemon, schedule("s", "task:true", "0 0 1 1 *", enabled=True))
    daemon.call("daemon.reload")
    assert listed(daemon, "s")["state"] == "waiting"


def test_an_edit_of_enabled_made_while_jobd_was_stopped_overrides_the_apis_word(sched: Any) -> None:
    """The API's word lasts until the file's `enabled` changes, also when it changes while jobd is stopped: the
    state keeps the file's value under which the word was given, as a queue's API pause does."""
    daemon = sched(schedule("s", "task:true", "0 0 1 1 *", enabled=False) + schedule("t", "task:true", "0 0 1 1 *"))
    daemon.call("schedule.disable", {"name": "s"})
    daemon.call("schedule.disable", {"name": "t"})
    assert terminate(daemon) == 0
    rewrite(daemon, schedule("s", "task:true", "0 0 1 1 *", enabled=True) + schedule("t", "task:true", "0 0 1 1 *"))
    start(daemon)
    s, t = listed(daemon, "s"), listed(daemon, "t")
    assert (s["state"], s["enabled"]) == ("waiting", True), s
    assert (t["state"], t["enabled"]) == ("disabled", False), t  # its `enabled` did not change: the API's word stays
    assert "`enabled` changed in the configuration to true: it overrides the API's disable" in daemon.log()
    daemon.call("schedule.enable", {"name": "s"})  # a word given under `enabled = true` ...
    assert terminate(daemon) == 0
    rewrite(daemon, schedule("s", "task:true", "0 0 1 1 *", enabled=False) + schedule("t", "task:true", "0 0 1 1 *"))
    start(daemon)
    assert listed(daemon, "s")["state"] == "disabled"  # ... is overridden by `enabled = false` set while down


def test_an_api_word_saved_before_schema_19_takes_the_files_enabled_of_the_first_start(sched: Any) -> None:
    """A row from before schema 19 does not say under which `enabled` the API's word was given: the first start
    keeps the word (jobd cannot tell whether the file changed meanwhile) and records the file's value of that start,
    so that a later edit, even made while jobd is stopped, overrides it."""
    daemon = sched(schedule("s", "task:true", "0 0 1 1 *", enabled=False))
    daemon.call("schedule.disable", {"name": "s"})
    assert terminate(daemon) == 0
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as raw, raw:
        raw.execute("UPDATE schedule SET config_enabled = NULL")  # as migration 19 leaves an older row
    start(daemon)
    assert listed(daemon, "s")["state"] == "disabled"
    assert terminate(daemon) == 0
    rewrite(daemon, schedule("s", "task:true", "0 0 1 1 *", enabled=True))
    start(daemon)
    assert listed(daemon, "s")["state"] == "waiting"


# -- clock changes -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="setting CLOCK_REALTIME needs root")
def test_a_clock_change_re_arms_the_timer_and_the_schedule_fires_at_its_time(sched: Any) -> None:
    due_second = (int(time.time()) + 4) % 60
    daemon = sched(schedule("at", "task:true", f"{due_second} * * * * *"))
    due = epoch(listed(daemon, "at")["next_run"])
    with subscribe(daemon) as client:
        # Setting the clock to its own value moves it by microseconds, but the kernel cancels every
        # TFD_TIMER_CANCEL_ON_SET timer all the same: without the re-arm this schedule would never fire.
        time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))
        job = next_state(client, "running", "schedule:at", timeout=due - time.time() + WAIT)
    assert "the system clock was set: due times recomputed, timer re-armed" in daemon.log()
    quiesce(daemon, "at")  # its run must have ended (and been reaped) before the teardown looks for zombies
    [(run, fired_due, moment)] = firings(daemon, "at")
    assert run == job["id"] and fired_due == due and moment >= due - DUE_MARGIN, (fired_due, moment)  # at its time
    assert epoch(job["started_at"]) >= due - DUE_MARGIN, (job["started_at"], due)


def saved_row(daemon: Daemon, name: str) -> dict[str, Any]:
    """The schedule's row in the database of a stopped daemon."""
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as raw:
        raw.row_factory = sqlite3.Row
        row = raw.execute("SELECT * FROM schedule WHERE name = ?", (name,)).fetchone()
    return dict(row) if row is not None else {}


def set_saved(daemon: Daemon, name: str, **values: Any) -> None:
    with contextlib.closing(sqlite3.connect(daemon.state_dir / "jobd.sqlite3")) as raw, raw:
        for key, value in values.items():
            raw.execute(f"UPDATE schedule SET {key} = ? WHERE name = ?", (value, name))


def test_a_schedule_enabled_in_its_file_while_jobd_was_down_catches_up_nothing_it_missed_while_disabled(
    sched: Any,
) -> None:
    """Disabled in the file (a reload), then enabled again in the file while jobd was down: the start caught up the
    calendar times since its last run, which passed while it was disabled, where the same enable made by a reload
    waits for the next time. The last run is made older than a calendar time instead of waiting for one to pass."""
    yearly = "0 0 1 1 *"
    daemon = sched(schedule("y", "task:true", yearly, catch_up=True))
    run = daemon.call("schedule.trigger", {"name": "y"})["run_id"]
    daemon.wait(run)
    rewrite(daemon, schedule("y", "task:true", yearly, catch_up=True, enabled=False))
    daemon.call("daemon.reload")
    assert listed(daemon, "y")["state"] == "disabled"
    assert terminate(daemon) == 0
    set_saved(daemon, "y", last_run=time.time() - 400 * 86400)  # a 1 January passed since (while it was disabled)
    rewrite(daemon, schedule("y", "task:true", yearly, catch_up=True))
    start(daemon)
    y = listed(daemon, "y")
    assert (y["state"], y["last_run_id"]) == ("waiting", run), y
    assert epoch(y["next_run"]) > time.time() and "catching up" not in daemon.log()
    assert [job["id"] for job in jobs_of(daemon, "y")] == [run]


@pytest.mark.parametrize("toggled", [False, True])
def test_a_schedule_enabled_again_while_its_run_goes_catches_up_after_that_run_as_one_never_disabled(
    sched: Any, tmp_path: Path, toggled: bool
) -> None:
    """With overlap "skip" the next time is computed when the run going ends; a start that finds that run ended
    while jobd was down catches up from its start (config.md, catch_up). Disabled and enabled again while the run
    went, the schedule was as before, but its state still said it was not waiting for the run (the disable's
    word): the start caught up nothing."""
    gate = Gate(tmp_path / "gate")
    yearly = "0 0 1 1 *"
    daemon = sched(schedule("y", "task:gated", yearly, parameters={"lock": gate.path}, catch_up=True))
    run = daemon.call("schedule.trigger", {"name": "y"})["run_id"]
    if toggled:
        daemon.call("schedule.disable", {"name": "y"})
        daemon.call("schedule.enable", {"name": "y"})
    y = listed(daemon, "y")
    assert (y["state"], y["running"], y["next_run"]) == ("running", [run], None), y  # computed when the run ends
    kill9(daemon)
    gate.release()
    set_saved(daemon, "y", last_run=time.time() - 400 * 86400)  # a 1 January passed since the run's start
    start(daemon)
    assert daemon.wait(run)["state"] == "failed"  # lost in the crash: it ended while jobd was down
    assert "schedule y: a due time was missed while jobd was down; catching up once now" in daemon.log()
    [caught_up] = [job["id"] for job in jobs_of(daemon, "y") if job["id"] != run]
    assert daemon.wait(caught_up)["state"] == "succeeded"


def test_the_due_time_fired_is_saved_and_a_clock_behind_it_does_not_fire_it_again(sched: Any) -> None:
    """Setting the clock back across a due time that had fired fired it again: the next time was counted from the
    new "now" alone. The due time fired is saved (a trigger is not one), and the next time comes after it. The
    clock itself is not set here (a shared machine): a start with the saved due time ahead of the clock is the
    same case for the scheduler (the clock set back while jobd was down)."""
    due_second = (int(time.time()) + 3) % 60
    daemon = sched(schedule("at", "task:true", f"{due_second} * * * * *"))
    with subscribe(daemon) as client:
        # Listed once the client follows the events, so that the due time listed fires after the subscription (one
        # listed before could fire, and its job end, before it, when the start took about 3 s). The run of the due
        # time before (the start took longer) may still end after the subscription: its job was made a minute
        # before `due`.
        due = epoch(listed(daemon, "at")["next_run"])
        run = next_state(client, "succeeded", "schedule:at", timeout=due - time.time() + WAIT)
        if epoch(run["created_at"]) < due - 1:
            next_state(client, "succeeded", "schedule:at", timeout=due - time.time() + WAIT)
    triggered = daemon.call("schedule.trigger", {"name": "at"})["run_id"]
    daemon.wait(triggered)
    assert terminate(daemon) == 0
    assert saved_row(daemon, "at")["last_due"] == due  # the trigger left it
    # Ten minutes ahead of the clock, for a calendar due every second: nothing is due before it. (overlap "allow":
    # with "skip", next_run is null while a run goes, and once the clock is taken as it is below, a run starts each
    # second: the listing could come during one.)
    rewrite(daemon, schedule("at", "task:true", "* * * * * *", overlap="allow"))
    ahead = time.time() + 600
    set_saved(daemon, "at", last_due=ahead)
    start(daemon)
    assert epoch(listed(daemon, "at")["next_run"]) == math.floor(ahead) + 1
    assert "the clock is" in daemon.log() and "before the due time it last fired" in daemon.log()
    # Four hours ahead (more than 3): the clock is taken as it is.
    assert terminate(daemon) == 0
    set_saved(daemon, "at", last_due=time.time() + 4 * 3600)
    start(daemon)
    assert epoch(listed(daemon, "at")["next_run"]) <= time.time() + 1
    assert "its next time is counted from now and may repeat one already fired" in daemon.log()
    quiesce(daemon, "at")


def test_a_clock_set_back_days_while_jobd_was_down_does_not_hold_a_schedule_until_its_old_next_time(
    sched: Any,
) -> None:
    """The clock set back two days while jobd was stopped (a machine booted with its clock ahead, then corrected):
    every time the schedule saved is two days ahead of the clock, its next time too. The start kept that next time
    (as it keeps a due time whose jitter delay runs across a restart), so an every-minute schedule ran nothing for
    two days, where the documentation says that a clock more than 3 hours behind the due time last fired is taken
    as it is. A saved next time is now kept only when the calendar time it stands for has come."""
    daemon = sched(schedule("minutely", "task:true", "* * * * *", overlap="allow"))
    fired = daemon.call("schedule.trigger", {"name": "minutely"})["run_id"]
    daemon.wait(fired)
    assert terminate(daemon) == 0
    saved = saved_row(daemon, "minutely")
    two_days = 2 * 86400
    ahead = math.floor(time.time() / 60) * 60 + two_days  # a whole minute: one of the calendar's times
    set_saved(daemon, "minutely", last_due=ahead - 60, last_run=saved["last_run"] + two_days, next_run=ahead)
    start(daemon)
    assert epoch(listed(daemon, "minutely")["next_run"]) <= time.time() + 60
    assert "its next time is counted from now and may repeat one already fired" in daemon.log()
    quiesce(daemon, "minutely")


# -- DST, crossed by a running daemon ----------------------------------------------------------------------------

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def compile_zone(directory: Path, offset: str, change: tuple[int, str] | None = None) -> Path:
    """A zone file, compiled by zic as tzdata's are, at UTC offset `offset` (zic's `[-]h:mm:ss`), and with
    `change` = (moment, offset) at that offset from that Unix second on: a DST change a few seconds ahead, for a
    daemon to cross for real (tzdata's next one may be months away, and the clock is not the test's to set)."""
    line = f"Zone Test/Jump {offset} - BEFORE"
    if change is not None:
        at = time.gmtime(change[0])
        line += f" {at.tm_year} {_MONTHS[at.tm_mon - 1]} {at.tm_mday} {at.tm_hour}:{at.tm_min:02d}:{at.tm_sec:02d}u"
        line += f"\n\t{change[1]} - AFTER"
    source = directory / "jump.zi"
    source.write_text(line + "\n")
    subprocess.run(["zic", "-d", str(directory), str(source)], check=True, capture_output=True, timeout=60)
    return directory / "Test" / "Jump"


def fixed_time(wall: float) -> str:
    """A fixed-time calendar (no field starts with `*`) due once, at this wall-clock time (a Unix second read as
    UTC: the zone's wall time, given its offset), on this day of this year."""
    at = time.gmtime(wall)
    return f"{at.tm_sec} {at.tm_min} {at.tm_hour} {at.tm_mday} {at.tm_mon} *"


@pytest.fixture
def zoned(make_daemon: Any, tmp_path: Path) -> Iterator[Any]:
    """A started daemon with BASE and no schedule whose local zone (its $TZ) is the file `compile_zone(tmp_path, …)`
    writes, for now at UTC: a test writes it again with a change ahead, and its schedules, and reloads."""
    made: list[Daemon] = []
    zones = tmp_path / "zones"
    zones.mkdir()
    daemon: Daemon = make_daemon(BASE, start=False)
    daemon.env["TZ"] = f":{compile_zone(zones, '0')}"
    start(daemon)
    made.append(daemon)
    yield SimpleNamespace(daemon=daemon, zones=zones)
    stop_pumps(made)


def test_a_daemon_crossing_a_spring_forward_runs_a_fixed_time_it_skips_once_at_the_jump(zoned: Any) -> None:
    """The local clock jumps 5 s ahead (a spring-forward, 5 s long rather than an hour): a fixed time inside the
    jump does not exist that day; the documented rule (Vixie cron's) runs it at the jump. croniter moves such a
    time on by whole minutes, so jobd ran it 57 s after the jump here (and a daily `30 30 2 * * *` at 03:00:30)."""
    daemon = zoned.daemon
    jump = int(time.time()) + 6  # the margin is for the reload below, which must be over before it
    compile_zone(zoned.zones, "0", (jump, "0:00:05"))  # local times jump+0 … jump+4 (read as UTC) never come
    rewrite(daemon, schedule("skipped", "task:true", fixed_time(jump + 2)))
    with subscribe(daemon) as client:
        daemon.call("daemon.reload")
        job = next_state(client, "succeeded", "schedule:skipped", timeout=jump - time.time() + WAIT)
    assert epoch(job["created_at"]) >= jump, job
    assert len(jobs_of(daemon, "skipped")) == 1
    assert epoch(listed(daemon, "skipped")["next_run"]) > jump + 300 * 86400  # next year's
    assert terminate(daemon) == 0
    assert saved_row(daemon, "skipped")["last_due"] == jump  # due at the jump itself


def test_a_daemon_crossing_a_fall_back_runs_a_fixed_time_it_repeats_once_and_a_wildcard_in_both_passes(
    zoned: Any,
) -> None:
    """The local clock goes back 5 s (a fall-back, 5 s long rather than an hour): the local times of the 5 s before
    the change come again after it. A fixed time among them runs once, in the first pass, and a calendar whose
    seconds field is `*` runs at each of its times as they come, in both passes. A fixed time after the change,
    whose run is awaited, shows that the second pass has gone by."""
    daemon = zoned.daemon
    change = int(time.time()) + 8  # the first pass of `repeated` (change - 3) must come after the reload below
    compile_zone(zoned.zones, "0:00:05", (change, "0"))  # local times change+0 … change+4 (read as UTC) come twice
    rewrite(
        daemon,
        schedule("repeated", "task:true", fixed_time(change + 2))
        + schedule("after", "task:true", fixed_time(change + 8))
        + schedule("tick", "task:true", "* * * * * *", overlap="allow"),
    )
    with subscribe(daemon) as client:
        daemon.call("daemon.reload")
        next_state(client, "succeeded", "schedule:after", timeout=change - time.time() + 8 + WAIT)
    assert len(jobs_of(daemon, "repeated")) == 1
    daemon.call("schedule.disable", {"name": "tick"})
    for job in jobs_of(daemon, "tick"):
        daemon.wait(job["id"])
    assert terminate(daemon) == 0
    assert saved_row(daemon, "repeated")["last_due"] == change - 3  # its first pass
    # The 5 s before the change and the 5 s after it, which the local clock showed as the same 5 s: each was due,
    # as every second is (overlap "allow": the next due time is the first second after the moment one fired).
    ticks = firings(daemon, "tick")
    assert ticks[0][1] <= change - 5 and ticks[-1][1] >= change + 4, (ticks, change)
    for (_, _, moment), (_, due, _) in itertools.pairwise(ticks):
        assert_first_after(moment, due)


# -- API, jobctl, evQueue ----------------------------------------------------------------------------------------


def test_schedule_methods_refuse_unknown_names_and_bad_parameters(sched: Any) -> None:
    assert sched().call("schedule.list") == {"schedules": []}
    daemon = sched(schedule("one", "task:true", "0 0 1 1 *"))
    for method in ("schedule.enable", "schedule.disable", "schedule.trigger"):
        with pytest.raises(RemoteError) as unknown:
            daemon.call(method, {"name": "nope"})
        assert unknown.value.code == "UNKNOWN_SCHEDULE" and unknown.value.rpc_code == -32013
        assert unknown.value.data["allowed"] == ["one"] and "nope" in unknown.value.message
        with pytest.raises(RemoteError) as missing:
            daemon.call(method, {})
        assert missing.value.code == "INVALID_PARAMS"
    with pytest.raises(RemoteError) as extra:
        daemon.call("schedule.list", {"name": "one"})
    assert extra.value.code == "INVALID_PARAMS"
    disabled = daemon.call("schedule.disable", {"name": "one"})
    assert disabled["state"] == "disabled" and not disabled["enabled"] and disabled["next_run"] is None
    enabled = daemon.call("schedule.enable", {"name": "one"})
    assert enabled["state"] == "waiting" and enabled["enabled"] and enabled["next_run"] is not None
    keys = set(enabled)
    assert {"name", "target", "calendar", "timezone", "overlap", "on_failure", "enabled", "suspended"} <= keys
    assert {"next_run", "last_run", "last_result", "last_run_id", "state"} <= keys


def test_trigger_obeys_overlap_skip(sched: Any, tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("s", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}))
    first = daemon.call("schedule.trigger", {"name": "s"})
    assert first["started"] and not first["queued"] and first["schedule"]["state"] == "running"
    second = daemon.call("schedule.trigger", {"name": "s"})
    assert not second["started"] and second["run_id"] is None
    gate.release()
    assert daemon.wait(first["run_id"])["state"] == "succeeded"


def test_trigger_with_overlap_queue_one_says_whether_its_run_was_queued(sched: Any, tmp_path: Path) -> None:
    """A trigger while one run already waited was answered `queued: true` and audited "queued", while the run was
    dropped (the log said "not started, one run already waits")."""
    gate = Gate(tmp_path / "gate")
    daemon = sched(schedule("q", "task:gated", "0 0 1 1 *", parameters={"lock": gate.path}, overlap="queue_one"))
    first = daemon.call("schedule.trigger", {"name": "q"})
    assert (first["started"], first["queued"]) == (True, False), first
    second = daemon.call("schedule.trigger", {"name": "q"})
    assert (second["started"], second["queued"], second["schedule"]["pending"]) == (False, True, True), second
    third = daemon.call("schedule.trigger", {"name": "q"})
    assert (third["started"], third["run_id"], third["queued"]) == (False, None, False), third
    assert third["schedule"]["pending"] and third["schedule"]["running"] == [first["run_id"]], third
    told = run_jobctl("--socket", str(daemon.socket_path), "schedule", "trigger", "q")
    assert told.code == 0, told
    assert (
        told.out.strip() == "schedule q: not started, one run already waits behind its running run (overlap queue_one)"
    )
    audited = daemon.call("audit.list", {"command": "schedule.trigger", "limit": 10})["entries"]
    assert [entry["message"] for entry in reversed(audited)] == [
        f"run {first['run_id']}",
        "queued",
        "not started",
        "not started",
    ]
    assert daemon.log().count("not started, one run already waits") == 2
    gate.release()
    assert daemon.wait(first["run_id"])["state"] == "succeeded"
    queued = first["run_id"] + 1  # the next job: nothing else submits any
    wait_for_log(daemon, f"schedule q fired: job={queued}")  # the one queued run
    assert daemon.wait(queued)["state"] == "succeeded"
    assert [job["id"] for job in jobs_of(daemon, "q")] == [queued, first["run_id"]]


def test_jobctl_schedules_and_schedule_commands(sched: Any) -> None:
    daemon = sched(schedule("nightly", "task:true", "0 3 * * *") + schedule("wf", "workflow:hello", "0;0;3;;;"))
    sock = ["--socket", str(daemon.socket_path)]
    table = run_jobctl(*sock, "schedules")
    assert table.code == 0, table
    header, *rows = table.out.splitlines()
    assert header.split() == ["NAME", "TARGET", "CALENDAR", "STATE", "NEXT", "LAST", "OVERLAP"]
    assert rows[0].split()[:3] == ["nightly", "task", "true"] and "waiting" in rows[0]
    assert rows[1].startswith("wf") and "workflow hello" in rows[1] and "0;0;3;;;" in rows[1]
    disabled = run_jobctl(*sock, "schedule", "disable", "nightly")
    assert disabled.code == 0 and disabled.out.strip() == "schedule nightly disabled", disabled
    assert listed(daemon, "nightly")["state"] == "disabled"
    enabled = run_jobctl(*sock, "schedule", "enable", "nightly")
    assert enabled.code == 0 and enabled.out.strip() == "schedule nightly enabled", enabled
    triggered = run_jobctl(*sock, "schedule", "trigger", "nightly")
    assert triggered.code == 0 and triggered.out.startswith("schedule nightly triggered: job "), triggered
    job_id = int(triggered.out.split()[-1])
    assert daemon.wait(job_id)["context"] == "schedule:nightly"
    as_json = run_jobctl(*sock, "--json", "schedules")
    assert as_json.code == 0 and '"schedules"' in as_json.out
    unknown = run_jobctl(*sock, "schedule", "trigger", "nope")
    assert unknown.code == 1 and "UNKNOWN_SCHEDULE" in unknown.err
    usage = run_jobctl(*sock, "schedule", "pause", "nightly")
    assert usage.code == 2


def test_jobctl_schedules_shows_a_next_run_beyond_a_dst_change_at_that_days_local_time(sched: Any) -> None:
    """`jobctl schedules` showed the next run in the UTC offset of the moment it ran, not that of the next run's
    date: in Paris in winter, a run at 12:00 on a summer date was shown at 11:00. The calendar names a day just
    after Paris's next change of offset, whichever it is from today."""
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    now = dt.datetime.now(paris)
    day = now
    while day.utcoffset() == now.utcoffset():
        day += dt.timedelta(days=1)
    day += dt.timedelta(days=2)  # past the change: the offset differs from today's
    calendar = f"0 12 {day.day} {day.month} *"
    daemon = sched(schedule("beyond", "task:true", calendar, timezone="Europe/Paris"))
    assert dt.datetime.fromtimestamp(epoch(listed(daemon, "beyond")["next_run"]), paris).hour == 12
    table = run_jobctl("--socket", str(daemon.socket_path), "schedules", env={"TZ": "Europe/Paris"})
    assert table.code == 0, table
    [row] = table.out.splitlines()[1:]
    assert f"{day:%Y-%m-%d} 12:00" in row, row


def test_evqueue_status_scheduler_and_workflow_schedules_list(sched: Any, tmp_path: Path) -> None:
    daemon = sched(
        schedule("b_daily", "workflow:hello", "0;0;3;;;", on_failure="suspend")
        + schedule("a_param", "workflow:hello", "0 4 * * *", enabled=False)
        + schedule("c_task", "task:true", "0 5 * * *")
    )
    running = daemon.call("schedule.trigger", {"name": "b_daily"})["run_id"]
    with EvqClient(daemon.evqueue_socket) as client:
        status = ok(client.ask(b'<status action="query" type="scheduler"/>'))[0]
        listed_xml = ok(client.ask(b'<workflow_schedules action="list" display_parameters="yes"/>'))
        workflows = ok(client.ask(b'<workflows action="list"/>'))
    assert status.tag == "status"
    [entry] = list(status)  # a_param is disabled, c_task is not a workflow
    assert entry.get("workflow_schedule_id") == "2" and entry.get("name") == "hello"
    scheduled = entry.get("scheduled_at")
    if scheduled == "running":
        assert entry.get("workflow_instance_id") == str(running)
    else:
        assert len(scheduled or "") == 19 and scheduled.endswith("03:00:00")  # type: ignore[union-attr]
    hello_id = next(w.get("id") for w in workflows if w.get("name") == "hello")
    rows = [dict(row.attrib) for row in listed_xml]
    assert rows == [
        {
            "id": "1",
            "node": "any",
            "workflow_id": hello_id,
            "schedule": "0;0;4;;;",  # in evQueue's format, which its clients read
            "onfailure": "CONTINUE",
            "user": "",
            "host": "",
            "active": "0",
            "comment": "a_param",
            "workflow_name": "hello",
            "workflow_group": "",
        },
        {
            "id": "2",
            "node": "any",
            "workflow_id": hello_id,
            "schedule": "0;0;3;;;",
            "onfailure": "SUSPEND",
            "user": "",
            "host": "",
            "active": "1",
            "comment": "b_daily",
            "workflow_name": "hello",
            "workflow_group": "",
        },
    ]
    assert etree.tostring(listed_xml[0]).count(b"<parameter") == 0
    daemon.call("instance.wait", {"id": running, "timeout": WAIT})
    with EvqClient(daemon.evqueue_socket) as client:
        entry = ok(client.ask(b'<status action="query" type="scheduler"/>'))[0][0]
    assert entry.get("scheduled_at", "").endswith("03:00:00") and entry.get("workflow_instance_id") is None


def test_evqueues_schedule_syntax_takes_a_sign_and_a_trailing_comma_as_evqueue_does(sched: Any) -> None:
    """evQueue reads each value with strtol() (`+30` is 30) and skips one comma after it (`0,30,` is `0,30`); jobd
    refused both as "Non numeric data in schedule offset", so the schedule file of an evQueue user did not load."""
    daemon = sched(
        schedule("signed", "workflow:hello", "+0;+30,;+3;;;", timezone="UTC")
        + schedule("comma", "workflow:hello", "0,30,;0;0;;;", timezone="UTC")
    )
    signed = dt.datetime.fromtimestamp(epoch(listed(daemon, "signed")["next_run"]), dt.UTC)
    comma = dt.datetime.fromtimestamp(epoch(listed(daemon, "comma")["next_run"]), dt.UTC)
    assert signed.time() == dt.time(3, 30, 0), signed
    assert comma.time() in (dt.time(0, 0, 0), dt.time(0, 0, 30)), comma
    # Given back as written, which evQueue's clients read as evQueue does.
    with EvqClient(daemon.evqueue_socket) as client:
        rows = ok(client.ask(b'<workflow_schedules action="list"/>'))
    assert [(row.get("comment"), row.get("schedule")) for row in rows] == [
        ("comma", "0,30,;0;0;;;"),
        ("signed", "+0;+30,;+3;;;"),
    ]


def test_a_full_database_disk_does_not_stop_the_schedules(sched: Any, small_state_disk: Path) -> None:
    # A firing whose job could not be committed raised out of the timer's callback, and the one-shot timer was
    # never armed again: every schedule stopped until a restart.
    daemon = sched(schedule("tick", "task:true", "* * * * * *"))
    assert daemon.state_dir == small_state_disk
    with subscribe(daemon) as events:
        next_state(events, "succeeded", "schedule:tick")
    filler = fill(small_state_disk)
    not_written = f"jobd could not write its database {daemon.state_dir / 'jobd.sqlite3'} (database or disk is full)"
    wait_for_log(daemon, f"schedule tick: cannot start its task true: {not_written}")
    assert "Traceback" not in daemon.log()
    filler.unlink()
    with subscribe(daemon) as events:  # a new subscriber hears only of what happens from now on
        next_state(events, "succeeded", "schedule:tick")


def test_a_reload_that_removes_a_schedule_on_a_full_database_disk_is_applied_whole(
    sched: Any, small_state_disk: Path
) -> None:
    # Forgetting the removed schedule's state was a write that raised out of the reload when the store refused it:
    # the reload stopped halfway (the queues and workflows had the new configuration, the schedules neither the old
    # one nor the new) with a traceback, and the schedule added by the same edit never came.
    held = "[queue.held]\nconcurrency = 1\npaused = true\n"
    daemon = sched(held + schedule("gone", "task:true", "0 0 1 1 *"))
    assert daemon.state_dir == small_state_disk
    run = daemon.call("schedule.trigger", {"name": "gone"})["run_id"]
    assert daemon.wait(run)["state"] == "succeeded"  # its run's end is in its saved state
    filler = fill(small_state_disk)
    for _ in range(10_000):  # until the WAL has no room left either: then every write fails
        try:
            daemon.submit(command=["/bin/true"], queue="held")
        except RemoteError as error:
            assert error.code == "STORE_FAILED", error
            break
    rewrite(daemon, held + schedule("added", "task:true", "0 0 1 1 *"))
    assert daemon.call("daemon.reload")["ok"] is True
    assert [s["name"] for s in daemon.call("schedule.list")["schedules"]] == ["added"]
    wait_for_log(daemon, "schedule gone: its state is not forgotten: database or disk is full")
    assert "Traceback" not in daemon.log()
    filler.unlink()


def test_the_jobs_of_a_task_schedule_expire_by_the_history_rules(make_daemon: Any) -> None:
    """A finished job is held in the history while a workflow instance that watched it has not saved its end. A task
    schedule watches its runs' jobs too, and never released them: with keep_last = 0 they stayed for good."""
    daemon: Daemon = make_daemon(
        BASE + schedule("rarely", "task:true", "0 0 1 1 *"), start=False, daemon_extra="history = { keep_last = 0 }"
    )
    start(daemon)
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.state"]}, timeout=10)
        run = daemon.call("schedule.trigger", {"name": "rarely"})["run_id"]
        next_matching(client, lambda e: e["job"]["id"] == run and e["job"]["state"] == "succeeded")
        plain = daemon.submit(task="true")["id"]
        next_matching(client, lambda e: e["job"]["id"] == plain and e["job"]["state"] == "succeeded")
    assert daemon.call("job.list", {"limit": 10})["jobs"] == []  # both gone as they finished
    stop_pumps([daemon])


def test_a_reload_follows_a_change_of_the_machines_time_zone(make_daemon: Any, tmp_path: Path) -> None:
    """`timedatectl set-timezone` then `systemctl reload jobd`: schedules without a `timezone` kept the zone jobd
    had read at its start (cached) until a restart. jobd runs in a mount namespace of its own here, where
    /etc/localtime is a file of the test's, which the test rewrites as the administrator's command would."""
    zone = tmp_path / "localtime"
    shutil.copyfile("/usr/share/zoneinfo/Etc/UTC", zone)
    daemon: Daemon = make_daemon(BASE + schedule("nightly", "task:true", "0 3 * * *"), start=False)
    daemon.command_prefix = [
        *("unshare", "--mount", "--propagation", "private"),
        *("sh", "-c", 'mount --bind "$0" /etc/localtime && exec "$@"', str(zone)),
    ]
    daemon.env["TZ"] = ""  # the machine's zone, not the test run's
    daemon.start()
    assert time.gmtime(epoch(listed(daemon, "nightly")["next_run"])).tm_hour == 3
    shutil.copyfile("/usr/share/zoneinfo/Asia/Tokyo", zone)  # UTC+9, no DST: 03:00 there is 18:00 UTC
    assert daemon.call("daemon.reload")["ok"] is True
    assert time.gmtime(epoch(listed(daemon, "nightly")["next_run"])).tm_hour == 18
    assert "schedule nightly: the machine's time zone changed, its next time is recomputed" in daemon.log()


def test_a_reload_after_a_change_of_the_machines_time_zone_shows_local_times_in_the_new_zone(
    make_daemon: Any, tmp_path: Path
) -> None:
    """After `timedatectl set-timezone` and a reload, a schedule's next time followed the new zone but evQueue's
    `scheduled_at` (local time, as evQueue shows it) and jobd's log lines stayed in the old one: glibc's
    localtime_r reads /etc/localtime once. jobd runs without TZ here, in a mount namespace of its own where
    /etc/localtime is a file of the test's."""
    zone = tmp_path / "localtime"
    shutil.copyfile("/usr/share/zoneinfo/Etc/UTC", zone)
    daemon: Daemon = make_daemon(BASE + schedule("nightly", "workflow:hello", "0 3 * * *"), start=False)
    (daemon.config_dir / "workflows").mkdir()
    (daemon.config_dir / "workflows" / "hello.xml").write_text(HELLO)
    daemon.command_prefix = [
        *("unshare", "--mount", "--propagation", "private"),
        *("sh", "-c", 'mount --bind "$0" /etc/localtime && exec env -u TZ "$@"', str(zone)),
    ]
    start(daemon)
    shutil.copyfile("/usr/share/zoneinfo/Asia/Tokyo", zone)  # UTC+9, no DST
    # timedatectl makes a new file; this one's inode stays, and glibc tells files apart by inode and mtime
    os.utime(zone, (os.stat(zone).st_mtime + 10,) * 2)
    assert daemon.call("daemon.reload")["ok"] is True
    assert time.gmtime(epoch(listed(daemon, "nightly")["next_run"])).tm_hour == 18
    with EvqClient(daemon.evqueue_socket) as client:
        entry = ok(client.ask(b'<status action="query" type="scheduler"/>'))[0][0]
    assert entry.get("scheduled_at", "").endswith(" 03:00:00"), entry.attrib
    stop_pumps([daemon])


class InProcess:
    """A Scheduler on an event loop of the test's, for what a daemon cannot be made to do on cue: its clock and its
    random draw are given. The configuration is loaded from files and the state kept in a real Store; the engine
    records the jobs it is given and runs none. The timerfd is real but armed at the given clock's times, in 2096:
    it never expires by itself, the test calls `_expired` as the loop would."""

    def __init__(self, tmp_path: Path, schedules: str, now: float, jitter_fraction: float = 0.0) -> None:
        self.tmp_path = tmp_path
        self.now = now
        self.submitted: list[Any] = []
        self.store = Store(str(tmp_path / "jobd.sqlite3"))
        self.store.open()
        self.engine = SimpleNamespace(
            config=self.load(schedules),
            submit=self._submit,
            watch=lambda *args: None,
            list_jobs=lambda where: [],  # no run of a schedule started since the due time it waited for
        )
        self.scheduler = Scheduler(
            self.engine,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]  # no workflow schedule here
            self.store,
            clock=lambda: self.now,
            jitter_fraction=lambda: jitter_fraction,
        )

    def load(self, schedules: str) -> Any:
        (self.tmp_path / "etc").mkdir(exist_ok=True)
        (self.tmp_path / "etc" / "jobd.toml").write_text(
            f'[daemon]\nsocket = "{self.tmp_path}/s"\nstate_dir = "{self.tmp_path}"\ndefault_user = "root"\n'
            '[queue.default]\n[task.t]\ncommand = ["/bin/true"]\nparameters = "env"\n' + schedules
        )
        return jobd_config.load_dir(str(self.tmp_path / "etc"))

    def _submit(self, specs: list[Any], delays: list[float], watcher: Any) -> list[Any]:
        self.submitted.append(specs[0])
        return [SimpleNamespace(id=len(self.submitted))]

    def next_run(self) -> float | None:
        listed = self.scheduler.describe("s")["next_run"]
        return None if listed is None else epoch(listed)


def test_a_due_time_that_came_while_a_reload_read_the_files_fires_for_the_edited_schedule(tmp_path: Path) -> None:
    """A reload computed an edited schedule's next time after its end, passing over a due time that had come
    while the loop read the files (a large configuration takes seconds; 2 of 21 firings of an every-second
    schedule edited ten times a second were lost). Here the due time comes between the timer's arming and the
    reload, as it does while a reload holds the loop."""
    edited = '[schedule.s]\ntask = "t"\ncalendar = "* * * * * *"\nparameters = {{ V = "{}" }}\n'
    it = InProcess(tmp_path, edited.format(1), now=4_000_000_000.5)

    async def reload_at_the_due_time() -> float | None:
        it.scheduler.start()
        assert it.next_run() == 4_000_000_001
        it.now = 4_000_000_001.2  # the due time has come; the loop has not handled the timer yet
        it.engine.config = it.load(edited.format(2))
        it.scheduler.reload(it.engine.config)
        due = it.next_run()
        it.scheduler._expired()  # the timer, once the loop gets to it (a non-blocking read: nothing expired)
        it.scheduler.stop()
        return due

    try:
        assert asyncio.run(reload_at_the_due_time()) == 4_000_000_001  # kept: it fires at once
    finally:
        it.store.close()
    assert [spec.env.get("V") for spec in it.submitted] == ["2"], it.submitted  # fired once, as edited


@pytest.mark.parametrize("recompute", ["reload", "clock_set"])
def test_a_due_time_in_its_jitter_delay_is_kept_when_the_next_time_is_computed_again(
    tmp_path: Path, recompute: str
) -> None:
    """The calendar's time has passed, its jitter delay runs: an edit of the schedule (a reload) or a step of the
    clock (NTP; the kernel cancels the timer) computed the next time after now, which passed over it: that run was
    lost (a nightly job with jitter, edited in its window, skipped that night; seen live: each of 4 reloads of an
    every-10-seconds schedule with jitter 8 lost one period's run)."""
    hour = 4_000_003_200.0  # a whole hour (2096)
    nightly = '[schedule.s]\ntask = "t"\ncalendar = "0 * * * *"\njitter = 600\nparameters = {{ V = "{}" }}\n'
    it = InProcess(tmp_path, nightly.format(1), now=hour - 100, jitter_fraction=0.5)

    async def recompute_in_the_delay() -> float | None:
        it.scheduler.start()
        assert it.next_run() == hour + 300
        it.now = hour + 60  # the calendar's time has passed; its delayed firing has not come
        if recompute == "reload":
            it.engine.config = it.load(nightly.format(2))
            it.scheduler.reload(it.engine.config)
        else:
            it.scheduler._fire_due(it.now, clock_set=True)  # as _expired does when the read says ECANCELED
        due = it.next_run()
        it.scheduler.stop()
        return due

    try:
        assert asyncio.run(recompute_in_the_delay()) == hour + 300  # kept, not the next hour's time
    finally:
        it.store.close()


def test_a_catch_up_is_delayed_by_the_schedules_jitter_as_systemds_persistent_is_by_randomizeddelaysec(
    tmp_path: Path,
) -> None:
    """A catch-up ran at the start whatever the schedule's `jitter`: every schedule that missed a time while jobd
    was down started in the same instant, the herd that jitter is there to spread (systemd.timer(5): Persistent=
    triggering "is nonetheless subject to the delay imposed by RandomizedDelaySec=")."""
    hour = 4_000_003_200.0  # a whole hour (2096)
    it = InProcess(
        tmp_path,
        '[schedule.s]\ntask = "t"\ncalendar = "0 * * * *"\ncatch_up = true\njitter = 600\n',
        now=hour + 7200 + 30,  # jobd comes back two hours after the due time it waited for
        jitter_fraction=0.25,
    )
    it.store.save_schedule_state(
        ScheduleState(name="s", last_run=hour - 3600 + 100, last_result="succeeded", next_run=hour)
    )

    async def start_then_expire() -> tuple[float | None, int]:
        it.scheduler.start()
        delayed, fired_at_start = it.next_run(), len(it.submitted)
        if delayed is not None:
            it.now = delayed  # its time comes
            it.scheduler._expired()
        it.scheduler.stop()
        return delayed, fired_at_start

    try:
        delayed, fired_at_start = asyncio.run(start_then_expire())
    finally:
        it.store.close()
    assert (fired_at_start, delayed) == (0, hour + 7200 + 30 + 150)  # a quarter of 600 s later
    assert len(it.submitted) == 1  # once, then
