"""Per-shard gauges of a sharded relay's metrics endpoint: each shard's backlog, the age of its
oldest pending event and whether this relay holds it, and with WAL shard groups each group's
slot. The figures are those of `outbox status` (relay/status.py reads them; nothing here
queries on its own), read once per scrape with a short-lived connection."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import psycopg

from outbox.conninfo import libpq_url
from outbox.names import SchemaNames
from relay.stats import LabelledGauge
from relay.status import Shards, SlotReport, read_groups, read_shards

Probe = Callable[[], list[LabelledGauge]]


def shard_gauges(
    shards: Shards, held: Collection[int], groups: int = 0,
    group_reports: Sequence[SlotReport] = (),
) -> list[LabelledGauge]:
    """The labelled gauges of one read. `held`: what this relay holds, shards, or with
    `groups` (WAL shard groups) groups, a shard being in group `shard % groups`."""
    owned = {report.shard for report in shards.shards
             if (report.shard % groups if groups else report.shard) in held}
    by_shard = {str(report.shard): report for report in shards.shards}
    gauges = [
        LabelledGauge("shard_backlog_events", "Unpublished events of the shard.", "shard",
                      {key: float(report.pending) for key, report in by_shard.items()}),
        LabelledGauge("shard_oldest_pending_age_seconds",
                      "Age of the shard's oldest unpublished event (0: none).", "shard",
                      {key: report.oldest_age_seconds or 0.0
                       for key, report in by_shard.items()}),
        LabelledGauge("shard_held", "1 when this relay holds the shard's lease.", "shard",
                      {key: 1.0 if report.shard in owned else 0.0
                       for key, report in by_shard.items()}),
    ]
    # A group whose slot is missing, or not yet confirmed, has no figure rather than a false 0.
    retained = {str(group): float(report.status.retained_bytes)
                for group, report in enumerate(group_reports)
                if report.status is not None and report.status.retained_bytes is not None}
    lag = {str(group): float(report.lag_bytes) for group, report in enumerate(group_reports)
           if report.lag_bytes is not None}
    if group_reports:
        gauges += [
            LabelledGauge("shard_group_retained_wal_bytes",
                          "WAL the shard group's slot keeps on the server.", "group", retained),
            LabelledGauge("shard_group_lag_bytes",
                          "WAL written since the shard group's confirmed position.", "group",
                          lag),
        ]
    return gauges


def shard_probe(
    db_url: str, names: SchemaNames, key: int, held: Callable[[], Collection[int]], *,
    groups: int = 0, slot: str = "",
) -> Probe:
    """The probe of a sharded relay (`key`: its leases' key; with `groups`, the WAL shard
    groups of `slot`, whose key status finds itself)."""

    def probe() -> list[LabelledGauge]:
        with psycopg.connect(libpq_url(db_url), connect_timeout=5, autocommit=True) as conn:
            shards = read_shards(conn, names, key, groups)
            reports = read_groups(conn, names, slot, groups)
        return shard_gauges(shards, held(), groups, reports)

    return probe
