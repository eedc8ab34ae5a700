"""Where builds run. A runner starts each deployment's build and sees it to a final status.

`open_runner(settings, ...)` picks the implementation from DEPLOYHUB_RUNNER, as
`open_storage` picks the storage backend. Each runner is one class in its own module.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import web

from ..connections import REDIS_URL, STORE
from ..settings import Secret, Settings, SettingsError
from ..state import INSTANCE, SETTINGS, require
from ..store import Deployment, Store
from .limits import BuildLimits


class Runner(Protocol):
    @property
    def refused(self) -> str | None:
        """Why builds cannot run here (the API answers 503 with it), or None."""

    @property
    def limits(self) -> BuildLimits:
        """The build limits as checked at start."""

    async def submit(self, dep: Deployment) -> None:
        """Start (or queue) the build of a new deployment; returns at once."""

    async def cancel(self, dep: Deployment, reason: str) -> bool:
        """End a deployment `canceled` and stop its build; False if it had already ended."""

    async def close(self) -> None:
        """Stop what this runner holds (at server shutdown)."""


RUNNER: web.AppKey[Runner] = web.AppKey("deployhub.runner")


def get_runner(app: web.Application) -> Runner:
    return require(app, RUNNER)


@contextlib.asynccontextmanager
async def open_runner(
    settings: Settings, *, redis_url: Secret, store: Store, instance: str = ""
) -> AsyncIterator[Runner]:
    """The configured runner, started, and closed on exit."""
    if settings.runner == "local":
        from .local import local_runner

        async with local_runner(settings, redis_url, store, instance) as runner:
            yield runner
        return
    if settings.runner == "ecs":
        from .ecs import ecs_runner

        async with ecs_runner(settings, store) as ecs:
            yield ecs
        return
    raise SettingsError(f"runner must be 'local' or 'ecs', not {settings.runner!r}")


async def runner_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_runner(
        app[SETTINGS], redis_url=app[REDIS_URL], store=app[STORE], instance=app[INSTANCE]
    ) as runner:
        app[RUNNER] = runner
        yield
