"""MongoDB relay test helpers: a database per test, sequenced document writers, pending counts.

The MongoDB server is the local stack's unless `OUTBOX_TEST_MONGO_URL` names another; the tests
run unchanged against a real `mongod`, which must be a replica set (change streams and
transactions need one)::

    mongod --replSet rs0 --bind_ip 127.0.0.1 --port 27017 --dbpath /tmp/rs0 &
    mongosh --quiet --eval 'rs.initiate()'
    OUTBOX_TEST_MONGO_URL='mongodb://127.0.0.1:27017/outbox?replicaSet=rs0' \\
        pytest -m integration tests/integration/test_mongo_relay.py

The database in the URL is only a default: each test uses a database of its own and drops it.
"""

from __future__ import annotations

import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError

import outbox
from outbox import mongo as outbox_mongo
from relay.settings import RelaySettings
from tests.support.kafka import TopicReader
from tests.support.ledger import Ledger, Verdict
from tests.support.relays import RelayThread, wait_for

Document = dict[str, Any]
SOURCES = ("mongo-poll", "mongo-stream")
# Created up front: collections created implicitly inside transactions conflict.
COLLECTIONS = ("orders", "outbox")


def with_database(url: str, name: str) -> str:
    """`url` with its default database replaced by `name`."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def new_database(mongo_url: str) -> str:
    """A URL naming a fresh database with the relayed collections created (drop it after)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = with_database(mongo_url, name)
    client: MongoClient[Document] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    for collection in COLLECTIONS:
        client[name].create_collection(collection)
    client.close()
    return url


def drop_database(url: str) -> None:
    client: MongoClient[Document] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    client.drop_database(client.get_default_database().name)
    client.close()


@pytest.fixture
def mongo_db_url(mongo_url: str) -> Iterator[str]:
    """A URL naming a database of this test alone (dropped afterwards)."""
    url = new_database(mongo_url)
    yield url
    drop_database(url)


@pytest.fixture
def db(mongo_db_url: str) -> Iterator[Database[Document]]:
    client: MongoClient[Document] = MongoClient(mongo_db_url, serverSelectionTimeoutMS=10_000)
    yield client.get_default_database()
    client.close()


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


def check(ledger: Ledger, reader: TopicReader) -> Verdict:
    reader.read_ids(ledger.committed_ids, timeout=120)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    return verdict
