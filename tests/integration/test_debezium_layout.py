"""A Debezium outbox table relayed from the CLI (`--columns debezium`), by both PostgreSQL sources.

The table is created exactly as Debezium's Outbox Event Router documents it, and written the way
a Debezium user's application writes it: a plain INSERT of the five columns, nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.support.kafka import Received, TopicReader, create_topics, unique_topic
from tests.support.relays import REPO, RelayProcess, wait_for
from tests.support.wal import unique_slot

pytestmark = pytest.mark.integration

TABLE = "outboxevent"
# Debezium's documented outbox table (Outbox Event Router: "outbox table structure").
DEBEZIUM_DDL = """
CREATE TABLE outboxevent (
    id            uuid         NOT NULL PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb
)
"""
INSERT = ("INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload) "
          "VALUES (%s, %s, %s, %s, %s)")


def outbox_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], cwd=REPO,
                          capture_output=True, text=True, env={**clean, **(env or {})},
                          timeout=120)


@dataclass(frozen=True)
class Written:
    id: str
    aggregate_id: str
    payload: dict[str, Any]


class DebeziumApp:
    """Writes events as a Debezium user's service does: INSERTs of the five columns."""

    def __init__(self, topic: str) -> None:
        self.topic = topic  # aggregatetype: the default topic template routes by it
        self.written: list[Written] = []
        self._seq: dict[str, int] = {}

    def insert(self, conn: psycopg.Connection[Any], aggregate_id: str) -> Written:
        seq = self._seq[aggregate_id] = self._seq.get(aggregate_id, 0) + 1
        payload = {"orderId": aggregate_id, "seq": seq, "customer": "Zoë ✓",
                   "lines": [{"sku": "A-1", "qty": 2, "price": 19.99}], "note": None}
        event = Written(str(uuid.uuid4()), aggregate_id, payload)
        conn.execute(INSERT, [event.id, self.topic, aggregate_id, "OrderUpdated", Jsonb(payload)])
        self.written.append(event)
        return event

    def commit_batches(self, db_url: str, aggregates: int, per_aggregate: int) -> None:
        """Interleaved aggregates, a few events per transaction."""
        with psycopg.connect(db_url) as conn:
            for round_ in range(per_aggregate):
                for n in range(aggregates):
                    self.insert(conn, f"order-{n}")
                if round_ % 3 == 2:
                    conn.commit()
            conn.commit()

    def check(self, messages: list[Received]) -> None:
        """Every event once, on topic aggregatetype with key aggregateid, payload intact, and
        each aggregate's events in the order they were written."""
        by_id = {m.id: m for m in messages}
        assert len(messages) == len(by_id) == len(self.written), "duplicates or phantoms"
        for event in self.written:
            message = by_id[event.id]
            assert message.topic == self.topic
            assert message.key == event.aggregate_id
            assert json.loads(message.value) == event.payload
            assert message.headers["event_type"] == "OrderUpdated"
            assert message.headers["content_type"] == "application/json"
        for aggregate in {e.aggregate_id for e in self.written}:
            got = [json.loads(m.value)["seq"] for m in messages if m.key == aggregate]
            assert got == sorted(got) == list(range(1, len(got) + 1)), aggregate


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("dbz")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


@pytest.fixture
def debezium_db(empty_db_url: str) -> str:
    """A database holding Debezium's outbox table, as a Debezium team's has: nothing of
    outbox-relay in it yet."""
    with psycopg.connect(empty_db_url) as conn:
        conn.execute(DEBEZIUM_DDL)
    return empty_db_url


def migrate_debezium(db_url: str) -> None:
    result = outbox_cli("migrate", "up", "--db", db_url, "--columns", "debezium",
                        "--table", TABLE)
    assert result.returncode == 0, result.stderr
    assert "applied 0001_poll_bookkeeping" in result.stdout


