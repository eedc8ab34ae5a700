"""Live status and logs: the project -> sockets map, the Redis subscriber, one writer per socket.

Delivery is exactly-once per socket by sequence number: every socket remembers the last seq
it sent for each deployment; a frame that repeats lines is trimmed, a frame that skips lines
is preceded by the missing ones read from the deployment's stream. The same rule covers a
late join, a Redis restart (messages published while we were disconnected) and a socket too
slow to keep up (its queue is dropped and it catches up from the stream).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import logging
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter
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

QUEUE_FRAMES = 512  # control items (statuses, replies) waiting for one socket
QUEUE_BYTES = 1024 * 1024  # past either limit the socket resyncs from Redis instead
COALESCE_BYTES = 64 * 1024  # a lagging socket's batches are sent as frames up to this size
RECENT_BYTES = 16 * 1024 * 1024  # recent log frames kept in memory, per deployment...
RECENT_DEPLOYMENTS = 8  # ...for this many deployments; older lines are read from Redis
MAX_PROJECTS_PER_SOCKET = 50
HISTORY_CHUNK = 2000
SNAPSHOT_DEPLOYMENTS = 20
HEARTBEAT = 20.0
# A socket whose writer has nothing waiting gets each new frame written at once by the
# dispatcher, unless this many bytes are already waiting in its transport.
DIRECT_BUFFER = 64 * 1024


def wire_frame(payload: bytes) -> bytes:
    """`payload` as one unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it.

    Server frames carry no mask, so one encoding serves every socket: fanning a batch out to
    a thousand watchers is then a thousand `send()`s of the same bytes.
    """
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


@dataclasses.dataclass(frozen=True)
class LogFrame:
    project: str
    deployment: str
    first: int
    last: int
    data: bytes  # the JSON text, encoded once for every socket
    wire: bytes  # the same as a WebSocket frame

    @classmethod
    def of(cls, project: str, deployment: str, events: list[dict[str, Any]]) -> LogFrame:
        """A frame of these events (their seqs must run without a gap)."""
        data = logs_frame(project, deployment, [dumps(e) for e in events]).encode()
        return cls(project, deployment, events[0]["seq"], events[-1]["seq"], data, wire_frame(data))

    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(self.data)["events"])


@dataclasses.dataclass(frozen=True)
class StatusFrame:
    project: str
    deployment: str
    final: bool
    data: bytes
    wire: bytes
    log_seq: int = 0  # the deployment's last log seq, once it has ended


@dataclasses.dataclass(frozen=True)
class Subscribe:
    project: str
    resume: dict[str, int]
    ready: asyncio.Future[None]


@dataclasses.dataclass(frozen=True)
class Reply:
    data: bytes


@dataclasses.dataclass
class Backlog:
    """Marker: this socket still needs the deployment's lines up to `upto`."""

    project: str
    deployment: str
    upto: int


class Resync:
    """Marker: the socket lost frames (too slow, or Redis reconnected); catch up from Redis."""


RESYNC = Resync()
Item = StatusFrame | Subscribe | Reply | Backlog | Resync


