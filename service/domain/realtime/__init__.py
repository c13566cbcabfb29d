"""Real-time updates: the authenticated WebSocket ``/ws`` and its fan-out across instances.

Public surface:

* ``resources.extensions["realtime"]`` (API process): a :class:`RealtimeHub`;
  ``await hub.publish(user_id, kind, data) -> str`` (the message id). Never raises for a Redis
  outage: it then delivers on this instance only.
* :func:`publish_via_redis` ``(redis, user_id, kind, data) -> str | None`` for any process (the
  worker): None when Redis is unreachable, never raises for it.

``kind`` is one of :data:`KINDS` (``event``, ``pattern``, ``suggestion``, ``workflow_run``);
``data`` anything msgspec encodes (dicts, Structs, datetimes, UUIDs). The protocol and the close
codes are in :mod:`service.domain.realtime.socket`.
"""

from __future__ import annotations

from service.domain.realtime.fanout import KINDS, publish_via_redis
from service.domain.realtime.hub import RealtimeHub
from service.domain.realtime.socket import CLOSE_CODES

__all__ = ["CLOSE_CODES", "KINDS", "RealtimeHub", "publish_via_redis"]
