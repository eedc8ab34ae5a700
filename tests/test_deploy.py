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


async def test_ready_is_recorded_before_the_log_copy_and_cleanup(service: Service, git_server: GitServer) -> None:
    import asyncio

    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    data = service.settings.data_dir
    log_copy = data / "storage" / "logs" / f"{dep['id']}.ndjson"
    for _ in range(100):  # the log copy and the cleanup come after ready
        if log_copy.exists() and not (data / "builds" / dep["id"]).exists():
            break
        await asyncio.sleep(0.1)
    assert log_copy.exists() and not (data / "builds" / dep["id"]).exists()
    assert final["timestamps"]["ready"] <= log_copy.stat().st_mtime
