"""web/ansi.js in a real browser: ANSI escapes of build logs become styled text nodes, never markup."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.browser import CHROMIUM, Chromium, browser, new_page, static_web  # noqa: F401 (fixtures)

pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' brings playwright")
pytestmark = [pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium"), pytest.mark.timeout(60)]

# Renders `raw` into a fresh element and describes what came out, node by node.
RENDER = """async ([raw, marks]) => {
  const ansi = await import("./ansi.js");
  const box = document.createElement("div");
  ansi.renderSegments(box, ansi.parseAnsi(raw), marks);
  const describe = (n) => n.nodeType === 3 ? ["#text", n.data]
    : [n.tagName.toLowerCase(), n.className, n.getAttribute("style") || "", n.textContent];
  return {nodes: [...box.childNodes].map(describe), html: box.innerHTML, plain: ansi.plainText(raw)};
}"""


@pytest.fixture
def render(browser: Chromium, static_web: str) -> Any:  # noqa: F811
    page = new_page(browser)
    # An empty HTML page of that origin, for the module import.
    page.route(f"{static_web}/blank", lambda route: route.fulfill(body="<!doctype html>", content_type="text/html"))
    page.goto(f"{static_web}/blank")
    return lambda raw, marks=(): page.evaluate(RENDER, [raw, list(marks)])


def test_sgr_colours_bold_and_reset(render: Any) -> None:
    out = render("\x1b[31merror\x1b[0m plain \x1b[1;92mok\x1b[22m done")
    assert out["nodes"] == [
        ["span", "ansi-fg-1", "", "error"], ["#text", " plain "],
        ["span", "ansi-fg-10 ansi-bold", "", "ok"], ["span", "ansi-fg-10", "", " done"],
    ]
    assert out["plain"] == "error plain ok done"


def test_256_and_truecolour_become_exact_colours(render: Any) -> None:
    out = render("\x1b[38;5;196ma\x1b[48;2;0;0;255mb\x1b[39;49mc")
    assert out["nodes"] == [
        ["span", "", "color: rgb(255, 0, 0);", "a"],
        ["span", "", "color: rgb(255, 0, 0); background-color: rgb(0, 0, 255);", "b"],
        ["#text", "c"],
    ]


def test_other_escapes_and_controls_are_dropped(render: Any) -> None:
    out = render("\x1b]0;title\x07\x1b[2K\x1b[1Gdone\x00\x08 \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\")
    assert out["nodes"] == [["#text", "done link"]]


def test_a_progress_bar_keeps_only_its_last_state(render: Any) -> None:
    assert render("\x1b[32m 10%\r 55%\r100%\x1b[0m\r")["nodes"] == [["span", "ansi-fg-2", "", "100%"]]


def test_markup_in_log_text_stays_text(render: Any) -> None:
    raw = '\x1b[31m<img src=x onerror="window.pwned=1">\x1b[0m<b>&amp;</b>'
    out = render(raw)
    assert out["plain"] == '<img src=x onerror="window.pwned=1"><b>&amp;</b>'
    assert "<img" not in out["html"] and "&lt;img" in out["html"]


def test_search_marks_split_across_styled_segments(render: Any) -> None:
    out = render("ab\x1b[1mcd\x1b[0mef", [[1, 5]])
    assert out["nodes"] == [
        ["#text", "a"], ["mark", "", "", "b"], ["mark", "", "", "cd"], ["mark", "", "", "e"], ["#text", "f"],
    ]
