"""Deleting deployments, and the blobs no deployment uses any more, safely against uploads.

Blobs are shared between deployments (and projects), so a blob may go only when no manifest
references it and no upload is about to. The scheme:

1. An upload *leases* every blob it will reference (HASH `dh:blob-lease:<hash>`, upload ->
   lease end) before it checks whether the blob exists, and releases its leases only after
   its manifest is written. A lease of an upload that dies ends after `blob_grace_seconds`.
2. The collector forgets the deployments' records (atomically with the checks: never the
   production one, never one still building) and deletes their manifests.
3. It *claims* each of their blobs in one Lua step that refuses a blob under lease and
   otherwise sets `dh:blob-deleting:<hash>`; an upload whose lease meets that flag waits
   until it is cleared, then finds the blob gone and uploads it again.
4. Only then it reads every remaining manifest, and deletes the claimed blobs none of them
   uses; then it clears the flags.

An upload either leased the blob before the claim (refused), or released its lease before
the claim, after writing its manifest, which step 4 then reads (kept), or leased after the
claim (it waits, and re-uploads). A collector that takes longer than its flags live gives up
before deleting. Blobs of a build that failed mid-upload are referenced by no manifest: once
their leases end, `sweep()` (at most hourly, after a retention pass) removes them the same way.
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
from .redis_client import through_outage
from .status import Status
from .storage import BLOBS, Storage, log_key, manifest_key, site_key
from .store import Conflict, NotFound, Store

log = logging.getLogger(__name__)

DELETING_TTL = 300  # seconds a claim flag outlives a collector that died mid-delete
DELETING_POLL = 0.1
BATCH = 500

# KEYS: the lease and deleting-flag prefixes. ARGV: upload id, lease end, grace, hashes...
# Returns the hashes being deleted right now.
_HOLD = """
local busy = {}
for i = 4, #ARGV do
  local lease = KEYS[1] .. ARGV[i]
  redis.call('HSET', lease, ARGV[1], ARGV[2])
  redis.call('EXPIRE', lease, ARGV[3])
  if redis.call('EXISTS', KEYS[2] .. ARGV[i]) == 1 then busy[#busy + 1] = ARGV[i] end
end
return busy
"""

# KEYS: the lease prefix. ARGV: upload id, hashes...
_RELEASE = """
for i = 2, #ARGV do redis.call('HDEL', KEYS[1] .. ARGV[i], ARGV[1]) end
return 1
"""

# KEYS: the lease and deleting-flag prefixes. ARGV: now, flag TTL, hashes...
# Flags and returns the hashes no lease runs on.
_CLAIM = """
local now = tonumber(ARGV[1])
local claimed = {}
for i = 3, #ARGV do
  local leased = false
  local ends = redis.call('HVALS', KEYS[1] .. ARGV[i])
  for _, value in ipairs(ends) do
    if tonumber(value) > now then leased = true end
  end
  if not leased and redis.call('SET', KEYS[2] .. ARGV[i], '1', 'NX', 'EX', ARGV[2]) then
    claimed[#claimed + 1] = ARGV[i]
  end
end
return claimed
"""


class BlobLeases:
    """What one upload holds on the blobs it references until its manifest protects them."""

    def __init__(self, redis: Redis, grace_seconds: float, upload: str) -> None:
        self.redis = redis
        self.grace = grace_seconds
        self.upload = upload
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)
        self.held: set[str] = set()

    async def hold(self, digests: Iterable[str]) -> None:
        """Lease the blobs; returns once none of them is being deleted (a deleted one is then
        gone for good, and the caller finds it missing and uploads it)."""
        wanted = list(dict.fromkeys(digests))
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start:start + BATCH]
            busy = cast(list[str], await through_outage(lambda: self._hold(
                keys=[keys.blob_lease(""), keys.blob_deleting("")],
                args=[self.upload, repr(time.time() + self.grace), int(self.grace) + 1, *batch],
            )))
            self.held.update(batch)
            deadline = time.monotonic() + DELETING_TTL
            for digest in busy:
                while await through_outage(lambda: self.redis.exists(keys.blob_deleting(digest))):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"blob {digest} stayed flagged as deleting")
                    await asyncio.sleep(DELETING_POLL)

    async def release(self) -> None:
        """Once the manifest is written: from now on it is what keeps the blobs."""
        held = sorted(self.held)
        for start in range(0, len(held), BATCH):
            batch = held[start:start + BATCH]
            await through_outage(
                lambda: self._release(keys=[keys.blob_lease("")], args=[self.upload, *batch])
            )
        self.held.clear()


@dataclasses.dataclass
class Removed:
    deployments: list[str]
    blobs: int = 0


class Collector:
    def __init__(self, store: Store, storage: Storage) -> None:
        self.store = store
        self.storage = storage
        self.redis: Redis = store.redis
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
        """Delete the storage of deployments whose records are gone: their manifests, logs,
        legacy files, and every blob no other manifest (and no upload) still uses."""
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
        await self.storage.delete([manifest_key(d) for d in dep_ids] + [log_key(d) for d in dep_ids])
        for dep_id in dep_ids:
            self._referenced.pop(dep_id, None)
            if dep_id in legacy:
                await self.storage.delete([k async for k in self.storage.list_keys(site_key(dep_id, ""))])
        deleted = await self._delete_unused(candidates)
        log.info("removed %d deployments and %d blobs", len(dep_ids), deleted)
        return Removed(list(dep_ids), deleted)

    async def sweep(self) -> int:
        """Delete every blob no manifest uses and no upload holds: what builds that failed
        mid-upload left behind. Lists the whole store: run it rarely."""
        in_use = await self._in_use()
        orphans = {
            key async for key in self.storage.list_keys(BLOBS)
            if key[len(BLOBS):].split(".", 1)[0] not in in_use
        }
        deleted = await self._delete_unused(orphans) if orphans else 0
        if deleted:
            log.info("swept %d blobs no deployment uses", deleted)
        return deleted

    async def _delete_unused(self, candidates: set[str]) -> int:
        """Delete the blobs among `candidates` (storage keys, variants too) that no upload
        holds and no manifest uses; returns how many blobs."""
        digests = sorted({key[len(BLOBS):].split(".", 1)[0] for key in candidates})
        claimed: list[str] = []
        claimed_at = time.monotonic()
        for start in range(0, len(digests), BATCH):
            claimed += cast(list[str], await self._claim(
                keys=[keys.blob_lease(""), keys.blob_deleting("")],
                args=[repr(time.time()), DELETING_TTL, *digests[start:start + BATCH]],
            ))
        deleted = 0
        try:
            # After the claims: a manifest written before an upload released its leases is
            # among these.
            in_use = await self._in_use()
            doomed = set(claimed) - in_use
            if time.monotonic() - claimed_at > DELETING_TTL / 2:
                log.warning("the collector was too slow to trust its claims; nothing deleted")
                doomed = set()
            if doomed:
                await self.storage.delete(sorted(
                    k for k in candidates if k[len(BLOBS):].split(".", 1)[0] in doomed
                ))
            deleted = len(doomed)
        finally:
            for start in range(0, len(claimed), BATCH):
                await self.redis.delete(*(keys.blob_deleting(d) for d in claimed[start:start + BATCH]))
        return deleted

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
