"""DeployHub itself for tests: the real app on a real port, against real Redis and git."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from deployhub import Settings, create_app
from deployhub.store import FINAL
from tests.support.infra import RedisServer

DOMAIN = "localhost"


class Service:
    """A started DeployHub app and an HTTP session to talk to it."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.server = TestServer(app, host="127.0.0.1", port=settings.port)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.server.start_server()
        self.session = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    async def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body) as r:
            return r.status, await r.json()

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as r:
            return r.status, await r.json()

    async def deploy(self, repo_url: str, **extra: str) -> dict[str, Any]:
        status, body = await self.post_json("/api/deployments", {"repo_url": repo_url, **extra})
        assert status == 202, body
        return dict(body)

    async def wait_final(self, dep_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, body = await self.get_json(f"/api/deployments/{dep_id}")
            if body["status"] in FINAL:
                return dict(body)
            await asyncio.sleep(0.1)
        raise AssertionError(f"deployment {dep_id} still {body['status']} after {timeout}s")

    async def site(self, host: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        port = self.server.port
        async with self.http.get(self.url + path, headers={"Host": f"{host}.{DOMAIN}:{port}"}) as r:
            return r.status, dict(r.headers), await r.read()

    async def logs(self, dep_id: str, after: int = 0) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/api/deployments/{dep_id}/logs?after={after}") as r:
            assert r.status == 200
            return [json.loads(line) for line in (await r.text()).splitlines() if line]


def make_settings(data_dir: Path, redis_url: str | None, port: int = 0, **overrides: Any) -> Settings:
    return Settings.from_env(
        {},
        data_dir=data_dir,
        redis_url=redis_url,
        port=port or _free_port(),
        domain=DOMAIN,
        allow_hosts=("127.0.0.1",),
        **overrides,
    )


def _free_port() -> int:
    from tests.support.infra import free_port

    return free_port()


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[StartService]:
    """Start DeployHub apps (several, or the same settings again after a stop)."""
    started: list[Service] = []

    async def start(settings: Settings | None = None, redis: RedisServer | None = None, **kw: Any) -> Service:
        if settings is None:
            settings = make_settings(tmp_path / "data", redis.url if redis else None, **kw)
        service = Service(create_app(settings), settings)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()


@pytest.fixture
async def service(start_service: StartService, redis_server: RedisServer) -> Service:
    return await start_service(redis=redis_server)
