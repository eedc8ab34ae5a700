"""The build queue every replica shares: DEPLOYHUB_MAX_BUILDS is a limit across all of them.

Waiting deployments sit in one Redis ZSET, oldest first; running builds hold slots in
another, each slot with a lease (its score is the time it runs out), so a replica that dies
does not keep its slots. One script claims the next deployment when a slot is free; the
transition that ends a deployment frees its slot (store.py). Each replica runs a
`Dispatcher` that claims work for its runner, woken through pub/sub, with a short poll as a
floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from redis.asyncio import Redis

from . import keys
from .redis_client import stop_if_cancelled
from .status import FINAL, Status, lua_set
from .store import LEASE_SECONDS, Deployment

log = logging.getLogger(__name__)

SLOT_LEASE_MS = LEASE_SECONDS * 1000
# Seconds a dispatcher sleeps when nothing woke it: a lost wake-up costs at most this.
POLL_INTERVAL = 1.0
# Seconds between refreshes of the queued deployments' leases and this replica's slots.
KEEP_INTERVAL = 10.0
# Deployments one dispatcher claims in one round before it looks at the clock again.
CLAIMS_PER_ROUND = 16

# Drops slots whose lease ran out, then, if fewer than ARGV[3] are held, gives a slot to the
# oldest deployment still `queued` (dropping ended ones on the way). A deployment with a home
# replica other than the caller is left to its home while that replica lives: the caller
# gets nothing, and the queue stays first come, first served.
_CLAIM = """
local queue, slots, homes = KEYS[1], KEYS[2], KEYS[3]
local now, lease, limit, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local me, replica_prefix = ARGV[5], ARGV[6]
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
if redis.call('ZCARD', slots) >= limit then return false end
while true do
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if not head then return false end
  if redis.call('HGET', prefix .. head, 'status') == '""" + Status.QUEUED + """' then
    local home = redis.call('HGET', homes, head)
    if home and home ~= me and redis.call('EXISTS', replica_prefix .. home) == 1 then
      return false
    end
  end
  redis.call('ZREM', queue, head)
  redis.call('HDEL', homes, head)
  if redis.call('HGET', prefix .. head, 'status') == '""" + Status.QUEUED + """' then
    redis.call('ZADD', slots, now + lease, head)
    return head
  end
end
"""

# Renews the slots of builds that are still running (not final); a finished one is dropped.
_HOLD = """
local FINAL = """ + lua_set(FINAL) + """
local slots, until_ms, prefix = KEYS[1], ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local status = redis.call('HGET', prefix .. ARGV[i], 'status')
  if status and not FINAL[status] then
    redis.call('ZADD', slots, until_ms, ARGV[i])
  else
    redis.call('ZREM', slots, ARGV[i])
  end
end
return 1
"""

# Keeps the lease of every waiting deployment: the queue itself is alive to finish them,
# whichever replica posted them. Atomic with the queue, so a claimed one is left to its runner.
_KEEP_QUEUED = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('SET', ARGV[1] .. id, 'queued', 'EX', ARGV[2])
end
return #ids
"""


