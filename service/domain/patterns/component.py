"""The patterns component: mounts the patterns API and registers the events listener that asks
the worker for a debounced analysis after each ingest (:mod:`.trigger`).

It must be listed in :data:`service.components.COMPONENTS` after the events component, which
creates ``resources.extensions["events.listeners"]``. The trigger is also published as
``resources.extensions["patterns.trigger"]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.domain.patterns.jobs import dead_letter_queue
from service.domain.patterns.routes import build_router
from service.domain.patterns.trigger import AnalysisTrigger
from telemetry.logging import get_logger

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["PatternsComponent"]

_log = get_logger("vigil.patterns")


class PatternsComponent(InitPluginProtocol):
    """Patterns and suggestions: routes, and analysis requested after every ingest."""

    def __init__(self, resources: Resources) -> None:
        s = resources.settings
        # The API only puts requests it could not enqueue; the worker replays them. Its refresh
        # loop moves this process's spool into Redis once Redis answers again.
        self.dlq = dead_letter_queue(resources)
        # Listed for the admin API (``/admin/dlq/patterns``), beside the events and audit queues.
        resources.extensions.setdefault("dlq", {})["patterns"] = self.dlq
        self.trigger = AnalysisTrigger(
            resources.extensions["queue"], self.dlq, resources.metrics, s.patterns_debounce_seconds
        )
        resources.extensions["patterns.trigger"] = self.trigger
        listeners = resources.extensions.get("events.listeners")
        if listeners is None:
            _log.warning("pattern_analysis_not_triggered", reason="no events component before the patterns component")
        else:
            listeners.append(self.trigger)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(build_router())
        app_config.lifespan.append(self._lifespan)
        return app_config

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        self.dlq.start()
        try:
            yield
        finally:
            await self.dlq.stop()
