"""The relay phases: drain of a backlog, raw decode limit (WAL), latency at offered rates."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import topics
from bench.env import Stack, loadavg
from bench.ledger import Ledger, LedgerCheck, Verdict
from bench.pg import Database
from bench.procstat import CpuAccounting, CpuSnapshot
from bench.profiling import Profiler
from bench.progress import Progress, bar
from bench.relayproc import RelayProcess
from bench.sources import PostgresSource, Prepared
from bench.workload import (
    BacklogPlan,
    RatePlan,
    RateRun,
    percentiles,
    write_at_rate,
    write_backlog,
)


class PhaseError(Exception):
    """A phase could not produce its figure (the relay died, stalled, or a writer failed)."""


@dataclass
class Context:
    stack: Stack
    run_dir: Path
    progress: Progress
    partitions: int = 1
    writers: int = 2
    profile: bool = False
    stall_timeout: float = 120.0
    relay_env: dict[str, str] = field(default_factory=dict)  # extra OUTBOX_* settings, tuning
    created_topics: list[str] = field(default_factory=list)

    def accounting(self, relay: RelayProcess | None = None) -> CpuAccounting:
        pids = {"relay": relay.pid} if relay is not None else {}
        if self.stack.kafka_pid:
            pids["kafka"] = self.stack.kafka_pid
        trees = {"postgres": self.stack.postgres_pid} if self.stack.postgres_pid else {}
        return CpuAccounting(pids, trees)

    def topic(self, source: str, phase: str) -> str:
        return f"bench-{source}-{phase}-{uuid.uuid4().hex[:8]}"

    def make_topics(self, names: list[str]) -> None:
        topics.create(self.stack.kafka_bootstrap, names, self.partitions)
        self.created_topics += names


@contextlib.contextmanager
def phase_database(ctx: Context, label: str) -> Iterator[Database]:
    """A fresh database (and the topics made meanwhile) for one phase, dropped afterwards."""
    db = Database.create(ctx.stack.db_url, label)
    made = len(ctx.created_topics)
    try:
        yield db
    finally:
        db.drop()
        topics.delete(ctx.stack.kafka_bootstrap, ctx.created_topics[made:])
        del ctx.created_topics[made:]


def _start_relay(
    ctx: Context, source: PostgresSource, db: Database, prepared: Prepared, phase: str
) -> RelayProcess:
    log = ctx.run_dir / f"{source.name}-{phase}-relay.log"
    env = {**source.relay_env(db, ctx.stack, prepared), **ctx.relay_env}
    return RelayProcess([], env, log).start()


def _relay_died(relay: RelayProcess) -> PhaseError:
    code = relay.process.poll() if relay.process else None
    return PhaseError(f"the relay exited (code {code}); its log ends with:\n{relay.log_tail()}")


def _wait_for_count(
    ctx: Context,
    relay: RelayProcess,
    offsets: topics.EndOffsets,
    topic: str,
    wanted: int,
    label: str,
    timeline: list[list[float]] | None = None,
) -> None:
    """Until Kafka holds `wanted` messages of `topic`; fails if the relay dies or stalls.

    `timeline` gets a sample a second: seconds since the relay started, messages in Kafka,
    the relay's RSS (MB) and CPU seconds.
    """
    last, last_change = -1, time.monotonic()
    began, first = time.monotonic(), offsets.count(topic)
    sampled = 0.0
    while True:
        count = offsets.count(topic)
        now = time.monotonic()
        memory = relay.memory()
        if timeline is not None and (now - sampled >= 1.0 or count >= wanted):
            sampled = now
            cpu = relay.cpu_seconds()
            timeline.append([round(now - relay.started, 2), count,
                             round(memory.rss_kb / 1024, 1) if memory else -1,
                             round(cpu, 2) if cpu is not None else -1])
        if count >= wanted:
            return
        if not relay.alive():
            raise _relay_died(relay)
        if count != last:
            last, last_change = count, now
        elif now - last_change > ctx.stall_timeout:
            raise PhaseError(
                f"{label}: no progress for {ctx.stall_timeout:.0f} s at {count:,}/{wanted:,}; "
                f"relay log ends with:\n{relay.log_tail()}")
        rss = f"  relay RSS {memory.rss_kb / 1024:.0f} MB" if memory else ""
        rate = (count - first) / (now - began) if now > began else 0.0
        ctx.progress.update(f"{label} {bar(count, wanted)}  {rate:,.0f}/s{rss}")
        time.sleep(0.2)


# -- drain --------------------------------------------------------------------------------------


def drain(ctx: Context, source: PostgresSource, events: int) -> dict[str, Any]:
    """Backlog with the relay stopped, then the relay starts: time to the last Kafka ack."""
    with phase_database(ctx, f"{source.name}-drain") as db:
        topic = ctx.topic(source.name, "drain")
        ctx.make_topics([topic])
        prepared = source.prepare(db, raw_decode=source.wal)
        reason = source.unavailable(db, ctx.stack, prepared)
        if reason and not prepared.raw_slot:
            return {"available": False, "reason": reason}
        # Without a WAL relay, the raw decode limit is still the server's figure (and the
        # relay's target): it is measured all the same.
        result: dict[str, Any] = {"available": not reason, "events": events, "topic": topic}

        ctx.progress.note(f"{source.name}: writing a backlog of {events:,} events "
                          f"(10 per transaction, {ctx.writers} writers), relay stopped")
        # A few rolled-back transactions: their events must never reach Kafka.
        rollback_every = 1000 if events >= 100_000 else 20
        backlog = write_backlog(
            BacklogPlan(db.url, topic, events, writers=ctx.writers, mode=source.write_mode,
                        rollback_every=rollback_every),
            lambda n: ctx.progress.update(f"backlog {bar(n, events)}"),
        )
        result["backlog"] = backlog.as_dict()
        source.after_backlog(db, prepared)
        result["loadavg_before"] = loadavg()

        if prepared.raw_slot:
            result["raw_decode"] = raw_decode(ctx, db, prepared, events, binary=True)
        if prepared.raw_slot_text:
            result["raw_decode_text"] = raw_decode(ctx, db, prepared, events, binary=False)
        if reason:
            return {**result, "reason": reason}

        ctx.progress.note(f"{source.name}: draining {events:,} events")
        relay = _start_relay(ctx, source, db, prepared, "drain")
        try:
            accounting = ctx.accounting(relay)
            start = accounting.snapshot()
            profiler = (
                Profiler(relay.pid, ctx.run_dir / f"{source.name}-drain.pyspy.txt").start()
                if ctx.profile else None)
            offsets = topics.EndOffsets(ctx.stack.kafka_bootstrap)
            timeline: list[list[float]] = []
            try:
                _wait_for_count(ctx, relay, offsets, topic, events, "drain", timeline)
            finally:
                offsets.close()
            kafka_done = time.monotonic()
            acknowledged_after = _wait_acknowledged(source, db, prepared, relay)
            end = accounting.snapshot()
            cpu_s, memory = relay.cpu_seconds(), relay.memory()
            if profiler is not None:
                result["profile"] = profiler.stop()
        finally:
            exit_code = relay.stop()
        result["loadavg_after"] = loadavg()

        ctx.progress.note(f"{source.name}: reading {topic} back for the ledger check")
        verdict, first, last = read_back(ctx, topic, backlog.ledger)
        result["ledger"] = verdict.as_dict()
        elapsed = last / 1000 - relay.started_wall
        result["drain"] = {
            "events_per_s": round(events / elapsed),
            "elapsed_s": round(elapsed, 2),
            # From the first to the last ack: the rate without the relay's start-up.
            "steady_events_per_s": round((events - 1) / ((last - first) / 1000))
            if last > first else None,
            "first_ack_after_s": round(first / 1000 - relay.started_wall, 2),
            "kafka_done_seen_after_s": round(kafka_done - relay.started, 2),
            "source_acknowledged_after_s": acknowledged_after,
            "relay_peak_rss_mb": round(memory.peak_rss_kb / 1024, 1) if memory else None,
            "relay_cpu_s": round(cpu_s, 2) if cpu_s is not None else None,
            "relay_cpu_us_per_event": round(cpu_s / events * 1e6, 1) if cpu_s else None,
            "relay_exit_code": exit_code,
            "cpu_s": CpuAccounting.between(start, end),
            "timeline": {"columns": ["s", "in_kafka", "relay_rss_mb", "relay_cpu_s"],
                         "samples": timeline},
        }
        # Against binary mode (the relay's format): the target's reference; text mode beside it.
        for key, figure in (("raw_decode", "fraction_of_raw_decode"),
                            ("raw_decode_text", "fraction_of_raw_decode_text")):
            raw_rate = result.get(key, {}).get("events_per_s")
            if raw_rate:
                result["drain"][figure] = round(events / elapsed / raw_rate, 3)
        return result


def read_back(ctx: Context, topic: str, ledger: Ledger) -> tuple[Verdict, int, int]:
    """A drain's topic read back: the ledger's verdict, the first and last log-append times
    (ms)."""
    check = LedgerCheck(ledger)
    first = last = None
    for message in topics.read_all(ctx.stack.kafka_bootstrap, topic):
        check.see(message.event_id, message.key, message.seq)
        first = message.append_ms if first is None else min(first, message.append_ms)
        last = message.append_ms if last is None else max(last, message.append_ms)
    if first is None or last is None:
        raise PhaseError(f"the drain topic {topic} is empty")
    return check.verdict(), first, last


def _wait_acknowledged(
    source: PostgresSource, db: Database, prepared: Prepared, relay: RelayProcess,
    timeout: float = 120.0,
) -> float | None:
    """Seconds from the relay's start until its source recorded the last ack (None: not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and relay.alive():
        if source.acknowledged(db, prepared):
            return round(time.monotonic() - relay.started, 2)
        time.sleep(0.25)
    return None


