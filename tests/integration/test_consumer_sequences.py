"""ordering="sequence" against real Kafka with each inbox (PostgreSQL through psycopg and
SQLAlchemy, MongoDB), sync and asyncio: a gap holds its aggregate until the missing event
arrives; one that never arrives is dead-lettered with reason `gap` and counted."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, MongoClient
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox.consumer import AsyncConsumer, Consumer, ConsumerStats, Message
from outbox.consumer import dead_letters as dlq
from outbox.consumer.metrics import ConsumerCollector
from outbox.record import OutboxRecord
from tests.integration.test_consumer import (
    committed_offsets,
    kafka_settings,
    make_topic,
    produce,
)
from tests.support.kafka import TopicReader
from tests.support.mongo import with_database
from tests.support.pg import sqlalchemy_url

pytestmark = pytest.mark.integration


def numbered(key: str, number: int, event_id: uuid.UUID | None = None) -> OutboxRecord:
    """An event of aggregate Order/`key` as Outbox(sequence=True) writes it."""
    return OutboxRecord(
        id=event_id or uuid.uuid4(), aggregate_type="Order", aggregate_id=key,
        event_type="OrderChanged", payload=json.dumps({"n": number}).encode(),
        content_type="application/json", headers={"sequence": str(number)},
    )


@dataclass
class Backend:
    """How to build and run a consumer over one inbox, and read its numbers back. An asyncio
    backend makes its database client inside the event loop that runs the consumer."""

    kind: str
    url: str
    last_numbers: Callable[[str], dict[str, int]]
    # A group of the test's own: a member of another test joining a shared group would
    # rebalance this one mid-run (the shared Kafka serves every test run on the machine).
    name: str = field(default_factory=lambda: f"billing-{uuid.uuid4().hex[:8]}")

    @property
    def asyncio(self) -> bool:
        return self.kind.startswith("async-")

    def consume(self, bootstrap: str, topic: str, messages: int, applied: list[str],
                on_commit: Callable[[Sequence[Message]], None] | None = None,
                **options: Any) -> tuple[ConsumerStats, Consumer | AsyncConsumer]:
        def committed(batch: Sequence[Message]) -> None:
            applied.extend(f"{m.aggregate_id}{m.headers['sequence']}" for m in batch)
            if on_commit is not None:
                on_commit(batch)

        settings = {"name": self.name, "kafka": kafka_settings(bootstrap), "topics": [topic],
                    "ordering": "sequence", "on_commit": committed, **options}
        if self.asyncio:
            return asyncio.run(self._consume_async(settings, messages))
        if self.kind == "mongo":
            client: MongoClient[dict[str, Any]] = MongoClient(
                self.url, serverSelectionTimeoutMS=10_000)
            settings["mongo"] = client.get_default_database()
        elif self.kind == "sqlalchemy":
            engine = create_engine(sqlalchemy_url(self.url))
            settings["db"] = engine
        else:
            settings["db"] = self.url
            # The numbers are read and saved in the batch's pipeline like the claim.
            settings["pipeline"] = self.kind == "psycopg-pipeline"
        consumer = Consumer(**settings)

        @consumer.handler("OrderChanged")
        def apply(_: Any, message: Message) -> None:
            """The effects are recorded at commit (on_commit)."""

        try:
            return consumer.run(max_messages=messages, timeout=60), consumer
        finally:
            if self.kind == "mongo":
                client.close()
            elif self.kind == "sqlalchemy":
                engine.dispose()

    async def _consume_async(self, settings: dict[str, Any], messages: int,
                             ) -> tuple[ConsumerStats, AsyncConsumer]:
        client: AsyncMongoClient[dict[str, Any]] | None = None
        engine: AsyncEngine | None = None
        if self.kind == "async-mongo":
            client = AsyncMongoClient(self.url, serverSelectionTimeoutMS=10_000)
            settings["mongo"] = client.get_default_database()
        elif self.kind == "async-sqlalchemy":
            engine = create_async_engine(sqlalchemy_url(self.url))
            settings["db"] = engine
        else:
            settings["db"] = self.url
        consumer = AsyncConsumer(**settings)

        @consumer.handler("OrderChanged")
        async def apply(_: Any, message: Message) -> None:
            """The effects are recorded at commit (on_commit)."""

        try:
            return await consumer.run(max_messages=messages, timeout=60), consumer
        finally:
            if client is not None:
                await client.close()
            if engine is not None:
                await engine.dispose()


@pytest.fixture(params=["psycopg", "psycopg-pipeline", "sqlalchemy", "async-psycopg",
                        "async-sqlalchemy", "mongo", "async-mongo"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind: str = request.param
    if not kind.endswith("mongo"):
        url = request.getfixturevalue("db_url")

        def pg_numbers(consumer: str) -> dict[str, int]:
            with psycopg.connect(url) as conn:
                rows = conn.execute(
                    "SELECT aggregate_id, last_sequence FROM outbox_inbox_sequence"
                    " WHERE consumer = %s AND aggregate_type = 'Order'", [consumer]).fetchall()
            return dict(rows)

        yield Backend(kind, url, pg_numbers)
        return
    url = with_database(request.getfixturevalue("mongo_url"), f"test_{uuid.uuid4().hex[:12]}")
    client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=10_000)
    db = client.get_default_database()

    def mongo_numbers(consumer: str) -> dict[str, int]:
        return {doc["aggregate_id"]: doc["last_sequence"] for doc in
                db.outbox_inbox_sequence.find({"consumer": consumer, "aggregate_type": "Order"})}

    try:
        yield Backend(kind, url, mongo_numbers)
    finally:
        client.drop_database(db.name)
        client.close()


def test_a_gap_holds_its_aggregate_until_the_missing_event_arrives(
    backend: Backend, kafka_bootstrap: str
) -> None:
    topic = make_topic(kafka_bootstrap)
    a2 = numbered("a", 2)
    # a3 is missing; a2 comes again under a new id (a replay): a duplicate by number.
    produce(kafka_bootstrap, topic, [numbered("a", 1), a2, numbered("a", 4), numbered("b", 1),
                                     numbered("a", 2), numbered("b", 2)])
    applied: list[str] = []
    late: list[OutboxRecord] = []

    def send_the_missing_one(messages: Sequence[Message]) -> None:
        # Only once b2 is applied (a4 is held by then), the missing event arrives.
        if not late and any(m.aggregate_id == "b" and m.headers["sequence"] == "2"
                            for m in messages):
            late.append(numbered("a", 3))
            produce(kafka_bootstrap, topic, late)

    stats, _ = backend.consume(kafka_bootstrap, topic, 7, applied, send_the_missing_one,
                               gap_timeout=60)
    assert [x for x in applied if x.startswith("a")] == ["a1", "a2", "a3", "a4"]
    assert [x for x in applied if x.startswith("b")] == ["b1", "b2"]
    assert applied.index("b2") < applied.index("a4"), "a4 waited; b went on"
    assert (stats.processed, stats.duplicates, stats.dead_lettered, stats.sequence_gaps) == (
        6, 1, 0, 0)
    assert backend.last_numbers(backend.name) == {"a": 4, "b": 2}
    assert committed_offsets(kafka_bootstrap, backend.name, topic) == [7]


def test_a_missing_event_that_never_arrives_dead_letters_with_reason_gap(
    backend: Backend, kafka_bootstrap: str
) -> None:
    topic = make_topic(kafka_bootstrap)
    produce(kafka_bootstrap, topic, [numbered("c", 1), numbered("c", 3), numbered("d", 1)])
    applied: list[str] = []
    stats, consumer = backend.consume(kafka_bootstrap, topic, 3, applied, gap_timeout=1.0)
    assert applied == ["c1", "d1"]
    assert (stats.processed, stats.dead_lettered, stats.sequence_gaps) == (2, 1, 1)
    assert backend.last_numbers(backend.name) == {"c": 1, "d": 1}
    assert committed_offsets(kafka_bootstrap, backend.name, topic) == [3]
    reader = TopicReader(kafka_bootstrap, dlq.topic_for(dlq.DEFAULT_TEMPLATE, topic))
    try:
        [letter] = reader.read_until(lambda got: len(got) >= 1, timeout=30)
    finally:
        reader.close()
    assert letter.headers["sequence"] == "3" and letter.headers[dlq.ORIGINAL_OFFSET] == "1"
    assert letter.headers[dlq.ERROR].startswith("gap: Order c expected sequence 2, got 3")
    registry = CollectorRegistry()
    registry.register(ConsumerCollector(consumer))
    assert registry.get_sample_value(
        "outbox_consumer_sequence_gaps_total", {"consumer": backend.name}) == 1.0
