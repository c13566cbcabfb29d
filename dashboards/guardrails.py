"""Guardrails: one row per guardrail of docs/guardrails.md, named as in service/guardrails/, so
an alert's runbook can say "open the <guardrail> row"."""

from __future__ import annotations

from grafana_foundation_sdk.models import dashboard

from dashboards.panels import (
    RATE,
    Board,
    query,
    sel,
    stat_panel,
    state_timeline,
    timeseries_panel,
)

__all__ = ["POOL_SATURATION", "UID", "build"]

UID = "vigil-guardrails"

#: Pool utilisation at which VigilDatabasePoolSaturated fires and readiness reports `warn`.
POOL_SATURATION = 0.8

_POOL = "db_client_connection_pool_name"
_UP_DOWN = ((0, "down", "red"), (1, "up", "green"))
_FALLBACK = ((0, "Redis", "green"), (1, "in-memory fallback", "orange"))
#: circuit_breaker_state has one 0/1 series per state; the timeline encodes the current one as a number.
_BREAKER_STATES = (
    (0, "closed", "green"),
    (1, "open", "red"),
    (2, "half_open", "yellow"),
    (3, "forced_open", "purple"),
    (4, "disabled", "blue"),
)


def _rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}[{RATE}])"


def _p99(histogram: str, by: str) -> str:
    return f"histogram_quantile(0.99, sum by (le, {by}) ({_rate(histogram + '_bucket')}))"


def _breaker_state() -> str:
    def state(name: str) -> str:
        return sel("circuit_breaker_state", f'state="{name}"')

    encoded = " + ".join([state("open"), *(f"ignoring(state) ({n} * {state(s)})" for n, s, _ in _BREAKER_STATES[2:])])
    return f"max by (instance, breaker) ({encoded})"


def _database(board: Board) -> None:
    by = f"instance, {_POOL}"
    legend = "{{instance}} {{" + _POOL + "}}"
    used = sel("db_client_connection_count", 'db_client_connection_state="used"')
    board.row("Database pool (guardrails/database.py, db/pool.py)").add(
        timeseries_panel(
            "Pool utilisation",
            "Connections in use / most the pool may hold. Above the red line (80%) readiness reports"
            " `warn` and VigilDatabasePoolSaturated fires; at 100% checkouts wait, then shed with 503.",
            query(f"sum by ({by}) ({used}) / sum by ({by}) ({sel('db_client_connection_max')})", legend),
            unit="percentunit",
            w=8,
            min_val=0,
            max_val=1,
            threshold_line=((None, "green"), (POOL_SATURATION, "red")),
        ),
        timeseries_panel(
            "Pending connection requests",
            "Requests waiting for a pooled connection now.",
            query(f"sum by ({by}) ({sel('db_client_connection_pending_requests')})", legend),
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "Connection timeouts",
            "Checkouts per second that gave up waiting (each answered 503 + Retry-After).",
            query(f"sum by ({by}) ({_rate('db_client_connection_timeouts_total')})", legend),
            unit="cps",
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "Connection wait time p99",
            "99th percentile of the wait for a pooled connection.",
            query(_p99("db_client_connection_wait_time_seconds", by), legend),
            unit="s",
            w=12,
        ),
        timeseries_panel(
            "Connections by state",
            "Idle and used connections, every pool.",
            query(
                f"sum by (db_client_connection_state) ({sel('db_client_connection_count')})",
                "{{db_client_connection_state}}",
            ),
            w=12,
            min_val=0,
        ),
    )


