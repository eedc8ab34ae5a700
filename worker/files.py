"""Reading a file of an untrusted checkout: never through a symlink, never more than asked."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def read_head(path: Path, size: int) -> bytes | None:
    """At most `size` bytes of `path` when it is a regular file (not a symlink, a FIFO or a
    directory), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_text(path: Path, size: int) -> str:
    """`read_head` decoded (a UTF-8 byte-order mark skipped, as npm and Node skip it); ""
    when there is no such file."""
    return (read_head(path, size) or b"").decode("utf-8-sig", errors="replace")


LFS_POINTER = b"version https://git-lfs.github.com/spec/"
LFS_POINTER_MAX = 1024  # bytes: a pointer is about 130; a file this long is content
LFS_CHECKED_MAX = 20_000  # files of a checkout looked at


def lfs_pointers(checkout: Path, paths: list[str]) -> list[str]:
    """Which of `paths` (relative to `checkout`) hold a Git LFS pointer instead of content:
    what git checks out for a file kept in LFS when the LFS objects are not fetched."""
    found = []
    for path in paths[:LFS_CHECKED_MAX]:
        head = read_head(checkout / path, LFS_POINTER_MAX + 1) or b""
        if head.startswith(LFS_POINTER) and len(head) <= LFS_POINTER_MAX:
            found.append(path)
    return found
