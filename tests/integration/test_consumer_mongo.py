"""The idempotent consumer on MongoDB: the dedup document and the handler's writes commit in one
multi-document transaction (real Kafka, the local MongoDB server)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Binary
from pymongo import MongoClient
from pymongo.client_session import ClientSession
from pymongo.database import Database

from outbox.consumer import Consumer, Message, RetryPolicy
from tests.integration.test_consumer import (
    kafka_settings,
    make_topic,
    order_record,
    produce,
    run_cli,
)
from tests.support.kafka import TopicReader
from tests.support.mongo import with_database

pytestmark = pytest.mark.integration

Document = dict[str, Any]


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return make_topic(kafka_bootstrap)


@pytest.fixture
def mongo_db_url(mongo_url: str) -> str:
    return with_database(mongo_url, f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def database(mongo_db_url: str) -> Iterator[Database[Document]]:
    client: MongoClient[Document] = MongoClient(mongo_db_url, serverSelectionTimeoutMS=10_000)
    db = client.get_default_database()
    # Created up front: collections created implicitly inside two transactions conflict.
    db.create_collection("applied")
    try:
        yield db
    finally:
        client.drop_database(db.name)
        client.close()


def applied_numbers(db: Database[Document]) -> list[int]:
    return sorted(doc["n"] for doc in db.applied.find())


def inbox_ids(db: Database[Document], consumer: str) -> set[uuid.UUID]:
    return {doc["event_id"].as_uuid() for doc in db.outbox_inbox.find({"consumer": consumer})}


def consumer_for(db: Database[Document], bootstrap: str, topic: str,
                 fail_on: set[int] | None = None, **options: Any) -> Consumer:
    consumer = Consumer(name="billing", kafka=kafka_settings(bootstrap), topics=[topic],
                        mongo=db, **options)

    @consumer.handler("OrderCreated")
    def apply(session: ClientSession, message: Message) -> None:
        n = message.json()["n"]
        db.applied.insert_one({"event_id": Binary.from_uuid(message.id), "n": n},
                              session=session)
        if n in (fail_on or set()):
            raise ValueError(f"handler failed after writing {n}")

    return consumer


def test_mongo_same_message_delivered_twice_is_applied_once(
    database: Database[Document], kafka_bootstrap: str, topic: str
) -> None:
    records = [order_record(n) for n in range(12)]
    produce(kafka_bootstrap, topic, records)
    produce(kafka_bootstrap, topic, records)
    consumer = consumer_for(database, kafka_bootstrap, topic, batch_size=5)
    stats = consumer.run(max_messages=24, timeout=60)
    assert (stats.processed, stats.duplicates) == (12, 12)
    assert applied_numbers(database) == list(range(12))
    assert inbox_ids(database, "billing") == {r.id for r in records}
    names = {index["name"] for index in database.outbox_inbox.list_indexes()}
    assert {"consumer_event_id", "processed_at"} <= names


def test_mongo_failing_handler_leaves_no_write_and_is_dead_lettered(
    database: Database[Document], kafka_bootstrap: str, topic: str
) -> None:
    records = [order_record(n) for n in range(6)]
    produce(kafka_bootstrap, topic, records)
    consumer = consumer_for(database, kafka_bootstrap, topic, fail_on={2},
                            retry=RetryPolicy(tries=2, base_delay=0.01, max_delay=0.01))
    stats = consumer.run(max_messages=6, timeout=60)
    assert (stats.processed, stats.dead_lettered, stats.retries) == (5, 1, 1)
    assert applied_numbers(database) == [0, 1, 3, 4, 5]
    assert records[2].id not in inbox_ids(database, "billing")
    reader = TopicReader(kafka_bootstrap, f"{topic}.dlq")
    try:
        [letter] = reader.read_until(lambda got: len(got) >= 1, timeout=30)
    finally:
        reader.close()
    assert letter.headers["id"] == str(records[2].id)
    assert "handler failed after writing 2" in letter.headers["dlq.error"]


def test_mongo_inbox_purge_cli(database: Database[Document], mongo_db_url: str) -> None:
    now = dt.datetime.now(dt.UTC)
    database.outbox_inbox.insert_many([
        {"consumer": "billing", "event_id": Binary.from_uuid(uuid.uuid4()),
         "processed_at": now - dt.timedelta(days=days)}
        for days in (0, 2, 8, 40)
    ])
    result = run_cli("inbox", "purge", "--mongo", mongo_db_url, "--older-than", "7d")
    assert result.returncode == 0, result.stderr
    assert "deleted 2 dedup rows" in result.stdout
    assert database.outbox_inbox.count_documents({}) == 2
