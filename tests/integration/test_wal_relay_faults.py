"""The WAL relay when it is killed, its broker or database goes away, or its slot is dropped."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from relay.settings import RelaySettings
from relay.wal import format_lsn, slots
from relay.wal.errors import SlotMissingError
from tests.support.kafka import TopicReader, create_topics, unique_topic, unreachable_bootstrap
from tests.support.ledger import Ledger
from tests.support.relays import REPO, RelayProcess, RelayThread, wait_for
from tests.support.wal import WalSlot, crash_postgres, write_and_commit, write_transactions
from tests.support.writers import SequencedWriter

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("walfault")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


def test_kill_9_mid_stream_then_restart_loses_nothing_and_resends_only_unconfirmed(
    db_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    wal = WalSlot.create(db_url)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    transactions = write_transactions(db_url, writer, keys=20, per_key=5000,
                                      per_transaction=200)  # 100,000 events
    total = len(ledger.committed_ids)
    created_at = wal.confirmed()
    reader = TopicReader(kafka_bootstrap, topic)
    log = tmp_path / "relay.log"
    # Batches lingering 0.5 s hold this relay to ~10,000 events/s (5,000 in flight at most), so
    # the kill lands mid-stream however fast the relay's own code is: at full speed it drained
    # the 100,000 events before the first confirmation was seen. The restarted relay runs as
    # configured by default.
    slowed = wal.cli_args(kafka_bootstrap, "--kafka-setting", "linger.ms=500")
    relay = RelayProcess(*slowed, log=log).start()
    try:
        # Kill it once it has confirmed part of the backlog (it reports every second).
        wait_for(lambda: wal.confirmed() > created_at, 60, "the relay's first confirmation")
        relay.kill(signal.SIGKILL)
        wal.wait_released()
        confirmed_at_kill = wal.confirmed()
        delivered_before = {m.id for m in reader.drain(quiet=1.0)}
        assert len(delivered_before) < total, "the relay finished before it could be killed"
        # Events committed while no relay runs come after the restart.
        end = write_and_commit(db_url, writer, writer.events("while-down", 50))
        relay = RelayProcess(*wal.cli_args(kafka_bootstrap), log=log).start()
        reader.read_ids(ledger.committed_ids, timeout=120)
        wal.wait_confirmed(end, 30, "after the restart")
        assert relay.kill(signal.SIGTERM) == 0, relay.log()[-3000:]
    finally:
        relay.close()
    messages = reader.drain(quiet=1.0)
    verdict = ledger.check(messages)
    reader.close()
    verdict.assert_holds()
    # Duplicates only from the unconfirmed window: nothing of a transaction whose commit the
    # slot had confirmed at the kill is sent again.
    confirmed_ids = set().union(*(ids for ids, upper in transactions
                                  if upper <= confirmed_at_kill))
    resent = {i for i, n in Counter(m.id for m in messages).items() if n > 1}
    assert not resent & confirmed_ids
    assert verdict.dup <= len(delivered_before - confirmed_ids)
    print(f"kill -9: {len(delivered_before)} of {total} delivered before the kill, "
          f"{len(confirmed_ids)} confirmed in the slot; dup={verdict.dup}")


def test_broker_stopped_while_writing_confirms_nothing_until_it_is_back(
    private_kafka: Any, db_url: str
) -> None:
    bootstrap = private_kafka.start()["OUTBOX_KAFKA_BOOTSTRAP"]
    topic = unique_topic("waloutage")
    create_topics(bootstrap, topic, partitions=2)
    wal = WalSlot.create(db_url)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    with RelayThread(wal.settings(bootstrap)):
        delivered = write_and_commit(db_url, writer, writer.events("k0", 100))
        wal.wait_confirmed(delivered, 30, "before the outage")
        private_kafka.stop()
        first_unacknowledged = write_and_commit(db_url, writer, writer.events("k1", 10))
        outage_started = time.monotonic()
        samples = []
        n = 0
        while time.monotonic() - outage_started < 10:
            last = write_and_commit(db_url, writer, writer.events(f"k{n % 4}", 50))
            n += 1
            samples.append(wal.confirmed())
            time.sleep(0.2)  # paces the writes over the outage
        # Nothing is confirmed past the first commit without a delivery report.
        assert max(samples) < first_unacknowledged, (samples, first_unacknowledged)
        private_kafka.start()
        wal.wait_confirmed(last, 120, "after the broker is back")
    reader = TopicReader(bootstrap, topic)
    reader.read_ids(ledger.committed_ids, timeout=60)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    print(f"broker outage: {len(ledger.committed_ids)} events, {len(samples)} samples of the "
          f"slot during 10 s of writing; dup={verdict.dup}")


@pytest.mark.parametrize("shutdown", ["fast", "immediate"])
def test_postgres_restart_under_load_reconnects_and_loses_nothing(
    private_postgres: tuple[Any, str], kafka_bootstrap: str, topic: str,
    caplog: pytest.LogCaptureFixture, shutdown: str,
) -> None:
    """fast: a clean shutdown; immediate: a crash that cuts the relay off mid-stream. Either
    way the slot resumes from its position on disk, which can be older than what the relay
    confirmed (PostgreSQL before 17 writes a confirmed position that only moved to disk
    with the slot's next restart point, not at the shutdown checkpoint): duplicates, no loss.
    """
    server, db_url = private_postgres  # wal_level=logical
    wal = WalSlot.create(db_url)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(db_url, keys=10, per_key=4000, per_transaction=100)  # 40,000 events
    total = len(ledger.committed_ids)
    created_at = wal.confirmed()
    caplog.set_level(logging.WARNING, logger="relay.daemon")
    reader = TopicReader(kafka_bootstrap, topic)
    relay = RelayThread(wal.settings(kafka_bootstrap)).start()
    try:
        if shutdown == "immediate":
            reader.read_until(lambda got: len(got) >= 2000, timeout=60)
            before_stop = wal.confirmed()  # as the running server knows it
            crash_postgres(server)
            assert len({m.id for m in reader.drain(quiet=0.5)}) < total, (
                "the relay finished before the crash")
        else:
            # Once the relay has confirmed part of the backlog (it reports every second).
            wait_for(lambda: wal.confirmed() > created_at, 60, "the relay's first confirmation")
            before_stop = wal.confirmed()
            server.stop()
        server.start()
        after_start = wal.confirmed()
        end = write_and_commit(db_url, writer, writer.events("after-restart", 100))
        reader.read_ids(ledger.committed_ids, timeout=120)
        wal.wait_confirmed(end, 60, "after the restart")
    finally:
        relay.stop()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert any(getattr(r, "event", None) == "relay_restart" for r in caplog.records)
    print(f"PostgreSQL {shutdown} restart: dup={verdict.dup}; slot confirmed at "
          f"{format_lsn(after_start)} after the restart, {format_lsn(before_stop)} before, "
          f"created at {format_lsn(created_at)}")


def test_slot_dropped_while_stopped_refuses_to_start_and_never_makes_a_new_slot(
    db_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    wal = WalSlot.create(db_url)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(wal.settings(kafka_bootstrap)):
        writer.write_many(db_url, keys=3, per_key=20)
        reader.read_ids(ledger.committed_ids, timeout=30)
    wal.wait_released()
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert slots.drop_slot(conn, wal.slot)
    writer.write_many(db_url, keys=3, per_key=20)  # committed while there is no slot
    # In-process: the relay stops with an error that says what happened and what to do.
    refused = RelayThread(wal.settings(kafka_bootstrap)).start()
    with pytest.raises(SlotMissingError, match="does not exist") as caught:
        refused.stop()
    assert "Recover them first" in str(caught.value)
    # The CLI: exits non-zero with that message, in bounded time.
    relay = RelayProcess(*wal.cli_args(kafka_bootstrap), log=tmp_path / "relay.log").start()
    try:
        assert relay.wait(timeout=60) != 0
    finally:
        relay.close()
    assert f"replication slot '{wal.slot}' does not exist" in relay.log()
    assert "create a new slot" in relay.log()
    assert wal.status() is None, "the relay created a slot on its own"
    status = subprocess.run(
        [sys.executable, "-m", "relay.cli", "slot", "status", "--db", db_url, "--slot", wal.slot],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert status.returncode != 0 and "does not exist" in status.stderr
    # Nothing after the drop was relayed; the documented recovery (relay the outbox rows
    # with the polling source) then delivers everything, at least once.
    delivered = {m.id for m in reader.drain(quiet=1.0)}
    assert len(delivered) == 60
    with RelayThread(RelaySettings(source="postgres-poll", db_url=db_url,
                                   kafka_bootstrap=kafka_bootstrap, poll_interval=0.2)):
        reader.read_ids(ledger.committed_ids, timeout=60)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()


def test_full_producer_queue_keeps_the_replication_session_alive_and_stops_on_request(
    db_url: str,
) -> None:
    """Kafka away and librdkafka's queue full: `send` waits, and meanwhile the relay still sends
    status updates (else wal_sender_timeout ends the session) and a stop does not hang."""
    nowhere = unreachable_bootstrap()
    wal = WalSlot.create(db_url)
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, *[outbox.Event("Blocked", str(n), "E") for n in range(100)])
        conn.commit()

    def reply_time() -> Any:
        with psycopg.connect(db_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT r.reply_time FROM pg_stat_replication r JOIN pg_replication_slots s"
                " ON s.active_pid = r.pid WHERE s.slot_name = %s", [wal.slot]).fetchone()
        return row[0] if row else None

    relay = RelayThread(wal.settings(
        nowhere, kafka_settings={"queue.buffering.max.messages": "5"})).start()
    try:
        wait_for(lambda: reply_time() is not None, 30, "the relay's first status update")
        first = reply_time()
        # The daemon sends a status update every second; several must come while blocked.
        wait_for(lambda: (reply_time() - first).total_seconds() >= 3, 30,
                 "status updates while the producer queue is full")
    finally:
        relay.stop(timeout=30)
