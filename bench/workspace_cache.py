"""Install seconds of monorepos and a Plug'n'Play app, cold against a warm build cache.

    python -m bench.workspace_cache [--runs N]

`deployhub serve` on its embedded defaults (bench/deploy_time.py's setup), real npm and Yarn
against the registry. Fixtures: tests/fixtures/monorepo (npm workspaces, the app in apps/web,
built with root_directory apps/web and from the workspace root), tests/fixtures/pnp (Yarn
Berry PnP with a postinstall dependency), and the Vite + React fixture moved to apps/web of
an npm workspace (its lockfile rewritten for the workspace: 115 packages hoisted to the root),
built with root_directory apps/web. Cold: a new project (nothing to restore, empty package
manager caches); warm: the same project again once the cold build saved its cache. The
baseline is the cold build of the same round; the kinds alternate within each round. The
figure is the log's own: from the install command's line to `--- building`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from bench.deploy_time import loopback_deployhub
from bench.time_to_ready import wait_cache_saved
from tests.support.infra import FIXTURES_DIR, VITE_REACT_APP, unique_name
from tests.support.served import Served

WEB = {"root_directory": "apps/web"}
CASES: dict[str, dict[str, str]] = {
    "monorepo, root_directory apps/web": WEB,
    "monorepo, built from the root": {"output_directory": "apps/web/dist"},
    "yarn berry pnp": {},
    "vite-react in apps/web of a workspace": WEB,
}


def vite_workspace(target: Path) -> Path:
    """The Vite + React fixture as apps/web of an npm workspace, its lockfile made the
    workspace's (every package stays hoisted at the root)."""
    shutil.copytree(VITE_REACT_APP, target / "apps" / "web",
                    ignore=shutil.ignore_patterns("node_modules", "dist", "package-lock.json"))
    lock = json.loads((VITE_REACT_APP / "package-lock.json").read_text())
    app = lock["packages"].pop("")
    name = app["name"]
    lock["packages"]["apps/web"] = {k: v for k, v in app.items() if k != "name"}
    lock["packages"][f"node_modules/{name}"] = {"resolved": "apps/web", "link": True}
    lock["packages"][""] = {"name": "mono", "workspaces": ["apps/*"]}
    lock["name"] = "mono"
    lock.pop("version", None)
    (target / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
    (target / "package.json").write_text(json.dumps({"name": "mono", "private": True,
                                                     "workspaces": ["apps/*"]}) + "\n")
    return target


def install_seconds(events: list[dict[str, Any]]) -> float:
    begin = next(e["ts"] for e in events if e["text"].startswith("$ ")
                 and (" install" in e["text"] or e["text"] == "$ npm ci"))
    end = next(e["ts"] for e in events if e["text"] == "--- building")
    return float(end - begin)


def deploy(served: Served, url: str, project: str, settings: dict[str, str]) -> list[dict[str, Any]]:
    status, dep = served.post_json("/api/deployments", {"repo_url": url, "project": project,
                                                        "settings": settings})
    assert status == 202, dep
    final = served.wait_final(dep["id"], timeout=600)
    assert final["status"] == "ready", final["reason"]
    wait_cache_saved(served, project)
    return served.logs_of_newest(project)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    print(f"load: {os.getloadavg()}", flush=True)
    with loopback_deployhub("dh-wsc-") as (root, git, served):
        sources = [FIXTURES_DIR / "monorepo", FIXTURES_DIR / "monorepo", FIXTURES_DIR / "pnp",
                   vite_workspace(root / "vite-workspace")]
        urls = {case: git.add_repo(unique_name("wsc"), files_dir=source)
                for case, source in zip(CASES, sources, strict=True)}
        for run in range(args.runs):
            for case, settings in CASES.items():
                project = unique_name("wsc")
                cold = install_seconds(deploy(served, urls[case], project, settings))
                events = deploy(served, urls[case], project, settings)
                restored = next((e["text"] for e in events if e["text"].startswith("Build cache: restored")),
                                "(not restored)")
                warm = install_seconds(events)
                results.setdefault(case, {}).setdefault("cold", []).append(cold)
                results[case].setdefault("warm", []).append(warm)
                print(f"run {run + 1} {case}: cold {cold:.2f} s, warm {warm:.2f} s; {restored[:110]}",
                      flush=True)
    print(f"\nload: {os.getloadavg()}\n{'install seconds':42}{'cold':>8}{'warm':>8}{'saved':>8}  (medians)")
    for case, kinds in results.items():
        cold, warm = statistics.median(kinds["cold"]), statistics.median(kinds["warm"])
        print(f"{case:42}{cold:>8.2f}{warm:>8.2f}{cold - warm:>+8.2f}")


if __name__ == "__main__":
    main()
