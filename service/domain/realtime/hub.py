"""The in-process hub: the WebSocket connections of this instance, fed from Redis pub/sub, or
directly while Redis is down.

Backends. ``redis``: :meth:`RealtimeHub.publish` appends to the user's history stream and
publishes on the user's channel (:mod:`.fanout`); one pub/sub connection per instance, subscribed
to the channels of the users connected here, hands messages to their connections. ``local``:
Redis is unreachable; messages published on this instance go straight to its connections and
into a bounded in-memory history (others' messages cannot arrive). The switch is one log line
and the ``realtime_fanout_backend`` gauge; a background task returns to Redis as soon as it
answers, re-subscribes, and first delivers what Redis received meanwhile.

No gap, no duplicate. A connection starts in *catch-up*: live messages are held while the
history after the client's last id is read (after the subscription is confirmed), then held
messages already covered by the history are skipped. Redis ids increase per user in channel
order, so a connection drops any Redis message whose id is not above the last one it got.

Slow clients. Each connection has a bounded send buffer; when it is full the connection is
marked slow and closed with 1013 (the client resumes from its last id), counted in
``realtime_messages_dropped_total{reason="slow_consumer"}``: memory never grows with a slow reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.domain.realtime import fanout
from service.domain.realtime.fanout import History, MessageId, parse_id
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = ["Connection", "RealtimeHub"]

_log = get_logger("vigil.realtime")
_LOCAL_HISTORY_USERS = 1000
"""Users whose local-mode messages are kept for resumption (least recently published dropped)."""
_CONTROL = "vigil:rt:control"
"""Always subscribed, so the pub/sub connection is never idle without subscriptions."""
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


class Connection:
    """One client's delivery state (its WebSocket is served by :mod:`.socket`)."""

    def __init__(self, user_id: uuid.UUID, limit: int, dropped: Any) -> None:
        self.user_id = user_id
        self.buffer: deque[tuple[str, str]] = deque()
        """``(kind, frame)`` waiting to be sent."""
        self.wake = asyncio.Event()
        self.limit = limit
        self.last_redis: MessageId | None = None
        self.pending: list[tuple[MessageId | None, str, str]] | None = []
        """Messages held during catch-up (None once live)."""
        self.slow = False
        self.closing = False
        """Set on shutdown: the connection is closed with 1001."""
        self._dropped = dropped

    def offer(self, mid: MessageId | None, kind: str, frame: str) -> None:
        """Queue a message; ``mid`` is its Redis id (None for local-mode messages)."""
        if self.slow:
            return
        if self.pending is not None:
            if len(self.pending) >= self.limit:
                self._overflow()
            else:
                self.pending.append((mid, kind, frame))
            return
        if mid is not None:
            if self.last_redis is not None and mid <= self.last_redis:
                return
            self.last_redis = mid
        if len(self.buffer) >= self.limit:
            self._overflow()
            return
        self.buffer.append((kind, frame))
        self.wake.set()

    def go_live(self) -> None:
        """End catch-up: queue the held messages the history did not cover."""
        held, self.pending = self.pending or [], None
        for mid, kind, frame in held:
            self.offer(mid, kind, frame)

    def _overflow(self) -> None:
        self.slow = True
        self.buffer.clear()
        self.pending = None
        self._dropped.inc()
        self.wake.set()


