"""XPath for workflows: real XPath 1.0 (lxml/libxml2) plus evQueue's evq* functions, with evQueue's context rules.

evQueue writes its functions as path steps (`evqGetParentJob()/evqGetOutput('list')/files/file`). XPath 1.0 cannot
parse that: a function call may start a path but is never a step. `rewrite()` turns every `LEFT/evqF(args)` into
`evq-step:evqF(LEFT, args)`, the same function in a second namespace whose first argument is the explicit left
context (`LEFT//evqF(args)` becomes `evq-step:evqF(LEFT/descendant-or-self::node(), args)`; a leading `/evqF()`
gets `/` as its left context). It works on tokens (XPath 1.0's own lexical rules, §3.7), so strings containing `/`
or parentheses, predicates, `//` and nesting are handled; each pass rewrites the leftmost step and the result is
tokenized again, so `a()/b()/c()` becomes `evq-step:c(evq-step:b(a()))`.

Context rules (evQueue's `register_job_functions`): an expression is evaluated for a job or a task. The *current
job* is that job (a task's own job; in a loop, the clone being decided). The *parent job* is the current job's
parent job, or the `<workflow>` root for a top-level job. Without an explicit left context, evqGetOutput,
evqGetInput, evqGetContext and evqGetParentJob start from the parent job, as in evQueue. With an explicit left
context they start from every element of it (evQueue took the first node and ignored it for evqGetParentJob; jobd
applies them like XPath steps: results of all left elements, in document order). Text, attribute, comment and
processing-instruction nodes on the left give nothing, so `LEFT//evqF()` applies evqF to the elements at or below
LEFT and `@name/evqGetParentJob()` is empty.

Names: as evQueue, an element name test selects elements by their name as written, whatever their namespace
(`as_xpath` makes `NAME` into `*[name() = 'NAME']`), so the elements of a task output in a default namespace are
found as they were on evQueue.

Results: comparisons are real XPath 1.0 (`@size > 10` works). The document node (`/`, or `..` from the root),
which lxml leaves out of node-sets, is put back as the instance's ElementTree (jobd.xpathdocument): `/` is true as a
condition, its string value is the root element's, a copy of it is the root element; no loop can take it as a copy's
context. Where evQueue insisted on nodes (`{xpath}` in
host/user, `<value select>`, custom-attribute `select`) strings, numbers and booleans are accepted too and give
their XPath string value.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from lxml import etree

from jobd.xpathdocument import selects_the_document
from jobd.xpathlex import NODE_TYPES, Token, number_string, tokenize
from jobd.xpathlex import XPathError as XPathError  # raised by the tokenizer too: one error for callers

STEP_NAMESPACE = "urn:jobd:workflow:evq-step"
STEP_PREFIX = "evq-step"
NAMESPACES = {STEP_PREFIX: STEP_NAMESPACE}

# name -> (fewest, most) arguments, not counting the explicit left context of the step form.
EVQ_FUNCTIONS: dict[str, tuple[int, int]] = {
    "evqGetWorkflowParameter": (1, 1),
    "evqGetCurrentJob": (0, 0),
    "evqGetParentJob": (0, 1),
    "evqGetOutput": (1, 1),
    "evqGetInput": (2, 2),
    "evqGetContext": (0, 0),
    "evqGetJob": (1, 1),
    "evqWait": (1, 1),
}
# XPath 1.0's core functions with their (fewest, most) arguments, as the recommendation gives them: libxml2
# compiles a call with another number and refuses it only when it is evaluated, at every run of its node.
_ANY_NUMBER = 1 << 16  # concat() takes two or more
XPATH_FUNCTIONS: dict[str, tuple[int, int]] = {
    "last": (0, 0),
    "position": (0, 0),
    "count": (1, 1),
    "id": (1, 1),
    "local-name": (0, 1),
    "namespace-uri": (0, 1),
    "name": (0, 1),
    "string": (0, 1),
    "concat": (2, _ANY_NUMBER),
    "starts-with": (2, 2),
    "contains": (2, 2),
    "substring-before": (2, 2),
    "substring-after": (2, 2),
    "substring": (2, 3),
    "string-length": (0, 1),
    "normalize-space": (0, 1),
    "translate": (3, 3),
    "boolean": (1, 1),
    "not": (1, 1),
    "true": (0, 0),
    "false": (0, 0),
    "lang": (1, 1),
    "number": (0, 1),
    "sum": (1, 1),
    "floor": (1, 1),
    "ceiling": (1, 1),
    "round": (1, 1),
}
# evQueue's dialect had these (XSLT's current(), XPath 2's min/max/string-join); jobd keeps workflows using them.
COMPAT_FUNCTIONS: dict[str, tuple[int, int]] = {"current": (0, 0), "min": (1, 1), "max": (1, 1), "string-join": (2, 2)}

XPathValue = bool | float | str | list[Any]


class WaitRequested(Exception):
    """evqWait(expr) found expr false: the node must wait and be decided again after the next task end."""


# ----------------------------------------------------------------------------------------------------- rewrite


@functools.lru_cache(maxsize=4096)
def as_xpath(expression: str) -> str:
    """A workflow expression as libxml2 evaluates it: evQueue's step-form calls rewritten, and its element names
    matched as evQueue matches them."""
    return _names_as_evqueue(rewrite(expression))


def rewrite(expression: str) -> str:
    """evQueue's step-form calls (`LEFT/evqF(args)`) made into XPath 1.0 calls with an explicit left context."""
    while True:
        tokens = tokenize(expression)
        step = _first_evq_step(tokens)
        if step is None:
            return expression
        slash_index = step
        call = tokens[slash_index + 1]
        close = _matching(tokens, slash_index + 2)
        left_start = _left_operand_start(tokens, slash_index)
        if left_start == slash_index:  # nothing before the slash: an absolute path
            left = "/" if tokens[slash_index].text == "/" else "/descendant-or-self::node()"
            start = tokens[slash_index].start
        else:
            start = tokens[left_start].start
            left = expression[start : tokens[slash_index].start].strip()
            if tokens[slash_index].text == "//":
                left += "/descendant-or-self::node()"
        arguments = expression[tokens[slash_index + 2].end : tokens[close].start].strip()
        replacement = f"{STEP_PREFIX}:{call.text}({left}{', ' + arguments if arguments else ''})"
        expression = expression[:start] + replacement + expression[tokens[close].end :]


