"""Guardrail configurations built from the settings (one place maps VIGIL_* to each guardrail)."""

from __future__ import annotations

from service.guardrails.breaker import BreakerConfig
from service.guardrails.cache import CacheConfig
from service.guardrails.database import DatabaseUnavailable
from service.guardrails.retry import RetryConfig
from service.settings import Settings

__all__ = ["cache_config", "database_breaker_config", "database_retry_config"]


def database_breaker_config(s: Settings) -> BreakerConfig:
    """The database breaker counts only :class:`DatabaseUnavailable` (PostgreSQL unreachable or
    a dropped connection) as a failure; query-level errors mean the database is healthy."""
    return BreakerConfig(
        window_type=s.db_breaker_window_type,
        window_size=s.db_breaker_window_size,
        minimum_calls=s.db_breaker_minimum_calls,
        failure_rate_threshold=s.db_breaker_failure_rate_threshold,
        slow_call_rate_threshold=s.db_breaker_slow_call_rate_threshold,
        slow_call_seconds=s.db_breaker_slow_call_seconds,
        wait_in_open_seconds=s.db_breaker_wait_in_open_seconds,
        permitted_calls_in_half_open=s.db_breaker_half_open_calls,
        record_exceptions=(DatabaseUnavailable, ConnectionError, OSError),
    )


def database_retry_config(s: Settings) -> RetryConfig:
    return RetryConfig(
        attempts=s.db_retry_attempts,
        initial_backoff_seconds=s.db_retry_initial_backoff_seconds,
        max_backoff_seconds=s.db_retry_max_backoff_seconds,
        total_seconds=s.db_retry_total_seconds,
    )


def cache_config(s: Settings) -> CacheConfig:
    return CacheConfig(
        ttl_seconds=s.cache_ttl_seconds,
        jitter=s.cache_jitter,
        stale_seconds=s.cache_stale_seconds,
        op_timeout_seconds=s.cache_op_timeout_seconds,
        fallback_max_entries=s.cache_fallback_max_entries,
    )
