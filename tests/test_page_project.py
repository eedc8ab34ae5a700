"""The page's project view in a real browser (headless Chromium): its deployments (commit,
trigger, duration), the phase strip, the settings screen (a bad value gets the server's message
next to its field, a changed build command takes effect on the redeploy), the webhook secret,
the credential card; the limits warning of a server that cannot enforce them; and the
"reconnecting…" notice while Redis is away."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import (  # noqa: F401 (browser is a fixture)
    CHROMIUM,
    Chromium,
    browser,
    new_page,
    shoot,
)
from tests.support.infra import GitServer
from tests.support.procs import RedisServer
from tests.support.served import Served
from tests.test_page import UNLABELLED, sign_in_and_deploy, tiny_repo

pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' brings playwright")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (apt-get install chromium)")

MARKER = "built-with-the-command-from-settings"


def signed_post(served: Served, path: str, secret: str, event: str, payload: Any) -> tuple[int, Any]:
    raw = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    status, _, body = served.request("POST", path, body=raw, headers={
        "Content-Type": "application/json", "X-GitHub-Event": event, "X-Hub-Signature-256": signature})
    return status, json.loads(body)


@pytest.mark.timeout(300)
def test_settings_screen_change_takes_effect_on_redeploy(served: Served, git_server: GitServer, browser: Chromium) -> None:  # noqa: F811
    page = new_page(browser)
    first = sign_in_and_deploy(page, served, tiny_repo(git_server, 20, 0), "settings-app")
    page.wait_for_selector(".result-ready", timeout=90_000)
    built = served.get_json(f"/api/deployments/{first}")
    assert built["trigger"] == "page"
    row = page.locator(f".dep-row[data-id='{first}']")
    assert row.locator(".dep-trigger").text_content() == "via Page"
    assert row.locator(".dep-sha").text_content() == built["commit"][:7]
    assert row.locator(".dep-duration").text_content() != ""
    # The limits warning shows exactly when the server says they are not enforced.
    enforced = served.get_json("/api/server")["limits"]["enforced"]
    assert page.is_visible("#limits-banner") is (not enforced)

    page.click("#tab-settings")
    page.wait_for_url("**/#/projects/settings-app/settings")
    page.wait_for_selector("#settings-form[aria-busy=false]")
    page.keyboard.press("Tab")  # from the tab just followed, straight into the first field
    assert page.evaluate("document.activeElement.id") == "set-branch"
    assert page.is_hidden("#log-card") and page.is_visible("#settings-form")
    page.fill("#set-node_version", "twenty")
    page.click("#settings-save")
    error = page.locator("#set-node_version-error")
    error.wait_for()
    assert "node_version must be a Node version" in (error.text_content() or "")  # the server's 400
    assert page.get_attribute("#set-node_version", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "set-node_version"
    page.fill("#set-node_version", "")
    page.fill("#set-build_command", f"node build.js && node colours.js && echo {MARKER}")
    page.click("#settings-save")
    page.wait_for_selector("#settings-status >> text=Saved")
    assert error.is_hidden()
    settings = served.get_json("/api/projects/settings-app/settings")["settings"]
    assert settings["build_command"].endswith(MARKER) and settings["node_version"] is None

    hook_url = page.input_value("#hook-url")
    assert hook_url == f"{served.url}/api/hooks/github?project=settings-app"
    page.click("#hook-rotate")
    page.wait_for_selector("#hook-secret-box:visible")
    secret = page.input_value("#hook-secret")
    assert len(secret) == 64 and page.text_content("#hook-rotate") == "Rotate secret"
    status, body = signed_post(served, "/api/hooks/github?project=settings-app", secret, "ping", {"zen": "hi"})
    assert (status, body) == (200, {"ok": True, "project": "settings-app"})  # GitHub's ping passes

    credential = served.get("/api/projects/settings-app/credential")[0]
    page.wait_for_function("document.getElementById('cred-state').textContent !== ''")
    if credential == 404:  # the credential API is not on this server (yet)
        assert page.text_content("#cred-state") == "Private repositories are not available on this server."
        assert page.is_hidden("#cred-form")
    else:  # a token is written once, shown by its last four characters only, and removed
        assert page.text_content("#cred-state") == "No token: only public repositories can be cloned."
        page.fill("#cred-token", "ghp_pagetest0000abcd")
        page.fill("#cred-username", "deploy-bot")
        page.click("#cred-form button[type=submit]")
        page.wait_for_selector("#cred-state >> text=A token (…abcd) is set for user deploy-bot")
        assert page.input_value("#cred-token") == "" and "pagetest" not in page.content()
        assert served.get_json("/api/projects/settings-app/credential")["credential"]["hint"] == "…abcd"
        shoot(page, "project-credential")
        page.once("dialog", lambda dialog: dialog.accept())  # "Remove the token?"
        page.click("#cred-remove")
        page.wait_for_selector("#cred-state >> text=No token")
        assert served.get_json("/api/projects/settings-app/credential") == {"credential": None}
    shoot(page, "project-settings")
    assert page.evaluate(UNLABELLED) == []  # every field labelled, every button named

    page.click("#tab-deployments")
    page.click("#detail-actions button[data-action=redeploy]")
    page.wait_for_function(f"location.hash.startsWith('#/deployments/') && !location.hash.endsWith('{first}')")
    second = page.url.rsplit("/", 1)[1]
    page.wait_for_selector(".result-ready", timeout=90_000)
    page.wait_for_selector(f".log-line >> text={MARKER}")  # the new build command ran
    bars = page.locator("#phase-strip .phase-bar")
    assert bars.count() == 2
    for bar in (bars.nth(0), bars.nth(1)):
        phases = bar.locator(".phase").evaluate_all("(s) => s.map((e) => e.dataset.phase)")
        assert {"cloning", "installing", "building"} <= set(phases)
        assert bar.locator(".phase[data-phase=building]").bounding_box()["height"] > 0
    assert "Deployment " + first in (bars.nth(0).get_attribute("aria-label") or "")  # oldest first

    # A push to the branch, signed with the secret the page showed, deploys: via Webhook.
    commit = served.get_json(f"/api/deployments/{second}")["commit"]
    status, pushed = signed_post(served, "/api/hooks/github?project=settings-app", secret, "push", {
        "ref": "refs/heads/main", "after": commit, "repository": {"default_branch": "main"}})
    assert status == 202 and pushed["trigger"] == "webhook", pushed
    served.wait_final(pushed["id"], timeout=90)
    hooked = page.locator(f".dep-row[data-id='{pushed['id']}'] .dep-trigger")
    hooked.wait_for()
    assert hooked.text_content() == "via Webhook"
    page.wait_for_function("document.querySelectorAll('#phase-strip .phase-bar').length === 3")
    shoot(page, "project")
    assert page.evaluate(UNLABELLED) == []  # the phase bars too: each says its build's phases

    listed = served.get_json("/api/projects")["projects"][0]
    assert listed["production_deployment"]["id"] == listed["production"] == pushed["id"]
    page.click("a.brand")
    page.wait_for_selector(".project-entry .project-sha")
    assert page.text_content(".project-entry .project-sha") == commit[:7]
    status, refused = served.post_json("/api/deployments", {"repo_url": built["repo_url"], "trigger": "robot"})
    assert status == 400 and "trigger must be one of 'page', 'cli'" in refused["error"]


@pytest.mark.timeout(120)
def test_a_server_without_build_limits_shows_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, browser: Chromium,  # noqa: F811
) -> None:
    # The runner asks a worker process at start; make that process see a host without cgroups
    # (the hook tests/test_sandbox.py uses for the same check).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import worker.cgroups as c\nc.builds_dir = lambda controller: None\nc.v2_location = lambda: None\n")
    monkeypatch.setenv("PYTHONPATH", f"{hook}:{os.environ.get('PYTHONPATH', '')}")
    served = Served(tmp_path / "data")
    served.start()
    try:
        info = served.get_json("/api/server")
        assert info["runner"] == "local" and info["version"]
        assert info["limits"]["enforced"] is False and info["limits"]["policy"] == "run"
        assert [m.rsplit(" ", 1)[1] for m in info["limits"]["missing"]] == [
            "(DEPLOYHUB_BUILD_MEMORY_MB)", "(DEPLOYHUB_BUILD_MAX_PROCESSES)"]
        page = new_page(browser)
        page.goto(f"{served.url}/#token={served.token}")
        page.wait_for_selector("#limits-banner:visible")
        text = page.text_content("#limits-text") or ""
        assert "DEPLOYHUB_BUILD_MEMORY_MB" in text and "DEPLOYHUB_BUILD_WITHOUT_LIMITS=run" in text
        shoot(page, "limits-warning")
    finally:
        served.stop()


@pytest.mark.timeout(180)
def test_the_page_says_reconnecting_while_redis_is_away(
    tmp_path: Path, redis_server: RedisServer, browser: Chromium,  # noqa: F811
) -> None:
    served = Served(tmp_path / "data", "--redis-url", redis_server.url)
    served.start()
    try:
        page = new_page(browser)
        page.goto(f"{served.url}/#token={served.token}")
        page.wait_for_selector("#projects-status >> text=No projects yet")
        banner = page.locator("#reconnect-banner")
        assert banner.is_hidden() and banner.get_attribute("aria-live") == "polite"
        redis_server.stop()
        page.click("#refresh-projects")  # the API answers 503 (Retry-After) now
        page.wait_for_selector("#reconnect-banner:visible", timeout=30_000)
        assert (banner.text_content() or "").startswith("Reconnecting…")
        assert "Redis" in (banner.text_content() or "")
        assert page.is_enabled("#repo-url")  # not blocking: the page stays usable
        shoot(page, "reconnecting-redis")
        redis_server.start()
        page.wait_for_selector("#reconnect-banner", state="hidden", timeout=30_000)
        page.wait_for_selector("#projects-status >> text=No projects yet")
        assert banner.text_content() == ""
    finally:
        served.stop()
