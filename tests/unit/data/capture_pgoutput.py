"""Captures raw pgoutput frames from a real server into pgoutput_pg15.json, for unit tests."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import select
import struct
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import outbox
from outbox import migrate
from outbox.columns import ColumnMapping
from outbox.conninfo import libpq_url
from outbox.names import SchemaNames
from outbox.record import OutboxRecord

# Run against a server with wal_level=logical, as a superuser (it creates databases, slots and a
# replication origin, and drops them afterwards):
#
#     .venv/bin/python -m tests.unit.data.capture_pgoutput --db postgresql://outbox:...@host/outbox
#
# Each scenario runs in a fresh database with the outbox migrated, on its own slot; the frames
# of its transactions are read with psycopg's replication protocol directly (not with the code
# under test) and stored as hex, with the events that were written.

OUT = Path(__file__).with_name("pgoutput_pg15.json")
END_PREFIX = "capture-end"
Conn = psycopg.Connection[Any]


def url_for(admin_url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(libpq_url(admin_url), dbname=dbname)


def describe(record: OutboxRecord) -> dict[str, Any]:
    return {
        "id": str(record.id),
        "aggregate_type": record.aggregate_type,
        "aggregate_id": record.aggregate_id,
        "event_type": record.event_type,
        "payload_hex": record.payload.hex(),
        "content_type": record.content_type,
        "headers": dict(record.headers),
        "topic": record.topic,
        "created_at": record.created_at.isoformat() if record.created_at else None,
    }


class Scenario:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []

    def publish(self, box: outbox.Outbox, *events: outbox.Event, commit: bool = True) -> None:
        """Write `events` and remember them as expected (they must end up committed)."""
        for record in box.records(events):
            self.events.append(describe(record))
        box.publish(self.conn, *events)
        if commit:
            self.conn.commit()


def event(n: int, **extra: Any) -> outbox.Event:
    return outbox.Event(
        aggregate_type="Order",
        aggregate_id=str(n),
        event_type="OrderCreated",
        payload=extra.pop("payload", {"orderId": n, "note": "caf\u00e9"}),
        headers=extra.pop("headers", {"tenant": "eu"}),
        **extra,
    )


# -- scenarios: each gets a connection (autocommit off) to its own database --------------------


def table_insert(s: Scenario) -> None:
    box = outbox.Outbox(capture_trace_context=False)
    s.publish(box, event(1), event(2, topic="orders.special"), event(3, payload=b"\x00\xffraw",
                                                                     content_type="x/bin"))
    s.publish(box, event(4, headers={}))


def message(s: Scenario) -> None:
    box = outbox.Outbox(mode="message", capture_trace_context=False)
    s.publish(box, event(1), event(2, payload=b"\x01\x02"))
    s.conn.execute("SELECT pg_logical_emit_message(true, 'other-prefix', 'ignored')")
    s.conn.execute("SELECT pg_logical_emit_message(false, 'outbox', 'not transactional')")
    s.conn.commit()
    s.conn.execute("SELECT pg_logical_emit_message(true, 'outbox', '\\x09ff'::bytea)")
    s.conn.commit()


def alter_table(s: Scenario) -> None:
    box = outbox.Outbox(capture_trace_context=False)
    s.publish(box, event(1))
    s.conn.execute("ALTER TABLE outbox ADD COLUMN note text DEFAULT 'added'")
    s.conn.commit()
    s.publish(box, event(2))
    s.conn.execute("ALTER TABLE outbox DROP COLUMN topic")
    s.conn.commit()
    dropped = outbox.Outbox(
        capture_trace_context=False, columns=ColumnMapping(topic=None)
    )
    s.publish(dropped, event(3))
    s.conn.execute("ALTER TABLE outbox RENAME COLUMN event_type TO kind")
    s.conn.commit()
    s.conn.execute(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, kind, payload)"
        " VALUES (%s, 'Order', '4', 'OrderCreated', '\\x7b7d')",
        [uuid.uuid4()],
    )
    s.conn.commit()


def truncate(s: Scenario) -> None:
    box = outbox.Outbox(capture_trace_context=False)
    s.publish(box, event(1))
    s.conn.execute("TRUNCATE outbox")
    s.conn.commit()
    s.conn.execute("TRUNCATE outbox RESTART IDENTITY CASCADE")
    s.conn.commit()
    s.publish(box, event(2))


def update_delete(s: Scenario) -> None:
    box = outbox.Outbox(capture_trace_context=False)
    big = os.urandom(12000)  # incompressible: stored out of line, so updates send it as 'u'
    s.publish(box, event(1), event(2), event(3, payload=big))
    first, second, third = (uuid.UUID(e["id"]) for e in s.events)
    s.conn.execute("UPDATE outbox SET topic = 'changed' WHERE id = %s", [first])
    s.conn.execute("UPDATE outbox SET topic = 'toast' WHERE id = %s", [third])
    s.conn.execute("DELETE FROM outbox WHERE id = %s", [second])
    s.conn.commit()
    s.conn.execute("UPDATE outbox SET position = DEFAULT WHERE id = %s", [first])  # key change
    s.conn.commit()
    s.conn.execute("ALTER TABLE outbox REPLICA IDENTITY FULL")
    s.conn.commit()
    s.conn.execute("UPDATE outbox SET topic = 'full' WHERE id = %s", [first])
    s.conn.execute("DELETE FROM outbox WHERE id = %s", [first])
    s.conn.commit()
    # Debezium style: the event row is deleted in the transaction that inserted it.
    fourth = event(4)
    s.publish(box, fourth, commit=False)
    s.conn.execute("DELETE FROM outbox WHERE id = %s", [fourth.id])
    s.conn.commit()


DEBEZIUM_TABLE = (
    "CREATE TABLE outbox_dbz (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL,"
    " aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)"
)


def debezium(s: Scenario) -> None:
    box = outbox.Outbox(
        table="outbox_dbz", columns=ColumnMapping.debezium(), capture_trace_context=False
    )
    s.publish(box, event(1, payload={"b": 2, "a": [1, "x"]}), event(2))


def custom_type(s: Scenario) -> None:
    s.conn.execute("CREATE TYPE mood AS ENUM ('calm', 'busy')")
    s.conn.execute("ALTER TABLE outbox ADD COLUMN mood mood DEFAULT 'calm'")
    s.conn.commit()
    s.publish(outbox.Outbox(capture_trace_context=False), event(1))


def origin(s: Scenario) -> None:
    s.conn.execute("SELECT pg_replication_origin_create('capture_origin')")
    s.conn.commit()
    s.conn.execute("SELECT pg_replication_origin_session_setup('capture_origin')")
    s.conn.execute("SELECT pg_replication_origin_xact_setup('0/12345678', now())")
    s.publish(outbox.Outbox(capture_trace_context=False), event(1))
    s.conn.execute("SELECT pg_replication_origin_session_reset()")
    s.conn.commit()


def streamed(s: Scenario) -> None:
    box = outbox.Outbox(capture_trace_context=False)
    filler = {"filler": "x" * 600}
    s.publish(box, *[event(n) for n in range(5)], commit=False)
    # The rows of the savepoint pass logical_decoding_work_mem (64kB here), so the server
    # streams the open transaction, then a Stream Abort for the savepoint's subtransaction.
    s.conn.execute("SAVEPOINT doomed")
    box.publish(s.conn, *[event(2000 + n, payload=filler) for n in range(110)])
    s.conn.execute("ROLLBACK TO SAVEPOINT doomed")
    s.publish(box, *[event(100 + n) for n in range(5)])


@dataclass(frozen=True)
class Spec:
    name: str
    run: Callable[[Scenario], None]
    options: dict[str, str] = field(default_factory=lambda: {"binary": "true"})
    publish: str = "insert"
    table: str = "outbox"
    prepare: str | None = None


SCENARIOS = [
    Spec("table_insert_binary", table_insert),
    Spec("table_insert_text", table_insert, {"binary": "false"}),
    Spec("message", message),
    Spec("alter_table", alter_table),
    Spec("truncate", truncate, publish="insert, truncate"),
    Spec("update_delete", update_delete, publish="insert, update, delete"),
    Spec("debezium_binary", debezium, table="outbox_dbz", prepare=DEBEZIUM_TABLE),
    Spec("debezium_text", debezium, {"binary": "false"}, table="outbox_dbz",
         prepare=DEBEZIUM_TABLE),
    Spec("custom_type", custom_type),
    Spec("origin", origin),
    Spec("streamed", streamed, {"binary": "true", "proto_version": "2", "streaming": "on"}),
]


def read_frames(rconn: Conn, slot: str, publication: str, options: dict[str, str]
                ) -> list[dict[str, Any]]:
    """The XLogData frames up to the END_PREFIX message's transaction (not included)."""
    opts = {"proto_version": "1", "messages": "true", **options}
    parts = [sql.SQL("{} {}").format(sql.SQL(k), sql.Literal(v)) for k, v in opts.items()]
    parts.append(sql.SQL("publication_names {}").format(
        sql.Literal(sql.Identifier(publication).as_string(rconn))))
    rconn.execute(sql.SQL("START_REPLICATION SLOT {} LOGICAL 0/0 ({})").format(
        sql.Identifier(slot), sql.SQL(", ").join(parts)))
    pg = rconn.pgconn
    frames: list[dict[str, Any]] = []
    # The marker transaction (Begin, Message with END_PREFIX, Commit) ends the capture.
    marker = END_PREFIX.encode() + b"\x00"
    while True:
        size, data = pg.get_copy_data(1)
        if size == 0:
            if not select.select([pg.socket], [], [], 10)[0]:
                raise SystemExit("timed out waiting for the end marker")
            pg.consume_input()
            continue
        if size < 0:
            raise SystemExit(f"replication ended: {pg.error_message!r}")
        frame = bytes(data)
        if frame[0:1] == b"w":
            (start,) = struct.unpack_from(">Q", frame, 1)
            payload = frame[25:]
            if payload[:1] == b"M" and payload[10 : 10 + len(marker)] == marker:
                frames.pop()  # the marker transaction's Begin
                return frames
            frames.append({"lsn": start, "hex": payload.hex()})


