"""Workflow definitions (jobd.workflowdef) and the workflows/ part of the configuration, against real files.

The corpus in tests/workflows/ holds valid workflows using every construct, with corpus.toml naming the queues,
TOML tasks and retry schedules they use and tasks/ the helper programs of their relative paths. Invalid documents
are written per test; every error must name file, line, element, attribute and what is allowed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon
from lxml import etree
from recovery.support import pump_of

from jobd import conffile, config, workflowdef
from jobd.client import RemoteError
from jobd.errors import ConfigError
from jobd.model import Config
from jobd.workflowdef import parse_workflow, split_command

CORPUS = Path(__file__).resolve().parent / "workflows"
CORPUS_FILES = sorted(CORPUS.glob("*.xml"))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def corpus_dir(directory: Path) -> Path:
    """A config directory running the corpus: corpus.toml as jobd.toml, the XML files in workflows/."""
    tasks = CORPUS / "tasks"
    text = f'[daemon]\ntasks_directory = "{tasks}"\n\n' + (CORPUS / "corpus.toml").read_text()
    write(directory / "jobd.toml", text)
    for path in CORPUS_FILES:
        write(directory / "workflows" / path.name, path.read_bytes())
    return directory


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return config.load([str(corpus_dir(tmp_path_factory.mktemp("corpus")))])


def problems(path: Path, cfg: Config) -> list[str]:
    """The lines of the error that loading `path` gives."""
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, cfg)
    assert info.value.details["file"] == str(path)
    return info.value.message.split("\n")


def problems_at(path: Path, cfg: Config, expected: list[tuple[int, str]]) -> list[str]:
    """The lines of the error loading `path` gives, checked to be one per (line number, start of message)."""
    lines = problems(path, cfg)
    assert len(lines) == len(expected), lines
    for line, (number, fragment) in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}:{number}: {fragment}"), line
    return lines


# --- the corpus -----------------------------------------------------------------------------------------------


def test_the_corpus_loads_whole(corpus_config: Config) -> None:
    assert set(corpus_config.workflows) == {path.stem for path in CORPUS_FILES}
    assert {"trivial", "loopdemo"} <= set(corpus_config.workflows)
    assert corpus_config.daemon.tasks_directory == str(CORPUS / "tasks")
    for path in CORPUS_FILES:
        workflow = corpus_config.workflows[path.stem]
        assert workflow.name == path.stem
        assert workflow.source == path.read_bytes()  # verbatim: each instance is built from a fresh parse
        assert workflow.path.endswith(f"/workflows/{path.name}")
        assert workflow.path in corpus_config.files
    # The workflow files come after the TOML files in Config.files, in name order.
    assert corpus_config.files[0].endswith("jobd.toml")
    assert list(corpus_config.files[1:]) == sorted(corpus_config.files[1:])


def test_declared_parameters_in_document_order(corpus_config: Config) -> None:
    workflows = corpus_config.workflows
    assert workflows["trivial"].parameters == ()
    assert workflows["loopdemo"].parameters == ("count",)
    assert workflows["parameters"].parameters == ("greeting", "who", "verbose")
    assert workflows["nested"].parameters == ("count", "skip")


def test_the_corpus_helpers_are_executable() -> None:
    for name in ("list.sh", "show.sh", "fail.sh"):
        assert os.access(CORPUS / "tasks" / name, os.X_OK), name


def test_corpus_commands_split(corpus_config: Config) -> None:
    assert split_command("/bin/echo hello world") == ("/bin/echo", "hello", "world")
    # every_attribute.xml's path, as the XML parser hands it over (&quot; already decoded)
    assert split_command("/bin/sh -c 'echo \"$0: $*\"' 'the program'") == (
        "/bin/sh",
        "-c",
        'echo "$0: $*"',
        "the program",
    )


# --- split_command ----------------------------------------------------------------------------------------------

SPLITS = {
    "plain words": ("/bin/echo a  b\tc", ("/bin/echo", "a", "b", "c")),
    "relative program": ("list.sh 3", ("list.sh", "3")),
    "single quotes keep everything": ("echo 'a b' '$HOME' '`x`' '|;&'", ("echo", "a b", "$HOME", "`x`", "|;&")),
    "double quotes": (
        'echo "a b" "it\'s" "say \\"hi\\"" "back\\\\slash"',
        ("echo", "a b", "it's", 'say "hi"', "back\\slash"),
    ),
    "backslash in double quotes before another char stays": ('echo "a\\nb"', ("echo", "a\\nb")),
    "escaped dollar": ('echo \\$HOME "\\$HOME"', ("echo", "$HOME", "$HOME")),
    "backslash outside quotes": ("echo a\\ b \\'", ("echo", "a b", "'")),
    "adjacent quoted parts make one word": ("echo a'b c'\"d\"e", ("echo", "ab cde")),
    "empty quoted argument": ("echo '' \"\"", ("echo", "", "")),
    "globs, tilde, braces and hash stay literal": ("ls *.log ~/x {a,b} #c", ("ls", "*.log", "~/x", "{a,b}", "#c")),
    "surrounding blanks": ("  /bin/true  ", ("/bin/true",)),
    "newlines separate words": ("/bin/echo a\nb", ("/bin/echo", "a", "b")),
}


@pytest.mark.parametrize("text, argv", SPLITS.values(), ids=SPLITS.keys())
def test_split_command(text: str, argv: tuple[str, ...]) -> None:
    assert split_command(text) == argv


BAD_SPLITS = {
    "empty": ("", "empty command"),
    "blank": ("   ", "empty command"),
    "empty program": ("'' a", "the program (first word) is an empty string"),
    "unclosed single quote": ("echo 'abc", "unclosed single quote (') opened at column 6"),
    "unclosed double quote": ('echo a "b c', 'unclosed double quote (") opened at column 8'),
    "trailing backslash": ("echo a\\", "a backslash at the end (column 7) escapes nothing"),
    "variable": ("echo $HOME", "'$' at column 6 would be expanded by a shell"),
    "command substitution": ("echo $(id)", "jobd expands nothing"),
    "variable in double quotes": ('echo "$HOME"', "'$' at column 7 would be expanded"),
    "backquote": ("echo `id`", "'`' at column 6 would be expanded"),
    "pipe": ("ls | wc", "unquoted '|' at column 4: the command is not run by a shell"),
    "redirection": ("echo a > /tmp/x", "unquoted '>' at column 8"),
    "command list": ("true; false", "unquoted ';' at column 5"),
    "background": ("sleep 1 &", "unquoted '&' at column 9"),
    "subshell": ("(true)", "unquoted '(' at column 1"),
}


@pytest.mark.parametrize("text, message", BAD_SPLITS.values(), ids=BAD_SPLITS.keys())
def test_split_command_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        split_command(text)
    assert message in str(info.value)


# --- validation errors ------------------------------------------------------------------------------------------


def job(task: str, *, inner: str = "") -> str:
    """A workflow whose one job has the task element `task` (which starts on line 5)."""
    return f"<workflow>\n<subjobs>\n<job>\n<tasks>\n{task}\n</tasks>{inner}\n</job>\n</subjobs>\n</workflow>\n"


# Each case: the document, then (line, fragments) for each problem the file must report, in order.
INVALID: dict[str, tuple[str, list[tuple[int, list[str]]]]] = {
    "root element": ("<flow/>", [(1, ["<flow>: the root element must be <workflow>"])]),
    "root element in a namespace": (
        '<workflow xmlns="urn:x"/>',
        [
            (
                1,
                [
                    "<workflow>: the root element must be <workflow>, in no namespace "
                    "(this one is in urn:x: drop its xmlns)"
                ],
            )
        ],
    ),
    "unknown workflow attribute": (
        '<workflow name="x">\n<subjobs><job><tasks><task path="/bin/true" queue="default"/></tasks></job></subjobs>'
        "</workflow>",
        [(1, ['<workflow> attribute name="x": unknown attribute; allowed: version'])],
    ),
    "missing subjobs": (
        "<workflow>\n<parameters/>\n</workflow>",
        [(1, ["<workflow>: missing required element <subjobs>"])],
    ),
    "empty subjobs": ("<workflow>\n<subjobs/>\n</workflow>", [(2, ["<subjobs>: missing required element <job>"])]),
    "out of order": (
        '<workflow>\n<subjobs><job><tasks><task path="/bin/true" queue="default"/></tasks></job></subjobs>\n'
        "<parameters/>\n</workflow>",
        [
            (
                3,
                [
                    "<parameters>: out of order in <workflow>; the order is <parameters>, <custom-attributes>, "
                    "<automatic-tags>, <subjobs>"
                ],
            )
        ],
    ),
    "twice": (
        '<workflow>\n<parameters/>\n<parameters/>\n<subjobs><job><tasks><task path="/bin/true" queue="default"/>'
        "</tasks></job></subjobs>\n</workflow>",
        [(3, ["<parameters>: at most 1 <parameters> allowed in <workflow>"])],
    ),
    "unknown element with a hint": (
        '<workflow>\n<subjob><job/></subjob>\n<subjobs><job><tasks><task path="/bin/true" queue="default"/></tasks>'
        "</job></subjobs>\n</workflow>",
        [
            (
                2,
                [
                    "<subjob>: unknown element in <workflow> (did you mean <subjobs>?); allowed here: <parameters>, "
                    "<custom-attributes>, <automatic-tags>, <subjobs>"
                ],
            )
        ],
    ),
    "job without tasks": (
        "<workflow>\n<subjobs>\n<job name='j'/>\n</subjobs>\n</workflow>",
        [(3, ["<job>: missing required element <tasks>"])],
    ),
    "tasks without a task": (
        "<workflow>\n<subjobs>\n<job>\n<tasks/>\n</job>\n</subjobs>\n</workflow>",
        [(4, ["<tasks>: missing required element <task>"])],
    ),
    "text where only elements go": (
        '<workflow>\n<subjobs>\n<job>oops<tasks><task path="/bin/true" queue="default"/></tasks></job>\n</subjobs>\n'
        "</workflow>",
        [(3, ['<job>: text "oops" is not allowed here; allowed inside: <tasks>, <subjobs>'])],
    ),
    "text in an empty element": (
        '<workflow>\n<parameters>\n<parameter name="p">default</parameter>\n</parameters>\n<subjobs><job><tasks>'
        '<task path="/bin/true" queue="default"/></tasks></job></subjobs>\n</workflow>',
        [(3, ['<parameter>: text "default" is not allowed here; allowed inside: nothing'])],
    ),
    "namespaced element": (
        '<workflow xmlns:x="urn:x">\n<subjobs><job><tasks><task path="/bin/true" queue="default"/></tasks></job>'
        "<x:job/></subjobs>\n</workflow>",
        [(2, ["<x:job>: unknown element in <subjobs>"])],
    ),
    "parameter without name": (
        "<workflow>\n<parameters>\n<parameter/>\n<parameter name=''/>\n<parameter name='a'/>\n<parameter name='a'/>"
        '\n</parameters>\n<subjobs><job><tasks><task path="/bin/true" queue="default"/></tasks></job></subjobs>\n'
        "</workflow>",
        [
            (3, ["<parameter>: missing required attribute name"]),
            (4, ['<parameter> attribute name="": a parameter needs a non-empty name']),
            (6, ['<parameter> attribute name="a": declared twice; parameter names must be unique']),
        ],
    ),
    "custom attribute and automatic tag": (
        "<workflow>\n<custom-attributes>\n<custom-attribute name='n' selct='x'/>\n</custom-attributes>\n"
        "<automatic-tags>\n<automatic-tag name='' condition='true()' colour='red'/>\n</automatic-tags>\n"
        '<subjobs><job><tasks><task path="/bin/true" queue="default"/></tasks></job></subjobs>\n</workflow>',
        [
            (
                3,
                [
                    '<custom-attribute> attribute selct="x": unknown attribute (did you mean select?); allowed: name, '
                    "select, description"
                ],
            ),
            (3, ["<custom-attribute>: missing required attribute select"]),
            (6, ['<automatic-tag> attribute colour="red": unknown attribute; allowed: name, condition, description']),
            (6, ['<automatic-tag> attribute name="": a non-empty name is required']),
        ],
    ),
    "unknown job attribute": (
        job('<task path="/bin/true" queue="default"/>').replace("<job>", "<job nmae='x'>"),
        [
            (
                3,
                [
                    '<job> attribute nmae="x": unknown attribute (did you mean name?); allowed: name, loop, condition, '
                    "iteration-condition"
                ],
            )
        ],
    ),
    "iteration-condition without loop": (
        job('<task path="/bin/true" queue="default" iteration-condition="true()"/>'),
        [
            (
                5,
                [
                    '<task> attribute iteration-condition="true()": applies to each iteration of a loop: '
                    "it needs a loop attribute too"
                ],
            )
        ],
    ),
    "empty condition": (
        job('<task path="/bin/true" queue="default" condition=""/>'),
        [(5, ['<task> attribute condition="": an XPath expression is required, not an empty string'])],
    ),
    "missing queue": (
        job('<task path="/bin/true"/>'),
        [(5, ["<task>: missing required attribute queue (or task, to run a TOML [task.NAME])"])],
    ),
    "undefined queue": (
        job('<task path="/bin/true" queue="fotos"/>'),
        [(5, ['<task> attribute queue="fotos": not a defined queue; defined queues: default, remote, serial'])],
    ),
    "parameters-mode": (
        job('<task path="/bin/true" queue="default" parameters-mode="ARGS"/>'),
        [(5, ['<task> attribute parameters-mode="ARGS": allowed CMDLINE, ENV'])],
    ),
    "type": (
        job('<task path="/bin/true" queue="default" type="binary"/>'),
        [(5, ['type="binary": allowed BINARY, SCRIPT'])],
    ),
    "output-method": (
        job('<task path="/bin/true" queue="default" output-method="JSON"/>'),
        [(5, ['<task> attribute output-method="JSON": allowed TEXT, XML'])],
    ),
    "merge-stderr": (
        job('<task path="/bin/true" queue="default" merge-stderr="true"/>'),
        [(5, ['<task> attribute merge-stderr="true": allowed yes, no, or an integer (0 is no, any other yes)'])],
    ),
    "use-agent": (
        job('<task path="/bin/true" queue="default" use-agent="YES"/>'),
        [(5, ['<task> attribute use-agent="YES": allowed yes, no, or an integer (0 is no, any other yes)'])],
    ),
    "unknown task attribute": (
        job('<task path="/bin/true" queue="default" timeout="10"/>'),
        [
            (
                5,
                [
                    '<task> attribute timeout="10": unknown attribute; allowed: queue, type, name, path, wd, '
                    "parameters-mode, output-method, merge-stderr, use-agent, user, host, queue_host, retry_retval, "
                    "retry_delay, retry_times, retry_schedule, loop, condition, iteration-condition, task"
                ],
            )
        ],
    ),
    "binary without path": (
        job('<task queue="default" name="x"/>'),
        [(5, ["<task>: missing required attribute path (the command line of a BINARY task)"])],
    ),
    "empty path": (job('<task path="" queue="default"/>'), [(5, ['<task> attribute path="": empty command'])]),
    "path with a pipe": (
        job('<task path="/bin/ls | wc -l" queue="default"/>'),
        [
            (
                5,
                [
                    "<task> attribute path=\"/bin/ls | wc -l\": unquoted '|' at column 9: the command is not run by a "
                    "shell"
                ],
            )
        ],
    ),
    "path with a variable": (
        job('<task path="/bin/echo $HOME" queue="default"/>'),
        [(5, ["<task> attribute path=\"/bin/echo $HOME\": '$' at column 11 would be expanded by a shell"])],
    ),
    "path with an unclosed quote": (
        job('<task path="/bin/echo \'a b" queue="default"/>'),
        [(5, ["<task> attribute path=\"/bin/echo 'a b\": unclosed single quote (') opened at column 11"])],
    ),
    "script without name and script": (
        job('<task type="SCRIPT" queue="default"/>'),
        [
            (5, ['<task>: a type="SCRIPT" task needs a non-empty name attribute']),
            (5, ['<task>: a type="SCRIPT" task needs a <script> element with the script']),
        ],
    ),
    "empty script": (
        job('<task type="SCRIPT" name="s" queue="default">\n<script>  \n</script>\n</task>'),
        [(6, ['<script>: the script of a type="SCRIPT" task must not be empty'])],
    ),
    "script with copy": (
        job('<task type="SCRIPT" name="s" queue="default">\n<script>echo <copy select="."/></script>\n</task>'),
        [(6, ["<copy>: unknown element in <script>; allowed here: <value>"])],
    ),
    "task children order": (
        job('<task path="/bin/cat" queue="default">\n<stdin>x</stdin>\n<input>a</input>\n</task>'),
        [(7, ["<input>: out of order in <task>; the order is <input>, <stdin>, <script>"])],
    ),
    "two stdins": (
        job('<task path="/bin/cat" queue="default">\n<stdin>x</stdin>\n<stdin>y</stdin>\n</task>'),
        [(7, ["<stdin>: at most 1 <stdin> allowed in <task>"])],
    ),
    "stdin attribute": (
        job('<task path="/bin/cat" queue="default">\n<stdin mode="text">x</stdin>\n</task>'),
        [(6, ['<stdin> attribute mode="text": unknown attribute; allowed: none'])],
    ),
    "value without select": (
        job('<task path="/bin/echo" queue="default">\n<input>a<value/>b</input>\n</task>'),
        [(6, ["<value>: missing required attribute select"])],
    ),
    "value with content": (
        job('<task path="/bin/echo" queue="default">\n<input><value select=".">x</value></input>\n</task>'),
        [(6, ['<value>: text "x" is not allowed here; allowed inside: nothing'])],
    ),
    "input empty name and unknown attribute": (
        job('<task path="/bin/echo" queue="default">\n<input name="" mode="xml">a</input>\n</task>'),
        [
            (6, ['<input> attribute mode="xml": unknown attribute', "allowed: name, loop, condition"]),
            (6, ['<input> attribute name="": allowed: a non-empty name, or no name attribute']),
        ],
    ),
    "env inputs need variable names": (
        job(
            '<task path="/bin/env" queue="default" parameters-mode="ENV">\n<input>a</input>\n'
            '<input name="1BAD">b</input>\n<input name="GOOD_1">c</input>\n</task>'
        ),
        [
            (6, ['<input>: parameters-mode="ENV" passes each input as an environment variable: it needs a name']),
            (
                7,
                [
                    '<input> attribute name="1BAD": parameters-mode="ENV" needs a variable name: A-Z a-z 0-9 _, not '
                    "starting with a digit"
                ],
            ),
        ],
    ),
    "retry values": (
        job('<task path="/bin/true" queue="default" retry_retval="x" retry_delay="0" retry_times="-1"/>'),
        [
            (5, ['<task> attribute retry_retval="x": allowed: a whole number (the exit code to retry on)']),
            (5, ['<task> attribute retry_delay="0": allowed: a whole number of 1 or more']),
            (5, ['<task> attribute retry_times="-1": allowed: a whole number from 1 to 1000']),
        ],
    ),
    "more retries than a submit may ask": (
        job('<task path="/bin/true" queue="default" retry_delay="1" retry_times="1001"/>'),
        [(5, ['<task> attribute retry_times="1001": allowed: a whole number from 1 to 1000'])],
    ),
    # int() refuses more than 4,300 digits with a ValueError: such a file was a traceback at start, not a problem.
    "a number of 5,000 digits": (
        job(f'<task path="/bin/true" queue="default" retry_delay="{"9" * 5000}" retry_times="1"/>'),
        [(5, [f'<task> attribute retry_delay="{"9" * 5000}": allowed: a whole number of 1 or more'])],
    ),
    "leading zeros": (
        job(f'<task path="/bin/true" queue="default" retry_delay="{"0" * 5000}7" retry_times="0001001"/>'),
        [(5, ['<task> attribute retry_times="0001001": allowed: a whole number from 1 to 1000'])],
    ),
    "retry half set": (
        job('<task path="/bin/true" queue="default" retry_times="3"/>'),
        [(5, ['<task> attribute retry_times="3": needs retry_delay too (or a retry_schedule) to retry at all'])],
    ),
    "undefined retry schedule": (
        job('<task path="/bin/true" queue="default" retry_schedule="slow"/>'),
        [
            (
                5,
                [
                    '<task> attribute retry_schedule="slow": not a defined retry schedule; defined retry schedules: '
                    "fast_then_slow, patient"
                ],
            )
        ],
    ),
    "unclosed brace in host": (
        job('<task path="/bin/true" queue="default" host="web-{evqGetWorkflowParameter(\'h\')"/>'),
        [
            (
                5,
                [
                    "<task> attribute host=\"web-{evqGetWorkflowParameter('h')\": "
                    "the { at character 5 is never closed by }"
                ],
            )
        ],
    ),
    "empty braces in user": (
        job('<task path="/bin/true" queue="default" user="{}"/>'),
        [(5, ['<task> attribute user="{}": in {}: an XPath expression is required, not an empty string'])],
    ),
    "toml task that does not exist": (
        job('<task task="gret"/>'),
        [
            (
                5,
                [
                    '<task> attribute task="gret": not a defined task (did you mean greet?); defined tasks: greet, '
                    "show_env"
                ],
            )
        ],
    ),
    "toml task with path, SCRIPT and script": (
        job('<task task="greet" path="/bin/echo" type="SCRIPT" queue="nope">\n<script>echo</script>\n</task>'),
        [
            (5, ['<task> attribute queue="nope": not a defined queue']),
            (
                5,
                [
                    '<task> attribute path="/bin/echo": not allowed with task=: the command comes from the TOML '
                    "[task.NAME]"
                ],
            ),
            (
                5,
                [
                    '<task> attribute type="SCRIPT": not allowed with task=: the command comes from the TOML '
                    "[task.NAME]; allowed here: BINARY or no type"
                ],
            ),
            (6, ["<script>: not allowed with task=: the command comes from the TOML [task.NAME]"]),
        ],
    ),
    # The task has no parameters-mode: the error says where ENV comes from, and how to pass arguments instead.
    "toml task with env parameters needs named inputs": (
        job('<task task="show_env">\n<input>x</input>\n<input name="1x">y</input>\n</task>'),
        [
            (
                6,
                [
                    '<input>: the TOML [task.show_env] has parameters = "env" (give the task '
                    'parameters-mode="CMDLINE" to pass its inputs as arguments), which passes each input as an '
                    "environment variable: it needs a name"
                ],
            ),
            (
                7,
                [
                    '<input> attribute name="1x": the TOML [task.show_env] has parameters = "env" (give the task '
                    'parameters-mode="CMDLINE" to pass its inputs as arguments), which needs a variable name'
                ],
            ),
        ],
    ),
    "toml task with an explicit env mode": (
        job('<task task="greet" parameters-mode="ENV">\n<input>x</input>\n</task>'),
        [(6, ['<input>: parameters-mode="ENV" passes each input as an environment variable: it needs a name'])],
    ),
}


@pytest.mark.parametrize("document, expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_documents_name_file_line_element_and_allowed(
    tmp_path: Path, corpus_config: Config, document: str, expected: list[tuple[int, list[str]]]
) -> None:
    path = write(tmp_path / "workflows" / "wf.xml", document)
    lines = problems(path, corpus_config)
    assert len(lines) == len(expected), lines
    for line, (number, fragments) in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}:{number}: "), line
        for fragment in fragments:
            assert fragment in line, line


def test_all_errors_of_a_file_are_reported_with_the_first_line_in_details(
    tmp_path: Path, corpus_config: Config
) -> None:
    path = write(
        tmp_path / "wf.xml",
        "<workflow>\n<subjobs>\n<job>\n<tasks>\n"
        '<task path="/bin/true" queue="nope"/>\n'
        '<task path="/bin/true" queue="default" parameters-mode="ARGS"/>\n'
        '<task type="SCRIPT" queue="default" name="s"/>\n'
        "</tasks>\n</job>\n</subjobs>\n</workflow>\n",
    )
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, corpus_config)
    lines = info.value.message.split("\n")
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:5", f"{path}:6", f"{path}:7"]
    assert info.value.details == {"file": str(path), "line": 5, "key": None}
    assert info.value.code == "CONFIG_INVALID"


def test_the_documented_example_message(tmp_path: Path, corpus_config: Config) -> None:
    path = write(tmp_path / "x.xml", "\n" * 11 + job('<task path="/bin/true" queue="default" parameters-mode="ARGS"/>'))
    assert problems(path, corpus_config) == [
        f'{path}:16: <task> attribute parameters-mode="ARGS": allowed CMDLINE, ENV'
    ]


def test_comments_and_processing_instructions_are_allowed_anywhere(tmp_path: Path, corpus_config: Config) -> None:
    path = write(
        tmp_path / "commented.xml",
        "<?xml version='1.0'?>\n<!-- a -->\n<workflow><!-- b --><?pi x?>\n<subjobs><job><tasks><!-- c -->"
        '<task path="/bin/true" queue="default"><!-- d --></task></tasks></job></subjobs></workflow>\n<!-- e -->\n',
    )
    assert workflowdef.load_workflow(path, corpus_config).name == "commented"


def test_not_well_formed_xml_names_the_line(tmp_path: Path, corpus_config: Config) -> None:
    path = write(tmp_path / "broken.xml", "<workflow>\n<subjobs>\n<job>\n</subjobs>\n</workflow>\n")
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, corpus_config)
    assert info.value.message.startswith(f"{path}:4: not well-formed XML: ")
    assert info.value.details["line"] == 4


def test_a_dtd_is_refused(tmp_path: Path, corpus_config: Config) -> None:
    path = write(
        tmp_path / "dtd.xml",
        '<!DOCTYPE workflow [<!ENTITY x "y">]>\n<workflow><subjobs><job><tasks><task path="/bin/echo &x;" '
        'queue="default"/></tasks></job></subjobs></workflow>\n',
    )
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, corpus_config)
    assert info.value.message.startswith(f"{path}:1: DTDs and entity declarations are not allowed: ")
    assert info.value.details["line"] == 1


def test_a_dtd_in_a_utf16_file_is_refused_as_a_dtd(tmp_path: Path, corpus_config: Config) -> None:
    """A UTF-16 file's DTD has none of the bytes `<!DOCTYPE`: the parser finds it. Naming its line looked for those
    bytes and raised ValueError (min() of nothing), a traceback where a config error belongs."""
    path = tmp_path / "dtd16.xml"
    path.write_bytes('<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE workflow>\n<workflow/>\n'.encode("utf-16"))
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(str(path), corpus_config)
    assert info.value.message.startswith(f"{path}: DTDs and entity declarations are not allowed: "), info.value
    assert info.value.details["line"] is None


def test_a_doctype_in_a_scripts_cdata_is_refused_naming_its_line_and_the_way_round(
    tmp_path: Path, corpus_config: Config
) -> None:
    """The bytes are searched before any parsing: a script that writes an HTML page was refused as having a DTD,
    with no line to find it by."""
    script = "<![CDATA[cat > /tmp/page.html <<EOF\n<!DOCTYPE html>\n<html></html>\nEOF\n]]>"
    document = (
        '<workflow>\n<subjobs><job><tasks>\n<task type="SCRIPT" name="page" queue="default">\n'
        f"<script>{script}</script>\n</task>\n</tasks></job></subjobs>\n</workflow>\n"
    )
    path = write(tmp_path / "page.xml", document)
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, corpus_config)
    assert info.value.details["line"] == 5
    assert info.value.message == (
        f"{path}:5: DTDs and entity declarations are not allowed: jobd refuses <!DOCTYPE and <!ENTITY anywhere in a "
        "workflow file, in comments and scripts too (write &lt;! in a script's text)"
    )
    # The way round the message gives: the script's text says &lt;!DOCTYPE, and runs with <!DOCTYPE.
    escaped = document.replace(script, "cat > /tmp/page.html &lt;&lt;EOF\n&lt;!DOCTYPE html>\nEOF\n")
    workflow = workflowdef.load_workflow(write(tmp_path / "page.xml", escaped), corpus_config)
    assert "\n<!DOCTYPE html>\n" in etree.fromstring(workflow.source).findtext(".//script")


@pytest.mark.parametrize(
    ("document", "line", "reason"),
    [
        # libxml2 ends this message with a newline, and lxml appends the position after it
        (b"<workflow>\n<subjobs>\n\x00<job/>\n</subjobs>\n</workflow>\n", 3, "Invalid character: Char 0x0 out of "),
        # libxml2 quotes a comment that is not ASCII on a line of its own
        (b"<workflow>\n<!-- caf\xc3\xa9 is never closed", 2, "Comment not terminated <!-- caf\u00e9 is"),
        # libxml2 quotes the value, control characters and all
        (b'<workflow>\n<subjobs xmlns="a\xc2\x9b1m\xe2\x80\xaeb"/>\n</workflow>', 2, "xmlns: 'a\\x9b1m\\u202eb'"),
    ],
)
def test_not_well_formed_xml_is_told_on_one_inert_line_with_its_line(
    tmp_path: Path, corpus_config: Config, document: bytes, line: int, reason: str
) -> None:
    """The message reaches the journal, daemon.status and systemd's STATUS=: a newline from libxml2 started what
    read as another message there (and the line was lost), a C1 control or a bidi override of the file acted on the
    terminal."""
    path = write(tmp_path / "broken.xml", document)
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, corpus_config)
    message = info.value.message
    assert info.value.details["line"] == line, message
    assert message.startswith(f"{path}:{line}: not well-formed XML: {reason}"), message
    assert inert(message), message


def inert(text: str) -> bool:
    """Whether `text` is one line that cannot act on a terminal: no control character, no bidi override."""
    return not any(char != conffile.shown(char) for char in text)


def test_what_a_workflow_file_says_is_quoted_inert_in_every_problem(tmp_path: Path, corpus_config: Config) -> None:
    """A workflow's values, text and expressions are quoted as the TOML file's are (conffile.shown): C1 controls
    (\\x9b starts an escape sequence) and bidi overrides written as escapes, not passed to the terminal."""
    csi, rlo = "\x9b", "\u202e"
    path = write(
        tmp_path / "quoted.xml",
        f'<workflow nope="{csi}2J">\n<subjobs><job><tasks>x{rlo}y\n'
        f'<task path="/bin/true" queue="default" host="{{{rlo}}}" condition="a{csi}"/>\n'
        "</tasks></job></subjobs>\n</workflow>\n",
    )
    lines = problems_at(
        path,
        corpus_config,
        [
            (1, '<workflow> attribute nope="\\x9b2J": unknown attribute; allowed: version'),
            (2, '<tasks>: text "x\\u202ey" is not allowed here'),
            (3, '<task> attribute condition="a\\x9b": invalid XPath expression'),
            (3, '<task> attribute host="{\\u202e}": in {\\u202e}: '),
        ],
    )
    assert all(inert(line) for line in lines), lines


def test_an_empty_file_is_an_error_that_suggests_masking(tmp_path: Path, corpus_config: Config) -> None:
    path = write(tmp_path / "empty.xml", "")
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, corpus_config)
    assert info.value.message.startswith(f"{path}: the file is empty;")
    assert "symlink to /dev/null" in info.value.message


@pytest.mark.parametrize("name", ["with space.xml", "dots.in.name.xml", "ünïcode.xml", f"{'w' * 65}.xml"])
def test_file_names_must_be_workflow_names(tmp_path: Path, corpus_config: Config, name: str) -> None:
    path = write(tmp_path / name, (CORPUS / "trivial.xml").read_bytes())
    with pytest.raises(ConfigError) as info:
        workflowdef.load_workflow(path, corpus_config)
    assert info.value.message.startswith(f"{path}: invalid workflow file name")
    assert "NAME.xml with NAME 1 to 64 characters from A-Z a-z 0-9 _ -" in info.value.message


def test_parse_workflow_takes_an_explicit_name(corpus_config: Config) -> None:
    source = (CORPUS / "trivial.xml").read_bytes()
    workflow = parse_workflow(source, "uploaded", corpus_config, name="Hello_World-2")
    assert (workflow.name, workflow.path, workflow.source) == ("Hello_World-2", "uploaded", source)
    with pytest.raises(ConfigError) as info:
        parse_workflow(source, "uploaded", corpus_config, name="bad name")
    assert (
        info.value.message
        == 'uploaded: invalid workflow name "bad name"; allowed: 1 to 64 characters from A-Z a-z 0-9 _ -'
    )


def test_xpath_syntax_is_checked_everywhere(tmp_path: Path, corpus_config: Config) -> None:
    path = write(
        tmp_path / "xp.xml",
        "<workflow>\n<custom-attributes>\n<custom-attribute name='a' select='count(('/>\n</custom-attributes>\n"
        "<automatic-tags>\n<automatic-tag name='t' condition='1 +'/>\n</automatic-tags>\n<subjobs>\n"
        "<job loop='evqGetParentJob()/evqGetOutput(' condition=')' iteration-condition='[1]'>\n<tasks>\n"
        "<task path='/bin/echo' queue='default' host='h-{@@}' queue_host='{evqNoSuchFunction()}'>\n"
        "<input loop='//' condition='1 and'><value select='&quot;'/><copy select='!'/></input>\n"
        "</task>\n</tasks>\n</job>\n<job condition=\"count(evqGetOutput('ns')/x:r) = 0\"><tasks>\n"
        "<task path='/bin/true' queue='default'/></tasks></job>\n</subjobs>\n</workflow>\n",
    )
    expected = [
        (3, '<custom-attribute> attribute select="count(("'),
        (6, '<automatic-tag> attribute condition="1 +"'),
        (9, '<job> attribute loop="evqGetParentJob()/evqGetOutput("'),
        (9, '<job> attribute condition=")"'),
        (9, '<job> attribute iteration-condition="[1]"'),
        (11, '<task> attribute host="h-{@@}": in {@@}: '),
        (11, '<task> attribute queue_host="{evqNoSuchFunction()}": in {evqNoSuchFunction()}: '),
        (12, '<input> attribute loop="//"'),
        (12, '<input> attribute condition="1 and"'),
        (12, '<value> attribute select="\\""'),
        (12, '<copy> attribute select="!"'),
        # Loaded, then ABORTED at each run ("Undefined namespace prefix"), before (found by a soak test).
        (16, "<job> attribute condition=\"count(evqGetOutput('ns')/x:r) = 0\": invalid XPath expression"),
    ]
    problems_at(path, corpus_config, expected)


def test_a_jobd_without_its_xpath_module_fails_to_load_rather_than_check_no_xpath(tmp_path: Path) -> None:
    """jobd.workflowdef imported jobd.engine.xpath only if it was there: without it, every workflow file loaded with
    its XPath expressions unchecked (`condition="1 +"` accepted), to fail at each run. A jobd missing that module
    (here a copy of the package with it moved away) now fails at once, naming it."""
    package = Path(workflowdef.__file__).parent
    shutil.copytree(package, tmp_path / "jobd", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "jobd" / "engine" / "xpath.py").unlink()
    workflow = write(
        tmp_path / "w.xml",
        (
            "<workflow><subjobs><job condition='1 +'><tasks><task path='/bin/true' queue='default'/></tasks></job>"
            "</subjobs></workflow>"
        ),
    )
    script = (
        "from jobd import workflowdef; "
        f"assert workflowdef.__file__.startswith({str(tmp_path)!r}), workflowdef.__file__; "
        "from jobd.model import Config, QueueDef; "
        f"workflowdef.load_workflow({str(workflow)!r}, Config(queues={{'default': QueueDef('default')}})); "
        "print('loaded')"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 1 and "loaded" not in ran.stdout, (ran.stdout, ran.stderr)
    assert "ModuleNotFoundError: No module named 'jobd.engine.xpath'" in ran.stderr, ran.stderr


def test_evqueues_git_file_is_read_as_the_definition_inside(tmp_path: Path, corpus_config: Config) -> None:
    """evQueue 3.3's git repository holds `<workflow group comment><workflow>definition</workflow></workflow>`."""
    definition = (CORPUS / "loopdemo.xml").read_text().replace('<?xml version="1.0" encoding="UTF-8"?>', "").strip()
    path = write(
        tmp_path / "git.xml", f'<workflow group="g" comment="c">\n<!-- saved by evQueue -->\n{definition}\n</workflow>'
    )
    loaded = workflowdef.load_workflow(path, corpus_config)
    assert (loaded.parameters, loaded.group, loaded.comment) == (("count",), "g", "c")
    inner = etree.fromstring(loaded.source)
    assert (inner.tag, inner.get("group"), inner[0].tag) == ("workflow", None, "parameters")
    # What the wrapper may hold is evQueue's: group, comment and the one definition, each error at its line.
    bad = write(
        tmp_path / "bad.xml",
        f'<workflow node="web1" group="g">\n{definition}\ntext\n<subjobs/>\n</workflow>',
    )
    lines = problems(bad, corpus_config)
    assert lines[0].startswith(
        f'{bad}:1: <workflow> attribute node="web1": unknown attribute of evQueue\'s git file or workflow get answer; '
        "allowed: group, comment, id, name, lastcommit"
    ), lines
    assert lines[1].startswith(f'{bad}:1: <workflow>: text "text" is not allowed here'), lines
    assert lines[2].startswith(f"{bad}:1: <workflow>: evQueue's git file holds one <workflow> definition"), lines
    assert len(lines) == 3, lines
    # A definition whose problems are inside the wrapper: named at their lines of the file.
    unknown_queue = definition.replace('queue="default"', 'queue="nosuch"', 1)
    broken = write(tmp_path / "broken.xml", f"<workflow>\n{unknown_queue}\n</workflow>")
    [line] = problems(broken, corpus_config)
    assert '<task> attribute queue="nosuch": not a defined queue' in line and line.startswith(f"{broken}:"), line
    assert not line.startswith(f"{broken}:1:"), line


