"""``GET /api/audit``: the caller's own audit entries, newest first.

Cursor pagination: ``?before=<id>&limit=50`` (``limit`` at most 200); the answer's
``next_before`` is the cursor of the next page, ``null`` on the last one. Entries appear once
the audit buffer has been flushed (``audit_flush_interval_seconds``, half a second by default).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException
from litestar.params import Parameter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import AuditLogEntry

__all__ = ["AuditItem", "AuditPage", "list_own_audit_entries"]

MAX_LIMIT = 200


class AuditItem(msgspec.Struct, frozen=True):
    """One entry as its actor sees it."""

    id: int
    entry_id: uuid.UUID
    occurred_at: datetime
    recorded_at: datetime
    action: str
    target_type: str | None
    target_id: str | None
    ip: str | None
    request_id: str | None
    trace_id: str | None
    details: dict[str, Any]


class AuditPage(msgspec.Struct, frozen=True):
    items: list[AuditItem]
    next_before: int | None
    """Pass as ``before`` for the next (older) page; null when there is none."""


@get("/api/audit", tags=["audit"])
async def list_own_audit_entries(
    request: Request[Any, Any, State],
    state: State,
    before: Annotated[int | None, Parameter(ge=1, le=2**63 - 1, description="Only entries older than this id.")] = None,
    limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT, description="Page size, at most 200.")] = 50,
) -> AuditPage:
    """The authenticated caller's audit entries (actions they performed), newest first."""
    user = request.scope.get("user")
    if user is None:
        raise NotAuthorizedException(
            "Authentication required: send an access token as 'Authorization: Bearer <token>'.",
            headers={"WWW-Authenticate": 'Bearer realm="vigil"'},
        )
    actor: uuid.UUID = user.id

    async def query(session: AsyncSession) -> list[AuditItem]:
        stmt = select(AuditLogEntry).where(AuditLogEntry.actor_user_id == actor)
        if before is not None:
            stmt = stmt.where(AuditLogEntry.id < before)
        rows = (await session.scalars(stmt.order_by(AuditLogEntry.id.desc()).limit(limit + 1))).all()
        return [
            AuditItem(
                r.id, r.entry_id, r.occurred_at, r.recorded_at, r.action, r.target_type, r.target_id,
                r.ip, r.request_id, r.trace_id, r.details,
            )
            for r in rows
        ]  # fmt: skip

    items = await state.vigil.db.read("audit_list", query)
    more = len(items) > limit
    items = items[:limit]
    return AuditPage(items=items, next_before=items[-1].id if more else None)
