"""Hostile input at every edge, table-driven, against `deployhub serve` as users run it.

Each row is one input and the answer it must get. Then hypothesis throws random bodies and
paths at the same server: none may produce a 500.
"""

from __future__ import annotations

import asyncio
import json
import socket
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
    # The fuzzers send many bad tokens from 127.0.0.1: the limit on them is tested elsewhere.
    server = Served(tmp_path_factory.mktemp("hostile") / "data", "--token-failures-per-minute", "1000000")
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
    ("/%ED%A0%80", "tiny", {200, 400, 404}, None),  # an encoded lone surrogate
    ("/%FF%FE.html", "tiny", {400, 404}, None),  # not UTF-8
    ("/index.html%0A", "tiny", {400, 404}, None),
    ("/" + "9" * 5000, "tiny", {200, 400, 404, 414}, None),
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
    # Passed the repo URL check while it used ipaddress.is_global; the egress list refused them.
    ("POST", "/api/deployments", b'{"repo_url": "http://[2002:c0a8:101::1]/a.git"}', 400, "private (RFC 1918), in IPv6"),
    ("POST", "/api/deployments", b'{"repo_url": "http://[64:ff9b::a9fe:a9fe]/a.git"}', 400, "cloud metadata"),
    ("POST", "/api/deployments", b'{"repo_url": "http://[::10.0.0.1]/a.git"}', 400, "IPv4-compatible"),
    ("POST", "/api/deployments", b'{"repo_url": "http://168.63.129.16/a.git"}', 400, "cloud metadata"),
    ("PUT", "/api/projects/tiny/credential", b'{"token": "ghp_abcdefgh\\r\\n"}', 400, "control characters"),
    ("PUT", "/api/projects/tiny/credential", b'{"token": "ghp_abc\\ud800defgh"}', 400, "surrogate"),
    ("PUT", "/api/projects/tiny/credential", b'{"token": ' + b"7" * 4400 + b"}", 400, "digits"),
    ("PUT", "/api/projects/tiny/credential", b'{"token": "ghp_abcdefgh", "username": "a:b"}', 400, "':'"),
    ("PUT", "/api/projects/tiny/credential", b'[]', 400, "JSON object"),
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
    # (a) integers past Python's 4,300-digit limit (and past any seq), NaN and Infinity
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "project": ' + b"9" * 5000 + b"}", 400, "5000 digits"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "project": -' + b"9" * 21 + b"}", 400, "21 digits"),
    ("POST", "/api/deployments", b'[' + b"1" * 4301 + b"]", 400, "digits"),
    ("POST", "/api/deployments", b'{"repo_url": NaN}', 400, "NaN is not JSON"),
    ("POST", "/api/deployments", b'{"repo_url": -Infinity}', 400, "-Infinity is not JSON"),
    ("POST", "/api/deployments", b'{"repo_url": 1e999}', 400, "finite"),
    ("POST", "/api/projects/tiny/rollback", b'{"deployment": ' + b"1" * 5000 + b"}", 400, "digits"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"A": {"value": ' + b"7" * 4400 + b"}}}", 400, "digits"),
    # (b) unpaired UTF-16 surrogates, as JSON escapes, in every string and key
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/\\ud800.git"}', 400, "unpaired UTF-16 surrogate"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "project": "\\udfff"}', 400, "surrogate"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "branch": "m\\udc80"}', 400, "surrogate"),
    ("POST", "/api/deployments", b'{"\\ud83d": 1}', 400, "a key in the request body"),
    ("POST", "/api/deployments", b'{"repo_url": "\\ude00\\ud83d"}', 400, "surrogate"),  # reversed pair
    ("POST", "/api/projects/tiny/rollback", b'{"deployment": "\\ud800"}', 400, "surrogate"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"\\ud800": {"value": "x"}}}', 400, "surrogate"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"A": {"value": "x\\udbff"}}}', 400, "$.variables.A.value"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"A": {"value": "ok", "\\udbff": 1}}}', 400, "surrogate"),
    # (c) whitespace and control characters, refused rather than stripped
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/a.git\\n"}', 400, "U+000A at the start or end"),
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/a.git "}', 400, "U+0020"),
    ("POST", "/api/deployments", b'{"repo_url": "\\thttps://127.0.0.1/a.git"}', 400, "U+0009"),
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/a.git\\u0085"}', 400, "U+0085"),
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/a\\u200b.git"}', 400, "U+200B inside"),
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/\\u202egit.a"}', 400, "U+202E"),
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/a.git\\u2028"}', 400, "U+2028"),
    ("POST", "/api/deployments", b'{"repo_url": "https://127.0.0.1/a.git\\u0000"}', 400, "U+0000"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "project": "tiny\\n"}', 400, "project must be"),
    ("POST", "/api/deployments", b'{"repo_url": "https://h/a.git", "branch": "main\\n"}', 400, "branch must be"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"A\\n": {"value": "x"}}}', 400, "must match"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"A B": {"value": "x"}}}', 400, "must match"),
    ("PATCH", "/api/projects/tiny/variables", b'{"variables": {"A": {"value": "x\\u0000"}}}', 400, "no NUL"),
    # deep nesting inside an object, under the interpreter's limit but over ours
    ("POST", "/api/deployments", b'{"repo_url": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "nested too deeply"),
    # query strings and path parameters
    ("GET", "/api/deployments/abcdefabcdef/logs?after=%C2%B2", None, 404, ""),  # owned check first
    ("GET", "/api/projects/%ED%A0%80", None, 400, "project must be"),
    ("GET", "/api/projects/tiny%0A", None, 400, "project must be"),
    ("GET", "/api/projects/%ED%A0%80/variables", None, 400, "project must be"),
    ("GET", "/api/deployments/%ED%A0%80", None, 400, "12 lowercase"),
    ("GET", "/api/deployments/abcdefabcdef%0A", None, 400, "12 lowercase"),
    ("POST", "/api/deployments/%FF%FE/cancel", None, 400, "12 lowercase"),
    ("POST", "/api/projects/%ED%B2%80/rollback", b'{"deployment": "abcdefabcdef"}', 400, "project must be"),
    ("PATCH", "/api/projects/tiny%20/variables", b'{"variables": {"A": null}}', 400, "project must be"),
]


