"""The built-in page in a real browser (headless Chromium): login link, deploy from the form,
the live log (colours, search, deep links, download), the site, redeploy and rollback, a
server restart mid-build, and a 50,000-line log. Screenshots go to tests/support/browser.py's
SCREENSHOTS directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import (  # noqa: F401 (browser is a fixture)
    CHROMIUM,
    PHONE,
    Chromium,
    another_tab,
    browser,
    new_page,
    shoot,
)
from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.served import Served

pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' brings playwright")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (apt-get install chromium)")

# A build step that prints in colour, as real tools do.
COLOURS_JS = r"""
console.log("\x1b[1m\x1b[36mvite\x1b[39m v5.0.0 \x1b[32mbuilding for production...\x1b[0m");
console.log("\x1b[32m✓\x1b[39m 34 modules transformed.");
console.log("dist/\x1b[2massets/\x1b[22m\x1b[36mindex-4f2a.js\x1b[39m  \x1b[1m\x1b[2m143.61 kB\x1b[22m");
console.error("\x1b[33m(!) Some chunks are larger than 500 kB\x1b[39m");
"""
PACKAGE_JSON = '{"name":"tiny","version":"1.0.0","private":true,"scripts":{"build":"node build.js && node colours.js"}}'


def tiny_repo(git_server: GitServer, lines: int, delay_ms: int) -> str:
    return git_server.add_repo(unique_name("page"), files_dir=TINY_APP, files={
        "tiny.json": json.dumps({"lines": lines, "delayMs": delay_ms}),
        "colours.js": COLOURS_JS, "package.json": PACKAGE_JSON,
    })


def sign_in_and_deploy(page: Any, served: Served, repo_url: str, project: str) -> str:
    page.goto(f"{served.url}/#token={served.token}")
    assert "token" not in page.url  # taken out of the address bar
    page.fill("#repo-url", repo_url)
    page.fill("#project-name-input", project)
    page.click("#deploy-button")
    page.wait_for_url("**/#/deployments/*")
    return str(page.url).rsplit("/", 1)[1]


def shown_lines(page: Any) -> int:
    text = page.text_content("#log-count") or "0"
    return int(text.split()[0].replace(",", "") or 0)


def server_log(served: Served, dep_id: str) -> list[dict[str, Any]]:
    _, _, raw = served.get(f"/api/deployments/{dep_id}/logs")
    return [json.loads(line) for line in raw.decode().splitlines() if line]


def whole_log(served: Served, dep_id: str) -> list[dict[str, Any]]:
    """The log once the build has said its last word: the build cache's, after `ready`."""
    deadline = time.monotonic() + 60
    while True:
        log = server_log(served, dep_id)
        if any(e["text"].startswith(("Build cache: saved", "Build cache: not saved")) for e in log):
            return log
        assert time.monotonic() < deadline, log[-5:]
        time.sleep(0.2)


@pytest.mark.timeout(240)
def test_deploy_watch_visit_redeploy_and_roll_back(served: Served, git_server: GitServer, browser: Chromium) -> None:  # noqa: F811
    page = new_page(browser)
    first = sign_in_and_deploy(page, served, tiny_repo(git_server, 300, 15), "from-page")
    # Real lines arrive while the build runs.
    page.wait_for_selector(".log-line[data-seq] >> text=line 20", timeout=60_000)
    assert page.text_content("#detail-status") not in ("Ready", "Failed")
    page.wait_for_selector(".result-ready", timeout=90_000)
    assert page.text_content("#status-announcer") == f"Deployment {first} is now ready."  # aria-live
    total = len(server_log(served, first))
    page.wait_for_function(f"document.getElementById('log-count').textContent.startsWith('{total} ')")
    assert page.locator(".log-line .ansi-fg-6").first.text_content() == "vite"  # colours rendered
    assert page.locator(".log-line.stderr .log-stream").first.text_content() == "err"
    assert page.locator(".log-line").count() < 120  # only what is on screen (and a margin)
    assert page.locator(".timeline .step-done").count() == page.locator(".timeline .step").count()
    shoot(page, "deployment")

    with page.expect_popup() as popup:  # the site link opens the live site
        page.locator("#result .result-link").first.click()
    site = popup.value
    site.wait_for_load_state()
    assert site.locator("h1").text_content() == "Hello from tiny"
    site.close()

    page.click("#detail-actions button[data-action=redeploy]")
    page.wait_for_function(f"!location.hash.endsWith('{first}')")
    second = page.url.rsplit("/", 1)[1]
    page.wait_for_selector(".result-ready", timeout=90_000)
    assert served.get_json("/api/projects/from-page")["production"] == second

    row = page.locator(f".dep-row[data-id='{first}']")
    row.locator("button[data-action=promote]").click()  # "Rollback": it is older
    row.locator(".tag-prod").wait_for()
    assert served.get_json("/api/projects/from-page")["production"] == first
    page.click("a.brand")
    page.wait_for_selector(".project-entry .badge-ready")
    assert page.locator(".project-entry .project-url").first.text_content() == f"from-page.localhost:{served.port}"
    shoot(page, "projects")
    assert page.evaluate(UNLABELLED) == []
    page.reload()
    page.keyboard.press("Tab")  # the first stop skips to the content
    assert page.evaluate("document.activeElement.className") == "skip-link"


