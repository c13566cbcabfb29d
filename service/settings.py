"""Vigil's one settings object, read from ``VIGIL_*`` environment variables.

Each field reads the variable named ``VIGIL_`` + the field name in upper case; the docstring
under a field is its documentation (``.env.example`` lists the same variables, a test keeps
the two equal). Values are parsed strictly: a malformed value is a :class:`SettingsError`
naming the variable, never a silent default.

:func:`Settings.findings` lists unsafe choices (the seed's P0 rows: a default JWT secret,
``*`` in CORS origins, the embedded database in production). :func:`Settings.enforce` makes
them fatal when ``env`` is ``production`` and loud warnings otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["KNOWN_DEFAULT_SECRETS", "Finding", "Settings", "SettingsError"]

PREFIX = "VIGIL_"

#: Secrets that ship in examples and tutorials; a token signed with one of them is forgeable.
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "",
        "secret",
        "changeme",
        "change-me",
        "change_me",
        "your-secret-key",
        "your-secret-key-here",
        "supersecret",
        "dev-secret",
        "development-secret",
        "replace-me-with-32-random-bytes-or-more",  # the placeholder in .env.example
    }
)
MIN_SECRET_BYTES = 32


class SettingsError(ValueError):
    """A ``VIGIL_*`` variable is malformed or, in production, unsafe. The message names it."""


@dataclass(frozen=True)
class Finding:
    """One unsafe setting: fatal in production, a warning elsewhere."""

    setting: str
    problem: str

    def line(self) -> str:
        return f"{PREFIX}{self.setting.upper()}: {self.problem}"


@dataclass(frozen=True)
class Settings:
    """Everything Vigil can be configured with. Immutable; build it with :meth:`from_env`."""

    env: Literal["development", "test", "production"] = "development"
    """Deployment environment. ``production`` turns unsafe findings into a refusal to start."""

    host: str = "127.0.0.1"
    """Interface the HTTP server binds to."""

    port: int = 8000
    """TCP port the HTTP server listens on."""

    database_url: str = ""
    """SQLAlchemy URL of PostgreSQL (``postgresql+asyncpg://…``). Empty: the embedded server
    under ``data_dir`` (development only)."""

    redis_url: str = ""
    """Redis URL (``redis://host:port/db``). Empty: the embedded server under ``data_dir``."""

    data_dir: Path = Path(".vigil")
    """Folder for the embedded servers' data and their state file. Survives restarts."""

    jwt_secret: str = ""
    """HMAC key for access tokens, at least 32 bytes. Empty in development: a random key per
    process (tokens die with it); in production: refusal to start."""

    cors_origins: tuple[str, ...] = ()
    """Comma-separated origins allowed by CORS. Empty disables CORS; ``*`` is refused in
    production."""

    max_body_bytes: int = 1_048_576
    """Largest request body accepted; larger bodies answer 413."""

    db_pool_size: int = 10
    """Connections the pool keeps open."""

    db_max_overflow: int = 20
    """Connections opened beyond ``db_pool_size`` under load; the pool's maximum is the sum."""

    db_pool_timeout_seconds: float = 2.0
    """Longest a request waits for a pooled connection before it is answered 503."""

    db_connect_timeout_seconds: float = 3.0
    """Longest a new PostgreSQL connection may take to establish."""

    db_statement_timeout_ms: int = 15_000
    """PostgreSQL ``statement_timeout`` for the API's sessions; 0 disables it."""

    db_pool_name: str = "primary"
    """Value of the ``db_client_connection_pool_name`` label."""

    db_breaker_window_type: Literal["count", "time"] = "time"
    """Sliding window of the database breaker: the last N ``calls`` or the last N ``time`` seconds."""

    db_breaker_window_size: int = 10
    """Size of the database breaker's window (calls, or seconds)."""

    db_breaker_minimum_calls: int = 10
    """Calls the window must hold before the database breaker may open."""

    db_breaker_failure_rate_threshold: float = 50.0
    """Percentage of failed calls (PostgreSQL unreachable, connection dropped) that opens the breaker."""

    db_breaker_slow_call_rate_threshold: float = 80.0
    """Percentage of slow calls that opens the breaker (100 never opens on slowness alone)."""

    db_breaker_slow_call_seconds: float = 2.0
    """A session held longer than this counts as a slow call."""

    db_breaker_wait_in_open_seconds: float = 5.0
    """How long the open breaker refuses calls (the ``Retry-After`` clients see) before half-open."""

    db_breaker_half_open_calls: int = 3
    """Trial calls let through in half-open; their outcome closes or reopens the breaker."""

    db_retry_attempts: int = 3
    """Most attempts of an idempotent database read (transient errors only)."""

    db_retry_initial_backoff_seconds: float = 0.05
    """Bound of the first retry backoff (exponential, full jitter)."""

    db_retry_max_backoff_seconds: float = 1.0
    """Cap on one retry backoff."""

    db_retry_total_seconds: float = 3.0
    """No retry starts later than this after the first attempt."""

    cache_ttl_seconds: float = 30.0
    """How long a cached read stays fresh (less up to ``cache_jitter`` of it, at random)."""

    cache_jitter: float = 0.1
    """Fraction of the TTL taken off at random on each write, so keys written together expire apart."""

    cache_stale_seconds: float = 600.0
    """How long a cached read remains servable as stale while the database is unavailable."""

    cache_op_timeout_seconds: float = 0.1
    """Budget of one Redis cache operation; past it the cache serves from its in-process fallback."""

    cache_fallback_max_entries: int = 10_000
    """Entries the in-process fallback cache keeps while Redis is unreachable."""

    access_token_ttl_seconds: int = 900
    """Lifetime of a JWT access token (short: revocation happens through refresh tokens)."""

    refresh_token_ttl_seconds: int = 2_592_000
    """Lifetime of an opaque refresh token (30 days); each use rotates it."""

    email_verification_ttl_seconds: int = 86_400
    """How long an e-mail verification link stays valid."""

    public_base_url: str = "http://127.0.0.1:8000"
    """Base URL put in links that Vigil e-mails (verification)."""

    smtp_host: str = ""
    """SMTP server for outgoing mail. Empty in development: mails are logged, not sent (refused in
    production)."""

    smtp_port: int = 25
    """SMTP server port."""

    smtp_username: str = ""
    """SMTP login; empty for none."""

    smtp_password: str = ""
    """SMTP password; never logged."""

    smtp_starttls: bool = False
    """Upgrade the SMTP connection with STARTTLS."""

    smtp_timeout_seconds: float = 10.0
    """Longest one SMTP delivery may take."""

    mail_from: str = "Vigil <no-reply@vigil.local>"
    """Sender of Vigil's e-mails."""

    outbox_max_attempts: int = 12
    """Delivery attempts of one e-mail before it is marked dead (an alert fires on dead mail)."""

    outbox_backoff_seconds: float = 2.0
    """First retry delay of a failed delivery; it doubles per attempt (with jitter), capped at 15 minutes."""

    ratelimit_auth: str = "10/minute"
    """Limit of the auth endpoints (register, login, refresh, verify, resend) per client IP."""

    ratelimit_user: str = "600/minute"
    """Limit of authenticated API calls per user."""

    ratelimit_anonymous: str = "120/minute"
    """Limit of anonymous API calls per client IP."""

    ratelimit_fallback_factor: float = 1.0
    """While Redis is down, each instance enforces this fraction of each limit in memory; the
    effective global limit is then factor x limit x number of instances."""

    ratelimit_redis_timeout_seconds: float = 0.05
    """Longest one rate-limit decision may wait for Redis before it falls back to memory."""

    trusted_proxies: tuple[str, ...] = ()
    """Networks (CIDR) of reverse proxies whose ``X-Forwarded-For`` is believed, walked right to
    left; from anyone else the socket peer is the client."""

    audit_buffer_size: int = 10_000
    """Audit entries held in memory awaiting their write; when full, entries go straight to the
    audit dead-letter queue (never dropped, never blocking the request)."""

    audit_flush_interval_seconds: float = 0.5
    """How often the audit buffer is written to PostgreSQL."""

    audit_max_attempts: int = 5
    """Write attempts of an audit batch before its entries are parked in the dead-letter queue."""

    # --- Uploads (service/domain/uploads) -------------------------------------------------------
    upload_dir: str = ""
    """Folder of stored uploads (one filesystem, shared by every API instance). Empty:
    ``<data_dir>/uploads``."""

    upload_max_bytes: int = 10_485_760
    """Largest file one upload may carry; larger answers 413 (counted as ``too_large``)."""

    upload_user_quota_bytes: int = 104_857_600
    """Bytes one user may keep stored in total; an upload that would exceed it answers 413
    (counted as ``quota``)."""

    upload_allowed_types: tuple[str, ...] = (
        "application/json",
        "application/pdf",
        "image/gif",
        "image/jpeg",
        "image/png",
        "image/webp",
        "text/csv",
        "text/plain",
    )
    """Comma-separated content types an upload may declare; others answer 415. The first bytes
    must match the declared type (magic numbers for images and PDF, no NUL byte for text)."""

    upload_min_free_bytes: int = 1_073_741_824
    """Uploads are refused with 507 while the storage volume has less free space than this
    (or than ``upload_min_free_percent``, whichever is larger), before and after writing."""

    upload_min_free_percent: float = 2.0
    """Free space, in percent of the storage volume, below which uploads are refused with 507."""

    upload_sweep_interval_seconds: float = 3600.0
    """How often orphan files (a crash between writing and committing) older than an hour are
    removed from the storage folder; 0 disables the sweeper."""

    # --- Realtime (service/domain/realtime) ---------------------------------------------------
    realtime_history_size: int = 1000
    """Messages kept per user for clients resuming after a reconnect (a Redis stream per user,
    trimmed with ``MAXLEN ~``; the same number in memory per instance while Redis is down)."""

    realtime_history_ttl_seconds: int = 86_400
    """A user's history expires this long after their last message. It is written only while
    the user has an audience: a WebSocket client connected now or within this long (D58)."""

    realtime_send_queue_size: int = 256
    """Messages waiting for one slow WebSocket client; when full the connection is closed with
    1013 (the client resumes from its last id) and the drop is counted."""

    realtime_max_connections_per_user: int = 10
    """Open WebSockets one user may hold per instance; one more is closed with 4429."""

    realtime_auth_timeout_seconds: float = 10.0
    """How long a new WebSocket may take to send its ``auth`` message before it is closed (4408)."""

    realtime_ping_interval_seconds: float = 20.0
    """How often the server sends ``{"type": "ping"}``; a client that has sent nothing for three
    intervals is closed (4000) and its subscription released."""

    realtime_reconnect_interval_seconds: float = 1.0
    """While Redis is down, how often fan-out tries to return to it."""

    realtime_redis_liveness_seconds: float = 5.0
    """How long fan-out's pub/sub connection may hear nothing before it PINGs Redis; no answer
    within 2 s switches fan-out to ``local`` (a hung Redis keeps its connections open)."""

    dlq_spool_dir: Path = Path(".vigil/spool")
    """Folder of the local append-only dead-letter spool used when Redis is also down (fsynced)."""

    # --- Events (service/domain/events) -------------------------------------------------------

    events_batch_max_items: int = 5_000
    """Most events one ``POST /api/events/batch`` may carry; more is a 413 naming the body."""

    events_batch_max_body_bytes: int = 16_777_216
    """Body-size limit of ``POST /api/events/batch`` (the general ``max_body_bytes`` is too small
    for thousands of events); above it, 413."""

    events_chunk_size: int = 1_000
    """Events written per transaction (one set-based statement); a failing chunk is deferred to
    the ``events`` dead-letter queue whole while the other chunks still commit."""

    events_batch_budget_seconds: float = 20.0
    """Time one batch may spend writing; chunks not started by then are deferred to the
    dead-letter queue, so a large batch answers before a client or proxy times out."""

    events_dlq_max_attempts: int = 10
    """Failed replays of a dead-lettered event before it is parked (kept for an operator)."""

    events_backpressure_depth: int = 100_000
    """Above this ``dlq_depth{queue="events"}``, new event writes answer 503 + ``Retry-After``."""

    events_backpressure_retry_after_seconds: int = 30
    """``Retry-After`` of the backpressure 503."""

    events_replay_cron: str = "* * * * * */2"
    """When the worker replays the ``events`` dead-letter queue (croniter; sixth field: seconds)."""

    worker_metrics_port: int = 9101
    """Port of the worker's own ``/metrics`` endpoint (``vigil worker``)."""

    worker_concurrency: int = 10
    """Jobs one worker process runs at once."""

    # --- Pattern analysis (service/domain/patterns) ----------------------------------------------
    patterns_lookback_days: int = 28
    """Days of events (by ``occurred_at``) one analysis looks at."""

    patterns_max_events: int = 50_000
    """Most recent events of the look-back window one analysis reads at most (bounds its cost)."""

    patterns_debounce_seconds: float = 5.0
    """Delay between an ingest and the analysis it triggers; ingests of one user meanwhile share
    that one analysis."""

    patterns_min_days: int = 3
    """Distinct days on which an event type must occur in the same hour (UTC) to be a
    ``time_of_day`` pattern."""

    patterns_sequence_window_minutes: int = 30
    """B must follow A within this many minutes for the pair to count as an A->B ``sequence``."""

    patterns_min_support: int = 3
    """Fewest occurrences (A events followed by B, for a sequence) a sequence pattern needs."""

    patterns_suggest_min_support: int = 5
    """Support a pattern needs before a workflow is suggested from it."""

    patterns_suggest_min_confidence: float = 0.6
    """Confidence (0..1) a pattern needs before a workflow is suggested from it."""

    patterns_max_attempts: int = 3
    """Attempts of one analysis (transient database errors) before it is dead-lettered."""

    # --- Workflows (service/domain/workflows) ---------------------------------------------------
    workflow_lease_seconds: float = 30.0
    """Lease a worker holds on a run it executes, renewed by a heartbeat every third of it. A run
    whose lease expired (worker killed, event loop blocked) is stuck and reclaimed by the reaper."""

    workflow_tick_seconds: int = 5
    """Period (1-59 s) of the worker's scheduler, stuck-run reaper and workflow gauges."""

    workflow_run_max_attempts: int = 3
    """Attempts of one run: a run whose worker was lost is retried from its first unfinished
    step until then, and compensated after the last."""

    workflow_scheduler_batch: int = 100
    """Due schedules one scheduler tick claims at most (the rest wait for the next tick)."""

    # --- integrations (service/domain/integrations) ---------------------------------------------

    credential_keys: tuple[str, ...] = ()
    """Keys sealing integration credentials (AES-256-GCM), comma-separated ``kid:base64key``
    (``vigil keys generate`` prints one). The first seals, all open; retire a key by removing it
    after ``vigil keys rotate``. Empty: refused in production; elsewhere a key generated once and
    kept in ``data_dir/credential-keys``."""

    integrations_allow_private_networks: bool = False
    """Let integrations call loopback, private and link-local addresses (tests, local development).
    Off: such IP literals in base URLs and token URLs are refused with 422, and every connection
    is refused unless all the addresses its host resolves to are public (SSRF, ``guardrails.egress``)."""

    integration_timeout_seconds: float = 10.0
    """Longest one outbound integration request (or token refresh) may take when the caller does
    not say."""

    integration_max_response_bytes: int = 1_048_576
    """Largest integration response body read, after decompression (1 MiB); a longer answer fails
    the call (counted as a ``transport_error``) instead of filling the worker's memory."""

    integration_token_refresh_margin_seconds: float = 300.0
    """An OAuth access token expiring within this is refreshed before it is used (and by the
    worker's refresh sweep)."""

    integration_expiry_warning_seconds: float = 604_800.0
    """An API key expiring within this counts in ``integration_credentials_expiring`` (7 days)."""

    integration_breaker_minimum_calls: int = 5
    """Calls to one integration (of its last 20) before its breaker may open."""

    integration_breaker_failure_rate_threshold: float = 50.0
    """Percentage of failed calls (transport error, timeout, 5xx) that opens an integration's breaker."""

    integration_breaker_wait_in_open_seconds: float = 30.0
    """How long an open integration breaker fails calls fast before trial calls."""

    admin_token: str = ""
    """Bearer token of the ``/admin`` API (breaker overrides). Empty disables the admin API."""

    probe_interval_seconds: float = 5.0
    """How often the background prober checks PostgreSQL, Redis and migrations."""

    probe_timeout_seconds: float = 1.0
    """Longest one probe may take; a dead dependency costs the prober this, never a request."""

    allow_migration_drift: bool = False
    """Start in production even when the database is behind the code's migration head (the
    manual override); drift is still exported and logged."""

    log_level: str = "info"
    """Lowest level logged: debug, info, warning, error."""

    log_format: Literal["auto", "json", "console"] = "auto"
    """``json`` lines, ``console`` for people, or ``auto``: console on a TTY, JSON otherwise."""

    access_log: bool = True
    """One structured log line per HTTP request."""

    access_log_flush_seconds: float = 0.5
    """Access lines wait in memory at most this long (or until 256 wait) and are written
    together: one write per batch instead of a system call per request (D59). A crash loses at
    most this long of access lines; other log lines are written at once. 0: each line at once."""

    trace_sample_ratio: float = 1.0
    """Share of new traces sampled (parent-based: an incoming sampled ``traceparent`` is
    always honoured). Spans are exported only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""

    service_name: str = "vigil"
    """``service.name`` of traces and ``application_name`` of database sessions."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read every field from ``VIGIL_<FIELD>``; ``overrides`` win over the environment."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            if name in environ:
                values[f.name] = _parse(name, environ[name], hints[f.name])
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def embedded(self) -> bool:
        """True when Vigil starts its own PostgreSQL or Redis."""
        return not self.database_url or not self.redis_url

    @property
    def db_pool_max(self) -> int:
        return self.db_pool_size + self.db_max_overflow

    def findings(self) -> list[Finding]:
        """Unsafe choices, fatal in production (seed rows SECRET_KEY and CORS, both P0)."""
        found: list[Finding] = []
        secret = self.jwt_secret
        if not secret:
            found.append(Finding("jwt_secret", "is not set"))
        elif secret.strip().lower() in KNOWN_DEFAULT_SECRETS:
            found.append(Finding("jwt_secret", "is a well-known default value"))
        elif len(secret.encode()) < MIN_SECRET_BYTES:
            found.append(Finding("jwt_secret", f"is shorter than {MIN_SECRET_BYTES} bytes"))
        if "*" in self.cors_origins:
            found.append(Finding("cors_origins", "contains '*', which lets any site call the API"))
        if not self.database_url:
            found.append(Finding("database_url", "is empty, so the embedded development database is used"))
        if not self.smtp_host:
            found.append(Finding("smtp_host", "is empty, so e-mails are logged instead of sent"))
        if not self.credential_keys:
            found.append(Finding("credential_keys", "is not set, so integration credentials have no managed key"))
        if self.admin_token and len(self.admin_token.encode()) < MIN_SECRET_BYTES:
            found.append(Finding("admin_token", f"is shorter than {MIN_SECRET_BYTES} bytes"))
        return found

    def enforce(self) -> list[Finding]:
        """Raise :class:`SettingsError` (one line naming each setting) in production; return
        the findings otherwise so the caller can warn about them."""
        found = self.findings()
        if found and self.is_production:
            raise SettingsError("refusing to start in production: " + "; ".join(f.line() for f in found))
        return found


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, raw: str, hint: object) -> object:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is Path:
            return Path(raw)
        if origin is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if origin is Literal:
            allowed = typing.get_args(hint)
            if raw not in allowed:
                raise ValueError(f"expected one of {', '.join(allowed)}")
            return raw
        if hint is str or isinstance(hint, types.UnionType):
            return raw
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is invalid: {exc}") from None
    raise SettingsError(f"{name}: unsupported setting type {hint!r}")  # pragma: no cover
