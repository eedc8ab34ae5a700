"""The watchers (a process): N WebSocket clients of one project, checking every line."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pickle
import random
import time
from array import array
from collections import Counter
from typing import Any

from .processes import Child, child_common
from .report import BINS_PER_S

SEQ = b'"seq":'
LOGS_PREFIX = b'{"type":"logs"'
COUNT_EVERY = 16  # a watcher counts the events of every 16th frame (full-check watchers: all)


class Watcher:
    __slots__ = ("full", "ws", "last", "accepted", "received", "dups", "gaps", "bad_frames",
                 "resyncs", "errors", "subscribed", "closed", "done_at", "last_at", "msgs",
                 "nbytes", "rr", "ra", "rb", "flast", "full_errors", "text_lat", "statuses",
                 "skipped", "last_ctrl_at", "phase")

    def __init__(self, full: bool, phase: int = 0) -> None:
        self.full = full
        self.phase = phase  # which frames this watcher counts the events of
        self.ws: Any = None
        self.last = 0  # highest seq accepted
        self.accepted = 0  # distinct lines received in order
        self.received = 0  # every line received, duplicates included
        self.dups = 0  # lines at or below `last` (duplicates or out of order)
        self.gaps = 0  # frames that skipped ahead
        self.bad_frames = 0  # frames whose event count did not match last-first+1
        self.resyncs = 0
        self.errors: list[str] = []
        self.subscribed = False
        self.closed = False
        self.done_at = 0.0
        self.last_at = 0.0
        self.msgs = 0
        self.nbytes = 0
        self.rr = array("d")  # receipt time of each message that carried new lines
        self.ra = array("q")  # first new seq in it
        self.rb = array("q")  # last seq in it
        self.flast = 0
        self.full_errors = 0
        self.text_lat: Counter[int] = Counter()
        self.statuses = 0
        self.skipped = 0  # lines jumped over by a frame that skipped ahead
        self.last_ctrl_at = 0.0


class Clients:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.expected: int = spec["expected"]
        self.watchers = [Watcher(i < spec["full"], i % COUNT_EVERY) for i in range(spec["count"])]
        self.pending = len(self.watchers)
        self.all_done = asyncio.Event()
        self.settled = 0
        self.all_settled = asyncio.Event()
        self.connect_errors: list[str] = []
        self.retries = 0
        token = spec.get("token")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.tasks: list[asyncio.Task[None]] = []
        self.session: Any = None

    # -- one message ------------------------------------------------------------------

    def on_message(self, w: Watcher, data: bytes | bytearray, now: float,
                   start: int = 0, end: int | None = None) -> None:
        """One text message: `data[start:end]`, looked at in place (no copy)."""
        end = len(data) if end is None else end
        w.msgs += 1
        w.nbytes += end - start
        if data.startswith(LOGS_PREFIX, start):  # DeployHub: one frame, many events
            i = data.find(SEQ, start, end)
            first = int(data[i + 6:data.find(b",", i, end)])
            j = data.rfind(SEQ, start, end)
            last = int(data[j + 6:data.find(b",", j, end)])
            n = last - first + 1
            # Counting is the costliest check (a scan of every byte); frames are the same
            # bytes for every socket, so each distinct frame is still counted many times.
            if (w.full or (w.msgs + w.phase) % COUNT_EVERY == 0) and data.count(SEQ, start, end) != n:
                w.bad_frames += 1
        elif data.startswith(b'{"seq"', start):  # naive relay: one message per line
            first = last = int(data[data.index(b":", start) + 1:data.index(b",", start)])
            n = 1
        else:
            self.on_control(w, bytes(data[start:end]).decode())
            return
        if w.full:
            self.full_check(w, bytes(data[start:end]), now)
        w.received += n
        prev = w.last
        if first > prev + 1:
            w.gaps += 1
            w.skipped += first - prev - 1
        if last <= prev:
            w.dups += n
            return
        a = max(first, prev + 1)
        w.dups += a - first
        w.accepted += last - a + 1
        w.last = last
        w.rr.append(now)
        w.ra.append(a)
        w.rb.append(last)
        w.last_at = now
        if last >= self.expected and not w.done_at:
            w.done_at = now
            self.pending -= 1
            if self.pending <= 0:
                self.all_done.set()

    def on_control(self, w: Watcher, data: str) -> None:
        w.last_ctrl_at = time.time()
        if data.startswith('{"type":"subscribed"') or data.startswith('{"type": "subscribed"'):
            w.subscribed = True
        elif '"resync"' in data[:30]:
            w.resyncs += 1
        elif '"status"' in data[:30] or '"production"' in data[:30]:
            w.statuses += 1
        elif len(w.errors) < 5:
            w.errors.append(data[:200])

    def full_check(self, w: Watcher, data: bytes, now: float) -> None:
        """Every event parsed: seq by seq, and the latency from the text's own timestamp."""
        obj = json.loads(data)
        for event in obj["events"] if "events" in obj else [obj]:
            seq = event["seq"]
            if seq != w.flast + 1:
                w.full_errors += 1
            if seq > w.flast:
                w.flast = seq
                sent = float(event["text"].split(" ", 1)[0])
                w.text_lat[int((now - sent) * BINS_PER_S)] += 1

    # -- sockets ----------------------------------------------------------------------

    async def open_all(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        sem = asyncio.Semaphore(self.spec["concurrency"])
        self.tasks = [asyncio.create_task(self.run_watcher(w, sem)) for w in self.watchers]
        with contextlib.suppress(TimeoutError):  # report what we have rather than nothing
            await asyncio.wait_for(self.all_settled.wait(), self.spec["connect_deadline"])

    def _settle(self) -> None:
        self.settled += 1
        if self.settled >= len(self.watchers):
            self.all_settled.set()

    async def run_watcher(self, w: Watcher, sem: asyncio.Semaphore) -> None:
        attempt = 0
        while True:
            conn: Any = None
            try:
                async with sem:
                    if self.spec["client"] == "raw":
                        conn = RawSocket(self, w)
                    else:
                        conn = AiohttpSocket(self, w)
                    await conn.connect()
                break
            except Exception as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                if len(self.connect_errors) < 5:
                    self.connect_errors.append(repr(exc))
                attempt += 1
                if attempt >= self.spec["attempts"]:
                    w.closed = True
                    self._settle()
                    return
                # web/live.js: exponential backoff from 0.5 s, capped at 10 s, "equal jitter".
                self.retries += 1
                ceiling = min(10.0, 0.5 * 2 ** (attempt - 1))
                await asyncio.sleep(ceiling / 2 + random.random() * ceiling / 2)
        w.ws = conn
        self._settle()
        try:
            await conn.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(w.errors) < 5:
                w.errors.append(repr(exc))
        w.closed = True

    async def close_all(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

        async def close(ws: Any) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)

        await asyncio.gather(*(close(w.ws) for w in self.watchers if w.ws is not None))
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.close(), 5)

    # -- results ----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        ws = self.watchers
        subscribed = [w for w in ws if w.subscribed]
        errors = [e for w in ws for e in w.errors][:5]
        return {
            "watchers": len(ws),
            "subscribed": len(subscribed),
            "closed_early": sum(1 for w in subscribed if w.closed),
            "complete": sum(1 for w in ws if w.done_at),
            "accepted": sum(w.accepted for w in ws),
            "received": sum(w.received for w in ws),
            "lost": sum(max(0, self.expected - w.accepted) for w in ws),
            "dups": sum(w.dups for w in ws),
            "gaps": sum(w.gaps for w in ws),
            "bad_frames": sum(w.bad_frames for w in ws),
            "resyncs": sum(w.resyncs for w in ws),
            "status_frames": sum(w.statuses for w in ws),
            "status_watchers": sum(1 for w in ws if w.statuses),
            "resync_watchers": sum(1 for w in ws if w.resyncs),
            "last_ctrl_at": max((w.last_ctrl_at for w in ws), default=0.0),
            "skipped": sum(w.skipped for w in ws),
            "late": sum(max(0, self.expected - w.last) for w in ws if w.subscribed),
            "full_checked": sum(1 for w in ws if w.full),
            "full_errors": sum(w.full_errors for w in ws),
            "msgs": sum(w.msgs for w in ws),
            "bytes": sum(w.nbytes for w in ws),
            "first_at": min((w.rr[0] for w in ws if w.rr), default=0.0),
            "last_at": max((w.last_at for w in ws), default=0.0),
            "connect_retries": self.retries,
            "errors": errors + self.connect_errors[:2],
        }

    def histograms(self, emit: array[float], published: array[float]) -> dict[str, Counter[int]]:
        """Per line: receipt - emit time, and receipt - the time its batch was published."""
        e2e: Counter[int] = Counter()
        fan: Counter[int] = Counter()
        text: Counter[int] = Counter()
        scale = float(BINS_PER_S)
        E = [t * scale for t in emit]
        P = [t * scale for t in published]
        total = len(E)
        for w in self.watchers:
            for r, a, b in zip(w.rr, w.ra, w.rb):
                if a > total:
                    continue
                b = min(b, total)
                R = r * scale
                if a == b:
                    e2e[int(R - E[a - 1])] += 1
                    fan[int(R - P[a - 1])] += 1
                    continue
                sub = R.__sub__
                e2e.update(map(int, map(sub, E[a - 1:b])))  # Counter counts in C
                if P[a - 1] == P[b - 1]:
                    fan[int(R - P[a - 1])] += b - a + 1
                else:
                    fan.update(map(int, map(sub, P[a - 1:b])))
            text.update(w.text_lat)
        return {"e2e": e2e, "fanout": fan, "text": text}


