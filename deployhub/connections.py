"""The backends every part of the server shares: Redis (records, tokens) and object storage.

Each is one cleanup context that opens it at start-up and closes it at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .auth import Tokens
from .embedded_redis import embedded_redis
from .redis_client import CONNECTION_ERRORS, connect_redis
from .settings import Secret
from .state import SETTINGS, require
from .storage import Storage, StorageError, open_storage
from .store import Store

REDIS_CONNECTIONS = 64  # connections the server's pool may open
STARTUP_CHECK_TIMEOUT = 10.0  # seconds for Redis and storage to answer at start-up


class StartupError(RuntimeError):
    """A backend DeployHub cannot use; the message names the setting to fix."""

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
        redis = await _connect(url)
        stack.push_async_callback(redis.aclose)
        app[REDIS_URL] = url
        app[REDIS] = redis
        app[STORE] = Store(redis)
        app[TOKENS] = Tokens(redis)
        yield


async def _connect(url: Secret) -> Redis:
    """A client of the Redis at `url` (a cluster client if it is a cluster), once it answers."""
    where = redacted(url)
    try:
        async with asyncio.timeout(STARTUP_CHECK_TIMEOUT):
            return await connect_redis(url.reveal(), max_connections=REDIS_CONNECTIONS)
    except ValueError as exc:  # redis-py's words for a malformed URL
        raise StartupError(f"DEPLOYHUB_REDIS_URL: {exc}") from None
    except TimeoutError:
        raise StartupError(f"DEPLOYHUB_REDIS_URL: Redis at {where} did not answer within "
                           f"{STARTUP_CHECK_TIMEOUT:.0f} s") from None
    except (RedisError, *CONNECTION_ERRORS) as exc:
        raise StartupError(f"DEPLOYHUB_REDIS_URL: cannot use Redis at {where}: {exc}") from None


def redacted(url: Secret) -> str:
    """scheme://host:port/db of a Redis URL: never its password."""
    parts = urlsplit(url.reveal())
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":?"
    return f"{parts.scheme}://{parts.hostname or '?'}{port}{parts.path}"


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_storage(app[SETTINGS]) as storage:
        try:
            async with asyncio.timeout(STARTUP_CHECK_TIMEOUT):
                await storage.check()
        except TimeoutError:
            raise StartupError(f"storage did not answer within {STARTUP_CHECK_TIMEOUT:.0f} s "
                               "(DEPLOYHUB_S3_ENDPOINT_URL)") from None
        except StorageError as exc:
            raise StartupError(str(exc)) from None
        app[STORAGE] = storage
        yield
