"""The polling relay while its broker or its database goes away (private servers per test)."""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
import pytest

from relay.settings import RelaySettings
from tests.support.kafka import TopicReader, create_topics, unique_topic, unreachable_bootstrap
from tests.support.ledger import Ledger
from tests.support.relays import RelayThread, wait_for
from tests.support.writers import SequencedWriter

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]


def backlog(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
        return int(row[0]) if row else -1


def test_broker_stopped_for_30_seconds_while_writing_loses_nothing(
    private_kafka: Any, db_url: str
) -> None:
    bootstrap = private_kafka.start()["OUTBOX_KAFKA_BOOTSTRAP"]
    topic = unique_topic("outage")
    create_topics(bootstrap, topic, partitions=2)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    settings = RelaySettings(source="postgres-poll", db_url=db_url, kafka_bootstrap=bootstrap,
                             poll_interval=0.2)
    with RelayThread(settings):
        writer.write_many(db_url, keys=5, per_key=100)
        wait_for(lambda: backlog(db_url) == 0, 60, "the first events to be acknowledged")
        private_kafka.stop()
        outage_started = time.monotonic()
        writer.write_many(db_url, keys=5, per_key=200)
        # Nothing can be acknowledged while the broker is away.
        while time.monotonic() - outage_started < 30:
            assert backlog(db_url) == 1000
            time.sleep(1)
        private_kafka.start()
        wait_for(lambda: backlog(db_url) == 0, 120, "the backlog to drain after the outage")
    reader = TopicReader(bootstrap, topic)
    reader.read_ids(ledger.committed_ids, timeout=60)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()


def test_postgres_restart_under_load_reconnects_and_loses_nothing(
    private_postgres: tuple[Any, str], kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, db_url = private_postgres
    topic = unique_topic("pgrestart")
    create_topics(kafka_bootstrap, topic, partitions=2)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(db_url, keys=10, per_key=3000, per_transaction=100)  # 30,000 events
    caplog.set_level(logging.WARNING, logger="relay.daemon")
    settings = RelaySettings(source="postgres-poll", db_url=db_url,
                             kafka_bootstrap=kafka_bootstrap, poll_interval=0.2, batch_size=500)
    relay = RelayThread(settings)
    relay.start()
    try:
        wait_for(lambda: backlog(db_url) < 25_000, 60, "the relay to be under way")
        server.stop()
        server.start()
        writer.write_many(db_url, keys=10, per_key=100)
        wait_for(lambda: backlog(db_url) == 0, 120, "the backlog to drain after the restart")
    finally:
        relay.stop()
    reader = TopicReader(kafka_bootstrap, topic)
    reader.read_ids(ledger.committed_ids, timeout=60)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert any(getattr(r, "event", None) == "relay_restart" for r in caplog.records)


def test_full_producer_queue_does_not_hold_a_stop_back(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka away and librdkafka's queue full: `send` waits, and a stop ends the wait instead of
    waiting for the broker (with a shutdown timeout longer than the test's patience)."""
    import outbox

    caplog.set_level(logging.INFO)
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, *[outbox.Event("Blocked", str(n), "E") for n in range(100)])
        conn.commit()
    relay = RelayThread(RelaySettings(
        source="postgres-poll", db_url=db_url, kafka_bootstrap=unreachable_bootstrap(),
        kafka_settings={"queue.buffering.max.messages": "5"}, shutdown_timeout=300)).start()
    try:
        # Active, then sending 100 events into a queue of 5 that nothing drains.
        wait_for(lambda: any(getattr(r, "event", None) == "relay_active"
                             for r in caplog.records), 30, "the relay to start")
    finally:
        relay.stop(timeout=30)
    assert backlog(db_url) == 100  # nothing acknowledged, nothing lost
