"""``/ws``: the authenticated WebSocket.

Protocol (text frames, JSON):

1. Authenticate, one of: an ``Authorization: Bearer <access token>`` header on the upgrade
   request (non-browser clients), or, as the first message within
   ``realtime_auth_timeout_seconds``, ``{"type": "auth", "token": "<access token>"}`` (browsers,
   which cannot set headers). Never in the URL: query strings end up in access logs (D30).
2. Resume (optional): ``"last_id": "<id>"`` in the auth message, or ``?last_id=<id>`` (an id is no
   secret). The server sends what the user's history holds after it, oldest first; when the
   history no longer reaches back that far it first sends ``{"type": "resync"}`` (reload through
   the REST API).
3. ``{"type": "ready", "resumed": <n>}``, then live messages
   ``{"id": "<id>", "kind": "event|pattern|suggestion|workflow_run", "data": {…}}``, ids increasing.
4. Keepalive: ``{"type": "ping"}`` every ``realtime_ping_interval_seconds``; any client message
   (``{"type": "pong"}``) counts as alive; a client silent for two more intervals is closed.
5. Token lifetime: the connection lasts as long as its access token. Before it expires the
   client sends ``{"type": "auth", "token": "<fresh access token>"}`` (same user) to extend it;
   at expiry the server closes with 4401. An invalid token, or one for another user, closes
   at once with 4401.

Close codes: 4400 malformed first message or ``last_id``; 4401 missing, invalid or expired token;
4408 no auth message in time; 4429 too many connections for the user; 4000 ping timeout; 1013
slow consumer (its send buffer filled; resume from the last id); 1001 server shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from opentelemetry import trace

from service.domain.auth.tokens import AccessTokens, AuthUser, InvalidToken
from service.domain.realtime.fanout import MessageId, parse_id
from service.domain.realtime.hub import Connection, RealtimeHub
from service.settings import Settings
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = ["CLOSE_CODES", "build_socket_handler"]

CLOSE_CODES = {
    "bad_message": 4400,
    "unauthenticated": 4401,
    "token_expired": 4401,
    "auth_timeout": 4408,
    "limit": 4429,
    "ping_timeout": 4000,
    "slow_consumer": 1013,
    "going_away": 1001,
}
_CLOSE_DETAIL = {
    "token_expired": "the access token expired; send a fresh one before expiry, or reconnect",
    "unauthenticated": "the access token is invalid or belongs to another user",
}
_log = get_logger("vigil.realtime")
_tracer = trace.get_tracer("vigil.realtime")


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


class _AuthMessage(msgspec.Struct):
    type: str
    token: str = ""
    last_id: str | None = None


class _Session:
    """Who a live connection is for and until when (its access token's expiry, extended by
    an in-band ``auth`` message)."""

    def __init__(self, user: AuthUser, leeway: float) -> None:
        self.user_id = user.id
        self.leeway = leeway
        self.deadline = _deadline(user, leeway)
        self.refused: str | None = None


def _deadline(user: AuthUser, leeway: float) -> float:
    """When the token stops being honoured, on the monotonic clock: its expiry plus the leeway
    the token check grants every request (never, for a user without an expiry)."""
    if user.expires_at is None:
        return float("inf")
    return time.monotonic() + (user.expires_at + leeway - time.time())


def _has_authorization(socket: WebSocket[Any, Any, Any]) -> bool:
    return any(name == b"authorization" for name, _ in socket.scope["headers"])


def _last_id(raw: str | None) -> MessageId | None:
    if raw is None or raw == "":
        return None
    parsed = parse_id(raw)
    if parsed is None:
        raise _Refused("bad_message", "last_id must look like '<milliseconds>-<sequence>'")
    return parsed


def build_socket_handler(hub: RealtimeHub, tokens: AccessTokens, settings: Settings, metrics: Metrics) -> Any:
    """The ``/ws`` route handler over ``hub``."""
    rejected = metrics.counter("realtime_connections_rejected_total")
    messages = metrics.counter("realtime_messages_total")
    out_children: dict[str, Any] = {}
    in_control = messages.labels("in", "control")
    out_control = messages.labels("out", "control")
    for reason in CLOSE_CODES:
        if reason in {"unauthenticated", "auth_timeout", "bad_message", "limit"}:
            rejected.labels(reason)
    ping_interval = settings.realtime_ping_interval_seconds

    def out(kind: str) -> Any:
        child = out_children.get(kind)
        if child is None:
            child = out_children[kind] = messages.labels("out", kind)
        return child

    async def authenticate(socket: WebSocket[Any, Any, Any]) -> tuple[AuthUser, MessageId | None]:
        user: AuthUser | None = socket.scope.get("user")
        last_raw = socket.query_params.get("last_id")
        if user is None and _has_authorization(socket):
            raise _Refused("unauthenticated", "the access token is invalid or expired")
        if user is None:
            try:
                raw = await asyncio.wait_for(socket.receive_data("text"), settings.realtime_auth_timeout_seconds)
            except TimeoutError:
                raise _Refused("auth_timeout", 'send {"type": "auth", "token": …} first') from None
            in_control.inc()
            try:
                hello = msgspec.json.decode(raw, type=_AuthMessage)
            except msgspec.ValidationError as exc:
                raise _Refused("bad_message", f"auth message: {exc}") from None
            except msgspec.DecodeError:
                raise _Refused("bad_message", "the first message must be a JSON object") from None
            if hello.type != "auth" or not hello.token:
                raise _Refused("bad_message", 'the first message must be {"type": "auth", "token": …}')
            try:
                user = tokens.decode(hello.token)
            except InvalidToken as exc:
                raise _Refused("unauthenticated", f"the access token is {exc.reason}") from None
            if hello.last_id is not None:
                last_raw = hello.last_id
        return user, _last_id(last_raw)

    def reauthenticate(session: _Session, text: str) -> bool:
        """If ``text`` is an in-band ``auth`` message: a valid token for the same user extends
        the session, any other token ends it. Other client messages change nothing."""
        try:
            message = msgspec.json.decode(text, type=_AuthMessage)
        except (msgspec.DecodeError, RecursionError):  # not an auth message: chatter, ignored
            return False
        if message.type != "auth":
            return False
        try:
            user = tokens.decode(message.token)
        except InvalidToken:
            session.refused = "unauthenticated"
            return True
        if user.id != session.user_id:
            session.refused = "unauthenticated"
        else:
            session.deadline = _deadline(user, session.leeway)
        return True

    async def receive_loop(
        socket: WebSocket[Any, Any, Any], conn: Connection, heard: list[float], session: _Session
    ) -> None:
        # To notice the client is alive or gone, and to take a fresh token; all else is ignored.
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                heard[0] = time.monotonic()
                in_control.inc()
                text = message.get("text")
                if isinstance(text, str) and reauthenticate(session, text):
                    conn.wake.set()
        conn.wake.set()

    async def send_loop(
        socket: WebSocket[Any, Any, Any],
        conn: Connection,
        receiver: asyncio.Task[None],
        heard: list[float],
        session: _Session,
    ) -> str | None:
        """Send until the client leaves (None) or must be closed (the reason)."""
        next_ping = time.monotonic() + ping_interval
        while True:
            if conn.slow:
                return "slow_consumer"
            if receiver.done():
                return None
            if conn.closing:
                return "going_away"
            if session.refused is not None:
                return session.refused
            if time.monotonic() >= session.deadline:
                return "token_expired"
            if conn.buffer:
                kind, text = conn.buffer.popleft()
                await socket.send_text(text)
                out(kind).inc()
                continue
            now = time.monotonic()
            if now >= next_ping:
                if now - heard[0] > 3 * ping_interval:
                    return "ping_timeout"
                await socket.send_text('{"type":"ping"}')
                out_control.inc()
                next_ping = now + ping_interval
                continue
            conn.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.wake.wait(), min(next_ping, session.deadline) - now)

    @websocket("/ws", name="realtime")
    async def realtime_socket(socket: WebSocket[Any, Any, Any]) -> None:
        """Live events, patterns, suggestions and workflow runs of the caller (see the module)."""
        await socket.accept()
        try:
            user, last_id = await authenticate(socket)
            if len(hub.connections.get(user.id, ())) >= settings.realtime_max_connections_per_user:
                raise _Refused("limit", "too many connections for this user")
        except _Refused as refused:
            rejected.labels(refused.reason).inc()
            trace.get_current_span().add_event("realtime.refused", {"reason": refused.reason})
            await socket.close(CLOSE_CODES[refused.reason], refused.detail[:120])
            return
        except WebSocketDisconnect:
            return
        with _tracer.start_as_current_span("realtime.connect", attributes={"realtime.resume": last_id is not None}):
            conn, history = await hub.connect(user.id, last_id)
        receiver: asyncio.Task[None] | None = None
        reason: str | None = None
        try:
            if history.gap:
                await socket.send_text('{"type":"resync"}')
                out_control.inc()
            for _mid, kind, text in history.frames:
                await socket.send_text(text)
                out(kind).inc()
            await socket.send_text(f'{{"type":"ready","resumed":{len(history.frames)}}}')
            out_control.inc()
            conn.go_live()
            heard = [time.monotonic()]
            session = _Session(user, tokens.leeway_seconds)
            receiver = asyncio.create_task(receive_loop(socket, conn, heard, session))
            reason = await send_loop(socket, conn, receiver, heard, session)
            if reason is not None:
                if reason != "going_away":
                    _log.info("realtime_connection_closed", reason=reason)
                await socket.close(CLOSE_CODES[reason], _CLOSE_DETAIL.get(reason, ""))
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass  # the client left mid-send: nothing to close
        finally:
            if receiver is not None:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiver
            await hub.disconnect(conn)

    return realtime_socket
