"""README.md's five-minute tour, run as written: a real jobd on examples/dev/ started the way `make run` starts it
(from the checkout's root, socket and state under ./.jobd/), and every line of the tour's `sh` blocks run by a
shell (`sh -e`: each command of a line such as `jobctl submit flaky --wait; jobctl status 7` must succeed), in order,
after the tour's own `export` lines. Where a line's comment says `-> TEXT`, it must print TEXT: the job and instance
ids the tour names follow from the commands before them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Notifications

pytestmark = pytest.mark.timeout(180)

DEADLINE = 60.0


def tour() -> tuple[list[str], list[tuple[str, str]]]:
    """The tour's `export` lines, and its other commands with their comments, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    exports: list[str] = []
    commands: list[tuple[str, str]] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.splitlines():
            parts = re.fullmatch(r"(.*?)(?:\s+#\s+(.*))?", line.strip())
            assert parts is not None
            command, comment = parts[1], parts[2] or ""
            if not command or command == "make run":  # the daemon is started below as `make run` starts it
                continue
            if command.startswith("export "):
                exports.append(command)
            else:
                commands.append((command, comment))
    return exports, commands


def promised(comment: str) -> str | None:
    """What a comment says the command prints: `-> "job 1 queued in default", then it runs` promises the quoted
    text; `-> copied the database to X (31KiB)` the text before a parenthesis or a comma (sizes vary)."""
    if "->" not in comment:
        return None
    said = comment.split("->", 1)[1].strip()
    if said.startswith('"'):
        return said[1:].split('"', 1)[0]
    return re.split(r" \(|,", said, maxsplit=1)[0].strip()


def test_the_tour_parses_into_commands() -> None:
    exports, commands = tour()
    assert any("JOBD_SOCKET" in line for line in exports), exports
    assert len(commands) > 20 and all(command.startswith("jobctl ") for command, _ in commands), commands
    assert promised('a configured task -> "job 1 queued in default", then it runs') == "job 1 queued in default"
    assert promised("-> copied the database to .jobd/state/backup/jobd.sqlite3 (31KiB)") == (
        "copied the database to .jobd/state/backup/jobd.sqlite3"
    )


def test_the_tour_runs_as_written(make_daemon: Any, tmp_path: Path) -> None:
    daemon = make_daemon(start=False)
    checkout = daemon.root  # jobd's working directory: examples/dev's relative paths start there, as in `make run`
    shutil.copytree(REPO / "examples" / "dev", daemon.config_dir, dirs_exist_ok=True)
    (checkout / ".jobd").mkdir()  # as `make run` makes it
    daemon.socket_path = checkout / ".jobd" / "jobd.sock"
    daemon.evqueue_socket = checkout / ".jobd" / "evqueue.sock"
    daemon.start()

    # `jobctl` on the PATH before the tour's own `export PATH=$PWD/.venv/bin:$PATH`, which keeps it: this checkout's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "jobctl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m jobd.jobctl "$@"\n')
    (bin_dir / "jobctl").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("JOBD_SOCKET", "COLUMNS")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(REPO), PWD=str(checkout))

    exports, commands = tour()
    prelude = "; ".join(exports)
    for command, comment in commands:
        done = subprocess.run(
            ["sh", "-ec", f"{prelude}; {command}"],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{said}"
        expected = promised(comment)
        assert expected is None or expected in said, f"{command}: the tour says {expected!r}; it printed:\n{said}"


def test_make_run_starts_jobd_on_the_dev_config_and_prints_the_socket_to_use(tmp_path: Path) -> None:
    """`make run`'s own recipe, run by make: jobd in the foreground on examples/dev/ with its socket and state under
    ./.jobd/, and the `export JOBD_SOCKET=...` line it prints names the socket that jobd listens on (the tour above
    starts jobd as the recipe does; this checks the recipe). It runs in a copy of the Makefile and examples/dev/,
    with this checkout's virtual environment as VENV: `-o` keeps make from installing it again."""
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "examples" / "dev", checkout / "examples" / "dev")
    shutil.copy(REPO / "Makefile", checkout / "Makefile")
    venv = Path(sys.prefix)
    assert (venv / "bin" / "jobd").exists(), f"the suite runs outside the checkout's virtual environment: {venv}"
    notify = Notifications(tmp_path / "notify")
    printed = tmp_path / "printed"
    env = {k: v for k, v in os.environ.items() if k not in ("JOBD_SOCKET", "MAKEFLAGS", "MAKELEVEL")}
    env["NOTIFY_SOCKET"] = str(notify.path)
    with open(printed, "wb") as out:
        make = subprocess.Popen(
            ["make", "-s", "-o", f"{venv}/.installed", "run", f"VENV={venv}"],
            cwd=checkout,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    pidfd = os.pidfd_open(make.pid)
    try:
        notify.wait_for("READY=1", sender=pidfd)
        exported = re.search(r"export JOBD_SOCKET=(\S+);", printed.read_text())
        assert exported is not None, printed.read_text()
        assert exported[1] == str(checkout / ".jobd" / "jobd.sock")
        status = subprocess.run(
            [sys.executable, "-m", "jobd.jobctl", "--json", "status"],
            env={**env, "JOBD_SOCKET": exported[1], "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert status.returncode == 0, status.stderr
        answered = json.loads(status.stdout)
        assert answered["config_files"][0] == "examples/dev/jobd.toml"  # as the recipe names it, from the checkout
        assert (checkout / ".jobd" / "state" / "jobd.sqlite3").exists()
        os.kill(answered["pid"], signal.SIGTERM)  # jobd itself: the recipe's shell exec'd it, make waits for it
        assert make.wait(DEADLINE) == 0, printed.read_text()
    finally:
        if make.poll() is None:  # a failed check: end make and the jobd it runs, in the group they share
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
        os.close(pidfd)
        notify.close()
