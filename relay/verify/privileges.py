"""Before `outbox verify` creates anything: may this role and server run it? Every missing
right or setting is named, with the statement that grants it (facts gathered, then plain checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from outbox.names import SchemaNames
from relay import queries


@dataclass(frozen=True)
class VerifyFacts:
    role: str
    database: str
    superuser: bool
    replication: bool
    schema_exists: bool
    schema_usage: bool
    schema_create: bool
    database_create: bool
    migrations_table_exists: bool
    migrations_select: bool
    migrations_insert: bool
    migrations_delete: bool
    settings: dict[str, str]  # wal_level, max_replication_slots, max_wal_senders
    slots_used: int
    senders_used: int


def gather(conn: psycopg.Connection[Any], names: SchemaNames) -> VerifyFacts:
    """Read the facts with `conn` (the role verify runs as); reads only, takes no lock."""
    row = conn.execute(
        queries.query("verify.sql", "role", names),
        {"schema": names.schema, "migrations_table": names.migrations_table},
    ).fetchone()
    assert row is not None  # current_user is always a role
    settings = {
        str(name): str(setting)
        for name, setting, _unit in conn.execute(
            queries.query("ops.sql", "settings", names)).fetchall()
    }
    slots_used, senders_used = conn.execute(
        queries.query("ops.sql", "replication_usage", names)).fetchone() or (0, 0)
    flags = [bool(value) for value in row[2:]]
    return VerifyFacts(
        str(row[0]), str(row[1]), superuser=flags[0], replication=flags[1], schema_exists=flags[2],
        schema_usage=flags[3], schema_create=flags[4], database_create=flags[5],
        migrations_table_exists=flags[6], migrations_select=flags[7],
        migrations_insert=flags[8], migrations_delete=flags[9], settings=settings,
        slots_used=int(slots_used), senders_used=int(senders_used))


def missing(facts: VerifyFacts, names: SchemaNames, *, wal: bool) -> list[str]:
    """What stops a run, one line each with its fix; empty when nothing does."""
    role = sql.Identifier(facts.role).as_string()
    schema = sql.Identifier(names.schema).as_string()
    found: list[str] = []
    if not facts.schema_exists:
        found.append(f"schema {names.schema} does not exist (CREATE SCHEMA {schema}, or pass "
                     "--schema)")
    elif not (facts.schema_usage and facts.schema_create):
        found.append(
            f"role {facts.role} may not create its scratch outbox table in schema "
            f"{names.schema}: GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
    if facts.migrations_table_exists and not facts.superuser and not (
        facts.migrations_select and facts.migrations_insert and facts.migrations_delete
    ):
        table = f"{schema}.{sql.Identifier(names.migrations_table).as_string()}"
        found.append(
            f"role {facts.role} may not record and remove the scratch table's migrations: "
            f"GRANT SELECT, INSERT, DELETE ON {table} TO {role}")
    if not facts.database_create:
        # The migrations start with CREATE SCHEMA IF NOT EXISTS, which PostgreSQL checks
        # against the database's CREATE right even when the schema exists.
        what = "run the migrations (and create the scratch publication)" if wal else (
            "run the migrations")
        found.append(
            f"role {facts.role} may not {what} for its scratch table: GRANT CREATE ON DATABASE "
            f"{sql.Identifier(facts.database).as_string()} TO {role}")
    if not wal:
        return found
    if facts.settings.get("wal_level") != "logical":
        found.append(f"wal_level is {facts.settings.get('wal_level', '?')}, logical decoding "
                     "needs 'logical' (ALTER SYSTEM SET wal_level = logical; restart)")
    if not (facts.superuser or facts.replication):
        found.append(f"role {facts.role} lacks REPLICATION (to create and read a slot): "
                     f"ALTER ROLE {role} WITH REPLICATION")
    slots_total = int(facts.settings.get("max_replication_slots", "0"))
    if slots_total - facts.slots_used < 1:
        found.append(f"no free replication slot for the scratch slot: {facts.slots_used} of "
                     f"{slots_total} in use (max_replication_slots)")
    senders_total = int(facts.settings.get("max_wal_senders", "0"))
    # One for the relay, one more while the server notices that a killed relay's is gone.
    if senders_total - facts.senders_used < 2:
        found.append(f"fewer than 2 free WAL senders: {facts.senders_used} of {senders_total} "
                     "in use (max_wal_senders)")
    return found
