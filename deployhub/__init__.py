"""DeployHub: deploy React apps from a Git URL, with live build logs.

The public names load lazily: `import deployhub.settings` (as the build worker does) must not
pull in aiohttp, the API and the hub.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .settings import Secret, Settings

if TYPE_CHECKING:
    from .app import create_app, setup
    from .connections import get_storage, get_store, get_tokens
    from .live.hub import get_hub
    from .runners import get_runner
    from .sites import get_sites
    from .state import get_settings

_LAZY = {
    "create_app": "app", "setup": "app",
    "get_settings": "state", "get_store": "connections", "get_tokens": "connections",
    "get_storage": "connections", "get_hub": "live.hub", "get_runner": "runners",
    "get_sites": "sites",
}

__all__ = [
    "Secret", "Settings", "create_app", "get_hub", "get_runner", "get_settings", "get_sites",
    "get_storage", "get_store", "get_tokens", "setup",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deployhub' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
