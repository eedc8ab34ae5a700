"""Object storage for built sites and finished logs: a directory on disk, or S3.

Layout (below the configured prefix):
  blobs/<sha256>                 a built file's bytes, stored once whatever uses them
  blobs/<sha256>.br, .gz         its brotli and gzip variants (text assets only)
  manifests/<deployment>.json    path -> blob of one deployment; written last, so it marks
                                 completeness (see deployhub/manifest.py)
  logs/<deployment>.ndjson       the full build log, outside any public path
  sites/<deployment>/<path>      the files of deployments made before content addressing;
                                 still served, and deleted with their manifest
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Mapping
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


BLOBS = "blobs/"
# Where a project's build cache archives live (worker/cache.py adds the owner's digest).
BUILD_CACHE = "cache/"


def build_cache_prefix(project: str) -> str:
    return f"{BUILD_CACHE}{project}/"


def build_cache_dir(data_dir: Path, project: str) -> Path:
    """A project's build cache on this machine (runner `local`), beside its builds."""
    return data_dir / "cache" / "projects" / project

# Suffix of a blob's precompressed variant, by Content-Encoding.
VARIANT_SUFFIX = {"br": ".br", "gzip": ".gz"}


def blob_key(digest: str, encoding: str = "") -> str:
    return f"{BLOBS}{digest}{VARIANT_SUFFIX[encoding] if encoding else ''}"


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    size: int
    modified: float  # unix time


