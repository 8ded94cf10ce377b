"""Property-based fuzzing (hypothesis) of what an administrator writes: the TOML configuration and its drop-ins,
workflow files, calendars and workflow XPath expressions (test_fuzz.py does the protocols' decoders).

The properties: a broken file raises nothing but ConfigError (never a KeyError, an OverflowError or a
RecursionError from inside), whose every line names the file and the line, and is inert on a terminal; a TOML
error names the dotted key too. A configuration split across drop-ins in any way, with wrong values that a
later file overrides, loads as the one file does. The line jobd names for a key is the key's, however the file
is formatted. A calendar raises only ValueError; its due times strictly increase, and the evQueue text of a cron
calendar gives the same times. An XPath expression the loader accepts evaluates on an instance document to a
value or to XPathError. Example counts are kept small: each property runs in a few seconds (no deadline: timings
do not belong in tests). The fixed examples are the regressions the fuzzing found.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lxml import etree

from jobd import conffile, config, workflowdef
from jobd.engine import xpath
from jobd.engine.schedule import Calendar
from jobd.errors import ConfigError
from jobd.model import Config

pytestmark = pytest.mark.timeout(300)

FILES = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CORPUS = Path(__file__).resolve().parent / "workflows"


def inert(text: str) -> bool:
    """No control character (a newline included) and no text-reordering character: what conffile.shown leaves."""
    return conffile.shown(text) == text


# -- writing TOML ---------------------------------------------------------------------------------------------------


def toml_string(text: str) -> str:
    escaped = "".join(
        f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else "\\" + char if char in '"\\' else char
        for char in text
    )
    return f'"{escaped}"'


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict), value
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_table(path: tuple[str, ...], body: dict[str, Any], *, array: bool = False) -> str:
    header = ".".join(toml_key(part) for part in path)
    lines = [f"[[{header}]]" if array else f"[{header}]"]
    lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in body.items()]
    return "\n".join(lines) + "\n"


# A configuration that uses every section and nearly every key: each example breaks one or two of its values.
SHA1, SHA256 = "a" * 40, "b" * 64
VALID: dict[str, Any] = {
    "daemon": {
        "state_dir": "/var/lib/jobd-fuzz",
        "durability": "crash",
        "history": {"keep_days": 30, "keep_last": 1000},
        "kill_grace": 10,
        "max_output": 1048576,
        "default_user": "nobody",
        "socket_group": "root",
        "socket_mode": 0o660,
        "max_connections": 100,
        "max_connections_per_user": 10,
    },
    "queue": {
        "q1": {
            "concurrency": 4,
            "scheduler": "priority",
            "paused": False,
            "on_success": [{"exec": ["/bin/true"]}],
            "on_failure": [{"http": {"url": "http://127.0.0.1:1/x", "method": "POST"}}],
        }
    },
    "task": {
        "t1": {
            "command": ["/bin/echo", "x"],
            "queue": "q1",
            "parameters": "env",
            "allowed_params": ["EDITION"],
            "working_dir": "/tmp",
            "environment": {"APP": "x"},
            "timeout": 60,
            "kill_grace": 1,
            "retry": {"times": 3, "delay": 1, "backoff": 2.0, "on_exit_codes": [75]},
            "max_output": 100,
            "user": "nobody",
        },
        "t2": {"command": ["/bin/true"], "run_as": "caller"},
        "h1": {"http": {"url": "http://127.0.0.1:1/", "method": "POST", "headers": {"X": "y"}}, "timeout": 10},
    },
    "retry_schedule": {"r1": {"levels": [{"delay": 1, "times": 2}, {"delay": 5, "times": 1}]}},
    "schedule": {
        "s1": {
            "task": "t1",
            "parameters": {"EDITION": "w"},
            "calendar": "0 9 * * mon",
            "timezone": "Europe/Paris",
            "overlap": "skip",
            "on_failure": "continue",
            "catch_up": True,
            "jitter": 5,
            "enabled": True,
        },
        "s2": {"task": "t2", "calendar": "0,30;;;;;"},
    },
    "tcp": {
        "listen": "127.0.0.1:0",
        "login_delay": 0.5,
        "login_delay_max": 5,
        "users": {"u1": {"password_sha1": SHA1, "groups": ["g"], "admin": True}},
    },
    "http": {
        "listen": "127.0.0.1:0",
        "tokens": {"k1": {"token_sha256": SHA256, "user": "web", "groups": ["g"], "admin": False}},
    },
    "access": {
        "admins": {"users": ["root"], "groups": ["sudo"]},
        "grant": [{"users": ["www-data"], "rights": ["read", "exec"], "tasks": ["t*"], "queues": ["q1"]}],
    },
}
NAMED = {"queue", "task", "retry_schedule", "schedule"}
ENTRIES = {"tcp": "users", "http": "tokens"}


def settings_of(document: dict[str, Any]) -> list[tuple[tuple[str, ...], str | None, Any]]:
    """Each table's keys as (table path, key, value); a [[access.grant]] as (("access", "grant"), None, table).
    In this order they make the document again, in one file or spread over several."""
    found: list[tuple[tuple[str, ...], str | None, Any]] = []
    for section, body in document.items():
        for key, value in body.items():
            if section in NAMED:
                found += [((section, key), name, item) for name, item in value.items()]
            elif key == ENTRIES.get(section):
                found += [
                    ((section, key, entry), name, item)
                    for entry, table in value.items()
                    for name, item in table.items()
                ]
            elif (section, key) == ("access", "grant"):
                found += [(("access", "grant"), None, grant) for grant in value]
            else:
                found.append(((section,), key, value))
    return found


def toml_file(found: list[tuple[tuple[str, ...], str | None, Any]]) -> str:
    tables: dict[tuple[str, ...], dict[str, Any]] = {}
    grants = []
    for path, key, value in found:
        if key is None:
            grants.append(value)
        else:
            tables.setdefault(path, {})[key] = value
    return "".join(toml_table(path, body) for path, body in tables.items()) + "".join(
        toml_table(("access", "grant"), grant, array=True) for grant in grants
    )


def config_dir(directory: Path, files: list[str]) -> list[str]:
    """`files` as jobd.toml and drop-ins applied in that order, and the sockets in a drop-in (paths of no directory
    jobd makes: they are only loaded); the search path of that directory."""
    (directory / "jobd.d").mkdir(parents=True, exist_ok=True)
    sockets = '[daemon]\nsocket = "/run/jobd-fuzz/api.sock"\nevqueue_socket = "/run/jobd-fuzz/evq.sock"\n'
    (directory / "jobd.toml").write_text(files[0] if files else "")
    (directory / "jobd.d" / "00-sockets.toml").write_text(sockets)
    for number, text in enumerate(files[1:], 1):
        (directory / "jobd.d" / f"{number:02}.toml").write_text(text)
    return [str(directory)]


def without_files(loaded: Config) -> Config:
    """The configuration without what names its files: the files read, and the file of each TCP password."""
    return dataclasses.replace(loaded, files=(), tcp=dataclasses.replace(loaded.tcp, password_files={}))


# -- values of every type -------------------------------------------------------------------------------------------

KEYS = sorted({*config.TASK_KEYS, *config.DAEMON_KEYS, *config.SCHEDULE_KEYS, *config.TCP_KEYS, *config.GRANT_KEYS})
STRINGS = st.sampled_from(
    ["", "default", "q1", "t1", "/bin/echo", "/tmp", "root", "nobody", "no-such-user", "env", "args", "priority",
     "0 * * * *", "@daily", "0;0;0;;;", "Europe/Paris", "Europe", "127.0.0.1:0", "[::1]:0", "99999", "caller",
     "read", "GET", "http://127.0.0.1:1/", "a\0b", "\u202e", "\x9b2J", "a\nb", "\x1b[31m", "5#6", "L"]
) | st.text(max_size=8)  # fmt: skip
INTEGERS = (
    st.sampled_from(
        [0, 1, -1, 255, 256, 0o777, 0o1000, 2**63 - 1, 2**63, -(2**63) - 1, 10**400, -(10**400), 100_001, 65536]
    )
    | st.integers()
)
FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 3.2e9, 0.5]) | st.floats()
MOMENTS = st.sampled_from([dt.date(2024, 2, 29), dt.time(12, 30), dt.datetime(2024, 1, 1, tzinfo=dt.UTC)])
SCALARS = st.booleans() | INTEGERS | FLOATS | STRINGS | MOMENTS
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def broken(draw: Any) -> dict[str, Any]:
    """VALID with one or two values replaced (at any depth), removed, or an unknown key added."""
    document = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 2))):
        parent: Any = document
        path = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5))
        for index in path[:-1]:
            keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
            if not keys or not isinstance(parent[keys[index % len(keys)]], dict | list):
                break
            parent = parent[keys[index % len(keys)]]
        keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        if not keys:
            continue
        key = keys[path[-1] % len(keys)]
        action = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS) | st.text(max_size=4))] = draw(VALUES)
        else:
            parent[key] = draw(VALUES)
    return document


def render(document: dict[str, Any]) -> str:
    """A document as one TOML file, each section a table whose values are written inline (whatever they became);
    a section that is no longer a table is a plain key before them."""
    tables = {name: body for name, body in document.items() if isinstance(body, dict)}
    plain = "".join(f"{toml_key(name)} = {toml_value(body)}\n" for name, body in document.items() if name not in tables)
    return plain + "".join(toml_table((name,), body) for name, body in tables.items())


# -- the TOML configuration -----------------------------------------------------------------------------------------


def test_the_valid_configuration_loads(tmp_path: Path) -> None:
    loaded = config.load(config_dir(tmp_path, [render(VALID)]))
    assert set(loaded.tasks) == {"t1", "t2", "h1"} and set(loaded.schedules) == {"s1", "s2"}
    assert loaded.tasks["t1"].retry.times == 3 and loaded.tcp.users["u1"].admin is True


@FILES
@given(broken())
@example(document={**VALID, "daemon": {**VALID["daemon"], "kill_grace": 10**400}})
@example(document={**VALID, "task": {**VALID["task"], "t1": {**VALID["task"]["t1"], "environment": {"A": "\x9b"}}}})
@example(document={**VALID, "schedule": {"s": {"task": "t1", "calendar": "\u202e * * * *"}}})
def test_a_broken_configuration_raises_only_config_errors_naming_file_line_and_key(
    tmp_path_factory: pytest.TempPathFactory, document: dict[str, Any]
) -> None:
    directory = tmp_path_factory.mktemp("conf")
    try:
        config.load(config_dir(directory, [render(document)]))
    except ConfigError as error:
        main = str(directory / "jobd.toml")
        assert error.details["file"] == main, error.details
        assert error.message.startswith(f"{main}:{error.details['line']}: "), error.message
        assert error.details["line"] is not None or "invalid TOML" in error.message, error.message
        assert inert(error.message), error.message
        if "invalid TOML" not in error.message:
            assert error.details["key"], error.details


@settings(FILES, max_examples=25)  # two loads each, and a load reads a schedule's whole calendar cycle
@given(
    st.integers(1, 4).flatmap(
        lambda files: st.tuples(
            st.just(files),
            st.lists(st.integers(0, files - 1), min_size=len(settings_of(VALID)), max_size=len(settings_of(VALID))),
            st.lists(
                st.tuples(st.integers(0, len(settings_of(VALID)) - 1), st.integers(0, files - 1), VALUES), max_size=3
            ),
        )
    )
)
def test_a_configuration_spread_over_drop_ins_in_any_way_loads_as_one_file(
    tmp_path_factory: pytest.TempPathFactory, spread: tuple[int, list[int], list[tuple[int, int, Any]]]
) -> None:
    """Each setting goes to one of the files; a wrong value set for it in an earlier file is overridden."""
    count, places, overridden = spread
    found = settings_of(VALID)
    files: list[list[Any]] = [[] for _ in range(count)]
    for setting, place in zip(found, places, strict=True):
        files[place].append(setting)
    for index, place, wrong in overridden:
        path, key, _ = found[index]
        if key is not None and place < places[index]:
            files[place].insert(0, (path, key, wrong))
    one = config.load(config_dir(tmp_path_factory.mktemp("one"), [render(VALID)]))
    spread_out = config.load(config_dir(tmp_path_factory.mktemp("many"), [toml_file(items) for items in files]))
    assert without_files(spread_out) == without_files(one)


# The same key, formatted as TOML allows: quoted or bare parts, spaces around dots, comments, and values that
# span lines (multi-line strings and arrays) holding what looks like headers and keys.
TRICKS = st.sampled_from(
    ["[x]", "k = 1", "#", '"', "'", '"""', "'''", "\\", "]", "[", "{", "}", "=", " ", "a", "[[y]]"]
)


