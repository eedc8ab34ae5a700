"""The whole cloud path: two replicas with runner=ecs, storage=s3 and one Redis. The test reads
the task's overrides back from the ECS API (moto) and runs the worker exactly as the build
container would (its entrypoint, its environment, build commands as an unprivileged account);
a watcher on the other replica gets every line, and both replicas serve the site from S3."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.infra import GitServer, RedisServer, S3Server
from tests.support.moto_ecs import SECRETS_KEY, Cluster
from tests.support.service import StartService, Watch, make_settings
from tests.test_account import open_data_dir, probe_repo  # noqa: F401 (a fixture)

# What Dockerfile.builder's ENV and the task definition give the container.
IMAGE_ENV = {"DEPLOYHUB_SANDBOX": "user", "DEPLOYHUB_BUILD_NETWORK": "host", "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(180)
async def test_a_deploy_through_ecs_and_s3_end_to_end(
    tmp_path: Path, open_data_dir: Path, redis_server: RedisServer, s3_server: S3Server,  # noqa: F811
    s3_bucket: str, ecs_cluster: Cluster, start_service: StartService, git_server: GitServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_server.aws_env().items():  # moto takes any credentials; SeaweedFS these
        monkeypatch.setenv(name, value)
    cloud = {**ecs_cluster.settings(), "s3_bucket": s3_bucket, "s3_endpoint_url": s3_server.endpoint_url,
             "s3_region": s3_server.region}
    replicas = [await start_service(make_settings(tmp_path / name, redis_server.url, **cloud))
                for name in ("a", "b")]
    secret = open_data_dir.parent / "task-only.key"
    secret.write_text("canary")
    secret.chmod(0o600)
    dep = await replicas[0].deploy(probe_repo(git_server, secret))
    watch = await Watch(replicas[1]).open(dep["project"], token=replicas[0].token)
    for _ in range(200):
        if tasks := ecs_cluster.tasks():
            break
        await asyncio.sleep(0.05)
    (override,) = tasks[0]["overrides"]["containerOverrides"]
    env = {
        "PATH": os.environ["PATH"], "HOME": "/root", **s3_server.aws_env(),  # the task role's
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/canary-relative-uri",
        **IMAGE_ENV, "DEPLOYHUB_DATA_DIR": str(open_data_dir), "DEPLOYHUB_BUILD_USER": "nobody",
        # The task definition's secrets, never in the overrides:
        "DEPLOYHUB_REDIS_URL": redis_server.url, "DEPLOYHUB_SECRETS_KEY": SECRETS_KEY,
        **{e["name"]: e["value"] for e in override["environment"]},
    }
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *override["command"], env=env,  # ENTRYPOINT + command
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(worker.communicate(), 150)
    assert worker.returncode == 0, output.decode()[-3000:]
    final = await replicas[0].wait_final(dep["id"], timeout=30)
    stored = await replicas[0].logs(dep["id"])
    assert final["status"] == "ready", (final["reason"], [e["text"] for e in stored][-20:])
    await watch.wait_for(lambda: watch.seqs(dep["id"]) == [e["seq"] for e in stored], timeout=20)
    await watch.close()
    report = json.loads(next(e["text"] for e in stored if e["text"].startswith("probe "))[6:])
    assert report["uid"] == 65534 and report["parent"] == "EACCES" and report["env"] == []
    for replica in replicas:
        status, _, body = await replica.site(dep["project"])
        assert status == 200 and b"built by 65534" in body
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert f"logs/{dep['id']}.ndjson" in keys
