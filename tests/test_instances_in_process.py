"""jobd/engine/instances.py in-process, on an event loop, for what a real daemon cannot be made to do on cue: a
store that refuses every write (as SQLite does on a full disk), and an engine that refuses a submit because jobd is
stopping (a task's end told in the instant between the stop's start and its SIGTERMs)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harness import REPO
from lxml import etree
from test_workflow_engine import NOW, job, launch, task, workflow

from jobd.engine.instances import Instances, _Live
from jobd.engine.workflow import Instance, NodeStatus
from jobd.errors import ShuttingDown
from jobd.model import InstanceSummary


class RefusingStore:
    """Refuses every save as SQLite refuses a write on a full disk; counts the tries."""

    def __init__(self) -> None:
        self.tries = 0

    def save_instance(self, *args: Any, **kwargs: Any) -> None:
        self.tries += 1
        raise sqlite3.OperationalError("database or disk is full")


def _engine(tmp_path: Path, **more: Any) -> Any:
    """What Instances reads of an engine and its configuration, and `more` (its methods a test needs)."""
    daemon = SimpleNamespace(
        state_dir=str(tmp_path), kill_grace=10.0, max_output=1 << 20, default_uid=None, default_gid=None
    )
    config = SimpleNamespace(daemon=daemon, tasks={}, queues={"default": None})
    return SimpleNamespace(config=config, scripts_dir=str(tmp_path / "scripts"), **more)


def _live(machine: Instance) -> _Live:
    return _Live(InstanceSummary(id=1, workflow="wf", status="EXECUTING", errors=0, started_at=NOW), machine)


def _one_task_instance(tmp_path: Path, submit: Callable[..., Any]) -> tuple[Instances, _Live, list[Any]]:
    """Instances over an engine whose submit is `submit` and a store that refuses writes, holding instance 1 of a
    workflow of one task, just launched: its actions not applied yet."""
    instances = Instances(_engine(tmp_path, submit=submit), RefusingStore())  # type: ignore[arg-type]
    machine, actions = launch(workflow(job("a", task("/bin/a"))))
    live = _live(machine)
    instances._live[1] = live
    return instances, live, actions


def test_a_store_that_refuses_writes_is_tried_again_on_its_timer_not_at_each_change(tmp_path: Path) -> None:
    """The changes of an instance are saved again by the next try, every STORE_RETRY_SECONDS, not at each change
    (each try writes every unsaved document)."""
    store = RefusingStore()
    engine = _engine(tmp_path)

    async def changes() -> None:
        instances = Instances(engine, store)  # type: ignore[arg-type]
        machine, _ = launch(workflow(job("a", task("/bin/a"))))
        live = _live(machine)
        instances._live[1] = live
        for _ in range(100):  # 100 changes, each in a pass of the loop of its own: well within the retry's 2 s
            instances._save(live)
            await asyncio.sleep(0)  # one pass of the loop
        instances.save_all()  # as at a stop: one more try, at once
        for handle in (instances._save_retry, instances._save_handle):
            if handle is not None:
                handle.cancel()

    asyncio.run(changes())
    assert store.tries == 2  # the first change's, then the stop's


def test_a_task_jobd_cannot_submit_because_it_stops_stays_queued_for_the_next_start(tmp_path: Path) -> None:
    """It was ended as failed ("jobd could not submit the task") though it never ran; it stays QUEUED without a
    job, and a restored document resubmits it."""

    def submit(*args: Any) -> Any:
        raise ShuttingDown("jobd is stopping")

    async def start() -> Instance:
        instances, live, actions = _one_task_instance(tmp_path, submit)
        instances._apply(live, actions)
        if instances._save_handle is not None:
            instances._save_handle.cancel()
        return live.machine

    machine = asyncio.run(start())
    [task_] = machine.root.iter("task")
    assert (task_.get("status"), task_.get("tid"), task_.get("error")) == (NodeStatus.QUEUED, None, None)
    _, pending = Instance.restore(machine.to_xml(), queues={"default"})
    assert [(task.status, task.tid) for task in pending] == [(NodeStatus.QUEUED, None)]


def test_an_instance_ended_by_an_error_in_jobd_says_so_in_its_document_too(tmp_path: Path) -> None:
    """Its summary said TERMINATED with one more error, while its document (instance.get's xml, evQueue's `instance
    query`) still said EXECUTING, without an end_time."""

    def submit(*args: Any) -> Any:
        raise RuntimeError("a bug in jobd")

    async def start() -> bytes:
        instances, live, actions = _one_task_instance(tmp_path, submit)
        instances._supervised(1, lambda _: instances._apply(live, actions))
        for handle in (instances._save_retry, instances._save_handle):
            if handle is not None:
                handle.cancel()
        summary, document = instances._ended_unsaved[1]
        assert (summary.status, summary.errors) == ("TERMINATED", 1)
        return document

    root = etree.fromstring(asyncio.run(start()))
    assert (root.get("status"), root.get("errors")) == ("TERMINATED", "1")
    assert root.get("end_time")


# In a process of its own, as it lowers its limit on open files until it has no descriptor left.
SCRIPTS_RETRY_AT_CLOSE = """
import asyncio, os, resource, sys
from types import SimpleNamespace
from jobd.engine.instances import Instances

scripts = os.path.join(sys.argv[1], "scripts")
os.makedirs(scripts)
open(os.path.join(scripts, "1-3"), "w").close()


async def main():
    engine = SimpleNamespace(scripts_dir=scripts, loop=asyncio.get_running_loop())
    instances = Instances(engine, SimpleNamespace())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 1, hard))
    held = []
    try:
        while True:  # every number below the limit taken
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as error:
        print("short:", error.strerror)
    instances._remove_scripts(1)  # instance 1 ended: its scripts directory cannot be listed now
    print("retry armed:", instances._scripts_retry is not None)
    instances.close()
    print("retry cancelled at close:", instances._scripts_retry.cancelled())
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print("left for the next start:", os.listdir(scripts))


asyncio.run(main())
"""


def test_the_retry_of_a_scripts_removal_is_cancelled_when_the_instances_close(tmp_path: Path) -> None:
    """An instance's end that cannot list state_dir/scripts for want of a descriptor tries again a second later;
    that timer outlived Instances.close() (the store's close, at a stop). The next start removes what is left
    (tests/test_workflows.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPTS_RETRY_AT_CLOSE, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "short: Too many open files",
        "retry armed: True",
        "retry cancelled at close: True",
        "left for the next start: ['1-3']",
    ], result.stdout + result.stderr
    assert "cannot remove the scripts of instance 1 now: Too many open files" in result.stderr
