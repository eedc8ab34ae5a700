"""Memory and pids cgroups that cap one build command, cgroup v1 or v2.

cgroup v1: each command gets <controller>/<the worker's own cgroup>/deployhub/<name>:
memory.limit_in_bytes and memory.memsw.limit_in_bytes (no way around it through swap), and
pids.max.

cgroup v2 (for each controller no v1 hierarchy has; Documentation/admin-guide/cgroup-v2.rst):
one group <the worker's own cgroup>/deployhub/<name> with memory.max, memory.swap.max 0,
memory.oom.group 1 and pids.max; why a command died is in memory.events (oom_kill) and
pids.events (max). A controller must be enabled in cgroup.subtree_control of every ancestor,
and the "no internal process" rule forbids that in a non-root cgroup that holds processes:
the worker's own cgroup does (the server and its workers), so when the kernel refuses
(EBUSY) they move to a leaf child, <own>/deployhub-worker, first. That needs the subtree
delegated to DeployHub's user (systemd `Delegate=yes`, or running as root). Checked only
against a directory laid out as cgroupfs (tests/test_cgroups.py), not a real v2 kernel.

Either way the groups are made under the worker's own cgroups, so whatever limits the
operator put on DeployHub still hold, and entered by a fixed shell wrapper *before* it execs
the command (bwrap): no repository code ever runs outside them. Where they cannot be made,
`problems` says why and the build goes on without that limit (or is refused, as the
settings say).

Everything here blocks (file writes, kill loops that sleep): call it from a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT_NAME = "deployhub"
# Enters each cgroup directory given before `--`, then execs the rest. Fixed text: the only
# inputs are arguments, and a failure to enter a cgroup ends it before anything else runs.
# The first argument is RLIMIT_FSIZE in 512-byte blocks (POSIX sh's unit), or "unlimited".
CGROUP_WRAPPER = (
    'ulimit -f "$1" || exit 125; shift; '
    'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; '
    'shift; exec "$@"'
)
STALE_AFTER = 60.0
V2_LEAF = "deployhub-worker"


def _cgroup_base(controller: str) -> Path | None:
    """<mount of the controller>/<the worker's own cgroup in it>, or None without one."""
    own = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if controller in names.split(","):
                own = path
                break
    if not own:
        return None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            head, _, tail = line.partition(" - ")
            parts, rest = head.split(), tail.split()
            if len(parts) < 5 or len(rest) < 3 or rest[0] != "cgroup":
                continue
            if controller not in rest[2].split(","):
                continue
            root, mount = parts[3], parts[4]
            if root != "/" and not (own == root or own.startswith(root + "/")):
                continue
            inner = own[len(root):] if root != "/" else own
            return Path(mount + inner.rstrip("/"))
    return None


def v2_location() -> tuple[Path, str] | None:
    """(the cgroup2 mount point, the worker's own cgroup in it), or None without one."""
    own = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:]
    if not own:
        return None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            head, _, tail = line.partition(" - ")
            parts, rest = head.split(), tail.split()
            if len(parts) >= 5 and rest and rest[0] == "cgroup2":
                root = parts[3].rstrip("/")
                if own == root or own.startswith(root + "/") or not root:
                    return Path(parts[4]), own[len(root):] or "/"
    return None


