"""`Outbox`: records events in the caller's transaction (SQLAlchemy or psycopg, sync or async)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import psycopg
from psycopg.pq import TransactionStatus

from outbox import statements
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
from outbox.tracing import current_traceparent

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

    # -- preparing a batch (no I/O: every check happens before any SQL) ------------------------

    def records(self, events: Sequence[Event]) -> list[OutboxRecord]:
        """Validate and serialise `events`; raises before anything is written."""
        traceparent = current_traceparent() if self.capture_trace_context else None
        records = []
        for event in events:
            if not isinstance(event, Event):
                raise InvalidEventError(f"expected outbox.Event, got {type(event).__name__}")
            payload = event.encode_payload(self.serializer)
            if len(payload) > self.max_payload_bytes:
                raise PayloadTooLargeError(
                    f"payload of {event.event_type} event {event.id} is {len(payload)} bytes; "
                    f"the maximum is {self.max_payload_bytes} (Outbox.max_payload_bytes)"
                )
            headers = dict(event.headers)
            if traceparent and "traceparent" not in headers:
                headers["traceparent"] = traceparent
            records.append(
                OutboxRecord(
                    id=event.id,
                    aggregate_type=event.aggregate_type,
                    aggregate_id=event.aggregate_id,
                    event_type=event.event_type,
                    payload=payload,
                    content_type=event.resolved_content_type,
                    headers=headers,
                    topic=event.topic,
                    created_at=event.created_at,
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
    def publish(self, target: SyncTarget, *events: Event) -> list[uuid.UUID]: ...

    @overload
    def publish(self, target: AsyncTarget, *events: Event) -> Awaitable[list[uuid.UUID]]: ...

    def publish(
        self, target: SyncTarget | AsyncTarget, *events: Event
    ) -> list[uuid.UUID] | Awaitable[list[uuid.UUID]]:
        """Record `events` in `target`'s current transaction; never commits. Returns their ids.

        For an AsyncSession, AsyncConnection or psycopg AsyncConnection the result is awaitable.
        """
        records = self.records(events)
        params = self.parameters(records) if records else {}
        ids = [record.id for record in records]
        if isinstance(target, psycopg.AsyncConnection):
            return self._publish_psycopg_async(target, params, ids)
        if isinstance(target, psycopg.Connection):
            self._check_psycopg(target)
            if params:
                self._run_psycopg(target, params)
            return ids
        if any(cls.__module__.startswith("sqlalchemy.") for cls in type(target).__mro__):
            from outbox import _sqlalchemy

            return _sqlalchemy.publish(self, target, params, ids)
        raise UnsupportedTargetError(
            f"publish needs a SQLAlchemy Session/Connection or a psycopg Connection "
            f"(sync or async), not {type(target).__name__}"
        )

    async def _publish_psycopg_async(
        self, target: psycopg.AsyncConnection[Any], params: dict[str, Any], ids: list[uuid.UUID]
    ) -> list[uuid.UUID]:
        self._check_psycopg(target)
        if params:
            try:
                await target.execute(self.statement(statements.psycopg_placeholder), params)
            except psycopg.errors.UndefinedTable as exc:
                raise SchemaMissingError() from exc
        return ids

    def _check_psycopg(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
        # With autocommit and no `with conn.transaction():` block, each statement would commit
        # alone: the events would no longer be atomic with the business change.
        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            self.refuse_autocommit()

    def refuse_autocommit(self) -> None:
        if not self.allow_autocommit:
            raise AtomicityError()

    def _run_psycopg(self, conn: psycopg.Connection[Any], params: dict[str, Any]) -> None:
        try:
            conn.execute(self.statement(statements.psycopg_placeholder), params)
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaMissingError() from exc


default_outbox = Outbox()


@overload
def publish(target: SyncTarget, *events: Event) -> list[uuid.UUID]: ...


@overload
def publish(target: AsyncTarget, *events: Event) -> Awaitable[list[uuid.UUID]]: ...


def publish(
    target: SyncTarget | AsyncTarget, *events: Event
) -> list[uuid.UUID] | Awaitable[list[uuid.UUID]]:
    """Record `events` in the caller's transaction with the default `Outbox()`."""
    return default_outbox.publish(target, *events)
