"""Setup and inspection of the WAL relay's publication and pgoutput logical replication slot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from outbox import sql_blocks
from outbox.errors import ConfigurationError
from outbox.identifiers import check_identifier
from outbox.names import SchemaNames
from relay.wal._translate import translate
from relay.wal.errors import (
    PublicationMismatchError,
    PublicationMissingError,
    SlotError,
    SlotInUseError,
    SlotInvalidatedError,
    SlotMismatchError,
    SlotMissingError,
)
from relay.wal.lsn import format_lsn, parse_lsn

# Creating the slot is an explicit setup step, never something the relay does while running: a
# slot that disappeared (dropped, or lost with the server) must stop the relay, because a fresh
# slot starts at "now" and every event committed in between would be skipped silently.
#
# Publication: pgoutput needs one even when the relay reads only logical decoding messages
# (table-less mode), because `publication_names` is a mandatory option. The relay's publication
# lists only the outbox table and publishes only inserts, so updates and deletes of outbox rows
# (cleanup jobs, Debezium-style insert-then-delete) never travel; logical decoding messages are
# sent whatever the publication lists (`messages 'true'`). For a purely table-less setup it is
# created with `table=None`: an empty publication, so no row changes are sent at all.
#
# Every function works on an ordinary connection and on a `replication="database"` one, which
# accepts only the simple query protocol: values are composed as quoted literals (never
# interpolated), identifiers with sql.Identifier.

PLUGIN = "pgoutput"
QualifiedTable = tuple[str, str]


def check_slot_name(slot: str, setting: str = "slot") -> str:
    """A slot name PostgreSQL accepts: lower-case letters, digits and underscores."""
    check_identifier(slot, setting)
    if slot != slot.lower():
        raise ConfigurationError(
            f"{setting}={slot!r}: replication slot names may contain only lower-case letters, "
            "digits and underscores"
        )
    return slot


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """One row of pg_replication_slots, with LSNs as integers."""

    slot_name: str
    plugin: str | None
    slot_type: str
    database: str | None
    temporary: bool
    active: bool
    active_pid: int | None
    wal_status: str | None  # reserved, extended, unreserved or lost
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    retained_bytes: int | None  # WAL kept for this slot: current WAL position - restart_lsn
    safe_wal_size: int | None  # bytes left before max_slot_wal_keep_size invalidates it
    two_phase: bool

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


@dataclass(frozen=True, slots=True)
class PublishedTable:
    schema: str
    name: str
    columns: tuple[str, ...] | None  # the published columns; None: unknown (before PG 15)
    row_filter: str | None  # a WHERE clause that hides rows from the relay (PG 15)


@dataclass(frozen=True, slots=True)
class PublicationInfo:
    name: str
    all_tables: bool
    publishes_insert: bool
    tables: tuple[PublishedTable, ...]

    def table(self, table: QualifiedTable) -> PublishedTable | None:
        return next((t for t in self.tables if (t.schema, t.name) == table), None)

    def covers(self, table: QualifiedTable) -> bool:
        return self.publishes_insert and (self.all_tables or self.table(table) is not None)


def _lsn(value: str | None) -> int | None:
    return parse_lsn(value) if value is not None else None


# -- slots -------------------------------------------------------------------------------------

def _sql(name: str, **parts: sql.Composable) -> sql.Composed:
    """Block `name` of relay/sql/slots.sql; `parts` are literals and identifiers."""
    return sql_blocks.compose("relay", "slots.sql", name, SchemaNames(), **parts)


def slot_status(conn: psycopg.Connection[Any], slot: str) -> SlotStatus | None:
    """The slot's row of pg_replication_slots, or None if there is no such slot."""
    check_slot_name(slot)
    try:
        row = conn.execute(_sql("slot_status", slot=sql.Literal(slot))).fetchone()
    except psycopg.Error as exc:
        raise translate(exc, f"reading the status of replication slot {slot!r}") from exc
    if row is None:
        return None
    return SlotStatus(
        slot_name=row[0],
        plugin=row[1],
        slot_type=row[2],
        database=row[3],
        temporary=bool(row[4]),
        active=bool(row[5]),
        active_pid=row[6],
        wal_status=row[7],
        restart_lsn=_lsn(row[8]),
        confirmed_flush_lsn=_lsn(row[9]),
        retained_bytes=row[10],
        safe_wal_size=row[11],
        two_phase=bool(row[12]),
    )


def current_database(conn: psycopg.Connection[Any]) -> str:
    try:
        row = conn.execute(_sql("current_database")).fetchone()
    except psycopg.Error as exc:
        raise translate(exc, "reading the current database") from exc
    assert row is not None
    return str(row[0])


