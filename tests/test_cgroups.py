"""cgroup v2 limits, checked against a directory laid out as cgroupfs: this machine has only
cgroup v1. The fake kernel below enforces the two rules of Documentation/admin-guide/cgroup-v2.rst
that the code depends on: a non-root cgroup with processes cannot enable controllers for its
children (EBUSY, "no internal process"), and writing a pid to cgroup.procs moves it."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import pytest

from worker import cgroups

MiB = 1024 * 1024
BUILD_FILES = {"memory.max": "max", "memory.swap.max": "max", "memory.oom.group": "0",
               "pids.max": "max", "memory.events": "oom 0\noom_kill 0\n", "pids.events": "max 0\n",
               "cgroup.procs": "", "cgroup.kill": ""}


class FakeKernel:
    def __init__(self, root: Path, own: str, controllers: str = "cpu io memory pids") -> None:
        self.root = root
        self.own = root / own.strip("/")
        self.own.mkdir(parents=True)
        for name, text in {"cgroup.controllers": controllers, "cgroup.subtree_control": "",
                           "cgroup.procs": "4242\n4343\n"}.items():
            (self.own / name).write_text(text)
        build = self.own / "deployhub" / "dep1-1"  # what the kernel would show once made
        build.mkdir(parents=True)
        for name, text in BUILD_FILES.items():
            (build / name).write_text(text)
        (self.own / "deployhub" / "cgroup.subtree_control").write_text("")
        self.build = build

    def write(self, path: Path, value: str) -> None:
        group = path.parent
        if path.name == "cgroup.subtree_control":
            if group != self.root and (group / "cgroup.procs").exists() and (group / "cgroup.procs").read_text().strip():
                raise OSError(errno.EBUSY, "Device or resource busy")
            path.write_text(value)
        elif path.name == "cgroup.procs":
            for procs in self.root.rglob("cgroup.procs"):
                procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if p != value))
            with open(path, "a") as f:
                f.write(value + "\n")
        else:
            path.write_text(value)

    def kill_all(self, dirs: Sequence[Path], deadline: float = 5.0) -> None:
        for group in dirs:  # empty now: the kernel lets an empty cgroup be removed
            for child in group.iterdir():
                child.unlink()


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel(tmp_path / "cgroup2", "/system.slice/deployhub.service")
    monkeypatch.setattr(cgroups, "_write", fake.write)
    monkeypatch.setattr(cgroups, "kill_all", fake.kill_all)
    monkeypatch.setattr(cgroups, "builds_dir", lambda controller: None)  # no v1 hierarchy
    return fake


def test_v2_limits_in_a_delegated_subtree(kernel: FakeKernel) -> None:
    where = (kernel.root, "/system.slice/deployhub.service")
    groups = cgroups.Cgroups.create("dep1-1", memory_mb=256, max_pids=64, v2=where)
    assert groups.problems == [] and groups.v2 == kernel.build and groups.dirs == [kernel.build]
    # The worker's processes moved to a leaf, so its own cgroup may enable controllers.
    assert (kernel.own / "cgroup.procs").read_text() == ""
    assert (kernel.own / cgroups.V2_LEAF / "cgroup.procs").read_text() == "4242\n4343\n"
    assert (kernel.own / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (kernel.own / "deployhub" / "cgroup.subtree_control").read_text() == "+memory +pids"
    limits = {n: (kernel.build / n).read_text() for n in ("memory.max", "memory.swap.max",
                                                          "memory.oom.group", "pids.max")}
    assert limits == {"memory.max": str(256 * MiB), "memory.swap.max": "0",
                      "memory.oom.group": "1", "pids.max": "64"}
    assert groups.limited("memory") and groups.limited("pids")
    assert groups.wrap(["npm", "ci"])[4:] == ["unlimited", str(kernel.build), "--", "npm", "ci"]


def test_v2_reasons_and_teardown(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    groups = cgroups.Cgroups.create("dep1-1", memory_mb=256, max_pids=64,
                                    v2=(kernel.root, "/system.slice/deployhub.service"))
    assert not groups.out_of_memory() and not groups.hit_pids_limit()
    (kernel.build / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (kernel.build / "pids.events").write_text("max 3\n")
    assert groups.out_of_memory() and groups.hit_pids_limit()
    kill = kernel.build / "cgroup.kill"
    written: list[str] = []

    def write(path: Path, value: str) -> None:
        written.append(f"{path.name}={value}")
        kernel.write(path, value)

    monkeypatch.setattr(cgroups, "_write", write)
    groups.close()
    assert written == ["cgroup.kill=1"] and not kill.exists() and not kernel.build.exists()


def test_a_later_worker_in_the_leaf_uses_the_same_subtree(kernel: FakeKernel) -> None:
    where = (kernel.root, "/system.slice/deployhub.service")
    cgroups.Cgroups.create("dep1-1", memory_mb=256, max_pids=64, v2=where).close()
    kernel.build.mkdir()
    for name, text in BUILD_FILES.items():
        (kernel.build / name).write_text(text)
    later = cgroups.Cgroups.create("dep1-1", memory_mb=128, max_pids=0,
                                   v2=(kernel.root, f"/system.slice/deployhub.service/{cgroups.V2_LEAF}"))
    assert later.v2 == kernel.build and later.v2_controllers == ("memory",)
    assert not (kernel.own / cgroups.V2_LEAF / cgroups.V2_LEAF).exists()


def test_v2_without_delegated_controllers_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKernel(tmp_path / "cgroup2", "/user.slice", controllers="cpu io")
    monkeypatch.setattr(cgroups, "_write", fake.write)
    monkeypatch.setattr(cgroups, "builds_dir", lambda controller: None)
    groups = cgroups.Cgroups.create("dep1-1", memory_mb=256, max_pids=64, v2=(fake.root, "/user.slice"))
    assert groups.dirs == [] and [c for c, _ in groups.problems] == ["memory", "pids"]
    assert groups.problems[0][1] == (
        f"cannot set up cgroup v2 memory: the cgroup v2 group {fake.own} does not offer memory "
        "pids (its cgroup.controllers: cpu io); delegate them to DeployHub"
    )
    assert (fake.own / "cgroup.subtree_control").read_text() == ""  # nothing was touched


def test_v2_location_of_this_process() -> None:
    where = cgroups.v2_location()
    if where is None:
        pytest.skip("no cgroup2 mount here")
    mount, own = where
    assert (mount / own.strip("/") / "cgroup.procs").exists()
