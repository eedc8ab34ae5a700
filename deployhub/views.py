"""How records look on the wire (REST bodies and WebSocket frames)."""

from __future__ import annotations

from typing import Any

from .settings import Settings
from .store import Deployment, Project


def deployment_url(settings: Settings, dep: Deployment) -> str:
    return settings.site_url_for(f"{dep.project}--{dep.id}")


def deployment_json(settings: Settings, dep: Deployment, production: str) -> dict[str, Any]:
    return {
        "id": dep.id,
        "project": dep.project,
        "repo_url": dep.repo_url,
        "branch": dep.branch,
        # The full SHA asked for (null: the branch head), then the one built; its message's
        # first line once cloned.
        "commit": dep.commit or None,
        "commit_message": dep.commit_message or None,
        "settings": dep.settings,
        "status": dep.status,
        "reason": dep.reason,
        "created_at": dep.created_at,
        "updated_at": dep.updated_at,
        "timestamps": dep.timestamps,
        "url": settings.site_url_for(dep.project),
        "deployment_url": deployment_url(settings, dep),
        "is_production": dep.id == production,
        # Place in the shared build queue while queued (1 = next; 0 = starting), else null.
        "queue_position": dep.queue_position,
        # "page", "cli", "webhook", or null: a plain API call (or one from before it was kept).
        "trigger": dep.trigger or None,
    }


def project_json(settings: Settings, project: Project) -> dict[str, Any]:
    return {
        "name": project.name,
        "repo_url": project.repo_url,
        "production": project.production or None,
        "created_at": project.created_at,
        "url": settings.site_url_for(project.name),
    }
