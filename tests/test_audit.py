"""The audit log on a real daemon: every mutating command of both protocols leaves one entry (who, what, when,
result), refusals and failures with their error code; reads leave none; audit.list filters and pages, for admins
only; `jobctl audit` shows it."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from datetime import datetime
from typing import Any

import pytest
from harness import REPO, Daemon
from recovery.support import start, stop_pumps
from test_evqueue_protocol import SLOW_WORKFLOW, EvqClient, ko, ok
from test_jobctl import ctl

from jobd.client import RemoteError

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534
WAIT = 20.0

CONFIG = """
[queue.default]
concurrency = 2

[task.echo]
command = ["/bin/echo"]

[schedule.nightly]
task = "echo"
calendar = "0 3 * * *"
"""

TRIVIAL = b"""<workflow>
  <subjobs><job name="one"><tasks><task name="t" path="/bin/true" queue="default"/></tasks></job></subjobs>
</workflow>
"""


@pytest.fixture
def audited(make_daemon: Any) -> Any:
    """A daemon with a queue, a task, a schedule and the workflows `slow` (parameter `seconds`) and `trivial`."""
    daemon: Daemon = make_daemon(CONFIG, start=False)
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    (workflows / "slow.xml").write_bytes(SLOW_WORKFLOW)
    (workflows / "trivial.xml").write_bytes(TRIVIAL)
    start(daemon)
    yield daemon
    stop_pumps([daemon])


def entries(daemon: Daemon, **params: Any) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = daemon.call("audit.list", {"limit": 1000, **params})["entries"]
    return listed


def summary(listed: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    """(command, target, result), oldest first."""
    return [(entry["command"], entry["target"], entry["result"]) for entry in reversed(listed)]


def refused(daemon: Daemon, method: str, params: dict[str, Any]) -> str:
    with pytest.raises(RemoteError) as caught:
        daemon.call(method, params)
    code: str = caught.value.data["code"]
    return code


def timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def me() -> tuple[int, str]:
    return os.getuid(), pwd.getpwuid(os.getuid()).pw_name


def test_each_mutating_json_rpc_method_leaves_one_entry_and_reads_leave_none(audited: Daemon) -> None:
    daemon = audited
    began = time.time()
    first = daemon.submit(task="echo")["id"]
    batch = [job["id"] for job in daemon.call("job.submit", {"jobs": [{"task": "echo"}, {"task": "echo"}]})["jobs"]]
    assert refused(daemon, "job.submit", {"task": "nosuch"}) == "UNKNOWN_TASK"
    assert refused(daemon, "job.submit", {"jobs": [{"task": "echo"}, {"command": ["/bin/true"], "bogus": 1}]}) == (
        "INVALID_PARAMS"
    )
    delayed = daemon.submit(task="echo", delay=3600)["id"]
    daemon.call("job.cancel", {"id": delayed})
    assert refused(daemon, "job.cancel", {"id": delayed}) == "JOB_FINISHED"
    assert refused(daemon, "job.cancel", {"id": 0}) == "INVALID_PARAMS"
    daemon.call("queue.pause", {"name": "default"})
    daemon.call("queue.resume", {"name": "default"})
    assert refused(daemon, "queue.pause", {"name": "nosuch"}) == "UNKNOWN_QUEUE"
    daemon.call("daemon.reload")
    # The slow task must run when its instance is cancelled (a cancel aborts a queued task, and cancels its job):
    # the echo jobs, which can hold both places of `default` on a busy machine, end first.
    for job_id in (first, *batch):
        assert daemon.wait(job_id)["state"] == "succeeded"
    instance = daemon.call("instance.launch", {"workflow": "slow", "parameters": {"seconds": "30"}})["id"]
    assert daemon.call("instance.get", {"id": instance})["jobs"][0]["tasks"][0]["status"] == "EXECUTING"
    daemon.call("instance.cancel", {"id": instance})  # queues nothing more; its running task goes on
    task_job = daemon.call("instance.get", {"id": instance})["jobs"][0]["tasks"][0]["job_id"]
    daemon.call("job.cancel", {"id": task_job})
    trivial = daemon.call("instance.launch", {"workflow": "trivial"})["id"]
    assert refused(daemon, "instance.debug_resume", {"id": 999999}) == "UNKNOWN_INSTANCE"
    assert refused(daemon, "instance.launch", {"workflow": "nosuch"}) == "UNKNOWN_WORKFLOW"
    daemon.call("schedule.disable", {"name": "nightly"})
    daemon.call("schedule.enable", {"name": "nightly"})
    run = daemon.call("schedule.trigger", {"name": "nightly"})["run_id"]
    assert refused(daemon, "schedule.trigger", {"name": "nosuch"}) == "UNKNOWN_SCHEDULE"
    mutations = len(entries(daemon))

    # Reads, waits included, record nothing.
    for method, params in [
        ("ping", {}),
        ("job.get", {"id": first}),
        ("job.list", {}),
        ("job.wait", {"id": first, "timeout": WAIT}),
        ("job.wait", {"id": run, "timeout": WAIT}),
        ("job.output", {"id": first}),
        ("queue.list", {}),
        ("daemon.status", {}),
        ("workflow.list", {}),
        ("workflow.get", {"name": "trivial"}),
        ("instance.wait", {"id": instance, "timeout": WAIT}),
        ("instance.wait", {"id": trivial, "timeout": WAIT}),
        ("instance.get", {"id": instance}),
        ("instance.list", {}),
        ("schedule.list", {}),
        ("events.subscribe", {}),
        ("audit.list", {}),
    ]:
        daemon.call(method, params, timeout=WAIT + 5)
    assert refused(daemon, "job.get", {"id": 999999}) == "UNKNOWN_JOB"
    assert refused(daemon, "no.such.method", {}) == "METHOD_NOT_FOUND"

    listed = entries(daemon)
    assert len(listed) == mutations
    assert summary(listed) == [
        ("job.submit", f"job {first}", "ok"),
        ("job.submit", f"jobs {batch[0]}-{batch[1]}", "ok"),
        ("job.submit", "task nosuch", "UNKNOWN_TASK"),
        ("job.submit", "2 jobs: task echo, command /bin/true", "INVALID_PARAMS"),
        ("job.submit", f"job {delayed}", "ok"),
        ("job.cancel", f"job {delayed}", "ok"),
        ("job.cancel", f"job {delayed}", "JOB_FINISHED"),
        ("job.cancel", "job 0", "INVALID_PARAMS"),
        ("queue.pause", "queue default", "ok"),
        ("queue.resume", "queue default", "ok"),
        ("queue.pause", "queue nosuch", "UNKNOWN_QUEUE"),
        ("daemon.reload", None, "ok"),
        ("instance.launch", "workflow slow", "ok"),
        ("instance.cancel", f"instance {instance}", "ok"),
        ("job.cancel", f"job {task_job}", "ok"),
        ("instance.launch", "workflow trivial", "ok"),
        ("instance.debug_resume", "instance 999999", "UNKNOWN_INSTANCE"),
        ("instance.launch", "workflow nosuch", "UNKNOWN_WORKFLOW"),
        ("schedule.disable", "schedule nightly", "ok"),
        ("schedule.enable", "schedule nightly", "ok"),
        ("schedule.trigger", "schedule nightly", "ok"),
        ("schedule.trigger", "schedule nosuch", "UNKNOWN_SCHEDULE"),
    ]
    uid, user = me()
    for entry in listed:
        assert (entry["uid"], entry["user"]) == (uid, user), entry
        assert began - 1 <= timestamp(entry["at"]) <= time.time() + 1, entry
        if entry["result"] != "ok":
            assert entry["message"], entry
        elif entry["command"] not in ("instance.launch", "schedule.trigger"):
            assert entry["message"] is None, entry
    launches = [entry["message"] for entry in listed if entry["command"] == "instance.launch"]
    assert launches[::-1][:2] == [f"instance {instance}", f"instance {trivial}"]
    by_command = {entry["command"]: entry for entry in listed if entry["result"] == "ok"}
    assert by_command["schedule.trigger"]["message"] == f"run {run}"
    unknown = next(entry for entry in listed if entry["result"] == "UNKNOWN_TASK")
    assert "nosuch" in unknown["message"]
    assert [entry["id"] for entry in listed] == sorted((entry["id"] for entry in listed), reverse=True)


def test_each_mutating_evqueue_command_leaves_one_entry_and_reads_leave_none(audited: Daemon) -> None:
    daemon = audited
    with EvqClient(daemon.evqueue_socket) as client:
        slow = ok(
            client.ask(b'<instance action="launch" name="slow"><parameter name="seconds" value="30"/></instance>')
        ).get("workflow-instance-id", "")
        ko(client.ask(b'<instance action="killtask" id="%s" pid="1"/>' % slow.encode()), "INVALID_PARAMETER")
        ok(client.ask(b'<instance action="cancel" id="%s"/>' % slow.encode()))
        task_job = daemon.call("instance.get", {"id": int(slow)})["jobs"][0]["tasks"][0]["job_id"]
        daemon.call("job.cancel", {"id": task_job})  # JSON-RPC: the running task of the cancelled instance
        trivial = ok(client.ask(b'<instance action="launch" name="trivial" mode="synchronous" timeout="20"/>')).get(
            "workflow-instance-id", ""
        )
        ok(client.ask(b'<instance action="delete" id="%s"/>' % trivial.encode()))
        ko(client.ask(b'<instance action="delete" id="999999"/>'), "UNKNOWN_INSTANCE")
        ko(client.ask(b'<instance action="debugresume" id="999999"/>'), "UNKNOWN_INSTANCE")
        ko(client.ask(b'<instance action="launch" name="nosuch"/>'), "UNKNOWN_WORKFLOW")
        client.ask(b'<instance action="launch"/>')  # no name: refused by the decoder, still audited
        ok(client.ask(b'<control action="reload" module="all"/>'))
        mutations = len(entries(daemon))

        for request in [
            b"<ping/>",
            b'<instance action="query" id="%s"/>' % slow.encode(),
            b'<instance action="wait" id="%s" timeout="20"/>' % slow.encode(),
            b'<instances action="list"/>',
            b'<status action="query" type="workflows"/>',
            b'<statistics action="query" type="global"/>',
            b'<queuepool action="list"/>',
            b'<workflows action="list"/>',
            b'<workflow action="get" name="trivial"/>',
            b'<workflow_schedules action="list"/>',
        ]:
            ok(client.ask(request))
        ko(client.ask(b'<nosuch action="thing"/>'), "UNKNOWN_COMMAND")

    listed = entries(daemon)
    assert len(listed) == mutations
    missing_name = listed[1]
    assert summary(listed) == [
        ("instance launch", "workflow slow", "ok"),
        ("instance killtask", f"instance {slow} pid 1", "INVALID_PARAMS"),
        ("instance cancel", f"instance {slow}", "ok"),
        ("job.cancel", f"job {task_job}", "ok"),
        ("instance launch", "workflow trivial", "ok"),
        ("instance delete", f"instance {trivial}", "ok"),
        ("instance delete", "instance 999999", "UNKNOWN_INSTANCE"),
        ("instance debugresume", "instance 999999", "UNKNOWN_INSTANCE"),
        ("instance launch", "workflow nosuch", "UNKNOWN_WORKFLOW"),
        ("instance launch", None, missing_name["result"]),
        ("control reload", "module all", "ok"),
    ]
    assert missing_name["result"] != "ok" and "name" in missing_name["message"]
    uid, user = me()
    assert all((entry["uid"], entry["user"]) == (uid, user) for entry in listed)
    assert listed[-1]["message"] == f"instance {slow}"  # what an asynchronous launch started


NOBODY_CLIENT = """
import json, socket
from jobd.client import Client, RemoteError

