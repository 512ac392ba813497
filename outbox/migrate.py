"""Applies the versioned SQL migrations shipped in `outbox.migrations`, and reports their state."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from outbox import sql_blocks
from outbox.columns import LAYOUTS
from outbox.errors import ConfigurationError, MigrationError
from outbox.names import SchemaNames

# `NNNN_name.sql` for the native layout; `<layout>_NNNN_name.sql` replaces the native file of
# that version for a table of another layout (migrations/__init__.py).
_FILENAME = re.compile(r"^(?:([a-z]+)_)?(\d{4})_([a-z0-9_]+)\.sql$")
# One lock for every `migrate up` on the cluster (outbox/sql/migrate.sql, lock).
_ADVISORY_LOCK_KEY = 0x6F7574626F78  # "outbox"
# `shards_NNNN_name.sql` is applied only with `--shards N` (not a layout: `available` skips it).
_SHARDS_PREFIX = "shards"
# Each shard is an advisory lock and a line of `outbox status`; more would only add overhead.
MAX_SHARDS = 1024
# Where a change of the shard count is explained (the errors point to it).
RESIZE_DOC = "docs/operations.md, section \"Sharded outbox\""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    template: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()

    def render(self, names: SchemaNames, shards: int | None = None) -> sql.Composed:
        extra = {} if shards is None else {"shards": sql.Literal(shards)}
        return sql.SQL(self.template).format(**names.identifiers(), **extra)


@dataclass(frozen=True)
class MigrationState:
    migration: Migration
    applied_at: str | None

    @property
    def applied(self) -> bool:
        return self.applied_at is not None


def available(columns: str = "native") -> list[Migration]:
    """The migrations of a table of layout `columns` (see outbox.columns.LAYOUTS), in version
    order: the native files, each replaced by the layout's own file of that version if any."""
    if columns not in LAYOUTS:
        raise ConfigurationError(f"columns={columns!r}: choose one of {', '.join(LAYOUTS)}")
    native: list[Migration] = []
    own: dict[int, Migration] = {}
    for entry in resources.files("outbox.migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if not match or match[1] not in (None, columns):
            continue
        migration = Migration(int(match[2]), match[3], entry.read_text(encoding="utf-8"))
        if match[1] is None:
            native.append(migration)
        else:
            own[migration.version] = migration
    versions = [m.version for m in native]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    found = [own.pop(m.version, m) for m in native] + list(own.values())
    found.sort(key=lambda m: m.version)
    return found


def sharding() -> Migration:
    """The migration that makes an outbox sharded (`migrate up --shards N`)."""
    for entry in resources.files("outbox.migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match and match[1] == _SHARDS_PREFIX:
            return Migration(int(match[2]), match[3], entry.read_text(encoding="utf-8"))
    raise MigrationError("the sharding migration file is missing from the package")


def check_shards(shards: int | None, columns: str = "native") -> None:
    """Refuse a shard count out of range, or sharding a table of another layout."""
    if shards is None:
        return
    if not 1 <= shards <= MAX_SHARDS:
        raise ConfigurationError(f"shards={shards}: give a count from 1 to {MAX_SHARDS}")
    if columns != "native":
        raise ConfigurationError(
            f"shards with columns={columns!r}: only an outbox created by `outbox migrate up` "
            "(the native layout) can be sharded; Debezium's table is read by one relay")


def shard_count(conn: psycopg.Connection[Any], names: SchemaNames) -> int | None:
    """How many shards the outbox has (None: it is not sharded)."""
    row = conn.execute(
        _query("tracking_exists", names),
        {"table": names.qualified(names.shards_table).as_string(conn)},
    ).fetchone()
    if not (row and row[0]):
        return None
    counted = conn.execute(_query("shard_count", names)).fetchone()
    return int(counted[0]) if counted else 0


def resize_shards(
    conn: psycopg.Connection[Any], names: SchemaNames, shards: int,
    *, check: Callable[[psycopg.Connection[Any]], None] | None = None,
) -> int:
    """Give a sharded outbox another shard count: each row's shard is computed again, in one
    transaction with the outbox locked. Returns the count it had. `check` runs inside, once
    the tables are locked (the relay's: no relay may be running), and may raise to refuse."""
    if conn.autocommit:
        raise MigrationError("resize needs a connection with autocommit off")
    check_shards(shards)
    try:
        with conn.transaction():
            conn.execute(_query("lock", names), {"key": _ADVISORY_LOCK_KEY})
            current = shard_count(conn, names)
            if current is None:
                raise MigrationError(
                    f"table {names.schema}.{names.table} is not sharded: run "
                    f"`{command(names)} --shards N` to shard it")
            if current != shards:
                conn.execute(_query("lock_for_resize", names))
                if check is not None:
                    check(conn)
                conn.execute(_query("unshard", names))
                conn.execute(sharding().render(names, shards))
    except psycopg.Error as exc:
        raise MigrationError(f"resize failed, nothing was changed: {exc}") from exc
    conn.commit()
    return current


def command(names: SchemaNames, columns: str | None = "native") -> str:
    """The `outbox migrate up` command line that sets up this table (for error messages)."""
    args = ["outbox migrate up --db URL"]
    if columns not in (None, "native"):
        args.append(f"--columns {columns}")
    if columns != "native" or names.table != "outbox":
        args.append(f"--table {names.table}")
    if names.schema != "public":
        args.append(f"--schema {names.schema}")
    return " ".join(args)


def render_all(
    names: SchemaNames,
    conn: psycopg.Connection[Any] | None = None,
    *,
    since: int = 0,
    with_tracking: bool = False,
    columns: str = "native",
    shards: int | None = None,
) -> str:
    """The SQL of the migrations after version `since`, for teams that apply schema changes
    with their own tool (Alembic: docs/alembic.md). `with_tracking` adds the bookkeeping rows,
    so `outbox migrate status` and `outbox doctor` see them as applied."""
    check_shards(shards, columns)
    parts = []
    if with_tracking:
        parts.append(_tracking_table(names).as_string(conn) + ";")
    for migration in available(columns) + ([sharding()] if shards is not None else []):
        if migration.version <= since:
            continue
        body = migration.render(names, shards).as_string(conn)
        parts.append(f"-- outbox migration {migration.version:04d}_{migration.name}\n{body}")
        if with_tracking:
            values = (names.table, migration.version, migration.name, migration.checksum)
            parts.append(
                _record_migration(names, *map(sql.Literal, values)).as_string(conn) + ";")
    return "\n".join(parts)


def _query(block: str, names: SchemaNames, /, **extra: sql.Composable) -> sql.Composed:
    return sql_blocks.compose("outbox", "migrate.sql", block, names, **extra)


def _tracking_table(names: SchemaNames) -> sql.Composed:
    return _query("tracking_table", names)


def _record_migration(names: SchemaNames, *values: sql.Composable) -> sql.Composed:
    return _query("record_migration", names,
                  **dict(zip(("target", "version", "name", "checksum"), values, strict=True)))


def _ensure_tracking(conn: psycopg.Connection[Any], names: SchemaNames) -> None:
    conn.execute(_tracking_table(names))


def _applied(
    conn: psycopg.Connection[Any], names: SchemaNames
) -> dict[int, tuple[str, str, str]]:
    """version -> (checksum, applied_at, name) of the migrations applied to the table."""
    rows = conn.execute(_query("applied", names), {"target": names.table}).fetchall()
    return {int(version): (checksum, applied_at, name)
            for version, checksum, applied_at, name in rows}


def _tracking_exists(conn: psycopg.Connection[Any], names: SchemaNames) -> bool:
    row = conn.execute(
        _query("tracking_exists", names),
        {"table": names.qualified(names.migrations_table).as_string(conn)},
    ).fetchone()
    return bool(row and row[0])


def status(
    conn: psycopg.Connection[Any], names: SchemaNames, columns: str = "native"
) -> list[MigrationState]:
    migrations = available(columns)
    applied = _applied(conn, names) if _tracking_exists(conn, names) else {}
    conn.rollback()
    shards = sharding()
    if applied.get(shards.version, ("", "", ""))[2] == shards.name:
        migrations.append(shards)  # a sharded outbox: shown with the others
    return [MigrationState(m, applied[m.version][1] if m.version in applied else None)
            for m in migrations]


def _shard(
    conn: psycopg.Connection[Any], names: SchemaNames,
    applied: dict[int, tuple[str, str, str]], shards: int,
) -> bool:
    """Make the outbox sharded (True), or check it has `shards` shards already (False)."""
    migration = sharding()
    if migration.version in applied:
        if applied[migration.version][2] != migration.name:
            raise MigrationError(
                f"table {names.table} has another migration {migration.version:04d}: "
                "it cannot be sharded")
        current = shard_count(conn, names)
        if current != shards:
            raise MigrationError(
                f"table {names.schema}.{names.table} has {current} shards, not {shards}: "
                "the shard count is fixed when the outbox is sharded; change it with "
                f"`outbox shards resize --shards {shards}` once every relay is stopped "
                f"({RESIZE_DOC})")
        return False
    conn.execute(migration.render(names, shards))
    conn.execute(
        _record_migration(names, *(sql.Placeholder() for _ in range(4))),
        [names.table, migration.version, migration.name, migration.checksum],
    )
    return True


def up(
    conn: psycopg.Connection[Any], names: SchemaNames, columns: str = "native",
    shards: int | None = None,
) -> list[Migration]:
    """Apply pending migrations in one transaction; returns what was applied.

    `columns` names the table's layout: "native" creates the outbox table; "debezium" adds
    the polling relay's bookkeeping to an existing Debezium outbox table. `shards` makes the
    outbox sharded with that many shards (once: another count later is refused).
    """
    if conn.autocommit:
        raise MigrationError("migrate needs a connection with autocommit off")
    check_shards(shards, columns)
    migrations = available(columns)
    try:
        with conn.transaction():
            conn.execute(_query("lock", names), {"key": _ADVISORY_LOCK_KEY})
            _ensure_tracking(conn, names)
            applied = _applied(conn, names)
            pending = []
            for migration in migrations:
                if migration.version in applied:
                    checksum, _, name = applied[migration.version]
                    if name != migration.name:
                        raise MigrationError(
                            f"table {names.table} was migrated with {migration.version:04d}_"
                            f"{name}, not {migration.version:04d}_{migration.name}: it has "
                            "another layout than --columns "
                            f"{columns} (pass the layout it was migrated with)"
                        )
                    if checksum != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} was changed "
                            "after it was applied; migrations are append-only"
                        )
                    continue
                conn.execute(migration.render(names))
                conn.execute(
                    _record_migration(names, *(sql.Placeholder() for _ in range(4))),
                    [names.table, migration.version, migration.name, migration.checksum],
                )
                pending.append(migration)
            if shards is not None and _shard(conn, names, applied, shards):
                pending.append(sharding())
    except psycopg.Error as exc:
        raise MigrationError(f"migrate up failed, nothing was applied: {exc}") from exc
    conn.commit()
    return pending
