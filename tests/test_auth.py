"""Every API call and subscription needs a token; a token sees only its own projects."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from deployhub import cli, get_tokens, keys
from deployhub.auth import client_address
from tests.support.infra import TINY_APP, GitServer, RedisServer, unique_name
from tests.support.service import Service, StartService


@pytest.fixture
async def stranger(service: Service) -> aiohttp.ClientSession:
    _, secret = await get_tokens(service.app).create("stranger")
    session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"})
    yield session
    await session.close()


async def test_no_token_gets_401_everywhere(service: Service) -> None:
    async with aiohttp.ClientSession() as anonymous:
        for method, path in [("GET", "/api/projects"), ("POST", "/api/deployments"),
                             ("GET", "/api/deployments/abcdefabcdef"),
                             ("GET", "/api/projects/x/deployments")]:
            async with anonymous.request(method, service.url + path, json={}) as r:
                assert r.status == 401, path
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with anonymous.get(service.url + "/api/projects",
                                 headers={"Authorization": "Bearer dh_" + "x" * 43}) as r:
            assert r.status == 401 and "unknown or revoked" in (await r.json())["error"]
        async with anonymous.ws_connect(service.url + "/api/ws") as ws:
            await ws.send_json({"type": "subscribe", "project": "anything"})
            await ws.receive(timeout=5)
            assert ws.close_code == 4401


async def test_other_tokens_cannot_see_deploy_or_watch(
    service: Service, stranger: aiohttp.ClientSession, git_server: GitServer
) -> None:
    url = git_server.add_repo(unique_name("mine"), files_dir=TINY_APP)
    dep = await service.deploy(url, project="mine")
    await service.wait_final(dep["id"])
    base = service.url
    for path in [f"/api/deployments/{dep['id']}", f"/api/deployments/{dep['id']}/logs",
                 "/api/projects/mine", "/api/projects/mine/deployments"]:
        async with stranger.get(base + path) as r:
            assert r.status == 404, path
    async with stranger.get(base + "/api/projects") as r:
        assert (await r.json())["projects"] == []
    async with stranger.post(base + "/api/projects/mine/rollback", json={"deployment": dep["id"]}) as r:
        assert r.status == 404
    async with stranger.post(base + f"/api/deployments/{dep['id']}/cancel") as r:
        assert r.status == 404
    async with stranger.post(base + "/api/deployments", json={"repo_url": url, "project": "mine"}) as r:
        assert r.status == 409 and "taken" in (await r.json())["error"]
    async with stranger.ws_connect(base + "/api/ws") as ws:
        await ws.send_json({"type": "subscribe", "project": "mine"})
        frame = await ws.receive_json(timeout=5)
        assert frame == {"type": "error", "message": "no project 'mine'"}
    status, _, page = await service.site("mine")  # sites stay public
    assert status == 200 and b"Hello from tiny" in page


async def test_revoked_token_stops_working(service: Service) -> None:
    tokens = get_tokens(service.app)
    token, secret = await tokens.create("temp")
    headers = {"Authorization": f"Bearer {secret}"}
    async with service.http.get(service.url + "/api/projects", headers=headers) as r:
        assert r.status == 200
    assert await tokens.revoke(token.id)
    async with service.http.get(service.url + "/api/projects", headers=headers) as r:
        assert r.status == 401
    stored = await tokens.redis.hgetall(keys.TOKENS)
    assert secret not in str(stored)  # only a digest is kept


async def test_expired_token_is_refused_and_says_so(service: Service) -> None:
    tokens = get_tokens(service.app)
    token, secret = await tokens.create("brief", expires_in=0.5)
    headers = {"Authorization": f"Bearer {secret}"}
    async with service.http.get(service.url + "/api/projects", headers=headers) as r:
        assert r.status == 200
    await asyncio.sleep(0.7)
    async with service.http.get(service.url + "/api/projects", headers=headers) as r:
        assert r.status == 401 and "expired" in (await r.json())["error"]
    listed = {t.id: t for t in await tokens.list()}[token.id]
    assert listed.expires_at == token.expires_at and listed.expired(time.time())


async def test_last_used_is_written_once_a_minute_not_per_call(service: Service) -> None:
    tokens = get_tokens(service.app)
    assert {t.id: t for t in await tokens.list()}[service.token_id].last_used_at is None
    before = time.time()
    stamps = []
    for _ in range(5):
        async with service.http.get(service.url + "/api/projects") as r:
            assert r.status == 200
        stamps.append(await tokens.redis.hget(keys.TOKEN_LAST_USED, service.token_id))
    assert len(set(stamps)) == 1 and float(stamps[0]) >= before  # one write, then none
    listed = {t.id: t for t in await tokens.list()}[service.token_id]
    assert listed.last_used_at == float(stamps[0])


async def test_bad_tokens_from_one_address_get_429_then_even_a_good_one_does(
    redis_server: RedisServer, start_service: StartService
) -> None:
    service = await start_service(redis=redis_server, token_failures_per_minute=3)
    async with aiohttp.ClientSession() as guesser:
        for n in range(3):
            async with guesser.get(service.url + "/api/projects",
                                   headers={"Authorization": f"Bearer dh_{n:030d}"}) as r:
                assert r.status == 401
        async with guesser.get(service.url + "/api/projects",
                               headers={"Authorization": "Bearer dh_" + "y" * 30}) as r:
            assert r.status == 429 and 0 < int(r.headers["Retry-After"]) <= 60
            assert "too many failed token attempts" in (await r.json())["error"]
        # Same address: the real token waits too, or a guess that hits would be told so.
        async with service.http.get(service.url + "/api/projects") as r:
            assert r.status == 429
        async with guesser.ws_connect(service.url + "/api/ws") as ws:
            await ws.send_json({"type": "auth", "token": service.token})
            await ws.receive(timeout=5)
            assert ws.close_code == 4429
    # Counted in Redis, so another server behind the same Redis refuses this address too.
    replica = await start_service(redis=redis_server, token_failures_per_minute=3)
    async with replica.http.get(replica.url + "/api/projects") as r:
        assert r.status == 429


async def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    redis_server: RedisServer, start_service: StartService
) -> None:
    untrusting = await start_service(redis=redis_server, token_failures_per_minute=2)
    async with aiohttp.ClientSession() as guesser:
        for n in range(3):  # a fresh X-Forwarded-For each time does not reset the count
            async with guesser.get(untrusting.url + "/api/projects", headers={
                "Authorization": "Bearer dh_" + "z" * 30, "X-Forwarded-For": f"198.51.100.{n}"}) as r:
                pass
        assert r.status == 429


def test_client_address_believes_only_trusted_proxies() -> None:
    assert client_address("10.0.0.7", "203.0.113.9") == "10.0.0.7"
    assert client_address("10.0.0.7", "203.0.113.9, 10.0.0.8", ["10.0.0.7", "10.0.0.8"]) == "203.0.113.9"
    assert client_address("10.0.0.7", "1.1.1.1, 203.0.113.9", ["10.0.0.7"]) == "203.0.113.9"  # right-most
    assert client_address("10.0.0.7", "garbage\ud800", ["10.0.0.7"]) == "10.0.0.7"
    assert client_address("::ffff:127.0.0.1", None) == "127.0.0.1"
    assert client_address(None, "203.0.113.9") == "unknown"


def test_token_names_and_expiries_from_the_cli(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    redis = ["--redis-url", redis_server.url]
    assert cli.main(["token", "create", "laptop", "--expires", "30d", *redis]) == 0
    assert "expires" in capsys.readouterr().out
    assert cli.main(["token", "create", "forever", *redis]) == 0
    capsys.readouterr()
    assert cli.main(["token", "list", *redis]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["ID", "CREATED", "EXPIRES", "LAST", "USED", "NAME"]
    laptop = next(r for r in rows if r.endswith("laptop"))
    assert "never" in laptop and time.strftime("%Y-%m-%d", time.localtime(time.time() + 30 * 86400)) in laptop
    for bad in (["laptop\n"], ["bad\x01name"], [" padded"], ["x", "--expires", "30x"],
                ["x", "--expires", "9" * 5000 + "d"], ["\udcff"]):
        assert cli.main(["token", "create", *bad, *redis]) == 2, bad
        assert "deployhub:" in capsys.readouterr().err
    for bad_id in ("\udcff", "abc\n", "0" * 5000):
        assert cli.main(["token", "revoke", bad_id, *redis]) == 1
        assert "no token with id" in capsys.readouterr().err
