"""XPath's document node (`/`, the root), which lxml leaves out of the node-sets it returns.

An expression that selects the document node (`/`, `/.`, `..` from the root element, `ancestor::node()`) comes back
from lxml without it: `/` as empty as an expression that selects nothing (false as a condition), `/ | x` as x.
Both users of XPath in jobd ask the expression again whether it did: the evQueue protocol's xpathfilter
(jobd.protocol.evqueue) and the workflows' expressions (jobd.engine.xpath), each through its own evaluation (its
context node, functions and limits); this module evaluates nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable

from jobd.xpathlex import XPathError, tokenize

# The steps that climb from an element: to its parent, or to any ancestor, the document being the last of them.
_UP_AXES = frozenset({"parent", "ancestor", "ancestor-or-self"})
# After these (or at the very start) a `/` begins an absolute path, which starts from the document node.
_PATH_STARTS_AFTER = frozenset({"(", "[", ",", "operator"})


def may_select_the_document(expression: str) -> bool:
    """Whether `expression`, evaluated from an element, can select the document node: only an absolute path (`/`,
    `/.`, `/descendant-or-self::node()`) or a step up (`..`, `parent::`, `ancestor::`, `ancestor-or-self::`) reaches
    it. Every other step goes down or sideways from an element, and every function (XPath's, evQueue's and jobd's)
    gives elements or values, so such an expression is not asked twice."""
    try:
        tokens = tokenize(expression)
    except XPathError:  # what libxml2 took and these rules do not: it is asked, as any expression that may
        return True
    for index, token in enumerate(tokens):
        if token.kind == "dotdot" or (token.kind == "axis" and token.text in _UP_AXES):
            return True
        if token.kind == "slash" and (index == 0 or tokens[index - 1].kind in _PATH_STARTS_AFTER):
            return True
    return False


def selects_the_document(expression: str, result: object, evaluate: Callable[[str], object]) -> bool:
    """Whether `expression`, which lxml answered with `result`, selected the document node that a node-set from lxml
    never holds. `evaluate` evaluates another expression as `expression` was (same context node, functions,
    deadline): it is asked whether the node-set has the one node without a parent, the document."""
    if not isinstance(result, list) or not may_select_the_document(expression):
        return False
    return evaluate(f"boolean(({expression})[not(..)])") is True
