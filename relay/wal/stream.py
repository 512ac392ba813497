"""The logical replication client: streams pgoutput messages from a slot over psycopg 3."""

from __future__ import annotations

import logging
import selectors
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict

from outbox.conninfo import libpq_url, redact
from outbox.errors import ConfigurationError
from outbox.identifiers import check_identifier
from relay.wal import slots
from relay.wal._translate import translate
from relay.wal.errors import ReplicationConnectionError, WalError
from relay.wal.lsn import format_lsn, parse_lsn
from relay.wal.pgoutput import PgOutputMessage, PgOutputParser
from relay.wal.protocol import (
    KEEPALIVE,
    XLOG_DATA,
    XLOG_HEADER_SIZE,
    Feedback,
    parse_keepalive,
    pg_now_us,
)

logger = logging.getLogger(__name__)

_START_LSN = struct.Struct(">Q")

# Defaults for a connection that must notice a dead server: the walsender stops pinging a
# client that keeps sending status updates, so silence alone does not reveal a lost peer.
_CONNECTION_DEFAULTS = {
    "application_name": "outbox-relay",
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

WalMessage = tuple[int, PgOutputMessage]
"""(LSN of the XLogData frame, message). Commit frames carry the commit's end LSN, data
frames the change's LSN, Relation and Type frames 0."""

T = TypeVar("T")




@dataclass(frozen=True, slots=True)
class SystemIdentity:
    """The answer to IDENTIFY_SYSTEM."""

    system_id: str
    timeline: int
    wal_position: int
    database: str | None


class ReplicationStream:
    """One START_REPLICATION session on a pgoutput slot. Not thread-safe: one caller drives it.

    The caller reads with a timeout (so it can serve Kafka in between), confirms positions once
    they are safe, and the stream reports exactly those to the server: periodically, on close,
    and whenever a keepalive asks for a reply. Nothing beyond a confirmed position is ever sent
    as flushed. Driver errors leave it as `WalError` subclasses, with `__cause__` kept.
    Open it with `ReplicationStream.open(...)`; it is a context manager.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        slot: str,
        publication: str,
        identity: SystemIdentity,
        slot_status: slots.SlotStatus,
        status_interval: float,
    ) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self.slot = slot
        self.publication = publication
        self.identity = identity
        self.slot_at_start = slot_status
        self._status_interval = status_interval
        # Decodes this stream's messages in order (it knows when a streamed block is open).
        self.parser = PgOutputParser()
        self._feedback = Feedback()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._pgconn.socket, selectors.EVENT_READ)
        self._streaming = True
        self._closed = False
        self._flush_pending = False

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        url: str,
        slot: str,
        publication: str,
        *,
        table: tuple[str, str] | None = None,
        columns: Sequence[str] = (),
        start_lsn: int = 0,
        binary: bool = True,
        messages: bool = True,
        status_interval: float = 10.0,
        connect_options: Mapping[str, str] | None = None,
        row_filter: str | None = None,
    ) -> ReplicationStream:
        """Connect, check the slot and publication, and START_REPLICATION (pgoutput, protocol 1).
        `row_filter`: the publication's, for a shard group's (slots.check_publication).

        `table` (schema, name), if given, must be published (inserts, no row filter, with
        those of `columns` it has), else PublicationMismatchError: a relay would otherwise
        wait for events that never come, or get them without some of their fields.
        `start_lsn` 0 resumes at the slot's confirmed position (the server never goes back
        before it anyway). `binary` asks for columns in binary form (no text parsing of uuid,
        bytea, timestamps). `connect_options` are libpq parameters that override the URL's.
        Raises SlotMissingError, SlotInvalidatedError, SlotInUseError, SlotMismatchError,
        PublicationMissingError, PublicationMismatchError, ReplicationPermissionError or
        ReplicationConnectionError.
        """
        slots.check_slot_name(slot)
        check_identifier(publication, "publication")
        if not status_interval > 0:
            raise ConfigurationError(f"status_interval={status_interval!r} must be positive")
        conn = _connect(url, connect_options or {})
        try:
            identity = _identify(conn)
            database = identity.database or slots.current_database(conn)
            status = slots.check_slot(slots.slot_status(conn, slot), slot, database)
            if status.wal_status == "unreserved":
                logger.warning(
                    "replication slot %s retains more WAL than max_wal_size; it will be "
                    "invalidated unless the relay catches up (%s bytes left)",
                    slot,
                    status.safe_wal_size,
                    extra={"action": "wal.slot.unreserved", "slot": slot},
                )
            needed: list[str] = []
            if table is not None and columns:
                existing = slots.table_columns(conn, table)
                needed = [column for column in columns if column in existing]
            slots.check_publication(
                slots.publication_info(conn, publication), publication, table, needed,
                row_filter,
            )
            query = sql.SQL(
                "START_REPLICATION SLOT {slot} LOGICAL {lsn} (proto_version '1',"
                " publication_names {publications}, messages {messages}, binary {binary})"
            ).format(
                slot=sql.Identifier(slot),
                lsn=sql.SQL(format_lsn(start_lsn)),
                # pgoutput splits this option as a list of identifiers: quote the name so that
                # upper-case letters survive.
                publications=sql.Literal(sql.Identifier(publication).as_string(conn)),
                messages=sql.Literal("true" if messages else "false"),
                binary=sql.Literal("true" if binary else "false"),
            )
            try:
                result = conn.execute(query).pgresult
            except psycopg.Error as exc:
                raise translate(
                    exc, f"starting replication from slot {slot!r}", slot, publication
                ) from exc
            if result is None or result.status != pq.ExecStatus.COPY_BOTH:
                raise ReplicationConnectionError(
                    "START_REPLICATION did not enter COPY_BOTH mode; is this a PostgreSQL server?"
                )
            conn.pgconn.nonblocking = 1
        except BaseException:
            conn.close()
            raise
        logger.info(
            "replication started from slot %s at %s",
            slot,
            format_lsn(status.confirmed_flush_lsn or 0),
            extra={"action": "wal.stream.started", "slot": slot},
        )
        return cls(
            conn,
            slot=slot,
            publication=publication,
            identity=identity,
            slot_status=status,
            status_interval=status_interval,
        )

    # -- positions -------------------------------------------------------------------------------

    @property
    def confirmed_lsn(self) -> int:
        """The highest position confirmed on this connection (0: none yet)."""
        return self._feedback.confirmed

    @property
    def received_lsn(self) -> int:
        return self._feedback.received

    @property
    def server_wal_end(self) -> int:
        """The server's WAL end from its last keepalive: everything before it has been sent."""
        return self._feedback.server_wal_end

    def confirm(self, lsn: int, *, send: bool = False) -> None:
        """Everything committed up to `lsn` is safe: the slot may advance there.

        Call it with a commit's end LSN only once every event of that transaction and of all
        earlier ones has been acknowledged by Kafka. Positions never move backwards. The server
        hears of it at the next status update (`status_interval`, a keepalive reply, `close`),
        or now with `send=True`.
        """
        if self._feedback.confirm(lsn) and send:
            self.send_status()

    # -- reading ---------------------------------------------------------------------------------

    def read(self, timeout: float, max_messages: int = 1000) -> list[WalMessage]:
        """The messages that arrive within `timeout` seconds, at most `max_messages`.

        Returns as soon as some messages are in and the socket has nothing more ready, so
        latency stays low; returns an empty list after `timeout` without data. Keepalives are
        answered here, and status updates sent when due: call it (or `heartbeat`) at least
        every few seconds even when paused, or the server's wal_sender_timeout ends the session.
        """
        decode = self.parser.decode
        return self.read_raw(lambda lsn, data: (lsn, decode(data)), timeout, max_messages)

    def read_raw(
        self,
        handle: Callable[[int, bytes], T | None],
        timeout: float,
        max_messages: int = 1000,
    ) -> list[T]:
        """As `read`, but each message goes, undecoded, through `handle(lsn, data)`, which
        decodes it with `parser` (or reads what it needs from the bytes); returns what `handle`
        returned, Nones left out. Saves the caller a second pass over a list of messages: this
        loop runs once per change of a backlog."""
        self._check_open()
        results: list[T] = []
        append = results.append
        pgconn = self._pgconn
        feedback = self._feedback
        unpack_start = _START_LSN.unpack_from
        deadline = time.monotonic() + timeout
        drained = False
        count = 0
        try:
            while count < max_messages:
                size, frame = pgconn.get_copy_data(1)
                if size > 0:
                    kind = frame[0]
                    if kind == XLOG_DATA:
                        count += 1
                        (start,) = unpack_start(frame, 1)
                        if start > feedback.received:
                            feedback.received = start
                        result = handle(start, bytes(frame[XLOG_HEADER_SIZE:]))
                        if result is not None:
                            append(result)
                    elif kind == KEEPALIVE:
                        feedback.on_keepalive(parse_keepalive(frame))
                        if feedback.reply_due:
                            self._send_status(reply=False)
                    else:
                        raise ReplicationConnectionError(
                            f"unexpected replication frame type 0x{kind:02x} from the server"
                        )
                    continue
                if size == -1:
                    self._copy_ended()
                if count:
                    # Take what the socket already holds (no waiting) before returning a short
                    # batch: a busy stream then comes in batches of max_messages, not of
                    # whatever fitted into libpq's last read.
                    if drained or not self._selector.select(0):
                        break
                    drained = True
                    pgconn.consume_input()
                    continue
                drained = False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._heartbeat()
                if self._selector.select(min(remaining, self._status_interval)):
                    pgconn.consume_input()
            self._heartbeat()
        except psycopg.Error as exc:
            self._streaming = False
            raise translate(exc, f"streaming from replication slot {self.slot!r}",
                            self.slot, self.publication) from exc
        return results

    # -- feedback --------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Send a status update if one is due (interval elapsed or reply requested)."""
        self._check_open()
        try:
            self._heartbeat()
        except psycopg.Error as exc:
            self._streaming = False
            raise translate(exc, f"sending feedback on replication slot {self.slot!r}") from exc

    def _heartbeat(self) -> None:
        if self._flush_pending:
            self._flush()
        if self._feedback.status_due(time.monotonic(), self._status_interval):
            self._send_status(reply=False)

    def send_status(self, *, reply: bool = False) -> None:
        """Send a status update now (flush = the confirmed position)."""
        self._check_open()
        try:
            self._send_status(reply)
        except psycopg.Error as exc:
            self._streaming = False
            raise translate(exc, f"sending feedback on replication slot {self.slot!r}") from exc

    def _send_status(self, reply: bool) -> None:
        frame = self._feedback.status(time.monotonic(), pg_now_us(), reply)
        if self._pgconn.put_copy_data(frame) == 0:
            # Non-blocking mode with a full output buffer: libpq queued nothing. The next status
            # carries the same or newer positions, so dropping this one loses nothing.
            self._flush_pending = True
            return
        self._flush()

    def _flush(self) -> None:
        self._flush_pending = self._pgconn.flush() != 0

    # -- errors and closing ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or not self._streaming:
            raise ReplicationConnectionError(
                f"the replication stream of slot {self.slot!r} is closed; open a new one"
            )

    def _copy_ended(self) -> None:
        """The server ended COPY: fetch its reason and raise."""
        self._streaming = False
        result = self._pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(result)
        raise ReplicationConnectionError(
            f"the server ended the replication stream of slot {self.slot!r} "
            f"({self._feedback.describe()})"
        )

    def close(self, timeout: float = 5.0) -> None:
        """Report the confirmed position, end the COPY cleanly, and close the connection."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._streaming and not self._conn.closed:
                self._finish_copy(timeout)
        except (psycopg.Error, OSError, WalError) as exc:
            # The position was reported as well as the connection allowed; a missed final
            # status only means events after the last report are sent again.
            logger.warning(
                "replication stream of slot %s did not end cleanly: %s",
                self.slot,
                redact(str(exc)),
                extra={"action": "wal.stream.close_failed", "slot": self.slot},
            )
        finally:
            self._streaming = False
            self._selector.close()
            self._conn.close()
            logger.info(
                "replication stream of slot %s closed (%s)",
                self.slot,
                self._feedback.describe(),
                extra={"action": "wal.stream.closed", "slot": self.slot},
            )

    def _finish_copy(self, timeout: float) -> None:
        pgconn = self._pgconn
        self._send_status(reply=False)
        deadline = time.monotonic() + timeout
        while self._flush_pending and time.monotonic() < deadline:
            self._flush()
        pgconn.put_copy_end()
        self._flush()
        # The server answers CopyDone with its own, after any data still in flight: discard
        # that data (the slot restarts from the confirmed position anyway).
        while time.monotonic() < deadline:
            if self._flush_pending:
                self._flush()
            size, _ = pgconn.get_copy_data(1)
            if size == -1:
                while pgconn.get_result() is not None:
                    pass
                return
            if size == 0 and self._selector.select(max(0.0, deadline - time.monotonic())):
                pgconn.consume_input()

    def __enter__(self) -> ReplicationStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def replication_connection(url: str) -> psycopg.Connection[Any]:
    """A replication connection (autocommit) with the stream's defaults, for slot commands."""
    return _connect(url, {})


def _connect(url: str, overrides: Mapping[str, str]) -> psycopg.Connection[Any]:
    try:
        params: dict[str, Any] = conninfo_to_dict(libpq_url(url))
    except psycopg.Error as exc:
        raise ConfigurationError(f"the database URL is not valid: {redact(str(exc))}") from exc
    for key, value in _CONNECTION_DEFAULTS.items():
        params.setdefault(key, value)
    params.update(overrides)
    params["replication"] = "database"
    try:
        return psycopg.connect(**params, autocommit=True)
    except psycopg.Error as exc:
        raise translate(exc, "opening a replication connection") from exc


def _identify(conn: psycopg.Connection[Any]) -> SystemIdentity:
    try:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
    except psycopg.Error as exc:
        raise translate(exc, "IDENTIFY_SYSTEM") from exc
    if row is None:
        raise ReplicationConnectionError("IDENTIFY_SYSTEM returned no row")
    return SystemIdentity(
        system_id=str(row[0]),
        timeline=int(row[1]),
        wal_position=parse_lsn(str(row[2])),
        database=str(row[3]) if row[3] is not None else None,
    )
