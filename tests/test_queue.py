"""The shared build queue: DEPLOYHUB_MAX_BUILDS across replicas, positions, leased slots."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from redis.asyncio import Redis

from deployhub import keys
from deployhub.queue import BuildQueue, Dispatcher
from deployhub.status import Status
from deployhub.store import Store
from tests.support.infra import GitServer, RedisServer
from tests.support.moto_ecs import Cluster
from tests.support.service import Service, StartService, make_settings
from tests.test_ecs import REPO, wait_task
from tests.test_lifecycle import slow_repo, wait_building


async def position(service: Service, dep_id: str) -> tuple[str, int | None]:
    _, body = await service.get_json(f"/api/deployments/{dep_id}")
    return body["status"], body["queue_position"]


async def test_two_replicas_share_one_build_slot(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster
) -> None:
    a, b = [await start_service(make_settings(tmp_path / name, redis_server.url, max_builds=1,
                                              **ecs_cluster.settings())) for name in ("a", "b")]
    b.session.headers["Authorization"] = f"Bearer {a.token}"  # type: ignore[union-attr]
    first = await wait_task(a, (await a.deploy(REPO))["id"])
    posted = await b.deploy(REPO)
    assert posted["status"] == "queued" and posted["queue_position"] == 1
    second, third = posted["id"], (await a.deploy(REPO))["id"]
    for replica in (a, b):
        assert await position(replica, second) == ("queued", 1)
        assert await position(replica, third) == ("queued", 2)
    assert len(ecs_cluster.tasks()) == 1
    status, _ = await a.post_json(f"/api/deployments/{first.id}/cancel", {})
    assert status == 200
    assert (await wait_task(b, second, timeout=10)).task_arn
    assert await position(b, third) == ("queued", 1)
    assert len(ecs_cluster.tasks()) == 2


async def test_local_builds_wait_for_a_slot_on_another_replica(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    a, b = [await start_service(make_settings(tmp_path / name, redis_server.url, max_builds=1))
            for name in ("a", "b")]
    b.session.headers["Authorization"] = f"Bearer {a.token}"  # type: ignore[union-attr]
    first = await a.deploy(slow_repo(git_server, lines=200, delay_ms=10))
    await wait_building(a, first["id"])
    second = await b.deploy(slow_repo(git_server, lines=5, delay_ms=0))
    assert await position(a, second["id"]) == ("queued", 1)
    assert (await a.wait_final(first["id"]))["status"] == "ready"
    final = await b.wait_final(second["id"])
    assert final["status"] == "ready" and final["queue_position"] is None
    ready = (await a.get_json(f"/api/deployments/{first['id']}"))[1]["timestamps"]["ready"]
    assert final["timestamps"]["cloning"] >= ready


async def test_a_lapsed_slot_is_free_and_ended_deployments_leave_the_queue(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    store, queue = Store(redis), BuildQueue(redis, limit=1)
    deps = [await store.create_deployment("q", REPO, "") for _ in range(3)]
    for dep in deps:
        await queue.enqueue(dep)
    assert await queue.claim() == deps[0].id and await queue.claim() is None
    await store.transition(deps[1], Status.CANCELED, "Canceled by user.")
    assert await queue.waiting() == [deps[2].id]
    await redis.zadd(keys.SLOTS, {deps[0].id: 0})  # its replica died: the lease ran out
    assert await queue.claim() == deps[2].id
    await queue.hold([deps[0].id])  # still not final: a late refresh takes its slot back
    assert sorted(await queue.running()) == sorted([deps[0].id, deps[2].id])
    await store.transition(deps[2], Status.FAILED, "x")
    assert await queue.running() == [deps[0].id]
    await redis.aclose()


async def test_queued_deployments_keep_their_lease_while_they_wait(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    store, queue = Store(redis), BuildQueue(redis, limit=1)
    dep = await store.create_deployment("wait", REPO, "")
    await queue.enqueue(dep)
    await redis.expire(keys.lease(dep.id), 1)
    assert await queue.keep_queued() == 1
    assert await redis.ttl(keys.lease(dep.id)) > 20
    assert (await store.get_deployment(dep.id)).queue_position == 1
    assert await store.reap() == []
    await redis.aclose()


async def test_a_local_build_waits_for_its_home_replica_while_that_one_lives(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(redis)
    home, other = BuildQueue(redis, limit=1, home="a"), BuildQueue(redis, limit=1, home="b")
    dep = await store.create_deployment("home", REPO, "")
    await home.alive()
    await home.enqueue(dep)
    assert await other.claim() is None  # first come, first served: nothing else jumps ahead
    await home.alive(False)  # replica a stopped: its queue is anybody's
    assert await other.claim() == dep.id
    await redis.aclose()


async def test_a_dispatcher_woken_as_it_is_canceled_still_stops(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)

    async def start(dep_id: str) -> None:
        raise AssertionError("nothing is queued")

    dispatcher = Dispatcher(BuildQueue(redis, limit=1), start, list)
    for _ in range(3):
        task = asyncio.create_task(dispatcher.run())
        await asyncio.sleep(0.3)  # waiting for a wake-up now
        dispatcher._wake.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    await redis.aclose()


async def test_a_dispatcher_stops_when_its_cancel_comes_back_as_another_error(redis_server: RedisServer) -> None:
    # Python 3.11 and the libraries under us can turn a cancel that races a timeout into a
    # timeout error; a retrying loop must still stop, or the server never shuts down.
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    store, queue = Store(redis), BuildQueue(redis, limit=1)
    started = asyncio.Event()

    async def start(dep_id: str) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise TimeoutError("Timeout reading from socket") from None

    await queue.enqueue(await store.create_deployment("cancel", REPO, ""))
    task = asyncio.create_task(Dispatcher(queue, start, list).run())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await redis.aclose()
