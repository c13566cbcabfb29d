"""RFC 9457 problem details for every 4xx and 5xx answer.

Exception hierarchy the handlers map (anything else is a logged 500 that leaks nothing)::

    HTTPException (Litestar)            -> its status; validation errors list each field
    ├── ValidationException             -> 400, ``errors[].field`` names the bad field
    ├── NotFoundException, 405, 413 …   -> their status
    └── ServiceUnavailable (here)       -> 503 + Retry-After (shedding, dependency down)
    sqlalchemy.exc.TimeoutError         -> 503 + Retry-After (connection pool exhausted)
    sqlalchemy.exc.IntegrityError       -> 409 (a constraint refused the write, e.g. its user is gone)
    DBAPIError refusing a value         -> 400 (SQLSTATE class 22, or asyncpg could not encode it:
                                           a NUL character, a date or number out of its range)
    RecursionError while decoding JSON  -> 400 (a body nested deeper than the decoder can go)
    ConnectionError, TimeoutError,      -> 503 + Retry-After (a dependency unreachable, a
    DBAPIError with a lost connection      connection dropped); other DBAPIErrors are 500s
"""

from __future__ import annotations

import math
import traceback
from http import HTTPStatus
from typing import Any

from asyncpg import exceptions as asyncpg_exceptions
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from sqlalchemy import exc as sa_exc

from service.guardrails.retry import connection_lost
from telemetry.logging import current_request_id, get_logger

__all__ = ["PROBLEM_JSON", "ServiceUnavailable", "exception_handlers", "problem"]

PROBLEM_JSON = "application/problem+json"
_log = get_logger("vigil.errors")


class ServiceUnavailable(HTTPException):
    """503 with an honest ``Retry-After`` (seconds): Vigil sheds instead of hanging."""

    status_code = 503

    def __init__(self, detail: str, retry_after: int = 1, **kwargs: Any) -> None:
        headers = {"Retry-After": str(max(1, retry_after))}
        super().__init__(detail=detail, headers=headers, **kwargs)


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    rid = current_request_id()
    if rid is not None:
        body["request_id"] = rid
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field_errors(extra: Any) -> list[dict[str, Any]]:
    errors = []
    for item in extra if isinstance(extra, list) else []:
        if isinstance(item, dict):
            field = item.get("key") or item.get("field")
            if field == "data" and item.get("source") == "body":
                field = "body"  # Litestar names the handler's parameter; the client sent a body
            errors.append({"field": field, "message": item.get("message"), "source": item.get("source")})
    return errors


def _malformed_body(exc: HTTPException) -> bool:
    """Litestar's answer to a body it could not decode at all (not JSON, truncated, not UTF-8, a
    number out of range): no field of its own to name, so the body is named."""
    return exc.status_code == 400 and (
        isinstance(exc.__cause__, SerializationException) or str(exc.detail).startswith("JSON is malformed")
    )


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        errors = _field_errors(exc.extra)
        fields = ", ".join(str(e["field"]) for e in errors if e["field"])
        detail = f"Invalid input: {fields}" if fields else exc.detail
        return problem(status, detail, exc.headers, errors=errors)
    if _malformed_body(exc):
        errors = [{"field": "body", "message": exc.detail, "source": "body"}]
        return problem(status, f"Invalid input: body ({exc.detail})", exc.headers, errors=errors)
    extra = exc.extra if isinstance(exc.extra, dict) else {}
    detail = exc.detail if exc.detail != HTTPStatus(status).phrase else ""
    return problem(status, detail, exc.headers, **extra)


def _pool_timeout(request: Request[Any, Any, Any], exc: sa_exc.TimeoutError) -> Response[dict[str, Any]]:
    return problem(503, "The database connection pool is exhausted; retry shortly.", {"Retry-After": "1"})


def _refused_value(exc: Exception) -> bool:
    """PostgreSQL refused a value (SQLSTATE class 22, "data exception": a NUL character, a
    date or number out of range...), or asyncpg could not encode one."""
    if isinstance(exc, sa_exc.DataError):
        return True
    orig = getattr(exc, "orig", None)
    if str(getattr(orig, "sqlstate", None) or "").startswith("22"):
        return True
    return isinstance(getattr(orig, "__cause__", None), asyncpg_exceptions._base.DataError)


def _connection_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, sa_exc.DBAPIError) and _refused_value(exc):
        return _data_error(request, exc)
    if not connection_lost(exc) and not isinstance(exc, TimeoutError):
        return _unhandled(request, exc)
    retry_after = 1.0
    resources = getattr(request.app.state, "vigil", None)
    if resources is not None:
        retry_after = max(1.0, resources.db.breaker.retry_after())
    _log.warning("dependency_unavailable", route=request.scope.get("path_template"), error=type(exc).__name__)
    return problem(503, "A dependency is unavailable; retry later.", {"Retry-After": str(math.ceil(retry_after))})


def _integrity_error(request: Request[Any, Any, Any], exc: sa_exc.IntegrityError) -> Response[dict[str, Any]]:
    """A write the database refused on a constraint that a handler did not check first, e.g. a
    row referring to an account deleted while its token was still valid: the request conflicts
    with the current state (409), it is not a server fault. The constraint is logged, not told."""
    constraint = getattr(getattr(exc.orig, "__cause__", None), "constraint_name", None)
    _log.warning("integrity_conflict", route=request.scope.get("path_template"), constraint=constraint)
    return problem(409, "The request conflicts with the current state of the data (a record it refers to is gone).")


def _data_error(request: Request[Any, Any, Any], exc: sa_exc.DBAPIError) -> Response[dict[str, Any]]:
    """A value the database (or its driver) cannot hold or compare: the request's, not a fault.
    Handlers validate what they know; this is the net under the rest. The field is not known
    here, so the answer says what kind of value it was; the database's message is logged."""
    reason = " ".join(str(getattr(exc, "orig", exc)).split())[:200]
    _log.warning("invalid_value", route=request.scope.get("path_template"), reason=reason)
    return problem(
        400, "Invalid input: a value cannot be stored or compared (a NUL character, or a date or number out of range).",
        errors=[],
    )  # fmt: skip


def _recursion_error(request: Request[Any, Any, Any], exc: RecursionError) -> Response[dict[str, Any]]:
    """JSON nested deeper than the decoder can follow is the client's (400); any other
    recursion error is Vigil's (500)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and frames[-1].name == "decode_json" and frames[-1].filename.endswith("msgspec_hooks.py"):
        errors = [{"field": "body", "message": "nested too deeply", "source": "body"}]
        return problem(400, "Invalid input: body (JSON nested too deeply)", errors=errors)
    return _unhandled(request, exc)


def _unhandled(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    _log.error("unhandled_exception", route=request.scope.get("path_template"), exc_info=exc)
    return problem(500, "An unexpected error occurred; it has been logged with this request id.")


def exception_handlers() -> Any:  # Litestar's handler-map type is invariant in the exception type
    return {
        HTTPException: _http_exception,
        sa_exc.TimeoutError: _pool_timeout,
        sa_exc.IntegrityError: _integrity_error,
        RecursionError: _recursion_error,
        sa_exc.DBAPIError: _connection_error,
        ConnectionError: _connection_error,
        TimeoutError: _connection_error,
        Exception: _unhandled,
    }
