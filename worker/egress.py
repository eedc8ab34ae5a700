"""The build's only way out to the network: an HTTP(S) proxy the worker runs for each command.

A sandboxed command runs in its own network namespace (`bwrap --unshare-net`), which holds
nothing but its own loopback: not the host's loopback, its networks, its abstract Unix
sockets or a metadata service. The proxy listens on that loopback, on a socket the worker
made inside the namespace before the command started (worker/netns.py), and the command's
HTTP(S)_PROXY names it (`proxy_env`); no process inside relays anything. The proxy
resolves the name itself, refuses every address `deployhub.addresses.refusal` names
(after resolution, so a public name pointing inside is refused too), and only then connects,
to exactly the addresses it checked. npm, yarn (1 through npm_config_*, 2+ through YARN_*),
pnpm, git and curl honour these variables; code that ignores them reaches nothing.

HTTPS goes through CONNECT tunnels, relayed byte for byte. Plain HTTP (a Verdaccio on the
team's network, say) is relayed request by request, so that both connections stay open between
requests as npm expects: closing after every request cost a Create React App's `npm ci` 2,580
connections and seconds of the build machine's CPU. llhttp, Node's own HTTP/1.1 parser (in C,
through MagicStack's httptools), frames each side; the proxy rewrites the heads and passes the
bodies on as they come. (h11, pure Python, did the same at about 0.3 ms of CPU a request, on
the same machine as the install: bench/egress_relay.py.) A kept upstream connection goes to the
address checked when it was opened; a request for another host opens (and checks) another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httptools

from deployhub.addresses import local_addresses, refusal
from deployhub.validation import Resolver, system_resolver

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
# Transfer-Encoding stay: the proxy frames each body as it came.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"upgrade", b"expect"})

def proxy_env(port: int) -> dict[str, str]:
    """What sends a build's package managers, git and curl to the proxy on 127.0.0.1:`port` of
    their namespace, and everything for the build's own loopback straight there."""
    proxies = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "npm_config_proxy",
               "npm_config_https_proxy", "YARN_HTTP_PROXY", "YARN_HTTPS_PROXY")
    return {**dict.fromkeys(proxies, f"http://127.0.0.1:{port}"),
            **dict.fromkeys(("NO_PROXY", "no_proxy"), "localhost,127.0.0.1,::1")}


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
        """Listen on a Unix socket at `path` (the tests' and benchmarks' way in)."""
        self._server = await asyncio.start_unix_server(self._accept, path, limit=HEAD_MAX)

    async def start_socket(self, listener: socket.socket) -> None:
        """Accept on `listener`, a TCP socket listening in the build's namespace (worker/netns.py)."""
        self._server = await asyncio.start_server(self._accept, sock=listener, limit=HEAD_MAX)

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
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError, _BadMessage):
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
        client = _Messages(reader, httptools.HttpRequestParser)
        upstream: _Upstream | None = None
        try:
            client.feed(head)
            while True:
                try:
                    request = await client.next(IDLE_TIMEOUT)
                except _BadMessage as exc:
                    await _answer(writer, exc.status, f"bad request: {exc}")
                    return
                if not isinstance(request, _Head):
                    return  # the client closed
                try:
                    host, port, path = _absolute_http(request.target)
                    if upstream is None or upstream.key != (host, port) or not upstream.reusable():
                        if upstream is not None:
                            upstream.writer.close()
                        upstream = _Upstream((host, port), *await self._open(host, port))
                except Refused as exc:
                    await _answer(writer, exc.status, str(exc))
                    return
                upstream, going_on = await self._exchange(client, writer, request, path, upstream)
                if not going_on:
                    return
        finally:
            if upstream is not None:
                upstream.writer.close()

    async def _exchange(self, client: _Messages, writer: asyncio.StreamWriter, request: _Head, path: bytes,
                        upstream: _Upstream) -> tuple[_Upstream, bool]:
        """One request and its response: the upstream connection it went on, and whether the
        client's connection goes on (else the caller closes both)."""
        headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_BY_HOP]
        if not any(k.lower() == b"host" for k, _ in headers):  # HTTP/1.0 may leave it out; 1.1 may not
            headers.append((b"Host", urlsplit(request.target).netloc.rpartition(b"@")[2]))
        forward = _head_bytes(b"%s %s HTTP/1.1" % (request.method, path), headers)
        if any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in request.headers):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        upstream.writer.write(forward)
        bodiless = True
        while (event := await client.next(IDLE_TIMEOUT)) is not _END:
            if not isinstance(event, bytes):
                return upstream, False  # the client went away mid-request
            bodiless = False
            upstream.writer.write(_frame(event, request.chunked))
            with contextlib.suppress(ConnectionError):  # told by the answer's absence below
                await upstream.writer.drain()
        if request.chunked:
            upstream.writer.write(b"0\r\n\r\n")
        response = await _response(upstream, request)
        if response is None and bodiless and not upstream.fresh:
            # A kept connection the server had closed meanwhile: once more on a new one.
            upstream.writer.close()
            try:
                upstream = _Upstream(upstream.key, *await self._open(*upstream.key))
            except Refused as exc:
                await _answer(writer, exc.status, str(exc))
                return upstream, False
            upstream.writer.write(forward)
            response = await _response(upstream, request)
        if response is None:
            await _answer(writer, 502, f"{upstream.key[0]} closed the connection without an answer")
            return upstream, False
        upstream.fresh = False
        # The body as the upstream framed it, but a chunked one for an HTTP/1.0 client, which
        # knows no chunks: that one and one framed by the upstream's close end with the connection.
        no_body = request.method == b"HEAD" or response.status in (204, 304)
        to_eof = not no_body and not response.chunked and not response.sized
        old_client = request.version == "1.0"
        rechunk = response.chunked and not old_client and not no_body
        close = to_eof or (response.chunked and old_client) or not request.keep_alive
        headers = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP
                   and not (old_client and k.lower() == b"transfer-encoding")]
        if close:
            headers.append((b"Connection", b"close"))
        writer.write(_head_bytes(b"HTTP/1.1 %d %s" % (response.status, response.reason), headers))
        while (event := await upstream.messages.next(None)) is not _END:
            if event is _EOF and to_eof:
                break
            if not isinstance(event, bytes):  # an upstream failing mid-body: the client sees a short body
                return upstream, False
            writer.write(_frame(event, rechunk))
            await writer.drain()
        if rechunk:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        upstream.idle = response.keep_alive
        return upstream, not close

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


