"""XPath 1.0's lexical rules (XPath 1.0 §3.7): an expression split into tokens, names and `*` told apart from
operators; and the other way, a number as XPath writes it (§4.2). Shared by the workflows' XPath (jobd.engine.xpath)
and by the evQueue protocol's xpathfilter (jobd.protocol.evqueue), which works on tokens too; it evaluates nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal


class XPathError(ValueError):
    """An expression is invalid, or failed while evaluated (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # literal number name function axis variable operator slash ( ) [ ] , @ . ..
    text: str
    start: int
    end: int


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<literal>"[^"]*"|'[^']*')
  | (?P<number>\d+(?:\.\d*)?|\.\d+)
  | (?P<dotdot>\.\.)
  | (?P<dot>\.)
  | (?P<slash>//?)
  | (?P<punct>::|[()\[\],@|+=*-]|!=|<=|>=|<|>)
  | (?P<variable>\$(?:[^\W\d][\w.\-]*:)?[^\W\d][\w.\-]*)
  | (?P<name>[^\W\d][\w.\-]*(?::(?:[^\W\d][\w.\-]*|\*))?)
    """,
    re.VERBOSE,
)
_OPERATOR_NAMES = frozenset({"and", "or", "mod", "div"})
# XPath's NodeType names: `text()` and the like look like function calls but are node tests (steps).
NODE_TYPES = frozenset({"node", "text", "comment", "processing-instruction"})
# After these, `*` is a name test and an NCName is a name (XPath 1.0 §3.7); after anything else they are operators.
_BEFORE_NAME_TEST = frozenset({"@", "::", "(", "[", ",", "operator", "slash"})


def tokenize(expression: str) -> list[Token]:
    """Split an expression into tokens, classifying names and `*` as XPath 1.0's lexical rules say."""
    tokens: list[Token] = []
    position = 0
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if match is None:
            char = expression[position]
            if char in "\"'":
                raise XPathError(f"unterminated string literal at character {position + 1}")
            raise XPathError(f"unexpected character {char!r} at character {position + 1}")
        position = match.end()
        group = match.lastgroup
        text = match.group()
        if group == "space":
            continue
        assert group is not None
        previous = tokens[-1] if tokens else None
        name_expected = previous is None or previous.kind in _BEFORE_NAME_TEST
        rest = expression[position:].lstrip()
        if group == "punct":
            if text == "*":
                kind = "name" if name_expected else "operator"
            elif text in "|+=-<>" or text in ("!=", "<=", ">="):
                kind = "operator"
            else:
                kind = text
        elif group == "name":
            if not name_expected and text in _OPERATOR_NAMES:
                kind = "operator"
            elif rest.startswith("::"):
                kind = "axis"
            elif rest.startswith("("):
                kind = "function"
            else:
                kind = "name"
        else:
            kind = group
        tokens.append(Token(kind, text, match.start(), match.end()))
    return tokens


def number_string(number: float) -> str:
    """A number as XPath's string() writes it: `NaN`, `Infinity`, `-Infinity`, an integer without a fraction, any
    other number in decimal digits (never with an exponent), as few as tell it apart from its neighbours."""
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    if number == int(number):
        return str(int(number))
    text = format(Decimal(repr(number)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
