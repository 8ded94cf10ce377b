"""jobd.config against real files: search path and drop-ins, merging, validation messages, the inotify watcher."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from test_manpages import _TOKEN as MAN_TOKEN
from test_manpages import CONFIG_REGISTRIES
from test_manpages import _unescape as unescape_man
from test_manpages import parse as parse_man_page

from jobd import conffile, config
from jobd.config import ConfigWatcher, find_files, load, load_dir
from jobd.daemon import RESTART_ONLY_DAEMON_KEYS
from jobd.engine import callbacks, http_task
from jobd.engine.schedule import Calendar
from jobd.errors import ConfigError
from jobd.model import (
    DEFAULT_KILL_GRACE,
    Durability,
    OnFailure,
    Overlap,
    ParameterMode,
    QueueDef,
    RetryLevel,
    RetryPolicy,
    RetrySchedule,
    ScheduleDef,
    Scheduler,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def search(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three search directories, lowest to highest priority, as /usr/lib/jobd, /run/jobd, /etc/jobd."""
    dirs = (tmp_path / "usr", tmp_path / "run", tmp_path / "etc")
    for directory in dirs:
        directory.mkdir()
    return dirs


def strs(*dirs: Path) -> list[str]:
    return [str(d) for d in dirs]


def load_error(*dirs: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(strs(*dirs))
    return info.value


# --- finding files ----------------------------------------------------------------------------------------------


def test_main_file_of_the_highest_priority_dir_hides_the_others(search: tuple[Path, Path, Path]) -> None:
    usr, run, _etc = search
    write(usr / "jobd.toml", "[queue.a]\n")
    chosen = write(run / "jobd.toml", "[queue.b]\n")
    assert find_files(strs(*search)) == [chosen]
    loaded = load(strs(*search))
    assert set(loaded.queues) == {"default", "b"}  # usr's file does not apply at all: hidden, not merged
    assert loaded.files == (str(chosen),)


def test_drop_ins_apply_by_name_across_dirs_after_the_main_file(search: tuple[Path, Path, Path]) -> None:
    usr, run, etc = search
    main = write(usr / "jobd.toml", '[daemon]\nstate_dir = "/main"\n')
    write(usr / "jobd.d/10-a.toml", '[daemon]\nstate_dir = "/usr-10"\n')  # hidden by etc's 10-a.toml
    etc_10 = write(etc / "jobd.d/10-a.toml", '[daemon]\nstate_dir = "/etc-10"\n')
    run_20 = write(run / "jobd.d/20-b.toml", '[daemon]\nstate_dir = "/run-20"\n')
    usr_30 = write(usr / "jobd.d/30-c.toml", '[daemon]\nsocket = "/usr-30.sock"\n')
    assert find_files(strs(*search)) == [main, etc_10, run_20, usr_30]
    loaded = load(strs(*search))
    assert loaded.daemon.state_dir == "/run-20"  # 20-b comes after 10-a whatever the directory
    assert loaded.daemon.socket == "/usr-30.sock"
    assert loaded.files == tuple(map(str, [main, etc_10, run_20, usr_30]))


def test_a_symlink_to_dev_null_masks_a_drop_in(search: tuple[Path, Path, Path]) -> None:
    usr, _run, etc = search
    write(usr / "jobd.d/10-a.toml", "[queue.a]\n")
    (etc / "jobd.d").mkdir()
    (etc / "jobd.d/10-a.toml").symlink_to("/dev/null")
    assert find_files(strs(*search)) == []
    assert set(load(strs(*search)).queues) == {"default"}


def test_an_empty_file_hides_lower_files_and_contributes_nothing(search: tuple[Path, Path, Path]) -> None:
    usr, _run, etc = search
    write(usr / "jobd.toml", "[queue.a]\n")
    empty = write(etc / "jobd.toml", "")
    assert find_files(strs(*search)) == [empty]
    assert set(load(strs(*search)).queues) == {"default"}


def test_hidden_editor_and_non_toml_files_are_not_config(search: tuple[Path, Path, Path]) -> None:
    etc = search[2]
    for name in (".10-a.toml", ".jobd.toml.swp", "4913", "10-a.toml~", "README"):
        write(etc / "jobd.d" / name, "this is not TOML = = =")
    (etc / "jobd.d/.#10-a.toml").symlink_to("nobody@host.1234")  # Emacs lock: a dangling symlink
    (etc / "jobd.d/sub.toml").mkdir()
    assert find_files(strs(*search)) == []


def test_missing_dirs_are_fine_and_load_dir_uses_one_dir(tmp_path: Path) -> None:
    assert find_files([str(tmp_path / "nope")]) == []
    write(tmp_path / "dev/jobd.toml", "[queue.dev]\n")
    assert set(load_dir(str(tmp_path / "dev")).queues) == {"default", "dev"}


def test_default_search_path_is_lowest_to_highest_priority() -> None:
    assert config.DEFAULT_SEARCH_PATH == ("/usr/lib/jobd", "/run/jobd", "/etc/jobd")


# --- merging and defaults ---------------------------------------------------------------------------------------


def test_no_file_gives_the_defaults(tmp_path: Path) -> None:
    loaded = load([str(tmp_path)])
    assert loaded.daemon.socket == "/run/jobd/jobd.sock"
    assert loaded.daemon.state_dir == "/var/lib/jobd"
    assert loaded.daemon.durability is Durability.CRASH
    assert loaded.daemon.history.keep_days == 30
    assert loaded.daemon.history.keep_last is None
    assert loaded.daemon.kill_grace == DEFAULT_KILL_GRACE
    assert loaded.daemon.max_output == 16 * 1024 * 1024
    assert dict(loaded.queues) == {"default": QueueDef("default", concurrency=1)}
    assert dict(loaded.tasks) == {}
    assert loaded.files == ()


def test_a_config_may_redefine_the_default_queue(tmp_path: Path) -> None:
    write(tmp_path / "jobd.toml", '[queue.default]\nconcurrency = 8\nscheduler = "fifo"\n')
    queue = load([str(tmp_path)]).queues["default"]
    assert (queue.concurrency, queue.scheduler) == (8, Scheduler.FIFO)


def test_task_defaults_come_from_the_daemon_section(tmp_path: Path) -> None:
    write(
        tmp_path / "jobd.toml",
        '[daemon]\nkill_grace = 3\nmax_output = 1024\n[task.t]\ncommand = ["/bin/true"]\n',
    )
    task = load([str(tmp_path)]).tasks["t"]
    assert task.queue == "default"
    assert task.parameters is ParameterMode.ARGS
    assert (task.kill_grace, task.max_output, task.timeout, task.working_dir) == (3.0, 1024, None, None)
    assert task.retry == RetryPolicy(times=0, delay=1.0, backoff=2.0, on_exit_codes=())
    assert dict(task.environment) == {}


def test_a_drop_in_changes_one_key_of_a_task(search: tuple[Path, Path, Path]) -> None:
    usr, _run, etc = search
    write(
        usr / "jobd.toml",
        '[queue.photo]\nconcurrency = 2\n\n[task.resize]\ncommand = ["/usr/bin/convert", "-resize", "50%"]\n'
        'queue = "photo"\ntimeout = 60\nenvironment = { A = "1" }\n',
    )
    write(etc / "jobd.d/50-local.toml", "[task.resize]\ntimeout = 120\n\n[queue.photo]\nconcurrency = 6\n")
    loaded = load(strs(*search))
    task = loaded.tasks["resize"]
    assert task.timeout == 120.0
    assert task.command == ("/usr/bin/convert", "-resize", "50%")
    assert task.queue == "photo"
    assert dict(task.environment) == {"A": "1"}
    assert loaded.queues["photo"].concurrency == 6


def test_an_inline_table_is_replaced_whole(search: tuple[Path, Path, Path]) -> None:
    usr, _run, etc = search
    write(
        usr / "jobd.toml",
        "[daemon]\nhistory = { keep_days = 7, keep_last = 100 }\n"
        '[task.t]\ncommand = ["/bin/true"]\nretry = { times = 3, delay = 10, on_exit_codes = [75] }\n',
    )
    write(etc / "jobd.d/10.toml", "[daemon]\nhistory = { keep_last = 5 }\n[task.t]\nretry = { times = 5 }\n")
    loaded = load(strs(*search))
    assert loaded.tasks["t"].retry == RetryPolicy(times=5)  # delay and codes back to their defaults
    assert (loaded.daemon.history.keep_days, loaded.daemon.history.keep_last) == (30, 5)


def test_every_key_is_read(tmp_path: Path) -> None:
    write(
        tmp_path / "jobd.toml",
        """
[daemon]
socket = "/tmp/j.sock"
state_dir = "/tmp/state"
durability = "fsync"
history = { keep_days = 1.5, keep_last = 10 }
kill_grace = 2
max_output = 0
max_connections = 64
max_connections_per_user = 8

[queue.q]
concurrency = 10000
scheduler = "fifo"
paused = true

[task.t]
command = ["/bin/echo", ""]
queue = "q"
parameters = "env"
allowed_params = ["EDITION", "list_2"]
working_dir = "/srv"
timeout = 0.5
kill_grace = 0
max_output = 99
[task.t.environment]
LANG = "C.UTF-8"
_x1 = ""
[task.t.retry]
times = 2
delay = 0
backoff = 1
on_exit_codes = [0, 255]
""",
    )
    loaded = load([str(tmp_path)])
    daemon = loaded.daemon
    assert (daemon.socket, daemon.state_dir, daemon.durability) == ("/tmp/j.sock", "/tmp/state", Durability.FSYNC)
    assert (daemon.history.keep_days, daemon.history.keep_last, daemon.kill_grace, daemon.max_output) == (
        1.5,
        10,
        2.0,
        0,
    )
    assert (daemon.max_connections, daemon.max_connections_per_user) == (64, 8)
    queue = loaded.queues["q"]
    assert (queue.concurrency, queue.scheduler, queue.paused) == (10000, Scheduler.FIFO, True)
    task = loaded.tasks["t"]
    assert task.command == ("/bin/echo", "")
    assert (task.queue, task.parameters, task.working_dir) == ("q", ParameterMode.ENV, "/srv")
    assert task.allowed_params == ("EDITION", "list_2")
    assert (task.timeout, task.kill_grace, task.max_output) == (0.5, 0.0, 99)
    assert dict(task.environment) == {"LANG": "C.UTF-8", "_x1": ""}
    assert task.retry == RetryPolicy(times=2, delay=0.0, backoff=1.0, on_exit_codes=(0, 255))


def test_the_config_is_frozen(tmp_path: Path) -> None:
    write(tmp_path / "jobd.toml", '[task.t]\ncommand = ["/bin/true"]\nenvironment = { A = "1" }\n')
    loaded = load([str(tmp_path)])
    with pytest.raises(TypeError):
        loaded.queues["x"] = loaded.queues["default"]  # type: ignore[index]
    with pytest.raises(TypeError):
        loaded.tasks["t"].environment["B"] = "2"  # type: ignore[index]


# --- errors: file, line, key and what is allowed ---------------------------------------------------------------


def test_the_documented_example_message(tmp_path: Path) -> None:
    write(tmp_path / "jobd.toml", '[task.resize]\ncommand = ["/usr/bin/convert"]\n')
    drop_in = write(
        tmp_path / "jobd.d/10-photo.toml",
        '# photo tasks\n\n[queue.photo]\nconcurrency = 2\n\n[task.resize]\nparameters = "argv"\n',
    )
    error = load_error(tmp_path)
    assert error.message == f'{drop_in}:7: task.resize.parameters: "argv" is not allowed; allowed: "args", "env"'
    assert error.details == {"file": str(drop_in), "line": 7, "key": "task.resize.parameters"}
    assert error.code == "CONFIG_INVALID"


def test_unknown_key_lists_the_allowed_keys_and_suggests_one(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", '[task.resize]\ncomand = ["/bin/true"]\n')
    error = load_error(tmp_path)
    assert error.message == (
        f"{path}:2: unknown key task.resize.comand (did you mean command?); allowed keys: command, queue, "
        "parameters, allowed_params, working_dir, environment, timeout, kill_grace, retry, max_output, user, group, "
        "run_as, on_success, on_failure, on_finish, http"
    )
    assert error.details["key"] == "task.resize.comand"


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", '[queue.a]\n\n[tasks.resize]\ncommand = ["/bin/true"]\n')
    error = load_error(tmp_path)
    assert error.message == (
        f"{path}:3: unknown section tasks (did you mean task?); "
        "allowed sections: daemon, queue, task, retry_schedule, schedule, tcp, http, access"
    )


def test_unknown_key_inside_an_inline_table_points_at_its_outer_key(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", '[task.t]\ncommand = ["/bin/true"]\nretry = { tmes = 3 }\n')
    error = load_error(tmp_path)
    assert error.message.startswith(f"{path}:3: unknown key task.t.retry.tmes (did you mean times?); allowed keys:")
    assert "times, delay, backoff, on_exit_codes" in error.message


# Each case: file text, the line and key the error must name, and a fragment saying what is allowed.
BAD_VALUES = {
    "wrong type": (
        '[task.t]\ncommand = ["/bin/true"]\ntimeout = "10"\n',
        3,
        "task.t.timeout",
        'expected a number > 0 and up to 3162240000, got "10" (a string)',
    ),
    "bool is not an int": (
        "[queue.q]\nconcurrency = true\n",
        2,
        "queue.q.concurrency",
        "expected an integer from 1 to 10000, got true (a boolean)",
    ),
    "out of range": (
        "[queue.q]\nconcurrency = 0\n",
        2,
        "queue.q.concurrency",
        "expected an integer from 1 to 10000, got 0",
    ),
    "bad enum in daemon": (
        '[daemon]\ndurability = "sync"\n',
        2,
        "daemon.durability",
        '"sync" is not allowed; allowed: "crash", "fsync"',
    ),
    "enum of the wrong type": (
        "[queue.q]\nscheduler = 1\n",
        2,
        "queue.q.scheduler",
        '1 is not allowed; allowed: "priority", "fifo"',
    ),
    "a socket path too long to bind": (
        f'[daemon]\nsocket = "/run/{"x" * 110}.sock"\n',
        2,
        "daemon.socket",
        "the path is 120 bytes long; a Unix socket's may be at most 107",
    ),
    "an evQueue socket path too long to bind": (
        f'[daemon]\nevqueue_socket = "/run/{"x" * 110}.sock"\n',
        2,
        "daemon.evqueue_socket",
        "the path is 120 bytes long",
    ),
    "an HTTP unix socket path too long to bind": (
        f'[http]\nlisten = "/run/{"x" * 110}.sock"\n',
        2,
        "http.listen",
        "the path is 120 bytes long; a Unix socket's may be at most 107",
    ),
    "an HTTP listen that is neither an address nor an absolute path": (
        '[http]\nlisten = "http.sock"\n',
        2,
        "http.listen",
        'an absolute path for a unix socket ("/run/jobd/http.sock"), or false for none',
    ),
    "a variable jobd sets itself": (
        '[task.t]\ncommand = ["/bin/true"]\nenvironment = { JOBD_QUEUE = "other" }\n',
        3,
        "task.t.environment.JOBD_QUEUE",
        "names starting with JOBD_ are set by jobd itself",
    ),
    "infinite number": (
        "[daemon]\nkill_grace = inf\n",
        2,
        "daemon.kill_grace",
        "expected a number >= 0 and up to 3162240000, got inf (numbers must be finite)",
    ),
    "a timeout past a century": (
        '[task.t]\ncommand = ["/bin/true"]\ntimeout = 1e300\n',
        3,
        "task.t.timeout",
        "expected a number > 0 and up to 3162240000, got 1e+300",
    ),
    "not a number": (
        '[task.t]\ncommand = ["/bin/true"]\ntimeout = nan\n',
        3,
        "task.t.timeout",
        "got nan (numbers must be finite)",
    ),
    "zero timeout": (
        '[task.t]\ncommand = ["/bin/true"]\ntimeout = 0\n',
        3,
        "task.t.timeout",
        "expected a number > 0 and up to 3162240000, got 0",
    ),
    "a per-user share of no connection": (
        "[daemon]\nmax_connections = 10\nmax_connections_per_user = 0\n",
        3,
        "daemon.max_connections_per_user",
        "expected an integer from 1 to 100000, got 0",
    ),
    "float where an int is needed": (
        "[daemon]\nmax_output = 1.5\n",
        2,
        "daemon.max_output",
        "expected an integer >= 0, got 1.5",
    ),
    "inside an inline table": (
        '[task.t]\ncommand = ["/bin/true"]\n\nretry = { times = 3, backoff = 0.5 }\n',
        4,
        "task.t.retry.backoff",
        "expected a number >= 1 and up to 3162240000, got 0.5",
    ),
    "more retries than a submit may ask": (
        '[task.t]\ncommand = ["/bin/true"]\nretry = { times = 10000000 }\n',
        3,
        "task.t.retry.times",
        "expected an integer from 0 to 1000, got 10000000",
    ),
    "exit code out of range": (
        '[task.t]\ncommand = ["/bin/true"]\nretry = { on_exit_codes = [1, 256] }\n',
        3,
        "task.t.retry.on_exit_codes",
        "expected an array of integers from 0 to 255, found 256",
    ),
    "history keep_last negative": (
        "[daemon]\nhistory = { keep_last = -1 }\n",
        2,
        "daemon.history.keep_last",
        "expected an integer >= 0, got -1",
    ),
    "a command with a number in it": (
        '[task.t]\ncommand = ["/bin/echo", 3]\n',
        2,
        "task.t.command",
        "expected a non-empty array of strings, the first one the program, got 3 as element 1",
    ),
    "an unknown key in a task's http table": (
        '[task.t]\n\n[task.t.http]\nurl = "http://127.0.0.1/"\nbogus = 1\n',
        5,
        "task.t.http.bogus",
        "unknown key 'bogus'; allowed: ",
    ),
    "a bad value in a task's http table": (
        '[task.t]\nhttp = { url = "http://127.0.0.1/", method = "FETCH" }\n',
        2,
        "task.t.http.method",
        "'method': \"FETCH\" is not allowed; allowed: ",
    ),
    "an integer beyond SQLite's 64 bits": (
        "[daemon]\nhistory = { keep_last = 9223372036854775808 }\n",
        2,
        "daemon.history.keep_last",
        "expected an integer from 0 to 9223372036854775807, got 9223372036854775808",
    ),
    "a size beyond SQLite's 64 bits": (
        '[task.t]\ncommand = ["/bin/true"]\nmax_output = 99999999999999999999\n',
        3,
        "task.t.max_output",
        "expected an integer from 0 to 9223372036854775807, got 99999999999999999999",
    ),
    "allowed_params of a task whose params are arguments": (
        '[task.t]\ncommand = ["/bin/true"]\nallowed_params = ["A"]\n',
        3,
        "task.t.allowed_params",
        'applies to parameters = "env" only',
    ),
    "allowed_params that is not an array of names": (
        '[task.t]\ncommand = ["/bin/true"]\nparameters = "env"\nallowed_params = "A"\n',
        4,
        "task.t.allowed_params",
        "expected an array of variable names",
    ),
    "allowed_params naming what jobd sets": (
        '[task.t]\ncommand = ["/bin/true"]\nparameters = "env"\nallowed_params = ["A", "JOBD_QUEUE"]\n',
        4,
        "task.t.allowed_params",
        '"JOBD_QUEUE" is not a name a job\'s params may set; allowed: A-Z a-z 0-9 _, not starting with a digit or',
    ),
    "allowed_params naming a variable that steers programs": (
        '[task.t]\ncommand = ["/usr/bin/php"]\nparameters = "env"\nallowed_params = ["EDITION", "PHPRC"]\n',
        4,
        "task.t.allowed_params",
        '"PHPRC" steers how programs are loaded or run: whoever may set it runs code of their choosing in the job',
    ),
    "an integer too large for a number of seconds": (
        '[task.t]\ncommand = ["/bin/true"]\ntimeout = 1' + "0" * 400 + "\n",
        3,
        "task.t.timeout",
        "expected a number > 0 and up to 3162240000, got an integer too large for a number",
    ),
    "history not a table": (
        "[daemon]\nhistory = 30\n",
        2,
        "daemon.history",
        "expected a table, got 30",
    ),
    "empty command": (
        "[task.t]\ncommand = []\n",
        2,
        "task.t.command",
        "expected a non-empty array of strings, the first one the program, got an array",
    ),
    "empty program": (
        '[task.t]\ncommand = ["", "x"]\n',
        2,
        "task.t.command",
        "the program (first element) is an empty string",
    ),
    "NUL in the command": (
        '[task.t]\ncommand = ["/bin/echo", "a\\u0000b"]\n',
        2,
        "task.t.command",
        "element 1 contains a NUL character",
    ),
    "missing command": (
        '\n[task.t]\nqueue = "default"\n',
        2,
        "task.t",
        "task.t: missing required key command (a non-empty array of strings; or an http table instead, for an HTTP "
        "task)",
    ),
    "relative working_dir": (
        '[task.t]\ncommand = ["/bin/true"]\nworking_dir = "srv"\n',
        3,
        "task.t.working_dir",
        'expected an absolute path (starting with /), got "srv" (a string)',
    ),
    "bad environment name in a table": (
        '[task.t]\ncommand = ["/bin/true"]\n[task.t.environment]\nOK = "1"\n"BAD NAME" = "2"\n',
        5,
        'task.t.environment."BAD NAME"',
        "invalid variable name; allowed: A-Z a-z 0-9 _, not starting with a digit",
    ),
    "environment value not a string": (
        '[task.t]\ncommand = ["/bin/true"]\nenvironment = { N = 1 }\n',
        3,
        "task.t.environment.N",
        "expected a string, got an integer",  # not the value: it may be a secret
    ),
    "undefined queue": (
        '[queue.video]\n[queue.photo]\n[task.resize]\ncommand = ["/bin/true"]\nqueue = "fotos"\n',
        5,
        "task.resize.queue",
        'queue "fotos" is not defined; defined queues: default, photo, video',
    ),
    "bad queue name": (
        '[daemon]\n\n[queue."a/b"]\nconcurrency = 2\n',
        3,
        'queue."a/b"',
        'invalid name "a/b"; allowed: 1 to 64 characters from A-Z a-z 0-9 _ . -, not starting with . or -',
    ),
    "bad task name": (
        '[task.-x]\ncommand = ["/bin/true"]\n',
        1,
        "task.-x",
        'invalid name "-x"',
    ),
    "too long a name": (
        f"[queue.{'q' * 65}]\n",
        1,
        f"queue.{'q' * 65}",
        "invalid name",
    ),
    "queue section not a table of tables": (
        "[queue]\nconcurrency = 4\n",
        2,
        "queue.concurrency",
        "expected a table [queue.concurrency], got 4",
    ),
    "admins not an array of names": (
        '[access]\nadmins = { users = "root" }\n',
        2,
        "access.admins.users",
        "expected an array of user or group names (1 to 64 characters from A-Z a-z 0-9 _ . @ $ -, not starting with "
        '. @ $ -), got "root" (a string)',
    ),
    "bad admin name": (
        '[access]\nadmins = { users = [".root"] }\n',
        2,
        "access.admins.users",
        'invalid name ".root"; allowed: user or group names (1 to 64 characters',
    ),
    "grant patterns not an array": (
        '[[access.grant]]\nusers = ["alice"]\nrights = ["read"]\ntasks = "x"\n',
        4,
        "access.grant[1].tasks",
        "expected an array of names of 1 to 64 characters from A-Z a-z 0-9 _ . -, with the wildcards * (any run) and "
        '? (one), got "x" (a string)',
    ),
    "bad grant pattern": (
        '[[access.grant]]\nusers = ["alice"]\nrights = ["read"]\ntasks = ["a/b"]\n',
        4,
        "access.grant[1].tasks",
        'invalid name "a/b"; allowed: names of 1 to 64 characters',
    ),
    "login groups not an array": (
        f'[tcp.users.u]\npassword_sha1 = "{"0" * 40}"\ngroups = "ops"\n',
        3,
        "tcp.users.u.groups",
        'expected an array of group names, got "ops" (a string)',
    ),
    # str.isdigit() says "¹²" is digits, which int() then refused with a traceback (INTERNAL_ERROR on a reload);
    # "٨٠٨٠" (Arabic-Indic digits), which int() reads, was port 8080.
    "a port in superscript digits": (
        '[tcp]\nlisten = "\u00b9\u00b2"\n',
        2,
        "tcp.listen",
        '"\\u00b9\\u00b2" is not allowed; allowed: a port ("5000", bound on 127.0.0.1)',
    ),
    "a port in Arabic-Indic digits": (
        '[http]\nlisten = "\u0668\u0660\u0668\u0660"\n',
        2,
        "http.listen",
        '"\\u0668\\u0660\\u0668\\u0660" is not allowed; allowed: a port ("5000", bound on 127.0.0.1)',
    ),
    "bad login group name": (
        f'[tcp.users.u]\npassword_sha1 = "{"0" * 40}"\ngroups = ["-ops"]\n',
        3,
        "tcp.users.u.groups",
        'invalid group name "-ops"; allowed: 1 to 64 characters from A-Z a-z 0-9 _ . -, not starting with . or -',
    ),
}


@pytest.mark.parametrize("text, line, key, allowed", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_name_file_line_key_and_what_is_allowed(
    tmp_path: Path, text: str, line: int, key: str, allowed: str
) -> None:
    path = write(tmp_path / "jobd.toml", text)
    error = load_error(tmp_path)
    assert error.message.startswith(f"{path}:{line}: ")
    assert key in error.message
    assert allowed in error.message
    assert error.details == {"file": str(path), "line": line, "key": key}


# Every kind of table the parser reads, as (what must come before it, its header and the keys it needs besides the
# one under test), so that each of its keys can be given a value of the test's choosing.
_HASH_40, _HASH_64 = '"' + "0" * 40 + '"', '"' + "0" * 64 + '"'
_TASK_T = '[task.t]\ncommand = ["/bin/true"]\n'
TABLES = {
    "DAEMON_KEYS": ("", "[daemon]", {}),
    "HISTORY_KEYS": ("", "[daemon.history]", {}),
    "QUEUE_KEYS": ("", "[queue.q]", {}),
    "TASK_KEYS": ("", "[task.u]", {"command": '["/bin/true"]'}),
    "RETRY_KEYS": ('[task.u]\ncommand = ["/bin/true"]\n', "[task.u.retry]", {}),
    "http_task.KEYS": ("", "[task.u.http]", {"url": '"http://127.0.0.1/"'}),
    "RETRY_SCHEDULE_KEYS": ("", "[retry_schedule.r]", {}),
    "RETRY_LEVEL_KEYS": ("", "[[retry_schedule.r.levels]]", {"delay": "1", "times": "1"}),
    "SCHEDULE_KEYS": (_TASK_T, "[schedule.s]", {"task": '"t"', "calendar": '"@daily"'}),
    "TCP_KEYS": ("", "[tcp]", {}),
    "TCP_USER_KEYS": ("", "[tcp.users.u]", {"password_sha1": _HASH_40}),
    "HTTP_KEYS": ("", "[http]", {}),
    "HTTP_TOKEN_KEYS": ("", "[http.tokens.t]", {"token_sha256": _HASH_64}),
    "ACCESS_KEYS": ("", "[access]", {}),
    "ADMINS_KEYS": ("", "[access.admins]", {}),
    "GRANT_KEYS": ("", "[[access.grant]]", {"users": '["root"]', "rights": '["read"]', "tasks": '["*"]'}),
}
_STRANGE = "b\x1b[31mc\x00d\u202ee\x85"  # an escape sequence, NUL, a right-to-left override, NEL
# Shaped to get past the first checks of the keys that parse their strings (a calendar's macro or fields, a URL,
# an address, a path), so that the deeper messages, which quote the part they refuse, are reached too.
_STRANGE_VALUES = (
    f"a\n{_STRANGE}",
    f"@a{_STRANGE}",
    f"0 0 * * {_STRANGE.replace(chr(0x85), '')}",
    f"0;0;{_STRANGE}",
    f"http://127.0.0.1/{_STRANGE}",
    f"127.0.0.1:{_STRANGE}",
    f"/{_STRANGE}",
)
_NOT_INERT = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _keys_of(registry: str) -> tuple[str, ...]:
    return http_task.KEYS if registry == "http_task.KEYS" else tuple(getattr(config, registry))


def _table_with(registry: str, key: str, value: str) -> str:
    """A configuration in which `key` of a table of that registry is `value` (an HTTP task's `http` replaces the
    `command` a task otherwise needs, a schedule's `workflow` its `task`)."""
    before, header, needed = TABLES[registry]
    settings = {name: text for name, text in needed.items() if (key, name) not in _INSTEAD}
    settings[key] = value
    return f"{before}{header}\n" + "".join(f"{name} = {text}\n" for name, text in settings.items())


_INSTEAD = {("http", "command"), ("workflow", "task")}


def _names(dotted: str, key: str) -> bool:
    """Whether the dotted key path of an error (`task.u.on_success[1]`) names `key` as one of its parts."""
    return re.search(rf"(^|\.){re.escape(key)}(\[|\.|$)", dotted) is not None


def test_the_table_of_tables_names_every_registry() -> None:
    assert {name for name in dir(config) if name.endswith("_KEYS")} | {"http_task.KEYS"} == set(TABLES)


@pytest.mark.parametrize("registry", TABLES)
def test_every_error_quoting_a_value_is_one_inert_line(tmp_path: Path, registry: str) -> None:
    """The error reaches the log, STATUS= and terminals (jobctl, `jobd --check-config`): whatever a value holds, it
    is one line, without a control character that would start another line or drive the terminal."""
    refused: dict[str, int] = {}
    for key in _keys_of(registry):
        refused[key] = 0
        for value in _STRANGE_VALUES:
            for spelled in (json.dumps(value), f"[{json.dumps(value)}]"):
                write(tmp_path / "jobd.toml", _table_with(registry, key, spelled))
                try:
                    load([str(tmp_path)])
                except ConfigError as error:
                    refused[key] += _names(error.details["key"] or "", key)
                    assert _NOT_INERT.search(error.message) is None, (key, spelled, error.message)
    # Each key refused some of them itself (NUL is allowed nowhere), so each key's own messages were seen.
    assert [key for key, count in refused.items() if count == 0] == []


@pytest.mark.parametrize("registry", TABLES)
def test_every_mistyped_key_is_told_the_key_it_resembles(tmp_path: Path, registry: str) -> None:
    """An unknown key is an error naming what is allowed in every kind of table; one letter off, it also names the
    key that was meant, as `(did you mean KEY?)`, whichever module checks that table (jobd.config, the http task's
    and the callbacks' checks)."""
    for key in _keys_of(registry):
        write(tmp_path / "jobd.toml", _table_with(registry, f"{key}x", "1"))
        assert f"(did you mean {key}?)" in load_error(tmp_path).message, key


def test_every_mistyped_callback_key_is_told_the_key_it_resembles(tmp_path: Path) -> None:
    mistyped = {"exec": '{ execx = ["/bin/true"] }', "http": '{ httpx = { url = "http://127.0.0.1/" } }'}
    for key in callbacks._HTTP_KEYS:  # inside the http table
        mistyped[key] = f'{{ http = {{ url = "http://127.0.0.1/", {key}x = 1 }} }}'
    for key, written in mistyped.items():
        write(tmp_path / "jobd.toml", f"{_TASK_T}on_success = [{written}]\n")
        assert f"(did you mean {key}?)" in load_error(tmp_path).message, key


# One name of each kind the list guards against, exact names and families: each would let whoever sets it run code
# of their choosing in the job or choose what it trusts.
@pytest.mark.parametrize(
    "name",
    [
        "PROMPT_COMMAND", "ZDOTDIR", "TERMINFO", "JDK_JAVA_OPTIONS", "GEM_PATH", "AWKLIBPATH", "R_PROFILE_USER",
        "RUSTC_WRAPPER", "LESSOPEN", "SSH_ASKPASS", "MAKEFILES", "OPENSSL_MODULES", "SASL_PATH", "GTK_MODULES",
        "GNUPGHOME", "MALLOC_PERTURB_", "NPM_CONFIG_PREFIX", "npm_config_prefix", "PIP_INDEX_URL", "LUA_INIT",
        "DOTNET_STARTUP_HOOKS", "MAGICK_CONFIGURE_PATH", "GST_PLUGIN_PATH", "ERL_LIBS", "PERL5OPT", "NODE_OPTIONS",
        "CFLAGS", "MAVEN_OPTS", "SSLKEYLOGFILE",
    ],
)  # fmt: skip
def test_allowed_params_refuses_variables_that_steer_programs(tmp_path: Path, name: str) -> None:
    path = write(
        tmp_path / "jobd.toml",
        f'[task.t]\ncommand = ["/bin/true"]\nparameters = "env"\nallowed_params = ["SIZE", "{name}"]\n',
    )
    error = load_error(tmp_path)
    assert error.message.startswith(f"{path}:4: task.t.allowed_params: ")
    assert f'"{name}" steers how programs are loaded or run' in error.message


def test_allowed_params_takes_names_that_only_look_like_steering_ones(tmp_path: Path) -> None:
    write(
        tmp_path / "jobd.toml",
        '[task.t]\ncommand = ["/bin/true"]\nparameters = "env"\n'
        'allowed_params = ["SIZE", "CCY", "PATHNAME", "MAKE_TARGET", "GIT", "R_SCRIPT_ARG"]\n',
    )
    assert load(strs(tmp_path)).tasks["t"].allowed_params == (
        "SIZE", "CCY", "PATHNAME", "MAKE_TARGET", "GIT", "R_SCRIPT_ARG",
    )  # fmt: skip


def test_a_merged_key_is_reported_in_the_file_whose_value_won(search: tuple[Path, Path, Path]) -> None:
    usr, run, _etc = search
    write(usr / "jobd.toml", "[queue.q]\nconcurrency = 2\n")
    drop_in = write(run / "jobd.d/10-q.toml", "# raise the limit\n\n[queue.q]\nconcurrency = -4\n")
    error = load_error(*search)
    assert error.message == f"{drop_in}:4: queue.q.concurrency: expected an integer from 1 to 10000, got -4"


def test_lines_inside_multi_line_values_are_not_taken_for_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path / "jobd.toml",
        '[task.t]\ncommand = [\n  "/bin/sh",\n  "-c",\n  """\ntimeout = 5\n""",\n]\n'
        "environment = { A = 'x = [' }\ntimeout = -5\n",
    )
    error = load_error(tmp_path)
    assert error.message.startswith(f"{path}:10: task.t.timeout:")


def test_a_dotted_key_line_is_found(tmp_path: Path) -> None:
    path = write(tmp_path / "jobd.toml", '[task.t]\ncommand = ["/bin/true"]\nretry.times = 1\nretry.delay = -1\n')
    assert load_error(tmp_path).message.startswith(f"{path}:4: task.t.retry.delay:")


def test_a_bad_callback_names_the_line_of_its_own_table(tmp_path: Path) -> None:
    # The second [[queue.q.on_success]] was reported at the first one's line, with the array's key; then at its own
    # table's line, with the array element's key; now at the line and with the key of the value at fault.
    path = write(
        tmp_path / "jobd.toml",
        '[queue.q]\n\n[[queue.q.on_success]]\nexec = ["/bin/true"]\n\n[[queue.q.on_success]]\nexec = ["relative"]\n',
    )
    error = load_error(tmp_path)
    assert error.message.startswith(f"{path}:7: queue.q.on_success[2].exec: the program must be an absolute path")
    assert (error.details["line"], error.details["key"]) == (7, "queue.q.on_success[2].exec")


def test_a_file_name_with_control_characters_is_named_in_one_inert_line(tmp_path: Path) -> None:
    # A newline in a drop-in's name split the error in two, the second line reading as an error of its own in the
    # log and in STATUS=; an escape sequence reached the terminal of whoever read it.
    name = "10-a\nFAKE.toml:1: \x1b[31mred\u202e.toml"
    write(tmp_path / "jobd.d" / name, "[queue.x]\nconcurrency = -1\n")
    error = load_error(tmp_path)
    shown = "10-a\\x0aFAKE.toml:1: \\x1b[31mred\\u202e.toml"
    assert error.message.startswith(f"{tmp_path}/jobd.d/{shown}:2: queue.x.concurrency:"), error.message
    assert "\n" not in error.message and "\x1b" not in error.message and "\u202e" not in error.message
    assert error.details["file"] == str(tmp_path / "jobd.d" / name)  # the data keeps the name as it is


def test_a_toml_syntax_error_names_the_parsers_line(tmp_path: Path) -> None:
    write(tmp_path / "jobd.toml", "[queue.ok]\n")
    path = write(tmp_path / "jobd.d/20-x.toml", "[queue.a]\nconcurrency = 2\nscheduler fifo\n")
    error = load_error(tmp_path)
    assert re.fullmatch(rf"{re.escape(str(path))}:3: invalid TOML: .* \(column \d+\)", error.message)
    assert error.details == {"file": str(path), "line": 3, "key": None}


def test_a_byte_order_mark_is_named(tmp_path: Path) -> None:
    path = tmp_path / "jobd.toml"
    path.write_bytes(b"\xef\xbb\xbf[queue.q]\nconcurrency = 2\n")  # as some Windows editors save UTF-8
    error = load_error(tmp_path)
    assert error.message == f"{path}:1: the file starts with a byte order mark (BOM); save it as UTF-8 without one"
    assert (error.details["file"], error.details["line"]) == (str(path), 1)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "jobd.toml"
    path.write_bytes(b'[daemon]\n\nsocket = "/run/\xffjobd.sock"\n')
    error = load_error(tmp_path)
    assert error.message == f"{path}:3: invalid UTF-8 (byte 0xff at column 16); files must be UTF-8"
    assert error.details["line"] == 3


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "jobd.d").mkdir()
    dangling = tmp_path / "jobd.d/10-gone.toml"
    dangling.symlink_to(tmp_path / "nowhere.toml")
    error = load_error(tmp_path)
    assert error.message == f"{dangling}: cannot read: No such file or directory"
    assert error.details == {"file": str(dangling), "line": None, "key": None}


def test_two_listeners_on_one_socket_path_are_an_error(tmp_path: Path) -> None:
    """The evQueue listener would replace the API's socket file: jobctl would then talk to the wrong protocol."""
    path = write(
        tmp_path / "jobd.toml", '[daemon]\nsocket = "/run/x/jobd.sock"\nevqueue_socket = "/run/x//jobd.sock"\n'
    )
    error = load_error(tmp_path)
    assert error.message == (
        f"{path}:3: daemon.evqueue_socket: '/run/x//jobd.sock' is the path of daemon.socket too; each listener "
        "needs a socket of its own"
    )
    assert error.details == {"file": str(path), "line": 3, "key": "daemon.evqueue_socket"}
    # A path set for one key that meets another key's default: the key that was set is named.
    write(tmp_path / "jobd.toml", '[daemon]\nsocket = "/run/jobd/evqueue.sock"\n')
    assert load_error(tmp_path).details["key"] == "daemon.socket"
    write(tmp_path / "jobd.toml", '[daemon]\nevqueue_socket = false\n[http]\nlisten = "/run/jobd/jobd.sock"\n')
    assert "http.listen: '/run/jobd/jobd.sock' is the path of daemon.socket too" in load_error(tmp_path).message
    write(tmp_path / "jobd.toml", '[daemon]\nevqueue_socket = false\nsocket = "/run/a.sock"\n')
    assert load(strs(tmp_path)).daemon.evqueue_socket is None  # off: no path of its own to compare


def test_two_listeners_on_one_socket_through_a_symlinked_directory_are_an_error(tmp_path: Path) -> None:
    """As /var/run and /run on Debian: the evQueue listener would replace the API's socket file all the same."""
    (tmp_path / "run" / "jobd").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    config = tmp_path / "etc"
    path = write(
        config / "jobd.toml",
        f'[daemon]\nsocket = "{tmp_path}/run/jobd/jobd.sock"\nevqueue_socket = "{tmp_path}/var/run/jobd/jobd.sock"\n',
    )
    error = load_error(config)
    assert error.message == (
        f"{path}:3: daemon.evqueue_socket: '{tmp_path}/var/run/jobd/jobd.sock' is the path of daemon.socket too; "
        "each listener needs a socket of its own"
    )
    # A directory not made yet is compared as far as it exists: /var/run/new is /run/new.
    write(
        config / "jobd.toml",
        f'[daemon]\nsocket = "{tmp_path}/run/new/a.sock"\nevqueue_socket = "{tmp_path}/var/run/new/a.sock"\n',
    )
    assert load_error(config).details["key"] == "daemon.evqueue_socket"


def test_a_symlink_loop_is_an_error_naming_the_file_not_its_directory(tmp_path: Path) -> None:
    (tmp_path / "jobd.d").mkdir()
    looped = tmp_path / "jobd.d/10-loop.toml"
    looped.symlink_to(looped.name)
    error = load_error(tmp_path)
    assert error.message == f"{looped}: cannot read: Too many levels of symbolic links"


def test_values_nested_too_deeply_are_an_error_naming_the_file(tmp_path: Path) -> None:
    """tomllib recurses once per level: a file that nests deeper than Python's stack is a config error, not a
    RecursionError's traceback."""
    deep = write(tmp_path / "jobd.d/10-deep.toml", "x = " + "[" * 2000 + "]" * 2000 + "\n")
    error = load_error(tmp_path)
    assert error.message.startswith(f"{deep}: invalid TOML: arrays or inline tables nested too deeply"), error


# --- the documentation stays in sync ---------------------------------------------------------------------------


# The key tables of docs/config.md, in the order they come, with the section heading each is under and the
# registry the parser checks that table's keys against.
DOC_TABLES = [
    ("[daemon]", "DAEMON_KEYS"),
    ("[daemon]", "HISTORY_KEYS"),
    ("[queue.NAME]", "QUEUE_KEYS"),
    ("[task.NAME]", "TASK_KEYS"),
    ("[task.NAME]", "http_task.KEYS"),
    ("[task.NAME]", "RETRY_KEYS"),
    ("[retry_schedule.NAME]", "RETRY_SCHEDULE_KEYS"),
    ("[retry_schedule.NAME]", "RETRY_LEVEL_KEYS"),
    ("[schedule.NAME]", "SCHEDULE_KEYS"),
    ("[tcp]", "TCP_KEYS"),
    ("[tcp]", "TCP_USER_KEYS"),
    ("[http]", "HTTP_KEYS"),
    ("[http]", "HTTP_TOKEN_KEYS"),
    ("[access]", "ACCESS_KEYS"),
    ("[access]", "GRANT_KEYS"),
]


def _doc_key_tables() -> list[tuple[str, list[str]]]:
    """Each `| key | ...` table of docs/config.md: the `[section]` of the heading it is under, and the names its
    first column lists (a row may name several keys: `on_success`, `on_failure`, `on_finish`)."""
    tables: list[tuple[str, list[str]]] = []
    heading, keys = "", None
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            found = re.search(r"`(\[[^`]*\])`", line)
            heading = found[1] if found else line
        if line.startswith("| key |"):
            keys = []
            tables.append((heading, keys))
        elif keys is not None and line.startswith("|") and not line.startswith("|---"):
            keys += re.findall(r"`([^`]+)`", line.split("|")[1])
        elif not line.startswith("|"):
            keys = None
    return tables


def test_docs_tables_list_exactly_the_keys_the_parser_takes() -> None:
    """Both ways: a key the parser takes that no table lists is undocumented, a listed key it refuses is stale."""
    documented = _doc_key_tables()
    assert [heading for heading, _ in documented] == [heading for heading, _ in DOC_TABLES]
    problems = []
    for (heading, keys), (_, registry) in zip(documented, DOC_TABLES, strict=True):
        taken = _keys_of(registry)
        problems += [f"{heading} ({registry}): {key} is not listed" for key in taken if key not in keys]
        problems += [f"{heading} ({registry}): {key} is not a key" for key in keys if key not in taken]
    # `[access] admins` is a small inline table, described in its row of the [access] table.
    admins_row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `admins` |"))
    problems += [f"[access] admins: {key} is not named" for key in config.ADMINS_KEYS if f"`{key}`" not in admins_row]
    assert problems == []
    assert {registry for _, registry in DOC_TABLES} | {"ADMINS_KEYS"} == set(TABLES)


# The literal defaults the documents give (`10`, `"crash"`, `false`, `{ keep_days = 30 }`; not the prose ones such
# as "no limit" or "`[daemon] kill_grace`") must be what the parser gives a key left out. Each kind of table is read
# here with only the keys it needs, and the values of the others are compared with both documents.
_WITH_ONLY_WHAT_IS_NEEDED = f"""
[queue.q]
[task.t]
command = ["/bin/true"]
on_success = [{{ http = {{ url = "http://127.0.0.1/" }} }}]
[task.h]
http = {{ url = "http://127.0.0.1/" }}
[schedule.s]
task = "t"
calendar = "@daily"
[tcp.users.u]
password_sha1 = {_HASH_40}
[http.tokens.k]
token_sha256 = {_HASH_64}
[[access.grant]]
groups = ["g"]
rights = ["read"]
queues = ["*"]
[[access.grant]]
users = ["u"]
rights = ["read"]
workflows = ["*"]
"""


def _comparable(value: object) -> object:
    """A value of the model as TOML writes it: tuples and sets as arrays, mappings and dataclasses as tables."""
    if isinstance(value, tuple | list | frozenset | set):
        items = [_comparable(item) for item in value]
        return items if isinstance(value, tuple | list) else sorted(items, key=str)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _comparable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _comparable(v) for k, v in value.items()}
    return value


def _code_defaults(tmp_path: Path) -> dict[str, dict[str, object]]:
    """For each table (by the registry that checks its keys): each key's value when the file leaves it out. (The
    suite runs as root, for whom both documents give `default_user` as nobody.)"""
    loaded = load_dir(str(write(tmp_path / "jobd.toml", _WITH_ONLY_WHAT_IS_NEEDED).parent))
    found = {
        "DAEMON_KEYS": loaded.daemon,
        "HISTORY_KEYS": loaded.daemon.history,
        "QUEUE_KEYS": loaded.queues["q"],
        "TASK_KEYS": loaded.tasks["t"],
        "RETRY_KEYS": loaded.tasks["t"].retry,
        "SCHEDULE_KEYS": loaded.schedules["s"],
        "TCP_KEYS": loaded.tcp,
        "TCP_USER_KEYS": loaded.tcp.users["u"],
        "HTTP_KEYS": loaded.http,
        "HTTP_TOKEN_KEYS": loaded.http.tokens["k"],
    }
    defaults = {registry: cast(dict[str, object], _comparable(value)) for registry, value in found.items()}
    # A table whose keys left out are None is written as the keys it has: `{ keep_days = 30 }`.
    history = defaults["DAEMON_KEYS"]["history"]
    defaults["DAEMON_KEYS"]["history"] = {k: v for k, v in cast(dict[str, object], history).items() if v is not None}
    # A grant needs users or groups, and something to grant rights on: two grants, each leaving out what the other
    # gives.
    first, second = (cast(dict[str, object], _comparable(grant)) for grant in loaded.access.grants)
    defaults["GRANT_KEYS"] = {
        **{key: first[key] for key in ("users", "workflows", "tasks")},
        **{key: second[key] for key in ("groups", "queues")},
    }
    access = loaded.access
    admins = {"users": sorted(access.admin_users), "groups": sorted(access.admin_groups)}
    defaults["ACCESS_KEYS"] = {"admins": admins}
    # An HTTP request's timeout left out is None in the request: the fetcher's DEFAULT_TIMEOUT applies when it is
    # made. A callback's likewise.
    http = dict(loaded.tasks["h"].http or {})
    assert http["timeout"] is None
    defaults["http_task.KEYS"] = {**http, "timeout": http_task.DEFAULT_TIMEOUT}
    callback = (loaded.tasks["t"].callbacks or {})["on_success"][0]["http"]
    defaults["Callbacks"] = {**callback, "timeout": callback.get("timeout", callbacks.HTTP_TIMEOUT)}
    return defaults


def _literal(text: str, bare_words: bool) -> tuple[object] | None:
    """A default as written, parsed as TOML (`10`, `"crash"`, `0o660`, `{ keep_days = 30 }`), in a 1-tuple; with
    `bare_words`, also a word or path as the man page sets it in `.Li`/`.Pa` (`default`, `/var/lib/jobd`)."""
    try:
        return (tomllib.loads(f"v = {text}")["v"],)
    except tomllib.TOMLDecodeError:
        return (text,) if bare_words and re.fullmatch(r"[\w./-]+", text) else None


def _doc_defaults() -> list[tuple[str, str, str]]:
    """(registry, key, literal) for each row of docs/config.md's key tables whose default is a literal."""
    found: list[tuple[str, str, str]] = []
    tables = iter(DOC_TABLES)
    registry, column = "", None
    for line in DOCS.read_text().splitlines():
        if line.startswith("| key |"):
            registry, column = next(tables)[1], [c.strip() for c in line.strip("|").split("|")].index("default")
        elif column is not None and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            written = re.fullmatch(r"`([^`]+)`(?: \(.*\)| when .*)?|(\d+)", cells[column])
            for key in re.findall(r"`([^`]+)`", cells[0]) if written else ():
                found.append((registry, key, written[1] or written[2]))
        elif not line.startswith("|"):
            column = None
    return found


def _man_defaults() -> list[tuple[str, str, str]]:
    """(registry, key, literal) for each key of jobd.toml(5) whose default is a literal: `Default: 10.`,
    `Default:` followed by `.Li false .` or `.Pa /var/lib/jobd .`, or `.Li X` followed by "(the default)"."""
    registries = {subsection: registry for registry, subsection in CONFIG_REGISTRIES.items()}
    registries.update({"[task.NAME] http": "http_task.KEYS", "Callbacks": "Callbacks"})
    page = parse_man_page("jobd.toml.5")
    found: list[tuple[str, str, str]] = []
    for subsection in page.subsections("SECTIONS"):
        keys: list[str] = []
        lines = page.section("SECTIONS", subsection).source
        for before, line, after in zip(["", *lines[:-1]], lines, [*lines[1:], ""], strict=True):
            if line.startswith(".It Cm "):
                keys = [word for word in line[len(".It Cm ") :].split(" No ")[0].split() if word != ","]
            elif line.startswith(".El"):
                keys = []
            number = re.fullmatch(r"Default: ([\d.]+?)\.?(?: \(.*\)\.)?", line)
            macro = after if line == "Default:" else before if line.startswith("(the default)") else ""
            words = [m[1] if m[1] is not None else m[2] for m in MAN_TOKEN.finditer(macro)]
            if number is not None:
                written = number[1]
            elif words[:1] in ([".Li"], [".Pa"]) and len(words) > 1:
                written = unescape_man(words[1])
            else:
                continue
            found += [(registries[subsection], key, written) for key in keys if subsection in registries]
    return found


def _same(written: object, default: object) -> bool:
    """`false` is how the documents write a key that is off (`listen`), which the model holds as None."""
    if written is False and default is None:
        return True
    return isinstance(written, bool) == isinstance(default, bool) and written == default


def test_the_documented_defaults_are_the_ones_the_parser_gives(tmp_path: Path) -> None:
    """docs/config.md said one thing and jobd.toml(5) another, or both something the code no longer does: each
    literal default either document writes is compared with what a key left out is read as."""
    defaults = _code_defaults(tmp_path)
    problems, checked = [], 0
    for document, written, bare_words in (
        ("docs/config.md", _doc_defaults(), False),
        ("jobd.toml.5", _man_defaults(), True),
    ):
        for registry, key, text in written:
            literal = _literal(text, bare_words)
            if literal is None:
                continue  # prose ("no limit"), or another key named as the default ("[daemon] kill_grace")
            checked += 1
            if key not in defaults.get(registry, {}):
                problems.append(f"{document}: {key} ({registry}): default {text}, but this test reads no such key")
            elif not _same(literal[0], defaults[registry][key]):
                problems.append(f"{document}: {key} ({registry}): default {text}, read as {defaults[registry][key]!r}")
    assert problems == []
    assert checked >= 60, f"only {checked} documented defaults found: did a document's layout change?"


def test_docs_name_every_key_a_reload_cannot_apply() -> None:
    """The [daemon] keys a reload leaves as they were at the start (jobd.daemon warns for them) are named where the
    docs say what a reload does: docs/config.md's Reloading and jobd.toml(5)'s RELOADING."""
    reloading = DOCS.read_text().split("## Reloading", 1)[1]
    page = (DOCS.parent.parent / "man" / "jobd.toml.5").read_text()
    man_reloading = page.split(".Sh RELOADING", 1)[1].split("\n.Sh ", 1)[0]
    missing = [f"docs/config.md: {key}" for key in RESTART_ONLY_DAEMON_KEYS if f"`{key}`" not in reloading]
    missing += [f"jobd.toml.5: {key}" for key in RESTART_ONLY_DAEMON_KEYS if f"Cm {key}" not in man_reloading]
    assert missing == []


def test_the_docs_example_is_valid(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert example is not None
    write(tmp_path / "jobd.toml", example[1])
    loaded = load([str(tmp_path)])
    assert loaded.tasks and len(loaded.queues) > 1


def test_the_docs_crontab_line_and_its_translation_agree(tmp_path: Path) -> None:
    """docs/config.md, "Coming from cron": the system crontab line and the drop-in it becomes. The drop-in loads as
    jobd's configuration, and keeps the line's user, the directory it cd's to, its program and arguments, and its
    times (the five fields as they are: from a Friday after the run, the next is Monday at 02:15)."""
    section = DOCS.read_text().split("#### Coming from cron or systemd timers", 1)[1].split("\n### ", 1)[0]
    crontab, dropin = re.findall(r"```\n(.*?)```", section, re.DOTALL)
    [line] = [line for line in crontab.splitlines() if line and not line.startswith("MAILTO=")]
    *fields, user, command = line.split(None, 6)
    shell = re.fullmatch(r"cd (\S+) && (.*?) >> \S+ 2>&1", command)
    assert shell is not None, command
    directory, program_and_args = shell.groups()
    write(tmp_path / "jobd.toml", dropin)
    loaded = load([str(tmp_path)])
    [task] = loaded.tasks.values()
    [schedule] = loaded.schedules.values()
    assert (schedule.target_kind, schedule.target, schedule.calendar) == ("task", task.name, " ".join(fields))
    assert (task.user, task.working_dir) == (user, directory)
    program, *args = program_and_args.split()
    assert task.command == (f"{directory}/{program}", *args)
    assert task.callbacks is not None and task.callbacks["on_failure"], "MAILTO has no counterpart"
    calendar = Calendar.parse(schedule.calendar)
    friday_after_the_run = datetime(2026, 12, 4, 3, 0, tzinfo=UTC).timestamp()
    monday = calendar.next_after(friday_after_the_run, "UTC")
    assert datetime.fromtimestamp(monday, UTC) == datetime(2026, 12, 7, 2, 15, tzinfo=UTC)
    assert datetime.fromtimestamp(calendar.next_after(monday, "UTC"), UTC) == datetime(2026, 12, 8, 2, 15, tzinfo=UTC)


# --- the watcher ----------------------------------------------------------------------------------------------


class Changes:
    """The on_change callback: counts calls and wakes a waiting test."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.event.wait(), timeout=5)
        self.event.clear()


async def let_the_loop_run() -> None:
    # inotify queues an event inside the write's system call, so after a few loop iterations the watcher has
    # read it and scheduled (or not) its callback. These are yields, not timed sleeps.
    for _ in range(5):
        await asyncio.sleep(0)


def watching(dirs: list[Path], body: Callable[[Changes], Awaitable[None]]) -> None:
    async def main() -> None:
        changes = Changes()
        watcher = ConfigWatcher(strs(*dirs), changes)
        watcher.start(asyncio.get_running_loop())
        try:
            await body(changes)
        finally:
            watcher.close()

    asyncio.run(main())


def test_watcher_sees_a_written_main_file(search: tuple[Path, Path, Path]) -> None:
    async def body(changes: Changes) -> None:
        write(search[2] / "jobd.toml", "[queue.a]\n")
        await changes.next()

    watching(list(search), body)


def test_watcher_sees_a_drop_in_renamed_into_place(search: tuple[Path, Path, Path]) -> None:
    drop_ins = search[0] / "jobd.d"
    drop_ins.mkdir()

    async def body(changes: Changes) -> None:
        temporary = write(drop_ins / ".10-a.toml.tmp", "[queue.a]\n")
        await let_the_loop_run()
        assert changes.calls == 0
        temporary.rename(drop_ins / "10-a.toml")
        await changes.next()
        (drop_ins / "10-a.toml").unlink()
        await changes.next()

    watching(list(search), body)


def test_watcher_ignores_editor_files(search: tuple[Path, Path, Path]) -> None:
    async def body(changes: Changes) -> None:
        write(search[2] / ".jobd.toml.swp", "x")
        write(search[2] / "4913", "x")
        (search[2] / "4913").unlink()
        write(search[2] / "jobd.toml~", "x")
        await let_the_loop_run()
        assert changes.calls == 0
        write(search[2] / "jobd.toml", "")  # and the watcher is alive
        await changes.next()
        assert changes.calls == 1

    watching(list(search), body)


def test_watcher_coalesces_a_batch_into_one_call(search: tuple[Path, Path, Path]) -> None:
    async def body(changes: Changes) -> None:
        for name in ("10-a.toml", "20-b.toml", "30-c.toml"):
            write(search[1] / "jobd.d" / name, "")
        write(search[1] / "jobd.toml", "")
        await changes.next()
        await let_the_loop_run()
        assert changes.calls == 1

    (search[1] / "jobd.d").mkdir()
    watching(list(search), body)


def test_watcher_waits_for_a_file_replaced_in_two_steps(search: tuple[Path, Path, Path]) -> None:
    # As `install`, `cp --remove-destination` or an editor that keeps a backup do: the old file goes first, then
    # the new one is written. A reload in between would apply a configuration without that file.
    main = write(search[2] / "jobd.toml", "[queue.a]\n")

    async def body(changes: Changes) -> None:
        main.unlink()
        await let_the_loop_run()  # the watcher has read the removal, and waits for the files to settle
        assert changes.calls == 0
        write(main, "[queue.a]\nconcurrency = 2\n")
        await changes.next()
        assert changes.calls == 1

    watching(list(search), body)


def test_watcher_sees_a_hard_linked_drop_in(search: tuple[Path, Path, Path], tmp_path: Path) -> None:
    drop_ins = search[2] / "jobd.d"
    drop_ins.mkdir()
    prepared = write(tmp_path / "prepared.toml", "[queue.a]\n")

    async def body(changes: Changes) -> None:
        os.link(prepared, drop_ins / "10-a.toml")  # complete at once: no IN_CLOSE_WRITE follows its IN_CREATE
        await changes.next()

    watching(list(search), body)


def test_watcher_sees_a_fifo_made_with_a_drop_ins_name(search: tuple[Path, Path, Path]) -> None:
    """No write follows a FIFO's IN_CREATE: it was left unseen, the running configuration reported sound, until
    the next reload found the error (docs/config.md: a FIFO with a counted name is an error naming it)."""
    drop_ins = search[2] / "jobd.d"
    drop_ins.mkdir()

    async def body(changes: Changes) -> None:
        os.mkfifo(drop_ins / "10-a.toml")
        await changes.next()

    watching(list(search), body)


def test_watcher_follows_a_jobd_d_symlink_switched_to_another_release(
    search: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    release_1, release_2 = tmp_path / "release-1", tmp_path / "release-2"
    write(release_1 / "10-a.toml", "[queue.a]\n")
    write(release_2 / "10-a.toml", "[queue.b]\n")
    (search[2] / "jobd.d").symlink_to(release_1)

    async def body(changes: Changes) -> None:
        write(release_1 / "20-b.toml", "")  # the target of the symlink is watched
        await changes.next()
        switch = search[2] / "jobd.d.new"
        switch.symlink_to(release_2)
        switch.rename(search[2] / "jobd.d")  # the usual atomic switch of a symlink
        await changes.next()
        write(release_2 / "20-b.toml", "")  # and the watch has moved to the new target
        await changes.next()

    watching(list(search), body)


def _switch(link: Path, target: Path) -> None:
    """Point `link` at `target` the way deployments do: a new symlink renamed over the old one."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    new.rename(link)


def test_watcher_follows_a_release_symlink_switched_above_jobd_d(
    search: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """jobd.d -> /srv/app/current/jobd, and `current -> releases/N` switched by the next deployment: the switch went
    unseen (only the directories at the end of the links were watched), and so did every edit in the new release."""
    releases = tmp_path / "srv" / "app" / "releases"
    for number in (1, 2):
        write(releases / str(number) / "jobd" / "10-a.toml", f"[queue.r{number}]\n")
    current = tmp_path / "srv" / "app" / "current"
    current.symlink_to(releases / "1")
    (search[2] / "jobd.d").symlink_to(current / "jobd")

    async def body(changes: Changes) -> None:
        _switch(current, releases / "2")
        await changes.next()
        write(releases / "2" / "jobd" / "20-b.toml", "")  # and the watch has moved to the new release
        await changes.next()

    watching(list(search), body)


def test_watcher_follows_a_configuration_directory_that_is_a_symlink_switched(tmp_path: Path) -> None:
    """The configuration directory itself a symlink (`--config-dir /etc/app/jobd`, a link to a release): its
    switch, and then the new release's files, went unseen."""
    releases = tmp_path / "releases"
    for number in (1, 2):
        write(releases / str(number) / "jobd.toml", f"[queue.r{number}]\n")
    directory = tmp_path / "jobd"
    directory.symlink_to(releases / "1")

    async def body(changes: Changes) -> None:
        _switch(directory, releases / "2")
        await changes.next()
        write(releases / "2" / "jobd.toml", "[queue.r2]\nconcurrency = 2\n")
        await changes.next()

    watching([directory], body)


def test_watcher_sees_the_target_of_a_jobd_d_symlink_made_again(
    search: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """jobd.d -> /srv/app/conf, and that directory removed then made again (a deployment that replaces it): its
    new files went unseen until a SIGHUP, the watch having fallen back to the symlink's own directory."""
    target = tmp_path / "srv" / "app" / "conf"
    write(target / "10-a.toml", "[queue.a]\n")
    (search[2] / "jobd.d").symlink_to(target)

    async def body(changes: Changes) -> None:
        shutil.rmtree(tmp_path / "srv" / "app")
        await changes.next()  # the drop-in went with it
        target.mkdir(parents=True)
        await changes.next()  # the target is back: the watch follows it (files may already be in it)
        write(target / "10-a.toml", "[queue.a]\n")
        await changes.next()

    watching(list(search), body)


def test_watcher_follows_a_jobd_d_created_after_start(search: tuple[Path, Path, Path]) -> None:
    async def body(changes: Changes) -> None:
        (search[2] / "jobd.d").mkdir()
        await changes.next()  # files may already be in it: the daemon must rescan
        write(search[2] / "jobd.d/10-a.toml", "[queue.a]\n")
        await changes.next()
        (search[2] / "jobd.d/20-b.toml").symlink_to("/dev/null")  # a mask gets no IN_CLOSE_WRITE
        await changes.next()

    watching(list(search), body)


def test_watcher_follows_a_search_dir_created_after_start(tmp_path: Path) -> None:
    later = tmp_path / "etc/jobd"

    async def body(changes: Changes) -> None:
        later.mkdir(parents=True)
        await changes.next()
        write(later / "jobd.toml", "")
        await changes.next()
        (later / "jobd.d").mkdir()
        await changes.next()
        write(later / "jobd.d/10-a.toml", "")
        await changes.next()

    watching([tmp_path / "usr", later], body)


def test_watcher_notices_a_removed_and_recreated_drop_in_dir(search: tuple[Path, Path, Path]) -> None:
    drop_ins = search[0] / "jobd.d"
    write(drop_ins / "10-a.toml", "")

    async def body(changes: Changes) -> None:
        (drop_ins / "10-a.toml").unlink()
        drop_ins.rmdir()
        await changes.next()
        write(drop_ins / "10-a.toml", "")
        await changes.next()
        await let_the_loop_run()
        changes.event.clear()
        write(drop_ins / "20-b.toml", "")
        await changes.next()

    watching(list(search), body)


def test_watcher_close_stops_calls(search: tuple[Path, Path, Path]) -> None:
    async def main() -> None:
        changes = Changes()
        watcher = ConfigWatcher(strs(*search), changes)
        watcher.start(asyncio.get_running_loop())
        write(search[0] / "jobd.toml", "")
        watcher.close()
        watcher.close()
        await let_the_loop_run()
        assert changes.calls == 0

    asyncio.run(main())


def test_keep_days_false_means_no_age_limit(tmp_path: Path) -> None:
    (tmp_path / "jobd.toml").write_text("[daemon]\nhistory = { keep_days = false, keep_last = 10 }\n")
    history = config.load([str(tmp_path)]).daemon.history
    assert (history.keep_days, history.keep_last) == (None, 10)
    (tmp_path / "jobd.toml").write_text("[daemon]\nhistory = { keep_days = true }\n")
    with pytest.raises(ConfigError) as error:
        config.load([str(tmp_path)])
    assert "daemon.history.keep_days" in error.value.message and "false for no age limit" in error.value.message


# --- evQueue's pieces: retry schedules, the evQueue socket, the tasks directory ------------------------------------


def test_retry_schedules_are_read_in_both_toml_spellings(tmp_path: Path) -> None:
    write(
        tmp_path / "jobd.toml",
        "[retry_schedule.fast_then_slow]\nlevels = [{ delay = 1, times = 2 }, { delay = 5, times = 1 }]\n\n"
        "[[retry_schedule.patient.levels]]\ndelay = 0.5\ntimes = 10\n[[retry_schedule.patient.levels]]\n"
        "delay = 3600\ntimes = 24\n",
    )
    schedules = load([str(tmp_path)]).retry_schedules
    assert dict(schedules) == {
        "fast_then_slow": RetrySchedule("fast_then_slow", (RetryLevel(1.0, 2), RetryLevel(5.0, 1))),
        "patient": RetrySchedule("patient", (RetryLevel(0.5, 10), RetryLevel(3600.0, 24))),
    }
    with pytest.raises(TypeError):
        schedules["x"] = schedules["patient"]  # type: ignore[index]


def test_a_drop_in_replaces_the_levels_of_a_schedule_whole(search: tuple[Path, Path, Path]) -> None:
    usr, _run, etc = search
    write(usr / "jobd.toml", "[retry_schedule.s]\nlevels = [{ delay = 1, times = 2 }, { delay = 5, times = 1 }]\n")
    write(etc / "jobd.d/10.toml", "[retry_schedule.s]\nlevels = [{ delay = 60, times = 3 }]\n")
    assert load(strs(*search)).retry_schedules["s"].levels == (RetryLevel(60.0, 3),)


BAD_SCHEDULES = {
    "no levels": ("[retry_schedule.s]\n", 1, "retry_schedule.s", "missing required key levels"),
    "empty levels": (
        "[retry_schedule.s]\nlevels = []\n",
        2,
        "retry_schedule.s.levels",
        "expected a non-empty array of tables such as { delay = 10, times = 3 }, got an array",
    ),
    "levels not an array": (
        "[retry_schedule.s]\nlevels = 3\n",
        2,
        "retry_schedule.s.levels",
        "expected a non-empty array of tables",
    ),
    "a level not a table": (
        "[retry_schedule.s]\nlevels = [{ delay = 1, times = 1 }, 5]\n",
        2,
        "retry_schedule.s.levels[2]",
        "retry_schedule.s.levels[2]: expected a table, got 5",
    ),
    "a level with more retries than a submit may ask": (
        "[retry_schedule.s]\nlevels = [{ delay = 1, times = 1 }, { delay = 1, times = 1001 }]\n",
        2,
        "retry_schedule.s.levels[2].times",
        "expected an integer from 1 to 1000, got 1001",
    ),
    "zero delay": (
        "[retry_schedule.s]\n\nlevels = [{ delay = 0, times = 1 }]\n",
        3,
        "retry_schedule.s.levels[1].delay",
        "retry_schedule.s.levels[1].delay: expected a number > 0 and up to 3162240000, got 0",
    ),
    "zero times": (
        "[retry_schedule.s]\nlevels = [{ delay = 1, times = 1 }, { delay = 2, times = 0 }]\n",
        2,
        "retry_schedule.s.levels[2].times",
        "expected an integer from 1 to 1000, got 0",
    ),
    "fractional times": (
        "[retry_schedule.s]\nlevels = [{ delay = 1, times = 1.5 }]\n",
        2,
        "retry_schedule.s.levels[1].times",
        "expected an integer from 1 to 1000, got 1.5",
    ),
    "boolean delay": (
        "[retry_schedule.s]\nlevels = [{ delay = true, times = 1 }]\n",
        2,
        "retry_schedule.s.levels[1].delay",
        "expected a number > 0 and up to 3162240000, got true (a boolean)",
    ),
    "missing times": (
        "[retry_schedule.s]\nlevels = [{ delay = 1 }]\n",
        2,
        "retry_schedule.s.levels[1]",
        "retry_schedule.s.levels[1]: missing required key times (how many tries at this level, an integer from 1 to "
        "1000)",
    ),
    "unknown level key": (
        "[retry_schedule.s]\nlevels = [{ delay = 1, times = 1, backoff = 2 }]\n",
        2,
        "retry_schedule.s.levels[1].backoff",
        "unknown key retry_schedule.s.levels[1].backoff; allowed keys: delay, times",
    ),
    "unknown schedule key": (
        "[retry_schedule.s]\nlevels = [{ delay = 1, times = 1 }]\nlevel = 2\n",
        3,
        "retry_schedule.s.level",
        "unknown key retry_schedule.s.level (did you mean levels?); allowed keys: levels",
    ),
    "bad schedule name": (
        '[retry_schedule."a b"]\nlevels = [{ delay = 1, times = 1 }]\n',
        1,
        'retry_schedule."a b"',
        'invalid name "a b"',
    ),
    "schedule section not a table of tables": (
        "[retry_schedule]\nlevels = [{ delay = 1, times = 1 }]\n",
        2,
        "retry_schedule.levels",
        "expected a table [retry_schedule.levels], got an array",
    ),
}


@pytest.mark.parametrize("text, line, key, allowed", BAD_SCHEDULES.values(), ids=BAD_SCHEDULES.keys())
def test_bad_retry_schedules_name_file_line_key_and_what_is_allowed(
    tmp_path: Path, text: str, line: int, key: str, allowed: str
) -> None:
    path = write(tmp_path / "jobd.toml", text)
    error = load_error(tmp_path)
    assert error.message.startswith(f"{path}:{line}: "), error.message
    assert allowed in error.message
    assert error.details == {"file": str(path), "line": line, "key": key}


def test_evqueue_socket_and_tasks_directory(tmp_path: Path) -> None:
    defaults = load([str(tmp_path)]).daemon
    assert (defaults.evqueue_socket, defaults.tasks_directory) == ("/run/jobd/evqueue.sock", "/usr/lib/jobd/tasks")
    write(tmp_path / "jobd.toml", '[daemon]\nevqueue_socket = "/tmp/evq.sock"\ntasks_directory = "tasks"\n')
    daemon = load([str(tmp_path)]).daemon
    assert (daemon.evqueue_socket, daemon.tasks_directory) == ("/tmp/evq.sock", "tasks")
    write(tmp_path / "jobd.toml", "[daemon]\nevqueue_socket = false\n")
    assert load([str(tmp_path)]).daemon.evqueue_socket is None
    for bad in ("true", '""', "1"):
        path = write(tmp_path / "jobd.toml", f"[daemon]\nevqueue_socket = {bad}\n")
        error = load_error(tmp_path)
        assert error.message.startswith(f"{path}:2: daemon.evqueue_socket: expected a non-empty string"), error.message
    path = write(tmp_path / "jobd.toml", '[daemon]\ntasks_directory = ""\n')
    assert load_error(tmp_path).message == (
        f'{path}:2: daemon.tasks_directory: expected a non-empty string, got "" (a string)'
    )


def test_docs_describe_retry_schedules() -> None:
    text = DOCS.read_text()
    keys = config.RETRY_SCHEDULE_KEYS + config.RETRY_LEVEL_KEYS + ("[retry_schedule.NAME]", "workflows/NAME.xml")
    assert [key for key in keys if f"`{key}`" not in text] == []


# --- the watcher and workflows/ ---------------------------------------------------------------------------------


def test_watcher_sees_workflow_files_and_ignores_editor_files(search: tuple[Path, Path, Path]) -> None:
    workflows = search[1] / "workflows"
    workflows.mkdir()

    async def body(changes: Changes) -> None:
        for name in (".w.xml.swp", "w.xml~", "4913", "notes.txt"):
            write(workflows / name, "x")
        temporary = write(workflows / ".w.xml.tmp", "<workflow/>")
        await let_the_loop_run()
        assert changes.calls == 0
        temporary.rename(workflows / "w.xml")
        await changes.next()
        write(workflows / "w.xml", "<workflow/>")  # edited in place
        await changes.next()
        (workflows / "w.xml").unlink()
        await changes.next()
        (workflows / "m.xml").symlink_to("/dev/null")
        await changes.next()

    watching(list(search), body)


def test_watcher_follows_a_workflows_dir_created_after_start(search: tuple[Path, Path, Path]) -> None:
    async def body(changes: Changes) -> None:
        (search[2] / "workflows").mkdir()
        await changes.next()  # files may already be in it: the daemon must rescan
        write(search[2] / "workflows/w.xml", "<workflow/>")
        await changes.next()
        (search[2] / "workflows/w.xml").unlink()
        (search[2] / "workflows").rmdir()
        await changes.next()
        write(search[2] / "workflows/x.xml", "<workflow/>")
        await changes.next()

    watching(list(search), body)


# --- schedules --------------------------------------------------------------------------------------------------

WORKFLOWS = Path(__file__).resolve().parent / "workflows"
SCHEDULE_BASE = '[task.t]\ncommand = ["/bin/true"]\nparameters = "env"\n\n'


def schedule_dir(tmp_path: Path, schedule: str) -> Path:
    """A config dir with task `t`, workflow `parameters` (greeting, who, verbose) and the given schedule table."""
    write(tmp_path / "jobd.toml", SCHEDULE_BASE + schedule)
    write(tmp_path / "workflows" / "parameters.xml", (WORKFLOWS / "parameters.xml").read_text())
    return tmp_path


def test_schedule_valid(tmp_path: Path) -> None:
    loaded = load_dir(
        str(
            schedule_dir(
                tmp_path,
                "[schedule.every_30s]\n"
                'task = "t"\n'
                'parameters = { WHO = "world" }\n'
                'calendar = "0,30;;;;;"\n'
                'timezone = "Europe/Paris"\n'
                'overlap = "queue_one"\n'
                'on_failure = "suspend"\n'
                "catch_up = true\n"
                "jitter = 2.5\n"
                "enabled = false\n"
                "\n[schedule.nightly]\n"
                'workflow = "parameters"\n'
                'parameters = { greeting = "hi", who = "you", verbose = "no" }\n'
                'calendar = "@daily"\n',
            )
        )
    )
    fast = loaded.schedules["every_30s"]
    assert (fast.target_kind, fast.target, dict(fast.parameters)) == ("task", "t", {"WHO": "world"})
    assert (fast.calendar, fast.timezone, fast.overlap, fast.on_failure) == (
        "0,30;;;;;",
        "Europe/Paris",
        Overlap.QUEUE_ONE,
        OnFailure.SUSPEND,
    )
    assert (fast.catch_up, fast.jitter, fast.enabled) == (True, 2.5, False)
    nightly = loaded.schedules["nightly"]
    assert nightly == ScheduleDef(
        name="nightly",
        calendar="@daily",
        target_kind="workflow",
        target="parameters",
        parameters={"greeting": "hi", "who": "you", "verbose": "no"},
    )


def test_no_schedules_by_default(tmp_path: Path) -> None:
    assert load_dir(str(schedule_dir(tmp_path, ""))).schedules == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'calendar = "0;*;;;;"',
            "schedule.s.calendar: \"0;*;;;;\": Non numeric data in schedule offset: '*' in MIN, the 2nd level "
            "(comma-separated integers); allowed: cron",
        ),
        ('calendar = ";;;30;1;"', "Schedule constraints are impossible to satisfy: none of the months of MONTH"),
        ('calendar = ";;;;;;;"', "Garbage at end of schedule: ';' after the 6th level, WDAY"),
        ('calendar = "60;;;;;"', "Out of range schedule offset: 60 in SEC, the 1st level (0 to 59); allowed: cron"),
        ('calendar = "0, 30 * * * *"', "invalid cron expression: field 1, SEC of 6 fields, '0,', ends with ','"),
        ('calendar = ""', "Empty schedule"),
        ('calendar = "1 2 3"', "expected 5 cron fields"),
        ("calendar = 5", "schedule.s.calendar: expected a string: cron"),
        ('calendar = "* * * * *"\ntimezone = "Mars/Olympus"', 'schedule.s.timezone: unknown time zone "Mars/Olympus"'),
        # A directory of zones, not a zone: it crashed the start (IsADirectoryError), or a reload as INTERNAL_ERROR.
        ('calendar = "* * * * *"\ntimezone = "Europe"', 'schedule.s.timezone: unknown time zone "Europe"'),
        ('calendar = "* * * * *"\noverlap = "queue"', 'schedule.s.overlap: "queue" is not allowed; allowed: "skip"'),
        (
            'calendar = "* * * * *"\non_failure = "stop"',
            'schedule.s.on_failure: "stop" is not allowed; allowed: "continue", "suspend"',
        ),
        ('calendar = "* * * * *"\ncatch_up = "yes"', "schedule.s.catch_up: expected true or false"),
        (
            'calendar = "* * * * *"\njitter = -1',
            "schedule.s.jitter: expected a number >= 0 and up to 3162240000, got -1",
        ),
        # Past a century a time is no date: 1e300 broke every schedule.list (OverflowError), 1e13 made jobctl fail.
        (
            'calendar = "* * * * *"\njitter = 1e13',
            "schedule.s.jitter: expected a number >= 0 and up to 3162240000, got",
        ),
        ('calendar = "* * * * *"\nenabled = 1', "schedule.s.enabled: expected true or false"),
        ('calendar = "* * * * *"\ncalender = "x"', "unknown key schedule.s.calender (did you mean calendar?)"),
    ],
)
def test_schedule_bad_values(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "jobd.toml"
    error = load_error(schedule_dir(tmp_path, f'[schedule.s]\ntask = "t"\n{line}\n'))
    assert message in error.message
    assert error.message.startswith(f"{path}:")
    assert error.details["line"] >= 6  # the line of the key (the table starts on line 5)


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    """A real `jobd --check-config` on this config dir."""
    command = [sys.executable, "-m", "jobd.daemon", "--config-dir", str(config), "--check-config"]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


def test_a_calendar_that_can_never_fire_says_why(tmp_path: Path) -> None:
    """`0 0 30 2 *` is well written: the refusal names the schedule, the fields and why (February has no 30th), not
    the syntaxes allowed. Said by `jobd --check-config` as at a start or a reload."""
    config = schedule_dir(tmp_path, '[schedule.february_30]\ntask = "t"\ncalendar = "0 0 30 2 *"\n')
    said = (
        f'{config / "jobd.toml"}:7: schedule.february_30.calendar: "0 0 30 2 *": Schedule constraints are impossible '
        "to satisfy: none of the months of MONTH '2' has one of the days of DAY '30': February has 29 days at most"
    )
    assert load_error(config).message == said
    checked = check_config(config)
    assert checked.returncode == 78 and checked.stderr.rstrip("\n").endswith(f"ERROR {said}"), checked


def test_a_calendar_that_fires_on_its_day_or_its_nth_weekday_is_accepted(tmp_path: Path) -> None:
    """`0 0 1 2 5#5` is every 1st of February, and the fifth Friday of February in the years it has one: cron ORs
    a restricted DAY and WDAY. croniter kept the fifth Friday on both sides of its OR and found no 1st that is one:
    `jobd --check-config`, a start and a reload refused it as impossible to satisfy."""
    calendars = {"first_or_fifth_friday": "0 0 1 2 5#5", "no_31st_or_fifth_monday": "0 0 31 2 1#5"}
    calendars |= {"leap_day": "0 0 29 2 *", "weekday_nearest_or_sunday": "0 0 15W 2 0"}
    tables = "".join(f'[schedule.{name}]\ntask = "t"\ncalendar = "{text}"\n' for name, text in calendars.items())
    config = schedule_dir(tmp_path, tables)
    checked = check_config(config)
    assert checked.returncode == 0 and checked.stdout.startswith("configuration OK:"), checked
    assert sorted(load_dir(str(config)).schedules) == sorted(calendars)


def test_an_unknown_calendar_macro_is_told_what_is_allowed_once(tmp_path: Path) -> None:
    error = load_error(schedule_dir(tmp_path, '[schedule.s]\ntask = "t"\ncalendar = "@dayly"\n'))
    assert error.message == (
        f'{tmp_path / "jobd.toml"}:7: schedule.s.calendar: "@dayly": unknown macro @dayly (did you mean @daily?); '
        f"allowed: {config.CALENDAR_RULE}"
    )


def test_schedule_error_names_file_line_and_key(tmp_path: Path) -> None:
    error = load_error(schedule_dir(tmp_path, '[schedule.s]\ntask = "t"\ncalendar = "0;*;;;;"\n'))
    assert error.message == (
        f'{tmp_path / "jobd.toml"}:7: schedule.s.calendar: "0;*;;;;": Non numeric data in schedule offset: '
        f"'*' in MIN, the 2nd level (comma-separated integers); allowed: {config.CALENDAR_RULE}"
    )
    assert (error.details["line"], error.details["key"]) == (7, "schedule.s.calendar")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('calendar = "@daily"', "schedule.s: missing required key workflow or task"),
        ('task = "t"\nworkflow = "parameters"\ncalendar = "@daily"', "schedule.s: both workflow and task are set"),
        ('task = "t"', "schedule.s: missing required key calendar"),
        ('task = "nope"\ncalendar = "@daily"', 'schedule.s.task: task "nope" is not defined; defined tasks: t'),
        (
            'workflow = "nope"\ncalendar = "@daily"',
            'schedule.s.workflow: workflow "nope" is not defined; defined workflows: parameters',
        ),
        ('task = ""\ncalendar = "@daily"', "schedule.s.task: expected a non-empty string"),
    ],
)
def test_schedule_bad_target(tmp_path: Path, body: str, message: str) -> None:
    error = load_error(schedule_dir(tmp_path, f"[schedule.s]\n{body}\n"))
    assert message in error.message