# -- raw decode limit ---------------------------------------------------------------------------


def _pg_bin(program: str, server_version: int) -> str | None:
    """The client program of the server's major version, else the newest one, else PATH."""
    major = server_version // 10000
    found = sorted(glob.glob(f"/usr/lib/postgresql/{major}/bin/{program}")) or sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{program}"))
    return found[-1] if found else shutil.which(program)


def raw_decode(
    ctx: Context, db: Database, prepared: Prepared, events: int, *, binary: bool
) -> dict[str, Any]:
    """The backlog read by pg_recvlogical (pgoutput) into /dev/null, up to the end LSN: the
    most the server hands any WAL client; the WAL relay's drain is reported against it.

    `binary`: columns in binary send format (`-o binary=true`), as the relay asks for them;
    the server skips the output functions, so this is the relay's reference. Text mode (the
    default of pgoutput) is measured beside it on its own slot.
    """
    slot = prepared.raw_slot if binary else prepared.raw_slot_text
    assert slot and prepared.publication and prepared.end_lsn
    mode = "binary" if binary else "text"
    with db.connect() as conn:
        program = _pg_bin("pg_recvlogical", conn.info.server_version)
    if program is None:
        return {"available": False, "reason": "pg_recvlogical not found (PostgreSQL client)"}
    params = psycopg.conninfo.conninfo_to_dict(db.url)
    command = [
        program, "--no-loop", "--start", "--slot", slot,
        "--endpos", prepared.end_lsn, "--fsync-interval", "0", "--file", "-",
        "-h", str(params.get("host", "127.0.0.1")), "-p", str(params.get("port", 5432)),
        "-U", str(params.get("user", "")), "-d", str(params["dbname"]),
        "-o", "proto_version=1", "-o", f"publication_names={prepared.publication}",
        "-o", "messages=true", *(["-o", "binary=true"] if binary else []),
    ]
    env = {**os.environ, "PGPASSWORD": str(params.get("password", ""))}
    ctx.progress.note(
        f"raw decode ({mode}): pg_recvlogical reads the backlog up to {prepared.end_lsn}")
    accounting = ctx.accounting()
    start = accounting.snapshot()
    began = time.monotonic()
    log = ctx.run_dir / f"pg_recvlogical-{mode}.log"
    with log.open("ab") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    # wait4, not wait: its resource usage is pg_recvlogical's own CPU time.
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    # Let the postmaster reap the WAL sender, so its CPU time is counted (as a reaped child).
    time.sleep(0.5)
    end = accounting.snapshot()
    if process.returncode != 0:
        tail = log.read_text(errors="replace").strip()[-500:]
        raise PhaseError(f"pg_recvlogical failed ({process.returncode}): {tail}")
    return {
        "events_per_s": round(events / elapsed),
        "elapsed_s": round(elapsed, 2),
        "pg_recvlogical_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "cpu_s": CpuAccounting.between(start, end),
        "mode": mode,
        "options": f"proto_version=1, messages=true, {mode} mode",
    }