def _names_as_evqueue(expression: str) -> str:
    """Each element name test `NAME` made `*[name() = 'NAME']`: evQueue selects an element by its name as written
    (DOMNode::getNodeName), so `evqGetOutput('feed')/entry` finds the entries of `<feed xmlns="…">`, a task output in
    a default namespace, where XPath 1.0's `entry` selects only elements of no namespace and would find nothing: a
    loop that ran on evQueue would run no copy, silently. For the instance's own elements, of no namespace, both
    mean the same. Attribute names are left as they are (a default namespace does not apply to attributes), and
    prefixed names never reach here (compile_check refuses them: nothing declares a prefix)."""
    tokens = tokenize(expression)
    parts: list[str] = []
    written = 0
    for index, token in enumerate(tokens):
        if token.kind != "name" or token.text == "*" or ":" in token.text or _names_an_attribute(tokens, index):
            continue
        parts += [expression[written : token.start], f"*[name() = '{token.text}']"]
        written = token.end
    return "".join(parts) + expression[written:]


def _names_an_attribute(tokens: Sequence[Token], index: int) -> bool:
    """Whether the name test at `index` is on the attribute (`@`, `attribute::`) or namespace axis."""
    before = tokens[index - 1] if index else None
    if before is not None and before.kind == "@":
        return True
    return before is not None and before.kind == "::" and tokens[index - 2].text in ("attribute", "namespace")


