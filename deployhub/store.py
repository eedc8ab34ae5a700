"""Projects and deployments recorded in Redis; every state change is one atomic script."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, cast

from redis.asyncio import Redis

from . import keys
from .secretbox import SecretBox
from .status import FINAL, Status, lua_set
from .validation import WEBHOOK_SECRET

LEASE_SECONDS = 30
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# Upper bounds (seconds) of the phase-duration histogram kept for /metrics.
PHASE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800)

# Moves a deployment to a new status unless it is already final, records when, keeps the
# active set and the production pointer right, and publishes the new state, all in one step
# so watchers see states in the order they happened. The project's channel is an argument, not
# a key: it is in the project's hash tag (see keys.py), and a script's keys share one slot;
# a classic PUBLISH reaches its subscribers on every node of a cluster.
_TRANSITION = """
local FINAL = """ + lua_set(FINAL) + """
local dep, active, channel = KEYS[1], KEYS[2], ARGV[6]
local status, reason, now, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local current = redis.call('HGET', dep, 'status')
if not current then return -1 end
if FINAL[current] then return 0 end
-- Metrics for every replica's /metrics: how long the phase being left took, and how
-- deployments end (a histogram as cumulative bucket counts, a sum and a count).
local metrics = KEYS[5]
local started = tonumber(redis.call('HGET', dep, 't_' .. current) or '')
if started and current ~= status then
  local took = math.max(0, tonumber(now) - started)
  for _, bound in ipairs(""" + "{" + ", ".join(map(str, PHASE_BUCKETS)) + "}" + """) do
    if took <= bound then redis.call('HINCRBY', metrics, 'phase_le:' .. current .. ':' .. bound, 1) end
  end
  redis.call('HINCRBYFLOAT', metrics, 'phase_sum:' .. current, took)
  redis.call('HINCRBY', metrics, 'phase_count:' .. current, 1)
end
if FINAL[status] then redis.call('HINCRBY', metrics, 'final:' .. status, 1) end
redis.call('HSET', dep, 'status', status, 'updated_at', now, 't_' .. status, now)
if reason ~= '' then redis.call('HSET', dep, 'reason', reason) end
local project_key = KEYS[3]
if FINAL[status] then
  redis.call('SREM', active, id)
  redis.call('DEL', KEYS[4])
  -- An ended deployment leaves the shared queue and frees its build slot at once, so the
  -- next one starts without waiting for a slot lease to run out.
  redis.call('ZREM', KEYS[6], id)
  redis.call('HDEL', KEYS[9], id)
  if redis.call('ZREM', KEYS[7], id) == 1 then redis.call('PUBLISH', KEYS[8], '1') end
end
if status == '""" + Status.READY + """' then
  local production = redis.call('HGET', project_key, 'production')
  local newer = true
  if production then
    local theirs = tonumber(redis.call('HGET', ARGV[5] .. production, 'created_at') or '0')
    newer = tonumber(redis.call('HGET', dep, 'created_at')) >= theirs
  end
  if newer and production ~= id then
    redis.call('HSET', project_key, 'production', id)
    -- Every replica's site server drops its cached host -> deployment entry on this.
    redis.call('PUBLISH', '""" + keys.SITES_CHANNEL + """', cjson.encode({
      type = 'production', project = redis.call('HGET', dep, 'project'), production = id}))
  end
end
local fields = redis.call('HGETALL', dep)
local record = {}
for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end
local production = redis.call('HGET', project_key, 'production') or ''
redis.call('PUBLISH', channel, cjson.encode({type = 'status', deployment = record,
                                             production = production}))
