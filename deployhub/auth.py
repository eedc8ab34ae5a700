"""Bearer tokens: created with `deployhub token`, stored hashed, each owning its projects."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any, cast

from redis.asyncio import Redis

from . import keys
from .validation import InvalidInput

TOKEN_PREFIX = "dh_"
_TOKEN_RE = re.compile(r"dh_[A-Za-z0-9_-]{20,100}")
_NAME_RE = re.compile(r"[A-Za-z0-9 ._-]{1,60}")
_ID_RE = re.compile(r"[0-9a-f]{8}")
_DURATION_RE = re.compile(r"([1-9][0-9]{0,5})([mhdw])")
_DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Seconds between two writes of a token's last-used time: a busy client costs one write a
# minute, not one per call.
LAST_USED_EVERY = 60
# The window failed attempts are counted in, per client address.
FAILURE_WINDOW = 60
DEFAULT_MAX_FAILURES = 20

# Counts a failed attempt; the first one of a window starts its expiry. Returns the count.
_FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class Unauthorized(Exception):
    """No token, or one we do not know; the message says what to do."""


class TooManyAttempts(Exception):
    """Too many bad tokens from one client address; refused until `retry_after` seconds pass."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many failed token attempts from your address; try again in {retry_after} s"
        )
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Token:
    id: str
    name: str
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _digest(token: str) -> str:
    # Tokens are 32 random bytes, so a fast hash is enough (as GitHub does for its tokens):
    # nothing to brute-force, and the stored value is useless to whoever reads Redis.
    return hashlib.sha256(token.encode()).hexdigest()


def parse_duration(raw: str) -> int:
    """Seconds in '90m', '12h', '30d' or '2w'."""
    match = _DURATION_RE.fullmatch(raw.strip())
    if match is None:
        raise InvalidInput(
            f"an expiry is a number and a unit: 90m, 12h, 30d or 2w (not {raw[:30]!r})"
        )
    return int(match[1]) * _DURATION_UNITS[match[2]]


def check_token_name(name: str) -> str:
    # fullmatch: '$' after match would let "laptop\n" through.
    if not _NAME_RE.fullmatch(name) or name != name.strip():
        raise InvalidInput(
            "a token name is 1-60 letters, digits, inner spaces, '.', '_' or '-' "
            "(no control characters or leading/trailing spaces)"
        )
    return name


