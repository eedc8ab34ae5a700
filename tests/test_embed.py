"""DeployHub inside someone else's aiohttp app: as a sub-app, or set up on their app."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from deployhub import create_app, get_settings, get_tokens, setup
from tests.support.infra import RedisServer
from tests.support.service import loopback_resolver, make_settings


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="their app")


async def test_mounted_with_add_subapp(tmp_path: Path, redis_server: RedisServer) -> None:
    theirs = web.Application()
    theirs.router.add_get("/", hello)
    settings = make_settings(tmp_path, redis_server.url)
    sub = create_app(settings, resolver=loopback_resolver)
    theirs.add_subapp("/deploy/", sub)
    async with TestClient(TestServer(theirs)) as client:
        assert await (await client.get("/")).text() == "their app"
        page = await client.get("/deploy/")
        assert page.status == 200 and "<html" in (await page.text()).lower()
        assert (await client.get("/deploy/api/projects")).status == 401
        _, token = await get_tokens(sub).create("embed")
        auth = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/deploy/api/projects", headers=auth)).status == 200
        bad = await client.post("/deploy/api/deployments", json={"repo_url": "file:///x"}, headers=auth)
        assert bad.status == 400
        async with client.ws_connect("/deploy/api/ws") as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=5))["type"] == "pong"


async def test_setup_on_their_app(tmp_path: Path, redis_server: RedisServer) -> None:
    theirs = web.Application()
    theirs.router.add_get("/hello", hello)
    setup(theirs, make_settings(tmp_path, redis_server.url), resolver=loopback_resolver)
    async with TestClient(TestServer(theirs)) as client:
        assert await (await client.get("/hello")).text() == "their app"
        assert (await client.get("/api/projects")).status == 401
        _, token = await get_tokens(theirs).create("embed")
        answer = await client.get("/api/projects", headers={"Authorization": f"Bearer {token}"})
        assert answer.status == 200
        assert get_settings(theirs).domain == "localhost"


def test_accessors_say_when_setup_was_skipped() -> None:
    import pytest

    with pytest.raises(RuntimeError, match="deployhub.setup"):
        get_settings(web.Application())
