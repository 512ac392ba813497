"""Write overhead: what outbox.publish adds to a business transaction, per event."""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import psycopg

import outbox
from bench.pg import Database
from bench.progress import Progress
from bench.workload import make_event

WARMUP = 20


def _business(conn: psycopg.Connection[Any], first_id: int, count: int) -> None:
    """The application's own change: `count` new orders in one statement."""
    conn.execute(
        "INSERT INTO bench_orders (id, amount, state)"
        " SELECT i, i %% 997, 'NEW' FROM generate_series(%s::bigint, %s::bigint) AS i",
        [first_id, first_id + count - 1])


def measure(
    db: Database, mode: str, batch: int, duration: float, progress: Progress,
    sequence: bool = False,
) -> dict[str, Any]:
    """Alternate business transactions with and without `batch` events for `duration` s.

    Alternating on one connection makes drift in the machine's load hit both alike; medians keep
    a stray slow commit on the shared machine from dominating. `sequence` numbers the events
    (Outbox(sequence=True): one more statement, the counter rows of the batch's aggregates; the
    workload spreads events over 100 aggregates, so a batch of 100 bumps 100 counters).
    """
    box = outbox.Outbox(mode=mode, sequence=sequence)  # type: ignore[arg-type]
    topic = f"bench-write-{uuid.uuid4().hex[:8]}"
    slot = f"bench_write_{uuid.uuid4().hex[:8]}"
    with db.connect() as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS bench_orders"
                      " (id bigint PRIMARY KEY, amount int NOT NULL, state text NOT NULL)")
        admin.execute("TRUNCATE outbox, outbox_sequence, bench_orders")
        if mode == "message":
            # Table-less events exist only in the WAL: a slot of our own counts them back.
            admin.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [slot])
    with_events: list[float] = []
    without: list[float] = []
    publish: list[float] = []
    build: list[float] = []
    written: set[uuid.UUID] = set()
    next_id, seq = 1, 0
    with db.connect(autocommit=False) as conn:
        deadline = time.monotonic() + duration
        pairs = 0
        while pairs < WARMUP * 2 or time.monotonic() < deadline:
            pairs += 1
            measured = pairs > WARMUP
            t0 = time.perf_counter()
            _business(conn, next_id, batch)
            t1 = time.perf_counter()
            events = [make_event(topic, (seq + i) % 100, seq + i) for i in range(batch)]
            t2 = time.perf_counter()
            ids = box.publish(conn, *events)
            t3 = time.perf_counter()
            conn.commit()
            t4 = time.perf_counter()
            written.update(ids)
            next_id, seq = next_id + batch, seq + batch
            if measured:
                with_events.append(t4 - t0)
                build.append(t2 - t1)
                publish.append(t3 - t2)
            t0 = time.perf_counter()
            _business(conn, next_id, batch)
            conn.commit()
            t4 = time.perf_counter()
            next_id += batch
            if measured:
                without.append(t4 - t0)
            progress.update(f"write overhead ({mode}{', sequence' if sequence else ''}, "
                            f"{batch}/transaction): {pairs:,} pairs")
    ledger = _check(db, mode, slot, written)
    publish_median = statistics.median(publish)
    marginal = (statistics.median(with_events) - statistics.median(without)) / batch
    return {
        "mode": mode,
        "sequence": sequence,
        "events_per_transaction": batch,
        "transactions": len(with_events),
        "events": len(with_events) * batch,
        # Time inside outbox.publish (serialise, one INSERT ... unnest round trip), per event.
        "publish_us_per_event": round(publish_median / batch * 1e6, 1),
        "publish_call_events_per_s": round(batch / publish_median),
        "event_build_us_per_event": round(statistics.median(build) / batch * 1e6, 1),
        "transaction_ms_with_events": round(statistics.median(with_events) * 1000, 3),
        "transaction_ms_without_events": round(statistics.median(without) * 1000, 3),
        # What the events add to the whole transaction (building them, publish, bigger commit).
        "marginal_us_per_event": round(marginal * 1e6, 1),
        "events_per_s": round(1 / marginal) if marginal > 0 else None,
        "ledger": ledger,
    }


def _check(db: Database, mode: str, slot: str, written: set[uuid.UUID]) -> dict[str, Any]:
    """Every id publish returned is in the outbox (table), or in the WAL (message)."""
    with db.connect() as conn:
        if mode == "message":
            row = conn.execute(
                "SELECT count(*) FROM pg_logical_slot_get_changes(%s, NULL, NULL)"
                " WHERE data LIKE 'message: transactional: 1 prefix: outbox,%%'", [slot]
            ).fetchone()
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            found = int(row[0]) if row else 0
            lost, phantom = max(0, len(written) - found), max(0, found - len(written))
        else:
            stored = {r[0] for r in conn.execute("SELECT id FROM outbox")}
            lost, phantom = len(written - stored), len(stored - written)
    return {"committed": len(written), "lost": lost, "phantom": phantom,
            "held": lost == 0 and phantom == 0}
