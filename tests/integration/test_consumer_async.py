"""AsyncConsumer: the same guarantees with asyncio drivers (SQLAlchemy AsyncEngine, psycopg
AsyncConnection/pool, pymongo AsyncMongoClient), against real Kafka and databases."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from bson import Binary
from psycopg_pool import AsyncConnectionPool
from pymongo import AsyncMongoClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox.consumer import AsyncConsumer, Message, RetryPolicy
from outbox.errors import ConfigurationError
from tests.integration.test_consumer import (
    applied_rows,
    committed_offsets,
    inbox_ids,
    kafka_settings,
    make_applied_table,
    make_topic,
    order_record,
    produce,
)
from tests.support.mongo import with_database
from tests.support.pg import sqlalchemy_url

pytestmark = pytest.mark.integration

AsyncHandler = Callable[[Any, Message], Awaitable[None]]


@pytest.fixture
def applied_table(db_url: str) -> str:
    return make_applied_table(db_url)


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return make_topic(kafka_bootstrap)


async def insert_psycopg(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
    await conn.execute("INSERT INTO applied VALUES (%s, %s, %s)",
                       [message.id, message.json()["n"], message.partition])


async def insert_sqlalchemy(session: AsyncSession, message: Message) -> None:
    await session.execute(text("INSERT INTO applied VALUES (:id, :n, :p)"),
                          {"id": message.id, "n": message.json()["n"], "p": message.partition})


@pytest_asyncio.fixture(params=["sqlalchemy", "psycopg-pool", "conninfo"])
async def database(request: pytest.FixtureRequest, applied_table: str) -> AsyncIterator[
        tuple[Any, AsyncHandler]]:
    if request.param == "sqlalchemy":
        engine = create_async_engine(sqlalchemy_url(applied_table))
        yield engine, insert_sqlalchemy
        await engine.dispose()
    elif request.param == "psycopg-pool":
        async with AsyncConnectionPool(applied_table, min_size=1, max_size=2,
                                       open=False) as pool:
            yield pool, insert_psycopg
    else:
        yield applied_table, insert_psycopg


@pytest.mark.asyncio
async def test_async_same_message_delivered_twice_is_applied_once(
    database: tuple[Any, AsyncHandler], applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    db, handler = database
    records = [order_record(n) for n in range(15)]
    produce(kafka_bootstrap, topic, records)
    produce(kafka_bootstrap, topic, records)
    consumer = AsyncConsumer(name="billing", kafka=kafka_settings(kafka_bootstrap),
                             topics=[topic], db=db, batch_size=4)
    consumer.handler("OrderCreated")(handler)
    stats = await consumer.run(max_messages=30, timeout=60)
    assert (stats.processed, stats.duplicates) == (15, 15)
    assert sorted(n for _, n in applied_rows(applied_table)) == list(range(15))
    assert inbox_ids(applied_table, "billing") == {r.id for r in records}
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [30]


@pytest.mark.asyncio
async def test_async_failing_handler_is_retried_then_dead_lettered(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    produce(kafka_bootstrap, topic, [order_record(n) for n in range(4)])
    consumer = AsyncConsumer(name="billing", kafka=kafka_settings(kafka_bootstrap),
                             topics=[topic], db=applied_table,
                             retry=RetryPolicy(tries=3, base_delay=0.01, max_delay=0.02))

    @consumer.handler("OrderCreated")
    async def apply(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
        await insert_psycopg(conn, message)
        if message.json()["n"] == 1:
            raise RuntimeError("downstream refused")

    stats = await consumer.run(max_messages=4, timeout=60)
    assert (stats.processed, stats.dead_lettered, stats.retries) == (3, 1, 2)
    assert sorted(n for _, n in applied_rows(applied_table)) == [0, 2, 3]


@pytest.mark.asyncio
async def test_async_stop_from_another_task_returns_promptly(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    produce(kafka_bootstrap, topic, [order_record(1)])
    consumer = AsyncConsumer(name="billing", kafka=kafka_settings(kafka_bootstrap),
                             topics=[topic], db=applied_table)
    consumer.handler("OrderCreated")(insert_psycopg)
    running = asyncio.create_task(consumer.run())
    for _ in range(600):
        if applied_rows(applied_table):
            break
        await asyncio.sleep(0.1)
    consumer.stop()
    stats = await asyncio.wait_for(running, timeout=15)
    assert stats.processed == 1


@pytest.mark.asyncio
async def test_async_mongo_variant_applies_once(mongo_url: str, kafka_bootstrap: str,
                                                topic: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        with_database(mongo_url, f"test_{uuid.uuid4().hex[:12]}"),
        serverSelectionTimeoutMS=10_000)
    db = client.get_default_database()
    await db.create_collection("applied")
    try:
        records = [order_record(n) for n in range(8)]
        produce(kafka_bootstrap, topic, records)
        produce(kafka_bootstrap, topic, records[:3])
        consumer = AsyncConsumer(name="billing", kafka=kafka_settings(kafka_bootstrap),
                                 topics=[topic], mongo=db, batch_size=3)

        @consumer.handler("OrderCreated")
        async def apply(session: Any, message: Message) -> None:
            await db.applied.insert_one(
                {"event_id": Binary.from_uuid(message.id), "n": message.json()["n"]},
                session=session)

        stats = await consumer.run(max_messages=11, timeout=60)
        assert (stats.processed, stats.duplicates) == (8, 3)
        assert sorted([doc["n"] async for doc in db.applied.find()]) == list(range(8))
    finally:
        await client.drop_database(db.name)
        await client.close()


def test_async_consumer_refuses_sync_handlers_and_engines(applied_table: str) -> None:
    consumer = AsyncConsumer(name="b", kafka={"bootstrap.servers": "127.0.0.1:9"},
                             topics=["Order"], db=applied_table)
    with pytest.raises(ConfigurationError, match="async def"):
        consumer.handler("OrderCreated")(lambda session, message: None)  # type: ignore[arg-type, return-value]
