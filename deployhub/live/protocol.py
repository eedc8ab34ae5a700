"""The WebSocket endpoint: authenticate, subscribe, unsubscribe, ping."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from typing import Any

from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from ..api import client_of, error_response, long_lived
from ..auth import TooManyAttempts, Tokens, Unauthorized, bearer
from ..connections import TOKENS
from ..state import SETTINGS
from ..store import NotFound, dumps
from ..validation import (
    MAX_BODY,
    MAX_RESUME,
    MAX_SEQ,
    InvalidInput,
    check_deployment_id,
    check_project,
    loads_json,
)
from .hub import HUB, Hub
from .watcher import Reply, Subscribe, Watcher

log = logging.getLogger(__name__)

MAX_PROJECTS_PER_SOCKET = 50
_CLOSED = frozenset((WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED))  # as ws.__anext__
CLOSE_REASON_BYTES = 120  # a close frame's reason may hold at most 123 bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Auth:
    """What checking a token over this socket needs: the store of tokens, and whom to count
    bad ones against. Made from the request when a token is checked, never kept per socket:
    thousands of sockets idle in the handler."""

    tokens: Tokens
    client: str
    max_failures: int

    @classmethod
    def of(cls, request: web.Request) -> Auth:
        return cls(
            request.config_dict[TOKENS], client_of(request),
            request.config_dict[SETTINGS].token_failures_per_minute,
        )

    async def check(self, secret: str | None) -> str:
        token_id = await self.tokens.check(secret, client=self.client, max_failures=self.max_failures)
        return sys.intern(token_id)  # the sockets of one token share its id (Watcher.owner)


async def handle_message(
    hub: Hub, request: web.Request, watcher: Watcher, text: str
) -> dict[str, Any] | None:
    """Apply one client message; returns the reply (an error frame for a bad one), if any."""
    try:
        message = loads_json(text, "the message")
    except InvalidInput as exc:
        return {"type": "error", "message": f"messages must be JSON objects; {exc}"}
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return {"type": "error", "message": 'messages need a string "type"'}
    kind = message["type"]
    try:
        if kind == "auth":
            token = message.get("token")
            async with hub.redis_slots:
                watcher.owner = await Auth.of(request).check(token if isinstance(token, str) else None)
            return {"type": "authenticated"}
        if kind == "subscribe":
            if watcher.owner is None:
                raise Unauthorized(
                    'authenticate first: send {"type": "auth", "token": ...} or an '
                    "Authorization header"
                )
            project = check_project(message.get("project"))
            resume = _check_resume(message.get("resume", {}))
            if project not in watcher.projects:
                if len(watcher.projects) >= MAX_PROJECTS_PER_SOCKET:
                    raise InvalidInput(
                        f"a socket may watch at most {MAX_PROJECTS_PER_SOCKET} projects"
                    )
                async with hub.redis_slots:
                    await hub.store.owned_project(project, watcher.owner)
            watcher.watch(project)
            ready = await hub.add(project, watcher)
            watcher.offer(Subscribe(project, resume, ready))
            return None
        if kind == "unsubscribe":
            project = check_project(message.get("project"))
            watcher.unwatch(project)
            await hub.remove(project, watcher)
            return None
        if kind == "ping":
            return {"type": "pong"}
    except InvalidInput as exc:
        return {"type": "error", "message": str(exc)}
    except NotFound as exc:
        return {"type": "error", "message": str(exc)}
    except (RedisError, OSError):
        log.warning("could not answer a %s message: Redis unavailable", kind)
        return {"type": "error", "message": f"{kind} failed: DeployHub's Redis is unavailable; try again"}
    return {
        "type": "error",
        "message": f"unknown message type {kind!r}; use auth, subscribe, unsubscribe or ping",
    }


async def _header_owner(hub: Hub, request: web.Request) -> str | None:
    """The token id of the request's Authorization header, if it holds a good one; else the
    client sends an auth message, and too many bad tokens shows at its first subscribe (4401)."""
    header = bearer(request.headers.get("Authorization"))
    if header is None:
        return None
    with contextlib.suppress(Unauthorized, TooManyAttempts, RedisError, OSError):
        async with hub.redis_slots:
            return await Auth.of(request).check(header)
    return None


def _reason(exc: Exception) -> bytes:
    return str(exc).encode()[:CLOSE_REASON_BYTES].decode(errors="ignore").encode()


def _check_resume(raw: object) -> dict[str, int]:
    if not isinstance(raw, dict) or len(raw) > MAX_RESUME:
        raise InvalidInput(f"resume must be an object of at most {MAX_RESUME} {{deployment id: last seq}}")
    resume = {}
    for dep_id, seq in raw.items():
        check_deployment_id(dep_id)
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
            raise InvalidInput(
                f"resume values must be non-negative integers up to {MAX_SEQ} (the last seq seen)"
            )
        resume[dep_id] = seq
    return resume


@long_lived
async def websocket_handler(request: web.Request) -> web.StreamResponse:
    # long_lived: the API's error middleware does not wrap this handler (its frame would wait
    # with every idle socket), so a refusal before the upgrade becomes its JSON error here.
    try:
        hub = request.config_dict[HUB]
        # No permessage-deflate: it would compress every frame once per socket (its context is
        # per connection), the single largest cost of fanning one log out to many watchers.
        # The hub pings quiet sockets and drops dead ones (Hub.heartbeat), so no heartbeat=
        # here; pings and pongs come to this loop (autoping=False), and any message shows the
        # peer lives.
        ws = web.WebSocketResponse(autoping=False, max_msg_size=MAX_BODY, compress=False)
        stream = await ws.prepare(request)
    except Exception as exc:
        return error_response(request, exc)
    assert request.transport is not None  # prepare() fails on a closed connection
    watcher = Watcher(ws, request.transport, stream, hub.spawn_writer)
    watcher.owner = await _header_owner(hub, request)
    hub.sockets.add(watcher)
    try:
        # `await ws.receive()`, not `async for msg in ws`: the iterator's __anext__ would be one
        # more coroutine frame (216 bytes) waiting with every idle socket.
        while (msg := await ws.receive()).type not in _CLOSED:
            watcher.quiet = 0
            if msg.type == WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type == WSMsgType.TEXT:
                try:
                    reply = await handle_message(hub, request, watcher, msg.data)
                except Unauthorized as exc:
                    # The page reconnects with a token after 4401; nothing else is sent.
                    await ws.close(code=4401, message=_reason(exc))
                    break
                except TooManyAttempts as exc:
                    await ws.close(code=4429, message=_reason(exc))
                    break
                except Exception:
                    # A bug, not the client's fault; still end with a close frame, never a
                    # dropped connection the client cannot tell from a network failure.
                    log.exception("a WebSocket message failed")
                    await ws.close(code=1011, message=b"internal error; reconnect")
                    break
                if reply is not None:
                    watcher.offer(Reply(dumps(reply).encode()))
            elif msg.type == WSMsgType.BINARY:
                watcher.offer(Reply(dumps({"type": "error", "message": "send JSON text frames"}).encode()))
    finally:
        await watcher.close()
        hub.sockets.discard(watcher)
        for project in list(watcher.projects):
            await hub.remove(project, watcher)
    return ws


