"""Outbox(sequence=True): per-aggregate numbers in the caller's transaction, on every target,
against a real PostgreSQL (and the polling relay's per-key order without writer locks)."""

from __future__ import annotations

import random
import threading
import uuid

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox.copy_rows import MIN_EVENTS
from outbox.record import decode_message
from relay.settings import RelaySettings
from relay.wal import WalSourceConfig, setup
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.pg import sqlalchemy_url
from tests.support.relays import RelayThread

pytestmark = pytest.mark.integration

SEQUENCED = outbox.Outbox(sequence=True)


def event(key: str, aggregate_type: str = "Order") -> outbox.Event:
    return outbox.Event(aggregate_type, key, "Changed", {"key": key}, headers={"tenant": "eu"})


def numbers(db_url: str) -> dict[uuid.UUID, tuple[str, str, str | None]]:
    """Event id -> (aggregate type, aggregate id, its `sequence` header), in position order."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT id, aggregate_type, aggregate_id, headers FROM outbox ORDER BY position"
        ).fetchall()
    return {row[0]: (row[1], row[2], row[3].get("sequence")) for row in rows}


def test_events_are_numbered_per_aggregate_on_the_insert_and_copy_paths(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        first = SEQUENCED.publish(conn, event("1"))  # INSERT
        batch = [event("1"), event("2"), event("1"), event("2", "Invoice"), event("2")]
        assert len(batch) >= MIN_EVENTS  # binary COPY
        second = SEQUENCED.publish(conn, *batch)
        third = SEQUENCED.publish(conn, event("2"), event("1"))  # INSERT, two aggregates
        conn.commit()
    found = numbers(db_url)
    assert [found[i] for i in first + second + third] == [
        ("Order", "1", "1"),
        ("Order", "1", "2"), ("Order", "2", "1"), ("Order", "1", "3"),
        ("Invoice", "2", "1"), ("Order", "2", "2"),
        ("Order", "2", "3"), ("Order", "1", "4"),
    ]
    with psycopg.connect(db_url) as conn:
        # The event's own headers are kept beside the number.
        assert conn.execute("SELECT DISTINCT headers->>'tenant' FROM outbox").fetchall() == [
            ("eu",)]


def test_a_rolled_back_transaction_leaves_no_gap(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        kept = SEQUENCED.publish(conn, event("7"))
        conn.commit()
        SEQUENCED.publish(conn, event("7"), event("7"))
        conn.rollback()
        with pytest.raises(RuntimeError), conn.transaction():
            SEQUENCED.publish(conn, event("7"))
            raise RuntimeError("undo the savepoint")
        kept += SEQUENCED.publish(conn, event("7"))
        conn.commit()
    found = numbers(db_url)
    assert [found[i][2] for i in kept] == ["1", "2"]


def test_sqlalchemy_session_and_connection_number_events(db_url: str) -> None:
    engine = create_engine(sqlalchemy_url(db_url))
    with Session(engine) as session:
        ids = SEQUENCED.publish(session, event("s"))
        ids += SEQUENCED.publish(session, *[event("s") for _ in range(MIN_EVENTS)])  # COPY
        session.commit()
    with engine.connect() as connection:
        ids += SEQUENCED.publish(connection, event("s"), event("s"))
        connection.commit()
    engine.dispose()
    found = numbers(db_url)
    assert [found[i][2] for i in ids] == [str(n) for n in range(1, MIN_EVENTS + 4)]


@pytest.mark.asyncio
async def test_async_targets_number_events(db_url: str) -> None:
    engine = create_async_engine(sqlalchemy_url(db_url))
    async with AsyncSession(engine) as session:
        ids = await SEQUENCED.publish(session, event("a"))
        ids += await SEQUENCED.publish(session, *[event("a") for _ in range(MIN_EVENTS)])
        await session.commit()
    async with engine.connect() as connection:
        ids += await SEQUENCED.publish(connection, event("a"))
        await connection.commit()
    await engine.dispose()
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        ids += await SEQUENCED.publish(conn, event("a"))
        ids += await SEQUENCED.publish(conn, *[event("a") for _ in range(MIN_EVENTS)])
        await conn.commit()
    found = numbers(db_url)
    assert [found[i][2] for i in ids] == [str(n) for n in range(1, 2 * MIN_EVENTS + 4)]


def test_table_less_mode_carries_the_number_in_the_message(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_create_logical_replication_slot('s_seq', 'test_decoding')")
    wal_only = outbox.Outbox(mode="message", sequence=True)
    with psycopg.connect(db_url) as conn:
        wal_only.publish(conn, event("m"), event("m"))
        conn.commit()
        changes = conn.execute(
            "SELECT data FROM pg_logical_slot_get_binary_changes('s_seq', NULL, NULL)"
        ).fetchall()
        conn.execute("SELECT pg_drop_replication_slot('s_seq')")
        conn.commit()
    # test_decoding prints a message as `message: transactional: 1 prefix: outbox, sz: N
    # content:<bytes>`: the content is the record.
    contents = [bytes(data).split(b"content:", 1)[1] for (data,) in changes
                if bytes(data).startswith(b"message:")]
    assert [decode_message(c).headers["sequence"] for c in contents] == ["1", "2"]


def test_writers_of_one_aggregate_wait_for_each_other_and_others_do_not(db_url: str) -> None:
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as second:
        SEQUENCED.publish(first, event("busy"))  # holds the counter row of Order/busy
        second.execute("SET lock_timeout = '300ms'")
        SEQUENCED.publish(second, event("other"))  # another aggregate: no wait
        second.commit()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            SEQUENCED.publish(second, event("busy"))
        second.rollback()
        first.commit()
        SEQUENCED.publish(second, event("busy"))  # free once the first committed
        second.commit()
    found = sorted(v for v in numbers(db_url).values())
    assert found == [("Order", "busy", "1"), ("Order", "busy", "2"), ("Order", "other", "1")]


def test_an_events_own_sequence_header_is_refused_before_any_sql(db_url: str) -> None:
    own = outbox.Event("Order", "1", "Changed", {}, headers={"sequence": "9"})
    with psycopg.connect(db_url) as conn:
        with pytest.raises(outbox.InvalidEventError, match="own 'sequence' header"):
            SEQUENCED.publish(conn, own)
        assert conn.execute("SELECT count(*) FROM outbox_sequence").fetchone() == (0,)
    # Without sequence=True, the header is the event's own business.
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, own)
        conn.commit()


def test_a_table_without_headers_column_cannot_be_numbered() -> None:
    with pytest.raises(outbox.ConfigurationError, match="no headers column"):
        outbox.Outbox(columns=outbox.ColumnMapping.debezium(), sequence=True)


def test_numbering_before_migrate_says_to_migrate(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url) as conn, pytest.raises(
        outbox.SchemaMissingError, match="outbox migrate up"
    ):
        SEQUENCED.publish(conn, event("1"))


def test_polling_relay_keeps_key_order_of_unlocked_concurrent_writers(
    db_url: str, kafka_bootstrap: str
) -> None:
    """Writers of the same few aggregates take no lock of their own and keep their transactions
    open a little after publishing; one in ten rolls back. The counter row serialises same-key
    commits, so the polling relay publishes each key in number order, without gaps."""
    topic = unique_topic("seq")
    create_topics(kafka_bootstrap, topic, partitions=3)
    keys = [f"agg{i}" for i in range(3)]
    ledger = Ledger()
    lock = threading.Lock()
    errors: list[BaseException] = []
    writers = SEQUENCED

    def write(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(db_url) as conn:
                for _ in range(25):
                    key = rng.choice(keys)
                    published = outbox.Event(topic, key, "Sequenced", {})
                    writers.publish(conn, published)
                    # The number this event took (the counter row is ours until commit).
                    row = conn.execute(
                        "SELECT last_sequence FROM outbox_sequence"
                        " WHERE aggregate_type = %s AND aggregate_id = %s", [topic, key]
                    ).fetchone()
                    assert row is not None
                    # Widen the window between taking a position and committing.
                    conn.execute("SELECT pg_sleep(%s)", [rng.random() / 100])
                    commit = rng.random() > 0.1
                    if commit:
                        conn.commit()
                    else:
                        conn.rollback()
                    with lock:
                        ledger.record(str(published.id), key, int(row[0]), commit)
        except BaseException as exc:
            errors.append(exc)

    reader = TopicReader(kafka_bootstrap, topic)
    settings = RelaySettings(source="postgres-poll", db_url=db_url,
                             kafka_bootstrap=kafka_bootstrap, poll_interval=0.05, batch_size=20)
    with RelayThread(settings):
        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        reader.read_ids(ledger.committed_ids, timeout=90)
    delivered = reader.drain(quiet=1.0)
    reader.close()
    verdict = ledger.check(delivered)
    verdict.assert_holds()
    assert verdict.dup == 0
    by_key: dict[str, list[int]] = {}
    for message in delivered:
        assert message.key is not None
        by_key.setdefault(message.key, []).append(int(message.headers["sequence"]))
    # In each key's partition: 1, 2, 3, ... (a rolled-back number is reused, never skipped).
    assert {key: seqs == list(range(1, len(seqs) + 1)) for key, seqs in by_key.items()} == {
        key: True for key in by_key}
    assert sum(map(len, by_key.values())) == len(ledger.committed_ids)




@pytest.mark.parametrize("mode", ["table", "message"])
def test_the_wal_relay_forwards_the_number_as_the_sequence_header(
    db_url: str, kafka_bootstrap: str, mode: str
) -> None:
    topic = unique_topic("seqwal")
    create_topics(kafka_bootstrap, topic)
    suffix = uuid.uuid4().hex[:8]
    config = WalSourceConfig(slot=f"seq_{suffix}", publication=f"seq_{suffix}")
    with psycopg.connect(db_url, autocommit=True) as admin:
        setup(admin, config)
    writer = outbox.Outbox(mode=mode, sequence=True)  # type: ignore[arg-type]
    events = [outbox.Event(topic, key, "Changed", {}) for key in ("x", "y", "x")]
    with psycopg.connect(db_url) as conn:
        writer.publish(conn, *events[:2])
        conn.commit()
        writer.publish(conn, events[2])
        conn.commit()
    reader = TopicReader(kafka_bootstrap, topic)
    settings = RelaySettings(source="postgres-wal", db_url=db_url,
                             kafka_bootstrap=kafka_bootstrap, slot=config.slot,
                             publication=config.publication)
    with RelayThread(settings):
        got = reader.read_ids({str(e.id) for e in events})
    reader.close()
    numbers = {m.id: m.headers["sequence"] for m in got}
    assert [numbers[str(e.id)] for e in events] == ["1", "1", "2"]
