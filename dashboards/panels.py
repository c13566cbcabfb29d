"""Shared pieces of every Vigil dashboard: the data source, the ``job``/``instance`` variables,
the links between dashboards, and small panel constructors over grafana-foundation-sdk.

Every query selects ``job=~"$job", instance=~"$instance"`` through :func:`sel`, so the variables
filter every panel. Metric and label names come from ``telemetry/catalogue.py``;
``tests/ops/test_dashboards.py`` fails when a query names anything the catalogue lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, text, timeseries
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models import prometheus as prometheus_m
from grafana_foundation_sdk.models import text as text_m

__all__ = [
    "DATASOURCE",
    "RATE",
    "Board",
    "Thresholds",
    "markdown",
    "query",
    "sel",
    "stat_panel",
    "state_mapping",
    "state_timeline",
    "table_panel",
    "timeseries_panel",
]

#: The provisioned Prometheus data source (deploy/grafana/provisioning/datasources); its
#: exemplarTraceIdDestinations turn a ``trace_id`` exemplar into a link to Tempo (``vigil-tempo``).
DATASOURCE = dashboard.DataSourceRef(type_val="prometheus", uid="vigil-prometheus")

#: Grafana's rate window: at least four scrape intervals, so rate() never sees a single sample.
RATE = "$__rate_interval"

_P = TypeVar("_P", timeseries.Panel, stat.Panel, statetimeline.Panel, table.Panel)
_Panel = timeseries.Panel | stat.Panel | statetimeline.Panel | table.Panel | text.Panel

#: Vigil's alerts firing now (Prometheus' ALERTS series); alert rules live in alerts/.
_FIRING = 'ALERTS{alertstate="firing", alertname=~"Vigil.*"}'

_SELECTOR = ('job=~"$job"', 'instance=~"$instance"')

#: Steps of a threshold scale: ``(value, colour)``, the first value ``None`` (minus infinity).
Thresholds = Sequence[tuple[float | None, str]]


def sel(metric: str, *matchers: str) -> str:
    """``metric{job=~"$job", instance=~"$instance", *matchers}``."""
    return f"{metric}{{{', '.join((*_SELECTOR, *matchers))}}}"


def query(
    expr: str, legend: str = "__auto", *, instant: bool = False, exemplar: bool = False, table_format: bool = False
) -> prometheus.Dataquery:
    """A Prometheus query on :data:`DATASOURCE` (its refId is set by the panel constructor)."""
    q = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)
    q = q.instant() if instant else q.range()
    if exemplar:
        q = q.exemplar(True)
    if table_format:
        q = q.format(prometheus_m.PromQueryFormat.TABLE)
    return q


def _thresholds(steps: Thresholds) -> dash_b.ThresholdsConfig:
    return (
        dash_b.ThresholdsConfig()
        .mode(dashboard.ThresholdsMode.ABSOLUTE)
        .steps([dashboard.Threshold(value=v, color=c) for v, c in steps])
    )


def _with_targets(panel: _P, queries: Sequence[prometheus.Dataquery]) -> _P:
    for i, q in enumerate(queries):
        panel = panel.with_target(q.ref_id(chr(ord("A") + i)))
    return panel


def timeseries_panel(
    title: str,
    description: str,
    *queries: prometheus.Dataquery,
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    min_val: float | None = None,
    max_val: float | None = None,
    threshold_line: Thresholds | None = None,
    bars: bool = False,
) -> timeseries.Panel:
    """A time series; ``threshold_line`` draws its steps as dashed lines (e.g. the 80% pool line)."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(h)
        .legend(
            common_b.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    if threshold_line is not None:
        panel = panel.thresholds(_thresholds(threshold_line)).thresholds_style(
            common_b.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)
        )
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(60)
    return _with_targets(panel, queries)


