"""jobctl, the real command line, run as a subprocess against a real daemon: output, exit codes, options.

Every call is `python -m jobd.jobctl --socket SOCK ...` with stdout and stderr captured (so stderr is not a
terminal and `wait` makes one blocking job.wait call). The tests check jobctl's results against the daemon's own
view through the API.
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Any

import pytest
from inotify_simple import INotify, flags

from jobd.jobctl import OUTPUT_CHUNK

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 30.0
SUBMITTED = re.compile(r"^job (\d+) (delayed|queued|running) in (\S+)")


class Result:
    def __init__(self, process: subprocess.CompletedProcess[bytes]) -> None:
        self.code = process.returncode
        self.stdout = process.stdout
        self.stderr = process.stderr
        self.out = process.stdout.decode(errors="replace")
        self.err = process.stderr.decode(errors="replace")

    def __repr__(self) -> str:
        return f"<jobctl exit {self.code}\nstdout: {self.out!r}\nstderr: {self.err!r}>"


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOBD_SOCKET", "COLUMNS")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def jobctl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobd.jobctl", *args]


def run_jobctl(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"") -> Result:
    process = subprocess.run(
        jobctl_argv(*args), input=stdin, capture_output=True, env=environment(env), timeout=DEADLINE
    )
    result = Result(process)
    assert "Traceback" not in result.err, result
    return result


def ctl(daemon: Any, *args: str, **kwargs: Any) -> Result:
    """jobctl --socket DAEMON'S SOCKET ARGS..."""
    return run_jobctl("--socket", str(daemon.socket_path), *args, **kwargs)


def submitted_id(result: Result) -> int:
    match = SUBMITTED.match(result.out)
    assert match, result
    return int(match.group(1))


def job_count(daemon: Any) -> int:
    return len(daemon.call("job.list", {"limit": 1000})["jobs"])


