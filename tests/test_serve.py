"""`deployhub serve` on its embedded defaults, exactly as a user starts it, with the real Vite app."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.infra import VITE_REACT_APP, GitServer, unique_name
from tests.support.served import Served


@pytest.mark.timeout(300)
def test_vite_app_end_to_end_with_follow_and_restart(served: Served, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("vite"), files_dir=VITE_REACT_APP)
    started = time.monotonic()
    cli = subprocess.run(
        ["deployhub", "deploy", url, "--follow", "--project", "vite-app", "--server", served.url,
         "--token", served.token],
        capture_output=True, text=True, timeout=240,
    )
    elapsed = time.monotonic() - started
    assert cli.returncode == 0, cli.stderr[-3000:]
    out = cli.stdout
    # Real npm and vite output, in order, before the site URL.
    assert out.index("$ npm ci") < out.index("added ") < out.index("vite v7") < out.index("built in")
    assert out.rstrip().splitlines()[-1].startswith("Ready: http://vite-app.localhost:")
    print(f"vite deploy via CLI: {elapsed:.1f}s")

    status, headers, body = served.get("/", host="vite-app")
    assert status == 200 and b'<div id="root">' in body
    assert headers["Cache-Control"] == "no-cache"
    script = body.split(b'src="')[1].split(b'"')[0].decode()
    status, headers, js = served.get(script, host="vite-app")
    assert status == 200 and "javascript" in headers["Content-Type"]
    assert "immutable" in headers["Cache-Control"]
    assert b"Hello from Vite React" in js
    assert served.get("/some/client/route", host="vite-app")[2] == body
    assert served.get("/", host="no-such-app")[0] == 404

    served.stop()
    assert _redis_children(served.data_dir) == []  # the embedded Redis stopped with the server
    served.start(expect_login=False)  # same data directory: projects, logs and sites survive
    status, _, listing = served.get("/api/projects")
    assert status == 200 and b"vite-app" in listing
    assert served.get("/", host="vite-app")[2] == body


def _redis_children(data_dir: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(data_dir / "redis") in text:
            found.append(text)
    return found


def test_cli_exits_non_zero_when_the_deployment_fails(served: Served, git_server: GitServer) -> None:
    url = git_server.add_repo(unique_name("empty"), files={"README.md": "x\n"})
    cli = subprocess.run(
        ["deployhub", "deploy", url, "--follow", "--server", served.url, "--token", served.token],
        capture_output=True, text=True, timeout=60,
    )
    assert cli.returncode == 1
    assert "No package.json" in cli.stderr


def test_cli_rejects_bad_url_with_the_servers_message(served: Served) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "deployhub.cli", "deploy", "file:///etc", "--server", served.url,
         "--token", served.token],
        capture_output=True, text=True, timeout=30,
    )
    assert cli.returncode == 1 and "http:// or https://" in cli.stderr


def test_token_cli_against_a_running_server(served: Served) -> None:
    def token(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["deployhub", "token", *args, "--data-dir", str(served.data_dir)],
                              capture_output=True, text=True, timeout=30)

    created = token("create", "laptop")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    token_id = created.stdout.split()[1]
    served.token = secret
    assert served.get("/api/projects")[0] == 200
    assert "laptop" in token("list").stdout and secret not in token("list").stdout
    assert token("revoke", token_id).returncode == 0
    assert served.get("/api/projects")[0] == 401


def test_serve_listens_with_room_for_a_reconnect_storm(served: Served) -> None:
    """After a restart every open page reconnects at once: the accept queue must hold them."""
    from deployhub.cli import LISTEN_BACKLOG

    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    listening = subprocess.run(
        ["ss", "-ltnH", f"sport = :{served.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listening[0] == "LISTEN", listening
    assert int(listening[2]) == min(LISTEN_BACKLOG, somaxconn) > 128  # Send-Q: the backlog
