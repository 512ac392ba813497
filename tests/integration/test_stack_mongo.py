"""Smoke tests for the local stack's MongoDB: multi-document transactions and change streams."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.change_stream import ChangeStream
from pymongo.client_session import ClientSession
from pymongo.collection import Collection

pytestmark = pytest.mark.integration

Document = dict[str, Any]


@pytest.fixture
def client(mongo_url: str) -> Iterator[MongoClient[Document]]:
    client: MongoClient[Document] = MongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def collection(client: MongoClient[Document]) -> Iterator[Collection[Document]]:
    db = client.get_default_database()
    name = f"smoke_{uuid.uuid4().hex[:12]}"
    # Created up front: two transactions that each create the collection implicitly conflict.
    db.create_collection(name)
    try:
        yield db[name]
    finally:
        db.drop_collection(name)


class Rollback(Exception):
    """Raised inside a transaction callback to make with_transaction abort it."""


def test_committed_transaction_is_visible_and_aborted_one_is_not(
    client: MongoClient[Document], collection: Collection[Document]
) -> None:
    def write_two(session: ClientSession) -> int:
        collection.insert_many([{"_id": "a", "n": 1}, {"_id": "b", "n": 2}], session=session)
        # Not yet committed: another reader must not see the writes.
        return collection.count_documents({})

    with client.start_session() as session:
        seen_outside = session.with_transaction(write_two)
    assert seen_outside == 0

    def write_then_fail(session: ClientSession) -> None:
        collection.insert_one({"_id": "c"}, session=session)
        collection.update_one({"_id": "a"}, {"$set": {"n": 99}}, session=session)
        raise Rollback

    with client.start_session() as session, pytest.raises(Rollback):
        session.with_transaction(write_then_fail)

    assert sorted((doc["_id"], doc["n"]) for doc in collection.find()) == [("a", 1), ("b", 2)]


def test_change_stream_reports_insert_and_update(collection: Collection[Document]) -> None:
    # max_await_time_ms makes each try_next() a bounded server-side wait for new events.
    with collection.watch(full_document="updateLookup", max_await_time_ms=200) as stream:
        collection.insert_one({"_id": "e1", "v": 1})
        collection.update_one({"_id": "e1"}, {"$set": {"v": 2}})
        inserted = next_change(stream)
        updated = next_change(stream)

    assert inserted["operationType"] == "insert"
    assert inserted["documentKey"] == {"_id": "e1"}
    assert inserted["fullDocument"] == {"_id": "e1", "v": 1}
    assert updated["operationType"] == "update"
    assert updated["updateDescription"]["updatedFields"] == {"v": 2}
    assert updated["fullDocument"] == {"_id": "e1", "v": 2}


def next_change(stream: ChangeStream[Document], timeout: float = 10.0) -> Document:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        change = stream.try_next()
        if change is not None:
            return change
    pytest.fail(f"no change stream event within {timeout}s")
