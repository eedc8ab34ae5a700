"""The build's output: collected without ever following a symlink, then uploaded to storage.

Every name under the output is opened relative to a directory fd with O_NOFOLLOW, so a symlink
anywhere (the output directory, a parent of it, a file) can never lead outside the build.

Storage is content-addressed: a file's bytes go to `blobs/<sha256>` once, whatever deploys
them; a redeploy uploads only the files that changed. Text assets get brotli and gzip variants
beside them, written before the blob itself, so a blob that exists has its variants. We use
the `brotli` package (Google's own bindings to the reference C library, wheels everywhere):
the standard library has gzip but no brotli, and brotli at quality 11 makes JavaScript and
CSS some 15-25% smaller than gzip -9, computed once per blob at upload, never per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import hashlib
import mimetypes
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import brotli
from redis.asyncio import Redis

from deployhub import manifest as manifests
from deployhub.collector import BlobLeases
from deployhub.rules import HeaderRule, Redirect, parse_headers, parse_redirects
from deployhub.storage import Storage, blob_key, manifest_key

from .detect import BuildError
from .proc import Emit

# Files uploaded at once: each upload mostly waits on S3's round trips (a HeadObject, then up
# to three PutObjects), so many in flight hide the latency; the connection pool of
# deployhub.storage.s3_config holds as many.
UPLOAD_CONCURRENCY = 64
# Files up to this size are read into memory once (hashed, compressed, uploaded from there);
# larger ones are hashed as a stream and uploaded from the file.
IN_MEMORY = 8 * 1024 * 1024
# Bytes of files held in memory at once by the uploads in flight, whatever their number.
MEMORY_BUDGET = 64 * 1024 * 1024
BROTLI_BEST_UP_TO = 2 * 1024 * 1024  # quality 11 is slow; above this, quality 9
VARIANT_WORTH = 0.9  # keep a variant only when it is at most 90% of the original
RULE_FILES = ("_redirects", "_headers")


@dataclass
class Uploaded:
    files: int
    new_blobs: int  # blobs this deployment stored; the rest existed already


@dataclass
class _Blob:
    digest: str
    size: int
    data: bytes | None  # None: larger than IN_MEMORY


async def upload(
    storage: Storage, dep_id: str, src: Path, output: Path, emit: Emit, *,
    max_files: int = 0, max_bytes: int = 0, redis: Redis | None = None,
    grace_seconds: float = 3600.0,
) -> int:
    """Upload the regular files under `output` (inside the repository `src`) as the site of
    `dep_id`, the manifest last; returns how many. Past `max_files` or `max_bytes`: BuildError.
    With `redis`, every blob is leased while it is uploaded (see deployhub/collector.py)."""
    return (await upload_site(
        storage, dep_id, src, output, emit, max_files=max_files, max_bytes=max_bytes,
        leases=BlobLeases(redis, grace_seconds, dep_id) if redis is not None else None,
    )).files


async def upload_site(
    storage: Storage, dep_id: str, src: Path, output: Path, emit: Emit, *,
    max_files: int = 0, max_bytes: int = 0, leases: BlobLeases | None = None,
    concurrency: int = UPLOAD_CONCURRENCY,
) -> Uploaded:
    rel_dir = output.relative_to(src).as_posix()
    try:
        out_fd = open_beneath(src, rel_dir, directory=True)
    except OSError as exc:
        raise BuildError(f"The output directory {rel_dir}/ cannot be read: {exc.strerror}") from None
    try:
        files = collect_files(out_fd, emit, max_files=max_files, max_bytes=max_bytes)
        if not files:
            raise BuildError(f"The output directory {rel_dir}/ holds no files.")
        redirects, headers = _read_rules(out_fd, {rel for rel, _ in files}, emit)
        served = [rel for rel, _ in files if rel not in RULE_FILES]
        emit("system", f"Uploading {len(served)} files from {rel_dir}/")
        manifest: dict[str, dict[str, object]] = {}
        new_blobs = 0
        gate = asyncio.Semaphore(concurrency)
        budget = _Budget(MEMORY_BUDGET)
        sizes = dict(files)

        async def upload_one(rel: str) -> None:
            nonlocal new_blobs
            content_type = guess_type(rel)
            # A file read whole weighs its size (its variants are smaller); a larger one is
            # streamed, and the storage bounds the memory of its parts.
            weight = sizes[rel] if sizes[rel] <= IN_MEMORY else 0
            async with gate, budget.take(weight):
                try:
                    fd = open_beneath(out_fd, rel)
                except OSError as exc:
                    raise BuildError(f"Could not read {rel_dir}/{rel}: {exc.strerror}") from None
                try:
                    blob = await asyncio.to_thread(_read_blob, fd)
                    if leases is not None:
                        await leases.hold([blob.digest])
                    encodings, stored = await _store_blob(storage, blob, fd, content_type)
                finally:
                    os.close(fd)
            new_blobs += stored
            manifest[rel] = {
                "hash": blob.digest, "size": blob.size, "type": content_type,
                "cache_control": manifests.cache_control(rel), "encodings": encodings,
            }

        await asyncio.gather(*(upload_one(rel) for rel in served))
    finally:
        os.close(out_fd)
    # The manifest goes last: a site is served only from a complete upload.
    await storage.put_bytes(
        manifest_key(dep_id), manifests.dumps(manifest, redirects, headers), "application/json"
    )
    if leases is not None:
        await leases.release()  # the manifest keeps the blobs from now on
    emit("system", f"Stored {new_blobs} new files; {len(served) - new_blobs} were stored already")
    return Uploaded(len(served), new_blobs)


class _Budget:
    """At most `limit` units taken at once; a taker asking for more waits for all of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free = limit
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def take(self, amount: int) -> AsyncIterator[None]:
        amount = min(amount, self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self.free >= amount)
            self.free -= amount
        try:
            yield
        finally:
            async with self._changed:
                self.free += amount
                self._changed.notify_all()


