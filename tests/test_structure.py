"""The shape of the code: no import cycles, the server never imports the worker, and a build
process loads only the shared core (no aiohttp, API or hub)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("deployhub", "worker")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that `name` imports, at any depth of the file (functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    edges = graph()
    assert "deployhub.app" in edges and edges["deployhub.app"], "the walk found no imports"
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_the_server_never_imports_the_worker() -> None:
    offenders = {m: sorted(i for i in deps if i.split(".")[0] == "worker")
                 for m, deps in graph().items() if m.split(".")[0] == "deployhub"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_a_build_process_loads_only_the_shared_core() -> None:
    code = (
        "import sys, json, worker.__main__\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('deployhub', 'aiohttp'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    loaded = set(json.loads(out))
    assert "aiohttp" not in loaded
    core = {"deployhub", "deployhub.settings", "deployhub.store", "deployhub.storage", "deployhub.logs",
            "deployhub.redis_client", "deployhub.addresses",
            "deployhub.validation", "deployhub.keys", "deployhub.status",
            "deployhub.secretbox",  # the worker decrypts secret build variables
            # what the upload shares with the site server: the manifest, its rules, the leases
            "deployhub.manifest", "deployhub.rules", "deployhub.collector",
            "deployhub.migrate",  # connect_redis: old key names move before any use
            "deployhub.children"}  # closing a child's pipes, for the runner and worker/proc alike
    assert loaded <= core, sorted(loaded - core)
