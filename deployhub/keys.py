"""Every Redis key and channel DeployHub uses, in one place."""

PREFIX = "dh:"

# SET of project names.
PROJECTS = PREFIX + "projects"
# SET of deployment ids in a non-final state; the reaper walks it.
ACTIVE = PREFIX + "active"
# HASH token id -> JSON {name, created_at, digest}.
TOKENS = PREFIX + "tokens"
# PUB/SUB channel nobody publishes on: keeps the subscriber connection in subscribed mode.
IDLE_CHANNEL = PREFIX + "ch-idle"
# HASH sha256(token) -> token id, to look a bearer token up in one step.
TOKEN_DIGESTS = PREFIX + "token-digests"


def token_projects(token_id: str) -> str:
    """SET of the project names a token owns."""
    return f"{PREFIX}token:{token_id}:projects"


def project(name: str) -> str:
    """HASH name, repo_url, owner (token id), created_at, production (deployment id)."""
    return f"{PREFIX}project:{name}"


def project_env(name: str) -> str:
    """HASH variable name -> JSON {value, secret}: the project's build variables."""
    return f"{PREFIX}project:{name}:env"


def project_deployments(name: str) -> str:
    """ZSET deployment id scored by created_at."""
    return f"{PREFIX}project:{name}:deployments"


def deployment(dep_id: str) -> str:
    """HASH id, project, repo_url, branch, status, reason, created_at, updated_at, t_<status>."""
    return f"{PREFIX}deployment:{dep_id}"


def log_stream(dep_id: str) -> str:
    """STREAM of log events; entry id is '<seq>-0', field 'e' holds the event JSON."""
    return f"{PREFIX}logs:{dep_id}"


def lease(dep_id: str) -> str:
    """STRING with a TTL, refreshed while something is alive to finish the deployment."""
    return f"{PREFIX}lease:{dep_id}"


def channel(project_name: str) -> str:
    """PUB/SUB channel carrying a project's status and log frames (JSON text)."""
    return f"{PREFIX}ch:{project_name}"


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
