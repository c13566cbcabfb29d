"""Finding a user's patterns in SQL, set-based, over a bounded look-back window.

Both detectors read the same slice of events: the user's most recent ``max_events`` events that
occurred in the last ``lookback_days`` days, except Vigil's own (types starting ``vigil.``,
which suggested workflows emit: analysing them would suggest workflows about workflows).
Hours and days are UTC (users have no time zone yet).

**time_of_day.** The *observed span* is the days from the first to the last event of the
slice, inclusive.

- ``daily``: event type X occurred in hour H on at least ``min_days`` distinct days.
  support = occurrences of X in hour H; confidence = those distinct days / days in the span.
- ``weekly``: X occurred in hour H of weekday D on at least ``min_days`` distinct days and
  that weekday's confidence (distinct days / D-days in the span) is higher than the daily
  confidence of (X, H), so a daily habit does not also show up as seven weekly ones.

**sequence.** An A->B pair is an event of type A followed by an event of type B (B != A)
within ``window_minutes``. support = A events followed by at least one B within the window;
confidence = support / all A events = P(B within W | A). Kept when support >= ``min_support``.
The pairing is a hash join on time buckets of the window's width (an event's B candidates lie
in its own bucket or the next), so it costs O(events x events per two windows), not O(n^2).

Each detector keeps its ``MAX_PATTERNS`` best (confidence, then support).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["MAX_PATTERNS", "DetectConfig", "Found", "detect_sequences", "detect_time_of_day", "newest_event_id"]

MAX_PATTERNS = 200
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class DetectConfig:
    """Detection thresholds (from the ``patterns_*`` settings)."""

    lookback_days: int = 28
    max_events: int = 50_000
    min_days: int = 3
    window_minutes: int = 30
    min_support: int = 3


@dataclass(frozen=True)
class Found:
    """One detected pattern, ready for the ``patterns`` upsert."""

    kind: str
    signature: str
    description: str
    support: int
    confidence: float
    details: dict[str, Any]
    first_seen_at: datetime
    last_seen_at: datetime


_SLICE = """
    SELECT id, type, occurred_at, occurred_at AT TIME ZONE 'UTC' AS utc
    FROM events
    WHERE user_id = :user_id AND occurred_at >= :since AND type NOT LIKE 'vigil.%'
    ORDER BY occurred_at DESC
    LIMIT :max_events
"""

_TIME_OF_DAY = text(f"""
WITH ev AS MATERIALIZED ({_SLICE}),
span AS (SELECT min(utc)::date AS first_day, max(utc)::date AS last_day FROM ev),
daily AS (
    SELECT type, extract(hour FROM utc)::int AS hour, count(*) AS support,
           count(DISTINCT utc::date) AS days, min(occurred_at) AS first_seen, max(occurred_at) AS last_seen
    FROM ev GROUP BY 1, 2
),
weekday_days AS (
    SELECT extract(isodow FROM d)::int AS weekday, count(*) AS n
    FROM span, generate_series(span.first_day::timestamp, span.last_day::timestamp, interval '1 day') AS d
    GROUP BY 1
),
weekly AS (
    SELECT type, extract(isodow FROM utc)::int AS weekday, extract(hour FROM utc)::int AS hour,
           count(*) AS support, count(DISTINCT utc::date) AS days,
           min(occurred_at) AS first_seen, max(occurred_at) AS last_seen
    FROM ev GROUP BY 1, 2, 3
),
found AS (
    SELECT 'daily' AS granularity, d.type, NULL::int AS weekday, d.hour, d.support, d.days,
           (s.last_day - s.first_day + 1) AS observed, d.first_seen, d.last_seen
    FROM daily d CROSS JOIN span s
    WHERE d.days >= :min_days
    UNION ALL
    SELECT 'weekly', w.type, w.weekday, w.hour, w.support, w.days, wd.n, w.first_seen, w.last_seen
    FROM weekly w
    JOIN weekday_days wd USING (weekday)
    JOIN daily d ON d.type = w.type AND d.hour = w.hour
    CROSS JOIN span s
    WHERE w.days >= :min_days
      AND w.days::float8 / wd.n > d.days::float8 / (s.last_day - s.first_day + 1)
)
SELECT * FROM found
ORDER BY days::float8 / observed DESC, support DESC, type, hour, weekday
LIMIT {MAX_PATTERNS}
""")

_SEQUENCES = text(f"""
WITH ev AS MATERIALIZED (
    SELECT id, type, occurred_at,
           floor(extract(epoch FROM occurred_at)::float8 / CAST(:window_seconds AS float8))::bigint AS bucket
    FROM ({_SLICE}) s
),
a_counts AS (SELECT type, count(*) AS n FROM ev GROUP BY type),
pairs AS (
    SELECT a.id, a.type AS a_type, b.type AS b_type, a.occurred_at AS at,
           min(b.occurred_at - a.occurred_at) AS delay
    FROM ev a
    CROSS JOIN (VALUES (0), (1)) AS o(step)
    JOIN ev b ON b.bucket = a.bucket + o.step
    WHERE b.occurred_at > a.occurred_at AND b.occurred_at <= a.occurred_at + CAST(:window AS interval)
      AND b.type <> a.type
    GROUP BY a.id, a.type, b.type, a.occurred_at
)
SELECT p.a_type, p.b_type, count(*) AS support, c.n AS a_count, min(p.at) AS first_seen, max(p.at) AS last_seen,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM p.delay)) AS median_delay_seconds
FROM pairs p JOIN a_counts c ON c.type = p.a_type
GROUP BY p.a_type, p.b_type, c.n
HAVING count(*) >= :min_support
ORDER BY count(*)::float8 / c.n DESC, count(*) DESC, p.a_type, p.b_type
LIMIT {MAX_PATTERNS}
""")


def _slice_params(user_id: uuid.UUID, now: datetime, cfg: DetectConfig) -> dict[str, Any]:
    return {"user_id": user_id, "since": now - timedelta(days=cfg.lookback_days), "max_events": cfg.max_events}


async def newest_event_id(session: AsyncSession, user_id: uuid.UUID) -> int:
    """The user's highest event id (0 when none): what an analysis starting now will cover."""
    stmt = text("SELECT coalesce(max(id), 0) FROM events WHERE user_id = :user_id")
    return int((await session.execute(stmt, {"user_id": user_id})).scalar_one())


