"""Live logs over the WebSocket: history first, then the tail, no line lost or doubled."""

from __future__ import annotations

import asyncio

from deployhub.status import STEPS
from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service, Watch


async def log_complete(service: Service, dep_id: str, project: str) -> None:
    """`ready` is recorded once the site is live; the worker then stores the log copy and
    gives the stream its expiry: wait for that."""
    from deployhub import get_store, keys

    redis = get_store(service.app).redis
    for _ in range(200):
        if await redis.ttl(keys.log_stream(project, dep_id)) > 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the log of {dep_id} was never completed")


def slow_tiny(git_server: GitServer, lines: int = 300, delay_ms: int = 10) -> str:
    config = f'{{"lines": {lines}, "delayMs": {delay_ms}}}'
    return git_server.add_repo(unique_name("slow"), files_dir=TINY_APP, files={"tiny.json": config})


async def test_watcher_joining_mid_build_gets_every_line_once(
    service: Service, git_server: GitServer
) -> None:
    dep = await service.deploy(slow_tiny(git_server))
    early = await Watch(service).open(dep["project"])
    await early.wait_for(lambda: any("line 50" == e["text"] for e in early.lines.get(dep["id"], [])))
    late = await Watch(service).open(dep["project"])  # joins while lines are flowing
    for watch in (early, late):
        await watch.wait_status(dep["id"], "ready")
    stored = [e["seq"] for e in await service.logs(dep["id"])]
    assert stored == list(range(1, len(stored) + 1))
    assert early.seqs(dep["id"]) == stored
    assert late.seqs(dep["id"]) == stored
    texts = [e["text"] for e in late.lines[dep["id"]]]
    assert [t for t in texts if t.startswith("line ")] == [f"line {n}" for n in range(1, 301)]
    await early.close()
    await late.close()


async def test_statuses_arrive_in_lifecycle_order(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url, project=unique_name("order"))
    watch = await Watch(service).open(dep["project"])
    await watch.wait_status(dep["id"], "ready")
    seen = watch.statuses[dep["id"]]
    assert seen[-1] == "ready"
    # The snapshot may already be past 'queued'; after it, every step appears in order.
    assert seen[1:] == list(STEPS[STEPS.index(seen[1]) :]) if len(seen) > 1 else seen == ["ready"]
    final = await service.get_json(f"/api/deployments/{dep['id']}")
    assert list(final[1]["timestamps"]) == list(STEPS)
    await watch.close()


