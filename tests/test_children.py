"""close_child: a child's pipes are closed when it ends, even while a process it started
still holds them (the upload's forkserver does), and a running child is killed."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import pytest

from deployhub.children import close_child

PIPE = asyncio.subprocess.PIPE


async def test_a_child_whose_grandchild_holds_the_pipes_is_closed_at_once() -> None:
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", "sleep 60 & echo started", stdin=PIPE, stdout=PIPE, stderr=PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"started\n"
        with pytest.raises(TimeoutError):  # the sh is gone, but the sleep holds the pipe
            await asyncio.wait_for(proc.stdout.read(), 1)
        async with asyncio.timeout(5):
            await close_child(proc)
        assert await proc.wait() == 0
        assert await proc.stdout.read() == b"" and proc.stdout.at_eof()
        gc.collect()  # an unclosed pipe would warn here (filterwarnings = error)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


async def test_a_child_still_running_is_killed() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "60", stdout=PIPE, stderr=PIPE)
    async with asyncio.timeout(5):
        await close_child(proc)
    assert proc.returncode == -signal.SIGKILL