class Tokens:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._fail = redis.register_script(_FAIL)

    async def create(self, name: str, expires_in: float | None = None) -> tuple[Token, str]:
        """A new token, valid for `expires_in` seconds (None: until revoked); the secret is
        returned once and never stored."""
        check_token_name(name)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        token = Token(
            id=secrets.token_hex(4), name=name, created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )
        record = json.dumps({
            "name": token.name, "created_at": token.created_at, "digest": _digest(secret),
            "expires_at": token.expires_at,
        })
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.TOKENS, token.id, record)
            pipe.hset(keys.TOKEN_DIGESTS, _digest(secret), token.id)
            await pipe.execute()
        return token, secret

    async def list(self) -> list[Token]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.TOKENS)
            pipe.hgetall(keys.TOKEN_LAST_USED)
            rows, used = await pipe.execute()
        tokens = [_token(str(token_id), json.loads(raw), used.get(token_id))
                  for token_id, raw in rows.items()]
        return sorted(tokens, key=lambda t: t.created_at)

    async def revoke(self, token_id: str) -> bool:
        # An id is 8 hex digits; anything else (argv may even hold lone surrogates, from
        # undecodable bytes) names no token and must not reach Redis's encoder.
        if not _ID_RE.fullmatch(token_id):
            return False
        raw = await self.redis.hget(keys.TOKENS, token_id)
        if raw is None:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.TOKENS, token_id)
            pipe.hdel(keys.TOKEN_DIGESTS, json.loads(raw)["digest"])
            pipe.hdel(keys.TOKEN_LAST_USED, token_id)
            await pipe.execute()
        return True

    async def count(self) -> int:
        return int(await self.redis.hlen(keys.TOKENS))

    async def check(
        self, secret: str | None, *, client: str | None = None,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ) -> str:
        """The id of the token `secret` is, or Unauthorized.

        With `client` (an address), bad tokens from it are counted in Redis, so every replica
        shares the count: past `max_failures` in a minute it gets TooManyAttempts, even with a
        good token, so guessing learns nothing while blocked.
        """
        if not secret:
            raise Unauthorized("send a token: 'Authorization: Bearer <token>' (deployhub token create)")
        # The format first: a header may hold anything (even undecodable bytes, which
        # aiohttp hands over as lone surrogates) and only a well-formed token is hashed.
        well_formed = _TOKEN_RE.fullmatch(secret) is not None
        digest = _digest(secret) if well_formed else ""
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip, as before
            if client is not None:
                pipe.get(keys.auth_failures(client))
            if well_formed:
                pipe.hget(keys.TOKEN_DIGESTS, digest)
            replies = await pipe.execute()
        if client is not None and int(replies[0] or 0) >= max_failures:
            raise TooManyAttempts(await self._retry_after(client))
        if not well_formed:
            await self._failed(client, max_failures)
            raise Unauthorized("that is not a DeployHub token")
        token_id = cast(str | None, replies[-1])
        if token_id is None:
            await self._failed(client, max_failures)
            raise Unauthorized("unknown or revoked token")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.TOKENS, token_id)
            pipe.hget(keys.TOKEN_LAST_USED, token_id)
            raw, last_used = await pipe.execute()
        # Constant-time compare of the stored digest, in case the index was tampered with.
        if raw is None or not hmac.compare_digest(json.loads(raw)["digest"], digest):
            await self._failed(client, max_failures)
            raise Unauthorized("unknown or revoked token")
        now = time.time()
        token = _token(token_id, json.loads(raw), last_used)
        if token.expired(now):
            # Not a guess: the token was real, so this does not count as a failure.
            raise Unauthorized(
                f"token {token.id} ({token.name}) expired on "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(token.expires_at))}; "
                "create a new one with `deployhub token create`"
            )
        if token.last_used_at is None or now - token.last_used_at >= LAST_USED_EVERY:
            await self.redis.hset(keys.TOKEN_LAST_USED, token_id, repr(now))
        return str(token_id)

    async def _failed(self, client: str | None, max_failures: int) -> None:
        if client is None:
            return
        count = int(await self._fail(keys=[keys.auth_failures(client)], args=[FAILURE_WINDOW]))
        if count > max_failures:
            raise TooManyAttempts(await self._retry_after(client))

    async def _retry_after(self, client: str) -> int:
        ttl = int(await self.redis.ttl(keys.auth_failures(client)))
        return ttl if ttl > 0 else FAILURE_WINDOW


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Iterable[str] = ()
) -> str:
    """The address failed tokens are counted against.

    The TCP peer, unless it is one of `trusted_proxies`: then the right-most address in
    X-Forwarded-For that is not a trusted proxy (the one our own proxy saw). The header is
    never believed otherwise: anyone can send it, and a guesser would put a fresh address in
    each request to dodge the limit (or someone else's, to lock them out).
    """
    address = _normal(peer) or "unknown"
    trusted = {t for t in (_normal(p) for p in trusted_proxies) if t}
    if address not in trusted or not forwarded_for:
        return address
    for hop in reversed(forwarded_for[:2048].split(",")):
        hop_address = _normal(hop.strip())
        if hop_address is None:
            return address  # a malformed hop: trust nothing left of it
        if hop_address not in trusted:
            return hop_address
    return address


def _normal(raw: str | None) -> str | None:
    if not raw:
        return None
    try:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _token(token_id: str, data: dict[str, Any], last_used: str | None = None) -> Token:
    expires = data.get("expires_at")
    return Token(
        id=token_id, name=str(data["name"]), created_at=float(data["created_at"]),
        expires_at=None if expires is None else float(expires),
        last_used_at=None if last_used is None else float(last_used),
    )
