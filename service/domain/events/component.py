"""The events component: the event routes, the ``events`` dead-letter queue (producer side;
the worker replays it), backpressure, the listeners list, and the DLQ admin API.

Published at construction (listed right after the audit component, so later ones find them):

- ``resources.extensions["events.listeners"]``: a list; append
  ``async def listener(user_id, events: Sequence[StoredEvent]) -> None``. It is called in a
  background task after the events are committed (never awaited by the request; errors are
  logged and counted in ``events_listener_errors_total``).
- ``resources.extensions["events"]``: this component (writer, dead-letter queue, backpressure).
- ``resources.extensions["dlq"]``: the dead-letter queues of this application by name
  (``audit``, ``events``), operated through ``/admin/dlq``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.dlq_admin import DLQAdminController
from service.domain.events.routes import Backpressure, event_routes, version_key
from service.domain.events.schema import StoredEvent
from service.domain.events.writer import EventWriter, Listener
from service.guardrails.dlq import DeadLetterQueue, DLQConfig

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["EventsComponent", "events_dlq_config"]


def events_dlq_config(max_attempts: int) -> DLQConfig:
    """The ``events`` queue's policy: replays back off from 1 s to 5 min; parked after N."""
    return DLQConfig(max_attempts=max_attempts, initial_backoff_seconds=1.0, max_backoff_seconds=300.0)


class EventsComponent(InitPluginProtocol):
    """Event ingestion and listing; see the module docstring for what it publishes."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        s = resources.settings
        self.listeners: list[Listener] = []
        self.dlq = DeadLetterQueue(
            "events", resources.redis, s.dlq_spool_dir, resources.metrics, events_dlq_config(s.events_dlq_max_attempts)
        )
        self.writer = EventWriter(
            resources.db, self.dlq, resources.metrics, self.listeners,
            chunk_size=s.events_chunk_size, budget_seconds=s.events_batch_budget_seconds,
        )  # fmt: skip
        self.backpressure = Backpressure(
            self.dlq.current_depth, s.events_backpressure_depth, s.events_backpressure_retry_after_seconds
        )
        resources.extensions["events.listeners"] = self.listeners
        resources.extensions["events"] = self
        queues = resources.extensions.setdefault("dlq", {})
        audit = resources.extensions.get("audit")
        if audit is not None:
            queues["audit"] = audit.dlq
        queues["events"] = self.dlq

    async def on_replayed(self, user_id: uuid.UUID, events: Sequence[StoredEvent]) -> None:
        """Events a manual replay (admin API) stored: visible in lists, and told to listeners."""
        await self.resources.cache.invalidate(version_key(user_id))
        self.writer.notify(user_id, events)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.extend([*event_routes(self.resources.settings), DLQAdminController])
        app_config.lifespan.append(self._lifespan)
        return app_config

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        # The refresh loop keeps the depth (backpressure, gauges) current and moves this
        # process's spool into Redis once it answers again, for the worker to replay.
        await self.dlq.refresh()
        self.dlq.start()
        try:
            yield
        finally:
            await self.writer.drain()
            await self.dlq.stop()
