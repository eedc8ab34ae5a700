"""A token may have at most DEPLOYHUB_MAX_ACTIVE_PER_TOKEN deployments queued or running."""

from __future__ import annotations

import asyncio

import pytest

from deployhub import get_store
from deployhub.status import Status
from deployhub.store import TooManyActive
from tests.support.infra import RedisServer
from tests.support.service import StartService

URL = "http://127.0.0.1:9/x.git"  # never cloned: these deployments are made in the store


async def test_concurrent_creates_cannot_share_the_last_slot(
    redis_server: RedisServer, start_service: StartService
) -> None:
    service = await start_service(redis=redis_server)
    store = get_store(service.app)
    results = await asyncio.gather(
        *(store.create_deployment(f"q{n}", URL, "", "owner-a", max_active=3) for n in range(8)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, Exception) for r in results) == 3
    assert all(isinstance(r, TooManyActive) for r in results if isinstance(r, Exception))
    # Another token has its own slots; an ended deployment frees one.
    await store.create_deployment("other", URL, "", "owner-b", max_active=3)
    first = next(r for r in results if not isinstance(r, BaseException))
    await store.transition(first, Status.CANCELED, "test")
    await store.create_deployment("q0", URL, "", "owner-a", max_active=3)
    with pytest.raises(TooManyActive, match="3 deployments queued or running"):
        await store.create_deployment("q1", URL, "", "owner-a", max_active=3)


async def test_post_past_the_limit_is_429(redis_server: RedisServer, start_service: StartService) -> None:
    service = await start_service(redis=redis_server, max_active_per_token=1)
    await get_store(service.app).create_deployment("busy", URL, "", service.token_id)
    status, body = await service.post_json("/api/deployments", {"repo_url": URL, "project": "more"})
    assert status == 429
    assert "DEPLOYHUB_MAX_ACTIVE_PER_TOKEN" in body["error"] and "wait for one" in body["error"]
    _, projects = await service.get_json("/api/projects")
    assert [p["name"] for p in projects["projects"]] == ["busy"]  # nothing recorded for "more"
