"""A small programmatic API over Alembic: migrate a database and measure its drift.

Everything here is synchronous. :func:`upgrade`, :func:`downgrade` and :func:`current` run an
event loop of their own (``asyncio.run``), so async callers must call them from a worker thread
(``await asyncio.to_thread(upgrade, url)``). Migrations are serialised: within a process by a
lock (Alembic's state is global), across processes by a PostgreSQL advisory lock (env.py).
:func:`head`, :func:`pending` and :func:`drift` only read the revision scripts and never touch
a database.

Drift is what ``db_migration_drift`` reports: the number of revisions the database is behind
head, ``0`` at head, ``-1`` when the database carries a revision these scripts do not know
(a newer release migrated it, or it belongs to another application).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

__all__ = [
    "UnknownRevisionError",
    "alembic_config",
    "current",
    "downgrade",
    "drift",
    "head",
    "pending",
    "repository_root",
    "upgrade",
]


# Alembic's ``context`` and ``op`` are module-level proxies, so two commands running at once
# in one process corrupt each other. Processes are serialised by env.py's advisory lock.
_command_lock = threading.Lock()


class UnknownRevisionError(ValueError):
    """A revision is not one of this code's scripts, or not an ancestor of head."""


def repository_root() -> Path:
    """The directory holding ``alembic.ini`` and ``migrations/`` (independent of the cwd)."""
    return Path(__file__).resolve().parents[2]


def alembic_config(url: str | None = None) -> Config:
    """The Alembic configuration of this repository, pointed at ``url`` when given.

    Alembic's own logging setup is switched off: the host application keeps its logging.
    """
    config = Config(str(repository_root() / "alembic.ini"))
    config.attributes["configure_logger"] = False
    if url is not None:
        # The ini parser interpolates ``%``, which percent-encoded passwords contain.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (``"head"``, an id, ``"+1"``)."""
    with _command_lock:
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (an id, ``"-1"`` or ``"base"``)."""
    with _command_lock:
        command.downgrade(alembic_config(url), revision)


def current(url: str, *, connect_timeout: float = 10.0) -> str | None:
    """The revision the database at ``url`` is at; ``None`` when it was never migrated.

    Waits at most ``connect_timeout`` seconds for the connection, so a probe on a dead
    server fails instead of hanging. Raises ``CommandError`` if the database is at several
    heads (a branched history this repository never creates).
    """

    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async def run() -> str | None:
        engine = create_async_engine(url, poolclass=NullPool, connect_args={"timeout": connect_timeout})
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(read)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@functools.cache
def _scripts() -> ScriptDirectory:
    # Cached: health probes ask for drift every few seconds from the event loop, and loading
    # the scripts costs ~10 ms. They only change with a deploy, which restarts the process.
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The head revision of the scripts."""
    revision = _scripts().get_current_head()
    if revision is None:
        raise UnknownRevisionError("the migrations directory holds no revision")
    return revision


def pending(current: str | None) -> list[str]:
    """Revision ids that upgrading from ``current`` to head applies, oldest first.

    ``None`` (a database never migrated) means every revision. Raises
    :class:`UnknownRevisionError` when ``current`` is not an ancestor of head.
    """
    scripts = _scripts()
    unknown = UnknownRevisionError(f"revision {current!r} is not known to the migrations")
    # Exact ids only: Alembic would also resolve prefixes and symbols ("00", "head").
    if current is not None and current not in {script.revision for script in scripts.walk_revisions()}:
        raise unknown
    try:
        # Newest first, down to (not including) ``current``.
        revisions = list(scripts.iterate_revisions("heads", current or "base"))
    except (RevisionError, CommandError) as exc:
        raise unknown from exc
    return [script.revision for script in reversed(revisions) if script.revision != current]


def drift(current: str | None) -> int:
    """How many revisions a database at ``current`` is behind head: ``0`` at head, the number
    of revisions when ``None``, ``-1`` when ``current`` is unknown to the scripts."""
    try:
        return len(pending(current))
    except UnknownRevisionError:
        return -1
