"""Live-log fan-out benchmark: DeployHub's WebSocket hub against a naive relay.

    python -m bench.logs_fanout            # full run (several minutes)
    python -m bench.logs_fanout --quick    # smoke run, under 2 minutes

What happens (every process on 127.0.0.1; see bench/README.md for how to read the output):

* one private redis-server (no persistence) on a free port;
* per configuration a FRESH server process -- `python -m deployhub.cli serve` or
  `python -m bench.naive_relay` -- so its CPU seconds (/proc/<pid>/stat) and peak RSS
  (/proc/<pid>/status VmHWM, reset with clear_refs at the start of the window, plus VmRSS
  sampled every 50 ms) belong to that configuration alone;
* N WebSocket watchers (a lean RFC 6455 client by default, `--client aiohttp` for aiohttp's)
  spread over several client processes, all subscribed to one project;
* one publisher process driving `deployhub.logs.LogPublisher` exactly as the worker does
  (`emit("stdout", text)` at a fixed offered rate, its own 50 ms / 500-line batching), each
  line's text starting with its send time (time.time());
* every watcher checks every message: exactly-once and in order by seq (first seq of a frame
  must be last seen + 1; every 16th frame must hold exactly last-first+1 events); a few
  watchers per run also parse every event in full and take the latency from the text
  timestamp.

By default the servers (and Redis) are pinned to CPU 0 and the load generators (publisher,
watchers) to CPU 1, so the system under test gets one whole core -- all a single asyncio
process can use -- and the clients cannot steal it. Per-core busy time is reported so a
saturated client core (results bounded by the load generator, not the server) is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BINS_PER_S = 10_000  # latency histograms have 0.1 ms bins
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEQ = b'"seq":'
LOGS_PREFIX = b'{"type":"logs"'
COUNT_EVERY = 16  # a watcher counts the events of every 16th frame (full-check watchers: all)

# ----------------------------------------------------------------------------- plumbing

_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _die_with_parent() -> None:
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


def _child_common(cpus: set[int] | None, nice: int = 0) -> None:
    """First thing in every multiprocessing child: die with the parent, no Ctrl-C noise."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    pin(0, cpus)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    return sum(proc_cpu_split(pid))  # utime + stime


def proc_mem_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def reset_hwm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def core_times() -> dict[str, list[int]]:
    """cpuN -> jiffies [user, nice, system, idle, iowait, irq, softirq, steal]."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                out[name] = [int(v) for v in vals[:8]]
    return out


def core_busy(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per core, % of the window: busy (user+system+irq+softirq), of which softirq, and steal."""
    out = {}
    for name, now in after.items():
        d = [a - b for a, b in zip(now, before.get(name, [0] * 8))]
        total = max(1, sum(d))
        out[name] = {
            "busy": round(100.0 * (d[0] + d[1] + d[2] + d[5] + d[6]) / total, 1),
            "softirq": round(100.0 * d[6] / total, 1),
            "steal": round(100.0 * d[7] / total, 1),
        }
    return out


def _all_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime+stime seconds) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


class LoadMeter:
    """CPU used on this machine by processes that are NOT this benchmark (other people's tests).

    other = all busy core time (/proc/stat, minus softirq) - CPU of this process tree.
    """

    def __init__(self) -> None:
        self.root = os.getpid()

    def snapshot(self) -> tuple[float, dict[int, float], dict[str, list[int]]]:
        stats = _all_stats()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _cpu) in stats.items():
            children.setdefault(ppid, []).append(pid)
        mine = {}
        todo = [self.root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                mine[pid] = stats[pid][1]
            todo.extend(children.get(pid, ()))
        return time.monotonic(), mine, core_times()

    @staticmethod
    def other_cores(a: tuple[float, dict[int, float], dict[str, list[int]]],
                    b: tuple[float, dict[int, float], dict[str, list[int]]]) -> float:
        """Average cores used by others between two snapshots."""
        t0, mine0, cores0 = a
        t1, mine1, cores1 = b
        busy = 0
        for name, now in cores1.items():
            d = [x - y for x, y in zip(now, cores0.get(name, [0] * 8))]
            busy += d[0] + d[1] + d[2] + d[5]  # user nice system irq (softirq is traffic)
        mine = sum(cpu - mine0.get(pid, 0.0) for pid, cpu in mine1.items())
        return max(0.0, (busy / CLK_TCK - mine) / max(1e-6, t1 - t0))

    def wait_quiet(self, limit: float, threshold: float, log: Any) -> float:
        """Wait (at most `limit` s) until others use < `threshold` cores for 2 s running."""
        if limit <= 0:
            return 0.0
        start = time.monotonic()
        calm = 0
        last = self.snapshot()
        warned = False
        while True:
            time.sleep(1.0)
            now = self.snapshot()
            other = self.other_cores(last, now)
            last = now
            calm = calm + 1 if other < threshold else 0
            if calm >= 2:
                return other
            waited = time.monotonic() - start
            if waited >= limit:
                log(f"  machine still busy ({other:.2f} cores used by other processes); going ahead")
                return other
            if not warned and waited >= 3:
                log(f"  waiting for other processes to calm down ({other:.2f} cores busy)")
                warned = True


def percentiles(hist: Counter[int], points: tuple[float, ...] = (50, 99)) -> dict[str, float | None]:
    """p50/p99/max in ms from a histogram of 0.1 ms bins (each bin reported at its upper edge)."""
    total = sum(hist.values())
    out: dict[str, float | None] = {f"p{p:g}": None for p in points}
    out["max"] = None
    out["n"] = total
    if not total:
        return out
    keys = sorted(hist)
    targets = [(p, math.ceil(total * p / 100.0)) for p in points]
    seen = 0
    ti = 0
    for k in keys:
        seen += hist[k]
        while ti < len(targets) and seen >= targets[ti][1]:
            out[f"p{targets[ti][0]:g}"] = round((k + 1) * 1000.0 / BINS_PER_S, 1)
            ti += 1
    out["max"] = round((keys[-1] + 1) * 1000.0 / BINS_PER_S, 1)
    return out


# ------------------------------------------------------------------------ server processes


class Managed:
    """A subprocess with a log file; stopped by `stop()` (SIGTERM, then SIGKILL)."""

    live: set[Managed] = set()

    def __init__(self, name: str, argv: list[str], log_path: Path, cpus: set[int] | None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cpus = cpus
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, env=self.env, start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call
            )
        Managed.live.add(self)
        pin(self.proc.pid, self.cpus)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, probe: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited while starting; see {self.log_path}:\n{self.tail()}")
            if probe():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_path}:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        Managed.live.discard(self)


def redis_binary() -> str:
    from deployhub.embedded_redis import find_binary

    return find_binary()


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYHUB_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_redis(tmp: Path, cpus: set[int] | None) -> tuple[Managed, str]:
    port = free_port()
    data = tmp / "redis"
    data.mkdir()
    server = Managed(
        "redis",
        [redis_binary(), "--bind", HOST, "--port", str(port), "--dir", str(data), "--save", "",
         "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"],
        tmp / "redis.log", cpus,
    )
    server.start()
    server.wait_ready(lambda: _redis_ping(port), 20)
    return server, f"redis://{HOST}:{port}/0"


