"""jobctl, jobd's command line: turns subcommands into JSON-RPC calls and replies into tables or JSON.

The formatting helpers at the top are pure (they take `now` and widths as arguments) so they can be tested
without a daemon; the commands below them only call the API and print.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import errno
import io
import json
import math
import os
import re
import shlex
import signal
import stat
import sys
import unicodedata
from collections.abc import Callable, Collection, Iterable, Sequence
from types import FrameType, TracebackType
from typing import Any, TextIO

from jobd import __version__, logline
from jobd.client import (
    Client,
    ConnectError,
    ConnectionClosed,
    EmptySocketVariable,
    EncodeError,
    ProtocolError,
    RemoteError,
    Reply,
    default_socket_path,
    woken_by_signals,
)
from jobd.localzone import local_zone
from jobd.model import (
    ENV_NAME,
    FINISHED_STATES,
    MAX_PAGE,
    MAX_PRIORITY,
    MAX_RETRY_TIMES,
    MAX_SECONDS,
    JobState,
    RetryPolicy,
)
from jobd.replyshape import checked_result
from jobd.terminal_text import TerminalStream, terminal_text
from jobd.wakeup_io import read_to_end, write_all

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1  # the daemon answered with an error
EXIT_USAGE = 2
EXIT_CANNOT_CONNECT = 3  # also: the connection broke, or the peer does not speak jobd's JSON-RPC
EXIT_STILL_RUNNING = 4  # wait --timeout elapsed before the job (or launch --wait: the instance) finished
EXIT_INSTANCE_ERRORS = 1  # launch --wait: the instance ended with errors
EXIT_JOB_FAILED = 1  # a failure with neither exit code nor signal (spawn error, lost)
EXIT_JOB_TIMED_OUT = 124  # as timeout(1)
EXIT_JOB_CANCELLED = 125
EXIT_SIGNAL_BASE = 128  # killed by signal N: 128+N, as shells report it
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # stdout closed early (`jobctl log 4 | head`): what SIGPIPE would have made of us
EXIT_OUTPUT_ERROR = 74  # stdout could not be written (a full disk, an I/O error): sysexits' EX_IOERR

OUTPUT_CHUNK = 64 * 1024
COLUMN_GAP = "  "
ELLIPSIS = "…"

Job = dict[str, Any]


class UsageError(Exception):
    """A command line argparse accepted but that makes no sense (exit 2)."""


# -- pure formatting ------------------------------------------------------------------------------------------


def parse_time(value: str | None) -> dt.datetime | None:
    """An API time (ISO 8601 UTC, `Z` suffix) as an aware datetime; None stays None."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value)


def format_time(value: str | None, now: dt.datetime) -> str:
    """Short local time for tables: "17:03:12" if it is on `now`'s day, else the date."""
    return _time_of_day_or(value, now, "%Y-%m-%d")


def format_due(value: str | None, now: dt.datetime) -> str:
    """A time to come, for tables: "02:30:00" if it is on `now`'s day, else the date and the time of day (a
    nightly run's date alone would not say when it runs)."""
    return _time_of_day_or(value, now, "%Y-%m-%d %H:%M")


def _time_of_day_or(value: str | None, now: dt.datetime, other_day: str) -> str:
    """The local time of day if `value` is on `now`'s day, else `other_day` (a strftime format); "-" for none."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    local = moment.astimezone(now.tzinfo)
    return local.strftime("%H:%M:%S" if local.date() == now.date() else other_day)


def format_timestamp(value: str | None, tz: dt.tzinfo | None = None) -> str:
    """Full local time for detail views, to the second, with the zone's abbreviation ("CET", "CEST"): the hour a
    fall-back to winter time repeats is told apart, and a reader elsewhere knows whose time it is."""
    moment = parse_time(value)
    if moment is None:
        return "-"
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def format_duration(seconds: float | None) -> str:
    """ "45ms", "1.5s", "2m03s", "1h02m", "3d04h"; "-" for unknown."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 0.1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def duration_between(start: str | None, end: str | None) -> float | None:
    begin, finish = parse_time(start), parse_time(end)
    if begin is None or finish is None:
        return None
    return (finish - begin).total_seconds()


def format_kib(kib: int | None) -> str:
    if kib is None:
        return "-"
    if kib < 1024:
        return f"{kib}KiB"
    if kib < 1024 * 1024:
        return f"{kib / 1024:.1f}MiB"
    return f"{kib / (1024 * 1024):.1f}GiB"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def format_exit(exit_code: int | None, signum: int | None) -> str:
    """What ended a process: its exit code, or the signal that killed it."""
    if exit_code is not None:
        return str(exit_code)
    if signum is not None:
        return signal_name(signum)
    return "-"


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def job_label(job: Job) -> str:
    """The task's name, or the ad-hoc command line."""
    task = job.get("task")
    if task:
        return str(task)
    return format_command(job.get("command") or [])


def format_progress(job: Job) -> str:
    progress = job.get("progress") or 0
    if job.get("state") == JobState.RUNNING or progress:
        return f"{progress}%"
    return "-"


