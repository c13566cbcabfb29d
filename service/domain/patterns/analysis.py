"""One user's pattern analysis: detect, upsert ``patterns``, create ``suggestions``, in one
transaction.

- Two analyses of one user never interleave: the transaction takes a transaction-level advisory
  lock on the user first (a debounced job and a follow-up or a replay may overlap).
- ``patterns`` are upserted by ``(user_id, kind, signature)``; a pattern not found again keeps
  its last values (its ``updated_at`` says when it was last confirmed): deleting it would delete
  its suggestions, and with them the memory of a dismissal.
- A pattern with support >= ``suggest_min_support`` and confidence >= ``suggest_min_confidence``
  gets a suggestion unless it ever had one (open, accepted or dismissed): one open suggestion
  per pattern, and a dismissed one is never proposed again.

Everything is recomputed from the events, so running an analysis twice is harmless: jobs,
follow-ups and dead-letter replays are idempotent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import Pattern, Suggestion
from service.domain.patterns.detect import DetectConfig, Found, detect_sequences, detect_time_of_day, newest_event_id
from service.domain.patterns.suggest import suggestion_for
from service.settings import Settings

__all__ = ["AnalysisConfig", "AnalysisResult", "analyse_user", "analysis_config"]


@dataclass(frozen=True)
class AnalysisConfig:
    """Detection thresholds and when a pattern is strong enough for a suggestion."""

    detect: DetectConfig = field(default_factory=DetectConfig)
    suggest_min_support: int = 5
    suggest_min_confidence: float = 0.6


def analysis_config(s: Settings) -> AnalysisConfig:
    return AnalysisConfig(
        detect=DetectConfig(
            lookback_days=s.patterns_lookback_days,
            max_events=s.patterns_max_events,
            min_days=s.patterns_min_days,
            window_minutes=s.patterns_sequence_window_minutes,
            min_support=s.patterns_min_support,
        ),
        suggest_min_support=s.patterns_suggest_min_support,
        suggest_min_confidence=s.patterns_suggest_min_confidence,
    )


@dataclass
class AnalysisResult:
    """What one analysis found and changed."""

    newest_event_id: int = 0
    """The user's newest event when the analysis started: events after it were maybe not seen."""
    patterns: int = 0
    suggestions: dict[str, int] = field(default_factory=dict)
    """Suggestions created, by pattern kind."""
    created: list[dict[str, object]] = field(default_factory=list)
    """The suggestions created (``id``, ``pattern_id``, ``title``), for real-time delivery."""


async def analyse_user(
    sessionmaker: async_sessionmaker[AsyncSession], user_id: uuid.UUID, cfg: AnalysisConfig, now: datetime | None = None
) -> AnalysisResult:
    """One attempt at analysing ``user_id``'s events (see the module docstring)."""
    now = now or datetime.now(UTC)
    async with sessionmaker() as session, session.begin():
        lock = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
        await session.execute(lock, {"key": f"patterns:{user_id}"})
        result = AnalysisResult(newest_event_id=await newest_event_id(session, user_id))
        found = await detect_time_of_day(session, user_id, now, cfg.detect)
        found += await detect_sequences(session, user_id, now, cfg.detect)
        result.patterns = len(found)
        ids = await _upsert(session, user_id, found)
        strong = [
            (ids[f.signature, f.kind], f)
            for f in found
            if f.support >= cfg.suggest_min_support and f.confidence >= cfg.suggest_min_confidence
        ]
        for kind, row in await _suggest(session, user_id, strong):
            result.suggestions[kind] = result.suggestions.get(kind, 0) + 1
            result.created.append({"id": row["id"], "pattern_id": row["pattern_id"], "title": row["title"]})
    return result


async def _upsert(session: AsyncSession, user_id: uuid.UUID, found: list[Found]) -> dict[tuple[str, str], uuid.UUID]:
    if not found:
        return {}
    rows = [
        {
            "user_id": user_id, "kind": f.kind, "signature": f.signature, "description": f.description,
            "support": f.support, "confidence": f.confidence, "details": f.details,
            "first_seen_at": f.first_seen_at, "last_seen_at": f.last_seen_at,
        }
        for f in found
    ]  # fmt: skip
    values = insert(Pattern).values(rows)
    new = values.excluded
    stmt = values.on_conflict_do_update(
        index_elements=[Pattern.user_id, Pattern.kind, Pattern.signature],
        set_={
            "description": new.description,
            "support": new.support,
            "confidence": new.confidence,
            "details": new.details,
            "first_seen_at": func.least(Pattern.first_seen_at, new.first_seen_at),
            "last_seen_at": new.last_seen_at,
            "updated_at": func.now(),
        },
    ).returning(Pattern.id, Pattern.signature, Pattern.kind)
    return {(r.signature, r.kind): r.id for r in await session.execute(stmt)}


async def _suggest(
    session: AsyncSession, user_id: uuid.UUID, strong: list[tuple[uuid.UUID, Found]]
) -> list[tuple[str, dict[str, Any]]]:
    """Insert a suggestion for each strong pattern that never had one; ``(kind, row)`` of each."""
    if not strong:
        return []
    ever = select(Suggestion.pattern_id).where(Suggestion.pattern_id.in_([i for i, _ in strong]))
    had = set(await session.scalars(ever))
    created: list[tuple[str, dict[str, Any]]] = []
    for pattern_id, f in strong:
        if pattern_id in had:
            continue
        title, definition = suggestion_for(f.kind, f.signature, f.details)
        created.append(
            (f.kind, {"id": uuid.uuid4(), "user_id": user_id, "pattern_id": pattern_id, "title": title,
                      "workflow_definition": definition, "status": "open"})
        )  # fmt: skip
    if created:
        await session.execute(insert(Suggestion).values([row for _, row in created]))
    return created
