"""The daemon's SQL: named blocks of `relay/sql/*.sql`, read by outbox.sql_blocks."""

from __future__ import annotations

import functools

from psycopg import sql

from outbox import sql_blocks
from outbox.names import SchemaNames


@functools.cache
def query(filename: str, name: str, names: SchemaNames) -> sql.Composed:
    """Block `name` of `relay/sql/<filename>` with the identifiers of `names` filled in."""
    return sql_blocks.compose("relay", filename, name, names)


def compose(filename: str, name: str, names: SchemaNames, **extra: sql.Composable) -> sql.Composed:
    """Block `name` with the identifiers of `names` and the caller's `extra` placeholders
    (composed with psycopg.sql too); not cached: the caller keeps what it builds."""
    return sql_blocks.compose("relay", filename, name, names, **extra)
