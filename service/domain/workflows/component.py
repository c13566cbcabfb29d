"""The workflows component: mounts the workflows API (:mod:`.routes`). Runs execute on the worker
(:mod:`.jobs`); the API only writes run rows and enqueues their jobs on
``resources.extensions["queue"]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.domain.workflows.routes import ROUTES

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["WorkflowsComponent"]


class WorkflowsComponent(InitPluginProtocol):
    """``/api/workflows`` and ``/api/runs``."""

    def __init__(self, resources: Resources) -> None:
        if "queue" not in resources.extensions:
            raise RuntimeError("WorkflowsComponent needs the WorkerQueueComponent listed before it")

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.extend(ROUTES)
        return app_config
