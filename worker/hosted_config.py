"""The routing and build settings a repository wrote for the hosted platforms, read from the
root directory: `netlify.toml` (`[[redirects]]`, `[[headers]]`) and `vercel.json`
(`redirects`, `rewrites`, `headers`) become the site's rules (deployhub/rules.py), after
those of the output's own `_redirects` and `_headers`; their build settings
(`build_settings`) stand in for the project's settings it leaves unset.

Netlify's tables are the `_redirects` / `_headers` rules written in TOML. Vercel's sources
are path-to-regexp patterns: the ones a site writes (`/about`, `/blog/:slug`, `/:path*`,
`/(.*)`, `/docs/:path(.*)`) are translated; a pattern with other regular expressions, and a
rule with `has` / `missing` conditions, is left out with a warning. Vercel applies redirects
before the files and rewrites after them, so redirects become forced rules and rewrites
status-200 ones.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployhub.rules import MAX_FILE_BYTES, MAX_RULES, HeaderRule, Redirect, RuleError, header_problem
from deployhub.validation import RESERVED_VARIABLES, VARIABLE_NAME_RE

from .files import read_head

CONFIG_FILES = ("netlify.toml", "vercel.json")
NOTES_MAX = 30  # warnings about these files in one build log
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SPLAT = re.compile(rf"(?::(?P<name>{_NAME})(?:\*|\(\.\*\))|\(\.\*\)|\*)")
_PARAM = re.compile(rf":{_NAME}")


@dataclass
class HostedRules:
    redirects: list[Redirect] = field(default_factory=list)
    headers: list[HeaderRule] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the build log: what was read, what not


def read(root: Path, netlify_dir: Path | None = None) -> HostedRules:
    """The rules of the config files at `root` (regular files only, never through a symlink);
    netlify.toml's from `netlify_dir` when it is given (see `netlify_base`)."""
    found = HostedRules()
    for name in CONFIG_FILES:
        data = _load(_folder_of(name, root, netlify_dir), name, found.notes)
        if data is None:
            continue
        before = (len(found.redirects), len(found.headers))
        (_netlify if name == "netlify.toml" else _vercel)(data, found)
        redirects, headers = len(found.redirects) - before[0], len(found.headers) - before[1]
        if redirects or headers:
            found.notes.append(f"Read {redirects} redirect and rewrite rules and {headers} header "
                               f"rules from {name}")
    found.notes = _capped(found.notes)
    return found


def _folder_of(name: str, root: Path, netlify_dir: Path | None) -> Path:
    """Where config file `name` is read: the root directory, or for netlify.toml the folder
    whose [build] base chose it (`netlify_dir`, see `netlify_base`)."""
    return netlify_dir or root if name == "netlify.toml" else root


def _capped(notes: list[str]) -> list[str]:
    """At most NOTES_MAX lines for the build log: a file of ten thousand bad rules is one
    problem, not ten thousand lines."""
    if len(notes) <= NOTES_MAX:
        return notes
    return [*notes[:NOTES_MAX - 1], f"... and {len(notes) - NOTES_MAX + 1} more warnings like these"]


@dataclass
class RepoSettings:
    """The build settings a repository wrote for a hosted platform: `values` by the names of
    the project's settings (install_command, build_command, output_directory, node_version),
    `sources` where each was written, `environment` netlify.toml's build variables."""

    values: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# Where each platform writes what a project's settings say: a table path, then the key.
VERCEL_SETTINGS = {"installCommand": "install_command", "buildCommand": "build_command",
                   "outputDirectory": "output_directory"}
NETLIFY_SETTINGS = {"command": "build_command", "publish": "output_directory"}
SETTING_MAX = 4096


def netlify_base(repo: Path) -> tuple[str, list[str]]:
    """netlify.toml's [build] base at the repository's top, as written ("" for none), and what
    was wrong with it. Netlify builds in that folder (a monorepo's app); a netlify.toml there
    replaces the top one, else the top one's settings and rules apply, its paths relative to
    the base. A file that cannot be read is said when its rules are read."""
    data = _load(repo, "netlify.toml", [])
    build = data.get("build") if data is not None else None
    base = build.get("base") if isinstance(build, dict) else None
    if base is None:
        return "", []
    if not isinstance(base, str) or len(base) > SETTING_MAX or "\0" in base:
        return "", [f"Warning: netlify.toml [build] base must be a path under {SETTING_MAX} "
                    "characters; ignored"]
    return base.strip(), []


