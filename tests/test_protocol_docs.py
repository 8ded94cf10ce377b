"""docs/protocol.md and jobd-protocol.7 read as a client developer reads them, checked against a real daemon.

Each method's entry names the parameters it takes: they must be the ones the daemon takes (as an unknown parameter's
refusal lists them in `data.allowed`), in both directions. A reply shape the documentation writes (`→ {"jobs",
"next_before"}`) and the example objects (a job, an attempt, a schedule, ...) must have the members the daemon
sends, no more and no fewer, and the values they write the JSON types and time format jobd sends (a client copies
them: `3600.0` and `3600` parse to different types in Python and PHP). The error table of docs/protocol.md lists
the codes of jobd/errors.py a JSON-RPC client can get, each with its JSON-RPC number, and docs/http.md the HTTP
status each is answered with. And the error example shown is the reply jobd sends.

tests/test_manpages.py checks that every method and error code is an item of the man page; this file checks what
the entries say.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_manpages import _error_classes

from jobd import http_api
from jobd.client import Client, RemoteError
from jobd.model import JobState, Outcome

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = (ROOT / "docs" / "protocol.md").read_text()
HTTP_MD = (ROOT / "docs" / "http.md").read_text()
MAN_PAGE = (ROOT / "man" / "jobd-protocol.7").read_text()

# Error codes only evQueue's XML protocol sends: no JSON-RPC method raises them (docs/evqueue-protocol.md has them).
EVQUEUE_ONLY_CODES = {"TIMED_OUT", "INVALID_XML", "UNKNOWN_COMMAND"}

WORKFLOW = """<workflow>
  <parameters><parameter name="who"/></parameters>
  <subjobs><job><tasks><task name="t" path="/bin/true" queue="default"/></tasks></job></subjobs>
</workflow>"""


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    """Queues `default` and `photo`, as docs/protocol.md's error example has them; a task, a workflow, a schedule."""
    d = make_daemon(start=False)
    d.write_config(
        """
        [queue.default]
        concurrency = 2

        [queue.photo]
        concurrency = 1

        [task.echo]
        command = ["/bin/echo"]

        [schedule.nightly]
        task = "echo"
        calendar = "0 3 * * *"
        """
    )
    d.write_workflows(greet=WORKFLOW)
    d.start()
    return d


# -- reading the documents ---------------------------------------------------------------------------------------


def _man_text(source: str) -> str:
    """The man page's source with the escapes of its JSON undone, so that it reads as docs/protocol.md does."""
    for escape, plain in (("\\(dq", '"'), ("\\(->", "→"), ("\\&", ""), ("\\-", "-")):
        source = source.replace(escape, plain)
    return source


def md_entry(method: str) -> str:
    """The entry of `method` in docs/protocol.md: its `### ` section, or its `- ` item in a list of methods."""
    lines = PROTOCOL_MD.splitlines()
    entry: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("#"):
            inside = bool(re.search(rf"`{re.escape(method)}`", line))
            continue
        if line.startswith("- "):
            if inside and entry and entry[0].startswith("- "):
                inside = False  # the next item of a list of methods
            if line.startswith(f"- `{method}`"):
                inside = True
        if inside:
            entry.append(line)
    return "\n".join(entry)


def man_entry(method: str) -> str:
    """The `.It Ic` item of `method` in jobd-protocol.7 (an item may name several: `queue.pause , queue.resume`)."""
    entry: list[str] = []
    inside = False
    for line in MAN_PAGE.splitlines():
        if line.startswith((".It Ic ", ".Sh ", ".Ss ")):
            inside = line.startswith(".It Ic ") and method in line[len(".It Ic ") :].replace(",", " ").split()
        if inside:
            entry.append(line)
    return _man_text("\n".join(entry))


