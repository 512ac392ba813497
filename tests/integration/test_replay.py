"""`outbox replay` against real PostgreSQL and Kafka: events a relay published and kept
(--keep-published) are sent again, filtered, per key in commit order, with their own ids and
the `replayed` header; an interrupted replay is run again and an idempotent consumer applies
every event once."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections import Counter
from typing import Any

import psycopg
import pytest

import outbox
from outbox.consumer import Consumer
from outbox.names import SchemaNames
from relay.published import purge_expired
from relay.replay import ReplayConfig, ReplayFilter, ReplayReport, replay
from relay.sinks.kafka.sink import PublisherConfig
from relay.stats import RelayStats
from relay.wal import slots
from tests.integration.test_consumer import (
    applied_rows,
    inbox_ids,
    insert_applied_psycopg,
    kafka_settings,
    make_applied_table,
    make_topic,
)
from tests.support.kafka import Received, TopicReader, create_topics, unique_topic
from tests.support.relays import REPO, RelayThread, wait_for
from tests.support.wal import WalSlot

pytestmark = pytest.mark.integration

KEEP = dt.timedelta(days=1)


def event(topic: str, key: str, n: int) -> outbox.Event:
    return outbox.Event(aggregate_type="Order", aggregate_id=key, event_type="OrderCreated",
                        payload={"n": n}, topic=topic)


def write(db_url: str, events: list[outbox.Event]) -> None:
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, *events)


def kept(db_url: str) -> int:
    """Rows marked published and kept, once every row of the table is (else -1)."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FILTER (WHERE published_at IS NOT NULL),"
                           " count(*) FROM outbox").fetchone()
    assert row is not None
    return int(row[0]) if row[0] == row[1] else -1


def publish_and_keep(db_url: str, kafka: str, topic: str, events: list[outbox.Event],
                     settings: Any = None) -> list[Received]:
    """The polling relay (or `settings`' relay) publishes `events` and keeps their rows."""
    write(db_url, events)
    reader = TopicReader(kafka, topic)
    relay_settings = settings or _poll_settings(db_url, kafka)
    with RelayThread(relay_settings):
        received = reader.read_ids({str(e.id) for e in events})
        wait_for(lambda: kept(db_url) >= len(events), 30, "the rows to be marked and kept")
    reader.close()
    return received


def _poll_settings(db_url: str, kafka: str) -> Any:
    from relay.settings import RelaySettings

    return RelaySettings(source="postgres-poll", db_url=db_url, kafka_bootstrap=kafka,
                         poll_interval=0.2, keep_published=KEEP)


def run_replay(db_url: str, kafka: str, wanted: ReplayFilter, *, to_topic: str | None = None,
               stop: threading.Event | None = None, stats: RelayStats | None = None,
               **config: Any) -> ReplayReport:
    return replay(ReplayConfig(db_url=db_url, filter=wanted, to_topic=to_topic, **config),
                  PublisherConfig(kafka), stop or threading.Event(), stats=stats)


def replayed(messages: list[Received]) -> list[Received]:
    return [m for m in messages if m.headers.get("replayed") == "true"]


def per_key(messages: list[Received]) -> dict[str | None, list[str]]:
    keys: dict[str | None, list[str]] = {}
    for message in messages:
        keys.setdefault(message.key, []).append(message.id)
    return keys


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return make_topic(kafka_bootstrap)


