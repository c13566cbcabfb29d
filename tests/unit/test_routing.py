"""The API's middleware is mounted on the API's routes only (service.routing)."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Controller, Litestar, Request, Router, get
from litestar.exceptions import ImproperlyConfiguredException
from litestar.middleware import DefineMiddleware
from litestar.testing import TestClient
from litestar.types import ASGIApp, Receive, Scope, Send

from service.routing import ApiRoutes, is_api_path


class Tag:
    """Middleware that appends its name to the ``x-layers`` response header."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app, self.name = app, name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {}).setdefault("layers", []).append(self.name)  # type: ignore[typeddict-item]
        await self.app(scope, receive, send)


def _layers(request: Request[Any, Any, Any]) -> str:
    return ",".join(request.scope.get("state", {}).get("layers", []))


@get("/api/things", sync_to_thread=False)
def api_things(request: Request[Any, Any, Any]) -> str:
    return _layers(request)


@get(["/health/live", "/metrics"], sync_to_thread=False)
def outside(request: Request[Any, Any, Any]) -> str:
    return _layers(request)


@get("/x", sync_to_thread=False)
def nested_x(request: Request[Any, Any, Any]) -> str:
    return _layers(request)


class AdminController(Controller):
    path = "/admin"

    @get("/breakers", sync_to_thread=False)
    def breakers(self, request: Request[Any, Any, Any]) -> str:
        return _layers(request)


def _app(*handlers: Any) -> Litestar:
    middleware = [DefineMiddleware(Tag, name="auth"), DefineMiddleware(Tag, name="ratelimit")]
    return Litestar(route_handlers=list(handlers), plugins=[ApiRoutes(middleware)])


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("/api", True), ("/api/events", True), ("/admin/dlq/{id:str}", True), ("/ws", True),
        ("/apix", False), ("/health/live", False), ("/metrics", False), ("/schema/openapi.json", False),
        ("/wsx", False), ("/", False),
    ],
)  # fmt: skip
def test_api_paths_are_the_three_prefixes_and_what_lies_under_them(path: str, inside: bool) -> None:
    """``/api``, ``/admin`` and ``/ws`` and the paths under them are the API; a path that only
    starts with the same letters (``/apix``) is not."""
    assert is_api_path(path) is inside


def test_api_routes_pass_the_middleware_in_order_and_other_routes_pass_none() -> None:
    """Handlers, controllers and routers under the API get the middleware, outermost first;
    health and metrics are called with no middleware of their own."""
    app = _app(api_things, outside, AdminController, Router("/api/nested", route_handlers=[nested_x]))
    with TestClient(app) as client:
        for path in ("/api/things", "/admin/breakers", "/api/nested/x"):
            assert client.get(path).text == "auth,ratelimit", path
        for path in ("/health/live", "/metrics"):
            assert client.get(path).text == "", path


def test_the_middleware_arguments_are_the_applications_own_objects() -> None:
    """Litestar deep-copies the router it registers; the API middleware's arguments (the rate
    limiter, the token service) stay the very objects the application holds, not copies."""
    calls: list[str] = []

    class Recorder:
        def __init__(self, app: ASGIApp, calls: list[str]) -> None:
            self.app, self.calls = app, calls

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            self.calls.append(scope["path"])
            await self.app(scope, receive, send)

    app = Litestar(route_handlers=[api_things, outside], plugins=[ApiRoutes([DefineMiddleware(Recorder, calls=calls)])])
    with TestClient(app) as client:
        client.get("/api/things")
        client.get("/health/live")
    assert calls == ["/api/things"]


@pytest.mark.parametrize("way", ["router at /", "controller without a path", "registered late"])
def test_an_api_route_that_would_miss_the_middleware_stops_the_application(way: str) -> None:
    """Fail closed: an /api route registered so that it would not carry the API's middleware (a
    router at ``/`` holding it, a controller without a path of its own, ``app.register`` after
    startup) raises an error naming the route instead of serving it unauthenticated."""

    @get("/api/hidden", sync_to_thread=False)
    def hidden() -> str:
        return ""

    class Pathless(Controller):
        @get("/api/hidden", sync_to_thread=False)
        def hidden(self) -> str:
            return ""

    with pytest.raises(ImproperlyConfiguredException, match="/api/hidden"):
        if way == "router at /":
            _app(Router("/", route_handlers=[hidden]))
        elif way == "controller without a path":
            _app(Pathless)
        else:
            _app(outside).register(hidden)


def test_a_handler_both_inside_and_outside_the_api_is_refused_at_startup() -> None:
    """A handler serving an API path and a non-API path would be unclear about which of its
    paths an unauthenticated caller may reach: building the app fails, naming it."""

    @get(["/api/both", "/both"], sync_to_thread=False)
    def both() -> str:
        return ""

    with pytest.raises(ValueError, match="both inside and outside"):
        _app(both)
