"""The sharded drain phase: 1, 2 and 3 relays (`outbox relay --shards`) drain the same backlog of
a sharded outbox (12 shards; for the WAL relay 3 shard groups): events/s, and CPU per event of
the relay processes (all of them, from /proc), of PostgreSQL and of Kafka, for each count.

The relays start together on a backlog written while none ran; they spread the shards (groups)
among themselves while draining, as they would in production after a restart. On a machine
whose cores are all busy, more relays cannot drain faster: what they add is measured as CPU per
event (docs/performance.md, "Sharded drain").
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench import topics
from bench.phases import Context, PhaseError, phase_database, read_back
from bench.procstat import CpuAccounting
from bench.progress import bar
from bench.relayproc import RelayProcess
from bench.sources import PostgresSource, Prepared
from bench.workload import BacklogPlan, write_backlog

SHARDS = 12
GROUPS = 3  # as many as the most relays: each group's slot decodes the whole WAL again
RELAY_COUNTS = (1, 2, 3)
# Short, so that the relays' spreading settles early in a short drain (a look every 0.5 s).
LEASE = "2s"


def sharded_drain(
    ctx: Context, source: PostgresSource, events: int,
    counts: tuple[int, ...] = RELAY_COUNTS,
) -> dict[str, Any]:
    """The drain of `events` by each count of relays, on a fresh backlog each time."""
    if source.write_mode != "table":
        return {"available": False, "reason": "a sharded outbox is a table (no table-less)"}
    return {
        "available": True, "events": events, "shards": SHARDS,
        "groups": GROUPS if source.wal else None,
        "runs": [_drain_with(ctx, source, events, relays) for relays in counts],
    }


def _prepare(source: PostgresSource, db: Any) -> Prepared:
    """The outbox sharded, and for the WAL relay the shard groups' publications and slots."""
    from outbox import migrate
    from outbox.names import SchemaNames
    from relay.wal import WalSourceConfig
    from relay.wal.groups import setup_groups

    with db.connect(autocommit=False) as conn:
        migrate.up(conn, SchemaNames(), shards=SHARDS)
    prepared = Prepared()
    if source.wal:
        name = f"bench_{uuid.uuid4().hex[:8]}"
        prepared.slot = prepared.publication = name
        with db.connect() as conn:
            setup_groups(conn, WalSourceConfig(slot=name, publication=name), SHARDS, GROUPS)
    return prepared


def _drain_with(ctx: Context, source: PostgresSource, events: int, relays: int) -> dict[str, Any]:
    label = f"{source.name} sharded x{relays}"
    with phase_database(ctx, f"{source.name}-sharded{relays}") as db:
        topic = ctx.topic(source.name, f"sharded{relays}")
        ctx.make_topics([topic])
        prepared = _prepare(source, db)
        ctx.progress.note(f"{label}: writing a backlog of {events:,} events, relays stopped")
        backlog = write_backlog(
            BacklogPlan(db.url, topic, events, writers=ctx.writers, rollback_every=1000),
            lambda n: ctx.progress.update(f"backlog {bar(n, events)}"))
        source.after_backlog(db, prepared)
        env = {**source.relay_env(db, ctx.stack, prepared), "OUTBOX_SHARDS": "true",
               "OUTBOX_SHARD_LEASE": LEASE, **ctx.relay_env}
        processes = [RelayProcess([], env, ctx.run_dir / f"{source.name}-sharded{relays}-{i}.log")
                     for i in range(relays)]
        ctx.progress.note(f"{label}: draining {events:,} events")
        for process in processes:
            process.start()
        started_wall = min(process.started_wall for process in processes)
        try:
            accounting = CpuAccounting(
                {f"relay{i}": p.pid for i, p in enumerate(processes)}
                | ({"kafka": ctx.stack.kafka_pid} if ctx.stack.kafka_pid else {}),
                {"postgres": ctx.stack.postgres_pid} if ctx.stack.postgres_pid else {})
            start = accounting.snapshot()
            _wait_for_drain(ctx, processes, topic, events, label)
            end = accounting.snapshot()
            # A small backlog can drain before a late relay even started: stopped then, it
            # would die of SIGTERM instead of stopping cleanly.
            _wait_started(processes)
        finally:
            exit_codes = [process.stop() for process in processes]
        verdict, first, last = read_back(ctx, topic, backlog.ledger)
        cpu = CpuAccounting.between(start, end)
        relay_cpu = sum(cpu.get(f"relay{i}", 0.0) for i in range(relays))
        elapsed = last / 1000 - started_wall
        return {
            "relays": relays,
            "events_per_s": round(events / elapsed),
            "elapsed_s": round(elapsed, 2),
            "steady_events_per_s": round((events - 1) / ((last - first) / 1000))
            if last > first else None,
            "relay_cpu_s": round(relay_cpu, 2),
            "relay_cpu_us_per_event": round(relay_cpu / events * 1e6, 1),
            "postgres_cpu_us_per_event": round(cpu.get("postgres", 0.0) / events * 1e6, 1)
            if "postgres" in cpu else None,
            "kafka_cpu_us_per_event": round(cpu.get("kafka", 0.0) / events * 1e6, 1)
            if "kafka" in cpu else None,
            "cpu_s": cpu,
            "relay_exit_codes": exit_codes,
            "ledger": verdict.as_dict(),
        }


def _wait_for_drain(
    ctx: Context, processes: list[RelayProcess], topic: str, events: int, label: str,
) -> None:
    """Until Kafka holds every event; fails when a relay dies or nothing moves for too long."""
    offsets = topics.EndOffsets(ctx.stack.kafka_bootstrap)
    try:
        last, last_change = -1, time.monotonic()
        while (count := offsets.count(topic)) < events:
            dead = [p for p in processes if not p.alive()]
            if dead:
                raise PhaseError(f"{label}: a relay exited; its log ends with:\n"
                                 f"{dead[0].log_tail()}")
            now = time.monotonic()
            if count != last:
                last, last_change = count, now
            elif now - last_change > ctx.stall_timeout:
                raise PhaseError(f"{label}: no progress for {ctx.stall_timeout:.0f} s at "
                                 f"{count:,}/{events:,}; a relay log ends with:\n"
                                 f"{processes[0].log_tail()}")
            ctx.progress.update(f"{label} {bar(count, events)}")
            time.sleep(0.2)
    finally:
        offsets.close()


def _wait_started(processes: list[RelayProcess], timeout: float = 60.0) -> None:
    """Until every relay has claimed shards or waits as a standby (its signal handlers are in
    place by then)."""
    deadline = time.monotonic() + timeout
    for process in processes:
        while time.monotonic() < deadline and process.alive() and not any(
                f'"event": "{event}"' in process.log_tail(1000)
                for event in ("shards_claimed", "relay_standby")):
            time.sleep(0.1)
