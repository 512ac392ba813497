"""The statements the write side runs: named blocks of `outbox/sql/writer.sql`, composed with
psycopg.sql so configured names are always quoted.

Each is built once per (names, columns, placeholder style) and cached: publishing only binds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from psycopg import sql

from outbox import sql_blocks
from outbox.columns import ColumnMapping

# Element types of the arrays the events are sent in (one array per column present).
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


def writer_block(name: str, schema: str, table: str, **parts: sql.Composable) -> str:
    """Block `name` of writer.sql for the table `schema.table`, as the text a driver runs."""
    return sql_blocks.block("outbox", "writer.sql", name).format(
        schema=sql.Identifier(schema), table=sql.Identifier(table), **parts).as_string()


def column_list(columns: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, columns))


@functools.cache
def insert_events(
    schema: str, table: str, columns: ColumnMapping, placeholder: Placeholder
) -> str:
    present = columns.present()
    types = {**_FIELD_TYPES, "payload": columns.payload_type}
    return writer_block(
        "insert_events", schema, table,
        columns=column_list(list(present.values())),
        arrays=sql.SQL(", ").join(placeholder(name, types[name]) for name in present),
    )


@functools.cache
def emit_messages(placeholder: Placeholder) -> str:
    prefix = (sql.SQL("CAST(:prefix AS text)") if placeholder is sqlalchemy_placeholder
              else sql.Placeholder("prefix"))
    return sql_blocks.block("outbox", "writer.sql", "emit_messages").format(
        prefix=prefix, messages=placeholder("messages", "bytea")).as_string()
