"""``/api/integrations``: a user's integrations. Credentials go in, never come out.

    POST   /api/integrations        {kind, name, base_url, credentials}  -> 201 (409 name taken)
    GET    /api/integrations        the caller's integrations (cached; stale while PostgreSQL is down)
    GET    /api/integrations/{id}   one of them
    PATCH  /api/integrations/{id}   {credentials?, base_url?, name?}: new credentials reconnect it
    DELETE /api/integrations/{id}   -> 204

A body that does not match the schema is a 400 naming the field; credentials or a URL that do
not fit the kind are a 422 naming the field (``credentials.api_key``, ``base_url``...), and the
answer never echoes a value. Changes are audited (``integration.created`` / ``updated`` /
``credentials_replaced`` / ``deleted``, with kind and name, never credentials).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Router, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.params import FromPath, JSONBody
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.clientip import request_ip
from service.db.models import Integration
from service.domain.auth.middleware import requires_user
from service.domain.integrations.keyring import Keyring
from service.domain.integrations.service import (
    CredentialsInvalid,
    create_integration,
    parse_credentials,
    seal_credentials,
    validate_url,
)
from service.guardrails.json_depth import json_depth_guard

__all__ = ["IntegrationIn", "IntegrationOut", "IntegrationPatch", "build_router"]

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Unique per user.")]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]


class IntegrationIn(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["http_api_key", "oauth2"]
    name: Name
    base_url: Url
    credentials: dict[str, Any]


class IntegrationPatch(msgspec.Struct, forbid_unknown_fields=True):
    credentials: dict[str, Any] | None = None
    base_url: Url | None = None
    name: Name | None = None


class IntegrationOut(msgspec.Struct, frozen=True):
    """An integration as its owner sees it: status and expiry, never credentials."""

    id: uuid.UUID
    kind: str
    name: str
    base_url: str
    status: str
    token_expires_at: datetime | None
    last_refresh_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime


class IntegrationList(msgspec.Struct, frozen=True):
    items: list[IntegrationOut]


def _out(r: Integration) -> IntegrationOut:
    return IntegrationOut(
        r.id, r.kind, r.name, r.base_url, r.status, r.token_expires_at, r.last_refresh_at, r.last_error,
        r.created_at, r.updated_at,
    )  # fmt: skip


def _invalid(exc: CredentialsInvalid) -> ValidationException:
    return ValidationException(
        detail=f"Invalid input: {exc.field}", extra=[{"key": exc.field, "message": exc.message}], status_code=422
    )


def _user(request: Request[Any, Any, State]) -> uuid.UUID:
    user_id: uuid.UUID = request.scope["user"].id
    return user_id


def list_key(user_id: uuid.UUID) -> str:
    return f"integrations:list:{user_id}"


def _audit(state: State, request: Request[Any, Any, State], action: str, row: Integration) -> None:
    audit = state.vigil.extensions.get("audit")
    if audit is not None:
        audit.record(
            action, actor_user_id=row.user_id, target_type="integration", target_id=str(row.id),
            details={"kind": row.kind, "name": row.name},
            ip=request_ip(request.scope, state.vigil.settings.trusted_proxies),
        )  # fmt: skip


async def _own(session: AsyncSession, user_id: uuid.UUID, integration_id: uuid.UUID, lock: bool = False) -> Integration:
    stmt = select(Integration).where(Integration.id == integration_id, Integration.user_id == user_id)
    row = await session.scalar(stmt.with_for_update() if lock else stmt)
    if row is None:
        raise NotFoundException("No such integration.")
    return row


def _conflict(name: str) -> HTTPException:
    return HTTPException(status_code=409, detail=f"An integration named {name!r} already exists.")


@post("/", status_code=201, before_request=json_depth_guard)
async def create(
    request: Request[Any, Any, State],
    state: State,
    data: JSONBody[IntegrationIn],
    db_session: NamedDependency[AsyncSession],
    keyring: NamedDependency[Keyring],
) -> IntegrationOut:
    """Create an integration; its credentials are sealed before they reach the database."""
    user_id = _user(request)
    try:
        row = await create_integration(
            db_session, keyring, user_id=user_id, kind=data.kind, name=data.name, base_url=data.base_url,
            credentials=data.credentials, allow_private=state.vigil.settings.integrations_allow_private_networks,
        )  # fmt: skip
        await db_session.commit()
    except CredentialsInvalid as exc:
        raise _invalid(exc) from None
    except sa_exc.IntegrityError:
        await db_session.rollback()
        raise _conflict(data.name) from None
    await db_session.refresh(row)
    await state.vigil.cache.invalidate(list_key(user_id))
    _audit(state, request, "integration.created", row)
    return _out(row)


@get("/")
async def list_integrations(request: Request[Any, Any, State], state: State) -> IntegrationList:
    """The caller's integrations, by name."""
    user_id = _user(request)

    async def query(session: AsyncSession) -> list[IntegrationOut]:
        stmt = select(Integration).where(Integration.user_id == user_id).order_by(Integration.name)
        return [_out(r) for r in (await session.scalars(stmt)).all()]

    async def load() -> IntegrationList:
        return IntegrationList(await state.vigil.db.read("integrations_list", query))

    result: IntegrationList = await state.vigil.reads.read(request, list_key(user_id), load, as_type=IntegrationList)
    return result


