"""The same deploy with storage=s3 against a real S3-compatible server (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.infra import TINY_APP, GitServer, RedisServer, S3Server, unique_name
from tests.support.service import StartService, make_settings


async def test_deploy_to_s3_and_serve_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer,
    s3_server: S3Server, s3_bucket: str, start_service: StartService, git_server: GitServer,
) -> None:
    for name, value in s3_server.aws_env().items():
        monkeypatch.setenv(name, value)
    settings = make_settings(
        tmp_path / "data", redis_server.url, storage="s3", s3_bucket=s3_bucket,
        s3_prefix="dh", s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region,
    )
    service = await start_service(settings)
    dep = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    status, headers, body = await service.site(dep["project"], "/about/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    status, headers, css = await service.site(dep["project"], "/assets/style-9a8b7c6d.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    client = s3_server.client()
    try:
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    finally:
        client.close()
    assert f"dh/manifests/{dep['id']}.json" in keys
    assert len([k for k in keys if k.startswith("dh/blobs/")]) == 4  # one per file, by content
    assert f"dh/logs/{dep['id']}.ndjson" in keys
    assert not (tmp_path / "data" / "storage").exists()
