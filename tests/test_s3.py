"""The same deploy with storage=s3 against a real S3-compatible server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from botocore.exceptions import ClientError
from multidict import MultiMapping

from deployhub.storage import S3Storage, blob_key, manifest_key, s3_config
from tests.support.infra import TINY_APP, GitServer, RedisServer, S3Server, unique_name
from tests.support.service import StartService, make_settings
from worker.output import upload_site


async def test_deploy_to_s3_and_serve_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer,
    s3_server: S3Server, s3_bucket: str, start_service: StartService, git_server: GitServer,
) -> None:
    for name, value in s3_server.aws_env().items():
        monkeypatch.setenv(name, value)
    settings = make_settings(
        tmp_path / "data", redis_server.url, storage="s3", s3_bucket=s3_bucket,
        s3_prefix="dh", s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region,
    )
    service = await start_service(settings)
    dep = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    status, headers, body = await service.site(dep["project"], "/about/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    status, headers, css = await service.site(dep["project"], "/assets/style-9a8b7c6d.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    client = s3_server.client()
    try:
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    finally:
        client.close()
    assert f"dh/manifests/{dep['id']}.json" in keys
    assert len([k for k in keys if k.startswith("dh/blobs/")]) == 4  # one per file, by content
    assert f"dh/logs/{dep['id']}.ndjson" in keys
    assert not (tmp_path / "data" / "storage").exists()


# -- uploads at scale: multipart, aborts, bounded memory --------------------------------------

MiB = 1024 * 1024


def random_file(path: Path, size: int) -> str:
    """A file of `size` random bytes, written a MiB at a time; returns its sha256."""
    digest = hashlib.sha256()
    rng = random.Random(size)
    with open(path, "wb") as f:
        for start in range(0, size, MiB):
            chunk = rng.randbytes(min(MiB, size - start))
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


async def pending_uploads(client: Any, bucket: str) -> list[str]:
    listed = await client.list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in listed.get("Uploads", [])]


async def test_a_big_file_round_trips_through_multipart_in_bounded_memory(
    tmp_path: Path, s3_client: Any, s3_bucket: str,
) -> None:
    size = 48 * MiB + 12345  # ten parts, the last one short
    digest = random_file(tmp_path / "big.bin", size)
    storage = S3Storage(s3_client, s3_bucket, "dh", part_size=5 * MiB, parts_in_flight=1)
    tracemalloc.start()
    try:
        await storage.put_file("blobs/big", tmp_path / "big.bin", "application/octet-stream")
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read = hashlib.sha256()
        async for chunk in storage.iter_bytes("blobs/big"):
            read.update(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert storage.requests["put part"] == 10
    assert read.hexdigest() == digest
    # One 5 MiB part in flight, and aiohttp's copy of it: a fraction of the file's 48 MiB.
    assert upload_peak < 12 * MiB, upload_peak
    assert read_peak < 4 * MiB, read_peak
    head = await s3_client.head_object(Bucket=s3_bucket, Key="dh/blobs/big")
    assert head["ContentLength"] == size and head["ContentType"] == "application/octet-stream"
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert await pending_uploads(s3_client, s3_bucket) == []


async def test_a_multipart_upload_that_s3_refuses_is_aborted(
    tmp_path: Path, s3_client: Any, s3_bucket: str,
) -> None:
    random_file(tmp_path / "f.bin", 3 * MiB)
    # S3 takes no part under 5 MiB but the last: the upload fails when it is completed.
    storage = S3Storage(s3_client, s3_bucket, multipart_threshold=MiB, part_size=MiB)
    with pytest.raises(ClientError, match="EntityTooSmall"):
        await storage.put_file("blobs/small-parts", tmp_path / "f.bin", "application/octet-stream")
    assert storage.requests["put part"] == 3 and storage.requests["abort"] == 1
    assert await pending_uploads(s3_client, s3_bucket) == []
    assert await storage.stat("blobs/small-parts") is None


async def test_a_canceled_multipart_upload_is_aborted(
    tmp_path: Path, s3_client: Any, s3_bucket: str,
) -> None:
    random_file(tmp_path / "big.bin", 40 * MiB)
    storage = S3Storage(s3_client, s3_bucket, part_size=5 * MiB, parts_in_flight=1)
    upload = asyncio.create_task(
        storage.put_file("blobs/canceled", tmp_path / "big.bin", "application/octet-stream")
    )
    async with asyncio.timeout(30):
        while storage.requests["put part"] < 2:
            await asyncio.sleep(0.005)
    assert await pending_uploads(s3_client, s3_bucket) == ["blobs/canceled"]
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert await pending_uploads(s3_client, s3_bucket) == []
    assert await storage.stat("blobs/canceled") is None


async def test_the_worker_uploads_a_big_file_streamed_with_its_headers(
    tmp_path: Path, s3_client: Any, s3_bucket: str,
) -> None:
    out = tmp_path / "src" / "dist"
    (out / "media").mkdir(parents=True)
    (out / "index.html").write_text("<!doctype html><title>big</title>" + "x" * 2000)
    digest = random_file(out / "media" / "intro.mp4", 12 * MiB)
    storage = S3Storage(s3_client, s3_bucket)
    await upload_site(storage, "dep-big", tmp_path / "src", out, lambda stream, text: None)
    assert storage.requests["put part"] == 2  # 12 MiB in 8 MiB parts
    blob = await s3_client.head_object(Bucket=s3_bucket, Key=blob_key(digest))
    assert blob["ContentType"] == "video/mp4" and blob["ContentLength"] == 12 * MiB
    assert blob["CacheControl"] == "public, max-age=31536000, immutable"
    manifest = await s3_client.head_object(Bucket=s3_bucket, Key=manifest_key("dep-big"))
    assert manifest["ContentType"] == "application/json" and manifest["CacheControl"] == "no-cache"


class FlakyS3:
    """A reverse proxy on loopback in front of the S3 server that answers the first try of
    chosen requests with a transient error (`fail`: a predicate on method and query, and
    the status and S3 error code to answer), and forwards everything else as it came."""

    def __init__(self, upstream: str, fail: list[tuple[Callable[[str, MultiMapping[str]], bool], int, str]]) -> None:
        self.upstream = upstream
        self.fail = list(fail)
        self.failed: list[str] = []
        self.seen: list[str] = []
        self.runner: web.AppRunner | None = None
        self.session: ClientSession | None = None
        self.endpoint_url = ""

    async def __aenter__(self) -> FlakyS3:
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.session = ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None and self.runner is not None
        await self.session.close()
        await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        assert self.session is not None
        label = f"{request.method} {request.path_qs}"
        self.seen.append(label)
        for i, (matches, status, code) in enumerate(self.fail):
            if matches(request.method, request.query):
                del self.fail[i]  # once: the retry goes through
                self.failed.append(label)
                await request.read()
                return web.Response(status=status, content_type="application/xml", text=(
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    "<Message>try again</Message></Error>"))
        # The signature covers the Host header: forward it as the client sent it.
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("transfer-encoding", "expect", "connection")}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers,
            data=io.BytesIO(await request.read()), skip_auto_headers=("Content-Type",),
        ) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in (
                "content-length", "transfer-encoding", "connection", "content-encoding")}
            return web.Response(status=upstream.status, body=body, headers=out)


async def test_transient_errors_are_retried_part_by_part(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_client: Any,
) -> None:
    from aiobotocore.session import get_session

    digest = random_file(tmp_path / "big.bin", 12 * MiB)
    fail = [
        (lambda method, query: method == "PUT" and query.get("partNumber") == "2", 503, "SlowDown"),
        (lambda method, query: method == "PUT" and not query, 500, "InternalError"),
    ]
    async with FlakyS3(s3_server.endpoint_url, fail) as proxy, get_session().create_client(
        "s3", config=s3_config(), **{**s3_server.client_kwargs(), "endpoint_url": proxy.endpoint_url},
    ) as client:
        storage = S3Storage(client, s3_bucket, part_size=5 * MiB)
        await storage.put_file("blobs/retried", tmp_path / "big.bin", "application/octet-stream")
        await storage.put_bytes("manifests/retried.json", b"{}", "application/json")
    assert len(proxy.failed) == 2 and not proxy.fail, proxy.failed
    assert sum("partNumber=2" in label for label in proxy.seen) == 2  # failed, then sent again
    read = hashlib.sha256()
    async for chunk in S3Storage(s3_client, s3_bucket).iter_bytes("blobs/retried"):
        read.update(chunk)
    assert read.hexdigest() == digest
    assert await S3Storage(s3_client, s3_bucket).get_bytes("manifests/retried.json") == b"{}"
    assert await pending_uploads(s3_client, s3_bucket) == []


async def test_a_part_s3_refuses_fails_the_upload_with_its_own_error_and_aborts_it(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_client: Any,
) -> None:
    from aiobotocore.session import get_session

    random_file(tmp_path / "big.bin", 12 * MiB)
    fail = [(lambda method, query: query.get("partNumber") == "2", 403, "AccessDenied")]
    async with FlakyS3(s3_server.endpoint_url, fail) as proxy, get_session().create_client(
        "s3", config=s3_config(), **{**s3_server.client_kwargs(), "endpoint_url": proxy.endpoint_url},
    ) as client:
        storage = S3Storage(client, s3_bucket, part_size=5 * MiB)
        with pytest.raises(ClientError, match="AccessDenied"):  # not retried, not a group
            await storage.put_file("blobs/refused", tmp_path / "big.bin", "application/octet-stream")
    assert storage.requests["abort"] == 1
    assert await pending_uploads(s3_client, s3_bucket) == []
