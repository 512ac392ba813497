"""The PostgreSQL WAL source: outbox events read from a pgoutput logical replication slot."""

from __future__ import annotations

from relay.wal.decoder import OutboxDecoder, WalCommit, WalEvent, WalItem, WalRejected
from relay.wal.errors import (
    AcknowledgementError,
    PgOutputDecodeError,
    PublicationMismatchError,
    PublicationMissingError,
    ReplicationConnectionError,
    ReplicationPermissionError,
    SlotError,
    SlotInUseError,
    SlotInvalidatedError,
    SlotMismatchError,
    SlotMissingError,
    UnknownMessageError,
    WalError,
)
from relay.wal.lsn import format_lsn, parse_lsn
from relay.wal.slots import SlotStatus
from relay.wal.source import WalSource, WalSourceConfig, open_as_standby, setup, teardown
from relay.wal.stream import ReplicationStream

__all__ = [
    "AcknowledgementError",
    "OutboxDecoder",
    "PgOutputDecodeError",
    "PublicationMismatchError",
    "PublicationMissingError",
    "ReplicationConnectionError",
    "ReplicationPermissionError",
    "ReplicationStream",
    "SlotError",
    "SlotInUseError",
    "SlotInvalidatedError",
    "SlotMismatchError",
    "SlotMissingError",
    "SlotStatus",
    "UnknownMessageError",
    "WalCommit",
    "WalError",
    "WalEvent",
    "WalItem",
    "WalRejected",
    "WalSource",
    "WalSourceConfig",
    "format_lsn",
    "open_as_standby",
    "parse_lsn",
    "setup",
    "teardown",
]
