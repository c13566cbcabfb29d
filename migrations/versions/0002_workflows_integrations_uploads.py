"""Automation tables: patterns, suggestions, workflows and their runs, integrations, uploads.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("now()")
NEW_UUID = sa.text("gen_random_uuid()")
EMPTY_JSONB = sa.text("'{}'::jsonb")


def _user_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["user_id"], ["users.id"], name=op.f(f"fk_{table}_user_id_users"), ondelete="CASCADE"
    )


def upgrade() -> None:
    """Create patterns, workflows, suggestions, workflow_runs, workflow_step_runs,
    integrations and uploads."""
    op.create_table(
        "patterns",
        sa.Column("id", sa.Uuid(), server_default=NEW_UUID, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("support", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=False),
        sa.Column("details", postgresql.JSONB(), server_default=EMPTY_JSONB, nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint("kind IN ('time_of_day', 'sequence')", name=op.f("ck_patterns_kind")),
        sa.CheckConstraint("confidence >= 0 AND confidence <= 1", name=op.f("ck_patterns_confidence_range")),
        sa.CheckConstraint("support >= 0", name=op.f("ck_patterns_support_non_negative")),
        _user_fk("patterns"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patterns")),
        sa.UniqueConstraint("user_id", "kind", "signature", name=op.f("uq_patterns_user_id_kind_signature")),
    )

    op.create_table(
        "workflows",
        sa.Column("id", sa.Uuid(), server_default=NEW_UUID, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("definition", postgresql.JSONB(), nullable=False),
        sa.Column("schedule_cron", sa.Text(), nullable=True),
        sa.Column("schedule_interval_seconds", sa.Integer(), nullable=True),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint(
            "schedule_cron IS NULL OR schedule_interval_seconds IS NULL",
            name=op.f("ck_workflows_one_schedule"),
        ),
        sa.CheckConstraint("schedule_interval_seconds > 0", name=op.f("ck_workflows_interval_positive")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_workflows_version_positive")),
        _user_fk("workflows"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
    )
    op.create_index(op.f("ix_workflows_enabled_next_run_at"), "workflows", ["enabled", "next_run_at"])

    op.create_table(
        "suggestions",
        sa.Column("id", sa.Uuid(), server_default=NEW_UUID, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("pattern_id", sa.Uuid(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("workflow_definition", postgresql.JSONB(), nullable=False),
        sa.Column("status", sa.Text(), server_default="open", nullable=False),
        sa.Column("workflow_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('open', 'accepted', 'dismissed')", name=op.f("ck_suggestions_status")),
        sa.ForeignKeyConstraint(
            ["pattern_id"],
            ["patterns.id"],
            name=op.f("fk_suggestions_pattern_id_patterns"),
            ondelete="CASCADE",
        ),
        _user_fk("suggestions"),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_suggestions_workflow_id_workflows"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suggestions")),
    )
    op.create_index(op.f("ix_suggestions_pattern_id"), "suggestions", ["pattern_id"])
    op.create_index(op.f("ix_suggestions_user_id_status"), "suggestions", ["user_id", "status"])

    op.create_table(
        "workflow_runs",
        sa.Column("id", sa.Uuid(), server_default=NEW_UUID, nullable=False),
        sa.Column("workflow_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), server_default="queued", nullable=False),
        sa.Column("trigger", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("trace_context", postgresql.JSONB(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'compensating', 'compensated', 'stuck')",
            name=op.f("ck_workflow_runs_status"),
        ),
        sa.CheckConstraint("trigger IN ('manual', 'schedule')", name=op.f("ck_workflow_runs_trigger")),
        sa.CheckConstraint("attempt >= 0 AND max_attempts >= 1", name=op.f("ck_workflow_runs_attempts")),
        _user_fk("workflow_runs"),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_workflow_runs_workflow_id_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_runs")),
        sa.UniqueConstraint(
            "workflow_id", "idempotency_key", name=op.f("uq_workflow_runs_workflow_id_idempotency_key")
        ),
        sa.UniqueConstraint("workflow_id", "scheduled_for", name=op.f("uq_workflow_runs_workflow_id_scheduled_for")),
    )
    op.create_index(op.f("ix_workflow_runs_status_lease_expires_at"), "workflow_runs", ["status", "lease_expires_at"])
    op.create_index(op.f("ix_workflow_runs_user_id_queued_at"), "workflow_runs", ["user_id", "queued_at"])

    op.create_table(
        "workflow_step_runs",
        sa.Column("id", sa.Uuid(), server_default=NEW_UUID, nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("step_name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("is_compensation", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output", postgresql.JSONB(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'compensated', 'compensation_failed', 'skipped')",
            name=op.f("ck_workflow_step_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["workflow_runs.id"],
            name=op.f("fk_workflow_step_runs_run_id_workflow_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_step_runs")),
        sa.UniqueConstraint(
            "run_id",
            "step_index",
            "is_compensation",
            "attempt",
            name=op.f("uq_workflow_step_runs_run_id_step_index_is_compensation_attempt"),
        ),
    )

    op.create_table(
        "integrations",
        sa.Column("id", sa.Uuid(), server_default=NEW_UUID, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("credentials_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("credentials_nonce", sa.LargeBinary(), nullable=True),
        sa.Column("credentials_key_id", sa.Text(), nullable=False),
        sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.Text(), server_default="active", nullable=False),
        sa.Column("last_refresh_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint("kind IN ('http_api_key', 'oauth2')", name=op.f("ck_integrations_kind")),
        sa.CheckConstraint(
            "status IN ('active', 'needs_reauth', 'error', 'disabled')", name=op.f("ck_integrations_status")
        ),
        _user_fk("integrations"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_integrations")),
        sa.UniqueConstraint("user_id", "name", name=op.f("uq_integrations_user_id_name")),
    )
    op.create_index(op.f("ix_integrations_status_token_expires_at"), "integrations", ["status", "token_expires_at"])

    op.create_table(
        "uploads",
        sa.Column("id", sa.Uuid(), server_default=NEW_UUID, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("original_name", sa.Text(), nullable=False),
        sa.Column("storage_name", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.CHAR(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name=op.f("ck_uploads_sha256_hex")),
        sa.CheckConstraint("size_bytes >= 0", name=op.f("ck_uploads_size_non_negative")),
        _user_fk("uploads"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
        sa.UniqueConstraint("storage_name", name=op.f("uq_uploads_storage_name")),
    )
    op.create_index(op.f("ix_uploads_user_id_created_at"), "uploads", ["user_id", "created_at"])


def downgrade() -> None:
    """Drop the tables of :func:`upgrade` (their indexes and constraints go with them),
    dependants first."""
    op.drop_table("uploads")
    op.drop_table("integrations")
    op.drop_table("workflow_step_runs")
    op.drop_table("workflow_runs")
    op.drop_table("suggestions")
    op.drop_table("workflows")
    op.drop_table("patterns")
