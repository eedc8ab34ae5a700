"""The deployment lifecycle: one type for every place that names a status."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    CLONING = "cloning"
    INSTALLING = "installing"
    BUILDING = "building"
    UPLOADING = "uploading"
    READY = "ready"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        """A deployment in a final status never changes again."""
        return self in FINAL


# The steps a deployment walks through, in order; FAILED and CANCELED can end any of them.
STEPS = (
    Status.QUEUED, Status.CLONING, Status.INSTALLING, Status.BUILDING, Status.UPLOADING,
    Status.READY,
)
FINAL = frozenset({Status.READY, Status.FAILED, Status.CANCELED})


def lua_set(statuses: frozenset[Status]) -> str:
    """A Lua table literal `{ready=true, ...}` so scripts test membership from the same set."""
    return "{" + ", ".join(f"{s.value}=true" for s in sorted(statuses)) + "}"


def describe() -> dict[str, object]:
    """The lifecycle as the page learns it from the server."""
    return {"steps": [s.value for s in STEPS], "final": sorted(s.value for s in FINAL),
            "statuses": [s.value for s in Status]}
