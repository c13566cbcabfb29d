"""The event routes (authenticated; ``user`` is the caller).

``POST /api/events`` one event: **201** ``stored``, **200** ``duplicate`` (the event stored first
under that key), **202** ``deferred`` (the database write failed; the event is in the ``events``
dead-letter queue and will be written). Invalid: 400 naming the field.

``POST /api/events/batch`` a JSON list of events (at most ``events_batch_max_items``, body at
most ``events_batch_max_body_bytes``): **200** with one result per item, in order (``stored``,
``duplicate``, ``rejected`` with ``reason`` and ``field``, ``deferred``) and their counts; each
item is validated on its own, so a bad one never fails the others. A body that is not a JSON
list: 400 naming ``body``; too many items: 413 naming ``body``; too large: 413. When some items
could be neither written nor dead-lettered: **503** + ``Retry-After``, problem+json whose
``items`` still lists every result (those ``failed`` were not accepted: send them again).

Both answer **503** + ``Retry-After`` before any write while the ``events`` dead-letter queue
is deeper than ``events_backpressure_depth`` (backpressure: the backlog must drain first).

``GET /api/events?type=&source=&since=&until=&before=&limit=`` newest first; ``since``/``until``
bound ``occurred_at`` (inclusive/exclusive), ``before`` is the cursor (``next_before`` of the
previous page). Cached per user and query; a write bumps the user's cache version, so a writer
reads its own writes; served stale (``Vigil-Degraded: stale``) while the database is down.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter, QueryParameter
from opentelemetry import trace
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Event
from service.domain.auth.middleware import requires_user
from service.domain.events.schema import (
    EARLIEST_OCCURRED_AT,
    LATEST_OCCURRED_AT,
    BatchItemResult,
    BatchResult,
    EventIn,
    EventPage,
    IngestResult,
    ValidationFailure,
    decode_batch_item,
    occurred_at_out_of_range,
)
from service.domain.events.store import stored_from_rows
from service.guardrails.json_depth import check_json_depth
from service.problems import ServiceUnavailable, problem
from service.settings import Settings
from telemetry.logging import get_logger

if TYPE_CHECKING:
    from service.domain.events.component import EventsComponent

__all__ = ["event_routes", "version_key"]

MAX_LIMIT = 200
VERSION_TTL_SECONDS = 86_400.0
_log = get_logger("vigil.events")
_STATUS = {"stored": 201, "duplicate": 200, "deferred": 202}
_list_decoder = msgspec.json.Decoder(list[EventIn])


def _events(state: State) -> EventsComponent:
    return state.vigil.extensions["events"]  # type: ignore[no-any-return]


def _user_id(request: Request[Any, Any, Any]) -> uuid.UUID:
    return request.scope["user"].id  # type: ignore[no-any-return]  # requires_user ran


def version_key(user_id: uuid.UUID) -> str:
    """Cache key of the user's event-list version (invalidated by every write)."""
    return f"events:ver:{user_id}"


def _invalid(field: str, message: str) -> ValidationException:
    return ValidationException(message, extra=[{"key": field, "message": message, "source": "body"}])


async def create_event(request: Request[Any, Any, State], state: State) -> Response[IngestResult]:
    """Store one event (idempotent on ``idempotency_key``)."""
    # Decoded here rather than by Litestar: the same field paths as a batch item's (Litestar
    # names the whole body for a missing field).
    try:
        body = await request.body()
        check_json_depth(body)
        data = decode_batch_item(body, check_nul=True)
    except ValidationFailure as bad:
        raise _invalid(bad.field, bad.reason) from None
    except msgspec.DecodeError as exc:
        raise _invalid("body", f"must be a JSON object ({exc})") from None
    events = _events(state)
    events.backpressure.check()
    user = _user_id(request)
    (out,) = await events.writer.write(user, [data], "single")
    if out.status == "failed":
        raise ServiceUnavailable("The event could not be stored nor queued; send it again.", retry_after=5)
    if out.status == "stored":
        await state.vigil.cache.invalidate(version_key(user))
    result = IngestResult(status=out.status, event=out.event, dead_letter_id=out.dead_letter_id)
    return Response(result, status_code=_STATUS[out.status])


async def ingest_batch(request: Request[Any, Any, State], state: State) -> Response[Any]:
    """Store a list of events, answered per item (see the module docstring)."""
    events = _events(state)
    settings: Settings = state.vigil.settings
    body = await request.body()
    check_json_depth(body)
    check_nul = b"\\u0000" in body
    valid: list[EventIn] = []
    raw_items: list[msgspec.Raw] = []
    if not check_nul:
        # Fast path: the whole list in one call (about twice as fast as item by item); any
        # invalid item sends us to the per-item path, which names each bad item.
        try:
            valid = _list_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError):
            valid = []
        if any(e.occurred_at is not None and occurred_at_out_of_range(e) for e in valid):
            valid = []  # the per-item path names the bad items
    if not valid:
        try:
            raw_items = msgspec.json.decode(body, type=list[msgspec.Raw])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _invalid("body", f"must be a JSON list of events ({exc})") from None
    count = len(valid) or len(raw_items)
    if count > settings.events_batch_max_items:
        raise HTTPException(
            status_code=413,
            detail=f"body: at most {settings.events_batch_max_items} events per batch, got {count}",
            extra={"errors": [{"field": "body", "message": "too many events", "source": "body"}],
                   "max_items": settings.events_batch_max_items},
        )  # fmt: skip
    events.backpressure.check()
    results: list[BatchItemResult | None] = [None] * count
    where = list(range(len(valid)))
    rejected = 0
    for i, raw in enumerate(raw_items):
        try:
            valid.append(decode_batch_item(raw, check_nul=check_nul))
            where.append(i)
        except ValidationFailure as bad:
            rejected += 1
            key = _key_of(raw)
            results[i] = BatchItemResult(
                index=i, status="rejected", idempotency_key=key, reason=bad.reason, field=bad.field
            )
        except msgspec.DecodeError as bad:  # cannot happen for a Raw of a decoded list; kept total
            rejected += 1
            results[i] = BatchItemResult(index=i, status="rejected", reason=str(bad), field="$")
    events.writer.count("batch", "rejected", rejected)
    user = _user_id(request)
    outcomes = await events.writer.write(user, valid, "batch") if valid else []
    for i, e, out in zip(where, valid, outcomes, strict=True):
        results[i] = BatchItemResult(
            index=i, status=out.status, idempotency_key=e.idempotency_key,
            id=out.event.id if out.event is not None else None, reason=out.reason,
        )  # fmt: skip
    items = [r for r in results if r is not None]
    counts = dict.fromkeys(("stored", "duplicate", "rejected", "deferred", "failed"), 0)
    counts.update(Counter(r.status for r in items))
    if counts["stored"]:
        await state.vigil.cache.invalidate(version_key(user))
    if counts["failed"]:
        return problem(
            503,
            f"{counts['failed']} event(s) could not be stored nor queued (see items with status 'failed');"
            " send those again.",
            {"Retry-After": "5"},
            items=msgspec.to_builtins(items),
            counts=counts,
        )
    return Response(BatchResult(items=items, counts=counts), status_code=200)