def test_replay_by_aggregate_sends_its_events_in_order_with_their_ids_and_the_header(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    events = [event(topic, str(n % 3), n) for n in range(30)]
    original = publish_and_keep(db_url, kafka_bootstrap, topic, events)
    wanted = [e for e in events if e.aggregate_id in ("1", "2")]

    report = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(
        aggregate_type="Order", aggregate_ids=["1", "2"]))

    assert (report.complete, report.matched, report.by_topic) == (True, 20, {topic: 20})
    reader = TopicReader(kafka_bootstrap, topic)
    messages = reader.read_until(lambda got: len(got) >= 50)
    again = replayed(reader.drain(quiet=1.0))
    reader.close()
    assert len(messages) == 50
    assert sorted(m.id for m in again) == sorted(str(e.id) for e in wanted)
    # Per key, the order Kafka had them in the first time; payloads and headers unchanged.
    first = per_key([m for m in original if m.key in ("1", "2")])
    assert per_key(again) == first
    by_id = {m.id: m for m in original}
    for message in again:
        assert message.value == by_id[message.id].value
        assert {**by_id[message.id].headers, "replayed": "true"} == message.headers


def test_replay_by_event_ids_sends_only_those(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    events = [event(topic, str(n % 4), n) for n in range(12)]
    publish_and_keep(db_url, kafka_bootstrap, topic, events)
    chosen = [events[2], events[7], events[11]]

    report = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(
        event_ids=[str(e.id) for e in chosen]))

    assert (report.complete, report.sent) == (True, 3)
    reader = TopicReader(kafka_bootstrap, topic)
    reader.read_until(lambda got: len(replayed(got)) >= 3)
    again = replayed(reader.drain(quiet=1.0))
    reader.close()
    assert sorted(m.id for m in again) == sorted(str(e.id) for e in chosen)


def test_replay_by_time_window_takes_events_created_in_it(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    before = [event(topic, "a", n) for n in range(5)]
    write(db_url, before)
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    boundary: dt.datetime = row[0]
    after = [event(topic, "a", n) for n in range(5, 9)]
    publish_and_keep(db_url, kafka_bootstrap, topic, after)
    assert kept(db_url) == 9

    later = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(since=boundary.isoformat()))
    earlier = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(
        until=boundary.isoformat(), since=(boundary - dt.timedelta(hours=1)).isoformat()))

    assert (later.sent, earlier.sent) == (4, 5)
    reader = TopicReader(kafka_bootstrap, topic)
    reader.read_until(lambda got: len(replayed(got)) >= 9)
    again = replayed(reader.drain(quiet=1.0))
    reader.close()
    assert [m.id for m in again] == [str(e.id) for e in after + before]


def test_replay_to_another_topic_leaves_the_original_topic_alone(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    events = [event(topic, str(n % 2), n) for n in range(6)]
    publish_and_keep(db_url, kafka_bootstrap, topic, events)
    private = unique_topic("private")
    create_topics(kafka_bootstrap, private)

    report = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(everything=True),
                        to_topic=private)

    assert report.by_topic == {private: 6}
    reader = TopicReader(kafka_bootstrap, private)
    moved = reader.read_until(lambda got: len(got) >= 6)
    reader.drain(quiet=1.0)
    reader.close()
    assert sorted(m.id for m in moved) == sorted(str(e.id) for e in events)
    assert all(m.headers["replayed"] == "true" for m in moved)
    source = TopicReader(kafka_bootstrap, topic)
    assert source.in_kafka() == 6  # only the relay's own
    source.close()


def billing(kafka: str, topic: str, db_url: str) -> Consumer:
    consumer = Consumer(name="billing", kafka=kafka_settings(kafka), topics=[topic], db=db_url)
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    return consumer


class StopAfter(Counter[str]):
    """The replay's published counter, setting `stop` once `count` deliveries came back: an
    interruption (SIGINT sets the same event) at a known point."""

    def __init__(self, stop: threading.Event, count: int) -> None:
        super().__init__()
        self.stop, self.count = stop, count

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        if sum(self.values()) >= self.count:
            self.stop.set()


