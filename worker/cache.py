"""The build cache of one project: the `node_modules` its last successful build installed,
and the package managers' own download caches.

Per project and per owner (a project name deleted and taken by another token starts empty):

  <data>/cache/projects/<project>/<owner digest>/
      modules/         node_modules of the last successful build (local)
      modules.json     its manifest, written last: the key and a digest of every entry
      managers/        npm cache, yarn cache, pnpm store, bun and corepack caches, shown to
                       the build at bwrap.INSIDE_CACHE; no other project's builds see it
  <bucket>/cache/<project>/<owner digest>/modules.tar.gz and modules.json   (storage)

The entry is used only when its key matches this build's: the lockfile's SHA-256, the Node
version, the package manager and the install command. A locally restored tree is a
hardlinked copy (ext4 has no reflinks; a link costs a few microseconds a file), verified
while it is made: the digest covers every path, type, size and mtime, so an entry that was
cut short, or a file a build wrote in place through a link, makes the whole entry ignored.
An archive is verified by its SHA-256 before it is unpacked. Each project holds one entry:
saving replaces the last one, and a `node_modules` over DEPLOYHUB_BUILD_CACHE_MAX_MB is not
saved. Everything here blocks on the disk: call it from a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import platform
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from deployhub.storage import build_cache_dir, build_cache_prefix
from deployhub.validation import check_project

from .disk import usage

FORMAT = 1
ENTRY = "modules"
MANIFEST = "modules.json"
ARCHIVE = "modules.tar.gz"
MANAGERS = "managers"
# Variables that point each package manager at its directory under the managers' cache.
MANAGER_DIRS = {
    "npm_config_cache": "npm",  # npm, and npx's downloads of pnpm, yarn 1 and bun
    "YARN_CACHE_FOLDER": "yarn",  # yarn 1 (and Berry's cacheFolder)
    "YARN_GLOBAL_FOLDER": "yarn-berry",  # Berry's global cache (enableGlobalCache)
    # pnpm's content-addressable store ($XDG_DATA_HOME/pnpm/store: npm warns about an
    # npm_config_store_dir it does not know) and its metadata cache, and other tools'.
    "XDG_DATA_HOME": "xdg-data",
    "XDG_CACHE_HOME": "xdg-cache",
    "BUN_INSTALL_CACHE_DIR": "bun",
    "COREPACK_HOME": "corepack",  # the Yarn Berry releases corepack fetched
}
# Top-level entries of node_modules that tools rewrite in place (webpack's and babel's
# caches, the managers' own state files): copied on restore, never linked to the entry, so a
# build that fails after writing them leaves the entry intact.
COPIED = frozenset({".cache", ".vite", ".package-lock.json", ".yarn-integrity", ".modules.yaml",
                    ".yarn-state.yml"})


class CacheError(Exception):
    """The entry cannot be used; the message says why (for the build log)."""


@dataclasses.dataclass(frozen=True)
class Key:
    """What an entry must have been installed from to be used by a build."""

    lockfile: str  # relative to the repository
    lockfile_sha256: str
    node: str
    manager: str  # e.g. "npm@11.6.0", "pnpm@9"
    install: tuple[str, ...]
    platform: str = dataclasses.field(default_factory=lambda: platform.machine())

    def mismatch(self, other: object) -> str | None:
        """Why an entry keyed `other` does not fit this build, or None when it does."""
        if not isinstance(other, Mapping):
            return "its manifest has no key (corrupt)"
        mine = dataclasses.asdict(self)
        mine["install"] = list(self.install)
        if other.get("lockfile") != self.lockfile or other.get("lockfile_sha256") != self.lockfile_sha256:
            return f"{self.lockfile} changed since it was saved"
        if other.get("node") != self.node:
            return f"it was installed with Node {other.get('node')}, this build runs Node {self.node}"
        if other.get("manager") != self.manager:
            return f"it was installed by {other.get('manager')}, this build installs with {self.manager}"
        if other != mine:
            return "it was installed with another install command or on another machine"
        return None


def key_for(root: Path, lockfile: str, node: str, manager: str, install: list[str]) -> Key | None:
    """The key of a build installing in `root` from `lockfile`; None without a lockfile (an
    install without one is not repeatable, so nothing is restored for it)."""
    if not lockfile:
        return None
    path = root / lockfile
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return Key(lockfile, digest.hexdigest(), node, manager, tuple(install))


def npm_version(node_home: Path | None) -> str:
    """The version of the npm a build runs (the fetched Node's, else this machine's), read
    from its package.json: a second of `npm --version` saved."""
    if node_home is not None:
        package = node_home / "lib" / "node_modules" / "npm" / "package.json"
    else:
        found = shutil.which("npm")
        if not found:
            return ""
        package = Path(os.path.realpath(found)).parent.parent / "package.json"
    with contextlib.suppress(OSError, ValueError):
        version = json.loads(package.read_text()).get("version")
        return str(version) if isinstance(version, str) else ""
    return ""


def project_dir(data_dir: Path, project: str, owner: str) -> Path:
    """<data>/cache/projects/<project>/<owner digest>: from the validated name only."""
    return build_cache_dir(data_dir, check_project(project)) / owner_digest(owner)


def owner_digest(owner: str) -> str:
    return hashlib.sha256(f"owner\0{owner}".encode()).hexdigest()[:16]


def storage_prefix(project: str, owner: str) -> str:
    return f"{build_cache_prefix(check_project(project))}{owner_digest(owner)}/"


def managers_dir(root: Path) -> Path:
    """The package managers' caches under `root`, made if missing."""
    for name in MANAGER_DIRS.values():
        (root / name).mkdir(parents=True, exist_ok=True)
    return root


