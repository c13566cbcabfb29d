"""The uploads component: publishes :class:`~service.domain.uploads.service.Uploads` as
``resources.extensions["uploads"]``, mounts the uploads API (``POST /api/uploads`` with its own
body limit, ``upload_max_bytes`` plus the multipart framing, instead of the app-wide
``max_body_bytes``) and runs the orphan sweeper for the application's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar, post
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.domain.auth.middleware import requires_user
from service.domain.uploads.receive import MAX_OTHER_BYTES
from service.domain.uploads.routes import create_upload, delete_upload, get_upload, get_upload_content, list_uploads
from service.domain.uploads.service import Uploads
from service.periodic import Periodic

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["UploadsComponent"]


class UploadsComponent(InitPluginProtocol):
    """File uploads with size, quota, type and disk guards."""

    def __init__(self, resources: Resources) -> None:
        s = resources.settings
        self.uploads = Uploads(s, resources.db, resources.cache, resources.metrics)
        resources.extensions["uploads"] = self.uploads
        self._sweeper = (
            Periodic("upload-sweeper", s.upload_sweep_interval_seconds, self._sweep)
            if s.upload_sweep_interval_seconds > 0
            else None
        )
        self._body_limit = s.upload_max_bytes + MAX_OTHER_BYTES
        self._swept_once = False

    async def _sweep(self) -> None:
        # Periodic runs at once; the first round is skipped so startup does no database work
        # (and a test breaking PostgreSQL never sees the sweeper's queries in its breaker).
        if self._swept_once:
            await self.uploads.sweep()
        self._swept_once = True

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        create = post(
            "/api/uploads",
            guards=[requires_user],
            tags=["uploads"],
            request_max_body_size=self._body_limit,
            summary="Upload a file (multipart/form-data, part 'file')",
        )(create_upload)
        app_config.route_handlers.extend([create, list_uploads, get_upload, get_upload_content, delete_upload])
        app_config.lifespan.append(self._lifespan)
        return app_config

    @asynccontextmanager
    async def _lifespan(self, _: Litestar) -> AsyncIterator[None]:
        self.uploads.storage.prepare()
        if self._sweeper is not None:
            self._sweeper.start()
        try:
            yield
        finally:
            if self._sweeper is not None:
                await self._sweeper.stop()