def test_evqueues_workflow_get_answer_saved_as_the_file_is_read_as_the_definition_inside(
    tmp_path: Path, corpus_config: Config
) -> None:
    """Moving a workflow over from evQueue without its git feature, an administrator saves what evQueue's
    `<workflow action="get">` answers inside its <response>: the git file's wrapper with the workflow's `id` and
    `name` too (and `lastcommit` in `workflows list full`). jobd refused `id` and `name` as unknown attributes."""
    definition = (CORPUS / "loopdemo.xml").read_text().replace('<?xml version="1.0" encoding="UTF-8"?>', "").strip()
    answer = f'<workflow comment="c" group="g" id="12" lastcommit="" name="loops">{definition}</workflow>'
    loaded = workflowdef.load_workflow(write(tmp_path / "loops.xml", answer), corpus_config)
    assert (loaded.name, loaded.parameters, loaded.group, loaded.comment) == ("loops", ("count",), "g", "c")
    assert etree.fromstring(loaded.source)[0].tag == "parameters"
    # The file's name is the workflow's: an answer saved under another name says which to change.
    misnamed = write(tmp_path / "nightly.xml", answer)
    [line] = problems(misnamed, corpus_config)
    assert line == (
        f'{misnamed}:1: <workflow> attribute name="loops": the workflow\'s name is its file\'s, here "nightly": '
        "rename the file loops.xml, or drop the attribute"
    ), line


