"""``vigil keys rotate``: re-seal every integration's credentials under the primary key.

Rows not sealed under the primary key are taken in batches by id (``FOR UPDATE SKIP LOCKED``:
a row a token refresh holds right now is left for the next run, and that refresh seals it under
the primary key anyway), opened with whichever configured key sealed them and sealed again
with a fresh nonce. Each batch commits, so an interrupted rotation keeps what it did and a
second run continues; running it again when everything is rotated changes nothing. Rows sealed
under a key that is no longer configured are counted as ``unreadable`` and left untouched.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import Integration
from service.domain.integrations.keyring import CredentialsUnreadable, Keyring, Sealed
from telemetry.logging import get_logger

__all__ = ["RotationReport", "rotate_credentials"]

_log = get_logger("vigil.integrations")


@dataclass
class RotationReport:
    primary: str
    rotated: int = 0
    unreadable: int = 0
    remaining: int = 0
    """Rows still not under the primary key after the run (unreadable or locked meanwhile)."""


async def rotate_credentials(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring, batch_size: int = 100
) -> RotationReport:
    report = RotationReport(keyring.primary)
    after = uuid.UUID(int=0)
    stale = Integration.credentials_key_id != keyring.primary
    while True:
        async with sessionmaker() as session, session.begin():
            stmt = (
                select(Integration)
                .where(stale, Integration.id > after)
                .order_by(Integration.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            )
            rows = (await session.scalars(stmt)).all()
            for row in rows:
                old = Sealed(row.credentials_key_id, row.credentials_nonce or b"", row.credentials_ciphertext)
                try:
                    plain = keyring.open(old, integration_id=row.id, user_id=row.user_id)
                except CredentialsUnreadable:
                    report.unreadable += 1
                    _log.error("credentials_unreadable", integration_id=str(row.id), key_id=row.credentials_key_id)
                    continue
                new = keyring.seal(plain, integration_id=row.id, user_id=row.user_id)
                row.credentials_key_id, row.credentials_nonce, row.credentials_ciphertext = (
                    new.key_id, new.nonce, new.ciphertext,
                )  # fmt: skip
                report.rotated += 1
            taken, after = len(rows), rows[-1].id if rows else after  # read before commit expires the rows
        if taken < batch_size:
            break
    async with sessionmaker() as session:
        report.remaining = int(await session.scalar(select(func.count()).select_from(Integration).where(stale)) or 0)
    _log.info("credentials_rotated", primary=report.primary, rotated=report.rotated, unreadable=report.unreadable,
              remaining=report.remaining)  # fmt: skip
    return report