def build_settings(root: Path, netlify_dir: Path | None = None, base: str = "") -> RepoSettings:
    """vercel.json's buildCommand, installCommand and outputDirectory and netlify.toml's
    [build] command, publish and environment (NODE_VERSION the Node version) at `root`
    (netlify.toml from `netlify_dir` when given). Where both name a setting, vercel.json's is
    taken. `base`: the root directory netlify.toml's [build] base chose; a publish directory
    that starts with it was written relative to the repository, as older Netlify sites do.
    Files that cannot be read are said when the rules are read (`read`), not twice."""
    found = RepoSettings()
    for name in reversed(CONFIG_FILES):  # vercel.json first: its settings are taken
        data = _load(_folder_of(name, root, netlify_dir), name, [])
        if data is None:
            continue
        if name == "vercel.json":
            table, keys = data, VERCEL_SETTINGS
        else:
            build = data.get("build", {})
            table, keys = (build if isinstance(build, dict) else {}), NETLIFY_SETTINGS
            env = table.get("environment", {})
            for var, value in (env.items() if isinstance(env, dict) else ()):
                if var == "NODE_VERSION" and isinstance(value, (str, int, float)):
                    table = {**table, "NODE_VERSION": str(value)}
                elif not isinstance(value, (str, int, float, bool)) or not VARIABLE_NAME_RE.fullmatch(var):
                    found.notes.append(f"Warning: netlify.toml [build.environment] {var!r} is not "
                                       "a variable with a value; ignored")
                elif var in RESERVED_VARIABLES or var.startswith(("DEPLOYHUB_", "npm_config_")):
                    found.notes.append(f"Warning: netlify.toml [build.environment] {var} is set "
                                       "by DeployHub; ignored")
                else:
                    text = str(value).lower() if isinstance(value, bool) else str(value)
                    found.environment.setdefault(var, text)
            keys = {**keys, "NODE_VERSION": "node_version"}
        for key, setting in keys.items():
            value = table.get(key)
            if value is None or setting in found.values:
                continue
            where = f"{name} {key}" if name == "vercel.json" or key == "NODE_VERSION" else f"netlify.toml [build] {key}"
            if not isinstance(value, str) or not value.strip() or len(value) > SETTING_MAX or "\0" in value:
                found.notes.append(f"Warning: {where} must be a non-empty string under "
                                   f"{SETTING_MAX} characters; ignored")
                continue
            if setting == "output_directory" and value.strip().strip("/") == ".next":
                # Netlify serves .next through its Next.js runtime; it is no static site.
                found.notes.append(f"Warning: {where} is .next, Next.js's server build, which "
                                   "only Netlify's Next.js runtime serves; ignored (a static "
                                   "export goes to out/)")
                continue
            value = value.strip()
            if setting == "output_directory" and base and name == "netlify.toml":
                path = "/".join(p for p in value.split("/") if p not in ("", "."))
                if path == base or path.startswith(base + "/"):
                    value = path[len(base) + 1:] or "."
                    where += ", relative to the repository as older Netlify sites wrote it"
            found.values[setting] = value
            found.sources[setting] = where
    found.notes = _capped(found.notes)
    return found


def _load(root: Path, name: str, notes: list[str]) -> dict[str, Any] | None:
    """The settings table of one config file at `root`; None (and why, in `notes`) if none."""
    raw = read_head(root / name, MAX_FILE_BYTES + 1)
    if raw is None:
        return None
    if len(raw) > MAX_FILE_BYTES:
        notes.append(f"Warning: {name} is larger than {MAX_FILE_BYTES // 1024} KiB; ignored")
        return None
    text = raw.decode("utf-8-sig", errors="replace")
    try:
        data = tomllib.loads(text) if name.endswith(".toml") else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        notes.append(f"Warning: {name} could not be read ({exc}); ignored")
        return None
    if not isinstance(data, dict):
        notes.append(f"Warning: {name} does not hold a table of settings; ignored")
        return None
    return data


def _add_redirect(found: HostedRules, where: str, source: object, target: object, status: int,
                  force: bool) -> None:
    if len(found.redirects) >= MAX_RULES:
        found.notes.append(f"Warning: {where}: more than {MAX_RULES} rules; ignored")
        return
    if not isinstance(source, str) or not isinstance(target, str):
        found.notes.append(f"Warning: {where}: the source and destination must be strings; ignored")
        return
    try:
        found.redirects.append(Redirect(source, target, status, force))
    except RuleError as exc:
        found.notes.append(f"Warning: {where}: {exc}; ignored")


def _add_headers(found: HostedRules, where: str, pattern: object, values: list[tuple[object, object]]) -> None:
    if not isinstance(pattern, str):
        found.notes.append(f"Warning: {where}: the path pattern must be a string; ignored")
        return
    kept: list[tuple[str, str]] = []
    for name, value in values:
        if not isinstance(name, str) or not isinstance(value, (str, int, float)):
            found.notes.append(f"Warning: {where}: header {name!r} needs a name and a value; ignored")
            continue
        text = " ".join(str(value).split())  # a multi-line TOML value is one header line
        if problem := header_problem(name, text):
            found.notes.append(f"Warning: {where}: {problem}; ignored")
            continue
        kept.append((name, text))
    if not kept:
        return
    if len(found.headers) >= MAX_RULES:
        found.notes.append(f"Warning: {where}: more than {MAX_RULES} rules; ignored")
        return
    try:
        found.headers.append(HeaderRule(pattern, tuple(kept)))
    except RuleError as exc:
        found.notes.append(f"Warning: {where}: {exc}; ignored")