@get("/{integration_id:uuid}")
async def get_integration(
    request: Request[Any, Any, State], state: State, integration_id: FromPath[uuid.UUID]
) -> IntegrationOut:
    """One of the caller's integrations."""
    user_id = _user(request)

    async def query(session: AsyncSession) -> IntegrationOut:
        return _out(await _own(session, user_id, integration_id))

    result: IntegrationOut = await state.vigil.db.read("integrations_get", query)
    return result


@patch("/{integration_id:uuid}", before_request=json_depth_guard)
async def update_integration(
    request: Request[Any, Any, State],
    state: State,
    integration_id: FromPath[uuid.UUID],
    data: JSONBody[IntegrationPatch],
    db_session: NamedDependency[AsyncSession],
    keyring: NamedDependency[Keyring],
) -> IntegrationOut:
    """Replace credentials (which reconnects a ``needs_reauth`` integration), base URL or name."""
    user_id = _user(request)
    allow_private = state.vigil.settings.integrations_allow_private_networks
    row = await _own(db_session, user_id, integration_id, lock=True)
    try:
        if data.base_url is not None:
            row.base_url = validate_url(data.base_url, "base_url", allow_private=allow_private)
        if data.name is not None:
            row.name = data.name
        if data.credentials is not None:
            seal_credentials(keyring, row, parse_credentials(row.kind, data.credentials, allow_private=allow_private))
            row.status, row.last_error = "active", None
        await db_session.commit()
    except CredentialsInvalid as exc:
        await db_session.rollback()
        raise _invalid(exc) from None
    except sa_exc.IntegrityError:
        await db_session.rollback()
        raise _conflict(data.name or "") from None
    await db_session.refresh(row)
    await state.vigil.cache.invalidate(list_key(user_id))
    _audit(state, request, "integration.credentials_replaced" if data.credentials else "integration.updated", row)
    return _out(row)


@delete("/{integration_id:uuid}", status_code=204)
async def delete_integration(
    request: Request[Any, Any, State],
    state: State,
    integration_id: FromPath[uuid.UUID],
    db_session: NamedDependency[AsyncSession],
) -> None:
    """Delete the integration and its sealed credentials."""
    user_id = _user(request)
    row = await _own(db_session, user_id, integration_id, lock=True)
    await db_session.delete(row)
    await db_session.commit()
    await state.vigil.cache.invalidate(list_key(user_id))
    _audit(state, request, "integration.deleted", row)


def build_router(keyring: Callable[[], Keyring]) -> Router:
    """The routes, with ``keyring`` (built on first use) as a dependency."""
    return Router(
        "/api/integrations",
        route_handlers=[create, list_integrations, get_integration, update_integration, delete_integration],
        guards=[requires_user],
        dependencies={"keyring": Provide(keyring, sync_to_thread=False)},
        tags=["integrations"],
    )
