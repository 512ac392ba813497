"""`Outbox`: records events in the caller's transaction (SQLAlchemy or psycopg, sync or async)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import psycopg
from psycopg.pq import TransactionStatus

from outbox import copy_rows, sequences, statements
from outbox.columns import ColumnMapping
from outbox.errors import (
    AtomicityError,
    ConfigurationError,
    InvalidEventError,
    PayloadTooLargeError,
    SchemaMissingError,
    UnsupportedTargetError,
)
from outbox.event import Event, Serializer, json_serializer
from outbox.identifiers import check_identifier
from outbox.record import OutboxRecord
from outbox.tracing import current_trace_headers, with_trace_headers

if TYPE_CHECKING:
    # SQLAlchemy is imported only when a SQLAlchemy target is used (outbox/_sqlalchemy.py):
    # the relay daemon, which never writes, is spared its memory.
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    SyncTarget: TypeAlias = Session | SAConnection | psycopg.Connection[Any]
    AsyncTarget: TypeAlias = AsyncSession | SAAsyncConnection | psycopg.AsyncConnection[Any]

WriteMode = Literal["table", "message"]

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Outbox:
    """Where and how events are recorded.

    mode="table" inserts rows into `schema.table` (read by the polling and WAL relays);
    mode="message" writes `pg_logical_emit_message(true, message_prefix, ...)` so the event exists
    only in the WAL (WAL relay only: no table, no bloat).

    sequence=True numbers each event within its aggregate (1, 2, ... per aggregate_type and
    aggregate_id, gap-free over committed transactions) in the `sequence` header, from a counter
    row (`<table>_sequence`, migration 0007) bumped in the caller's transaction: writers of one
    aggregate wait for each other's commit, others never wait (outbox/sequences.py).
    """

    schema: str = "public"
    table: str = "outbox"
    mode: WriteMode = "table"
    message_prefix: str = "outbox"
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    serializer: Serializer = json_serializer
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    allow_autocommit: bool = False
    capture_trace_context: bool = True
    sequence: bool = False

    def __post_init__(self) -> None:
        check_identifier(self.schema, "schema")
        check_identifier(self.table, "table")
        if self.mode not in ("table", "message"):
            raise ConfigurationError(f"mode={self.mode!r}: choose 'table' or 'message'")
        if not self.message_prefix or "\x00" in self.message_prefix:
            raise ConfigurationError("message_prefix must be a non-empty string without NUL")
        if not isinstance(self.max_payload_bytes, int) or self.max_payload_bytes <= 0:
            raise ConfigurationError(
                f"max_payload_bytes={self.max_payload_bytes!r} must be a positive integer"
            )
        if self.mode == "message" and not self.columns.is_native:
            raise ConfigurationError("a column mapping only applies to mode='table'")
        if self.sequence and self.mode == "table" and self.columns.headers is None:
            raise ConfigurationError(
                "sequence=True sends the number in the event's headers, and this column mapping "
                "has no headers column"
            )
        if self.sequence and len(self.table) + len("_sequence") > 63:
            raise ConfigurationError(
                f"table={self.table!r} is too long for sequence=True: its counter table "
                f"{self.table}_sequence would pass PostgreSQL's 63-byte limit"
            )

    # -- preparing a batch (no I/O: every check happens before any SQL) ------------------------

    def records(self, events: Sequence[Event | Any]) -> list[OutboxRecord]:
        """Validate and serialise `events` (outbox.Event, or instances of classes declared
        with `@outbox.event_type`); raises before anything is written."""
        trace = current_trace_headers() if self.capture_trace_context else {}
        serializer, max_bytes = self.serializer, self.max_payload_bytes
        records = []
        for event in events:
            if not isinstance(event, Event):
                # A typed-event instance (or an error naming what was expected).
                event = Event.of(event)
            payload = event.encode_payload(serializer)
            if len(payload) > max_bytes:
                raise PayloadTooLargeError(
                    f"payload of {event.event_type} event {event.id} is {len(payload)} bytes; "
                    f"the maximum is {max_bytes} (Outbox.max_payload_bytes)"
                )
            # The event's own copy, never changed: safe to share when there is no context.
            headers = with_trace_headers(event.headers, trace)
            records.append(
                OutboxRecord(
                    event.id,
                    event.aggregate_type,
                    event.aggregate_id,
                    event.event_type,
                    payload,
                    event.resolved_content_type,
                    headers,
                    event.topic,
                    event.created_at,
                )
            )
        return records

    def parameters(self, records: Sequence[OutboxRecord]) -> dict[str, Any]:
        if self.mode == "message":
            return {
                "prefix": self.message_prefix,
                "messages": [record.encode_message() for record in records],
            }
        params: dict[str, Any] = {}
        for name in self.columns.present():
            if name == "payload":
                params[name] = [self._payload_value(record) for record in records]
            elif name == "headers":
                params[name] = [json.dumps(dict(record.headers)) for record in records]
            else:
                params[name] = [getattr(record, name) for record in records]
        return params

    def _payload_value(self, record: OutboxRecord) -> bytes | str:
        if self.columns.payload_type == "bytea":
            return record.payload
        try:
            text_value = record.payload.decode()
            if self.columns.payload_type != "text":
                json.loads(text_value)
        except ValueError as exc:
            raise InvalidEventError(
                f"the outbox payload column is {self.columns.payload_type}, but the payload of "
                f"{record.event_type} event {record.id} is not JSON text: {exc}"
            ) from exc
        return text_value

    def statement(self, placeholder: statements.Placeholder) -> str:
        if self.mode == "message":
            return statements.emit_messages(placeholder)
        return statements.insert_events(self.schema, self.table, self.columns, placeholder)

    # -- writing ---------------------------------------------------------------------------------

    @overload
    def publish(self, target: SyncTarget, *events: Event | Any) -> list[uuid.UUID]: ...

    @overload
    def publish(self, target: AsyncTarget, *events: Event | Any) -> Awaitable[list[uuid.UUID]]: ...

    def publish(
        self, target: SyncTarget | AsyncTarget, *events: Event | Any
    ) -> list[uuid.UUID] | Awaitable[list[uuid.UUID]]:
        """Record `events` in `target`'s current transaction; never commits. Returns their ids.

        For an AsyncSession, AsyncConnection or psycopg AsyncConnection the result is awaitable.
        All events of a call go in one statement: an INSERT (one round trip) for up to 3, a
        binary COPY (two round trips, however many events) from 4 on, on psycopg connections
        and SQLAlchemy ones over psycopg.
        """
        records = self.records(events)
        ids = [record.id for record in records]
        if isinstance(target, psycopg.AsyncConnection):
            return self._publish_psycopg_async(target, records, ids)
        if isinstance(target, psycopg.Connection):
            self._check_psycopg(target)
            if records:
                self.write_psycopg(target, records)
            return ids
        if any(cls.__module__.startswith("sqlalchemy.") for cls in type(target).__mro__):
            from outbox import _sqlalchemy

            return _sqlalchemy.publish(self, target, records, ids)
        raise UnsupportedTargetError(
            f"publish needs a SQLAlchemy Session/Connection or a psycopg Connection "
            f"(sync or async), not {type(target).__name__}"
        )

    async def _publish_psycopg_async(
        self,
        target: psycopg.AsyncConnection[Any],
        records: list[OutboxRecord],
        ids: list[uuid.UUID],
    ) -> list[uuid.UUID]:
        self._check_psycopg(target)
        if records:
            await self.write_psycopg_async(target, records)
        return ids

    def copies(self, records: Sequence[OutboxRecord]) -> bool:
        """Whether `records` go in with binary COPY rather than INSERT.

        COPY needs the exact column types of the table `outbox migrate` creates. It takes two
        round trips to INSERT's one and is cheaper per row: from about 4 events on it is the
        faster (docs/performance.md).
        """
        return (
            len(records) >= copy_rows.MIN_EVENTS
            and self.mode == "table"
            and self.columns.is_native
        )

    def write_psycopg(self, conn: psycopg.Connection[Any], records: list[OutboxRecord]) -> None:
        try:
            if self.sequence:
                batch = sequences.counts(records)
                query = sequences.next_sequences(
                    self.schema, self.table, statements.psycopg_placeholder)
                rows = conn.execute(query, sequences.parameters(batch)).fetchall()
                records = sequences.numbered(records, batch, rows)
            if self.copies(records):
                statement = copy_rows.copy_statement(self.schema, self.table)
                copy_rows.copy_records(conn, statement, records)
            else:
                query = self.statement(statements.psycopg_placeholder)
                conn.execute(query, self.parameters(records))
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaMissingError() from exc

    async def write_psycopg_async(
        self, conn: psycopg.AsyncConnection[Any], records: list[OutboxRecord]
    ) -> None:
        try:
            if self.sequence:
                batch = sequences.counts(records)
                query = sequences.next_sequences(
                    self.schema, self.table, statements.psycopg_placeholder)
                cursor = await conn.execute(query, sequences.parameters(batch))
                records = sequences.numbered(records, batch, await cursor.fetchall())
            if self.copies(records):
                statement = copy_rows.copy_statement(self.schema, self.table)
                await copy_rows.copy_records_async(conn, statement, records)
            else:
                query = self.statement(statements.psycopg_placeholder)
                await conn.execute(query, self.parameters(records))
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaMissingError() from exc

    def _check_psycopg(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
        # With autocommit and no `with conn.transaction():` block, each statement would commit
        # alone: the events would no longer be atomic with the business change.
        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            self.refuse_autocommit()

    def refuse_autocommit(self) -> None:
        if not self.allow_autocommit:
            raise AtomicityError()


default_outbox = Outbox()


@overload
def publish(target: SyncTarget, *events: Event | Any) -> list[uuid.UUID]: ...


@overload
def publish(target: AsyncTarget, *events: Event | Any) -> Awaitable[list[uuid.UUID]]: ...


def publish(
    target: SyncTarget | AsyncTarget, *events: Event | Any
) -> list[uuid.UUID] | Awaitable[list[uuid.UUID]]:
    """Record `events` in the caller's transaction with the default `Outbox()`."""
    return default_outbox.publish(target, *events)
