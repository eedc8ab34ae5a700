"""How fast DeployHub serves a site, against a bare aiohttp handler and nginx, on loopback.

    PYTHONPATH=$PWD python -m bench.sites [--quick] [--duration S] [--connections N]
        [--rounds N] [--servers a,b] [--workloads TEXT] [--profile DIR]

One command: installs nginx and wrk with apt-get when they are missing, starts Redis and
SeaweedFS, publishes one site (through the worker's real upload) to file storage and to S3,
then runs wrk against six servers, each pinned to the first CPU with wrk on the second:

  deployhub-file          DeployHub from file storage, on the loop `serve` picks (uvloop
                          when installed)
  deployhub-s3            DeployHub from S3 (SeaweedFS), likewise
  deployhub-file-asyncio  DeployHub from file storage on the standard library's loop
  aiohttp-bare            an aiohttp handler answering from a dict in memory, stock loop
  aiohttp-bare-uvloop     the same handler on uvloop
  nginx                   nginx serving the same files from disk (try_files, gzip_static)

Workloads: a small asset, a 150 KB JS bundle without and with `Accept-Encoding: br`, and
index.html through a client-side route. Each workload is measured on each server in turn,
twice by default (the best counts: the machine may be shared). Besides requests/s and p99,
each run reads the server's CPU time: CPU per response is what other load on the machine
disturbs least. Targets: DeployHub's small asset at least 80% of the bare handler's
requests/s on the same event loop (each server logs its loop) and at least 20% of nginx's;
and no S3 request after the first for each object (the S3 server's GETs are counted by
DeployHub's storage and logged at exit). nginx has no brotli module here: its `br` run gets
the uncompressed bundle (and so does the bare handler's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import git_state
from tests.support.procs import HOST, Managed, RedisServer, clean_env

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU, CLIENT_CPU = 0, 1
SITE_HOST = "bench.localhost"
SMALL = "/assets/favicon-3f9a1c2b.svg"
BUNDLE = "/assets/index-B4x_k9Zq.js"
ROUTE = "/dashboard/settings/profile"
SERVERS = ("deployhub-file", "deployhub-s3", "deployhub-file-asyncio", "aiohttp-bare",
           "aiohttp-bare-uvloop", "nginx")
BARE = {"asyncio": "aiohttp-bare", "uvloop": "aiohttp-bare-uvloop"}  # the baseline per loop
WORKLOADS = [
    ("small asset", SMALL, {}),
    ("150 KB bundle", BUNDLE, {}),
    ("150 KB bundle, br", BUNDLE, {"Accept-Encoding": "br"}),
    ("index.html via route", ROUTE, {}),
]


def ensure_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None
               and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def make_site(out: Path) -> None:
    """An index.html, a small SVG and a 150 KB bundle of JavaScript-like text."""
    rng = random.Random(7)
    words = ["const", "let", "return", "function", "props", "state", "useEffect", "render",
             "children", "className", "onClick", "value", "=>", "{", "}", "(", ")", ";"]
    lines = []
    size = 0
    while size < 150 * 1024:
        line = f"var _{rng.randrange(1 << 20):x} = " + " ".join(rng.choice(words) for _ in range(12))
        lines.append(line)
        size += len(line) + 1
    files = {
        "index.html": '<!doctype html><html><head><meta charset="utf-8"><title>bench</title>'
                      f'<link rel="icon" href="{SMALL}"><script type="module" src="{BUNDLE}">'
                      '</script></head><body><div id="root"></div></body></html>\n',
        SMALL.lstrip("/"): '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">'
                           + "".join(f'<circle cx="{i * 7 % 64}" cy="{i * 13 % 64}" r="3"/>'
                                     for i in range(12)) + "</svg>\n",
        BUNDLE.lstrip("/"): "\n".join(lines) + "\n",
    }
    for rel, text in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


async def publish(redis_url: str, data_dir: Path, src: Path, s3: dict[str, str]) -> str:
    """Upload the site to file storage and to S3 under one deployment, and make it production."""
    from aiobotocore.session import get_session
    from redis.asyncio import Redis

    from deployhub.collector import BlobLeases
    from deployhub.status import Status
    from deployhub.storage import FileStorage, S3Storage
    from deployhub.store import Store
    from worker.output import upload_site

    redis = Redis.from_url(redis_url, decode_responses=True)
    store = Store(redis)
    dep = await store.create_deployment("bench", "http://127.0.0.1/bench.git", "")
    quiet = lambda stream, text: None  # noqa: E731
    leases = BlobLeases(redis, 3600, dep.id)
    await upload_site(FileStorage(data_dir / "storage"), dep.id, src, src / "dist", quiet, leases=leases)
    session = get_session()
    async with session.create_client("s3", region_name=s3["region"], endpoint_url=s3["endpoint"],
                                     aws_access_key_id=s3["key"], aws_secret_access_key=s3["secret"]) as client:
        await upload_site(S3Storage(client, s3["bucket"]), dep.id, src, src / "dist", quiet, leases=leases)
    await store.transition(dep, Status.READY)
    await redis.aclose()
    return dep.id


# -- the servers ---------------------------------------------------------------------------


class HttpServer(Managed):
    """A server process pinned to SERVER_CPU, ready once it answers on its port."""

    def __init__(self, name: str, base: Path, command: list[str], env: dict[str, str] | None = None) -> None:
        from deployhub.embedded_redis import free_port

        self.name = name
        super().__init__(base, cpus={SERVER_CPU}, own_session=True, cwd=ROOT)
        self.port = free_port()
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.env = env

    def _command(self) -> list[str]:
        return self.command

    def _env(self) -> dict[str, str] | None:
        return self.env

    def _ready(self) -> bool:
        import socket

        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                return True
        except OSError:
            return False


def nginx_conf(base: Path, root: Path, port: int) -> Path:
    conf = base / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
master_process off;
pid {base}/nginx.pid;
error_log {base}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  include /etc/nginx/mime.types;
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  open_file_cache max=1000 inactive=60s;
  client_body_temp_path {base}/nginx-body;
  proxy_temp_path {base}/nginx-proxy;
  fastcgi_temp_path {base}/nginx-fastcgi;
  uwsgi_temp_path {base}/nginx-uwsgi;
  scgi_temp_path {base}/nginx-scgi;
  server {{
    listen {HOST}:{port};
    root {root};
    gzip_static on;
    location / {{ try_files $uri $uri/ /index.html; }}
  }}
}}
""")
    return conf


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop
    if kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    return loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def bare(port: int, root: str, loop_kind: str) -> None:
    """The bare aiohttp handler: every file in a dict, unknown paths get index.html."""
    import mimetypes

    from aiohttp import web

    files: dict[str, tuple[bytes, str]] = {}
    for path in Path(root).rglob("*"):
        if path.is_file():
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files["/" + path.relative_to(root).as_posix()] = (path.read_bytes(), kind)
    index = files["/index.html"]

    async def handler(request: web.Request) -> web.Response:
        body, kind = files.get(request.path, index)
        return web.Response(body=body, content_type=kind)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    loop = new_loop(loop_kind)
    print(f"event loop: {loop_name(loop)}", flush=True)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, loop=loop)


