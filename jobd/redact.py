"""What clients see of an HTTP request jobd makes (an HTTP job's `http`): everything but its secrets.

A job's JSON goes to anyone who may read the job, to event listeners and to callback targets, while the request
may carry credentials its submitter did not mean to share: so the values of credential-like headers, URL query
parameters and params are replaced by "***" (an Authorization-like header keeps its scheme word, "Bearer ***"), the
userinfo of the URL is replaced whole, and the body is shown only by its size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"
# Header and parameter names whose values are secrets: these exactly, or any name containing one of the words.
_SECRET_NAMES = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "key", "sig"})
_SECRET_WORDS = ("auth", "token", "secret", "passw", "pwd", "api-key", "api_key", "apikey", "session", "signature")
_SCHEME_HEADERS = frozenset({"authorization", "proxy-authorization"})


def is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(word in lowered for word in _SECRET_WORDS)


def http_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The stored (normalised, jobd.engine.http_task.check_request) request, as job JSON shows it."""
    body = request.get("body")
    return {
        "method": request.get("method"),
        "url": url(str(request.get("url", ""))),
        "headers": {name: _header(name, value) for name, value in dict(request.get("headers") or {}).items()},
        "params": {
            name: MASK if is_secret(name) else value for name, value in dict(request.get("params") or {}).items()
        },
        "body_bytes": None if body is None else len(str(body).encode()),
        "timeout": request.get("timeout"),
        "expect_status": request.get("expect_status"),
    }


def url(text: str) -> str:
    """The URL without its userinfo (user and password alike: a user name is often a token) and with the values
    of credential-like query parameters masked; the rest exactly as given."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return MASK  # not a URL jobd would have accepted; show nothing of it
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = "&".join(_query_field(field) for field in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def error(text: str, *urls: str) -> str:
    """An error message about a request to `urls`, with each of them shown as url() shows it and its userinfo
    masked wherever else it appears: aiohttp quotes the whole URL when it refuses one (InvalidURL), and Python's
    urlsplit the netloc ('user:password@host')."""
    for whole in urls:
        text = text.replace(whole, url(whole))
        # Found by hand: urlsplit refuses some URLs (a netloc bad under NFKC) whose netloc a message still quotes.
        netloc = re.split(r"[/?#]", whole.partition("://")[2], maxsplit=1)[0]
        userinfo = netloc.rpartition("@")[0]
        if userinfo:  # not for "http://@host/": every "@" of the text would become "***@"
            text = text.replace(userinfo + "@", MASK + "@")
    return text


def _query_field(field: str) -> str:
    """One `name=value` of a query string: its value masked if the name is credential-like, else as written
    (decoding and encoding it again would change how it is spelled)."""
    name, equals, _ = field.partition("=")
    return f"{name}={MASK}" if equals and is_secret(unquote_plus(name)) else field


def _header(name: str, value: str) -> str:
    if not is_secret(name):
        return value
    scheme, space, _ = value.partition(" ")
    return f"{scheme} {MASK}" if space and name.lower() in _SCHEME_HEADERS else MASK