@pytest.mark.parametrize(
    ("target", "parameters", "message"),
    [
        (
            'workflow = "parameters"',
            '{ greeting = "hi", who = "you", verbose = "no", extra = "x" }',
            'schedule.s.parameters.extra: workflow "parameters" has no parameter "extra"; '
            "its parameters: greeting, who, verbose",
        ),
        (
            'workflow = "parameters"',
            '{ greeting = "hi" }',
            'schedule.s.parameters: workflow "parameters" needs parameters greeting, who, verbose; '
            "missing: who, verbose",
        ),
        ('workflow = "parameters"', "", "missing: greeting, who, verbose"),
        ('workflow = "parameters"', '{ greeting = 1, who = "a", verbose = "b" }', "greeting: expected a string"),
        ('task = "t"', '{ "1X" = "a" }', "invalid parameter name"),
        ('task = "t"', "{ X = true }", "schedule.s.parameters.X: expected a string"),
        ('task = "t"', '"X=1"', "schedule.s.parameters: expected a table"),
    ],
)
def test_schedule_bad_parameters(tmp_path: Path, target: str, parameters: str, message: str) -> None:
    line = f"parameters = {parameters}\n" if parameters else ""
    error = load_error(schedule_dir(tmp_path, f'[schedule.s]\n{target}\n{line}calendar = "@daily"\n'))
    assert message in error.message