def test_interrupted_replay_run_again_is_applied_once_by_an_idempotent_consumer(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    make_applied_table(db_url)
    events = [event(topic, str(n % 5), n) for n in range(200)]
    publish_and_keep(db_url, kafka_bootstrap, topic, events)
    assert billing(kafka_bootstrap, topic, db_url).run(max_messages=200, timeout=60).processed \
        == 200

    stop = threading.Event()
    stats = RelayStats(source="replay")
    stats.published = StopAfter(stop, 50)
    interrupted = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(everything=True),
                             stop=stop, stats=stats, batch_size=10, max_in_flight=10)
    assert not interrupted.complete
    assert 50 <= interrupted.sent < 200
    rerun = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(everything=True))
    assert (rerun.complete, rerun.sent) == (True, 200)

    total = 200 + interrupted.sent + 200
    stats_after = billing(kafka_bootstrap, topic, db_url).run(max_messages=total - 200,
                                                              timeout=60)
    assert (stats_after.processed, stats_after.duplicates) == (0, total - 200)
    rows = applied_rows(db_url)
    assert sorted(n for _, n in rows) == list(range(200))
    assert inbox_ids(db_url, "billing") == {e.id for e in events}


def test_wal_relay_kept_rows_replay_in_commit_order_not_position_order(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    slot = WalSlot.create(db_url)
    first, second = event(topic, "k", 1), event(topic, "k", 2)
    # `first` takes the lower position, `second` commits first: the WAL relay publishes in
    # commit order, and so must the replay.
    with psycopg.connect(db_url) as early, psycopg.connect(db_url) as late:
        outbox.publish(early, first)
        outbox.publish(late, second)
        late.commit()
        early.commit()
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT id FROM outbox ORDER BY position").fetchall()
    assert [row[0] for row in rows] == [first.id, second.id]
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(slot.settings(kafka_bootstrap, keep_published=KEEP)):
        original = reader.read_ids({str(first.id), str(second.id)})
        wait_for(lambda: kept(db_url) == 2, 30, "the rows to be marked and kept")
    assert [m.id for m in original] == [str(second.id), str(first.id)]
    with psycopg.connect(db_url) as conn:
        marked = conn.execute("SELECT count(commit_lsn) FROM outbox").fetchone()
    assert marked == (2,)

    report = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(aggregate_ids=["k"]))

    assert report.sent == 2
    reader.read_until(lambda got: len(replayed(got)) >= 2)
    assert [m.id for m in replayed(reader.drain(quiet=1.0))] == [str(second.id), str(first.id)]
    reader.close()


def test_rows_a_slot_recovery_published_replay_between_the_lost_and_the_new_slots_rows(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    slot = WalSlot.create(db_url)
    lost, recovered, streamed = (event(topic, "k", n) for n in range(3))
    publish_and_keep(db_url, kafka_bootstrap, topic, [lost],
                     settings=slot.settings(kafka_bootstrap, keep_published=KEEP))
    with psycopg.connect(db_url, autocommit=True) as conn:
        slots.drop_slot(conn, slot.slot)
    write(db_url, [recovered])  # only the table has it: the recovery publishes it
    done = outbox_cli("slot", "recover", "--db", db_url, "--kafka", kafka_bootstrap,
                      "--slot", slot.slot, "--publication", slot.publication,
                      "--keep-published", "1d")
    assert done.returncode == 0, done.stderr
    assert kept(db_url) == 2
    publish_and_keep(db_url, kafka_bootstrap, topic, [streamed],
                     settings=slot.settings(kafka_bootstrap, keep_published=KEEP))
    with psycopg.connect(db_url) as conn:
        lsns = conn.execute("SELECT commit_lsn FROM outbox ORDER BY position").fetchall()
    assert all(row[0] is not None for row in lsns)

    report = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(aggregate_ids=["k"]))

    assert report.sent == 3
    reader = TopicReader(kafka_bootstrap, topic)
    reader.read_until(lambda got: len(replayed(got)) >= 3)
    assert [m.id for m in replayed(reader.drain(quiet=1.0))] == [
        str(e.id) for e in (lost, recovered, streamed)]
    reader.close()