@dataclass(slots=True)
class _Head:
    """A request's or response's head, as llhttp parsed it."""
    method: bytes  # requests
    target: bytes
    status: int  # responses
    reason: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    chunked: bool
    sized: bool  # a Content-Length frames the body


class _BadMessage(Exception):
    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


_END = object()  # a message's end
_EOF = object()  # the peer closed its side


class _Messages:
    """One side of a plain-HTTP relay as a series of events: for each message a `_Head`, its
    body in pieces (bytes, chunked framing taken off), then `_END`; `_EOF` when the peer closes.
    llhttp (Node's HTTP parser, through httptools) parses; its callbacks queue the events, so
    a pipelined next request waits its turn, and so does an error (`_BadMessage`)."""

    def __init__(self, reader: asyncio.StreamReader,
                 kind: type[httptools.HttpRequestParser] | type[httptools.HttpResponseParser]) -> None:
        self.reader = reader
        self.kind = kind
        self.events: collections.deque[object] = collections.deque()
        self.head_only = False  # the response to a HEAD request: no body follows the head
        self._parser = kind(self)
        self._restart = False
        self._target, self._reason, self._size = b"", b"", 0
        self._headers: list[tuple[bytes, bytes]] = []

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self.events.append(exc.__context__ if isinstance(exc.__context__, _BadMessage) else _BadMessage(str(exc)))
        except httptools.HttpParserUpgrade:  # a response's (on_headers_complete refuses requests')
            self.events.append(_BadMessage("Upgrade is not relayed over plain HTTP", 502))
        except httptools.HttpParserError as exc:
            self.events.append(_BadMessage(str(exc) or type(exc).__name__))

    async def next(self, timeout: float | None) -> object:
        while not self.events:
            if self._restart:  # after a HEAD's answer, whose Content-Length frames nothing
                self._parser, self._restart = self.kind(self), False
            data = await asyncio.wait_for(self.reader.read(COPY_SIZE), timeout)
            if not data:
                return _EOF
            self.feed(data)
        event = self.events.popleft()
        if isinstance(event, _BadMessage):
            self.events.appendleft(event)  # the stream stays broken
            raise event
        return event

    # llhttp's callbacks, in the order it makes them
    def on_message_begin(self) -> None:
        self._target, self._reason, self._headers, self._size = b"", b"", [], 0

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._count(len(url))

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._count(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._count(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        parser, headers = self._parser, self._headers
        if parser.should_upgrade():
            raise _BadMessage("Upgrade is not relayed over plain HTTP", 501)
        codings = b",".join(v for k, v in headers if k.lower() == b"transfer-encoding")
        chunked = codings.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        head = _Head(
            method=parser.get_method() if isinstance(parser, httptools.HttpRequestParser) else b"",
            target=self._target, reason=self._reason, version=parser.get_http_version(),
            status=parser.get_status_code() if isinstance(parser, httptools.HttpResponseParser) else 0,
            headers=headers, keep_alive=parser.should_keep_alive(), chunked=chunked,
            sized=not chunked and any(k.lower() == b"content-length" for k, _ in headers))
        self.events.append(head)
        if self.head_only and head.status >= 200:
            self.events.append(_END)
            self._restart = True

    def on_body(self, body: bytes) -> None:
        if not self._restart:
            self.events.append(body)

    def on_message_complete(self) -> None:
        if not self._restart:
            self.events.append(_END)

    def _count(self, size: int) -> None:
        self._size += size
        if self._size > HEAD_MAX:
            raise _BadMessage("head too large", 431)


@dataclass
class _Upstream:
    key: tuple[str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    messages: _Messages = field(init=False)
    fresh: bool = True  # no request has been answered on it yet
    idle: bool = True  # the last answer ended cleanly and kept the connection

    def __post_init__(self) -> None:
        self.messages = _Messages(self.reader, httptools.HttpResponseParser)

    def reusable(self) -> bool:
        """Whether the next request may go on this connection."""
        return self.idle and not self.writer.is_closing() and not self.reader.at_eof()


async def _response(upstream: _Upstream, request: _Head) -> _Head | None:
    """The upstream's response head, or None if it closed or broke the connection first. A
    1xx before it is passed over (the proxy answered the client's 100-continue itself)."""
    upstream.idle = False
    upstream.messages.head_only = request.method == b"HEAD"
    try:
        while isinstance(event := await upstream.messages.next(None), _Head) and event.status < 200:
            await upstream.messages.next(None)  # its end
    except (_BadMessage, ConnectionError, OSError):
        return None
    return event if isinstance(event, _Head) else None


def _head_bytes(first: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"\r\n".join([first, *(k + b": " + v for k, v in headers), b"", b""])


def _frame(piece: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece


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
