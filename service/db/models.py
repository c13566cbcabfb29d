"""The ORM models: one declarative ``Base`` whose metadata is the schema Alembic migrates to.

Conventions, chosen so that the migrations stay simple and the models and migrations can be
compared mechanically (``tests/integration/test_migrations.py`` fails on any difference):

- Constraint and index names come from :data:`NAMING_CONVENTION`, never from the server.
- Closed vocabularies (statuses, kinds) are ``text`` with a ``CHECK`` constraint, not PG
  enums: adding a value is one ``ALTER TABLE``, and downgrades drop no types.
- Timestamps are ``timestamptz`` with ``now()`` as server default.
- Primary keys are UUIDs (``uuid4`` in Python, ``gen_random_uuid()`` on the server), except
  ``events`` and ``audit_log``: their ``bigint`` identity ids are ordered, so clients resume
  "after id N".
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CHAR,
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
    UniqueConstraint,
    Uuid,
    false,
    func,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "NAMING_CONVENTION",
    "AuditLogEntry",
    "Base",
    "EmailOutbox",
    "EmailVerificationToken",
    "Event",
    "Integration",
    "Pattern",
    "RefreshToken",
    "RefreshTokenFamily",
    "Suggestion",
    "Upload",
    "User",
    "Workflow",
    "WorkflowRun",
    "WorkflowStepRun",
]

#: Deterministic constraint names, so a migration can drop what an older one created.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every Vigil table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        uuid.UUID: Uuid(),
        dict[str, Any]: JSONB(),
        str: Text(),
        bytes: LargeBinary(),
    }


def _in(column: str, *values: str) -> str:
    """SQL for a CHECK that ``column`` holds one of ``values``."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _uuid_pk() -> Mapped[uuid.UUID]:
    """A UUID primary key, generated in Python or, for raw SQL inserts, by the server."""
    return mapped_column(primary_key=True, default=uuid.uuid4, server_default=text("gen_random_uuid()"))


def _created_at() -> Mapped[datetime]:
    """Creation time, set by the server."""
    return mapped_column(server_default=func.now())


def _user_fk() -> Mapped[uuid.UUID]:
    """The owning user; the row goes with the account."""
    return mapped_column(ForeignKey("users.id", ondelete="CASCADE"))


# --- identity -------------------------------------------------------------------------------