def test_evqgetjob_is_refused_where_it_would_abort_its_node_at_every_run(tmp_path: Path, corpus_config: Config) -> None:
    """evqGetJob() is defined in custom attributes and automatic tags only (as in evQueue): a task condition using
    it loaded, then its task was ABORTED at every run ("evqGetJob() is only available in …")."""
    path = write(
        tmp_path / "gj.xml",
        "<workflow>\n<custom-attributes>\n<custom-attribute name='a' select=\"count(evqGetJob('j'))\"/>\n"
        "</custom-attributes>\n<automatic-tags>\n<automatic-tag name='t' condition=\"evqGetJob('j')\"/>\n"
        "</automatic-tags>\n<subjobs>\n<job name='j' condition=\"evqGetJob('j')\">\n<tasks>\n"
        "<task path='/bin/echo' queue='default' loop=\"evqGetJob('j')\">\n"
        "<input><value select=\"count(evqGetJob('j'))\"/></input>\n"
        "</task>\n</tasks>\n</job>\n</subjobs>\n</workflow>\n",
    )
    expected = [
        (9, "<job> attribute condition=\"evqGetJob('j')\""),
        (11, "<task> attribute loop=\"evqGetJob('j')\""),
        (12, "<value> attribute select=\"count(evqGetJob('j'))\""),
    ]
    for line in problems_at(path, corpus_config, expected):
        assert "is only available in custom-attributes and automatic-tags" in line, line


