"""Closing a child process's pipes, which asyncio leaves to end-of-file."""

from __future__ import annotations

import asyncio
import contextlib


async def close_child(proc: asyncio.subprocess.Process) -> None:
    """Kill `proc` if it still runs, close our ends of its pipes, and wait for it.

    End-of-file is not enough: processes it started may hold the pipes past its exit (a
    multiprocessing forkserver inherits fds 0-2; a build's daemon that left its process
    group), and a task canceled while reading never gets there. On Python 3.11 a `wait()`
    begun before the exit also waits for every pipe to close, and a pipe left open is found
    by the garbage collector later, often after its event loop has closed ('unclosed
    transport'). asyncio's Process has no public close; its transport's close() does this.
    """
    proc._transport.close()  # type: ignore[attr-defined]
    with contextlib.suppress(ProcessLookupError):
        await asyncio.shield(proc.wait())
