"""Delivering the e-mail outbox: a worker cron job claims due rows and sends them.

Each sweep (every two seconds by default; one at a time across all workers, SAQ's cron key)
works in rounds until nothing is due or its time budget is spent:

1. Claim up to ``batch_size`` due rows in one short transaction: ``pending`` (or ``sending``
   whose lease expired) with ``next_attempt_at <= now()``, ``FOR UPDATE SKIP LOCKED``, set to
   ``sending`` with ``attempts + 1`` and ``next_attempt_at = now() + lease``. Two sweeps never
   claim the same row; the lease (``next_attempt_at``) keeps a claimed row from everyone else.
2. Send each through the ``smtp`` breaker. Sent: ``sent``. Failed: back to ``pending`` after
   ``outbox_backoff_seconds x 2^(attempt-1)`` (full jitter, capped at 15 minutes), or ``dead``
   after ``outbox_max_attempts`` (one log line each). Breaker open: back to ``pending`` with the
   attempt given back, due when the breaker may let calls through again.
3. Outcomes are written only while the claim still holds (``status = 'sending'`` and the
   claimed ``attempts``), so a sweep that outlived its lease cannot overwrite a newer claim.

Delivery is at least once: SMTP has no idempotency key, so a worker killed (or a database lost)
between the server's 250 and the ``sent`` update sends that mail again when its lease expires.
Every attempt carries the same ``Message-ID`` (see :mod:`.sender`), by which receivers and
mail clients can recognise the duplicate.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

from opentelemetry.context import Context as TraceContext
from opentelemetry.trace import SpanKind, Tracer
from saq.job import CronJob
from sqlalchemy import case, extract, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import EmailOutbox
from service.domain.email.sender import (
    MailTransport,
    OutgoingMail,
    PermanentDeliveryError,
    smtp_breaker_config,
    transport_for,
)
from service.guardrails.breaker import BreakerConfig, CallNotPermitted, CircuitBreaker
from service.settings import Settings
from service.worker.base import JobSet, WorkerContext, WorkerResources, resources_of
from service.worker.tracing import job_span
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = ["DeliveryConfig", "OutboxDelivery", "SweepResult", "email_jobs", "retry_delay", "sweep_email_outbox"]

_log = get_logger("vigil.email")
MAX_BACKOFF_SECONDS = 900.0
_UNDELIVERED = ("pending", "sending")
_LOST_FINAL_ATTEMPT = "lease expired during the final attempt; delivery unknown"


@dataclass(frozen=True)
class DeliveryConfig:
    """How the outbox is swept; the defaults suit production, tests shrink them."""

    cron: str = "* * * * * */2"
    """When sweeps run (croniter; the sixth field is seconds)."""
    batch_size: int = 20
    """Rows claimed per round."""
    send_concurrency: int = 5
    """SMTP sessions open at once."""
    sweep_budget_seconds: float = 20.0
    """No new round starts after this much time in one sweep."""
    breaker: BreakerConfig | None = None
    """``None``: :func:`service.domain.email.sender.smtp_breaker_config`."""

    def lease_seconds(self, settings: Settings) -> float:
        """How long a claim holds: every send of a round within its timeout, plus a margin."""
        rounds = math.ceil(self.batch_size / self.send_concurrency)
        return rounds * settings.smtp_timeout_seconds + 30.0


@dataclass
class SweepResult:
    """What one sweep did (also the job's result in SAQ)."""

    claimed: int = 0
    sent: int = 0
    retry: int = 0
    dead: int = 0
    rejected: int = 0


def retry_delay(attempt: int, base: float, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff after failed attempt number ``attempt`` (1-based)."""
    return rng() * min(MAX_BACKOFF_SECONDS, base * 2.0 ** min(attempt - 1, 32))


def _short(exc: BaseException) -> str:
    """``last_error``: the class and the message on one line, bounded (no traceback, no secret:
    aiosmtplib never puts credentials in its messages)."""
    text_ = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text_}"[:300] if text_ else type(exc).__name__


@dataclass(frozen=True)
class _Claim:
    """A row this sweep claimed: the mail and the attempt number the claim set."""

    mail: OutgoingMail
    attempts: int

    @property
    def id(self) -> UUID:
        return self.mail.outbox_id


@dataclass
class OutboxDelivery:
    """The outbox sweeper of one worker."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    transport: MailTransport
    breaker: CircuitBreaker
    metrics: Metrics
    tracer: Tracer
    trace_root: TraceContext
    config: DeliveryConfig = field(default_factory=DeliveryConfig)
    failing: bool = False
    """True while sweeps fail (one log line per change)."""

    def __post_init__(self) -> None:
        outcomes = self.metrics.counter("email_deliveries_total")
        self._outcome = {o: outcomes.labels(o) for o in ("sent", "retry", "dead", "rejected")}
        self._pending = self.metrics.gauge("email_outbox_pending")
        self._oldest = self.metrics.gauge("email_outbox_oldest_pending_age_seconds")
        self._dead = self.metrics.gauge("email_outbox_dead")
        # The log transport says nothing about any SMTP server.
        self._smtp_up = self.metrics.gauge("dependency_up").labels("smtp") if self.transport.name == "smtp" else None
        self._lease = timedelta(seconds=self.config.lease_seconds(self.settings))
        self._slots = asyncio.Semaphore(self.config.send_concurrency)

    async def sweep(self, keep_going: Callable[[], bool] = lambda: True) -> SweepResult:
        """Deliver what is due (see the module docstring), then refresh the outbox gauges. No
        new round starts once ``keep_going()`` is false (the worker is stopping)."""
        result = SweepResult()
        deadline = time.monotonic() + self.config.sweep_budget_seconds
        await self._expire_final_leases(result)
        while True:
            rows = await self._claim()
            result.claimed += len(rows)
            before = result.rejected
            for outcome in await asyncio.gather(*(self._deliver(row, result) for row in rows), return_exceptions=True):
                if isinstance(outcome, Exception):  # a bug: the row's lease brings it back
                    _log.error("email_delivery_crashed", error=_short(outcome))
            full = len(rows) == self.config.batch_size
            if not full or result.rejected > before or time.monotonic() >= deadline or not keep_going():
                break
        await self.refresh_gauges()
        return result

    async def refresh_gauges(self) -> None:
        """Pending count, oldest pending age and dead count, from the table."""
        undelivered = EmailOutbox.status.in_(_UNDELIVERED)
        stmt = select(
            select(func.count()).select_from(EmailOutbox).where(undelivered).scalar_subquery(),
            select(func.coalesce(extract("epoch", func.now() - func.min(EmailOutbox.created_at)), 0))
            .where(undelivered)
            .scalar_subquery(),
            select(func.count()).select_from(EmailOutbox).where(EmailOutbox.status == "dead").scalar_subquery(),
        )
        async with self.sessionmaker() as session:
            pending, oldest, dead = (await session.execute(stmt)).one()
        self._pending.set(pending)
        self._oldest.set(max(0.0, float(oldest)))
        self._dead.set(dead)

    async def _expire_final_leases(self, result: SweepResult) -> None:
        """Rows whose last allowed attempt never reported (worker lost mid-send, or the limit was
        lowered) cannot be claimed again: they are dead, the outcome of that attempt unknown."""
        stmt = (
            update(EmailOutbox)
            .where(
                EmailOutbox.status.in_(_UNDELIVERED),
                EmailOutbox.next_attempt_at <= func.now(),
                EmailOutbox.attempts >= self.settings.outbox_max_attempts,
            )
            .values(
                status="dead",
                last_error=case(
                    (EmailOutbox.status == "sending", literal(_LOST_FINAL_ATTEMPT)),
                    else_=EmailOutbox.last_error,
                ),
            )
            .returning(EmailOutbox.id, EmailOutbox.kind, EmailOutbox.attempts, EmailOutbox.last_error)
        )
        async with self.sessionmaker() as session, session.begin():
            rows = (await session.execute(stmt)).all()
        for row in rows:
            self._died(result, row.id, row.kind, row.attempts, row.last_error or "unknown")

    async def _claim(self) -> list[_Claim]:
        due = (
            select(EmailOutbox.id)
            .where(
                EmailOutbox.status.in_(_UNDELIVERED),
                EmailOutbox.next_attempt_at <= func.now(),
                EmailOutbox.attempts < self.settings.outbox_max_attempts,
            )
            .order_by(EmailOutbox.next_attempt_at)
            .limit(self.config.batch_size)
            .with_for_update(skip_locked=True)
            .cte("due")
        )
        stmt = (
            update(EmailOutbox)
            .where(EmailOutbox.id.in_(select(due.c.id)))
            .values(status="sending", attempts=EmailOutbox.attempts + 1, next_attempt_at=func.now() + self._lease)
            .returning(
                EmailOutbox.id,
                EmailOutbox.to_address,
                EmailOutbox.subject,
                EmailOutbox.body,
                EmailOutbox.kind,
                EmailOutbox.attempts,
            )
        )
        async with self.sessionmaker() as session, session.begin():
            rows = (await session.execute(stmt)).all()
        return [_Claim(OutgoingMail(r.id, r.to_address, r.subject, r.body, r.kind), r.attempts) for r in rows]

    async def _deliver(self, row: _Claim, result: SweepResult) -> None:
        mail = row.mail
        attributes = {
            "vigil.email.outbox_id": str(mail.outbox_id),
            "vigil.email.kind": mail.kind,
            "vigil.email.attempt": row.attempts,
            "vigil.email.transport": self.transport.name,
        }
        async with self._slots:
            with job_span(self.tracer, "email.deliver", self.trace_root, kind=SpanKind.CLIENT, attributes=attributes):
                try:
                    start = self.breaker.acquire()
                except CallNotPermitted as exc:
                    await self._record(row, result, "rejected", delay=exc.retry_after)
                    return
                try:
                    await self.transport.send(mail)
                except PermanentDeliveryError as exc:
                    self.breaker.record(start, None)  # the server answered: it works
                    self._smtp_reachable(True)
                    await self._record(row, result, "dead", error=_short(exc))
                except Exception as exc:
                    self.breaker.record(start, exc)
                    self._smtp_reachable(False)
                    final = row.attempts >= self.settings.outbox_max_attempts
                    await self._record(row, result, "dead" if final else "retry", error=_short(exc))
                else:
                    self.breaker.record(start, None)
                    self._smtp_reachable(True)
                    await self._record(row, result, "sent")

    def _smtp_reachable(self, up: bool) -> None:
        if self._smtp_up is not None:
            self._smtp_up.set(1 if up else 0)

    async def _record(
        self, row: _Claim, result: SweepResult, outcome: str, *, error: str | None = None, delay: float = 0.0
    ) -> None:
        """Write the outcome while our claim holds; count and log it."""
        values: dict[str, Any]
        if outcome == "sent":
            values = {"status": "sent", "sent_at": func.now(), "last_error": None}
        elif outcome == "dead":
            values = {"status": "dead", "last_error": error}
        elif outcome == "retry":
            wait = retry_delay(row.attempts, self.settings.outbox_backoff_seconds)
            values = {"status": "pending", "next_attempt_at": func.now() + timedelta(seconds=wait), "last_error": error}
        else:  # rejected by the breaker: not an attempt
            values = {
                "status": "pending",
                "attempts": EmailOutbox.attempts - 1,
                "next_attempt_at": func.now() + timedelta(seconds=delay),
            }
        stmt = (
            update(EmailOutbox)
            .where(EmailOutbox.id == row.id, EmailOutbox.status == "sending", EmailOutbox.attempts == row.attempts)
            .values(**values)
        )
        try:
            async with self.sessionmaker() as session, session.begin():
                held = (await session.execute(stmt)).rowcount == 1  # type: ignore[attr-defined]  # CursorResult
        except Exception as exc:  # the lease brings the row back; delivered mail may then repeat
            _log.error("email_outcome_not_recorded", outbox_id=str(row.id), outcome=outcome, error=_short(exc))
            return
        if not held:
            _log.warning("email_claim_lost", outbox_id=str(row.id), outcome=outcome, attempt=row.attempts)
            return
        self._outcome[outcome].inc()
        setattr(result, outcome, getattr(result, outcome) + 1)
        if outcome == "dead":
            self._died(None, row.id, row.mail.kind, row.attempts, error or "unknown")
        elif outcome == "retry":
            _log.info("email_retry_scheduled", outbox_id=str(row.id), attempt=row.attempts, error=error)

    def _died(self, result: SweepResult | None, outbox_id: Any, kind: str, attempts: int, error: str) -> None:
        if result is not None:  # the lease-expiry path, not counted by _record
            self._outcome["dead"].inc()
            result.dead += 1
        _log.error("email_dead", outbox_id=str(outbox_id), kind=kind, attempts=attempts, error=error)


async def sweep_email_outbox(ctx: WorkerContext) -> dict[str, Any]:
    """The cron job: one sweep of the outbox. A failing sweep (PostgreSQL down) is logged once
    when it starts failing and once when it recovers, not every tick; rows wait meanwhile."""
    delivery: OutboxDelivery = resources_of(ctx).extensions["email"]
    stopping = ctx["worker"].event
    try:
        result = asdict(await delivery.sweep(keep_going=lambda: not stopping.is_set()))
    except Exception as exc:
        if not delivery.failing:
            delivery.failing = True
            _log.error("email_sweep_failing", error=_short(exc))
        return {"error": _short(exc)}
    if delivery.failing:
        delivery.failing = False
        _log.info("email_sweep_recovered")
    return result


def email_jobs(settings: Settings, config: DeliveryConfig | None = None) -> JobSet:
    """The e-mail job set: the outbox sweep, and the ``smtp`` breaker in the worker's registry."""
    cfg = config or DeliveryConfig()

    async def startup(resources: WorkerResources) -> None:
        breaker = CircuitBreaker("smtp", cfg.breaker or smtp_breaker_config(settings), resources.metrics)
        resources.breakers.add(breaker)
        delivery = OutboxDelivery(
            settings=resources.settings,
            sessionmaker=resources.sessionmaker,
            transport=transport_for(resources.settings),
            breaker=breaker,
            metrics=resources.metrics,
            tracer=resources.tracer,
            trace_root=resources.trace_root,
            config=cfg,
        )
        resources.extensions["email"] = delivery
        if delivery.transport.name == "log":
            _log.warning("email_log_transport", note="VIGIL_SMTP_HOST is empty: mails are logged, not sent")

    timeout = int(cfg.sweep_budget_seconds + cfg.lease_seconds(settings)) + 10
    return JobSet(
        "email",
        cron_jobs=(CronJob(sweep_email_outbox, cron=cfg.cron, timeout=timeout, retries=1),),
        startup=startup,
    )
