"""The build cache of one project: what its last successful build's install wrote (every
`node_modules` of a workspace, Yarn Plug'n'Play's files: worker/workspaces.py says where),
and the package managers' own download caches.

Per project and per owner (a project name deleted and taken by another token starts empty):

  <data>/cache/projects/<project>/<owner digest>/
      modules/         those paths of the last successful build, as in the repository
                       (modules/node_modules, modules/apps/web/node_modules, ...) (local)
      modules.json     its manifest, written last: the key, the paths and a digest of every entry
      managers/        npm cache, yarn cache, pnpm store, bun and corepack caches, shown to
                       the build at bwrap.INSIDE_CACHE; no other project's builds see it
  <bucket>/cache/<project>/<owner digest>/modules.tar.gz and modules.json   (storage)

The entry is used only when its key matches this build's: the lockfile's SHA-256, the Node
version, the package manager and the install command. A locally restored tree is a
hardlinked copy (ext4 has no reflinks; a link costs a few microseconds a file), verified
while it is made: the digest covers every path, type, size and mtime, so an entry that was
cut short, or a file a build wrote in place through a link, makes the whole entry ignored.
An archive is verified by its SHA-256 before it is unpacked. An entry holds what an untrusted
build wrote, so nothing is placed before it is checked: its paths must be ones this build's
install writes, under real directories, and no symlink in it may lead out of the repository
(an archive's members likewise); anything else is "tampered" and ignored. Each project holds one entry:
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
import posixpath
import secrets
import shutil
import stat
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from deployhub.storage import build_cache_dir, build_cache_prefix
from deployhub.validation import check_project

from . import workspaces
from .disk import usage

FORMAT = 2  # 2: several paths (workspaces, Plug'n'Play), named relative to the repository
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

    def restore(self, key: Key, repo: Path, allowed: Sequence[str]) -> tuple[str, list[str]]:
        """Make the entry's paths (each one of `allowed`, all absent) under `repo` verified
        copies of it; the log line and the paths. CacheError when there is none to use."""
        with _locked(self.dir):
            manifest = _read_manifest(self.dir / MANIFEST)
            if why := key.mismatch(manifest.get("key")):
                raise CacheError(why)
            paths = check_paths(manifest.get("paths"), allowed)
            entry = self.dir / ENTRY
            tally = Tally()
            placed: list[tuple[Path, Path]] = []  # (made, its final place)
            try:
                for path in paths:
                    top = entry / path
                    if top.is_symlink() or not top.exists():
                        raise CacheError(f"its {path} is missing (corrupt)")
                    target = ready_parent(repo, path)
                    tmp = target.with_name(f".{target.name}.restoring")
                    placed.append((tmp, target))
                    for rel, st, link in _walk(top, path):
                        tally.add(rel, st, link)
                        if link and escapes(rel, link):
                            raise CacheError(f"tampered: {rel} is a symlink to {link}, out of "
                                             "the build's tree")
                        sub = rel[len(path) + 1:]
                        copy = not sub or sub.split("/", 1)[0] in COPIED
                        _place(entry / rel, tmp / sub if sub else tmp, st, link, copy)
                if tally.digest() != manifest.get("digest") or tally.files != manifest.get("files"):
                    raise CacheError("its files do not match its manifest (corrupt: written "
                                     "after it was saved, or cut short)")
            except BaseException:
                for tmp, _ in placed:
                    remove(tmp)
                raise
            for tmp, target in placed:
                os.rename(tmp, target)
        return f"{tally.files} files, {tally.bytes / 2**20:.0f} MiB", paths

    def save(self, key: Key, repo: Path, paths: Sequence[str], deployment: str) -> str:
        """Make `paths` under `repo` (which are moved) the project's entry; the log line.
        CacheError when it is not saved."""
        paths = saved_paths(repo, paths)
        self.dir.mkdir(parents=True, exist_ok=True)
        new = self.dir / f".new-{os.getpid()}-{secrets.token_hex(4)}"
        old: Path | None = None
        try:
            tally = Tally()
            for path in paths:
                (new / path).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(repo / path, new / path)  # the build directory is deleted next
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    if (repo / path).is_dir():
                        shutil.copytree(repo / path, new / path, symlinks=True,
                                        copy_function=_link_or_copy)
                    else:
                        shutil.copy2(repo / path, new / path)
                for rel, st, link in _walk(new / path, path):
                    if link and escapes(rel, link):
                        raise CacheError(f"{rel} is a symlink to {link}, out of the build's tree")
                    tally.add(rel, st, link)
            if self.max_bytes and tally.bytes > self.max_bytes:
                raise CacheError(
                    f"{', '.join(paths)} hold {tally.bytes // 2**20} MiB, more than "
                    f"DEPLOYHUB_BUILD_CACHE_MAX_MB ({self.max_bytes // 2**20} MiB)"
                )
            manifest = {"format": FORMAT, "key": {**dataclasses.asdict(key), "install": list(key.install)},
                        "paths": paths, "digest": tally.digest(), "files": tally.files,
                        "bytes": tally.bytes, "deployment": deployment, "saved_at": time.time()}
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
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _remove_other_owners(self.dir)
        return f"{tally.files} files, {tally.bytes / 2**20:.0f} MiB"


# -- what an entry may hold, and where it may go ------------------------------------------------


def escapes(rel: str, link: str) -> bool:
    """Whether a symlink at `rel` (relative to the repository) pointing to `link` leads out of
    the repository (or anywhere absolute), judged by its text alone."""
    if os.path.isabs(link):
        return True
    return workspaces.clean(posixpath.join(posixpath.dirname(rel), link)) is None


def check_paths(listed: object, allowed: Sequence[str]) -> list[str]:
    """The paths an entry's manifest lists, each one of `allowed` (where this build's install
    writes, absent from its checkout)."""
    if not isinstance(listed, list) or not listed or not all(isinstance(p, str) for p in listed):
        raise CacheError("its manifest lists no paths (corrupt)")
    for path in listed:
        if workspaces.clean(path) != path or not path:
            raise CacheError(f"tampered: it lists {path!r}, a path out of the build's tree")
        if path not in allowed:
            raise CacheError(f"it holds {path}, which this build's install does not write (the "
                             "repository has its own, or its workspaces changed)")
    return sorted(set(listed))


def ready_parent(repo: Path, path: str) -> Path:
    """`repo/path`, absent, its parent a real directory under `repo` (made if missing): what
    is placed there cannot land anywhere else."""
    parent = posixpath.dirname(path)
    parts = [p for p in parent.split("/") if p]
    here = repo
    for part in parts:
        here = here / part
        try:
            st = here.lstat()
        except FileNotFoundError:
            here.mkdir()
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise CacheError(f"{parent} is not a directory in the checkout (a symlink?)")
    target = repo / path
    if os.path.lexists(target):
        raise CacheError(f"the checkout has its own {path}")
    return target


def saved_paths(repo: Path, paths: Sequence[str]) -> list[str]:
    """Those of `paths` the install left: each a real file or directory under real
    directories (a build may have replaced one with a symlink)."""
    found = []
    for path in sorted(set(paths)):
        if workspaces.clean(path) != path or not workspaces.real_dir(repo, posixpath.dirname(path)):
            continue
        try:
            st = (repo / path).lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            found.append(path)
    if not found:
        raise CacheError("the build left no node_modules")
    return found


def _walk(top: Path, rel: str) -> Iterator[tuple[str, os.stat_result, str]]:
    """`top` (named `rel`) and, for a directory, all under it: `_tree`'s order."""
    st = top.lstat()
    if stat.S_ISLNK(st.st_mode):
        yield rel, st, os.readlink(top)
        return
    yield rel, st, ""
    if stat.S_ISDIR(st.st_mode):
        for sub, child, link in _tree(top):
            yield f"{rel}/{sub}", child, link