# Form fields without a label and buttons or links without a name, as a screen reader would meet them.
UNLABELLED = """() => [...document.querySelectorAll("input, button, a[href]")]
  .filter((e) => e.offsetParent !== null)
  .filter((e) => e.tagName === "INPUT" ? !e.labels.length && !e.getAttribute("aria-label")
                                       : !(e.getAttribute("aria-label") || e.textContent.trim()))
  .map((e) => e.outerHTML)"""


@pytest.mark.timeout(180)
def test_search_deep_link_and_download(served: Served, git_server: GitServer, browser: Chromium) -> None:  # noqa: F811
    page = new_page(browser)
    dep_id = sign_in_and_deploy(page, served, tiny_repo(git_server, 400, 0), "search-me")
    page.wait_for_selector(".result-ready", timeout=90_000)
    log = whole_log(served, dep_id)
    page.wait_for_function(f"document.getElementById('log-count').textContent.startsWith('{len(log)} ')")

    page.fill("#log-search", "LINE 3")  # case-insensitive
    hits = [ev["seq"] for ev in log if "line 3" in ev["text"]]
    page.wait_for_function(f"document.getElementById('log-search-count').textContent === '1 of {len(hits)}'")
    page.press("#log-search", "Enter")
    page.press("#log-search", "Enter")
    assert page.text_content("#log-search-count") == f"3 of {len(hits)}"
    current = page.locator(f".log-line.current-match[data-seq='{hits[2]}']")  # drawn in the next frame
    assert current.locator("mark.current").text_content() == "line 3"
    page.click("#log-prev")
    page.locator(f".log-line.current-match[data-seq='{hits[1]}']").wait_for()
    shoot(page, "search")

    with page.expect_download() as download:
        page.click("#log-download")
    text = Path(download.value.path()).read_text()
    assert any(line.startswith("Deployed 4 files.") for line in text.splitlines())
    assert len(text.splitlines()) == len(log)
    assert "\x1b" not in text

    page.click("#tab-settings")  # build variables are on the project's settings screen
    page.fill("#var-name", "API_URL")
    page.fill("#var-value", "https://api.example")
    page.click("#var-form button[type=submit]")
    page.wait_for_selector(".var-row >> text=API_URL")
    page.fill("#var-name", "API_TOKEN")
    page.fill("#var-value", "s3cret")
    page.check("#var-secret")
    page.press("#var-value", "Enter")
    page.wait_for_selector(".var-row >> text=API_TOKEN")
    assert served.get_json("/api/projects/search-me/variables")["variables"] == {
        "API_TOKEN": {"value": None, "secret": True}, "API_URL": {"value": "https://api.example", "secret": False}}
    assert "s3cret" not in page.text_content("#var-list")
    assert page.input_value("#var-value") == "" and not page.is_checked("#var-secret")  # ready for the next
    page.fill("#var-name", "1BAD")
    page.click("#var-form button[type=submit]")
    page.wait_for_selector("#var-error:visible")
    assert "1BAD" in page.text_content("#var-error")  # the server's message
    page.click("button[aria-label='Remove API_URL']")
    page.wait_for_function("!document.getElementById('var-list').textContent.includes('API_URL')")
    shoot(page, "variables")

    linked = another_tab(browser, page, PHONE)  # a fresh tab, on a phone, opening a link to line 250
    linked.goto(f"{served.url}/#/deployments/{dep_id}?line=250")
    target = linked.locator(".log-line.target[data-seq='250']")
    target.wait_for()
    box, frame = target.bounding_box(), linked.locator("#log-scroller").bounding_box()
    assert frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"]
    linked.locator(".log-line[data-seq='260'] .log-num").click()  # a line number links to its line
    assert linked.url.endswith(f"#/deployments/{dep_id}?line=260")
    linked.locator(".log-line.target[data-seq='260']").wait_for()
    assert linked.locator(".log-line.target").count() == 1
    shoot(linked, "deep-link")


@pytest.mark.timeout(240)
def test_log_resumes_after_a_server_restart_mid_build(served: Served, git_server: GitServer, browser: Chromium) -> None:  # noqa: F811
    page = new_page(browser)
    dep_id = sign_in_and_deploy(page, served, tiny_repo(git_server, 2000, 20), "restart")
    page.wait_for_function("parseInt(document.getElementById('log-count').textContent) > 100", timeout=90_000)
    page.locator("#log-scroller").hover()
    page.mouse.wheel(0, -600)  # reading: auto-scroll pauses, the jump button appears
    page.wait_for_selector("#log-jump:visible")

    served.crash()  # SIGKILL mid-build: a local build dies with its server (the restart fails it)
    page.wait_for_selector('#connection[data-state="reconnecting"]', timeout=30_000)
    assert page.text_content("#connection") == "Reconnecting…"
    assert page.is_visible("#log-conn")
    shoot(page, "reconnecting")
    served.start(expect_login=False)
    page.wait_for_selector('#connection[data-state="open"]', timeout=30_000)
    page.wait_for_selector(".result-failed", timeout=60_000)
    log = server_log(served, dep_id)
    page.wait_for_timeout(1000)  # any repeated line would have arrived by now
    assert shown_lines(page) == len(log)  # every line once: no gap, no duplicate
    page.click("#log-jump")
    page.locator(f".log-line[data-seq='{log[-1]['seq']}']").wait_for()
    shoot(page, "failed")


