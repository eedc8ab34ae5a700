"""Wall time of a Vite + React deploy through DeployHub against a plain build of the same repo.

    python -m bench.deploy_time [--runs N]

DeployHub: `deployhub serve` on its embedded defaults (a subprocess), POST /api/deployments to
`ready`. Baseline: `git clone --depth 1 && npm ci && npm run build` of the same repository from
the same loopback git server. Both use a warm npm cache (one unmeasured run of each first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.infra import VITE_REACT_APP, GitServer, unique_name
from tests.support.served import Served


def plain_build(url: str, cache: Path, cpu: dict[str, float] | None = None,
                steps: dict[str, float] | None = None) -> float:
    """Seconds of `git clone && npm ci && npm run build`; `cpu` gets the user and system
    CPU seconds its commands took, `steps` the seconds of each ("clone", "install", "build")."""
    work = Path(tempfile.mkdtemp(prefix="dh-plain-"))
    env = {**os.environ, "npm_config_cache": str(cache), "CI": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    commands = {
        "clone": (["git", "clone", "-q", "--depth", "1", url, str(work / "src")], work),
        "install": (["npm", "ci", "--no-audit", "--no-fund"], work / "src"),
        "build": (["npm", "run", "build"], work / "src"),
    }
    try:
        started = time.monotonic()
        for step, (argv, cwd) in commands.items():
            began = time.monotonic()
            subprocess.run(argv, cwd=cwd, check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if steps is not None:
                steps[step] = time.monotonic() - began
        seconds = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if cpu is not None:
            cpu.update(user=after.ru_utime - before.ru_utime, system=after.ru_stime - before.ru_stime)
        return seconds
    finally:
        shutil.rmtree(work, ignore_errors=True)


PHASES = ("queued", "cloning", "installing", "building", "uploading")


def deployhub_build(served: Served, url: str, project: str = "bench",
                    phases: dict[str, float] | None = None) -> float:
    """Seconds from the POST to `ready` (the server's own timestamp of it); `phases` gets
    how long each status lasted."""
    started = time.time()
    status, dep = served.post_json("/api/deployments", {"repo_url": url, "project": project})
    assert status == 202, dep
    final = served.wait_final(dep["id"], timeout=600)
    assert final["status"] == "ready", final["reason"]
    stamps = {k: float(v) for k, v in final["timestamps"].items()}
    if phases is not None:
        order = [p for p in (*PHASES, "ready") if p in stamps]
        phases.update({a: stamps[b] - stamps[a] for a, b in zip(order, order[1:])})
    return stamps["ready"] - started


def command_seconds(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds from each `$ command` line of a build log to the log's next system line that
    is not output: the wall time of each command as the worker ran it."""
    times: dict[str, float] = {}
    for number, event in enumerate(events):
        if event["stream"] == "system" and event["text"].startswith("$ "):
            end = next((e for e in events[number + 1:] if e["stream"] == "system"), None)
            if end is not None:
                times[event["text"][2:]] = float(end["ts"]) - float(event["ts"])
    return times


@contextlib.contextmanager
def loopback_deployhub(prefix: str, *serve_args: str) -> Iterator[tuple[Path, GitServer, Served]]:
    """A scratch directory, a git server on 127.0.0.1 and `deployhub serve` on its embedded
    defaults (and `serve_args`); all gone afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    git = GitServer(root / "git")
    git.start()
    served = Served(root / "data", *serve_args)
    try:
        served.start()
        yield root, git, served
    finally:
        if served.proc is not None and served.proc.poll() is None:
            served.stop()
        git.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with loopback_deployhub("dh-bench-") as (root, git, served):
        url = git.add_repo(unique_name("vite"), files_dir=VITE_REACT_APP)
        cache = root / "plain-npm-cache"
        plain_build(url, cache)  # warm both npm caches
        deployhub_build(served, url)
        ours = [deployhub_build(served, url) for _ in range(args.runs)]
        plain = [plain_build(url, cache) for _ in range(args.runs)]
    print(f"{'':28}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, times in [("DeployHub POST -> ready", ours), ("git clone+npm ci+build", plain)]:
        print(f"{name:28}{statistics.median(times):>10.2f}{min(times):>8.2f}{max(times):>8.2f}")
    print(f"overhead: {statistics.median(ours) - statistics.median(plain):+.2f} s "
          f"({statistics.median(ours) / statistics.median(plain):.2f}x the plain build)")


if __name__ == "__main__":
    main()
