"""The submodules a commit pins: where each one goes, from which URL, at which commit.

Read from git's own output (`git ls-files --stage -z` for the gitlinks, `git config -f
.gitmodules -z --list` for their URLs), never by running anything the repository holds. What
to fetch is decided here; worker/build.py fetches it, each URL checked as the repository's
own URL is.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

SUBMODULES_MAX = 20  # in all, nested ones included
DEPTH_MAX = 3  # submodules of submodules of submodules, no deeper
GITMODULES_MAX = 64 * 1024
GITLINK_MODE = b"160000"
# git@github.com:owner/repo.git, which git reads as ssh; not c:\path, not a URL with ://.
SCP_LIKE = re.compile(r"(?:[\w.+-]+@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?!//)(?P<path>[^\\].*)")


@dataclass(frozen=True)
class Submodule:
    path: str  # where it goes, relative to the repository that pins it
    sha: str  # the commit that repository pins
    url: str  # as its .gitmodules gives it; "" when it gives none


def gitmodules_size(checkout: Path) -> int | None:
    """The size of `checkout`'s .gitmodules; None when it has none (or it is a symlink)."""
    try:
        info = os.lstat(checkout / ".gitmodules")
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def gitlinks(stage: bytes) -> dict[str, str]:
    """Path -> pinned commit of each gitlink in `git ls-files --stage -z` output."""
    found: dict[str, str] = {}
    for entry in stage.split(b"\0"):
        info, _, path = entry.partition(b"\t")
        fields = info.split()
        if len(fields) == 3 and fields[0] == GITLINK_MODE and path:
            found[path.decode(errors="replace")] = fields[1].decode()
    return found


def declared_urls(listing: bytes) -> dict[str, str]:
    """Path -> URL of each submodule in `git config -f .gitmodules -z --list` output."""
    paths: dict[str, str] = {}
    urls: dict[str, str] = {}
    for entry in listing.split(b"\0"):
        key, _, value = entry.decode(errors="replace").partition("\n")
        if not key.lower().startswith("submodule."):
            continue
        name, _, field = key[len("submodule."):].rpartition(".")
        if field.lower() == "path":
            paths[name] = value.strip().strip("/")
        elif field.lower() == "url":
            urls[name] = value.strip()
    return {path: urls.get(name, "") for name, path in paths.items()}


def pinned(stage: bytes, listing: bytes) -> list[Submodule]:
    """The submodules of one repository, by path."""
    urls = declared_urls(listing)
    return [Submodule(path, sha, urls.get(path, "")) for path, sha in sorted(gitlinks(stage).items())]


def fetch_url(url: str, parent: str) -> tuple[str, str]:
    """The http(s) URL to fetch a submodule from, and a note when it is not the one written:
    a relative URL is resolved against its parent repository's, as git does, and an ssh
    one (`git@host:owner/repo.git`, `ssh://git@host/owner/repo.git`) is fetched over https,
    which public repositories on every Git host answer. Anything else is returned as it is,
    for the URL check to refuse with its own reason."""
    if url.startswith(("./", "../")):
        resolved = urljoin(parent.rstrip("/") + "/", url)
        return resolved, f"{url} is relative to {parent}"
    parts = urlsplit(url)
    if parts.scheme.lower() in ("ssh", "git+ssh") and parts.hostname:
        https = f"https://{parts.hostname}{parts.path}"
        return https, f"{url} is an ssh URL; fetched over https, as public repositories allow"
    if not parts.scheme and (match := SCP_LIKE.fullmatch(url)):
        https = f"https://{match.group('host')}/{match.group('path').lstrip('/')}"
        return https, f"{url} is an ssh URL; fetched over https, as public repositories allow"
    return url, ""
