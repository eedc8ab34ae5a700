"""The install step's choice when a frozen install refuses a stale lockfile (no real managers:
the command is a stand-in that fails the way yarn does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployhub.logs import encode_event
from worker.detect import BuildError, Overrides, plan
from worker.install import install

YARN_LOCK = "# yarn lockfile v1\n"
PACKAGE = json.dumps({"scripts": {"build": "vite build"}, "devDependencies": {"vite": "7"}})


def stale_yarn(events: list[str], ran: list[list[str]]):  # type: ignore[no-untyped-def]
    async def command(argv: list[str]) -> None:
        ran.append(argv)
        if "yarn@1" in argv:
            events.append(encode_event(len(events) + 1, 0, "stderr", "error Your lockfile needs to be updated"))
            raise BuildError("yarn exited with code 1")
    return command


@pytest.mark.parametrize("overrides, build", [
    (None, ["npm", "run", "build"]),
    (Overrides(build_command=("npm", "run", "export")), ["npm", "run", "export"]),
])
async def test_stale_lockfile_falls_back_keeping_a_build_setting(tmp_path: Path, overrides: Overrides | None, build: list[str]) -> None:
    for name, text in {"package.json": PACKAGE, "yarn.lock": YARN_LOCK, "package-lock.json": "{}"}.items():
        (tmp_path / name).write_text(text)
    events: list[str] = []
    ran: list[list[str]] = []
    said: list[str] = []
    result = await install(plan(tmp_path, overrides), stale_yarn(events, ran), lambda _s, t: said.append(t), events, tmp_path)
    assert ran[-1] == ["npm", "ci"] and result.build == build
    assert any(t.startswith("Warning: yarn.lock is out of date") for t in said)


async def test_single_stale_lockfile_fails_with_advice(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(PACKAGE)
    (tmp_path / "yarn.lock").write_text(YARN_LOCK)
    events: list[str] = []
    with pytest.raises(BuildError, match=r"yarn.lock is out of date .* Run `yarn install` and commit"):
        await install(plan(tmp_path), stale_yarn(events, []), lambda _s, _t: None, events, tmp_path)
