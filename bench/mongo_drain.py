"""Benchmark: drain rate of a MongoDB backlog (embedded events) through mongo-poll and mongo-stream.

Writes N pending events spread over D documents while no relay runs, then starts the relay and
times until the last event is acknowledged by Kafka and pulled from its document. Afterwards the
topic is read back and checked: every event delivered (lost must be 0), duplicates counted.
Prints one JSON object per run on stdout. Not a test: asserts nothing about time.

    python -m bench.mongo_drain [--events 100000] [--documents 10000]
        [--sources mongo-poll,mongo-stream,mongo-stream-scan] [--batch-size 5000]

mongo-stream resumes from a token stored before the backlog was written (so the backlog comes
through the change stream); mongo-stream-scan starts without a token (full scan first).
Services come from --mongo/--kafka, else OUTBOX_MONGO_URL/OUTBOX_KAFKA_BOOTSTRAP, else the
local stack's .local/stack.env (`python -m deploy.local up`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import urllib.parse
import uuid
from typing import Any

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from pymongo import MongoClient
from pymongo.database import Database

import outbox
from bench import topics
from bench.env import setting
from outbox import mongo as outbox_mongo
from relay.daemon import supervise
from relay.mongo import MongoPollRelay, MongoRelayConfig, MongoStore, MongoStreamRelay, check_source
from relay.mongo.tracker import AckPlan
from relay.sinks.kafka.sink import PublisherConfig

Document = dict[str, Any]


def services(args: argparse.Namespace) -> tuple[str, str]:
    mongo = setting("OUTBOX_MONGO_URL", args.mongo)
    kafka = setting("OUTBOX_KAFKA_BOOTSTRAP", args.kafka)
    if not mongo or not kafka:
        sys.exit("no mongo/kafka: pass --mongo and --kafka or run `python -m deploy.local up`")
    return mongo, kafka


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def create_topic(bootstrap: str, partitions: int) -> str:
    name = f"bench-mongo-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions,
                                                replication_factor=1)]).values():
        future.result(timeout=60)
    return name


def wait(condition: Any, timeout: float, what: str, pause: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(pause)


class CountingStore(MongoStore):
    """Counts the entries whose removal was applied: the drain ends without polling the server
    (a probe would compete with the relay for it)."""

    removed = 0

    def apply(self, plan: AckPlan) -> None:
        super().apply(plan)
        type(self).removed += len(plan)


class Relay:
    """The relay as `outbox relay --source ...` builds it, on a thread."""

    def __init__(self, source: str, config: MongoRelayConfig, kafka: str) -> None:
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        check_source(config, stream=source == "mongo-stream")
        kind = MongoStreamRelay if source == "mongo-stream" else MongoPollRelay
        relay = kind(config, PublisherConfig(kafka), store_factory=lambda: CountingStore(config))
        self.thread = threading.Thread(
            target=supervise, args=(lambda: relay, self.stop_event), daemon=True)

    def start(self) -> Relay:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(120)


def write_backlog(db: Database[Document], topic: str, events: int, documents: int) -> set[str]:
    per_document = events // documents
    ids: set[str] = set()
    batch = []
    for n in range(documents):
        key = f"order-{n}"
        made = [outbox.Event(topic, key, "OrderChanged", {"order": n, "seq": seq})
                for seq in range(per_document)]
        ids.update(str(e.id) for e in made)
        batch.append(outbox_mongo.new_document({"_id": key, "state": "NEW"}, *made))
        if len(batch) == 500:
            db.orders.insert_many(batch)
            batch = []
    if batch:
        db.orders.insert_many(batch)
    return ids


def read_back(bootstrap: str, topic: str, ids: set[str], timeout: float = 300) -> dict[str, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen: dict[str, int] = {}
    order_broken = 0
    last_seq: dict[bytes, int] = {}
    deadline = time.monotonic() + timeout
    quiet_until = None
    while time.monotonic() < deadline:
        messages = consumer.consume(num_messages=10_000, timeout=1.0)
        for message in messages:
            if message.error():
                continue
            raw_id = dict(message.headers() or []).get("id")
            event_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            first = event_id not in seen
            seen[event_id] = seen.get(event_id, 0) + 1
            if first:
                seq = json.loads(message.value() or b"{}")["seq"]
                key = bytes(message.key() or b"")
                if seq <= last_seq.get(key, -1):
                    order_broken += 1
                last_seq[key] = seq
        if ids <= seen.keys():
            quiet_until = quiet_until or time.monotonic() + 2.0
            if not messages and time.monotonic() > quiet_until:
                break
    consumer.close()
    return {"lost": len(ids - seen.keys()), "dup": sum(seen.values()) - len(seen),
            "order_violations": order_broken}


def run_one(kind: str, args: argparse.Namespace, mongo_url: str, kafka: str) -> dict[str, Any]:
    source = "mongo-stream" if kind.startswith("mongo-stream") else "mongo-poll"
    name = f"bench_{uuid.uuid4().hex[:10]}"
    url = with_database(mongo_url, name)
    client: MongoClient[Document] = MongoClient(url)
    db = client[name]
    db.create_collection("orders")
    topic = create_topic(kafka, args.partitions)
    config = MongoRelayConfig(
        url=url, collections=("orders",), batch_size=args.batch_size,
        max_in_flight=max(20_000, 4 * args.batch_size), poll_interval=0.2)
    try:
        if kind == "mongo-stream":
            # Store a token first, so the backlog is read through the change stream.
            primer = Relay(source, config, kafka).start()
            wait(lambda: db.outbox_relay_state.find_one(
                {"_id": {"$regex": "^resume-token:"}}) is not None, 60, "the first token")
            primer.stop()
        started = time.monotonic()
        ids = write_backlog(db, topic, args.events, args.documents)
        write_seconds = time.monotonic() - started
        CountingStore.removed = 0
        started = time.monotonic()
        relay = Relay(source, config, kafka).start()
        try:
            wait(lambda: CountingStore.removed >= len(ids), 1800, "the backlog to drain", 0.02)
            drain_seconds = time.monotonic() - started
        finally:
            relay.stop()
        left = db.orders.count_documents({"_outbox.id": {"$exists": True}})
        verdict = read_back(kafka, topic, ids)
        return {
            "source": kind, "events": len(ids), "documents": args.documents,
            "batch_size": args.batch_size, "partitions": args.partitions,
            "write_seconds": round(write_seconds, 2),
            "drain_seconds": round(drain_seconds, 2),
            "events_per_second": round(len(ids) / drain_seconds),
            "documents_left_pending": left,
            **verdict,
        }
    finally:
        client.drop_database(name)
        client.close()
        topics.delete(kafka, [topic])  # the shared broker keeps no bench leftovers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--sources", default="mongo-poll,mongo-stream,mongo-stream-scan")
    parser.add_argument("--mongo")
    parser.add_argument("--kafka")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mongo_url, kafka = services(args)
    for kind in args.sources.split(","):
        result = run_one(kind.strip(), args, mongo_url, kafka)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
