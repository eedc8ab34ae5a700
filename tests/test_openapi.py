"""The API document against the real app: every route is in it, it is valid OpenAPI 3.1, and
schemathesis finds the running server's answers as the document says."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import schemathesis
from aiohttp import web
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deployhub import Settings, create_app
from deployhub.openapi import document
from deployhub.validation import InvalidInput, check_deployment_id, check_project
from tests.support.infra import GitServer, RedisServer, unique_name
from tests.support.service import Service, Watch, make_settings

DOCUMENTED_PREFIXES = ("/api/", "/healthz", "/readyz", "/metrics")
# Documented already, built by other branches; each must be a route once they are merged.
ELSEWHERE = {("GET", "/api/server")}


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of the app's API and operations routes; aiohttp adds HEAD to every GET
    by itself, so HEAD is left out."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
        and route.resource.canonical.startswith(DOCUMENTED_PREFIXES)
    }


def documented() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, operations in document()["paths"].items()
            for method in operations}


def test_every_route_is_documented_with_its_methods(tmp_path: Path) -> None:
    routes = routes_of(create_app(Settings.from_env({}, data_dir=tmp_path)))
    assert ("GET", "/api/openapi.json") in routes and len(routes) > 20
    assert routes - documented() == set()
    assert documented() - routes <= ELSEWHERE  # nothing documented that no branch builds


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    validate(doc)  # the OpenAPI 3.1 meta-schema, and every schema in it as JSON Schema 2020-12
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert schemathesis.openapi.from_dict(doc).statistic.operations.total == len(documented())


async def test_it_is_served_without_a_token(service: Service) -> None:
    async with service.http.get(service.url + "/api/openapi.json", headers={"Authorization": ""}) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert await r.json() == json.loads(json.dumps(document()))


async def test_unknown_api_paths_and_methods_answer_the_json_error_shape(service: Service) -> None:
    async with service.http.get(service.url + "/api/nope") as r:
        assert r.status == 404 and "/api/openapi.json" in (await r.json())["error"]
    async with service.http.put(service.url + "/api/projects") as r:
        assert r.status == 405 and "GET" in r.headers["Allow"]
        assert (await r.json())["error"].startswith("PUT is not allowed on /api/projects")


def validator(name: str) -> jsonschema.Draft202012Validator:
    """Checks an instance against one of the document's schemas."""
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document()["components"]}
    )


async def test_real_websocket_frames_match_the_message_schemas(
    service: Service, git_server: GitServer
) -> None:
    project = unique_name("ws")
    dep = await service.deploy(git_server.url_for(unique_name("missing")), project=project)
    validator("Deployment").validate(dep)  # the 202, which the fuzzer reaches only by luck
    watch = await Watch(service).open(project, token=service.token)
    await watch.wait_status(dep["id"], "failed")
    assert watch.ws is not None
    for message in ({"type": "ping"}, {"type": "subscribe", "project": "-"}, {"type": "nope"}):
        await watch.ws.send_json(message)
    await watch.wait_for(lambda: [f["type"] for f in watch.frames].count("error") == 2)
    await watch.close()
    kinds = {frame["type"] for frame in watch.frames}
    assert {"authenticated", "subscribed", "status", "logs", "pong", "error"} <= kinds
    server_message = validator("ServerMessage")
    for frame in watch.frames:
        server_message.validate(frame)
    with pytest.raises(jsonschema.ValidationError):
        server_message.validate({"type": "logs", "project": project, "events": []})  # no deployment


# -- schemathesis against a running server ---------------------------------------------------


async def loopback_only(host: str, port: int) -> list[str]:
    """Every name is this machine: a fuzzed repo_url is refused as non-public unless its host
    is the allowed 127.0.0.1, so nothing the fuzzer writes can make a clone leave loopback."""
    return ["127.0.0.1"]


