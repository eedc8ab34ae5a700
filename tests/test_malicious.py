"""Repositories whose build attacks the machine (tests/fixtures/malicious/): each attack fails or
is contained, the deployment ends with a reason naming the limit, nothing secret reaches the
log, and another user's build running at the same time still succeeds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.infra import (
    TINY_APP,
    GitServer,
    RedisServer,
    unique_name,
)
from tests.support.service import Service, StartService
from tests.test_sandbox import MALICIOUS, processes_with, snoop_results, wait_for_processes
from worker.bwrap import INSIDE_PATH
from worker.sandbox import limits_in_force

CANARIES = {"DEPLOYHUB_CANARY_SECRET": "canary-server-secret-4f1c",
            "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-9d2e"}
DATA_SECRET = "canary-data-secret-77ab"


@pytest.fixture(autouse=True)
def canaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets in the server's environment (the worker inherits AWS_*): no log may show them."""
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)


def attack(git_server: GitServer, name: str, **target: Any) -> str:
    return git_server.add_repo(unique_name(name), files_dir=MALICIOUS / name,
                               files={"target.json": json.dumps(target)})


async def with_bystander(
    service: Service, git_server: GitServer, url: str, timeout: float = 60
) -> tuple[dict[str, Any], list[str]]:
    """Deploy `url` while another user deploys the tiny app: that one must end ready, and the
    attacker's log must hold no secret. Returns the attacker's deployment and log lines."""
    bad = await service.deploy(url)
    good = await service.deploy(git_server.add_repo(unique_name("bystander"), files_dir=TINY_APP))
    final = await service.wait_final(bad["id"], timeout)
    other = await service.wait_final(good["id"], 60)
    assert other["status"] == "ready", other["reason"]
    texts = [e["text"] for e in await service.logs(bad["id"])]
    leaked = [s for s in [*CANARIES.values(), DATA_SECRET] if s in "\n".join(texts) + final["reason"]]
    assert not leaked, leaked
    return final, texts


def require_limit(controller: str) -> None:
    """Never run a fork bomb or a memory hog unless a cgroup limit is proven to hold here."""
    if not limits_in_force().get(controller):
        pytest.skip(f"NO CGROUP v1 {controller.upper()} LIMIT CAN BE ENFORCED ON THIS MACHINE: "
                    "refusing to run this attack without it")


async def test_reading_server_data_and_environments_finds_nothing(
    service: Service, git_server: GitServer
) -> None:
    data = service.settings.data_dir
    (data / "secret.txt").write_text(DATA_SECRET)
    paths = [str(data / "secret.txt"), str(data / "storage"), str(data / "builds"),
             f"/proc/{os.getpid()}/environ", "/proc/1/root/root"]
    final, texts = await with_bystander(service, git_server, attack(git_server, "snoop", read=paths))
    assert final["status"] == "ready", final["reason"]
    found = snoop_results(texts)
    assert [found[f"read {p}"] for p in paths] == ["ENOENT"] * len(paths)
    environs = {k: v for k, v in found.items() if k.startswith("environ ")}
    assert environs["environ 1"] == f"OK PATH={INSIDE_PATH} PWD=/ "  # bwrap, the sandbox's pid 1
    assert all(str(data) not in v and "DEPLOYHUB_" not in v and "AWS_" not in v for v in environs.values())


async def test_writing_outside_the_build_dir_changes_nothing(
    service: Service, git_server: GitServer, tmp_path: Path
) -> None:
    data = service.settings.data_dir
    (data / "secret.txt").write_text(DATA_SECRET)
    paths = [str(data / "secret.txt"), str(data / "storage" / "planted.html"),
             str(tmp_path / "planted.txt"), "/etc/cron.d/planted", "/usr/bin/planted"]
    final, texts = await with_bystander(service, git_server, attack(git_server, "snoop", write=paths))
    assert final["status"] == "ready", final["reason"]
    results = snoop_results(texts)
    assert [results[f"write {p}"] for p in paths] == ["ENOENT", "ENOENT", "ENOENT", "ENOENT", "EROFS"]
    assert (data / "secret.txt").read_text() == DATA_SECRET
    assert not any(Path(p).exists() for p in paths[1:])


