"""REST API: deployments and projects. Every body is validated here, at the edge."""

from __future__ import annotations

import json
import logging
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
from .storage import log_key
from .collector import Removed
from .secretbox import secret_box
from .sites import SITES
from .store import Conflict, NotFound, ProjectTaken, TooManyActive
from .validation import (
    MAX_BODY,
    InvalidInput,
    check_branch,
    check_deployment_id,
    check_fields,
    check_project,
    check_repo_url,
    check_query_int,
    check_variables,
    loads_json,
    project_from_url,
)
from .views import deployment_json, project_json

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
RETRY_AFTER_SECONDS = 5  # what a client is told to wait while Redis is unreachable
LOG_CHUNK = 5000  # events read from Redis per round trip while streaming a log


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidInput(f"the request body is larger than {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise InvalidInput(f"the request body is larger than {MAX_BODY} bytes")
    return loads_json(raw)


@web.middleware
async def api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidInput as exc:
        return error(400, str(exc))
    except NotFound as exc:
        return error(404, str(exc))
    except ProjectTaken as exc:
        return error(409, str(exc))
    except TooManyActive as exc:
        return error(429, str(exc))
    except TooManyAttempts as exc:
        response = error(429, str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except Unauthorized as exc:
        response = error(401, str(exc))
        response.headers["WWW-Authenticate"] = 'Bearer realm="deployhub"'
        return response
    except (RedisError, *CONNECTION_ERRORS) as exc:
        # The pool has already retried with backoff: Redis is away (a restart, a failover).
        log.warning("%s %s: Redis unavailable: %s", request.method, request.path, exc)
        response = error(503, "DeployHub's database (Redis) is unreachable right now; "
                              f"try again in {RETRY_AFTER_SECONDS} s")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response


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


@routes.post("/api/deployments")
async def create_deployment(request: web.Request) -> web.Response:
    settings, store, runner = request.config_dict[SETTINGS], request.config_dict[STORE], request.config_dict[RUNNER]
    owner = await caller(request)
    if runner.refused:
        return error(503, runner.refused)
    body = check_fields(
        await read_json(request), required={"repo_url"}, optional={"project", "branch"}
    )
    # Cheap checks first: the URL check may wait on DNS.
    project = check_project(body["project"]) if body.get("project") is not None else None
    branch = check_branch(body["branch"]) if body.get("branch") not in (None, "") else ""
    repo = await check_repo_url(
        body["repo_url"], allow_hosts=settings.allow_hosts, resolver=request.config_dict[RESOLVER]
    )
    project = project or project_from_url(repo.url)
    dep = await store.create_deployment(
        project, repo.url, branch, owner, max_active=settings.max_active_per_token
    )
    await runner.submit(dep)
    dep = await store.get_deployment(dep.id)  # read back: now with its place in the queue
    production = (await store.get_project(project)).production
    return web.json_response(deployment_json(settings, dep, production), status=202)


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
    dep = await store.get_deployment(dep.id)
    production = (await store.get_project(dep.project)).production
    return web.json_response(deployment_json(request.config_dict[SETTINGS], dep, production))


@routes.get("/api/deployments/{id}/logs")
async def get_logs(request: web.Request) -> web.StreamResponse:
    redis = request.config_dict[REDIS]
    dep, _ = await request.config_dict[STORE].owned_deployment(
        check_deployment_id(request.match_info["id"]), await caller(request)
    )
    after = check_query_int(request.query.get("after", "0"), "after")
    events = await read_events(redis, dep.id, after, LOG_CHUNK)  # before the headers go out
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson; charset=utf-8"})
    await response.prepare(request)
    if events or not dep.final:
        while events:
            await response.write(("\n".join(events) + "\n").encode())
            after = json.loads(events[-1])["seq"]
            events = await read_events(redis, dep.id, after, LOG_CHUNK)
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
    return web.json_response({"projects": [project_json(settings, p) for p in projects]})


@routes.get("/api/projects/{name}")
async def get_project(request: web.Request) -> web.Response:
    settings, store = request.config_dict[SETTINGS], request.config_dict[STORE]
    project = await store.owned_project(
        check_project(request.match_info["name"]), await caller(request)
    )
    return web.json_response(project_json(settings, project))


@routes.get("/api/projects/{name}/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    settings, store = request.config_dict[SETTINGS], request.config_dict[STORE]
    project = await store.owned_project(
        check_project(request.match_info["name"]), await caller(request)
    )
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
    project = await store.owned_project(check_project(request.match_info["name"]), await caller(request))
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
    project = await request.config_dict[STORE].owned_project(
        check_project(request.match_info["name"]), await caller(request)
    )
    try:
        removed = await request.config_dict[SITES].collector.delete_project(project.name)
    except Conflict as exc:
        return error(409, str(exc))
    return web.json_response(_removed_json(removed))
