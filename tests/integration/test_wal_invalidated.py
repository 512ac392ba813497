"""A slot invalidated by max_slot_wal_keep_size stops the WAL source with a reason."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import outbox
from relay.wal import (
    ReplicationConnectionError,
    SlotInvalidatedError,
    WalCommit,
    WalEvent,
    WalSource,
    WalSourceConfig,
    setup,
    slots,
)
from tests.support.wal import outgrow_the_slot

pytestmark = [pytest.mark.integration, pytest.mark.fault]

# These tests run on a private PostgreSQL server (conftest's private_postgres): the setting is
# server-wide and must not touch the shared test server.


@pytest.fixture
def private_server(private_postgres: tuple[Any, str]) -> str:
    _, url = private_postgres
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
    return url


@pytest.fixture
def config(private_server: str) -> Iterator[WalSourceConfig]:
    name = f"lost_{uuid.uuid4().hex[:12]}"
    made = WalSourceConfig(slot=name, publication=name, status_interval=0.2)
    with psycopg.connect(private_server, autocommit=True) as conn:
        setup(conn, made)
    yield made
    with psycopg.connect(private_server, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                     " WHERE slot_name = %s AND active_pid IS NOT NULL", [made.slot])
        deadline = time.monotonic() + 10
        while (status := slots.slot_status(conn, made.slot)) and status.active:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        slots.drop_slot(conn, made.slot)
        slots.drop_publication(conn, made.publication)


def publish_one(url: str) -> uuid.UUID:
    with psycopg.connect(url) as conn:
        (event_id,) = outbox.publish(conn, outbox.Event("Order", "1", "OrderCreated", {}))
        conn.commit()
    return event_id


def drain(source: WalSource) -> list[Any]:
    items: list[Any] = []
    deadline = time.monotonic() + 10
    while not any(isinstance(i, WalCommit) for i in items):
        assert time.monotonic() < deadline
        items += source.poll(0.2)
    return items


def test_invalidated_slot_stops_the_relay_with_what_to_do(private_server: str,
                                                          config: WalSourceConfig) -> None:
    event_id = publish_one(private_server)
    with WalSource.open(private_server, config) as source:
        items = drain(source)
        assert [i.record.id for i in items if isinstance(i, WalEvent)] == [event_id]
        source.acknowledge(items[-1].end_lsn)
    outgrow_the_slot(private_server, config.slot)
    with pytest.raises(SlotInvalidatedError, match="max_slot_wal_keep_size") as caught:
        WalSource.open(private_server, config)
    assert "Recover them" in str(caught.value)


def test_slot_lost_under_a_stuck_relay_is_reported_on_reconnect(private_server: str,
                                                                config: WalSourceConfig) -> None:
    source = WalSource.open(private_server, config)
    try:
        # The relay stops reading (stuck on Kafka, say): nothing moves the slot any more.
        outgrow_the_slot(private_server, config.slot)
        with pytest.raises(ReplicationConnectionError):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                source.poll(0.2)
    finally:
        source.close()
    with pytest.raises(SlotInvalidatedError):
        WalSource.open(private_server, config)