class ThreadedService:
    """The real app on a real port, run by an event loop in a thread of its own, so that a
    synchronous client (schemathesis calls with requests) can talk to it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings, resolver=loopback_only)
        self.started = threading.Event()
        self.failure: BaseException | None = None
        self.url = self.token = ""
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        service = Service(self.app, self.settings)
        try:
            await service.start()
            self.url, self.token = service.url, service.token
            self.started.set()
            await self.stopping.wait()
        except BaseException as exc:
            self.failure = exc
            self.started.set()
        finally:
            await service.stop()

    def __enter__(self) -> ThreadedService:
        self.thread.start()
        assert self.started.wait(30), "the server did not start"
        if self.failure is not None:
            raise self.failure
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)


def call(server: ThreadedService, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        server.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def running(redis_server: RedisServer, tmp_path: Path) -> Iterator[ThreadedService]:
    with ThreadedService(make_settings(tmp_path / "data", redis_server.url)) as server:
        yield server


def failed_deployment(server: ThreadedService, git_server: GitServer) -> dict[str, str]:
    dep = call(server, "POST", "/api/deployments", {
        "repo_url": git_server.url_for("no-such-repo"), "project": unique_name("seed"),
    })
    deadline = time.monotonic() + 30
    while call(server, "GET", f"/api/deployments/{dep['id']}")["status"] != "failed":
        assert time.monotonic() < deadline, "the seeded deployment did not fail"
        time.sleep(0.1)
    return {"id": dep["id"], "name": dep["project"]}


@pytest.fixture
def seeded(running: ThreadedService, git_server: GitServer) -> dict[str, dict[str, str]]:
    """Projects with a (failed) deployment, so that valid ids reach real records: one to
    delete, one for the rest (which a delete would have taken away)."""
    return {"doomed": failed_deployment(running, git_server),
            "other": failed_deployment(running, git_server)}


DELETES = {"/api/deployments/{id}", "/api/projects/{name}"}  # with DELETE, the doomed record


@pytest.fixture
def api_schema(running: ThreadedService) -> Any:
    config = schemathesis.Config.from_dict({
        "base-url": running.url,
        "auth": {"openapi": {"bearerAuth": {"bearer": running.token}}},
        "generation": {"mode": "all", "max-examples": 10, "database": "none"},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        "request-timeout": 10,
    })
    return schemathesis.openapi.from_url(running.url + "/api/openapi.json", config=config)


@functools.cache
def served() -> set[tuple[str, str]]:
    """The routes of the app the server runs (they depend on the code, not the settings)."""
    return routes_of(create_app(Settings.from_env({}, data_dir=Path("/nonexistent"))))


def on_this_server(ctx: Any) -> bool:
    return (ctx.operation.method.upper(), ctx.operation.path) in served()


# Only what this server has (the endpoints other branches add join once merged); the
# WebSocket upgrade is not an HTTP exchange schemathesis can judge.
schema = schemathesis.pytest.from_fixture("api_schema").include(on_this_server).exclude(path="/api/ws")


def test_schemathesis_runs_every_operation_this_server_has() -> None:
    loaded = schemathesis.openapi.from_dict(document()).include(on_this_server).exclude(path="/api/ws")
    ran = {(op.ok().method.upper(), op.ok().path) for op in loaded.get_all_operations()}
    assert ran == served() - {("GET", "/api/ws")}


@pytest.mark.timeout(110)
@schema.parametrize()
def test_the_running_server_answers_as_documented(
    case: schemathesis.Case, git_server: GitServer, seeded: dict[str, dict[str, str]]
) -> None:
    # A well-formed id or name (a positive case) names the seeded record, so that the
    # answers of real records are checked too; malformed ones stay as generated.
    for key, check in (("id", check_deployment_id), ("name", check_project)):
        value = (case.path_parameters or {}).get(key)
        with contextlib.suppress(InvalidInput, TypeError):
            check(value)
            doomed = case.method.upper() == "DELETE" and case.operation.path in DELETES
            case.path_parameters[key] = seeded["doomed" if doomed else "other"][key]
    if case.operation.path == "/api/deployments" and isinstance(case.body, dict):
        # A fuzzed URL that passes the checks can only be http(s)://127.0.0.1[:port]/...; that
        # and the document's example go to a repository the loopback git server does not
        # have: the deployment is queued (202) and fails at its clone.
        url = case.body.get("repo_url")
        try:
            host = urlsplit(url).hostname if isinstance(url, str) else None
        except ValueError:
            host = None
        if host in ("127.0.0.1", "github.com"):
            case.body["repo_url"] = git_server.url_for("no-such-repo")
    # Framing headers are the HTTP message's, not the API's: a fuzzed Transfer-Encoding next
    # to the body's Content-Length is refused by aiohttp's parser (400, text/plain) before
    # any handler runs.
    for name in [h for h in (case.headers or {}) if h.lower() in ("transfer-encoding", "content-length")]:
        del case.headers[name]
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                   content_type_conformance, response_schema_conformance])
