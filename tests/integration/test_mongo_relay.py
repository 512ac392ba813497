"""What only the MongoDB relay sources (mongo-poll, mongo-stream) do, against real Kafka and a
MongoDB server; how to point them at a real `mongod` is in tests/support/mongo.py.

The guarantees every source keeps (message format for embedded and outbox-collection events,
no loss, no phantom, per-key order, concurrent writers, parking, stop and restart with the
stream's resume token, standby) are in test_relay_contract.py.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pymongo.database import Database

import outbox
from outbox import mongo as outbox_mongo
from relay.mongo import MongoRelayConfig, mongo_gauges
from tests.support.kafka import TopicReader, create_topics, unique_topic
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
)
from tests.support.relays import RelayThread, wait_for

pytestmark = pytest.mark.integration

Document = dict[str, Any]


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("mongo")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


def test_events_are_pulled_from_their_document_in_order_and_the_pending_index_exists(
    source: str, db: Database[Document], mongo_db_url: str,  # noqa: F811
    kafka_bootstrap: str, topic: str
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
    assert (first.key, second.key) == ("42", "42")  # event_for takes the document's id as key
    document = db.orders.find_one({"_id": "42"})
    assert document is not None and document["state"] == "APPROVED"
    assert document["_outbox"] == []
    indexes = {index["name"] for index in db.orders.list_indexes()}
    assert "_outbox_pending" in indexes


def test_a_parked_entry_keeps_its_document_id_and_the_entry_itself(
    source: str, db: Database[Document], mongo_db_url: str,  # noqa: F811
    kafka_bootstrap: str, topic: str
) -> None:
    misrouted = outbox.Event(topic, "m", "Misrouted", {}, topic="not a valid topic!")
    ledger = Ledger()
    writer = DocumentWriter(db, topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = start(source, db, settings(source, mongo_db_url, kafka_bootstrap))
    try:
        db.orders.insert_one(outbox_mongo.new_document({"_id": "m", "version": 0}, misrouted))
        writer.create("k", events=2)
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: db.outbox_parked.count_documents({}) == 1, 30, "parking")
        wait_for(lambda: pending_events(db) == 0, 30, "every entry to be pulled")
    finally:
        relay.stop()
    (parked,) = db.outbox_parked.find()
    assert outbox_mongo.event_id_of(parked["_id"]) == misrouted.id
    assert parked["document_id"] == "m"
    assert outbox_mongo.decode_entry(parked["entry"]).id == misrouted.id
    check(ledger, reader)


@pytest.mark.parametrize("source", ["mongo-poll"])
def test_retry_keeps_an_event_a_running_relay_parked_again_meanwhile(
    source: str, db: Database[Document], mongo_db_url: str,  # noqa: F811
    kafka_bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`outbox parked retry` (and the console's redrive) while a relay runs: the relay may
    re-queue, read and park an event again (same _id, new seq) before retry removes the parked
    documents it read; the new one must stay, or the event is in neither place."""
    from relay.mongo.parked import ParkedEvents

    misrouted = outbox.Event(topic, "m", "Misrouted", {}, topic="not a valid topic!")
    relay = start(source, db, settings(source, mongo_db_url, kafka_bootstrap))
    try:
        db.orders.insert_one(outbox_mongo.new_document({"_id": "m", "version": 0}, misrouted))
        wait_for(lambda: db.outbox_parked.count_documents({}) == 1, 30, "parking")
    finally:
        relay.stop()
    (first,) = db.outbox_parked.find()
    store = ParkedEvents(MongoRelayConfig(url=mongo_db_url, collections=("orders",)))
    requeue = store._requeue

    def requeue_then_park_again(group: Any) -> None:
        requeue(group)
        db.outbox_parked.replace_one(  # what the running relay's store does when it parks
            {"_id": first["_id"]}, {**first, "seq": first["seq"] + 1}, upsert=True)

    monkeypatch.setattr(store, "_requeue", requeue_then_park_again)
    with store:
        assert len(store.retry([misrouted.id])) == 1
    (kept,) = db.outbox_parked.find()
    assert kept["seq"] == first["seq"] + 1, "the event parked again is kept"


@pytest.mark.parametrize("source", ["mongo-stream"])
def test_invalid_resume_token_falls_back_to_a_full_scan(
    source: str, db: Database[Document], mongo_db_url: str,  # noqa: F811
    kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
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
    db: Database[Document], mongo_db_url: str  # noqa: F811
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
