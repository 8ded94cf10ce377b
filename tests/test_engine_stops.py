"""The engine stopping a job whose leader has just exited on its own, its exit not yet handled by the loop.

A time limit, a cancel or a shutdown can come in the very loop turn in which a job's exit waits on its pidfd. The
job is then left to its own exit status: not `timed_out`, not `cancelled`, not put back to run again. In a real
daemon that moment is a race; here the engine runs in a process of its own whose test code holds the loop while
the leader exits (waitid with WNOWAIT sees the exit without reaping), then asks for the stop before the loop runs
again: the same order of events, every time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import REPO

# In a process of its own: proc.reserve_progress_fd() takes over fd 3, which pytest may be using.
STOPS_AFTER_AN_UNHANDLED_EXIT = """
import asyncio, os, sys
from jobd import proc
from jobd.config import load_dir
from jobd.engine.core import Engine
from jobd.errors import JobFinished
from jobd.model import JobSpec
from jobd.store import Store

root = sys.argv[1]
os.makedirs(f"{root}/etc")
os.makedirs(f"{root}/state/output")
with open(f"{root}/etc/jobd.toml", "w") as config:
    config.write(f'[daemon]\\nstate_dir = "{root}/state"\\nsocket = "{root}/jobd.sock"\\n')
    config.write("[queue.q]\\nconcurrency = 4\\n")


async def started_and_exited(engine, **spec):
    [(job, _)] = engine.submit([JobSpec(command=("/bin/true",), queue="q", **spec)], [0])
    await asyncio.sleep(0)  # the start, after the submit's turn
    pid = engine._running[job.id].child.pid
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited; the loop, held here, has not handled it
    return job.id


async def main():
    store = Store(f"{root}/state/jobd.sqlite3")
    store.open()
    engine = Engine(load_dir(f"{root}/etc"), store)
    engine.recover()
    engine.start_jobs()

    job_id = await started_and_exited(engine, timeout=600)
    engine._time_out(job_id)  # its timer, due in the same turn as the exit
    print("time limit:", (await engine.wait(job_id, 10)).state)

    job_id = await started_and_exited(engine)
    try:
        print("cancel:", (await engine.cancel(job_id)).state)
    except JobFinished as finished:
        print("cancel:", finished.code, finished.details["state"])

    job_id = await started_and_exited(engine)
    await engine.shutdown()
    print("shutdown:", store.get_job(job_id).state, [str(attempt.outcome) for attempt in store.attempts(job_id)])


proc.reserve_progress_fd()
asyncio.run(main())
"""


def test_a_stop_that_comes_with_the_leaders_own_exit_leaves_the_job_to_it(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", STOPS_AFTER_AN_UNHANDLED_EXIT, str(tmp_path / "jobd")]
    result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "time limit: succeeded",  # not timed_out
        "cancel: JOB_FINISHED succeeded",  # not cancelled
        "shutdown: succeeded ['succeeded']",  # not killed and put back to run again at the next start
    ], result.stdout + result.stderr