def start_server(kind: str, tmp: Path, redis_url: str, cpus: set[int] | None, tag: str) -> tuple[Managed, int]:
    port = free_port()
    if kind == "deployhub":
        data_dir = tmp / f"dh-{tag}"
        argv = [sys.executable, "-m", "deployhub.cli", "serve", "--host", HOST, "--port", str(port),
                "--redis-url", redis_url, "--data-dir", str(data_dir)]
    else:
        argv = [sys.executable, "-m", "bench.naive_relay", "--host", HOST, "--port", str(port),
                "--redis-url", redis_url]
    server = Managed(kind, argv, tmp / f"{kind}-{tag}.log", cpus, env=clean_env())
    server.start()
    server.wait_ready(lambda: _http_ok(port), 60)
    return server, port


async def _create_deployment(redis_url: str, project: str) -> tuple[str, str | None]:
    """A queued deployment of a new project; with a bearer token when the server wants one."""
    import inspect

    from redis.asyncio import Redis

    from deployhub.store import Store

    try:
        from deployhub.auth import Tokens
    except ImportError:  # a DeployHub without tokens
        Tokens = None  # type: ignore[assignment,misc]  # noqa: N806
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        secret = None
        extra: dict[str, str] = {}
        if Tokens is not None:
            token, secret = await Tokens(redis).create("bench")
            if "owner" in inspect.signature(Store.create_deployment).parameters:
                extra["owner"] = token.id
        dep = await Store(redis).create_deployment(project, "http://127.0.0.1/x.git", "", **extra)
        return dep.id, secret
    finally:
        await redis.aclose()


async def _finish_deployment(redis_url: str, dep_id: str) -> bool:
    from redis.asyncio import Redis

    from deployhub.store import Store

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        return await Store(redis).transition(dep_id, "failed", "bench: the build ended")
    finally:
        await redis.aclose()


class Sampler(threading.Thread):
    """Samples the server's VmRSS every 50 ms and keeps the deployment's lease alive."""

    def __init__(self, pid: int, redis_url: str, dep_id: str) -> None:
        super().__init__(daemon=True, name="sampler")
        self.pid = pid
        self.redis_url = redis_url
        self.dep_id = dep_id
        self.max_rss_kb = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        import redis

        from deployhub import keys

        client = redis.Redis.from_url(self.redis_url)
        next_lease = 0.0
        try:
            while not self.stopping.is_set():
                with contextlib.suppress(OSError, KeyError):
                    self.max_rss_kb = max(self.max_rss_kb, proc_mem_kb(self.pid)["VmRSS"])
                if time.monotonic() >= next_lease:
                    with contextlib.suppress(Exception):
                        client.set(keys.lease(self.dep_id), "bench", ex=30)
                    next_lease = time.monotonic() + 5.0
                self.stopping.wait(0.05)
        finally:
            client.close()

    def reset(self) -> None:
        self.max_rss_kb = 0

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(5)


# ------------------------------------------------------------------- publisher (a process)


def publisher_entry(conn: Any, cpus: set[int] | None, spec: dict[str, Any]) -> None:
    _child_common(cpus)
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
        batches.append((int(args[2]), int(args[-2]), t0, time.time()))
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


# ----------------------------------------------------------------- watchers (a process)


class Watcher:
    __slots__ = ("full", "ws", "last", "accepted", "received", "dups", "gaps", "bad_frames",
                 "resyncs", "errors", "subscribed", "closed", "done_at", "last_at", "msgs",
                 "nbytes", "rr", "ra", "rb", "flast", "full_errors", "text_lat", "statuses",
                 "skipped", "last_ctrl_at", "phase")

    def __init__(self, full: bool, phase: int = 0) -> None:
        self.full = full
        self.phase = phase  # which frames this watcher counts the events of
        self.ws: Any = None
        self.last = 0  # highest seq accepted
        self.accepted = 0  # distinct lines received in order
        self.received = 0  # every line received, duplicates included
        self.dups = 0  # lines at or below `last` (duplicates or out of order)
        self.gaps = 0  # frames that skipped ahead
        self.bad_frames = 0  # frames whose event count did not match last-first+1
        self.resyncs = 0
        self.errors: list[str] = []
        self.subscribed = False
        self.closed = False
        self.done_at = 0.0
        self.last_at = 0.0
        self.msgs = 0
        self.nbytes = 0
        self.rr = array("d")  # receipt time of each message that carried new lines
        self.ra = array("q")  # first new seq in it
        self.rb = array("q")  # last seq in it
        self.flast = 0
        self.full_errors = 0
        self.text_lat: Counter[int] = Counter()
        self.statuses = 0
        self.skipped = 0  # lines jumped over by a frame that skipped ahead
        self.last_ctrl_at = 0.0


