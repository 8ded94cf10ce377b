"""TOML files + drop-ins + workflow files → frozen Config; validation; watcher.

Files follow systemd's drop-in rules (`find_files`, `find_workflow_files`); `load` reads, merges and validates them
into a frozen `jobd.model.Config`, raising `ConfigError` that names file, line, dotted key (or XML element and
attribute) and what is allowed. Workflow files are checked by `jobd.workflowdef` against the TOML part they name.
`ConfigWatcher` only says "something changed" through inotify; the daemon reloads and decides whether to apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ipaddress
import json
import logging
import math
import os
import re
import stat
import tomllib
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

import inotify_simple

from jobd import conffile, locale_text, users, workflowdef
from jobd.engine import callbacks as callback_defs
from jobd.engine import submit
from jobd.engine.http_task import HttpSpecError, check_request
from jobd.engine.schedule import Calendar, ImpossibleCalendar
from jobd.errors import ConfigError, JobdError, did_you_mean, shortage
from jobd.model import (
    ENV_NAME,
    MAX_RETRY_TIMES,
    MAX_SECONDS,
    AccessDef,
    Config,
    DaemonDef,
    Durability,
    Grant,
    History,
    HttpDef,
    HttpToken,
    OnFailure,
    Overlap,
    ParameterMode,
    QueueDef,
    RemoteUser,
    RetryLevel,
    RetryPolicy,
    RetrySchedule,
    Right,
    ScheduleDef,
    Scheduler,
    TaskDef,
    TcpDef,
    WorkflowDef,
)

log = logging.getLogger("jobd.config")

DEFAULT_SEARCH_PATH = ("/usr/lib/jobd", "/run/jobd", "/etc/jobd")  # lowest to highest priority
MAIN_FILE = "jobd.toml"
DROP_IN_DIR = "jobd.d"
WORKFLOWS_DIR = "workflows"
DEFAULT_QUEUE = "default"

# The keys each kind of table accepts, in the order the documentation lists them.
SECTIONS = ("daemon", "queue", "task", "retry_schedule", "schedule", "tcp", "http", "access")
DAEMON_KEYS = (
    "socket",
    "evqueue_socket",
    "state_dir",
    "tasks_directory",
    "durability",
    "history",
    "kill_grace",
    "max_output",
    "default_user",
    "socket_group",
    "socket_mode",
    "max_connections",
    "max_connections_per_user",
)
HISTORY_KEYS = ("keep_days", "keep_last")
TCP_KEYS = ("listen", "login_delay", "login_delay_max", "users")
TCP_USER_KEYS = ("password_sha1", "groups", "admin")
HTTP_KEYS = ("listen", "tokens")
HTTP_TOKEN_KEYS = ("token_sha256", "user", "groups", "admin")
ACCESS_KEYS = ("admins", "grant")
ADMINS_KEYS = ("users", "groups")
GRANT_KEYS = ("users", "groups", "rights", "workflows", "tasks", "queues")
QUEUE_KEYS = ("concurrency", "scheduler", "paused", "on_success", "on_failure", "on_finish")
TASK_KEYS = (
    "command",
    "queue",
    "parameters",
    "allowed_params",
    "working_dir",
    "environment",
    "timeout",
    "kill_grace",
    "retry",
    "max_output",
    "user",
    "group",
    "run_as",
    "on_success",
    "on_failure",
    "on_finish",
    "http",
)
RETRY_KEYS = ("times", "delay", "backoff", "on_exit_codes")
RETRY_SCHEDULE_KEYS = ("levels",)
RETRY_LEVEL_KEYS = ("delay", "times")
SCHEDULE_KEYS = (
    "workflow",
    "task",
    "parameters",
    "calendar",
    "timezone",
    "overlap",
    "on_failure",
    "catch_up",
    "jitter",
    "enabled",
)

MAX_CONCURRENCY = 10_000
MAX_CONNECTIONS = 100_000  # clients at once, both sockets together; each holds a file descriptor
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 _ . -, not starting with . or -"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[[0-9]+\]")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


# --- finding files ------------------------------------------------------------------------------------------


def find_files(dirs: Sequence[str]) -> list[Path]:
    """The files that make up the configuration, in the order they apply (systemd's drop-in rules).

    `dirs` go from lowest to highest priority. Of `jobd.toml`, only the highest-priority one counts; of the
    drop-ins `jobd.d/*.toml`, the highest-priority file of each name counts, and the winners apply in lexical
    order of their names after `jobd.toml`. A winner that is a symlink to /dev/null masks the name.
    """
    files: list[Path] = []
    main = _highest_priority(Path(d) / MAIN_FILE for d in dirs)
    if main is not None:
        files.append(main)
    files.extend(_drop_ins(dirs))
    return [path for path in files if not _is_masked(path)]


def is_config_name(name: str) -> bool:
    """Whether a drop-in directory entry is a config file rather than an editor's temporary or lock file."""
    # Hidden names are skipped as systemd does; Emacs's `.#10-x.toml` lock symlinks end in .toml too.
    return name.endswith(".toml") and not name.startswith(".")


def _highest_priority(candidates: Iterable[Path]) -> Path | None:
    found = None
    for path in candidates:
        # lexists: a dangling symlink still hides lower files, and reading it then reports the problem.
        if os.path.lexists(path):
            found = path
    return found


def _drop_ins(dirs: Sequence[str]) -> list[Path]:
    winners: dict[str, Path] = {}
    for directory in dirs:  # lowest priority first, so a higher-priority file of the same name replaces it
        drop_in_dir = Path(directory) / DROP_IN_DIR
        for name in _drop_in_names(drop_in_dir, is_config_name):
            winners[name] = drop_in_dir / name
    return [winners[name] for name in sorted(winners)]


def _drop_in_names(directory: Path, wanted: Callable[[str], bool]) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries if wanted(entry.name) and not _is_dir(entry)]
    except FileNotFoundError:
        return []
    except OSError as error:
        short = shortage(f"{directory}: cannot list", error, "the configuration is not read now")
        raise short or ConfigError(
            f"{directory}: cannot list: {error.strerror}", file=str(directory), line=None, key=None
        ) from None


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop: the entry is a file name whose read will say so, naming it
        return False


def find_workflow_files(dirs: Sequence[str]) -> list[Path]:
    """The workflow files `workflows/NAME.xml`, one per name, in order of their names.

    As for drop-ins, the highest-priority directory's file of a name wins and a symlink to /dev/null masks it.
    """
    winners: dict[str, Path] = {}
    for directory in dirs:
        workflow_dir = Path(directory) / WORKFLOWS_DIR
        for name in _drop_in_names(workflow_dir, is_workflow_name):
            winners[name] = workflow_dir / name
    return [winners[name] for name in sorted(winners) if not _is_masked(winners[name])]


def is_workflow_name(name: str) -> bool:
    """Whether a `workflows/` entry is a workflow file rather than an editor's temporary or lock file."""
    return name.endswith(workflowdef.SUFFIX) and not name.startswith(".")


def _is_masked(path: Path) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False  # not a mask; reading it reports why it is unusable
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)


# --- reading and locating keys ------------------------------------------------------------------------------


class _Source:
    """One file's text, kept so that an error found after merging can point at the line of a key."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self._key_lines: dict[tuple[str, ...], int] | None = None

    def line_of(self, key: tuple[str, ...]) -> int | None:
        """The line that defines `key`, or the nearest line that explains it.

        A key inside an inline table (`retry = { times = -1 }`) has no line of its own: it gets its outer key's.
        A table declared only through deeper headers (`[task.x.retry]`) gets the first line below it.
        """
        if self._key_lines is None:
            self._key_lines = _key_lines(self.text)
        lines = self._key_lines
        if key in lines:
            return lines[key]
        below = [line for known, line in lines.items() if known[: len(key)] == key]
        if below:
            return min(below)
        for size in range(len(key) - 1, 0, -1):
            if key[:size] in lines:
                return lines[key[:size]]
        return None


def _read(path: Path) -> _Source:
    data = conffile.read(str(path))
    if data.startswith(b"\xef\xbb\xbf"):  # TOML would only say "Invalid statement (column 1)"
        raise ConfigError(
            f"{conffile.shown(path)}:1: the file starts with a byte order mark (BOM); save it as UTF-8 without one",
            file=str(path),
            line=1,
            key=None,
        )
    try:
        return _Source(path, data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        byte = data[error.start]
        raise ConfigError(
            f"{conffile.shown(path)}:{line}: invalid UTF-8 (byte 0x{byte:02x} at column {column}); files must be UTF-8",
            file=str(path),
            line=line,
            key=None,
        ) from None


def _parse(source: _Source) -> dict[str, Any]:
    try:
        return tomllib.loads(source.text)
    except RecursionError:  # tomllib recurses once per level of arrays and inline tables
        raise ConfigError(
            f"{conffile.shown(source.path)}: invalid TOML: arrays or inline tables nested too deeply (jobd's keys use "
            "a few levels)",
            file=str(source.path),
            line=None,
            key=None,
        ) from None
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        position = _TOML_POSITION.search(message)
        if position:
            line: int | None = int(position[1])
            message = f"{message[: position.start()]} (column {position[2]})"
        else:  # "(at end of document)"
            line = source.text.count("\n") + 1
        raise ConfigError(
            f"{conffile.shown(source.path)}:{line}: invalid TOML: {message}", file=str(source.path), line=line, key=None
        ) from None


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every key path the text defines (`[table]` headers and `key =` lines) to its 1-based line.

    Only called on files tomllib accepted, so it can assume valid TOML; it follows brackets and multi-line
    strings so that a line inside a multi-line array or string is never taken for a key.
    """
    lines: dict[tuple[str, ...], int] = {}
    arrays: dict[tuple[str, ...], int] = {}  # how many [[x]] headers of each x so far
    table: tuple[str, ...] = ()
    value = _ValueScanner()
    for number, line in enumerate(text.split("\n"), 1):
        if value.open:
            value.feed(line)
            continue
        stripped = line.strip()
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            header = _parse_key(stripped, 2 if array else 1)
            if header is not None:
                table = header[0]
                lines.setdefault(table, number)
                if array:  # the n-th [[x]] is x[n], as `_index` spells it, so each element's keys have their line
                    arrays[table] = arrays.get(table, 0) + 1
                    table = (*table, _index(arrays[table]))
                    lines.setdefault(table, number)
            continue
        parsed = _parse_key(stripped, 0)
        if parsed is None:  # blank line or comment
            continue
        key, end = parsed
        lines.setdefault(table + key, number)
        value.feed(stripped[end + 1 :])  # past the "="
    return lines