def _first_evq_step(tokens: Sequence[Token]) -> int | None:
    for index in range(len(tokens) - 2):
        token = tokens[index]
        following = tokens[index + 1]
        if token.kind == "slash" and following.kind == "function" and following.text in EVQ_FUNCTIONS:
            return index
    return None


_PARTNER: Final = {"(": ")", "[": "]", ")": "(", "]": "["}


def _matching(tokens: Sequence[Token], at: int) -> int:
    """Index of the bracket that pairs with the one at `at`: the `)` or `]` closing it, or the `(` or `[` opening
    it (looking backwards)."""
    own = tokens[at].kind
    partner = _PARTNER[own]
    step = 1 if own in ("(", "[") else -1
    depth = 0
    for index in range(at, len(tokens) if step == 1 else -1, step):
        kind = tokens[index].kind
        if kind == own:
            depth += 1
        elif kind == partner:
            depth -= 1
            if depth == 0:
                return index
    raise XPathError(f"unbalanced {own!r} at character {tokens[at].start + 1}")


# The tokens a path is made of (xpathlex's kinds: `.` is "dot", `..` is "dotdot").
_PATH_TOKENS = frozenset({"name", "axis", "variable", "@", "::", "dot", "dotdot", "slash"})


def _left_operand_start(tokens: Sequence[Token], slash_index: int) -> int:
    """Index of the first token of the path expression that ends just before tokens[slash_index]."""
    index = slash_index - 1
    start = slash_index
    while index >= 0:
        token = tokens[index]
        if token.kind in (")", "]"):
            index = _matching(tokens, index)
            if token.kind == ")" and index > 0 and tokens[index - 1].kind == "function":
                index -= 1
        elif token.kind not in _PATH_TOKENS:
            break
        start = index
        index -= 1
    return start


# ------------------------------------------------------------------------------------------------ compile check


def compile_check(expression: str, *, summary: bool = False) -> None:
    """Raise ValueError (XPathError) saying why `expression` is not a valid workflow XPath expression.

    `summary`: the expression is a custom attribute's `select` or an automatic tag's `condition`, the only places
    where evQueue (and jobd) define evqGetJob()."""
    if not expression.strip():
        raise XPathError(f"invalid XPath expression {expression!r}: empty")
    try:
        tokens = tokenize(expression)
        for index, token in enumerate(tokens):
            if token.kind in _PARTNER:
                _matching(tokens, index)
            elif token.kind == "function":
                _check_function(tokens, index)
                _check_step(expression, tokens, index)
                if token.text == "evqGetJob" and not summary:  # else its node would be ABORTED at every run
                    raise XPathError(
                        f"evqGetJob() at character {token.start + 1} is only available in custom-attributes and "
                        "automatic-tags (the select of a <custom-attribute>, the condition of an <automatic-tag>)"
                    )
            elif token.kind == "variable":  # nothing defines one: the task would be ABORTED each time it ran
                raise XPathError(f"variable {token.text} is not defined: workflow expressions have no variables")
            elif token.kind == "name" and ":" in token.text:  # the same for a prefix: none is declared
                prefix, local = token.text.split(":", 1)
                hint = "*" if local == "*" else f"*[local-name() = '{local}']"
                raise XPathError(
                    f"namespace prefix {prefix!r} at character {token.start + 1} is not defined: workflow expressions "
                    f"declare no prefixes (select such elements with {hint})"
                )
        _check_operands(tokens)
        etree.XPath(as_xpath(expression), namespaces=NAMESPACES)
    except XPathError as error:
        raise XPathError(f"invalid XPath expression {expression!r}: {error}") from None
    except etree.XPathSyntaxError as error:
        raise XPathError(f"invalid XPath expression {expression!r}: {error}") from None


