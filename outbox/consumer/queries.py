"""The inbox SQL (outbox/sql/inbox.sql) in each driver's parameter style; names are composed
with psycopg.sql, so configured names are always quoted."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

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


def _arrays(sqlalchemy: bool, **types: str) -> dict[str, sql.Composable]:
    """Parameters `name` of element type `type` (arrays but for `consumer`), in the driver's
    style."""
    def one(name: str, pg_type: str) -> sql.Composable:
        if sqlalchemy:
            return sql.SQL("CAST(:{} AS {})").format(sql.SQL(name), sql.SQL(pg_type))
        return sql.SQL("{}::{}").format(sql.Placeholder(name), sql.SQL(pg_type))

    return {name: one(name, pg_type) for name, pg_type in types.items()}


@functools.cache
def read_sequences(names: SchemaNames, sqlalchemy: bool = False) -> str:
    return _inbox_sql("read_sequences", names, **_arrays(
        sqlalchemy, consumer="text", types="text[]", ids="text[]"))


@functools.cache
def save_sequences(names: SchemaNames, sqlalchemy: bool = False) -> str:
    return _inbox_sql("save_sequences", names, **_arrays(
        sqlalchemy, consumer="text", types="text[]", ids="text[]", numbers="bigint[]"))


def sequence_parameters(
    consumer: str, keys: Sequence[tuple[str, str]], numbers: Sequence[int] | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {"consumer": consumer, "types": [key[0] for key in keys],
                              "ids": [key[1] for key in keys]}
    if numbers is not None:
        params["numbers"] = list(numbers)
    return params


@functools.cache
def check_sequences(names: SchemaNames) -> str:
    return _inbox_sql("check_sequences", names)


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
