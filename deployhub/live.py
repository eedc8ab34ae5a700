"""Live status and logs: the project -> sockets map, the Redis subscriber, one writer per socket.

Delivery is exactly-once per socket by sequence number: every socket remembers the last seq
it sent for each deployment; a frame that repeats lines is trimmed, a frame that skips lines
is preceded by the missing ones read from the deployment's stream. The same rule covers a
late join, a Redis restart (messages published while we were disconnected) and a socket too
slow to keep up (its queue is dropped and it catches up from the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSMsgType, web
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from . import keys
from .auth import Tokens, Unauthorized, bearer
from .logs import event_seq, frame_head, logs_frame, read_events
from .settings import Settings
from .store import NotFound, Store, decode_status_message, dumps
from .validation import InvalidInput, check_deployment_id, check_project
from .views import deployment_json

log = logging.getLogger(__name__)

QUEUE_FRAMES = 512
QUEUE_BYTES = 1024 * 1024  # a socket further behind than this catches up from Redis instead
COALESCE_BYTES = 256 * 1024
MAX_PROJECTS_PER_SOCKET = 50
HISTORY_CHUNK = 2000
SNAPSHOT_DEPLOYMENTS = 20
HEARTBEAT = 20.0


@dataclasses.dataclass(frozen=True)
class LogFrame:
    project: str
    deployment: str
    first: int
    last: int
    data: bytes  # the frame as sent, encoded once for every socket


@dataclasses.dataclass(frozen=True)
class StatusFrame:
    project: str
    deployment: str
    final: bool
    data: bytes
    log_seq: int = 0  # the deployment's last log seq, once it has ended


@dataclasses.dataclass(frozen=True)
class Subscribe:
    project: str
    resume: dict[str, int]
    ready: asyncio.Future[None]


@dataclasses.dataclass(frozen=True)
class Reply:
    data: bytes


class Resync:
    """Marker: the socket lost frames (too slow, or Redis reconnected); catch up from Redis."""


RESYNC = Resync()
Item = LogFrame | StatusFrame | Subscribe | Reply | Resync


class Watcher:
    """One WebSocket: only the handler reads it, only `writer` writes it."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.items: deque[Item] = deque()
        self._ready = asyncio.Event()
        self.projects: set[str] = set()
        self.seqs: dict[str, int] = {}  # deployment -> last seq sent
        self.deployment_project: dict[str, str] = {}
        self.overflows = 0
        self.queued_bytes = 0
        self.owner: str | None = None  # the token id, once authenticated

    def offer(self, item: Item) -> None:
        """Never blocks the dispatcher: a queue too long or too big turns into one resync."""
        size = _size(item)
        if len(self.items) < QUEUE_FRAMES and self.queued_bytes + size <= QUEUE_BYTES:
            self.items.append(item)
            self.queued_bytes += size
            self._ready.set()
            return
        self.overflows += 1
        # Subscriptions and replies must still be answered; frames are refetched from Redis.
        keep = [i for i in (*self.items, item) if isinstance(i, Subscribe | Reply)]
        self.items = deque([*keep, RESYNC])
        self.queued_bytes = sum(_size(i) for i in keep)
        self._ready.set()

    async def take(self) -> Item:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        item = self.items.popleft()
        self.queued_bytes -= _size(item)
        if isinstance(item, LogFrame):
            item = self._coalesce(item)
        return item

    def _coalesce(self, frame: LogFrame) -> LogFrame:
        """A socket that fell a little behind gets its waiting batches as one frame.

        Under load this trades many small sends (a syscall each) for one bigger one, which
        is what lets one process keep up with a thousand watchers.
        """
        parts: list[LogFrame] = [frame]
        size = len(frame.data)
        while self.items and size < COALESCE_BYTES:
            follower = self.items[0]
            if not (isinstance(follower, LogFrame) and follower.deployment == frame.deployment
                    and follower.first == parts[-1].last + 1):
                break
            self.items.popleft()
            self.queued_bytes -= len(follower.data)
            size += len(follower.data)
            parts.append(follower)
        if len(parts) == 1:
            return frame
        key = (frame.deployment, frame.first, parts[-1].last)
        data = _MERGED.get(key)
        if data is None:  # sockets that lag together share one merged frame
            head = frame_head(frame.project, frame.deployment).encode()
            data = b"".join([head, b",".join(p.data[len(head):-2] for p in parts), b"]}"])
            _MERGED[key] = data
            if len(_MERGED) > 256:
                _MERGED.popitem(last=False)
        return LogFrame(frame.project, frame.deployment, frame.first, parts[-1].last, data)


