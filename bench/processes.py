"""The benchmark's processes: servers, Redis, multiprocessing children, and what they use.

Starting and stopping them (pinned to CPUs, dying with the parent), reading their CPU
and memory from /proc, the load other processes put on the machine (LoadMeter) and the
thread that samples the server's RSS and keeps the deployment's lease alive (Sampler).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
