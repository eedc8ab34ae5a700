"""Time from POST to `ready` for the Vite fixture and a Create React App, with a cold and a
warm build cache, against a plain build of the same repository in the same run.

    python -m bench.time_to_ready [--runs N] [--only vite|cra]

DeployHub: `deployhub serve` on its embedded defaults (bench/deploy_time.py's setup). Cold:
a new project (no node_modules to restore, empty package manager caches). Warm: the same
project deployed again, once the previous build has saved its cache. Baseline:
`git clone --depth 1 && npm ci && npm run build` from the same loopback git server, cold with
an empty npm cache, warm with the npm cache of the cold run before it. The four kinds of run
alternate within each round, so load from other work on the machine falls on all of them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from bench.deploy_time import deployhub_build, loopback_deployhub, plain_build
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


def one_round(served: Served, url: str, root: Path, name: str) -> dict[str, float]:
    cache = root / f"plain-npm-{unique_name()}"
    times = {"plain cold": plain_build(url, cache)}
    project = unique_name(name)
    cold: dict[str, float] = {}
    warm: dict[str, float] = {}
    times["DeployHub cold"] = deployhub_build(served, url, project, cold)
    saved = wait_cache_saved(served, project)
    times["DeployHub warm"] = deployhub_build(served, url, project, warm)
    for kind, phases in (("cold", cold), ("warm", warm)):
        print(f"  {name} {kind} phases: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(f"  {name}: {saved}\n  {name}: {restored_line(served, project)}", flush=True)
    wait_cache_saved(served, project)
    times["plain warm"] = plain_build(url, cache)
    shutil.rmtree(cache, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--only", choices=sorted(FIXTURES))
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with loopback_deployhub("dh-ttr-") as (root, git, served):
        urls = {name: git.add_repo(unique_name(name), files_dir=path)
                for name, path in FIXTURES.items() if args.only in (None, name)}
        for run in range(args.runs):
            for name, url in urls.items():  # the fixtures alternate too
                times = one_round(served, url, root, name)
                print(f"run {run + 1} {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()),
                      flush=True)
                for kind, seconds in times.items():
                    results.setdefault(name, {}).setdefault(kind, []).append(seconds)
    print(f"\n{'':22}{'median s':>10}{'min s':>8}{'max s':>8}")
    for name, by_kind in results.items():
        for kind in KINDS:
            times = by_kind[kind]
            print(f"{name + ' ' + kind:22}{statistics.median(times):>10.2f}{min(times):>8.2f}{max(times):>8.2f}")
        median = {kind: statistics.median(t) for kind, t in by_kind.items()}
        print(f"{name} overhead over the plain build: cold {median['DeployHub cold'] - median['plain cold']:+.2f} s, "
              f"warm {median['DeployHub warm'] - median['plain warm']:+.2f} s; warm/cold "
              f"{median['DeployHub warm'] / median['DeployHub cold']:.2f}")


if __name__ == "__main__":
    main()