class Storage(Protocol):
    """What DeployHub needs from object storage. Every call counts itself in `requests`
    (by operation), so tests and the benchmark can tell what the hot path costs."""

    requests: Counter[str]

    async def check(self) -> None:
        """Raise StorageError unless the backend can be read and written now."""

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        """Store the file at `path`, read as a stream (in parts when it is large)."""

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    async def get_bytes(self, key: str) -> bytes | None: ...

    async def stat(self, key: str) -> ObjectInfo | None:
        """Size and age of an object, or None when there is none."""

    async def stat_many(
        self, keys: Mapping[str, Collection[str]], within: str = ""
    ) -> dict[str, ObjectInfo]:
        """The objects among `keys` that exist and, of each that does, those of its dependent
        keys (`keys[key]`) that exist. `within`: a prefix every key has, which the backend may
        list instead of asking for each key."""

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete objects; missing ones are no error."""

    def list_keys(self, prefix: str) -> AsyncIterator[str]:
        """Every key that starts with `prefix`."""

    def local_path(self, key: str) -> Path | None:
        """A file on disk holding the object, when the backend has one (for sendfile)."""

    def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The object's bytes from `start` up to `end` (exclusive; None: to its end), in
        chunks: a large object is never held in memory whole."""


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: Counter[str] = Counter()

    async def check(self) -> None:
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise StorageError(f"DEPLOYHUB_DATA_DIR: cannot write to the storage directory {self.root}")

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return path

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        self.requests["put"] += 1
        target = self._path(key)
        await asyncio.to_thread(_copy_atomically, path, target)

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.requests["put"] += 1
        target = self._path(key)
        await aiofiles.os.makedirs(target.parent, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        async with aiofiles.open(tmp, "wb") as f:
            await f.write(data)
        await aiofiles.os.replace(tmp, target)

    async def get_bytes(self, key: str) -> bytes | None:
        self.requests["get"] += 1
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)  # one thread does it all
        except FileNotFoundError:
            return None

    async def stat(self, key: str) -> ObjectInfo | None:
        self.requests["stat"] += 1
        try:
            st = await aiofiles.os.stat(self._path(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(st.st_size, st.st_mtime)

    async def stat_many(
        self, keys: Mapping[str, Collection[str]], within: str = ""
    ) -> dict[str, ObjectInfo]:
        self.requests["stat"] += len(keys)
        return await asyncio.to_thread(self._stat_many, keys)  # one thread, no round trips

    def _stat_many(self, keys: Mapping[str, Collection[str]]) -> dict[str, ObjectInfo]:
        found = {}
        for key, dependents in keys.items():
            for name in (key, *dependents):
                try:
                    st = os.stat(self._path(name))
                except FileNotFoundError:
                    if name == key:
                        break
                    continue
                found[name] = ObjectInfo(st.st_size, st.st_mtime)
        return found

    async def delete(self, keys: Iterable[str]) -> None:
        paths = [self._path(key) for key in keys]
        self.requests["delete"] += len(paths)
        await asyncio.to_thread(_unlink_all, paths, self.root)

    async def list_keys(self, prefix: str) -> AsyncIterator[str]:
        self.requests["list"] += 1
        found = await asyncio.to_thread(_walk, self.root, prefix)
        for key in found:
            yield key

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.requests["get"] += 1
        # Opened on the loop (a local open takes microseconds): aiofiles opens in a thread, and
        # a request canceled meanwhile (a client gone) would leave that file open. Reads, which
        # can wait on the disk, go to a thread.
        f = open(self._path(key), "rb")  # noqa: SIM115 (closed in finally)
        try:
            if start:
                f.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                chunk = await asyncio.to_thread(f.read, CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            f.close()


def _unlink_all(paths: list[Path], root: Path) -> None:
    parents = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        parents.add(path.parent)
    # Empty directories left by a legacy sites/<deployment>/ tree go too (never the root).
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        while parent != root and parent.is_relative_to(root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _walk(root: Path, prefix: str) -> list[str]:
    # The directory part of the prefix is where to look; the rest filters names.
    base = root / prefix.rsplit("/", 1)[0] if "/" in prefix else root
    if not base.is_dir():
        return []
    found = []
    for dirpath, _, filenames in os.walk(base):
        for name in filenames:
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # a write in progress
            key = Path(dirpath, name).relative_to(root).as_posix()
            if key.startswith(prefix):
                found.append(key)
    return sorted(found)


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
    os.replace(tmp, target)


# Files larger than this go up as a multipart upload, in parts of PART_SIZE (S3 takes parts
# of 5 MiB to 5 GiB, all but the last, and at most MAX_PARTS of them).
MULTIPART_THRESHOLD = 8 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
MAX_PARTS = 10_000
# Parts read into memory and in flight at once, across every upload of one S3Storage: uploads
# take about twice this many parts of memory (aiohttp copies a body it sends), whatever the
# files' sizes or how many go at once.
PARTS_IN_FLIGHT = 4
IMMUTABLE = "public, max-age=31536000, immutable"
# stat_many lists the prefix rather than asking for each key while that takes at most one
# ListObjectsV2 page per this many keys asked for: a page names up to 1,000 keys in one round
# trip, and costs (on AWS) what about a dozen HeadObjects do. A larger store is listed no
# further than that, and the keys past the listed part are asked for one by one.
KEYS_PER_LIST_PAGE = 100
STATS_IN_FLIGHT = 64


def object_cache_control(key: str) -> str:
    """The Cache-Control stored on an object, for whatever reads the bucket directly (a CDN
    in front of it; sites send the manifest's own headers): a blob's key names its bytes, so
    it never changes; manifests and logs can be rewritten."""
    return IMMUTABLE if key.startswith(BLOBS) else "no-cache"


class S3Storage:
    def __init__(
        self, client: Any, bucket: str, prefix: str = "", *,
        multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
        parts_in_flight: int = PARTS_IN_FLIGHT, list_page: int = 1000,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._parts = asyncio.Semaphore(parts_in_flight)
        self.list_page = list_page  # keys per ListObjectsV2 page (1,000 is S3's most)
        self.requests: Counter[str] = Counter()

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
        self.requests["put"] += 1
        # Opened on the loop (a local open takes microseconds); read in parts, in threads.
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > self.multipart_threshold:
                await self._put_multipart(key, f.fileno(), size, content_type)
                return
            # botocore streams a file body (and rewinds it for a retry): never whole in memory.
            await self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=f, ContentLength=size,
                ContentType=content_type, CacheControl=object_cache_control(key),
            )

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.requests["put"] += 1
        await self.client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type,
            CacheControl=object_cache_control(key),
        )

    async def _put_multipart(self, key: str, fd: int, size: int, content_type: str) -> None:
        """Upload the file `fd` in parts, at most `parts_in_flight` of this storage's parts in
        memory at once; an upload that fails or is canceled is aborted, so S3 keeps (and
        bills) no orphaned parts."""
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        count = -(-size // part_size)
        created = await self.client.create_multipart_upload(
            Bucket=self.bucket, Key=self.prefix + key, ContentType=content_type,
            CacheControl=object_cache_control(key),
        )
        upload_id = str(created["UploadId"])
        etags: dict[int, str] = {}

        async def put_part(number: int) -> None:
            offset = (number - 1) * part_size
            length = min(part_size, size - offset)
            async with self._parts:
                body = await asyncio.to_thread(os.pread, fd, length, offset)
                if len(body) != length:
                    raise StorageError(f"{key}: the file shrank while it was uploaded")
                self.requests["put part"] += 1
                reply = await self.client.upload_part(
                    Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id,
                    PartNumber=number, Body=body,
                )
            etags[number] = str(reply["ETag"])

        try:
            try:
                async with asyncio.TaskGroup() as group:  # one part failed: the others stop
                    for number in range(1, count + 1):
                        group.create_task(put_part(number))
            except ExceptionGroup as failed:  # the part's own error, not a group of one
                raise failed.exceptions[0] from None
            await self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]},
            )
        except BaseException:
            # Shielded: a canceled upload is aborted all the same.
            with contextlib.suppress(Exception):
                self.requests["abort"] += 1
                await asyncio.shield(self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id,
                ))
            raise

    async def get_bytes(self, key: str) -> bytes | None:
        self.requests["get"] += 1
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except self.client.exceptions.NoSuchKey:
            return None
        async with response["Body"] as body:
            data: bytes = await body.read()
            return data

    async def stat(self, key: str) -> ObjectInfo | None:
        self.requests["stat"] += 1
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except self.client.exceptions.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(int(head["ContentLength"]), head["LastModified"].timestamp())

    async def stat_many(
        self, keys: Mapping[str, Collection[str]], within: str = ""
    ) -> dict[str, ObjectInfo]:
        found: dict[str, ObjectInfo] = {}
        known_to = ""  # every key up to this one (in key order) was listed
        if within and keys:
            wanted = set(keys).union(*keys.values())
            pages = -(-len(keys) // KEYS_PER_LIST_PAGE)
            listed_to = await self._list_into(found, wanted, within, pages)
            if listed_to is None:
                return found  # all of it
            known_to = listed_to
        gate = asyncio.Semaphore(STATS_IN_FLIGHT)

        async def stat_one(key: str) -> None:
            if key > known_to:
                async with gate:
                    info = await self.stat(key)
                if info is None:
                    return
                found[key] = info
            elif key not in found:
                return
            for dependent in keys[key]:
                if dependent > known_to:
                    async with gate:
                        info = await self.stat(dependent)
                    if info is not None:
                        found[dependent] = info

        try:
            async with asyncio.TaskGroup() as group:
                for key in keys:
                    group.create_task(stat_one(key))
        except ExceptionGroup as failed:  # the first error, not a group of one
            raise failed.exceptions[0] from None
        return found

    async def _list_into(
        self, found: dict[str, ObjectInfo], wanted: set[str], within: str, max_pages: int
    ) -> str | None:
        """List `within` into `found` (the keys in `wanted`), at most `max_pages` pages; None
        when every key was listed, else the last key listed."""
        token: dict[str, str] = {}
        last = ""
        for _ in range(max_pages):
            self.requests["list"] += 1
            page = await self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=self.prefix + within, MaxKeys=self.list_page, **token
            )
            for item in page.get("Contents", []):
                last = str(item["Key"])[len(self.prefix):]
                if last in wanted:
                    found[last] = ObjectInfo(int(item["Size"]), item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return None
            token = {"ContinuationToken": str(page["NextContinuationToken"])}
        return last

    async def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self.prefix + key} for key in keys]
        for start in range(0, len(batch), 1000):  # the most one DeleteObjects takes
            self.requests["delete"] += 1
            await self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch[start:start + 1000], "Quiet": True}
            )

    async def list_keys(self, prefix: str) -> AsyncIterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            self.requests["list"] += 1
            for item in page.get("Contents", []):
                yield str(item["Key"])[len(self.prefix):]

    def local_path(self, key: str) -> Path | None:
        return None

    async def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.requests["get"] += 1
        extra = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        response = await self.client.get_object(Bucket=self.bucket, Key=self.prefix + key, **extra)
        # The body streams from S3 as it is written on: never the whole object in memory.
        async with response["Body"] as body:
            while chunk := await body.read(CHUNK):
                yield chunk


def s3_config() -> Any:
    """A stalled S3 must not hold a request (or a shutdown) for botocore's default 60 s.
    botocore's "standard" retry mode retries every call (each part of a multipart upload on
    its own) up to 5 times (`max_attempts` counts the retries) with jittered exponential
    backoff: throttling (SlowDown, 503), 500/502/503/504 answers, RequestTimeout, connection
    errors and read timeouts."""
    from aiobotocore.config import AioConfig

    return AioConfig(connect_timeout=5, read_timeout=20, max_pool_connections=64,
                     retries={"max_attempts": 5, "mode": "standard"})


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
        config=s3_config(),
    ) as client:
        yield S3Storage(client, settings.s3_bucket, settings.s3_prefix)
