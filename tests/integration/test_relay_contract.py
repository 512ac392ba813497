"""The relay-source contract: what every source keeps, run against all four on real services.

Each test states one guarantee of PRODUCT.md / RELIABILITY.md and runs for every source that
has the capabilities it needs (`tests/support/sources.py`: write modes, keep-published, open
transactions, commit order, resume token, standby, parking). Relays are driven only through
`RelaySettings` (in a thread) or the `outbox relay` command, events written through the
`outbox` library, and Kafka read back with real consumers; every run is checked with the ledger.
What only one source does lives in that source's own file (test_poll_relay.py,
test_wal_relay.py, test_mongo_relay.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

import outbox
from relay.settings import RelaySettings
from tests.support.kafka import (
    TopicReader,
    create_topics,
    incompressible,
    raise_topic_limit,
    unique_topic,
)
from tests.support.ledger import Ledger
from tests.support.relays import RelayProcess, RelayThread, wait_for
from tests.support.sources import (
    SOURCES,
    PostgresSource,
    RelaySource,
    make_source,
    source_modes,
    sources_with,
)
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration

TOPIC_LIMIT = 100_000


@pytest.fixture(params=SOURCES)
def source(request: pytest.FixtureRequest) -> Iterator[RelaySource]:
    made = make_source(request, str(request.param))
    yield made
    made.close()


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("contract")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


def write_many(source: RelaySource, writer: SequencedWriter, *, keys: int, per_key: int,
               per_transaction: int = 10, rollback_every: int = 0, mode: str | None = None
               ) -> None:
    """keys x per_key events, `per_transaction` per unit of work, keys interleaved; with
    `rollback_every` n, every n-th unit of work is rolled back (its events are never relayed)."""
    batch: list[outbox.Event] = []
    units = 0

    def flush() -> None:
        nonlocal units
        units += 1
        commit = not rollback_every or units % rollback_every != 0
        source.write(batch, commit=commit, mode=mode)
        writer.note(batch, committed=commit)
        batch.clear()

    for _ in range(per_key):
        for k in range(keys):
            batch += writer.events(f"k{k}", 1)
            if len(batch) == per_transaction:
                flush()
    if batch:
        flush()


def restarts(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if getattr(r, "event", None) == "relay_restart"]


@contextmanager
def running(source: RelaySource, relay_settings: RelaySettings) -> Iterator[RelayThread]:
    """A relay in a thread, once it captures what is written from now on; stopped after."""
    relay = RelayThread(relay_settings).start()
    try:
        source.started(lambda: relay.alive)
        yield relay
    finally:
        relay.stop()


# -- the message -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "mode"), source_modes(), indirect=["source"])
def test_a_relayed_event_has_the_same_key_value_and_headers_on_every_source(
    source: RelaySource, mode: str, kafka_bootstrap: str, topic: str
) -> None:
    """In every way a writer can record events: the Kafka message of PRODUCT.md, a rolled-back
    unit of work never published, and the events gone from the source once acknowledged."""
    routed = unique_topic("routed")
    create_topics(kafka_bootstrap, routed)
    events = [
        outbox.Event(topic, "42", "OrderCreated", {"orderId": 42}, headers={"tenant": "eu"}),
        outbox.Event(topic, "42", "OrderNoted", b"\x00plain\xff",
                     content_type="application/x-note"),
        outbox.Event(topic, "43", "OrderForgotten"),  # no payload: JSON null
        outbox.Event(topic, "42", "OrderRouted", {"to": "x"}, topic=routed),
    ]
    rolled_back = [outbox.Event(topic, "42", "OrderCancelled", {"orderId": 42}),
                   outbox.Event(topic, "44", "OrderCancelled", {"orderId": 44}, topic=routed)]
    ledger = Ledger()
    reader = TopicReader(kafka_bootstrap, topic, routed)
    with running(source, source.settings(kafka_bootstrap)):
        source.write(rolled_back, commit=False, mode=mode)
        source.write(events, mode=mode)
        for seq, event in enumerate(events):  # order is per topic and key
            ledger.record(str(event.id), f"{event.topic or topic}/{event.aggregate_id}", seq,
                          committed=True)
        for event in rolled_back:
            ledger.record(str(event.id), event.aggregate_id, -1, committed=False)
        reader.read_ids(ledger.committed_ids, timeout=60)
        source.wait_acknowledged(30, "after the deliveries")
        assert source.stored() == 0  # acknowledged events leave the table or the document
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    got = {m.id: m for m in reader.messages}
    created, noted, forgotten, rerouted = (got[str(e.id)] for e in events)
    assert (created.topic, created.key, json.loads(created.value)) == (topic, "42", {"orderId": 42})
    assert created.headers == {
        "id": str(events[0].id), "event_type": "OrderCreated", "aggregate_type": topic,
        "content_type": "application/json", "tenant": "eu"}
    assert (noted.key, noted.value) == ("42", b"\x00plain\xff")
    assert noted.headers == {
        "id": str(events[1].id), "event_type": "OrderNoted", "aggregate_type": topic,
        "content_type": "application/x-note"}
    assert (forgotten.key, forgotten.value) == ("43", b"null")
    assert forgotten.headers["content_type"] == "application/json"
    assert (rerouted.topic, rerouted.key, json.loads(rerouted.value)) == (routed, "42", {"to": "x"})
    assert rerouted.headers["aggregate_type"] == topic
    # One key, one partition: the key's events in the order they were written.
    assert [m.id for m in reader.messages if m.topic == topic and m.key == "42"] == [
        str(events[0].id), str(events[1].id)]


# -- what is published -----------------------------------------------------------------------------


def test_every_committed_event_is_published_once_in_key_order_and_rolled_back_ones_never(
    source: RelaySource, kafka_bootstrap: str, topic: str
) -> None:
    """Events written before the relay starts and while it runs, keys interleaved, one unit of
    work in four rolled back (each write mode is checked for rollbacks in the message test)."""
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    write_many(source, writer, keys=3, per_key=10, rollback_every=4)  # before
    reader = TopicReader(kafka_bootstrap, topic)
    with running(source, source.settings(kafka_bootstrap)):
        write_many(source, writer, keys=5, per_key=20, rollback_every=4)  # while
        reader.read_ids(ledger.committed_ids, timeout=60)
        source.wait_acknowledged(30)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    assert len(ledger.committed_ids) < len(ledger.entries)  # some were rolled back


@pytest.mark.parametrize("source", sources_with("open_transactions"), indirect=True)
def test_later_commits_flow_and_are_acknowledged_while_an_earlier_transaction_is_open(
    source: RelaySource, kafka_bootstrap: str, topic: str
) -> None:
    assert isinstance(source, PostgresSource)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    db_url = source.db_url
    with running(source, source.settings(kafka_bootstrap)), \
            psycopg.connect(db_url) as long_tx, psycopg.connect(db_url) as a, \
            psycopg.connect(db_url) as b, psycopg.connect(db_url) as c:
        # A transaction that writes first and stays open while everything else commits.
        held = writer.events("held", 3)
        outbox.publish(long_tx, *held)
        # Three transactions that write in order a, b, c and commit c, b, a. Where the source
        # publishes in commit order (WAL), their events share a key numbered in commit order;
        # elsewhere each has its own key (a polling relay publishes in commit order only the
        # events of writers that serialise per aggregate, as the concurrent-writer test does).
        if source.capabilities.commit_order:
            ev_c, ev_b, ev_a = (writer.events("reversed", 1) for _ in range(3))
        else:
            ev_a, ev_b, ev_c = writer.events("a", 1), writer.events("b", 1), writer.events("c", 1)
        for conn, events in ((a, ev_a), (b, ev_b), (c, ev_c)):
            outbox.publish(conn, *events)
        for conn, events in ((c, ev_c), (b, ev_b), (a, ev_a)):
            source.committed(conn)
            writer.note(events, committed=True)
        outbox.publish(a, *(rolled_back := writer.events("rolled-back", 2)))
        a.rollback()
        writer.note(rolled_back, committed=False)
        write_many(source, writer, keys=10, per_key=100)
        # Later commits flow, and are acknowledged, while the long one is still open.
        reader.read_ids(ledger.committed_ids - {str(e.id) for e in held}, timeout=90)
        source.wait_acknowledged(30, "while a transaction that wrote earlier is open")
        assert not {m.id for m in reader.messages} & {str(e.id) for e in held}
        source.committed(long_tx)
        writer.note(held, committed=True)
        reader.read_ids(ledger.committed_ids, timeout=60)
        source.wait_acknowledged(30, "after the long transaction")
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0


def test_concurrent_writers_of_the_same_aggregates_keep_each_key_in_commit_order(
    source: RelaySource, kafka_bootstrap: str, topic: str
) -> None:
    """Writers race on a few aggregates, each write taking the aggregate's next sequence number
    in its unit of work (a row lock, or a document version); one in ten rolls back. Pass:
    nothing lost, nothing phantom, per-key order, every entry acknowledged."""
    keys = [f"agg{i}" for i in range(4)]
    source.prepare_aggregates(keys)
    ledger = Ledger()
    lock = threading.Lock()
    errors: list[BaseException] = []
    threads_, per_thread = 4, 30

    def make(key: str, seq: int) -> outbox.Event:
        return outbox.Event(topic, key, "Sequenced", {"seq": seq})

    def write(seed: int) -> None:
        rng = random.Random(seed)
        committed = 0
        try:
            with source.appender() as appender:
                while committed < per_thread:
                    commit = rng.random() > 0.1
                    written = appender.append(rng.choice(keys), make, commit=commit, rng=rng)
                    if written is None:
                        continue  # lost a race: nothing was written
                    event, seq = written
                    with lock:
                        ledger.record(str(event.id), event.aggregate_id, seq, commit)
                    committed += commit
        except BaseException as exc:
            errors.append(exc)

    reader = TopicReader(kafka_bootstrap, topic)
    relay_settings = source.settings(kafka_bootstrap, poll_interval=0.05, batch_size=50)
    with running(source, relay_settings):
        threads = [threading.Thread(target=write, args=(n,)) for n in range(threads_)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        reader.read_ids(ledger.committed_ids, timeout=90)
        source.wait_acknowledged(60, "for every entry")
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    assert len(ledger.committed_ids) == threads_ * per_thread
    assert source.sequence_total() == threads_ * per_thread, "every committed write landed"


# -- events Kafka refuses --------------------------------------------------------------------------


@pytest.mark.parametrize("source", sources_with("parking"), indirect=True)
def test_unpublishable_events_are_parked_with_a_reason_while_others_flow(
    source: RelaySource, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay")
    # The broker auto-creates topics, but not one whose name collides with an existing topic
    # ("a.b" and "a_b"): the same answer as a missing topic with auto-creation off.
    taken = unique_topic("taken.")
    create_topics(kafka_bootstrap, taken)
    too_large = outbox.Event(topic, "big", "Huge", {"blob": "x" * 2_000_000})
    bad_topic = outbox.Event(topic, "m", "Misrouted", {}, topic="not a valid topic!")
    missing = outbox.Event(topic, "lost", "Lost", {}, topic=taken.replace(".", "_"))
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    write_many(source, writer, keys=3, per_key=10)
    # Good events batched with the unpublishable ones are not parked with them.
    good = writer.events("k0", 2)
    source.write([good[0], too_large, bad_topic, missing, good[1]],
                 max_payload_bytes=4 * 1024 * 1024)
    writer.note(good, committed=True)
    write_many(source, writer, keys=3, per_key=10)
    reader = TopicReader(kafka_bootstrap, topic)
    # librdkafka waits this long for a topic to appear before it reports it missing.
    quick = {"topic.metadata.propagation.max.ms": "2000"}
    with running(source, source.settings(kafka_bootstrap,
                                                     kafka_settings=quick)):
        reader.read_ids(ledger.committed_ids, timeout=60)
        wait_for(lambda: len(source.parked()) == 3, 60, "the three events to be parked")
        source.wait_acknowledged(30, "past the parked events")
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    reasons = dict(source.parked())
    assert set(reasons) == {too_large.id, bad_topic.id, missing.id}
    assert "too large" in reasons[too_large.id].lower() or "size" in reasons[too_large.id].lower()
    assert "invalid topic" in reasons[bad_topic.id]
    assert "UNKNOWN_TOPIC_OR_PART" in reasons[missing.id]
    assert not restarts(caplog.records), "an unpublishable event made the relay restart"


def outbox_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", "parked", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("source", sources_with("parking"), indirect=True)
def test_a_parked_event_holds_its_key_and_retry_keeps_the_order(
    source: RelaySource, kafka_bootstrap: str
) -> None:
    """The case a user met: a topic created with its own `max.message.bytes=100000`; key K gets
    a 1 kB event, a 200 kB incompressible one, then 1 kB ones. Only the 200 kB event may be
    refused (the others are not parked for the batch they travelled in); K's later events wait
    behind it ("held behind <id>") while other keys flow; `outbox parked retry` sends K's parked
    events in their original order, before K's newer events, once the topic takes them."""
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
    with running(source, source.settings(kafka_bootstrap)):
        for item in (small, large, held):
            source.write([item])
        for start in range(0, len(others), 30):  # ten keys, three events each, per write
            source.write(others[start:start + 30])
        reader.read_ids({str(small.id)} | {str(e.id) for e in others}, timeout=60)
        wait_for(lambda: len(source.parked()) == 2, 60, "the large event and its follower parked")
        later = event("K", 1_000, "WhileHeld")
        source.write([later])
        wait_for(lambda: len(source.parked()) == 3, 60, "the key's new event parked behind")
        parked = source.parked()
        assert [event_id for event_id, _ in parked] == [large.id, held.id, later.id]
        assert "MSG_SIZE_TOO_LARGE" in parked[0][1]
        assert parked[1][1] == parked[2][1] == f"held behind {large.id}"

        listed = outbox_cli("list", *source.parked_cli())
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0] == f"key {topic}/K:"
        assert len(lines) == 4
        for expected, line in zip((large, held, later), lines[1:], strict=True):
            assert str(expected.id) in line

        raise_topic_limit(kafka_bootstrap, topic, 400_000)  # the operator fixes the cause
        retried = outbox_cli("retry", *source.parked_cli())
        assert retried.returncode == 0, retried.stderr
        assert "re-queued 3 event(s)" in retried.stdout
        after = event("K", 1_000, "AfterRetry")
        source.write([after])
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


