"""Authentication: who is calling, as ``scope["user"]``.

The contract other middleware (the rate limiter) and handlers rely on:

* ``Authorization: Bearer <valid access token>``: ``scope["user"]`` is an :class:`AuthUser`;
* no bearer token: ``scope["user"]`` is ``None`` (anonymous; each route decides, protected
  ones with the :func:`requires_user` guard);
* an invalid, expired or tampered token on an ``/api`` route: 401 problem+json with
  ``WWW-Authenticate: Bearer error="invalid_token"``, before the handler runs, counted in
  ``auth_events_total{event="access_token_expired"|"access_token_invalid"}`` and marked on the
  server span (``auth.token_rejected``).

Routes that must work with a stale access token attached (login, refresh, logout, register,
verify: a client whose access token expired is exactly who calls them) carry the handler
opt :data:`TOLERATE_INVALID_TOKEN`: there an invalid token only means anonymous, and is not
counted. So it is outside :data:`API_PREFIX`: in the admin API (its own bearer token) and on
the realtime socket (``/ws``, which refuses an invalid token with its own close code and
counts it in ``realtime_connections_rejected_total``). Routes outside the API as
:mod:`service.routing` defines it (health, ``/metrics``, the schema) do not pass this
middleware at all.

Verification is one HMAC and no I/O: no database lookup per request (revocation acts on
refresh tokens; an access token lives ``access_token_ttl_seconds`` at most).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send
from opentelemetry import trace

from service.domain.auth.tokens import AccessTokens, AuthUser, InvalidToken

__all__ = ["API_PREFIX", "REJECTION_REASONS", "TOLERATE_INVALID_TOKEN", "AuthenticationMiddleware", "requires_user"]

#: Handler opt: an invalid bearer token makes the caller anonymous instead of a 401.
TOLERATE_INVALID_TOKEN = "vigil_tolerate_invalid_token"
#: Paths under which a bearer token is Vigil's access token and an invalid one is refused (the
#: client API: a part of what ``service.routing.API_PREFIXES`` mounts this middleware on).
API_PREFIX = "/api/"

_AUTHENTICATED = frozenset({ScopeType.HTTP, ScopeType.WEBSOCKET})
_DESCRIPTIONS = {"expired": "The access token expired", "invalid": "The access token is invalid"}
#: Why a token is refused: ``auth_events_total{event="access_token_<reason>"}``.
REJECTION_REASONS = tuple(_DESCRIPTIONS)


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer`` header; None without one (other schemes too)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
            return None
    return None


def _strict(scope: Scope) -> bool:
    handler = scope.get("route_handler")
    if handler is not None and handler.opt.get(TOLERATE_INVALID_TOKEN):
        return False
    return scope["path"].startswith(API_PREFIX)


class AuthenticationMiddleware:
    """Sets ``scope["user"]`` from the bearer access token (see the module docstring), on HTTP
    and WebSocket scopes. A plain ASGI app (mounted with ``DefineMiddleware``) rather than
    Litestar's ``ASGIMiddleware``, whose per-request checks for excluded scopes, paths and opts,
    none of which Vigil uses, cost as much as the middleware's own work (D69)."""

    def __init__(self, app: ASGIApp, tokens: AccessTokens, rejections: Mapping[str, Any]) -> None:
        """``rejections``: the counter to increment per refusal reason (``expired``,
        ``invalid``), prometheus-client children of ``auth_events_total``."""
        self.app = app
        self.tokens = tokens
        self.rejections = rejections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _AUTHENTICATED:
            await self.app(scope, receive, send)
            return
        user: AuthUser | None = None
        token = _bearer(scope["headers"])
        if token is not None:
            try:
                user = self.tokens.decode(token)
            except InvalidToken as exc:
                if _strict(scope):
                    reason = exc.reason if exc.reason in _DESCRIPTIONS else "invalid"
                    self.rejections[reason].inc()
                    trace.get_current_span().add_event("auth.token_rejected", {"reason": reason})
                    description = _DESCRIPTIONS[reason]
                    raise NotAuthorizedException(
                        f"{description}; log in again or refresh it.",
                        headers={
                            "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'
                        },
                    ) from None
        scope["user"] = user
        await self.app(scope, receive, send)


async def requires_user(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: the route needs an authenticated caller (401 + ``WWW-Authenticate`` otherwise).

    A coroutine although it never awaits: Litestar runs a plain-function guard in its thread
    pool (``sync_to_thread``), a thread hop on every authenticated request (D60)."""
    if connection.scope.get("user") is None:
        raise NotAuthorizedException(
            "Authentication required: send an access token as 'Authorization: Bearer <token>'.",
            headers={"WWW-Authenticate": 'Bearer realm="vigil"'},
        )
