"""One deployment: clone -> detect -> install -> build -> upload, every line published live."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import posixpath
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from deployhub.collector import BlobLeases
from deployhub.logs import LogPublisher
from deployhub.redis_client import through_outage as retry
from deployhub.secretbox import SecretUnreadable, secret_box
from deployhub.settings import Settings
from deployhub.storage import Storage, log_key
from deployhub.status import Status
from deployhub.store import Deployment, Store
from deployhub.validation import InvalidInput, RepoURL, check_repo_url

from . import cache, hosted_config, node, proc, submodules, workspaces
from .detect import BuildError, Overrides, Plan, failure_advice, locate_output, plan
from .files import lfs_pointers
from .install import Installed, event_texts, install
from .output import Uploaded, file_count, upload_site
from .sandbox import Sandbox

log = logging.getLogger(__name__)

LOG_TTL_SECONDS = 7 * 24 * 3600
# What untrusted build commands may see of our environment: nothing secret.
PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")
COMMIT_MESSAGE_MAX = 200  # characters of a commit message's first line kept on the record
LFS_SHOWN = 5  # paths of LFS pointers named in the log


class Canceled(Exception):
    pass


def remote_config(repo: RepoURL) -> list[str]:
    """The -c options of every git command that talks to `repo`'s host."""
    pinned = ",".join(f"[{a}]" if ":" in a else a for a in repo.addresses)
    return [
        # The host was checked when the URL came in; pin the addresses that were checked so
        # a DNS answer that changes in between cannot point the clone inside our network.
        "-c", f"http.curloptResolve={repo.host}:{repo.port}:{pinned}",
        "-c", "http.followRedirects=false",
        "-c", "protocol.allow=never",
        "-c", "protocol.http.allow=always",
        "-c", "protocol.https.allow=always",
        "-c", "credential.helper=",
        "-c", "core.hooksPath=/dev/null",
        "-c", "http.lowSpeedLimit=1000",
        "-c", "http.lowSpeedTime=30",
    ]