@pytest.mark.timeout(180)
def test_log_resumes_after_network_blips_mid_build(served: Served, git_server: GitServer, browser: Chromium) -> None:  # noqa: F811
    page = new_page(browser)
    sockets: list[Any] = []

    def relay(ws: Any) -> None:  # the page's socket goes through here, so the test can cut it
        server = ws.connect_to_server()
        sockets.append((ws, server))

    page.route_web_socket("**/api/ws", relay)
    dep_id = sign_in_and_deploy(page, served, tiny_repo(git_server, 1500, 10), "blips")
    for floor in (100, 400):  # two blips while lines stream in
        page.wait_for_function(f"parseInt(document.getElementById('log-count').textContent) > {floor}",
                               timeout=90_000)
        ws, server = sockets[-1]
        ws.close(code=4000, reason="blip")
        server.close()
        page.wait_for_selector('#connection[data-state="reconnecting"]', timeout=10_000)
        page.wait_for_selector('#connection[data-state="open"]', timeout=30_000)
    page.wait_for_selector(".result-ready", timeout=90_000)
    log = server_log(served, dep_id)
    page.wait_for_timeout(1000)  # any repeated line would have arrived by now
    assert len(sockets) >= 3 and shown_lines(page) == len(log)  # every line once: no gap, no duplicate


@pytest.mark.timeout(300)
def test_a_50000_line_log_stays_responsive(served: Served, git_server: GitServer, browser: Chromium) -> None:  # noqa: F811
    page = new_page(browser)
    dep_id = sign_in_and_deploy(page, served, tiny_repo(git_server, 49_900, 0), "big")
    page.wait_for_selector(".result-ready, .result-failed", timeout=180_000)
    total = len(server_log(served, dep_id))
    assert total > 49_900

    fresh = another_tab(browser, page)  # a new tab: the whole log replays over the socket
    start = time.monotonic()
    fresh.goto(f"{served.url}/#/deployments/{dep_id}")
    fresh.wait_for_function(f"document.getElementById('log-count').textContent === '{total:,} lines'",
                            timeout=60_000)
    loaded = time.monotonic() - start
    assert fresh.locator(".log-line").count() < 200
    frame_gaps = fresh.evaluate(SCROLL_THROUGH)
    print(f"\n50k log: {total} lines shown in {loaded:.2f}s; scrolling frames: {frame_gaps}")
    assert loaded < 30
    assert frame_gaps["rows"] < 200
    assert frame_gaps["p95_ms"] < 100  # a loaded 2-core CI machine; an idle one does ~17
    fresh.focus("#log-scroller")
    start = time.monotonic()
    fresh.keyboard.press("End")
    fresh.locator(f".log-line[data-seq='{total}']").wait_for(timeout=2000)
    print(f"50k log: End key to the last line in {time.monotonic() - start:.3f}s")
    start = time.monotonic()
    fresh.fill("#log-search", "line 1234")  # line 1234 and line 12340 to 12349
    fresh.wait_for_function("document.getElementById('log-search-count').textContent === '1 of 11'")
    print(f"50k log: search to the first of 11 hits in {time.monotonic() - start:.3f}s (150 ms of it typing pause)")
    shoot(fresh, "big-log")


# Scrolls the log from top to bottom in 60 steps, one per frame, and reports frame times.
SCROLL_THROUGH = """async () => {
  const el = document.getElementById("log-scroller");
  const frame = () => new Promise(requestAnimationFrame);
  el.scrollTop = 0; await frame(); await frame();
  let last = performance.now();
  const idle = [];  // the same frames with nothing to do, for comparison
  for (let i = 0; i < 30; i += 1) { await frame(); const now = performance.now(); idle.push(now - last); last = now; }
  idle.sort((a, b) => a - b);
  const gaps = []; let rows = 0; last = performance.now();
  for (let i = 1; i <= 60; i += 1) {
    el.scrollTop = (el.scrollHeight - el.clientHeight) * i / 60;
    await frame();
    const now = performance.now(); gaps.push(now - last); last = now;
    rows = Math.max(rows, el.querySelectorAll(".log-line").length);
  }
  gaps.sort((a, b) => a - b);
  return {p95_ms: Math.round(gaps[Math.floor(gaps.length * 0.95)]), max_ms: Math.round(gaps[gaps.length - 1]),
          idle_p95_ms: Math.round(idle[Math.floor(idle.length * 0.95)]), rows};
}"""