@pytest.mark.parametrize("source", sources_with("parking"), indirect=True)
def test_a_key_whose_parked_events_were_deleted_flows_again_without_a_restart(
    source: RelaySource, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.core.holds")
    topic = unique_topic("drop")
    create_topics(kafka_bootstrap, topic)
    misrouted = outbox.Event(topic, "K", "Misrouted", {}, topic="not a valid topic!")
    behind = outbox.Event(topic, "K", "Behind", {})
    reader = TopicReader(kafka_bootstrap, topic)
    with running(source, source.settings(kafka_bootstrap)):
        source.write([misrouted])
        source.write([behind])
        wait_for(lambda: len(source.parked()) == 2, 60, "the event and its follower parked")
        source.discard_parked()
        wait_for(lambda: any(getattr(r, "event", None) == "key_released"
                             and getattr(r, "aggregate_id", None) == "K"
                             for r in caplog.records), 60, "the relay to release the key")
        after = outbox.Event(topic, "K", "After", {})
        source.write([after])
        (message,) = reader.read_ids({str(after.id)}, timeout=60)
        assert source.parked() == []
    reader.close()
    assert message.key == "K"


# -- stop, restart, two relays ---------------------------------------------------------------------


def test_sigterm_drains_and_acknowledges_and_a_restart_resumes_without_loss(
    source: RelaySource, kafka_bootstrap: str, topic: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while deliveries are outstanding: the relay waits for them, acknowledges them
    and exits 0, so a restart sends none of them again; what was written while no relay ran
    (found by the resume token, where the source has one) follows, nothing lost."""
    caplog.set_level(logging.INFO, logger="relay")
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = RelayProcess(*source.cli_args(kafka_bootstrap), log=tmp_path / "relay.log").start()
    try:
        assert relay.process is not None
        process = relay.process
        source.started(lambda: process.poll() is None)
        write_many(source, writer, keys=10, per_key=20, per_transaction=100)
        reader.read_until(lambda got: len(got) > 0, timeout=60)
        assert relay.kill(signal.SIGTERM) == 0, relay.log()[-3000:]
    finally:
        relay.close()
    log = relay.log()
    assert '"event": "relay_exit"' in log
    assert "password" not in log.lower() or "***" in log
    sent = reader.in_kafka()
    write_many(source, writer, keys=12, per_key=2, per_transaction=24)  # no relay; 2 new keys
    caplog.clear()
    with RelayThread(source.settings(kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids, timeout=60)
        source.wait_acknowledged(30, "after the restart")
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0, f"{verdict.dup} of the {sent} events sent before SIGTERM again"
    if source.capabilities.resume_token:
        events = [getattr(r, "event", None) for r in caplog.records]
        assert "stream_resumed" in events and "stream_scan_start" not in events


@pytest.mark.parametrize("source", sources_with("standby"), indirect=True)
def test_a_second_relay_waits_as_a_standby_and_takes_over_when_the_first_stops(
    source: RelaySource, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    first = RelayThread(source.settings(kafka_bootstrap)).start()
    source.started(lambda: first.alive)
    second: RelayThread | None = None
    try:
        wait_for(lambda: source.leader() is not None, 30, "the first relay to lead")
        first_leader = source.leader()
        second = RelayThread(source.settings(kafka_bootstrap)).start()
        wait_for(lambda: source.standby_logged(caplog.records), 30,
                 "the second relay to stand by")
        write_many(source, writer, keys=5, per_key=20, per_transaction=50)
        reader.read_ids(ledger.committed_ids, timeout=60)
        # The second relay is still waiting: alive, without an error, the source not its own.
        assert second.alive and second.error is None, second.error
        assert source.leader() == first_leader
        first.stop()
        write_many(source, writer, keys=5, per_key=20, per_transaction=50)
        reader.read_ids(ledger.committed_ids, timeout=60)
        source.wait_acknowledged(30, "by the relay that took over")
        assert source.leader() not in (None, first_leader)
        assert second.alive and second.error is None, second.error
    finally:
        if first.alive:
            first.stop()
        if second is not None:
            second.stop()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0  # the first relay stopped cleanly: everything it sent is acknowledged


# -- keeping published events ----------------------------------------------------------------------


def outbox_rows(source: RelaySource) -> tuple[int, int]:
    """(all rows, rows not marked published) of a Postgres source's outbox table."""
    assert isinstance(source, PostgresSource)
    with psycopg.connect(source.db_url) as conn:
        row = conn.execute("SELECT count(*), count(*) FILTER (WHERE published_at IS NULL)"
                           " FROM outbox").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.parametrize("source", sources_with("keep_published"), indirect=True)
def test_keep_published_marks_events_and_purges_them_once_old_enough(
    source: RelaySource, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    write_many(source, writer, keys=5, per_key=20)
    reader = TopicReader(kafka_bootstrap, topic)
    relay_settings = source.settings(kafka_bootstrap, keep_published=dt.timedelta(seconds=3))
    with RelayThread(relay_settings):
        reader.read_ids(ledger.committed_ids)
        # Every row marked published, none gone yet; then every row gone once old enough.
        wait_for(lambda: outbox_rows(source) == (100, 0), 30, "the rows to be marked")
        wait_for(lambda: outbox_rows(source) == (0, 0), 30, "the kept rows to be purged")
        source.wait_acknowledged(30)
    ledger.check(reader.drain(quiet=1.0)).assert_holds()
    reader.close()