def columns(text: str) -> int:
    """The terminal columns `text` takes: East Asian wide and full-width characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def truncate(text: str, width: int) -> str:
    """`text` cut to at most `width` terminal columns, with an ellipsis if it was cut."""
    if columns(text) <= width:
        return text
    room = width - columns(ELLIPSIS) if width > columns(ELLIPSIS) else width
    kept, used = [], 0
    for c in text:
        used += columns(c)
        if used > room:
            break
        kept.append(c)
    return "".join(kept) + (ELLIPSIS if width > columns(ELLIPSIS) else "")


def pad(text: str, width: int, *, right: bool = False) -> str:
    """`text` padded with spaces to `width` terminal columns."""
    fill = " " * max(0, width - columns(text))
    return fill + text if right else text + fill


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: Collection[int] = (),
    width: int | None = None,
    flex: int | None = None,
) -> list[str]:
    """Aligned columns separated by two spaces. If `width` is given, column `flex` is cut to make rows fit.

    Cells are shown with their control characters escaped: they carry what clients and jobs sent (a command's
    arguments, a context), which must not drive the terminal."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max([columns(h)] + [columns(row[i]) for row in rows]) for i, h in enumerate(headers)]
    if width is not None and flex is not None:
        others = sum(w for i, w in enumerate(widths) if i != flex) + len(COLUMN_GAP) * (len(widths) - 1)
        widths[flex] = max(columns(headers[flex]), min(widths[flex], width - others))
        rows = [[truncate(cell, widths[flex]) if i == flex else cell for i, cell in enumerate(row)] for row in rows]

    def line(cells: Sequence[str]) -> str:
        padded = (pad(c, w, right=i in right) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return COLUMN_GAP.join(padded).rstrip()

    return [line(headers)] + [line(row) for row in rows]


def render_fields(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """`key: value` lines with the values aligned, control characters escaped (see render_table)."""
    width = max((len(key) for key, _ in pairs), default=0) + 1
    return [f"{key + ':':<{width}} {printable(value)}" for key, value in pairs]


def render_progress_bar(job_id: int, state: str, progress: int, width: int, note: str = "") -> str:
    """One terminal line: `job 42 [########------------]  40% running  last log line`, at most width-1 wide."""
    bar_width = 20 if width >= 60 else 10
    filled = max(0, min(bar_width, round(bar_width * progress / 100)))
    text = f"job {job_id} [{'#' * filled}{'-' * (bar_width - filled)}] {progress:>3}% {state}"
    if note:
        text += f"  {printable(note)}"  # a job's log line: it must not drive the terminal either
    # One column short of the edge: writing the last column makes some terminals wrap, breaking the \r redraw.
    return truncate(text, max(1, width - 1))


def wait_label(job: Job) -> str:
    """The state as the progress bar names it, with the attempt once retries are involved."""
    state = str(job.get("state"))
    attempts = job.get("attempts") or 0
    if state == JobState.RUNNING and attempts > 1:
        return f"running (attempt {attempts})"
    if state in (JobState.DELAYED, JobState.QUEUED) and attempts >= 1:
        return f"{state} for attempt {attempts + 1}"
    return state


def is_finished(job: Job) -> bool:
    return job.get("state") in FINISHED_STATES


def exit_code_for(job: Job) -> int:
    """What `jobctl wait` exits with for this job (see docs/jobctl.md, "Exit codes")."""
    state = job.get("state")
    if not is_finished(job):
        return EXIT_STILL_RUNNING
    if state == JobState.SUCCEEDED:
        return EXIT_OK
    if state == JobState.TIMED_OUT:
        return EXIT_JOB_TIMED_OUT
    if state == JobState.CANCELLED:
        return EXIT_JOB_CANCELLED
    exit_code, signum = job.get("exit_code"), job.get("signal")
    if isinstance(exit_code, int) and 0 < exit_code <= 255:
        return exit_code
    if isinstance(signum, int) and signum > 0:
        return min(EXIT_SIGNAL_BASE + signum, 255)
    return EXIT_JOB_FAILED


def describe_end(job: Job) -> str:
    """The line `wait` prints for people once a job has finished."""
    state = job.get("state")
    head = f"job {job.get('id')}"
    took = duration_between(job.get("started_at"), job.get("finished_at"))  # of the last attempt
    attempts = job.get("attempts") or 0
    if state == JobState.SUCCEEDED:
        # The time is the successful attempt's alone: "(3 attempts)" after it read as the time of all three.
        on = f" on attempt {attempts}" if attempts > 1 else ""
        return f"{head} succeeded{on} in {format_duration(took)}"
    if state == JobState.TIMED_OUT:
        text = f"{head} timed out after {format_duration(job.get('timeout') or took)}"
    elif state == JobState.CANCELLED:
        text = f"{head} cancelled"
    else:
        text = f"{head} {state}: {failure_reason(job)}"
    return f"{text} ({plural(attempts, 'attempt')})" if attempts > 1 else text


def failure_reason(job: Job) -> str:
    if job.get("exit_code") is not None:
        return f"exit code {job['exit_code']}"
    if job.get("signal") is not None:
        return f"killed by {signal_name(job['signal'])}"
    return str(job.get("error") or "no exit code")


def describe_submitted(job: Job, now: dt.datetime) -> str:
    text = f"job {job.get('id')} {job.get('state')} in {job.get('queue')}"
    if job.get("state") == JobState.DELAYED:
        text += f" until {format_time(job.get('run_at'), now)}"
    if job.get("new") is False:  # its key named a job made before: that one, as it is now (absent from an older jobd)
        text += f" (already submitted with key {job.get('key')!r}: not submitted again)"
    return text


def format_retry(retry: Any) -> str:
    if not isinstance(retry, dict) or not retry.get("times"):
        return "no"
    text = f"{plural(retry['times'], 'time')}, delay {format_duration(retry.get('delay'))}"
    text += f", backoff x{retry.get('backoff')}"
    if retry.get("on_exit_codes"):
        text += ", on exit codes " + ",".join(str(c) for c in retry["on_exit_codes"])
    return text


def job_fields(job: Job, tz: dt.tzinfo | None = None) -> list[tuple[str, str]]:
    def text(value: Any) -> str:
        return "-" if value is None or value == "" else str(value)

    return [
        ("id", text(job.get("id"))),
        ("state", text(job.get("state"))),
        ("progress", format_progress(job)),
        ("task", text(job.get("task"))),
        ("command", format_command(job.get("command") or [])),
        ("queue", text(job.get("queue"))),
        ("priority", text(job.get("priority"))),
        ("context", text(job.get("context"))),
        ("key", text(job.get("key"))),
        ("attempts", text(job.get("attempts"))),
        ("exit", format_exit(job.get("exit_code"), job.get("signal"))),
        ("error", text(job.get("error"))),
        ("timeout", format_duration(job.get("timeout"))),
        ("retry", format_retry(job.get("retry"))),
        ("created", format_timestamp(job.get("created_at"), tz)),
        ("run at", format_timestamp(job.get("run_at"), tz)),
        ("started", format_timestamp(job.get("started_at"), tz)),
        ("finished", format_timestamp(job.get("finished_at"), tz)),
    ]


def render_tries(tries: Sequence[dict[str, Any]], now: dt.datetime) -> list[str]:
    headers = ["#", "OUTCOME", "EXIT", "WALL", "CPU", "MAX RSS", "STARTED"]
    rows = [
        [
            str(t.get("number")),
            t.get("outcome") or "running",
            format_exit(t.get("exit_code"), t.get("signal")),
            format_duration(t.get("wall_seconds")),
            format_duration(cpu_seconds(t)),
            format_kib(t.get("max_rss_kib")),
            format_time(t.get("started_at"), now),
        ]
        for t in tries
    ]
    return render_table(headers, rows, right={0, 2, 3, 4, 5})


def cpu_seconds(attempt: dict[str, Any]) -> float | None:
    user, system = attempt.get("cpu_user"), attempt.get("cpu_system")
    if user is None and system is None:
        return None
    return float(user or 0) + float(system or 0)


def render_jobs(jobs: Sequence[Job], now: dt.datetime, width: int | None) -> list[str]:
    headers = ["ID", "STATE", "QUEUE", "TASK/COMMAND", "PRIO", "PROGRESS", "CREATED"]
    rows = [
        [
            str(job.get("id")),
            str(job.get("state")),
            str(job.get("queue")),
            job_label(job),
            str(job.get("priority")),
            format_progress(job),
            format_time(job.get("created_at"), now),
        ]
        for job in jobs
    ]
    return render_table(headers, rows, right={0, 4, 5}, width=width, flex=3)


def queue_status(queue: dict[str, Any]) -> str:
    flags = [name for name in ("paused", "closed") if queue.get(name)]
    return ",".join(flags) if flags else "-"


def render_queues(queues: Sequence[dict[str, Any]]) -> list[str]:
    headers = ["NAME", "CONCURRENCY", "SCHEDULER", "RUNNING", "QUEUED", "DELAYED", "PAUSED/CLOSED"]
    keys = ["name", "concurrency", "scheduler", "running", "queued", "delayed"]
    rows = [[str(q.get(key, "-")) for key in keys] + [queue_status(q)] for q in queues]
    return render_table(headers, rows, right={1, 3, 4, 5})


def format_job_counts(counts: dict[str, int]) -> str:
    """Counts in the order of the job's life (delayed … cancelled), then any state this jobctl does not know."""
    order = [str(state) for state in JobState] + sorted(set(counts) - {str(s) for s in JobState})
    parts = [f"{counts[state]} {state}" for state in order if counts.get(state)]
    return ", ".join(parts) if parts else "none"


def render_daemon_status(status: dict[str, Any], now: dt.datetime) -> list[str]:
    uptime = status.get("uptime_seconds")  # jobd's own count, which a clock set since its start leaves right
    if not isinstance(uptime, int | float) or isinstance(uptime, bool):
        uptime = duration_between(status.get("started_at"), now.isoformat())  # a jobd that does not say it
    fields = [
        ("jobd", f"{status.get('version')}, pid {status.get('pid')}"),
        ("up", f"{format_duration(uptime)} (since {format_timestamp(status.get('started_at'), now.tzinfo)})"),
        ("durability", str(status.get("durability"))),
        ("last reload", format_last_reload(status.get("last_reload"), now)),
        ("jobs", format_job_counts(status.get("jobs") or {})),
    ]
    if status.get("store_trouble"):  # the database takes no writes (a full disk): jobs keep their slots meanwhile
        fields.append(("store", f"takes no writes: {status['store_trouble']}"))
    failing = status.get("store_internal_error")
    if isinstance(failing, dict):  # writes a bug of jobd's fails, tried again every 2 s: its log has the traceback
        writes, error = failing.get("writes"), failing.get("error")
        fields.append(("internal error", f"{writes} writes failing (see jobd's log), the first: {error}"))
    suspended = status.get("suspended_schedules")
    if suspended:  # they fire no more: the run that "did not happen"
        fields.append(
            ("schedules", f"suspended after a failed run: {', '.join(suspended)} (jobctl schedule enable NAME)")
        )
    lines = render_fields(fields)
    below = [key for key, _ in fields].index("last reload") + 1
    lines[below:below] = _problems_below(status.get("last_reload"))
    if "config_files" in status:  # an admin's: jobd sends them to no one else
        lines += ["config files:"] + [f"  {name}" for name in status["config_files"] or ["(none: the defaults)"]]
    queues = status.get("queues") or []
    if queues:
        lines += ["queues:"] + ["  " + line for line in render_queues(queues)]
    return lines


def format_last_reload(reload: Any, now: dt.datetime) -> str:
    if not isinstance(reload, dict) or not reload.get("at"):
        return "never"
    when = format_time(reload.get("at"), now)
    if reload.get("ok"):
        return f"{when}, ok"
    first, *more = str(reload.get("error")).splitlines() or [""]
    return f"{when}, failed: {first}" + (f" (and {len(more)} more, below)" if more else "")


def _problems_below(reload: Any) -> list[str]:
    """Each problem of a failed reload after its first, on a line of its own below `last reload`, as `jobctl
    reload` prints them (in one line they read as one, joined by escaped newlines)."""
    if not isinstance(reload, dict) or reload.get("ok") or not reload.get("at"):
        return []
    return [f"  {printable(problem)}" for problem in str(reload.get("error")).splitlines()[1:]]


STDIN_BLAMED_FROM = 512 * 1024  # bytes of a request's 1 MiB: an input smaller than that is not what made it too big


def describe_stdin(stdin_file: str, params: dict[str, Any]) -> str:
    """What a --stdin-file weighed, and what fits in a request: for a FRAME_TOO_LARGE about it."""
    name = "- (jobctl's standard input)" if stdin_file == "-" else stdin_file
    binary = "stdin_base64" in params
    size = len(base64.b64decode(params["stdin_base64"])) if binary else len(str(params.get("stdin", "")).encode())
    if (size * 4 // 3 if binary else size) < STDIN_BLAMED_FROM:  # the input is not what made the request too large
        return (
            f"--stdin-file {name} is only {size} bytes: the command, its arguments or its environment make up the "
            "rest of the request"
        )
    if binary:
        return f"--stdin-file {name} is {size} bytes of binary input; it must stay below about 750 KiB"
    return f"--stdin-file {name} is {size} bytes of text; it must stay below about 1 MiB (750 KiB if binary)"


def stdin_params(data: bytes) -> dict[str, str]:
    """`stdin` when the bytes are UTF-8 text (readable in job.get dumps), else `stdin_base64`."""
    try:
        return {"stdin": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"stdin_base64": base64.b64encode(data).decode("ascii")}


# -- workflows and instances (pure) ---------------------------------------------------------------------------

Instance = dict[str, Any]
INSTANCE_EXECUTING = "EXECUTING"
INSTANCE_TERMINATED = "TERMINATED"
INSTANCE_ABORTED = "ABORTED"
INSTANCE_SKIPPED = "SKIPPED"


def instance_exit_code(instance: Instance) -> int:
    """What `launch --wait` exits with: 0 ended without errors, 1 ended with errors, 4 still executing."""
    if instance.get("status") != INSTANCE_TERMINATED:
        return EXIT_STILL_RUNNING
    return EXIT_OK if not instance.get("errors") else EXIT_INSTANCE_ERRORS


def describe_launched(instance: Instance) -> str:
    return f"instance {instance.get('id')} launched: {instance.get('workflow')}"


def describe_instance_end(instance: Instance) -> str:
    """The line `launch --wait` prints for people once the instance has ended."""
    took = format_duration(duration_between(instance.get("started_at"), instance.get("ended_at")))
    head = f"instance {instance.get('id')} ({instance.get('workflow')})"
    errors = instance.get("errors") or 0
    if errors:
        return f"{head} ended with {plural(errors, 'error')} in {took}"
    return f"{head} succeeded in {took}"


def format_parameters(parameters: Any) -> str:
    if not isinstance(parameters, dict) or not parameters:
        return "-"
    return " ".join(shlex.quote(f"{name}={value}") for name, value in parameters.items())


def instance_fields(instance: Instance, tz: dt.tzinfo | None = None) -> list[tuple[str, str]]:
    def text(value: Any) -> str:
        return "-" if value is None or value == "" else str(value)

    took = duration_between(instance.get("started_at"), instance.get("ended_at"))
    return [
        ("id", text(instance.get("id"))),
        ("workflow", text(instance.get("workflow"))),
        ("status", text(instance.get("status"))),
        ("errors", text(instance.get("errors"))),
        ("parameters", format_parameters(instance.get("parameters"))),
        ("comment", text(instance.get("comment"))),
        ("tags", ", ".join(str(tag) for tag in instance.get("tags") or []) or "-"),
        ("started", format_timestamp(instance.get("started_at"), tz)),
        ("ended", format_timestamp(instance.get("ended_at"), tz)),
        ("took", format_duration(took)),
    ]


TREE_INDENT = "  "


def tree_rows(jobs: Sequence[dict[str, Any]], depth: int = 0) -> list[list[str]]:
    """Rows of the instance tree: a job, its tasks one level in, then its subjobs (as deep as they nest)."""

    def text(value: Any) -> str:
        return "-" if value is None or value == "" else str(value)

    rows: list[list[str]] = []
    for job in jobs:
        # A job that ran has no status, and its details are "Condition evaluates to true": no error to show.
        details = job.get("details") if job.get("status") else None
        note = "; ".join(str(part) for part in (job.get("error"), details) if part)
        rows.append(
            [TREE_INDENT * depth + f"job {job.get('name') or '-'}", text(job.get("status"))] + [""] * 4 + [note]
        )
        for task in job.get("tasks") or []:
            started = task.get("status") is not None
            rows.append(
                [
                    TREE_INDENT * (depth + 1) + f"task {task.get('name') or '-'}",
                    text(task.get("status")),
                    f"{task.get('progression') or 0}%" if started else "-",
                    text(task.get("retval")),
                    str(task.get("tries") or 0) if task.get("tries") else "-",
                    text(task.get("job_id")),
                    str(task.get("error") or ""),
                ]
            )
        rows += tree_rows(job.get("subjobs") or [], depth + 1)
    return rows


def render_instance_tree(jobs: Sequence[dict[str, Any]], width: int | None = None) -> list[str]:
    headers = ["JOB/TASK", "STATUS", "PROGRESS", "RETVAL", "TRIES", "JOBD JOB", "ERROR"]
    return render_table(headers, tree_rows(jobs), right={2, 3, 4, 5}, width=width, flex=6)


def render_instance(instance: Instance, now: dt.datetime, width: int | None = None) -> list[str]:
    lines = render_fields(instance_fields(instance, now.tzinfo))
    jobs = instance.get("jobs") or []
    if jobs:
        lines += ["", *render_instance_tree(jobs, width)]
    return lines


def tree_tasks(jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for job in jobs:
        tasks += job.get("tasks") or []
        tasks += tree_tasks(job.get("subjobs") or [])
    return tasks


def tree_task_fates(jobs: Sequence[dict[str, Any]], dead: bool = False) -> list[tuple[dict[str, Any], bool]]:
    """Every task of the tree, each with whether it will never run because a job above it was SKIPPED or ABORTED
    (a job whose condition was false, or a loop job that never ran, leaves its tasks without a status)."""
    fates: list[tuple[dict[str, Any], bool]] = []
    for job in jobs:
        gone = dead or job.get("status") in (INSTANCE_SKIPPED, INSTANCE_ABORTED)
        fates += [(task, gone) for task in job.get("tasks") or []]
        fates += tree_task_fates(job.get("subjobs") or [], gone)
    return fates


def render_instance_progress(instance: Instance, width: int) -> str:
    """One terminal line: `instance 7 [######--------------]  30% EXECUTING  1/3 tasks done, 1 running`.

    The percentage is the instance's progress as jobd reckons it while it executes (the `progress` of its events):
    the mean over the tasks the document holds so far (loops may add more) of 100 for a task that is done (it has
    ended, was skipped, or will never run because a job above it was skipped or aborted), its progression while it
    runs, else 0. So a finished instance whose conditions left tasks out shows 100% and all its tasks done. (A task
    waiting to be retried is TERMINATED in the tree, without its retry_at: it is done here, where jobd counts it 0.)
    """
    fates = tree_task_fates(instance.get("jobs") or [])
    done = running = weight = 0
    for task, dead in fates:
        status = task.get("status")
        if dead or status in (INSTANCE_TERMINATED, INSTANCE_ABORTED, INSTANCE_SKIPPED):
            done += 1
            weight += 100
        elif status == INSTANCE_EXECUTING:
            running += 1
            weight += max(0, min(100, int(task.get("progression") or 0)))
    progress = weight // len(fates) if fates else 0
    bar_width = 20 if width >= 60 else 10
    filled = round(bar_width * progress / 100)
    text = f"instance {instance.get('id')} [{'#' * filled}{'-' * (bar_width - filled)}] {progress:>3}%"
    text += f" {instance.get('status')}  {done}/{plural(len(fates), 'task')} done"
    if running:
        text += f", {running} running"
    errors = instance.get("errors") or 0
    if errors:
        text += f", {plural(errors, 'error')}"
    return truncate(text, max(1, width - 1))


def render_instances(instances: Sequence[Instance], now: dt.datetime, width: int | None) -> list[str]:
    headers = ["ID", "WORKFLOW", "STATUS", "ERRORS", "STARTED", "TOOK", "PARAMETERS", "COMMENT"]
    rows = [
        [
            str(instance.get("id")),
            str(instance.get("workflow")),
            str(instance.get("status")),
            str(instance.get("errors") or 0),
            format_time(instance.get("started_at"), now),
            format_duration(duration_between(instance.get("started_at"), instance.get("ended_at"))),
            format_parameters(instance.get("parameters")),
            str(instance.get("comment") or "-"),
        ]
        for instance in instances
    ]
    return render_table(headers, rows, right={0, 3, 5}, width=width, flex=7)


def render_workflows(workflows: Sequence[dict[str, Any]], width: int | None) -> list[str]:
    """NAME and PARAMETERS, then GROUP and COMMENT (those of evQueue's git files) when any workflow has one: most
    definitions are plain, and two columns of `-` would say nothing. A long comment is cut to fit `width`."""
    headers = ["NAME", "PARAMETERS"]
    rows = [[str(w.get("name")), " ".join(str(p) for p in w.get("parameters") or []) or "-"] for w in workflows]
    for key in ("group", "comment"):
        if any(w.get(key) for w in workflows):
            headers.append(key.upper())
            for row, w in zip(rows, workflows, strict=True):
                row.append(str(w.get(key) or "-"))
    flex = len(headers) - 1 if headers[-1] == "COMMENT" else None
    return render_table(headers, rows, width=width, flex=flex)


def render_tasks(tasks: Sequence[dict[str, Any]]) -> list[str]:
    rows = [[str(t.get("name")), str(t.get("queue")), str(t.get("parameters"))] for t in tasks]
    return render_table(["NAME", "QUEUE", "PARAMETERS"], rows)


def schedule_target(schedule: dict[str, Any]) -> str:
    target = schedule.get("target") or {}
    return f"{target.get('kind', '?')} {target.get('name', '?')}"


def schedule_last(schedule: dict[str, Any], now: dt.datetime) -> str:
    """When it last ran and how that run ended (`running` while it goes)."""
    if not schedule.get("last_run"):
        return "-"
    result = schedule.get("last_result") or "running"
    return f"{format_time(schedule.get('last_run'), now)} {result}"


def render_schedules(schedules: Sequence[dict[str, Any]], now: dt.datetime, width: int | None) -> list[str]:
    headers = ["NAME", "TARGET", "CALENDAR", "STATE", "NEXT", "LAST", "OVERLAP"]
    rows = [
        [
            str(schedule.get("name")),
            schedule_target(schedule),
            str(schedule.get("calendar")),
            str(schedule.get("state")),
            format_due(schedule.get("next_run"), now),
            schedule_last(schedule, now),
            str(schedule.get("overlap")),
        ]
        for schedule in schedules
    ]
    return render_table(headers, rows, width=width, flex=2)


def describe_triggered(result: dict[str, Any]) -> str:
    name = (result.get("schedule") or {}).get("name")
    if result.get("started"):
        kind = (result.get("schedule") or {}).get("target", {}).get("kind")
        what = "instance" if kind == "workflow" else "job"
        return f"schedule {name} triggered: {what} {result.get('run_id')}"
    if result.get("queued"):
        return f"schedule {name}: queued behind its running run (overlap queue_one)"
    schedule = result.get("schedule") or {}
    if schedule.get("overlap") == "queue_one" and schedule.get("pending"):
        return f"schedule {name}: not started, one run already waits behind its running run (overlap queue_one)"
    if schedule.get("last_result") == "error":
        return f"schedule {name}: its run could not be started (see jobd's log)"
    return f"schedule {name}: not started, its previous run is still going (overlap skip)"


def printable(text: str) -> str:
    """`text` with control characters escaped: audit entries carry what clients sent, which must not drive the
    terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def render_audit(entries: Sequence[dict[str, Any]], width: int | None, tz: dt.tzinfo | None = None) -> list[str]:
    headers = ["ID", "TIME", "USER", "UID", "COMMAND", "TARGET", "RESULT", "MESSAGE"]
    rows = [
        [
            str(entry.get("id")),
            format_timestamp(entry.get("at"), tz),
            printable(str(entry.get("user"))),
            "-" if entry.get("uid") is None else str(entry.get("uid")),
            printable(str(entry.get("command"))),
            printable(str(entry.get("target") or "-")),
            str(entry.get("result")),
            printable(str(entry.get("message") or "")),
        ]
        for entry in entries
    ]
    return render_table(headers, rows, right={0, 3}, width=width, flex=7)


# -- argument types -------------------------------------------------------------------------------------------


def assignment(text: str) -> tuple[str, str]:
    """NAME=VALUE (the value may be empty or hold further `=`)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def env_assignment(text: str) -> tuple[str, str]:
    """NAME=VALUE for the job's environment: a name jobd would refuse is a usage error here (exit 2)."""
    name, value = assignment(text)
    if not ENV_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"invalid variable name {name!r} in {text!r}; allowed: A-Z a-z 0-9 _, not starting with a digit"
        )
    return name, value


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for integers from low to high: a value jobd would refuse is a usage error here (exit 2),
    said before anything is sent."""
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return convert


MAX_INTEGER = 2**63 - 1  # what jobd takes for an id or a count (SQLite's integers)
positive_int = int_in(1, MAX_INTEGER)
page_size = int_in(1, MAX_PAGE)
priority = int_in(0, MAX_PRIORITY)


def seconds(text: str, *, above_zero: bool = False) -> float:
    """A number of seconds from 0 (above 0 with `above_zero`) to MAX_SECONDS; the message names that range."""
    allowed = f"above 0 and up to {MAX_SECONDS}" if above_zero else f"from 0 to {MAX_SECONDS}"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    low_ok = value > 0 if above_zero else value >= 0
    if not (low_ok and value <= MAX_SECONDS):  # also refuses nan, for which every comparison is false
        raise argparse.ArgumentTypeError(f"expected a number of seconds {allowed}, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A time limit: 0 would allow no time at all, which jobd refuses."""
    return seconds(text, above_zero=True)


# -- talking to jobd ------------------------------------------------------------------------------------------


# jobd answers every request at once but those that wait by design (job.wait, instance.wait, job.output with
# "wait", and job.cancel, whose reply comes once a running job has ended: after its kill_grace, which has no
# limit): a reply that takes longer than this means jobd is stuck or the socket is not jobd's, and a script that
# calls jobctl should hear so rather than hang (systemctl gives its D-Bus calls 25 s on the same reasoning).
REPLY_TIMEOUT = 60.0
REPLY_TIMEOUT_VARIABLE = "JOBCTL_REPLY_TIMEOUT"  # seconds; 0: wait as long as it takes
# Answered when what they wait for is done, however long that takes (daemon.backup: the copy and its check take
# seconds per GB on a fast disk, minutes for a large database on a slow one).
WAITING_METHODS = frozenset({"job.wait", "instance.wait", "job.cancel", "daemon.backup"})


class NoReply(Exception):
    """No reply within the reply timeout to a request jobd answers at once (exit 3)."""


class CheckedClient(Client):
    """The client jobctl uses: every result is checked against what jobctl reads of it (jobd/replyshape.py), so
    that a socket that is not jobd's is reported as such rather than misread; and a request jobd answers at once
    gets `reply_timeout` seconds (None: no limit)."""

    def __init__(self, path: str, reply_timeout: float | None) -> None:
        super().__init__(path, connect_timeout=reply_timeout)  # a jobd that accepts no connection answers nothing
        self.reply_timeout = reply_timeout

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        waits = method in WAITING_METHODS or bool((params or {}).get("wait"))
        if timeout is None and not waits and self.reply_timeout is not None:
            try:
                result = super().call(method, params, self.reply_timeout)
            except TimeoutError:
                raise NoReply(
                    f"{self.path} gave no reply to {method} within {format_duration(self.reply_timeout)}: is jobd "
                    f"stuck (see its log), or is this not jobd's socket? ({REPLY_TIMEOUT_VARIABLE} sets the limit)"
                ) from None
        else:
            result = super().call(method, params, timeout)
        return checked_result(method, result, self.path)


def reply_timeout_from_environment() -> float | None:
    """The reply timeout: $JOBCTL_REPLY_TIMEOUT seconds if set (0: none), else REPLY_TIMEOUT. Set but empty is
    refused, as an empty JOBD_SOCKET is: a script's `JOBCTL_REPLY_TIMEOUT=$T` with T unset."""
    text = os.environ.get(REPLY_TIMEOUT_VARIABLE)
    if text is None:
        return REPLY_TIMEOUT
    text = text.strip()
    if not text:
        raise UsageError(
            f"{REPLY_TIMEOUT_VARIABLE} is set but empty: expected seconds from 0 (no limit) to {MAX_SECONDS:.0f} "
            f"(unset it for the default, {REPLY_TIMEOUT:.0f})"
        )
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SECONDS:  # also refuses nan and inf
        raise UsageError(f"{REPLY_TIMEOUT_VARIABLE}={text!r}: expected seconds from 0 (no limit) to {MAX_SECONDS:.0f}")
    return seconds or None


@dataclasses.dataclass
class Session:
    """What every command needs: the connection and the output mode."""

    client: Client
    json: bool

    def emit_json(self, value: Any) -> None:
        print(json.dumps(value))

    def emit(self, value: Any, lines: Callable[[], Sequence[str]]) -> None:
        """Prints `value` as JSON with --json, else the lines made for people."""
        if self.json:
            self.emit_json(value)
        else:
            for line in lines():
                print(line)


def local_now() -> dt.datetime:
    """Now in the machine's zone, with its DST rules: the times shown in it take the offset of their own date (a
    next run after a DST change), not today's."""
    return dt.datetime.now(local_zone())


def stdout_width() -> int | None:
    """Columns to fit tables to: the terminal's (or $COLUMNS); None when piped, so nothing is cut."""
    if re.fullmatch("[0-9]+", os.environ.get("COLUMNS", "")):  # not isdigit(): "²" is a digit int() refuses
        return int(os.environ["COLUMNS"])
    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return columns or None


def stderr_width() -> int:
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):
        columns = 0
    return columns or 80  # a fresh pty (no TIOCSWINSZ yet) reports 0 columns


def read_stdin_file(path: str, signal_fd: int | None) -> bytes:
    """The bytes of --stdin-file PATH; `-` is jobctl's standard input, read to its end in a wait that `signal_fd` (the
    signal wake-up pipe) ends too, as the waits for jobd are (jobd.wakeup_io)."""
    try:
        if path == "-":
            if sys.stdin is None:  # jobctl was started with its standard input closed
                raise UsageError("cannot read --stdin-file -: jobctl's standard input is closed")
            return read_to_end(sys.stdin.fileno(), signal_fd)
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read --stdin-file {path}: {exc.strerror}") from None


def common_submit_params(args: argparse.Namespace, signal_fd: int | None = None) -> dict[str, Any]:
    """The options `run` and `submit` share, as job.submit parameters. `signal_fd`: see read_stdin_file."""
    params: dict[str, Any] = {}
    for name in ("queue", "priority", "delay", "timeout", "context", "key"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.env:
        params["env"] = dict(args.env)
    if args.stdin_file is not None:
        params.update(stdin_params(read_stdin_file(args.stdin_file, signal_fd)))
    return params


def run_params(args: argparse.Namespace, signal_fd: int | None = None) -> dict[str, Any]:
    argv = list(args.argv)
    if argv[:1] == ["--"]:  # argparse.REMAINDER keeps the separator
        argv = argv[1:]
    if not argv:
        raise UsageError("run: a command is required: jobctl run [OPTIONS] -- CMD [ARG...]")
    if not argv[0]:  # later words may be empty (`echo ""`), the program may not
        raise UsageError("run: the program (the first word of CMD) is empty: jobctl run [OPTIONS] -- CMD [ARG...]")
    params = {"command": argv, **common_submit_params(args, signal_fd)}
    working_dir = args.cwd if args.cwd is not None else current_dir()
    if working_dir is not None:
        # Relative to jobctl's directory, not the daemon's.
        try:
            params["working_dir"] = os.path.abspath(working_dir)
        except OSError as exc:  # a relative --cwd in a directory removed under jobctl: not an output error (74)
            raise UsageError(
                f"--cwd {working_dir}: relative to jobctl's current directory, which is gone ({exc.strerror})"
            ) from None
    if args.retry is not None:
        params["retry"] = RetryPolicy(times=args.retry).to_json()
    return params


def current_dir() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # removed under us: let the daemon use its default
        return None


def submit_params(args: argparse.Namespace, signal_fd: int | None = None) -> dict[str, Any]:
    if args.args and args.param:
        raise UsageError("submit: give either ARGs or -P/--param NAME=VALUE, not both")
    params = {"task": args.task, **common_submit_params(args, signal_fd)}
    if args.args:
        params["args"] = list(args.args)
    if args.param:
        params["params"] = dict(args.param)
    return params


# -- commands -------------------------------------------------------------------------------------------------


def cmd_run(session: Session, args: argparse.Namespace) -> int:
    return submit_and_report(session, run_params(args, session.client.signal_fd), args.wait, args.stdin_file)


def cmd_submit(session: Session, args: argparse.Namespace) -> int:
    return submit_and_report(session, submit_params(args, session.client.signal_fd), args.wait, args.stdin_file)


def submit_and_report(session: Session, params: dict[str, Any], wait: bool, stdin_file: str | None = None) -> int:
    try:
        job: Job = session.client.call("job.submit", params)
    except RemoteError as exc:
        if exc.code == "FRAME_TOO_LARGE" and stdin_file is not None and not session.json:
            # jobd only knows that the request line was too long; what made it so is the input jobctl read. (With
            # --json the error stays as jobd sent it.)
            message = f"{exc.message}: {describe_stdin(stdin_file, params)}"
            raise RemoteError(exc.code, message, exc.data, exc.rpc_code) from None
        if refused_args_of_an_env_task(exc, params) and not session.json:
            # jobd names the API's members; on the command line 'params' are -P and 'args' the words after TASK.
            message = f"{exc.message}. With jobctl: jobctl submit -P NAME=VALUE ... {params['task']}"
            raise RemoteError(exc.code, message, exc.data, exc.rpc_code) from None
        raise
    if wait:
        if not session.json:
            print(describe_submitted(job, local_now()), flush=True)
        return wait_for(session, int(job["id"]), None)
    session.emit(job, lambda: [describe_submitted(job, local_now())])
    return EXIT_OK


def refused_args_of_an_env_task(exc: RemoteError, params: dict[str, Any]) -> bool:
    """Whether jobd refused the arguments given after TASK because the task takes its parameters as environment
    variables (`parameters = "env"`), which jobctl gives with -P."""
    data = exc.data if isinstance(exc.data, dict) else {}
    return exc.code == "INVALID_PARAMS" and data.get("param") == "args" and "task" in params and "args" in params


def cmd_status(session: Session, args: argparse.Namespace) -> int:
    if args.id is None:
        status = session.client.call("daemon.status")
        session.emit(status, lambda: render_daemon_status(status, local_now()))
    else:
        job = session.client.call("job.get", {"id": args.id})
        session.emit(job, lambda: render_job_details(job, local_now()) + paused_queue_lines(session.client, job))
    return EXIT_OK


def paused_queue_lines(client: Client, job: Job) -> list[str]:
    """Below a queued job's details: why it does not start, when its queue is paused (`state: queued` alone sends
    the reader looking for a fault)."""
    note = paused_queue_note(client, job)
    return [] if note is None else ["", note]


def render_job_details(job: Job, now: dt.datetime) -> list[str]:
    lines = render_fields(job_fields(job, now.tzinfo))
    tries = job.get("tries") or []
    if tries:
        lines += ["", "tries:"] + ["  " + line for line in render_tries(tries, now)]
    return lines


def _page(
    session: Session,
    method: str,
    params: dict[str, Any],
    key: str,
    what: str,
    render: Callable[[list[dict[str, Any]]], Iterable[str]],
) -> int:
    """One page of a paged list (job.list, instance.list, audit.list): a table of `what`, or the reply with --json;
    the hint for the next page goes to stderr."""
    result = session.client.call(method, params)
    if session.json:
        session.emit_json(result)
        return EXIT_OK
    items = result.get(key) or []
    if not items:
        print(f"no {what}", file=sys.stderr)
        return EXIT_OK
    for line in render(items):
        print(line)
    if result.get("next_before") is not None:
        total = result.get("total")
        counted = f"{len(items)} of {total}; " if total is not None else ""
        print(f"({counted}older {what}: repeat with --before {result['next_before']})", file=sys.stderr)
    return EXIT_OK


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_ls(session: Session, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit, **_given(args, "queue", "task", "context", "before")}
    if args.state:
        params["state"] = list(args.state)
    return _page(
        session, "job.list", params, "jobs", "jobs", lambda jobs: render_jobs(jobs, local_now(), stdout_width())
    )


def cmd_log(session: Session, args: argparse.Namespace) -> int:
    """Copies a stream's bytes to stdout; with --follow, keeps asking until the attempt has ended."""
    if args.follow:
        # `jobctl log -f 5 | grep -q ready` should end when grep does, not when the job next writes or ends
        session.client.end_with_reader_of(sys.stdout.fileno())
    if args.attempt is None or args.follow:
        client = session.client
        wanted = args.attempt or 1
        job = wait_for_attempt(client, args.id, wanted) if args.follow else client.call("job.get", {"id": args.id})
        if not job.get("attempts"):
            print(f"jobctl: job {args.id} has no output: it has not run ({job.get('state')})", file=sys.stderr)
            return EXIT_OK
    params: dict[str, Any] = {"id": args.id, "stream": args.stream, "offset": 0, "limit": OUTPUT_CHUNK}
    params |= {"encoding": "base64", "wait": args.follow}
    if args.attempt is not None:
        params["attempt"] = args.attempt
    sys.stdout.flush()  # what print() may have left buffered goes first: the bytes below go to the descriptor itself
    out_fd = sys.stdout.fileno()
    # On a terminal the job's escape sequences would drive the administrator's terminal: shown escaped, unless --raw.
    shown = None if args.raw or not os.isatty(out_fd) else TerminalStream(sys.stdout.encoding or "utf-8")
    if copy_output(session.client, params, out_fd, shown):
        print(
            f"jobctl: job {args.id}'s {args.stream} is not whole: cut at its max_output limit, or not written for "
            "want of disk space (see jobd's log)",
            file=sys.stderr,
        )
    return EXIT_OK


def wait_for_attempt(client: Client, job_ident: int, number: int) -> Job:
    """The job once it has started attempt `number`, or has finished without it (cancelled while it waited)."""
    # Subscribe before reading the job, so a start between the two arrives as an event.
    client.call("events.subscribe", {"jobs": [job_ident], "types": ["job.state"]})
    job: Job = client.call("job.get", {"id": job_ident})
    while not ((job.get("attempts") or 0) >= number or is_finished(job)):
        event = client.next_event()
        if event.get("type") == "job.state" and isinstance(event.get("job"), dict):
            job = event["job"] if event["job"].get("id") == job_ident else job
    return job


def copy_output(client: Client, params: dict[str, Any], out_fd: int, shown: TerminalStream | None) -> bool:
    """Writes job.output chunks to `out_fd` until caught up (or, with `wait`, until the attempt has ended), in a wait
    for room that the signal wake-up pipe ends too (jobd.wakeup_io): a pager that stopped reading holds no Ctrl-C.
    `shown`: the bytes go through it (a terminal's escaping) rather than as they are.

    Returns whether the stream was truncated by the job's max_output.
    """
    while True:
        chunk = client.call("job.output", params)
        data = base64.b64decode(chunk["data"])
        write_all(out_fd, data if shown is None else shown.feed(data), client.signal_fd)
        # Pin the attempt the first reply chose, so a retry starting meanwhile cannot splice two streams.
        params["attempt"] = chunk["attempt"]
        params["offset"] = chunk["next_offset"]
        caught_up = not data or chunk["next_offset"] >= chunk["size"]
        if chunk["complete"] or (caught_up and not params["wait"]):
            if shown is not None:
                write_all(out_fd, shown.end(), client.signal_fd)
            return bool(chunk.get("truncated"))


def cmd_wait(session: Session, args: argparse.Namespace) -> int:
    return wait_for(session, args.id, args.timeout)


def wait_for(session: Session, job_ident: int, timeout: float | None) -> int:
    if sys.stderr.isatty():
        job = wait_with_progress(session.client, job_ident, timeout)
    else:
        job = wait_quietly(session.client, job_ident, timeout)
    return report_end(session, job, timeout)


def paused_queue_note(client: Client, job: Job) -> str | None:
    """What to tell someone watching a job that is queued in a paused queue, which starts nothing until it is resumed
    (the bar would otherwise say `queued` and nothing else, for as long as the pause lasts). None when the job is not
    queued, its queue is not paused, or the caller may not read the queue."""
    if job.get("state") != JobState.QUEUED:
        return None
    queues = client.call("queue.list").get("queues") or []
    if not any(queue.get("name") == job.get("queue") and queue.get("paused") for queue in queues):
        return None
    name = job.get("queue")
    ident = job.get("id")
    return f"job {ident} is queued in {name}, which is paused: it starts once it is resumed (jobctl resume {name})"


def wait_params(ident: int, timeout: float | None) -> dict[str, Any]:
    """job.wait's or instance.wait's parameters."""
    params: dict[str, Any] = {"id": ident}
    if timeout is not None:
        params["timeout"] = timeout
    return params


def wait_quietly(client: Client, job_ident: int, timeout: float | None) -> Job:
    job: Job = client.call("job.wait", wait_params(job_ident, timeout))
    return job


@dataclasses.dataclass(frozen=True)
class WaitView:
    """What the progress bar shows: the job as last reported, and its last log line."""

    job: Job
    last_log: str = ""


def apply_event(view: WaitView, event: dict[str, Any]) -> WaitView:
    """The view after one `event` notification; events about other jobs leave it as it is."""
    job_ident = view.job.get("id")
    kind = event.get("type")
    if kind == "job.state" and isinstance(event.get("job"), dict) and event["job"].get("id") == job_ident:
        return dataclasses.replace(view, job=event["job"])
    if event.get("id") != job_ident:
        return view
    if kind == "job.progress":
        return dataclasses.replace(view, job={**view.job, "progress": event.get("progress", 0)})
    if kind == "job.log":
        return dataclasses.replace(view, last_log=str(event.get("line", "")).strip())
    return view


def wait_with_progress(client: Client, job_ident: int, timeout: float | None) -> Job:
    """Waits in the daemon (job.wait) while drawing a bar on stderr from the job's events; returns what job.wait
    answers, so the outcome (an error such as SHUTTING_DOWN included) is the same as without a terminal."""
    # Subscribe before reading the job: a change between the two then arrives as an event and is not missed. The
    # job is read after the wait is sent, so once it is shown jobd has taken the wait in (it reads in order).
    client.call("events.subscribe", {"jobs": [job_ident]})
    wait = client.send_request("job.wait", wait_params(job_ident, timeout))
    view = WaitView(client.call("job.get", {"id": job_ident}))
    note = paused_queue_note(client, view.job)
    if note:
        say(note)  # once, above the bar: jobd tells of no resume, only of the job's start that follows it
    # Without redrawing, each log line would print a line of its own: the lines then follow progress and state only.
    with ProgressBar(sys.stderr, terminal_can_redraw()) as bar:
        while True:
            job = view.job
            log_note = view.last_log if bar.redraws else ""
            bar.draw(
                render_progress_bar(job_ident, wait_label(job), job.get("progress") or 0, stderr_width(), log_note)
            )
            message = client.next_event_or_reply(wait)
            if isinstance(message, Reply):
                ended: Job = checked_result("job.wait", message.result, client.path)
                return ended
            view = apply_event(view, message)


def terminal_can_redraw() -> bool:
    """Whether the terminal can take a carriage return and an erase-line (`ESC [ K`): not when $TERM is `dumb`, unset
    or empty (Emacs' shell buffers, some CI consoles), where the escape would be printed as text."""
    return os.environ.get("TERM", "") not in ("", "dumb")


class Terminated(BaseException):
    """SIGTERM came while a progress bar was shown: raised, as Ctrl-C raises KeyboardInterrupt, so that the bar is
    taken away on the way out; main() then lets the signal end jobctl, as it ends it when no bar is shown."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated()


def die_of_sigterm() -> None:
    """Ends jobctl by SIGTERM's default action, so that whoever sent it sees it killed by the signal (143 in a shell),
    as it would have been without the handler the progress bar needs."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


class ProgressBar:
    """One line on a terminal, redrawn in place with a carriage return; on a terminal that cannot redraw
    (terminal_can_redraw), a plain line is printed each time the text changes and nothing is erased.

    Used as a context manager: the bar is taken away at its end, whatever ends it, a SIGTERM (`timeout 60 jobctl wait
    4`, `kill`) included, which would otherwise leave it where the shell then writes its prompt. The handler that makes
    SIGTERM an exception is installed for the bar's life only: its waits are the ones that watch Python's signal
    wake-up pipe (client.woken_by_signals), so the signal is acted on whenever it comes; elsewhere SIGTERM keeps its
    default action, which needs no help from the interpreter."""

    def __init__(self, stream: TextIO, redraws: bool) -> None:
        self.stream = stream
        self.redraws = redraws
        self.shown = ""
        self._sigterm_taken = False

    def __enter__(self) -> ProgressBar:
        # A SIGTERM ignored from the start (nohup, a parent's choice) or handled by an embedding program: left so.
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_terminated)
            self._sigterm_taken = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.clear()
        finally:
            if self._sigterm_taken:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                self._sigterm_taken = False

    def draw(self, text: str) -> None:
        if text != self.shown:
            # Noted before it is written: a Ctrl-C that comes as the write ends must still find it to clear.
            self.shown = text
            self.stream.write("\r" + text + "\x1b[K" if self.redraws else text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.shown and self.redraws:
            self.shown = ""
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def report_end(session: Session, job: Job, timeout: float | None) -> int:
    code = exit_code_for(job)
    if session.json:
        session.emit_json(job)
    if not is_finished(job):  # decided by the state: a job may itself exit with the same number
        waited = "" if timeout is None else f" after {format_duration(timeout)}"
        print(f"jobctl: job {job.get('id')} is still {job.get('state')}{waited}", file=sys.stderr)
    elif not session.json:
        print(describe_end(job), file=sys.stderr)
    return code


def cmd_cancel(session: Session, args: argparse.Namespace) -> int:
    job = session.client.call("job.cancel", {"id": args.id})
    session.emit(job, lambda: [f"job {job.get('id')} {job.get('state')}"])
    return EXIT_OK


def cmd_queues(session: Session, args: argparse.Namespace) -> int:
    # A user with no right on any queue sees none: "no queues", as ls says "no jobs", not a table header alone.
    return list_named(session, "queue.list", "queues", render_queues)


def cmd_pause(session: Session, args: argparse.Namespace) -> int:
    queue = session.client.call("queue.pause", {"name": args.queue})
    session.emit(queue, lambda: [f"queue {queue.get('name')} paused"])
    return EXIT_OK


def cmd_resume(session: Session, args: argparse.Namespace) -> int:
    queue = session.client.call("queue.resume", {"name": args.queue})
    session.emit(queue, lambda: [f"queue {queue.get('name')} resumed"])
    return EXIT_OK


def cmd_reload(session: Session, args: argparse.Namespace) -> int:
    result = session.client.call("daemon.reload")
    session.emit(result, lambda: [f"reloaded: {plural(len(result.get('files') or []), 'file')}"])
    return EXIT_OK


def cmd_backup(session: Session, args: argparse.Namespace) -> int:
    result = session.client.call("daemon.backup")
    session.emit(
        result,
        lambda: [f"copied the database to {result.get('path')} ({format_kib(int(result.get('bytes') or 0) // 1024)})"],
    )
    return EXIT_OK


def list_named(session: Session, method: str, key: str, render: Callable[[list[Any]], list[str]]) -> int:
    """A `*.list` call whose result is {key: [...]}: JSON as is, else one rendered line each ("no KEY" if none)."""
    result = session.client.call(method)
    if session.json:
        session.emit_json(result)
        return EXIT_OK
    items = result.get(key) or []
    if not items:
        print(f"no {key}", file=sys.stderr)
        return EXIT_OK
    for line in render(items):
        print(line)
    return EXIT_OK


def cmd_workflows(session: Session, args: argparse.Namespace) -> int:
    return list_named(session, "workflow.list", "workflows", lambda found: render_workflows(found, stdout_width()))


def cmd_tasks(session: Session, args: argparse.Namespace) -> int:
    return list_named(session, "task.list", "tasks", render_tasks)


def cmd_schedules(session: Session, args: argparse.Namespace) -> int:
    result = session.client.call("schedule.list")
    if session.json:
        session.emit_json(result)
        return EXIT_OK
    schedules = result.get("schedules") or []
    if not schedules:
        print("no schedules", file=sys.stderr)
        return EXIT_OK
    for line in render_schedules(schedules, local_now(), stdout_width()):
        print(line)
    return EXIT_OK


def cmd_schedule(session: Session, args: argparse.Namespace) -> int:
    result = session.client.call(f"schedule.{args.action}", {"name": args.name})
    if args.action == "trigger":
        session.emit(result, lambda: [describe_triggered(result)])
    else:
        session.emit(result, lambda: [f"schedule {result.get('name')} {args.action}d"])
    return EXIT_OK


def launch_params(args: argparse.Namespace) -> dict[str, Any]:
    if args.timeout is not None and not args.wait:
        raise UsageError("launch: --timeout only applies with --wait")
    params: dict[str, Any] = {"workflow": args.workflow}
    if args.param:
        params["parameters"] = dict(args.param)
    if args.comment is not None:
        params["comment"] = args.comment
    return params


def cmd_launch(session: Session, args: argparse.Namespace) -> int:
    instance: Instance = session.client.call("instance.launch", launch_params(args))
    if not args.wait:
        session.emit(instance, lambda: [describe_launched(instance)])
        return EXIT_OK
    if not session.json:
        print(describe_launched(instance), flush=True)
    instance_ident = int(instance["id"])
    if sys.stderr.isatty():
        instance = wait_instance_with_progress(session.client, instance_ident, args.timeout)
    else:
        instance = wait_instance_quietly(session.client, instance_ident, args.timeout)
    return report_instance_end(session, instance, args.timeout)


def wait_instance_quietly(client: Client, instance_ident: int, timeout: float | None) -> Instance:
    instance: Instance = client.call("instance.wait", wait_params(instance_ident, timeout))
    return instance


def concerns_instance(event: dict[str, Any], context: str, job_ids: Collection[int]) -> bool:
    """Whether a job event may change what the progress line shows for the instance whose jobs have `context`."""
    job = event.get("job")
    if isinstance(job, dict):
        return job.get("context") == context or job.get("id") in job_ids
    return event.get("id") in job_ids


def wait_instance_with_progress(client: Client, instance_ident: int, timeout: float | None) -> Instance:
    """Waits in the daemon (instance.wait) while drawing a progress line on stderr from the tasks' job events; the
    instance tree is read again whenever an event concerns one of its tasks. Returns what instance.wait answers,
    so the outcome (an error such as SHUTTING_DOWN included) is the same as without a terminal."""
    # As in wait_with_progress: subscribed before the tree is read, which is read after the wait is sent.
    client.call("events.subscribe", {"types": ["job.state", "job.progress"]})
    wait = client.send_request("instance.wait", wait_params(instance_ident, timeout))
    context = f"instance:{instance_ident}"
    shown: Instance = client.call("instance.get", {"id": instance_ident})
    with ProgressBar(sys.stderr, terminal_can_redraw()) as bar:
        while True:
            bar.draw(render_instance_progress(shown, stderr_width()))
            message = client.next_event_or_reply(wait)
            if isinstance(message, Reply):
                instance: Instance = checked_result("instance.wait", message.result, client.path)
                return instance
            job_ids = {int(task["job_id"]) for task in tree_tasks(shown.get("jobs") or []) if task.get("job_id")}
            if concerns_instance(message, context, job_ids):
                shown = reread_instance(client, instance_ident, shown)


def reread_instance(client: Client, instance_ident: int, shown: Instance) -> Instance:
    """The instance read again for the progress line, or as shown so far if the connection has closed meanwhile:
    instance.wait's answer (SHUTTING_DOWN when jobd stops) may have come before the close, and it decides."""
    try:
        instance: Instance = client.call("instance.get", {"id": instance_ident})
    except ConnectionClosed:
        return shown
    return instance


def report_instance_end(session: Session, instance: Instance, timeout: float | None) -> int:
    if session.json:
        session.emit_json(instance)
    if instance.get("status") != INSTANCE_TERMINATED:
        waited = "" if timeout is None else f" after {format_duration(timeout)}"
        print(f"jobctl: instance {instance.get('id')} is still {instance.get('status')}{waited}", file=sys.stderr)
    elif not session.json:
        print(describe_instance_end(instance), file=sys.stderr)
    return instance_exit_code(instance)


def cmd_instance(session: Session, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"id": args.id, "format": "xml" if args.xml else "json"}
    instance: Instance = session.client.call("instance.get", params)
    if session.json:
        session.emit_json(instance)
    elif args.xml:
        document = str(instance.get("xml") or "")
        if sys.stdout.isatty():
            # Its task outputs are what the tasks wrote: as `log` does, a terminal is shown their control characters
            # escaped (those XML cannot carry are control pictures already; C1 and bidi controls it can carry).
            document = terminal_text(document)
        sys.stdout.write(document if document.endswith("\n") else document + "\n")
    else:
        for line in render_instance(instance, local_now(), stdout_width()):
            print(line)
    return EXIT_OK


def cmd_instances(session: Session, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit, **_given(args, "workflow", "status", "errors", "before")}
    return _page(
        session,
        "instance.list",
        params,
        "instances",
        "instances",
        lambda instances: render_instances(instances, local_now(), stdout_width()),
    )


def cmd_audit(session: Session, args: argparse.Namespace) -> int:
    # --command's value is args.command_filter: args.command is the subcommand's name
    params: dict[str, Any] = {"limit": args.limit, **_given(args, "user", "before")}
    if args.command_filter is not None:
        params["command"] = args.command_filter
    return _page(
        session, "audit.list", params, "entries", "audit entries", lambda entries: render_audit(entries, stdout_width())
    )


# -- command line ---------------------------------------------------------------------------------------------

Handler = Callable[[Session, argparse.Namespace], int]


def add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # Accepted before and after the subcommand; SUPPRESS keeps a subcommand's absent option from resetting
    # a value given before it.
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS if in_subcommand else None,
        help="jobd's API socket (default: $JOBD_SOCKET, else /run/jobd/jobd.sock)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if in_subcommand else False,
        help="print the API's JSON result instead of text for people",
    )


def add_submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--queue", help="queue (default: the task's queue, else default)")
    parser.add_argument("-p", "--priority", type=priority, help="0-4294967295, lower runs first (1024)")
    parser.add_argument("--delay", type=seconds, metavar="S", help="seconds before the job becomes ready")
    parser.add_argument("--timeout", type=positive_seconds, metavar="S", help="seconds the job may run")
    parser.add_argument(
        "-e", "--env", type=env_assignment, action="append", metavar="NAME=VALUE", help="environment variable (repeat)"
    )
    parser.add_argument("--context", help="a free label, filterable with ls --context")
    parser.add_argument("--key", help="idempotency key: resubmitting the same key returns the first job")
    parser.add_argument("--stdin-file", metavar="PATH", help="feed this file to the job's stdin (- = jobctl's stdin)")
    parser.add_argument("--wait", action="store_true", help="then wait for the job, as `jobctl wait`")


def add_command(subparsers: Any, name: str, handler: Handler, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help_text, description=help_text, **kwargs)
    add_global_options(parser, in_subcommand=True)
    # command_parser: words the command does not take are refused with its own usage, which shows what it takes
    parser.set_defaults(handler=handler, command_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobctl", description="Command line for jobd, the job daemon.")
    parser.add_argument("--version", action="version", version=f"jobctl {__version__}")
    add_global_options(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = add_command(sub, "run", cmd_run, "run an ad-hoc command (admins only)")
    add_submit_options(run)
    run.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one)")
    run.add_argument("--retry", type=int_in(0, MAX_RETRY_TIMES), metavar="N", help="retry a failure up to N times")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    submit = add_command(sub, "submit", cmd_submit, "submit a job of a configured task")
    add_submit_options(submit)
    submit.add_argument(
        "-P", "--param", type=assignment, action="append", metavar="NAME=VALUE", help="named parameter (repeat)"
    )
    submit.add_argument("task", metavar="TASK")
    submit.add_argument("args", nargs="*", default=[], metavar="ARG", help="arguments appended to the task's command")

    status = add_command(sub, "status", cmd_status, "show the daemon's status, or one job's")
    status.add_argument("id", type=positive_int, nargs="?", metavar="ID")

    ls = add_command(sub, "ls", cmd_ls, "list jobs, newest first")
    ls.add_argument(
        "--state", action="append", choices=[str(s) for s in JobState], help="only jobs in this state (repeat)"
    )
    ls.add_argument("--queue", help="only jobs of this queue")
    ls.add_argument("--task", help="only jobs of this task")
    ls.add_argument("--context", help="only jobs with this context")
    ls.add_argument("-n", "--limit", type=page_size, default=20, help="at most this many (1-1000, default 20)")
    ls.add_argument("--before", type=positive_int, metavar="ID", help="only jobs older than ID (paging)")

    log = add_command(sub, "log", cmd_log, "print a job's output")
    log.add_argument("id", type=positive_int, metavar="ID")
    stream = log.add_mutually_exclusive_group()
    stream.add_argument("--stderr", dest="stream", action="store_const", const="stderr", help="standard error")
    stream.add_argument("--log", dest="stream", action="store_const", const="log", help="the fd 3 log")
    log.set_defaults(stream="stdout")
    log.add_argument("--attempt", type=positive_int, metavar="N", help="that attempt (default: the latest)")
    log.add_argument("-f", "--follow", action="store_true", help="keep printing until the attempt ends")
    log.add_argument(
        "--raw", action="store_true", help="on a terminal too, the bytes as they are (control characters not escaped)"
    )

    wait = add_command(sub, "wait", cmd_wait, "wait for a job; exit with its code")
    wait.add_argument("id", type=positive_int, metavar="ID")
    wait.add_argument("--timeout", type=seconds, metavar="S", help="give up after S seconds (exit 4)")

    cancel = add_command(sub, "cancel", cmd_cancel, "cancel a job")
    cancel.add_argument("id", type=positive_int, metavar="ID")

    add_command(sub, "tasks", cmd_tasks, "list the configured tasks: name, queue, how parameters are passed")
    add_command(sub, "queues", cmd_queues, "list queues")
    pause = add_command(sub, "pause", cmd_pause, "stop starting jobs from a queue")
    pause.add_argument("queue", metavar="QUEUE")
    resume = add_command(sub, "resume", cmd_resume, "start jobs from a paused queue again")
    resume.add_argument("queue", metavar="QUEUE")
    add_command(sub, "reload", cmd_reload, "reload the configuration files (admins only)")
    add_command(
        sub, "backup", cmd_backup, "copy the database, consistent, while jobd runs, to STATE_DIR/backup/ (admins only)"
    )

    add_command(sub, "workflows", cmd_workflows, "list workflows and their parameters")
    launch = add_command(sub, "launch", cmd_launch, "launch an instance of a workflow")
    launch.add_argument(
        "-p", "--param", type=assignment, action="append", metavar="NAME=VALUE", help="workflow parameter (repeat)"
    )
    launch.add_argument("--comment", metavar="TEXT", help="a free comment stored with the instance")
    launch.add_argument(
        "--wait", action="store_true", help="then wait for the instance: exit 0 without errors, 1 with errors"
    )
    launch.add_argument("--timeout", type=seconds, metavar="S", help="with --wait: give up after S seconds (exit 4)")
    launch.add_argument("workflow", metavar="WORKFLOW")

    instance = add_command(sub, "instance", cmd_instance, "show a workflow instance: its jobs and tasks")
    instance.add_argument("id", type=positive_int, metavar="ID")
    instance.add_argument("--xml", action="store_true", help="print evQueue's instance document")

    instances = add_command(sub, "instances", cmd_instances, "list workflow instances, newest first")
    instances.add_argument("--workflow", metavar="WORKFLOW", help="only instances of this workflow")
    instances.add_argument(
        "--status", choices=[INSTANCE_EXECUTING, INSTANCE_TERMINATED], help="only instances in this status"
    )
    errors = instances.add_mutually_exclusive_group()
    errors.add_argument("--errors", dest="errors", action="store_const", const=True, help="only those with errors")
    errors.add_argument(
        "--no-errors", dest="errors", action="store_const", const=False, help="only those without errors"
    )
    instances.add_argument("-n", "--limit", type=page_size, default=20, help="at most this many (1-1000, default 20)")
    instances.add_argument("--before", type=positive_int, metavar="ID", help="only instances older than ID (paging)")

    add_command(sub, "schedules", cmd_schedules, "list schedules: state, next and last run")
    schedule = add_command(sub, "schedule", cmd_schedule, "enable, disable or trigger (run now) a schedule")
    schedule.add_argument("action", choices=["enable", "disable", "trigger"])
    schedule.add_argument("name", metavar="NAME")

    audit = add_command(sub, "audit", cmd_audit, "show the audit log of mutating commands, newest first (admins only)")
    audit.add_argument("--user", metavar="USER", help="only commands of this user")
    audit.add_argument(
        "--command",
        dest="command_filter",
        metavar="COMMAND",
        help='only this command, e.g. job.cancel or "instance launch"',
    )
    audit.add_argument("-n", "--limit", type=page_size, default=20, help="at most this many (1-1000, default 20)")
    audit.add_argument("--before", type=positive_int, metavar="ID", help="only entries older than ID (paging)")
    return parser


# Stands in for a literal `--` among submit's ARGs while argparse reads them: it drops every `--` from a list of
# positionals, not only the one that ends the options (Python 3.11), so `submit TASK -- -a -- b` lost the second.
_ARG_SEPARATOR = "\x00--"


def _keep_later_separators(argv: list[str]) -> list[str]:
    """`argv` with each `--` after the first one that follows `submit` replaced by _ARG_SEPARATOR."""
    if "submit" not in argv or "--" not in argv[argv.index("submit") :]:
        return argv
    first = argv.index("--", argv.index("submit"))
    return argv[: first + 1] + [_ARG_SEPARATOR if arg == "--" else arg for arg in argv[first + 1 :]]


def _values_attached(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with each option's value that starts with `-` joined to its option (`--context=-x`, `-q-x`).

    argparse takes any word that starts with `-` for an option, even where a value is due, and refused
    `--context "$label"` for a label such as `-x` ("expected one argument"); getopt's tools, which scripts are written
    for, take the next word whatever it is. Words from `--` on, and a `run` command with its arguments, are left
    alone. (argparse's own internals are read here: it offers no public way to ask which options take a value.)"""
    attached: list[str] = []
    current = parser
    words = iter(argv)
    for word in words:
        if word == "--":
            return [*attached, word, *words]
        action = current._option_string_actions.get(word)
        if action is not None and action.nargs is None:  # an option that takes one value
            value = next(words, None)
            if value is None:
                return [*attached, word]  # argparse says that the value is missing
            if value.startswith("-"):
                attached.append(word + ("=" if word.startswith("--") else "") + value)
            else:
                attached += [word, value]
            continue
        attached.append(word)
        if word.startswith("-"):
            continue  # an option without a value, or one argparse refuses
        subcommand = _subcommands(current).get(word)
        if subcommand is not None:
            current = subcommand
        elif any(a.nargs == argparse.REMAINDER for a in current._actions if not a.option_strings):
            return [*attached, *words]  # `run`'s command: its words are its own
    return attached


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's own test: such a word is a value, not an option


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args(), except that submit's ARGs may have options between them (`submit resize a.png -p 5 b.png`):
    argparse takes the ARGs up to the first option and leaves the later ones over. Left-over words that look like
    options are still refused (an ARG that starts with `-` goes after `--`)."""
    args, extra = parser.parse_known_args(_keep_later_separators(_values_attached(parser, argv)))
    command_parser: argparse.ArgumentParser = args.command_parser
    if extra and args.command == "submit":
        literal, later_args = False, []
        for word in extra:
            if word == "--" and not literal:
                literal = True
            elif not literal and word.startswith("-") and word != "-" and not _NEGATIVE_NUMBER.match(word):
                command_parser.error(f"unrecognized arguments: {word} (put ARGs that start with - after --)")
            else:
                later_args.append(word)
        args.args += later_args
    elif extra:
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _restore_separators(args)
    _refuse_empty_values(args, (parser, command_parser))
    return args


def _refuse_empty_values(args: argparse.Namespace, parsers: Iterable[argparse.ArgumentParser]) -> None:
    """An empty word given for any option or argument that takes one (`-q ""`, `--cwd ""`, `pause ""`) is a usage
    error (exit 2), said before anything is sent: jobd would refuse most (an INVALID_PARAMS, exit 1), and others
    would be taken as something else (`--cwd ""` as the current directory, `--context ""` as a label of its own).
    Checked here, once for all of them, so that an option added later is covered too. NAME=VALUE values and a
    command's words may be empty; they are lists and tuples, not checked."""
    for parser in parsers:
        for action in parser._actions:  # argparse has no public list of a parser's arguments
            if getattr(args, action.dest, None) == "":
                name = "/".join(action.option_strings) or action.metavar or action.dest
                hint = f" (leave {name} out for none)" if action.option_strings else ""
                parser.error(f"argument {name}: expected a non-empty value{hint}")


def _restore_separators(args: argparse.Namespace) -> None:
    for name in ("args", "argv"):  # submit's ARGs; run's command, should `submit` have been one of its words
        values = getattr(args, name, None)
        if isinstance(values, list):
            setattr(args, name, ["--" if value == _ARG_SEPARATOR else value for value in values])


def main(argv: list[str] | None = None) -> int:
    """jobctl with the command line `argv` (sys.argv's by default); the exit code. Ctrl-C raises KeyboardInterrupt
    while it runs, so that what it began is tidied on the way out (a progress bar taken away); at any moment, also
    while the command line is read or the connection closed, it ends in 130 without a traceback. The SIGINT handler
    found (jobctl_start's, or an inherited SIG_IGN, which is kept) is put back on return."""
    before = signal.getsignal(signal.SIGINT)
    try:
        if before is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_command_line(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated:  # the progress bar is gone: now the signal's own end
        die_of_sigterm()
        return EXIT_SIGNAL_BASE + signal.SIGTERM  # not reached: SIGTERM's default action ends the process
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


def run_command_line(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # usage error or --help: return the code instead of leaving the interpreter
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if sys.stdout is None:
        # Started with stdout closed (`>&-`): what it would print went nowhere and it said "done" (0). Refused before
        # anything is done, rather than after a submit or a cancel whose answer could not be shown.
        return fail(
            "standard output is closed: nothing could be shown (send it to /dev/null to discard it)", EXIT_OUTPUT_ERROR
        )
    tolerate_unencodable_output()
    try:
        client = CheckedClient(args.socket or default_socket_path(), reply_timeout_from_environment())
    except (UsageError, EmptySocketVariable) as exc:
        return fail(f"{exc}", EXIT_USAGE)
    handler: Handler = args.handler
    try:
        with woken_by_signals(client):  # a Ctrl-C must end a wait whenever it comes: see there
            code = handler(Session(client, args.json), args)
        sys.stdout.flush()  # here, so that a write error is reported below rather than at the interpreter's exit
        return code
    except (UsageError, EncodeError) as exc:
        return fail(f"{exc}", EXIT_USAGE)
    except ConnectError as exc:
        return fail(describe_connect_error(exc), EXIT_CANNOT_CONNECT)
    except (ConnectionClosed, ProtocolError, NoReply) as exc:
        return fail(f"{exc}", EXIT_CANNOT_CONNECT)
    except RemoteError as exc:
        if args.json:  # scripts get the error as the daemon sent it: match on error.code, not on the text
            error = {"code": exc.code, "message": exc.message, "data": exc.data}
            say(json.dumps({"error": error}, ensure_ascii=True))
            return EXIT_REMOTE_ERROR
        # Line by line: a failed reload lists its problems one per line. They quote what jobd was given (a file's
        # name, a client's value), whose control characters must not drive the terminal.
        message = "\n".join(printable(line) for line in exc.message.split("\n"))
        return fail(f"{exc.code}: {message}", EXIT_REMOTE_ERROR)
    except BrokenPipeError:
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # The OSErrors of jobd's socket and of the files jobctl reads are turned into the exceptions above; what is
        # left is writing the output: `jobctl log 5 > file` on a full disk, an I/O error.
        silence_stdout()
        return fail(f"cannot write to standard output: {exc.strerror or exc}", EXIT_OUTPUT_ERROR)
    finally:
        client.close()


def fail(message: str, code: int) -> int:
    text = f"jobctl: {message}"
    if stderr_is_journal():
        # The unit's ExecReload= runs `jobctl reload`: its failure is an error in `journalctl -p err`, every line of
        # it (without the prefix, journald files a line as info).
        text = logline.journal_text(text, 3).removesuffix("\n")
    say(text)
    return code


def stderr_is_journal() -> bool:
    """Whether stderr is the journald stream systemd gave this process: $JOURNAL_STREAM names its device and inode
    (sd_journal_stream_fd(3)); a variable inherited by a process whose stderr went elsewhere does not match."""
    try:
        device, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        found = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):  # not set or not two numbers; stderr closed or not a file
        return False
    return (found.st_dev, found.st_ino) == (device, inode)


def say(line: str) -> None:
    """A line on stderr, where an error is told; if stderr cannot be written either (full, closed), the exit code
    still tells."""
    if sys.stderr is None:  # started with stderr closed: print(file=None) would write to stdout
        return
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


# What a path that is not a socket is, for the message that says so (stat's file types).
_FILE_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
]
MAX_SOCKET_PATH = 108  # bytes of sun_path: Linux takes a path that fills it, without a terminating NUL


def describe_connect_error(exc: ConnectError) -> str:
    """Why the socket could not be connected to, and what to do. Linux refuses a connect to a path that is not a
    socket with ECONNREFUSED, as it does a socket nobody listens on: "is jobd running?" would then send the user
    looking for a problem jobd does not have, so such a path is named for what it is."""
    path = exc.path
    where = "point --socket or JOBD_SOCKET at jobd's API socket (its [daemon] socket)"
    if exc.errno == errno.EAGAIN:  # the connect timeout (Client.connect), which is the reply timeout
        waited = format_duration(reply_timeout_from_environment())
        return (
            f"cannot connect to {path}: jobd accepted no connection within {waited} (the connections waiting for it "
            f"fill its socket's queue): is jobd stuck (see its log)? ({REPLY_TIMEOUT_VARIABLE} sets the limit)"
        )
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        # The limit is the kernel's on the path given, not on where the socket is: a shorter way there works.
        return (
            f"cannot connect to {path}: the path is {len(os.fsencode(path))} bytes long, and a Unix socket's may be "
            f"{MAX_SOCKET_PATH} at most; name it by a shorter path (relative to the current directory, or through a "
            "symbolic link)"
        )
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a file of another kind")
        return f"cannot connect to {path}: it is {kind}, not a socket; {where}"
    if isinstance(exc.cause, PermissionError):
        return f"{exc}; is your user in jobd's group? (set --socket or JOBD_SOCKET)"
    if mode is None and isinstance(exc.cause, FileNotFoundError):
        # jobd may well be running, its socket file removed under it (a cleanup of /run or /tmp): a SIGHUP makes it
        # again (or logs what to do), where a restart would stop the running jobs. Not `systemctl reload`: that
        # runs `jobctl reload`, which needs this very socket.
        return (
            f"{exc}; is jobd running? (set --socket or JOBD_SOCKET; if jobd runs, its socket file was removed: "
            "`systemctl kill --kill-whom=main -s HUP jobd` makes it again, or logs what to do)"
        )
    return f"{exc}; is jobd running? (set --socket or JOBD_SOCKET)"


def tolerate_unencodable_output() -> None:
    # Job data may hold characters the terminal's encoding lacks; show them escaped rather than crash.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def silence_stdout() -> None:
    # The reader is gone; point stdout at /dev/null so the interpreter's final flush does not complain.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


if __name__ == "__main__":  # `python -m jobd.jobctl`; the `jobctl` command starts in jobd.jobctl_start
    sys.exit(main())
