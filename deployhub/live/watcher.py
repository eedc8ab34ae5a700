"""One WebSocket watcher: its queue of control items, its seqs, and the direct write path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from ..store import dumps
from .frames import LogFrame, StatusFrame, wire_frame

QUEUE_FRAMES = 512  # control items (statuses, replies) waiting for one socket
QUEUE_BYTES = 1024 * 1024  # past either limit the socket resyncs from Redis instead
# A socket whose writer has nothing waiting gets each new frame written at once by the
# dispatcher, unless this many bytes are already waiting in its transport.
DIRECT_BUFFER = 64 * 1024
PING = b"\x89\x00"  # an empty WebSocket ping frame, as a server sends it (unmasked)


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


class Watcher:
    """One WebSocket: only the handler reads it; a writer task, or the dispatcher while there
    is none, writes it.

    An idle socket costs only this object: no queue and no task. The dispatcher writes new
    frames straight to the transport; a writer task (`spawn`, the hub's `write`) exists only
    while items are queued, and ends once it has drained them. Thousands of watchers idle on
    one project, so everything here is slotted and made on first use.
    """

    __slots__ = ("ws", "transport", "stream", "spawn", "items", "writer", "projects", "dep", "seq",
                 "more", "queued_bytes", "owner", "closed", "quiet")

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, stream: AbstractStreamWriter,
        spawn: Callable[[Watcher], Coroutine[Any, Any, None]],
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.stream = stream
        # The writer's coroutine for this socket, started when items wait: one callable the
        # hub shares between all its sockets (a bound method made per socket costs 64 bytes).
        self.spawn = spawn
        self.items: deque[Item] | None = None  # control items waiting, while any do
        self.writer: asyncio.Task[None] | None = None  # the writer task, while it runs
        # The projects watched: a tuple, as most sockets watch one (a set costs 216 bytes).
        self.projects: tuple[str, ...] = ()
        # The last seq sent of each deployment followed (`last_seq`; the hub knows each one's
        # project: Hub.projects_of). Most sockets follow one deployment at a time: it lives in
        # two slots, any others in `more` (a dict of one entry alone is 184 bytes).
        self.dep: str | None = None
        self.seq = 0
        self.more: dict[str, int] | None = None
        self.queued_bytes = 0
        self.owner: str | None = None  # the token id, once authenticated
        self.closed = False  # the handler has ended: nothing more is queued or written
        self.quiet = 0  # heartbeat rounds since the client last sent anything (Hub.heartbeat)

    def offer(self, item: Item) -> None:
        """Never blocks the dispatcher: a queue too long or too big turns into one resync."""
        if self.closed:
            return
        size = _size(item)
        items = self.items
        if items is None:
            items = self.items = deque()
        if len(items) < QUEUE_FRAMES and self.queued_bytes + size <= QUEUE_BYTES:
            items.append(item)
            self.queued_bytes += size
        else:
            # Subscriptions and replies must still be answered; the rest is reread from Redis.
            keep = [i for i in (*items, item) if isinstance(i, Subscribe | Reply)]
            self.items = deque([*keep, RESYNC])
            self.queued_bytes = sum(_size(i) for i in keep)
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self.spawn(self))

    def deliver(self, frame: LogFrame) -> bool:
        """Hand over a new batch without ever waiting for the socket; True if written now."""
        if frame.project not in self.projects:
            return False
        if self.write_now(frame):
            return True
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
        mine = frame.deployment == self.dep  # the usual case, inline: this runs per socket per frame
        if (self.writer is not None or self.closed
                or frame.first != (self.seq if mine else self.last_seq(frame.deployment)) + 1
                or self.ws.closed or transport.is_closing()
                or transport.get_write_buffer_size() > DIRECT_BUFFER):
            return False
        transport.write(frame.wire)
        if mine:
            self.seq = frame.last
        else:
            self.set_seq(frame.deployment, frame.last)
        return True

    def last_seq(self, deployment: str) -> int:
        """The last seq this socket was sent of `deployment` (0: none yet)."""
        if deployment == self.dep:
            return self.seq
        more = self.more
        return more.get(deployment, 0) if more else 0

    def set_seq(self, deployment: str, seq: int) -> None:
        if self.dep is None or deployment == self.dep:
            self.dep = deployment
            self.seq = seq
        elif self.more is None:
            self.more = {deployment: seq}
        else:
            self.more[deployment] = seq

    def follow(self, deployment: str) -> None:
        """Track `deployment` from seq 0 unless it is already tracked (see Hub._resync)."""
        if deployment != self.dep and not (self.more and deployment in self.more):
            self.set_seq(deployment, 0)

    def followed(self) -> list[str]:
        """The deployments this socket tracks."""
        return ([] if self.dep is None else [self.dep]) + list(self.more or ())

    async def send(self, wire: bytes) -> None:
        """Write one encoded frame and wait while the peer is slow to read.

        Our frames bypass aiohttp's writer (one encoding serves every socket, see
        `wire_frame`), while aiohttp still writes its own pings, pongs and close frame to
        the same transport. That is safe: both write each whole frame in one synchronous
        `transport.write`, so frames never interleave, and only one of our writers (the
        dispatcher while there is no writer task, else the writer task) is ever active.
        """
        if self.ws.closed or self.transport.is_closing():
            raise ConnectionResetError("the socket is closing")
        self.transport.write(wire)
        await self.stream.drain()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(wire_frame(dumps(message).encode()))

    def take(self) -> Item | None:
        """The writer's next item; None ends the writer (the next `offer` starts another).
        Called only by the writer task itself, so nothing can slip in between the check and
        the writer's end."""
        items = self.items
        if not items:
            self.items = None
            self.writer = None
            return None
        item = items.popleft()
        self.queued_bytes -= _size(item)
        return item

    def watch(self, project: str) -> None:
        if not self.projects:
            self.projects = _only(project)
        elif project not in self.projects:
            self.projects = (*self.projects, project)

    def unwatch(self, project: str) -> None:
        self.projects = tuple(p for p in self.projects if p != project)

    async def close(self) -> None:
        """The handler's end: stop queueing, and cancel and await the writer, if one runs."""
        self.closed = True
        self.items = None
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer


@functools.lru_cache(maxsize=1024)
def _only(project: str) -> tuple[str]:
    """One shared `(project,)` for the sockets that watch just `project`."""
    return (project,)


def _size(item: Item) -> int:
    return len(item.data) if isinstance(item, StatusFrame | Reply) else 0


