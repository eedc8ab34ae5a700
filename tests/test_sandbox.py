"""Build commands run in a bubblewrap sandbox: a clean environment, none of the host visible,
only the build's own directories writable, and nothing left running when a build ends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TypeVar

import pytest

import deployhub
from tests.support.infra import (
    FIXTURES_DIR,
    TINY_APP,
    GitServer,
    RedisServer,
    unique_name,
)
from tests.support.service import Service, StartService, make_settings
from tests.support.workers import wait_for_worker
from worker import cgroups, sandbox
from worker.detect import BuildError, find_output
from worker.output import collect_files, open_beneath

MALICIOUS = FIXTURES_DIR / "malicious"
T = TypeVar("T")


def snoop_results(texts: list[str]) -> dict[str, str]:
    """`SNOOP <kind> <what> <result>` lines of the snoop fixture, as {"<kind> <what>": result}."""
    found = {}
    for text in texts:
        if text.startswith("SNOOP "):
            kind, what, *rest = text.split(" ", 3)[1:]
            found[f"{kind} {what}"] = rest[0] if rest else ""
    return found


async def log_texts(service: Service, dep_id: str) -> list[str]:
    return [e["text"] for e in await service.logs(dep_id)]


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker` (sandboxed processes are host processes too)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


async def wait_for_processes(marker: str, present: bool, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while bool(processes_with(marker)) != present:
        assert time.monotonic() < deadline, f"processes with {marker}: {processes_with(marker)}"
        await asyncio.sleep(0.05)


def check_sandbox(**env: str) -> subprocess.CompletedProcess[str]:
    """`python -m worker --check-sandbox` with DEPLOYHUB_* set to `env` only."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "worker", "--check-sandbox"], env={**clean, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_bwrap_works_here() -> None:
    result = check_sandbox()  # no DEPLOYHUB_REDIS_URL either: the check needs none
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    usage = subprocess.run([sys.executable, "-m", "worker"], capture_output=True, text=True,
                           timeout=60, check=False)
    assert usage.returncode == 2 and "deployment id is required" in usage.stderr


