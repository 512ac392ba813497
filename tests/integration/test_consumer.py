"""The idempotent consumer against real Kafka and PostgreSQL: dedup, dead letters, replay, purge.

Also the helpers the other test_consumer_* modules share.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer, TopicPartition
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from outbox.consumer import Consumer, InboxMissingError, Message, RetryPolicy
from outbox.consumer import dead_letters as dlq
from outbox.record import OutboxRecord
from relay.sinks.kafka.sink import kafka_headers
from tests.support.kafka import Received, TopicReader, create_topics, unique_topic
from tests.support.pg import sqlalchemy_url

pytestmark = pytest.mark.integration

FAST_RETRY = RetryPolicy(tries=3, base_delay=0.05, max_delay=0.2, jitter=0.0)


# -- helpers shared by the consumer tests -------------------------------------------------------


def order_record(n: int, key: str | None = None, event_type: str = "OrderCreated",
                 event_id: uuid.UUID | None = None) -> OutboxRecord:
    return OutboxRecord(
        id=event_id or uuid.uuid4(),
        aggregate_type="Order",
        aggregate_id=key or str(n % 10),
        event_type=event_type,
        payload=json.dumps({"n": n}).encode(),
        content_type="application/json",
        headers={"tenant": "eu"},
    )


def produce(bootstrap: str, topic: str, records: Sequence[OutboxRecord]) -> None:
    """Produce as the relay does (relay.sinks.kafka.sink.kafka_headers: the message contract)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    failures: list[str] = []
    for record in records:
        producer.produce(
            topic, value=record.payload, key=record.aggregate_id.encode(),
            headers=kafka_headers(record),
            on_delivery=lambda err, _: failures.append(str(err)) if err else None,
        )
    assert producer.flush(30) == 0 and failures == []


def produce_raw(bootstrap: str, topic: str, key: bytes, value: bytes | None,
                headers: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, value=value, key=key, headers=headers)  # type: ignore[arg-type]
    assert producer.flush(30) == 0


def kafka_settings(bootstrap: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500, **extra}


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    client = KafkaConsumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = client.committed([TopicPartition(topic, p) for p in range(partitions)],
                                 timeout=30)
        return [tp.offset for tp in found]
    finally:
        client.close()


def applied_rows(url: str) -> list[tuple[uuid.UUID, int]]:
    with psycopg.connect(url) as conn:
        return [(row[0], row[1]) for row in
                conn.execute("SELECT event_id, n FROM applied ORDER BY n").fetchall()]


def inbox_ids(url: str, consumer: str) -> set[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute(
            "SELECT event_id FROM outbox_inbox WHERE consumer = %s", [consumer]).fetchall()}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def make_applied_table(db_url: str) -> str:
    # No unique constraint on purpose: a message applied twice shows up as two rows.
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE applied (event_id uuid NOT NULL, n int NOT NULL,"
                     " partition int, consumer text)")
    return db_url


def make_topic(bootstrap: str, partitions: int = 1) -> str:
    """A fresh topic and its dead-letter topic."""
    name = unique_topic("orders")
    create_topics(bootstrap, name, dlq.topic_for(dlq.DEFAULT_TEMPLATE, name),
                  partitions=partitions)
    return name


@pytest.fixture
def applied_table(db_url: str) -> str:
    return make_applied_table(db_url)


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return make_topic(kafka_bootstrap)


def insert_applied_psycopg(conn: psycopg.Connection[Any], message: Message) -> None:
    conn.execute("INSERT INTO applied VALUES (%s, %s, %s)",
                 [message.id, message.json()["n"], message.partition])


def insert_applied_sqlalchemy(session: Session, message: Message) -> None:
    session.execute(text("INSERT INTO applied VALUES (:id, :n, :p)"),
                    {"id": message.id, "n": message.json()["n"], "p": message.partition})


# -- PostgreSQL: the same message twice is applied once -----------------------------------------