@pytest.mark.parametrize("method, path, body, expected, fragment", API_CASES,
                         ids=[f"{m}-{p[:30]}-{i}" for i, (m, p, *_) in enumerate(API_CASES)])
def test_api_requests(site: Served, method: str, path: str, body: bytes | None, expected: int, fragment: str) -> None:
    status, _, raw = site.request(method, path, body=body, headers={"Content-Type": "application/json"})
    assert status == expected, raw[:300]
    if fragment:
        assert fragment in json.loads(raw)["error"]


@pytest.mark.parametrize("after", ["abc", "%C2%B2", "%D9%A1", "%ED%A0%80", "%FF", "1%0A", "-1",
                                   "9" * 20, "9" * 5000, "%EF%BC%91"])  # "²", "١", "１"
def test_logs_after_must_be_a_number(site: Served, after: str) -> None:
    status, _, raw = site.get(f"/api/deployments/{site.dep_id}/logs?after={after}")  # type: ignore[attr-defined]
    assert status == 400 and "after must be" in json.loads(raw)["error"]


def raw_request(port: int, head: bytes) -> tuple[int, bytes]:
    """Send bytes no HTTP client would (undecodable, control characters) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return (int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0), answer


# (a header line, the statuses it may get)
HEADER_CASES = [
    (b"Authorization: Bearer dh_\xff\xfe" + b"a" * 30, {401}),
    (b"Authorization: Bearer \xed\xa0\x80", {401}),
    (b"Authorization: \xed\xa0\x80 dh_" + b"a" * 30, {401}),
    (b"Authorization: Bearer dh_" + b"a" * 30 + b"\x01", {400, 401}),
    (b"Authorization: Bearer dh_" + b"a" * 30 + b" \t ", {401}),
    (b"Authorization: Bearer " + b"9" * 5000, {401}),
    (b"Authorization: Bearer dh_" + b"a" * 9000, {400, 431}),
    (b"X-Forwarded-For: \xed\xa0\x80, 1.2.3.4, " + b"9" * 5000, {401}),
    (b"Host: tiny\xff.localhost", {400, 401, 404}),
    (b"Host: \xed\xa0\x80.localhost", {400, 401, 404}),
    (b"Host: tiny.localhost\x01", {400, 401, 404}),
    (b"Host: " + b"a." * 3000 + b"localhost", {400, 401, 404, 431}),
]


@pytest.mark.parametrize("header, statuses", HEADER_CASES, ids=[str(i) for i in range(len(HEADER_CASES))])
def test_hostile_headers(site: Served, header: bytes, statuses: set[int]) -> None:
    host = b"" if header.startswith(b"Host:") else b"Host: 127.0.0.1\r\n"
    status, answer = raw_request(site.port, b"GET /api/projects HTTP/1.1\r\n" + host + header
                                 + b"\r\nConnection: close\r\n\r\n")
    assert status in statuses, answer[:300]


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
    # (a) huge integers, NaN, Infinity: in every message type
    ('{"type": "subscribe", "project": "tiny", "resume": {"abcdefabcdef": ' + "9" * 5000 + "}}", "5000 digits"),
    ('{"type": "subscribe", "project": "tiny", "resume": {"abcdefabcdef": ' + "9" * 20 + "}}", "up to"),
    ('{"type": "subscribe", "project": "tiny", "resume": {"abcdefabcdef": NaN}}', "NaN"),
    ('{"type": "auth", "token": ' + "1" * 4301 + "}", "digits"),
    ('{"type": "ping", "n": -Infinity}', "-Infinity"),
    ('{"type": "unsubscribe", "project": 1e400}', "finite"),
    ("[" + "1" * 10000 + "]", "digits"),
    # (b) unpaired surrogates: in the type, a field, a key, a resume id
    ('{"type": "\\ud800"}', "surrogate"),
    ('{"type": "auth", "token": "dh_\\udfff"}', "surrogate"),
    ('{"type": "subscribe", "project": "\\ud800"}', "surrogate"),
    ('{"type": "subscribe", "project": "tiny", "resume": {"\\udc00": 1}}', "surrogate"),
    ('{"type": "unsubscribe", "project": "tiny\\udbff"}', "surrogate"),
    ('{"type": "ping", "\\ud83d": 1}', "surrogate"),
    # (c) trailing whitespace and control characters
    ('{"type": "subscribe", "project": "tiny\\n"}', "project must be"),
    ('{"type": "unsubscribe", "project": " tiny"}', "project must be"),
    ('{"type": "subscribe", "project": "tiny", "resume": {"abcdefabcdef\\n": 1}}', "12 lowercase"),
    ('{"type": "ping\\n"}', "unknown message type"),
    ("[" * 40 + "]" * 40, "nested too deeply"),
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


async def test_socket_text_that_is_not_utf8_gets_a_close_frame(site: Served) -> None:
    """Not JSON's problem but the frame's: aiohttp refuses it with 1007, a real close frame."""
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    writer.write(b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    payload = b'{"type": "\xed\xa0\x80"}'
    mask = b"\x01\x02\x03\x04"
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask
                 + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    frame = await asyncio.wait_for(reader.read(2), 5)
    assert frame[0] == 0x88  # FIN + close
    code = int.from_bytes((await asyncio.wait_for(reader.readexactly(frame[1] & 0x7F), 5))[:2], "big")
    assert code == 1007
    writer.close()


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


# -- hostile fuzzing: full Unicode (surrogates too), huge numbers, deep nesting ------------


class Raw:
    """A piece of JSON text json.dumps cannot write: a 5,000-digit integer, NaN, Infinity."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:20]!r}, {len(self.text)} chars)"


