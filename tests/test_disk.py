"""The disk watch: a scan of the build's trees only when the filesystem grows toward the limit
(or every BACKSTOP seconds), so a big node_modules is not walked every second.

The watched trees live on /dev/shm (a tmpfs nothing else here writes much), so other tests
writing to the disk do not bring scans on."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import disk
from worker.disk import DiskWatch

MIB = 1024 * 1024


@pytest.fixture
def shm() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dh-disk-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path)


async def test_an_idle_tree_is_scanned_once_per_backstop(shm: Path) -> None:
    for i in range(3000):
        (shm / f"d{i % 50}").mkdir(exist_ok=True)
        (shm / f"d{i % 50}" / f"f{i}").write_bytes(b"x" * 100)
    watch = DiskWatch([shm], [], 64 * MIB)
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(2)
    assert not task.done() and watch.scans == 1 and watch.used > 3000 * 100
    task.cancel()


async def test_growth_past_the_limit_brings_the_scan_on_at_once(shm: Path) -> None:
    watch = DiskWatch([shm], [], 8 * MIB)
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0.3)
    (shm / "big").write_bytes(os.urandom(16 * MIB))
    await asyncio.wait_for(task, disk.BACKSTOP / 2)  # well before the backstop scan
    assert watch.exceeded and watch.used > 8 * MIB and watch.scans == 2


async def test_a_cache_on_another_filesystem_is_caught_by_the_backstop(shm: Path, tmp_path: Path) -> None:
    watch = DiskWatch([shm], [tmp_path], 4 * MIB)
    await watch.baseline()
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0.2)
    (tmp_path / "grown").write_bytes(os.urandom(6 * MIB))
    await asyncio.wait_for(task, disk.BACKSTOP + 3)
    assert watch.exceeded and watch.scans == 2


async def test_du_counts_what_usage_counts(shm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 MiB in files, one of them hard-linked (counted once), a symlink, and a path that does
    # not exist: du and the Python walk agree to the directories' own blocks (du counts the
    # top directory, the walk does not).
    (shm / "a").mkdir()
    (shm / "a" / "one").write_bytes(os.urandom(MIB))
    (shm / "b").write_bytes(os.urandom(MIB))
    os.link(shm / "b", shm / "a" / "b-again")
    (shm / "a" / "link").symlink_to("/etc")
    paths = [shm / "a", shm / "b", shm / "missing"]
    walked = await asyncio.to_thread(disk.usage, paths)
    measured = await disk.tree_usage(paths)
    assert 2 * MIB <= walked <= measured <= walked + 64 * 1024
    monkeypatch.setenv("PATH", str(tmp_path))  # no du: the walk, in a thread
    assert await disk.tree_usage(paths) == walked
    assert await disk.tree_usage([shm / "missing"]) == 0