def top_level_keys(text: str, start: int) -> tuple[set[str], int]:
    """The member names of the JSON-like object written at text[start] (`{"id": 42, ...}` or `{"id", "workflow"}`):
    the strings in the place of a key (after `{` or `,`) at its top level. Also where the object ends."""
    assert text[start] == "{", text[start : start + 40]
    keys: set[str] = set()
    open_brackets: list[str] = []
    previous = ""  # the last character seen outside strings, blanks and backticks
    index = start
    while index < len(text):
        char = text[index]
        if char == '"':
            end = text.index('"', index + 1)
            if open_brackets == ["{"] and previous in "{,":
                keys.add(text[index + 1 : end])
            previous, index = '"', end + 1
            continue
        if char in "{[":
            open_brackets.append(char)
        elif char in "}]":
            open_brackets.pop()
            if not open_brackets:
                return keys, index + 1
        if not char.isspace() and char != "`":
            previous = char
        index += 1
    raise AssertionError(f"an object without its end: {text[start : start + 80]}")


def params_written(entry: str) -> set[str]:
    """The parameters an entry names: the members of the object it opens with, before its `→`, and the names of a
    parameter table (`| `task` | string | ...`,
    docs/protocol.md) or list (`.It Li task`, the man page)."""
    head = entry.partition("→")[0]
    names: set[str] = set()
    opening = "\n".join(head.splitlines()[:2])  # the object comes first: right after the name, or on the next line
    brace = opening.find("{")
    if brace >= 0:
        names |= top_level_keys(head, brace)[0]
    names |= set(re.findall(r"^\| `(\w+)` \|", head, re.MULTILINE))
    for tag in re.findall(r"^\.It Li (.+)$", head, re.MULTILINE):
        names |= {word for word in tag.replace(",", " ").split() if re.fullmatch(r"\w+", word)}
    return names


def reply_written(entry: str) -> tuple[set[str], set[str] | None] | None:
    """The members of the reply an entry writes right after its `→` (`→ {"jobs": [...], "next_before": ...}`),
    and those of the object its list holds when it writes one (`{"queues": [{"name", ...}]}`); or None when it
    says the reply in words (`→ the job`)."""
    arrow = entry.find("→")
    if arrow < 0:
        return None
    found = re.compile(r"[\s`]*(?:\.Li\s+)?\{").match(entry, arrow + 1)
    if found is None:
        return None
    keys, end = top_level_keys(entry, found.end() - 1)
    listed = entry.find("[{", found.end(), end)
    return keys, None if listed < 0 else top_level_keys(entry, listed + 1)[0]


def example_keys(text: str, opening: str) -> set[str]:
    """The members of the example object of `text` that begins with `opening`."""
    start = text.find(opening)
    assert start >= 0, f"docs/protocol.md no longer has the example {opening!r}"
    return top_level_keys(text, start)[0]


def man_members(opening: str) -> set[str]:
    """The members jobd-protocol.7 lists for an object, from the line `opening` (`An instance has`) to the end of its
    sentence: the `.Li NAME` words, but those in parentheses (the values of a member, as a state's)."""
    lines = MAN_PAGE.splitlines()
    start = lines.index(opening)
    members: set[str] = set()
    depth = 0
    for line in lines[start + 1 :]:
        words = line.split()
        if depth == 0 and len(words) >= 2 and words[0] == ".Li" and re.fullmatch(r"[a-z_]+", words[1]):
            members.add(words[1])
        plain = _man_text(line)
        depth += plain.count("(") - plain.count(")")
        if depth == 0 and (line.endswith(".") or line.startswith((".Sh", ".Ss", ".Bl"))):
            return members
    raise AssertionError(f"jobd-protocol.7: no end to the members after {opening!r}")


# -- asking the daemon -------------------------------------------------------------------------------------------


def methods_of(client: Client) -> list[str]:
    with pytest.raises(RemoteError) as refused:
        client.call("no.such_method")
    methods: list[str] = refused.value.data["allowed"]
    return methods


