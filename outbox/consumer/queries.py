"""The inbox SQL (outbox/sql/inbox.sql) in each driver's parameter style; names are composed
with psycopg.sql, so configured names are always quoted."""

from __future__ import annotations

import functools

from psycopg import sql

from outbox import sql_blocks
from outbox.names import SchemaNames


def _inbox_sql(name: str, names: SchemaNames, **parameters: sql.Composable) -> str:
    return sql_blocks.compose("outbox", "inbox.sql", name, names, **parameters).as_string()


@functools.cache
def claim(names: SchemaNames, sqlalchemy: bool = False) -> str:
    if sqlalchemy:
        # text() binds :name parameters and would parse `::`; CAST avoids it.
        consumer, ids = sql.SQL("CAST(:consumer AS text)"), sql.SQL("CAST(:ids AS uuid[])")
    else:
        consumer, ids = sql.SQL("%(consumer)s::text"), sql.SQL("%(ids)s::uuid[]")
    return _inbox_sql("claim", names, consumer=consumer, ids=ids)


@functools.cache
def purge(names: SchemaNames, sqlalchemy: bool = False) -> str:
    if sqlalchemy:
        params = {
            "older_than": sql.SQL("CAST(:older_than AS interval)"),
            "consumer": sql.SQL("CAST(:consumer AS text)"),
            "limit": sql.SQL("CAST(:limit AS int)"),
        }
    else:
        params = {
            "older_than": sql.SQL("%(older_than)s::interval"),
            "consumer": sql.SQL("%(consumer)s::text"),
            "limit": sql.SQL("%(limit)s::int"),
        }
    return _inbox_sql("purge", names, **params)


@functools.cache
def check(names: SchemaNames) -> str:
    return _inbox_sql("check", names)
