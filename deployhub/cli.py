"""`deployhub serve` runs the service; `deployhub deploy URL --follow` deploys from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from .settings import Settings, SettingsError, env_name, parse_value
from .status import Status

# After a restart every open page reconnects at once; aiohttp's default listen backlog (128)
# overflowed under a storm of 1,000 sockets and the kernel dropped connections. The kernel
# caps this at net.core.somaxconn.
LISTEN_BACKLOG = 2048


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except SettingsError as exc:
        print(f"deployhub: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deployhub", description="Deploy React apps from a Git URL.")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the server (page, API, WebSocket, sites)")
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        serve.add_argument(
            flag, dest=field.name, default=None, metavar=field.name.upper(),
            help=f"{field.metadata['help']} [env {env_name(field.name)}]",
        )
    serve.set_defaults(run=serve_command)

    deploy = commands.add_parser("deploy", help="deploy a Git URL and optionally follow its log")
    deploy.add_argument("repo_url")
    deploy.add_argument("--project", help="project name (default: from the repository name)")
    deploy.add_argument("--branch", help="branch to build (default: the repository's default)")
    deploy.add_argument("--follow", "-f", action="store_true", help="print the log live until the end")
    deploy.add_argument(
        "--server", default="http://127.0.0.1:8000", help="DeployHub server URL [env DEPLOYHUB_SERVER]"
    )
    deploy.add_argument("--token", help="API token [env DEPLOYHUB_TOKEN]")
    deploy.set_defaults(run=deploy_command)

    rm = commands.add_parser(
        "rm", help="delete a project, or some of its deployments, with the files they alone use"
    )
    rm.add_argument("project")
    rm.add_argument("deployments", nargs="*", help="deployment ids (default: the whole project)")
    rm.add_argument(
        "--server", default="http://127.0.0.1:8000", help="DeployHub server URL [env DEPLOYHUB_SERVER]"
    )
    rm.add_argument("--token", help="API token [env DEPLOYHUB_TOKEN]")
    rm.set_defaults(run=rm_command)

    token = commands.add_parser("token", help="create, list or revoke API tokens")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("name_or_id", nargs="?", help="a name for create, the token id for revoke")
    token.add_argument("--data-dir", dest="data_dir", default=None, help="[env DEPLOYHUB_DATA_DIR]")
    token.add_argument("--redis-url", dest="redis_url", default=None, help="[env DEPLOYHUB_REDIS_URL]")
    token.set_defaults(run=token_command)
    return parser


def serve_command(args: argparse.Namespace) -> int:
    from .app import create_app
    from .embedded_redis import EmbeddedRedisError

    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name)
        if value is not None:
            overrides[field.name] = parse_value(field, value, "--" + field.name.replace("_", "-"))
    settings = Settings.from_env(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    print(f"DeployHub on http://{settings.host}:{settings.port}/  (data in {settings.data_dir})", flush=True)
    app = create_app(settings)
    app.on_startup.append(_first_login)
    try:
        web.run_app(
            app, host=settings.host, port=settings.port, print=None, backlog=LISTEN_BACKLOG
        )
    except EmbeddedRedisError as exc:
        print(f"deployhub: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"deployhub: could not listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


async def _first_login(app: web.Application) -> None:
    """With no token yet, make one and print a login link (as Jupyter does)."""
    from .connections import get_tokens
    from .state import get_settings

    tokens, settings = get_tokens(app), get_settings(app)
    if await tokens.count():
        return
    _, secret = await tokens.create("first login")
    base = f"http://{settings.host}:{settings.port}/"
    print(
        f"\nNo API token existed, so one was made. Open this link to sign in (it is shown once):\n"
        f"    {base}#token={secret}\n"
        f"Use the same token with `deployhub deploy --token` or DEPLOYHUB_TOKEN.\n",
        flush=True,
    )


def token_command(args: argparse.Namespace) -> int:
    overrides = {k: v for k in ("data_dir", "redis_url") if (v := getattr(args, k)) is not None}
    settings = Settings.from_env(**overrides)
    return asyncio.run(_token(settings, args.action, args.name_or_id))


async def _token(settings: Settings, action: str, arg: str | None) -> int:
    import contextlib

    from redis.asyncio import Redis

    from .auth import Tokens
    from .embedded_redis import embedded_redis, running_url
    from .validation import InvalidInput

    async with contextlib.AsyncExitStack() as stack:
        url = settings.redis_url or running_url(settings.data_dir)
        if url is None:  # no server running on this data directory: start its Redis briefly
            url = await stack.enter_async_context(embedded_redis(settings.data_dir))
        redis = Redis.from_url(url.reveal(), decode_responses=True)
        stack.push_async_callback(redis.aclose)
        tokens = Tokens(redis)
        if action == "create":
            try:
                token, secret = await tokens.create(arg or "cli")
            except InvalidInput as exc:
                print(f"deployhub: {exc}", file=sys.stderr)
                return 2
            print(f"Token {token.id} ({token.name}). Shown once, keep it safe:\n{secret}")
        elif action == "list":
            for token in await tokens.list():
                print(f"{token.id}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(token.created_at))}  {token.name}")
        elif not arg:
            print("deployhub: token revoke needs the token id (see `deployhub token list`)", file=sys.stderr)
            return 2
        elif not await tokens.revoke(arg):
            print(f"deployhub: no token with id {arg!r}", file=sys.stderr)
            return 1
        else:
            print(f"Revoked {arg}")
    return 0


# -- deploy --------------------------------------------------------------------------------


def deploy_command(args: argparse.Namespace) -> int:
    server = os.environ.get("DEPLOYHUB_SERVER", args.server) if args.server == "http://127.0.0.1:8000" else args.server
    token = args.token or os.environ.get("DEPLOYHUB_TOKEN", "")
    body = {"repo_url": args.repo_url}
    if args.project:
        body["project"] = args.project
    if args.branch:
        body["branch"] = args.branch
    return asyncio.run(deploy(server.rstrip("/"), body, args.follow, token))


async def deploy(server: str, body: dict[str, str], follow: bool, token: str = "") -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        try:
            async with session.post(f"{server}/api/deployments", json=body) as response:
                data = await response.json(content_type=None)
        except aiohttp.ClientError as exc:
            print(f"deployhub: cannot reach {server}: {exc}", file=sys.stderr)
            return 1
        if response.status != 202:
            print(f"deployhub: {data.get('error', response.reason)}", file=sys.stderr)
            return 1
        print(f"Deployment {data['id']} of {data['project']} queued", flush=True)
        if not follow:
            print(data["deployment_url"])
            return 0
        final = await Follower(session, server, data["project"], data["id"]).run()
    if final["status"] == Status.READY:
        print(f"Ready: {final['url']}  (this deployment: {final['deployment_url']})", flush=True)
        return 0
    if final["status"] == "error":
        print(f"deployhub: {final['reason']}", file=sys.stderr, flush=True)
        return 1
    print(f"Deployment {final['status']}: {final.get('reason', '')}", file=sys.stderr, flush=True)
    return 1


def rm_command(args: argparse.Namespace) -> int:
    server = os.environ.get("DEPLOYHUB_SERVER", args.server) if args.server == "http://127.0.0.1:8000" else args.server
    token = args.token or os.environ.get("DEPLOYHUB_TOKEN", "")
    paths = [f"/api/deployments/{d}" for d in args.deployments] or [f"/api/projects/{args.project}"]
    return asyncio.run(remove(server.rstrip("/"), args.project, paths, token))


async def remove(server: str, project: str, paths: list[str], token: str = "") -> int:
    """DELETE each path in turn; stops at the first refusal, with the server's reason."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        for path in paths:
            try:
                if path.startswith("/api/deployments/"):
                    async with session.get(server + path) as response:
                        data = await response.json(content_type=None)
                    if response.status == 200 and data["project"] != project:
                        print(f"deployhub: deployment {data['id']} belongs to {data['project']}, "
                              f"not {project}", file=sys.stderr)
                        return 1
                async with session.delete(server + path) as response:
                    data = await response.json(content_type=None)
            except aiohttp.ClientError as exc:
                print(f"deployhub: cannot reach {server}: {exc}", file=sys.stderr)
                return 1
            if response.status != 200:
                print(f"deployhub: {data.get('error', response.reason)}", file=sys.stderr)
                return 1
            print(f"Deleted {', '.join(data['deleted']) or 'no deployments'} "
                  f"({data['blobs_deleted']} stored files no longer used)")
    return 0