def v2_builds_dir(mount: Path, own: str, controllers: Sequence[str]) -> Path:
    """<own cgroup>/deployhub with `controllers` enabled for the builds' groups below it.

    Raises OSError (with a reason) when the hierarchy does not offer them to us.
    """
    base = mount / own.strip("/")
    if base.name == V2_LEAF:  # a worker started after the move: its cgroup is the leaf
        base = base.parent
    offered = _safe_read(base / "cgroup.controllers").split()
    missing = [c for c in controllers if c not in offered]
    if missing:
        raise OSError(errno.ENOTSUP, f"the cgroup v2 group {base} does not offer {' '.join(missing)} "
                                     f"(its cgroup.controllers: {' '.join(offered) or 'none'}); "
                                     "delegate them to DeployHub")
    enable = " ".join("+" + c for c in controllers)
    if not set(controllers) <= set(_safe_read(base / "cgroup.subtree_control").split()):
        try:
            _write(base / "cgroup.subtree_control", enable)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # The no-internal-process rule: move this cgroup's processes into a leaf first.
            leaf = base / V2_LEAF
            leaf.mkdir(exist_ok=True)
            for pid in _procs(base):
                with contextlib.suppress(ProcessLookupError):
                    _write(leaf / "cgroup.procs", str(pid))
            _write(base / "cgroup.subtree_control", enable)
    builds = base / CGROUP_ROOT_NAME
    builds.mkdir(exist_ok=True)
    if not set(controllers) <= set(_safe_read(builds / "cgroup.subtree_control").split()):
        _write(builds / "cgroup.subtree_control", enable)
    return builds


