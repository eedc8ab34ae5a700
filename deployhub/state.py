"""Typed application state: what `setup()` stores, and a clear error when it was skipped.

Each module owns the `web.AppKey` of what it provides (the store in `connections`, the hub in
`live.hub`, the runner in `runners`, ...) and offers a `get_x(app)` accessor built on
`require`. Handlers read keys through `request.config_dict`, so DeployHub works as a sub-app.
"""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

from .settings import Settings
from .validation import Resolver

T = TypeVar("T")

SETTINGS = web.AppKey("deployhub.settings", Settings)
RESOLVER: web.AppKey[Resolver] = web.AppKey("deployhub.resolver")
# "" for a single process; the index of each `serve --workers N` process.
INSTANCE = web.AppKey("deployhub.instance", str)


def require(app: web.Application, key: web.AppKey[T]) -> T:
    """`app[key]`, or an error that says how to set DeployHub up."""
    try:
        return app[key]
    except KeyError:
        raise RuntimeError(
            f"DeployHub is not set up on this app ({key!r} is missing): call "
            "deployhub.setup(app, settings), or mount deployhub.create_app(settings) with "
            "add_subapp, and start the app"
        ) from None


def get_settings(app: web.Application) -> Settings:
    return require(app, SETTINGS)
