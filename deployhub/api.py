"""REST API: deployments and projects. Every body is validated here, at the edge."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import importlib.metadata
import json
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from .auth import TooManyAttempts, Unauthorized, bearer, client_address
from .connections import REDIS, STORAGE, STORE, TOKENS
from .logs import read_events
from .redis_client import CONNECTION_ERRORS
from .runners import RUNNER
from .state import RESOLVER, SETTINGS
from .storage import build_cache_dir, build_cache_prefix, log_key
from .collector import Removed
from .secretbox import SecretUnreadable, secret_box
from .sites import SITES
from .store import Conflict, Credential, Deployment, NotFound, Project, ProjectTaken, Store, TooManyActive
from .validation import (
    COMMIT_RE,
    MAX_BODY,
    SETTING_NAMES,
    WEBHOOK_SECRET,
    InvalidInput,
    check_branch,
    check_commit,
    check_credential,
    check_deployment_id,
    check_fields,
    check_project,
    check_repo_url,
    check_query_int,
    check_settings,
    check_variables,
    loads_json,
    project_from_url,
)
from .views import deployment_json, project_json

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
# A GitHub push payload lists up to 20 commits with their files; 1 MiB holds that with room
# (GitHub caps deliveries at 25 MB; a larger one here is refused, not half read).
WEBHOOK_MAX_BODY = 1024 * 1024
RETRY_AFTER_SECONDS = 5  # what a client is told to wait while Redis is unreachable
LOG_CHUNK = 5000  # events read from Redis per round trip while streaming a log


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise InvalidInput(f"the request body is larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise InvalidInput(f"the request body is larger than {limit} bytes")
    return raw


async def read_json(request: web.Request) -> Any:
    return loads_json(await read_body(request))


_LONG_LIVED: set[Callable[..., Any]] = set()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def long_lived(handler: Handler) -> Handler:
    """Mark a handler that runs for a connection's lifetime (the WebSocket's): `api_errors`
    hands its coroutine on as it is, so no middleware frame stays suspended with each of
    thousands of idle sockets. Such a handler answers its own failures (`error_response`)."""
    _LONG_LIVED.add(handler)
    return handler


@web.middleware
def api_errors(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """The API's failures as JSON errors (`error_response`). A plain function: see `long_lived`."""
    if request.match_info.handler in _LONG_LIVED:
        return handler(request)
    return _api_errors(request, handler)


async def _api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return error_response(request, exc)


def error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The error response for a handler's failure `exc`; re-raises one the API does not answer."""
    if isinstance(exc, InvalidInput):
        return error(400, str(exc))
    if isinstance(exc, NotFound):
        return error(404, str(exc))
    if isinstance(exc, ProjectTaken):
        return error(409, str(exc))
    if isinstance(exc, TooManyActive):
        return error(429, str(exc))
    if isinstance(exc, SecretUnreadable):
        # The key changed under a stored secret: not a bug, and only setting it again helps.
        log.error("%s %s: %s", request.method, request.path, exc)
        return error(409, str(exc))
    if isinstance(exc, TooManyAttempts):
        response = error(429, str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, Unauthorized):
        response = error(401, str(exc))
        response.headers["WWW-Authenticate"] = 'Bearer realm="deployhub"'
        return response
    if isinstance(exc, web.HTTPException):
        # The router's own 404 and 405 (and aiohttp's other refusals) are text/plain; an API
        # client gets the one error shape every handler answers with.
        if exc.status < 400 or not request.path.startswith("/api/"):
            raise exc
        response = error(exc.status, _refusal(request, exc))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    if isinstance(exc, (RedisError, *CONNECTION_ERRORS)):
        # The pool has already retried with backoff: Redis is away (a restart, a failover).
        log.warning("%s %s: Redis unavailable: %s", request.method, request.path, exc)
        response = error(503, "DeployHub's database (Redis) is unreachable right now; "
                              f"try again in {RETRY_AFTER_SECONDS} s")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
    raise exc


