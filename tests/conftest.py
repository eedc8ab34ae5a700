pytest_plugins = ["tests.support.infra", "tests.support.service", "tests.support.served",
                  "tests.support.moto_ecs", "tests.support.sites"]


def _dump_asyncio_tasks(signum: int, frame: object) -> None:
    """`kill -USR1 <pytest pid>`: every task of the running loop and where it waits, on
    stderr; for a test that hangs (a thread dump shows only the loop's select)."""
    import asyncio
    import sys

    loop = asyncio._get_running_loop()
    for task in asyncio.all_tasks(loop) if loop is not None else ():
        task.print_stack(file=sys.stderr)


def pytest_configure(config: object) -> None:
    import signal

    signal.signal(signal.SIGUSR1, _dump_asyncio_tasks)
