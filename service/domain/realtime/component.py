"""The realtime component: mounts ``/ws``, runs the fan-out hub for the application's lifetime,
publishes it as ``resources.extensions["realtime"]`` and pushes stored events to their owner.

Other components publish through it::

    await resources.extensions["realtime"].publish(user_id, "suggestion", {"id": …})

Processes without WebSockets (the worker) use
:func:`service.domain.realtime.publish_via_redis`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.domain.realtime.hub import RealtimeHub
from service.domain.realtime.socket import build_socket_handler

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["RealtimeComponent"]


class RealtimeComponent(InitPluginProtocol):
    """``/ws`` and the hub; listed after the auth component (it needs ``extensions["auth"]``)."""

    def __init__(self, resources: Resources) -> None:
        s = resources.settings
        self.resources = resources
        self.hub = RealtimeHub(
            resources.redis,
            resources.metrics,
            history_size=s.realtime_history_size,
            history_ttl_seconds=s.realtime_history_ttl_seconds,
            send_queue_size=s.realtime_send_queue_size,
            reconnect_interval_seconds=s.realtime_reconnect_interval_seconds,
            liveness_seconds=s.realtime_redis_liveness_seconds,
        )
        resources.extensions["realtime"] = self.hub
        # setdefault: correct whether or not the events component was constructed first.
        resources.extensions.setdefault("events.listeners", []).append(self.on_events)
        resources.metrics.gauge("realtime_connections").set(0)

    async def on_events(self, user_id: uuid.UUID, events: Sequence[Any]) -> None:
        """Events listener: each stored event goes to its owner's clients as kind ``event`` (a
        batch in one Redis round trip)."""
        await self.hub.publish_many(user_id, "event", list(events))

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        tokens = self.resources.extensions["auth"]
        app_config.route_handlers.append(
            build_socket_handler(self.hub, tokens, self.resources.settings, self.resources.metrics)
        )
        app_config.lifespan.append(self._lifespan)
        return app_config

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        self.hub.start()
        try:
            yield
        finally:
            await self.hub.stop()