# --- the workflows/ directories of the search path --------------------------------------------------------------


@pytest.fixture
def search(tmp_path: Path) -> tuple[Path, Path, Path]:
    dirs = (tmp_path / "usr", tmp_path / "run", tmp_path / "etc")
    for directory in dirs:
        directory.mkdir()
    return dirs


def strs(*dirs: Path) -> list[str]:
    return [str(d) for d in dirs]


TRIVIAL = (CORPUS / "trivial.xml").read_text()


def one_task(command: str, queue: str = "default") -> str:
    return TRIVIAL.replace('path="/bin/echo hello world" queue="default"', f'path="{command}" queue="{queue}"')


def test_a_higher_directory_replaces_a_workflow_of_the_same_name(search: tuple[Path, Path, Path]) -> None:
    usr, run, etc = search
    write(usr / "workflows/a.xml", one_task("/bin/echo usr"))
    write(usr / "workflows/b.xml", one_task("/bin/echo usr b"))
    winner = write(etc / "workflows/a.xml", one_task("/bin/echo etc"))
    write(run / "workflows/a.xml", one_task("/bin/echo run"))
    loaded = config.load(strs(*search))
    assert set(loaded.workflows) == {"a", "b"}
    assert loaded.workflows["a"].path == str(winner)
    assert b"/bin/echo etc" in loaded.workflows["a"].source
    assert loaded.files == (str(winner), str(usr / "workflows/b.xml"))


