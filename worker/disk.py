"""How much disk a build command has filled, measured while it runs.

No limit on disk space works unprivileged on any filesystem (quotas and loop mounts need
root), so the worker measures the directories the build can write (its own directory, and
what it adds to the shared npm cache) every interval and stops the command past the limit.
Between scans a statvfs every 20 ms brings the next scan forward once the filesystem has
grown by what is left of the limit, so overshoot is about what the build writes in one poll
plus one scan (the scan itself is cheap, a few files a build writes fast); a single file
cannot exceed the limit at all (RLIMIT_FSIZE, set by the cgroup wrapper), and /tmp is a
tmpfs of at most the same size.

Scanning blocks: call `usage` from a thread.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

MIN_INTERVAL = 0.25
FILESYSTEM_POLL = 0.02  # seconds between statvfs calls while waiting for the next scan
SCAN_SHARE = 4  # sleep at least this many scan durations: scanning takes at most ~1/5 of a core


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
        self._base = 0

    async def baseline(self) -> None:
        self._base = await asyncio.to_thread(usage, self.shared)

    async def measure(self) -> int:
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
            # Between scans, statvfs (microseconds) watches the filesystem fill: once it has
            # grown by what is left of the limit, the next scan comes at once. A build writes
            # page cache at GB/s; without this it overshot by one interval's worth (~0.5 GiB).
            until = time.monotonic() + max(MIN_INTERVAL, SCAN_SHARE * (time.monotonic() - started))
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
