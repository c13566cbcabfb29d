"""The worker's side of real-time updates: events the worker stores (dead-letter replays,
``emit_event`` workflow steps) are pushed to their owner's WebSockets like ingested ones.

The API pushes what it stores through its hub (:class:`~service.domain.realtime.hub.RealtimeHub`);
the worker has no WebSockets, so its events listener appends to the user's history stream and
publishes on the user's channel directly (:func:`~service.domain.realtime.fanout.publish_many_via_redis`),
which every API instance's hub relays. Best effort: with Redis down nothing is pushed (the
events are in PostgreSQL, and a reconnecting client reloads through the REST API).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from service.domain.realtime.fanout import publish_many_via_redis
from service.settings import Settings
from service.worker.base import JobSet, WorkerResources

__all__ = ["publish_from_worker", "realtime_jobs"]


async def publish_from_worker(
    resources: WorkerResources, user_id: uuid.UUID, kind: str, items: Sequence[Any]
) -> list[str] | None:
    """Push ``items`` (one message each, in order) to the user's WebSockets from a worker, with
    the history bounds of the settings; None while Redis is unreachable (never raises for it)."""
    s = resources.settings
    return await publish_many_via_redis(
        resources.redis,
        user_id,
        kind,
        list(items),
        history_size=s.realtime_history_size,
        history_ttl_seconds=s.realtime_history_ttl_seconds,
    )


def realtime_jobs(settings: Settings) -> JobSet:
    """No jobs of its own: a worker-side events listener (``extensions["events.listeners"]``)."""

    async def startup(resources: WorkerResources) -> None:
        async def push_events(user_id: uuid.UUID, events: Sequence[Any]) -> None:
            await publish_from_worker(resources, user_id, "event", events)

        resources.extensions.setdefault("events.listeners", []).append(push_events)

    return JobSet("realtime", startup=startup)
