"""Errors of the WAL (logical replication) source; every one is an `OutboxError`.

Only a lost connection is worth a restart (`restart`, relay/errors.py); a missing or invalidated
slot, a wrong publication, missing privileges need an operator: the relay never carries on from
a fresh slot (events would be lost).
"""

from __future__ import annotations

from relay.errors import RelayError


class WalError(RelayError):
    """Reading the outbox from PostgreSQL's write-ahead log failed."""


class PgOutputDecodeError(WalError):
    """A pgoutput message could not be decoded: the stream is not what this relay expects."""


class UnknownMessageError(PgOutputDecodeError):
    """The server sent a pgoutput message type this relay does not know."""


class AcknowledgementError(WalError, ValueError):
    """A position was acknowledged that the source never handed out: that would skip events."""


class ReplicationConnectionError(WalError):
    """The replication connection failed or was lost; reconnect with backoff and resume."""

    restart = True


class ReplicationPermissionError(WalError):
    """The role may not open a replication connection: it needs LOGIN REPLICATION.

    Grant it (`ALTER ROLE relay WITH LOGIN REPLICATION`) and allow replication connections to
    the database in pg_hba.conf.
    """


class SlotError(WalError):
    """The replication slot cannot be used."""


class SlotMissingError(SlotError):
    """The replication slot does not exist; the relay never creates one on its own at run time."""


class SlotInvalidatedError(SlotError):
    """The replication slot was invalidated: the WAL it needed has been removed."""


class SlotRecoveryPendingError(SlotError):
    """A recovery of the slot began and did not finish (relay/wal/recovery.py): streaming from
    the slot now would skip the rows that recovery has still to publish."""


class SlotInUseError(SlotError):
    """Another process is streaming from the replication slot; wait as a standby and retry."""

    def __init__(self, message: str | None = None, active_pid: int | None = None) -> None:
        super().__init__(message)
        self.active_pid = active_pid


class SlotMismatchError(SlotError):
    """The replication slot exists but is not a pgoutput logical slot of this database."""


class PublicationMissingError(WalError):
    """The publication does not exist in the database; create it before streaming."""


class PublicationMismatchError(WalError):
    """The publication exists but does not publish the outbox table's inserts."""
