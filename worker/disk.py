"""How much disk a build command has filled, measured while it runs.

No limit on disk space works unprivileged on any filesystem (quotas and loop mounts need
root), so the worker measures the directories the build can write (its own directory, and
what it adds to its package manager caches) and stops the command past the limit.

Scanning a tree is not free: an install writes tens of thousands of files (a Create React
App's node_modules holds 37,000), and a scan of them every second took a sixth of a core
from the install it watched. So the scan runs when the filesystem says it may be needed: a
statvfs every 20 ms (microseconds each) watches the filesystem of the build's directory, and
once it has grown by what is left of the limit since the last scan, the next scan comes at
once; overshoot is about what the build writes in one poll plus one scan. Otherwise a scan
comes every BACKSTOP seconds at most, for what statvfs cannot see: caches on another
filesystem, or someone else freeing space while the build fills it. A single file cannot
exceed the limit at all (RLIMIT_FSIZE, set by the cgroup wrapper), and /tmp is a tmpfs of
at most the same size.

Scanning blocks: call `usage` from a thread.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

FILESYSTEM_POLL = 0.02  # seconds between statvfs calls while waiting for the next scan
BACKSTOP = 5.0  # seconds between scans while the filesystem does not grow toward the limit
SCAN_SHARE = 20  # and at least this many scan durations: idle scanning takes ~1/20 of a core


def usage(paths: Sequence[Path]) -> int:
    """Bytes of disk the trees under `paths` occupy (allocated blocks, hard links once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(p) for p in paths]
    while stack:
        top = stack.pop()
        try:
            entries = os.scandir(top)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


class DiskWatch:
    """Watches one command: `run()` returns once the command has filled more than `limit`
    bytes (own directories, plus growth of the shared ones since the start)."""

    def __init__(self, own: Sequence[Path], shared: Sequence[Path], limit: int) -> None:
        self.own = list(own)
        self.shared = list(shared)
        self.limit = limit
        self.used = 0
        self.exceeded = False
        self.scans = 0
        self._base = 0

    async def baseline(self) -> None:
        self._base = await asyncio.to_thread(usage, self.shared)

    async def measure(self) -> int:
        self.scans += 1
        own, shared = await asyncio.to_thread(lambda: (usage(self.own), usage(self.shared)))
        self.used = own + max(0, shared - self._base)
        return self.used

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            filled = filesystem_used(self.own)
            if await self.measure() > self.limit:
                self.exceeded = True
                return
            # A build writes page cache at GB/s: statvfs (microseconds) sees the filesystem
            # fill, and once it has grown by what is left of the limit the scan comes at once.
            until = time.monotonic() + max(BACKSTOP, SCAN_SHARE * (time.monotonic() - started))
            while time.monotonic() < until:
                await asyncio.sleep(FILESYSTEM_POLL)
                if filesystem_used(self.own) - filled > self.limit - self.used:
                    break


def filesystem_used(paths: Sequence[Path]) -> int:
    """Bytes in use on the filesystem of the first of `paths` that exists (ext4 and xfs count
    delayed allocations); 0 if none does. Other writers count too: it only brings a scan on."""
    for path in paths:
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    return 0
