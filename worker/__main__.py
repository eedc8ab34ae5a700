"""`python -m worker <deployment-id>`: build one deployment (the build container's entry point).
`python -m worker --check-sandbox`: exit 0 silently when bubblewrap can sandbox builds here,
else exit 1 and print why (the server runs this before it takes builds).

Configuration comes from the same DEPLOYHUB_* variables as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import setproctitle

from deployhub.redis_client import connect_redis, through_outage
from deployhub.settings import Settings, SettingsError
from deployhub.status import Status
from deployhub.storage import open_storage
from deployhub.store import NotFound, Store
from deployhub.validation import InvalidInput, check_deployment_id

from . import bwrap, netns
from .account import account_problem
from .build import Build, holder

log = logging.getLogger("worker")

WATCH_INTERVAL = 2.0


async def watch(build: Build, store: Store, lease_holder: str) -> None:
    """Keep the lease alive and notice a cancel made through the API."""
    while True:
        try:
            await store.refresh_leases([build.dep.id], lease_holder)
            current = await store.get_deployment(build.dep.id)
            if current.status == Status.CANCELED:
                build.stop(Status.CANCELED, current.reason or "Canceled.")
        except Exception as exc:  # an outage must not end the build; the lease has slack
            log.warning("lease refresh failed: %s", exc)
        await asyncio.sleep(WATCH_INTERVAL)


async def read_stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def watch_parent(build: Build, stdin: asyncio.StreamReader) -> None:
    """Our stdin is a pipe from the server: EOF means the server is gone, so stop."""
    while await stdin.read(4096):
        pass
    build.stop(Status.FAILED, "The server that started this build stopped before it finished.")


async def standby(lease_holder: str) -> int:
    """The local runner's worker in waiting: started (interpreter and imports, about half a
    second here) before there is a build, it takes the deployment id from its first line of
    stdin, then watches the rest as `--watch-stdin` does. EOF first: the server needs it no more."""
    stdin = await read_stdin()
    line = await stdin.readline()
    if not line.endswith(b"\n"):
        return 0
    dep_id = check_deployment_id(line.decode(errors="replace").strip())
    # Named as a worker started for this build is, for ps, pgrep and the operator.
    setproctitle.setproctitle(" ".join(f"{dep_id} --watch-stdin" if arg == "--standby" else arg
                                       for arg in sys.orig_argv))
    return await main(dep_id, stdin, lease_holder)


async def main(dep_id: str, stdin: asyncio.StreamReader | None, lease_holder: str) -> int:
    settings = Settings.from_env()
    if settings.redis_url is None:
        raise SettingsError("the worker needs DEPLOYHUB_REDIS_URL")
    url = settings.redis_url.reveal()
    redis = await through_outage(lambda: connect_redis(url, max_connections=8), deadline=30)
    try:
        store = Store(redis)
        try:
            dep = await through_outage(lambda: store.get_deployment(dep_id), deadline=30)
        except NotFound:
            log.error("deployment %s does not exist", dep_id)
            return 2
        if dep.final:
            return 0
        async with open_storage(settings) as storage:
            build = Build(settings, redis, storage, dep)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(
                    sig, build.stop, Status.FAILED, "The build worker was shut down before it finished."
                )
            helpers = [asyncio.create_task(watch(build, store, lease_holder))]
            if stdin is not None:
                helpers.append(asyncio.create_task(watch_parent(build, stdin)))
            try:
                await build.run()
            finally:
                for task in helpers:
                    task.cancel()
                for task in helpers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        return 0
    finally:
        await redis.aclose()


def check_sandbox() -> int:
    """Whether builds can be isolated here as the settings ask: bubblewrap (what
    DEPLOYHUB_SANDBOX=none would use too) or, with DEPLOYHUB_SANDBOX=user, the build account."""
    settings = Settings.from_env()
    if settings.sandbox == "user":
        problem = account_problem(settings.build_user)
    else:
        share_net = settings.build_network == "host"
        problem = bwrap.problem(settings.bwrap, share_net=share_net)
        if problem is None and settings.sandbox == "bwrap" and not share_net:  # at start, not per build
            problem = netns.problem(bwrap.find_binary(settings.bwrap) or "bwrap")
    if problem:
        print(problem)
        return 1
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("deployment", nargs="?", help="the deployment id to build")
    parser.add_argument(
        "--lease-holder", default=None,
        help="hold the deployment's lease under this name (the runner's, so a runner that "
             "restarts knows the builds it had); default worker:<host>:<pid>",
    )
    parser.add_argument(
        "--watch-stdin", action="store_true",
        help="stop the build when standard input closes (the local runner's lifeline)",
    )
    parser.add_argument(
        "--standby", action="store_true",
        help="start now, read the deployment id from the first line of standard input, then "
             "watch it as --watch-stdin does (the local runner's worker in waiting)",
    )
    parser.add_argument(
        "--check-sandbox", action="store_true",
        help="exit 0 when bubblewrap can sandbox builds here, else print why and exit 1",
    )
    args = parser.parse_args(argv)
    if (args.deployment is None) == (not args.check_sandbox and not args.standby):
        parser.error("the deployment id is required (or --standby, or --check-sandbox)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.check_sandbox:
            return check_sandbox()
        lease_holder = args.lease_holder or holder()
        if args.standby:
            return asyncio.run(standby(lease_holder))
        dep_id = check_deployment_id(args.deployment)

        async def run() -> int:
            return await main(dep_id, await read_stdin() if args.watch_stdin else None, lease_holder)

        return asyncio.run(run())
    except (SettingsError, InvalidInput) as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
