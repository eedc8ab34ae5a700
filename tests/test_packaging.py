"""A non-editable install must carry the page and the worker: check the built wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.timeout(180)
def test_wheel_ships_web_assets_worker_and_entry_point(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=170,
    )
    wheel = next(tmp_path.glob("deployhub-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("deployhub/web/index.html", "deployhub/web/app.js", "deployhub/web/style.css",
                     "deployhub/py.typed", "worker/__main__.py", "deployhub/cli.py"):
        assert expected in names, expected
    # Every module of the source tree, subpackages included (a package left out of setup.cfg
    # installs fine and fails at the first import).
    sources = {p.relative_to(ROOT).as_posix() for pkg in ("deployhub", "worker")
               for p in (ROOT / pkg).rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "deployhub = deployhub.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
