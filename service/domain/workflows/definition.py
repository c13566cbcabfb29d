"""A workflow's definition: its steps and their compensations, parsed and checked with msgspec.

A definition is JSON::

    {"steps": [
       {"name": "notify", "kind": "http", "integration": "crm", "method": "POST", "path": "/hooks",
        "body": {"any": "json"}, "timeout_seconds": 10,
        "retry": {"max_attempts": 3, "backoff_seconds": 1.0}, "compensate": "undo_notify"},
       {"name": "wait", "kind": "delay", "seconds": 5},
       {"name": "emit", "kind": "emit_event", "event_type": "report.ready", "payload": {}},
       {"name": "mail", "kind": "email", "to": "a@example.com", "subject": "s", "body": "b"}],
     "compensations": [
       {"name": "undo_notify", "kind": "http", "integration": "crm", "method": "DELETE",
        "path": "/hooks/1"}]}

Defaults: ``timeout_seconds`` 30 (a ``delay`` step: its ``seconds`` plus 30), ``retry`` one
attempt (no retry; ``backoff_seconds`` 1.0, the base of full-jitter exponential backoff),
``compensate`` none, ``body`` none, ``payload`` ``{}``. Step names are unique across steps and
compensations; a ``compensate`` names an entry of ``compensations``; a compensation has no
``compensate`` of its own. An HTTP step's ``path`` is relative to the integration's base URL
(starts with ``/``, no scheme or host), so a definition cannot send credentials elsewhere.

:func:`parse_definition` raises :class:`DefinitionError` whose ``field`` names the bad field the
way a client wrote it, e.g. ``steps[2].compensate``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from croniter import CroniterBadDateError, croniter
from msgspec import Meta, Struct

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "DefinitionError",
    "DelayStep",
    "EmailStep",
    "EmitEventStep",
    "HttpStep",
    "RetryPolicy",
    "Step",
    "WorkflowDefinition",
    "definition_to_json",
    "following",
    "next_run_after",
    "parse_definition",
    "validate_schedule",
]

DEFAULT_TIMEOUT_SECONDS = 30.0
MIN_INTERVAL_SECONDS = 1
MAX_INTERVAL_SECONDS = 366 * 86400

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
Seconds = Annotated[float, Meta(gt=0, le=86400)]


class DefinitionError(ValueError):
    """A definition or schedule that cannot run; ``field`` is its path, e.g. ``steps[2].compensate``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RetryPolicy(Struct, frozen=True, forbid_unknown_fields=True):
    """How often a step is tried: full-jitter exponential backoff between attempts."""

    max_attempts: Annotated[int, Meta(ge=1, le=10)] = 1
    """Attempts in all (1: no retry)."""
    backoff_seconds: Annotated[float, Meta(ge=0, le=300)] = 1.0
    """Base of the backoff: attempt n waits a random time in [0, base * 2**(n-1)]."""


