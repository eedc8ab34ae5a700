"""The `deployhub` command: `serve` and `token` run on the server's machine; `deploy`, `logs`,
`ls`, `rollback`, `cancel` and `login` talk to a server through its API."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .client import DEFAULT_SERVER, Client, ClientError, Follower, resolve, save_login
from .console import Output, age, commit_label, error
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
    # Set by the --workers supervisor for each process it starts; names its builds' leases.
    serve.add_argument("--instance", default="", help=argparse.SUPPRESS)
    serve.set_defaults(run=serve_command)

    remote = argparse.ArgumentParser(add_help=False)  # what every client command takes
    remote.add_argument("--server", help=f"DeployHub server URL [env DEPLOYHUB_SERVER; default "
                                         f"the one `deployhub login` saved, else {DEFAULT_SERVER}]")
    remote.add_argument("--token", help="API token [env DEPLOYHUB_TOKEN; default the one "
                                        "`deployhub login` saved for the server]")
    remote.add_argument("--json", action="store_true", help="print JSON for scripts")

    deploy = commands.add_parser("deploy", parents=[remote],
                                 help="deploy a Git URL (or redeploy a project) and follow its log")
    deploy.add_argument("repo_url", nargs="?", help="the Git URL; omit it with --project to redeploy")
    deploy.add_argument("--project", help="project name (default: from the repository name)")
    deploy.add_argument("--branch", help="branch to build (default: the repository's default)")
    deploy.add_argument("--commit", type=full_sha, metavar="SHA",
                        help="build this commit: its full 40-hex SHA (`git rev-parse HEAD`); "
                             "default the branch head")
    deploy.add_argument("--follow", "-f", action="store_true", help="print the log live until the end")
    deploy.add_argument("--no-cache", action="store_true",
                        help="build without restoring the project's build cache (installed "
                             "dependencies, package manager caches)")
    deploy.set_defaults(run=remote_command(deploy_cmd))

    logs = commands.add_parser("logs", parents=[remote], help="print a deployment's log")
    logs.add_argument("deployment")
    logs.add_argument("--follow", "-f", action="store_true", help="then the live tail, until it ends")
    logs.set_defaults(run=remote_command(logs_cmd))

    ls = commands.add_parser("ls", parents=[remote], help="list projects, or a project's deployments")
    ls.add_argument("project", nargs="?")
    ls.set_defaults(run=remote_command(ls_cmd))

    rollback = commands.add_parser("rollback", parents=[remote],
                                   help="serve an earlier ready deployment (default: the one before)")
    rollback.add_argument("project")
    rollback.add_argument("deployment", nargs="?")
    rollback.set_defaults(run=remote_command(rollback_cmd))

    cancel = commands.add_parser("cancel", parents=[remote], help="cancel a queued or running deployment")
    cancel.add_argument("deployment")
    cancel.set_defaults(run=remote_command(cancel_cmd))

    login = commands.add_parser("login", parents=[remote],
                                help="check a token and save it (0600) for later commands")
    login.set_defaults(run=login_command)

    rm = commands.add_parser(
        "rm", parents=[remote],
        help="delete a project, or some of its deployments, with the files they alone use",
    )
    rm.add_argument("project")
    rm.add_argument("deployments", nargs="*", help="deployment ids (default: the whole project)")
    rm.set_defaults(run=remote_command(rm_cmd))

    project = commands.add_parser("project", help="show or change a project's build settings")
    actions = project.add_subparsers(dest="action", required=True, metavar="{show,set}")
    show = actions.add_parser("show", parents=[remote], help="print a project's build settings")
    show.add_argument("project")
    show.set_defaults(run=remote_command(project_show_cmd))
    change = actions.add_parser(
        "set", parents=[remote], help="change build settings: KEY=VALUE sets one, KEY= unsets it",
        epilog=f"Keys: {', '.join(SETTING_KEYS)}, webhook_secret (a secret, or `generate`: "
               "the new one is printed once). A setting left unset is detected at build time.",
    )
    change.add_argument("project")
    change.add_argument("settings", nargs="+", type=setting_pair, metavar="KEY=VALUE")
    change.set_defaults(run=remote_command(project_set_cmd))

    token = commands.add_parser("token", help="create, list or revoke API tokens")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("name_or_id", nargs="?", help="a name for create, the token id for revoke")
    token.add_argument(
        "--expires", default=None, metavar="DURATION",
        help="create: the token stops working after this long (90m, 12h, 30d, 2w); default never",
    )
    token.add_argument("--data-dir", dest="data_dir", default=None, help="[env DEPLOYHUB_DATA_DIR]")
    token.add_argument("--redis-url", dest="redis_url", default=None, help="[env DEPLOYHUB_REDIS_URL]")
    token.set_defaults(run=token_command)
    return parser


_SHA_RE = re.compile(r"[0-9a-fA-F]{40}")
# What `project set` and `project show` name; the server checks the values (and the names).
SETTING_KEYS = ("branch", "root_directory", "install_command", "build_command",
                "output_directory", "node_version")


def full_sha(text: str) -> str:
    if not _SHA_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a full commit SHA: give all 40 hex digits (`git rev-parse {text}`)"
        )
    return text.lower()


def setting_pair(text: str) -> tuple[str, str | None]:
    """KEY=VALUE -> (KEY, VALUE); KEY= -> (KEY, None), which unsets it."""
    key, equals, value = text.partition("=")
    if not equals or not re.fullmatch(r"[a-z_]+", key):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE (e.g. root_directory=frontend; root_directory= unsets it)"
        )
    return key, value or None


def serve_command(args: argparse.Namespace) -> int:
    from .app import create_app
    from .connections import StartupError
    from .embedded_redis import EmbeddedRedisError

    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name)
        if value is not None:
            overrides[field.name] = parse_value(field, value, "--" + field.name.replace("_", "-"))
    settings = Settings.from_env(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if settings.workers > 1:
            from .workers import supervise

            print(f"DeployHub on http://{settings.host}:{settings.port}/  ({settings.workers} "
                  f"processes, data in {settings.data_dir})", flush=True)
            return asyncio.run(supervise(settings))
        if not args.instance:
            print(f"DeployHub on http://{settings.host}:{settings.port}/  (data in {settings.data_dir})",
                  flush=True)
        loop = new_event_loop(settings)
        app = create_app(settings, instance=args.instance)
        app.on_startup.append(_first_login)
        web.run_app(
            app, host=settings.host, port=settings.port, print=None, backlog=LISTEN_BACKLOG,
            reuse_port=bool(args.instance),  # the --workers processes share the port
            loop=loop,
        )
    except (EmbeddedRedisError, StartupError) as exc:
        print(f"deployhub: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"deployhub: could not listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def new_event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    """The loop `serve` runs on: uvloop unless told otherwise or not installed. It runs the
    same asyncio code with its I/O and callbacks in C; a site's small file costs about 15%
    less CPU (bench/sites.py)."""
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise SettingsError("event_loop=uvloop, but uvloop is not installed "
                                    "(pip install uvloop, or DEPLOYHUB_EVENT_LOOP=asyncio)") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def _first_login(app: web.Application) -> None:
    """With no token yet, make one and print a login link (as Jupyter does)."""
    from .connections import get_tokens
    from .state import get_settings
    from .workers import first_login

    await first_login(get_tokens(app), get_settings(app))


def token_command(args: argparse.Namespace) -> int:
    overrides = {k: v for k in ("data_dir", "redis_url") if (v := getattr(args, k)) is not None}
    settings = Settings.from_env(**overrides)
    return asyncio.run(_token(settings, args.action, args.name_or_id, args.expires))


def _when(moment: float | None, never: str) -> str:
    return never if moment is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(moment))


async def _token(settings: Settings, action: str, arg: str | None, expires: str | None = None) -> int:
    import contextlib

    from .auth import Tokens, check_token_name, parse_duration
    from .embedded_redis import embedded_redis, running_url
    from .redis_client import connect_redis
    from .validation import InvalidInput

    try:  # before Redis: a bad name or expiry is the user's to fix, and needs no server
        if action == "create":
            check_token_name(arg or "cli")
        expires_in = parse_duration(expires) if expires is not None else None
    except InvalidInput as exc:
        print(f"deployhub: {exc}", file=sys.stderr)
        return 2
    if expires_in is not None and action != "create":
        print("deployhub: --expires goes with `token create`", file=sys.stderr)
        return 2
    async with contextlib.AsyncExitStack() as stack:
        url = settings.redis_url or running_url(settings.data_dir)
        if url is None:  # no server running on this data directory: start its Redis briefly
            url = await stack.enter_async_context(embedded_redis(settings.data_dir))
        redis = await connect_redis(url.reveal(), max_connections=4)
        stack.push_async_callback(redis.aclose)
        tokens = Tokens(redis)
        if action == "create":
            token, secret = await tokens.create(arg or "cli", expires_in)
            until = f", expires {_when(token.expires_at, '')}" if token.expires_at else ""
            print(f"Token {token.id} ({token.name}{until}). Shown once, keep it safe:\n{secret}")
        elif action == "list":
            now = time.time()
            print(f"{'ID':8}  {'CREATED':16}  {'EXPIRES':16}  {'LAST USED':16}  NAME")
            for token in await tokens.list():
                ends = "expired" if token.expired(now) else _when(token.expires_at, "never")
                print(f"{token.id:8}  {_when(token.created_at, '')}  {ends:16}  "
                      f"{_when(token.last_used_at, 'never'):16}  {token.name}")
        elif not arg:
            print("deployhub: token revoke needs the token id (see `deployhub token list`)", file=sys.stderr)
            return 2
        elif not await tokens.revoke(arg):
            print(f"deployhub: no token with id {arg!r}", file=sys.stderr)
            return 1
        else:
            print(f"Revoked {arg}")
    return 0


# -- client commands -------------------------------------------------------------------
# Exit codes: 0 done (a followed deployment is ready); 1 it failed or was canceled, or the
# server refused the request; 2 bad usage; 3 the server is unreachable (or answered 5xx);
# 4 no token, or the server refused it.

Command = Callable[[Client, argparse.Namespace, Output], Awaitable[int]]


def remote_command(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        server, token = resolve(args.server, args.token)
        output = Output(as_json=args.json)

        async def go() -> int:
            async with Client(server, token) as client:
                return await command(client, args, output)

        try:
            return asyncio.run(go())
        except ClientError as exc:
            error(str(exc))
            return exc.code
        finally:
            output.stop_progress()

    return run


async def deploy_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    body: dict[str, str | bool] = {"trigger": "cli"}
    if args.repo_url:
        body["repo_url"] = args.repo_url
    elif args.project:  # a redeploy: the project's repository, as it was deployed last
        body["repo_url"] = (await client.request("GET", f"/api/projects/{args.project}"))["repo_url"]
    else:
        raise ClientError("give the Git URL to deploy, or --project to redeploy a project")
    if args.project:
        body["project"] = args.project
    if args.branch:
        body["branch"] = args.branch
    if args.commit:
        body["commit"] = args.commit
    if args.no_cache:
        body["cache"] = False
    dep = await client.request("POST", "/api/deployments", body)
    what = f"Deployment {dep['id']} of {dep['project']}"
    if dep.get("commit"):
        what += f" at {commit_label(dep)}"
    if not args.follow:
        out.result(dep, f"{what} queued: {dep['deployment_url']}")
        return 0
    if not out.as_json:
        print(f"{what} queued", flush=True)
    return await follow(client, dep, out)


async def follow(client: Client, dep: dict[str, Any], out: Output) -> int:
    out.start_progress(dep)
    follower = Follower(client, dep["project"], dep["id"], on_event=out.event, on_status=out.status,
                        on_reconnect=lambda why: out.note(f"{why}; reconnecting"))
    final = await follower.run()
    out.stop_progress()
    if final["status"] == Status.READY:
        out.result(final, f"Ready: {final['url']}  (this deployment: {final['deployment_url']})")
        return 0
    if out.as_json:
        out.result(final, "")
    error(f"deployment {final['status']}: {final.get('reason', '')}")
    return 1


async def logs_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    dep = await client.request("GET", f"/api/deployments/{args.deployment}")
    if args.follow and not Status(dep["status"]).final:
        return await follow(client, dep, out)
    for event in await client.logs(dep["id"]):
        out.event(event)
    return 0


async def rm_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Delete a project (with its site and every deployment), or some of its deployments."""
    if not args.deployments:
        removed = await client.request("DELETE", f"/api/projects/{args.project}")
    else:
        removed = {"deleted": [], "blobs_deleted": 0}
        for dep_id in args.deployments:
            dep = await client.request("GET", f"/api/deployments/{dep_id}")
            if dep["project"] != args.project:
                raise ClientError(f"deployment {dep_id} belongs to {dep['project']}, not {args.project}")
            result = await client.request("DELETE", f"/api/deployments/{dep_id}")
            removed["deleted"] += result["deleted"]
            removed["blobs_deleted"] += result["blobs_deleted"]
    out.result(removed, f"Deleted {', '.join(removed['deleted']) or 'no deployments'} "
                        f"({removed['blobs_deleted']} stored files no longer used)")
    return 0


