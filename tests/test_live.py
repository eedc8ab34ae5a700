"""Live logs over the WebSocket: history first, then the tail, no line lost or doubled."""

from __future__ import annotations

import asyncio

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service, Watch

STEPS = ["queued", "cloning", "installing", "building", "uploading", "ready"]


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
    assert seen[1:] == STEPS[STEPS.index(seen[1]) :] if len(seen) > 1 else seen == ["ready"]
    final = await service.get_json(f"/api/deployments/{dep['id']}")
    assert list(final[1]["timestamps"]) == STEPS
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
    from deployhub import get_context, keys

    url = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
    dep = await service.deploy(url)
    await service.wait_final(dep["id"])
    from_redis = await service.logs(dep["id"])
    redis = get_context(service.app).redis
    assert await redis.ttl(keys.log_stream(dep["id"])) > 0  # the stream expires; storage keeps it
    await redis.delete(keys.log_stream(dep["id"]))
    assert await service.logs(dep["id"]) == from_redis
    assert await service.logs(dep["id"], after=3) == from_redis[3:]


async def test_a_lagging_socket_gets_its_waiting_batches_as_one_frame() -> None:
    import json

    from deployhub.live import LogFrame, StatusFrame, Watcher
    from deployhub.logs import encode_event, logs_frame

    def frame(first: int, last: int, dep: str = "dep000000001") -> LogFrame:
        events = [encode_event(n, 1.0, "stdout", f"l{n}") for n in range(first, last + 1)]
        return LogFrame("p", dep, first, last, logs_frame("p", dep, events).encode())

    watcher = Watcher(None)  # type: ignore[arg-type]
    for item in (frame(1, 2), frame(3, 5), frame(6, 6), StatusFrame("p", "x", False, b"{}"), frame(7, 8),
                 frame(9, 9, dep="dep000000002")):
        watcher.offer(item)
    merged = await watcher.take()
    assert isinstance(merged, LogFrame) and (merged.first, merged.last) == (1, 6)
    assert [e["seq"] for e in json.loads(merged.data)["events"]] == [1, 2, 3, 4, 5, 6]
    assert isinstance(await watcher.take(), StatusFrame)  # order is kept: no merging across it
    assert (await watcher.take()).last == 8
    assert (await watcher.take()).deployment == "dep000000002"
    assert watcher.queued_bytes == 0
