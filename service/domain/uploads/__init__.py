"""File uploads (seed row: file upload disk full, P2): streamed to disk while hashed, with a
maximum size, a per-user quota that concurrent uploads cannot overshoot, a content-type allow
list checked against the first bytes, server-generated storage names, and a disk guard that
answers 507 while the storage volume is nearly full.

``resources.extensions["uploads"]`` is an :class:`Uploads`. Refusals raise
:class:`UploadRejected` (problem+json naming the field; ``reason`` is the
``upload_rejections_total`` label).
"""

from __future__ import annotations

from service.domain.uploads.receive import UploadRejected
from service.domain.uploads.service import UploadOut, UploadPage, Uploads

__all__ = ["UploadOut", "UploadPage", "UploadRejected", "Uploads"]
