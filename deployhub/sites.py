"""Serving deployed sites by Host: `<project>.<domain>` and `<project>--<deployment>.<domain>`.

The hot path costs no network round trip. Which deployment a host serves is cached in the
process and kept right by the production-change events every replica receives on one Redis
channel (the store's scripts publish them); while that subscription is down nothing new is
cached, and when it comes back the cache is dropped, since events may have been missed. So a
site already seen keeps serving while Redis is away. Manifests are immutable and cached;
small files (and their precompressed variants) are cached under a byte bound; larger ones
stream from storage, never whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import functools
import json
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from redis.asyncio import Redis
from redis.exceptions import RedisError
from yarl import URL

from . import keys
from .collector import Collector
from .connections import STORAGE, STORE
from .manifest import Entry, Manifest, parse
from .redis_client import CONNECTION_ERRORS, stop_if_cancelled
from .settings import Settings
from .state import SETTINGS, require
from .storage import Storage, manifest_key
from .store import Store

log = logging.getLogger(__name__)

MANIFEST_CACHE = 512  # manifests kept parsed in memory (deployments served from this process)
PENDING_RECHECK = 1.0  # seconds between reads of a manifest whose variants are being made
HOST_CACHE = 10_000  # host labels remembered (with "no site here" too, for project hosts)
ROUTE_CACHE = 20_000  # (deployment, request path) -> how it is answered
SMALL_FILE = 1024 * 1024  # files up to this size are cached in memory whole
# Cached bodies up to this size go out joined to their pre-serialized headers (`_Wired`); a
# larger one costs more to copy than the headers cost to build, and aiohttp hands headers
# and body to the transport as two buffers.
WIRE_MAX = 64 * 1024
MAX_PATH = 1024
RECONNECT_BACKOFF = (0.1, 5.0)  # first and longest wait between subscriber reconnects
COLLECT_LOCK_SECONDS = 600
SWEEP_SECONDS = 3600  # how often the store is listed for blobs nothing uses
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DEPLOYMENT_LABEL_RE = re.compile(r"^(?P<project>[a-z0-9-]+)--(?P<dep>[a-z0-9]{12})$")
_RANGE_RE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")  # one range; a list is served whole
_HEADER_SAFE_RE = re.compile(r"[^\r\n\x00]*")
ENCODING_PREFERENCE = ("br", "gzip")  # at equal q, brotli: it is smaller

# For every static site; each can be replaced from `_headers`. nosniff: a file is only ever
# what its type says. Referrer-Policy: full URLs (with their paths and queries) stay on the
# site; other origins get the origin only, as browsers default to. X-Frame-Options
# SAMEORIGIN: no other site can frame this one to click-jack it, while the site may still
# frame its own pages. Nothing that can break an app: no CSP for scripts, no COOP (OAuth
# pop-ups), no CORP (assets used from other origins), no HSTS (sites may be on plain http).
DEFAULT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "X-Frame-Options": "SAMEORIGIN",
}

_MISSING = object()


class StorageMissing(Exception):
    pass


@dataclasses.dataclass
class Route:
    """How one request path of one deployment is answered, worked out once."""

    status: int
    entry: Entry | None = None
    location: str | None = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # from `_headers`
    # Content-Encoding ("" for none) -> the response headers, built on first use.
    headers: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # Content-Encoding -> the status line and headers of the whole response as sent, for
    # HTTP/1.1 keep-alive (see `_Wired`); None where a header cannot go on the wire as it is.
    heads: dict[str, bytes | None] = dataclasses.field(default_factory=dict)

    def headers_for(self, encoding: str) -> dict[str, str]:
        found = self.headers.get(encoding)
        if found is None:
            found = self.headers[encoding] = self._build(encoding)
        return found

    def head_for(self, encoding: str, size: int) -> bytes | None:
        try:
            return self.heads[encoding]
        except KeyError:
            found = self.heads[encoding] = _serialize(self.status, {
                **self.headers_for(encoding), "Content-Length": str(size),
            })
            return found

    def _build(self, encoding: str) -> dict[str, str]:
        entry = self.entry
        assert entry is not None
        headers = {"Content-Type": entry.type, "Cache-Control": entry.cache_control}
        if self.status == 200:
            headers["ETag"] = entry.etag if not encoding else f'{entry.etag[:-1]}-{encoding}"'
            headers["Accept-Ranges"] = "bytes"
        if encoding:
            headers["Content-Encoding"] = encoding
        if entry.encodings:
            headers["Vary"] = "Accept-Encoding"
        return _merged(headers, DEFAULT_HEADERS, self.extra)


def _merged(*layers: dict[str, str]) -> dict[str, str]:
    """Headers from each layer in turn, a later one replacing a name whatever its case
    (`_headers` may say `x-frame-options: DENY`)."""
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for name, value in layer.items():
            merged[name.lower()] = (name, value)
    return dict(merged.values())


class ByteCache:
    """Small immutable bodies by storage key, least recently used out first, at most
    `limit` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        body = self._items.get(key)
        if body is not None:
            self._items.move_to_end(key)
        return body

    def put(self, key: str, body: bytes) -> None:
        if len(body) > self.limit or key in self._items:
            return
        self._items[key] = body
        self.size += len(body)
        while self.size > self.limit:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped)