async def ls_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.project:
        data = await client.request("GET", f"/api/projects/{args.project}/deployments")
        rows = [[d["id"], d["status"] + (" (production)" if d["is_production"] else ""),
                 d.get("branch") or "-", commit_label(d), age(d["created_at"]), d["deployment_url"]]
                for d in data["deployments"]]
        out.table(data, ["DEPLOYMENT", "STATUS", "BRANCH", "COMMIT", "CREATED", "URL"], rows)
        return 0
    data = await client.request("GET", "/api/projects")
    rows = [[p["name"], p["production"] or "-", age(p["created_at"]), p["url"]] for p in data["projects"]]
    out.table(data, ["PROJECT", "PRODUCTION", "CREATED", "URL"], rows)
    return 0


async def rollback_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    target = args.deployment
    if target is None:  # the ready deployment before the one serving now
        project = await client.request("GET", f"/api/projects/{args.project}")
        deployments = (await client.request("GET", f"/api/projects/{args.project}/deployments"))["deployments"]
        older = [d for d in deployments if d["status"] == Status.READY
                 and d["created_at"] < next((x["created_at"] for x in deployments
                                             if x["id"] == project["production"]), float("inf"))]
        if not older:
            raise ClientError(f"{args.project} has no ready deployment older than the one it serves")
        target = older[0]["id"]
    project = await client.request("POST", f"/api/projects/{args.project}/rollback", {"deployment": target})
    out.result(project, f"{project['name']} now serves {project['production']}: {project['url']}")
    return 0


