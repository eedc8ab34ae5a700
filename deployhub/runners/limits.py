"""What a runner found at start about the build limits (GET /api/server shows it)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BuildLimits:
    policy: str  # DEPLOYHUB_BUILD_WITHOUT_LIMITS: "run" or "refuse"
    missing: tuple[str, ...] = ()  # "<why> (<setting>)" for each limit that does not hold
    message: str = ""  # what to tell a person; "" while every limit holds
