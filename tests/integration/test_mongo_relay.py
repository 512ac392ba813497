"""The MongoDB relay sources (mongo-poll, mongo-stream) against real Kafka and a MongoDB server.

Every test runs for both sources (one contract), each run checked with the ledger of
RELIABILITY.md. The MongoDB server is the local stack's unless `OUTBOX_TEST_MONGO_URL` names
another; the tests run unchanged against a real `mongod`, which must be a replica set (change
streams and transactions need one)::

    mongod --replSet rs0 --bind_ip 127.0.0.1 --port 27017 --dbpath /tmp/rs0 &
    mongosh --quiet --eval 'rs.initiate()'
    OUTBOX_TEST_MONGO_URL='mongodb://127.0.0.1:27017/outbox?replicaSet=rs0' \\
        pytest -m integration tests/integration/test_mongo_relay.py

The database in the URL is only a default: each test uses a database of its own and drops it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError

import outbox
from outbox import mongo as outbox_mongo
from relay.mongo import MongoRelayConfig, mongo_gauges
from relay.settings import RelaySettings
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import RelayThread, wait_for

pytestmark = pytest.mark.integration

Document = dict[str, Any]
SOURCES = ("mongo-poll", "mongo-stream")


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mongo_db_url(mongo_url: str) -> Iterator[str]:
    """A URL naming a database of this test alone (dropped afterwards)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = with_database(mongo_url, name)
    client: MongoClient[Document] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    # Created up front: collections created implicitly inside transactions conflict.
    for collection in ("orders", "outbox"):
        client[name].create_collection(collection)
    yield url
    client.drop_database(name)
    client.close()


@pytest.fixture
def db(mongo_db_url: str) -> Iterator[Database[Document]]:
    client: MongoClient[Document] = MongoClient(mongo_db_url, serverSelectionTimeoutMS=10_000)
    yield client.get_default_database()
    client.close()


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("mongo")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


def settings(source: str, mongo_db_url: str, kafka: str, **overrides: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "source": source, "mongo_url": mongo_db_url, "collections": ("orders",),
        "kafka_bootstrap": kafka, "poll_interval": 0.2, **overrides}
    return RelaySettings(**values)


def pending_events(db: Database[Document], collection: str = "orders") -> int:
    """Entries still embedded in the documents, plus outbox-collection documents."""
    embedded = sum(
        len(document.get("_outbox", []))
        for document in db[collection].find({"_outbox.id": {"$exists": True}}, {"_outbox.id": 1})
    )
    return embedded + db.outbox.count_documents({})


def token_stored(db: Database[Document]) -> bool:
    return db.outbox_relay_state.find_one({"_id": {"$regex": "^resume-token:"}}) is not None


def start(source: str, db: Database[Document], relay_settings: RelaySettings) -> RelayThread:
    """Start a relay; a stream relay is returned once it streams (its first token stored)."""
    relay = RelayThread(relay_settings).start()
    if source == "mongo-stream":
        wait_for(lambda: token_stored(db) or not relay.alive, 60, "the stream to start")
        assert relay.alive, "the relay died at start-up"
    return relay


class DocumentWriter:
    """Appends sequenced events to aggregate documents, as an application with optimistic
    concurrency would: the sequence number is the document's version, so list order and
    sequence order agree even with writers racing on the same document."""

    def __init__(self, db: Database[Document], topic: str, ledger: Ledger) -> None:
        self.db = db
        self.topic = topic
        self.ledger = ledger
        self.lock = threading.Lock()

    def event(self, key: str, seq: int, **options: Any) -> outbox.Event:
        return outbox.Event(self.topic, key, "Sequenced", {"seq": seq}, **options)

    def note(self, event: outbox.Event, committed: bool) -> None:
        with self.lock:
            self.ledger.record(str(event.id), event.aggregate_id, event.payload["seq"], committed)

    def create(self, key: str, events: int = 1) -> None:
        made = [self.event(key, seq) for seq in range(events)]
        self.db.orders.insert_one(
            outbox_mongo.new_document({"_id": key, "version": events - 1}, *made))
        for event in made:
            self.note(event, True)

    def append(self, key: str, *, rollback: bool = False) -> bool:
        """One conditional update: True if it committed (False: lost a race or rolled back)."""
        current = self.db.orders.find_one({"_id": key}, {"version": 1})
        assert current is not None
        version = current["version"] + 1
        event = self.event(key, version)
        update = outbox_mongo.with_events({"$set": {"version": version}}, event)
        if not rollback:
            result = self.db.orders.update_one({"_id": key, "version": version - 1}, update)
            if result.modified_count:
                self.note(event, True)
            return bool(result.modified_count)
        client = self.db.client
        try:
            with client.start_session() as session:
                session.start_transaction()
                self.db.orders.update_one(
                    {"_id": key, "version": version - 1}, update, session=session)
                session.abort_transaction()
        except PyMongoError:
            pass  # a write conflict with another writer: nothing was written either way
        self.note(event, False)
        return False