def _parse_key(text: str, start: int) -> tuple[tuple[str, ...], int] | None:
    """Read a dotted key (bare or quoted parts) at `start`; return its parts and the index after it."""
    parts: list[str] = []
    position = start
    while True:
        position = _skip_blanks(text, position)
        part, position = _parse_key_part(text, position)
        if part is None:
            return None
        parts.append(part)
        position = _skip_blanks(text, position)
        if not text.startswith(".", position):
            return tuple(parts), position
        position += 1


def _parse_key_part(text: str, position: int) -> tuple[str | None, int]:
    bare = _BARE_KEY.match(text, position)
    if bare:
        return bare[0], bare.end()
    if text.startswith(('"', "'"), position):
        end = _end_of_string(text, position)
        # Let tomllib undo the escapes of a quoted key rather than re-implementing them.
        return tomllib.loads(f"k = {text[position:end]}")["k"], end
    return None, position


def _skip_blanks(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t":
        position += 1
    return position


def _end_of_string(text: str, start: int) -> int:
    """Index just past the single-line string that opens at `start`."""
    quote = text[start]
    position = start + 1
    while position < len(text):
        if quote == '"' and text[position] == "\\":
            position += 2
            continue
        if text[position] == quote:
            return position + 1
        position += 1
    return position


class _ValueScanner:
    """Follows a value across lines: open arrays or inline tables, and multi-line strings."""

    def __init__(self) -> None:
        self.depth = 0
        self.string: str | None = None  # '"""' or "'''" while inside a multi-line string

    @property
    def open(self) -> bool:
        return self.depth > 0 or self.string is not None

    def feed(self, text: str) -> None:
        position = 0
        while position < len(text):
            if self.string is not None:
                position = self._close_multiline(text, position)
                continue
            char = text[position]
            if char == "#":
                return
            if text.startswith(('"""', "'''"), position):
                self.string = text[position : position + 3]
                position += 3
            elif char in "\"'":
                position = _end_of_string(text, position)
            else:
                self.depth += (char in "[{") - (char in "]}")
                position += 1

    def _close_multiline(self, text: str, position: int) -> int:
        assert self.string is not None
        while position < len(text):
            if self.string == '"""' and text[position] == "\\":
                position += 2
            elif text.startswith(self.string, position):
                position += 3
                # Up to two quotes right before the delimiter belong to the string: `"""a""""`.
                while position < len(text) and text[position] == self.string[0]:
                    position += 1
                self.string = None
                return position
            else:
                position += 1
        return position


# --- errors ---------------------------------------------------------------------------------------------------


def _dotted(key: Sequence[str]) -> str:
    text = ""
    for part in key:
        if _INDEX.fullmatch(part):  # an element of an array, as `_index` spells it: `levels[2]`
            text += part
            continue
        text += ("." if text else "") + (part if _BARE_KEY.fullmatch(part) else json.dumps(part))
    return text


def _index(number: int) -> str:
    """The key part for the `number`-th (1-based) element of an array."""
    return f"[{number}]"


def _error(source: _Source, key: tuple[str, ...], problem: str) -> ConfigError:
    line = source.line_of(key)
    where = f"{conffile.shown(source.path)}:{line}" if line is not None else conffile.shown(source.path)
    # The problem may quote the file's value as a checker outside this module wrote it (a calendar's parser names
    # the macro it does not know): made inert here, for every key, as the file's name is.
    return ConfigError(f"{where}: {conffile.shown(problem)}", file=str(source.path), line=line, key=_dotted(key))


def _unknown_key(source: _Source, key: tuple[str, ...], allowed: Sequence[str], what: str = "key") -> ConfigError:
    hint = did_you_mean(key[-1], allowed)
    return _error(source, key, f"unknown {what} {_dotted(key)}{hint}; allowed {what}s: {', '.join(allowed)}")


def _show(value: object) -> str:
    """A value as the TOML file spelled it, plus its type where the type is the problem."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{json.dumps(value)} (a string)"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


def _kind(value: object) -> str:
    """What `value` is, without the value: for settings that hold secrets (a password's hash mistaken for the
    password itself, an environment variable), whose errors reach the journal, daemon.status and systemd's STATUS=."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return _show(value)  # arrays, tables, dates: _show names only their kind


# --- merging --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Setting:
    """One value after merging, with the file whose value won."""

    key: tuple[str, ...]
    value: object
    source: _Source

    def invalid(self, problem: str) -> ConfigError:
        return _error(self.source, self.key, f"{_dotted(self.key)}: {problem}")

    def expected(self, allowed: str) -> ConfigError:
        return self.invalid(f"expected {allowed}, got {_show(self.value)}")

    def expected_secret(self, allowed: str) -> ConfigError:
        """As expected(), naming only the kind of value found (see _kind)."""
        return self.invalid(f"expected {allowed}, got {_kind(self.value)}")


@dataclass(slots=True)
class _Table:
    """`[daemon]`, `[queue.NAME]`, `[task.NAME]` or an inline table, key by key."""

    key: tuple[str, ...]
    source: _Source | None  # the file that first declared it; None for an absent [daemon]
    settings: dict[str, _Setting]

    @classmethod
    def inline(cls, setting: _Setting) -> _Table:
        if not isinstance(setting.value, dict):
            raise setting.expected("a table")
        children = {
            name: _Setting((*setting.key, name), value, setting.source) for name, value in setting.value.items()
        }
        return cls(setting.key, setting.source, children)

    def reject_unknown(self, allowed: Sequence[str]) -> None:
        for name, setting in self.settings.items():
            if name not in allowed:
                raise _unknown_key(setting.source, setting.key, allowed)

    def read(self, name: str, parse: Callable[[_Setting], T], default: T) -> T:
        setting = self.settings.get(name)
        return default if setting is None else parse(setting)

    def require(self, name: str, parse: Callable[[_Setting], T], allowed: str) -> T:
        setting = self.settings.get(name)
        if setting is None:
            assert self.source is not None  # only named tables have required keys, and they come from a file
            raise _error(self.source, self.key, f"{_dotted(self.key)}: missing required key {name} ({allowed})")
        return parse(setting)


@dataclass(slots=True)
class _Merged:
    daemon: _Table
    queues: dict[str, _Table]
    tasks: dict[str, _Table]
    retry_schedules: dict[str, _Table]
    schedules: dict[str, _Table]
    tcp: _Table = dataclasses.field(default_factory=lambda: _Table(("tcp",), None, {}))
    tcp_users: dict[str, _Table] = dataclasses.field(default_factory=dict)  # [tcp.users.NAME], merged key by key
    http: _Table = dataclasses.field(default_factory=lambda: _Table(("http",), None, {}))
    http_tokens: dict[str, _Table] = dataclasses.field(default_factory=dict)  # [http.tokens.NAME]
    access: _Table = dataclasses.field(default_factory=lambda: _Table(("access",), None, {}))
    grants: list[_Setting] = dataclasses.field(default_factory=list)  # [[access.grant]] of every file, in order


def _merge(sources: Sequence[_Source]) -> _Merged:
    """Apply the files in order: a later file's key overrides an earlier one's, table by table.

    Values below a table's keys (inline tables such as `retry = {...}`) are replaced whole.
    """
    merged = _Merged(daemon=_Table(("daemon",), None, {}), queues={}, tasks={}, retry_schedules={}, schedules={})
    named = {
        "queue": merged.queues,
        "task": merged.tasks,
        "retry_schedule": merged.retry_schedules,
        "schedule": merged.schedules,
    }
    for source in sources:
        for section, body in _parse(source).items():
            if section == "daemon":
                _merge_table(merged.daemon, source, body)
            elif section == "tcp":
                _merge_tcp(merged, source, body)
            elif section == "http":
                _merge_http(merged, source, body)
            elif section == "access":
                _merge_access(merged, source, body)
            elif section in named:
                _merge_named_tables(named[section], section, source, body)
            else:
                raise _unknown_key(source, (section,), SECTIONS, what="section")
    return merged


def _merge_access(merged: _Merged, source: _Source, body: object) -> None:
    """`[access]` key by key, except its grants: every file's `[[access.grant]]` tables add up (a drop-in per
    application or team), where any other key of a later file replaces the earlier one."""
    if isinstance(body, dict) and "grant" in body:
        body = dict(body)
        grants = body.pop("grant")
        if not isinstance(grants, list):
            raise _Setting(("access", "grant"), grants, source).expected("an array of tables [[access.grant]]")
        merged.grants.extend(
            _Setting(("access", "grant", _index(number)), grant, source) for number, grant in enumerate(grants, 1)
        )
    _merge_table(merged.access, source, body)


def _merge_tcp(merged: _Merged, source: _Source, body: object) -> None:
    """`[tcp]` key by key; its `users` table user by user, so a drop-in can add or change one login."""
    _merge_with_entries(merged.tcp, merged.tcp_users, ("tcp", "users"), "logins such as [tcp.users.NAME]", source, body)


def _merge_http(merged: _Merged, source: _Source, body: object) -> None:
    """`[http]` key by key; its `tokens` table token by token, as `[tcp.users]`."""
    _merge_with_entries(
        merged.http, merged.http_tokens, ("http", "tokens"), "tokens such as [http.tokens.NAME]", source, body
    )


def _merge_with_entries(
    section: _Table,
    entries: dict[str, _Table],
    key: tuple[str, str],
    what: str,
    source: _Source,
    body: object,
) -> None:
    """A section key by key, except its table `key[1]` of named entries, merged entry by entry (a drop-in adds or
    changes one login or token without repeating the others)."""
    if isinstance(body, dict) and key[1] in body:
        body = dict(body)
        named = body.pop(key[1])
        if not isinstance(named, dict):
            raise _Setting(key, named, source).expected(f"a table of {what}")
        for name, entry_body in named.items():
            if name not in entries:
                entries[name] = _Table((*key, name), source, {})
            _merge_table(entries[name], source, entry_body)
    _merge_table(section, source, body)


def _merge_named_tables(tables: dict[str, _Table], section: str, source: _Source, body: object) -> None:
    if not isinstance(body, dict):
        setting = _Setting((section,), body, source)
        raise setting.expected(f"a table of {section}s such as [{section}.NAME]")
    for name, table_body in body.items():
        key = (section, name)
        if name not in tables:
            tables[name] = _Table(key, source, {})
        _merge_table(tables[name], source, table_body)


def _merge_table(table: _Table, source: _Source, body: object) -> None:
    if not isinstance(body, dict):
        raise _Setting(table.key, body, source).expected(f"a table [{_dotted(table.key)}]")
    if table.source is None:
        table.source = source
    for name, value in body.items():
        table.settings[name] = _Setting((*table.key, name), value, source)


# --- value checks -----------------------------------------------------------------------------------------------
# Parsers: functions from a setting to a checked value that raise ConfigError otherwise. `_choice`, `_integer`
# and `_number` build one from their allowed values.


def _string(setting: _Setting) -> str:
    value = setting.value
    if not isinstance(value, str) or not value:
        raise setting.expected("a non-empty string")
    if "\0" in value:
        raise setting.invalid("contains a NUL character")
    return value


# sun_path of struct sockaddr_un holds 108 bytes with the terminating NUL: a longer path cannot be bound at all.
MAX_SOCKET_PATH = 107


def _path(setting: _Setting) -> str:
    """A path jobd itself opens, binds or enters."""
    value = _string(setting)
    if not locale_text.encodable(value):
        raise setting.invalid(f"{json.dumps(value)} holds characters that {locale_text.why_not_encodable()}")
    return value


def _socket_path(setting: _Setting) -> str:
    value = _path(setting)
    size = len(os.fsencode(value))
    if size > MAX_SOCKET_PATH:
        raise setting.invalid(f"the path is {size} bytes long; a Unix socket's may be at most {MAX_SOCKET_PATH}")
    return value


def _absolute_path(setting: _Setting) -> str:
    value = _path(setting)
    if not value.startswith("/"):
        raise setting.expected("an absolute path (starting with /)")
    return value


def _boolean(setting: _Setting) -> bool:
    if not isinstance(setting.value, bool):
        raise setting.expected("true or false")
    return setting.value


def _choice(kind: type[E]) -> Callable[[_Setting], E]:
    def parse(setting: _Setting) -> E:
        allowed = [member.value for member in kind]
        if not isinstance(setting.value, str) or setting.value not in allowed:
            shown = json.dumps(setting.value) if isinstance(setting.value, str) else _show(setting.value)
            raise setting.invalid(f"{shown} is not allowed; allowed: {', '.join(json.dumps(a) for a in allowed)}")
        return kind(setting.value)

    return parse


# TOML integers have no size limit, SQLite's have 64 bits: a larger count or size would be accepted here and
# then fail at the first statement that stores or compares it (every job end, for `keep_last`).
MAX_INTEGER = 2**63 - 1


def _integer(low: int, high: int = MAX_INTEGER) -> Callable[[_Setting], int]:
    bounded = f"an integer from {low} to {high}"
    allowed = f"an integer >= {low}" if high == MAX_INTEGER else bounded  # the upper bound said when it matters

    def parse(setting: _Setting) -> int:
        value = setting.value
        # bool is a subclass of int in Python, but `true` is not a number in TOML.
        if isinstance(value, bool) or not isinstance(value, int):
            raise setting.expected(allowed)
        if value < low:
            raise setting.expected(allowed)
        if value > high:
            raise setting.expected(bounded)
        return value

    return parse


def _number(minimum: float, *, exclusive: bool = False, maximum: float = MAX_SECONDS) -> Callable[[_Setting], float]:
    """A finite number from `minimum` to `maximum`: by default a number of seconds, at most a century as in the API
    (later times would not be dates: a schedule's jitter of 1e300 s broke every schedule.list)."""
    allowed = f"a number {'>' if exclusive else '>='} {minimum:g} and up to {maximum:.0f}"

    def parse(setting: _Setting) -> float:
        value = setting.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise setting.expected(allowed)
        try:
            value = float(value)  # an integer beyond a double's range cannot be a number of seconds either
        except OverflowError:
            raise setting.invalid(f"expected {allowed}, got an integer too large for a number") from None
        if not math.isfinite(value):
            raise setting.invalid(f"expected {allowed}, got {value!r} (numbers must be finite)")
        if value < minimum or (exclusive and value == minimum) or value > maximum:
            raise setting.expected(allowed)
        return value

    return parse


def _command(setting: _Setting) -> tuple[str, ...]:
    allowed = "a non-empty array of strings, the first one the program"
    value = setting.value
    if not isinstance(value, list) or not value:
        raise setting.expected(allowed)
    for index, arg in enumerate(value):
        if not isinstance(arg, str):
            raise setting.invalid(f"expected {allowed}, got {_show(arg)} as element {index}")
    if not value[0]:
        raise setting.invalid("the program (first element) is an empty string")
    for index, arg in enumerate(value):
        if "\0" in arg:
            raise setting.invalid(f"element {index} contains a NUL character")
    return tuple(value)


def _exit_codes(setting: _Setting) -> tuple[int, ...]:
    allowed = "an array of integers from 0 to 255"
    value = setting.value
    if not isinstance(value, list):
        raise setting.expected(allowed)
    for code in value:
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
            raise setting.invalid(f"expected {allowed}, found {_show(code)}")
    return tuple(value)


def _environment(setting: _Setting) -> Mapping[str, str]:
    table = _Table.inline(setting)
    environment: dict[str, str] = {}
    for name, variable in table.settings.items():
        if not ENV_NAME.fullmatch(name):
            raise variable.invalid("invalid variable name; allowed: A-Z a-z 0-9 _, not starting with a digit")
        if name.startswith("JOBD_"):  # jobd sets these for every job, over whatever the task says
            raise variable.invalid("names starting with JOBD_ are set by jobd itself (JOBD_JOB_ID, JOBD_QUEUE, ...)")
        if not isinstance(variable.value, str):
            raise variable.expected_secret("a string")
        if "\0" in variable.value:
            raise variable.invalid("contains a NUL character")
        environment[name] = variable.value
    return MappingProxyType(environment)


# Variables that steer the loader, the C library, shells, interpreters or the tools a job may call: whoever sets
# one runs code of their choosing inside the job (LD_PRELOAD, PATH, BASH_ENV, PYTHONPATH, PHPRC…), or decides which
# files it trusts (keys, certificates). A task's allowed_params may not name them. The list cannot be complete,
# which is why callers get only the names a task allows, not all but these; it catches the well-known ones an
# administrator might allow without thinking of what they do.
_STEERING_VARIABLES = frozenset(
    {
        # shells and the programs a shell looks up
        "PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "FPATH", "ZDOTDIR",
        "HOME", "SHELL", "CDPATH", "TMPDIR", "TMP", "TEMP",
        # the C library: name resolution, locales, character sets, allocator, time zones, terminals
        "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "NLSPATH", "LOCPATH", "GCONV_PATH", "GLIBC_TUNABLES", "TZDIR",
        "TERMINFO", "TERMINFO_DIRS", "TERMCAP",
        # interpreters and their package managers
        "JAVA_HOME", "JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "PHPRC", "PHP_INI_SCAN_DIR",
        "GEM_HOME", "GEM_PATH", "TCLLIBPATH", "TCL_LIBRARY", "TK_LIBRARY", "AWKPATH", "AWKLIBPATH", "EMACSLOADPATH",
        "CAML_LD_LIBRARY_PATH", "R_HOME", "R_PROFILE", "R_PROFILE_USER", "R_ENVIRON", "R_ENVIRON_USER", "R_LIBS",
        "R_LIBS_USER", "R_LIBS_SITE", "GOFLAGS", "GOENV", "GOTOOLCHAIN", "RUSTC_WRAPPER", "RUSTUP_TOOLCHAIN",
        "RUSTUP_HOME", "CARGO_HOME",
        # programs that other programs run, and build tools
        "EDITOR", "VISUAL", "SUDO_EDITOR", "PAGER", "MANPAGER", "SYSTEMD_PAGER", "SYSTEMD_EDITOR", "BROWSER",
        "LESSOPEN", "LESSCLOSE", "VIMINIT", "EXINIT", "MYVIMRC", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE",
        "SUDO_ASKPASS", "MAKEFLAGS", "MFLAGS", "MAKEFILES", "CC", "CXX", "CPP", "CFLAGS", "CXXFLAGS", "CPPFLAGS",
        "LDFLAGS", "GCC_EXEC_PREFIX", "COMPILER_PATH", "MAVEN_OPTS", "GRADLE_OPTS", "SBT_OPTS", "ANT_OPTS",
        # libraries that load modules or configuration naming modules
        "OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES", "KRB5_CONFIG", "SASL_PATH", "SASL_CONF_PATH",
        "ODBCINI", "ODBCSYSINI", "ODBCINSTINI", "GTK_MODULES", "GTK_PATH", "GTK_EXE_PREFIX", "GIO_EXTRA_MODULES",
        "QT_PLUGIN_PATH", "QT_QPA_PLATFORM_PLUGIN_PATH", "LIBGL_DRIVERS_PATH", "GBM_BACKENDS_PATH",
        "__EGL_VENDOR_LIBRARY_DIRS", "__EGL_VENDOR_LIBRARY_FILENAMES", "VK_ICD_FILENAMES", "VK_DRIVER_FILES",
        "VK_LAYER_PATH", "VK_ADD_LAYER_PATH", "VK_INSTANCE_LAYERS", "ALSA_CONFIG_PATH",
        # what a program trusts or where it reads its settings
        "GNUPGHOME", "SSLKEYLOGFILE", "CURL_HOME", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "WGETRC", "XDG_CONFIG_HOME",
        "XDG_CONFIG_DIRS", "XDG_DATA_HOME", "XDG_DATA_DIRS",
    }
)  # fmt: skip
_STEERING_PREFIXES = (
    "LD_", "DYLD_", "MALLOC_", "BASH_FUNC_", "PYTHON", "PERL", "RUBY", "BUNDLE_", "NODE_", "NPM_CONFIG_",
    "npm_config_", "PIP_", "LUA_", "GUILE_", "JULIA_", "ERL_", "ELIXIR_", "DOTNET_", "CORECLR_", "COMPlus_",
    "CLASSPATH", "GIT_", "SSL_", "MAGICK_", "GST_PLUGIN",
)  # fmt: skip


def _allowed_params(mode: ParameterMode) -> Callable[[_Setting], tuple[str, ...]]:
    def parse(setting: _Setting) -> tuple[str, ...]:
        if mode is not ParameterMode.ENV:
            raise setting.invalid('applies to parameters = "env" only (as arguments, params have no names to allow)')
        names = setting.value
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise setting.expected("an array of variable names")
        for name in names:
            if not ENV_NAME.fullmatch(name) or name.startswith("JOBD_"):
                raise setting.invalid(
                    f"{json.dumps(name)} is not a name a job's params may set; allowed: A-Z a-z 0-9 _, not starting "
                    "with a digit or with JOBD_"
                )
            if name in _STEERING_VARIABLES or name.startswith(_STEERING_PREFIXES):
                raise setting.invalid(
                    f"{json.dumps(name)} steers how programs are loaded or run: whoever may set it runs code of their "
                    "choosing in the job; set it in the task's environment instead"
                )
        return tuple(names)

    return parse


# --- building the model -------------------------------------------------------------------------------------------


def _daemon(table: _Table) -> DaemonDef:
    table.reject_unknown(DAEMON_KEYS)
    default = DaemonDef()
    return DaemonDef(
        socket=table.read("socket", _socket_path, default.socket),
        evqueue_socket=table.read("evqueue_socket", _string_or_off, default.evqueue_socket),
        state_dir=table.read("state_dir", _path, default.state_dir),
        tasks_directory=table.read("tasks_directory", _path, default.tasks_directory),
        durability=table.read("durability", _choice(Durability), default.durability),
        history=table.read("history", _history, default.history),
        kill_grace=table.read("kill_grace", _number(0), default.kill_grace),
        max_output=table.read("max_output", _integer(0), default.max_output),
        max_connections=table.read("max_connections", _integer(1, MAX_CONNECTIONS), default.max_connections),
        max_connections_per_user=table.read(
            "max_connections_per_user", _integer(1, MAX_CONNECTIONS), default.max_connections_per_user
        ),
    )


_PRINCIPAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@$-]{0,63}")
_PRINCIPAL_RULE = "user or group names (1 to 64 characters from A-Z a-z 0-9 _ . @ $ -, not starting with . @ $ -)"
_PATTERN = re.compile(r"[A-Za-z0-9_.*?-]{1,64}")
_PATTERN_RULE = "names of 1 to 64 characters from A-Z a-z 0-9 _ . -, with the wildcards * (any run) and ? (one)"