class _StepBase(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    name: Name
    timeout_seconds: Seconds | None = None
    """``None``: :data:`DEFAULT_TIMEOUT_SECONDS` (a delay: its seconds plus that)."""
    retry: RetryPolicy = RetryPolicy()
    compensate: Name | None = None

    @property
    def kind(self) -> str:
        return str(type(self).__struct_config__.tag)

    @property
    def timeout(self) -> float:
        """The time one attempt may take."""
        return self.timeout_seconds if self.timeout_seconds is not None else DEFAULT_TIMEOUT_SECONDS


class HttpStep(_StepBase, frozen=True, kw_only=True, tag="http"):
    """A call through one of the user's integrations (see ``service.domain.integrations.caller``)."""

    integration: Name
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: Annotated[str, Meta(min_length=1, max_length=2048, pattern=r"^/(?!/)")]
    body: Any = None


class DelayStep(_StepBase, frozen=True, kw_only=True, tag="delay"):
    """Wait ``seconds`` (the run keeps its lease meanwhile)."""

    seconds: Annotated[float, Meta(ge=0, le=86400)]

    @property
    def timeout(self) -> float:
        return self.timeout_seconds if self.timeout_seconds is not None else self.seconds + DEFAULT_TIMEOUT_SECONDS


class EmitEventStep(_StepBase, frozen=True, kw_only=True, tag="emit_event"):
    """Record an event for the workflow's owner (idempotent per run and step)."""

    event_type: Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")]
    """As the events API accepts it, e.g. ``report.ready``."""
    payload: dict[str, Any] = {}


class EmailStep(_StepBase, frozen=True, kw_only=True, tag="email"):
    """Queue a mail in the outbox (delivered by the worker's outbox sweep)."""

    to: Annotated[str, Meta(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
    subject: Annotated[str, Meta(max_length=998)]
    body: Annotated[str, Meta(max_length=100_000)]


Step = HttpStep | DelayStep | EmitEventStep | EmailStep


class WorkflowDefinition(Struct, frozen=True, forbid_unknown_fields=True):
    """The steps, run in order, and the compensations they may name."""

    steps: Annotated[list[Step], Meta(min_length=1, max_length=50)]
    compensations: Annotated[list[Step], Meta(max_length=50)] = []

    def compensation_for(self, step: Step) -> Step | None:
        """The compensation ``step`` names, if any."""
        if step.compensate is None:
            return None
        return next(c for c in self.compensations if c.name == step.compensate)


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED = re.compile(r"^Object (?:contains unknown|missing required) field `(?P<name>[^`]+)`$")


def _field_of(error: msgspec.ValidationError) -> tuple[str, str]:
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any text
    path = (match.group("path") or "").lstrip(".")
    message = match.group("message")
    named = _NAMED.match(message)
    if named is not None:  # name the field itself, not the object around it
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return path or "definition", message


def parse_definition(data: Any) -> WorkflowDefinition:
    """Check ``data`` (decoded JSON) and return the definition; :class:`DefinitionError` names
    the first bad field."""
    if not isinstance(data, dict):
        raise DefinitionError("definition", "Expected an object with `steps`")
    try:
        definition = msgspec.convert(data, WorkflowDefinition)
    except msgspec.ValidationError as exc:
        raise DefinitionError(*_field_of(exc)) from None
    seen: dict[str, str] = {}
    for section in ("steps", "compensations"):
        for i, step in enumerate(getattr(definition, section)):
            where = f"{section}[{i}]"
            if step.name in seen:
                raise DefinitionError(f"{where}.name", f"Duplicate step name {step.name!r} (also {seen[step.name]})")
            seen[step.name] = where
            limit = step.timeout_seconds
            if isinstance(step, DelayStep) and limit is not None and limit <= step.seconds:
                raise DefinitionError(f"{where}.timeout_seconds", "A delay's timeout must exceed its seconds")
    names = {c.name for c in definition.compensations}
    for i, comp in enumerate(definition.compensations):
        if comp.compensate is not None:
            raise DefinitionError(f"compensations[{i}].compensate", "A compensation cannot name a compensation")
    for i, step in enumerate(definition.steps):
        if step.compensate is not None and step.compensate not in names:
            raise DefinitionError(f"steps[{i}].compensate", f"No compensation named {step.compensate!r}")
    return definition


def definition_to_json(definition: WorkflowDefinition) -> dict[str, Any]:
    """The stored form: every default spelled out, ``kind`` first."""
    data: dict[str, Any] = msgspec.to_builtins(definition)
    return data


def validate_schedule(cron: str | None, interval_seconds: int | None) -> None:
    """A schedule is a cron expression (5 fields, or 6 with seconds last) or an interval, not
    both; :class:`DefinitionError` names the bad field."""
    if cron is not None and interval_seconds is not None:
        raise DefinitionError("schedule_cron", "Give schedule_cron or schedule_interval_seconds, not both")
    if cron is not None:
        fields = cron.split()
        if len(fields) not in (5, 6) or not croniter.is_valid(cron):
            raise DefinitionError("schedule_cron", f"Not a cron expression: {cron!r}")
        try:  # valid syntax that never fires ("0 0 31 2 *": February 31st) is no schedule
            croniter(cron, datetime.now(UTC)).get_next(datetime)
        except CroniterBadDateError:
            raise DefinitionError("schedule_cron", f"Never fires: {cron!r}") from None
    if interval_seconds is not None and not MIN_INTERVAL_SECONDS <= interval_seconds <= MAX_INTERVAL_SECONDS:
        raise DefinitionError(
            "schedule_interval_seconds", f"Must be between {MIN_INTERVAL_SECONDS} and {MAX_INTERVAL_SECONDS}"
        )


def next_run_after(cron: str | None, interval_seconds: int | None, after: datetime | None = None) -> datetime | None:
    """The next occurrence strictly after ``after`` (now by default, UTC); ``None`` without a schedule."""
    base = after or datetime.now(UTC)
    if cron is not None:
        nxt: datetime = croniter(cron, base).get_next(datetime)
        return nxt if nxt.tzinfo is not None else nxt.replace(tzinfo=UTC)
    if interval_seconds is not None:
        return base + timedelta(seconds=interval_seconds)
    return None


def following(cron: str | None, interval_seconds: int | None, previous: datetime, now: datetime) -> datetime | None:
    """The occurrence after ``previous`` that is still in the future at ``now``: occurrences
    missed while no scheduler ran are skipped (the one due fired; the rest coalesce into it).
    Intervals keep their phase (``previous + k * interval``)."""
    if interval_seconds is not None:
        step = timedelta(seconds=interval_seconds)
        missed = max(0, int((now - previous) / step))
        nxt = previous + step * (missed + 1)
        return nxt if nxt > now else nxt + step
    return next_run_after(cron, None, max(previous, now))
