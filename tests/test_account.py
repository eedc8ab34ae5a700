"""DEPLOYHUB_SANDBOX=user: where bubblewrap cannot run (an ECS task), build commands run as a
separate unprivileged account that cannot read the worker's environment or files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.infra import GitServer, RedisServer, unique_name
from tests.support.service import StartService, make_settings

PROBE = r"""
const fs = require("fs");
const report = {uid: process.getuid(), gid: process.getgid()};
// Up the process tree (npm, its shell...) to the first process that is not ours: the worker.
let pid = process.pid, status = "";
do {
  status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  pid = Number(/^PPid:\s+(\d+)/m.exec(status)[1]);
  status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
} while (Number(/^Uid:\s+(\d+)/m.exec(status)[1]) === process.getuid());
report.worker = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ");
for (const [name, path] of [["parent", `/proc/${pid}/environ`], ["key", process.argv[2]]]) {
  try { fs.readFileSync(path); report[name] = "READ"; } catch (e) { report[name] = e.code; }
}
report.env = Object.keys(process.env).filter(k => /DEPLOYHUB|AWS|REDIS/.test(k));
console.log("probe " + JSON.stringify(report));
fs.mkdirSync("dist", {recursive: true});
fs.writeFileSync("dist/index.html", "<p>built by " + report.uid + "</p>");
"""


def probe_repo(git_server: GitServer, secret_file: Path) -> str:
    package = {"name": "probe", "version": "1.0.0",
               "scripts": {"build": f"node probe.js {secret_file}"}}
    return git_server.add_repo(unique_name("probe"), files={
        "package.json": json.dumps(package), "probe.js": PROBE,
    })


@pytest.fixture
def open_data_dir() -> Iterator[Path]:
    """A data directory the build account can pass through (pytest's tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="dh-user-"))
    base.chmod(0o711)
    yield base / "data"
    subprocess.run(["rm", "-rf", str(base)], check=False)


def check_sandbox(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", "--check-sandbox"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DEPLOYHUB_SANDBOX": "user",
                                                      "DEPLOYHUB_BUILD_NETWORK": "host", **env})


def test_check_sandbox_names_a_missing_or_privileged_account() -> None:
    assert check_sandbox(DEPLOYHUB_BUILD_USER="nobody").returncode == 0
    missing = check_sandbox(DEPLOYHUB_BUILD_USER="no-such-builder")
    assert missing.returncode == 1 and "'no-such-builder' is not an account" in missing.stdout
    root = check_sandbox(DEPLOYHUB_BUILD_USER="root")
    assert root.returncode == 1 and "is root" in root.stdout
    network = check_sandbox(DEPLOYHUB_BUILD_USER="nobody", DEPLOYHUB_BUILD_NETWORK="isolated")
    assert network.returncode == 2 and "DEPLOYHUB_BUILD_NETWORK=host" in network.stderr


async def test_builds_run_as_the_account_and_cannot_read_the_worker(
    open_data_dir: Path, redis_server: RedisServer, start_service: StartService,
    git_server: GitServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-aws-secret")  # the worker gets AWS_*
    secret = open_data_dir.parent / "worker-only.key"
    secret.write_text("canary-file-secret")
    secret.chmod(0o600)
    settings = make_settings(open_data_dir, redis_server.url, sandbox="user", build_user="nobody",
                             build_network="host")
    service = await start_service(settings)
    dep = await service.deploy(probe_repo(git_server, secret))
    final = await service.wait_final(dep["id"], timeout=90)
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert final["status"] == "ready", (final["reason"], texts[-20:])
    report = json.loads(next(t for t in texts if t.startswith("probe "))[len("probe "):])
    assert report["uid"] == 65534 and report["gid"] == 65534
    assert "-m worker" in report["worker"], report  # the first process up the tree not ours
    assert report["parent"] == "EACCES" and report["key"] == "EACCES"  # its environ, its file
    assert report["env"] == []
    assert any("run as the unprivileged account nobody" in t for t in texts)
    status, _, body = await service.site(dep["project"])
    assert status == 200 and b"built by 65534" in body
