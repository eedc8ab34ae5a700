"""Bearer tokens: created with `deployhub token`, stored hashed, each owning its projects."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any

from redis.asyncio import Redis

from . import keys
from .validation import InvalidInput

TOKEN_PREFIX = "dh_"
_TOKEN_RE = re.compile(r"^dh_[A-Za-z0-9_-]{20,100}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9 ._-]{1,60}$")


class Unauthorized(Exception):
    """No token, or one we do not know; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Token:
    id: str
    name: str
    created_at: float


def _digest(token: str) -> str:
    # Tokens are 32 random bytes, so a fast hash is enough (as GitHub does for its tokens):
    # nothing to brute-force, and the stored value is useless to whoever reads Redis.
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create(self, name: str) -> tuple[Token, str]:
        """A new token; the secret is returned once and never stored."""
        if not _NAME_RE.match(name):
            raise InvalidInput("a token name is 1-60 letters, digits, spaces, '.', '_' or '-'")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = Token(id=secrets.token_hex(4), name=name, created_at=time.time())
        record = json.dumps({"name": token.name, "created_at": token.created_at, "digest": _digest(secret)})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.TOKENS, token.id, record)
            pipe.hset(keys.TOKEN_DIGESTS, _digest(secret), token.id)
            await pipe.execute()
        return token, secret

    async def list(self) -> list[Token]:
        rows = await self.redis.hgetall(keys.TOKENS)
        tokens = [_token(str(token_id), json.loads(raw)) for token_id, raw in rows.items()]
        return sorted(tokens, key=lambda t: t.created_at)

    async def revoke(self, token_id: str) -> bool:
        raw = await self.redis.hget(keys.TOKENS, token_id)
        if raw is None:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.TOKENS, token_id)
            pipe.hdel(keys.TOKEN_DIGESTS, json.loads(raw)["digest"])
            await pipe.execute()
        return True

    async def count(self) -> int:
        return int(await self.redis.hlen(keys.TOKENS))

    async def check(self, secret: str | None) -> str:
        """The id of the token `secret` is, or Unauthorized."""
        if not secret:
            raise Unauthorized("send a token: 'Authorization: Bearer <token>' (deployhub token create)")
        if not _TOKEN_RE.match(secret):
            raise Unauthorized("that is not a DeployHub token")
        digest = _digest(secret)
        token_id = await self.redis.hget(keys.TOKEN_DIGESTS, digest)
        if token_id is None:
            raise Unauthorized("unknown or revoked token")
        raw = await self.redis.hget(keys.TOKENS, token_id)
        # Constant-time compare of the stored digest, in case the index was tampered with.
        if raw is None or not hmac.compare_digest(json.loads(raw)["digest"], digest):
            raise Unauthorized("unknown or revoked token")
        return str(token_id)


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _token(token_id: str, data: dict[str, Any]) -> Token:
    return Token(id=token_id, name=str(data["name"]), created_at=float(data["created_at"]))
