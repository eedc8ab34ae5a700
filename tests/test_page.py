"""The built-in page in a real browser (headless Chromium): login link, deploy, live log,
the live site, and a reconnect that resumes without duplicating a line."""

from __future__ import annotations

import shutil

import pytest

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.served import Served

playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' brings playwright")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (apt-get install chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.timeout(180)
def test_deploy_from_the_page_and_resume_after_a_server_restart(served: Served, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("page"), files_dir=TINY_APP,
                              files={"tiny.json": '{"lines": 200, "delayMs": 5}'})
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{served.url}/#token={served.token}")
        assert "token" not in page.url  # taken out of the address bar
        page.fill("#repo-url", url)
        page.fill("#project-name-input", "from-page")
        page.click("#deploy-button")
        page.wait_for_selector(".result-ready", timeout=60_000)
        total = len(served.logs_of_newest("from-page"))
        page.wait_for_function(f"document.querySelectorAll('[data-seq]').length === {total}")
        assert page.locator("[data-seq]").last.get_attribute("data-seq") == str(total)
        assert page.locator("#log-scroller").inner_text().count("line 200") == 1

        served.stop()
        page.wait_for_selector('#connection:not([data-state="open"])', timeout=30_000)
        served.start(expect_login=False)  # the page reconnects and resumes
        page.wait_for_selector('#connection[data-state="open"]', timeout=30_000)
        page.wait_for_timeout(1000)  # any replayed history would have arrived by now
        assert page.locator("[data-seq]").count() == total  # nothing doubled

        site = browser.new_page()
        site.goto(f"http://from-page.localhost:{served.port}/")
        assert "Hello from tiny" in site.content()
        browser.close()
    assert errors == []
