"""Build isolation: every untrusted command runs under bubblewrap, inside cgroups that cap it.

What a build sees (settings.sandbox == "bwrap"):

  /usr (and the /bin, /lib... links or binds into it)   read-only
  /etc: resolv.conf, hosts, nsswitch.conf, host.conf, gai.conf, localtime, ssl/certs,
        ssl/openssl.cnf, a generated passwd and group                 read-only
  /build/src        the cloned repository                             read-write
  /build/home       $HOME                                             read-write
  /build/npm-cache  the npm cache shared by builds                    read-write
  /tmp              a private tmpfs (charged to the build's memory)   read-write
  /dev, /proc       a minimal /dev and the build's own pid namespace
  the network       shared with the host (npm needs the registry)

Nothing else of the host: not the data directory (storage, Redis, other builds), not /root,
not the server's files, not its processes or their environments. The command runs as uid
1000 in its own user, pid, ipc, uts and cgroup namespaces with no capabilities, a fresh
session (no terminal injection), and dies with the worker.

Limits: a cgroup v1 memory group (memory.limit_in_bytes and memory.memsw.limit_in_bytes) and
pids group (pids.max) per command, created under the worker's own cgroups (so whatever limits
the operator put on DeployHub still hold) and entered by a fixed shell wrapper *before* it
execs bwrap: no repository code ever runs outside them. Where they cannot be made, the build
log says so and the build goes on without that limit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployhub.settings import Settings

from .detect import BuildError
from .proc import Emit

INSIDE_SRC = "/build/src"
INSIDE_HOME = "/build/home"
INSIDE_CACHE = "/build/npm-cache"
SANDBOX_UID = 1000
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Top-level links or directories that programs expect (merged-/usr systems make them links).
ROOT_ENTRIES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# The few files of /etc that name resolution, TLS and time need. Never all of /etc/ssl:
# /etc/ssl/private holds the host's keys, and inside the sandbox uid 1000 maps to the
# worker's own uid, so owner-only files of that uid would be readable.
ETC_FILES = (
    "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf",
    "/etc/localtime", "/etc/ssl/openssl.cnf",
)
ETC_DIRS = ("/etc/ssl/certs",)
SYSTEM_PREFIXES = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/etc/ssl/certs/")

CGROUP_ROOT_NAME = "deployhub"
# Enters each cgroup directory given before `--`, then execs the rest. Fixed text: the only
# inputs are arguments, and a failure to enter a cgroup ends it before anything else runs.
CGROUP_WRAPPER = (
    'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; '
    'shift; exec "$@"'
)
LIMIT_SETTINGS = {"memory": "DEPLOYHUB_BUILD_MEMORY_MB", "pids": "DEPLOYHUB_BUILD_MAX_PROCESSES"}

ESCAPE_HATCH = (
    "Install bubblewrap (the `bubblewrap` package) and allow user namespaces, or set "
    "DEPLOYHUB_SANDBOX=none to run builds without isolation (UNSAFE: build code then runs "
    "with DeployHub's own rights and can read its data and secrets)."
)


# -- is bubblewrap usable? -----------------------------------------------------------------

_probed: dict[str, str | None] = {}


def bwrap_binary() -> str | None:
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")


def sandbox_problem() -> str | None:
    """Why builds cannot be sandboxed with bubblewrap here, or None when they can.

    Probed once per process (a few milliseconds); the answer names DEPLOYHUB_SANDBOX=none as the
    unsafe way out, so it can be shown to the operator as is.
    """
    if "problem" not in _probed:
        _probed["problem"] = _probe()
    return _probed["problem"]


def _probe() -> str | None:
    binary = bwrap_binary()
    if binary is None:
        return f"Builds are sandboxed with bubblewrap, but `bwrap` is not installed. {ESCAPE_HATCH}"
    argv = [binary, "--unshare-all", "--unshare-user", "--die-with-parent",
            "--ro-bind", "/", "/", "true"]
    try:
        result = subprocess.run(
            argv, env={"PATH": INSIDE_PATH}, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=20, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Builds are sandboxed with bubblewrap, but {binary} cannot run: {exc}. {ESCAPE_HATCH}"
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
        return (
            f"Builds are sandboxed with bubblewrap, but {binary} cannot run here ({detail}). "
            + ESCAPE_HATCH
        )
    return None


def _supports(flag: str) -> bool:
    key = "help"
    if key not in _probed:
        binary = bwrap_binary()
        text = ""
        if binary:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                text = subprocess.run(
                    [binary, "--help"], capture_output=True, timeout=10, check=False,
                    env={"PATH": INSIDE_PATH},
                ).stdout.decode(errors="replace")
        _probed[key] = text
    return flag in (_probed[key] or "")


# -- the bubblewrap command line -------------------------------------------------------------


def bwrap_options(*, src: Path, home: Path, cache: Path, etc: Path, env: Mapping[str, str]) -> list[str]:
    """Options for `bwrap` (everything before `--` and the command)."""
    opts = [
        "--unshare-all", "--share-net", "--unshare-user", "--unshare-pid",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--hostname", "build",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
    ]
    if _supports("--disable-userns"):
        opts.append("--disable-userns")  # no nested user namespaces: less kernel to attack
    opts += ["--ro-bind", "/usr", "/usr"]
    for name in ROOT_ENTRIES:
        entry = Path("/") / name
        if entry.is_symlink():
            opts += ["--symlink", os.readlink(entry), str(entry)]
        elif entry.is_dir():
            opts += ["--ro-bind", str(entry), str(entry)]
    for name in ETC_FILES:
        if os.path.isfile(name):
            opts += ["--ro-bind", name, name]
    for name in ETC_DIRS:
        if os.path.isdir(name):
            opts += ["--ro-bind", name, name]
    opts += ["--ro-bind", str(etc / "passwd"), "/etc/passwd",
             "--ro-bind", str(etc / "group"), "/etc/group"]
    for path in _outside_tools(env):
        opts += ["--ro-bind", path, path]
    opts += [
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--bind", str(src), INSIDE_SRC,
        "--bind", str(home), INSIDE_HOME,
        "--bind", str(cache), INSIDE_CACHE,
        "--remount-ro", "/",
        "--chdir", INSIDE_SRC,
        "--clearenv",
    ]
    for key, value in sorted(env.items()):
        opts += ["--setenv", key, value]
    return opts


def _outside_tools(env: Mapping[str, str]) -> list[str]:
    """Node and CA files that live outside /usr (nvm, /opt/node...): bind just those."""
    paths: list[str] = []
    for tool in ("node", "npm"):
        found = shutil.which(tool)
        if not found:
            continue
        real = os.path.realpath(found)
        if not real.startswith(SYSTEM_PREFIXES):
            prefix = str(Path(real).parent.parent)  # <prefix>/bin/node -> <prefix>
            if prefix not in ("/", "/root", "/home") and prefix not in paths:
                paths.append(prefix)
    for key in ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"):
        value = env.get(key, "")
        if value.startswith("/") and os.path.isfile(value) and not value.startswith(SYSTEM_PREFIXES):
            paths.append(os.path.realpath(value))
    return paths


def tool_path() -> str:
    """PATH inside the sandbox: the system directories, plus node's own if it is elsewhere."""
    extra = []
    for tool in ("node", "npm"):
        found = shutil.which(tool)
        if found:
            real = os.path.realpath(found)
            if not real.startswith(SYSTEM_PREFIXES):
                extra.append(str(Path(found).parent))
    return ":".join(dict.fromkeys([*extra, *INSIDE_PATH.split(":")]))