class RealtimeHub:
    """Connections by user, the pub/sub reader and the backend state (see the module docstring)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        metrics: Metrics,
        *,
        history_size: int,
        history_ttl_seconds: int,
        send_queue_size: int,
        reconnect_interval_seconds: float,
        subscribe_timeout_seconds: float = 2.0,
        liveness_seconds: float = 5.0,
    ) -> None:
        self.redis = redis
        self.history_size = history_size
        self.history_ttl_seconds = history_ttl_seconds
        self.send_queue_size = send_queue_size
        self.reconnect_interval = reconnect_interval_seconds
        self.subscribe_timeout = subscribe_timeout_seconds
        self.liveness = liveness_seconds
        """After this long without a message the reader PINGs Redis; no answer within
        ``subscribe_timeout`` counts as Redis down (a hung server keeps the socket open)."""
        self.connections: dict[uuid.UUID, set[Connection]] = {}
        self.backend = "redis"
        self._local_history: OrderedDict[uuid.UUID, deque[tuple[MessageId, str, str]]] = OrderedDict()
        self._last_local: MessageId = (0, 0)
        self._pubsub: Any = None
        self._confirmed: dict[bytes, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        """Set once the pub/sub connection exists (redis-py would open two if two coroutines
        subscribed on a fresh PubSub at once)."""
        self._gauge = metrics.gauge("realtime_fanout_backend")
        self._connections_gauge = metrics.gauge("realtime_connections")
        self._dropped = metrics.counter("realtime_messages_dropped_total").labels("slow_consumer")
        self._gauge.labels("redis").set(1)
        self._gauge.labels("local").set(0)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="realtime-fanout")
        self._presence_task = asyncio.create_task(self._refresh_presence(), name="realtime-presence")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._presence_task) if t is not None]
        self._task = self._presence_task = None
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 5.0)
        await self._close_pubsub()
        for conns in self.connections.values():
            for conn in conns:
                conn.closing = True
                conn.wake.set()

    # --- publishing ------------------------------------------------------------------------------

    async def publish(self, user_id: uuid.UUID, kind: str, data: Any) -> str | None:
        """Deliver ``data`` to ``user_id``'s clients on every instance (this one only while
        Redis is down); the message id, or None when the user has no audience (no client
        connected within the history TTL: nothing is written). Never raises for an outage."""
        ids = await self.publish_many(user_id, kind, [data])
        return ids[0] if ids else None

    async def publish_many(self, user_id: uuid.UUID, kind: str, items: Sequence[Any]) -> list[str]:
        """:meth:`publish` for several messages to one user, in order, with one Redis round trip
        (the events listener sends a whole batch this way); ``[]`` without an audience."""
        fanout.check_kind(kind)
        if not items:
            return []
        if self.backend == "redis":
            try:
                return await asyncio.wait_for(
                    fanout.publish_to_audience(
                        self.redis, user_id, kind, items,
                        history_size=self.history_size, history_ttl_seconds=self.history_ttl_seconds,
                    ),
                    timeout=self.subscribe_timeout,
                )  # fmt: skip
            except _REDIS_ERRORS as exc:
                self._to_local("publish_failed", exc)
        return [self._publish_locally(user_id, kind, fanout.encode_body(kind, data)) for data in items]

    def _publish_locally(self, user_id: uuid.UUID, kind: str, body: str) -> str:
        now_ms = int(time.time() * 1000)
        last = self._last_local
        mid = (now_ms, 0) if now_ms > last[0] else (last[0], last[1] + 1)
        self._last_local = mid
        text = fanout.frame(fanout.format_id(mid), body)
        history = self._local_history.get(user_id)
        if history is None:
            history = self._local_history[user_id] = deque(maxlen=self.history_size)
            if len(self._local_history) > _LOCAL_HISTORY_USERS:
                self._local_history.popitem(last=False)
        else:
            self._local_history.move_to_end(user_id)
        history.append((mid, kind, text))
        for conn in self.connections.get(user_id, ()):
            conn.offer(None, kind, text)
        return fanout.format_id(mid)

    # --- connections -----------------------------------------------------------------------------

    async def connect(self, user_id: uuid.UUID, last_id: MessageId | None) -> tuple[Connection, History]:
        """Register a connection (in catch-up) and return what it missed since ``last_id``; the
        caller sends the history, then calls ``conn.go_live()``."""
        conn = Connection(user_id, self.send_queue_size, self._dropped)
        self.connections.setdefault(user_id, set()).add(conn)
        self._connections_gauge.inc()
        history = History(frames=[], gap=False)
        if self.backend == "redis":
            try:
                since = await asyncio.wait_for(
                    fanout.mark_present(self.redis, user_id, self.history_ttl_seconds), self.subscribe_timeout
                )
                await self._subscribe(user_id)
                if last_id is not None:
                    history = await fanout.read_history(
                        self.redis, user_id, last_id,
                        history_size=self.history_size, history_ttl_seconds=self.history_ttl_seconds,
                    )  # fmt: skip
                    if last_id[0] < since:  # messages before the audience began were not kept
                        history = History(frames=history.frames, gap=True)
            except _REDIS_ERRORS as exc:
                self._to_local("subscribe_failed", exc)
        if last_id is not None:
            history = self._merge_local(user_id, last_id, history)
        for mid, _kind, _frame in history.frames:
            if mid > (conn.last_redis or (0, 0)):
                conn.last_redis = mid
        return conn, history

    def _merge_local(self, user_id: uuid.UUID, last_id: MessageId, history: History) -> History:
        local = self._local_history.get(user_id)
        if not local:
            return history
        missed = [entry for entry in local if entry[0] > last_id]
        gap = history.gap or (len(local) == local.maxlen and local[0][0] > last_id)
        if not missed:
            return History(frames=history.frames, gap=gap)
        # Local ids are not Redis ids: keep them apart from dedupe (conn.last_redis) by marking
        # them, yet deliver everything in time order.
        merged = sorted([*history.frames, *missed], key=lambda e: e[0])
        return History(frames=merged, gap=gap)

    async def disconnect(self, conn: Connection) -> None:
        """Forget ``conn``; the user's channel is unsubscribed with their last connection."""
        conns = self.connections.get(conn.user_id)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        self._connections_gauge.dec()
        if conns:
            return
        del self.connections[conn.user_id]
        # The audience outlives the last connection by one history TTL, so the client can resume.
        await self._keep_present([conn.user_id])
        channel = fanout.channel_key(conn.user_id).encode()
        # Under the lock, and re-checked: a reconnect racing this must not lose its SUBSCRIBE
        # to a later UNSUBSCRIBE.
        async with self._lock:
            if conn.user_id in self.connections or channel not in self._confirmed:
                return
            del self._confirmed[channel]
            if self._pubsub is not None:
                with contextlib.suppress(*_REDIS_ERRORS):
                    await asyncio.wait_for(self._pubsub.unsubscribe(channel), self.subscribe_timeout)

    async def _subscribe(self, user_id: uuid.UUID) -> None:
        channel = fanout.channel_key(user_id).encode()
        await asyncio.wait_for(self._ready.wait(), self.subscribe_timeout)
        async with self._lock:
            confirmed = self._confirmed.get(channel)
            if confirmed is None:
                if self._pubsub is None:
                    raise ConnectionError("pub/sub not connected")
                confirmed = self._confirmed[channel] = asyncio.Event()
                await self._pubsub.subscribe(channel)
        await asyncio.wait_for(confirmed.wait(), self.subscribe_timeout)

    # --- presence (the audience of fanout's module docstring) -----------------------------------

    async def _keep_present(self, users: Sequence[uuid.UUID]) -> None:
        """Extend the users' audience by one history TTL (best effort: a Redis outage is the
        reader's business, and a lapsed audience only makes a resuming client reload). Skipped
        while the hub is local: Redis is known to be unreachable, and the reader marks every
        connected user present when it reconnects."""
        if self.backend != "redis":
            return
        for user_id in users:
            try:
                await asyncio.wait_for(
                    fanout.mark_present(self.redis, user_id, self.history_ttl_seconds), self.subscribe_timeout
                )
            except _REDIS_ERRORS:
                return

    async def _refresh_presence(self) -> None:
        """Keep the audience of every user connected here alive (three times per TTL)."""
        while True:
            await asyncio.sleep(max(1.0, self.history_ttl_seconds / 3))
            await self._keep_present(list(self.connections))

    # --- the pub/sub reader ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._connect_pubsub()
                await self._read_forever()
            except asyncio.CancelledError:
                raise
            except _REDIS_ERRORS as exc:
                self._to_local("subscriber_failed", exc)
            except Exception as exc:  # the reader must outlive any single bad message
                _log.exception("realtime_subscriber_error")
                self._to_local("subscriber_error", exc)
            await self._close_pubsub()
            await asyncio.sleep(self.reconnect_interval)

    async def _connect_pubsub(self) -> None:
        """Subscribe the control channel and every connected user's channel; after an outage,
        deliver what the users' histories received meanwhile, then return to ``redis``."""
        pubsub = self.redis.pubsub()
        self._pubsub = pubsub
        self._confirmed = {}
        await pubsub.subscribe(_CONTROL)
        await self._await_confirmations(pubsub, {_CONTROL.encode()}, [])
        if self.backend == "redis":
            self._ready.set()
            return
        # Users connecting meanwhile are still served locally: repeat until none is missing,
        # then switch with no await in between.
        while missing := [u for u in self.connections if fanout.channel_key(u).encode() not in self._confirmed]:
            channels = [fanout.channel_key(u).encode() for u in missing]
            for channel in channels:
                self._confirmed[channel] = asyncio.Event()
            await pubsub.subscribe(*channels)
            held: list[dict[str, Any]] = []
            await self._await_confirmations(pubsub, set(channels), held)
            # Live messages that arrived with the confirmations wait until the history is out,
            # or the dedupe by id would swallow the older history entries.
            for user_id in missing:  # raising, as the catch-up does: the reader retries
                await fanout.mark_present(self.redis, user_id, self.history_ttl_seconds)
            await self._catch_up(missing)
            for message in held:
                self._handle(message)
        self._ready.set()
        self._to_redis()

    async def _await_confirmations(self, pubsub: Any, waiting: set[bytes], held: list[dict[str, Any]]) -> None:
        deadline = time.monotonic() + self.subscribe_timeout
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError("pub/sub subscription not confirmed")
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=0.2)
            if message is None:
                continue
            if message["type"] == "subscribe":
                waiting.discard(message["channel"])
                self._handle(message)
            elif message["type"] == "message":
                held.append(message)

    async def _catch_up(self, users: list[uuid.UUID]) -> None:
        """Deliver what reached the users' Redis histories while this instance read none."""
        for user_id in users:
            conns = self.connections.get(user_id, set())
            known = [c.last_redis for c in conns if c.last_redis is not None]
            after = min(known) if known else (int(time.time() * 1000) - 60_000, 0)
            history = await fanout.read_history(
                self.redis, user_id, after,
                history_size=self.history_size, history_ttl_seconds=self.history_ttl_seconds,
            )  # fmt: skip
            for mid, kind, text in history.frames:
                for conn in list(self.connections.get(user_id, ())):
                    conn.offer(mid, kind, text)

    async def _read_forever(self) -> None:
        pubsub = self._pubsub
        heard, pinged = time.monotonic(), None
        while True:
            if self.backend == "local":  # a publish failed: reconnect, catch up, switch back
                raise ConnectionError("fan-out degraded by a failed publish")
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            now = time.monotonic()
            if message is not None:
                heard, pinged = now, None  # anything, the PING's "pong" included, proves liveness
                self._handle(message)
                # A burst (a batch's pipeline) is parsed from the socket buffer without yielding:
                # let the send loops drain between messages, or the burst alone overflows them.
                await asyncio.sleep(0)
            elif pinged is not None and now - pinged > self.subscribe_timeout:
                # A stopped or hung Redis keeps the TCP connection open: only silence tells.
                raise TimeoutError("Redis did not answer the pub/sub connection's PING")
            elif pinged is None and now - heard >= self.liveness:
                await asyncio.wait_for(pubsub.ping(), self.subscribe_timeout)
                pinged = now

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "subscribe":
            event = self._confirmed.get(message["channel"])
            if event is not None:
                event.set()
            return
        if kind != "message":
            return
        mid_raw, msg_kind, text = message["data"].decode().split("\n", 2)
        mid = parse_id(mid_raw)
        user_id = uuid.UUID(message["channel"].decode().rsplit(":", 1)[1])
        for conn in list(self.connections.get(user_id, ())):
            conn.offer(mid, msg_kind, text)

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._ready.clear()
        for event in self._confirmed.values():
            event.set()  # nobody waits on a dead connection; they re-check the backend
        self._confirmed = {}
        if pubsub is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await pubsub.aclose()

    # --- backend state ---------------------------------------------------------------------------

    def _to_local(self, reason: str, exc: BaseException) -> None:
        if self.backend == "local":
            return
        self.backend = "local"
        self._gauge.labels("redis").set(0)
        self._gauge.labels("local").set(1)
        _log.warning("realtime_fanout_degraded", backend="local", reason=reason, error=type(exc).__name__)

    def _to_redis(self) -> None:
        self.backend = "redis"
        self._gauge.labels("redis").set(1)
        self._gauge.labels("local").set(0)
        _log.info("realtime_fanout_restored", backend="redis")
