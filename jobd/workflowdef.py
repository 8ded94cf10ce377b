"""Workflow definitions: an evQueue 3 workflow XML file → a validated WorkflowDef.

`parse_workflow` checks a `<workflow>` document against evQueue 3's schema (element order, allowed children and
attributes, required attributes) and against what jobd needs to run it (task types, queues, TOML tasks, retry
schedules, XPath syntax, command lines), and reports every problem of the file at once, each naming the file, the
line, the element, the attribute and what is allowed. It only reads: instances are built by the engine from
`WorkflowDef.source`. `split_command` is the one place a task's `path` becomes an argv.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from jobd import conffile
from jobd.engine.xpath import compile_check
from jobd.errors import ConfigError, InvalidXml, did_you_mean
from jobd.model import (
    ENV_NAME,
    EVQUEUE_BOOLEAN_RULE,
    MAX_RETRY_TIMES,
    Config,
    ParameterMode,
    WorkflowDef,
    evqueue_boolean,
)
from jobd.safexml import DTD_REFUSED, DtdRefused, parse

WORKFLOW_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
WORKFLOW_NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 _ -"
SUFFIX = ".xml"

TASK_TYPES = ("BINARY", "SCRIPT")
PARAMETER_MODES = ("CMDLINE", "ENV")
OUTPUT_METHODS = ("TEXT", "XML")

# --- the schema -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Child:
    """One entry of an element's content model: `name` may occur from `least` to `most` (None: unbounded) times."""

    name: str
    least: int = 0
    most: int | None = 1


@dataclass(frozen=True, slots=True)
class ElementRule:
    """What evQueue's workflow.xsd allows for one element.

    `children` is an xs:sequence (that order) unless `mixed`, where text and the children interleave freely
    (an xs:choice, as for `<input>`, `<stdin>` and `<script>`).
    """

    attributes: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    children: tuple[Child, ...] = ()
    mixed: bool = False


_XPATH_HOLDER = ("loop", "condition", "iteration-condition")
TASK_ATTRIBUTES = (
    "queue",
    "type",
    "name",
    "path",
    "wd",
    "parameters-mode",
    "output-method",
    "merge-stderr",
    "use-agent",
    "user",
    "host",
    "queue_host",
    "retry_retval",
    "retry_delay",
    "retry_times",
    "retry_schedule",
    *_XPATH_HOLDER,
    "task",  # jobd's extension: run the TOML-defined [task.NAME]
)
_VALUES = (Child("value", 0, None), Child("copy", 0, None))

SCHEMA: dict[str, ElementRule] = {
    "workflow": ElementRule(
        attributes=("version",),
        children=(Child("parameters"), Child("custom-attributes"), Child("automatic-tags"), Child("subjobs", 1)),
    ),
    "parameters": ElementRule(children=(Child("parameter", 0, None),)),
    "parameter": ElementRule(attributes=("name",), required=("name",)),
    "custom-attributes": ElementRule(children=(Child("custom-attribute", 0, None),)),
    "custom-attribute": ElementRule(attributes=("name", "select", "description"), required=("name", "select")),
    "automatic-tags": ElementRule(children=(Child("automatic-tag", 0, None),)),
    "automatic-tag": ElementRule(attributes=("name", "condition", "description"), required=("name", "condition")),
    "subjobs": ElementRule(children=(Child("job", 1, None),)),
    "job": ElementRule(attributes=("name", *_XPATH_HOLDER), children=(Child("tasks", 1), Child("subjobs"))),
    "tasks": ElementRule(children=(Child("task", 1, None),)),
    "task": ElementRule(
        attributes=TASK_ATTRIBUTES, children=(Child("input", 0, None), Child("stdin"), Child("script"))
    ),
    "input": ElementRule(attributes=("name", "loop", "condition"), children=_VALUES, mixed=True),
    "stdin": ElementRule(children=_VALUES, mixed=True),
    "script": ElementRule(children=(Child("value", 0, None),), mixed=True),
    "value": ElementRule(attributes=("select",), required=("select",)),
    "copy": ElementRule(attributes=("select",), required=("select",)),
}

