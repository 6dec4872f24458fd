"""The resolution page (``GET /``, ``GET /{identifier}``) of real node processes as ``idis-local``
starts them: HTTPS from the local CA, plain ``requests`` with redirects not followed. Any node's
page resolves through the hierarchy, so the top-level node's page shows what the enterprise
node holds; the enterprise node's own page starts at itself (the test hierarchy has no roots
configured), and resolves what it hosts."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import requests

from nodes.http.page import CONTENT_SECURITY_POLICY
from tests.integration.conftest import Local

SN1_URL = "https://factory-1.example.com/products/SN-0001"


def page(local: Local, path: str, node: str = "enterprise-1", **kwargs: Any) -> requests.Response:
    return local.get(path, node, allow_redirects=False, **kwargs)


def text_of(markup: str) -> str:
    """The visible text of a page, roughly: tags dropped, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", markup).split())


def assert_hardened(response: requests.Response) -> None:
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for directive in ("default-src 'none'", "form-action 'self'", "base-uri 'none'", "frame-ancestors 'none'"):
        assert directive in CONTENT_SECURITY_POLICY
    assert "script-src" not in CONTENT_SECURITY_POLICY  # no script at all: default-src 'none'


def test_home_page_names_the_node_and_its_form_leads_to_the_identifiers_page(local: Local) -> None:
    home = page(local, "/")
    assert home.status_code == 200 and home.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_hardened(home)
    assert "enterprise-1" in home.text and "88.100.1" in home.text and "enterprise" in home.text
    assert '<form class="search" method="get" action="/"' in home.text and 'name="id"' in home.text
    assert "<script" not in home.text and "http://" not in home.text and "https://" not in home.text  # no CDN
    searched = page(local, "/", params={"id": " 88.100.1/SN-0001 ", "noredirect": "on"})
    assert searched.status_code == 302 and searched.headers["Location"] == "/88.100.1/SN-0001?noredirect"
    assert page(local, "/", params={"id": "88.100.1/a b?c"}).headers["Location"] == "/88.100.1/a%20b%3Fc"
    # A dot segment would be rewritten by the browser: the whole identifier is encoded then.
    assert page(local, "/", params={"id": "88.100.1/../x"}).headers["Location"] == "/88.100.1%2F..%2Fx"
    assert page(local, "/favicon.ico").status_code == 404


def test_enterprise_page_redirects_to_the_records_url(local: Local) -> None:
    response = page(local, "/88.100.1/SN-0001")
    assert response.status_code == 302 and response.headers["Location"] == SN1_URL
    assert_hardened(response)
    # Percent-encoded, the same identifier; /api/... stays the REST API.
    assert page(local, "/88.100.1%2FSN-0001").headers["Location"] == SN1_URL
    assert page(local, "/api/handles/88.100.1/SN-0001").json()["responseCode"] == 1


def test_top_level_page_resolves_through_the_hierarchy(local: Local) -> None:
    """The top-level node holds none of 88.100.1: its page follows the referrals down to the
    enterprise node and shows the chain (the only test of this module using this node's page,
    so its resolver starts with an empty cache)."""
    top, secondary, enterprise = (local.grpc(n) for n in ("top-level", "secondary-100", "enterprise-1"))
    shown = page(local, "/88.100.1/SN-0002?noredirect", "top-level")
    assert shown.status_code == 200 and shown.headers["Content-Type"] == "text/html; charset=utf-8"
    assert_hardened(shown)
    text = text_of(shown.text)
    assert "88.100.1/SN-0002" in text and "MOTOR-X200" in text and "2026-11-02" in text
    rows = re.findall(r'<tr class="value"><td>(\d+)</td><td><code>([^<]*)</code>', shown.text)
    assert rows == [("1", "URL"), ("2", "PRODUCT_MODEL"), ("3", "MANUFACTURE_DATE")]
    link = '<a class="data" href="https://factory-1.example.com/products/SN-0002" rel="noopener noreferrer nofollow">'
    assert link in shown.text
    assert "86400 s" in text and "1110" in text and re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text)
    chain = shown.text[shown.text.index("Referral chain") :]
    hops = [(s, html.unescape(o)) for s, o in re.findall(r"<li><code>([^<]*)</code>: ([^<]*)<", chain)]
    assert [server for server, _ in hops] == [top, secondary, enterprise]
    assert hops[0][1].startswith("referral 88.100 -> " + secondary)
    assert hops[1][1].startswith("referral 88.100.1 -> " + enterprise)
    assert hops[2][1].startswith("record v")
    # Without noredirect: to the URL, from the top-level node's page.
    redirected = page(local, "/88.100.1/SN-0002", "top-level")
    assert redirected.status_code == 302
    assert redirected.headers["Location"] == "https://factory-1.example.com/products/SN-0002"
    assert page(local, "/88.100.1/SN-0001", "top-level").headers["Location"] == SN1_URL
    # Asked again: answered from the page's cache, and the chain says so.
    again = page(local, "/88.100.1/SN-0002", "top-level", headers={"Accept": "application/json"}).json()
    assert [hop["server"] for hop in again["trace"]] == ["cache"]
    # Whatever no node of the hierarchy is authoritative for: the servers' failure, 502.
    nowhere = page(local, "/99.1/X", "top-level")
    assert nowhere.status_code == 502 and "Resolution failed" in nowhere.text and top in nowhere.text