def remove(path: Path) -> None:
    """A file, link or tree (rmtree never follows links); nothing when it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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


def pack(repo: Path, paths: Sequence[str], archive: Path) -> tuple[str, int, list[str]]:
    """`paths` under `repo` as a gzip tarball (level 1: compressing is on the build's time);
    its SHA-256, size and the paths it holds. CacheError when one holds a symlink out of the
    tree."""
    paths = saved_paths(repo, paths)
    for path in paths:
        for rel, _, link in _walk(repo / path, path):
            if link and escapes(rel, link):
                raise CacheError(f"{rel} is a symlink to {link}, out of the build's tree")
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for path in paths:
            tar.add(repo / path, arcname=f"{ENTRY}/{path}")
    return file_sha256(archive), archive.stat().st_size, paths


def unpack(archive: Path, repo: Path, listed: object, allowed: Sequence[str], work: Path) -> tuple[int, list[str]]:
    """Unpack a verified archive's `listed` paths (each one of `allowed`) under `repo`; the
    number of files and the paths. Every member is checked first: a name or a link out of
    its path, or anything but files, directories and links, and nothing is unpacked (the
    `data` filter, which refuses absolute paths, links out of the tree and device files,
    checks again)."""
    paths = check_paths(listed, allowed)
    tmp = work / f".{ENTRY}.restoring"
    tmp.mkdir()
    placed: list[Path] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            files = 0
            for member in members:
                rel = _member_path(member.name, paths)
                if member.isfile():
                    files += 1
                elif member.issym():
                    if escapes(rel, member.linkname):
                        raise CacheError(f"tampered: {rel} is a symlink to {member.linkname}, "
                                         "out of the build's tree")
                elif member.islnk():
                    _member_path(member.linkname, paths)
                elif not member.isdir():
                    raise CacheError(f"tampered: {rel} is neither a file, a directory nor a link")
            names = {m.name for m in members}
            if missing := [p for p in paths if f"{ENTRY}/{p}" not in names]:
                raise CacheError(f"its archive lacks {', '.join(missing)} (corrupt)")
            try:
                tar.extractall(tmp, members=members, filter="data")
            except tarfile.FilterError as exc:
                raise CacheError(f"tampered: {exc}") from None
        targets = [ready_parent(repo, path) for path in paths]
        for path, target in zip(paths, targets, strict=True):
            os.rename(tmp / ENTRY / path, target)
            placed.append(target)
        return files, paths
    except BaseException:
        for target in placed:
            remove(target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _member_path(name: str, paths: Sequence[str]) -> str:
    """The path (relative to the repository) of an archive member named `name`, which must be
    one of `paths` or under one."""
    rel = name.removeprefix(f"{ENTRY}/") if name.startswith(f"{ENTRY}/") else None
    if rel is None or workspaces.clean(rel) != rel or not rel:
        raise CacheError(f"tampered: its archive holds {name!r}, a path out of the build's tree")
    if not any(rel == p or rel.startswith(p + "/") for p in paths):
        raise CacheError(f"tampered: its archive holds {name!r}, which its manifest does not list")
    return rel


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def archive_manifest(key: Key, paths: Sequence[str], sha256: str, size: int, deployment: str) -> bytes:
    return json.dumps({"format": FORMAT, "key": {**dataclasses.asdict(key), "install": list(key.install)},
                       "paths": list(paths), "sha256": sha256, "bytes": size, "deployment": deployment,
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
