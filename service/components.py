"""The components ``create_app`` mounts, in order (middleware added by an earlier component runs
first, e.g. authentication before rate limiting).

Each entry names a Litestar init plugin, ``"module:Class"``, constructed with the application's
:class:`service.app.Resources`; in ``on_app_init`` it adds its route handlers, middleware and
lifespan hooks, and may publish objects for others in ``resources.extensions[name]``.
"""

from __future__ import annotations

__all__ = ["COMPONENTS"]

COMPONENTS: tuple[str, ...] = (
    "service.worker.component:WorkerQueueComponent",
    "service.domain.audit.component:AuditComponent",
    "service.domain.events.component:EventsComponent",
    "service.domain.auth.component:AuthComponent",
    "service.domain.realtime.component:RealtimeComponent",
    "service.guardrails.ratelimit:RateLimitComponent",
    "service.domain.uploads.component:UploadsComponent",
    "service.domain.patterns.component:PatternsComponent",
    "service.domain.integrations.component:IntegrationsComponent",
    "service.domain.workflows.component:WorkflowsComponent",
)