def write_identity(etc: Path) -> None:
    """A passwd and group naming only root and the build user (npm and git look them up)."""
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"build:x:{SANDBOX_UID}:{SANDBOX_UID}:build:{INSIDE_HOME}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (etc / "group").write_text(
        f"root:x:0:\nbuild:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"
    )


# -- cgroups (v1) ----------------------------------------------------------------------------


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


def cgroup_parent(controller: str) -> Path | None:
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
        parent = cgroup_parent(controller)
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


STALE_AFTER = 60.0


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


# -- one build's sandbox ---------------------------------------------------------------------


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
            "PATH": tool_path(),
            "HOME": INSIDE_HOME,
            "npm_config_cache": INSIDE_CACHE,
            "TMPDIR": "/tmp",
            "USER": "build",
            "LOGNAME": "build",
        })
        return env

    @contextlib.contextmanager
    def prepare(self, argv: Sequence[str], host_env: Mapping[str, str]) -> Iterator[Prepared]:
        if self.isolated and (problem := sandbox_problem()):
            raise BuildError(problem)
        self._count += 1
        groups = Cgroups.create(
            f"{self.name}-{self._count}",
            memory_mb=self.settings.build_memory_mb,
            max_pids=self.settings.build_max_processes,
        )
        args_fd = -1
        try:
            self._announce(groups)
            env = self.env(host_env)
            self.home.mkdir(parents=True, exist_ok=True)
            self.cache.mkdir(parents=True, exist_ok=True)
            if self.isolated:
                etc = self.work / "etc"
                write_identity(etc)
                options = bwrap_options(src=self.src, home=self.home, cache=self.cache, etc=etc, env=env)
                # Options go through a memfd, not argv: the sandbox's pid 1 is bwrap, and its
                # command line would otherwise show the host's paths to the build.
                args_fd = os.memfd_create("bwrap-args", 0)
                os.write(args_fd, b"".join(o.encode() + b"\0" for o in options))
                os.lseek(args_fd, 0, os.SEEK_SET)
                binary = bwrap_binary() or "bwrap"
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
            groups.close()

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
            return (
                f"The build ran out of memory: it needed more than "
                f"{self.settings.build_memory_mb} MiB (DEPLOYHUB_BUILD_MEMORY_MB) and was stopped."
            )
        if groups.hit_pids_limit():
            return (
                f"The build tried to run more than {self.settings.build_max_processes} processes "
                "and threads at once (DEPLOYHUB_BUILD_MAX_PROCESSES) and failed."
            )
        return None


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
