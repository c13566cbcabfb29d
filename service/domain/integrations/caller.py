"""Calling a user's integration: credentials applied, OAuth tokens refreshed, one breaker each.

Exceptions::

    IntegrationError                  transport error, timeout, 5xx not involved (those return)
    ├── IntegrationNotFound           no such integration for this user, or disabled
    ├── IntegrationUnavailable        its breaker is open (or the operator's ``integrations``
    │                                 breaker is forced open); ``retry_after`` seconds
    ├── IntegrationNeedsReauth        the token endpoint refused the refresh token: a human must
    │                                 reconnect it (``PATCH /api/integrations/{id}``)
    └── IntegrationCredentialsUnreadable  sealed under a retired key, or tampered

``call`` returns the response whatever its status: the caller decides what a 4xx/5xx means.

OAuth 2 (refresh-token grant): the access token is refreshed before use when it expires within
``integration_token_refresh_margin_seconds``, and once after a 401 (then the request is retried
once). A refresh holds the row's lock (``SELECT ... FOR UPDATE``) and an in-process lock, and
reuses a token another refresh stored meanwhile, so concurrent calls never spend a rotated
refresh token twice. A refusal (400/401 from the token endpoint: ``invalid_grant``...) marks the
integration ``needs_reauth`` and no further refresh is tried until its credentials are replaced.

Breakers (D41): one per integration, so one user's dead remote never fails another's calls;
they carry no ``circuit_breaker_*`` metrics (a label per integration would be unbounded):
``integration_calls_total{connector, outcome}`` counts what they do (``rejected``). One more
breaker, ``integrations``, registered with metrics in the instance's registry, never opens by
itself: it is the operator's switch (``vigil breaker set integrations forced_open``) to stop
every outbound integration call at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import Integration
from service.domain.integrations.keyring import CredentialsUnreadable, Keyring
from service.domain.integrations.service import ApiKeyCredentials, Credentials, OAuth2Credentials, credentials_of
from service.domain.integrations.service import seal_credentials as _seal
from service.guardrails.breaker import BreakerConfig, CallNotPermitted, CircuitBreaker
from service.guardrails.breaker_admin import BreakerRegistry
from service.guardrails.egress import EgressRefused, public_only_transport
from service.settings import Settings
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = [
    "CALL_OUTCOMES",
    "REFRESH_OUTCOMES",
    "CallerConfig",
    "IntegrationCaller",
    "IntegrationCredentialsUnreadable",
    "IntegrationError",
    "IntegrationNeedsReauth",
    "IntegrationNotFound",
    "IntegrationResponse",
    "IntegrationUnavailable",
    "integration_breaker_config",
    "integration_caller",
]

_log = get_logger("vigil.integrations")
_tracer = trace.get_tracer("vigil.integrations")
CONNECTORS = ("http_api_key", "oauth2")
CALL_OUTCOMES = ("success", "client_error", "unauthorized", "server_error", "timeout", "transport_error",
                 "rejected", "needs_reauth")  # fmt: skip
REFRESH_OUTCOMES = ("success", "failed", "refused")
_REFUSED = "the token endpoint refused the refresh token; reconnect the integration"


class IntegrationResponse(msgspec.Struct):
    status: int
    body: Any
    headers: dict[str, str]


class IntegrationError(Exception):
    """The call could not be made or did not complete (the message names no secret)."""


class IntegrationNotFound(IntegrationError):
    """No such integration for this user, or it is disabled."""


class IntegrationUnavailable(IntegrationError):
    """A breaker refused the call; it may permit one in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IntegrationNeedsReauth(IntegrationError):
    """The refresh token was refused; a human must replace the credentials."""


class IntegrationCredentialsUnreadable(IntegrationError):
    """The stored credentials cannot be opened (retired key, tampering)."""


class _RemoteFailed(Exception):
    """What a 5xx answer counts as in the integration's breaker."""


