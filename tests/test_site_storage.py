"""Content-addressed storage: dedup, deletion, retention, and collection safe against uploads."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

from deployhub import keys
from deployhub.collector import DELETING_TTL, BlobLeases, Collector
from deployhub.connections import get_store
from deployhub.sites import get_sites
from deployhub.status import Status
from deployhub.storage import blob_key
from tests.support.sites import Publisher

BIG_CSS = "body { color: red; }\n" * 200  # compressible: gets .br and .gz variants
V1 = {"index.html": "<h1>one</h1>", "assets/app.css": BIG_CSS, "assets/logo.svg": "<svg/>"}


async def test_a_redeploy_that_changed_one_file_uploads_one_file(site_service: Publisher) -> None:
    await site_service.publish("dedup", V1)
    first = await site_service.blob_keys()
    assert len(first) == 5  # three blobs, and the stylesheet's two variants
    puts = site_service.storage.requests["put"]
    _, log, uploaded = await site_service.publish("dedup", {**V1, "index.html": "<h1>two</h1>"})
    assert uploaded.new_blobs == 1 and "Stored 1 new file; 2 were stored already" in log
    assert len(await site_service.blob_keys() - first) == 1
    assert site_service.storage.requests["put"] - puts == 2  # the blob, then the manifest
    assert (await site_service.get("dedup", "/"))[2] == b"<h1>two</h1>"


async def test_deleting_keeps_blobs_other_deployments_use(site_service: Publisher) -> None:
    old, _, _ = await site_service.publish("del", V1)
    await site_service.publish("del", {**V1, "index.html": "<h1>two</h1>"})
    other, _, _ = await site_service.publish("other", {"index.html": "<h1>one</h1>"})
    before = await site_service.blob_keys()
    status, body = await _delete(site_service, f"/api/deployments/{old}")
    assert status == 200 and body == {"deleted": [old], "blobs_deleted": 0}  # all still used
    status, body = await _delete(site_service, "/api/projects/del")
    assert status == 200 and body["blobs_deleted"] == 3  # the css (and variants), svg, "two"
    assert len(before - await site_service.blob_keys()) == 5
    assert (await site_service.get("other", "/"))[2] == b"<h1>one</h1>"  # shared with "del"
    assert (await site_service.get("del", "/"))[0] == 404
    assert (await site_service.get(f"other--{other}", "/"))[0] == 200


async def test_production_cannot_be_deleted_while_it_serves(site_service: Publisher) -> None:
    first, _, _ = await site_service.publish("prod", V1)
    second, _, _ = await site_service.publish("prod", {**V1, "index.html": "new"})
    status, body = await _delete(site_service, f"/api/deployments/{second}")
    assert status == 409 and "roll back to another deployment first" in body["error"]
    status, _ = await site_service.service.post_json("/api/projects/prod/rollback", {"deployment": first})
    assert status == 200
    assert (await _delete(site_service, f"/api/deployments/{second}"))[0] == 200
    assert (await site_service.get(f"prod--{second}", "/"))[0] == 404
    assert (await site_service.get("prod", "/"))[2] == b"<h1>one</h1>"


async def test_a_deployment_still_building_cannot_be_deleted(site_service: Publisher) -> None:
    dep_id, _, _ = await site_service.publish("busy", V1, ready=False)
    status, body = await _delete(site_service, f"/api/deployments/{dep_id}")
    assert status == 409 and "still building" in body["error"]
    status, body = await _delete(site_service, "/api/projects/busy")
    assert status == 409 and "cancel it first" in body["error"]


@pytest.mark.parametrize("site_service", [{"keep_deployments": 2}], indirect=True)
async def test_a_project_keeps_its_newest_deployments(site_service: Publisher) -> None:
    ids = [(await site_service.publish("keep", {**V1, "index.html": f"v{n}"}))[0] for n in range(4)]
    assert await _listed(site_service, "keep", 2) == {ids[3], ids[2]}
    # Newer failed builds count, but production stays whatever its age.
    failed = [(await site_service.publish("keep", V1, status=Status.FAILED))[0] for _ in range(2)]
    await site_service.service.post_json("/api/projects/keep/rollback", {"deployment": ids[3]})
    assert await _listed(site_service, "keep", 3) == {*failed, ids[3]}
    assert (await site_service.get("keep", "/"))[2] == b"v3"
    assert (await site_service.get(f"keep--{ids[2]}", "/"))[0] == 404


async def _listed(site_service: Publisher, project: str, count: int) -> set[str]:
    sites = get_sites(site_service.service.app)
    for _ in range(200):
        _, listed = await site_service.service.get_json(f"/api/projects/{project}/deployments")
        if len(listed["deployments"]) == count and not sites._tasks:
            break
        await asyncio.sleep(0.05)
    return {d["id"] for d in listed["deployments"]}


async def test_a_leased_blob_is_never_collected(site_service: Publisher) -> None:
    """An upload leases a blob before it checks that the blob exists: a collector running
    between that check and the upload's manifest must leave the blob alone."""
    dep_id, _, _ = await site_service.publish("lease", V1)
    manifest = json.loads(await site_service.storage.get_bytes(f"manifests/{dep_id}.json") or b"")
    digest = manifest["files"]["index.html"]["hash"]
    store = get_store(site_service.service.app)
    await BlobLeases(store.redis, 3600, "upload").hold([digest])  # a concurrent upload of the same file
    removed = await get_sites(site_service.service.app).collector.delete_project("lease")
    assert removed.blobs == 2  # the css and the svg; index.html's bytes are leased
    assert blob_key(digest) in await site_service.blob_keys()


