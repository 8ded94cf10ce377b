"""jobd.proc against the real kernel: what a spawned child is recorded as."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import REPO

from jobd import proc

# Run in a process of its own: proc.reserve_progress_fd() takes over fd 3, which pytest may be using.
SPAWN_SOME = """
import asyncio, sys
from jobd import proc

async def main():
    loop = asyncio.get_running_loop()
    for number in range(50):
        ended = loop.create_future()
        spec = proc.LaunchSpec(
            argv=["/bin/sleep", "0.01"], env={}, cwd=None, stdin=None, max_output=1024,
            stdout_path=f"{sys.argv[1]}/{number}.stdout",
            stderr_path=f"{sys.argv[1]}/{number}.stderr",
            log_path=f"{sys.argv[1]}/{number}.log",
        )
        child = proc.Child.spawn(
            spec, loop, on_exit=ended.set_result, on_progress=print, on_log=print, on_output=lambda: None
        )
        print(child.start_time, proc.process_start_time(child.pid))  # not reaped yet: /proc still shows it
        await ended

proc.reserve_progress_fd()
asyncio.run(main())
"""


def test_recorded_start_time_is_the_one_proc_shows(tmp_path: Path) -> None:
    # Crash recovery tells a job's process from a later one with the same pid by this value: the start time the
    # spawn works out from the clock must be /proc/PID/stat's, at every spawn (not only the first, checked one).
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", SPAWN_SOME, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    pairs = [line.split() for line in result.stdout.splitlines()]
    assert len(pairs) == 50
    assert all(recorded == shown != "None" for recorded, shown in pairs), pairs


HAS_ENDED = """
import asyncio, os, sys
from jobd import proc

async def main():
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    spec = proc.LaunchSpec(
        argv=["/bin/sh", "-c", "read line; exit 0"], env={}, cwd=None, stdin=b"go\\n", max_output=1024,
        stdout_path=f"{sys.argv[1]}/out", stderr_path=f"{sys.argv[1]}/err", log_path=f"{sys.argv[1]}/log",
    )
    child = proc.Child.spawn(spec, loop, on_exit=ended.set_result, on_progress=print, on_log=print, on_output=print)
    # Blocks the loop until the leader has exited, without reaping it: its exit then waits on the loop, as when
    # jobd comes to stop a job whose exit it has not handled yet.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    print("ended before the loop saw it:", child.has_ended())
    info = await ended
    print("exit:", info.exit_code, info.signal, "ended after:", child.has_ended())

proc.reserve_progress_fd()
asyncio.run(main())
"""

STILL_RUNNING = """
import asyncio, sys
from jobd import proc

async def main():
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    spec = proc.LaunchSpec(
        argv=["/bin/sleep", "30"], env={}, cwd=None, stdin=None, max_output=1024,
        stdout_path=f"{sys.argv[1]}/out", stderr_path=f"{sys.argv[1]}/err", log_path=f"{sys.argv[1]}/log",
    )
    child = proc.Child.spawn(spec, loop, on_exit=ended.set_result, on_progress=print, on_log=print, on_output=print)
    print("running:", not child.has_ended())
    child.stop(5)
    info = await ended
    print("exit:", info.exit_code, info.signal)

proc.reserve_progress_fd()
asyncio.run(main())
"""


def test_a_leader_that_has_exited_is_seen_as_ended_before_its_exit_is_handled(tmp_path: Path) -> None:
    """What the engine asks before it stops a job (a cancel, a time limit, a shutdown): a leader that exited on its
    own, its exit still waiting on the loop, is left to its own exit status."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", HAS_ENDED, str(tmp_path)]
    result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ended before the loop saw it: True", "exit: 0 None ended after: True"]
    run = [sys.executable, "-c", STILL_RUNNING, str(tmp_path)]
    result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["running: True", "exit: None 15"]


def test_an_output_file_whose_disk_fills_during_a_write_names_the_kernels_cause(tmp_path: Path) -> None:
    """A write the disk could take only part of returned short, and the file's error (and jobd's log line) read
    `short write (no space left on device?)`: test_workflows' full-disk test, looking for the kernel's "No space left
    on device", failed whenever the job's last chunk straddled the end of the disk instead of meeting a full one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        output = proc._LazyFile(str(mount / "1.stdout"))
        written = output.write(b"x" * (256 * 1024))  # straddles the end of the 64 KiB disk
        assert 0 < written < 256 * 1024, written
        assert output.error == f"cannot write {mount / '1.stdout'}: No space left on device", output.error
        assert output.write(b"more") == 0  # the file takes nothing more
        output.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
