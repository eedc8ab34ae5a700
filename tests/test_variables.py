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
