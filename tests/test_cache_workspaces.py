"""The build cache beyond one node_modules, end to end with real npm and Yarn against the
registry: an npm workspaces monorepo (the app in apps/web, built with the root directory
apps/web or from the workspace root) restores node_modules at the root and in apps/web; a
Yarn Berry Plug'n'Play app restores .pnp.cjs and its install state; a Turborepo app builds
its workspace dependencies first, with turbo. And an entry tampered
with (a symlink or a path out of the tree, locally or as an archive in S3) is ignored, and
restoring it writes nothing outside the build's tree."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.infra import FIXTURES_DIR, GitServer, RedisServer, S3Server, unique_name
from tests.support.service import Service, StartService, make_settings
from worker import cache
from worker.cache import owner_digest

MONOREPO = FIXTURES_DIR / "monorepo"
TURBOREPO = FIXTURES_DIR / "turborepo"
PNP = FIXTURES_DIR / "pnp"
pytestmark = pytest.mark.timeout(300)


async def build(service: Service, url: str, **extra: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Deploy to the end of its log (the cache is saved after `ready`): the deployment and
    its log events."""
    dep = await service.deploy(url, **extra)
    final = await service.wait_final(dep["id"], timeout=200)
    deadline = time.monotonic() + 60
    while True:
        events = await service.logs(dep["id"])
        if final["status"] != "ready" or any(e["text"].startswith(("Build cache: saved", "Build cache: not saved"))
                                             for e in events):
            return final, events
        assert time.monotonic() < deadline, [e["text"] for e in events[-10:]]
        await asyncio.sleep(0.2)


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events]


def line(events: list[dict[str, Any]], start: str) -> str:
    return next(t for t in texts(events) if t.startswith(start))


def printed(events: list[dict[str, Any]], name: str) -> str:
    return line(events, f"{name} ").split(" ", 1)[1]


def entry_dir(service: Service, project: str) -> Path:
    return service.settings.data_dir / "cache" / "projects" / project / owner_digest(service.token_id)


def monorepo_settings(layout: str) -> dict[str, str]:
    return {"root_directory": "apps/web"} if layout == "root-directory" else {"output_directory": "apps/web/dist"}


@pytest.mark.parametrize("layout", ["root-directory", "workspace-root"])
async def test_npm_workspaces_restore_every_node_modules(service: Service, git_server: GitServer, layout: str) -> None:
    url = git_server.add_repo(unique_name("mono"), files_dir=MONOREPO)
    settings = monorepo_settings(layout)
    cold, first = await build(service, url, settings=settings)
    assert cold["status"] == "ready", (cold["reason"], texts(first)[-15:])
    if layout == "root-directory":  # the lockfile is the workspace root's, two levels up
        assert any(t.startswith("Workspace: apps/web is a workspace package of the repository root")
                   for t in texts(first))
    ci = "$ npm ci --include-workspace-root" if layout == "root-directory" else "$ npm ci"
    assert ci in texts(first)
    assert line(first, "Build cache: saved ").startswith("Build cache: saved apps/web/node_modules, node_modules (")
    warm, second = await build(service, url, settings=settings)
    assert warm["status"] == "ready", (warm["reason"], texts(second)[-15:])
    restored = line(second, "Build cache: restored ")
    assert restored.startswith("Build cache: restored apps/web/node_modules, node_modules (") and "hardlinked" in restored
    # Restored before the install ran, which found nothing to add.
    warm_install = "$ npm install --prefer-offline --no-audit --no-fund" + (
        " --include-workspace-root" if layout == "root-directory" else "")
    assert texts(second).index(restored) < texts(second).index(warm_install)
    assert not [t for t in texts(second) if t.startswith("$ npm ci")]
    assert any(t.startswith("up to date") for t in texts(second)), texts(second)
    # The very files the first build installed in each node_modules (linked back), not copies.
    for name in ("cache-inode-root", "cache-inode-web"):
        assert printed(second, name) == printed(first, name)
    status, _, body = await service.site(warm["project"])
    assert status == 200 and b"greet true is-number@7.0.0, web is-number@6.0.0" in body


