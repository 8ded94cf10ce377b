"""When jobd/engine/instances.py saves instance documents, run in-process on an event loop with a store that
refuses writes as a full disk makes SQLite refuse them: the changes of an instance are saved again by the next try,
every STORE_RETRY_SECONDS, not at each change (each try writes every unsaved document)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from test_workflow_engine import NOW, job, launch, task, workflow

from jobd.engine.instances import Instances, _Live
from jobd.model import InstanceSummary


class RefusingStore:
    """Refuses every save as SQLite refuses a write on a full disk; counts the tries."""

    def __init__(self) -> None:
        self.tries = 0

    def save_instance(self, *args: Any, **kwargs: Any) -> None:
        self.tries += 1
        raise sqlite3.OperationalError("database or disk is full")


def test_a_store_that_refuses_writes_is_tried_again_on_its_timer_not_at_each_change(tmp_path: Path) -> None:
    store = RefusingStore()
    engine: Any = SimpleNamespace(config=SimpleNamespace(daemon=SimpleNamespace(state_dir=str(tmp_path))))

    async def changes() -> None:
        instances = Instances(engine, store)  # type: ignore[arg-type]
        machine, _ = launch(workflow(job("a", task("/bin/a"))))
        live = _Live(InstanceSummary(id=1, workflow="wf", status="EXECUTING", errors=0, started_at=NOW), machine)
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
