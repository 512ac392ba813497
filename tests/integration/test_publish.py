"""outbox.publish inside application transactions, against a real PostgreSQL."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import Integer, String, create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox.record import decode_message

pytestmark = pytest.mark.integration


def order_event(order_id: int, event_type: str = "OrderCreated", **payload: Any) -> outbox.Event:
    return outbox.Event(
        aggregate_type="Order",
        aggregate_id=str(order_id),
        event_type=event_type,
        payload={"orderId": order_id, **payload},
        headers={"tenant": "eu"},
    )


def outbox_rows(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT id, aggregate_type, aggregate_id, event_type, payload, content_type, headers"
            " FROM outbox ORDER BY position"
        ).fetchall()


def sa_url(db_url: str, driver: str = "psycopg") -> str:
    info = psycopg.conninfo.conninfo_to_dict(db_url)
    return (
        f"postgresql+{driver}://{info['user']}:{info['password']}@{info['host']}:{info['port']}"
        f"/{info['dbname']}"
    )


@pytest.fixture
def orders_table(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, state text NOT NULL)")


def test_commit_writes_business_row_and_events_together(db_url: str, orders_table: None) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO orders VALUES (1, 'PENDING')")
        ids = outbox.publish(conn, order_event(1), order_event(1, "OrderApproved"))
        conn.commit()
    rows = outbox_rows(db_url)
    assert [row[0] for row in rows] == ids
    first = rows[0]
    assert first[1:4] == ("Order", "1", "OrderCreated")
    assert json.loads(first[4]) == {"orderId": 1}
    assert first[5] == "application/json"
    assert first[6] == {"tenant": "eu"}


def test_copy_and_insert_paths_store_the_same_row(db_url: str) -> None:
    """A batch goes through binary COPY (psycopg, or SQLAlchemy on psycopg), one event through
    INSERT: the stored rows are the same."""
    import datetime as dt

    from outbox.copy_rows import MIN_EVENTS

    def event() -> outbox.Event:
        return outbox.Event(
            "Ordér", "ä-1", "Créé", {"note": "tab\tand\nnewline \\ é"},
            headers={"tenant": "eu", "naïve": "✓"}, topic="orders.custom",
            created_at=dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
        )

    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, *[event() for _ in range(MIN_EVENTS)])
        outbox.publish(conn, event())
        conn.commit()
    engine = create_engine(sa_url(db_url))
    try:
        with Session(engine) as session:
            outbox.publish(session, *[event() for _ in range(MIN_EVENTS)])
            session.commit()
    finally:
        engine.dispose()
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT aggregate_type, aggregate_id, event_type, topic, payload, content_type,"
            " headers, created_at FROM outbox ORDER BY position"
        ).fetchall()
    assert len(rows) == 2 * MIN_EVENTS + 1 and all(row == rows[0] for row in rows)
    assert rows[0][6] == {"tenant": "eu", "naïve": "✓"}
    assert json.loads(rows[0][4]) == {"note": "tab\tand\nnewline \\ é"}
    assert rows[0][7] == dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def test_rolled_back_transaction_leaves_neither_row_nor_event(
    db_url: str, orders_table: None
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO orders VALUES (1, 'PENDING')")
        outbox.publish(conn, order_event(1))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    assert outbox_rows(db_url) == []


def test_savepoint_rollback_removes_only_its_events(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        kept = outbox.publish(conn, order_event(1))
        with pytest.raises(RuntimeError), conn.transaction():
            outbox.publish(conn, order_event(2))
            raise RuntimeError("undo the savepoint")
        conn.commit()
    assert [row[0] for row in outbox_rows(db_url)] == kept


def test_publish_never_commits(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, order_event(1))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        with psycopg.connect(db_url) as other:
            assert other.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        conn.rollback()


def test_concurrent_writers_all_land(db_url: str) -> None:
    written: list[uuid.UUID] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        with psycopg.connect(db_url) as conn:
            for i in range(50):
                ids = outbox.publish(conn, order_event(n * 1000 + i))
                conn.commit()
                with lock:
                    written.extend(ids)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(row[0] for row in outbox_rows(db_url)) == sorted(written)
    assert len(written) == 200


def test_sqlalchemy_session_joins_the_transaction(db_url: str, orders_table: None) -> None:
    engine = create_engine(sa_url(db_url))
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (7, 'PENDING')"))
        ids = outbox.publish(session, order_event(7))
        session.rollback()
        session.execute(text("INSERT INTO orders VALUES (8, 'PENDING')"))
        ids = outbox.publish(session, order_event(8))
        session.commit()
    with engine.connect() as connection:
        ids2 = outbox.publish(connection, order_event(9))
        connection.commit()
    engine.dispose()
    assert [row[0] for row in outbox_rows(db_url)] == ids + ids2


async def _async_sqlalchemy(db_url: str) -> list[uuid.UUID]:
    from sqlalchemy.ext.asyncio import AsyncSession

    engine = create_async_engine(sa_url(db_url))
    async with AsyncSession(engine) as session:
        ids = await outbox.publish(session, order_event(1))
        # A batch takes the binary COPY path, on the psycopg connection under the session.
        ids += await outbox.publish(session, *[order_event(n) for n in range(10, 16)])
        await session.commit()
    async with engine.connect() as connection:
        await outbox.publish(connection, order_event(2))
        await outbox.publish(connection, *[order_event(n) for n in range(20, 26)])
        await connection.rollback()
    await engine.dispose()
    return ids


async def _async_psycopg(db_url: str) -> list[uuid.UUID]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        ids = await outbox.publish(conn, order_event(3))
        # A batch takes the binary COPY path.
        ids += await outbox.publish(conn, *[order_event(n) for n in range(4, 10)])
        await conn.commit()
        return ids


@pytest.mark.asyncio
async def test_async_targets_publish_in_their_transaction(db_url: str) -> None:
    ids = await _async_sqlalchemy(db_url) + await _async_psycopg(db_url)
    assert [row[0] for row in outbox_rows(db_url)] == ids


def test_bytes_payload_keeps_content_type(db_url: str) -> None:
    event = outbox.Event("Doc", "d1", "DocStored", b"<doc/>", content_type="application/xml")
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, event)
        conn.commit()
    row = outbox_rows(db_url)[0]
    assert (row[4], row[5]) == (b"<doc/>", "application/xml")


def test_autocommit_connection_is_refused(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(outbox.AtomicityError, match="atomic"):
            outbox.publish(conn, order_event(1))
        with conn.transaction():
            outbox.publish(conn, order_event(2))
        allowed = outbox.Outbox(allow_autocommit=True)
        allowed.publish(conn, order_event(3))
    assert len(outbox_rows(db_url)) == 2


def test_sqlalchemy_autocommit_is_refused(db_url: str) -> None:
    engine = create_engine(sa_url(db_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection, pytest.raises(outbox.AtomicityError):
        outbox.publish(connection, order_event(1))
    engine.dispose()


@pytest.mark.parametrize(
    ("make_event", "error"),
    [
        (lambda: order_event(1, when=object()), "not serialisable"),
        (lambda: order_event(1, blob="x" * (1024 * 1024)), "maximum"),
    ],
)
def test_bad_event_fails_before_any_sql_and_leaves_transaction_usable(
    db_url: str, orders_table: None, make_event: Any, error: str
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO orders VALUES (1, 'PENDING')")
        with pytest.raises(outbox.InvalidEventError, match=error):
            outbox.publish(conn, order_event(1), make_event())
        # The caller's transaction is untouched: it can go on and commit.
        outbox.publish(conn, order_event(1))
        conn.commit()
    assert len(outbox_rows(db_url)) == 1


@pytest.mark.parametrize("count", [1, 10], ids=["insert", "copy"])
def test_writing_before_migrate_says_to_migrate(empty_db_url: str, count: int) -> None:
    with psycopg.connect(empty_db_url) as conn, pytest.raises(
        outbox.SchemaMissingError, match="outbox migrate up"
    ):
        outbox.publish(conn, *[order_event(n) for n in range(count)])


def test_configured_schema_and_table_are_quoted(db_url: str) -> None:
    from outbox import migrate
    from outbox.names import SchemaNames

    names = SchemaNames(schema="Sales", table="Events")
    with psycopg.connect(db_url) as conn:
        migrate.up(conn, names)
        custom = outbox.Outbox(schema="Sales", table="Events")
        custom.publish(conn, order_event(1))
        conn.commit()
        assert conn.execute('SELECT count(*) FROM "Sales"."Events"').fetchone() == (1,)
    with pytest.raises(outbox.ConfigurationError, match="not a valid name"):
        outbox.Outbox(table="outbox; DROP TABLE orders")


def test_table_less_mode_writes_only_to_the_wal(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("CREATE PUBLICATION p_test FOR TABLE outbox")
        admin.execute("SELECT pg_create_logical_replication_slot('s_test', 'pgoutput')")
    wal_only = outbox.Outbox(mode="message", message_prefix="orders")
    event = order_event(5)
    with psycopg.connect(db_url) as conn:
        wal_only.publish(conn, event)
        conn.commit()
        wal_only.publish(conn, order_event(6))
        conn.rollback()
        changes = conn.execute(
            "SELECT data FROM pg_logical_slot_get_binary_changes('s_test', NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'p_test', 'messages', 'true')"
        ).fetchall()
        conn.execute("SELECT pg_drop_replication_slot('s_test')")
        conn.commit()
    assert outbox_rows(db_url) == []
    messages = [bytes(data) for (data,) in changes if bytes(data)[:1] == b"M"]
    assert len(messages) == 1  # the rolled-back one never reaches the WAL stream
    body = messages[0]
    # 'M', flags (1), lsn (8), prefix (NUL-terminated), length (4), content
    prefix_end = body.index(b"\x00", 10)
    assert body[10:prefix_end] == b"orders"
    record = decode_message(body[prefix_end + 5 :])
    assert (record.id, record.event_type, json.loads(record.payload)) == (
        event.id, "OrderCreated", {"orderId": 5})


def test_debezium_style_table_through_column_mapping(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "CREATE TABLE outboxevent (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL,"
            " aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)"
        )
        debezium = outbox.Outbox(table="outboxevent", columns=outbox.ColumnMapping.debezium())
        (event_id,) = debezium.publish(conn, order_event(3))
        with pytest.raises(outbox.InvalidEventError, match="not JSON"):
            debezium.publish(conn, outbox.Event("Doc", "1", "Raw", b"\xff\x00"))
        conn.commit()
        row = conn.execute("SELECT id, aggregatetype, aggregateid, type, payload FROM outboxevent")
        assert row.fetchone() == (event_id, "Order", "3", "OrderCreated", {"orderId": 3})


def test_active_span_traceparent_is_captured(db_url: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("place-order") as span, psycopg.connect(db_url) as conn:
        outbox.publish(conn, order_event(1))
        conn.commit()
        context = span.get_span_context()
    headers = outbox_rows(db_url)[0][6]
    version, trace_id, span_id, _flags = headers["traceparent"].split("-")
    expected = ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert (version, trace_id, span_id) == expected


class Base(DeclarativeBase):
    pass


class Order(Base, outbox.aggregates.RecordsEvents):  # type: ignore[misc]
    __tablename__ = "orders"
    __aggregate_type__ = "Order"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String)


def test_recorded_domain_events_are_written_at_flush_in_order(
    db_url: str, orders_table: None
) -> None:
    engine = create_engine(sa_url(db_url))
    factory = sessionmaker(engine)
    outbox.aggregates.install(factory)
    with factory() as session:
        first, second = Order(id=1, state="PENDING"), Order(id=2, state="PENDING")
        session.add_all([first, second])
        first.record_event("OrderCreated", {"orderId": 1})
        second.record_event("OrderCreated", {"orderId": 2})
        first.record_event("OrderApproved", {"orderId": 1})
        session.commit()
    with factory() as session:
        order = session.get(Order, 2)
        assert order is not None
        order.record_event("OrderCancelled", {"orderId": 2})  # no attribute changed
        session.commit()
    with factory() as session:
        order = session.get(Order, 1)
        assert order is not None
        order.state = "SHIPPED"
        order.record_event("OrderShipped")
        session.rollback()
    engine.dispose()
    rows = outbox_rows(db_url)
    assert [(r[2], r[3]) for r in rows] == [
        ("1", "OrderCreated"), ("2", "OrderCreated"), ("1", "OrderApproved"),
        ("2", "OrderCancelled"),
    ]
