"""The Node a build runs with: the repository's request, resolved on the npm registry, fetched
once into the data directory and first on PATH inside the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.caches import session_caches, shared_caches  # noqa: F401  (fixtures)
from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service
from worker import node
from worker.detect import BuildError, NodeRequest


def npm_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "home").mkdir(exist_ok=True)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
            "npm_config_cache": str(tmp_path / "npm"), "npm_config_update_notifier": "false"}


@pytest.mark.parametrize("spec", [">=18 <21", "20.x", "^20"])
async def test_machine_node_is_kept_when_it_satisfies_the_range(tmp_path: Path, spec: str) -> None:
    chosen = await node.choose(NodeRequest(spec, "package.json engines.node"), tmp_path / "node", npm_env(tmp_path))
    assert chosen.home is None and chosen.version.startswith("20.")
    assert f"satisfies '{spec}' from package.json engines.node" in chosen.reason


async def test_lts_and_unknown_versions(tmp_path: Path) -> None:
    assert int(await node._normalize("lts/*", npm_env(tmp_path))) >= 24
    assert await node._normalize("lts/iron", {}) == "20"
    with pytest.raises(BuildError, match="No Node.js release matches '99'"):
        await node.choose(NodeRequest("99", ".nvmrc"), tmp_path / "node", npm_env(tmp_path))
    with pytest.raises(BuildError, match="not a Node version"):
        await node.choose(NodeRequest("--registry=http://evil", ".nvmrc"), tmp_path / "node", npm_env(tmp_path))


@pytest.mark.usefixtures("shared_caches")
@pytest.mark.timeout(240)
async def test_engines_node_22_builds_with_node_22_inside_the_sandbox(service: Service, git_server: GitServer) -> None:
    package = json.loads((TINY_APP / "package.json").read_text())
    package["engines"] = {"node": "22"}
    package["scripts"]["build"] = "node -e \"console.log('built with ' + process.version)\" && node build.js"
    url = git_server.add_repo(unique_name("node22"), files_dir=TINY_APP, files={"package.json": json.dumps(package)})
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"], timeout=200)
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert final["status"] == "ready", (final["reason"], texts[-15:])
    print("\n".join(texts))
    using = next(t for t in texts if t.startswith("Using Node 22."))
    assert "the newest release matching '22' from package.json engines.node (this machine has 20." in using
    assert any(t.startswith("built with v22.") for t in texts)
    assert (service.settings.data_dir / "cache" / "node" / using.split()[2].rstrip(",") / "bin" / "node").is_file()
