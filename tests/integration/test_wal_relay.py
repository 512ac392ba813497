"""What only the WAL relay (pgoutput slot -> Kafka) does, on real PostgreSQL and Kafka.

The guarantees every source keeps (message format in table, message and insert-then-delete
modes, no loss, no phantom, per-key and commit order, long transactions, parking, stop and
restart, standby, keep-published) are in test_relay_contract.py; each run here is checked with
the ledger too.
"""

from __future__ import annotations

import logging
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


# -- table-less -----------------------------------------------------------------------------------


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


# -- changes that are not events ------------------------------------------------------------------


def test_changes_that_are_not_events_are_parked_raw_and_the_slot_moves_past_them(
    wal: WalSlot, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Events Kafka refuses are parked on every source (test_relay_contract.py); only the WAL
    relay also meets changes that are no events at all: a row whose headers are not strings,
    and a table-less message that is not an encoded event. They are parked with their raw
    bytes, the events around them flow, and the slot moves past them."""
    caplog.set_level(logging.WARNING, logger="relay.daemon")
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(wal.db_url, keys=3, per_key=10)
    with psycopg.connect(wal.db_url) as conn:
        good = writer.events("k0", 2)
        outbox.publish(conn, good[0])
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
        wal.wait_confirmed(bad_end, 30, "past the transaction with the parked changes")
    with psycopg.connect(wal.db_url) as conn:
        parked = conn.execute("SELECT id, reason, raw FROM outbox_parked ORDER BY parked_id"
                              ).fetchall()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    assert [row[0] for row in parked] == [None, None], parked
    unreadable = [(row[1], row[2]) for row in parked]
    assert any("headers" in reason for reason, _ in unreadable)
    assert all(raw for _, raw in unreadable)
    assert not restarts(caplog), "a change that is not an event made the relay restart"