return 1
"""

# Points a project's production at one of its ready deployments (rollback or promote).
_PROMOTE = """
local project_key, dep, channel = KEYS[1], KEYS[2], ARGV[3]
local fields = redis.call('HMGET', dep, 'project', 'status')
if fields[1] ~= ARGV[1] then return -1 end
if fields[2] ~= '""" + Status.READY + """' then return 0 end
redis.call('HSET', project_key, 'production', ARGV[2])
local event = cjson.encode({type = 'production', project = ARGV[1], production = ARGV[2]})
redis.call('PUBLISH', channel, event)
redis.call('PUBLISH', '""" + keys.SITES_CHANNEL + """', event)
return 1
"""

# Forgets one final, non-production deployment of a project, atomically with the check, so a
# rollback can never point production at a deployment whose files are being deleted. Its log
# stream is in the project's hash tag, not the records' (see keys.py): deleted just after.
_DELETE_DEPLOYMENT = """
local FINAL = """ + lua_set(FINAL) + """
local dep, project_key, project_deps, sites_channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local fields = redis.call('HMGET', dep, 'project', 'status')
if fields[1] ~= ARGV[1] then return -1 end
if not FINAL[fields[2]] then return -2 end
if redis.call('HGET', project_key, 'production') == ARGV[2] then return -3 end
redis.call('DEL', dep)
redis.call('ZREM', project_deps, ARGV[2])
redis.call('PUBLISH', sites_channel, cjson.encode({type = 'deleted', project = ARGV[1],
                                                   deployments = {ARGV[2]}}))
return 1
"""

# Forgets a project and all its deployments unless one is still building; returns the ids
# (their log streams, in the project's hash tag, are deleted just after).
_DELETE_PROJECT = """
local project_key, project_deps, env, projects, sites_channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local project_settings, credential = KEYS[6], KEYS[7]
local name, dep_prefix = ARGV[1], ARGV[2]
if redis.call('EXISTS', project_key) == 0 then return false end
local ids = redis.call('ZRANGE', project_deps, 0, -1)
local FINAL = """ + lua_set(FINAL) + """
for _, id in ipairs(ids) do
  local status = redis.call('HGET', dep_prefix .. id, 'status')
  if status and not FINAL[status] then return {'busy', id} end
end
local owner = redis.call('HGET', project_key, 'owner')
if owner then redis.call('SREM', ARGV[3] .. owner .. ARGV[4], name) end
for _, id in ipairs(ids) do redis.call('DEL', dep_prefix .. id) end
redis.call('DEL', project_key, project_deps, env, project_settings, credential)
redis.call('SREM', projects, name)
redis.call('PUBLISH', sites_channel, cjson.encode({type = 'production', project = name,
                                                   production = ''}))
if #ids > 0 then
  redis.call('PUBLISH', sites_channel, cjson.encode({type = 'deleted', project = name,
                                                     deployments = ids}))
end
return {'ok', unpack(ids)}
"""


# Records a new deployment, and its project the first time, unless another token owns it or
# the owner already has `limit` deployments queued or running. Counting inside the script
# makes the check and the insert one step: two concurrent creates cannot both take the last
# slot. It walks the active set (queued and running deployments of every token, a short list).
_CREATE = """
local dep, project, projects, project_deps, active, lease, owned = unpack(KEYS)
local owner, name, repo_url, now, id, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local limit, dep_prefix, project_prefix = tonumber(ARGV[7]), ARGV[8], ARGV[9]
local current = redis.call('HGET', project, 'owner')
if current and current ~= owner then return 0 end
if limit > 0 and owner ~= '' then
  local mine = 0
  for _, other in ipairs(redis.call('SMEMBERS', active)) do
    local of = redis.call('HGET', dep_prefix .. other, 'project')
    if of and redis.call('HGET', project_prefix .. of, 'owner') == owner then mine = mine + 1 end
  end
  if mine >= limit then return -2 end
