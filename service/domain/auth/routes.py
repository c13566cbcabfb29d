"""The auth API under ``/api/auth`` and the current user under ``/api/users``.

Bodies are decoded here with msgspec rather than by Litestar's signature model, so every
invalid input (malformed JSON, a missing or unknown field, a bad e-mail, a short password, a
body over ``max_body_bytes``) answers a problem whose ``errors[].field`` names the field.

Decisions: an unverified account's login is 403 (``code: email_not_verified``), answered only
after the password matched, so it reveals nothing to someone without the password; a disabled
account likewise gets 403 (``code: account_disabled``). Resending a verification link always
answers 202. Logging out with an unknown token is 204 (logout is idempotent).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Request, Router, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.params import FromQuery
from opentelemetry import trace

from service.clientip import request_ip
from service.domain.auth.middleware import REJECTION_REASONS, TOLERATE_INVALID_TOKEN, requires_user
from service.domain.auth.service import (
    AccountView,
    AuthService,
    EmailTaken,
    InvalidCredentials,
    InvalidVerificationToken,
    LoginRefused,
    RefreshRejected,
    RefreshReused,
    Session,
)
from service.domain.auth.tokens import AuthUser
from telemetry.logging import get_logger

__all__ = ["EVENTS", "AuthController", "UsersController", "build_router"]

_log = get_logger("vigil.auth")
AnyRequest = Request[Any, Any, State]
S = TypeVar("S", bound=msgspec.Struct)

#: Opt of routes where a stale bearer token must not get in the way (see middleware).
PUBLIC: dict[str, Any] = {TOLERATE_INVALID_TOKEN: True}

Email = Annotated[str, msgspec.Meta(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
NewPassword = Annotated[str, msgspec.Meta(min_length=12, max_length=256)]
# Login does not re-apply the registration policy: it may change, old passwords must still work.
GivenPassword = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
OpaqueToken = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _EmailBody(msgspec.Struct, forbid_unknown_fields=True):
    email: Email

    def __post_init__(self) -> None:
        self.email = self.email.lower()


class RegisterBody(_EmailBody, forbid_unknown_fields=True):
    password: NewPassword


class LoginBody(_EmailBody, forbid_unknown_fields=True):
    password: GivenPassword


class ResendBody(_EmailBody, forbid_unknown_fields=True):
    pass


class TokenBody(msgspec.Struct, forbid_unknown_fields=True):
    token: OpaqueToken


class RefreshBody(msgspec.Struct, forbid_unknown_fields=True):
    refresh_token: OpaqueToken


class UserOut(msgspec.Struct):
    id: uuid.UUID
    email: str
    email_verified: bool


class MeOut(UserOut):
    created_at: datetime


class TokensOut(msgspec.Struct):
    access_token: str
    token_type: str
    expires_in: int
    refresh_token: str


# --- input --------------------------------------------------------------------------------

_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_NAMED_FIELD = re.compile(r"field `([^`]+)`")


def _invalid(field: str, message: str, source: str = "body") -> ValidationException:
    return ValidationException(f"Invalid input: {field}", extra=[{"key": field, "message": message, "source": source}])


def _field_error(exc: msgspec.ValidationError) -> ValidationException:
    message = str(exc)
    if (at := _AT_PATH.search(message)) and at.group(1):
        return _invalid(at.group(1), message[: at.start()])
    if named := _NAMED_FIELD.search(message):
        return _invalid(named.group(1), message)
    return _invalid("body", message)


async def decode_body(request: AnyRequest, struct: type[S]) -> S:
    """The JSON body as ``struct``, or a 4xx problem naming the offending field."""
    try:
        raw = await request.body()
    except RequestEntityTooLarge:
        limit = request.route_handler.resolve_request_max_body_size()
        raise RequestEntityTooLarge(
            detail=f"The request body is larger than {limit} bytes.",
            extra={"errors": [{"field": "body", "message": f"larger than {limit} bytes", "source": "body"}]},
        ) from None
    if not raw.strip():
        raise _invalid("body", "a JSON object is required")
    try:
        return msgspec.json.decode(raw, type=struct)
    except msgspec.ValidationError as exc:
        raise _field_error(exc) from None
    except msgspec.DecodeError as exc:
        raise _invalid("body", f"malformed JSON: {exc}") from None


# --- metrics and audit --------------------------------------------------------------------


#: Values of ``auth_events_total{event}`` (the component starts each series at 0).
EVENTS = (
    "registered",
    "verified",
    "login_succeeded",
    "login_failed",
    "refreshed",
    "refresh_reused",
    "logged_out",
    "logged_out_everywhere",
    # Counted by the authentication middleware when it refuses a bearer token with a 401.
    *(f"access_token_{reason}" for reason in REJECTION_REASONS),
)


def _count(request: AnyRequest, event: str) -> None:
    request.app.state.vigil.metrics.counter("auth_events_total").labels(event).inc()


def _audit(request: AnyRequest, action: str, **kw: Any) -> None:
    """Record ``action`` in the audit log (off the request path, never raising); while no
    audit component is mounted, log it at warning level rather than drop it."""
    resources = request.app.state.vigil
    ip = request_ip(request.scope, resources.settings.trusted_proxies)
    audit = resources.extensions.get("audit")
    if audit is None:
        _log.warning("audit_unavailable", action=action, ip=ip, **{k: v for k, v in kw.items() if v is not None})
        return
    try:
        audit.record(action, ip=ip, **kw)
    except Exception:  # the contract says it never raises; a broken one must not fail a login
        _log.exception("audit_record_failed", action=action)


def _tokens_out(session: Session) -> TokensOut:
    return TokensOut(session.access.token, "bearer", session.access.expires_in, session.refresh_token)


def _user_out(view: AccountView) -> UserOut:
    return UserOut(view.id, view.email, view.email_verified)


_BAD_CREDENTIALS = "The e-mail address or the password is incorrect."
_BAD_REFRESH = "The refresh token is invalid, expired or revoked; log in again."


# --- routes -------------------------------------------------------------------------------


class AuthController(Controller):
    """Registration, e-mail verification, login, token refresh and logout."""

    path = "/auth"
    tags = ["auth"]

    @post("/register", status_code=201, opt=PUBLIC)
    async def register(self, request: AnyRequest, auth_service: NamedDependency[AuthService]) -> UserOut:
        """Create an account and e-mail a verification link (queued in the outbox in the same transaction)."""
        body = await decode_body(request, RegisterBody)
        try:
            view = await auth_service.register(body.email, body.password)
        except EmailTaken:
            raise HTTPException(
                status_code=409,
                detail="An account with this e-mail address already exists.",
                extra={"errors": [{"field": "email", "message": "is already registered", "source": "body"}]},
            ) from None
        _count(request, "registered")
        _audit(request, "auth.register", actor_user_id=view.id, target_type="user", target_id=str(view.id))
        return _user_out(view)

    async def _verify(self, request: AnyRequest, auth_service: AuthService, token: str, source: str) -> UserOut:
        try:
            view = await auth_service.verify_email(token)
        except InvalidVerificationToken:
            raise _invalid("token", "is unknown, already used or expired; ask for a new link", source) from None
        _count(request, "verified")
        _audit(request, "auth.email_verified", actor_user_id=view.id, target_type="user", target_id=str(view.id))
        return _user_out(view)

    @get("/verify", opt=PUBLIC)
    async def verify_link(
        self, request: AnyRequest, auth_service: NamedDependency[AuthService], token: FromQuery[str | None] = None
    ) -> UserOut:
        """The link e-mailed at registration: marks the address verified (single use, expiring)."""
        if not token:  # checked here, not by Litestar, so that the problem names the field
            raise _invalid("token", "is required", source="query")
        return await self._verify(request, auth_service, token, "query")

    @post("/verify", status_code=200, opt=PUBLIC)
    async def verify(self, request: AnyRequest, auth_service: NamedDependency[AuthService]) -> UserOut:
        """Verify the e-mail address with the token from the link, as a JSON body."""
        body = await decode_body(request, TokenBody)
        return await self._verify(request, auth_service, body.token, "body")

    @post("/verify/resend", status_code=202, opt=PUBLIC)
    async def resend(self, request: AnyRequest, auth_service: NamedDependency[AuthService]) -> dict[str, str]:
        """Queue a new verification link. Always 202: the answer does not reveal whether the address has an account."""
        body = await decode_body(request, ResendBody)
        await auth_service.resend_verification(body.email)
        return {"detail": "If this address has an unverified account, a new link is on its way."}

    @post("/login", status_code=200, opt=PUBLIC)
    async def login(self, request: AnyRequest, auth_service: NamedDependency[AuthService]) -> TokensOut:
        """Exchange e-mail and password for an access token and a refresh token (a new token family)."""
        body = await decode_body(request, LoginBody)
        try:
            session = await auth_service.login(body.email, body.password)
        except InvalidCredentials as exc:
            _count(request, "login_failed")
            _audit(request, "auth.login_failed", actor_user_id=None, target_type="user",
                   target_id=str(exc.user_id) if exc.user_id else None, details={"reason": exc.reason})  # fmt: skip
            raise NotAuthorizedException(
                _BAD_CREDENTIALS,
                headers={"WWW-Authenticate": 'Bearer realm="vigil"'},
                extra={
                    "errors": [
                        {"field": f, "message": _BAD_CREDENTIALS, "source": "body"} for f in ("email", "password")
                    ]
                },
            ) from None
        except LoginRefused as exc:
            _count(request, "login_failed")
            _audit(request, "auth.login_failed", actor_user_id=exc.user_id, target_type="user",
                   target_id=str(exc.user_id), details={"reason": exc.reason})  # fmt: skip
            message = (
                "is not verified yet: open the link e-mailed to you, or ask for a new one at /api/auth/verify/resend"
                if exc.reason == "email_not_verified"
                else "belongs to a disabled account"
            )
            raise PermissionDeniedException(
                f"Login refused: the e-mail address {message}.",
                extra={"code": exc.reason, "errors": [{"field": "email", "message": message, "source": "body"}]},
            ) from None
        _count(request, "login_succeeded")
        _audit(request, "auth.login_succeeded", actor_user_id=session.user_id, target_type="refresh_token_family",
               target_id=str(session.family_id))  # fmt: skip
        return _tokens_out(session)

    @post("/refresh", status_code=200, opt=PUBLIC)
    async def refresh(self, request: AnyRequest, auth_service: NamedDependency[AuthService]) -> TokensOut:
        """Rotate a refresh token: the presented one is spent, a new pair is issued. Presenting
        a spent token revokes its whole family (reuse detection)."""
        body = await decode_body(request, RefreshBody)
        try:
            session = await auth_service.refresh(body.refresh_token)
        except RefreshRejected as exc:
            if isinstance(exc, RefreshReused):
                _count(request, "refresh_reused")
                _audit(request, "auth.refresh_reused", actor_user_id=exc.user_id, target_type="refresh_token_family",
                       target_id=str(exc.family_id), details={"family_revoked": True})  # fmt: skip
                trace.get_current_span().add_event("auth.refresh_reused", {"family_revoked": True})
                _log.warning("refresh_token_reused", family_id=str(exc.family_id))
            raise NotAuthorizedException(
                _BAD_REFRESH,
                headers={"WWW-Authenticate": 'Bearer realm="vigil"'},
                extra={"errors": [{"field": "refresh_token", "message": f"{exc.reason}", "source": "body"}]},
            ) from None
        _count(request, "refreshed")
        return _tokens_out(session)

    @post("/logout", status_code=204, opt=PUBLIC)
    async def logout(self, request: AnyRequest, auth_service: NamedDependency[AuthService]) -> None:
        """Revoke the refresh-token family of the given token (this device's session)."""
        body = await decode_body(request, RefreshBody)
        revoked = await auth_service.logout(body.refresh_token)
        if revoked is not None:
            user_id, family_id = revoked
            _count(request, "logged_out")
            _audit(request, "auth.logout", actor_user_id=user_id, target_type="refresh_token_family",
                   target_id=str(family_id))  # fmt: skip

    @post("/logout-all", status_code=204, guards=[requires_user])
    async def logout_all(
        self, request: Request[AuthUser, Any, State], auth_service: NamedDependency[AuthService]
    ) -> None:
        """Revoke every refresh-token family of the caller (log out on every device)."""
        user = request.user
        families = await auth_service.logout_everywhere(user.id)
        _count(request, "logged_out_everywhere")
        _audit(request, "auth.logout_all", actor_user_id=user.id, target_type="user", target_id=str(user.id),
               details={"families_revoked": families})  # fmt: skip


class UsersController(Controller):
    """The authenticated caller's own account."""

    path = "/users"
    tags = ["users"]

    @get("/me", guards=[requires_user])
    async def me(self, request: Request[AuthUser, Any, State], auth_service: NamedDependency[AuthService]) -> MeOut:
        """The caller's account."""
        view = await auth_service.account(request.user.id)
        if view is None:
            raise NotAuthorizedException(
                "The account of this token no longer exists.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return MeOut(view.id, view.email, view.email_verified, view.created_at)


def build_router(service: AuthService) -> Router:
    """The ``/api`` router of the auth and users controllers, bound to ``service``."""

    def provide_auth_service() -> AuthService:
        return service

    return Router(
        path="/api",
        route_handlers=[AuthController, UsersController],
        dependencies={"auth_service": Provide(provide_auth_service, sync_to_thread=False, use_cache=True)},
    )
