"""Deleting deployments, and the blobs no deployment uses any more, safely against uploads.

Blobs are shared between deployments (and projects), so a blob may go only when no manifest
references it and no upload is about to. The scheme:

1. An upload *leases* every blob it will reference before it checks whether the blob exists
   (ZSET `dh:blob-leases`, hash -> lease end), and leases them all again right before it
   writes its manifest; a lease lasts `blob_grace_seconds`.
2. The collector forgets the deployments' records (atomically with the checks: never the
   production one, never one still building), deletes their manifests, then reads every
   other manifest: a blob any of them uses stays.
3. For each remaining blob it *claims* the deletion in one Lua step that refuses a blob under
   lease and otherwise sets `dh:blob-deleting:<hash>`; it deletes the blob and its variants,
   then clears the flag. An upload whose lease finds that flag waits until it is cleared and
   then finds the blob gone, so it uploads it again.

So an upload either leased first (the claim is refused) or sees the flag (it re-uploads).
A manifest written after step 2 read the others is still covered by its leases, as long as
the collector's run is shorter than the grace period: a run that takes longer starts over.
Blobs of a build that failed mid-upload are referenced by no manifest and are left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import cast

from redis.asyncio import Redis

from . import keys
from .manifest import Manifest, parse
from .status import Status
from .storage import BLOBS, Storage, manifest_key, site_key
from .store import Conflict, NotFound, Store

log = logging.getLogger(__name__)

DELETING_TTL = 120  # seconds a claim flag outlives a collector that died mid-delete
DELETING_POLL = 0.1
CLAIM_BATCH = 500

# KEYS: the leases ZSET, the deleting-flag prefix. ARGV: lease end, then hashes. Returns the hashes being deleted.
_HOLD = """
local busy = {}
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'GT', ARGV[1], ARGV[i])
  if redis.call('EXISTS', KEYS[2] .. ARGV[i]) == 1 then busy[#busy + 1] = ARGV[i] end
end
return busy
"""

# KEYS: the leases ZSET, the deleting-flag prefix. ARGV: now, flag TTL, then hashes.
# Returns the hashes this caller may delete (no lease runs on them); flags them as deleting.
_CLAIM = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local claimed = {}
for i = 3, #ARGV do
  local until_ = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]) or '0')
  if until_ <= now and redis.call('SET', KEYS[2] .. ARGV[i], '1', 'NX', 'EX', ARGV[2]) then
    claimed[#claimed + 1] = ARGV[i]
  end
end
return claimed
"""


class BlobLeases:
    """What an upload holds on the blobs it references until its manifest protects them."""

    def __init__(self, redis: Redis, grace_seconds: float) -> None:
        self.redis = redis
        self.grace = grace_seconds
        self._hold = redis.register_script(_HOLD)

    async def hold(self, digests: Iterable[str]) -> None:
        """Lease the blobs; returns once none of them is being deleted (a deleted one is then
        gone for good, and the caller finds it missing and uploads it)."""
        wanted = list(dict.fromkeys(digests))
        for start in range(0, len(wanted), CLAIM_BATCH):
            batch = wanted[start:start + CLAIM_BATCH]
            busy = cast(list[str], await self._hold(
                keys=[keys.BLOB_LEASES, keys.blob_deleting("")],
                args=[repr(time.time() + self.grace), *batch],
            ))
            deadline = time.monotonic() + DELETING_TTL
            for digest in busy:
                while await self.redis.exists(keys.blob_deleting(digest)):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"blob {digest} stayed flagged as deleting")
                    await asyncio.sleep(DELETING_POLL)


@dataclasses.dataclass
class Removed:
    deployments: list[str]
    blobs: int = 0