class BuildQueue:
    """The shared queue and slots in Redis (a client with `decode_responses=True`)."""

    def __init__(self, redis: Redis, limit: int, home: str = "") -> None:
        """`home`: this replica's name, for deployments that must build where they were
        posted (the local runner's); empty: any replica may start them (ECS tasks)."""
        self.redis = redis
        self.limit = limit
        self.home = home
        self._claim = redis.register_script(_CLAIM)
        self._hold = redis.register_script(_HOLD)
        self._keep_queued = redis.register_script(_KEEP_QUEUED)

    async def enqueue(self, dep: Deployment) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.QUEUE, {dep.id: dep.created_at}, nx=True)
            if self.home:
                pipe.hset(keys.QUEUE_HOMES, dep.id, self.home)
            await pipe.execute()
        # After the MULTI, not in it: a cluster client refuses PUBLISH (no key) in one.
        await self.redis.publish(keys.QUEUE_WAKE, "1")

    async def claim(self) -> str | None:
        """The next deployment to build, now holding a slot; None when all slots are taken
        or nothing waits."""
        dep_id = await self._claim(
            keys=[keys.QUEUE, keys.SLOTS, keys.QUEUE_HOMES],
            args=[int(time.time() * 1000), SLOT_LEASE_MS, self.limit, keys.deployment(""),
                  self.home, keys.replica("")],
        )
        return None if dep_id is None else str(dep_id)

    async def hold(self, dep_ids: Iterable[str]) -> None:
        """Renew the slots of these running builds (a lapsed one is taken back)."""
        ids = list(dep_ids)
        if ids:
            until = int(time.time() * 1000) + SLOT_LEASE_MS
            await self._hold(keys=[keys.SLOTS], args=[until, keys.deployment(""), *ids])

    async def release(self, dep_id: str) -> None:
        """Free a slot whatever the deployment's status (its build is gone)."""
        await self.redis.zrem(keys.SLOTS, dep_id)
        await self.redis.publish(keys.QUEUE_WAKE, "1")  # not in a MULTI: see enqueue

    async def alive(self, living: bool = True) -> None:
        """Say this replica takes the deployments homed here (or, `living=False`, that it
        has stopped: others take them at once)."""
        if self.home:
            if living:
                await self.redis.set(keys.replica(self.home), "1", ex=LEASE_SECONDS)
            else:
                await self.redis.delete(keys.replica(self.home))

    async def keep_queued(self) -> int:
        return int(await self._keep_queued(
            keys=[keys.QUEUE], args=[keys.lease(""), LEASE_SECONDS]
        ))

    async def waiting(self) -> list[str]:
        return [str(i) for i in await self.redis.zrange(keys.QUEUE, 0, -1)]

    async def running(self) -> list[str]:
        return [str(i) for i in await self.redis.zrange(keys.SLOTS, 0, -1)]


class Dispatcher:
    """Claims queued deployments for one runner while this replica lives.

    `start(dep_id)` must return at once (the runner starts the build in a task of its own);
    `mine()` names the builds this replica runs, whose slots it keeps.
    """

    def __init__(
        self, queue: BuildQueue, start: Callable[[str], Awaitable[None]],
        mine: Callable[[], Iterable[str]],
    ) -> None:
        self.queue = queue
        self.start = start
        self.mine = mine
        self._wake = asyncio.Event()

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen(), name="deployhub-queue-wake")
        next_keep = 0.0
        try:
            while True:
                stop_if_cancelled()  # a cancel a library turned into an error ends us too
                self._wake.clear()
                try:
                    if time.monotonic() >= next_keep:
                        await self.queue.alive()
                        await self.queue.keep_queued()
                        await self.queue.hold(self.mine())
                        next_keep = time.monotonic() + KEEP_INTERVAL
                    for _ in range(CLAIMS_PER_ROUND):
                        dep_id = await self.queue.claim()
                        if dep_id is None:
                            break
                        await self.start(dep_id)
                    else:
                        self._wake.set()  # more may be waiting: go round again at once
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away: the next round tries again
                    log.warning("the build dispatcher could not run: %s", exc)
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that comes
                # as the event is set, and the server would never finish shutting down.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._wake.wait()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            with contextlib.suppress(Exception):
                async with asyncio.timeout(POLL_INTERVAL):
                    await self.queue.alive(False)

    async def _listen(self) -> None:
        """Set the wake event on every message of the queue channel; resubscribe after an
        outage (the poll covers the gap)."""
        while True:
            try:
                async with self.queue.redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.QUEUE_WAKE)
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=KEEP_INTERVAL
                        )
                        if message is not None:
                            self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_cancelled()
                log.debug("queue wake-ups lost for now: %s", exc)
                await asyncio.sleep(POLL_INTERVAL)


@contextlib.asynccontextmanager
async def dispatching(dispatcher: Dispatcher) -> AsyncIterator[None]:
    """Run `dispatcher` for the duration of the block."""
    task = asyncio.create_task(dispatcher.run(), name="deployhub-dispatcher")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
