"""The GitHub push webhook: signed by the project's secret, deploys pushes to its branch."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.infra import TINY_APP, GitServer, RedisServer, unique_name
from tests.support.service import Service, StartService, make_settings
from tests.test_lifecycle import wait_building


async def new_secret(service: Service, name: str) -> str:
    async with service.http.patch(f"{service.url}/api/projects/{name}/settings",
                                  json={"webhook_secret": "generate"}) as r:
        answer = await r.json()
    assert r.status == 200 and answer["webhook_secret_set"], answer
    return str(answer["webhook_secret"])


def push(url: str, after: str, branch: str = "main") -> dict[str, Any]:
    return {"ref": f"refs/heads/{branch}", "after": after, "deleted": False,
            "repository": {"clone_url": url, "default_branch": "main"}}


async def hook(service: Service, payload: Any, secret: str | None, *, event: str = "push",
               query: str = "", signature: str | None = None) -> tuple[int, Any]:
    raw = json.dumps(payload).encode()
    headers = {"X-GitHub-Event": event, "Content-Type": "application/json"}
    if secret is not None:
        headers["X-Hub-Signature-256"] = signature or (
            "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest())
    async with aiohttp.ClientSession() as anonymous:  # no token: the signature is the auth
        async with anonymous.post(f"{service.url}/api/hooks/github{query}", data=raw,
                                  headers=headers) as r:
            return r.status, await r.json()


async def deployments(service: Service, name: str) -> list[dict[str, Any]]:
    _, body = await service.get_json(f"/api/projects/{name}/deployments")
    return list(body["deployments"])


async def test_the_secret_is_shown_once_and_ping_is_answered(service: Service) -> None:
    name = unique_name("ping")
    secret = await new_secret(service, name)
    status, got = await service.get_json(f"/api/projects/{name}/settings")
    assert got["webhook_secret_set"] is True and secret not in json.dumps(got)
    status, answer = await hook(service, {"zen": "Keep it simple."}, secret, event="ping",
                                query=f"?project={name}")
    assert status == 200 and answer == {"ok": True, "project": name}


async def test_a_bad_or_missing_signature_is_401_and_deploys_nothing(service: Service) -> None:
    name = unique_name("unsigned")
    secret = await new_secret(service, name)
    payload = push("http://127.0.0.1:9/x.git", "a" * 40)
    for key, sig in ((None, None), ("wrong-secret-0123456789", None), (secret, "sha256=" + "0" * 64),
                     (secret, "sha1=abc"), (secret, "sha256=ü")):
        status, answer = await hook(service, payload, key, query=f"?project={name}", signature=sig)
        assert status == 401 and "X-Hub-Signature-256" in answer["error"]
    status, _ = await hook(service, payload, secret)  # found by clone_url: none has it
    assert status == 401
    assert await deployments(service, name) == []


async def test_other_branches_and_events_are_acknowledged_and_ignored(service: Service) -> None:
    name = unique_name("ignored")
    secret = await new_secret(service, name)
    status, answer = await hook(service, push("http://127.0.0.1:9/x.git", "b" * 40, "feature"),
                                secret, query=f"?project={name}")
    assert status == 202 and answer["deployed"] is False and "refs/heads/feature" in answer["reason"]
    status, answer = await hook(service, {}, secret, event="issues", query=f"?project={name}")
    assert status == 202 and "only push" in answer["reason"]
    assert await deployments(service, name) == []


async def test_a_bad_payload_is_400(service: Service) -> None:
    name = unique_name("badhook")
    secret = await new_secret(service, name)
    status, answer = await hook(service, push("http://127.0.0.1:9/x.git", "not-a-sha"), secret,
                                query=f"?project={name}")
    assert status == 400 and "40-hex" in answer["error"]
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.post(f"{service.url}/api/hooks/github?project={name}",
                                  data=io.BytesIO(b"x" * (1024 * 1024 + 1))) as r:
            assert r.status == 400 and "larger than" in (await r.json())["error"]


async def test_a_push_to_the_branch_deploys_its_commit(service: Service, git_server: GitServer) -> None:
    name = unique_name("pushed")
    url = git_server.add_repo(name, files_dir=TINY_APP)
    assert (await service.wait_final((await service.deploy(url, project=name))["id"]))["status"] == "ready"
    secret = await new_secret(service, name)
    after = git_server.commit_files(name, {"build.js": (TINY_APP / "build.js").read_text().replace(
        "Hello from tiny", "Hello from a push")}, message="Say hello from a push")
    status, dep = await hook(service, push(url, after), secret)  # found by its repo_url
    assert status == 202, dep
    assert dep["project"] == name and dep["commit"] == after and dep["branch"] == "main"
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    assert final["commit_message"] == "Say hello from a push"
    assert b"Hello from a push" in (await service.site(name))[2]


async def test_a_newer_push_supersedes_older_queued_ones(
        tmp_path: Path, redis_server: RedisServer, start_service: StartService, git_server: GitServer) -> None:
    service = await start_service(make_settings(tmp_path / "one", redis_server.url, max_builds=1))
    name = unique_name("super")
    url = git_server.add_repo(name, files_dir=TINY_APP, files={"tiny.json": '{"lines": 2000, "delayMs": 10}'})
    secret = await new_secret(service, name)
    shas = [git_server.commit_files(name, {"n.txt": str(n)}) for n in range(3)]
    status, first = await hook(service, push(url, shas[0]), secret, query=f"?project={name}")
    await wait_building(service, first["id"])  # holds the only build slot
    _, second = await hook(service, push(url, shas[1]), secret, query=f"?project={name}")
    _, third = await hook(service, push(url, shas[2]), secret, query=f"?project={name}")
    _, older = await service.get_json(f"/api/deployments/{second['id']}")
    assert older["status"] == "canceled" and f"({shas[2][:12]})" in older["reason"]
    _, building = await service.get_json(f"/api/deployments/{first['id']}")
    assert building["status"] == "building"  # only queued ones are superseded
    for dep in (first, third):
        await service.post_json(f"/api/deployments/{dep['id']}/cancel", None)


async def test_a_project_never_deployed_takes_the_payloads_checked_url(service: Service) -> None:
    name = unique_name("firsthook")
    secret = await new_secret(service, name)
    payload = push("http://127.0.0.1:9/first.git", "c" * 40)
    status, dep = await hook(service, payload, secret, query=f"?project={name}")
    assert status == 202 and dep["repo_url"] == "http://127.0.0.1:9/first.git"
    await service.post_json(f"/api/deployments/{dep['id']}/cancel", None)
    other = unique_name("inside")
    payload["repository"]["clone_url"] = "http://10.0.0.8/inside.git"  # checked like any repo_url
    status, answer = await hook(service, payload, await new_secret(service, other),
                                query=f"?project={other}")
    assert status == 400 and "non-public address" in answer["error"]
    assert await deployments(service, other) == []