class Recent:
    """The newest log frames of one deployment, shared by every socket of this process.

    A socket that falls behind reads from here by seq (then from Redis, if it fell further
    behind than this holds), so being slow costs it a cursor, not a copy of every frame.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.frames: deque[LogFrame] = deque()
        self.bytes = 0
        self.limit = RECENT_BYTES if limit is None else limit
        self._merged: OrderedDict[tuple[int, int], LogFrame] = OrderedDict()

    def add(self, frame: LogFrame) -> None:
        if self.frames and frame.first != self.frames[-1].last + 1:
            self.clear()  # frames published while Redis was away are not here: start afresh
        self.frames.append(frame)
        self.bytes += len(frame.data)
        while self.bytes > self.limit and len(self.frames) > 1:
            self.bytes -= len(self.frames.popleft().data)

    def clear(self) -> None:
        self.frames.clear()
        self._merged.clear()
        self.bytes = 0

    def since(self, after: int, upto: int) -> LogFrame | None:
        """One frame of the lines after `after` (up to `upto`, at most COALESCE_BYTES unless a
        single batch is bigger), or None when they are no longer (or not yet) held here."""
        frames = self.frames
        if not frames or not frames[0].first <= after + 1 <= frames[-1].last:
            return None
        i = bisect.bisect_right(frames, after + 1, key=lambda f: f.first) - 1
        parts = [frames[i]]
        size = len(frames[i].data)
        for j in range(i + 1, len(frames)):
            follower = frames[j]
            if follower.last > upto or size + len(follower.data) > COALESCE_BYTES:
                break
            parts.append(follower)
            size += len(follower.data)
        if parts[0].first <= after:  # the socket stopped inside a batch: send its tail
            events = [e for p in parts for e in p.events() if e["seq"] > after]
            return LogFrame.of(parts[0].project, parts[0].deployment, events)
        if len(parts) == 1:
            return parts[0]
        key = (parts[0].first, parts[-1].last)
        merged = self._merged.get(key)
        if merged is None:  # sockets that lag together share one merged frame
            head = len(frame_head(parts[0].project, parts[0].deployment).encode())
            data = b"".join([parts[0].data[:head], b",".join(p.data[head:-2] for p in parts), b"]}"])
            merged = LogFrame(
                parts[0].project, parts[0].deployment, key[0], key[1], data, wire_frame(data)
            )
            self._merged[key] = merged
            if len(self._merged) > 64:
                self._merged.popitem(last=False)
        return merged


class Watcher:
    """One WebSocket: only the handler reads it; the writer task, or the dispatcher when the
    writer is idle, writes it."""

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, stream: AbstractStreamWriter
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.stream = stream
        self.items: deque[Item] = deque()
        self.busy = False  # the writer task is delivering an item
        self._ready = asyncio.Event()
        self.projects: set[str] = set()
        self.seqs: dict[str, int] = {}  # deployment -> last seq sent
        self.deployment_project: dict[str, str] = {}
        self.overflows = 0
        self.lagged = 0  # frames that could not be written at once
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
        # Subscriptions and replies must still be answered; the rest is reread from Redis.
        keep = [i for i in (*self.items, item) if isinstance(i, Subscribe | Reply)]
        self.items = deque([*keep, RESYNC])
        self.queued_bytes = sum(_size(i) for i in keep)
        self._ready.set()

    def deliver(self, frame: LogFrame) -> bool:
        """Hand over a new batch without ever waiting for the socket; True if written now."""
        if frame.project not in self.projects:
            return False
        if self.write_now(frame):
            return True
        self.lagged += 1
        tail = self.items[-1] if self.items else None
        if isinstance(tail, Backlog) and tail.deployment == frame.deployment:
            tail.upto = max(tail.upto, frame.last)  # one marker covers any number of batches
        else:
            self.offer(Backlog(frame.project, frame.deployment, frame.last))
        return False

    def write_now(self, frame: LogFrame) -> bool:
        """The fast path: write `frame` at once if nothing is ahead of it and it is the next
        one this socket needs. Anything else (a gap, a backlog, a full buffer) goes through
        the queue and the writer task, which know how to catch up."""
        transport = self.transport
        if (self.items or self.busy
                or frame.first != self.seqs.get(frame.deployment, 0) + 1
                or self.ws.closed or transport.is_closing()
                or transport.get_write_buffer_size() > DIRECT_BUFFER):
            return False
        transport.write(frame.wire)
        self.seqs[frame.deployment] = frame.last
        self.deployment_project[frame.deployment] = frame.project
        return True

    async def send(self, wire: bytes) -> None:
        """Write one encoded frame and wait while the peer is slow to read."""
        if self.ws.closed or self.transport.is_closing():
            raise ConnectionResetError("the socket is closing")
        self.transport.write(wire)
        await self.stream.drain()

    async def take(self) -> Item:
        self.busy = False
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        self.busy = True
        item = self.items.popleft()
        self.queued_bytes -= _size(item)
        return item


def _size(item: Item) -> int:
    return len(item.data) if isinstance(item, StatusFrame | Reply) else 0


class Hub:
    """Fans Redis pub/sub messages out to the sockets of this process."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.store = Store(redis)
        self.tokens = Tokens(redis)
        self.watchers: dict[str, set[Watcher]] = {}
        self.sockets: set[Watcher] = set()
        self.recent: OrderedDict[str, Recent] = OrderedDict()  # deployment -> its newest frames
        self.stats: Counter[str] = Counter()
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
        for dep_id in [d for d, r in self.recent.items() if r.frames and r.frames[0].project == project]:
            del self.recent[dep_id]
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
                    await pubsub.subscribe(keys.IDLE_CHANNEL, *channels)
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
            raw = data.encode() if isinstance(data, str) else data
            frame = LogFrame(
                project, payload["deployment"], events[0]["seq"], events[-1]["seq"], raw,
                wire_frame(raw),
            )
            self._remember(frame)
            written = 0
            for watcher in members:
                written += watcher.deliver(frame)
            self.stats["frames written at once"] += written
            self.stats["frames queued"] += len(members) - written
            return
        elif payload["type"] == "status":
            dep = decode_status_message(payload)
            body = deployment_json(self.settings, dep, payload.get("production", ""))
            text = dumps({"type": "status", "deployment": body}).encode()
            log_seq = int(payload["deployment"].get("log_seq") or 0)
            item = StatusFrame(project, dep.id, dep.final, text, wire_frame(text), log_seq)
        elif payload["type"] == "production":
            text = dumps(payload).encode()
            item = StatusFrame(project, "", False, text, wire_frame(text))
        else:
            return
        for watcher in members:
            watcher.offer(item)

    def _remember(self, frame: LogFrame) -> None:
        recent = self.recent.get(frame.deployment)
        if recent is None:
            recent = self.recent[frame.deployment] = Recent()
            if len(self.recent) > RECENT_DEPLOYMENTS:
                self.recent.popitem(last=False)
        else:
            self.recent.move_to_end(frame.deployment)
        recent.add(frame)

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
            await watcher.send(wire_frame(item.data))
        elif isinstance(item, Resync):
            await self._resync(watcher)
        elif item.project not in watcher.projects:
            return
        elif isinstance(item, Backlog):
            await self._send_backlog(watcher, item)
        else:
            await watcher.send(item.wire)
            if item.final and watcher.seqs.get(item.deployment, 0) < (item.log_seq or 1 << 62):
                # Lines published in a window this socket missed: read them before it closes.
                await self._catch_up(watcher, item.project, item.deployment)

    async def _send_backlog(self, watcher: Watcher, backlog: Backlog) -> None:
        """Bring a socket that fell behind up to `backlog.upto`: from the shared recent frames
        while they reach back far enough, else from the deployment's stream."""
        dep_id = backlog.deployment
        watcher.deployment_project[dep_id] = backlog.project
        while (after := watcher.seqs.get(dep_id, 0)) < backlog.upto:
            recent = self.recent.get(dep_id)
            frame = recent.since(after, backlog.upto) if recent is not None else None
            if frame is None:
                # Read the stream only up to where the shared frames begin: the socket then
                # rejoins them at a batch boundary, and the frames stay shared.
                start = recent.frames[0].first if recent is not None and recent.frames else 0
                self.stats["catch-ups from Redis"] += 1
                await self._catch_up(
                    watcher, backlog.project, dep_id, until=start - 1 if start > after + 1 else None
                )
                if watcher.seqs.get(dep_id, 0) > after:
                    continue
                # Neither holds these lines any more (the stream expired): go on from memory.
                if recent is None or not recent.frames or recent.frames[0].last <= after:
                    return
                frame = recent.frames[0]
            self.stats["frames from memory"] += 1
            await watcher.send(frame.wire)
            watcher.seqs[dep_id] = max(after, frame.last)

    async def _catch_up(
        self, watcher: Watcher, project: str, dep_id: str, until: int | None = None
    ) -> None:
        """Send every stored line after the last one this socket got (up to `until`)."""
        while True:
            after = watcher.seqs.get(dep_id, 0)
            if until is not None and after >= until:
                return
            events = await read_events(self.redis, dep_id, after, HISTORY_CHUNK, until)
            if not events:
                return
            await watcher.send(wire_frame(logs_frame(project, dep_id, events).encode()))
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
    stream = await ws.prepare(request)
    assert request.transport is not None  # prepare() fails on a closed connection
    watcher = Watcher(ws, request.transport, stream)
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
        if hub.stats:
            log.info("live logs: %s", ", ".join(f"{n} {what}" for what, n in hub.stats.items()))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
