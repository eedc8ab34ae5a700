"""The build's output: collected without ever following a symlink, then uploaded to storage.

Every name under the output is opened relative to a directory fd with O_NOFOLLOW, so a symlink
anywhere (the output directory, a parent of it, a file) can never lead outside the build.

Storage is content-addressed: a file's bytes go to `blobs/<sha256>` once, whatever deploys
them; a redeploy uploads only the files that changed. Text assets get brotli and gzip variants
beside them (see worker/variants.py for how they are made, and at what quality). A build
does not wait for them: it stores the new blobs and a first manifest, is ready, then makes
the variants and stores the manifest again. So a blob that exists has its variants, except
for the seconds between: another deployment that finds the blob then (or after a worker
died in between) serves it uncompressed.

An upload hashes every file first (streamed), leases the blobs, asks storage once which it
holds (`Storage.stat_many`: on S3 one listing of `blobs/`, not a HeadObject per blob), then
reads, compresses and uploads only the missing ones, the manifest last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import mimetypes
import multiprocessing
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from deployhub import manifest as manifests
from deployhub.collector import BlobLeases
from deployhub.rules import HeaderRule, Redirect, parse_headers, parse_redirects
from deployhub.storage import BLOBS, Storage, blob_key, manifest_key

from .detect import BuildError
from .proc import Emit
from .variants import ENCODINGS, brotli_qualities, make_variants

log = logging.getLogger(__name__)


def file_count(count: int) -> str:
    """"1 file", "2 files": for the build log's lines."""
    return f"{count} file" if count == 1 else f"{count} files"


# Files uploaded at once: each upload mostly waits on S3's round trips (a HeadObject, then up
# to three PutObjects), so many in flight hide the latency; the connection pool of
# deployhub.storage.s3_config holds as many.
UPLOAD_CONCURRENCY = 64
# Files up to this size are read into memory once (hashed, compressed, uploaded from there);
# larger ones are hashed as a stream and uploaded from the file.
IN_MEMORY = 8 * 1024 * 1024
# Bytes of files held in memory at once by the uploads in flight, whatever their number.
MEMORY_BUDGET = 64 * 1024 * 1024
VARIANT_WORTH = 0.9  # keep a variant only when it is at most 90% of the original
# How long after the first manifest site servers look for the one with the variants (past
# it, a worker that died meanwhile leaves the first as final).
VARIANTS_PENDING_FOR = 600.0
RULE_FILES = ("_redirects", "_headers")
LEFT_OUT_SHOWN = 5  # of the hidden files a static site leaves out, named in the log


@dataclass
class Uploaded:
    files: int
    new_blobs: int  # blobs this deployment stored; the rest existed already
    compressed: int = 0  # blobs it made variants of (only new ones)


@dataclass
class _Blob:
    digest: str
    size: int
    rel: str  # a file holding it (one of them when several do)
    type: str  # its Content-Type, stored on the objects
    variants: bool = False  # a text asset: precompressed


