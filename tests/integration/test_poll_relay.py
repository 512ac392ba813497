"""What only the polling relay does, against real PostgreSQL and Kafka.

The guarantees every source keeps (message format, no loss, no phantom, per-key order, late
commits, parking, stop and restart, standby, keep-published) are in test_relay_contract.py.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from relay.settings import RelaySettings
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import RelayProcess, RelayThread, wait_for
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = unique_topic("poll")
    create_topics(kafka_bootstrap, name, partitions=3)
    return name


def settings(db_url: str, kafka_bootstrap: str, **overrides: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "source": "postgres-poll", "db_url": db_url, "kafka_bootstrap": kafka_bootstrap,
        "poll_interval": 0.2, **overrides,
    }
    return RelaySettings(**values)


def backlog(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
        return int(row[0]) if row else -1


@pytest.mark.fault
@pytest.mark.slow
def test_kill_9_mid_batch_then_restart_loses_nothing(
    db_url: str, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    ledger = Ledger()
    writer = SequencedWriter(topic, ledger)
    writer.write_many(db_url, keys=20, per_key=1500, per_transaction=100)  # 30,000 events
    total = len(ledger.committed_ids)
    reader = TopicReader(kafka_bootstrap, topic)
    args = ["--source", "postgres-poll", "--db", db_url, "--kafka", kafka_bootstrap,
            "--batch-size", "2000"]
    relay = RelayProcess(*args, log=tmp_path / "relay.log").start()
    try:
        reader.read_until(lambda got: len(got) >= total // 4, timeout=60)
        relay.kill(signal.SIGKILL)
        assert backlog(db_url) > 0, "the relay finished before it could be killed mid-way"
        relay = RelayProcess(*args, log=tmp_path / "relay.log").start()
        reader.read_ids(ledger.committed_ids, timeout=120)
        wait_for(lambda: backlog(db_url) == 0, 60, "the backlog to be acknowledged")
        assert relay.kill(signal.SIGTERM) == 0, relay.log()
    finally:
        relay.close()
    verdict = ledger.check(reader.drain(quiet=1.0))
    reader.close()
    verdict.assert_holds()


def test_relay_refuses_to_start_without_the_schema(empty_db_url: str, kafka_bootstrap: str) -> None:
    thread = RelayThread(settings(empty_db_url, kafka_bootstrap)).start()
    with pytest.raises(outbox.OutboxError, match="outbox migrate up"):
        thread.stop()


def test_a_parked_event_rerouted_in_its_row_is_retried_by_id_from_the_cli(
    db_url: str, kafka_bootstrap: str, topic: str
) -> None:
    import subprocess
    import sys

    misrouted = outbox.Event(topic, "k", "Misrouted", {"n": 1}, topic="bad topic!")
    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, misrouted)
        conn.commit()
    with RelayThread(settings(db_url, kafka_bootstrap)):
        wait_for(lambda: backlog(db_url) == 0, 30, "the event to be parked")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay.cli", "parked", *args, "--db", db_url],
                              capture_output=True, text=True, timeout=60)

    listed = cli("list")
    assert listed.returncode == 0 and str(misrouted.id) in listed.stdout
    assert "invalid topic name" in listed.stdout
    with psycopg.connect(db_url) as conn:  # the cause is fixed: route it to a valid topic
        conn.execute("UPDATE outbox_parked SET topic = %s", [topic])
        conn.commit()
    retried = cli("retry", str(misrouted.id))
    assert retried.returncode == 0 and "re-queued 1 event" in retried.stdout
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(settings(db_url, kafka_bootstrap)):
        reader.read_ids({str(misrouted.id)})
    reader.close()
    assert "no parked events" in cli("list").stdout
