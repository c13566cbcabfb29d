"""What Vigil proposes for a strong pattern: a workflow definition (the workflows contract), a
title and, for a time-of-day pattern, a schedule.

- ``time_of_day`` (X usually happens at hour H, daily or on weekday D): a workflow scheduled at
  the start of that hour (``0 H * * *``, or ``0 H * * D``) whose one step emits a
  ``vigil.reminder`` event naming X; the user edits it into what they do at that hour.
- ``sequence`` (B usually follows A within W minutes): an unscheduled workflow (run on demand)
  whose one step emits a ``vigil.follow_up`` event naming A and B.

The schedule is not part of the stored definition (the contract has no schedule in it): it is
derived from the pattern's details by :func:`proposed_schedule`, shown with the suggestion and
given to ``create_workflow`` on accept. Events of types ``vigil.*`` are not analysed, so what
these workflows emit never becomes a pattern itself.
"""

from __future__ import annotations

from typing import Any

from service.domain.patterns.detect import WEEKDAYS

__all__ = ["proposed_schedule", "suggestion_for"]


def proposed_schedule(kind: str, details: dict[str, Any]) -> str | None:
    """The cron schedule (UTC) proposed for a pattern, or None (run on demand)."""
    if kind != "time_of_day":
        return None
    hour = int(details["hour_utc"])
    if details.get("granularity") == "weekly":
        return f"0 {hour} * * {int(details['weekday']) % 7}"  # ISO Monday=1..Sunday=7 -> cron Sunday=0
    return f"0 {hour} * * *"


def suggestion_for(kind: str, signature: str, details: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(title, workflow definition) proposed for a pattern."""
    if kind == "time_of_day":
        event_type, hour = details["event_type"], int(details["hour_utc"])
        when = "daily" if details.get("granularity") != "weekly" else f"on {WEEKDAYS[int(details['weekday']) - 1]}s"
        title = f"Remind me of '{event_type}' {when} at {hour:02d}:00 UTC"
        step = {
            "name": "remind",
            "kind": "emit_event",
            "event_type": "vigil.reminder",
            "payload": {"pattern": signature, "event_type": event_type, "hour_utc": hour},
        }
    else:
        first, then, minutes = details["first_type"], details["then_type"], int(details["window_minutes"])
        title = f"Follow up '{first}' with '{then}'"
        step = {
            "name": "follow_up",
            "kind": "emit_event",
            "event_type": "vigil.follow_up",
            "payload": {"pattern": signature, "after": first, "expected": then, "within_minutes": minutes},
        }
    return title[:200], {"steps": [step]}
