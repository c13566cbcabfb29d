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

__all__ = ["realtime_jobs"]


def realtime_jobs(settings: Settings) -> JobSet:
    """No jobs of its own: a worker-side events listener (``extensions["events.listeners"]``)."""

    async def startup(resources: WorkerResources) -> None:
        s = resources.settings

        async def push_events(user_id: uuid.UUID, events: Sequence[Any]) -> None:
            await publish_many_via_redis(
                resources.redis,
                user_id,
                "event",
                list(events),
                history_size=s.realtime_history_size,
                history_ttl_seconds=s.realtime_history_ttl_seconds,
            )

        resources.extensions.setdefault("events.listeners", []).append(push_events)

    return JobSet("realtime", startup=startup)
