"""A lost replication slot is recovered from the outbox table without losing an event:
`outbox slot recover`, and the relay's own `--on-slot-loss recover`, on real PostgreSQL and
Kafka, each run checked with the ledger."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox.names import SchemaNames
from relay.wal import format_lsn, recovery_state, slots
from relay.wal.errors import SlotRecoveryPendingError
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import REPO, RelayProcess, RelayThread, wait_for
from tests.support.wal import WalSlot, outgrow_the_slot, recorded_position
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("recover")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


@pytest.fixture
def wal(db_url: str) -> WalSlot:
    return WalSlot.create(db_url)


def slot_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", "slot", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def recover_args(wal: WalSlot, kafka: str, *extra: str) -> list[str]:
    return ["recover", "--db", wal.db_url, "--kafka", kafka, "--slot", wal.slot,
            "--publication", wal.publication, *extra]


def unpublished(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    assert row is not None
    return int(row[0])


def test_a_slot_dropped_while_the_relay_was_stopped_is_recovered_without_a_loss(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    writer.write_many(wal.db_url, keys=5, per_key=20)
    with RelayThread(wal.settings(kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids, timeout=60)
    acknowledged = recorded_position(wal.db_url, wal.slot)  # the relay's, at its stop
    assert acknowledged is not None and acknowledged.lsn is not None
    assert acknowledged.lsn <= wal.confirmed()
    with psycopg.connect(wal.db_url, autocommit=True) as conn:
        slots.drop_slot(conn, wal.slot)  # an operator, a failover: the slot is gone
    # Written while there is no slot: only the outbox table has them.
    writer.write_many(wal.db_url, keys=5, per_key=30)
    with psycopg.connect(wal.db_url) as conn:
        writer.write(conn, writer.events("k0", 4), commit=False)
    missed = unpublished(wal.db_url)
    assert missed == 150

    done = slot_cli(*recover_args(wal, kafka_bootstrap))
    assert done.returncode == 0, done.stderr
    assert f"recovered slot {wal.slot}: {missed} events republished" in done.stdout
    assert f"last acknowledged {format_lsn(acknowledged.lsn)}" in done.stdout
    assert unpublished(wal.db_url) == 0
    status = wal.status()
    assert status is not None and not status.lost
    # The new slot's start is the position now, for no server in particular: nothing is
    # skipped by it (the new slot sends nothing before it anyway).
    after = recorded_position(wal.db_url, wal.slot)
    assert after is not None and after.lsn == status.confirmed_flush_lsn
    assert after.lsn is not None and after.lsn > acknowledged.lsn
    assert (after.system, after.timeline) == (None, None)

    # The relay streams from the new slot: what comes after the recovery arrives too.
    writer.write_many(wal.db_url, keys=5, per_key=10)
    with RelayThread(wal.settings(kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids, timeout=60)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0  # the relay stopped cleanly: nothing was in flight


def test_recover_leaves_a_healthy_slot_alone(wal: WalSlot, kafka_bootstrap: str) -> None:
    before = wal.status()
    done = slot_cli(*recover_args(wal, kafka_bootstrap))
    assert done.returncode == 0, done.stderr
    assert "nothing to recover" in done.stdout
    after = wal.status()
    assert before is not None and after is not None
    assert after.confirmed_flush_lsn == before.confirmed_flush_lsn  # the same slot


def test_recover_refuses_table_less_mode_before_touching_anything(
    db_url: str, kafka_bootstrap: str
) -> None:
    wal = WalSlot.create(db_url, table_less=True)
    with psycopg.connect(db_url, autocommit=True) as conn:
        slots.drop_slot(conn, wal.slot)
    done = slot_cli(*recover_args(wal, kafka_bootstrap, "--table-less"))
    assert done.returncode == 1
    assert "table-less" in done.stderr and "cannot be recovered" in done.stderr
    assert wal.status() is None  # no slot was made


def test_recover_without_kafka_refuses_before_changing_anything(wal: WalSlot) -> None:
    with psycopg.connect(wal.db_url, autocommit=True) as conn:
        slots.drop_slot(conn, wal.slot)
    done = slot_cli(*recover_args(wal, "127.0.0.1:1"))  # nothing listens there
    assert done.returncode == 1
    assert "does not answer" in done.stderr and "nothing was changed" in done.stderr
    assert wal.status() is None
    with psycopg.connect(wal.db_url) as conn:
        assert recovery_state.pending(conn, SchemaNames(), wal.slot) is None


def test_the_relay_refuses_recover_in_table_less_mode_at_start_up(
    db_url: str, kafka_bootstrap: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", "relay", "--source", "postgres-wal", "--db", db_url,
         "--kafka", kafka_bootstrap, "--table-less", "--on-slot-loss", "recover"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "table-less events exist only in the WAL" in done.stderr


def test_an_unfinished_recovery_keeps_every_relay_off_the_slot(
    wal: WalSlot, kafka_bootstrap: str, topic: str
) -> None:
    """A recovery that died after making its new slot: streaming from that slot would skip the
    rows it had still to publish. The relay refuses; the next recovery redoes it."""
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(wal.db_url, keys=3, per_key=10)
    names = SchemaNames()
    with psycopg.connect(wal.db_url, autocommit=True) as conn:
        recovery_state.begin(conn, names, wal.slot)  # as a recovery killed half-way leaves it
    relay = RelayThread(wal.settings(kafka_bootstrap)).start()
    wait_for(lambda: not relay.alive, 30, "the relay to refuse the slot")
    with pytest.raises(SlotRecoveryPendingError, match="did not finish"):
        relay.stop()
    reader = TopicReader(kafka_bootstrap, topic)
    done = slot_cli(*recover_args(wal, kafka_bootstrap))
    assert done.returncode == 0, done.stderr
    assert "30 events republished" in done.stdout
    verdict = ledger.check(reader.read_ids(ledger.committed_ids, timeout=60))
    reader.close()
    verdict.assert_holds()
    with psycopg.connect(wal.db_url) as conn:
        assert recovery_state.pending(conn, names, wal.slot) is None


# -- the relay heals itself ------------------------------------------------------------------------


@pytest.fixture
def small_wal_server(private_postgres: tuple[Any, str]) -> str:
    """A private server whose slots are invalidated past 1 MB of WAL (a server-wide setting)."""
    _, url = private_postgres
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
    return url


def test_a_slot_invalidated_under_a_running_relay_heals_with_on_slot_loss_recover(
    small_wal_server: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    wal = WalSlot.create(small_wal_server)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(kafka_bootstrap, topic)
    relay = RelayProcess(*wal.cli_args(kafka_bootstrap, "--on-slot-loss", "recover",
                                       "--metrics-port", "0"), log=tmp_path / "relay.log")
    relay.start()
    try:
        writer.write_many(wal.db_url, keys=4, per_key=10)
        reader.read_ids(ledger.committed_ids, timeout=60)
        # The relay stalls (as behind a frozen broker): nothing moves its slot any more.
        pid = wal.wait_active()
        assert relay.process is not None
        relay.process.send_signal(signal.SIGSTOP)
        writer.write_many(wal.db_url, keys=4, per_key=25)
        outgrow_the_slot(wal.db_url, wal.slot)
        relay.process.send_signal(signal.SIGCONT)
        # It finds its slot lost, recovers it from the table, and streams on.
        wait_for(lambda: "slot_recovered" in relay.log(), 60, "the relay to recover its slot")
        writer.write_many(wal.db_url, keys=4, per_key=5)
        reader.read_ids(ledger.committed_ids, timeout=60)
        assert wal.wait_active() != pid  # a new session, on the new slot
        assert relay.process.poll() is None, relay.log()
    finally:
        relay.kill(signal.SIGTERM)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    # Sent again at most what the relay had sent and not yet removed when it stalled.
    assert verdict.dup <= 100, verdict


# -- the WAL budget --------------------------------------------------------------------------------

BUDGET = 1 << 20  # 1 MiB


def retain_wal(db_url: str, megabytes: int) -> None:
    """Write WAL of another table while no relay streams: the slot keeps all of it."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (x text)")
        conn.execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, %s)",
                     [megabytes * 1000])