def _breakers(board: Board) -> None:
    transitions = sel("circuit_breaker_transitions_total")
    board.row("Circuit breakers (guardrails/breaker.py)").add(
        state_timeline(
            "Breaker state",
            "State of each breaker over time. open: calls are refused with 503 + Retry-After;"
            " forced_open/disabled: an operator override (PUT /admin/breakers/<name>, `vigil breaker`).",
            query(_breaker_state(), "{{breaker}} on {{instance}}"),
            _BREAKER_STATES,
            w=24,
            h=6,
        ),
        timeseries_panel(
            "Breaker calls by outcome",
            "Calls per second through each breaker: successful, failed, slow, not_permitted (refused while open).",
            query(f"sum by (breaker, outcome) ({_rate('circuit_breaker_calls_total')})", "{{breaker}} {{outcome}}"),
            unit="cps",
            w=8,
        ),
        timeseries_panel(
            "Failure and slow-call rate",
            "Share of failed and slow calls in each breaker's sliding window (hidden below the minimum"
            " number of calls, where the breaker reports -1).",
            query(f"max by (breaker) ({sel('circuit_breaker_failure_rate')} >= 0)", "failed {{breaker}}"),
            query(f"max by (breaker) ({sel('circuit_breaker_slow_call_rate')} >= 0)", "slow {{breaker}}"),
            unit="percentunit",
            w=8,
            min_val=0,
            max_val=1,
        ),
        timeseries_panel(
            "Breaker transitions",
            "State changes per interval.",
            query(
                f"sum by (breaker, from_state, to_state) (increase({transitions}[{RATE}]))",
                "{{breaker}} {{from_state}} → {{to_state}}",
            ),
            w=8,
            bars=True,
        ),
    )


def _limiter(board: Board) -> None:
    board.row("Rate limiting (guardrails/ratelimit.py) and identity").add(
        timeseries_panel(
            "Limiter decisions",
            "Decisions per second by policy, decision (allowed/limited) and backend (redis/memory).",
            query(
                f"sum by (policy, decision, backend) ({_rate('rate_limiter_decisions_total')})",
                "{{policy}} {{decision}} ({{backend}})",
            ),
            unit="cps",
            w=8,
        ),
        state_timeline(
            "Limiter fallback",
            "In-memory fallback: Redis is unreachable, so limits are enforced per instance.",
            query(f"max by (instance) ({sel('rate_limiter_fallback_active')})", "{{instance}}"),
            _FALLBACK,
            w=8,
        ),
        timeseries_panel(
            "Authentication events",
            "Authentication events per second by type; a rise of login_failed is guessing, one of"
            " access_token_invalid forged or foreign tokens, one of access_token_expired clients that"
            " do not refresh.",
            query(f"sum by (event) ({_rate('auth_events_total')})", "{{event}}"),
            unit="cps",
            w=8,
        ),
    )


def _cache(board: Board) -> None:
    requests = "cache_requests_total"
    hits = _rate(requests, 'result="hit"')
    # Lookups whose Redis read failed count as `error` whatever then answered them: not in the ratio.
    answered = _rate(requests, 'result=~"hit|miss|stale"')
    board.row("Cache (guardrails/cache.py) and degradation (guardrails/degradation.py)").add(
        timeseries_panel(
            "Cache hit ratio",
            "hit / (hit + miss + stale) per cache; lookups that failed in Redis are excluded.",
            query(f"sum by (cache) ({hits}) / (sum by (cache) ({answered}) > 0)", "{{cache}}"),
            unit="percentunit",
            w=8,
            min_val=0,
            max_val=1,
        ),
        timeseries_panel(
            "Cache requests by result",
            "Lookups per second: hit, miss, stale (served past freshness), error (Redis failed).",
            query(f"sum by (cache, result) ({_rate(requests)})", "{{cache}} {{result}}"),
            unit="cps",
            w=8,
        ),
        state_timeline(
            "Cache fallback",
            "In-memory fallback: Redis is unreachable, each instance caches on its own.",
            query(f"max by (instance, cache) ({sel('cache_fallback_active')})", "{{cache}} on {{instance}}"),
            _FALLBACK,
            w=8,
        ),
        timeseries_panel(
            "Recomputations by reason",
            "Loader calls per second: miss, early_refresh (XFetch), fallback.",
            query(f"sum by (cache, reason) ({_rate('cache_recomputations_total')})", "{{cache}} {{reason}}"),
            unit="cps",
            w=8,
        ),
        timeseries_panel(
            "Degraded responses by route",
            "Responses served stale from the cache while the database is unavailable (Vigil-Degraded: stale).",
            query(f"sum by (route) ({_rate('degraded_responses_total')})", "{{route}}"),
            unit="reqps",
            w=8,
        ),
        timeseries_panel(
            "Retries by outcome",
            "Attempts per second of retried idempotent operations: success, retry, exhausted, non_retryable.",
            query(f"sum by (operation, outcome) ({_rate('retry_attempts_total')})", "{{operation}} {{outcome}}"),
            unit="cps",
            w=8,
        ),
    )


