"""Checks for everything that comes from outside, each failing with a message that says what to fix."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import json
import math
import socket
import unicodedata
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .addresses import local_addresses, refusal

# host, port -> the IP addresses it resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]

PROJECT_MAX = 40
_PROJECT_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z0-9]$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


MAX_BODY = 64 * 1024  # bytes of a REST body or a WebSocket message from a client
MAX_RESUME = 100  # deployments a WebSocket subscribe may resume at once
# Digits a JSON integer may have: every number we take (a log seq) fits in 64 bits, and
# Python refuses to parse more than 4,300 digits with a ValueError nobody expects.
MAX_INT_DIGITS = 20
MAX_SEQ = 2**63 - 1  # Redis stream ids are 64-bit
# Levels of arrays and objects a JSON document may nest; our deepest message has 3.
MAX_DEPTH = 32


class InvalidInput(ValueError):
    """Bad input from a user; the message is shown to them as is."""


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidInput(
            f"a number has {len(digits.lstrip('-'))} digits; at most {MAX_INT_DIGITS} are accepted"
        )
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidInput(f"the number {text[:30]}... is too large; send a finite number")
    return value


def _parse_constant(name: str) -> Any:
    raise InvalidInput(f"{name} is not JSON; send a finite number or null")


# Python strings hold code points: the JSON decoder turns a correctly paired escape
# ("\\ud83d\\ude00") into one astral character, so any surrogate left is unpaired, and
# cannot be encoded as UTF-8 (for Redis, a log line, a response).
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_text(value: str, what: str) -> str:
    """`value` if it can be encoded as UTF-8 (no unpaired surrogate), else InvalidInput."""
    found = _SURROGATE_RE.search(value)
    if found is not None:
        raise InvalidInput(
            f"{what} holds an unpaired UTF-16 surrogate (\\u{ord(found.group()):04x} at "
            f"character {found.start()}); send valid Unicode text"
        )
    return value


def loads_json(raw: bytes | str, what: str = "the request body") -> Any:
    """Decode JSON from a client, REST and WebSocket alike.

    Refuses, with a message that says what to fix: text that is not UTF-8 JSON, integers of
    more than MAX_INT_DIGITS digits, NaN/Infinity (not JSON; they break our own encoding),
    unpaired surrogates anywhere (Redis, logs and responses cannot encode them) and nesting
    deeper than MAX_DEPTH.
    """
    try:
        value = json.loads(
            raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except InvalidInput as exc:
        raise InvalidInput(f"{what} is refused: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    # An explicit stack rather than recursion: the decoder already went as deep as the
    # interpreter allows, so a recursive walk from inside a handler could overflow.
    stack: list[tuple[Any, str, int]] = [(value, "$", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, f"{what} at {path}")
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise InvalidInput(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
            if isinstance(item, dict):
                for key, child in item.items():
                    check_text(key, f"a key in {what} at {path}")
                    stack.append((child, f"{path}.{key[:40]}", depth + 1))
            else:
                stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
    return value


def check_query_int(raw: str, name: str, *, maximum: int = MAX_SEQ) -> int:
    """A non-negative integer from a query string: ASCII digits only (str.isdigit also takes
    '²' and '١', which int() then refuses or reads), bounded."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_INT_DIGITS or int(raw) > maximum:
        raise InvalidInput(
            f"{name} must be a non-negative integer (a log seq) in ASCII digits, at most {maximum}"
        )
    return int(raw)


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


