"""Workflow definitions: what parses, what is refused, and which field a refusal names."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from service.domain.workflows.definition import (
    DEFAULT_TIMEOUT_SECONDS,
    DefinitionError,
    DelayStep,
    EmailStep,
    EmitEventStep,
    HttpStep,
    definition_to_json,
    next_run_after,
    parse_definition,
    validate_schedule,
)

FULL: dict[str, Any] = {
    "steps": [
        {
            "name": "notify", "kind": "http", "integration": "crm", "method": "POST", "path": "/hooks",
            "body": {"any": "json"}, "timeout_seconds": 10,
            "retry": {"max_attempts": 3, "backoff_seconds": 1.0}, "compensate": "undo_notify",
        },
        {"name": "wait", "kind": "delay", "seconds": 5},
        {"name": "emit", "kind": "emit_event", "event_type": "report.ready", "payload": {}},
        {"name": "mail", "kind": "email", "to": "a@example.com", "subject": "s", "body": "b"},
    ],
    "compensations": [
        {"name": "undo_notify", "kind": "http", "integration": "crm", "method": "DELETE", "path": "/hooks/1"}
    ],
}  # fmt: skip


def _steps(*steps: dict[str, Any], compensations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"steps": list(steps), "compensations": compensations or []}


def test_the_contract_example_parses_into_typed_steps_with_defaults() -> None:
    """The brief's example parses: each kind its own struct, defaults applied (no retry, 30 s
    timeout, a delay's timeout its seconds plus 30), and the compensation found by name."""
    d = parse_definition(FULL)
    assert [type(s) for s in d.steps] == [HttpStep, DelayStep, EmitEventStep, EmailStep]
    assert [s.kind for s in d.steps] == ["http", "delay", "emit_event", "email"]
    notify, wait, emit, _ = d.steps
    assert notify.timeout == 10 and notify.retry.max_attempts == 3
    assert wait.timeout == 5 + DEFAULT_TIMEOUT_SECONDS and wait.retry.max_attempts == 1
    assert emit.timeout == DEFAULT_TIMEOUT_SECONDS
    assert d.compensation_for(notify) is d.compensations[0]
    assert d.compensation_for(wait) is None


def test_the_stored_form_round_trips() -> None:
    """``definition_to_json`` spells out every default, and parsing it again gives the same definition."""
    d = parse_definition(FULL)
    stored = definition_to_json(d)
    assert stored["steps"][1] == {
        "kind": "delay", "name": "wait", "timeout_seconds": None,
        "retry": {"max_attempts": 1, "backoff_seconds": 1.0}, "compensate": None, "seconds": 5.0,
    }  # fmt: skip
    assert parse_definition(stored) == d


@pytest.mark.parametrize(
    ("definition", "field"),
    [
        (_steps({"name": "a", "kind": "delay", "seconds": 1}, {"name": "b", "kind": "delay", "seconds": 1},
                {"name": "c", "kind": "delay", "seconds": 1, "compensate": "nope"}), "steps[2].compensate"),
        (_steps({"name": "a", "kind": "teleport"}), "steps[0].kind"),
        (_steps({"name": "a", "kind": "delay", "seconds": "x"}), "steps[0].seconds"),
        (_steps({"name": "a", "kind": "delay"}), "steps[0].seconds"),
        (_steps({"name": "a", "kind": "delay", "seconds": 1, "colour": 1}), "steps[0].colour"),
        (_steps({"name": "a", "kind": "delay", "seconds": 1, "timeout_seconds": 0}), "steps[0].timeout_seconds"),
        (_steps({"name": "a", "kind": "delay", "seconds": 9, "timeout_seconds": 5}), "steps[0].timeout_seconds"),
        (_steps({"name": "a", "kind": "delay", "seconds": 1, "retry": {"max_attempts": 0}}),
         "steps[0].retry.max_attempts"),
        (_steps({"name": "a", "kind": "http", "integration": "crm", "method": "POST", "path": "https://evil/x"}),
         "steps[0].path"),
        (_steps({"name": "a", "kind": "http", "integration": "crm", "method": "POST", "path": "//evil/x"}),
         "steps[0].path"),
        (_steps({"name": "a", "kind": "http", "integration": "crm", "method": "BREW", "path": "/x"}),
         "steps[0].method"),
        (_steps({"name": "a", "kind": "email", "to": "nobody", "subject": "s", "body": "b"}), "steps[0].to"),
        (_steps({"name": "a", "kind": "delay", "seconds": 1}, {"name": "a", "kind": "delay", "seconds": 1}),
         "steps[1].name"),
        (_steps({"name": "a", "kind": "delay", "seconds": 1},
                compensations=[{"name": "a", "kind": "delay", "seconds": 1}]), "compensations[0].name"),
        (_steps({"name": "a", "kind": "delay", "seconds": 1, "compensate": "u"},
                compensations=[{"name": "u", "kind": "delay", "seconds": 1, "compensate": "u"}]),
         "compensations[0].compensate"),
        ({"steps": []}, "steps"),
        ({}, "steps"),
        ([], "definition"),
    ],
)  # fmt: skip
def test_a_bad_definition_names_the_field(definition: Any, field: str) -> None:
    """Every refusal is a DefinitionError whose ``field`` is the path the client wrote."""
    with pytest.raises(DefinitionError) as caught:
        parse_definition(definition)
    assert caught.value.field == field
    assert caught.value.message


@pytest.mark.parametrize(
    ("cron", "interval", "field"),
    [("* * * * *", 60, "schedule_cron"), ("every minute", None, "schedule_cron"), ("* * *", None, "schedule_cron"),
     (None, 0, "schedule_interval_seconds")],
)  # fmt: skip
def test_a_bad_schedule_names_the_field(cron: str | None, interval: int | None, field: str) -> None:
    """Both schedules at once, an unparsable cron, or a non-positive interval are refused by field."""
    with pytest.raises(DefinitionError) as caught:
        validate_schedule(cron, interval)
    assert caught.value.field == field


def test_next_run_after_follows_cron_with_seconds_and_intervals() -> None:
    """Cron (5 fields, or 6 with seconds last) and intervals give the next occurrence strictly
    after the base, in UTC; no schedule gives None."""
    base = datetime(2030, 1, 1, 12, 0, 7, tzinfo=UTC)
    assert next_run_after("* * * * * */5", None, base) == datetime(2030, 1, 1, 12, 0, 10, tzinfo=UTC)
    assert next_run_after("*/15 * * * *", None, base) == datetime(2030, 1, 1, 12, 15, tzinfo=UTC)
    assert next_run_after(None, 90, base) == datetime(2030, 1, 1, 12, 1, 37, tzinfo=UTC)
    assert next_run_after(None, None, base) is None
