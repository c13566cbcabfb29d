"""Integrations: external APIs that workflows call with a user's credentials.

- :mod:`.keyring`: AES-256-GCM sealing of credentials under rotating key ids (encryption at rest);
- :mod:`.service`: connector kinds, credential validation, ``create_integration``;
- :mod:`.caller`: :class:`IntegrationCaller` (API key / OAuth 2 with refresh, a breaker per
  integration, a timeout per call) and the :func:`integration_caller` factory;
- :mod:`.jobs`: the worker's job set (publishes the caller, sweeps expiring OAuth tokens);
- :mod:`.routes` and :mod:`.component`: ``/api/integrations``;
- :mod:`.rotation`: ``vigil keys rotate``.
"""

from __future__ import annotations

from service.domain.integrations.caller import (
    IntegrationCaller,
    IntegrationCredentialsUnreadable,
    IntegrationError,
    IntegrationNeedsReauth,
    IntegrationNotFound,
    IntegrationResponse,
    IntegrationUnavailable,
    integration_caller,
)
from service.domain.integrations.keyring import CredentialsUnreadable, Keyring
from service.domain.integrations.service import CredentialsInvalid, create_integration

__all__ = [
    "CredentialsInvalid",
    "CredentialsUnreadable",
    "IntegrationCaller",
    "IntegrationCredentialsUnreadable",
    "IntegrationError",
    "IntegrationNeedsReauth",
    "IntegrationNotFound",
    "IntegrationResponse",
    "IntegrationUnavailable",
    "Keyring",
    "create_integration",
    "integration_caller",
]