def remaining_rows(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM outboxevent").fetchone()
        return int(row[0]) if row else -1


@pytest.fixture
def reader(kafka_bootstrap: str, topic: str) -> Iterator[TopicReader]:
    found = TopicReader(kafka_bootstrap, topic)
    yield found
    found.close()


def run_relay(args: list[str], log: Path) -> RelayProcess:
    return RelayProcess(*args, "--columns", "debezium", "--table", TABLE,
                        "--poll-interval", "200ms", log=log).start()


def stop(relay: RelayProcess) -> None:
    try:
        assert relay.kill(signal.SIGTERM) == 0, relay.log()
    finally:
        relay.close()


def test_polling_relay_reads_a_migrated_debezium_table_from_the_cli(
    debezium_db: str, kafka_bootstrap: str, topic: str, reader: TopicReader, tmp_path: Path
) -> None:
    app = DebeziumApp(topic)
    app.commit_batches(debezium_db, aggregates=2, per_aggregate=3)  # before the bookkeeping
    migrate_debezium(debezium_db)
    app.commit_batches(debezium_db, aggregates=3, per_aggregate=10)  # unchanged writers
    # A transaction that took its position before the others and commits after the relay has
    # read past it: the txid bookkeeping must find it (a position cursor alone would skip it).
    late = psycopg.connect(debezium_db)
    late_event = app.insert(late, "order-late")
    try:
        app.commit_batches(debezium_db, aggregates=3, per_aggregate=3)
        relay = run_relay(["--source", "postgres-poll", "--db", debezium_db,
                           "--kafka", kafka_bootstrap], tmp_path / "relay.log")
        try:
            earlier = {e.id for e in app.written if e is not late_event}
            reader.read_ids(earlier)
            late.commit()
            reader.read_ids({late_event.id})
            wait_for(lambda: remaining_rows(debezium_db) == 0, 30,
                     "published rows to be deleted")
        finally:
            stop(relay)
    finally:
        late.close()
    app.check(reader.drain(quiet=1.0))


def test_wal_relay_reads_a_debezium_table_after_slot_create_columns_debezium(
    debezium_db: str, kafka_bootstrap: str, topic: str, reader: TopicReader, tmp_path: Path
) -> None:
    migrate_debezium(debezium_db)  # the parked table (the bookkeeping is unused by the WAL)
    slot = unique_slot("dbz")
    created = outbox_cli("slot", "create", "--db", debezium_db, "--slot", slot,
                         "--publication", slot, "--table", TABLE,
                         env={"OUTBOX_COLUMNS": "debezium"})
    assert created.returncode == 0, created.stderr
    with psycopg.connect(debezium_db) as conn:
        published = conn.execute(
            "SELECT attnames FROM pg_publication_tables WHERE pubname = %s", [slot]).fetchone()
    assert published == (["id", "aggregatetype", "aggregateid", "type", "payload"],)
    app = DebeziumApp(topic)
    app.commit_batches(debezium_db, aggregates=3, per_aggregate=10)
    # Debezium's recommended writer deletes the row in the transaction that inserted it: the
    # insert is still in the log, so the WAL relay publishes it.
    with psycopg.connect(debezium_db) as conn:
        event = app.insert(conn, "order-0")
        conn.execute("DELETE FROM outboxevent WHERE id = %s", [event.id])
    relay = run_relay(["--source", "postgres-wal", "--db", debezium_db,
                       "--kafka", kafka_bootstrap, "--slot", slot, "--publication", slot],
                      tmp_path / "relay.log")
    try:
        reader.read_ids({e.id for e in app.written})
    finally:
        stop(relay)
    app.check(reader.drain(quiet=1.0))


def parked_rows(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT id::text, aggregate_id, payload, raw IS NOT NULL, reason "
            "FROM outboxevent_parked").fetchall()


@pytest.mark.parametrize("source", ["postgres-poll", "postgres-wal"])
def test_a_null_payload_is_parked_and_the_events_after_it_flow(
    source: str, debezium_db: str, kafka_bootstrap: str, topic: str, reader: TopicReader,
    tmp_path: Path,
) -> None:
    """Debezium's payload column is nullable; such a row is no event for either relay."""
    migrate_debezium(debezium_db)
    args = ["--source", source, "--db", debezium_db, "--kafka", kafka_bootstrap]
    if source == "postgres-wal":
        slot = unique_slot("dbz")
        created = outbox_cli("slot", "create", "--db", debezium_db, "--slot", slot,
                             "--publication", slot, "--columns", "debezium", "--table", TABLE)
        assert created.returncode == 0, created.stderr
        args += ["--slot", slot, "--publication", slot]
    app = DebeziumApp(topic)
    null_id = str(uuid.uuid4())
    with psycopg.connect(debezium_db) as conn:
        app.insert(conn, "order-0")
        conn.execute(INSERT, [null_id, topic, "order-0", "OrderUpdated", None])
        app.insert(conn, "order-0")
    relay = run_relay(args, tmp_path / "relay.log")
    try:
        reader.read_ids({e.id for e in app.written})
        wait_for(lambda: len(parked_rows(debezium_db)) == 1, 30, "the null payload parked")
    finally:
        stop(relay)
    app.check(reader.drain(quiet=1.0))
    ((parked_id, aggregate_id, payload, has_raw, reason),) = parked_rows(debezium_db)
    assert has_raw and reason, (parked_id, aggregate_id, payload, reason)
    if source == "postgres-poll":  # the WAL relay parks what it could not read as raw only
        assert (parked_id, aggregate_id, payload) == (null_id, "order-0", None)


def test_polling_relay_refuses_a_debezium_table_without_the_bookkeeping(
    debezium_db: str, kafka_bootstrap: str, topic: str
) -> None:
    app = DebeziumApp(topic)
    app.commit_batches(debezium_db, aggregates=1, per_aggregate=2)
    result = outbox_cli("relay", "--source", "postgres-poll", "--db", debezium_db,
                        "--kafka", kafka_bootstrap, "--columns", "debezium", "--table", TABLE)
    assert result.returncode == 1
    assert "has no column position, txid, published_at" in result.stderr
    assert "outbox migrate up --db URL --columns debezium --table outboxevent" in result.stderr
    with psycopg.connect(debezium_db) as conn:  # refused before anything was written
        columns = conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'outboxevent'"
        ).fetchone()
        parked = conn.execute("SELECT to_regclass('outboxevent_parked')").fetchone()
    assert columns == (5,) and parked == (None,)
    assert remaining_rows(debezium_db) == 2


