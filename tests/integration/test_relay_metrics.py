"""Metrics, /healthz and /readyz of a running relay, scraped for real."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest

from relay.settings import RelaySettings
from tests.support.kafka import TopicReader, create_topics, unique_topic
from tests.support.ledger import Ledger
from tests.support.relays import RelayThread, wait_for
from tests.support.writers import SequencedWriter

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening (yet)
        return 0, str(exc)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def labelled(text: str, name: str) -> dict[str, float]:
    """A labelled gauge's samples by its one label's value: `name{label="3"} 7.0` -> {"3": 7}."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            samples[labels.split('="', 1)[1].rsplit('"}', 1)[0]] = float(value)
    return samples


def relay_settings(db_url: str, bootstrap: str, port: int) -> RelaySettings:
    return RelaySettings(source="postgres-poll", db_url=db_url, kafka_bootstrap=bootstrap,
                         poll_interval=0.2, metrics_port=port)


def test_metrics_count_published_events_and_latency(db_url: str, kafka_bootstrap: str) -> None:
    topic = unique_topic("metrics")
    create_topics(kafka_bootstrap, topic)
    ledger = Ledger()
    SequencedWriter(topic, ledger).write_many(db_url, keys=3, per_key=10)
    port = free_port()
    reader = TopicReader(kafka_bootstrap, topic)
    with RelayThread(relay_settings(db_url, kafka_bootstrap, port)):
        reader.read_ids(ledger.committed_ids)
        wait_for(lambda: metric(get(port, "/metrics")[1],
                                f'outbox_events_published_total{{topic="{topic}"}}') == 30,
                 30, "the published counter")
        status, text = get(port, "/metrics")
        assert status == 200
        assert metric(text, "outbox_commit_to_kafka_seconds_count") == 30
        assert metric(text, "outbox_backlog_events") == 0
        assert metric(text, "outbox_relay_leader") == 1
        assert get(port, "/healthz") == (200, "ok\n")
        status, body = get(port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
    reader.close()


@pytest.mark.fault
@pytest.mark.slow
def test_readiness_drops_while_the_broker_is_stopped_and_returns(
    db_url: str, private_kafka: Any
) -> None:
    bootstrap = private_kafka.start()["OUTBOX_KAFKA_BOOTSTRAP"]
    port = free_port()

    def ready() -> bool:
        return get(port, "/readyz")[0] == 200

    with RelayThread(relay_settings(db_url, bootstrap, port)):
        wait_for(ready, 30, "the relay to be ready")
        private_kafka.stop()
        wait_for(lambda: not ready(), 60, "readiness to drop without a broker")
        assert get(port, "/healthz")[0] == 200  # alive, just not ready
        private_kafka.start()
        wait_for(ready, 90, "readiness to come back with the broker")


def test_backlog_gauge_counts_pending_events(db_url: str, kafka_bootstrap: str) -> None:
    import outbox

    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, outbox.Event("NoRelay", "1", "E"), outbox.Event("NoRelay", "2", "E"))
        conn.commit()
    from relay.poll.relay import PollConfig, poll_gauges

    gauges = poll_gauges(PollConfig(db_url=db_url))
    assert gauges["backlog_events"]() == 2
    age = gauges["oldest_pending_age_seconds"]()
    assert age is not None and age >= 0


def test_wal_relay_has_the_backlog_gauges_in_table_mode_only(db_url: str) -> None:
    import outbox
    from outbox.names import SchemaNames
    from relay.wal.relay import WalRelayConfig, wal_gauges
    from relay.wal.source import WalSourceConfig

    with psycopg.connect(db_url) as conn:
        outbox.publish(conn, outbox.Event("NoRelay", "1", "E"))
        conn.commit()
    table = wal_gauges(WalRelayConfig(db_url=db_url, names=SchemaNames(),
                                      source=WalSourceConfig(slot="absent", publication="absent")))
    assert table["backlog_events"]() == 1
    age = table["oldest_pending_age_seconds"]()
    assert age is not None and age >= 0
    table_less = wal_gauges(WalRelayConfig(
        db_url=db_url, names=SchemaNames(),
        source=WalSourceConfig(slot="absent", publication="absent", table=None)))
    assert "backlog_events" not in table_less


def test_readiness_holds_through_a_drain_longer_than_the_stall_window(
    db_url: str, kafka_bootstrap: str
) -> None:
    """Progress is acknowledgements moving: a relay draining a backlog for longer than the stall
    window is ready all along (it used to need being fully caught up)."""
    import outbox

    topic = unique_topic("drain")
    create_topics(kafka_bootstrap, topic)
    events = 60_000
    with psycopg.connect(db_url) as conn:
        for start in range(0, events, 5_000):
            outbox.publish(conn, *[outbox.Event("Drain", str(n % 100), "E", topic=topic)
                                   for n in range(start, start + 5_000)])
        conn.commit()
    port = free_port()
    window = 0.5
    settings = RelaySettings(
        source="postgres-poll", db_url=db_url, kafka_bootstrap=kafka_bootstrap,
        poll_interval=0.2, metrics_port=port, batch_size=100, stall_timeout=window)
    scrapes: list[tuple[float, int, dict[str, Any]]] = []
    with RelayThread(settings):
        wait_for(lambda: get(port, "/readyz")[0] == 200, 30, "the relay to be ready")
        while True:
            status, body = get(port, "/readyz")
            detail = json.loads(body)
            scrapes.append((time.monotonic(), status, detail))
            assert status == 200, f"not ready during the drain: {detail}"
            if metric(get(port, "/metrics")[1], "outbox_backlog_events") == 0:
                break
    busy = [at for at, _, detail in scrapes if detail["in_flight"] > 0]
    assert busy and busy[-1] - busy[0] > 2 * window, (
        "the drain was too short to outlast the stall window; make the backlog larger")


def test_readiness_reports_a_stall_when_no_acknowledgement_comes() -> None:
    from relay.metrics import readiness
    from relay.stats import RelayStats

    stats = RelayStats(leader=True, source_connected=True, broker_connected=True, in_flight=5)
    stats.last_progress_at -= 10
    ready, detail = readiness(stats, stall_seconds=5)
    assert not ready and detail["stalled"] is True
    stats.delivered("t", None)  # one acknowledgement is progress
    assert readiness(stats, stall_seconds=5)[0] is True
