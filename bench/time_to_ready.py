"""Time from POST to `ready` for the Vite fixture and a Create React App, with a cold and a
warm build cache, against a plain build of the same repository in the same run.

    python -m bench.time_to_ready [--runs N] [--only vite|cra] [--registry mirror|public]
                                  [--serve-arg=--build-network=host ...]

DeployHub: `deployhub serve` on its embedded defaults (bench/deploy_time.py's setup). Cold:
a new project (no node_modules to restore, empty package manager caches). Warm: the same
project deployed again, once the previous build has saved its cache. Baseline:
`git clone --depth 1 && npm ci && npm run build` from the same loopback git server, cold with
an empty npm cache, warm with the npm cache of the cold run before it. The four kinds of run
alternate within each round, so load from other work on the machine falls on all of them.

Page cache: before every measured run the bench writes dirty pages out and drops the
kernel's page, dentry and inode caches (root only; otherwise it says so once). On the machine
this was written on, the same `npm ci` took 26-30 s with 5-6 s of system time right after a
drop, and 41-46 s with 25-31 s of system time when it came straight after another install
(whose tree had just been deleted); which of the two a run got decided more than DeployHub
did.

Registry: by default every install, plain and DeployHub's, reads from bench/registry_mirror.py
on 127.0.0.1 (the repository's `.npmrc` names it by this machine's name, which must resolve
to 127.0.0.1; DeployHub's build reaches it through its proxy, as `DEPLOYHUB_BUILD_ALLOW_HOSTS`
allows). One unmeasured install first fills the mirror, and the figures say how many requests
went upstream after it (0 when the registry's speed is out of the figures). `--registry
public` measures against registry.npmjs.org instead, whose speed varied by a factor of two
here within an hour.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.registry_mirror import STATS
from bench.deploy_time import command_seconds, deployhub_build, loopback_deployhub, plain_build
from tests.support.infra import VITE_REACT_APP, unique_name
from tests.support.served import Served

CRA_APP = Path(__file__).resolve().parent / "fixtures" / "cra"
FIXTURES = {"vite": VITE_REACT_APP, "cra": CRA_APP}
KINDS = ("plain cold", "DeployHub cold", "DeployHub warm", "plain warm")


def wait_cache_saved(served: Served, project: str, timeout: float = 120) -> str:
    """The newest build's line about saving the cache, once it is there (after `ready`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in served.logs_of_newest(project):
            if event["text"].startswith(("Build cache: saved", "Build cache: not saved")):
                return str(event["text"])
        time.sleep(0.2)
    raise AssertionError(f"{project}: the cache was not saved within {timeout} s")


def restored_line(served: Served, project: str) -> str:
    return next((e["text"] for e in served.logs_of_newest(project)
                 if e["text"].startswith("Build cache: ")), "(no cache line)")


DROP_CACHES = Path("/proc/sys/vm/drop_caches")
_told = False


def settle() -> None:
    """Every run from the same start: dirty pages written, the page, dentry and inode caches
    dropped (see the module's docstring); said once where that is not allowed."""
    global _told
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        if not _told:
            _told = True
            print(f"  (caches not dropped before runs: {exc}; figures vary with the page cache's state)", flush=True)