def _basic(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def formatted_value(draw: Any) -> str:
    content = draw(st.lists(TRICKS, max_size=6).map("".join))
    lines = draw(st.lists(st.lists(TRICKS, max_size=4).map("".join), max_size=3))
    return draw(
        st.sampled_from(
            [
                "1",
                _basic(content),
                "'" + content.replace("'", "") + "'",
                '"""\n' + "\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines) + '"""',
                "'''" + "\n".join(line.replace("'", "") for line in lines) + "'''",
                "[\n" + "".join(f"  {_basic(line)}, # ] [x] = '\"\n" for line in lines) + "]",
                "{ a = " + _basic(content) + ", b = [1, [2]] }",
            ]
        )
    )


def _key_forms(name: str) -> Any:
    return st.sampled_from([f'"{name}"', f"'{name}'", *([name] if re.fullmatch(r"[A-Za-z0-9_-]+", name) else [])])


@st.composite
def formatted_documents(draw: Any) -> tuple[str, dict[tuple[str, ...], int]]:
    lines: list[str] = []
    expected: dict[tuple[str, ...], int] = {}
    names = st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True) | st.sampled_from(["a.b", "x y", "é", 'q"t'])
    for table in draw(st.lists(st.lists(names, min_size=1, max_size=3).map(tuple), max_size=4, unique=True)):
        if any(table[:size] in expected for size in range(1, len(table) + 1)):
            continue  # a table defined twice, or below a key: not TOML
        dots = draw(st.sampled_from([".", " . ", ". "]))
        header = dots.join(draw(_key_forms(name)) for name in table)
        lines.append(f"[{header}]" + draw(st.sampled_from(["", " # [z] c"])))
        expected[table] = len(lines)
        for key in draw(st.lists(names, max_size=4, unique=True)):
            expected[(*table, key)] = len(lines) + 1
            equals = draw(st.sampled_from([" = ", "=", "\t=  "]))
            comment = draw(st.sampled_from(["", " # k = [", "#'"]))
            lines += f"{draw(_key_forms(key))}{equals}{draw(formatted_value())}{comment}".split("\n")
    end = draw(st.sampled_from(["\n", "\r\n"]))
    return end.join(lines) + end, expected