def stat_panel(
    title: str,
    description: str,
    *queries: prometheus.Dataquery,
    unit: str = "short",
    w: int = 6,
    h: int = 4,
    steps: Thresholds = ((None, "green"),),
    mappings: Sequence[dashboard.ValueMapping] = (),
    decimals: float | None = None,
    text_mode: common.BigValueTextMode = common.BigValueTextMode.AUTO,
) -> stat.Panel:
    """A single value (the last one) coloured by ``steps``."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(h)
        .thresholds(_thresholds(steps))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(text_mode)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if mappings:
        panel = panel.mappings(list(mappings))
    if decimals is not None:
        panel = panel.decimals(decimals)
    return _with_targets(panel, queries)


def state_mapping(states: Sequence[tuple[float, str, str]]) -> dashboard.ValueMapping:
    """Numbers to named, coloured states: ``[(0, "down", "red"), (1, "up", "green")]``."""
    return dashboard.ValueMap(
        options={
            format(value, "g"): dashboard.ValueMappingResult(text=name, color=colour, index=i)
            for i, (value, name, colour) in enumerate(states)
        }
    )


def state_timeline(
    title: str,
    description: str,
    q: prometheus.Dataquery,
    states: Sequence[tuple[float, str, str]],
    *,
    w: int = 12,
    h: int = 8,
) -> statetimeline.Panel:
    """One row per series, coloured by the named ``states`` of its value."""
    panel = (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(w)
        .height(h)
        .mappings([state_mapping(states)])
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .fill_opacity(80)
        .line_width(0)
    )
    return _with_targets(panel, [q])


def table_panel(
    title: str, description: str, q: prometheus.Dataquery, *, hide: Sequence[str] = ("Time",), w: int = 12, h: int = 8
) -> table.Panel:
    """An instant table of one query's series, without the ``hide`` columns."""
    organize = dashboard.DataTransformerConfig(id_val="organize", options={"excludeByName": dict.fromkeys(hide, True)})
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(w)
        .height(h)
        .with_transformation(organize)
        .cell_height(common.TableCellHeight.SM)
    )
    return _with_targets(panel, [q])


def markdown(title: str, content: str, *, w: int = 24, h: int = 3) -> text.Panel:
    """A note for the on-call engineer."""
    return text.Panel().title(title).mode(text_m.TextMode.MARKDOWN).content(content).span(w).height(h)


class Board:
    """A dashboard under construction: rows and panels laid out left to right, top to bottom,
    each with a unique id; the ``job``/``instance`` variables and the tag link to the other
    Vigil dashboards come with it."""

    def __init__(
        self, uid: str, title: str, tags: Sequence[str], description: str, *, time_from: str = "now-6h"
    ) -> None:
        self._next_id = 1
        self._builder = (
            dash_b.Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["vigil", *tags])
            .readonly()  # provisioned from files: edits belong in dashboards/*.py
            .time(time_from, "now")
            .refresh("30s")
            .timezone("utc")
            .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
            .annotation(
                dash_b.AnnotationQuery()
                .name("Vigil alerts firing")
                .datasource(DATASOURCE)
                .enable(True)
                .icon_color("red")
                .expr(_FIRING)
            )
            .with_variable(_variable("job", "Job", 'label_values(up{job=~"vigil-.*"}, job)'))
            .with_variable(_variable("instance", "Instance", 'label_values(up{job=~"$job"}, instance)'))
            .link(
                dash_b.DashboardLink("Vigil dashboards")
                .type(dashboard.DashboardLinkType.DASHBOARDS)
                .tags(["vigil"])
                .as_dropdown(False)
                .include_vars(True)
                .keep_time(True)
                .icon("external link")
                .tooltip("The other Vigil dashboards, with the same job, instance and time range")
            )
        )

    def row(self, title: str) -> Board:
        self._builder = self._builder.with_row(dash_b.Row(title).id(self._take_id()))
        return self

    def add(self, *panels: _Panel) -> Board:
        for panel in panels:
            self._builder = self._builder.with_panel(panel.id(self._take_id()))
        return self

    def build(self) -> dashboard.Dashboard:
        return self._builder.build()

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1


def _variable(name: str, label: str, q: str) -> dash_b.QueryVariable:
    return (
        dash_b.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(q)
        .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .current(dashboard.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
