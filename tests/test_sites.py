"""Serving like a CDN, on file storage and on S3 alike: encodings, validators, ranges, caching."""

from __future__ import annotations

import asyncio
import gzip

import brotli

from deployhub.sites import get_sites
from tests.support.sites import Publisher

APP_JS = "export const answer = 42;\n" + "console.log('a line of a bundle', 1);\n" * 400
SITE = {
    "index.html": "<!doctype html><div id=root></div><script src=/assets/index-B4x_k9Zq.js></script>",
    "assets/index-B4x_k9Zq.js": APP_JS,
    "google-analytics.js": "ga();\n",
    "logo.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,
}


async def test_brotli_and_gzip_go_only_to_clients_that_accept_them(site_service: Publisher) -> None:
    await site_service.publish("enc", SITE)
    js = "/assets/index-B4x_k9Zq.js"
    status, headers, body = await site_service.get("enc", js, Accept_Encoding="gzip;q=0.5, br;q=1")
    assert status == 200 and headers["Content-Encoding"] == "br"
    assert brotli.decompress(body).decode() == APP_JS and len(body) < len(APP_JS) / 5
    assert headers["Vary"] == "Accept-Encoding"
    status, headers, body = await site_service.get("enc", js, Accept_Encoding="gzip, br;q=0")
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body).decode() == APP_JS
    status, headers, body = await site_service.get("enc", js, Accept_Encoding="identity")
    assert "Content-Encoding" not in headers and body.decode() == APP_JS
    status, headers, body = await site_service.get("enc", js, Accept_Encoding="*;q=0.1, br;q=0")
    assert headers["Content-Encoding"] == "gzip"
    # Images are compressed already: one representation, no Vary.
    status, headers, _ = await site_service.get("enc", "/logo.png", Accept_Encoding="br, gzip")
    assert "Content-Encoding" not in headers and "Vary" not in headers


async def test_etag_from_the_content_and_304(site_service: Publisher) -> None:
    dep_id, _, _ = await site_service.publish("etag", SITE)
    js = "/assets/index-B4x_k9Zq.js"
    _, plain, _ = await site_service.get("etag", js)
    _, br, _ = await site_service.get("etag", js, Accept_Encoding="br")
    assert plain["ETag"] != br["ETag"] and plain["ETag"].strip('"') in br["ETag"]
    status, headers, body = await site_service.get("etag", js, If_None_Match=plain["ETag"])
    assert status == 304 and body == b"" and headers["ETag"] == plain["ETag"]
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    status, _, _ = await site_service.get("etag", js, Accept_Encoding="br", If_None_Match=f'W/{br["ETag"]}, "x"')
    assert status == 304
    assert (await site_service.get("etag", js, If_None_Match='"other"'))[0] == 200
    # The same bytes in another deployment have the same ETag: a redeploy keeps caches warm.
    await site_service.publish("etag", SITE)
    assert (await site_service.get("etag", js, If_None_Match=plain["ETag"]))[0] == 304


