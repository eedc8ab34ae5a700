"""Object storage for built sites and finished logs: a directory on disk, or S3.

Layout (below the configured prefix):
  sites/<deployment>/<path>      the built files, immutable once the deployment is ready
  manifests/<deployment>.json    what the site holds; written last, so it marks completeness
  logs/<deployment>.ndjson       the full build log, outside any public path
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import aiofiles
import aiofiles.os

from .settings import Settings

CHUNK = 256 * 1024


class StorageError(RuntimeError):
    """The storage backend cannot be used; the message names the setting to fix."""


def site_key(dep_id: str, path: str) -> str:
    return f"sites/{dep_id}/{path}"


def manifest_key(dep_id: str) -> str:
    return f"manifests/{dep_id}.json"


def log_key(dep_id: str) -> str:
    return f"logs/{dep_id}.ndjson"


class Storage(Protocol):
    async def check(self) -> None:
        """Raise StorageError unless the backend can be read and written now."""

    async def put_file(self, key: str, path: Path, content_type: str) -> None: ...

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    async def get_bytes(self, key: str) -> bytes | None: ...

    def local_path(self, key: str) -> Path | None:
        """A file on disk holding the object, when the backend has one (for sendfile)."""

    def iter_bytes(self, key: str) -> AsyncIterator[bytes]: ...


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    async def check(self) -> None:
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise StorageError(f"DEPLOYHUB_DATA_DIR: cannot write to the storage directory {self.root}")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        target = self._path(key)
        await asyncio.to_thread(_copy_atomically, path, target)

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        target = self._path(key)
        await aiofiles.os.makedirs(target.parent, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        async with aiofiles.open(tmp, "wb") as f:
            await f.write(data)
        await aiofiles.os.replace(tmp, target)

    async def get_bytes(self, key: str) -> bytes | None:
        try:
            async with aiofiles.open(self._path(key), "rb") as f:
                return await f.read()
        except FileNotFoundError:
            return None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def iter_bytes(self, key: str) -> AsyncIterator[bytes]:
        async with aiofiles.open(self._path(key), "rb") as f:
            while chunk := await f.read(CHUNK):
                yield chunk


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
    os.replace(tmp, target)


class S3Storage:
    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    async def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"DEPLOYHUB_S3_BUCKET: the bucket {self.bucket!r} does not exist") from None
            if code in ("403", "AccessDenied", "Forbidden"):
                raise StorageError(
                    f"DEPLOYHUB_S3_BUCKET: access to {self.bucket!r} is denied to these credentials"
                ) from None
            raise StorageError(f"DEPLOYHUB_S3_BUCKET: {self.bucket!r}: {exc}") from None
        except (BotoCoreError, OSError) as exc:
            raise StorageError(f"DEPLOYHUB_S3_ENDPOINT_URL: cannot reach S3: {exc}") from None

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        async with aiofiles.open(path, "rb") as f:
            data = await f.read()
        await self.put_bytes(key, data, content_type)

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        await self.client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type
        )

    async def get_bytes(self, key: str) -> bytes | None:
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except self.client.exceptions.NoSuchKey:
            return None
        async with response["Body"] as body:
            data: bytes = await body.read()
            return data

    def local_path(self, key: str) -> Path | None:
        return None

    async def iter_bytes(self, key: str) -> AsyncIterator[bytes]:
        response = await self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        async with response["Body"] as body:
            while chunk := await body.read(CHUNK):
                yield chunk


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """The configured backend, with its client closed on exit."""
    if settings.storage == "file":
        yield FileStorage(settings.data_dir / "storage")
        return
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client(
        "s3",
        region_name=settings.s3_region,
        endpoint_url=settings.s3_endpoint_url or None,
    ) as client:
        yield S3Storage(client, settings.s3_bucket, settings.s3_prefix)
