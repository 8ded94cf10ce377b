"""The man pages in man/: each is clean under `mandoc -Tlint`, formats with mandoc and man-db, and names everything
the code defines — config keys, jobctl commands and options, JSON-RPC methods, error codes, evQueue commands, HTTP
routes, workflow elements, the JOBD_* variables a job gets — in the right page and section.

The names come from the code (the registries the config parser checks keys against, the argparse parser, the
dispatch tables, the error classes, a real job's environment), so a new key or command without documentation fails
here. A name counts as documented when it is an item tag (`.It`) of the expected section: a passing mention in
prose does not count.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import jobd
from jobd import api, config, jobctl, workflowdef
from jobd import client as client_module
from jobd import daemon as daemon_module
from jobd.engine import callbacks, http_task, xpath
from jobd.errors import JobdError
from jobd.protocol import evqueue

MAN = Path(__file__).resolve().parent.parent / "man"
PAGES = ("jobd.8", "jobctl.1", "jobd.toml.5", "jobd-workflow.5", "jobd-protocol.7")

# mdoc macros that may appear on an `.It` line; any other token is text (a name, a value, punctuation).
_MACROS = frozenset(
    {
        "Ad",
        "An",
        "Ap",
        "Ar",
        "Bq",
        "Brq",
        "Cm",
        "Dl",
        "Dq",
        "Dv",
        "Em",
        "Er",
        "Ev",
        "Fa",
        "Fl",
        "Fn",
        "Ic",
        "Li",
        "Nm",
        "No",
        "Ns",
        "Oc",
        "Oo",
        "Op",
        "Pa",
        "Pf",
        "Pq",
        "Ql",
        "Qq",
        "Sq",
        "Sx",
        "Sy",
        "Va",
        "Xr",
    }
)
_PUNCTUATION = frozenset(",.;:|()[]=")
_TOKEN = re.compile(r'"((?:[^"]|"")*)"|(\S+)')


def _unescape(text: str) -> str:
    for escape, plain in (("\\&", ""), ("\\-", "-"), ("\\(dq", '"'), ("\\e", "\\"), ('""', '"')):
        text = text.replace(escape, plain)
    return text


@dataclass
class Section:
    """The `.It` items of one `.Sh` / `.Ss` of a page, each as the words of its tag, and the section's source."""

    items: list[list[str]] = field(default_factory=list)
    source: list[str] = field(default_factory=list)

    def names(self) -> set[str]:
        return {word for item in self.items for word in item}


@dataclass
class Page:
    name: str
    sections: dict[tuple[str, str], Section]  # (.Sh title, .Ss title or "")

    def section(self, sh: str, ss: str | None = None) -> Section:
        """Everything under `.Sh sh` (all of its subsections), or one `.Ss ss` of it."""
        found = [s for (h, sub), s in self.sections.items() if h == sh and (ss is None or sub == ss)]
        assert found, f"{self.name}: no section {sh!r}" + (f" / {ss!r}" if ss is not None else "")
        return Section([i for s in found for i in s.items], [line for s in found for line in s.source])

    def subsections(self, sh: str) -> list[str]:
        return [sub for (h, sub) in self.sections if h == sh and sub]


def _tag_words(arguments: str) -> list[str]:
    """The words of an `.It` tag: macros dropped, `Fl x` as `-x`, quoted arguments kept whole."""
    words: list[str] = []
    macro = ""
    for match in _TOKEN.finditer(arguments):
        quoted, bare = match.group(1), match.group(2)
        if quoted is None and bare in _MACROS:
            macro = bare
            continue
        if quoted is None and bare in _PUNCTUATION:
            continue
        word = _unescape(quoted if quoted is not None else bare)
        words.append("-" + word if macro == "Fl" else word)
    return words


def _title(arguments: str) -> str:
    return " ".join(_unescape(m.group(1) if m.group(1) is not None else m.group(2)) for m in _TOKEN.finditer(arguments))


