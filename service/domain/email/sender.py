"""Delivering one e-mail: over SMTP (aiosmtplib), or, in development with no ``smtp_host``,
to the log.

Errors a delivery raises::

    Exception
    ├── PermanentDeliveryError      the server refused this message for good (5xx on RCPT or
    │                               DATA): retrying cannot help, the mail is dead at once
    └── transient: aiosmtplib.SMTPException, OSError, TimeoutError
                                    the server is unreachable, slow or unwilling right now:
                                    retried with backoff, counted by the ``smtp`` breaker

The message's ``Message-ID`` is derived from the outbox id, so every attempt of one outbox row
carries the same id: a receiver (or a test) can tell a redelivery from a new mail.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Protocol
from uuid import UUID

import aiosmtplib

from service.guardrails.breaker import BreakerConfig
from service.settings import Settings
from telemetry.logging import get_logger

__all__ = [
    "LogTransport",
    "MailTransport",
    "OutgoingMail",
    "PermanentDeliveryError",
    "SmtpTransport",
    "build_message",
    "message_id",
    "smtp_breaker_config",
    "transport_for",
]

_log = get_logger("vigil.email")
_LINK = re.compile(r"https?://[^\s<>\"']+")


@dataclass(frozen=True)
class OutgoingMail:
    """One outbox row, as the transport needs it."""

    outbox_id: UUID
    to: str
    subject: str
    body: str
    kind: str


class PermanentDeliveryError(Exception):
    """The SMTP server refused this message permanently (a 5xx reply to RCPT or DATA)."""


class MailTransport(Protocol):
    """Delivers one mail or raises (see the module docstring for what)."""

    name: str

    async def send(self, mail: OutgoingMail) -> None: ...


def message_id(outbox_id: UUID, sender: str) -> str:
    """The ``Message-ID`` of every attempt of one outbox row."""
    address = parseaddr(sender)[1]
    domain = address.rpartition("@")[2] if "@" in address else "vigil.local"
    return f"<{outbox_id}@{domain}>"


def build_message(mail: OutgoingMail, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = mail.to
    message["Subject"] = mail.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id(mail.outbox_id, sender)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
    message.set_content(mail.body)
    return message


def _permanent(exc: aiosmtplib.SMTPException) -> bool:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(r.code >= 500 for r in exc.recipients)
    return isinstance(exc, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError) and exc.code >= 500


class SmtpTransport:
    """One SMTP session per mail (connection, optional STARTTLS and login, one message), bounded
    as a whole by ``smtp_timeout_seconds``."""

    name = "smtp"

    def __init__(self, settings: Settings) -> None:
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self._username = settings.smtp_username or None
        self._password = settings.smtp_password if settings.smtp_username else None
        self._starttls = settings.smtp_starttls
        self._timeout = settings.smtp_timeout_seconds
        self._sender = settings.mail_from

    async def send(self, mail: OutgoingMail) -> None:
        message = build_message(mail, self._sender)
        try:
            async with asyncio.timeout(self._timeout):
                await aiosmtplib.send(
                    message,
                    hostname=self.host,
                    port=self.port,
                    username=self._username,
                    password=self._password,
                    start_tls=self._starttls,  # False: never upgrade, not "if offered"
                    timeout=self._timeout,
                )
        except aiosmtplib.SMTPException as exc:
            if _permanent(exc):
                raise PermanentDeliveryError(str(exc)) from exc
            raise


class LogTransport:
    """Development only (``smtp_host`` empty; production refuses to start that way): the mail
    is written to the log at info level, links included, and counts as sent."""

    name = "log"

    async def send(self, mail: OutgoingMail) -> None:
        _log.info(
            "email_logged",
            outbox_id=str(mail.outbox_id),
            kind=mail.kind,
            to=mail.to,
            subject=mail.subject,
            links=_LINK.findall(mail.body),
            note="VIGIL_SMTP_HOST is empty: logged instead of sent (development only)",
        )


def transport_for(settings: Settings) -> MailTransport:
    return SmtpTransport(settings) if settings.smtp_host else LogTransport()


def smtp_breaker_config(settings: Settings) -> BreakerConfig:
    """The ``smtp`` breaker: opens when half of the last 10 deliveries (at least 4) failed to
    reach a working server, waits 30 s, then lets 2 trial deliveries through. A permanent
    refusal of one message is a success here: the server answered."""
    return BreakerConfig(
        window_type="count",
        window_size=10,
        minimum_calls=4,
        failure_rate_threshold=50.0,
        slow_call_seconds=settings.smtp_timeout_seconds,
        wait_in_open_seconds=30.0,
        permitted_calls_in_half_open=2,
        record_exceptions=(aiosmtplib.SMTPException, OSError, TimeoutError),
    )
