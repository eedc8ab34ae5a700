"""Project build variables: set before the first deploy, secrets write-only."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from deployhub import Settings, get_store, keys
from deployhub.secretbox import SecretBox, SecretUnreadable, load_or_create_key, secret_box
from deployhub.settings import SettingsError
from tests.support.infra import TINY_APP, GitServer, RedisServer, unique_name
from tests.support.service import Service, StartService


async def test_variables_round_trip_and_secrets_stay_hidden(service: Service) -> None:
    body = {"variables": {"VITE_TITLE": {"value": "Hello"}, "API_KEY": {"value": "s3cr3t-v4lue", "secret": True}}}
    async with service.http.patch(service.url + "/api/projects/fresh/variables", json=body) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["variables"] == {
        "API_KEY": {"value": None, "secret": True},
        "VITE_TITLE": {"value": "Hello", "secret": False},
    }
    status, listed = await service.get_json("/api/projects/fresh/variables")
    assert status == 200 and "s3cr3t-v4lue" not in str(listed)
    async with service.http.patch(service.url + "/api/projects/fresh/variables",
                                  json={"variables": {"VITE_TITLE": None}}) as r:
        assert list((await r.json())["variables"]) == ["API_KEY"]


async def test_builds_get_variables_and_secrets_never_reach_the_log(service: Service, git_server) -> None:  # type: ignore[no-untyped-def]
    name = unique_name("vars")
    body = {"variables": {"GREETING": {"value": "hi-there"}, "API_KEY": {"value": "tok-7f3a9c", "secret": True}}}
    async with service.http.patch(f"{service.url}/api/projects/{name}/variables", json=body) as r:
        assert r.status == 200
    package = json.loads((TINY_APP / "package.json").read_text())
    package["scripts"]["build"] = "node -e \"console.log('greeting=' + process.env.GREETING); console.log('key=' + process.env.API_KEY)\" && node build.js"
    url = git_server.add_repo(name, files_dir=TINY_APP, files={"package.json": json.dumps(package)})
    dep = await service.deploy(url, project=name)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert "greeting=hi-there" in texts and "key=****" in texts
    assert not any("tok-7f3a9c" in t for t in texts)
    assert "Build variables: API_KEY (secret), GREETING" in texts


async def test_secrets_are_encrypted_at_rest_and_the_key_file_is_private(service: Service) -> None:
    body = {"variables": {"API_KEY": {"value": "plain-canary-51d2", "secret": True},
                          "TITLE": {"value": "shown-canary", "secret": False}}}
    async with service.http.patch(service.url + "/api/projects/vault/variables", json=body) as r:
        assert r.status == 200
    raw = await get_store(service.app).redis.hgetall(keys.project_env("vault"))
    assert "plain-canary-51d2" not in str(raw)  # a copy of Redis alone reveals nothing
    assert json.loads(raw["API_KEY"])["sealed"].startswith("gAAAAA")  # a Fernet token, version 0x80
    assert json.loads(raw["TITLE"]) == {"value": "shown-canary", "secret": False}  # plain: not secret
    key_file = service.settings.data_dir / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    box = secret_box(service.settings)
    assert await get_store(service.app).build_variables("vault", box) == {
        "API_KEY": ("plain-canary-51d2", True), "TITLE": ("shown-canary", False)}
    other = SecretBox(Fernet.generate_key())
    with pytest.raises(SecretUnreadable, match="API_KEY cannot be decrypted"):
        await get_store(service.app).build_variables("vault", other)


async def test_plaintext_secrets_from_earlier_versions_still_work(service: Service) -> None:
    store = get_store(service.app)
    await store.claim_project("legacy", service.token_id)
    await store.redis.hset(keys.project_env("legacy"), "OLD", json.dumps({"value": "old-plain", "secret": True}))
    assert await store.build_variables("legacy", secret_box(service.settings)) == {"OLD": ("old-plain", True)}
    status, listed = await service.get_json("/api/projects/legacy/variables")
    assert listed["variables"] == {"OLD": {"value": None, "secret": True}}
    async with service.http.patch(service.url + "/api/projects/legacy/variables",
                                  json={"variables": {"OLD": {"value": "old-plain", "secret": True}}}) as r:
        assert r.status == 200  # set again: now sealed
    assert "old-plain" not in str(await store.redis.hgetall(keys.project_env("legacy")))


def test_key_file_is_made_once_and_shared(tmp_path: Path) -> None:
    first = load_or_create_key(tmp_path / "d" / "secrets.key")
    assert load_or_create_key(tmp_path / "d" / "secrets.key") == first
    Fernet(first)  # a usable key
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["secrets.key"]  # no temporary left


def test_a_configured_key_is_checked_hidden_and_passed_to_workers() -> None:
    key = Fernet.generate_key().decode()
    settings = Settings.from_env({"DEPLOYHUB_SECRETS_KEY": key})
    assert key not in repr(settings)
    assert settings.to_env()["DEPLOYHUB_SECRETS_KEY"] == key  # the worker's settings
    with pytest.raises(SettingsError, match="must be a Fernet key"):
        Settings.from_env({"DEPLOYHUB_SECRETS_KEY": "not-a-key"})


async def test_worker_decrypts_with_a_configured_key_and_builds_never_see_it(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    key = Fernet.generate_key().decode()
    service = await start_service(redis=redis_server, secrets_key=key)
    name = unique_name("sealed")
    body = {"variables": {"API_KEY": {"value": "tok-sealed-8e1b", "secret": True}}}
    async with service.http.patch(f"{service.url}/api/projects/{name}/variables", json=body) as r:
        assert r.status == 200
    package = json.loads((TINY_APP / "package.json").read_text())
    package["scripts"]["build"] = (
        "node -e \"console.log('key=' + process.env.API_KEY); console.log('dh=' + "
        "Object.keys(process.env).filter(k => k.startsWith('DEPLOYHUB')).join())\" && node build.js")
    url = git_server.add_repo(name, files_dir=TINY_APP, files={"package.json": json.dumps(package)})
    dep = await service.deploy(url, project=name)
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert "key=****" in texts and "dh=" in texts  # decrypted (so masked); no DEPLOYHUB_* at all
    assert not any(key in t for t in texts)
    assert not (service.settings.data_dir / "secrets.key").exists()  # the setting, not a file


async def test_a_project_may_set_ci_false(service: Service) -> None:
    """Create React App fails on lint warnings when CI is set; hosted platforms let it go."""
    body = {"variables": {"CI": {"value": "false"}}}
    async with service.http.patch(service.url + "/api/projects/crafalse/variables", json=body) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["variables"]["CI"] == {"value": "false", "secret": False}
