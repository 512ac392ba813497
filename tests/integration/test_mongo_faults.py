"""The MongoDB relays under faults: kill -9 of the relay, the broker stopped, MongoDB restarted.

Both sources, each run checked with the ledger. A real `mongod` can be used as described in
tests/support/mongo.py (`OUTBOX_TEST_MONGO_URL`); the broker of the outage test and the server of
the restart test are private ones started from the local stack's binaries.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from outbox import mongo as outbox_mongo
from relay.settings import RelaySettings
from tests.support.kafka import TopicReader, create_topics, unique_topic, unreachable_bootstrap
from tests.support.ledger import Ledger
from tests.support.mongo import (
    SOURCES,
    DocumentWriter,
    check,
    db,  # noqa: F401 - fixture
    mongo_db_url,  # noqa: F401 - fixture
    pending_events,
    settings,
    start,
    token_stored,
)
from tests.support.relays import RelayProcess, RelayThread, wait_for
from tests.support.services import Services

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]

Document = dict[str, Any]


def write_backlog(writer: DocumentWriter, documents: int, per_document: int) -> None:
    """`documents` aggregates with `per_document` pending events each, in bulk."""
    batch = []
    for n in range(documents):
        key = f"k{n}"
        events = [writer.event(key, seq) for seq in range(per_document)]
        batch.append(outbox_mongo.new_document({"_id": key, "version": per_document - 1},
                                               *events))
        for event in events:
            writer.note(event, True)
        if len(batch) == 50:
            writer.db.orders.insert_many(batch)
            batch = []
    if batch:
        writer.db.orders.insert_many(batch)


@pytest.mark.parametrize("source", SOURCES)
def test_kill_9_mid_drain_then_restart_loses_nothing(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str,  # noqa: F811
    tmp_path: Path
) -> None:
    topic = unique_topic("mongokill")
    create_topics(kafka_bootstrap, topic, partitions=3)
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    args = ["--source", source, "--mongo", mongo_db_url, "--collections", "orders",
            "--kafka", kafka_bootstrap, "--batch-size", "500", "--poll-interval", "0.2"]
    relay = RelayProcess(*args, log=tmp_path / "relay.log").start()
    reader = TopicReader(kafka_bootstrap, topic)
    try:
        if source == "mongo-stream":
            # Written while the relay streams, so the kill lands between token stores.
            wait_for(lambda: token_stored(db), 60, "the stream to start")
        write_backlog(writer, documents=200, per_document=100)  # 20,000 events
        total = len(ledger.committed_ids)
        reader.read_until(lambda got: len(got) >= total // 4, timeout=120)
        assert relay.kill(signal.SIGKILL) == -signal.SIGKILL
        assert pending_events(db) > 0, "the relay finished before it could be killed mid-way"
        for n in range(20):  # more work while no relay runs
            assert writer.append(f"k{n}")
        # The new process waits as a standby until the dead one's lease expires.
        relay = RelayProcess(*args, log=tmp_path / "relay.log").start()
        reader.read_ids(ledger.committed_ids, timeout=180)
        wait_for(lambda: pending_events(db) == 0, 60, "the backlog to be acknowledged")
        assert relay.kill(signal.SIGTERM) == 0, relay.log()
    finally:
        relay.close()
    verdict = check(ledger, reader)
    assert verdict.dup <= total // 2, f"{verdict.dup} duplicates: more than the batch in flight"


@pytest.mark.parametrize("source", SOURCES)
def test_broker_stopped_while_writing_acknowledges_nothing_and_loses_nothing(
    source: str, private_kafka: Any, db: Database[Document], mongo_db_url: str,  # noqa: F811
) -> None:
    bootstrap = private_kafka.start()["OUTBOX_KAFKA_BOOTSTRAP"]
    topic = unique_topic("mongooutage")
    create_topics(bootstrap, topic, partitions=2)
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    relay_settings = RelaySettings(
        source=source, mongo_url=mongo_db_url, collections=("orders",),
        kafka_bootstrap=bootstrap, poll_interval=0.2, shutdown_timeout=5)
    relay = start(source, db, relay_settings)
    try:
        write_backlog(writer, documents=20, per_document=10)
        wait_for(lambda: pending_events(db) == 0, 60, "the first events to be acknowledged")
        private_kafka.stop()
        outage_started = time.monotonic()
        for n in range(20):
            for _ in range(5):
                assert writer.append(f"k{n}")
        # Nothing can be acknowledged while the broker is away.
        while time.monotonic() - outage_started < 15:
            assert pending_events(db) == 100
            assert relay.alive
            time.sleep(1)
        private_kafka.start()
        wait_for(lambda: pending_events(db) == 0, 120, "the backlog to drain after the outage")
    finally:
        relay.stop()
    reader = TopicReader(bootstrap, topic)
    check(ledger, reader)


@pytest.fixture
def private_mongo(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, str]]:
    """A MongoDB server of this test alone, for tests that restart it."""
    if not services.local_stack:
        pytest.skip("fault tests start private servers from the local stack's binaries; "
                    f"services here come from {services.origin}")
    from deploy.local.mongo import MongoService

    server = MongoService(tmp_path_factory.mktemp("mongo"))
    url = server.start()["OUTBOX_MONGO_URL"]
    yield server, url
    server.stop()


@pytest.mark.parametrize("source", SOURCES)
def test_mongodb_restart_under_load_reconnects_and_loses_nothing(
    source: str, private_mongo: tuple[Any, str], kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    server, url = private_mongo
    client: MongoClient[Document] = MongoClient(url, serverSelectionTimeoutMS=30_000)
    database = client.get_default_database()
    database.create_collection("orders")
    topic = unique_topic("mongorestart")
    create_topics(kafka_bootstrap, topic, partitions=2)
    ledger = Ledger()
    writer = DocumentWriter(database, topic, ledger)
    caplog.set_level(logging.WARNING, logger="relay.daemon")
    relay_settings = RelaySettings(
        source=source, mongo_url=url, collections=("orders",), kafka_bootstrap=kafka_bootstrap,
        poll_interval=0.2, batch_size=500)
    relay: RelayThread | None = None
    try:
        relay = start(source, database, relay_settings)
        write_backlog(writer, documents=100, per_document=100)  # 10,000 events
        wait_for(lambda: pending_events(database) < 9000, 60, "the relay to be under way")
        server.stop()
        # Down for longer than the relay's server-selection timeout (10 s): the driver's own
        # retries give up and the relay must restart and reconnect by itself.
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 15:
            assert relay.alive
            time.sleep(1)
        server.start()
        for n in range(10):
            for _ in range(3):
                assert writer.append(f"k{n}")
        wait_for(lambda: pending_events(database) == 0, 180,
                 "the backlog to drain after the restart")
        assert relay.alive
    finally:
        if relay is not None:
            relay.stop()
        client.close()
    reader = TopicReader(kafka_bootstrap, topic)
    check(ledger, reader)
    assert any(getattr(r, "event", None) == "relay_restart" for r in caplog.records)


@pytest.mark.parametrize("source", SOURCES)
def test_full_producer_queue_keeps_the_lease_and_does_not_hold_a_stop_back(
    source: str, db: Database[Document], mongo_db_url: str  # noqa: F811
) -> None:
    """Kafka away and librdkafka's queue full: `send` waits, renewing the lease meanwhile (else a
    standby would take over), and a stop ends the wait instead of waiting for the broker."""
    writer = DocumentWriter(db, "Blocked", Ledger())
    write_backlog(writer, documents=100, per_document=1)
    relay = RelayThread(settings(
        source, mongo_db_url, unreachable_bootstrap(),
        kafka_settings={"queue.buffering.max.messages": "5"}, shutdown_timeout=300)).start()

    def lease_expiry() -> Any:
        lease = db.outbox_relay_state.find_one({"_id": {"$regex": "^lease:"}})
        return lease["expires_at"] if lease else None

    try:
        wait_for(lambda: lease_expiry() is not None, 30, "the relay to take the lease")
        first = lease_expiry()
        wait_for(lambda: lease_expiry() > first, 30, "the lease renewed while Kafka is full")
    finally:
        relay.stop(timeout=30)
    assert pending_events(db) == 100  # nothing acknowledged, nothing lost
