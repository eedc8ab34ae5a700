"""Submodules: each one the commit pins is fetched at that commit, from a URL checked as the
repository's own (relative and ssh URLs resolved as git resolves them), nested ones too;
a URL that points inside the network is refused before anything connects to it."""

from __future__ import annotations

import json

import pytest

from tests.support.infra import GitServer, unique_name
from tests.support.service import Service
from worker.submodules import declared_urls, fetch_url, gitlinks, pinned

BUILD_JS = """const fs = require("fs");
const read = (p) => (fs.existsSync(p) ? fs.readFileSync(p, "utf8").trim() : "missing");
fs.mkdirSync("dist", { recursive: true });
fs.writeFileSync("dist/index.html",
  `<p>${read("vendor/ui/banner.txt")}</p><p>${read("vendor/ui/deep/deep.txt")}</p>`);
"""
APP = {"package.json": json.dumps({"name": "sm", "version": "1.0.0", "scripts": {"build": "node build.js"}}),
       "build.js": BUILD_JS}


def gitmodules(entries: dict[str, str]) -> str:
    return "".join(f'[submodule "{path}"]\n\tpath = {path}\n\turl = {url}\n' for path, url in entries.items())


async def deploy_final(service: Service, url: str) -> tuple[dict[str, object], list[str]]:
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"], timeout=90)
    return final, [e["text"] for e in await service.logs(dep["id"])]


async def test_pinned_submodules_and_theirs_are_checked_out(service: Service, git_server: GitServer) -> None:
    deep = unique_name("deep")
    git_server.add_repo(deep, files={"deep.txt": "from the nested submodule\n"})
    ui = unique_name("ui")
    git_server.add_repo(ui, files={"banner.txt": "pinned banner\n", ".gitmodules": gitmodules(
        {"deep": git_server.url_for(deep)})}, gitlinks={"deep": git_server.head_sha(deep)})
    pin = git_server.head_sha(ui)
    git_server.commit_files(ui, {"banner.txt": "a newer banner nobody pinned\n"})
    app = unique_name("app")
    url = git_server.add_repo(app, files={**APP, ".gitmodules": gitmodules({"vendor/ui": f"../{ui}.git"})},
                              gitlinks={"vendor/ui": pin})
    final, texts = await deploy_final(service, url)
    assert final["status"] == "ready", (final["reason"], texts[-10:])
    assert (f"Submodule vendor/ui: {git_server.url_for(ui)} at {pin[:12]} (../{ui}.git is relative "
            f"to {url})") in texts
    assert any(t.startswith(f"Submodule vendor/ui/deep: {git_server.url_for(deep)} at ") for t in texts)
    status, _, body = await service.site(str(final["project"]))
    assert status == 200 and body == b"<p>pinned banner</p><p>from the nested submodule</p>"


@pytest.mark.parametrize("sub_url, reason", [
    ("http://10.20.30.40/team/ui.git", "resolves to a non-public address (10.20.30.40)"),
    ("http://169.254.169.254/latest.git", "resolves to a non-public address (169.254.169.254)"),
    ("file:///etc/ui.git", "must be an http:// or https:// URL"),
    ("ext::sh", "must be an http:// or https:// URL"),
])
async def test_a_submodule_url_inside_the_network_is_refused_before_any_connection(
    service: Service, git_server: GitServer, sub_url: str, reason: str
) -> None:
    # IP literals: the check needs no name lookup, and it refuses before git runs.
    url = git_server.add_repo(unique_name("evil"), files={**APP, ".gitmodules": gitmodules({"vendor/ui": sub_url})},
                              gitlinks={"vendor/ui": "a" * 40})
    final, texts = await deploy_final(service, url)
    assert final["status"] == "failed"
    assert f"could not fetch the submodule vendor/ui ({sub_url})" in str(final["reason"])
    assert reason in str(final["reason"])
    assert not any(t.startswith("Submodule vendor/ui:") for t in texts)  # never fetched
    assert not any(t.startswith("--- installing") for t in texts)


async def test_a_pinned_commit_the_submodule_lacks_fails_saying_which(service: Service, git_server: GitServer) -> None:
    ui = unique_name("ui")
    git_server.add_repo(ui, files={"banner.txt": "hi\n"})
    url = git_server.add_repo(unique_name("app"), files={**APP, ".gitmodules": gitmodules(
        {"vendor/ui": git_server.url_for(ui)})}, gitlinks={"vendor/ui": "b" * 40})
    final, _ = await deploy_final(service, url)
    assert final["status"] == "failed"
    assert f"could not fetch the submodule vendor/ui from {git_server.url_for(ui)} at bbbbbbbbbbbb" in str(
        final["reason"])


async def test_a_repository_committed_inside_without_a_url_is_a_warning(service: Service, git_server: GitServer) -> None:
    other = unique_name("nested")
    git_server.add_repo(other, files={"banner.txt": "x\n"})
    url = git_server.add_repo(unique_name("app"), files=APP, gitlinks={"vendor/ui": git_server.head_sha(other)})
    final, texts = await deploy_final(service, url)
    assert final["status"] == "ready", final["reason"]
    assert any(t.startswith("Warning: vendor/ui is a repository inside the repository (a gitlink)") for t in texts)
    status, _, body = await service.site(str(final["project"]))
    assert status == 200 and b"missing" in body


def test_gitlinks_and_their_urls_are_read_from_gits_output() -> None:
    stage = b"\x00".join([b"100644 " + b"1" * 40 + b" 0\tpackage.json", b"160000 " + b"2" * 40 + b" 0\tvendor/a b",
                          b"160000 " + b"3" * 40 + b" 0\tlib/no-url", b""])
    assert gitlinks(stage) == {"vendor/a b": "2" * 40, "lib/no-url": "3" * 40}
    listing = b"\x00".join([b"submodule.a.b.path\nvendor/a b", b"submodule.a.b.url\nhttps://h/o/a.git",
                            b"core.bare\nfalse", b"submodule.gone.path\nlib/gone", b""])
    assert declared_urls(listing) == {"vendor/a b": "https://h/o/a.git", "lib/gone": ""}
    assert [(s.path, s.url) for s in pinned(stage, listing)] == [("lib/no-url", ""), ("vendor/a b", "https://h/o/a.git")]


@pytest.mark.parametrize("url, parent, fetched", [
    ("../ui.git", "https://github.com/team/app.git", "https://github.com/team/ui.git"),
    ("./libs/ui", "https://git.example/team/app", "https://git.example/team/app/libs/ui"),
    ("../../other/ui.git", "https://github.com/team/app.git/", "https://github.com/other/ui.git"),
    ("git@github.com:team/ui.git", "https://github.com/team/app.git", "https://github.com/team/ui.git"),
    ("ssh://git@gitlab.com/team/ui.git", "https://gitlab.com/team/app", "https://gitlab.com/team/ui.git"),
    ("https://github.com/team/ui.git", "https://x/y", "https://github.com/team/ui.git"),
    ("file:///etc/passwd", "https://x/y", "file:///etc/passwd"),  # left for the URL check to refuse
    ("C:\\repos\\ui", "https://x/y", "C:\\repos\\ui"),
])
def test_submodule_urls_resolve_as_git_resolves_them(url: str, parent: str, fetched: str) -> None:
    assert fetch_url(url, parent)[0] == fetched
