"""The engine's bookkeeping of writes that fail for a bug of jobd's, in-process: what it keeps in memory per job is
not visible from a daemon. A real Engine over a real Store on a real SQLite file, whose every job's end a trigger
fails ("malformed JSON", an SQLITE_ERROR: jobd's bug, not the disk's) while a job waits in the paused queue `bug`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import REPO

# In a process of its own: proc.reserve_progress_fd() takes over fd 3, which pytest may be using.
BUG_ON_EVERY_END = """
import asyncio, logging, os, sqlite3, sys
from jobd import proc
from jobd.config import load_dir
from jobd.engine.core import Engine
from jobd.model import JobSpec
from jobd.store import Store

root = sys.argv[1]
jobs = 20
os.makedirs(f"{root}/etc")
os.makedirs(f"{root}/state/output")
with open(f"{root}/etc/jobd.toml", "w") as config:
    config.write(f'[daemon]\\nstate_dir = "{root}/state"\\nsocket = "{root}/jobd.sock"\\n')
    config.write(f"[queue.q]\\nconcurrency = {jobs}\\n[queue.bug]\\npaused = true\\n")
path = f"{root}/state/jobd.sqlite3"
store = Store(path)
store.open()
store.close()
database = sqlite3.connect(path)
database.execute(
    'CREATE TRIGGER "fails_ends_while_bug" AFTER UPDATE OF "finished_at" ON "job" WHEN NEW."finished_at" IS NOT '
    \"\"\"NULL AND EXISTS (SELECT 1 FROM "job" WHERE "queue" = 'bug' AND "state" = 'queued') \"\"\"
    "BEGIN SELECT json(NEW.state || '{'); END"
)
database.commit()
database.close()


async def main():
    store = Store(path)
    store.open()
    engine = Engine(load_dir(f"{root}/etc"), store)
    engine.recover()
    engine.start_jobs()
    all_failing = asyncio.get_running_loop().create_future()

    def counted():
        failing = engine.store_internal_error(naming_what=True)
        if failing is not None and failing["writes"] == jobs and not all_failing.done():
            all_failing.set_result(None)

    engine.on_counts_changed = counted
    [(bug, _)] = engine.submit([JobSpec(command=("/bin/true",), queue="bug")], [0])
    ids = [job.id for job, _ in engine.submit([JobSpec(command=("/bin/true",), queue="q")] * jobs, [0] * jobs)]
    await asyncio.wait_for(all_failing, 30)
    print("failing:", engine.store_internal_error(naming_what=False))
    print("kept to log once:", len(engine._bugs_told))
    engine.cancel_waiting(bug.id)  # the bug mended: the next tries go through
    print("ended:", sorted({str((await engine.wait(job_id, 30)).state) for job_id in ids}))
    print("failing:", engine.store_internal_error(naming_what=False))
    print("kept to log once:", len(engine._bugs_told))
    await engine.shutdown()
    store.close()


proc.reserve_progress_fd()
logging.basicConfig(level=logging.ERROR, format="%(message)s")
asyncio.run(main())
"""


def test_a_bug_that_fails_every_jobs_end_is_kept_once_not_once_per_job(tmp_path: Path) -> None:
    """20 jobs whose ends fail for the same bug: one entry kept to log it once (there was one per job, for good),
    counted as 20 writes failing while they do, and nothing kept once they go through."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", BUG_ON_EVERY_END, str(tmp_path / "jobd")]
    result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "failing: {'writes': 20, 'error': 'OperationalError: malformed JSON'}",
        "kept to log once: 1",
        "ended: ['succeeded']",
        "failing: None",
        "kept to log once: 0",
    ], result.stdout + result.stderr
    assert result.stderr.count("internal error: cannot record the end of job") == 1, result.stderr
