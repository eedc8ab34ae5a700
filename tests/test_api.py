"""Bad input at the REST edge: a clear 4xx naming the problem, nothing queued."""

from __future__ import annotations

import pytest

from tests.support.service import Service


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({}, "'repo_url'"),
        ({"repo_url": 42}, "repo_url must be a non-empty string"),
        ({"repo_url": ""}, "repo_url must be a non-empty string"),
        ({"repo_url": "file:///etc/passwd"}, "http:// or https://"),
        ({"repo_url": "ssh://git@example.com/a/b.git"}, "http:// or https://"),
        ({"repo_url": "ext::sh -c touch% /tmp/pwned"}, "spaces"),
        ({"repo_url": "ext::sh"}, "http:// or https://"),
        ({"repo_url": "/srv/git/repo.git"}, "http:// or https://"),
        ({"repo_url": "--upload-pack=touch /tmp/x"}, "spaces"),
        ({"repo_url": "-uhttps://x/y.git"}, "must not start with '-'"),
        ({"repo_url": "https://user:pw@example.com/a.git"}, "credentials"),
        ({"repo_url": "https:///a.git"}, "no valid host"),
        ({"repo_url": "https://example.com/"}, "must name a repository"),
        ({"repo_url": "https://example.com/a.git", "project": "Bad Name"}, "project must be"),
        ({"repo_url": "https://example.com/a.git", "branch": "--force"}, "branch"),
        ({"repo_url": "https://example.com/a.git", "extra": 1}, "unknown field 'extra'"),
        ({"repo_url": "http://10.0.0.8/a.git"}, "non-public address (10.0.0.8)"),
        ({"repo_url": "http://169.254.169.254/latest.git"}, "non-public address"),
        ({"repo_url": "http://[::1]:8080/a.git"}, "non-public address"),
        ({"repo_url": "https://git.example.com/a.git"}, "could not be resolved"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_deploy_bodies_get_400(service: Service, body: object, fragment: str) -> None:
    status, answer = await service.post_json("/api/deployments", body)
    assert status == 400
    assert fragment in answer["error"]
    _, projects = await service.get_json("/api/projects")
    assert projects["projects"] == []


async def test_invalid_json_gets_400(service: Service) -> None:
    async with service.http.post(service.url + "/api/deployments", data=b"{not json") as r:
        assert r.status == 400
        assert "not valid JSON" in (await r.json())["error"]


async def test_oversized_body_gets_400(service: Service) -> None:
    body = b'{"repo_url": "' + b"a" * 70_000 + b'"}'
    async with service.http.post(service.url + "/api/deployments", data=body) as r:
        assert r.status in (400, 413)


async def test_unknown_ids_get_404(service: Service) -> None:
    status, body = await service.get_json("/api/deployments/abcdefabcdef")
    assert status == 404 and "abcdefabcdef" in body["error"]
    status, body = await service.get_json("/api/deployments/NOT-AN-ID")
    assert status == 400
    status, body = await service.get_json("/api/projects/nope/deployments")
    assert status == 404
