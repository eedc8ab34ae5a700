"""Sites published straight from files, through the real upload, without a git clone or npm.

`Publisher.publish(project, files)` writes the files into a build output directory, runs the
worker's upload against the service's storage (leasing blobs in its Redis), and moves the
deployment to ready the way a worker does; it returns the deployment id and the upload's log.
`site_service` is a started DeployHub on file storage or S3 (parametrize `backend`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from deployhub import keys
from deployhub.collector import BlobLeases
from deployhub.connections import get_storage, get_store
from deployhub.sites import get_sites
from deployhub.status import Status
from deployhub.storage import Storage
from tests.support.infra import RedisServer, S3Server
from tests.support.service import DOMAIN, Service, StartService, make_settings
from worker.output import Uploaded, upload_site


class Publisher:
    def __init__(self, service: Service, root: Path) -> None:
        self.service = service
        self.root = root

    @property
    def storage(self) -> Storage:
        return get_storage(self.service.app)

    async def publish(
        self, project: str, files: Mapping[str, str | bytes], *, ready: bool = True,
        status: Status = Status.READY, on_stored: Callable[[str], Awaitable[None]] | None = None,
        base: str = "",
    ) -> tuple[str, list[str], Uploaded]:
        """With `ready=False` the deployment stays `queued`, as if still building. With
        `on_stored`, it is ready once the first manifest is stored, as a build makes it, and
        `on_stored(deployment id)` runs then, before the compressed copies are made."""
        store = get_store(self.service.app)
        dep = await store.create_deployment(project, "http://127.0.0.1/x.git", "", self.service.token_id)
        out = self.root / dep.id / "dist"
        for rel, content in files.items():
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        lines: list[str] = []
        leases = BlobLeases(store.redis, self.service.settings.blob_grace_seconds, dep.id)

        async def stored(_: Uploaded) -> None:
            await store.transition(dep, status)
            assert on_stored is not None
            await on_stored(dep.id)

        uploaded = await upload_site(
            self.storage, dep.id, out.parent, out, lambda stream, text: lines.append(text),
            leases=leases, on_stored=stored if on_stored is not None else None, base=base,
        )
        if ready and on_stored is None:
            await store.transition(dep, status)
        return dep.id, lines, uploaded

    async def get(
        self, host: str, path: str = "/", **headers: str
    ) -> tuple[int, CIMultiDict[str], bytes]:
        return await self.request("GET", host, path, **headers)

    async def request(
        self, method: str, host: str, path: str = "/", **headers: str
    ) -> tuple[int, CIMultiDict[str], bytes]:
        service = self.service
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        sent["Host"] = f"{host}.{DOMAIN}:{service.server.port}"
        # No automatic Accept-Encoding or decompression: the test says what it accepts.
        sent.setdefault("Accept-Encoding", "identity")
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            async with http.request(method, service.url + path, headers=sent,
                                    allow_redirects=False) as r:
                return r.status, CIMultiDict(r.headers), await r.read()

    async def remembered(self, host: str, path: str = "/") -> int:
        """The host look-ups once `host` is remembered. A look-up that an event overtook (the
        publish's own, still on its way to this replica) is not remembered, so the next request
        looks up again: at most a few, then none."""
        sites = get_sites(self.service.app)
        for _ in range(3):
            before = sites.stats["host look-ups"]
            await self.get(host, path)
            if sites.stats["host look-ups"] == before:
                return before
            await asyncio.sleep(0.1)
        raise AssertionError(f"{host} is looked up on every request: {dict(sites.stats)}")

    async def blob_keys(self) -> set[str]:
        return {k async for k in self.storage.list_keys("blobs/")}

    async def wait_live(self) -> None:
        await asyncio.wait_for(get_sites(self.service.app).live.wait(), 10)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def s3_of_backend(backend: str, request: pytest.FixtureRequest) -> tuple[S3Server, str] | None:
    """The S3 server and a bucket when the backend is s3. Set up before start_service (see
    site_service's parameters), so the bucket is deleted only after every service stopped:
    deleting it under a running server stalled that server's shutdown."""
    if backend != "s3":
        return None
    return request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")


@pytest.fixture
async def site_service(
    backend: str, s3_of_backend: tuple[S3Server, str] | None, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, start_service: StartService,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Publisher]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    if s3_of_backend is not None:
        s3_server, bucket = s3_of_backend
        for name, value in s3_server.aws_env().items():
            monkeypatch.setenv(name, value)
        overrides = {**overrides, "storage": "s3", "s3_bucket": bucket, "s3_prefix": "dh",
                     "s3_endpoint_url": s3_server.endpoint_url, "s3_region": s3_server.region}
    settings = make_settings(tmp_path / "data", redis_server.url, **overrides)
    publisher = Publisher(await start_service(settings), tmp_path / "builds")
    # The hourly sweep a production event may start in the background would race the
    # collections these tests make and count (two collectors skip each other's blobs).
    await get_store(publisher.service.app).redis.set(keys.SWEEP_LOCK, "1", ex=3600)
    await publisher.wait_live()
    yield publisher