def _read_blob(fd: int) -> _Blob:
    size = os.fstat(fd).st_size
    digest = hashlib.sha256()
    if size <= IN_MEMORY:
        data = _read_all(fd)
        digest.update(data)
        return _Blob(digest.hexdigest(), len(data), data)
    total = 0
    while chunk := os.pread(fd, 1024 * 1024, total):
        digest.update(chunk)
        total += len(chunk)
    return _Blob(digest.hexdigest(), total, None)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1024 * 1024, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _compress(data: bytes) -> dict[str, bytes]:
    quality = 11 if len(data) <= BROTLI_BEST_UP_TO else 9
    variants = {
        "br": brotli.compress(data, quality=quality),
        "gzip": gzip.compress(data, compresslevel=9, mtime=0),
    }
    return {name: body for name, body in variants.items() if len(body) <= len(data) * VARIANT_WORTH}


async def _store_blob(
    storage: Storage, blob: _Blob, fd: int, content_type: str
) -> tuple[dict[str, int], int]:
    """The blob's variants (encoding -> size), and 1 when it was stored now, 0 when it was
    there already (then its variants are too: they are written first)."""
    wants_variants = blob.data is not None and manifests.compressible(content_type, blob.size)
    if await storage.stat(blob_key(blob.digest)) is not None:
        if not wants_variants:
            return {}, 0
        found = {}
        for encoding in ("br", "gzip"):
            info = await storage.stat(blob_key(blob.digest, encoding))
            if info is not None:
                found[encoding] = info.size
        return found, 0
    variants: dict[str, bytes] = {}
    if wants_variants:
        assert blob.data is not None
        variants = await asyncio.to_thread(_compress, blob.data)
    for encoding, body in variants.items():
        await storage.put_bytes(blob_key(blob.digest, encoding), body, content_type)
    if blob.data is not None:
        await storage.put_bytes(blob_key(blob.digest), blob.data, content_type)
    else:
        # The open file itself, whatever its name points at by now.
        await storage.put_file(blob_key(blob.digest), Path(f"/proc/self/fd/{fd}"), content_type)
    return {encoding: len(body) for encoding, body in variants.items()}, 1


