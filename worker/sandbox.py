"""The sandbox of one build: each untrusted command runs under bubblewrap (worker/bwrap.py
says what the build sees), inside cgroups that cap it (worker/cgroups.py).

`Sandbox.prepare` wraps one command and removes its cgroups afterwards; the cgroup work blocks
(kill loops that sleep, rmdir retries), so it runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deployhub.settings import Settings

from . import bwrap
from .bwrap import INSIDE_CACHE, INSIDE_HOME, INSIDE_NODE, INSIDE_PATH, INSIDE_SRC
from .cgroups import Cgroups
from .detect import BuildError
from .proc import Emit

LIMIT_SETTINGS = {"memory": "DEPLOYHUB_BUILD_MEMORY_MB", "pids": "DEPLOYHUB_BUILD_MAX_PROCESSES"}


@dataclass
class Prepared:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    pass_fds: tuple[int, ...]
    cgroups: Cgroups


class Sandbox:
    """How one build runs its untrusted commands; `prepare` wraps one command."""

    def __init__(self, settings: Settings, name: str, work: Path, src: Path, emit: Emit) -> None:
        self.settings = settings
        self.name = name
        self.work = work
        self.src = src
        self.emit = emit
        self.home = work / "home"
        self.cache = settings.data_dir / "cache" / "npm"
        self.node: Path | None = None  # a fetched Node release (worker/node.py), read-only inside
        self._announced = False
        self._count = 0

    @property
    def isolated(self) -> bool:
        return self.settings.sandbox == "bwrap"

    def env(self, host_env: Mapping[str, str]) -> dict[str, str]:
        """The command's environment: `host_env` (already clean) with sandbox paths."""
        if not self.isolated:
            return dict(host_env)
        env = {k: v for k, v in host_env.items() if k not in ("PWD", "OLDPWD")}
        env.update({
            "PATH": f"{INSIDE_NODE}/bin:{bwrap.inside_path()}" if self.node else bwrap.inside_path(),
            "HOME": INSIDE_HOME,
            "npm_config_cache": INSIDE_CACHE,
            "TMPDIR": "/tmp",
            "USER": "build",
            "LOGNAME": "build",
        })
        return env

    @contextlib.asynccontextmanager
    async def prepare(self, argv: Sequence[str], host_env: Mapping[str, str]) -> AsyncIterator[Prepared]:
        binary = ""
        if self.isolated:
            if problem := await asyncio.to_thread(bwrap.problem, self.settings.bwrap):
                raise BuildError(problem)
            binary = bwrap.find_binary(self.settings.bwrap) or "bwrap"
        self._count += 1
        groups = await self._create_cgroups(f"{self.name}-{self._count}")
        args_fd = -1
        try:
            self._announce(groups)
            env = self.env(host_env)
            self.home.mkdir(parents=True, exist_ok=True)
            self.cache.mkdir(parents=True, exist_ok=True)
            if self.isolated:
                etc = self.work / "etc"
                bwrap.write_identity(etc)
                options = await asyncio.to_thread(  # the first call asks bwrap --help
                    bwrap.options, binary, src=self.src, home=self.home, cache=self.cache,
                    etc=etc, env=env, node=self.node,
                )
                # Options go through a memfd, not argv: the sandbox's pid 1 is bwrap, and its
                # command line would otherwise show the host's paths to the build.
                args_fd = os.memfd_create("bwrap-args", 0)
                os.write(args_fd, b"".join(o.encode() + b"\0" for o in options))
                os.lseek(args_fd, 0, os.SEEK_SET)
                command = [binary, "--args", str(args_fd), "--", *argv]
                # bwrap is the sandbox's pid 1, whose environ the build can read: give it
                # nothing worth reading (cwd / keeps the host's paths out of its PWD too).
                yield Prepared(groups.wrap(command), {"PATH": INSIDE_PATH}, Path("/"),
                               (args_fd,), groups)
            else:
                yield Prepared(groups.wrap(list(argv)), env, self.src, (), groups)
        finally:
            if args_fd >= 0:
                os.close(args_fd)
            # Shielded: a second cancel must not leave the groups (or a fork bomb in them).
            await asyncio.shield(asyncio.to_thread(groups.close))

    async def _create_cgroups(self, name: str) -> Cgroups:
        job = asyncio.ensure_future(asyncio.to_thread(
            Cgroups.create, name,
            memory_mb=self.settings.build_memory_mb, max_pids=self.settings.build_max_processes,
        ))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread cannot be stopped: remove what it makes once it is done.
            job.add_done_callback(_close_abandoned)
            raise

    def _announce(self, groups: Cgroups) -> None:
        if self._announced:
            return
        self._announced = True
        if self.isolated:
            self.emit("system", f"Sandbox: bubblewrap; the repository is at {INSIDE_SRC}, "
                                "the rest of this machine is not visible")
        else:
            self.emit("system", "Warning: DEPLOYHUB_SANDBOX=none: build commands run WITHOUT "
                                "isolation, with DeployHub's own rights on this machine")
        limits = []
        if groups.memory is not None:
            limits.append(f"memory {self.settings.build_memory_mb} MiB")
        if groups.pids is not None:
            limits.append(f"{self.settings.build_max_processes} processes")
        if limits:
            self.emit("system", "Limits: " + ", ".join(limits))
        for controller, problem in groups.problems:
            setting = LIMIT_SETTINGS[controller]
            self.emit("system", f"Warning: {problem}; {setting} is not enforced for this build")

    def limit_reason(self, groups: Cgroups) -> str | None:
        """Why a command that failed was stopped by a limit, if it was."""
        if groups.out_of_memory():
            used = peak_memory_mb(groups)
            return (
                "The build ran out of memory"
                + (f" (it used {used} MiB at its peak)" if used else "")
                + f": the limit is {self.settings.build_memory_mb} MiB and the build was "
                "stopped. Raise it with DEPLOYHUB_BUILD_MEMORY_MB (--build-memory-mb), or make "
                "the build use less (e.g. NODE_OPTIONS=--max-old-space-size=<MiB> below the limit)."
            )
        if groups.hit_pids_limit():
            return (
                f"The build tried to run more than {self.settings.build_max_processes} processes "
                "and threads at once (DEPLOYHUB_BUILD_MAX_PROCESSES) and failed."
            )
        return None