# (deployment, first seq, last seq) -> merged logs frame; identical for every socket.
_MERGED: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()


def _size(item: Item) -> int:
    return len(item.data) if isinstance(item, LogFrame | StatusFrame | Reply) else 0


class Hub:
    """Fans Redis pub/sub messages out to the sockets of this process."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.store = Store(redis)
        self.tokens = Tokens(redis)
        self.watchers: dict[str, set[Watcher]] = {}
        self.sockets: set[Watcher] = set()
        self._pubsub: PubSub | None = None
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._connected = asyncio.Event()

    # -- membership ---------------------------------------------------------------------

    async def add(self, project: str, watcher: Watcher) -> asyncio.Future[None]:
        """Register a watcher; the future resolves once Redis confirms the subscription."""
        members = self.watchers.setdefault(project, set())
        members.add(watcher)
        future = self._confirmed.get(project)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._confirmed[project] = future
            if self._pubsub is not None and self._connected.is_set():
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.subscribe(keys.channel(project))
        return future

    async def remove(self, project: str, watcher: Watcher) -> None:
        members = self.watchers.get(project)
        if not members:
            return
        members.discard(watcher)
        if members:
            return
        del self.watchers[project]
        future = self._confirmed.pop(project, None)
        if future is not None and not future.done():
            future.cancel()
        if self._pubsub is not None and self._connected.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(keys.channel(project))

    # -- the subscriber task ------------------------------------------------------------

    async def run(self) -> None:
        """Listen forever; after a lost connection, resubscribe and make every socket catch up."""
        backoff = 0.1
        first = True
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    self._pubsub = pubsub
                    await pubsub.ping()
                    channels = [keys.channel(p) for p in self.watchers]
                    # pubsub refuses to read before it has a subscription; a private channel
                    # keeps the connection in subscribed mode while no project is watched.
                    await pubsub.subscribe(keys.PREFIX + "ch-idle", *channels)
                    if pubsub.connection is not None:
                        # redis-py may reconnect on its own and resubscribe quietly; whatever
                        # was published meanwhile must still reach the sockets.
                        pubsub.connection.register_connect_callback(self._reconnected)
                    self._connected.set()
                    if not first:
                        log.info("Redis is back; resubscribed %d projects", len(channels))
                        for members in self.watchers.values():
                            for watcher in members:
                                watcher.offer(RESYNC)
                    first = False
                    backoff = 0.1
                    await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("Redis subscriber lost its connection (%s); retrying in %.1fs", exc, backoff)
            finally:
                self._connected.clear()
                self._pubsub = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _reconnected(self, connection: object) -> None:
        log.info("Redis subscriber reconnected; every socket catches up from the streams")
        for members in self.watchers.values():
            for watcher in members:
                watcher.offer(RESYNC)

    async def _listen(self, pubsub: PubSub) -> None:
        async for message in pubsub.listen():
            kind = message["type"]
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            project = channel[len(keys.channel("")):]
            if kind == "subscribe":
                future = self._confirmed.get(project)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind == "message":
                try:
                    self.dispatch(project, message["data"])
                except Exception:
                    log.exception("dropped a malformed message on %s", channel)

    def dispatch(self, project: str, data: str | bytes) -> None:
        members = self.watchers.get(project)
        if not members:
            return
        payload: dict[str, Any] = json.loads(data)
        item: Item
        if payload["type"] == "logs":
            events = payload["events"]
            if not events:
                return
            item = LogFrame(
                project, payload["deployment"], events[0]["seq"], events[-1]["seq"],
                data.encode() if isinstance(data, str) else data,
            )
        elif payload["type"] == "status":
            dep = decode_status_message(payload)
            body = deployment_json(self.settings, dep, payload.get("production", ""))
            frame = dumps({"type": "status", "deployment": body}).encode()
            log_seq = int(payload["deployment"].get("log_seq") or 0)
            item = StatusFrame(project, dep.id, dep.final, frame, log_seq)
        elif payload["type"] == "production":
            item = StatusFrame(project, "", False, dumps(payload).encode())
        else:
            return
        for watcher in members:
            watcher.offer(item)

    # -- one socket's writer ------------------------------------------------------------

    async def write(self, watcher: Watcher) -> None:
        try:
            while True:
                item = await watcher.take()
                try:
                    await self._deliver(watcher, item)
                except (RedisError, OSError) as exc:
                    if isinstance(exc, ConnectionResetError):
                        raise
                    # Redis is away: try again shortly, from the stream, losing nothing.
                    log.warning("live delivery paused: %s", exc)
                    await asyncio.sleep(0.5)
                    watcher.offer(item if isinstance(item, Subscribe) else RESYNC)
        except (ConnectionResetError, RuntimeError):
            pass  # the socket closed under us; the handler cleans up

    async def _deliver(self, watcher: Watcher, item: Item) -> None:
        if isinstance(item, Subscribe):
            await self._send_subscribed(watcher, item)
        elif isinstance(item, Reply):
            await _send(watcher, item.data)
        elif isinstance(item, Resync):
            await self._resync(watcher)
        elif item.project not in watcher.projects:
            return
        elif isinstance(item, LogFrame):
            await self._send_logs(watcher, item)
        else:
            await _send(watcher, item.data)
            if item.final and watcher.seqs.get(item.deployment, 0) < (item.log_seq or 1 << 62):
                # Lines published in a window this socket missed: read them before it closes.
                await self._catch_up(watcher, item.project, item.deployment)

    async def _send_logs(self, watcher: Watcher, frame: LogFrame) -> None:
        watcher.deployment_project[frame.deployment] = frame.project
        last = watcher.seqs.get(frame.deployment, 0)
        if frame.last <= last:
            return
        if frame.first == last + 1:
            await _send(watcher, frame.data)
            watcher.seqs[frame.deployment] = frame.last
            return
        await self._catch_up(watcher, frame.project, frame.deployment)
        if watcher.seqs.get(frame.deployment, 0) < frame.last:
            # The stream no longer holds the start of this frame: send what is new in it.
            events = [e for e in json.loads(frame.data)["events"] if e["seq"] > last]
            raw = [dumps(e) for e in events]
            await watcher.ws.send_str(logs_frame(frame.project, frame.deployment, raw))
            watcher.seqs[frame.deployment] = frame.last

    async def _catch_up(self, watcher: Watcher, project: str, dep_id: str) -> None:
        """Send every stored line after the last one this socket got."""
        while True:
            after = watcher.seqs.get(dep_id, 0)
            events = await read_events(self.redis, dep_id, after, HISTORY_CHUNK)
            if not events:
                return
            await watcher.ws.send_str(logs_frame(project, dep_id, events))
            watcher.seqs[dep_id] = event_seq(events[-1])
            if len(events) < HISTORY_CHUNK:
                return

    async def _send_subscribed(self, watcher: Watcher, sub: Subscribe) -> None:
        if sub.project not in watcher.projects:
            return  # unsubscribed meanwhile
        # Read history only once Redis has confirmed the subscription, so nothing published in
        # between is missed; a gap left by a late confirmation is still filled by seq.
        await asyncio.wait({sub.ready}, timeout=5.0)
        deployments = await self._snapshot(sub.project)
        await watcher.ws.send_str(
            dumps({"type": "subscribed", "project": sub.project, "deployments": deployments})
        )
        wanted = dict(sub.resume)
        if deployments:
            wanted.setdefault(deployments[0]["id"], 0)
        for dep_id, after in wanted.items():
            watcher.seqs[dep_id] = max(after, 0)
            watcher.deployment_project[dep_id] = sub.project
            await self._catch_up(watcher, sub.project, dep_id)

    async def _snapshot(self, project: str) -> list[dict[str, Any]]:
        """The project's newest deployments as the API shows them, newest first."""
        deployments = await self.store.list_deployments(project, SNAPSHOT_DEPLOYMENTS)
        production = (await self.store.get_project(project)).production
        return [deployment_json(self.settings, d, production) for d in deployments]

    async def _resync(self, watcher: Watcher) -> None:
        await watcher.ws.send_str(dumps({"type": "resync"}))
        for project in sorted(watcher.projects):
            deployments = await self._snapshot(project)
            for body in reversed(deployments):
                await watcher.ws.send_str(dumps({"type": "status", "deployment": body}))
            tracked = [d for d, p in watcher.deployment_project.items() if p == project]
            if deployments and deployments[0]["id"] not in tracked:
                tracked.append(deployments[0]["id"])
                watcher.deployment_project[deployments[0]["id"]] = project
            for dep_id in tracked:
                await self._catch_up(watcher, project, dep_id)


