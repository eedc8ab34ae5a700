"""One way to open a Redis client, for the server, the worker and the CLI alike.

Every call survives a reconnect: a managed Redis that fails over, or a restart, leaves dead
connections in the pool, and the first command on each would fail ("Connection closed by
server"). The retry policy below is set on the pool, so every connection it hands out (and
every command on it) retries connection errors with backoff on a fresh connection.

`connect_redis` asks the server whether it is a cluster (`INFO cluster`), so the URL a user
gives is the same either way: a standalone server's, or a cluster's configuration endpoint
(any node). A cluster gets a `RedisCluster` client, which sends each command to the shard
that holds its key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .migrate import migrate_keys

# A failed command is retried this many times, waiting 0.05, 0.1, 0.2 ... up to 1 s between
# tries: about 2 s in all, so a request during an outage still gets its 503 quickly.
RETRIES = 4
BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0
CONNECT_TIMEOUT = 5.0  # seconds; an unreachable host fails instead of hanging
POOL_TIMEOUT = 20  # seconds a caller waits for a free connection in a burst
HEALTH_CHECK_SECONDS = 30  # an idle connection is PINGed before reuse after this long

# The errors that mean "the connection, not the command, failed".
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionResetError, OSError)
OUTAGE_DEADLINE = 120.0  # seconds a build's Redis call waits out a restart before it fails

T = TypeVar("T")


def stop_if_cancelled() -> None:
    """Raise CancelledError when the running task was asked to stop: for the loops that
    retry after an error. A cancel can come back as another error (on Python 3.11 a timeout
    inside a library racing it, as redis-py's and aiohttp's connection code can), and a loop
    that retried would outlive the shutdown that cancelled it, which then waits forever.
    The request still counts in `Task.cancelling()`, whatever became of its exception."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def through_outage(call: Callable[[], Awaitable[T]], *, deadline: float = OUTAGE_DEADLINE) -> T:
    """`call()`, made again through a Redis outage (a restart, a failover) for up to
    `deadline` seconds: for the worker's records and an upload's leases, which must not fail
    a build that is otherwise fine. The pool's own retries cover a blip; this, a restart."""
    delay = 0.1
    give_up = time.monotonic() + deadline
    while True:
        try:
            return await call()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            stop_if_cancelled()
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _client_options() -> dict[str, Any]:
    """What every connection of ours has, in a standalone pool or a cluster client's."""
    return {
        "decode_responses": True,
        "health_check_interval": HEALTH_CHECK_SECONDS,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "retry": Retry(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), RETRIES),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    }


def open_redis(url: str, *, max_connections: int = 64) -> Redis:
    """A client over a blocking pool (a burst waits for a connection instead of failing with
    "Too many connections"), decoding responses, retrying connection errors."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT,
        **_client_options(),
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


async def connect_redis(url: str, *, max_connections: int = 64) -> Redis:
    """`open_redis(url)`, or a cluster client when the server at `url` runs in cluster mode.
    Raises what the first command raises when the server cannot be reached."""
    redis = open_redis(url, max_connections=max_connections)
    try:
        info = await redis.info("cluster")
    except BaseException:
        await redis.aclose()
        raise
    if not int(info.get("cluster_enabled", 0)):
        try:
            await migrate_keys(redis)
        except BaseException:
            await redis.aclose()
            raise
        return redis
    await redis.aclose()
    cluster = RedisCluster.from_url(
        url,
        max_connections=max_connections,  # per node
        **_client_options(),
    )
    try:
        await cluster.initialize()
    except BaseException:
        await cluster.aclose()
        raise
    # Typed as Redis: the cluster client has the same commands, scripts and pipelines, so
    # the code is one path; the few places that must differ (sharded pub/sub) ask is_cluster.
    return cast(Redis, cluster)


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


def publish_command(redis: Redis) -> str:
    """The command that publishes a project's log frames: SPUBLISH on a cluster, to the
    channel's shard only, instead of PUBLISH, which a cluster copies to every node."""
    return "SPUBLISH" if is_cluster(redis) else "PUBLISH"