def _dependencies(board: Board) -> None:
    board.row("Dependencies and schema (probes.py)").add(
        state_timeline(
            "Dependency up/down",
            "Result of the background probe of each dependency; down if any instance sees it down.",
            query(f"min by (dependency) ({sel('dependency_up')})", "{{dependency}}"),
            _UP_DOWN,
            w=12,
            h=6,
        ),
        timeseries_panel(
            "Dependency probe duration p99",
            "99th percentile of probe durations (a timed-out probe counts its timeout).",
            query(_p99("dependency_probe_duration_seconds", "dependency"), "{{dependency}}"),
            unit="s",
            w=6,
            h=6,
        ),
        stat_panel(
            "Migration drift",
            "Revisions each instance's database is behind the code's head; 'unknown' when the database"
            " has a revision the code does not know. Fix: `vigil db upgrade`.",
            query(f"max by (instance) ({sel('db_migration_drift')})", "{{instance}}", instant=True),
            w=6,
            h=6,
            steps=((None, "red"), (0, "green"), (1, "red")),
            mappings=[dashboard.ValueMap(options={"-1": dashboard.ValueMappingResult(text="unknown", color="red")})],
        ),
    )


def _queues(board: Board) -> None:
    board.row("Dead-letter queues (guardrails/dlq.py)").add(
        timeseries_panel(
            "DLQ depth",
            "Messages parked per dead-letter queue (Redis and local spool together).",
            query(f"max by (queue) ({sel('dlq_depth')})", "{{queue}}"),
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "DLQ oldest message age",
            "Age of the oldest parked message per queue; a steady climb means nothing replays it.",
            query(f"max by (queue) ({sel('dlq_oldest_age_seconds')})", "{{queue}}"),
            unit="s",
            w=8,
            min_val=0,
        ),
        timeseries_panel(
            "DLQ traffic",
            "Messages per second by queue and action: enqueued, replayed, discarded.",
            query(f"sum by (queue, action) ({_rate('dlq_messages_total')})", "{{queue}} {{action}}"),
            unit="cps",
            w=8,
        ),
    )


def _events(board: Board) -> None:
    depth = sel("dlq_depth", 'queue="events"')
    board.row("Events (domain/events): ingestion, chunks, dead-letter backpressure").add(
        timeseries_panel(
            "Events ingested by outcome",
            "Events per second by path (single, batch) and outcome: stored, duplicate, rejected (invalid),"
            " deferred (to the events dead-letter queue), failed (not accepted: database and queue both down).",
            query(f"sum by (path, outcome) ({_rate('events_ingested_total')})", "{{path}} {{outcome}}"),
            unit="cps",
            w=12,
        ),
        timeseries_panel(
            "Event listener errors",
            "Listener calls (pattern analysis, real-time fan-out) that raised; the events stay stored.",
            query(f"sum({_rate('events_listener_errors_total')})", "errors"),
            unit="cps",
            w=6,
        ),
        timeseries_panel(
            "Events backlog vs backpressure",
            "Depth of the events dead-letter queue; above VIGIL_EVENTS_BACKPRESSURE_DEPTH new writes get 503.",
            query(f"max({depth})", "events DLQ depth"),
            w=6,
            min_val=0,
        ),
    )