def test_a_higher_directory_hides_a_broken_lower_file(search: tuple[Path, Path, Path]) -> None:
    usr, _run, etc = search
    write(usr / "workflows/a.xml", "<workflow>")
    write(etc / "workflows/a.xml", TRIVIAL)
    assert set(config.load(strs(*search)).workflows) == {"a"}


def test_a_symlink_to_dev_null_masks_a_workflow(search: tuple[Path, Path, Path]) -> None:
    usr, _run, etc = search
    write(usr / "workflows/a.xml", TRIVIAL)
    write(usr / "workflows/b.xml", TRIVIAL)
    (etc / "workflows").mkdir()
    (etc / "workflows/a.xml").symlink_to("/dev/null")
    loaded = config.load(strs(*search))
    assert set(loaded.workflows) == {"b"}


def test_editor_files_and_other_names_in_workflows_are_not_read(search: tuple[Path, Path, Path]) -> None:
    etc = search[2]
    for name in (".a.xml", ".a.xml.swp", "a.xml~", "4913", "README", "a.xml.bak", "notes.txt"):
        write(etc / "workflows" / name, "not xml <<<")
    (etc / "workflows/.#a.xml").symlink_to("nobody@host.1234")
    (etc / "workflows/sub.xml").mkdir()
    assert config.find_workflow_files(strs(*search)) == []
    assert dict(config.load(strs(*search)).workflows) == {}


