"""The SQL the write side runs, composed with psycopg.sql so configured names are always quoted."""

from __future__ import annotations

import functools
from collections.abc import Callable

from psycopg import sql

from outbox.columns import ColumnMapping

# Element types of the arrays the events are sent in: one round trip per batch, however many
# events (unnest keeps the order of the arrays, so rows are inserted in the order given).
_FIELD_TYPES = {
    "id": "uuid",
    "aggregate_type": "text",
    "aggregate_id": "text",
    "event_type": "text",
    "topic": "text",
    "content_type": "text",
    "headers": "jsonb",
    "created_at": "timestamptz",
}

Placeholder = Callable[[str, str], sql.Composable]


def psycopg_placeholder(name: str, pg_type: str) -> sql.Composable:
    return sql.SQL("{}::{}[]").format(sql.Placeholder(name), sql.SQL(pg_type))


def sqlalchemy_placeholder(name: str, pg_type: str) -> sql.Composable:
    # SQLAlchemy's text() uses :name parameters; CAST(...) avoids the `::` that text() parses.
    return sql.SQL("CAST(:{} AS {}[])").format(sql.SQL(name), sql.SQL(pg_type))


@functools.cache
def insert_events(
    schema: str, table: str, columns: ColumnMapping, placeholder: Placeholder
) -> str:
    present = columns.present()
    types = {**_FIELD_TYPES, "payload": columns.payload_type}
    query = sql.SQL("INSERT INTO {table} ({columns}) SELECT * FROM unnest({arrays})").format(
        table=sql.Identifier(schema, table),
        columns=sql.SQL(", ").join(sql.Identifier(col) for col in present.values()),
        arrays=sql.SQL(", ").join(placeholder(name, types[name]) for name in present),
    )
    return query.as_string()


@functools.cache
def emit_messages(placeholder: Placeholder) -> str:
    # transactional=true: the message is decoded only if, and when, the transaction commits.
    query = sql.SQL(
        "SELECT count(pg_logical_emit_message(true, {prefix}, m)) FROM unnest({messages}) AS m"
    ).format(
        prefix=sql.SQL("CAST(:prefix AS text)")
        if placeholder is sqlalchemy_placeholder
        else sql.Placeholder("prefix"),
        messages=placeholder("messages", "bytea"),
    )
    return query.as_string()