@FILES
@given(formatted_documents())
@example(('[a]\nk = """\n[b]\nj = 1"""\nm = 2\n', {("a",): 1, ("a", "k"): 2, ("a", "m"): 5}))
def test_the_line_named_for_a_key_is_its_own_however_the_file_is_formatted(
    document: tuple[str, dict[tuple[str, ...], int]],
) -> None:
    text, expected = document
    try:
        config.tomllib.loads(text)
    except config.tomllib.TOMLDecodeError:
        return  # some mixes of quotes make no TOML; the lines are found only in files that load
    source = config._Source(Path("jobd.toml"), text)
    assert {key: source.line_of(key) for key in expected} == expected, text


# -- workflow files -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    directory = tmp_path_factory.mktemp("corpus")
    text = f'[daemon]\ntasks_directory = "{CORPUS / "tasks"}"\n' + (CORPUS / "corpus.toml").read_text()
    (directory / "jobd.toml").write_text(text)
    return config.load([str(directory)])


DOCUMENTS = [path.read_bytes() for path in sorted(CORPUS.glob("*.xml"))]
TAGS = [*workflowdef.SCHEMA, "x"]
ATTRIBUTES = sorted({name for rule in workflowdef.SCHEMA.values() for name in rule.attributes} | {"bogus"})
ATTRIBUTE_VALUES = st.sampled_from(
    ["", "0", "-1", "99999999999999999999999", "yes", "SCRIPT", "ENV", "XML", "serial", "greet", "fast_then_slow",
     "nosuch", "'unclosed", "a|b", "$HOME", "{", "{.}", "{'a'}{", "/", "//", "evqGetJob('x')", "count(", "$v",
     "p:x", "a/name()", "\u202e", "\x9b2J", "\t"]
) | st.text(max_size=8)  # fmt: skip