def deployhub(port: int) -> None:
    """DeployHub from DEPLOYHUB_* settings on the loop `serve` picks from them, without the
    per-request access log `serve` keeps."""
    import logging

    from aiohttp import web

    from deployhub import Settings, create_app

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = Settings.from_env(port=port)
    try:
        from deployhub.cli import new_event_loop
    except ImportError:  # a version from before the setting: it ran on the stock loop
        loop = asyncio.new_event_loop()
    else:
        loop = new_event_loop(settings)
    print(f"event loop: {loop_name(loop)}", flush=True)
    web.run_app(create_app(settings), host=HOST, port=port, access_log=None, print=None,
                loop=loop)


# -- measuring -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port: int, path: str, headers: dict[str, str], seconds: float, connections: int,
            pid: int) -> dict[str, float]:
    argv = ["taskset", "-c", str(CLIENT_CPU), "wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s",
            "--latency", "-H", f"Host: {SITE_HOST}"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    cpu = cpu_seconds(pid)
    out = subprocess.run([*argv, f"http://{HOST}:{port}{path}"], capture_output=True, text=True,
                         timeout=seconds + 30, check=True).stdout
    cpu = cpu_seconds(pid) - cpu
    done = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p99_ms": float(p99[1]) * scale[p99[2]] if p99 else float("nan"),
        "errors": float(errors[1]) if errors else 0.0,
        # Server CPU per response: what load on the machine disturbs least.
        "cpu_us": cpu * 1e6 / done if done else float("nan"),
    }


def check_responses(port: int) -> None:
    """Every server answers every workload with 200 before it is measured."""
    import urllib.request

    for _, path, headers in WORKLOADS:
        request = urllib.request.Request(f"http://{HOST}:{port}{path}",
                                         headers={"Host": SITE_HOST, **headers})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200, (port, path, response.status)
            response.read()


