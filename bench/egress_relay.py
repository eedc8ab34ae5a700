"""What the build's egress proxy costs per plain-HTTP request.

    python -m bench.egress_relay [--requests 2580] [--size 40000] [--connections 15] [--profile]

N keep-alive GETs of SIZE bytes from an aiohttp server on 127.0.0.1, over CONNECTIONS client
connections (npm keeps about 15), first straight to the server (the baseline), then through
worker.egress.EgressProxy on a Unix socket, as a build's install reaches a plain-HTTP
registry. Everything runs in this one process on one event loop, so the CPU time of each
run is the server's and the client's, plus the proxy's in the second: the difference is the
proxy's. `--profile` prints the proxy run's hottest functions (cProfile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import h11
from aiohttp import web

from worker.egress import EgressProxy


async def _get_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, targets: list[str],
                   host: str, size: int) -> None:
    conn = h11.Connection(h11.CLIENT)
    for target in targets:
        writer.write(conn.send(h11.Request(method="GET", target=target, headers=[("Host", host)])))
        writer.write(conn.send(h11.EndOfMessage()))
        got = 0
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Data):
                got += len(event.data)
        if got != size:
            raise AssertionError(f"{target}: {got} bytes, not {size}")
        conn.start_next_cycle()
    writer.close()


async def run(requests: int, size: int, connections: int, profile: bool) -> dict[str, float]:
    body = b"x" * size

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/{name:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    host = f"127.0.0.1:{port}"

    async def loopback(_host: str, _port: int) -> list[str]:
        return ["127.0.0.1"]

    proxy = EgressProxy(lambda _stream, _text: None, resolver=loopback, local=frozenset(),
                        allow_hosts=["127.0.0.1"])
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "proxy.sock"
        await proxy.start(path)
        per = max(1, requests // connections)
        for via in ("direct", "proxy"):
            prefix = f"http://{host}" if via == "proxy" else ""
            profiler = cProfile.Profile() if profile and via == "proxy" else None
            wall, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            opened = [await (asyncio.open_unix_connection(path) if via == "proxy"
                             else asyncio.open_connection("127.0.0.1", port))
                      for _ in range(connections)]
            await asyncio.gather(*(_get_all(r, w, [f"{prefix}/pkg{c}-{i}" for i in range(per)], host, size)
                                   for c, (r, w) in enumerate(opened)))
            if profiler:
                profiler.disable()
            figures[f"{via} wall"] = time.perf_counter() - wall
            figures[f"{via} cpu"] = time.process_time() - cpu
            if profiler:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        await proxy.close()
    await runner.cleanup()
    figures["requests"] = per * connections
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2580, help="a CRA `npm ci` makes about 2,580")
    parser.add_argument("--size", type=int, default=40_000, help="bytes per response")
    parser.add_argument("--connections", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    figures = asyncio.run(run(args.requests, args.size, args.connections, args.profile))
    count = int(figures["requests"])
    extra = figures["proxy cpu"] - figures["direct cpu"]
    print(f"{count} requests of {args.size} B over {args.connections} connections")
    print(f"  direct: wall {figures['direct wall']:.2f} s, CPU {figures['direct cpu']:.2f} s (server and client)")
    print(f"  proxy:  wall {figures['proxy wall']:.2f} s, CPU {figures['proxy cpu']:.2f} s (server, client and proxy)")
    print(f"  the proxy's CPU: {extra:.2f} s, {extra / count * 1000:.3f} ms per request")


if __name__ == "__main__":
    main()
