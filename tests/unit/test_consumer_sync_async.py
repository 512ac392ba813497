"""The sync and the asyncio consumer behave alike where they used to drift: a rejected commit
is logged the same way, and a wrong database or handle type is refused with the same error.
(The stores' own refusal of a wrong type is in tests/integration/test_inbox_store_contract.py.)"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine

from outbox.consumer import AsyncConsumer, Consumer, Message, RetryPolicy
from outbox.consumer.aio import AsyncDriver
from outbox.consumer.engine import Outcome
from outbox.consumer.message import Received, parse
from outbox.consumer.runner import SyncDriver
from outbox.consumer.testing import AsyncMemoryInbox, MemoryInbox, MemorySession
from outbox.errors import UnsupportedTargetError

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}
FAST = RetryPolicy(tries=1, base_delay=0.0, max_delay=0.0, jitter=0.0)
URL = "postgresql+psycopg://nobody@127.0.0.1:9/none"  # never connected to


def record(n: int) -> Received:
    headers = [("id", f"00000000-0000-0000-0000-{n + 1:012d}".encode()),
               ("event_type", b"Created")]
    return parse("Order", 0, n, str(n).encode(), b'{"n": %d}' % n, headers)


def rejected_commits(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        {key: getattr(r, key) for key in ("levelname", "event", "consumer", "error")}
        | {"message": r.getMessage()}
        for r in caplog.records if getattr(r, "event", None) == "commit_rejected"
    ]


def run_sync(items: list[Received]) -> tuple[MemoryInbox, dict[int, Outcome]]:
    store = MemoryInbox("billing")
    store.reject_commit = lambda effects: 1 in effects
    consumer = Consumer(name="billing", kafka=KAFKA, topics=["Order"], db=store, retry=FAST)

    @consumer.handler("Created")
    def handle(session: MemorySession, message: Message) -> None:
        session.add(message.json()["n"])

    report = SyncDriver(store, consumer, threading.Event()).run(items)
    return store, report.outcomes


def run_async(items: list[Received]) -> tuple[MemoryInbox, dict[int, Outcome]]:
    store = AsyncMemoryInbox("billing")
    store.inbox.reject_commit = lambda effects: 1 in effects
    consumer = AsyncConsumer(name="billing", kafka=KAFKA, topics=["Order"], db=store,
                             retry=FAST)

    @consumer.handler("Created")
    async def handle(session: MemorySession, message: Message) -> None:
        session.add(message.json()["n"])

    async def go() -> dict[int, Outcome]:
        report = await AsyncDriver(store, consumer, asyncio.Event()).run(items)
        return report.outcomes

    return store.inbox, asyncio.run(go())


def test_a_rejected_commit_is_logged_alike_by_the_sync_and_the_asyncio_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox.consumer")
    items = [record(n) for n in range(3)]
    sync_store, sync_outcomes = run_sync(items)
    sync_logs = rejected_commits(caplog)
    caplog.clear()
    async_store, async_outcomes = run_async(items)
    async_logs = rejected_commits(caplog)

    # Refused: the batch's commit, its second half's (1 and 2), then message 1's own.
    assert len(sync_logs) == 3
    assert sync_logs == async_logs
    assert sync_logs[0] == {"levelname": "WARNING", "event": "commit_rejected",
                            "consumer": "billing", "error": "RejectedCommitError: commit rejected",
                            "message": "commit rejected"}
    assert sync_outcomes == async_outcomes
    assert sync_outcomes[1] is Outcome.DEAD_LETTER
    assert sync_store.effects == async_store.effects == [0, 2]


WRONG: list[tuple[dict[str, Any], str]] = [
    ({"db": object()}, "db= must be a SQLAlchemy"),
    ({"db": 42}, "not int"),
    ({"mongo": object()}, "mongo= must be a pymongo"),
]


@pytest.mark.parametrize(("given", "match"), WRONG)
def test_a_wrong_database_type_is_refused_alike(given: dict[str, Any], match: str) -> None:
    with pytest.raises(UnsupportedTargetError, match=match) as sync_error:
        Consumer(name="b", kafka=KAFKA, topics=["Order"], **given)
    with pytest.raises(UnsupportedTargetError, match=match) as async_error:
        AsyncConsumer(name="b", kafka=KAFKA, topics=["Order"], **given)
    assert "AsyncConsumer" in str(sync_error.value)
    assert "use Consumer for synchronous" in str(async_error.value)


def test_the_other_kind_of_engine_or_store_is_refused_with_a_pointer_to_the_right_consumer(
) -> None:
    async_engine = create_async_engine(URL)
    engine = create_engine(URL)
    try:
        with pytest.raises(UnsupportedTargetError, match="AsyncEngine.*not Engine "):
            AsyncConsumer(name="b", kafka=KAFKA, topics=["Order"], db=engine)
        with pytest.raises(UnsupportedTargetError, match="use AsyncConsumer for asyncio"):
            Consumer(name="b", kafka=KAFKA, topics=["Order"], db=async_engine)
        with pytest.raises(UnsupportedTargetError, match="use Consumer for synchronous"):
            AsyncConsumer(name="b", kafka=KAFKA, topics=["Order"], db=MemoryInbox())
        with pytest.raises(UnsupportedTargetError, match="use AsyncConsumer for asyncio"):
            Consumer(name="b", kafka=KAFKA, topics=["Order"], db=AsyncMemoryInbox())
    finally:
        engine.dispose()
        asyncio.run(async_engine.dispose())