def parse(name: str) -> Page:
    sections: dict[tuple[str, str], Section] = {}
    sh, ss = "", ""
    for line in (MAN / name).read_text().splitlines():
        if line.startswith(".Sh "):
            sh, ss = _title(line[4:]), ""
        elif line.startswith(".Ss "):
            ss = _title(line[4:])
        section = sections.setdefault((sh, ss), Section())
        section.source.append(line)
        if line.startswith(".It "):
            section.items.append(_tag_words(line[4:]))
    return Page(name, sections)


def missing(page: str, where: str, wanted: Iterable[str], documented: set[str]) -> list[str]:
    return [f"{page} {where}: {name}" for name in wanted if name not in documented]


def report(problems: Sequence[str]) -> None:
    assert not problems, "not documented in the man pages:\n  " + "\n  ".join(problems)


# --- formatting ---------------------------------------------------------------------------------------------------


def test_every_page_exists() -> None:
    assert sorted(p.name for p in MAN.iterdir()) == sorted(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_silent(page: str) -> None:
    result = subprocess.run(
        ["mandoc", "-Tlint", "-W", "warning", str(MAN / page)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def _plain(text: str) -> str:
    """Rendered text without the backspace overstrikes of bold and underline."""
    return re.sub(".\x08", "", text)


@pytest.mark.parametrize("page", PAGES)
def test_page_formats(page: str) -> None:
    """mandoc renders it, and so does man-db (groff's mdoc macros), which is what `man jobd` runs."""
    name, section = page.rsplit(".", 1)
    rendered = _plain(
        subprocess.run(["mandoc", "-Tutf8", str(MAN / page)], capture_output=True, text=True, check=True).stdout
    )
    header = rendered.splitlines()[0]
    assert f"{name.upper()}({section})" in header
    assert "NAME" in rendered and "SEE ALSO" in rendered
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}
    man = subprocess.run(
        ["man", "--warnings", "-l", str(MAN / page)], capture_output=True, text=True, check=False, env=env
    )
    assert man.returncode == 0 and man.stderr == "", man.stderr
    assert _plain(man.stdout).splitlines()[0].split()[0] == f"{name.upper()}({section})"


# --- jobd.toml(5): every key of every section, from the registries the parser checks keys against -------------

# Which subsection of jobd.toml(5) lists the keys of each registry in jobd.config. Every `*_KEYS` registry must be
# here (checked below), so a new kind of table cannot go undocumented.
CONFIG_REGISTRIES = {
    "DAEMON_KEYS": "[daemon]",
    "HISTORY_KEYS": "[daemon] history",
    "QUEUE_KEYS": "[queue.NAME]",
    "TASK_KEYS": "[task.NAME]",
    "RETRY_KEYS": "[task.NAME] retry",
    "RETRY_SCHEDULE_KEYS": "[retry_schedule.NAME]",
    "RETRY_LEVEL_KEYS": "[retry_schedule.NAME] levels",
    "SCHEDULE_KEYS": "[schedule.NAME]",
    "TCP_KEYS": "[tcp]",
    "TCP_USER_KEYS": "[tcp.users.NAME]",
    "HTTP_KEYS": "[http]",
    "HTTP_TOKEN_KEYS": "[http.tokens.NAME]",
    "ACCESS_KEYS": "[access]",
    "ADMINS_KEYS": "[access] admins",
    "GRANT_KEYS": "[[access.grant]]",
}


def test_every_config_registry_has_a_section() -> None:
    registries = {name for name in dir(config) if name.endswith("_KEYS")}
    assert registries == set(CONFIG_REGISTRIES), "map each registry of jobd.config to its jobd.toml(5) subsection"


def test_config_keys_are_documented() -> None:
    page = parse("jobd.toml.5")
    problems: list[str] = []
    for registry, subsection in CONFIG_REGISTRIES.items():
        keys = getattr(config, registry)
        problems += missing(page.name, subsection, keys, page.section("SECTIONS", subsection).names())
    # The `http` table of a task is checked by jobd.engine.http_task, callbacks by jobd.engine.callbacks.
    problems += missing(
        page.name, "[task.NAME] http", http_task.KEYS, page.section("SECTIONS", "[task.NAME] http").names()
    )
    callback_names = page.section("SECTIONS", "Callbacks").names()
    # A callback is { exec = [...] } or { http = {...} }: callbacks._check_one accepts exactly these two.
    problems += missing(page.name, "Callbacks", ("exec", "http", *callbacks._HTTP_KEYS), callback_names)
    for event in callbacks.EVENTS:
        for subsection in ("[queue.NAME]", "[task.NAME]"):
            problems += missing(page.name, subsection, [event], page.section("SECTIONS", subsection).names())
    titles = page.subsections("SECTIONS")
    for section in config.SECTIONS:
        if not any(title.lstrip("[").startswith(section) for title in titles):
            problems.append(f"{page.name} SECTIONS: no subsection for [{section}]")
    report(problems)


def _key_items(section: Section) -> list[str]:
    """The names a subsection of jobd.toml(5) documents as keys: its `.It Cm NAME [, NAME]... [No = ...]` items."""
    names: list[str] = []
    for line in section.source:
        if line.startswith(".It Cm "):
            names += [word for word in line[len(".It Cm ") :].split(" No ")[0].split() if word != ","]
    return names


def test_no_documented_config_key_is_missing_from_the_code() -> None:
    """The other direction for jobd.toml(5): each key a subsection documents is one its table takes (a key renamed
    or removed in the code leaves no stale entry behind)."""
    page = parse("jobd.toml.5")
    taken = {subsection: tuple(getattr(config, registry)) for registry, subsection in CONFIG_REGISTRIES.items()}
    taken["[task.NAME] http"] = http_task.KEYS
    taken["Callbacks"] = ("exec", "http", *callbacks._HTTP_KEYS)
    stale = [
        f"{page.name} SECTIONS / {subsection}: {name} is not a key of that table"
        for subsection in page.subsections("SECTIONS")
        for name in _key_items(page.section("SECTIONS", subsection))
        if name not in taken.get(subsection, ())
    ]
    assert not stale, "documented in the man pages but not in the code:\n  " + "\n  ".join(stale)


# The registries are what the parser itself refuses unknown keys with: an unknown key in each kind of table is
# reported with exactly that registry as the allowed keys, so the list the test reads cannot drift from the parser.
UNKNOWN_KEY_CASES = [
    ("[daemon]\nbogus = 1", "DAEMON_KEYS"),
    ("[daemon]\nhistory = { bogus = 1 }", "HISTORY_KEYS"),
    ("[queue.q]\nbogus = 1", "QUEUE_KEYS"),
    ('[task.t]\ncommand = ["/bin/true"]\nbogus = 1', "TASK_KEYS"),
    ('[task.t]\ncommand = ["/bin/true"]\nretry = { bogus = 1 }', "RETRY_KEYS"),
    ("[retry_schedule.r]\nbogus = 1", "RETRY_SCHEDULE_KEYS"),
    ("[retry_schedule.r]\nlevels = [{ delay = 1, times = 1, bogus = 1 }]", "RETRY_LEVEL_KEYS"),
    ('[task.t]\ncommand = ["/bin/true"]\n[schedule.s]\ntask = "t"\ncalendar = "@daily"\nbogus = 1', "SCHEDULE_KEYS"),
    ("[tcp]\nbogus = 1", "TCP_KEYS"),
    ('[tcp.users.u]\npassword_sha1 = "' + "0" * 40 + '"\nbogus = 1', "TCP_USER_KEYS"),
    ("[http]\nbogus = 1", "HTTP_KEYS"),
    ('[http.tokens.t]\ntoken_sha256 = "' + "0" * 64 + '"\nbogus = 1', "HTTP_TOKEN_KEYS"),
    ("[access]\nbogus = 1", "ACCESS_KEYS"),
    ("[access]\nadmins = { bogus = 1 }", "ADMINS_KEYS"),
    ('[[access.grant]]\nusers = ["root"]\nrights = ["read"]\ntasks = ["*"]\nbogus = 1', "GRANT_KEYS"),
]


@pytest.mark.parametrize(("toml", "registry"), UNKNOWN_KEY_CASES, ids=[case[1] for case in UNKNOWN_KEY_CASES])
def test_registry_is_what_the_parser_allows(tmp_path: Path, toml: str, registry: str) -> None:
    (tmp_path / "jobd.toml").write_text(toml + "\n")
    with pytest.raises(config.ConfigError) as raised:
        config.load_dir(str(tmp_path))
    assert f"allowed keys: {', '.join(getattr(config, registry))}" in raised.value.message


# --- jobctl(1): every command and option, from the argparse parser ------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("jobctl has no subcommands")


def test_jobctl_commands_and_options_are_documented() -> None:
    page = parse("jobctl.1")
    parser = jobctl.build_parser()
    global_options = _options(parser)
    problems = missing(page.name, "OPTIONS", global_options, page.section("OPTIONS").names())
    titles = page.subsections("COMMANDS")
    for command, subparser in _subcommands(parser).items():
        # A subsection documents the commands its title names: "run, submit", "pause, resume", "ls".
        title = next((t for t in titles if command in re.split(r"[,\s]+", t)), None)
        if title is None:
            problems.append(f"{page.name} COMMANDS: no subsection for the command {command}")
            continue
        section = page.section("COMMANDS", title)
        own = [option for option in _options(subparser) if option not in global_options]
        problems += missing(page.name, f"COMMANDS / {title}", own, section.names())
        text = " ".join(section.source)
        for action in subparser._actions:
            if action.choices is None or isinstance(action.choices, dict):
                continue
            for choice in action.choices:
                if not re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", text):
                    problems.append(f"{page.name} COMMANDS / {title}: {command} value {choice}")
    report(problems)


# --- jobd-protocol(7): methods, error codes, evQueue commands and codes, HTTP routes ----------------------------


def _error_classes() -> list[type[JobdError]]:
    """Every JobdError subclass in jobd, wherever it is defined (the evQueue codec and login define their own)."""
    for module in pkgutil.walk_packages(jobd.__path__, "jobd."):
        importlib.import_module(module.name)
    found: list[type[JobdError]] = []
    pending: list[type[JobdError]] = [JobdError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_json_rpc_methods_are_documented() -> None:
    page = parse("jobd-protocol.7")
    report(missing(page.name, "JSON-RPC METHODS", sorted(api.METHODS), page.section("JSON-RPC METHODS").names()))


def test_error_codes_are_documented() -> None:
    page = parse("jobd-protocol.7")
    problems: list[str] = []
    # JSON-RPC: each code of jobd/errors.py on an item with its numeric code: "CODE (-32001)".
    items = page.section("ERROR CODES").items
    for cls in _error_classes():
        if cls.__module__ != "jobd.errors":
            continue
        if not any(cls.code in item and str(cls.rpc_code) in item for item in items):
            problems.append(f"{page.name} ERROR CODES: {cls.code} ({cls.rpc_code}) of {cls.__name__}")
    # evQueue: the error-code every error class is sent as.
    xml_codes = page.section("EVQUEUE PROTOCOL", "XML error codes").names()
    for cls in _error_classes():
        code = evqueue.evqueue_code(cls.__new__(cls))
        if code not in xml_codes:
            problems.append(f"{page.name} EVQUEUE PROTOCOL / XML error codes: {code} (of {cls.__name__})")
    report(problems)


def test_evqueue_commands_are_documented() -> None:
    page = parse("jobd-protocol.7")
    documented = {" ".join(item) for item in page.section("EVQUEUE PROTOCOL", "Commands").items}
    report(missing(page.name, "EVQUEUE PROTOCOL / Commands", sorted(evqueue.COMMANDS), documented))


def test_the_evqueue_guide_lists_every_command_jobd_serves_with_its_answer() -> None:
    """docs/evqueue-protocol.md's table "Commands jobd serves" has a row per command, each saying what it answers
    (`instance delete` had an empty answer cell, which left a client to find out that running instances are
    refused)."""
    guide = (MAN.parent / "docs" / "evqueue-protocol.md").read_text()
    table = re.search(r"^### Commands jobd serves\n(.*?)\n\n", guide, re.S | re.M)
    assert table is not None, "docs/evqueue-protocol.md has no table of the commands jobd serves"
    rows = re.findall(r'^\| `<([a-z_]+)(?: action="([a-z_]+)")?[^`]*` \|([^\n]*)$', table[1], re.M)
    listed = {f"{group} {action}" if action else group: cells for group, action, cells in rows}
    problems = [f"{command}: no row" for command in sorted(evqueue.COMMANDS) if command not in listed]
    problems += [f"{command}: not a command jobd serves" for command in listed if command not in evqueue.COMMANDS]
    problems += [
        f"{c}: nothing in its answer column"
        for c, cells in listed.items()
        if not re.split(r"(?<!\\)\|", cells)[-2].strip()
    ]
    assert not problems, "docs/evqueue-protocol.md, Commands jobd serves:\n  " + "\n  ".join(problems)


def test_every_evqueue_request_the_documentation_writes_is_a_command_jobd_serves() -> None:
    """docs/config.md wrote `<status type="configuration"/>`, which jobd (as evQueue) answers UNKNOWN_COMMAND: the
    command is `<status action="query" type="configuration"/>`. Each request written in backquotes in docs/*.md and
    README.md (an element named as a command's group, with an `action` or `type`) must name a command jobd serves;
    jobd-protocol(7) lists the commands as items, checked above."""
    groups = {command.split()[0] for command in evqueue.COMMANDS}
    texts = {path.name: path.read_text() for path in [*(MAN.parent / "docs").glob("*.md"), MAN.parent / "README.md"]}
    unknown, seen = [], 0
    for name, text in texts.items():
        for request, group in re.findall(r"`(<([a-z_]+)\b[^`>]*>)`", text):
            if group not in groups or not re.search(r"\b(action|type)=", request):
                continue  # an element of a document (<workflow>, <task>), not a request
            seen += 1
            action = re.search(r"action=[\"']([a-z_]+)", request)
            if (f"{group} {action[1]}" if action else group) not in evqueue.COMMANDS:
                unknown.append(f"{name}: {request}")
    assert seen > 10, "no evQueue request found in the documentation"
    assert unknown == []


def test_http_routes_are_documented() -> None:
    # The routes are registered in HttpApi.__init__, which needs a running engine; read them from its source.
    source = Path(importlib.import_module("jobd.http_api").__file__ or "").read_text()
    routes = [f"{method.upper()} {path}" for method, path in re.findall(r'add_(get|post)\("([^"]+)"', source)]
    assert routes, "no routes found in jobd/http_api.py"
    page = parse("jobd-protocol.7")
    report(missing(page.name, "HTTP", routes, page.section("HTTP").names()))


# --- jobd-workflow(5): the schema's elements and attributes, evQueue's XPath functions -------------------------


def test_workflow_format_is_documented() -> None:
    page = parse("jobd-workflow.5")
    elements = page.section("ELEMENTS").names()
    problems = missing(page.name, "ELEMENTS", workflowdef.SCHEMA, elements)
    for element, rule in workflowdef.SCHEMA.items():
        problems += missing(page.name, f"ELEMENTS <{element}>", rule.attributes, elements)
    functions = [*xpath.EVQ_FUNCTIONS, *xpath.COMPAT_FUNCTIONS]  # evQueue's current(), min(), max(), string-join()
    problems += missing(page.name, "XPATH", functions, page.section("XPATH").names())
    report(problems)


def test_the_workflow_guide_lists_the_format_jobd_accepts() -> None:
    """docs/workflows.md, as jobd-workflow(5) above: its format block names every element with every attribute the
    checker accepts (no more: the required ones without brackets), its `<task>` table every task attribute, and
    its XPath section every function beyond XPath 1.0 (evQueue's current(), min(), max() and string-join() were
    accepted but named nowhere)."""
    guide = (MAN.parent / "docs" / "workflows.md").read_text()
    block = re.search(r"^## The format\n.*?^```\n(.*?)^```", guide, re.S | re.M)
    table = re.search(r"^### `<task>` attributes\n(.*?)\n\n", guide, re.S | re.M)
    xpath_section = re.search(r"^### XPath\n(.*?)^## ", guide, re.S | re.M)
    assert block is not None and table is not None and xpath_section is not None, "docs/workflows.md changed shape"
    listed: dict[str, list[str]] = {}
    for element, words in re.findall(r"<([a-z-]+)((?:\s+\[?[a-z_-]+\]?)*)\s*/?>", block[1]):
        listed.setdefault(element, []).extend(words.split())
    problems = [f"format block: <{name}> is not listed" for name in workflowdef.SCHEMA if name not in listed]
    problems += [
        f"format block: <{name}> is not an element jobd accepts" for name in listed if name not in workflowdef.SCHEMA
    ]
    for name, rule in workflowdef.SCHEMA.items():
        written = {word.strip("[]"): word for word in listed.get(name, [])}
        problems += [f"format block: <{name} {a}> is not listed" for a in rule.attributes if a not in written]
        problems += [f"format block: <{name} {a}> is not accepted" for a in written if a not in rule.attributes]
        problems += [
            f"format block: <{name} {a}> is required: no brackets" for a in rule.required if written.get(a, a) != a
        ]
    rows = set(re.findall(r"`([a-z_-]+)`", " ".join(re.findall(r"^\| ([^|]+) \|", table[1], re.M))))
    problems += [f"<task> attributes table: {a}" for a in workflowdef.TASK_ATTRIBUTES if a not in rows]
    named = set(re.findall(r"`([A-Za-z-]+)[`(]", xpath_section[1]))
    problems += [f"XPath: {f}()" for f in [*xpath.EVQ_FUNCTIONS, *xpath.COMPAT_FUNCTIONS] if f not in named]
    assert not problems, "docs/workflows.md does not match the workflow checker:\n  " + "\n  ".join(problems)


# --- jobd(8): options, and the JOBD_* variables a real job and a real callback get --------------------------------


def test_jobd_options_are_documented(capsys: pytest.CaptureFixture[str]) -> None:
    # daemon.parse_args builds its parser and parses at once: read the options from its --help.
    with pytest.raises(SystemExit):
        daemon_module.parse_args(["--help"])
    usage = capsys.readouterr().out
    options = sorted(set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage)))
    assert "--config-dir" in options and "--check-config" in options
    page = parse("jobd.8")
    report(missing(page.name, "OPTIONS", options, page.section("OPTIONS").names()))


def test_jobd_exit_statuses_are_documented(tmp_path: Path) -> None:
    """jobd(8) listed 0, 1 and 78, not the 2 a bad option exits with. The statuses of a real jobd refusing its
    command line and a missing --config-dir, and those jobd.service does not restart, are items of EXIT STATUS."""
    jobd_command = [sys.executable, "-m", "jobd.daemon"]
    refusals = {
        "an unknown option": [*jobd_command, "--no-such-option"],
        "a bad value": [*jobd_command, "--log-level", "warn"],
        "a missing --config-dir": [*jobd_command, "--config-dir", str(tmp_path / "missing"), "--check-config"],
    }
    statuses: dict[str, int] = {}
    for what, argv in refusals.items():
        env = {**os.environ, "PYTHONPATH": str(MAN.parent)}
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False)
        assert done.returncode != 0 and done.stderr, (what, done)
        statuses[what] = done.returncode
    unit = re.search(r"^RestartPreventExitStatus=(.*)$", (MAN.parent / "systemd/jobd.service").read_text(), re.M)
    assert unit is not None, "jobd.service has no RestartPreventExitStatus="
    for status in unit[1].split():
        statuses[f"RestartPreventExitStatus= of jobd.service: {status}"] = int(status)
    page = parse("jobd.8")
    documented = page.section("EXIT STATUS").names()
    report(
        [
            f"{page.name} EXIT STATUS: {status} ({what})"
            for what, status in statuses.items()
            if str(status) not in documented
        ]
    )


