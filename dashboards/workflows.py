"""Workflows & worker: the background work of the one SAQ worker.

Workflow runs (by status, stuck, active, step durations, queue depth, pickup latency), e-mail
delivery, dead-letter replay, pattern analysis and integration calls, each in a row of its own.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.models import dashboard

from dashboards.panels import RATE, Board, query, sel, state_timeline, timeseries_panel

__all__ = ["UID", "build"]

UID = "vigil-workflows"


def _quantiles(metric: str, by: str = "") -> tuple[prometheus.Dataquery, ...]:
    """p50 and p99 of a histogram, per ``by`` label when given."""
    group, legend = ("le, " + by, f"{{{{{by}}}}} ") if by else ("le", "")
    return tuple(
        query(f"histogram_quantile({q}, sum by ({group}) (rate({sel(metric + '_bucket')}[{RATE}])))", f"{legend}p{p}")
        for q, p in ((0.5, 50), (0.99, 99))
    )


def _workflow_runs(board: Board) -> None:
    """Workflow runs (service/domain/workflows): outcomes, stuck and active runs, steps, queue."""
    board.row("Workflow runs (domain/workflows)").add(
        timeseries_panel(
            "Runs finished by status and cause",
            "Runs reaching a status per second: succeeded; compensated (a step failed, its earlier steps"
            " undone) and failed spend the workflow-run success SLO when their cause is vigil, not when"
            " it is remote (the user's integration failed, D66); stuck (a lease expired, the run is"
            " retried) is not an end and shows how often workers are lost.",
            query(f"sum by (status, cause) (rate({sel('workflow_runs_total')}[{RATE}]))", "{{status}} ({{cause}})"),
            unit="ops",
            w=8,
        ),
        timeseries_panel(
            "Stuck runs",
            "Runs whose lease expired and that the reaper has not recovered yet (every worker reports the"
            " same count, from PostgreSQL). A working reaper clears them within two ticks; at or above"
            " the dashed line for 5 minutes VigilWorkflowRunsStuck fires.",
            query(f"max by (job) ({sel('workflow_runs_stuck')})", "stuck"),
            w=8,
            min_val=0,
            threshold_line=((None, "green"), (1, "red")),
        ),
        timeseries_panel(
            "Active runs",
            "Runs waiting for a worker (queued) and executing or compensating (running), from PostgreSQL.",
            query(f"max by (status) ({sel('workflow_runs_active')})", "{{status}}"),
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "Step duration p50/p99 by kind",
            "Duration of one attempt of a step or compensation (http, delay, emit_event, email), every"
            " outcome included: a p99 at a step's timeout means calls time out.",
            *_quantiles("workflow_step_duration_seconds", "kind"),
            unit="s",
            w=12,
            min_val=0,
        ),
        timeseries_panel(
            "Step attempts by outcome",
            "Step and compensation attempts per second by kind and outcome: succeeded, failed, timeout,"
            " lost (the worker lost its lease mid-step).",
            query(
                f"sum by (kind, outcome) (rate({sel('workflow_step_duration_seconds_count')}[{RATE}]))",
                "{{kind}} {{outcome}}",
            ),
            unit="ops",
            w=12,
        ),
        timeseries_panel(
            "Queue depth",
            "Jobs waiting in the worker's SAQ queue (runs, analyses, replays...): a steady climb means"
            " the workers do not keep up.",
            query(f"max by (queue) ({sel('worker_queue_depth')})", "{{queue}}"),
            w=12,
            min_val=0,
        ),
        timeseries_panel(
            "Pickup latency p50/p99",
            "Time from a run's queueing (or its scheduled time) to its first claim by a worker.",
            *_quantiles("workflow_run_pickup_latency_seconds"),
            unit="s",
            w=12,
            min_val=0,
        ),
    )


def _patterns(board: Board) -> None:
    """Pattern analysis (service/domain/patterns): requests, runs, duration, suggestions."""
    board.row("Pattern analysis (domain/patterns)").add(
        timeseries_panel(
            "Pattern analyses by outcome",
            "Analyses per second: succeeded, dead_lettered (failed after retries, replayed later from"
            " the patterns DLQ); and requests: enqueued, deduplicated (debounced), failed (queue down).",
            query(f"sum by (outcome) (rate({sel('pattern_analysis_runs_total')}[{RATE}]))", "run {{outcome}}"),
            query(f"sum by (outcome) (rate({sel('pattern_analysis_enqueues_total')}[{RATE}]))", "request {{outcome}}"),
            unit="ops",
            w=8,
        ),
        timeseries_panel(
            "Pattern analysis duration p99",
            "99th percentile of one user's analysis, retries included (bounded by the look-back window).",
            query(
                "histogram_quantile(0.99, sum by (le) "
                f"(rate({sel('pattern_analysis_duration_seconds_bucket')}[{RATE}])))",
                "p99",
            ),
            unit="s",
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "Suggestions created",
            "Workflow suggestions created from strong patterns per second, by pattern kind.",
            query(f"sum by (kind) (rate({sel('pattern_suggestions_created_total')}[{RATE}]))", "{{kind}}"),
            unit="ops",
            w=8,
        ),
    )


def _integrations(board: Board) -> None:
    """Integrations (service/domain/integrations): outbound calls, token refreshes, credentials."""
    board.row("Integrations (domain/integrations)").add(
        timeseries_panel(
            "Integration calls by outcome",
            "Outbound calls per second by connector kind and outcome: success, client_error, unauthorized,"
            " server_error, timeout, transport_error, rejected (that integration's breaker open), needs_reauth.",
            query(
                f"sum by (connector, outcome) (rate({sel('integration_calls_total')}[{RATE}]))",
                "{{connector}} {{outcome}}",
            ),
            unit="ops",
            w=8,
        ),
        timeseries_panel(
            "Integration call duration p95",
            "95th percentile of outbound requests that got an answer, by connector kind.",
            query(
                "histogram_quantile(0.95, sum by (le, connector) "
                f"(rate({sel('integration_call_duration_seconds_bucket')}[{RATE}])))",
                "{{connector}} p95",
            ),
            unit="s",
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "Token refreshes by outcome",
            "OAuth refreshes per second: success, failed (token endpoint down or erroring), refused"
            " (refresh token rejected: the integration needs its user to reconnect it).",
            query(
                f"sum by (outcome) (rate({sel('integration_token_refreshes_total')}[{RATE}]))",
                "{{outcome}}",
            ),
            unit="ops",
            w=8,
        ),
        timeseries_panel(
            "Credentials expiring or needing re-authorisation",
            "Active integrations whose credentials expire soon without renewal, and integrations whose"
            " refresh token was refused (calls fail until reconnected), by connector.",
            query(f"max by (connector) ({sel('integration_credentials_expiring')})", "expiring {{connector}}"),
            query(f"max by (connector) ({sel('integration_needs_reauth')})", "needs reauth {{connector}}"),
            w=24,
            min_val=0,
        ),
    )


def build() -> dashboard.Dashboard:
    board = Board(
        UID,
        "Vigil / Workflows & worker",
        ["workflows", "worker"],
        "The background worker: is it up, and is its work (e-mail delivery, dead-letter replay) keeping up.",
    )
    board.row("Worker").add(
        state_timeline(
            "Scrape target up",
            "Whether Prometheus reaches each instance's /metrics (the worker's job is vigil-worker).",
            query(f"max by (job, instance) ({sel('up')})", "{{job}} {{instance}}"),
            ((0, "down", "red"), (1, "up", "green")),
            w=24,
            h=5,
        ),
    )
    board.row("E-mail delivery").add(
        timeseries_panel(
            "Deliveries by outcome",
            "Delivery attempts per second: sent, retry (will retry), dead (last attempt failed),"
            " rejected (SMTP breaker open, not attempted).",
            query(f"sum by (outcome) (rate({sel('email_deliveries_total')}[{RATE}]))", "{{outcome}}"),
            unit="cps",
            w=8,
        ),
        timeseries_panel(
            "Outbox backlog",
            "E-mails waiting for delivery, and dead ones waiting for a human.",
            query(f"max({sel('email_outbox_pending')})", "pending"),
            query(f"max({sel('email_outbox_dead')})", "dead"),
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "Oldest pending e-mail",
            "Age of the oldest undelivered e-mail: a steady climb means the worker is not keeping up.",
            query(f"max({sel('email_outbox_oldest_pending_age_seconds')})", "oldest"),
            unit="s",
            w=8,
            min_val=0,
        ),
    )
    replays = sel("dlq_messages_total", 'action=~"replayed|discarded"')
    board.row("Dead-letter replay").add(
        timeseries_panel(
            "Replayed and discarded messages",
            "Dead-lettered messages the worker replayed or discarded, per second and queue.",
            query(
                f"sum by (queue, action) (rate({replays}[{RATE}]))",
                "{{queue}} {{action}}",
            ),
            unit="cps",
            w=12,
        ),
        timeseries_panel(
            "DLQ depth",
            "Messages still parked per queue.",
            query(f"max by (queue) ({sel('dlq_depth')})", "{{queue}}"),
            w=12,
            min_val=0,
        ),
    )
    _workflow_runs(board)
    _patterns(board)
    _integrations(board)
    return board.build()
