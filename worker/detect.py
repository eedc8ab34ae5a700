"""What the repository asks for: its package manager, its commands, where its output lands."""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

OUTPUT_DIRS = ("dist", "build", "out", ".output/public", "_site")
PACKAGE_JSON_MAX = 1024 * 1024


class BuildError(Exception):
    """The build cannot go on; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Plan:
    manager: str  # "npm", "yarn" or "pnpm", with the version used in `install`
    install: list[str]
    build: list[str]


def read_package_json(root: Path) -> dict[str, object]:
    path = root / "package.json"
    if path.is_symlink() or not path.is_file():
        raise BuildError(
            "No package.json at the repository root. DeployHub builds Node projects: add a "
            "package.json with a \"build\" script."
        )
    if path.stat().st_size > PACKAGE_JSON_MAX:
        raise BuildError("package.json is larger than 1 MiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(f"package.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BuildError("package.json must hold a JSON object")
    return data


def plan(root: Path) -> Plan:
    package = read_package_json(root)
    scripts = package.get("scripts")
    if not isinstance(scripts, dict) or not isinstance(scripts.get("build"), str):
        raise BuildError(
            'package.json has no "build" script. Add one, e.g. "scripts": {"build": "vite build"}.'
        )
    declared = package.get("packageManager")
    declared = declared if isinstance(declared, str) else ""
    if _regular(root / "pnpm-lock.yaml"):
        launcher = ["npx", "--yes", f"pnpm@{_pnpm_version(root, declared)}"]
        return Plan("pnpm", [*launcher, "install", "--frozen-lockfile"], [*launcher, "run", "build"])
    if _regular(root / "yarn.lock"):
        head = _head(root / "yarn.lock", 500)
        if "# yarn lockfile v1" in head:
            launcher = ["npx", "--yes", "yarn@1"]
            install = [*launcher, "install", "--frozen-lockfile", "--non-interactive"]
        else:
            version = _declared_version(declared, "yarn") or "stable"
            launcher = ["corepack", f"yarn@{version}"]
            install = [*launcher, "install", "--immutable"]
        return Plan("yarn", install, [*launcher, "run", "build"])
    if _regular(root / "package-lock.json") or _regular(root / "npm-shrinkwrap.json"):
        return Plan("npm", ["npm", "ci"], ["npm", "run", "build"])
    return Plan("npm", ["npm", "install"], ["npm", "run", "build"])


def _regular(path: Path) -> bool:
    """A regular file, not a symlink: a repository's symlink may point anywhere on the host."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _head(path: Path, size: int) -> str:
    """The first `size` bytes of a file, never following a symlink, never reading it all."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, size).decode(errors="replace")
    finally:
        os.close(fd)


def _declared_version(declared: str, name: str) -> str:
    match = re.fullmatch(rf"{name}@(\d+(?:\.\d+){{0,2}})(?:\+.*)?", declared)
    return match.group(1) if match else ""


def _pnpm_version(root: Path, declared: str) -> str:
    """The pnpm major that reads this lockfile (a newer one would rewrite it and fail)."""
    if version := _declared_version(declared, "pnpm"):
        return version
    head = _head(root / "pnpm-lock.yaml", 300)
    match = re.search(r"lockfileVersion:\s*'?(\d+)(?:\.(\d+))?", head)
    if not match:
        return "9"
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major >= 9:
        return "9"
    if major >= 6:
        return "8"
    if major == 5 and minor >= 4:
        return "7"
    return "6"


def find_output(root: Path) -> Path:
    for name in OUTPUT_DIRS:
        # A symlinked output dir, or a symlinked parent of it (.output -> /etc), could point
        # anywhere on the machine: never follow one.
        if not _real_dirs(root, name):
            continue
        candidate = root / name
        if any(candidate.iterdir()):
            return candidate
    raise BuildError(
        "The build finished but produced no output directory. Looked for "
        + ", ".join(OUTPUT_DIRS)
        + " at the repository root; make the build write its files to one of them."
    )


def _real_dirs(root: Path, rel: str) -> bool:
    """Every component of `rel` under `root` is a directory and none is a symlink."""
    path = root
    for part in rel.split("/"):
        path = path / part
        try:
            if not stat.S_ISDIR(path.lstat().st_mode):
                return False
        except OSError:
            return False
    return True