def storage_requests(log_path: Path) -> str:
    text = log_path.read_text(errors="replace")
    found = re.findall(r"storage requests: (\{.*\})", text)
    return found[-1] if found else "(not logged)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per run (about 3 minutes in all)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure every workload on every server this many times; best counts")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help=f"comma-separated subset of {','.join(SERVERS)} (default all)")
    parser.add_argument("--workloads", default="",
                        help="only the workloads whose label contains this (e.g. 'small')")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy record each Python server (on wrk's CPU) during its "
                             "small-asset runs into DIR/profile-<server>.txt, then summarise")
    sub = parser.add_subparsers(dest="role")
    for role in ("bare", "deployhub"):
        child = sub.add_parser(role)
        child.add_argument("--port", type=int, required=True)
        if role == "bare":
            child.add_argument("--root", required=True)
            child.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    if args.role == "bare":
        bare(args.port, args.root, args.loop)
        return 0
    if args.role == "deployhub":
        deployhub(args.port)
        return 0
    seconds = args.duration or (2.0 if args.quick else 10.0)
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; server and wrk share one", file=sys.stderr)
    ensure_tools()
    started = time.monotonic()
    from tests.support.infra import S3Server

    tmp = Path(tempfile.mkdtemp(prefix="dh-bench-sites-"))
    servers: list[Managed] = []
    try:
        src = tmp / "src"
        make_site(src / "dist")
        redis = RedisServer(tmp / "redis", persist=False, own_session=True)
        redis.start()
        servers.append(redis)
        s3 = S3Server()
        s3.start()
        servers.append(s3)
        bucket = s3.create_bucket("bench")
        s3_settings = {"region": s3.region, "endpoint": s3.endpoint_url, "key": s3.access_key,
                       "secret": s3.secret_key, "bucket": bucket}
        data_dir = tmp / "data"
        asyncio.run(publish(redis.url, data_dir, src, s3_settings))
        base_env = {**clean_env(), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                    "DEPLOYHUB_REDIS_URL": redis.url, "DEPLOYHUB_DATA_DIR": str(data_dir)}
        s3_env = {**base_env, **s3.aws_env(), "DEPLOYHUB_STORAGE": "s3", "DEPLOYHUB_S3_BUCKET": bucket,
                  "DEPLOYHUB_S3_ENDPOINT_URL": s3.endpoint_url, "DEPLOYHUB_S3_REGION": s3.region}
        py = [sys.executable, "-m", "bench.sites"]
        plan: list[tuple[str, list[str], dict[str, str] | None]] = [
            ("deployhub-file", [*py, "deployhub", "--port", "{port}"], base_env),
            ("deployhub-s3", [*py, "deployhub", "--port", "{port}"], s3_env),
            ("deployhub-file-asyncio", [*py, "deployhub", "--port", "{port}"],
             {**base_env, "DEPLOYHUB_EVENT_LOOP": "asyncio"}),
            ("aiohttp-bare", [*py, "bare", "--port", "{port}", "--root", str(src / "dist")], base_env),
            ("aiohttp-bare-uvloop", [*py, "bare", "--port", "{port}", "--root", str(src / "dist"),
                                     "--loop", "uvloop"], base_env),
            ("nginx", [], None),
        ]
        # All four run at once (idle ones cost nothing), and every workload is measured on
        # each in turn: load from others on the machine then falls on all of them alike.
        wanted = {name.strip() for name in args.servers.split(",") if name.strip()}
        if unknown := wanted - set(SERVERS):
            parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
        workloads = [w for w in WORKLOADS if args.workloads in w[0]]
        running: dict[str, HttpServer] = {}
        for name, command, env in plan:
            if name not in wanted:
                continue
            if name == "nginx":
                server = HttpServer(name, tmp, [])
                server.command = ["nginx", "-c", str(nginx_conf(tmp, src / "dist", server.port))]
            else:
                server = HttpServer(name, tmp, command, env)
            servers.append(server)
            server.start()
            check_responses(server.port)
            running[name] = server
        # check_responses read every object once: caches are warm.
        results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in running}
        for round_ in range(args.rounds):
            for label, path, headers in workloads:
                for name, server in running.items():
                    profiler = None
                    if args.profile and name != "nginx" and label == "small asset":
                        profiler = start_profiler(server.pid, args.profile / f"profile-{name}.txt",
                                                  seconds)
                    result = run_wrk(server.port, path, headers, seconds, args.connections,
                                     server.pid)
                    if profiler is not None:
                        stop_profiler(profiler)
                    least_cpu = min(result["cpu_us"], results[name].get(label, result)["cpu_us"])
                    best = results[name].get(label)
                    if best is None or result["rps"] > best["rps"]:
                        results[name][label] = result  # best of the rounds: least disturbed
                    results[name][label]["cpu_us"] = least_cpu
                    print(f"  round {round_ + 1} {label:22} {name:23} {result['rps']:>8.0f} req/s  "
                          f"p99 {result['p99_ms']:7.2f} ms  {result['cpu_us']:6.1f} us CPU/req",
                          flush=True)
        s3_log = "(not run)"
        if "deployhub-s3" in running:
            running["deployhub-s3"].stop()  # it logs its storage requests as it stops
            s3_log = storage_requests(running["deployhub-s3"].log_path)
        loops = {name: server_loop(server.log_path) for name, server in running.items()
                 if name != "nginx"}
        report(results, loops, workloads, s3_log, seconds, args.connections, args.rounds,
               time.monotonic() - started)
        return 0
    finally:
        for proc in reversed(servers):
            proc.cleanup() if isinstance(proc, S3Server) else proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def server_loop(log_path: Path) -> str:
    found = re.findall(r"event loop: (\w+)", log_path.read_text(errors="replace"))
    return found[0] if found else "?"


