"""The client side of the API, for the CLI: requests, saved credentials, and following a
deployment's log over the WebSocket (resuming after a dropped connection)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .status import Status

DEFAULT_SERVER = "http://127.0.0.1:8000"
REQUEST_TIMEOUT = 30.0
RECONNECT_BACKOFF = (0.5, 10.0)  # first and longest wait between reconnects
DRAIN_SECONDS = 1.0  # after the final status, how long to wait for the log's last lines


class ClientError(Exception):
    """A request that did not work; `code` is the CLI's exit code for it."""

    code = 1


class Unreachable(ClientError):
    code = 3


class AuthError(ClientError):
    code = 4


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "deployhub" / "credentials.json"


def saved() -> dict[str, Any]:
    try:
        data = json.loads(credentials_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_login(server: str, token: str) -> Path:
    """Remember `token` for `server` (and `server` as the default) in a 0600 file."""
    data = {"server": server, "tokens": {**_tokens(saved()), server: token}}
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path


def _tokens(data: dict[str, Any]) -> dict[str, Any]:
    tokens = data.get("tokens")
    return tokens if isinstance(tokens, dict) else {}


def resolve(server: str | None, token: str | None) -> tuple[str, str]:
    """The server and token to use: flags, then DEPLOYHUB_SERVER / DEPLOYHUB_TOKEN, then
    what `deployhub login` saved."""
    data = saved()
    server = (server or os.environ.get("DEPLOYHUB_SERVER") or str(data.get("server") or "")
              or DEFAULT_SERVER).rstrip("/")
    token = token or os.environ.get("DEPLOYHUB_TOKEN") or str(_tokens(data).get(server) or "")
    return server, token


class Client:
    """One session against one server."""

    def __init__(self, server: str, token: str) -> None:
        self.server = server
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self.session.request(method, self.server + path, json=body) as response:
                text = await response.text()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise Unreachable(f"cannot reach {self.server}: {exc or exc.__class__.__name__}") from None
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        if response.status < 400:
            return data
        message = data.get("error") if isinstance(data, dict) else None
        message = message or f"{response.status} {response.reason}"
        if response.status == 401:
            hint = "" if self.token else " (no token: run `deployhub login`, or pass --token)"
            raise AuthError(f"the server refused the token: {message}{hint}")
        if response.status >= 500:
            raise Unreachable(f"{self.server} answered {response.status}: {message}")
        raise ClientError(message)

    async def logs(self, dep_id: str, after: int = 0) -> list[dict[str, Any]]:
        try:
            async with self.session.get(f"{self.server}/api/deployments/{dep_id}/logs",
                                        params={"after": str(after)}) as response:
                if response.status >= 400:
                    await self.request("GET", f"/api/deployments/{dep_id}")  # raises the reason
                    raise ClientError(f"{response.status} {response.reason}")
                text = await response.text()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise Unreachable(f"cannot reach {self.server}: {exc or exc.__class__.__name__}") from None
        return [json.loads(line) for line in text.splitlines() if line.strip()]


Printer = Callable[[dict[str, Any]], None]  # a log event
StatusHook = Callable[[dict[str, Any]], None]  # a deployment whose status changed


class Follower:
    """Follows one deployment's log until it ends; after a dropped connection it resumes
    from the last seq it printed, so no line is lost or printed twice."""

    def __init__(self, client: Client, project: str, dep_id: str, *, on_event: Printer,
                 on_status: StatusHook, on_reconnect: Callable[[str], None]) -> None:
        self.client = client
        self.ws_url = client.server.replace("http", "ws", 1) + "/api/ws"
        self.project = project
        self.dep_id = dep_id
        self.last_seq = 0
        self.status = ""
        self.on_event = on_event
        self.on_status = on_status
        self.on_reconnect = on_reconnect

    async def run(self) -> dict[str, Any]:
        delay = RECONNECT_BACKOFF[0]
        while True:
            try:
                final = await self._watch()
                if final is not None:
                    return final
                self.on_reconnect("connection closed")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                self.on_reconnect(f"connection lost ({exc.__class__.__name__})")
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RECONNECT_BACKOFF[1])

    async def _watch(self) -> dict[str, Any] | None:
        async with self.client.session.ws_connect(self.ws_url, heartbeat=20) as ws:
            await ws.send_json({
                "type": "subscribe", "project": self.project, "resume": {self.dep_id: self.last_seq},
            })
            final: dict[str, Any] | None = None
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                kind = frame.get("type")
                if kind == "logs":
                    self._print(frame)
                elif kind == "subscribed":
                    for dep in frame["deployments"]:
                        if dep["id"] == self.dep_id:
                            final = self._status(dep)
                elif kind == "status" and frame["deployment"]["id"] == self.dep_id:
                    final = self._status(frame["deployment"])
                elif kind == "error":
                    # Our only message is the subscribe: an error means we cannot watch.
                    raise ClientError(frame["message"])
                if final is not None:
                    # The server sends the rest of the log before, or right after, the final
                    # status; read until it is all here.
                    await self._drain(ws)
                    return final
            if ws.close_code == 4401:
                raise AuthError("the server refused the token (--token, or `deployhub login`)")
            return None

    def _print(self, frame: dict[str, Any]) -> None:
        if frame.get("deployment") != self.dep_id:
            return
        for event in frame["events"]:
            if event["seq"] > self.last_seq:
                self.last_seq = event["seq"]
                self.on_event(event)

    def _status(self, dep: dict[str, Any]) -> dict[str, Any] | None:
        if dep["status"] != self.status:
            self.status = dep["status"]
            self.on_status(dep)
        return dep if Status(dep["status"]).final else None

    async def _drain(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            try:
                msg = await ws.receive(timeout=DRAIN_SECONDS)
            except asyncio.TimeoutError:
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            frame = json.loads(msg.data)
            if frame.get("type") == "logs":
                self._print(frame)
