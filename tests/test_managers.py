"""Every package manager the hosted platforms detect, end to end: yarn 1, Yarn Berry, pnpm,
bun, and two lockfiles of which the winning one is stale."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.caches import session_caches, shared_caches  # noqa: F401  (fixtures)
from tests.support.infra import FIXTURES_DIR, TINY_APP, GitServer, unique_name
from tests.support.service import Service

LOCKS = FIXTURES_DIR / "lockfiles"
PACKAGE = {**json.loads((TINY_APP / "package.json").read_text()), "dependencies": {"greet": "file:./greet"}}
pytestmark = [pytest.mark.usefixtures("shared_caches"), pytest.mark.timeout(240)]


def tiny_with(lockfiles: dict[str, str], **package: Any) -> dict[str, str | bytes]:
    """The tiny app depending on the local greet package, with lockfiles (name -> fixture)."""
    files: dict[str, str | bytes] = {"build.js": (TINY_APP / "build.js").read_bytes()}
    for path in (LOCKS / "greet").iterdir():
        files[f"greet/{path.name}"] = path.read_bytes()
    for name, fixture in lockfiles.items():
        files[name] = (LOCKS / fixture).read_bytes()
    files["package.json"] = json.dumps({**PACKAGE, **package})
    return files


async def deploy(service: Service, git_server: GitServer, files: dict[str, str | bytes],
                 timeout: float = 200) -> tuple[dict[str, Any], list[str]]:
    url = git_server.add_repo(unique_name("pm"), files=files)
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"], timeout=timeout)
    return final, [e["text"] for e in await service.logs(dep["id"])]


async def assert_serves_tiny(service: Service, final: dict[str, Any]) -> None:
    status, _, body = await service.site(final["project"])
    assert status == 200 and b"Hello from tiny" in body


@pytest.mark.parametrize("lockfile, fixture, package, install", [
    ("yarn.lock", "yarn-v1.lock", {}, "$ npx --yes yarn@1 install --frozen-lockfile --non-interactive"),
    ("yarn.lock", "yarn-berry.lock", {"packageManager": "yarn@4.9.2"}, "$ corepack yarn@4.9.2 install --immutable"),
    ("pnpm-lock.yaml", "pnpm-lock.yaml", {}, "$ npx --yes pnpm@9 install --frozen-lockfile"),
    ("bun.lock", "bun.lock", {}, "$ npx --yes bun@1 install --frozen-lockfile"),
], ids=["yarn-classic", "yarn-berry", "pnpm", "bun"])
async def test_each_manager_installs_from_its_lockfile_and_deploys(
    service: Service, git_server: GitServer, lockfile: str, fixture: str, package: dict[str, str], install: str
) -> None:
    files = tiny_with({lockfile: fixture}, **package)
    if fixture == "yarn-berry.lock":
        files[".yarnrc.yml"] = "nodeLinker: node-modules\nenableTelemetry: false\n"
    final, texts = await deploy(service, git_server, files)
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    assert install in texts
    assert any(t.startswith("Package manager: ") and lockfile in t for t in texts)
    await assert_serves_tiny(service, final)


async def test_stale_winning_lockfile_falls_back_to_the_next_one_loudly(
    service: Service, git_server: GitServer
) -> None:
    # yarn.lock wins over package-lock.json but does not list greet: yarn refuses it.
    stale_yarn = (LOCKS / "yarn-v1.lock").read_text().split('"greet@')[0]
    files = {**tiny_with({"package-lock.json": "package-lock.json"}), "yarn.lock": stale_yarn}
    final, texts = await deploy(service, git_server, files)
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    assert any("yarn.lock won" in t and "package-lock.json" in t for t in texts)
    warning = next(t for t in texts if t.startswith("Warning: yarn.lock is out of date"))
    assert "Run `yarn install` and commit the updated yarn.lock" in warning
    assert "Trying package-lock.json with npm instead" in warning
    assert "$ npm ci" in texts
    await assert_serves_tiny(service, final)


async def test_only_lockfile_stale_fails_saying_which_file_and_how_to_fix(
    service: Service, git_server: GitServer
) -> None:
    lock = json.loads((LOCKS / "package-lock.json").read_text())
    del lock["packages"]["node_modules/greet"], lock["packages"][""]["dependencies"]
    final, _ = await deploy(service, git_server, {**tiny_with({}), "package-lock.json": json.dumps(lock)})
    assert final["status"] == "failed"
    assert "package-lock.json is out of date with package.json" in final["reason"]
    assert "Run `npm install` and commit the updated package-lock.json" in final["reason"]
