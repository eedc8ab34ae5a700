"""The per-project build cache, end to end with real npm against the registry: a warm build
restores node_modules (hardlinked) and says so; a changed lockfile or a corrupt entry is
ignored; `"cache": false` skips it; two projects never share a package manager cache. And a
build that needs more than 1 GiB deploys under the default memory limit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deployhub.settings import default_build_memory_mb
from tests.support.infra import FIXTURES_DIR, GitServer, RedisServer, S3Server, unique_name
from tests.support.service import Service, StartService, make_settings
from worker.cache import owner_digest
from worker.sandbox import limits_in_force

CACHED = FIXTURES_DIR / "cached"
BIGMEM = FIXTURES_DIR / "bigmem"
pytestmark = pytest.mark.timeout(300)
# is-number 6.0.0 instead of 7.0.0: another lockfile, as `npm install is-number@6` writes it.
V6 = ("7.0.0", "6.0.0", "sha512-41Cifkg6e8TylSpdtTpeLVMqvSBEVzTttHvERD741+pnZ8ANv0004MRL43QKPDlK9cGvNp6NZWZUBlbGXYxxng==",
      "sha512-Wu1VHeILBK8KAWJUAiSZQX94GmOE45Rg6/538fKwiloUu21KncEkYGPqob2oSZ5mUT73vLGrHQjKw3KMPwfDzg==")


async def build(service: Service, url: str, **extra: Any) -> tuple[dict[str, Any], list[str]]:
    """Deploy to the end of its log: the cache is saved after `ready`."""
    dep = await service.deploy(url, **extra)
    final = await service.wait_final(dep["id"], timeout=200)
    deadline = time.monotonic() + 60
    while True:
        texts = [e["text"] for e in await service.logs(dep["id"])]
        if final["status"] != "ready" or any(t.startswith("Build cache: saved") or
                                             t.startswith("Build cache: not saved") for t in texts):
            return final, texts
        assert time.monotonic() < deadline, texts[-10:]
        await asyncio.sleep(0.2)


def printed(texts: list[str], name: str) -> str:
    return next(t.split(" ", 1)[1] for t in texts if t.startswith(f"cache-{name} "))


def entry_dir(service: Service, project: str) -> Path:
    return service.settings.data_dir / "cache" / "projects" / project / owner_digest(service.token_id)


async def test_warm_build_restores_hardlinked_node_modules_and_logs_it(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("cache"), files_dir=CACHED)
    cold, first = await build(service, url)
    assert cold["status"] == "ready", (cold["reason"], first[-15:])
    assert "Build cache: not restored: there is none yet (the first successful build saves it)" in " ".join(first)
    assert "$ npm ci" in first and any(t.startswith("Build cache: saved node_modules") for t in first)
    warm, second = await build(service, url)
    assert warm["status"] == "ready", (warm["reason"], second[-15:])
    assert any(t.startswith("Build cache: restored node_modules (") and "hardlinked) in " in t for t in second)
    assert "$ npm install --prefer-offline --no-audit --no-fund" in second and "$ npm ci" not in second
    # The very file the first build installed (moved into the cache, linked back), not a copy.
    assert printed(second, "inode") == printed(first, "inode")
    status, _, body = await service.site(warm["project"])
    assert status == 200 and b"cached true" in body
    assert entry_dir(service, warm["project"]).is_dir()
    await delete_project(service, warm["project"])  # a later project of that name starts empty
    assert not (service.settings.data_dir / "cache" / "projects" / warm["project"]).exists()


async def delete_project(service: Service, project: str) -> None:
    async with service.http.delete(f"{service.url}/api/projects/{project}") as resp:
        assert resp.status == 200, await resp.text()


async def test_changed_lockfile_ignores_the_cache(service: Service, git_server: GitServer) -> None:
    name = unique_name("cache")
    url = git_server.add_repo(name, files_dir=CACHED)
    assert (await build(service, url))[0]["status"] == "ready"
    package = (CACHED / "package.json").read_text().replace(V6[0], V6[1])
    lock = (CACHED / "package-lock.json").read_text().replace(f'"{V6[0]}"', f'"{V6[1]}"').replace(V6[2], V6[3])
    git_server.commit_files(name, {"package.json": package, "package-lock.json": lock})
    final, texts = await build(service, url)
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    assert any("Build cache: not restored: package-lock.json changed since it was saved" in t for t in texts)
    assert "$ npm ci" in texts


async def test_package_json_the_lockfile_lacks_still_fails_as_npm_ci_does(service: Service, git_server: GitServer) -> None:
    name = unique_name("cache")
    url = git_server.add_repo(name, files_dir=CACHED)
    assert (await build(service, url))[0]["status"] == "ready"
    package = (CACHED / "package.json").read_text().replace(V6[0], V6[1])  # the lockfile is not
    git_server.commit_files(name, {"package.json": package})
    final, texts = await build(service, url)
    assert any(t.startswith("Build cache: restored node_modules") for t in texts)
    assert "npm install changed package-lock.json (it does not match package.json): installing " \
           "from scratch with npm ci, which checks it" in texts
    assert final["status"] == "failed" and "package-lock.json is out of date" in final["reason"]


@pytest.mark.parametrize("damage", ["file written through a link", "manifest cut short"])
async def test_corrupt_cache_is_ignored_and_rebuilt(service: Service, git_server: GitServer, damage: str) -> None:
    url = git_server.add_repo(unique_name("cache"), files_dir=CACHED)
    first, _ = await build(service, url)
    entry = entry_dir(service, first["project"])
    if damage == "manifest cut short":
        manifest = entry / "modules.json"
        manifest.write_bytes(manifest.read_bytes()[:40])
    else:
        with open(entry / "modules" / "node_modules" / "is-number" / "index.js", "a") as f:
            f.write("\nmodule.exports = () => 'poisoned';\n")
    final, texts = await build(service, url)
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    assert any(t.startswith("Build cache: not restored: ") and "(corrupt" in t for t in texts), texts
    assert "$ npm ci" in texts
    status, _, body = await service.site(final["project"])
    assert status == 200 and b"cached true" in body


async def test_cache_false_skips_the_cache_and_saves_a_new_one(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("cache"), files_dir=CACHED)
    first, texts = await build(service, url)
    assert printed(texts, "seen") == "none"
    final, texts = await build(service, url, cache=False)
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    assert any(t.startswith('Build cache: skipped for this deployment ("cache": false)') for t in texts)
    assert "$ npm ci" in texts and printed(texts, "seen") == "none"  # no package manager cache either
    assert any(t.startswith("Build cache: saved node_modules") for t in texts)
    status, body = await service.post_json("/api/deployments", {"repo_url": url, "cache": "no"})
    assert status == 400 and "cache must be true or false" in body["error"]


async def test_projects_never_share_package_manager_caches(service: Service, git_server: GitServer) -> None:
    one = git_server.add_repo(unique_name("cache"), files_dir=CACHED)
    other = git_server.add_repo(unique_name("cache"), files_dir=CACHED)
    first, a1 = await build(service, one)
    _, a2 = await build(service, one)
    second, b1 = await build(service, other)
    assert printed(a1, "path") == printed(b1, "path") == "/build/cache/npm"  # as the build sees it
    assert printed(a1, "seen") == "none" and printed(b1, "seen") == "none"
    assert printed(a2, "seen") != "none"  # a project's own next build does see its cache
    for project in (first["project"], second["project"]):
        marks = list((entry_dir(service, project) / "managers" / "npm").glob("seen-*"))
        assert len(marks) == (2 if project == first["project"] else 1)
    assert not (service.settings.data_dir / "cache" / "npm").exists()


async def test_cli_deploy_no_cache(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("cache"), files_dir=CACHED)
    assert (await build(service, url))[0]["status"] == "ready"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployhub", "deploy", url, "--no-cache", "--json", "--server",
        service.url, "--token", service.token, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err
    final = await service.wait_final(json.loads(out)["id"], timeout=200)
    texts = [e["text"] for e in await service.logs(final["id"])]
    assert final["status"] == "ready" and "$ npm ci" in texts
    assert any(t.startswith('Build cache: skipped for this deployment ("cache": false)') for t in texts)


@pytest.mark.parametrize("memory_mb", [0, 1024], ids=["default-limit", "1-GiB-limit"])
async def test_build_needing_more_than_1_gib_deploys_under_the_default_limit(
    start_service: StartService, redis_server: Any, git_server: GitServer, memory_mb: int
) -> None:
    if not limits_in_force().get("memory"):
        pytest.skip("no cgroup memory limit can be enforced on this machine")
    service = await start_service(redis=redis_server, **({"build_memory_mb": memory_mb} if memory_mb else {}))
    limit = memory_mb or default_build_memory_mb()
    dep = await service.deploy(git_server.add_repo(unique_name("bigmem"), files_dir=BIGMEM))
    final = await service.wait_final(dep["id"], timeout=120)
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert any(t.startswith(f"Limits: memory {limit} MiB") for t in texts), texts[:20]
    if memory_mb:  # the same build under 1 GiB: the limit is real and the build needs more
        assert final["status"] == "failed" and "ran out of memory" in final["reason"]
    else:
        assert limit > 1280 and final["status"] == "ready", (final["reason"], texts[-10:])
        assert "held 1280 MiB" in texts



async def test_with_s3_storage_the_cache_is_an_archive_in_the_bucket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer,
    s3_server: S3Server, s3_bucket: str, start_service: StartService, git_server: GitServer,
) -> None:
    for name, value in s3_server.aws_env().items():
        monkeypatch.setenv(name, value)
    service = await start_service(make_settings(
        tmp_path / "data", redis_server.url, storage="s3", s3_bucket=s3_bucket, s3_prefix="dh",
        s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region,
    ))
    url = git_server.add_repo(unique_name("cache"), files_dir=CACHED)
    first, texts = await build(service, url)
    assert any(t.startswith("Build cache: saved node_modules (a ") and "to storage" in t for t in texts), texts[-5:]
    prefix = f"dh/cache/{first['project']}/{owner_digest(service.token_id)}/"
    client = s3_server.client()
    try:
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix)["Contents"]}
        assert keys == {prefix + "modules.tar.gz", prefix + "modules.json"}
        final, texts = await build(service, url)
        assert any(t.startswith("Build cache: restored node_modules (") and "unpacked from storage" in t
                   for t in texts), texts
        assert "$ npm install --prefer-offline --no-audit --no-fund" in texts
        client.put_object(Bucket=s3_bucket, Key=prefix + "modules.tar.gz", Body=b"not a tarball")
    finally:
        client.close()
    final, texts = await build(service, url)
    assert final["status"] == "ready" and "$ npm ci" in texts
    assert any("not restored: its archive does not match its manifest (corrupt)" in t for t in texts)
    await delete_project(service, first["project"])
    client = s3_server.client()
    try:
        assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket, Prefix=f"dh/cache/{first['project']}/")
    finally:
        client.close()
