"""Summarise a py-spy "raw" profile (collapsed stacks) of the DeployHub server.

    python -m bench.profile_summary bench/results/profile-dh-n1000-r2000.txt [--top 25]

Percentages are of the samples in which the server was doing something: stacks whose leaf
is an idle thread-pool worker waiting for work are left out. "self" is time in the
function's own code (for C functions such as socket.send, the call itself), "inclusive"
adds everything it called. Functions are merged across line numbers.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py", "select (selectors.py", "BaseSelector")

# (label, substrings of a frame): walking from the leaf up, the first frame that matches
# one of these decides; a stack with none is "event loop / other".
CATEGORIES = [
    ("catch-up from the Redis stream (Hub._catch_up: XRANGE, RESP parsing, send)", ("Hub._catch_up",)),
    ("socket send syscalls (kernel TCP; on loopback this includes the receive path)",
     ("_SelectorSocketTransport.write",)),
    ("a lagging socket's frames from the shared recent ring (Recent.since)", ("Recent.", "frame_head")),
    ("aiohttp WebSocket framing / send_frame", ("WebSocketWriter", "WebSocketResponse.send")),
    ("Redis pub/sub read + parse", ("redis/", "Hub._listen")),
    ("JSON decode/encode", ("json/",)),
    ("per-socket queue and writer wake-up (Event.set/wait, call_soon)",
     ("asyncio/locks.py", "Watcher.offer", "Watcher.take", "Watcher.deliver", "_size (")),
    ("DeployHub live.py (dispatch, deliver, other)", ("deployhub/live.py",)),
    ("aiohttp web server (requests, heartbeats)", ("aiohttp/web_", "aiohttp/http", "aiohttp/_websocket/reader")),
]


def _func(frame: str) -> str:
    return _LINE.sub(")", frame.strip())


def _category(frames: list[str]) -> str:
    if any("Hub._catch_up" in f for f in frames):  # whatever it is doing, it is catching up
        return CATEGORIES[0][0]
    for frame in reversed(frames):
        for label, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return label
    return "event loop / other"


def summarise(path: Path, top: int = 25) -> str:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    total = idle = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n
            continue
        total += n
        funcs = [_func(f) for f in frames]
        self_t[funcs[-1]] += n
        for f in set(funcs):
            incl[f] += n
        cats[_category(frames)] += n
    if not total:
        return f"{path}: no busy samples"
    out = [f"{path.name}: {total} busy samples ({idle} idle thread-pool samples left out)", "",
           "where the time goes (first matching frame from the leaf up):"]
    out += [f"  {100 * n / total:5.1f}%  {label}" for label, n in cats.most_common()]
    out += ["", f"top {top} self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_t.most_common(top)]
    out += ["", f"top {top} inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top))
        print()


if __name__ == "__main__":
    main()