class Collector:
    def __init__(self, store: Store, storage: Storage, grace_seconds: float) -> None:
        self.store = store
        self.storage = storage
        self.redis: Redis = store.redis
        self.grace = grace_seconds
        self._claim = self.redis.register_script(_CLAIM)
        # Deployments are immutable: what a manifest references never changes once written.
        self._referenced: dict[str, frozenset[str]] = {}

    async def delete_deployment(self, project: str, dep_id: str) -> Removed:
        """Conflict while it serves production or still builds."""
        await self.store.forget_deployment(project, dep_id)
        return await self.collect([dep_id])

    async def delete_project(self, name: str) -> Removed:
        dep_ids = await self.store.forget_project(name)
        return await self.collect(dep_ids)

    async def enforce_retention(self, project: str, keep: int) -> Removed:
        """Delete all but the newest `keep` deployments of a project (never production, never
        one still building)."""
        if keep <= 0:
            return Removed([])
        deployments = await self.store.list_deployments(project, limit=10_000)
        production = (await self.store.get_project(project)).production
        removed = []
        for dep in deployments[keep:]:
            if dep.id == production or not Status(dep.status).final:
                continue
            try:
                await self.store.forget_deployment(project, dep.id)
            except (Conflict, NotFound):
                continue  # promoted or removed meanwhile
            removed.append(dep.id)
        return await self.collect(removed) if removed else Removed([])

    async def collect(self, dep_ids: list[str]) -> Removed:
        """Delete the storage of deployments whose records are gone: their manifests, legacy
        files, and every blob no other manifest (and no upload) still uses."""
        candidates: set[str] = set()
        legacy: list[str] = []
        for dep_id in dep_ids:
            manifest = await self._manifest(dep_id)
            if manifest is None:
                continue
            if manifest.legacy:
                legacy.append(dep_id)
            else:
                candidates |= manifest.blob_keys()
        await self.storage.delete([manifest_key(d) for d in dep_ids])
        for dep_id in dep_ids:
            self._referenced.pop(dep_id, None)
            if dep_id in legacy:
                await self.storage.delete([k async for k in self.storage.list_keys(site_key(dep_id, ""))])
        digests = {key[len(BLOBS):].split(".", 1)[0] for key in candidates}
        while True:
            started = time.monotonic()
            in_use = await self._in_use()
            unused = sorted(digests - in_use)
            if time.monotonic() - started < self.grace / 2:
                break
            log.warning("listing the manifests took longer than half the grace period; again")
        deleted = 0
        for start in range(0, len(unused), CLAIM_BATCH):
            batch = unused[start:start + CLAIM_BATCH]
            claimed = cast(list[str], await self._claim(
                keys=[keys.BLOB_LEASES, keys.blob_deleting("")],
                args=[repr(time.time()), DELETING_TTL, *batch],
            ))
            if not claimed:
                continue
            try:
                mine = set(claimed)
                doomed = sorted(k for k in candidates if k[len(BLOBS):].split(".", 1)[0] in mine)
                await self.storage.delete(doomed)
                deleted += len(claimed)
            finally:
                await self.redis.delete(*(keys.blob_deleting(d) for d in claimed))
        log.info("removed %d deployments and %d blobs", len(dep_ids), deleted)
        return Removed(list(dep_ids), deleted)

    async def _manifest(self, dep_id: str) -> Manifest | None:
        raw = await self.storage.get_bytes(manifest_key(dep_id))
        return None if raw is None else parse(dep_id, raw)

    async def _in_use(self) -> set[str]:
        """The hash of every blob some manifest references."""
        used: set[str] = set()
        seen = set()
        async for key in self.storage.list_keys("manifests/"):
            dep_id = key.removeprefix("manifests/").removesuffix(".json")
            seen.add(dep_id)
            referenced = self._referenced.get(dep_id)
            if referenced is None:
                manifest = await self._manifest(dep_id)
                if manifest is None:
                    continue
                referenced = frozenset(
                    key[len(BLOBS):].split(".", 1)[0] for key in manifest.blob_keys()
                    if key.startswith(BLOBS)
                )
                self._referenced[dep_id] = referenced
            used |= referenced
        for gone in set(self._referenced) - seen:
            del self._referenced[gone]
        return used
