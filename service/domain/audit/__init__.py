"""The audit log: security-relevant actions recorded off the request path, never lost.

``resources.extensions["audit"]`` is an :class:`AuditRecorder`; call
``record(action, *, actor_user_id, target_type=None, target_id=None, details=None, ip=None)``.
"""

from __future__ import annotations

from service.domain.audit.recorder import AuditEntry, AuditRecorder

__all__ = ["AuditEntry", "AuditRecorder"]
