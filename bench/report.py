"""The targets of PERFORMANCE.md, and the run's results as a JSON file and a terminal table."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import plots


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[float], bool]


def at_least(value: float, unit: str) -> Target:
    return Target(f">= {value:,g} {unit}".strip(), lambda x: operator.ge(x, value))


def at_most(value: float, unit: str) -> Target:
    return Target(f"<= {value:,g} {unit}".strip(), lambda x: operator.le(x, value))


# PERFORMANCE.md, "Targets (2 cores, everything local)".
POLL_DRAIN = at_least(20_000, "events/s")
WAL_DRAIN_FRACTION = at_least(0.8, "x raw decode")
POLL_P99_AT_1K = at_most(50, "ms")
WAL_P99_AT_1K = at_most(20, "ms")
RELAY_RSS = at_most(80, "MB")
CONSUMER = at_least(10_000, "msg/s")
BATCHED_PUBLISH = at_least(50_000, "events/s")
LEDGER = Target("no loss, no phantom, order", lambda held: held > 0)


@dataclass(frozen=True)
class Row:
    subject: str
    figure: str
    measured: str
    target: str = ""
    verdict: str = ""


def _row(subject: str, figure: str, measured: str, value: float | None = None,
         target: Target | None = None) -> Row:
    if target is None:
        return Row(subject, figure, measured)
    if value is None:
        return Row(subject, figure, measured, target.text, "?")
    return Row(subject, figure, measured, target.text, "ok" if target.check(value) else "MISSED")


def _cpu_text(cpu: dict[str, Any]) -> str:
    parts = [f"{name} {cpu[name]:.0f}s" for name in ("relay", "postgres", "kafka", "bench", "other")
             if name in cpu]
    return f"busy {100 * cpu.get('machine_busy_fraction', 0):.0f}% of the machine: " + ", ".join(
        parts)


def _ledger_text(ledger: dict[str, Any]) -> str:
    state = "held" if ledger.get("held") else "BROKEN"
    extra = f", dup {ledger['dup']}" if "dup" in ledger else ""
    order = ", order kept" if ledger.get("disordered_keys") == 0 else (
        f", {ledger['disordered_keys']} keys out of order" if "disordered_keys" in ledger else "")
    return (f"{state}: {ledger.get('committed', '?'):,} committed, lost {ledger.get('lost')}, "
            f"phantom {ledger.get('phantom')}{extra}{order}")


def _source_rows(name: str, result: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    wal = name.startswith("postgres-wal")
    for phase in ("drain", "latency"):
        outcome = result.get(phase)
        if outcome is None:
            continue
        if "error" in outcome:
            rows.append(Row(name, phase, f"FAILED: {outcome['error'].splitlines()[0][:90]}",
                            verdict="FAILED"))
            continue
        if not outcome.get("available", True):
            rows.append(Row(name, phase, f"not available: {outcome['reason'][:90]}"))
            rows += _raw_rows(name, outcome)
            continue
        if phase == "drain":
            rows += _drain_rows(name, outcome, wal)
        else:
            rows += _latency_rows(name, outcome, wal)
    sharded = result.get("sharded")
    if sharded is not None:
        rows += _sharded_rows(name, sharded)
    mongo = result.get("mongo")
    if mongo is not None:
        rows += _mongo_rows(name, mongo)
    return rows


def _sharded_rows(name: str, outcome: dict[str, Any]) -> list[Row]:
    """The sharded drain (bench/sharded.py): per count of relays, the rate and CPU per event."""
    if "error" in outcome:
        return [Row(name, "sharded drain", f"FAILED: {outcome['error'].splitlines()[0][:90]}",
                    verdict="FAILED")]
    if not outcome.get("available", True):
        return [Row(name, "sharded drain", f"not available: {outcome['reason'][:90]}")]
    rows = []
    units = f"{outcome['shards']} shards" + (
        f", {outcome['groups']} groups" if outcome.get("groups") else "")
    for run in outcome["runs"]:
        figure = f"sharded drain, {run['relays']} relay(s)"
        rows.append(_row(name, figure, (
            f"{run['events_per_s']:,} events/s ({outcome['events']:,} "
            f"in {run['elapsed_s']}s, {units}); CPU us/event: relays "
            f"{run['relay_cpu_us_per_event']}, postgres {run['postgres_cpu_us_per_event']}, "
            f"kafka {run['kafka_cpu_us_per_event']}; machine busy "
            f"{run['cpu_s'].get('machine_busy_fraction')}")))
        rows.append(_row(name, f"ledger ({figure})", _ledger_text(run["ledger"]),
                         1 if run["ledger"]["held"] else 0, LEDGER))
    return rows


def _raw_rows(name: str, outcome: dict[str, Any]) -> list[Row]:
    rows = []
    for key, figure in (("raw_decode", "raw decode limit (binary)"),
                        ("raw_decode_text", "raw decode, text mode")):
        raw = outcome.get(key)
        if not raw:
            continue
        if not raw.get("events_per_s"):
            rows.append(_row(name, figure, f"not available: {raw.get('reason')}"))
            continue
        rows.append(_row(name, figure, f"{raw['events_per_s']:,} events/s (pg_recvlogical, "
                         f"{outcome['events']:,} in {raw['elapsed_s']}s)"))
    return rows


def _drain_rows(name: str, outcome: dict[str, Any], wal: bool) -> list[Row]:
    drain = outcome["drain"]
    rows = []
    measured = (f"{drain['events_per_s']:,} events/s "
                f"({outcome['events']:,} in {drain['elapsed_s']}s)")
    rows.append(_row(name, "drain rate", measured, drain["events_per_s"],
                     None if wal else POLL_DRAIN))
    if drain.get("steady_events_per_s"):
        rows.append(_row(name, "drain, first to last ack", f"{drain['steady_events_per_s']:,} "
                         f"events/s (first ack after {drain['first_ack_after_s']}s)"))
    rows += _raw_rows(name, outcome)
    if wal:
        fraction = drain.get("fraction_of_raw_decode")
        text = drain.get("fraction_of_raw_decode_text")
        rows.append(_row(name, "drain / raw decode (binary)", f"{fraction} (text mode: {text})",
                         fraction, WAL_DRAIN_FRACTION))
    rss = drain.get("relay_peak_rss_mb")
    rows.append(_row(name, "relay peak RSS (drain)", f"{rss} MB", rss, RELAY_RSS))
    rows.append(_row(name, "relay CPU (drain)", f"{drain['relay_cpu_s']} s "
                     f"({drain['relay_cpu_us_per_event']} us/event)"))
    rows.append(_row(name, "CPU during drain", _cpu_text(drain["cpu_s"])))
    if drain.get("source_acknowledged_after_s") is not None:
        after = drain["source_acknowledged_after_s"]
        rows.append(_row(name, "source acknowledged",
                         f"after {after}s (rows deleted / slot advanced)"))
    rows.append(_row(name, "ledger (drain)", _ledger_text(outcome["ledger"]),
                     1 if outcome["ledger"]["held"] else 0, LEDGER))
    return rows


def _latency_rows(name: str, outcome: dict[str, Any], wal: bool) -> list[Row]:
    rows = []
    for rate in outcome["rates"]:
        target = None
        if rate["offered_rate"] == 1000:
            target = WAL_P99_AT_1K if wal else POLL_P99_AT_1K
        measured = (f"p50 {rate.get('p50_ms')} / p95 {rate.get('p95_ms')} / p99 "
                    f"{rate.get('p99_ms')} ms (max {rate.get('max_ms')}; "
                    f"{rate['achieved_rate']:,.0f}/s achieved)")
        rows.append(_row(name, f"latency at {rate['offered_rate']:,.0f}/s", measured,
                         rate.get("p99_ms"), target))
        if not rate["ledger"]["held"]:
            rows.append(_row(name, f"ledger at {rate['offered_rate']:,.0f}/s",
                             _ledger_text(rate["ledger"]), 0, LEDGER))
    held = all(rate["ledger"]["held"] for rate in outcome["rates"])
    events = sum(rate["ledger"]["committed"] for rate in outcome["rates"])
    if held:
        rows.append(_row(name, "ledger (latency)", f"held: {events:,} committed, lost 0, "
                         "phantom 0, order kept", 1, LEDGER))
    rss = outcome.get("relay_peak_rss_mb")
    rows.append(_row(name, "relay peak RSS (latency)",
                     f"{rss} MB (idle after warm-up: {outcome.get('relay_idle_rss_mb')} MB)",
                     rss, RELAY_RSS))
    return rows


def _mongo_rows(name: str, outcome: dict[str, Any]) -> list[Row]:
    if "error" in outcome:
        return [Row(name, "drain", f"FAILED: {outcome['error'].splitlines()[0][:90]}",
                    verdict="FAILED")]
    if not outcome.get("available", True):
        return [Row(name, "drain", f"not available: {outcome.get('reason', '')[:90]}")]
    rate = outcome.get("events_per_s")
    rows = [_row(name, "drain rate", f"{rate:,} events/s ({outcome.get('events', 0):,} events, "
                 f"relay in the script's process)" if rate else json.dumps(outcome)[:90])]
    rss = outcome.get("relay_peak_rss_mb")
    if rss is not None:
        rows.append(_row(name, "relay peak RSS", f"{rss} MB", rss, RELAY_RSS))
    ledger = outcome.get("ledger")
    if isinstance(ledger, dict) and "held" in ledger:
        rows.append(_row(name, "ledger", _ledger_text(ledger), 1 if ledger["held"] else 0,
                         LEDGER))
    return rows


def rows(results: dict[str, Any]) -> list[Row]:
    found: list[Row] = []
    for name, result in results.get("sources", {}).items():
        found += _source_rows(name, result)
    write = results.get("write_overhead")
    if write is not None:
        if "error" in write:
            found.append(Row("outbox.publish", "write overhead", f"FAILED: {write['error'][:90]}",
                             verdict="FAILED"))
        for case in write.get("cases", []):
            batched = case["events_per_transaction"] > 1 and case["mode"] == "table"
            measured = (f"{case['events_per_s']:,} events/s ({case['marginal_us_per_event']} "
                        f"us/event added; publish call {case['publish_us_per_event']} us/event)")
            found.append(_row(
                f"outbox.publish ({case['mode']}{', sequence' if case.get('sequence') else ''})",
                f"{case['events_per_transaction']} per transaction", measured,
                case["events_per_s"], BATCHED_PUBLISH if batched else None))
            if not case["ledger"]["held"]:
                found.append(_row("outbox.publish", "ledger", _ledger_text(case["ledger"]), 0,
                                  LEDGER))
    for key, subject in (("consumer_rate", "consumer"),
                         ("consumer_rate_pipeline", "consumer (pipeline)")):
        consumer = results.get(key)
        if consumer is None:
            continue
        if "error" in consumer:
            found.append(Row(subject, "rate", f"FAILED: {consumer['error'][:90]}",
                             verdict="FAILED"))
        elif not consumer.get("available", True):
            found.append(Row(subject, "rate", f"not available: {consumer['reason']}"))
        else:
            rate = consumer.get("steady_messages_per_s") or consumer.get("messages_per_s")
            found.append(_row(subject, "idempotent consumer", f"{rate:,} msg/s "
                              f"({consumer.get('messages_per_s'):,} incl. group join)",
                              rate, CONSUMER))
            found.append(_row(subject, "ledger", _ledger_text(consumer["ledger"]),
                              1 if consumer["ledger"]["held"] else 0, LEDGER))
    return found


def table(results: dict[str, Any]) -> str:
    found = rows(results)
    headers = Row("subject", "figure", "measured", "target", "")
    widths = [max(len(getattr(r, f)) for r in [headers, *found])
              for f in ("subject", "figure", "measured", "target", "verdict")]

    def line(row: Row) -> str:
        cells = (row.subject, row.figure, row.measured, row.target, row.verdict)
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    machine = results.get("machine", {})
    head = (f"outbox-relay benchmark, {results.get('started_at')}  "
            f"{machine.get('cpu_model')} x{machine.get('cpus')}, {machine.get('memory_mb')} MB, "
            f"PostgreSQL {machine.get('postgresql')}, Kafka {machine.get('kafka')}, "
            f"{machine.get('python')}, commit {str(machine.get('git_commit'))[:10]}"
            f"{' (dirty)' if machine.get('git_dirty') else ''}, "
            f"compiled hot path {'on' if machine.get('relay_native') else 'off'}")
    load = f"load average before/after: {results.get('loadavg_before')} / " \
           f"{results.get('loadavg_after')}"
    rule = "-" * min(160, sum(widths) + 8)
    lines = [head, load]
    if results.get("quick"):
        lines.append("--quick: sizes too small for the figures to mean anything; this run proves "
                     "the suite works and the ledgers hold")
    lines += [rule, line(headers), rule, *map(line, found), rule]
    for name, result in results.get("sources", {}).items():
        profile = result.get("drain", {}).get("profile")
        if profile and profile.get("samples"):
            lines.append(f"{name}: where the relay spends the drain (py-spy, idle included, "
                         f"{profile['samples']} samples, {profile['file']})")
            lines += [f"  {pct:5.1f}% self   {fn}" for fn, pct in profile["self_pct"][:10]]
            lines += [f"  {pct:5.1f}% total  {fn}" for fn, pct in profile["total_pct"][:10]]
    return "\n".join(lines)


def failures(results: dict[str, Any]) -> list[str]:
    """Broken ledgers and failed phases: these make the run fail (a missed target does not)."""
    return [f"{r.subject}: {r.figure}: {r.measured}" for r in rows(results)
            if r.verdict == "FAILED" or (r.figure.startswith("ledger") and r.verdict != "ok")]


def write(results: dict[str, Any], out: Path) -> Path:
    """The results as `<time>-<commit>.json`, and its plots next to it (`...-drain.svg`,
    `...-latency.svg`, named in the JSON's `plots`) once there is something to draw."""
    out.mkdir(parents=True, exist_ok=True)
    commit = str(results.get("machine", {}).get("git_commit") or "nocommit")[:8]
    stamp = str(results["started_at"]).replace(":", "").replace("-", "")[:15]
    path = out / f"{stamp}-{commit}.json"
    for kind, draw in (("drain", plots.drain_svg), ("latency", plots.latency_svg)):
        svg = draw(results)
        if svg is not None:
            plot = out / f"{path.stem}-{kind}.svg"
            plot.write_text(svg)
            results.setdefault("plots", {})[kind] = plot.name
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path
