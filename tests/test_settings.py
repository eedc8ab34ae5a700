"""Project settings: stored per project, checked at the edge, fixed on each deployment, and
the root directory setting end to end."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service


async def patch(service: Service, name: str, body: Any) -> tuple[int, Any]:
    async with service.http.patch(f"{service.url}/api/projects/{name}/settings", json=body) as r:
        return r.status, await r.json()


def frontend_files() -> dict[str, str | bytes]:
    """The tiny app moved to frontend/, as in a repository with several parts."""
    files: dict[str, str | bytes] = {
        f"frontend/{p.name}": p.read_bytes() for p in TINY_APP.iterdir() if p.is_file()
    }
    files["README.md"] = "The app lives in frontend/.\n"
    return files


async def test_settings_round_trip_before_the_first_deploy(service: Service) -> None:
    name = unique_name("sets")
    status, answer = await patch(service, name, {
        "root_directory": "./frontend/", "build_command": "npm run build -- --mode prod",
        "node_version": ">=18 <21", "branch": "release/1"})
    assert status == 200, answer
    assert answer["settings"] == {
        "branch": "release/1", "root_directory": "frontend", "install_command": None,
        "build_command": "npm run build -- --mode prod", "output_directory": None,
        "node_version": ">=18 <21"}
    for spec in ("20", "20.x", "v20.1.0", ">=18 <21", "^18 || ^20", "lts/iron", "lts/*"):
        status, answer = await patch(service, name, {"branch": None, "node_version": spec})
        assert status == 200 and answer["settings"]["node_version"] == spec, answer
    assert answer["settings"]["branch"] is None
    status, got = await service.get_json(f"/api/projects/{name}/settings")
    assert status == 200 and got == answer and got["webhook_secret_set"] is False


@pytest.mark.parametrize("body, fragment", [
    ({"root_directory": "../up"}, "no '..'"),
    ({"root_directory": "a/../../b"}, "no '..'"),
    ({"output_directory": "/etc"}, "not an absolute path"),
    ({"output_directory": "dist\x00"}, "control characters"),
    ({"root_directory": "a\nb"}, "control characters"),
    ({"root_directory": "a\\b"}, "backslashes"),
    ({"root_directory": "x" * 256}, "longer than 255"),
    ({"root_directory": 3}, "must be a string"),
    ({"build_command": ""}, "non-empty string"),
    ({"install_command": "npm ci\x00rm -rf /"}, "no NUL"),
    ({"build_command": "x" * 5000}, "under 4096 bytes"),
    ({"node_version": "20; rm -rf /"}, "node_version must be"),
    ({"node_version": "---"}, "node_version must be"),
    ({"node_version": "vvv"}, "node_version must be"),
    ({"node_version": "--registry=http://evil"}, "node_version must be"),
    ({"branch": "--force"}, "branch"),
    ({"webhook_secret": "short"}, "webhook_secret must be"),
    ({"colour": "red"}, "unknown setting 'colour'"),
    ({}, "non-empty object"),
])
async def test_bad_settings_get_400(service: Service, body: object, fragment: str) -> None:
    status, answer = await patch(service, unique_name("bad"), body)
    assert status == 400 and fragment in answer["error"], answer


async def test_settings_of_another_token_are_not_found(service: Service) -> None:
    name = unique_name("mine")
    assert (await patch(service, name, {"node_version": "20"}))[0] == 200
    async with service.http.get(f"{service.url}/api/projects/{name}/settings",
                                headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401


async def test_a_deploy_fixes_its_settings_and_overrides_win(service: Service) -> None:
    name = unique_name("fixed")
    await patch(service, name, {"build_command": "node build.js", "node_version": "20"})
    dep = await service.deploy("http://127.0.0.1:9/nowhere.git", project=name,
                               settings={"node_version": None, "output_directory": "dist"},
                               commit="A" * 40)
    assert dep["settings"] == {"build_command": "node build.js", "output_directory": "dist"}
    assert dep["commit"] == "a" * 40 and dep["commit_message"] is None
    await patch(service, name, {"build_command": "exit 1"})  # later edits change no deployment
    _, again = await service.get_json(f"/api/deployments/{dep['id']}")
    assert again["settings"]["build_command"] == "node build.js"


@pytest.mark.parametrize("extra, fragment", [
    ({"commit": "abc123"}, "full 40-hex-digit"),
    ({"commit": "g" * 40}, "full 40-hex-digit"),
    ({"settings": {"root_directory": "/"}}, "absolute"),
    ({"settings": {"webhook_secret": "generate"}}, "unknown setting"),
    ({"settings": "frontend"}, "settings must be"),
])
async def test_bad_deploy_overrides_get_400(service: Service, extra: dict[str, object], fragment: str) -> None:
    status, answer = await service.post_json(
        "/api/deployments", {"repo_url": "http://127.0.0.1:9/x.git", **extra})
    assert status == 400 and fragment in answer["error"], answer


async def test_an_app_in_a_root_directory_deploys(service: Service, git_server: GitServer) -> None:
    name = unique_name("mono")
    url = git_server.add_repo(name, files=frontend_files())
    assert (await patch(service, name, {"root_directory": "frontend"}))[0] == 200
    dep = await service.deploy(url, project=name)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    status, _, body = await service.site(name)
    assert status == 200 and b"Hello from tiny" in body
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert "Root directory: frontend (project setting)" in texts
    assert any(t.startswith("Output: frontend/dist ") for t in texts)


async def test_commands_run_through_the_shell_in_the_root_directory(service: Service, git_server: GitServer) -> None:
    name = unique_name("cmds")
    url = git_server.add_repo(name, files=frontend_files())
    dep = await service.deploy(url, project=name, settings={
        "root_directory": "frontend", "install_command": "echo installing in $(basename $PWD)",
        "build_command": "node build.js && mv dist public", "output_directory": "public"})
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert "installing in frontend" in texts


@pytest.mark.parametrize("symlink", [False, True])
async def test_a_root_directory_that_is_missing_or_a_symlink_fails(
        service: Service, git_server: GitServer, symlink: bool) -> None:
    name = unique_name("noroot")
    url = git_server.add_repo(name, files={"app/package.json": json.dumps({"scripts": {"build": "true"}})})
    if symlink:  # frontend -> app: a real app behind it, still refused
        _commit_symlink(str(git_server.root / f"{name}.git"), "frontend", "app")
    dep = await service.deploy(url, project=name, settings={"root_directory": "frontend"})
    final = await service.wait_final(dep["id"])
    assert final["status"] == "failed"
    assert "The root directory frontend (project setting) is not a directory" in final["reason"]
    assert "symlink" in final["reason"]


def _commit_symlink(url: str, link: str, target: str) -> None:
    """Push a commit adding the symlink `link` -> `target` (add_repo writes regular files)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "w"
        env = {"PATH": os.environ["PATH"], "HOME": tmp, "GIT_CONFIG_NOSYSTEM": "1",
               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
        subprocess.run(["git", "clone", "-q", url, str(work)], check=True, env=env)
        (work / link).symlink_to(target)
        for args in (["add", "-A"], ["commit", "-qm", "link"], ["push", "-q", "origin", "main"]):
            subprocess.run(["git", *args], cwd=work, check=True, env=env)


async def test_a_root_directory_without_package_json_says_where_it_looked(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("nopkg"), files={"frontend/README.md": "nothing\n"})
    final = await service.wait_final((await service.deploy(url, settings={"root_directory": "frontend"}))["id"])
    assert final["status"] == "failed"
    assert "No package.json at the root directory frontend (project setting)" in final["reason"]


async def test_deleting_a_project_forgets_its_settings(service: Service) -> None:
    status, _ = await patch(service, "forgotten", {"root_directory": "frontend"})
    assert status == 200
    async with service.http.delete(service.url + "/api/projects/forgotten") as response:
        assert response.status == 200, await response.text()
    status, body = await patch(service, "forgotten", {"branch": None})  # free again, and empty
    assert status == 200 and body["settings"]["root_directory"] is None


async def test_an_app_in_a_subfolder_deploys_without_a_root_directory_setting(
    service: Service, git_server: GitServer
) -> None:
    files = {f"frontend/{p.name}": p.read_bytes() for p in TINY_APP.iterdir()}
    url = git_server.add_repo(unique_name("subapp"), files={**files, "README.md": "the app is in frontend/\n"})
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert any(t.startswith("Root directory: frontend (detected: the only package.json") for t in texts)
    assert "Output: frontend/dist (a usual output directory)" in texts
    status, _, body = await service.site(final["project"])
    assert status == 200 and b"tiny" in body
