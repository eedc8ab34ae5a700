"""What the build's network path costs a real install: the Create React App's `npm ci`, straight
to the registry and through the egress proxy, with and without the disk watch's scans.

    python -m bench.egress_install [--runs 3]

No DeployHub server, no sandbox, no build: only what a build's install crosses on its way to
the registry, so the gap is not lost in the rest of a deploy's spread. Each round runs, after
a page-cache drop and with an empty npm cache each time (bench/time_to_ready.py's `settle`):

- `direct`: `npm ci` against bench/registry_mirror.py on 127.0.0.1;
- `proxy`: the same through an EgressProxy in this process, listening on 127.0.0.1 (the
  host's here, the namespace's in a build: worker/netns.py) and named by the variables a
  build gets (`proxy_env`), as a sandboxed build reaches a plain-HTTP registry;
- `proxy+du`: as `proxy`, with the worker's DiskWatch over the install's tree and its npm
  cache in the same event loop, as during a build (worker/sandbox.py), scanning with `du`;
- `proxy+walk`: the same watch scanning with the Python walk (`disk.usage`) in a thread,
  as the worker did before 97faabe.

Printed per run: wall seconds, this process's CPU (the proxy and the watch) and its
children's (npm and `du`), and the scans made. The mirror must be reachable by this
machine's name (bench/time_to_ready.py's `mirror_host`), since 127.0.0.1 goes straight past
the proxy (NO_PROXY).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from unittest import mock

from bench.time_to_ready import CRA_APP, mirror_host, mirror_stats, npmrc, registry_mirror, settle
from worker import disk
from worker.egress import EgressProxy, proxy_env

KINDS = ("direct", "proxy", "proxy+du", "proxy+walk")
NO_LIMIT = 1 << 50  # the watch measures; it never stops the install


async def _walk_in_thread(paths: Sequence[Path]) -> int:
    return await asyncio.to_thread(disk.usage, paths)


async def one_install(template: Path, root: Path, kind: str, host: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"dh-egress-{kind}-", dir=root))
    shutil.copytree(template, work / "app")
    cache = work / "npm-cache"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(npm_config_cache=str(cache), CI="1")
    argv = ["npm", "ci", "--no-audit", "--no-fund"]
    proxy: EgressProxy | None = None
    watch: disk.DiskWatch | None = None
    watching: asyncio.Task[None] | None = None
    scan: Callable[[Sequence[Path]], Awaitable[int]] = _walk_in_thread if kind == "proxy+walk" else disk.tree_usage
    try:
        if kind != "direct":
            proxy = EgressProxy(lambda stream, text: print(f"  proxy {stream}: {text}"), allow_hosts=[host])
            listener = socket.create_server(("127.0.0.1", 0), backlog=256)
            listener.setblocking(False)
            await proxy.start_socket(listener)
            env.update(proxy_env(listener.getsockname()[1]))
        settle()
        with mock.patch.object(disk, "tree_usage", scan):
            if kind in ("proxy+du", "proxy+walk"):
                watch = disk.DiskWatch([work / "app"], [cache], NO_LIMIT)
                await watch.baseline()
            self_before = resource.getrusage(resource.RUSAGE_SELF)
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.monotonic()
            if watch is not None:
                watching = asyncio.create_task(watch.run())
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=work / "app", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            if await proc.wait() != 0:
                raise RuntimeError(f"{kind}: npm ci exited {proc.returncode}")
            seconds = time.monotonic() - started
            if watching is not None:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
            self_after = resource.getrusage(resource.RUSAGE_SELF)
            children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "wall": seconds,
            "self CPU": (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime),
            "children CPU": ((children_after.ru_utime + children_after.ru_stime)
                             - (children_before.ru_utime + children_before.ru_stime)),
            "scans": float(watch.scans if watch is not None else 0),
        }
    finally:
        if watching is not None and not watching.done():
            watching.cancel()
        if proxy is not None:
            await proxy.close()
        shutil.rmtree(work, ignore_errors=True)


async def run(runs: int, port: int) -> None:
    host = mirror_host()
    root = Path(tempfile.mkdtemp(prefix="dh-egress-install-"))
    try:
        template = root / "template"
        shutil.copytree(CRA_APP, template, ignore=shutil.ignore_patterns("node_modules", "build"))
        (template / ".npmrc").write_text(npmrc(host, port))
        print("priming the mirror:", f"{(await one_install(template, root, 'direct', host))['wall']:.1f} s", flush=True)
        primed = mirror_stats(port)
        results: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for number in range(runs):
            order = KINDS if number % 2 == 0 else tuple(reversed(KINDS))  # no kind always right after a drop of the last
            for kind in order:
                figures = await one_install(template, root, kind, host)
                results[kind].append(figures)
                print(f"run {number + 1} {kind:11} wall {figures['wall']:6.2f} s, self CPU {figures['self CPU']:5.2f} s, "
                      f"children CPU {figures['children CPU']:6.2f} s, scans {figures['scans']:.0f}", flush=True)
        now = mirror_stats(port)
        print(f"\nregistry mirror while measured: {now['fetched'] - primed['fetched']} requests fetched upstream")
        direct = results["direct"]
        print(f"\n{'':12}{'wall s':>8}{'self CPU':>10}{'children':>10}   pairs against direct (wall)")
        for kind in KINDS:
            runs_of = results[kind]
            pairs = [r["wall"] - d["wall"] for r, d in zip(runs_of, direct)]
            print(f"{kind:12}{statistics.median(r['wall'] for r in runs_of):>8.2f}"
                  f"{statistics.median(r['self CPU'] for r in runs_of):>10.2f}"
                  f"{statistics.median(r['children CPU'] for r in runs_of):>10.2f}   "
                  + ("" if kind == "direct" else ", ".join(f"{p:+.2f}" for p in pairs)
                     + f" (median {statistics.median(pairs):+.2f})"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with registry_mirror() as port:
        asyncio.run(run(args.runs, port))


if __name__ == "__main__":
    main()