class ResponseTooLarge(httpx.HTTPError):
    """The remote's answer was longer than ``max_response_bytes``: it is not read further."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answered more than {limit} bytes")


@dataclass(frozen=True)
class CallerConfig:
    """How calls are made; built from the settings by :func:`integration_caller`."""

    timeout_seconds: float = 10.0
    refresh_margin_seconds: float = 300.0
    breaker: BreakerConfig = field(default_factory=lambda: integration_breaker_config(Settings()))
    max_breakers: int = 10_000
    """Breakers kept in memory (least recently used ones are dropped, and start closed again)."""
    max_response_bytes: int = 1_048_576
    """Largest response body read (after content decoding); a longer one fails the call."""


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _body(r: httpx.Response) -> Any:
    if "json" in r.headers.get("content-type", ""):
        try:
            return r.json()
        except ValueError:
            pass
    return r.text


class IntegrationCaller:
    """Calls integrations on behalf of their users (one per process)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        metrics: Metrics,
        config: CallerConfig | None = None,
        *,
        switch: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.keyring = keyring
        self.config = config or CallerConfig()
        self.switch = switch
        self._http = httpx.AsyncClient(follow_redirects=False, transport=transport, trust_env=False)
        self._breakers: OrderedDict[uuid.UUID, CircuitBreaker] = OrderedDict()
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        calls = metrics.counter("integration_calls_total")
        refreshes = metrics.counter("integration_token_refreshes_total")
        self._calls = {(k, o): calls.labels(k, o) for k in CONNECTORS for o in CALL_OUTCOMES}
        self._refreshes = {o: refreshes.labels("oauth2", o) for o in REFRESH_OUTCOMES}
        duration = metrics.histogram("integration_call_duration_seconds")
        self._duration = {k: duration.labels(k) for k in CONNECTORS}

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- the contract --------------------------------------------------------------------------

    async def call(
        self, *, user_id: uuid.UUID, integration: str, method: str, path: str, json: Any = None, timeout: float = 10.0
    ) -> IntegrationResponse:
        """``method base_url/path`` with the integration's credentials (see the module docstring)."""
        async with self.sessionmaker() as session:
            row = await session.scalar(
                select(Integration).where(Integration.user_id == user_id, Integration.name == integration)
            )
        if row is None or row.status == "disabled":
            raise IntegrationNotFound(f"no integration {integration!r} for this user")
        attributes = {
            "vigil.integration.id": str(row.id),
            "vigil.integration.kind": row.kind,
            "http.request.method": method.upper(),
            "url.path": "/" + path.lstrip("/").split("?", 1)[0],
        }
        with _tracer.start_as_current_span("integration.call", kind=SpanKind.CLIENT, attributes=attributes) as span:
            try:
                outcome, response = await self._call(row, method.upper(), path, json, timeout)
            except (IntegrationUnavailable, IntegrationNeedsReauth):
                raise  # nothing new to record: the breaker or the refusal already said it
            except IntegrationError as exc:
                await self._set_last_error(row, str(exc))
                raise
            span.set_attribute("vigil.integration.outcome", outcome)
            span.set_attribute("http.response.status_code", response.status)
            if outcome == "success":
                await self._set_last_error(row, None)
            elif outcome == "unauthorized":
                await self._set_last_error(row, "the remote answered 401: the credentials were refused")
                if row.kind == "http_api_key":
                    _log.warning("integration_api_key_refused", integration_id=str(row.id))
            elif outcome == "server_error":
                await self._set_last_error(row, f"the remote answered {response.status}")
            return response

    async def _call(
        self, row: Integration, method: str, path: str, body: Any, timeout: float
    ) -> tuple[str, IntegrationResponse]:
        if row.status == "needs_reauth":
            self._calls[row.kind, "needs_reauth"].inc()
            raise IntegrationNeedsReauth(f"integration {row.name!r} needs to be reconnected: {row.last_error or ''}")
        creds = self._open(row)
        breaker = self._breaker(row.id)
        if isinstance(creds, OAuth2Credentials) and (creds.access_token is None or self._expiring(creds)):
            creds = await self.refresh(row.id, stale_access_token=creds.access_token)
        r = await self._send(row, breaker, creds, method, path, body, timeout)
        if r.status_code == 401 and isinstance(creds, OAuth2Credentials):
            await r.aclose()
            creds = await self.refresh(row.id, stale_access_token=creds.access_token)
            r = await self._send(row, breaker, creds, method, path, body, timeout)
        status = r.status_code
        outcome = (
            "unauthorized" if status == 401 else "server_error" if status >= 500
            else "client_error" if status >= 400 else "success"
        )  # fmt: skip
        self._calls[row.kind, outcome].inc()
        return outcome, IntegrationResponse(status, _body(r), dict(r.headers))

    async def _send(
        self, row: Integration, breaker: CircuitBreaker, creds: Credentials, method: str, path: str, body: Any,
        timeout: float,
    ) -> httpx.Response:  # fmt: skip
        headers = self._auth_headers(creds)
        url = row.base_url.rstrip("/") + "/" + path.lstrip("/")  # never lets `path` change the host
        request = self._http.build_request(method, url, json=body, headers=headers, timeout=timeout)
        r: httpx.Response = await self._through_breakers(row, breaker, self._fetch(request), timeout)
        return r

    async def _fetch(self, request: httpx.Request, auth: tuple[str, str] | None = None) -> httpx.Response:
        """Send ``request`` and read its answer, at most ``max_response_bytes`` of it (decoded:
        a compressed answer cannot expand past the limit either). The returned response holds
        the decoded body, so it carries no ``Content-Encoding``."""
        limit = self.config.max_response_bytes
        r = await self._http.send(request, auth=auth, stream=True)
        try:
            declared = r.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ResponseTooLarge(limit)
            chunks, size = [], 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ResponseTooLarge(limit)
                chunks.append(chunk)
        finally:
            await r.aclose()
        headers = [(k, v) for k, v in r.headers.multi_items() if k not in ("content-encoding", "content-length")]
        return httpx.Response(r.status_code, headers=headers, content=b"".join(chunks), request=request)

    async def _through_breakers(
        self, row: Integration, breaker: CircuitBreaker, request: Any, timeout: float, *, count: bool = True
    ) -> Any:
        """Await ``request`` (an httpx coroutine) through the switch and the integration's breaker,
        within ``timeout`` in total; count failed calls by kind (unless ``count`` is false: token
        refreshes have their own counter)."""
        try:
            switch_start = self.switch.acquire() if self.switch is not None else 0.0
            try:
                start = breaker.acquire()
            except CallNotPermitted:
                if self.switch is not None:
                    self.switch.record(switch_start, None)
                raise
        except CallNotPermitted as exc:
            request.close()
            if count:
                self._calls[row.kind, "rejected"].inc()
            raise IntegrationUnavailable(
                f"integration {row.name!r} is failing; calls are refused for {exc.retry_after:.3g}s", exc.retry_after
            ) from None
        began = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                r: httpx.Response = await request
        except BaseException as exc:
            error: BaseException = TimeoutError() if isinstance(exc, httpx.TimeoutException) else exc
            breaker.record(start, error)
            if self.switch is not None:
                self.switch.record(switch_start, None)
            if isinstance(exc, TimeoutError | httpx.TimeoutException):
                if count:
                    self._calls[row.kind, "timeout"].inc()
                raise IntegrationError(f"integration {row.name!r} did not answer within {timeout:g}s") from None
            if isinstance(exc, httpx.HTTPError):
                if count:
                    self._calls[row.kind, "transport_error"].inc()
                if isinstance(exc, ResponseTooLarge):
                    raise IntegrationError(f"integration {row.name!r} {exc}") from None
                if isinstance(exc.__cause__, EgressRefused):
                    trace.get_current_span().add_event(
                        "integration.egress_refused", {"server.address": exc.__cause__.host}
                    )
                    _log.warning(
                        "integration_egress_refused", integration_id=str(row.id), host=exc.__cause__.host,
                        address=exc.__cause__.address,
                    )  # fmt: skip
                    raise IntegrationError(f"integration {row.name!r} was not called: {exc.__cause__}") from None
                raise IntegrationError(f"integration {row.name!r} is unreachable: {type(exc).__name__}") from None
            raise
        if count:
            self._duration[row.kind].observe(time.perf_counter() - began)
        breaker.record(start, _RemoteFailed() if r.status_code >= 500 else None)
        if self.switch is not None:
            self.switch.record(switch_start, None)
        return r

    # --- credentials -----------------------------------------------------------------------------

    def _open(self, row: Integration) -> Credentials:
        try:
            return credentials_of(self.keyring, row)
        except CredentialsUnreadable as exc:
            raise IntegrationCredentialsUnreadable(f"integration {row.name!r}: {exc}") from None

    @staticmethod
    def _auth_headers(creds: Credentials) -> dict[str, str]:
        if isinstance(creds, ApiKeyCredentials):
            return {creds.header: creds.prefix + creds.api_key}
        return {"Authorization": f"Bearer {creds.access_token}"}

    def _expiring(self, creds: OAuth2Credentials) -> bool:
        margin = timedelta(seconds=self.config.refresh_margin_seconds)
        return creds.expires_at is not None and creds.expires_at <= datetime.now(UTC) + margin

    def _breaker(self, integration_id: uuid.UUID) -> CircuitBreaker:
        breaker = self._breakers.get(integration_id)
        if breaker is None:
            breaker = CircuitBreaker(f"integration:{integration_id}", self.config.breaker)
            self._breakers[integration_id] = breaker
            if len(self._breakers) > self.config.max_breakers:
                self._breakers.popitem(last=False)
        else:
            self._breakers.move_to_end(integration_id)
        return breaker

    async def refresh(self, integration_id: uuid.UUID, *, stale_access_token: str | None = None) -> OAuth2Credentials:
        """A fresh access token for an ``oauth2`` integration, refreshing it unless another
        refresh already replaced ``stale_access_token`` with one that is not expiring."""
        lock = self._locks.setdefault(integration_id, asyncio.Lock())
        async with lock:
            outcome, creds, error = await self._refresh_locked(integration_id, stale_access_token)
        if outcome == "refused":
            raise IntegrationNeedsReauth(error)
        if creds is None:
            raise IntegrationError(error)
        return creds

    async def _refresh_locked(
        self, integration_id: uuid.UUID, stale: str | None
    ) -> tuple[str, OAuth2Credentials | None, str]:
        """(outcome, credentials, error), with the row's new state committed before returning."""
        async with self.sessionmaker() as session, session.begin():
            row = await session.get(Integration, integration_id, with_for_update=True, populate_existing=True)
            if row is None or row.kind != "oauth2":
                return "missing", None, "no such oauth2 integration"
            if row.status == "needs_reauth":
                return "refused", None, f"integration {row.name!r} needs to be reconnected"
            creds = self._open(row)
            assert isinstance(creds, OAuth2Credentials)
            if creds.access_token and creds.access_token != stale and not self._expiring(creds):
                return "reused", creds, ""
            with _tracer.start_as_current_span("integration.token_refresh", kind=SpanKind.CLIENT) as span:
                span.set_attribute("vigil.integration.id", str(row.id))
                outcome, fresh, error = await self._exchange(row, creds)
                span.set_attribute("vigil.integration.refresh_outcome", outcome)
            self._refreshes[outcome].inc()
            row.last_error = error or None
            if fresh is not None:
                _seal(self.keyring, row, fresh)
                row.last_refresh_at = datetime.now(UTC)
            elif outcome == "refused":
                row.status = "needs_reauth"
                _log.warning("integration_needs_reauth", integration_id=str(row.id), kind=row.kind)
            else:
                _log.warning("integration_token_refresh_failed", integration_id=str(row.id), error=error)
            return outcome, fresh, error

    async def _exchange(self, row: Integration, creds: OAuth2Credentials) -> tuple[str, OAuth2Credentials | None, str]:
        """POST the refresh-token grant (client_secret_basic) to the token endpoint."""
        form = {"grant_type": "refresh_token", "refresh_token": creds.refresh_token}
        if creds.scope:
            form["scope"] = creds.scope
        timeout = self.config.timeout_seconds
        request = self._http.build_request(
            "POST", creds.token_url, data=form, timeout=timeout, headers={"Accept": "application/json"}
        )
        fetch = self._fetch(request, auth=(creds.client_id, creds.client_secret))
        try:
            r = await self._through_breakers(row, self._breaker(row.id), fetch, timeout, count=False)
        except IntegrationUnavailable as exc:
            return "failed", None, str(exc)
        except IntegrationError as exc:
            return "failed", None, f"token refresh failed: {exc}"
        body = _body(r)
        if r.status_code in (400, 401):
            code = body.get("error") if isinstance(body, dict) else None
            reason = code if code in ("invalid_grant", "invalid_client", "unauthorized_client") else r.status_code
            return "refused", None, f"{_REFUSED} ({reason})"
        token = body.get("access_token") if isinstance(body, dict) else None
        if r.status_code != 200 or not isinstance(token, str) or not token:
            return "failed", None, f"token refresh failed: the token endpoint answered {r.status_code}"
        expires_in = body.get("expires_in")
        expires_at = (
            datetime.now(UTC) + timedelta(seconds=float(expires_in)) if isinstance(expires_in, int | float) else None
        )
        new_refresh = body.get("refresh_token")
        fresh = msgspec.structs.replace(
            creds,
            access_token=token,
            expires_at=expires_at,
            refresh_token=new_refresh if isinstance(new_refresh, str) and new_refresh else creds.refresh_token,
        )
        return "success", fresh, ""

    async def _set_last_error(self, row: Integration, error: str | None) -> None:
        """Keep ``last_error`` telling the truth; written only when it changes."""
        if error == row.last_error:
            return
        async with self.sessionmaker() as session, session.begin():
            await session.execute(update(Integration).where(Integration.id == row.id).values(last_error=error))