def _access(table: _Table, grants: Sequence[_Setting]) -> AccessDef:
    table.reject_unknown(ACCESS_KEYS)
    default = AccessDef()
    admins = table.settings.get("admins")
    admin_users, admin_groups = default.admin_users, default.admin_groups
    if admins is not None:
        inline = _Table.inline(admins)
        inline.reject_unknown(ADMINS_KEYS)
        admin_users = inline.read("users", _principals, admin_users)
        admin_groups = inline.read("groups", _principals, admin_groups)
    return AccessDef(admin_users=admin_users, admin_groups=admin_groups, grants=tuple(_grant(g) for g in grants))


def _names(setting: _Setting, pattern: re.Pattern[str], array_of: str, noun: str, rule: str) -> list[str]:
    """An array of names, each matching `pattern`: refused as not `array_of` otherwise, or naming the first name
    that does not match (`noun`: what a name is called) and the `rule` it breaks."""
    value = setting.value
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise setting.expected(array_of)
    for name in value:
        if not pattern.fullmatch(name):
            raise setting.invalid(f"invalid {noun} {json.dumps(name)}; allowed: {rule}")
    return value


def _principals(setting: _Setting) -> frozenset[str]:
    return frozenset(_names(setting, _PRINCIPAL, f"an array of {_PRINCIPAL_RULE}", "name", _PRINCIPAL_RULE))


