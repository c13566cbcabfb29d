"""The patterns API: the caller's patterns and workflow suggestions, accept and dismiss.

- ``GET /api/patterns?kind=`` (``time_of_day``, ``sequence``; default both): best first.
- ``GET /api/suggestions?status=`` (``open`` by default, ``accepted``, ``dismissed``, ``all``):
  newest first, each with its pattern's kind, support and confidence and the proposed schedule.
- ``POST /api/suggestions/{id}/accept``: creates the workflow (definition and schedule of the
  suggestion) and marks the suggestion accepted, in one transaction; accepting again answers
  the same workflow. 409 for a dismissed suggestion.
- ``POST /api/suggestions/{id}/dismiss``: hides it for good (the analysis never proposes that
  pattern again); dismissing twice is a no-op. 409 for an accepted one.

Another user's suggestion is a 404. Reads go through ``state.vigil.reads`` (cached per user and
query, stale with ``Vigil-Degraded: stale`` while the database is down); the worker's analyses
and these writes invalidate the user's keys (:func:`read_keys`), so a client reads its writes.
Both writes are audited (``suggestion.accepted``, ``suggestion.dismissed``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Router, get, post
from litestar.datastructures import State
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, Parameter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.clientip import request_ip
from service.db.models import Pattern, Suggestion
from service.domain.auth.middleware import requires_user
from service.domain.patterns.suggest import proposed_schedule
from telemetry.logging import get_logger

__all__ = [
    "AcceptResult",
    "PatternItem",
    "PatternList",
    "SuggestionItem",
    "SuggestionList",
    "build_router",
    "read_keys",
]

_log = get_logger("vigil.patterns")
AnyRequest = Request[Any, Any, State]
Kind = Literal["time_of_day", "sequence"]
Status = Literal["open", "accepted", "dismissed", "all"]
_KINDS: tuple[str, ...] = ("time_of_day", "sequence", "all")
_STATUSES: tuple[str, ...] = ("open", "accepted", "dismissed", "all")


def read_keys(user_id: uuid.UUID) -> list[str]:
    """Every cache key of ``user_id``'s reads (one per query a route accepts)."""
    return [f"patterns:{user_id}:{k}" for k in _KINDS] + [f"suggestions:{user_id}:{s}" for s in _STATUSES]


class PatternItem(msgspec.Struct, frozen=True):
    id: uuid.UUID
    kind: str
    signature: str
    description: str
    support: int
    confidence: float
    details: dict[str, Any]
    first_seen_at: datetime
    last_seen_at: datetime
    updated_at: datetime
    """When an analysis last confirmed it."""


class PatternList(msgspec.Struct, frozen=True):
    items: list[PatternItem]


class SuggestionItem(msgspec.Struct, frozen=True):
    id: uuid.UUID
    pattern_id: uuid.UUID
    pattern_kind: str
    pattern_description: str
    support: int
    confidence: float
    title: str
    status: str
    workflow_definition: dict[str, Any]
    schedule_cron: str | None
    """The proposed schedule (cron, UTC) the workflow gets on accept; null: run on demand."""
    workflow_id: uuid.UUID | None
    created_at: datetime
    decided_at: datetime | None


class SuggestionList(msgspec.Struct, frozen=True):
    items: list[SuggestionItem]


class AcceptResult(msgspec.Struct, frozen=True):
    suggestion: SuggestionItem
    workflow_id: uuid.UUID


def _pattern_item(p: Pattern) -> PatternItem:
    return PatternItem(
        p.id, p.kind, p.signature, p.description, p.support, p.confidence, p.details,
        p.first_seen_at, p.last_seen_at, p.updated_at,
    )  # fmt: skip


def _suggestion_item(s: Suggestion, p: Pattern) -> SuggestionItem:
    return SuggestionItem(
        s.id, s.pattern_id, p.kind, p.description, p.support, p.confidence, s.title, s.status,
        s.workflow_definition, proposed_schedule(p.kind, p.details), s.workflow_id, s.created_at, s.decided_at,
    )  # fmt: skip


def _user_id(request: AnyRequest) -> uuid.UUID:
    user_id: uuid.UUID = request.scope["user"].id  # the guard made sure there is one
    return user_id


@get("/patterns")
async def list_patterns(
    request: AnyRequest,
    state: State,
    kind: Annotated[Kind | None, Parameter(description="Only patterns of this kind.")] = None,
) -> PatternList:
    """The caller's patterns, highest confidence first."""
    user_id = _user_id(request)

    async def query(session: AsyncSession) -> PatternList:
        stmt = select(Pattern).where(Pattern.user_id == user_id)
        if kind is not None:
            stmt = stmt.where(Pattern.kind == kind)
        stmt = stmt.order_by(Pattern.confidence.desc(), Pattern.support.desc(), Pattern.signature)
        return PatternList([_pattern_item(p) for p in (await session.scalars(stmt)).all()])

    async def load() -> PatternList:
        result: PatternList = await state.vigil.db.read("patterns_list", query)
        return result

    key = f"patterns:{user_id}:{kind or 'all'}"
    answer: PatternList = await state.vigil.reads.read(request, key, load, as_type=PatternList)
    return answer


