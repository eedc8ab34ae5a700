"""The ECS runner: one task per build (`python -m worker <id>` in the task's container).

Builds start from the shared queue. A reconciler on every replica (one of them per round,
by a Redis lock) polls DescribeTasks for every task in `keys.ECS_TASKS`: it holds the
leases of tasks still starting or running, fails the deployments whose task stopped first,
and stops tasks whose deployment was canceled. The task ARNs live in Redis, so a restarted
server or another replica carries on where this one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from .. import keys
from ..queue import BuildQueue, Dispatcher, dispatching
from ..redis_client import stop_if_cancelled
from ..settings import Settings, env_name
from ..status import Status
from ..store import Deployment, Store
from .limits import BuildLimits

log = logging.getLogger(__name__)

# Seconds between two DescribeTasks rounds; a stopped task is seen within this (plus a call).
RECONCILE_INTERVAL = 5.0
DESCRIBE_BATCH = 100  # the most task ARNs DescribeTasks takes in one call
# RunTask attempts when ECS answers with capacity `failures` (throttling and 5xx answers are
# retried by botocore's standard retry mode, API_ATTEMPTS times each call).
CAPACITY_ATTEMPTS = 5
CAPACITY_BACKOFF = 1.0  # seconds, doubled on each attempt, at most CAPACITY_BACKOFF_MAX
CAPACITY_BACKOFF_MAX = 16.0
API_ATTEMPTS = 5
# Seconds a task may keep running after its build ended on its own (the worker still
# writes the full log to storage) before the reconciler stops it.
FINISH_GRACE = 120.0
# Settings the worker needs; nothing else of the server's goes into the overrides.
WORKER_SETTINGS = (
    "storage", "s3_bucket", "s3_prefix", "s3_endpoint_url", "s3_region", "build_timeout",
    "clone_timeout", "allow_hosts", "build_memory_mb", "build_max_processes",
    "build_max_output_files", "build_max_output_mb", "log_max_bytes", "log_max_lines",
    "log_line_max_bytes", "build_cache", "build_cache_max_mb",
)
# Error codes that mean "not now" rather than "not like this".
TRANSIENT_CODES = frozenset({
    "ThrottlingException", "Throttling", "ServerException", "ServiceUnavailable",
    "ServiceUnavailableException", "RequestLimitExceeded", "TooManyRequestsException",
    "InternalFailure", "InternalError",
})
# What to fix, by the AWS error code (or stopped reason) it answers.
HINTS = {
    "ClientException": "check DEPLOYHUB_ECS_CLUSTER, DEPLOYHUB_ECS_TASK_DEFINITION and "
                       "DEPLOYHUB_ECS_CONTAINER against the ECS console",
    "ClusterNotFoundException": "check DEPLOYHUB_ECS_CLUSTER",
    "InvalidParameterException": "check DEPLOYHUB_ECS_SUBNETS, DEPLOYHUB_ECS_SECURITY_GROUPS, "
                                 "DEPLOYHUB_ECS_LAUNCH_TYPE and the task definition",
    "AccessDeniedException": "allow this server's AWS identity ecs:RunTask, ecs:DescribeTasks, "
                             "ecs:StopTask and iam:PassRole on the task's roles",
    "UnsupportedFeatureException": "check DEPLOYHUB_ECS_LAUNCH_TYPE / "
                                   "DEPLOYHUB_ECS_CAPACITY_PROVIDERS for this region",
    "PlatformUnknownException": "check the task definition's platform version",
    "CannotPullContainerError": "check the image in the task definition, the execution role "
                                "and the task's route to the registry (NAT or a public IP)",
    "ResourceInitializationError": "check the execution role and the task's route to "
                                   "Secrets Manager / SSM and CloudWatch Logs",
}


class StartFailed(Exception):
    """RunTask cannot start this build; the message says why and what to fix."""


class EcsRunner:
    def __init__(self, settings: Settings, store: Store, client: Any) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.queue = BuildQueue(store.redis, settings.max_builds)
        self.dispatcher = Dispatcher(self.queue, self._start, lambda: list(self.starting))
        self.holder = f"ecs:{settings.ecs_cluster}"
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # this replica, for the lock
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.refused: str | None = None
        # The Fargate task is the sandbox: its CPU and memory are the task definition's.
        self.limits = BuildLimits(policy=settings.build_without_limits)

    # -- the Runner protocol ------------------------------------------------------------

    async def submit(self, dep: Deployment) -> None:
        await self.queue.enqueue(dep)

    async def cancel(self, dep: Deployment, reason: str) -> bool:
        if not await self.store.transition(dep, Status.CANCELED, reason):
            return False
        # The worker would see the status and stop too; StopTask also ends a task that is
        # still pulling its image. A task still being started is stopped once it has an ARN.
        current = await self.store.get_deployment(dep.id)
        if current.task_arn:
            await self._stop(current.task_arn, f"DeployHub: {reason}")
        return True

    async def close(self) -> None:
        """Leave the tasks running (the next server, or another replica, watches them) but
        put back the deployments whose RunTask had not answered yet."""
        tasks = list(self.starting.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- starting a task ----------------------------------------------------------------

    async def _start(self, dep_id: str) -> None:
        await self.store.refresh_leases([dep_id], self.holder)
        self.starting[dep_id] = asyncio.create_task(self._launch(dep_id), name=f"ecs-start-{dep_id}")

    async def _launch(self, dep_id: str) -> None:
        try:
            dep = await self.store.get_deployment(dep_id)
            if dep.final:
                return
            try:
                arn = await self._run_task(dep)
            except StartFailed as exc:
                await self.store.transition(dep, Status.FAILED, str(exc))
                return
            await self.store.record_task(dep.id, arn)
            log.info("deployment %s builds in ECS task %s", dep.id, arn)
            if (await self.store.get_deployment(dep.id)).status == Status.CANCELED:
                await self._stop(arn, "DeployHub: canceled while the task started")
        except asyncio.CancelledError:
            # Shut down before ECS answered: queue it again for whoever runs next. Should
            # RunTask have started a task meanwhile, the next RunTask carries the same client
            # token and ECS answers with that task instead of starting a second one.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._requeue(dep_id))
            raise
        except Exception as exc:
            log.exception("could not start the ECS task of %s", dep_id)
            with contextlib.suppress(Exception):
                await self.store.transition(dep_id, Status.FAILED,
                                            f"DeployHub could not start the ECS task: {exc}")
        finally:
            self.starting.pop(dep_id, None)

    async def _requeue(self, dep_id: str) -> None:
        dep = await self.store.get_deployment(dep_id)
        if not dep.final and not dep.task_arn:
            await self.queue.release(dep_id)
            await self.queue.enqueue(dep)

    def run_task_params(self, dep: Deployment) -> dict[str, Any]:
        """RunTask's parameters for a build of `dep`."""
        s = self.settings
        env = s.to_env()
        environment = {env_name(name): env[env_name(name)] for name in WORKER_SETTINGS
                       if env_name(name) in env}
        if s.ecs_task_s3_endpoint_url:
            environment[env_name("s3_endpoint_url")] = s.ecs_task_s3_endpoint_url
        if s.ecs_task_redis_url is not None:  # else the task definition sets it (a secret)
            environment[env_name("redis_url")] = s.ecs_task_redis_url.reveal()
        vpc: dict[str, Any] = {"subnets": list(s.ecs_subnets), "assignPublicIp": s.ecs_assign_public_ip}
        if s.ecs_security_groups:
            vpc["securityGroups"] = list(s.ecs_security_groups)
        params: dict[str, Any] = {
            "cluster": s.ecs_cluster,
            "taskDefinition": s.ecs_task_definition,
            "count": 1,
            "startedBy": f"deployhub:{dep.id}"[:128],
            "networkConfiguration": {"awsvpcConfiguration": vpc},
            "overrides": {"containerOverrides": [{
                "name": s.ecs_container,
                # Arguments to the builder image's ENTRYPOINT (python -m worker).
                "command": [dep.id, "--lease-holder", self.holder],
                "environment": [{"name": k, "value": v} for k, v in sorted(environment.items())],
            }]},
            "tags": [{"key": "deployhub:deployment", "value": dep.id},
                     {"key": "deployhub:project", "value": dep.project}],
        }
        if s.ecs_capacity_providers:
            params["capacityProviderStrategy"] = [_provider(e) for e in s.ecs_capacity_providers]
        else:
            params["launchType"] = s.ecs_launch_type
        return params

    async def _run_task(self, dep: Deployment) -> str:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        params = self.run_task_params(dep)
        delay = CAPACITY_BACKOFF
        for attempt in range(1, CAPACITY_ATTEMPTS + 1):
            # Idempotent per attempt: botocore's retries of one call, and a server that takes
            # over a deployment whose RunTask was cut short, never start a second task; a
            # retry after "no capacity" is a new request, so it gets a token of its own.
            params["clientToken"] = f"deployhub-{dep.id}-{attempt}"
            try:
                reply = await self.client.run_task(**params)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code, message = str(error.get("Code", "")), str(error.get("Message", exc))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if code in TRANSIENT_CODES or status >= 500:
                    message = message.strip().splitlines()[0] if message.strip() else ""
                    raise StartFailed(
                        f"ECS kept refusing RunTask for now ({code}: {message}) after "
                        f"{API_ATTEMPTS} tries. Deploy again in a while; if it keeps happening, "
                        "ask AWS to raise the account's RunTask rate limit."
                    ) from None
                raise StartFailed(_explain(f"ECS refused to start the build task ({code}: {message}).",
                                           code)) from None
            except NoCredentialsError:
                raise StartFailed(
                    "DeployHub found no AWS credentials to start the build task with. Give this "
                    "server an AWS identity (environment, profile, instance or task role)."
                ) from None
            except BotoCoreError as exc:
                raise StartFailed(
                    f"DeployHub could not reach ECS: {exc}. Check DEPLOYHUB_ECS_ENDPOINT_URL / "
                    "DEPLOYHUB_ECS_REGION and this server's network."
                ) from None
            started = reply.get("tasks") or []
            if started:
                return str(started[0]["taskArn"])
            failures = reply.get("failures") or []
            reasons = "; ".join(f"{f.get('reason', '?')}" + (f" ({f['detail']})" if f.get("detail") else "")
                                for f in failures) or "no task and no reason"
            if not any(_capacity(f) for f in failures):
                raise StartFailed(f"ECS did not start the build task: {reasons}.")
            if attempt == CAPACITY_ATTEMPTS:
                raise StartFailed(
                    f"ECS had no capacity for the build task after {attempt} tries: {reasons}. "
                    "Deploy again later, or add a capacity provider (DEPLOYHUB_ECS_CAPACITY_PROVIDERS)."
                )
            log.warning("ECS has no capacity for %s (%s): trying again in %.0f s", dep.id, reasons, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, CAPACITY_BACKOFF_MAX)
        raise AssertionError("unreachable")

    async def _stop(self, arn: str, reason: str) -> None:
        try:
            await self.client.stop_task(cluster=self.settings.ecs_cluster, task=arn, reason=reason[:255])
        except Exception as exc:  # the reconciler tries again next round
            log.warning("could not stop ECS task %s: %s", arn, exc)

    # -- watching the tasks -------------------------------------------------------------

    async def reconcile_forever(self) -> None:
        lock_ms = int(RECONCILE_INTERVAL * 1000 * 0.8)
        while True:
            try:
                # One replica per round: the lock lapses before the next round, so a replica
                # that died holds it for less than one interval.
                if await self.store.redis.set(keys.ECS_RECONCILE_LOCK, self.name, nx=True, px=lock_ms):
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ECS or Redis away: leases have slack, try next round
                stop_if_cancelled()
                log.warning("could not reconcile the ECS tasks: %s", exc)
            await asyncio.sleep(RECONCILE_INTERVAL)

    async def reconcile(self) -> None:
        """One round: describe every watched task and act on what it says."""
        watched = await self.store.watched_tasks()
        items = sorted(watched.items())
        for start in range(0, len(items), DESCRIBE_BATCH):
            await self._reconcile_batch(dict(items[start:start + DESCRIBE_BATCH]))

    async def _reconcile_batch(self, batch: dict[str, str]) -> None:
        reply = await self.client.describe_tasks(cluster=self.settings.ecs_cluster, tasks=list(batch.values()))
        tasks = {str(t["taskArn"]): t for t in reply.get("tasks") or []}
        deps = {d.id: d for d in await self.store.get_deployments(batch)}
        alive, forget = [], []
        for dep_id, arn in batch.items():
            dep, task = deps.get(dep_id), tasks.get(arn)
            if dep is None:
                forget.append(dep_id)
            elif task is None:  # ECS forgets stopped tasks after about an hour
                forget.append(dep_id)
                await self._fail(dep, f"ECS no longer knows the build task {arn}. Deploy again to retry.")
            elif task.get("lastStatus") == "STOPPED" or _container_exited(task, self.settings.ecs_container):
                if task.get("lastStatus") == "STOPPED":
                    forget.append(dep_id)
                if not dep.final:
                    await self._fail(dep, _stopped_reason(task, self.settings.ecs_container))
            elif dep.final:
                canceled = dep.status == Status.CANCELED
                if task.get("desiredStatus") != "STOPPED" and (
                        canceled or _age(dep) > FINISH_GRACE):
                    await self._stop(arn, f"DeployHub: the deployment is {dep.status}")
            else:
                alive.append(dep_id)
        if alive:
            # Still provisioning, pulling its image or building: it is alive, whatever the
            # worker has (not yet) said.
            await self.store.refresh_leases(alive, self.holder)
            await self.queue.hold(alive)
        await self.store.forget_tasks(forget)

    async def _fail(self, dep: Deployment, reason: str) -> None:
        if await self.store.transition(dep, Status.FAILED, reason):
            log.warning("deployment %s failed: %s", dep.id, reason)


