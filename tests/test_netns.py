"""The egress proxy's socket made inside a sandbox's network namespace (worker/netns.py),
against the real bwrap."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from worker import bwrap, netns
from worker.netns import BlockedStart, pick_port


async def start_bwrap(blocked: BlockedStart, *command: str, extra: tuple[str, ...] = ()) -> asyncio.subprocess.Process:
    binary = bwrap.find_binary() or "bwrap"
    return await asyncio.create_subprocess_exec(
        binary, "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
        *extra, "--info-fd", str(blocked.info_fd), "--block-fd", str(blocked.block_fd), "--", *command,
        pass_fds=blocked.pass_fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def test_the_command_finds_the_socket_on_its_own_loopback_and_nothing_else() -> None:
    port = pick_port()
    blocked = BlockedStart()
    # Inside: ask 127.0.0.1:port, then show what the namespace has (only its loopback).
    script = (f"const s = require('net').connect({port}, '127.0.0.1', () => s.write('hi'));"
              "s.on('data', d => { console.log(String(d)); console.log(Object.keys(require('os').networkInterfaces()).join()); s.end(); });")
    proc = await start_bwrap(blocked, "node", "-e", script)
    try:
        listener = await blocked.listen(port)
        assert listener is not None
        blocked.release()
        loop = asyncio.get_running_loop()
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
        assert await loop.sock_recv(conn, 10) == b"hi"
        await loop.sock_sendall(conn, b"from outside")
        conn.close()
        listener.close()
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        blocked.close()
    assert proc.returncode == 0, err
    assert out.decode().split() == ["from", "outside", "lo"]


async def test_a_sandbox_that_fails_to_start_is_no_wait() -> None:
    blocked = BlockedStart()
    proc = await start_bwrap(blocked, "true", extra=("--ro-bind", "/no/such/dir", "/x"))
    try:
        assert await asyncio.wait_for(blocked.listen(pick_port()), 10) is None
        blocked.release()
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        blocked.close()
    assert proc.returncode != 0 and b"/no/such/dir" in err


def test_the_start_check_refuses_builds_when_no_namespace_can_be_joined(tmp_path: Path) -> None:
    # A "bwrap" that says a pid whose namespace cannot be joined (it belongs to no process):
    # what `python -m worker --check-sandbox` would print, not a build each failing.
    fake = tmp_path / "bwrap"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import os, sys
        args = sys.argv[1:]
        info, block = int(args[args.index("--info-fd") + 1]), int(args[args.index("--block-fd") + 1])
        os.write(info, b'{"child-pid": 4194999}')
        os.close(info)
        os.read(block, 1)
    """))
    fake.chmod(0o755)
    why = netns.problem(str(fake))
    assert why == f"{fake} ended before it ran a command in a new network namespace"
    assert netns.problem(bwrap.find_binary() or "bwrap") is None  # the real one here