def _rights(setting: _Setting) -> frozenset[Right]:
    allowed = ", ".join(json.dumps(str(right)) for right in Right)
    value = setting.value
    if not isinstance(value, list) or not value or not all(isinstance(right, str) for right in value):
        raise setting.expected(f"a non-empty array of rights: {allowed}")
    for right in value:
        if right not in set(Right):
            raise setting.invalid(f"unknown right {json.dumps(right)}; allowed: {allowed}")
    return frozenset(Right(right) for right in value)


def _patterns(setting: _Setting) -> tuple[str, ...]:
    return tuple(_names(setting, _PATTERN, f"an array of {_PATTERN_RULE}", "name", _PATTERN_RULE))


def _grant(setting: _Setting) -> Grant:
    """One `[[access.grant]]`: who (users, groups), which rights, on what (workflows, tasks, queues)."""
    table = _Table.inline(setting)
    table.reject_unknown(GRANT_KEYS)
    where = f"{_dotted(setting.key)}"
    nobody: frozenset[str] = frozenset()
    users = table.read("users", _principals, nobody)
    groups = table.read("groups", _principals, nobody)
    if not users and not groups:
        raise _error(setting.source, setting.key, f"{where}: give users = [...] or groups = [...] (or both)")
    rights = table.require("rights", _rights, 'an array such as ["read", "exec"]')
    nothing: tuple[str, ...] = ()
    objects = {kind: table.read(kind, _patterns, nothing) for kind in ("workflows", "tasks", "queues")}
    if not any(objects.values()):
        raise _error(
            setting.source, setting.key, f"{where}: name what it grants rights on: workflows, tasks or queues = [...]"
        )
    return Grant(rights=rights, users=users, groups=groups, **objects)