# evQueue 3.3's git file (Workflow::SaveToXML): <workflow group comment><workflow>definition</workflow></workflow>
_GIT_FILE_ATTRIBUTES = ("group", "comment")
# ... and the same wrapper as its `workflow get` answers it, which an administrator saves when moving a workflow over:
# `id` and `lastcommit` are evQueue's database's (jobd numbers workflows itself), `name` must be the file's.
_WORKFLOW_GET_ATTRIBUTES = ("id", "name", "lastcommit")

# --- splitting a command line -------------------------------------------------------------------------------------

_OPERATORS = "|&;<>()"
_ESCAPABLE_IN_DOUBLE_QUOTES = '"\\$`'


def split_command(path: str) -> tuple[str, ...]:
    """Split a task's `path` into argv words with POSIX shell quoting, and nothing else a shell does.

    Single quotes keep everything literally; double quotes keep everything but `\\"`, `\\\\`; a backslash outside
    quotes keeps the next character. Nothing is expanded: evQueue's wordexp(3) expanded `$VAR` and `$(…)` inside
    the daemon, so an unquoted `$` or backquote (or one in double quotes) is refused rather than silently passed
    on literally, and so are the operators `| & ; < > ( )` that only a shell would act on. Globs and `~` stay
    literal. Raises ValueError saying what is wrong and where (1-based column).
    """
    words: list[str] = []
    word: list[str] = []
    in_word = False
    position = 0
    while position < len(path):
        char = path[position]
        column = position + 1
        if char in " \t\n\r":
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
            position += 1
            continue
        in_word = True
        if char == "'":
            end = path.find("'", position + 1)
            if end < 0:
                raise ValueError(f"unclosed single quote (') opened at column {column}")
            word.append(path[position + 1 : end])
            position = end + 1
        elif char == '"':
            position = _double_quoted(path, position, word)
        elif char == "\\":
            if position + 1 == len(path):
                raise ValueError(f"a backslash at the end (column {column}) escapes nothing")
            word.append(path[position + 1])
            position += 2
        elif char in "$`":
            raise ValueError(_expansion_refused(char, column))
        elif char in _OPERATORS:
            raise ValueError(
                f"unquoted {char!r} at column {column}: the command is not run by a shell (no pipes, redirections "
                f"or command lists); quote it ('{char}') to pass it as an argument"
            )
        else:
            word.append(char)
            position += 1
    if in_word:
        words.append("".join(word))
    if not words:
        raise ValueError("empty command: give the program to run, then its arguments")
    if not words[0]:
        raise ValueError("the program (first word) is an empty string")
    return tuple(words)


def _double_quoted(path: str, start: int, word: list[str]) -> int:
    """Append the content of the double-quoted string opening at `start`; return the index after it."""
    position = start + 1
    while position < len(path):
        char = path[position]
        if char == '"':
            return position + 1
        if char == "\\" and position + 1 < len(path) and path[position + 1] in _ESCAPABLE_IN_DOUBLE_QUOTES:
            word.append(path[position + 1])
            position += 2
            continue
        if char in "$`":
            raise ValueError(_expansion_refused(char, position + 1))
        word.append(char)
        position += 1
    raise ValueError(f'unclosed double quote (") opened at column {start + 1}')


def _expansion_refused(char: str, column: int) -> str:
    return (
        f"{char!r} at column {column} would be expanded by a shell (evQueue expanded $VAR and $(…) here); jobd "
        f"expands nothing: to pass it literally, put it in single quotes or write \\{char}"
    )


# --- checking a document --------------------------------------------------------------------------------------------


def _line(element: etree._Element) -> int | None:
    line: object = element.sourceline  # lxml-stubs leave it untyped
    return line if isinstance(line, int) else None


def _show(value: str) -> str:
    """A value of the file, quoted, as a message quotes it: inert on a terminal (conffile.shown), as the TOML
    configuration's values are, for the message reaches the journal, daemon.status and systemd's STATUS=."""
    return conffile.shown(json.dumps(value, ensure_ascii=False))


def _tag(element: etree._Element) -> str:
    qname = etree.QName(element)
    return f"{element.prefix}:{qname.localname}" if element.prefix else qname.localname


def _allowed(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names) if names else "none"


