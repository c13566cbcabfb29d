"""The integrations component: mounts ``/api/integrations`` and publishes the credential keyring
as ``resources.extensions["integrations.keyring"]``, a callable returning the :class:`Keyring`.

The keyring is built on first use, not at construction: an application that never touches an
integration never creates the development key file. Configured keys are parsed at construction,
so a malformed ``VIGIL_CREDENTIAL_KEYS`` stops startup with an error naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from service.domain.integrations.keyring import Keyring
from service.domain.integrations.routes import build_router

if TYPE_CHECKING:
    from service.app import Resources

__all__ = ["IntegrationsComponent"]


class IntegrationsComponent(InitPluginProtocol):
    """Integrations CRUD with credentials sealed at rest."""

    def __init__(self, resources: Resources) -> None:
        self.settings = resources.settings
        holder: list[Keyring] = [Keyring.from_settings(self.settings)] if self.settings.credential_keys else []

        def keyring() -> Keyring:  # a plain function: Litestar deep-copies dependencies, keys must not be
            if not holder:
                holder.append(Keyring.from_settings(self.settings))
            return holder[0]

        self.keyring = keyring
        resources.extensions["integrations.keyring"] = keyring

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(build_router(self.keyring))
        return app_config