def _key_of(raw: bytes) -> str | None:
    """The idempotency key of a rejected item, when it has a readable one (for the client)."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    key = obj.get("idempotency_key") if isinstance(obj, dict) else None
    return key if isinstance(key, str) else None


async def list_events(
    request: Request[Any, Any, State],
    state: State,
    event_type: Annotated[
        str | None, QueryParameter(name="type", max_length=200, description="Only this type.")
    ] = None,
    source: Annotated[str | None, Parameter(max_length=200, description="Only this source.")] = None,
    since: Annotated[datetime | None, Parameter(description="occurred_at >= since.")] = None,
    until: Annotated[datetime | None, Parameter(description="occurred_at < until.")] = None,
    before: Annotated[int | None, Parameter(ge=1, le=2**63 - 1, description="Only events older than this id.")] = None,
    limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT, description="Page size, at most 200.")] = 50,
) -> EventPage:
    """The caller's events, newest first, filtered, by cursor."""
    user = _user_id(request)
    cache = state.vigil.cache
    version = (await cache.get_or_load(version_key(user), lambda: _new_version(), ttl=VERSION_TTL_SECONDS)).value
    for name, at in (("since", since), ("until", until)):
        aware = at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at  # naive means UTC
        if aware is not None and not (EARLIEST_OCCURRED_AT <= aware < LATEST_OCCURRED_AT):
            message = "must lie between 1900-01-01 and 9000-01-01 (UTC)"
            raise ValidationException(message, extra=[{"key": name, "message": message, "source": "query"}])
    params = msgspec.json.encode([event_type, source, since, until, before, limit])
    key = f"events:list:{user}:{version}:{hashlib.sha256(params).hexdigest()[:32]}"

    async def query(session: AsyncSession) -> EventPage:
        stmt = select(Event).where(Event.user_id == user)
        if event_type is not None:
            stmt = stmt.where(Event.type == event_type)
        if source is not None:
            stmt = stmt.where(Event.source == source)
        if since is not None:
            stmt = stmt.where(Event.occurred_at >= since)
        if until is not None:
            stmt = stmt.where(Event.occurred_at < until)
        if before is not None:
            stmt = stmt.where(Event.id < before)
        rows = (await session.scalars(stmt.order_by(Event.id.desc()).limit(limit + 1))).all()
        items = stored_from_rows(rows)
        more = len(items) > limit
        items = items[:limit]
        return EventPage(items=items, next_before=items[-1].id if more else None)

    async def load() -> EventPage:
        return await state.vigil.db.read("events_list", query)  # type: ignore[no-any-return]

    return await state.vigil.reads.read(request, key, load, as_type=EventPage)  # type: ignore[no-any-return]


async def _new_version() -> str:
    return uuid.uuid4().hex


def event_routes(settings: Settings) -> list[HTTPRouteHandler]:
    """The route handlers, built per application (the batch body limit is a setting)."""
    guards = [requires_user]
    batch_limit = settings.events_batch_max_body_bytes
    return [
        post("/api/events", guards=guards, tags=["events"], status_code=201)(create_event),
        post("/api/events/batch", guards=guards, tags=["events"], request_max_body_size=batch_limit)(ingest_batch),
        get("/api/events", guards=guards, tags=["events"])(list_events),
    ]


class Backpressure:
    """Refuses new event writes while the ``events`` dead-letter queue is too deep (seed: the
    "queue backlog" failure mode): growing it without bound would only delay the outage."""

    def __init__(self, depth: Any, threshold: int, retry_after: int) -> None:
        self._depth, self.threshold, self.retry_after = depth, threshold, retry_after
        self.engaged = False

    def check(self) -> None:
        depth = self._depth()
        if depth <= self.threshold:
            if self.engaged:
                self.engaged = False
                _log.info("events_backpressure_released", depth=depth, threshold=self.threshold)
            return
        if not self.engaged:
            self.engaged = True
            _log.warning("events_backpressure_engaged", depth=depth, threshold=self.threshold)
        trace.get_current_span().add_event("events.backpressure", {"dlq_depth": depth, "threshold": self.threshold})
        raise ServiceUnavailable(
            f"The events dead-letter queue holds {depth} events (limit {self.threshold}); retry later.",
            retry_after=self.retry_after,
        )