def peak_memory_mb(groups: Cgroups) -> int:
    """The most memory the command's group used (v1 max_usage_in_bytes, swap included)."""
    if groups.memory is None:
        return 0
    peaks = []
    for name in ("memory.max_usage_in_bytes", "memory.memsw.max_usage_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            peaks.append(int((groups.memory / name).read_text().strip()))
    return max(peaks, default=0) // (1024 * 1024)


def _close_abandoned(job: asyncio.Future[Cgroups]) -> None:
    if not job.cancelled() and job.exception() is None:
        threading.Thread(target=job.result().close, name="cgroups-close").start()


def limits_in_force(memory_mb: int = 64, max_pids: int = 16) -> dict[str, bool]:
    """Check, end to end, that this machine's cgroups cap a command: the limits read back and
    a command started through the wrapper lands in both groups. For tests and diagnostics."""
    name = f"probe-{os.getpid()}-{time.monotonic_ns()}"
    groups = Cgroups.create(name, memory_mb=memory_mb, max_pids=max_pids)
    try:
        found = {"memory": False, "pids": False}
        if not groups.dirs:
            return found
        result = subprocess.run(
            groups.wrap(["cat", "/proc/self/cgroup"]), capture_output=True, text=True,
            timeout=10, check=False, env={"PATH": INSIDE_PATH},
        )
        if result.returncode != 0:
            return found
        lines = result.stdout.splitlines()
        for controller, path in (("memory", groups.memory), ("pids", groups.pids)):
            if path is None:
                continue
            inside = [ln.split(":", 2)[2] for ln in lines if controller in ln.split(":")[1].split(",")]
            found[controller] = bool(inside) and str(path).endswith(inside[0]) and inside[0].endswith(name)
        return found
    finally:
        groups.close()
