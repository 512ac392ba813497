"""WAL relay test helpers: a slot and publication per test, slot positions, exact commit LSNs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

import outbox
from relay.settings import RelaySettings
from relay.wal import WalSourceConfig, parse_lsn, setup, slots
from relay.wal.lsn import format_lsn
from tests.support.relays import wait_for
from tests.support.writers import SequencedWriter


def unique_slot(prefix: str = "walrelay") -> str:
    """Slots are cluster-wide: every test gets its own name (also used for the publication)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class WalSlot:
    """A relay's slot and publication in one database, and what a test asks about them."""

    db_url: str
    slot: str
    publication: str
    table_less: bool = False

    @classmethod
    def create(cls, db_url: str, *, table_less: bool = False) -> WalSlot:
        """The relay's setup step (`relay.wal.setup`); events committed after it are relayed.

        Also enables pg_walinspect in the database, for `commit_lsn`."""
        name = unique_slot()
        made = cls(db_url, name, name, table_less)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            setup(conn, made.config())
        return made

    def config(self) -> WalSourceConfig:
        return WalSourceConfig(slot=self.slot, publication=self.publication,
                               table=None if self.table_less else "outbox")

    def settings(self, kafka_bootstrap: str, **overrides: Any) -> RelaySettings:
        values: dict[str, Any] = {
            "source": "postgres-wal", "db_url": self.db_url, "kafka_bootstrap": kafka_bootstrap,
            "slot": self.slot, "publication": self.publication, "shutdown_timeout": 10.0,
            "table_less": self.table_less, **overrides,
        }
        return RelaySettings(**values)

    def cli_args(self, kafka_bootstrap: str, *extra: str) -> list[str]:
        return ["--source", "postgres-wal", "--db", self.db_url, "--kafka", kafka_bootstrap,
                "--slot", self.slot, "--publication", self.publication, *extra]

    def status(self) -> slots.SlotStatus | None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            return slots.slot_status(conn, self.slot)

    def confirmed(self) -> int:
        status = self.status()
        assert status is not None, f"slot {self.slot} is gone"
        assert status.confirmed_flush_lsn is not None
        return status.confirmed_flush_lsn

    def wait_confirmed(self, lsn: int, timeout: float, what: str = "") -> None:
        """Until the slot's confirmed_flush_lsn reaches `lsn`."""
        wait_for(lambda: self.confirmed() >= lsn, timeout,
                 f"slot {self.slot} to be confirmed up to {format_lsn(lsn)} {what}".strip())

    def wait_active(self, timeout: float = 30) -> int:
        """Until a relay streams from the slot; returns the walsender's pid."""
        wait_for(lambda: bool((s := self.status()) and s.active), timeout,
                 f"a relay to stream from slot {self.slot}")
        status = self.status()
        assert status is not None and status.active_pid is not None
        return status.active_pid

    def wait_released(self, timeout: float = 30) -> None:
        """A walsender whose client went away frees the slot a moment later."""
        wait_for(lambda: not ((s := self.status()) and s.active), timeout,
                 f"slot {self.slot} to be released")


def current_lsn(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return insert_lsn(conn)


def insert_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0])


def commit_lsn(conn: psycopg.Connection[Any]) -> int:
    """Commit `conn`'s transaction and return the end of its commit record: the position
    (`WalCommit.end_lsn`) the relay confirms once the transaction's events are all in Kafka.

    Read from the WAL with pg_walinspect (enabled by `WalSlot.create`), so it is exact even
    while other databases of the server write WAL too."""
    row = conn.execute(
        "SELECT pg_current_xact_id()::text, pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    xid, start = int(row[0]) & 0xFFFF_FFFF, row[1]
    conn.commit()
    found: list[int] = []

    def read() -> bool:
        record = conn.execute(
            "SELECT end_lsn::text FROM pg_get_wal_records_info(%s::pg_lsn,"
            " pg_current_wal_flush_lsn()) WHERE resource_manager = 'Transaction'"
            " AND record_type = 'COMMIT' AND xid::text = %s",
            [start, str(xid)]).fetchone()
        conn.rollback()  # leave no read transaction open on the writer's connection
        if record is not None:
            found.append(parse_lsn(record[0]))
        return bool(found)

    wait_for(read, 10, f"the commit record of transaction {xid}")
    return found[0]


def write_and_commit(db_url: str, writer: SequencedWriter, events: list[outbox.Event]) -> int:
    """One transaction; returns its exact commit end LSN."""
    with psycopg.connect(db_url) as conn:
        writer.outbox.publish(conn, *events)
        end = commit_lsn(conn)
    writer.note(events, committed=True)
    return end


@dataclass(frozen=True)
class Recorded:
    """A slot's row of the position table, as the relay wrote it."""

    lsn: int | None
    commit_at: Any
    system: str | None
    timeline: int | None


def recorded_position(db_url: str, slot: str) -> Recorded | None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT acknowledged_lsn::text, acknowledged_commit_at, acknowledged_system,"
            " acknowledged_timeline FROM outbox_relay_position WHERE slot = %s", [slot]).fetchone()
    if row is None:
        return None
    return Recorded(parse_lsn(row[0]) if row[0] else None, row[1], row[2], row[3])


def server_identity(db_url: str) -> tuple[str, int]:
    """The server's system identifier and timeline, as IDENTIFY_SYSTEM reports them."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT (SELECT system_identifier::text FROM pg_control_system()),"
                           " (SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


def write_transactions(
    db_url: str, writer: SequencedWriter, *, keys: int, per_key: int, per_transaction: int,
) -> list[tuple[set[str], int]]:
    """Like `SequencedWriter.write_many`, and returns each transaction's event ids with an
    upper bound of its commit position (the WAL insert position right after the commit)."""
    written: list[tuple[set[str], int]] = []
    with psycopg.connect(db_url) as conn:
        batch: list[outbox.Event] = []

        def flush() -> None:
            writer.write(conn, batch)
            written.append(({str(e.id) for e in batch}, insert_lsn(conn)))
            conn.rollback()
            batch.clear()

        for _ in range(per_key):
            for k in range(keys):
                batch += writer.events(f"k{k}", 1)
                if len(batch) == per_transaction:
                    flush()
        if batch:
            flush()
    return written


def crash_postgres(server: Any) -> None:
    """Stop a private PostgreSQL (deploy.local PostgresService) like a crash: `pg_ctl stop -m
    immediate`, no shutdown checkpoint, WAL senders cut off mid-stream (`server.stop()` is a
    clean fast shutdown). Uses the service's pg_ctl helper: it has no public crash."""
    from deploy.local.postgres import find_bindir, server_user

    server._pg_ctl(find_bindir(), server_user(), "stop", "-m", "immediate", "-w", "-t", "60")


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a running process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def outgrow_the_slot(url: str, slot: str) -> None:
    """On a server with a small max_slot_wal_keep_size: write WAL past it and checkpoint until
    the slot is lost."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (x text)")
        for _ in range(20):
            conn.execute(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            status = slots.slot_status(conn, slot)
            if status is not None and status.lost:
                return
    raise AssertionError("the slot was not invalidated")
