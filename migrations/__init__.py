"""Versioned, append-only SQL migrations of the outbox schema (applied by `outbox migrate up`).

Files are `NNNN_name.sql`. Names in braces are identifiers composed with psycopg.sql:
{schema}, {table} (the outbox table), {parked_table}, {inbox_table}, {notify_function},
{notify_trigger}, {channel}; a literal brace is doubled. Never edit an applied file: add one.

`<layout>_NNNN_name.sql` replaces version NNNN for a table of another layout (`outbox migrate
up --columns debezium`): `debezium_0001` adds the polling relay's bookkeeping to an existing
Debezium table instead of creating one; the later native files apply to every layout, so a
native file that changes the outbox table's columns needs its Debezium twin.

`shards_NNNN_name.sql` is applied only by `outbox migrate up --shards N` (after the others), with
{shards} the count N; it is recorded like the others, and N in the table it creates.
"""
