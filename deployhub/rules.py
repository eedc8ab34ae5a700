"""A site's own rules, in Netlify's `_redirects` and `_headers` formats.

Both files are parsed when the build is uploaded; the rules go into the manifest and a line
that cannot be understood is reported in the build log and left out, so nothing is parsed (or
fails) at request time.

`_redirects`: `FROM TO [STATUS][!]` per line, `#` comments. FROM is a path whose segments may
be `:name` placeholders and whose last segment may be `*` (the splat); TO may use `:name` and
`:splat`. STATUS is 301 (default), 302, 303, 307 or 308 (a redirect; TO may be a URL), 200 (a
rewrite: TO's file is served at FROM) or 404 (TO's file is served with status 404). A rule
applies only where no file matches the path, unless forced with `!`.

`_headers`: a path pattern (same syntax) alone on a line, then indented `Name: value` lines;
every rule whose pattern matches the request path adds its headers (a later one wins).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MAX_RULES = 1000
MAX_FILE_BYTES = 256 * 1024
REDIRECT_STATUSES = {200, 301, 302, 303, 307, 308, 404}
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PLACEHOLDER_RE = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")
_SEGMENT_NAME_RE = re.compile(r"^:([A-Za-z_][A-Za-z0-9_]*)$")
# Headers that describe the response's framing or its encoding, which only the server knows.
RESERVED_HEADERS = {
    "connection", "content-encoding", "content-length", "content-range", "etag",
    "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "vary",
}


class RuleError(ValueError):
    pass


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A path pattern as a regular expression over request paths (no trailing slash)."""
    if not pattern.startswith("/"):
        raise RuleError(f"{pattern!r} is not a path (it must start with /)")
    segments = pattern.strip("/").split("/") if pattern.strip("/") else []
    parts = []
    names: set[str] = set()
    for i, segment in enumerate(segments):
        if segment == "*":
            if i != len(segments) - 1:
                raise RuleError(f"{pattern!r}: * may only be the last segment")
            parts.append("(?:/(?P<splat>.*))?")
            continue
        named = _SEGMENT_NAME_RE.match(segment)
        if named:
            name = named[1]
            if name == "splat" or name in names:
                raise RuleError(f"{pattern!r}: placeholder :{name} is used twice")
            names.add(name)
            parts.append(f"/(?P<{name}>[^/]+)")
        elif "*" in segment:
            raise RuleError(f"{pattern!r}: * must be a whole segment (/path/*)")
        else:
            parts.append("/" + re.escape(segment))
    body = "".join(parts) or "/"  # `/*` alone: its splat group matches "/" and every path
    return re.compile(f"^{body}$")


def normalize(path: str) -> str:
    """`/about/` and `/about` are the same path to a rule."""
    return path.rstrip("/") or "/"


@dataclasses.dataclass(frozen=True)
class Redirect:
    source: str
    target: str
    status: int = 301
    force: bool = False
    regex: re.Pattern[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", compile_pattern(self.source))
        if self.status not in REDIRECT_STATUSES:
            raise RuleError(f"status {self.status} is not one of {sorted(REDIRECT_STATUSES)}")
        external = self.target.startswith(("http://", "https://"))
        if self.status in (200, 404) and not self.target.startswith("/"):
            raise RuleError(
                f"a {self.status} rule serves a file of this site, so {self.target!r} must be a "
                "path starting with / (proxying to other sites is not supported)"
            )
        if not external and not self.target.startswith("/"):
            raise RuleError(f"{self.target!r} is neither a path (/...) nor an http(s) URL")

    @property
    def client_routing(self) -> bool:
        return self.status == 200 and self.source.endswith("*") and self.target.endswith(".html")

    def match(self, path: str) -> str | None:
        """The target for a request path (placeholders filled in), or None."""
        found = self.regex.match(normalize(path))
        if found is None:
            return None
        values = {k: v or "" for k, v in found.groupdict().items()}
        return _PLACEHOLDER_RE.sub(lambda m: values.get(m[1], m[0]), self.target)

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "status": self.status, "force": self.force}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Redirect:
        return cls(str(data["from"]), str(data["to"]), int(data["status"]), bool(data["force"]))


