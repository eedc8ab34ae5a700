"""The log source (a process): `deployhub.logs.LogPublisher` driven as the worker drives it."""

from __future__ import annotations

import asyncio
import math
import pickle
import time
from array import array
from collections import Counter
from typing import Any

from .processes import child_common
from .report import BINS_PER_S, percentiles


def publisher_entry(conn: Any, cpus: set[int] | None, spec: dict[str, Any]) -> None:
    child_common(cpus)
    try:
        asyncio.run(_publisher(conn, spec))
    except Exception as exc:  # report instead of hanging the parent
        import traceback

        conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))


async def _publisher(conn: Any, spec: dict[str, Any]) -> None:
    from redis.asyncio import Redis

    from deployhub import logs

    rate, duration = spec["rate"], spec["duration"]
    total = int(round(rate * duration))
    redis = Redis.from_url(spec["redis_url"], decode_responses=True)  # as worker/__main__.py
    pub = logs.LogPublisher(
        redis, spec["project"], spec["dep_id"], max_lines=total + 10, line_max_bytes=4096
    )
    # Instrument (not change) the one Redis call: which seqs went out in which batch, when.
    batches: list[tuple[int, int, float, float]] = []
    append = pub._append

    async def timed_append(keys: list[str], args: list[Any]) -> Any:
        t0 = time.time()
        result = await append(keys=keys, args=args)
        batches.append((int(args[3]), int(args[-2]), t0, time.time()))
        return result

    pub._append = timed_append  # type: ignore[assignment]
    await redis.script_load(logs._APPEND)  # the first batch should not pay for NOSCRIPT
    pub.start()
    conn.send(("ready",))
    msg = await asyncio.to_thread(conn.recv)
    t_go = msg[1]
    await asyncio.sleep(max(0.0, t_go - time.time()))
    cpu0 = time.process_time()
    emits = array("d")
    pad = "x" * 40
    t0 = time.time()
    i = 0
    max_lag = 0.0
    while i < total:
        now = time.time()
        due = min(total, int((now - t0) * rate) + 1)
        max_lag = max(max_lag, (due - i) / rate)
        while i < due:
            i += 1
            t = time.time()
            pub.emit("stdout", f"{t:.6f} transforming ({i}) src/components/Widget{i % 97}.tsx {pad}")
            emits.append(t)
        await asyncio.sleep(0.001)
    t_emitted = time.time()
    await pub.close(timeout=60)
    t_flushed = time.time()
    cpu = time.process_time() - cpu0
    await redis.aclose()

    published = array("d", [math.nan]) * total
    for first, last, start, _end in batches:
        for seq in range(first, last + 1):
            published[seq - 1] = start
    with open(spec["out"], "wb") as f:
        pickle.dump({"emit": emits, "publish": published}, f)
    delay: Counter[int] = Counter(int((published[k] - emits[k]) * BINS_PER_S) for k in range(total))
    call: Counter[int] = Counter(int((end - start) * BINS_PER_S) for _f, _l, start, end in batches)
    sizes = [last - first + 1 for first, last, _s, _e in batches]
    conn.send(("done", {
        "lines": total,
        "emitted_per_s": round(total / max(1e-9, t_emitted - t0), 1),
        "max_emit_lag_ms": round(max_lag * 1000, 1),
        "flush_after_last_emit_ms": round((t_flushed - t_emitted) * 1000, 1),
        "batches": len(batches),
        "batch_lines_mean": round(sum(sizes) / max(1, len(sizes)), 1),
        "batch_lines_max": max(sizes, default=0),
        "batching_delay_ms": percentiles(delay),  # emit -> the batch's XADD+PUBLISH call
        "append_call_ms": percentiles(call),
        "cpu_s": round(cpu, 2),
        "dropped": pub.dropped,
        "missing_publish": sum(1 for v in published if v != v),
    }))