def _read_rules(out_fd: int, names: set[str], emit: Emit) -> tuple[list[Redirect], list[HeaderRule]]:
    """The site's `_redirects` and `_headers` (at the output's root); each line that cannot be
    used is reported in the build log."""
    redirects: list[Redirect] = []
    headers: list[HeaderRule] = []
    for name in RULE_FILES:
        if name not in names:
            continue
        fd = open_beneath(out_fd, name)
        try:
            text = _read_all(fd).decode("utf-8", errors="replace")
        finally:
            os.close(fd)
        if name == "_redirects":
            redirects, problems = parse_redirects(text)
            count = len(redirects)
        else:
            headers, problems = parse_headers(text)
            count = len(headers)
        for problem in problems:
            emit("system", f"Warning: {problem}")
        emit("system", f"Read {count} rules from {name}")
    return redirects, headers


NOFOLLOW_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def open_beneath(base: Path | int, rel: str, *, directory: bool = False) -> int:
    """Open `rel` under `base` (a path or a directory fd) one component at a time, refusing a
    symlink at every step (ELOOP/ENOTDIR); a regular file unless `directory`."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), rel)
    fd = os.open(base, NOFOLLOW_FLAGS | os.O_DIRECTORY) if isinstance(base, Path) else os.dup(base)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = NOFOLLOW_FLAGS | (os.O_DIRECTORY if directory or not last else 0)
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
            raise OSError(errno.EINVAL, "not a regular file", rel)
        return fd
    except BaseException:
        os.close(fd)
        raise


def collect_files(
    out_fd: int, emit: Emit, *, max_files: int = 0, max_bytes: int = 0
) -> list[tuple[str, int]]:
    """(path, size) of the regular files under the directory `out_fd`; symlinks and other
    special files are skipped, never followed. Past `max_files` or `max_bytes`: BuildError."""
    files: list[tuple[str, int]] = []
    total = 0
    try:
        walk = os.fwalk(".", dir_fd=out_fd, follow_symlinks=False)
        for dirpath, dirnames, filenames, dir_fd in walk:
            base = dirpath.removeprefix(".").lstrip("/")
            for name in sorted(dirnames):
                if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                    emit("system", f"Skipped symlinked directory {_join(base, name)}")
            for name in sorted(filenames):
                rel = _join(base, name)
                mode = os.lstat(name, dir_fd=dir_fd)
                if not stat.S_ISREG(mode.st_mode):
                    kind = "a symlink" if stat.S_ISLNK(mode.st_mode) else "not a regular file"
                    emit("system", f"Skipped {rel}: {kind}")
                    continue
                files.append((rel, mode.st_size))
                total += mode.st_size
                if max_files and len(files) > max_files:
                    raise BuildError(
                        f"The build output holds more than {max_files} files "
                        "(DEPLOYHUB_BUILD_MAX_OUTPUT_FILES)."
                    )
                if max_bytes and total > max_bytes:
                    raise BuildError(
                        f"The build output is larger than {max_bytes // (1024 * 1024)} MiB "
                        "(DEPLOYHUB_BUILD_MAX_OUTPUT_MB)."
                    )
    except OSError as exc:
        raise BuildError(f"Could not read the build output: {exc}") from None
    return sorted(files)


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def guess_type(path: str) -> str:
    content_type, _ = mimetypes.guess_type(path, strict=False)
    if content_type is None:
        return "application/octet-stream"
    if content_type.startswith("text/") or content_type in (
        "application/javascript", "application/json", "image/svg+xml",
    ):
        return content_type + "; charset=utf-8"
    return content_type
