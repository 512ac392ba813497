"""Versioned, append-only SQL migrations of the outbox schema (applied by `outbox migrate up`).

Files are `NNNN_name.sql`. Names in braces are identifiers composed with psycopg.sql:
{schema}, {table} (the outbox table), {parked_table}, {inbox_table}, {notify_function},
{notify_trigger}, {channel}; a literal brace is doubled. Never edit an applied file: add one.
"""