def test_the_files_jobd_8_and_the_socket_unit_name_are_the_defaults() -> None:
    """jobd(8)'s FILES and the shipped jobd.socket write the default paths, mode and group of the configuration,
    the sockets and the state (DESIGN: /etc/jobd over /run/jobd over /usr/lib/jobd, /run/jobd/jobd.sock mode 0660
    group jobd, /var/lib/jobd): they must be the ones jobd uses when nothing is configured."""
    defaults = config.load([]).daemon
    *lower, highest = config.DEFAULT_SEARCH_PATH
    page = parse("jobd.8")
    files = page.section("FILES")
    names, text = files.names(), " ".join(files.source)
    wanted = [
        f"{highest}/jobd.toml",
        f"{highest}/{config.DROP_IN_DIR}/*.toml",
        f"{highest}/{config.WORKFLOWS_DIR}/*.xml",
        defaults.socket,
        str(defaults.evqueue_socket),
        f"{defaults.state_dir}/{daemon_module.DATABASE}",
        f"{defaults.tasks_directory}/",
    ]
    problems = missing(page.name, "FILES", wanted, names)
    problems += [f"{page.name} FILES: {directory} (lower priority)" for directory in lower if directory not in text]
    mode, group = f"{defaults.socket_mode:04o}", defaults.socket_group
    if f"mode {mode}, group .Li {group}" not in text:
        problems.append(f"{page.name} FILES: {defaults.socket}, mode {mode}, group {group}")
    unit = (MAN.parent / "systemd" / "jobd.socket").read_text()
    for setting in (f"ListenStream={defaults.socket}", f"SocketMode={mode}", f"SocketGroup={group}"):
        if not re.search(rf"^{re.escape(setting)}$", unit, re.M):
            problems.append(f"systemd/jobd.socket: {setting}")
    report(problems)


