"""The build network: its own namespace, and an egress proxy that refuses every address inside
a network before any connection. Tests talk only to 127.0.0.1 (and the npm registry through
the proxy); other addresses are only ever answers of an injected resolver."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
from aiohttp import web

from deployhub.addresses import local_addresses, refusal
from tests.support.infra import TINY_APP, GitServer, RedisServer, unique_name
from tests.support.service import Service, StartService
from tests.test_sandbox import MALICIOUS
from worker.egress import EgressProxy

REFUSED = {
    "127.0.0.1": "loopback", "127.8.9.10": "loopback", "::1": "loopback",
    "10.1.2.3": "private (RFC 1918)", "172.16.0.1": "private (RFC 1918)",
    "172.31.255.255": "private (RFC 1918)", "192.168.1.1": "private (RFC 1918)",
    "169.254.169.254": "link-local (cloud metadata)", "169.254.170.2": "link-local (cloud metadata)",
    "168.63.129.16": "cloud metadata", "100.64.0.1": "shared CGNAT (RFC 6598)",
    "100.100.100.200": "shared CGNAT (RFC 6598)", "224.0.0.1": "multicast",
    "239.255.255.250": "multicast", "0.0.0.0": "unspecified", "240.0.0.1": "reserved",
    "255.255.255.255": "reserved", "::": "unspecified", "fc00::1": "unique local (RFC 4193)",
    "fd00:ec2::254": "unique local (RFC 4193)", "fe80::1%eth0": "link-local",
    "ff02::1": "multicast", "::ffff:10.0.0.1": "private (RFC 1918), in IPv6",
    "::ffff:127.0.0.1": "loopback, in IPv6", "::ffff:169.254.169.254": "link-local (cloud metadata), in IPv6",
    "64:ff9b::a9fe:a9fe": "link-local (cloud metadata), in IPv6",
    "2002:c0a8:101::1": "private (RFC 1918), in IPv6", "2001:0:4136:e378::1": "Teredo",
    "3fff::1": None,  # documentation (RFC 9637) but global unicast: allowed like 203.0.113/24
    "4000::1": "reserved", "::10.0.0.1": "IPv4-compatible (deprecated)", "not-an-ip": "not an IP address",
}
ALLOWED = ["93.184.215.14", "8.8.8.8", "203.0.113.80", "100.128.0.1", "172.32.0.1",
           "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", list(REFUSED))
def test_addresses_inside_a_network_are_refused(address: str) -> None:
    assert refusal(address) == REFUSED[address]


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal(address) is None


def test_this_machines_own_addresses_are_refused_in_every_form() -> None:
    own = frozenset({"93.184.215.14", "2606:4700::1111"})
    for address in ("93.184.215.14", "::ffff:93.184.215.14", "2606:4700::1111"):
        assert refusal(address, local=own) == "this machine's own"
    assert refusal("8.8.8.8", local=own) is None


def test_this_machines_own_addresses_are_known() -> None:
    own = local_addresses()
    assert "127.0.0.1" in own and "::1" in own
    assert {str(info[4][0]) for info in socket.getaddrinfo("localhost", None)} & own


class Upstream:
    """An injected `connect`: records every call and connects to a local echo server instead,
    so no test ever opens a connection to the address it was given."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.calls.append((address, port))
        return await asyncio.open_connection("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def running_proxy(
    sock: Path, names: dict[str, list[str]], greeting: bytes = b"hello from upstream: ", **options: Any,
) -> AsyncIterator[tuple[Path, Upstream, list[str]]]:
    """An EgressProxy on `sock` whose resolver knows `names` (and IP literals), relaying to an
    echo server that answers `greeting` and the first line it got; yields (sock, the injected
    connect, the build log's lines)."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream = Upstream(server.sockets[0].getsockname()[1])

    async def resolver(host: str, port: int) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            return names[host]

    lines: list[str] = []
    egress = EgressProxy(lambda _s, text: lines.append(text), resolver=resolver, connect=upstream, **options)
    await egress.start(sock)
    try:
        yield sock, upstream, lines
    finally:
        await egress.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[Path, Upstream, list[str]]]:
    names = {"public.example": ["93.184.215.14"], "inside.example": ["10.0.0.7"],
             "mixed.example": ["93.184.215.14", "169.254.169.254"], "v6.example": ["fd00::5"]}
    async with running_proxy(tmp_path / "proxy.sock", names,
                             local=frozenset({"198.51.100.9", "2001:db8::9"})) as running:
        yield running


async def ask(sock: Path, head: str, then: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(head.encode() + then)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.mark.parametrize("target", [
    "127.0.0.1:6379", "[::1]:22", "10.0.0.1:80", "169.254.169.254:80", "169.254.170.2:80",
    "[::ffff:169.254.169.254]:80", "[fd00:ec2::254]:80", "100.100.100.200:80",
    "inside.example:443", "mixed.example:443", "v6.example:443",
    "198.51.100.9:8000", "[::ffff:198.51.100.9]:8000", "[2001:db8::9]:8000",  # this machine's own
])
async def test_refused_before_any_connection(
    proxy: tuple[Path, Upstream, list[str]], target: str
) -> None:
    sock, upstream, lines = proxy
    answer = await ask(sock, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"builds reach only the public internet" in answer
    assert upstream.calls == []
    assert len(lines) == 1 and lines[0].startswith(f"Network: refused {target.rsplit(':', 1)[0].strip('[]')}")


async def test_plain_http_to_an_inside_name_is_refused(proxy: tuple[Path, Upstream, list[str]]) -> None:
    sock, upstream, _ = proxy
    answer = await ask(sock, "GET http://inside.example/latest/meta-data HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 403 " in answer.split(b"\r\n")[0] and b"resolves to 10.0.0.7, which is a private (RFC 1918)" in answer
    assert upstream.calls == []


async def test_a_public_name_is_tunnelled_to_the_checked_address(
    proxy: tuple[Path, Upstream, list[str]]
) -> None:
    sock, upstream, lines = proxy
    answer = await ask(sock, "CONNECT public.example:443 HTTP/1.1\r\n\r\n", b"ping\n")
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\nhello from upstream: ping\n"
    assert upstream.calls == [("93.184.215.14", 443)] and lines == []


async def test_allowed_hosts_reach_inside_as_named_and_nothing_else(tmp_path: Path) -> None:
    names = {"registry.internal": ["10.0.0.7"], "alias.example": ["10.0.0.8"]}
    async with running_proxy(tmp_path / "proxy.sock", names, b"mirror: ", local=frozenset(),
                             allow_hosts=["Registry.Internal", "10.0.0.8"]) as (sock, upstream, lines):
        for target in ("registry.internal:4873", "10.0.0.8:4873"):
            answer = await ask(sock, f"CONNECT {target} HTTP/1.1\r\n\r\n", b"ping\n")
            assert answer.endswith(b"mirror: ping\n"), answer
        # A name that resolves to an allowed address is not the allowed host; neither is
        # another spelling of the address.
        for target in ("alias.example:4873", "10.0.0.7:4873", "[::ffff:10.0.0.8]:4873"):
            assert (await ask(sock, f"CONNECT {target} HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403 ")
        assert upstream.calls == [("10.0.0.7", 4873), ("10.0.0.8", 4873)]
        assert len(lines) == 3


@pytest.mark.parametrize("head", ["GET / HTTP/1.1", "CONNECT nohost HTTP/1.1", "CONNECT a:0 HTTP/1.1",
                                  "GET ftp://public.example/ HTTP/1.1", "nonsense"])
async def test_malformed_requests_are_refused(proxy: tuple[Path, Upstream, list[str]], head: str) -> None:
    sock, upstream, _ = proxy
    assert (await ask(sock, head + "\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert upstream.calls == []


Answer = tuple[int, dict[str, str], bytes]
PUBLIC = {"public.example": ["93.184.215.14"]}


async def http_through(sock: Path, requests: list[tuple[str, str, bytes]], half_close: bool = False) -> list[Answer]:
    """(status, headers, body) of each (method, absolute URL, body) sent one after another on
    one connection to the proxy, as an HTTP client with keep-alive sends them; fewer answers
    when the proxy closes the connection. `half_close`: shut our writing side down after the
    last request, as some clients do."""
    reader, writer = await asyncio.open_unix_connection(sock)
    conn = h11.Connection(h11.CLIENT)
    answers: list[Answer] = []
    try:
        for number, (method, url, body) in enumerate(requests):
            if conn.our_state is not h11.IDLE:
                break
            headers = [("Host", url.split("/")[2]), ("Proxy-Authorization", "Basic eDp5"),
                       ("Content-Length", str(len(body)))]
            writer.write(conn.send(h11.Request(method=method, target=url, headers=headers)) or b"")
            writer.write((conn.send(h11.Data(data=body)) if body else b"") + (conn.send(h11.EndOfMessage()) or b""))
            if half_close and number == len(requests) - 1:
                writer.write_eof()
            status, got, chunks = 0, {}, []
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
                    elif isinstance(event, h11.Response):
                        status, got = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
            except h11.RemoteProtocolError:  # the proxy closed mid-answer: what came, and no more
                answers.append((status, got, b"".join(chunks)))
                break
            answers.append((status, got, b"".join(chunks)))
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
    finally:
        writer.close()
    return answers


@contextlib.asynccontextmanager
async def http_upstream() -> AsyncIterator[int]:
    """An aiohttp server on 127.0.0.1 that says what it was asked (as JSON), or streams
    /big (2 MiB, chunked, in pieces) back; yields its port."""
    async def echo(request: web.Request) -> web.StreamResponse:
        if request.path == "/big":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(32):
                await response.write(b"x" * 65536)
            await response.write_eof()
            return response
        return web.json_response({"method": request.method, "target": request.raw_path,
                                  "headers": dict(request.headers), "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_plain_http_is_relayed_on_kept_connections(tmp_path: Path) -> None:
    names = {"public.example": ["93.184.215.14"], "other.example": ["93.184.215.15"]}
    async with http_upstream() as port, running_proxy(tmp_path / "p.sock", names, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        answers = await http_through(sock, [
            ("GET", "http://public.example:8080/a?b=1", b""),
            ("POST", "http://public.example:8080/form", b"name=value"),
            ("HEAD", "http://public.example:8080/c", b""),
            ("GET", "http://public.example:8080/big", b""),
            ("GET", "http://other.example/d", b""),
        ])
        assert [a[0] for a in answers] == [200] * 5
        first = json.loads(answers[0][2])
        assert first["target"] == "/a?b=1" and first["headers"]["Host"] == "public.example:8080"
        assert "Proxy-Authorization" not in first["headers"]  # meant for the proxy, not passed on
        assert json.loads(answers[1][2])["body"] == "name=value"
        assert answers[2][2] == b"" and int(answers[2][1]["content-length"]) > 0  # HEAD: no body
        assert answers[3][2] == b"x" * 2 * 1024 * 1024
        # One connection per host, each to the address checked for it, kept between requests.
        assert upstream.calls == [("93.184.215.14", 8080), ("93.184.215.15", 80)]
        # HTTP/1.0 may leave Host out; the request upstream (HTTP/1.1) names it.
        old = await ask(sock, "GET http://public.example:8080/e HTTP/1.0\r\n\r\n")
        assert old.startswith(b"HTTP/1.1 200 ") and b'"Host": "public.example:8080"' in old


async def test_a_kept_connection_checks_each_new_host(proxy: tuple[Path, Upstream, list[str]]) -> None:
    sock, upstream, lines = proxy
    async with http_upstream() as port:
        upstream.port = port
        answers = await http_through(sock, [("GET", "http://public.example/", b""),
                                            ("GET", "http://inside.example/latest/meta-data", b""),
                                            ("GET", "http://public.example/again", b"")])
    assert [a[0] for a in answers] == [200, 403]  # and then the proxy closed
    assert b"resolves to 10.0.0.7, which is a private (RFC 1918)" in answers[1][2]
    assert upstream.calls == [("93.184.215.14", 80)]
    assert len(lines) == 1


async def test_the_whole_answer_reaches_a_client_that_half_closes(tmp_path: Path) -> None:
    # aiohttp, like many servers, drops a response when its client half-closes: the proxy
    # must not pass a client's end of writing on to the upstream mid-answer.
    async with http_upstream() as port, running_proxy(tmp_path / "p.sock", PUBLIC, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        answers = await http_through(sock, [("GET", "http://public.example/big", b"")], half_close=True)
    assert [(a[0], len(a[2])) for a in answers] == [(200, 2 * 1024 * 1024)]


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on 127.0.0.1 that answers each connection's first request head with `answer`
    as it stands, then closes; yields its port and a list that grows by one per answer."""
    served: list[int] = []

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        served.append(1)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), served
    finally:
        server.close()
        await server.wait_closed()


