"""Streaming replication framing and feedback state, without I/O: what to send, and when."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from relay.wal.errors import ReplicationConnectionError
from relay.wal.lsn import format_lsn

# Frames inside COPY_BOTH (PostgreSQL manual, "Streaming Replication Protocol").
XLOG_DATA = 0x77  # 'w': Int64 start LSN, Int64 end LSN, Int64 send time, then the data
KEEPALIVE = 0x6B  # 'k': Int64 server WAL end, Int64 send time, Byte1 reply requested
STATUS_UPDATE = b"r"  # 'r': Int64 write, Int64 flush, Int64 apply, Int64 time, Byte1 reply

XLOG_HEADER = struct.Struct(">QQq")
XLOG_HEADER_SIZE = 1 + XLOG_HEADER.size
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")

# Seconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
_PG_EPOCH_OFFSET = 946_684_800


def pg_now_us() -> int:
    """The current time as the protocol wants it: microseconds since 2000-01-01 UTC."""
    return (time.time_ns() // 1000) - _PG_EPOCH_OFFSET * 1_000_000


def status_update(write: int, flush: int, apply: int, now_us: int, reply: bool = False) -> bytes:
    """A Standby Status Update frame."""
    return _STATUS.pack(STATUS_UPDATE, write, flush, apply, now_us, 1 if reply else 0)


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    send_time_us: int
    reply_requested: bool


def parse_keepalive(frame: bytes | memoryview) -> Keepalive:
    wal_end, send_time, reply = _KEEPALIVE.unpack_from(frame, 1)
    return Keepalive(wal_end, send_time, bool(reply))


class Feedback:
    """The positions this client reports, and the rule that keeps them safe.

    `flush` (what the slot's confirmed_flush_lsn becomes) moves only when the caller confirms
    a position, and only forward: the server would otherwise restart the slot from a position
    whose events the caller has not yet handed to Kafka, or (PostgreSQL 15 does not refuse it)
    move the slot backwards. 0 means "nothing confirmed on this connection"; the server ignores
    an invalid flush position, so replying before any confirmation never moves the slot.
    `write` reports how far the client has read, which only feeds pg_stat_replication and lets
    the server send keepalives carrying its newer WAL end.
    """

    __slots__ = ("confirmed", "last_status_at", "received", "reply_due", "server_wal_end")

    def __init__(self) -> None:
        self.received = 0
        self.confirmed = 0
        self.server_wal_end = 0
        self.reply_due = False
        self.last_status_at = float("-inf")

    def confirm(self, lsn: int) -> bool:
        """Record that everything committed up to `lsn` is safe; True if the position moved."""
        if lsn > self.confirmed:
            self.confirmed = lsn
            return True
        return False

    def on_keepalive(self, keepalive: Keepalive) -> None:
        if keepalive.wal_end > self.server_wal_end:
            self.server_wal_end = keepalive.wal_end
        if keepalive.wal_end > self.received:
            self.received = keepalive.wal_end
        if keepalive.reply_requested:
            self.reply_due = True

    def status_due(self, now: float, interval: float) -> bool:
        return self.reply_due or now - self.last_status_at >= interval

    def status(self, now: float, now_us: int, reply: bool = False) -> bytes:
        """The status update to send now; marks any requested reply as answered."""
        self.reply_due = False
        self.last_status_at = now
        write = max(self.received, self.confirmed)
        return status_update(write, self.confirmed, self.confirmed, now_us, reply)

    def describe(self) -> str:
        return (
            f"received {format_lsn(self.received)}, confirmed {format_lsn(self.confirmed)}, "
            f"server WAL end {format_lsn(self.server_wal_end)}"
        )


def frame_kind(frame: bytes | memoryview) -> int:
    if not frame:
        raise ReplicationConnectionError("the server sent an empty replication frame")
    return frame[0]
