"""A caching mirror of the npm registry on 127.0.0.1, so a benchmark's installs measure the
machine and DeployHub, not the registry's CDN that day.

    python -m bench.registry_mirror [--dir DIR] [--port N]

The first request for a path goes to https://registry.npmjs.org and is kept under DIR
(default `~/.cache/deployhub-bench/npm-mirror`); later ones are served from disk, with no
request upstream. A repository uses it through its `.npmrc` (`registry=http://127.0.0.1:N/`):
npm rewrites its lockfile's `resolved` URLs to the configured registry (its
`replace-registry-host` default). Prints `port N` once listening. GET /-/deployhub-bench/stats
says how many requests it served from disk and how many it fetched; so does SIGTERM.

Why: on this machine, a plain cold build of the Create React App fixture (`git clone && npm ci
&& npm run build`, an empty npm cache, the public registry) took from 37 to 76 s within one
hour, while the build step alone stayed within 7-12 s. A 2 s target cannot be seen in that.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

UPSTREAM = "https://registry.npmjs.org"
STATS = "/-/deployhub-bench/stats"  # {"from_disk": N, "fetched": N} so far
DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deployhub-bench" / "npm-mirror"


class Mirror:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits = 0
        self.fetched = 0
        self._inflight: dict[str, asyncio.Future[tuple[int, str]]] = {}
        self._client: aiohttp.ClientSession | None = None

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / digest

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"from_disk": self.hits, "fetched": self.fetched})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return web.Response(status=405, text="this mirror only reads\n")
        # A package document comes in two forms (the abbreviated one npm asks for, and the
        # whole); the tarballs are the same whatever the Accept header says.
        accept = "" if request.raw_path.endswith(".tgz") else request.headers.get("Accept", "")
        key = f"{request.raw_path}\n{accept}"
        path = self._path(key)
        if path.exists():
            self.hits += 1
        else:
            status, text = await self._fetch_once(key, request.raw_path, accept, path)
            if status != 200:
                return web.Response(status=status, text=text)
        kind = "application/octet-stream" if request.raw_path.endswith(".tgz") else "application/json"
        return web.FileResponse(path, headers={"Content-Type": kind})

    async def _fetch_once(self, key: str, raw_path: str, accept: str, path: Path) -> tuple[int, str]:
        if key not in self._inflight:
            self._inflight[key] = asyncio.ensure_future(self._fetch(raw_path, accept, path))
            self._inflight[key].add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(self._inflight[key])

    async def _fetch(self, raw_path: str, accept: str, path: Path) -> tuple[int, str]:
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        headers = {"Accept": accept} if accept else {}
        async with self._client.get(UPSTREAM + raw_path, headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                return response.status, body.decode("utf-8", "replace")[:500]
        self.fetched += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        os.replace(temp, path)  # whole or not at all, should the mirror be killed
        return 200, ""

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


async def serve(root: Path, port: int) -> None:
    mirror = Mirror(root)
    app = web.Application()
    app.router.add_get(STATS, mirror.stats)
    app.router.add_route("*", "/{tail:.*}", mirror.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"port {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"served {mirror.hits} from disk, fetched {mirror.fetched}", flush=True)
    await mirror.close()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.dir, args.port))


if __name__ == "__main__":
    main()
