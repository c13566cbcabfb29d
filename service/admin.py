"""Operator endpoints under ``/admin``, authorised by ``VIGIL_ADMIN_TOKEN`` (a bearer token;
unset disables them). Every change is logged."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from litestar import Controller, Request, get, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException, NotFoundException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody
from redis.exceptions import RedisError

from service.clientip import request_ip
from service.guardrails.breaker_admin import OVERRIDE_STATES
from service.problems import ServiceUnavailable

__all__ = ["AdminController"]


async def admin_token_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: ``Authorization: Bearer <VIGIL_ADMIN_TOKEN>`` (a coroutine: see ``requires_user``)."""
    token = connection.app.state.vigil.settings.admin_token
    if not token:
        raise PermissionDeniedException("The admin API is disabled: VIGIL_ADMIN_TOKEN is not set.")
    given = connection.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise NotAuthorizedException("A valid admin bearer token is required.", headers={"WWW-Authenticate": "Bearer"})


class BreakerOverride(msgspec.Struct, forbid_unknown_fields=True):
    state: str
    """forced_open, disabled or auto."""


class AdminController(Controller):
    path = "/admin"
    guards = [admin_token_guard]
    include_in_schema = True
    tags = ["admin"]

    @get("/breakers")
    async def list_breakers(self, state: State) -> list[dict[str, Any]]:
        """Every circuit breaker of this instance with its state and rates."""
        return state.vigil.breakers.snapshots()  # type: ignore[no-any-return]

    @put("/breakers/{name:str}")
    async def override_breaker(
        self, request: Request[Any, Any, Any], name: FromPath[str], data: JSONBody[BreakerOverride], state: State
    ) -> dict[str, Any]:
        """Force a breaker open, disable it, or return it to automatic (``auto``), on every instance."""
        registry = state.vigil.breakers
        if name not in registry.breakers:
            raise NotFoundException(f"No circuit breaker named {name!r}.")
        if data.state not in OVERRIDE_STATES:
            from litestar.exceptions import ValidationException

            raise ValidationException(
                f"state must be one of {', '.join(OVERRIDE_STATES)}",
                extra=[{"key": "state", "message": f"must be one of {', '.join(OVERRIDE_STATES)}", "source": "body"}],
            )
        try:
            await registry.set_override(name, data.state)
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable("Redis is unreachable, so the override cannot reach every instance.") from exc
        audit = state.vigil.extensions.get("audit")
        if audit is not None:  # absent only in apps built without the audit component
            ip = request_ip(request.scope, state.vigil.settings.trusted_proxies)
            audit.record(
                "admin.breaker_override",
                actor_user_id=None,  # the admin API authenticates a token, not a user
                target_type="breaker",
                target_id=name,
                details={"state": data.state},
                ip=ip,
            )
        return registry.breakers[name].snapshot()  # type: ignore[no-any-return]