async def test_build_sees_a_clean_env_and_none_of_the_host(
    service: Service, git_server: GitServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-aws-secret")  # the worker gets AWS_*
    data = service.settings.data_dir
    (data / "secret.txt").write_text("canary-data-secret\n")
    server_file = str(Path(deployhub.__file__).resolve())
    outside = tmp_path / "outside.txt"
    hidden = [str(data), str(data / "secret.txt"), "/root", server_file, "/etc/ssl/private"]
    writes = ["/build/src/ok", "/build/home/ok", "/tmp/ok", "/build/x", "/usr/x", "/etc/x", str(outside)]
    target = {"read": [*hidden, "/build"], "write": writes}
    url = git_server.add_repo(unique_name("snoop"), files_dir=MALICIOUS / "snoop",
                              files={"target.json": json.dumps(target)})
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"])
    texts = await log_texts(service, dep["id"])
    found = snoop_results(texts)
    assert final["status"] == "ready", final["reason"]
    env = json.loads(next(t for t in texts if t.startswith("SNOOP env "))[len("SNOOP env "):])
    assert not [k for k in env if k.startswith(("DEPLOYHUB_", "AWS_")) or "REDIS" in k.upper()], env
    assert env["HOME"] == "/build/home"
    pids = next(t for t in texts if t.startswith("SNOOP pids ")).split()[2].split(",")
    assert len(pids) < 10  # its own pid namespace: no host processes
    assert [found[f"read {p}"] for p in hidden] == ["ENOENT"] * len(hidden)
    assert found["read /build"] == "OK cache,home,src"
    assert [found[f"write {p}"] for p in writes] == ["OK", "OK", "OK", "EROFS", "EROFS", "EROFS", "ENOENT"]
    assert not outside.exists()
    assert "canary" not in "\n".join(texts)


def forever_repo(git_server: GitServer, marker: str) -> str:
    return git_server.add_repo(unique_name("forever"), files_dir=MALICIOUS / "forever",
                               files={"target.json": json.dumps({"marker": marker})})


def leftover_cgroups(dep_id: str) -> list[Path]:
    parents = [cgroups.builds_dir(c) for c in ("memory", "pids")]
    return [p for parent in parents if parent and parent.is_dir() for p in parent.glob(f"{dep_id}-*")]


async def test_cancel_kills_every_process_of_the_build(service: Service, git_server: GitServer) -> None:
    marker = unique_name("daemon")
    dep = await service.deploy(forever_repo(git_server, marker))
    await wait_for_processes(marker, present=True, timeout=30)  # a daemon in its own session
    status, body = await service.post_json(f"/api/deployments/{dep['id']}/cancel", {})
    assert status == 200 and body["status"] == "canceled"
    await wait_for_processes(marker, present=False, timeout=10)
    for _ in range(100):  # the worker removes the build's cgroups once it is done
        if not leftover_cgroups(dep["id"]):
            break
        await asyncio.sleep(0.05)
    assert leftover_cgroups(dep["id"]) == []


async def test_killed_worker_takes_its_sandbox_along(service: Service, git_server: GitServer) -> None:
    marker = unique_name("daemon")
    dep = await service.deploy(forever_repo(git_server, marker))
    await wait_for_processes(marker, present=True, timeout=30)
    (pid,) = await wait_for_worker(dep["id"], running=True)
    os.kill(pid, signal.SIGKILL)
    await wait_for_processes(marker, present=False, timeout=10)  # bwrap --die-with-parent
    final = await service.wait_final(dep["id"], timeout=20)
    assert final["status"] == "failed"


async def test_sandbox_none_still_builds_with_a_warning(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server, sandbox="none")
    dep = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = await log_texts(service, dep["id"])
    assert any(t.startswith("Warning: DEPLOYHUB_SANDBOX=none") for t in texts)
    status, _, body = await service.site(dep["project"])
    assert status == 200 and b"Hello from tiny" in body


def test_unusable_bwrap_fails_builds_naming_the_escape_hatch(tmp_path: Path) -> None:
    missing = check_sandbox(DEPLOYHUB_BWRAP=str(tmp_path / "bwrap"))
    assert missing.returncode == 1
    assert f"{tmp_path / 'bwrap'} (DEPLOYHUB_BWRAP) does not exist" in missing.stdout
    broken = check_sandbox(DEPLOYHUB_BWRAP="/bin/false")  # as bwrap does without user namespaces
    assert broken.returncode == 1
    assert "/bin/false cannot run here (exit code 1)" in broken.stdout
    assert "user namespaces" in broken.stdout and "DEPLOYHUB_SANDBOX=none" in broken.stdout


def test_output_limits_and_symlinked_parents(tmp_path: Path) -> None:
    out = tmp_path / "src" / ".output" / "public"
    out.mkdir(parents=True)
    for name in ("a.html", "b.html", "c.html"):
        (out / name).write_bytes(b"x" * 600_000)
    fd = open_beneath(tmp_path / "src", ".output/public", directory=True)
    try:
        assert [size for _, size in collect_files(fd, lambda *_: None)] == [600_000] * 3
        with pytest.raises(BuildError, match=r"more than 2 files \(DEPLOYHUB_BUILD_MAX_OUTPUT_FILES\)"):
            collect_files(fd, lambda *_: None, max_files=2)
        with pytest.raises(BuildError, match=r"larger than 1 MiB \(DEPLOYHUB_BUILD_MAX_OUTPUT_MB\)"):
            collect_files(fd, lambda *_: None, max_bytes=1024 * 1024)
    finally:
        os.close(fd)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".output").symlink_to(tmp_path / "src" / ".output")  # a parent symlink
    with pytest.raises(OSError):
        os.close(open_beneath(tmp_path / "evil", ".output/public", directory=True))
    assert find_output(tmp_path / "src") == out
    with pytest.raises(BuildError, match="no output directory"):
        find_output(tmp_path / "evil")


async def test_without_cgroups_the_log_says_which_limits_are_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "builds_dir", lambda controller: None)  # no cgroup v1...
    monkeypatch.setattr(cgroups, "v2_location", lambda: None)  # ...and no v2 either
    settings = make_settings(tmp_path / "data", None, sandbox="none", build_max_disk_mb=1)
    lines: list[str] = []
    box = sandbox.Sandbox(settings, "dep1", tmp_path, tmp_path / "src", lambda _s, t: lines.append(t))
    async with box.prepare(["npm", "ci"], {"PATH": "/usr/bin"}) as command:
        # Only RLIMIT_FSIZE (1 MiB in 512-byte blocks) left to set before the command.
        assert command.argv == ["/bin/sh", "-c", cgroups.CGROUP_WRAPPER, "sh", "2048", "--", "npm", "ci"]
        assert command.env == {"PATH": "/usr/bin"}
    assert lines == [
        "Warning: DEPLOYHUB_SANDBOX=none: build commands run WITHOUT isolation, with DeployHub's "
        "own rights on this machine",
        "Limits: disk 1 MiB",
        "Warning: no cgroup v1 or v2 memory controller is available; DEPLOYHUB_BUILD_MEMORY_MB "
        "is not enforced for this build",
        "Warning: no cgroup v1 or v2 pids controller is available; DEPLOYHUB_BUILD_MAX_PROCESSES "
        "is not enforced for this build",
    ]


