"""Monorepo workspaces (npm, yarn and pnpm) and what an install writes in the source tree.

A workspace root holds the lockfile and names its packages: `workspaces` in its package.json
(npm, yarn: a list of globs, or {"packages": [...]}) or `packages` in pnpm-workspace.yaml. An
install there writes node_modules at the root and in any package whose dependencies could not
be hoisted; Yarn Berry's Plug'n'Play writes no node_modules but .pnp.cjs and its install state.
`install_paths` lists every place an install may write, so the build cache (worker/cache.py)
can keep them all.

Everything here reads an untrusted checkout: globs with `..` or an absolute path are ignored,
no symlink is followed, node_modules is never searched, and the walk is bounded.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import stat
from pathlib import Path

from .files import read_text


MAX_PACKAGES = 500  # workspace packages looked at; a bigger monorepo caches the first ones
MAX_SCANNED = 20_000  # directories a `**` glob may visit
MAX_DEPTH = 6  # directories a `**` may span
MANIFEST_MAX = 1024 * 1024
# What Yarn Berry's Plug'n'Play install writes at the workspace root, instead of node_modules
# (.yarn/cache only where enableGlobalCache is off; the global cache is kept with the
# package managers' caches).
PNP_PATHS = (".pnp.cjs", ".pnp.loader.mjs", ".pnp.data.json", ".yarn/install-state.gz",
             ".yarn/unplugged", ".yarn/cache")
SKIP = frozenset({"node_modules", ".git"})


def real_dir(repo: Path, rel: str) -> bool:
    """`rel` ("" for `repo`) is a directory under `repo` and no component of it a symlink."""
    path = repo
    for part in [p for p in rel.split("/") if p]:
        path = path / part
        try:
            if not stat.S_ISDIR(path.lstat().st_mode):
                return False
        except OSError:
            return False
    return True


def clean(rel: str) -> str | None:
    """`rel` normalised, or None when it is absolute or leaves the directory it is relative to."""
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return None if rel else ""
    normal = posixpath.normpath(rel)
    if normal == ".":
        return ""
    if normal == ".." or normal.startswith("../"):
        return None
    return normal


def patterns(directory: Path) -> list[str]:
    """The workspace globs `directory` declares (package.json, then pnpm-workspace.yaml)."""
    found: list[object] = []
    try:
        package = json.loads(read_text(directory / "package.json", MANIFEST_MAX) or "{}")
    except ValueError:
        package = {}
    declared = package.get("workspaces") if isinstance(package, dict) else None
    if isinstance(declared, dict):
        declared = declared.get("packages")
    if isinstance(declared, list):
        found += declared
    found += pnpm_packages(read_text(directory / "pnpm-workspace.yaml", MANIFEST_MAX))
    return [p for p in found if isinstance(p, str) and p.strip()]


def pnpm_packages(text: str) -> list[str]:
    """The `packages` list of a pnpm-workspace.yaml: a block list (`- 'apps/*'`) or a flow
    one (`packages: [apps/*]`). Only that key is read, so no YAML library is needed."""
    found: list[str] = []
    inside = False
    for line in text.splitlines():
        bare = line.split(" #", 1)[0].rstrip()
        if not bare.strip() or bare.lstrip().startswith("#"):
            continue
        if not line[0].isspace() and not bare.startswith("-"):
            key, _, value = bare.partition(":")
            inside = key.strip().strip("'\"") == "packages"
            if inside and value.strip().startswith("["):
                found += [_unquote(v) for v in value.strip().strip("[]").split(",") if v.strip()]
                inside = False
            continue
        if inside and bare.lstrip().startswith("- "):
            found.append(_unquote(bare.lstrip()[2:]))
    return [p for p in found if p]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def packages(repo: Path, workspace: str) -> list[str]:
    """The workspace packages of the root `workspace` (relative to `repo`), relative to
    `repo`, sorted: directories matching its globs that hold a package.json."""
    if not real_dir(repo, workspace):
        return []
    base = repo / workspace if workspace else repo
    include: set[str] = set()
    exclude: set[str] = set()
    budget = [MAX_SCANNED]
    for pattern in patterns(base):
        negated = pattern.startswith("!")
        rel = clean(pattern.lstrip("!").strip().removeprefix("./").rstrip("/"))
        if not rel:
            continue
        matches = _glob(base, rel.split("/"), budget)
        (exclude if negated else include).update(matches)
    found = []
    for rel in sorted(include - exclude):
        try:
            if stat.S_ISREG((base / rel / "package.json").lstat().st_mode):
                found.append(posixpath.join(workspace, rel) if workspace else rel)
        except OSError:
            continue
        if len(found) >= MAX_PACKAGES:
            break
    return found


def _glob(base: Path, parts: list[str], budget: list[int], rel: str = "", depth: int = 0) -> set[str]:
    """Directories under `base` matching the glob `parts`, never through a symlink, never in
    node_modules; a name starting with a dot only when the pattern's does."""
    if not parts:
        return {rel} if rel else set()
    head, rest = parts[0], parts[1:]
    found: set[str] = set()
    if head == "**":
        found |= _glob(base, rest, budget, rel, depth)
        if depth >= MAX_DEPTH:
            return found
    for name in _subdirs(base / rel if rel else base, budget):
        child = f"{rel}/{name}" if rel else name
        if head == "**":
            if not name.startswith("."):
                found |= _glob(base, parts, budget, child, depth + 1)
        elif fnmatch.fnmatchcase(name, head) and (not name.startswith(".") or head.startswith(".")):
            found |= _glob(base, rest, budget, child, depth)
    return found


def _subdirs(directory: Path, budget: list[int]) -> list[str]:
    if budget[0] <= 0:
        return []
    budget[0] -= 1
    try:
        with os.scandir(directory) as it:
            return sorted(e.name for e in it
                          if e.name not in SKIP and e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def covers(repo: Path, workspace: str, rel: str) -> bool:
    """Whether `rel` (relative to `repo`) is one of the packages of the root `workspace`."""
    return rel in packages(repo, workspace)


def workspace_of(repo: Path, rel: str) -> str | None:
    """The nearest directory above `rel` (relative to `repo`) that declares `rel` one of its
    workspace packages; None when there is none."""
    parts = [p for p in rel.split("/") if p]
    for cut in range(len(parts) - 1, -1, -1):
        above = "/".join(parts[:cut])
        if patterns(repo / above if above else repo) and covers(repo, above, rel):
            return above
    return None


def install_paths(repo: Path, workspace: str, root: str, *, pnp: bool) -> list[str]:
    """Where an install in `root` from a lockfile in `workspace` (both relative to `repo`) may
    write, relative to `repo`: node_modules of the workspace root, of each of its packages
    and of `root`, and with `pnp` (yarn) Plug'n'Play's files. Only under real directories."""
    dirs = [workspace, *packages(repo, workspace), root]
    found: list[str] = []
    for directory in dirs:
        path = posixpath.join(directory, "node_modules") if directory else "node_modules"
        if path not in found and real_dir(repo, directory):
            found.append(path)
    if pnp and real_dir(repo, workspace):
        found += [posixpath.join(workspace, p) if workspace else p for p in PNP_PATHS]
    return found