_ADDRESS_RULE = (
    'a port ("5000", bound on 127.0.0.1), "IP:PORT" or "[IPv6]:PORT" such as "127.0.0.1:5000" or "[::1]:5000" '
    "(0 picks a free port)"
)
LISTEN_RULE = f"{_ADDRESS_RULE}, or false for no TCP listener"
HTTP_LISTEN_RULE = f'{_ADDRESS_RULE}, an absolute path for a unix socket ("/run/jobd/http.sock"), or false for none'

_LISTEN = re.compile(r"(?:(?P<v4>[0-9.]+)|\[(?P<v6>[0-9A-Fa-f:.]+)\]):(?P<port>[0-9]{1,5})")
_SHA1_HEX = re.compile(r"[0-9a-fA-F]{40}")


def _listen(setting: _Setting, rule: str = LISTEN_RULE) -> tuple[str, int] | None:
    """`[tcp] listen`: where evQueue clients connect; loopback unless an address is given. `rule`: what the error
    says is allowed (`[http] listen` takes a unix socket's path besides)."""
    value = setting.value
    if value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise setting.expected(rule)
    if value.isascii() and value.isdigit() and len(value) <= 5:  # isdigit() alone takes "¹²", which int() refuses
        host, port_text = "127.0.0.1", value
    else:
        found = _LISTEN.fullmatch(value)
        if found is None:
            raise setting.invalid(f"{json.dumps(value)} is not allowed; allowed: {rule}")
        host, port_text = found["v4"] or found["v6"], found["port"]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise setting.invalid(f"{json.dumps(host)} is not an IP address; allowed: {rule}") from None
        if (address.version == 6) != (found["v6"] is not None):
            raise setting.invalid(f"{json.dumps(value)}: IPv6 addresses go in brackets; allowed: {rule}")
        host = str(address)
    port = int(port_text)
    if port > 65535:
        raise setting.invalid(f"port {port} is out of range; allowed: 0 to 65535")
    return host, port


def _password_sha1(setting: _Setting) -> str:
    if not isinstance(setting.value, str) or not _SHA1_HEX.fullmatch(setting.value):
        raise setting.expected_secret(
            "the SHA-1 of the password as 40 hexadecimal digits (printf %s 'secret' | sha1sum)"
        )
    return setting.value.lower()


def _group_names(setting: _Setting) -> frozenset[str]:
    return frozenset(_names(setting, _NAME, "an array of group names", "group name", _NAME_RULE))


def _tcp(table: _Table, users: Mapping[str, _Table]) -> TcpDef:
    table.reject_unknown(TCP_KEYS)
    default = TcpDef()
    remote: dict[str, RemoteUser] = {}
    password_files: dict[str, tuple[str, ...]] = {}
    for name, user in users.items():
        _check_name(user)
        user.reject_unknown(TCP_USER_KEYS)
        remote[name] = RemoteUser(
            name=name,
            password_sha1=user.require("password_sha1", _password_sha1, "40 hexadecimal digits, SHA1(password)"),
            groups=user.read("groups", _group_names, frozenset()),
            admin=user.read("admin", _boolean, False),
        )
        where = str(user.settings["password_sha1"].source.path)
        password_files[where] = (*password_files.get(where, ()), name)
    login_delay = table.read("login_delay", _number(0), default.login_delay)
    login_delay_max = table.read("login_delay_max", _number(0), default.login_delay_max)
    if login_delay > login_delay_max:
        raise table.settings["login_delay"].invalid(
            f"{login_delay:g} is more than login_delay_max ({login_delay_max:g}); the delay doubles up to that cap"
        )
    return TcpDef(
        listen=table.read("listen", _listen, default.listen),
        login_delay=login_delay,
        login_delay_max=login_delay_max,
        users=MappingProxyType(remote),
        password_files=MappingProxyType(password_files),
    )


def open_password_files(config: Config) -> list[str]:
    """A warning for each file holding a `[tcp.users.NAME] password_sha1` in force that every local user may read.
    The SHA-1 is not checked against a password: it is the key of evQueue's HMAC, so whoever reads it logs in as
    that login, an admin's too. A file written under umask 022 is such a file, and so is the Debian package's
    jobd.toml."""
    warnings = []
    for path, logins in sorted(config.tcp.password_files.items()):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:  # gone since it was read: the next reload tells
            continue
        if mode & stat.S_IROTH:
            named = " and ".join(", ".join(f"[tcp.users.{login}]" for login in logins).rsplit(", ", 1))
            warnings.append(
                f"{conffile.shown(path)} is readable by every local user (mode {mode:04o}) and holds the password_sha1 "
                f"of {named}: that SHA-1 is all a client needs to log in as {'them' if len(logins) > 1 else 'it'} "
                f"over TCP; make the file readable by root alone (chmod 600 {conffile.shown(path)})"
            )
    return warnings


_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _http_listen(setting: _Setting) -> tuple[str, int] | str | None:
    """`[http] listen`: "address:port" (as `[tcp] listen`), an absolute unix socket path, or false (off)."""
    if isinstance(setting.value, str) and setting.value.startswith("/"):
        return _socket_path(setting)
    return _listen(setting, HTTP_LISTEN_RULE)


def _token_sha256(setting: _Setting) -> str:
    if not isinstance(setting.value, str) or not _SHA256_HEX.fullmatch(setting.value):
        raise setting.expected_secret(
            "the SHA-256 of the token as 64 hexadecimal digits (printf %s 'token' | sha256sum)"
        )
    return setting.value.lower()


def _http(table: _Table, tokens: Mapping[str, _Table]) -> HttpDef:
    table.reject_unknown(HTTP_KEYS)
    found: dict[str, HttpToken] = {}
    for name, token in tokens.items():
        _check_name(token)
        token.reject_unknown(HTTP_TOKEN_KEYS)
        found[name] = HttpToken(
            name=name,
            token_sha256=token.require("token_sha256", _token_sha256, "64 hexadecimal digits, SHA256(token)"),
            user=token.read("user", _string, name),
            groups=token.read("groups", _group_names, frozenset()),
            admin=token.read("admin", _boolean, False),
        )
    return HttpDef(listen=table.read("listen", _http_listen, None), tokens=MappingProxyType(found))


def _string_or_off(setting: _Setting) -> str | None:
    """`evqueue_socket = false` turns the listener off (TOML has no null)."""
    if setting.value is False:
        return None
    if not isinstance(setting.value, str):
        raise setting.expected("a non-empty string, or false to turn it off")
    return _socket_path(setting)


def _days_or_forever(setting: _Setting) -> float | None:
    """`keep_days = false` keeps finished jobs however old they are (TOML has no null to say "no limit")."""
    if setting.value is False:
        return None
    if setting.value is True:
        raise setting.expected("a number >= 0, or false for no age limit")
    return _number(0, maximum=MAX_SECONDS / 86400)(setting)


def _history(setting: _Setting) -> History:
    table = _Table.inline(setting)
    table.reject_unknown(HISTORY_KEYS)
    default = History()
    return History(
        keep_days=table.read("keep_days", _days_or_forever, default.keep_days),
        keep_last=table.read("keep_last", _integer(0), default.keep_last),
    )


def _queue(table: _Table) -> QueueDef:
    table.reject_unknown(QUEUE_KEYS)
    default = QueueDef(table.key[-1])
    return QueueDef(
        name=table.key[-1],
        concurrency=table.read("concurrency", _integer(1, MAX_CONCURRENCY), default.concurrency),
        scheduler=table.read("scheduler", _choice(Scheduler), default.scheduler),
        paused=table.read("paused", _boolean, default.paused),
        callbacks=_callbacks(table),
    )


# The keys of a task that only a program has, and why an HTTP task has none of them. They were taken and ignored:
# an administrator who wrote `environment` or `user` for an HTTP task thought they did something.
_WHAT_ONLY_A_PROGRAM_HAS: Final = {
    "kill_grace": "a cancel or a timeout abandons its request at once, with no grace to wait out",
    "parameters": "its jobs take no args or params, which only a program's command line or environment takes",
    "allowed_params": "its jobs take no params",
    "working_dir": "no program runs in a directory",
    "environment": "no program reads an environment",
    "user": "jobd makes its request itself, as no user",
    "group": "jobd makes its request itself, as no group",
    "run_as": "jobd makes its request itself, as no user",
}


