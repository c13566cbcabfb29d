"""Uploads: storing a received file with its row, listing, reading and deleting them.

Order of a store (``POST /api/uploads``), each step a refusal point that leaves nothing behind:

1. the disk guard (507 while free space is below the threshold) and the quota (the user's
   stored bytes, read once; 413 when nothing is left);
2. the stream is received into ``tmp/<uuid>.part`` (:mod:`.receive`: size, quota, name, type
   and free space checked as bytes arrive);
3. the disk guard again, now that the file is written;
4. one transaction: ``pg_advisory_xact_lock`` on the user, the quota re-checked against the
   committed sum (two concurrent uploads of one user serialise here, so together they never
   overshoot; the loser gets 413 ``quota``), the row inserted, the file fsynced and moved into
   place with :func:`os.replace`, the folder fsynced, then COMMIT;
5. any failure after the move (the commit itself included: PostgreSQL gone mid-upload answers
   503) removes the file: no orphan. A crash between move and commit can still leave one;
   the sweeper removes stored files without a row, and ``.part`` files, after an hour.

The lock is held only for the final check and insert, never while a slow client streams.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request
from opentelemetry import trace
from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Upload
from service.domain.uploads.receive import REASONS, Limits, Received, UploadRejected, disk_full, over_quota, receive
from service.domain.uploads.storage import UploadStorage
from service.guardrails.cache import Cache
from service.guardrails.database import DatabaseGuard
from service.settings import Settings
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = ["UploadOut", "UploadPage", "Uploads", "upload_out"]

_log = get_logger("vigil.uploads")
_ORPHAN_GRACE_SECONDS = 3600.0
_VERSION_TTL_SECONDS = 86_400.0


class UploadOut(msgspec.Struct, frozen=True):
    """An upload's metadata as its owner sees it (never the storage name)."""

    id: uuid.UUID
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    created_at: datetime


class UploadPage(msgspec.Struct, frozen=True):
    items: list[UploadOut]
    next_before: uuid.UUID | None
    """Pass as ``before`` for the next (older) page; null when there is none."""
    used_bytes: int
    """Bytes the caller has stored (counted against ``quota_bytes``)."""
    quota_bytes: int


def upload_out(row: Upload) -> UploadOut:
    return UploadOut(row.id, row.original_name, row.content_type, row.size_bytes, row.sha256, row.created_at)


def _lock_key(user_id: uuid.UUID) -> int:
    """A signed 64-bit advisory-lock key for one user's uploads (namespaced by a hash prefix)."""
    return int.from_bytes(hashlib.sha256(b"vigil.uploads:" + user_id.bytes).digest()[:8], "big", signed=True)


