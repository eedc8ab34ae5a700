"""Find build workers as an operator would: by their command line in /proc."""

from __future__ import annotations

import asyncio
from pathlib import Path


def worker_pids(dep_id: str) -> list[int]:
    """Pids of the `python -m worker <dep_id>` processes running now."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = b" ".join(argv).split()  # a standby worker names its build in one retitled string
        if b"worker" in words and dep_id.encode() in words and b"-m" in words:
            pids.append(int(entry.name))
    return pids


async def wait_for_worker(dep_id: str, *, running: bool, timeout: float = 20) -> list[int]:
    """Wait until a worker for `dep_id` runs (or none does); returns the pids seen last."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pids = worker_pids(dep_id)
        if bool(pids) == running:
            return pids
        if loop.time() > deadline:
            raise AssertionError(f"worker of {dep_id} {'never started' if running else 'still runs'}: {pids}")
        await asyncio.sleep(0.05)