def _task(table: _Table, daemon: DaemonDef, queues: Mapping[str, QueueDef]) -> TaskDef:
    table.reject_unknown(TASK_KEYS)
    http = table.read("http", _http_request, None)
    if http is not None and "command" in table.settings:
        raise table.settings["command"].invalid("a task has either 'command' or 'http', not both")
    if http is not None:  # as job.submit refuses what only a program has for an ad-hoc HTTP job
        for key, why in _WHAT_ONLY_A_PROGRAM_HAS.items():
            if key in table.settings:
                raise table.settings[key].invalid(
                    f"an HTTP task starts no program: {why}; remove it (its timeout, retry, max_output, queue and "
                    "callbacks apply as to a program)"
                )
    parameters = table.read("parameters", _choice(ParameterMode), ParameterMode.ARGS)
    return TaskDef(
        name=table.key[-1],
        command=()
        if http is not None
        else table.require(
            "command", _command, "a non-empty array of strings; or an http table instead, for an HTTP task"
        ),
        http=http,
        queue=table.read("queue", _defined_queue(queues), DEFAULT_QUEUE),
        parameters=parameters,
        allowed_params=table.read("allowed_params", _allowed_params(parameters), ()),
        working_dir=table.read("working_dir", _absolute_path, None),
        environment=table.read("environment", _environment, MappingProxyType({})),
        timeout=table.read("timeout", _number(0, exclusive=True), None),
        kill_grace=0.0 if http is not None else table.read("kill_grace", _number(0), daemon.kill_grace),
        retry=table.read("retry", _retry, RetryPolicy()),
        max_output=table.read("max_output", _integer(0), daemon.max_output),
        callbacks=_callbacks(table),
    )


def _http_request(setting: _Setting) -> Mapping[str, Any]:
    try:
        return MappingProxyType(check_request(setting.value))
    except HttpSpecError as error:
        # Reported at the bad key's own line when the parser knows it (a `[task.NAME.http]` table spreads over
        # several), and named by its whole path.
        key = setting.key if error.key is None else (*setting.key, error.key)
        raise _error(setting.source, key, f"{_dotted(key)}: {error}") from None


def _callbacks(table: _Table) -> Mapping[str, Any] | None:
    """`on_success`, `on_failure`, `on_finish` of a task or a queue (checked by jobd.engine.callbacks)."""
    found = {}
    for event in callback_defs.EVENTS:
        setting = table.settings.get(event)
        if setting is not None:
            try:
                found[event] = callback_defs.check_list(setting.value, _dotted(setting.key))
            except callback_defs.BadCallback as error:  # the deepest key at fault, and its line (or its table's)
                raise _error(setting.source, (*setting.key, *error.key), str(error)) from None
    return found or None


def _defined_queue(queues: Mapping[str, QueueDef]) -> Callable[[_Setting], str]:
    def parse(setting: _Setting) -> str:
        name = _string(setting)
        if name not in queues:
            raise setting.invalid(
                f"queue {json.dumps(name)} is not defined; defined queues: {', '.join(sorted(queues))}"
            )
        return name

    return parse


def _retry(setting: _Setting) -> RetryPolicy:
    table = _Table.inline(setting)
    table.reject_unknown(RETRY_KEYS)
    default = RetryPolicy()
    return RetryPolicy(
        times=table.read("times", _integer(0, MAX_RETRY_TIMES), default.times),
        delay=table.read("delay", _number(0), default.delay),
        backoff=table.read("backoff", _number(1), default.backoff),
        on_exit_codes=table.read("on_exit_codes", _exit_codes, default.on_exit_codes),
    )


def _retry_schedule(table: _Table) -> RetrySchedule:
    table.reject_unknown(RETRY_SCHEDULE_KEYS)
    return RetrySchedule(
        name=table.key[-1],
        levels=table.require("levels", _levels, "a non-empty array of tables such as { delay = 10, times = 3 }"),
    )


def _levels(setting: _Setting) -> tuple[RetryLevel, ...]:
    allowed = "a non-empty array of tables such as { delay = 10, times = 3 }"
    if not isinstance(setting.value, list) or not setting.value:
        raise setting.expected(allowed)
    levels = []
    for number, item in enumerate(setting.value, 1):
        level = _Table.inline(_Setting((*setting.key, _index(number)), item, setting.source))
        level.reject_unknown(RETRY_LEVEL_KEYS)
        levels.append(
            RetryLevel(
                delay=level.require("delay", _number(0, exclusive=True), "seconds before each try, a number > 0"),
                times=level.require(
                    "times",
                    _integer(1, MAX_RETRY_TIMES),
                    f"how many tries at this level, an integer from 1 to {MAX_RETRY_TIMES}",
                ),
            )
        )
    return tuple(levels)


def _schedule(table: _Table, config: Config) -> ScheduleDef:
    """`[schedule.NAME]`, checked against the tasks and the workflows it may start (so after workflows load)."""
    table.reject_unknown(SCHEDULE_KEYS)
    targets = [name for name in ("workflow", "task") if name in table.settings]
    if len(targets) != 1:
        assert table.source is not None
        problem = "both workflow and task are set" if targets else "missing required key workflow or task"
        raise _error(
            table.source,
            table.key,
            f'{_dotted(table.key)}: {problem}; give exactly one: workflow = "NAME" or task = "NAME"',
        )
    kind = targets[0]
    known = config.workflows if kind == "workflow" else config.tasks
    target_setting = table.settings[kind]
    target = _string(target_setting)
    if target not in known:
        raise target_setting.invalid(
            f"{kind} {json.dumps(target)} is not defined; defined {kind}s: {', '.join(sorted(known)) or '(none)'}"
        )
    empty: Mapping[str, str] = MappingProxyType({})
    parameters = table.read("parameters", _schedule_parameters(kind, config, target), empty)
    if kind == "workflow":
        declared = config.workflows[target].parameters
        missing = [name for name in declared if name not in parameters]
        if missing:
            where = table.settings.get("parameters") or target_setting
            raise where.invalid(
                f"workflow {json.dumps(target)} needs parameters {', '.join(declared)}; missing: {', '.join(missing)}"
            )
    else:
        _check_schedule_submission(table, config, target, parameters)
    return ScheduleDef(
        name=table.key[-1],
        calendar=table.require("calendar", _calendar, CALENDAR_RULE),
        target_kind=kind,
        target=target,
        parameters=parameters,
        timezone=table.read("timezone", _timezone, None),
        overlap=table.read("overlap", _choice(Overlap), Overlap.SKIP),
        on_failure=table.read("on_failure", _choice(OnFailure), OnFailure.CONTINUE),
        catch_up=table.read("catch_up", _boolean, False),
        jitter=table.read("jitter", _number(0), 0.0),
        enabled=table.read("enabled", _boolean, True),
    )


def _check_schedule_submission(table: _Table, config: Config, task: str, parameters: Mapping[str, str]) -> None:
    """A task schedule's job is resolved as its firings will resolve it (the same request, from the same peer, by
    job.submit's own checks): parameters the task refuses (an HTTP task takes none, JOBD_ names are jobd's) would
    fail every firing, so they fail the load."""
    request = submit.schedule_request(table.key[-1], task, parameters)
    try:
        submit.resolve(config, request, submit.scheduler_peer())
    except JobdError as error:
        where = table.settings.get("parameters") or table.settings["task"]
        raise where.invalid(
            f"task {json.dumps(task)} would refuse it at every firing, as job.submit does: {error.message}"
        ) from None


CALENDAR_RULE = (
    'cron ("MIN HOUR DAY MONTH WDAY", or 6 fields with seconds first), @hourly, @daily, @weekly, @monthly, '
    '@yearly, or evQueue\'s "SEC;MIN;HOUR;DAY;MONTH;WDAY"'
)


def _calendar(setting: _Setting) -> str:
    if not isinstance(setting.value, str):
        raise setting.expected(f"a string: {CALENDAR_RULE}")
    try:
        Calendar.parse(setting.value)
    except ImpossibleCalendar as error:  # well written: the syntaxes allowed are not the point
        raise setting.invalid(f"{json.dumps(setting.value)}: {error}") from None
    except ValueError as error:
        raise setting.invalid(f"{json.dumps(setting.value)}: {error}; allowed: {CALENDAR_RULE}") from None
    return setting.value


def _timezone(setting: _Setting) -> str:
    name = _string(setting)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as error:  # OSError: "Europe", a directory of zones
        if isinstance(error, OSError) and (
            short := shortage(f"time zone {json.dumps(name)}: cannot read", error, "the configuration is not read now")
        ):  # the zone may well exist: its file cannot be opened now
            raise short from None
        raise setting.invalid(
            f'unknown time zone {json.dumps(name)}; allowed: an IANA name such as "Europe/Paris" or "UTC" '
            "(omit the key for the machine's local time)"
        ) from None
    return name


def _schedule_parameters(kind: str, config: Config, target: str) -> Callable[[_Setting], Mapping[str, str]]:
    """A workflow takes exactly its declared parameters; a task takes params as `job.submit` does (env names)."""

    def parse(setting: _Setting) -> Mapping[str, str]:
        table = _Table.inline(setting)
        declared = config.workflows[target].parameters if kind == "workflow" else None
        parameters: dict[str, str] = {}
        for name, value in table.settings.items():
            if declared is not None and name not in declared:
                raise value.invalid(
                    f"workflow {json.dumps(target)} has no parameter {json.dumps(name)}; "
                    f"its parameters: {', '.join(declared) or '(none)'}"
                )
            if declared is None and not ENV_NAME.fullmatch(name):
                raise value.invalid("invalid parameter name; allowed: A-Z a-z 0-9 _, not starting with a digit")
            if not isinstance(value.value, str):
                raise value.expected_secret("a string")  # a task's params are its environment variables
            if "\0" in value.value:
                raise value.invalid("contains a NUL character")
            parameters[name] = value.value
        return MappingProxyType(parameters)

    return parse


