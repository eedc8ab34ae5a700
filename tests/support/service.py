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

from deployhub import Settings, create_app, get_tokens
from deployhub.embedded_redis import free_port
from deployhub.status import FINAL
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
        token, self.token = await get_tokens(self.app).create("tests")
        self.token_id = token.id
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"})

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

    async def deploy(self, repo_url: str, **extra: Any) -> dict[str, Any]:
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
        """One request to a site; a redirect is returned, never followed (it may name any host)."""
        port = self.server.port
        async with self.http.get(self.url + path, headers={"Host": f"{host}.{DOMAIN}:{port}"},
                                 allow_redirects=False) as r:
            return r.status, dict(r.headers), await r.read()

    async def logs(self, dep_id: str, after: int = 0) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/api/deployments/{dep_id}/logs?after={after}") as r:
            assert r.status == 200
            return [json.loads(line) for line in (await r.text()).splitlines() if line]


async def loopback_resolver(host: str, port: int) -> list[str]:
    """Tests never ask real DNS: IP literals resolve to themselves, names to nothing."""
    import ipaddress

    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        if host == "localhost":
            return ["127.0.0.1"]
        raise OSError(f"test resolver: {host} is not resolvable in tests") from None


def make_settings(data_dir: Path, redis_url: str | None, port: int = 0, **overrides: Any) -> Settings:
    return Settings.from_env(
        {},
        data_dir=data_dir,
        redis_url=redis_url,
        port=port or free_port(),
        domain=DOMAIN,
        **{"allow_hosts": ("127.0.0.1",), **overrides},
    )


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[StartService]:
    """Start DeployHub apps (several, or the same settings again after a stop)."""
    started: list[Service] = []

    async def start(settings: Settings | None = None, redis: RedisServer | None = None, **kw: Any) -> Service:
        if settings is None:
            settings = make_settings(tmp_path / "data", redis.url if redis else None, **kw)
        service = Service(create_app(settings, resolver=loopback_resolver), settings)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        await service.stop()


@pytest.fixture
async def service(redis_server: RedisServer, start_service: StartService) -> Service:
    return await start_service(redis=redis_server)


class Watch:
    """A WebSocket client of one project that records every frame, checking seq order."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.frames: list[dict[str, Any]] = []
        self.lines: dict[str, list[dict[str, Any]]] = {}
        self.statuses: dict[str, list[str]] = {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(
        self, project: str, resume: dict[str, int] | None = None, token: str | None = None
    ) -> Watch:
        self.ws = await self.service.http.ws_connect(self.service.url + "/api/ws")
        if token is not None:  # as the page does: the token in the first message
            await self.ws.send_json({"type": "auth", "token": token})
        await self.ws.send_json({"type": "subscribe", "project": project, "resume": resume or {}})
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            self.frames.append(frame)
            if frame["type"] == "logs":
                self.lines.setdefault(frame["deployment"], []).extend(frame["events"])
            elif frame["type"] == "status":
                dep = frame["deployment"]
                self.statuses.setdefault(dep["id"], []).append(dep["status"])
            elif frame["type"] == "subscribed":
                for dep in frame["deployments"]:
                    self.statuses.setdefault(dep["id"], []).append(dep["status"])

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last frames: {self.frames[-3:]}")
            await asyncio.sleep(0.02)

    async def wait_status(self, dep_id: str, status: str, timeout: float = 60) -> None:
        await self.wait_for(lambda: status in self.statuses.get(dep_id, []), timeout)

    def seqs(self, dep_id: str) -> list[int]:
        return [e["seq"] for e in self.lines.get(dep_id, [])]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await self._reader
