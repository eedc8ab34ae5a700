"""One npm cache and one Node cache for a whole test session: each test's service has its own
data directory, and downloading the same packages (or a 50 MB Node) for every test is slow."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def session_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build-caches")


@pytest.fixture
def shared_caches(tmp_path: Path, session_caches: Path) -> None:
    """Point this test's <data>/cache/npm and /node at the session's (the `service` fixture
    uses tmp_path / "data")."""
    cache = tmp_path / "data" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("npm", "node"):
        (session_caches / name).mkdir(exist_ok=True)
        if not (cache / name).exists():
            (cache / name).symlink_to(session_caches / name)
