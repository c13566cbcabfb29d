"""Integrations: the connector kinds, their credentials, and the rows that hold them sealed.

Kinds and their ``credentials`` (validated on the way in; unknown fields refused)::

    http_api_key  {"api_key": "...", "header": "X-API-Key", "prefix": "", "expires_at": null}
                  sent as ``<header>: <prefix><api_key>`` (``"header": "Authorization",
                  "prefix": "Bearer "`` for a bearer key); ``expires_at`` (optional) feeds the
                  expiring-credentials gauge.
    oauth2        {"client_id": "...", "client_secret": "...", "token_url": "https://...",
                   "refresh_token": "...", "access_token": null, "expires_at": null, "scope": null}
                  refresh-token grant (RFC 6749 section 6); the access token is refreshed before
                  ``expires_at`` and after a 401.

Every credentials dict is sealed whole (:mod:`.keyring`) into the row's ``credentials_*``
columns; ``token_expires_at`` mirrors ``expires_at`` in clear so sweeps can find rows without
opening them.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Integration
from service.domain.integrations.keyring import Keyring, Sealed
from service.guardrails.egress import is_public_address

__all__ = [
    "KINDS",
    "ApiKeyCredentials",
    "Credentials",
    "CredentialsInvalid",
    "OAuth2Credentials",
    "create_integration",
    "credentials_of",
    "parse_credentials",
    "seal_credentials",
    "validate_url",
]

KINDS: tuple[str, ...] = ("http_api_key", "oauth2")
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]
AwareTime = Annotated[datetime, msgspec.Meta(tz=True, description="With a UTC offset.")]
_EARLIEST, _LATEST = datetime(1900, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")]  # an RFC 9110 token


class ApiKeyCredentials(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Credentials of an ``http_api_key`` integration."""

    api_key: NonEmpty
    header: HeaderName = "X-API-Key"
    prefix: Annotated[str, msgspec.Meta(max_length=64)] = ""
    expires_at: AwareTime | None = None


class OAuth2Credentials(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Credentials of an ``oauth2`` integration (refresh-token grant)."""

    client_id: NonEmpty
    client_secret: NonEmpty
    token_url: NonEmpty
    refresh_token: NonEmpty
    access_token: str | None = None
    expires_at: AwareTime | None = None
    scope: str | None = None


Credentials = ApiKeyCredentials | OAuth2Credentials
_TYPES: dict[str, type[ApiKeyCredentials] | type[OAuth2Credentials]] = {
    "http_api_key": ApiKeyCredentials,
    "oauth2": OAuth2Credentials,
}


class CredentialsInvalid(ValueError):
    """Input that does not fit the kind; ``field`` names it (``credentials.api_key``...). The
    message never echoes a value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_url(url: str, field: str, *, allow_private: bool) -> str:
    """An absolute http(s) URL with a host; IP literals that are not public (loopback, private,
    link-local, ...) and ``localhost`` are refused unless ``allow_private`` (SSRF), so the user
    hears of it at once. Names, and other spellings of addresses, are checked where each
    connection is opened, on what they resolve to (``service.guardrails.egress``, D62)."""
    try:
        parts = httpx_url(url)
    except ValueError:
        raise CredentialsInvalid(field, "is not a valid URL") from None
    if "@" in url.split("//", 1)[-1].split("/", 1)[0]:
        raise CredentialsInvalid(field, "must not carry a user name or password (put secrets in credentials)")
    if parts[0] not in ("http", "https") or not parts[1]:
        raise CredentialsInvalid(field, "must be an absolute http:// or https:// URL")
    if not allow_private and _private_host(parts[1]):
        raise CredentialsInvalid(field, "points to a loopback, private or link-local address")
    return url.rstrip("/")


def httpx_url(url: str) -> tuple[str, str]:
    """(scheme, host) as httpx will understand them."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(str(exc)) from None
    return parsed.scheme, parsed.host


def _private_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return not is_public_address(host.strip("[]"))
    except ValueError:
        return False


def parse_credentials(kind: str, data: Any, *, allow_private: bool) -> Credentials:
    """Validate ``data`` for ``kind``; :class:`CredentialsInvalid` naming the field otherwise."""
    cls = _TYPES.get(kind)
    if cls is None:
        raise CredentialsInvalid("kind", f"must be one of {', '.join(KINDS)}")
    try:
        creds = msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise CredentialsInvalid(*_field_of(str(exc))) from None
    if isinstance(creds, OAuth2Credentials):
        validate_url(creds.token_url, "credentials.token_url", allow_private=allow_private)
    if creds.expires_at is not None and not (_EARLIEST <= creds.expires_at < _LATEST):
        # Near year 1 or 9999 in another time zone, the UTC instant cannot be stored or read back.
        raise CredentialsInvalid("credentials.expires_at", "must be between 1900-01-01 and 9000-01-01 (UTC)")
    return creds


def _field_of(message: str) -> tuple[str, str]:
    """msgspec names the path (``... - at `$.api_key```) or the missing/unknown field, never a value."""
    message, _, at = message.partition(" - at `$")
    path = at.rstrip("`")
    if m := re.search(r"(?:missing required|unknown) field `([^`]+)`", message):
        path += "." + m.group(1)
    return "credentials" + path, message


def seal_credentials(keyring: Keyring, row: Integration, creds: Credentials) -> None:
    """Seal ``creds`` into ``row`` (under the primary key) and mirror their expiry."""
    sealed = keyring.seal(msgspec.json.encode(creds), integration_id=row.id, user_id=row.user_id)
    row.credentials_key_id = sealed.key_id
    row.credentials_nonce = sealed.nonce
    row.credentials_ciphertext = sealed.ciphertext
    row.token_expires_at = creds.expires_at


def credentials_of(keyring: Keyring, row: Integration) -> Credentials:
    """Open ``row``'s credentials (:class:`~.keyring.CredentialsUnreadable` when they cannot be)."""
    sealed = Sealed(row.credentials_key_id, row.credentials_nonce or b"", row.credentials_ciphertext)
    plain = keyring.open(sealed, integration_id=row.id, user_id=row.user_id)
    return msgspec.json.decode(plain, type=_TYPES[row.kind])


async def create_integration(
    session: AsyncSession,
    keyring: Keyring,
    *,
    user_id: uuid.UUID,
    kind: str,
    name: str,
    base_url: str,
    credentials: dict[str, Any],
    allow_private: bool = False,
) -> Integration:
    """Validate, seal and add a new integration to ``session`` (flushed, not committed).
    Raises :class:`CredentialsInvalid`; a duplicate name fails on flush (unique per user)."""
    creds = parse_credentials(kind, credentials, allow_private=allow_private)
    row = Integration(
        id=uuid.uuid4(),
        user_id=user_id,
        kind=kind,
        name=name,
        base_url=validate_url(base_url, "base_url", allow_private=allow_private),
        status="active",
    )
    seal_credentials(keyring, row, creds)
    session.add(row)
    await session.flush()
    return row