def test_the_clients_talk_to_the_socket_jobd_listens_on_by_default() -> None:
    """jobctl (jobd.client), its usage, and the PHP client take the API socket jobd binds when nothing is configured
    (a client left at its default must find a jobd left at its own), and jobctl's documents say so."""
    socket_path = config.load([]).daemon.socket
    php = (MAN.parent / "contrib" / "php-client" / "src" / "Client.php").read_text()
    declared = re.search(r"const DEFAULT_SOCKET = '([^']*)';", php)
    assert declared is not None, "contrib/php-client/src/Client.php declares no DEFAULT_SOCKET"
    usage = jobctl.build_parser().format_help()
    assert (client_module.DEFAULT_SOCKET, declared[1]) == (socket_path, socket_path)
    assert f"else {socket_path})" in " ".join(usage.split()), usage
    # And where a user reads it: jobctl(1)'s --socket and docs/jobctl.md's.
    option = " ".join(parse("jobctl.1").section("OPTIONS").source)
    assert f"if set, else .Pa {socket_path} ." in option
    guide = (MAN.parent / "docs" / "jobctl.md").read_text()
    assert f"Default: `$JOBD_SOCKET` if set, else `{socket_path}`." in guide


def _env_names(text: str) -> set[str]:
    return {line.split("=", 1)[0] for line in text.splitlines() if line.startswith("JOBD_")}


