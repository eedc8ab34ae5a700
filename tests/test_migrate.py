"""A Redis written by a version before the hash tags: its keys move to their new names once."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from deployhub import keys
from deployhub.migrate import migrate_keys
from deployhub.redis_client import connect_redis
from deployhub.store import Store
from tests.support.infra import RedisServer


async def write_old_layout(redis: Redis) -> None:
    await redis.sadd("dh:projects", "site")
    await redis.hset("dh:project:site", mapping={"name": "site", "owner": "t1", "production": "d1"})
    await redis.zadd("dh:project:site:deployments", {"d1": 1.0})
    await redis.hset("dh:deployment:d1", mapping={
        "id": "d1", "project": "site", "status": "ready", "created_at": "1", "updated_at": "1",
        "repo_url": "", "branch": "main",
    })
    await redis.xadd("dh:logs:d1", {"e": '{"seq":1}'}, id="1-0")
    await redis.expire("dh:logs:d1", 600)
    await redis.hset("dh:tokens", "t1", "{}")
    await redis.xadd("dh:logs:orphan", {"e": "{}"}, id="1-0")  # no record says whose it is


async def test_old_keys_move_once_and_keep_their_expiry(redis_server: RedisServer) -> None:
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    await write_old_layout(raw)
    redis = await connect_redis(redis_server.url)  # every process migrates as it connects
    dep = await Store(redis).get_deployment("d1")
    assert (dep.project, dep.status) == ("site", "ready")
    assert await redis.hget(keys.project("site"), "production") == "d1"
    assert await redis.hget(keys.TOKENS, "t1") == "{}"
    stream = keys.log_stream("site", "d1")
    assert await redis.xlen(stream) == 1 and 0 < await redis.ttl(stream) <= 600
    left = sorted([k async for k in raw.scan_iter(match="dh:[^{]*")])
    assert left == ["dh:logs:orphan"]
    assert await migrate_keys(redis) == 0  # done: one GET
    await redis.aclose()
    await raw.aclose()


async def test_two_processes_starting_together_move_each_key_once(redis_server: RedisServer) -> None:
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    await write_old_layout(raw)
    clients = [Redis.from_url(redis_server.url, decode_responses=True) for _ in range(2)]
    moved = await asyncio.gather(*(migrate_keys(c) for c in clients))
    assert sorted(moved) == [0, 6]
    assert await raw.get(keys.KEYS_VERSION) == "2" and not await raw.exists(keys.MIGRATE_LOCK)
    for client in (*clients, raw):
        await client.aclose()


async def test_a_key_written_anew_is_not_overwritten(redis_server: RedisServer) -> None:
    """An old replica still running may write an old name after a new one wrote the new name:
    the new key wins, the old stays (and is said to stay)."""
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    await raw.hset("dh:tokens", "old", "{}")
    await raw.hset(keys.TOKENS, "new", "{}")
    assert await migrate_keys(raw) == 0
    assert await raw.hgetall(keys.TOKENS) == {"new": "{}"}
    assert await raw.exists("dh:tokens")
    await raw.aclose()