end
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', dep, unpack(fields))
redis.call('HSETNX', project, 'created_at', now)
redis.call('HSET', project, 'name', name, 'repo_url', repo_url, 'owner', owner)
redis.call('SADD', projects, name)
redis.call('ZADD', project_deps, now, id)
redis.call('SADD', active, id)
redis.call('SET', lease, 'queued', 'EX', ttl)
redis.call('SADD', owned, name)
return 1
"""


_CLAIM = """
local project, projects, owned = KEYS[1], KEYS[2], KEYS[3]
local current = redis.call('HGET', project, 'owner')
if current then return current == ARGV[1] and 1 or 0 end
redis.call('HSET', project, 'name', ARGV[2], 'owner', ARGV[1], 'created_at', ARGV[3], 'repo_url', '')
redis.call('SADD', projects, ARGV[2])
redis.call('SADD', owned, ARGV[2])
return 1
"""


class NotFound(LookupError):
    pass


class ProjectTaken(Exception):
    pass


class TooManyActive(Exception):
    """The token already has as many deployments queued or running as it may."""


class Conflict(Exception):
    """The request cannot be done in the current state; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Deployment:
    id: str
    project: str
    repo_url: str
    branch: str
    status: Status
    reason: str
    created_at: float
    updated_at: float
    timestamps: dict[str, float]

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> Deployment:
        return cls(
            id=data["id"],
            project=data["project"],
            repo_url=data["repo_url"],
            branch=data.get("branch", ""),
            status=Status(data["status"]),
            reason=data.get("reason", ""),
            created_at=float(data["created_at"]),
            updated_at=float(data.get("updated_at", data["created_at"])),
            timestamps={
                name[2:]: float(value) for name, value in data.items() if name.startswith("t_")
            },
            commit=data.get("commit", ""),
            commit_message=data.get("commit_message", ""),
            settings=_settings(data.get("settings", "")),
            log_seq=int(data.get("log_seq") or 0),
            task_arn=data.get("task_arn", ""),
            trigger=data.get("trigger", ""),
            cache=data.get("cache", "1") != "0",
        )

    commit: str = ""  # the full SHA asked for (or ""), then the one cloned
    commit_message: str = ""  # its first line, once cloned
    # The project's settings merged with the deployment's overrides, as they were when it
    # was created: a later edit changes no queued build, and a redeploy reuses them.
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    log_seq: int = 0  # the last log seq, once the build has ended
    task_arn: str = ""  # the ECS task building it (runner=ecs), once started
    # What asked for it: "page" or "cli" (as the client says), "webhook"; "" for a bare API call.
    trigger: str = ""
    cache: bool = True  # False: built without restoring the build cache (`"cache": false`)
    # While queued: 1 = the next to start in the shared queue, 0 = it has a build slot and is
    # starting; None once it has left `queued` (or when read from a status frame).
    queue_position: int | None = None

    @property
    def final(self) -> bool:
        return self.status.final


@dataclasses.dataclass(frozen=True)
class Project:
    name: str
    repo_url: str
    created_at: float
    production: str
    owner: str = ""


@dataclasses.dataclass(frozen=True)
class Credential:
    """What anyone may know of a project's clone credential: never the secret itself."""

    kind: str  # "token": HTTPS basic auth with username and token
    username: str
    hint: str  # "…" and the secret's last 4 characters, to tell two tokens apart
    updated_at: float


def new_deployment_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


