"""Deploying a given commit, recording the commit built, redeploying a deployment, and what the
checkout could not hold (files kept in Git LFS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service

NEWER = {"build.js": (TINY_APP / "build.js").read_text().replace("Hello from tiny", "Hello again")}


@pytest.fixture
def v0_git_server() -> Iterator[GitServer]:
    """A git server that will not serve a commit by SHA alone (protocol v0 only)."""
    with GitServer() as server:
        server.protocol_v2 = False
        yield server


async def deploy_older_commit(service: Service, git: GitServer) -> tuple[dict[str, object], str]:
    name = unique_name("older")
    url = git.add_repo(name, files_dir=TINY_APP, message="First version\n\nWith a body.")
    first = git.head_sha(name)
    git.commit_files(name, NEWER, message="Second version")
    dep = await service.deploy(url, project=name, commit=first)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    status, _, body = await service.site(name)
    assert status == 200 and b"Hello from tiny" in body and b"Hello again" not in body
    return final, first


async def test_an_older_commit_deploys_and_is_recorded(service: Service, git_server: GitServer) -> None:
    final, first = await deploy_older_commit(service, git_server)
    assert final["commit"] == first and final["commit_message"] == "First version"
    texts = [e["text"] for e in await service.logs(str(final["id"]))]
    assert f"$ git fetch --depth 1 origin {first}" in texts
    assert not any("full history" in t for t in texts)  # protocol v2 serves a SHA alone


async def test_without_fetch_by_sha_the_full_history_is_fetched(service: Service, v0_git_server: GitServer) -> None:
    final, first = await deploy_older_commit(service, v0_git_server)
    assert final["commit"] == first
    texts = [e["text"] for e in await service.logs(str(final["id"]))]
    assert any("fetching the full history instead" in t for t in texts)


async def test_the_branch_head_is_recorded_in_full(service: Service, git_server: GitServer) -> None:
    name = unique_name("head")
    url = git_server.add_repo(name, files_dir=TINY_APP, message="Only " + "x" * 300)
    final = await service.wait_final((await service.deploy(url))["id"])
    assert final["commit"] == git_server.head_sha(name)
    assert final["commit_message"] == ("Only " + "x" * 300)[:200]


async def test_a_commit_not_in_the_repository_fails_clearly(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("nosha"), files_dir=TINY_APP)
    final = await service.wait_final((await service.deploy(url, commit="0123456789" * 4))["id"])
    assert final["status"] == "failed"
    assert "0123456789012345678901234567890123456789" in final["reason"]


async def test_redeploy_builds_the_same_commit_and_settings(service: Service, git_server: GitServer) -> None:
    name = unique_name("again")
    url = git_server.add_repo(name, files_dir=TINY_APP)
    first = await service.deploy(url, project=name, settings={"build_command": "node build.js"})
    built = await service.wait_final(first["id"])
    git_server.commit_files(name, NEWER)  # the branch moved on: a redeploy stays put
    status, again = await service.post_json(f"/api/deployments/{first['id']}/redeploy", None)
    assert status == 202, again
    assert again["id"] != first["id"] and again["commit"] == built["commit"]
    assert again["settings"] == {"build_command": "node build.js"}
    final = await service.wait_final(again["id"])
    assert final["status"] == "ready", final["reason"]
    assert b"Hello again" not in (await service.site(name))[2]
    assert final["is_production"]


async def test_redeploy_of_an_unknown_deployment_is_404(service: Service) -> None:
    status, answer = await service.post_json("/api/deployments/aaaaaaaaaaaa/redeploy", None)
    assert status == 404 and "no deployment" in answer["error"]


async def test_redeploy_records_who_asked_and_may_skip_the_cache(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("who"), files_dir=TINY_APP)
    first = await service.wait_final((await service.deploy(url))["id"])
    status, again = await service.post_json(f"/api/deployments/{first['id']}/redeploy",
                                            {"trigger": "cli", "cache": False})
    assert status == 202, again
    assert again["trigger"] == "cli" and again["cache"] is False
    assert (await service.wait_final(again["id"]))["status"] == "ready"
    status, answer = await service.post_json(f"/api/deployments/{first['id']}/redeploy", {"trigger": "robot"})
    assert status == 400 and "trigger must be one of" in answer["error"]
    status, answer = await service.post_json(f"/api/deployments/{first['id']}/redeploy", {"branch": "x"})
    assert status == 400 and "branch" in answer["error"]


POINTER = ("version https://git-lfs.github.com/spec/v1\n"
           "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
           "size 12345\n")


async def test_files_kept_in_git_lfs_are_named_in_the_log(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("lfs"), files_dir=TINY_APP, files={
        ".gitattributes": "*.png filter=lfs diff=lfs merge=lfs -text\n",
        "public/hero.png": POINTER, "public/nested/logo.png": POINTER,
        "public/before-lfs.png": b"\x89PNG\r\n\x1a\n" + bytes(64),  # committed as content
        "docs/pointer-example.txt": POINTER,  # no LFS attribute: a text like any other
    })
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = [e["text"] for e in await service.logs(dep["id"])]
    warned = [t for t in texts if "Git LFS" in t]
    assert warned == [
        "Warning: 2 files are kept in Git LFS and checked out as LFS pointers, not their contents: "
        "public/hero.png, public/nested/logo.png. DeployHub does not fetch Git LFS objects; a build "
        "or a site that uses these files gets the pointer's text. Commit them to git itself to "
        "deploy them."], texts


async def test_a_repository_without_git_lfs_files_says_nothing_of_it(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("nolfs"), files_dir=TINY_APP,
                              files={".gitattributes": "*.js text eol=lf\n"})
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    assert not [e for e in await service.logs(dep["id"]) if "LFS" in e["text"]]