def integration_breaker_config(settings: Settings) -> BreakerConfig:
    """Each integration's breaker: of its last 20 calls, once ``minimum_calls`` are in, a failure
    rate at the threshold (transport errors, timeouts, 5xx; a 4xx is the remote working) opens it."""
    return BreakerConfig(
        window_size=20,
        minimum_calls=min(20, settings.integration_breaker_minimum_calls),
        failure_rate_threshold=settings.integration_breaker_failure_rate_threshold,
        wait_in_open_seconds=settings.integration_breaker_wait_in_open_seconds,
        permitted_calls_in_half_open=2,
        record_exceptions=(httpx.TransportError, TimeoutError, _RemoteFailed),
    )


def integration_caller(
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    breakers: BreakerRegistry,
    metrics: Metrics,
    *,
    keyring: Keyring | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> IntegrationCaller:
    """A caller configured from ``settings``; adds the ``integrations`` switch to ``breakers``."""
    config = CallerConfig(
        timeout_seconds=settings.integration_timeout_seconds,
        refresh_margin_seconds=settings.integration_token_refresh_margin_seconds,
        breaker=integration_breaker_config(settings),
        max_response_bytes=settings.integration_max_response_bytes,
    )
    switch = breakers.breakers.get("integrations") or breakers.add(
        CircuitBreaker("integrations", BreakerConfig(window_size=1, minimum_calls=1, record_exceptions=()), metrics)
    )
    if transport is None and not settings.integrations_allow_private_networks:
        transport = public_only_transport()  # SSRF: see service.guardrails.egress
    return IntegrationCaller(
        sessionmaker, keyring or Keyring.from_settings(settings), metrics, config, switch=switch, transport=transport
    )