def _check_operands(tokens: Sequence[Token]) -> None:
    """An operator with nothing on one side, or a path ending in `/`, named where it is: libxml2 says only
    "Invalid expression" for them, which leaves the writer of a long condition to find the typo."""
    for index, token in enumerate(tokens):
        after = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind == "slash" and after is None and (index > 0 or token.text == "//"):
            raise XPathError(f"the path ends with {token.text!r} at character {token.start + 1}: a step must follow")
        if token.kind == "slash" and after is not None and after.kind not in _STEP_STARTS:
            _check_root_alone(tokens, index)
        if token.kind != "operator":
            continue
        if after is None or after.kind in (")", "]", ","):
            raise XPathError(f"the operator {token.text!r} at character {token.start + 1} has nothing after it")
        before = tokens[index - 1] if index else None
        # `-` may also be a sign (`-1`, `a * -b`); XPath has no other prefix operator.
        if token.text != "-" and (before is None or before.kind in ("(", "[", ",", "operator")):
            raise XPathError(f"the operator {token.text!r} at character {token.start + 1} has nothing before it")


# What a path step starts with: a name test (`x`, `*`), an axis, `@`, `.`, `..`, or a node test such as `text()`
# (a function is checked by _check_step).
_STEP_STARTS = frozenset({"name", "axis", "@", "dot", "dotdot", "function"})


def _check_root_alone(tokens: Sequence[Token], index: int) -> None:
    """The `/` at `index` is followed by no step: right only for `/` alone, the root (`/ | x`, `count(/)`)."""
    slash = tokens[index]
    after = tokens[index + 1]
    before = tokens[index - 1] if index else None
    alone = slash.text == "/" and (before is None or before.kind in ("(", "[", ",", "operator"))
    if alone and after.kind in ("operator", ")", "]", ","):
        return
    raise XPathError(
        f"{after.text!r} at character {after.start + 1} cannot follow {slash.text!r}: a path step is a name, *, "
        "@name, axis::name, a node test such as text(), . or .."
    )


def _check_function(tokens: Sequence[Token], index: int) -> None:
    name = tokens[index].text
    if name in NODE_TYPES:
        return
    arity = XPATH_FUNCTIONS.get(name) or EVQ_FUNCTIONS.get(name) or COMPAT_FUNCTIONS.get(name)
    if arity is None:
        raise XPathError(f"unknown function {name}() at character {tokens[index].start + 1}")
    close = _matching(tokens, index + 1)
    count = _argument_count(tokens, index + 1, close)
    fewest, most = arity
    if not fewest <= count <= most:
        expected = (
            str(fewest) if fewest == most else f"{fewest} or more" if most == _ANY_NUMBER else f"{fewest} to {most}"
        )
        raise XPathError(f"{name}() takes {expected} argument(s), {count} given")


# XPath 1.0's functions whose one optional argument defaults to the context node: for `LEFT/f()`, `f(LEFT)` is
# what XPath 1.0 can say (f of LEFT's first node).
_OF_A_NODE = frozenset({"name", "local-name", "namespace-uri", "string", "string-length", "normalize-space", "number"})
# XPath 1.0's functions of the context's position and size, which evQueue's dialect took as steps too
# (XPathFunctions::position and ::last: one number for each node on the left).
_OF_THE_CONTEXT = frozenset({"position", "last"})


