"""Binary COPY of outbox records: psycopg's fastest way to insert a batch into the outbox table.

Used for the table created by `outbox migrate`, whose column types are known exactly (binary COPY
does not cast). Tables in another layout (a Debezium column mapping) keep `INSERT ... unnest`,
which lets PostgreSQL cast to whatever types those columns have.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import set_json_dumps

from outbox import statements
from outbox.record import OutboxRecord

# Smallest batch worth a COPY: below it, INSERT's single round trip wins.
MIN_EVENTS = 4

# The type of each column, in OutboxRecord's field order: records are written as they are
# (tests/unit/test_copy_rows.py checks that the two orders agree).
COLUMN_TYPES = {
    "id": "uuid",
    "aggregate_type": "text",
    "aggregate_id": "text",
    "event_type": "text",
    "payload": "bytea",
    "content_type": "text",
    "headers": "jsonb",
    "topic": "text",
    "created_at": "timestamptz",
}

_headers_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _dump_headers(headers: Mapping[str, str]) -> str:
    # Most events have no headers; skip the encoder for them.
    return _headers_encoder.encode(dict(headers)) if headers else "{}"


@functools.cache
def copy_statement(schema: str, table: str) -> str:
    """Block copy_events of outbox/sql/writer.sql for `schema.table`, built once per table."""
    return statements.writer_block(
        "copy_events", schema, table, columns=statements.column_list(list(COLUMN_TYPES)))


def copy_records(
    conn: psycopg.Connection[Any], statement: str, records: Sequence[OutboxRecord]
) -> None:
    with conn.cursor() as cursor:
        # Cursor-level JSON dumping: the application's own adapters are left untouched.
        set_json_dumps(_dump_headers, cursor)
        with cursor.copy(statement) as copy:
            copy.set_types(list(COLUMN_TYPES.values()))
            for record in records:
                copy.write_row(record)


async def copy_records_async(
    conn: psycopg.AsyncConnection[Any], statement: str, records: Sequence[OutboxRecord]
) -> None:
    async with conn.cursor() as cursor:
        set_json_dumps(_dump_headers, cursor)
        async with cursor.copy(statement) as copy:
            copy.set_types(list(COLUMN_TYPES.values()))
            for record in records:
                await copy.write_row(record)