@st.composite
def workflow_documents(draw: Any) -> bytes:
    """A corpus workflow with a few elements, attributes or texts changed; or its bytes cut, or with some inserted."""
    source = draw(st.sampled_from(DOCUMENTS))
    if draw(st.integers(0, 3)) == 0:
        data = bytearray(source)
        at = draw(st.integers(0, len(data)))
        inserted = st.sampled_from([b"<", b"&", b"\0", b"\xff", b"<!DOCTYPE x>", b"\xc3\xa9<!--", b"<x/>"])
        data[at:at] = draw(inserted | st.binary(max_size=3))
        return bytes(data[: draw(st.integers(at, len(data)))])
    root = etree.fromstring(source)
    elements = [element for element in root.iter() if isinstance(element.tag, str)]
    for _ in range(draw(st.integers(1, 4))):
        element = draw(st.sampled_from(elements))
        change = draw(st.sampled_from(["attribute", "attribute", "remove", "child", "text", "tag"]))
        if change == "attribute":
            element.set(draw(st.sampled_from(ATTRIBUTES)), draw(ATTRIBUTE_VALUES.filter(etree_allows)))
        elif change == "remove" and element.getparent() is not None:
            element.getparent().remove(element)
        elif change == "child":
            etree.SubElement(element, draw(st.sampled_from(TAGS)))
        elif change == "text":
            element.text = draw(ATTRIBUTE_VALUES.filter(etree_allows))
        elif change == "tag":
            element.tag = draw(st.sampled_from(TAGS))
    return bytes(etree.tostring(root))


