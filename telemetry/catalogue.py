"""The metric catalogue: the one list of every metric Vigil exposes (the contract).

Dashboards, alert rules, docs and tests read names from here. Names follow the
OpenTelemetry semantic conventions translated to Prometheus: dots become underscores, the
unit is a suffix (``_seconds``, ``_bytes``) and counters end in ``_total``.

Labels are bounded by construction: none of them ever carries a user id, a raw path, an
e-mail, an error message or a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CATALOGUE", "HTTP_DURATION_BUCKETS", "MetricSpec", "spec"]

Kind = Literal["counter", "gauge", "histogram"]

#: OpenTelemetry's advisory buckets for ``http.server.request.duration``.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the contract, as a scraper sees it."""

    name: str
    """Exposed name; counters include ``_total``."""

    kind: Kind
    unit: str
    """UCUM-style unit: ``s``, ``By``, ``1`` or a ``{annotation}``."""

    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()
    """Histogram bucket bounds in the metric's unit."""

    collected: bool = False
    """True when the value is read from live state at scrape time by a collector (for example
    the connection pool) rather than updated as things happen."""

    per_request: bool = False
    """True for a histogram observed on every request (its latency, its pool checkout), from one
    event loop's thread only: it is a :class:`telemetry.metrics.LoopHistogram` (no lock,
    exemplars kept per bucket) rather than prometheus-client's ``Histogram`` (D68). Exposed
    alike, without the ``_created`` sample."""


