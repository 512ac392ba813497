"""The WAL source against a real PostgreSQL: slot, publication, streaming, acknowledgement."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

import outbox
from outbox.columns import ColumnMapping
from outbox.errors import ConfigurationError
from relay.wal import (
    AcknowledgementError,
    PublicationMismatchError,
    ReplicationConnectionError,
    ReplicationPermissionError,
    SlotInUseError,
    SlotMissingError,
    WalCommit,
    WalEvent,
    WalItem,
    WalSource,
    WalSourceConfig,
    open_as_standby,
    setup,
    slots,
    teardown,
)
from relay.wal.errors import SlotError
from relay.wal.pgoutput import Relation
from relay.wal.stream import ReplicationStream

pytestmark = pytest.mark.integration

OUTBOX = ("public", "outbox")


@dataclass(frozen=True)
class Wal:
    url: str
    slot: str
    publication: str
    settings: dict[str, Any] = field(default_factory=dict)

    def config(self, **changes: Any) -> WalSourceConfig:
        settings: dict[str, Any] = {
            "slot": self.slot, "publication": self.publication, "status_interval": 0.2,
            **self.settings, **changes,
        }
        return WalSourceConfig(**settings)

    def open(self, **changes: Any) -> WalSource:
        return WalSource.open(self.url, self.config(**changes))

    def status(self) -> slots.SlotStatus:
        with psycopg.connect(self.url, autocommit=True) as conn:
            found = slots.slot_status(conn, self.slot)
        assert found is not None
        return found


def wait_released(conn: psycopg.Connection[Any], slot: str, timeout: float = 10) -> None:
    """A walsender that ended releases its slot a moment later."""
    deadline = time.monotonic() + timeout
    while (status := slots.slot_status(conn, slot)) is not None and status.active:
        assert time.monotonic() < deadline, f"slot {slot} stays active"
        time.sleep(0.05)


def cleanup(wal: Wal) -> None:
    with psycopg.connect(wal.url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                     " WHERE slot_name = %s AND active_pid IS NOT NULL", [wal.slot])
        wait_released(conn, wal.slot)
        teardown(conn, wal.config())


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:12]
    yield f"wal_test_{suffix}", f"wal_test_{suffix}"


def make_wal(url: str, names: tuple[str, str], **settings: Any) -> Wal:
    """The relay's setup step for these settings: publication (column list), then slot."""
    wal = Wal(url, *names, settings=settings)
    with psycopg.connect(url, autocommit=True) as conn:
        setup(conn, wal.config())
    return wal


@pytest.fixture
def wal(db_url: str, names: tuple[str, str]) -> Iterator[Wal]:
    created = make_wal(db_url, names)
    yield created
    cleanup(created)


@pytest.fixture
def wal_later(db_url: str, names: tuple[str, str]) -> Iterator[list[Wal]]:
    """For tests that set the relay up themselves: whatever they append is cleaned up."""
    made: list[Wal] = []
    yield made
    for item in made:
        cleanup(item)


def event(n: int, **extra: Any) -> outbox.Event:
    settings: dict[str, Any] = {"payload": {"orderId": n}, "headers": {"tenant": "eu"}, **extra}
    return outbox.Event(aggregate_type="Order", aggregate_id=str(n), event_type="OrderCreated",
                        **settings)


def publish(url: str, *events: outbox.Event, box: outbox.Outbox = outbox.default_outbox,
            rollback: bool = False) -> list[uuid.UUID]:
    with psycopg.connect(url) as conn:
        ids = box.publish(conn, *events)
        if rollback:
            conn.rollback()
        else:
            conn.commit()
    return ids


def read_until(source: WalSource, commits: int, timeout: float = 15) -> list[WalItem]:
    items: list[WalItem] = []
    deadline = time.monotonic() + timeout
    while sum(isinstance(i, WalCommit) for i in items) < commits:
        assert time.monotonic() < deadline, f"timed out; got {items}"
        items += source.poll(0.2)
    return items


def event_ids(items: list[WalItem]) -> list[uuid.UUID]:
    return [i.record.id for i in items if isinstance(i, WalEvent)]


def commits(items: list[WalItem]) -> list[WalCommit]:
    return [i for i in items if isinstance(i, WalCommit)]


# -- reading ---------------------------------------------------------------------------------------


