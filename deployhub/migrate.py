"""Renames the keys a standalone Redis holds under the names from before the hash tags.

Up to this version every key was `dh:<rest>`; now the control plane is `{dh}:<rest>` and a
log stream is `dh:{p:<project>}:logs:<id>` (see keys.py). Every process that opens Redis
runs this first (see redis_client.connect_redis): one GET once the keys are moved. The first
to find old keys takes a lock, SCANs for them and RENAMENXes each; a second process waits for
it. A key whose new name exists already (an old replica still running wrote it again) is
kept, with a warning, rather than overwrite the new one. A cluster never held the old names:
the scripts of those versions mixed slots, which a cluster refuses.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from redis.asyncio import Redis

from . import keys

log = logging.getLogger(__name__)

OLD_PREFIX = "dh:"
OLD_LOG_STREAM = OLD_PREFIX + "logs:"
OLD_DEPLOYMENT = OLD_PREFIX + "deployment:"
# Old names only: `dh:` followed by anything but the `{` of a new log stream's tag.
OLD_PATTERN = OLD_PREFIX + "[^{]*"
VERSION = "2"
LOCK_SECONDS = 60
WAIT_STEP = 0.2

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


async def migrate_keys(redis: Redis) -> int:
    """Move old-name keys to their new names, once; the number moved."""
    if await redis.get(keys.KEYS_VERSION) == VERSION:
        return 0
    holder = secrets.token_hex(8)
    while not await redis.set(keys.MIGRATE_LOCK, holder, nx=True, ex=LOCK_SECONDS):
        if await redis.get(keys.KEYS_VERSION) == VERSION:
            return 0  # another process did it meanwhile
        await asyncio.sleep(WAIT_STEP)
    try:
        moved = 0
        async for old in redis.scan_iter(match=OLD_PATTERN, count=1000):
            new = await _new_name(redis, str(old))
            if new is None:
                continue
            if await redis.renamenx(old, new):
                moved += 1
            else:
                log.warning("kept the old key %s: %s exists already", old, new)
        await redis.set(keys.KEYS_VERSION, VERSION)
        if moved:
            log.info("moved %d Redis keys to their hash-tagged names", moved)
        return moved
    finally:
        await redis.register_script(_RELEASE)(keys=[keys.MIGRATE_LOCK], args=[holder])


async def _new_name(redis: Redis, old: str) -> str | None:
    if old.startswith(OLD_LOG_STREAM):
        dep_id = old[len(OLD_LOG_STREAM):]
        # The record may be moved already, or not yet: SCAN's order is the table's.
        project = (await redis.hget(keys.deployment(dep_id), "project")
                   or await redis.hget(OLD_DEPLOYMENT + dep_id, "project"))
        if not project:
            log.warning("kept the log stream %s: no deployment record names its project", old)
            return None
        return keys.log_stream(str(project), dep_id)
    return keys.PREFIX + old[len(OLD_PREFIX):]
