"""The hub's subscriber on a Redis Cluster: log frames by sharded pub/sub, status frames classic.

A project's log frames are SPUBLISHed to the shard that holds its log streams (see keys.py),
so each shard carries only its projects' lines; the status frames come from the control-plane
scripts (in the `{dh}` slot) by classic PUBLISH, which a cluster copies to every node. So for
each watched project this holds a classic SUBSCRIBE on one node and an SSUBSCRIBE on the
project's shard, one connection per shard, and reports the project subscribed once both are.

It speaks the part of redis-py's PubSub the hub uses (subscribe, unsubscribe, ping, listen;
messages as dicts of type, channel, data). Any trouble (a connection lost for good, a slot
moved to another shard, which Redis tells with an SUNSUBSCRIBE we did not ask for) ends
`listen` with an error: the hub then starts a new one, resubscribes, and has every socket
catch up from the streams, as after any outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from .. import keys

CLASSIC = "subscribe"
SHARDED = "ssubscribe"


class ShardMoved(RedisError):
    """A subscribed channel's slot is now served by another shard."""


class ShardedPubSub:
    def __init__(self, cluster: RedisCluster, on_reconnect: Callable[[object], Awaitable[None]]) -> None:
        self.cluster = cluster
        self.on_reconnect = on_reconnect
        self.connection = None  # as PubSub's; reconnects are reported through on_reconnect
        self._clients: dict[str, Redis] = {}  # node name -> a client of that node alone
        self._pubsubs: dict[str, PubSub] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._shard_of: dict[str, str] = {}  # sharded channel -> node name
        self._awaiting: dict[str, set[str]] = {}  # channel -> confirmations still to come
        self._leaving: Counter[str] = Counter()  # our SUNSUBSCRIBEs not yet confirmed
        self._messages: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._classic = ""  # the node of the classic subscriptions, chosen by ping

    async def __aenter__(self) -> ShardedPubSub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for task in self._readers.values():
            task.cancel()
        for task in self._readers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for pubsub in self._pubsubs.values():
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        for client in self._clients.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def _node_of(self, channel: str) -> ClusterNode:
        node = self.cluster.get_node_from_key(channel)
        if node is None:
            raise ShardMoved(f"no shard serves the slot of {channel}")
        return node

    def _node_pubsub(self, node: ClusterNode) -> str:
        """The name of `node`'s subscriber connection, made (and its reader started) once."""
        if node.name not in self._pubsubs:
            # A plain client of this node: its own pool, with the cluster's connection options
            # (password, TLS, timeouts), so a subscribed socket never returns to the cluster's.
            pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
            client = self._clients[node.name] = Redis.from_pool(pool)
            self._pubsubs[node.name] = client.pubsub()
            self._wake[node.name] = asyncio.Event()
            self._readers[node.name] = asyncio.create_task(
                self._read(node.name), name=f"deployhub-shard-{node.name}"
            )
        return node.name

    async def ping(self) -> None:
        """Learn the cluster's slots afresh (this runs first after a slot moved, or a shard
        failed over) and check the node of the classic subscriptions answers."""
        await self.cluster.nodes_manager.initialize()
        # Classic subscriptions on the node of the (idle) control channel: any node would do.
        self._classic = self._node_pubsub(self._node_of(keys.IDLE_CHANNEL))
        await self._clients[self._classic].ping()

    async def subscribe(self, *channels: str) -> None:
        for channel in channels:
            if channel == keys.IDLE_CHANNEL:
                self._awaiting[channel] = {CLASSIC}
            else:
                self._awaiting[channel] = {CLASSIC, SHARDED}
        await self._pubsubs[self._classic].subscribe(*channels)
        self._started(self._classic)
        for channel in channels:
            if channel != keys.IDLE_CHANNEL:
                name = self._node_pubsub(self._node_of(channel))
                self._shard_of[channel] = name
                await self._pubsubs[name].ssubscribe(channel)
                self._started(name)

    async def unsubscribe(self, channel: str) -> None:
        self._awaiting.pop(channel, None)
        await self._pubsubs[self._classic].unsubscribe(channel)
        name = self._shard_of.pop(channel, None)
        if name is not None:
            self._leaving[channel] += 1
            await self._pubsubs[name].sunsubscribe(channel)

    def _started(self, name: str) -> None:
        pubsub = self._pubsubs[name]
        if pubsub.connection is not None and not self._wake[name].is_set():
            # redis-py may reconnect on its own and resubscribe quietly; whatever was
            # published meanwhile must still reach the sockets.
            pubsub.connection.register_connect_callback(self.on_reconnect)
        self._wake[name].set()

    async def listen(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            message = await self._messages.get()
            if isinstance(message, BaseException):
                raise message
            yield message

    async def _read(self, name: str) -> None:
        pubsub = self._pubsubs[name]
        try:
            await self._wake[name].wait()  # get_message needs a connection: the first subscribe
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._handle(message)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            self._messages.put_nowait(exc)
        except Exception as exc:  # the hub restarts on Redis errors: make it one
            self._messages.put_nowait(RedisError(f"the subscriber of {name} failed: {exc!r}"))

    def _handle(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind in (CLASSIC, SHARDED):
            waiting = self._awaiting.get(channel)
            if waiting is not None:
                waiting.discard(kind)
                if not waiting:
                    del self._awaiting[channel]
                    self._messages.put_nowait({"type": CLASSIC, "channel": channel, "data": None})
        elif kind in ("message", "smessage"):
            self._messages.put_nowait({"type": "message", "channel": channel, "data": message["data"]})
        elif kind == "sunsubscribe":
            if self._leaving[channel] > 0:
                self._leaving[channel] -= 1
            else:  # not ours: the slot moved (resharding, failover)
                raise ShardMoved(f"the slot of {channel} moved to another shard")
