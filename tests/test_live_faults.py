"""Live logs through faults: Redis restarts, stalled sockets, two servers, CLI reconnects."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys

import aiohttp
import pytest

from deployhub import get_hub, get_store
from deployhub.live import recent
from deployhub.live.hub import Hub
from tests.support.infra import TINY_APP, GitServer, RedisServer, unique_name
from tests.support.service import Service, StartService, Watch


def app_hub(service: Service) -> Hub:
    return get_hub(service.app)


def chatty_repo(git_server: GitServer, lines: int, delay_ms: int) -> str:
    config = f'{{"lines": {lines}, "delayMs": {delay_ms}}}'
    return git_server.add_repo(unique_name("chatty"), files_dir=TINY_APP, files={"tiny.json": config})


async def stored_seqs(service: Service, dep_id: str) -> list[int]:
    return [e["seq"] for e in await service.logs(dep_id)]


@pytest.mark.timeout(120)
async def test_redis_restart_mid_build_loses_nothing(
    service: Service, redis_server: RedisServer, git_server: GitServer
) -> None:
    dep = await service.deploy(chatty_repo(git_server, lines=1500, delay_ms=5))
    stayed = await Watch(service).open(dep["project"])
    await stayed.wait_for(lambda: len(stayed.seqs(dep["id"])) > 100)
    redis_server.stop()
    await asyncio.sleep(4)  # the build goes on printing while Redis is away
    redis_server.start()
    await stayed.wait_status(dep["id"], "ready", timeout=90)
    joined_after = await Watch(service).open(dep["project"])
    await joined_after.wait_for(lambda: len(joined_after.seqs(dep["id"])) >= len(stayed.seqs(dep["id"])))
    expected = await stored_seqs(service, dep["id"])
    assert expected == list(range(1, len(expected) + 1))
    assert stayed.seqs(dep["id"]) == expected
    assert joined_after.seqs(dep["id"]) == expected
    texts = [e["text"] for e in stayed.lines[dep["id"]] if e["text"].startswith("line ")]
    assert texts == [f"line {n}" for n in range(1, 1501)]
    await stayed.close()
    await joined_after.close()


async def stalled_socket(port: int, project: str, token: str) -> socket.socket:
    """A WebSocket client that subscribes and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    payload = f'{{"type":"subscribe","project":"{project}"}}'.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


def read_log_seqs(sock: socket.socket, dep_id: str, until: int, timeout: float = 60) -> list[int]:
    """Read WebSocket frames from a raw socket until `dep_id`'s seq `until`; every seq seen."""
    sock.settimeout(timeout)
    buf = bytearray()
    seqs: list[int] = []
    upgraded = False
    while not seqs or seqs[-1] < until:
        chunk = sock.recv(1 << 20)
        assert chunk, f"the server closed the socket after seq {seqs[-1] if seqs else 0}"
        buf += chunk
        if not upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            assert buf.startswith(b"HTTP/1.1 101"), bytes(buf[:100])
            del buf[:end + 4]
            upgraded = True
        while len(buf) >= 2:
            opcode, size, head = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if size == 126:
                size, head = int.from_bytes(buf[2:4]), 4
            elif size == 127:
                size, head = int.from_bytes(buf[2:10]), 10
            if len(buf) < head + size:
                break
            payload = bytes(buf[head:head + size])
            del buf[:head + size]
            if opcode == 0x9:  # answer the heartbeat like a browser would
                mask = os.urandom(4)
                sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask
                             + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
            elif opcode == 0x1:
                frame = json.loads(payload)
                if frame["type"] == "logs" and frame["deployment"] == dep_id:
                    seqs += [e["seq"] for e in frame["events"]]
    return seqs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("catch_up_from", ["memory", "redis"])
