"""A deployment's manifest: every path it serves -> the blob holding its bytes, and its rules.

Written by the worker after every blob is stored, read once by the site server and cached
(deployments are immutable, but for their variants: see below). On storage it is JSON:

    {"version": 2,
     "files": {"assets/app-3f9a1c2b.js": {"hash": "<sha256 hex>", "size": 1234,
               "type": "text/javascript; charset=utf-8",
               "cache_control": "public, max-age=31536000, immutable",
               "encodings": {"br": 410, "gzip": 480}}, ...},
     "redirects": [{"from": "/*", "to": "/index.html", "status": 200, "force": false}],
     "headers": [{"for": "/assets/*", "values": {"X-Robots-Tag": "noindex"}}],
     "base": "repo/"}

`encodings` maps a Content-Encoding to the size of the precompressed variant at
`blobs/<hash>.br` / `.gz`. A build stores its manifest once the files are stored, so the
site is served at once, and again with the new variants once they are made. Until then the
manifest says `"variants_pending_until": <unix time>`, and the site server reads it again
about every second up to that time (past it, a worker that died meanwhile left it final).
`base`, when there is one, is the sub-path a site was built for (a GitHub Pages project
site's, which its build could not be told to leave): every path starts with it, and the
fallbacks (`404.html`, the app shell for client-side routes) are the ones under it.
Manifests written before content addressing have no `version` and no `hash`: their files
live at `sites/<deployment>/<path>`, and are served from there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from .rules import HeaderRule, Redirect
from .storage import blob_key, site_key

VERSION = 2
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "public, max-age=0, must-revalidate"
HTML = "no-cache"

# What a bundler appends to a name, last before the extension (and webpack's `.chunk`):
# webpack/CRA `main.3f9a1c2b.chunk.js`, `app-3f9a1c2b.css` (hex, 8 or more), Vite and Rollup
# `index-B4x_k9Zq.js` (8 characters of base64url).
_STEM_RE = re.compile(r"^(?P<stem>.+?)(?:\.chunk)?\.[A-Za-z0-9]+$")
_HEX_RE = re.compile(r"[.-](?P<hash>[0-9a-f]{8,64})$")
_B64_RE = re.compile(r"-(?P<hash>[A-Za-z0-9_-]{8})$")


def is_hashed(path: str) -> bool:
    """Whether the file name carries a content hash, so the same URL never changes content.

    A wrong yes serves stale code for a year, a wrong no only costs a revalidation; so a
    word (`google-analytics.js`, `app-MyWidget.js`) must never pass: the hash must hold a
    digit, or an underscore or dash, or look random in its letter case."""
    name = path.rsplit("/", 1)[-1]
    match = _STEM_RE.match(name)
    if match is None:
        return False
    stem = match["stem"]
    hexed = _HEX_RE.search(stem)
    if hexed is not None and not hexed["hash"].isdigit() and not hexed["hash"].isalpha():
        return True  # both digits and letters: a date (20240101) or a word (deadbeef) is not
    b64 = _B64_RE.search(stem)
    if b64 is None:
        return False
    digest = b64["hash"]
    if digest.isdigit():
        return False  # a date or a version number
    if any(c.isdigit() or c in "_-" for c in digest):
        return True
    # Random letters change case often; CamelCase words (MyWidget) change once or twice.
    changes = sum(1 for a, b in zip(digest, digest[1:]) if a.islower() != b.islower())
    return changes >= 4


def cache_control(path: str) -> str:
    if path.endswith((".html", ".htm")):
        return HTML
    if is_hashed(path):
        return IMMUTABLE
    return REVALIDATE


_COMPRESSIBLE = (
    "text/", "application/javascript", "application/json", "application/xml",
    "application/manifest+json", "application/wasm", "image/svg+xml", "application/x-javascript",
    "font/ttf", "font/otf", "application/vnd.ms-fontobject", "image/x-icon",
    "image/vnd.microsoft.icon",
)
# Below this a variant is not worth its object and PutObject: the file and its headers go in
# one TCP segment compressed or not, so a visitor waits no round trip less.
MIN_COMPRESS = 1024


def compressible(content_type: str, size: int) -> bool:
    """Text-like types worth precompressing (images, video, woff2 are compressed already)."""
    return size >= MIN_COMPRESS and content_type.startswith(_COMPRESSIBLE)


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One served file, with everything the response needs worked out once."""

    path: str
    key: str  # storage key of the bytes as built
    size: int
    type: str
    cache_control: str
    etag: str
    # Content-Encoding -> (storage key, size) of a precompressed variant.
    encodings: dict[str, tuple[str, int]]


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    deployment: str
    files: dict[str, Entry]
    redirects: tuple[Redirect, ...] = ()
    headers: tuple[HeaderRule, ...] = ()
    legacy: bool = False  # files under sites/<deployment>/, no hashes
    # Until this unix time, while its variants are made, a newer manifest may replace it.
    pending_until: float = 0.0
    base: str = ""  # "repo/": the sub-path every file is under, and its fallbacks

    @property
    def has_client_routing(self) -> bool:
        """A rule such as `/* /index.html 200`: the site routes unknown paths itself."""
        return any(rule.client_routing for rule in self.redirects)

    def blob_keys(self) -> set[str]:
        """Every storage key this deployment's files use (variants too)."""
        found = set()
        for entry in self.files.values():
            found.add(entry.key)
            found.update(key for key, _ in entry.encodings.values())
        return found


def parse(dep_id: str, raw: bytes) -> Manifest:
    data: dict[str, Any] = json.loads(raw)
    files: dict[str, Entry] = {}
    if data.get("version") is None:
        for path, info in data["files"].items():
            size = int(info["size"])
            files[path] = Entry(
                path, site_key(dep_id, path), size, str(info["type"]), cache_control(path),
                f'"{dep_id}-{size}"', {},
            )
        return Manifest(dep_id, files, legacy=True)
    for path, info in data["files"].items():
        digest = str(info["hash"])
        encodings = {
            str(name): (blob_key(digest, str(name)), int(size))
            for name, size in info.get("encodings", {}).items()
        }
        files[path] = Entry(
            path, blob_key(digest), int(info["size"]), str(info["type"]),
            str(info["cache_control"]), f'"{digest[:32]}"', encodings,
        )
    return Manifest(
        dep_id, files,
        tuple(Redirect.from_json(r) for r in data.get("redirects", [])),
        tuple(HeaderRule.from_json(h) for h in data.get("headers", [])),
        pending_until=float(data.get("variants_pending_until", 0)),
        base=str(data.get("base", "")),
    )


def dumps(
    files: dict[str, dict[str, Any]], redirects: list[Redirect], headers: list[HeaderRule],
    pending_until: float = 0.0, base: str = "",
) -> bytes:
    return json.dumps({
        "version": VERSION,
        "files": dict(sorted(files.items())),
        "redirects": [r.to_json() for r in redirects],
        "headers": [h.to_json() for h in headers],
        **({"variants_pending_until": round(pending_until, 3)} if pending_until else {}),
        **({"base": base} if base else {}),
    }, separators=(",", ":")).encode()
