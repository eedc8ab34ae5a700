"""Real backing services for tests: Redis, S3 (SeaweedFS) and a Git smart-HTTP server.

Loaded as a pytest plugin (``pytest_plugins = ["tests.support.infra"]``). Every
server listens on 127.0.0.1 only, and is started as a plain subprocess or thread
from sync fixtures, so the fixtures work for sync and async tests alike.

Processes are stopped by their fixtures; tests/support/procs.py (shared with the
benchmarks) says what happens to any left running.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote

import pytest

from deployhub.embedded_redis import free_port
from tests.support.procs import HOST, Managed
from tests.support.procs import RedisServer as RedisServer  # re-exported: tests take it with the fixtures

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"
TINY_APP = FIXTURES_DIR / "tiny"
VITE_REACT_APP = FIXTURES_DIR / "vite-react"


# --------------------------------------------------------------------------- ports


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports; all are held open while choosing so none repeats."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def unique_name(prefix: str = "t") -> str:
    """A short lowercase name that is unique across tests (valid for buckets and repos)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------------ S3


class S3Server(Managed):
    """SeaweedFS ``weed mini`` with one S3 identity that may do everything.

    Requests must be signed with ``access_key``/``secret_key``; anonymous and
    wrongly signed requests are refused (403).
    """

    name = "s3"
    start_timeout = 60.0
    stop_timeout = 15.0
    poll_interval = 0.25  # each probe builds a botocore client
    access_key = "deployhub-test"
    secret_key = "deployhub-test-secret"
    region = "us-east-1"

    def __init__(self, base_dir: Path | None = None, *, binary: str | None = None) -> None:
        super().__init__(base_dir)
        self.binary = binary or shutil.which("weed") or "weed"
        ports = free_ports(8)
        self.master_port, self.master_grpc_port = ports[0:2]
        self.volume_port, self.volume_grpc_port = ports[2:4]
        self.filer_port, self.filer_grpc_port = ports[4:6]
        self.port, self.s3_grpc_port = ports[6:8]
        self.admin_port, self.admin_grpc_port = self._admin_ports(set(ports))
        self.data_dir = self.base_dir / "data"
        self.tmp_dir = self.base_dir / "tmp"
        for directory in (self.data_dir, self.tmp_dir, self.base_dir / "conf"):
            directory.mkdir(exist_ok=True)
        self.config_path = self.base_dir / "s3.json"
        identities = {
            "identities": [
                {
                    "name": "deployhub-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identities))

    @staticmethod
    def _admin_ports(taken: set[int]) -> tuple[int, int]:
        # weed mini's built-in maintenance worker dials the admin gRPC server at
        # admin.port + 10000 whatever -admin.port.grpc says, so keep that pair together.
        for _ in range(200):
            port = free_port()
            grpc = port + 10000
            if grpc > 65535 or {port, grpc} & taken:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((HOST, grpc))
                except OSError:
                    continue
            return port, grpc
        raise RuntimeError("no free port pair for the SeaweedFS admin server")

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "-logtostderr",
            # Only our (empty) config dir, never a stray security.toml from ~ or /etc.
            f"-config_dir={self.base_dir / 'conf'}",
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            # On by default, and it would post to a public host.
            "-master.telemetry=false",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-filer.localSocket={self.tmp_dir / 'filer.sock'}",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            f"-s3.localSocket={self.tmp_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config_path}",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={self.admin_port}",
            f"-admin.port.grpc={self.admin_grpc_port}",
        ]

    def _env(self) -> dict[str, str]:
        # weed puts its gRPC unix sockets in $TMPDIR; keep them in our directory.
        return {**os.environ, "TMPDIR": str(self.tmp_dir)}

    def _ready(self) -> bool:
        # The S3 port answers before the volume server has joined the master, so
        # only a real signed write proves the store is usable.
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                pass
        except OSError:
            return False
        import botocore.exceptions

        client = self.client(retries=0)
        try:
            bucket = unique_name("ready")
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=bucket, Key="probe")
            client.delete_bucket(Bucket=bucket)
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False
        finally:
            client.close()

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``create_client("s3", **kwargs)`` (botocore/aiobotocore)."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def client_config(self, retries: int = 2) -> Any:
        """A botocore Config with path-style addressing (no <bucket>.127.0.0.1 hosts)."""
        from botocore.config import Config

        return Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": retries + 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )

    def client(self, retries: int = 2) -> Any:
        """A sync botocore S3 client; call ``.close()`` when done."""
        import botocore.session

        session = botocore.session.get_session()
        return session.create_client(
            "s3", config=self.client_config(retries), **self.client_kwargs()
        )

    def aws_env(self) -> dict[str, str]:
        """Environment for code that takes credentials from the AWS default chain.

        AWS_EC2_METADATA_DISABLED stops botocore from probing the instance metadata
        address (169.254.169.254) when it looks for credentials.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a uniquely named bucket and return its name."""
        name = unique_name(prefix)
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (SeaweedFS allows non-empty deletes)."""
        client = self.client()
        try:
            client.delete_bucket(Bucket=name)
        finally:
            client.close()


# ----------------------------------------------------------------------------- Git

_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "DeployHub Tests",
    "GIT_AUTHOR_EMAIL": "tests@deployhub.invalid",
    "GIT_COMMITTER_NAME": "DeployHub Tests",
    "GIT_COMMITTER_EMAIL": "tests@deployhub.invalid",
    # A fixed date makes commit ids depend on content only.
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+00:00",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+00:00",
}

_REPO_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


def _git_env(home: Path) -> dict[str, str]:
    # Ignore the machine's git config (signing, hooks, default branch, helpers).
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "LANG": "C",
        **_GIT_IDENTITY,
    }


def _write_files(root: Path, files: Mapping[str, str | bytes | None]) -> None:
    for rel, content in files.items():
        target = root / rel
        if not target.resolve().is_relative_to(root.resolve()):
            raise ValueError(f"file path escapes the repository: {rel!r}")
        if content is None:
            target.unlink(missing_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


class _GitHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many parallel clones connect at once; the default backlog of 5 drops some.
    request_queue_size = 64

    def __init__(self, owner: GitServer) -> None:
        self.owner = owner
        super().__init__((HOST, 0), _GitHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response (a killed clone) is expected in tests.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _GitHandler(BaseHTTPRequestHandler):
    server: _GitHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # Requests are kept in GitServer.requests instead of spamming stderr.

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        owner = self.server.owner
        path, _, query = self.path.partition("?")
        user = self._basic_user()
        owner._record(self.command, self.path, user)
        if path.startswith("/stall/"):
            # Accept, then never answer (until the server stops): for clone timeouts.
            owner._stopping.wait(GitServer.stall_seconds)
            self.close_connection = True
            return
        if path.startswith("/private/") and user is None:
            self._send(
                401,
                b"authentication required\n",
                {"WWW-Authenticate": 'Basic realm="deployhub-test"'},
            )
            return
        body = self._read_body()
        env = {
            **_git_env(owner.root),
            "GIT_PROJECT_ROOT": str(owner.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        if user is not None:
            env["REMOTE_USER"] = user
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if owner.protocol_v2 and self.headers.get("Git-Protocol"):
            # Without this, git silently falls back from protocol v2 to v0.
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        status, headers, payload = owner._run_backend(env, body)
        self._send(status, payload, headers)

    def _basic_user(self) -> str | None:
        """The user name if the request carries the private repos' credentials."""
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return None
        expected = self.server.owner.private_credentials
        return user if (user, password) == expected else None

    def _read_body(self) -> bytes:
        # git sends large POST bodies chunked, which http.server does not decode.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        if "content-type" not in {key.lower() for key in headers}:
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class GitServer:
    """Bare repositories served over smart HTTP by ``git http-backend``, on 127.0.0.1.

    Paths:
      /<name>.git            public, anyone may clone
      /private/<name>.git    401 + ``WWW-Authenticate: Basic`` unless the request
                             carries ``private_credentials``
      /stall/<anything>      accepts the connection and never answers (clone timeouts)
    """

    stall_seconds = 60.0
    backend_timeout = 60.0
    # False: answer in protocol v0 only, which refuses a fetch of an unadvertised commit
    # (like a server without uploadpack.allowReachableSHA1InWant).
    protocol_v2 = True

    def __init__(
        self,
        root: Path | None = None,
        *,
        private_credentials: tuple[str, str] = ("deployhub", "s3cret-token"),
    ) -> None:
        self._own_dir = root is None
        self.root = Path(tempfile.mkdtemp(prefix="dh-git-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.private_credentials = private_credentials
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._backends: set[subprocess.Popen[bytes]] = set()
        self._stopping = threading.Event()
        self._httpd: _GitHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if self._httpd is not None:
            return
        self._stopping.clear()
        self._httpd = _GitHTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="git-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            backends = list(self._backends)
        for proc in backends:
            with contextlib.suppress(OSError):
                proc.kill()
        self._httpd = self._thread = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("GitServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # Repositories ----------------------------------------------------------------

    def url_for(self, name: str, *, private: bool = False) -> str:
        """Clone URL for a repo; a private URL answers 401 even if no such repo exists."""
        return f"{self.base_url}/{'private/' if private else ''}{self._clean(name)}.git"

    def url_with_credentials(self, name: str) -> str:
        """Private clone URL with the accepted user:password embedded."""
        user, password = self.private_credentials
        return f"http://{user}:{password}@{HOST}:{self.port}/private/{self._clean(name)}.git"

    def stall_url(self, name: str = "stalled") -> str:
        """A URL whose requests hang until the server stops (or ``stall_seconds``)."""
        return f"{self.base_url}/stall/{self._clean(name)}.git"

    def add_repo(
        self,
        name: str,
        files_dir: Path | None = None,
        files: Mapping[str, str | bytes] | None = None,
        branch: str = "main",
        *,
        private: bool = False,
        message: str | None = None,
        gitlinks: Mapping[str, str] | None = None,
    ) -> str:
        """Create a bare repo with one commit on ``branch`` and return its clone URL.

        ``files_dir`` is copied first (without .git and node_modules; its .gitignore
        applies), then ``files`` (relative path -> content) are written over it.
        ``gitlinks`` (path -> commit id) are submodule entries, as `git submodule add`
        records them (the .gitmodules that names their URLs is one of ``files``).
        """
        if files_dir is None and files is None:
            raise ValueError("add_repo needs files_dir or files")
        name = self._clean(name)
        bare = self._bare_path(name, private)
        if bare.exists():
            raise ValueError(f"repo {name!r} already exists; use unique_name() for test repos")
        with tempfile.TemporaryDirectory(prefix="dh-gitwork-") as tmp:
            work = Path(tmp) / "work"
            if files_dir is not None:
                shutil.copytree(
                    files_dir, work, ignore=shutil.ignore_patterns(".git", "node_modules")
                )
            else:
                work.mkdir()
            if files:
                _write_files(work, files)
            self._git("init", "-q", "-b", branch, cwd=work)
            self._git("add", "-A", cwd=work)
            for path, sha in (gitlinks or {}).items():
                self._git("update-index", "--add", "--cacheinfo", f"160000,{sha},{path}", cwd=work)
            self._git("commit", "-q", "--allow-empty", "-m", message or f"Add {name}", cwd=work)
            bare.parent.mkdir(parents=True, exist_ok=True)
            self._git("init", "-q", "--bare", "-b", branch, str(bare), cwd=work)
            self._git("push", "-q", str(bare), f"{branch}:refs/heads/{branch}", cwd=work)
        return self.url_for(name, private=private)

    def commit_files(
        self,
        name: str,
        files: Mapping[str, str | bytes | None],
        branch: str = "main",
        *,
        private: bool = False,
        message: str = "Update files",
    ) -> str:
        """Add a commit to ``branch`` (created from HEAD if new); ``None`` deletes a file.

        Returns the new commit id.
        """
        bare = self._bare_path(self._clean(name), private)
        if not bare.exists():
            raise ValueError(f"no repo {name!r}")
        with tempfile.TemporaryDirectory(prefix="dh-gitwork-") as tmp:
            work = Path(tmp) / "work"
            self._git("clone", "-q", str(bare), str(work), cwd=Path(tmp))
            has_branch = subprocess.run(
                ["git", "rev-parse", "--verify", "-q", f"refs/remotes/origin/{branch}"],
                cwd=work,
                env=_git_env(self.root),
                capture_output=True,
                check=False,
            )
            start = [f"origin/{branch}"] if has_branch.returncode == 0 else []
            self._git("checkout", "-q", "-B", branch, *start, cwd=work)
            _write_files(work, files)
            self._git("add", "-A", cwd=work)
            self._git("commit", "-q", "--allow-empty", "-m", message, cwd=work)
            self._git("push", "-q", "origin", f"{branch}:refs/heads/{branch}", cwd=work)
            return self._git("rev-parse", "HEAD", cwd=work).strip()

    def head_sha(self, name: str, branch: str = "main", *, private: bool = False) -> str:
        """The commit id ``branch`` points at."""
        bare = self._bare_path(self._clean(name), private)
        return self._git("rev-parse", f"refs/heads/{branch}", cwd=bare).strip()

    def requests_for(self, name: str) -> list[tuple[str, str, str | None]]:
        """(method, path, authenticated user) of the requests that touched a repo."""
        needle = f"/{self._clean(name)}.git/"
        with self._lock:
            return [entry for entry in self.requests if needle in entry[1]]

    # Internals -----------------------------------------------------------------

    @staticmethod
    def _clean(name: str) -> str:
        name = name.removesuffix(".git")
        if not _REPO_NAME.fullmatch(name) or ".." in name.split("/"):
            raise ValueError(f"bad repo name {name!r}")
        return name

    def _bare_path(self, name: str, private: bool) -> Path:
        return self.root / ("private" if private else "") / f"{name}.git"

    def _git(self, *args: str, cwd: Path) -> str:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=_git_env(self.root),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"git {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    def _record(self, method: str, path: str, user: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, user))

    def _run_backend(self, env: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        proc = subprocess.Popen(
            ["git", "http-backend"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        with self._lock:
            self._backends.add(proc)
        try:
            out, err = proc.communicate(body, timeout=self.backend_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return 504, {}, b"git http-backend timed out\n"
        finally:
            with self._lock:
                self._backends.discard(proc)
        if self._stopping.is_set():
            return 503, {}, b"server stopping\n"
        return self._parse_cgi(out, err)

    @staticmethod
    def _parse_cgi(out: bytes, err: bytes) -> tuple[int, dict[str, str], bytes]:
        head, sep, payload = out.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = out.partition(b"\n\n")
        if not sep:
            return 500, {}, b"bad CGI response from git http-backend\n" + err
        status = 200
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers[key.strip()] = value.strip()
        return status, headers, payload


# -------------------------------------------------------------------------- fixtures


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh, started Redis for one test (stopped afterwards, even on failure)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], RedisServer]]:
    """Call it to get more started Redis servers; all are stopped after the test."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS for the session (it takes seconds to start); use s3_bucket per test."""
    # Its own short /tmp directory (unix socket paths are limited to 108 bytes),
    # removed afterwards rather than kept among pytest's retained tmp dirs.
    server = S3Server()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty, uniquely named bucket; deleted (with its contents) after the test."""
    name = s3_server.create_bucket()
    yield name
    with contextlib.suppress(Exception):
        s3_server.delete_bucket(name)


@pytest.fixture
async def s3_client(s3_server: S3Server) -> AsyncIterator[Any]:
    """An aiobotocore S3 client of that server, with DeployHub's client settings."""
    from aiobotocore.session import get_session

    from deployhub.storage import s3_config

    async with get_session().create_client(
        "s3", config=s3_config(), **s3_server.client_kwargs()
    ) as client:
        yield client


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    """One Git smart-HTTP server for the session; give each repo a unique_name()."""
    server = GitServer(tmp_path_factory.mktemp("git"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def tiny_repo(git_server: GitServer) -> str:
    """Clone URL of a fresh copy of tests/fixtures/tiny (branch main)."""
    return git_server.add_repo(unique_name("tiny"), files_dir=TINY_APP)
