"""Rights as `jobd.engine.access` decides them (pure), `[access]` as the config reads it, and who a local peer is."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from jobd import config
from jobd.engine import access
from jobd.engine.submit import SubmitRequest, resolve
from jobd.errors import ConfigError, InsufficientRights
from jobd.model import AccessDef, Config, Grant, ObjectKind, Right, TaskDef
from jobd.peer import Peer, identify_peer

READ, EXEC, KILL, EDIT = Right.READ, Right.EXEC, Right.KILL, Right.EDIT
WORKFLOW, TASK, QUEUE = ObjectKind.WORKFLOW, ObjectKind.TASK, ObjectKind.QUEUE

RULES = AccessDef(
    grants=(
        Grant(rights=frozenset({READ, EXEC}), users=frozenset({"alice"}), workflows=("report*",), tasks=("resize",)),
        Grant(rights=frozenset({KILL}), groups=frozenset({"ops"}), workflows=("*",), queues=("batch",)),
        Grant(rights=frozenset({EDIT, READ}), users=frozenset({"bob"}), queues=("q?",)),
    )
)


def peer(user: str, *groups: str, admin: bool = False, uid: int = 1000) -> Peer:
    return Peer(uid=uid, gid=uid, pid=1, is_admin=admin, user=user, groups=frozenset(groups))


ALICE, BOB, CAROL, ADMIN = peer("alice", "alice"), peer("bob", "bob"), peer("carol", "ops"), peer("root", admin=True)


@pytest.mark.parametrize(
    ("who", "right", "kind", "name", "allowed"),
    [
        (ALICE, READ, WORKFLOW, "report", True),
        (ALICE, EXEC, WORKFLOW, "report-daily", True),  # wildcard
        (ALICE, KILL, WORKFLOW, "report", False),  # a right not granted
        (ALICE, READ, WORKFLOW, "Report", False),  # case matters
        (ALICE, READ, WORKFLOW, "daily-report", False),  # the pattern is anchored
        (ALICE, EXEC, TASK, "resize", True),
        (ALICE, EXEC, QUEUE, "resize", False),  # a grant on a task says nothing of a queue of that name
        (CAROL, KILL, WORKFLOW, "anything", True),  # through a group
        (CAROL, READ, WORKFLOW, "anything", False),
        (CAROL, KILL, QUEUE, "batch", True),
        (BOB, EDIT, QUEUE, "q1", True),
        (BOB, EDIT, QUEUE, "q12", False),  # ? is exactly one character
        (BOB, READ, QUEUE, "batch", False),
        (peer("mallory", "alice"), READ, WORKFLOW, "report", False),  # a group called like a granted user is not it
        (ADMIN, EDIT, QUEUE, "anything", True),
        (ADMIN, KILL, TASK, "anything", True),
    ],
)
def test_may(who: Peer, right: Right, kind: ObjectKind, name: str, allowed: bool) -> None:
    assert access.may(RULES, who, right, kind, name) is allowed


def test_a_refusal_names_the_missing_right_and_the_object() -> None:
    with pytest.raises(InsufficientRights) as refused:
        access.require(RULES, ALICE, KILL, WORKFLOW, "report")
    assert refused.value.code == "INSUFFICIENT_RIGHTS"
    assert "user alice (uid 1000) may not kill workflow report: the kill right is missing" in refused.value.message
    assert refused.value.details == {"missing": "kill", "kind": "workflow", "name": "report"}
    access.require(RULES, ALICE, EXEC, WORKFLOW, "report")  # no exception


def test_a_job_takes_the_rights_of_its_task_or_of_its_queue() -> None:
    assert access.may_job(RULES, ALICE, READ, "resize", "default")  # task
    assert not access.may_job(RULES, ALICE, KILL, "resize", "default")
    assert access.may_job(RULES, CAROL, KILL, "resize", "batch")  # queue
    assert access.may_job(RULES, CAROL, KILL, None, "batch")  # an ad-hoc job: its queue only
    assert not access.may_job(RULES, ALICE, READ, None, "default")
    with pytest.raises(InsufficientRights) as refused:
        access.require_job(RULES, ALICE, KILL, 7, "resize", "default")
    assert "may not kill job 7: the kill right is missing on task resize or on queue default" in refused.value.message
    assert refused.value.details["missing"] == "kill"


def test_admin_only_things() -> None:
    access.require_admin(ADMIN, "reload")
    with pytest.raises(InsufficientRights) as refused:
        access.require_admin(ALICE, "reload the configuration")
    assert refused.value.details == {"missing": "admin"}
    assert "may not reload the configuration" in refused.value.message


def test_admins_by_user_or_group() -> None:
    rules = AccessDef()
    assert access.is_admin(rules, "root", ["root"])
    assert access.is_admin(rules, "eve", ["eve", "jobd-admin"])
    assert not access.is_admin(rules, "eve", ["eve", "adm"])
    custom = AccessDef(admin_users=frozenset({"ops"}), admin_groups=frozenset())
    assert not access.is_admin(custom, "root", ["root", "jobd-admin"])
    assert access.is_admin(custom, "ops", [])


def test_glob_patterns_gather_what_a_peer_may_read() -> None:
    assert access.glob_patterns(RULES, ADMIN, READ, WORKFLOW) is None
    assert access.glob_patterns(RULES, ALICE, READ, WORKFLOW) == ("report*",)
    assert access.glob_patterns(RULES, ALICE, READ, QUEUE) == ()
    assert access.glob_patterns(RULES, BOB, READ, QUEUE) == ("q?",)
    assert access.glob_patterns(RULES, CAROL, READ, WORKFLOW) == ()  # kill only
    # From every grant that applies, in their order, each pattern once.
    overlapping = AccessDef(
        grants=(
            Grant(rights=frozenset({READ}), users=frozenset({"alice"}), tasks=("b", "a*", "b")),
            Grant(rights=frozenset({READ}), groups=frozenset({"alice"}), tasks=("c", "a*")),
        )
    )
    assert access.glob_patterns(overlapping, ALICE, READ, TASK) == ("b", "a*", "c")


def test_submitting_a_task_needs_exec_on_it_and_on_another_queue() -> None:
    tasks = {"resize": TaskDef("resize", ("/bin/true",), queue="default")}
    conf = Config(tasks=tasks, access=RULES)
    assert resolve(conf, SubmitRequest(task="resize"), ALICE).task == "resize"
    with pytest.raises(InsufficientRights) as refused:
        resolve(conf, SubmitRequest(task="resize"), BOB)
    assert refused.value.details["missing"] == "exec"
    with pytest.raises(InsufficientRights) as refused:  # the task's own queue is fine, another needs exec on it
        resolve(conf, SubmitRequest(task="resize", queue="batch"), ALICE)
    assert refused.value.details == {"missing": "exec", "kind": "queue", "name": "batch", "param": "queue"}
    with pytest.raises(InsufficientRights) as refused:  # not granted: refused before "unknown task"
        resolve(conf, SubmitRequest(task="secret"), ALICE)
    with pytest.raises(InsufficientRights) as refused:
        resolve(conf, SubmitRequest(command=("/bin/true",)), ALICE)
    assert refused.value.details == {"missing": "admin", "param": "command"}


# -- the config -------------------------------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> Config:
    (tmp_path / "jobd.toml").write_text(text)
    return config.load_dir(str(tmp_path))


def test_access_defaults(tmp_path: Path) -> None:
    rules = load(tmp_path, "").access
    assert rules == AccessDef(admin_users=frozenset({"root"}), admin_groups=frozenset({"jobd-admin"}), grants=())


def test_access_grants_and_admins(tmp_path: Path) -> None:
    (tmp_path / "jobd.d").mkdir()
    (tmp_path / "jobd.d" / "50-web.toml").write_text(
        '[[access.grant]]\ngroups = ["www-data"]\nrights = ["exec"]\ntasks = ["mail*"]\n'
    )
    rules = load(
        tmp_path,
        """
        [access]
        admins = { users = ["ops"], groups = [] }

        [[access.grant]]
        users = ["alice", "bob"]
        rights = ["read", "exec", "kill", "edit"]
        workflows = ["report", "backup-*"]
        queues = ["q?"]
        """,
    ).access
    assert rules.admin_users == {"ops"} and rules.admin_groups == frozenset()
    first, second = rules.grants  # drop-ins add grants
    assert first == Grant(
        rights=frozenset(Right),
        users=frozenset({"alice", "bob"}),
        workflows=("report", "backup-*"),
        queues=("q?",),
    )
    assert second == Grant(rights=frozenset({EXEC}), groups=frozenset({"www-data"}), tasks=("mail*",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[access]\nadmin = []\n",
            "jobd.toml:2: unknown key access.admin (did you mean admins?); allowed keys: admins, grant",
        ),
        ("[access]\nadmins = { users = ['ro ot'] }\n", 'jobd.toml:2: access.admins.users: invalid name "ro ot"'),
        ("[access]\nadmins = { users = 'root' }\n", "jobd.toml:2: access.admins.users: expected an array of user"),
        (
            '[[access.grant]]\nusers = ["a"]\nrights = ["read"]\nqueues = ["x"]\n\n'
            '[[access.grant]]\nusers = ["a"]\nrights = ["read", "write"]\nqueues = ["x"]\n',
            'jobd.toml:8: access.grant[2].rights: unknown right "write"; allowed: "read", "exec", "kill", "edit"',
        ),
        ('[[access.grant]]\nrights = ["read"]\nqueues = ["x"]\n', "jobd.toml:1: access.grant[1]: give users = [...]"),
        ('[[access.grant]]\nusers = ["a"]\nqueues = ["x"]\n', "access.grant[1]: missing required key rights"),
        ('[[access.grant]]\nusers = ["a"]\nrights = []\nqueues = ["x"]\n', "expected a non-empty array of rights"),
        ('[[access.grant]]\nusers = ["a"]\nrights = ["read"]\n', "name what it grants rights on: workflows, tasks"),
        (
            '[[access.grant]]\nusers = ["a"]\nrights = ["read"]\ntasks = ["../etc"]\n',
            'jobd.toml:4: access.grant[1].tasks: invalid name "../etc"; allowed: names of 1 to 64 characters',
        ),
        (
            '[[access.grant]]\nusers = ["a"]\nrights = ["read"]\nqueues = ["[ab]"]\n',
            'access.grant[1].queues: invalid name "[ab]"; allowed: names of 1 to 64 characters from A-Z a-z 0-9 _ . -, '
            "with the wildcards * (any run) and ? (one)",
        ),
        ('[[access.grant]]\nusers = ["a"]\nrights = ["read"]\nqueue = ["x"]\n', "unknown key access.grant[1].queue"),
        ("[access]\ngrant = 3\n", "access.grant: expected an array of tables [[access.grant]]"),
    ],
)
def test_access_errors_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as failed:
        load(tmp_path, text)
    assert message in failed.value.message


# -- identity ------------------------------------------------------------------------------------------------------


def test_identify_peer_reads_the_process_groups() -> None:
    """This very process: its user, its primary group and its supplementary groups, by name."""
    me = identify_peer(os.getpid(), os.geteuid(), os.getegid(), AccessDef())
    assert me.user == pwd.getpwuid(os.geteuid()).pw_name
    expected = {grp.getgrgid(gid).gr_name for gid in {os.getegid(), *os.getgroups()}}
    assert me.groups == frozenset(expected)
    assert me.is_admin  # jobd's own uid


def test_identify_peer_without_the_process_uses_the_group_database() -> None:
    # pid 0 is nobody's: the groups come from getgrouplist, and an unknown uid is its number.
    nobody = pwd.getpwnam("nobody")
    peer_ = identify_peer(0, nobody.pw_uid, nobody.pw_gid, AccessDef())
    assert peer_.user == "nobody" and not peer_.is_admin
    assert grp.getgrgid(nobody.pw_gid).gr_name in peer_.groups
    unknown = identify_peer(0, 4_000_123, 4_000_123, AccessDef())
    assert (unknown.user, unknown.groups, unknown.is_admin) == ("4000123", frozenset({"4000123"}), False)
    # A pid that is not a process of that uid (here: ours, as root) is not trusted for the groups.
    assert identify_peer(os.getpid(), nobody.pw_uid, nobody.pw_gid, AccessDef()).groups == peer_.groups


def test_identify_peer_reads_every_group_of_a_process_with_thousands() -> None:
    """A real process of another user with 3,000 supplementary groups: /proc/PID/status is then ~20 kB, more
    than one read of it returns, and every group must still count."""
    nobody = pwd.getpwnam("nobody")
    groups = list(range(3_100_000, 3_103_000))
    listed = ",".join(map(str, groups))
    setpriv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", f"--groups={listed}"]
    child = subprocess.Popen([*setpriv, "sh", "-c", "echo ready; exec sleep 60"], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"  # runs as nobody, groups set
        assert len(Path(f"/proc/{child.pid}/status").read_bytes()) > 16384
        peer_ = identify_peer(child.pid, nobody.pw_uid, nobody.pw_gid, AccessDef())
        assert peer_.groups == frozenset({grp.getgrgid(nobody.pw_gid).gr_name, *map(str, groups)})
    finally:
        child.kill()
        child.wait()


def test_identify_peer_admins_by_name_and_group() -> None:
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    assert identify_peer(0, nobody.pw_uid, nobody.pw_gid, AccessDef(admin_users=frozenset({"nobody"}))).is_admin
    assert identify_peer(0, nobody.pw_uid, nobody.pw_gid, AccessDef(admin_groups=frozenset({group}))).is_admin


def test_docs_describe_every_access_key() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    keys = config.ACCESS_KEYS + config.ADMINS_KEYS + config.GRANT_KEYS + tuple(str(right) for right in Right)
    assert [key for key in keys if f"`{key}`" not in text and f'`"{key}"`' not in text] == []