def _check_step(expression: str, tokens: Sequence[Token], index: int) -> None:
    """A function used as a path step (`file/name()`), which XPath 1.0 never allows, named with what to write
    instead, where libxml2 says only "Invalid expression". evQueue's dialect took `file/name()` as the name of each
    `file`: several strings, where an XPath 1.0 function gives one, so jobd cannot take it as it is. evQueue's own
    functions (made into XPath 1.0 by `rewrite()`) and the node tests `text()`, `node()`… are steps in both."""
    name = tokens[index].text
    if index == 0 or tokens[index - 1].kind != "slash" or name in EVQ_FUNCTIONS or name in NODE_TYPES:
        return
    slash = index - 1
    left_start = _left_operand_start(tokens, slash)
    close = _matching(tokens, index + 1)
    step = expression[tokens[left_start].start : tokens[close].end]
    left = expression[tokens[left_start].start : tokens[slash].start].strip()
    left = f"{left}{tokens[slash].text}node()" if tokens[slash].text == "//" else left or "/"
    # `X[…]` is what the hints offer for "the nodes of X such that": not after `/` alone, `.` or `..`, which
    # XPath 1.0 gives no predicate.
    filterable = left != "/" and tokens[slash - 1].kind not in ("dot", "dotdot")
    problem = f"{name}() at character {tokens[index].start + 1} is a path step ({step}), which XPath 1.0 does not allow"
    no_arguments = close == index + 2
    if name == "count" and left != "/":
        raise XPathError(f"{problem}: write count({left}) for how many nodes {left} selects")
    if not no_arguments or name not in _OF_A_NODE | _OF_THE_CONTEXT or (name in _OF_THE_CONTEXT and left == "/"):
        raise XPathError(f"{problem}: only evQueue's evq functions may be steps; call {name}() outside the path")
    if name == "position":
        hint = f"write count({left}) for how many nodes {left} selects"
        if filterable:
            hint += f", or {left}[position() = 2] for the second of them"
        raise XPathError(f"{problem}: {hint} (evQueue's {step} was 1, 2, … for its nodes)")
    if name == "last":
        hint = f"write count({left}) for how many nodes {left} selects"
        if filterable:
            hint += f", or {left}[last()] for the last of them"
        raise XPathError(f"{problem}: {hint} (evQueue's {step} was that number, for each node)")
    hint = f"write {name}({left}) for the {name} of its first node"
    if filterable:
        hint += f", or {left}[{name}() = '…'] for the nodes whose {name} is '…'"
    if name == "name":
        hint += f" (evQueue's {step} was the name of each node)"
    raise XPathError(f"{problem}: {hint}")


def _argument_count(tokens: Sequence[Token], open_index: int, close_index: int) -> int:
    if close_index == open_index + 1:
        return 0
    count = 1
    depth = 0
    for token in tokens[open_index + 1 : close_index]:
        if token.kind in ("(", "["):
            depth += 1
        elif token.kind in (")", "]"):
            depth -= 1
        elif token.kind == "," and depth == 0:
            count += 1
    return count


# --------------------------------------------------------------------------------------------- evaluation context


@dataclass(frozen=True, slots=True)
class EvalContext:
    """What the evq* functions see: the instance, the job the expression is evaluated for, and what is allowed."""

    root: etree._Element  # the instance's <workflow>
    current_job: etree._Element  # evqGetCurrentJob()
    parent_job: etree._Element  # where evqGetParentJob/evqGetOutput/evqGetInput/evqGetContext start by default
    summary: bool = False  # custom attributes and automatic tags: evqGetJob() is available
    # The element numbered evqid, for evqGetContext(): the instance's index (Instance._find). Without one, a walk
    # over the document at each call, which a loop of n items calling evqGetContext() made n² (the daemon froze).
    find: Callable[[int], etree._Element | None] | None = None

    @classmethod
    def for_node(
        cls,
        node: etree._Element,
        root: etree._Element,
        find: Callable[[int], etree._Element | None] | None = None,
    ) -> EvalContext:
        """Context for a condition, loop or value of `node` (a <job> or a <task>), as evQueue registers it."""
        job = job_of(node)
        return cls(root=root, current_job=job, parent_job=parent_job_of(job), find=find)

    @classmethod
    def for_summary(
        cls, root: etree._Element, find: Callable[[int], etree._Element | None] | None = None
    ) -> EvalContext:
        return cls(root=root, current_job=root, parent_job=root, summary=True, find=find)

    def node_by_evqid(self, evqid: str) -> etree._Element | None:
        try:
            number = int(evqid)
        except ValueError:  # no node is numbered so
            return None
        if self.find is not None:
            return self.find(number)
        return next((element for element in _numbered(self.root) if element.get("evqid") == str(number)), None)


