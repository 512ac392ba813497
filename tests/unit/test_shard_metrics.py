"""Per-shard gauges of the metrics endpoint (relay/shard_metrics.py) and their rendering in the
Prometheus text format (relay/metrics.py), without a server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from relay.metrics import RelayCollector
from relay.shard_metrics import shard_gauges
from relay.stats import LabelledGauge, RelayStats
from relay.status import ShardReport, Shards, SlotReport
from relay.wal.slots import SlotStatus

SHARDS = Shards(relays=2, shards=(
    ShardReport(0, 101, None, 5, 12.5),
    ShardReport(1, 102, None, 0, None),
    ShardReport(2, 101, None, 3, 2.0),
    ShardReport(3, None, None, 7, 40.0),
))


def scrape(stats: RelayStats) -> str:
    registry = CollectorRegistry()
    registry.register(RelayCollector(stats))
    return generate_latest(registry).decode()


def slot(confirmed: int | None, retained: int | None) -> SlotStatus:
    return SlotStatus(
        slot_name="s", plugin="pgoutput", slot_type="logical", database="orders",
        temporary=False, active=True, active_pid=7, wal_status="reserved", restart_lsn=100,
        confirmed_flush_lsn=confirmed, retained_bytes=retained, safe_wal_size=None,
        two_phase=False)


def by_name(gauges: list[LabelledGauge]) -> dict[str, dict[str, float]]:
    return {gauge.name: gauge.values for gauge in gauges}


def test_each_shard_has_its_backlog_age_and_whether_this_relay_holds_it() -> None:
    gauges = by_name(shard_gauges(SHARDS, held=(0, 2)))
    assert gauges == {
        "shard_backlog_events": {"0": 5, "1": 0, "2": 3, "3": 7},
        "shard_oldest_pending_age_seconds": {"0": 12.5, "1": 0.0, "2": 2.0, "3": 40.0},
        "shard_held": {"0": 1, "1": 0, "2": 1, "3": 0},
    }


def test_a_wal_relay_holds_the_shards_of_its_groups_and_reports_each_groups_slot() -> None:
    groups = (SlotReport("g0", slot(900, 4096), current_lsn=1000),
              SlotReport("g1", None, current_lsn=1000),  # its slot is missing: no figure
              SlotReport("g2", slot(None, None), current_lsn=1000))
    gauges = by_name(shard_gauges(SHARDS, held=(1,), groups=3, group_reports=groups))
    assert gauges["shard_held"] == {"0": 0, "1": 1, "2": 0, "3": 0}
    assert gauges["shard_group_retained_wal_bytes"] == {"0": 4096}
    assert gauges["shard_group_lag_bytes"] == {"0": 100}


def test_labelled_gauges_render_one_sample_per_label_value_escaped() -> None:
    stats = RelayStats()
    stats.labelled["shards"] = lambda: shard_gauges(SHARDS, held=(3,))
    stats.labelled["odd"] = lambda: [
        LabelledGauge("odd", "A label value to escape.", "name", {'a"b\\c\nd': 1.0})]
    text = scrape(stats)
    assert 'outbox_shard_backlog_events{shard="3"} 7.0' in text
    assert 'outbox_shard_held{shard="3"} 1.0' in text
    assert 'outbox_shard_held{shard="0"} 0.0' in text
    assert 'outbox_shard_oldest_pending_age_seconds{shard="0"} 12.5' in text
    assert "# TYPE outbox_shard_backlog_events gauge" in text
    assert 'outbox_odd{name="a\\"b\\\\c\\nd"} 1.0' in text


def test_a_failing_probe_leaves_the_rest_of_the_scrape_and_an_unsharded_relay_adds_nothing(
) -> None:
    def broken() -> list[LabelledGauge]:
        raise OSError("connection refused")

    stats = RelayStats()
    assert "outbox_shard" not in scrape(stats)
    stats.labelled["shards"] = broken
    text = scrape(stats)
    assert "outbox_shard" not in text and "outbox_in_flight 0.0" in text