def test_migrations_of_one_layout_are_refused_for_a_table_of_the_other(debezium_db: str) -> None:
    migrate_debezium(debezium_db)
    status = outbox_cli("migrate", "status", "--db", debezium_db, "--columns", "debezium",
                        "--table", TABLE)
    assert status.returncode == 0, status.stdout
    rendered = outbox_cli("migrate", "sql", "--columns", "debezium", "--table", TABLE)
    assert "-- outbox migration 0001_poll_bookkeeping" in rendered.stdout
    assert 'CREATE TABLE "public"."outboxevent" (' not in rendered.stdout  # Debezium's own
    native = outbox_cli("migrate", "up", "--db", debezium_db, "--table", TABLE)
    assert native.returncode == 1
    assert "another layout than --columns native" in native.stderr


@pytest.mark.parametrize("command", [
    ["relay", "--db", "postgresql://h/db", "--kafka", "k:9092"],
    ["slot", "create", "--db", "postgresql://h/db"],
    ["migrate", "up", "--db", "postgresql://h/db"],
])
def test_an_unknown_layout_fails_at_start_up_naming_the_choices(command: list[str]) -> None:
    result = outbox_cli(*command, env={"OUTBOX_COLUMNS": "debezum"})
    assert result.returncode == 1
    assert "columns='debezum': choose one of native, debezium" in result.stderr


def test_columns_comes_from_the_environment_or_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[relay]\ncolumns = "debezium"\ntable = "outboxevent"\n')
    base = ["relay", "--db", "postgresql://h/db", "--kafka", "k:9092", "--print-config"]
    from_file = outbox_cli(*base, env={"OUTBOX_CONFIG": str(config)})
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["columns"] == "debezium"
    from_env = outbox_cli(*base, env={"OUTBOX_COLUMNS": "debezium"})
    assert json.loads(from_env.stdout)["columns"] == "debezium"
    default = outbox_cli(*base)
    assert json.loads(default.stdout)["columns"] == "native"
    mongo = outbox_cli("relay", "--source", "mongo-poll", "--mongo", "mongodb://h/db",
                       "--collections", "orders", "--kafka", "k:9092", "--columns", "debezium")
    assert mongo.returncode == 1
    assert "applies to the postgres-* sources only" in mongo.stderr


def test_replay_reads_the_kept_rows_of_a_debezium_table(
    debezium_db: str, kafka_bootstrap: str, topic: str, reader: TopicReader, tmp_path: Path
) -> None:
    migrate_debezium(debezium_db)
    app = DebeziumApp(topic)
    app.commit_batches(debezium_db, aggregates=3, per_aggregate=4)
    relay = run_relay(["--source", "postgres-poll", "--db", debezium_db, "--kafka",
                       kafka_bootstrap, "--keep-published", "1d"], tmp_path / "relay.log")
    try:
        reader.read_ids({e.id for e in app.written})
        wait_for(lambda: unmarked_rows(debezium_db) == 0, 30, "published rows to be marked")
    finally:
        stop(relay)

    done = outbox_cli("replay", "--db", debezium_db, "--kafka", kafka_bootstrap, "--columns",
                      "debezium", "--table", TABLE, "--aggregate-id", "order-1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("replayed 4 of 4 event(s)")
    reader.read_until(lambda got: sum(m.headers.get("replayed") == "true" for m in got) >= 4)
    again = [m for m in reader.drain(quiet=1.0) if m.headers.get("replayed") == "true"]
    wanted = [e for e in app.written if e.aggregate_id == "order-1"]
    assert [m.id for m in again] == [e.id for e in wanted]
    assert [json.loads(m.value) for m in again] == [e.payload for e in wanted]


def unmarked_rows(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outboxevent WHERE published_at IS NULL").fetchone()
        return int(row[0]) if row else -1
