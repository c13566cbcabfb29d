"""Writing to the e-mail outbox: the row is inserted in the caller's transaction, so the mail
exists exactly when the change that needs it commits (a worker delivers it later)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import EmailOutbox

__all__ = ["enqueue_email"]


async def enqueue_email(
    session: AsyncSession,
    *,
    to: str,
    subject: str,
    body: str,
    kind: str,
    user_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """Queue one e-mail (status ``pending``, due now) in ``session``'s transaction and return
    its id. Does not commit: the caller's commit sends it, its rollback cancels it."""
    outbox_id = uuid.uuid4()
    await session.execute(
        insert(EmailOutbox).values(
            id=outbox_id,
            user_id=user_id,
            to_address=to,
            subject=subject,
            body=body,
            kind=kind,
            status="pending",
            attempts=0,
            next_attempt_at=func.now(),
        )
    )
    return outbox_id
