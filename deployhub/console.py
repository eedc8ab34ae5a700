"""What the CLI prints: plain lines to pipes, a live progress line on a terminal (rich), or
JSON for scripts. Log lines keep the build's own colours on a terminal."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

REFRESH_PER_SECOND = 4
SUBJECT_WIDTH = 50  # characters of a commit's subject shown beside its short SHA


class Output:
    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stdout.isatty() and not as_json
        self.console = Console(highlight=False, soft_wrap=True) if self.tty else None
        self.live: Live | None = None
        self.phase = ""
        self.commit = ""  # the commit being built, once the server knows it
        self.started = time.monotonic()

    # -- a deployment being followed ------------------------------------------------------

    def start_progress(self, dep: dict[str, Any]) -> None:
        """On a terminal: a line under the streaming log with the phase and elapsed time."""
        self.phase = dep["status"]
        self.started = time.monotonic()
        if self.console is not None:
            self.live = Live(_Progress(self), console=self.console, transient=True,
                             refresh_per_second=REFRESH_PER_SECOND)
            self.live.start()

    def stop_progress(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def event(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps({"type": "log", **event}), flush=True)
        elif self.console is not None:
            text = Text.from_ansi(event["text"])
            if event["stream"] == "system":
                text.stylize("dim")
            self.console.print(text)
        else:
            out = sys.stderr if event["stream"] == "stderr" else sys.stdout
            print(event["text"], file=out, flush=True)

    def status(self, dep: dict[str, Any]) -> None:
        self.phase = dep["status"]
        if self.as_json:
            print(json.dumps({"type": "status", "deployment": dep}), flush=True)
            return
        # The commit's subject is known once cloned: say which commit this is, once.
        if dep.get("commit_message") and not self.commit:
            self.commit = commit_label(dep)
            self.note(f"commit {self.commit}", style="dim")
        if self.console is None:
            print(f"[deployhub] {dep['status']}", file=sys.stderr, flush=True)

    def note(self, text: str, style: str = "yellow") -> None:
        """Something about the deployment or the connection, never mixed into stdout."""
        if self.console is not None:
            self.console.print(Text(f"[deployhub] {text}", style=style))
        else:
            print(f"[deployhub] {text}", file=sys.stderr, flush=True)

    # -- results ----------------------------------------------------------------------------

    def result(self, data: Any, text: str) -> None:
        print(json.dumps(data) if self.as_json else text, flush=True)

    def table(self, data: Any, columns: list[str], rows: list[list[str]]) -> None:
        if self.as_json:
            print(json.dumps(data), flush=True)
        elif self.console is not None:
            table = Table(*columns, box=None, header_style="bold")
            for row in rows:
                table.add_row(*row)
            self.console.print(table)
        else:
            print("\t".join(columns))
            for row in rows:
                print("\t".join(row))


class _Progress:
    """Re-rendered by rich on every refresh, so the elapsed time moves."""

    def __init__(self, output: Output) -> None:
        self.output = output

    def __rich__(self) -> Text:
        elapsed = int(time.monotonic() - self.output.started)
        return Text.assemble(("● ", "cyan"), (self.output.phase, "bold"),
                             f"  {elapsed // 60}:{elapsed % 60:02d}",
                             (f"  {self.output.commit}" if self.output.commit else "", "dim"))


def error(message: str) -> None:
    print(f"deployhub: {message}", file=sys.stderr, flush=True)


def commit_label(dep: dict[str, Any]) -> str:
    """`abc1234 First line of its message`; "-" before the server knows the commit."""
    sha, subject = dep.get("commit") or "", dep.get("commit_message") or ""
    if not sha:
        return "-"
    if len(subject) > SUBJECT_WIDTH:
        subject = subject[:SUBJECT_WIDTH - 1] + "…"
    return f"{sha[:7]} {subject}".rstrip()


def age(moment: float | None) -> str:
    if not moment:
        return "-"
    seconds = max(0, int(time.time() - moment))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
