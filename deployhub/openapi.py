"""The API document: OpenAPI 3.1, served at `GET /api/openapi.json`.

Built as a plain dict so a new endpoint is one more entry in `_paths()`. Request and
response bodies are JSON Schema 2020-12 (what OpenAPI 3.1 uses). Response objects are open
(more fields may come); request bodies are closed, as the server refuses unknown fields.

The WebSocket `/api/ws` is the path `GET /api/ws` (the upgrade), described in words, with
its messages as `components.schemas` (`ClientMessage`, `ServerMessage`, one schema per
message type) and an `x-websocket` extension naming them, since OpenAPI has no WebSocket
object of its own.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .status import Status
from .validation import (
    COMMAND_MAX,
    CREDENTIAL_TOKEN_MAX,
    CREDENTIAL_TOKEN_MIN,
    CREDENTIAL_USERNAME,
    CREDENTIAL_USERNAME_MAX,
    DIRECTORY_MAX,
    MAX_BODY,
    MAX_RESUME,
    NODE_VERSION_MAX,
    PROJECT_MAX,
    SETTING_NAMES,
    WEBHOOK_SECRET_MAX,
    WEBHOOK_SECRET_MIN,
)

Schema = dict[str, Any]
VERSION = "0.1.0"


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict[str, Schema], required: list[str] | None = None, *,
        closed: bool = False, description: str = "") -> Schema:
    """An object schema; every property is required unless `required` says otherwise."""
    schema: Schema = {"type": "object", "properties": properties,
                      "required": list(properties) if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


STRING, NUMBER, INTEGER, BOOLEAN = ({"type": t} for t in ("string", "number", "integer", "boolean"))
TIME = {"type": "number", "description": "Unix time in seconds"}
PROJECT_NAME = {
    "type": "string", "minLength": 1, "maxLength": PROJECT_MAX,
    "pattern": "^[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z0-9]$",
    "description": "A DNS label: lowercase letters, digits and single hyphens.",
}
DEPLOYMENT_ID = {"type": "string", "pattern": "^[a-z0-9]{12}$",
                 "description": "12 lowercase letters and digits."}
COMMIT = {"type": "string", "pattern": "^[0-9a-fA-F]{40}$",
          "description": "A full 40-hex-digit commit SHA (a short one is refused)."}
BRANCH = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[A-Za-z0-9._/-]+$"}
DIRECTORY = {"type": "string", "maxLength": DIRECTORY_MAX,
             "description": "Relative to the repository; no '..', not absolute."}
COMMAND = {"type": "string", "minLength": 1,
           "description": f"Run as `sh -c` inside the build sandbox; at most {COMMAND_MAX} bytes."}
NODE_VERSION = {"type": "string", "maxLength": NODE_VERSION_MAX, "examples": ["20", ">=18 <21", "lts/*"]}
SETTING_SCHEMAS: dict[str, Schema] = {
    "branch": BRANCH, "root_directory": DIRECTORY, "install_command": COMMAND,
    "build_command": COMMAND, "output_directory": DIRECTORY, "node_version": NODE_VERSION,
}
assert tuple(SETTING_SCHEMAS) == SETTING_NAMES  # one place names the settings


def _schemas() -> dict[str, Schema]:
    event = obj({
        "seq": {"type": "integer", "minimum": 1, "description": "Counts from 1 per deployment."},
        "ts": TIME,
        "stream": {"enum": ["stdout", "stderr", "system"],
                   "description": "system: DeployHub's own lines, such as `$ npm ci`."},
        "text": STRING,
    }, description="One build log line.")
    deployment = obj({
        "id": DEPLOYMENT_ID, "project": PROJECT_NAME, "repo_url": STRING, "branch": STRING,
        "commit": nullable(STRING), "commit_message": nullable(STRING),
        "settings": {"type": "object", "additionalProperties": STRING,
                     "description": "The build settings fixed on this deployment."},
        "status": {"enum": [s.value for s in Status]},
        "reason": STRING, "created_at": TIME, "updated_at": TIME,
        "timestamps": {"type": "object", "additionalProperties": TIME,
                       "description": "When it entered each status."},
        "url": STRING, "deployment_url": STRING, "is_production": BOOLEAN,
        "queue_position": nullable({"type": "integer", "minimum": 0}),
        "trigger": nullable({"enum": ["page", "cli", "webhook"],
                             "description": "What asked for it; null: a plain API call."}),
        "cache": {"type": "boolean", "description": "false: built without the build cache."},
    }, description="`commit`: the SHA asked for (null: the branch head), then the one built. "
                   "`queue_position`: while queued, 1 for the next; 0 once starting; else null.")
    project = obj({"name": PROJECT_NAME, "repo_url": STRING, "production": nullable(DEPLOYMENT_ID),
                   "created_at": TIME, "url": STRING,
                   "production_deployment": nullable(ref("Deployment"))},
                  required=["name", "repo_url", "production", "created_at", "url"],
                  description="`production_deployment`: in the list answer only, what serves it.")
    settings_patch: Schema = {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "properties": {
            **{name: nullable(schema) for name, schema in SETTING_SCHEMAS.items()},
            "webhook_secret": {"anyOf": [
                {"const": "generate", "description": "Make one; the answer shows it once."},
                {"type": "string", "minLength": WEBHOOK_SECRET_MIN, "maxLength": WEBHOOK_SECRET_MAX,
                 "pattern": "^[!-~]+$", "description": "Printable ASCII without spaces."},
                {"type": "null"},
            ]},
        },
        "description": "Each named setting is set; null unsets it (detection decides).",
    }
    return {
        "Error": obj({"error": {"type": "string", "description": "What to fix."}}),
        "Deployment": deployment,
        "Project": project,
        "LogEvent": event,
        "DeploymentCreate": obj({
            "repo_url": {"type": "string", "examples": ["https://github.com/you/app.git"]},
            "project": PROJECT_NAME,
            "branch": nullable(BRANCH),
            "commit": nullable(COMMIT),
            "settings": nullable({
                "type": "object", "additionalProperties": False,
                "properties": {n: nullable(s) for n, s in SETTING_SCHEMAS.items()},
                "description": "Overrides of the project's settings for this deployment.",
            }),
            "cache": {"type": "boolean", "description": "false: build without the dependency cache."},
            "trigger": {"enum": ["page", "cli", "webhook"], "description": "Who started it."},
        }, required=["repo_url"], closed=True),
        "Projects": obj({"projects": {"type": "array", "items": ref("Project")}}),
        "Deployments": obj({"deployments": {"type": "array", "items": ref("Deployment")}}),
        "Removed": obj({"deleted": {"type": "array", "items": DEPLOYMENT_ID},
                        "blobs_deleted": {"type": "integer", "minimum": 0}}),
        "Rollback": obj({"deployment": DEPLOYMENT_ID}, closed=True),
        "Redeploy": obj({
            "cache": {"type": "boolean", "description": "false: build without the dependency cache."},
            "trigger": {"enum": ["page", "cli"], "description": "Who started it."},
        }, closed=True),
        "Variables": obj({"variables": {"type": "object", "additionalProperties": obj(
            {"value": nullable(STRING), "secret": BOOLEAN},
            description="A secret's value is always null.")}}),
        "VariablesPatch": obj({"variables": {
            "type": "object", "minProperties": 1, "maxProperties": 100,
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
            "additionalProperties": nullable(obj(
                {"value": STRING, "secret": BOOLEAN}, required=["value"], closed=True)),
        }}, closed=True),
        "Settings": obj({
            "settings": obj({name: nullable(STRING) for name in SETTING_NAMES}),
            "webhook_secret_set": BOOLEAN,
            "webhook_secret": {"type": "string", "description": 'Only in the answer to '
                               '{"webhook_secret": "generate"}: the new secret, shown once.'},
        }, required=["settings", "webhook_secret_set"]),
        "SettingsPatch": settings_patch,
        "Credential": obj({"credential": nullable(obj({
            "kind": {"const": "token"}, "username": STRING,
            "hint": {"type": "string", "description": "The token's last characters."},
            "updated_at": TIME,
        }))}),
        "CredentialPut": obj({
            "token": {"type": "string", "minLength": CREDENTIAL_TOKEN_MIN,
                      "maxLength": CREDENTIAL_TOKEN_MAX, "pattern": "^[!-~]+$",
                      "description": "Printable ASCII without spaces; stored encrypted."},
            "username": nullable({"type": "string", "maxLength": CREDENTIAL_USERNAME_MAX,
                                  "pattern": "^[!-9;-~]*$",
                                  "description": f"No ':'; empty or null: {CREDENTIAL_USERNAME}."}),
        }, required=["token"], closed=True),
        "Server": obj({
            "version": STRING,
            "runner": {"enum": ["local", "ecs"]},
            "limits": obj({
                "enforced": BOOLEAN, "missing": {"type": "array", "items": STRING},
                "policy": {"enum": ["run", "refuse"]}, "message": STRING,
            }, description="Whether this machine enforces the builds' memory and process limits."),
        }),
        "WebhookIgnored": obj({"deployed": {"const": False}, "reason": STRING}),
        "WebhookPing": obj({"ok": {"const": True}, "project": PROJECT_NAME}),
        "Health": obj({"status": {"const": "ok"}}),
        "Readiness": obj({"status": {"enum": ["ok", "unavailable"]},
                          "redis": STRING, "storage": STRING},
                         description='Each backend is "ok", or what failed.'),
        **_websocket_schemas(event),
    }


def _websocket_schemas(event: Schema) -> dict[str, Schema]:
    def message(kind: str, description: str, **fields: Schema) -> Schema:
        required = ["type", *(name for name in fields if name != "resume")]
        return obj({"type": {"const": kind}, **fields}, required=required, description=description)

    client = {
        "WsAuth": message("auth", 'Authenticate; answered {"type": "authenticated"}.',
                          token=STRING),
        "WsSubscribe": message(
            "subscribe", "Watch a project (at most 50 per socket).", project=PROJECT_NAME,
            resume={"type": "object", "maxProperties": MAX_RESUME,
                    "propertyNames": DEPLOYMENT_ID,
                    "additionalProperties": {"type": "integer", "minimum": 0},
                    "description": "{deployment id: last seq seen}: only what is newer is sent."}),
        "WsUnsubscribe": message("unsubscribe", "Stop watching a project.", project=PROJECT_NAME),
        "WsPing": message("ping", 'Answered {"type": "pong"}.'),
    }
    server = {
        "WsAuthenticated": message("authenticated", "The token of an auth message is good."),
        "WsPong": message("pong", "The answer to a ping."),
        "WsSubscribed": message("subscribed", "After a subscribe: the 20 newest deployments.",
                                project=PROJECT_NAME,
                                deployments={"type": "array", "items": ref("Deployment")}),
        "WsLogs": message("logs", "Log lines of one deployment: history first, then live; each "
                                  "seq exactly once and in order.",
                          project=PROJECT_NAME, deployment=DEPLOYMENT_ID,
                          events={"type": "array", "items": ref("LogEvent")}),
        "WsStatus": message("status", "A deployment changed status.", deployment=ref("Deployment")),
        "WsProduction": message("production", "A rollback or promote moved production.",
                                project=PROJECT_NAME, production=DEPLOYMENT_ID),
        "WsResync": message("resync", "The server lost Redis (or this socket fell far behind): "
                                      "fresh statuses and the missing lines follow."),
        "WsError": message("error", "A malformed or refused message; the socket stays usable.",
                           message=STRING),
    }
    return {
        **client, **server,
        "ClientMessage": {"oneOf": [ref(name) for name in client],
                          "description": f"A JSON text frame, at most {MAX_BODY} bytes."},
        "ServerMessage": {"oneOf": [ref(name) for name in server]},
    }


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> Schema:
    answer: Schema = {"description": description,
                      "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                               "schema": {"type": "integer"}}}
# The answers every route may give, by status: the body is always {"error": "..."}.
ERRORS: dict[str, Schema] = {
    "400": _json(ref("Error"), "Bad input: a malformed body, field or path parameter."),
    "401": _json(ref("Error"), "No token, or a wrong, expired or revoked one.",
                 {"WWW-Authenticate": {"schema": STRING}}),
    "404": _json(ref("Error"), "No such record, or it belongs to another token."),
    "409": _json(ref("Error"), "The request conflicts with the record's state."),
    "429": _json(ref("Error"), "Too many bad tokens from this address (with Retry-After), or "
                               "too many active deployments for this token.", RETRY_AFTER),
    "503": _json(ref("Error"), "Redis is unreachable (with Retry-After), or builds cannot run "
                               "on this server.", RETRY_AFTER),
}
AUTHED = ("400", "401", "429", "503")  # what any authenticated route may answer


def _op(summary: str, answers: dict[str, Schema], *, errors: tuple[str, ...] = AUTHED,
        body: Schema | None = None, body_required: bool = True,
        params: list[Schema] | None = None,
        public: bool = False, description: str = "", tag: str = "") -> Schema:
    operation: Schema = {
        "summary": summary,
        "operationId": "",  # filled in by _paths from the method and path
        "responses": {**answers, **{code: {"$ref": f"#/components/responses/E{code}"}
                                    for code in errors}},
    }
    if tag:
        operation["tags"] = [tag]
    if description:
        operation["description"] = description
    if body is not None:
        operation["requestBody"] = {"required": body_required,
                                    "content": {"application/json": {"schema": body}}}
    if params:
        operation["parameters"] = params
    if public:
        operation["security"] = []
    return operation


def _path_param(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


DEP = [_path_param("id", DEPLOYMENT_ID)]
PROJ = [_path_param("name", PROJECT_NAME)]


def _paths() -> dict[str, dict[str, Schema]]:
    deployment = _json(ref("Deployment"), "The deployment.")
    queued = {"202": _json(ref("Deployment"), "Queued.")}
    settings = _json(ref("Settings"), "The project's settings; unset ones are null.")
    credential = _json(ref("Credential"), "The project's private-repository credential, "
                                          "never its token.")
    return {
        "/api/deployments": {"post": _op(
            "Deploy a Git repository", queued, errors=(*AUTHED, "409"),
            body=ref("DeploymentCreate"), tag="deployments",
            description="`commit`: a full SHA, else the branch head. 409: the project belongs "
                        "to another token. 429: too many active deployments.",
        )},
        "/api/deployments/{id}": {
            "get": _op("A deployment", {"200": deployment}, errors=(*AUTHED, "404"), params=DEP,
                       tag="deployments"),
            "delete": _op("Delete a deployment and the files no other uses",
                          {"200": _json(ref("Removed"), "What was deleted.")},
                          errors=(*AUTHED, "404", "409"), params=DEP, tag="deployments",
                          description="409 while it serves production or still builds."),
        },
        "/api/deployments/{id}/cancel": {"post": _op(
            "Cancel a queued or running deployment", {"200": deployment},
            errors=(*AUTHED, "404", "409"), params=DEP, tag="deployments",
            description="409 when it already ended.",
        )},
        "/api/deployments/{id}/redeploy": {"post": _op(
            "Deploy the same repository, branch, commit and settings again", queued,
            errors=(*AUTHED, "404"), params=DEP, tag="deployments",
            body=ref("Redeploy"), body_required=False,
        )},
        "/api/deployments/{id}/logs": {"get": _op(
            "The deployment's log",
            {"200": {"description": "One LogEvent JSON object per line (NDJSON).",
                     "content": {"application/x-ndjson": {
                         "schema": {"type": "string", "description": "Lines of LogEvent."},
                         "x-item-schema": ref("LogEvent")}}}},
            errors=(*AUTHED, "404"), tag="deployments",
            params=[*DEP, {"name": "after", "in": "query", "required": False,
                           "description": "Only events with a greater seq.",
                           "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}}],
        )},
        "/api/projects": {"get": _op(
            "The token's projects", {"200": _json(ref("Projects"), "Projects.")},
            errors=("401", "429", "503"), tag="projects",
        )},
        "/api/projects/{name}": {
            "get": _op("A project", {"200": _json(ref("Project"), "The project.")},
                       errors=(*AUTHED, "404"), params=PROJ, tag="projects"),
            "delete": _op("Delete a project, its site and every deployment",
                          {"200": _json(ref("Removed"), "What was deleted.")},
                          errors=(*AUTHED, "404", "409"), params=PROJ, tag="projects",
                          description="409 while a deployment still builds."),
        },
        "/api/projects/{name}/deployments": {"get": _op(
            "The project's deployments, newest first",
            {"200": _json(ref("Deployments"), "Deployments.")},
            errors=(*AUTHED, "404"), params=PROJ, tag="projects",
        )},
        "/api/projects/{name}/rollback": {"post": _op(
            "Serve a ready deployment", {"200": _json(ref("Project"), "Production moved.")},
            errors=(*AUTHED, "404", "409"), params=PROJ, body=ref("Rollback"), tag="projects",
            description="409 unless that deployment is ready.",
        )},
        "/api/projects/{name}/variables": {
            "get": _op("Build variables", {"200": _json(ref("Variables"), "Variables.")},
                       errors=(*AUTHED, "404"), params=PROJ, tag="projects"),
            "patch": _op("Set or remove build variables",
                         {"200": _json(ref("Variables"), "The variables after the change.")},
                         errors=(*AUTHED, "409"), params=PROJ, body=ref("VariablesPatch"),
                         tag="projects",
                         description="null removes one. Works before the first deploy "
                                     "(claims the name; 409 when another token has it)."),
        },
        "/api/projects/{name}/settings": {
            "get": _op("Build settings", {"200": settings}, errors=(*AUTHED, "404"),
                       params=PROJ, tag="projects"),
            "patch": _op("Change build settings", {"200": settings}, errors=(*AUTHED, "409"),
                         params=PROJ, body=ref("SettingsPatch"), tag="projects",
                         description="null unsets one. Works before the first deploy."),
        },
        "/api/projects/{name}/credential": {
            "get": _op("The private-repository credential", {"200": credential},
                       errors=(*AUTHED, "404"), params=PROJ, tag="projects"),
            "put": _op("Set the private-repository credential", {"200": credential},
                       errors=(*AUTHED, "404", "409"), params=PROJ, body=ref("CredentialPut"),
                       tag="projects", description="The token is stored encrypted."),
            "delete": _op("Remove the private-repository credential", {"200": credential},
                          errors=(*AUTHED, "404"), params=PROJ, tag="projects"),
        },
        "/api/hooks/github": {"post": _op(
            "GitHub push webhook",
            {"200": _json(ref("WebhookPing"), "A ping event."),
             "202": _json({"oneOf": [ref("Deployment"), ref("WebhookIgnored")]},
                          "A push to the project's branch: its deployment; else why not.")},
            errors=("400", "401", "409", "429", "503"), public=True, tag="hooks",
            body={"type": "object", "description": "A GitHub webhook payload (at most 1 MiB)."},
            params=[
                {"name": "project", "in": "query", "required": False, "schema": PROJECT_NAME},
                {"name": "X-Hub-Signature-256", "in": "header", "required": False,
                 "description": "sha256=HMAC-SHA256 of the body with the project's webhook "
                                "secret: the authentication.", "schema": STRING},
                {"name": "X-GitHub-Event", "in": "header", "required": False, "schema": STRING},
            ],
            description="No token: the signature is checked against the webhook secret of "
                        "the project named by ?project=, else of the projects whose repo_url "
                        "is the payload's repository.clone_url.",
        )},
        "/api/server": {"get": _op(
            "This server", {"200": _json(ref("Server"), "Version, runner and build limits.")},
            errors=("401", "429", "503"), tag="server",
        )},
        "/api/openapi.json": {"get": _op(
            "This document", {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            errors=(), public=True, tag="server",
        )},
        "/api/ws": {"get": _op(
            "Live statuses and logs (WebSocket)",
            {"101": {"description": "Switching protocols: a WebSocket of JSON text frames."}},
            errors=(), tag="live",
            params=[{"name": "Upgrade", "in": "header", "required": True,
                     "schema": {"const": "websocket"}}],
            description=(
                "A WebSocket upgrade. The client sends `ClientMessage` frames, the server "
                "`ServerMessage` frames (see components.schemas and `x-websocket`). A token "
                "comes in an `auth` message (browsers cannot set headers on a WebSocket) or "
                "an `Authorization: Bearer` header on the upgrade. Close codes: 4401 a "
                "subscribe before authenticating or with a revoked token; 4429 too many bad "
                "tokens from this address; 1009 a frame over 64 KiB; 1007 a frame that is not "
                "UTF-8; 1011 an internal error."
            ),
        ) | {"security": [{}, {"bearerAuth": []}], "x-websocket": {
            "client": ref("ClientMessage"), "server": ref("ServerMessage"),
        }}},
        "/healthz": {"get": _op(
            "Liveness", {"200": _json(ref("Health"), "The process is up.")},
            errors=(), public=True, tag="operations",
        )},
        "/readyz": {"get": _op(
            "Readiness",
            {"200": _json(ref("Readiness"), "Redis and storage answer within 3 s."),
             "503": _json(ref("Readiness"), "One of them does not: take the replica out.")},
            errors=(), public=True, tag="operations",
        )},
        "/metrics": {"get": _op(
            "Prometheus metrics",
            {"200": {"description": "The Prometheus text format.",
                     "content": {"text/plain": {"schema": STRING}}}},
            errors=(), public=True, tag="operations",
        )},
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, a fresh dict each call."""
    paths = _paths()
    for path, operations in paths.items():
        for method, operation in operations.items():
            words = [w.strip("{}") for w in path.split("/") if w and w != "api"]
            operation["operationId"] = "_".join([method, *words]).replace(".", "_")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "DeployHub",
            "version": VERSION,
            "description": "Self-hosted deploys of React apps from a Git URL, with live build "
                           'logs. Errors are JSON `{"error": "what to fix"}` with a 4xx status '
                           "(or 503 while Redis is away, with Retry-After); so are an unknown "
                           "path under /api/ (404) and a method a path does not take (405, "
                           "with Allow).",
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer", "bearerFormat": "dh_...",
                "description": "A token from `deployhub token create` or the first start's login link.",
            }},
            "responses": {f"E{code}": answer for code, answer in ERRORS.items()},
            "schemas": _schemas(),
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())
