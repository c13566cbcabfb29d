"""The Redis side of real-time fan-out: a bounded history stream and a pub/sub channel per user.

One Lua script appends a message to the user's stream (``XADD … MAXLEN ~ N``, the stream entry
id becoming the message id) and publishes it on the user's channel, atomically: the order of
ids in the stream is the order of messages on the channel, which is what lets a reconnecting
client read the history after its last id and then switch to live messages with neither a gap
nor a duplicate (see :mod:`service.domain.realtime.hub`).

Message ids are Redis stream ids, ``"<milliseconds>-<sequence>"``, increasing per user.

Audience. A user's messages are appended and published only while the user has an *audience*:
a presence key (``vigil:rt:present:<user>``) that every WebSocket connection of the user creates
and keeps alive (refreshed while connected and when it closes, expiring one history TTL after
the last connection went away). Without one nobody is listening and nobody holds a message id
to resume from, so the history would be written for no one: a backend that ingests batches for
users without a browser open costs Redis nothing (D58). The presence key holds the Redis time
(ms) it was created; a client resuming from an id older than that may have missed skipped
messages, and is told ``gap`` (reload through the REST API), exactly as when its id is older
than the history reaches.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from telemetry.logging import get_logger

__all__ = [
    "KINDS",
    "History",
    "Kind",
    "MessageId",
    "append_and_publish_many",
    "channel_key",
    "check_kind",
    "encode_body",
    "frame",
    "has_audience",
    "mark_present",
    "parse_id",
    "presence_key",
    "publish_many_via_redis",
    "publish_to_audience",
    "publish_via_redis",
    "read_history",
    "stream_key",
]

Kind = Literal["event", "pattern", "suggestion", "workflow_run"]
KINDS: frozenset[str] = frozenset({"event", "pattern", "suggestion", "workflow_run"})
MessageId = tuple[int, int]

DEFAULT_HISTORY_SIZE = 1000
DEFAULT_HISTORY_TTL_SECONDS = 86_400
_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_log = get_logger("vigil.realtime")

# Appends messages of one kind to the user's stream and publishes each on the user's channel.
# KEYS: stream, channel, presence. Nothing is written while the presence key is missing (no
# audience: see the module docstring); returns "" then. ARGV: kind, maxlen, ttl ms, then the
# bodies (JSON objects starting with {"kind") joined by newlines (JSON bodies contain none:
# newlines inside strings are escaped), as ONE argument: redis-py packs each argument
# separately, and packing 1,000 of them cost more than the script. The channel carries
# "<id>\n<kind>\n<frame>" so subscribers route without parsing JSON. Returns the ids in order,
# comma-joined (one bulk string parses faster than a 1,000-element array).
_PUBLISH_MANY_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return '' end
local ids = {}
for body in string.gmatch(ARGV[4], '[^\\n]+') do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'k', ARGV[1], 'b', body)
  local frame = '{"id":"' .. id .. '",' .. string.sub(body, 2)
  redis.call('PUBLISH', KEYS[2], id .. '\\n' .. ARGV[1] .. '\\n' .. frame)
  ids[#ids + 1] = id
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return table.concat(ids, ',')
"""


# Creates the presence key if missing, holding the Redis time in ms (one clock with the stream
# ids it is compared to), and (re)sets its TTL. KEYS: presence. ARGV: ttl ms. Returns the
# creation time.
_MARK_PRESENT_LUA = """
local t = redis.call('TIME')
redis.call('SET', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), 'NX')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return redis.call('GET', KEYS[1])
"""


def presence_key(user_id: uuid.UUID) -> str:
    return f"vigil:rt:present:{user_id}"


async def mark_present(redis: aioredis.Redis, user_id: uuid.UUID, ttl_seconds: int) -> int:
    """Give the user an audience for ``ttl_seconds`` more; when it began (Redis time, ms)."""
    raw = await redis.register_script(_MARK_PRESENT_LUA)(keys=[presence_key(user_id)], args=[ttl_seconds * 1000])
    return int(raw)


async def has_audience(redis: aioredis.Redis, user_id: uuid.UUID) -> bool:
    """Whether any client of the user is (or was, within the history TTL) connected."""
    return bool(await redis.exists(presence_key(user_id)))


def stream_key(user_id: uuid.UUID) -> str:
    return f"vigil:rt:history:{user_id}"


def channel_key(user_id: uuid.UUID) -> str:
    return f"vigil:rt:user:{user_id}"


def parse_id(raw: str) -> MessageId | None:
    """``(ms, seq)`` of a message id; None when ``raw`` is not one."""
    m = _ID_RE.match(raw)
    return (int(m.group(1)), int(m.group(2))) if m else None


def format_id(mid: MessageId) -> str:
    return f"{mid[0]}-{mid[1]}"


