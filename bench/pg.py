"""A fresh PostgreSQL database per phase, with the outbox schema, dropped with its slots after."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from outbox import migrate
from outbox.names import SchemaNames


@dataclass(frozen=True)
class Database:
    admin_url: str
    name: str

    @property
    def url(self) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_url, dbname=self.name)

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=autocommit, connect_timeout=10)

    @classmethod
    def create(cls, admin_url: str, label: str) -> Database:
        """A new database named after the phase, migrated to the current outbox schema."""
        name = f"bench_{label.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        database = cls(admin_url, name)
        with database.connect(autocommit=False) as conn:
            migrate.up(conn, SchemaNames())
        return database

    def drop(self) -> None:
        """Drop the database; replication slots pin a database, so drop its slots first."""
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE database = %s AND active_pid IS NOT NULL", [self.name])
            slots = admin.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [self.name]
            ).fetchall()
            for (slot,) in slots:
                # A terminated WAL sender takes a moment to let go of its slot.
                deadline = time.monotonic() + 15
                while True:
                    try:
                        admin.execute("SELECT pg_drop_replication_slot(%s)", [slot])
                        break
                    except psycopg.errors.ObjectInUse:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.name)))