async def test_yarn_berry_pnp_restores_its_install_state(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("pnp"), files_dir=PNP)
    cold, first = await build(service, url)
    assert cold["status"] == "ready", (cold["reason"], texts(first)[-15:])
    assert "$ corepack yarn@4.9.2 install --immutable" in texts(first)
    # greet has a postinstall script: a cold install unplugs and builds it.
    assert any(t.startswith("➤ YN0007: │ greet@file:./greet") and "must be built" in t for t in texts(first))
    saved = line(first, "Build cache: saved ")
    assert saved.startswith("Build cache: saved .pnp.cjs, .yarn/install-state.gz, .yarn/unplugged ("), saved
    assert printed(first, "pnp-node-modules") == "false"
    warm, second = await build(service, url)
    assert warm["status"] == "ready", (warm["reason"], texts(second)[-15:])
    restored = line(second, "Build cache: restored ")
    assert restored.startswith("Build cache: restored .pnp.cjs, .yarn/install-state.gz, .yarn/unplugged (")
    assert texts(second).index(restored) < texts(second).index("$ corepack yarn@4.9.2 install --immutable")
    # With its install state and unplugged packages restored, Yarn builds nothing again.
    assert not any("must be built" in t for t in texts(second)), texts(second)
    status, _, body = await service.site(warm["project"])
    assert status == 200 and b"pnp says built at install" in body


# -- an entry tampered with ---------------------------------------------------------------------


