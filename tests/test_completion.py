"""completion/jobctl in a real bash with bash-completion loaded: commands, options, and names from a real jobd.

Each case sources /usr/share/bash-completion/bash_completion and the script, sets COMP_WORDS, COMP_CWORD,
COMP_LINE and COMP_POINT as bash does for a line whose cursor is at its end, calls _jobctl and reads COMPREPLY.
The option tables of the script are checked against jobctl's argparse parser, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jobd import jobctl
from jobd.model import JobState

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "completion" / "jobctl"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
JOBCTL = Path(sys.executable).parent / "jobctl"  # the venv's entry point, as a user's PATH would find it

DRIVER = """
source /usr/share/bash-completion/bash_completion || exit 90
source "$SCRIPT" || exit 91
# compopt works only while readline runs a completion; called here directly it would fail. What bash-completion
# asks of it (nospace, filenames) changes how readline inserts a match, not which matches there are.
compopt() { :; }
COMP_LINE=$LINE
COMP_POINT=${#LINE}
COMP_WORDS=("$@")
COMP_CWORD=$(($# - 1))
_jobctl "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
# The completion's state stays in its function: nothing is left behind in the user's shell.
for name in _jobctl_program _jobctl_socket _jobctl_env_socket command positionals; do
    [[ -v $name ]] && echo "left behind: $name" >&2
done
printf '%s\\n' "${COMPREPLY[@]}"
"""

CONFIG = """
[queue.default]
concurrency = 4

[queue.photo]
concurrency = 2

[task.hello]
command = ["/bin/echo", "hello"]

[task.resize]
command = ["/bin/true"]
queue = "photo"
parameters = "env"

[task.nap]
command = ["/bin/sleep", "60"]

[schedule.nightly]
task = "hello"
calendar = "0 30 2 * * *"
"""

WORKFLOW = b"""<workflow>
  <subjobs><job name="one"><tasks><task name="t" path="/bin/true" queue="default"/></tasks></job></subjobs>
</workflow>
"""


def bash_words(line: str) -> list[str]:
    """COMP_WORDS for `line` (no quotes in these lines), as bash makes them: blanks separate words, `=` (one of
    COMP_WORDBREAKS) is a word of its own; a line ending in a blank has an empty word under the cursor."""
    words: list[str] = []
    for token in line.split(" "):
        words += [piece for piece in re.split(r"(=)", token) if piece] or [""]
    return words


def complete(line: str, env: dict[str, str] | None = None) -> list[str]:
    """What the completion offers for `line`, the cursor at its end. Anything on stderr fails the test."""
    if not BASH_COMPLETION.exists():
        pytest.fail("bash-completion is not installed: `make test` installs it (Debian package bash-completion)")
    words = bash_words(line)
    base = {"PATH": f"{JOBCTL.parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", DRIVER, "bash", *words],
        env={**base, **(env or {}), "SCRIPT": str(SCRIPT), "LINE": line},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, (line, done.returncode, done.stderr)
    assert done.stderr == "", (line, done.stderr)
    return [item for item in done.stdout.split("\n") if item]


def test_bash_words_splits_like_bash() -> None:
    assert bash_words("jobctl ") == ["jobctl", ""]
    assert bash_words("jobctl --socket=/x sub") == ["jobctl", "--socket", "=", "/x", "sub"]
    assert bash_words("jobctl --socket=") == ["jobctl", "--socket", "="]


# -- the parser, walked -----------------------------------------------------------------------------------------


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = jobctl.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(options that take a value, options that do not)."""
    values: set[str] = set()
    flags: set[str] = set()
    for action in parser._actions:
        (flags if action.nargs == 0 else values).update(action.option_strings)
    return values, flags


COMMANDS = subparsers()


def test_every_command_is_offered() -> None:
    assert set(complete("jobctl ")) == set(COMMANDS)
    assert set(complete("jobctl --json ")) == set(COMMANDS)
    assert sorted(complete("jobctl sc")) == ["schedule", "schedules"]
    assert "tasks" in COMMANDS  # the command the completion asks for task names


def test_global_options_are_offered() -> None:
    values, flags = options(jobctl.build_parser())
    assert set(complete("jobctl -")) == values | flags


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_a_command_is_offered(command: str) -> None:
    values, flags = options(COMMANDS[command])
    assert set(complete(f"jobctl {command} -")) == values | flags


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_option_tables_match_the_parser(command: str) -> None:
    """Which options take a value decides which words the completion skips: it must be argparse's answer."""
    dump = (
        f'source "{SCRIPT}"; echo "$_jobctl_common_values ${{_jobctl_value_options[{command}]-}}"; '
        f'echo "$_jobctl_common_flags ${{_jobctl_flag_options[{command}]-}}"'
    )
    done = subprocess.run(["bash", "--norc", "-c", dump], capture_output=True, text=True, timeout=30, check=True)
    values_line, flags_line = done.stdout.splitlines()
    assert (set(values_line.split()), set(flags_line.split())) == options(COMMANDS[command])


def choice_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            if action.choices is None:
                continue
            if action.option_strings:
                cases += [(f"jobctl {name} {option} ", list(action.choices)) for option in action.option_strings]
            else:
                cases.append((f"jobctl {name} ", list(action.choices)))
    return cases


@pytest.mark.parametrize(("line", "choices"), choice_cases())
def test_fixed_choices_are_offered(line: str, choices: list[str]) -> None:
    assert sorted(complete(line)) == sorted(choices)


def test_state_choices_are_the_job_states() -> None:
    assert sorted(complete("jobctl ls --state ")) == sorted(str(state) for state in JobState)


def test_option_values_are_skipped_when_finding_the_command() -> None:
    assert complete("jobctl --socket /nowhere/x.sock stat") == ["status"]
    assert "--param" in complete("jobctl submit -p 5 --pa")
    assert "--stderr" in complete("jobctl log --attempt 2 --st")


def test_file_options_complete_paths(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("x")
    (tmp_path / "subdir").mkdir()
    assert complete(f"jobctl submit --stdin-file {tmp_path}/in") == [f"{tmp_path}/input.txt"]
    assert complete(f"jobctl run --cwd {tmp_path}/") == [f"{tmp_path}/subdir"]


def test_run_completes_the_command_line_after_the_double_dash() -> None:
    assert "echo" in complete("jobctl run -- ech")
    assert "echo" in complete("jobctl run --env=A=b --queue default ech")
    assert "--" not in complete("jobctl run -- echo -")  # echo's own line, not jobctl's options


# -- names from the daemon -------------------------------------------------------------------------------------


@pytest.fixture
def named_daemon(make_daemon: Any) -> Any:
    if not JOBCTL.exists():
        pytest.fail(f"{JOBCTL} is missing: `make .venv/.installed` installs jobd's entry points")
    daemon = make_daemon(CONFIG, start=False)
    daemon.write_workflows(thumbnails=WORKFLOW)
    daemon.start()
    return daemon


def test_names_are_asked_from_the_daemon(named_daemon: Any) -> None:
    socket = named_daemon.socket_path
    assert complete(f"jobctl --socket {socket} submit ") == ["hello", "nap", "resize"]
    assert complete(f"jobctl --socket {socket} submit --queue photo r") == ["resize"]
    assert complete(f"jobctl submit --socket {socket} --queue ") == ["default", "photo"]
    assert complete(f"jobctl --socket={socket} pause ") == ["default", "photo"]
    assert complete(f"jobctl resume --socket={socket} p") == ["photo"]
    assert complete(f"jobctl --socket {socket} ls --task ") == ["hello", "nap", "resize"]
    assert complete(f"jobctl --socket {socket} ls --queue=d") == ["default"]
    assert complete(f"jobctl --socket {socket} launch ") == ["thumbnails"]
    assert complete(f"jobctl --socket {socket} instances --workflow t") == ["thumbnails"]
    assert complete(f"jobctl --socket {socket} schedule trigger ") == ["nightly"]


def test_job_and_instance_ids_are_asked_from_the_daemon(named_daemon: Any) -> None:
    socket = named_daemon.socket_path
    ended = named_daemon.submit(task="hello")
    named_daemon.wait(ended["id"])
    napping = named_daemon.submit(task="nap")
    instance = named_daemon.call("instance.launch", {"workflow": "thumbnails"})
    ended_instance = named_daemon.call("instance.wait", {"id": instance["id"], "timeout": 30}, timeout=40)
    assert ended_instance["status"] == "TERMINATED"
    instance_job = named_daemon.call("job.list", {"context": f"instance:{instance['id']}"})["jobs"][0]["id"]
    try:
        # cancel and wait: the jobs that have not ended; log and status: the latest ones.
        assert complete(f"jobctl --socket {socket} cancel ") == [str(napping["id"])]
        assert complete(f"jobctl --socket {socket} wait ") == [str(napping["id"])]
        latest = [str(napping["id"]), str(instance_job), str(ended["id"])]
        assert sorted(complete(f"jobctl --socket {socket} log ")) == sorted(latest)
        assert sorted(complete(f"jobctl --socket {socket} status ")) == sorted(latest)
        assert complete(f"jobctl --socket {socket} instance ") == [str(instance["id"])]
    finally:
        named_daemon.call("job.cancel", {"id": napping["id"]})


def test_jobd_socket_of_the_shell_is_used(named_daemon: Any) -> None:
    socket = str(named_daemon.socket_path)
    assert complete("jobctl pause ", env={"JOBD_SOCKET": socket}) == ["default", "photo"]
    # --socket wins over JOBD_SOCKET, as in jobctl.
    assert complete(f"jobctl --socket {socket} pause ", env={"JOBD_SOCKET": "/nowhere/x.sock"}) == [
        "default",
        "photo",
    ]
    assert complete("jobctl --socket /nowhere/x.sock pause ", env={"JOBD_SOCKET": socket}) == []


def test_no_daemon_means_no_names_and_no_noise(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    assert complete(f"jobctl --socket {missing} submit ") == []
    assert complete(f"jobctl --socket {missing} pause ph") == []
    assert complete("jobctl launch ", env={"JOBD_SOCKET": str(missing)}) == []
    # A file that is not a socket: jobctl fails to connect, quietly.
    (tmp_path / "plain").write_text("")
    assert complete(f"jobctl --socket {tmp_path / 'plain'} schedule enable ") == []


def test_jobctl_tasks_lists_the_configured_tasks(named_daemon: Any) -> None:
    env = {**os.environ, "JOBD_SOCKET": str(named_daemon.socket_path)}
    done = subprocess.run([str(JOBCTL), "tasks", "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "tasks": [
            {"name": "hello", "queue": "default", "parameters": "args"},
            {"name": "nap", "queue": "default", "parameters": "args"},
            {"name": "resize", "queue": "photo", "parameters": "env"},
        ]
    }
    done = subprocess.run([str(JOBCTL), "tasks"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "NAME    QUEUE    PARAMETERS",
        "hello   default  args",
        "nap     default  args",
        "resize  photo    env",
    ]


def test_completion_in_an_interactive_bash(named_daemon: Any, tmp_path: Path) -> None:
    """Through readline, as a user gets it: `jobctl pau<TAB> p<TAB>` becomes `jobctl pause photo`, which runs."""
    rcfile = tmp_path / "bashrc"
    rcfile.write_text(f"source {BASH_COMPLETION}\nsource {SCRIPT}\nPS1='$ '\n")
    env = {
        "PATH": f"{JOBCTL.parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TERM": "dumb",
        "JOBD_SOCKET": str(named_daemon.socket_path),
    }
    pid, fd = pty.fork()
    if pid == 0:  # the child: an interactive bash on the pty
        os.execve("/bin/bash", ["bash", "--noprofile", "--rcfile", str(rcfile), "-i"], env)
    screen = b""
    try:
        os.write(fd, b"jobctl pau\tp\t\n")
        os.write(fd, b"exit\n")
        while chunk := read_pty(fd):
            screen += chunk
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    text = screen.decode(errors="replace")
    assert "jobctl pause photo" in text, text
    assert "queue photo paused" in text, text
    paused = {queue["name"]: queue["paused"] for queue in named_daemon.call("queue.list")["queues"]}
    assert paused == {"default": False, "photo": True}


def read_pty(fd: int) -> bytes:
    """The next output of the pty; b"" once the shell has exited (EIO on Linux), or after 30 s of silence."""
    ready, _, _ = select.select([fd], [], [], 30)
    if not ready:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