def _check_name(table: _Table) -> None:
    name = table.key[-1]
    if not _NAME.fullmatch(name):
        assert table.source is not None
        raise _error(
            table.source, table.key, f"{_dotted(table.key)}: invalid name {json.dumps(name)}; allowed: {_NAME_RULE}"
        )


# --- run as: users and groups, which must exist when the configuration loads -----------------------------------

RUN_AS_CALLER = "caller"


def _user(setting: _Setting) -> tuple[str, int, int]:
    name = _string(setting)
    try:
        uid, gid = users.user_ids(name)
    except KeyError:
        raise setting.invalid(
            f"there is no user {json.dumps(name)} on this system; allowed: an existing user"
        ) from None
    return name, uid, gid


def _group(setting: _Setting) -> tuple[str, int]:
    name = _string(setting)
    try:
        return name, users.group_id(name)
    except KeyError:
        raise setting.invalid(
            f"there is no group {json.dumps(name)} on this system; allowed: an existing group"
        ) from None


def _socket_mode(setting: _Setting) -> int:
    value = setting.value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        got = f"0o{value:o}" if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else _show(value)
        raise setting.invalid(f"expected permission bits from 0 to 0o777, written in octal such as 0o660, got {got}")
    return value


def _daemon_run_as(table: _Table, daemon: DaemonDef) -> DaemonDef:
    """`default_user` (tasks that name no user run as it), `socket_group` and `socket_mode`."""
    setting = table.settings.get("default_user")
    if setting is not None:
        name, uid, gid = _user(setting)
        default: tuple[str | None, int | None, int | None] = (name, uid, gid)
    elif os.geteuid() == 0:  # never root unless configured so
        try:
            uid, gid = users.user_ids(users.NOBODY)
        except KeyError:
            where = conffile.shown(table.source.path) if table.source is not None else "[daemon]"
            raise ConfigError(
                f"{where}: daemon.default_user is not set and there is no user {users.NOBODY} to run tasks as; "
                "set default_user to an existing unprivileged user",
                file=str(table.source.path) if table.source is not None else None,
                line=None,
                key="daemon.default_user",
            ) from None
        default = (users.NOBODY, uid, gid)
    else:  # an unprivileged jobd can run jobs only as itself
        default = (None, None, None)
    return dataclasses.replace(
        daemon,
        default_user=default[0],
        default_uid=default[1],
        default_gid=default[2],
        socket_group=table.read("socket_group", _string, daemon.socket_group),
        socket_mode=table.read("socket_mode", _socket_mode, daemon.socket_mode),
    )


def _task_run_as(table: _Table, daemon: DaemonDef, task: TaskDef) -> TaskDef:
    """`user`, `group` and `run_as` of a task, resolved to the uid and gid its jobs run as."""
    run_as = table.settings.get("run_as")
    if run_as is not None:
        if run_as.value != RUN_AS_CALLER:
            raise run_as.invalid(f"{_show(run_as.value)} is not allowed; allowed: {json.dumps(RUN_AS_CALLER)}")
        for name in ("user", "group"):
            if name in table.settings:
                raise run_as.invalid(
                    f'run_as = "caller" runs the task as whoever submits it: it cannot be combined with {name}'
                )
        return dataclasses.replace(task, run_as_caller=True)
    user = table.read("user", _user, None)
    group = table.read("group", _group, None)
    uid, gid = (user[1], user[2]) if user is not None else (daemon.default_uid, daemon.default_gid)
    if group is not None:
        gid = group[1]
        if uid is None:  # jobd's own user, with another group
            uid = os.geteuid()
    return dataclasses.replace(
        task,
        user=user[0] if user is not None else daemon.default_user,
        group=group[0] if group is not None else None,
        uid=uid,
        gid=gid,
    )


def _build(merged: _Merged, files: Sequence[Path]) -> Config:
    daemon = _daemon_run_as(merged.daemon, _daemon(merged.daemon))
    queues: dict[str, QueueDef] = {}
    if DEFAULT_QUEUE not in merged.queues:
        queues[DEFAULT_QUEUE] = QueueDef(DEFAULT_QUEUE)
    for name, table in merged.queues.items():
        _check_name(table)
        queues[name] = _queue(table)
    tasks: dict[str, TaskDef] = {}
    for name, table in merged.tasks.items():
        _check_name(table)
        tasks[name] = _task_run_as(table, daemon, _task(table, daemon, queues))
    retry_schedules: dict[str, RetrySchedule] = {}
    for name, table in merged.retry_schedules.items():
        _check_name(table)
        retry_schedules[name] = _retry_schedule(table)
    http = _http(merged.http, merged.http_tokens)
    _check_sockets_apart(merged, daemon, http)
    return Config(
        daemon=daemon,
        queues=MappingProxyType(queues),
        tasks=MappingProxyType(tasks),
        retry_schedules=MappingProxyType(retry_schedules),
        tcp=_tcp(merged.tcp, merged.tcp_users),
        http=http,
        access=_access(merged.access, merged.grants),
        files=tuple(str(path) for path in files),
    )


def _check_sockets_apart(merged: _Merged, daemon: DaemonDef, http: HttpDef) -> None:
    """Each listener needs a Unix socket path of its own: bound to one path, the second listener would replace
    the first's socket file, and its clients would reach the wrong protocol."""
    listeners = [
        (merged.daemon, "socket", daemon.socket),
        (merged.daemon, "evqueue_socket", daemon.evqueue_socket),
        (merged.http, "listen", http.listen if isinstance(http.listen, str) else None),
    ]
    taken: dict[str, str] = {}
    for table, key, path in listeners:
        if path is None:
            continue
        name = _dotted((*table.key, key))
        other = taken.setdefault(_socket_place(path), name)
        if other != name:
            setting = table.settings.get(key)
            problem = f"{path!r} is the path of {other} too; each listener needs a socket of its own"
            if setting is not None:
                raise setting.invalid(problem)
            earlier = next(t.settings[k] for t, k, _ in listeners if _dotted((*t.key, k)) == other)
            raise earlier.invalid(problem)  # the default of this key met a path set for the other


