"""`deployhub serve --workers 2`: two processes on one port, one embedded Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import aiohttp

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.served import Served


def child_pids(parent: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(parent)],
                         capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "--instance" in line]


def socket_owners(port: int, state: str = "established") -> set[int]:
    """Pids holding sockets on our port in `state` (ss -p)."""
    out = subprocess.run(["ss", "-Htnp", "state", state, f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {int(part.split("pid=")[1].split(",")[0]) for part in out.split() if "pid=" in part}


async def wait_listening(port: int, pids: list[int]) -> None:
    for _ in range(300):  # the second process may still be starting
        if socket_owners(port, "listening") >= set(pids):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not all of {pids} listen on {port}")


async def test_two_processes_share_the_port_the_redis_and_every_log_line(
    tmp_path: Path, git_server: GitServer
) -> None:
    server = Served(tmp_path / "data", "--workers", "2")
    server.start()
    try:
        assert server.proc is not None
        children = child_pids(server.proc.pid)
        assert len(children) == 2, children
        await wait_listening(server.port, children)
        url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
        status, dep = server.post_json("/api/deployments", {"repo_url": url})
        assert status == 202, dep
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            sockets = [await http.ws_connect(f"{server.url}/api/ws") for _ in range(12)]
            assert socket_owners(server.port) == set(children), "the kernel used one process only"
            for ws in sockets:
                await ws.send_json({"type": "subscribe", "project": dep["project"]})

            seqs: list[list[int]] = [[] for _ in sockets]
            ready = asyncio.Event()

            async def read(n: int, ws: aiohttp.ClientWebSocketResponse) -> None:
                async for msg in ws:
                    frame = json.loads(msg.data)
                    if frame["type"] == "logs" and frame["deployment"] == dep["id"]:
                        seqs[n] += [e["seq"] for e in frame["events"]]
                    elif frame["type"] == "status" and frame["deployment"]["id"] == dep["id"]:
                        if frame["deployment"]["status"] == "ready":
                            ready.set()

            readers = [asyncio.create_task(read(n, ws)) for n, ws in enumerate(sockets)]
            await asyncio.wait_for(ready.wait(), 90)
            stored = [e["seq"] for e in server.logs_of_newest(dep["project"])]
            assert len(stored) > 10
            for _ in range(100):  # lines after the last status frame may still be on the way
                if all(s == stored for s in seqs):
                    break
                await asyncio.sleep(0.1)
            assert all(s == stored for s in seqs), [len(s) for s in seqs]
            for task in readers:
                task.cancel()
        assert server.get(path="/", host=dep["project"])[0] == 200
    finally:
        server.stop()
