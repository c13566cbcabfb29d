"""The API's side of the worker: publishes the SAQ queue as ``resources.extensions["queue"]``
(connected for the application's lifetime) so route handlers and components can enqueue::

    from service.worker import enqueue

    await enqueue(resources.extensions["queue"], "run_workflow", run_id=str(run.id))

Register ``"service.worker.component:WorkerQueueComponent"`` in :data:`service.components.COMPONENTS`
(before the components that enqueue). The API never runs jobs itself: ``vigil worker`` does
(and ``vigil run`` on the embedded default, in the same process).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.worker.queue import create_queue

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["WorkerQueueComponent"]


class WorkerQueueComponent(InitPluginProtocol):
    """The queue jobs are enqueued on, one per application."""

    def __init__(self, resources: Resources) -> None:
        self.queue = create_queue(resources.settings.redis_url)
        # Published at construction, so components constructed later find it.
        resources.extensions["queue"] = self.queue

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.lifespan.append(self._lifespan)
        return app_config

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        await self.queue.connect()  # no I/O: connections open on first use, so Redis may be down
        try:
            yield
        finally:
            await self.queue.disconnect()
