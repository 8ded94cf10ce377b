"""jobctl's pure parts: formatting, tables, the progress bar, exit codes and turning options into parameters."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import zoneinfo
from pathlib import Path
from typing import Any

import pytest

from jobd import jobctl
from jobd.client import RemoteError, encode_message
from jobd.jobctl import (
    WaitView,
    apply_event,
    columns,
    describe_end,
    exit_code_for,
    format_duration,
    format_job_counts,
    format_kib,
    format_time,
    format_timestamp,
    render_daemon_status,
    render_fields,
    render_progress_bar,
    render_table,
    truncate,
)

CET = dt.timezone(dt.timedelta(hours=1))
NOW = dt.datetime(2026, 11, 29, 17, 30, 0, tzinfo=CET)


def job(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": 42, "state": "succeeded", "exit_code": None, "signal": None, "attempts": 1}
    return base | fields


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0ms"),
        (0.045, "45ms"),
        (1.5, "1.5s"),
        (59.9, "59.9s"),
        (59.97, "1m00s"),
        (123, "2m03s"),
        (3720, "1h02m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
        (-2, "0ms"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_time_shows_the_clock_today_and_the_date_otherwise() -> None:
    assert format_time("2026-11-29T16:03:12.5Z", NOW) == "17:03:12"
    assert format_time("2026-11-28T16:03:12Z", NOW) == "2026-11-28"
    # 23:30 UTC is already tomorrow in CET: the local date counts.
    assert format_time("2026-11-29T23:30:00Z", NOW) == "2026-11-30"
    assert format_time(None, NOW) == "-"


def test_a_time_to_come_shows_its_time_of_day_on_another_day() -> None:
    assert jobctl.format_due("2026-11-29T16:03:12Z", NOW) == "17:03:12"
    assert jobctl.format_due("2026-11-30T01:30:00Z", NOW) == "2026-11-30 02:30"  # tomorrow's nightly run: when
    assert jobctl.format_due(None, NOW) == "-"


def test_format_timestamp_is_local_to_the_second_with_the_zones_name() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    assert format_timestamp("2026-11-29T16:03:12.999Z", paris) == "2026-11-29 17:03:12 CET"
    assert format_timestamp("2026-07-01T16:03:12Z", paris) == "2026-07-01 18:03:12 CEST"  # its own date's offset
    # The hour the fall-back repeats (02:00-03:00 on 2026-10-25): its two 02:30s are told apart.
    assert format_timestamp("2026-10-25T00:30:00Z", paris) == "2026-10-25 02:30:00 CEST"
    assert format_timestamp("2026-10-25T01:30:00Z", paris) == "2026-10-25 02:30:00 CET"
    assert format_timestamp(None) == "-"


@pytest.mark.parametrize(("kib", "text"), [(None, "-"), (512, "512KiB"), (20480, "20.0MiB"), (3 * 1024**2, "3.0GiB")])
def test_format_kib(kib: int | None, text: str) -> None:
    assert format_kib(kib) == text


def test_truncate_marks_the_cut() -> None:
    assert truncate("abcdef", 10) == "abcdef"
    assert truncate("abcdef", 4) == "abc…"
    assert truncate("abcdef", 1) == "a"


def test_truncate_counts_terminal_columns() -> None:
    wide = "画像をリサイズしています"  # two columns a character
    assert columns(wide) == 24 and columns("é") == 1 and columns("e\u0301") == 1
    cut = truncate(wide, 9)
    assert cut == "画像をリ…" and columns(cut) == 9
    assert columns(truncate(wide, 8)) <= 8


def test_what_jobs_and_clients_sent_cannot_drive_the_terminal() -> None:
    hostile = "true '\x1b]0;pwned\x07\x1b[31mRED\rX'"
    for line in render_table(["ID", "COMMAND"], [["1", hostile]], width=80, flex=1) + render_fields(
        [("command", hostile)]
    ):
        assert not any(c in line for c in "\x1b\x07\r"), repr(line)
    assert "\\x1b]0;pwned" in render_table(["ID", "COMMAND"], [["1", hostile]])[1]
    bar = render_progress_bar(42, "running", 40, 60, "\x1b[2J画像をリサイズしています" * 3)
    assert "\x1b" not in bar and 58 <= columns(bar) <= 59  # a wide character does not fit in the last column


def test_render_table_aligns_and_right_aligns_numbers() -> None:
    lines = render_table(["ID", "NAME"], [["1", "alpha"], ["100", "b"]], right={0})
    assert lines == [" ID  NAME", "  1  alpha", "100  b"]


def test_render_table_cuts_the_flexible_column_to_the_width() -> None:
    rows = [["1", "a very long command line indeed", "x"]]
    lines = render_table(["ID", "COMMAND", "Z"], rows, width=20, flex=1)
    assert all(len(line) <= 20 for line in lines)
    assert lines[1] == "1   a very long …  x"


def test_render_table_never_cuts_below_the_header() -> None:
    lines = render_table(["ID", "COMMAND"], [["1", "abcdefghijkl"]], width=5, flex=1)
    assert lines[1] == "1   abcdef…"


def test_render_table_without_width_cuts_nothing() -> None:
    assert render_table(["A"], [["x" * 300]], flex=0)[1] == "x" * 300


def test_progress_bar() -> None:
    line = render_progress_bar(42, "running", 40, 80, "resized 10 files")
    assert line == "job 42 [########------------]  40% running  resized 10 files"
    assert render_progress_bar(42, "queued", 0, 80).startswith("job 42 [--------------------]   0% queued")
    assert render_progress_bar(42, "running", 100, 40) == "job 42 [##########] 100% running"


def test_progress_bar_stays_off_the_last_column() -> None:
    line = render_progress_bar(42, "running", 50, 50, "x" * 100)
    assert len(line) == 49
    assert line.endswith("…")


def test_wait_label_names_the_attempt_once_retries_are_involved() -> None:
    assert jobctl.wait_label(job(state="queued", attempts=0)) == "queued"
    assert jobctl.wait_label(job(state="running", attempts=1)) == "running"
    assert jobctl.wait_label(job(state="delayed", attempts=1)) == "delayed for attempt 2"
    assert jobctl.wait_label(job(state="running", attempts=2)) == "running (attempt 2)"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"state": "succeeded", "exit_code": 0}, 0),
        ({"state": "failed", "exit_code": 3}, 3),
        ({"state": "failed", "exit_code": 255}, 255),
        ({"state": "failed", "signal": 9}, 137),
        ({"state": "failed", "signal": 11}, 139),
        ({"state": "timed_out", "signal": 15}, 124),
        ({"state": "cancelled", "signal": 15}, 125),
        ({"state": "failed", "error": "spawn error: No such file or directory"}, 1),
        ({"state": "failed", "error": "lost"}, 1),
        ({"state": "running"}, 4),
        ({"state": "queued"}, 4),
        ({"state": "delayed"}, 4),
    ],
)
def test_exit_code_for(fields: dict[str, Any], code: int) -> None:
    assert exit_code_for(job(**fields)) == code


def test_describe_end() -> None:
    started, finished = "2026-11-29T16:00:00Z", "2026-11-29T16:00:01.5Z"
    done = job(state="succeeded", exit_code=0, started_at=started, finished_at=finished)
    assert describe_end(done) == "job 42 succeeded in 1.5s"
    retried = job(state="succeeded", exit_code=0, started_at=started, finished_at=finished, attempts=3)
    assert describe_end(retried) == "job 42 succeeded on attempt 3 in 1.5s"
    assert describe_end(job(state="failed", exit_code=3, attempts=3)) == "job 42 failed: exit code 3 (3 attempts)"
    assert describe_end(job(state="failed", signal=9)) == "job 42 failed: killed by SIGKILL"
    assert describe_end(job(state="failed", error="cannot run /nope")) == "job 42 failed: cannot run /nope"
    assert describe_end(job(state="timed_out", timeout=3600.0)) == "job 42 timed out after 1h00m"
    assert describe_end(job(state="cancelled")) == "job 42 cancelled"


def test_apply_event_follows_state_progress_and_log_of_its_job_only() -> None:
    view = WaitView(job(state="queued", progress=0))
    view = apply_event(view, {"type": "job.state", "job": job(state="running", progress=0)})
    view = apply_event(view, {"type": "job.progress", "id": 42, "progress": 40})
    view = apply_event(view, {"type": "job.log", "id": 42, "line": "resized 10 files\n"})
    view = apply_event(view, {"type": "job.progress", "id": 7, "progress": 99})
    view = apply_event(view, {"type": "job.state", "job": job(id=7, state="failed")})
    assert (view.job["state"], view.job["progress"], view.last_log) == ("running", 40, "resized 10 files")


def test_format_job_counts_in_life_order() -> None:
    counts = {"succeeded": 7, "queued": 2, "failed": 0, "running": 1, "reserved": 1}
    assert format_job_counts(counts) == "2 queued, 1 running, 7 succeeded, 1 reserved"
    assert format_job_counts({}) == "none"


def test_queue_status() -> None:
    assert jobctl.queue_status({"paused": False, "closed": False}) == "-"
    assert jobctl.queue_status({"paused": True, "closed": True}) == "paused,closed"


def test_stdin_is_text_when_it_is_utf8_else_base64() -> None:
    assert jobctl.stdin_params("héllo\n".encode()) == {"stdin": "héllo\n"}
    assert jobctl.stdin_params(b"\xff\x00") == {"stdin_base64": "/wA="}


def parse(*argv: str) -> Any:
    return jobctl.build_parser().parse_args(list(argv))


def test_run_params(tmp_path: Path) -> None:
    args = parse(
        "run", "-q", "photo", "-p", "5", "-e", "A=1=2", "--cwd", str(tmp_path), "--retry", "2", "--", "ls", "-l"
    )
    params = jobctl.run_params(args)
    assert params["command"] == ["ls", "-l"]
    assert params["queue"] == "photo" and params["priority"] == 5
    assert params["env"] == {"A": "1=2"}
    assert params["working_dir"] == str(tmp_path)
    assert params["retry"]["times"] == 2


def test_run_defaults_to_the_current_directory_made_absolute() -> None:
    assert jobctl.run_params(parse("run", "true"))["working_dir"] == os.getcwd()
    assert jobctl.run_params(parse("run", "--cwd", "sub", "true"))["working_dir"] == os.path.join(os.getcwd(), "sub")


def test_run_without_a_command_is_a_usage_error() -> None:
    with pytest.raises(jobctl.UsageError):
        jobctl.run_params(parse("run", "--"))


def test_submit_params() -> None:
    assert jobctl.submit_params(parse("submit", "resize", "a.png", "b.png"))["args"] == ["a.png", "b.png"]
    params = jobctl.submit_params(parse("submit", "-P", "width=50", "-P", "src=a.png", "resize"))
    assert params == {"task": "resize", "params": {"width": "50", "src": "a.png"}}
    with pytest.raises(jobctl.UsageError):
        jobctl.submit_params(parse("submit", "-P", "width=50", "resize", "a.png"))


def test_global_options_work_after_the_command_too() -> None:
    args = parse("--socket", "/a", "ls", "--json")
    assert (args.socket, args.json) == ("/a", True)
    args = parse("--json", "ls")
    assert (args.socket, args.json) == (None, True)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert jobctl.main(["ls", "--state", "bogus"]) == 2
    assert jobctl.main(["run", "-e", "NOEQUALS", "--", "true"]) == 2
    assert jobctl.main(["submit", "-P", "a=1", "resize", "x", "--socket", "/nonexistent"]) == 2
    assert jobctl.main([]) == 2
    assert "jobctl: submit: give either ARGs or -P/--param" in capsys.readouterr().err


COMMANDS = jobctl.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def required_words(command: argparse.ArgumentParser) -> list[str]:
    """A value for each positional the command requires: the first of its choices, else "1" (an id or a name)."""
    return [
        str(next(iter(action.choices))) if action.choices else "1"
        for action in command._actions
        if not action.option_strings and action.nargs in (None, 1)
    ]


def extra_words(command: argparse.ArgumentParser) -> list[list[str]]:
    """Words the command does not take: an unknown option, and surplus words unless its last positional takes any
    number of them (`submit TASK [ARG ...]`, `run [--] CMD [ARG...]`)."""
    open_ended = any(not a.option_strings and a.nargs in ("*", argparse.REMAINDER) for a in command._actions)
    return [["--no-such-option"]] + ([] if open_ended else [["1", "2", "3"]])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_word_a_command_does_not_take_is_refused_with_that_commands_usage(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An extra word or unknown option was refused with jobctl's general usage (`jobctl [-h] ... COMMAND ...`),
    which does not say what `jobctl status` takes. The error now shows the command's own usage, as argparse does for
    a bad value. (Refused while parsing: nothing connects to the socket.)"""
    for extra in extra_words(COMMANDS[name]):
        argv = ["--socket", "/nonexistent/jobd.sock", name, *required_words(COMMANDS[name]), *extra]
        assert jobctl.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"usage: jobctl {name} "), (argv, err)
        assert f"\njobctl {name}: error: unrecognized arguments: " in err, (argv, err)