def _read_fifo(path: Path, into: list[str]) -> None:
    with open(path) as fifo:  # blocks until the callback opens it for writing; EOF when it is done
        into.append(fifo.read())


def test_job_environment_is_documented(daemon: Any, tmp_path: Path) -> None:
    """Run a job and an exec callback for real and check every JOBD_* variable they get is in jobd(8)."""
    fifo = tmp_path / "callback-env"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=_read_fifo, args=(fifo, received), daemon=True)
    reader.start()
    job = daemon.submit(
        command=["/usr/bin/env"],
        callbacks={"on_finish": [{"exec": ["/bin/sh", "-c", 'env > "$0"', str(fifo)]}]},
    )
    assert daemon.wait(job["id"])["state"] == "succeeded"
    job_names = _env_names(daemon.output(job["id"]))
    reader.join(timeout=60)
    assert received, "the exec callback did not run"
    # The callback's process has closed the FIFO, but jobd reaps it a moment later: the fixture's check for zombie
    # children could catch it in between. A stop waits for the delivery under way, so the exit code says it all.
    assert daemon.stop() == 0, daemon.log()
    callback_names = _env_names(received[0])
    assert {"JOBD_JOB_ID", "JOBD_QUEUE"} <= job_names & callback_names
    page = parse("jobd.8")
    documented = page.section("ENVIRONMENT").names()
    # The callback's variables are named in the prose of ENVIRONMENT rather than as items of their own.
    text = " ".join(page.section("ENVIRONMENT").source)
    problems = missing(page.name, "ENVIRONMENT (jobs)", sorted(job_names), documented)
    problems += [f"{page.name} ENVIRONMENT (callbacks): {name}" for name in sorted(callback_names) if name not in text]
    report(problems)