class _Checker:
    """Walks one document and collects every problem, in document order."""

    def __init__(self, path: str, config: Config) -> None:
        self.path = path
        self.config = config
        self.problems: list[tuple[int | None, str]] = []
        self.parameters: list[str] = []

    # -- reporting --

    # A problem may quote the file as a checker wrote it (the part of a value in {…}, an expression's character):
    # made inert here, for every problem, as the values and the file's name are.

    def element_problem(self, element: etree._Element, problem: str) -> None:
        line = _line(element)
        about = f"<{_tag(element)}>: {conffile.shown(problem)}"
        self.problems.append((line, f"{conffile.shown(self.path)}:{line}: {about}"))

    def attribute_problem(self, element: etree._Element, name: str, problem: str) -> None:
        line = _line(element)
        value = element.get(name, "")
        about = f"<{_tag(element)}> attribute {name}={_show(value)}: {conffile.shown(problem)}"
        self.problems.append((line, f"{conffile.shown(self.path)}:{line}: {about}"))

    # -- structure --

    def check_document(self, root: etree._Element) -> None:
        if not isinstance(root.tag, str) or root.tag != "workflow":
            namespace = etree.QName(root).namespace if isinstance(root.tag, str) else None
            why = f", in no namespace (this one is in {namespace}: drop its xmlns)" if namespace else ""
            self.element_problem(root, f"the root element must be <workflow>{why}")
            return
        self.check_element(root)

    def definition_in(self, root: etree._Element, name: str) -> etree._Element:
        """The workflow definition of file `name`: its root, or the <workflow> inside evQueue's git file.

        evQueue 3.3 keeps a workflow in its git repository (`git.workflows.subdirectory/NAME.xml`) as
        `<workflow group="…" comment="…"><workflow>definition</workflow></workflow>`; a directory of such files is
        what a user of that feature moves to jobd. Its `workflow get` answers the same wrapper with the workflow's
        `id` and `name` too, which is what the others save. A `<workflow>` root with a `<workflow>` child is read
        so; its group and comment are kept beside the definition (WorkflowDef.group, .comment)."""
        if root.tag != "workflow" or not any(child.tag == "workflow" for child in self.element_children(root)):
            return root
        allowed = _GIT_FILE_ATTRIBUTES + _WORKFLOW_GET_ATTRIBUTES
        for attribute in root.attrib:
            if attribute not in allowed:
                self.attribute_problem(
                    root,
                    str(attribute),
                    f"unknown attribute of evQueue's git file or workflow get answer; allowed: {_allowed(allowed)}",
                )
        if root.get("name", name) != name:
            self.attribute_problem(
                root,
                "name",
                f"the workflow's name is its file's, here {_show(name)}: rename the file "
                f"{root.get('name')}{SUFFIX}, or drop the attribute",
            )
        self.check_text(root, ElementRule(children=(Child("workflow", 1),)))
        children = list(self.element_children(root))
        if len(children) > 1:
            self.element_problem(
                root, "evQueue's git file holds one <workflow> definition in its <workflow>, and no other element"
            )
        return next(child for child in children if child.tag == "workflow")

    def check_element(self, element: etree._Element) -> None:
        """Check `element` against its rule, then its children; the semantic checks hang off the tag."""
        rule = SCHEMA[str(element.tag)]
        self.check_attributes(element, rule)
        self.check_text(element, rule)
        children = list(self.element_children(element))
        self.check_content(element, rule, children)
        semantic = _SEMANTICS.get(str(element.tag))
        if semantic is not None:
            semantic(self, element)
        allowed = {child.name for child in rule.children}
        for child in children:
            # An element out of place was reported as such; checking it against its usual rule would only add noise.
            if child.tag in allowed:
                self.check_element(child)

    @staticmethod
    def element_children(element: etree._Element) -> Iterator[etree._Element]:
        # Comments and processing instructions are not content in XML Schema; they are allowed anywhere.
        for child in element:
            if isinstance(child.tag, str):
                yield child

    def check_attributes(self, element: etree._Element, rule: ElementRule) -> None:
        for name in element.attrib:
            if name not in rule.attributes:
                hint = did_you_mean(str(name), rule.attributes)
                self.attribute_problem(
                    element, str(name), f"unknown attribute{hint}; allowed: {_allowed(rule.attributes)}"
                )
        for name in rule.required:
            if element.get(name) is None:
                self.element_problem(element, f"missing required attribute {name}")

    def check_text(self, element: etree._Element, rule: ElementRule) -> None:
        if rule.mixed:
            return
        texts = [element.text, *(child.tail for child in element)]
        stray = next((text.strip() for text in texts if text and text.strip()), None)
        if stray is not None:
            inside = ", ".join(f"<{c.name}>" for c in rule.children) or "nothing"
            shown = stray if len(stray) <= 40 else stray[:40] + "…"
            self.element_problem(element, f"text {_show(shown)} is not allowed here; allowed inside: {inside}")

    def check_content(self, element: etree._Element, rule: ElementRule, children: list[etree._Element]) -> None:
        names = [child.name for child in rule.children]
        counts = dict.fromkeys(names, 0)
        reached = 0  # index in the sequence of the last element seen in order
        for child in children:
            tag = child.tag if isinstance(child.tag, str) else ""
            if tag not in counts:
                hint = did_you_mean(_tag(child), names, "<{}>")
                allowed = ", ".join(f"<{name}>" for name in names) or "no elements"
                self.element_problem(child, f"unknown element in <{_tag(element)}>{hint}; allowed here: {allowed}")
                continue
            counts[tag] += 1
            index = names.index(tag)
            most = rule.children[index].most
            if most is not None and counts[tag] > most:
                self.element_problem(child, f"at most {most} <{tag}> allowed in <{_tag(element)}>")
            elif not rule.mixed and index < reached:
                order = ", ".join(f"<{name}>" for name in names)
                self.element_problem(child, f"out of order in <{_tag(element)}>; the order is {order}")
            else:
                reached = max(reached, index)
        for child_rule in rule.children:
            if counts[child_rule.name] < child_rule.least:
                self.element_problem(element, f"missing required element <{child_rule.name}>")

    # -- values --

    def check_choice(self, element: etree._Element, name: str, allowed: tuple[str, ...]) -> str | None:
        value = element.get(name)
        if value is not None and value not in allowed:
            self.attribute_problem(element, name, f"allowed {', '.join(allowed)}")
            return None
        return value

    def check_boolean(self, element: etree._Element, name: str) -> None:
        value = element.get(name)
        if value is not None and evqueue_boolean(value) is None:
            self.attribute_problem(element, name, f"allowed {EVQUEUE_BOOLEAN_RULE}")

    def check_xpath(self, element: etree._Element, name: str, *, summary: bool = False) -> None:
        """`summary`: a custom attribute's `select` or an automatic tag's `condition`, where evqGetJob() works."""
        expression = element.get(name)
        if expression is None:
            return
        problem = self.xpath_problem(expression, summary=summary)
        if problem is not None:
            self.attribute_problem(element, name, problem)

    def xpath_problem(self, expression: str, *, summary: bool = False) -> str | None:
        """Why `expression` is not a valid workflow expression, or None. jobd.engine.xpath is the only judge:
        evQueue writes its functions as path steps (`evqGetParentJob()/evqGetOutput('list')/files/file`), which
        XPath 1.0 does not allow, and that module rewrites them before libxml2 compiles them, so a check made with
        anything else would disagree with what runs."""
        if not expression.strip():
            return "an XPath expression is required, not an empty string"
        try:
            compile_check(expression, summary=summary)
        except ValueError as error:
            return str(error)
        return None

    def check_braced_xpath(self, element: etree._Element, name: str) -> None:
        """`host`, `user`, `queue_host`: literal text with `{xpath}` parts, each replaced at run time."""
        value = element.get(name)
        if value is None:
            return
        position = 0
        while (start := value.find("{", position)) >= 0:
            end = value.find("}", start + 1)
            if end < 0:
                self.attribute_problem(element, name, f"the {{ at character {start + 1} is never closed by }}")
                return
            problem = self.xpath_problem(value[start + 1 : end])
            if problem is not None:
                self.attribute_problem(element, name, f"in {{{value[start + 1 : end]}}}: {problem}")
            position = end + 1

    def check_positive_integer(self, element: etree._Element, name: str, high: int | None = None) -> int | None:
        value = element.get(name)
        if value is None:
            return None
        # At most 18 digits after leading zeros: int() refuses more than 4,300 with a ValueError, and no count or
        # delay needs more than 18.
        found = re.fullmatch(r"\s*\+?0*([0-9]{1,18})\s*", value)
        if found:
            number = int(found[1])
            if number > 0 and (high is None or number <= high):
                return number
        allowed = "a whole number of 1 or more" if high is None else f"a whole number from 1 to {high}"
        self.attribute_problem(element, name, f"allowed: {allowed}")
        return None

    def check_defined_queue(self, element: etree._Element) -> None:
        queue = element.get("queue")
        if queue is not None and queue not in self.config.queues:
            self.attribute_problem(element, "queue", _not_defined("queue", queue, self.config.queues))