def test_table_events_arrive_in_commit_order_and_rollbacks_never(wal: Wal) -> None:
    first = publish(wal.url, event(1), event(2))
    publish(wal.url, event(3), rollback=True)
    second = publish(wal.url, event(4, topic="special"))
    with wal.open() as source:
        items = read_until(source, 2)
    assert event_ids(items) == first + second
    records = [i.record for i in items if isinstance(i, WalEvent)]
    assert records[0].payload == b'{"orderId":1}' and records[0].headers == {"tenant": "eu"}
    assert records[2].topic == "special"
    assert [c.events for c in commits(items)] == [2, 1]


def test_message_mode_events_are_read(wal: Wal) -> None:
    box = outbox.Outbox(mode="message")
    ids = publish(wal.url, event(1), event(2, payload=b"\x00raw"), box=box)
    publish(wal.url, event(3), box=box, rollback=True)
    with wal.open() as source:
        items = read_until(source, 1)
    assert event_ids(items) == ids
    assert [i.record.payload for i in items if isinstance(i, WalEvent)][1] == b"\x00raw"


def test_table_less_setup_with_an_empty_publication(
    db_url: str, names: tuple[str, str], wal_later: list[Wal]
) -> None:
    wal = make_wal(db_url, names, table=None)
    wal_later.append(wal)
    publish(db_url, event(1))  # a table row: not published, never seen
    ids = publish(db_url, event(2), box=outbox.Outbox(mode="message"))
    with wal.open() as source:
        items = read_until(source, 1)
    assert event_ids(items) == ids


def test_debezium_layout(db_url: str, names: tuple[str, str], wal_later: list[Wal]) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE outbox_dbz (id uuid PRIMARY KEY, aggregatetype varchar(255)"
                     " NOT NULL, aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL,"
                     " payload jsonb)")
    wal = make_wal(db_url, names, table="outbox_dbz", columns=ColumnMapping.debezium())
    wal_later.append(wal)
    box = outbox.Outbox(table="outbox_dbz", columns=ColumnMapping.debezium())
    ids = publish(db_url, event(1), event(2), box=box)
    with wal.open() as source:
        items = read_until(source, 1)
    assert event_ids(items) == ids
    record = next(i.record for i in items if isinstance(i, WalEvent))
    assert record.payload == b'{"orderId": 1}'  # jsonb's normal form
    assert record.content_type == "application/json"


def test_only_the_columns_the_relay_reads_travel(wal: Wal) -> None:
    with psycopg.connect(wal.url, autocommit=True) as conn:
        conn.execute("ALTER TABLE outbox ADD COLUMN secret text DEFAULT 'not for the relay'")
        # The publication's column list protects what the relay reads.
        with pytest.raises(psycopg.errors.DependentObjectsStillExist):
            conn.execute("ALTER TABLE outbox DROP COLUMN topic")
    publish(wal.url, event(1))
    config = wal.config()
    with ReplicationStream.open(wal.url, wal.slot, wal.publication) as stream:
        deadline = time.monotonic() + 15
        relation = None
        while relation is None:
            assert time.monotonic() < deadline
            relation = next((m for _, m in stream.read(0.2) if isinstance(m, Relation)), None)
    assert [c.name for c in relation.columns] == list(config.published_columns)


def test_schema_change_while_streaming_is_followed(wal: Wal) -> None:
    first = publish(wal.url, event(1))
    with wal.open() as source:
        assert event_ids(read_until(source, 1)) == first
        with psycopg.connect(wal.url, autocommit=True) as conn:
            conn.execute("ALTER TABLE outbox ADD COLUMN region text DEFAULT 'eu'")
            conn.execute("ALTER TABLE outbox ALTER COLUMN topic SET DEFAULT 'fallback'")
        second = publish(wal.url, event(2, topic="explicit"))
        items = read_until(source, 1)
    assert event_ids(items) == second
    assert [i.record.topic for i in items if isinstance(i, WalEvent)] == ["explicit"]


def test_large_transaction_is_handed_out_before_its_commit(wal: Wal) -> None:
    count = 5000
    ids = publish(wal.url, *[event(n) for n in range(count)])
    polls_before_commit = 0
    items: list[WalItem] = []
    with wal.open(max_batch=500) as source:
        deadline = time.monotonic() + 30
        while not commits(items):
            assert time.monotonic() < deadline
            batch = source.poll(0.5)
            if batch and not commits(batch):
                polls_before_commit += 1
            items += batch
            assert len(batch) <= 500
        assert source.acknowledged_lsn < commits(items)[0].end_lsn
    assert event_ids(items) == ids
    assert polls_before_commit >= count // 500 - 1


