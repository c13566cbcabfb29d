"""Identity business logic: accounts, e-mail verification, logins and refresh-token families.

Every write goes through the breaker-protected ``resources.db.session()``; idempotent reads
through ``resources.db.read``. Password hashing happens before a session is opened, so no
pooled connection waits on argon2.

Refresh tokens rotate on every use. Each login starts a *family*; a refresh marks the
presented token used and issues its child in the same family. Presenting a used token again
means two parties hold it (a thief and the owner): the whole family is revoked
(``revoked_reason = 'reuse'``) and the caller gets :class:`RefreshReused`. The token row is
read ``FOR UPDATE``, so of two concurrent refreshes of one token the second waits, then sees
it used (``refresh_tokens.parent_id`` is unique as a second line of defence).

Errors (routes map them to problems)::

    AuthError
    ├── EmailTaken                 409
    ├── InvalidVerificationToken   400 (unknown, used or expired link)
    ├── InvalidCredentials         401
    ├── LoginRefused               403 (email_not_verified, account_disabled)
    └── RefreshRejected            401 (unknown, revoked, expired, account_disabled)
        └── RefreshReused          401, and the family is revoked
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import EmailVerificationToken, RefreshToken, RefreshTokenFamily, User
from service.domain.auth.passwords import Passwords
from service.domain.auth.tokens import AccessTokens, AuthUser, IssuedAccessToken, hash_token, new_opaque_token
from service.domain.email.outbox import enqueue_email

if TYPE_CHECKING:
    from service.app import Resources

__all__ = [
    "AccountView",
    "AuthError",
    "AuthService",
    "EmailTaken",
    "InvalidCredentials",
    "InvalidVerificationToken",
    "LoginRefused",
    "RefreshRejected",
    "RefreshReused",
    "Session",
]


class AuthError(Exception):
    """Base of the identity errors; ``user_id`` is the account concerned, when known."""

    def __init__(self, reason: str, user_id: uuid.UUID | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.user_id = user_id


class EmailTaken(AuthError):
    """Registration for an address that already has an account."""


class InvalidVerificationToken(AuthError):
    """A verification token that is unknown, already used or expired."""


class InvalidCredentials(AuthError):
    """Unknown e-mail or wrong password (``reason`` says which, for the audit log only)."""


class LoginRefused(AuthError):
    """Right password, but the account may not log in (``email_not_verified``, ``account_disabled``)."""


class RefreshRejected(AuthError):
    """A refresh token that cannot be exchanged."""

    def __init__(self, reason: str, user_id: uuid.UUID | None = None, family_id: uuid.UUID | None = None) -> None:
        super().__init__(reason, user_id)
        self.family_id = family_id


class RefreshReused(RefreshRejected):
    """A spent refresh token presented again: its family has been revoked."""


@dataclass(frozen=True, slots=True)
class AccountView:
    """What a user may see of their own account."""

    id: uuid.UUID
    email: str
    email_verified: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Session:
    """Tokens handed out by a login or a refresh."""

    user_id: uuid.UUID
    family_id: uuid.UUID
    access: IssuedAccessToken
    refresh_token: str


def _now() -> datetime:
    return datetime.now(UTC)


def _view(row: Any) -> AccountView:
    return AccountView(row.id, row.email, row.email_verified_at is not None, row.created_at)


class AuthService:
    """The identity operations of one application."""

    def __init__(self, resources: Resources, tokens: AccessTokens, passwords: Passwords) -> None:
        self.db = resources.db
        self.settings = resources.settings
        self.tokens = tokens
        self.passwords = passwords

    # --- accounts and verification --------------------------------------------------------

    async def _queue_verification(self, session: AsyncSession, user_id: uuid.UUID, email: str) -> None:
        token = new_opaque_token()
        session.add(
            EmailVerificationToken(
                token_hash=hash_token(token),
                user_id=user_id,
                expires_at=_now() + timedelta(seconds=self.settings.email_verification_ttl_seconds),
            )
        )
        await session.flush()
        link = f"{self.settings.public_base_url.rstrip('/')}/api/auth/verify?token={token}"
        hours = max(1, round(self.settings.email_verification_ttl_seconds / 3600))
        body = (
            "Welcome to Vigil.\n\n"
            f"Confirm your e-mail address by opening this link within {hours} hour(s):\n\n"
            f"{link}\n\n"
            "If you did not create a Vigil account, ignore this message.\n"
        )
        await enqueue_email(
            session, to=email, subject="Confirm your e-mail address", body=body, kind="verify_email", user_id=user_id
        )

    async def register(self, email: str, password: str) -> AccountView:
        """Create an unverified account, its verification token and the outbox mail in one
        transaction; :class:`EmailTaken` when the address has an account."""
        password_hash = await self.passwords.hash(password)
        async with self.db.session() as session, session.begin():
            row = (
                await session.execute(
                    pg_insert(User)
                    .values(id=uuid.uuid4(), email=email, password_hash=password_hash)
                    .on_conflict_do_nothing(index_elements=[User.email])
                    .returning(User.id, User.email, User.email_verified_at, User.created_at)
                )
            ).first()
            if row is None:
                raise EmailTaken("email_taken")
            await self._queue_verification(session, row.id, row.email)
        return _view(row)

    async def verify_email(self, token: str) -> AccountView:
        """Spend a verification token (single use, before its expiry) and mark the address verified."""
        async with self.db.session() as session, session.begin():
            user_id = (
                await session.execute(
                    update(EmailVerificationToken)
                    .where(
                        EmailVerificationToken.token_hash == hash_token(token),
                        EmailVerificationToken.used_at.is_(None),
                        EmailVerificationToken.expires_at > _now(),
                    )
                    .values(used_at=_now())
                    .returning(EmailVerificationToken.user_id)
                )
            ).scalar_one_or_none()
            if user_id is None:
                raise InvalidVerificationToken("invalid_or_expired")
            row = (
                await session.execute(
                    update(User)
                    .where(User.id == user_id)
                    .values(email_verified_at=func.coalesce(User.email_verified_at, func.now()))
                    .returning(User.id, User.email, User.email_verified_at, User.created_at)
                )
            ).one()
        return _view(row)

    async def resend_verification(self, email: str) -> uuid.UUID | None:
        """Queue a new verification mail when ``email`` is an unverified account; return its id."""
        async with self.db.session() as session, session.begin():
            row = (
                await session.execute(
                    select(User.id, User.email_verified_at).where(User.email == email).with_for_update()
                )
            ).first()
            if row is None or row.email_verified_at is not None:
                return None
            await self._queue_verification(session, row.id, email)
            return row.id  # type: ignore[no-any-return]

    async def account(self, user_id: uuid.UUID) -> AccountView | None:
        """The account ``user_id``, or None when it no longer exists."""

        async def read(session: AsyncSession) -> Any:
            stmt = select(User.id, User.email, User.email_verified_at, User.created_at).where(User.id == user_id)
            return (await session.execute(stmt)).first()

        row = await self.db.read("auth_account", read)
        return None if row is None else _view(row)

    # --- logins and refresh-token families -----------------------------------------------

    async def login(self, email: str, password: str) -> Session:
        """Check the credentials and start a new refresh-token family."""

        async def read(session: AsyncSession) -> Any:
            stmt = select(User.id, User.password_hash, User.email_verified_at, User.disabled_at, User.is_admin).where(
                User.email == email
            )
            return (await session.execute(stmt)).first()

        user = await self.db.read("auth_login_lookup", read)
        matches = await self.passwords.verify(None if user is None else user.password_hash, password)
        if user is None:
            raise InvalidCredentials("unknown_email")
        if not matches:
            raise InvalidCredentials("bad_password", user.id)
        if user.disabled_at is not None:
            raise LoginRefused("account_disabled", user.id)
        if user.email_verified_at is None:
            raise LoginRefused("email_not_verified", user.id)
        new_hash = await self.passwords.hash(password) if self.passwords.needs_rehash(user.password_hash) else None
        family_id = uuid.uuid4()
        refresh = new_opaque_token()
        async with self.db.session() as session, session.begin():
            session.add(RefreshTokenFamily(id=family_id, user_id=user.id))
            await session.flush()
            session.add(
                RefreshToken(token_hash=hash_token(refresh), family_id=family_id, expires_at=self._refresh_expiry())
            )
            if new_hash is not None:
                await session.execute(update(User).where(User.id == user.id).values(password_hash=new_hash))
        access = self.tokens.issue(AuthUser(user.id, user.is_admin))
        return Session(user.id, family_id, access, refresh)

    def _refresh_expiry(self) -> datetime:
        return _now() + timedelta(seconds=self.settings.refresh_token_ttl_seconds)

    async def refresh(self, token: str) -> Session:
        """Rotate ``token`` into a new one of its family, or raise :class:`RefreshRejected`
        (:class:`RefreshReused` after revoking the family: the revocation is committed first)."""
        now = _now()
        rejected: RefreshRejected | None = None
        async with self.db.session() as session, session.begin():
            row = (
                await session.execute(
                    select(
                        RefreshToken.id,
                        RefreshToken.family_id,
                        RefreshToken.used_at,
                        RefreshToken.revoked_at,
                        RefreshToken.expires_at,
                        RefreshTokenFamily.user_id,
                        RefreshTokenFamily.revoked_at.label("family_revoked_at"),
                        User.is_admin,
                        User.disabled_at,
                    )
                    .join(RefreshTokenFamily, RefreshTokenFamily.id == RefreshToken.family_id)
                    .join(User, User.id == RefreshTokenFamily.user_id)
                    .where(RefreshToken.token_hash == hash_token(token))
                    .with_for_update(of=RefreshToken)
                )
            ).first()
            if row is None:
                rejected = RefreshRejected("unknown")
            elif row.used_at is not None:
                await self._revoke(session, RefreshTokenFamily.id == row.family_id, "reuse", now)
                rejected = RefreshReused("reuse", row.user_id, row.family_id)
            elif row.revoked_at is not None or row.family_revoked_at is not None:
                rejected = RefreshRejected("revoked", row.user_id, row.family_id)
            elif row.expires_at <= now:
                rejected = RefreshRejected("expired", row.user_id, row.family_id)
            elif row.disabled_at is not None:
                rejected = RefreshRejected("account_disabled", row.user_id, row.family_id)
            else:
                await session.execute(update(RefreshToken).where(RefreshToken.id == row.id).values(used_at=now))
                fresh = new_opaque_token()
                session.add(
                    RefreshToken(
                        token_hash=hash_token(fresh),
                        family_id=row.family_id,
                        parent_id=row.id,
                        expires_at=self._refresh_expiry(),
                    )
                )
        if rejected is not None:
            raise rejected
        assert row is not None  # for mypy: every other path set ``rejected``
        access = self.tokens.issue(AuthUser(row.user_id, row.is_admin))
        return Session(row.user_id, row.family_id, access, fresh)

    async def _revoke(self, session: AsyncSession, which: Any, reason: str, now: datetime) -> list[uuid.UUID]:
        """Revoke the live families matching ``which`` and their unspent tokens; return their ids."""
        families = list(
            (
                await session.execute(
                    update(RefreshTokenFamily)
                    .where(which, RefreshTokenFamily.revoked_at.is_(None))
                    .values(revoked_at=now, revoked_reason=reason)
                    .returning(RefreshTokenFamily.id)
                )
            ).scalars()
        )
        if families:
            await session.execute(
                update(RefreshToken)
                .where(
                    RefreshToken.family_id.in_(families),
                    RefreshToken.used_at.is_(None),
                    RefreshToken.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            )
        return families

    async def logout(self, token: str) -> tuple[uuid.UUID, uuid.UUID] | None:
        """Revoke the family of ``token``; return (user id, family id) when one was revoked."""
        async with self.db.session() as session, session.begin():
            row = (
                await session.execute(
                    select(RefreshTokenFamily.id, RefreshTokenFamily.user_id)
                    .join(RefreshToken, RefreshToken.family_id == RefreshTokenFamily.id)
                    .where(RefreshToken.token_hash == hash_token(token))
                )
            ).first()
            if row is None:
                return None
            revoked = await self._revoke(session, RefreshTokenFamily.id == row.id, "logout", _now())
        return (row.user_id, row.id) if revoked else None

    async def logout_everywhere(self, user_id: uuid.UUID) -> int:
        """Revoke every live family of ``user_id``; return how many there were."""
        async with self.db.session() as session, session.begin():
            revoked = await self._revoke(session, RefreshTokenFamily.user_id == user_id, "logout_all", _now())
        return len(revoked)
