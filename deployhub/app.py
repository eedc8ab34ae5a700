"""The aiohttp application: `create_app(settings)` for a server of its own, `setup(app, settings)`
to add DeployHub to an application you already have."""

from __future__ import annotations

from aiohttp import web

from . import api, connections, openapi, ops, page, reaper, runners, sites
from .live import hub, protocol
from .settings import Settings
from .state import INSTANCE, RESOLVER, SETTINGS
from .validation import MAX_BODY, Resolver, system_resolver


def setup(
    app: web.Application, settings: Settings, *, resolver: Resolver | None = None, instance: str = ""
) -> None:
    """Add DeployHub's page, API, WebSocket, site hosting and background tasks to `app`.

    `instance` tells apart processes that share a data directory (`serve --workers N`)."""
    app[SETTINGS] = settings
    app[RESOLVER] = resolver or system_resolver
    app[INSTANCE] = instance
    # In order: each context may use what the ones before it provide.
    app.cleanup_ctx.append(connections.redis_ctx)
    app.cleanup_ctx.append(connections.storage_ctx)
    app.cleanup_ctx.append(sites.sites_ctx)
    app.cleanup_ctx.append(hub.hub_ctx)
    app.cleanup_ctx.append(runners.runner_ctx)
    app.cleanup_ctx.append(reaper.reaper_ctx)
    app.on_shutdown.append(hub.close_sockets)
    app.middlewares.append(sites.site_middleware)
    app.middlewares.append(api.api_errors)
    app.router.add_routes(api.routes)
    app.router.add_get("/api/ws", protocol.websocket_handler)
    app.router.add_get("/api/openapi.json", openapi.openapi_json)
    ops.add_routes(app)
    page.add_routes(app.router)
    sites.add_routes(app)


def create_app(
    settings: Settings | None = None, *, resolver: Resolver | None = None, instance: str = ""
) -> web.Application:
    """A complete DeployHub application; mount it with `add_subapp` or run it as it is."""
    app = web.Application(client_max_size=MAX_BODY)
    setup(app, settings or Settings.from_env(), resolver=resolver, instance=instance)
    return app
