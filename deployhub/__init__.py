"""DeployHub: deploy React apps from a Git URL, with live build logs."""

from .app import create_app, get_context, setup
from .settings import Secret, Settings

__all__ = ["Secret", "Settings", "create_app", "get_context", "setup"]
