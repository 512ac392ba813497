"""The inbox-store contract: every store of the idempotent consumer, sync and asyncio, passes the
same tests against its real database (as eventsourcing's recorders do).

Stores: SQLAlchemy (Engine and sessionmaker; AsyncEngine and async_sessionmaker), psycopg
(pool, conninfo string, caller's connection; sync and async), MongoDB (Database and
AsyncDatabase) and the in-memory ones of `outbox.consumer.testing` (MemoryInbox,
AsyncMemoryInbox). The asyncio ones run through
the same tests on a loop thread (tests/support/inbox_stores.py). Where a store breaks the
contract, the test is a strict xfail that says how.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg.sql
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine

from outbox import migrate
from outbox.consumer import InboxMissingError, InboxStoreError
from outbox.consumer.aio_stores import AsyncMongoStore, AsyncPsycopgStore, AsyncSqlAlchemyStore
from outbox.consumer.mongo import MongoStore
from outbox.consumer.stores import PsycopgStore, SqlAlchemyStore
from outbox.errors import UnsupportedTargetError
from outbox.names import SchemaNames
from tests.support.inbox_stores import (
    VARIANTS,
    Harness,
    Io,
    Variant,
    store_methods_are_those_of_the_protocol,
    transaction_methods_are_those_of_the_protocol,
)
from tests.support.mongo import with_database as mongo_database_url
from tests.support.pg import drop_database, sqlalchemy_url

pytestmark = pytest.mark.integration

DAY = dt.timedelta(days=1)
WRITE_CONFLICT = 112  # MongoDB's error code, labelled TransientTransactionError


def contract(where: Callable[[Variant], bool] = lambda v: True,
             xfail: dict[str, str] | None = None) -> pytest.MarkDecorator:
    """Run the test for every store variant `where` selects; `xfail` maps a variant id to the
    defect that makes it fail (strict: the test fails once the defect is fixed)."""
    broken = xfail or {}
    return pytest.mark.parametrize("harness", [
        pytest.param(v, id=v.id, marks=[pytest.mark.xfail(strict=True, reason=broken[v.id])]
                     if v.id in broken else [])
        for v in VARIANTS if where(v)
    ], indirect=True)


@pytest.fixture(scope="module")
def shared_db_url(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    """One migrated database for the module's PostgreSQL tests: a database per test would
    spend most of the module's time creating and dropping them. Tests keep apart by consumer
    name and effects table (Harness.consumer); the few that need the whole inbox to themselves
    ask for `own_database`."""
    name = f"contract_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            psycopg.sql.Identifier(name), psycopg.sql.Identifier(pg_template)))
    yield psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)
    drop_database(pg_admin_url, name)


@pytest.fixture
def own_database() -> None:
    """Marks a test whose PostgreSQL database is its own (a fresh copy of the template)."""


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    variant: Variant = request.param
    if variant.family == "postgres":
        own = "own_database" in request.fixturenames
        url = request.getfixturevalue("db_url" if own else "shared_db_url")
        built = Harness(variant, db_url=url)
    elif variant.family == "mongo":
        url = mongo_database_url(request.getfixturevalue("mongo_url"),
                                 f"test_{uuid.uuid4().hex[:12]}")
        built = Harness(variant, mongo_url=url)
    else:
        built = Harness(variant)
    try:
        yield built
    finally:
        built.close()


def ids(count: int) -> list[uuid.UUID]:
    return [uuid.uuid4() for _ in range(count)]


# -- shape ------------------------------------------------------------------------------------


@contract()
def test_store_and_transaction_have_the_protocols_methods(harness: Harness) -> None:
    store = harness.store()
    asyncio = harness.variant.asyncio
    assert store_methods_are_those_of_the_protocol(store.raw, asyncio) == []
    tx = store.begin()
    try:
        assert transaction_methods_are_those_of_the_protocol(tx.raw, asyncio) == []
        assert isinstance(tx.handle, harness.variant.handle_type)
    finally:
        tx.rollback()


# -- check --------------------------------------------------------------------------------------


@contract(where=lambda v: v.migrated)
def test_check_fails_clearly_while_the_inbox_table_is_missing(
    harness: Harness, empty_db_url: str
) -> None:
    store = harness.store(url=empty_db_url)
    with pytest.raises(InboxMissingError, match="outbox migrate up"):
        store.check()
    with psycopg.connect(empty_db_url) as conn:
        migrate.up(conn, SchemaNames())
    store.check()
    harness.assert_callers_resources_intact(store)


@contract(where=lambda v: not v.migrated)
def test_check_prepares_the_inbox_where_there_are_no_migrations(harness: Harness) -> None:
    store = harness.store()
    store.check()
    store.check()  # idempotent: every consumer start calls it
    if harness.variant.family == "mongo":
        indexes = harness.outside.inbox_indexes()
        # The unique index is what decides a race between two consumers (see claim()).
        assert indexes["consumer_event_id"]["unique"] is True
        assert indexes["consumer_event_id"]["key"] == [("consumer", 1), ("event_id", 1)]
        assert indexes["processed_at"]["key"] == [("processed_at", 1)]
    tx = store.begin()
    [event_id] = ids(1)
    assert tx.claim([event_id]) == {event_id}
    tx.commit()


@contract(where=lambda v: v.family != "memory" and v.db != "connection")
def test_check_fails_with_the_librarys_error_when_the_server_is_unreachable(
    harness: Harness
) -> None:
    """A consumer started while its database is down says so in the project's own error, not
    in a driver exception (the driver's stays the cause), and the message shows no password."""
    store = harness.store(unreachable=True)
    with pytest.raises(InboxStoreError) as failed:
        store.check()
    assert failed.value.__cause__ is not None
    if harness.db_url is not None:
        password = psycopg.conninfo.conninfo_to_dict(harness.db_url).get("password")
        assert password and str(password) not in str(failed.value)


# -- claim: the dedup rule ----------------------------------------------------------------------


@contract()
def test_new_ids_are_claimed_and_never_again_after_the_commit(harness: Harness) -> None:
    store = harness.store()
    store.check()
    a, b, c = ids(3)
    first = store.begin()
    assert first.claim([a, b]) == {a, b}
    first.commit()
    assert harness.outside.inbox_ids() == {a, b}

    second = store.begin()
    assert second.claim([a, b, c]) == {c}
    assert second.claim([]) == set()
    second.commit()
    assert harness.outside.inbox_ids() == {a, b, c}

    # Another store of the same consumer (a second process of the group) sees them too.
    other = harness.store()
    third = other.begin()
    assert third.claim([a, b, c]) == set()
    third.commit()


@contract()
def test_each_consumer_name_has_dedup_rows_of_its_own(harness: Harness) -> None:
    billing, shipping = harness.store("billing"), harness.store("shipping")
    [event_id] = ids(1)
    for store in (billing, shipping):
        store.check()
        tx = store.begin()
        assert tx.claim([event_id]) == {event_id}
        tx.commit()
    assert harness.outside.inbox_ids("billing") == {event_id}
    assert harness.outside.inbox_ids("shipping") == {event_id}




@contract()
def test_an_id_repeated_in_one_claim_is_claimed_once(harness: Harness) -> None:
    store = harness.store()
    store.check()
    a, b = ids(2)
    tx = store.begin()
    try:
        assert tx.claim([a, b, a]) == {a, b}
        tx.commit()
    except BaseException:
        tx.rollback()
        raise
    assert harness.outside.inbox_ids() == {a, b}


def claiming(harness: Harness, count: int) -> tuple[Any, list[uuid.UUID], Any]:
    """A checked store and an open transaction that has claimed `count` new ids."""
    store = harness.store()
    store.check()
    batch = ids(count)
    tx = store.begin()
    assert tx.claim(batch) == set(batch)
    return store, batch, tx


@contract()
def test_a_rolled_back_claim_leaves_the_ids_claimable(harness: Harness) -> None:
    store, batch, tx = claiming(harness, 3)
    harness.apply(tx, 1)
    tx.rollback()
    assert harness.outside.inbox_ids() == set()
    assert harness.outside.effects() == []

    again = store.begin()
    assert again.claim(batch) == set(batch)
    harness.apply(again, 1)
    again.commit()
    assert harness.outside.inbox_ids() == set(batch)
    assert harness.outside.effects() == [1]


# -- the handle is the store's transaction ------------------------------------------------------


@contract()
def test_work_on_the_handle_commits_with_the_claim_and_not_before(harness: Harness) -> None:
    _, batch, tx = claiming(harness, 2)
    harness.apply(tx, 1)
    harness.apply(tx, 2)
    # The handle is the claim's own transaction: it sees the uncommitted dedup rows ...
    if harness.variant.family != "memory":  # MemorySession cannot read them
        assert harness.inbox_seen_through_the_handle(tx) == set(batch)
    # ... and nothing is visible outside it until it commits.
    assert harness.outside.inbox_ids() == set()
    assert harness.outside.effects() == []
    tx.commit()
    assert harness.outside.inbox_ids() == set(batch)
    assert harness.outside.effects() == [1, 2]


@contract(where=lambda v: v.family != "memory")  # MemorySession has no commit to call
def test_a_handler_cannot_commit_the_stores_transaction(harness: Harness) -> None:
    """Moved from test_consumer.py (test_handler_cannot_commit_the_consumers_transaction, for
    psycopg and SQLAlchemy through Kafka): the refusal is the store's. It is not transient, so
    the consumer treats it as the handler's failure (retries, then the dead letter that test
    counted) instead of retrying the transaction for ever."""
    store, _, tx = claiming(harness, 2)
    harness.apply(tx, 1)
    try:
        with pytest.raises(harness.variant.own_commit_error) as refused:
            harness.commit_on_the_handle(tx)
    finally:
        tx.rollback()
    assert not store.is_transient(refused.value)
    assert harness.outside.effects() == []
    assert harness.outside.inbox_ids() == set()


# -- two transactions, one id -------------------------------------------------------------------


MEMORY_RACE = (
    "MemoryInbox.claim does not see ids claimed by another open transaction and its commit does "
    "not check again: two overlapping transactions both claim the id and both apply it"
)


@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
@contract()
def test_two_transactions_claiming_one_id_apply_it_exactly_once(
    harness: Harness, first_ends: str, request: pytest.FixtureRequest
) -> None:
    """Two consumers of one group during a rebalance: both claim the same id. PostgreSQL makes
    the second claim wait for the first transaction (then it gets the id only if the first rolled
    back); MongoDB aborts the second with a transient WriteConflict at once, and the consumer's
    retry of the whole transaction sees the outcome of the first."""
    if harness.variant.family == "memory" and first_ends == "commit":
        request.applymarker(pytest.mark.xfail(strict=True, reason=MEMORY_RACE))
    mine, theirs = harness.store(), harness.store()
    mine.check()
    [event_id] = ids(1)
    waits = harness.variant.concurrent_claim == "waits"
    first = mine.begin()
    first_pid = harness.backend_pid(first) if waits else None
    assert first.claim([event_id]) == {event_id}
    harness.apply(first, 1)

    second = theirs.begin()
    second_pid = harness.backend_pid(second) if waits else None
    claiming = harness.spawn(lambda: second.claim([event_id]))
    if waits:
        assert first_pid is not None and second_pid is not None
        harness.outside.wait_blocked(second_pid, by=first_pid)
        assert not claiming.done()
    else:
        # No lock to wait on: the second claim ends while the first transaction is open.
        claiming.exception(timeout=30)

    if first_ends == "commit":
        first.commit()
    else:
        first.rollback()
    if harness.variant.concurrent_claim == "conflicts":
        conflict = claiming.exception(timeout=30)
        assert isinstance(conflict, OperationFailure) and conflict.code == WRITE_CONFLICT
        assert theirs.is_transient(conflict)
        second.rollback()
        second = theirs.begin()  # the consumer's retry of the whole transaction
        got = second.claim([event_id])
    else:
        got = claiming.result(timeout=30)
    if got:
        harness.apply(second, 2)
    second.commit()

    assert got == (set() if first_ends == "commit" else {event_id})
    assert harness.outside.inbox_ids() == {event_id}
    assert harness.outside.effects() == ([1] if first_ends == "commit" else [2])


@contract()
def test_a_transaction_begun_before_the_others_commit_does_not_claim_the_id_again(
    harness: Harness
) -> None:
    """The second transaction has already read (a handler's read, or the lookup MongoDB's claim
    makes first) when the first one commits the id; its claim comes after that commit.
    PostgreSQL's claim sees the committed row (READ COMMITTED, ON CONFLICT); MongoDB's snapshot
    predates it, so its insert conflicts (a transient WriteConflict) and the retry sees it."""
    mine, theirs = harness.store(), harness.store()
    mine.check()
    [event_id] = ids(1)
    second = theirs.begin()
    if harness.variant.family != "memory":  # MemorySession cannot read
        assert harness.inbox_seen_through_the_handle(second) == set()
    first = mine.begin()
    assert first.claim([event_id]) == {event_id}
    harness.apply(first, 1)
    first.commit()
    if harness.variant.concurrent_claim == "conflicts":
        with pytest.raises(OperationFailure) as conflict:
            second.claim([event_id])
        assert conflict.value.code == WRITE_CONFLICT
        assert theirs.is_transient(conflict.value)
        second.rollback()
        second = theirs.begin()  # the consumer's retry of the whole transaction
    got = second.claim([event_id])
    assert got == set()
    second.commit()
    assert harness.outside.inbox_ids() == {event_id}
    assert harness.outside.effects() == [1]


@contract(where=lambda v: v.one_connection)
def test_a_store_on_one_connection_refuses_a_second_open_transaction(harness: Harness) -> None:
    store, [event_id], tx = claiming(harness, 1)
    with pytest.raises(InboxStoreError, match="already inside a transaction"):
        store.begin()
    tx.commit()  # the open transaction is not disturbed
    assert harness.outside.inbox_ids() == {event_id}


@contract(where=lambda v: v.db == "connection")
def test_a_callers_connection_inside_a_transaction_is_refused_and_left_alone(
    harness: Harness
) -> None:
    store = harness.store()
    conn, io = store.db, harness.io
    # The caller's own work, not committed yet.
    io(conn.execute(f"INSERT INTO {harness.effects_table} (n) VALUES (99)"))
    with pytest.raises(InboxStoreError, match="already inside a transaction"):
        store.begin()
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    io(conn.commit())
    assert harness.outside.effects() == [99]


# -- sequence numbers (ordering="sequence") -----------------------------------------------------


A, B = ("Order", "a"), ("Order", "b")


@contract()
def test_sequence_numbers_commit_with_the_claim_and_never_go_back(harness: Harness) -> None:
    store = harness.store(sequence=True)
    store.check()
    tx = store.begin()
    assert tx.read_sequences([A, B]) == {}
    tx.claim(ids(1))
    tx.save_sequences({A: 3})
    tx.rollback()

    tx = store.begin()
    assert tx.read_sequences([A, B]) == {}  # rolled back with its claim
    [event_id] = ids(1)
    tx.claim([event_id])
    tx.save_sequences({A: 3, B: 1})
    assert tx.read_sequences([A]) == {A: 3}  # the transaction sees its own numbers
    tx.commit()
    assert harness.outside.inbox_ids() == {event_id}

    tx = store.begin()
    assert tx.read_sequences([A, B, ("Invoice", "a")]) == {A: 3, B: 1}
    tx.save_sequences({A: 2, B: 4})  # a number never goes back
    tx.commit()
    tx = harness.store(sequence=True).begin()  # another process of the group sees them
    assert tx.read_sequences([A, B]) == {A: 3, B: 4}
    tx.rollback()
    other = harness.store("shipping", sequence=True).begin()  # each consumer has its own
    assert other.read_sequences([A, B]) == {}
    other.rollback()


@contract(where=lambda v: v.concurrent_claim == "waits")
def test_a_second_reader_of_an_aggregates_number_waits_for_the_first_transaction(
    harness: Harness
) -> None:
    """Two consumers of one aggregate during a rebalance judge its numbers one after the other:
    the second read waits for the first transaction and sees its number."""
    mine, theirs = harness.store(sequence=True), harness.store(sequence=True)
    mine.check()
    setup = mine.begin()
    setup.save_sequences({A: 1})
    setup.commit()
    first = mine.begin()
    first_pid = harness.backend_pid(first)
    assert first.read_sequences([A]) == {A: 1}
    second = theirs.begin()
    second_pid = harness.backend_pid(second)
    reading = harness.spawn(lambda: second.read_sequences([A]))
    harness.outside.wait_blocked(second_pid, by=first_pid)
    first.save_sequences({A: 2})
    first.commit()
    assert reading.result(timeout=30) == {A: 2}
    second.rollback()


@contract(where=lambda v: v.family == "mongo")
def test_check_makes_the_unique_index_of_the_sequence_numbers(harness: Harness) -> None:
    store = harness.store(sequence=True)
    store.check()
    store.check()
    assert harness.mongo is not None
    indexes = harness.mongo.get_default_database().outbox_inbox_sequence.index_information()
    assert indexes["consumer_aggregate"]["unique"] is True


# -- is_transient -------------------------------------------------------------------------------


@contract()
def test_a_lost_connection_is_transient_and_the_store_recovers(harness: Harness) -> None:
    store = harness.store()
    store.check()
    error = harness.lose_connection(store)
    assert store.is_transient(error), repr(error)
    [event_id] = ids(1)
    if harness.variant.reconnects:
        tx = store.begin()
        assert tx.claim([event_id]) == {event_id}
        tx.commit()
        assert harness.outside.inbox_ids() == {event_id}
    else:
        # The caller's connection is not the store's to replace: it says so.
        with pytest.raises(InboxStoreError, match="closed or broken"):
            store.begin()


@contract()
def test_constraint_and_programming_errors_are_not_transient(harness: Harness) -> None:
    store = harness.store()
    store.check()
    errors = dict(harness.permanent_errors(store))
    expected = {"postgres": {"unique violation", "syntax error"},
                "mongo": {"duplicate key", "unknown operator"},
                "memory": {"rejected commit"}}[harness.variant.family]
    assert set(errors) == expected
    for name, error in errors.items():
        assert not store.is_transient(error), f"{name}: {error!r}"
    assert harness.outside.inbox_ids() == set()
    assert harness.outside.effects() == []
    # The store is still usable after each.
    [event_id] = ids(1)
    tx = store.begin()
    assert tx.claim([event_id]) == {event_id}
    tx.commit()


# -- purge ------------------------------------------------------------------------------------


@contract()
def test_purge_removes_only_old_rows_of_the_consumer_and_counts_them(
    harness: Harness, own_database: None
) -> None:
    """The rows of test_inbox_purge_cli_removes_only_old_rows, for every store (the CLI tests
    keep what the command accepts and prints)."""
    store = harness.store()
    store.check()
    harness.outside.age_inbox({"billing": [0, 3, 8, 30], "shipping": [1, 9]})
    assert store.purge(7 * DAY, "billing") == 2
    assert harness.outside.inbox_ages() == [("billing", 0), ("billing", 3), ("shipping", 1),
                                            ("shipping", 9)]
    assert store.purge(2 * DAY) == 2
    assert harness.outside.inbox_ages() == [("billing", 0), ("shipping", 1)]
    assert store.purge(2 * DAY) == 0


# MongoDB purges with one delete_many, no chunks; 12,000 documents cost SecantusDB ~10 s.
@contract(where=lambda v: v.family != "mongo")
def test_purge_counts_every_row_it_deletes_however_many(
    harness: Harness, own_database: None
) -> None:
    """More old rows than one chunk (the PostgreSQL stores delete 10,000 at a time, so that a
    large purge never holds one long transaction)."""
    store = harness.store()
    store.check()
    harness.outside.age_many("billing", 12_345, days=10)
    harness.outside.age_inbox({"billing": [0]})
    assert store.purge(7 * DAY, "billing") == 12_345
    assert harness.outside.inbox_ages() == [("billing", 0)]


@contract()
def test_purge_keeps_rows_younger_than_the_age_given(
    harness: Harness, own_database: None
) -> None:
    store, [event_id], tx = claiming(harness, 1)
    tx.commit()
    assert store.purge(DAY, "billing") == 0
    assert store.purge(DAY) == 0
    assert harness.outside.inbox_ids() == {event_id}


# -- close ------------------------------------------------------------------------------------


@contract()
def test_close_releases_the_stores_connections_and_leaves_the_callers_open(
    harness: Harness
) -> None:
    app = f"contract-{uuid.uuid4().hex[:8]}"
    store = harness.store(application_name=app)
    store.check()
    committed, rolled_back = ids(2)
    tx = store.begin()
    tx.claim([committed])
    tx.commit()
    tx = store.begin()
    tx.claim([rolled_back])
    tx.rollback()
    store.purge(DAY)
    harness.assert_callers_resources_intact(store)
    store.close()
    harness.assert_callers_resources_intact(store)
    if harness.variant.db == "conninfo":
        # The one connection the store opened itself is gone (once the server has seen the
        # client hang up: its backend exits after the close returns).
        harness.outside.wait_gone(app)
    # A closed store opens again when used (Consumer.run closes it; the next run reopens).
    [later] = ids(1)
    tx = store.begin()
    assert tx.claim([committed, later]) == {later}
    tx.commit()
    store.close()
    harness.assert_callers_resources_intact(store)


# -- construction -----------------------------------------------------------------------------




# Never connected to: constructing a store must not need its server.
NOWHERE_PG = "postgresql://nobody:nothing@127.0.0.1:9/none"
NOWHERE_MONGO = "mongodb://127.0.0.1:9/none?directConnection=true"
# What the refusal says.
REFUSAL = {
    "SqlAlchemyStore": "db must be a SQLAlchemy Engine or sessionmaker",
    "AsyncSqlAlchemyStore": "db must be a SQLAlchemy AsyncEngine or async_sessionmaker",
    "PsycopgStore": "db must be a psycopg_pool", "AsyncPsycopgStore": "db must be a psycopg_pool",
    "MongoStore": "mongo= must be a pymongo", "AsyncMongoStore": "mongo= must be a pymongo",
}


@pytest.mark.parametrize("given", ["twin", "object"])
@pytest.mark.parametrize("store_class", [
    pytest.param(cls, id=cls.__name__)
    for cls in (SqlAlchemyStore, PsycopgStore, MongoStore, AsyncSqlAlchemyStore,
                AsyncPsycopgStore, AsyncMongoStore)
])
def test_a_database_of_the_wrong_kind_is_refused_at_construction(
    store_class: type, given: str
) -> None:
    """Each store given its twin's database ("twin": the sync one for the asyncio store and back,
    the mistake a user makes) or an unrelated object is refused at once with UnsupportedTargetError,
    alike in sync and async. Needs no server. Moved from tests/unit/test_consumer_sync_async.py
    (test_the_stores_refuse_a_wrong_handle_type_with_the_same_error: the psycopg and MongoDB
    stores, an unrelated object, the messages)."""
    io = Io()
    made: list[Callable[[], Any]] = []
    try:
        if given == "object":
            wrong: Any = object()
        elif store_class is SqlAlchemyStore:
            wrong = io(_make_async(lambda: create_async_engine(sqlalchemy_url(NOWHERE_PG))))
            made.append(lambda: io(wrong.dispose()))
        elif store_class is AsyncSqlAlchemyStore:
            wrong = create_engine(sqlalchemy_url(NOWHERE_PG))
            made.append(wrong.dispose)
        elif store_class is PsycopgStore:
            wrong = io(_make_async(lambda: AsyncConnectionPool(NOWHERE_PG, open=False)))
        elif store_class is AsyncPsycopgStore:
            wrong = ConnectionPool(NOWHERE_PG, open=False)
        elif store_class is MongoStore:
            client: Any = io(_make_async(lambda: AsyncMongoClient(NOWHERE_MONGO, connect=False)))
            made.append(lambda: io(client.close()))
            wrong = client.get_default_database()
        else:
            sync_client: MongoClient[dict[str, Any]] = MongoClient(NOWHERE_MONGO, connect=False)
            made.append(sync_client.close)
            wrong = sync_client.get_default_database()
        args = (wrong, "billing") if store_class in (MongoStore, AsyncMongoStore) else (
            wrong, "billing", SchemaNames())
        with pytest.raises(UnsupportedTargetError, match=REFUSAL[store_class.__name__]):
            store_class(*args)
    finally:
        for cleanup in reversed(made):
            cleanup()
        io.close()


async def _make_async(make: Callable[[], Any]) -> Any:
    return make()