def params_taken(client: Client, method: str) -> set[str]:
    """The parameters `method` takes, as the daemon lists them refusing an unknown one. A required parameter the
    refusal of its absence names is given first (an id of 1, a name of `x`), and a workflow that exists."""
    params: dict[str, Any] = {"zz_not_a_parameter": 1}
    for _ in range(5):
        with pytest.raises(RemoteError) as refused:
            client.call(method, params)
        error = refused.value
        missing = re.search(r"missing parameter '(\w+)' \((an integer|a string)\)", error.message)
        if missing:
            params[missing[1]] = 1 if missing[2] == "an integer" else "x"
        elif error.code == "UNKNOWN_WORKFLOW":
            params["name"] = error.data["allowed"][0]
        else:
            assert error.code == "INVALID_PARAMS" and error.data["param"] == "zz_not_a_parameter", error
            return set(error.data["allowed"])
    raise AssertionError(f"{method}: no refusal of the unknown parameter, params {params}")


# Requests that get a reply whose shape docs/protocol.md writes; a method whose entry writes one must be here.
REPLY_CALLS: dict[str, dict[str, Any]] = {
    "ping": {},
    "job.list": {},
    "job.output": {"id": 1},
    "queue.list": {},
    "task.list": {},
    "daemon.status": {},
    "daemon.reload": {},
    "daemon.backup": {},
    "events.subscribe": {},
    "workflow.list": {},
    "instance.list": {},
    "schedule.list": {},
    "schedule.trigger": {"name": "nightly"},
    "audit.list": {},
}

# The replies one document says in words, not as an object of members (the other writes its members).
REPLY_IN_WORDS = {("jobd-protocol.7", "daemon.status")}


# -- the tests ---------------------------------------------------------------------------------------------------


def test_every_method_has_an_entry_in_both_documents(daemon: Any) -> None:
    with daemon.client() as client:
        methods = methods_of(client)
    missing = [f"docs/protocol.md: {m}" for m in methods if not md_entry(m)]
    missing += [f"jobd-protocol.7: {m}" for m in methods if not man_entry(m)]
    assert not missing, "methods without an entry:\n  " + "\n  ".join(missing)


def test_each_method_documents_the_parameters_it_takes_and_no_other(daemon: Any) -> None:
    problems: list[str] = []
    with daemon.client() as client:
        for method in methods_of(client):
            taken = params_taken(client, method)
            for where, entry in (("docs/protocol.md", md_entry(method)), ("jobd-protocol.7", man_entry(method))):
                written = params_written(entry)
                problems += [f"{where} {method}: takes {name}, not documented" for name in sorted(taken - written)]
                problems += [f"{where} {method}: documents {name}, not taken" for name in sorted(written - taken)]
    assert not problems, "\n  ".join(["", *problems])


def test_each_reply_the_documents_write_has_the_members_sent(daemon: Any) -> None:
    problems: list[str] = []
    compared: set[tuple[str, str]] = set()
    daemon.wait(daemon.submit(task="echo")["id"])
    with daemon.client() as client:
        for method in methods_of(client):
            for where, entry in (("docs/protocol.md", md_entry(method)), ("jobd-protocol.7", man_entry(method))):
                written = reply_written(entry)
                if written is None:
                    continue
                assert method in REPLY_CALLS, f"{where} writes the reply of {method}: add a call to REPLY_CALLS"
                compared.add((where, method))
                reply = client.call(method, REPLY_CALLS[method])
                members, member_of_list = written
                if members != set(reply):
                    problems.append(f"{where} {method}: writes {sorted(members)}, sent {sorted(reply)}")
                if member_of_list is not None:
                    [listed] = [value for value in reply.values() if isinstance(value, list)]
                    if member_of_list != set(listed[0]):
                        problems.append(f"{where} {method}: writes {sorted(member_of_list)}, sent {sorted(listed[0])}")
    # Each reply REPLY_CALLS makes was compared with what both documents write of it: a document that no longer
    # writes one, or a reading of the documents that finds none, is not a pass.
    not_compared = {(where, method) for where in ("docs/protocol.md", "jobd-protocol.7") for method in REPLY_CALLS}
    not_compared -= compared | REPLY_IN_WORDS
    problems += [
        f"{where} {method}: its reply is not written (or not found) to compare"
        for where, method in sorted(not_compared)
    ]
    assert not problems, "\n  ".join(["", *problems])


