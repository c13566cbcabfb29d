"""The auth component: mounts the auth API and, on the API's routes, the authentication
middleware, and publishes the access-token service as ``resources.extensions["auth"]`` (an
:class:`~service.domain.auth.tokens.AccessTokens`: ``decode(token) -> AuthUser``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.config.app import AppConfig
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol

from service.domain.auth.middleware import REJECTION_REASONS, AuthenticationMiddleware
from service.domain.auth.passwords import Passwords
from service.domain.auth.routes import EVENTS, build_router
from service.domain.auth.service import AuthService
from service.domain.auth.tokens import AccessTokens

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["AuthComponent"]


class AuthComponent(InitPluginProtocol):
    """Identity: registration, verification, login, refresh-token rotation, ``scope["user"]``."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        # Built here, not in on_app_init: with an empty secret (development) the random key
        # must exist before later components look the token service up.
        self.tokens = AccessTokens.from_settings(resources.settings)
        self.service = AuthService(resources, self.tokens, Passwords())
        resources.extensions["auth"] = self.tokens
        events = resources.metrics.counter("auth_events_total")
        for event in EVENTS:  # every series exists from the start, so rate() and alerts see zeros
            events.labels(event)
        self.rejections = {reason: events.labels(f"access_token_{reason}") for reason in REJECTION_REASONS}

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(build_router(self.service))
        middleware = DefineMiddleware(AuthenticationMiddleware, tokens=self.tokens, rejections=self.rejections)
        self.resources.api_middleware.append(middleware)
        return app_config