def test_every_option_of_every_command_says_what_it_does_in_the_help() -> None:
    """`jobctl ls --help` listed --queue, --task and --context, and `jobctl instances --help` --workflow and --status,
    with nothing beside them (ls --state: "(repeat)"), where jobctl(1) says what each does."""
    unexplained = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in COMMANDS.items()
        for action in command._actions
        if action.option_strings and not (action.help or "").replace("(repeat)", "").strip()
    ]
    assert unexplained == []


def test_no_daemon_exits_3_naming_the_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "jobd.sock")
    assert jobctl.main(["--socket", path, "queues"]) == 3
    assert capsys.readouterr().err == (
        f"jobctl: cannot connect to {path}: [Errno 2] No such file or directory; "
        "is jobd running? (set --socket or JOBD_SOCKET; if jobd runs, its socket file was removed: "
        "`systemctl kill --kill-whom=main -s HUP jobd` makes it again, or logs what to do)\n"
    )


def test_remote_error_takes_the_stable_token_from_data() -> None:
    error = {"code": -32001, "message": "unknown queue 'x'", "data": {"code": "UNKNOWN_QUEUE", "queue": "x"}}
    exc = RemoteError.from_error(error)
    assert (exc.code, exc.rpc_code, exc.message, exc.data["queue"]) == (
        "UNKNOWN_QUEUE",
        -32001,
        "unknown queue 'x'",
        "x",
    )
    assert RemoteError.from_error({"code": -32601, "message": "no"}).code == "METHOD_NOT_FOUND"


