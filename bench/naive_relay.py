"""The baseline for bench.logs_fanout: the obvious relay someone would write in an afternoon.

One redis-py pub/sub subscription per watched project; for every log LINE of every frame it
does a serial `for ws in sockets: await ws.send_str(line)`. No per-socket queues, no
batching, no catch-up: a socket that lags slows everyone down, and whatever Redis or the
kernel cannot buffer is gone.

    python -m bench.naive_relay --port 8123 --redis-url redis://127.0.0.1:6400/0

It speaks just enough of DeployHub's WebSocket protocol for the benchmark's watchers:
`{"type":"subscribe","project":name}` is answered with `{"type":"subscribed",...}`, after
which every line arrives as its own text message, the event JSON `{"seq":..,"ts":..,...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from deployhub import keys

log = logging.getLogger("naive_relay")


class Relay:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}
        self.pubsub = redis.pubsub()

    async def subscribe(self, project: str) -> None:
        if project not in self.sockets:
            self.sockets[project] = set()
            await self.pubsub.subscribe(keys.channel(project))

    async def run(self) -> None:
        while True:
            try:
                # pub/sub refuses to listen without a subscription: a private one keeps it open.
                await self.pubsub.subscribe("bench:naive-idle", *(keys.channel(p) for p in self.sockets))
                async for message in self.pubsub.listen():
                    if message["type"] != "message":
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    project = keys.channel_project(channel)
                    payload = json.loads(message["data"])
                    if payload.get("type") != "logs":
                        continue
                    for event in payload["events"]:
                        line = json.dumps(event)
                        for ws in list(self.sockets.get(project, ())):
                            try:
                                await ws.send_str(line)
                            except (ConnectionResetError, RuntimeError):
                                self.sockets[project].discard(ws)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("lost the Redis subscription (%s); resubscribing", exc)
                with contextlib.suppress(Exception):
                    await self.pubsub.aclose()  # type: ignore[no-untyped-call]
                self.pubsub = self.redis.pubsub()
                await asyncio.sleep(0.1)


RELAY = web.AppKey("relay", Relay)


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    relay = request.app[RELAY]
    ws = web.WebSocketResponse(max_msg_size=64 * 1024)
    await ws.prepare(request)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                message = json.loads(msg.data)
                project = str(message["project"])
            except (ValueError, KeyError, TypeError):
                await ws.send_str(json.dumps({"type": "error", "message": "bad message"}))
                continue
            if message.get("type") == "subscribe":
                await relay.subscribe(project)
                relay.sockets[project].add(ws)
                await ws.send_str(json.dumps({"type": "subscribed", "project": project}))
    finally:
        for members in relay.sockets.values():
            members.discard(ws)
    return ws


def create_app(redis_url: str) -> web.Application:
    app = web.Application()

    async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
        redis = Redis.from_url(redis_url, decode_responses=True)
        relay = Relay(redis)
        app[RELAY] = relay
        task = asyncio.create_task(relay.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await relay.pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="naive relay\n")

    app.cleanup_ctx.append(relay_ctx)
    app.router.add_get("/api/ws", ws_handler)
    app.router.add_get("/", index)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(create_app(args.redis_url), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
