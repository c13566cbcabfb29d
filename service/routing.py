"""The API's middleware, mounted on the API's routes only.

Authentication and rate limiting act on the API: ``/api`` (the client API), ``/admin`` (the
operator API) and ``/ws`` (the realtime socket). Elsewhere (``/health``, ``/metrics``, the
OpenAPI schema) they did nothing but pass the request on, and Litestar builds each route's
middleware stack once, at startup, so they need not be there at all: a route with no middleware
of its own is called directly, without those two layers and the exception-handler layer Litestar
puts under any route middleware (docs/decisions.md, D70).

Components append the API's middleware to ``resources.api_middleware`` (in the order they
run); :class:`ApiRoutes`, the last init plugin, moves every route handler under
:data:`API_PREFIXES` into one router at ``/`` that carries it. A handler serving paths both
inside and outside the API is refused at startup: it would be unclear which of its paths an
unauthenticated request may reach.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

from litestar import Controller, Router
from litestar.config.app import AppConfig
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol

__all__ = ["API_PREFIXES", "ApiRoutes", "is_api_path"]

#: Paths (and everything under them) that make up the API.
API_PREFIXES = ("/api", "/admin", "/ws")


class _Shared(DefineMiddleware):
    """A middleware definition whose arguments are shared, not copied: Litestar deep-copies a
    router when it registers it, middleware included, and the API's middleware holds the
    application's rate limiter and token service, which must stay the very objects the rest of
    the application (and its metrics) uses."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


def is_api_path(path: str) -> bool:
    """Whether ``path`` (a route template) is one of :data:`API_PREFIXES` or lies under one."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in API_PREFIXES)


def _paths(handler: Any) -> Iterable[str]:
    """The paths a route handler, controller class or router registers under."""
    if isinstance(handler, BaseRouteHandler):
        return handler.paths
    if isinstance(handler, Router):
        return (handler.path,)
    if inspect.isclass(handler) and issubclass(handler, Controller):
        return (handler.path,)  # type: ignore[misc]  # a subclass's class attribute, over the base's slot
    raise TypeError(f"not a route handler, controller or router: {handler!r}")


def _in_api(handler: Any) -> bool:
    inside = {is_api_path(path) for path in _paths(handler)}
    if len(inside) > 1:
        raise ValueError(f"route handler {handler!r} serves paths both inside and outside {API_PREFIXES}")
    return inside == {True}


class ApiRoutes(InitPluginProtocol):
    """Mounts ``middleware`` on the route handlers under :data:`API_PREFIXES` only. Must be the
    last init plugin, so that it sees every component's route handlers."""

    def __init__(self, middleware: Sequence[DefineMiddleware]) -> None:
        self.middleware = middleware

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        api: list[Any] = []
        rest: list[Any] = []
        for handler in app_config.route_handlers:
            (api if _in_api(handler) else rest).append(handler)
        if api and self.middleware:
            shared = [_Shared(m.middleware, *m.args, **m.kwargs) for m in self.middleware]
            rest.append(Router("/", route_handlers=api, middleware=shared))
        else:
            rest.extend(api)
        app_config.route_handlers = rest
        return app_config