def job_of(node: etree._Element) -> etree._Element:
    """The <job> a node belongs to (a task's job; a job itself); the <workflow> root outside any job."""
    current: etree._Element | None = node
    while current is not None:
        if current.tag in ("job", "workflow"):
            return current
        current = current.getparent()
    return node


def _jobs_under(element: etree._Element) -> Iterator[etree._Element]:
    """The instance's jobs below `element`, in document order: its subjobs, theirs, and so on. Not a `<job>` that
    a task's XML output or an input copied into the document holds (evqGetJob saw those too)."""
    for job in element.iterfind("subjobs/job"):
        yield job
        yield from _jobs_under(job)


def parent_job_of(job: etree._Element) -> etree._Element:
    """The job above a job (`job/../..`), or the <workflow> root for a top-level job; the root is its own parent."""
    subjobs = job.getparent()
    above = subjobs.getparent() if subjobs is not None else None
    return above if above is not None else job


# ------------------------------------------------------------------------------------------------------ results


def string_value(value: XPathValue) -> str:
    """XPath's string(): of a node-set its first node, of a number XPath's spelling, of a boolean true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number_string(value)
    if isinstance(value, str):
        return str(value)
    if not value:
        return ""
    return node_string(value[0])


def node_string(node: Any) -> str:
    if isinstance(node, etree._ElementTree):  # the document node: its text is all in its root element
        node = node.getroot()
    if isinstance(node, etree._Element):
        return "".join(str(text) for text in node.itertext())
    return str(node)


def boolean_value(value: XPathValue) -> bool:
    if isinstance(value, float):
        return not (value == 0 or math.isnan(value))
    return bool(value)


def number_value(value: XPathValue) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, float):
        return value
    try:
        return float(string_value(value).strip())
    except ValueError:
        return math.nan


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate(expression: str, node: etree._Element, context: EvalContext) -> XPathValue:
    """Evaluate with `node` as context node; XPathError says what went wrong; WaitRequested from evqWait()."""
    xpath = as_xpath(expression)
    extensions = _extensions(context, node)

    def evaluated(text: str) -> Any:
        return node.xpath(text, namespaces=NAMESPACES, extensions=extensions)

    try:
        result = evaluated(xpath)
        if selects_the_document(xpath, result, evaluated):  # lxml left it out: `/` was false as a condition
            result = [node.getroottree(), *result]  # the document node, first in document order
    except (WaitRequested, XPathError):
        raise
    except etree.XPathError as error:
        raise XPathError(f"XPath expression error in '{expression}': {error}") from None
    except (ValueError, TypeError, ArithmeticError) as error:  # what an evq function raised about its arguments
        raise XPathError(f"XPath expression error in '{expression}': {error}") from None
    if isinstance(result, int) and not isinstance(result, bool):
        return float(result)
    if isinstance(result, (bool, float, str, list)):
        return result
    raise XPathError(f"XPath expression '{expression}' gave an unexpected result")


def evaluate_boolean(expression: str, node: etree._Element, context: EvalContext) -> bool:
    return boolean_value(evaluate(expression, node, context))


def evaluate_nodes(expression: str, node: etree._Element, context: EvalContext) -> list[Any]:
    """A node-set (loops, <copy select>): anything else is an error, as a loop over a number means nothing."""
    result = evaluate(expression, node, context)
    if not isinstance(result, list):
        raise XPathError(f"XPath expression '{expression}' does not select nodes")
    return result


def evaluate_string(expression: str, node: etree._Element, context: EvalContext) -> str:
    """`<value select>`: the string value of the first node, or of a string/number/boolean result."""
    return string_value(evaluate(expression, node, context))


def evaluate_strings(expression: str, node: etree._Element, context: EvalContext) -> list[str]:
    """Custom attributes: the text of every selected node, or the one string value of a scalar result."""
    result = evaluate(expression, node, context)
    if isinstance(result, list):
        return [node_string(item) for item in result]
    return [string_value(result)]


_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(template: str, node: etree._Element, context: EvalContext) -> str:
    """`host="{xpath}"`: each {…} replaced by the string value of its result."""
    return _BRACES.sub(lambda match: evaluate_string(match.group(1), node, context), template)


# ------------------------------------------------------------------------------------------------ evq functions

Extension = Callable[..., Any]


def _extensions(context: EvalContext, start: etree._Element) -> dict[tuple[str | None, str], Extension]:
    """The functions of one evaluation, bound to its context (lxml calls each with its own context first)."""

    def implicit(function: Callable[..., Any]) -> Extension:
        return lambda _lxml, *args: function(None, *args)

    def explicit(function: Callable[..., Any]) -> Extension:
        return lambda _lxml, left, *args: function(_elements_of(left), *args)

    def starts(left: list[etree._Element] | None) -> list[etree._Element]:
        return [context.parent_job] if left is None else left

    def get_workflow_parameter(_left: Any, name: Any = None, *extra: Any) -> str:
        _arity("evqGetWorkflowParameter", 1, name, extra)
        for parameter in context.root.iterfind("parameters/parameter"):
            if parameter.get("name") == _as_string(name):
                return "".join(str(text) for text in parameter.itertext())
        return ""

    def get_current_job(left: list[etree._Element] | None, *extra: Any) -> list[etree._Element]:
        _arity("evqGetCurrentJob", 0, None, extra, none_expected=True)
        return [context.current_job] if left is None else _unique(job_of(item) for item in left)

    def get_parent_job(left: list[etree._Element] | None, which: Any = None, *extra: Any) -> list[etree._Element]:
        if extra:
            raise XPathError("evqGetParentJob() takes 0 or 1 argument")
        firsts = [context.parent_job] if left is None else [parent_job_of(job_of(item)) for item in left]
        return _unique(_walk_up(first, which) for first in firsts)

    def get_output(left: list[etree._Element] | None, task: Any = None, *extra: Any) -> list[etree._Element]:
        _arity("evqGetOutput", 1, task, extra)
        name = _as_string(task)
        found: list[etree._Element] = []
        for job in starts(left):
            for element in job.iterfind("tasks/task"):
                if element.get("path") == name or element.get("name") == name:
                    found.extend(element.iterfind("output"))
        return found

    def get_input(left: list[etree._Element] | None, task: Any = None, name: Any = None, *extra: Any) -> list[Any]:
        if task is None or name is None or extra:
            raise XPathError("evqGetInput() takes 2 arguments")
        path, input_name = _as_string(task), _as_string(name)
        found: list[etree._Element] = []
        for job in starts(left):
            for element in job.iterfind("tasks/task"):
                if element.get("path") == path:  # evQueue matches the path only, never the name
                    found.extend(item for item in element.iterfind("input") if item.get("name") == input_name)
        return found

    def get_context(left: list[etree._Element] | None, *extra: Any) -> list[etree._Element]:
        _arity("evqGetContext", 0, None, extra, none_expected=True)
        found = []
        for item in starts(left):
            wanted = item.get("context-id")
            target = context.node_by_evqid(wanted) if wanted is not None else None
            if target is not None:
                found.append(target)
        return _unique(found)

    def get_job(_left: Any, name: Any = None, *extra: Any) -> list[etree._Element]:
        _arity("evqGetJob", 1, name, extra)
        if not context.summary:
            raise XPathError("evqGetJob() is only available in custom-attributes and automatic-tags")
        wanted = _as_string(name)
        return [job for job in _jobs_under(context.root) if job.get("name") == wanted]

    def wait(_left: Any, condition: Any = None, *extra: Any) -> bool:
        _arity("evqWait", 1, condition, extra)
        if boolean_value(condition):
            return True
        raise WaitRequested()

    functions: dict[str, Callable[..., Any]] = {
        "evqGetWorkflowParameter": get_workflow_parameter,
        "evqGetCurrentJob": get_current_job,
        "evqGetParentJob": get_parent_job,
        "evqGetOutput": get_output,
        "evqGetInput": get_input,
        "evqGetContext": get_context,
        "evqGetJob": get_job,
        "evqWait": wait,
    }
    extensions: dict[tuple[str | None, str], Extension] = {}
    for name, function in functions.items():
        extensions[(None, name)] = implicit(function)
        extensions[(STEP_NAMESPACE, name)] = explicit(function)
    extensions[(None, "current")] = lambda _lxml: [start]
    extensions[(None, "min")] = lambda _lxml, nodes: _extreme(min, nodes)
    extensions[(None, "max")] = lambda _lxml, nodes: _extreme(max, nodes)
    extensions[(None, "string-join")] = lambda _lxml, nodes, separator: _as_string(separator).join(
        node_string(n) for n in _nodes(nodes)
    )
    return extensions


def _extreme(pick: Callable[[list[float]], float], nodes: Any) -> float | list[Any]:
    """evQueue's min() and max(): the smallest or largest number value of the nodes; of no nodes, nothing (an empty
    node-set, as evQueue gave: the empty string as a value, NaN as a number, false as a condition)."""
    numbers = [number_value([node]) for node in _nodes(nodes)]
    return pick(numbers) if numbers else []


def _nodes(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise XPathError("the left side of an evq function step must select nodes")
    return value


def _elements_of(value: Any) -> list[etree._Element]:
    """The element nodes of a step's left side. Text, attribute, comment, processing-instruction and namespace
    nodes are passed over, as a child:: step passes over them: `LEFT//evqF()` is rewritten with
    descendant-or-self::node(), which holds the text nodes too, and `@name/evqGetParentJob()` would otherwise
    reach lxml's string results, which have no element methods (an AttributeError ended the whole instance)."""
    return [node for node in _nodes(value) if isinstance(node, etree._Element) and isinstance(node.tag, str)]


