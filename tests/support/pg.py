"""PostgreSQL helpers for tests."""

from __future__ import annotations

import psycopg
from psycopg import sql


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        # Replication slots pin a database: drop the test's own slots first.
        admin.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL", [name])
        for (slot,) in admin.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [name]
        ).fetchall():
            admin.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def sqlalchemy_url(conninfo: str, driver: str = "psycopg") -> str:
    """The SQLAlchemy URL (`postgresql+<driver>://`) of a libpq conninfo string."""
    info = psycopg.conninfo.conninfo_to_dict(conninfo)
    return (f"postgresql+{driver}://{info['user']}:{info['password']}@{info['host']}:"
            f"{info['port']}/{info['dbname']}")
