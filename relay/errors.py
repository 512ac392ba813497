"""Errors of the relay daemon: which ones a restart can cure and which ones stop it."""

from __future__ import annotations

from outbox.errors import OutboxError


class RelayError(OutboxError):
    """The relay failed."""


class RetryableError(RelayError):
    """A transient failure (connection lost, delivery failed): the relay restarts after a pause
    and resumes from the last acknowledged position."""


class DeliveryFailedError(RetryableError):
    """Kafka failed to deliver an event; unacknowledged events will be sent again."""


class SourceUnavailableError(RetryableError):
    """The source database went away; the relay reconnects with backoff."""


class FatalRelayError(RelayError):
    """The relay cannot go on without an operator: it stops with this error."""


class StoppedWhileBlocked(Exception):
    """Stop was requested while `send` waited for Kafka (its local queue full): the relay ends
    without waiting for the broker; what was not acknowledged is sent again by the next one."""
