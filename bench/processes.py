"""The benchmark's processes: servers, Redis, multiprocessing children, and what they use.

Starting and stopping them (pinned to CPUs, dying with the parent), reading their CPU
and memory from /proc, the load other processes put on the machine (LoadMeter) and the
thread that samples the server's RSS and keeps the deployment's lease alive (Sampler).
Launching, probing and stopping a server is tests/support/procs.py's, shared with the
tests. DeployHub is imported only inside functions: the spawned children import this
module (through bench.logs_fanout, their __mp_main__) and must not load the app.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.procs import HOST, Managed, RedisServer, clean_env, die_with_parent, pin

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_common(cpus: set[int] | None, nice: int = 0) -> None:
    """First thing in every multiprocessing child: die with the parent, no Ctrl-C noise."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    pin(0, cpus)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)


def tree(pid: int) -> list[int]:
    """`pid` and every process below it: `deployhub serve --workers N` is a supervisor and N
    server processes, and what the server uses is what all of them use."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for child, (ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds, all threads, summed over `pid` and its descendants."""
    user = system = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                raw = f.read()
        except OSError:  # it ended meanwhile
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def proc_cpu_seconds(pid: int) -> float:
    return sum(proc_cpu_split(pid))  # utime + stime


def proc_mem_kb(pid: int, pids: list[int] | None = None) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS), each summed over `pid` and its descendants (or `pids`,
    when the caller has them) -- the sum of per-process peaks, at least the peak of the sum
    -- and "procs", how many processes there were."""
    out = {"VmRSS": 0, "VmHWM": 0, "procs": 0}
    for p in tree(pid) if pids is None else pids:
        try:
            with open(f"/proc/{p}/status") as f:
                lines = f.readlines()
        except OSError:
            continue
        out["procs"] += 1
        for line in lines:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] += int(value.split()[0])
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of `pid` and its descendants to their current RSS."""
    try:
        for p in tree(pid):
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:`port` (/proc/net/tcp): one per --workers process."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:]
                   if line.split()[1] == want and line.split()[3] == "0A")


def ephemeral_ports() -> int:
    """How many source ports the kernel hands out: the limit of connections from one source
    address to one listening address."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return high - low + 1


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


# ------------------------------------------------------------------------ server processes


class Server(Managed):
    """DeployHub (`deployhub.cli serve`) or the naive relay, a fresh process per run."""

    start_timeout = 60.0
    stop_timeout = 10.0

    def __init__(self, kind: str, tag: str, tmp: Path, redis_url: str, cpus: set[int] | None,
                 workers: int = 1) -> None:
        from deployhub.embedded_redis import free_port

        self.name = f"{kind}-{tag}"  # its log: <tmp>/<kind>-<tag>.log
        # cwd: `python -m deployhub.cli` and `-m bench.naive_relay` must find this checkout.
        super().__init__(tmp, cpus=cpus, own_session=True, cwd=ROOT)
        self.kind = kind
        self.tag = tag
        self.redis_url = redis_url
        self.workers = workers if kind == "deployhub" else 1
        self.port = free_port()

    def _command(self) -> list[str]:
        if self.kind == "deployhub":
            return [sys.executable, "-m", "deployhub.cli", "serve", "--host", HOST, "--port", str(self.port),
                    "--redis-url", self.redis_url, "--data-dir", str(self.base_dir / f"dh-{self.tag}"),
                    "--workers", str(self.workers)]
        return [sys.executable, "-m", "bench.naive_relay", "--host", HOST, "--port", str(self.port),
                "--redis-url", self.redis_url]

    def _env(self) -> dict[str, str]:
        return {**clean_env(), "PYTHONUNBUFFERED": "1"}

    def _ready(self) -> bool:
        # Every process must listen before the watchers connect, or the first one gets them all.
        if self.workers > 1 and listeners(self.port) < self.workers:
            return False
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def start_redis(tmp: Path, cpus: set[int] | None) -> tuple[RedisServer, str]:
    """The benchmark's own Redis, without persistence, pinned with the servers."""
    server = RedisServer(tmp / "redis", persist=False, cpus=cpus, own_session=True)
    server.start()
    return server, server.url


def start_server(kind: str, tmp: Path, redis_url: str, cpus: set[int] | None, tag: str,
                 workers: int = 1) -> tuple[Server, int]:
    server = Server(kind, tag, tmp, redis_url, cpus, workers)
    server.start()
    return server, server.port


class Sampler(threading.Thread):
    """Samples the server's VmRSS (summed over its processes) every 50 ms and keeps the
    deployment's lease alive."""

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
        next_lease = next_tree = 0.0
        pids = [self.pid]
        try:
            while not self.stopping.is_set():
                if time.monotonic() >= next_tree:  # a walk of /proc: once a second is enough
                    pids = tree(self.pid)
                    next_tree = time.monotonic() + 1.0
                with contextlib.suppress(OSError, KeyError):
                    self.max_rss_kb = max(self.max_rss_kb, proc_mem_kb(self.pid, pids)["VmRSS"])
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
