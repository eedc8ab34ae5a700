"""`deployhub serve --workers N`: N server processes on one port (SO_REUSEPORT), one Redis.

The supervisor starts the embedded Redis (when no DEPLOYHUB_REDIS_URL is set) so all the
processes share it, prints the first login link once, then runs the processes and restarts
one that dies. The kernel spreads new connections over the processes; a log line published
once reaches the watchers of every process, as it does across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from .auth import Tokens
from .embedded_redis import embedded_redis
from .redis_client import connect_redis
from .settings import Secret, Settings

log = logging.getLogger(__name__)

STOP_GRACE = 30.0  # seconds the processes get to finish their requests and builds' records
RESTART_DELAY = 1.0
MAX_RESTARTS_PER_MINUTE = 5  # past it something is wrong with every start: give up


async def supervise(settings: Settings) -> int:
    """Run `settings.workers` server processes until SIGINT/SIGTERM; the exit code."""
    async with contextlib.AsyncExitStack() as stack:
        url = settings.redis_url
        if url is None:
            url = await stack.enter_async_context(embedded_redis(settings.data_dir))
        redis = await connect_redis(url.reveal(), max_connections=2)
        try:
            await first_login(Tokens(redis), settings)
        finally:
            await redis.aclose()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        procs = {i: await _spawn(settings, url, i) for i in range(settings.workers)}
        restarts: list[float] = []
        code = 0
        while not stop.is_set():
            waits = {asyncio.ensure_future(p.wait()): i for i, p in procs.items()}
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({*waits, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for fut in {*waits, stopping} - done:
                fut.cancel()
            for fut in done & set(waits):
                index = waits[fut]
                log.error("server process %d exited with code %s", index, procs[index].returncode)
                restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
                if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                    log.error("server processes keep dying; stopping")
                    stop.set()
                    code = 1
                    break
                await asyncio.sleep(RESTART_DELAY)
                procs[index] = await _spawn(settings, url, index)
        await _stop_all(list(procs.values()))
        return code


async def _spawn(settings: Settings, url: Secret, index: int) -> asyncio.subprocess.Process:
    # Everything through the environment, the Redis password included (never argv).
    env = {**os.environ, **settings.to_env(), "DEPLOYHUB_REDIS_URL": url.reveal(),
           "DEPLOYHUB_WORKERS": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployhub", "serve", "--instance", str(index),
        stdin=asyncio.subprocess.DEVNULL, env=env,
    )


async def _stop_all(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_GRACE)
    except TimeoutError:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.gather(*(p.wait() for p in procs))


async def first_login(tokens: Tokens, settings: Settings) -> None:
    """With no token yet, make one and print a login link (as Jupyter does)."""
    if await tokens.count():
        return
    _, secret = await tokens.create("first login")
    base = f"http://{settings.host}:{settings.port}/"
    print(
        f"\nNo API token existed, so one was made. Open this link to sign in (it is shown once):\n"
        f"    {base}#token={secret}\n"
        f"Use the same token with `deployhub deploy --token` or DEPLOYHUB_TOKEN.\n",
        flush=True,
    )
