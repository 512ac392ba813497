"""Events recorded on ORM entities, as a unit of work meets them: deletes, rollbacks, savepoints,
AsyncSession, and sessions the hook was not installed on. Against the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, Integer, String, create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from tests.integration.test_publish import sa_url

pytestmark = pytest.mark.integration


class Base(DeclarativeBase):
    pass


class Invoice(Base, outbox.aggregates.RecordsEvents):  # type: ignore[misc]
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String)


@pytest.fixture
def invoices(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE invoices (id int PRIMARY KEY, state text NOT NULL)")


@pytest.fixture
def engine(db_url: str, invoices: None) -> Iterator[Engine]:
    made = create_engine(sa_url(db_url))
    yield made
    made.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions with the outbox hooks installed."""
    made = sessionmaker(engine)
    outbox.aggregates.install(made)
    return made


def written(db_url: str) -> list[tuple[str, str]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT aggregate_id, event_type FROM outbox ORDER BY position")
        return [(str(a), str(e)) for a, e in rows.fetchall()]


def test_events_of_an_entity_deleted_in_the_same_unit_of_work_are_written(
    db_url: str, factory: sessionmaker[Session]
) -> None:
    with factory() as session:
        session.add(Invoice(id=1, state="OPEN"))
        session.commit()
    with factory() as session:
        invoice = session.get(Invoice, 1)
        assert invoice is not None
        invoice.record_event("InvoiceDeleted")
        session.delete(invoice)
        session.commit()
    with factory() as session:  # created and deleted in one unit of work
        doomed = Invoice(id=2, state="OPEN")
        session.add(doomed)
        session.flush()
        doomed.record_event("InvoiceVoided")
        session.delete(doomed)
        session.commit()
    assert written(db_url) == [("1", "InvoiceDeleted"), ("2", "InvoiceVoided")]


def test_rollback_discards_pending_events_and_savepoints_keep_the_outer_ones(
    db_url: str, factory: sessionmaker[Session]
) -> None:
    with factory() as session:
        fresh = Invoice(id=1, state="OPEN")
        session.add(fresh)
        fresh.record_event("InvoiceOpened")
        session.rollback()
        assert fresh.pending_events == 0  # it would travel into another session's commit
    with factory() as session:
        session.add(Invoice(id=2, state="OPEN"))
        session.commit()
    with factory() as session:
        invoice = session.get(Invoice, 2)
        assert invoice is not None
        invoice.record_event("InvoiceSent")  # outer transaction
        with session.begin_nested() as savepoint:
            invoice.record_event("InvoiceDisputed")  # inside the savepoint: rolled back
            session.flush()
            invoice.record_event("InvoiceEscalated")  # recorded, not flushed, rolled back
            savepoint.rollback()
        invoice.record_event("InvoicePaid")  # outer again
        session.commit()
    assert written(db_url) == [("2", "InvoiceSent"), ("2", "InvoicePaid")]


def test_install_hooks_only_the_factory_it_was_given(
    db_url: str, engine: Engine, factory: sessionmaker[Session]
) -> None:
    with sessionmaker(engine)() as session:  # not the installed factory
        invoice = Invoice(id=1, state="OPEN")
        session.add(invoice)
        invoice.record_event("NotThroughTheOutbox")
        session.commit()
    assert written(db_url) == []


@pytest.mark.asyncio
async def test_async_sessions_write_delete_and_savepoint_events(
    db_url: str, invoices: None
) -> None:
    engine = create_async_engine(sa_url(db_url))
    factory = async_sessionmaker(engine)
    untouched = async_sessionmaker(engine)
    outbox.aggregates.install(factory)
    async with factory() as session:
        invoice = Invoice(id=1, state="OPEN")
        session.add(invoice)
        invoice.record_event("InvoiceOpened")
        await session.commit()
    async with factory() as session:
        found: Any = await session.get(Invoice, 1)
        found.record_event("InvoiceSent")
        savepoint = await session.begin_nested()
        found.record_event("InvoiceDisputed")
        await session.flush()
        await savepoint.rollback()
        found.record_event("InvoiceDeleted")
        await session.delete(found)
        await session.commit()
    async with factory() as session:
        fresh = Invoice(id=3, state="OPEN")
        session.add(fresh)
        fresh.record_event("NeverHappened")
        await session.rollback()
        assert fresh.pending_events == 0
    async with untouched() as session:  # the global Session class is not hooked
        bystander = Invoice(id=4, state="OPEN")
        session.add(bystander)
        bystander.record_event("NotThroughTheOutbox")
        await session.commit()
    await engine.dispose()
    assert written(db_url) == [
        ("1", "InvoiceOpened"), ("1", "InvoiceSent"), ("1", "InvoiceDeleted")]
