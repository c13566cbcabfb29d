"""One alerting rule as code, holding the alert contract of DESIGN.md by construction.

Every alert: a CamelCase name starting with ``Vigil``; label ``severity`` (``critical`` pages,
``warning`` opens a ticket, ``info`` is only shown on dashboards); annotations ``summary``
(static), ``description`` (templated), ``runbook_url`` and ``dashboard_url``. The two URLs are
built here from one base each, so moving the repository or Grafana is a one-line change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from textwrap import dedent
from typing import Any, Literal

__all__ = [
    "DASHBOARDS",
    "GRAFANA_URL",
    "RUNBOOK_URL",
    "SEVERITIES",
    "Alert",
    "dashboard_url",
    "runbook_url",
]

Severity = Literal["critical", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")

#: Where ``docs/runbooks/<AlertName>.md`` is read by the on-call engineer.
RUNBOOK_URL = "https://github.com/vigil/vigil/blob/main/docs/runbooks"
#: Grafana as docker-compose.yml publishes it; dashboards are addressed by their stable uid.
GRAFANA_URL = "http://localhost:3000"
#: The dashboard uids an alert may link to (dashboards/generated/<uid>.json).
DASHBOARDS = ("vigil-overview", "vigil-guardrails", "vigil-workflows", "vigil-slos")

_NAME = re.compile(r"^Vigil(?:[A-Z][a-z0-9]*)+$")
_DURATION = re.compile(r"^(?:\d+[smhd])+$")


def runbook_url(alert: str) -> str:
    return f"{RUNBOOK_URL}/{alert}.md"


def dashboard_url(uid: str) -> str:
    return f"{GRAFANA_URL}/d/{uid}"


@dataclass(frozen=True)
class Alert:
    """An alerting rule of ``alerts/generated/*.yml``."""

    name: str
    """CamelCase, starting with ``Vigil``; also the runbook's file name."""

    severity: Severity
    expr: str
    for_: str
    """How long ``expr`` must hold before the alert fires (a Prometheus duration)."""

    summary: str
    """One static sentence: what is wrong, without values."""

    description: str
    """What is wrong where, with ``{{ $labels.* }}`` and ``{{ $value }}``."""

    dashboard: str
    """Uid of the dashboard to open first (one of :data:`DASHBOARDS`)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    """Static labels beside ``severity``. ``dependency`` names what the alert degrades
    without, so that Alertmanager's ``VigilRedisDown``/``VigilDatabaseDown`` silence it."""

    awaits: tuple[str, ...] = ()
    """Catalogue metrics the rule needs that are not in the catalogue yet: until they are, the
    alert is reported as pending instead of generated. Any other unknown name is an error."""

    def __post_init__(self) -> None:
        problems = []
        if not _NAME.match(self.name):
            problems.append("name is not CamelCase starting with Vigil")
        if self.severity not in SEVERITIES:
            problems.append(f"severity {self.severity!r} is not one of {SEVERITIES}")
        if not _DURATION.match(self.for_):
            problems.append(f"for {self.for_!r} is not a duration")
        if "{{" in self.summary:
            problems.append("summary is templated (it must be one static sentence)")
        if "{{" not in self.description:
            problems.append("description is not templated")
        if self.dashboard not in DASHBOARDS:
            problems.append(f"dashboard {self.dashboard!r} is not one of {DASHBOARDS}")
        if "severity" in self.labels:
            problems.append("severity belongs in the severity field")
        if problems:
            raise ValueError(f"{self.name}: {'; '.join(problems)}")

    def rule(self) -> dict[str, Any]:
        """The rule as Prometheus reads it."""
        return {
            "alert": self.name,
            "expr": dedent(self.expr).strip() + ("\n" if "\n" in self.expr.strip() else ""),
            "for": self.for_,
            "labels": {"severity": self.severity, **self.labels},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": runbook_url(self.name),
                "dashboard_url": dashboard_url(self.dashboard),
            },
        }
