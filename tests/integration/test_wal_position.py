"""The WAL relay records how far Kafka acknowledged, before it confirms its slot there, and
skips what the server sends again below that position (relay/wal/position.py); a position
that does not belong to the slot's server never hides an event."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import psycopg
import pytest

import outbox
from relay.wal import slots
from relay.wal.lsn import format_lsn
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import RelayThread
from tests.support.wal import (
    WalSlot,
    recorded_position,
    server_identity,
    write_and_commit,
)
from tests.support.writers import SequencedWriter

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
        with RelayThread(wal.settings(kafka_bootstrap)):
            reader.read_ids(ledger.committed_ids, timeout=30)
    verdict = ledger.check(reader.drain(quiet=0.5))
    verdict.assert_holds()
    assert verdict.dup == 0


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
    with RelayThread(wal.settings(kafka_bootstrap)):
        reader.read_ids(ledger.committed_ids, timeout=30)
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
