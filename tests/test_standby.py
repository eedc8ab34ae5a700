"""The local runner starts each build's worker before the build: `python -m worker --standby`."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from deployhub import get_runner
from deployhub.runners.local import LocalRunner
from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service
from tests.support.workers import wait_for_worker


async def waiting_worker(service: Service) -> int:
    """The pid of the standby worker, once it has imported what a build needs (it waits on
    its standard input then, sleeping)."""
    runner = get_runner(service.app)
    assert isinstance(runner, LocalRunner)
    deadline = time.monotonic() + 20
    while runner.standby is None and time.monotonic() < deadline:  # after a build's worker ends
        await asyncio.sleep(0.05)
    assert runner.standby is not None
    pid = (await runner.standby).pid
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "S":
                return pid
        await asyncio.sleep(0.05)
    raise AssertionError("the standby worker never came to wait")


async def test_a_build_runs_on_the_worker_started_before_it(service: Service, git_server: GitServer) -> None:
    first = await waiting_worker(service)
    dep = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    # It goes by the deployment's id, as a worker started for it would (operators find it so).
    assert await wait_for_worker(dep["id"], running=True) == [first]
    final = await service.wait_final(dep["id"], 60)
    assert final["status"] == "ready", final["reason"]
    # The next build's worker waits already, a new one.
    assert await waiting_worker(service) != first


async def test_a_standby_worker_that_died_is_replaced(service: Service, git_server: GitServer) -> None:
    os.kill(await waiting_worker(service), signal.SIGKILL)
    await asyncio.sleep(0.2)
    dep = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    final = await service.wait_final(dep["id"], 60)
    assert final["status"] == "ready", final["reason"]
