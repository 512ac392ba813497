"""The stack's PostgreSQL is real and logical: a pgoutput slot streams an insert to psycopg."""

from __future__ import annotations

import select
import struct
import time
import uuid

import psycopg
import pytest

from relay.wal import slots
from tests.support.relays import wait_for

pytestmark = pytest.mark.integration


def test_pgoutput_slot_streams_one_insert_through_a_replication_connection(db_url: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    slot, publication = f"smoke_{suffix}", f"smoke_{suffix}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        conn.execute("CREATE TABLE smoke (id int PRIMARY KEY, note text)")
        conn.execute(f"CREATE PUBLICATION {publication} FOR TABLE smoke")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
        conn.execute("INSERT INTO smoke VALUES (1, 'hello from the WAL')")
    repl = psycopg.connect(db_url, replication="database", autocommit=True)
    inserts: list[bytes] = []
    try:
        repl.execute(
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0"
            f" (proto_version '1', publication_names '{publication}')"
        )
        deadline = time.monotonic() + 30
        while not inserts and time.monotonic() < deadline:
            size, data = repl.pgconn.get_copy_data(1)  # async: size 0 means nothing buffered
            if size > 0 and bytes(data)[:1] == b"w":
                body = bytes(data)[25:]  # 'w', start LSN, end LSN, send time
                if body[:1] == b"I":
                    inserts.append(body)
            elif size == 0:
                select.select([repl.pgconn.socket], [], [], 0.5)
                repl.pgconn.consume_input()
    finally:
        repl.close()  # ends the COPY_BOTH session with the connection
    assert inserts, "no Insert message within 30 s"
    # 'I', relation oid (4), 'N', column count (2), then ('t', length (4), text) per column
    columns = struct.unpack_from(">h", inserts[0], 6)[0]
    assert columns == 2 and b"hello from the WAL" in inserts[0]
    with psycopg.connect(db_url, autocommit=True) as conn:
        # The walsender ends a moment after its client closed: a busy server may still hold it.
        wait_for(lambda: not ((s := slots.slot_status(conn, slot)) and s.active), 30,
                 f"slot {slot} to be released")
        conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
