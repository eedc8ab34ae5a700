"""Uploading a build's output: what storage is asked, what is compressed, what goes up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import brotli
import pytest

from deployhub.sites import PENDING_RECHECK, get_sites
from deployhub.storage import S3Storage, manifest_key
from tests.support.sites import Publisher
from worker.detect import BuildError
from worker.output import _Blob, _read_verified, usable_cpus
from worker.variants import brotli_qualities

CSS = "body { color: red; }\n" * 200  # compressible: gets .br and .gz variants
JS = "export const answer = () => 42;\n" * 100
SITE = {"index.html": "<h1>one</h1>" * 100, "assets/app.css": CSS, "assets/copy.css": CSS,
        "assets/app.js": JS, "assets/logo.png": os.urandom(4000)}


async def test_a_redeploy_asks_storage_once_and_uploads_and_compresses_nothing_stored(
    site_service: Publisher,
) -> None:
    requests = site_service.storage.requests
    _, _, first = await site_service.publish("again", SITE)
    assert first.new_blobs == 4 and first.compressed == 3  # the two copies of the css are one blob
    before = requests.copy()
    _, log, second = await site_service.publish("again", {**SITE, "assets/app.js": JS + "//2\n"})
    asked = requests - before
    assert second.new_blobs == 1 and second.compressed == 1  # only the changed script
    assert asked["put"] == 4  # its .br, .gz and bytes, then the manifest
    if isinstance(site_service.storage, S3Storage):
        assert asked["list"] == 1 and asked["stat"] == 0  # one ListObjectsV2, no HeadObject
    assert "Stored 1 new file;" in log[-1]
    status, headers, body = await site_service.get("again", "/assets/copy.css", Accept_Encoding="br")
    assert status == 200 and headers["Content-Encoding"] == "br"
    status, headers, body = await site_service.get("again", "/assets/app.js", Accept_Encoding="gzip")
    assert status == 200 and headers["Content-Encoding"] == "gzip"


async def test_a_deploy_of_stored_files_uploads_only_the_manifest(site_service: Publisher) -> None:
    await site_service.publish("one", SITE)
    before = site_service.storage.requests.copy()
    _, _, uploaded = await site_service.publish("two", SITE)  # another project, the same bytes
    assert uploaded.new_blobs == 0 and uploaded.compressed == 0
    assert (site_service.storage.requests - before)["put"] == 1
    status, headers, _ = await site_service.get("two", "/assets/app.css", Accept_Encoding="gzip, br")
    assert status == 200 and headers["Content-Encoding"] == "br"


async def test_a_first_deploy_is_served_at_once_then_with_its_compressed_copies(
    site_service: Publisher,
) -> None:
    during: list[tuple[int, Any, bytes]] = []

    async def while_compressing(dep_id: str) -> None:
        during.append(await site_service.get("early", "/assets/app.css", Accept_Encoding="br"))

    _, log, uploaded = await site_service.publish("early", SITE, on_stored=while_compressing)
    ((status, headers, body),) = during
    assert status == 200 and "Content-Encoding" not in headers and body == CSS.encode()
    assert uploaded.compressed == 3 and log[-1].startswith("Stored compressed copies of 3 files")
    sites = get_sites(site_service.service.app)
    reads = sites.stats["manifest reads"]
    async with asyncio.timeout(5):  # the site server reads the manifest again within a second
        while headers.get("Content-Encoding") != "br":
            await asyncio.sleep(0.1)
            status, headers, body = await site_service.get("early", "/assets/app.css", Accept_Encoding="br")
    assert status == 200 and brotli.decompress(body) == CSS.encode()
    assert sites.stats["manifest reads"] == reads + 1  # once, not on every request
    await asyncio.sleep(PENDING_RECHECK + 0.2)
    await site_service.get("early", "/assets/app.js", Accept_Encoding="br")
    assert sites.stats["manifest reads"] == reads + 1  # the second manifest is final


async def test_a_failed_second_read_keeps_serving_the_first_manifest(site_service: Publisher) -> None:
    async def while_compressing(dep_id: str) -> None:
        assert (await site_service.get("keep", "/assets/app.css", Accept_Encoding="br"))[0] == 200

    dep_id, _, _ = await site_service.publish("keep", SITE, on_stored=while_compressing)
    await site_service.storage.delete([manifest_key(dep_id)])  # the second read finds nothing
    await asyncio.sleep(PENDING_RECHECK + 0.1)
    sites = get_sites(site_service.service.app)
    reads = sites.stats["manifest reads"]
    status, headers, body = await site_service.get("keep", "/assets/app.css", Accept_Encoding="br")
    assert status == 200 and "Content-Encoding" not in headers and body == CSS.encode()
    assert sites.stats["manifest reads"] == reads  # it was looked for, not found: none read


async def test_a_manifest_whose_variants_never_came_is_final_after_its_time(site_service: Publisher) -> None:
    dep_id, _, _ = await site_service.publish("died", SITE)
    raw = json.loads(await site_service.storage.get_bytes(manifest_key(dep_id)) or b"")
    raw["variants_pending_until"] = time.time() - 1  # the worker died before the variants
    await site_service.storage.put_bytes(manifest_key(dep_id), json.dumps(raw).encode(), "application/json")
    sites = get_sites(site_service.service.app)
    reads = sites.stats["manifest reads"]
    for _ in range(2):
        status, _, _ = await site_service.get("died", "/assets/app.css", Accept_Encoding="br")
        assert status == 200
        await asyncio.sleep(PENDING_RECHECK + 0.1)
    assert sites.stats["manifest reads"] == reads + 1


async def test_keys_past_the_listed_pages_are_asked_for_one_by_one(
    s3_client: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store larger than the listing budget: what was listed counts, the rest is HEADed
    (a dependent past the listed part too)."""
    storage = S3Storage(s3_client, s3_bucket, "dh", list_page=2)
    for key in ("blobs/a", "blobs/a.br", "blobs/a.gz", "blobs/b", "blobs/c", "blobs/c.gz"):
        await storage.put_bytes(key, key.encode(), "text/plain")
    monkeypatch.setattr("deployhub.storage.KEYS_PER_LIST_PAGE", 10)  # one page for these keys
    asked = {"blobs/a": ["blobs/a.br", "blobs/a.gz"], "blobs/c": ["blobs/c.br", "blobs/c.gz"],
             "blobs/e": ["blobs/e.br"]}
    before = storage.requests.copy()
    found = await storage.stat_many(asked, within="blobs/")
    assert {k: v.size for k, v in found.items()} == {
        "blobs/a": 7, "blobs/a.br": 10, "blobs/a.gz": 10, "blobs/c": 7, "blobs/c.gz": 10}
    # Listed: a, a.br. Asked: a.gz, c, c.br, c.gz, e (not e.br: e is missing).
    assert storage.requests - before == {"list": 1, "stat": 5}
    monkeypatch.setattr("deployhub.storage.KEYS_PER_LIST_PAGE", 1)  # pages enough for all
    before = storage.requests.copy()
    assert await storage.stat_many(asked, within="blobs/") == found
    assert storage.requests - before == {"list": 3}


