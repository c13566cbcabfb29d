"""Access tokens (JWT) and opaque secrets (refresh and e-mail verification tokens).

Access tokens are JWTs signed with HS256 and ``VIGIL_JWT_SECRET``. Decoding pins the
algorithm (``algorithms=["HS256"]``), so a token whose header says ``none``, ``HS512`` or
``RS256`` (algorithm confusion: an RSA public key used as an HMAC secret) is rejected before
any signature check. ``iss``, ``aud``, ``exp``, ``iat``, ``sub`` and ``jti`` are required and
``typ`` must be ``access``.

Opaque tokens are 256 random bits (``secrets.token_urlsafe(32)``). Only their SHA-256 is
stored: a leaked table yields no usable token, and a slow hash buys nothing for inputs that
already carry 256 bits of entropy.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from service.settings import Settings
from telemetry.logging import get_logger

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "ISSUER",
    "AccessTokens",
    "AuthUser",
    "InvalidToken",
    "IssuedAccessToken",
    "hash_token",
    "new_opaque_token",
]

ALGORITHM = "HS256"
ISSUER = "vigil"
AUDIENCE = "vigil-api"
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud", "jti"]

_log = get_logger("vigil.auth")


@dataclass(frozen=True, slots=True)
class AuthUser:
    """The authenticated caller, stored in ``scope["user"]`` (``None`` when anonymous)."""

    id: uuid.UUID
    """The user's id (the token's ``sub``)."""

    is_admin: bool = False
    """Whether the user was an administrator when the token was issued (the ``adm`` claim; an
    access token lives ``access_token_ttl_seconds`` at most, so a demotion takes that long)."""

    expires_at: float | None = field(default=None, compare=False)
    """When the token stops being honoured (its ``exp``, Unix seconds); connections that outlive
    a request, such as ``/ws``, end then unless re-authenticated."""


class InvalidToken(Exception):
    """An access token that must not be honoured; ``reason`` is ``expired`` or ``invalid``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class IssuedAccessToken:
    """A freshly signed access token."""

    token: str
    expires_in: int
    """Seconds until it expires (the OAuth ``expires_in``)."""

    jti: str


def new_opaque_token() -> str:
    """A fresh refresh or verification token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of an opaque token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class AccessTokens:
    """Issues and verifies access tokens for one application."""

    def __init__(self, secret: str, ttl_seconds: int, leeway_seconds: float = 5.0) -> None:
        if not secret:
            raise ValueError("an access-token secret is required")
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        # A little leeway on exp/iat: instances' clocks differ by a few seconds at most.
        self._leeway = leeway_seconds

    @property
    def leeway_seconds(self) -> float:
        """How long past ``exp`` a token is still honoured (clock skew between instances)."""
        return float(self._leeway)

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessTokens:
        """Sign with ``settings.jwt_secret``; when it is empty (refused in production by
        ``Settings.enforce``), with a random key that dies with this process."""
        secret = settings.jwt_secret
        if not secret:
            secret = secrets.token_urlsafe(48)
            _log.warning(
                "jwt_secret_ephemeral",
                env=settings.env,
                consequence="access tokens are signed with a random per-process key and die with it",
            )
        return cls(secret, settings.access_token_ttl_seconds)

    def issue(
        self, user: AuthUser, *, now: datetime | None = None, ttl_seconds: int | None = None
    ) -> IssuedAccessToken:
        """Sign an access token for ``user`` (``now`` and ``ttl_seconds`` are for tests)."""
        issued = (now or datetime.now(UTC)).replace(microsecond=0)
        ttl = self.ttl_seconds if ttl_seconds is None else ttl_seconds
        jti = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": str(user.id),
            "iat": issued,
            "exp": issued + timedelta(seconds=ttl),
            "jti": jti,
            "typ": "access",
            "adm": user.is_admin,
        }
        return IssuedAccessToken(jwt.encode(claims, self._secret, algorithm=ALGORITHM), ttl, jti)

    def decode(self, token: str) -> AuthUser:
        """The caller ``token`` proves, or :class:`InvalidToken`."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=self._leeway,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("expired") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("invalid") from None
        if claims.get("typ") != "access":
            raise InvalidToken("invalid")
        try:
            user_id = uuid.UUID(claims["sub"])
        except (ValueError, TypeError, AttributeError):
            raise InvalidToken("invalid") from None
        return AuthUser(user_id, claims.get("adm") is True, float(claims["exp"]))