def check_kind(kind: str) -> None:
    """ValueError unless ``kind`` is one of :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"unknown realtime kind {kind!r}; expected one of {sorted(KINDS)}")


def encode_body(kind: str, data: Any) -> str:
    """``{"kind": …, "data": …}`` as JSON (msgspec: datetimes, UUIDs and Structs encode)."""
    check_kind(kind)
    return msgspec.json.encode({"kind": kind, "data": data}).decode()


def frame(mid: str, body: str) -> str:
    """The client message ``{"id": …, "kind": …, "data": …}`` from an id and an encoded body."""
    return '{"id":"' + mid + '",' + body[1:]


class _State:
    failing = False
    """Whether the last :func:`publish_via_redis` of this process failed (one log per change)."""


async def append_and_publish_many(
    redis: aioredis.Redis,
    user_id: uuid.UUID,
    kind: str,
    bodies: list[str],
    *,
    history_size: int = DEFAULT_HISTORY_SIZE,
    history_ttl_seconds: int = DEFAULT_HISTORY_TTL_SECONDS,
) -> list[str]:
    """Append messages to the user's history and publish them on their channel, in ONE script
    call (EVALSHA, EVAL again once a restarted Redis has lost its scripts); their ids, in order,
    or ``[]`` when the user has no audience (nothing written).
    A batch of 1,000 events costs one command, not 1,000: a pipeline of per-message calls cost
    ~20 µs per event in redis-py's packing and parsing alone (``bench/events_ingest.py``).
    Raises :class:`redis.exceptions.RedisError` (or ``OSError``) when Redis is unreachable."""
    if not bodies:
        return []
    raw = await redis.register_script(_PUBLISH_MANY_LUA)(
        keys=[stream_key(user_id), channel_key(user_id), presence_key(user_id)],
        args=[kind, history_size, history_ttl_seconds * 1000, "\n".join(bodies)],
    )
    # One comma-joined string, not an array: parsing 1,000 RESP elements costs more than a split.
    joined = raw.decode() if isinstance(raw, bytes) else str(raw)
    return joined.split(",") if joined else []


async def publish_via_redis(
    redis: aioredis.Redis,
    user_id: uuid.UUID,
    kind: str,
    data: Any,
    *,
    history_size: int = DEFAULT_HISTORY_SIZE,
    history_ttl_seconds: int = DEFAULT_HISTORY_TTL_SECONDS,
) -> str | None:
    """Push ``data`` to every connected client of ``user_id`` on any instance (for processes
    without WebSockets, such as the worker). Returns the message id, or None when the user has
    no audience (nothing to deliver) or Redis is unreachable: real-time delivery is best effort
    (the data itself is in PostgreSQL), so this never raises for an outage; one log line per
    change of state, not per message.

    ``kind`` must be one of :data:`KINDS` (ValueError otherwise)."""
    ids = await publish_many_via_redis(
        redis, user_id, kind, [data], history_size=history_size, history_ttl_seconds=history_ttl_seconds
    )
    return ids[0] if ids else None


async def publish_to_audience(
    redis: aioredis.Redis,
    user_id: uuid.UUID,
    kind: str,
    items: Sequence[Any],
    *,
    history_size: int = DEFAULT_HISTORY_SIZE,
    history_ttl_seconds: int = DEFAULT_HISTORY_TTL_SECONDS,
) -> list[str]:
    """Encode ``items`` and append and publish them (:func:`append_and_publish_many`) if the
    user has an audience; their ids, or ``[]`` without one. The audience is checked before
    encoding: a batch for a user nobody listens to costs one ``EXISTS``, not 1,000 encodings
    and a 200 kB script call (the script checks again). Redis errors propagate."""
    if not await has_audience(redis, user_id):
        return []
    bodies = [encode_body(kind, data) for data in items]
    return await append_and_publish_many(
        redis, user_id, kind, bodies, history_size=history_size, history_ttl_seconds=history_ttl_seconds
    )


async def publish_many_via_redis(
    redis: aioredis.Redis,
    user_id: uuid.UUID,
    kind: str,
    items: list[Any],
    *,
    history_size: int = DEFAULT_HISTORY_SIZE,
    history_ttl_seconds: int = DEFAULT_HISTORY_TTL_SECONDS,
) -> list[str] | None:
    """:func:`publish_via_redis` for several messages of one user, in order, in one script call
    (the worker's events listener pushes a replayed or emitted batch this way); ``[]`` when the
    user has no audience."""
    check_kind(kind)
    try:
        ids = await publish_to_audience(
            redis, user_id, kind, items, history_size=history_size, history_ttl_seconds=history_ttl_seconds
        )
    except (RedisError, OSError) as exc:
        if not _State.failing:
            _State.failing = True
            _log.warning("realtime_publish_unavailable", error=type(exc).__name__)
        return None
    if _State.failing:
        _State.failing = False
        _log.info("realtime_publish_recovered")
    return ids


class History(msgspec.Struct):
    """What a resuming client missed: frames after its last id, oldest first."""

    frames: list[tuple[MessageId, str, str]]
    """``(id, kind, frame)`` in id order."""

    gap: bool
    """True when the history no longer reaches back to the client's last id (trimmed or
    expired): the client must reload through the REST API."""


async def read_history(
    redis: aioredis.Redis, user_id: uuid.UUID, after: MessageId, *, history_size: int, history_ttl_seconds: int
) -> History:
    """The user's messages with an id greater than ``after`` (Redis errors propagate)."""
    key = stream_key(user_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xrange(key, min=f"({format_id(after)}", max="+")
        pipe.xrange(key, min="-", max="+", count=1)
        pipe.xlen(key)
        entries, first, length = await pipe.execute()
    frames: list[tuple[MessageId, str, str]] = []
    for raw_id, fields in entries:
        mid = raw_id.decode()
        parsed = parse_id(mid)
        if parsed is None:  # pragma: no cover - Redis only makes well-formed ids
            continue
        frames.append((parsed, fields[b"k"].decode(), frame(mid, fields[b"b"].decode())))
    if first:
        oldest = parse_id(first[0][0].decode())
        # Trimming only starts once the stream is full: an oldest entry after the client's last
        # id in a full stream means entries in between may have been trimmed (conservative: a
        # false alarm only costs the client one reload).
        gap = oldest is not None and oldest > after and length >= history_size
    else:
        # No stream: nothing since the last id, unless it is older than the history lives.
        gap = after[0] < (time.time() - history_ttl_seconds) * 1000
    return History(frames=frames, gap=gap)
