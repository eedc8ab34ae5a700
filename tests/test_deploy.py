"""A Git URL to a live site, through the API, with the tiny fixture."""

from __future__ import annotations

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service


async def test_tiny_app_deploys_and_serves(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    assert dep["status"] == "queued"
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    status, headers, body = await service.site(dep["project"])
    assert status == 200
    assert b"Hello from tiny" in body
    assert headers["Content-Type"].startswith("text/html")
