"""The worker's log publisher: numbering, caps, masking, and retry through an outage."""

from __future__ import annotations

import asyncio
import json

from redis.asyncio import Redis

from deployhub import keys
from deployhub.logs import LogPublisher, read_events
from tests.support.infra import RedisServer


async def publish(redis_server: RedisServer, lines: list[str], **caps: int) -> list[dict[str, object]]:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    publisher = LogPublisher(redis, "p", "dep000000001", **{"max_lines": 1000, "line_max_bytes": 100, **caps})
    publisher.hide(["hunter2"])
    publisher.start()
    for line in lines:
        publisher.emit("stdout", line)
    await publisher.close(timeout=10)
    events = [json.loads(e) for e in await read_events(redis, "p", "dep000000001")]
    await redis.aclose()
    return events


async def test_line_cap_marks_the_cut_and_keeps_the_count(redis_server: RedisServer) -> None:
    events = await publish(redis_server, [f"l{n}" for n in range(50)], max_lines=10)
    assert [e["seq"] for e in events] == list(range(1, 11))
    assert "truncated after 9 lines" in str(events[-1]["text"])


async def test_byte_cap_and_long_lines(redis_server: RedisServer) -> None:
    events = await publish(redis_server, ["y" * 500] + ["z" * 50] * 10, max_bytes=300)
    assert str(events[0]["text"]).endswith("[line truncated]") and len(str(events[0]["text"])) < 130
    assert "DEPLOYHUB_LOG_MAX_BYTES" in str(events[-1]["text"])


async def test_secrets_are_masked(redis_server: RedisServer) -> None:
    events = await publish(redis_server, ["token=hunter2 ok", "hunter2hunter2"])
    assert [e["text"] for e in events] == ["token=**** ok", "********"]


async def test_lines_emitted_while_redis_is_down_arrive_once(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    publisher = LogPublisher(redis, "p", "dep000000002", max_lines=10_000, line_max_bytes=100)
    publisher.start()
    for n in range(100):
        publisher.emit("stdout", f"before {n}")
    await asyncio.sleep(0.3)
    redis_server.stop()
    for n in range(100):
        publisher.emit("stdout", f"during {n}")
    await asyncio.sleep(1)
    assert publisher.pending > 0
    redis_server.start()
    await publisher.close(timeout=30)
    events = await read_events(redis, "p", "dep000000002")
    assert [json.loads(e)["seq"] for e in events] == list(range(1, 201))
    assert await redis.xlen(keys.log_stream("p", "dep000000002")) == 200
    await redis.aclose()


async def test_a_full_batch_goes_out_without_waiting_for_the_timer(redis_server: RedisServer) -> None:
    """A busy build must not build a standing backlog: reaching the batch size flushes at once,
    even while the publisher is waiting for its timer (it used to sleep the whole interval)."""
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    stream = keys.log_stream("p", "dep000000003")
    publisher = LogPublisher(
        redis, "p", "dep000000003", max_lines=10_000, line_max_bytes=100, interval=3.0, batch_size=500
    )
    publisher.start()
    for n in range(100):
        publisher.emit("stdout", f"early {n}")
    await asyncio.sleep(0.2)  # the publisher now waits for the 3 s timer
    for n in range(500):
        publisher.emit("stdout", f"burst {n}")
    async with asyncio.timeout(1.5):  # half the timer
        while await redis.xlen(stream) < 500:
            await asyncio.sleep(0.01)
    assert await redis.xlen(stream) == 500  # one full batch; 100 lines are younger than 3 s
    await publisher.close(timeout=10)
    assert await redis.xlen(stream) == 600
    await redis.aclose()