def _refusal(request: web.Request, exc: web.HTTPException) -> str:
    path = request.path[:200]
    if exc.status == 404:
        return f"no API endpoint {path!r}; see /api/openapi.json"
    if exc.status == 405:
        return f"{request.method} is not allowed on {path}; use {exc.headers.get('Allow', '')}"
    return exc.text or exc.reason


def client_of(request: web.Request) -> str:
    """The address bad tokens are counted against (see auth.client_address)."""
    return client_address(
        request.remote, request.headers.get("X-Forwarded-For"),
        request.config_dict[SETTINGS].trusted_proxies,
    )


async def caller(request: web.Request) -> str:
    """The id of the token that signed the request; Unauthorized (or TooManyAttempts)
    otherwise."""
    return await request.config_dict[TOKENS].check(
        bearer(request.headers.get("Authorization")), client=client_of(request),
        max_failures=request.config_dict[SETTINGS].token_failures_per_minute,
    )


async def path_project(request: web.Request) -> Project:
    """The project the path names, when the caller's token owns it (404 otherwise)."""
    return await request.config_dict[STORE].owned_project(
        check_project(request.match_info["name"]), await caller(request)
    )


@routes.post("/api/deployments")
async def create_deployment(request: web.Request) -> web.Response:
    settings, store = request.config_dict[SETTINGS], request.config_dict[STORE]
    owner = await caller(request)
    if refused := request.config_dict[RUNNER].refused:
        return error(503, refused)
    body = check_fields(
        await read_json(request), required={"repo_url"},
        optional={"project", "branch", "commit", "settings", "trigger", "cache"},
    )
    trigger = _check_trigger(body.get("trigger"))
    cache = _check_cache(body.get("cache"))
    # Cheap checks first: the URL check may wait on DNS.
    project = check_project(body["project"]) if body.get("project") is not None else None
    branch = check_branch(body["branch"]) if body.get("branch") not in (None, "") else ""
    commit = check_commit(body["commit"]) if body.get("commit") is not None else ""
    overrides = check_settings(body["settings"], patch=False) if body.get("settings") is not None else {}
    repo = await check_repo_url(
        body["repo_url"], allow_hosts=settings.allow_hosts, resolver=request.config_dict[RESOLVER]
    )
    project = project or project_from_url(repo.url)
    chosen, _ = await store.get_settings(project)
    # The deployment's overrides win over the project's settings; null: detection decides.
    for name, value in overrides.items():
        if value is None:
            chosen.pop(name, None)
        else:
            chosen[name] = value
    # The branch is the deployment's own field, not one of its build settings.
    branch = branch or chosen.pop("branch", "")
    chosen.pop("branch", None)  # when the body named one
    dep = await _queue(request, project, repo.url, branch, owner, commit=commit, chosen=chosen,
                       trigger=trigger, cache=cache)
    return await _answer(request, dep, status=202)


async def _queue(
    request: web.Request, project: str, repo_url: str, branch: str, owner: str, *,
    commit: str, chosen: dict[str, str], trigger: str = "", cache: bool = True,
) -> Deployment:
    """Record a deployment (its settings fixed from now on) and hand it to the runner."""
    dep = await request.config_dict[STORE].create_deployment(
        project, repo_url, branch, owner,
        max_active=request.config_dict[SETTINGS].max_active_per_token,
        commit=commit, settings=chosen, trigger=trigger, cache=cache,
    )
    await request.config_dict[RUNNER].submit(dep)
    return dep


async def _answer(request: web.Request, dep: Deployment, status: int = 200) -> web.Response:
    store = request.config_dict[STORE]
    dep = await store.get_deployment(dep.id)  # read back: now with its place in the queue
    production = (await store.get_project(dep.project)).production
    return web.json_response(
        deployment_json(request.config_dict[SETTINGS], dep, production), status=status
    )


