"""`outbox migrate`: versioned migrations, the documented schema, concurrency, the CLI."""

from __future__ import annotations

import subprocess
import sys
import threading
from importlib import resources
from typing import Any

import psycopg
import pytest

from outbox import migrate
from outbox.names import SchemaNames

pytestmark = pytest.mark.integration

CATALOG = {
    "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default,"
    " is_identity FROM information_schema.columns WHERE table_schema = 'public'"
    " AND table_name <> 'outbox_migrations' ORDER BY 1, 2",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    " AND tablename <> 'outbox_migrations' ORDER BY 1, 2",
    "constraints": "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint"
    " WHERE connamespace = 'public'::regnamespace"
    " AND conrelid <> 'outbox_migrations'::regclass ORDER BY 1, 2",
    "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger"
    " WHERE NOT tgisinternal ORDER BY 1, 2",
    "functions": "SELECT proname, pg_get_functiondef(oid) FROM pg_proc"
    " WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
}


def describe(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS outbox_migrations (x int)")
        return {name: conn.execute(query).fetchall() for name, query in CATALOG.items()}


def test_migrations_produce_exactly_the_documented_schema(db_url: str, empty_db_url: str) -> None:
    documented = resources.files("outbox").joinpath("sql/schema.sql").read_text()
    with psycopg.connect(empty_db_url) as conn:
        conn.execute(documented)
        conn.commit()
    assert describe(db_url) == describe(empty_db_url)


def test_up_is_idempotent_and_status_shows_everything_applied(empty_db_url: str) -> None:
    names = SchemaNames()
    with psycopg.connect(empty_db_url) as conn:
        assert not any(s.applied for s in migrate.status(conn, names))
        first = migrate.up(conn, names)
        assert [m.version for m in first] == [m.version for m in migrate.available()]
        assert migrate.up(conn, names) == []
        assert all(s.applied for s in migrate.status(conn, names))


def test_concurrent_ups_apply_each_migration_once(empty_db_url: str) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(empty_db_url) as conn:
                migrate.up(conn, SchemaNames())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(empty_db_url) as conn:
        versions = conn.execute("SELECT version FROM outbox_migrations ORDER BY 1").fetchall()
    assert [v for (v,) in versions] == [m.version for m in migrate.available()]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args], capture_output=True, text=True, env=env,
        timeout=60,
    )


def test_cli_migrate_up_status_and_sql(empty_db_url: str) -> None:
    pending = run_cli("migrate", "status", "--db", empty_db_url)
    assert pending.returncode == 3 and "pending" in pending.stdout
    up = run_cli("migrate", "up", "--db", empty_db_url, "--schema", "app", "--table", "events")
    assert up.returncode == 0, up.stderr
    assert "applied 0001_outbox_table" in up.stdout
    status = run_cli("migrate", "status", "--db", empty_db_url, "--schema", "app",
                     "--table", "events")
    assert status.returncode == 0 and "pending" not in status.stdout
    sql_text = run_cli("migrate", "sql", "--schema", "app", "--table", "events").stdout
    assert 'CREATE TABLE "app"."events"' in sql_text


def test_cli_rejects_bad_names_and_redacts_passwords(empty_db_url: str) -> None:
    bad = run_cli("migrate", "up", "--db", empty_db_url, "--table", "x;drop")
    assert bad.returncode == 1 and "table='x;drop' is not a valid name" in bad.stderr
    unreachable = "postgresql://outbox:s3cret-pw@127.0.0.1:1/outbox"
    failed = run_cli("migrate", "up", "--db", unreachable)
    assert failed.returncode == 1
    assert "cannot connect" in failed.stderr and "s3cret-pw" not in failed.stderr


def test_sql_for_other_tools_records_itself_so_status_agrees(empty_db_url: str) -> None:
    """The Alembic recipe (docs/alembic.md): apply render_all's SQL, then status is clean."""
    names = SchemaNames()
    first, rest = migrate.available()[0], migrate.available()[1:]
    with psycopg.connect(empty_db_url) as conn:
        conn.execute(migrate.render_all(names, with_tracking=True))
        conn.commit()
        assert all(s.applied for s in migrate.status(conn, names))
        assert migrate.up(conn, names) == []
    later = migrate.render_all(names, since=first.version)
    assert f"{first.version:04d}_{first.name}" not in later
    assert all(f"{m.version:04d}_{m.name}" in later for m in rest)