async def cancel_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    dep = await client.request("POST", f"/api/deployments/{args.deployment}/cancel", {})
    out.result(dep, f"Deployment {dep['id']} {dep['status']}")
    return 0


async def project_show_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    answer = await client.request("GET", f"/api/projects/{args.project}/settings")
    _print_settings(answer, out)
    return 0


async def project_set_cmd(client: Client, args: argparse.Namespace, out: Output) -> int:
    changes = dict(args.settings)  # the last KEY=VALUE of a key wins, as with flags
    answer = await client.request("PATCH", f"/api/projects/{args.project}/settings", changes)
    _print_settings(answer, out)
    if answer.get("webhook_secret") and not out.as_json:
        print(f"Webhook secret (shown once; paste it into GitHub's webhook form): "
              f"{answer['webhook_secret']}", flush=True)
    return 0


def _print_settings(answer: dict[str, Any], out: Output) -> None:
    rows = [[name, "(detected)" if value is None else value]
            for name, value in answer["settings"].items()]
    rows.append(["webhook_secret", "set" if answer.get("webhook_secret_set") else "(none)"])
    out.table(answer, ["SETTING", "VALUE"], rows)


def login_command(args: argparse.Namespace) -> int:
    server, token = resolve(args.server, args.token)
    if not token:
        token = getpass.getpass(f"Token for {server} (deployhub token create): ").strip()

    async def check() -> int:
        async with Client(server, token) as client:
            await client.request("GET", "/api/projects")
        return 0

    try:
        asyncio.run(check())
    except ClientError as exc:
        error(str(exc))
        return exc.code
    path = save_login(server, token)
    if args.json:
        print(json.dumps({"server": server, "saved": str(path)}))
    else:
        print(f"Logged in to {server}; the token is saved in {path} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