def etree_allows(text: str) -> bool:
    """Whether lxml lets a value be set (XML has no NUL and most C0 controls)."""
    return all(
        char in "\t\n\r" or 0x20 <= ord(char) < 0xD800 or 0xE000 <= ord(char) <= 0xFFFD or ord(char) > 0xFFFF
        for char in text
    )


@FILES
@given(workflow_documents())
@example(b"<workflow>\n<subjobs>\n\0<job/>\n</subjobs>\n</workflow>\n")  # libxml2's message had a newline
@example(b'<workflow>\n<subjobs xmlns="\xc2\x9b2J"/>\n</workflow>\n')  # ... and quoted the file
@example(b"<workflow>\n<!-- caf\xc3\xa9")
@example(
    b"<workflow>\n<subjobs><job><tasks><task queue='\xe2\x80\xae' path='/bin/true'/></tasks></job></subjobs></workflow>"
)
@example(b"<workflow>\n<!-- no <!DOCTYPE here -->\n</workflow>\n")  # no line was named
def test_a_broken_workflow_file_raises_only_config_errors_each_on_an_inert_line_naming_file_and_line(
    corpus_config: Config, data: bytes
) -> None:
    path = "/etc/jobd/workflows/fuzzed.xml"
    try:
        workflow = workflowdef.parse_workflow(data, path, corpus_config)
    except ConfigError as error:
        assert error.details["file"] == path and error.details["line"] is not None, error.message
        assert error.message.startswith(f"{path}:{error.details['line']}: "), error.message
        for line in error.message.split("\n"):
            assert re.match(rf"{re.escape(path)}:\d+: ", line) and inert(line), error.message
    else:
        assert workflow.name == "fuzzed" and workflow.source == data


# -- calendars ------------------------------------------------------------------------------------------------------

CRON_PARTS = st.sampled_from(
    ["*", "L", "W", "#", "/", "-", ",", "?", "0", "1", "7", "59", "60", "99999999999999999999", "jan", "sun", "15W",
     "5#5", "5#6", "L5", "*/0", "1-5/2", "5-1", "7-0", "H", "R", "+5", "1.5", ";", "@daily", "@"]
)  # fmt: skip
CRON_TEXT = st.lists(st.lists(CRON_PARTS, min_size=1, max_size=3).map("".join), min_size=1, max_size=7).map(" ".join)
EVQUEUE_LEVEL = st.lists(
    st.sampled_from(["0", "1", "+5", "-0", "-1", "30", "31", "59", "60", "6", "7", "11", "12", " ", "a", ""]),
    max_size=3,
)
EVQUEUE_TEXT = st.lists(EVQUEUE_LEVEL.map(",".join), min_size=1, max_size=7).map(";".join)


def _field(low: int, high: int) -> Any:
    value = st.integers(low, high)
    return st.one_of(
        st.just("*"),
        value.map(str),
        st.tuples(value, value).map(lambda ends: f"{min(ends)}-{max(ends)}"),
        st.integers(1, 30).map(lambda step: f"*/{step}"),
        st.lists(value, min_size=1, max_size=3).map(lambda values: ",".join(map(str, values))),
    )


CRON = st.tuples(_field(0, 59), _field(0, 59), _field(0, 23), _field(1, 31), _field(1, 12), _field(0, 7)).map(" ".join)
ZONES = st.sampled_from([None, "UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"])