@pytest.mark.parametrize(
    ("tasks", "schedule", "message"),
    [
        # An HTTP task takes no params: every firing failed ("error", or suspended at its first due time).
        (
            '[task.h]\nhttp = { url = "http://127.0.0.1:9/" }\n',
            'task = "h"\nparameters = { A = "1" }',
            "schedule.s.parameters: task \"h\" would refuse it at every firing, as job.submit does: task 'h' makes an "
            "HTTP request: it takes no 'args', 'params', 'stdin' or 'merge_stderr'",
        ),
        # JOBD_ names are jobd's own, for a task with parameters = "env" as for one with "args".
        (
            "",
            'task = "t"\nparameters = { JOBD_JOB_ID = "x" }',
            'schedule.s.parameters: task "t" would refuse it at every firing, as job.submit does: params: '
            '"JOBD_JOB_ID": names starting with JOBD_ are set by jobd itself; allowed: [A-Za-z_][A-Za-z0-9_]* not '
            "starting with JOBD_",
        ),
        (
            '[task.a]\ncommand = ["/bin/echo"]\n',
            'task = "a"\nparameters = { JOBD_X = "x" }',
            'schedule.s.parameters: task "a" would refuse it at every firing, as job.submit does: params: '
            '"JOBD_X": names starting with JOBD_ are set by jobd itself; allowed: [A-Za-z_][A-Za-z0-9_]* not starting '
            "with JOBD_",
        ),
    ],
)
def test_schedule_parameters_its_task_would_refuse_at_every_firing_are_a_load_error(
    tmp_path: Path, tasks: str, schedule: str, message: str
) -> None:
    """The firing resolves its job as job.submit does, and refused it every time; the load resolves the same."""
    path = tmp_path / "jobd.toml"
    error = load_error(schedule_dir(tmp_path, f'{tasks}\n[schedule.s]\n{schedule}\ncalendar = "@daily"\n'))
    lines = path.read_text().splitlines()
    line = next(number for number, text in enumerate(lines, start=1) if text.startswith("parameters = {"))
    assert (
        error.message == f"{path}:{line}: {message}" if message.startswith("schedule.s") else message in error.message
    )
    assert error.message.startswith(f"{path}:{line}: schedule.s.parameters: "), error.message
    assert (error.details["file"], error.details["line"], error.details["key"]) == (
        str(path),
        line,
        "schedule.s.parameters",
    )


