"""GET / and GET /static/{name}: the operator's web page, served without a token.

The page and its files are package data (agent/doors/http/static), no build step
and nothing fetched from elsewhere. Only the files in FILES are served (no path
from the request ever reaches the file system), each with a strict
Content-Security-Policy: no inline script, no framing, nothing loaded or
called outside the agent. Every call the page makes carries the token itself
(docs/dashboard.md)."""
from __future__ import annotations

from pathlib import Path

from agent.doors.http.errors import NotFound
from agent.doors.http.router import Response

STATIC = Path(__file__).parent / "static"

FILES: dict[str, bytes] = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"application/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
}
"""The only files served, with their Content-Type."""

CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

HEADERS: dict[bytes, bytes] = {
    b"Content-Security-Policy": CSP,
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}


class Dashboard:
    def __init__(self, directory: Path = STATIC):
        self._directory = directory

    def index(self, request) -> Response:
        return self._file("index.html")

    def static(self, request, name: str) -> Response:
        if name not in FILES:  # an allow-list: no traversal, no directory listing
            raise NotFound(f"no such file: /static/{name}")
        return self._file(name)

    def _file(self, name: str) -> Response:
        body = (self._directory / name).read_bytes()  # read each time: small, and never stale
        return Response(200, body, dict(HEADERS), content_type=FILES[name])