@FILES
@given(CRON_TEXT | EVQUEUE_TEXT | CRON | st.text(max_size=30), st.integers(0, 4_000_000_000), ZONES)
def test_a_calendar_raises_only_value_errors_and_its_due_times_strictly_increase(
    text: str, after: int, zone: str | None
) -> None:
    try:
        calendar = Calendar.parse(text)
    except ValueError:
        return
    moment = float(after)
    for _ in range(4):
        due = calendar.next_after(moment, zone)
        assert due > moment and due == int(due), (text, moment, due)
        moment = due


@FILES
@given(CRON, st.integers(0, 4_000_000_000), ZONES)
def test_the_evqueue_text_of_a_cron_calendar_has_the_same_due_times(text: str, after: int, zone: str | None) -> None:
    try:
        calendar = Calendar.parse(text)
    except ValueError:
        return
    evqueue = calendar.evqueue_text()
    if evqueue is None:
        return  # cron's OR of day and weekday, which evQueue's format cannot say
    same = Calendar.parse(evqueue)
    moment = float(after)
    for _ in range(3):
        due = calendar.next_after(moment, zone)
        assert same.next_after(moment, zone) == due, (text, evqueue, moment)
        moment = due


# -- workflow XPath -------------------------------------------------------------------------------------------------

INSTANCE = (
    b'<workflow evqid="1"><parameters><parameter name="p">v</parameter></parameters><subjobs>'
    b'<job evqid="2" name="j" context-id="3"><tasks><task evqid="3" path="t" name="t" context-id="2">'
    b'<input name="n">in</input><output><a x="1">1<b>2</b></a><a>3</a><!--c--><?pi x?></output></task></tasks>'
    b'<subjobs><job evqid="4" name="k"><tasks><task evqid="5" path="u" context-id="99"><output>x</output></task>'
    b"</tasks></job></subjobs></job></subjobs></workflow>"
)
XPATH_ATOMS = ["a", "job", "@name", ".", "..", "/", "*", "'s'", "1", "-1", "1 div 0", "text()", "node()",
               "evqGetCurrentJob()", "evqGetContext()", "current()", "position()", "last()"]  # fmt: skip
XPATH_STEPS = ["a", "*", "@name", "text()", "..", "evqGetParentJob()", "evqGetOutput('t')", "evqGetContext()",
               "evqGetInput('t','n')", "evqGetParentJob(1)", "evqGetParentJob('j')", "evqGetParentJob(1 div 0)",
               "evqGetParentJob(1e300)", "ancestor::*", "parent::node()"]  # fmt: skip
FUNCTIONS = [*xpath.XPATH_FUNCTIONS, *xpath.EVQ_FUNCTIONS, *xpath.COMPAT_FUNCTIONS]
OPERATORS = [" | ", " = ", " != ", " < ", " + ", " * ", " div ", " mod ", " and ", " or "]


def expressions() -> Any:
    return st.recursive(
        st.sampled_from(XPATH_ATOMS),
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(["/", "//"]), st.sampled_from(XPATH_STEPS)).map("".join),
            st.tuples(inner, inner).map(lambda parts: f"{parts[0]}[{parts[1]}]"),
            st.tuples(inner, st.sampled_from(OPERATORS), inner).map("".join),
            inner.map(lambda part: f"({part})"),
            st.tuples(st.sampled_from(FUNCTIONS), st.lists(inner, max_size=3)).map(
                lambda call: f"{call[0]}({', '.join(call[1])})"
            ),
        ),
        max_leaves=6,
    )


@FILES
@given(expressions() | st.text(alphabet="/.@*()[]|=,'$: abjd0", max_size=20), st.booleans(), st.integers(0, 3))
@example(expression="evqGetParentJob(1e300)", summary=False, which=1)
def test_an_accepted_xpath_expression_evaluates_to_a_value_or_an_xpath_error(
    expression: str, summary: bool, which: int
) -> None:
    try:
        xpath.compile_check(expression, summary=summary)
    except xpath.XPathError:
        return
    root = etree.fromstring(INSTANCE)
    nodes = [node for node in root.iter() if node.tag in ("job", "task")]
    node = root if summary else nodes[which % len(nodes)]
    context = xpath.EvalContext.for_summary(root) if summary else xpath.EvalContext.for_node(node, root)
    for evaluate in (xpath.evaluate, xpath.evaluate_boolean, xpath.evaluate_string, xpath.evaluate_strings):
        with contextlib.suppress(xpath.XPathError, xpath.WaitRequested):
            evaluate(expression, node, context)
