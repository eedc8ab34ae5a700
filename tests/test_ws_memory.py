"""What an idle WebSocket keeps alive: thousands wait in the handler at once, so every frame
and object per socket counts (bench: `python -m bench.logs_fanout --configs none --idle 10000`)."""

from __future__ import annotations

import asyncio
from types import CoroutineType
from typing import Any

from tests.support.service import Service, Watch


def _await_chain(task: asyncio.Task[Any]) -> list[str]:
    """The qualified names of the coroutines a task is suspended in, outermost first."""
    names = []
    coro: Any = task.get_coro()
    while isinstance(coro, CoroutineType):
        names.append(f"{coro.cr_code.co_filename.rsplit('/', 2)[-2]}:{coro.cr_code.co_qualname}")
        coro = coro.cr_await
    return names


async def _handler_chains() -> list[list[str]]:
    chains = [_await_chain(t) for t in asyncio.all_tasks()]
    return [c for c in chains if any(n.endswith(":websocket_handler") for n in c)]


async def test_an_idle_socket_waits_under_no_middleware_of_ours(service: Service) -> None:
    watch = await Watch(service).open("idle-frames")
    await watch.wait_for(lambda: any(f["type"] in ("subscribed", "error") for f in watch.frames))
    chains = await _handler_chains()
    assert len(chains) == 1, chains
    ours = [n for n in chains[0] if n.startswith(("deployhub:", "live:"))]
    # aiohttp's own frames (the request handler, the app, its current-app fix-up, the
    # WebSocket's receive) are there as in any aiohttp app; of DeployHub's only the handler.
    assert ours == ["live:websocket_handler"], chains[0]
    # It awaits the socket's receive() itself: an `async for` adds the iterator's frame.
    assert not any(n.endswith("__anext__") for n in chains[0]), chains[0]
    await watch.close()


async def test_a_refused_upgrade_is_still_a_json_error(service: Service) -> None:
    # The error middleware does not wrap the WebSocket handler: the handler answers it.
    async with service.http.get(service.url + "/api/ws") as r:
        assert r.status == 400
        assert r.content_type == "application/json"
        assert "WebSocket" in (await r.json())["error"]
    async with service.http.post(service.url + "/api/ws") as r:
        assert r.status == 405
        assert (await r.json())["error"].startswith("POST is not allowed on /api/ws")


async def test_an_app_request_through_the_middlewares_still_gets_json_errors(service: Service) -> None:
    async with service.http.get(service.url + "/api/deployments/nope") as r:
        assert r.status in (400, 404)
        assert "error" in await r.json()
    async with service.http.get(service.url + "/api/no-such-endpoint") as r:
        assert r.status == 404
        assert "no API endpoint" in (await r.json())["error"]


def test_a_watchers_seqs_behave_as_a_dict_whether_one_deployment_or_several() -> None:
    from deployhub.live.watcher import Watcher

    watcher = Watcher.__new__(Watcher)  # no socket needed for its seq bookkeeping
    watcher.dep, watcher.seq, watcher.more = None, 0, None
    model: dict[str, int] = {}
    steps = [("set", "a", 5), ("follow", "b", 0), ("set", "a", 9), ("follow", "a", 0),
             ("set", "b", 3), ("set", "c", 1), ("follow", "d", 0), ("set", "d", 7)]
    for op, dep, seq in steps:
        if op == "set":
            watcher.set_seq(dep, seq)
            model[dep] = seq
        else:
            watcher.follow(dep)
            model.setdefault(dep, 0)
        assert {d: watcher.last_seq(d) for d in "abcdz"} == {d: model.get(d, 0) for d in "abcdz"}
        assert sorted(watcher.followed()) == sorted(model)
    assert watcher.more is not None and "a" not in watcher.more  # the first one lives in slots