def manager_env(inside: str) -> dict[str, str]:
    """The variables that send every package manager's cache to `inside` (as the build sees
    that directory)."""
    return {variable: f"{inside}/{name}" for variable, name in MANAGER_DIRS.items()}


def bound_managers(root: Path, max_bytes: int) -> str | None:
    """Empty the managers' caches when they outgrow `max_bytes`; what was done, if anything."""
    used = usage([root])
    if max_bytes <= 0 or used <= max_bytes:
        return None
    shutil.rmtree(root, ignore_errors=True)
    return (f"Package manager caches emptied: {used // 2**20} MiB, over "
            f"DEPLOYHUB_BUILD_CACHE_MAX_MB ({max_bytes // 2**20} MiB)")


# -- the local entry ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One restore or save of a project's entry at a time (builds of a project may overlap)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tally:
    """A digest of a tree's entries in walk order: path, type, size, mtime, link target."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.files = 0
        self.bytes = 0

    def add(self, rel: str, st: os.stat_result, target: str = "") -> None:
        kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
        size = st.st_size if kind == "f" else 0
        mtime = st.st_mtime_ns if kind == "f" else 0
        self.hash.update(f"{rel}\0{kind}\0{size}\0{mtime}\0{stat.S_IMODE(st.st_mode)}\0{target}\n".encode())
        if kind == "f":
            self.files += 1
            self.bytes += size

    def digest(self) -> str:
        return self.hash.hexdigest()


def _tree(top: Path) -> Iterator[tuple[str, os.stat_result, str]]:
    """Depth-first, names sorted: the same order at save and at restore."""
    def visit(rel: str) -> Iterator[tuple[str, os.stat_result, str]]:
        base = top / rel if rel else top
        with os.scandir(base) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                yield child, st, os.readlink(entry.path)
            elif stat.S_ISDIR(st.st_mode):
                yield child, st, ""
                yield from visit(child)
            elif stat.S_ISREG(st.st_mode):
                yield child, st, ""
    return visit("")


class LocalCache:
    """A project's entry on this machine's disk."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes

    def restore(self, key: Key, target: Path) -> str:
        """Make `target` (node_modules, absent) a verified copy of the entry; the log line.
        CacheError when there is none to use."""
        with _locked(self.dir):
            manifest = _read_manifest(self.dir / MANIFEST)
            if why := key.mismatch(manifest.get("key")):
                raise CacheError(why)
            entry = self.dir / ENTRY
            if not entry.is_dir():
                raise CacheError("its files are missing (corrupt)")
            tmp = target.with_name(f".{target.name}.restoring")
            tally = Tally()
            tmp.mkdir()
            try:
                for rel, st, link in _tree(entry):
                    tally.add(rel, st, link)
                    _place(entry / rel, tmp / rel, st, link, rel.split("/", 1)[0] in COPIED)
                if tally.digest() != manifest.get("digest") or tally.files != manifest.get("files"):
                    raise CacheError("its files do not match its manifest (corrupt: written "
                                     "after it was saved, or cut short)")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.rename(tmp, target)
        return f"{tally.files} files, {tally.bytes / 2**20:.0f} MiB"

    def save(self, key: Key, source: Path, deployment: str) -> str:
        """Make `source` (node_modules, which is moved) the project's entry; the log line.
        CacheError when it is not saved."""
        if source.is_symlink() or not source.is_dir():
            raise CacheError("the build left no node_modules")
        self.dir.mkdir(parents=True, exist_ok=True)
        new = self.dir / f".new-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(source, new)  # the build directory is deleted next: move, do not copy
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copytree(source, new, symlinks=True, copy_function=_link_or_copy)
        try:
            tally = Tally()
            for rel, st, link in _tree(new):
                tally.add(rel, st, link)
            if self.max_bytes and tally.bytes > self.max_bytes:
                raise CacheError(
                    f"node_modules holds {tally.bytes // 2**20} MiB, more than "
                    f"DEPLOYHUB_BUILD_CACHE_MAX_MB ({self.max_bytes // 2**20} MiB)"
                )
            manifest = {"format": FORMAT, "key": {**dataclasses.asdict(key), "install": list(key.install)},
                        "digest": tally.digest(), "files": tally.files, "bytes": tally.bytes,
                        "deployment": deployment, "saved_at": time.time()}
            old = self.dir / f".old-{os.getpid()}-{secrets.token_hex(4)}"
            with _locked(self.dir):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / MANIFEST).unlink()
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.dir / ENTRY, old)
                os.rename(new, self.dir / ENTRY)
                _write_atomically(self.dir / MANIFEST, json.dumps(manifest).encode())
        finally:
            shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        _remove_other_owners(self.dir)
        return f"{tally.files} files, {tally.bytes / 2**20:.0f} MiB"