def check_slot(status: SlotStatus | None, slot: str, database: str) -> SlotStatus:
    """Return `status` if the relay can stream from the slot, else raise saying what to do."""
    if status is None:
        raise SlotMissingError(
            f"replication slot {slot!r} does not exist. If this relay has never run against "
            f"database {database!r}, create the slot and publication first: `outbox slot "
            "create`. If it ran before, the slot was dropped: events committed after its last "
            "confirmed position have not been relayed and the WAL relay cannot read them any "
            "more. Recover them first with `outbox slot recover` (table mode: it publishes the "
            "rows still in the outbox table and makes the slot anew), or run the relay with "
            "--on-slot-loss recover; do not simply create a new slot, which starts at the "
            "current position. The relay never creates a slot on its own otherwise, so that "
            "such a gap cannot pass unnoticed."
        )
    if status.slot_type != "logical" or status.plugin != PLUGIN:
        raise SlotMismatchError(
            f"replication slot {slot!r} is a {status.slot_type} slot with plugin "
            f"{status.plugin!r}; the WAL relay needs a logical slot with plugin {PLUGIN!r}. "
            "Configure another slot name, or drop this slot if nothing else uses it"
        )
    if status.database != database:
        raise SlotMismatchError(
            f"replication slot {slot!r} belongs to database {status.database!r}, not "
            f"{database!r}: a logical slot decodes only the database it was created in"
        )
    if status.lost:
        confirmed = status.confirmed_flush_lsn
        where = format_lsn(confirmed) if confirmed is not None else "its last confirmed position"
        raise SlotInvalidatedError(
            f"replication slot {slot!r} was invalidated (wal_status 'lost'): it kept more WAL "
            "than max_slot_wal_keep_size allows and the server removed WAL it still needed, so "
            f"events committed after {where} cannot be read from the log any more. Recover "
            "them with `outbox slot recover` (table mode: it publishes the outbox rows and "
            "makes the slot anew), or run the relay with --on-slot-loss recover; raise "
            "max_slot_wal_keep_size or keep the relay running so the slot keeps up"
        )
    if status.active:
        raise SlotInUseError(
            f"replication slot {slot!r} is in use by server process {status.active_pid} "
            "(another relay?). This relay waits as a standby and retries until it is free",
            active_pid=status.active_pid,
        )
    return status


def create_slot(conn: psycopg.Connection[Any], slot: str) -> int:
    """Create the pgoutput logical slot; returns its consistent point (LSN).

    Events committed after that point are relayed; earlier ones never are. PostgreSQL waits for
    every transaction running at that moment to finish before it returns. Needs the REPLICATION
    attribute, and no open transaction that has written on `conn`.
    """
    check_slot_name(slot)
    query = _sql("create_slot", slot=sql.Literal(slot), plugin=sql.Literal(PLUGIN))
    try:
        row = conn.execute(query).fetchone()
    except psycopg.errors.DuplicateObject as exc:
        raise SlotError(
            f"replication slot {slot!r} already exists; use it, or drop it first"
        ) from exc
    except psycopg.Error as exc:
        raise translate(exc, f"creating replication slot {slot!r}") from exc
    assert row is not None
    return parse_lsn(row[0])


def drop_slot(conn: psycopg.Connection[Any], slot: str, missing_ok: bool = True) -> bool:
    """Drop the slot (the server then frees the WAL it kept); False if there was none."""
    # Look first: a failing statement would abort the caller's transaction, if one is open.
    if slot_status(conn, slot) is None:
        if missing_ok:
            return False
        raise SlotMissingError(f"replication slot {slot!r} does not exist")
    query = _sql("drop_slot", slot=sql.Literal(slot))
    try:
        conn.execute(query)
    except psycopg.Error as exc:
        raise translate(exc, f"dropping replication slot {slot!r}", slot=slot) from exc
    return True


# -- publications ------------------------------------------------------------------------------


def publication_info(conn: psycopg.Connection[Any], publication: str) -> PublicationInfo | None:
    check_identifier(publication, "publication")
    name = sql.Literal(publication)
    # Column lists and row filters exist from PostgreSQL 15 on.
    details = "attnames::text[], rowfilter" if conn.info.server_version >= 150000 else "NULL, NULL"
    try:
        row = conn.execute(_sql("publication", publication_name=name)).fetchone()
        if row is None:
            return None
        tables = conn.execute(
            _sql("publication_tables", details=sql.SQL(details), publication_name=name)
        ).fetchall()
    except psycopg.Error as exc:
        raise translate(exc, f"reading publication {publication!r}") from exc
    return PublicationInfo(
        publication,
        bool(row[0]),
        bool(row[1]),
        tuple(
            PublishedTable(str(s), str(t), tuple(c) if c is not None else None, f)
            for s, t, c, f in tables
        ),
    )


