"""Alembic environment: async (asyncpg) online migrations, plus an offline SQL mode.

The URL comes from ``sqlalchemy.url`` (set by :mod:`service.db.migrate`) or else from
``VIGIL_DATABASE_URL``. A caller may instead hand over an open sync ``Connection`` in
``config.attributes["connection"]`` (e.g. from ``AsyncConnection.run_sync``); it is used as is.

Runs on a connection of their own hold a PostgreSQL advisory lock for their duration, so
instances that start together migrate one after the other instead of racing on the same DDL.
A handed-over connection is the caller's: its transaction and locking are left to the caller.

``asyncio.run`` is used here, so programmatic callers inside a running event loop must call
Alembic from another thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service.db.models import Base

#: pg_advisory_lock key held while migrating (arbitrary, fixed: "vigil" in ASCII).
MIGRATION_LOCK_KEY = 0x766967696C

config = context.config

# Only for the alembic CLI: fileConfig would replace the host application's logging.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str | None:
    return config.get_main_option("sqlalchemy.url") or os.environ.get("VIGIL_DATABASE_URL") or None


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # One transaction per revision: a failure leaves the earlier ones applied and the
        # version table telling the truth, so the drift gauge reports how far behind it is.
        transaction_per_migration=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit the migration SQL to the script output without connecting."""
    url = _url()
    if url:
        _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    else:
        _configure(dialect_name="postgresql", literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on ``connection`` under the migration advisory lock."""
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()
    try:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if connection.in_transaction():
            connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()


async def run_async_migrations(url: str) -> None:
    """Open an asyncpg connection (no pool) and migrate through it."""
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Migrate the given connection, or a new one to the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = _url()
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url or VIGIL_DATABASE_URL")
    asyncio.run(run_async_migrations(url))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
