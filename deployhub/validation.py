"""Checks for everything that comes from outside, each failing with a message that says what to fix."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# host, port -> the IP addresses it resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]

PROJECT_MAX = 40
_PROJECT_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z0-9]$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


MAX_BODY = 64 * 1024  # bytes of a REST body or a WebSocket message from a client
MAX_RESUME = 100  # deployments a WebSocket subscribe may resume at once


class InvalidInput(ValueError):
    """Bad input from a user; the message is shown to them as is."""


@dataclass(frozen=True)
class RepoURL:
    url: str
    host: str
    port: int
    addresses: tuple[str, ...]  # what the host resolved to when checked, to pin the clone


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({str(info[4][0]) for info in infos})


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_repo_url(
    raw: object,
    *,
    allow_hosts: Iterable[str] = (),
    resolver: Resolver = system_resolver,
    timeout: float = 5.0,
) -> RepoURL:
    """An http(s) Git URL whose host resolves only to public addresses (or is allowlisted)."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInput("repo_url must be a non-empty string such as https://host/owner/repo.git")
    url = raw.strip()
    if len(url) > 2048:
        raise InvalidInput("repo_url is longer than 2048 characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise InvalidInput("repo_url must not contain spaces or control characters")
    if url.startswith("-"):
        raise InvalidInput("repo_url must not start with '-'")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidInput(
            "repo_url must be an http:// or https:// URL (file://, ssh://, ext:: and local "
            f"paths are not allowed); got {url[:100]!r}"
        )
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidInput(
            "repo_url must not contain credentials; DeployHub clones public repositories"
        )
    try:
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise InvalidInput(f"repo_url has an invalid port: {url[:100]!r}") from None
    if not host or not _valid_host(host):
        raise InvalidInput(f"repo_url has no valid host name: {url[:100]!r}")
    if not parts.path.strip("/"):
        raise InvalidInput("repo_url must name a repository, e.g. https://host/owner/repo.git")
    allowed = {h.lower() for h in allow_hosts}
    try:
        addresses = await asyncio.wait_for(resolver(host, port), timeout)
    except (OSError, TimeoutError, UnicodeError):
        raise InvalidInput(f"the host {host!r} in repo_url could not be resolved") from None
    if not addresses:
        raise InvalidInput(f"the host {host!r} in repo_url could not be resolved")
    # The allowlist matches the host as written, never what it resolves to: allowing
    # 127.0.0.1 must not let 0x7f000001 or a name pointing at it through.
    if host.lower() not in allowed:
        blocked = [a for a in addresses if not _public(a)]
        if blocked:
            raise InvalidInput(
                f"the host {host!r} resolves to a non-public address ({blocked[0]}); DeployHub "
                "only clones from public hosts (an operator can allow it with "
                "DEPLOYHUB_ALLOW_HOSTS)"
            )
    return RepoURL(url=url, host=host, port=port, addresses=tuple(addresses))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253:
        return False
    return all(_HOST_LABEL_RE.match(label) for label in host.rstrip(".").split("."))


def slugify(name: str) -> str:
    """A DNS-label slug: lowercase letters, digits, single hyphens, at most 40 characters."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:PROJECT_MAX].strip("-")


def project_from_url(url: str) -> str:
    path = urlsplit(url).path.rstrip("/")
    last = path.rsplit("/", 1)[-1]
    if last.endswith(".git"):
        last = last[:-4]
    slug = slugify(last)
    if not slug:
        raise InvalidInput("could not derive a project name from repo_url; pass 'project'")
    return slug


def check_project(raw: object) -> str:
    if not isinstance(raw, str):
        raise InvalidInput("project must be a string")
    if not _PROJECT_RE.match(raw) or len(raw) > PROJECT_MAX:
        raise InvalidInput(
            f"project must be 1-{PROJECT_MAX} lowercase letters, digits and single hyphens, "
            f"not starting or ending with a hyphen (try {slugify(raw) or 'my-app'!r})"
        )
    return raw


def check_branch(raw: object) -> str:
    if not isinstance(raw, str) or not _BRANCH_RE.match(raw):
        raise InvalidInput("branch must be 1-200 characters of letters, digits, '.', '_', '/', '-'")
    if raw.startswith(("-", "/", ".")) or ".." in raw or raw.endswith((".lock", "/", ".")):
        raise InvalidInput(f"branch {raw!r} is not a valid git branch name")
    return raw


def check_deployment_id(raw: str) -> str:
    if not re.fullmatch(r"[a-z0-9]{12}", raw):
        raise InvalidInput("a deployment id is 12 lowercase letters and digits")
    return raw


def check_fields(body: object, *, required: set[str], optional: set[str]) -> dict[str, object]:
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    missing = sorted(required - body.keys())
    if missing:
        raise InvalidInput(f"missing field {missing[0]!r}")
    unknown = sorted(body.keys() - required - optional)
    if unknown:
        raise InvalidInput(
            f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(required | optional))}"
        )
    return body


VARIABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RESERVED_VARIABLES = {"PATH", "HOME", "PWD", "SHELL", "USER", "TMPDIR", "CI"}
MAX_VARIABLES = 100
MAX_VARIABLE_BYTES = 32 * 1024


def check_variables(raw: object) -> dict[str, tuple[str, bool] | None]:
    """`{"NAME": {"value": "...", "secret": bool} | null}`; null removes the variable."""
    if not isinstance(raw, dict) or not raw:
        raise InvalidInput('variables must be a non-empty object {"NAME": {"value": "...", "secret": false}}')
    if len(raw) > MAX_VARIABLES:
        raise InvalidInput(f"at most {MAX_VARIABLES} variables at once")
    checked: dict[str, tuple[str, bool] | None] = {}
    for name, spec in raw.items():
        if not VARIABLE_NAME_RE.match(name):
            raise InvalidInput(f"variable name {name[:70]!r} must match [A-Za-z_][A-Za-z0-9_]*")
        if name in RESERVED_VARIABLES or name.startswith(("DEPLOYHUB_", "npm_config_")):
            raise InvalidInput(f"{name} is set by DeployHub and cannot be overridden")
        if spec is None:
            checked[name] = None
            continue
        if not isinstance(spec, dict) or set(spec) - {"value", "secret"} or "value" not in spec:
            raise InvalidInput(f'{name} must be {{"value": "...", "secret": true|false}} or null')
        value, secret = spec["value"], spec.get("secret", False)
        if not isinstance(value, str) or not isinstance(secret, bool):
            raise InvalidInput(f"{name}: value must be a string and secret a boolean")
        if len(value.encode()) > MAX_VARIABLE_BYTES or "\x00" in value:
            raise InvalidInput(f"{name}: value must be under 32 KiB and contain no NUL")
        checked[name] = (value, secret)
    return checked