async def _send(watcher: Watcher, data: bytes) -> None:
    await watcher.ws.send_frame(data, WSMsgType.TEXT)


async def handle_message(hub: Hub, watcher: Watcher, text: str) -> dict[str, Any] | None:
    """Apply one client message; returns an error frame for a bad one."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return {"type": "error", "message": "messages must be JSON objects"}
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return {"type": "error", "message": 'messages need a string "type"'}
    kind = message["type"]
    try:
        if kind == "auth":
            token = message.get("token")
            watcher.owner = await hub.tokens.check(token if isinstance(token, str) else None)
            return {"type": "authenticated"}
        if kind == "subscribe":
            if watcher.owner is None:
                raise Unauthorized(
                    'authenticate first: send {"type": "auth", "token": ...} or an '
                    "Authorization header"
                )
            project = check_project(message.get("project"))
            resume = _check_resume(message.get("resume", {}))
            if project not in watcher.projects:
                if len(watcher.projects) >= MAX_PROJECTS_PER_SOCKET:
                    raise InvalidInput(
                        f"a socket may watch at most {MAX_PROJECTS_PER_SOCKET} projects"
                    )
                await hub.store.owned_project(project, watcher.owner)
            watcher.projects.add(project)
            ready = await hub.add(project, watcher)
            watcher.offer(Subscribe(project, resume, ready))
            return None
        if kind == "unsubscribe":
            project = check_project(message.get("project"))
            watcher.projects.discard(project)
            await hub.remove(project, watcher)
            return None
        if kind == "ping":
            return {"type": "pong"}
    except InvalidInput as exc:
        return {"type": "error", "message": str(exc)}
    except NotFound as exc:
        return {"type": "error", "message": str(exc)}
    except (RedisError, OSError):
        log.warning("could not answer a %s message: Redis unavailable", kind)
        return {"type": "error", "message": f"{kind} failed: DeployHub's Redis is unavailable; try again"}
    return {
        "type": "error",
        "message": f"unknown message type {kind!r}; use auth, subscribe, unsubscribe or ping",
    }


def _check_resume(raw: object) -> dict[str, int]:
    if not isinstance(raw, dict) or len(raw) > 100:
        raise InvalidInput("resume must be an object of at most 100 {deployment id: last seq}")
    resume = {}
    for dep_id, seq in raw.items():
        check_deployment_id(dep_id)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidInput("resume values must be non-negative integers (the last seq seen)")
        resume[dep_id] = seq
    return resume


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    from .app import HUB

    hub = request.config_dict[HUB]
    # No permessage-deflate: it would compress every frame once per socket (its context is per
    # connection), the single largest cost of fanning one log out to many watchers.
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=64 * 1024, compress=False)
    await ws.prepare(request)
    watcher = Watcher(ws)
    header = bearer(request.headers.get("Authorization"))
    if header is not None:
        with contextlib.suppress(Unauthorized, RedisError, OSError):  # else: an auth message
            watcher.owner = await hub.tokens.check(header)
    hub.sockets.add(watcher)
    writer = asyncio.create_task(hub.write(watcher))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    reply = await handle_message(hub, watcher, msg.data)
                except Unauthorized as exc:
                    # The page reconnects with a token after 4401; nothing else is sent.
                    await ws.close(code=4401, message=str(exc)[:120].encode())
                    break
                if reply is not None:
                    watcher.offer(Reply(dumps(reply).encode()))
            elif msg.type == WSMsgType.BINARY:
                watcher.offer(Reply(dumps({"type": "error", "message": "send JSON text frames"}).encode()))
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        hub.sockets.discard(watcher)
        for project in list(watcher.projects):
            await hub.remove(project, watcher)
    return ws


@contextlib.asynccontextmanager
async def running_hub(settings: Settings, redis: Redis) -> AsyncIterator[Hub]:
    hub = Hub(settings, redis)
    task = asyncio.create_task(hub.run(), name="deployhub-subscriber")
    try:
        yield hub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
