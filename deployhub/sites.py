"""Serving deployed sites by Host: `<project>.<domain>` and `<project>--<deployment>.<domain>`."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .connections import STORAGE, STORE
from .settings import Settings
from .state import SETTINGS, require
from .storage import Storage, manifest_key, site_key
from .store import Store

MANIFEST_CACHE = 512
MAX_PATH = 1024
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DEPLOYMENT_LABEL_RE = re.compile(r"^(?P<project>[a-z0-9-]+)--(?P<dep>[a-z0-9]{12})$")
# Bundlers put a content hash in asset names (app-3f9a1c2b.js, main.8c1f2e0a.css).
_HASHED_RE = re.compile(r"[.-][A-Za-z0-9_]{8,}\.(?:js|mjs|css|woff2?|ttf|otf|png|jpe?g|gif|svg|webp|avif|ico|wasm|map)$")


class Sites:
    def __init__(self, settings: Settings, storage: Storage, store: Store) -> None:
        self.settings = settings
        self.storage = storage
        self.store = store
        self.suffix = "." + settings.domain.lower().strip(".")
        # Deployments are immutable, so a manifest never goes stale once read.
        self._manifests: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()

    def site_label(self, host: str | None) -> str | None:
        """The label in front of our domain, or None when the request is for the app itself."""
        if not host:
            return None
        name = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host
        name = name.rstrip(".")
        if not name.endswith(self.suffix):
            return None
        return name[: -len(self.suffix)]

    async def handle(self, request: web.Request, label: str) -> web.StreamResponse:
        if "." in label or not _LABEL_RE.match(label):
            return _not_found("No site here: the host name is not a DeployHub site.", 400)
        dep_id = await self._deployment_for(label)
        if dep_id is None:
            return _not_found(f"No site is deployed at {label}{self.suffix}.")
        manifest = await self._manifest(dep_id)
        if manifest is None:
            return _not_found(f"No site is deployed at {label}{self.suffix}.")
        rel = _clean_path(request.path)
        if rel is None:
            return _not_found("Not found.", 400)
        found = _lookup(manifest, rel)
        if found is None:
            return _not_found("Not found.")
        path, status = found
        return await self._send(request, dep_id, path, manifest[path], status)

    async def _deployment_for(self, label: str) -> str | None:
        match = _DEPLOYMENT_LABEL_RE.match(label)
        if match:
            if await self.store.project_of(match["dep"]) != match["project"]:
                return None
            return match["dep"]
        return await self.store.production_of(label)

    async def _manifest(self, dep_id: str) -> dict[str, dict[str, Any]] | None:
        cached = self._manifests.get(dep_id)
        if cached is not None:
            self._manifests.move_to_end(dep_id)
            return cached
        raw = await self.storage.get_bytes(manifest_key(dep_id))
        if raw is None:
            return None
        files: dict[str, dict[str, Any]] = json.loads(raw)["files"]
        self._manifests[dep_id] = files
        if len(self._manifests) > MANIFEST_CACHE:
            self._manifests.popitem(last=False)
        return files

    async def _send(
        self, request: web.Request, dep_id: str, path: str, info: dict[str, Any], status: int
    ) -> web.StreamResponse:
        headers = {
            "Content-Type": str(info["type"]),
            "Cache-Control": cache_control(path),
            "X-Content-Type-Options": "nosniff",
        }
        key = site_key(dep_id, path)
        local = self.storage.local_path(key)
        if local is not None:
            response = web.FileResponse(local, status=status, headers=headers)
            return response
        etag = f'"{dep_id}-{info["size"]}"'
        if request.headers.get("If-None-Match") == etag and status == 200:
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": headers["Cache-Control"]})
        stream = web.StreamResponse(status=status, headers={**headers, "ETag": etag})
        stream.content_length = int(info["size"])
        await stream.prepare(request)
        if request.method != "HEAD":
            async for chunk in self.storage.iter_bytes(key):
                await stream.write(chunk)
        await stream.write_eof()
        return stream


def cache_control(path: str) -> str:
    if path.endswith(".html"):
        return "no-cache"
    if _HASHED_RE.search(path):
        return "public, max-age=31536000, immutable"
    return "public, max-age=0, must-revalidate"


def _clean_path(path: str) -> str | None:
    """The request path as a manifest key; None when it tries anything odd."""
    if len(path) > MAX_PATH or "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    return "/".join(parts)


def _lookup(manifest: dict[str, Any], rel: str) -> tuple[str, int] | None:
    candidates = [rel, f"{rel}/index.html", f"{rel}.html"] if rel else ["index.html"]
    for candidate in candidates:
        if candidate in manifest:
            return candidate, 200
    if "404.html" in manifest:
        return "404.html", 404
    # Client-side routes (/dashboard/settings) get the app shell; missing files (/x.js) do not.
    if "." not in rel.rsplit("/", 1)[-1] and "index.html" in manifest:
        return "index.html", 200
    return None


def _not_found(message: str, status: int = 404) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


SITES = web.AppKey("deployhub.sites", Sites)


def get_sites(app: web.Application) -> Sites:
    return require(app, SITES)


async def sites_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SITES] = Sites(app[SETTINGS], app[STORAGE], app[STORE])
    yield


@web.middleware
async def site_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A request whose Host is `<label>.<domain>` is a site's; the rest go to the app."""
    sites = request.config_dict[SITES]
    label = sites.site_label(request.host)
    if label is None:
        return await handler(request)
    if request.method not in ("GET", "HEAD"):
        return web.Response(status=405, text="Sites answer GET and HEAD only.\n", headers={"Allow": "GET, HEAD"})
    return await sites.handle(request, label)