def to_json(value: object) -> str:
    """JSON text with every string ASCII-escaped, so lone surrogates travel as \\udXXX."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)  # Cs included
hostile_text = st.one_of(
    any_text,
    st.builds(lambda a, s, b: a + s + b, any_text, st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), any_text),
    st.builds(lambda a, c: a + c, st.sampled_from(["tiny", "main", "abcdefabcdef", "A"]),
              st.sampled_from(["\n", " ", "\t", "\r\n", "\x00", "\x7f", "\u0085", "\u200b", "\u2028", "\ufeff"])),
)
huge_number = st.one_of(
    st.integers(min_value=21, max_value=6000).map(lambda n: Raw("9" * n)),
    st.integers(min_value=21, max_value=6000).map(lambda n: Raw("-1" + "0" * n)),
    st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e999")]),
    st.integers(min_value=2**63 - 2, max_value=2**64),
)
hostile_leaf = st.none() | st.booleans() | st.integers() | hostile_text | huge_number
hostile_values = st.recursive(
    hostile_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=10,
)


def nested(depth: int, leaf: object, kind: str) -> Raw:
    """`leaf` inside `depth` arrays or objects, as text (too deep for a recursive encoder)."""
    opening, closing = ("[", "]") if kind == "list" else ('{"a":', "}")
    return Raw(opening * depth + to_json(leaf) + closing * depth)


deep_values = st.builds(nested, st.integers(min_value=30, max_value=900), hostile_leaf,
                        st.sampled_from(["list", "dict"]))
fuzz_value = hostile_values | deep_values
# A repository URL that is never fetched: either a fixed loopback URL with a hostile part
# (which must be refused before any connection) or hostile text of its own.
hostile_url = hostile_text | st.builds(
    lambda bad, where: ("http://127.0.0.1:9/x.git" + bad) if where else (bad + "http://127.0.0.1:9/x.git"),
    st.sampled_from(["\n", " ", "\t", "\x00", "\u0085", "\u200b", "\ud800", "\udfff"]), st.booleans(),
)

# (method, path template, body strategy, statuses allowed)
REST_FUZZ = [
    ("POST", "/api/deployments", fuzz_value | st.fixed_dictionaries(
        {"repo_url": hostile_url}, optional={"project": fuzz_value, "branch": fuzz_value}), {400, 409}),
    ("POST", "/api/projects/tiny/rollback", fuzz_value | st.fixed_dictionaries({"deployment": fuzz_value}), {400, 404, 409}),
    ("PATCH", "/api/projects/fuzz/variables", fuzz_value | st.fixed_dictionaries({"variables": st.dictionaries(
        hostile_text, st.none() | fuzz_value | st.fixed_dictionaries({"value": fuzz_value}, optional={"secret": fuzz_value}),
        max_size=3)}), {200, 400}),
]


@pytest.mark.parametrize("method, path, bodies, statuses", REST_FUZZ, ids=[f"{m} {p}" for m, p, *_ in REST_FUZZ])
def test_fuzz_hostile_bodies_never_500(site: Served, method: str, path: str, bodies: st.SearchStrategy[object], statuses: set[int]) -> None:
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(body=bodies)
    def check(body: object) -> None:
        status, _, raw = site.request(method, path, body=to_json(body).encode(),
                                      headers={"Content-Type": "application/json"})
        assert status in statuses, (status, raw[:300])
        assert "error" in json.loads(raw) or status == 200

    check()


# Path parameters and query strings as raw bytes, percent-encoded: invalid UTF-8 included.
PATH_FUZZ = [
    ("GET", "/api/projects/{x}"), ("GET", "/api/projects/{x}/deployments"),
    ("GET", "/api/projects/{x}/variables"), ("GET", "/api/deployments/{x}"),
    ("POST", "/api/deployments/{x}/cancel"), ("GET", "/api/deployments/{dep}/logs?after={x}"),
    ("GET", "/api/deployments/{x}/logs?after=1"),
]


@pytest.mark.parametrize("method, template", PATH_FUZZ, ids=[t for _, t in PATH_FUZZ])
def test_fuzz_path_and_query_never_500(site: Served, method: str, template: str) -> None:
    from urllib.parse import quote_from_bytes

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(raw=st.binary(max_size=30) | any_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
    def check(raw: bytes) -> None:
        path = template.format(x=quote_from_bytes(raw, safe=""), dep=site.dep_id)  # type: ignore[attr-defined]
        status, _, body = site.request(method, path, body=b"" if method == "POST" else None)
        assert status in (200, 400, 404, 409), (path, status, body[:200])

    check()


MESSAGE_TYPES = ["auth", "subscribe", "unsubscribe", "ping"]
ws_messages = st.one_of(
    fuzz_value,
    st.fixed_dictionaries(
        {"type": st.sampled_from(MESSAGE_TYPES) | hostile_text | huge_number},
        optional={"token": fuzz_value, "project": fuzz_value | st.just("tiny"),
                  "resume": fuzz_value | st.dictionaries(hostile_text | st.just("abcdefabcdef"), fuzz_value, max_size=3)},
    ),
)


async def exchange(site: Served, text: str) -> aiohttp.WSMessage:
    headers = {"Authorization": f"Bearer {site.token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.ws_connect(site.url + "/api/ws") as ws:
            await ws.send_str(text)
            await ws.send_str('{"type": "ping"}')
            return await ws.receive(timeout=10)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(message=ws_messages)
def test_fuzz_socket_messages_answer_or_close_cleanly(site: Served, message: object) -> None:
    """Every message type with hostile fields: the socket answers (an error, a pong, a
    subscription) or closes with a close frame and a code, never just drops."""
    text = to_json(message)
    if len(text.encode()) > 60_000:
        return  # over the frame limit: a 1009 close, tested above
    answer = asyncio.run(exchange(site, text))
    if answer.type == aiohttp.WSMsgType.TEXT:
        assert json.loads(answer.data)["type"] in ("error", "pong", "subscribed", "authenticated", "logs", "status")
    else:
        assert answer.type == aiohttp.WSMsgType.CLOSE, answer
        assert answer.data in (4401, 4429), answer
