"""No deployment stays unfinished: dead workers, restarts and cancels all end it with a reason."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from deployhub import get_store, keys
from deployhub.store import Store
from tests.support.infra import TINY_APP, GitServer, RedisServer, unique_name
from tests.support.served import Served
from tests.support.service import Service, StartService, Watch
from tests.support.workers import wait_for_worker


def slow_repo(git_server: GitServer, lines: int = 2000, delay_ms: int = 10) -> str:
    config = f'{{"lines": {lines}, "delayMs": {delay_ms}}}'
    return git_server.add_repo(unique_name("slow"), files_dir=TINY_APP, files={"tiny.json": config})


async def wait_building(service: Service, dep_id: str) -> None:
    for _ in range(300):
        _, body = await service.get_json(f"/api/deployments/{dep_id}")
        if body["status"] == "building":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached building: {body}")


async def test_worker_killed_mid_build_fails_the_deployment(service: Service, git_server: GitServer) -> None:
    dep = await service.deploy(slow_repo(git_server))
    await wait_building(service, dep["id"])
    (pid,) = await wait_for_worker(dep["id"], running=True)
    os.kill(pid, signal.SIGKILL)
    final = await service.wait_final(dep["id"], timeout=20)
    assert final["status"] == "failed"
    assert "worker exited (code -9)" in final["reason"]


async def test_cancel_stops_a_running_build(service: Service, git_server: GitServer) -> None:
    dep = await service.deploy(slow_repo(git_server))
    await wait_building(service, dep["id"])
    status, body = await service.post_json(f"/api/deployments/{dep['id']}/cancel", {})
    assert status == 200 and body["status"] == "canceled"
    # The worker notices within its watch interval and exits.
    await wait_for_worker(dep["id"], running=False, timeout=10)
    again = await service.post_json(f"/api/deployments/{dep['id']}/cancel", {})
    assert again[0] == 409


def test_leftovers_of_a_previous_run_are_failed_on_start(tmp_path, git_server: GitServer) -> None:
    first = Served(tmp_path / "data")
    first.start()
    status, dep = first.post_json("/api/deployments", {"repo_url": slow_repo(git_server, delay_ms=50)})
    assert status == 202, dep
    deadline = time.monotonic() + 60
    while first.get_json(f"/api/deployments/{dep['id']}")["status"] != "building":
        assert time.monotonic() < deadline, "never reached building"
        time.sleep(0.05)
    first.crash()  # server, its Redis and its workers die at once, ending nothing
    second = Served(tmp_path / "data")
    second.token = first.token
    second.start(expect_login=False)
    try:
        final = second.wait_final(dep["id"], timeout=20)
        assert final["status"] == "failed" and "restarted" in final["reason"], final
    finally:
        second.stop()


async def test_reaper_fails_deployments_nobody_holds(service: Service) -> None:
    store: Store = get_store(service.app)
    dep = await store.create_deployment("orphan", "http://127.0.0.1:9/x.git", "")
    await store.redis.delete(keys.lease(dep.id))
    assert await store.reap() == [dep.id]
    final = await store.get_deployment(dep.id)
    assert final.status == "failed" and "stopped reporting" in final.reason


async def test_rollback_moves_production_back(service: Service, git_server: GitServer) -> None:
    name = unique_name("rb")
    url = git_server.add_repo(name, files_dir=TINY_APP)
    first = await service.deploy(url, project=name)
    await service.wait_final(first["id"])
    git_server.commit_files(name, {"dist-note.txt": "second"})
    second = await service.deploy(url, project=name)
    await service.wait_final(second["id"])
    _, project = await service.get_json(f"/api/projects/{name}")
    assert project["production"] == second["id"]
    watch = await Watch(service).open(name)
    # Roll back only once the socket is subscribed: a rollback before that is in the snapshot
    # (is_production), not in a "production" frame, which is what this test watches for.
    await watch.wait_for(lambda: any(f["type"] == "subscribed" for f in watch.frames), timeout=10)
    status, body = await service.post_json(f"/api/projects/{name}/rollback", {"deployment": first["id"]})
    assert status == 200 and body["production"] == first["id"]
    await watch.wait_for(lambda: any(f.get("production") == first["id"] for f in watch.frames))
    await watch.close()
    _, deployments = await service.get_json(f"/api/projects/{name}/deployments")
    assert [d["is_production"] for d in deployments["deployments"]] == [False, True]
    status, _, page = await service.site(f"{name}--{second['id']}")
    assert status == 200 and b"Hello from tiny" in page


async def test_server_shutdown_ends_its_builds(
    tmp_path, redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server)
    dep = await service.deploy(slow_repo(git_server))
    await wait_building(service, dep["id"])
    await service.stop()
    store = Store(redis_server_client(redis_server))
    final = await store.get_deployment(dep["id"])
    await store.redis.aclose()
    assert final.status == "failed" and "shut down" in final.reason


def redis_server_client(server: RedisServer):  # type: ignore[no-untyped-def]
    from redis.asyncio import Redis

    return Redis.from_url(server.url, decode_responses=True)


async def test_builds_beyond_max_builds_wait_in_queued(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server, max_builds=1)
    first = await service.deploy(slow_repo(git_server, lines=300, delay_ms=10))
    second = await service.deploy(slow_repo(git_server, lines=5, delay_ms=0))
    await wait_building(service, first["id"])
    _, waiting = await service.get_json(f"/api/deployments/{second['id']}")
    assert waiting["status"] == "queued"
    assert (await service.wait_final(first["id"]))["status"] == "ready"
    final = await service.wait_final(second["id"])
    assert final["status"] == "ready"
    assert final["timestamps"]["cloning"] >= (await service.get_json(f"/api/deployments/{first['id']}"))[1]["timestamps"]["ready"]