def budget_states(caplog: pytest.LogCaptureFixture) -> list[bool]:
    return [bool(vars(r)["over"]) for r in caplog.records
            if getattr(r, "event", None) == "slot_wal_budget"]


def test_a_slot_over_its_wal_budget_is_reported_once_per_state_change(
    wal: WalSlot, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.wal.budget")  # "within" is an INFO line
    retain_wal(wal.db_url, 3)
    shown = subprocess.run(
        [sys.executable, "-m", "relay.cli", "status", "--db", wal.db_url, "--slot", wal.slot,
         "--publication", wal.publication, "--max-slot-wal", "1MB", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert '"over_wal_budget": true' in shown.stdout
    with RelayThread(wal.settings(kafka_bootstrap, max_slot_wal=BUDGET)):
        wait_for(lambda: budget_states(caplog) == [True], 30, "the budget to be reported over")

        def within() -> bool:
            with psycopg.connect(wal.db_url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")  # logs running transactions: restart_lsn moves on
            return budget_states(caplog) == [True, False]

        wait_for(within, 60, "the budget to be reported within once the relay caught up")
    assert budget_states(caplog) == [True, False]  # once per change, not once per check
    status = wal.status()
    assert status is not None and not status.lost  # reported only: the slot stays


def test_over_budget_with_recover_the_relay_gives_up_its_slot_and_recovers(
    wal: WalSlot, kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(wal.db_url, keys=4, per_key=10)
    retain_wal(wal.db_url, 3)  # the relay was away: its slot holds 3 MiB
    reader = TopicReader(kafka_bootstrap, topic)
    settings = wal.settings(kafka_bootstrap, max_slot_wal=BUDGET, on_slot_loss="recover")
    with RelayThread(settings):
        wait_for(lambda: any(getattr(r, "event", None) == "slot_recovered"
                             for r in caplog.records), 60, "the relay to recover its slot")
        writer.write_many(wal.db_url, keys=4, per_key=5)
        reader.read_ids(ledger.committed_ids, timeout=60)
        status = wal.status()
        assert status is not None and status.retained_bytes is not None
        assert status.retained_bytes < BUDGET  # the new slot started after the old WAL
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    assert budget_states(caplog)[0] is True
