"""Graceful degradation of read routes (the seed's "API outage" failure mode).

A read route loads through :meth:`DegradableReads.read`: the answer comes from the cache
while fresh, else from the database (through the breaker, with retries). When the database
is unavailable (breaker open, PostgreSQL unreachable, connection dropped) and the cache still
holds a stale copy, that copy is served, marked with the ``Vigil-Degraded: stale`` header and
counted in ``degraded_responses_total{route}``. With no copy, the client gets the 503 +
``Retry-After`` of the database guard. Writes are never degraded: they answer 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from litestar import Request
from opentelemetry import trace
from sqlalchemy import exc as sa_exc

from service.guardrails.cache import Cache
from service.guardrails.database import DatabaseUnavailable
from service.guardrails.retry import connection_lost
from telemetry.http import add_response_header
from telemetry.metrics import Metrics

__all__ = ["DEGRADED_HEADER", "DegradableReads", "database_unavailable"]

T = TypeVar("T")
DEGRADED_HEADER = "Vigil-Degraded"
_DEGRADED_NAME = DEGRADED_HEADER.lower().encode()


def database_unavailable(exc: BaseException) -> bool:
    """The loader failed because the database cannot be used right now (not a query bug)."""
    if isinstance(exc, DatabaseUnavailable | TimeoutError | sa_exc.TimeoutError):
        return True
    return connection_lost(exc)


class DegradableReads:
    """Cached reads that fall back to stale data while the database is unavailable."""

    def __init__(self, cache: Cache, metrics: Metrics | None = None) -> None:
        self.cache = cache
        self._counter = metrics.counter("degraded_responses_total") if metrics else None
        self._children: dict[str, Any] = {}

    async def read(
        self,
        request: Request[Any, Any, Any],
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl: float | None = None,
        as_type: type[T] | None = None,
    ) -> T:
        """The value for ``key`` (fresh, loaded, or stale while the database is unavailable).
        A stale answer marks the response degraded; callers return the value as usual."""
        result = await self.cache.get_or_load(key, loader, ttl=ttl, stale_on=database_unavailable, as_type=as_type)
        if result.result == "stale":
            self.mark_degraded(request)
        return result.value

    def mark_degraded(self, request: Request[Any, Any, Any]) -> None:
        route = request.scope.get("path_template") or "unmatched"
        add_response_header(request.scope, _DEGRADED_NAME, b"stale")  # type: ignore[arg-type]
        trace.get_current_span().add_event("degraded_response", {"route": route, "reason": "stale_cache"})
        if self._counter is not None:
            child = self._children.get(route)
            if child is None:
                child = self._children[route] = self._counter.labels(route)
            child.inc()
