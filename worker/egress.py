"""The build's only way out to the network: an HTTP(S) proxy the worker runs on a Unix socket.

A sandboxed command runs in its own network namespace (`bwrap --unshare-net`), which holds
nothing but its own loopback: not the host's loopback, its networks, its abstract Unix
sockets or a metadata service. Inside it, FORWARDER (run by node, which every build has)
listens on 127.0.0.1, sets HTTP(S)_PROXY for the command it starts, and relays each
connection to this proxy through the Unix socket bind-mounted into the sandbox. The proxy
resolves the name itself, refuses every address `deployhub.addresses.refusal` names
(after resolution, so a public name pointing inside is refused too), and only then connects,
to exactly the addresses it checked. npm, yarn (1 through npm_config_*, 2+ through YARN_*),
pnpm, git and curl honour these variables; code that ignores them reaches nothing.

HTTPS goes through CONNECT tunnels, relayed byte for byte. Plain HTTP (a Verdaccio on the
team's network, say) is relayed request by request with h11, the HTTP/1.1 state machine of the
python-hyper project, so that both connections stay open between requests as npm expects:
closing after every request cost a Create React App's `npm ci` 2,580 connections and seconds
of the build machine's CPU. A kept upstream connection goes to the address checked when it
was opened; a request for another host opens (and checks) another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import h11

from deployhub.addresses import local_addresses, refusal
from deployhub.validation import Resolver, system_resolver

from .bwrap import INSIDE_EGRESS
from .proc import Emit

log = logging.getLogger(__name__)

# address, port -> an open connection
Connect = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

HEAD_MAX = 16 * 1024
HEAD_TIMEOUT = 30.0
RESOLVE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
MAX_REPORTED = 20  # refusals told in the build log; a loop of them must not flood it
COPY_SIZE = 64 * 1024
IDLE_TIMEOUT = 30.0  # a plain-HTTP connection between requests
# Headers that describe one connection, not the request (RFC 9110 7.6.1). Content-Length and
# Transfer-Encoding stay: h11 frames each side's body by them.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"upgrade", b"expect"})

# Runs inside the sandbox as the parent of the build command: listens on 127.0.0.1 (a port
# the kernel picks, so it never collides with the build's own servers), relays every
# connection to the proxy's socket, and exits with the command's status.
FORWARDER = r"""
"use strict";
const net = require("net"), os = require("os"), { spawn } = require("child_process");
const [sock, ...cmd] = process.argv.slice(1);
const server = net.createServer({ pauseOnConnect: true }, (c) => {
  const u = net.connect(sock, () => { c.pipe(u); u.pipe(c); c.resume(); });
  c.on("error", () => u.destroy()); u.on("error", () => c.destroy());
  c.on("close", () => u.destroy()); u.on("close", () => c.destroy());
});
server.on("error", (e) => { console.error("egress forwarder: " + e.message); process.exit(125); });
server.listen({ host: "127.0.0.1", port: 0 }, () => {
  const url = "http://127.0.0.1:" + server.address().port;
  const env = { ...process.env, NO_PROXY: "localhost,127.0.0.1,::1", no_proxy: "localhost,127.0.0.1,::1" };
  for (const k of ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "npm_config_proxy",
                   "npm_config_https_proxy", "YARN_HTTP_PROXY", "YARN_HTTPS_PROXY"]) env[k] = url;
  const child = spawn(cmd[0], cmd.slice(1), { stdio: "inherit", env });
  child.on("error", (e) => { console.error(cmd[0] + ": " + e.message); process.exit(127); });
  child.on("exit", (code, sig) => process.exit(code ?? 128 + (os.constants.signals[sig] || 0)));
});
"""

INSIDE_SOCKET = INSIDE_EGRESS + "/proxy.sock"


def forwarder_argv(argv: list[str]) -> list[str]:
    return ["node", "-e", FORWARDER, INSIDE_SOCKET, *argv]


async def open_tcp(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(address, port, limit=COPY_SIZE)


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class EgressProxy:
    """One build command's proxy: `start(path)` listens on a Unix socket, `close()` ends it
    and every connection it relays."""

    def __init__(self, emit: Emit, *, resolver: Resolver = system_resolver,
                 connect: Connect = open_tcp, local: frozenset[str] | None = None,
                 allow_hosts: Iterable[str] = ()) -> None:
        self.emit = emit
        # As for the clone's URL (validation.check_repo_url): the host as the build names
        # it, never what it resolves to, so allowing 10.0.0.8 lets no name pointing there in.
        self.allowed = frozenset(h.lower() for h in allow_hosts)
        self.local = local_addresses() if local is None else local
        self.resolver = resolver
        self.connect = connect
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path, limit=HEAD_MAX)
        path.chmod(0o666)  # the sandbox's uid maps to ours, but be explicit

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with self._slots:
                await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError, h11.ProtocolError):
            pass  # either side broke HTTP or the connection: the connection ends
        except asyncio.CancelledError:
            # close() ends the command's connections. Ending normally matters: asyncio's
            # stream server (3.11) asks a cancelled handler task for its exception, and
            # logs the CancelledError that raises as an error in a callback.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            await _answer(writer, 431, "request head too large")
            return
        try:
            host, port = _parse_connect(head)
        except Refused as exc:
            await _answer(writer, exc.status, str(exc))
            return
        if not host:
            await self._relay_http(reader, writer, head)
            return
        try:
            upstream_reader, upstream = await self._open(host, port)
        except Refused as exc:
            await _answer(writer, exc.status, str(exc))
            return
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _splice(reader, writer, upstream_reader, upstream)
        finally:
            upstream.close()

    async def _relay_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        """Plain-HTTP proxy requests on one connection, each to its checked upstream, until
        either side closes, a request is refused, or the client is idle for IDLE_TIMEOUT."""
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
        client.receive_data(head)
        upstream: _Upstream | None = None
        try:
            while True:
                try:
                    request = await _next_event(client, reader, IDLE_TIMEOUT)
                except h11.RemoteProtocolError as exc:
                    await _respond(writer, client, exc.error_status_hint, f"bad request: {exc}")
                    return
                if not isinstance(request, h11.Request):
                    return  # the client closed (h11.ConnectionClosed)
                try:
                    host, port, path = _absolute_http(request.target)
                    if upstream is None or upstream.key != (host, port) or not upstream.reusable():
                        if upstream is not None:
                            upstream.writer.close()
                        upstream = _Upstream((host, port), *await self._open(host, port))
                except Refused as exc:
                    await _respond(writer, client, exc.status, str(exc))
                    return
                upstream = await self._exchange(reader, writer, client, request, path, upstream)
                if upstream is None or client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                    return
                client.start_next_cycle()
        finally:
            if upstream is not None:
                upstream.writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: h11.Connection,
                        request: h11.Request, path: bytes, upstream: _Upstream) -> _Upstream | None:
        """One request and its response; the upstream connection to keep, or None when
        the client connection must end."""
        headers = [(k, v) for k, v in request.headers.raw_items() if k.lower() not in HOP_BY_HOP]
        if not any(k.lower() == b"host" for k, _ in headers):  # HTTP/1.0 may leave it out; 1.1 may not
            headers.append((b"Host", urlsplit(request.target).netloc.rpartition(b"@")[2]))
        forward = h11.Request(method=request.method, target=path, headers=headers)
        if client.client_is_waiting_for_100_continue:
            await _send(writer, client, h11.InformationalResponse(status_code=100, headers=[]))
        await _send(upstream.writer, upstream.conn, forward)
        bodiless = True
        while not isinstance(event := await _next_event(client, reader, IDLE_TIMEOUT), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                return None  # the client went away mid-request
            bodiless = False
            await _send(upstream.writer, upstream.conn, event)
        await _send(upstream.writer, upstream.conn, h11.EndOfMessage())
        response = await _response(upstream)
        if response is None and bodiless and not upstream.fresh:
            # A kept connection the server had closed meanwhile: once more on a new one.
            upstream.writer.close()
            try:
                upstream = _Upstream(upstream.key, *await self._open(*upstream.key))
            except Refused as exc:
                await _respond(writer, client, exc.status, str(exc))
                return None
            await _send(upstream.writer, upstream.conn, forward)
            await _send(upstream.writer, upstream.conn, h11.EndOfMessage())
            response = await _response(upstream)
        if response is None:
            await _respond(writer, client, 502, f"{upstream.key[0]} closed the connection without an answer")
            return None
        upstream.fresh = False
        await _send(writer, client, h11.Response(
            status_code=response.status_code, reason=response.reason,
            headers=[(k, v) for k, v in response.headers.raw_items() if k.lower() not in HOP_BY_HOP]))
        while True:  # an upstream failing mid-body ends the client's connection: it sees a short body
            event = await _next_event(upstream.conn, upstream.reader, None)
            if isinstance(event, h11.EndOfMessage):
                await _send(writer, client, h11.EndOfMessage())
                return upstream
            if not isinstance(event, h11.Data):
                return None
            await _send(writer, client, event)

    async def _open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            addresses = await asyncio.wait_for(self.resolver(host, port), RESOLVE_TIMEOUT)
        except (OSError, TimeoutError, UnicodeError):
            raise Refused(502, f"{host} could not be resolved") from None
        if not addresses:
            raise Refused(502, f"{host} could not be resolved")
        # A host the operator allows is reached wherever it leads; the rest only outside.
        checked = () if host.lower() in self.allowed else addresses
        for address in checked:
            if why := refusal(address, local=self.local):
                self._report(f"Network: refused {host}:{port}: {address} is a {why} address; "
                             "builds reach only the public internet")
                named = address if host == address else f"{host} resolves to {address}, which"
                raise Refused(403, f"{named} is a {why} address: builds reach only the "
                                   "public internet")
        last: Exception | None = None
        for address in addresses:  # only ever the addresses checked above
            try:
                return await asyncio.wait_for(self.connect(address, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                last = exc
        raise Refused(502, f"cannot connect to {host}:{port}: {last}")

    def _report(self, text: str) -> None:
        self.refused += 1
        if self.refused <= MAX_REPORTED:
            self.emit("system", text)


def _parse_connect(head: bytes) -> tuple[str, int]:
    """(host, port) of a CONNECT request head; ("", 0) for any other HTTP/1 request."""
    parts = head.decode("latin-1").split("\r\n", 1)[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Refused(400, "not an HTTP/1 proxy request")
    if parts[0] != "CONNECT":
        return "", 0
    host, sep, port_text = parts[1].rpartition(":")
    if not sep:
        raise Refused(400, "CONNECT needs host:port")
    return _host(host), _port(port_text)


def _absolute_http(target: bytes) -> tuple[str, int, bytes]:
    """(host, port, origin-form target) of a plain-HTTP proxy request's absolute URL."""
    url = urlsplit(target.decode("latin-1"))
    if url.scheme != "http" or not url.hostname:
        raise Refused(400, "only CONNECT and absolute http:// URLs can be proxied")
    try:
        port = url.port or 80
    except ValueError:
        raise Refused(400, "bad port") from None
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    return _host(url.hostname), port, path.encode("latin-1")


