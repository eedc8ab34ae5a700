"""The pre-serialized responses of cached files: the same bytes aiohttp would send, framed
right on a keep-alive connection, and left alone wherever an embedding app could still
change a response on its way out. And the event loop `serve` runs sites on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from deployhub import Settings, create_app, setup
from deployhub.cli import new_event_loop
from deployhub.settings import SettingsError
from deployhub.sites import get_sites
from tests.support.infra import RedisServer
from tests.support.service import DOMAIN, Service, loopback_resolver, make_settings
from tests.support.sites import Publisher

SITE = {
    "index.html": "<!doctype html><div id=root></div>",
    "assets/app-3f9a1c2b.js": "console.log('a line of a bundle');\n" * 100,
    "_headers": "/assets/*\n  x-frame-options: DENY\n  X-Robots-Tag: noindex\n",
}
IGNORED = ("Date", "Connection")  # the per-second clock, and what `Connection: close` adds


def wired(publisher: Publisher) -> int:
    """How many (route, encoding) pairs went out pre-serialized so far."""
    routes = get_sites(publisher.service.app)._routes.values()
    return sum(1 for route in routes for head in route.heads.values() if head is not None)


def comparable(headers: object) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in headers.items() if k not in IGNORED)  # type: ignore[attr-defined]


async def test_the_serialized_response_matches_aiohttps_own(site_service: Publisher) -> None:
    await site_service.publish("same", SITE)
    for method in ("GET", "HEAD"):
        for path, accept in (("/", "identity"), ("/assets/app-3f9a1c2b.js", "br"),
                             ("/a/client/route", "gzip")):
            fast = await site_service.request(method, "same", path, Accept_Encoding=accept)
            plain = await site_service.request(method, "same", path, Accept_Encoding=accept,
                                               Connection="close")  # not kept alive: aiohttp's
            assert fast[0] == plain[0] == 200 and fast[2] == plain[2]
            assert comparable(fast[1]) == comparable(plain[1])
            assert fast[1]["Date"] and (method == "HEAD") == (fast[2] == b"")
    assert wired(site_service) >= 3


async def test_headers_rules_replace_defaults_whatever_their_case(site_service: Publisher) -> None:
    await site_service.publish("case", SITE)
    _, headers, _ = await site_service.get("case", "/assets/app-3f9a1c2b.js")
    assert headers.getall("X-Frame-Options") == ["DENY"] and headers["X-Robots-Tag"] == "noindex"
    _, headers, _ = await site_service.get("case", "/")
    assert headers.getall("X-Frame-Options") == ["SAMEORIGIN"] and "X-Robots-Tag" not in headers


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)  # the last request closes
    finally:
        writer.close()


async def test_pipelined_requests_are_framed_by_their_lengths(site_service: Publisher) -> None:
    await site_service.publish("pipe", SITE)
    js = SITE["assets/app-3f9a1c2b.js"].encode()
    host = f"Host: pipe.{DOMAIN}\r\nAccept-Encoding: identity\r\n"
    ask = f"GET /assets/app-3f9a1c2b.js HTTP/1.1\r\n{host}\r\n".encode()
    head = f"HEAD /assets/app-3f9a1c2b.js HTTP/1.1\r\n{host}\r\n".encode()
    last = f"GET /assets/app-3f9a1c2b.js HTTP/1.1\r\n{host}Connection: close\r\n\r\n".encode()
    answer = await raw(site_service.service.server.port, ask + head + ask + last)
    responses = answer.split(b"HTTP/1.1 200 OK\r\n")
    assert responses[0] == b"" and len(responses) == 5
    for response, has_body in zip(responses[1:], (True, False, True, True)):
        headers, _, body = response.partition(b"\r\n\r\n")
        assert f"Content-Length: {len(js)}".encode() in headers.split(b"\r\n")
        assert body == (js if has_body else b"")


async def test_http_1_0_gets_an_http_1_0_answer(site_service: Publisher) -> None:
    await site_service.publish("old", SITE)
    answer = await raw(site_service.service.server.port,
                       f"GET / HTTP/1.0\r\nHost: old.{DOMAIN}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    assert answer.endswith(SITE["index.html"].encode())


PublishOn = Callable[[web.Application, Settings], Awaitable[Publisher]]


@pytest.fixture
async def publish_on(tmp_path: Path) -> AsyncIterator[PublishOn]:
    """Serve an app built by the test and publish sites to it."""
    started: list[Service] = []

    async def start(app: web.Application, settings: Settings) -> Publisher:
        service = Service(app, settings)
        await service.start()
        started.append(service)
        publisher = Publisher(service, tmp_path / "builds")
        await publisher.wait_live()
        return publisher

    yield start
    for service in started:
        await service.stop()


async def test_a_middleware_of_the_embedding_app_still_sees_site_responses(
    tmp_path: Path, redis_server: RedisServer, publish_on: PublishOn,
) -> None:
    @web.middleware
    async def theirs(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        response = await handler(request)
        response.headers["X-Theirs"] = "1"
        return response

    app = web.Application(middlewares=[theirs])
    settings = make_settings(tmp_path / "data", redis_server.url)
    setup(app, settings, resolver=loopback_resolver)
    publisher = await publish_on(app, settings)
    await publisher.publish("embedded", SITE)
    for _ in range(2):
        status, headers, body = await publisher.get("embedded", "/")
        assert status == 200 and headers["X-Theirs"] == "1" and body == SITE["index.html"].encode()
    assert wired(publisher) == 0


async def test_a_response_prepare_signal_still_sees_site_responses(
    tmp_path: Path, redis_server: RedisServer, publish_on: PublishOn,
) -> None:
    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Stamped"] = "1"

    settings = make_settings(tmp_path / "data", redis_server.url)
    app = create_app(settings, resolver=loopback_resolver)
    app.on_response_prepare.append(stamp)
    publisher = await publish_on(app, settings)
    await publisher.publish("signalled", SITE)
    for _ in range(2):
        status, headers, _ = await publisher.get("signalled", "/assets/app-3f9a1c2b.js")
        assert status == 200 and headers["X-Stamped"] == "1"
    assert wired(publisher) == 0


async def test_a_signal_of_a_sub_app_on_the_way_still_sees_site_responses(
    tmp_path: Path, redis_server: RedisServer, publish_on: PublishOn,
) -> None:
    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Sub"] = "1"

    app, sub = web.Application(), web.Application()
    sub.on_response_prepare.append(stamp)
    app.add_subapp("/sub/", sub)
    settings = make_settings(tmp_path / "data", redis_server.url)
    setup(app, settings, resolver=loopback_resolver)
    publisher = await publish_on(app, settings)
    await publisher.publish("nested", SITE)
    for _ in range(2):
        status, headers, _ = await publisher.get("nested", "/")  # through `app` alone
        assert status == 200 and "X-Sub" not in headers
        status, headers, body = await publisher.get("nested", "/sub/client/route")  # and `sub`
        assert status == 200 and headers["X-Sub"] == "1" and body == SITE["index.html"].encode()
    assert wired(publisher) >= 1


def test_serve_runs_on_uvloop_unless_told_otherwise(tmp_path: Path) -> None:
    import uvloop

    for choice, kind in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop),
                         ("asyncio", asyncio.BaseEventLoop)):
        loop = new_event_loop(Settings(data_dir=tmp_path, event_loop=choice))
        try:
            assert isinstance(loop, kind) and (choice != "asyncio") == isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
    with pytest.raises(SettingsError, match="event_loop must be"):
        Settings.from_env({"DEPLOYHUB_EVENT_LOOP": "trio"})
