"""Rights for real: unprivileged users created for the session (useradd), connecting to a real jobd through its real
sockets as themselves (setpriv), in both protocols; and jobctl run as them.

The users: alice (read and exec on task `report` and workflows `wf-*`), bob (no grant of his own; his supplementary
group ops has read, kill and edit on queue `ops`), carol (nothing), and dave (an admin through his supplementary
group admins). On the machine their names start with this test process's (harness.account_prefix): two suites
running at once have accounts of their own.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FsyncHold
from harness import REPO, Daemon, account_prefix, remove_stale_accounts
from lxml import etree
from recovery.support import fill, wait_for_log

from jobd import jobctl as jobctl_module
from jobd.client import RemoteError
from jobd.protocol.evqueue import XmlFramer

PREFIX = account_prefix()
USERS = ("alice", "bob", "carol", "dave")
GROUPS = {"ops": ("bob",), "admins": ("dave",)}
DEADLINE = 60
PYTHON = (sys.executable, "-c")

WORKFLOW = b"""<workflow>
  <subjobs><job name="one"><tasks><task task="report" name="report"/></tasks></job></subjobs>
</workflow>
"""
SLOW_WORKFLOW = b"""<workflow>
  <subjobs><job name="one"><tasks><task task="slow" name="slow"/></tasks></job></subjobs>
</workflow>
"""

CONFIG = f"""
[queue.default]
concurrency = 4

[queue.ops]
concurrency = 4

[task.report]
command = ["/bin/echo", "report"]

[task.secret]
command = ["/bin/echo", "secret"]

[task.slow]
command = ["/bin/sleep", "60"]
queue = "ops"

[schedule.nightly-secret]
task = "secret"
calendar = "0 0 1 1 *"

[schedule.yearly-report]
task = "report"
calendar = "0 0 1 1 *"

[access]
admins = {{ users = ["root"], groups = ["{PREFIX}admins"] }}

[[access.grant]]
users = ["{PREFIX}alice"]
rights = ["read", "exec"]
tasks = ["report"]
workflows = ["wf-*"]

