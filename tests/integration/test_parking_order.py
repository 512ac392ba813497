"""Parking keeps each key's order, on all four sources, against real PostgreSQL, MongoDB, Kafka.

The case a user met: a topic created with its own `max.message.bytes=100000`; key K gets a
1 kB event, a 200 kB incompressible one, then 1 kB ones. Only the 200 kB event may be refused
(the others are not parked for the batch they travelled in); K's later events wait behind it
("held behind <id>") while other keys flow; `outbox parked retry` sends K's parked events in
their original order, before K's newer events, once the topic takes them.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import psycopg
import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from pymongo import MongoClient

import outbox
from outbox import mongo as outbox_mongo
from relay.settings import RelaySettings
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.relays import RelayThread, wait_for
from tests.support.wal import WalSlot

pytestmark = pytest.mark.integration

SOURCES = ("postgres-poll", "postgres-wal", "mongo-poll", "mongo-stream")
TOPIC_LIMIT = 100_000


def incompressible(size: int) -> str:
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


class Source(Protocol):
    name: str

    def settings(self, kafka: str) -> RelaySettings: ...

    def write(self, event: outbox.Event) -> None: ...

    def parked(self) -> list[tuple[uuid.UUID, str]]:
        """(event id, reason) in parking order."""

    def cli(self) -> list[str]:
        """The `outbox parked` options naming this source's parked events."""

    def started(self, relay: RelayThread) -> None: ...

    def discard_parked(self) -> None:
        """What an operator does who gives up on the parked events."""


class PostgresSource:
    def __init__(self, name: str, db_url: str) -> None:
        self.name = name
        self.db_url = db_url
        self.slot = WalSlot.create(db_url) if name == "postgres-wal" else None

    def settings(self, kafka: str) -> RelaySettings:
        if self.slot is not None:
            return self.slot.settings(kafka)
        return RelaySettings(source="postgres-poll", db_url=self.db_url, kafka_bootstrap=kafka,
                             poll_interval=0.2)

    def write(self, event: outbox.Event) -> None:
        with psycopg.connect(self.db_url) as conn:
            outbox.publish(conn, event)

    def parked(self) -> list[tuple[uuid.UUID, str]]:
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute("SELECT id, reason FROM outbox_parked ORDER BY parked_id")
            return [(row[0], row[1]) for row in rows]

    def cli(self) -> list[str]:
        return ["--db", self.db_url]

    def discard_parked(self) -> None:
        with psycopg.connect(self.db_url) as conn:
            conn.execute("DELETE FROM outbox_parked")

    def started(self, relay: RelayThread) -> None:
        """The slot (WAL) or the table (polling) keeps what is written before the relay runs."""


class MongoSource:
    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=10_000)
        self.db = self.client.get_default_database()
        for collection in ("orders", "outbox"):
            self.db.create_collection(collection)

    def settings(self, kafka: str) -> RelaySettings:
        return RelaySettings(source=self.name, mongo_url=self.url, collections=("orders",),
                             kafka_bootstrap=kafka, poll_interval=0.2)

    def write(self, event: outbox.Event) -> None:
        # Events embedded in their aggregate's document, one update per event.
        self.db.orders.update_one({"_id": event.aggregate_id},
                                  outbox_mongo.with_events({"$inc": {"version": 1}}, event),
                                  upsert=True)

    def parked(self) -> list[tuple[uuid.UUID, str]]:
        documents = self.db.outbox_parked.find({}, sort=[("seq", 1)])
        return [(outbox_mongo.event_id_of(d["_id"]), d["reason"]) for d in documents]

    def cli(self) -> list[str]:
        return ["--mongo", self.url, "--collections", "orders"]

    def discard_parked(self) -> None:
        self.db.outbox_parked.delete_many({})

    def started(self, relay: RelayThread) -> None:
        if self.name == "mongo-stream":  # events written before the stream opens would wait
            wait_for(lambda: not relay.alive or self.db.outbox_relay_state.find_one(
                {"_id": {"$regex": "^resume-token:"}}) is not None, 60, "the stream to start")
            assert relay.alive, "the relay died at start-up"

    def close(self) -> None:
        self.client.drop_database(self.db.name)
        self.client.close()


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> Iterator[Source]:
    name = str(request.param)
    if name.startswith("postgres"):
        yield PostgresSource(name, request.getfixturevalue("db_url"))
        return
    base = request.getfixturevalue("mongo_url")
    parts = urllib.parse.urlsplit(base)
    url = urllib.parse.urlunsplit(parts._replace(path=f"/test_{uuid.uuid4().hex[:12]}"))
    mongo = MongoSource(name, url)
    yield mongo
    mongo.close()


