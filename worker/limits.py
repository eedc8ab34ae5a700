"""`python -m worker.limits`: print which build limits this machine cannot enforce (one line,
empty when all hold). The local runner asks at start, so `deployhub serve` can say so.

It makes, and removes, a real group of each kind under the worker's own cgroup: what a build
would get.
"""

from __future__ import annotations

import os
import sys
import time

from deployhub.settings import Settings

from .cgroups import Cgroups
from .sandbox import LIMIT_SETTINGS


def missing(settings: Settings) -> list[str]:
    """`<why> (<setting>)` for each limit that cannot be enforced here."""
    groups = Cgroups.create(
        f"probe-{os.getpid()}-{time.monotonic_ns()}",
        memory_mb=settings.build_memory_mb, max_pids=settings.build_max_processes,
    )
    try:
        return [f"{why} ({LIMIT_SETTINGS[controller]})" for controller, why in groups.problems]
    finally:
        groups.close()


if __name__ == "__main__":
    print("; ".join(missing(Settings.from_env())))
    sys.exit(0)
