"""The binary COPY writes records as they are: its column list must follow OutboxRecord."""

from outbox import copy_rows
from outbox.record import OutboxRecord


def test_copy_columns_follow_the_record_fields() -> None:
    assert tuple(copy_rows.COLUMN_TYPES) == OutboxRecord._fields


def test_copy_statement_quotes_configured_names() -> None:
    statement = copy_rows.copy_statement("my schema", 'out"box')
    assert statement.startswith('COPY "my schema"."out""box" ("id", "aggregate_type"')
    assert statement.endswith("FROM STDIN (FORMAT BINARY)")


def test_headers_are_compact_json() -> None:
    assert copy_rows._dump_headers({}) == "{}"
    assert copy_rows._dump_headers({"a": "é"}) == '{"a":"é"}'
