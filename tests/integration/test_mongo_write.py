"""The MongoDB write side against a real server: single-document writes and the outbox collection.

Runs against the local stack's MongoDB server, or against a real `mongod` replica set with
`OUTBOX_TEST_MONGO_URL=mongodb://127.0.0.1:27017/outbox?replicaSet=rs0` (see
tests/support/mongo.py for how to start one); each test uses a database of its own.
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Binary
from pymongo import MongoClient, ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import PyMongoError

import outbox
from outbox import mongo as outbox_mongo
from outbox.errors import AtomicityError, InvalidEventError

pytestmark = pytest.mark.integration

Document = dict[str, Any]


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def client(mongo_url: str) -> Iterator[MongoClient[Document]]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    made: MongoClient[Document] = MongoClient(
        with_database(mongo_url, name), serverSelectionTimeoutMS=10_000)
    try:
        yield made
    finally:
        made.drop_database(name)
        made.close()


@pytest.fixture
def db(client: MongoClient[Document]) -> Database[Document]:
    database = client.get_default_database()
    # Created up front: collections created implicitly inside transactions conflict.
    for name in ("orders", "outbox"):
        database.create_collection(name)
    return database


def event(key: str = "42", seq: int = 0) -> outbox.Event:
    return outbox.Event("Order", key, "Sequenced", {"seq": seq})


def pending_ids(db: Database[Document], document_id: Any) -> list[uuid.UUID]:
    document = db.orders.find_one({"_id": document_id}) or {}
    return [outbox_mongo.event_id_of(e["id"]) for e in document.get("_outbox", [])]


def test_insert_update_and_find_one_and_update_append_in_order(db: Database[Document]) -> None:
    events = [event(seq=n) for n in range(4)]
    db.orders.insert_one(outbox_mongo.new_document({"_id": 42, "state": "NEW"}, events[0]))
    db.orders.update_one(
        {"_id": 42}, outbox_mongo.with_events({"$set": {"state": "PAID"}}, events[1]))
    after = db.orders.find_one_and_update(
        {"_id": 42}, outbox_mongo.with_events({"$inc": {"version": 1}}, *events[2:]),
        return_document=ReturnDocument.AFTER)
    assert after is not None and after["state"] == "PAID" and after["version"] == 1
    assert pending_ids(db, 42) == [e.id for e in events]
    stored = after["_outbox"][0]
    assert isinstance(stored["id"], Binary) and stored["id"].subtype == 4
    record = outbox_mongo.decode_entry(stored)
    assert record.payload == b'{"seq":0}' and record.aggregate_id == "42"


def test_with_events_in_a_transaction_is_discarded_with_it(
    client: MongoClient[Document], db: Database[Document]
) -> None:
    db.orders.insert_one({"_id": 1, "state": "NEW"})
    kept, dropped = event("1", 0), event("1", 1)

    def commit(session: ClientSession) -> None:
        db.orders.update_one({"_id": 1}, outbox_mongo.with_events({"$set": {"a": 1}}, kept),
                             session=session)

    with client.start_session() as session:
        session.with_transaction(commit)
        session.start_transaction()
        db.orders.update_one({"_id": 1}, outbox_mongo.with_events({"$set": {"b": 1}}, dropped),
                             session=session)
        session.abort_transaction()
    assert pending_ids(db, 1) == [kept.id]


def test_publish_writes_the_outbox_collection_only_inside_a_transaction(
    client: MongoClient[Document], db: Database[Document]
) -> None:
    committed, aborted = event("7", 0), event("7", 1)
    with client.start_session() as session:
        with pytest.raises(AtomicityError):
            outbox_mongo.publish(db, committed, session=session)  # no transaction open
        session.with_transaction(
            lambda s: outbox_mongo.publish(db, committed, session=s))
        session.start_transaction()
        assert outbox_mongo.publish(db.outbox, aborted, session=session) == [aborted.id]
        session.abort_transaction()
    with pytest.raises(AtomicityError):
        outbox_mongo.publish(db, event())
    (stored,) = db.outbox.find()
    assert stored["_id"] == Binary.from_uuid(committed.id)
    assert outbox_mongo.decode_entry(stored, id_key="_id").id == committed.id
    # Explicitly allowed: one insert, atomic with nothing else.
    outbox_mongo.publish(db, event("8"), allow_without_transaction=True)
    assert db.outbox.count_documents({}) == 2


def test_publishing_the_same_event_twice_is_a_clear_error(
    client: MongoClient[Document], db: Database[Document]
) -> None:
    once = event()
    relaxed = outbox_mongo.MongoOutbox(allow_without_transaction=True)
    relaxed.publish(db, once)
    with pytest.raises(InvalidEventError, match="already in the outbox"):
        relaxed.publish(db, once)


def test_bad_input_leaves_the_document_unchanged(db: Database[Document]) -> None:
    db.orders.insert_one(outbox_mongo.new_document({"_id": 1, "n": 0}, event("1")))
    with pytest.raises(InvalidEventError):
        db.orders.update_one({"_id": 1}, outbox_mongo.with_events(
            {"$set": {"n": 1}}, outbox.Event("Order", "1", "X", {"bad": {1, 2}})))
    with pytest.raises(outbox_mongo.OutboxFieldConflictError):
        db.orders.update_one({"_id": 1}, outbox_mongo.with_events(
            {"$set": {"n": 1}, "$unset": {"_outbox": ""}}, event("1")))
    document = db.orders.find_one({"_id": 1})
    assert document is not None and document["n"] == 0 and len(document["_outbox"]) == 1


def test_the_server_refuses_an_update_that_would_pass_16_mib_and_writes_nothing(
    db: Database[Document]
) -> None:
    big = outbox_mongo.MongoOutbox(max_payload_bytes=8 * 1024 * 1024)
    db.orders.insert_one({"_id": 1, "blob": b"x" * (10 * 1024 * 1024)})
    held = db.orders.find_one({"_id": 1})
    assert held is not None
    growth = outbox.Event("Order", "1", "Big", b"y" * (7 * 1024 * 1024))
    with pytest.raises(outbox_mongo.DocumentTooLargeError):
        big.with_events({"$set": {"n": 1}}, growth, document=held)
    # Without the document at hand the server refuses the whole write instead.
    with pytest.raises(PyMongoError):
        db.orders.update_one({"_id": 1}, big.with_events({"$set": {"n": 1}}, growth))
    after = db.orders.find_one({"_id": 1}, {"n": 1, "_outbox": 1})
    assert after == {"_id": 1}


def test_publish_numbers_each_aggregate_in_the_callers_transaction(
    client: MongoClient[Document], db: Database[Document]
) -> None:
    sequenced = outbox_mongo.MongoOutbox(sequence=True)
    db.create_collection("outbox_sequence")
    first = [event("1"), event("2"), event("1")]
    last = event("1")
    with client.start_session() as session:
        session.with_transaction(lambda s: sequenced.publish(db, *first, session=s))
        session.start_transaction()
        sequenced.publish(db, event("1"), session=session)
        session.abort_transaction()  # its number is given again
        session.with_transaction(lambda s: sequenced.publish(db.outbox, last, session=s))
    numbers = {entry.id: entry.headers["sequence"] for entry in (
        outbox_mongo.decode_entry(doc, id_key="_id") for doc in db.outbox.find())}
    assert numbers == {first[0].id: "1", first[1].id: "1", first[2].id: "2", last.id: "3"}


def test_a_concurrent_writer_of_the_same_aggregate_gets_a_transient_conflict(
    client: MongoClient[Document], db: Database[Document]
) -> None:
    sequenced = outbox_mongo.MongoOutbox(sequence=True)
    db.create_collection("outbox_sequence")
    with client.start_session() as first, client.start_session() as second:
        first.start_transaction()
        sequenced.publish(db, event("1"), session=first)
        second.start_transaction()
        sequenced.publish(db, event("2"), session=second)  # another aggregate: no conflict
        with pytest.raises(PyMongoError) as conflict:
            sequenced.publish(db, event("1"), session=second)
        assert conflict.value.has_error_label("TransientTransactionError")
        second.abort_transaction()
        first.commit_transaction()


def test_embedded_events_are_not_numbered() -> None:
    sequenced = outbox_mongo.MongoOutbox(sequence=True)
    with pytest.raises(outbox.ConfigurationError, match="publish"):
        sequenced.new_document({"_id": 1}, event())
    with pytest.raises(outbox.ConfigurationError, match="publish"):
        sequenced.with_events({"$set": {"state": "X"}}, event())
    with pytest.raises(outbox.ConfigurationError, match="allow_without_transaction"):
        outbox_mongo.MongoOutbox(sequence=True, allow_without_transaction=True)