async def test_stdout_and_stderr_are_tagged(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    await service.wait_final(dep["id"])
    events = await service.logs(dep["id"])
    by_text = {e["text"]: e["stream"] for e in events}
    assert by_text["building tiny"] == "stdout"
    assert by_text["step 1/3: reading sources"] == "stderr"
    assert by_text["$ npm ci"] == "system"
    assert [e["seq"] for e in await service.logs(dep["id"], after=5)][0] == 6


async def test_resume_sends_only_what_is_new(service: Service, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    await service.wait_final(dep["id"])
    total = len(await service.logs(dep["id"]))
    watch = await Watch(service).open(dep["project"], resume={dep["id"]: 10})
    await watch.wait_for(lambda: len(watch.seqs(dep["id"])) == total - 10)
    await asyncio.sleep(0.2)
    assert watch.seqs(dep["id"]) == list(range(11, total + 1))
    await watch.close()


async def test_resume_reads_no_other_projects_log(service: Service, git_server: GitServer) -> None:
    """A socket subscribed to one project that names another project's deployment in
    `resume` gets nothing of that log (deployment ids show in site links)."""
    other = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    mine = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    await service.wait_final(other["id"])
    await service.wait_final(mine["id"])
    watch = await Watch(service).open(mine["project"], resume={other["id"]: 0, mine["id"]: 0})
    total = len(await service.logs(mine["id"]))
    await watch.wait_for(lambda: len(watch.seqs(mine["id"])) == total)
    await asyncio.sleep(0.3)
    assert watch.seqs(other["id"]) == []
    await watch.close()


async def test_bad_socket_messages_get_error_frames_and_socket_stays_usable(
    service: Service, git_server: GitServer
) -> None:
    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    ws = await service.http.ws_connect(service.url + "/api/ws")
    for bad in ["not json", "[]", '{"type": 5}', '{"type": "nope"}',
                '{"type": "subscribe", "project": "Bad Name"}',
                '{"type": "subscribe", "project": "no-such-project"}',
                '{"type": "subscribe", "project": "x", "resume": {"zz": 1}}']:
        await ws.send_str(bad)
        frame = await ws.receive_json(timeout=5)
        assert frame["type"] == "error" and frame["message"], bad
    await ws.send_json({"type": "subscribe", "project": dep["project"]})
    frame = await ws.receive_json(timeout=5)
    assert frame["type"] == "subscribed" and frame["deployments"][0]["id"] == dep["id"]
    await ws.close()


async def test_log_comes_from_storage_once_redis_forgot_it(service: Service, git_server: GitServer) -> None:
    from deployhub import get_store, keys

    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    await service.wait_final(dep["id"])
    redis = get_store(service.app).redis
    # `ready` is recorded when the site is live; the worker stores the log copy just after,
    # then gives the stream its expiry (the stream expires; storage keeps it).
    await log_complete(service, dep["id"], dep["project"])
    from_redis = await service.logs(dep["id"])
    await redis.delete(keys.log_stream(dep["project"], dep["id"]))
    assert await service.logs(dep["id"]) == from_redis
    assert await service.logs(dep["id"], after=3) == from_redis[3:]


async def test_a_watcher_gets_the_log_from_storage_once_redis_forgot_it(
    service: Service, git_server: GitServer
) -> None:
    from deployhub import get_store, keys

    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    await service.wait_final(dep["id"])
    await log_complete(service, dep["id"], dep["project"])
    stored = await service.logs(dep["id"])
    await get_store(service.app).redis.delete(keys.log_stream(dep["project"], dep["id"]))
    watch = await Watch(service).open(dep["project"])  # the newest deployment: its history first
    await watch.wait_for(lambda: watch.seqs(dep["id"]) == [e["seq"] for e in stored], timeout=20)
    await watch.close()
    again = await Watch(service).open(dep["project"], resume={dep["id"]: 5})  # a reconnect
    await again.wait_for(lambda: again.seqs(dep["id"]) == [e["seq"] for e in stored][5:], timeout=20)
    await again.close()


def test_a_lagging_socket_reads_recent_batches_as_one_frame() -> None:
    import json

    from deployhub.live.frames import LogFrame, wire_frame
    from deployhub.live.recent import COALESCE_BYTES, Recent

    def frame(first: int, last: int, width: int = 2) -> LogFrame:
        return LogFrame.of("p", "dep000000001", [
            {"seq": n, "ts": 1.0, "stream": "stdout", "text": f"l{n}".ljust(width)}
            for n in range(first, last + 1)
        ])

    def seqs(f: LogFrame | None) -> list[int]:
        assert f is not None and f.wire == wire_frame(f.data)
        return [e["seq"] for e in json.loads(f.data)["events"]]

    recent = Recent(limit=10_000)
    for first, last in ((1, 2), (3, 5), (6, 6), (7, 8)):
        recent.add(frame(first, last))
    assert seqs(recent.since(0, 8)) == list(range(1, 9))
    assert recent.since(0, 8) is recent.since(0, 8)  # sockets lagging together share it
    assert seqs(recent.since(0, 6)) == list(range(1, 7))  # never past what the marker says
    assert seqs(recent.since(3, 8)) == [4, 5, 6, 7, 8]  # from inside a batch
    assert recent.since(8, 8) is None  # nothing newer yet
    recent.add(frame(20, 21))  # a gap (Redis was away): older frames cannot be trusted
    assert recent.since(8, 21) is None and seqs(recent.since(19, 21)) == [20, 21]
    big = COALESCE_BYTES // 4  # three such frames fit in one merged frame, four do not
    recent = Recent(limit=8 * big)
    for n in range(1, 21):
        recent.add(frame(n, n, width=big))  # more than the limit: the oldest go
    assert recent.bytes <= 8 * big and len(recent.frames) == 7
    assert recent.since(12, 20) is None and len(seqs(recent.since(13, 20))) == 3
    assert len(seqs(recent.since(13, 20))) * big < COALESCE_BYTES  # merged frames stay bounded


async def test_frames_of_every_length_reach_an_aiohttp_client_intact(service: Service) -> None:
    """Log frames are encoded once as WebSocket frames by hand (RFC 6455 has three length
    forms: <126, 16-bit and 64-bit); a real client must decode each of them."""
    from deployhub import get_store
    from deployhub.logs import LogPublisher

    store = get_store(service.app)
    project = unique_name("frames")
    dep = await store.create_deployment(project, "http://127.0.0.1:9/x.git", "", service.token_id)
    watch = await Watch(service).open(project)
    await watch.wait_for(lambda: any(f["type"] == "subscribed" for f in watch.frames), timeout=10)
    assert watch.ws is not None
    await watch.ws.send_json({"type": "ping"})  # the pong reply is a 15-byte frame
    publisher = LogPublisher(store.redis, project, dep.id, max_lines=10_000, line_max_bytes=1000)
    publisher.start()
    texts = ["one short line"]  # one small batch: a frame under 64 KiB
    publisher.emit("stdout", texts[0])
    await watch.wait_for(lambda: len(watch.seqs(dep.id)) == 1, timeout=10)
    texts += [f"{n:05d} " + "é" * 300 for n in range(1, 501)]  # 500 x ~600 bytes: over 64 KiB
    for text in texts[1:]:
        publisher.emit("stderr", text)
    await publisher.close()
    await watch.wait_for(lambda: len(watch.seqs(dep.id)) == len(texts), timeout=10)
    assert [e["text"] for e in watch.lines[dep.id]] == texts
    assert watch.seqs(dep.id) == list(range(1, len(texts) + 1))
    assert {"type": "pong"} in watch.frames
    await watch.close()