def _as_string(value: Any) -> str:
    return string_value(value) if isinstance(value, (bool, float, str, list)) else str(value)


def _arity(name: str, count: int, first: Any, extra: Sequence[Any], *, none_expected: bool = False) -> None:
    if extra or (first is None and not none_expected):
        raise XPathError(f"{name}() takes {count} argument(s)")


def _walk_up(job: etree._Element, which: Any) -> etree._Element:
    """evqGetParentJob(n) climbs n more jobs; evqGetParentJob('name') climbs to the nearest job with that name."""
    if which is None:
        return job
    if isinstance(which, float):
        if not math.isfinite(which):  # `1 div 0`, or a parameter of 400 digits, is infinite
            raise XPathError(f"evqGetParentJob(): {string_value(which)} is not a number of jobs to climb")
        for _ in range(int(which)):
            above = parent_job_of(job)
            if above is job:
                raise XPathError("evqGetParentJob(): not enough parents")
            job = above
        return job
    name = _as_string(which)
    while job.get("name") != name:
        above = parent_job_of(job)
        if above is job:
            raise XPathError(f"evqGetParentJob(): could not find job '{name}' in parents")
        job = above
    return job


def _unique(nodes: Iterable[etree._Element]) -> list[etree._Element]:
    seen: set[int] = set()
    result = []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            result.append(node)
    return result


def _numbered(root: etree._Element) -> Iterator[etree._Element]:
    return (element for element in root.iter() if isinstance(element.tag, str) and "evqid" in element.attrib)