@dataclass
class _Upstream:
    key: tuple[str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    fresh: bool = True  # no request has been answered on it yet

    def reusable(self) -> bool:
        """Whether the next request may go on this connection; starts h11's next cycle when
        the last exchange ended cleanly."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return self.conn.our_state is h11.IDLE and not self.writer.is_closing()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float | None) -> object:
    """The next h11 event on `conn`, reading from `reader` as it needs (EOF included)."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await asyncio.wait_for(reader.read(COPY_SIZE), timeout))
    return event


async def _response(upstream: _Upstream) -> h11.Response | None:
    """The upstream's response head, or None if it closed or broke the connection first. A
    1xx before it is passed over (the proxy answered the client's 100-continue itself)."""
    try:
        while isinstance(event := await _next_event(upstream.conn, upstream.reader, None), h11.InformationalResponse):
            pass
    except (h11.ProtocolError, ConnectionError, OSError):
        return None
    return event if isinstance(event, h11.Response) else None


async def _send(writer: asyncio.StreamWriter, conn: h11.Connection, event: h11.Event) -> None:
    if data := conn.send(event):
        writer.write(data)
        await writer.drain()


async def _respond(writer: asyncio.StreamWriter, conn: h11.Connection, status: int, reason: str) -> None:
    """The proxy's own answer on a plain-HTTP connection, which then ends; nothing if a
    response has begun already. (h11 lets a server answer a request it could not read from
    IDLE.)"""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"DeployHub build network: {reason}\n".encode()
    with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
        await _send(writer, conn, h11.Response(status_code=status, headers=[
            ("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("Connection", "close")]))
        await _send(writer, conn, h11.Data(data=body))
        await _send(writer, conn, h11.EndOfMessage())


def _host(text: str) -> str:
    host = text.strip("[]")
    if not host or any(c in host for c in " /\\@"):
        raise Refused(400, "bad host")
    return host


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise Refused(400, "bad port")
    return int(text)


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    titles = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
              502: "Bad Gateway"}
    body = f"DeployHub build network: {reason}\n".encode()
    writer.write(f"HTTP/1.1 {status} {titles.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _splice(ra: asyncio.StreamReader, wa: asyncio.StreamWriter,
                  rb: asyncio.StreamReader, wb: asyncio.StreamWriter) -> None:
    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(COPY_SIZE):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

    await asyncio.gather(copy(ra, wb), copy(rb, wa))
