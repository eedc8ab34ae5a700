"""`DEPLOYHUB_SANDBOX=user`: build commands run as a separate unprivileged account.

For where bubblewrap cannot run: an ECS Fargate task has no user namespaces, and the task
itself is the sandbox. The worker runs as root, keeps its environment and files to itself,
and starts each untrusted command through `setpriv` (util-linux) as the build account, with
no supplementary groups, no capabilities and no_new_privs, so it cannot read the worker's
/proc/<pid>/environ (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI, the Redis URL, the S3 settings)
or its files, and setuid programs cannot give it more.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from .detect import BuildError

SETPRIV_OPTIONS = ("--clear-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    setpriv: str

    def wrap(self, argv: list[str]) -> list[str]:
        return [self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", *SETPRIV_OPTIONS,
                "--", *argv]

    def own(self, *paths: Path) -> None:
        """Give the build account the tree under each path (never following a symlink)."""
        for top in paths:
            os.chown(top, self.uid, self.gid, follow_symlinks=False)
            os.chmod(top, 0o700)
            for root, dirs, files in os.walk(top):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)

    def kill_leftovers(self) -> int:
        """SIGKILL every process of the build account (a daemon a build left behind, one
        that escaped its process group). The account must be dedicated to builds."""
        killed = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != self.uid:
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except (OSError, ValueError):
                continue
        return killed


def account_problem(user: str) -> str | None:
    """Why build commands cannot run as `user` here, or None."""
    try:
        find_account(user)
    except BuildError as exc:
        return str(exc)
    return None


def find_account(user: str) -> Account:
    if os.geteuid() != 0:
        raise BuildError(
            "DEPLOYHUB_SANDBOX=user needs the worker to run as root: it starts each build "
            f"command as DEPLOYHUB_BUILD_USER ({user}). Run the worker as root (the builder "
            "image does), or use DEPLOYHUB_SANDBOX=bwrap."
        )
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise BuildError(
            f"DEPLOYHUB_BUILD_USER={user!r} is not an account on this machine: create a "
            "dedicated unprivileged user for builds (the builder image has `node`)."
        ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise BuildError(f"DEPLOYHUB_BUILD_USER={user!r} is root or in group root: builds "
                         "need an unprivileged account of their own.")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise BuildError("DEPLOYHUB_SANDBOX=user needs `setpriv` (util-linux) on PATH.")
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, setpriv)


def unreachable_parent(path: Path, uid: int) -> Path | None:
    """The first directory above `path` the account cannot pass through, if any."""
    for parent in path.resolve().parents:
        mode = parent.stat()
        if mode.st_uid == uid:
            continue
        if not mode.st_mode & stat.S_IXOTH:
            return parent
    return None