class Store:
    """Typed access to the records; the server and the worker share it.

    `redis` must decode responses (`decode_responses=True`): every value here is text, which
    the casts below state for the type checker (redis-py types replies as bytes | str).
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._transition = redis.register_script(_TRANSITION)
        self._promote = redis.register_script(_PROMOTE)
        self._create = redis.register_script(_CREATE)
        self._claim = redis.register_script(_CLAIM)
        self._delete_deployment = redis.register_script(_DELETE_DEPLOYMENT)
        self._delete_project = redis.register_script(_DELETE_PROJECT)

    async def create_deployment(
        self, project: str, repo_url: str, branch: str, owner: str = "", max_active: int = 0,
        *, commit: str = "", settings: dict[str, str] | None = None, trigger: str = "",
        cache: bool = True,
    ) -> Deployment:
        """A new queued deployment (of `commit`, or the branch head; built with `settings`);
        ProjectTaken if another token owns `project`, TooManyActive if `owner` already has
        `max_active` (0: no limit) queued or running."""
        dep_id = new_deployment_id()
        now = repr(time.time())
        record = {
            "id": dep_id, "project": project, "repo_url": repo_url, "branch": branch,
            "status": Status.QUEUED.value, "created_at": now, "updated_at": now, "t_queued": now,
        }
        if commit:
            record["commit"] = commit
        if settings:
            record["settings"] = dumps(settings)
        if trigger:
            record["trigger"] = trigger
        if not cache:
            record["cache"] = "0"
        fields = [item for pair in record.items() for item in pair]
        created = await self._create(
            keys=[
                keys.deployment(dep_id), keys.project(project), keys.PROJECTS,
                keys.project_deployments(project), keys.ACTIVE, keys.lease(dep_id),
                keys.token_projects(owner),
            ],
            args=[owner, project, repo_url, now, dep_id, LEASE_SECONDS, max_active,
                  keys.deployment(""), keys.project(""), *fields],
        )
        if created == -2:
            raise TooManyActive(
                f"this token already has {max_active} deployments queued or running, the most "
                "it may (DEPLOYHUB_MAX_ACTIVE_PER_TOKEN); wait for one to finish or cancel one"
            )
        if not created:
            raise ProjectTaken(
                f"the project name {project!r} is taken; choose another with \"project\""
            )
        return Deployment.from_hash(record)

    async def get_deployment(self, dep_id: str) -> Deployment:
        found = await self.get_deployments([dep_id])
        if not found:
            raise NotFound(f"no deployment {dep_id!r}")
        return found[0]

    async def get_deployments(self, ids: Iterable[str]) -> list[Deployment]:
        """The deployments that exist of `ids`, in order, with their queue positions."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for dep_id in ids:
                pipe.hgetall(keys.deployment(dep_id))
                pipe.zrank(keys.QUEUE, dep_id)
            replies = await pipe.execute()
        found = []
        for row, rank in zip(replies[0::2], replies[1::2]):
            if not row:
                continue
            dep = Deployment.from_hash(row)
            if dep.status == Status.QUEUED:
                dep = dataclasses.replace(dep, queue_position=0 if rank is None else int(rank) + 1)
            found.append(dep)
        return found

    async def get_project(self, name: str) -> Project:
        data = cast(dict[str, str], await self.redis.hgetall(keys.project(name)))
        if not data:
            raise NotFound(f"no project {name!r}")
        return _project(data)

    async def list_projects(self, owner: str | None = None) -> list[Project]:
        """Every project, or the ones `owner` owns."""
        key = keys.PROJECTS if owner is None else keys.token_projects(owner)
        names = sorted(cast(set[str], await self.redis.smembers(key)))
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip, not one each
            for name in names:
                pipe.hgetall(keys.project(name))
            rows = await pipe.execute()
        return [_project(row) for row in rows if row]

    async def owned_project(self, name: str, owner: str) -> Project:
        """The project if `owner` owns it; NotFound otherwise, so others cannot tell it exists."""
        project = await self.get_project(name)
        if not owner or project.owner != owner:
            raise NotFound(f"no project {name!r}")
        return project

    async def claim_project(self, name: str, owner: str) -> Project:
        """The caller's project, created empty if nobody has it yet (to set variables first)."""
        if not await self._claim(keys=[keys.project(name), keys.PROJECTS, keys.token_projects(owner)],
                                 args=[owner, name, repr(time.time())]):
            raise NotFound(f"no project {name!r}")
        return await self.get_project(name)

    async def list_variables(self, project: str) -> dict[str, tuple[str | None, bool]]:
        """name -> (value, secret), a secret's value None: what the API shows, decrypting
        nothing."""
        rows = cast(dict[str, str], await self.redis.hgetall(keys.project_env(project)))
        return {
            name: (None if data["secret"] else str(data["value"]), bool(data["secret"]))
            for name, raw in rows.items()
            for data in [json.loads(raw)]
        }

    async def build_variables(self, project: str, box: SecretBox) -> dict[str, tuple[str, bool]]:
        """name -> (value, secret), secrets decrypted with `box`: what a build gets.

        A secret is stored as {"sealed": <Fernet token>, "secret": true}; one stored by a
        version before encryption ({"value": <plain text>, "secret": true}) is still read as
        it is, until it is set again.
        """
        rows = cast(dict[str, str], await self.redis.hgetall(keys.project_env(project)))
        variables = {}
        for name, raw in rows.items():
            data = json.loads(raw)
            if "sealed" in data:
                value = box.open(str(data["sealed"]), f"the secret build variable {name}")
            else:
                value = str(data["value"])
            variables[name] = (value, bool(data["secret"]))
        return variables

    async def set_build_variables(
        self, project: str, variables: dict[str, tuple[str, bool] | None], box: SecretBox
    ) -> None:
        """Set (or, for None, remove) build variables in one step; secrets are stored
        encrypted with `box`, the others as they are."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, entry in variables.items():
                if entry is None:
                    pipe.hdel(keys.project_env(project), name)
                    continue
                value, secret = entry
                record = {"sealed": box.seal(value), "secret": True} if secret else {
                    "value": value, "secret": False}
                pipe.hset(keys.project_env(project), name, json.dumps(record))
            await pipe.execute()

    async def get_settings(self, project: str) -> tuple[dict[str, str], bool]:
        """The project's settings, and whether it has a webhook secret (never its value)."""
        rows = cast(dict[str, str], await self.redis.hgetall(keys.project_settings(project)))
        secret = rows.pop(WEBHOOK_SECRET, None)
        return rows, secret is not None

    async def set_settings(
        self, project: str, changes: dict[str, str | None], box: SecretBox
    ) -> None:
        """Set (or, for None, remove) settings in one step; the webhook secret is stored
        encrypted with `box`."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in changes.items():
                if value is None:
                    pipe.hdel(keys.project_settings(project), name)
                else:
                    sealed = box.seal(value) if name == WEBHOOK_SECRET else value
                    pipe.hset(keys.project_settings(project), name, sealed)
            await pipe.execute()

    async def webhook_secret(self, project: str, box: SecretBox) -> str | None:
        """The project's webhook secret, decrypted: only the webhook handler asks."""
        sealed = cast(str | None, await self.redis.hget(keys.project_settings(project), WEBHOOK_SECRET))
        if sealed is None:
            return None
        return box.open(sealed, f"the webhook secret of {project}")

    async def get_credential(self, project: str) -> Credential | None:
        """The project's clone credential, without its secret (nothing is decrypted)."""
        row = cast(dict[str, str], await self.redis.hgetall(keys.project_credential(project)))
        if not row:
            return None
        return Credential(kind=row["kind"], username=row["username"], hint=row["hint"],
                          updated_at=float(row["updated_at"]))

    async def set_credential(
        self, project: str, username: str, token: str, box: SecretBox
    ) -> Credential:
        """Replace the project's clone credential; the token is stored encrypted with `box`."""
        credential = Credential(kind="token", username=username, hint="\u2026" + token[-4:],
                                updated_at=time.time())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.project_credential(project))
            pipe.hset(keys.project_credential(project), mapping={
                "kind": credential.kind, "username": username, "hint": credential.hint,
                "updated_at": repr(credential.updated_at), "sealed": box.seal(token)})
            await pipe.execute()
        return credential

    async def delete_credential(self, project: str) -> None:
        await self.redis.delete(keys.project_credential(project))

    async def clone_credential(self, project: str, box: SecretBox) -> tuple[str, str] | None:
        """(username, token) decrypted with `box`: only the worker's clone asks.
        SecretUnreadable when `box` holds another key than the one it was stored with."""
        row = cast(list[str | None], await self.redis.hmget(
            keys.project_credential(project), ["username", "sealed"]))
        username, sealed = row
        if username is None or sealed is None:
            return None
        return username, box.open(sealed, f"the repository credential of {project}")

    async def queued_of(self, project: str, branch: str) -> list[Deployment]:
        """The project's deployments of `branch` still waiting in the queue."""
        return [d for d in await self.list_deployments(project)
                if d.status == Status.QUEUED and d.branch == branch]

    async def owned_deployment(self, dep_id: str, owner: str) -> tuple[Deployment, Project]:
        dep = await self.get_deployment(dep_id)
        try:
            return dep, await self.owned_project(dep.project, owner)
        except NotFound:
            raise NotFound(f"no deployment {dep_id!r}") from None

    async def deployments_of(self, project: str, dep_ids: Iterable[str]) -> set[str]:
        """Those of `dep_ids` that are deployments of `project`."""
        ids = list(dep_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for dep_id in ids:
                pipe.zscore(keys.project_deployments(project), dep_id)
            scores = await pipe.execute()
        return {dep_id for dep_id, score in zip(ids, scores) if score is not None}

    async def list_deployments(self, project: str, limit: int = 50) -> list[Deployment]:
        ids = await self.redis.zrevrange(keys.project_deployments(project), 0, limit - 1)
        return await self.get_deployments(cast(list[str], ids))

    async def transition(self, dep: Deployment | str, status: Status, reason: str = "") -> bool:
        """Move to `status`; False when the deployment had already ended."""
        status = Status(status)
        if isinstance(dep, str):
            dep = await self.get_deployment(dep)
        result = await self._transition(
            keys=[
                keys.deployment(dep.id),
                keys.ACTIVE,
                keys.project(dep.project),
                keys.lease(dep.id),
                keys.METRICS,
                keys.QUEUE,
                keys.SLOTS,
                keys.QUEUE_WAKE,
                keys.QUEUE_HOMES,
            ],
            args=[status.value, reason, repr(time.time()), dep.id, keys.deployment(""),
                  keys.channel(dep.project)],
        )
        if result == -1:
            raise NotFound(f"no deployment {dep.id!r}")
        return bool(result == 1)

    async def promote(self, project: str, dep_id: str) -> bool:
        """Point production at a ready deployment; False if it is not ready."""
        result = await self._promote(
            keys=[keys.project(project), keys.deployment(dep_id)],
            args=[project, dep_id, keys.channel(project)],
        )
        if result == -1:
            raise NotFound(f"project {project!r} has no deployment {dep_id!r}")
        return bool(result == 1)

    async def forget_deployment(self, project: str, dep_id: str) -> None:
        """Remove a final deployment's records; Conflict while it serves or still builds."""
        result = await self._delete_deployment(
            keys=[keys.deployment(dep_id), keys.project(project), keys.project_deployments(project),
                  keys.SITES_CHANNEL],
            args=[project, dep_id],
        )
        if result == 1:
            await self.redis.delete(keys.log_stream(project, dep_id))
        if result == -1:
            raise NotFound(f"project {project!r} has no deployment {dep_id!r}")
        if result == -2:
            raise Conflict(f"deployment {dep_id} is still building; cancel it first")
        if result == -3:
            raise Conflict(
                f"deployment {dep_id} serves {project}'s site; roll back to another deployment "
                "first, or delete the whole project"
            )

    async def forget_project(self, name: str) -> list[str]:
        """Remove a project and its deployments' records; returns the deployment ids.
        Conflict while one of them still builds."""
        result = await self._delete_project(
            keys=[keys.project(name), keys.project_deployments(name), keys.project_env(name),
                  keys.PROJECTS, keys.SITES_CHANNEL, keys.project_settings(name),
                  keys.project_credential(name)],
            args=[name, keys.deployment(""), *keys.token_projects("\0").split("\0")],
        )
        if not result:
            raise NotFound(f"no project {name!r}")
        if result[0] == "busy":
            raise Conflict(f"deployment {result[1]} of {name} is still building; cancel it first")
        dep_ids = [str(dep_id) for dep_id in result[1:]]
        if dep_ids:  # one DEL per key: a cluster client splits a multi-key DEL by slot anyway
            async with self.redis.pipeline(transaction=False) as pipe:
                for dep_id in dep_ids:
                    pipe.delete(keys.log_stream(name, dep_id))
                await pipe.execute()
        return dep_ids

    async def refresh_leases(self, dep_ids: Iterable[str], holder: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for dep_id in dep_ids:
                pipe.set(keys.lease(dep_id), holder, ex=LEASE_SECONDS)
            await pipe.execute()

    async def record_task(self, dep_id: str, task_arn: str) -> None:
        """The ECS task that builds a deployment; the ECS runner watches it from now on."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.deployment(dep_id), "task_arn", task_arn)
            pipe.hset(keys.ECS_TASKS, dep_id, task_arn)
            await pipe.execute()

    async def watched_tasks(self) -> dict[str, str]:
        """deployment id -> ECS task ARN, for every task not yet seen STOPPED."""
        return cast(dict[str, str], await self.redis.hgetall(keys.ECS_TASKS))

    async def forget_tasks(self, dep_ids: Iterable[str]) -> None:
        ids = list(dep_ids)
        if ids:
            await self.redis.hdel(keys.ECS_TASKS, *ids)

    async def active_ids(self) -> list[str]:
        return sorted(cast(set[str], await self.redis.smembers(keys.ACTIVE)))

    async def lease_holder(self, dep_id: str) -> str | None:
        return cast(str | None, await self.redis.get(keys.lease(dep_id)))

    async def reap(self) -> list[str]:
        """Fail every active deployment whose lease ran out: nothing is left to finish it."""
        failed = []
        for dep_id in await self.active_ids():
            if await self.redis.exists(keys.lease(dep_id)):
                continue
            try:
                ok = await self.transition(
                    dep_id,
                    Status.FAILED,
                    "The build stopped reporting (its worker or server went away). "
                    "Deploy again to retry.",
                )
            except NotFound:
                await self.redis.srem(keys.ACTIVE, dep_id)
                continue
            if ok:
                failed.append(dep_id)
        return failed


    # -- what the worker records, and what the site server looks up --------------------

    async def record_commit(self, dep_id: str, sha: str, message: str) -> None:
        """The commit a build cloned: its full SHA and the first line of its message."""
        await self.redis.hset(
            keys.deployment(dep_id), mapping={"commit": sha, "commit_message": message}
        )

    async def record_log_end(
        self, project: str, dep_id: str, last_seq: int, keep_seconds: int
    ) -> None:
        """The build's log is complete at `last_seq`; its stream expires after `keep_seconds`
        (the full log is in storage by then). Watchers compare `log_seq` with what they got
        to know whether to read the stream once more. Not one MULTI: the stream and the
        record are in different hash tags (see keys.py); a retry after a lost reply just
        sets both again."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(keys.log_stream(project, dep_id), keep_seconds)
            pipe.hset(keys.deployment(dep_id), "log_seq", last_seq)
            await pipe.execute()

    async def metrics(self) -> dict[str, str]:
        """The counters the transition script keeps (see _TRANSITION), for /metrics."""
        return cast(dict[str, str], await self.redis.hgetall(keys.METRICS))

    async def count_active(self) -> Counter[Status]:
        """Deployments not yet final, by status (queued, building...)."""
        ids = await self.active_ids()
        async with self.redis.pipeline(transaction=False) as pipe:
            for dep_id in ids:
                pipe.hget(keys.deployment(dep_id), "status")
            statuses = await pipe.execute()
        return Counter(Status(s) for s in statuses if s in Status.__members__.values())

    async def production_of(self, project: str) -> str | None:
        """The id of the deployment serving `project`'s site, if any."""
        return cast(str | None, await self.redis.hget(keys.project(project), "production")) or None

    async def project_of(self, dep_id: str) -> str | None:
        """The project a deployment belongs to, or None if there is no such deployment."""
        return cast(str | None, await self.redis.hget(keys.deployment(dep_id), "project"))


def _project(data: dict[str, str]) -> Project:
    return Project(
        name=data["name"],
        repo_url=data.get("repo_url", ""),
        created_at=float(data.get("created_at", 0)),
        production=data.get("production", ""),
        owner=data.get("owner", ""),
    )


def _settings(raw: str) -> dict[str, str]:
    if not raw:
        return {}
    data = json.loads(raw)
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def decode_status_message(payload: dict[str, Any]) -> Deployment:
    return Deployment.from_hash({str(k): str(v) for k, v in payload["deployment"].items()})


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