class User(Base):
    """An account. ``email`` is stored lower-cased (a CHECK enforces it), so the plain unique
    constraint is case-insensitive uniqueness."""

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("email"),
        CheckConstraint("email = lower(email)", name="email_lower"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str]
    password_hash: Mapped[str]
    email_verified_at: Mapped[datetime | None]
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=false())
    disabled_at: Mapped[datetime | None]
    """Set by an admin: the account can neither log in nor refresh tokens."""
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class EmailOutbox(Base):
    """A transactional outbox row: written in the same transaction as the change that needs
    the e-mail, delivered later by the worker. ``sending`` rows whose ``next_attempt_at`` has
    passed belong to a worker that died and are picked up again."""

    __tablename__ = "email_outbox"
    __table_args__ = (
        CheckConstraint(_in("status", "pending", "sending", "sent", "dead"), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    to_address: Mapped[str]
    kind: Mapped[str]
    """The template, e.g. ``verify_email``."""
    subject: Mapped[str]
    body: Mapped[str]
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_error: Mapped[str | None]
    created_at: Mapped[datetime] = _created_at()
    sent_at: Mapped[datetime | None]


class EmailVerificationToken(Base):
    """A single-use e-mail verification token; only its hash is stored."""

    __tablename__ = "email_verification_tokens"
    __table_args__ = (UniqueConstraint("token_hash"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    token_hash: Mapped[str]
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class RefreshTokenFamily(Base):
    """One login's chain of rotated refresh tokens. Reusing a spent token revokes the family."""

    __tablename__ = "refresh_token_families"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None]
    revoked_reason: Mapped[str | None]


class RefreshToken(Base):
    """One refresh token of a family; only its hash is stored. ``parent_id`` is unique: a token
    rotates into at most one child, so two concurrent refreshes cannot both succeed."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (UniqueConstraint("token_hash"), UniqueConstraint("parent_id"))

    id: Mapped[uuid.UUID] = _uuid_pk()
    token_hash: Mapped[str]
    family_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("refresh_token_families.id", ondelete="CASCADE"), index=True
    )
    parent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("refresh_tokens.id", ondelete="SET NULL"))
    issued_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


# --- events and audit -----------------------------------------------------------------------


class Event(Base):
    """An event a user sent. ``idempotency_key`` is required (the client's, or one generated
    when the event was accepted) so that a retried request or a DLQ replay never duplicates."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key"),
        Index(None, "user_id", "id"),
        Index(None, "user_id", "type", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[uuid.UUID] = _user_fk()
    idempotency_key: Mapped[str]
    type: Mapped[str]
    source: Mapped[str | None]
    payload: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())


class AuditLogEntry(Base):
    """An append-only audit record. ``entry_id`` is generated by the writer, so a retried or
    replayed flush inserts each entry once (``ON CONFLICT (entry_id) DO NOTHING``). No foreign
    key on ``actor_user_id``: the trail outlives the account and a write never fails on it."""

    __tablename__ = "audit_log"
    __table_args__ = (
        UniqueConstraint("entry_id"),
        Index(None, "actor_user_id", "id"),
        Index(None, "target_type", "target_id"),
        Index(None, "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    entry_id: Mapped[uuid.UUID]
    occurred_at: Mapped[datetime] = mapped_column(server_default=func.now())
    recorded_at: Mapped[datetime] = mapped_column(server_default=func.now())
    """When the row reached the table; the gap to ``occurred_at`` is the buffer's lag."""
    actor_user_id: Mapped[uuid.UUID | None]
    action: Mapped[str]
    target_type: Mapped[str | None]
    target_id: Mapped[str | None]
    ip: Mapped[str | None]
    request_id: Mapped[str | None]
    trace_id: Mapped[str | None]
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


# --- patterns and suggestions ---------------------------------------------------------------


class Pattern(Base):
    """A regularity found in a user's events; re-analysis updates it in place by
    ``(user_id, kind, signature)``."""

    __tablename__ = "patterns"
    __table_args__ = (
        UniqueConstraint("user_id", "kind", "signature"),
        CheckConstraint(_in("kind", "time_of_day", "sequence"), name="kind"),
        CheckConstraint("support >= 0", name="support_non_negative"),
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="confidence_range"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    kind: Mapped[str]
    signature: Mapped[str]
    description: Mapped[str]
    support: Mapped[int] = mapped_column(Integer)
    """How many occurrences back the pattern."""
    confidence: Mapped[float] = mapped_column(Double)
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class Suggestion(Base):
    """A workflow proposed from a pattern. Accepting it creates ``workflow_id``."""

    __tablename__ = "suggestions"
    __table_args__ = (
        CheckConstraint(_in("status", "open", "accepted", "dismissed"), name="status"),
        Index(None, "user_id", "status"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    pattern_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("patterns.id", ondelete="CASCADE"), index=True)
    title: Mapped[str]
    workflow_definition: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(default="open", server_default="open")
    workflow_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("workflows.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created_at()
    decided_at: Mapped[datetime | None]


# --- workflows ------------------------------------------------------------------------------


class Workflow(Base):
    """A user's workflow: steps in ``definition``, an optional schedule (cron or interval, not
    both). The scheduler claims rows whose ``next_run_at`` has passed."""

    __tablename__ = "workflows"
    __table_args__ = (
        CheckConstraint("schedule_cron IS NULL OR schedule_interval_seconds IS NULL", name="one_schedule"),
        CheckConstraint("schedule_interval_seconds > 0", name="interval_positive"),
        CheckConstraint("version >= 1", name="version_positive"),
        Index(None, "enabled", "next_run_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    name: Mapped[str]
    description: Mapped[str | None]
    definition: Mapped[dict[str, Any]]
    schedule_cron: Mapped[str | None]
    schedule_interval_seconds: Mapped[int | None]
    next_run_at: Mapped[datetime | None]
    enabled: Mapped[bool] = mapped_column(default=True, server_default=true())
    version: Mapped[int] = mapped_column(default=1, server_default=text("1"))
    """Bumped on every change of ``definition``; runs record the version they executed."""
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class WorkflowRun(Base):
    """One execution of a workflow, leased by a worker. A run whose lease expired without a
    heartbeat is stuck and reclaimed by the reaper (``ix`` on ``status, lease_expires_at``).

    ``UNIQUE (workflow_id, idempotency_key)`` makes a retried manual trigger one run;
    ``UNIQUE (workflow_id, scheduled_for)`` makes a schedule tick fire once across workers.
    """

    __tablename__ = "workflow_runs"
    __table_args__ = (
        UniqueConstraint("workflow_id", "idempotency_key"),
        UniqueConstraint("workflow_id", "scheduled_for"),
        CheckConstraint(
            _in(
                "status",
                "queued",
                "running",
                "succeeded",
                "failed",
                "compensating",
                "compensated",
                "stuck",
            ),
            name="status",
        ),
        CheckConstraint(_in("trigger", "manual", "schedule"), name="trigger"),
        CheckConstraint("attempt >= 0 AND max_attempts >= 1", name="attempts"),
        Index(None, "status", "lease_expires_at"),
        Index(None, "user_id", "queued_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    workflow_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflows.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID] = _user_fk()
    workflow_version: Mapped[int]
    status: Mapped[str] = mapped_column(default="queued", server_default="queued")
    trigger: Mapped[str]
    idempotency_key: Mapped[str | None]
    scheduled_for: Mapped[datetime | None]
    attempt: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(default=3, server_default=text("3"))
    lease_owner: Mapped[str | None]
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    queued_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None]
    trace_context: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """W3C trace context of the request that queued the run, so the worker's spans join it."""


class WorkflowStepRun(Base):
    """One attempt of one step (or of its compensation) within a run."""

    __tablename__ = "workflow_step_runs"
    __table_args__ = (
        UniqueConstraint("run_id", "step_index", "is_compensation", "attempt"),
        CheckConstraint(
            _in(
                "status",
                "pending",
                "running",
                "succeeded",
                "failed",
                "compensated",
                "compensation_failed",
                "skipped",
            ),
            name="status",
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workflow_runs.id", ondelete="CASCADE"))
    step_index: Mapped[int]
    step_name: Mapped[str]
    kind: Mapped[str]
    status: Mapped[str] = mapped_column(default="pending", server_default="pending")
    attempt: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    is_compensation: Mapped[bool] = mapped_column(default=False, server_default=false())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None]
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


# --- integrations and uploads ---------------------------------------------------------------


class Integration(Base):
    """An external API a workflow may call. Credentials are stored encrypted only:
    ``credentials_key_id`` names the key that sealed them, so keys can rotate."""

    __tablename__ = "integrations"
    __table_args__ = (
        UniqueConstraint("user_id", "name"),
        CheckConstraint(_in("kind", "http_api_key", "oauth2"), name="kind"),
        CheckConstraint(_in("status", "active", "needs_reauth", "error", "disabled"), name="status"),
        Index(None, "status", "token_expires_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    kind: Mapped[str]
    name: Mapped[str]
    base_url: Mapped[str]
    credentials_ciphertext: Mapped[bytes]
    credentials_nonce: Mapped[bytes | None]
    credentials_key_id: Mapped[str]
    token_expires_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(default="active", server_default="active")
    last_refresh_at: Mapped[datetime | None]
    last_error: Mapped[str | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class Upload(Base):
    """A stored file. ``storage_name`` is the server-chosen name on disk, never the client's."""

    __tablename__ = "uploads"
    __table_args__ = (
        UniqueConstraint("storage_name"),
        CheckConstraint("size_bytes >= 0", name="size_non_negative"),
        CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256_hex"),
        Index(None, "user_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    original_name: Mapped[str]
    storage_name: Mapped[str]
    content_type: Mapped[str]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(CHAR(64))
    created_at: Mapped[datetime] = _created_at()
