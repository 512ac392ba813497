"""The relay sources the suite measures, each a small plug-in: setup, relay command, ack check."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bench.env import REPO, Stack
from bench.pg import Database

if TYPE_CHECKING:
    from relay.wal import WalSourceConfig

POSTGRES_EVENTS = 1_000_000
MONGO_EVENTS = 100_000


@dataclass
class Prepared:
    """What a source set up in its database for one phase."""

    slot: str | None = None
    publication: str | None = None
    raw_slot: str | None = None  # pg_recvlogical's slot: the raw decode limit (binary mode)
    raw_slot_text: str | None = None  # the same in text mode, shown beside it
    end_lsn: str | None = None  # WAL position after the backlog
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PostgresSource:
    """How its database is prepared (a WAL relay needs a publication and a slot), which write
    mode its events use, how `outbox relay` runs for it, when it has acknowledged everything."""

    name: str
    relay_source: str  # `outbox relay --source ...`
    write_mode: str = "table"  # outbox.Outbox(mode=...)
    wal: bool = False
    default_events: int = POSTGRES_EVENTS

    def prepare(self, db: Database, *, raw_decode: bool) -> Prepared:
        """The relay's own setup step (WAL: publication and slot), before any event is written."""
        prepared = Prepared()
        if not self.wal:
            return prepared
        from relay.wal import setup

        suffix = uuid.uuid4().hex[:8]
        prepared.slot, prepared.publication = f"bench_{suffix}", f"bench_{suffix}"
        with db.connect() as conn:
            setup(conn, self.wal_config(prepared))
            if raw_decode:
                # One slot per reading: pg_recvlogical confirms what it read, so a slot serves
                # once. Both are created before the backlog, so both see all of it.
                prepared.raw_slot = f"bench_raw_{suffix}"
                prepared.raw_slot_text = f"bench_rawtext_{suffix}"
                for slot in (prepared.raw_slot, prepared.raw_slot_text):
                    conn.execute(
                        "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
        return prepared

    def wal_config(self, prepared: Prepared) -> WalSourceConfig:
        from relay.wal import WalSourceConfig

        assert prepared.slot and prepared.publication
        # Table and message events in one publication: the relay reads both write modes.
        return WalSourceConfig(slot=prepared.slot, publication=prepared.publication)

    def relay_env(self, db: Database, stack: Stack, prepared: Prepared) -> dict[str, str]:
        env = {
            "OUTBOX_SOURCE": self.relay_source,
            "OUTBOX_DB_URL": db.url,
            "OUTBOX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
        }
        if prepared.slot and prepared.publication:
            env |= {"OUTBOX_SLOT": prepared.slot, "OUTBOX_PUBLICATION": prepared.publication}
        return env

    def unavailable(self, db: Database, stack: Stack, prepared: Prepared) -> str | None:
        """Why this source cannot be measured here (None: it can). Asks the relay itself, in
        the prepared database, before a million events are written for nothing."""
        from outbox.errors import OutboxError
        from relay.main import relay_factory
        from relay.settings import RelaySettings
        from relay.stats import RelayStats

        try:
            settings = RelaySettings(
                source=self.relay_source,
                kafka_bootstrap=stack.kafka_bootstrap,
                db_url=db.url,
                slot=prepared.slot or "outbox_relay",
                publication=prepared.publication or "outbox_relay",
            )
            relay_factory(settings, RelayStats())
        except (OutboxError, ImportError, NotImplementedError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def after_backlog(self, db: Database, prepared: Prepared) -> None:
        with db.connect() as conn:
            if self.write_mode == "table" and not self.wal:
                # Autovacuum would get to the fresh table at a random moment of the drain; a
                # vacuum now makes runs comparable (and sets the hint bits a first read would).
                conn.execute("VACUUM (ANALYZE) outbox")
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            prepared.end_lsn = str(row[0]) if row else None

    def acknowledged(self, db: Database, prepared: Prepared) -> bool:
        """Has the source recorded that everything was published (rows gone, slot advanced)?"""
        with db.connect() as conn:
            if self.wal:
                row = conn.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
                    " WHERE slot_name = %s", [prepared.end_lsn, prepared.slot]).fetchone()
            else:
                row = conn.execute(
                    "SELECT NOT EXISTS (SELECT FROM outbox WHERE published_at IS NULL)"
                ).fetchone()
        return bool(row and row[0])


@dataclass(frozen=True)
class MongoSource:
    """Measured by bench/mongo_drain.py (its own writer, relay and ledger) when it exists."""

    name: str
    relay_source: str
    default_events: int = MONGO_EVENTS

    def unavailable(self, stack: Stack) -> str | None:
        if not (REPO / "bench" / "mongo_drain.py").exists():
            return "bench/mongo_drain.py is not there yet"
        if not stack.mongo_url:
            return "no MongoDB (--mongo / OUTBOX_MONGO_URL)"
        return None


Source = PostgresSource | MongoSource

SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        PostgresSource("postgres-poll", "postgres-poll"),
        PostgresSource("postgres-wal", "postgres-wal", wal=True),
        PostgresSource("postgres-wal-tableless", "postgres-wal", write_mode="message", wal=True),
        MongoSource("mongo-poll", "mongo-poll"),
        MongoSource("mongo-stream", "mongo-stream"),
    )
}
