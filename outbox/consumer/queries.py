"""The inbox SQL, composed with psycopg.sql so that configured names are always quoted."""

from __future__ import annotations

import functools

from psycopg import sql

from outbox.names import SchemaNames

# Ordered inserts take the rows' locks in one order, so two consumers that claim overlapping
# batches during a rebalance wait for each other instead of deadlocking. A concurrent claim of
# the same id waits for the other transaction and then, if it committed, inserts nothing.
_CLAIM = (
    "INSERT INTO {inbox} (consumer, event_id)"
    " SELECT {consumer}, id FROM unnest({ids}) AS claimed(id) ORDER BY id"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)

# Deletes in chunks so that a large purge never holds one long transaction.
_PURGE = (
    "DELETE FROM {inbox} AS i USING ("
    " SELECT consumer, event_id FROM {inbox}"
    " WHERE processed_at < now() - {older_than} AND ({consumer} IS NULL OR consumer = {consumer})"
    " LIMIT {limit}) AS old"
    " WHERE i.consumer = old.consumer AND i.event_id = old.event_id"
)

_CHECK = "SELECT consumer, event_id, processed_at FROM {inbox} LIMIT 0"


def _inbox(names: SchemaNames) -> sql.Identifier:
    return names.qualified(names.inbox_table)


@functools.cache
def claim(names: SchemaNames, sqlalchemy: bool = False) -> str:
    if sqlalchemy:
        # text() binds :name parameters and would parse `::`; CAST avoids it.
        consumer, ids = sql.SQL("CAST(:consumer AS text)"), sql.SQL("CAST(:ids AS uuid[])")
    else:
        consumer, ids = sql.SQL("%(consumer)s::text"), sql.SQL("%(ids)s::uuid[]")
    return sql.SQL(_CLAIM).format(inbox=_inbox(names), consumer=consumer, ids=ids).as_string()


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
    return sql.SQL(_PURGE).format(inbox=_inbox(names), **params).as_string()


@functools.cache
def check(names: SchemaNames) -> str:
    return sql.SQL(_CHECK).format(inbox=_inbox(names)).as_string()