def test_json_when_asked_is_the_rest_apis_record_and_the_chain(local: Local) -> None:
    api_values = local.get("/api/handles/88.100.1/SN-0003").json()["values"]
    asks: list[dict[str, Any]] = [{"headers": {"Accept": "application/json"}}, {"params": {"format": "json"}}]
    for kwargs in asks:
        answer = page(local, "/88.100.1/SN-0003", **kwargs)  # a URL value, and still no redirect
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json; charset=utf-8"
        assert_hardened(answer)
        body = answer.json()
        assert body["responseCode"] == 1 and body["handle"] == "88.100.1/SN-0003" and body["values"] == api_values
        assert body["trace"] and {"server", "question", "outcome", "milliseconds"} <= body["trace"][0].keys()
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    for accept in (browser, "*/*", "text/html, application/json;q=0.9"):
        assert page(local, "/88.100.1/SN-0003", headers={"Accept": accept}).status_code == 302, accept
    assert page(local, "/88.100.1/SN-0003", headers={"Accept": "text/html;q=0.5, application/*"}).status_code == 200


def test_not_found_invalid_and_failed_resolutions(local: Local) -> None:
    missing = page(local, "/88.100.1/NOPE")
    assert missing.status_code == 404 and "Not found" in missing.text and "88.100.1/NOPE" in missing.text
    assert_hardened(missing)
    missing_json = page(local, "/88.100.1/NOPE", headers={"Accept": "application/json"})
    assert missing_json.status_code == 404 and missing_json.json() == {"responseCode": 100, "handle": "88.100.1/NOPE"}
    for path in ("/88..1/X", "/88.100.1/%FF", "/no-slash", "/88.100.1/%00", "/88.100.1/" + "x" * 300):
        bad = page(local, path)
        assert bad.status_code == 400 and "Not a valid identifier" in bad.text, path
        assert page(local, path, params={"format": "json"}).json()["responseCode"] == 102, path
    # The enterprise page starts at its node's roots (the top-level node, as under `make run`),
    # so an identifier of another enterprise resolves through the hierarchy.
    elsewhere = page(local, "/88.100.2/PART-0001", params={"format": "json"})
    assert elsewhere.status_code == 200 and elsewhere.json()["handle"] == "88.100.2/PART-0001"
    assert elsewhere.json()["trace"]
    assert local.request("POST", "/88.100.1/SN-0001").status_code == 405


HOSTILE = [
    {"index": 1, "type": "URL", "data": "javascript:alert(document.cookie)"},
    {"index": 2, "type": "<b>NOTE</b>", "data": '<script>alert(1)</script>"><img src=x onerror=alert(2)>'},
    {"index": 3, "type": "SECRET", "data": "private-data-7f3a", "permissions": "1100"},
    {"index": 4, "type": "SEE_ALSO", "data": "the motor", "references": [{"handle": "88.100.1/SN-0001", "index": 1}]},
    {"index": 5, "type": "BLOB", "data": {"format": "base64", "value": "AAEC/w=="}},
    {"index": 6, "type": "URL", "data": "https://example.com/second"},
]


def test_values_are_escaped_private_ones_hidden_and_only_web_urls_followed(local: Local) -> None:
    local.register("88.100.1/XSS-0001", HOSTILE)
    # The value exists (its administrator reads it through the REST API)...
    admin_view = local.get("/api/handles/88.100.1/XSS-0001", auth=local.auth()).json()["values"]
    assert "private-data-7f3a" in json.dumps(admin_view)
    # ...and the page, which resolves anonymously, never shows it.
    for node in ("enterprise-1", "top-level"):
        shown = page(local, "/88.100.1/XSS-0001", node)  # the first URL is javascript: no redirect
        assert shown.status_code == 200, node
        assert "private-data-7f3a" not in shown.text and "SECRET" not in shown.text
        as_json = page(local, "/88.100.1/XSS-0001", node, params={"format": "json"}).json()
        assert [v["index"] for v in as_json["values"]] == [1, 2, 4, 5, 6]
        assert "private-data-7f3a" not in json.dumps(as_json)
    markup = page(local, "/88.100.1/XSS-0001").text
    assert "<script" not in markup and "<img" not in markup and "<b>" not in markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in markup
    assert "<code>&lt;b&gt;NOTE&lt;/b&gt;</code>" in markup
    assert "javascript:alert(document.cookie)" in markup  # shown as text...
    assert not re.search(r"href=\S*javascript", markup, re.IGNORECASE)  # ...never as a link
    assert '<a href="/88.100.1/SN-0001?noredirect">88.100.1/SN-0001</a> (index 1)' in markup
    assert 'base64</span> <span class="data">AAEC/w==</span>' in markup
    assert 'href="https://example.com/second" rel="noopener noreferrer nofollow"' in markup


def test_a_peer_over_its_rate_is_told_when_to_come_back(local: Local) -> None:
    """Every identifier page costs a token of the peer's bucket (20/s, burst 40), valid or not;
    the home page costs nothing. On the secondary node's page, which no other test uses."""
    statuses = []
    with requests.Session() as session:
        for _ in range(120):
            response = session.get(local.base("secondary-100") + "/88..1/X?format=json", verify=local.ca, timeout=30)
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses[:40] == [400] * 40 and statuses[-1] == 429
        assert int(response.headers["Retry-After"]) >= 1 and response.json()["responseCode"] == 3
        assert session.get(local.base("secondary-100") + "/", verify=local.ca, timeout=30).status_code == 200
