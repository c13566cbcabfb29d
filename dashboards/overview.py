"""Service overview: traffic, errors, latency per route (with exemplars linking to traces),
SLO status and the alerts firing now. The first dashboard the on-call engineer opens."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.models import dashboard

from dashboards import slos
from dashboards.panels import (
    RATE,
    Board,
    query,
    sel,
    stat_panel,
    table_panel,
    timeseries_panel,
)

__all__ = ["UID", "build"]

UID = "vigil-overview"

_DURATION = "http_server_request_duration_seconds"
_5XX = 'http_response_status_code=~"5.."'


def _requests(*matchers: str) -> str:
    return f"rate({sel(_DURATION + '_count', *matchers)}[{RATE}])"


def _error_ratio(by: str = "") -> str:
    """5xx / all, per ``by``; 0 before the first 5xx (no 5xx series yet), no value without traffic."""
    agg = f"sum by ({by})" if by else "sum"
    errors, total = f"{agg} ({_requests(_5XX)})", f"{agg} ({_requests()})"
    return f"({errors} or 0 * {total}) / ({total} > 0)"


def _latency(quantile: float) -> timeseries.Panel:
    pct = f"p{round(quantile * 100)}"
    expr = f"histogram_quantile({quantile}, sum by (le, http_route) (rate({sel(_DURATION + '_bucket')}[{RATE}])))"
    return timeseries_panel(
        f"Latency {pct} by route",
        f"{pct} of request duration per route template, from the histogram buckets. The dots are"
        " exemplars: click one to open its trace in Tempo.",
        # Exemplars on every latency panel: each shows the trace of a real request near that point.
        query(expr, "{{http_route}}", exemplar=True),
        unit="s",
        w=8,
    )


def build() -> dashboard.Dashboard:
    slo_link = dash_b.DashboardLink("SLOs").url(f"/d/{slos.UID}").keep_time(True).include_vars(True)
    board = Board(
        UID,
        "Vigil / Service overview",
        ["overview", "http"],
        "Request rate, errors, latency per route, SLO status and firing alerts of the Vigil API.",
    )
    board.row("Now").add(
        stat_panel(
            "Request rate",
            "Requests per second, every route.",
            query(f"sum({_requests()})"),
            unit="reqps",
        ),
        stat_panel(
            "Error ratio (5xx)",
            "Share of responses with a 5xx status; empty while there is no traffic.",
            query(_error_ratio()),
            unit="percentunit",
            steps=((None, "green"), (0.001, "orange"), (0.01, "red")),
            decimals=3,
        ),
        stat_panel(
            "Active requests",
            "Requests in flight now.",
            query(f"sum({sel('http_server_active_requests')})"),
        ),
        stat_panel(
            "Firing alerts",
            "Vigil alerts firing now (Prometheus ALERTS); the table at the bottom names them.",
            query('count(ALERTS{alertstate="firing", alertname=~"Vigil.*"}) or vector(0)', instant=True),
            steps=((None, "green"), (1, "red")),
        ),
    )
    board.row(f"SLOs, last {slos.SLOS[0].period}").add(
        *(
            stat_panel(
                slo.title,
                f"{slo.description} Objective {slo.objective:.1%}; red below it. Details on the SLOs dashboard.",
                query(slo.sli(slo.period), instant=True),
                unit="percentunit",
                w=24 // len(slos.SLOS),
                steps=((None, "red"), (slo.objective, "green")),
                decimals=3,
            ).links([slo_link])
            for slo in slos.SLOS
        ),
    )
    board.row("Traffic and errors").add(
        timeseries_panel(
            "Request rate by route",
            "Requests per second per route template ('unmatched': no route, e.g. 404s).",
            query(f"sum by (http_route) ({_requests()})", "{{http_route}}"),
            unit="reqps",
        ),
        timeseries_panel(
            "Error ratio by route (5xx)",
            "Share of each route's responses with a 5xx status.",
            query(_error_ratio("http_route"), "{{http_route}}"),
            unit="percentunit",
            min_val=0,
        ),
        timeseries_panel(
            "Responses by status code",
            "Responses per second by HTTP status code, every route.",
            query(f"sum by (http_response_status_code) ({_requests()})", "{{http_response_status_code}}"),
            unit="reqps",
        ),
        timeseries_panel(
            "Active requests by method",
            "Requests in flight by HTTP method; a climb with flat traffic means requests are stuck.",
            query(f"sum by (http_request_method) ({sel('http_server_active_requests')})", "{{http_request_method}}"),
        ),
    )
    board.row("Latency").add(_latency(0.5), _latency(0.9), _latency(0.99))
    board.row("Alerts and instances").add(
        table_panel(
            "Firing alerts",
            "Every Vigil alert firing now, with its severity; the runbook link is in the alert itself.",
            query(
                'sum by (alertname, severity) (ALERTS{alertstate="firing", alertname=~"Vigil.*"})',
                instant=True,
                table_format=True,
            ),
            hide=("Time", "Value"),
        ),
        table_panel(
            "Build per instance",
            "The version and environment each scraped instance runs (app_info).",
            query(f"max by (instance, version, env) ({sel('app_info')})", instant=True, table_format=True),
            hide=("Time", "Value"),
        ),
    )
    return board.build()
