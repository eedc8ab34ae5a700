"""Build log events: the worker's batching publisher and the server's history reads.

An event is `{"seq": n, "ts": unix seconds, "stream": "stdout"|"stderr"|"system", "text": str}`
with `seq` counting from 1 per deployment. The stream entry id is `<seq>-0`, which makes an
append idempotent: a batch retried after a lost reply cannot add a line twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys
from .redis_client import publish_command, stop_if_cancelled

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr", "system")
TRUNCATED_MARK = " [line truncated]"

# Appends a batch to the capped stream and publishes the events that were new, in one round
# trip. Entries whose id is not above the stream's last id were stored by an earlier try.
# The stream and the channel share the project's hash tag, so on a cluster this runs on the
# project's shard and publishes with SPUBLISH (ARGV[3]) to that shard's subscribers only.
_APPEND = """
local stream, channel = KEYS[1], KEYS[2]
local maxlen, head, publish = ARGV[1], ARGV[2], ARGV[3]
local added = {}
for i = 4, #ARGV, 2 do
  local r = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, ARGV[i] .. '-0', 'e', ARGV[i + 1])
  if type(r) ~= 'table' or not r.err then added[#added + 1] = ARGV[i + 1] end
end
if #added > 0 then
  redis.call(publish, channel, head .. table.concat(added, ',') .. ']}')
end
return #added
"""


def frame_head(project: str, dep_id: str) -> str:
    """The start of a `logs` frame; events and `]}` follow."""
    return (
        '{"type":"logs","project":' + json.dumps(project) + ',"deployment":'
        + json.dumps(dep_id) + ',"events":['
    )


def logs_frame(project: str, dep_id: str, events: list[str]) -> str:
    return frame_head(project, dep_id) + ",".join(events) + "]}"


def encode_event(seq: int, ts: float, stream: str, text: str) -> str:
    return json.dumps(
        {"seq": seq, "ts": round(ts, 3), "stream": stream, "text": text},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def cut_line(text: str, max_bytes: int) -> str:
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode(errors="ignore") + TRUNCATED_MARK


class LogPublisher:
    """Numbers, batches and publishes a deployment's log lines; never loses one.

    `emit` never blocks the build. A background task flushes every `interval` seconds or
    `batch_size` lines, whichever comes first. While Redis is away the lines wait in memory
    (bounded by the log caps) and go out, in order, once it is back.
    """

    def __init__(
        self,
        redis: Redis,
        project: str,
        dep_id: str,
        *,
        max_lines: int,
        line_max_bytes: int,
        max_bytes: int = 20 * 1024 * 1024,
        interval: float = 0.05,
        batch_size: int = 500,
    ) -> None:
        self.redis = redis
        self.project = project
        self.dep_id = dep_id
        self.max_lines = max_lines
        self.line_max_bytes = line_max_bytes
        self.max_bytes = max_bytes
        self.bytes = 0
        self.truncated = False
        self._secrets: list[str] = []
        self.interval = interval
        self.batch_size = batch_size
        self.seq = 0
        self.dropped = 0
        self.events: list[str] = []  # every event, for the copy kept in storage
        self._pending: deque[tuple[int, str, float]] = deque()  # seq, event, monotonic time
        self._wake = asyncio.Event()
        self._append = redis.register_script(_APPEND)
        self._publish = publish_command(redis)
        self._head = frame_head(project, dep_id)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def emit(self, stream: str, text: str) -> None:
        if self.truncated:
            self.dropped += 1
            return
        text = self.mask(cut_line(text, self.line_max_bytes))
        if self.seq == self.max_lines - 1:
            stream, text = "system", (
                f"Log truncated after {self.seq} lines (DEPLOYHUB_LOG_MAX_LINES); "
                "the build goes on."
            )
            self.truncated = True
        elif self.bytes + len(text) > self.max_bytes:
            stream, text = "system", (
                f"Log truncated after {self.seq} lines, {self.bytes} bytes "
                "(DEPLOYHUB_LOG_MAX_BYTES); the build goes on."
            )
            self.truncated = True
        self.seq += 1
        self.bytes += len(text)
        event = encode_event(self.seq, time.time(), stream, text)
        self.events.append(event)
        self._pending.append((self.seq, event, time.monotonic()))
        if len(self._pending) == 1 or len(self._pending) >= self.batch_size:
            self._wake.set()

    def hide(self, secrets: list[str]) -> None:
        """Never publish these values (added to those hidden already): every occurrence in a
        line becomes ****."""
        wanted = set(self._secrets) | {s for s in secrets if len(s) >= 3}
        # Longest first: a secret that holds another is hidden whole, not in part.
        self._secrets = sorted(wanted, key=len, reverse=True)

    def mask(self, text: str) -> str:
        """`text` with every hidden value replaced by ****."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "****")
        return text

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"log-publisher-{self.dep_id}")

    async def close(self, timeout: float = 30.0) -> None:
        """Flush what is left; gives up (and says so) after `timeout` seconds of outage."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            log.error(
                "could not publish the last %d log lines of %s: Redis unreachable",
                len(self._pending), self.dep_id,
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wake.wait()  # the first line, or close()
                self._wake.clear()
                continue
            if not self._closing and len(self._pending) < self.batch_size:
                # Let a short burst gather into one batch, but no line waits longer than
                # `interval`: the clock runs from the oldest waiting line, not from now.
                wait = self._pending[0][2] + self.interval - time.monotonic()
                if wait > 0:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                    # cancel that lands as the wait ends, and close() would then hang.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    self._wake.clear()
                    continue
            batch = [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]
            args: list[Any] = [self.max_lines + 100, self._head, self._publish]
            for seq, event, _emitted in batch:
                args += [seq, event]
            try:
                await self._append(
                    keys=[keys.log_stream(self.project, self.dep_id), keys.channel(self.project)],
                    args=args,
                )
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                stop_if_cancelled()
                log.warning("log publish failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            for _ in batch:
                self._pending.popleft()


async def read_events(
    redis: Redis, project: str, dep_id: str, after: int = 0, count: int = 5000,
    until: int | None = None,
) -> list[str]:
    """Raw event JSON strings with `after` < seq <= `until` (or the end), oldest first."""
    entries = await redis.xrange(
        keys.log_stream(project, dep_id), min=f"{after + 1}-0", max="+" if until is None else f"{until}-0",
        count=count,
    )
    return [_field(fields) for _id, fields in entries or [] if fields]


def _field(fields: dict[Any, Any]) -> str:
    value = fields.get("e", fields.get(b"e"))
    return value.decode() if isinstance(value, bytes) else str(value)


def event_seq(event: str) -> int:
    return int(json.loads(event)["seq"])
