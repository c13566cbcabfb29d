"""The shapes of events: what a client sends (:class:`EventIn`), what is stored
(:class:`StoredEvent`), and the answers of the ingest and list routes.

Validation is msgspec's, plus one check msgspec cannot know about: PostgreSQL refuses the NUL
character in ``text`` and ``jsonb`` alike, so a string holding ``\\u0000`` anywhere in an event
is rejected here, naming its field, instead of failing the database write later.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "BatchItemResult",
    "BatchResult",
    "EventIn",
    "EventPage",
    "IngestResult",
    "ItemStatus",
    "StoredEvent",
    "ValidationFailure",
    "decode_batch_item",
    "nul_field",
]

Key = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
EventType = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

ItemStatus = Literal["stored", "duplicate", "rejected", "deferred", "failed"]
"""Per-item outcome: ``stored`` (new), ``duplicate`` (its idempotency key was stored before:
nothing written), ``rejected`` (invalid: ``reason`` and ``field`` say why), ``deferred`` (the
database write failed: kept in the ``events`` dead-letter queue and written by the replayer),
``failed`` (NOT accepted: the database and the dead-letter queue were both unusable; send again)."""


class EventIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One event as a client sends it."""

    idempotency_key: Key
    """The client's unique key for this event: sending it again never stores it twice."""
    type: EventType
    """What happened, e.g. ``invoice.paid`` (letters, digits, ``_ . : / -``)."""
    source: Source | None = None
    """Where it came from (free text), e.g. ``billing``."""
    payload: dict[str, Any] = {}
    """Any JSON object."""
    occurred_at: AwareDatetime | None = None
    """When it happened, with a time zone; default: when Vigil received it."""


class StoredEvent(msgspec.Struct, kw_only=True):
    """An event as stored (the listeners' and the list route's shape)."""

    id: int
    idempotency_key: str
    type: str
    source: str | None
    payload: dict[str, Any]
    occurred_at: datetime
    received_at: datetime


class IngestResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The answer to ``POST /api/events``: 201 stored, 200 duplicate, 202 deferred."""

    status: ItemStatus
    event: StoredEvent | None = None
    """The stored event (for a duplicate, the one stored first under this key)."""
    dead_letter_id: str | None = None
    """For ``deferred``: the dead-letter entry that holds it."""


class BatchItemResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The outcome of one item of a batch, in the order sent."""

    index: int
    status: ItemStatus
    idempotency_key: str | None = None
    id: int | None = None
    """The event's id (stored or duplicate)."""
    reason: str | None = None
    """For ``rejected`` and ``failed``: why."""
    field: str | None = None
    """For ``rejected``: the offending field, as a path (``occurred_at``, ``payload.a``, ``$``)."""


class BatchResult(msgspec.Struct, kw_only=True):
    """The answer to ``POST /api/events/batch``: per-item outcomes and their counts."""

    items: list[BatchItemResult]
    counts: dict[str, int]


class EventPage(msgspec.Struct, kw_only=True):
    """One page of ``GET /api/events``, newest first."""

    items: list[StoredEvent]
    next_before: int | None
    """Pass as ``before`` for the next (older) page; null on the last one."""


class ValidationFailure(Exception):
    """An item that is not a valid event: ``field`` (a path) and ``reason``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


_MISSING = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`$")
_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _path(raw: str) -> str:
    """msgspec's ``$.a.b[0]`` as ``a.b[0]``; the item itself as ``$``."""
    return raw.lstrip(".") or "$"


def nul_field(event: EventIn) -> str | None:
    """The path of the first string holding a NUL character (PostgreSQL refuses it), if any."""
    for name in ("idempotency_key", "type", "source"):
        value = getattr(event, name)
        if value is not None and "\x00" in value:
            return name
    return _nul_in(event.payload, "payload")


def _nul_in(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                return path
            found = _nul_in(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_in(v, f"{path}[{i}]")
            if found:
                return found
    return None


_decoder = msgspec.json.Decoder(EventIn)

EARLIEST_OCCURRED_AT = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_OCCURRED_AT = datetime(9000, 1, 1, tzinfo=UTC)
"""``occurred_at`` must lie in [1900, 9000): PostgreSQL stores years up to 294276, but a value
near year 1 or 9999 in another time zone is a UTC instant Python (and asyncpg) cannot
represent, and every later read of that user's events would fail."""


def occurred_at_out_of_range(event: EventIn) -> bool:
    """True when the event's ``occurred_at`` lies outside the accepted range."""
    at = event.occurred_at
    return at is not None and not (EARLIEST_OCCURRED_AT <= at < LATEST_OCCURRED_AT)


def decode_batch_item(raw: bytes, *, check_nul: bool) -> EventIn:
    """Decode and validate one item of a batch; :class:`ValidationFailure` names the field.
    ``check_nul``: look for NUL characters (only needed when the body contains ``\\u0000``)."""
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        assert m is not None  # the pattern matches any text
        path, reason = _path(m.group("path") or ""), m.group("reason")
        missing = _MISSING.match(reason)
        if missing:  # name the field itself, not the object lacking it
            path = missing.group(1) if path == "$" else f"{path}.{missing.group(1)}"
        raise ValidationFailure(path, reason) from None
    if check_nul:
        bad = nul_field(event)
        if bad:
            raise ValidationFailure(bad, "contains a NUL character (\\u0000), which PostgreSQL cannot store")
    if occurred_at_out_of_range(event):
        raise ValidationFailure("occurred_at", "must be between 1900-01-01 and 9000-01-01 (UTC)")
    return event
