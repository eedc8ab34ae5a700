"""Every way a build can fail ends `failed` with a reason a person can act on, quickly."""

from __future__ import annotations

import json
import time

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service

TINY_PACKAGE = json.loads((TINY_APP / "package.json").read_text())


async def failed_reason(service: Service, url: str, timeout: float = 30) -> str:
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"], timeout=timeout)
    assert final["status"] == "failed"
    return str(final["reason"])


async def test_missing_repository_fails_fast(service: Service, git_server: GitServer) -> None:
    started = time.monotonic()
    reason = await failed_reason(service, git_server.url_for(unique_name("missing")))
    assert reason.startswith("could not clone")
    assert time.monotonic() - started < 15


async def test_repository_asking_for_credentials_fails_without_prompt(
    service: Service, git_server: GitServer
) -> None:
    name = unique_name("private")
    git_server.add_repo(name, files_dir=TINY_APP, private=True)
    started = time.monotonic()
    reason = await failed_reason(service, git_server.url_for(name, private=True))
    assert reason.startswith("could not clone")
    assert time.monotonic() - started < 15


async def test_missing_branch_fails(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url, branch="does-not-exist")
    final = await service.wait_final(dep["id"])
    assert final["status"] == "failed" and "could not clone" in final["reason"]


async def test_no_package_json(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("empty"), files={"README.md": "hi\n"})
    assert "No package.json" in await failed_reason(service, url)


async def test_no_build_script(service: Service, git_server: GitServer) -> None:
    package = {**TINY_PACKAGE, "scripts": {"test": "true"}}
    url = git_server.add_repo(unique_name("nobuild"), files={"package.json": json.dumps(package)})
    assert 'no "build" script' in await failed_reason(service, url)


async def test_failing_build_shows_exit_code_and_last_lines(
    service: Service, git_server: GitServer
) -> None:
    url = git_server.add_repo(
        unique_name("failing"), files_dir=TINY_APP, files={"tiny.json": '{"fail": 1}'}
    )
    reason = await failed_reason(service, url)
    assert "exited with code 1" in reason
    assert "tiny build failed on purpose" in reason


async def test_no_output_directory_names_what_was_tried(
    service: Service, git_server: GitServer
) -> None:
    package = {**TINY_PACKAGE, "scripts": {"build": "node -e \"console.log('built nothing')\""}}
    url = git_server.add_repo(unique_name("noout"), files={"package.json": json.dumps(package)})
    reason = await failed_reason(service, url)
    assert "no output directory" in reason
    for name in ("dist", "build", "out"):
        assert name in reason


async def test_failure_reason_is_also_in_the_log(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("empty"), files={"README.md": "hi\n"})
    dep = await service.deploy(url)
    await service.wait_final(dep["id"])
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert any(t.startswith("Error: No package.json") for t in texts)


async def test_webpack4_md4_on_new_node_says_how_to_build_and_the_advice_works(
    service: Service, git_server: GitServer
) -> None:
    # webpack 4 (react-scripts 4 and older) hashes with MD4, which Node 17+ lost: the real
    # error, from this machine's Node, then the variable the advice names makes it build.
    md4 = ("node -e \"require('crypto').createHash('md4').update('x').digest('hex')\""
           " && mkdir -p dist && echo ok > dist/index.html")
    package = {**TINY_PACKAGE, "scripts": {"build": md4}}
    name = unique_name("md4")
    url = git_server.add_repo(name, files={"package.json": json.dumps(package)})
    dep = await service.deploy(url, project=name)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "failed"
    assert "ERR_OSSL_EVP_UNSUPPORTED" in final["reason"] and "ask for Node 16" in final["reason"]
    assert "NODE_OPTIONS=--openssl-legacy-provider" in final["reason"]
    body = {"variables": {"NODE_OPTIONS": {"value": "--openssl-legacy-provider"}}}
    async with service.http.patch(f"{service.url}/api/projects/{name}/variables", json=body) as r:
        assert r.status == 200
    again = await service.deploy(url, project=name)
    final = await service.wait_final(again["id"])
    assert final["status"] == "ready", final["reason"]


async def test_a_failure_with_no_known_cause_gets_no_advice(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(
        unique_name("failing"), files_dir=TINY_APP, files={"tiny.json": '{"fail": 1}'}
    )
    reason = await failed_reason(service, url)
    assert reason.startswith("`npm run build` exited with code 1. Last lines:")


async def test_a_build_tool_that_is_not_installed_is_named(service: Service, git_server: GitServer) -> None:
    package = {**TINY_PACKAGE, "scripts": {"build": "vite build"}}  # vite in no dependencies
    url = git_server.add_repo(unique_name("notool"), files={"package.json": json.dumps(package)})
    reason = await failed_reason(service, url)
    assert "vite is not installed: add the package that provides it to package.json" in reason
    assert reason.endswith("sh: 1: vite: not found")
