"""The scratch outbox of one `outbox verify` run: created through the project's own migrations
and setup step (topic, tables, publication and slot), and every piece removed again."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from outbox import migrate
from outbox.conninfo import libpq_url, redact
from relay import queries
from relay.verify.plan import PREFIX, KafkaAccess, ScratchNames
from relay.wal import SlotInUseError, WalSourceConfig, setup, teardown

PARTITIONS = 3  # several partitions: per-key order is checked across a real spread of keys


def _admin(kafka: KafkaAccess) -> AdminClient:
    return AdminClient(kafka.client_config())


def check_broker(kafka: KafkaAccess, timeout: float = 10.0) -> str | None:
    """None if the brokers answer, else why not."""
    try:
        _admin(kafka).list_topics(timeout=timeout)
    except KafkaException as exc:
        return (f"Kafka at {kafka.bootstrap} does not answer: "
                f"{exc.args[0] if exc.args else exc}")
    return None


def create_topic(kafka: KafkaAccess, topic: str) -> None:
    """The scratch topic, once every partition has a leader (the first produce then works)."""
    admin = _admin(kafka)  # kept: its futures fail if it is collected first
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=-1)],
        operation_timeout=30)
    for future in futures.values():
        future.result(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = admin.list_topics(topic, timeout=10).topics.get(topic)
        if found is not None and found.error is None and found.partitions and all(
                p.leader >= 0 for p in found.partitions.values()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {topic} has no leader after 30 s")


def delete_topic(kafka: KafkaAccess, topic: str) -> None:
    """Delete the topic; one that is not there (its creation failed) is fine."""
    admin = _admin(kafka)
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if getattr(error, "code", lambda: None)() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise


class Scratch:
    """Creates the run's objects in order and remembers each one, so that `remove` takes away
    exactly what was made, however far creation got."""

    def __init__(self, db_url: str, kafka: KafkaAccess, names: ScratchNames, *, wal: bool
                 ) -> None:
        self.db_url = libpq_url(db_url)
        self.kafka = kafka
        self.names = names
        self.wal = wal
        self.made: list[str] = []  # "topic", "tables", "migrations_table", "slot"

    def describe(self) -> str:
        n = self.names
        what = [f"table {n.schema}.{n.table} (and {n.table}_parked, _relay_position, _inbox)",
                f"topic {n.topic}"]
        if self.wal:
            what.append(f"slot and publication {n.slot}")
        return ", ".join(what)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.db_url, autocommit=True, connect_timeout=10)

    def create(self) -> None:
        # The topic first: a broker that refuses it leaves nothing behind in the database.
        self.made.append("topic")  # before: a topic made but without leaders is removed too
        create_topic(self.kafka, self.names.topic)
        schema_names = self.names.schema_names
        with self.connect() as conn:
            tracking = queries.query("catalog.sql", "table_exists", schema_names)
            had_tracking = bool((conn.execute(tracking, {
                "table": schema_names.qualified(schema_names.migrations_table).as_string(conn),
            }).fetchone() or [False])[0])
            conn.autocommit = False
            # migrate.up applies everything in one transaction: made in full, or not at all.
            migrate.up(conn, schema_names)
            self.made.append("tables")
            if not had_tracking:
                self.made.append("migrations_table")
            conn.autocommit = True
            if self.wal:
                setup(conn, self._wal_config())  # drops its publication if the slot fails
                self.made.append("slot")

    def _wal_config(self) -> WalSourceConfig:
        n = self.names
        return WalSourceConfig(slot=n.slot, publication=n.publication, schema=n.schema,
                               table=n.table)

    def remove(self) -> list[str]:
        """Remove what was made, newest first; each step is tried even if one before failed.
        Returns what could not be removed (with the reason), empty when all is gone."""
        problems: list[str] = []

        def attempt(what: str, action: Callable[[], None]) -> None:
            try:
                action()
            except Exception as exc:
                problems.append(f"{what}: {redact(str(exc)) or type(exc).__name__}")

        if "slot" in self.made:
            attempt(f"slot and publication {self.names.slot}", self._remove_slot)
        if "tables" in self.made:
            attempt(f"table {self.names.table}", self._remove_tables)
        if "topic" in self.made:
            attempt(f"topic {self.names.topic}", lambda: delete_topic(self.kafka, self.names.topic))
        self.made.clear()
        return problems

    def _remove_slot(self) -> None:
        schema_names = self.names.schema_names
        deadline = time.monotonic() + 30
        with self.connect() as conn:
            while True:
                # A killed relay's WAL sender holds the slot until the server notices.
                conn.execute(queries.query("verify.sql", "end_slot_sender", schema_names),
                             {"slot": self.names.slot})
                try:
                    teardown(conn, self._wal_config())
                    return
                except SlotInUseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def _remove_tables(self) -> None:
        names = self.names.schema_names

        def q(name: str) -> Any:
            return queries.query("verify.sql", name, names)

        with self.connect() as conn, conn.transaction():
            conn.execute(q("drop_tables"))
            conn.execute(q("drop_notify_function"))
            conn.execute(q("forget_migrations"), {"target": names.table})
            if "migrations_table" in self.made:
                left = conn.execute(q("migrations_left")).fetchone()
                if left is not None and left[0] == 0:
                    conn.execute(q("drop_migrations_table"))


def leftovers(conn: psycopg.Connection[Any], schema: str = "public") -> list[str]:
    """Tables, slots and publications of verify runs still in this database (a verify process
    that was itself killed with SIGKILL cannot clean up); their names start with PREFIX."""
    names = ScratchNames(schema=schema).schema_names
    pattern = PREFIX.replace("_", r"\_") + "%"
    rows = conn.execute(queries.query("verify.sql", "scratch_tables", names),
                        {"schema": schema, "pattern": pattern}).fetchall()
    return sorted({str(row[0]) for row in rows})


def terminate_relay(conn: psycopg.Connection[Any], names: ScratchNames) -> tuple[int, int]:
    """connection-drop: end the relay's sessions; (terminated, found). Raises
    psycopg.errors.InsufficientPrivilege when the role may not."""
    row = conn.execute(queries.query("verify.sql", "terminate_relay", names.schema_names),
                       {"application_name": names.application_name}).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


