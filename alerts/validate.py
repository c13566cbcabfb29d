"""The alert validator, after ceph-mixin's ``validate_rules.py``: what every rule must have.

Each check returns a list of problems (empty when the rule is fine), so that
``tests/ops/test_alerts.py`` can fail with all of them at once. Checked per alerting rule:

- the alert contract: name, ``severity``, ``summary``/``description``/``runbook_url``/
  ``dashboard_url`` (:func:`contract_problems`);
- only catalogue metrics and labels, Prometheus' own series and recorded series
  (:func:`name_problems`);
- a promtool case where it fires, with labels and annotations, and one where it does not;
  for SLO tiers, cases one evaluation apart pinning detection and reset (:class:`Cases`);
- a runbook with the sections on-call reads (:func:`runbook_problems`) and a committed dashboard
  (:func:`dashboard_uids`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alerts.alert import GRAFANA_URL, RUNBOOK_URL, SEVERITIES
from alerts.promql import PROMETHEUS_SERIES, TARGET_LABELS, catalogue_series, names

__all__ = [
    "ANNOTATIONS",
    "RUNBOOK_SECTIONS",
    "Case",
    "Cases",
    "contract_problems",
    "dashboard_uids",
    "load_rules",
    "name_problems",
    "recorded_labels",
    "runbook_problems",
    "static_labels",
]

ANNOTATIONS = ("summary", "description", "runbook_url", "dashboard_url")
#: Headings every runbook has, in this order.
RUNBOOK_SECTIONS = ("What it means", "Impact on API clients", "Dashboard", "Diagnosis", "Mitigation", "Escalation")

_NAME = re.compile(r"^Vigil(?:[A-Z][a-z0-9]*)+$")
_DASHBOARD = re.compile(rf"^{re.escape(GRAFANA_URL)}/d/(?P<uid>[A-Za-z0-9_-]+)$")
_DURATION_PART = re.compile(r"(\d+)(ms|[smhdwy])")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def load_rules(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every rule of the rule files, in order."""
    return [rule for p in paths for group in yaml.safe_load(p.read_text())["groups"] for rule in group["rules"]]


def static_labels(rule: Mapping[str, Any]) -> dict[str, str]:
    """The labels an alert gets from its rule (``alertname`` included)."""
    return {"alertname": rule["alert"], **rule.get("labels", {})}


def contract_problems(rule: Mapping[str, Any]) -> list[str]:
    """How an alerting rule breaks DESIGN.md's alert contract."""
    name = rule["alert"]
    labels, notes = rule.get("labels", {}), rule.get("annotations", {})
    problems = []
    if not _NAME.match(name):
        problems.append(f"{name}: the name is not CamelCase starting with Vigil")
    if labels.get("severity") not in SEVERITIES:
        problems.append(f"{name}: label severity is {labels.get('severity')!r}, not one of {SEVERITIES}")
    problems += [f"{name}: no {a} annotation" for a in ANNOTATIONS if not str(notes.get(a, "")).strip()]
    if "{{" in notes.get("summary", ""):
        problems.append(f"{name}: the summary is templated (it must be one static sentence)")
    if notes.get("description") and "{{" not in notes["description"]:
        problems.append(f"{name}: the description is not templated with $labels or $value")
    if notes.get("runbook_url") and notes["runbook_url"] != f"{RUNBOOK_URL}/{name}.md":
        problems.append(f"{name}: runbook_url is not {RUNBOOK_URL}/{name}.md")
    if notes.get("dashboard_url") and not _DASHBOARD.match(notes["dashboard_url"]):
        problems.append(f"{name}: dashboard_url is not {GRAFANA_URL}/d/<uid>")
    return problems


