"""Log and status frames: encoded once, written as they are to every socket."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

from ..logs import logs_frame
from ..store import dumps


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


