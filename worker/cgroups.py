"""Cgroup v1 memory and pids groups that cap one build command.

Each command gets <controller>/<the worker's own cgroup>/deployhub/<name>: memory.limit_in_bytes
and memory.memsw.limit_in_bytes (no way around it through swap), and pids.max. They are made
under the worker's own cgroups, so whatever limits the operator put on DeployHub still hold,
and entered by a fixed shell wrapper *before* it execs the command (bwrap): no repository code
ever runs outside them. Where they cannot be made, `problems` says why and the build goes on
without that limit.

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
CGROUP_WRAPPER = (
    'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; '
    'shift; exec "$@"'
)
STALE_AFTER = 60.0


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

    memory: Path | None = None
    pids: Path | None = None
    memory_bytes: int = 0
    max_pids: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (controller, why)

    @classmethod
    def create(cls, name: str, *, memory_mb: int, max_pids: int) -> Cgroups:
        groups = cls(memory_bytes=memory_mb * 1024 * 1024, max_pids=max_pids)
        if memory_mb > 0:
            groups.memory = groups._make("memory", name, groups._limit_memory)
        if max_pids > 0:
            groups.pids = groups._make("pids", name, groups._limit_pids)
        return groups

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
        return [p for p in (self.memory, self.pids) if p is not None]

    def wrap(self, argv: Sequence[str]) -> list[str]:
        if not self.dirs:
            return list(argv)
        return ["/bin/sh", "-c", CGROUP_WRAPPER, "sh", *map(str, self.dirs), "--", *argv]

    def out_of_memory(self) -> bool:
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
        return self.pids is not None and _read_key(self.pids / "pids.events", "max") > 0

    def close(self) -> None:
        """Kill whatever is left in the groups (daemons, a fork bomb) and remove them."""
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