def test_event_types_are_documented() -> None:
    page = parse("jobd-protocol.7")
    text = " ".join(page.section("JSON-RPC METHODS").source)
    report(
        [
            f"{page.name} JSON-RPC METHODS / events.subscribe: {kind}"
            for kind in api.EVENT_TYPES
            if not re.search(rf"(?<![\w.]){re.escape(kind)}(?![\w.])", text)
        ]
    )


def test_no_documented_option_is_missing_from_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    """The other direction for options: each option jobctl(1) documents for a command is one that command (or one
    of the commands its subsection names) takes, and each of jobd(8)'s OPTIONS is in jobd's usage."""
    stale: list[str] = []
    page = parse("jobctl.1")
    parser = jobctl.build_parser()
    commands = _subcommands(parser)
    for word in sorted(page.section("OPTIONS").names()):
        if word.startswith("-") and word not in _options(parser):
            stale.append(f"{page.name} OPTIONS: {word} is not an option of jobctl")
    for title in page.subsections("COMMANDS"):
        taken = {option for name in re.split(r"[,\s]+", title) for option in _options(commands[name])}
        for word in sorted(page.section("COMMANDS", title).names()):
            if word.startswith("-") and word not in taken:
                stale.append(f"{page.name} COMMANDS / {title}: {word} is not an option of {title}")
    with pytest.raises(SystemExit):
        daemon_module.parse_args(["--help"])
    usage = capsys.readouterr().out
    for word in sorted(parse("jobd.8").section("OPTIONS").names()):
        if word.startswith("-") and not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", usage):
            stale.append(f"jobd.8 OPTIONS: {word} is not an option of jobd")
    assert not stale, "documented in the man pages but not in the code:\n  " + "\n  ".join(stale)