async def test_single_ranges_and_unsatisfiable_ones(site_service: Publisher) -> None:
    await site_service.publish("range", SITE)
    png = SITE["logo.png"]
    assert isinstance(png, bytes)
    status, headers, body = await site_service.get("range", "/logo.png", Range="bytes=10-19")
    assert status == 206 and body == png[10:20]
    assert headers["Content-Range"] == f"bytes 10-19/{len(png)}" and headers["Content-Length"] == "10"
    assert (await site_service.get("range", "/logo.png", Range="bytes=-5"))[2] == png[-5:]
    assert (await site_service.get("range", "/logo.png", Range="bytes=2000-"))[2] == png[2000:]
    status, headers, _ = await site_service.get("range", "/logo.png", Range=f"bytes={len(png)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(png)}"
    status, _, body = await site_service.get("range", "/logo.png", Range="bytes=0-1,5-6")
    assert status == 200 and body == png  # several ranges: the whole file
    status, _, body = await site_service.get("range", "/logo.png", Range="bytes=0-1", If_Range='"stale"')
    assert status == 200 and body == png


async def test_head_answers_the_headers_of_get(site_service: Publisher) -> None:
    await site_service.publish("head", SITE)
    for path in ("/", "/assets/index-B4x_k9Zq.js"):
        _, got, body = await site_service.get("head", path, Accept_Encoding="br")
        status, headed, nothing = await site_service.request("HEAD", "head", path, Accept_Encoding="br")
        assert status == 200 and nothing == b""
        assert headed["Content-Length"] == got["Content-Length"] == str(len(body))
        assert headed["ETag"] == got["ETag"]


async def test_cache_control_and_safe_default_headers(site_service: Publisher) -> None:
    await site_service.publish("cc", SITE)
    _, html, _ = await site_service.get("cc", "/")
    assert html["Cache-Control"] == "no-cache"
    _, js, _ = await site_service.get("cc", "/assets/index-B4x_k9Zq.js")
    assert js["Cache-Control"] == "public, max-age=31536000, immutable"
    _, ga, _ = await site_service.get("cc", "/google-analytics.js")
    assert ga["Cache-Control"] == "public, max-age=0, must-revalidate"
    for headers in (html, js, ga):
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
        assert headers["X-Frame-Options"] == "SAMEORIGIN"


async def test_a_popular_site_costs_no_storage_request_after_the_first(site_service: Publisher) -> None:
    await site_service.publish("hot", SITE)
    storage = site_service.storage
    for _ in range(2):
        await site_service.get("hot", "/assets/index-B4x_k9Zq.js", Accept_Encoding="br")
        await site_service.get("hot", "/deep/client/route")
    lookups = await site_service.remembered("hot", "/deep/client/route")
    before = dict(storage.requests)
    for _ in range(50):
        assert (await site_service.get("hot", "/assets/index-B4x_k9Zq.js", Accept_Encoding="br"))[0] == 200
        assert (await site_service.get("hot", "/deep/client/route"))[0] == 200
    assert dict(storage.requests) == before
    assert get_sites(site_service.service.app).stats["host look-ups"] == lookups  # nor Redis


async def test_large_files_stream_and_stay_out_of_the_memory_cache(site_service: Publisher) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    await site_service.publish("big", {"index.html": "x", "video.bin": big})
    status, headers, body = await site_service.get("big", "/video.bin")
    assert status == 200 and body == big and headers["Content-Length"] == str(len(big))
    status, _, body = await site_service.get("big", "/video.bin", Range="bytes=1048570-1048585")
    assert status == 206 and body == big[1048570:1048586]
    assert get_sites(site_service.service.app).bodies.size < len(big)


async def test_a_site_built_for_a_sub_path_is_served_under_it(site_service: Publisher) -> None:
    site = {"index.html": '<script src="/repo/assets/app-3f9a1c2b.js"></script>',
            "assets/app-3f9a1c2b.js": "run();\n", "about/index.html": "<h1>About</h1>"}
    await site_service.publish("pages", site, base="repo/")
    status, headers, _ = await site_service.get("pages", "/")
    assert status == 302 and headers["Location"] == "/repo/"
    for path, expected in (("/repo/", b"/repo/assets/app-3f9a1c2b.js"), ("/repo", b"/repo/assets/"),
                           ("/repo/assets/app-3f9a1c2b.js", b"run();"), ("/repo/about/", b"About"),
                           ("/repo/a/client/route", b"/repo/assets/")):  # the app shell
        status, _, body = await site_service.get("pages", path)
        assert status == 200 and expected in body, (path, status, body)
    for path in ("/repo/missing.js", "/assets/app-3f9a1c2b.js", "/elsewhere/route"):
        assert (await site_service.get("pages", path))[0] == 404, path
    # With a 404.html under the base, that is the not-found page, there only.
    await site_service.publish("pages", {**site, "404.html": "<h1>Not here</h1>"}, base="repo/")
    _, body = await _once_moved(site_service, "/repo/nothing/here", 404)
    assert body == b"<h1>Not here</h1>"
    # A later deployment built for the root is served at the root again: the redirect was
    # the sub-path deployment's own rule.
    await site_service.publish("pages", site)
    _, body = await _once_moved(site_service, "/", 200)
    assert b"/repo/assets/" in body


async def _once_moved(publisher: Publisher, path: str, status: int) -> tuple[int, bytes]:
    """The answer once the new production deployment's event has reached the host cache."""
    for _ in range(100):
        got, _, body = await publisher.get("pages", path)
        if got == status:
            return got, body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never answered {status}: {got} {body[:200]!r}")
