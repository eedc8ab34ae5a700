"""A private repository's credential: write-only, encrypted at rest, seen by the clone alone.

The git server here requires HTTPS basic auth (tests/support/infra.py GitServer, /private/)
with a token made for each test, so finding that token anywhere proves a leak.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from deployhub import get_storage, get_store, get_tokens, keys
from deployhub.logs import LogPublisher
from deployhub.secretbox import SecretBox
from deployhub.storage import log_key
from tests.support.infra import TINY_APP, GitServer, RedisServer, unique_name
from tests.support.service import Service, StartService
from tests.test_hooks import hook, new_secret

TINY_PACKAGE = json.loads((TINY_APP / "package.json").read_text())
# What the build can find out, written into the site (where masking cannot hide a leak) and
# printed (where masking would show as ****): its environment, the checkout's git config,
# the askpass helper if it was given one, and git's view of the remote.
PROBE = (
    "(env; cat .git/config; git config --list --show-origin; "
    'test -n "$GIT_ASKPASS" && cat "$GIT_ASKPASS"; cat /proc/self/environ | tr "\\0" "\\n") '
    "> probe.txt 2>&1; cat probe.txt; node build.js && cp probe.txt dist/probe.txt"
)


@pytest.fixture(scope="module")
def private_git(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    """A git server whose /private/ repositories want x-access-token and a fresh token."""
    token = "ghp_" + secrets.token_urlsafe(24)
    server = GitServer(tmp_path_factory.mktemp("private-git"),
                       private_credentials=("x-access-token", token))
    server.start()
    yield server
    server.stop()


def token_of(git: GitServer) -> str:
    return git.private_credentials[1]


async def put_credential(service: Service, name: str, body: Any) -> tuple[int, Any]:
    async with service.http.put(f"{service.url}/api/projects/{name}/credential", json=body) as r:
        return r.status, await r.json()


def private_repo(git: GitServer, name: str, build: str = "node build.js") -> str:
    package = {**TINY_PACKAGE, "scripts": {"build": build}}
    git.add_repo(name, files_dir=TINY_APP, files={"package.json": json.dumps(package)}, private=True)
    return git.url_for(name, private=True)


async def test_the_credential_is_write_only_and_owner_only(service: Service) -> None:
    name = unique_name("cred")
    status, answer = await put_credential(service, name, {"token": "ghp_secretvalue1234"})
    assert status == 200, answer
    credential = answer["credential"]
    assert set(credential) == {"kind", "username", "hint", "updated_at"}
    assert credential["kind"] == "token" and credential["username"] == "x-access-token"
    assert credential["hint"] == "\u20261234" and isinstance(credential["updated_at"], float)
    assert await service.get_json(f"/api/projects/{name}/credential") == (200, answer)
    _, other = await get_tokens(service.app).create("other")
    for method in ("GET", "DELETE"):
        async with service.http.request(method, f"{service.url}/api/projects/{name}/credential",
                                        headers={"Authorization": f"Bearer {other}"}) as r:
            assert r.status == 404
    async with service.http.put(f"{service.url}/api/projects/{name}/credential",
                                json={"token": "ghp_takenover99"},
                                headers={"Authorization": f"Bearer {other}"}) as r:
        assert r.status == 404
    status, answer = await put_credential(service, name, {"token": "glpat-other-5678", "username": "ci"})
    assert answer["credential"]["username"] == "ci" and answer["credential"]["hint"] == "\u20265678"
    async with service.http.delete(f"{service.url}/api/projects/{name}/credential") as r:
        assert r.status == 200 and await r.json() == {"credential": None}
    assert await service.get_json(f"/api/projects/{name}/credential") == (200, {"credential": None})


@pytest.mark.parametrize(("body", "message"), [
    ({}, "missing field 'token'"),
    ({"token": ""}, "token must be a non-empty string"),
    ({"token": 12345678}, "token must be a non-empty string"),
    ({"token": "short"}, "token must be 8-1024 characters long"),
    ({"token": "x" * 1025}, "token must be 8-1024 characters long"),
    ({"token": "ghp_abcdefgh\n"}, "without spaces or control characters"),
    ({"token": "ghp abcdefgh"}, "without spaces or control characters"),
    ({"token": "ghp_abcd\u00e9fgh"}, "printable ASCII"),
    ({"token": "ghp_abcd\ud800fgh"}, "unpaired UTF-16 surrogate"),
    ({"token": "ghp_abcdefgh", "username": "a:b"}, "must not contain ':'"),
    ({"token": "ghp_abcdefgh", "username": "a b"}, "without spaces"),
    ({"token": "ghp_abcdefgh", "username": 7}, "username must be a non-empty string"),
    ({"token": "ghp_abcdefgh", "password": "x"}, "unknown field 'password'"),
])
async def test_bad_credentials_are_refused_with_a_reason(
    service: Service, body: dict[str, Any], message: str
) -> None:
    status, answer = await put_credential(service, "badcred", body)
    assert status == 400 and message in answer["error"], answer


async def test_the_token_is_encrypted_at_rest_and_goes_with_the_project(service: Service) -> None:
    store = get_store(service.app)
    await put_credential(service, "sealedcred", {"token": "plain-canary-token-77"})
    raw = await store.redis.hgetall(keys.project_credential("sealedcred"))
    assert "plain-canary-token-77" not in json.dumps(raw) and raw["sealed"].startswith("gAAAAA")
    async with service.http.delete(f"{service.url}/api/projects/sealedcred") as r:
        assert r.status == 200, await r.text()
    assert not await store.redis.exists(keys.project_credential("sealedcred"))


async def redis_dump(service: Service) -> str:
    """Every key and every value in Redis, as text."""
    redis = get_store(service.app).redis
    parts: list[str] = []
    async for key in redis.scan_iter(count=500):
        kind = await redis.type(key)
        if kind == "none":  # expired between the scan and now (a lease, a lock)
            continue
        value: Any = {
            "string": redis.get, "hash": redis.hgetall, "set": redis.smembers,
            "zset": lambda k: redis.zrange(k, 0, -1, withscores=True),
            "list": lambda k: redis.lrange(k, 0, -1), "stream": redis.xrange,
        }[kind](key)
        parts.append(f"{key} {await value}")
    return "\n".join(parts)


async def test_a_private_repository_deploys_with_its_credential_and_nothing_leaks(
    service: Service, private_git: GitServer
) -> None:
    name, token = unique_name("private"), token_of(private_git)
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    url = private_repo(private_git, name, PROBE)
    without = await service.wait_final((await service.deploy(url, project=name))["id"])
    assert without["status"] == "failed"
    assert f"asks for a credential; give the project a read-only token with PUT /api/projects/{name}/credential" in without["reason"]
    await put_credential(service, name, {"token": "ghp_wrong-token-0000"})
    wrong = await service.wait_final((await service.deploy(url, project=name))["id"])
    assert "the repository refused the credential" in wrong["reason"]
    assert "ghp_wrong-token-0000" not in json.dumps(wrong)
    assert (await put_credential(service, name, {"token": token}))[0] == 200
    dep = await service.deploy(url, project=name)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    assert {user for _m, _p, user in private_git.requests_for(name)} >= {"x-access-token"}
    status, _, probe = await service.site(name, "/probe.txt")
    assert status == 200 and b"[remote \"origin\"]" in probe and b"PATH=" in probe
    events = await service.logs(dep["id"])
    assert "Cloning with the project's credential (x-access-token)" in [e["text"] for e in events]
    # Nothing the build printed needed masking: it saw no credential to print.
    assert not any("****" in e["text"] for e in events if e["stream"] != "system")
    stored = await get_storage(service.app).get_bytes(log_key(dep["id"]))
    answers = [await service.get_json(path) for path in (
        f"/api/deployments/{dep['id']}", f"/api/projects/{name}", f"/api/projects/{name}/deployments",
        f"/api/projects/{name}/credential")]
    for where, text in {"the site": probe.decode(), "the log": json.dumps(events),
                        "the stored log": (stored or b"").decode(), "the API": json.dumps(answers),
                        "Redis": await redis_dump(service)}.items():
        assert token not in text and basic not in text, f"the credential leaked into {where}"


async def test_a_deploy_fails_clearly_when_a_secret_cannot_be_decrypted(
    service: Service, private_git: GitServer
) -> None:
    store, stranger = get_store(service.app), SecretBox(Fernet.generate_key())
    name = unique_name("rekeyed")
    url = private_repo(private_git, name)
    await put_credential(service, name, {"token": token_of(private_git)})
    await store.redis.hset(keys.project_credential(name), "sealed", stranger.seal("x" * 20))
    final = await service.wait_final((await service.deploy(url, project=name))["id"])
    assert final["status"] == "failed"
    assert final["reason"].startswith(f"the repository credential of {name} cannot be decrypted")
    assert final["reason"].endswith(f"set it again with PUT /api/projects/{name}/credential")
    await store.set_build_variables(name, {"API_KEY": ("v", True)}, stranger)
    final = await service.wait_final((await service.deploy(url, project=name))["id"])
    assert final["status"] == "failed" and "internal error" not in final["reason"]
    assert final["reason"].startswith("the secret build variable API_KEY cannot be decrypted")


async def test_a_webhook_whose_secret_cannot_be_decrypted_says_to_set_it_again(
    service: Service,
) -> None:
    name = unique_name("rekeyedhook")
    secret = await new_secret(service, name)
    stranger = SecretBox(Fernet.generate_key())
    await get_store(service.app).redis.hset(keys.project_settings(name), "webhook_secret",
                                            stranger.seal(secret))
    status, answer = await hook(service, {"zen": "hi"}, secret, event="ping", query=f"?project={name}")
    assert status == 409 and "cannot be decrypted" in answer["error"]
    assert "must set it again with PATCH /api/projects/{name}/settings" in answer["error"]


async def test_the_log_masks_the_token_and_its_basic_auth_form(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    publisher = LogPublisher(redis, "p", "d", max_lines=100, line_max_bytes=4096)
    publisher.hide(["var-secret"])
    publisher.hide(["tok-123456", "eC1hY2Nlc3MtdG9rZW46dG9rLTEyMzQ1Ng=="])  # adds, keeps the first
    for text in ("var-secret", "Authorization: Basic eC1hY2Nlc3MtdG9rZW46dG9rLTEyMzQ1Ng==",
                 "https://x:tok-123456@h/"):
        publisher.emit("stdout", text)
    assert [json.loads(e)["text"] for e in publisher.events] == [
        "****", "Authorization: Basic ****", "https://x:****@h/"]
    await redis.aclose()


async def test_an_older_commit_of_a_private_repository_is_fetched_with_the_credential(
    service: Service, private_git: GitServer
) -> None:
    name = unique_name("privcommit")
    url = private_repo(private_git, name)
    first = private_git.head_sha(name, private=True)
    private_git.commit_files(name, {"later.txt": "later\n"}, private=True)
    await put_credential(service, name, {"token": token_of(private_git)})
    final = await service.wait_final((await service.deploy(url, project=name, commit=first))["id"])
    assert final["status"] == "ready", final["reason"]
    assert final["commit"] == first


async def test_a_missing_repository_with_a_credential_may_be_a_refusal(
    service: Service, private_git: GitServer
) -> None:
    """GitHub answers 404, not 403, to a token that may not read a private repository."""
    name = unique_name("privmissing")
    await put_credential(service, name, {"token": token_of(private_git)})
    dep = await service.deploy(private_git.url_for(name, private=True), project=name)
    final = await service.wait_final(dep["id"])
    assert "the repository refused the credential, or does not exist" in final["reason"]
    assert token_of(private_git) not in final["reason"]


async def test_private_submodules_get_the_credential_on_the_repositorys_own_host_only(
    start_service: StartService, redis_server: RedisServer, private_git: GitServer
) -> None:
    # localhost names the same git server by another host: a credential must not go there.
    service = await start_service(redis=redis_server, allow_hosts=("127.0.0.1", "localhost"))
    token = token_of(private_git)
    ui = unique_name("privui")
    private_git.add_repo(ui, files={"banner.txt": "private banner\n"}, private=True)
    pin = private_git.head_sha(ui, private=True)
    package = {**TINY_PACKAGE, "scripts": {"build": "node build.js && cp vendor/ui/banner.txt dist/"}}

    async def deploy(sub_url: str, sha: str = pin) -> dict[str, Any]:
        name = unique_name("privsub")
        modules = f'[submodule "vendor/ui"]\n\tpath = vendor/ui\n\turl = {sub_url}\n'
        private_git.add_repo(name, files_dir=TINY_APP, private=True, gitlinks={"vendor/ui": sha},
                             files={"package.json": json.dumps(package), ".gitmodules": modules})
        await put_credential(service, name, {"token": token})
        dep = await service.deploy(private_git.url_for(name, private=True), project=name)
        return await service.wait_final(dep["id"])

    final = await deploy(f"../{ui}.git")  # the repository's own host
    assert final["status"] == "ready", final["reason"]
    status, _, body = await service.site(final["project"], "/banner.txt")
    assert status == 200 and body == b"private banner\n"
    assert {user for _, _, user in private_git.requests_for(ui)} == {"x-access-token"}

    before = len(private_git.requests_for(ui))
    final = await deploy(private_git.url_for(ui, private=True).replace("127.0.0.1", "localhost"))
    assert final["status"] == "failed" and "it asks for a credential" in final["reason"]
    later = private_git.requests_for(ui)[before:]
    assert later and all(user is None for _, _, user in later)

    # A public submodule elsewhere naming a private repository, on the repository's own host
    # or on its own: neither fetch gets the credential.
    for host in ("127.0.0.1", "localhost"):
        third = unique_name("thirdparty")
        inner = private_git.url_for(ui, private=True).replace("127.0.0.1", host)
        private_git.add_repo(third, gitlinks={"inner": pin}, files={
            ".gitmodules": f'[submodule "inner"]\n\tpath = inner\n\turl = {inner}\n'})
        before = len(private_git.requests_for(ui))
        final = await deploy(private_git.url_for(third).replace("127.0.0.1", "localhost"),
                             private_git.head_sha(third))
        assert final["status"] == "failed", final["reason"]
        assert "could not fetch the submodule vendor/ui/inner" in final["reason"]
        later = private_git.requests_for(ui)[before:]
        assert later and all(user is None for _, _, user in later)