@routes.post("/api/deployments/{id}/redeploy")
async def redeploy(request: web.Request) -> web.Response:
    """A new deployment of the same repository, branch, commit and settings."""
    owner = await caller(request)
    if refused := request.config_dict[RUNNER].refused:
        return error(503, refused)
    raw = await read_body(request)
    body = check_fields(loads_json(raw), required=set(), optional={"trigger", "cache"}) if raw.strip() else {}
    trigger = _check_trigger(body.get("trigger"))
    cache = _check_cache(body.get("cache"))
    dep, _ = await request.config_dict[STORE].owned_deployment(
        check_deployment_id(request.match_info["id"]), owner
    )
    repo = await check_repo_url(
        dep.repo_url, allow_hosts=request.config_dict[SETTINGS].allow_hosts,
        resolver=request.config_dict[RESOLVER],
    )
    # The commit it built (or was asked to build). One recorded before commits were kept in
    # full ("<short sha> <subject>") cannot be fetched by SHA: the branch head is built then.
    commit = dep.commit if COMMIT_RE.fullmatch(dep.commit) else ""
    new = await _queue(request, dep.project, repo.url, dep.branch, owner, commit=commit,
                       chosen=dict(dep.settings), trigger=trigger, cache=cache)
    return await _answer(request, new, status=202)


@routes.get("/api/deployments/{id}")
async def get_deployment(request: web.Request) -> web.Response:
    settings, store = request.config_dict[SETTINGS], request.config_dict[STORE]
    dep, project = await store.owned_deployment(
        check_deployment_id(request.match_info["id"]), await caller(request)
    )
    return web.json_response(deployment_json(settings, dep, project.production))


