"""`python -m bench`: every figure of PERFORMANCE.md for the chosen sources, as JSON and a table."""

from __future__ import annotations

import argparse
import datetime as dt
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import external, report, write_cost
from bench.env import REPO, discover, loadavg, machine
from bench.phases import Context, drain, latency, phase_database
from bench.progress import Progress
from bench.sources import SOURCES, MongoSource, PostgresSource

PHASES = ("drain", "latency", "write", "consumer")
EPILOG = """\
Services come from --db/--kafka/--mongo, else OUTBOX_DB_URL/OUTBOX_KAFKA_BOOTSTRAP/
OUTBOX_MONGO_URL, else the local stack's .local/stack.env (`make bench` starts it). Each phase
makes its own database and topics and drops them. Exit status 1 when a ledger check failed or a
phase broke; a missed target is reported, not an error. See docs/performance.md.
"""
QUICK_EVENTS = {"postgres": 2_000, "mongo": 500}


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").strip(), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=",".join(SOURCES),
                        help=f"comma-separated (default: all): {', '.join(SOURCES)}")
    parser.add_argument("--events", type=int, default=None,
                        help="backlog size (default 1,000,000 for PostgreSQL, 100,000 for "
                             "MongoDB; 2,000 / 500 with --quick)")
    parser.add_argument("--rates", default="200,1000,5000",
                        help="offered rates (events/s) of the latency phase (default "
                             "200,1000,5000; 200,1000 with --quick)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per offered rate, and per write-overhead case "
                             "(default 20; 1 with --quick)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated (default: all): {', '.join(PHASES)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a second or two per phase: proves the suite works")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results",
                        help="directory of the JSON results and the relays' logs "
                             "(default: bench-results/)")
    parser.add_argument("--writers", type=int, default=2,
                        help="processes writing the backlog (default 2)")
    parser.add_argument("--partitions", type=int, default=1,
                        help="partitions per topic (default 1)")
    parser.add_argument("--consumer-messages", type=int, default=None,
                        help="messages of the consumer-rate phase (default 50,000; 500 quick)")
    parser.add_argument("--relay-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the relay process, e.g. OUTBOX_BATCH_SIZE="
                             "1000 or MALLOC_ARENA_MAX=2 (repeatable; recorded in the results)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the relay with py-spy during the drain (adds overhead)")
    parser.add_argument("--db", help="PostgreSQL URL allowed to create databases")
    parser.add_argument("--kafka", help="Kafka bootstrap servers")
    parser.add_argument("--mongo", help="MongoDB URL")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    unknown = [s for s in _csv(args.source) if s not in SOURCES]
    if unknown:
        parser.error(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    unknown = [p for p in _csv(args.phases) if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    try:
        args.rate_list = [float(r) for r in _csv(args.rates)]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: numbers separated by commas")
    if any(r <= 0 for r in args.rate_list) or (args.events is not None and args.events <= 0):
        parser.error("--rates and --events must be positive")
    args.relay_env_map = {}
    for item in args.relay_env:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--relay-env {item!r}: expected KEY=VALUE")
        args.relay_env_map[key.strip()] = value
    if args.duration is None:
        args.duration = 1.0 if args.quick else 20.0
    if args.quick and args.rates == parser.get_default("rates"):
        args.rate_list = [200.0, 1000.0]
    return args


def guarded(progress: Progress, label: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A phase's result, or its error: one broken phase does not lose the others' figures."""
    try:
        return action()
    except Exception as exc:
        progress.note(f"{label}: FAILED: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _postgres(
    ctx: Context, source: PostgresSource, args: argparse.Namespace, phases: list[str]
) -> dict[str, Any]:
    events = args.events or (QUICK_EVENTS["postgres"] if args.quick else source.default_events)
    result: dict[str, Any] = {}
    if "drain" in phases:
        result["drain"] = guarded(ctx.progress, f"{source.name} drain",
                                  lambda: drain(ctx, source, events))
    skipped = result.get("drain", {})
    if "latency" in phases:
        if skipped.get("available") is False:
            result["latency"] = {"available": False, "reason": skipped["reason"]}
        else:
            result["latency"] = guarded(
                ctx.progress, f"{source.name} latency",
                lambda: latency(ctx, source, args.rate_list, args.duration))
    return result


def _mongo(ctx: Context, source: MongoSource, args: argparse.Namespace) -> dict[str, Any]:
    reason = source.unavailable(ctx.stack)
    if reason:
        return {"mongo": {"available": False, "reason": reason}}
    events = args.events or (QUICK_EVENTS["mongo"] if args.quick else source.default_events)
    ctx.progress.note(f"{source.name}: bench/mongo_drain.py with {events:,} events")
    log = ctx.run_dir / f"{source.name}-mongo-drain.log"
    timeout = 600.0 if args.quick else 3600.0
    return {"mongo": guarded(ctx.progress, f"{source.name} drain", lambda: external.mongo_drain(
        ctx.stack, source.relay_source, events, log, timeout))}


def _write_overhead(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    cases = []
    with phase_database(ctx, "write") as db:
        for mode in ("table", "message"):
            for sequence in (False, True):
                for batch in (1, 100):
                    ctx.progress.note(f"write overhead: mode={mode}, sequence={sequence}, "
                                      f"{batch} event(s) per transaction")
                    cases.append(write_cost.measure(
                        db, mode, batch, min(args.duration, 10.0), ctx.progress, sequence))
    return {"cases": cases, "loadavg": loadavg()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    phases = _csv(args.phases)
    progress = Progress(quiet=args.quiet)
    stack = discover(args.db, args.kafka, args.mongo)
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    run_dir = args.out / f"{stamp}-logs"
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(stack, run_dir, progress, partitions=args.partitions, writers=args.writers,
                  profile=args.profile, stall_timeout=60.0 if args.quick else 120.0,
                  relay_env=args.relay_env_map)
    results: dict[str, Any] = {
        "suite": "outbox-relay bench",
        "started_at": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "options": {
            "sources": _csv(args.source), "events": args.events, "rates": args.rate_list,
            "duration_s": args.duration, "phases": phases, "writers": args.writers,
            "partitions": args.partitions, "profile": args.profile,
            "relay_env": args.relay_env_map,
        },
        "machine": machine(stack),
        "loadavg_before": loadavg(),
        "logs": str(run_dir),
        "sources": {},
    }
    progress.note(f"bench: results in {args.out}, relay logs in {run_dir}")
    began = time.monotonic()
    for name in _csv(args.source):
        source = SOURCES[name]
        if isinstance(source, PostgresSource):
            if {"drain", "latency"} & set(phases):
                results["sources"][name] = _postgres(ctx, source, args, phases)
        elif "drain" in phases:
            results["sources"][name] = _mongo(ctx, source, args)
        report.write(results, args.out)  # a long run keeps what it has measured so far
    if "write" in phases:
        results["write_overhead"] = guarded(progress, "write overhead",
                                            lambda: _write_overhead(ctx, args))
    if "consumer" in phases:
        messages = args.consumer_messages or (500 if args.quick else 50_000)
        progress.note(f"consumer rate: bench/consumer_rate.py with {messages:,} messages")
        timeout = 600.0 if args.quick else 3600.0
        log = run_dir / "consumer-rate.log"
        results["consumer_rate"] = guarded(
            progress, "consumer rate",
            lambda: external.consumer_rate(stack, messages, log, timeout))
        results["consumer_rate_pipeline"] = guarded(
            progress, "consumer rate (pipeline)",
            lambda: external.consumer_rate(stack, messages, log, timeout, pipeline=True))
    results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    results["loadavg_after"] = loadavg()
    path = report.write(results, args.out)
    print(report.table(results))
    print(f"results: {path}")
    broken = report.failures(results)
    for failure in broken:
        print(f"FAILED {failure}")
    return 1 if broken else 0