@pytest.fixture(params=["conninfo", "pool", "sqlalchemy-engine", "sqlalchemy-sessionmaker"])
def database(request: pytest.FixtureRequest, applied_table: str) -> Iterator[
        tuple[Any, Callable[..., None]]]:
    url = applied_table
    if request.param == "conninfo":
        yield url, insert_applied_psycopg
    elif request.param == "pool":
        with ConnectionPool(url, min_size=1, max_size=2, open=True) as pool:
            yield pool, insert_applied_psycopg
    else:
        engine = create_engine(sqlalchemy_url(url))
        db = engine if request.param == "sqlalchemy-engine" else sessionmaker(engine)
        yield db, insert_applied_sqlalchemy
        engine.dispose()


def test_same_message_delivered_twice_is_applied_once(
    database: tuple[Any, Callable[..., None]], db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    db, handler = database
    records = [order_record(n) for n in range(20)]
    produce(kafka_bootstrap, topic, records)
    produce(kafka_bootstrap, topic, records)  # the relay published them again after a crash
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=db, batch_size=7)
    consumer.handler("OrderCreated")(handler)
    stats = consumer.run(max_messages=40, timeout=60)
    assert (stats.processed, stats.duplicates, stats.dead_lettered) == (20, 20, 0)
    rows = applied_rows(db_url)
    assert sorted(n for _, n in rows) == list(range(20))
    assert {event_id for event_id, _ in rows} == {r.id for r in records}
    assert inbox_ids(db_url, "billing") == {r.id for r in records}
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [40]