def test_the_example_objects_have_the_members_sent(daemon: Any) -> None:
    job_id = daemon.submit(task="echo")["id"]
    daemon.wait(job_id)
    job = daemon.call("job.get", {"id": job_id})
    attempt = job.pop("tries")[0]
    instance = daemon.call("instance.launch", {"workflow": "greet", "parameters": {"who": "x"}})
    [schedule] = daemon.call("schedule.list")["schedules"]
    [entry] = daemon.call("audit.list", {"limit": 1})["entries"]
    problems: list[str] = []
    for what, opening, man_opening, sent in (
        ("job", '{"id": 42, "task": "resize"', "is an object with", job),
        ("attempt", '{"job_id": 42, "number": 1', "has", attempt),
        ("instance", '{"id", "workflow", "status"', "An instance has", instance),
        ("schedule", '{"name": "nightly", "target"', "A schedule object has", schedule),
        ("audit entry", '{"id": 17, "at"', None, entry),
    ):
        written = example_keys(PROTOCOL_MD, opening)
        if written != set(sent):
            problems.append(f"docs/protocol.md {what}: writes {sorted(written)}, sent {sorted(sent)}")
        listed = None if man_opening is None else man_members(man_opening)
        if listed is not None and listed != set(sent):
            problems.append(f"jobd-protocol.7 {what}: lists {sorted(listed)}, sent {sorted(sent)}")
    assert not problems, "\n  ".join(["", *problems])


def test_the_error_table_lists_the_codes_a_client_can_get_with_their_numbers() -> None:
    table = {code: int(number) for code, number in re.findall(r"^\| `([A-Z_]+)` \| (-\d+) \|", PROTOCOL_MD, re.M)}
    codes = {
        cls.code: cls.rpc_code
        for cls in _error_classes()
        if cls.__module__ == "jobd.errors" and cls.code not in EVQUEUE_ONLY_CODES
    }
    problems = [f"{code} ({number}) is not in the table" for code, number in codes.items() if code not in table]
    problems += [
        f"{code}: the table says {table[code]}, jobd sends {number}"
        for code, number in codes.items()
        if code in table and table[code] != number
    ]
    problems += [f"{code} is no error code a JSON-RPC client gets" for code in table if code not in codes]
    assert not problems, "\n  ".join(["", *problems])


def test_the_http_status_of_each_error_is_the_one_http_md_gives() -> None:
    """docs/http.md's table of `POST /api/<method>` errors: the codes its rows name get that status, any other 409."""
    rows = re.findall(r"^\| (\d{3}) \| (.+) \|$", HTTP_MD.partition("## JSON endpoints")[2], re.MULTILINE)
    documented = {
        code: int(status) for status, text in rows if status != "409" for code in re.findall(r"`([A-Z_]+)`", text)
    }
    problems = []
    for cls in _error_classes():
        if cls.__module__ != "jobd.errors" or cls.code in EVQUEUE_ONLY_CODES:
            continue
        sent = http_api._failure(cls("a message")).status
        if sent != documented.get(cls.code, 409):
            problems.append(f"{cls.code}: docs/http.md says {documented.get(cls.code, 409)}, jobd answers {sent}")
    assert not problems, "\n  ".join(["", *problems])


def test_the_error_example_is_the_reply_jobd_sends(daemon: Any) -> None:
    shown = PROTOCOL_MD.partition("## Errors")[2].partition("```json\n")[2].partition("```")[0]
    expected = json.loads(shown)
    with daemon.client() as client, pytest.raises(RemoteError) as refused:
        client.call("job.submit", {"task": "echo", "queue": expected["error"]["data"]["queue"]})
    error = refused.value
    assert error.rpc_code == expected["error"]["code"]
    assert error.message == expected["error"]["message"]
    assert {"code": error.code, **error.data} == expected["error"]["data"]