class Clients:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.expected: int = spec["expected"]
        self.watchers = [Watcher(i < spec["full"], i % COUNT_EVERY) for i in range(spec["count"])]
        self.pending = len(self.watchers)
        self.all_done = asyncio.Event()
        self.settled = 0
        self.all_settled = asyncio.Event()
        self.connect_errors: list[str] = []
        self.retries = 0
        token = spec.get("token")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.tasks: list[asyncio.Task[None]] = []
        self.session: Any = None

    # -- one message ------------------------------------------------------------------

    def on_message(self, w: Watcher, data: bytes | bytearray, now: float,
                   start: int = 0, end: int | None = None) -> None:
        """One text message: `data[start:end]`, looked at in place (no copy)."""
        end = len(data) if end is None else end
        w.msgs += 1
        w.nbytes += end - start
        if data.startswith(LOGS_PREFIX, start):  # DeployHub: one frame, many events
            i = data.find(SEQ, start, end)
            first = int(data[i + 6:data.find(b",", i, end)])
            j = data.rfind(SEQ, start, end)
            last = int(data[j + 6:data.find(b",", j, end)])
            n = last - first + 1
            # Counting is the costliest check (a scan of every byte); frames are the same
            # bytes for every socket, so each distinct frame is still counted many times.
            if (w.full or (w.msgs + w.phase) % COUNT_EVERY == 0) and data.count(SEQ, start, end) != n:
                w.bad_frames += 1
        elif data.startswith(b'{"seq"', start):  # naive relay: one message per line
            first = last = int(data[data.index(b":", start) + 1:data.index(b",", start)])
            n = 1
        else:
            self.on_control(w, bytes(data[start:end]).decode())
            return
        if w.full:
            self.full_check(w, bytes(data[start:end]), now)
        w.received += n
        prev = w.last
        if first > prev + 1:
            w.gaps += 1
            w.skipped += first - prev - 1
        if last <= prev:
            w.dups += n
            return
        a = max(first, prev + 1)
        w.dups += a - first
        w.accepted += last - a + 1
        w.last = last
        w.rr.append(now)
        w.ra.append(a)
        w.rb.append(last)
        w.last_at = now
        if last >= self.expected and not w.done_at:
            w.done_at = now
            self.pending -= 1
            if self.pending <= 0:
                self.all_done.set()

    def on_control(self, w: Watcher, data: str) -> None:
        w.last_ctrl_at = time.time()
        if data.startswith('{"type":"subscribed"') or data.startswith('{"type": "subscribed"'):
            w.subscribed = True
        elif '"resync"' in data[:30]:
            w.resyncs += 1
        elif '"status"' in data[:30] or '"production"' in data[:30]:
            w.statuses += 1
        elif len(w.errors) < 5:
            w.errors.append(data[:200])

    def full_check(self, w: Watcher, data: bytes, now: float) -> None:
        """Every event parsed: seq by seq, and the latency from the text's own timestamp."""
        obj = json.loads(data)
        for event in obj["events"] if "events" in obj else [obj]:
            seq = event["seq"]
            if seq != w.flast + 1:
                w.full_errors += 1
            if seq > w.flast:
                w.flast = seq
                sent = float(event["text"].split(" ", 1)[0])
                w.text_lat[int((now - sent) * BINS_PER_S)] += 1

    # -- sockets ----------------------------------------------------------------------

    async def open_all(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        sem = asyncio.Semaphore(self.spec["concurrency"])
        self.tasks = [asyncio.create_task(self.run_watcher(w, sem)) for w in self.watchers]
        with contextlib.suppress(TimeoutError):  # report what we have rather than nothing
            await asyncio.wait_for(self.all_settled.wait(), self.spec["connect_deadline"])

    def _settle(self) -> None:
        self.settled += 1
        if self.settled >= len(self.watchers):
            self.all_settled.set()

    async def run_watcher(self, w: Watcher, sem: asyncio.Semaphore) -> None:
        attempt = 0
        while True:
            conn: Any = None
            try:
                async with sem:
                    if self.spec["client"] == "raw":
                        conn = RawSocket(self, w)
                    else:
                        conn = AiohttpSocket(self, w)
                    await conn.connect()
                break
            except Exception as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                if len(self.connect_errors) < 5:
                    self.connect_errors.append(repr(exc))
                attempt += 1
                if attempt >= self.spec["attempts"]:
                    w.closed = True
                    self._settle()
                    return
                # web/live.js: exponential backoff from 0.5 s, capped at 10 s, "equal jitter".
                self.retries += 1
                ceiling = min(10.0, 0.5 * 2 ** (attempt - 1))
                await asyncio.sleep(ceiling / 2 + random.random() * ceiling / 2)
        w.ws = conn
        self._settle()
        try:
            await conn.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(w.errors) < 5:
                w.errors.append(repr(exc))
        w.closed = True

    async def close_all(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

        async def close(ws: Any) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)

        await asyncio.gather(*(close(w.ws) for w in self.watchers if w.ws is not None))
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.close(), 5)

    # -- results ----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        ws = self.watchers
        subscribed = [w for w in ws if w.subscribed]
        errors = [e for w in ws for e in w.errors][:5]
        return {
            "watchers": len(ws),
            "subscribed": len(subscribed),
            "closed_early": sum(1 for w in subscribed if w.closed),
            "complete": sum(1 for w in ws if w.done_at),
            "accepted": sum(w.accepted for w in ws),
            "received": sum(w.received for w in ws),
            "lost": sum(max(0, self.expected - w.accepted) for w in ws),
            "dups": sum(w.dups for w in ws),
            "gaps": sum(w.gaps for w in ws),
            "bad_frames": sum(w.bad_frames for w in ws),
            "resyncs": sum(w.resyncs for w in ws),
            "status_frames": sum(w.statuses for w in ws),
            "status_watchers": sum(1 for w in ws if w.statuses),
            "resync_watchers": sum(1 for w in ws if w.resyncs),
            "last_ctrl_at": max((w.last_ctrl_at for w in ws), default=0.0),
            "skipped": sum(w.skipped for w in ws),
            "late": sum(max(0, self.expected - w.last) for w in ws if w.subscribed),
            "full_checked": sum(1 for w in ws if w.full),
            "full_errors": sum(w.full_errors for w in ws),
            "msgs": sum(w.msgs for w in ws),
            "bytes": sum(w.nbytes for w in ws),
            "first_at": min((w.rr[0] for w in ws if w.rr), default=0.0),
            "last_at": max((w.last_at for w in ws), default=0.0),
            "connect_retries": self.retries,
            "errors": errors + self.connect_errors[:2],
        }

    def histograms(self, emit: array[float], published: array[float]) -> dict[str, Counter[int]]:
        """Per line: receipt - emit time, and receipt - the time its batch was published."""
        e2e: Counter[int] = Counter()
        fan: Counter[int] = Counter()
        text: Counter[int] = Counter()
        scale = float(BINS_PER_S)
        E = [t * scale for t in emit]
        P = [t * scale for t in published]
        total = len(E)
        for w in self.watchers:
            for r, a, b in zip(w.rr, w.ra, w.rb):
                if a > total:
                    continue
                b = min(b, total)
                R = r * scale
                if a == b:
                    e2e[int(R - E[a - 1])] += 1
                    fan[int(R - P[a - 1])] += 1
                    continue
                sub = R.__sub__
                e2e.update(map(int, map(sub, E[a - 1:b])))  # Counter counts in C
                if P[a - 1] == P[b - 1]:
                    fan[int(R - P[a - 1])] += b - a + 1
                else:
                    fan.update(map(int, map(sub, P[a - 1:b])))
            text.update(w.text_lat)
        return {"e2e": e2e, "fanout": fan, "text": text}