class Sites:
    def __init__(
        self, settings: Settings, storage: Storage, store: Store, collector: Collector | None = None
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.store = store
        self.redis: Redis = store.redis
        self.collector = collector or Collector(store, storage)
        self.suffix = "." + settings.domain.lower().strip(".")
        # label -> deployment id, or None: no site. Written only while events can keep it
        # right (`_live`), and only by a look-up no event overtook (`_generation`).
        self._hosts: OrderedDict[str, str | None] = OrderedDict()
        self._labels: dict[str, object] = {}  # Host header -> label (or None), parsed once
        self._live = False
        self._generation = 0
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        # Deployment -> when (loop time) to read its manifest again: its variants are coming.
        self._recheck: dict[str, float] = {}
        self._routes: dict[tuple[str, str], Route] = {}
        self.bodies = ByteCache(settings.site_cache_mb * 1024 * 1024)
        self._loading: dict[str, asyncio.Task[bytes | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.live = asyncio.Event()  # set while subscribed: tests wait for it
        # What serving did ("host look-ups", "manifest reads", "file reads", "cache drops").
        self.stats: Counter[str] = Counter()
        self.requests: Counter[int] = Counter()  # site responses by status, for /metrics
        # Innermost app a site request went through -> whether its chain lets responses go
        # out pre-serialized (see wire_ok()); the apps are frozen once serving.
        self._wire_ok: dict[web.Application, bool] = {}

    def site_label(self, host: str | None) -> str | None:
        """The label in front of our domain, or None when the request is for the app itself."""
        if not host:
            return None
        found = self._labels.get(host, _MISSING)
        if found is _MISSING:
            name = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host
            name = name.rstrip(".")
            found = name[: -len(self.suffix)] if name.endswith(self.suffix) else None
            if len(self._labels) >= HOST_CACHE:
                self._labels.clear()
            self._labels[host] = found
        return found  # type: ignore[return-value]

    # -- the request ----------------------------------------------------------------------

    async def handle(self, request: web.Request, label: str) -> web.StreamResponse:
        dep_id = self._hosts.get(label, _MISSING)
        if dep_id is _MISSING:
            if "." in label or not _LABEL_RE.match(label):
                return _text("No site here: the host name is not a DeployHub site.", 400)
            try:
                dep_id = await self._deployment_for(label)
            except (RedisError, OSError) as exc:
                log.warning("cannot look up the site %s: %s", label, exc)
                return _text("This site is unavailable for a moment; try again shortly.", 503)
        if dep_id is None:
            return _text(f"No site is deployed at {label}{self.suffix}.", 404)
        assert isinstance(dep_id, str)
        manifest = self._manifests.get(dep_id)
        if manifest is None:
            manifest = await self._manifest(dep_id)
            if manifest is None:
                return _text(f"No site is deployed at {label}{self.suffix}.", 404)
        elif self._recheck and self._due(dep_id):
            try:
                found = await self._manifest(dep_id)
            except Exception as exc:  # the one we have serves: without the new variants
                log.warning("could not read the manifest of %s again: %s", dep_id, exc)
            else:
                if found is None:  # gone meanwhile (its deletion's event tells): no more reads
                    self._recheck.pop(dep_id, None)
                manifest = found or manifest
        route = self._routes.get((dep_id, request.path))
        if route is None:
            rel = _clean_path(request.path)
            if rel is None:
                return _text("Not found.", 400)
            route = resolve(manifest, request.path, rel)
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            self._routes[(dep_id, request.path)] = route
        try:
            return await self._send(request, route)
        except StorageMissing as exc:
            log.error("deployment %s lists a file storage does not have: %s", dep_id, exc)
            return _text("This file is missing from storage.", 503)

    async def _deployment_for(self, label: str) -> str | None:
        generation = self._generation
        self.stats["host look-ups"] += 1
        match = _DEPLOYMENT_LABEL_RE.match(label)
        if match:
            if await self.store.project_of(match["dep"]) != match["project"]:
                return None  # not remembered: a deployment that does not exist yet may soon
            found: str | None = match["dep"]
        else:
            found = await self.store.production_of(label)
        if self._live and generation == self._generation:
            self._hosts[label] = found
            if len(self._hosts) > HOST_CACHE:
                self._hosts.popitem(last=False)
        return found

    async def _manifest(self, dep_id: str) -> Manifest | None:
        raw = await self._load(manifest_key(dep_id), cache=False)
        if raw is None:
            return None
        self.stats["manifest reads"] += 1
        manifest = parse(dep_id, raw)
        before = self._manifests.get(dep_id)
        if before is not None and before.pending_until != manifest.pending_until:
            self._drop_routes(dep_id)  # the final one: its routes name the new variants
        if manifest.pending_until > time.time():
            self._recheck[dep_id] = asyncio.get_running_loop().time() + PENDING_RECHECK
        else:
            self._recheck.pop(dep_id, None)
        self._manifests[dep_id] = manifest
        if len(self._manifests) > MANIFEST_CACHE:
            gone, _ = self._manifests.popitem(last=False)
            if self._recheck.pop(gone, None) is not None:
                self._drop_routes(gone)  # made from a manifest without its variants
        return manifest

    def _drop_routes(self, dep_id: str) -> None:
        for route_key in [k for k in self._routes if k[0] == dep_id]:
            del self._routes[route_key]

    def _due(self, dep_id: str) -> bool:
        """Whether the manifest of `dep_id` was stored before its variants and it is time to
        look for the one stored after (one request does; the others go on meanwhile)."""
        due = self._recheck.get(dep_id)
        now = asyncio.get_running_loop().time()
        if due is None or now < due:
            return False
        self._recheck[dep_id] = now + PENDING_RECHECK
        return True

    async def _load(self, key: str, *, cache: bool = True) -> bytes | None:
        """An object's bytes, read once however many requests want it at the same time (in
        a task of its own: a client that goes away does not cancel the others' read)."""
        if cache and (body := self.bodies.get(key)) is not None:
            return body
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key, cache))
            self._loading[key] = task
            task.add_done_callback(self._fetched)
        return await asyncio.shield(task)

    async def _fetch(self, key: str, cache: bool) -> bytes | None:
        self.stats["file reads"] += 1
        body = await self.storage.get_bytes(key)
        if cache and body is not None:
            self.bodies.put(key, body)
        return body

    def _fetched(self, task: asyncio.Task[bytes | None]) -> None:
        for key, pending in list(self._loading.items()):
            if pending is task:
                del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every request that wanted it went away

    async def _send(self, request: web.Request, route: Route) -> web.StreamResponse:
        if route.location is not None:
            location = route.location
            if request.query_string and "?" not in location:
                location += "?" + request.query_string
            return web.Response(status=route.status, headers=_merged(
                {"Location": location, "Cache-Control": "no-cache"}, DEFAULT_HEADERS, route.extra,
            ))
        entry = route.entry
        if entry is None:
            return _text("Not found.", 404)
        ranged = route.status == 200 and "Range" in request.headers and _if_range(request, entry)
        encoding = "" if ranged else _choose(entry, request.headers.get("Accept-Encoding", ""))
        headers = route.headers_for(encoding)
        if route.status == 200 and (tags := request.headers.get("If-None-Match")):
            if _etag_matches(tags, headers["ETag"]):
                return web.Response(status=304, headers={
                    k: v for k, v in headers.items() if k not in ("Content-Type", "Content-Encoding")
                })
        key, size = entry.encodings[encoding] if encoding else (entry.key, entry.size)
        start, end = 0, size
        status = route.status
        spec = _RANGE_RE.match(request.headers["Range"].strip()) if ranged else None
        if spec is not None and (spec[1] or spec[2]):  # else (several ranges, or none): all
            parsed = _parse_range(spec[1], spec[2], size)
            if parsed is None:
                return web.Response(status=416, headers={
                    "Content-Range": f"bytes */{size}", **DEFAULT_HEADERS,
                })
            start, end = parsed
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"}
        if size <= SMALL_FILE and self.bodies.limit:
            body = self.bodies.get(key) or await self._load(key)
            if body is None:
                raise StorageMissing(key)
            if status != 206 and size <= WIRE_MAX and self.wire_ok(request):
                head = route.head_for(encoding, size)
                if head is not None:
                    return _Wired(status, head, b"" if request.method == "HEAD" else body)
            return web.Response(body=body[start:end] if status == 206 else body, status=status,
                                headers=headers)
        return await self._stream(request, key, status, headers, start, end)

    def wire_ok(self, request: web.Request) -> bool:
        """Whether a response may go out as bytes serialized beforehand: HTTP/1.1 keep-alive
        (the case with no Connection header), and nothing that could still change a
        response's headers on its way out (a middleware around this one, or a
        response-prepare signal), in the chain of apps the request went through: one app
        mounts in one place, so the innermost names the chain."""
        if request.version != HttpVersion11 or not request.keep_alive:
            return False
        apps = request.match_info.apps
        found = self._wire_ok.get(apps[-1])
        if found is None:
            found = self._wire_ok[apps[-1]] = _nothing_outside(apps)
        return found

    async def _stream(
        self, request: web.Request, key: str, status: int, headers: dict[str, str], start: int,
        end: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        if request.method == "HEAD":
            await response.prepare(request)
            await response.write_eof()
            return response
        chunks = self.storage.iter_bytes(key, start, end)
        self.stats["file reads"] += 1
        try:
            first = await anext(chunks, b"")
        except (FileNotFoundError, LookupError) as exc:
            raise StorageMissing(key) from exc
        except Exception as exc:
            if "NoSuchKey" in type(exc).__name__:
                raise StorageMissing(key) from exc
            raise
        try:
            await response.prepare(request)
            if first:
                await response.write(first)
                async for chunk in chunks:
                    await response.write(chunk)
            await response.write_eof()
        finally:
            await chunks.aclose()  # a client gone mid-file: the storage stream closes now
        return response

    # -- events ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow production changes for as long as the app runs, reconnecting with backoff."""
        backoff = RECONNECT_BACKOFF[0]
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.SITES_CHANNEL)
                    if pubsub.connection is not None:
                        # redis-py may reconnect on its own: events may have been missed.
                        pubsub.connection.register_connect_callback(self._reconnected)
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe":
                            self._drop_hosts()
                            self._live = True
                            self.live.set()
                            backoff = RECONNECT_BACKOFF[0]
                        elif message["type"] == "message":
                            try:
                                self.apply(json.loads(message["data"]))
                            except (ValueError, KeyError, TypeError):
                                log.exception("dropped a malformed site event")
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                stop_if_cancelled()
                log.warning("site events lost their Redis connection (%s); sites seen keep "
                            "serving; retrying in %.1fs", exc, backoff)
            finally:
                self._live = False
                self.live.clear()
                self._generation += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF[1])

    async def _reconnected(self, connection: object) -> None:
        self._drop_hosts()

    def _drop_hosts(self) -> None:
        self._generation += 1
        if self._hosts:
            self.stats["cache drops"] += 1
        self._hosts.clear()

    def apply(self, event: dict[str, Any]) -> None:
        """One event from the sites channel."""
        self._generation += 1
        project = str(event["project"])
        if event["type"] == "production":
            production = str(event["production"]) or None
            if project in self._hosts or production is None:
                self._hosts[project] = production
            if production is not None and self.settings.keep_deployments:
                self._spawn(self._retain(project))
        elif event["type"] == "deleted":
            for dep_id in event["deployments"]:
                self._hosts.pop(f"{project}--{dep_id}", None)
                self._manifests.pop(str(dep_id), None)
                self._recheck.pop(str(dep_id), None)
                self._drop_routes(dep_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retain(self, project: str) -> None:
        """Every replica hears the event; one at a time trims the project. An event that finds
        a pass running asks it to go again, so no change is left untrimmed."""
        lock, again = keys.collect_lock(project), keys.collect_again(project)
        keep = self.settings.keep_deployments
        try:
            await self.redis.set(again, "1", ex=COLLECT_LOCK_SECONDS)
            while await self.redis.set(lock, "1", nx=True, ex=COLLECT_LOCK_SECONDS):
                try:
                    while await self.redis.getdel(again):
                        removed = await self.collector.enforce_retention(project, keep)
                        if removed.deployments:
                            log.info("%s keeps %d deployments: removed %s (%d blobs)", project,
                                     keep, ", ".join(removed.deployments), removed.blobs)
                finally:
                    await self.redis.delete(lock)
                if not await self.redis.exists(again):  # asked for between the last two steps
                    break
            # Leftovers of failed uploads: one replica, at most once per sweep period.
            if await self.redis.set(keys.SWEEP_LOCK, "1", nx=True, ex=SWEEP_SECONDS):
                await self.collector.sweep()
        except Exception:
            log.exception("could not enforce the retention of %s", project)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def resolve(manifest: Manifest, path: str, rel: str) -> Route:
    """How a request path is answered: forced rules, then files (`path`, `path/index.html`,
    `path.html`), then the other rules, then `404.html`, then the app shell for client-side
    routes (only where the site's rules do not route them)."""
    forced = [r for r in manifest.redirects if r.force]
    for rule in forced:
        route = _apply(manifest, rule.status, rule.match(path))
        if route is not None:
            break
    else:
        entry = _file(manifest, rel)
        route = Route(200, entry) if entry is not None else None
        if route is None:
            for rule in manifest.redirects:
                if not rule.force and (route := _apply(manifest, rule.status, rule.match(path))):
                    break
        home = manifest.base  # "" or the sub-path the site is built for: "repo/"
        inside = rel.startswith(home)
        if route is None and inside and f"{home}404.html" in manifest.files:
            route = Route(404, manifest.files[f"{home}404.html"])
        if (route is None and inside and not manifest.has_client_routing
                and f"{home}index.html" in manifest.files and "." not in rel.rsplit("/", 1)[-1]):
            # Client-side routes (/dashboard/settings) get the app shell; missing files do not.
            route = Route(200, manifest.files[f"{home}index.html"])
    if route is None:
        return Route(404)
    for header_rule in manifest.headers:
        if header_rule.matches(path):
            route.extra.update(header_rule.values)
    return route


def _apply(manifest: Manifest, status: int, target: str | None) -> Route | None:
    if target is None:
        return None
    if status in (200, 404):
        rel = _clean_path(target.split("?", 1)[0])
        entry = _file(manifest, rel) if rel is not None else None
        return Route(status, entry) if entry is not None else None
    return Route(status, location=target)


def _file(manifest: Manifest, rel: str) -> Entry | None:
    files = manifest.files
    for candidate in ([rel, f"{rel}/index.html", f"{rel}.html"] if rel else ["index.html"]):
        entry = files.get(candidate)
        if entry is not None:
            return entry
    return None


@functools.lru_cache(maxsize=512)
def _accepted(header: str) -> tuple[str, ...]:
    """The encodings an Accept-Encoding header takes, best first (q=0 refuses one)."""
    quality: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name:
            quality[name] = q
    wildcard = quality.get("*", 0.0)
    ranked = [
        (quality.get(name, wildcard), -i, name) for i, name in enumerate(ENCODING_PREFERENCE)
    ]
    return tuple(name for q, _, name in sorted(ranked, reverse=True) if q > 0)


def _choose(entry: Entry, header: str) -> str:
    if not entry.encodings or not header:
        return ""
    for name in _accepted(header):
        if name in entry.encodings:
            return name
    return ""


def _etag_matches(header: str, etag: str) -> bool:
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _if_range(request: web.Request, entry: Entry) -> bool:
    """Whether to honour Range: always, unless If-Range names another version."""
    value = request.headers.get("If-Range")
    return value is None or value == entry.etag


def _parse_range(first: str, last: str, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of `bytes=first-last`; None when it cannot be satisfied."""
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            return None
        return max(size - suffix, 0), size
    start = int(first)
    end = int(last) + 1 if last else size
    if start >= size or end <= start:
        return None
    return start, min(end, size)


def _clean_path(path: str) -> str | None:
    """The request path as a manifest key; None when it tries anything odd."""
    if len(path) > MAX_PATH or "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    return "/".join(parts)


class _Wired(web.StreamResponse):
    """A cached file's response written as one buffer: the status line and headers
    serialized once per (route, encoding), the Date line once a second, then the body.

    aiohttp's Response builds a header multidict, works out keep-alive, length, Date and
    Server, and serializes all of it for every request: the larger part of a small file's
    time. Used only where nothing can change the headers on the way out (`Sites.wire_ok`)."""

    def __init__(self, status: int, head: bytes, body: bytes) -> None:
        super().__init__(status=status)
        self._wire = b"".join((head, _date_line(), body))

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is None:
            self._req = request
            self._keep_alive = True  # HTTP/1.1 that did not ask to close: no header says so
            self._payload_writer = request.writer
        return self._payload_writer

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._eof_sent:
            await super().write_eof(self._wire)


def _serialize(status: int, headers: dict[str, str]) -> bytes | None:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    for name, value in headers.items():
        if not _HEADER_SAFE_RE.fullmatch(name + value):
            return None  # aiohttp refuses it at write time: let it, with its error
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n").encode()


class _Clock:
    """The Date header line (and Server, as aiohttp sends it), made once a second."""

    second = -1
    line = b""


def _date_line() -> bytes:
    now = int(time.time())
    if now != _Clock.second:
        _Clock.line = (f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
                       f"Server: {SERVER_SOFTWARE}\r\n\r\n").encode()
        _Clock.second = now
    return _Clock.line


def _nothing_outside(apps: tuple[web.Application, ...]) -> bool:
    """No app on the way to `site_middleware` has a middleware before it, and no app of the
    chain a signal that prepares responses (aiohttp's own current-app fix-up is outside,
    and harmless)."""
    if any(app.on_response_prepare for app in apps):
        return False
    for app in apps:
        middlewares = list(app.middlewares)
        if site_middleware in middlewares:
            return middlewares.index(site_middleware) == 0
        if middlewares:
            return False
    return False


def _text(message: str, status: int) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


SITES = web.AppKey("deployhub.sites", Sites)


def get_sites(app: web.Application) -> Sites:
    return require(app, SITES)


async def sites_ctx(app: web.Application) -> AsyncIterator[None]:
    sites = Sites(app[SETTINGS], app[STORAGE], app[STORE])
    app[SITES] = sites
    task = asyncio.create_task(sites.run(), name="deployhub-site-events")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sites.close()
        if sites.stats:
            log.info("sites: %s; storage requests: %s",
                     ", ".join(f"{n} {what}" for what, n in sites.stats.items()),
                     dict(sites.storage.requests))


class SiteResource(web.Resource):
    """Every request for a site's host, whatever its path, routed to the site server.

    Without it, aiohttp's router finds no route for a site's paths and builds an HTTPNotFound
    (a whole response) for each such request before `site_middleware` answers it: a third of
    the time a small file took. Indexed at "/", it is tried after the app's own routes, which
    `site_middleware` still intercepts for site hosts."""

    def __init__(self, app: web.Application) -> None:
        super().__init__()
        self._app = app
        self._prefix = ""
        self.add_route(hdrs.METH_ANY, _site_handler)

    @property
    def canonical(self) -> str:
        return self._prefix or "/"

    def add_prefix(self, prefix: str) -> None:
        self._prefix = prefix + self._prefix

    def _match(self, path: str) -> dict[str, str] | None:
        return {} if path.startswith(self._prefix) else None

    def raw_match(self, path: str) -> bool:
        return False

    def get_info(self) -> dict[str, Any]:  # type: ignore[override]
        return {"prefix": self._prefix, "hosts": "<project>.<domain>"}

    def url_for(self, **kwargs: str) -> URL:
        raise RuntimeError("sites have no URL inside the app; see Settings.site_url_for")

    async def resolve(self, request: web.Request) -> Any:
        sites = self._app.get(SITES)
        if sites is None or sites.site_label(request.host) is None:
            return None, set()
        return await super().resolve(request)


async def _site_handler(request: web.Request) -> web.StreamResponse:
    sites = request.config_dict[SITES]
    label = sites.site_label(request.host)
    assert label is not None  # SiteResource matched on it
    if request.method not in ("GET", "HEAD"):
        return web.Response(status=405, text="Sites answer GET and HEAD only.\n", headers={"Allow": "GET, HEAD"})
    return await sites.handle(request, label)


def add_routes(app: web.Application) -> None:
    """Route site hosts (after the app's routes; `site_middleware` takes those)."""
    app.router.register_resource(SiteResource(app))


@web.middleware
def site_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> Awaitable[web.StreamResponse]:
    """A request whose Host is `<label>.<domain>` is a site's; the rest go to the app.

    A plain function, not a coroutine: for the app's requests it hands on the handler's own
    awaitable, so no frame of this middleware stays suspended for as long as the handler
    runs (a WebSocket's handler runs for the socket's lifetime; thousands idle at once)."""
    # The app whose middleware this is holds SITES (setup() or a mounted create_app()); the
    # lookup through config_dict builds a ChainMap per request.
    sites = request.app.get(SITES) or request.config_dict[SITES]
    label = sites.site_label(request.host)
    if label is None:
        return handler(request)
    return _site_response(request, sites, label)


async def _site_response(request: web.Request, sites: Sites, label: str) -> web.StreamResponse:
    response: web.StreamResponse
    if request.method not in ("GET", "HEAD"):
        response = web.Response(status=405, text="Sites answer GET and HEAD only.\n",
                                headers={"Allow": "GET, HEAD"})
    else:
        try:
            response = await sites.handle(request, label)
        except (RedisError, *CONNECTION_ERRORS) as exc:  # a site not seen before, Redis away
            log.warning("site %s: Redis unavailable: %s", request.host, exc)
            response = web.Response(status=503, headers={"Retry-After": "5"},
                                    text="This site is temporarily unavailable; try again shortly.\n")
    sites.requests[response.status] += 1  # for /metrics
    return response
