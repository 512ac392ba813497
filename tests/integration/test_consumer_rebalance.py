"""Two consumers of one group across a rebalance: every event is applied exactly once."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from outbox.consumer import Consumer, ConsumerStats, Message
from tests.integration.test_consumer import (
    kafka_settings,
    make_applied_table,
    make_topic,
    order_record,
    produce,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIRST, SECOND = 2000, 1000


def applied_count(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM applied").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_second_consumer_joining_mid_way_applies_nothing_twice(
    db_url: str, kafka_bootstrap: str
) -> None:
    url = make_applied_table(db_url)
    with psycopg.connect(url) as conn:
        conn.execute("ALTER TABLE applied ADD COLUMN seq bigserial, ADD COLUMN key text")
    topic = make_topic(kafka_bootstrap, partitions=4)
    first = [order_record(n, key=f"k{n % 40}") for n in range(FIRST)]
    produce(kafka_bootstrap, topic, first)

    def make(member: str, pool: ConnectionPool[Any]) -> Consumer:
        consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap),
                            topics=[topic], db=pool, batch_size=25)

        @consumer.handler("OrderCreated")
        def apply(conn: psycopg.Connection[Any], message: Message) -> None:
            conn.execute("INSERT INTO applied (event_id, n, partition, consumer, key)"
                         " VALUES (%s, %s, %s, %s, %s)",
                         [message.id, message.json()["n"], message.partition, member,
                          message.aggregate_id])
            time.sleep(0.001)  # slow enough that the second member joins mid-way

        return consumer

    results: dict[str, ConsumerStats] = {}
    errors: list[BaseException] = []

    def serve(member: str, consumer: Consumer) -> None:
        try:
            results[member] = consumer.run(timeout=120)
        except BaseException as exc:
            errors.append(exc)

    with ConnectionPool(url, min_size=1, max_size=2) as pool_a, \
            ConnectionPool(url, min_size=1, max_size=2) as pool_b:
        a, b = make("a", pool_a), make("b", pool_b)
        thread_a = threading.Thread(target=serve, args=("a", a))
        thread_a.start()
        try:
            deadline = time.monotonic() + 60
            while applied_count(url)[0] < 200:
                assert time.monotonic() < deadline and not errors, errors
                time.sleep(0.05)
            thread_b = threading.Thread(target=serve, args=("b", b))
            thread_b.start()
            produce(kafka_bootstrap, topic,
                    [order_record(n, key=f"k{n % 40}") for n in range(FIRST, FIRST + SECOND)])
            while applied_count(url)[1] < FIRST + SECOND:
                assert time.monotonic() < deadline + 60 and not errors, errors
                time.sleep(0.1)
        finally:
            a.stop()
            b.stop()
            thread_a.join(60)
            if "thread_b" in locals():
                thread_b.join(60)
    assert errors == []
    total, distinct = applied_count(url)
    assert (total, distinct) == (FIRST + SECOND, FIRST + SECOND)
    assert results["a"].processed > 0 and results["b"].processed > 0
    assert results["a"].processed + results["b"].processed == FIRST + SECOND
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT key, n FROM applied ORDER BY seq").fetchall()
    per_key: dict[str, list[int]] = defaultdict(list)
    for key, n in rows:
        per_key[key].append(n)
    # Partition order survives the hand-over: each key's events were applied in order.
    assert all(ns == sorted(ns) for ns in per_key.values())
