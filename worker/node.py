"""The Node.js a build runs with: this machine's when it satisfies what the repository asks
for, else the newest matching release, fetched once from the npm registry (the
`node-linux-<arch>` packages ship the official binaries) and cached under the data directory.

Cache layout: <data>/cache/node/<version>/bin/node. The directory is made by the worker (never
by build code) and shown read-only inside the sandbox at bwrap.INSIDE_NODE; it holds no tenant data,
so builds share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import proc
from .detect import BuildError, NodeRequest

QUERY_TIMEOUT = 120.0
FETCH_TIMEOUT = 600.0
# A range a user writes: digits, x, *, operators, spaces, ||, dashes. Nothing npm could read
# as an option or a tag that is not a version.
SPEC = re.compile(r"[0-9xX*^~<>=|.\s-]{1,100}")
LTS_NAMES = {
    "argon": 4, "boron": 6, "carbon": 8, "dubnium": 10, "erbium": 12, "fermium": 14,
    "gallium": 16, "hydrogen": 18, "iron": 20, "jod": 22, "krypton": 24,
}
LATEST = frozenset({"node", "latest", "current", "stable"})  # nvm's names for the newest
# An even major becomes LTS about six months after its first release (April -> October).
LTS_AFTER = datetime.timedelta(days=183)


@dataclass(frozen=True)
class Node:
    version: str  # "22.23.5"
    home: Path | None  # the cached release (its bin/ goes first on PATH); None: this machine's
    reason: str  # for the build log


def package_name() -> str:
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}
    machine = platform.machine().lower()
    if machine not in arch:
        raise BuildError(f"No Node.js binaries on the npm registry for this machine ({machine}).")
    return f"node-linux-{arch[machine]}"


async def choose(request: NodeRequest | None, cache: Path, env: Mapping[str, str]) -> Node:
    """The Node to run for `request`; fetches it into `cache` when this machine's does not do."""
    local = await machine_version(env)
    if request is None:
        return Node(local, None, f"Node {local} (this machine's; the repository asks for no "
                                 "version: set engines.node or add an .nvmrc to choose)")
    spec = await _normalize(request.spec, env)
    exact = re.fullmatch(r"\d+\.\d+\.\d+", spec) is not None
    if exact and (spec == local or (cache / spec / "bin" / "node").is_file()):
        versions = [spec]  # nothing to ask the registry
    else:
        versions = await _matching(spec, env)
    if not versions:
        raise BuildError(
            f"No Node.js release matches {request.spec!r} ({request.source}). Ask for a "
            "version that exists, e.g. 22 or >=20."
        )
    # This machine's Node when it will do (no download), except for "latest" and its kin.
    if local in versions and request.spec.strip().lower() not in LATEST:
        return Node(local, None, f"Node {local} (this machine's), which satisfies "
                                 f"{request.spec!r} from {request.source}")
    newest = max(versions, key=_key)
    if newest == local:
        return Node(local, None, f"Node {local} (this machine's), the newest release matching "
                                 f"{request.spec!r} from {request.source}")
    home = await ensure(newest, cache, env)
    return Node(newest, home, f"Node {newest}, the newest release matching {request.spec!r} "
                              f"from {request.source} (this machine has {local})")


async def machine_version(env: Mapping[str, str]) -> str:
    lines = await _output(["node", "--version"], env, 20)
    version = lines[0].strip().lstrip("v") if lines else ""
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise BuildError("node is not installed on the build machine")
    return version