@dataclasses.dataclass(frozen=True)
class HeaderRule:
    pattern: str
    values: tuple[tuple[str, str], ...]
    regex: re.Pattern[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", compile_pattern(self.pattern))

    def matches(self, path: str) -> bool:
        return self.regex.match(normalize(path)) is not None

    def to_json(self) -> dict[str, Any]:
        return {"for": self.pattern, "values": dict(self.values)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeaderRule:
        return cls(str(data["for"]), tuple((str(k), str(v)) for k, v in data["values"].items()))


def parse_redirects(text: str) -> tuple[list[Redirect], list[str]]:
    """The rules of a `_redirects` file, and a message for each line left out."""
    rules: list[Redirect] = []
    problems: list[str] = []
    for number, line in _lines(text, problems, "_redirects"):
        fields = line.split()
        where = f"_redirects line {number}"
        if len(fields) < 2:
            problems.append(f"{where}: expected `FROM TO [STATUS]`, got {line!r}; ignored")
            continue
        if any("=" in f for f in fields[2:]) or len(fields) > 3:
            problems.append(
                f"{where}: query and country/language conditions are not supported; ignored"
            )
            continue
        status_text = fields[2] if len(fields) == 3 else "301"
        force = status_text.endswith("!")
        status_text = status_text.removesuffix("!")
        if not status_text.isdigit():
            problems.append(f"{where}: {fields[2]!r} is not a status code; ignored")
            continue
        if len(rules) >= MAX_RULES:
            problems.append(f"{where}: more than {MAX_RULES} rules; the rest are ignored")
            break
        try:
            rules.append(Redirect(fields[0], fields[1], int(status_text), force))
        except RuleError as exc:
            problems.append(f"{where}: {exc}; ignored")
    return rules, problems


def parse_headers(text: str) -> tuple[list[HeaderRule], list[str]]:
    """The rules of a `_headers` file, and a message for each line left out."""
    rules: list[HeaderRule] = []
    problems: list[str] = []
    pattern: str | None = None
    values: list[tuple[str, str]] = []

    def close() -> None:
        if pattern is not None and values and len(rules) < MAX_RULES:
            rules.append(HeaderRule(pattern, tuple(values)))

    for number, raw in _lines(text, problems, "_headers", strip=False):
        where = f"_headers line {number}"
        if not raw[0].isspace():
            close()
            pattern, values = raw.strip(), []
            try:
                compile_pattern(pattern)
            except RuleError as exc:
                problems.append(f"{where}: {exc}; its headers are ignored")
                pattern = None
            continue
        line = raw.strip()
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if pattern is None:
            problems.append(f"{where}: a header before any path pattern; ignored")
        elif not colon or not _TOKEN_RE.match(name):
            problems.append(f"{where}: expected `Name: value`, got {line!r}; ignored")
        elif problem := header_problem(name, value):
            problems.append(f"{where}: {problem}; ignored")
        else:
            values.append((name, value))
    close()
    return rules, problems


def header_problem(name: str, value: str) -> str:
    """Why a rule may not set this header ("" when it may)."""
    if not _TOKEN_RE.match(name):
        return f"{name!r} is not a header name"
    if name.lower() in RESERVED_HEADERS:
        return f"{name} is set by the server"
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
        return f"the value of {name} has control characters"
    return ""


def _lines(
    text: str, problems: list[str], name: str, *, strip: bool = True
) -> list[tuple[int, str]]:
    if len(text.encode()) > MAX_FILE_BYTES:
        problems.append(f"{name} is larger than {MAX_FILE_BYTES // 1024} KiB; only its start is read")
        text = text.encode()[:MAX_FILE_BYTES].decode(errors="ignore")
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        found.append((number, line.strip() if strip else line.rstrip()))
    return found
