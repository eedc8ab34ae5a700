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
