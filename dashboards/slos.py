"""SLOs: per SLO its objective, the SLI over the SLO period, the error budget left, and the burn
rate of every multiwindow alert tier (SRE Workbook, chapter 5).

The queries compute error ratios from the raw counters (the HTTP histogram, workflow runs)
rather than from recording rules, so this dashboard depends on nothing but the catalogue. The
burn rate of a window is its error ratio divided by the error budget (1 - objective): 1 spends
the budget exactly over the period.
A window without traffic has no error ratio (the denominator is guarded with ``> 0``), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

from grafana_foundation_sdk.models import common, dashboard

from dashboards.panels import Board, query, sel, stat_panel, timeseries_panel

__all__ = ["BURN_WINDOWS", "PENDING_SLOS", "SLOS", "TIERS", "UID", "Slo", "Tier", "build"]

UID = "vigil-slos"

#: Windows of the burn-rate alerts, shortest first.
BURN_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")

_HISTOGRAM = "http_server_request_duration_seconds"
#: Probes and scrapes are not client traffic: they would dilute the error ratio.
_SERVED = 'http_route!~"/health/.*|/metrics"'
#: 5xx answers already cost availability budget; fast 503s must not make latency look better.
_NOT_5XX = 'http_response_status_code!~"5.."'


@dataclass(frozen=True)
class Tier:
    """One multiwindow burn-rate alert: fires when both windows burn faster than ``factor``."""

    name: str
    factor: float
    long: str
    short: str


TIERS = (
    Tier("Page, fast burn", 14.4, "1h", "5m"),
    Tier("Page, slow burn", 6, "6h", "30m"),
    Tier("Ticket, fast burn", 3, "1d", "2h"),
    Tier("Ticket, slow burn", 1, "3d", "6h"),
)


@dataclass(frozen=True)
class Slo:
    """A service level objective over the requests counted by the HTTP duration histogram; the
    same definition as its entry in alerts/slos.yaml (tests/ops/test_dashboards.py compares)."""

    name: str
    """The SLO's name (the ``slo`` label of its recorded series and alerts)."""

    title: str
    objective: float
    """Share of good events the SLO promises over :attr:`period` (0.999 = 99.9%)."""

    description: str
    total: tuple[str, ...]
    """Matchers selecting every event that counts."""

    bad: tuple[str, ...] = ()
    """Matchers added to :attr:`total` to select the bad events (or use :attr:`slower_than`)."""

    slower_than: str | None = None
    """Latency SLOs: events slower than this bucket bound (an ``le`` value) are bad."""

    period: str = "30d"

    metric: str = _HISTOGRAM
    """The counter the events are counted on: a histogram's base name (its ``_count`` and
    ``_bucket`` are read), or a plain counter (``…_total``)."""

    @property
    def _counted(self) -> str:
        return self.metric if self.metric.endswith("_total") else self.metric + "_count"

    @property
    def budget(self) -> str:
        return format(1 - self.objective, ".6g")

    def _sum_rate(self, series: str, window: str, *matchers: str) -> str:
        return f"sum(rate({sel(series, *self.total, *matchers)}[{window}]))"

    def error_ratio(self, window: str) -> str:
        """Bad / total over ``window``: 0 while nothing is bad, no value while there is no traffic."""
        total = self._sum_rate(self._counted, window)
        if self.slower_than is not None:
            fast = self._sum_rate(self.metric + "_bucket", window, f'le="{self.slower_than}"')
            bad = f"{total} - {fast}"
        else:
            bad = self._sum_rate(self._counted, window, *self.bad)
        # `or 0 * total`: before the first bad event there is no bad series at all.
        return f"(({bad}) or 0 * {total}) / ({total} > 0)"

    def sli(self, window: str) -> str:
        return f"1 - ({self.error_ratio(window)})"

    def burn_rate(self, window: str) -> str:
        return f"({self.error_ratio(window)}) / {self.budget}"