# -- acknowledgement and resume --------------------------------------------------------------------


def test_resumes_after_the_acknowledged_transaction(wal: Wal) -> None:
    first = publish(wal.url, event(1), event(2))
    second = publish(wal.url, event(3))
    with wal.open() as source:
        items = read_until(source, 2)
        assert event_ids(items) == first + second
        acknowledged = commits(items)[0].end_lsn
        source.acknowledge(acknowledged)  # the second transaction is still "in Kafka"
    assert wal.status().confirmed_flush_lsn == acknowledged
    with wal.open() as source:
        items = read_until(source, 1)
    assert event_ids(items) == second


def test_a_position_never_handed_out_cannot_be_acknowledged(wal: Wal) -> None:
    publish(wal.url, event(1))
    with wal.open() as source:
        end = commits(read_until(source, 1))[0].end_lsn
        with pytest.raises(AcknowledgementError, match="would skip events"):
            source.acknowledge(end + 1)
        source.acknowledge(end)
    assert wal.status().confirmed_flush_lsn == end


def test_nothing_unacknowledged_is_confirmed_even_when_the_server_asks(wal: Wal) -> None:
    before = wal.status().confirmed_flush_lsn
    ids = publish(wal.url, event(1))
    with wal.open() as source:
        items = read_until(source, 1)
        end = commits(items)[0].end_lsn
        source.stream.send_status(reply=True)
        source.poll(0.5)  # the server answers; keepalives in between are replied to
    after = wal.status().confirmed_flush_lsn
    assert before is not None and after is not None
    assert after < end
    with wal.open() as source:  # so the event comes again
        assert event_ids(read_until(source, 1)) == ids


def test_idle_outbox_does_not_pin_wal(wal: Wal) -> None:
    ids = publish(wal.url, event(1))
    with psycopg.connect(wal.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE busy (n int, filler text)")
    with wal.open() as source:
        items = read_until(source, 1)
        assert event_ids(items) == ids
        end = commits(items)[0].end_lsn
        source.acknowledge(end)
        # Other tables keep the database busy; the slot must still move past their WAL.
        deadline = time.monotonic() + 20
        with psycopg.connect(wal.url, autocommit=True) as conn:
            while source.acknowledged_lsn <= end:
                assert time.monotonic() < deadline, "the slot never moved past the last commit"
                conn.execute("INSERT INTO busy SELECT n, repeat('x', 100)"
                             " FROM generate_series(1, 200) n")
                assert source.poll(0.2) == []
            source.stream.send_status()
        moved_to = source.acknowledged_lsn
    status = wal.status()
    assert status.confirmed_flush_lsn is not None and status.confirmed_flush_lsn >= moved_to > end


# -- failures --------------------------------------------------------------------------------------


def test_missing_slot_is_reported(wal: Wal) -> None:
    with pytest.raises(SlotMissingError, match="does not exist"):
        WalSource.open(wal.url, wal.config(slot=f"{wal.slot}_gone"))


def test_publication_without_the_outbox_table_is_refused(
    db_url: str, names: tuple[str, str], wal_later: list[Wal]
) -> None:
    wal = make_wal(db_url, names, table=None)
    wal_later.append(wal)
    with pytest.raises(PublicationMismatchError, match="ADD TABLE public.outbox"):
        wal.open(table="outbox")


@pytest.mark.parametrize(
    ("table_clause", "message"),
    [
        ("outbox WHERE (aggregate_type <> 'Internal')", "row filter"),
        ("outbox (id, aggregate_type, aggregate_id, event_type, payload)", "topic"),
    ],
)
def test_publication_that_would_hide_events_or_fields_is_refused(
    db_url: str, names: tuple[str, str], wal_later: list[Wal], table_clause: str, message: str
) -> None:
    wal = Wal(db_url, *names)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')")
                     .format(sql.Identifier(wal.publication), sql.SQL(table_clause)))
        slots.create_slot(conn, wal.slot)
    wal_later.append(wal)
    with pytest.raises(PublicationMismatchError, match=message):
        wal.open()


def test_setup_needs_autocommit(db_url: str, names: tuple[str, str]) -> None:
    with psycopg.connect(db_url) as conn, pytest.raises(ConfigurationError, match="autocommit"):
        setup(conn, Wal(db_url, *names).config())


