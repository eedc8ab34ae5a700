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

The scan runs as `du` in a process of its own (`tree_usage`), not in a thread: the worker's
event loop relays every byte of the build's network (worker/egress.py), and a scanning thread
holds the GIL between its switch intervals, so each of the loop's wakeups can wait up to 5 ms
for it. In `bench.egress_install` a Create React App's `npm ci` through the proxy used about
1 s more CPU in the proxy's process with such a scan than with `du` (bench/README.md).
`usage` is the same count in Python, for a machine without `du`; it blocks: call it from a
thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
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


async def tree_usage(paths: Sequence[Path]) -> int:
    """What `usage` counts, measured by `du -sk` (POSIX: allocated space, hard links once)
    in a process of its own; by `usage` in a thread where there is no `du` or it did not
    report every path."""
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if not existing:
        return 0
    if du := shutil.which("du"):
        proc = await asyncio.create_subprocess_exec(
            du, "-sk", "--", *existing,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await proc.communicate()  # exit 1 when a file vanished mid-scan: totals stand
        finally:
            if proc.returncode is None:  # cancelled: the command ended, its watch with it
                proc.kill()
        sizes = [line.partition(b"\t")[0] for line in out.splitlines()]
        if len(sizes) == len(existing) and all(size.isdigit() for size in sizes):
            return sum(int(size) for size in sizes) * 1024
    return await asyncio.to_thread(usage, paths)


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
        self._base = await tree_usage(self.shared)

    async def measure(self) -> int:
        self.scans += 1
        own, shared = await asyncio.gather(tree_usage(self.own), tree_usage(self.shared))
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
