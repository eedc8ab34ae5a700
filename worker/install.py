"""The install step: a frozen install from the winning lockfile, and what happens when that
lockfile is out of date.

A frozen install (`npm ci`, `--frozen-lockfile`, `--immutable`) installs exactly what the
developer tested, or refuses. When it refuses because the lockfile no longer matches
package.json, and the repository has another lockfile, that one's manager gets a frozen try
too, with a loud warning in the log (a forgotten second lockfile is usually the fresh one).
Without another lockfile the build fails and says which file to update and how. It never
falls back to a non-frozen install: that would publish dependency versions nobody tested.

On a restored build cache (worker/cache.py) yarn, pnpm and bun's frozen installs find
node_modules up to date and finish in a second. `npm ci` would delete it, so npm runs
`npm install --prefer-offline` on the restored tree instead, and keeps the frozen guarantee
by checking that the lockfile it rewrites names the same packages (versions, sources,
integrity) and root ranges: when it does not (package.json asks for something the lockfile
does not hold), node_modules is removed and `npm ci` runs as without a cache, with its usual
error. The committed lockfile is put back either way.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .cache import remove
from .detect import (
    BuildError,
    Install,
    Plan,
    build_command,
    stale_advice,
    stale_lockfile,
)
from .proc import Emit

Command = Callable[[list[str]], Awaitable[None]]
NPM_WARM = ["npm", "install", "--prefer-offline", "--no-audit", "--no-fund"]
# What decides an npm lockfile's tree, for its root entry and for each package.
ROOT_FIELDS = ("dependencies", "devDependencies", "optionalDependencies", "peerDependencies",
               "workspaces")
PACKAGE_FIELDS = ("version", "resolved", "integrity", "link", "dev", "optional")


@dataclass(frozen=True)
class Installed:
    build: list[str]  # the build command of the manager that installed
    installer: Install | None  # which of the plan's installs it was; None: a project setting
    warm: bool = False  # it installed on the restored node_modules


async def install(
    plan: Plan, command: Command, emit: Emit, events: Sequence[str], project: Path,
    *, restored: bool = False, cached: Sequence[Path] = (),
) -> Installed:
    """Install the dependencies (on a restored node_modules when `restored`: `cached` are the
    paths the build cache restored, removed with node_modules when a fresh install must run).

    `events` is the build log so far (JSON events, as LogPublisher keeps them): a failed
    install's own lines say whether its lockfile was stale.
    """
    if plan.installer is None:  # a project setting: run it as it is
        await command(plan.install)
        return Installed(plan.build, None, restored)
    attempts: list[Install] = [plan.installer, *plan.fallbacks]
    # A build command from a project setting stays as it is whichever manager installed.
    detected_build = build_command(plan.installer, plan.build_args)
    stale: list[str] = []
    for number, attempt in enumerate(attempts):
        argv = plan.install if number == 0 else attempt.argv
        if number == 0 and restored and argv[:2] == ["npm", "ci"]:
            # The same install, on the tree as restored (its flags: --include-workspace-root).
            if await _npm_on_restored(command, emit, project, attempt.lockfile, cached, argv[2:]):
                return Installed(plan.build, attempt, True)
            restored = False
        mark = len(events)
        try:
            await command(argv)
        except BuildError:
            if not attempt.lockfile or not stale_lockfile(event_texts(events[mark:])):
                raise
            stale.append(stale_advice(attempt))
            if number + 1 == len(attempts):
                raise BuildError(" ".join(stale)) from None
            following = attempts[number + 1]
            emit("system", f"Warning: {stale[-1]} Trying {following.lockfile} with "
                           f"{following.label} instead; delete the lockfile you do not use.")
            _remove_node_modules(project, cached)
            continue
        if number > 0:
            emit("system", f"Warning: installed from {attempt.lockfile} with {attempt.label} "
                           f"because {attempts[0].lockfile} is out of date.")
        if number == 0 or plan.build != detected_build:
            return Installed(plan.build, attempt, restored and number == 0)
        return Installed(build_command(attempt, plan.build_args), attempt)
    raise AssertionError("unreachable")


async def _npm_on_restored(command: Command, emit: Emit, project: Path, lockfile: str,
                           cached: Sequence[Path], flags: Sequence[str] = ()) -> bool:
    """`npm install --prefer-offline` on the restored tree; False (and the tree removed, the
    lockfile as it was) when `npm ci` must run instead."""
    path = project / lockfile
    before = path.read_bytes()
    try:
        await command([*NPM_WARM, *flags])
    except BuildError:
        emit("system", "The install on the restored node_modules failed: installing from "
                       "scratch with npm ci")
        ok = False
    else:
        ok = _npm_tree(path.read_bytes()) == _npm_tree(before)
        if not ok:
            emit("system", f"npm install changed {lockfile} (it does not match package.json): "
                           "installing from scratch with npm ci, which checks it")
    path.write_bytes(before)  # the build sees the lockfile as it was committed
    if not ok:
        _remove_node_modules(project, cached)
    return ok


def _npm_tree(lockfile: bytes) -> object:
    """What an npm lockfile installs: each package's version, source and integrity, and the
    root's dependency ranges; not the metadata npm rewrites (licenses, engines, funding) nor
    the packages it marks extraneous. The bytes themselves where it is not a v2/v3 lockfile."""
    try:
        packages = json.loads(lockfile).get("packages")
    except (ValueError, AttributeError):
        return lockfile
    if not isinstance(packages, dict):
        return lockfile
    tree: set[tuple[str, str]] = set()
    for path, entry in packages.items():
        if not isinstance(entry, dict) or entry.get("extraneous"):
            continue
        fields = ROOT_FIELDS if path == "" else PACKAGE_FIELDS
        tree.add((path, json.dumps({k: entry.get(k) for k in fields}, sort_keys=True)))
    return tree


def event_texts(events: Sequence[str]) -> list[str]:
    texts = []
    for event in events:
        try:
            texts.append(str(json.loads(event).get("text", "")))
        except (ValueError, AttributeError):
            continue
    return texts


def _remove_node_modules(project: Path, cached: Sequence[Path] = ()) -> None:
    """What the failed manager left, and what the cache restored: the next one starts clean
    (rmtree never follows links)."""
    for target in (project / "node_modules", *cached):
        remove(target)