def _not_defined(what: str, name: str, defined: Iterable[str]) -> str:
    listed = sorted(defined)
    hint = did_you_mean(name, listed)
    return f"not a defined {what}{hint}; defined {what}s: {', '.join(listed) if listed else 'none'}"


# --- semantic checks, per element -------------------------------------------------------------------------------


def _check_parameter(checker: _Checker, element: etree._Element) -> None:
    name = element.get("name")
    if name is None:
        return
    if not name:
        checker.attribute_problem(element, "name", "a parameter needs a non-empty name")
    elif name in checker.parameters:
        checker.attribute_problem(element, "name", "declared twice; parameter names must be unique")
    else:
        checker.parameters.append(name)


def _check_named(checker: _Checker, element: etree._Element) -> None:
    if element.get("name") == "":
        checker.attribute_problem(element, "name", "a non-empty name is required")


def _check_custom_attribute(checker: _Checker, element: etree._Element) -> None:
    _check_named(checker, element)
    checker.check_xpath(element, "select", summary=True)


def _check_automatic_tag(checker: _Checker, element: etree._Element) -> None:
    _check_named(checker, element)
    checker.check_xpath(element, "condition", summary=True)


def _check_loop_and_conditions(checker: _Checker, element: etree._Element) -> None:
    for name in _XPATH_HOLDER:
        checker.check_xpath(element, name)
    if element.get("iteration-condition") is not None and element.get("loop") is None:
        checker.attribute_problem(
            element, "iteration-condition", "applies to each iteration of a loop: it needs a loop attribute too"
        )


