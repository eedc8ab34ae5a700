"""A three-node Redis cluster on loopback: three masters, no replicas, slots split in thirds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from deployhub.embedded_redis import free_port
from tests.support.procs import HOST, RedisServer

SLOTS = 16384
FORM_TIMEOUT = 20.0


class ClusterNode(RedisServer):
    """One node: a RedisServer with cluster mode on and its node file in its data directory."""

    name = "redis-cluster-node"

    def __init__(self, base_dir: Path, **kw: Any) -> None:
        super().__init__(base_dir, **kw)
        # The bus port too: by default it is port + 10000, which may be taken (or past 65535).
        self.bus_port = free_port()

    def start(self) -> None:
        # Both ports were free when picked; a connection elsewhere may take one before the node
        # binds it (its ephemeral port comes from the same range): pick again, a few times.
        for attempt in range(3):
            try:
                super().start()
                return
            except RuntimeError as exc:
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise
                self.port, self.bus_port = free_port(), free_port()
                (self.data_dir / "nodes.conf").unlink(missing_ok=True)

    def _command(self) -> list[str]:
        return super()._command() + [
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip


def command(port: int, *args: str | int) -> Any:
    """One command to one node (not through a cluster client: no redirects), its reply."""
    with redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=5) as client:
        return client.execute_command(*args)


class Cluster:
    """Start three nodes, give each a third of the slots, MEET them, wait for cluster_state:ok."""

    def __init__(self, base_dir: Path) -> None:
        self.nodes = [ClusterNode(base_dir / f"node{i}", persist=False) for i in range(3)]
        self._moved: dict[int, int] = {}  # slot -> port, for the slots move_slot moved

    @property
    def url(self) -> str:
        """What a user pastes: one node's address (as an ElastiCache configuration endpoint)."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        third = SLOTS // 3
        bounds = [(0, third - 1), (third, 2 * third - 1), (2 * third, SLOTS - 1)]
        for node, (low, high) in zip(self.nodes, bounds):
            command(node.port, "CLUSTER", "ADDSLOTSRANGE", low, high)
        for node in self.nodes[1:]:
            first = self.nodes[0]
            command(node.port, "CLUSTER", "MEET", HOST, first.port, first.bus_port)
        deadline = time.monotonic() + FORM_TIMEOUT
        while not all("cluster_state:ok" in command(p, "CLUSTER", "INFO") for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        # Every node must also know every other (MEET spreads by gossip), or a client that asks
        # one node for CLUSTER SHARDS may be told of fewer than three.
        while not all(len(command(p, "CLUSTER", "NODES")) >= 3 for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's nodes did not all meet")
            time.sleep(0.1)

    def slot(self, key: str) -> int:
        return int(command(self.ports[0], "CLUSTER", "KEYSLOT", key))

    def node_of(self, key: str) -> int:
        """The port of the node that serves `key`'s slot."""
        slot = self.slot(key)
        return self._moved.get(slot) or self.ports[min(slot // (SLOTS // 3), 2)]

    def move_slot(self, key: str, keys: list[str]) -> int:
        """Move `key`'s slot, with `keys` (all it holds), to the next node, as a resharding
        does; the new owner's port."""
        slot, source = self.slot(key), self.node_of(key)
        target = self.ports[(self.ports.index(source) + 1) % len(self.ports)]
        ids = {port: command(port, "CLUSTER", "MYID") for port in (source, target)}
        command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        command(source, "MIGRATE", HOST, target, "", 0, 5000, "KEYS", *keys)
        for port in (target, source, *(p for p in self.ports if p not in (source, target))):
            command(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        self._moved[slot] = target
        return target

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh three-node cluster for one test (stopped afterwards, even on failure)."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