def capture(admin_url: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as admin:
        version = admin.execute("SELECT version()").fetchone()
        for spec in SCENARIOS:
            dbname = f"capture_{spec.name}"
            drop_all(admin, dbname)
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            try:
                result[spec.name] = capture_one(url_for(admin_url, dbname), spec)
            finally:
                drop_all(admin, dbname)
            print(f"{spec.name}: {len(result[spec.name]['frames'])} frames", file=sys.stderr)
    return {
        "server": version[0] if version else None,
        "captured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "captured_with": "tests/unit/data/capture_pgoutput.py",
        "scenarios": result,
    }


def capture_one(url: str, spec: Spec) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        migrate.up(conn, SchemaNames())
    slot = f"capture_{spec.name}"  # slot names are global to the cluster
    with psycopg.connect(url, autocommit=True) as setup:
        if spec.prepare:
            setup.execute(spec.prepare)
        setup.execute(sql.SQL("CREATE PUBLICATION capture FOR TABLE {} WITH (publish = {})").format(
            sql.Identifier(spec.table), sql.Literal(spec.publish)))
        setup.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    with psycopg.connect(url) as conn:
        scenario = Scenario(conn)
        spec.run(scenario)
        conn.execute("SELECT pg_logical_emit_message(true, %s, '')", [END_PREFIX])
        conn.commit()
    # A tiny decoding memory makes the server stream the large transaction before its commit.
    options = "-c logical_decoding_work_mem=64kB" if spec.name == "streamed" else ""
    # Not a `with` block: leaving one would try to COMMIT on a connection still in COPY mode.
    rconn = psycopg.connect(url, replication="database", autocommit=True, options=options)
    try:
        frames = read_frames(rconn, slot, "capture", spec.options)
    finally:
        rconn.close()
    return {
        "options": {"proto_version": "1", "messages": "true", **spec.options},
        "publish": spec.publish,
        "table": spec.table,
        "events": scenario.events,
        "frames": frames,
    }


def drop_all(admin: Conn, dbname: str) -> None:
    admin.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                  " WHERE database = %s AND active_pid IS NOT NULL", [dbname])
    deadline = time.monotonic() + 10
    # A terminated walsender releases its slot a moment later.
    while admin.execute("SELECT count(*) FROM pg_replication_slots WHERE database = %s"
                        " AND active", [dbname]).fetchone() != (0,):
        if time.monotonic() > deadline:
            raise SystemExit(f"the slots of {dbname} stay active")
        time.sleep(0.05)
    for (slot,) in admin.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [dbname]).fetchall():
        admin.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    admin.execute("SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin"
                  " WHERE roname = 'capture_origin'")
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(dbname)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default=os.environ.get("OUTBOX_DB_URL"),
                        help="superuser URL of a server with wal_level=logical")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not args.db:
        parser.error("--db or OUTBOX_DB_URL is required")
    data = capture(args.db)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
