"""The newest log frames of each deployment, shared by every socket of this process."""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque

from ..logs import frame_head
from .frames import LogFrame, wire_frame

COALESCE_BYTES = 64 * 1024  # a lagging socket's batches are sent as frames up to this size
RECENT_BYTES = 16 * 1024 * 1024  # recent log frames kept in memory, per deployment...
RECENT_DEPLOYMENTS = 8  # ...for this many deployments; older lines are read from Redis
MERGED_FRAMES = 64  # merged catch-up frames kept per deployment, shared by sockets that lag together


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
            if len(self._merged) > MERGED_FRAMES:
                self._merged.popitem(last=False)
        return merged


