"""The hub: the project -> sockets map, the Redis subscriber task, the sockets' writers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from .. import keys
from ..connections import REDIS, STORAGE, STORE
from ..logs import event_seq, logs_frame, read_events
from ..redis_client import is_cluster, stop_if_cancelled
from ..settings import Settings
from ..status import Status
from ..storage import Storage, log_key
from ..state import SETTINGS, require
from ..store import Store, decode_status_message, dumps
from ..views import deployment_json
from .frames import LogFrame, StatusFrame, wire_frame
from .recent import RECENT_DEPLOYMENTS, Recent
from .sharded import ShardedPubSub
from .watcher import PING, RESYNC, Backlog, Item, Reply, Resync, Subscribe, Watcher

log = logging.getLogger(__name__)

HISTORY_CHUNK = 2000  # log events per frame when reading the stream
SNAPSHOT_DEPLOYMENTS = 20  # deployments listed in a `subscribed` frame
SUBSCRIBE_CONFIRM_TIMEOUT = 5.0  # seconds to wait for Redis to confirm a subscription
REDIS_RETRY_DELAY = 0.5  # seconds a writer waits before retrying a delivery Redis refused
RECONNECT_BACKOFF = (0.1, 5.0)  # first and longest wait between subscriber reconnects
# Every HEARTBEAT_ROUND seconds each socket that sent nothing for a whole round is pinged;
# one still silent two rounds after its ping is dropped: pinged after 10-20 s of silence,
# dropped after 30-40 s, much as aiohttp's heartbeat=20 (ping after 20 s, drop 10 s later).
HEARTBEAT_ROUND = 10.0
PING_AFTER_ROUNDS = 2
DROP_AFTER_ROUNDS = 4
# Redis calls the sockets' handshakes and catch-ups make at once. Without a bound, a storm of
# thousands of sockets subscribing grows the server's pool to its limit (each connection
# is some 30-40 KB the process keeps); one core is busy long before 16 calls are in flight.
REDIS_SLOTS = 16


class Hub:
    """Fans Redis pub/sub messages out to the sockets of this process."""

    def __init__(self, settings: Settings, redis: Redis, store: Store, storage: Storage) -> None:
        self.settings = settings
        self.redis = redis
        self.store = store
        self.storage = storage
        self.watchers: dict[str, set[Watcher]] = {}
        self.sockets: set[Watcher] = set()
        self.recent: OrderedDict[str, Recent] = OrderedDict()  # deployment -> its newest frames
        # What delivery did, by name ("frames written at once", "frames queued", "frames from
        # memory", "catch-ups from Redis", "log lines relayed"): logged at shutdown, exported
        # at /metrics.
        self.stats: Counter[str] = Counter()
        # deployment -> its project, for the deployments the sockets of this process follow
        # (one entry per deployment, not per socket); dropped with the project's last socket.
        self.projects_of: dict[str, str] = {}
        # Every socket's writer is started through this one bound method (see Watcher.spawn).
        self.spawn_writer = self.write
        self.redis_slots = asyncio.Semaphore(REDIS_SLOTS)  # see REDIS_SLOTS
        self._pubsub: PubSub | ShardedPubSub | None = None
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
        for dep_id in [d for d, p in self.projects_of.items() if p == project]:
            del self.projects_of[dep_id]
        for dep_id in [d for d, r in self.recent.items() if r.frames and r.frames[0].project == project]:
            del self.recent[dep_id]
        future = self._confirmed.pop(project, None)
        if future is not None and not future.done():
            future.cancel()
        if self._pubsub is not None and self._connected.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(keys.channel(project))

    # -- the heartbeat task -------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Ping quiet sockets and drop dead ones: one task and one pass for every socket of
        the process. aiohttp's own heartbeat keeps a timer per socket and, once it has pinged,
        a full attribute dict on every WebSocketResponse: about 1.6 KB of each idle socket."""
        while True:
            await asyncio.sleep(HEARTBEAT_ROUND)
            for watcher in list(self.sockets):
                watcher.quiet += 1
                transport = watcher.transport
                if watcher.quiet >= DROP_AFTER_ROUNDS:
                    log.debug("dropping a socket that answered no ping")
                    transport.abort()  # its buffer may never drain: do not wait for it
                elif watcher.quiet >= PING_AFTER_ROUNDS and not transport.is_closing():
                    transport.write(PING)

    # -- the subscriber task ------------------------------------------------------------

    async def run(self) -> None:
        """Listen forever; after a lost connection, resubscribe and make every socket catch up."""
        backoff = RECONNECT_BACKOFF[0]
        first = True
        while True:
            try:
                async with self._open_pubsub() as pubsub:
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
                    backoff = RECONNECT_BACKOFF[0]
                    await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                stop_if_cancelled()
                log.warning("Redis subscriber lost its connection (%s); retrying in %.1fs", exc, backoff)
            finally:
                self._connected.clear()
                self._pubsub = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF[1])

    def _open_pubsub(self) -> PubSub | ShardedPubSub:
        if is_cluster(self.redis):
            return ShardedPubSub(cast(RedisCluster, self.redis), self._reconnected)
        return self.redis.pubsub()

    async def _reconnected(self, connection: object) -> None:
        log.info("Redis subscriber reconnected; every socket catches up from the streams")
        for members in self.watchers.values():
            for watcher in members:
                watcher.offer(RESYNC)

    async def _listen(self, pubsub: PubSub | ShardedPubSub) -> None:
        async for message in pubsub.listen():
            kind = message["type"]
            channel: str = message["channel"]  # the client decodes responses
            project = keys.channel_project(channel)
            if kind == "subscribe":
                future = self._confirmed.get(project)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind == "message":
                try:
                    self.dispatch(project, message["data"])
                except Exception:
                    log.exception("dropped a malformed message on %s", channel)

    def dispatch(self, project: str, data: str) -> None:
        members = self.watchers.get(project)
        if not members:
            return
        payload: dict[str, Any] = json.loads(data)
        item: Item
        if payload["type"] == "logs":
            events = payload["events"]
            if not events:
                return
            raw = data.encode()
            frame = LogFrame(
                project, payload["deployment"], events[0]["seq"], events[-1]["seq"], raw,
                wire_frame(raw),
            )
            self._remember(frame)
            self.projects_of[frame.deployment] = project
            written = 0
            for watcher in members:
                written += watcher.deliver(frame)
            self.stats["frames written at once"] += written
            self.stats["frames queued"] += len(members) - written
            self.stats["log lines relayed"] += (frame.last - frame.first + 1) * len(members)
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
        """A socket's writer task: deliver what is queued, then end (see `Watcher.offer`)."""
        try:
            while (item := watcher.take()) is not None:
                try:
                    await self._deliver(watcher, item)
                except (RedisError, OSError) as exc:
                    if isinstance(exc, ConnectionResetError):
                        raise
                    stop_if_cancelled()
                    # Redis is away: try again shortly, from the stream, losing nothing.
                    log.warning("live delivery paused: %s", exc)
                    await asyncio.sleep(REDIS_RETRY_DELAY)
                    watcher.offer(item if isinstance(item, Subscribe) else RESYNC)
        except ConnectionResetError:
            # The socket closed under us (aiohttp raises ClientConnectionResetError, a
            # ConnectionResetError, for a write to a closing one); the handler cleans up.
            watcher.closed = True
            log.debug("socket closed while its writer was delivering")

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
            if item.final and watcher.last_seq(item.deployment) < (item.log_seq or 1 << 62):
                # Lines published in a window this socket missed: read them before it closes.
                await self._catch_up(watcher, item.project, item.deployment)

    async def _send_backlog(self, watcher: Watcher, backlog: Backlog) -> None:
        """Bring a socket that fell behind up to `backlog.upto`: from the shared recent frames
        while they reach back far enough, else from the deployment's stream."""
        dep_id = backlog.deployment
        self.projects_of[dep_id] = backlog.project
        watcher.follow(dep_id)  # tracked from now on (see _resync)
        while (after := watcher.last_seq(dep_id)) < backlog.upto:
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
                if watcher.last_seq(dep_id) > after:
                    continue
                # Neither holds these lines any more (the stream expired): go on from memory.
                if recent is None or not recent.frames or recent.frames[0].last <= after:
                    return
                frame = recent.frames[0]
            self.stats["frames from memory"] += 1
            await watcher.send(frame.wire)
            watcher.set_seq(dep_id, max(after, frame.last))

    async def _catch_up(
        self, watcher: Watcher, project: str, dep_id: str, until: int | None = None
    ) -> None:
        """Send every stored line after the last one this socket got (up to `until`)."""
        while True:
            after = watcher.last_seq(dep_id)
            if until is not None and after >= until:
                return
            async with self.redis_slots:
                events = await read_events(self.redis, project, dep_id, after, HISTORY_CHUNK, until)
            if not events:
                return
            await watcher.send(wire_frame(logs_frame(project, dep_id, events).encode()))
            watcher.set_seq(dep_id, event_seq(events[-1]))
            if len(events) < HISTORY_CHUNK:
                return

    async def _send_subscribed(self, watcher: Watcher, sub: Subscribe) -> None:
        if sub.project not in watcher.projects:
            return  # unsubscribed meanwhile
        # Read history only once Redis has confirmed the subscription, so nothing published in
        # between is missed; a gap left by a late confirmation is still filled by seq.
        await asyncio.wait({sub.ready}, timeout=SUBSCRIBE_CONFIRM_TIMEOUT)
        deployments = await self._snapshot(sub.project)
        await watcher.send_json({"type": "subscribed", "project": sub.project, "deployments": deployments})
        wanted = dict(sub.resume)
        # Only this project's deployments: a resume naming another project's (or tenant's)
        # deployment id must not read its log.
        named = set(wanted) - {d["id"] for d in deployments}
        if named:
            async with self.redis_slots:
                theirs = await self.store.deployments_of(sub.project, named)
            for dep_id in named - theirs:
                del wanted[dep_id]
        if deployments:
            wanted.setdefault(deployments[0]["id"], 0)
        # Those still running certainly have their stream; the others may have outlived it.
        running = {d["id"] for d in deployments if not Status(d["status"]).final}
        for dep_id, after in wanted.items():
            # Interned: thousands of sockets following one deployment share its id.
            dep_id = sys.intern(dep_id)
            watcher.set_seq(dep_id, max(after, 0))
            self.projects_of[dep_id] = sub.project
            await self._catch_up(watcher, sub.project, dep_id)
            if watcher.last_seq(dep_id) == max(after, 0) and dep_id not in running:
                await self._from_storage(watcher, sub.project, dep_id)

    async def _from_storage(self, watcher: Watcher, project: str, dep_id: str) -> None:
        """A finished deployment whose stream Redis no longer has (it expires after 7 days):
        the full log written to storage when the build ended is the history."""
        async with self.redis_slots:
            if await self.redis.exists(keys.log_stream(project, dep_id)):
                return  # the stream is there; there was just nothing new in it
            if await self.store.project_of(dep_id) != project:
                return  # not this project's (the resume names came from the client)
        stored = await self.storage.get_bytes(log_key(dep_id))
        after = watcher.last_seq(dep_id)
        events = [line for line in (stored or b"").decode(errors="replace").splitlines()
                  if line.strip() and event_seq(line) > after]
        for start in range(0, len(events), HISTORY_CHUNK):
            chunk = events[start:start + HISTORY_CHUNK]
            await watcher.send(wire_frame(logs_frame(project, dep_id, chunk).encode()))
            watcher.set_seq(dep_id, event_seq(chunk[-1]))
        if events:
            self.stats["logs read from storage"] += 1

    async def _snapshot(self, project: str) -> list[dict[str, Any]]:
        """The project's newest deployments as the API shows them, newest first."""
        async with self.redis_slots:
            deployments = await self.store.list_deployments(project, SNAPSHOT_DEPLOYMENTS)
            production = (await self.store.get_project(project)).production
        return [deployment_json(self.settings, d, production) for d in deployments]

    async def _project_of(self, dep_id: str) -> str | None:
        """The project of a deployment a socket follows: known here while its project has a
        socket in this process, else (a socket that unsubscribed and came back) from Redis."""
        project = self.projects_of.get(dep_id)
        if project is None:
            async with self.redis_slots:
                project = await self.store.project_of(dep_id)
            if project is not None and project in self.watchers:
                self.projects_of[dep_id] = project
        return project

    async def _resync(self, watcher: Watcher) -> None:
        await watcher.send_json({"type": "resync"})
        project_of = {d: await self._project_of(d) for d in watcher.followed()}  # once each
        for project in sorted(watcher.projects):
            deployments = await self._snapshot(project)
            for body in reversed(deployments):
                await watcher.send_json({"type": "status", "deployment": body})
            tracked = [d for d, p in project_of.items() if p == project]
            if deployments and deployments[0]["id"] not in tracked:
                newest = sys.intern(deployments[0]["id"])
                tracked.append(newest)
                watcher.follow(newest)
                self.projects_of[newest] = project
            for dep_id in tracked:
                await self._catch_up(watcher, project, dep_id)


@contextlib.asynccontextmanager
async def running_hub(
    settings: Settings, redis: Redis, store: Store, storage: Storage
) -> AsyncIterator[Hub]:
    hub = Hub(settings, redis, store, storage)
    tasks = [asyncio.create_task(hub.run(), name="deployhub-subscriber"),
             asyncio.create_task(hub.heartbeat(), name="deployhub-heartbeat")]
    try:
        yield hub
    finally:
        if hub.stats:
            log.info("live logs: %s", ", ".join(f"{n} {what}" for what, n in hub.stats.items()))
        # Sockets' writer tasks too: one still catching up from Redis after the client is
        # closed would open a new connection on a loop about to close.
        tasks += [w.writer for w in hub.sockets if w.writer is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


HUB = web.AppKey("deployhub.hub", Hub)


def get_hub(app: web.Application) -> Hub:
    return require(app, HUB)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    async with running_hub(app[SETTINGS], app[REDIS], app[STORE], app[STORAGE]) as hub:
        app[HUB] = hub
        yield


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: say goodbye to every socket, so clients reconnect elsewhere at once."""
    hub = app.get(HUB)
    if hub is None:
        return
    for watcher in list(hub.sockets):
        await watcher.ws.close(code=1001, message=b"server shutting down")