# -- the types of the examples' values ----------------------------------------------------------------------------

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


def example_value(opening: str) -> Any:
    """The JSON example of docs/protocol.md that begins with `opening`, read as a client would copy it."""
    start = PROTOCOL_MD.find(opening)
    assert start >= 0, f"docs/protocol.md no longer has the example {opening!r}"
    return json.JSONDecoder().raw_decode(PROTOCOL_MD, start)[0]


def _json_type(value: Any) -> str:
    if value is None or isinstance(value, bool | str | list | dict):
        return {type(None): "null", bool: "boolean", str: "string", list: "array", dict: "object"}[type(value)]
    return "integer" if isinstance(value, int) else "number (with a fraction)"


def type_differences(where: str, written: Any, sent: Any) -> tuple[list[str], set[str]]:
    """Where the values the example writes and those jobd sent differ in JSON type (an integer and a number written
    with a fraction count apart: `3600` and `3600.0` parse to different types in Python and PHP), or a time in
    format (`"..."` stands for any value); members null on either side are not compared. Also the members compared,
    by path."""
    problems: list[str] = []
    compared: set[str] = set()
    for name, value in written.items():
        if name not in sent or value is None or sent[name] is None:
            continue
        path = f"{where}.{name}"
        compared.add(path)
        if _json_type(value) != _json_type(sent[name]):
            problems.append(f"{path}: written {value!r} ({_json_type(value)}), sent {sent[name]!r}")
        elif isinstance(value, dict):
            deeper, more = type_differences(path, value, sent[name])
            problems += deeper
            compared |= more
        elif (
            isinstance(value, str)
            and value != "..."
            and bool(TIME.fullmatch(value)) != bool(TIME.fullmatch(sent[name]))
        ):
            problems.append(f"{path}: written {value!r}, sent {sent[name]!r}: one is a time as jobd writes them")
    return problems, compared


TYPED_CONFIG = """
[queue.default]
concurrency = 2

[queue.photo]
concurrency = 1

[task.resize]
command = ["/bin/sh", "-c", "echo %40 >&3; echo resized >&3; exit 75"]
queue = "photo"
timeout = 3600
retry = { times = 1, delay = 0.01, backoff = 2.0, on_exit_codes = [75] }

[schedule.nightly]
workflow = "greet"
parameters = { who = "today" }
calendar = "0 3 * * *"
"""


def named(name: str, listed: list[dict[str, Any]]) -> dict[str, Any]:
    [item] = [item for item in listed if item["name"] == name]
    return item


def test_the_examples_values_have_the_types_and_formats_sent(make_daemon: Any) -> None:
    """A client copies the examples: each value the docs write (not null) has the JSON type jobd sends, an integer
    where jobd sends one and a number with a fraction where it sends that, and each time the format jobd sends.
    The objects are made so that every member the example writes non-null is non-null in jobd's reply too."""
    daemon = make_daemon(start=False)
    daemon.write_config(TYPED_CONFIG)
    daemon.write_workflows(greet=WORKFLOW)
    daemon.start()
    with daemon.client() as client:
        client.call("events.subscribe", {"types": ["job.progress", "job.log"]})
        job_id = daemon.submit(task="resize", context="user-17")["id"]
        progress = client.next_event(timeout=30)
        log_line = client.next_event(timeout=30)
    job = daemon.wait(job_id)
    attempt = daemon.call("job.get", {"id": job_id})["tries"][0]
    schedule_run = daemon.call("schedule.trigger", {"name": "nightly"})["run_id"]
    daemon.call("instance.wait", {"id": schedule_run, "timeout": 30})
    [schedule] = daemon.call("schedule.list")["schedules"]
    [entry] = daemon.call("audit.list", {"limit": 1})["entries"]
    sent: list[tuple[str, str, Any]] = [
        ("job", '{"id": 42, "task": "resize"', job),
        ("attempt", '{"job_id": 42, "number": 1', attempt),
        ("schedule", '{"name": "nightly", "target"', schedule),
        ("audit entry", '{"id": 17, "at"', entry),
        ("job.progress event", '{"subscription":1,"type":"job.progress"', progress),
        ("job.log event", '{"subscription":1,"type":"job.log"', log_line),
        ("job.output", '{"data": "...", "offset": 0', daemon.call("job.output", {"id": job_id})),
        ("queue.list's queue", '{"name": "photo", "concurrency"', named("photo", daemon.call("queue.list")["queues"])),
        ("task.list's task", '{"name": "resize", "queue"', named("resize", daemon.call("task.list")["tasks"])),
        ("daemon.backup", '{"path": "/var/lib/jobd/backup', daemon.call("daemon.backup")),
        ("ping", '{"pong": true', daemon.call("ping")),
    ]
    problems: list[str] = []
    for what, opening, reply in sent:
        written = example_value(opening)
        found, compared = type_differences(what, written, reply)
        problems += found
        not_compared = {f"{what}.{name}" for name, value in written.items() if value is not None} - compared
        problems += [f"{path}: written, but null or absent in what jobd sent" for path in sorted(not_compared)]
    assert not problems, "\n  ".join(["", *problems])


