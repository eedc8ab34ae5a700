"""Every API call and subscription needs a token; a token sees only its own projects."""

from __future__ import annotations

import aiohttp
import pytest

from deployhub import get_tokens
from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service


@pytest.fixture
async def stranger(service: Service) -> aiohttp.ClientSession:
    _, secret = await get_tokens(service.app).create("stranger")
    session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"})
    yield session
    await session.close()


async def test_no_token_gets_401_everywhere(service: Service) -> None:
    async with aiohttp.ClientSession() as anonymous:
        for method, path in [("GET", "/api/projects"), ("POST", "/api/deployments"),
                             ("GET", "/api/deployments/abcdefabcdef"),
                             ("GET", "/api/projects/x/deployments")]:
            async with anonymous.request(method, service.url + path, json={}) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with anonymous.get(service.url + "/api/projects",
                                 headers={"Authorization": "Bearer dh_" + "x" * 43}) as r:
            assert r.status == 401 and "unknown or revoked" in (await r.json())["error"]
        async with anonymous.ws_connect(service.url + "/api/ws") as ws:
            await ws.send_json({"type": "subscribe", "project": "anything"})
            await ws.receive(timeout=5)
            assert ws.close_code == 4401


async def test_other_tokens_cannot_see_deploy_or_watch(
    service: Service, stranger: aiohttp.ClientSession, git_server: GitServer
) -> None:
    url = git_server.add_repo(unique_name("mine"), files_dir=TINY_APP)
    dep = await service.deploy(url, project="mine")
    await service.wait_final(dep["id"])
    base = service.url
    for path in [f"/api/deployments/{dep['id']}", f"/api/deployments/{dep['id']}/logs",
                 "/api/projects/mine", "/api/projects/mine/deployments"]:
        async with stranger.get(base + path) as r:
            assert r.status == 404, path
    async with stranger.get(base + "/api/projects") as r:
        assert (await r.json())["projects"] == []
    async with stranger.post(base + "/api/projects/mine/rollback", json={"deployment": dep["id"]}) as r:
        assert r.status == 404
    async with stranger.post(base + f"/api/deployments/{dep['id']}/cancel") as r:
        assert r.status == 404
    async with stranger.post(base + "/api/deployments", json={"repo_url": url, "project": "mine"}) as r:
        assert r.status == 409 and "taken" in (await r.json())["error"]
    async with stranger.ws_connect(base + "/api/ws") as ws:
        await ws.send_json({"type": "subscribe", "project": "mine"})
        frame = await ws.receive_json(timeout=5)
        assert frame == {"type": "error", "message": "no project 'mine'"}
    status, _, page = await service.site("mine")  # sites stay public
    assert status == 200 and b"Hello from tiny" in page


async def test_revoked_token_stops_working(service: Service) -> None:
    tokens = get_tokens(service.app)
    token, secret = await tokens.create("temp")
    headers = {"Authorization": f"Bearer {secret}"}
    async with service.http.get(service.url + "/api/projects", headers=headers) as r:
        assert r.status == 200
    assert await tokens.revoke(token.id)
    async with service.http.get(service.url + "/api/projects", headers=headers) as r:
        assert r.status == 401
    stored = await tokens.redis.hgetall("dh:tokens")
    assert secret not in str(stored)  # only a digest is kept