def _check_task(checker: _Checker, element: etree._Element) -> None:
    _check_loop_and_conditions(checker, element)
    kind = checker.check_choice(element, "type", TASK_TYPES) or "BINARY"
    mode = checker.check_choice(element, "parameters-mode", PARAMETER_MODES)
    checker.check_choice(element, "output-method", OUTPUT_METHODS)
    checker.check_boolean(element, "merge-stderr")
    checker.check_boolean(element, "use-agent")
    for name in ("host", "user", "queue_host"):
        checker.check_braced_xpath(element, name)
    checker.check_defined_queue(element)
    scripts = element.findall("script")
    if element.get("task") is not None:
        mode = _check_toml_task(checker, element, scripts) or mode
    else:
        if element.get("queue") is None:
            checker.element_problem(element, "missing required attribute queue (or task, to run a TOML [task.NAME])")
        if kind == "SCRIPT":
            _check_script_task(checker, element, scripts)
        else:
            _check_binary_task(checker, element)
    _check_retry(checker, element)
    if mode == "ENV":
        _check_env_inputs(checker, element)


def _env_mode_origin(element: etree._Element) -> str:
    """Where a task's ENV mode comes from, as the errors about its inputs say it: the task's own attribute, or (with
    no parameters-mode) the TOML task it runs, which the administrator may not have in mind."""
    if element.get("parameters-mode") is None and element.get("task") is not None:
        return (
            f'the TOML [task.{element.get("task")}] has parameters = "env" (give the task parameters-mode="CMDLINE" '
            "to pass its inputs as arguments), which"
        )
    return 'parameters-mode="ENV"'