def builds_dir(controller: str) -> Path | None:
    """The directory that holds the builds' cgroups of `controller`, if there is one."""
    base = _cgroup_base(controller)
    return None if base is None else base / CGROUP_ROOT_NAME


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_key(path: Path, key: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


@dataclass
class Cgroups:
    """The memory and pids cgroups of one command; `wrap` makes the command enter them first."""

    memory: Path | None = None  # cgroup v1
    pids: Path | None = None  # cgroup v1
    v2: Path | None = None  # one cgroup v2 group for the controllers v1 does not have
    v2_controllers: tuple[str, ...] = ()
    memory_bytes: int = 0
    max_pids: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (controller, why)

    @classmethod
    def create(
        cls, name: str, *, memory_mb: int, max_pids: int,
        v2: tuple[Path, str] | None | bool = True,
    ) -> Cgroups:
        """`v2`: where cgroup v2 is, as (mount, own cgroup); True to find it; None for none."""
        groups = cls(memory_bytes=memory_mb * 1024 * 1024, max_pids=max_pids)
        wanted = [c for c, on in (("memory", memory_mb > 0), ("pids", max_pids > 0)) if on]
        rest = [c for c in wanted if builds_dir(c) is None]
        if memory_mb > 0 and "memory" not in rest:
            groups.memory = groups._make("memory", name, groups._limit_memory)
        if max_pids > 0 and "pids" not in rest:
            groups.pids = groups._make("pids", name, groups._limit_pids)
        if rest:
            groups._make_v2(name, rest, v2_location() if v2 is True else v2 or None)
        return groups

    def _make_v2(self, name: str, controllers: list[str], where: tuple[Path, str] | None) -> None:
        if where is None:
            for c in controllers:
                self.problems.append((c, f"no cgroup v1 or v2 {c} controller is available"))
            return
        path: Path | None = None
        try:
            parent = v2_builds_dir(*where, controllers)
            _remove_stale(parent)
            path = parent / name
            path.mkdir(exist_ok=True)
            if _procs(path):
                kill_all([path])
            if "memory" in controllers:
                _write(path / "memory.max", str(self.memory_bytes))
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")  # no way around the limit through swap
                if (path / "memory.oom.group").exists():
                    _write(path / "memory.oom.group", "1")  # an OOM kill ends the whole build
                if _read_int(path / "memory.max") != self.memory_bytes:
                    raise OSError(errno.EIO, f"memory.max did not keep {self.memory_bytes}")
            if "pids" in controllers:
                self._limit_pids(path)
        except OSError as exc:
            for c in controllers:
                self.problems.append((c, f"cannot set up cgroup v2 {c}: {exc.strerror or exc}"))
            with contextlib.suppress(OSError):
                if path is not None:
                    path.rmdir()
            return
        self.v2, self.v2_controllers = path, tuple(controllers)

    def _make(self, controller: str, name: str, limit: Callable[[Path], None]) -> Path | None:
        parent = builds_dir(controller)
        if parent is None:
            self.problems.append((controller, f"no cgroup v1 {controller} controller is mounted"))
            return None
        path = parent / name
        try:
            parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(parent)
            path.mkdir(exist_ok=True)
            if _procs(path):  # a leftover of a crashed worker with the same name
                kill_all([path])
            limit(path)
        except OSError as exc:
            self.problems.append((controller, f"cannot set up {path}: {exc.strerror or exc}"))
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return path

    def _limit_memory(self, path: Path) -> None:
        _write(path / "memory.limit_in_bytes", str(self.memory_bytes))
        swap = path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            _write(swap, str(self.memory_bytes))  # no way around the limit through swap
        for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            if (path / name).exists() and _read_int(path / name) != self.memory_bytes:
                raise OSError(errno.EIO, f"{name} did not keep {self.memory_bytes}")

    def _limit_pids(self, path: Path) -> None:
        _write(path / "pids.max", str(self.max_pids))
        if _read_int(path / "pids.max") != self.max_pids:
            raise OSError(errno.EIO, f"pids.max did not keep {self.max_pids}")

    @property
    def dirs(self) -> list[Path]:
        return [p for p in (self.memory, self.pids, self.v2) if p is not None]

    def limited(self, controller: str) -> bool:
        return getattr(self, controller) is not None or controller in self.v2_controllers

    def wrap(self, argv: Sequence[str], max_file_bytes: int = 0) -> list[str]:
        if not self.dirs and max_file_bytes <= 0:
            return list(argv)
        blocks = str(-(-max_file_bytes // 512)) if max_file_bytes > 0 else "unlimited"
        return ["/bin/sh", "-c", CGROUP_WRAPPER, "sh", blocks, *map(str, self.dirs), "--", *argv]

    def out_of_memory(self) -> bool:
        if self.v2 is not None and "memory" in self.v2_controllers:
            events = self.v2 / "memory.events"
            return _read_key(events, "oom_kill") > 0 or _read_key(events, "oom") > 0
        if self.memory is None:
            return False
        control = self.memory / "memory.oom_control"
        if _read_key(control, "oom_kill") > 0 or _read_key(control, "under_oom") > 0:
            return True
        if "oom_kill " in _safe_read(control):
            return False  # the kernel counts OOM kills and there were none
        return any(
            (_read_int(self.memory / name) or 0) > 0
            for name in ("memory.failcnt", "memory.memsw.failcnt")
        )

    def hit_pids_limit(self) -> bool:
        group = self.v2 if "pids" in self.v2_controllers else self.pids
        return group is not None and _read_key(group / "pids.events", "max") > 0

    def close(self) -> None:
        """Kill whatever is left in the groups (daemons, a fork bomb) and remove them."""
        if self.v2 is not None and (self.v2 / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.v2 / "cgroup.kill", "1")  # v2 (Linux 5.14+): all at once
        kill_all(self.dirs)
        for path in self.dirs:
            for _ in range(200):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    kill_all([path])
                    time.sleep(0.01)


def _remove_stale(parent: Path) -> None:
    """Remove the empty cgroups a killed worker left behind. The kernel refuses to remove one
    that holds a process, and a fresh one may be about to get its first: only old ones go."""
    now = time.time()
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            with contextlib.suppress(OSError):
                if child.is_dir() and now - child.stat().st_mtime > STALE_AFTER and not _procs(child):
                    child.rmdir()


def _safe_read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _procs(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_all(dirs: Sequence[Path], deadline: float = 5.0) -> None:
    """SIGKILL every process in `dirs` until they are empty (a fork bomb cannot outrun it:
    each pass kills the forkers, and pids.max caps how many there can be)."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        pids = [pid for path in dirs for pid in _procs(path)]
        if not pids:
            return
        for pid in pids:
            _kill_if_in(pid, dirs)
        time.sleep(0.005)


def _kill_if_in(pid: int, dirs: Sequence[Path]) -> None:
    # A pidfd pins the process: the check and the kill cannot hit a recycled pid.
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if pid in {p for path in dirs for p in _procs(path)}:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)
