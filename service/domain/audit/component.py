"""The audit component: publishes the :class:`~service.domain.audit.recorder.AuditRecorder` as
``resources.extensions["audit"]``, mounts ``GET /api/audit`` and runs the flusher and the
dead-letter replayer for the application's lifetime (on shutdown the buffer is written, or
dead-lettered: never lost).

Other components record through it::

    resources.extensions["audit"].record("auth.login_succeeded", actor_user_id=user_id, ip=ip)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.domain.audit.recorder import AuditRecorder
from service.domain.audit.routes import list_own_audit_entries
from service.guardrails.dlq import DeadLetterQueue, DLQConfig

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["AuditComponent"]


class AuditComponent(InitPluginProtocol):
    """The audit log: recorder, query route, background flusher and replayer."""

    def __init__(self, resources: Resources) -> None:
        s = resources.settings
        self.dlq = DeadLetterQueue(
            "audit",
            resources.redis,
            s.dlq_spool_dir,
            resources.metrics,
            # A replay failing for another reason than a database outage is a bad entry: park it
            # after as many attempts as a live batch gets, retrying no slower than once a minute.
            DLQConfig(max_attempts=s.audit_max_attempts, initial_backoff_seconds=1.0, max_backoff_seconds=60.0),
        )
        self.recorder = AuditRecorder(
            resources.db,
            self.dlq,
            resources.metrics,
            buffer_size=s.audit_buffer_size,
            flush_interval_seconds=s.audit_flush_interval_seconds,
            max_attempts=s.audit_max_attempts,
        )
        # Published at construction: this component comes first, so later ones find it.
        resources.extensions["audit"] = self.recorder

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(list_own_audit_entries)
        app_config.lifespan.append(self._lifespan)
        return app_config

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        # Entered after the application's own lifespan and left before it: Redis and the engine
        # are still open for the last flush.
        await self.dlq.refresh()
        self.recorder.start()
        try:
            yield
        finally:
            await self.recorder.stop()
