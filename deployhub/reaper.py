"""The reaper: on every server, fail the deployments nothing is alive to finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .connections import STORE
from .redis_client import stop_if_cancelled

log = logging.getLogger(__name__)

REAP_INTERVAL = 10.0


async def reaper_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]

    async def reap_forever() -> None:
        while True:
            try:
                for dep_id in await store.reap():
                    log.warning("deployment %s stopped reporting: marked failed", dep_id)
            except Exception as exc:  # Redis away: try again next round
                stop_if_cancelled()
                log.warning("reaper could not run: %s", exc)
            await asyncio.sleep(REAP_INTERVAL)

    task = asyncio.create_task(reap_forever(), name="deployhub-reaper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
