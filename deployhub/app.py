"""The aiohttp application: `create_app(settings)` for a server of its own, `setup(app, settings)`
to add DeployHub to an application you already have."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis

from . import api, live
from .auth import Tokens
from .embedded_redis import embedded_redis
from .runner import LocalRunner, local_runner
from .settings import Secret, Settings
from .sites import Sites
from .storage import Storage, open_storage
from .store import Store
from .validation import Resolver, system_resolver

log = logging.getLogger(__name__)

REAP_INTERVAL = 10.0
REDIS_CONNECTIONS = 64


class Context:
    """Everything the handlers share; filled in by the cleanup contexts, in order."""

    settings: Settings
    resolver: Resolver
    redis_url: Secret
    redis: Redis
    store: Store
    storage: Storage
    runner: LocalRunner
    sites: Sites
    tokens: Tokens
    build_problem: str | None = None  # why builds are refused here (no usable sandbox)

    def __init__(self, settings: Settings, resolver: Resolver) -> None:
        self.settings = settings
        self.resolver = resolver


CONTEXT = web.AppKey("deployhub.context", Context)
HUB = web.AppKey("deployhub.hub", live.Hub)


def get_context(app: web.Application) -> Context:
    try:
        return app[CONTEXT]
    except KeyError:
        raise RuntimeError("DeployHub is not set up on this app: call deployhub.setup(app, settings)") from None


def web_root() -> Path:
    return Path(str(importlib.resources.files("deployhub.web")))


def setup(app: web.Application, settings: Settings, *, resolver: Resolver | None = None) -> None:
    """Add DeployHub's page, API, WebSocket, site hosting and background tasks to `app`."""
    ctx = Context(settings, resolver or system_resolver)
    app[CONTEXT] = ctx
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_hub_ctx)
    app.cleanup_ctx.append(_runner_ctx)
    app.cleanup_ctx.append(_reaper_ctx)
    app.on_shutdown.append(_close_sockets)
    app.middlewares.append(_site_middleware)
    app.middlewares.append(api.api_errors)
    app.router.add_routes(api.routes)
    app.router.add_get("/api/ws", live.websocket_handler)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)


def create_app(settings: Settings | None = None, *, resolver: Resolver | None = None) -> web.Application:
    """A complete DeployHub application; mount it with `add_subapp` or run it as it is."""
    app = web.Application(client_max_size=api.MAX_BODY)
    setup(app, settings or Settings.from_env(), resolver=resolver)
    return app


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(web_root() / "index.html", headers={"Cache-Control": "no-cache"})


_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


async def _static(request: web.Request) -> web.FileResponse:
    # The page's modules import each other by plain names, so browsers must revalidate them
    # (ETag) after an upgrade: no-cache, not a long max-age.
    name = request.match_info["name"]
    path = web_root() / name
    content_type = _STATIC_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or content_type is None or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(
        path, headers={"Cache-Control": "no-cache", "Content-Type": f"{content_type}; charset=utf-8"}
    )


# -- resources, each one cleanup context --------------------------------------------------


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    async with contextlib.AsyncExitStack() as stack:
        if ctx.settings.redis_url is None:
            ctx.redis_url = await stack.enter_async_context(embedded_redis(ctx.settings.data_dir))
        else:
            ctx.redis_url = ctx.settings.redis_url
        # A blocking pool: a burst (a thousand sockets catching up when a build ends) waits for
        # a connection instead of failing with "Too many connections", as the default pool does.
        pool = BlockingConnectionPool.from_url(
            ctx.redis_url.reveal(), max_connections=REDIS_CONNECTIONS, timeout=20,
            decode_responses=True, health_check_interval=30,
        )
        ctx.redis = Redis(connection_pool=pool)
        stack.push_async_callback(ctx.redis.aclose)
        stack.push_async_callback(pool.aclose)
        ctx.store = Store(ctx.redis)
        ctx.tokens = Tokens(ctx.redis)
        yield


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    async with open_storage(ctx.settings) as storage:
        ctx.storage = storage
        ctx.sites = Sites(ctx.settings, storage, ctx.store)
        yield


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    async with live.running_hub(ctx.settings, ctx.redis) as hub:
        app[HUB] = hub
        yield


async def _runner_ctx(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    if ctx.settings.sandbox == "bwrap":
        from worker.sandbox import sandbox_problem

        ctx.build_problem = await asyncio.to_thread(sandbox_problem)
        if ctx.build_problem:
            log.error("builds are refused: %s", ctx.build_problem)
    else:
        log.warning("DEPLOYHUB_SANDBOX=none: build code runs unsandboxed, with the worker's rights")
    async with local_runner(ctx.settings, ctx.redis_url, ctx.store) as runner:
        ctx.runner = runner
        yield


async def _reaper_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[CONTEXT].store

    async def reap_forever() -> None:
        while True:
            try:
                for dep_id in await store.reap():
                    log.warning("deployment %s stopped reporting: marked failed", dep_id)
            except Exception as exc:
                log.warning("reaper could not run: %s", exc)
            await asyncio.sleep(REAP_INTERVAL)

    task = asyncio.create_task(reap_forever(), name="deployhub-reaper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _close_sockets(app: web.Application) -> None:
    hub = app.get(HUB)
    if hub is None:
        return
    for watcher in list(hub.sockets):
        await watcher.ws.close(code=1001, message=b"server shutting down")


@web.middleware
async def _site_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    sites = request.config_dict[CONTEXT].sites
    label = sites.site_label(request.host)
    if label is not None and request.method in ("GET", "HEAD"):
        return await sites.handle(request, label)
    if label is not None:
        return web.Response(status=405, text="Sites answer GET and HEAD only.\n")
    return await handler(request)
