"""Operations: health and readiness probes, Prometheus metrics, and site request counts.

`/healthz` answers while the process is up; `/readyz` only while Redis and storage answer
(a load balancer takes the replica out of rotation otherwise); `/metrics` is the Prometheus
text format. Cluster-wide figures (deployments by final status, phase durations, queue) come
from Redis, so every replica shows the same; the rest are this process's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from .connections import REDIS, STORAGE, STORE
from .live.hub import HUB
from .redis_client import CONNECTION_ERRORS
from .sites import SITES
from .status import STEPS, Status
from .storage import StorageError
from .store import PHASE_BUCKETS

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds each backend may take to answer /readyz
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = {"redis": _probe(request.config_dict[REDIS].ping()),
              "storage": _probe(request.config_dict[STORAGE].check())}
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    ready = all(r == "ok" for r in results.values())
    return web.json_response({"status": "ok" if ready else "unavailable", **results},
                             status=200 if ready else 503)


async def _probe(call: Awaitable[object]) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await call
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT:.0f} s"
    except (RedisError, StorageError, *CONNECTION_ERRORS) as exc:
        return f"error: {exc}"
    return "ok"


async def metrics(request: web.Request) -> web.Response:
    families: list[Metric] = []
    try:
        store = request.config_dict[STORE]
        families += _cluster_families(await store.metrics(), await store.count_active())
    except (RedisError, *CONNECTION_ERRORS) as exc:
        log.warning("/metrics without the cluster figures: Redis unavailable: %s", exc)
    hub = request.config_dict[HUB]
    families += _process_families(len(hub.sockets), hub.stats, request.config_dict[SITES].requests)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    ProcessCollector(registry=registry)
    return web.Response(body=generate_latest(registry), headers={"Content-Type": METRICS_CONTENT_TYPE})


class _Fixed(Collector):
    """Families read before the scrape (collectors are synchronous, Redis is not)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _cluster_families(counters: dict[str, str], active: Counter[Status]) -> list[Metric]:
    ended = CounterMetricFamily("deployhub_deployments", "Deployments that ended, by final status.",
                                labels=["status"])
    for status in (Status.READY, Status.FAILED, Status.CANCELED):
        ended.add_metric([status.value], float(counters.get(f"final:{status}", 0)))
    phases = HistogramMetricFamily("deployhub_build_phase_seconds",
                                   "How long each phase of a deployment took.", labels=["phase"])
    for phase in STEPS[:-1]:
        count = int(counters.get(f"phase_count:{phase}", 0))
        buckets = [(str(bound), float(counters.get(f"phase_le:{phase}:{bound}", 0)))
                   for bound in PHASE_BUCKETS]
        phases.add_metric([phase.value], [*buckets, ("+Inf", float(count))],
                          sum_value=float(counters.get(f"phase_sum:{phase}", 0)))
    queue = GaugeMetricFamily("deployhub_queue_length", "Deployments waiting for a build slot.",
                              value=active.get(Status.QUEUED, 0))
    running = GaugeMetricFamily("deployhub_builds_running", "Deployments being built, any phase.",
                                value=sum(n for s, n in active.items() if s != Status.QUEUED))
    return [ended, phases, queue, running]


def _process_families(sockets: int, stats: Counter[str], sites: Counter[int]) -> list[Metric]:
    connections = GaugeMetricFamily("deployhub_websocket_connections",
                                    "Live-log WebSocket connections to this process.", value=sockets)
    lines = CounterMetricFamily("deployhub_log_lines_relayed",
                                "Log lines this process relayed to sockets (lines x sockets).",
                                value=stats.get("log lines relayed", 0))
    requests = CounterMetricFamily("deployhub_site_requests", "Site requests this process answered.",
                                   labels=["status"])
    for status, count in sorted(sites.items()):
        requests.add_metric([str(status)], count)
    return [connections, lines, requests]