async def test_a_kept_upstream_connection_the_server_closed_is_replaced(tmp_path: Path) -> None:
    # Answers as keep-alive, then closes: a server whose idle timeout ran out.
    async with raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as (port, served), \
            running_proxy(tmp_path / "p.sock", PUBLIC, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        first = await http_through(sock, [("GET", "http://public.example/1", b"")])
        answers = await http_through(sock, [("GET", "http://public.example/1", b""),
                                            ("GET", "http://public.example/2", b"")])
    assert [(a[0], a[2]) for a in first + answers] == [(200, b"ok")] * 3
    # The last request found its kept connection closed and went on a new one.
    assert len(served) == 3 and len(upstream.calls) == 3


async def test_an_upstream_that_breaks_mid_answer_ends_the_clients_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b") as (port, _), \
            running_proxy(tmp_path / "p.sock", PUBLIC, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        answers = await http_through(sock, [("GET", "http://public.example/1", b""),
                                            ("GET", "http://public.example/2", b"")])
    # The client learns the body was cut short (the connection ends before it), and the
    # connection is not used again.
    assert [(a[0], a[1]["content-length"], a[2]) for a in answers] == [(200, "100", b"only ten b")]
    assert len(upstream.calls) == 1
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_framing_is_kept_across_the_relay(tmp_path: Path) -> None:
    # Raw bytes both ways, as clients and servers other than ours frame them: a chunked
    # request body, two pipelined requests, a chunked answer to an HTTP/1.0 client (which
    # knows no chunks: it gets the body to the connection's end), an answer framed by close.
    async with http_upstream() as port, running_proxy(tmp_path / "p.sock", PUBLIC, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        chunked = ("POST http://public.example/up HTTP/1.1\r\nHost: public.example\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n")
        second = "GET http://public.example/two HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n"
        answer = await ask(sock, chunked, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" + second.encode())
        assert answer.count(b"HTTP/1.1 200 ") == 2
        assert b'"body": "hello world"' in answer and b'"target": "/two"' in answer
        assert len(upstream.calls) == 1  # both on one kept upstream connection
        old = await ask(sock, "GET http://public.example/big HTTP/1.0\r\n\r\n")
        head, _, body = old.partition(b"\r\n\r\n")
        assert b"chunked" not in head.lower() and b"connection: close" in head.lower()
        assert body == b"x" * 2 * 1024 * 1024
    async with raw_upstream(b"HTTP/1.1 200 OK\r\n\r\nto the end") as (port, _), \
            running_proxy(tmp_path / "q.sock", PUBLIC, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        answers = await http_through(sock, [("GET", "http://public.example/1", b""),
                                            ("GET", "http://public.example/2", b"")])
        assert [(a[0], a[1].get("connection"), a[2]) for a in answers] == [(200, "close", b"to the end")]
    async with raw_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") as (port, _), \
            running_proxy(tmp_path / "r.sock", PUBLIC, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        head = await ask(sock, "HEAD http://public.example/ HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"chunked\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(("then", "status"), [
    (b"GET http://public.example/ HTTP/1.1\r\nX-Big: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
    (b"GET http://public.example/ HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", b"501"),
    (b"GET http://public.example/ HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
])
async def test_a_bad_next_request_is_answered_and_ends_the_connection(
    tmp_path: Path, then: bytes, status: bytes
) -> None:
    async with http_upstream() as port, running_proxy(tmp_path / "p.sock", PUBLIC, local=frozenset()) as (sock, upstream, _):
        upstream.port = port
        answer = await ask(sock, "GET http://public.example/a HTTP/1.1\r\nHost: public.example\r\n\r\n", then)
    first, _, rest = answer.partition(b"HTTP/1.1 " + status + b" ")
    assert first.startswith(b"HTTP/1.1 200 ") and b'"target": "/a"' in first and first.count(b"HTTP/1.1 ") == 1
    assert b"DeployHub build network: bad request" in rest and rest.count(b"HTTP/1.1 ") == 0
    assert len(upstream.calls) == 1


class Canary:
    """TCP servers on this machine that no build may reach: every accepted connection counts."""

    def __init__(self) -> None:
        self.hits = 0
        self.servers: list[asyncio.Server] = []

    async def listen(self, host: str) -> int:
        def hit(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.hits += 1
            writer.close()

        server = await asyncio.start_server(hit, host, 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()


async def probe(service: Service, git_server: GitServer, **target: object) -> tuple[dict[str, str], list[str]]:
    url = git_server.add_repo(unique_name("netprobe"), files_dir=MALICIOUS / "netprobe",
                              files={"target.json": json.dumps(target)})
    dep = await service.deploy(url)
    final = await service.wait_final(dep["id"], 120)
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert final["status"] == "ready", (final["reason"], texts[-20:])
    assert any(t.startswith("added 1 package") for t in texts)  # npm ci, from the registry
    found = {" ".join(t.split(" ")[1:3]): t.split(" ", 3)[3] for t in texts if t.startswith("NETPROBE ")}
    return found, texts


async def test_a_build_cannot_reach_this_machine_but_npm_ci_works(
    service: Service, git_server: GitServer
) -> None:
    canary = Canary()
    port = await canary.listen("127.0.0.1")
    name = unique_name("deployhub-canary")
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + name)
    abstract.listen()
    try:
        found, texts = await probe(service, git_server, abstract=name,
                                   tcp=[["127.0.0.1", port], ["localhost", port]])
    finally:
        abstract.close()
        await canary.close()
    assert found[f"direct 127.0.0.1:{port}"] == "ECONNREFUSED"  # its own, empty loopback
    assert found[f"proxy 127.0.0.1:{port}"] == "HTTP-403"
    assert found[f"proxy localhost:{port}"] == "HTTP-403"
    assert found[f"abstract {name}"] == "ECONNREFUSED"
    assert found["run /run"] == "ENOENT"
    assert found["dependency is-number"] == "OK"
    assert canary.hits == 0
    assert f"Network: refused localhost:{port}: 127.0.0.1 is a loopback address; builds reach " \
           "only the public internet" in texts


def loopback_name() -> str | None:
    """This machine's name, if it resolves to 127.0.0.1 and nothing else (so a test may
    connect to it)."""
    name = socket.gethostname()
    try:
        found = {str(info[4][0]) for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    return name if found == {"127.0.0.1"} else None


async def test_a_host_the_operator_allows_is_reached_through_the_proxy(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    name = loopback_name()
    if name is None:
        pytest.skip(f"{socket.gethostname()} does not resolve to 127.0.0.1 alone, so no allowed "
                    "name can stand for a service on this machine here")
    service = await start_service(redis=redis_server, build_allow_hosts=(name,))
    canary = Canary()
    port = await canary.listen("127.0.0.1")
    try:
        found, texts = await probe(service, git_server, tcp=[[name, port], ["127.0.0.1", port]])
    finally:
        await canary.close()
    assert found[f"proxy {name}:{port}"] == "HTTP-200"
    assert found[f"proxy 127.0.0.1:{port}"] == "HTTP-403"  # the address itself is not named
    assert canary.hits == 1  # the allowed tunnel, and nothing direct
    assert any(f"and {name} (DEPLOYHUB_BUILD_ALLOW_HOSTS)" in t for t in texts if t.startswith("Network: "))


def own_public_address() -> str | None:
    """This machine's address by its name, if it is neither loopback nor private."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]))
        if not ip.is_loopback and not ip.is_private and not ip.is_link_local:
            return str(ip)
    return None


async def test_a_build_cannot_reach_this_machine_by_its_public_address(
    service: Service, git_server: GitServer
) -> None:
    address = own_public_address()
    if address is None:
        pytest.skip(f"{socket.gethostname()} resolves to no public address of this machine "
                    "(only loopback or private ones), so there is none to try")
    canary = Canary()
    port = await canary.listen(address)
    try:
        found, _ = await probe(service, git_server, tcp=[[address, port]])
    finally:
        await canary.close()
    assert found[f"direct {address}:{port}"] in ("ENETUNREACH", "ECONNREFUSED", "EHOSTUNREACH")
    assert found[f"proxy {address}:{port}"] == "HTTP-403"  # public, but this machine's own
    assert canary.hits == 0


async def test_host_network_is_an_explicit_unsafe_choice(
    redis_server: RedisServer, start_service: StartService, git_server: GitServer
) -> None:
    service = await start_service(redis=redis_server, build_network="host")
    dep = await service.deploy(git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP))
    final = await service.wait_final(dep["id"])
    assert final["status"] == "ready", final["reason"]
    texts = [e["text"] for e in await service.logs(dep["id"])]
    assert any(t.startswith("Warning: DEPLOYHUB_BUILD_NETWORK=host: build commands share") for t in texts)


async def test_closing_ends_open_tunnels_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # an idle keep-alive connection, until the proxy closes it
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    upstream = Upstream(server.sockets[0].getsockname()[1])

    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14"]

    egress = EgressProxy(lambda _s, _t: None, resolver=resolver, connect=upstream, local=frozenset())
    await egress.start(tmp_path / "proxy.sock")
    reader, writer = await asyncio.open_unix_connection(tmp_path / "proxy.sock")
    writer.write(b"CONNECT public.example:443 HTTP/1.1\r\n\r\n")
    assert await reader.readline() == b"HTTP/1.1 200 Connection established\r\n"
    await asyncio.wait_for(egress.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b"\r\n"  # the rest of the head, then EOF
    await asyncio.sleep(0.05)  # where asyncio would log an error in a callback
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    writer.close()
    server.close()
    await server.wait_closed()