def _socket_place(path: str) -> str:
    """Where a socket path leads: its directory with the symlinks in it resolved, as far as they exist. Debian's
    /var/run is a symlink to /run, so "/var/run/jobd/jobd.sock" is the API socket's own path."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _with_workflows(base: Config, paths: Sequence[Path]) -> Config:
    """Add the workflows, checked against the TOML part; every broken file is reported, not just the first."""
    workflows: dict[str, WorkflowDef] = {}
    errors: list[ConfigError] = []
    for path in paths:
        try:
            workflow = workflowdef.load_workflow(path, base)
        except ConfigError as error:
            errors.append(error)
            continue
        workflows[workflow.name] = workflow
    if errors:
        first = errors[0]
        raise ConfigError("\n".join(error.message for error in errors), **first.details)
    return dataclasses.replace(
        base, workflows=MappingProxyType(workflows), files=base.files + tuple(str(path) for path in paths)
    )


def load(dirs: Sequence[str]) -> Config:
    """Find, read, merge and validate the configuration; no file at all gives the defaults.

    Workflow files are part of it: one broken workflow makes the whole load fail, so a reload stays all or nothing.
    """
    files = find_files(dirs)
    sources = [_read(path) for path in files]
    merged = _merge(sources)
    config = _with_workflows(_build(merged, files), find_workflow_files(dirs))
    return _with_schedules(config, merged.schedules)


def _with_schedules(config: Config, tables: Mapping[str, _Table]) -> Config:
    """Schedules come last: they may name any task or workflow."""
    schedules: dict[str, ScheduleDef] = {}
    for name, table in tables.items():
        _check_name(table)
        schedules[name] = _schedule(table, config)
    return dataclasses.replace(config, schedules=MappingProxyType(schedules))


def load_dir(path: str) -> Config:
    """`jobd --config-dir DIR`: DIR alone is the search path."""
    return load([path])


# --- watching -------------------------------------------------------------------------------------------------


def _complete_when_made(path: str) -> bool:
    """A symlink, a hard link to a file written elsewhere, or what is no regular file (a FIFO, a socket, a device
    node, which a reload reports as an error): each is complete the moment it appears, no write follows."""
    try:
        status = os.lstat(path)
    except OSError:  # gone again: its removal has its own event
        return False
    return not stat.S_ISREG(status.st_mode) or status.st_nlink > 1


_flags = inotify_simple.flags
_MAX_LINKS = 40  # symlinks followed from one wanted path to a missing target (Linux's own limit in a lookup)
_WATCH_MASK = (
    _flags.CLOSE_WRITE
    | _flags.MOVED_TO
    | _flags.MOVED_FROM
    | _flags.DELETE
    | _flags.CREATE
    | _flags.DELETE_SELF
    | _flags.MOVE_SELF
    | _flags.ONLYDIR
)
# The watch no longer shows the directory it was added for: removed, moved away (the watch follows the inode),
# unmounted, or events were dropped.
_WATCH_LOST = _flags.DELETE_SELF | _flags.MOVE_SELF | _flags.IGNORED | _flags.UNMOUNT


# A reload waits until no relevant event has come for SETTLE_SECONDS, but never more than SETTLE_LIMIT_SECONDS after
# the first: tools that replace a file in two steps (`install`, `cp --remove-destination`, an editor that renames
# the old file to a backup before writing the new one) would otherwise have the configuration without that file
# applied in between, dropping its queues (and their pauses) and tasks for a moment. A one-shot timer, armed by
# an event; nothing runs while the files are left alone.
SETTLE_SECONDS = 0.2
SETTLE_LIMIT_SECONDS = 2.0


class _Effect(enum.IntEnum):
    NONE = 0
    CHANGE = 1  # a config file may have changed
    REWATCH = 2  # a watched directory appeared or went away: watches must be placed again, then reload


def _links_along(path: str) -> list[str]:
    """The symlinks met while resolving the absolute `path`, in order, each as the path it was met by (a link in
    the target of another link included); at most _MAX_LINKS of them, as the kernel follows."""
    links: list[str] = []
    current = "/"
    parts = [part for part in path.split(os.sep) if part]
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            target = os.readlink(candidate)
        except OSError:  # not a symlink, or not there (the rest of the way does not exist yet)
            current = candidate
            continue
        links.append(candidate)
        if len(links) >= _MAX_LINKS:
            break
        if os.path.isabs(target):
            current = "/"
        parts[:0] = [piece for piece in target.split(os.sep) if piece]
    return links


class ConfigWatcher:
    """Calls `on_change()` (from the event loop) when a config file may have changed, once the files have been left
    alone for SETTLE_SECONDS: the events of one save, or of several, make one call.

    Watches each search directory, its `jobd.d` and its `workflows`. A directory that does not exist yet is awaited
    by watching its nearest existing ancestor, so creating `/etc/jobd`, `/etc/jobd/jobd.d` or
    `/etc/jobd/workflows` later is noticed; one that is a symlink is watched through it, and followed when the
    symlink is replaced. The watcher never reads config files: the daemon reloads and keeps the running config if
    the new one is broken.
    """

    def __init__(self, dirs: Sequence[str], on_change: Callable[[], None] = lambda: None) -> None:
        self._dirs = tuple(os.path.abspath(d) for d in dirs)
        self._drop_in_dirs = tuple(os.path.join(d, DROP_IN_DIR) for d in self._dirs)
        self._workflow_dirs = tuple(os.path.join(d, WORKFLOWS_DIR) for d in self._dirs)
        self._wanted_dirs = (*self._dirs, *self._drop_in_dirs, *self._workflow_dirs)
        self._on_change = on_change
        self._inotify = inotify_simple.INotify(nonblocking=True)
        self._fd: int = self._inotify.fileno()
        self._watches: dict[int, set[str]] = {}  # two wanted paths can share an ancestor, hence one wd
        self._link_targets: set[str] = set()  # missing targets of wanted paths that are symlinks (_watch_nearest)
        self._links_on_the_way: set[str] = set()  # symlinks met on the way to a wanted path (_watch_links_along)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._first_change = 0.0  # loop time of the first event the pending reload waits after
        self._closed = False
        self._watching = False
        self._unwatched: tuple[str, ...] = ()  # wanted directories the last rewatch could not watch

    def watch(self) -> None:
        """Watch the directories from now on; the kernel keeps what it sees for start(). jobd calls this before it
        first reads its configuration: a file saved while it starts (a long recovery) is reloaded once it is ready,
        not left unread until some later change."""
        if not self._watching:
            self._watching = True
            self._watch_all()

    def start(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None] | None = None) -> None:
        self._loop = loop
        if on_change is not None:
            self._on_change = on_change
        self.watch()
        loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._inotify.close()

    def _watch_all(self) -> None:
        for path in self._wanted_dirs:
            self._watch_nearest(path)
            self._watch_links_along(path)

    def _watch_links_along(self, path: str) -> None:
        """Watch the directory of every symlink met on the way to `path`, so that switching one of them is seen: a
        release link above the configuration (`jobd.d -> /srv/app/current/jobd`, `current -> releases/42` renamed
        over by the next deployment), or the configuration directory itself a symlink. The watches through the old
        link would otherwise stay on the old release."""
        for link in _links_along(path):
            self._links_on_the_way.add(link)
            directory = os.path.dirname(link)
            with contextlib.suppress(OSError):  # gone meanwhile: its own removal is an event on the way, or was
                self._watches.setdefault(self._inotify.add_watch(directory, _WATCH_MASK), set()).add(directory)

    def _watch_nearest(self, path: str, links: int = 0) -> None:
        """Watch `path`, or its nearest existing ancestor so that its creation is seen. For a symlink whose target
        is missing (`jobd.d -> /srv/app/conf`, that directory removed to be made again), also the nearest existing
        ancestor of the target, whose creation then comes as a change of the target (_link_targets)."""
        while True:
            try:
                wd: int = self._inotify.add_watch(path, _WATCH_MASK)
            except (FileNotFoundError, NotADirectoryError):
                if os.path.islink(path) and links < _MAX_LINKS:
                    target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
                    self._link_targets.add(target)
                    self._watch_nearest(target, links + 1)
                parent = os.path.dirname(path)
                if parent == path:
                    raise
                path = parent
                continue
            self._watches.setdefault(wd, set()).add(path)
            return

    def _rewatch(self) -> None:
        # Starting over is simpler than patching single watches, and there are at most three per search dir.
        for wd in self._watches:
            with contextlib.suppress(OSError):  # the kernel already dropped it: the directory was deleted
                self._inotify.rm_watch(wd)
        self._watches.clear()
        self._link_targets.clear()
        self._links_on_the_way.clear()
        # A watch the kernel refuses now (the user's fs.inotify.max_user_watches used up, by other services or
        # editors since jobd started) leaves that directory to SIGHUP and daemon.reload; the others keep working,
        # and each later change tries again.
        unwatched = []
        for path in self._wanted_dirs:
            try:
                self._watch_nearest(path)
                self._watch_links_along(path)
            except OSError as error:
                unwatched.append(path)
                if path not in self._unwatched:
                    log.warning(
                        "the configuration directory %s is not watched (inotify: %s; see fs.inotify.max_user_watches):"
                        " a change there applies at `systemctl reload jobd` or `jobctl reload` only, until jobd can"
                        " watch it again (it tries at each change it sees)",
                        path,
                        error.strerror or error,
                    )
        if self._unwatched and not unwatched:
            log.info("the configuration directories are all watched again")
        self._unwatched = tuple(unwatched)

    def _on_readable(self) -> None:
        effect = _Effect.NONE
        for event in self._inotify.read(timeout=0):
            if event.mask & _flags.Q_OVERFLOW:
                effect = _Effect.REWATCH  # events were lost: anything may have changed
                continue
            # An unknown wd belongs to a watch _rewatch removed; its late IN_IGNORED means nothing.
            for directory in self._watches.get(event.wd, ()):
                effect = max(effect, self._effect(directory, event.name, event.mask))
        if effect is _Effect.REWATCH or (effect is _Effect.CHANGE and self._unwatched):
            # Files may have been written into a new directory before its watch existed: the caller's reload
            # after this rescans everything, so nothing is missed.
            self._rewatch()
        if effect is not _Effect.NONE:
            self._schedule_on_change()

    def _effect(self, directory: str, name: str, mask: int) -> _Effect:
        if mask & _WATCH_LOST:
            return _Effect.REWATCH
        path = os.path.join(directory, name)
        # A directory on the way to a watched one, or a symlink in its place (`jobd.d -> release-42/conf`, switched
        # by renaming a new symlink over it): the watches must follow.
        if self._leads_to_wanted_dir(path):
            return _Effect.REWATCH
        if mask & _flags.ISDIR or not self._is_config_file(path):
            return _Effect.NONE
        # A new regular file is still empty at IN_CREATE: wait for its IN_CLOSE_WRITE. A new symlink (such as a
        # mask to /dev/null), hard link or FIFO gets no IN_CLOSE_WRITE, so it counts at once.
        if mask & _flags.CREATE and not _complete_when_made(path):
            return _Effect.NONE
        return _Effect.CHANGE

    def _leads_to_wanted_dir(self, path: str) -> bool:
        if path in self._links_on_the_way:
            return True
        return any(
            wanted == path or wanted.startswith(path + os.sep) for wanted in (*self._wanted_dirs, *self._link_targets)
        )

    def _is_config_file(self, path: str) -> bool:
        directory, name = os.path.split(path)
        if directory in self._dirs:
            return name == MAIN_FILE
        if directory in self._workflow_dirs:
            return is_workflow_name(name)
        return directory in self._drop_in_dirs and is_config_name(name)

    def _schedule_on_change(self) -> None:
        if self._loop is None:
            return
        now = self._loop.time()
        if self._pending is None:
            self._first_change = now
        else:
            self._pending.cancel()
        when = min(now + SETTLE_SECONDS, self._first_change + SETTLE_LIMIT_SECONDS)
        self._pending = self._loop.call_at(when, self._deliver)

    def _deliver(self) -> None:
        self._pending = None
        self._on_change()
