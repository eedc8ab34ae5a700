"""`deployhub serve` as a user runs it: a subprocess on its embedded defaults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhub.embedded_redis import free_port
from deployhub.status import FINAL
from tests.support.procs import clean_env


class Served:
    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = args  # more `deployhub serve` flags
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.token = ""
        self.output: list[str] = []

    def start(self, expect_login: bool = True) -> None:
        self.proc = subprocess.Popen(
            ["deployhub", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
             "--allow-hosts", "127.0.0.1", *self.args],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group, for crash()
        )
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.output)
            if self.get("/api/projects")[0] in (200, 401):
                # Up; on a first start the login link comes with it.
                if not expect_login or self.token:
                    return
            time.sleep(0.1)
        raise AssertionError("deployhub serve did not start:\n" + "".join(self.output))

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)
            if "#token=" in line:
                self.token = line.split("#token=")[1].strip()

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def crash(self) -> None:
        """SIGKILL the server and everything it started (its Redis, its workers) at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def get_json(self, path: str) -> Any:
        status, _, raw = self.get(path)
        assert status == 200, (status, raw[:500])
        return json.loads(raw)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET; `host` is a site label, sent as `<label>.localhost:<port>`."""
        return self.request("GET", path, host_header=f"{host}.localhost:{self.port}" if host else None)

    def request(
        self, method: str, path: str, *, host_header: str | None = None,
        body: bytes | None = None, headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(
            self.url + path, data=body, method=method,
            headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
        )
        if host_header is not None:
            request.add_header("Host", host_header)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except OSError:
            return 0, {}, b""

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        status, _, raw = self.request("POST", path, body=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
        return status, json.loads(raw) if raw else None

    def wait_final(self, dep_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, _, raw = self.get(f"/api/deployments/{dep_id}")
            body = json.loads(raw)
            if body.get("status") in FINAL:
                return dict(body)
            time.sleep(0.1)
        raise AssertionError(f"{dep_id} did not finish")

    def logs_of_newest(self, project: str) -> list[dict[str, Any]]:
        _, _, raw = self.get(f"/api/projects/{project}/deployments")
        dep_id = json.loads(raw)["deployments"][0]["id"]
        _, _, raw = self.get(f"/api/deployments/{dep_id}/logs")
        return [json.loads(line) for line in raw.decode().splitlines() if line]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`deployhub serve` on a fresh data directory, stopped after the test."""
    server = Served(tmp_path / "data")
    server.start()
    yield server
    if server.proc and server.proc.poll() is None:
        server.stop()
