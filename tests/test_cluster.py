"""DeployHub on a three-node Redis Cluster: deploys, live logs by sharded pub/sub, sites.

The URL given is one node's, as a user pastes an ElastiCache configuration endpoint; the
server finds out it is a cluster by itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from deployhub import get_store, keys
from deployhub.live.hub import get_hub
from deployhub.redis_client import is_cluster
from tests.support.cluster import Cluster, command
from tests.support.cluster import redis_cluster as redis_cluster  # the fixture
from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import StartService, Watch, make_settings

LINES = 200


def spublish_calls(port: int) -> int:
    return int(command(port, "INFO", "commandstats").get("cmdstat_spublish", {}).get("calls", 0))


def projects_on_two_shards(cluster: Cluster) -> list[str]:
    """Two project names whose log streams (and channels) hash to different nodes."""
    first = unique_name("shard")
    while True:
        second = unique_name("shard")
        if cluster.node_of(keys.project_tag(second)) != cluster.node_of(keys.project_tag(first)):
            return [first, second]


async def test_deploys_stream_and_serve_on_a_cluster(
    redis_cluster: Cluster, start_service: StartService, git_server: GitServer, tmp_path: Path
) -> None:
    service = await start_service(make_settings(tmp_path / "data", redis_cluster.url))
    assert is_cluster(get_store(service.app).redis)
    config = f'{{"lines": {LINES}, "delayMs": 5}}'
    url = git_server.add_repo(unique_name("slow"), files_dir=TINY_APP, files={"tiny.json": config})
    projects = projects_on_two_shards(redis_cluster)
    deps = [await service.deploy(url, project=project) for project in projects]
    watches = [await Watch(service).open(project) for project in projects]  # while queued
    for watch, dep in zip(watches, deps):
        await watch.wait_status(dep["id"], "ready")
        stored = [e["seq"] for e in await service.logs(dep["id"])]
        assert stored == list(range(1, len(stored) + 1))
        assert watch.seqs(dep["id"]) == stored
        texts = [e["text"] for e in watch.lines[dep["id"]]]
        assert [t for t in texts if t.startswith("line ")] == [f"line {n}" for n in range(1, LINES + 1)]
        status, _, body = await service.site(dep["project"])
        assert status == 200 and b"Hello from tiny" in body
    # The lines came live, through the shards' subscriptions, not only from a final catch-up.
    assert get_hub(service.app).stats["log lines relayed"] >= 2 * LINES
    # Each project's stream lives on its own shard, and only there; its frames were SPUBLISHed
    # there (a classic PUBLISH would reach the hub too, but through every node of the cluster).
    owners = [redis_cluster.node_of(keys.log_stream(d["project"], d["id"])) for d in deps]
    assert owners[0] != owners[1]
    for dep, owner in zip(deps, owners):
        assert spublish_calls(owner) > 0
        stream = keys.log_stream(dep["project"], dep["id"])
        assert command(owner, "EXISTS", stream) == 1
        assert command(owner, "XLEN", stream) >= LINES
    for watch in watches:
        await watch.close()


async def test_a_project_and_its_logs_are_deleted_across_shards(
    redis_cluster: Cluster, start_service: StartService, git_server: GitServer, tmp_path: Path
) -> None:
    service = await start_service(make_settings(tmp_path / "data", redis_cluster.url))
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    assert (await service.wait_final(dep["id"]))["status"] == "ready"
    stream = keys.log_stream(dep["project"], dep["id"])
    owner = redis_cluster.node_of(stream)
    assert command(owner, "EXISTS", stream) == 1
    async with service.http.delete(f"{service.url}/api/projects/{dep['project']}") as r:
        assert r.status in (200, 204), await r.text()
    for _ in range(100):
        if command(owner, "EXISTS", stream) == 0:
            break
        await asyncio.sleep(0.05)
    assert command(owner, "EXISTS", stream) == 0
    record = keys.deployment(dep["id"])
    assert command(redis_cluster.node_of(record), "EXISTS", record) == 0


async def test_a_watcher_keeps_every_line_when_its_project_moves_to_another_shard(
    redis_cluster: Cluster, start_service: StartService, git_server: GitServer, tmp_path: Path
) -> None:
    service = await start_service(make_settings(tmp_path / "data", redis_cluster.url))
    config = '{"lines": 400, "delayMs": 10}'
    url = git_server.add_repo(unique_name("slow"), files_dir=TINY_APP, files={"tiny.json": config})
    dep = await service.deploy(url)
    watch = await Watch(service).open(dep["project"])
    await watch.wait_for(lambda: any(e["text"] == "line 50" for e in watch.lines.get(dep["id"], [])))
    stream = keys.log_stream(dep["project"], dep["id"])
    # The shard drops the hub's SSUBSCRIBE (an SUNSUBSCRIBE it did not ask for): it must
    # resubscribe on the new owner and catch the socket up from the stream.
    target = redis_cluster.move_slot(stream, [stream])
    channel = keys.channel(dep["project"])
    for _ in range(200):  # the hub subscribes again, on the new owner
        if command(target, "PUBSUB", "SHARDNUMSUB", channel) == [channel, 1]:
            break
        await asyncio.sleep(0.05)
    assert command(target, "PUBSUB", "SHARDNUMSUB", channel) == [channel, 1]
    await watch.wait_status(dep["id"], "ready")
    stored = [e["seq"] for e in await service.logs(dep["id"])]
    assert watch.seqs(dep["id"]) == stored == list(range(1, len(stored) + 1))
    assert spublish_calls(target) > 0  # the lines after the move went out on the new shard
    await watch.close()