def _provider(entry: str) -> dict[str, Any]:
    name, *numbers = entry.split(":")
    item: dict[str, Any] = {"capacityProvider": name}
    if numbers:
        item["weight"] = int(numbers[0])
    if len(numbers) > 1:
        item["base"] = int(numbers[1])
    return item


def _capacity(failure: dict[str, Any]) -> bool:
    reason = str(failure.get("reason", ""))
    return reason.startswith(("RESOURCE:", "AGENT")) or "capacity" in reason.lower()


def _explain(message: str, code: str) -> str:
    """AWS's message, and which setting to look at: named by the message when it says."""
    lower = message.lower()
    if "subnet" in lower:
        hint = "check DEPLOYHUB_ECS_SUBNETS (subnet ids of the cluster's VPC, in DEPLOYHUB_ECS_REGION)"
    elif "security group" in lower:
        hint = "check DEPLOYHUB_ECS_SECURITY_GROUPS (ids in the subnets' VPC)"
    elif "task definition" in lower:
        hint = ("check that DEPLOYHUB_ECS_TASK_DEFINITION is registered and active in "
                "DEPLOYHUB_ECS_REGION")
    elif "cluster" in lower:
        hint = "check DEPLOYHUB_ECS_CLUSTER and DEPLOYHUB_ECS_REGION"
    else:
        hint = HINTS.get(code, "")
    return f"{message} To fix: {hint}." if hint else message


