"""A local ECS control plane for tests: moto's server mode on loopback, and a proxy that
answers a few RunTask calls with errors before it lets them through.

moto runs no containers: a task it "starts" stays RUNNING (the state manager is told to
progress tasks by hand) until the test stops it with StopTask.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from deployhub.embedded_redis import free_port
from tests.support.procs import HOST, Managed

REGION = "us-east-1"
# A fixed Fernet key: the servers and the worker of one test share it, as the task would.
SECRETS_KEY = "p2mLxv0y8c3gT3K6oTQJvQHcYJpZQ1yC3c3m6xW2k9E="
RUN_TASK_TARGET = "AmazonEC2ContainerServiceV20141113.RunTask"


class MotoServer(Managed):
    name = "moto"
    start_timeout = 60.0

    def __init__(self, base_dir: Path | None = None) -> None:
        super().__init__(base_dir)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/moto-api/data.json", timeout=1):
                return True
        except OSError:
            return False

    def hold_tasks(self) -> None:
        """Tasks stay in their state (RUNNING) until stopped, however often described."""
        body = json.dumps({"model_name": "ecs::task",
                           "transition": {"progression": "manual", "times": 1_000_000}}).encode()
        request = urllib.request.Request(self.url + "/moto-api/state-manager/set-transition",
                                         data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@dataclass
class Cluster:
    """A cluster, a Fargate task definition and a network of its own, in moto."""

    server: MotoServer
    name: str
    task_definition: str
    subnet: str
    security_group: str
    ecs: Any = field(repr=False)

    def tasks(self) -> list[dict[str, Any]]:
        arns = self.ecs.list_tasks(cluster=self.name)["taskArns"]
        return list(self.ecs.describe_tasks(cluster=self.name, tasks=arns)["tasks"]) if arns else []

    def settings(self, endpoint: str | None = None) -> dict[str, Any]:
        """make_settings overrides for runner=ecs against this cluster."""
        return {
            "runner": "ecs", "storage": "s3", "s3_bucket": "builds",
            "s3_endpoint_url": self.server.url, "ecs_cluster": self.name,
            "ecs_task_definition": self.task_definition, "ecs_subnets": (self.subnet,),
            "ecs_security_groups": (self.security_group,), "ecs_region": REGION,
            "ecs_endpoint_url": endpoint or self.server.url, "secrets_key": SECRETS_KEY,
        }


def make_cluster(server: MotoServer) -> Cluster:
    ec2, ecs = server.client("ec2"), server.client("ecs")
    s3 = server.client("s3")
    try:
        # The servers check at start-up that their bucket exists (moto serves S3 too).
        if "builds" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket="builds", **({} if REGION == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": REGION}}))
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        # As Fargate VPCs have it; moto's task ENIs also need it (they read a private DNS name).
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName=f"g-{uuid.uuid4().hex[:8]}",
                                          Description="builds", VpcId=vpc)["GroupId"]
    finally:
        ec2.close()
        s3.close()
    name = f"c-{uuid.uuid4().hex[:10]}"
    ecs.create_cluster(clusterName=name)
    family = f"builder-{name}"
    ecs.register_task_definition(
        family=family, networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
        cpu="1024", memory="2048",
        containerDefinitions=[{"name": "worker", "image": "deployhub-builder:test", "memory": 2048,
                               "essential": True}],
    )
    return Cluster(server, name, family, subnet, group, ecs)


class FaultProxy:
    """An HTTP proxy in front of moto that answers the first RunTask calls with the given
    faults ("throttle": a ThrottlingException, "capacity": a 200 with capacity `failures`,
    "hang": no answer), then forwards."""

    def __init__(self, upstream: str, faults: list[str]) -> None:
        self.upstream = upstream
        self.faults = list(faults)
        self.run_task_calls = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._release = asyncio.Event()  # ends every "hang" fault

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()
        self._session = ClientSession()

    async def stop(self) -> None:
        self._release.set()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("X-Amz-Target") == RUN_TASK_TARGET:
            self.run_task_calls += 1
            if self.faults:
                fault = self.faults.pop(0)
                if fault == "hang":  # never answers (until the proxy stops)
                    await self._release.wait()
                    return web.Response(status=503)
                if fault == "throttle":
                    return web.json_response(
                        {"__type": "ThrottlingException", "message": "Rate exceeded"}, status=400,
                        content_type="application/x-amz-json-1.1")
                if fault == "capacity":
                    return web.json_response(
                        {"tasks": [], "failures": [{"reason": "Capacity is unavailable at this time. "
                                                               "Please try again later."}]},
                        content_type="application/x-amz-json-1.1")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=body, headers=headers) as upstream:
            payload = await upstream.read()
            return web.Response(body=payload, status=upstream.status,
                                content_type=upstream.content_type)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    server.hold_tasks()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ecs_cluster(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A fresh cluster; the AWS chain finds dummy credentials in the environment (and never
    asks a metadata service)."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    cluster = make_cluster(moto_server)
    yield cluster
    cluster.ecs.close()


@pytest.fixture
async def fault_proxy(moto_server: MotoServer) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(moto_server.url, [])
    await proxy.start()
    yield proxy
    await proxy.stop()
