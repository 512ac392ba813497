"""Commands and replies end to end: real PostgreSQL, Kafka and relay processes.

An order service sends commands in its transactions (some rolled back); an accounting service
handles them in a child process (`python -m tests.integration.test_commands`) and replies (some
fail on purpose, some keep failing until they are dead-lettered); the order service applies the
replies. The accounting consumer is SIGKILLed mid-way, right after a database commit and before
its offset commit, and restarted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pymongo.database import Database

import outbox
from outbox import commands
from outbox.consumer import AsyncConsumer, Consumer, Message, RetryPolicy
from outbox.consumer import dead_letters as dlq
from tests.conftest import copy_of_template, with_database
from tests.integration.test_consumer import committed_offsets, kafka_settings
from tests.integration.test_ops_roles import roles_for
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.mongo import db, mongo_db_url, pending_events  # noqa: F401 - fixtures
from tests.support.mongo import settings as mongo_settings
from tests.support.pg import drop_database, sqlalchemy_url
from tests.support.relays import RelayProcess, RelayThread, wait_for

pytestmark = pytest.mark.integration

COMMANDS = 500
PER_TRANSACTION = 10
DECLINED = 7  # n % DECLINED == 0: the handler replies with a Failure
BROKEN = 50  # n % BROKEN == 3: the handler raises every time: dead letter + failure reply
CRASH_AFTER_COMMITS = 5
CHILD_RETRY = RetryPolicy(tries=2, base_delay=0.05, max_delay=0.1, jitter=0.0)


@pytest.fixture
def accounting_db(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    """The accounting service's own database (the order service's is `db_url`)."""
    name = copy_of_template(pg_admin_url, pg_template, "accounting")
    yield with_database(pg_admin_url, name)
    drop_database(pg_admin_url, name)


@pytest.fixture
def topics(kafka_bootstrap: str) -> tuple[str, str]:
    """The accounting service's command topic and the order service's reply topic (and their
    dead-letter topics)."""
    names = unique_topic("accounting.commands"), unique_topic("orders.replies")
    create_topics(kafka_bootstrap, *names, *(dlq.topic_for(dlq.DEFAULT_TEMPLATE, n)
                                              for n in names), partitions=3)
    return names


# -- the accounting service (a child process) --------------------------------------------------


def authorize(conn: psycopg.Connection[Any], message: Message) -> Any:
    n = message.json()["n"]
    if n % BROKEN == 3:
        raise RuntimeError(f"the bank is unreachable for order {n}")
    conn.execute("INSERT INTO authorizations (command_id, n) VALUES (%s, %s)", [message.id, n])
    if n % DECLINED == 0:
        return commands.Failure("card declined", {"order": n})
    return {"order": n, "authorized": n * 10}


def accounting(db_url: str, bootstrap: str, topic: str, mode: str) -> None:
    """`crash`: SIGKILL right after the CRASH_AFTER_COMMITS-th database commit, before its
    offset commit; `serve`: until SIGTERM."""
    commits = 0

    def crash(messages: Sequence[Message]) -> None:
        nonlocal commits
        commits += 1
        if commits == CRASH_AFTER_COMMITS:
            import os

            os.kill(os.getpid(), signal.SIGKILL)

    consumer = Consumer(
        name="accounting", kafka=kafka_settings(bootstrap), topics=[topic], db=db_url,
        retry=CHILD_RETRY, batch_size=20, on_commit=crash if mode == "crash" else None,
    )
    consumer.command("AuthorizeCard")(authorize)
    stats = consumer.run()
    print(json.dumps({"processed": stats.processed, "duplicates": stats.duplicates}))


def spawn_accounting(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.integration.test_commands", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- the order service -----------------------------------------------------------------------------


def order_tables(db_url: str, accounting_db: str) -> None:
    with psycopg.connect(db_url) as conn:
        # No unique constraints on purpose: a reply applied twice shows up as two rows.
        conn.execute("CREATE TABLE orders (n int, command_id uuid)")
        conn.execute("CREATE TABLE applied_replies (command_id uuid, n int, outcome text,"
                     " reason text)")
    with psycopg.connect(accounting_db) as conn:
        conn.execute("CREATE TABLE authorizations (command_id uuid, n int)")


def send_orders(db_url: str, topic: str, reply_to: str) -> tuple[dict[uuid.UUID, int], set[
        uuid.UUID]]:
    """COMMANDS commands in transactions of PER_TRANSACTION, one in five rolled back; returns
    the committed commands (id -> n) and the rolled-back ids."""
    committed: dict[uuid.UUID, int] = {}
    rolled_back: set[uuid.UUID] = set()
    with psycopg.connect(db_url) as conn:
        for start in range(0, COMMANDS, PER_TRANSACTION):
            sent = {}
            for n in range(start, start + PER_TRANSACTION):
                command_id = commands.send(conn, "AuthorizeCard", {"n": n}, destination=topic,
                                           reply_to=reply_to, aggregate_type="Order",
                                           aggregate_id=str(n))
                conn.execute("INSERT INTO orders (n, command_id) VALUES (%s, %s)",
                             [n, command_id])
                sent[command_id] = n
            if (start // PER_TRANSACTION) % 5 == 4:
                conn.rollback()
                rolled_back |= sent.keys()
            else:
                conn.commit()
                committed |= sent
    return committed, rolled_back


def apply_reply(conn: psycopg.Connection[Any], reply: commands.Reply) -> None:
    conn.execute(
        "INSERT INTO applied_replies (command_id, n, outcome, reason)"
        " SELECT command_id, n, %s, %s FROM orders WHERE command_id = %s",
        [reply.outcome, reply.reason, reply.command_id])


def count(db_url: str, query: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else -1


def relay_args(db_url: str, bootstrap: str) -> list[str]:
    return ["--source", "postgres-poll", "--db", db_url, "--kafka", bootstrap,
            "--poll-interval", "0.2"]


@pytest.mark.fault
@pytest.mark.slow
def test_every_committed_command_gets_exactly_one_applied_reply_across_a_kill_9(
    db_url: str, accounting_db: str, kafka_bootstrap: str, topics: tuple[str, str],
    tmp_path: Path,
) -> None:
    command_topic, reply_topic = topics
    order_tables(db_url, accounting_db)
    committed, rolled_back = send_orders(db_url, command_topic, reply_topic)
    assert len(committed) == COMMANDS * 4 // 5 and len(rolled_back) == COMMANDS // 5

    orders = Consumer(name="orders", kafka=kafka_settings(kafka_bootstrap),
                      topics=[reply_topic], db=db_url)
    orders.reply("AuthorizeCard")(apply_reply)
    order_thread = threading.Thread(target=orders.run, name="orders-consumer", daemon=True)
    relays = [RelayProcess(*relay_args(url, kafka_bootstrap), log=tmp_path / f"relay-{i}.log")
              for i, url in enumerate((db_url, accounting_db))]
    serving: subprocess.Popen[str] | None = None
    try:
        for relay in relays:
            relay.start()
        order_thread.start()
        crashed = spawn_accounting(accounting_db, kafka_bootstrap, command_topic, "crash")
        _, stderr = crashed.communicate(timeout=120)
        assert crashed.returncode == -signal.SIGKILL, stderr
        handled_before = count(accounting_db, "SELECT count(*) FROM outbox_inbox")
        assert 0 < handled_before < len(committed), "the kill did not come mid-way"

        serving = spawn_accounting(accounting_db, kafka_bootstrap, command_topic, "serve")
        wait_for(lambda: count(db_url, "SELECT count(*) FROM applied_replies") >= len(committed),
                 90, "a reply to every committed command")
        serving.send_signal(signal.SIGTERM)
        stdout, stderr = serving.communicate(timeout=60)
        assert serving.returncode == 0, stderr
        # What the killed process had committed, but not its offsets, came again: skipped.
        assert json.loads(stdout.strip().splitlines()[-1])["duplicates"] >= 1
        # Every reply the accounting service wrote is in Kafka, and the order service has
        # read its topic to the end.
        wait_for(lambda: count(accounting_db, "SELECT count(*) FROM outbox") == 0, 60,
                 "the accounting relay to publish every reply")
        reader = TopicReader(kafka_bootstrap, reply_topic, command_topic,
                             dlq.topic_for(dlq.DEFAULT_TEMPLATE, command_topic))
        reader.read_until(lambda got: len({m.id for m in got if m.topic == reply_topic})
                          >= len(committed), timeout=60)
        in_kafka = reader.drain(quiet=1.0)
        reader.close()
        ends = Counter[int]()
        for m in in_kafka:
            if m.topic == reply_topic:
                ends[m.partition] = max(ends[m.partition], m.offset + 1)
        wait_for(lambda: committed_offsets(kafka_bootstrap, "orders", reply_topic, 3)
                 == [ends[p] for p in range(3)], 60, "the order service to read every reply")
    finally:
        orders.stop()
        order_thread.join(60)
        if serving is not None and serving.poll() is None:
            serving.kill()
            serving.wait()
        for relay in relays:
            relay.close()
    assert not order_thread.is_alive()

    # Kafka: only committed commands were sent; exactly one distinct reply per command.
    sent = {uuid.UUID(m.id) for m in in_kafka if m.topic == command_topic}
    assert sent == committed.keys()
    replies: dict[uuid.UUID, set[str]] = {}
    for m in in_kafka:
        if m.topic == reply_topic:
            replies.setdefault(uuid.UUID(m.headers["correlation_id"]), set()).add(m.id)
    assert replies.keys() == committed.keys()
    assert all(len(ids) == 1 for ids in replies.values())

    # The order service applied each reply exactly once, with the right outcome.
    with psycopg.connect(db_url) as conn:
        applied = conn.execute(
            "SELECT command_id, n, outcome, reason FROM applied_replies").fetchall()
    assert len(applied) == len(committed)
    assert {row[0] for row in applied} == committed.keys()
    for command_id, n, outcome, reason in applied:
        assert committed[command_id] == n
        if n % BROKEN == 3:
            assert outcome == "failure" and "the bank is unreachable" in reason
        elif n % DECLINED == 0:
            assert (outcome, reason) == ("failure", "card declined")
        else:
            assert (outcome, reason) == ("success", None)

    # The accounting service applied each command once; the broken ones are dead-lettered
    # (unless the kill came between a failure reply's commit and its dead letter).
    with psycopg.connect(accounting_db) as conn:
        authorized = Counter(row[0] for row in conn.execute(
            "SELECT command_id FROM authorizations").fetchall())
    assert set(authorized.values()) == {1}
    assert set(authorized) == {c for c, n in committed.items() if n % BROKEN != 3}
    dead = {uuid.UUID(m.id) for m in in_kafka if m.topic != command_topic
            and m.topic != reply_topic}
    broken = {c for c, n in committed.items() if n % BROKEN == 3}
    assert dead <= broken and len(dead) >= len(broken) - 1


def test_a_command_handler_needs_the_outbox_table(db_url: str, kafka_bootstrap: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("DROP TABLE outbox")
    consumer = Consumer(name="accounting", kafka=kafka_settings(kafka_bootstrap),
                        topics=[unique_topic("c")], db=db_url)
    consumer.command("AuthorizeCard")(authorize)
    with pytest.raises(outbox.SchemaMissingError, match="outbox migrate up"):
        consumer.run(timeout=5)


def test_the_consumer_role_needs_the_writers_right_to_reply(
    db_url: str, pg_admin_url: str, kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    with roles_for(db_url, pg_admin_url) as roles:
        consumer = Consumer(name="accounting", kafka=kafka_settings(kafka_bootstrap),
                            topics=[topics[0]], db=roles.url("consumer"))
        consumer.command("AuthorizeCard")(authorize)
        with pytest.raises(outbox.ConfigurationError, match="may not INSERT into the outbox"):
            consumer.run(timeout=5)
        with psycopg.connect(db_url, autocommit=True) as owner:
            owner.execute(sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(roles.name("app")), sql.Identifier(roles.name("consumer"))))
        assert consumer.run(timeout=1).processed == 0  # starts, nothing to do


def test_a_mongo_consumer_replies_through_its_outbox_collection_once(
    db_url: str, db: Database[Any], mongo_db_url: str, kafka_bootstrap: str,  # noqa: F811
    topics: tuple[str, str],
) -> None:
    command_topic, reply_topic = topics
    with psycopg.connect(db_url) as conn:
        sent = [commands.send(conn, "AuthorizeCard", {"n": n}, destination=command_topic,
                              reply_to=reply_topic) for n in (1, 2, DECLINED)]
        conn.commit()
    db.create_collection("authorizations")

    def authorize_mongo(session: Any, message: Message) -> Any:
        n = message.json()["n"]
        db.authorizations.insert_one({"command_id": str(message.id), "n": n}, session=session)
        return commands.Failure("card declined") if n % DECLINED == 0 else {"n": n}

    def handle(group: str) -> Any:
        consumer = Consumer(name="accounting", mongo=db, topics=[command_topic],
                            kafka=kafka_settings(kafka_bootstrap, **{
                                "group.id": group, "auto.offset.reset": "earliest"}))
        consumer.command("AuthorizeCard")(authorize_mongo)
        return consumer.run(max_messages=len(sent), timeout=60)

    reader = TopicReader(kafka_bootstrap, reply_topic)
    pg_relay = RelayThread(_relay_settings(db_url, kafka_bootstrap)).start()
    mongo_relay = RelayThread(mongo_settings("mongo-poll", mongo_db_url, kafka_bootstrap,
                                             collections=("authorizations",))).start()
    try:
        assert handle("accounting").processed == len(sent)
        # Another group reads the commands again: duplicates, no second reply.
        assert handle("accounting-again").duplicates == len(sent)
        replies = reader.read_until(lambda got: len(got) >= len(sent), timeout=60)
        wait_for(lambda: pending_events(db, "authorizations") == 0, 60,
                 "the replies to leave the outbox collection")
        replies = reader.drain(quiet=1.0)
    finally:
        mongo_relay.stop()
        pg_relay.stop()
        reader.close()
    assert sorted(m.headers["correlation_id"] for m in replies) == sorted(map(str, sent))
    assert [m.headers["reply_outcome"] for m in replies].count("failure") == 1
    assert db.authorizations.count_documents({}) == len(sent)


@pytest.mark.asyncio
async def test_an_async_mongo_consumer_refuses_command_handlers(
    mongo_db_url: str, kafka_bootstrap: str  # noqa: F811
) -> None:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_db_url)
    try:
        consumer = AsyncConsumer(name="accounting", kafka=kafka_settings(kafka_bootstrap),
                                 topics=[unique_topic("c")], mongo=client.get_default_database())

        @consumer.command("AuthorizeCard")
        async def authorize_async(session: Any, message: Message) -> None:
            """Never called."""

        with pytest.raises(outbox.ConfigurationError, match="AsyncConsumer with mongo="):
            await consumer.run(timeout=5)
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_async_request_response_in_one_process(
    db_url: str, kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    """AsyncConsumer on both sides (SQLAlchemy AsyncEngine for the handler), one relay, and
    the caller awaiting its reply."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    command_topic, reply_topic = topics
    engine = create_async_engine(sqlalchemy_url(db_url))
    accounting_side = AsyncConsumer(name="accounting", kafka=kafka_settings(kafka_bootstrap),
                                    topics=[command_topic], db=engine, retry=CHILD_RETRY)
    order_side = AsyncConsumer(name="orders", kafka=kafka_settings(kafka_bootstrap),
                               topics=[reply_topic], db=db_url)

    @accounting_side.command("AuthorizeCard")
    async def authorize_async(session: AsyncSession, message: Message) -> Any:
        await session.execute(text("SELECT 1"))
        if message.json()["n"] % BROKEN == 3:
            raise RuntimeError("the bank is unreachable")
        return {"authorized": message.json()["n"] * 10}

    @order_side.reply("AuthorizeCard")
    async def noted(conn: psycopg.AsyncConnection[Any], reply: commands.Reply) -> None:
        """Nothing to apply: the caller awaits the reply."""

    relay = RelayThread(_relay_settings(db_url, kafka_bootstrap)).start()
    running = [asyncio.create_task(c.run()) for c in (accounting_side, order_side)]
    try:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            # One key: the one-way command is handled before the other, and a reply to it
            # would come first.
            one_way = await commands.send(conn, "AuthorizeCard", {"n": 5}, aggregate_id="o4",
                                          destination=command_topic)
            command_id = await commands.send(conn, "AuthorizeCard", {"n": 4}, aggregate_id="o4",
                                             destination=command_topic, reply_to=reply_topic)
            await conn.commit()
        reply = await order_side.commands.wait_for_reply(command_id, timeout=60)
        assert reply.ok and reply.json() == {"authorized": 40}
        assert reply.command_id == command_id and reply.command_type == "AuthorizeCard"
        reader = TopicReader(kafka_bootstrap, reply_topic)
        replies = reader.read_until(lambda got: len(got) >= 1, timeout=60)
        assert [m.headers["correlation_id"] for m in replies] == [str(command_id)]
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            cursor = await conn.execute(
                "SELECT event_id FROM outbox_inbox WHERE consumer = 'accounting'")
            assert {row[0] for row in await cursor.fetchall()} == {one_way, command_id}
            # A command whose handler keeps failing: a failure reply, then its dead letter.
            broken = await commands.send(conn, "AuthorizeCard", {"n": 3},
                                         destination=command_topic, reply_to=reply_topic)
            await conn.commit()
        failed = await order_side.commands.wait_for_reply(broken, timeout=60)
        assert not failed.ok and failed.reason is not None
        assert failed.reason.startswith("dead-lettered: RuntimeError: the bank is unreachable")
        dead = TopicReader(kafka_bootstrap, dlq.topic_for(dlq.DEFAULT_TEMPLATE, command_topic))
        letters = dead.read_until(lambda got: len(got) >= 1, timeout=60)
        dead.close()
        assert [m.id for m in letters] == [str(broken)]
        assert sorted(m.headers["correlation_id"] for m in reader.drain(quiet=1.0)) == sorted(
            [str(command_id), str(broken)])
        reader.close()
    finally:
        for consumer in (accounting_side, order_side):
            consumer.stop()
        await asyncio.gather(*running)
        relay.stop()
        await engine.dispose()


def _relay_settings(db_url: str, bootstrap: str) -> Any:
    from relay.settings import RelaySettings

    return RelaySettings(source="postgres-poll", db_url=db_url, kafka_bootstrap=bootstrap,
                         poll_interval=0.2)


if __name__ == "__main__":
    accounting(*sys.argv[1:5])
