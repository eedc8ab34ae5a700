"""The sandbox of one build: each untrusted command runs under bubblewrap (worker/bwrap.py
says what the build sees) in its own network namespace whose only way out is the egress proxy
(worker/egress.py), inside cgroups that cap it (worker/cgroups.py), its disk use watched
(worker/disk.py).

`Sandbox.prepare` wraps one command and removes its cgroups and proxy afterwards; the cgroup
work blocks (kill loops that sleep, rmdir retries), so it runs in a thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deployhub.settings import Settings
from deployhub.validation import Resolver, system_resolver

from . import bwrap, cache
from .account import Account, find_account, unreachable_parent
from .bwrap import INSIDE_CACHE, INSIDE_HOME, INSIDE_NODE, INSIDE_PATH, INSIDE_SRC
from .cgroups import Cgroups
from .detect import BuildError
from .disk import DiskWatch
from .egress import EgressProxy, proxy_env
from .netns import BlockedStart, pick_port
from .proc import Emit

LIMIT_SETTINGS = {"memory": "DEPLOYHUB_BUILD_MEMORY_MB", "pids": "DEPLOYHUB_BUILD_MAX_PROCESSES"}


@dataclass
class Prepared:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    pass_fds: tuple[int, ...]
    cgroups: Cgroups
    disk: DiskWatch | None = None
    started: Callable[[], Awaitable[None]] | None = None  # proc.run's: once the command exists

    @property
    def watchdog(self) -> Callable[[], Awaitable[None]] | None:
        """Returns once the command must be stopped (proc.run's watchdog)."""
        return self.disk.run if self.disk is not None else None


class Sandbox:
    """How one build runs its untrusted commands; `prepare` wraps one command."""

    def __init__(self, settings: Settings, name: str, work: Path, src: Path, emit: Emit,
                 resolver: Resolver = system_resolver) -> None:
        self.settings = settings
        self.resolver = resolver  # the egress proxy's
        self.name = name
        self.work = work
        self.src = src
        self.emit = emit
        self.home = work / "home"
        # The package managers' caches (worker/cache.py): the project's, set by the build
        # before its first command; this build's own until then.
        self.cache = work / "managers"
        self.node: Path | None = None  # a fetched Node release (worker/node.py), read-only inside
        # The root directory setting, relative to the repository: where commands start.
        self.root = ""
        self._announced = False
        self._owned = False
        self._count = 0

    @property
    def isolated(self) -> bool:
        return self.settings.sandbox == "bwrap"

    @property
    def as_user(self) -> bool:
        return self.settings.sandbox == "user"

    @property
    def own_network(self) -> bool:
        return self.isolated and self.settings.build_network == "isolated"

    @property
    def disk_bytes(self) -> int:
        return self.settings.build_max_disk_mb * 1024 * 1024

    def env(self, host_env: Mapping[str, str]) -> dict[str, str]:
        """The command's environment: `host_env` (already clean) with sandbox paths."""
        # Outside bubblewrap the host paths of the caches (Build._build_env) stay as they are.
        if self.as_user:  # its temporary files in the home it owns
            return {**host_env, "TMPDIR": str(self.home / ".tmp")}
        if not self.isolated:
            return dict(host_env)
        env = {k: v for k, v in host_env.items() if k not in ("PWD", "OLDPWD")}
        env.update({
            "PATH": f"{INSIDE_NODE}/bin:{bwrap.inside_path()}" if self.node else bwrap.inside_path(),
            "HOME": INSIDE_HOME,
            **cache.manager_env(INSIDE_CACHE),
            "TMPDIR": "/tmp",
            "USER": "build",
            "LOGNAME": "build",
        })
        return env

    @contextlib.asynccontextmanager
    async def prepare(self, argv: Sequence[str], host_env: Mapping[str, str]) -> AsyncIterator[Prepared]:
        binary = ""
        account: Account | None = None
        # Before the build account is given the build directory: its caches may be in it.
        await asyncio.to_thread(cache.managers_dir, self.cache)
        if self.as_user:
            account = await asyncio.to_thread(self._account)
        if self.isolated:
            if problem := await asyncio.to_thread(
                bwrap.problem, self.settings.bwrap, self.settings.build_network == "host"
            ):
                raise BuildError(problem)
            binary = bwrap.find_binary(self.settings.bwrap) or "bwrap"
        self._count += 1
        groups = await self._create_cgroups(f"{self.name}-{self._count}")
        args_fd = -1
        proxy: EgressProxy | None = None
        blocked: BlockedStart | None = None
        try:
            self._announce(groups)
            self._refuse_without_limits(groups)
            env = self.env(host_env)
            self.home.mkdir(parents=True, exist_ok=True)
            disk = await self._disk_watch()
            port = 0
            if self.own_network:
                port = pick_port()
                proxy = EgressProxy(self.emit, resolver=self.resolver,
                                    allow_hosts=self.settings.build_allow_hosts)
                blocked = BlockedStart()
                env.update(proxy_env(port))
            if self.isolated:
                etc = self.work / "etc"
                bwrap.write_identity(etc)
                options = await asyncio.to_thread(  # the first call asks bwrap --help
                    bwrap.options, binary, src=self.src, home=self.home, cache=self.cache,
                    etc=etc, env=env, blocked=blocked.pass_fds if blocked else None, tmp_bytes=self.disk_bytes,
                    node=self.node,
                    chdir=f"{bwrap.INSIDE_SRC}/{self.root}" if self.root else bwrap.INSIDE_SRC,
                )
                # Options go through a memfd, not argv: the sandbox's pid 1 is bwrap, and its
                # command line would otherwise show the host's paths to the build.
                args_fd = os.memfd_create("bwrap-args", 0)
                os.write(args_fd, b"".join(o.encode() + b"\0" for o in options))
                os.lseek(args_fd, 0, os.SEEK_SET)
                command = [binary, "--args", str(args_fd), "--", *argv]
                # bwrap is the sandbox's pid 1, whose environ the build can read: give it
                # nothing worth reading (cwd / keeps the host's paths out of its PWD too).
                yield Prepared(groups.wrap(command, self.disk_bytes), {"PATH": INSIDE_PATH},
                               Path("/"), (args_fd, *(blocked.pass_fds if blocked else ())), groups, disk,
                               started=self._network_starter(proxy, blocked, port) if proxy and blocked else None)
            else:
                command = list(argv) if account is None else account.wrap(list(argv))
                cwd = self.src / self.root if self.root else self.src
                yield Prepared(groups.wrap(command, self.disk_bytes), env, cwd, (), groups, disk)
        finally:
            if account is not None:
                await asyncio.to_thread(account.kill_leftovers)
            if args_fd >= 0:
                os.close(args_fd)
            try:
                # Shielded: a second cancel must not leave the groups (or a fork bomb in them).
                await asyncio.shield(asyncio.to_thread(groups.close))
            finally:
                if blocked is not None:
                    blocked.close()
                if proxy is not None:
                    await asyncio.shield(proxy.close())

    @staticmethod
    def _network_starter(proxy: EgressProxy, blocked: BlockedStart, port: int) -> Callable[[], Awaitable[None]]:
        """Once bwrap has made the command's namespaces: the proxy listens in its network, then
        the command starts."""
        async def start() -> None:
            try:
                listener = await blocked.listen(port)
            except (OSError, ValueError, KeyError) as exc:
                raise BuildError(f"DeployHub could not give the build its network: {exc}") from None
            if listener is not None:
                await proxy.start_socket(listener)
            blocked.release()
        return start

    def _account(self) -> Account:
        """The build account, owning the build's directory (the clone ran as the worker)."""
        account = find_account(self.settings.build_user)
        (self.home / ".tmp").mkdir(parents=True, exist_ok=True)
        if blocked := unreachable_parent(self.work, account.uid):
            raise BuildError(
                f"The build account {account.name} cannot reach {self.work}: {blocked} is not "
                "traversable by others. Make DEPLOYHUB_DATA_DIR and its parents mode o+x "
                "(e.g. 0711); the build's own directory stays private to it."
            )
        if not self._owned:  # once: later commands run as the account and make its own files
            account.own(self.work)
            self._owned = True
        return account

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

    async def _disk_watch(self) -> DiskWatch | None:
        if self.disk_bytes <= 0:
            return None
        watch = DiskWatch([self.work], [self.cache], self.disk_bytes)
        await watch.baseline()
        return watch

    def _refuse_without_limits(self, groups: Cgroups) -> None:
        if groups.problems and self.settings.build_without_limits == "refuse":
            missing = "; ".join(
                f"{why} ({LIMIT_SETTINGS[controller]})" for controller, why in groups.problems
            )
            raise BuildError(
                f"Builds are refused on this machine because a limit cannot be enforced: "
                f"{missing}. Make the cgroup writable for DeployHub, or set "
                "DEPLOYHUB_BUILD_WITHOUT_LIMITS=run to build without it."
            )

    def _announce(self, groups: Cgroups) -> None:
        if self._announced:
            return
        self._announced = True
        if self.as_user:
            self.emit("system", f"Sandbox: build commands run as the unprivileged account "
                                f"{self.settings.build_user}, without the worker's environment, "
                                "files or capabilities; the network is the machine's (the task's)")
        elif self.isolated:
            self.emit("system", f"Sandbox: bubblewrap; the repository is at {INSIDE_SRC}, "
                                "the rest of this machine is not visible")
            if self.own_network:
                also = ", ".join(self.settings.build_allow_hosts)
                self.emit("system", "Network: public internet only"
                                    + (f", and {also} (DEPLOYHUB_BUILD_ALLOW_HOSTS)" if also else "")
                                    + ", through the build's HTTP(S) proxy (HTTP_PROXY/HTTPS_PROXY)")
            else:
                self.emit("system", "Warning: DEPLOYHUB_BUILD_NETWORK=host: build commands "
                                    "share this machine's network, its loopback and private "
                                    "networks included")
        else:
            self.emit("system", "Warning: DEPLOYHUB_SANDBOX=none: build commands run WITHOUT "
                                "isolation, with DeployHub's own rights on this machine")
        limits = []
        if groups.limited("memory"):
            limits.append(f"memory {self.settings.build_memory_mb} MiB")
        if groups.limited("pids"):
            limits.append(f"{self.settings.build_max_processes} processes")
        if self.disk_bytes > 0:
            limits.append(f"disk {self.settings.build_max_disk_mb} MiB")
        if limits:
            self.emit("system", "Limits: " + ", ".join(limits))
        for controller, problem in groups.problems:
            setting = LIMIT_SETTINGS[controller]
            self.emit("system", f"Warning: {problem}; {setting} is not enforced for this build")

    def limit_reason(self, command: Prepared) -> str | None:
        """Why a command that failed was stopped by a limit, if it was."""
        groups = command.cgroups
        if command.disk is not None and command.disk.exceeded:
            return (
                f"The build filled more than {self.settings.build_max_disk_mb} MiB of disk "
                "(DEPLOYHUB_BUILD_MAX_DISK_MB) and was stopped."
            )
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
    """The most memory the command's group used: v1 max_usage_in_bytes (swap included), or
    v2 memory.peak (kernels 5.19 and later; 0 where it is missing)."""
    files = []
    if groups.memory is not None:
        files += [groups.memory / "memory.max_usage_in_bytes", groups.memory / "memory.memsw.max_usage_in_bytes"]
    if groups.v2 is not None:
        files.append(groups.v2 / "memory.peak")
    peaks = []
    for path in files:
        with contextlib.suppress(OSError, ValueError):
            peaks.append(int(path.read_text().strip()))
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
