"""The components ``create_app`` mounts, in order (middleware added by an earlier component runs
first, e.g. authentication before rate limiting).

Each entry names a Litestar init plugin, ``"module:Class"``, constructed with the application's
:class:`service.app.Resources`; in ``on_app_init`` it adds its route handlers, middleware and
lifespan hooks, and may publish objects for others in ``resources.extensions[name]``.
Middleware of the API only (authentication, rate limiting) goes to
``resources.api_middleware`` instead, in the order it runs: ``service.routing.ApiRoutes``,
mounted after every component, puts it on the API's routes (and explains why an API handler
must not be a bound method of an object holding state).
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