def check(ledger: Ledger, reader: TopicReader) -> Any:
    reader.read_ids(ledger.committed_ids, timeout=120)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    return verdict


def test_published_event_follows_the_message_contract_and_is_pulled(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    created = outbox.Event(topic, "42", "OrderCreated", {"orderId": 42}, headers={"tenant": "eu"})
    approved = outbox_mongo.event_for({"_id": "42"}, topic, "OrderApproved", {"orderId": 42})
    db.orders.insert_one(outbox_mongo.new_document({"_id": "42", "state": "NEW"}, created))
    reader = TopicReader(kafka_bootstrap, topic)
    relay = start(source, db, settings(source, mongo_db_url, kafka_bootstrap))
    try:
        db.orders.update_one(
            {"_id": "42"}, outbox_mongo.with_events({"$set": {"state": "APPROVED"}}, approved))
        first, second = reader.read_ids({str(created.id), str(approved.id)})[:2]
        wait_for(lambda: pending_events(db) == 0, 30, "the published entries to be pulled")
    finally:
        relay.stop()
    reader.close()
    assert [first.id, second.id] == [str(created.id), str(approved.id)]
    assert first.key == "42"
    assert json.loads(first.value) == {"orderId": 42}
    assert first.headers == {
        "id": str(created.id), "event_type": "OrderCreated", "aggregate_type": topic,
        "content_type": "application/json", "tenant": "eu"}
    document = db.orders.find_one({"_id": "42"})
    assert document is not None and document["state"] == "APPROVED"
    assert document["_outbox"] == []
    indexes = {index["name"] for index in db.orders.list_indexes()}
    assert "_outbox_pending" in indexes


def test_concurrent_writers_pushing_to_the_same_documents_lose_nothing(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    """Writers race on three documents while the relay pulls from them; some writes are rolled
    back. Pass: nothing lost, nothing phantom, per-document order, no entry pulled that was not
    published."""
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    keys = ["a", "b", "c"]
    for key in keys:
        writer.create(key)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = start(source, db, settings(source, mongo_db_url, kafka_bootstrap,
                                       poll_interval=0.05, batch_size=50))
    try:
        def write(seed: int) -> None:
            rng = random.Random(seed)
            committed = 0
            while committed < 60:
                key = rng.choice(keys)
                if rng.random() < 0.1:
                    writer.append(key, rollback=True)
                elif writer.append(key):
                    committed += 1

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reader.read_ids(ledger.committed_ids, timeout=120)
        wait_for(lambda: pending_events(db) == 0, 60, "every entry to be pulled")
    finally:
        relay.stop()
    check(ledger, reader)
    assert len(ledger.committed_ids) == 3 + 4 * 60
    versions = {d["_id"]: d["version"] for d in db.orders.find()}
    assert sum(versions.values()) == 4 * 60, "every committed write landed"


def test_unpublishable_events_are_parked_while_others_flow(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    big = outbox_mongo.MongoOutbox(max_payload_bytes=4 * 1024 * 1024)
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = start(source, db, settings(source, mongo_db_url, kafka_bootstrap))
    try:
        too_large = outbox.Event(topic, "big", "Huge", {"blob": "x" * 2_000_000})
        misrouted = outbox.Event(topic, "m", "Misrouted", {}, topic="not a valid topic!")
        db.orders.insert_one(big.new_document({"_id": "big", "version": 0}, too_large))
        writer.create("k", events=2)
        db.orders.insert_one(big.new_document({"_id": "m", "version": 0}, misrouted))
        for key in ("k", "other"):
            if key == "other":
                writer.create(key)
            for _ in range(5):
                assert writer.append(key)
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: db.outbox_parked.count_documents({}) == 2, 30, "parking")
        wait_for(lambda: pending_events(db) == 0, 30, "every entry to be pulled")
    finally:
        relay.stop()
    parked = {outbox_mongo.event_id_of(p["_id"]): p for p in db.outbox_parked.find()}
    assert set(parked) == {too_large.id, misrouted.id}
    reason = parked[too_large.id]["reason"].lower()
    assert "too large" in reason or "size" in reason
    assert "invalid topic" in parked[misrouted.id]["reason"]
    assert parked[misrouted.id]["document_id"] == "m"
    assert outbox_mongo.decode_entry(parked[misrouted.id]["entry"]).id == misrouted.id
    check(ledger, reader)


def test_outbox_collection_publishes_committed_transactions_only(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = start(source, db, settings(source, mongo_db_url, kafka_bootstrap))
    try:
        seq: dict[str, int] = defaultdict(int)
        with db.client.start_session() as session:
            for n in range(30):
                key = f"t{n % 3}"
                events = [writer.event(key, seq[key] + i) for i in range(2)]
                seq[key] += 2
                session.start_transaction()
                db.orders.update_one({"_id": key}, {"$inc": {"n": 1}}, upsert=True,
                                     session=session)
                outbox_mongo.publish(db, *events, session=session)
                commit = n % 5 != 4
                if commit:
                    session.commit_transaction()
                else:
                    session.abort_transaction()
                for event in events:
                    writer.note(event, commit)
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: db.outbox.count_documents({}) == 0, 30, "the outbox to be emptied")
    finally:
        relay.stop()
    verdict = check(ledger, reader)
    assert verdict.dup == 0


def test_two_relays_at_once_one_publishes_and_the_standby_takes_over(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str, topic: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.mongo")
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay_settings = settings(source, mongo_db_url, kafka_bootstrap)
    first = start(source, db, relay_settings)
    second = RelayThread(relay_settings).start()
    try:
        wait_for(lambda: any(getattr(r, "event", None) == "relay_standby"
                             for r in caplog.records), 30, "the second relay to stand by")
        for n in range(10):
            writer.create(f"k{n}", events=3)
        reader.read_ids(ledger.committed_ids)
        first.stop()
        for n in range(10, 20):
            writer.create(f"k{n}", events=3)
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: pending_events(db) == 0, 30, "every entry to be pulled")
    finally:
        second.stop()
        if first.alive:
            first.stop()
    check(ledger, reader)


@pytest.mark.parametrize("source", ["mongo-stream"])
def test_change_stream_resumes_from_its_token_after_a_restart(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str, topic: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.mongo")
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay_settings = settings(source, mongo_db_url, kafka_bootstrap)
    relay = start(source, db, relay_settings)
    writer.create("a", events=3)
    reader.read_ids(ledger.committed_ids)
    wait_for(lambda: pending_events(db) == 0, 30, "the first events to be pulled")
    relay.stop()
    # Written while no relay runs: only the stream's replay from the stored token finds them
    # (no scan happens on a resume).
    writer.create("b", events=3)
    for _ in range(3):
        assert writer.append("a")
    caplog.clear()
    relay = RelayThread(relay_settings).start()
    try:
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: pending_events(db) == 0, 30, "the replayed events to be pulled")
    finally:
        relay.stop()
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "stream_resumed" in events and "stream_scan_start" not in events
    verdict = check(ledger, reader)
    assert verdict.dup == 0


@pytest.mark.parametrize("source", ["mongo-stream"])
def test_invalid_resume_token_falls_back_to_a_full_scan(
    source: str, db: Database[Document], mongo_db_url: str, kafka_bootstrap: str, topic: str,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.mongo")
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    for n in range(20):
        writer.create(f"k{n}", events=5)
    scope = "orders|outbox|_outbox"
    db.outbox_relay_state.insert_one(
        {"_id": f"resume-token:{scope}", "token": {"_data": "82DEADBEEF"}})
    reader = TopicReader(kafka_bootstrap, topic)
    relay = RelayThread(settings(source, mongo_db_url, kafka_bootstrap)).start()
    try:
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: pending_events(db) == 0, 30, "the scanned events to be pulled")
        for n in range(5):
            assert writer.append(f"k{n}")  # streamed after the scan
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: pending_events(db) == 0, 30, "the streamed events to be pulled")
    finally:
        relay.stop()
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "stream_token_invalid" in events and "stream_scan_done" in events
    stored = db.outbox_relay_state.find_one({"_id": f"resume-token:{scope}"})
    assert stored is not None and stored["token"] != {"_data": "82DEADBEEF"}
    check(ledger, reader)


def test_backlog_gauges_count_pending_events_and_their_age(
    db: Database[Document], mongo_db_url: str
) -> None:
    writer = DocumentWriter(db, "Order", Ledger())
    for n in range(3):
        writer.create(f"k{n}", events=4)
    relaxed = outbox_mongo.MongoOutbox(allow_without_transaction=True)
    relaxed.publish(db, writer.event("c", 0))
    gauges = mongo_gauges(MongoRelayConfig(url=mongo_db_url, collections=("orders",)))
    assert gauges["backlog_events"]() == 13
    age = gauges["oldest_pending_age_seconds"]()
    assert age is not None and 0 <= age < 60