SLOS = (
    Slo(
        "api-availability",
        "API availability",
        0.999,
        "Share of API requests answered without a 5xx status (the 503s of load shedding included;"
        " health probes and /metrics excluded).",
        total=(_SERVED,),
        bad=('http_response_status_code=~"5.."',),
    ),
    Slo(
        "api-latency-read",
        "API read latency",
        0.99,
        "Share of GET and HEAD requests answered within 250 ms (5xx, health probes and /metrics excluded).",
        total=('http_request_method=~"GET|HEAD"', _SERVED, _NOT_5XX),
        slower_than="0.25",
    ),
    Slo(
        "api-latency-write",
        "API write latency",
        0.99,
        "Share of write requests (not GET or HEAD) answered within 1 s (5xx, health probes and /metrics excluded).",
        total=('http_request_method!~"GET|HEAD"', _SERVED, _NOT_5XX),
        slower_than="1.0",
    ),
    Slo(
        "workflow-run-success",
        "Workflow run success",
        0.99,
        "Share of finished workflow runs that succeeded: failed and compensated runs are bad (D51)"
        " when the failure was on Vigil's side (cause=\"vigil\", D66; a user's integration failing is"
        ' cause="remote"); stuck is a lost lease, not a run\'s end, and is left out.',
        total=('status=~"succeeded|failed|compensated"',),
        bad=('status=~"failed|compensated"', 'cause="vigil"'),
        metric="workflow_runs_total",
    ),
)

#: SLOs of alerts/slos.yaml whose metrics are not in the catalogue yet (declared with `awaits`).
PENDING_SLOS: tuple[str, ...] = ()


def _slo_row(board: Board, slo: Slo) -> None:
    board.row(f"{slo.title}: {slo.objective:.1%} over {slo.period}").add(
        stat_panel(
            "Objective",
            slo.description,
            query(f"vector({slo.objective})", "objective", instant=True),
            unit="percentunit",
            w=8,
            decimals=2,
            steps=((None, "blue"),),
        ),
        stat_panel(
            f"SLI, {slo.period}",
            f"Share of good events over the last {slo.period}; red below the objective.",
            query(slo.sli(slo.period), "SLI", instant=True),
            unit="percentunit",
            w=8,
            decimals=3,
            steps=((None, "red"), (slo.objective, "green")),
        ),
        stat_panel(
            f"Error budget remaining, {slo.period}",
            f"1 - (error ratio over {slo.period}) / (1 - objective). Below 0 the SLO is breached.",
            query(f"1 - {slo.burn_rate(slo.period)}", "budget", instant=True),
            unit="percentunit",
            w=8,
            decimals=1,
            steps=((None, "red"), (0, "orange"), (0.25, "green")),
        ),
        *(
            stat_panel(
                f"{tier.name}: {tier.factor:g}x over {tier.long} and {tier.short}",
                f"Burn rate over the tier's two windows; the alert fires while both are at or above {tier.factor:g}.",
                query(slo.burn_rate(tier.long), tier.long, instant=True),
                query(slo.burn_rate(tier.short), tier.short, instant=True),
                w=6,
                decimals=2,
                steps=((None, "green"), (tier.factor, "red")),
                text_mode=common.BigValueTextMode.VALUE_AND_NAME,
            )
            for tier in TIERS
        ),
        timeseries_panel(
            "Burn rate per alert window",
            "Error ratio over each alert window divided by the error budget. The dashed lines are the"
            " tiers' factors: 14.4 and 6 page, 3 and 1 open a ticket.",
            *(query(slo.burn_rate(w), w) for w in BURN_WINDOWS),
            w=24,
            h=9,
            min_val=0,
            threshold_line=((None, "green"), (1, "yellow"), (3, "orange"), (6, "red"), (14.4, "dark-red")),
        ),
    )


def build() -> dashboard.Dashboard:
    board = Board(
        UID,
        "Vigil / SLOs",
        ["slo"],
        "Each SLO's objective, SLI, error budget and burn rate per alert window.",
        time_from="now-24h",
    )
    for slo in SLOS:
        _slo_row(board, slo)
    return board.build()