def _check_toml_task(checker: _Checker, element: etree._Element, scripts: list[etree._Element]) -> str | None:
    """jobd's `<task task="NAME">`: the command and its defaults come from [task.NAME] of the TOML config."""
    name = element.get("task", "")
    definition = checker.config.tasks.get(name)
    if definition is None:
        checker.attribute_problem(element, "task", _not_defined("task", name, checker.config.tasks))
    reason = "not allowed with task=: the command comes from the TOML [task.NAME]"
    if element.get("path") is not None:
        checker.attribute_problem(element, "path", reason)
    if element.get("type") == "SCRIPT":
        checker.attribute_problem(element, "type", f"{reason}; allowed here: BINARY or no type")
    for script in scripts:
        checker.element_problem(script, reason)
    if definition is not None and element.get("parameters-mode") is None:
        return "ENV" if definition.parameters is ParameterMode.ENV else "CMDLINE"
    return None


def _check_binary_task(checker: _Checker, element: etree._Element) -> None:
    path = element.get("path")
    if path is None:
        checker.element_problem(element, "missing required attribute path (the command line of a BINARY task)")
        return
    try:
        split_command(path)
    except ValueError as error:
        checker.attribute_problem(element, "path", str(error))


def _check_script_task(checker: _Checker, element: etree._Element, scripts: list[etree._Element]) -> None:
    if not element.get("name"):
        checker.element_problem(element, 'a type="SCRIPT" task needs a non-empty name attribute')
    script = scripts[0] if scripts else None
    if script is None:
        checker.element_problem(element, 'a type="SCRIPT" task needs a <script> element with the script')
    elif not "".join(str(text) for text in script.itertext()).strip() and script.find("value") is None:
        checker.element_problem(script, 'the script of a type="SCRIPT" task must not be empty')


def _check_retry(checker: _Checker, element: etree._Element) -> None:
    retval = element.get("retry_retval")
    if retval is not None and not re.fullmatch(r"\s*[+-]?[0-9]+\s*", retval):
        checker.attribute_problem(element, "retry_retval", "allowed: a whole number (the exit code to retry on)")
    delay = checker.check_positive_integer(element, "retry_delay")
    times = checker.check_positive_integer(element, "retry_times", high=MAX_RETRY_TIMES)
    schedule = element.get("retry_schedule")
    if schedule is not None:
        if schedule not in checker.config.retry_schedules:
            problem = _not_defined("retry schedule", schedule, checker.config.retry_schedules)
            checker.attribute_problem(element, "retry_schedule", problem)
        return
    # evQueue silently never retries a task that has only one of the two; a reload is the moment to say so.
    for given, missing, value in (("retry_delay", "retry_times", delay), ("retry_times", "retry_delay", times)):
        if value is not None and element.get(missing) is None:
            checker.attribute_problem(element, given, f"needs {missing} too (or a retry_schedule) to retry at all")


def _check_env_inputs(checker: _Checker, element: etree._Element) -> None:
    origin = _env_mode_origin(element)
    for item in element.findall("input"):
        name = item.get("name")
        if name is None:
            checker.element_problem(item, f"{origin} passes each input as an environment variable: it needs a name")
        elif name and not ENV_NAME.fullmatch(name):
            checker.attribute_problem(
                item, "name", f"{origin} needs a variable name: A-Z a-z 0-9 _, not starting with a digit"
            )


def _check_input(checker: _Checker, element: etree._Element) -> None:
    if element.get("name") == "":
        checker.attribute_problem(element, "name", "allowed: a non-empty name, or no name attribute")
    checker.check_xpath(element, "loop")
    checker.check_xpath(element, "condition")


def _check_select(checker: _Checker, element: etree._Element) -> None:
    checker.check_xpath(element, "select")


_SEMANTICS: dict[str, Callable[[_Checker, etree._Element], None]] = {
    "parameter": _check_parameter,
    "custom-attribute": _check_custom_attribute,
    "automatic-tag": _check_automatic_tag,
    "job": _check_loop_and_conditions,
    "task": _check_task,
    "input": _check_input,
    "value": _check_select,
    "copy": _check_select,
}

# --- entry points ---------------------------------------------------------------------------------------------------

# How jobd.safexml words libxml2's complaints: "line 4: reason", or libxml2's own "…, line 4, column 9".
_REASON = re.compile(
    r"is not well-formed XML: (?:line (?P<first>\d+): )?(?P<reason>.*?(?:line (?P<last>\d+), column \d+)?)$"
)


