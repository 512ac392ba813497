"""Rows kept with --keep-published carry the topic their event was sent to (relay/sinks/kafka/
sink.py `topic_sql`, relay/published.py `kept_topic`), so that `outbox replay` sends an event
where it went even after the relay's topic template changed. Real PostgreSQL and Kafka."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

import outbox
from outbox.columns import ColumnMapping
from relay.replay import ReplayConfig, ReplayFilter, replay
from relay.settings import RelaySettings
from relay.sinks.kafka.sink import PublisherConfig, topic_for, topic_sql
from relay.wal import slots
from tests.integration.test_replay import (
    KEEP,
    kept,
    outbox_cli,
    publish_and_keep,
    replayed,
    write,
)
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.wal import WalSlot

pytestmark = pytest.mark.integration

CUSTOM = "{aggregate_type}.{event_type}-v1"


def events_of(aggregate_type: str, own_topic: str) -> list[outbox.Event]:
    """Events routed by the template, and one with a topic of its own."""
    routed = [outbox.Event(aggregate_type, str(n), "OrderCreated", {"n": n}) for n in range(5)]
    return [*routed, outbox.Event(aggregate_type, "own", "OrderCreated", {}, topic=own_topic)]


def kept_topics(db_url: str) -> dict[uuid.UUID, str | None]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT id, topic FROM outbox WHERE published_at IS NOT NULL")
        return dict(rows.fetchall())


def relay_settings(source: str, db_url: str, kafka: str, template: str) -> RelaySettings:
    if source == "postgres-wal":
        return WalSlot.create(db_url).settings(kafka, keep_published=KEEP,
                                               topic_template=template)
    return RelaySettings(source="postgres-poll", db_url=db_url, kafka_bootstrap=kafka,
                         poll_interval=0.2, keep_published=KEEP, topic_template=template)


@pytest.mark.parametrize("template", ["{aggregate_type}", CUSTOM], ids=["default", "custom"])
@pytest.mark.parametrize("source", ["postgres-poll", "postgres-wal"], ids=["poll", "wal"])
def test_a_kept_row_carries_the_topic_its_event_was_sent_to(
    db_url: str, kafka_bootstrap: str, source: str, template: str
) -> None:
    aggregate_type = unique_topic("kept")
    routed_topic = template.format(aggregate_type=aggregate_type, event_type="OrderCreated")
    own_topic = unique_topic("own")
    create_topics(kafka_bootstrap, routed_topic, own_topic)
    events = events_of(aggregate_type, own_topic)
    settings = relay_settings(source, db_url, kafka_bootstrap, template)

    received = publish_and_keep(db_url, kafka_bootstrap, routed_topic, events[:-1], settings)
    own = publish_and_keep(db_url, kafka_bootstrap, own_topic, events[-1:], settings)

    assert {m.topic for m in received} == {routed_topic}
    assert {m.topic for m in own} == {own_topic}
    assert kept_topics(db_url) == {
        **{e.id: routed_topic for e in events[:-1]}, events[-1].id: own_topic}


def test_replay_after_the_template_changed_sends_to_the_original_topic(
    db_url: str, kafka_bootstrap: str
) -> None:
    aggregate_type = unique_topic("moved")
    before, after = f"{aggregate_type}.v1", f"{aggregate_type}.v2"
    create_topics(kafka_bootstrap, before, after)
    events = [outbox.Event(aggregate_type, str(n), "OrderCreated", {"n": n}) for n in range(4)]
    publish_and_keep(db_url, kafka_bootstrap, before, events, relay_settings(
        "postgres-poll", db_url, kafka_bootstrap, "{aggregate_type}.v1"))

    # The relay runs with "{aggregate_type}.v2" now, and so does the replay.
    now = "{aggregate_type}.v2"
    report = replay(ReplayConfig(db_url=db_url, filter=ReplayFilter.parse(
        aggregate_type=aggregate_type), topic_template=now),
        PublisherConfig(kafka_bootstrap, topic_template=now), threading.Event())

    assert (report.complete, report.by_topic) == (True, {before: 4})
    reader = TopicReader(kafka_bootstrap, before)
    reader.read_until(lambda got: len(replayed(got)) >= 4)
    assert sorted(m.id for m in replayed(reader.drain(quiet=1.0))) == sorted(
        str(e.id) for e in events)
    reader.close()
    untouched = TopicReader(kafka_bootstrap, after)
    assert untouched.drain(quiet=1.0) == []
    untouched.close()


def test_rows_a_slot_recovery_published_carry_their_topic(
    db_url: str, kafka_bootstrap: str
) -> None:
    slot = WalSlot.create(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        slots.drop_slot(conn, slot.slot)
    aggregate_type = unique_topic("recovered")
    routed_topic = f"{aggregate_type}.OrderCreated-v1"
    create_topics(kafka_bootstrap, routed_topic)
    missed = outbox.Event(aggregate_type, "1", "OrderCreated", {})
    write(db_url, [missed])  # only the table has it: the recovery publishes it

    done = outbox_cli("slot", "recover", "--db", db_url, "--kafka", kafka_bootstrap,
                      "--slot", slot.slot, "--publication", slot.publication,
                      "--keep-published", "1d", "--topic-template", CUSTOM)

    assert done.returncode == 0, done.stderr
    assert kept(db_url) == 1
    assert kept_topics(db_url) == {missed.id: routed_topic}


TEMPLATES = [
    "{aggregate_type}",
    "{aggregate_type}.{aggregate_id}",
    "events",
    "it's-{aggregate_type}",
    "x-{event_type}_{aggregate_type!s}-{aggregate_id}.{{raw}}",
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_compiled_template_gives_what_topic_for_gives(db_url: str, template: str) -> None:
    events = [outbox.Event("Order", "o'1", "Created", {}),
              outbox.Event("Order", "2", "Created", {}, topic="own")]
    expression = topic_sql(template, ColumnMapping())
    assert expression is not None
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, *events)
        # An empty topic of its own is no topic, for the sink as for the mark.
        conn.execute("UPDATE outbox SET topic = '' WHERE aggregate_id = 'o''1'")
        rows = conn.execute(sql.SQL("SELECT id, {} FROM outbox").format(expression)).fetchall()
        records = _records(conn)
    assert dict(rows) == {record.id: topic_for(record, template) for record in records}


def _records(conn: psycopg.Connection[Any]) -> list[Any]:
    from relay.poll.relay import row_record

    return [row_record(row) for row in conn.execute(
        "SELECT position, id, aggregate_type, aggregate_id, event_type, topic, payload,"
        " content_type, headers::text, created_at FROM outbox").fetchall()]