def test_schedule_parameters_a_task_takes_still_load(tmp_path: Path) -> None:
    """The same check passes what a submission passes: any name for an "args" task, names outside allowed_params
    (jobd itself submits, as an admin: allowed_params bounds callers who are not), none for an HTTP task."""
    loaded = load_dir(
        str(
            schedule_dir(
                tmp_path,
                '[task.h]\nhttp = { url = "http://127.0.0.1:9/" }\n\n'
                '[task.e]\ncommand = ["/bin/true"]\nparameters = "env"\nallowed_params = ["A"]\n\n'
                '[schedule.h]\ntask = "h"\ncalendar = "@daily"\n\n'
                '[schedule.e]\ntask = "e"\ncalendar = "@daily"\nparameters = { A = "1", B = "2" }\n',
            )
        )
    )
    assert dict(loaded.schedules["e"].parameters) == {"A": "1", "B": "2"}
    assert dict(loaded.schedules["h"].parameters) == {}


def test_schedule_bad_name(tmp_path: Path) -> None:
    error = load_error(schedule_dir(tmp_path, '[schedule.".x"]\ntask = "t"\ncalendar = "@daily"\n'))
    assert 'invalid name ".x"' in error.message


@pytest.mark.parametrize("check_only", [True, False])
def test_a_config_dir_that_is_not_there_is_refused(tmp_path: Path, check_only: bool) -> None:
    """A typo: jobd started from the defaults, on the system's socket and state directory."""
    missing = tmp_path / "etc-jobd-typo"
    checked = subprocess.run(
        [sys.executable, "-m", "jobd.daemon", "--config-dir", str(missing), *(["--check-config"] * check_only)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert checked.returncode == 78 and checked.stdout == "", checked
    assert f"--config-dir {missing} does not exist: name the directory that holds jobd.toml" in checked.stderr
    assert not missing.exists()


def test_a_config_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """A file where the directory should be cannot be meant either: one error, exit code 78, and no start from the
    defaults."""
    a_file = write(tmp_path / "jobd.toml", "[queue.a]\n")
    checked = subprocess.run(
        [sys.executable, "-m", "jobd.daemon", "--config-dir", str(a_file), "--check-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 78, checked
    assert checked.stdout == "", checked
    # What to give instead: the directory that holds the file.
    said = (
        f"--config-dir {a_file} is not a directory: name the directory that holds jobd.toml ({tmp_path} for this file)"
    )
    assert said in checked.stderr, checked.stderr
    assert "defaults" not in checked.stderr, checked.stderr


# Measured in a Python of its own: tracemalloc counts the allocations of every thread of its process, and a thread
# of the test process (pytest-xdist's receiver reading the next tests) could allocate that much meanwhile.
_PEAK_OF_CONFIG_READS = """
import sys, tracemalloc
from jobd import conffile
small, large = sys.argv[1:]
tracemalloc.start()
tracemalloc.reset_peak()
small_bytes = conffile.read(small)
_, peak = tracemalloc.get_traced_memory()
large_bytes = conffile.read(large)
print(repr((small_bytes, len(large_bytes), peak)))
"""


def test_reading_a_config_file_asks_for_its_size_not_the_16_mib_limit(tmp_path: Path) -> None:
    """os.read() allocates all it is asked for before shrinking it to what came: asked for 16 MiB at every read of
    a file, glibc came to take those buffers from the heap, and the heap fragmented (the next test)."""
    small = tmp_path / "jobd.toml"
    small.write_bytes(b"[queue.default]\nconcurrency = 2\n")
    large = tmp_path / "large.toml"
    large.write_bytes(b"# " + b"x" * (conffile.READ_CHUNK * 3) + b"\n")  # more than one read's least
    measured = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_CONFIG_READS, str(small), str(large)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    small_bytes, large_size, peak = ast.literal_eval(measured.stdout)
    assert (small_bytes, large_size) == (small.read_bytes(), large.stat().st_size)
    assert peak < conffile.READ_CHUNK * 4, f"reading {len(small_bytes)} bytes took {peak} bytes at its peak"


def test_reading_the_same_config_file_again_and_again_takes_no_more_memory(tmp_path: Path) -> None:
    """The symptom, in a process of its own. Once a buffer larger than 16 MiB has been freed (a large job.output
    reply, a large reply of any kind), glibc serves such requests from the heap (its dynamic mmap threshold); each
    16 MiB buffer, cut down to the few KiB read, was left where it kept the heap from shrinking or reusing its room:
    3,000 reads of a 2 KiB workflow, as many reloads of a changed file, cost 12 MiB that never came back."""
    workflow = tmp_path / "small.xml"
    workflow.write_text("<!-- " + "x" * 2000 + " -->\n<workflow/>\n")
    program = f"""
from jobd import conffile

def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

large = bytes(20 << 20)
del large
kept = None
for _ in range(500):  # the heap's first growth, whatever it is
    kept = conffile.read({str(workflow)!r})
before = resident()
for _ in range(3000):
    kept = conffile.read({str(workflow)!r})
print(resident() - before)
"""
    grown = subprocess.run(
        [sys.executable, "-c", program],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert int(grown) < 1024, f"3,000 reads of a {workflow.stat().st_size}-byte file took {grown.strip()} KiB more"
