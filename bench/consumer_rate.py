"""Benchmark: messages/s through the idempotent consumer with a handler that inserts one row.

Produces N outbox-style messages to a fresh topic, then times `Consumer.run` over them with
batched transactions, and prints the figures as JSON on stdout. Not a test: asserts nothing.

    python -m bench.consumer_rate [--messages 50000] [--batch-size 500] [--pipeline]
        [--driver psycopg|sqlalchemy] [--partitions 1]

Services come from --db/--kafka, else OUTBOX_DB_URL/OUTBOX_KAFKA_BOOTSTRAP, else the local
stack's .local/stack.env (`python -m deploy.local up`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from psycopg import sql
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine, text

from bench.env import setting
from outbox import migrate
from outbox.consumer import Consumer, Message
from outbox.names import SchemaNames
from outbox.record import OutboxRecord
from relay.sinks.kafka.sink import kafka_headers


def settings(args: argparse.Namespace) -> tuple[str, str]:
    db = setting("OUTBOX_DB_URL", args.db)
    kafka = setting("OUTBOX_KAFKA_BOOTSTRAP", args.kafka)
    if not db or not kafka:
        sys.exit("no database/kafka: pass --db and --kafka or run `python -m deploy.local up`")
    return db, kafka


def create_database(admin_url: str) -> tuple[str, str]:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    with psycopg.connect(url) as conn:
        migrate.up(conn, SchemaNames())
        conn.execute("CREATE TABLE bench_applied (event_id uuid NOT NULL, n int NOT NULL)")
        conn.commit()
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def produce(bootstrap: str, topic: str, count: int, partitions: int) -> float:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                                replication_factor=1)]).values():
        future.result(timeout=60)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 20, "compression.type": "lz4",
                         "queue.buffering.max.messages": 500_000})
    started = time.perf_counter()
    for n in range(count):
        record = OutboxRecord(uuid.uuid4(), "Order", str(n % 1000), "OrderCreated",
                              json.dumps({"orderId": n, "amount": n % 97}).encode(),
                              "application/json", {"tenant": "eu"})
        while True:
            try:
                producer.produce(topic, value=record.payload,
                                 key=record.aggregate_id.encode(),
                                 headers=kafka_headers(record))
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(120):
        sys.exit("producing the benchmark messages did not finish")
    return time.perf_counter() - started


def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics([topic, f"{topic}.dlq"]).values():
        try:
            future.result(timeout=30)
        except Exception as exc:  # the DLQ topic may never have been made
            logging.debug("delete topic: %s", exc)


def consume(args: argparse.Namespace, url: str, bootstrap: str, topic: str) -> dict[str, Any]:
    commits: list[tuple[float, int]] = []

    def on_commit(messages: Sequence[Message]) -> None:
        commits.append((time.perf_counter(), len(messages)))

    kafka = {"bootstrap.servers": bootstrap}
    options: dict[str, Any] = {"batch_size": args.batch_size, "on_commit": on_commit}
    if args.pipeline:
        options["pipeline"] = True
    pool: ConnectionPool[Any] | None = None
    if args.driver == "sqlalchemy":
        engine = create_engine(
            "postgresql+psycopg://", creator=lambda: psycopg.connect(url))
        consumer = Consumer(name="bench", kafka=kafka, topics=[topic], db=engine, **options)
        insert = text("INSERT INTO bench_applied VALUES (:id, :n)")

        @consumer.handler("OrderCreated")
        def apply_sa(session: Any, message: Message) -> None:
            session.execute(insert, {"id": message.id, "n": message.json()["orderId"]})
    else:
        pool = ConnectionPool(url, min_size=1, max_size=1, open=True)
        consumer = Consumer(name="bench", kafka=kafka, topics=[topic], db=pool, **options)

        @consumer.handler("OrderCreated")
        def apply(conn: psycopg.Connection[Any], message: Message) -> None:
            if args.handler == "insert":
                conn.execute("INSERT INTO bench_applied VALUES (%s, %s)",
                              (message.id, message.json()["orderId"]))

    started = time.perf_counter()
    stats = consumer.run(max_messages=args.messages, timeout=args.timeout)
    elapsed = time.perf_counter() - started
    if pool is not None:
        pool.close()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM bench_applied").fetchone()
    rows = int(row[0]) if row else 0
    steady = None
    if len(commits) > 1:
        # From the end of the first batch (the group join is behind us) to the last commit.
        span = commits[-1][0] - commits[0][0]
        steady = sum(n for _, n in commits[1:]) / span if span > 0 else None
    return {
        "processed": stats.processed,
        "duplicates": stats.duplicates,
        "rows": rows,
        "transactions": len(commits),
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(stats.processed / elapsed, 1),
        "steady_messages_per_s": round(steady, 1) if steady else None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--driver", choices=["psycopg", "sqlalchemy"], default="psycopg")
    parser.add_argument("--handler", choices=["insert", "noop"], default="insert",
                        help="noop: measure the consumer alone (dedup rows only)")
    parser.add_argument("--pipeline", action="store_true",
                        help="psycopg pipeline mode (Consumer(pipeline=True))")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--db")
    parser.add_argument("--kafka")
    args = parser.parse_args(argv)
    admin_url, bootstrap = settings(args)
    name, url = create_database(admin_url)
    topic = f"bench-consumer-{uuid.uuid4().hex[:8]}"
    try:
        produce_s = produce(bootstrap, topic, args.messages, args.partitions)
        result = consume(args, url, bootstrap, topic)
    finally:
        drop_database(admin_url, name)
        delete_topic(bootstrap, topic)
    print(json.dumps({
        "benchmark": "consumer_rate",
        "messages": args.messages,
        "batch_size": args.batch_size,
        "partitions": args.partitions,
        "driver": args.driver,
        "handler": args.handler,
        "pipeline": args.pipeline,
        "cpus": os.cpu_count(),
        "produce_s": round(produce_s, 3),
        **result,
    }))


if __name__ == "__main__":
    main()