def _tables(data: dict[str, Any], key: str, name: str, found: HostedRules) -> list[tuple[str, dict[str, Any]]]:
    items = data.get(key, [])
    if not isinstance(items, list):
        found.notes.append(f"Warning: {name} {key} must be a list; ignored")
        return []
    out = []
    for number, item in enumerate(items, 1):
        where = f"{name} {key} #{number}"
        if isinstance(item, dict):
            out.append((where, item))
        else:
            found.notes.append(f"Warning: {where} is not a table; ignored")
    return out


# -- Netlify ---------------------------------------------------------------------------------


def _netlify(data: dict[str, Any], found: HostedRules) -> None:
    for where, rule in _tables(data, "redirects", "netlify.toml", found):
        unsupported = sorted(set(rule) & {"conditions", "query", "signed", "headers"})
        if unsupported:
            found.notes.append(f"Warning: {where}: {', '.join(unsupported)} not supported; ignored")
            continue
        status = rule.get("status", 301)
        if not isinstance(status, int):
            found.notes.append(f"Warning: {where}: status must be a number; ignored")
            continue
        _add_redirect(found, where, rule.get("from"), rule.get("to"), status, rule.get("force") is True)
    for where, rule in _tables(data, "headers", "netlify.toml", found):
        values = rule.get("values", {})
        if not isinstance(values, dict):
            found.notes.append(f"Warning: {where}: values must be a table; ignored")
            continue
        _add_headers(found, where, rule.get("for"), list(values.items()))


# -- Vercel ----------------------------------------------------------------------------------


def _vercel(data: dict[str, Any], found: HostedRules) -> None:
    for key in ("routes", "cleanUrls", "trailingSlash"):
        if key in data:
            found.notes.append(f"Warning: vercel.json {key} is not supported; ignored"
                               + (" (path.html already answers /path)" if key == "cleanUrls" else ""))
    for key, forced in (("redirects", True), ("rewrites", False)):
        for where, rule in _tables(data, key, "vercel.json", found):
            if "has" in rule or "missing" in rule:
                found.notes.append(f"Warning: {where}: has / missing conditions are not supported; ignored")
                continue
            translated = _vercel_rule(rule.get("source"), rule.get("destination"))
            if isinstance(translated, str):
                found.notes.append(f"Warning: {where}: {translated}; ignored")
                continue
            if forced:
                code = rule.get("statusCode", 308 if rule.get("permanent", True) else 307)
                status = code if isinstance(code, int) else -1
            else:
                status = 200
            _add_redirect(found, where, *translated, status, forced)
    for where, rule in _tables(data, "headers", "vercel.json", found):
        if "has" in rule or "missing" in rule:
            found.notes.append(f"Warning: {where}: has / missing conditions are not supported; ignored")
            continue
        translated = _vercel_rule(rule.get("source"), "/")
        pairs = rule.get("headers", [])
        if isinstance(translated, str) or not isinstance(pairs, list):
            found.notes.append(f"Warning: {where}: "
                               + (translated if isinstance(translated, str) else "headers must be a list")
                               + "; ignored")
            continue
        values = [(p.get("key"), p.get("value")) if isinstance(p, dict) else (None, None) for p in pairs]
        _add_headers(found, where, translated[0], values)


def _vercel_rule(source: object, destination: object) -> tuple[str, str] | str:
    """A Vercel source and destination as a rule's pattern and target, or why they cannot be."""
    if not isinstance(source, str) or not isinstance(destination, str):
        return "source and destination must be strings"
    segments = source.strip("/").split("/") if source.strip("/") else []
    parts: list[str] = []
    splat: str | None = None
    for number, segment in enumerate(segments):
        whole = _SPLAT.fullmatch(segment)
        if whole and number == len(segments) - 1:
            parts.append("*")
            splat = whole.group("name") or "$1"
        elif _PARAM.fullmatch(segment) or re.fullmatch(r"[\w.~%@-]+", segment):
            parts.append(segment)
        else:
            return f"the source {source!r} uses a pattern this server does not read"
    target = destination
    if splat == "$1":
        target = target.replace("$1", ":splat")
    elif splat is not None:
        target = re.sub(rf":{splat}\b\*?", ":splat", target)
    if re.search(r"\$\d", target):
        return f"the destination {destination!r} uses a group the source does not have"
    return "/" + "/".join(parts), target