def one_round(served: Served, url: str, root: Path, name: str) -> dict[str, float]:
    cache = root / f"plain-npm-{unique_name()}"
    cpu: dict[str, float] = {}
    steps: dict[str, float] = {}
    settle()
    times = {"plain cold": plain_build(url, cache, cpu, steps)}
    # Printed so a reader can tell the machine's noise (system time) from DeployHub's.
    print(f"  {name} plain cold: CPU user {cpu['user']:.1f} s, system {cpu['system']:.1f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()), flush=True)
    project = unique_name(name)
    cold: dict[str, float] = {}
    warm: dict[str, float] = {}
    settle()
    times["DeployHub cold"] = deployhub_build(served, url, project, cold)
    # The same commands' wall time inside DeployHub, to set beside the plain build's steps.
    print(f"  {name} DeployHub cold commands: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in command_seconds(served.logs_of_newest(project)).items()), flush=True)
    saved = wait_cache_saved(served, project)
    settle()
    times["DeployHub warm"] = deployhub_build(served, url, project, warm)
    for kind, phases in (("cold", cold), ("warm", warm)):
        print(f"  {name} {kind} phases: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(f"  {name}: {saved}\n  {name}: {restored_line(served, project)}", flush=True)
    wait_cache_saved(served, project)
    settle()
    times["plain warm"] = plain_build(url, cache)
    shutil.rmtree(cache, ignore_errors=True)
    return times


@contextlib.contextmanager
def registry_mirror() -> Iterator[int]:
    """bench/registry_mirror.py in a process of its own; yields its port and prints its
    counts when done."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.registry_mirror"], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the registry mirror did not start: {line!r}")
        yield int(line.split()[1])
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        print(f"registry mirror: {out.strip()}")


def mirror_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{STATS}", timeout=10) as response:
        return dict(json.load(response))


def mirror_host() -> str:
    """A name for the mirror that resolves to 127.0.0.1 only. Not 127.0.0.1 itself: in
    DeployHub's sandbox that is the build's own loopback, which NO_PROXY sends npm to directly
    (npm 11 ignores its `noproxy` setting where NO_PROXY is set). This machine's name, where
    /etc/hosts maps it to 127.0.0.1; Debian maps it to 127.0.1.1, and there the bench stops
    and says so."""
    name = socket.gethostname()
    try:
        found = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        found = set()
    if found != {"127.0.0.1"}:
        raise SystemExit(f"this machine's name {name!r} resolves to {sorted(found)}, not to 127.0.0.1 only, "
                         "so DeployHub's builds cannot be pointed at the mirror: use --registry public")
    return name


def npmrc(host: str, port: int) -> str:
    return f"registry=http://{host}:{port}/\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--only", choices=sorted(FIXTURES))
    parser.add_argument("--registry", choices=("mirror", "public"), default="mirror")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an argument for `deployhub serve`, e.g. --serve-arg=--build-network=host "
                             "(builds without the egress proxy) or --serve-arg=--sandbox=none")
    args = parser.parse_args()
    with registry_mirror() if args.registry == "mirror" else contextlib.nullcontext(0) as port:
        run(args, port)


def run(args: argparse.Namespace, port: int) -> None:
    results: dict[str, dict[str, list[float]]] = {}
    host = mirror_host() if port else ""
    serve_args = (("--build-allow-hosts", host) if port else ()) + tuple(args.serve_arg)
    with loopback_deployhub("dh-ttr-", *serve_args) as (root, git, served):
        extra = {".npmrc": npmrc(host, port)} if port else None
        urls = {name: git.add_repo(unique_name(name), files_dir=path, files=extra)
                for name, path in FIXTURES.items() if args.only in (None, name)}
        if port:
            for name, url in urls.items():  # fills the mirror; not measured
                seconds = plain_build(url, root / f"prime-{name}")
                print(f"  {name}: mirror primed by one plain build ({seconds:.1f} s)", flush=True)
            primed = mirror_stats(port)
        for number in range(args.runs):
            for name, url in urls.items():  # the fixtures alternate too
                times = one_round(served, url, root, name)
                print(f"run {number + 1} {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()),
                      flush=True)
                for kind, seconds in times.items():
                    results.setdefault(name, {}).setdefault(kind, []).append(seconds)
    if port:
        now = mirror_stats(port)
        print(f"\nregistry mirror while measured: {now['from_disk'] - primed['from_disk']} requests from "
              f"disk, {now['fetched'] - primed['fetched']} fetched upstream")
    print(f"\n{'':22}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, by_kind in results.items():
        for kind in KINDS:
            times = by_kind[kind]
            print(f"{name + ' ' + kind:22}{statistics.median(times):>10.2f}{min(times):>8.2f}{max(times):>8.2f}")
        median = {kind: statistics.median(t) for kind, t in by_kind.items()}
        print(f"{name} overhead over the plain build: cold {median['DeployHub cold'] - median['plain cold']:+.2f} s, "
              f"warm {median['DeployHub warm'] - median['plain warm']:+.2f} s; warm/cold "
              f"{median['DeployHub warm'] / median['DeployHub cold']:.2f}")
        for temperature in ("cold", "warm"):  # each round's own pair: the machine drifts between rounds
            pairs = [d - p for d, p in zip(by_kind[f"DeployHub {temperature}"], by_kind[f"plain {temperature}"])]
            print(f"{name} {temperature} pairs: " + ", ".join(f"{d:+.2f}" for d in pairs)
                  + f" s (median {statistics.median(pairs):+.2f} s)")


if __name__ == "__main__":
    main()