class AiohttpSocket:
    """A watcher on aiohttp's WebSocket client, as a Python program would watch a build."""

    def __init__(self, clients: Clients, w: Watcher) -> None:
        self.clients, self.w = clients, w
        self.ws: Any = None

    async def connect(self) -> None:
        import aiohttp

        spec = self.clients.spec
        self.ws = await self.clients.session.ws_connect(
            spec["url"], max_msg_size=0, headers=self.clients.headers,
            compress=15 if spec["compress"] else 0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
        await self.ws.send_str(json.dumps({"type": "subscribe", "project": spec["project"]}))
        async with asyncio.timeout(60):
            while not self.w.subscribed:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"socket ended before subscribed: {msg.type!r}")
                self.clients.on_message(self.w, msg.data.encode(), time.time())

    async def run(self) -> None:
        import aiohttp

        TEXT = aiohttp.WSMsgType.TEXT
        while True:
            msg = await self.ws.receive()
            if msg.type == TEXT:
                self.clients.on_message(self.w, msg.data.encode(), time.time())
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class RawSocket(asyncio.Protocol):
    """A lean watcher: RFC 6455 over an asyncio protocol, every frame handled as it arrives.

    With 1,000 watchers on one core, aiohttp's client (a future and a task wake-up per
    message) is slower than the server it measures; this one parses the frames of each
    `recv()` in a loop, so the load generator stops setting the pace. It checks the same
    things (`Clients.on_message`) and answers pings like a browser.
    """

    def __init__(self, clients: Clients, w: Watcher) -> None:
        self.clients, self.w = clients, w
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        from urllib.parse import urlsplit

        spec = self.clients.spec
        url = urlsplit(spec["url"])
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, url.hostname, url.port)
        assert self.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        auth = "".join(f"{k}: {v}\r\n" for k, v in self.clients.headers.items())
        self.transport.write(
            f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{auth}\r\n".encode()
        )
        self.send(0x1, json.dumps({"type": "subscribe", "project": spec["project"]}).encode())
        async with asyncio.timeout(60):
            await asyncio.wait({self.subscribed, self.done}, return_when=asyncio.FIRST_COMPLETED)
        if not self.subscribed.done():
            raise RuntimeError("socket ended before subscribed")

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame (payloads here are always under 126 bytes)."""
        assert self.transport is not None and len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf: bytes | bytearray
        if self.buf:  # the rest of a frame that began in an earlier chunk
            self.buf += data
            buf = self.buf
        else:
            buf = data  # the usual case: parse the chunk as it came, without copying it
        if not self.upgraded:
            buf = self.buf = bytearray(buf)
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.clients.connect_errors.append(bytes(buf[:80]).decode(errors="replace"))
                assert self.transport is not None
                self.transport.close()
                return
            del self.buf[:end + 4]
            buf = self.buf
            self.upgraded = True
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4]), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10]), 10
            if size - pos < head + length:
                break
            start, pos = pos + head, pos + head + length
            if opcode == 0x1:
                self.clients.on_message(self.w, buf, now, start, pos)
                if self.w.subscribed and not self.subscribed.done():
                    self.subscribed.set_result(None)
            elif opcode == 0x9:
                self.send(0xA, bytes(buf[start:pos]))
            elif opcode == 0x8:
                assert self.transport is not None
                self.transport.close()
                break
            else:
                self.w.errors.append(f"unexpected opcode {opcode} (fragments are not sent)")
        if buf is self.buf:
            del self.buf[:pos]
        elif pos < size:
            self.buf = bytearray(buf[pos:])

    async def run(self) -> None:
        await self.done

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send(0x8, (1000).to_bytes(2))
            self.transport.close()


def client_loop(wanted: str) -> str:
    """The event loop the watchers run on: uvloop when asked for and installed, else asyncio's."""
    if wanted == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
    return wanted


