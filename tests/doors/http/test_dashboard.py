"""GET / and /static/{name}: the operator's page, open, with strict headers and nothing else served.

The page in a real browser: tests/e2e/test_dashboard.py."""
from __future__ import annotations

import re

import pytest

from agent.doors.http.dashboard import CSP, FILES, STATIC
from tests.doors.http.memory import memory_api  # noqa: F401

STRICT = {
    "Content-Security-Policy": CSP.decode(),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@pytest.mark.parametrize("path, name", [("/", "index.html"), *((f"/static/{n}", n) for n in FILES)])
def test_the_page_and_its_files_are_served_without_a_token_with_strict_headers(memory_api, path, name):
    answer = memory_api.request("GET", path, token=None)
    assert answer.code == 200
    assert answer.body == (STATIC / name).read_bytes()
    assert answer.header("Content-Type") == [FILES[name].decode()]
    for header, value in STRICT.items():
        assert answer.header(header) == [value], header
    assert answer.header("Set-Cookie") is None


def test_the_csp_allows_nothing_from_elsewhere_and_no_inline_script():
    policy = dict(part.strip().split(" ", 1) for part in CSP.decode().split(";"))
    assert policy["script-src"] == "'self'" and "unsafe" not in CSP.decode()
    assert policy["frame-ancestors"] == "'none'" and policy["connect-src"] == "'self'"


def test_the_files_load_nothing_from_elsewhere_and_hold_no_inline_script_or_style():
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']
    assert "style=" not in html and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html)
    for name in FILES:
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    script = (STATIC / "app.js").read_text()
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "document.write" not in script and "eval(" not in script
    assert "localStorage" not in script and "document.cookie" not in script


@pytest.mark.parametrize("path", ["/static/agent.py", "/static/..%2Fapi.py", "/static/%2e%2e",
                                  "/static/", "/static/index.html/x", "/static/App.js",
                                  "/static/.%2F..%2F..%2Fdashboard.py"])
def test_nothing_else_is_served_without_a_token(memory_api, path):
    answer = memory_api.request("GET", path, token=None)
    assert answer.code in (401, 404), (path, answer.code)
    assert b"import" not in answer.body


def test_the_page_is_open_but_the_api_it_calls_is_not(memory_api):
    assert memory_api.request("GET", "/", token=None).code == 200
    assert memory_api.request("GET", "/tasks", token=None).code == 401
    assert memory_api.request("POST", "/", token=None).code == 405