async def detect_time_of_day(
    session: AsyncSession, user_id: uuid.UUID, now: datetime, cfg: DetectConfig
) -> list[Found]:
    """Daily and weekly hour-of-day habits (see the module docstring)."""
    params = {**_slice_params(user_id, now, cfg), "min_days": cfg.min_days}
    found = []
    for r in (await session.execute(_TIME_OF_DAY, params)).mappings():
        hour = f"{r['hour']:02d}:00"
        details: dict[str, Any] = {
            "granularity": r["granularity"],
            "event_type": r["type"],
            "hour_utc": r["hour"],
            "days": r["days"],
            "observed_days": r["observed"],
        }
        if r["granularity"] == "daily":
            signature = f"daily:{r['type']}@{r['hour']:02d}"
            description = f"'{r['type']}' happens daily at {hour} UTC ({r['days']} of {r['observed']} days)"
        else:
            day = WEEKDAYS[r["weekday"] - 1]
            details["weekday"] = r["weekday"]
            signature = f"weekly:{r['type']}@{r['weekday']}:{r['hour']:02d}"
            description = f"'{r['type']}' happens on {day}s at {hour} UTC ({r['days']} of {r['observed']} {day}s)"
        found.append(
            Found(
                "time_of_day", signature, description, int(r["support"]), r["days"] / r["observed"], details,
                r["first_seen"], r["last_seen"],
            )
        )  # fmt: skip
    return found


async def detect_sequences(session: AsyncSession, user_id: uuid.UUID, now: datetime, cfg: DetectConfig) -> list[Found]:
    """Frequent A->B pairs within the window (see the module docstring)."""
    window = timedelta(minutes=cfg.window_minutes)
    params = {
        **_slice_params(user_id, now, cfg),
        "window": window,
        "window_seconds": window.total_seconds(),
        "min_support": cfg.min_support,
    }
    found = []
    for r in (await session.execute(_SEQUENCES, params)).mappings():
        a, b, support, a_count = r["a_type"], r["b_type"], int(r["support"]), int(r["a_count"])
        details = {
            "first_type": a,
            "then_type": b,
            "window_minutes": cfg.window_minutes,
            "first_count": a_count,
            "median_delay_seconds": float(r["median_delay_seconds"]),
        }
        description = f"'{b}' follows '{a}' within {cfg.window_minutes} minutes ({support} of {a_count} times)"
        signature = f"{a}->{b}@{cfg.window_minutes}m"
        confidence = support / a_count
        found.append(
            Found("sequence", signature, description, support, confidence, details, r["first_seen"], r["last_seen"])
        )
    return found