def read_until(stream: Any, wanted: bytes, timeout: float = DEADLINE) -> bytes:
    """Reads a pipe, or a terminal's master side (a stream or a descriptor), until `wanted` has been seen (select
    with a deadline: blocks, never polls)."""
    deadline = time.monotonic() + timeout
    data = b""
    fd = stream if isinstance(stream, int) else stream.fileno()
    while wanted not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {wanted!r}; got {data!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = read_some(fd)
            assert chunk, f"closed before {wanted!r}; got {data!r}"
            data += chunk
    return data


def read_some(fd: int) -> bytes:
    """One read; b"" at the end, which a terminal whose other side is closed reports as EIO."""
    try:
        return os.read(fd, 65536)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


def read_rest(fd: int) -> bytes:
    """Everything left to read, once the writers have closed their side (the end then comes without a wait)."""
    data = b""
    while chunk := read_some(fd):
        data += chunk
    return data


def on_a_terminal(
    daemon: Any, *args: str, term: str = "xterm", env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """jobctl ARGS... with stderr on a pseudo-terminal of type `term` ($TERM), where it draws its progress bar: the
    process (stdout a pipe) and the terminal's master side, to read and close. `env`: variables added."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            jobctl_argv("--socket", str(daemon.socket_path), *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=environment({"TERM": term, **(env or {})}),
        )
    finally:
        os.close(slave)
    return process, master


def stopped_once_drawn(daemon: Any, process: subprocess.Popen[bytes], master: int, drawn: bytes) -> str:
    """Stops jobd once jobctl has drawn `drawn` on its terminal (it draws after jobd has taken its wait in); what
    the terminal shows by jobctl's exit."""
    try:
        shown = read_until(master, drawn)
        assert daemon.stop() == 0
        process.wait(timeout=DEADLINE)
        shown += read_rest(master)
    finally:
        os.close(master)
    return shown.decode(errors="replace")


# -- run and submit ---------------------------------------------------------------------------------------------


def test_run_prints_the_job_id(daemon: Any) -> None:
    result = ctl(daemon, "run", "--", "/bin/echo", "hi")
    assert result.code == 0, result
    assert result.out.count("\n") == 1, result
    match = SUBMITTED.match(result.out)
    assert match and match.group(3) == "default", result
    job_id = int(match.group(1))
    job = daemon.wait(job_id)
    assert job["command"] == ["/bin/echo", "hi"]
    assert job["state"] == "succeeded"
    assert daemon.output(job_id) == "hi\n"


def test_run_without_separator_and_options_before_the_command(daemon: Any) -> None:
    result = ctl(
        daemon, "run", "-q", "serial", "-p", "7", "--context", "ctx-1", "-e", "X=1", "/bin/sh", "-c", "echo $X"
    )
    assert result.code == 0, result
    job = daemon.wait(submitted_id(result))
    assert job["command"] == ["/bin/sh", "-c", "echo $X"]
    assert (job["queue"], job["priority"], job["context"]) == ("serial", 7, "ctx-1")
    assert daemon.output(job["id"]) == "1\n"


def test_run_json_gives_the_job_object(daemon: Any) -> None:
    for args in (("--json", "run", "--", "/bin/echo", "hi"), ("run", "--json", "--", "/bin/echo", "hi")):
        result = ctl(daemon, *args)
        assert result.code == 0, result
        assert result.out.endswith("\n") and result.out.count("\n") == 1, result
        result.stdout.decode("ascii")  # one line, ASCII
        job = json.loads(result.out)
        assert isinstance(job["id"], int)
        assert job["command"] == ["/bin/echo", "hi"]
        assert job["queue"] == "default"
        assert job["state"] in ("queued", "running", "succeeded")
        assert daemon.wait(job["id"])["state"] == "succeeded"


def test_run_wait_exits_with_the_job_code(daemon: Any) -> None:
    result = ctl(daemon, "run", "--wait", "--", "sh", "-c", "exit 5")
    assert result.code == 5, result
    job_id = submitted_id(result)  # the submit line comes first
    assert f"job {job_id} failed: exit code 5" in result.err, result
    job = daemon.call("job.get", {"id": job_id})
    assert (job["state"], job["exit_code"]) == ("failed", 5)

    result = ctl(daemon, "run", "--wait", "--", "/bin/true")
    assert result.code == 0, result
    assert "succeeded" in result.err


def test_run_with_stdin_file_feeds_the_job(daemon: Any, tmp_path: Path) -> None:
    data = b"binary \xff\xfe\x00 input\n"
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    result = ctl(daemon, "run", "--wait", "--stdin-file", str(source), "--", "/bin/cat")
    assert result.code == 0, result
    assert ctl(daemon, "log", str(submitted_id(result))).stdout == data

    result = ctl(daemon, "run", "--wait", "--stdin-file", "-", "--", "/bin/cat", stdin=b"from jobctl's stdin\n")
    assert result.code == 0, result
    assert daemon.output(submitted_id(result)) == "from jobctl's stdin\n"


def test_a_stdin_file_too_large_for_a_request_is_named_with_its_size(daemon: Any, tmp_path: Path) -> None:
    """jobd can only say that the request line was too long; jobctl says that the input made it so, and how much
    fits."""
    before = job_count(daemon)
    text = tmp_path / "dump.sql"
    text.write_bytes(b"a" * 1_200_000)
    result = ctl(daemon, "run", "--stdin-file", str(text), "--", "/bin/cat")
    assert result.code == 1, result
    assert result.err == (
        "jobctl: FRAME_TOO_LARGE: a request line is larger than 1048576 bytes: "
        f"--stdin-file {text} is 1200000 bytes of text; it must stay below about 1 MiB (750 KiB if binary)\n"
    ), result
    result = ctl(daemon, "submit", "echo", "--stdin-file", "-", stdin=b"\xff" * 800_000)
    assert result.code == 1, result
    assert result.err.endswith(
        ": --stdin-file - (jobctl's standard input) is 800000 bytes of binary input; it must stay below about 750 KiB\n"
    ), result
    as_json = ctl(daemon, "--json", "run", "--stdin-file", str(text), "--", "/bin/cat")
    assert json.loads(as_json.err)["error"]["message"] == "a request line is larger than 1048576 bytes", as_json
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    result = ctl(daemon, "run", "--stdin-file", str(small), "--", "/bin/echo", *["x" * 110_000] * 10)
    assert result.code == 1, result
    assert result.err.endswith(
        f": --stdin-file {small} is only 3 bytes: the command, its arguments or its environment make up the rest of "
        "the request\n"
    ), result
    assert job_count(daemon) == before


def test_submit_a_task_with_args(daemon: Any) -> None:
    result = ctl(daemon, "submit", "echo", "hello", "world")
    assert result.code == 0, result
    job = daemon.wait(submitted_id(result))
    assert job["task"] == "echo"
    assert job["command"] == ["/bin/echo", "hello", "world"]
    assert daemon.output(job["id"]) == "hello world\n"


def test_submit_passes_a_later_double_dash_to_the_task(daemon: Any) -> None:
    # The first `--` ends jobctl's options; those after it are the task's arguments like any other.
    for argv, sent in ((["--", "-n", "-a", "--", "b"], ["-n", "-a", "--", "b"]), (["--", "--"], ["--"])):
        result = ctl(daemon, "submit", "echo", *argv)
        assert result.code == 0, result
        job = daemon.wait(submitted_id(result))
        assert job["command"] == ["/bin/echo", *sent], (argv, job["command"])
    result = ctl(daemon, "run", "--wait", "--", "/bin/echo", "submit", "--", "x")  # `run` is not affected
    assert daemon.output(submitted_id(result)) == "submit -- x\n"


def test_submit_takes_options_between_its_args(daemon: Any) -> None:
    # ARGs keep their order around the options; -5 is a value (argparse's rule), and `--` makes the rest literal.
    result = ctl(daemon, "submit", "echo", "a", "--priority", "7", "b", "-5", "--context", "c-1", "c", "--", "-d")
    assert result.code == 0, result
    job = daemon.wait(submitted_id(result))
    assert job["command"] == ["/bin/echo", "a", "b", "-5", "c", "-d"]
    assert (job["priority"], job["context"]) == (7, "c-1")
    # A word that looks like an option and is none is still refused, and nothing is submitted.
    before = job_count(daemon)
    result = ctl(daemon, "submit", "echo", "a", "-p", "7", "b", "--bogus")
    assert result.code == 2, result
    assert "unrecognized arguments: --bogus (put ARGs that start with - after --)" in result.err
    assert job_count(daemon) == before
    result = ctl(daemon, "status", "1", "2")  # other commands take no extra words
    assert result.code == 2, result
    assert "unrecognized arguments: 2" in result.err


def test_an_option_value_that_starts_with_a_dash_is_the_value(daemon: Any) -> None:
    """`--context "$label"` in a script: the word after an option that takes a value is that value, whatever it
    starts with (argparse refused `-x` with "expected one argument"); `run`'s command and what follows `--` keep
    their words as they are."""
    result = ctl(daemon, "run", "--context", "-x", "--key", "--k", "-q", "serial", "/bin/echo", "--context", "-y")
    assert result.code == 0, result
    job = daemon.wait(submitted_id(result))
    assert (job["context"], job["key"], job["queue"]) == ("-x", "--k", "serial")
    assert job["command"] == ["/bin/echo", "--context", "-y"]
    result = ctl(daemon, "submit", "echo", "a", "--context", "-c", "b", "--", "--context", "-d")
    assert result.code == 0, result
    job = daemon.wait(submitted_id(result))
    assert (job["context"], job["command"]) == ("-c", ["/bin/echo", "a", "b", "--context", "-d"])
    listed = ctl(daemon, "--json", "ls", "--context", "-c")
    assert [j["id"] for j in json.loads(listed.out)["jobs"]] == [job["id"]], listed
    # An option still needs its value, and a value jobd would refuse is still refused for what it is.
    assert "argument --context: expected one argument" in ctl(daemon, "ls", "--context").err
    refused = ctl(daemon, "run", "-p", "-3", "/bin/true")
    assert refused.code == 2, refused
    assert "argument -p/--priority: expected an integer from 0 to 4294967295, got '-3'" in refused.err


def test_submit_an_env_task_with_params(daemon: Any) -> None:
    result = ctl(daemon, "submit", "-P", "A=1", "--param", "B=two words", "envtask")
    assert result.code == 0, result
    job = daemon.wait(submitted_id(result))
    assert daemon.output(job["id"]) == "A=1 B=two words\n"

    result = ctl(daemon, "submit", "envtask", "-P", "A=x=y")  # options may follow TASK; a value may hold '='
    assert result.code == 0, result
    assert daemon.output(daemon.wait(submitted_id(result))["id"]) == "A=x=y B=\n"


def test_submit_args_to_an_env_task_says_to_use_p(daemon: Any) -> None:
    """jobd's refusal names the API's members ('params', 'args'); jobctl adds how to give them on its command line
    (`jobctl submit report PERIOD=monthly` for a parameters = "env" task said only: give 'params', not 'args')."""
    result = ctl(daemon, "submit", "envtask", "A=1")
    assert result.code == 1, result
    assert result.err.startswith(
        "jobctl: INVALID_PARAMS: job.submit: task 'envtask' takes its parameters as environment"
    ), result
    assert result.err.endswith(". With jobctl: jobctl submit -P NAME=VALUE ... envtask\n"), result
    as_json = ctl(daemon, "--json", "submit", "envtask", "A=1")  # scripts get jobd's error as it came
    assert as_json.code == 1 and "With jobctl" not in as_json.err, as_json
    assert json.loads(as_json.err)["error"]["data"]["param"] == "args", as_json


def test_a_time_limit_of_zero_is_a_usage_error(daemon: Any) -> None:
    # jobd refuses a timeout of 0 (no time at all to run); jobctl says so itself, as for any out-of-range value.
    before = job_count(daemon)
    result = ctl(daemon, "run", "--timeout", "0", "--", "/bin/true")
    assert result.code == 2, result
    assert "expected a number of seconds above 0" in result.err, result.err
    # Every refused time limit is told the same range: not "from 0", which 0 is refused by.
    for value in ("-1", "1e20", "soon", "nan"):
        result = ctl(daemon, "submit", "echo", "--timeout", value)
        assert result.code == 2, result
        assert f"expected a number of seconds above 0 and up to 3162240000, got '{value}'" in result.err, result
    assert job_count(daemon) == before


def test_log_follow_of_an_attempt_not_started_yet_waits_for_it(daemon: Any) -> None:
    # The second attempt starts a second after the first fails; `log -f --attempt 2` used to fail at once
    # (UNKNOWN_JOB) instead of waiting for it, as it does for a first attempt.
    script = 'if [ "$JOBD_ATTEMPT" = 1 ]; then exit 1; fi; echo second'
    job = daemon.submit(command=["/bin/sh", "-c", script], retry={"times": 1, "delay": 1})
    result = ctl(daemon, "log", "-f", "--attempt", "2", str(job["id"]))
    assert (result.code, result.out) == (0, "second\n"), result


@pytest.mark.parametrize(
    "words",
    [
        ["status", "99999999999999999999"],
        ["ls", "--before", "99999999999999999999"],
        ["run", "--key", "", "--", "true"],
        ["run", "-e", "A B=1", "--", "true"],
        ["run", "-e", "1A=1", "--", "true"],
        ["--socket", "", "status"],
        # An empty value, for any option or argument that takes one (DESIGN §2.5: a usage error is exit 2).
        ["run", "-q", "", "--", "true"],
        ["run", "--context", "", "--", "true"],
        ["run", "--cwd", "", "--", "true"],
        ["run", "--stdin-file", "", "--", "true"],
        ["run", "-e", "=1", "--", "true"],
        ["status", "--socket", ""],
        ["submit", ""],
        ["submit", "-q", "", "echo"],
        ["ls", "--queue", ""],
        ["ls", "--task", ""],
        ["ls", "--context", ""],
        ["pause", ""],
        ["resume", ""],
        ["launch", ""],
        ["launch", "--comment", "", "demo"],
        ["launch", "-p", "=x", "demo"],
        ["instances", "--workflow", ""],
        ["schedule", "enable", ""],
        ["audit", "--user", ""],
        ["audit", "--command", ""],
    ],
)
def test_values_jobd_would_refuse_are_usage_errors(daemon: Any, words: list[str]) -> None:
    before = job_count(daemon)
    result = ctl(daemon, *words)
    assert result.code == 2, result  # said by jobctl before anything is sent, not an INVALID_PARAMS (exit 1)
    assert "error: argument" in result.err and "INVALID_PARAMS" not in result.err, result
    assert job_count(daemon) == before


def test_an_empty_value_is_named_with_what_to_do_instead(daemon: Any) -> None:
    result = ctl(daemon, "run", "-q", "", "--", "true")
    assert "error: argument -q/--queue: expected a non-empty value (leave -q/--queue out for none)" in result.err
    result = ctl(daemon, "pause", "")
    assert "error: argument QUEUE: expected a non-empty value" in result.err, result


def test_an_empty_environment_variable_is_refused_as_an_empty_option_is(daemon: Any) -> None:
    """JOBD_SOCKET="" is how a script's `JOBD_SOCKET=$SOCK jobctl ...` reads with SOCK unset: taken for the default
    socket, it talked to the system's jobd instead of the one meant. Refused like `--socket ""` (exit 2, before
    anything is sent), as is an empty JOBCTL_REPLY_TIMEOUT; a --socket given makes JOBD_SOCKET irrelevant."""
    result = run_jobctl("status", env={"JOBD_SOCKET": ""})
    assert (result.code, result.out) == (2, ""), result
    assert result.err == (
        "jobctl: JOBD_SOCKET is set but empty: expected the path of jobd's API socket "
        "(unset it for the default, /run/jobd/jobd.sock)\n"
    )
    result = run_jobctl("--socket", "", "status")
    assert result.code == 2 and "argument --socket: expected a non-empty value" in result.err, result
    result = ctl(daemon, "status", env={"JOBD_SOCKET": ""})
    assert result.code == 0, result
    for empty in ("", " "):
        result = ctl(daemon, "status", env={"JOBCTL_REPLY_TIMEOUT": empty})
        assert (result.code, result.out) == (2, ""), result
        assert result.err == (
            "jobctl: JOBCTL_REPLY_TIMEOUT is set but empty: expected seconds from 0 (no limit) to 3162240000 "
            "(unset it for the default, 60)\n"
        )


def test_empty_values_where_they_mean_something_are_kept(daemon: Any) -> None:
    """An environment variable or a workflow parameter may be set to "", and a command's word may be "": only a
    value that names or selects something must not be empty."""
    result = ctl(
        daemon, "run", "--wait", "-e", "EMPTY=", "--", "/bin/sh", "-c", 'printf "[%s][%s]" "$EMPTY" "$1"', "sh", ""
    )
    assert result.code == 0, result
    assert daemon.output(submitted_id(result)) == "[][]"


def test_an_empty_program_is_a_usage_error(daemon: Any) -> None:
    before = job_count(daemon)
    result = ctl(daemon, "run", "--", "", "x")
    assert result.code == 2, result
    assert "the program (the first word of CMD) is empty" in result.err and "INVALID_PARAMS" not in result.err
    assert job_count(daemon) == before


def test_submit_args_and_params_together_is_a_usage_error(daemon: Any) -> None:
    before = job_count(daemon)
    result = ctl(daemon, "submit", "echo", "x", "-P", "A=1")
    assert result.code == 2, result
    assert result.out == ""
    assert result.err.startswith("jobctl: "), result
    assert job_count(daemon) == before


def test_submit_an_unknown_task_is_a_daemon_error(daemon: Any) -> None:
    result = ctl(daemon, "submit", "nope")
    assert result.code == 1, result
    assert result.err.startswith("jobctl: UNKNOWN_TASK: "), result
    assert "nope" in result.err


# -- wait -------------------------------------------------------------------------------------------------------


def test_wait_exits_with_the_job_exit_code(daemon: Any) -> None:
    for code in (0, 3, 77, 255):
        job = daemon.submit(command=["/bin/sh", "-c", f"exit {code}"])
        result = ctl(daemon, "wait", str(job["id"]))
        assert result.code == code, result
        expected = f"job {job['id']} succeeded" if code == 0 else f"job {job['id']} failed: exit code {code}"
        assert expected in result.err, result
        assert result.out == ""


def test_wait_on_a_terminal_draws_a_bar_and_exits_with_the_job_code(daemon: Any, tmp_path: Path) -> None:
    # Two gates the job reads, which the test writes into: its progress comes once jobctl follows it, and its end
    # once the bar has shown that progress.
    gates = [tmp_path / "progress", tmp_path / "end"]
    for gate in gates:
        os.mkfifo(gate)
    script = f'read a < "{gates[0]}"; echo %40 >&3; echo "half way" >&3; read b < "{gates[1]}"; exit 3'
    job_id = daemon.submit(command=["/bin/sh", "-c", script])["id"]
    process, master = on_a_terminal(daemon, "wait", str(job_id))
    try:
        shown = read_until(master, b"0% running")
        for gate, seen in zip(gates, (b"40% running  half way", None), strict=True):
            with open(gate, "w") as writer:
                writer.write("go\n")
            if seen:
                shown += read_until(master, seen)
        out, _ = process.communicate(timeout=DEADLINE)
        shown += read_rest(master)
    finally:
        os.close(master)
    text = shown.decode(errors="replace")
    assert process.returncode == 3, text
    assert f"\rjob {job_id} [" in text and "  40% running  half way" in text, text
    assert f"job {job_id} failed: exit code 3" in text, text
    assert out == b"" and "Traceback" not in text


def test_wait_on_a_dumb_terminal_prints_plain_lines_as_progress_changes(daemon: Any, tmp_path: Path) -> None:
    """TERM=dumb: a terminal that cannot erase a line gets no carriage return and no escape, but a plain line each
    time the progress or the state changes; a log line, which changes neither, prints nothing (docs/jobctl.md)."""
    gate = tmp_path / "progress"
    os.mkfifo(gate)
    script = f'read a < "{gate}"; echo %40 >&3; echo "half way" >&3; echo "three quarters" >&3; exit 3'
    job_id = daemon.submit(command=["/bin/sh", "-c", script])["id"]
    process, master = on_a_terminal(daemon, "wait", str(job_id), term="dumb")
    try:
        shown = read_until(master, b"0% running\r\n")  # the pty's line discipline turns each \n into \r\n
        with open(gate, "w") as writer:
            writer.write("go\n")
        out, _ = process.communicate(timeout=DEADLINE)
        shown += read_rest(master)
    finally:
        os.close(master)
    text = shown.decode(errors="replace").replace("\r\n", "\n")
    assert process.returncode == 3, text
    assert "\r" not in text and "\x1b" not in text, text
    lines = text.splitlines()
    bar = [line for line in lines if line.startswith(f"job {job_id} [")]
    assert f"job {job_id} [--------------------]   0% running" in bar, text
    assert f"job {job_id} [########------------]  40% running" in bar, text
    assert all(earlier != later for earlier, later in itertools.pairwise(bar)), text  # printed only when it changed
    assert "half way" not in text and "three quarters" not in text, text
    assert lines[-1] == f"job {job_id} failed: exit code 3", text
    assert out == b""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_wait_ended_by_a_signal_leaves_the_job_alone(daemon: Any, signum: int, code: int) -> None:
    """Ctrl-C ends `jobctl wait` with 130; SIGTERM (`timeout(1)`, `systemctl stop`) ends it as it ends any program:
    killed by the signal. Both take the bar away (after a SIGTERM it was left where the shell then wrote its prompt),
    neither prints a traceback, and the job runs on (the man page's EXIT STATUS)."""
    job_id = daemon.submit(command=["sleep", "infinity"])["id"]  # until the test cancels it
    process, master = on_a_terminal(daemon, "wait", str(job_id))
    try:
        shown = read_until(master, b"0% running")  # drawn once jobd has taken the wait in
        process.send_signal(signum)
        process.communicate(timeout=DEADLINE)
        shown += read_rest(master)
    finally:
        os.close(master)
    assert process.returncode == code, shown
    assert b"Traceback" not in shown, shown
    assert shown.endswith(b"\r\x1b[K"), shown  # the bar is taken away
    assert daemon.call("job.get", {"id": job_id})["state"] == "running"
    daemon.call("job.cancel", {"id": job_id})


# The start of the shims that make a SIGINT come as jobctl is about to block in the kernel, the one moment a signal
# interrupts no system call of jobctl's, so that only the signal's handler is left to end what it waits for. On a
# terminal that moment is a matter of luck (a Ctrl-C ignored once in a few hundred tries); these make it certain. The
# signal is taken by a thread of the shim's: the main thread blocks it, so whatever the main thread is doing is not
# interrupted, as it was not in that moment. The thread waits for the main thread to let go of `_go` and then of
# Python's lock, which it keeps (switch interval an hour) until the system call that blocks. `_go.release()` in the
# main thread starts the countdown.
SIGNAL_ONCE_LET_GO = """
import os
import signal
import sys
import threading

sys.setswitchinterval(3600)
_go = threading.Lock()
_go.acquire()


def _interrupt():
    _go.acquire()
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=_interrupt, daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
"""


# jobctl's Python runs this first (its sitecustomize): the SIGINT comes when the wait for jobd's answer is about to
# block in the kernel.
SIGNAL_AS_THE_WAIT_BLOCKS_SHIM = (
    SIGNAL_ONCE_LET_GO
    + """
from jobd import client

_next_event_or_reply = client.Client.next_event_or_reply
_fill = client.Client._fill
_state = {"waiting": False, "sent": False}


def _next_event_or_reply_noted(self, request_id, timeout=None):
    _state["waiting"] = True
    try:
        return _next_event_or_reply(self, request_id, timeout)
    finally:
        _state["waiting"] = False


def _fill_as_the_wait_blocks(self, deadline):
    if _state["waiting"] and not _state["sent"]:
        _state["sent"] = True
        _go.release()
    return _fill(self, deadline)


client.Client.next_event_or_reply = _next_event_or_reply_noted
client.Client._fill = _fill_as_the_wait_blocks
"""
)


def test_ctrl_c_as_the_wait_blocks_ends_it(daemon: Any, tmp_path: Path) -> None:
    """A Ctrl-C that comes after Python last looked for signals and before `jobctl wait` blocks in the kernel, so that
    it interrupts no system call, still ends the wait (130, the bar taken away): Python's signal wake-up pipe is among
    what the wait watches. Without it jobctl waits on until jobd next sends something: for this job, for ever."""
    job_id = daemon.submit(command=["sleep", "infinity"])["id"]  # until the test cancels it
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SIGNAL_AS_THE_WAIT_BLOCKS_SHIM)
    process, master = on_a_terminal(daemon, "wait", str(job_id), env={"PYTHONPATH": f"{shim}:{REPO}"})
    try:
        shown = read_until(master, b"0% running")
        process.communicate(timeout=DEADLINE)
        shown += read_rest(master)
    finally:
        os.close(master)
        process.kill()
        process.wait()
    assert process.returncode == 130, shown
    assert b"Traceback" not in shown, shown
    assert shown.endswith(b"\r\x1b[K"), shown
    assert daemon.call("job.get", {"id": job_id})["state"] == "running"
    daemon.call("job.cancel", {"id": job_id})


# jobctl's Python runs this first: a Ctrl-C comes as soon as the submit has been sent, before its answer is read.
SIGNAL_ONCE_THE_SUBMIT_IS_SENT_SHIM = """
import os
import signal

from jobd import client

_send = client.Client._send


def _send_then_interrupt(self, data, deadline, ids=()):
    _send(self, data, deadline, ids)
    if b'"method":"job.submit"' in data:
        os.kill(os.getpid(), signal.SIGINT)  # to this thread: its handler runs before the next line of Python


client.Client._send = _send_then_interrupt
"""


def test_a_submit_interrupted_once_sent_is_answered_again_by_its_key(daemon: Any, tmp_path: Path) -> None:
    """Ctrl-C after the submit was sent and before its answer came: jobctl exits 130 without a job number, and jobd
    has made the job all the same (it does what it has read whole). Submitting again with the same --key answers
    that job rather than making a second one, as the man page tells (EXIT STATUS, 130)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SIGNAL_ONCE_THE_SUBMIT_IS_SENT_SHIM)
    with daemon.client() as watcher:
        watcher.call("events.subscribe", {"types": ["job.state"]})
        command = ("run", "--key", "report-2026-12", "--", "/bin/true")
        interrupted = ctl(daemon, *command, env={"PYTHONPATH": f"{shim}:{REPO}"})
        assert (interrupted.code, interrupted.out) == (130, ""), interrupted
        made = watcher.next_event(timeout=DEADLINE)["job"]  # its first state: jobd has read the request
    assert made["key"] == "report-2026-12"
    again = ctl(daemon, *command)
    assert again.code == 0 and again.out.startswith(f"job {made['id']} "), again  # as it is now: queued, or done
    # Told apart from a submit that made its job now, which says nothing of the kind.
    assert again.out.endswith(" (already submitted with key 'report-2026-12': not submitted again)\n"), again
    assert job_count(daemon) == 1
    as_json = ctl(daemon, "--json", *command)
    assert as_json.code == 0 and json.loads(as_json.out)["new"] is False and job_count(daemon) == 1, as_json
    fresh = ctl(daemon, "--json", "run", "--key", "report-2027-01", "--", "/bin/true")
    assert json.loads(fresh.out)["new"] is True, fresh
    assert "already submitted" not in ctl(daemon, "run", "--key", "report-2027-02", "--", "/bin/true").out


# The `jobctl` command's Python runs this first: the SIGINT comes as jobctl is about to block reading its standard
# input for --stdin-file -.
SIGNAL_AS_STDIN_IS_READ_SHIM = (
    SIGNAL_ONCE_LET_GO
    + """
from jobd import jobctl

_read_stdin_file = jobctl.read_stdin_file


def _read_stdin_file_as_it_blocks(*args):
    _go.release()
    return _read_stdin_file(*args)


jobctl.read_stdin_file = _read_stdin_file_as_it_blocks
"""
)


def test_ctrl_c_as_stdin_is_read_ends_jobctl_before_it_submits(daemon: Any, tmp_path: Path) -> None:
    """`jobctl run --stdin-file -` reads its standard input to the end before it submits; a Ctrl-C just before that
    read blocks in the kernel still ends it (130, nothing submitted). Without the signal wake-up pipe among what the
    read waits on, jobctl read on until the input ended, then submitted the job all the same: here, never."""
    reader, writer = os.pipe()  # the input: nothing comes, and its end does not either while the test holds `writer`
    try:
        ended = jobctl_with_shim(
            tmp_path, SIGNAL_AS_STDIN_IS_READ_SHIM, daemon, "run", "--stdin-file", "-", "--", "cat", stdin=reader
        )
    finally:
        os.close(writer)
    assert ended == (130, b"", b"")
    assert job_count(daemon) == 0


def jobctl_with_shim(
    tmp_path: Path, shim: str, daemon: Any, *args: str, stdin: int, stdout: int = subprocess.PIPE
) -> tuple[int, bytes | None, bytes]:
    """The `jobctl` command (jobctl_start first) with `shim` as its sitecustomize, run on `daemon` to its end: its exit
    status, stdout (None unless a pipe of ours) and stderr. `stdin` and `stdout`, descriptors it is given, are closed
    here once it has them."""
    directory = tmp_path / "shim"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(shim)
    try:
        process = subprocess.Popen(
            [str(JOBCTL_COMMAND), "--socket", str(daemon.socket_path), *args],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=environment({"PYTHONPATH": f"{directory}:{REPO}"}),
        )
    finally:
        for given in (stdin, stdout):
            if given >= 0:
                os.close(given)
    try:
        out, err = process.communicate(timeout=DEADLINE)
    finally:
        process.kill()
        process.wait()
    return process.returncode, out, err


# The `jobctl` command's Python runs this first: the SIGINT comes as `jobctl log` is about to block writing what the
# first job.output answer brought to an output nobody reads.
SIGNAL_AS_THE_OUTPUT_IS_WRITTEN_SHIM = (
    SIGNAL_ONCE_LET_GO
    + """
from jobd import client

_call = client.Client.call


def _call_then_write(self, method, params=None, timeout=None):
    result = _call(self, method, params, timeout)
    if method == "job.output":
        _go.release()  # the next system call that lets go of Python's lock is the write of its data
    return result


client.Client.call = _call_then_write
"""
)


def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: a write to it blocks until its reader reads, which here it never does."""
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    try:
        while True:
            os.write(writer, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(writer, True)  # the flag is the pipe's, shared with whoever is given `writer`
    return reader, writer


def test_ctrl_c_as_log_blocks_writing_to_a_reader_that_does_not_read_ends_it(daemon: Any, tmp_path: Path) -> None:
    """`jobctl log 5 | less`, less not scrolled: jobctl blocks writing until less reads. A Ctrl-C just before that
    write blocks in the kernel still ends jobctl (130), as one that comes during it does. Without the signal wake-up
    pipe among what the write waits on, jobctl stayed until the reader read again: here, never."""
    job_id = daemon.submit(command=["/bin/echo", "hello"])["id"]
    daemon.wait(job_id)
    reader, writer = full_pipe()
    try:
        ended = jobctl_with_shim(
            tmp_path,
            SIGNAL_AS_THE_OUTPUT_IS_WRITTEN_SHIM,
            daemon,
            "log",
            str(job_id),
            stdin=os.open(os.devnull, os.O_RDONLY),
            stdout=writer,
        )
    finally:
        os.close(reader)
    assert ended == (130, None, b"")


JOBCTL_COMMAND = Path(sys.executable).parent / "jobctl"  # the entry point a user runs, not `python -m`


def jobctl_importing(module: str, socket_path: Path, sigint: Any = signal.SIG_DFL) -> subprocess.Popen[bytes]:
    """The `jobctl` command started against `socket_path`, returned once it opens jobd/`module`'s file (its source
    or byte code) to import it: inotify reports the open from inside the open system call, so the caller's next
    signal comes while jobctl is still importing. `sigint`: the SIGINT disposition it inherits."""
    package = REPO / "jobd"
    with INotify() as inotify:
        for directory in (package, package / "__pycache__"):
            if directory.is_dir():
                inotify.add_watch(directory, flags.OPEN)
        process = subprocess.Popen(
            [str(JOBCTL_COMMAND), "--socket", str(socket_path), "status"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment({"JOBCTL_REPLY_TIMEOUT": "0"}),  # a silent socket keeps it waiting until signalled
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )
        while not any(event.name.split(".")[0] == module for event in inotify.read(timeout=DEADLINE * 1000)):
            assert process.poll() is None, process.communicate()
    return process


def silent_socket(tmp_path: Path) -> socket.socket:
    """A socket that takes connections and requests and never answers."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "silent.sock"))
    listener.listen()
    return listener


@pytest.mark.parametrize("module", ["jobctl", "client"])
def test_ctrl_c_while_jobctl_starts_exits_130_without_a_traceback(tmp_path: Path, module: str) -> None:
    """Ctrl-C as jobctl imports its modules (the tenth of a second before a command begins) ends it as Ctrl-C does
    later: 130, not a KeyboardInterrupt traceback from an import and a death by SIGINT. `jobctl` opens jobd/jobctl.py
    right after jobd.jobctl_start installed its handler, jobd/client.py as jobctl imports what it needs."""
    with silent_socket(tmp_path) as listener:
        process = jobctl_importing(module, Path(listener.getsockname()))
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=DEADLINE)
    assert (process.returncode, out, err) == (130, b"", b"")


def test_an_ignored_sigint_stays_ignored(tmp_path: Path) -> None:
    """A background command of a non-interactive shell (`jobctl wait 4 &`) starts with SIGINT ignored, so that the
    terminal's Ctrl-C is not for it: jobctl keeps it so, also while it starts. Seen by its request coming after the
    SIGINT; it then waits for the answer until SIGTERM ends it."""
    with silent_socket(tmp_path) as listener:
        process = jobctl_importing("jobctl", Path(listener.getsockname()), sigint=signal.SIG_IGN)
        process.send_signal(signal.SIGINT)
        listener.settimeout(DEADLINE)
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(DEADLINE)
            assert json.loads(connection.recv(65536))["method"] == "daemon.status"
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=DEADLINE)
    assert (process.returncode, out, err) == (-signal.SIGTERM, b"", b"")


def test_wait_on_a_terminal_at_a_stop_says_shutting_down(daemon: Any) -> None:
    """The bar follows events, but the end is job.wait's answer, as without a terminal: when jobd stops, the
    error SHUTTING_DOWN (exit 1), not a closed connection (exit 3)."""
    job_id = daemon.submit(command=["/bin/sh", "-c", "echo %10 >&3; exec sleep 600"])["id"]
    process, master = on_a_terminal(daemon, "wait", str(job_id))
    text = stopped_once_drawn(daemon, process, master, b"10% running")
    assert process.returncode == 1, text
    assert "jobctl: SHUTTING_DOWN: " in text and "Traceback" not in text, text


def test_wait_exits_128_plus_the_signal(daemon: Any) -> None:
    for name, number in (("TERM", 15), ("KILL", 9), ("SEGV", 11)):
        job = daemon.submit(command=["/bin/sh", "-c", f"kill -{name} $$"])
        result = ctl(daemon, "wait", str(job["id"]))
        assert result.code == 128 + number, result
        assert f"killed by SIG{name}" in result.err, result


def test_wait_exits_124_for_a_timed_out_job(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sleep", "30"], timeout=0.2)
    result = ctl(daemon, "wait", str(job["id"]))
    assert result.code == 124, result
    assert "timed out" in result.err
    assert daemon.call("job.get", {"id": job["id"]})["state"] == "timed_out"


def test_wait_exits_125_for_a_cancelled_job(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sleep", "30"])
    waiter = subprocess.Popen(
        jobctl_argv("--socket", str(daemon.socket_path), "wait", str(job["id"])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    try:
        daemon.call("job.cancel", {"id": job["id"]})
        out, err = waiter.communicate(timeout=DEADLINE)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 125, (out, err)
    assert f"job {job['id']} cancelled" in err.decode()


def test_wait_json_prints_the_final_job(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sh", "-c", "exit 3"])
    result = ctl(daemon, "--json", "wait", str(job["id"]))
    assert result.code == 3, result
    final = json.loads(result.out)
    assert (final["id"], final["state"], final["exit_code"]) == (job["id"], "failed", 3)
    assert "exit code 3" not in result.err  # the outcome line is left out with --json


def test_wait_timeout_exits_4_and_leaves_the_job_alone(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sleep", "30"])
    result = ctl(daemon, "wait", "--timeout", "0.2", str(job["id"]))
    assert result.code == 4, result
    assert f"job {job['id']} is still running" in result.err, result
    assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"
    daemon.call("job.cancel", {"id": job["id"]})


def test_wait_for_a_spawn_error_exits_1(daemon: Any) -> None:
    job = daemon.submit(command=["/nonexistent/program"])
    result = ctl(daemon, "wait", str(job["id"]))
    assert result.code == 1, result
    assert "/nonexistent/program" in result.err


# -- status, ls -------------------------------------------------------------------------------------------------


def test_status_of_the_daemon(daemon: Any) -> None:
    result = ctl(daemon, "status")
    assert result.code == 0, result
    assert re.search(rf"^jobd:\s+\S+, pid {daemon.pid}$", result.out, re.M), result
    assert str(daemon.config_dir / "jobd.toml") in result.out
    assert re.search(r"^\s+default\s+2\s+priority\s", result.out, re.M), result
    assert re.search(r"^\s+serial\s+1\s+priority\s", result.out, re.M), result

    status = json.loads(ctl(daemon, "--json", "status").out)
    assert status["pid"] == daemon.pid
    assert {q["name"] for q in status["queues"]} == {"default", "serial"}


# jobd's Python runs this first (its sitecustomize): the wall clock it reads through time.time is off by the seconds
# the file $TEST_CLOCK_OFFSET holds, when it exists; the machine's own clock is left alone.
CLOCK_OFFSET_SHIM = """
import os
import time

_wall = time.time
_offset_file = os.environ["TEST_CLOCK_OFFSET"]


def _time():
    try:
        with open(_offset_file) as offset:
            return _wall() + float(offset.read())
    except FileNotFoundError:
        return _wall()


time.time = _time
"""


def test_uptime_stays_right_when_the_clock_is_set_back(make_daemon: Any, tmp_path: Path) -> None:
    """daemon.status's uptime counts the time since jobd started, not the wall clock's difference from its start:
    with the clock set back a day since (an NTP step, `date -s`), it is not negative. (jobctl shows this figure:
    test_jobctl_format's test_daemon_status_shows_jobds_uptime_not_the_clocks_difference.)"""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(CLOCK_OFFSET_SHIM)
    offset = tmp_path / "clock-offset"
    clocked = {"PYTHONPATH": f"{shim}:{REPO}", "TEST_CLOCK_OFFSET": str(offset)}
    daemon = make_daemon(start=False)
    daemon.env.update(clocked)
    daemon.start()
    before = daemon.call("daemon.status")["uptime_seconds"]
    offset.write_text(str(-86400))  # the clock is set back a day
    after = daemon.call("daemon.status")["uptime_seconds"]
    assert before <= after < before + DEADLINE, (before, after)


def test_status_of_a_job(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sh", "-c", "exit 4"], context="who-17")
    daemon.wait(job["id"])
    result = ctl(daemon, "status", str(job["id"]))
    assert result.code == 0, result
    fields = dict(re.findall(r"^(\w[\w ]*):\s+(.*)$", result.out, re.M))
    assert fields["id"] == str(job["id"])
    assert fields["state"] == "failed"
    assert fields["command"] == "/bin/sh -c 'exit 4'"
    assert fields["queue"] == "default"
    assert fields["context"] == "who-17"
    assert fields["exit"] == "4"
    assert "tries:" in result.out
    assert re.search(r"^\s+1\s+failed\s+4\s", result.out, re.M), result

    detail = json.loads(ctl(daemon, "--json", "status", str(job["id"])).out)
    assert detail["id"] == job["id"] and detail["state"] == "failed"
    assert [t["outcome"] for t in detail["tries"]] == ["failed"]


def ls_ids(result: Result) -> list[int]:
    lines = result.out.splitlines()
    assert lines and lines[0].split()[:2] == ["ID", "STATE"], result
    return [int(line.split()[0]) for line in lines[1:]]


def test_ls_lists_newest_first_and_filters_by_state(daemon: Any) -> None:
    done = daemon.submit(command=["/bin/true"])
    daemon.wait(done["id"])
    delayed = [daemon.submit(command=["/bin/true"], delay=3600)["id"] for _ in range(3)]
    cancelled = daemon.submit(command=["/bin/true"], delay=3600)["id"]
    daemon.call("job.cancel", {"id": cancelled})

    result = ctl(daemon, "ls")
    assert result.code == 0, result
    assert ls_ids(result) == [cancelled, *reversed(delayed), done["id"]]
    rows = {int(line.split()[0]): line.split()[1] for line in result.out.splitlines()[1:]}
    assert rows[done["id"]] == "succeeded" and rows[cancelled] == "cancelled"

    assert ls_ids(ctl(daemon, "ls", "--state", "cancelled")) == [cancelled]
    assert ls_ids(ctl(daemon, "ls", "--state", "delayed", "--state", "succeeded")) == [*reversed(delayed), done["id"]]

    page = ctl(daemon, "ls", "-n", "2")
    assert ls_ids(page) == [cancelled, delayed[2]]
    assert f"--before {delayed[2]}" in page.err, page
    assert ls_ids(ctl(daemon, "ls", "-n", "2", "--before", str(delayed[2]))) == [delayed[1], delayed[0]]

    listing = json.loads(ctl(daemon, "ls", "--json").out)
    assert [j["id"] for j in listing["jobs"]] == ls_ids(result)
    assert listing == json.loads(ctl(daemon, "--json", "ls").out)

    empty = ctl(daemon, "ls", "--state", "timed_out")
    assert empty.code == 0 and empty.out == ""
    assert "no jobs" in empty.err

    assert ctl(daemon, "ls", "--state", "bogus").code == 2


# -- log --------------------------------------------------------------------------------------------------------


def test_log_prints_raw_bytes_exactly(daemon: Any) -> None:
    job = daemon.submit(command=["/usr/bin/printf", r"\xff\xfe\x00A\x80\n"])
    daemon.wait(job["id"])
    result = ctl(daemon, "log", str(job["id"]))
    assert result.code == 0, result
    assert result.stdout == b"\xff\xfe\x00A\x80\n"
    # --json does not change log's output.
    assert ctl(daemon, "--json", "log", str(job["id"])).stdout == b"\xff\xfe\x00A\x80\n"


def stdout_on_a_terminal(
    daemon: Any, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """`jobctl ARGS...` with stdout on a pseudo-terminal in raw mode (no \\n → \\r\\n: what jobctl wrote is what
    is read): the process (stderr a pipe) and the terminal's master side, to read and close."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        process = subprocess.Popen(
            jobctl_argv("--socket", str(daemon.socket_path), *args),
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            env=environment({"TERM": "xterm", **(env or {})}),
        )
    finally:
        os.close(slave)
    return process, master


def shown_on_a_terminal(daemon: Any, *args: str, env: dict[str, str] | None = None) -> tuple[bytes, Result]:
    """`jobctl ARGS...` with stdout on a terminal (stdout_on_a_terminal), run to its end: the bytes the terminal got,
    and the result (its stdout empty)."""
    process, master = stdout_on_a_terminal(daemon, *args, env=env)
    try:
        shown = read_rest(master)  # ends when jobctl, the terminal's last user, has ended
        _, err = process.communicate(timeout=DEADLINE)
    finally:
        os.close(master)
    result = Result(subprocess.CompletedProcess(process.args, process.returncode, b"", err))
    assert "Traceback" not in result.err, result
    return shown, result


# A job that tries to drive the terminal of whoever reads its output: set the window's title, colour, move back
# with a lone carriage return, a C1 CSI (U+009B), a byte that is not UTF-8, a right-to-left override.
HOSTILE_OUTPUT = rb"title\033]0;owned\007 red\033[31mX\033[0m\r\n10%%\r20%%\n\377 \302\233 \342\200\256evil\ttab\n"


def test_log_on_a_terminal_shows_control_characters_escaped(daemon: Any) -> None:
    """A job's output must not drive the administrator's terminal: on a terminal `log` shows its control characters
    escaped, keeping tabs and line ends (\\n, \\r\\n); piped, and with --raw, it writes the bytes as they are."""
    job = daemon.submit(command=["/usr/bin/printf", HOSTILE_OUTPUT.decode()])
    daemon.wait(job["id"])
    written = b"title\x1b]0;owned\x07 red\x1b[31mX\x1b[0m\r\n10%\r20%\n\xff \xc2\x9b \xe2\x80\xaeevil\ttab\n"
    assert (
        daemon.call("job.output", {"id": job["id"], "encoding": "base64"})["data"] == base64.b64encode(written).decode()
    )
    shown, result = shown_on_a_terminal(daemon, "log", str(job["id"]))
    assert result.code == 0, result
    assert shown == rb"title\x1b]0;owned\x07 red\x1b[31mX\x1b[0m" + b"\r\n" + rb"10%\r20%" + b"\n" + (
        rb"\xff \x9b \u202eevil" + b"\ttab\n"
    )
    raw, result = shown_on_a_terminal(daemon, "log", str(job["id"]), "--raw")
    assert (result.code, raw) == (0, written), result
    assert ctl(daemon, "log", str(job["id"])).stdout == written


def test_log_on_a_terminal_shows_a_character_cut_between_chunks_whole(daemon: Any) -> None:
    """jobctl reads a stream in chunks of OUTPUT_CHUNK bytes: a character the cut splits is shown once, whole, not as
    two bytes that are not UTF-8."""
    job = daemon.submit(command=["/bin/sh", "-c", f"head -c {OUTPUT_CHUNK - 1} /dev/zero | tr '\\0' a; printf 'é\\n'"])
    daemon.wait(job["id"])
    shown, result = shown_on_a_terminal(daemon, "log", str(job["id"]))
    assert result.code == 0, result
    assert shown == b"a" * (OUTPUT_CHUNK - 1) + "é\n".encode()


def test_log_follow_on_a_terminal_holds_a_carriage_return_until_the_line_goes_on(daemon: Any, tmp_path: Path) -> None:
    """Following a job on a terminal, a carriage return the job has just written may start its line end (\\r\\n, kept)
    or be a lone one (escaped): which, only its next byte tells. Until then it is held, not guessed."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    gate = os.open(fifo, os.O_RDWR)
    try:
        script = r'printf "one\r"; read line < "$1"; printf "\n\342\202\254 10%%\r20%%\r\n"'
        job = daemon.submit(command=["/bin/sh", "-c", script, "sh", str(fifo)])
        follower, master = stdout_on_a_terminal(daemon, "log", "-f", str(job["id"]))
        try:
            shown = read_until(master, b"one")  # shown while the job waits for the gate
            os.write(gate, b"go\n")
            shown += read_rest(master)
            _, err = follower.communicate(timeout=DEADLINE)
        finally:
            os.close(master)
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    finally:
        os.close(gate)
    assert follower.returncode == 0, err
    assert shown == b"one\r\n" + "€ 10%".encode() + rb"\r" + b"20%\r\n"


def test_columns_in_digits_other_than_ascii_is_not_a_width(daemon: Any) -> None:
    """COLUMNS=² passed str.isdigit(), and int() then refused it: a traceback. Like COLUMNS=wide, it is not a width."""
    daemon.wait(daemon.submit(command=["/bin/echo", "x" * 100])["id"])
    result = ctl(daemon, "ls", env={"COLUMNS": "\u00b2"})  # run_jobctl: no traceback
    assert result.code == 0 and "x" * 100 in result.out, result


def test_log_of_a_stream_that_lost_bytes_ends_with_a_note(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sh", "-c", "echo 0123456789"], max_output=4)
    daemon.wait(job["id"])
    result = ctl(daemon, "log", str(job["id"]))
    assert (result.code, result.stdout) == (0, b"0123"), result
    assert f"job {job['id']}'s stdout is not whole: cut at its max_output limit" in result.err, result
    assert "not whole" not in ctl(daemon, "log", str(job["id"]), "--stderr").err


def test_log_stderr(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sh", "-c", r"echo out; printf 'err\377\n' >&2"])
    daemon.wait(job["id"])
    assert ctl(daemon, "log", str(job["id"])).stdout == b"out\n"
    result = ctl(daemon, "log", str(job["id"]), "--stderr")
    assert result.code == 0, result
    assert result.stdout == b"err\xff\n"


def test_log_of_a_large_output_is_complete(daemon: Any) -> None:
    # Several job.output chunks: jobctl must stitch them without loss or repetition.
    job = daemon.submit(command=["/bin/sh", "-c", "seq 1 60000"])
    daemon.wait(job["id"])
    result = ctl(daemon, "log", str(job["id"]))
    assert result.stdout == "".join(f"{n}\n" for n in range(1, 60001)).encode()


def test_log_follow_prints_a_running_job_to_its_end(daemon: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    # O_RDWR never blocks on a FIFO, and keeps the pipe alive until the job has read from it.
    gate = os.open(fifo, os.O_RDWR)
    try:
        script = 'echo one; read line < "$1"; echo "$line"; printf "three\\377"'
        job = daemon.submit(command=["/bin/sh", "-c", script, "sh", str(fifo)])
        follower = subprocess.Popen(
            jobctl_argv("--socket", str(daemon.socket_path), "log", "-f", str(job["id"])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment(),
        )
        try:
            assert follower.stdout is not None
            first = read_until(follower.stdout, b"one\n")  # printed while the job still runs (it waits for us)
            assert first == b"one\n"
            assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"
            os.write(gate, b"two\n")
            rest, err = follower.communicate(timeout=DEADLINE)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
    finally:
        os.close(gate)
    assert follower.returncode == 0, err
    assert first + rest == b"one\ntwo\nthree\xff"
    assert daemon.call("job.get", {"id": job["id"]})["state"] == "succeeded"


def test_log_follow_ends_when_the_reader_of_its_pipe_has_gone(daemon: Any, tmp_path: Path) -> None:
    """`jobctl log -f 5 | grep -q ready`: once grep has seen its line and gone, jobctl ends (141, silently) at
    once, not when the job next writes or ends (it waited here for as long as the job stayed silent)."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    gate = os.open(fifo, os.O_RDWR)  # the job blocks reading it until the test writes: silent while jobctl waits
    try:
        job = daemon.submit(command=["/bin/sh", "-c", 'echo ready; read line < "$1"; echo more', "sh", str(fifo)])
        reader, writer = os.pipe()
        follower = subprocess.Popen(
            jobctl_argv("--socket", str(daemon.socket_path), "log", "-f", str(job["id"])),
            stdout=writer,
            stderr=subprocess.PIPE,
            env=environment(),
        )
        os.close(writer)
        try:
            assert read_until(reader, b"ready\n") == b"ready\n"
            os.close(reader)  # the reader goes, as `grep -q` and `head -1` do once they have what they wanted
            _, err = follower.communicate(timeout=DEADLINE)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        assert (follower.returncode, err) == (141, b"")
        assert daemon.call("job.get", {"id": job["id"]})["state"] == "running"  # the job goes on
        os.write(gate, b"go\n")
        assert daemon.wait(job["id"])["state"] == "succeeded"
    finally:
        os.close(gate)


def test_log_follow_waits_for_a_queued_job_to_start(daemon: Any) -> None:
    daemon.call("queue.pause", {"name": "serial"})
    job = daemon.submit(command=["/bin/echo", "late"], queue="serial")
    follower = subprocess.Popen(
        jobctl_argv("--socket", str(daemon.socket_path), "log", "-f", str(job["id"])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    try:
        daemon.call("queue.resume", {"name": "serial"})
        out, err = follower.communicate(timeout=DEADLINE)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    assert out == b"late\n"


def test_wait_for_a_job_of_a_paused_queue_says_the_queue_is_paused(daemon: Any) -> None:
    """A paused queue starts nothing: the progress bar of wait (and of submit --wait, as after the README's `jobctl
    pause default`) is preceded by a line saying so, rather than showing `queued` for as long as the pause lasts."""
    daemon.call("queue.pause", {"name": "serial"})
    job = daemon.submit(command=["/bin/true"], queue="serial")
    process, master = on_a_terminal(daemon, "wait", str(job["id"]))
    try:
        shown = read_until(master, b"% queued")  # drawn once jobd has taken the wait in
        daemon.call("queue.resume", {"name": "serial"})
        process.communicate(timeout=DEADLINE)
        shown += read_rest(master)
    finally:
        os.close(master)
    text = shown.decode(errors="replace")
    assert process.returncode == 0, text
    note = f"job {job['id']} is queued in serial, which is paused: it starts once it is resumed (jobctl resume serial)"
    assert note in text, text
    # A queue that is not paused gets no such line; neither does a wait without a terminal (one job.wait call).
    other = daemon.submit(command=["/bin/true"], queue="serial")
    process, master = on_a_terminal(daemon, "wait", str(other["id"]))
    try:
        process.communicate(timeout=DEADLINE)
        shown = read_rest(master)
    finally:
        os.close(master)
    assert process.returncode == 0 and b"paused" not in shown, shown
    daemon.call("queue.pause", {"name": "serial"})
    third = daemon.submit(command=["/bin/true"], queue="serial")
    quiet = ctl(daemon, "wait", str(third["id"]), "--timeout", "0.1")
    assert quiet.code == 4 and "paused" not in quiet.err, quiet


def test_status_of_a_job_queued_in_a_paused_queue_says_the_queue_is_paused(daemon: Any) -> None:
    """`jobctl status ID` of a job that waits in a paused queue says why it does not start; --json stays the job."""
    daemon.call("queue.pause", {"name": "serial"})
    job = daemon.submit(command=["/bin/true"], queue="serial")
    shown = ctl(daemon, "status", str(job["id"]))
    note = f"job {job['id']} is queued in serial, which is paused: it starts once it is resumed (jobctl resume serial)"
    assert shown.code == 0 and "state:    queued\n" in shown.out and shown.out.endswith(f"\n\n{note}\n"), shown
    assert json.loads(ctl(daemon, "--json", "status", str(job["id"])).out)["state"] == "queued"
    daemon.call("queue.resume", {"name": "serial"})
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert "paused" not in ctl(daemon, "status", str(job["id"])).out


def test_log_of_a_job_that_has_not_run(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/true"], delay=3600)
    result = ctl(daemon, "log", str(job["id"]))
    assert result.code == 0, result
    assert result.stdout == b""
    assert f"job {job['id']} has no output: it has not run (delayed)" in result.err


# -- cancel, queues, pause, resume, reload ----------------------------------------------------------------------


def test_cancel(daemon: Any) -> None:
    job = daemon.submit(command=["/bin/sleep", "30"])
    result = ctl(daemon, "cancel", str(job["id"]))
    assert result.code == 0, result
    assert result.out == f"job {job['id']} cancelled\n"
    assert daemon.call("job.get", {"id": job["id"]})["state"] == "cancelled"

    again = ctl(daemon, "cancel", str(job["id"]))
    assert again.code == 1, again
    assert again.err.startswith("jobctl: JOB_FINISHED: "), again

    queued = daemon.submit(command=["/bin/true"], delay=3600)
    cancelled = json.loads(ctl(daemon, "--json", "cancel", str(queued["id"])).out)
    assert (cancelled["id"], cancelled["state"]) == (queued["id"], "cancelled")


def test_cancel_waits_out_a_grace_longer_than_the_reply_timeout(daemon: Any) -> None:
    """job.cancel answers once the job has ended: the reply timeout, meant for requests answered at once, does not
    cut short a kill_grace (a job that ignores SIGTERM ends at its SIGKILL, 2 s after the cancel)."""
    ignores_term = ["/bin/sh", "-c", 'trap "" TERM; echo ready >&3; while :; do sleep 1; done']
    with daemon.client() as events:
        events.call("events.subscribe", {"types": ["job.log"]})
        job = daemon.submit(command=ignores_term, kill_grace=2)
        while events.next_event(timeout=DEADLINE).get("line") != "ready":  # blocks on the socket for each event
            pass
    result = ctl(daemon, "cancel", str(job["id"]), env={"JOBCTL_REPLY_TIMEOUT": "0.3"})
    assert result.code == 0, result
    assert result.out == f"job {job['id']} cancelled\n"


def queue_rows(result: Result) -> dict[str, list[str]]:
    lines = result.out.splitlines()
    assert lines[0].split()[0] == "NAME", result
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_queues(daemon: Any) -> None:
    result = ctl(daemon, "queues")
    assert result.code == 0, result
    rows = queue_rows(result)
    assert set(rows) == {"default", "serial"}
    assert rows["default"][1:3] == ["2", "priority"]
    assert rows["serial"][-1] == "-"
    listing = json.loads(ctl(daemon, "--json", "queues").out)
    assert {q["name"]: q["concurrency"] for q in listing["queues"]} == {"default": 2, "serial": 1}


def test_pause_keeps_jobs_queued_and_resume_runs_them(daemon: Any) -> None:
    result = ctl(daemon, "pause", "serial")
    assert result.code == 0, result
    assert result.out == "queue serial paused\n"
    assert queue_rows(ctl(daemon, "queues"))["serial"][-1] == "paused"

    job = daemon.submit(command=["/bin/true"], queue="serial")
    # job.wait's own timeout bounds the look: the job is still queued when it ends.
    still = daemon.call("job.wait", {"id": job["id"], "timeout": 0.3})
    assert still["state"] == "queued"
    assert daemon.call("job.get", {"id": job["id"]})["attempts"] == 0

    result = ctl(daemon, "resume", "serial")
    assert result.code == 0, result
    assert result.out == "queue serial resumed\n"
    assert daemon.wait(job["id"])["state"] == "succeeded"
    assert queue_rows(ctl(daemon, "queues"))["serial"][-1] == "-"

    assert json.loads(ctl(daemon, "--json", "pause", "default").out)["paused"] is True
    assert json.loads(ctl(daemon, "--json", "resume", "default").out)["paused"] is False

    unknown = ctl(daemon, "pause", "nope")
    assert unknown.code == 1, unknown
    assert unknown.err.startswith("jobctl: UNKNOWN_QUEUE: "), unknown


def drain_notifications(daemon: Any) -> list[str]:
    """Reads what jobd has told systemd so far, as systemd would.

    The harness reads NOTIFY_SOCKET only until READY=1. Once ten datagrams wait unread (net.unix.max_dgram_qlen)
    jobd drops further ones; every reload sends several (RELOADING=1, STATUS=, READY=1), and so does the config
    watcher reacting to the test's file changes. Draining keeps room for the messages a test looks at.
    """
    messages: list[str] = []
    sock = daemon.notify.sock
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            try:
                message = sock.recv(65536).decode()
            except BlockingIOError:
                return messages
            messages.append(message)
            daemon.notify.messages.append(message)
    finally:
        sock.settimeout(timeout)


def test_reload(daemon: Any) -> None:
    dropin = daemon.config_dir / "jobd.d" / "20-extra.toml"
    drain_notifications(daemon)
    dropin.write_text("[queue.extra]\nconcurrency = 3\n")
    result = ctl(daemon, "reload")
    assert result.code == 0, result
    assert result.out == "reloaded: 2 files\n"
    drain_notifications(daemon)
    reloaded = json.loads(ctl(daemon, "--json", "reload").out)
    assert reloaded["ok"] is True
    assert str(dropin) in reloaded["files"] and str(daemon.config_dir / "jobd.toml") in reloaded["files"]
    assert "extra" in queue_rows(ctl(daemon, "queues"))
    drain_notifications(daemon)


def test_an_error_naming_a_file_with_control_characters_is_shown_escaped(daemon: Any) -> None:
    """A drop-in named with an escape sequence (`71-\\x1b[31mRED.toml`): the reload's error quotes its name, which
    jobctl wrote raw to the terminal (turning it red); each line is now shown with its control characters escaped."""
    broken = daemon.config_dir / "jobd.d" / "71-\x1b[31mRED.toml"
    drain_notifications(daemon)
    broken.write_text("[queue.broken]\nconcurrency = 0\n[queue.other]\nconcurency = 2\n")
    try:
        result = ctl(daemon, "reload")
        assert result.code == 1, result
        assert "\x1b" not in result.err and "71-\\x1b[31mRED.toml" in result.err, result
    finally:
        drain_notifications(daemon)
        broken.unlink()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[queue.broken\nconcurrency = \n", []),  # not TOML at all
        ('[queue.broken]\nconcurrency = "many"\n', ["concurrency"]),  # TOML, but a bad value
        ("[queue.broken]\nconcurency = 2\n", ["concurency"]),  # an unknown key
    ],
    ids=["syntax", "bad-value", "unknown-key"],
)
def test_reload_with_a_broken_file_reports_it_and_keeps_the_config(daemon: Any, text: str, words: list[str]) -> None:
    broken = daemon.config_dir / "jobd.d" / "50-broken.toml"
    drain_notifications(daemon)
    broken.write_text(text)
    try:
        result = ctl(daemon, "reload")
        assert result.code == 1, result
        assert result.out == ""
        assert result.err.startswith("jobctl: CONFIG_INVALID: "), result
        assert "50-broken.toml" in result.err, result
        for word in words:
            assert word in result.err, result
        # systemd hears of it too (the watcher may have tried the file first: the same failure).
        status = daemon.notify.wait_for("STATUS=")
        assert "reload failed" in status and "50-broken.toml" in status, status
        # The running configuration is untouched.
        assert set(queue_rows(ctl(daemon, "queues"))) == {"default", "serial"}
        daemon_status = json.loads(ctl(daemon, "--json", "status").out)
        assert daemon_status["last_reload"]["ok"] is False
        assert "50-broken.toml" in daemon_status["last_reload"]["error"]
    finally:
        drain_notifications(daemon)
        broken.unlink()
    assert ctl(daemon, "reload").code == 0
    drain_notifications(daemon)


# -- exit codes, socket selection, usage ------------------------------------------------------------------------


def test_a_daemon_error_exits_1(daemon: Any) -> None:
    for args in (("status", "999999"), ("wait", "999999"), ("log", "999999"), ("cancel", "999999")):
        result = ctl(daemon, *args)
        assert result.code == 1, (args, result)
        assert result.err.startswith("jobctl: UNKNOWN_JOB: "), (args, result)
        assert result.out == ""


USAGE_ERRORS = [
    ["frobnicate"],
    [],
    ["wait"],
    ["wait", "abc"],
    ["wait", "0"],
    ["wait", "1", "--timeout", "-1"],
    ["status", "-5"],
    ["log"],
    ["log", "1", "--stderr", "--log"],
    ["cancel"],
    ["pause"],
    ["submit"],
    ["run"],
    ["run", "--"],
    ["run", "--priority", "-1", "--", "/bin/true"],
    ["run", "--delay", "soon", "--", "/bin/true"],
    ["run", "-e", "NOEQUALS", "--", "/bin/true"],
    ["ls", "-n", "0"],
    # Values jobd would refuse are refused before anything is sent, as usage errors too.
    ["ls", "-n", "1001"],
    ["run", "--delay", "1e10", "--", "/bin/true"],
    ["run", "--priority", "4294967296", "--", "/bin/true"],
    ["run", "--retry", "1001", "--", "/bin/true"],
    ["wait", "--timeout", "1e10", "1"],
    ["--bogus-option", "status"],
]


def test_usage_errors_exit_2(daemon: Any) -> None:
    before = job_count(daemon)
    failures = []
    for args in USAGE_ERRORS:
        result = ctl(daemon, *args)
        if result.code != 2 or result.out != "" or not result.err.strip():
            failures.append(f"{args}: {result!r}")
    assert not failures, "\n".join(failures)
    assert job_count(daemon) == before


def test_an_unreadable_stdin_file_is_a_usage_error(daemon: Any, tmp_path: Path) -> None:
    result = ctl(daemon, "run", "--stdin-file", str(tmp_path / "missing"), "--", "/bin/cat")
    assert result.code == 2, result
    assert "missing" in result.err


def test_an_error_on_journalds_stream_carries_the_err_priority(tmp_path: Path) -> None:
    """Run by systemd with stderr on the journal (the unit's ExecReload= is `jobctl reload`), jobctl's error lines
    start with <3>, which journald reads as their priority; $JOURNAL_STREAM naming another file changes nothing."""
    argv = jobctl_argv("--socket", "/nonexistent/jobd.sock", "status")
    for matching in (True, False):
        err = tmp_path / f"stderr-{matching}"
        with err.open("wb") as stderr:
            found = os.fstat(stderr.fileno())
            stream = f"{found.st_dev}:{found.st_ino + (0 if matching else 1)}"
            env = environment({"JOURNAL_STREAM": stream})
            assert subprocess.run(argv, stderr=stderr, env=env, timeout=DEADLINE).returncode == 3
        expected = "<3>jobctl: cannot connect" if matching else "jobctl: cannot connect"
        assert err.read_text().startswith(expected), (matching, err.read_text())


def test_cannot_connect_exits_3(tmp_path: Path) -> None:
    result = run_jobctl("--socket", "/nonexistent/jobd.sock", "status")
    assert result.code == 3, result
    assert result.err.startswith("jobctl: cannot connect to /nonexistent/jobd.sock"), result
    assert result.out == ""
    # A path that exists but where nobody listens.
    dead = tmp_path / "dead.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(dead))
    listener.close()
    result = run_jobctl("--socket", str(dead), "ls")
    assert result.code == 3, result
    assert str(dead) in result.err


def test_a_path_that_is_not_a_socket_is_named_for_what_it_is(tmp_path: Path) -> None:
    """Linux answers a connect to a directory or a file with ECONNREFUSED, as for a socket nobody listens on; "is
    jobd running?" sent the user looking for a stopped jobd when --socket or JOBD_SOCKET named the wrong path."""
    a_file = tmp_path / "jobd.toml"
    a_file.write_text("")
    kinds = [(tmp_path, "a directory"), (a_file, "a regular file"), (Path("/dev/null"), "a character device")]
    for path, kind in kinds:
        for result in (run_jobctl("--socket", str(path), "status"), run_jobctl("ls", env={"JOBD_SOCKET": str(path)})):
            assert result.code == 3, result
            assert result.err == (
                f"jobctl: cannot connect to {path}: it is {kind}, not a socket; point --socket or JOBD_SOCKET at "
                "jobd's API socket (its [daemon] socket)\n"
            ), result
    too_long = "/tmp/" + "d" * 120 + "/jobd.sock"
    result = run_jobctl("--socket", too_long, "status")
    assert result.code == 3, result
    assert f"the path is {len(too_long)} bytes long, and a Unix socket's may be 108 at most" in result.err, result


def test_a_socket_path_too_long_for_sun_path_is_said_with_what_works(daemon: Any, tmp_path: Path) -> None:
    """jobd's own socket, named by a path longer than sun_path's 108 bytes: jobctl says so and what works instead
    (it told the user to point --socket at jobd's socket, which this is), and the relative path it suggests does."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    (deep / "jobd.sock").symlink_to(daemon.socket_path)
    too_long = str(deep / "jobd.sock")
    assert len(too_long) > 108
    result = run_jobctl("--socket", too_long, "status")
    assert (result.code, result.out) == (3, ""), result
    assert result.err == (
        f"jobctl: cannot connect to {too_long}: the path is {len(too_long)} bytes long, and a Unix socket's may be 108 "
        "at most; name it by a shorter path (relative to the current directory, or through a symbolic link)\n"
    ), result
    process = subprocess.run(
        jobctl_argv("--json", "status"),
        cwd=deep,
        env=environment({"JOBD_SOCKET": "jobd.sock"}),
        capture_output=True,
        timeout=DEADLINE,
    )
    assert process.returncode == 0, process
    assert json.loads(process.stdout)["pid"] == daemon.pid


def test_the_evqueue_socket_is_told_apart_from_the_api_socket(daemon: Any) -> None:
    """jobd's evqueue_socket greets every connection in XML: jobctl pointed at it (README names both sockets) says
    that it is an evQueue socket and which one it needs, not a JSON decoder's complaint."""
    evqueue_socket = daemon.evqueue_socket
    result = run_jobctl("--socket", str(evqueue_socket), "status")
    assert result.code == 3, result
    assert result.err.startswith(
        f"jobctl: {evqueue_socket} speaks XML (evQueue's protocol, as jobd's evqueue_socket does), not jobd's "
        "JSON-RPC: jobctl needs jobd's API socket, its [daemon] socket; it sent b'<ready "
    ), result


def test_output_that_cannot_be_written_is_said_not_a_traceback(daemon: Any) -> None:
    """`jobctl log 5 > file` on a full disk (/dev/full says ENOSPC to every write): one line on stderr and exit code
    74 (EX_IOERR), not a Python traceback and exit code 1 (which says that jobd answered with an error)."""
    job = daemon.wait(daemon.submit(command=["/bin/echo", "some output"])["id"])
    for args in (("log", str(job["id"])), ("status", str(job["id"])), ("--json", "ls"), ("queues",)):
        with open("/dev/full", "wb") as full:
            process = subprocess.run(
                jobctl_argv("--socket", str(daemon.socket_path), *args),
                stdout=full,
                stderr=subprocess.PIPE,
                env=environment(),
                timeout=DEADLINE,
            )
        assert process.returncode == 74, (args, process)
        assert process.stderr == b"jobctl: cannot write to standard output: No space left on device\n", (args, process)
    # With stderr closed, an error is not written to stdout instead (print(file=None) writes to stdout).
    process = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" 2>&-', "sh", *jobctl_argv("--socket", str(daemon.socket_path), "status", "999")],
        capture_output=True,
        env=environment(),
        timeout=DEADLINE,
    )
    assert (process.returncode, process.stdout) == (1, b""), process
    # With stdout closed, nothing could be shown: refused before anything is done (it said 0 and showed nothing).
    jobs_before = daemon.call("job.list", {"limit": 1000})["jobs"]
    process = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" >&-', "sh", *jobctl_argv("--socket", str(daemon.socket_path), "run", "/bin/true")],
        stderr=subprocess.PIPE,
        env=environment(),
        timeout=DEADLINE,
    )
    assert process.returncode == 74, process
    assert process.stderr.startswith(b"jobctl: standard output is closed: nothing could be shown"), process
    assert daemon.call("job.list", {"limit": 1000})["jobs"] == jobs_before  # nothing was submitted


class NotJobd:
    """A JSON-RPC 2.0 server on a Unix socket that is not jobd: it answers every request with `result`, or never
    (SILENT), and each method named in `delays` only after that many seconds."""

    SILENT = object()

    def __init__(self, path: Path, result: Any, delays: dict[str, float] | None = None) -> None:
        self.path = path
        self.result = result
        self.delays = delays or {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection, connection.makefile("rb") as requests:
                for line in requests:
                    request = json.loads(line)
                    if self.result is NotJobd.SILENT:
                        continue
                    time.sleep(self.delays.get(request.get("method"), 0))  # no-poll-ok: a reply held on purpose
                    reply = {"jsonrpc": "2.0", "id": request.get("id"), "result": self.result}
                    connection.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=DEADLINE)


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        (None, r"\(result is null, not an object\)"),
        ([1, 2], r"\(result is a list, not an object\)"),
        ({"ok": True}, r"\(result\.\w+ is missing\)"),
        # each method trips on another member: a boolean id, an integer version, a string for a list, ...
        (
            {"id": True, "state": "queued", "queue": "q", "jobs": "no", "version": 1, "files": {}},
            r"\(result\.\w+ (is an? \w+, not an? \w+|is missing)\)",
        ),
    ],
)
def test_a_server_that_is_not_jobd_is_reported_not_misread(tmp_path: Path, result: Any, problem: str) -> None:
    """Each command checks its result's shape first: a wrong one is exit code 3 and a sentence naming the socket,
    the method and the member, never a traceback or a table of blanks."""
    server = NotJobd(tmp_path / "other.sock", result)
    try:
        for args, method in [
            (("status",), "daemon.status"),
            (("status", "1"), "job.get"),
            (("ls",), "job.list"),
            (("run", "--", "true"), "job.submit"),
            (("wait", "1"), "job.wait"),
            (("cancel", "1"), "job.cancel"),
            (("queues",), "queue.list"),
            (("reload",), "daemon.reload"),
            (("--json", "instances"), "instance.list"),
        ]:
            outcome = run_jobctl("--socket", str(server.path), *args)
            assert outcome.code == 3, (args, outcome)
            assert outcome.out == "", (args, outcome)
            assert outcome.err.startswith(f"jobctl: {server.path} answered {method} with something jobd does not send")
            assert re.search(problem, outcome.err), (args, outcome)
    finally:
        server.close()


def test_a_server_that_never_answers_is_given_up_on(tmp_path: Path) -> None:
    """A request jobd answers at once gets JOBCTL_REPLY_TIMEOUT seconds (60 by default): a stuck jobd, or a
    socket that is not jobd's, is exit code 3 and a sentence, not a jobctl hanging in a script."""
    server = NotJobd(tmp_path / "silent.sock", NotJobd.SILENT)
    try:
        for args, method in [(("status",), "daemon.status"), (("run", "--", "true"), "job.submit")]:
            outcome = run_jobctl("--socket", str(server.path), *args, env={"JOBCTL_REPLY_TIMEOUT": "0.3"})
            assert outcome.code == 3, outcome
            assert outcome.err.startswith(f"jobctl: {server.path} gave no reply to {method} within 0.3s"), outcome
            assert "JOBCTL_REPLY_TIMEOUT" in outcome.err
    finally:
        server.close()
    for bad in ("soon", "-1", "nan", "inf"):
        outcome = run_jobctl("--socket", str(server.path), "status", env={"JOBCTL_REPLY_TIMEOUT": bad})
        assert outcome.code == 2, outcome
        assert outcome.err.startswith(f"jobctl: JOBCTL_REPLY_TIMEOUT={bad!r}: expected seconds from 0"), outcome


def test_a_stuck_jobd_whose_socket_queue_is_full_is_given_up_on(daemon: Any) -> None:
    """A jobd that accepts no connection (stopped here; stuck on a hung disk in life) soon has its socket's queue of
    connections full, and a connect(2) then waits for a place in it: jobctl waited for good, whatever
    JOBCTL_REPLY_TIMEOUT said. That wait is bounded by the reply timeout too: exit 3 and a sentence."""
    waiting: list[socket.socket] = []
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        while True:  # clients that jobd has not accepted yet, until its queue holds no more
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(daemon.socket_path))
            except BlockingIOError:  # EAGAIN: the queue is full
                client.close()
                break
            waiting.append(client)
        outcome = ctl(daemon, "status", env={"JOBCTL_REPLY_TIMEOUT": "0.3"})
    finally:
        for client in waiting:
            client.close()
        os.kill(daemon.pid, signal.SIGCONT)
    assert outcome.code == 3, outcome
    assert outcome.err.startswith(
        f"jobctl: cannot connect to {daemon.socket_path}: jobd accepted no connection within 0.3s (the connections "
        "waiting for it fill its socket's queue): is jobd stuck (see its log)?"
    ), outcome
    assert daemon.call("ping")["pong"] is True  # those clients gone, jobd goes on


def test_the_reply_timeout_spares_what_waits_by_design(tmp_path: Path) -> None:
    """job.wait is answered when the job ends, however long that takes: the reply timeout does not apply."""
    finished = {"id": 1, "state": "succeeded", "queue": "q", "exit_code": 0, "signal": None}
    server = NotJobd(tmp_path / "slow.sock", finished, delays={"job.wait": 1.5})
    try:
        outcome = run_jobctl("--socket", str(server.path), "wait", "1", env={"JOBCTL_REPLY_TIMEOUT": "0.3"})
        assert outcome.code == 0, outcome
    finally:
        server.close()


def test_jobd_socket_is_honoured(daemon: Any) -> None:
    result = run_jobctl("status", env={"JOBD_SOCKET": str(daemon.socket_path)})
    assert result.code == 0, result
    assert f"pid {daemon.pid}" in result.out

    result = run_jobctl("status", env={"JOBD_SOCKET": "/nonexistent/from-env.sock"})
    assert result.code == 3, result
    assert "/nonexistent/from-env.sock" in result.err

    # --socket wins over the environment, before or after the command.
    for args in (("--socket", str(daemon.socket_path), "queues"), ("queues", "--socket", str(daemon.socket_path))):
        result = run_jobctl(*args, env={"JOBD_SOCKET": "/nonexistent/from-env.sock"})
        assert result.code == 0, (args, result)
        assert "default" in result.out


def test_version_and_help(daemon: Any) -> None:
    version = run_jobctl("--version")
    assert version.code == 0, version
    assert re.fullmatch(r"jobctl \d+\.\d+\.\d+\S*\n", version.out), version
    assert daemon.call("ping")["version"] in version.out
    helped = run_jobctl("--help")
    assert helped.code == 0
    for command in ("run", "submit", "status", "ls", "log", "wait", "cancel", "queues", "pause", "resume", "reload"):
        assert command in helped.out


def test_json_mode_reports_daemon_errors_as_json(daemon: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobd.jobctl", "--socket", str(daemon.socket_path), "--json", "status", "999999"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "UNKNOWN_JOB" and "999999" in error["message"]


def test_log_json_prints_raw_bytes_and_reports_daemon_errors_as_json(daemon: Any) -> None:
    """What man/jobctl.1 says of `log --json` (it used to say that log ignores --json)."""
    job = daemon.wait(daemon.submit(command=["/bin/echo", "raw"])["id"])
    result = ctl(daemon, "--json", "log", str(job["id"]))
    assert (result.code, result.out, result.err) == (0, "raw\n", ""), result
    result = ctl(daemon, "--json", "log", "999999")
    assert result.code == 1 and result.out == "", result
    assert json.loads(result.err)["error"]["code"] == "UNKNOWN_JOB", result


def test_a_relative_cwd_in_a_removed_directory_is_a_usage_error_not_an_output_error(tmp_path: Path) -> None:
    """main()'s `except OSError` is for writing the output (exit 74): an OSError from elsewhere, here os.getcwd()
    under `--cwd sub` in a directory removed under jobctl, said "cannot write to standard output: No such file or
    directory"."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = 'cd "$1" && rmdir "$1" && shift && exec "$@"'
    argv = jobctl_argv("--socket", str(tmp_path / "no.sock"), "run", "--cwd", "sub", "--", "/bin/true")
    process = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(gone), *argv],
        capture_output=True,
        env=environment(),
        timeout=DEADLINE,
    )
    assert process.returncode == 2, process
    assert process.stderr == (
        b"jobctl: --cwd sub: relative to jobctl's current directory, which is gone (No such file or directory)\n"
    ), process