class Follower:
    """Prints one deployment's log; after a dropped connection it resumes from the last seq."""

    def __init__(self, session: aiohttp.ClientSession, server: str, project: str, dep_id: str) -> None:
        self.session = session
        self.ws_url = server.replace("http", "ws", 1) + "/api/ws"
        self.project = project
        self.dep_id = dep_id
        self.last_seq = 0
        self.status = ""

    async def run(self) -> dict[str, Any]:
        delay = 0.5
        while True:
            try:
                final = await self._watch()
                if final is not None:
                    return final
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                print(f"[deployhub] connection lost ({exc.__class__.__name__}); reconnecting", file=sys.stderr, flush=True)
            else:
                print("[deployhub] connection closed; reconnecting", file=sys.stderr, flush=True)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)

    async def _watch(self) -> dict[str, Any] | None:
        async with self.session.ws_connect(self.ws_url, heartbeat=20) as ws:
            await ws.send_json({
                "type": "subscribe", "project": self.project, "resume": {self.dep_id: self.last_seq},
            })
            final: dict[str, Any] | None = None
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                kind = frame.get("type")
                if kind == "logs" and frame["deployment"] == self.dep_id:
                    for event in frame["events"]:
                        if event["seq"] > self.last_seq:
                            self.last_seq = event["seq"]
                            out = sys.stderr if event["stream"] == "stderr" else sys.stdout
                            print(event["text"], file=out, flush=True)
                elif kind == "subscribed":
                    for dep in frame["deployments"]:
                        if dep["id"] == self.dep_id:
                            final = self._status(dep)
                elif kind == "status" and frame["deployment"]["id"] == self.dep_id:
                    final = self._status(frame["deployment"])
                elif kind == "error":
                    # Our only message is the subscribe: an error means we cannot watch.
                    return {"status": "error", "reason": frame["message"]}
                if final is not None:
                    # The server sends the rest of the log before, or right after, the final
                    # status; read until it is all here.
                    await self._drain(ws, final)
                    return final
            if ws.close_code == 4401:
                return {"status": "error", "reason": "the server refused the token (--token)"}
            return None

    def _status(self, dep: dict[str, Any]) -> dict[str, Any] | None:
        if dep["status"] != self.status:
            self.status = dep["status"]
            print(f"[deployhub] {self.status}", file=sys.stderr, flush=True)
        return dep if Status(dep["status"]).final else None

    async def _drain(self, ws: aiohttp.ClientWebSocketResponse, final: dict[str, Any]) -> None:
        while True:
            try:
                msg = await ws.receive(timeout=1.0)
            except asyncio.TimeoutError:
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            frame = json.loads(msg.data)
            if frame.get("type") == "logs" and frame["deployment"] == self.dep_id:
                for event in frame["events"]:
                    if event["seq"] > self.last_seq:
                        self.last_seq = event["seq"]
                        out = sys.stderr if event["stream"] == "stderr" else sys.stdout
                        print(event["text"], file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
