"""The one way jobd parses XML: lxml with everything that reaches beyond the document switched off.

Workflow files, evQueue protocol requests and the XML output of workflow tasks all come through here. A document
may not carry a DTD: no entity is ever defined, so none is expanded (billion laughs, quadratic blowup) and none is
fetched (external entities naming file:// or http:// URLs); the network is off and libxml2's size limits stay on.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

from jobd.errors import InvalidXml

DTD_REFUSED = "DTDs and entity declarations are not allowed"


class DtdRefused(InvalidXml):
    """A document carried a DTD (`<!DOCTYPE …>`, `<!ENTITY …>`): it may be well-formed, jobd still does not read it."""


def parser_options() -> dict[str, Any]:
    """Keyword arguments for an lxml parser (XMLParser, XMLPullParser) that never leaves the document."""
    return {
        "resolve_entities": False,
        "load_dtd": False,
        "dtd_validation": False,
        "no_network": True,
        "huge_tree": False,
        "remove_blank_text": False,
    }


_PARSER = etree.XMLParser(**parser_options())


def refuse_dtd(tree: etree._ElementTree) -> None:
    """Raise InvalidXml if a parsed document had a DOCTYPE (the parser never acted on it, but nobody should)."""
    info = tree.docinfo
    system_url = info.system_url  # type: ignore[attr-defined]  # lxml's name; its type stubs say system_id
    if info.internalDTD is not None or info.externalDTD is not None or info.public_id or system_url:
        raise DtdRefused(DTD_REFUSED)


def parse(data: bytes, what: str = "document") -> etree._Element:
    """Parse a whole document; InvalidXml names `what`, the line and libxml2's reason."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        # Refused before parsing at all: even an unexpanded internal subset is work an attacker chose.
        raise DtdRefused(f"{what}: {DTD_REFUSED}")
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as error:
        raise InvalidXml(f"{what} is not well-formed XML: {_reason(error)}") from None
    if root is None:  # lxml returns None for a document made only of whitespace with recover off
        raise InvalidXml(f"{what} is empty")
    refuse_dtd(root.getroottree())
    return root


def _reason(error: etree.XMLSyntaxError) -> str:
    # One line, as every reason jobd gives: libxml2 ends some messages with a newline, after which lxml appends
    # ", line N, column M" (an invalid character), and quotes the document across lines in others (a comment never
    # closed). A newline inside would start what reads as another message in the log.
    message = " ".join(str(error.msg or error).replace("\n,", ",").split())
    line = error.lineno
    return f"line {line}: {message}" if line and f"line {line}" not in message else message