async def upload_site(
    storage: Storage, dep_id: str, src: Path, output: Path, emit: Emit, *,
    max_files: int = 0, max_bytes: int = 0, leases: BlobLeases | None = None,
    concurrency: int = UPLOAD_CONCURRENCY,
    on_stored: Callable[[Uploaded], Awaitable[None]] | None = None, as_is: bool = False,
    rules: tuple[list[Redirect], list[HeaderRule]] = ([], []), base: str = "",
) -> Uploaded:
    """Hash every file, lease the blobs, ask storage once which of them (and their variants)
    it holds, then compress and upload only the missing ones, the manifest last.

    With `on_stored`, the site does not wait for its variants: the blobs go first, then a
    manifest without the new variants (`on_stored` is called once it is stored: the site is
    served from then on), then the variants are made and the manifest is stored again.

    `base` ("repo/"): the sub-path the site was built for; its files are served under it and
    / redirects there (deployhub/manifest.py)."""
    rel_dir = output.relative_to(src).as_posix()
    try:
        out_fd = open_beneath(src, rel_dir, directory=True)
    except OSError as exc:
        raise BuildError(f"The output directory {rel_dir}/ cannot be read: {exc.strerror}") from None
    cpus = usable_cpus()
    pool = compressor(min(cpus, concurrency))
    try:
        files = collect_files(out_fd, emit, max_files=max_files, max_bytes=max_bytes,
                              without_hidden=as_is)
        if not files:
            raise BuildError(f"The output directory {rel_dir}/ holds no files.")
        redirects, headers = _read_rules(out_fd, {rel for rel, _ in files}, emit)
        # Then those of the repository's netlify.toml / vercel.json (`rules`), as Netlify
        # reads _redirects before netlify.toml.
        redirects, headers = redirects + rules[0], headers + rules[1]
        if base:  # first, and temporary: the next deployment may be built for the root
            redirects = [Redirect("/", f"/{base}", 302, force=True), *redirects]
        served = [rel for rel, _ in files if rel not in RULE_FILES]
        shown = "the repository root" if rel_dir == "." else f"{rel_dir}/"
        emit("system", f"Uploading {file_count(len(served))} from {shown}")
        digests = await _hash_files(out_fd, rel_dir, served, threads=min(cpus, 8))
        # Files with the same bytes share one blob; it gets variants if any of them is text.
        blobs: dict[str, _Blob] = {}
        for rel in served:
            digest, size = digests[rel]
            content_type = guess_type(rel)
            blob = blobs.setdefault(digest, _Blob(digest, size, rel, content_type))
            blob.variants = blob.variants or manifests.compressible(content_type, size)
        if leases is not None:  # before the blobs are looked for: see deployhub/collector.py
            await leases.hold(blobs)
        stored = await storage.stat_many(
            {blob_key(d): [blob_key(d, e) for e in ENCODINGS] if b.variants else [] for d, b in blobs.items()},
            within=BLOBS,
        )
        missing = sorted((b for b in blobs.values() if blob_key(b.digest) not in stored),
                         key=lambda b: -b.size)  # the longest to compress start first
        to_compress = [b for b in missing if b.variants and b.size <= IN_MEMORY]
        quality = dict(zip((b.digest for b in to_compress),
                           brotli_qualities([b.size for b in to_compress], cpus)))
        encodings: dict[str, dict[str, int]] = {
            digest: {e: stored[blob_key(digest, e)].size for e in ENCODINGS if blob_key(digest, e) in stored}
            for digest in blobs
        }
        gate = asyncio.Semaphore(concurrency)
        budget = _Budget(MEMORY_BUDGET)

        # Files waiting to be compressed hold memory but no network slot: the uploads of
        # the others go on meanwhile. A few more than the processes keep every one busy.
        compressing = asyncio.Semaphore(2 * min(cpus, concurrency))

        def open_file(rel: str) -> int:
            try:
                return open_beneath(out_fd, rel)
            except OSError as exc:
                raise BuildError(f"Could not read {rel_dir}/{rel}: {exc.strerror}") from None

        async def upload_one(
            blob: _Blob, *, bytes_too: bool = True, variants_too: bool = True,
            memory: _Budget = budget, after: asyncio.Event | None = None,
        ) -> None:
            if blob.size > IN_MEMORY:  # streamed; the storage bounds the memory of its parts
                async with gate:
                    fd = open_file(blob.rel)
                    try:
                        # The open file itself, whatever its name points at by now.
                        await storage.put_file(blob_key(blob.digest), Path(f"/proc/self/fd/{fd}"), blob.type)
                    finally:
                        os.close(fd)
                return
            # A file read whole weighs its size (its variants are smaller).
            async with memory.take(blob.size):
                data = await asyncio.to_thread(_read_file, open_file, blob)
                variants: dict[str, bytes] = {}
                if blob.variants and variants_too:
                    async with compressing:
                        variants = await _compress(pool, data, quality[blob.digest])
                if after is not None:
                    await after.wait()
                async with gate:
                    # Made together, the variants go first: a blob found stored has them.
                    await asyncio.gather(*(
                        storage.put_bytes(blob_key(blob.digest, e), body, blob.type)
                        for e, body in variants.items()
                    ))
                    encodings[blob.digest] = {e: len(body) for e, body in variants.items()}
                    if bytes_too:
                        await storage.put_bytes(blob_key(blob.digest), data, blob.type)

        async def store_manifest(pending_until: float = 0.0) -> None:
            manifest: dict[str, dict[str, object]] = {}
            for rel in served:
                digest, size = digests[rel]
                content_type = guess_type(rel)
                manifest[base + rel] = {
                    "hash": digest, "size": size, "type": content_type,
                    "cache_control": manifests.cache_control(rel),
                    "encodings": encodings[digest] if manifests.compressible(content_type, size) else {},
                }
            await storage.put_bytes(
                manifest_key(dep_id), manifests.dumps(manifest, redirects, headers, pending_until, base),
                "application/json",
            )

        new_blobs = len(missing)
        uploaded = Uploaded(len(served), new_blobs)
        already = len(served) - new_blobs
        stored_line = (f"Stored {new_blobs} new {'file' if new_blobs == 1 else 'files'}; {already} "
                       f"{'was' if already == 1 else 'were'} stored already")
        if on_stored is None or not to_compress:
            await asyncio.gather(*(upload_one(blob) for blob in missing))
            # The manifest goes last: a site is served only from a complete upload.
            await store_manifest()
            uploaded.compressed = len(to_compress)
            emit("system", stored_line)
            if on_stored is not None:
                await on_stored(uploaded)
        else:
            # The variants are made meanwhile, by processes that yield the CPU to the uploads
            # (see compressor()), and stored once the site is live; each half of the memory.
            live = asyncio.Event()
            first, then = _Budget(MEMORY_BUDGET // 2), _Budget(MEMORY_BUDGET // 2)
            failed: list[str] = []

            async def variants_of(blob: _Blob) -> None:
                try:
                    await upload_one(blob, bytes_too=False, memory=then, after=live)
                except Exception as exc:  # the site is live: this costs bytes, not the deploy
                    log.warning("deployment %s: no compressed copies of %s", dep_id, blob.rel, exc_info=True)
                    failed.append(f"{blob.rel}: {exc}")

            making = asyncio.gather(*(variants_of(blob) for blob in to_compress))
            try:
                await asyncio.gather(*(upload_one(blob, variants_too=False, memory=first) for blob in missing))
                await store_manifest(pending_until=time.time() + VARIANTS_PENDING_FOR)
                emit("system", stored_line)
                await on_stored(uploaded)
                started = time.monotonic()
                live.set()
                await making
            finally:
                making.cancel()
            uploaded.compressed = len(to_compress) - len(failed)
            if failed:
                emit("system", f"Compressed copies of {file_count(len(failed))} not stored (first: "
                               f"{failed[0]}); they are served uncompressed.")
            try:
                await store_manifest()
            except Exception as exc:
                log.warning("deployment %s: manifest with compressed copies not stored", dep_id, exc_info=True)
                emit("system", f"Compressed copies not listed ({exc}): the new files are served uncompressed.")
            else:
                emit("system", f"Stored compressed copies of {file_count(uploaded.compressed)} "
                               f"{time.monotonic() - started:.1f} s after the site went live")
    except BaseException:
        # A process still compressing finishes that one file, then exits.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        os.close(out_fd)
    await asyncio.to_thread(pool.shutdown)  # idle by now: its processes exit at once
    if leases is not None:
        await leases.release()  # the manifest keeps the blobs from now on
    return uploaded


def usable_cpus() -> int:
    """The CPUs this process may run on, and no more than its cgroup's CPU quota allows."""
    count = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    return count


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


async def _hash_files(out_fd: int, rel_dir: str, rels: list[str], threads: int) -> dict[str, tuple[str, int]]:
    """(sha256, size) of each file, read as a stream, in a few threads (hashlib lets go of
    the GIL): the bytes are not kept, only what storage needs to be asked about them."""
    def hash_some(some: list[str]) -> dict[str, tuple[str, int]]:
        found = {}
        for rel in some:
            try:
                fd = open_beneath(out_fd, rel)
            except OSError as exc:
                raise BuildError(f"Could not read {rel_dir}/{rel}: {exc.strerror}") from None
            try:
                found[rel] = _hash_fd(fd)
            finally:
                os.close(fd)
        return found

    parts = await asyncio.gather(*(asyncio.to_thread(hash_some, rels[i::threads]) for i in range(threads)))
    return {rel: found for part in parts for rel, found in part.items()}


def _hash_fd(fd: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    while chunk := os.pread(fd, 1024 * 1024, total):
        digest.update(chunk)
        total += len(chunk)
    return digest.hexdigest(), total


def _read_file(open_file: Callable[[str], int], blob: _Blob) -> bytes:
    fd = open_file(blob.rel)
    try:
        return _read_verified(fd, blob)
    finally:
        os.close(fd)


def _read_verified(fd: int, blob: _Blob) -> bytes:
    """The file's bytes, which must still be those it was hashed as: a blob is named by its
    bytes and shared by every deployment of them, so a file rewritten after it was hashed
    must not be stored under the old name."""
    data = _read_all(fd)
    if hashlib.sha256(data).hexdigest() != blob.digest:
        raise BuildError(f"{blob.rel} changed while it was uploaded.")
    return data


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1024 * 1024, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def compressor(workers: int) -> ProcessPoolExecutor:
    """Processes that make variants (see worker/variants.py), forked from a server process
    that holds no event loop or threads of ours. At the lowest priority: they work while the
    uploads wait on the network, and give way to them (and to the next build) when not."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=os.nice, initargs=(19,))


async def _compress(pool: Executor, data: bytes, quality: int) -> dict[str, bytes]:
    """The variants worth keeping, made in `pool`: at most VARIANT_WORTH of the original's
    size."""
    made = await asyncio.get_running_loop().run_in_executor(pool, make_variants, data, quality)
    return {name: body for name, body in made.items() if len(body) <= len(data) * VARIANT_WORTH}


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
    out_fd: int, emit: Emit, *, max_files: int = 0, max_bytes: int = 0,
    without_hidden: bool = False,
) -> list[tuple[str, int]]:
    """(path, size) of the regular files under the directory `out_fd`; symlinks and other
    special files are skipped, never followed. Past `max_files` or `max_bytes`: BuildError.

    `without_hidden` (a repository published as it is): names starting with a dot (.git,
    .env, .github), but for .well-known, and node_modules are left out, and the log says so."""
    files: list[tuple[str, int]] = []
    total = 0
    left_out: list[str] = []
    try:
        walk = os.fwalk(".", dir_fd=out_fd, follow_symlinks=False)
        for dirpath, dirnames, filenames, dir_fd in walk:
            base = dirpath.removeprefix(".").lstrip("/")
            if without_hidden:
                left_out += [_join(base, n) for n in sorted(dirnames + filenames) if _hidden(n)]
                dirnames[:] = [n for n in dirnames if not _hidden(n)]
                filenames = [n for n in filenames if not _hidden(n)]
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
    if left_out:
        shown = ", ".join(left_out[:LEFT_OUT_SHOWN]) + (
            f" and {len(left_out) - LEFT_OUT_SHOWN} more" if len(left_out) > LEFT_OUT_SHOWN else "")
        emit("system", f"Not published (hidden, or node_modules): {shown}")
    return sorted(files)


def _hidden(name: str) -> bool:
    return (name.startswith(".") and name != ".well-known") or name == "node_modules"


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
