"""The client commands as a person runs them: through pipes, and in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deployhub.embedded_redis import free_port
from tests.support.infra import TINY_APP, GitServer, unique_name
from tests.support.service import Service


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployhub", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def remote(service: Service) -> list[str]:
    return ["--server", service.url, "--token", service.token]


async def test_deploy_ls_logs_rollback_cancel_through_pipes(service: Service, git_server: GitServer) -> None:
    url, project = git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP), unique_name("cli")
    code, out, err = await cli("deploy", url, "--project", project, "--follow", *remote(service))
    assert code == 0, err
    assert "Hello from tiny" not in out and out.splitlines()[-1].startswith("Ready: http://")
    assert "[deployhub] building" in err  # progress goes to stderr on a pipe, the log to stdout
    code, out, _ = await cli("deploy", "--project", project, "--json", *remote(service))  # redeploy
    second = json.loads(out)
    assert code == 0 and second["project"] == project and second["repo_url"] == url
    assert second["trigger"] == "cli"  # the page's list says "via CLI"
    await service.wait_final(second["id"])
    code, out, _ = await cli("ls", *remote(service))
    assert code == 0 and out.splitlines()[0].split("\t") == ["PROJECT", "PRODUCTION", "CREATED", "URL"]
    assert any(line.split("\t")[:2] == [project, second["id"]] for line in out.splitlines())
    code, out, _ = await cli("ls", project, "--json", *remote(service))
    first_id = json.loads(out)["deployments"][1]["id"]
    code, out, _ = await cli("logs", first_id, "--json", *remote(service))
    events = [json.loads(line) for line in out.splitlines()]
    assert events == [{"type": "log", **e} for e in await service.logs(first_id)]
    code, out, _ = await cli("rollback", project, "--json", *remote(service))  # to the one before
    assert code == 0 and json.loads(out)["production"] == first_id
    code, _, err = await cli("cancel", first_id, *remote(service))
    assert code == 1 and "already ended" in err and "Traceback" not in err


async def test_deploy_a_commit_and_see_it_in_the_output_and_ls(
    service: Service, git_server: GitServer
) -> None:
    name, project = unique_name("tiny"), unique_name("cli")
    url = git_server.add_repo(name, files_dir=TINY_APP, message="First version")
    first = git_server.head_sha(name)
    git_server.commit_files(name, {"later.txt": "newer"}, message="Second version")
    code, out, err = await cli("deploy", url, "--project", project, "--commit", first, "--follow",
                               *remote(service))
    assert code == 0, err
    assert out.splitlines()[0].endswith(f"of {project} at {first[:7]} queued")
    assert f"[deployhub] commit {first[:7]} First version" in err.splitlines()
    code, out, _ = await cli("ls", project, *remote(service))
    header, row = out.splitlines()
    assert header.split("\t")[3] == "COMMIT" and row.split("\t")[3] == f"{first[:7]} First version"
    code, _, err = await cli("deploy", url, "--commit", first[:7], *remote(service))
    assert code == 2 and "give all 40 hex digits" in err and "Traceback" not in err


async def test_project_set_and_show_the_build_settings(service: Service) -> None:
    project = unique_name("cli")
    code, out, err = await cli("project", "set", project, "root_directory=./web/",
                               "build_command=npm run build -- --mode=prod", *remote(service))
    assert code == 0, err
    assert "root_directory\tweb" in out.splitlines()
    assert "build_command\tnpm run build -- --mode=prod" in out.splitlines()
    assert "node_version\t(detected)" in out.splitlines()
    code, out, _ = await cli("project", "set", project, "root_directory=", "--json", *remote(service))
    answer = json.loads(out)
    assert code == 0 and answer["settings"]["root_directory"] is None
    assert answer["settings"]["build_command"] == "npm run build -- --mode=prod"
    code, out, _ = await cli("project", "show", project, "--json", *remote(service))
    assert code == 0 and json.loads(out) == answer
    code, _, err = await cli("project", "set", project, "root_directory", *remote(service))
    assert code == 2 and "is not KEY=VALUE" in err  # refused before any request
    code, _, err = await cli("project", "set", project, "colour=red", *remote(service))
    assert code == 1 and "unknown setting 'colour'" in err and "Traceback" not in err
    code, _, err = await cli("project", "show", unique_name("none"), *remote(service))
    assert code == 1 and "no project" in err


async def test_unreachable_server_and_bad_token_are_clear_exit_codes(service: Service) -> None:
    code, _, err = await cli("ls", "--server", f"http://127.0.0.1:{free_port()}", "--token", "dh_x")
    assert code == 3 and err.startswith("deployhub: cannot reach") and "Traceback" not in err
    code, _, err = await cli("ls", "--server", service.url, "--token", "dh_" + "x" * 40)
    assert code == 4 and "refused the token" in err
    code, _, err = await cli("deploy", "--server", service.url, "--token", service.token)
    assert code == 1 and "give the Git URL" in err


async def test_login_saves_the_token_privately(service: Service, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), "DEPLOYHUB_TOKEN": ""}
    code, out, err = await cli("login", *remote(service), env=env)
    assert code == 0, err
    saved = tmp_path / "deployhub" / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["tokens"][service.url] == service.token
    code, out, err = await cli("ls", "--json", env=env)  # server and token from the file
    assert code == 0 and "projects" in json.loads(out), err
    code, _, err = await cli("login", "--server", service.url, "--token", "dh_" + "y" * 40,
                             env=env)
    assert code == 4 and json.loads(saved.read_text())["tokens"][service.url] == service.token


def run_in_pty(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as stdout and stderr; its exit code and output."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "100"})
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout), b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(180)
async def test_a_terminal_gets_a_live_progress_line_and_coloured_log(
    service: Service, git_server: GitServer
) -> None:
    files: dict[str, Any] = {"tiny.json": '{"lines": 40, "delayMs": 50}'}
    name = unique_name("tiny")
    url = git_server.add_repo(name, files_dir=TINY_APP, files=files, message="Slow lines")
    argv = [sys.executable, "-m", "deployhub", "deploy", url, "--follow", *remote(service)]
    code, screen = await asyncio.to_thread(run_in_pty, argv)
    assert code == 0, screen[-2000:]
    assert "\x1b[?25l" in screen  # rich hides the cursor while it redraws the progress line
    assert "building" in screen and "0:0" in screen  # the phase and the elapsed time
    assert "[deployhub] building" not in screen  # ...instead of the plain status lines
    assert "Ready: http://" in screen
    assert f"commit {git_server.head_sha(name)[:7]} Slow lines" in screen


async def test_a_terminal_gets_the_settings_as_a_table(service: Service) -> None:
    project = unique_name("cli")
    code, _, err = await cli("project", "set", project, "node_version=20", *remote(service))
    assert code == 0, err
    argv = [sys.executable, "-m", "deployhub", "project", "show", project, *remote(service)]
    code, screen = await asyncio.to_thread(run_in_pty, argv)
    assert code == 0, screen
    assert "\x1b[1m" in screen and "SETTING" in screen  # rich's bold header
    rows = [line.split() for line in screen.splitlines() if "\t" not in line]  # aligned, not tabbed
    assert ["node_version", "20"] in rows and ["webhook_secret", "(none)"] in rows
