"""Hostile input at every edge, table-driven, against `deployhub serve` as users run it.

Each row is one input and the answer it must get. Then hypothesis throws random bodies and
paths at the same server: none may produce a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.served import Served


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, git_server: GitServer) -> Iterator[Served]:
    """One server with one ready deployment of the tiny app, project 'tiny'."""
    server = Served(tmp_path_factory.mktemp("hostile") / "data")
    server.start()
    status, dep = server.post_json(
        "/api/deployments",
        {"repo_url": git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP), "project": "tiny"},
    )
    assert status == 202, dep
    assert server.wait_final(dep["id"])["status"] == "ready"
    server.dep_id = dep["id"]  # type: ignore[attr-defined]
    yield server
    server.stop()


INDEX = b"Hello from tiny"

# (path, Host label or full header, allowed statuses, the body must contain (or None))
SITE_CASES = [
    ("/", "tiny", {200}, INDEX),
    ("/%2e%2e/%2e%2e/etc/passwd", "tiny", {400, 404}, None),
    ("/..%2f..%2f..%2fetc%2fpasswd", "tiny", {400, 404}, None),
    ("/assets/..%5c..%5cstorage", "tiny", {400}, None),
    ("/about\\..\\..\\index.html", "tiny", {400}, None),
    ("/index.html%00.js", "tiny", {400}, None),
    ("/" + "a/" * 700, "tiny", {400, 404, 414}, None),
    ("/assets/missing-12345678.js", "tiny", {404}, None),
    ("/%252e%252e/%252e%252e/etc/passwd", "tiny", {200, 404}, None),  # double-encoded: a route
    ("/", "TINY.LOCALHOST:{port}", {200}, INDEX),
    ("/", "no-such-project", {404}, None),
    ("/", "..localhost:{port}", {400, 404}, None),
    ("/", "a.b.localhost:{port}", {400}, None),
    ("/", "-bad-.localhost:{port}", {400}, None),
    ("/", "tiny--zzzzzzzzzzzz", {404}, None),
    ("/", "other--{dep}", {404}, None),  # a real deployment under another project's name
    ("/", "tiny--{dep}", {200}, INDEX),
    ("/", "tiny.localhost:{port}:99", {200, 400, 404}, None),
    ("/", "tiny.localhost.:{port}", {200}, INDEX),
    ("/etc/passwd", "tiny", {200}, INDEX),  # an extension-less path is a client route
]


@pytest.mark.parametrize("path, host, statuses, contains", SITE_CASES,
                         ids=[f"{h[:20]}{p[:30]}-{i}" for i, (p, h, *_) in enumerate(SITE_CASES)])
def test_site_requests(site: Served, path: str, host: str, statuses: set[int], contains: bytes | None) -> None:
    host = host.format(port=site.port, dep=site.dep_id)  # type: ignore[attr-defined]
    header = host if "localhost" in host.lower() else f"{host}.localhost:{site.port}"
    status, _, body = site.request("GET", path, host_header=header)
    assert status in statuses, (status, body[:200])
    assert b"root:" not in body and b"redis" not in body.lower()
    if contains is not None:
        assert contains in body


def test_site_refuses_writes(site: Served) -> None:
    status, _, _ = site.request("POST", "/", host_header=f"tiny.localhost:{site.port}", body=b"x")
    assert status == 405


# (method, path, body, expected status, a fragment of the error)
API_CASES = [
    ("POST", "/api/deployments", b"null", 400, "JSON object"),
    ("POST", "/api/deployments", b'"a string"', 400, "JSON object"),
    ("POST", "/api/deployments", b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "project": 5}', 400, "project must be"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "branch": ["x"]}', 400, "branch"),
    ("POST", "/api/deployments", b'{"repo_url": "http://0x7f000001/a.git"}', 400, "non-public"),
    ("POST", "/api/deployments", b'{"repo_url": "http://2130706433/a.git"}', 400, "non-public"),
    ("POST", "/api/deployments", b'{"repo_url": "http://[::ffff:169.254.169.254]/a.git"}', 400, "non-public"),
    ("POST", "/api/deployments", b'{"repo_url": "http://169.254.169.254/latest/a.git"}', 400, "non-public"),
    ("POST", "/api/deployments", b'{"repo_url": "http://localhost:1/a.git"}', 400, "non-public"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git\\n--upload-pack=x"}', 400, "control"),
    ("POST", "/api/deployments", b'{"repo_url": "git://127.0.0.1/a.git"}', 400, "http:// or https://"),
    ("POST", "/api/deployments", b'{"repo_url": "http://127.0.0.1:99999/a.git"}', 400, "port"),
    ("POST", "/api/deployments", b'{"repo_url": "' + b"h" * 3000 + b'"}', 400, "2048"),
    ("POST", "/api/deployments", b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "project": "a--b"}', 400, "single hyphens"),
    ("GET", "/api/deployments/..%2F..%2Fetc", None, 400, "12 lowercase"),
    ("GET", "/api/deployments/AAAAAAAAAAAA", None, 400, "12 lowercase"),
    ("GET", "/api/deployments/abcdefabcdef/logs?after=-1", None, 404, ""),
    ("GET", "/api/projects/tiny/../../etc", None, 404, ""),
    ("GET", "/api/projects/%00/deployments", None, 400, "project must be"),
    ("POST", "/api/projects/tiny/rollback", b'{"deployment": 7}', 400, "deployment id"),
    ("POST", "/api/projects/tiny/rollback", b'{"deployment": "abc"}', 400, "12 lowercase"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"PATH": {"value": "/x"}}}', 400, "cannot be overridden"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"1BAD": {"value": "x"}}}', 400, "must match"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"A": {"value": 1}}}', 400, "must be a string"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {}}', 400, "non-empty"),
]


@pytest.mark.parametrize("method, path, body, expected, fragment", API_CASES,
                         ids=[f"{m}-{p[:30]}-{i}" for i, (m, p, *_) in enumerate(API_CASES)])
def test_api_requests(site: Served, method: str, path: str, body: bytes | None, expected: int, fragment: str) -> None:
    status, _, raw = site.request(method, path, body=body, headers={"Content-Type": "application/json"})
    assert status == expected, raw[:300]
    if fragment:
        assert fragment in json.loads(raw)["error"]


def test_logs_after_must_be_a_number(site: Served) -> None:
    status, _, raw = site.get(f"/api/deployments/{site.dep_id}/logs?after=abc")  # type: ignore[attr-defined]
    assert status == 400 and "after must be" in json.loads(raw)["error"]


def test_wrong_auth_scheme_is_401(site: Served) -> None:
    status, _, _ = site.request("GET", "/api/projects", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 401


# (frame sent, the error fragment expected back)
WS_CASES = [
    ("{", "JSON"),
    ("[]", '"type"'),
    ('{"type": null}', '"type"'),
    ('{"type": "launch-missiles"}', "unknown message type"),
    ('{"type": "subscribe"}', "project must be"),
    ('{"type": "subscribe", "project": "../../x"}', "project must be"),
    ('{"type": "subscribe", "project": "tiny", "resume": []}', "resume must be"),
    ('{"type": "subscribe", "project": "tiny", "resume": {"abcdefabcdef": -1}}', "non-negative"),
    ('{"type": "subscribe", "project": "tiny", "resume": {"abcdefabcdef": true}}', "non-negative"),
    ('{"type": "subscribe", "project": "tiny", "resume": {"../x": 1}}', "12 lowercase"),
    ('{"type": "unsubscribe", "project": 12}', "project must be"),
]


@pytest.mark.parametrize("frame, fragment", WS_CASES, ids=[str(i) for i in range(len(WS_CASES))])
async def test_socket_messages(site: Served, frame: str, fragment: str) -> None:
    headers = {"Authorization": f"Bearer {site.token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.ws_connect(site.url + "/api/ws") as ws:
            await ws.send_str(frame)
            answer = await ws.receive_json(timeout=5)
            assert answer["type"] == "error" and fragment in answer["message"]
            await ws.send_json({"type": "ping"})  # still usable
            assert (await ws.receive_json(timeout=5))["type"] == "pong"


async def test_socket_frame_over_64k_closes_the_socket(site: Served) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {site.token}"}) as session:
        async with session.ws_connect(site.url + "/api/ws") as ws:
            await ws.send_str('{"type": "ping", "pad": "' + "x" * 70_000 + '"}')
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            assert ws.close_code == 1009


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(
    json_values,
    st.fixed_dictionaries({"repo_url": st.text(max_size=80)}, optional={
        "project": json_values, "branch": json_values}),
))
def test_fuzz_deploy_bodies_never_500(site: Served, body: object) -> None:
    status, _, raw = site.request("POST", "/api/deployments", body=json.dumps(body).encode())
    assert status in (400, 409), raw[:300]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
def test_fuzz_site_paths_never_500(site: Served, path: str) -> None:
    from urllib.parse import quote

    status, _, body = site.request("GET", "/" + quote(path, safe="/%"), host_header=f"tiny.localhost:{site.port}")
    assert status in (200, 400, 404), (path, status)
    assert b"root:" not in body
