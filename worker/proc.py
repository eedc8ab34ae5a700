"""Run one command, stream every stdout/stderr line as it appears, kill the whole tree on exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployhub.children import close_child

Emit = Callable[[str, str], None]  # (stream, text)

READ_SIZE = 64 * 1024


@dataclass
class Result:
    code: int
    tail: list[str]  # the last lines, both streams, for error messages
    stopped: bool = False  # the watchdog ended it (a limit was hit)


class CommandTimeout(Exception):
    pass


async def run(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    emit: Emit,
    timeout: float,
    max_line_bytes: int = 4096,
    tail_lines: int = 15,
    pass_fds: Sequence[int] = (),
    watchdog: Callable[[], Awaitable[None]] | None = None,
    started: Callable[[], Awaitable[None]] | None = None,
) -> Result:
    """Run `argv` (never a shell string) and pass each line to `emit` as soon as it is read.

    The child leads its own process group so a timeout or cancellation kills every process
    it started, not just the first. When `watchdog()` returns before the command ends (a
    limit it watches was hit), the command is killed and the result says `stopped`.
    `started()` runs once the process exists (within the timeout); if it raises, the command
    is killed and the error passes on.
    """
    tail: deque[str] = deque(maxlen=tail_lines)

    def on_line(stream: str, text: str) -> None:
        tail.append(text)
        emit(stream, text)

    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
    )
    assert proc.stdout is not None and proc.stderr is not None
    readers = asyncio.gather(
        read_lines(proc.stdout, "stdout", on_line, max_line_bytes),
        read_lines(proc.stderr, "stderr", on_line, max_line_bytes),
    )

    async def finish() -> int:
        await readers
        return await proc.wait()

    waiter = asyncio.ensure_future(finish())
    watch = asyncio.ensure_future(watchdog()) if watchdog is not None else None
    try:
        async with asyncio.timeout(timeout):
            if started is not None:
                await started()
            if watch is not None:
                await asyncio.wait({waiter, watch}, return_when=asyncio.FIRST_COMPLETED)
                # A watchdog that failed stops nothing: the command goes on, still timed.
                if not waiter.done() and watch.exception() is None:
                    waiter.cancel()
                    kill_tree(proc.pid)
                    await _reap(proc, readers)
                    return Result(code=-signal.SIGKILL, tail=list(tail), stopped=True)
            code = await waiter
    except TimeoutError:
        waiter.cancel()
        kill_tree(proc.pid)
        await _reap(proc, readers)
        raise CommandTimeout(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    except BaseException:
        waiter.cancel()
        kill_tree(proc.pid)
        await _reap(proc, readers)
        raise
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
    # A build can leave daemons behind in its group (a dev server, a watcher): stop them.
    kill_tree(proc.pid)
    return Result(code=code, tail=list(tail))


async def _reap(proc: asyncio.subprocess.Process, readers: asyncio.Future[Any]) -> None:
    readers.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await readers
    await close_child(proc)  # a process that left the group may still hold the pipes


def kill_tree(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def read_lines(
    stream: asyncio.StreamReader, name: str, emit: Emit, max_line_bytes: int
) -> None:
    """Split a byte stream into lines on \\n or \\r; an endless line is cut, never buffered whole."""
    buffer = b""
    cut = False  # inside an over-long line whose head was already emitted
    while True:
        chunk = await stream.read(READ_SIZE)
        if not chunk:
            break
        buffer += chunk
        held = b""
        if buffer.endswith(b"\r"):  # its \n may be in the next chunk
            buffer, held = buffer[:-1], b"\r"
        *lines, buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        buffer += held
        for line in lines:
            if cut:
                cut = False
                continue
            emit(name, line.decode(errors="replace"))
        if len(buffer) > max_line_bytes:
            if not cut:
                emit(name, buffer[:max_line_bytes].decode(errors="ignore") + " [line truncated]")
                cut = True
            buffer = b""
    buffer = buffer.rstrip(b"\r")
    if buffer and not cut:
        emit(name, buffer.decode(errors="replace"))
