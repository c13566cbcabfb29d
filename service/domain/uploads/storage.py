"""Where uploaded files live on disk, and the disk guard in front of every write.

Layout under the storage root (one filesystem, so :func:`os.replace` is atomic)::

    tmp/<uuid>.part         a file being received (fsynced, then moved into place)
    ab/cd/<uuid hex>        a stored file; ``ab/cd/<hex>`` is the row's ``storage_name``

Names are generated here, never taken from a client: nothing a client sends can choose or
escape the path (:meth:`UploadStorage.path` still refuses a name that would leave the root).

The disk guard (seed row: file upload disk full, P2): writes are refused while the volume's
free space (``statvfs`` ``f_bavail``, what an unprivileged writer may use) is below
:attr:`UploadStorage.min_free_bytes` = max(``upload_min_free_bytes``,
``upload_min_free_percent`` of the volume).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["UploadStorage"]

_TMP = "tmp"


class UploadStorage:
    """The storage folder: generated names, temporary files, atomic moves and free space."""

    def __init__(self, root: Path, *, min_free_bytes: int, min_free_percent: float) -> None:
        self.root = root
        self._min_bytes = max(0, min_free_bytes)
        self._min_percent = max(0.0, min_free_percent)

    def prepare(self) -> None:
        (self.root / _TMP).mkdir(parents=True, exist_ok=True)

    # --- the disk guard ---------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Free bytes an unprivileged writer may use on the storage volume."""
        return shutil.disk_usage(self.root).free

    @property
    def min_free_bytes(self) -> int:
        """The refusal threshold: the larger of the configured bytes and percentage."""
        try:
            total = shutil.disk_usage(self.root).total
        except OSError:
            total = 0
        return max(self._min_bytes, int(total * self._min_percent / 100))

    def has_room(self) -> bool:
        """True while free space is at or above the threshold (unknown free space counts as none)."""
        try:
            usage = shutil.disk_usage(self.root)
        except OSError:
            return False
        return usage.free >= max(self._min_bytes, int(usage.total * self._min_percent / 100))

    # --- names and files --------------------------------------------------------------------

    @staticmethod
    def new_name() -> str:
        """A fresh storage name, sharded two levels deep so no folder grows without bound."""
        hexname = uuid.uuid4().hex
        return f"{hexname[:2]}/{hexname[2:4]}/{hexname}"

    def path(self, storage_name: str) -> Path:
        """The file of ``storage_name``; ``ValueError`` if it would resolve outside the root."""
        root = self.root.resolve()
        target = (root / storage_name).resolve()
        if root not in target.parents:
            raise ValueError("storage name outside the storage root")
        return target

    def temp_path(self) -> Path:
        return self.root / _TMP / f"{uuid.uuid4().hex}.part"

    def place(self, temp: Path, storage_name: str) -> Path:
        """Fsync ``temp``, move it atomically to ``storage_name`` and fsync the folder, so a
        stored row never points at a file a crash could take back."""
        final = self.path(storage_name)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    @staticmethod
    def remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    # --- the orphan sweeper's view ------------------------------------------------------------

    def stale_temp_files(self, older_than_seconds: float) -> Iterator[Path]:
        cutoff = time.time() - older_than_seconds
        for p in (self.root / _TMP).glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    yield p

    def stored_files(self, older_than_seconds: float) -> Iterator[tuple[str, Path]]:
        """(storage name, path) of stored files last modified before the cutoff."""
        cutoff = time.time() - older_than_seconds
        for p in self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
            with contextlib.suppress(FileNotFoundError):
                if p.is_file() and p.stat().st_mtime < cutoff:
                    yield p.relative_to(self.root).as_posix(), p
