"""SLOs as code: ``alerts/slos.yaml`` → recording rules and multiwindow, multi-burn-rate alerts.

For each SLO, ``slo:sli_error:ratio_rate<window>{slo, job}`` records the share of bad events
over each window the alerts read (5m … 3d), with ``slo:objective:ratio`` and
``slo:error_budget:ratio`` beside them for dashboards; the ratio over the SLO's whole period
(``…_ratio_rate30d``) is recorded every 5 minutes in a file of its own (no alert reads it).

The denominator is guarded (``… / (total > 0)``): with no traffic the ratio has no sample at
all, never NaN, and a quiet period cannot fire an alert. The numerator falls back to
``0 * total`` so that traffic without a single bad event records 0, not nothing.

Alerts follow the SRE Workbook (chapter 5, table 5-8): an SLO pages when it burns its error
budget 14.4x too fast over 1h *and* 5m (2% of a 30-day budget gone in an hour) or 6x over 6h
and 30m (5% in 6 hours), and opens a ticket at 3x over 1d and 2h or 1x over 3d and 6h. The
short window makes an alert stop soon after the burn does. ``for:`` only rides out a single
noisy evaluation and grows with the window (2m, 15m, 1h, 3h); every tier carries ``tier``
(page/ticket) and ``window`` (its long window) so that Alertmanager silences slower tiers of
the same ``slo`` while a faster one fires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

from alerts.alert import Alert, Severity

__all__ = ["RECORD", "SLO", "SPEC", "TIERS", "WINDOWS", "Tier", "load"]

SPEC = Path(__file__).with_name("slos.yaml")
#: Windows the burn-rate alerts read; each is recorded for every SLO.
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
#: Prefix of the recorded error ratios: ``slo:sli_error:ratio_rate1h``.
RECORD = "slo:sli_error:ratio_rate"
OBJECTIVE_RECORD = "slo:objective:ratio"
BUDGET_RECORD = "slo:error_budget:ratio"

_SLUG = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Tier:
    """One burn-rate alert of an SLO."""

    tier: str
    severity: Severity
    factor: float
    """Burn rate: how many times faster than the budget allows (1 = spent exactly at period end)."""
    long: str
    short: str
    for_: str


TIERS = (
    Tier("page", "critical", 14.4, "1h", "5m", "2m"),
    Tier("page", "critical", 6, "6h", "30m", "15m"),
    Tier("ticket", "warning", 3, "1d", "2h", "1h"),
    Tier("ticket", "warning", 1, "3d", "6h", "3h"),
)


def _num(x: float) -> str:
    return f"{x:.6g}"


@dataclass(frozen=True)
class SLO:
    """One entry of ``alerts/slos.yaml`` (its header documents the fields)."""

    name: str
    title: str
    alert: str
    objective: float
    period: str
    job: str
    bad_share: str
    metric: str
    total: str
    bad: str | None = None
    slower_than: float | None = None
    awaits: tuple[str, ...] = ()
    dashboard: str = "vigil-slos"

    @property
    def budget(self) -> float:
        """Share of bad events the objective allows."""
        return round(1 - self.objective, 12)

    @property
    def period_days(self) -> int:
        return int(self.period.removesuffix("d"))

    def _selector(self, *extra: str) -> str:
        matchers = [f'job="{self.job}"', *(m for m in (self.total, *extra) if m)]
        return "{" + ", ".join(matchers) + "}"

    def _sum_rate(self, series: str, window: str, *extra: str) -> str:
        return f"sum by (job) (rate({series}{self._selector(*extra)}[{window}]))"

    def error_ratio(self, window: str) -> str:
        """PromQL of the share of bad events over ``window``; no sample without traffic."""
        if self.slower_than is not None:
            total = self._sum_rate(f"{self.metric}_count", window)
            fast = self._sum_rate(f"{self.metric}_bucket", window, f'le="{floatToGoString(self.slower_than)}"')
            bad = f"  {total}\n  -\n  {fast}"
        else:
            total = self._sum_rate(self.metric, window)
            bad = f"  {self._sum_rate(self.metric, window, self.bad or '')}\n  or\n  0 * {total}"
        return f"(\n{bad}\n)\n/\n({total} > 0)\n"

    def sli(self, window: str) -> str:
        """PromQL of the share of good events over ``window`` (dashboards compare it with
        :attr:`objective`), read from the recorded ratio."""
        return f"1 - {self.recorded(window)}"

    def recorded(self, window: str) -> str:
        return f'{RECORD}{window}{{slo="{self.name}"}}'

    def _labels(self) -> dict[str, str]:
        return {"slo": self.name, "job": self.job}

    def recording_rules(self) -> list[dict[str, Any]]:
        """Objective, budget and the error ratio of every alert window."""
        static = [
            {"record": OBJECTIVE_RECORD, "expr": f"vector({_num(self.objective)})", "labels": self._labels()},
            {"record": BUDGET_RECORD, "expr": f"vector({_num(self.budget)})", "labels": self._labels()},
        ]
        ratios = [
            {"record": f"{RECORD}{w}", "expr": self.error_ratio(w), "labels": {"slo": self.name}} for w in WINDOWS
        ]
        return static + ratios

    def period_rule(self) -> dict[str, Any]:
        """The error ratio over the whole period (for dashboards; no alert reads it)."""
        return {"record": f"{RECORD}{self.period}", "expr": self.error_ratio(self.period), "labels": {"slo": self.name}}

    def alerts(self) -> list[Alert]:
        """The four burn-rate tiers."""
        return [self._alert(t) for t in TIERS]

    def _alert(self, t: Tier) -> Alert:
        threshold = f"({_num(t.factor)} * {_num(self.budget)})"
        expr = f"{self.recorded(t.long)} > {threshold}\nand\n{self.recorded(t.short)} > {threshold}\n"
        days = self.period_days / t.factor
        return Alert(
            self.alert,
            t.severity,
            expr,
            t.for_,
            f"The {self.title} SLO burns its error budget at over {_num(t.factor)}x the sustainable rate.",
            f"{{{{ $labels.job }}}}: the {self.bad_share} has been above"
            f" {_num(t.factor * self.budget * 100)}% over both the last {t.long} and the last {t.short}:"
            f" the {{{{ $labels.slo }}}} SLO ({_num(self.objective * 100)}% over {self.period}) burns its"
            f" error budget at over {_num(t.factor)}x the sustainable rate, so the whole budget is gone"
            f" within {days:.3g} days.",
            self.dashboard,
            labels={"slo": self.name, "tier": t.tier, "window": t.long},
            awaits=self.awaits,
        )


def _parse(entry: dict[str, Any], period: str) -> SLO:
    sli = entry["sli"]
    unknown = set(entry) - {"name", "title", "alert", "objective", "job", "bad_share", "sli", "awaits", "period"}
    unknown |= set(sli) - {"metric", "total", "bad", "slower_than"}
    if unknown:
        raise ValueError(f"{entry.get('name')}: unknown fields {sorted(unknown)}")
    slo = SLO(
        name=entry["name"],
        title=entry["title"],
        alert=entry["alert"],
        objective=float(entry["objective"]),
        period=str(entry.get("period", period)),
        job=entry["job"],
        bad_share=entry["bad_share"],
        metric=sli["metric"],
        total=sli.get("total", ""),
        bad=sli.get("bad"),
        slower_than=None if sli.get("slower_than") is None else float(sli["slower_than"]),
        awaits=tuple(entry.get("awaits", ())),
    )
    _check(slo)
    return slo


def _check(slo: SLO) -> None:
    from telemetry.catalogue import spec

    problems = []
    if not _SLUG.match(slo.name):
        problems.append("name is not a lower-case slug")
    if not re.fullmatch(r"\d+d", slo.period):
        problems.append(f"period {slo.period!r} is not a number of days")
    if not 0 < slo.objective < 1:
        problems.append(f"objective {slo.objective} is not a share between 0 and 1")
    elif max(t.factor for t in TIERS) * slo.budget >= 1:
        problems.append("the objective is too low for a 14.4x burn rate to be measurable")
    if (slo.bad is None) == (slo.slower_than is None):
        problems.append("the SLI needs exactly one of `bad` and `slower_than`")
    if slo.slower_than is not None and slo.metric not in slo.awaits:
        try:
            histogram = spec(slo.metric)
        except KeyError:
            problems.append(f"{slo.metric} is not a catalogue histogram")
        else:
            if slo.slower_than not in histogram.buckets:
                problems.append(f"slower_than {slo.slower_than} is not a bucket bound of {slo.metric}")
    if problems:
        raise ValueError(f"SLO {slo.name}: {'; '.join(problems)}")


def load(path: Path = SPEC) -> tuple[SLO, ...]:
    """Every SLO of the spec, checked; pending ones (``awaits``) included."""
    doc = yaml.safe_load(path.read_text())
    slos = tuple(_parse(entry, str(doc["period"])) for entry in doc["slos"])
    names = [s.name for s in slos]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate SLO names in {path}")
    return slos