@get("/suggestions")
async def list_suggestions(
    request: AnyRequest,
    state: State,
    status: Annotated[Status, Parameter(description="open (default), accepted, dismissed or all.")] = "open",
) -> SuggestionList:
    """The caller's workflow suggestions, newest first."""
    user_id = _user_id(request)

    async def query(session: AsyncSession) -> SuggestionList:
        stmt = select(Suggestion, Pattern).join(Pattern, Pattern.id == Suggestion.pattern_id)
        stmt = stmt.where(Suggestion.user_id == user_id)
        if status != "all":
            stmt = stmt.where(Suggestion.status == status)
        stmt = stmt.order_by(Suggestion.created_at.desc(), Suggestion.id)
        return SuggestionList([_suggestion_item(s, p) for s, p in await session.execute(stmt)])

    async def load() -> SuggestionList:
        result: SuggestionList = await state.vigil.db.read("suggestions_list", query)
        return result

    key = f"suggestions:{user_id}:{status}"
    answer: SuggestionList = await state.vigil.reads.read(request, key, load, as_type=SuggestionList)
    return answer


async def _locked(session: AsyncSession, user_id: uuid.UUID, suggestion_id: uuid.UUID) -> tuple[Suggestion, Pattern]:
    stmt = (
        select(Suggestion, Pattern)
        .join(Pattern, Pattern.id == Suggestion.pattern_id)
        .where(Suggestion.id == suggestion_id, Suggestion.user_id == user_id)
        .with_for_update(of=Suggestion)
    )
    row = (await session.execute(stmt)).one_or_none()
    if row is None:
        raise NotFoundException(f"No suggestion {suggestion_id} of yours.")
    return row


def _conflict(detail: str) -> ClientException:
    return ClientException(detail, status_code=409)


async def _after_write(request: AnyRequest, action: str, user_id: uuid.UUID, target: uuid.UUID, **details: Any) -> None:
    resources = request.app.state.vigil
    for key in read_keys(user_id):
        await resources.cache.invalidate(key)
    audit = resources.extensions.get("audit")
    ip = request_ip(request.scope, resources.settings.trusted_proxies)
    if audit is None:
        _log.warning("audit_unavailable", action=action, ip=ip, target_id=str(target))
        return
    try:
        audit.record(
            action, actor_user_id=user_id, target_type="suggestion", target_id=str(target), details=details, ip=ip
        )
    except Exception:  # the recorder never raises; a broken one must not fail the write
        _log.exception("audit_record_failed", action=action)


@post("/suggestions/{suggestion_id:uuid}/accept", status_code=200)
async def accept_suggestion(request: AnyRequest, state: State, suggestion_id: FromPath[uuid.UUID]) -> AcceptResult:
    """Create the suggested workflow (idempotent: accepting again answers the same workflow)."""
    from service.domain.workflows.service import create_workflow  # the workflows domain, loaded on use

    user_id = _user_id(request)
    async with state.vigil.db.session() as session, session.begin():
        suggestion, pattern = await _locked(session, user_id, suggestion_id)
        if suggestion.status == "dismissed":
            raise _conflict("This suggestion was dismissed; it cannot be accepted.")
        created = suggestion.status == "open" or suggestion.workflow_id is None
        if created:
            workflow = await create_workflow(
                session,
                user_id=user_id,
                name=suggestion.title,
                definition=suggestion.workflow_definition,
                description=pattern.description,
                schedule_cron=proposed_schedule(pattern.kind, pattern.details),
            )
            suggestion.status, suggestion.workflow_id = "accepted", workflow.id
            suggestion.decided_at = datetime.now(UTC)
        workflow_id = suggestion.workflow_id
        assert workflow_id is not None
        item = _suggestion_item(suggestion, pattern)
    if created:
        from service.domain.workflows.routes import version_key

        # The new workflow shows in the user's cached workflow list at once.
        await state.vigil.cache.invalidate(version_key(user_id))
        await _after_write(request, "suggestion.accepted", user_id, suggestion_id, workflow_id=str(workflow_id))
    return AcceptResult(item, workflow_id)


@post("/suggestions/{suggestion_id:uuid}/dismiss", status_code=200)
async def dismiss_suggestion(request: AnyRequest, state: State, suggestion_id: FromPath[uuid.UUID]) -> SuggestionItem:
    """Hide the suggestion for good (dismissing again changes nothing)."""
    user_id = _user_id(request)
    async with state.vigil.db.session() as session, session.begin():
        suggestion, pattern = await _locked(session, user_id, suggestion_id)
        if suggestion.status == "accepted":
            raise _conflict("This suggestion was accepted; delete its workflow instead.")
        changed = suggestion.status == "open"
        if changed:
            suggestion.status, suggestion.decided_at = "dismissed", datetime.now(UTC)
        item = _suggestion_item(suggestion, pattern)
    if changed:
        await _after_write(request, "suggestion.dismissed", user_id, suggestion_id)
    return item


def build_router() -> Router:
    """The routes under ``/api``, each requiring an authenticated caller."""
    return Router(
        "/api",
        route_handlers=[list_patterns, list_suggestions, accept_suggestion, dismiss_suggestion],
        guards=[requires_user],
        tags=["patterns"],
    )