def rewrite_local_manifest(entry: Path, paths: list[str]) -> None:
    """Make the local entry's manifest agree with what its files now are: only the checks of
    what they hold can refuse it."""
    manifest = json.loads((entry / "modules.json").read_text())
    tally = cache.Tally()
    for path in sorted(paths):
        for rel, st, link in cache._walk(entry / "modules" / path, path):
            tally.add(rel, st, link)
    manifest.update(paths=paths, digest=tally.digest(), files=tally.files)
    (entry / "modules.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("tamper", ["symlink out of the tree", "path out of the tree"])
async def test_tampered_local_entry_is_ignored_and_writes_nothing_outside(
    service: Service, git_server: GitServer, tmp_path: Path, tamper: str
) -> None:
    url = git_server.add_repo(unique_name("mono"), files_dir=MONOREPO)
    settings = monorepo_settings("root-directory")
    first, _ = await build(service, url, settings=settings)
    entry = entry_dir(service, first["project"])
    paths = ["apps/web/node_modules", "node_modules"]
    if tamper == "symlink out of the tree":
        (entry / "modules" / "node_modules" / "evil").symlink_to("../../../../../../../etc")
        rewrite_local_manifest(entry, paths)
        why = "tampered: node_modules/evil is a symlink to ../../../../../../../etc, out of the build's tree"
    else:
        # What a restore to ../../escaped/node_modules would write: nowhere, it is refused.
        os.rename(entry / "modules" / "apps", entry / "modules" / "escaped")
        manifest = json.loads((entry / "modules.json").read_text())
        manifest["paths"] = ["../../escaped/node_modules", "node_modules"]
        (entry / "modules.json").write_text(json.dumps(manifest))
        why = "tampered: it lists '../../escaped/node_modules', a path out of the build's tree"
    final, events = await build(service, url, settings=settings)
    assert final["status"] == "ready", (final["reason"], texts(events)[-15:])
    assert any(t.startswith(f"Build cache: not restored: {why}") for t in texts(events)), texts(events)
    assert "$ npm ci --include-workspace-root" in texts(events)
    builds = service.settings.data_dir / "builds"
    assert not (builds.parent / "escaped").exists() and not (builds / "escaped").exists()
    status, _, body = await service.site(final["project"])
    assert status == 200 and b"web is-number@6.0.0" in body


def tampered_archive(kind: str) -> bytes:
    """A gzip tarball in the cache's layout with one member that leads out of the tree."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        def add(name: str, data: bytes = b"", **fields: Any) -> None:
            info = tarfile.TarInfo(name)
            for field, value in fields.items():
                setattr(info, field, value)
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
        add("modules/node_modules", type=tarfile.DIRTYPE, mode=0o755)
        add("modules/apps/web/node_modules", type=tarfile.DIRTYPE, mode=0o755)
        if kind == "dotdot":
            add("modules/node_modules/../../../../escaped", b"out\n", mode=0o644)
        elif kind == "absolute":
            add("/tmp/deployhub-escaped", b"out\n", mode=0o644)
        else:
            add("modules/node_modules/evil", type=tarfile.SYMTYPE, linkname="/etc")
            add("modules/node_modules/evil/passwd", b"out\n", mode=0o644)
    return out.getvalue()


async def test_tampered_archive_in_s3_is_ignored_and_writes_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer,
    s3_server: S3Server, s3_bucket: str, start_service: StartService, git_server: GitServer,
) -> None:
    for name, value in s3_server.aws_env().items():
        monkeypatch.setenv(name, value)
    service = await start_service(make_settings(
        tmp_path / "data", redis_server.url, storage="s3", s3_bucket=s3_bucket, s3_prefix="dh",
        s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region,
    ))
    url = git_server.add_repo(unique_name("mono"), files_dir=MONOREPO)
    settings = monorepo_settings("root-directory")
    first, events = await build(service, url, settings=settings)
    assert line(events, "Build cache: saved ").startswith("Build cache: saved apps/web/node_modules, node_modules (a ")
    prefix = f"dh/cache/{first['project']}/{owner_digest(service.token_id)}/"
    warm, events = await build(service, url, settings=settings)
    restored = line(events, "Build cache: restored ")
    assert restored.startswith("Build cache: restored apps/web/node_modules, node_modules (") and "unpacked from storage" in restored
    assert printed(events, "cache-inode-web")  # the build ran on the unpacked trees
    for kind, why in [("dotdot", "tampered: its archive holds 'modules/node_modules/../../../../escaped', a path out"),
                      ("absolute", "tampered: its archive holds '/tmp/deployhub-escaped', a path out"),
                      ("symlink", "tampered: node_modules/evil is a symlink to /etc, out of the build's tree")]:
        client = s3_server.client()
        try:
            manifest = json.loads(client.get_object(Bucket=s3_bucket, Key=prefix + "modules.json")["Body"].read())
            archive = tampered_archive(kind)
            manifest.update(sha256=hashlib.sha256(archive).hexdigest(), bytes=len(archive))
            client.put_object(Bucket=s3_bucket, Key=prefix + "modules.tar.gz", Body=archive)
            client.put_object(Bucket=s3_bucket, Key=prefix + "modules.json", Body=json.dumps(manifest).encode())
        finally:
            client.close()
        final, events = await build(service, url, settings=settings)
        assert final["status"] == "ready", (kind, final["reason"], texts(events)[-15:])
        assert any(t.startswith(f"Build cache: not restored: {why}") for t in texts(events)), (kind, texts(events))
        assert "$ npm ci --include-workspace-root" in texts(events)
        assert not Path("/tmp/deployhub-escaped").exists()
        assert not list(service.settings.data_dir.rglob("escaped"))
        status, _, body = await service.site(final["project"])
        assert status == 200 and b"web is-number@6.0.0" in body


# -- the checks themselves, without a build ---------------------------------------------------


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_workspace_packages_are_bounded_to_the_tree(tmp_path: Path) -> None:
    from worker.workspaces import install_paths, packages, workspace_of
    outside = tree(tmp_path / "outside", {"pkg/package.json": "{}"})
    repo = tree(tmp_path / "repo", {
        "package.json": json.dumps({"workspaces": ["apps/*", "libs/**", "../outside/*", "/etc/*", "!apps/skip"]}),
        "apps/web/package.json": "{}", "apps/skip/package.json": "{}", "apps/nopkg/x": "",
        "libs/a/b/package.json": "{}", "libs/node_modules/c/package.json": "{}",
        "libs/.hidden/package.json": "{}",
        "pnpm-workspace.yaml": "packages:\n  - 'tools/*'  # comment\n",
        "tools/t/package.json": "{}",
    })
    (repo / "apps" / "linked").symlink_to(outside / "pkg")  # a package dir that is a symlink
    (repo / "libs" / "up").symlink_to(outside)
    assert packages(repo, "") == ["apps/web", "libs/a/b", "tools/t"]
    assert workspace_of(repo, "apps/web") == "" and workspace_of(repo, "apps/linked") is None
    assert install_paths(repo, "", "apps/web", pnp=False) == [
        "node_modules", "apps/web/node_modules", "libs/a/b/node_modules", "tools/t/node_modules"]


@pytest.mark.parametrize("files, lockfile, install", [
    ({"package.json": json.dumps({"workspaces": ["apps/*"]}), "package-lock.json": "{}"},
     "../../package-lock.json", ["npm", "ci", "--include-workspace-root"]),
    ({"package.json": "{}", "pnpm-workspace.yaml": "packages:\n  - apps/*\n",
      "pnpm-lock.yaml": "lockfileVersion: '9.0'\n"},
     "../../pnpm-lock.yaml", ["npx", "--yes", "pnpm@9", "install", "--frozen-lockfile"]),
    ({"package.json": "\ufeff" + json.dumps({"workspaces": ["apps/*"]}), "package-lock.json": "{}"},
     "../../package-lock.json", ["npm", "ci", "--include-workspace-root"]),  # a byte-order mark, as npm reads past it
    ({"package.json": json.dumps({"workspaces": ["libs/*"]}), "package-lock.json": "{}"},
     "", ["npm", "install"]),  # apps/web is no package of that workspace: no lockfile of its own
], ids=["npm", "pnpm", "npm-bom", "not-a-workspace-package"])
def test_a_workspace_package_installs_from_the_workspace_root_lockfile(
    tmp_path: Path, files: dict[str, str], lockfile: str, install: list[str]
) -> None:
    from worker.detect import Overrides, plan
    repo = tree(tmp_path, {**files, "apps/web/package.json": json.dumps({"scripts": {"build": "x"}})})
    chosen = plan(repo, Overrides(root_directory="apps/web"))
    assert (chosen.lockfile, chosen.install) == (lockfile, install)
    assert any(n.startswith("Workspace: apps/web is a workspace package") for n in chosen.notes) == bool(lockfile)


async def test_a_turborepo_app_builds_its_workspace_dependencies_first(service: Service, git_server: GitServer) -> None:
    name = unique_name("turbo")
    url = git_server.add_repo(name, files_dir=TURBOREPO)
    async with service.http.patch(f"{service.url}/api/projects/{name}/settings",
                                  json={"root_directory": "apps/web"}) as r:
        assert r.status == 200
    final = await service.wait_final((await service.deploy(url, project=name))["id"], timeout=200)
    texts = [e["text"] for e in await service.logs(final["id"])]
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    assert ("Build command: npm exec --no -- turbo run build (Turborepo: turbo.json and turbo at the "
            "repository root build apps/web's workspace dependencies first, as on Vercel)") in texts
    assert "$ npm exec --no -- turbo run build" in texts
    assert any("built @repo/ui" in t for t in texts) and any("built web" in t for t in texts)
    status, _, body = await service.site(name)
    assert status == 200 and b"Hello from a Turborepo package" in body


def test_turbo_runs_through_each_manager_and_only_where_it_is_installed(tmp_path: Path) -> None:
    from worker.detect import Overrides, plan
    app = {"apps/web/package.json": json.dumps({"scripts": {"build": "vite build"}, "devDependencies": {"vite": "7"}})}
    top = {"workspaces": ["apps/*"], "devDependencies": {"turbo": "2.5.8"}}
    web = Overrides(root_directory="apps/web")
    for lockfile, build in (("package-lock.json", ["npm", "exec", "--no", "--", "turbo", "run", "build"]),
                            ("pnpm-lock.yaml", ["npx", "--yes", "pnpm@9", "exec", "turbo", "run", "build"]),
                            ("yarn.lock", ["npx", "--yes", "yarn@1", "turbo", "run", "build"])):
        repo = tree(tmp_path / lockfile, {**app, "package.json": json.dumps(top), "turbo.json": "{}",
                                          lockfile: "lockfileVersion: '9.0'\n" if lockfile.startswith("pnpm") else "{}"})
        chosen = plan(repo, web)
        assert chosen.build == build and chosen.env["TURBO_TELEMETRY_DISABLED"] == "1", lockfile
        # A Vite base can no longer be undone with a flag (turbo would pass it to every
        # package): the site is served under it.
        (repo / "apps" / "web" / "vite.config.js").write_text("export default { base: '/web/' }")
        assert plan(repo, web).site_base == "web/"
        # A build command setting wins; without turbo installed, or outside a workspace, no turbo.
        assert plan(repo, Overrides(root_directory="apps/web", build_command=("sh", "-c", "make"))).build == ["sh", "-c", "make"]
    repo = tree(tmp_path / "no-turbo", {**app, "package.json": json.dumps({"workspaces": ["apps/*"]}),
                                        "turbo.json": "{}", "package-lock.json": "{}"})
    assert plan(repo, web).build == ["npm", "run", "build"]


def test_restore_never_writes_through_a_symlinked_parent(tmp_path: Path) -> None:
    key = cache.Key("package-lock.json", "0" * 64, "20", "npm@11", ("npm", "ci"))
    src = tree(tmp_path / "src", {"apps/web/node_modules/x/index.js": "x", "package-lock.json": "{}"})
    local = cache.LocalCache(tmp_path / "entry", 0)
    local.save(key, src, ["apps/web/node_modules"], "d1")
    checkout = tree(tmp_path / "checkout", {"package-lock.json": "{}"})
    (tmp_path / "elsewhere").mkdir()
    (checkout / "apps").symlink_to(tmp_path / "elsewhere")  # the repository's own symlink
    with pytest.raises(cache.CacheError, match="apps/web is not a directory in the checkout"):
        local.restore(key, checkout, ["apps/web/node_modules"])
    assert not any((tmp_path / "elsewhere").iterdir())
    with pytest.raises(cache.CacheError, match="which this build's install does not write"):
        local.restore(key, checkout, ["node_modules"])


@pytest.mark.parametrize("member, why", [
    (dict(name="modules/node_modules/hard", type=tarfile.LNKTYPE, linkname="etc/passwd"), "a path out"),
    (dict(name="modules/node_modules/hard", type=tarfile.LNKTYPE, linkname="modules/../../x"), "a path out"),
    (dict(name="modules/node_modules/dev", type=tarfile.CHRTYPE), "neither a file"),
    (dict(name="modules/node_modules/up", type=tarfile.SYMTYPE, linkname="../../x"), "out of the build's tree"),
    (dict(name="modules/.git/hooks/post-checkout", type=tarfile.REGTYPE), "which its manifest does not list"),
])
def test_unpack_refuses_a_member_out_of_its_paths(tmp_path: Path, member: dict[str, Any], why: str) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("modules/node_modules")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        info = tarfile.TarInfo(member["name"])
        info.type = member["type"]
        info.linkname = member.get("linkname", "")
        tar.addfile(info, io.BytesIO(b"") if info.type == tarfile.REGTYPE else None)
    (tmp_path / "src").mkdir()
    (tmp_path / "work").mkdir()
    with pytest.raises(cache.CacheError, match=why):
        cache.unpack(archive, tmp_path / "src", ["node_modules"], ["node_modules"], tmp_path / "work")
    assert not any((tmp_path / "src").iterdir()) and not (tmp_path / "x").exists()
