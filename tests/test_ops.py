"""Operations: probes and metrics, Redis going away under a running server, and start-up
errors that name the setting to fix."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from deployhub.embedded_redis import free_port
from tests.support.infra import TINY_APP, GitServer, RedisServer, S3Server, unique_name
from tests.support.procs import clean_env
from tests.support.service import Service, StartService


async def test_probes_and_metrics_after_a_deploy(service: Service, git_server: GitServer) -> None:
    dep = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    assert (await service.wait_final(dep["id"]))["status"] == "ready"
    await service.site(dep["project"], "/")
    assert await service.get_json("/healthz") == (200, {"status": "ok"})
    assert await service.get_json("/readyz") == (200, {"status": "ok", "redis": "ok", "storage": "ok"})
    async with service.http.get(service.url + "/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    assert float(lines['deployhub_deployments_total{status="ready"}']) >= 1
    assert float(lines['deployhub_build_phase_seconds_count{phase="building"}']) >= 1
    assert float(lines['deployhub_build_phase_seconds_bucket{le="+Inf",phase="cloning"}']) >= 1
    assert float(lines['deployhub_site_requests_total{status="200"}']) >= 1
    assert "deployhub_websocket_connections 0.0" in text and "deployhub_queue_length" in text


@pytest.mark.timeout(180)
async def test_redis_away_then_back(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server)
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    redis_server.stop()
    try:
        status, body = await service.get_json("/api/projects")
        assert status == 503 and "Redis" in body["error"]
        async with service.http.get(service.url + "/api/projects") as response:
            assert response.headers["Retry-After"] == "5"
        status, body = await service.get_json("/readyz")
        assert status == 503 and body["redis"] != "ok" and body["storage"] == "ok"
        assert (await service.get_json("/healthz"))[0] == 200
        assert (await service.site("nosuchsite", "/"))[0] == 503
    finally:
        redis_server.start()
    # The pool still holds connections to the old server: each must be retried, not failed.
    deps = await asyncio.gather(*(service.deploy(url, project=unique_name("back")) for _ in range(3)))
    finals = await asyncio.gather(*(service.wait_final(d["id"], timeout=120) for d in deps))
    assert [f["status"] for f in finals] == ["ready"] * 3, [f["reason"] for f in finals]


def serve_once(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deployhub", "serve", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data"), *args],
        env={**clean_env(), **(env or {})}, capture_output=True, text=True, timeout=60,
    )


def test_an_unreachable_redis_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = serve_once(tmp_path, "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout and "hunter2" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("deployhub: ")]
    assert error == [f"deployhub: DEPLOYHUB_REDIS_URL: cannot use Redis at redis://127.0.0.1:{port}/0: "
                     + error[0].split(f"{port}/0: ", 1)[1]], result.stderr


def test_a_missing_bucket_is_one_line_naming_the_setting(
    tmp_path: Path, redis_server: RedisServer, s3_server: S3Server
) -> None:
    result = serve_once(tmp_path, "--redis-url", redis_server.url, "--storage", "s3",
                        "--s3-bucket", "no-such-bucket", "--s3-endpoint-url", s3_server.endpoint_url,
                        env=s3_server.aws_env())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "deployhub: DEPLOYHUB_S3_BUCKET: the bucket 'no-such-bucket' does not exist" in result.stderr
