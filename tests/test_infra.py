"""The test infrastructure itself: real Redis, SeaweedFS S3 and Git over smart HTTP."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import botocore.exceptions
import botocore.session
import pytest
import redis
from aiobotocore.session import get_session

from tests.support.infra import TINY_APP, GitServer, RedisServer, S3Server, unique_name


def _git(
    *args: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    # As a deployer would run git: never prompt, no askpass or credential helper.
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_ASKPASS", "SSH_ASKPASS")}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    return subprocess.run(
        ["git", "-c", "credential.helper=", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _shallow_clone(url: str, dest: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return _git("clone", "--depth", "1", "--branch", "main", url, str(dest), timeout=timeout)


def test_redis_restart_keeps_data(redis_server: RedisServer) -> None:
    before = redis.Redis.from_url(redis_server.url)
    before.set("greeting", "hello")
    before.rpush("events", "a", "b")
    before.close()
    port, pid = redis_server.port, redis_server.pid

    redis_server.restart()

    assert (redis_server.port, redis_server.running) == (port, True)
    assert redis_server.pid != pid
    after = redis.Redis.from_url(redis_server.url)
    try:
        assert after.get("greeting") == b"hello"
        assert after.lrange("events", 0, -1) == [b"a", b"b"]
    finally:
        after.close()


def test_redis_stop_leaves_no_process(redis_server: RedisServer) -> None:
    pid = redis_server.pid
    assert pid is not None
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_git_shallow_clone_of_tiny(git_server: GitServer, tmp_path: Path) -> None:
    name = unique_name("tiny")
    url = git_server.add_repo(name, files_dir=TINY_APP, files={"tiny.json": '{"lines": 2}'})
    assert url == f"http://127.0.0.1:{git_server.port}/{name}.git"

    result = _shallow_clone(url, tmp_path / "checkout")

    assert result.returncode == 0, result.stderr
    checkout = tmp_path / "checkout"
    assert (checkout / ".git" / "shallow").is_file()
    assert {"package.json", "package-lock.json", "build.js", "tiny.json"} <= {
        p.name for p in checkout.iterdir()
    }
    assert _git("rev-parse", "HEAD", cwd=checkout).stdout.strip() == git_server.head_sha(name)
    assert _git("rev-list", "--count", "HEAD", cwd=checkout).stdout.strip() == "1"


def test_git_new_commit_and_concurrent_clones(git_server: GitServer, tmp_path: Path) -> None:
    name = unique_name("tiny")
    url = git_server.add_repo(name, files_dir=TINY_APP)
    sha = git_server.commit_files(name, {"tiny.json": '{"lines": 9}', "build.js": None})

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: _shallow_clone(url, tmp_path / f"c{i}"), range(6)))

    assert [r.returncode for r in results] == [0] * 6, [r.stderr for r in results]
    for i in range(6):
        checkout = tmp_path / f"c{i}"
        assert _git("rev-parse", "HEAD", cwd=checkout).stdout.strip() == sha
        assert (checkout / "tiny.json").read_text() == '{"lines": 9}'
        assert not (checkout / "build.js").exists()


def test_private_repo_clone_fails_fast_without_prompting(
    git_server: GitServer, tmp_path: Path
) -> None:
    name = unique_name("secret")
    url = git_server.add_repo(name, files_dir=TINY_APP, private=True)

    started = time.monotonic()
    result = _shallow_clone(url, tmp_path / "denied", timeout=20)
    elapsed = time.monotonic() - started

    assert result.returncode != 0
    assert elapsed < 10
    assert "terminal prompts disabled" in result.stderr or "Authentication failed" in result.stderr
    assert not (tmp_path / "denied").exists()
    # The same repo clones with the server's credentials, so the 401 was about auth only.
    assert _shallow_clone(git_server.url_with_credentials(name), tmp_path / "ok").returncode == 0


def test_s3_put_get_list_round_trip(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    try:
        client.put_object(
            Bucket=s3_bucket, Key="site/index.html", Body=b"<h1>hi</h1>", ContentType="text/html"
        )
        got = client.get_object(Bucket=s3_bucket, Key="site/index.html")
        assert got["Body"].read() == b"<h1>hi</h1>"
        assert got["ContentType"] == "text/html"
        listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="site/")
        assert [item["Key"] for item in listed["Contents"]] == ["site/index.html"]
    finally:
        client.close()


def test_s3_refuses_wrong_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    kwargs = {**s3_server.client_kwargs(), "aws_secret_access_key": "wrong"}
    intruder = botocore.session.get_session().create_client(
        "s3", config=s3_server.client_config(0), **kwargs
    )
    try:
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            intruder.list_objects_v2(Bucket=s3_bucket)
        assert caught.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied")
    finally:
        intruder.close()


async def test_s3_round_trip_with_aiobotocore(s3_server: S3Server, s3_bucket: str) -> None:
    session = get_session()
    async with session.create_client(
        "s3", config=s3_server.client_config(), **s3_server.client_kwargs()
    ) as s3:
        await s3.put_object(Bucket=s3_bucket, Key="logs/build.txt", Body=b"line 1\nline 2\n")
        response = await s3.get_object(Bucket=s3_bucket, Key="logs/build.txt")
        async with response["Body"] as stream:
            assert await stream.read() == b"line 1\nline 2\n"
