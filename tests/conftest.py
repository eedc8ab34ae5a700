from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.support.infra", "tests.support.service", "tests.support.served",
                  "tests.support.moto_ecs", "tests.support.sites"]



def _dump_asyncio_tasks(*_: object) -> None:
    """Every unfinished asyncio task and where it waits, on stderr: a thread dump of a hung
    test shows only the loop's select. Read from another thread it may race, which is fine
    for what it is for."""
    import asyncio
    import sys

    tasks = [t for t in list(asyncio.tasks._all_tasks) if not t.done()]  # type: ignore[attr-defined]
    print(f"--- {len(tasks)} unfinished asyncio tasks ---", file=sys.stderr)
    for task in tasks:
        task.print_stack(file=sys.stderr)


def pytest_configure(config: object) -> None:
    import signal

    signal.signal(signal.SIGUSR1, _dump_asyncio_tasks)  # `kill -USR1 <pytest pid>`


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: object) -> Iterator[None]:
    """A test still running 15 s before its timeout dumps its asyncio tasks, so the report of
    a hang (in CI too) says what it waited on."""
    import threading

    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    timer = threading.Timer(limit - 15, _dump_asyncio_tasks) if limit > 30 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
