"""Errors of the relay daemon, each declaring what the supervisor does with it (`restart`):
start the relay again, after a pause, from the last acknowledged position; or stop the daemon.
The sources' own errors say it the same way (relay/wal/errors.py, relay/mongo/errors.py), so no
source translates them by hand."""

from __future__ import annotations

from typing import ClassVar

from outbox.errors import OutboxError


class RelayError(OutboxError):
    """The relay failed. `restart`: a restart may cure it; else an operator has to act."""

    restart: ClassVar[bool] = False


class RetryableError(RelayError):
    """A transient failure (connection lost, delivery failed): the relay restarts after a pause
    and resumes from the last acknowledged position."""

    restart = True


class DeliveryFailedError(RetryableError):
    """Kafka failed to deliver an event; unacknowledged events will be sent again."""


class SourceUnavailableError(RetryableError):
    """The source database went away; the relay reconnects with backoff."""


class FatalRelayError(RelayError):
    """The relay cannot go on without an operator: it stops with this error."""


class StoppedWhileBlocked(Exception):
    """Stop was requested while `send` waited for Kafka (its local queue full): the relay ends
    without waiting for the broker; what was not acknowledged is sent again by the next one."""