def test_consumers_with_different_names_each_apply_the_event(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    records = [order_record(n) for n in range(3)]
    produce(kafka_bootstrap, topic, records)
    for name in ("billing", "shipping"):
        consumer = Consumer(name=name, kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                            db=applied_table)
        consumer.handler("OrderCreated")(insert_applied_psycopg)
        assert consumer.run(max_messages=3, timeout=60).processed == 3
    assert len(applied_rows(applied_table)) == 6


def test_handler_writes_and_dedup_row_commit_together(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    """A handler that writes, then fails, leaves neither its write nor a dedup row; the other
    messages of its batch are applied exactly once."""
    records = [order_record(n) for n in range(30)]
    produce(kafka_bootstrap, topic, records)
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table, batch_size=30,
                        retry=RetryPolicy(tries=2, base_delay=0.01, max_delay=0.01))

    @consumer.handler("OrderCreated")
    def half_done(conn: psycopg.Connection[Any], message: Message) -> None:
        insert_applied_psycopg(conn, message)
        if message.json()["n"] in (0, 17, 29):
            raise ValueError("crashed after writing")

    stats = consumer.run(max_messages=30, timeout=60)
    assert (stats.processed, stats.dead_lettered, stats.retries) == (27, 3, 3)
    applied = sorted(n for _, n in applied_rows(applied_table))
    assert applied == [n for n in range(30) if n not in (0, 17, 29)]
    failed_ids = {r.id for r in records if json.loads(r.payload)["n"] in (0, 17, 29)}
    assert not inbox_ids(applied_table, "billing") & failed_ids


def test_pipeline_mode_still_pins_a_failing_statement_on_its_message(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    """In pipeline mode a statement's error surfaces later (at the commit): the consumer halves
    the batch until the failing message is alone; the others apply exactly once."""
    with psycopg.connect(applied_table) as conn:
        conn.execute("ALTER TABLE applied ADD CONSTRAINT not_13 CHECK (n <> 13)")
    produce(kafka_bootstrap, topic, [order_record(n) for n in range(40)])
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table, batch_size=40, pipeline=True,
                        retry=RetryPolicy(tries=2, base_delay=0.01, max_delay=0.01))
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    stats = consumer.run(max_messages=40, timeout=60)
    assert (stats.processed, stats.dead_lettered) == (39, 1)
    assert sorted(n for _, n in applied_rows(applied_table)) == [
        n for n in range(40) if n != 13]
    reader = TopicReader(kafka_bootstrap, f"{topic}.dlq")
    try:
        [letter] = reader.read_until(lambda got: len(got) >= 1, timeout=30)
    finally:
        reader.close()
    assert letter.headers[dlq.ORIGINAL_OFFSET] == "13"
    assert "CheckViolation" in letter.headers[dlq.ERROR]


# -- failures: retries, dead letters, replay ----------------------------------------------------


def test_failing_handler_is_retried_then_dead_lettered_and_replay_brings_it_back(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    records = [order_record(n) for n in range(6)]
    produce(kafka_bootstrap, topic, records)
    broken = {"on": True}
    calls: list[int] = []
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table, retry=FAST_RETRY)

    @consumer.handler("OrderCreated")
    def handle(conn: psycopg.Connection[Any], message: Message) -> None:
        n = message.json()["n"]
        calls.append(n)
        if broken["on"] and n == 3:
            raise ValueError("payment service said no")
        insert_applied_psycopg(conn, message)

    stats = consumer.run(max_messages=6, timeout=60)
    assert (stats.processed, stats.dead_lettered, stats.retries) == (5, 1, 2)
    assert calls.count(3) == 3
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [6]

    reader = TopicReader(kafka_bootstrap, f"{topic}.dlq")
    try:
        [letter] = reader.read_until(lambda got: len(got) >= 1, timeout=30)
    finally:
        reader.close()
    failed = records[3]
    assert letter.key == failed.aggregate_id and letter.value == failed.payload
    assert letter.headers["id"] == str(failed.id)
    assert letter.headers["event_type"] == "OrderCreated"
    assert letter.headers["tenant"] == "eu"
    assert letter.headers[dlq.ORIGINAL_TOPIC] == topic
    assert letter.headers[dlq.ORIGINAL_PARTITION] == "0"
    assert letter.headers[dlq.ORIGINAL_OFFSET] == "3"
    assert letter.headers[dlq.CONSUMER] == "billing"
    assert letter.headers[dlq.ATTEMPTS] == "3"
    assert "ValueError: payment service said no" in letter.headers[dlq.ERROR]

    replayed = run_cli("dlq", "replay", "--kafka", kafka_bootstrap, "--topic", f"{topic}.dlq",
                       "--max", "5")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 dead letters" in replayed.stdout

    broken["on"] = False
    stats = consumer.run(max_messages=1, timeout=60)
    assert (stats.processed, stats.duplicates) == (1, 0)
    assert sorted(n for _, n in applied_rows(applied_table)) == list(range(6))

    again = run_cli("dlq", "replay", "--kafka", kafka_bootstrap, "--topic", f"{topic}.dlq",
                    "--idle-timeout", "3")
    assert again.returncode == 0 and "replayed 0 dead letters" in again.stdout


def test_replayed_message_restores_the_original_headers(kafka_bootstrap: str, topic: str) -> None:
    from outbox.consumer.replay import replay

    record = order_record(1)
    original = kafka_headers(record)
    letter_headers = [*original, (dlq.ORIGINAL_TOPIC, topic.encode()),
                      (dlq.ERROR, b"boom"), (dlq.ORIGINAL_OFFSET, b"0")]
    produce_raw(kafka_bootstrap, f"{topic}.dlq", b"1", record.payload,
                letter_headers)  # type: ignore[arg-type]
    result = replay({"bootstrap.servers": kafka_bootstrap}, f"{topic}.dlq", max_messages=1,
                    group=f"replay-{uuid.uuid4().hex}")
    assert (result.replayed, result.skipped) == (1, 0)
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        [back] = reader.read_until(lambda got: len(got) >= 1, timeout=30)
    finally:
        reader.close()
    assert back.key == "1" and back.value == record.payload
    assert back.headers == {
        k: v.decode() if isinstance(v, bytes) else v for k, v in original
    }


def test_unreadable_messages_are_dead_lettered_with_the_reason(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    produce_raw(kafka_bootstrap, topic, b"1", b'{"n": 1}', [("event_type", b"OrderCreated")])
    produce_raw(kafka_bootstrap, topic, b"2", b"{not json",
                [("id", str(uuid.uuid4()).encode()), ("event_type", b"OrderCreated")])
    produce_raw(kafka_bootstrap, topic, b"3", b'{"n": 3}',
                [("id", b"42"), ("event_type", b"OrderCreated")])
    good = order_record(4)
    produce(kafka_bootstrap, topic, [good])
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table)
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    stats = consumer.run(max_messages=4, timeout=60)
    assert (stats.processed, stats.dead_lettered) == (1, 3)
    assert applied_rows(applied_table) == [(good.id, 4)]
    reader = TopicReader(kafka_bootstrap, f"{topic}.dlq")
    try:
        letters: list[Received] = reader.read_until(lambda got: len(got) >= 3, timeout=30)
    finally:
        reader.close()
    reasons = [m.headers[dlq.ERROR] for m in sorted(letters, key=lambda m: m.key or "")]
    assert "no 'id' header" in reasons[0]
    assert "not valid JSON" in reasons[1]
    assert "is not a UUID" in reasons[2]
    assert all(m.headers[dlq.ATTEMPTS] == "0" for m in letters)
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [4]


def test_events_without_a_handler_are_acknowledged_and_counted(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    produce(kafka_bootstrap, topic, [order_record(1, event_type="OrderShipped"),
                                     order_record(2)])
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table)
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    stats = consumer.run(max_messages=2, timeout=60)
    assert (stats.processed, stats.ignored) == (1, 1)
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [2]


def test_stop_before_run_makes_run_return_at_once(applied_table: str,
                                                  kafka_bootstrap: str, topic: str) -> None:
    produce(kafka_bootstrap, topic, [order_record(1)])
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table)
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    consumer.stop()
    assert consumer.run(timeout=30).processed == 0
    assert consumer.run(max_messages=1, timeout=60).processed == 1


