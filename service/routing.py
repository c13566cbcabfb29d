"""The API's middleware, mounted on the API's routes only.

Authentication and rate limiting act on the API: ``/api`` (the client API), ``/admin`` (the
operator API) and ``/ws`` (the realtime socket). Elsewhere (``/health``, ``/metrics``, the
OpenAPI schema) they did nothing but pass the request on, and Litestar builds each route's
middleware stack once, at startup, so they need not be there at all: a route with no middleware
of its own is called directly, without those two layers and the exception-handler layer Litestar
puts under any route middleware (docs/decisions.md, D70).

Components append the API's middleware to ``resources.api_middleware`` (in the order they
run); :class:`ApiRoutes`, the last init plugin, moves every route handler, controller or
router registered under :data:`API_PREFIXES` into one router at ``/`` that carries it.

It fails closed: as each route is registered (at startup, or later with ``app.register``), a
route under the API whose handlers do not carry the API's middleware stops the application
with an error naming the route, whatever the way it got there (a router at ``/`` holding an
``/api`` handler, a controller without a path, a late registration). A handler registered
with paths on both sides is refused too: it would be unclear which of its paths an
unauthenticated request may reach.

Litestar deep-copies a router when it registers it, so the API's handlers are copies. A
handler, guard or dependency of an API route must therefore be a function or a closure, not a
bound method of an object holding state: ``copy.deepcopy`` copies a bound method's object,
silently. (The middleware's own arguments are shared, see ``_Shared``.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from litestar import Router
from litestar.config.app import AppConfig
from litestar.exceptions import ImproperlyConfiguredException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol, ReceiveRoutePlugin
from litestar.routes import BaseRoute, HTTPRoute

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
    """The paths a route handler, router or class (a controller, a websocket listener)
    registers under; ``/`` for a class without a path of its own."""
    if isinstance(handler, BaseRouteHandler):
        return handler.paths
    if isinstance(handler, Router):
        return (handler.path,)
    path = getattr(handler, "path", "/")  # a class; on a Controller without one, a slot descriptor
    return (path if isinstance(path, str) else "/",)


def _in_api(handler: Any) -> bool:
    inside = {is_api_path(path) for path in _paths(handler)}
    if len(inside) > 1:
        raise ValueError(f"route handler {handler!r} serves paths both inside and outside {API_PREFIXES}")
    return inside == {True}


class ApiRoutes(InitPluginProtocol, ReceiveRoutePlugin):
    """Mounts ``middleware`` on the route handlers under :data:`API_PREFIXES` only, and refuses
    any API route registered without it. Must be the last init plugin, so that it sees every
    component's route handlers."""

    def __init__(self, middleware: Sequence[DefineMiddleware]) -> None:
        self.middleware = middleware
        self._shared: list[_Shared] = []

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        api: list[Any] = []
        rest: list[Any] = []
        for handler in app_config.route_handlers:
            (api if _in_api(handler) else rest).append(handler)
        self._shared = [_Shared(m.middleware, *m.args, **m.kwargs) for m in self.middleware]
        if api and self._shared:
            rest.append(Router("/", route_handlers=api, middleware=list(self._shared)))
        else:
            rest.extend(api)
        app_config.route_handlers = rest
        return app_config

    def receive_route(self, route: BaseRoute) -> None:
        """Fail closed: an API route whose handlers lack the API's middleware stops startup."""
        if not self._shared or not is_api_path(route.path):
            return
        handlers = route.route_handlers if isinstance(route, HTTPRoute) else [route.route_handler]  # type: ignore[attr-defined]
        for handler in handlers:
            mounted = handler.resolve_middleware()
            if not all(any(m is shared for m in mounted) for shared in self._shared):
                raise ImproperlyConfiguredException(
                    f"route {route.path} is under the API {API_PREFIXES} but was registered without its middleware "
                    "(authentication, rate limiting): register it at a path under the API, not below a router at '/'"
                )