async def test_without_cgroups_builds_can_be_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "builds_dir", lambda controller: None)
    monkeypatch.setattr(cgroups, "v2_location", lambda: None)
    settings = make_settings(tmp_path / "data", None, sandbox="none", build_without_limits="refuse")
    box = sandbox.Sandbox(settings, "dep1", tmp_path, tmp_path / "src", lambda _s, _t: None)
    with pytest.raises(BuildError) as refused:
        async with box.prepare(["npm", "ci"], {"PATH": "/usr/bin"}):
            raise AssertionError("the command must not run")
    assert str(refused.value) == (
        "Builds are refused on this machine because a limit cannot be enforced: no cgroup v1 "
        "or v2 memory controller is available (DEPLOYHUB_BUILD_MEMORY_MB); no cgroup v1 or v2 "
        "pids controller is available (DEPLOYHUB_BUILD_MAX_PROCESSES). Make the cgroup writable "
        "for DeployHub, or set DEPLOYHUB_BUILD_WITHOUT_LIMITS=run to build without it."
    )


async def test_cgroup_setup_and_teardown_run_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    create, close = cgroups.Cgroups.create, cgroups.Cgroups.close

    def record(result: T) -> T:
        threads.append(threading.current_thread().name)
        return result

    monkeypatch.setattr(cgroups.Cgroups, "create", classmethod(lambda _c, *a, **k: record(create(*a, **k))))
    monkeypatch.setattr(cgroups.Cgroups, "close", lambda groups: record(close(groups)))
    settings = make_settings(tmp_path / "data", None, sandbox="none")
    box = sandbox.Sandbox(settings, "dep1", tmp_path, tmp_path / "src", lambda _s, _t: None)
    async with box.prepare(["true"], {"PATH": "/usr/bin"}):
        assert len(threads) == 1
    assert len(threads) == 2 and threading.main_thread().name not in threads


async def test_server_refuses_builds_when_the_sandbox_cannot_run(
    tmp_path: Path, redis_server: RedisServer,
    start_service: StartService,
) -> None:
    missing = str(tmp_path / "no-bwrap")
    # The setting reaches `python -m worker --check-sandbox`, which the local runner runs.
    service = await start_service(redis=redis_server, bwrap=missing)
    status, body = await service.post_json("/api/deployments", {"repo_url": "http://127.0.0.1:9/a.git"})
    assert status == 503
    assert f"{missing} (DEPLOYHUB_BWRAP) does not exist" in body["error"]
    assert "DEPLOYHUB_SANDBOX=none" in body["error"]
    _, projects = await service.get_json("/api/projects")
    assert projects["projects"] == []


@pytest.mark.parametrize("without_limits", ["run", "refuse"])
async def test_serve_says_at_start_which_limits_do_not_hold(
    tmp_path: Path, redis_server: RedisServer, start_service: StartService,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, without_limits: str,
) -> None:
    # The worker's own check runs in a child process: make it see a host with no cgroups.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import worker.cgroups as c\nc.builds_dir = lambda controller: None\nc.v2_location = lambda: None\n")
    monkeypatch.setenv("PYTHONPATH", f"{hook}:{os.environ.get('PYTHONPATH', '')}")
    service = await start_service(redis=redis_server, build_without_limits=without_limits)
    missing = ("no cgroup v1 or v2 memory controller is available (DEPLOYHUB_BUILD_MEMORY_MB); "
               "no cgroup v1 or v2 pids controller is available (DEPLOYHUB_BUILD_MAX_PROCESSES)")
    assert f"build limits NOT enforced on this machine: {missing}" in caplog.messages
    status, body = await service.post_json("/api/deployments", {"repo_url": "http://127.0.0.1:9/a.git"})
    if without_limits == "refuse":
        assert status == 503 and missing in body["error"]
        assert "DEPLOYHUB_BUILD_WITHOUT_LIMITS=run" in body["error"]
    else:
        assert status in (200, 201, 202), body


def test_without_network_namespaces_builds_are_refused_naming_the_setting(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"  # a bwrap that works only with the host's network
    fake.write_text('#!/bin/sh\ncase " $* " in *" --share-net "*) exit 0;; esac\n'
                    'echo "bwrap: loopback: Failed RTM_NEWADDR: Operation not permitted" >&2\nexit 1\n')
    fake.chmod(0o755)
    refused = check_sandbox(DEPLOYHUB_BWRAP=str(fake))
    assert refused.returncode == 1
    assert f"{fake} cannot make one here" in refused.stdout
    assert "DEPLOYHUB_BUILD_NETWORK=host" in refused.stdout and "UNSAFE" in refused.stdout
    shared = check_sandbox(DEPLOYHUB_BWRAP=str(fake), DEPLOYHUB_BUILD_NETWORK="host")
    assert (shared.returncode, shared.stdout) == (0, "")