def test_cli_dry_run_sends_nothing_then_the_replay_prints_events_sent_per_topic(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    events = [event(topic, str(n % 2), n) for n in range(4)]
    publish_and_keep(db_url, kafka_bootstrap, topic, events)
    dry = outbox_cli("replay", "--db", db_url, "--aggregate-id", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == f"dry run: would replay 2 event(s) ({topic}: 2)"
    reader = TopicReader(kafka_bootstrap, topic)
    assert reader.in_kafka() == 4
    reader.close()

    result = outbox_cli("replay", "--db", db_url, "--kafka", kafka_bootstrap,
                        "--aggregate-type", "Order", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("replayed 4 of 4 event(s)")
    assert result.stdout.rstrip().endswith(f"({topic}: 4)")
    progress = [json.loads(line) for line in result.stderr.splitlines()
                if '"replay_progress"' in line]
    assert progress and progress[-1]["sent"] == 4 and progress[-1]["total"] == 4


@pytest.mark.parametrize(("args", "message"), [
    ([], "no filter given"),
    (["--all", "--aggregate-id", "1"], "--all replays every retained event"),
    (["--event-id", "not-a-uuid"], "--event-id 'not-a-uuid' is not a UUID"),
    (["--since", "yesterday"], "--since 'yesterday' is not an ISO 8601 time"),
    (["--since", "2026-12-08T10:00:00Z", "--until", "2026-12-08T09:00:00Z"],
     "is not before --until"),
    (["--all", "--table", "missing"], "table(s) missing, missing_parked missing"),
    (["--all", "--to-topic", "no spaces"], "is not a valid Kafka topic name"),
])
def test_bad_input_is_refused_before_anything_is_sent(
    db_url: str, kafka_bootstrap: str, topic: str, args: list[str], message: str
) -> None:
    events = [event(topic, "1", n) for n in range(2)]
    publish_and_keep(db_url, kafka_bootstrap, topic, events)
    result = outbox_cli("replay", "--db", db_url, "--kafka", kafka_bootstrap, *args)
    assert result.returncode != 0
    assert message in result.stderr
    reader = TopicReader(kafka_bootstrap, topic)
    assert reader.in_kafka() == 2
    reader.close()


def test_mongo_replay_is_refused_with_the_reason() -> None:
    result = outbox_cli("replay", "--mongo", "mongodb://127.0.0.1:1/app", "--all")
    assert result.returncode != 0
    assert "the MongoDB sources keep no published events" in result.stderr


def test_replay_needs_migration_0005(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("ALTER TABLE outbox DROP COLUMN commit_lsn")
    result = outbox_cli("replay", "--db", db_url, "--all", "--dry-run")
    assert result.returncode != 0
    assert "run `outbox migrate up` (migration 0005) first" in result.stderr


def outbox_cli(*args: str) -> Any:
    import os
    import subprocess
    import sys

    # The stack's settings stay out: each test names its own database and broker.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_large_purge_goes_in_bounded_turns(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,"
            " published_at) SELECT gen_random_uuid(), 'Order', i::text, 'E', '\\x00',"
            " now() - interval '2 days' FROM generate_series(1, 25000) AS i")
        conn.execute("INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,"
                     " published_at) VALUES (gen_random_uuid(), 'Order', 'new', 'E', '', now())")
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert purge_expired(conn, SchemaNames(), KEEP, max_chunks=2) == (20_000, False)
        assert purge_expired(conn, SchemaNames(), KEEP, max_chunks=2) == (5_000, True)
        assert purge_expired(conn, SchemaNames(), KEEP) == (0, True)
    assert kept(db_url) == 1  # the row within the window stays


def test_unknown_ids_match_nothing(db_url: str, kafka_bootstrap: str) -> None:
    report = run_replay(db_url, kafka_bootstrap, ReplayFilter.parse(
        event_ids=[str(uuid.uuid4())]))
    assert (report.complete, report.matched, report.sent) == (True, 0, 0)
