"""The egress proxy's listening socket inside a sandbox's network namespace, made from outside.

bubblewrap starts the command in a new network namespace holding only its own loopback. A
short helper process (this interpreter, isolated) joins that namespace (by way of the user
namespace that owns it, which the worker's user owns in turn, so no privilege is needed),
binds 127.0.0.1:<port> there, and hands the listening socket back over a socket pair
(SCM_RIGHTS). The worker's proxy then accepts the build's connections on it directly: no
process inside the sandbox relays them, and nothing of the host's network is in the
namespace. bwrap waits (`--block-fd`) until the socket is listening, so the command's first
connection finds it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys

LISTEN_TIMEOUT = 30.0
# A port in the namespace: picked before the command starts (its environment names it), from a
# range dev servers rarely use, and free for certain: the namespace is new and empty.
PORTS = range(41000, 48000)

HELPER = r"""
import ctypes, fcntl, os, socket, sys
pid, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
owner = fcntl.ioctl(net, 0xB701)  # NS_GET_USERNS: the user namespace that owns it
for fd, kind, name in ((owner, 0x10000000, "user"), (net, 0x40000000, "network")):
    if libc.setns(fd, kind) != 0:
        errno = ctypes.get_errno()
        sys.exit(f"cannot join the sandbox's {name} namespace: {os.strerror(errno)}")
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen(256)
socket.send_fds(socket.socket(fileno=out), [b"l"], [listener.fileno()])
"""


def pick_port() -> int:
    return random.choice(PORTS)


def problem(binary: str) -> str | None:
    """Why the egress proxy cannot listen in a sandbox's network namespace here, or None: asked
    at start (`python -m worker --check-sandbox`), so builds are refused with the reason
    rather than each failing. Runs its own event loop: call it where none runs."""
    return asyncio.run(_problem(binary))


async def _problem(binary: str) -> str | None:
    blocked = BlockedStart()
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "--unshare-all", "--unshare-user", "--die-with-parent", "--ro-bind", "/", "/",
            "--info-fd", str(blocked.info_fd), "--block-fd", str(blocked.block_fd), "true",
            pass_fds=blocked.pass_fds, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            listener = await blocked.listen(pick_port())
        except (OSError, ValueError, KeyError) as exc:
            return (f"Builds run in their own network namespace, but the egress proxy cannot "
                    f"listen in one here: {exc}")
        finally:
            blocked.release()
            await proc.wait()
        if listener is None:
            return f"{binary} ended before it ran a command in a new network namespace"
        listener.close()
        return None
    finally:
        blocked.close()


class BlockedStart:
    """The pipes of bwrap's `--info-fd` (it writes the sandbox's pid) and `--block-fd` (it
    waits for a byte before it runs the command). `pass_fds` go to bwrap; `listen()` runs
    once it has started."""

    def __init__(self) -> None:
        self._info_r, self.info_fd = os.pipe()
        self.block_fd, self._block_w = os.pipe()
        self._open = [self._info_r, self.info_fd, self.block_fd, self._block_w]

    @property
    def pass_fds(self) -> tuple[int, int]:
        return self.info_fd, self.block_fd

    async def listen(self, port: int) -> socket.socket | None:
        """The listening socket on 127.0.0.1:`port` in the started sandbox's namespace, or None
        when the sandbox ended as it started (bwrap's own error tells why). Raises OSError
        when the socket cannot be made. `release()` then lets the command run."""
        self._close(self.info_fd, self.block_fd)  # bwrap has its copies: EOF when it ends
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._info_r, "rb", buffering=0))
        self._open.remove(self._info_r)
        try:
            try:
                info = await asyncio.wait_for(reader.readuntil(b"}"), LISTEN_TIMEOUT)
            except asyncio.IncompleteReadError:
                return None
            pid = int(json.loads(info)["child-pid"])
        finally:
            transport.close()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            helper = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", HELPER, str(pid), str(port), str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            try:
                _, err = await asyncio.wait_for(helper.communicate(), LISTEN_TIMEOUT)
            except TimeoutError:
                helper.kill()
                await helper.wait()
                raise OSError(f"the helper did not answer within {LISTEN_TIMEOUT:.0f} s") from None
            if helper.returncode != 0:
                if not os.path.exists(f"/proc/{pid}/ns/net"):
                    return None  # the sandbox failed as it started: bwrap's error tells why
                lines = err.decode(errors="replace").strip().splitlines()
                raise OSError(lines[-1] if lines else f"the helper exited with {helper.returncode}")
            ours.setblocking(False)
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise OSError("the helper sent no socket")
        listener = socket.socket(fileno=fds[0])
        listener.setblocking(False)
        return listener

    def release(self) -> None:
        """Let the command run (bwrap reads one byte)."""
        if self._block_w in self._open:
            try:
                os.write(self._block_w, b"g")
            except BrokenPipeError:  # bwrap has ended
                pass
            self._close(self._block_w)

    def close(self) -> None:
        self._close(*self._open)

    def _close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self._open:
                self._open.remove(fd)
                os.close(fd)
