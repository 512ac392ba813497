"""What the relays ask PostgreSQL's catalog at start-up: does a table exist, may this role do
something with it, what types are its columns (relay/sql/catalog.sql)."""

from __future__ import annotations

from typing import Any

import psycopg

from outbox.names import SchemaNames
from relay import queries

_NAMES = SchemaNames()


def _ask(conn: psycopg.Connection[Any], name: str, **values: str) -> Any:
    row = conn.execute(queries.query("catalog.sql", name, _NAMES), values).fetchone()
    return row[0] if row else None


def qualified(conn: psycopg.Connection[Any], names: SchemaNames, table: str) -> str:
    """`"schema"."table"`, as the catalog functions take it."""
    return names.qualified(table).as_string(conn)


def table_exists(conn: psycopg.Connection[Any], table: str) -> bool:
    return bool(_ask(conn, "table_exists", table=table))


def may(
    conn: psycopg.Connection[Any], table: str, privilege: str, column: str | None = None
) -> bool:
    """Whether the connected role holds `privilege` on `table` (or on its `column`)."""
    if column is None:
        return bool(_ask(conn, "may", table=table, privilege=privilege))
    return bool(_ask(conn, "may_on_column", table=table, column=column, privilege=privilege))


def column_types(conn: psycopg.Connection[Any], table: str) -> dict[str, str]:
    rows = conn.execute(
        queries.query("catalog.sql", "column_types", _NAMES), {"table": table}).fetchall()
    return {str(name): str(kind) for name, kind in rows}