def outbox_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", "parked", *args],
                          capture_output=True, text=True, timeout=120)


def raise_topic_limit(kafka: str, topic: str, limit: int) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(limit),
                    incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def test_a_parked_event_holds_its_key_and_retry_keeps_the_order(
    source: Source, kafka_bootstrap: str
) -> None:
    topic = unique_topic("limit")
    create_topics(kafka_bootstrap, topic, partitions=3,
                  config={"max.message.bytes": str(TOPIC_LIMIT)})

    def event(key: str, size: int, name: str) -> outbox.Event:
        return outbox.Event(topic, key, name, {"blob": incompressible(size)})

    small = event("K", 1_000, "Small")
    large = event("K", 200_000, "Large")
    held = event("K", 1_000, "AfterLarge")
    # Other keys: 300 kB of small events in flight at once, three times the topic's limit, so
    # their batches would be refused too if they were not kept under it.
    others = [event(f"O{i % 10}", 1_000, "Other") for i in range(300)]
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(source.settings(kafka_bootstrap)) as relay:
        source.started(relay)
        for item in (small, large, held, *others):
            source.write(item)
        reader.read_ids({str(small.id)} | {str(e.id) for e in others}, timeout=60)
        wait_for(lambda: len(source.parked()) == 2, 60, "the large event and its follower parked")
        later = event("K", 1_000, "WhileHeld")
        source.write(later)
        wait_for(lambda: len(source.parked()) == 3, 60, "the key's new event parked behind")
        parked = source.parked()
        assert [event_id for event_id, _ in parked] == [large.id, held.id, later.id]
        assert "MSG_SIZE_TOO_LARGE" in parked[0][1]
        assert parked[1][1] == parked[2][1] == f"held behind {large.id}"

        listed = outbox_cli("list", *source.cli())
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0] == f"key {topic}/K:"
        assert len(lines) == 4
        for expected, line in zip((large, held, later), lines[1:], strict=True):
            assert str(expected.id) in line

        raise_topic_limit(kafka_bootstrap, topic, 400_000)  # the operator fixes the cause
        retried = outbox_cli("retry", *source.cli())
        assert retried.returncode == 0, retried.stderr
        assert "re-queued 3 event(s)" in retried.stdout
        after = event("K", 1_000, "AfterRetry")
        source.write(after)
        reader.read_ids({str(e.id) for e in (large, held, later, after)}, timeout=60)
        assert source.parked() == []
    received = reader.drain(quiet=1.0)
    reader.close()
    first_seen: list[str] = []
    for message in received:
        if message.key == "K" and message.id not in first_seen:
            first_seen.append(message.id)
    assert first_seen == [str(e.id) for e in (small, large, held, later, after)]
    assert {m.id for m in received} >= {str(e.id) for e in others}


def test_a_key_whose_parked_events_were_deleted_flows_again_without_a_restart(
    source: Source, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.core.holds")
    topic = unique_topic("drop")
    create_topics(kafka_bootstrap, topic)
    misrouted = outbox.Event(topic, "K", "Misrouted", {}, topic="not a valid topic!")
    behind = outbox.Event(topic, "K", "Behind", {})
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(source.settings(kafka_bootstrap)) as relay:
        source.started(relay)
        source.write(misrouted)
        source.write(behind)
        wait_for(lambda: len(source.parked()) == 2, 60, "the event and its follower parked")
        source.discard_parked()
        wait_for(lambda: any(getattr(r, "event", None) == "key_released"
                             and getattr(r, "aggregate_id", None) == "K"
                             for r in caplog.records), 60, "the relay to release the key")
        after = outbox.Event(topic, "K", "After", {})
        source.write(after)
        (message,) = reader.read_ids({str(after.id)}, timeout=60)
        assert source.parked() == []
    reader.close()
    assert message.key == "K"