def test_second_relay_waits_as_a_standby_and_takes_over(wal: Wal) -> None:
    first = publish(wal.url, event(1))
    active = wal.open()
    try:
        with pytest.raises(SlotInUseError) as caught:
            wal.open()
        assert caught.value.active_pid == wal.status().active_pid
        stop = threading.Event()
        standby: list[WalSource | None] = []
        waiter = threading.Thread(
            target=lambda: standby.append(open_as_standby(wal.url, wal.config(), stop,
                                                          retry_interval=0.1)))
        waiter.start()
        items = read_until(active, 1)
        assert event_ids(items) == first
        active.acknowledge(commits(items)[0].end_lsn)
        time.sleep(0.3)
        assert waiter.is_alive()  # still waiting while the active relay runs
    finally:
        active.close()
    waiter.join(15)
    assert standby and standby[0] is not None
    second = publish(wal.url, event(2))
    with standby[0] as source:
        assert event_ids(read_until(source, 1)) == second  # not the acknowledged first one


def test_standby_stops_waiting_when_asked(wal: Wal) -> None:
    with wal.open():
        stop = threading.Event()
        stop.set()
        assert open_as_standby(wal.url, wal.config(), stop, retry_interval=0.1) is None


def test_connection_reset_is_a_connection_error_and_resume_works(wal: Wal) -> None:
    first = publish(wal.url, event(1))
    source = wal.open()
    try:
        items = read_until(source, 1)
        assert event_ids(items) == first
        source.acknowledge(commits(items)[0].end_lsn)
        source.stream.send_status()
        with psycopg.connect(wal.url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                         " WHERE slot_name = %s", [wal.slot])
        with pytest.raises(ReplicationConnectionError) as caught:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                source.poll(0.2)
        assert isinstance(caught.value.__cause__, psycopg.Error)
    finally:
        source.close()
    second = publish(wal.url, event(2))
    stop = threading.Event()
    resumed = open_as_standby(wal.url, wal.config(), stop, retry_interval=0.1)
    assert resumed is not None
    with resumed:
        assert event_ids(read_until(resumed, 1)) == second


def test_a_login_replication_role_is_enough(wal: Wal, pg_admin_url: str) -> None:
    role = f"wal_role_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(f"{role}_plain"), sql.Literal(password)))
    try:
        ids = publish(wal.url, event(1))
        url = psycopg.conninfo.make_conninfo(wal.url, user=role, password=password)
        with WalSource.open(url, wal.config()) as source:
            assert event_ids(read_until(source, 1)) == ids
        plain = psycopg.conninfo.make_conninfo(wal.url, user=f"{role}_plain", password=password)
        with pytest.raises(ReplicationPermissionError, match="REPLICATION") as caught:
            WalSource.open(plain, wal.config())
        assert password not in str(caught.value)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            for name in (role, f"{role}_plain"):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


# -- slot administration ---------------------------------------------------------------------------


def test_slot_status_and_administration(db_url: str, names: tuple[str, str]) -> None:
    slot, publication = names
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert slots.slot_status(conn, slot) is None
        slots.create_publication(conn, publication, OUTBOX)
        info = slots.publication_info(conn, publication)
        assert info is not None and info.covers(OUTBOX)
        assert [(t.schema, t.name, t.row_filter) for t in info.tables] == [(*OUTBOX, None)]
        with pytest.raises(PublicationMismatchError, match="already exists"):
            slots.create_publication(conn, publication, OUTBOX)
        consistent = slots.create_slot(conn, slot)
        status = slots.slot_status(conn, slot)
        assert status is not None
        assert (status.plugin, status.slot_type, status.database) == (
            "pgoutput", "logical", slots.current_database(conn))
        assert status.wal_status == "reserved" and not status.active and not status.lost
        assert status.confirmed_flush_lsn == consistent
        assert status.retained_bytes is not None and status.retained_bytes >= 0
        with pytest.raises(SlotError, match="already exists"):
            slots.create_slot(conn, slot)
        with WalSource.open(db_url, WalSourceConfig(slot=slot, publication=publication)):
            active = slots.slot_status(conn, slot)
            assert active is not None and active.active and active.active_pid
            with pytest.raises(SlotInUseError):
                slots.drop_slot(conn, slot)
        wait_released(conn, slot)
        assert slots.drop_slot(conn, slot)
        assert not slots.drop_slot(conn, slot)
        with pytest.raises(SlotMissingError):
            slots.drop_slot(conn, slot, missing_ok=False)
        assert slots.drop_publication(conn, publication)
        assert not slots.drop_publication(conn, publication)
