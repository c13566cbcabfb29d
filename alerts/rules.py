"""Guardrail alerts: one where a human must act, named as DESIGN.md's alert contract lists.

Thresholds and ``for:`` durations are argued in each alert's runbook
(``docs/runbooks/<AlertName>.md``). Selectors name only catalogue metrics and labels
(``telemetry/catalogue.py``) plus Prometheus' own ``up``; ``make alerts`` writes these into
``alerts/generated/guardrails.yml``.

Series read from shared state (the DLQ in Redis, the outbox and workflow tables in PostgreSQL)
are reported identically by every instance, so those alerts aggregate with ``max``: one alert
per queue or job, not one per instance. Per-instance state (probes, pools, breakers,
fallbacks) alerts per instance, which lets ``VigilInstanceDown`` silence it (Alertmanager,
``equal: [instance]``).
"""

from __future__ import annotations

from alerts.alert import Alert

__all__ = ["GUARDRAILS"]

_POOL_UTILISATION = """
sum by (job, instance, db_client_connection_pool_name) (
  db_client_connection_count{db_client_connection_state="used"}
)
/ on (job, instance, db_client_connection_pool_name)
db_client_connection_max
"""

GUARDRAILS: tuple[Alert, ...] = (
    # --- Instances and dependencies ---------------------------------------------------------
    Alert(
        "VigilInstanceDown",
        "critical",
        'up{job=~"vigil-.*"} == 0',
        "2m",
        "A Vigil instance is down or cannot be scraped.",
        "Prometheus has failed to scrape {{ $labels.job }} at {{ $labels.instance }} for 2 minutes:"
        " the process is down, restarting in a loop or unreachable.",
        "vigil-overview",
    ),
    Alert(
        "VigilDatabaseDown",
        "critical",
        'dependency_up{dependency="postgres"} == 0',
        "1m",
        "PostgreSQL is unreachable from a Vigil instance.",
        "{{ $labels.instance }} ({{ $labels.job }}) has failed every PostgreSQL probe for 1 minute:"
        " writes answer 503, reads answer stale data from cache, readiness fails.",
        "vigil-guardrails",
    ),
    Alert(
        "VigilRedisDown",
        "critical",
        'dependency_up{dependency="redis"} == 0',
        "2m",
        "Redis is unreachable from a Vigil instance.",
        "{{ $labels.instance }} ({{ $labels.job }}) has failed every Redis probe for 2 minutes:"
        " background jobs are not picked up, rate limits apply per instance, caches serve from memory.",
        "vigil-guardrails",
    ),
    # --- Database pool ------------------------------------------------------------------------
    Alert(
        "VigilDatabasePoolSaturated",
        "warning",
        f"{_POOL_UTILISATION.strip()}\n> 0.8\n",
        "5m",
        "A database connection pool has been more than 80% used for 5 minutes.",
        "Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }} is"
        " {{ $value | humanizePercentage }} used: little headroom before requests wait for a"
        " connection and are shed with 503.",
        "vigil-guardrails",
    ),
    Alert(
        "VigilDatabasePoolSaturated",
        "critical",
        f"(\n{_POOL_UTILISATION.strip()}\n) > 0.95\n"
        "and on (job, instance, db_client_connection_pool_name)\n"
        "max_over_time(db_client_connection_pending_requests[1m]) > 0\n",
        "5m",
        "A database connection pool is exhausted and requests are waiting for connections.",
        "Pool {{ $labels.db_client_connection_pool_name }} on {{ $labels.instance }} has been"
        " {{ $value | humanizePercentage }} used with requests waiting for 5 minutes: requests"
        " are delayed up to the pool timeout and then shed with 503.",
        "vigil-guardrails",
    ),
    # --- Circuit breakers ----------------------------------------------------------------------
    # Open and half-open alternate every wait_in_open; "open most of the last 5 minutes" holds
    # through that, while a half-open breaker idling without traffic does not fire.
    Alert(
        "VigilCircuitBreakerOpen",
        "critical",
        'avg_over_time(circuit_breaker_state{breaker="database", state="open"}[5m]) > 0.5',
        "2m",
        "The database circuit breaker is open: database calls are rejected.",
        "Breaker {{ $labels.breaker }} on {{ $labels.instance }} was open"
        " {{ $value | humanizePercentage }} of the last 5 minutes: calls through it fail fast"
        " with 503 and Retry-After.",
        "vigil-guardrails",
        labels={"dependency": "postgres"},
    ),
    Alert(
        "VigilCircuitBreakerOpen",
        "warning",
        'avg_over_time(circuit_breaker_state{breaker!="database", state="open"}[5m]) > 0.5',
        "5m",
        "A circuit breaker is open: calls to its dependency are rejected.",
        "Breaker {{ $labels.breaker }} on {{ $labels.instance }} was open"
        " {{ $value | humanizePercentage }} of the last 5 minutes: the feature behind it fails"
        " fast or is deferred.",
        "vigil-guardrails",
    ),
    Alert(
        "VigilCircuitBreakerOverridden",
        "warning",
        'circuit_breaker_state{state=~"forced_open|disabled"} == 1',
        "1h",
        "A circuit breaker has been held by an operator override for an hour.",
        "Breaker {{ $labels.breaker }} on {{ $labels.instance }} has been {{ $labels.state }} by an"
        " operator for over an hour; when the incident is over, run"
        " `vigil breaker set {{ $labels.breaker }} auto`.",
        "vigil-guardrails",
    ),
    # --- Redis fallbacks (silenced by VigilRedisDown) ------------------------------------------
    Alert(
        "VigilRateLimiterDegraded",
        "warning",
        "rate_limiter_fallback_active == 1",
        "5m",
        "Rate limits are enforced per instance instead of globally.",
        "{{ $labels.instance }} ({{ $labels.job }}) has enforced rate limits from its in-memory"
        " fallback for 5 minutes: each instance grants the full limit, so clients get up to"
        " that many times their global limit.",
        "vigil-guardrails",
        labels={"dependency": "redis"},
    ),
    Alert(
        "VigilCacheFallbackActive",
        "warning",
        "cache_fallback_active == 1",
        "5m",
        "A cache serves from its in-process fallback instead of Redis.",
        "Cache {{ $labels.cache }} on {{ $labels.instance }} has served from its in-process"
        " fallback for 5 minutes because Redis errors or times out: more database load, and"
        " instances no longer share cached values.",
        "vigil-guardrails",
        labels={"dependency": "redis"},
    ),
    Alert(
        "VigilRealtimeFanoutDegraded",
        "warning",
        'realtime_fanout_backend{backend="local"} == 1',
        "5m",
        "Real-time updates are delivered within one instance only.",
        "{{ $labels.instance }} ({{ $labels.job }}) has fanned WebSocket messages out locally for"
        " 5 minutes because Redis is unreachable: clients connected to another instance miss this"
        " one's messages and resume from a history that lacks them.",
        "vigil-guardrails",
        labels={"dependency": "redis"},
    ),
    # --- Durable work: dead-letter queues, outbox, schema ---------------------------------------
    Alert(
        "VigilDeadLetterQueueBacklog",
        "warning",
        "max by (queue) (dlq_depth) > 0",
        "15m",
        "Messages have been parked in a dead-letter queue for 15 minutes.",
        "Dead-letter queue {{ $labels.queue }} holds {{ $value }} message(s): work accepted from"
        " clients is not written yet and automatic replay has not drained it.",
        "vigil-guardrails",
    ),
    Alert(
        "VigilDeadLetterQueueBacklog",
        "critical",
        "max by (queue) (dlq_oldest_age_seconds) > 3600",
        "5m",
        "A dead-letter queue holds a message older than an hour.",
        "The oldest message in dead-letter queue {{ $labels.queue }} is"
        " {{ $value | humanizeDuration }} old: replay is failing, and entries spooled on an"
        " instance's disk are lost if that instance is replaced.",
        "vigil-guardrails",
    ),
    Alert(
        "VigilMigrationDrift",
        "warning",
        "db_migration_drift != 0",
        "10m",
        "The database schema has not matched the code's migration head for 10 minutes.",
        "{{ $labels.instance }} ({{ $labels.job }}) reports migration drift {{ $value }}"
        " (revisions the database is behind the code's head; -1: a revision this code does not"
        " know): in production it answers 503 on readiness.",
        "vigil-guardrails",
    ),
    Alert(
        "VigilEmailOutboxBacklog",
        "warning",
        "max by (job) (email_outbox_oldest_pending_age_seconds) > 900",
        "5m",
        "E-mails have waited in the outbox for more than 15 minutes.",
        "The oldest undelivered e-mail in the outbox is {{ $value | humanizeDuration }} old"
        " ({{ $labels.job }}): verification and notification e-mails are late.",
        "vigil-workflows",
    ),
    Alert(
        "VigilEmailDead",
        "warning",
        "max by (job) (email_outbox_dead) > 0",
        "5m",
        "E-mails exhausted their delivery attempts and need a human.",
        "{{ $value }} e-mail(s) in the outbox are dead ({{ $labels.job }}): every delivery attempt"
        " failed and nothing will retry them.",
        "vigil-workflows",
    ),
    # --- Workflows --------------------------------------------------------------------------------
    # A lost run is normal (a worker killed mid-run) and heals itself: the reaper marks it stuck
    # on its first tick after the lease expired and requeues it on the next, so the gauge is
    # above 0 for two ticks (10 s by default, under 2 minutes at the longest tick), however long
    # the lease. 5 minutes of stuck runs without a break is no longer a lost worker: the reaper
    # is not running (cron not firing, its job failing) or runs are lost as fast as they are
    # recovered (a worker crash-looping on one run). 15 minutes would leave runs frozen for a
    # quarter of an hour before anyone knows. A ticket, not a page: nothing is lost (the runs
    # wait in PostgreSQL) and the SLO pages if runs end failed; Redis or PostgreSQL down, which
    # also stop the reaper, page on their own.
    Alert(
        "VigilWorkflowRunsStuck",
        "warning",
        "max by (job) (workflow_runs_stuck) > 0",
        "5m",
        "Workflow runs have stayed stuck past their lease for 5 minutes.",
        "{{ $value }} workflow run(s) have been stuck for 5 minutes ({{ $labels.job }}): their"
        " lease expired and the reaper, which recovers a stuck run within two ticks, has not"
        " recovered them, or runs are lost again as fast as it does.",
        "vigil-workflows",
    ),
    # --- Pattern analysis (service/domain/patterns) -----------------------------------------------
    # Most analyses ending dead-lettered for 15 minutes: not a blip (one failure is replayed
    # automatically) but a cause the replayer cannot outlive. No runs at all gives no ratio.
    Alert(
        "VigilPatternAnalysisFailing",
        "warning",
        """
sum by (job) (rate(pattern_analysis_runs_total{outcome="dead_lettered"}[15m]))
/ sum by (job) (rate(pattern_analysis_runs_total[15m]))
> 0.5
""",
        "15m",
        "Most pattern analyses fail and are dead-lettered: patterns and suggestions are going stale.",
        "{{ $value | humanizePercentage }} of pattern analyses on {{ $labels.job }} ended dead-lettered"
        " over the last 15 minutes; users' patterns and suggestions are not updated.",
        "vigil-workflows",
    ),
    # --- Integrations (service/domain/integrations) ---------------------------------------------
    # A quarter of OAuth refreshes failing or refused for 15 minutes: one user revoking a grant is
    # their business (the integration turns needs_reauth and stops asking), a token endpoint down
    # or rejecting Vigil's client for everyone is the on-call's. No refreshes at all gives no ratio.
    Alert(
        "VigilIntegrationTokenRefreshFailing",
        "warning",
        """
sum by (job, connector) (rate(integration_token_refreshes_total{outcome=~"failed|refused"}[30m]))
/ sum by (job, connector) (rate(integration_token_refreshes_total[30m]))
> 0.25
""",
        "15m",
        "OAuth token refreshes of integrations are failing: workflow steps calling them fail.",
        "{{ $value | humanizePercentage }} of {{ $labels.connector }} token refreshes on {{ $labels.job }}"
        " failed or were refused over the last 30 minutes; calls through those integrations fail.",
        "vigil-workflows",
    ),
    # --- Uploads (service/domain/uploads) ---------------------------------------------------------
    # Both sides come from the same instance (same labels), so the threshold each instance
    # enforces is the one its free space is compared with: no number copied into the rule.
    Alert(
        "VigilUploadStorageLow",
        "warning",
        "upload_storage_free_bytes < 2 * upload_storage_min_free_bytes",
        "15m",
        "The upload storage volume is nearing the free-space floor below which uploads are refused.",
        "{{ $labels.instance }} ({{ $labels.job }}) has {{ $value | humanize1024 }}B free on its upload"
        " volume, less than twice the threshold below which uploads answer 507.",
        "vigil-guardrails",
    ),
    Alert(
        "VigilUploadStorageLow",
        "critical",
        "upload_storage_free_bytes < upload_storage_min_free_bytes",
        "5m",
        "The upload storage volume is below its free-space floor: uploads are refused with 507.",
        "{{ $labels.instance }} ({{ $labels.job }}) has only {{ $value | humanize1024 }}B free on its"
        " upload volume: every upload is answered 507 until space is freed.",
        "vigil-guardrails",
    ),
)