def report(results: dict[str, dict[str, dict[str, float]]], loops: dict[str, str],
           workloads: list[tuple[str, str, dict[str, str]]], s3_log: str, seconds: float,
           connections: int, rounds: int, elapsed: float) -> None:
    state = git_state(ROOT)
    modified = f" (modified: {', '.join(state['modified'])})" if state["modified"] else ""
    print(f"\nSites benchmark at {state['head']}{modified}; wrk -t1 -c{connections}, "
          f"{seconds:.0f} s per run, best of {rounds} rounds, servers on CPU {SERVER_CPU}, "
          f"wrk on CPU {CLIENT_CPU}; load average {os.getloadavg()[0]:.2f} at the end")
    print(f"{'server':24}{'loop':>8}" + "".join(f"{label:>28}" for label, _, _ in workloads))
    for name, rows in results.items():
        cells = "".join(f"{rows[label]['rps']:>10.0f}/s {rows[label]['p99_ms']:>7.2f} ms p99"
                        for label, _, _ in workloads)
        print(f"{name:24}{loops.get(name, '-'):>8}{cells}")
    print("\nServer CPU time per response, microseconds (least of the rounds):")
    print(f"{'server':32}" + "".join(f"{label:>28}" for label, _, _ in workloads))
    for name, rows in results.items():
        print(f"{name:32}" + "".join(f"{rows[label]['cpu_us']:>28.1f}" for label, _, _ in workloads))
    small = {n: r["small asset"]["rps"] for n, r in results.items() if "small asset" in r}
    print("\nTargets (small asset; the aiohttp baseline on the same loop as the DeployHub server):")
    for name in ("deployhub-file", "deployhub-s3", "deployhub-file-asyncio"):
        if name not in small:
            continue
        verdicts = []
        for other, target in ((BARE.get(loops[name], "?"), 0.8), ("nginx", 0.2)):
            if other in small:
                share = small[name] / small[other]
                verdicts.append(f"{share:.0%} of {other} (target {target:.0%}: "
                                f"{'PASS' if share >= target else 'FAIL'})")
        print(f"  {name} on {loops[name]}: {', '.join(verdicts) or 'nothing to compare with'}")
    if "deployhub-s3" in results:
        total = sum(r["rps"] * seconds for r in results["deployhub-s3"].values()) * rounds
        print(f"  deployhub-s3 storage requests over ~{total:,.0f} requests: {s3_log} "
              "(the manifest and each object read once: no S3 request after the first)")
    errors = {n: sum(r["errors"] for r in results[n].values()) for n in results}
    if any(errors.values()):
        print(f"  non-2xx responses: {errors}")
    print(f"({elapsed:.0f} s in all)")


def start_profiler(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy sampling `pid` for the length of one run, itself on wrk's CPU."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found (pip install py-spy); not profiling", file=sys.stderr)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["taskset", "-c", str(CLIENT_CPU), exe, "record", "--pid", str(pid), "--rate", "250",
         "--format", "raw", "--duration", str(max(1, int(seconds))), "-o", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    from bench.profile_summary import summarise

    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    out = Path(str(proc.args[-1]))  # type: ignore[index]
    if out.exists():
        out.with_suffix(".summary.txt").write_text(summarise(out, 40) + "\n")
        print(f"  profile: {out.with_suffix('.summary.txt')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
