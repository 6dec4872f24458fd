"""The resolution page's pure parts: which URLs may be followed or linked, the path of an
identifier, content negotiation, where resolutions start."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import unquote

import pytest
from aiohttp.test_utils import make_mocked_request

from nodes.config import NodeConfig, RecursionSection
from nodes.http.page import CONTENT_SECURITY_POLICY, STYLE, identifier_path, page_roots, safe_url, wants_json


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://example.com/a?b=c#d", "https://example.com/a?b=c#d"),
        ("HTTP://EXAMPLE.com", "HTTP://EXAMPLE.com"),
        ("https://example.com/été", "https://example.com/%C3%A9t%C3%A9"),
        ("https://example.com/%20x", "https://example.com/%20x"),
        ("javascript:alert(1)", None),
        ("JaVaScRiPt:alert(1)", None),
        ("data:text/html,<script>alert(1)</script>", None),
        ("//example.com/x", None),
        ("/relative", None),
        ("https:///no-host", None),
        ("https://[::1", None),
        ("https://example.com/a b", None),
        (" https://example.com", None),
        ("https://example.com/\r\nSet-Cookie: x=1", None),
        ("https://example.com/\x85", None),
        ("https://example.com/" + "x" * 9000, None),
        ("", None),
    ],
)
def test_only_absolute_web_urls_are_followed_or_linked(text: str, expected: str | None) -> None:
    assert safe_url(text) == expected


@pytest.mark.parametrize(
    ("identifier", "path"),
    [
        ("88.100.1/SN-0001", "/88.100.1/SN-0001"),
        ("88.100.1/a/b c?d#e%f", "/88.100.1/a/b%20c%3Fd%23e%25f"),
        ("88.100.1/../x", "/88.100.1%2F..%2Fx"),
        ("88.100.1/./x", "/88.100.1%2F.%2Fx"),
        ("88.100.1/..x", "/88.100.1/..x"),
        ("88.100.1/ü", "/88.100.1/%C3%BC"),
    ],
)
def test_identifier_paths_decode_back_and_survive_browsers(identifier: str, path: str) -> None:
    assert identifier_path(identifier) == path
    assert unquote(path[1:]) == identifier


@pytest.mark.parametrize(
    ("target", "accept", "json"),
    [
        ("/x/y", "application/json", True),
        ("/x/y", "", False),
        ("/x/y", "*/*", False),
        ("/x/y", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
        ("/x/y", "text/html;q=0.5, application/json", True),
        ("/x/y", "text/html, application/json;q=0.9", False),
        ("/x/y", "application/*, text/html;q=0.1", True),
        ("/x/y", "application/json;q=nan, text/html;q=0", False),
        ("/x/y", "application/json;q=oops", False),
        ("/x/y?format=json", "text/html", True),
        ("/x/y?format=html", "application/json", False),
    ],
)
def test_json_only_when_preferred_or_asked(target: str, accept: str, json: bool) -> None:
    request = make_mocked_request("GET", target, headers={"Accept": accept} if accept else {})
    assert wants_json(request) is json


def test_resolutions_start_at_the_configured_roots_else_at_the_node() -> None:
    config = NodeConfig()
    assert page_roots(config, "127.0.0.1:7001") == ["127.0.0.1:7001"]
    assert page_roots(config, "0.0.0.0:7001") == ["127.0.0.1:7001"]
    assert page_roots(config, "[::]:7001") == ["[::1]:7001"]
    recursive = NodeConfig(recursion=RecursionSection(roots=["10.0.0.1:2641"]))
    assert page_roots(recursive, "127.0.0.1:7001") == ["10.0.0.1:2641"]


def test_the_policy_allows_the_page_style_sheet_and_nothing_else() -> None:
    digest = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives == {
        "default-src": "'none'",
        "style-src": f"'sha256-{digest}'",
        "form-action": "'self'",
        "base-uri": "'none'",
        "frame-ancestors": "'none'",
    }
    assert "<" not in STYLE and "url(" not in STYLE  # nothing that could load anything or end the element