# -- latency ------------------------------------------------------------------------------------


@dataclass
class _RateResult:
    run: RateRun
    processes: int
    relay_cpu_s: float | None
    cpu: dict[str, float]


def latency(
    ctx: Context, source: PostgresSource, rates: list[float], duration: float
) -> dict[str, Any]:
    """Commit-to-Kafka latency at offered rates: log-append time minus the writer's commit."""
    with phase_database(ctx, f"{source.name}-latency") as db:
        names = {rate: ctx.topic(source.name, f"lat{rate:g}") for rate in rates}
        warm = ctx.topic(source.name, "warmup")
        ctx.make_topics([warm, *names.values()])
        prepared = source.prepare(db, raw_decode=False)
        reason = source.unavailable(db, ctx.stack, prepared)
        if reason:
            return {"available": False, "reason": reason}
        relay = _start_relay(ctx, source, db, prepared, "latency")
        offsets = topics.EndOffsets(ctx.stack.kafka_bootstrap)
        measured: dict[float, _RateResult] = {}
        try:
            accounting = ctx.accounting(relay)
            # Warm-up: the relay is connected and has published before the clock matters.
            warmup = write_at_rate(RatePlan(db.url, warm, 100, 1.0, mode=source.write_mode))
            _check_writers(warmup)
            _wait_for_count(ctx, relay, offsets, warm, len(warmup.commits), "warm-up")
            # Connected, published, idle: what the relay's code and libraries take on their own.
            idle = relay.memory()
            for rate in rates:
                ctx.progress.note(
                    f"{source.name}: offering {rate:,.0f} events/s for {duration:g} s")
                start: CpuSnapshot = accounting.snapshot()
                cpu_before = relay.cpu_seconds()
                plan = RatePlan(db.url, names[rate], rate, duration, mode=source.write_mode)
                if rate / plan.per_transaction >= 500:
                    plan = dataclasses.replace(plan, processes=2)
                run = write_at_rate(plan)
                _check_writers(run)
                _wait_for_count(ctx, relay, offsets, names[rate], len(run.commits), "latency")
                cpu_after = relay.cpu_seconds()
                relay_cpu = (
                    cpu_after - cpu_before
                    if cpu_after is not None and cpu_before is not None else None)
                cpu = CpuAccounting.between(start, accounting.snapshot())
                measured[rate] = _RateResult(run, plan.processes, relay_cpu, cpu)
            memory = relay.memory()
        finally:
            offsets.close()
            exit_code = relay.stop()
        results = [_latency_figures(ctx, measured[rate]) for rate in rates]
        return {
            "available": True,
            "rates": results,
            "duration_s": duration,
            "relay_peak_rss_mb": round(memory.peak_rss_kb / 1024, 1) if memory else None,
            "relay_idle_rss_mb": round(idle.rss_kb / 1024, 1) if idle else None,
            "relay_exit_code": exit_code,
        }


