"""The SQLAlchemy adapter of `Outbox.publish`: Session/Connection, sync or asyncio.

Imported on first use, so that processes that never write through SQLAlchemy (the relay) do not
load it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, cast

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from outbox import extras, sequences, statements
from outbox.errors import SchemaMissingError, UnsupportedTargetError

if TYPE_CHECKING:
    # Not imported at run time: it needs greenlet, which sync users need not install.
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    from outbox.record import OutboxRecord
    from outbox.writer import Outbox

UNDEFINED_TABLE = "42P01"


def publish(
    outbox: Outbox, target: Any, records: list[OutboxRecord], ids: list[uuid.UUID]
) -> list[uuid.UUID] | Awaitable[list[uuid.UUID]]:
    if extras.is_sqlalchemy_asyncio(target):
        return _publish_async(outbox, target, records, ids)
    if not isinstance(target, Session | Connection):
        raise UnsupportedTargetError(
            f"publish needs a SQLAlchemy Session or Connection, not {type(target).__name__}"
        )
    connection = target.connection() if isinstance(target, Session) else target
    driver = connection.connection.driver_connection
    _check_autocommit(outbox, connection.get_execution_options(), driver)
    if not records:
        return ids
    if isinstance(driver, psycopg.Connection) and outbox.copies(records):
        # The psycopg connection under SQLAlchemy is in the same transaction: the fast path.
        outbox.write_psycopg(driver, records)
        return ids
    try:
        if outbox.sequence:
            batch = sequences.counts(records)
            rows = connection.execute(
                text(sequences.next_sequences(
                    outbox.schema, outbox.table, statements.sqlalchemy_placeholder)),
                sequences.parameters(batch),
            ).all()
            records = sequences.numbered(records, batch, rows)
        connection.execute(
            text(outbox.statement(statements.sqlalchemy_placeholder)), outbox.parameters(records)
        )
    except DBAPIError as exc:
        _raise_schema_missing(exc)
        raise
    return ids


async def _publish_async(
    outbox: Outbox,
    target: AsyncSession | AsyncConnection,
    records: list[OutboxRecord],
    ids: list[uuid.UUID],
) -> list[uuid.UUID]:
    asyncio_layer = extras.sqlalchemy_asyncio()  # a clear error when greenlet is missing
    connection: AsyncConnection = (
        await target.connection() if isinstance(target, asyncio_layer.AsyncSession)
        else cast("AsyncConnection", target))
    sync = connection.sync_connection
    options = sync.get_execution_options() if sync is not None else {}
    driver = (await connection.get_raw_connection()).driver_connection
    _check_autocommit(outbox, options, driver)
    if not records:
        return ids
    if isinstance(driver, psycopg.AsyncConnection) and outbox.copies(records):
        await outbox.write_psycopg_async(driver, records)
        return ids
    try:
        if outbox.sequence:
            batch = sequences.counts(records)
            result = await connection.execute(
                text(sequences.next_sequences(
                    outbox.schema, outbox.table, statements.sqlalchemy_placeholder)),
                sequences.parameters(batch),
            )
            records = sequences.numbered(records, batch, result.all())
        await connection.execute(
            text(outbox.statement(statements.sqlalchemy_placeholder)), outbox.parameters(records)
        )
    except DBAPIError as exc:
        _raise_schema_missing(exc)
        raise
    return ids


def _check_autocommit(outbox: Outbox, options: Mapping[str, Any], driver: Any) -> None:
    # AUTOCOMMIT isolation (engine- or connection-level) commits each statement alone.
    if options.get("isolation_level") == "AUTOCOMMIT" or getattr(driver, "autocommit", False):
        outbox.refuse_autocommit()


def _raise_schema_missing(exc: DBAPIError) -> None:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if code == UNDEFINED_TABLE:
        raise SchemaMissingError() from exc