[[access.grant]]
groups = ["{PREFIX}ops"]
rights = ["read", "kill", "edit"]
queues = ["ops"]
"""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=DEADLINE)


def _remove() -> None:
    for user in USERS:
        subprocess.run(["userdel", PREFIX + user], capture_output=True, timeout=DEADLINE)
    for group in (*GROUPS, *USERS):
        subprocess.run(["groupdel", PREFIX + group], capture_output=True, timeout=DEADLINE)


@contextlib.contextmanager
def accounts() -> Iterator[dict[str, pwd.struct_passwd]]:
    """The test users and groups on the machine, named after this process, removed at the end (needs root)."""
    remove_stale_accounts()
    try:
        for group in GROUPS:
            _run("groupadd", PREFIX + group)
        for user in USERS:
            supplementary = [PREFIX + group for group, members in GROUPS.items() if user in members]
            extra = ["-G", ",".join(supplementary)] if supplementary else []
            _run("useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", *extra, PREFIX + user)
        yield {user: pwd.getpwnam(PREFIX + user) for user in USERS}
    finally:
        _remove()


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """The test users and groups, created for this module and removed at its end (the suite runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    with accounts() as made:
        yield made


def test_a_suite_running_at_the_same_time_has_accounts_of_its_own(users: dict[str, pwd.struct_passwd]) -> None:
    """Two checkouts' suites at once on one machine: the other one (a process of its own, as it would be) makes and
    removes its alice, bob, carol and dave while ours exist. With fixed names it removed ours (or, under a lock,
    waited for this whole module to end)."""
    other = subprocess.run(
        [sys.executable, "-c", "import test_access_users as t\nwith t.accounts() as made:\n print(*t.names(made))"],
        cwd=REPO / "tests",
        env={**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    theirs = other.stdout.split()
    assert other.returncode == 0 and [name.rpartition("-")[2] for name in theirs] == list(USERS), other
    assert not set(theirs) & set(names(users)) and not set(theirs) & _account_names()  # made, then removed
    assert {user: pwd.getpwnam(entry.pw_name) for user, entry in users.items()} == users  # ours are still there


def names(users: dict[str, pwd.struct_passwd]) -> list[str]:
    return [entry.pw_name for entry in users.values()]


def test_accounts_left_by_a_run_that_died_are_removed(users: dict[str, pwd.struct_passwd]) -> None:
    """A run killed before its clean-up leaves its accounts: the next run removes them, as their pid says their
    maker has ended; those of a run still going (ours) are kept."""
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=DEADLINE)  # reaped: no process has its pid now
    left = f"jobdt{dead.pid}-left"
    _run("groupadd", left)
    try:
        remove_stale_accounts()
        assert left not in _account_names()
        assert {PREFIX + user for user in USERS} <= _account_names()
    finally:
        subprocess.run(["groupdel", left], capture_output=True, timeout=DEADLINE)


def _account_names() -> set[str]:
    return {entry.pw_name for entry in pwd.getpwall()} | {entry.gr_name for entry in grp.getgrall()}


@pytest.fixture
def jobd(make_daemon: Any, users: dict[str, pwd.struct_passwd]) -> Daemon:
    return started(make_daemon, CONFIG)


def started(make_daemon: Any, config: str, env: dict[str, str] | None = None, daemon_extra: str = "") -> Daemon:
    """A daemon of `config` (and extra environment `env`, and `daemon_extra` in its [daemon] table) with the workflows
    wf-a, wf-slow and other, its sockets open to the test users."""
    daemon: Daemon = make_daemon(config, start=False, daemon_extra=daemon_extra)
    daemon.env.update(env or {})
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    (workflows / "wf-a.xml").write_bytes(WORKFLOW)
    (workflows / "wf-slow.xml").write_bytes(SLOW_WORKFLOW)
    (workflows / "other.xml").write_bytes(WORKFLOW)
    daemon.start()
    # tmp_path is 0700: clients start in the daemon's directory (a+x) and use relative paths; both sockets open.
    daemon.root.chmod(0o755)
    for path in (daemon.socket_path, daemon.evqueue_socket):
        path.chmod(0o666)
    return daemon


def as_user(
    daemon: Daemon, account: pwd.struct_passwd, argv: list[str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run argv as the user, with the supplementary groups of the group database (--init-groups)."""
    return subprocess.run(
        ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", *argv],
        cwd=daemon.root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


JSON_CLIENT = """
import json, sys
from jobd.client import Client, RemoteError
out = []
with Client("jobd.sock") as client:
    for method, params in json.loads(sys.argv[1]):
        try:
            out.append({"result": client.call(method, params, timeout=30)})
        except RemoteError as error:
            out.append({"code": error.data.get("code"), "missing": error.data.get("missing"), "message": error.message})
print(json.dumps(out))
"""

XML_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("evqueue.sock")
sock.sendall(sys.stdin.buffer.read() + b"<quit/>")
data = b""
while chunk := sock.recv(65536):
    data += chunk
sys.stdout.buffer.write(data)
"""


def held_as_user(daemon: Daemon, account: pwd.struct_passwd, program: str, *args: str) -> subprocess.Popen[str]:
    """A Python `program` run as the user (as as_user does) with `args`, left running, talking through its pipes."""
    return subprocess.Popen(
        [
            *("setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups"),
            *PYTHON,
            program,
            *args,
        ],
        cwd=daemon.root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def killed_if_running(process: subprocess.Popen[str]) -> None:
    """A held client a failed test left waiting: killed, and reaped."""
    if process.poll() is None:
        process.kill()
        process.wait()


def calls(daemon: Daemon, account: pwd.struct_passwd, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    done = as_user(daemon, account, [sys.executable, "-c", JSON_CLIENT, json.dumps(requests)])
    assert done.returncode == 0, done.stderr
    answers: list[Any] = json.loads(done.stdout)
    return answers


def xml_session(daemon: Daemon, account: pwd.struct_passwd, requests: str) -> list[etree._Element]:
    """The greeting, then one answer per request, as `account` on the evQueue socket."""
    # On standard input: one argument of argv may hold at most 128 KiB.
    done = as_user(daemon, account, [sys.executable, "-c", XML_CLIENT], stdin=requests)
    assert done.returncode == 0, done.stderr
    return [etree.fromstring(document) for document in XmlFramer().feed(done.stdout.encode())]


def outcome(answer: dict[str, Any]) -> str:
    """ "ok", or the right an INSUFFICIENT_RIGHTS refusal names as missing (any other error fails the test)."""
    if "result" in answer:
        return "ok"
    assert answer["code"] == "INSUFFICIENT_RIGHTS", answer
    assert f"the {answer['missing']} right is missing" in answer["message"], answer
    return str(answer["missing"])


def test_the_peer_is_identified_with_its_supplementary_groups(jobd: Daemon, users: dict[str, Any]) -> None:
    # bob's only grant comes through jobdtest-ops, a supplementary group: he sees queue ops, alice does not.
    assert grp.getgrnam(PREFIX + "ops").gr_mem == [PREFIX + "bob"]
    assert users["bob"].pw_gid != grp.getgrnam(PREFIX + "ops").gr_gid
    queues = {user: calls(jobd, users[user], [("queue.list", {})])[0]["result"]["queues"] for user in USERS}
    assert [q["name"] for q in queues["bob"]] == ["ops"]
    assert queues["alice"] == [] and queues["carol"] == []
    assert sorted(q["name"] for q in queues["dave"]) == ["default", "ops"]  # admin through a supplementary group


def test_json_rpc_matrix_of_users_rights_and_methods(jobd: Daemon, users: dict[str, Any]) -> None:
    report = jobd.submit(task="report")
    secret = jobd.submit(task="secret")
    slow = jobd.submit(task="slow")
    jobd.wait(report["id"])
    instance = jobd.call("instance.launch", {"workflow": "wf-a"})
    # Each request, then what alice, bob and carol get: "ok" or the right INSUFFICIENT_RIGHTS names as missing.
    matrix: list[tuple[str, dict[str, Any], str, str, str]] = [
        ("job.submit", {"task": "report"}, "ok", "exec", "exec"),
        ("job.submit", {"task": "secret"}, "exec", "exec", "exec"),
        ("job.submit", {"task": "report", "queue": "ops"}, "exec", "exec", "exec"),  # another queue: exec on it
        ("job.submit", {"command": ["/bin/true"]}, "admin", "admin", "admin"),
        ("job.submit", {"task": "report", "env": {"X": "1"}}, "admin", "admin", "admin"),
        ("job.get", {"id": report["id"]}, "ok", "read", "read"),
        ("job.output", {"id": report["id"]}, "ok", "read", "read"),
        ("job.wait", {"id": report["id"], "timeout": 0}, "ok", "read", "read"),
        ("job.get", {"id": secret["id"]}, "read", "read", "read"),
        ("job.get", {"id": slow["id"]}, "read", "ok", "read"),  # bob: his supplementary group's queue
        ("job.cancel", {"id": report["id"]}, "kill", "kill", "kill"),  # refused before JOB_FINISHED
        ("queue.pause", {"name": "ops"}, "edit", "ok", "edit"),
        ("queue.resume", {"name": "ops"}, "edit", "ok", "edit"),
        ("queue.pause", {"name": "default"}, "edit", "edit", "edit"),
        ("daemon.reload", {}, "admin", "admin", "admin"),
        ("daemon.backup", {}, "admin", "admin", "admin"),
        ("workflow.get", {"name": "wf-a"}, "ok", "read", "read"),
        ("workflow.get", {"name": "other"}, "read", "read", "read"),
        ("workflow.get", {"name": "no-such"}, "read", "read", "read"),  # rights before names
        ("instance.get", {"id": instance["id"]}, "ok", "read", "read"),
        ("instance.wait", {"id": instance["id"], "timeout": 0}, "ok", "read", "read"),
        ("instance.cancel", {"id": instance["id"]}, "kill", "kill", "kill"),
        ("instance.debug_resume", {"id": instance["id"]}, "ok", "read", "read"),
        ("instance.launch", {"workflow": "wf-a"}, "ok", "exec", "exec"),
        ("instance.launch", {"workflow": "other"}, "exec", "exec", "exec"),
        ("instance.launch", {"workflow": "wf-a", "user": "root"}, "admin", "exec", "exec"),
        # Empty, as evQueue's clients send them over XML: not given (refused as a choice of user over JSON-RPC only).
        ("instance.launch", {"workflow": "wf-a", "user": "", "host": ""}, "ok", "exec", "exec"),
        ("audit.list", {}, "admin", "admin", "admin"),
        ("ping", {}, "ok", "ok", "ok"),
    ]
    requests = [(method, params) for method, params, *_ in matrix]
    for column, user in enumerate(("alice", "bob", "carol"), start=2):
        got = [outcome(answer) for answer in calls(jobd, users[user], requests)]
        wanted = [row[column] for row in matrix]
        assert got == wanted, (user, [(r[0], g, w) for r, g, w in zip(matrix, got, wanted, strict=True) if g != w])
    # The admin (through a supplementary group) passes every check: what is left are the engine's own answers.
    admin_answers = calls(jobd, users["dave"], requests)
    errors = {
        method: answer["code"] for (method, _), answer in zip(requests, admin_answers, strict=True) if "code" in answer
    }
    assert errors == {
        "job.cancel": "JOB_FINISHED",
        "workflow.get": "UNKNOWN_WORKFLOW",
        "instance.cancel": "INVALID_PARAMS",
    }
    # bob, through his group's kill right on queue ops, cancels the slow job.
    assert calls(jobd, users["bob"], [("job.cancel", {"id": slow["id"]})])[0]["result"]["state"] == "cancelled"


def test_lists_show_only_what_a_user_may_read(jobd: Daemon, users: dict[str, Any]) -> None:
    report = jobd.submit(task="report")
    jobd.submit(task="secret")
    slow = jobd.submit(task="slow")
    ad_hoc = jobd.submit(command=["/bin/true"], queue="ops")  # an ad-hoc job: readable through its queue
    jobd.call("instance.launch", {"workflow": "wf-a"})
    jobd.call("instance.launch", {"workflow": "other"})
    requests: list[tuple[str, dict[str, Any]]] = [
        ("job.list", {}),
        ("instance.list", {}),
        ("workflow.list", {}),
        ("schedule.list", {}),
        ("daemon.status", {}),
    ]
    seen = {user: [a["result"] for a in calls(jobd, users[user], requests)] for user in ("alice", "bob", "carol")}
    alice, bob, carol = seen["alice"], seen["bob"], seen["carol"]
    assert {job["task"] for job in alice[0]["jobs"]} == {"report"}  # its own submits and the workflow's tasks
    assert report["id"] in {job["id"] for job in alice[0]["jobs"]}
    assert {job["id"] for job in bob[0]["jobs"]} == {slow["id"], ad_hoc["id"]}
    assert carol[0]["jobs"] == []
    assert {i["workflow"] for i in alice[1]["instances"]} == {"wf-a"} and alice[1]["total"] == 1
    assert bob[1] == {"instances": [], "total": 0, "next_before": None}
    assert [w["name"] for w in alice[2]["workflows"]] == ["wf-a", "wf-slow"]
    assert bob[2]["workflows"] == [] and carol[2]["workflows"] == []
    assert [q["name"] for q in bob[4]["queues"]] == ["ops"] and alice[4]["queues"] == []
    assert "config_files" not in alice[4]
    assert all("path" not in workflow for workflow in alice[2]["workflows"])  # the files are the admins' business
    # The counts of daemon.status are of what each may read, as its job.list (they were every job's).
    assert sum(bob[4]["jobs"].values()) == len(bob[0]["jobs"]) == 2
    assert carol[4]["jobs"] == {} and carol[4]["running"] == carol[4]["queued"] == carol[4]["delayed"] == 0
    assert bob[4]["running"] + bob[4]["queued"] == sum(q["running"] + q["queued"] for q in bob[4]["queues"])
    admin = jobd.call("daemon.status")
    assert sum(admin["jobs"].values()) >= 5 and "config_files" in admin
    assert all("path" in workflow for workflow in jobd.call("workflow.list")["workflows"])
    assert {job["task"] for job in jobd.call("job.list", {})["jobs"]} == {"report", "secret", "slow", None}


MANY = 1100  # patterns in a grant: past SQLite's expression depth (1,000) were they one GLOB each, ORed


def _names(form: str) -> str:
    """A TOML list of MANY patterns that no name here matches, of the `form` (e.g. "report-{}-*")."""
    return ", ".join(f'"{form.format(number)}"' for number in range(MANY))


def test_lists_work_whatever_the_number_of_patterns_a_user_is_granted(make_daemon: Any, users: dict[str, Any]) -> None:
    # A user granted read on more than about 1,000 task names got INTERNAL_ERROR on job.list ("Expression tree is
    # too large"): each pattern was one GLOB of one flat OR in the query. Every list filtered by patterns must give
    # what it gives with a few: carol has MANY task, queue and workflow patterns (report and wf-a among them), bob
    # MANY queue patterns only (besides his group's ops), on every path job.list, instance.list, evQueue's instances
    # list and daemon.status's counts take.
    many = f"""
[[access.grant]]
users = ["{PREFIX}carol"]
rights = ["read"]
tasks = ["report", {_names("report-{}-*")}]
queues = [{_names("night-{}-?")}]
workflows = ["wf-a", {_names("wf-{}-*")}]

[[access.grant]]
groups = ["{PREFIX}ops"]
rights = ["read"]
queues = [{_names("ops-{}")}]
"""
    jobd = started(make_daemon, CONFIG + many)
    report = jobd.submit(task="report")
    jobd.submit(task="secret")
    jobd.submit(task="slow")
    jobd.submit(command=["/bin/true"], queue="ops")
    jobd.wait(report["id"])
    for workflow in ("wf-a", "other"):
        launched = jobd.call("instance.launch", {"workflow": workflow})
        jobd.call("instance.wait", {"id": launched["id"], "timeout": 30}, timeout=40)
    lists: list[tuple[str, dict[str, Any]]] = [
        ("job.list", {}),  # Store._visible_ids: the names the patterns match
        ("job.list", {"state": ["succeeded"]}),  # the patterns in the query, for each (state, queue) pair
        ("job.list", {"task": "report"}),  # the patterns in the query, through the task's index
        ("job.list", {"queue": "ops"}),
        ("job.list", {"state": ["running", "queued"], "queue": "ops"}),
    ]
    admin = [jobd.call(method, params)["jobs"] for method, params in lists]
    may_read = {"carol": lambda job: job["task"] == "report", "bob": lambda job: job["queue"] == "ops"}
    for user, readable in may_read.items():
        answers = calls(jobd, users[user], [*lists, ("instance.list", {}), ("daemon.status", {})])
        assert all("result" in answer for answer in answers), (user, answers)
        *jobs, instances, status = [answer["result"] for answer in answers]
        for (_, params), everyone, seen in zip(lists, admin, jobs, strict=True):
            assert [job["id"] for job in seen["jobs"]] == [job["id"] for job in everyone if readable(job)], params
        assert sum(status["jobs"].values()) == len(jobs[0]["jobs"]) > 0, (user, status["jobs"])
        workflows = [instance["workflow"] for instance in instances["instances"]]
        assert workflows == (["wf-a"] if user == "carol" else []), (user, instances)
    _, listed, grouped = xml_session(
        jobd, users["carol"], '<instances action="list"/><instances action="list" groupby="day"/>'
    )
    assert [row.get("name") for row in listed] == ["wf-a"] and listed.get("rows") == "1"
    assert [(group.get("name"), group.get("count")) for group in grouped] == [("wf-a", "1")]
    assert "Traceback" not in jobd.log()


def test_unknown_names_are_told_only_as_far_as_a_user_may_see(jobd: Daemon, users: dict[str, Any]) -> None:
    """An unknown name's error lists the names that exist: to a user who is not an admin only those it may see (it
    listed all of them, also when a wildcard grant let the unknown name through the rights check). A schedule it may
    not read is refused as an unknown one is, without naming what it starts (the refusal named its task)."""
    alice = calls(
        jobd,
        users["alice"],
        [
            ("instance.launch", {"workflow": "wf-zzz"}),  # wf-* lets the name through the rights check
            ("schedule.trigger", {"name": "nosuch"}),
            ("schedule.trigger", {"name": "nightly-secret"}),  # there, but alice may not see it
            ("workflow.get", {"name": "wf-zzz"}),
        ],
    )
    codes = ["UNKNOWN_WORKFLOW", "INSUFFICIENT_RIGHTS", "INSUFFICIENT_RIGHTS", "UNKNOWN_WORKFLOW"]
    assert [answer["code"] for answer in alice] == codes, alice
    assert alice[0]["message"].endswith("; defined workflows: wf-a, wf-slow"), alice[0]
    assert alice[3]["message"] == "workflow.get: no workflow 'wf-zzz'; defined workflows: wf-a, wf-slow", alice[3]
    for answer, name in zip(alice[1:3], ("nosuch", "nightly-secret"), strict=True):
        assert answer["message"].endswith(f"may not exec schedule {name}: the exec right is missing"), answer
    # evQueue's workflow ids: bob may read no workflow, so no id names one for him; each is refused without naming
    # anything (when ids numbered all workflows, a refusal that named the workflow let him list them by counting up).
    requests = '<workflow action="get" id="1"/><workflow action="get" id="99"/>'
    _, first, unknown = xml_session(jobd, users["bob"], requests)
    for refused, number in ((first, 1), (unknown, 99)):
        assert refused.get("error-code") == "INSUFFICIENT_RIGHTS", etree.tostring(refused)
        assert refused.get("error", "").endswith(f"may not read workflow id {number}: the read right is missing")
    _, readable = xml_session(jobd, users["alice"], '<workflow action="get" id="1"/>')
    assert readable.get("status") == "OK" and readable[0].get("name") == "wf-a", etree.tostring(readable)
    # An admin is told every name.
    everything = calls(jobd, users["dave"], [("schedule.trigger", {"name": "nosuch"})])[0]
    assert everything["message"].endswith("defined schedules: nightly-secret, yearly-report"), everything


def test_a_refused_job_or_instance_is_not_named_to_a_user_who_may_not_read_it(
    jobd: Daemon, users: dict[str, Any]
) -> None:
    """Job and instance ids count up: a refusal that named the task and queue of a job (or the workflow of an
    instance) the user may not read let carol, who has no right at all, list every task, queue and workflow, and
    what ran when, by asking for ids 1, 2, 3… Only a user who may read the job is told where the right is missing."""
    secret = jobd.submit(task="secret")
    instance = jobd.call("instance.launch", {"workflow": "other"})
    report = jobd.wait(jobd.submit(task="report")["id"])
    requests: list[tuple[str, dict[str, Any]]] = [
        ("job.get", {"id": secret["id"]}),
        ("job.output", {"id": secret["id"]}),
        ("job.wait", {"id": secret["id"], "timeout": 0}),
        ("job.cancel", {"id": secret["id"]}),
        ("instance.get", {"id": instance["id"]}),
        ("instance.wait", {"id": instance["id"], "timeout": 0}),
        ("instance.cancel", {"id": instance["id"]}),
        ("instance.debug_resume", {"id": instance["id"]}),
    ]
    for user in ("alice", "carol"):
        for (method, _), answer in zip(requests, calls(jobd, users[user], requests), strict=True):
            assert answer["code"] == "INSUFFICIENT_RIGHTS", (user, method, answer)
            message = answer["message"]
            assert "secret" not in message and "other" not in message and "default" not in message, (method, message)
            assert message.endswith(f"the {answer['missing']} right is missing"), (method, message)
    _, query = xml_session(jobd, users["carol"], f'<instance action="query" id="{instance["id"]}"/>')
    assert query.get("error-code") == "INSUFFICIENT_RIGHTS" and "other" not in query.get("error", ""), query.attrib
    # alice may read her report job: told what she lacks, and where.
    [refused] = calls(jobd, users["alice"], [("job.cancel", {"id": report["id"]})])
    assert refused["message"].endswith("the kill right is missing on task report or on queue default"), refused


def _id_requests(job_id: int, instance_id: int) -> list[tuple[str, dict[str, Any]]]:
    """Every JSON-RPC method that takes a job or instance id, asking about those."""
    return [
        ("job.get", {"id": job_id}),
        ("job.output", {"id": job_id}),
        ("job.wait", {"id": job_id, "timeout": 0}),
        ("job.cancel", {"id": job_id}),
        ("instance.get", {"id": instance_id}),
        ("instance.wait", {"id": instance_id, "timeout": 0}),
        ("instance.cancel", {"id": instance_id}),
        ("instance.debug_resume", {"id": instance_id}),
    ]


def _xml_id_requests(instance_id: int) -> str:
    """Every evQueue command a user may send that takes an instance id."""
    return (
        "".join(
            f'<instance action="{action}" id="{instance_id}"{extra}/>'
            for action, extra in (("query", ""), ("wait", ' timeout="1"'), ("cancel", ""), ("killtask", ' pid="1"'))
        )
        + f'<instance action="debugresume" id="{instance_id}"/>'
    )


def test_a_job_or_instance_a_user_may_not_read_is_refused_as_one_that_does_not_exist(
    jobd: Daemon, users: dict[str, Any]
) -> None:
    """Job and instance ids count up: a refusal for a hidden id (INSUFFICIENT_RIGHTS) told apart from the answer for
    an id that names nothing (UNKNOWN_JOB, UNKNOWN_INSTANCE) showed a user with no right at all how many jobs and
    instances others have, and when they made them. To a user who is not an admin both are now the same refusal,
    on every method that takes such an id and in both protocols; an admin is still told that an id names nothing."""
    secret = jobd.submit(task="secret")
    running = jobd.call("instance.launch", {"workflow": "wf-slow"})  # one a kill would find running
    ended = jobd.call("instance.launch", {"workflow": "other"})
    jobd.call("instance.wait", {"id": ended["id"], "timeout": 30}, timeout=40)
    nothing = 10**9  # names no job and no instance

    def shape(text: str, *ids: int) -> str:
        for number in ids:
            text = re.sub(rf"\b{number}\b", "ID", text)
        return text

    for user in ("alice", "bob", "carol"):
        for instance in (running, ended):
            hidden = calls(jobd, users[user], _id_requests(secret["id"], instance["id"]))
            absent = calls(jobd, users[user], _id_requests(nothing, nothing))
            for (method, _), seen, unseen in zip(_id_requests(0, 0), hidden, absent, strict=True):
                if user == "alice" and method.startswith("instance") and instance is running:
                    continue  # alice may read wf-slow (wf-*): not hidden from her
                assert seen["code"] == unseen["code"] == "INSUFFICIENT_RIGHTS", (user, method, seen, unseen)
                assert seen["missing"] == unseen["missing"], (user, method, seen, unseen)
                assert shape(seen["message"], secret["id"], instance["id"]) == shape(unseen["message"], nothing), (
                    user,
                    method,
                    seen,
                    unseen,
                )
        # evQueue's commands on instances: the same answer for the hidden one and for none.
        _, *hidden_xml = xml_session(jobd, users[user], _xml_id_requests(ended["id"]))
        _, *absent_xml = xml_session(jobd, users[user], _xml_id_requests(nothing))
        assert len(hidden_xml) == len(absent_xml) == 5
        for seen_xml, unseen_xml in zip(hidden_xml, absent_xml, strict=True):
            assert seen_xml.get("error-code") == unseen_xml.get("error-code") == "INSUFFICIENT_RIGHTS", (
                user,
                seen_xml.attrib,
                unseen_xml.attrib,
            )
            assert shape(seen_xml.get("error", ""), ended["id"]) == shape(unseen_xml.get("error", ""), nothing)
    # An admin is told that the id names nothing.
    admin = calls(jobd, users["dave"], _id_requests(nothing, nothing))
    assert [answer["code"] for answer in admin] == ["UNKNOWN_JOB"] * 4 + ["UNKNOWN_INSTANCE"] * 4, admin
    _, *admin_xml = xml_session(jobd, users["dave"], _xml_id_requests(nothing))
    assert {answer.get("error-code") for answer in admin_xml} == {"UNKNOWN_INSTANCE"}, [a.attrib for a in admin_xml]
    jobd.call("instance.cancel", {"id": running["id"]})


# An evQueue client's connection in a client script: evq_connect() greets it, document() reads its next document.
EVQ_CLIENT = """
import json, socket, sys
from lxml import etree
from jobd.protocol.evqueue import XmlFramer
evq, framer, documents = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), XmlFramer(), []
def evq_connect():
    evq.connect("evqueue.sock")
    document()  # the greeting
def document():
    while not documents:
        documents.extend(framer.feed(evq.recv(65536)))
    return etree.fromstring(documents.pop(0))
"""

HELD_WAITS = (
    EVQ_CLIENT
    + """
job_id, instance_id = int(sys.argv[1]), int(sys.argv[2])
requests = [
    ("job.wait", {"id": job_id, "timeout": 120}),
    ("job.output", {"id": job_id, "wait": True}),
    ("instance.wait", {"id": instance_id, "timeout": 120}),
    ("ping", {}),
]
rpc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
rpc.connect("jobd.sock")
rpc.sendall(b"".join(
    json.dumps({"jsonrpc": "2.0", "id": n, "method": m, "params": p}).encode() + b"\\n"
    for n, (m, p) in enumerate(requests)
))
lines = rpc.makefile("rb")
answers = {}
while 3 not in answers:  # ping's answer comes first: the waits sent before it were taken, and are waiting
    answer = json.loads(lines.readline())
    answers[answer["id"]] = answer
evq_connect()
evq.sendall(f'<instance action="wait" id="{instance_id}" timeout="120"/>'.encode())
assert document().tag == "ping"  # a keep-alive: the wait was taken, and is waiting
print("waiting", flush=True)
while len(answers) < 4:
    answer = json.loads(lines.readline())
    answers[answer["id"]] = answer
while (reply := document()).tag == "ping":
    pass
print(json.dumps({"rpc": [answers[n] for n in range(3)], "evqueue": dict(reply.attrib)}), flush=True)
"""
)


def test_a_wait_sent_before_a_reload_took_the_right_away_is_refused_as_a_new_request_is(
    make_daemon: Any, users: dict[str, Any], tmp_path: Path
) -> None:
    """A job.wait, job.output with `wait`, instance.wait or evQueue instance wait sent while the user could read
    the job or instance, still waiting when a reload took the right away, answered the job (its state, its output,
    that the instance had ended) once it ended: the right was checked only when the request came. It is checked again
    at each reload, and the wait is answered at once the refusal a new request gets."""
    started_fifo = tmp_path / "started.fifo"
    os.mkfifo(started_fifo)
    config = (
        CONFIG
        + f"""
[task.talker]
command = ["/bin/sh", "-c", "echo started > {started_fifo}; exec sleep 120"]
queue = "ops"
"""
    )
    # Keep-alives while a request waits: the client reads the first one as the sign that its evQueue wait was taken.
    jobd = started(make_daemon, config, {"JOBD_EVQUEUE_KEEPALIVE_INTERVAL": "0.05"})
    grant = jobd.config_dir / "jobd.d" / "carol.toml"
    grant.write_text(
        f'[[access.grant]]\nusers = ["{PREFIX}carol"]\nrights = ["read"]\nqueues = ["ops"]\nworkflows = ["wf-slow"]\n'
    )
    assert jobd.call("daemon.reload")["ok"]
    job = jobd.submit(task="talker")
    assert started_fifo.read_text() == "started\n"  # it runs: job.output has an attempt to wait on
    instance = jobd.call("instance.launch", {"workflow": "wf-slow"})
    waits = held_as_user(jobd, users["carol"], HELD_WAITS, str(job["id"]), str(instance["id"]))
    try:
        assert waits.stdout is not None
        assert waits.stdout.readline() == "waiting\n", waits.stderr.read() if waits.stderr else ""
        grant.unlink()
        assert jobd.call("daemon.reload")["ok"]
        new_requests = _id_requests(job["id"], instance["id"])
        refused = calls(jobd, users["carol"], [new_requests[2], new_requests[1], new_requests[5]])
        assert [answer["code"] for answer in refused] == ["INSUFFICIENT_RIGHTS"] * 3, refused
        # Answered now, while the job and the instance still run: not when they end, which would tell when.
        out, err = waits.communicate(timeout=DEADLINE)
    finally:
        killed_if_running(waits)
        for running in jobd.call("job.list", {"state": ["queued", "running"]})["jobs"]:
            jobd.call("job.cancel", {"id": running["id"]})  # the job, and the task of the instance
    assert waits.returncode == 0, err
    seen = json.loads(out)
    got = [
        {"code": a["error"]["data"]["code"], "message": a["error"]["message"]} if "error" in a else a
        for a in seen["rpc"]
    ]
    assert got == [{"code": answer["code"], "message": answer["message"]} for answer in refused], got
    xml_refusal = seen["evqueue"]
    assert xml_refusal.get("error-code") == "INSUFFICIENT_RIGHTS", xml_refusal
    # The same refusal; JSON-RPC's starts with its method, as every refusal of a JSON-RPC method does.
    assert refused[2]["message"].startswith("instance.wait: "), refused[2]
    assert xml_refusal.get("error") == refused[2]["message"].removeprefix("instance.wait: "), xml_refusal


HELD_EVQ_COMMAND = (
    EVQ_CLIENT
    + """
evq_connect()
evq.sendall(b"<ping/>")
document()  # answered: jobd reads this connection (it may write the greeting before it watches it)
print("connected", flush=True)
sys.stdin.readline()  # jobd is stopped (SIGSTOP): it reads the command together with what the test sends next
evq.sendall(sys.argv[1].encode())
print("sent", flush=True)
while (reply := document()).tag == "ping":
    pass
print(json.dumps(dict(reply.attrib)), flush=True)
"""
)


def test_an_evqueue_wait_read_together_with_a_reload_that_took_its_right_away_is_refused(
    make_daemon: Any, users: dict[str, Any], tmp_path: Path
) -> None:
    """An evQueue command is checked when it is read, and its wait begins in a later turn of jobd's loop. A reload
    read in the same turn, after the command, took the right away between the check and the wait, which looked out
    for the reloads from its own beginning only: the wait was answered once the instance ended, telling when it did.
    It is refused at once."""
    jobd = started(make_daemon, CONFIG)
    _granted_until_the_next_daemon_reload(jobd, tmp_path, users["carol"], "read")
    instance = jobd.call("instance.launch", {"workflow": "wf-slow"})
    wait = f'<instance action="wait" id="{instance["id"]}" timeout="120"/>'
    refused = _read_together_with_a_reload(jobd, users["carol"], wait)
    [new_request] = xml_session(jobd, users["carol"], f'<instance action="wait" id="{instance["id"]}"/>')[1:]
    assert refused.get("error-code") == "INSUFFICIENT_RIGHTS", refused
    assert refused.get("error") == new_request.get("error"), (refused, new_request.attrib)


def test_a_synchronous_launch_read_together_with_a_reload_that_took_its_right_away_is_answered_its_id_at_once(
    make_daemon: Any, users: dict[str, Any], tmp_path: Path
) -> None:
    """A synchronous launch is checked when it is read, and its wait for the instance's end begins in a later turn
    of jobd's loop (with the default durability, at once: no fsync to wait for first). A reload read in the same
    turn, after the launch, that took its exec right away is seen then too: the launch is answered at once, as at a
    reload during its wait (its id, wait="timedout"), not when the instance ends."""
    jobd = started(make_daemon, CONFIG)
    _granted_until_the_next_daemon_reload(jobd, tmp_path, users["carol"], "exec")
    launch = '<instance action="launch" name="wf-slow" mode="synchronous" timeout="120"/>'
    answered = _read_together_with_a_reload(jobd, users["carol"], launch)
    assert {name: answered.get(name) for name in LAUNCH_ANSWERED_WITHOUT_ITS_END} == LAUNCH_ANSWERED_WITHOUT_ITS_END


def _granted_until_the_next_daemon_reload(jobd: Daemon, tmp_path: Path, account: pwd.struct_passwd, right: str) -> None:
    """`account` given `right` on workflow wf-slow by a drop-in linked to a file outside the watched directories,
    which _read_together_with_a_reload empties: the change is read by its daemon.reload alone, not by another from
    jobd's watch of the files later."""
    grant = tmp_path / "grant.toml"
    grant.write_text(
        f'[[access.grant]]\nusers = ["{account.pw_name}"]\nrights = ["{right}"]\nworkflows = ["wf-slow"]\n'
    )
    (jobd.config_dir / "jobd.d" / "grant.toml").symlink_to(grant)
    wait_for_log(jobd, "configuration reloaded", count=1)  # jobd's own reload, at the link's creation


def _read_together_with_a_reload(jobd: Daemon, account: pwd.struct_passwd, command: str) -> Any:
    """The attributes of jobd's answer to the evQueue `command` `account` sends, read in one turn of jobd's loop
    with a daemon.reload after it that empties the grant of _granted_until_the_next_daemon_reload: jobd is stopped
    (SIGSTOP) while the client sends its command and the test its reload. Checks that it was answered while every
    instance (of wf-slow, whose task sleeps a minute) still ran: not when it ended."""
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin.connect(str(jobd.socket_path))
    replies = admin.makefile("rb")
    admin.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')
    assert json.loads(replies.readline())["id"] == 1  # the connection is taken: its next request is read at once
    # Connected after the ping's answer: jobd has asked epoll again since it read the ping (it accepted this client
    # then), so the admin's connection is no longer on epoll's list of ready ones (asyncio's is level-triggered),
    # and comes after the command in it once both have sent.
    client = held_as_user(jobd, account, HELD_EVQ_COMMAND, command)
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == "connected\n", client.stderr.read() if client.stderr else ""
        os.kill(jobd.pid, signal.SIGSTOP)
        try:
            os.waitid(os.P_PID, jobd.pid, os.WSTOPPED | os.WNOWAIT)  # returns once jobd is stopped
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline() == "sent\n"
            (jobd.config_dir / "jobd.d" / "grant.toml").resolve().write_text("")
            admin.sendall(b'{"jsonrpc": "2.0", "id": 2, "method": "daemon.reload"}\n')
        finally:
            os.kill(jobd.pid, signal.SIGCONT)
        assert json.loads(replies.readline())["result"]["ok"] is True
        out, err = client.communicate(timeout=DEADLINE)
        instances = jobd.call("instance.list", {})["instances"]
        assert instances and all(listed["status"] != "TERMINATED" for listed in instances), instances
    finally:
        admin.close()
        killed_if_running(client)
        for listed in jobd.call("instance.list", {})["instances"]:
            if listed["status"] != "TERMINATED":
                jobd.call("instance.cancel", {"id": listed["id"]})
    assert client.returncode == 0, err
    return json.loads(out)


HELD_HTTP = """
import http.client, json, socket, sys
from tests.http_waits import answer, send_waiting_request
def connected():
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect("http.sock")
    return connection
stream = connected()
stream.sendall(b"GET /events?types=job.state HTTP/1.1\\r\\nHost: jobd\\r\\n\\r\\n")
events = http.client.HTTPResponse(stream)
events.begin()
assert events.status == 200 and events.readline() == b": jobd events\\n" and events.readline() == b"\\n"
wait = connected()
send_waiting_request(wait, "job.wait", {"id": int(sys.argv[1]), "timeout": 120})
print("waiting", flush=True)
print(json.dumps(answer(wait)), flush=True)
last = int(sys.stdin.readline())  # a job the test made after the reload: the stream is read until it has ended
seen = set()
while True:
    fields = {}
    while (line := events.readline().decode()) != "\\n":
        name, _, value = line.rstrip("\\n").partition(": ")
        fields[name] = value
    job = json.loads(fields["data"])["job"]
    seen.add(job["id"])
    if job["id"] == last and job["finished_at"] is not None:
        break
print(json.dumps(sorted(seen)), flush=True)
"""


def test_an_http_unix_socket_client_a_reload_makes_no_admin_is_refused_its_wait_and_its_events(
    make_daemon: Any, users: dict[str, Any], tmp_path: Path
) -> None:
    """An HTTP client on a unix socket is who its peer credentials say, and an admin while `[access] admins` names
    it. A job.wait it sent while an admin, still waiting when a reload made it none, was checked again as the admin it
    had been, and answered the job once it ended: it is refused at the reload, as a new request is. Its GET /events
    stream goes on as the client it now is: only the jobs it may read."""
    started_fifo = tmp_path / "started.fifo"
    os.mkfifo(started_fifo)
    jobd = started(make_daemon, CONFIG + f'[http]\nlisten = "{tmp_path / "d0" / "http.sock"}"\n')
    assert jobd.root == tmp_path / "d0"
    (jobd.root / "http.sock").chmod(0o666)
    # An ad-hoc job, which only admins may read; running, so that it has no event to send until it is cancelled.
    job = jobd.submit(command=["/bin/sh", "-c", f"echo started > {started_fifo}; exec sleep 120"])
    assert started_fifo.read_text() == "started\n"
    client = held_as_user(jobd, users["dave"], HELD_HTTP, str(job["id"]))  # an admin through his group
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == "waiting\n", client.stderr.read() if client.stderr else ""
        (jobd.config_dir / "jobd.d" / "admins.toml").write_text(
            f'[access]\nadmins = {{ users = ["root"], groups = [] }}\n\n'
            f'[[access.grant]]\nusers = ["{PREFIX}dave"]\nrights = ["read"]\nqueues = ["ops"]\n'
        )
        assert jobd.call("daemon.reload")["ok"]
        status, refused = json.loads(client.stdout.readline())
        # Answered at the reload, while the job still runs: not when it ends.
        assert jobd.call("job.get", {"id": job["id"]})["state"] == "running"
        [new_request] = calls(jobd, users["dave"], [("job.wait", {"id": job["id"]})])
        assert (status, refused["error"]["code"]) == (403, "INSUFFICIENT_RIGHTS"), refused
        assert refused["error"]["message"] == new_request["message"], (refused, new_request)
        hidden = jobd.submit(command=["true"])
        shown = jobd.submit(command=["true"], queue="ops")
        for made in (hidden, shown):
            jobd.wait(made["id"])
        client.stdin.write(f"{shown['id']}\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=DEADLINE)
    finally:
        killed_if_running(client)
        jobd.call("job.cancel", {"id": job["id"]})
    assert client.returncode == 0, err
    assert json.loads(out) == [shown["id"]]  # the ad-hoc job made after the reload is not shown to it


HELD_LAUNCH = (
    EVQ_CLIENT
    + """
evq_connect()
evq.sendall(b'<instance action="launch" name="wf-slow" mode="synchronous" timeout="120"/>')
assert document().tag == "ping"  # a keep-alive: launched, and waiting for its end
print("waiting", flush=True)
while (reply := document()).tag == "ping":
    pass
print(json.dumps(dict(reply.attrib)), flush=True)
"""
)


def test_a_synchronous_launch_whose_right_a_reload_took_away_is_answered_its_id_at_once(
    make_daemon: Any, users: dict[str, Any]
) -> None:
    """An evQueue synchronous launch waits for its instance's end. Still waiting when a reload took its exec right
    away, it was answered when the instance ended, telling when it did. It is answered at the reload instead, as a
    wait that did not see the end is: OK (the instance was launched: a KO would have it launched again), its id, and
    wait="timedout"."""
    jobd = started(make_daemon, CONFIG, {"JOBD_EVQUEUE_KEEPALIVE_INTERVAL": "0.05"})
    assert _launch_answered_at_a_reload(jobd, users["carol"]) == LAUNCH_ANSWERED_WITHOUT_ITS_END


def test_a_synchronous_launch_whose_right_a_reload_took_away_during_its_fsync_is_answered_its_id_at_once(
    fsync_held_state_disk: FsyncHold, make_daemon: Any, users: dict[str, Any]
) -> None:
    """With durability = "fsync", a synchronous launch first waits for its commit's fsync, then for its instance's
    end. A reload during the fsync that took the exec right away was not looked at: the launch was answered once the
    instance ended, telling when it did. It is answered once the fsync is done, as at a reload during the wait."""
    keepalives = {"JOBD_EVQUEUE_KEEPALIVE_INTERVAL": "0.05"}
    jobd = started(make_daemon, CONFIG, keepalives, daemon_extra='durability = "fsync"')
    answered = _launch_answered_at_a_reload(jobd, users["carol"], fsync_held_state_disk)
    assert answered == LAUNCH_ANSWERED_WITHOUT_ITS_END


# What a synchronous launch whose exec right a reload took away is answered: its instance was launched (a KO would
# have it launched again), its id, and that the wait did not see its end.
LAUNCH_ANSWERED_WITHOUT_ITS_END = {"status": "OK", "workflow-instance-id": "1", "wait": "timedout", "error-code": None}


def _launch_answered_at_a_reload(jobd: Daemon, account: pwd.struct_passwd, fsync: FsyncHold | None = None) -> Any:
    """What `account`'s synchronous launch of wf-slow (whose task sleeps a minute) is answered when a reload takes
    its exec right away while it waits: for its instance's end, or with `fsync`, for its commit's fsync (held from
    before the launch until after the reload). Checks that it was answered while the instance still ran.

    The reloads are jobd's own, at the change of a file: that is one reload for each change, and a daemon.reload
    besides would have the change's own reload come after it, when a wait that missed the first would see it."""
    grant = jobd.config_dir / "jobd.d" / "carol.toml"
    grant.write_text(f'[[access.grant]]\nusers = ["{account.pw_name}"]\nrights = ["exec"]\nworkflows = ["wf-slow"]\n')
    wait_for_log(jobd, "configuration reloaded", count=1)
    if fsync is not None:
        fsync.hold()
    launch = held_as_user(jobd, account, HELD_LAUNCH)
    try:
        assert launch.stdout is not None
        assert launch.stdout.readline() == "waiting\n", launch.stderr.read() if launch.stderr else ""
        grant.unlink()
        wait_for_log(jobd, "configuration reloaded", count=2)
        if fsync is not None:
            fsync.release()
        out, err = launch.communicate(timeout=DEADLINE)
        [instance] = jobd.call("instance.list", {})["instances"]
        # Answered while the instance still runs (its task sleeps a minute): not when it ends.
        assert jobd.call("instance.get", {"id": instance["id"]})["status"] != "TERMINATED"
    finally:
        if fsync is not None:
            fsync.release()
        killed_if_running(launch)
        for listed in jobd.call("instance.list", {})["instances"]:
            if listed["status"] != "TERMINATED":
                jobd.call("instance.cancel", {"id": listed["id"]})
    assert launch.returncode == 0, err
    assert instance["id"] == 1
    reply = json.loads(out)
    return {name: reply.get(name) for name in ("status", "workflow-instance-id", "wait", "error-code")}


def test_a_failed_reload_is_explained_to_admins_only(jobd: Daemon, users: dict[str, Any]) -> None:
    """daemon.status's last_reload error names a file, a line and a key: it told every user the tasks (and variable
    names) of files they may not see, which config_files is kept from them for."""
    (jobd.config_dir / "jobd.d" / "payroll.toml").write_text(
        '[task.payroll-export]\ncommand = ["/bin/true"]\nenvironment = { BANK_KEY = 5 }\n'
    )
    try:
        jobd.call("daemon.reload")
    except RemoteError as error:
        assert error.code == "CONFIG_INVALID" and "payroll" in error.message
    else:
        raise AssertionError("the reload of a broken file succeeded")
    for user in ("alice", "carol"):
        [status] = calls(jobd, users[user], [("daemon.status", {})])
        reload = status["result"]["last_reload"]
        assert reload["ok"] is False and "payroll" not in json.dumps(reload) and "BANK_KEY" not in json.dumps(reload)
        assert "shown to admins" in reload["error"], reload
        shown = as_user(jobd, users[user], [sys.executable, "-m", "jobd.jobctl", "--socket", "jobd.sock", "status"])
        assert "payroll" not in shown.stdout and "failed: the configuration has an error" in shown.stdout, shown
    [admin] = calls(jobd, users["dave"], [("daemon.status", {})])
    assert "payroll.toml:3: task.payroll-export.environment.BANK_KEY" in admin["result"]["last_reload"]["error"]


def test_a_schedules_environment_parameters_are_masked_to_users_who_are_not_admins(
    make_daemon: Any, users: dict[str, Any]
) -> None:
    """The parameters of a schedule of a parameters = "env" task are its jobs' environment, which job.get shows to
    nobody: schedule.list (and the schedule in the answers of schedule.trigger, enable, disable) showed them, a token
    given to the nightly run included, to every user who may read the task. An args task's parameters are its jobs'
    argv, shown to those readers anyway."""
    extra = f"""
[task.sync]
command = ["/usr/bin/env"]
parameters = "env"

[schedule.nightly-sync]
task = "sync"
calendar = "0 0 1 1 *"
parameters = {{ TARGET = "prod", API_TOKEN = "s3cr3t-token" }}

[schedule.yearly-args]
task = "report"
calendar = "0 0 1 1 *"
parameters = {{ PERIOD = "year" }}

[[access.grant]]
users = ["{PREFIX}alice"]
rights = ["read", "exec", "edit"]
tasks = ["sync"]
"""
    daemon: Daemon = make_daemon(CONFIG + extra)
    daemon.root.chmod(0o755)
    daemon.socket_path.chmod(0o666)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("schedule.list", {}),
        ("schedule.disable", {"name": "nightly-sync"}),
        ("schedule.enable", {"name": "nightly-sync"}),
        ("schedule.trigger", {"name": "nightly-sync"}),
    ]
    answers = calls(daemon, users["alice"], requests)
    assert "s3cr3t" not in json.dumps(answers) and "prod" not in json.dumps(answers), answers
    listed = {row["name"]: row["target"]["parameters"] for row in answers[0]["result"]["schedules"]}
    masked = {"TARGET": "***", "API_TOKEN": "***"}
    assert listed == {"nightly-sync": masked, "yearly-args": {"PERIOD": "year"}, "yearly-report": {}}, listed
    assert answers[3]["result"]["schedule"]["target"]["parameters"] == masked
    daemon.wait(answers[3]["result"]["run_id"])
    [admin] = calls(daemon, users["dave"], [("schedule.list", {})])
    shown = {row["name"]: row["target"]["parameters"] for row in admin["result"]["schedules"]}
    assert shown["nightly-sync"] == {"TARGET": "prod", "API_TOKEN": "s3cr3t-token"}


def test_a_key_answers_only_to_those_who_may_read_its_job(jobd: Daemon, users: dict[str, Any]) -> None:
    # A keyed submit whose key is taken answers with the job that has it: the job's command and arguments.
    secret = jobd.submit(task="secret", key="nightly-backup", args=["--password=hunter"])
    refused, own, again = calls(
        jobd,
        users["alice"],
        [
            ("job.submit", {"task": "report", "key": "nightly-backup"}),
            ("job.submit", {"task": "report", "key": "alice-own"}),
            ("job.submit", {"task": "report", "key": "alice-own"}),
        ],
    )
    assert outcome(refused) == "read"
    assert "hunter" not in json.dumps(refused) and f"job {secret['id']}" not in refused["message"], refused
    assert own["result"]["id"] == again["result"]["id"]  # her own key still answers with her own job
    assert [job["id"] for job in jobd.call("job.list", {"task": "report"})["jobs"]] == [own["result"]["id"]]


def test_a_key_twice_in_a_batch_answers_only_to_those_who_may_read_its_job(
    make_daemon: Any, users: dict[str, Any]
) -> None:
    # Members of one batch count as submits in a row: a later member with an earlier one's key is answered with that
    # member's job only if the peer may read it, as a second submit is. carol may submit `secret` but not read its
    # jobs: her batch with the key twice was answered (the second member with the first's job) though a second
    # submit with the key is refused.
    submit_only = f"""
[[access.grant]]
users = ["{PREFIX}carol"]
rights = ["exec"]
tasks = ["secret"]
"""
    jobd = started(make_daemon, CONFIG + submit_only)
    twice = {"jobs": [{"task": "secret", "key": "carol-batch"}, {"task": "secret", "key": "carol-batch"}]}
    batch, alone, again = calls(
        jobd,
        users["carol"],
        [
            ("job.submit", twice),
            ("job.submit", {"task": "secret", "key": "carol-alone"}),
            ("job.submit", {"task": "secret", "key": "carol-alone"}),
        ],
    )
    assert outcome(batch) == "read"
    assert batch["message"].startswith("job.submit: jobs[1]: "), batch
    assert "jobs[0] has it" in batch["message"], batch
    assert outcome(alone) == "ok" and outcome(again) == "read"  # a second submit is refused alike
    # The refused batch made no job: the one job of `secret` is the single submit's.
    assert [job["key"] for job in jobd.call("job.list", {"task": "secret"})["jobs"]] == ["carol-alone"]
    # alice may read `report`'s jobs: her batch with the key twice is answered with one job for both members.
    [answered] = calls(
        jobd,
        users["alice"],
        [("job.submit", {"jobs": [{"task": "report", "key": "k"}, {"task": "report", "key": "k"}]})],
    )
    first, second = answered["result"]["jobs"]
    assert first["id"] == second["id"], answered


def test_a_key_of_a_workflow_task_cannot_be_taken_in_advance(jobd: Daemon, users: dict[str, Any]) -> None:
    """A workflow task's job has the key `instance:ID:task:N:try:T`, and ids come in order: a job submitted with the
    key of a task of the next instance was taken for that task's own job, its output the task's, the task never run.
    alice may submit `report` but not launch `other`: such keys are refused, and the task runs its own job."""
    first = jobd.call("instance.launch", {"workflow": "other"})
    jobd.call("instance.wait", {"id": first["id"], "timeout": 30})
    [job] = jobd.call("job.list", {"context": f"instance:{first['id']}"})["jobs"]
    key_prefix = f"instance:{first['id']}:"
    assert job["key"].startswith(key_prefix) and job["key"].endswith(":try:1"), job
    next_key = f"instance:{first['id'] + 1}:" + job["key"].removeprefix(key_prefix)
    [claimed] = calls(jobd, users["alice"], [("job.submit", {"task": "report", "args": ["forged"], "key": next_key})])
    assert claimed.get("code") == "INVALID_PARAMS", claimed
    assert "key" in claimed["message"] and "not starting with 'instance:'" in claimed["message"], claimed
    second = jobd.call("instance.launch", {"workflow": "other"})
    assert second["id"] == first["id"] + 1
    jobd.call("instance.wait", {"id": second["id"], "timeout": 30})
    [job] = jobd.call("job.list", {"context": f"instance:{second['id']}"})["jobs"]
    assert job["key"] == next_key and job["command"] == ["/bin/echo", "report"], job
    assert jobd.output(job["id"]) == "report\n"


def test_a_program_named_in_the_state_directory_is_not_handed_to_the_user(jobd: Daemon, users: dict[str, Any]) -> None:
    """jobd opens a workflow's SCRIPT file in state_dir/scripts itself and gives it to the task's user (chown, 0500).
    It did so for any program path under the state directory: dave, an admin but not root, whose ad-hoc commands
    run as himself, was given the database, and through `..` any file of the machine (here one of root's, 0600)."""
    victim = jobd.root / "victim"
    victim.write_text("root's\n")
    victim.chmod(0o600)
    database = jobd.state_dir / "jobd.sqlite3"
    before = {path: os.stat(path) for path in (victim, database)}
    programs = [f"{jobd.state_dir}/../victim", str(database), f"{jobd.state_dir}/scripts/../jobd.sqlite3"]
    answers = calls(jobd, users["dave"], [("job.submit", {"command": [program]}) for program in programs])
    for program, answer in zip(programs, answers, strict=True):
        done = jobd.wait(answer["result"]["id"])
        assert done["state"] == "failed" and "Permission denied" in done["error"], (program, done)
    for path, was in before.items():
        now = os.stat(path)
        assert (now.st_uid, now.st_gid, now.st_mode) == (was.st_uid, was.st_gid, was.st_mode), path


def test_events_reach_only_subscribers_who_may_read_the_job(jobd: Daemon, users: dict[str, Any]) -> None:
    program = """
import json, sys
from jobd.client import Client
with Client("jobd.sock") as client:
    client.call("events.subscribe", {"types": ["job.state"]})
    print("subscribed", flush=True)
    sys.stdin.readline()  # the test submits its jobs, then tells us to look
    seen = []
    while True:
        event = client.next_event(timeout=30)
        seen.append([event["job"]["task"], event["job"]["state"]])
        if event["job"]["task"] == "report" and event["job"]["state"] == "succeeded":
            break
print(json.dumps(seen))
"""
    process = held_as_user(jobd, users["alice"], program)
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "subscribed"
        jobd.wait(jobd.submit(task="secret")["id"])  # before the report job: alice must not see it
        jobd.wait(jobd.submit(task="report")["id"])
        process.stdin.write("go\n")
        process.stdin.flush()
        out, err = process.communicate(timeout=DEADLINE)
    finally:
        killed_if_running(process)
    assert process.returncode == 0, err
    seen = json.loads(out)
    assert {task for task, _ in seen} == {"report"}, seen


def test_evqueue_protocol_matrix(jobd: Daemon, users: dict[str, Any]) -> None:
    instance = jobd.call("instance.launch", {"workflow": "wf-a"})
    jobd.call("instance.wait", {"id": instance["id"], "timeout": 30}, timeout=40)
    running = jobd.call("instance.launch", {"workflow": "wf-slow"})
    requests = [
        '<instance action="launch" name="wf-a"/>',
        '<instance action="launch" name="other"/>',
        f'<instance action="query" id="{instance["id"]}"/>',
        f'<instance action="cancel" id="{running["id"]}"/>',
        f'<instance action="delete" id="{instance["id"]}"/>',
        '<workflow action="get" name="wf-a"/>',
        '<workflow action="get" name="other"/>',
        '<control action="reload"/>',
        '<status action="query" type="configuration"/>',
        '<statistics action="query" type="global"/>',
        "<ping/>",
    ]
    expected = {
        "alice": "OK exec OK kill admin OK read admin admin OK OK",
        "carol": "exec exec read kill admin read read admin admin OK OK",
        "dave": "OK OK OK OK OK OK OK OK OK OK OK",
    }
    for user, wanted in expected.items():
        greeting, *answers = xml_session(jobd, users[user], "".join(requests[:-4] + requests[-3:]))
        assert greeting.tag == "ready" and greeting.get("profile") == ("ADMIN" if user == "dave" else "USER")
        got = []
        for answer in answers:
            if answer.get("status") == "OK":
                got.append("OK")
                continue
            assert answer.get("error-code") == "INSUFFICIENT_RIGHTS", etree.tostring(answer)
            error = answer.get("error") or ""
            got.append(error.split("the ")[-1].split(" right is missing")[0])
        wanted_list = wanted.split()
        assert got == wanted_list[:-4] + wanted_list[-3:], (user, got)


def test_evqueue_lists_are_filtered(jobd: Daemon, users: dict[str, Any]) -> None:
    jobd.call("instance.launch", {"workflow": "wf-a"})
    jobd.call("instance.launch", {"workflow": "other"})
    requests = (
        '<workflows action="list"/><instances action="list"/><queuepool action="list"/>'
        '<statistics action="query" type="queue"/><status action="query" type="workflows"/>'
    )
    _, workflows, instances, pool, statistics, status = xml_session(jobd, users["alice"], requests)
    assert [w.get("name") for w in workflows] == ["wf-a", "wf-slow"]
    assert {i.get("name") for i in instances} == {"wf-a"} and instances.get("rows") == "1"
    assert len(pool) == 0 and len(statistics[0]) == 0
    assert {w.get("name") for w in status} <= {"wf-a"}
    _, workflows, instances, pool, statistics, _ = xml_session(jobd, users["bob"], requests)
    assert len(workflows) == 0 and instances.get("rows") == "0"
    assert [q.get("name") for q in pool] == ["ops"] and [q.get("name") for q in statistics[0]] == ["ops"]


def test_evqueue_ids_number_only_what_a_user_may_read(jobd: Daemon, users: dict[str, Any]) -> None:
    """evQueue's workflow and queue ids were positions by name among all workflows and queues: alice, who may read
    wf-a and wf-slow, saw them as ids 2 and 3 (and so learnt that a workflow she may not see sorts before them); bob,
    who may read queue ops, saw it as id 2 (one queue he may not see sorts before it). Ids now number only what the
    user may read, and `workflow get id=…` takes those same ids; an admin's number everything."""
    requests = (
        '<workflows action="list"/><queuepool action="list"/>'
        '<workflow action="get" id="1"/><workflow action="get" id="2"/><workflow action="get" id="3"/>'
    )

    def ids(answer: etree._Element) -> list[tuple[str | None, str | None]]:
        return [(row.get("id"), row.get("name")) for row in answer]

    _, workflows, pool, first, second, third = xml_session(jobd, users["alice"], requests)
    assert ids(workflows) == [("1", "wf-a"), ("2", "wf-slow")] and ids(pool) == []
    assert [first[0].get("name"), second[0].get("name")] == ["wf-a", "wf-slow"]
    assert [first[0].get("id"), second[0].get("id")] == ["1", "2"]
    assert third.get("error-code") == "INSUFFICIENT_RIGHTS", third.attrib  # past hers: names nothing she may see
    assert third.get("error", "").endswith("may not read workflow id 3: the read right is missing"), third.attrib
    _, workflows, pool, *_ = xml_session(jobd, users["bob"], requests)
    assert ids(workflows) == [] and ids(pool) == [("1", "ops")]
    _, workflows, pool, first, second, third = xml_session(jobd, users["dave"], requests)
    assert ids(workflows) == [("1", "other"), ("2", "wf-a"), ("3", "wf-slow")]
    assert ids(pool) == [("1", "default"), ("2", "ops")]
    assert [answer[0].get("name") for answer in (first, second, third)] == ["other", "wf-a", "wf-slow"]


def test_evqueue_gets_by_id_have_the_rights_of_their_lists(jobd: Daemon, users: dict[str, Any]) -> None:
    """`queue get id=…` takes the ids `queuepool list` gives the user: bob may read queue ops alone, which is his id
    1; an id past his names nothing he may see and is refused as a queue he may not read is, not UNKNOWN_OBJECT
    (that would tell how many queues there are). `workflow_schedule get` and `retry_schedule get` are for admins,
    as their lists are. An admin's unknown id is UNKNOWN_OBJECT, as in evQueue."""
    requests = (
        '<queue action="get" id="1"/><queue action="get" id="2"/><queue action="get" id="3"/>'
        '<workflow_schedule action="get" id="1"/><retry_schedule action="get" id="1"/>'
    )
    _, first, second, third, workflow_schedule, retry_schedule = xml_session(jobd, users["bob"], requests)
    # A task's output, by its job's id, is for admins too, as evQueue's `processmanager tail`.
    job = jobd.submit(task="report")
    _, tail = xml_session(jobd, users["bob"], f'<processmanager action="tail" tid="{job["id"]}" type="stdout"/>')
    assert tail.get("error-code") == "INSUFFICIENT_RIGHTS", etree.tostring(tail)
    assert "may not read the output of a task with processmanager tail" in (tail.get("error") or "")
    assert first.get("status") == "OK" and dict(first[0].attrib)["name"] == "ops", etree.tostring(first)
    assert first[0].get("id") == "1", etree.tostring(first)
    for refused, number in ((second, 2), (third, 3)):
        assert refused.get("error-code") == "INSUFFICIENT_RIGHTS", etree.tostring(refused)
        assert refused.get("error", "").endswith(f"may not read queue id {number}: the read right is missing")
    for refused, what in ((workflow_schedule, "see a workflow schedule"), (retry_schedule, "see a retry schedule")):
        assert refused.get("error-code") == "INSUFFICIENT_RIGHTS", etree.tostring(refused)
        assert what in (refused.get("error") or ""), etree.tostring(refused)
    _, first, *_ = xml_session(jobd, users["alice"], requests)  # alice may read no queue
    assert first.get("error-code") == "INSUFFICIENT_RIGHTS", etree.tostring(first)
    _, first, second, third, workflow_schedule, retry_schedule = xml_session(jobd, users["dave"], requests)
    assert [first[0].get("name"), second[0].get("name")] == ["default", "ops"]
    assert third.get("error-code") == "UNKNOWN_OBJECT", etree.tostring(third)
    # jobd's config here has task schedules only, and no retry schedule: nothing for these ids to name.
    assert workflow_schedule.get("error-code") == retry_schedule.get("error-code") == "UNKNOWN_OBJECT"


def test_an_xpathfilter_a_user_makes_run_for_minutes_in_c_is_given_up_and_holds_nobody_up(
    jobd: Daemon, users: dict[str, Any]
) -> None:
    """alice may launch and read wf-a, so she can put 600,000 characters of her choosing (a comment) into an instance
    and have an xpathfilter search them: libxml2's contains() searches naively, here 300,000 places with up to
    300,000 characters compared at each, in C, where the filter's own clock checks never run. That held jobd's event
    loop (every client, every job's end, systemd's watchdog) for two minutes. The filter is now evaluated in a child
    process that is killed when its time is up: she is refused, and jobd answers her next request and everyone
    else's (the subprocess's deadline is the bound)."""
    comment = "a" * 600_000
    _, launched = xml_session(jobd, users["alice"], f'<instance action="launch" name="wf-a" comment="{comment}"/>')
    instance = launched.get("workflow-instance-id")
    assert launched.get("status") == "OK" and instance, launched.attrib
    # "aaa…ab", half as long as the comment, is sought in it: found nowhere, after every place has been tried.
    search = "contains(//workflow/@comment, concat(substring(//workflow/@comment, 300001), 'b'))"
    requests = (
        f'<instance action="query" id="{instance}" xpathfilter="{search}"/>'
        f'<instance action="query" id="{instance}" xpathfilter="string-length(//workflow/@comment)"/>'
        "<ping/>"
    )
    _, refused, measured, pong = xml_session(jobd, users["alice"], requests)
    assert refused.get("error-code") == "INVALID_PARAMETER", refused.attrib
    assert refused.get("error") == f"xpathfilter '{search}' took longer than 0.5 s to evaluate: refused"
    assert (measured.get("status"), measured.text) == ("OK", "600000")
    assert pong.get("status") == "OK"
    assert jobd.call("ping")["pong"] is True


def test_jobctl_as_users(jobd: Daemon, users: dict[str, Any]) -> None:
    def jobctl(user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return as_user(jobd, users[user], [sys.executable, "-m", "jobd.jobctl", "--socket", "jobd.sock", *args])

    refused = jobctl("alice", "run", "--", "/bin/true")
    assert refused.returncode == 1, refused
    assert "INSUFFICIENT_RIGHTS" in refused.stderr or "may not run ad-hoc commands" in refused.stderr, refused
    submitted = jobctl("alice", "--json", "submit", "report")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert jobctl("alice", "wait", str(job["id"])).returncode == 0
    carol = jobctl("carol", "status", str(job["id"]))
    assert carol.returncode == 1 and "read right is missing" in carol.stderr, carol
    # No right on any queue: told so, as ls tells "no jobs", rather than a table header with nothing under it.
    no_queues = jobctl("carol", "queues")
    assert (no_queues.returncode, no_queues.stdout, no_queues.stderr) == (0, "", "no queues\n"), no_queues
    assert jobctl("bob", "queues").stdout.split()[7:8] == ["ops"]  # a grant on the queue: its row
    assert jobctl("carol", "reload").returncode == 1
    assert jobctl("bob", "pause", "ops").returncode == 0
    paused = jobctl("alice", "pause", "ops")
    assert paused.returncode == 1 and "edit right is missing" in paused.stderr, paused
    assert jobctl("dave", "resume", "ops").returncode == 0


def test_the_help_says_admins_only_of_exactly_the_commands_refused_to_users_who_are_not(
    jobd: Daemon, users: dict[str, Any]
) -> None:
    """`jobctl run` and `jobctl audit` said "(admins only)" in jobctl --help, `reload` and `backup`, refused to
    alice just as they are, did not. Every command is run as alice (read and exec on task report and workflows
    wf-*), on objects she may read; those refused for want of the admin right must be the ones the help marks."""
    job = jobd.wait(jobd.submit(task="report")["id"])["id"]
    instance = jobd.call("instance.launch", {"workflow": "wf-a"})["id"]
    argv = {
        "run": ["/bin/true"],
        "submit": ["report"],
        "status": [],
        "ls": [],
        "log": [str(job)],
        "wait": [str(job)],
        "cancel": [str(job)],
        "tasks": [],
        "queues": [],
        "pause": ["default"],
        "resume": ["default"],
        "reload": [],
        "backup": [],
        "workflows": [],
        "launch": ["wf-a"],
        "instance": [str(instance)],
        "instances": [],
        "schedules": [],
        "schedule": ["trigger", "yearly-report"],
        "audit": [],
    }
    commands = jobctl_module.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(argv) == set(commands), "give every command its words here"
    refused_for_admin = set()
    for name, words in argv.items():
        command = [sys.executable, "-m", "jobd.jobctl", "--socket", "jobd.sock", "--json", name, *words]
        done = as_user(jobd, users["alice"], command)
        error = json.loads(done.stderr)["error"] if done.returncode == 1 else {}
        if error.get("data", {}).get("missing") == "admin":
            refused_for_admin.add(name)
    marked = {name for name, parser in commands.items() if "(admins only)" in parser.description}
    assert refused_for_admin == marked
    assert {"run", "reload", "backup", "audit"} <= refused_for_admin  # the test sees refusals when there are some


HELD_JSON_CLIENT = """
import sys
from jobd.client import Client, RemoteError
with Client("jobd.sock") as client:
    for line in sys.stdin:  # one call per line, all on this one connection
        try:
            client.call(line.strip(), {}, timeout=30)
            print("ok", flush=True)
        except RemoteError as error:
            print(error.data.get("code"), flush=True)
"""

HELD_XML_CLIENT = """
import socket, sys
from lxml import etree
from jobd import jobctl as jobctl_module
from jobd.client import RemoteError
from jobd.protocol.evqueue import XmlFramer
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("evqueue.sock")
framer = XmlFramer()
documents = []
def answer():
    while not documents:
        documents.extend(framer.feed(sock.recv(65536)))
    return etree.fromstring(documents.pop(0))
print(answer().get("profile"), flush=True)  # the greeting
for line in sys.stdin:  # one request per line, all on this one connection
    sock.sendall(line.strip().encode())
    reply = answer()
    print(reply.get("status") if reply.get("status") == "OK" else reply.get("error-code"), flush=True)
"""


def test_a_reload_changes_who_is_an_admin_on_open_connections_too(jobd: Daemon, users: dict[str, Any]) -> None:
    # dave is an admin through his group, carol is nobody. Their connections, opened before a reload that makes carol
    # an admin and dave no longer one, follow it from their next request on: an admin removed for cause would
    # otherwise keep every right on a connection held open (a persistent PHP connection, a jobctl log -f).
    held: dict[tuple[str, str], subprocess.Popen[str]] = {}
    try:
        for user in ("dave", "carol"):
            for kind, program in (("json", HELD_JSON_CLIENT), ("xml", HELD_XML_CLIENT)):
                held[user, kind] = held_as_user(jobd, users[user], program)

        def ask(user: str, kind: str) -> str:
            request = "audit.list" if kind == "json" else '<status action="query" type="configuration"/>'
            process = held[user, kind]
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(request + "\n")
            process.stdin.flush()
            return process.stdout.readline().strip()

        for user in ("dave", "carol"):  # each XML connection's greeting, then each connection's first answers
            stdout = held[user, "xml"].stdout
            assert stdout is not None
            assert stdout.readline().strip() == ("ADMIN" if user == "dave" else "USER")
        assert [ask(user, kind) for user in ("dave", "carol") for kind in ("json", "xml")] == [
            "ok",
            "OK",
            "INSUFFICIENT_RIGHTS",
            "INSUFFICIENT_RIGHTS",
        ]
        (jobd.config_dir / "jobd.d" / "admins.toml").write_text(
            f'[access]\nadmins = {{ users = ["root", "{PREFIX}carol"], groups = [] }}\n'
        )
        assert jobd.call("daemon.reload")["ok"]
        assert [ask(user, kind) for user in ("dave", "carol") for kind in ("json", "xml")] == [
            "INSUFFICIENT_RIGHTS",
            "INSUFFICIENT_RIGHTS",
            "ok",
            "OK",
        ]
    finally:
        for process in held.values():
            if process.stdin is not None:
                process.stdin.close()
            try:
                process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_why_the_database_takes_no_writes_is_told_without_naming_the_job(
    small_state_disk: Path, jobd: Daemon, users: dict[str, Any], tmp_path: Path
) -> None:
    """store_trouble names what jobd could not record (a job, the start of a queue's jobs): told to every user,
    it named queues and jobs they may not read. They get the failure alone, admins the whole of it."""
    assert jobd.state_dir == small_state_disk
    release = tmp_path / "release"
    os.mkfifo(release)
    job_id = jobd.submit(command=["/bin/sh", "-c", 'read line < "$0"', str(release)], queue="ops")["id"]
    with open(release, "w") as fifo:  # opens once the job reads the FIFO: it runs
        filler = fill(small_state_disk)
        fifo.write("go\n")
    try:
        wait_for_log(jobd, f"cannot record the end of job {job_id}")
        admin = jobd.call("daemon.status")["store_trouble"]
        assert admin.startswith(f"cannot record the end of job {job_id}: ") and "database or disk is full" in admin
        for user in ("alice", "carol", "dave"):
            [status] = calls(jobd, users[user], [("daemon.status", {})])
            told = status["result"]["store_trouble"]
            if user == "dave":  # an admin, by the admins group
                assert told == admin
            else:
                assert told == admin.removeprefix(f"cannot record the end of job {job_id}: "), (user, told)
                assert "job" not in told and "ops" not in told, (user, told)
    finally:
        filler.unlink()  # room again: the end is recorded at the next try
    assert jobd.wait(job_id)["state"] == "succeeded"
    [status] = calls(jobd, users["alice"], [("daemon.status", {})])
    assert status["result"]["store_trouble"] is None


def test_the_writes_a_bug_of_jobds_fails_are_told_without_naming_the_job(jobd: Daemon, users: dict[str, Any]) -> None:
    """store_internal_error, as store_trouble: admins get what jobd was writing (a job of a queue others may not
    read) and the error, others the error alone. The bug: a trigger failing every job's end with an SQLITE_ERROR."""
    assert jobd.stop() == 0
    with contextlib.closing(sqlite3.connect(jobd.state_dir / "jobd.sqlite3")) as database, database:
        database.execute(
            'CREATE TRIGGER "fails_every_end" AFTER UPDATE OF "finished_at" ON "job" '
            """WHEN NEW."finished_at" IS NOT NULL BEGIN SELECT json(NEW."state" || '{'); END"""
        )
    jobd.start()
    jobd.socket_path.chmod(0o666)  # made again by the start (started() opened it to the test users)
    job_id = jobd.submit(command=["/bin/true"], queue="ops")["id"]
    wait_for_log(jobd, f"internal error: cannot record the end of job {job_id}: malformed JSON")
    admin = {"writes": 1, "error": f"cannot record the end of job {job_id}: OperationalError: malformed JSON"}
    assert jobd.call("daemon.status")["store_internal_error"] == admin
    for user in ("alice", "carol", "dave"):
        [status] = calls(jobd, users[user], [("daemon.status", {})])
        told = status["result"]["store_internal_error"]
        if user == "dave":  # an admin, by the admins group
            assert told == admin
        else:
            assert told == {"writes": 1, "error": "OperationalError: malformed JSON"}, (user, told)


HOLD_CONNECTIONS = """
import json, socket, sys
from jobd.client import Client, RemoteError
held = []
for _ in range(int(sys.argv[1])):  # connections to the API socket, each held once it is answered
    client = Client("jobd.sock")
    try:
        client.call("ping", timeout=30)
        held.append(client)
        print(json.dumps("held"), flush=True)
    except RemoteError as error:
        print(json.dumps({"code": error.data.get("code"), "limit": error.data.get("limit"), "message": error.message}),
              flush=True)
if sys.argv[2:] == ["xml"]:  # then one to the evQueue socket: its places are the same places; its greeting or refusal
    xml = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    xml.connect("evqueue.sock")
    print(json.dumps(xml.recv(65536).decode()), flush=True)
sys.stdin.readline()  # the connections are held until the test lets go
"""


@contextlib.contextmanager
def connections_held(daemon: Daemon, account: pwd.struct_passwd, *args: str, answers: int) -> Iterator[list[Any]]:
    """HOLD_CONNECTIONS run as the user with `args`: its first `answers` lines while it holds its connections, which
    it lets go (ending well) when the block ends."""
    holder = held_as_user(daemon, account, HOLD_CONNECTIONS, *args)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        yield [json.loads(holder.stdout.readline()) for _ in range(answers)]
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert holder.wait(timeout=DEADLINE) == 0, holder.stderr.read() if holder.stderr else ""
    finally:
        holder.kill()
        holder.wait()


def test_a_user_holding_every_connection_does_not_lock_out_the_admins(make_daemon: Any, users: dict[str, Any]) -> None:
    """Any local user who may connect could hold all max_connections places with idle connections: every other
    client was refused TOO_MANY_CONNECTIONS, the administrator who would look into it included. A few places past
    the limit are kept for admins."""
    daemon: Daemon = make_daemon(CONFIG, daemon_extra="max_connections = 3")
    daemon.root.chmod(0o755)
    daemon.socket_path.chmod(0o666)
    with connections_held(daemon, users["carol"], "4", answers=4) as answers:
        assert answers[:3] == ["held", "held", "held"] and answers[3]["code"] == "TOO_MANY_CONNECTIONS", answers
        # Another user is refused as carol's fourth was; root and dave (admins) still get in.
        [refused] = calls(daemon, users["alice"], [("ping", {})])
        assert refused["code"] == "TOO_MANY_CONNECTIONS", refused
        assert daemon.call("daemon.status")["running"] == 0
        [status] = calls(daemon, users["dave"], [("daemon.status", {})])
        assert "result" in status, status
    [pong] = calls(daemon, users["alice"], [("ping", {})])  # carol's places are free again
    assert pong["result"]["pong"] is True, pong


def test_one_user_holds_at_most_max_connections_per_user(make_daemon: Any, users: dict[str, Any]) -> None:
    """Without a share of its own, one user could hold every place not kept for admins and lock out the others.
    With `max_connections_per_user`, that user's next connection is refused, on either socket, and the others
    (and admins, whom it does not limit) still get in; a place given back can be taken again."""
    daemon: Daemon = make_daemon(CONFIG, daemon_extra="max_connections = 10\nmax_connections_per_user = 2")
    daemon.root.chmod(0o755)
    daemon.socket_path.chmod(0o666)
    (daemon.root / "evqueue.sock").chmod(0o666)
    carol = users["carol"]
    for round_ in range(2):  # the second time, carol's places from the first are hers to take again
        with connections_held(daemon, carol, "3", "xml", answers=4) as answers:
            assert answers[:2] == ["held", "held"], (round_, answers)
            refused = answers[2]
            assert (refused["code"], refused["limit"]) == ("TOO_MANY_CONNECTIONS", 2), refused
            assert f"uid {carol.pw_uid} ({carol.pw_name}) holds 2 already" in refused["message"], refused
            assert "max_connections_per_user" in refused["message"], refused
            assert 'error-code="TOO_MANY_CONNECTIONS"' in answers[3], answers[3]
            # Other users get in meanwhile: alice, and root and dave (admins) past two connections each.
            [pong] = calls(daemon, users["alice"], [("ping", {})])
            assert pong["result"]["pong"] is True, pong
            with contextlib.ExitStack() as stack:
                for _ in range(3):
                    stack.enter_context(daemon.client()).call("ping")
                [status] = calls(daemon, users["dave"], [("daemon.status", {})])
                assert "result" in status, status


def test_the_suspended_schedules_in_daemon_status_are_those_the_peer_may_read(
    make_daemon: Any, users: dict[str, Any]
) -> None:
    """daemon.status's suspended_schedules, as schedule.list: alice, who may read the task `report`, is told of the
    suspended schedule that submits it, not of the one that submits `secret`; an admin is told of both."""
    failing = (
        CONFIG.replace('command = ["/bin/echo", "report"]', 'command = ["/bin/false"]')
        .replace('command = ["/bin/echo", "secret"]', 'command = ["/bin/false"]')
        .replace('calendar = "0 0 1 1 *"', 'calendar = "* * * * * *"\non_failure = "suspend"')
    )
    daemon = started(make_daemon, failing)
    for name in ("nightly-secret", "yearly-report"):
        wait_for_log(daemon, f"schedule {name} suspended after a failed run")
    both = ["nightly-secret", "yearly-report"]
    assert daemon.call("daemon.status")["suspended_schedules"] == both
    for user, told in (("alice", ["yearly-report"]), ("carol", []), ("dave", both)):
        [status] = calls(daemon, users[user], [("daemon.status", {})])
        assert status["result"]["suspended_schedules"] == told, (user, status)
