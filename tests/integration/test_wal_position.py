"""The WAL relay records how far Kafka acknowledged, before it confirms its slot there, and
skips what the server sends again below that position (relay/wal/position.py); a position
that does not belong to the slot's server never hides an event."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import outbox
from relay.wal import slots
from relay.wal.lsn import format_lsn
from tests.support.kafka import TopicReader, create_topics, frozen, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import RelayThread, wait_for
from tests.support.wal import (
    WalSlot,
    recorded_position,
    server_identity,
    write_and_commit,
)
from tests.support.writers import PacedWriter, SequencedWriter

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("walpos")
    create_topics(kafka_bootstrap, name, partitions=2)
    return name


@pytest.mark.parametrize("table_less", [False, True], ids=["table", "table-less"])
def test_the_relay_records_the_last_acknowledged_commit_with_its_server(
    db_url: str, kafka_bootstrap: str, topic: str, table_less: bool
) -> None:
    wal = WalSlot.create(db_url, table_less=table_less)
    writer = SequencedWriter(
        topic, Ledger(), outbox.Outbox(mode="message") if table_less else outbox.Outbox())
    assert recorded_position(db_url, wal.slot) is None
    with RelayThread(wal.settings(kafka_bootstrap)):
        write_and_commit(db_url, writer, writer.events("k0", 20))
        before = dt.datetime.now(dt.UTC)
        end = write_and_commit(db_url, writer, writer.events("k1", 5))
        wal.wait_confirmed(end, 30)
        # Written before the slot was confirmed there: already in the table now.
        found = recorded_position(db_url, wal.slot)
    assert found is not None and found.lsn == end, (found, format_lsn(end))
    assert (found.system, found.timeline) == server_identity(db_url)
    assert found.commit_at is not None
    assert before - dt.timedelta(seconds=1) <= found.commit_at <= dt.datetime.now(dt.UTC)


def test_a_position_of_another_server_or_beyond_this_ones_wal_hides_nothing(
    wal_and_reader: tuple[WalSlot, TopicReader], kafka_bootstrap: str, topic: str
) -> None:
    # As after a dump restored elsewhere, or files restored from an older copy: the row says
    # "everything up to here is in Kafka", but not about this server's WAL.
    wal, reader = wal_and_reader
    system, timeline = server_identity(wal.db_url)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    for wrong_system, wrong_timeline, lsn in (
        ("1", timeline, "FFFF/FFFFFFFF"),  # another server
        (system, timeline + 1, "FFFF/FFFFFFFF"),  # another timeline
        (system, timeline, "FFFF/FFFFFFFF"),  # beyond what this server has written
    ):
        with psycopg.connect(wal.db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO outbox_relay_position AS p (slot, acknowledged_lsn,"
                " acknowledged_system, acknowledged_timeline) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (slot) DO UPDATE SET acknowledged_lsn = excluded.acknowledged_lsn,"
                " acknowledged_system = excluded.acknowledged_system,"
                " acknowledged_timeline = excluded.acknowledged_timeline",
                [wal.slot, lsn, wrong_system, wrong_timeline])
        writer.write_many(wal.db_url, keys=3, per_key=10)
        relay_until_delivered(wal, kafka_bootstrap, reader, ledger)
    assert_each_once(reader, ledger)


def test_a_slot_dropped_and_created_again_streams_everything_after_an_old_position(
    wal_and_reader: tuple[WalSlot, TopicReader], kafka_bootstrap: str, topic: str
) -> None:
    wal, reader = wal_and_reader
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    with RelayThread(wal.settings(kafka_bootstrap)):
        end = write_and_commit(wal.db_url, writer, writer.events("k0", 10))
        reader.read_ids(ledger.committed_ids, timeout=30)
        wal.wait_confirmed(end, 30)
    old = recorded_position(wal.db_url, wal.slot)
    assert old is not None and old.lsn == end
    wal.wait_released()
    # The operator drops the slot and creates it again (`outbox slot drop`, `slot create`):
    # the row stays; the new slot starts after it, so nothing of the new slot is skipped.
    with psycopg.connect(wal.db_url, autocommit=True) as conn:
        slots.drop_slot(conn, wal.slot)
        created = slots.create_slot(conn, wal.slot)
    assert created > end
    writer.write_many(wal.db_url, keys=3, per_key=10)
    relay_until_delivered(wal, kafka_bootstrap, reader, ledger)
    assert_each_once(reader, ledger)


def relay_until_delivered(wal: WalSlot, kafka_bootstrap: str, reader: TopicReader,
                          ledger: Ledger) -> None:
    with RelayThread(wal.settings(kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids, timeout=30)


def assert_each_once(reader: TopicReader, ledger: Ledger) -> None:
    verdict = ledger.check(reader.drain(quiet=0.5))
    verdict.assert_holds()
    assert verdict.dup == 0


@pytest.fixture
def wal_and_reader(
    db_url: str, kafka_bootstrap: str, topic: str
) -> Iterator[tuple[WalSlot, TopicReader]]:
    reader = TopicReader(kafka_bootstrap, topic)
    yield WalSlot.create(db_url), reader
    reader.close()


# -- after a server restart (private servers: they are restarted or frozen) ------------------------


@pytest.mark.fault
@pytest.mark.parametrize("table_less", [False, True], ids=["table", "table-less"])
def test_a_relay_started_after_a_server_restart_skips_what_it_had_acknowledged(
    private_postgres: tuple[Any, str], kafka_bootstrap: str, topic: str, table_less: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, db_url = private_postgres
    wal = WalSlot.create(db_url, table_less=table_less)
    ledger = Ledger()
    writer = SequencedWriter(
        topic, ledger, outbox.Outbox(mode="message") if table_less else outbox.Outbox())
    reader = TopicReader(kafka_bootstrap, topic)
    went_back = []
    for _ in range(3):  # until the server has sent something again (see below)
        writer.write_many(db_url, keys=4, per_key=250)  # 1,000 events in 100 transactions
        with RelayThread(wal.settings(kafka_bootstrap)):
            end = write_and_commit(db_url, writer, writer.events("k0", 10))
            reader.read_ids(ledger.committed_ids, timeout=60)
            wal.wait_confirmed(end, 30)
        server.stop()  # pg_ctl stop -m fast
        server.start()
        # PostgreSQL 15 resumes the slot from its position on disk, which is behind what was
        # confirmed unless the slot happened to be written after the last confirmation: then
        # it sends those transactions again, and the next relay knows them from the row.
        went_back.append(wal.confirmed() < end)
        if went_back[-1]:
            break
    assert any(went_back), "the slot never went back: nothing was sent again"
    caplog.set_level(logging.INFO, logger="relay.wal.relay")
    with RelayThread(wal.settings(kafka_bootstrap)):
        after = write_and_commit(db_url, writer, writer.events("k1", 10))
        reader.read_ids(ledger.committed_ids, timeout=60)
        wal.wait_confirmed(after, 30)
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()
    assert verdict.dup == 0
    # Not because nothing came again: the server did send them, and the relay skipped them.
    assert any(getattr(r, "event", None) == "wal_skip_acknowledged" for r in caplog.records)
    stopped = [r for r in caplog.records if getattr(r, "event", None) == "relay_stopped"]
    assert stopped and vars(stopped[-1])["skipped"] > 0


@pytest.mark.fault
@pytest.mark.slow
def test_a_server_restart_after_a_frozen_broker_resends_only_what_was_not_acknowledged(
    private_postgres: tuple[Any, str], private_kafka: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The user's case: writers at ~250 events/s, the broker frozen for seconds, then
    `pg_ctl restart -m fast`; the relay (one process) reconnects by itself."""
    server, db_url = private_postgres
    bootstrap = private_kafka.start()["OUTBOX_KAFKA_BOOTSTRAP"]
    topic = unique_topic("walrestart")
    create_topics(bootstrap, topic, partitions=3)
    wal = WalSlot.create(db_url)
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    reader = TopicReader(bootstrap, topic)
    caplog.set_level(logging.INFO, logger="relay")
    relay = RelayThread(wal.settings(bootstrap)).start()
    paced = PacedWriter(db_url, writer, per_second=250)
    try:
        paced.start()
        wait_for(lambda: paced.events >= 1_000, 30, "4 s of writing")
        with frozen(private_kafka):
            frozen_at = paced.events
            wait_for(lambda: paced.events >= frozen_at + 2_000, 30, "8 s of writing")
        thawed_at = paced.events
        wait_for(lambda: paced.events >= thawed_at + 250, 30, "1 s of writing")
        paced.stop()  # no commit is in doubt while the server restarts
        # Everything up to the recorded position is in Kafka; read before the restart, it can
        # only be behind what the relay knows.
        acknowledged = recorded_position(db_url, wal.slot)
        confirmed = wal.confirmed()
        server.stop()
        server.start()
        resumed = wal.confirmed()
        paced.start()
        wait_for(lambda: paced.events >= thawed_at + 750, 30, "2 s of writing")
        paced.stop()
        reader.read_ids(ledger.committed_ids, timeout=120)
        assert relay.alive, "the relay process did not survive the restart"
    finally:
        relay.stop()
    messages = reader.drain(quiet=1.0)
    verdict = ledger.check(messages)
    reader.close()
    verdict.assert_holds()
    assert any(getattr(r, "event", None) == "relay_restart" for r in caplog.records)
    assert acknowledged is not None and acknowledged.lsn is not None
    # Sent again only from transactions not acknowledged at the restart.
    below = set().union(*(ids for ids, upper in paced.transactions if upper <= acknowledged.lsn))
    resent = {i for i, n in Counter(m.id for m in messages).items() if n > 1}
    assert not resent & below
    print(f"server restart after a frozen broker: {len(ledger.committed_ids)} events, "
          f"dup={verdict.dup}; recorded {format_lsn(acknowledged.lsn)}, slot confirmed "
          f"{format_lsn(confirmed)} before the restart and {format_lsn(resumed)} after; "
          f"{len(below)} events at or below the recorded position")