async def test_fork_bomb_hits_the_process_limit(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    require_limit("pids")
    service = await start_service(redis=redis_server, build_max_processes=64)
    marker = unique_name("bomb")
    final, texts = await with_bystander(service, git_server, attack(git_server, "forkbomb", marker=marker))
    assert final["status"] == "failed"
    assert "more than 64 processes" in final["reason"] and "DEPLOYHUB_BUILD_MAX_PROCESSES" in final["reason"]
    assert f"Limits: memory {service.settings.build_memory_mb} MiB, 64 processes, disk 8192 MiB" in texts
    await wait_for_processes(marker, present=False, timeout=5)


async def test_memory_hog_hits_the_memory_limit(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    require_limit("memory")
    service = await start_service(redis=redis_server, build_memory_mb=256)
    final, texts = await with_bystander(service, git_server, attack(git_server, "memhog"))
    assert final["status"] == "failed"
    assert "the limit is 256 MiB" in final["reason"] and "DEPLOYHUB_BUILD_MEMORY_MB" in final["reason"]
    assert re.search(r"it used \d+ MiB at its peak", final["reason"]), final["reason"]
    assert "Limits: memory 256 MiB, 512 processes, disk 8192 MiB" in texts
    assert "holding 3 GiB and still alive" not in texts


async def test_log_flood_is_cut_and_the_build_goes_on(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server, log_max_bytes=200_000, build_timeout=60)
    started = time.monotonic()
    final, texts = await with_bystander(service, git_server, attack(git_server, "logflood"))
    # 300 MiB of output: the log keeps its first 200 kB and a marker, the build finishes.
    assert final["status"] == "ready", final["reason"]
    assert any("(DEPLOYHUB_LOG_MAX_BYTES)" in t for t in texts)
    assert sum(len(t) for t in texts) < 250_000
    assert time.monotonic() - started < 30


async def test_endless_build_is_stopped_by_the_timeout(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server, build_timeout=8)
    marker = unique_name("forever")
    started = time.monotonic()
    final, texts = await with_bystander(service, git_server, attack(git_server, "forever", marker=marker))
    assert final["status"] == "failed" and "DEPLOYHUB_BUILD_TIMEOUT" in final["reason"]
    assert time.monotonic() - started < 15
    assert "still building" in texts
    await wait_for_processes(marker, present=False, timeout=5)  # its daemon too
    assert processes_with(marker) == []


async def test_symlinks_in_the_output_are_never_followed(service: Service, git_server: GitServer) -> None:
    linked = await service.deploy(attack(git_server, "symlinks", linkOutput=True))
    final, texts = await with_bystander(service, git_server, attack(git_server, "symlinks"))
    assert final["status"] == "ready", final["reason"]
    assert "Skipped leak.txt: a symlink" in texts and "Skipped symlinked directory etc" in texts
    for path in ("/leak.txt", "/assets/leak.css"):
        status, _, _ = await service.site(final["project"], path)
        assert status == 404
    _, _, body = await service.site(final["project"], "/etc/passwd")
    assert b"root:" not in body
    manifest = service.settings.data_dir / "storage" / "manifests" / f"{final['id']}.json"
    assert sorted(json.loads(manifest.read_text())["files"]) == ["index.html"]
    # The output directory itself a symlink (dist -> /etc, .output/public -> /etc): refused.
    other = await service.wait_final(linked["id"])
    assert other["status"] == "failed" and "no output directory" in other["reason"]


async def test_filling_the_disk_hits_the_disk_limit(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server, build_max_disk_mb=40)
    started = time.monotonic()
    final, texts = await with_bystander(service, git_server, attack(git_server, "diskfill"))
    assert final["status"] == "failed"
    assert final["reason"] == (
        "The build filled more than 40 MiB of disk (DEPLOYHUB_BUILD_MAX_DISK_MB) and was stopped."
    )
    assert f"Limits: memory {service.settings.build_memory_mb} MiB, 512 processes, disk 40 MiB" in texts
    assert time.monotonic() - started < 60
    written = max(int(t.split()[1]) for t in texts if t.startswith("wrote "))
    print(f"diskfill overshoot: wrote at least {written} MiB against a 40 MiB limit")
    assert written < 40 + 400  # the overshoot: what it wrote in one interval, here < 400 MiB
    # The build directory goes once the result is recorded (deleting it can take a while).
    deadline = time.monotonic() + 30
    while (service.settings.data_dir / "builds" / final["id"]).exists():
        assert time.monotonic() < deadline, "the filled build directory was not deleted"
        await asyncio.sleep(0.2)