class Uploads:
    """The uploads service, published as ``resources.extensions["uploads"]``."""

    def __init__(self, settings: Settings, db: DatabaseGuard, cache: Cache, metrics: Metrics) -> None:
        root = Path(settings.upload_dir) if settings.upload_dir else settings.data_dir / "uploads"
        self.storage = UploadStorage(
            root, min_free_bytes=settings.upload_min_free_bytes, min_free_percent=settings.upload_min_free_percent
        )
        self.max_bytes = settings.upload_max_bytes
        self.quota_bytes = settings.upload_user_quota_bytes
        self.allowed_types = frozenset(t.strip().lower() for t in settings.upload_allowed_types)
        self._db, self._cache = db, cache
        counter = metrics.counter("upload_rejections_total")
        self._rejections = {r: counter.labels(reason=r) for r in REASONS}
        metrics.gauge("upload_storage_free_bytes").set_function(self._free_bytes)
        metrics.gauge("upload_storage_min_free_bytes").set_function(lambda: float(self.storage.min_free_bytes))
        self._low = False

    def _free_bytes(self) -> float:
        try:
            return float(self.storage.free_bytes())
        except OSError:
            return float("nan")

    # --- the disk guard's state, logged once per change -----------------------------------------

    async def _check_room(self) -> None:
        room = await asyncio.to_thread(self.storage.has_room)
        if room == (not self._low):
            return
        self._low = not room
        if room:
            _log.info("upload_storage_recovered", free_bytes=self._free_bytes())
        else:
            _log.warning(
                "upload_storage_low", free_bytes=self._free_bytes(), min_free_bytes=self.storage.min_free_bytes
            )

    def _reject(self, exc: UploadRejected) -> None:
        if exc.reason == "disk_full":
            self._low = True
        self._rejections[exc.reason].inc()
        trace.get_current_span().add_event("upload.rejected", {"reason": exc.reason, "status": exc.status_code})

    # --- store ---------------------------------------------------------------------------------

    async def create(self, request: Request[Any, Any, Any], user_id: uuid.UUID) -> UploadOut:
        """Receive the request's file and store it (see the module docstring); refusals are
        counted in ``upload_rejections_total{reason}`` and raised as :class:`UploadRejected`."""
        try:
            await self._check_room()
            if self._low:
                raise disk_full()
            used = await self._db.read("uploads_used_bytes", lambda s: self._used(s, user_id))
            limits = Limits(self.max_bytes, self.quota_bytes - used, self.quota_bytes, self.allowed_types)
            if limits.quota_left <= 0:
                raise over_quota(self.quota_bytes)
            received = await receive(request, self.storage, limits)
            try:
                await self._check_room()
                if self._low:
                    raise disk_full()
                out = await self._commit(user_id, received)
            except BaseException:
                UploadStorage.remove(received.temp)
                raise
        except UploadRejected as exc:
            self._reject(exc)
            raise
        await self._bump(user_id)
        return out

    async def _used(self, session: AsyncSession, user_id: uuid.UUID) -> int:
        total = await session.scalar(
            select(func.coalesce(func.sum(Upload.size_bytes), 0)).where(Upload.user_id == user_id)
        )
        return int(total or 0)

    async def _commit(self, user_id: uuid.UUID, received: Received) -> UploadOut:
        storage_name = self.storage.new_name()
        placed: Path | None = None
        try:
            async with self._db.session() as session, session.begin():
                await session.execute(select(func.pg_advisory_xact_lock(_lock_key(user_id))))
                used = await self._used(session, user_id)
                if used + received.size > self.quota_bytes:
                    raise over_quota(self.quota_bytes, used_bytes=used)
                row = Upload(
                    user_id=user_id, original_name=received.filename, storage_name=storage_name,
                    content_type=received.content_type, size_bytes=received.size, sha256=received.sha256,
                )  # fmt: skip
                session.add(row)
                await session.flush()
                await session.refresh(row, ["created_at"])
                out = upload_out(row)
                placed = await asyncio.to_thread(self.storage.place, received.temp, storage_name)
        except BaseException:
            if placed is not None:  # moved, but the row did not commit: no orphan left behind
                UploadStorage.remove(placed)
                _log.warning("upload_rolled_back", upload_id=str(out.id))
            raise
        return out

    # --- read and delete -------------------------------------------------------------------------

    async def _version(self, user_id: uuid.UUID) -> str:
        """A per-user token in the list cache keys; every write replaces it (read-your-writes)."""

        async def fresh() -> str:
            return uuid.uuid4().hex

        got = await self._cache.get_or_load(f"uploads:ver:{user_id}", fresh, ttl=_VERSION_TTL_SECONDS)
        return str(got.value)

    async def _bump(self, user_id: uuid.UUID) -> None:
        await self._cache.invalidate(f"uploads:ver:{user_id}")

    async def list_page(
        self, user_id: uuid.UUID, before: uuid.UUID | None, limit: int
    ) -> tuple[str, Callable[[], Awaitable[UploadPage]]]:
        """The cache key and loader of one page of ``user_id``'s uploads, newest first."""
        key = f"uploads:list:{user_id}:{await self._version(user_id)}:{before}:{limit}"

        async def query(session: AsyncSession) -> UploadPage:
            stmt = select(Upload).where(Upload.user_id == user_id)
            if before is not None:
                cursor = select(Upload.created_at).where(Upload.id == before, Upload.user_id == user_id)
                stmt = stmt.where(tuple_(Upload.created_at, Upload.id) < tuple_(cursor.scalar_subquery(), before))
            stmt = stmt.order_by(Upload.created_at.desc(), Upload.id.desc()).limit(limit + 1)
            rows = (await session.scalars(stmt)).all()
            items = [upload_out(r) for r in rows[:limit]]
            used = await self._used(session, user_id)
            return UploadPage(items, items[-1].id if len(rows) > limit else None, used, self.quota_bytes)

        async def load() -> UploadPage:
            return await self._db.read("uploads_list", query)

        return key, load

    async def get(self, user_id: uuid.UUID, upload_id: uuid.UUID) -> Upload | None:
        """The row of ``upload_id`` if ``user_id`` owns it (someone else's is as absent as none)."""

        async def query(session: AsyncSession) -> Upload | None:
            row: Upload | None = await session.scalar(
                select(Upload).where(Upload.id == upload_id, Upload.user_id == user_id)
            )
            return row

        return await self._db.read("uploads_get", query)

    def content_path(self, row: Upload) -> Path | None:
        """The stored file of ``row``; None when it is missing (logged: a file lost on disk)."""
        path = self.storage.path(row.storage_name)
        if path.is_file():
            return path
        _log.error("upload_content_missing", upload_id=str(row.id))
        return None

    async def delete(self, user_id: uuid.UUID, upload_id: uuid.UUID) -> Upload | None:
        """Delete the row, then its file (a file left by a failed unlink is the sweeper's)."""
        async with self._db.session() as session, session.begin():
            row: Upload | None = await session.scalar(
                delete(Upload).where(Upload.id == upload_id, Upload.user_id == user_id).returning(Upload)
            )
        if row is None:
            return None
        try:
            await asyncio.to_thread(UploadStorage.remove, self.storage.path(row.storage_name))
        except OSError:
            _log.warning("upload_file_not_removed", upload_id=str(upload_id))
        await self._bump(user_id)
        return row

    # --- the orphan sweeper ------------------------------------------------------------------------

    @staticmethod
    async def _known(session: AsyncSession, names: list[str]) -> set[str]:
        return set(await session.scalars(select(Upload.storage_name).where(Upload.storage_name.in_(names))))

    async def sweep(self, older_than_seconds: float = _ORPHAN_GRACE_SECONDS) -> int:
        """Remove ``.part`` files and stored files without a row, older than the grace period
        (a crash between receiving and committing). Returns how many files were removed."""
        temps = await asyncio.to_thread(lambda: list(self.storage.stale_temp_files(older_than_seconds)))
        stored = await asyncio.to_thread(lambda: list(self.storage.stored_files(older_than_seconds)))
        orphans = list(temps)
        for i in range(0, len(stored), 500):
            batch = dict(stored[i : i + 500])
            present = await self._db.read("uploads_sweep", functools.partial(self._known, names=list(batch)))
            orphans += [p for name, p in batch.items() if name not in present]
        for p in orphans:
            await asyncio.to_thread(UploadStorage.remove, p)
        if orphans:
            _log.warning("upload_orphans_removed", count=len(orphans))
        return len(orphans)