def code(method, params):
    try:
        client.call(method, params, timeout=20)
        return "ok"
    except RemoteError as error:
        return error.data.get("code")

result = {}
with Client("jobd.sock") as client:
    result["ad_hoc"] = code("job.submit", {"command": ["/bin/true"]})
    result["audit"] = code("audit.list", {})
    result["list"] = code("job.list", {})
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("jobd.sock")
sock.sendall(b'<control action="reload"/><quit/>')
data = b""
while chunk := sock.recv(65536):
    data += chunk
result["xml"] = data.decode()
print(json.dumps(result))
"""


def test_refusals_of_a_non_admin_are_audited_and_the_log_is_for_admins_only(audited: Daemon) -> None:
    daemon = audited
    os.chmod(daemon.socket_path, 0o666)
    assert os.stat(daemon.root).st_mode & 0o001  # nobody reaches the socket through the daemon's directory
    proc = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            NOBODY_CLIENT,
        ],
        cwd=daemon.root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["ad_hoc"], result["audit"], result["list"]) == ("INSUFFICIENT_RIGHTS", "INSUFFICIENT_RIGHTS", "ok")
    assert ('status="KO"' in result["xml"] and "INSUFFICIENT_RIGHTS" in result["xml"]) or "error-code" in result["xml"]
    listed = entries(daemon)
    assert summary(listed) == [
        ("job.submit", "command /bin/true", "INSUFFICIENT_RIGHTS"),
        ("control reload", None, "INSUFFICIENT_RIGHTS"),
    ]
    nobody = pwd.getpwuid(NOBODY).pw_name
    assert all((entry["uid"], entry["user"]) == (NOBODY, nobody) for entry in listed)
    assert entries(daemon, user=nobody) == listed and entries(daemon, uid=NOBODY) == listed
    assert entries(daemon, user="root" if nobody != "root" else "-") == []


def test_audit_list_filters_and_pages(audited: Daemon) -> None:
    daemon = audited
    for _ in range(3):
        daemon.call("queue.pause", {"name": "default"})
        daemon.call("queue.resume", {"name": "default"})
    daemon.submit(task="echo")
    everything = entries(daemon)
    assert len(everything) == 7
    pauses = entries(daemon, command="queue.pause")
    assert [entry["command"] for entry in pauses] == ["queue.pause"] * 3
    assert pauses == [entry for entry in everything if entry["command"] == "queue.pause"]
    assert entries(daemon, command="job.submit")[0]["target"].startswith("job ")
    assert entries(daemon, command="nosuch") == []
    assert entries(daemon, user=me()[1]) == everything

    pages, before = [], None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if before is not None:
            params["before"] = before
        page = daemon.call("audit.list", params)
        pages.append([entry["id"] for entry in page["entries"]])
        before = page["next_before"]
        if before is None:
            break
    assert pages[:2] == [[e["id"] for e in everything[:3]], [e["id"] for e in everything[3:6]]]
    assert [number for page in pages for number in page] == [entry["id"] for entry in everything]

    assert entries(daemon, since="2000-01-01T00:00:00Z") == everything
    assert entries(daemon, since="2999-01-01T00:00:00Z") == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"before": 0}, {"since": "yesterday"}, {"color": "red"}):
        assert refused(daemon, "audit.list", bad) == "INVALID_PARAMS"
    assert len(entries(daemon)) == 7  # reading the log is not audited


def test_jobctl_audit(audited: Daemon) -> None:
    daemon = audited
    daemon.call("queue.pause", {"name": "default"})
    job = daemon.submit(task="echo")["id"]
    # refused as an unknown queue, or earlier as a name no queue can have: either way audited with its code
    code = refused(daemon, "queue.resume", {"name": "nosuch\x1b[2J"})
    assert code in ("UNKNOWN_QUEUE", "INVALID_PARAMS")

    shown = ctl(daemon, "audit")
    assert shown.code == 0, shown
    lines = shown.out.splitlines()
    assert lines[0].split() == ["ID", "TIME", "USER", "UID", "COMMAND", "TARGET", "RESULT", "MESSAGE"]
    assert len(lines) == 4
    assert "\x1b" not in shown.out and "\\x1b[2J" in lines[1]  # a client's bytes never reach the terminal
    assert lines[1].split()[6:8] == ["queue.resume", "queue"]
    assert code in lines[1].split()
    assert f"job {job}" in lines[2] and lines[2].split()[6] == "job.submit" and " ok" in lines[2]
    # ID, then TIME as a date, a time and the zone's abbreviation
    assert lines[3].split()[3] == time.strftime("%Z", time.localtime())
    assert lines[3].split()[4:10] == [me()[1], str(me()[0]), "queue.pause", "queue", "default", "ok"]

    only = ctl(daemon, "audit", "--command", "queue.pause")
    assert [line.split()[6] for line in only.out.splitlines()[1:]] == ["queue.pause"]
    paged = ctl(daemon, "audit", "-n", "1")
    assert len(paged.out.splitlines()) == 2 and "--before" in paged.err
    nobody = ctl(daemon, "audit", "--user", "nosuchuser")
    assert nobody.code == 0 and nobody.out == "" and "no audit entries" in nobody.err
    as_json = ctl(daemon, "audit", "--json", "--user", me()[1])
    assert as_json.code == 0
    assert json.loads(as_json.out)["entries"] == entries(daemon)


def test_a_refused_secret_parameter_is_not_quoted_in_the_reply_or_the_entry(audited: Daemon) -> None:
    """A refusal's message is the entry's: a bad env, params or stdin was quoted there (60 characters of it)."""
    daemon = audited
    refusals = {
        "env": {"command": ["/bin/true"], "env": {"PGPASSWORD": "s3cret-env", "N": 1}},
        "params": {"task": "echo", "params": {"TOKEN": "s3cret-param", "N": None}},
        "stdin": {"command": ["/bin/cat"], "stdin": "s3cret-stdin\0"},
        "stdin_base64": {"command": ["/bin/cat"], "stdin_base64": "s3cret-stdin!"},
    }
    for param, params in refusals.items():
        with pytest.raises(RemoteError) as caught:
            daemon.call("job.submit", params)
        assert (caught.value.data["code"], caught.value.data["param"]) == ("INVALID_PARAMS", param), caught.value
        assert "s3cret" not in caught.value.message
    listed = entries(daemon)
    assert [entry["result"] for entry in listed] == ["INVALID_PARAMS"] * len(refusals)
    assert "s3cret" not in json.dumps(listed)