def _container(task: dict[str, Any], name: str) -> dict[str, Any]:
    for container in task.get("containers") or []:
        if container.get("name") == name:
            return dict(container)
    return {}


def _container_exited(task: dict[str, Any], name: str) -> bool:
    """The worker's container ended (the task is still stopping): the build is over."""
    container = _container(task, name)
    return container.get("lastStatus") == "STOPPED"


def _stopped_reason(task: dict[str, Any], name: str) -> str:
    container = _container(task, name)
    reason = str(task.get("stoppedReason") or container.get("reason") or "no reason given")
    code = container.get("exitCode")
    exit_text = f"exit code {code}" if code is not None else "no exit code"
    stop_code = f", {task['stopCode']}" if task.get("stopCode") else ""
    text = (f"The ECS build task stopped before the build finished: {reason} "
            f"({exit_text}{stop_code}).")
    for key, hint in HINTS.items():
        if key in reason:
            return f"{text} To fix: {hint}."
    return text + " Deploy again to retry."


def _age(dep: Deployment) -> float:
    return time.time() - dep.updated_at


@contextlib.asynccontextmanager
async def ecs_runner(settings: Settings, store: Store) -> AsyncIterator[EcsRunner]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(retries={"mode": "standard", "max_attempts": API_ATTEMPTS},
                       connect_timeout=10, read_timeout=30)
    async with get_session().create_client(
        "ecs", region_name=settings.ecs_region, endpoint_url=settings.ecs_endpoint_url or None,
        config=config,
    ) as client:
        runner = EcsRunner(settings, store, client)
        reconciler = asyncio.create_task(runner.reconcile_forever(), name="deployhub-ecs-reconciler")
        try:
            async with dispatching(runner.dispatcher):
                yield runner
        finally:
            reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciler
            await runner.close()