def test_no_documented_name_is_missing_from_the_code() -> None:
    """The other direction: a method, command or error code the pages list must exist (renamed or removed ones)."""
    stale: list[str] = []
    protocol = parse("jobd-protocol.7")
    for word in sorted(protocol.section("JSON-RPC METHODS").names()):
        if re.fullmatch(r"[a-z]+\.[a-z_]+", word) and word not in api.METHODS:
            stale.append(f"{protocol.name} JSON-RPC METHODS: {word} is not a method")
    for item in protocol.section("EVQUEUE PROTOCOL", "Commands").items:
        if " ".join(item) not in evqueue.COMMANDS:
            stale.append(f"{protocol.name} EVQUEUE PROTOCOL / Commands: {' '.join(item)} is not a command")
    classes = _error_classes()
    rpc_codes = {cls.code for cls in classes if cls.__module__ == "jobd.errors"}
    xml_codes = {evqueue.evqueue_code(cls.__new__(cls)) for cls in classes}
    for where, codes, section in (
        ("ERROR CODES", rpc_codes, protocol.section("ERROR CODES")),
        ("EVQUEUE PROTOCOL / XML error codes", xml_codes, protocol.section("EVQUEUE PROTOCOL", "XML error codes")),
    ):
        for word in sorted(section.names()):
            if re.fullmatch(r"[A-Z][A-Z_]+", word) and word not in codes:
                stale.append(f"{protocol.name} {where}: {word} is not an error code")
    page = parse("jobctl.1")
    commands = set(_subcommands(jobctl.build_parser()))
    for title in page.subsections("COMMANDS"):
        for word in re.split(r"[,\s]+", title):
            if word not in commands:
                stale.append(f"{page.name} COMMANDS: {word} is not a command")
    assert not stale, "documented in the man pages but not in the code:\n  " + "\n  ".join(stale)