async def test_a_socket_that_never_reads_does_not_delay_others(
    service: Service, git_server: GitServer, catch_up_from: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if catch_up_from == "redis":  # the shared recent frames no longer reach back to it
        monkeypatch.setattr(recent, "RECENT_BYTES", 1024 * 1024)
    config = '{"lines": 30000, "delayMs": 0, "width": 300}'  # ~9 MB: more than any socket buffer
    url = git_server.add_repo(unique_name("wide"), files_dir=TINY_APP, files={"tiny.json": config})
    dep = await service.deploy(url)
    stuck = await stalled_socket(service.server.port, dep["project"], service.token)
    try:
        fast = await Watch(service).open(dep["project"])
        await fast.wait_status(dep["id"], "ready", timeout=90)
        expected = await stored_seqs(service, dep["id"])
        await fast.wait_for(lambda: fast.seqs(dep["id"]) == expected, timeout=10)
        await fast.close()
        stats = app_hub(service).stats
        # The stalled socket really was stalled: its batches could not be written at once.
        assert stats["frames queued"] > 0, "the stalled socket kept up: the test proved nothing"
        # Once it reads again it gets the rest: every line once, in order, nothing skipped.
        got = await asyncio.to_thread(read_log_seqs, stuck, dep["id"], expected[-1])
        assert got == expected
        if catch_up_from == "memory":
            assert stats["frames from memory"] > 0 and stats["catch-ups from Redis"] == 0, stats
        else:
            assert stats["catch-ups from Redis"] > 0, f"the wrong path was tested: {stats}"
    finally:
        stuck.close()


async def test_two_servers_share_one_redis(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer, tmp_path
) -> None:
    builder = await start_service(redis=redis_server)
    from tests.support.service import make_settings

    other = await start_service(make_settings(tmp_path / "other", redis_server.url))
    dep = await builder.deploy(chatty_repo(git_server, lines=300, delay_ms=5))
    watch = await Watch(other).open(dep["project"], token=builder.token)
    await watch.wait_status(dep["id"], "ready")
    expected = await stored_seqs(builder, dep["id"])
    await watch.wait_for(lambda: watch.seqs(dep["id"]) == expected, timeout=10)
    await watch.close()


async def test_socket_project_limit(service: Service) -> None:
    from deployhub.live.protocol import MAX_PROJECTS_PER_SOCKET

    store = get_store(service.app)
    for n in range(MAX_PROJECTS_PER_SOCKET + 1):
        await store.create_deployment(f"p{n}", "http://127.0.0.1:9/x.git", "", service.token_id)
    ws = await service.http.ws_connect(service.url + "/api/ws")
    errors = []
    for n in range(MAX_PROJECTS_PER_SOCKET + 1):
        await ws.send_json({"type": "subscribe", "project": f"p{n}"})
    while len(errors) < 1:
        frame = await ws.receive_json(timeout=10)
        if frame["type"] == "error":
            errors.append(frame["message"])
    assert "at most 50 projects" in errors[0]
    await ws.close()


@pytest.mark.timeout(180)
async def test_cli_follow_resumes_across_a_server_restart(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer, tmp_path
) -> None:
    """The build runs on one replica; the CLI watches another, which restarts mid-build."""
    from tests.support.service import make_settings

    builder = await start_service(redis=redis_server)
    settings = make_settings(tmp_path / "front", redis_server.url)
    front = await start_service(settings)
    url = chatty_repo(git_server, lines=1200, delay_ms=5)
    # The CLI posts to the builder, then follows through the front replica.
    dep = await builder.deploy(url)
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployhub", "logs", dep["id"], "--follow", "--server", front.url,
        "--token", builder.token, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    await asyncio.sleep(2.5)
    await front.stop()
    await asyncio.sleep(1)
    await start_service(settings)  # same port
    out, err = await asyncio.wait_for(cli.communicate(), 120)
    lines = out.decode().splitlines()
    assert cli.returncode == 0 and lines[-1].startswith("Ready: "), err.decode()[-2000:]
    assert "reconnecting" in err.decode()
    events = await builder.logs(dep["id"])
    assert lines[:-1] == [e["text"] for e in events if e["stream"] != "stderr"]
    printed_err = [l for l in err.decode().splitlines() if not l.startswith("[deployhub]")]
    assert printed_err == [e["text"] for e in events if e["stream"] == "stderr"]


async def test_a_connect_storm_waits_for_redis_connections_instead_of_failing(service: Service) -> None:
    """More sockets at once than Redis connections in the pool: all are answered, none dropped."""
    store = get_store(service.app)
    await store.create_deployment("storm", "http://127.0.0.1:9/x.git", "", service.token_id)

    headers = {"Authorization": f"Bearer {service.token}"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one() -> str:
            async with http.ws_connect(service.url + "/api/ws") as ws:
                await ws.send_json({"type": "subscribe", "project": "storm"})
                return str((await ws.receive_json(timeout=30))["type"])

        answers = await asyncio.gather(*(one() for _ in range(300)))
    assert answers == ["subscribed"] * 300


async def test_the_hub_pings_quiet_sockets_and_drops_those_that_never_answer(
    redis_server: RedisServer, start_service: StartService, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """One heartbeat task for every socket: a silent client is pinged and, still silent,
    dropped; a client that answers pings (as aiohttp's and browsers do) stays connected."""
    from deployhub.live import hub

    monkeypatch.setattr(hub, "HEARTBEAT_ROUND", 0.2)
    service = await start_service(redis=redis_server)
    await get_store(service.app).create_deployment("pings", "http://127.0.0.1:9/x.git", "", service.token_id)
    silent = await stalled_socket(service.server.port, "pings", service.token)
    request.addfinalizer(silent.close)
    headers = {"Authorization": f"Bearer {service.token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.ws_connect(service.url + "/api/ws") as answering:  # autoping answers
            await answering.send_json({"type": "subscribe", "project": "pings"})
            assert (await answering.receive_json(timeout=10))["type"] == "subscribed"
            with pytest.raises(TimeoutError):  # meanwhile receive() answers every ping
                await asyncio.wait_for(answering.receive(), hub.HEARTBEAT_ROUND * (hub.DROP_AFTER_ROUNDS + 3))
            silent.settimeout(5)
            received = b""
            while chunk := await asyncio.to_thread(silent.recv, 1 << 16):
                received += chunk  # ...until the server drops it
            assert b"\x89\x00" in received, "the silent socket was never pinged"
            assert len(app_hub(service).sockets) == 1 and not answering.closed
            await answering.send_json({"type": "ping"})
            assert (await answering.receive_json(timeout=10))["type"] == "pong"
