"""`_redirects` and `_headers`, parsed at upload (problems in the build log), applied when serving."""

from __future__ import annotations

import pytest

from deployhub.manifest import is_hashed
from deployhub.rules import parse_headers, parse_redirects
from tests.support.sites import Publisher

REDIRECTS = """\
# comments and blank lines are fine

/old            /new            301
/blog/:year/:slug  /posts/:year-:slug  302
/docs/*         /guide/:splat
/app/*          /app/index.html 200
/gone           /missing.html   404
/about          /elsewhere.html 302
/shadow         /elsewhere.html 302!
/broken
/x  /y  200  Country=us
/z  https://proxy.example/      200
"""
HEADERS = """\
/*
  X-Site: everywhere
/assets/*
  Cache-Control: public, max-age=60
  Content-Length: 5
  not a header
/app/*
  X-Frame-Options: DENY
"""
FILES = {
    "_redirects": REDIRECTS, "_headers": HEADERS, "index.html": "home", "about.html": "about",
    "shadow.html": "shadow", "elsewhere.html": "elsewhere", "app/index.html": "app shell",
    "404.html": "not here", "missing.html": "missing", "assets/a.css": "a {}",
}


async def test_redirects_with_splats_placeholders_and_rewrites(site_service: Publisher) -> None:
    await site_service.publish("rules", FILES)
    status, headers, _ = await site_service.get("rules", "/old?x=1")
    assert status == 301 and headers["Location"] == "/new?x=1"
    status, headers, _ = await site_service.get("rules", "/blog/2024/hello")
    assert status == 302 and headers["Location"] == "/posts/2024-hello"
    assert (await site_service.get("rules", "/docs/a/b"))[1]["Location"] == "/guide/a/b"
    status, _, body = await site_service.get("rules", "/app/settings/profile")
    assert (status, body) == (200, b"app shell")
    status, _, body = await site_service.get("rules", "/gone")
    assert (status, body) == (404, b"missing")
    # A file shadows a rule unless the rule is forced with `!`.
    assert (await site_service.get("rules", "/about"))[2] == b"about"
    assert (await site_service.get("rules", "/shadow"))[1]["Location"] == "/elsewhere.html"
    assert (await site_service.get("rules", "/_redirects"))[2] == b"not here"  # never served


async def test_headers_per_path_pattern(site_service: Publisher) -> None:
    await site_service.publish("hdrs", FILES)
    _, headers, _ = await site_service.get("hdrs", "/assets/a.css")
    assert headers["X-Site"] == "everywhere" and headers["Cache-Control"] == "public, max-age=60"
    assert headers["Content-Length"] == "4"  # reserved: the server's own
    _, headers, _ = await site_service.get("hdrs", "/app/deep/route")
    assert headers["X-Frame-Options"] == "DENY"
    _, headers, _ = await site_service.get("hdrs", "/")
    assert headers["X-Frame-Options"] == "SAMEORIGIN" and headers["X-Site"] == "everywhere"


async def test_malformed_lines_are_reported_in_the_build_log(site_service: Publisher) -> None:
    _, log, _ = await site_service.publish("bad", FILES)
    warnings = [line for line in log if line.startswith("Warning:")]
    assert any("_redirects line 10" in w and "FROM TO" in w for w in warnings)
    assert any("_redirects line 11" in w and "conditions" in w for w in warnings)
    assert any("_redirects line 12" in w and "proxying" in w for w in warnings)
    assert any("_headers line 5" in w and "Content-Length" in w for w in warnings)
    assert any("_headers line 6" in w and "Name: value" in w for w in warnings)
    assert "Read 7 rules from _redirects" in log and "Read 3 rules from _headers" in log


async def test_404_page_wins_over_the_spa_fallback_only_without_a_routing_rule(
    site_service: Publisher,
) -> None:
    await site_service.publish("plain", {"index.html": "shell", "404.html": "nope"})
    assert (await site_service.get("plain", "/some/route"))[:3:2] == (404, b"nope")
    await site_service.publish("spa", {"index.html": "shell", "404.html": "nope",
                                       "_redirects": "/*  /index.html  200\n"})
    assert (await site_service.get("spa", "/some/route"))[:3:2] == (200, b"shell")
    await site_service.publish("bare", {"index.html": "shell"})
    assert (await site_service.get("bare", "/some/route"))[:3:2] == (200, b"shell")
    assert (await site_service.get("bare", "/missing.js"))[0] == 404


@pytest.mark.parametrize(("name", "hashed"), [
    ("assets/index-B4x_k9Zq.js", True), ("static/js/main.3f9a1c2b.chunk.js", True),
    ("app-3f9a1c2b.css", True), ("assets/logo-DkL1eO2y.svg", True), ("index-BxTnEqaK.js", True),
    ("google-analytics.js", False), ("app-MyWidget.js", False), ("report-20240101.js", False),
    ("jquery-3.7.1.min.js", False), ("vendor.js", False), ("index.html", False),
])
def test_only_bundler_hashes_make_a_file_immutable(name: str, hashed: bool) -> None:
    assert is_hashed(name) is hashed


def test_rule_parsers_refuse_what_they_cannot_serve() -> None:
    rules, problems = parse_redirects("/a/*/b /c\n/:x/:x /d\n/ok /fine 307\n")
    assert [r.source for r in rules] == ["/ok"] and len(problems) == 2
    rules, problems = parse_headers("/a\n  X-Bad: one\x01two\n  Vary: x\n")
    assert rules == [] and len(problems) == 2
