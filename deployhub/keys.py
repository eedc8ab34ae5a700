"""Every Redis key and channel DeployHub uses, in one place.

Two hash tags, so that a Redis Cluster (ElastiCache, Valkey in cluster mode) can run them:

- the control plane (projects, deployment records, indexes, the queue, slots, leases, tokens,
  metrics) is small and its Lua scripts change per-deployment and global keys in one atomic
  step, so all of it shares the tag `{dh}`: one slot, every script and MULTI stays atomic;
- the log traffic, which is most of the bytes and messages, is tagged by project: a
  deployment's stream and its project's log channel share `{p:<project>}`, so the append
  script (XADD + SPUBLISH) runs on one shard and projects spread over the shards.

Standalone Redis ignores the tags; the names are the same in both modes (see migrate.py for
the names before the tags).
"""

PREFIX = "{dh}:"

# SET of project names.
PROJECTS = PREFIX + "projects"
# SET of deployment ids in a non-final state; the reaper walks it.
ACTIVE = PREFIX + "active"
# HASH token id -> JSON {name, created_at, digest, expires_at (null: never)}.
TOKENS = PREFIX + "tokens"
# HASH token id -> unix time it was last accepted (written at most once a minute per token).
TOKEN_LAST_USED = PREFIX + "token-last-used"
# PUB/SUB channel nobody publishes on: keeps the subscriber connection in subscribed mode.
IDLE_CHANNEL = PREFIX + "ch-idle"
# HASH counter -> value: final:<status>, phase_le:<phase>:<bound>, phase_sum:<phase>,
# phase_count:<phase>; kept by the transition script for every replica's /metrics.
METRICS = PREFIX + "metrics"
# HASH sha256(token) -> token id, to look a bearer token up in one step.
TOKEN_DIGESTS = PREFIX + "token-digests"
# STRING "2" once the keys of older versions (`dh:<rest>`) have their names here (migrate.py).
KEYS_VERSION = PREFIX + "keys-version"
# STRING with a TTL, holder token: one process at a time renames the old keys.
MIGRATE_LOCK = PREFIX + "migrate-lock"


def token_projects(token_id: str) -> str:
    """SET of the project names a token owns."""
    return f"{PREFIX}token:{token_id}:projects"


def auth_failures(address: str) -> str:
    """STRING counter of bad tokens from one client address, expiring with its window."""
    return f"{PREFIX}auth-failures:{address}"


def project(name: str) -> str:
    """HASH name, repo_url, owner (token id), created_at, production (deployment id)."""
    return f"{PREFIX}project:{name}"


def project_env(name: str) -> str:
    """HASH variable name -> JSON {value, secret: false} or {sealed (Fernet token), secret: true}
    (or, written before encryption, {value, secret: true}): the project's build variables."""
    return f"{PREFIX}project:{name}:env"


def project_settings(name: str) -> str:
    """HASH setting name (branch, root_directory, install_command, build_command,
    output_directory, node_version) -> value, and webhook_secret -> a Fernet token."""
    return f"{PREFIX}project:{name}:settings"


def project_credential(name: str) -> str:
    """HASH kind ("token"), username, sealed (a Fernet token of the secret), hint
    ("…" + its last 4 characters), updated_at: the credential the project's clone uses."""
    return f"{PREFIX}project:{name}:credential"


def project_deployments(name: str) -> str:
    """ZSET deployment id scored by created_at."""
    return f"{PREFIX}project:{name}:deployments"


def deployment(dep_id: str) -> str:
    """HASH id, project, repo_url, branch, status, reason, created_at, updated_at, t_<status>,
    commit (the full SHA asked for, then the one built), commit_message (its first line),
    settings (JSON: the project's settings merged with the deployment's overrides, fixed at
    creation), log_seq, task_arn (runner=ecs)."""
    return f"{PREFIX}deployment:{dep_id}"


def project_tag(project_name: str) -> str:
    """The hash tag of a project's log stream and channel: one slot per project."""
    return "dh:{p:" + project_name + "}:"


def log_stream(project_name: str, dep_id: str) -> str:
    """STREAM of log events; entry id is '<seq>-0', field 'e' holds the event JSON. In the
    project's slot, not the record's: read it with the record's `project`."""
    return f"{project_tag(project_name)}logs:{dep_id}"


def lease(dep_id: str) -> str:
    """STRING with a TTL, refreshed while something is alive to finish the deployment."""
    return f"{PREFIX}lease:{dep_id}"


def channel(project_name: str) -> str:
    """PUB/SUB channel carrying a project's status and log frames (JSON text). On a cluster
    the log frames go by sharded pub/sub (SPUBLISH, to the project's shard) and the status
    frames, which the control-plane scripts publish from the `{dh}` slot, by classic PUBLISH
    under the same name (the two are separate namespaces; a hub subscribes to both)."""
    return f"{project_tag(project_name)}ch"


def channel_project(name: str) -> str:
    """The project whose channel is `name` (the inverse of `channel`)."""
    return name[len("dh:{p:"):-len("}:ch")]


# -- the shared build queue (deployhub/queue.py) --------------------------------------------
# ZSET deployment id scored by created_at: deployments waiting for a build slot, oldest first.
QUEUE = PREFIX + "queue"
# ZSET deployment id scored by the unix ms its slot lease ends: the builds running now, on
# every replica (at most DEPLOYHUB_MAX_BUILDS); an entry whose lease ran out is free again.
SLOTS = PREFIX + "slots"
# PUB/SUB channel, message "1": a deployment was queued or a slot was freed; dispatchers wake.
QUEUE_WAKE = PREFIX + "ch-queue"
# HASH deployment id -> replica name: the replica a waiting deployment should build on (the
# local runner's builds run where they were posted, while that replica lives).
QUEUE_HOMES = PREFIX + "queue-homes"


def replica(name: str) -> str:
    """STRING with a TTL, refreshed while the replica `name` dispatches builds."""
    return f"{PREFIX}replica:{name}"


# -- the ECS runner (deployhub/runners/ecs.py) ----------------------------------------------
# HASH deployment id -> ECS task ARN: the tasks to watch, until they have STOPPED.
ECS_TASKS = PREFIX + "ecs:tasks"
# STRING with a PX TTL, holder name: one replica polls DescribeTasks per round.
ECS_RECONCILE_LOCK = PREFIX + "ecs:reconcile"


# PUB/SUB channel every replica's site server listens on: JSON {type: "production", project,
# production} when a project's production pointer moves (or "" when the project is gone),
# {type: "deleted", project, deployments: [id...]} when deployments are removed.
SITES_CHANNEL = PREFIX + "ch-sites"


def blob_lease(digest: str) -> str:
    """HASH upload (deployment id) -> unix time its lease on this blob ends; expires itself.
    An upload holds it from before it checks the blob exists until its manifest is written."""
    return f"{PREFIX}blob-lease:{digest}"


def blob_deleting(digest: str) -> str:
    """STRING with a TTL: the collector is deleting this blob; an upload waits, then rewrites."""
    return f"{PREFIX}blob-deleting:{digest}"


def collect_lock(project_name: str) -> str:
    """STRING with a TTL: one replica at a time enforces a project's retention."""
    return f"{PREFIX}collect:{project_name}"

# STRING with a TTL: the last sweep for blobs no deployment uses was less than an hour ago.
SWEEP_LOCK = PREFIX + "sweep"


def collect_again(project_name: str) -> str:
    """STRING with a TTL: the project changed while its retention pass ran; run it again."""
    return f"{PREFIX}collect-again:{project_name}"