def _not_well_formed(path: str, message: str) -> ConfigError:
    found = _REASON.search(message)
    if found is None:  # refused for another reason (a DTD), which names no line
        reason = message.removeprefix(path).lstrip(": ")
        return ConfigError(f"{conffile.shown(path)}: {reason}", file=path, line=None, key=None)
    number = found["first"] or found["last"]
    line = int(number) if number else None
    where = f"{conffile.shown(path)}:{line}" if line is not None else conffile.shown(path)
    # libxml2 quotes the file in some reasons (an xmlns value, the start of a comment never closed).
    reason = conffile.shown(found["reason"])
    return ConfigError(f"{where}: not well-formed XML: {reason}", file=path, line=line, key=None)


def _dtd_refused(path: str, source: bytes) -> ConfigError:
    """jobd.safexml refuses `<!DOCTYPE` and `<!ENTITY` wherever they are in the bytes, before any parsing: in a
    comment or in a script's CDATA too (a script that writes an HTML page). The line says which one it met. A file
    in another encoding (UTF-16) has no such bytes: its DTD is found once parsed, and no line is named."""
    found = [at for at in (source.find(b"<!DOCTYPE"), source.find(b"<!ENTITY")) if at >= 0]
    line = source.count(b"\n", 0, min(found)) + 1 if found else None
    where = conffile.shown(path) if line is None else f"{conffile.shown(path)}:{line}"
    return ConfigError(
        f"{where}: {DTD_REFUSED}: jobd refuses <!DOCTYPE and <!ENTITY anywhere in a workflow "
        "file, in comments and scripts too (write &lt;! in a script's text)",
        file=path,
        line=line,
        key=None,
    )


def workflow_name(path: str) -> str:
    """The workflow name a file name gives (`NAME.xml` → `NAME`); ConfigError if it is not a valid name."""
    file_name = os.path.basename(path)
    name = file_name[: -len(SUFFIX)] if file_name.endswith(SUFFIX) else file_name
    if not file_name.endswith(SUFFIX) or not WORKFLOW_NAME.fullmatch(name):
        raise ConfigError(
            f"{conffile.shown(path)}: invalid workflow file name {_show(file_name)}; allowed: NAME.xml with NAME "
            f"{WORKFLOW_NAME_RULE}",
            file=path,
            line=None,
            key=None,
        )
    return name


def parse_workflow(source: bytes, path: str, config: Config, name: str | None = None) -> WorkflowDef:
    """Validate one workflow document; `config` supplies the queues, tasks and retry schedules it may name.

    `name` defaults to the one `path` gives. Raises ConfigError whose message has one line per problem, each
    starting with `path:line:`; its details are the file and the line of the first problem.
    """
    if name is None:
        name = workflow_name(path)
    elif not WORKFLOW_NAME.fullmatch(name):
        raise ConfigError(
            f"{conffile.shown(path)}: invalid workflow name {_show(name)}; allowed: {WORKFLOW_NAME_RULE}",
            file=path,
            line=None,
            key=None,
        )
    try:
        root = parse(source, what=path)
    except DtdRefused:
        raise _dtd_refused(path, source) from None
    except InvalidXml as error:
        raise _not_well_formed(path, error.message) from None
    checker = _Checker(path, config)
    definition = checker.definition_in(root, name)
    checker.check_document(definition)
    if checker.problems:
        raise ConfigError(
            "\n".join(message for _line, message in checker.problems),
            file=path,
            line=checker.problems[0][0],
            key=None,
        )
    group = comment = ""
    if definition is not root:  # instances, `workflow get` and the rest read the definition alone
        source = etree.tostring(definition, encoding="utf-8", with_tail=False)
        group, comment = root.get("group", ""), root.get("comment", "")
    return WorkflowDef(
        name=name, path=path, source=source, parameters=tuple(checker.parameters), group=group, comment=comment
    )


def load_workflow(path: str | Path, config: Config) -> WorkflowDef:
    """Read and validate `workflows/NAME.xml`; an unreadable or empty file is a ConfigError too."""
    path = str(path)
    source = conffile.read(path)
    if not source.strip():
        raise ConfigError(
            f"{conffile.shown(path)}: the file is empty; to hide a workflow of the same name in a lower-priority "
            "directory, make this file a symlink to /dev/null",
            file=path,
            line=None,
            key=None,
        )
    return parse_workflow(source, path, config)