def publications_named(conn: psycopg.Connection[Any], prefix: str) -> list[str]:
    """The names of the publications that start with `prefix`."""
    try:
        rows = conn.execute(_sql("publications_named", prefix=sql.Literal(prefix))).fetchall()
    except psycopg.Error as exc:
        raise translate(exc, f"reading the publications named {prefix}*") from exc
    return [str(row[0]) for row in rows]


def table_columns(conn: psycopg.Connection[Any], table: QualifiedTable) -> tuple[str, ...]:
    """The columns of `table`, in order; empty if there is no such table."""
    schema, name = table
    query = _sql("table_columns", schema_name=sql.Literal(schema), table_name=sql.Literal(name))
    try:
        return tuple(str(r[0]) for r in conn.execute(query).fetchall())
    except psycopg.Error as exc:
        raise translate(exc, f"reading the columns of {schema}.{name}") from exc


def check_publication(
    info: PublicationInfo | None,
    publication: str,
    table: QualifiedTable | None,
    columns: Sequence[str] = (),
    row_filter: str | None = None,
) -> PublicationInfo:
    """Return `info` if it serves the relay, else raise: it must publish `table`'s inserts,
    with every one of `columns`, and with no row filter but `row_filter` (a shard group's, as
    the catalog shows it: relay/wal/groups.py)."""
    if info is None:
        raise PublicationMissingError(
            f"publication {publication!r} does not exist in this database; create it with "
            "its slot in the relay's setup step: `outbox slot create`"
        )
    if table is None:
        return info
    schema, name = table
    if not info.covers(table):
        raise PublicationMismatchError(
            f"publication {publication!r} does not publish inserts into {schema}.{name}, so "
            f"the relay would never see its events: ALTER PUBLICATION {publication} ADD TABLE "
            f"{schema}.{name}, and make sure it publishes 'insert'"
        )
    published = info.table(table)
    if published is not None and row_filter is not None and published.row_filter != row_filter:
        raise PublicationMismatchError(
            f"publication {publication!r} publishes the rows of {schema}.{name} where "
            f"{published.row_filter}, and its shard group needs {row_filter}: the publication "
            "was changed; give it its group's filter again (ALTER PUBLICATION ... SET TABLE)")
    if published is not None and row_filter is None and published.row_filter is not None:
        raise PublicationMismatchError(
            f"publication {publication!r} publishes only the rows of {schema}.{name} where "
            f"{published.row_filter}; events outside the filter would never be relayed. "
            "Remove the row filter"
        )
    if published is not None and published.columns is not None:
        missing = [c for c in columns if c not in published.columns]
        if missing:
            raise PublicationMismatchError(
                f"publication {publication!r} does not publish column(s) "
                f"{', '.join(missing)} of {schema}.{name}, which the relay reads; add them to "
                "its column list"
            )
    return info


def create_publication(
    conn: psycopg.Connection[Any],
    publication: str,
    table: QualifiedTable | None,
    columns: Sequence[str] | None = None,
    where: sql.Composable | None = None,
) -> None:
    """Create the relay's publication: inserts of `table` only, or empty if `table` is None;
    with `where`, only the rows it selects (a shard group's row filter).

    `columns`, if given, is the publication's column list: only these columns travel, so the
    server encodes and the relay parses less, and PostgreSQL refuses to drop one of them (only
    an explicit DROP COLUMN ... CASCADE would, by taking the table out of the publication).
    Create the publication before the slot. Needs CREATE on the database and ownership of the
    table. Runs in `conn`'s transaction.
    """
    check_identifier(publication, "publication")
    target: sql.Composable = sql.SQL("")
    if table is not None:
        schema, name = table
        target = sql.Identifier(check_identifier(schema, "schema"), check_identifier(name, "table"))
        if columns:
            target = sql.SQL("{} ({})").format(
                target,
                sql.SQL(", ").join(sql.Identifier(check_identifier(c, "column")) for c in columns),
            )
        target = sql.SQL("FOR TABLE {}").format(target)
        if where is not None:
            target = sql.SQL("{} {}").format(target, where)
    query = _sql("create_publication", publication=sql.Identifier(publication), target=target)
    try:
        conn.execute(query)
    except psycopg.errors.DuplicateObject as exc:
        raise PublicationMismatchError(
            f"publication {publication!r} already exists; use it, or drop it first"
        ) from exc
    except psycopg.Error as exc:
        raise translate(exc, f"creating publication {publication!r}") from exc


def drop_publication(
    conn: psycopg.Connection[Any], publication: str, missing_ok: bool = True
) -> bool:
    if publication_info(conn, publication) is None:
        if missing_ok:
            return False
        raise PublicationMissingError(f"publication {publication!r} does not exist")
    query = _sql("drop_publication", publication=sql.Identifier(publication))
    try:
        conn.execute(query)
    except psycopg.Error as exc:
        raise translate(exc, f"dropping publication {publication!r}") from exc
    return True
