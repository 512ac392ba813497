"""The WAL change source: outbox events from a pgoutput slot, and the acknowledgement rule."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from outbox.columns import ColumnMapping
from outbox.conninfo import redact
from outbox.errors import ConfigurationError
from outbox.identifiers import check_identifier
from relay.wal import slots
from relay.wal.decoder import OutboxDecoder, WalItem
from relay.wal.errors import AcknowledgementError, SlotInUseError
from relay.wal.lsn import format_lsn
from relay.wal.stream import ReplicationStream

INSERT = ord("I")  # pgoutput Insert message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WalSourceConfig:
    """What the WAL source reads, and how.

    slot, publication: created in the setup step (`setup`); never at run time.
    schema, table: the outbox table whose inserts are events; table=None for table-less mode.
    columns: the table's layout (`ColumnMapping()` native, `ColumnMapping.debezium()`).
    message_prefix: prefix of the logical decoding messages that are events (table-less
        writers); None to ignore messages.
    binary: columns in binary form (faster; every built-in type of the outbox has one).
    status_interval: seconds between status updates to the server; keep it well below the
        server's wal_sender_timeout (60 s by default).
    max_batch: at most this many messages per `poll`.
    """

    slot: str
    publication: str
    schema: str = "public"
    table: str | None = "outbox"
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    message_prefix: str | None = "outbox"
    binary: bool = True
    status_interval: float = 10.0
    max_batch: int = 1000
    # A shard group's publication selects its shards' rows (relay/wal/groups.py): the filter as
    # the catalog shows it, checked at each start.
    row_filter: str | None = None

    def __post_init__(self) -> None:
        slots.check_slot_name(self.slot)
        check_identifier(self.publication, "publication")
        check_identifier(self.schema, "schema")
        if self.table is not None:
            check_identifier(self.table, "table")
        if self.table is None and self.message_prefix is None:
            raise ConfigurationError(
                "table=None and message_prefix=None: the WAL source would read nothing; "
                "set the outbox table, the message prefix, or both"
            )
        if self.message_prefix is not None and (
            not self.message_prefix or "\x00" in self.message_prefix
        ):
            raise ConfigurationError("message_prefix must be a non-empty string without NUL")
        if not self.status_interval > 0:
            raise ConfigurationError(
                f"status_interval={self.status_interval!r} must be a positive number of seconds"
            )
        if not isinstance(self.max_batch, int) or self.max_batch <= 0:
            raise ConfigurationError(f"max_batch={self.max_batch!r} must be a positive integer")

    @property
    def qualified_table(self) -> tuple[str, str] | None:
        return (self.schema, self.table) if self.table is not None else None

    @property
    def published_columns(self) -> tuple[str, ...]:
        """The outbox table's columns the relay reads: the publication's column list."""
        return tuple(self.columns.present().values()) if self.table is not None else ()


class WalSource:
    """Outbox events read from the log, in commit order, with the slot advanced only when safe.

    Drive it like this::

        with WalSource.open(url, config) as source:
            while running:
                for item in source.poll(timeout=0.5):
                    ...  # WalEvent: produce; WalRejected: park; WalCommit: remember end_lsn
                ...      # serve Kafka delivery reports
                source.acknowledge(lsn)  # highest end_lsn whose events, and all before, are acked

    Between commits of the outbox, it also moves the slot over WAL that holds no outbox
    event (other tables, other databases' traffic), so an idle outbox does not pin WAL; it
    does so only while nothing it has handed out is unacknowledged.
    """

    def __init__(self, stream: ReplicationStream, config: WalSourceConfig) -> None:
        self.stream = stream
        self.config = config
        self.decoder = OutboxDecoder(
            schema=config.schema,
            table=config.table,
            columns=config.columns,
            message_prefix=config.message_prefix,
        )

    @classmethod
    def open(
        cls, url: str, config: WalSourceConfig, connect_options: Mapping[str, str] | None = None
    ) -> WalSource:
        """Connect and start streaming; raises the errors of `ReplicationStream.open`."""
        stream = ReplicationStream.open(
            url,
            config.slot,
            config.publication,
            table=config.qualified_table,
            columns=config.published_columns,
            binary=config.binary,
            messages=config.message_prefix is not None,
            status_interval=config.status_interval,
            connect_options=connect_options,
            row_filter=config.row_filter,
        )
        return cls(stream, config)

    def poll(self, timeout: float) -> list[WalItem]:
        """The outbox items that arrive within `timeout` seconds (maybe none), in log order."""
        items: list[WalItem] = self.stream.read_raw(
            self._on_message, timeout, self.config.max_batch)
        self._advance_when_idle()
        return items

    def _on_message(self, lsn: int, data: bytes) -> WalItem | None:
        parser = self.stream.parser
        if data[0] == INSERT and not parser.in_stream_block:  # nearly every message
            return self.decoder.feed_insert(lsn, data, parser.decode)
        return self.decoder.feed(lsn, parser.decode(data))

    def acknowledge(self, lsn: int) -> None:
        """Every event up to the transaction ending at `lsn` (a `WalCommit.end_lsn`), and all
        earlier ones, are acknowledged by Kafka: the slot may advance to `lsn`."""
        if lsn > max(self.decoder.last_commit_end, self.stream.confirmed_lsn):
            raise AcknowledgementError(
                f"acknowledged {format_lsn(lsn)}, beyond the last transaction handed out "
                f"({format_lsn(self.decoder.last_commit_end)}): the slot would skip events"
            )
        self.stream.confirm(lsn)
        self._advance_when_idle()

    def heartbeat(self) -> None:
        """Keep the session alive while not polling (e.g. when Kafka applies backpressure)."""
        self.stream.heartbeat()

    @property
    def acknowledged_lsn(self) -> int:
        return self.stream.confirmed_lsn

    def _advance_when_idle(self) -> None:
        stream = self.stream
        position = idle_position(
            in_transaction=self.decoder.in_transaction,
            last_commit_end=self.decoder.last_commit_end,
            confirmed=stream.confirmed_lsn,
            server_wal_end=stream.server_wal_end,
        )
        if position is not None:
            stream.confirm(position)

    def close(self) -> None:
        """Report the acknowledged position and end the session."""
        self.stream.close()

    def __enter__(self) -> WalSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def setup(
    conn: psycopg.Connection[Any], config: WalSourceConfig, where: sql.Composable | None = None
) -> int:
    """The relay's setup step: create its publication, then its slot; returns the slot's
    consistent point (events committed after it are relayed). `where`: the publication's row
    filter (a shard group's, relay/wal/groups.py).

    The publication comes first: a slot that starts before its publication exists cannot
    decode anything (the server reports the publication missing). `conn` must be in autocommit
    mode (a slot cannot be created in a transaction that has written) and its role needs
    REPLICATION, CREATE on the database and ownership of the outbox table; the relay itself
    then needs only LOGIN REPLICATION.
    """
    if not conn.autocommit:
        raise ConfigurationError(
            "setting up the WAL relay needs a connection in autocommit mode: a replication "
            "slot cannot be created in a transaction that has written"
        )
    columns = config.published_columns or None
    slots.create_publication(conn, config.publication, config.qualified_table, columns, where)
    try:
        return slots.create_slot(conn, config.slot)
    except BaseException:
        slots.drop_publication(conn, config.publication)
        raise


def teardown(conn: psycopg.Connection[Any], config: WalSourceConfig) -> None:
    """Drop the relay's slot and publication, if they exist (the server then frees the WAL
    the slot kept). Raises SlotInUseError while a relay streams from the slot."""
    slots.drop_slot(conn, config.slot)
    slots.drop_publication(conn, config.publication)


def idle_position(
    *, in_transaction: bool, last_commit_end: int, confirmed: int, server_wal_end: int
) -> int | None:
    """A position the slot may move to although no outbox transaction ended there, or None.

    The server's WAL end from a keepalive covers only messages already received and decoded.
    If no transaction is open and everything handed out is acknowledged, no outbox event lies
    before that position: confirming it keeps the slot from retaining WAL while the outbox is
    idle and the database is busy (other tables, other databases).
    """
    if in_transaction or confirmed < last_commit_end or server_wal_end <= confirmed:
        return None
    return server_wal_end


def open_as_standby(
    url: str,
    config: WalSourceConfig,
    stop: threading.Event,
    *,
    retry_interval: float = 5.0,
    connect_options: Mapping[str, str] | None = None,
) -> WalSource | None:
    """Open the source, waiting while another relay holds the slot; None if `stop` is set first.

    Only "slot in use" is waited out; every other error (slot missing or invalidated,
    permissions, connection) is raised for the caller's own policy.
    """
    waiting_since: float | None = None
    while not stop.is_set():
        try:
            source = WalSource.open(url, config, connect_options)
        except SlotInUseError as exc:
            if waiting_since is None:
                waiting_since = time.monotonic()
                logger.warning(
                    "standby: %s",
                    redact(str(exc)),
                    extra={"action": "wal.standby.waiting", "slot": config.slot,
                           "active_pid": exc.active_pid},
                )
            stop.wait(retry_interval)
            continue
        if waiting_since is not None:
            logger.info(
                "standby: took over replication slot %s after %.1f s, at %s",
                config.slot,
                time.monotonic() - waiting_since,
                format_lsn(source.stream.slot_at_start.confirmed_flush_lsn or 0),
                extra={"action": "wal.standby.took_over", "slot": config.slot},
            )
        return source
    return None