class AiohttpSocket:
    """A watcher on aiohttp's WebSocket client, as a Python program would watch a build."""

    def __init__(self, clients: Clients, w: Watcher) -> None:
        self.clients, self.w = clients, w
        self.ws: Any = None

    async def connect(self) -> None:
        import aiohttp

        spec = self.clients.spec
        self.ws = await self.clients.session.ws_connect(
            spec["url"], max_msg_size=0, headers=self.clients.headers,
            compress=15 if spec["compress"] else 0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
        await self.ws.send_str(json.dumps({"type": "subscribe", "project": spec["project"]}))
        async with asyncio.timeout(60):
            while not self.w.subscribed:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"socket ended before subscribed: {msg.type!r}")
                self.clients.on_message(self.w, msg.data.encode(), time.time())

    async def run(self) -> None:
        import aiohttp

        TEXT = aiohttp.WSMsgType.TEXT
        while True:
            msg = await self.ws.receive()
            if msg.type == TEXT:
                self.clients.on_message(self.w, msg.data.encode(), time.time())
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class RawSocket(asyncio.Protocol):
    """A lean watcher: RFC 6455 over an asyncio protocol, every frame handled as it arrives.

    With 1,000 watchers on one core, aiohttp's client (a future and a task wake-up per
    message) is slower than the server it measures; this one parses the frames of each
    `recv()` in a loop, so the load generator stops setting the pace. It checks the same
    things (`Clients.on_message`) and answers pings like a browser.
    """

    def __init__(self, clients: Clients, w: Watcher) -> None:
        self.clients, self.w = clients, w
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        from urllib.parse import urlsplit

        spec = self.clients.spec
        url = urlsplit(spec["url"])
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, url.hostname, url.port)
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        auth = "".join(f"{k}: {v}\r\n" for k, v in self.clients.headers.items())
        self.transport.write(
            f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{auth}\r\n".encode()
        )
        self.send(0x1, json.dumps({"type": "subscribe", "project": spec["project"]}).encode())
        async with asyncio.timeout(60):
            await asyncio.wait({self.subscribed, self.done}, return_when=asyncio.FIRST_COMPLETED)
        if not self.subscribed.done():
            raise RuntimeError("socket ended before subscribed")

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame (payloads here are always under 126 bytes)."""
        assert self.transport is not None and len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf: bytes | bytearray
        if self.buf:  # the rest of a frame that began in an earlier chunk
            self.buf += data
            buf = self.buf
        else:
            buf = data  # the usual case: parse the chunk as it came, without copying it
        if not self.upgraded:
            buf = self.buf = bytearray(buf)
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.clients.connect_errors.append(bytes(buf[:80]).decode(errors="replace"))
                assert self.transport is not None
                self.transport.close()
                return
            del self.buf[:end + 4]
            buf = self.buf
            self.upgraded = True
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4]), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10]), 10
            if size - pos < head + length:
                break
            start, pos = pos + head, pos + head + length
            if opcode == 0x1:
                self.clients.on_message(self.w, buf, now, start, pos)
                if self.w.subscribed and not self.subscribed.done():
                    self.subscribed.set_result(None)
            elif opcode == 0x9:
                self.send(0xA, bytes(buf[start:pos]))
            elif opcode == 0x8:
                assert self.transport is not None
                self.transport.close()
                break
            else:
                self.w.errors.append(f"unexpected opcode {opcode} (fragments are not sent)")
        if buf is self.buf:
            del self.buf[:pos]
        elif pos < size:
            self.buf = bytearray(buf[pos:])

    async def run(self) -> None:
        await self.done

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send(0x8, (1000).to_bytes(2))
            self.transport.close()


def clients_entry(conn: Any, cpus: set[int] | None, nice: int = 0) -> None:
    _child_common(cpus, nice)
    try:
        asyncio.run(_clients(conn))
    except Exception as exc:
        import traceback

        with contextlib.suppress(Exception):
            conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))


async def _clients(conn: Any) -> None:
    spec = await asyncio.to_thread(conn.recv)
    clients = Clients(spec)
    await clients.open_all()
    conn.send(("ready", clients.summary()))
    cpu0 = time.process_time()
    while True:
        op, arg = await asyncio.to_thread(conn.recv)
        if op == "go":
            cpu0 = time.process_time()
        elif op == "wait":  # until every watcher has the last line, or the deadline
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(clients.all_done.wait(), max(0.0, arg - time.time()))
            summary = clients.summary()
            summary["cpu_s"] = round(time.process_time() - cpu0, 2)
            conn.send(("summary", summary))
        elif op == "stats":
            with contextlib.suppress(OSError):  # the measurement is over: use every core
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            with open(arg, "rb") as f:
                data = pickle.load(f)
            conn.send(("stats", clients.histograms(data["emit"], data["publish"])))
        elif op == "summary":
            conn.send(("summary", clients.summary()))
        elif op == "close":
            await clients.close_all()
            conn.send(("closed", None))
            return


# --------------------------------------------------------------------- the orchestrator


class Child:
    """A multiprocessing child with a pipe; every wait on it is bounded."""

    live: set[Child] = set()

    def __init__(self, target: Any, args: tuple[Any, ...], name: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.name = name
        self.proc = ctx.Process(target=target, args=(child_conn, *args), name=name, daemon=True)
        self.proc.start()
        child_conn.close()
        Child.live.add(self)

    def send(self, *msg: Any) -> None:
        self.conn.send(msg if len(msg) != 1 else msg[0])

    def recv(self, timeout: float, expect: str) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no {expect!r} after {timeout:.0f}s")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} died (exit code {self.proc.exitcode})") from None
        if msg[0] == "error":
            raise RuntimeError(f"{self.name} failed: {msg[1]}")
        if msg[0] != expect:
            raise RuntimeError(f"{self.name}: expected {expect!r}, got {msg[0]!r}")
        return msg[1] if len(msg) > 1 else None

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()
        Child.live.discard(self)


def recv_all(children: list[Child], timeout: float, expect: str) -> list[Any]:
    deadline = time.monotonic() + timeout
    return [c.recv(max(0.1, deadline - time.monotonic()), expect) for c in children]


def close_clients(children: list[Child]) -> None:
    for c in children:
        with contextlib.suppress(Exception):
            c.send("close", None)
    for c in children:
        with contextlib.suppress(Exception):
            c.recv(20, "closed")
        c.stop()


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        cpus = sorted(os.sched_getaffinity(0))
        if args.pin and len(cpus) >= 2:
            self.server_cpus: set[int] | None = {cpus[0]}
            self.load_cpus: set[int] | None = set(cpus[1:])
        else:
            self.server_cpus = self.load_cpus = None
        # Watchers: on the load cores only ("split"), or on every core at nice 10 ("shared"),
        # where they soak up whatever the server and the publisher leave.
        self.client_cpus = set(cpus) if args.clients == "shared" else self.load_cpus
        # nice: the publisher (the "worker") must get its CPU first so the offered rate holds.
        self.client_nice = 10 if args.clients == "shared" else 5
        self.redis: Managed | None = None
        self.redis_url = ""
        self.runs = 0
        self.meter = LoadMeter()
        self.token: str | None = None

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def start_redis(self) -> None:
        self.redis, self.redis_url = start_redis(self.tmp, self.server_cpus)
        self.log(f"redis on {self.redis_url} (pid {self.redis.pid})")

    def procs_for(self, n: int) -> int:
        procs: int = min(self.args.client_procs, math.ceil(n / self.args.watchers_per_proc))
        return max(1, procs)

    def start_clients(self, n: int, url: str, project: str, expected: int,
                      concurrency: int | None = None) -> list[Child]:
        procs = self.procs_for(n)
        full = split(min(n, self.args.full_check), procs)
        children = []
        for i, count in enumerate(split(n, procs)):
            child = Child(clients_entry, (self.client_cpus, self.client_nice), f"clients-{i}")
            child.send({
                "url": url, "project": project, "count": count, "full": full[i],
                "expected": expected, "concurrency": concurrency or self.args.connect_concurrency,
                "compress": self.args.compress, "client": self.args.client, "attempts": self.args.connect_attempts,
                "token": self.token, "connect_deadline": max(5.0, self.args.connect_timeout - 15),
            })
            children.append(child)
        return children

    def new_run(self, kind: str, label: str) -> tuple[Managed, int, str, str, Sampler]:
        """A fresh server, a new project with one queued deployment whose lease is kept alive
        (so DeployHub's reaper does not end it mid-run) and an RSS sampler."""
        self.runs += 1
        tag = f"{self.runs:02d}-{label}"
        server, port = start_server(kind, self.tmp, self.redis_url, self.server_cpus, tag)
        try:
            project = f"bench-{label}-{uuid.uuid4().hex[:6]}"
            dep_id, self.token = asyncio.run(_create_deployment(self.redis_url, project))
            sampler = Sampler(server.pid, self.redis_url, dep_id)
            sampler.start()
        except BaseException:
            server.stop()
            raise
        return server, port, project, dep_id, sampler

    # -- one fan-out configuration ----------------------------------------------------

    def fanout(self, kind: str, n: int, rate: int) -> dict[str, Any]:
        args = self.args
        duration, drain = args.duration, args.drain
        expected = int(round(rate * duration))
        label = f"{'dh' if kind == 'deployhub' else 'naive'}-n{n}-r{rate}"
        self.log(f"--- {kind}: {n} watchers x {rate} lines/s for {duration:g}s")
        server, port, project, dep_id, sampler = self.new_run(kind, label)
        clients: list[Child] = []
        publisher: Child | None = None
        profiler: subprocess.Popen[bytes] | None = None
        try:
            clients = self.start_clients(n, f"ws://{HOST}:{port}/api/ws", project, expected)
            t = time.monotonic()
            ready = recv_all(clients, args.connect_timeout, "ready")
            subscribed = sum(r["subscribed"] for r in ready)
            connect_s = time.monotonic() - t
            retries = sum(r["connect_retries"] for r in ready)
            self.log(f"{subscribed}/{n} watchers subscribed in {connect_s:.1f}s ({retries} retries)")
            if retries:
                self.log(f"  first connect errors: {[e for r in ready for e in r['errors']][:2]}")
            if subscribed < n:
                self.log(f"  connect errors: {[e for r in ready for e in r['errors']][:3]}")
            out = self.tmp / f"emits-{label}.pickle"
            publisher = Child(publisher_entry, (self.load_cpus, {
                "redis_url": self.redis_url, "project": project, "dep_id": dep_id,
                "rate": rate, "duration": duration, "out": str(out),
            }), "publisher")
            publisher.recv(30, "ready")
            time.sleep(args.settle)
            self.meter.wait_quiet(args.quiet_wait, args.quiet_threshold, self.log)
            rss_before = proc_mem_kb(server.pid)["VmRSS"]
            sampler.reset()
            if args.profile and kind == "deployhub":
                profiler = self.start_profiler(server.pid, label, duration + 2)
            hwm_reset = reset_hwm(server.pid)
            cpu0 = proc_cpu_seconds(server.pid)
            split0 = proc_cpu_split(server.pid)
            redis_cpu0 = proc_cpu_seconds(self.redis.pid) if self.redis else 0.0
            cores0 = core_times()
            load0 = self.meter.snapshot()
            t_go = time.time() + 0.3
            publisher.send("go", t_go)
            for c in clients:
                c.send("go", t_go)
            pub = publisher.recv(duration + 90, "done")
            t_pub_end = time.time()
            deadline = t_pub_end + drain
            for c in clients:
                c.send("wait", deadline)
            summaries = recv_all(clients, drain + 60, "summary")
            t_end = time.time()
            cpu1 = proc_cpu_seconds(server.pid)
            split1 = proc_cpu_split(server.pid)
            redis_cpu1 = proc_cpu_seconds(self.redis.pid) if self.redis else 0.0
            cores1 = core_times()
            load1 = self.meter.snapshot()
            mem = proc_mem_kb(server.pid)
            sampler.stop()
            if profiler is not None:
                self.stop_profiler(profiler)
                profiler = None
            for c in clients:
                c.send("stats", str(out))
            hists = recv_all(clients, 600, "stats")
        finally:
            sampler.stop()
            if profiler is not None:
                self.stop_profiler(profiler)
            close_clients(clients)
            if publisher is not None:
                publisher.stop()
            alive = server.alive()
            server.stop()
        total = {k: sum(s[k] for s in summaries) for k in (
            "watchers", "subscribed", "closed_early", "complete", "accepted", "received", "lost",
            "dups", "gaps", "bad_frames", "resyncs", "status_frames", "full_checked", "skipped", "late",
            "full_errors", "msgs", "bytes", "cpu_s")}
        last_at = max(s["last_at"] for s in summaries)
        window = max(1e-9, (last_at if last_at else t_end) - t_go)
        e2e: Counter[int] = Counter()
        fan: Counter[int] = Counter()
        text: Counter[int] = Counter()
        for h in hists:
            e2e.update(h["e2e"])
            fan.update(h["fanout"])
            text.update(h["text"])
        result = {
            "system": kind,
            "watchers": n,
            "rate": rate,
            "duration_s": duration,
            "offered_lines_per_s": n * rate,
            "expected_per_watcher": expected,
            "subscribed": total["subscribed"],
            "connect_s": round(connect_s, 1),
            "connect_retries": retries,
            "delivered_lines": total["accepted"],
            "delivered_lines_per_s": round(total["accepted"] / window),
            "delivery_window_s": round(window, 2),
            "drain_used_s": round(max(0.0, (last_at or t_end) - t_pub_end), 2),
            "lost_lines": total["lost"],
            "lost_pct": round(100.0 * total["lost"] / max(1, n * expected), 2),
            "lost_skipped_lines": total["skipped"],
            "lost_late_lines": total["late"],
            "duplicate_or_reordered_lines": total["dups"],
            "gap_frames": total["gaps"],
            "bad_frames": total["bad_frames"],
            "watchers_complete": total["complete"],
            "closed_early": total["closed_early"],
            "resyncs": total["resyncs"],
            "status_frames": total["status_frames"],
            "full_checked_watchers": total["full_checked"],
            "full_check_errors": total["full_errors"],
            "latency_ms": percentiles(e2e),
            "fanout_latency_ms": percentiles(fan),
            "text_timestamp_latency_ms": percentiles(text),
            "ws_messages": total["msgs"],
            "ws_mbytes": round(total["bytes"] / 1e6, 1),
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "server_user_s": round(split1[0] - split0[0], 2),
            "server_sys_s": round(split1[1] - split0[1], 2),
            "server_cpu_us_per_line": round(1e6 * (cpu1 - cpu0) / max(1, total["accepted"]), 2),
            "server_cpu_pct_of_window": round(100.0 * (cpu1 - cpu0) / max(1e-9, t_end - t_go), 1),
            "measure_window_s": round(t_end - t_go, 2),
            "server_rss_before_mb": round(rss_before / 1024, 1),
            "server_peak_rss_mb": round((mem.get("VmHWM", 0) if hwm_reset else sampler.max_rss_kb) / 1024, 1),
            "server_peak_rss_sampled_mb": round(sampler.max_rss_kb / 1024, 1),
            "server_peak_rss_source": "VmHWM (reset at window start)" if hwm_reset else "sampled VmRSS",
            "server_alive_at_end": alive,
            "core_busy_pct": core_busy(cores0, cores1),
            "other_load_cores": round(LoadMeter.other_cores(load0, load1), 2),
            "client_cpu_s": total["cpu_s"],
            "redis_cpu_s": round(redis_cpu1 - redis_cpu0, 2),
            "client_procs": len(clients),
            "publisher": pub,
            "errors": [e for s in summaries for e in s["errors"]][:5],
        }
        lat = result["latency_ms"]
        self.log(
            f"{kind}: delivered {result['delivered_lines_per_s']:,} lines/s of "
            f"{n * rate:,} offered, lost {result['lost_lines']:,}, dup {result['duplicate_or_reordered_lines']}, "
            f"p50/p99/max {lat['p50']}/{lat['p99']}/{lat['max']} ms, server CPU "
            f"{result['server_cpu_s']} s, peak RSS {result['server_peak_rss_mb']} MB, "
            f"client core {max((v['busy'] for k, v in result['core_busy_pct'].items() if k != 'cpu0'), default=0)}%, "
            f"other processes {result['other_load_cores']} cores"
        )
        return result

    def fanout_clean(self, kind: str, n: int, rate: int) -> dict[str, Any]:
        """Run a configuration; again (up to --retries) if other processes loaded the machine."""
        best: dict[str, Any] | None = None
        attempts = 1 + max(0, self.args.retries)
        for attempt in range(1, attempts + 1):
            result = self.fanout(kind, n, rate)
            result["attempt"] = attempt
            if best is None or result["other_load_cores"] < best["other_load_cores"]:
                best = result
            if result["other_load_cores"] <= self.args.max_other:
                break
            if attempt < attempts:
                self.log(f"  other processes used {result['other_load_cores']} cores during the "
                         f"window (> {self.args.max_other}); running it again")
        assert best is not None
        best["contaminated"] = best["other_load_cores"] > self.args.max_other
        return best

    # -- idle connections -------------------------------------------------------------

    def idle(self, kind: str, n: int) -> dict[str, Any]:
        self.log(f"--- {kind}: memory of {n} idle subscribed connections")
        label = f"{'dh' if kind == 'deployhub' else 'naive'}-idle{n}"
        server, port, project, dep_id, sampler = self.new_run(kind, label)
        url = f"ws://{HOST}:{port}/api/ws"
        warm: list[Child] = []
        clients: list[Child] = []
        try:
            warm = self.start_clients(1, url, project, 10**9)
            recv_all(warm, 60, "ready")
            time.sleep(1.5)
            rss0 = proc_mem_kb(server.pid)["VmRSS"]
            redis_clients0 = self._redis_clients()
            t = time.monotonic()
            clients = self.start_clients(n, url, project, 10**9)
            ready = recv_all(clients, self.args.connect_timeout, "ready")
            connect_s = time.monotonic() - t
            subscribed = sum(r["subscribed"] for r in ready)
            retries = sum(r["connect_retries"] for r in ready)
            time.sleep(3)
            mem = proc_mem_kb(server.pid)
            redis_clients1 = self._redis_clients()
            still = sum(s["subscribed"] - s["closed_early"] for s in
                        (c.recv(30, "summary") for c in self._ask(clients, "summary")))
        finally:
            sampler.stop()
            close_clients(clients)
            close_clients(warm)
            server.stop()
        delta = mem["VmRSS"] - rss0
        result = {
            "system": kind,
            "connections": n,
            "subscribed": subscribed,
            "open_at_measure": still,
            "connect_s": round(connect_s, 1),
            "connect_retries": retries,
            "rss_before_mb": round(rss0 / 1024, 1),
            "rss_after_mb": round(mem["VmRSS"] / 1024, 1),
            "peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
            "kb_per_connection": round(delta / max(1, subscribed), 1),
            "server_redis_connections_added": redis_clients1 - redis_clients0,
            "errors": [e for r in ready for e in r["errors"]][:3],
        }
        self.log(
            f"{kind}: {subscribed}/{n} subscribed in {connect_s:.1f}s ({retries} retries); RSS {result['rss_before_mb']} -> "
            f"{result['rss_after_mb']} MB = {result['kb_per_connection']} KB per connection; "
            f"Redis connections +{result['server_redis_connections_added']}"
        )
        return result

    def storm(self, kind: str, n: int) -> dict[str, Any]:
        """n sockets connect and subscribe all at once, as after a server restart."""
        self.log(f"--- {kind}: connect storm of {n} sockets at once")
        label = f"{'dh' if kind == 'deployhub' else 'naive'}-storm{n}"
        server, port, project, _dep_id, sampler = self.new_run(kind, label)
        clients: list[Child] = []
        try:
            t = time.monotonic()
            clients = self.start_clients(n, f"ws://{HOST}:{port}/api/ws", project, 10**9, concurrency=n)
            ready = recv_all(clients, self.args.connect_timeout, "ready")
            elapsed = time.monotonic() - t
        finally:
            sampler.stop()
            close_clients(clients)
            server.stop()
        errors = [e for r in ready for e in r["errors"]]
        result = {
            "system": kind, "sockets": n,
            "subscribed": sum(r["subscribed"] for r in ready),
            "failed_attempts": sum(r["connect_retries"] for r in ready),
            "all_subscribed_s": round(elapsed, 1),
            "errors": errors[:3],
        }
        self.log(f"{kind}: {result['subscribed']}/{n} subscribed after {elapsed:.1f}s; "
                 f"{result['failed_attempts']} attempts failed and were retried with backoff")
        return result

    def finish(self, kind: str, n: int) -> dict[str, Any]:
        """n sockets watch a project whose deployment ends: every one must get the final status."""
        self.log(f"--- {kind}: a deployment ends while {n} sockets watch it")
        label = f"{'dh' if kind == 'deployhub' else 'naive'}-finish{n}"
        server, port, project, dep_id, sampler = self.new_run(kind, label)
        clients: list[Child] = []
        wait = self.args.finish_wait
        try:
            clients = self.start_clients(n, f"ws://{HOST}:{port}/api/ws", project, 10**9)
            ready = recv_all(clients, self.args.connect_timeout, "ready")
            subscribed = sum(r["subscribed"] for r in ready)
            time.sleep(1.0)
            log_offset = server.log_path.stat().st_size
            cpu0 = proc_cpu_seconds(server.pid)
            t0 = time.time()
            asyncio.run(_finish_deployment(self.redis_url, dep_id))
            time.sleep(wait)
            summaries = [c.recv(30, "summary") for c in self._ask(clients, "summary")]
            cpu1 = proc_cpu_seconds(server.pid)
            with open(server.log_path, "rb") as f:
                f.seek(log_offset)
                log_text = f.read().decode(errors="replace")
        finally:
            sampler.stop()
            close_clients(clients)
            server.stop()
        last_ctrl = max(s["last_ctrl_at"] for s in summaries)
        result = {
            "system": kind, "sockets": n, "subscribed": subscribed,
            "got_final_status": sum(s["status_watchers"] for s in summaries),
            "resync_messages": sum(s["resyncs"] for s in summaries),
            "sockets_resynced": sum(s["resync_watchers"] for s in summaries),
            "still_busy_after_s": round(last_ctrl - t0, 1) if last_ctrl else None,
            "observed_s": wait,
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "server_warnings": log_text.count(" WARNING "),
            "server_errors": log_text.count(" ERROR "),
            "too_many_connections": log_text.count("Too many connections"),
        }
        self.log(
            f"{kind}: {result['got_final_status']}/{subscribed} got the final status; "
            f"{result['resync_messages']:,} resync messages to {result['sockets_resynced']} sockets, "
            f"last control message {result['still_busy_after_s']} s after the end; server CPU "
            f"{result['server_cpu_s']} s in {wait:g} s, {result['too_many_connections']:,} "
            f"'Too many connections' in its log"
        )
        return result

    @staticmethod
    def _ask(children: list[Child], op: str) -> list[Child]:
        for c in children:
            c.send(op, None)
        return children

    def _redis_clients(self) -> int:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.info("clients")["connected_clients"]) - 1
        finally:
            client.close()

    # -- profiling --------------------------------------------------------------------

    def start_profiler(self, pid: int, label: str, seconds: float) -> subprocess.Popen[bytes] | None:
        exe = shutil.which("py-spy")
        if exe is None:
            self.log("py-spy not found (pip install py-spy); not profiling")
            return None
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"profile-{label}.txt"
        self.log(f"py-spy recording pid {pid} into {out}")
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
             "--duration", str(int(math.ceil(seconds))), "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        pin(proc.pid, self.load_cpus)
        return proc

    @staticmethod
    def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
        try:
            Bench._wait_profiler(proc)
        finally:
            out = Path(str(proc.args[-1]))  # type: ignore[index]
            if out.exists():
                from .profile_summary import summarise

                with contextlib.suppress(Exception):
                    out.with_suffix(".summary.txt").write_text(summarise(out) + "\n")

    @staticmethod
    def _wait_profiler(proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# ------------------------------------------------------------------------------ report


def fmt(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:,.1f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return text.rjust(width)


def render(report: dict[str, Any]) -> str:
    lines = []
    cols = [("system", 9), ("N", 6), ("rate", 6), ("offered/s", 11), ("delivered/s", 11),
            ("lost", 10), ("skip", 5), ("dup", 5), ("p50", 8), ("p99", 8), ("max", 8), ("fan p99", 8),
            ("srv CPU s", 9), ("CPU%", 6), ("us/line", 7), ("peak MB", 8), ("cli core%", 9), ("resync", 6),
            ("retry", 5), ("other", 5)]
    lines.append("Fan-out (latency = line emitted by LogPublisher -> received by the watcher, ms; "
                 "'fan p99' = Redis PUBLISH -> received)")
    lines.append(" ".join(name.rjust(w) for name, w in cols))
    for r in report["fanout"]:
        cores = r["core_busy_pct"]
        client_core = max((v["busy"] for k, v in cores.items() if k != "cpu0"), default=None)
        row = [
            "DeployHub" if r["system"] == "deployhub" else "naive", r["watchers"], r["rate"],
            r["offered_lines_per_s"], r["delivered_lines_per_s"], r["lost_lines"],
            r.get("lost_skipped_lines"), r["duplicate_or_reordered_lines"], r["latency_ms"]["p50"], r["latency_ms"]["p99"],
            r["latency_ms"]["max"], r["fanout_latency_ms"]["p99"], r["server_cpu_s"],
            r["server_cpu_pct_of_window"], r["server_cpu_us_per_line"], r["server_peak_rss_mb"], client_core, r["resyncs"],
            r["connect_retries"], r["other_load_cores"],
        ]
        lines.append(" ".join(fmt(v, w) for v, (_n, w) in zip(row, cols)))
    if report["ratios"]:
        lines.append("")
        lines.append("DeployHub / naive relay, same load")
        lines.append(f"{'N':>6} {'rate':>6} {'delivered x':>11} {'DH p99 ms':>10} {'naive p99 ms':>12} "
                     f"{'DH lost':>10} {'naive lost':>12}")
        for q in report["ratios"]:
            lines.append(
                f"{q['watchers']:>6,} {q['rate']:>6,} {fmt(q['delivered_ratio'], 11)} "
                f"{fmt(q['deployhub_p99_ms'], 10)} {fmt(q['naive_p99_ms'], 12)} "
                f"{fmt(q['deployhub_lost'], 10)} {fmt(q['naive_lost'], 12)}"
            )
    if report["idle"]:
        lines.append("")
        lines.append("Idle subscribed connections (server RSS delta / connections)")
        lines.append(f"{'system':>9} {'conns':>7} {'RSS before MB':>13} {'RSS after MB':>12} "
                     f"{'KB/conn':>8} {'Redis conns +':>13} {'connect s':>9}")
        for r in report["idle"]:
            lines.append(
                f"{'DeployHub' if r['system'] == 'deployhub' else 'naive':>9} {r['subscribed']:>7,} "
                f"{r['rss_before_mb']:>13.1f} {r['rss_after_mb']:>12.1f} {r['kb_per_connection']:>8.1f} "
                f"{r['server_redis_connections_added']:>13} {r['connect_s']:>9.1f}"
            )
    if report.get("storm"):
        lines.append("")
        lines.append("Connect storm (all sockets connect + subscribe at once; failures retried with web/live.js backoff)")
        lines.append(f"{'system':>9} {'sockets':>8} {'subscribed':>10} {'failed tries':>12} {'all in, s':>9}  first error")
        for r in report["storm"]:
            lines.append(
                f"{'DeployHub' if r['system'] == 'deployhub' else 'naive':>9} {r['sockets']:>8,} "
                f"{r['subscribed']:>10,} {r['failed_attempts']:>12,} {r['all_subscribed_s']:>9.1f}  "
                f"{(r['errors'] or [''])[0][:60]}"
            )
    if report.get("finish"):
        lines.append("")
        lines.append("A deployment ends (final status published) while sockets watch its project")
        lines.append(f"{'system':>9} {'sockets':>8} {'got status':>10} {'resync msgs':>11} "
                     f"{'busy for s':>10} {'srv CPU s':>9} {'Too many connections':>21}")
        for r in report["finish"]:
            lines.append(
                f"{'DeployHub':>9} {r['subscribed']:>8,} {r['got_final_status']:>10,} "
                f"{r['resync_messages']:>11,} {fmt(r['still_busy_after_s'], 10)} "
                f"{r['server_cpu_s']:>9.2f} {r['too_many_connections']:>21,}"
            )
    lines.append("")
    lines.append("Targets")
    for t in report["targets"]:
        lines.append(f"  [{t['status']:>4}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def judge(report: dict[str, Any]) -> list[dict[str, str]]:
    dh = [r for r in report["fanout"] if r["system"] == "deployhub"]
    out = []
    if dh:
        bad = [r for r in dh if r["lost_lines"] or r["duplicate_or_reordered_lines"] or r["bad_frames"]
               or r["full_check_errors"] or r["subscribed"] < r["watchers"]]
        never = [r for r in dh if r.get("lost_skipped_lines") or r["duplicate_or_reordered_lines"]
                 or r["bad_frames"] or r["full_check_errors"]]
        out.append({
            "target": "zero lines lost (and no duplicates / reordering) for DeployHub",
            "status": "MET" if not bad else "MISS",
            "detail": "all configurations clean" if not bad else "; ".join(
                f"N={r['watchers']} rate={r['rate']}: {r['lost_lines']:,} lines not received "
                f"by the end of the drain window "
                f"({r.get('lost_skipped_lines', 0):,} skipped, {r.get('lost_late_lines', 0):,} still "
                f"queued/late), dup {r['duplicate_or_reordered_lines']}, bad frames {r['bad_frames']}, "
                f"full-check errors {r['full_check_errors']}, subscribed {r['subscribed']}/{r['watchers']}"
                for r in bad) + ("" if never else
                                 "; no line was ever skipped, duplicated or reordered"),
        })
    match = [r for r in dh if r["watchers"] == 1000 and r["rate"] == 2000]
    if match:
        p99 = match[0]["latency_ms"]["p99"]
        out.append({
            "target": "p99 < 100 ms at 1,000 watchers x 2,000 lines/s",
            "status": "MET" if p99 is not None and p99 < 100 else "MISS",
            "detail": f"p99 {p99} ms (PUBLISH->receipt p99 {match[0]['fanout_latency_ms']['p99']} ms)",
        })
    else:
        out.append({"target": "p99 < 100 ms at 1,000 watchers x 2,000 lines/s", "status": "n/a",
                    "detail": "configuration not run"})
    ratios = [q for q in report["ratios"] if q["watchers"] == 1000]
    if ratios:
        ok = all(q["delivered_ratio"] is not None and q["delivered_ratio"] >= 5 for q in ratios)
        out.append({
            "target": ">= 5x the naive relay's delivered lines/s at 1,000 watchers",
            "status": "MET" if ok else "MISS",
            "detail": ", ".join(f"{q['rate']} lines/s: {q['delivered_ratio']}x" for q in ratios),
        })
    else:
        out.append({"target": ">= 5x the naive relay's delivered lines/s at 1,000 watchers",
                    "status": "n/a", "detail": "configuration not run"})
    return out


def ratios(fanout: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["system"], r["watchers"], r["rate"]): r for r in fanout}
    for (system, n, rate), dh in by.items():
        naive = by.get(("naive", n, rate))
        if system != "deployhub" or naive is None:
            continue
        out.append({
            "watchers": n, "rate": rate,
            "delivered_ratio": round(dh["delivered_lines_per_s"] / naive["delivered_lines_per_s"], 1)
            if naive["delivered_lines_per_s"] else None,
            "deployhub_delivered_per_s": dh["delivered_lines_per_s"],
            "naive_delivered_per_s": naive["delivered_lines_per_s"],
            "deployhub_p50_ms": dh["latency_ms"]["p50"], "naive_p50_ms": naive["latency_ms"]["p50"],
            "deployhub_p99_ms": dh["latency_ms"]["p99"], "naive_p99_ms": naive["latency_ms"]["p99"],
            "deployhub_lost": dh["lost_lines"], "naive_lost": naive["lost_lines"],
        })
    return out


# -------------------------------------------------------------------------------- main


def git_state() -> dict[str, Any]:
    """What was measured: the commit, and which files differed from it (others edit live)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "modified": [line[3:] for line in git("status", "--porcelain", "--", "deployhub", "worker").splitlines()],
    }


def parse_configs(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    if text.strip().lower() in ("", "none"):
        return out
    for part in text.split(","):
        n, _, rate = part.strip().lower().partition("x")
        out.append((int(n), int(rate)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.logs_fanout", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 2 min): 100x2000 and 1000x2000 for 3 s, 1,000 idle connections, "
                   "a storm of 300, no waiting for a quiet machine")
    p.add_argument("--configs", help="WATCHERSxRATE list, e.g. 100x2000,1000x10000 "
                   "(default 100x2000,100x10000,1000x2000,1000x10000)")
    p.add_argument("--duration", type=float, help="seconds of publishing per configuration (10; quick 3)")
    p.add_argument("--drain", type=float, help="max seconds to wait for stragglers after publishing (10; quick 3)")
    p.add_argument("--idle", type=int, help="idle connections for the memory test (10000; quick 1000; 0 skips)")
    p.add_argument("--storm", type=int,
                   help="sockets for the connect-storm test, all connecting at once (1000; quick 300; 0 skips)")
    p.add_argument("--finish", type=int,
                   help="sockets watching when a deployment ends (DeployHub only; 1000; quick 300; 0 skips)")
    p.add_argument("--finish-wait", type=float, help="seconds to watch after it ends (20; quick 8)")
    p.add_argument("--systems", default="deployhub,naive", help="deployhub,naive (default both)")
    p.add_argument("--idle-systems", default="deployhub,naive", help="systems for the idle test")
    p.add_argument("--client-procs", type=int, default=4, help="max watcher processes (4)")
    p.add_argument("--watchers-per-proc", type=int, default=250,
                   help="watchers per process before another process is added (250)")
    p.add_argument("--full-check", type=int, default=4,
                   help="watchers per run that parse every event and use the text timestamp (4)")
    p.add_argument("--connect-concurrency", type=int, default=16,
                   help="connects in flight per watcher process (16; the storm test uses all at once)")
    p.add_argument("--connect-attempts", type=int, default=8,
                   help="tries per watcher to connect+subscribe, with web/live.js's backoff (8)")
    p.add_argument("--connect-timeout", type=float, default=180.0)
    p.add_argument("--settle", type=float, default=1.0, help="pause between connecting and publishing (1 s)")
    p.add_argument("--compress", action="store_true",
                   help="watchers offer permessage-deflate, as browsers do (default off; "
                        "needs --client aiohttp)")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="watcher implementation: raw (a lean RFC 6455 protocol, default) or "
                        "aiohttp's client (a task wake-up per message: it saturates first)")
    p.add_argument("--clients", choices=("split", "shared"), default="split",
                   help="split: watchers on the load-generator core(s) only (default); shared: on "
                   "every core at nice 10, using whatever the server leaves")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin servers+Redis to CPU 0 and the load generators to the rest")
    p.add_argument("--profile", action="store_true",
                   help="py-spy record the DeployHub server in each configuration (bench/results/profile-*.txt)")
    p.add_argument("--quiet-wait", type=float,
                   help="max seconds to wait for other processes to go quiet before each run (60; quick 0)")
    p.add_argument("--quiet-threshold", type=float, default=0.1,
                   help="'quiet' = other processes use fewer cores than this (0.1)")
    p.add_argument("--max-other", type=float, default=0.25,
                   help="a run during which other processes used more cores than this is repeated (0.25)")
    p.add_argument("--retries", type=int, help="repeats of a contaminated run (1; quick 0)")
    p.add_argument("--max-seconds", type=float, help="hard limit for the whole run (2400; quick 170)")
    p.add_argument("--output", default=str(RESULTS_DIR / "latest.json"))
    p.add_argument("--keep-tmp", action="store_true", help="keep server logs in the temp directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compress and args.client != "aiohttp":
        build_parser().error("--compress needs --client aiohttp (the raw watcher speaks no deflate)")
    quick = args.quick
    args.configs = parse_configs(args.configs or ("100x2000,1000x2000" if quick else
                                                  "100x2000,100x10000,1000x2000,1000x10000"))
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.drain = args.drain if args.drain is not None else (3.0 if quick else 10.0)
    args.idle = args.idle if args.idle is not None else (1000 if quick else 10000)
    args.storm = args.storm if args.storm is not None else (300 if quick else 1000)
    args.finish = args.finish if args.finish is not None else (300 if quick else 1000)
    args.finish_wait = args.finish_wait or (8.0 if quick else 20.0)
    args.max_seconds = args.max_seconds or (170.0 if quick else 2400.0)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if quick else 60.0)
    args.retries = args.retries if args.retries is not None else (0 if quick else 1)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    idle_systems = [s.strip() for s in args.idle_systems.split(",") if s.strip()]
    for s in systems + idle_systems:
        if s not in ("deployhub", "naive"):
            raise SystemExit(f"unknown system {s!r}")
    nofile = raise_nofile()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the whole run exceeded --max-seconds={args.max_seconds:g}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.max_seconds))
    tmp = Path(tempfile.mkdtemp(prefix="logs-fanout-bench-"))
    started = time.time()
    bench = Bench(args, tmp)
    report: dict[str, Any] = {
        "meta": {
            "command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "bench.logs_fanout", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "mode": "quick" if quick else "full",
            "duration_s": args.duration, "drain_s": args.drain, "compress": args.compress,
            "client": args.client,
            "pinning": {"servers_and_redis": sorted(bench.server_cpus) if bench.server_cpus else None,
                        "load_generators": sorted(bench.load_cpus) if bench.load_cpus else None,
                        "watchers": args.clients},
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "nofile": nofile, "platform": platform.platform(),
        },
        "fanout": [], "ratios": [], "idle": [], "storm": [], "finish": [], "targets": [],
    }
    try:
        import aiohttp
        import redis

        report["meta"]["git"] = git_state()
        report["meta"]["aiohttp"] = aiohttp.__version__
        report["meta"]["redis_py"] = redis.__version__
        bench.log(f"logs fan-out benchmark ({report['meta']['mode']}); temp dir {tmp}; RLIMIT_NOFILE {nofile}")
        bench.start_redis()
        for n, rate in args.configs:
            for kind in systems:
                report["fanout"].append(bench.fanout_clean(kind, n, rate))
        if args.idle:
            for kind in idle_systems:
                report["idle"].append(bench.idle(kind, args.idle))
        if args.storm:
            for kind in idle_systems:
                report["storm"].append(bench.storm(kind, args.storm))
        if args.finish and "deployhub" in systems + idle_systems:
            report["finish"].append(bench.finish("deployhub", args.finish))
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}); cleaning up", file=sys.stderr, flush=True)
        report["meta"]["interrupted"] = str(exc) or "Ctrl-C"
    except Exception as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr, flush=True)
        report["meta"]["failed"] = str(exc)
    finally:
        signal.alarm(0)
        for child in list(Child.live):
            child.stop()
        for proc in list(Managed.live):
            proc.stop()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report["meta"]["elapsed_s"] = round(time.time() - started, 1)
    report["ratios"] = ratios(report["fanout"])
    report["targets"] = judge(report)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(render(report))
    print(f"\nJSON: {out}  (elapsed {report['meta']['elapsed_s']} s)")
    return 1 if ("failed" in report["meta"] or "interrupted" in report["meta"]) else 0


if __name__ == "__main__":
    sys.exit(main())
