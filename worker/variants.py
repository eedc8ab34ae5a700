"""The precompressed variants of a text asset, made in worker processes of their own.

Kept to the standard library and `brotli` (Google's own bindings to the reference C library):
this module is what each compressing process imports. Brotli holds the GIL while it
compresses, so threads would take turns on one core and starve the event loop that drives
the uploads; processes use every core. Quality 11 is what precompressing tools use: it is
made once per blob and sent to every visitor, but it is slow (about 1 MB/s a core): a first
deploy of a large site would wait on it for a long time. So an upload spends at most about a
second of compression per CPU (`BEST_BYTES_PER_CPU` at quality 11, or what costs the same):
all of it at 11 when that fits, else quality 10 (1.6% larger on a real Vite build, 2.5x
faster), else quality 8 (8% larger, 25x faster) with as much at 10 as fits, the largest files
first. A redeploy only compresses the files it changed, so it gets quality 11.
"""

from __future__ import annotations

import gzip

import brotli

BEST_BYTES_PER_CPU = 1024 * 1024
BROTLI_BEST_UP_TO = 2 * 1024 * 1024  # larger files: quality 10 at best
# CPU per byte of each quality, as a share of quality 11's (brotli 1.2 on a Vite build's JS
# and CSS, and on bench/upload.py's).
COST = {11: 1.0, 10: 0.43, 8: 0.04}


def brotli_qualities(sizes: list[int], cpus: int) -> list[int]:
    """The quality for each file of `sizes` (largest first), within the upload's budget."""
    budget = BEST_BYTES_PER_CPU * cpus
    total = sum(sizes)
    if total * COST[11] <= budget:
        return [11 if size <= BROTLI_BEST_UP_TO else 10 for size in sizes]
    low = 10 if total * COST[10] <= budget else 8
    left = budget - total * COST[low]
    high = 11 if low == 10 else 10
    step = COST[high] - COST[low]
    qualities = []
    for size in sizes:
        better = size * step <= left and (high == 10 or size <= BROTLI_BEST_UP_TO)
        left -= size * step if better else 0
        qualities.append(high if better else low)
    return qualities


def brotli_variant(data: bytes, quality: int = 11) -> bytes:
    return brotli.compress(data, quality=quality)


def gzip_variant(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def make_variants(data: bytes, quality: int) -> dict[str, bytes]:
    """Content-Encoding -> variant; brotli at `quality`."""
    return {"br": brotli_variant(data, quality), "gzip": gzip_variant(data)}


ENCODINGS = ("br", "gzip")
