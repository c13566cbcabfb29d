"""Password hashing: argon2id (argon2-cffi's defaults), off the event loop.

One hash costs ~64 MiB and a few hundred milliseconds of CPU, so hashing runs in worker
threads (argon2-cffi releases the GIL) and at most ``max_concurrency`` at once: a burst of
logins queues for the CPU instead of blocking the loop or allocating gigabytes.

A login for an unknown e-mail still verifies against a dummy hash, so it takes as long as a
wrong password and the answer's timing does not reveal which addresses have accounts.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["Passwords"]

T = TypeVar("T")


class Passwords:
    """Hash and verify passwords without blocking the event loop."""

    def __init__(self, hasher: PasswordHasher | None = None, max_concurrency: int | None = None) -> None:
        self._hasher = hasher or PasswordHasher()
        self._max_concurrency = max_concurrency or max(2, os.cpu_count() or 2)
        self._limiter: anyio.CapacityLimiter | None = None
        self._dummy_hash: str | None = None

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._limiter is None:  # created lazily: it belongs to the running event loop
            self._limiter = anyio.CapacityLimiter(self._max_concurrency)
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    async def hash(self, password: str) -> str:
        """The argon2id hash of ``password`` (salted, parameters encoded in the string)."""
        return await self._run(lambda: self._hasher.hash(password))

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches ``stored_hash``; ``None`` (no such account) spends a
        verification against a dummy hash and answers False."""
        if stored_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
            stored_hash = self._dummy_hash
            password = ""  # never equal to the dummy's random password
        target = stored_hash

        def check() -> bool:
            try:
                return self._hasher.verify(target, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return await self._run(check)

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when ``stored_hash`` used weaker parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True