def test_missing_inbox_table_fails_before_consuming(empty_db_url: str,
                                                   kafka_bootstrap: str) -> None:
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap),
                        topics=["never-read"], db=empty_db_url)
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    with pytest.raises(InboxMissingError, match="outbox migrate up"):
        consumer.run(timeout=5)


# -- purge -------------------------------------------------------------------------------------


def age_inbox(url: str, rows: dict[str, list[int]]) -> None:
    """Insert dedup rows for each consumer, `days` old."""
    with psycopg.connect(url) as conn:
        for consumer, ages in rows.items():
            for days in ages:
                conn.execute(
                    "INSERT INTO outbox_inbox (consumer, event_id, processed_at)"
                    " VALUES (%s, %s, now() - %s)",
                    [consumer, uuid.uuid4(), dt.timedelta(days=days)])


def inbox_ages(url: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        return [(c, int(d)) for c, d in conn.execute(
            "SELECT consumer, round(extract(epoch FROM now() - processed_at) / 86400)"
            " FROM outbox_inbox ORDER BY 1, 2").fetchall()]


def test_inbox_purge_cli_removes_only_old_rows(db_url: str) -> None:
    age_inbox(db_url, {"billing": [0, 3, 8, 30], "shipping": [1, 9]})
    only = run_cli("inbox", "purge", "--db", db_url, "--older-than", "7d",
                   "--consumer", "billing")
    assert only.returncode == 0, only.stderr
    assert "deleted 2 dedup rows" in only.stdout
    assert inbox_ages(db_url) == [("billing", 0), ("billing", 3), ("shipping", 1),
                                  ("shipping", 9)]
    every = run_cli("inbox", "purge", "--db", db_url, "--older-than", "2d")
    assert every.returncode == 0 and "deleted 2 dedup rows" in every.stdout
    assert inbox_ages(db_url) == [("billing", 0), ("shipping", 1)]
    bad = run_cli("inbox", "purge", "--db", db_url, "--older-than", "soon")
    assert bad.returncode == 1 and "duration 'soon'" in bad.stderr


def test_runner_purges_its_own_old_rows_when_configured(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    age_inbox(applied_table, {"billing": [1, 10], "shipping": [10]})
    produce(kafka_bootstrap, topic, [order_record(1)])
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table, purge_older_than=dt.timedelta(days=7))
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    consumer.run(max_messages=1, timeout=60)
    assert inbox_ages(applied_table) == [("billing", 0), ("billing", 1), ("shipping", 10)]
