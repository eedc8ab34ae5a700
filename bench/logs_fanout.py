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
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.procs import HOST, RedisServer, pin, stop_all

from .clients import client_loop, clients_entry, close_clients
from .processes import (
    ROOT,
    Child,
    LoadMeter,
    Sampler,
    Server,
    core_busy,
    core_times,
    ephemeral_ports,
    proc_cpu_seconds,
    proc_cpu_split,
    proc_mem_kb,
    raise_nofile,
    recv_all,
    reset_hwm,
    start_redis,
    start_server,
)
from .publisher import publisher_entry
from .report import git_state, judge, percentiles, ratios, render

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


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

    from deployhub.status import Status
    from deployhub.store import Store

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        return await Store(redis).transition(dep_id, Status.FAILED, "bench: the build ended")
    finally:
        await redis.aclose()


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        cpus = sorted(os.sched_getaffinity(0))
        if args.workers > 1 and args.pin:
            # N server processes want N cores: on a small machine they share every core with
            # the watchers, which then run at nice 10 and use what the servers leave.
            self.server_cpus = self.load_cpus = None
            args.clients = "shared"
        elif args.pin and len(cpus) >= 2:
            self.server_cpus: set[int] | None = {cpus[0]}
            self.load_cpus: set[int] | None = set(cpus[1:])
        else:
            self.server_cpus = self.load_cpus = None
        # Watchers: on the load cores only ("split"), or on every core at nice 10 ("shared"),
        # where they soak up whatever the server and the publisher leave.
        self.client_cpus = set(cpus) if args.clients == "shared" else self.load_cpus
        # nice: the publisher (the "worker") must get its CPU first so the offered rate holds.
        self.client_nice = 10 if args.clients == "shared" else 5
        self.redis: RedisServer | None = None
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
            child = Child(clients_entry, (self.client_cpus, self.client_nice, self.args.client_loop),
                          f"clients-{i}")
            child.send({
                "url": url, "project": project, "count": count, "full": full[i],
                "expected": expected, "concurrency": concurrency or self.args.connect_concurrency,
                "compress": self.args.compress, "client": self.args.client, "attempts": self.args.connect_attempts,
                "token": self.token, "connect_deadline": max(5.0, self.args.connect_timeout - 15),
            })
            children.append(child)
        return children

    def new_run(self, kind: str, label: str) -> tuple[Server, int, str, str, Sampler]:
        """A fresh server, a new project with one queued deployment whose lease is kept alive
        (so DeployHub's reaper does not end it mid-run) and an RSS sampler."""
        self.runs += 1
        tag = f"{self.runs:02d}-{label}"
        server, port = start_server(kind, self.tmp, self.redis_url, self.server_cpus, tag,
                                    self.args.workers)
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
        workers = self.args.workers if kind == "deployhub" else 1
        label = f"{'dh' if kind == 'deployhub' else 'naive'}-n{n}-r{rate}-w{workers}"
        self.log(f"--- {kind} ({workers} process{'es' if workers > 1 else ''}): {n} watchers x "
                 f"{rate} lines/s for {duration:g}s")
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
            alive = server.running
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
            "workers": workers,
            "server_procs": mem["procs"],
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
            "client_cpu_us_per_line": round(1e6 * total["cpu_s"] / max(1, total["accepted"]), 2),
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
            f"{result['server_cpu_s']} s ({result['server_cpu_us_per_line']} us/line, "
            f"{result['server_procs']} processes), watchers' CPU {result['client_cpu_s']} s, "
            f"peak RSS {result['server_peak_rss_mb']} MB, "
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
            "server_procs": mem["procs"],
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
    p.add_argument("--workers", type=int, default=1,
                   help="DeployHub as `serve --workers N` (1): CPU and RSS are summed over the "
                   "supervisor and its N processes; with N > 1 nothing is pinned and the watchers "
                   "share every core at nice 10 (--clients shared)")
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
    p.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="the watchers' event loop: uvloop (default, when installed; else asyncio) "
                   "or asyncio's own (about twice the watchers' CPU per line)")
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
    most = max([n for n, _ in args.configs] + [args.idle, args.storm, args.finish])
    if nofile < most + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile} (hard limit included): {most:,} sockets need "
                         f"at least {most + 256:,}; raise it with `ulimit -Hn` as root")
    if most > ephemeral_ports() * 0.9:
        raise SystemExit(f"{most:,} connections from 127.0.0.1 to one port need more than the "
                         f"{ephemeral_ports():,} ephemeral ports of net.ipv4.ip_local_port_range")

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
            "client": args.client, "client_loop": client_loop(args.client_loop),
            "pinning": {"servers_and_redis": sorted(bench.server_cpus) if bench.server_cpus else None,
                        "load_generators": sorted(bench.load_cpus) if bench.load_cpus else None,
                        "watchers": args.clients},
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "nofile": nofile, "ephemeral_ports": ephemeral_ports(), "workers": args.workers,
            "platform": platform.platform(),
        },
        "fanout": [], "ratios": [], "idle": [], "storm": [], "finish": [], "targets": [],
    }
    try:
        import aiohttp
        import redis

        report["meta"]["git"] = git_state(ROOT)
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
        stop_all()
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