def test_workflows_may_use_what_any_toml_file_defines(search: tuple[Path, Path, Path]) -> None:
    usr, run, etc = search
    write(usr / "jobd.toml", "[queue.photo]\n")
    write(run / "jobd.d/10-tasks.toml", '[task.resize]\ncommand = ["/bin/echo"]\nqueue = "photo"\n')
    write(etc / "jobd.d/20-retry.toml", "[retry_schedule.slow]\nlevels = [{ delay = 60, times = 5 }]\n")
    write(
        etc / "workflows/resize.xml",
        job('<task task="resize" retry_schedule="slow"/>\n<task path="/bin/true" queue="photo"/>'),
    )
    loaded = config.load(strs(*search))
    assert set(loaded.workflows) == {"resize"}
    assert loaded.files[-1] == str(etc / "workflows/resize.xml")


def test_one_broken_workflow_fails_the_whole_load_and_every_broken_file_is_named(
    search: tuple[Path, Path, Path],
) -> None:
    usr, _run, etc = search
    write(usr / "jobd.toml", "[queue.q]\n")
    write(usr / "workflows/good.xml", TRIVIAL)
    first = write(etc / "workflows/a-bad.xml", one_task("/bin/true", queue="nope"))
    second = write(usr / "workflows/z-bad.xml", "<workflow>\n<subjobs>\n")
    with pytest.raises(ConfigError) as info:
        config.load(strs(*search))
    lines = info.value.message.split("\n")
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        f'{first}:5: <task> attribute queue="nope": not a defined queue; defined queues: default, q'
    )
    assert lines[1].startswith(f"{second}:3: not well-formed XML: ")
    assert info.value.details == {"file": str(first), "line": 5, "key": None}