def _place(source: Path, target: Path, st: os.stat_result, link: str, copy: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        os.symlink(link, target)
    elif stat.S_ISDIR(st.st_mode):
        target.mkdir()
        os.chmod(target, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    elif copy:
        shutil.copy2(source, target)
    else:
        _link_or_copy(str(source), str(target))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
            raise
        shutil.copy2(source, target)


def _read_manifest(path: Path) -> dict[str, object]:
    try:
        return parse_manifest(path.read_bytes())
    except FileNotFoundError:
        return parse_manifest(None)
    except OSError:
        raise CacheError("its manifest is unreadable (corrupt)") from None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_other_owners(directory: Path) -> None:
    """Entries of the same project name under earlier owners: one entry per project."""
    for sibling in directory.parent.iterdir():
        if sibling != directory and sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)


# -- the entry as an archive in storage (builds on ECS) ----------------------------------------


def pack(source: Path, archive: Path) -> tuple[str, int]:
    """node_modules as a gzip tarball (level 1: compressing is on the build's time); its
    SHA-256 and size."""
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(source, arcname=ENTRY)
    return file_sha256(archive), archive.stat().st_size


def unpack(archive: Path, target: Path) -> int:
    """Unpack a verified archive to `target` (node_modules); the number of files. The `data`
    filter refuses absolute paths, links out of the tree and device files."""
    tmp = target.with_name(f".{target.name}.restoring")
    tmp.mkdir()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name == ENTRY or m.name.startswith(ENTRY + "/")]
            tar.extractall(tmp, members=members, filter="data")
        os.rename(tmp / ENTRY, target)
        return sum(1 for m in members if m.isfile())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def archive_manifest(key: Key, sha256: str, size: int, deployment: str) -> bytes:
    return json.dumps({"format": FORMAT, "key": {**dataclasses.asdict(key), "install": list(key.install)},
                       "sha256": sha256, "bytes": size, "deployment": deployment,
                       "saved_at": time.time()}).encode()


def parse_manifest(raw: bytes | None) -> dict[str, object]:
    if raw is None:
        raise CacheError("there is none yet (the first successful build saves it)")
    try:
        data = json.loads(raw)
    except ValueError:
        raise CacheError("its manifest is unreadable (corrupt)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("key"), dict):
        raise CacheError("its manifest is not one this version writes (corrupt or old)")
    return data
