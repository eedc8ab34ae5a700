"""The backends every part of the server shares: Redis (records, tokens) and object storage.

Each is one cleanup context that opens it at start-up and closes it at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis

from .auth import Tokens
from .embedded_redis import embedded_redis
from .settings import Secret
from .state import SETTINGS, require
from .storage import Storage, open_storage
from .store import Store

# Connections the server's pool may open; a burst waits for one instead of failing.
REDIS_CONNECTIONS = 64
# Seconds a caller waits for a free connection before the pool gives up.
REDIS_POOL_TIMEOUT = 20
REDIS_HEALTH_CHECK_SECONDS = 30

REDIS = web.AppKey("deployhub.redis", Redis)
# The URL workers are given: the embedded server's when no DEPLOYHUB_REDIS_URL is set.
REDIS_URL = web.AppKey("deployhub.redis_url", Secret)
STORE = web.AppKey("deployhub.store", Store)
TOKENS = web.AppKey("deployhub.tokens", Tokens)
STORAGE: web.AppKey[Storage] = web.AppKey("deployhub.storage")


def get_store(app: web.Application) -> Store:
    return require(app, STORE)


def get_tokens(app: web.Application) -> Tokens:
    return require(app, TOKENS)


def get_storage(app: web.Application) -> Storage:
    return require(app, STORAGE)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        if settings.redis_url is None:
            url = await stack.enter_async_context(embedded_redis(settings.data_dir))
        else:
            url = settings.redis_url
        # A blocking pool: a burst (a thousand sockets catching up when a build ends) waits for
        # a connection instead of failing with "Too many connections", as the default pool does.
        pool = BlockingConnectionPool.from_url(
            url.reveal(), max_connections=REDIS_CONNECTIONS, timeout=REDIS_POOL_TIMEOUT,
            decode_responses=True, health_check_interval=REDIS_HEALTH_CHECK_SECONDS,
        )
        redis = Redis(connection_pool=pool)
        stack.push_async_callback(pool.aclose)
        stack.push_async_callback(redis.aclose)
        app[REDIS_URL] = url
        app[REDIS] = redis
        app[STORE] = Store(redis)
        app[TOKENS] = Tokens(redis)
        yield


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_storage(app[SETTINGS]) as storage:
        app[STORAGE] = storage
        yield