def test_a_file_rewritten_after_it_was_hashed_is_not_stored_under_the_old_hash(tmp_path: Path) -> None:
    path = tmp_path / "app.js"
    path.write_bytes(b"the bytes it was hashed as")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"other bytes")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BuildError, match="app.js changed while it was uploaded"):
            _read_verified(fd, _Blob(digest, 26, "app.js", "text/javascript"))
    finally:
        os.close(fd)


def test_compression_uses_the_cpus_the_build_may_use() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))



def test_brotli_is_at_its_best_while_it_fits_the_cpu_budget() -> None:
    MiB = 1024 * 1024
    assert brotli_qualities([MiB // 2, MiB // 4], cpus=1) == [11, 11]  # a redeploy
    assert brotli_qualities([MiB, MiB], cpus=1) == [10, 10]  # 2 MiB at 10 costs 0.86 MiB at 11
    assert brotli_qualities([MiB, MiB // 4], cpus=2) == [11, 11]
    # 3 MiB at 10 takes 1.29 of 2 MiB; 1 MiB more at 11 costs 0.57 more: the largest first.
    assert brotli_qualities([MiB, MiB, MiB], cpus=2) == [11, 10, 10]
    # 10 MiB: quality 8 (0.4 MiB of the budget), and 10 for the files what is left allows.
    assert brotli_qualities([4 * MiB, 3 * MiB, 2 * MiB, MiB], cpus=1) == [8, 8, 8, 10]
    assert brotli_qualities([3 * MiB], cpus=8) == [10]  # never 11 above BROTLI_BEST_UP_TO