async def test_an_upload_waits_for_a_deletion_in_progress_then_uploads_again(
    site_service: Publisher,
) -> None:
    await site_service.publish("race", V1)
    redis = get_store(site_service.service.app).redis
    digest = "0" * 64
    await redis.set(keys.blob_deleting(digest), "1", ex=DELETING_TTL)  # a collector is at it
    hold = asyncio.create_task(BlobLeases(redis, 3600, "upload").hold([digest]))
    await asyncio.sleep(0.3)
    assert not hold.done()
    await redis.delete(keys.blob_deleting(digest))
    await asyncio.wait_for(hold, 5)
    # And while the lease runs, no collector may claim the blob.
    collector = get_sites(site_service.service.app).collector
    assert isinstance(collector, Collector)
    assert await collector._claim(keys=[keys.blob_lease(""), keys.blob_deleting("")],
                                  args=[repr(time.time()), DELETING_TTL, digest]) == []


async def test_sites_of_the_earlier_layout_are_still_served_and_deleted(site_service: Publisher) -> None:
    dep_id, _, _ = await site_service.publish("legacy", V1)
    storage = site_service.storage
    await storage.delete([f"manifests/{dep_id}.json"])  # rewrite it as an earlier version did
    await storage.put_bytes(f"sites/{dep_id}/index.html", b"<h1>old layout</h1>", "text/html")
    old = {"files": {"index.html": {"size": 19, "type": "text/html; charset=utf-8"}}}
    await storage.put_bytes(f"manifests/{dep_id}.json", json.dumps(old).encode(), "application/json")
    get_sites(site_service.service.app)._manifests.clear()
    status, headers, body = await site_service.get("legacy", "/")
    assert (status, body) == (200, b"<h1>old layout</h1>") and headers["Cache-Control"] == "no-cache"
    assert (await _delete(site_service, "/api/projects/legacy"))[0] == 200
    assert [k async for k in storage.list_keys("sites/")] == []


async def _delete(site_service: Publisher, path: str) -> tuple[int, dict[str, object]]:
    service = site_service.service
    async with service.http.delete(service.url + path) as r:
        return r.status, dict(await r.json())


async def test_deployhub_rm_deletes_deployments_then_the_project(site_service: Publisher) -> None:
    old, _, _ = await site_service.publish("cli", V1)
    await site_service.publish("cli", {**V1, "index.html": "new"})
    service = site_service.service

    async def rm(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "deployhub.cli", "rm", *args, "--server", service.url,
            "--token", service.token, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode()

    assert await rm("other-project", old) == (1, f"deployhub: deployment {old} belongs to cli, not other-project\n")
    code, out = await rm("cli", old)
    assert code == 0 and out == f"Deleted {old} (1 stored files no longer used)\n"
    code, out = await rm("cli")
    assert code == 0 and "stored files no longer used" in out
    assert (await site_service.get("cli", "/"))[0] == 404


async def test_a_sweep_removes_blobs_of_failed_uploads_once_their_leases_end(
    site_service: Publisher,
) -> None:
    await site_service.publish("sweep", V1)
    await _listed(site_service, "sweep", 1)  # the retention pass (and its sweep) is over
    kept = await site_service.blob_keys()
    storage, redis = site_service.storage, get_store(site_service.service.app).redis
    orphan, uploading = "1" * 64, "2" * 64
    for digest in (orphan, uploading):  # as an upload that died after storing, and one live
        await storage.put_bytes(blob_key(digest), b"left over", "text/plain")
        await storage.put_bytes(blob_key(digest, "br"), b"left over", "text/plain")
    await BlobLeases(redis, 3600, "live-upload").hold([uploading])
    assert await get_sites(site_service.service.app).collector.sweep() == 1
    assert await site_service.blob_keys() == kept | {blob_key(uploading), blob_key(uploading, "br")}