def _listed(text: str) -> set[str]:
    """The names a list writes: `word` in Markdown, `.Li word` (or `Li word` after `.Pf (`) in mdoc; what a
    parenthesis says about one of them (`lost` (… its `error` says so)) is not one."""
    text = re.sub(r"\([^()]*\)", "", text)
    return {a or b for a, b in re.findall(r"`([a-z_]+)`|\bLi ([a-z_]+)", text)}


def test_the_states_and_outcomes_listed_are_the_models() -> None:
    """A job's states and an attempt's outcomes (DESIGN §2.3) are listed where a client looks (docs/protocol.md,
    docs/jobs.md, jobd-protocol.7): each list must hold the model's values, no more, no fewer, so that a state or
    an outcome added (a `reserved` state is planned) or renamed leaves no list behind."""
    states, outcomes = {s.value for s in JobState}, {o.value for o in Outcome}
    jobs_md = (ROOT / "docs" / "jobs.md").read_text()
    lists = [  # where, what it lists, and how the list is found in the text
        ("docs/protocol.md, state", states, r"^`state` is one of (.*?)\. ", PROTOCOL_MD),
        ("docs/protocol.md, outcome", outcomes, r"^`outcome` is (.*?), or null while", PROTOCOL_MD),
        ("docs/jobs.md, attempts", outcomes, r"attempt\*\* with its own outcome: (.*?)\n- ", jobs_md),
        ("jobd-protocol.7, state", states, r"^\.Li state\nis one of\n(.*?) \.$", MAN_PAGE),
        ("jobd-protocol.7, outcome", outcomes, r"^\.Li outcome\n\.Pf \( (.*?)\nor null while", MAN_PAGE),
    ]
    found = {where: (model, re.search(pattern, text, re.S | re.M)) for where, model, pattern, text in lists}
    problems = []
    for where, (model, match) in found.items():
        assert match is not None, f"{where}: the list is not where it was: update this test"
        names = _listed(match[1])
        problems += [f"{where}: {value} is not listed" for value in sorted(model - names)]
        problems += [f"{where}: {name} is not one" for name in sorted(names - model)]
    # docs/jobs.md's diagram: its first line is the way a job goes, and ends in the final states.
    diagram = re.search(r"^## States\n\n```\n(.*)$", jobs_md, re.M)
    assert diagram is not None, "docs/jobs.md: the diagram of the states is not where it was: update this test"
    drawn = set(re.findall(r"[a-z_]+", diagram[1]))
    problems += [f"docs/jobs.md, States: {value} is not drawn" for value in sorted(states - drawn)]
    problems += [f"docs/jobs.md, States: {name} is not one" for name in sorted(drawn - states)]
    assert problems == []