@routes.post("/api/deployments/{id}/cancel")
async def cancel_deployment(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    dep, _ = await store.owned_deployment(
        check_deployment_id(request.match_info["id"]), await caller(request)
    )
    if dep.final or not await request.config_dict[RUNNER].cancel(dep, "Canceled by user."):
        dep = await store.get_deployment(dep.id)
        return error(409, f"deployment {dep.id} already ended ({dep.status})")
    return await _answer(request, dep)


@routes.get("/api/deployments/{id}/logs")
async def get_logs(request: web.Request) -> web.StreamResponse:
    redis = request.config_dict[REDIS]
    dep, _ = await request.config_dict[STORE].owned_deployment(
        check_deployment_id(request.match_info["id"]), await caller(request)
    )
    after = check_query_int(request.query.get("after", "0"), "after")
    events = await read_events(redis, dep.project, dep.id, after, LOG_CHUNK)  # before the headers go out
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson; charset=utf-8"})
    await response.prepare(request)
    if events or not dep.final:
        while events:
            await response.write(("\n".join(events) + "\n").encode())
            after = json.loads(events[-1])["seq"]
            events = await read_events(redis, dep.project, dep.id, after, LOG_CHUNK)
    else:
        # Redis has forgotten it (or never had it): the copy in storage is complete.
        stored = await request.config_dict[STORAGE].get_bytes(log_key(dep.id))
        for line in (stored or b"").splitlines():
            if line.strip() and json.loads(line)["seq"] > after:
                await response.write(line + b"\n")
    await response.write_eof()
    return response


@routes.get("/api/projects")
async def list_projects(request: web.Request) -> web.Response:
    settings, store = request.config_dict[SETTINGS], request.config_dict[STORE]
    projects = await store.list_projects(owner=await caller(request))
    # Each production deployment's summary (status, commit, age), all read in one pipeline.
    serving = {d.id: d for d in await store.get_deployments(p.production for p in projects if p.production)}
    return web.json_response({"projects": [
        {**project_json(settings, p), "production_deployment": (
            deployment_json(settings, serving[p.production], p.production)
            if p.production in serving else None)}
        for p in projects
    ]})


@routes.get("/api/projects/{name}")
async def get_project(request: web.Request) -> web.Response:
    project = await path_project(request)
    return web.json_response(project_json(request.config_dict[SETTINGS], project))


@routes.get("/api/projects/{name}/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    settings, store = request.config_dict[SETTINGS], request.config_dict[STORE]
    project = await path_project(request)
    deployments = await store.list_deployments(project.name)
    return web.json_response({
        "deployments": [deployment_json(settings, d, project.production) for d in deployments]
    })


@routes.post("/api/projects/{name}/rollback")
async def rollback(request: web.Request) -> web.Response:
    settings, store = request.config_dict[SETTINGS], request.config_dict[STORE]
    owner = await caller(request)
    name = check_project(request.match_info["name"])
    body = check_fields(await read_json(request), required={"deployment"}, optional=set())
    if not isinstance(body["deployment"], str):
        raise InvalidInput("deployment must be a deployment id string")
    dep_id = check_deployment_id(body["deployment"])
    await store.owned_project(name, owner)
    if not await store.promote(name, dep_id):
        return error(409, f"deployment {dep_id} is not ready, so it cannot serve the site")
    return web.json_response(project_json(settings, await store.get_project(name)))


def _variables_json(variables: dict[str, tuple[str | None, bool]]) -> dict[str, Any]:
    # A secret is write-only: once set, its value never leaves the server again (the store
    # does not even decrypt it for this).
    return {
        "variables": {
            name: {"value": None if secret else value, "secret": secret}
            for name, (value, secret) in sorted(variables.items())
        }
    }


@routes.get("/api/projects/{name}/variables")
async def get_variables(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    project = await path_project(request)
    return web.json_response(_variables_json(await store.list_variables(project.name)))


@routes.patch("/api/projects/{name}/variables")
async def set_variables(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    owner = await caller(request)
    name = check_project(request.match_info["name"])
    body = check_fields(await read_json(request), required={"variables"}, optional=set())
    variables = check_variables(body["variables"])
    project = await store.claim_project(name, owner)
    await store.set_build_variables(
        project.name, variables, secret_box(request.config_dict[SETTINGS])
    )
    return web.json_response(_variables_json(await store.list_variables(project.name)))


# -- the repository credential (write-only, like a secret variable) --------------------------


def _credential_json(credential: Credential | None) -> dict[str, Any]:
    return {"credential": None if credential is None else dataclasses.asdict(credential)}


@routes.get("/api/projects/{name}/credential")
async def get_credential(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    project = await path_project(request)
    return web.json_response(_credential_json(await store.get_credential(project.name)))


@routes.put("/api/projects/{name}/credential")
async def set_credential(request: web.Request) -> web.Response:
    """The token the clone of a private repository sends (HTTPS basic auth); only its last
    four characters are ever shown again."""
    store = request.config_dict[STORE]
    owner = await caller(request)
    name = check_project(request.match_info["name"])
    username, token = check_credential(await read_json(request))
    project = await store.claim_project(name, owner)
    credential = await store.set_credential(
        project.name, username, token, secret_box(request.config_dict[SETTINGS])
    )
    return web.json_response(_credential_json(credential))


@routes.delete("/api/projects/{name}/credential")
async def delete_credential(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    project = await path_project(request)
    await store.delete_credential(project.name)
    return web.json_response(_credential_json(None))


def _removed_json(removed: Removed) -> dict[str, Any]:
    return {"deleted": removed.deployments, "blobs_deleted": removed.blobs}


@routes.delete("/api/deployments/{id}")
async def delete_deployment(request: web.Request) -> web.Response:
    """The deployment, its log and its files (those no other deployment uses); 409 while it
    serves production or still builds."""
    dep, _ = await request.config_dict[STORE].owned_deployment(
        check_deployment_id(request.match_info["id"]), await caller(request)
    )
    try:
        removed = await request.config_dict[SITES].collector.delete_deployment(dep.project, dep.id)
    except Conflict as exc:
        return error(409, str(exc))
    return web.json_response(_removed_json(removed))


@routes.delete("/api/projects/{name}")
async def delete_project(request: web.Request) -> web.Response:
    """The project, its site, every deployment and its files; 409 while one still builds."""
    project = await path_project(request)
    try:
        removed = await request.config_dict[SITES].collector.delete_project(project.name)
    except Conflict as exc:
        return error(409, str(exc))
    await _forget_build_cache(request, project.name)
    return web.json_response(_removed_json(removed))


async def _forget_build_cache(request: web.Request, project: str) -> None:
    """A deleted project's build cache goes too: a later project of that name starts empty."""
    storage = request.config_dict[STORAGE]
    await storage.delete([key async for key in storage.list_keys(build_cache_prefix(project))])
    local = build_cache_dir(request.config_dict[SETTINGS].data_dir, project)
    await asyncio.to_thread(shutil.rmtree, local, ignore_errors=True)


# -- project settings -----------------------------------------------------------------------


async def _settings_json(store: Store, project: str) -> dict[str, Any]:
    chosen, has_secret = await store.get_settings(project)
    return {
        "settings": {name: chosen.get(name) for name in SETTING_NAMES},
        # Write-only, like a secret variable: whether there is one, never its value.
        "webhook_secret_set": has_secret,
    }


@routes.get("/api/projects/{name}/settings")
async def get_project_settings(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    project = await path_project(request)
    return web.json_response(await _settings_json(store, project.name))


@routes.patch("/api/projects/{name}/settings")
async def set_project_settings(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    owner = await caller(request)
    name = check_project(request.match_info["name"])
    changes = check_settings(await read_json(request), patch=True)
    generated = None
    if changes.get(WEBHOOK_SECRET) == "generate":
        generated = changes[WEBHOOK_SECRET] = secrets.token_hex(32)
    project = await store.claim_project(name, owner)
    await store.set_settings(project.name, changes, secret_box(request.config_dict[SETTINGS]))
    answer = await _settings_json(store, project.name)
    if generated is not None:
        answer[WEBHOOK_SECRET] = generated  # shown this once; set it in GitHub's webhook form
    return web.json_response(answer)


# -- GitHub push webhook --------------------------------------------------------------------


def _signed(secret: str, raw: bytes, header: str | None) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    given = (header or "").encode("utf-8", "backslashreplace")
    return hmac.compare_digest(expected.encode(), given)


def _same_repo(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        return url.rstrip("/").removesuffix(".git").lower()
    return bool(a) and norm(a) == norm(b)


def _ignored(reason: str) -> web.Response:
    return web.json_response({"deployed": False, "reason": reason}, status=202)


@routes.post("/api/hooks/github")
async def github_push(request: web.Request) -> web.Response:
    """A push to the project's branch deploys its `after` commit. The signature (HMAC-SHA256
    of the body with the project's webhook secret) is the authentication: no token."""
    store = request.config_dict[STORE]
    box = secret_box(request.config_dict[SETTINGS])
    raw = await read_body(request, WEBHOOK_MAX_BODY)
    signature = request.headers.get("X-Hub-Signature-256")
    unsigned = error(401, "X-Hub-Signature-256 is missing or does not match the webhook secret "
                          "of a project (set one with PATCH /api/projects/{name}/settings)")
    payload: Any = None
    if "project" in request.query:
        candidates = [check_project(request.query["project"])]
    else:
        payload = loads_json(raw, "the webhook payload")
        repository = payload.get("repository") if isinstance(payload, dict) else None
        clone_url = repository.get("clone_url") if isinstance(repository, dict) else None
        if not isinstance(clone_url, str):
            raise InvalidInput("the webhook payload has no repository.clone_url; add ?project=NAME")
        candidates = [p.name for p in await store.list_projects() if _same_repo(p.repo_url, clone_url)]
    project: Project | None = None
    unreadable: list[str] = []
    for name in candidates:
        try:
            secret = await store.webhook_secret(name, box)
        except SecretUnreadable as exc:
            log.error("webhook for %s: %s", name, exc)
            unreadable.append(name)
            continue
        if secret is not None and _signed(secret, raw, signature):
            project = await store.get_project(name)
            break
    if project is None and unreadable:
        # Not 401: no signature can match until the owner sets the secret again.
        return error(409, "the webhook secret stored for this repository cannot be decrypted "
                          "with this server's key (DEPLOYHUB_SECRETS_KEY or secrets.key changed); "
                          "the project's owner must set it again with PATCH "
                          "/api/projects/{name}/settings and update it in GitHub's webhook form")
    if project is None:
        return unsigned
    if payload is None:
        payload = loads_json(raw, "the webhook payload")
    event = request.headers.get("X-GitHub-Event", "")
    if event == "ping":
        return web.json_response({"ok": True, "project": project.name})
    if event != "push":
        return _ignored(f"a {event[:40]!r} event does not deploy; only push does")
    return await _push(request, project, payload)


async def _push(request: web.Request, project: Project, payload: Any) -> web.Response:
    store = request.config_dict[STORE]
    if not isinstance(payload, dict) or not isinstance(payload.get("ref"), str):
        raise InvalidInput("the push payload has no ref")
    chosen, _ = await store.get_settings(project.name)
    repository = payload.get("repository")
    default = repository.get("default_branch") if isinstance(repository, dict) else None
    branch = chosen.pop("branch", None) or (check_branch(default) if default else "")
    if not branch or payload["ref"] != f"refs/heads/{branch}":
        return _ignored(f"a push to {payload['ref'][:200]!r}, not to the project's branch {branch!r}")
    if payload.get("deleted") is True:
        return _ignored(f"the branch {branch} was deleted")
    commit = check_commit(payload.get("after"))
    repo_url = project.repo_url
    if not repo_url:  # claimed (settings first) but never deployed: the payload's URL, checked
        clone_url = repository.get("clone_url") if isinstance(repository, dict) else None
        repo_url = (await check_repo_url(
            clone_url, allow_hosts=request.config_dict[SETTINGS].allow_hosts,
            resolver=request.config_dict[RESOLVER],
        )).url
    if refused := request.config_dict[RUNNER].refused:
        return error(503, refused)
    dep = await _queue(request, project.name, repo_url, branch, project.owner, commit=commit,
                       chosen=chosen, trigger="webhook")
    # A newer push supersedes the older ones still waiting for a build slot.
    for older in await store.queued_of(project.name, branch):
        if older.id != dep.id and older.created_at <= dep.created_at:
            await request.config_dict[RUNNER].cancel(
                older, f"Superseded by a newer push to {branch} ({commit[:12]})."
            )
    return await _answer(request, dep, status=202)


# -- what the page shows about this server ----------------------------------------------------

TRIGGERS = ("page", "cli")  # what a client may say it is; "webhook" is the server's own


def _check_trigger(raw: object) -> str:
    if raw is None:
        return ""
    if raw not in TRIGGERS:
        raise InvalidInput(f"trigger must be one of {', '.join(map(repr, TRIGGERS))} (or absent)")
    return str(raw)


def _check_cache(raw: object) -> bool:
    if raw not in (None, True, False):
        raise InvalidInput("cache must be true or false (false: build without the build cache)")
    return raw is not False


def _version() -> str:
    try:
        return importlib.metadata.version("deployhub")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


@routes.get("/api/server")
async def server_info(request: web.Request) -> web.Response:
    """The version, the runner, and which build limits it could not enforce at start."""
    await caller(request)
    limits = request.config_dict[RUNNER].limits
    return web.json_response({
        "version": _version(),
        "runner": request.config_dict[SETTINGS].runner,
        "limits": {"enforced": not limits.missing, "missing": list(limits.missing),
                   "policy": limits.policy, "message": limits.message},
    })