async def check_repo_url(
    raw: object,
    *,
    allow_hosts: Iterable[str] = (),
    resolver: Resolver = system_resolver,
    timeout: float = 5.0,
    local: Collection[str] | None = None,
) -> RepoURL:
    """An http(s) Git URL whose host resolves only to public addresses (or is allowlisted).

    Public as deployhub/addresses.py says, the same list the build's egress proxy uses; not
    one of `local` either (default: this machine's own addresses), since the clone runs on
    the host's network.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInput("repo_url must be a non-empty string such as https://host/owner/repo.git")
    url = raw
    if len(url) > 2048:
        raise InvalidInput("repo_url is longer than 2048 characters")
    check_text(url, "repo_url")
    # Refused, not stripped: a URL with a trailing newline or an invisible character is not
    # the URL the user thinks they sent, and git would get something else again.
    bad = next((ch for ch in url if _unprintable(ch)), None)
    if bad is not None:
        where = "at the start or end" if bad in (url[0], url[-1]) and url.strip() != url else "inside"
        raise InvalidInput(
            f"repo_url must not contain spaces or control characters (found U+{ord(bad):04X} "
            f"{where}); remove it and send the URL alone"
        )
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
            "repo_url must not contain credentials (a URL is shown and logged); for a private "
            "repository give the project a token with PUT /api/projects/{name}/credential"
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
        own = local_addresses() if local is None else local
        blocked = [(a, why) for a in addresses if (why := refusal(a, local=own))]
        if blocked:
            address, why = blocked[0]
            raise InvalidInput(
                f"the host {host!r} resolves to a non-public address ({address}), a {why} "
                "address; DeployHub only clones from public hosts (an operator can allow it "
                "with DEPLOYHUB_ALLOW_HOSTS)"
            )
    return RepoURL(url=url, host=host, port=port, addresses=tuple(addresses))


def _unprintable(char: str) -> bool:
    # Cc control, Cf format (zero-width, bidi overrides), Cs surrogate, Co private use,
    # Cn unassigned, Z* separators (spaces, line and paragraph separators).
    return char.isspace() or unicodedata.category(char)[0] in "CZ"


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
    # fullmatch: with match, '$' also matches before a trailing newline ("app\n").
    if not _PROJECT_RE.fullmatch(raw) or len(raw) > PROJECT_MAX:
        raise InvalidInput(
            f"project must be 1-{PROJECT_MAX} lowercase letters, digits and single hyphens, "
            f"not starting or ending with a hyphen (try {slugify(raw) or 'my-app'!r})"
        )
    return raw


def check_branch(raw: object) -> str:
    if not isinstance(raw, str) or not _BRANCH_RE.fullmatch(raw):
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
# Set by DeployHub for every build. CI is not among them: it is "1" as the hosted platforms
# set it, and a project may set CI=false (a Create React App whose lint warnings would
# otherwise fail the build).
RESERVED_VARIABLES = {"PATH", "HOME", "PWD", "SHELL", "USER", "TMPDIR"}
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
        if not VARIABLE_NAME_RE.fullmatch(name):
            raise InvalidInput(
                f"variable name {name[:70].encode('ascii', 'backslashreplace').decode()!r} must "
                "match [A-Za-z_][A-Za-z0-9_]* (no spaces or control characters), 1-64 long"
            )
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
        check_text(value, f"the value of {name}")
        if len(value.encode()) > MAX_VARIABLE_BYTES or "\x00" in value:
            raise InvalidInput(f"{name}: value must be under 32 KiB and contain no NUL")
        checked[name] = (value, secret)
    return checked


# -- project settings (README "REST API") ----------------------------------------------------

# What a project may set, and a deployment override once; the webhook secret is apart: it is
# write-only and never part of a deployment.
SETTING_NAMES = (
    "branch", "root_directory", "install_command", "build_command", "output_directory",
    "node_version",
)
WEBHOOK_SECRET = "webhook_secret"
DIRECTORY_MAX = 255
COMMAND_MAX = 4096
NODE_VERSION_MAX = 64
WEBHOOK_SECRET_MIN, WEBHOOK_SECRET_MAX = 16, 256
_NODE_ALIAS_RE = re.compile(r"lts/(\*|[a-z]{1,20})|node|latest")
_NODE_RANGE_RE = re.compile(r"[0-9vxX*.<>=~^| -]+")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def check_directory(raw: object, what: str) -> str:
    """A path relative to the repository that cannot leave it, normalized ("" is its top):
    no '..', not absolute, no backslash, NUL or control characters, bounded."""
    if not isinstance(raw, str):
        raise InvalidInput(f"{what} must be a string such as \"frontend\" or \"dist\"")
    check_text(raw, what)
    if len(raw) > DIRECTORY_MAX:
        raise InvalidInput(f"{what} is longer than {DIRECTORY_MAX} characters")
    if any(unicodedata.category(ch)[0] == "C" for ch in raw) or "\\" in raw:
        raise InvalidInput(f"{what} must not contain control characters or backslashes")
    if raw.startswith("/"):
        raise InvalidInput(f"{what} must be relative to the repository, not an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"{what} must stay inside the repository (no '..')")
    return "/".join(parts)


def check_command(raw: object, what: str) -> str:
    """A shell command line, run with `sh -c` inside the build sandbox (never on the host)."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInput(f"{what} must be a non-empty string such as \"npm run build\"")
    check_text(raw, what)
    if "\x00" in raw or len(raw.encode()) > COMMAND_MAX:
        raise InvalidInput(f"{what} must be under {COMMAND_MAX} bytes and contain no NUL")
    return raw


