"""The WAL relay (pgoutput slot -> Kafka) on real PostgreSQL and Kafka, with the ledger check."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

import outbox
from outbox.names import SchemaNames
from relay.wal import slots
from tests.support.kafka import Received, TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import REPO, RelayProcess, RelayThread, wait_for
from tests.support.wal import (
    WalSlot,
    commit_lsn,
    current_lsn,
    peak_rss_mb,
    unique_slot,
    write_transactions,
)
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("wal")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


@pytest.fixture
def wal(db_url: str) -> WalSlot:
    """The slot and publication (the db_url fixture drops the slot with the database)."""
    return WalSlot.create(db_url)


def restarts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "relay_restart"]


# -- the message contract --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["table", "message", "insert-then-delete"])
def test_relayed_event_follows_the_message_contract(
    wal: WalSlot, kafka_bootstrap: str, topic: str, mode: str
) -> None:
    box = outbox.Outbox(mode="message") if mode == "message" else outbox.Outbox()
    event = outbox.Event(topic, "42", "OrderCreated", {"orderId": 42}, headers={"tenant": "eu"})
    ledger = Ledger()
    with psycopg.connect(wal.db_url) as conn:
        box.publish(conn, event)
        if mode == "insert-then-delete":
            # A writer that keeps the table empty: the row never persists, its insert is in
            # the log all the same.
            conn.execute("DELETE FROM outbox WHERE id = %s", [event.id])
        end = commit_lsn(conn)
        ledger.record(str(event.id), "42", 0, committed=True)
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(wal.settings(kafka_bootstrap)):
        (message,) = reader.read_ids({str(event.id)}, timeout=30)
        wal.wait_confirmed(end, 30, "after the delivery")
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    assert message.key == "42"
    assert json.loads(message.value) == {"orderId": 42}
    assert message.headers == {
        "id": str(event.id), "event_type": "OrderCreated", "aggregate_type": topic,
        "content_type": "application/json", "tenant": "eu",
    }
    with psycopg.connect(wal.db_url) as conn:  # removed before the slot moved past it
        rows = conn.execute("SELECT count(*) FROM outbox").fetchone()
    assert rows == (0,)


def test_table_less_events_with_a_custom_prefix_are_relayed_and_others_ignored(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    ours = SequencedWriter(topic, ledger, outbox_=outbox.Outbox(mode="message",
                                                                 message_prefix="billing"))
    other_prefix = outbox.Outbox(mode="message")  # prefix "outbox": not this relay's
    stray = outbox.Event(topic, "k0", "Stray", {"seq": 99})
    with psycopg.connect(wal.db_url) as conn:
        other_prefix.publish(conn, stray)
        ours.write(conn, ours.events("k0", 3))
        ours.write(conn, ours.events("k0", 2), commit=False)
        ours.write(conn, ours.events("k1", 3))
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(wal.settings(kafka_bootstrap, message_prefix="billing")):
        reader.read_ids(ledger.committed_ids, timeout=30)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()  # the stray event would count as a phantom
    assert verdict.dup == 0


def test_relay_streams_from_a_table_less_setup(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    """`outbox slot create --table-less` makes a publication of no table, for services that
    only write Outbox(mode="message"); the relay must stream from that setup."""
    name = unique_slot()
    created = subprocess.run(
        [sys.executable, "-m", "relay.cli", "slot", "create", "--db", db_url, "--slot", name,
         "--publication", name, "--table-less"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    wal = WalSlot(db_url, name, name, table_less=True)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger, outbox_=outbox.Outbox(mode="message"))
    with psycopg.connect(db_url) as conn:
        writer.write(conn, writer.events("k", 5))
        writer.write(conn, writer.events("k", 2), commit=False)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = RelayThread(wal.settings(kafka_bootstrap)).start()
    try:
        wait_for(lambda: not relay.alive or len(reader.drain(0.2)) >= 5, 30,
                 "the table-less events (or the relay's end)")
    finally:
        relay.stop()  # raises what stopped the relay, if anything did
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0


# -- commit order, long transactions, rollbacks ----------------------------------------------------


def test_interleaved_long_and_reverse_order_transactions_flow_in_commit_order(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    keys = [f"agg{i}" for i in range(6)]
    with psycopg.connect(wal.db_url) as conn:
        conn.execute("CREATE TABLE aggregates (key text PRIMARY KEY, seq int NOT NULL)")
        conn.cursor().executemany("INSERT INTO aggregates VALUES (%s, 0)", [(k,) for k in keys])
        conn.commit()
    ledger = Ledger()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def concurrent_writer(seed: int) -> None:
        """Locks the aggregate, takes its next sequence number, holds the transaction open a
        little and commits (or, one in ten, rolls back): commits interleave across threads."""
        rng = random.Random(seed)
        try:
            with psycopg.connect(wal.db_url) as conn:
                for _ in range(50):
                    key = rng.choice(keys)
                    row = conn.execute("UPDATE aggregates SET seq = seq + 1 WHERE key = %s"
                                       " RETURNING seq", [key]).fetchone()
                    assert row is not None
                    event = outbox.Event(topic, key, "Sequenced", {"seq": row[0]})
                    outbox.publish(conn, event)
                    conn.execute("SELECT pg_sleep(%s)", [rng.random() * 0.01])
                    commit = rng.random() > 0.1
                    conn.commit() if commit else conn.rollback()
                    with lock:
                        ledger.record(str(event.id), key, row[0], commit)
        except BaseException as exc:
            errors.append(exc)

    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(wal.settings(kafka_bootstrap)), \
            psycopg.connect(wal.db_url) as long_tx, psycopg.connect(wal.db_url) as a, \
            psycopg.connect(wal.db_url) as b, psycopg.connect(wal.db_url) as c:
        # A transaction that writes first and stays open while everything else commits.
        held = writer.events("held", 3)
        outbox.publish(long_tx, *held)
        # Three transactions that write in order a, b, c and commit c, b, a. Their events
        # share a key, numbered in commit order: per-key order holds only if the relay
        # publishes in commit order (WAL order), not in the order the rows were written.
        ev_c, ev_b, ev_a = (writer.events("reversed", 1) for _ in range(3))
        for conn, events in ((a, ev_a), (b, ev_b), (c, ev_c)):
            outbox.publish(conn, *events)
        c.commit()
        b.commit()
        a_end = commit_lsn(a)
        writer.note(ev_c + ev_b + ev_a, committed=True)
        writer.write(a, writer.events("rolled-back", 2), commit=False)
        threads = [threading.Thread(target=concurrent_writer, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        # Later commits flow, and the slot moves past them, while the long one is still open.
        reader.read_ids(ledger.committed_ids - {str(e.id) for e in held}, timeout=90)
        wal.wait_confirmed(a_end, 30, "while a transaction that wrote earlier is open")
        assert not {m.id for m in reader.messages} & {str(e.id) for e in held}
        long_end = commit_lsn(long_tx)
        writer.note(held, committed=True)
        reader.read_ids(ledger.committed_ids, timeout=60)
        wal.wait_confirmed(long_end, 30)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0


# -- idle outbox, busy database --------------------------------------------------------------------


@pytest.mark.slow
def test_idle_outbox_with_a_busy_other_table_does_not_pin_wal(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    """Nothing for the outbox, 50 MB for another table: the relay keeps confirming the slot.
    Control: a slot that nobody reads retains all of it (the relay cannot be told to stop
    confirming while idle, so an unread slot is the relay without the mechanism)."""
    control = unique_slot("control")
    with psycopg.connect(wal.db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE busy (n int, filler text)")
        slots.create_slot(conn, control)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    rounds, rows, row_bytes = 5, 10_000, 1000  # about 10 MB of WAL per round
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(wal.settings(kafka_bootstrap)), \
            psycopg.connect(wal.db_url, autocommit=True) as conn:
        with psycopg.connect(wal.db_url) as first:  # one event, so the relay has confirmed once
            writer.write(first, writer.events("k", 1))
        reader.read_ids(ledger.committed_ids, timeout=30)
        start = current_lsn(wal.db_url)
        for n in range(rounds):
            conn.execute("INSERT INTO busy SELECT n, md5(n::text) || repeat('x', %s)"
                         " FROM generate_series(1, %s) n", [row_bytes - 32, rows])
            busy_end = current_lsn(wal.db_url)
            # Every round, the slot catches up with the WAL of the busy table.
            wal.wait_confirmed(busy_end, 30, f"after round {n + 1} of the busy table")
        written = busy_end - start
        # restart_lsn (what the slot retains) follows once the server has logged the running
        # transactions after that point: CHECKPOINT does, the background writer every 15 s.
        last_checkpoint = [0.0]

        def released() -> bool:
            if time.monotonic() - last_checkpoint[0] > 5:
                conn.execute("CHECKPOINT")
                last_checkpoint[0] = time.monotonic()
            conn.execute("INSERT INTO busy VALUES (0, 'tick')")  # WAL to confirm
            status = wal.status()
            return bool(status and status.restart_lsn and status.restart_lsn >= busy_end)

        wait_for(released, 60, "the relay's slot to release the busy table's WAL")
        relay_status = wal.status()
        control_status = slots.slot_status(conn, control)
        slots.drop_slot(conn, control)
    reader.close()
    ledger.check(reader.messages).assert_holds()
    assert written >= 45 * 2**20, f"only {written} bytes of WAL written"
    assert relay_status is not None and control_status is not None
    assert relay_status.retained_bytes is not None and control_status.retained_bytes is not None
    assert control_status.confirmed_flush_lsn is not None and control_status.restart_lsn
    assert control_status.confirmed_flush_lsn < start
    assert control_status.retained_bytes >= written
    print(f"busy table: {written / 2**20:.1f} MiB of WAL; retained by the relay's slot "
          f"{relay_status.retained_bytes / 2**20:.1f} MiB, by the unread control slot "
          f"{control_status.retained_bytes / 2**20:.1f} MiB")


# -- a large transaction ---------------------------------------------------------------------------


@pytest.mark.slow
def test_200000_event_transaction_is_relayed_whole_and_confirmed_only_after_its_last_event(
    wal: WalSlot, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    total = 200_000
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = RelayProcess(*wal.cli_args(kafka_bootstrap), log=tmp_path / "relay.log").start()
    try:
        wal.wait_active(60)
        started = time.monotonic()
        with psycopg.connect(wal.db_url) as conn:
            events = []
            for chunk in range(20):
                made = [e for k in range(100) for e in writer.events(f"k{chunk}-{k}", 100)]
                writer.outbox.publish(conn, *made)
                events += made
            before = wal.confirmed()
            end = commit_lsn(conn)
            writer.note(events, committed=True)
        written = time.monotonic() - started
        # While its events are in flight, the slot stays before the transaction's commit. The
        # slot is read first, Kafka's count second: if Kafka then still lacks events, they were
        # not all acknowledged when the slot was read (the reader itself may lag behind).
        in_flight_samples: list[int] = []

        def delivered_all(got: list[Received]) -> bool:
            if len(got) < total:
                confirmed = wal.confirmed()
                if 0 < reader.in_kafka() < total:
                    in_flight_samples.append(confirmed)
            return len(got) >= total

        reader.read_until(delivered_all, timeout=180)
        wal.wait_confirmed(end, 60, "after the last event")
        relayed = time.monotonic() - started - written
        with psycopg.connect(wal.db_url) as conn:  # its rows went, in chunks, before the slot
            assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        assert relay.process is not None
        peak = peak_rss_mb(relay.process.pid)
        assert relay.kill(signal.SIGTERM) == 0, relay.log()[-3000:]
    finally:
        relay.close()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    assert in_flight_samples, "no sample of the slot was taken while events were in flight"
    assert all(before <= lsn < end for lsn in in_flight_samples), (
        f"slot confirmed past the commit ({end}) before its last event was acknowledged: "
        f"{sorted(set(in_flight_samples))}")
    print(f"200,000-event transaction: written in {written:.1f} s, relayed and read in "
          f"{relayed:.1f} s; {len(in_flight_samples)} in-flight samples; relay VmHWM "
          f"{peak:.0f} MiB")
    assert peak < 400


# -- the table ------------------------------------------------------------------------------------


def outbox_rows(db_url: str) -> tuple[int, int]:
    """(all rows, rows not marked published)"""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*), count(*) FILTER (WHERE published_at IS NULL)"
                           " FROM outbox").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_published_rows_leave_the_table_and_the_backlog_is_what_kafka_lacks(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    from relay import status

    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    write_transactions(wal.db_url, writer, keys=20, per_key=50, per_transaction=25)

    def backlog() -> int:
        with psycopg.connect(wal.db_url, autocommit=True) as conn:
            report = status.gather(conn, SchemaNames(), leader_key=0, slot=wal.slot,
                                   publication=wal.publication)
        assert report.backlog is not None
        return report.backlog.pending

    assert backlog() == 1000  # nothing relayed yet: all of it is pending
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(wal.settings(kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: outbox_rows(wal.db_url) == (0, 0), 30, "the published rows to go")
        assert backlog() == 0
    ledger.check(reader.drain(quiet=1.0)).assert_holds()
    reader.close()


def test_keep_published_marks_rows_and_purges_them_once_old_enough(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    write_transactions(wal.db_url, writer, keys=5, per_key=20, per_transaction=10)
    reader = TopicReader(kafka_bootstrap, topic)
    settings = wal.settings(kafka_bootstrap, keep_published=dt.timedelta(seconds=3))
    with RelayThread(settings):
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: outbox_rows(wal.db_url) == (100, 0), 30, "the rows to be marked")
        wait_for(lambda: outbox_rows(wal.db_url) == (0, 0), 30, "the kept rows to be purged")
    ledger.check(reader.drain(quiet=1.0)).assert_holds()
    reader.close()


# -- schema change ---------------------------------------------------------------------------------


def test_alter_table_while_streaming_loses_nothing_and_republishes_nothing(
    wal: WalSlot, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.daemon")
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    stop = threading.Event()
    errors: list[BaseException] = []

    def background() -> None:  # another writer, blocked by and then behind each ALTER
        try:
            with psycopg.connect(wal.db_url) as conn:
                bg = SequencedWriter(topic, ledger)
                n = 0
                while not stop.is_set():
                    bg.write(conn, bg.events(f"bg{n % 3}", 5))
                    n += 1
        except BaseException as exc:
            errors.append(exc)

    with RelayThread(wal.settings(kafka_bootstrap)):
        thread = threading.Thread(target=background)
        thread.start()
        try:
            writer.write_many(wal.db_url, keys=4, per_key=50)
            reader.read_until(lambda got: len(got) >= 200, timeout=30)
            with psycopg.connect(wal.db_url, autocommit=True) as ddl:
                ddl.execute("ALTER TABLE outbox ADD COLUMN region text DEFAULT 'eu'")
            writer.write_many(wal.db_url, keys=4, per_key=50)
            with psycopg.connect(wal.db_url) as conn:  # DDL between events of one transaction
                outbox.publish(conn, *(first := writer.events("k0", 5)))
                conn.execute("ALTER TABLE outbox ADD COLUMN note text NOT NULL DEFAULT 'n'")
                outbox.publish(conn, *(second := writer.events("k0", 5)))
                conn.commit()
                writer.note(first + second, committed=True)
            with psycopg.connect(wal.db_url, autocommit=True) as ddl:
                # A volatile default rewrites the table with every earlier row: the rewrite
                # must not be taken for new events.
                ddl.execute("ALTER TABLE outbox ADD COLUMN jitter float8 DEFAULT random()")
            writer.write_many(wal.db_url, keys=4, per_key=50)
        finally:
            stop.set()
            thread.join(60)
        assert not errors, errors
        with psycopg.connect(wal.db_url) as conn:
            outbox.publish(conn, *(last := writer.events("last", 1)))
            end = commit_lsn(conn)
            writer.note(last, committed=True)
        reader.read_ids(ledger.committed_ids, timeout=60)
        wal.wait_confirmed(end, 30)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    assert not restarts(caplog)
    with psycopg.connect(wal.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_parked").fetchone() == (0,)


# -- two relays ------------------------------------------------------------------------------------


def standby_takes_over(wal: WalSlot, kafka_bootstrap: str, topic: str) -> None:
    """The second relay starts while the first streams: it waits, then takes over."""
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    first = RelayThread(wal.settings(kafka_bootstrap)).start()
    second: RelayThread | None = None
    try:
        first_pid = wal.wait_active()
        second = RelayThread(wal.settings(kafka_bootstrap)).start()
        writer.write_many(wal.db_url, keys=5, per_key=100)
        reader.read_ids(ledger.committed_ids, timeout=60)
        # The second relay is still waiting: alive, without an error, the slot not its own.
        assert second.alive and second.error is None, second.error
        assert wal.wait_active() == first_pid
        first.stop()
        writer.write_many(wal.db_url, keys=5, per_key=100)
        reader.read_ids(ledger.committed_ids, timeout=60)
        assert wal.wait_active() != first_pid
        assert second.alive and second.error is None, second.error
    finally:
        if first.alive:
            first.stop()
        if second is not None:
            second.stop()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0  # the first relay stopped cleanly: everything it sent is confirmed


@pytest.mark.slow
def test_second_relay_waits_as_a_standby_and_takes_over(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    standby_takes_over(wal, kafka_bootstrap, topic)


# -- unpublishable events --------------------------------------------------------------------------


def test_unpublishable_events_are_parked_others_flow_and_the_slot_moves_past_them(
    wal: WalSlot, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relay.daemon")
    big = outbox.Outbox(max_payload_bytes=4 * 1024 * 1024)
    too_large = outbox.Event(topic, "big", "Huge", {"blob": "x" * 2_000_000})
    bad_topic = outbox.Event(topic, "k", "Misrouted", {}, topic="not a valid topic!")
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(wal.db_url, keys=3, per_key=10)
    with psycopg.connect(wal.db_url) as conn:
        good = writer.events("k0", 2)
        outbox.publish(conn, good[0])
        big.publish(conn, too_large, bad_topic)
        # Changes that are not events at all: a row whose headers are not strings, and a
        # table-less message that is not an encoded event.
        conn.execute("INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,"
                     " headers) VALUES (gen_random_uuid(), %s, 'k', 'Odd', '\\x7b7d',"
                     " '{\"n\": 1}')", [topic])
        conn.execute("SELECT pg_logical_emit_message(true, 'outbox', 'not an event')")
        outbox.publish(conn, good[1])
        bad_end = commit_lsn(conn)
        writer.note(good, committed=True)
    writer.write_many(wal.db_url, keys=3, per_key=10)
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(wal.settings(kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids, timeout=60)
        wal.wait_confirmed(bad_end, 30, "past the transaction with the parked events")
    with psycopg.connect(wal.db_url) as conn:
        parked = conn.execute("SELECT id, reason, raw FROM outbox_parked ORDER BY parked_id"
                              ).fetchall()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    reasons = {row[0]: row[1] for row in parked if row[0] is not None}
    assert set(reasons) == {too_large.id, bad_topic.id}
    assert "too large" in reasons[too_large.id].lower() or "size" in reasons[too_large.id].lower()
    assert "invalid topic" in reasons[bad_topic.id]
    unreadable = [(row[1], row[2]) for row in parked if row[0] is None]
    assert len(unreadable) == 2, unreadable
    assert any("headers" in reason for reason, _ in unreadable)
    assert all(raw for _, raw in unreadable)
    assert not restarts(caplog), "an unpublishable event made the relay restart"
