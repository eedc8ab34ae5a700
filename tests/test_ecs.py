"""The ECS runner against moto's ECS server on loopback: RunTask, retries, errors, the
reconciler, cancel and restarts. moto runs no containers, so no worker ever builds here:
the tests check what DeployHub asks of ECS and what it makes of ECS's answers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from deployhub import get_store, keys
from deployhub.runners.ecs import EcsRunner
from deployhub.settings import Settings, SettingsError
from deployhub.store import Deployment, Store
from tests.support.infra import RedisServer
from tests.support.moto_ecs import SECRETS_KEY, Cluster, FaultProxy
from tests.support.service import Service, StartService, make_settings


REPO = "http://127.0.0.1:9/app.git"


async def ecs_service(start_service: StartService, tmp_path: Path, redis: RedisServer,
                      cluster: Cluster, name: str = "data", **overrides: Any) -> Service:
    settings = make_settings(tmp_path / name, redis.url, **{**cluster.settings(), **overrides})
    return await start_service(settings)


async def wait_task(service: Service, dep_id: str, timeout: float = 15) -> Deployment:
    store = get_store(service.app)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dep = await store.get_deployment(dep_id)
        if dep.task_arn or dep.final:
            return dep
        await asyncio.sleep(0.05)
    raise AssertionError(f"no ECS task for {dep_id} after {timeout}s")


async def test_run_task_carries_what_the_worker_needs(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster
) -> None:
    service = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster,
                                ecs_task_redis_url="redis://builds.internal:6379/0",
                                ecs_task_s3_endpoint_url="http://s3.internal:9000")
    dep = await wait_task(service, (await service.deploy(REPO))["id"])
    assert not dep.final, dep.reason
    (task,) = ecs_cluster.tasks()
    assert task["taskArn"] == dep.task_arn and task["launchType"] == "FARGATE"
    assert task["startedBy"] == f"deployhub:{dep.id}"
    (override,) = task["overrides"]["containerOverrides"]
    assert override["name"] == "worker"
    assert override["command"] == [dep.id, "--lease-holder",
                                   f"ecs:{ecs_cluster.name}"]
    env = {e["name"]: e["value"] for e in override["environment"]}
    assert env["DEPLOYHUB_REDIS_URL"] == "redis://builds.internal:6379/0"
    assert env["DEPLOYHUB_S3_ENDPOINT_URL"] == "http://s3.internal:9000"
    assert env["DEPLOYHUB_S3_BUCKET"] == "builds" and "DEPLOYHUB_BUILD_TIMEOUT" in env
    assert not any(k.startswith(("DEPLOYHUB_ECS", "DEPLOYHUB_PORT", "DEPLOYHUB_DATA")) for k in env)
    subnet = {d["name"]: d["value"] for d in task["attachments"][0]["details"]}["subnetId"]
    assert subnet == ecs_cluster.subnet
    _, body = await service.get_json(f"/api/deployments/{dep.id}")
    assert body["status"] == "queued" and body["queue_position"] == 0  # has a slot, starting


async def test_without_a_task_redis_url_no_redis_url_is_sent(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster
) -> None:
    service = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster)
    await wait_task(service, (await service.deploy(REPO))["id"])
    (task,) = ecs_cluster.tasks()
    env = {e["name"] for e in task["overrides"]["containerOverrides"][0]["environment"]}
    assert "DEPLOYHUB_REDIS_URL" not in env  # the task definition's secret provides it


async def test_throttling_and_no_capacity_are_retried(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster,
    fault_proxy: FaultProxy,
) -> None:
    fault_proxy.faults = ["throttle", "capacity", "throttle"]
    service = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster,
                                ecs_endpoint_url=fault_proxy.url)
    dep = await wait_task(service, (await service.deploy(REPO))["id"], timeout=25)
    assert dep.task_arn and not dep.final, dep.reason
    assert fault_proxy.run_task_calls == 4
    assert len(ecs_cluster.tasks()) == 1


@pytest.mark.parametrize("setting, value, expected", [
    ("ecs_task_definition", "no-such-family", "To fix: check that DEPLOYHUB_ECS_TASK_DEFINITION"),
    ("ecs_subnets", ("subnet-00000000",), "'subnet-00000000' does not exist). To fix: check DEPLOYHUB_ECS_SUBNETS"),
])
async def test_a_permanent_error_ends_the_deployment_with_awss_message(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster,
    setting: str, value: Any, expected: str,
) -> None:
    service = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster, **{setting: value})
    final = await service.wait_final((await service.deploy(REPO))["id"], timeout=15)
    assert final["status"] == "failed"
    assert final["reason"].startswith("ECS refused to start the build task (") and expected in final["reason"]
    assert ecs_cluster.tasks() == []


async def test_a_task_that_stops_fails_its_deployment_with_the_reason(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster
) -> None:
    service = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster)
    dep = await wait_task(service, (await service.deploy(REPO))["id"])
    ecs_cluster.ecs.stop_task(cluster=ecs_cluster.name, task=dep.task_arn,
                              reason="Essential container in task exited")
    final = await service.wait_final(dep.id, timeout=15)
    assert final["status"] == "failed"
    assert "stopped before the build finished: Essential container in task exited" in final["reason"]
    assert "exit code 0" in final["reason"]  # moto reports 0 for every container
    assert await get_store(service.app).watched_tasks() == {}


async def test_cancel_stops_the_task(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster
) -> None:
    service = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster)
    dep = await wait_task(service, (await service.deploy(REPO))["id"])
    status, body = await service.post_json(f"/api/deployments/{dep.id}/cancel", {})
    assert status == 200 and body["status"] == "canceled"
    (task,) = ecs_cluster.tasks()
    assert task["desiredStatus"] == "STOPPED" and "Canceled by user" in task["stoppedReason"]


async def test_a_restart_leaves_running_tasks_to_the_next_server(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster
) -> None:
    first = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster)
    dep = await wait_task(first, (await first.deploy(REPO))["id"])
    await first.stop()
    (task,) = ecs_cluster.tasks()
    assert task["lastStatus"] == "RUNNING"  # the shutdown stopped nothing
    second = await start_service(first.settings)
    store = get_store(second.app)
    await store.redis.expire(keys.lease(dep.id), 2)  # as if the first had gone long ago
    await asyncio.sleep(7)  # > the lease left, > one reconcile round
    assert await store.reap() == []
    assert (await store.get_deployment(dep.id)).status == "queued"
    assert await store.redis.ttl(keys.lease(dep.id)) > 20  # the new server holds it


async def test_a_shutdown_while_run_task_waits_puts_the_deployment_back_in_the_queue(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService, ecs_cluster: Cluster,
    fault_proxy: FaultProxy,
) -> None:
    fault_proxy.faults = ["hang"]
    first = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster, name="first",
                              ecs_endpoint_url=fault_proxy.url)
    dep_id = (await first.deploy(REPO))["id"]
    while fault_proxy.run_task_calls == 0:
        await asyncio.sleep(0.05)
    await first.stop()
    second = await ecs_service(start_service, tmp_path, redis_server, ecs_cluster, name="second",
                               max_builds=1)
    dep = await wait_task(second, dep_id)
    assert dep.task_arn and not dep.final, dep.reason
    assert len(ecs_cluster.tasks()) == 1


async def test_a_capacity_provider_strategy_replaces_the_launch_type(
    tmp_path: Path, redis_server: RedisServer, ecs_cluster: Cluster
) -> None:
    # moto ignores capacityProviderStrategy, so this reads the parameters DeployHub would send.
    settings = make_settings(tmp_path, redis_server.url, **ecs_cluster.settings(),
                             ecs_capacity_providers=("FARGATE_SPOT:3:1", "FARGATE:1"))
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    store = Store(redis)
    params = EcsRunner(settings, store, client=None).run_task_params(
        await store.create_deployment("cap", REPO, ""))
    await redis.aclose()
    assert params["capacityProviderStrategy"] == [
        {"capacityProvider": "FARGATE_SPOT", "weight": 3, "base": 1},
        {"capacityProvider": "FARGATE", "weight": 1}]
    assert "launchType" not in params


def test_ecs_settings_say_what_is_missing() -> None:
    with pytest.raises(SettingsError, match="DEPLOYHUB_ECS_CLUSTER, DEPLOYHUB_ECS_TASK_DEFINITION"):
        Settings.from_env({"DEPLOYHUB_RUNNER": "ecs"})
    with pytest.raises(SettingsError, match="storage=s3"):
        Settings.from_env({"DEPLOYHUB_RUNNER": "ecs", "DEPLOYHUB_ECS_CLUSTER": "c",
                           "DEPLOYHUB_ECS_TASK_DEFINITION": "t", "DEPLOYHUB_ECS_SUBNETS": "s"})
    cloud = {"DEPLOYHUB_RUNNER": "ecs", "DEPLOYHUB_ECS_CLUSTER": "c",
             "DEPLOYHUB_ECS_TASK_DEFINITION": "t", "DEPLOYHUB_ECS_SUBNETS": "s",
             "DEPLOYHUB_STORAGE": "s3", "DEPLOYHUB_S3_BUCKET": "b", "DEPLOYHUB_REDIS_URL": "redis://r"}
    with pytest.raises(SettingsError, match="DEPLOYHUB_SECRETS_KEY"):  # the tasks decrypt too
        Settings.from_env(cloud)
    with pytest.raises(SettingsError, match="provider"):
        Settings.from_env({**cloud, "DEPLOYHUB_SECRETS_KEY": SECRETS_KEY,
                           "DEPLOYHUB_ECS_CAPACITY_PROVIDERS": "X:y"})
