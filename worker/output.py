"""The build's output: collected without ever following a symlink, then uploaded to storage.

Every name under the output is opened relative to a directory fd with O_NOFOLLOW, so a symlink
anywhere (the output directory, a parent of it, a file) can never lead outside the build.
"""

from __future__ import annotations

import asyncio
import errno
import json
import mimetypes
import os
import stat
from pathlib import Path

from deployhub.storage import Storage, manifest_key, site_key

from .detect import BuildError
from .proc import Emit

UPLOAD_CONCURRENCY = 8


async def upload(
    storage: Storage, dep_id: str, src: Path, output: Path, emit: Emit, *,
    max_files: int = 0, max_bytes: int = 0,
) -> int:
    """Upload the regular files under `output` (inside the repository `src`) as the site of
    `dep_id`, the manifest last; returns how many. Past `max_files` or `max_bytes`: BuildError."""
    rel_dir = output.relative_to(src).as_posix()
    try:
        out_fd = open_beneath(src, rel_dir, directory=True)
    except OSError as exc:
        raise BuildError(f"The output directory {rel_dir}/ cannot be read: {exc.strerror}") from None
    try:
        files = collect_files(out_fd, emit, max_files=max_files, max_bytes=max_bytes)
        if not files:
            raise BuildError(f"The output directory {rel_dir}/ holds no files.")
        emit("system", f"Uploading {len(files)} files from {rel_dir}/")
        manifest: dict[str, dict[str, object]] = {}
        gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def upload_one(rel: str) -> None:
            content_type = guess_type(rel)
            async with gate:
                try:
                    fd = open_beneath(out_fd, rel)
                except OSError as exc:
                    raise BuildError(f"Could not read {rel_dir}/{rel}: {exc.strerror}") from None
                try:
                    size = os.fstat(fd).st_size
                    # The open file itself, whatever its name points at by now.
                    await storage.put_file(site_key(dep_id, rel), Path(f"/proc/self/fd/{fd}"), content_type)
                finally:
                    os.close(fd)
            manifest[rel] = {"size": size, "type": content_type}

        await asyncio.gather(*(upload_one(rel) for rel, _ in files))
    finally:
        os.close(out_fd)
    # The manifest goes last: a site is served only from a complete upload.
    body = json.dumps({"files": dict(sorted(manifest.items()))}).encode()
    await storage.put_bytes(manifest_key(dep_id), body, "application/json")
    return len(files)


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
