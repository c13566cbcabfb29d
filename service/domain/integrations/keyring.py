"""Encryption at rest of integration credentials (seed row: unencrypted credentials, P1).

AES-256-GCM (cryptography's ``AESGCM``), authenticated: a ciphertext that was altered, opened
under another key, or moved to another row fails to open. Each seal draws a fresh 96-bit
random nonce (the birthday bound of 2**32 seals per key is far beyond what rotation leaves a
key to do). The associated data binds a ciphertext to its row::

    b"vigil.integration.v1" | key id | integration id (16 bytes) | user id (16 bytes)

so copying ``credentials_ciphertext`` (with its nonce and key id) into another user's or
another integration's row yields :class:`CredentialsUnreadable`, never someone else's secret.

Keys come from ``VIGIL_CREDENTIAL_KEYS`` (``kid:base64key,...``): the first is the primary
(seals), every listed key opens. Rotation: put a new key first, run ``vigil keys rotate``
(re-seals every row not under the primary), then remove the old key. With no keys configured
(development and tests only; production refuses to start) a key is generated once into
``data_dir/credential-keys`` (mode 0600) and a loud warning is logged: losing that file makes
the stored credentials unreadable, which is the point of encrypting them.

Plaintext exists only in memory between :meth:`Keyring.open` and the outbound request; it is
never logged, never put in a span, never returned by the API.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.settings import Settings, SettingsError
from telemetry.logging import get_logger

__all__ = ["DEV_KEY_FILE", "CredentialsUnreadable", "Keyring", "Sealed", "generate_key_line"]

DEV_KEY_FILE = "credential-keys"
NONCE_BYTES = 12
_AAD_PREFIX = b"vigil.integration.v1"
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_log = get_logger("vigil.integrations")


class CredentialsUnreadable(Exception):
    """The ciphertext cannot be opened: unknown (retired) key id, tampering, or another row's
    ciphertext. The message never contains key material or plaintext."""


@dataclass(frozen=True)
class Sealed:
    """What the ``credentials_*`` columns hold."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


def _aad(key_id: str, integration_id: uuid.UUID, user_id: uuid.UUID) -> bytes:
    return b"|".join((_AAD_PREFIX, key_id.encode(), integration_id.bytes, user_id.bytes))


def generate_key_line(key_id: str | None = None) -> str:
    """A new ``kid:base64key`` entry (256-bit key) for ``VIGIL_CREDENTIAL_KEYS``."""
    kid = key_id or "k" + secrets.token_hex(4)
    if not _KID.match(kid):
        raise ValueError("a key id is 1-32 characters of letters, digits, '_', '.', '-'")
    return f"{kid}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


def _parse(entries: tuple[str, ...], source: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for n, entry in enumerate(entries):
        kid, sep, b64 = entry.strip().partition(":")
        if not sep or not _KID.match(kid):
            raise SettingsError(f"{source}: entry {n + 1} is not 'kid:base64key' with a simple key id")
        try:
            key = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError(f"{source}: key {kid!r} is not valid base64") from None
        if len(key) != 32:
            raise SettingsError(f"{source}: key {kid!r} must be 32 bytes (AES-256), got {len(key)}")
        if kid in keys:
            raise SettingsError(f"{source}: key id {kid!r} is listed twice")
        keys[kid] = key
    if not keys:
        raise SettingsError(f"{source}: no key")
    return keys


class Keyring:
    """The credential keys: the primary seals, every key opens."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise SettingsError("VIGIL_CREDENTIAL_KEYS: no key")
        self.primary = next(iter(keys))
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}

    @classmethod
    def from_entries(cls, entries: tuple[str, ...] | str, source: str = "VIGIL_CREDENTIAL_KEYS") -> Keyring:
        if isinstance(entries, str):
            entries = tuple(e for e in entries.split(",") if e.strip())
        return cls(_parse(entries, source))

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        """The configured keys; without any (never in production: ``Settings.findings``), the
        development key file under ``data_dir``, created on first use."""
        if settings.credential_keys:
            return cls.from_entries(settings.credential_keys)
        if settings.is_production:
            raise SettingsError("refusing to start in production: VIGIL_CREDENTIAL_KEYS is not set")
        return cls.from_entries(_dev_key_line(settings.data_dir / DEV_KEY_FILE), str(settings.data_dir / DEV_KEY_FILE))

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._aead)

    def seal(self, plaintext: bytes, *, integration_id: uuid.UUID, user_id: uuid.UUID) -> Sealed:
        """Encrypt under the primary key with a fresh random nonce, bound to the row."""
        nonce = os.urandom(NONCE_BYTES)
        aad = _aad(self.primary, integration_id, user_id)
        return Sealed(self.primary, nonce, self._aead[self.primary].encrypt(nonce, plaintext, aad))

    def open(self, sealed: Sealed, *, integration_id: uuid.UUID, user_id: uuid.UUID) -> bytes:
        """Decrypt and authenticate; :class:`CredentialsUnreadable` on any mismatch."""
        aead = self._aead.get(sealed.key_id)
        if aead is None:
            raise CredentialsUnreadable(f"credentials are sealed under key {sealed.key_id!r}, which is not configured")
        try:
            plain: bytes = aead.decrypt(sealed.nonce, sealed.ciphertext, _aad(sealed.key_id, integration_id, user_id))
        except (InvalidTag, ValueError):
            raise CredentialsUnreadable("credentials failed authentication (tampered, or not this row's)") from None
        return plain


def _dev_key_line(path: Path) -> str:
    """The development key: read from ``path``, or generated there once (exclusive create, so two
    processes starting together agree on one key)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    line = generate_key_line("dev")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    _log.warning(
        "credential_key_generated",
        path=str(path),
        note="VIGIL_CREDENTIAL_KEYS is empty: integration credentials are sealed with a development key "
        "kept in this file; losing it makes them unreadable. Production refuses to start without keys.",
    )
    return line
