"""jobd.redact on its own: the cases of a URL, an error message and a request that the daemon tests (test_http_tasks,
test_callbacks) do not reach, each of which a change to redact.py let pass unnoticed."""

from __future__ import annotations

from jobd import redact

# A netloc urlsplit refuses (U+2100 is "a/c" under NFKC) but an error message may still quote.
REFUSED_BY_URLSPLIT = "http://u:s3cret@a\u2100b.invalid/x"


def test_the_userinfo_is_masked_up_to_the_last_at() -> None:
    # A password with a raw "@" in it: masked up to the "@" that ends the userinfo, not the first one.
    assert redact.url("http://u:p@ss@host:8/x?a=1") == "http://***@host:8/x?a=1"


def test_a_url_urlsplit_refuses_is_shown_as_the_mask_alone() -> None:
    assert redact.url(REFUSED_BY_URLSPLIT) == "***"


def test_an_error_quoting_the_netloc_of_a_url_urlsplit_refuses_shows_no_userinfo() -> None:
    message = f"InvalidURL: {REFUSED_BY_URLSPLIT}; netloc u:s3cret@a\u2100b.invalid contains invalid characters"
    assert redact.error(message, REFUSED_BY_URLSPLIT) == (
        "InvalidURL: ***; netloc ***@a\u2100b.invalid contains invalid characters"
    )


def test_an_empty_userinfo_leaves_the_other_ats_of_an_error_alone() -> None:
    assert redact.error("failed at http://@host/ for a@b", "http://@host/") == "failed at http://***@host/ for a@b"


def test_a_query_parameter_is_known_by_its_decoded_name() -> None:
    assert redact.url("http://h/?api%5Fkey=k&to+ken=t&page=2") == "http://h/?api%5Fkey=***&to+ken=t&page=2"
    assert redact.url("http://h/?access+token=t") == "http://h/?access+token=***"


def test_a_request_shows_its_scheme_words_its_plain_values_and_its_body_by_its_size_in_bytes() -> None:
    shown = redact.http_request(
        {
            "method": "POST",
            "url": "http://h/",
            "headers": {"Proxy-Authorization": "Basic abc", "X-Session-Id": "z", "Cookie": "a b", "Accept": "a"},
            "params": {"sig": "1", "Sig2": "2", "page": "2"},
            "body": "h\u00e9llo",
        }
    )
    assert shown["headers"] == {
        "Proxy-Authorization": "Basic ***",
        "X-Session-Id": "***",
        "Cookie": "***",
        "Accept": "a",
    }
    assert shown["params"] == {"sig": "***", "Sig2": "2", "page": "2"}  # "sig" is secret alone, not inside a name
    assert shown["body_bytes"] == 6  # é is two bytes in UTF-8
