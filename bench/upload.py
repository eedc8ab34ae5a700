"""Uploading a build's output to S3: DeployHub's upload path against one file at a time.

    PYTHONPATH=$PWD python -m bench.upload [--files 1000] [--latency-ms 0,20] [--rounds 1]

One command: starts SeaweedFS (S3) and Redis on 127.0.0.1, writes a build output of
`--files` files with the sizes of a real React build (mostly small JS, CSS and images, 2% of
100 KB - 1 MB), then, for each added latency, uploads it into a fresh bucket three ways:

  one-at-a-time   read each file and PutObject it, one after the other (what a simple
                  deploy script does; no variants, so it does less work than DeployHub)
  deployhub       worker.output.upload_site, exactly as the build worker runs it: hash
                  every file, lease the blobs, one ListObjectsV2 of what is stored,
                  concurrent PutObjects (multipart above 8 MiB), a first manifest (the
                  site is live: "live s"), then brotli/gzip variants of text assets in a
                  process per CPU and the manifest again ("all s")
  deployhub-serial the same path with one file at a time: the same work and requests, so
                  what concurrency alone buys

`--latency-ms 20` puts a proxy on loopback between the uploader and SeaweedFS that delays
every byte from the uploader by 20 ms (not its bandwidth): the round trip a PutObject to S3
takes from a build task in the same region, which on loopback is otherwise missing. Each
measurement runs `--rounds` times, the best counts (the machine may be shared);
`--skip-serial` leaves out deployhub-serial, the slowest. Prints
files/s, MB/s, wall time and the ratios; the figures also go to bench/results/upload.json.
A full run takes about 5 minutes (`--latency-ms 0` under one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import git_state
from tests.support.procs import HOST, RedisServer

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 10.0
UPLOADERS = ("one-at-a-time", "deployhub-serial", "deployhub")
WORDS = ["const", "let", "return", "function", "props", "state", "useEffect", "render",
         "children", "className", "onClick", "value", "=>", "{", "}", "(", ")", ";", "import",
         "export", "default", "null", "undefined", "true", "false", "await", "async"]


# -- the build output ------------------------------------------------------------------------


def _text(rng: random.Random, size: int, style: str) -> bytes:
    """Minified-looking JS or CSS: compresses about as well as the real thing."""
    parts: list[str] = []
    length = 0
    while length < size:
        if style == "css":
            part = f".c{rng.randrange(1 << 16):x}{{margin:{rng.randrange(40)}px;color:#{rng.randrange(1 << 24):06x}}}"
        else:
            part = f"var _{rng.randrange(1 << 20):x}=" + " ".join(rng.choice(WORDS) for _ in range(10)) + ";"
        parts.append(part)
        length += len(part)
    return "".join(parts).encode()[:size]


def _size(rng: random.Random, low: int, high: int) -> int:
    """Log-uniform between low and high bytes: many small files, a few larger."""
    return int(low * (high / low) ** rng.random())


def make_build(out: Path, count: int, seed: int = 7) -> int:
    """`count` files under `out`, shaped like a Vite build; returns their total bytes."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {
        "index.html": b'<!doctype html><html><head><meta charset="utf-8"><title>bench</title>'
                      b'<script type="module" src="/assets/index.js"></script></head>'
                      b'<body><div id="root"></div></body></html>\n',
    }
    large = max(1, count // 50)
    for i in range(large):  # 2%: vendor bundles, their source maps, hero images
        kind = ("js", "map", "jpg")[i % 3]
        size = _size(rng, 100 * 1024, 1024 * 1024)
        body = rng.randbytes(size) if kind == "jpg" else _text(rng, size, "js")
        files[f"assets/vendor-{i:03d}-{rng.randrange(1 << 32):08x}.{kind if kind != 'map' else 'js.map'}"] = body
    while len(files) < count:
        i = len(files)
        roll = rng.random()
        tag = f"{rng.randrange(1 << 32):08x}"
        if roll < 0.55:
            files[f"assets/chunk-{i:04d}-{tag}.js"] = _text(rng, _size(rng, 500, 40 * 1024), "js")
        elif roll < 0.70:
            files[f"assets/style-{i:04d}-{tag}.css"] = _text(rng, _size(rng, 300, 20 * 1024), "css")
        elif roll < 0.90:
            ext = rng.choice(["png", "webp", "svg"])
            size = _size(rng, 1024, 80 * 1024)
            body = _text(rng, size, "css") if ext == "svg" else rng.randbytes(size)
            files[f"assets/img/pic-{i:04d}-{tag}.{ext}"] = body
        else:
            ext = rng.choice(["json", "woff2", "txt", "ico"])
            size = _size(rng, 200, 30 * 1024)
            body = rng.randbytes(size) if ext in ("woff2", "ico") else _text(rng, size, "js")
            files[f"static/misc-{i:04d}-{tag}.{ext}"] = body
    total = 0
    for rel, body in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        total += len(body)
    return total


# -- a loopback proxy that adds latency ------------------------------------------------------


def _delay_proxy(listen: int, target: int, delay: float, ready: Any) -> None:
    """Forward TCP from `listen` to `target`; what the client sends arrives `delay` s later,
    at full bandwidth (each chunk is held until its own arrival time + delay)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(256 * 1024):
                queue.put_nowait((time.monotonic() + hold, data))
        except ConnectionError:
            pass
        queue.put_nowait((0.0, b""))
        try:
            await sender
        except ConnectionError:
            pass

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(HOST, target)
        await asyncio.gather(pipe(client_r, server_w, delay), pipe(server_r, client_w, 0.0))

    async def main() -> None:
        server = await asyncio.start_server(handle, HOST, listen)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the two uploads -------------------------------------------------------------------------


async def one_at_a_time(client: Any, bucket: str, out: Path) -> int:
    """Each file read and put in turn, with its Content-Type: a simple deploy script."""
    from worker.output import guess_type

    count = 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        await client.put_object(Bucket=bucket, Key=f"sites/plain/{rel}", Body=path.read_bytes(),
                                ContentType=guess_type(rel))
        count += 1
    return count


async def deployhub(
    client: Any, bucket: str, out: Path, redis_url: str, concurrency: int,
) -> tuple[int, dict[str, int], float]:
    """As the build worker uploads: the site is live (`on_stored`) before the compressed
    copies are made; returns the files, the requests and when (perf_counter) it was live."""
    from redis.asyncio import Redis

    from deployhub.collector import BlobLeases
    from deployhub.storage import S3Storage
    from worker.output import Uploaded, upload_site

    live: list[float] = []

    async def stored(_: Uploaded) -> None:
        live.append(time.perf_counter())

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        storage = S3Storage(client, bucket)
        dep_id = f"bench-{bucket}"
        uploaded = await upload_site(storage, dep_id, out.parent, out, lambda stream, text: None,
                                     leases=BlobLeases(redis, 3600, dep_id), concurrency=concurrency,
                                     on_stored=stored)
    finally:
        await redis.aclose()
    return uploaded.files, dict(storage.requests), live[0]


def variants_cpu(out: Path) -> float:
    """CPU seconds brotli (quality 11) and gzip variants of these files take, made in turn."""
    from deployhub import manifest
    from worker.output import guess_type
    from worker.variants import make_variants

    start = time.process_time()
    for path in out.rglob("*"):
        if path.is_file() and manifest.compressible(guess_type(path.name), path.stat().st_size):
            make_variants(path.read_bytes(), 11)
    return time.process_time() - start


async def measure(
    endpoint: str, s3: Any, out: Path, redis_url: str, rounds: int, uploaders: tuple[str, ...],
) -> dict[str, Any]:
    from aiobotocore.session import get_session

    from deployhub.storage import s3_config
    from worker.output import UPLOAD_CONCURRENCY

    kwargs = {**s3.client_kwargs(), "endpoint_url": endpoint}
    best: dict[str, dict[str, Any]] = {}
    async with get_session().create_client("s3", config=s3_config(), **kwargs) as client:
        for round_ in range(rounds):
            for name in uploaders:
                bucket = s3.create_bucket("upload")  # empty: nothing is stored already
                start = time.perf_counter()
                if name == "one-at-a-time":
                    files = await one_at_a_time(client, bucket, out)
                    requests = {"put": files}
                    live = wall = time.perf_counter() - start
                else:
                    concurrency = 1 if name == "deployhub-serial" else UPLOAD_CONCURRENCY
                    files, requests, live_at = await deployhub(client, bucket, out, redis_url, concurrency)
                    wall, live = time.perf_counter() - start, live_at - start
                s3.delete_bucket(bucket)
                print(f"  round {round_ + 1} {name:16} {files:>5} files live in {live:6.2f} s, "
                      f"all in {wall:6.2f} s", flush=True)
                if name not in best or live < best[name]["live_s"]:
                    best[name] = {"files": files, "live_s": round(live, 3), "wall_s": round(wall, 3),
                                  "requests": requests}
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="files in the build output")
    parser.add_argument("--latency-ms", default="0,20",
                        help="comma-separated latencies to add in front of S3 (0: none)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each upload; the best counts")
    parser.add_argument("--skip-serial", action="store_true",
                        help="leave out deployhub-serial (the slowest; a quicker run)")
    args = parser.parse_args(argv)
    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    uploaders = tuple(u for u in UPLOADERS if not (args.skip_serial and u == "deployhub-serial"))

    from deployhub.embedded_redis import free_port
    from tests.support.infra import S3Server

    base = Path(tempfile.mkdtemp(prefix="dh-bench-upload-"))
    out = base / "src" / "dist"
    total = make_build(out, args.files)
    mb = total / 1e6
    print(f"build output: {args.files} files, {mb:.1f} MB", flush=True)
    compress_s = variants_cpu(out)
    print(f"its brotli/gzip variants alone: {compress_s:.1f} s of CPU", flush=True)
    redis = RedisServer(base / "redis", persist=False)
    s3 = S3Server()
    results: list[dict[str, Any]] = []
    proxies: list[multiprocessing.Process] = []
    try:
        redis.start()
        s3.start()
        for latency in latencies:
            endpoint = s3.endpoint_url
            if latency:
                port = free_port()
                ready = multiprocessing.get_context("spawn").Event()
                proxy = multiprocessing.get_context("spawn").Process(
                    target=_delay_proxy, args=(port, s3.port, latency / 1000, ready), daemon=True)
                proxy.start()
                proxies.append(proxy)
                if not ready.wait(30):
                    raise RuntimeError("the latency proxy did not start")
                endpoint = f"http://{HOST}:{port}"
            print(f"added latency {latency:g} ms", flush=True)
            best = asyncio.run(measure(endpoint, s3, out, redis.url, args.rounds, uploaders))
            results.append({"latency_ms": latency, **best})
    finally:
        for proxy in proxies:
            proxy.terminate()
            proxy.join(5)
        s3.cleanup()
        redis.cleanup()

    print()
    load = os.getloadavg()
    print(f"Upload of {args.files} files ({mb:.1f} MB), best of {args.rounds}; DeployHub's "
          f"variants of them take {compress_s:.1f} s of CPU; load average {load[0]:.1f} "
          f"on {os.cpu_count()} CPUs (other processes slow the CPU-bound part)")
    print("live: until the site is served (DeployHub's first manifest); all: until the last "
          "request (DeployHub's compressed copies and second manifest)")
    print(f"{'latency':>8} {'uploader':>16} {'live s':>8} {'all s':>8} {'files/s':>9} {'MB/s':>7} "
          f"{'requests':>9} {'live vs one-at-a-time':>22} {'all vs':>7}")
    verdicts = []
    for r in results:
        base_wall = r["one-at-a-time"]["wall_s"]
        for name in uploaders:
            m = r[name]
            m["files_per_s"] = round(m["files"] / m["live_s"], 1)
            m["mb_per_s"] = round(mb / m["live_s"], 2)
            print(f"{r['latency_ms']:>6g}ms {name:>16} {m['live_s']:>8.2f} {m['wall_s']:>8.2f} "
                  f"{m['files_per_s']:>9,.0f} {m['mb_per_s']:>7.1f} {sum(m['requests'].values()):>9,} "
                  f"{base_wall / m['live_s']:>21.1f}x {base_wall / m['wall_s']:>6.1f}x")
        r["ratio"] = round(base_wall / r["deployhub"]["live_s"], 1)
        r["ratio_all"] = round(base_wall / r["deployhub"]["wall_s"], 1)
        if "deployhub-serial" in r:
            r["ratio_vs_own_serial"] = round(r["deployhub-serial"]["live_s"] / r["deployhub"]["live_s"], 1)
        verdicts.append((r["latency_ms"], r["ratio"], r["ratio_all"], r.get("ratio_vs_own_serial")))
    print()
    for latency, ratio, ratio_all, own in verdicts:
        status = "MET" if ratio >= TARGET_RATIO else "MISS"
        print(f"  [{status:>4}] >= {TARGET_RATIO:g}x one-at-a-time to a live site, {latency:g} ms added "
              f"latency: {ratio}x; {ratio_all}x with the compressed copies stored"
              + (f" ({own}x its own path run one file at a time)" if own else ""))
    report = {"load_average": load[0], "files": args.files, "bytes": total, "variants_cpu_s": round(compress_s, 2), "git": git_state(ROOT), "results": results}
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "upload.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
