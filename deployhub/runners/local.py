"""The local runner: `python -m worker` as a sandboxed child process per build."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator

from ..children import close_child
from ..queue import BuildQueue, Dispatcher, dispatching
from ..redis_client import stop_if_cancelled
from ..settings import Secret, Settings
from ..status import Status
from ..store import Deployment, NotFound, Store
from .limits import BuildLimits

log = logging.getLogger(__name__)

LEASE_REFRESH = 10.0
STOP_GRACE = 10.0
SANDBOX_CHECK_TIMEOUT = 30.0
WORKER_TAIL_LINES = 10  # of a dead worker's stderr, put in the deployment's reason
# Variables a worker needs from the server's environment; everything else stays behind.
WORKER_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
              "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
              "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "PYTHONPATH")


class LocalRunner:
    """Runs the builds its dispatcher claims from the shared queue: at most `max_builds` at
    once across every replica; the rest wait in `queued`.

    It holds the lease of every deployment it runs, so the reaper leaves them alone, and
    fails a deployment whose worker dies without saying how the build ended.
    """

    def __init__(self, settings: Settings, redis_url: Secret, store: Store, instance: str = "") -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.store = store
        self.owned: dict[str, asyncio.Task[None]] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        # Names this runner's builds' leases: the same after a restart on this machine and
        # data directory (and --workers index), so the restart fails what was left.
        self.holder = f"local:{socket.gethostname()}:{settings.data_dir.resolve()}"
        if instance:
            self.holder += f"#{instance}"
        # A build runs on the replica it was posted to while that one lives (its data
        # directory, its npm cache); the slots are shared all the same.
        self.queue = BuildQueue(store.redis, settings.max_builds, home=self.holder)
        self.dispatcher = Dispatcher(self.queue, self._start, lambda: list(self.owned))
        self.refused: str | None = None
        self.limits = BuildLimits(policy=settings.build_without_limits)
        # A worker started before its build (`python -m worker --standby`): the interpreter
        # and its imports, 0.45 s here, come off the build's time to ready.
        self.standby: asyncio.Task[asyncio.subprocess.Process] | None = None
        self.closed = False

    async def check_sandbox(self) -> None:
        """Ask the worker program itself whether it can sandbox builds on this machine; the
        answer (None, or why not) is what the API tells a deploy while it stands."""
        if self.settings.sandbox == "none":
            log.warning("DEPLOYHUB_SANDBOX=none: build code runs unsandboxed, with the worker's rights")
            return
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "--check-sandbox",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self._worker_env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), SANDBOX_CHECK_TIMEOUT)
        except TimeoutError:
            self.refused = f"The build sandbox check did not answer within {SANDBOX_CHECK_TIMEOUT:.0f} s."
        else:
            if proc.returncode == 1 and out.strip():
                self.refused = out.decode(errors="replace").strip()
            elif proc.returncode != 0:
                detail = err.decode(errors="replace").strip().splitlines()[-WORKER_TAIL_LINES:]
                self.refused = (f"The build sandbox check failed (exit code {proc.returncode}): "
                                + " / ".join(detail))
        finally:
            await close_child(proc)
        if self.refused:
            log.error("builds are refused: %s", self.refused)

    async def check_limits(self) -> None:
        """Say at start which build limits cannot be enforced here (the worker decides)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.limits", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, env=self._worker_env(),
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), SANDBOX_CHECK_TIMEOUT)
        except TimeoutError:  # what it said before it stopped answering still counts
            proc.kill()
            out = (await proc.communicate())[0] or b"the limits check did not answer"
        finally:
            await close_child(proc)
        if missing := out.decode(errors="replace").strip():
            log.warning("build limits NOT enforced on this machine: %s", missing)
            policy = self.settings.build_without_limits
            self.limits = BuildLimits(
                policy=policy, missing=tuple(missing.split("; ")),
                message=f"Build limits are not enforced on this machine: {missing}. " + (
                    "Builds are refused until they are (or DEPLOYHUB_BUILD_WITHOUT_LIMITS=run)."
                    if policy == "refuse" else
                    "Builds run without them (DEPLOYHUB_BUILD_WITHOUT_LIMITS=run); make the "
                    "cgroup writable for DeployHub to enforce them."),
            )
            if self.settings.build_without_limits == "refuse" and not self.refused:
                self.refused = (f"Builds are refused on this machine because a limit cannot be "
                                f"enforced: {missing}. Set DEPLOYHUB_BUILD_WITHOUT_LIMITS=run "
                                "to build without it.")
                log.error("builds are refused: %s", self.refused)

    async def submit(self, dep: Deployment) -> None:
        await self.queue.enqueue(dep)

    async def _start(self, dep_id: str) -> None:
        """The dispatcher claimed `dep_id` (it holds a slot): run its worker."""
        await self.store.refresh_leases([dep_id], self.holder)
        self.owned[dep_id] = asyncio.create_task(self._run(dep_id), name=f"build-{dep_id}")

    async def _run(self, dep_id: str) -> None:
        try:
            dep = await self.store.get_deployment(dep_id)
            if dep.final:  # canceled as it was claimed
                return
            await self._run_worker(dep)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("could not run the build of %s", dep_id)
            try:
                await self.store.transition(dep_id, Status.FAILED, f"DeployHub could not start the build: {exc}")
            except Exception as again:  # Redis is away: the reaper fails it once the lease ends
                log.warning("could not record that %s failed: %s", dep_id, again)
        finally:
            self.owned.pop(dep_id, None)
            self.prepare_standby()
            # Ending the deployment freed the slot already; this covers a worker that could
            # not record its end (the slot would otherwise wait out its lease).
            with contextlib.suppress(Exception):
                await self.queue.release(dep_id)

    async def cancel(self, dep: Deployment, reason: str) -> bool:
        # The worker sees the status within its watch interval and kills the build; a
        # deployment still waiting leaves the queue in the same step.
        return await self.store.transition(dep, Status.CANCELED, reason)

    def _worker_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
        env.update(self.settings.to_env())
        env["DEPLOYHUB_REDIS_URL"] = self.redis_url.reveal()
        return env

    async def _spawn(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            # The worker holds the lease under our name: after a crash of this server (which
            # takes its workers along), the next start here fails what it had left.
            sys.executable, "-m", "worker", *args, "--lease-holder", self.holder,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self._worker_env(),
        )

    def prepare_standby(self) -> None:
        """Start the next build's worker now, unless one waits already. One at a time: a
        second build at once starts its own."""
        if self.standby is None and not self.closed and not self.refused:
            self.standby = asyncio.create_task(self._spawn("--standby"), name="deployhub-standby-worker")

    async def _worker_for(self, dep_id: str) -> asyncio.subprocess.Process:
        """A worker building `dep_id`: the standby one, or a new one if there is none (or it
        died waiting)."""
        task, self.standby = self.standby, None
        if task is not None:
            try:
                proc = await task
            except Exception as exc:  # as a new one would fail below, with the reason
                log.warning("the standby build worker did not start: %s", exc)
            else:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(f"{dep_id}\n".encode())
                    await proc.stdin.drain()
                    return proc
                except (BrokenPipeError, ConnectionResetError) as exc:
                    log.warning("the standby build worker had ended (%s): starting another", exc)
                    await close_child(proc)
        return await self._spawn(dep_id, "--watch-stdin")

    async def _run_worker(self, dep: Deployment) -> None:
        proc = await self._worker_for(dep.id)
        self.procs[dep.id] = proc
        tail: deque[str] = deque(maxlen=WORKER_TAIL_LINES)
        try:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                log.info("worker %s: %s", dep.id, line)
            code = await proc.wait()
        finally:
            self.procs.pop(dep.id, None)
            await close_child(proc)
        current = await self.store.get_deployment(dep.id)
        if not current.final:
            detail = "\n".join(tail)
            await self.store.transition(
                dep, Status.FAILED,
                f"The build worker exited (code {code}) without finishing the deployment."
                + (f"\n{detail}" if detail else ""),
            )

    async def keep_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_REFRESH)
            if self.owned:
                try:
                    await self.store.refresh_leases(list(self.owned), self.holder)
                except Exception as exc:  # the lease has slack; the next refresh may succeed
                    stop_if_cancelled()
                    log.warning("could not refresh the build leases: %s", exc)

    async def fail_leftovers(self) -> list[str]:
        """Deployments a previous run of this server left unfinished: end them now."""
        failed = []
        for dep_id in await self.store.active_ids():
            if await self.store.lease_holder(dep_id) != self.holder or dep_id in self.owned:
                continue
            with contextlib.suppress(NotFound):
                if await self.store.transition(
                    dep_id, Status.FAILED,
                    "DeployHub restarted before this build finished. Deploy again to retry.",
                ):
                    failed.append(dep_id)
        return failed

    async def close(self) -> None:
        """Stop every build: workers get SIGTERM (they record why), then SIGKILL."""
        self.closed = True
        if self.standby is not None:  # it has no build: ends at once
            with contextlib.suppress(Exception):
                await close_child(await self.standby)
            self.standby = None
        for proc in list(self.procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        tasks = list(self.owned.values())
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            for proc in list(self.procs.values()):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            for task in pending:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task  # _run records its own failures


@contextlib.asynccontextmanager
async def local_runner(
    settings: Settings, redis_url: Secret, store: Store, instance: str = ""
) -> AsyncIterator[LocalRunner]:
    runner = LocalRunner(settings, redis_url, store, instance)
    # Both ask a worker process (half a second each): at once. The sandbox's refusal wins.
    await asyncio.gather(runner.check_limits(), runner.check_sandbox())
    for dep_id in await runner.fail_leftovers():
        log.warning("deployment %s was left unfinished by a previous run: marked failed", dep_id)
    leases = asyncio.create_task(runner.keep_leases(), name="deployhub-leases")
    try:
        if runner.refused:  # take no work from the shared queue that would fail here
            yield runner
        else:
            runner.prepare_standby()
            async with dispatching(runner.dispatcher):
                yield runner
    finally:
        leases.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leases
        await runner.close()