def test_requests_are_one_line_of_utf8() -> None:
    assert encode_message({"a": "é\nb"}) == '{"a":"é\\nb"}\n'.encode()


# -- workflows and instances ------------------------------------------------------------------------------------


def instance(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": 7, "workflow": "nightly", "status": "TERMINATED", "errors": 0}
    base |= {"started_at": "2026-11-29T16:00:00Z", "ended_at": "2026-11-29T16:03:10Z"}
    return base | fields


@pytest.mark.parametrize(
    ("fields", "code"),
    [({}, 0), ({"errors": 2}, 1), ({"status": "EXECUTING"}, 4), ({"status": "EXECUTING", "errors": 1}, 4)],
)
def test_instance_exit_code(fields: dict[str, Any], code: int) -> None:
    assert jobctl.instance_exit_code(instance(**fields)) == code


def test_describe_instance_end() -> None:
    assert jobctl.describe_instance_end(instance()) == "instance 7 (nightly) succeeded in 3m10s"
    assert jobctl.describe_instance_end(instance(errors=1)) == "instance 7 (nightly) ended with 1 error in 3m10s"


TREE = [
    {
        "name": "first",
        "status": None,
        "details": "Condition evaluates to true",  # a job that ran: no error, the ERROR column stays empty
        "tasks": [
            {"name": "a", "status": "TERMINATED", "retval": 0, "progression": 100, "tries": 1, "job_id": None},
            {"name": "b", "status": "EXECUTING", "retval": None, "progression": 40, "tries": 2, "job_id": 12},
        ],
        "subjobs": [
            {
                "name": "after",
                "status": "SKIPPED",
                "details": "Condition evaluates to false",
                "tasks": [{"name": "c", "status": None, "progression": 0, "tries": 0}],
                "subjobs": [],
            }
        ],
    }
]


def test_tree_rows_indent_tasks_and_subjobs() -> None:
    rows = jobctl.tree_rows(TREE)
    assert rows == [
        ["job first", "-", "", "", "", "", ""],
        ["  task a", "TERMINATED", "100%", "0", "1", "-", ""],
        ["  task b", "EXECUTING", "40%", "-", "2", "12", ""],
        ["  job after", "SKIPPED", "", "", "", "", "Condition evaluates to false"],
        ["    task c", "-", "-", "-", "-", "-", ""],
    ]


def test_instance_progress_line() -> None:
    line = jobctl.render_instance_progress(instance(status="EXECUTING", errors=1, jobs=TREE), 100)
    # The skipped job's task will never run: it is done and weighs 100, as in jobd's own instance progress.
    assert line == "instance 7 [################----]  80% EXECUTING  2/3 tasks done, 1 running, 1 error"
    assert len(jobctl.render_instance_progress(instance(jobs=TREE), 30)) == 29


def test_launch_params() -> None:
    args = parse("launch", "-p", "a=1", "-p", "b=x=y", "-p", "a=2", "--comment", "c", "wf")
    assert jobctl.launch_params(args) == {"workflow": "wf", "parameters": {"a": "2", "b": "x=y"}, "comment": "c"}
    assert jobctl.launch_params(parse("launch", "wf")) == {"workflow": "wf"}
    with pytest.raises(jobctl.UsageError):
        jobctl.launch_params(parse("launch", "--timeout", "3", "wf"))


def test_every_command_is_in_the_documentation_table() -> None:
    text = (Path(__file__).parent.parent / "docs" / "jobctl.md").read_text()
    commands = jobctl.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"| `{name}" in text or f"`, `{name}" in text, name


def test_result_shapes_name_jobd_methods_and_say_where_a_result_differs() -> None:
    from jobd.api import METHODS
    from jobd.client import ProtocolError
    from jobd.replyshape import RESULTS, checked_result

    assert set(RESULTS) <= set(METHODS)  # a misspelt method would never be checked
    job = {"id": 7, "state": "queued", "queue": "q", "added_by_a_later_jobd": 1}
    assert checked_result("job.get", {**job, "tries": []}, "S") == {**job, "tries": []}
    assert checked_result("ping", ["not checked"], "S") == ["not checked"]
    for method, result, where in [
        (
            "job.list",
            {"jobs": [job, {**job, "state": None}], "next_before": None},
            "result.jobs[1].state is null, not a string",
        ),
        ("job.list", {"jobs": [job], "next_before": "3"}, "result.next_before is a string, not an integer or null"),
        ("job.get", {**job, "tries": [3]}, "result.tries[0] is an integer, not an object"),
        ("job.submit", {**job, "id": True}, "result.id is a boolean, not an integer"),
        ("daemon.reload", {"files": ["a", 1]}, "result.files[1] is an integer, not a string"),
        ("schedule.trigger", {"schedule": {}, "started": True}, "result.schedule.name is missing"),
    ]:
        with pytest.raises(ProtocolError) as caught:
            checked_result(method, result, "/run/other.sock")
        assert str(caught.value).startswith(f"/run/other.sock answered {method} with something jobd does not send")
        assert f"({where})" in str(caught.value), caught.value


def test_daemon_status_shows_config_files_only_when_jobd_sent_them() -> None:
    """jobd sends config_files to admins only: anyone else saw an empty `config files:` heading."""
    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    base = {"version": "1", "pid": 7, "started_at": "2026-11-30T11:00:00Z", "durability": "crash", "jobs": {}}
    assert not any(line.startswith("config files") for line in render_daemon_status(base, now))
    admin = render_daemon_status({**base, "config_files": ["/etc/jobd/jobd.toml"]}, now)
    assert admin[-2:] == ["config files:", "  /etc/jobd/jobd.toml"]
    assert render_daemon_status({**base, "config_files": []}, now)[-2:] == ["config files:", "  (none: the defaults)"]


def test_daemon_status_shows_each_problem_of_a_failed_reload_on_its_own_line() -> None:
    """A reload that failed for two problems showed them on one line, joined by an escaped newline (`\\n`)."""
    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    error = "/etc/jobd/jobd.d/a.toml:2: queue.a.concurrency: bad\n/etc/jobd/workflows/w.xml: not well-formed"
    status = {
        "version": "1",
        "pid": 7,
        "started_at": "2026-11-30T11:00:00Z",
        "durability": "crash",
        "jobs": {},
        "last_reload": {"at": "2026-11-30T11:59:00Z", "ok": False, "error": error},
    }
    lines = render_daemon_status(status, now)
    at = next(index for index, line in enumerate(lines) if line.startswith("last reload:"))
    assert lines[at].endswith("failed: /etc/jobd/jobd.d/a.toml:2: queue.a.concurrency: bad (and 1 more, below)")
    assert lines[at + 1] == "  /etc/jobd/workflows/w.xml: not well-formed"
    assert lines[at + 2].startswith("jobs:")


def test_daemon_status_shows_why_the_database_takes_no_writes_and_the_writes_a_bug_fails() -> None:
    """daemon.status's store_trouble and store_internal_error were not shown by jobctl status: only the journal and
    systemd's status line said that ended jobs kept their slots for want of a write."""
    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    base = {"version": "1", "pid": 7, "started_at": "2026-11-30T11:00:00Z", "durability": "crash", "jobs": {}}
    quiet = render_daemon_status({**base, "store_trouble": None, "store_internal_error": None}, now)
    assert quiet == render_daemon_status(base, now)
    assert not any(line.startswith(("store:", "internal error:")) for line in quiet)
    failing = {"writes": 3, "error": "cannot record the end of job 17: OperationalError: malformed JSON"}
    status = {**base, "store_trouble": "database or disk is full", "store_internal_error": failing}
    lines = render_daemon_status(status, now)
    assert "store:          takes no writes: database or disk is full" in lines, lines
    assert (
        "internal error: 3 writes failing (see jobd's log), the first: cannot record the end of job 17: "
        "OperationalError: malformed JSON"
    ) in lines, lines


def documented_command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv) of each jobctl command the documentation shows as typed: the `sh` lines and the `$ ` lines of
    the `console` blocks of README.md and docs/jobctl.md, and the `$ ` lines of jobctl(1)'s EXAMPLES, split as a
    shell splits them (`a | b`, `a && b`, `x=$(a)`, `if a; then ...`). A shell variable stands for an id: `"$id"`
    is taken as 1; redirections are dropped."""
    repo = Path(__file__).parent.parent
    typed: list[tuple[str, str]] = []
    for name in ("README.md", "docs/jobctl.md"):
        for kind, block in re.findall(r"```(sh|console)\n(.*?)```", (repo / name).read_text(), re.DOTALL):
            lines = block.splitlines()
            typed += [(name, line.removeprefix("$ ")) for line in lines if kind == "sh" or line.startswith("$ ")]
    man = (repo / "man" / "jobctl.1").read_text().split(".Sh EXAMPLES", 1)[1].split("\n.Sh ", 1)[0]
    typed += [
        ("jobctl.1", line.strip().removeprefix("$ ")) for line in man.splitlines() if line.strip().startswith("$ ")
    ]
    commands = []
    for where, line in typed:
        line = re.sub(r'"?\$\w+"?', "1", re.sub(r"\s\d?>&?\S*", "", line.replace("\\-", "-")))
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True  # words end at blanks and operators only, as in a shell (`SIZE=25%` is one)
        words = list(lexer)
        if "#" in words:  # a comment
            words = words[: words.index("#")]
        command: list[str] = []
        for word in [*words, ";"]:
            if not set(word) <= set("();<>|&"):
                command.append(word)
                continue
            while command and command[0] in ("if", "then", "!"):
                command.pop(0)
            if command and command[0] == "jobctl":
                commands.append((where, command))
            command = []
    return commands


def test_every_jobctl_command_line_the_documentation_shows_is_one_jobctl_takes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A documented example with an option jobctl does not have (renamed, removed, misspelt) is refused by the same
    parser a user's shell would hand it to."""
    commands = documented_command_lines()
    assert len(commands) > 40, commands  # the examples are found
    refused = []
    for where, argv in commands:
        try:
            jobctl._parse(jobctl.build_parser(), argv[1:])
        except SystemExit:
            refused.append(f"{where}: {shlex.join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert refused == []


class InterruptedAtFlush:
    """A terminal stream where Ctrl-C comes as a write has just reached the terminal: its flush raises, as Python
    raises KeyboardInterrupt at the first bytecode after the flush's system call."""

    def __init__(self) -> None:
        self.written = ""
        self.interrupt = True

    def write(self, text: str) -> int:
        self.written += text
        return len(text)

    def flush(self) -> None:
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt


def test_a_bar_interrupted_as_it_is_drawn_is_still_cleared() -> None:
    """`jobctl wait` on a terminal, Ctrl-C as the bar's line is written: the bar is taken away, not left for the
    shell's prompt to follow (the bar was noted as shown only after its write, and clear() found nothing to clear)."""
    stream = InterruptedAtFlush()
    bar = jobctl.ProgressBar(stream, redraws=True)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        try:
            bar.draw("job 1 [----------]   0% running")
        finally:
            bar.clear()
    assert stream.written == "\rjob 1 [----------]   0% running\x1b[K\r\x1b[K"


def test_daemon_status_shows_jobds_uptime_not_the_clocks_difference() -> None:
    """The "up" line shows jobd's uptime_seconds (counted on the boot clock): with the clock set back a day since jobd
    started, the wall clock's difference from started_at is negative, and jobctl showed "0ms" for a jobd up an hour."""
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)  # a day before the start, as the clock now says
    status = {"version": "1", "pid": 7, "started_at": "2026-11-30T11:00:00Z", "durability": "crash", "jobs": {}}
    lines = render_daemon_status({**status, "uptime_seconds": 3600.5}, now)
    assert next(line for line in lines if line.startswith("up:")).startswith("up:          1h00m (since "), lines
    # A jobd that does not say it (older, or not jobd): the difference, as before.
    later = dt.datetime(2026, 11, 30, 11, 0, 30, tzinfo=dt.UTC)
    lines = render_daemon_status(status, later)
    assert next(line for line in lines if line.startswith("up:")).startswith("up:          30.0s (since "), lines