def check_node_version(raw: object) -> str:
    """A version or range as .nvmrc or engines.node write it: 20, 20.x, >=18 <21, lts/*."""
    spec = raw.strip() if isinstance(raw, str) else ""
    if len(spec) > NODE_VERSION_MAX or not (
        _NODE_ALIAS_RE.fullmatch(spec)
        or (_NODE_RANGE_RE.fullmatch(spec) and any(ch.isdigit() for ch in spec))
    ):
        raise InvalidInput(
            "node_version must be a Node version or range such as \"20\", \"20.x\", "
            "\">=18 <21\" or \"lts/*\""
        )
    return spec


def check_commit(raw: object) -> str:
    """A full commit SHA-1 (40 hex digits), lowercased."""
    if not isinstance(raw, str) or not COMMIT_RE.fullmatch(raw.lower()):
        raise InvalidInput("commit must be a full 40-hex-digit commit SHA")
    return raw.lower()


def check_settings(raw: object, *, patch: bool) -> dict[str, str | None]:
    """Project settings (`patch`: a PATCH body's, which may also set webhook_secret) or a
    deployment's overrides; a null value unsets one (detection decides)."""
    allowed = SETTING_NAMES + ((WEBHOOK_SECRET,) if patch else ())
    if not isinstance(raw, dict) or (patch and not raw):
        raise InvalidInput('settings must be a non-empty object such as {"root_directory": "frontend"}')
    checked: dict[str, str | None] = {}
    for name, value in raw.items():
        if name not in allowed:
            raise InvalidInput(
                f"unknown setting {name[:40]!r}; allowed: {', '.join(sorted(allowed))}"
            )
        if value is None:
            checked[name] = None
        elif name == "branch":
            checked[name] = check_branch(value)
        elif name in ("root_directory", "output_directory"):
            checked[name] = check_directory(value, name)
        elif name in ("install_command", "build_command"):
            checked[name] = check_command(value, name)
        elif name == "node_version":
            checked[name] = check_node_version(value)
        else:
            checked[name] = check_webhook_secret(value)
    return checked


def check_webhook_secret(raw: object) -> str:
    """"generate" (the server makes one and returns it once) or a secret of printable ASCII."""
    if raw == "generate":
        return raw
    if (not isinstance(raw, str) or not WEBHOOK_SECRET_MIN <= len(raw) <= WEBHOOK_SECRET_MAX
            or not all(" " < ch < "\x7f" for ch in raw)):
        raise InvalidInput(
            f"webhook_secret must be \"generate\" or {WEBHOOK_SECRET_MIN}-{WEBHOOK_SECRET_MAX} "
            "printable ASCII characters without spaces"
        )
    return raw


# -- a project's repository credential (README "Private repositories") ----------------------

CREDENTIAL_USERNAME = "x-access-token"  # what GitHub takes with an installation or PAT token
CREDENTIAL_TOKEN_MIN, CREDENTIAL_TOKEN_MAX = 8, 1024
CREDENTIAL_USERNAME_MAX = 100


def _credential_text(raw: object, what: str, shortest: int, longest: int) -> str:
    if not isinstance(raw, str) or not raw:
        raise InvalidInput(f"{what} must be a non-empty string")
    check_text(raw, what)
    if not shortest <= len(raw) <= longest:
        raise InvalidInput(f"{what} must be {shortest}-{longest} characters long, not {len(raw)}")
    if not all(" " < ch < "\x7f" for ch in raw):
        raise InvalidInput(
            f"{what} must be printable ASCII without spaces or control characters (copy it "
            "again, without the line break or quotes around it)"
        )
    return raw


def check_credential(body: object) -> tuple[str, str]:
    """A PUT body `{"token": "...", "username": "..."}`: (username, token); the username
    defaults to x-access-token."""
    fields = check_fields(body, required={"token"}, optional={"username"})
    token = _credential_text(fields["token"], "token", CREDENTIAL_TOKEN_MIN, CREDENTIAL_TOKEN_MAX)
    username = fields.get("username")
    if username is None or username == "":
        return CREDENTIAL_USERNAME, token
    username = _credential_text(username, "username", 1, CREDENTIAL_USERNAME_MAX)
    if ":" in username:
        raise InvalidInput("username must not contain ':' (HTTP basic auth splits on it)")
    return username, token