def recorded_labels(rules: Iterable[Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    """Series the recording rules write, with the labels they may carry."""
    recorded: dict[str, frozenset[str]] = {}
    for rule in rules:
        if "record" in rule:
            labels = frozenset(rule.get("labels", {})) | names(rule["expr"]).labels | TARGET_LABELS
            recorded[rule["record"]] = recorded.get(rule["record"], frozenset()) | labels
    return recorded


def name_problems(rule: Mapping[str, Any], recorded: Mapping[str, frozenset[str]]) -> list[str]:
    """Series and labels ``rule``'s expression names that neither telemetry/catalogue.py, nor
    Prometheus itself, nor a recording rule provides."""
    what = rule.get("alert") or rule.get("record")
    known = {**catalogue_series(), **PROMETHEUS_SERIES, **recorded}
    used = names(rule["expr"])
    problems = [f"{what}: series {s} is not in telemetry/catalogue.py" for s in sorted(used.series - set(known))]
    allowed = TARGET_LABELS.union(*(known[s] for s in used.series if s in known))
    problems += [
        f"{what}: label {label} belongs to none of {sorted(used.series)}" for label in sorted(used.labels - allowed)
    ]
    return problems


def seconds(duration: str) -> float:
    """A Prometheus duration (``3d17h45m``) in seconds."""
    parts = _DURATION_PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(int(n) * _SECONDS[u] for n, u in parts)


@dataclass(frozen=True)
class Case:
    """One ``alert_rule_test`` entry of a promtool test file."""

    file: str
    group: int
    interval: float
    """The file's evaluation interval, in seconds: one step of the rules."""
    at: float
    alertname: str
    alerts: tuple[tuple[dict[str, str], dict[str, str]], ...]
    """(exp_labels, exp_annotations) of each expected alert."""

    def has(self, labels: Mapping[str, str]) -> bool:
        """Whether an expected alert carries all of ``labels``."""
        return any(labels.items() <= {"alertname": self.alertname, **exp}.items() for exp, _ in self.alerts)


class Cases:
    """Every ``alert_rule_test`` of the promtool test files, indexed for the checks."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.cases: list[Case] = []
        for path in sorted(paths):
            doc = yaml.safe_load(path.read_text())
            interval = seconds(str(doc.get("evaluation_interval", "1m")))
            for i, group in enumerate(doc.get("tests", [])):
                for test in group.get("alert_rule_test") or []:
                    alerts = tuple(
                        ({k: str(v) for k, v in (a.get("exp_labels") or {}).items()}, a.get("exp_annotations") or {})
                        for a in test.get("exp_alerts") or []
                    )
                    at = seconds(str(test["eval_time"]))
                    self.cases.append(Case(path.name, i, interval, at, test["alertname"], alerts))

    def firing(self, rule: Mapping[str, Any]) -> list[Case]:
        """Cases where the alert of ``rule`` fires with every annotation of the contract."""
        labels = static_labels(rule)
        return [
            c
            for c in self.cases
            if any(
                labels.items() <= {"alertname": c.alertname, **exp}.items() and set(ANNOTATIONS) <= set(notes)
                for exp, notes in c.alerts
            )
        ]

    def quiet(self, alertname: str) -> list[Case]:
        """Cases expecting no alert of that name at all."""
        return [c for c in self.cases if c.alertname == alertname and not c.alerts]

    def pins(self, rule: Mapping[str, Any]) -> tuple[list[float], list[float]]:
        """Times at which cases one evaluation apart pin the alert's detection (absent, then
        firing) and its reset (firing, then absent)."""
        labels = static_labels(rule)
        detected, reset = [], []
        steps = {(c.file, c.group, c.at): c for c in self.cases if c.alertname == rule["alert"]}
        for (file, group, at), after in steps.items():
            before = steps.get((file, group, at - after.interval))
            if before is None:
                continue
            if not before.has(labels) and after.has(labels):
                detected.append(at)
            if before.has(labels) and not after.has(labels):
                reset.append(at)
        return detected, reset


def dashboard_uids(directory: Path) -> set[str]:
    """Uids of the committed dashboards (each JSON's own ``uid``, whatever its file name)."""
    uids = set()
    for path in directory.glob("*.json"):
        doc = json.loads(path.read_text())
        uid = doc.get("uid") or doc.get("dashboard", {}).get("uid")
        if uid:
            uids.add(uid)
    return uids


def runbook_problems(alertname: str, directory: Path) -> list[str]:
    """What the runbook of ``alertname`` lacks."""
    path = directory / f"{alertname}.md"
    if not path.is_file():
        return [f"{alertname}: no runbook {path.name} in docs/runbooks/"]
    text = path.read_text()
    problems = []
    if not text.startswith(f"# {alertname}\n"):
        problems.append(f"{path.name}: does not start with the heading '# {alertname}'")
    headings = re.findall(r"^## (.+?)\s*$", text, re.M)
    missing = [s for s in RUNBOOK_SECTIONS if s not in headings]
    if missing:
        problems.append(f"{path.name}: no section {', '.join(repr('## ' + s) for s in missing)}")
    elif [h for h in headings if h in RUNBOOK_SECTIONS] != list(RUNBOOK_SECTIONS):
        problems.append(f"{path.name}: sections out of order (expected {', '.join(RUNBOOK_SECTIONS)})")
    return problems
