"""The docs stay true to the tree: README.md is a short landing page, and every
relative link in it and in docs/ leads to a file, and to a heading, that exist.

Anchors follow GitHub's rules: a heading's slug is its text, lower-cased, with
markup and punctuation other than '-' and '_' dropped and each space made a
'-'; a repeated slug gets '-1', '-2', ... An explicit <a id="..."> (or name=)
is an anchor too. Headings inside fenced code blocks are not headings.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250

INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HTML_HREF = re.compile(r"<a\s[^>]*href=\"([^\"]+)\"", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '# agent' in a shell example is no heading)."""
    lines, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            marker = m.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            lines.append(line)
    return lines


def _without_code_spans(line: str) -> str:
    return CODE_SPAN.sub(" ", line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)  # `code` keeps its text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](url) keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags go
    text = text.strip().lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in "-_" or category[0] in "LN" or category == "Mn":
            kept.append(ch)
        elif ch == " ":
            kept.append("-")
    return "".join(kept)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        m = ATX_HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def relative_links(page: Path) -> list[str]:
    links = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        prose = _without_code_spans(line)
        links += INLINE_LINK.findall(prose) + HTML_HREF.findall(prose)
    text = "\n".join(_prose_lines(page.read_text(encoding="utf-8")))
    links += REFERENCE_DEF.findall(text)
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE)]


def test_the_readme_is_a_landing_page_under_250_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference into docs/"


def test_the_reference_is_in_docs():
    names = {page.name for page in DOCS}
    for expected in ("README.md", "tcp-protocol.md", "http-api.md", "history.md", "guarantees.md",
                     "operations.md", "benchmarks.md", "testing.md"):
        assert expected in names


def test_the_slugs_follow_githubs_rules():
    assert github_slug("The TCP task protocol") == "the-tcp-task-protocol"
    assert github_slug("History, durability and retention") == "history-durability-and-retention"
    assert github_slug("Retries: a known `id` and an `Idempotency-Key`") == "retries-a-known-id-and-an-idempotency-key"
    assert github_slug("Examples (real output)") == "examples-real-output"
    assert github_slug("agent-scheduler, the client") == "agent-scheduler-the-client"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for link in relative_links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / unquote(target)).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no file {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
            continue
        if anchor and path.suffix == ".md" and unquote(anchor) not in anchors(path):
            broken.append(f"{link}: no heading with that anchor in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


REPO_PATH = re.compile(r"`((?:agent|tests|bench|examples|docs|twisted)/[^`\s]*)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_the_prose_names_exists(page):
    """Code moves; a path in the docs that no longer exists misleads the next reader."""
    missing = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        for name in REPO_PATH.findall(line):
            if not any(REPO.glob(name.rstrip("/"))):
                missing.append(name)
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", ["guarantees.md", "fleet.md"])
def test_every_test_the_guarantees_name_exists(page):
    """A promise is only as good as the test it cites."""
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    defined = set()
    for source in (REPO / "tests").rglob("*.py"):
        defined.update(re.findall(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", source.read_text(encoding="utf-8"),
                                  re.MULTILINE))
    cited = set(re.findall(r"`(test_\w+|\w+Tests)`", text)) | set(re.findall(r"`(\w+Tests)` in", text))
    assert cited, f"{page} cites no test"
    assert not sorted(cited - defined), f"{page} cites tests that do not exist: {sorted(cited - defined)}"


def test_the_http_example_that_prints_the_readme_still_matches_it():
    """docs/http-api.md shows `cat README.md | head -3`; that output is real only while the README opens so."""
    example = (REPO / "docs" / "http-api.md").read_text(encoding="utf-8")
    shown = example.split("localhost:8080/run | head -3\n", 1)[1].splitlines()[:3]
    assert shown == README.read_text(encoding="utf-8").splitlines()[:3]
