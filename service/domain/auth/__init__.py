"""Identity: accounts, e-mail verification, JWT access tokens and rotating refresh tokens.

``scope["user"]`` contract (set by :class:`AuthenticationMiddleware`): an :class:`AuthUser`
(``id: uuid.UUID``, ``is_admin: bool``) for a valid bearer access token, ``None`` for an
anonymous caller; protected routes use the :func:`requires_user` guard.
"""

from __future__ import annotations

from service.domain.auth.middleware import AuthenticationMiddleware, requires_user
from service.domain.auth.tokens import AccessTokens, AuthUser, InvalidToken

__all__ = ["AccessTokens", "AuthUser", "AuthenticationMiddleware", "InvalidToken", "requires_user"]
