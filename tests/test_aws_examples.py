"""deploy/aws/: the example task definition and IAM policies agree with the code they are for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from deployhub.settings import Settings, env_name
from deployhub.storage import FileStorage, blob_key, log_key, manifest_key, site_key
from worker.build import PASSTHROUGH_ENV
from worker.output import upload_site

AWS = Path(__file__).resolve().parent.parent / "deploy" / "aws"


def load(name: str) -> Any:
    return json.loads((AWS / name).read_text())


def statements(policy: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in policy["Statement"] if action in _list(s["Action"]) and s["Effect"] == "Allow"]


def resources(policy: dict[str, Any], action: str) -> set[str]:
    return {r for s in statements(policy, action) for r in _list(s["Resource"])}


def _list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def top(key: str) -> str:
    return key.split("/", 1)[0] + "/"


# What the worker writes, from the key functions it uses (the digest and id are placeholders).
WORKER_PREFIXES = {top(blob_key("0" * 64)), top(manifest_key("d")), top(log_key("d"))}
SERVER_PREFIXES = WORKER_PREFIXES | {top(site_key("d", "index.html"))}

TASK = load("task-definition.json")
CONTAINER = TASK["containerDefinitions"][0]
ENV = {e["name"]: e["value"] for e in CONTAINER["environment"]}
BUCKET = ENV["DEPLOYHUB_S3_BUCKET"]


@pytest.mark.parametrize("path", sorted(AWS.glob("*.json")), ids=lambda p: p.name)
def test_every_example_is_json_and_every_policy_is_well_formed(path: Path) -> None:
    document = json.loads(path.read_text())
    if "Statement" in document:
        assert document["Version"] == "2012-10-17"
        for statement in document["Statement"]:
            assert statement["Effect"] == "Allow" and statement["Action"], statement
            assert "*" not in _list(statement["Action"]), "no wildcard actions"


def test_the_task_definition_sets_only_what_deployhub_reads() -> None:
    settings_env = {env_name(f.name) for f in dataclasses.fields(Settings)}
    names = set(ENV) | {s["name"] for s in CONTAINER["secrets"]}
    unknown = names - settings_env - set(PASSTHROUGH_ENV)
    assert not unknown, f"not a DeployHub setting nor a variable the worker reads: {unknown}"
    settings = Settings.from_env({**ENV, "DEPLOYHUB_REDIS_URL": "redis://redis.example.internal:6379/0"})
    assert settings.storage == "s3" and settings.sandbox == "user"
    assert CONTAINER["name"] == Settings().ecs_container  # the runner overrides it by name
    assert "command" not in CONTAINER and "entryPoint" not in CONTAINER  # the image's ENTRYPOINT
    assert TASK["networkMode"] == "awsvpc" and "FARGATE" in TASK["requiresCompatibilities"]


async def test_the_task_role_writes_exactly_where_the_worker_writes(tmp_path: Path) -> None:
    # The worker's real upload, to file storage: the top-level directories are its prefixes.
    out = tmp_path / "src" / "dist"
    out.mkdir(parents=True)
    (out / "index.html").write_text("<!doctype html>" + "<p>hello</p>" * 100)
    storage = FileStorage(tmp_path / "storage")
    await upload_site(storage, "dep1", tmp_path / "src", out, lambda stream, text: None)
    written = {p.name + "/" for p in storage.root.iterdir()}
    assert written <= WORKER_PREFIXES, written  # the log (logs/) comes from worker/build.py

    policy = load("task-role-policy.json")
    expected = {f"arn:aws:s3:::{BUCKET}/{prefix}*" for prefix in WORKER_PREFIXES}
    assert resources(policy, "s3:PutObject") == expected
    assert resources(policy, "s3:AbortMultipartUpload") == expected  # multipart uploads
    assert resources(policy, "s3:GetObject") == {f"arn:aws:s3:::{BUCKET}/{top(blob_key('0'))}*"}
    assert resources(policy, "s3:ListBucket") == {f"arn:aws:s3:::{BUCKET}"}
    actions = {a for s in policy["Statement"] for a in _list(s["Action"])}
    assert actions == {"s3:PutObject", "s3:AbortMultipartUpload", "s3:GetObject", "s3:ListBucket"}


def test_the_server_role_runs_stops_and_passes_only_the_builder() -> None:
    policy = load("server-role-policy.json")
    region, account = "us-east-1", "123456789012"
    cluster = f"arn:aws:ecs:{region}:{account}:cluster/deployhub"
    assert resources(policy, "ecs:RunTask") == {
        f"arn:aws:ecs:{region}:{account}:task-definition/{TASK['family']}:*"}
    for action in ("ecs:RunTask", "ecs:DescribeTasks", "ecs:StopTask"):
        for statement in statements(policy, action):
            assert statement["Condition"]["ArnEquals"]["ecs:cluster"] == cluster
    assert resources(policy, "iam:PassRole") == {TASK["taskRoleArn"], TASK["executionRoleArn"]}
    (tag,) = statements(policy, "ecs:TagResource")  # RunTask sends tags
    assert tag["Condition"]["StringEquals"]["ecs:CreateAction"] == "RunTask"
    objects = {f"arn:aws:s3:::{BUCKET}/{prefix}*" for prefix in SERVER_PREFIXES}
    assert resources(policy, "s3:GetObject") == objects  # sites, manifests, logs
    assert resources(policy, "s3:DeleteObject") == objects  # the collector
    assert not statements(policy, "s3:PutObject")  # with runner=ecs only the tasks write
    assert all("*" != r for s in policy["Statement"] for r in _list(s["Resource"]))


def test_the_execution_role_pulls_the_image_and_writes_the_log_it_is_given() -> None:
    policy = load("execution-role-policy.json")
    logs = CONTAINER["logConfiguration"]["options"]
    (group,) = resources(policy, "logs:PutLogEvents")
    assert group.endswith(f":log-group:{logs['awslogs-group']}:*")
    assert resources(policy, "secretsmanager:GetSecretValue") == {
        s["valueFrom"] for s in CONTAINER["secrets"]}
    (repository,) = resources(policy, "ecr:BatchGetImage")
    assert CONTAINER["image"].split("/", 1)[1].split(":")[0] == repository.rsplit("/", 1)[1]
    trust = load("task-role-trust.json")
    assert trust["Statement"][0]["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
