"""One WebSocket watcher: its queue of control items, its seqs, and the direct write path."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
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
        """Write one encoded frame and wait while the peer is slow to read.

        Our frames bypass aiohttp's writer (one encoding serves every socket, see
        `wire_frame`), while aiohttp still writes its own pings, pongs and close frame to
        the same transport. That is safe: both write each whole frame in one synchronous
        `transport.write`, so frames never interleave, and only one of our writers (the
        dispatcher while the writer task is idle, else the writer task) is ever active.
        """
        if self.ws.closed or self.transport.is_closing():
            raise ConnectionResetError("the socket is closing")
        self.transport.write(wire)
        await self.stream.drain()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(wire_frame(dumps(message).encode()))

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