def test_a_removed_toml_task_breaks_the_workflows_that_use_it(tmp_path: Path) -> None:
    write(tmp_path / "jobd.toml", '[task.t]\ncommand = ["/bin/true"]\n')
    path = write(tmp_path / "workflows/w.xml", job('<task task="t"/>'))
    assert set(config.load([str(tmp_path)]).workflows) == {"w"}
    write(tmp_path / "jobd.toml", "")
    with pytest.raises(ConfigError) as info:
        config.load([str(tmp_path)])
    assert info.value.message == f'{path}:5: <task> attribute task="t": not a defined task; defined tasks: none'


def test_an_unreadable_workflow_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "workflows").mkdir()
    dangling = tmp_path / "workflows/gone.xml"
    dangling.symlink_to(tmp_path / "nowhere.xml")
    with pytest.raises(ConfigError) as info:
        config.load([str(tmp_path)])
    assert info.value.message == f"{dangling}: cannot read: No such file or directory"


# --- a real daemon --------------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def reload_error(daemon: Daemon) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        daemon.call("daemon.reload")
    return info.value


def test_daemon_reload_with_a_broken_workflow_keeps_the_running_config(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd('[task.echo]\ncommand = ["/bin/echo"]\n')
    workflows = daemon.config_dir / "workflows"
    good = workflows / "good.xml"
    atomic_write(good, TRIVIAL)
    assert str(good) in daemon.call("daemon.reload")["files"]

    bad = workflows / "bad.xml"
    # The broken file first, so no reload can see the new task without it.
    atomic_write(bad, one_task("/bin/echo $HOME"))
    daemon.write_config('[task.echo]\ncommand = ["/bin/echo"]\n[task.fresh]\ncommand = ["/bin/echo", "fresh"]\n')
    error = reload_error(daemon)
    assert error.code == "CONFIG_INVALID", error
    assert (error.data["file"], error.data["line"]) == (str(bad), 5)
    assert f'{bad}:5: <task> attribute path="/bin/echo $HOME"' in error.message
    # All or nothing: the TOML change beside the broken workflow did not apply, the old workflows stay.
    with pytest.raises(RemoteError) as info:
        daemon.call("job.submit", {"task": "fresh"})
    assert info.value.code == "UNKNOWN_TASK"
    status = daemon.call("daemon.status")
    assert str(good) in status["config_files"] and str(bad) not in status["config_files"]
    assert status["last_reload"]["ok"] is False and str(bad) in status["last_reload"]["error"]

    atomic_write(bad, one_task("/bin/echo '$HOME'"))
    reply = daemon.call("daemon.reload")
    assert reply["ok"] is True and str(bad) in reply["files"]
    assert daemon.wait(daemon.submit(task="fresh")["id"])["state"] == "succeeded"


def settle(daemon: Daemon, test: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Wait, reload by reload, until daemon.status passes `test`: a watcher may still be acting on earlier events."""
    pump = pump_of(daemon)
    status: dict[str, Any] = daemon.call("daemon.status")
    while not test(status):
        pump.wait_for("READY=1")
        status = daemon.call("daemon.status")
    return status


def test_daemon_watcher_sees_a_workflows_dir_created_after_start_and_an_edited_file(
    jobd: Callable[..., Daemon],
) -> None:
    daemon = jobd()
    workflows = daemon.config_dir / "workflows"
    assert not workflows.exists()
    pump = pump_of(daemon)
    pump.skip()
    path = workflows / "watched.xml"
    # Creates workflows/ and renames the file into it: no command is sent, only the watcher can cause reloads.
    atomic_write(path, TRIVIAL)
    pump.wait_for("RELOADING=1")
    settle(daemon, lambda status: str(path) in status["config_files"])

    pump.skip()
    atomic_write(path, one_task("/bin/echo 'edited'", queue="nope"))
    status = settle(daemon, lambda status: not status["last_reload"]["ok"])
    assert f'{path}:5: <task> attribute queue="nope"' in status["last_reload"]["error"], status

    pump.skip()
    path.unlink()
    status = settle(daemon, lambda status: status["last_reload"]["ok"])
    assert str(path) not in status["config_files"]


def test_the_corpus_runs_as_a_daemon_config(jobd: Callable[..., Daemon]) -> None:
    daemon = jobd((CORPUS / "corpus.toml").read_text(), daemon_extra=f'tasks_directory = "{CORPUS / "tasks"}"')
    workflows = daemon.config_dir / "workflows"
    workflows.mkdir()
    for path in CORPUS_FILES:
        shutil.copy(path, workflows / path.name)
    files = daemon.call("daemon.reload")["files"]
    assert sorted(Path(f).name for f in files if f.endswith(".xml")) == [path.name for path in CORPUS_FILES]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_dev_example_workflow_loads() -> None:
    dev = config.load_dir(str(EXAMPLES / "dev"))
    assert dev.workflows["greet-and-count"].parameters == ("who",)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("**/workflows/*.xml")), ids=lambda path: path.stem)
def test_every_example_workflow_loads_with_the_configuration_beside_it(path: Path) -> None:
    """Each workflow file under examples/ is read with the configuration directory it is part of, as jobd
    --config-dir would read it (README's tour runs examples/dev, test_example_page examples/web)."""
    loaded = config.load_dir(str(path.parent.parent))
    assert path.stem in loaded.workflows


def test_a_real_jobd_tells_a_workflow_files_problems_on_inert_lines_at_start_and_at_reload(
    make_daemon: Callable[..., Daemon], jobd: Callable[..., Daemon]
) -> None:
    """End to end, for what the fuzzer found: a NUL in a workflow file at a start (refused with exit code 78,
    the problem on one line with its line number), and a C1 control in a value at a reload (the running
    configuration kept, the error written with escapes in daemon.status and systemd's STATUS=)."""
    refused = make_daemon('[task.echo]\ncommand = ["/bin/echo"]\n', start=False)
    nul = write(refused.config_dir / "workflows" / "nul.xml", TRIVIAL.replace("<subjobs>", "<subjobs>\0", 1).encode())
    started = refused.start_refused()
    assert started.returncode == 78, started
    told = f"{nul}:{TRIVIAL.split('<subjobs>')[0].count(chr(10)) + 1}: not well-formed XML: Invalid character: "
    said = [line for line in started.stderr.splitlines() if str(nul) in line]
    assert len(said) == 1 and told in said[0] and ", column " in said[0], started.stderr
    assert "Traceback" not in started.stderr, started.stderr

    daemon = jobd('[task.echo]\ncommand = ["/bin/echo"]\n')
    csi = daemon.config_dir / "workflows" / "csi.xml"
    atomic_write(csi, one_task("/bin/echo", queue="\x9b2J"))
    error = reload_error(daemon)
    assert error.code == "CONFIG_INVALID" and error.data["file"] == str(csi), error
    assert '<task> attribute queue="\\x9b2J": not a defined queue' in error.message, error.message
    assert "\x9b" not in error.message
    last = daemon.call("daemon.status")["last_reload"]
    assert last["ok"] is False and "\\x9b2J" in last["error"] and "\x9b" not in last["error"], last
    line = pump_of(daemon).wait_for(lambda line: "reload failed" in line and str(csi) in line)
    assert "\\x9b2J" in line and "\x9b" not in line, line
    assert daemon.wait(daemon.submit(task="echo", args=["kept"])["id"])["state"] == "succeeded"