class Build:
    def __init__(self, settings: Settings, redis: Redis, storage: Storage, dep: Deployment) -> None:
        self.settings = settings
        self.store = Store(redis)
        self.storage = storage
        self.dep = dep
        self.logs = LogPublisher(
            redis,
            dep.project,
            dep.id,
            max_lines=settings.log_max_lines,
            line_max_bytes=settings.log_line_max_bytes,
            max_bytes=settings.log_max_bytes,
        )
        self.work = settings.data_dir / "builds" / dep.id
        self.src = self.work / "src"
        self.started = time.monotonic()
        self.sandbox = Sandbox(settings, dep.id, self.work, self.src, self.logs.emit)
        self._task: asyncio.Task[tuple[Status, str]] | None = None
        self.variables: dict[str, str] = {}
        self.detected_env: dict[str, str] = {}  # what the plan sets (PUBLIC_URL=/ for CRA)
        self.node_home: Path | None = None  # a fetched Node release, first on PATH
        self._stopped: tuple[Status, str] | None = None
        self._live = False  # ready recorded: what is left (compressed copies) cannot fail it
        self._git_config: list[str] = []  # -c options every git command against the remote gets
        self._remote_env: dict[str, str] = {}  # what only git against the remote gets (a credential)
        # The build cache (worker/cache.py): where this project's lives, and the key of what
        # this build installed, to save once it is ready.
        self.cache_mode = cache_mode(settings)
        self.cache_home: Path | None = None
        self.cache_owner = ""
        # (key, repository-relative paths the install may write and the checkout lacks)
        self._save: tuple[cache.Key, list[str]] | None = None
        self._own: set[str] = set()  # of those paths, the ones the checkout has itself

    # -- the steps -------------------------------------------------------------------------

    def stop(self, status: Status, reason: str) -> None:
        """End the build early (cancel, shutdown): kills what runs and records why."""
        if self._stopped is None:
            self._stopped = (status, reason)
            if self._task is not None:
                self._task.cancel()

    async def run(self) -> Status:
        """Build and publish the deployment; returns its final status."""
        self.logs.start()
        self._task = asyncio.create_task(self._attempt(), name=f"build-{self.dep.id}")
        try:
            status, reason = await self._task
            if status == Status.READY and self._save is not None:
                # After `ready` is recorded: saving is on no one's wait.
                await asyncio.shield(self._save_cache(*self._save))
            await self._finish(status, reason)
        finally:
            # After the result is recorded: deleting node_modules can take a while.
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, self.work, True))
        return status

    async def _attempt(self) -> tuple[Status, str]:
        try:
            async with asyncio.timeout(self.settings.build_timeout):
                await self._steps()
            return Status.READY, ""
        except BuildError as exc:
            return Status.FAILED, str(exc)
        except TimeoutError:
            if self._live:
                return self._live_anyway("the build's time ran out")
            return Status.FAILED, self._timeout_reason()
        except Canceled as exc:
            return Status.CANCELED, str(exc)
        except asyncio.CancelledError:
            if self._stopped is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if self._live:
                return self._live_anyway(self._stopped[1].rstrip("."))
            return self._stopped
        except Exception as exc:
            log.exception("build %s crashed", self.dep.id)
            return Status.FAILED, f"DeployHub hit an internal error while building: {exc!r}"

    def _live_anyway(self, why: str) -> tuple[Status, str]:
        self.logs.emit("system", f"Compressed copies not stored ({why}): the new files are "
                                 "served uncompressed.")
        return Status.READY, ""

    async def _steps(self) -> None:
        box = secret_box(self.settings)  # DEPLOYHUB_SECRETS_KEY or the data directory's key file
        try:
            variables = await retry(lambda: self.store.build_variables(self.dep.project, box))
        except SecretUnreadable as exc:
            log.error("build %s: %s", self.dep.id, exc)
            raise BuildError(str(exc)) from None
        self.variables = {name: value for name, (value, _) in variables.items()}
        self.logs.hide([value for value, secret in variables.values() if secret])
        if variables:
            shown = ", ".join(f"{n} (secret)" if secret else n for n, (_, secret) in sorted(variables.items()))
            self.logs.emit("system", f"Build variables: {shown}")
        await self._step(Status.CLONING)
        await self._clone()
        await self._step(Status.INSTALLING)
        build_plan = plan(self.src, overrides(self.dep.settings))
        # Install, build, detection and the output all happen in the root directory (plan
        # checked it is a real directory, no symlink on the way).
        root = self.src / build_plan.root if build_plan.root else self.src
        if build_plan.root:
            self.logs.emit("system", f"Root directory: {build_plan.root} ({build_plan.root_source})")
        self.sandbox.root = build_plan.root
        netlify_dir = self.src if build_plan.netlify_at_top else None
        for note in build_plan.notes:
            self.logs.emit("system", note)
        if build_plan.static:
            await self._step(Status.BUILDING)
            self.logs.emit("system", "Nothing to build")
            site = root / (build_plan.output or "")
            shown = site.relative_to(self.src).as_posix()
            self.logs.emit("system", f"Output: {shown if shown != '.' else 'the repository root'} "
                                     "(a static site, published as it is)")
            await self._step(Status.UPLOADING)
            await self._upload(site, root, as_is=True, netlify_dir=netlify_dir)
            return
        self.detected_env = dict(build_plan.env)
        chosen = await node.choose(
            build_plan.node, self.settings.data_dir / "cache" / "node", self._node_fetch_env()
        )
        self.logs.emit("system", f"Using {chosen.reason}")
        self.node_home = self.sandbox.node = chosen.home
        key = await self._open_cache(build_plan, root, chosen.version)
        paths: list[str] = []
        if self.cache_home is not None and build_plan.lockfile:  # also when skipped: own paths
            paths = await self._install_paths(build_plan.root, build_plan.lockfile,
                                              build_plan.manager)
        restored = [] if key is None else await self._restore_cache(key, paths)
        installed = await install(build_plan, self._command, self.logs.emit, self.logs.events,
                                  root, restored=bool(restored),
                                  cached=[self.src / p for p in restored])
        await self._keep_for_cache(installed, build_plan, root, chosen.version, key, paths)
        await self._step(Status.BUILDING)
        built_after = time.time()
        await self._command(installed.build)
        output = locate_output(root, build_plan, built_after=built_after)
        self.logs.emit("system", f"Output: {output.path.relative_to(self.src)} ({output.why})")
        await self._step(Status.UPLOADING)
        await self._upload(output.path, root, netlify_dir=netlify_dir, base=build_plan.site_base)

    async def _step(self, status: Status) -> None:
        if not await retry(lambda: self.store.transition(self.dep, status)):
            raise Canceled("Canceled while running.")
        self.logs.emit("system", f"--- {status}")

    async def _clone(self) -> None:
        try:
            repo = await check_repo_url(self.dep.repo_url, allow_hosts=self.settings.allow_hosts)
        except InvalidInput as exc:
            raise BuildError(f"could not clone: {exc}") from None
        credential = await self._credential()
        self.src.parent.mkdir(parents=True, exist_ok=True)
        self._git_config = remote_config(repo)
        argv = ["git", *self._git_config, "clone", "--depth", "1", "--single-branch", "--no-tags"]
        if self.dep.branch:
            argv += ["--branch", self.dep.branch]
        argv += ["--", repo.url, str(self.src)]
        shown = " ".join(["git", "clone", "--depth", "1", *argv[argv.index("--single-branch"):]])
        self.logs.emit("system", f"$ {shown}")
        code, detail = await self._git(argv, cwd=self.work, remote=True)
        if code != 0 and credential and "repository" in detail and "not found" in detail:
            raise BuildError(
                f"could not clone {repo.url}: the repository refused the credential, or does not "
                "exist (GitHub answers 'not found' when a token may not read a repository)"
            )
        if code != 0 and _refused_auth(detail):
            if credential:
                raise BuildError(
                    f"could not clone {repo.url}: the repository refused the credential (is "
                    "the token valid, unexpired and allowed to read this repository?)"
                )
            raise BuildError(
                f"could not clone {repo.url}: the repository asks for a credential; give the "
                f"project a read-only token with PUT /api/projects/{self.dep.project}/credential"
            )
        if code != 0:
            raise BuildError(
                f"could not clone {repo.url}: {detail} (is the URL right, the "
                "repository public (or the project's credential set) and the branch there?)"
            )
        wanted = self.dep.commit
        if wanted and await self._git_output(["rev-parse", "HEAD"]) != wanted:
            await self._fetch_commit(repo.url, wanted)
        sha = await self._git_output(["rev-parse", "HEAD"])
        message = (await self._git_output(["log", "-1", "--format=%B"]))[:COMMIT_MESSAGE_MAX]
        if sha:
            self.logs.emit("system", f"Cloned commit {sha[:12]} {message}")
            await retry(lambda: self.store.record_commit(self.dep.id, sha, message))
        await self._submodules(self.src, "", repo, origin=repo, budget=[submodules.SUBMODULES_MAX])
        await self._say_lfs_pointers()

    async def _say_lfs_pointers(self) -> None:
        """Files kept in Git LFS are checked out as their pointers (no LFS objects are fetched:
        git-lfs would fetch them from hosts that were never checked): say which, as the site
        would serve the pointer text."""
        listed = await self._git_bytes(["ls-files", "-z", "--", ":(attr:filter=lfs)"], self.src)
        if not listed:
            return
        paths = [p for p in listed.decode(errors="replace").split("\0") if p]
        pointers = await asyncio.to_thread(lfs_pointers, self.src, paths)
        if pointers:
            shown = ", ".join(pointers[:LFS_SHOWN]) + (" and more" if len(pointers) > LFS_SHOWN else "")
            files = "1 file is" if len(pointers) == 1 else f"{len(pointers)} files are"
            self.logs.emit("system", (
                f"Warning: {files} kept in Git LFS and checked out as LFS pointers, not their "
                f"contents: {shown}. DeployHub does not fetch Git LFS objects; a build or a site "
                "that uses these files gets the pointer's text. Commit them to git itself to "
                "deploy them."))

    async def _submodules(self, checkout: Path, prefix: str, parent: RepoURL, *,
                          origin: RepoURL | None, budget: list[int], depth: int = 1) -> None:
        """Check out the submodules `checkout` pins (`prefix`: its path in the repository),
        each from a URL checked and pinned as the repository's own; then theirs, DEPTH_MAX
        deep. The credential goes only to `origin`'s host (the repository's), and only for
        submodules that a repository fetched with it names (None: `checkout` was not), so a
        third party's submodule cannot have it fetch another of the owner's repositories."""
        # Also without a .gitmodules: a repository committed inside the repository is a
        # gitlink with no URL, and the log should say why that directory is empty.
        stage = await self._git_bytes(["ls-files", "--stage", "-z"], checkout)
        if submodules.GITLINK_MODE not in stage:
            return
        size = submodules.gitmodules_size(checkout)
        listing = b""
        if size is not None and size <= submodules.GITMODULES_MAX:
            listing = await self._git_bytes(["config", "-f", ".gitmodules", "-z", "--list"], checkout)
        for sub in submodules.pinned(stage, listing):
            where = f"{prefix}{sub.path}"
            if not sub.url:
                self.logs.emit("system", f"Warning: {where} is a repository inside the repository "
                               "(a gitlink) that .gitmodules gives no URL for: it stays empty. "
                               "Commit its files instead, or add it with `git submodule add <url>`.")
                continue
            if depth > submodules.DEPTH_MAX or budget[0] <= 0:
                raise BuildError(f"could not fetch the submodule {where}: more than "
                                 f"{submodules.SUBMODULES_MAX} submodules, or nested deeper than "
                                 f"{submodules.DEPTH_MAX}")
            budget[0] -= 1
            url, why = submodules.fetch_url(sub.url, parent.url)
            try:
                repo = await check_repo_url(url, allow_hosts=self.settings.allow_hosts)
            except InvalidInput as exc:
                raise BuildError(f"could not fetch the submodule {where} ({sub.url}): "
                                 + str(exc).replace("repo_url", "its URL")) from None
            dest = checkout / sub.path
            if not workspaces.real_dir(checkout, sub.path) or any(dest.iterdir()):
                raise BuildError(f"could not fetch the submodule {where}: its path is not an "
                                 "empty directory of the checkout")
            self.logs.emit("system", f"Submodule {where}: {url} at {sub.sha[:12]}"
                           + (f" ({why})" if why else ""))
            trusted = origin is not None and (repo.host, repo.port) == (origin.host, origin.port)
            await self._fetch_submodule(dest, repo, sub.sha, where, own_host=trusted)
            await self._submodules(dest, f"{where}/", repo, origin=origin if trusted else None,
                                   budget=budget, depth=depth + 1)

    async def _fetch_submodule(self, dest: Path, repo: RepoURL, sha: str, where: str, *,
                               own_host: bool) -> None:
        config = remote_config(repo)
        code, detail = await self._git(["git", "init", "--quiet", "--template=", str(dest)],
                                       cwd=self.work)
        fetch = ["git", *config, "-C", str(dest), "fetch", "--no-tags", "--quiet"]
        if code == 0:
            code, detail = await self._git([*fetch, "--depth", "1", repo.url, sha], cwd=self.work,
                                           remote=own_host)
        if code != 0 and not _refused_auth(detail):
            # A server that serves no commit by its SHA alone: its branches' history.
            code, detail = await self._git([*fetch, repo.url, "+refs/heads/*:refs/remotes/origin/*"],
                                           cwd=self.work, remote=own_host)
        if code == 0:
            code, detail = await self._git(
                ["git", "-c", "core.hooksPath=/dev/null", "-C", str(dest), "checkout", "--quiet",
                 "--detach", sha], cwd=self.work)
        if code != 0:
            auth = " (it asks for a credential: DeployHub fetches public submodules, and the " \
                   "project's credential only from the repository's own host)" \
                if _refused_auth(detail) else ""
            raise BuildError(f"could not fetch the submodule {where} from {repo.url} at "
                             f"{sha[:12]}: {detail}{auth}")

    async def _git_bytes(self, args: list[str], cwd: Path) -> bytes:
        """What a local git command prints (it reads the checkout, never the network)."""
        child = await asyncio.create_subprocess_exec(
            "git", "-C", str(cwd), *args, cwd=self.work, env=self._base_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(60):
                out, err = await child.communicate()
        except TimeoutError:
            child.kill()
            await child.wait()
            raise BuildError(f"`git {args[0]}` on the checkout did not finish within 60 s") from None
        if child.returncode != 0:
            raise BuildError(f"`git {' '.join(args)}` failed on the checkout: "
                             f"{err.decode(errors='replace').strip()[:300]}")
        return out

    async def _fetch_commit(self, url: str, sha: str) -> None:
        """Check out `sha`, which the shallow clone of the branch head does not hold.

        A shallow fetch of the SHA alone works where the server lets a client want any
        commit it can reach: protocol v2 (what git speaks by default since 2.26, and what
        git http-backend answers) always does, v0 only with uploadpack.allowReachableSHA1InWant
        (GitHub allows it). Where it is refused, the whole history of every branch is
        fetched instead (slower, but any server serves it) and the commit looked for in it.
        """
        remote = ["git", *self._git_config, "-C", str(self.src), "fetch", "--no-tags", "--quiet"]
        self.logs.emit("system", f"$ git fetch --depth 1 origin {sha}")
        code, _ = await self._git([*remote, "--depth", "1", "origin", sha], cwd=self.work,
                                  remote=True)
        if code != 0:
            self.logs.emit("system", "The server does not serve a commit by its SHA alone; "
                                     "fetching the full history instead")
            code, detail = await self._git(
                [*remote, "--unshallow", "origin", "+refs/heads/*:refs/remotes/origin/*"],
                cwd=self.work, remote=True,
            )
            if code != 0:
                raise BuildError(f"could not fetch the history of {url}: {detail}")
        code, _ = await self._git(
            ["git", "-c", "core.hooksPath=/dev/null", "-C", str(self.src), "checkout", "--quiet",
             "--detach", sha], cwd=self.work,
        )
        if code != 0:
            raise BuildError(
                f"the commit {sha} is not in {url}: push it, or deploy a commit of the "
                "repository (a full 40-hex SHA)"
            )

    async def _credential(self) -> bool:
        """Give the clone (and only the clone) the project's credential, if it has one.

        It goes in the environment of the git commands that talk to the remote, as git's own
        config (GIT_CONFIG_COUNT: an `http.extraHeader` with basic auth), so it is in no URL,
        no argument list (ps shows those), no file, and not in the checkout's .git/config,
        which the build can read. Install and build commands get another environment.
        """
        box = secret_box(self.settings)
        try:
            found = await retry(lambda: self.store.clone_credential(self.dep.project, box))
        except SecretUnreadable as exc:
            log.error("build %s: %s", self.dep.id, exc)
            raise BuildError(
                f"{exc} with PUT /api/projects/{self.dep.project}/credential"
            ) from None
        if found is None:
            return False
        username, token = found
        basic = base64.b64encode(f"{username}:{token}".encode()).decode("ascii")
        self.logs.hide([token, basic])
        self._remote_env = {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
        }
        self.logs.emit("system", f"Cloning with the project's credential ({username})")
        return True

    async def _git(self, argv: list[str], *, cwd: Path, remote: bool = False) -> tuple[int, str]:
        """Run git (on the host: our own command, never the repository's); its exit code and
        the last line it printed. `remote`: it talks to the remote, with the credential."""
        env = {**self._git_env(), **self._remote_env} if remote else self._git_env()
        try:
            result = await proc.run(
                argv, cwd=cwd, env=env, emit=self.logs.emit,
                timeout=self.settings.clone_timeout,
                max_line_bytes=self.settings.log_line_max_bytes,
            )
        except proc.CommandTimeout:
            raise BuildError(
                f"could not clone {self.dep.repo_url}: no answer within "
                f"{self.settings.clone_timeout:.0f} s"
            ) from None
        detail = next((t for t in reversed(result.tail) if t.strip()), "git failed")
        return result.code, detail.strip()

    def _git_env(self) -> dict[str, str]:
        return {
            **self._base_env(),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ALLOW_PROTOCOL": "http:https",
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
            "GCM_INTERACTIVE": "never",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_LFS_SKIP_SMUDGE": "1",
        }

    async def _git_output(self, args: list[str]) -> str:
        lines: list[str] = []
        with contextlib.suppress(proc.CommandTimeout):
            await proc.run(
                ["git", "-C", str(self.src), *args], cwd=self.work, env=self._base_env(),
                emit=lambda _s, text: lines.append(text), timeout=20,
            )
        return lines[0][:200] if lines else ""

    def _timeout_reason(self) -> str:
        return (
            f"The build took longer than {self.settings.build_timeout:.0f} s "
            "(DEPLOYHUB_BUILD_TIMEOUT) and was stopped."
        )

    async def _command(self, argv: list[str]) -> None:
        """Run one untrusted command (repository code) in the build's sandbox and limits."""
        remaining = self.settings.build_timeout - (time.monotonic() - self.started)
        async with self.sandbox.prepare(argv, self._build_env()) as command:
            self.logs.emit("system", "$ " + " ".join(argv))
            mark = len(self.logs.events)
            try:
                result = await proc.run(
                    command.argv, cwd=command.cwd, env=command.env, emit=self.logs.emit,
                    timeout=max(remaining, 1.0), max_line_bytes=self.settings.log_line_max_bytes,
                    pass_fds=command.pass_fds, watchdog=command.watchdog, started=command.started,
                )
            except FileNotFoundError:
                raise BuildError(f"{argv[0]} is not installed on the build machine") from None
            except proc.CommandTimeout:
                raise BuildError(self._timeout_reason()) from None
            if result.code != 0:
                if limit := self.sandbox.limit_reason(command):
                    raise BuildError(limit)
                last = "\n".join(result.tail[-10:])
                advice = failure_advice(event_texts(self.logs.events[mark:]))
                raise BuildError(f"`{' '.join(argv)}` exited with code {result.code}. "
                                 + (advice + " " if advice else "") + f"Last lines:\n{last}")

    # -- the build cache -------------------------------------------------------------------

    def _manager_label(self, manager: str, label: str) -> str:
        return f"npm@{cache.npm_version(self.node_home)}" if manager == "npm" else label

    async def _open_cache(self, build_plan: Plan, root: Path, node_version: str) -> cache.Key | None:
        """Point the package managers at this project's caches; the key of the node_modules
        to restore, None when none is to be."""
        if self.cache_mode == "off":
            self.logs.emit("system", "Build cache: off (DEPLOYHUB_BUILD_CACHE=off)")
            return None
        project = await retry(lambda: self.store.get_project(self.dep.project))
        self.cache_owner = project.owner
        self.cache_home = cache.project_dir(self.settings.data_dir, self.dep.project,
                                            project.owner)
        if self.dep.cache and not self.sandbox.as_user:
            # Kept per project: the build can write them, so no other project sees them. As
            # the build account (a task of its own) they last the task: its build directory.
            self.sandbox.cache = self.cache_home / cache.MANAGERS
        if not self.dep.cache:
            self.logs.emit("system", "Build cache: skipped for this deployment (\"cache\": "
                                     "false); what it installs becomes the new cache")
            return None
        installer = build_plan.installer
        label = installer.label if installer else build_plan.manager
        key = await asyncio.to_thread(
            cache.key_for, root, build_plan.lockfile, node_version,
            self._manager_label(build_plan.manager, label), build_plan.install,
        )
        if key is None:
            self.logs.emit("system", "Build cache: node_modules not restored (no lockfile to "
                                     "key it on); package manager caches are the project's")
        return key

    async def _install_paths(self, root: str, lockfile: str, manager: str, *,
                             installed: bool = False) -> list[str]:
        """Where an install from `lockfile` (relative to the root directory `root`) writes,
        relative to the repository: node_modules of the workspace root (the lockfile's
        directory), of its workspace packages and of the root directory, and Yarn's
        Plug'n'Play files. Those the checkout has itself are left alone, never saved or
        restored over (`installed`: after the install, which wrote some of them: those the
        checkout had were found before it)."""
        workspace = workspaces.clean(posixpath.join(root, posixpath.dirname(lockfile)))
        if workspace is None:
            return []
        paths = await asyncio.to_thread(workspaces.install_paths, self.src, workspace, root,
                                        pnp=manager == "yarn")
        if installed:
            return [p for p in paths if p not in self._own]
        own = [p for p in paths if os.path.lexists(self.src / p)]
        self._own.update(own)
        if own:
            self.logs.emit("system", f"Build cache: the repository has its own {', '.join(own)}: "
                                     "not restored over, not saved")
        return [p for p in paths if p not in own]

    async def _restore_cache(self, key: cache.Key, paths: list[str]) -> list[str]:
        """Restore the project's entry at `paths` (where this build's install writes); the
        paths restored, none when the entry is not to be used."""
        started = time.monotonic()
        try:
            if self.cache_mode == "storage":
                detail, restored = await self._restore_archive(key, paths)
            else:
                assert self.cache_home is not None
                local = cache.LocalCache(self.cache_home, self.settings.build_cache_max_mb * 2**20)
                detail, restored = await asyncio.to_thread(local.restore, key, self.src, paths)
        except cache.CacheError as exc:
            self.logs.emit("system", f"Build cache: not restored: {exc} "
                                     f"({time.monotonic() - started:.1f} s)")
            return []
        except Exception as exc:
            log.exception("restoring the cache of %s", self.dep.id)
            self.logs.emit("system", f"Build cache: not restored: could not read it ({exc})")
            return []
        how = "unpacked from storage" if self.cache_mode == "storage" else "hardlinked"
        self.logs.emit("system", f"Build cache: restored {', '.join(restored)} ({detail}, {how}) in "
                                 f"{time.monotonic() - started:.1f} s, from {key.lockfile} "
                                 f"{key.lockfile_sha256[:12]}, Node {key.node}, {key.manager}")
        return restored

    async def _restore_archive(self, key: cache.Key, paths: list[str]) -> tuple[str, list[str]]:
        prefix = cache.storage_prefix(self.dep.project, self.cache_owner)
        manifest = cache.parse_manifest(await self.storage.get_bytes(prefix + cache.MANIFEST))
        if why := key.mismatch(manifest["key"]):
            raise cache.CacheError(why)
        cache.check_paths(manifest.get("paths"), paths)  # before downloading anything
        archive = self.work / cache.ARCHIVE
        with open(archive, "wb") as f:
            async for chunk in self.storage.iter_bytes(prefix + cache.ARCHIVE):
                await asyncio.to_thread(f.write, chunk)
        try:
            if await asyncio.to_thread(cache.file_sha256, archive) != manifest.get("sha256"):
                raise cache.CacheError("its archive does not match its manifest (corrupt)")
            files, restored = await asyncio.to_thread(
                cache.unpack, archive, self.src, manifest.get("paths"), paths, self.work)
        finally:
            archive.unlink(missing_ok=True)
        size = manifest.get("bytes")
        return (f"{files} files, a {size // 2**20 if isinstance(size, int) else '?'} MiB archive",
                restored)

    async def _keep_for_cache(self, installed: Installed, build_plan: Plan, root: Path,
                              node_version: str, key: cache.Key | None, paths: list[str]) -> None:
        """What to save once ready: the key of the install that ran (a fallback lockfile's
        when the first one was stale) and where it wrote."""
        if self.cache_home is None:
            return
        used = installed.installer
        if key is None or (used is not None and used is not build_plan.installer):
            if used is None or not used.lockfile:
                return
            key = cache.key_for(root, used.lockfile, node_version,
                                self._manager_label(used.manager, used.label), used.argv)
            if key is not None:
                paths = await self._install_paths(build_plan.root, key.lockfile, used.manager,
                                                  installed=True)
        if key is not None and paths:
            self._save = (key, paths)

    async def _save_cache(self, key: cache.Key, paths: list[str]) -> None:
        """Save node_modules as the project's entry, and bound its package manager caches;
        nothing here can fail the deployment, which is ready."""
        assert self.cache_home is not None
        started = time.monotonic()
        max_bytes = self.settings.build_cache_max_mb * 2**20
        try:
            if self.cache_mode == "storage":
                detail, saved = await self._save_archive(key, paths, max_bytes)
                where = "to storage"
            else:
                local = cache.LocalCache(self.cache_home, max_bytes)
                saved = await asyncio.to_thread(cache.saved_paths, self.src, paths)
                detail = await asyncio.to_thread(local.save, key, self.src, saved, self.dep.id)
                where = "hardlinked, replacing the project's last one"
            self.logs.emit("system", f"Build cache: saved {', '.join(saved)} ({detail}, {where}) "
                                     f"in {time.monotonic() - started:.1f} s")
        except cache.CacheError as exc:
            self.logs.emit("system", f"Build cache: not saved: {exc}")
        except Exception as exc:
            log.exception("saving the cache of %s", self.dep.id)
            self.logs.emit("system", f"Build cache: not saved: {exc}")
        if self.sandbox.cache.is_relative_to(self.cache_home):
            if note := await asyncio.to_thread(cache.bound_managers, self.sandbox.cache, max_bytes):
                self.logs.emit("system", f"Build cache: {note}")

    async def _save_archive(self, key: cache.Key, paths: list[str], max_bytes: int) -> tuple[str, list[str]]:
        archive = self.work / cache.ARCHIVE
        try:
            sha256, size, saved = await asyncio.to_thread(cache.pack, self.src, paths, archive)
            if max_bytes and size > max_bytes:
                raise cache.CacheError(f"its archive is {size // 2**20} MiB, more than "
                                       f"DEPLOYHUB_BUILD_CACHE_MAX_MB ({max_bytes // 2**20} MiB)")
            prefix = cache.storage_prefix(self.dep.project, self.cache_owner)
            await self.storage.put_file(prefix + cache.ARCHIVE, archive, "application/gzip")
            await self.storage.put_bytes(prefix + cache.MANIFEST,
                                         cache.archive_manifest(key, saved, sha256, size, self.dep.id),
                                         "application/json")
        finally:
            archive.unlink(missing_ok=True)
        return f"a {size / 2**20:.0f} MiB archive", saved

    # -- output ----------------------------------------------------------------------------

    async def _upload(self, output: Path, root: Path, *, as_is: bool = False,
                      netlify_dir: Path | None = None, base: str = "") -> None:
        """Publish `output`, with the routing of `root`'s netlify.toml (`netlify_dir`'s when
        given) and vercel.json; `as_is`: files from the repository itself (no build wrote
        them), so its hidden files and node_modules are left out; `base`: the sub-path the
        site was built for ("repo/"), which its files are served under."""
        hosted = await asyncio.to_thread(hosted_config.read, root, netlify_dir)
        for note in hosted.notes:
            self.logs.emit("system", note)
        async def live(uploaded: Uploaded) -> None:
            url = self.settings.site_url_for(self.dep.project)
            url = f"{url.rstrip('/')}/{base}" if base else url
            self.logs.emit("system", f"Deployed {file_count(uploaded.files)}. Live at {url}")
            # Ready the moment the manifest is stored; compressed copies of new files, the
            # log copy and cleanup come after.
            if not await retry(lambda: self.store.transition(self.dep, Status.READY)):
                raise Canceled("Canceled while running.")
            self._live = True

        await upload_site(
            self.storage, self.dep.id, self.src, output, self.logs.emit,
            max_files=self.settings.build_max_output_files,
            max_bytes=self.settings.build_max_output_mb * 1024 * 1024,
            leases=BlobLeases(self.store.redis, self.settings.blob_grace_seconds, self.dep.id),
            on_stored=live, as_is=as_is, rules=(hosted.redirects, hosted.headers), base=base,
        )

    # -- ending ----------------------------------------------------------------------------

    async def _finish(self, status: Status, reason: str) -> None:
        reason = self.logs.mask(reason)  # it is stored and shown as it is, like a log line
        if reason:
            self.logs.emit("system", f"Error: {reason}" if status == Status.FAILED else reason)
        if self.logs.dropped:
            self.logs.emit("system", f"{self.logs.dropped} further log lines were not kept.")
        await self.logs.close(timeout=120)
        body = ("\n".join(self.logs.events) + "\n").encode()
        try:
            await self.storage.put_bytes(log_key(self.dep.id), body, "application/x-ndjson")
        except Exception:
            log.exception("could not store the log of %s", self.dep.id)
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await retry(lambda: self.store.record_log_end(self.dep.project, self.dep.id, self.logs.seq, LOG_TTL_SECONDS))
        await retry(lambda: self.store.transition(self.dep, status, reason))

    # -- environment -----------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        home = self.work / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update({"HOME": str(home), "LANG": env.get("LANG", "C.UTF-8"), "TERM": "dumb"})
        return env

    def _node_fetch_env(self) -> dict[str, str]:
        """For npm fetching Node releases: none of the project's variables, and an npm cache
        of its own that builds never see (they can write to the shared one), so no build can
        plant the Node binary that other builds run."""
        cache = self.settings.data_dir / "cache" / "node-fetch"
        cache.mkdir(parents=True, exist_ok=True)
        return {**self._base_env(), "npm_config_cache": str(cache),
                "npm_config_update_notifier": "false", "NO_COLOR": "1"}

    def _build_env(self) -> dict[str, str]:
        base = self._base_env()
        if self.node_home is not None:
            base["PATH"] = f"{self.node_home / 'bin'}:{base['PATH']}"
        return {
            **self.detected_env,  # the project's variables below may still say otherwise
            **self.variables,  # the project's own; ours below win (the API refuses those names)
            **base,
            # As Vercel and Netlify set it; a project may say CI=false (CRA then lets
            # warnings pass).
            "CI": self.variables.get("CI", self.detected_env.get("CI", "1")),
            "NO_COLOR": "1",
            **cache.manager_env(str(self.sandbox.cache)),  # the sandbox's view replaces these
            "npm_config_update_notifier": "false",
            "npm_config_fund": "false",
            "npm_config_audit": "false",
            "COREPACK_ENABLE_DOWNLOAD_PROMPT": "0",
            "COREPACK_INTEGRITY_KEYS": "0",
            # Yarn Berry from the npm registry, not repo.yarnpkg.com (which may be unreachable).
            "COREPACK_NPM_REGISTRY": "https://registry.npmjs.org",
        }


def _refused_auth(detail: str) -> bool:
    """Whether git's last line says the server wants (other) credentials: 401 leads git to
    ask for a user name, which it cannot (no terminal, no askpass); 403 it reports."""
    lowered = detail.lower()
    return any(sign in lowered for sign in (
        "could not read username", "could not read password", "authentication failed",
        "the requested url returned error: 401", "the requested url returned error: 403",
    ))


def overrides(settings: Mapping[str, str]) -> Overrides:
    """The deployment's settings as detection takes them: a command is one string the
    sandbox's shell runs (`sh -c`, inside the sandbox, never on the host)."""
    def shell(name: str) -> tuple[str, ...] | None:
        return ("sh", "-c", settings[name]) if settings.get(name) else None

    return Overrides(
        root_directory=settings.get("root_directory") or None,
        install_command=shell("install_command"),
        build_command=shell("build_command"),
        output_directory=settings.get("output_directory") or None,
        node_version=settings.get("node_version") or None,
    )


def cache_mode(settings: Settings) -> str:
    """DEPLOYHUB_BUILD_CACHE with `auto` decided: `storage` with storage=s3 (builds on ECS
    run in a fresh task each, where the disk is gone the next time), else `local`."""
    if settings.build_cache == "auto":
        return "storage" if settings.storage == "s3" else "local"
    return settings.build_cache


def holder() -> str:
    return f"worker:{socket.gethostname()}:{os.getpid()}"
