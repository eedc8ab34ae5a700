"""Host lookups cached per process, corrected by production events every replica hears."""

from __future__ import annotations

import asyncio

from deployhub.connections import get_store
from deployhub.sites import get_sites
from tests.support.infra import RedisServer
from tests.support.service import StartService, make_settings
from tests.support.sites import Publisher

SITE = {"index.html": "<h1>one</h1>", "app.js": "run();\n" * 100}


async def _wait_body(publisher: Publisher, host: str, body: bytes, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.05)):
        if (await publisher.get(host, "/"))[2] == body:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{host} never served {body!r}")


async def _drain_stale_connections(publisher: Publisher) -> None:
    """The pool's idle connections from before the restart would fail once each."""
    await get_store(publisher.service.app).redis.connection_pool.disconnect(inuse_connections=False)


async def test_a_site_already_seen_keeps_serving_while_redis_is_away(
    site_service: Publisher, redis_server: RedisServer,
) -> None:
    await site_service.publish("steady", SITE)
    await site_service.publish("unseen", SITE)
    assert (await site_service.get("steady", "/app.js"))[0] == 200
    assert (await site_service.get("steady", "/"))[0] == 200
    redis_server.stop()
    try:
        for path in ("/", "/app.js", "/a/client/route"):
            status, _, body = await site_service.get("steady", path)
            assert status == 200, (path, body)
        status, _, body = await site_service.get("unseen", "/")
        assert status == 503 and b"unavailable for a moment" in body
    finally:
        redis_server.start()
    sites = get_sites(site_service.service.app)
    await site_service.wait_live()
    await _drain_stale_connections(site_service)
    assert sites.stats["cache drops"] >= 1  # events may have been missed: looked up again
    await site_service.publish("steady", {**SITE, "index.html": "<h1>two</h1>"})
    await _wait_body(site_service, "steady", b"<h1>two</h1>")
    assert (await site_service.get("unseen", "/"))[0] == 200


async def test_every_replica_hears_production_move_and_costs_no_redis_round_trip(
    site_service: Publisher, redis_server: RedisServer, start_service: StartService, tmp_path: object,
) -> None:
    first = site_service
    settings = first.service.settings
    second = Publisher(await start_service(make_settings(
        settings.data_dir, redis_server.url, **{f: getattr(settings, f) for f in (
            "storage", "s3_bucket", "s3_prefix", "s3_endpoint_url", "s3_region")})), first.root)
    await second.wait_live()
    old, _, _ = await first.publish("moving", SITE)
    assert (await second.get("moving", "/"))[2] == b"<h1>one</h1>"
    lookups = await second.remembered("moving")
    await first.publish("moving", {**SITE, "index.html": "<h1>two</h1>"})
    await _wait_body(second, "moving", b"<h1>two</h1>")
    await first.service.post_json("/api/projects/moving/rollback", {"deployment": old})
    await _wait_body(second, "moving", b"<h1>one</h1>")
    sites = get_sites(second.service.app)
    for _ in range(20):
        await second.get("moving", "/")
    assert sites.stats["host look-ups"] == lookups  # both moves came as events, not look-ups


async def test_a_deleted_project_stops_serving_on_every_replica(site_service: Publisher) -> None:
    dep_id, _, _ = await site_service.publish("doomed", SITE)
    assert (await site_service.get("doomed", "/"))[0] == 200
    assert (await site_service.get(f"doomed--{dep_id}", "/"))[0] == 200
    async with site_service.service.http.delete(site_service.service.url + "/api/projects/doomed") as r:
        assert r.status == 200
    await _wait_body(site_service, "doomed", b"No site is deployed at doomed.localhost.\n")
    assert (await site_service.get(f"doomed--{dep_id}", "/"))[0] == 404
