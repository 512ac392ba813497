"""kill -9 of a consumer between its database commit and its offset commit; SIGTERM stops it.

The consumer runs in a child process (`python -m tests.integration.test_consumer_crash`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

from outbox.consumer import Consumer, Message
from tests.integration.test_consumer import (
    applied_rows,
    committed_offsets,
    inbox_ids,
    insert_applied_psycopg,
    kafka_settings,
    make_applied_table,
    make_topic,
    order_record,
    produce,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault]


@pytest.fixture
def applied_table(db_url: str) -> str:
    return make_applied_table(db_url)


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return make_topic(kafka_bootstrap)


def child(db_url: str, bootstrap: str, topic_name: str, mode: str) -> None:
    """The consumer process: `crash` SIGKILLs itself right after its first database commit,
    before any offset commit; `serve` runs until SIGTERM and prints its counters."""

    def crash(messages: Sequence[Message]) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    consumer = Consumer(
        name="billing", kafka=kafka_settings(bootstrap), topics=[topic_name], db=db_url,
        on_commit=crash if mode == "crash" else None,
    )
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    stats = consumer.run()
    print(json.dumps({"processed": stats.processed, "duplicates": stats.duplicates}))


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.integration.test_consumer_crash",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_between_db_commit_and_offset_commit_skips_the_redelivery(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    records = [order_record(n) for n in range(10)]
    produce(kafka_bootstrap, topic, records)
    crashed = spawn(applied_table, kafka_bootstrap, topic, "crash")
    _, stderr = crashed.communicate(timeout=120)
    assert crashed.returncode == -signal.SIGKILL, stderr
    # The transaction committed, the offset did not.
    committed_first = sorted(n for _, n in applied_rows(applied_table))
    assert committed_first and committed_first == list(range(len(committed_first)))
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [-1001]  # none stored

    consumer = Consumer(name="billing", kafka=kafka_settings(kafka_bootstrap), topics=[topic],
                        db=applied_table)
    consumer.handler("OrderCreated")(insert_applied_psycopg)
    stats = consumer.run(max_messages=10, timeout=60)
    assert stats.duplicates == len(committed_first)
    assert stats.processed == 10 - len(committed_first)
    rows = applied_rows(applied_table)
    assert sorted(n for _, n in rows) == list(range(10))  # each applied exactly once
    assert inbox_ids(applied_table, "billing") == {r.id for r in records}
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [10]


def test_sigterm_stops_the_consumer_cleanly_with_offsets_committed(
    applied_table: str, kafka_bootstrap: str, topic: str
) -> None:
    produce(kafka_bootstrap, topic, [order_record(n) for n in range(5)])
    serving = spawn(applied_table, kafka_bootstrap, topic, "serve")
    try:
        deadline = time.monotonic() + 60
        while len(applied_rows(applied_table)) < 5:
            assert time.monotonic() < deadline, "the consumer applied nothing in 60 s"
            assert serving.poll() is None, serving.stderr.read() if serving.stderr else ""
            time.sleep(0.1)
        serving.send_signal(signal.SIGTERM)
        stdout, stderr = serving.communicate(timeout=30)
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()
    assert serving.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {"processed": 5, "duplicates": 0}
    assert committed_offsets(kafka_bootstrap, "billing", topic) == [5]


if __name__ == "__main__":
    child(*sys.argv[1:5])