def clients_entry(conn: Any, cpus: set[int] | None, nice: int = 0, loop: str = "asyncio") -> None:
    child_common(cpus, nice)
    try:
        if client_loop(loop) == "uvloop":
            # The load generator's event loop in C: with 10,000 sockets, asyncio's own loop
            # costs the watchers more CPU than the server spends delivering to them.
            import uvloop

            uvloop.run(_clients(conn))
        else:
            asyncio.run(_clients(conn))
    except Exception as exc:
        import traceback

        with contextlib.suppress(Exception):
            conn.send(("error", f"{exc!r}\n{traceback.format_exc()}"))


async def _clients(conn: Any) -> None:
    spec = await asyncio.to_thread(conn.recv)
    clients = Clients(spec)
    await clients.open_all()
    conn.send(("ready", clients.summary()))
    cpu0 = time.process_time()
    while True:
        op, arg = await asyncio.to_thread(conn.recv)
        if op == "go":
            cpu0 = time.process_time()
        elif op == "wait":  # until every watcher has the last line, or the deadline
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(clients.all_done.wait(), max(0.0, arg - time.time()))
            summary = clients.summary()
            summary["cpu_s"] = round(time.process_time() - cpu0, 2)
            conn.send(("summary", summary))
        elif op == "stats":
            with contextlib.suppress(OSError):  # the measurement is over: use every core
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            with open(arg, "rb") as f:
                data = pickle.load(f)
            conn.send(("stats", clients.histograms(data["emit"], data["publish"])))
        elif op == "summary":
            conn.send(("summary", clients.summary()))
        elif op == "close":
            await clients.close_all()
            conn.send(("closed", None))
            return


def close_clients(children: list[Child]) -> None:
    for c in children:
        with contextlib.suppress(Exception):
            c.send("close", None)
    for c in children:
        with contextlib.suppress(Exception):
            c.recv(20, "closed")
        c.stop()