async def ensure(version: str, cache: Path, env: Mapping[str, str]) -> Path:
    """<cache>/<version>, fetched and unpacked once; concurrent builds may race, one wins."""
    home = cache / version
    if (home / "bin" / "node").is_file():
        return home
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{version}-") as tmp:
        # `npm pack` only downloads (no install scripts run), from the registry npm is set to.
        lines = await _output(
            ["npm", "pack", f"{package_name()}@{version}", "--json", "--pack-destination", tmp],
            env, FETCH_TIMEOUT, cwd=Path(tmp),
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise BuildError(f"Could not fetch Node {version} from the npm registry: "
                             + (lines[-1] if lines else "npm pack wrote nothing"))
        unpacked = Path(tmp) / "unpacked"
        await asyncio.to_thread(_unpack, tarballs[0], unpacked)
        if not (unpacked / "bin" / "node").is_file():
            raise BuildError(f"The npm registry's {package_name()}@{version} holds no bin/node.")
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(unpacked, home)  # atomic: a build never sees half a release
    if not (home / "bin" / "node").is_file():
        raise BuildError(f"Could not cache Node {version} under {cache}.")
    return home


def _unpack(tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball) as archive:
        members = []
        for member in archive.getmembers():
            name = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not name or name.startswith("include/"):  # headers: not needed to run
                continue
            member.name = name
            members.append(member)
        archive.extractall(dest, members=members, filter="data")


async def _normalize(spec: str, env: Mapping[str, str]) -> str:
    text = spec.strip()
    lowered = text.lower()
    if lowered.startswith("lts/"):
        name = lowered[4:]
        if name in ("*", "-0"):
            return str(await _newest_lts(env))
        if name in LTS_NAMES:
            return str(LTS_NAMES[name])
        raise BuildError(f"Unknown Node LTS line {text!r}; use lts/* or a version like 22.")
    if lowered in LATEST or lowered == "*":
        return "*"
    text = re.sub(r"(?<![\w.])v(?=\d)", "", text)  # v20.11.0 -> 20.11.0
    if not SPEC.fullmatch(text):
        raise BuildError(f"{spec!r} is not a Node version or range DeployHub understands; "
                         "use e.g. 22, 20.x, ^20.11 or >=18 <21.")
    return text


async def _matching(spec: str, env: Mapping[str, str]) -> list[str]:
    """Every release satisfying `spec`, as npm's own semver reads the range."""
    lines = await _output(
        ["npm", "view", f"{package_name()}@{spec}", "version", "--json"], env, QUERY_TIMEOUT
    )
    text = "\n".join(lines).strip()
    if not text:
        return []
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        raise BuildError(f"Could not ask the npm registry for Node releases: {text[-300:]}") from None
    if isinstance(found, dict) and "error" in found:
        if found["error"].get("code") == "E404":
            return []
        raise BuildError(f"Could not ask the npm registry for Node releases: {found['error']}")
    values = found if isinstance(found, list) else [found]
    return [v for v in values if isinstance(v, str) and re.fullmatch(r"\d+\.\d+\.\d+", v)]


async def _newest_lts(env: Mapping[str, str]) -> int:
    lines = await _output(["npm", "view", package_name(), "time", "--json"], env, QUERY_TIMEOUT)
    try:
        times = json.loads("\n".join(lines))
    except json.JSONDecodeError:
        raise BuildError("Could not ask the npm registry for Node release dates") from None
    now = datetime.datetime.now(datetime.UTC)
    majors = []
    for version, when in times.items():
        match = re.fullmatch(r"(\d+)\.0\.0", version)
        if match and int(match.group(1)) % 2 == 0 and isinstance(when, str):
            released = datetime.datetime.fromisoformat(when)
            if now - released >= LTS_AFTER:
                majors.append(int(match.group(1)))
    if not majors:
        raise BuildError("Could not tell which Node line is LTS from the npm registry")
    return max(majors)


async def _output(
    argv: list[str], env: Mapping[str, str], timeout: float, cwd: Path | None = None
) -> list[str]:
    """stdout lines of a trusted command (npm talking to the registry, never repository code)."""
    lines: list[str] = []
    errors: list[str] = []

    def keep(stream: str, text: str) -> None:
        (lines if stream == "stdout" else errors).append(text)

    try:
        result = await proc.run(argv, cwd=cwd or Path(env.get("HOME", "/")), env=env, emit=keep,
                                timeout=timeout, max_line_bytes=1024 * 1024)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} is not installed on the build machine") from None
    except proc.CommandTimeout:
        raise BuildError(f"`{' '.join(argv)}` did not answer within {timeout:.0f} s") from None
    if result.code != 0 and not lines:
        detail = next((t for t in reversed(errors) if t.strip()), f"exit code {result.code}")
        raise BuildError(f"`{' '.join(argv)}` failed: {detail.strip()}")
    return lines


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))