def _outbox_and_audit(board: Board) -> None:
    board.row("E-mail outbox and audit log").add(
        timeseries_panel(
            "Outbox pending and dead",
            "E-mails not yet delivered, and those that exhausted their attempts and need a human.",
            query(f"max({sel('email_outbox_pending')})", "pending"),
            query(f"max({sel('email_outbox_dead')})", "dead"),
            w=6,
            min_val=0,
        ),
        timeseries_panel(
            "Outbox oldest pending age",
            "Age of the oldest undelivered e-mail.",
            query(f"max({sel('email_outbox_oldest_pending_age_seconds')})", "oldest"),
            unit="s",
            w=6,
            min_val=0,
        ),
        timeseries_panel(
            "E-mail deliveries by outcome",
            "Delivery attempts per second: sent, retry, dead, rejected (SMTP breaker open).",
            query(f"sum by (outcome) ({_rate('email_deliveries_total')})", "{{outcome}}"),
            unit="cps",
            w=6,
        ),
        timeseries_panel(
            "Audit entries by outcome",
            "Audit entries per second: written, dead_lettered (parked after failed writes), replayed;"
            " and the entries buffered in memory.",
            query(f"sum by (outcome) ({_rate('audit_entries_total')})", "{{outcome}}"),
            query(f"sum({sel('audit_buffer_entries')})", "buffered"),
            w=6,
        ),
    )


def _uploads(board: Board) -> None:
    free, floor = sel("upload_storage_free_bytes"), sel("upload_storage_min_free_bytes")
    board.row("Uploads (domain/uploads): disk guard, size, quota, type and name").add(
        timeseries_panel(
            "Upload storage free space",
            "Free bytes on the upload volume per instance, against the threshold below which uploads"
            " answer 507 (VigilUploadStorageLow fires at twice the threshold).",
            query(f"min by (instance) ({free})", "free {{instance}}"),
            query(f"max by (instance) ({floor})", "507 threshold {{instance}}"),
            unit="bytes",
            w=12,
            min_val=0,
        ),
        timeseries_panel(
            "Upload rejections by reason",
            "Refused uploads per second: too_large, quota, content_type, bad_name, disk_full (507), malformed.",
            query(f"sum by (reason) ({_rate('upload_rejections_total')})", "{{reason}}"),
            unit="cps",
            w=12,
        ),
    )


def _realtime(board: Board) -> None:
    local = sel("realtime_fanout_backend", 'backend="local"')
    board.row("Realtime (domain/realtime): WebSocket fan-out").add(
        state_timeline(
            "Fan-out backend",
            "redis: messages cross instances; local: Redis unreachable, each instance delivers only"
            " its own messages (VigilRealtimeFanoutDegraded after 5 minutes).",
            query(f"max by (instance) ({local})", "{{instance}}"),
            ((0, "redis", "green"), (1, "local only", "orange")),
            w=6,
        ),
        timeseries_panel(
            "WebSocket connections",
            "Open authenticated connections per instance.",
            query(f"sum by (instance) ({sel('realtime_connections')})", "{{instance}}"),
            w=6,
            min_val=0,
        ),
        timeseries_panel(
            "WebSocket messages",
            "Messages per second by direction (out to clients, in from them) and kind.",
            query(f"sum by (direction, kind) ({_rate('realtime_messages_total')})", "{{direction}} {{kind}}"),
            unit="cps",
            w=6,
        ),
        timeseries_panel(
            "Closed and refused connections",
            "Slow consumers closed with 1013 (their buffer filled; they resume from history) and"
            " connections refused by reason (unauthenticated, auth_timeout, bad_message, limit).",
            query(f"sum by (reason) ({_rate('realtime_messages_dropped_total')})", "dropped {{reason}}"),
            query(f"sum by (reason) ({_rate('realtime_connections_rejected_total')})", "refused {{reason}}"),
            unit="cps",
            w=6,
        ),
    )


def build() -> dashboard.Dashboard:
    board = Board(
        UID,
        "Vigil / Guardrails",
        ["guardrails"],
        "Every guardrail of docs/guardrails.md: what it is doing now and when it acted.",
    )
    for row in (
        _database,
        _breakers,
        _limiter,
        _cache,
        _dependencies,
        _queues,
        _events,
        _outbox_and_audit,
        _uploads,
        _realtime,
    ):
        row(board)
    return board.build()