CATALOGUE: tuple[MetricSpec, ...] = (
    # --- HTTP server (OTel http.server.*) ---------------------------------------------------
    MetricSpec(
        "http_server_request_duration_seconds",
        "histogram",
        "s",
        ("http_request_method", "http_route", "http_response_status_code"),
        "Duration of HTTP server requests, by route template.",
        buckets=HTTP_DURATION_BUCKETS,
        per_request=True,
    ),
    MetricSpec(
        "http_server_active_requests",
        "gauge",
        "{request}",
        ("http_request_method",),
        "HTTP server requests in flight.",
        collected=True,
    ),
    # --- Database connection pool (OTel db.client.connection.*) -----------------------------
    MetricSpec(
        "db_client_connection_count",
        "gauge",
        "{connection}",
        ("db_client_connection_pool_name", "db_client_connection_state"),
        "Connections in the pool by state (idle or used).",
        collected=True,
    ),
    MetricSpec(
        "db_client_connection_max",
        "gauge",
        "{connection}",
        ("db_client_connection_pool_name",),
        "Most connections the pool may hold (size plus overflow).",
        collected=True,
    ),
    MetricSpec(
        "db_client_connection_pending_requests",
        "gauge",
        "{request}",
        ("db_client_connection_pool_name",),
        "Requests waiting for a pooled connection.",
        collected=True,
    ),
    MetricSpec(
        "db_client_connection_timeouts_total",
        "counter",
        "{timeout}",
        ("db_client_connection_pool_name",),
        "Checkouts that gave up waiting for a pooled connection.",
    ),
    MetricSpec(
        "db_client_connection_wait_time_seconds",
        "histogram",
        "s",
        ("db_client_connection_pool_name",),
        "Time spent waiting for a pooled connection.",
        buckets=WAIT_BUCKETS,
        per_request=True,
    ),
    # --- Dependencies and schema --------------------------------------------------------------
    MetricSpec(
        "db_migration_drift",
        "gauge",
        "{revision}",
        (),
        "Migration revisions the database is behind the code's head; -1 = unknown revision.",
    ),
    MetricSpec(
        "dependency_up",
        "gauge",
        "1",
        ("dependency",),
        "1 when the last probe of the dependency succeeded within its timeout, else 0.",
    ),
    MetricSpec(
        "dependency_probe_duration_seconds",
        "histogram",
        "s",
        ("dependency",),
        "Duration of background dependency probes (a timed-out probe counts its timeout).",
        buckets=WAIT_BUCKETS,
    ),
    # --- Circuit breakers (service/guardrails/breaker.py) ---------------------------------------
    MetricSpec(
        "circuit_breaker_state",
        "gauge",
        "1",
        ("breaker", "state"),
        "1 for the breaker's current state, 0 for the others (closed/open/half_open/forced_open/disabled).",
    ),
    MetricSpec(
        "circuit_breaker_calls_total",
        "counter",
        "{call}",
        ("breaker", "outcome"),
        "Calls through a breaker by outcome: successful, failed, slow, not_permitted.",
    ),
    MetricSpec(
        "circuit_breaker_transitions_total",
        "counter",
        "{transition}",
        ("breaker", "from_state", "to_state"),
        "State transitions of a breaker.",
    ),
    MetricSpec(
        "circuit_breaker_failure_rate",
        "gauge",
        "1",
        ("breaker",),
        "Share of failed calls in the breaker's sliding window (0-1); -1 below the minimum number of calls.",
    ),
    MetricSpec(
        "circuit_breaker_slow_call_rate",
        "gauge",
        "1",
        ("breaker",),
        "Share of slow calls in the breaker's sliding window (0-1); -1 below the minimum number of calls.",
    ),
    # --- Retry (service/guardrails/retry.py) ----------------------------------------------------
    MetricSpec(
        "retry_attempts_total",
        "counter",
        "{attempt}",
        ("operation", "outcome"),
        "Attempts of retried idempotent operations: success, retry (transient error, will retry),"
        " exhausted (transient error, no attempts or time left), non_retryable.",
    ),
    # --- Cache (service/guardrails/cache.py) ----------------------------------------------------
    MetricSpec(
        "cache_requests_total",
        "counter",
        "{request}",
        ("cache", "result"),
        "Cache lookups by result: hit, miss, stale (served past freshness), error (storage failed).",
    ),
    MetricSpec(
        "cache_fallback_active",
        "gauge",
        "1",
        ("cache",),
        "1 while the cache serves from its in-process fallback because Redis is unreachable.",
    ),
    MetricSpec(
        "cache_recomputations_total",
        "counter",
        "{computation}",
        ("cache", "reason"),
        "Values computed by the cache's loader: miss, early_refresh (XFetch), fallback.",
    ),
    # --- Graceful degradation ---------------------------------------------------------------------
    MetricSpec(
        "degraded_responses_total",
        "counter",
        "{response}",
        ("route",),
        "Responses served degraded (stale data from cache while the database is unavailable), by route template.",
    ),
    # --- Rate limiting (service/guardrails/ratelimit.py) ---------------------------------------
    MetricSpec(
        "rate_limiter_decisions_total",
        "counter",
        "{decision}",
        ("policy", "decision", "backend"),
        "Rate-limit decisions by policy (auth/user/anonymous), decision (allowed/limited) and backend (redis/memory).",
    ),
    MetricSpec(
        "rate_limiter_fallback_active",
        "gauge",
        "1",
        (),
        "1 while rate limits are enforced per instance in memory because Redis is unreachable.",
    ),
    # --- Identity (service/domain/auth) ------------------------------------------------------
    MetricSpec(
        "auth_events_total",
        "counter",
        "{event}",
        ("event",),
        "Authentication events: registered, verified, login_succeeded, login_failed, refreshed,"
        " refresh_reused, logged_out, logged_out_everywhere, and access tokens refused with a 401"
        " (access_token_expired, access_token_invalid).",
    ),
    # --- E-mail outbox (service/domain/email) -------------------------------------------------
    MetricSpec(
        "email_outbox_pending",
        "gauge",
        "{email}",
        (),
        "E-mails in the outbox not yet delivered (pending or being sent).",
    ),
    MetricSpec(
        "email_outbox_oldest_pending_age_seconds",
        "gauge",
        "s",
        (),
        "Age of the oldest undelivered e-mail in the outbox; 0 when none.",
    ),
    MetricSpec(
        "email_outbox_dead",
        "gauge",
        "{email}",
        (),
        "E-mails that exhausted their delivery attempts and need a human.",
    ),
    MetricSpec(
        "email_deliveries_total",
        "counter",
        "{delivery}",
        ("outcome",),
        "Delivery attempts by outcome: sent, retry (failed, will retry), dead (failed for the last time),"
        " rejected (breaker open, not attempted).",
    ),
    # --- Audit log (service/domain/audit) -----------------------------------------------------
    MetricSpec(
        "audit_entries_total",
        "counter",
        "{entry}",
        ("outcome",),
        "Audit entries by outcome: written, dead_lettered (parked after failed writes), replayed.",
    ),
    MetricSpec(
        "audit_buffer_entries",
        "gauge",
        "{entry}",
        (),
        "Audit entries waiting in memory for their write.",
    ),
    # --- Uploads (service/domain/uploads) -----------------------------------------------------
    MetricSpec(
        "upload_storage_free_bytes",
        "gauge",
        "By",
        (),
        "Free bytes on the upload storage volume (read at scrape time); NaN when unreadable.",
    ),
    MetricSpec(
        "upload_storage_min_free_bytes",
        "gauge",
        "By",
        (),
        "Free bytes below which uploads are refused with 507 (the configured threshold).",
    ),
    MetricSpec(
        "upload_rejections_total",
        "counter",
        "{upload}",
        ("reason",),
        "Uploads refused, by reason: too_large, quota, content_type, bad_name, disk_full, malformed.",
    ),
    # --- Dead-letter queues (service/guardrails/dlq.py) ---------------------------------------
    MetricSpec(
        "dlq_depth",
        "gauge",
        "{message}",
        ("queue",),
        "Messages parked in a dead-letter queue (Redis and local spool together).",
    ),
    MetricSpec(
        "dlq_oldest_age_seconds",
        "gauge",
        "s",
        ("queue",),
        "Age of the oldest message in a dead-letter queue; 0 when empty.",
    ),
    MetricSpec(
        "dlq_messages_total",
        "counter",
        "{message}",
        ("queue", "action"),
        "Dead-letter queue traffic by action: enqueued, replayed, discarded.",
    ),
    # --- Realtime (service/domain/realtime) --------------------------------------------------
    MetricSpec(
        "realtime_connections",
        "gauge",
        "{connection}",
        (),
        "Open, authenticated WebSocket connections on this instance.",
    ),
    MetricSpec(
        "realtime_messages_total",
        "counter",
        "{message}",
        ("direction", "kind"),
        "WebSocket messages by direction (out: sent to clients; in: received from them) and kind"
        " (event, pattern, suggestion, workflow_run, control).",
    ),
    MetricSpec(
        "realtime_messages_dropped_total",
        "counter",
        "{message}",
        ("reason",),
        "Messages not delivered live: slow_consumer (the connection's send queue was full, so it"
        " was closed with 1013; the client resumes from history).",
    ),
    MetricSpec(
        "realtime_connections_rejected_total",
        "counter",
        "{connection}",
        ("reason",),
        "WebSocket connections refused: unauthenticated, auth_timeout, bad_message, limit.",
    ),
    MetricSpec(
        "realtime_fanout_backend",
        "gauge",
        "1",
        ("backend",),
        "1 for the fan-out backend in use: redis (across instances) or local (this instance only,"
        " Redis unreachable); the other series is 0.",
    ),
    # --- Pattern analysis (service/domain/patterns) ------------------------------------------
    MetricSpec(
        "pattern_analysis_enqueues_total",
        "counter",
        "{job}",
        ("outcome",),
        "Requests for a user's pattern analysis by outcome: enqueued, deduplicated (one already"
        " waiting: debounced), failed (queue unreachable; the sweep catches the user later).",
    ),
    MetricSpec(
        "pattern_analysis_runs_total",
        "counter",
        "{run}",
        ("outcome",),
        "Pattern analyses by outcome: succeeded, dead_lettered (failed after its retries; replayed"
        " later from the patterns dead-letter queue).",
    ),
    MetricSpec(
        "pattern_analysis_duration_seconds",
        "histogram",
        "s",
        (),
        "Duration of one user's pattern analysis, retries included.",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    ),
    MetricSpec(
        "pattern_suggestions_created_total",
        "counter",
        "{suggestion}",
        ("kind",),
        "Workflow suggestions created from strong patterns, by pattern kind: time_of_day, sequence.",
    ),
    # --- Workflows (service/domain/workflows; emitted by the worker) -------------------------
    MetricSpec(
        "workflow_runs_total",
        "counter",
        "{run}",
        ("status", "cause"),
        "Workflow runs reaching a status: succeeded, compensated (a step failed; every compensation"
        " succeeded), failed (a step failed and compensation was impossible or failed, or the run"
        " was abandoned), stuck (its lease expired: worker lost; then retried or compensated)."
        " cause: none (succeeded), remote (an integration call failed on the user's side: error"
        " status, timeout, unreachable, missing or needing reconnection), vigil (anything else).",
    ),
    MetricSpec(
        "workflow_runs_active",
        "gauge",
        "{run}",
        ("status",),
        "Runs waiting for a worker (queued) or executing (running, compensating included), from the database.",
    ),
    MetricSpec(
        "workflow_runs_stuck",
        "gauge",
        "{run}",
        (),
        "Runs whose lease expired without a heartbeat (worker killed, event loop blocked), marked"
        " stuck or about to be, from the database; the reaper retries or compensates them.",
    ),
    MetricSpec(
        "workflow_step_duration_seconds",
        "histogram",
        "s",
        ("kind", "outcome"),
        "Duration of one attempt of a workflow step or compensation, by step kind (http, delay,"
        " emit_event, email) and outcome (succeeded, failed, timeout, lost).",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    ),
    MetricSpec(
        "workflow_run_pickup_latency_seconds",
        "histogram",
        "s",
        (),
        "Time from a run's queueing (or its scheduled time) to its first claim by a worker.",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    ),
    MetricSpec(
        "worker_queue_depth",
        "gauge",
        "{job}",
        ("queue",),
        "Jobs waiting in the worker's SAQ queue (all kinds), read from Redis.",
    ),
    # --- Events (service/domain/events) -------------------------------------------------------
    MetricSpec(
        "events_ingested_total",
        "counter",
        "{event}",
        ("path", "outcome"),
        "Events received by path (single, batch) and outcome: stored, duplicate (idempotency key"
        " seen before), rejected (invalid), deferred (dead-lettered, replayed later), failed (not"
        " accepted: the database and the dead-letter queue both unusable).",
    ),
    MetricSpec(
        "events_listener_errors_total",
        "counter",
        "{call}",
        (),
        "Event listener calls (pattern analysis, real-time fan-out) that raised; the events stay stored.",
    ),
    # --- Integrations (service/domain/integrations) ------------------------------------------
    MetricSpec(
        "integration_calls_total",
        "counter",
        "{call}",
        ("connector", "outcome"),
        "Outbound integration calls by connector kind and outcome: success, client_error, unauthorized,"
        " server_error, timeout, transport_error (unreachable, a non-public address refused, or an answer"
        " over VIGIL_INTEGRATION_MAX_RESPONSE_BYTES), rejected (breaker open), needs_reauth (not attempted).",
    ),
    MetricSpec(
        "integration_call_duration_seconds",
        "histogram",
        "s",
        ("connector",),
        "Duration of outbound integration requests that got an answer, by connector kind.",
        buckets=HTTP_DURATION_BUCKETS,
    ),
    MetricSpec(
        "integration_token_refreshes_total",
        "counter",
        "{refresh}",
        ("connector", "outcome"),
        "OAuth token refreshes by outcome: success, failed (token endpoint unreachable or erroring),"
        " refused (refresh token rejected: the integration needs re-authorisation).",
    ),
    MetricSpec(
        "integration_credentials_expiring",
        "gauge",
        "{integration}",
        ("connector",),
        "Active integrations whose credentials expire soon without renewal: API keys within the warning"
        " window, OAuth access tokens within the refresh margin (refresh not keeping up).",
    ),
    MetricSpec(
        "integration_needs_reauth",
        "gauge",
        "{integration}",
        ("connector",),
        "Integrations whose refresh token was refused: calls fail until a user reconnects them.",
    ),
    # --- Build ----------------------------------------------------------------------------------
    MetricSpec(
        "app_info",
        "gauge",
        "1",
        ("version", "env"),
        "Always 1; the labels say which build runs where.",
    ),
)

_BY_NAME = {m.name: m for m in CATALOGUE}


def spec(name: str) -> MetricSpec:
    """The catalogue entry for ``name``; ``KeyError`` when the contract has no such metric."""
    return _BY_NAME[name]
