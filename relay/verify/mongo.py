"""`outbox verify` for the MongoDB sources: a scratch database of its own on the same server
(its aggregates collection, and the relay's parked and state collections, all in it), writers
that embed events in documents, and the checks before anything is made."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pymongo import MongoClient
from pymongo.errors import ConnectionFailure, PyMongoError

import outbox
from outbox import mongo as outbox_mongo
from outbox.conninfo import redact
from relay.verify.plan import KafkaAccess, ScratchNames
from relay.verify.scratch import create_topic, delete_topic
from relay.verify.workload import Workload

# The collection whose documents embed the events (the relay's --collections).
COLLECTION = "aggregates"

Client = MongoClient[dict[str, Any]]


def scratch_url(url: str, database: str) -> str:
    """`url` naming `database` instead of the one it names (options and hosts kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _client(url: str) -> Client:
    return MongoClient(url, serverSelectionTimeoutMS=10_000)


def preflight(url: str, *, stream: bool) -> list[str]:
    """What stops a run on this server, one line each; empty when nothing does."""
    try:
        with _client(url) as client:
            hello = client.admin.command("hello")
    except PyMongoError as exc:
        return [f"cannot reach MongoDB: {redact(str(exc))}"]
    if stream and not hello.get("setName"):
        return ["mongo-stream needs a replica set (change streams): this server is standalone"]
    return []


class MongoScratch:
    """The topic and a database of the run's own, dropped with everything in it."""

    def __init__(self, url: str, kafka: KafkaAccess, names: ScratchNames) -> None:
        self.url = scratch_url(url, names.table)
        self.kafka = kafka
        self.names = names
        self.made: list[str] = []

    def describe(self) -> str:
        return (f"database {self.names.table} (collection {COLLECTION} and the relay's own), "
                f"topic {self.names.topic}")

    def create(self) -> None:
        self.made.append("topic")
        create_topic(self.kafka, self.names.topic)
        self.made.append("database")
        with _client(self.url) as client:
            # Made up front: a transaction (the writers' rollbacks) may not create it.
            client.get_database().create_collection(COLLECTION)

    def remove(self) -> list[str]:
        problems = []
        if "database" in self.made:
            try:
                with _client(self.url) as client:
                    client.drop_database(self.names.table)
            except PyMongoError as exc:
                problems.append(f"database {self.names.table}: {redact(str(exc))}")
        if "topic" in self.made:
            try:
                delete_topic(self.kafka, self.names.topic)
            except Exception as exc:
                problems.append(f"topic {self.names.topic}: {exc}")
        self.made.clear()
        return problems

    def leftovers(self) -> list[str]:
        """The run's database, if it is still there (tests check that it is not)."""
        with _client(self.url) as client:
            return [n for n in client.list_database_names() if n == self.names.table]


class MongoWorkload(Workload[Client]):
    """Events appended to one document per key (`with_events`: one atomic update); the
    rolled-back ones in a transaction that is aborted, the long one in a transaction that
    commits late."""

    one_key_per_transaction = True

    def __init__(self, url: str, names: ScratchNames, **plan: Any) -> None:
        super().__init__(names.topic, **plan)
        self.url = scratch_url(url, names.table)

    def _open(self) -> Client:
        return _client(self.url)

    def _close(self, handle: Client) -> None:
        handle.close()

    def _update(self, events: list[outbox.Event]) -> tuple[dict[str, Any], dict[str, Any]]:
        key = events[0].aggregate_id
        return {"_id": key}, outbox_mongo.with_events({"$inc": {"version": 1}}, *events)

    def _write(self, handle: Client, events: list[outbox.Event], rollback: bool) -> Client:
        aggregates = handle.get_database()[COLLECTION]
        where, update = self._update(events)
        if rollback:
            try:
                with handle.start_session() as session:
                    session.start_transaction()
                    aggregates.update_one(where, update, upsert=True, session=session)
                    session.abort_transaction()
            except PyMongoError:
                pass  # aborted or never begun: nothing was written either way
            self._record(events, "rolled back")
            return handle
        try:
            aggregates.update_one(where, update, upsert=True)
        except ConnectionFailure:
            self._record(events, "doubt")  # the update may have been applied
            return handle
        self._record(events, "committed")
        return handle

    def _long_transaction(self, events: list[outbox.Event], wait: Callable[[], None]) -> str:
        with self._open() as client, client.start_session() as session:
            session.start_transaction()
            where, update = self._update(events)
            client.get_database()[COLLECTION].update_one(
                where, update, upsert=True, session=session)
            wait()
            try:
                session.commit_transaction()
            except ConnectionFailure:
                return "doubt"
            except PyMongoError:
                return "rolled back"  # e.g. the server's transaction time limit ended it
        return "committed"