def _check_writers(run: RateRun) -> None:
    if run.errors:
        raise PhaseError("writer failed: " + "; ".join(run.errors[:3]))


def _latency_figures(ctx: Context, measured: _RateResult) -> dict[str, Any]:
    run = measured.run
    achieved = run.achieved_rate
    check = LedgerCheck(run.ledger)
    latencies: list[float] = []
    by_second: dict[int, list[float]] = {}
    for message in topics.read_all(ctx.stack.kafka_bootstrap, run.topic):
        check.see(message.event_id, message.key, message.seq)
        committed = run.commits.pop(message.event_id, None)  # first delivery only
        if committed is not None:
            latency_ms = message.append_ms - committed * 1000
            latencies.append(latency_ms)
            by_second.setdefault(int(committed - run.started_wall), []).append(latency_ms)
    found = percentiles(latencies, (50, 95, 99))
    # Per second of the run: is the tail spread out, or a few bad moments (a stall, a burst)?
    seconds = [
        [second, len(values), round(percentiles(values, (50,))["p50"], 1), round(max(values), 1)]
        for second, values in sorted(by_second.items())]
    wall = measured.cpu.get("wall_s") or run.elapsed_s
    return {
        "offered_rate": run.offered_rate,
        "achieved_rate": round(achieved, 1),
        "events_per_transaction": run.per_transaction,
        "writer_processes": measured.processes,
        "events": len(latencies),
        "late_transactions": run.late_transactions,
        "max_behind_schedule_ms": round(run.max_behind_s * 1000, 1),
        **{f"{name}_ms": round(value, 1) for name, value in found.items()},
        "max_ms": round(max(latencies), 1) if latencies else None,
        "mean_ms": round(sum(latencies) / len(latencies), 1) if latencies else None,
        "per_second": {"columns": ["s", "events", "p50_ms", "max_ms"], "samples": seconds},
        "relay_cpu_fraction": round(measured.relay_cpu_s / wall, 3)
        if measured.relay_cpu_s is not None and wall else None,
        "cpu_s": measured.cpu,
        "loadavg": loadavg(),
        "ledger": check.verdict().as_dict(),
    }
