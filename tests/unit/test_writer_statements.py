"""The write side's statements: blocks of outbox/sql/writer.sql with quoted names, built once."""

from __future__ import annotations

from outbox import statements
from outbox.columns import ColumnMapping


def test_insert_quotes_configured_names_and_binds_one_array_per_column() -> None:
    query = statements.insert_events(
        "app", 'out"box', ColumnMapping.debezium(), statements.psycopg_placeholder)
    assert query == (
        'INSERT INTO "app"."out""box" ("id", "aggregatetype", "aggregateid", "type", "payload")'
        " SELECT * FROM unnest(%(id)s::uuid[], %(aggregate_type)s::text[],"
        " %(aggregate_id)s::text[], %(event_type)s::text[], %(payload)s::jsonb[])")


def test_sqlalchemy_statements_use_its_parameter_style() -> None:
    query = statements.emit_messages(statements.sqlalchemy_placeholder)
    assert query == ("SELECT count(pg_logical_emit_message(true, CAST(:prefix AS text), m))"
                     " FROM unnest(CAST(:messages AS bytea[])) AS m")
    assert statements.emit_messages(statements.psycopg_placeholder).startswith(
        "SELECT count(pg_logical_emit_message(true, %(prefix)s, m))")


def test_statements_are_built_once_per_table_and_layout() -> None:
    first = statements.insert_events("public", "outbox", ColumnMapping(),
                                     statements.psycopg_placeholder)
    again = statements.insert_events("public", "outbox", ColumnMapping(),
                                     statements.psycopg_placeholder)
    assert first is again
