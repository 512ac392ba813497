"""The polling relay against real PostgreSQL and Kafka, each run checked with the ledger."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from relay.settings import RelaySettings
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import RelayProcess, RelayThread, wait_for
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("poll")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


def settings(db_url: str, kafka_bootstrap: str, **overrides: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "source": "postgres-poll", "db_url": db_url, "kafka_bootstrap": kafka_bootstrap,
        "poll_interval": 0.2, **overrides,
    }
    return RelaySettings(**values)


def backlog(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
        return int(row[0]) if row else -1


def test_published_event_follows_the_message_contract(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    event = outbox.Event(topic, "42", "OrderCreated", {"orderId": 42}, headers={"tenant": "eu"})
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, event)
        conn.commit()
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(settings(db_url, kafka_bootstrap)):
        (message,) = reader.read_ids({str(event.id)})
        wait_for(lambda: backlog(db_url) == 0, 30, "the published row to be deleted")
    reader.close()
    assert message.key == "42"
    assert json.loads(message.value) == {"orderId": 42}
    assert message.headers == {
        "id": str(event.id), "event_type": "OrderCreated", "aggregate_type": topic,
        "content_type": "application/json", "tenant": "eu",
    }


def test_late_and_reverse_order_commits_are_never_skipped_and_rollbacks_never_published(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(settings(db_url, kafka_bootstrap)), \
            psycopg.connect(db_url) as long_tx, psycopg.connect(db_url) as a, \
            psycopg.connect(db_url) as b, psycopg.connect(db_url) as c:
        # A transaction holds early positions open while thousands of later events commit.
        held = writer.events("held", 3)
        outbox.publish(long_tx, *held)
        # Three transactions that take positions in order a, b, c and commit c, b, a.
        ev_a, ev_b, ev_c = writer.events("a", 1), writer.events("b", 1), writer.events("c", 1)
        for conn, events in ((a, ev_a), (b, ev_b), (c, ev_c)):
            outbox.publish(conn, *events)
        for conn, events in ((c, ev_c), (b, ev_b), (a, ev_a)):
            conn.commit()
            writer.note(events, committed=True)
        writer.write(a, writer.events("rolled-back", 2), commit=False)
        writer.write_many(db_url, keys=10, per_key=300)
        # Later commits flow while the long transaction is still open.
        reader.read_ids(ledger.committed_ids - {str(e.id) for e in held}, timeout=90)
        long_tx.commit()
        writer.note(held, committed=True)
        reader.read_ids(ledger.committed_ids, timeout=60)
        wait_for(lambda: backlog(db_url) == 0, 30, "published rows to be deleted")
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0


def test_unpublishable_events_are_parked_while_others_flow(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    big = outbox.Outbox(max_payload_bytes=4 * 1024 * 1024)
    too_large = outbox.Event(topic, "big", "Huge", {"blob": "x" * 2_000_000})
    bad_topic = outbox.Event(topic, "k", "Misrouted", {}, topic="not a valid topic!")
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    with psycopg.connect(db_url) as conn:
        big.publish(conn, too_large, bad_topic)
        conn.commit()
    writer.write_many(db_url, keys=3, per_key=20)
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(settings(db_url, kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: backlog(db_url) == 0, 30, "the outbox to be empty")
    with psycopg.connect(db_url) as conn:
        parked = dict(conn.execute("SELECT id, reason FROM outbox_parked").fetchall())
    assert set(parked) == {too_large.id, bad_topic.id}
    assert "too large" in parked[too_large.id].lower() or "size" in parked[too_large.id].lower()
    assert "invalid topic" in parked[bad_topic.id]
    ledger.check(reader.drain(quiet=1.0)).assert_holds()
    reader.close()


def test_an_event_for_a_topic_that_cannot_be_created_is_parked_without_restarts(
    db_url: str, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker auto-creates topics, but not one whose name collides with an existing topic
    # ("a.b" and "a_b"): the same answer as a missing topic with auto-creation off.
    existing = unique_topic("taken.")
    create_topics(kafka_bootstrap, existing)
    missing = outbox.Event(topic, "k", "Lost", {}, topic=existing.replace(".", "_"))
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, missing)
        conn.commit()
    writer.write_many(db_url, keys=3, per_key=5)
    reader = TopicReader(kafka_bootstrap, topic)
    # librdkafka waits this long for a topic to appear before it reports it missing.
    quick = {"topic.metadata.propagation.max.ms": "2000"}
    with RelayThread(settings(db_url, kafka_bootstrap, kafka_settings=quick)):
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: backlog(db_url) == 0, 60, "the event for the missing topic parked")
    with psycopg.connect(db_url) as conn:
        parked = conn.execute("SELECT id, reason FROM outbox_parked").fetchall()
    assert parked == [(missing.id, parked[0][1])]
    assert "UNKNOWN_TOPIC_OR_PART" in parked[0][1]
    assert not [r for r in caplog.records if getattr(r, "event", None) == "relay_restart"]
    ledger.check(reader.drain(quiet=1.0)).assert_holds()
    reader.close()


def test_two_relays_at_once_one_publishes_and_the_standby_takes_over(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    first = RelayThread(settings(db_url, kafka_bootstrap)).start()
    second = RelayThread(settings(db_url, kafka_bootstrap)).start()
    writer.write_many(db_url, keys=5, per_key=100)
    reader.read_ids(ledger.committed_ids)
    first.stop()
    writer.write_many(db_url, keys=5, per_key=100)
    reader.read_ids(ledger.committed_ids)
    second.stop()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()


def test_keep_published_marks_rows_instead_of_deleting(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(db_url, keys=2, per_key=10)
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(settings(db_url, kafka_bootstrap, keep_published=__import__(
            "datetime").timedelta(days=1))):
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: backlog(db_url) == 0, 30, "rows to be marked published")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (20,)
    reader.close()


@pytest.mark.fault
@pytest.mark.slow
def test_kill_9_mid_batch_then_restart_loses_nothing(
    db_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(db_url, keys=20, per_key=1500, per_transaction=100)  # 30,000 events
    total = len(ledger.committed_ids)
    reader = TopicReader(kafka_bootstrap, topic)
    args = ["--source", "postgres-poll", "--db", db_url, "--kafka", kafka_bootstrap,
            "--batch-size", "2000"]
    relay = RelayProcess(*args, log=tmp_path / "relay.log").start()
    try:
        reader.read_until(lambda got: len(got) >= total // 4, timeout=60)
        relay.kill(signal.SIGKILL)
        assert backlog(db_url) > 0, "the relay finished before it could be killed mid-way"
        relay = RelayProcess(*args, log=tmp_path / "relay.log").start()
        reader.read_ids(ledger.committed_ids, timeout=120)
        wait_for(lambda: backlog(db_url) == 0, 60, "the backlog to be acknowledged")
        assert relay.kill(signal.SIGTERM) == 0, relay.log()
    finally:
        relay.close()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()


def test_sigterm_acknowledges_outstanding_deliveries_and_exits_zero(
    db_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(db_url, keys=4, per_key=50)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = RelayProcess("--db", db_url, "--kafka", kafka_bootstrap,
                         log=tmp_path / "relay.log").start()
    try:
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: backlog(db_url) == 0, 30, "acknowledgement")
        assert relay.kill(signal.SIGTERM) == 0
    finally:
        relay.close()
    log = relay.log()
    assert '"event": "relay_exit"' in log
    assert "password" not in log.lower() or "***" in log
    reader.close()


def test_relay_refuses_to_start_without_the_schema(empty_db_url: str, kafka_bootstrap: str) -> None:
    thread = RelayThread(settings(empty_db_url, kafka_bootstrap)).start()
    with pytest.raises(outbox.OutboxError, match="outbox migrate up"):
        thread.stop()


def test_concurrent_writers_serialised_per_aggregate_keep_commit_order(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    """Writers lock the aggregate row, write the next sequence number, and hold the
    transaction open a little: commits interleave and land below the relay's cursor."""
    import random
    import threading

    keys = [f"agg{i}" for i in range(6)]
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE aggregates (key text PRIMARY KEY, seq int NOT NULL)")
        conn.cursor().executemany("INSERT INTO aggregates VALUES (%s, 0)", [(k,) for k in keys])
        conn.commit()
    ledger = Ledger()
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(db_url) as conn:
            for _ in range(60):
                key = rng.choice(keys)
                row = conn.execute(
                    "UPDATE aggregates SET seq = seq + 1 WHERE key = %s RETURNING seq", [key]
                ).fetchone()
                assert row is not None
                event = outbox.Event(topic, key, "Sequenced", {"seq": row[0]})
                outbox.publish(conn, event)
                conn.execute("SELECT pg_sleep(%s)", [rng.random() * 0.02])
                commit = rng.random() > 0.1
                conn.commit() if commit else conn.rollback()
                with lock:
                    ledger.record(str(event.id), key, row[0], commit)

    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(settings(db_url, kafka_bootstrap)):
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reader.read_ids(ledger.committed_ids, timeout=90)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0


def test_parked_events_are_listed_and_retried_from_the_cli(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    import subprocess
    import sys

    misrouted = outbox.Event(topic, "k", "Misrouted", {"n": 1}, topic="bad topic!")
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, misrouted)
        conn.commit()
    with RelayThread(settings(db_url, kafka_bootstrap)):
        wait_for(lambda: backlog(db_url) == 0, 30, "the event to be parked")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay.cli", "parked", *args, "--db", db_url],
                              capture_output=True, text=True, timeout=60)

    listed = cli("list")
    assert listed.returncode == 0 and str(misrouted.id) in listed.stdout
    assert "invalid topic name" in listed.stdout
    with psycopg.connect(db_url) as conn:  # the cause is fixed: route it to a valid topic
        conn.execute("UPDATE outbox_parked SET topic = %s", [topic])
        conn.commit()
    retried = cli("retry", str(misrouted.id))
    assert retried.returncode == 0 and "re-queued 1 event" in retried.stdout
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(settings(db_url, kafka_bootstrap)):
        reader.read_ids({str(misrouted.id)})
    reader.close()
    assert "no parked events" in cli("list").stdout
