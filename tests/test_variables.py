"""Project build variables: set before the first deploy, secrets write-only."""

from __future__ import annotations

from tests.support.service import Service


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
    import json

    from tests.support.infra import TINY_APP, unique_name

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
