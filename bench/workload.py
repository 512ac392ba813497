"""The events the suite writes with outbox.publish: per-key sequence numbers, some rolled back."""

from __future__ import annotations

import json
import math
import multiprocessing
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

import psycopg

import outbox
from bench.ledger import Ledger
from relay.verify.workload import KeyRing as _KeyRing

EVENT_TYPE = "BenchEvent"


def make_event(topic: str, key: int, seq: int) -> outbox.Event:
    """A small event (a ~40-byte JSON payload); the topic doubles as the aggregate type."""
    return outbox.Event(topic, f"k{key}", EVENT_TYPE, {"seq": seq, "amount": seq % 997})


class KeyRing(_KeyRing):
    """relay.verify.workload's key ring (disjoint keys per writer, numbered in commit order),
    making the suite's events."""

    def events(self, topic: str, count: int) -> list[outbox.Event]:
        return [make_event(topic, key, seq) for key, seq in self.take(count)]


# -- the backlog: many events, written fast by several processes ---------------------------------


@dataclass(frozen=True)
class BacklogPlan:
    url: str
    topic: str
    events: int  # committed events in total; rolled-back ones come on top
    per_transaction: int = 10
    writers: int = 2
    keys: int = 1000
    mode: str = "table"  # outbox.Outbox(mode=...): "table" or "message" (table-less)
    rollback_every: int = 1000  # every n-th transaction of a writer rolls back (phantom check)


@dataclass(frozen=True)
class Backlog:
    ledger: Ledger
    events: int
    rolled_back: int
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "rolled_back_events": self.rolled_back,
            "elapsed_s": round(self.elapsed_s, 2),
            "events_per_s": round(self.events / self.elapsed_s) if self.elapsed_s else None,
        }


def _backlog_worker(
    plan: BacklogPlan, index: int, progress: SynchronizedArray[int], out: str
) -> None:
    """One writer process: its share of the events, `per_transaction` per commit."""
    share = plan.events // plan.writers + (1 if index < plan.events % plan.writers else 0)
    ring = KeyRing(index, plan.writers, plan.keys)
    box = outbox.Outbox(mode=plan.mode)  # type: ignore[arg-type]
    committed, rolled = bytearray(), bytearray()
    written = transactions = 0
    with psycopg.connect(plan.url) as conn:
        # The backlog is not what is measured: commits need not wait for the WAL flush. The rows
        # are exactly those outbox.publish writes (it is what writes them).
        conn.execute("SET synchronous_commit = off")
        conn.commit()
        while written < share:
            transactions += 1
            rollback = plan.rollback_every > 0 and transactions % plan.rollback_every == 0
            count = plan.per_transaction if rollback else min(plan.per_transaction, share - written)
            events = ring.events(plan.topic, count)
            box.publish(conn, *events)
            ids = b"".join(event.id.bytes for event in events)
            if rollback:
                conn.rollback()
                rolled += ids
            else:
                conn.commit()
                committed += ids
                written += count
                progress[index] = written
    Path(out, f"committed-{index}.bin").write_bytes(committed)
    Path(out, f"rolled-{index}.bin").write_bytes(rolled)


def _ids(data: bytes) -> list[bytes]:
    return [data[i : i + 16] for i in range(0, len(data), 16)]


def write_backlog(plan: BacklogPlan, report: Callable[[int], None]) -> Backlog:
    """Write the backlog with `plan.writers` processes; `report(events so far)` meanwhile."""
    # spawn, not fork: the parent holds librdkafka threads, which a fork would not carry.
    context = multiprocessing.get_context("spawn")
    progress = context.Array("q", plan.writers, lock=False)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as out:
        workers = [
            context.Process(
                target=_backlog_worker, args=(plan, i, progress, out), name=f"backlog-{i}")
            for i in range(plan.writers)
        ]
        for worker in workers:
            worker.start()
        try:
            while any(worker.is_alive() for worker in workers):
                report(sum(progress))
                time.sleep(0.5)
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()
        failed = [w.name for w in workers if w.exitcode != 0]
        if failed:
            raise RuntimeError(f"backlog writer(s) {', '.join(failed)} failed (see above)")
        elapsed = time.monotonic() - started
        report(sum(progress))
        ledger = Ledger()
        rolled = 0
        for i in range(plan.writers):
            committed_ids = _ids(Path(out, f"committed-{i}.bin").read_bytes())
            rolled_ids = _ids(Path(out, f"rolled-{i}.bin").read_bytes())
            ledger.add(committed_ids, rolled_ids)
            rolled += len(rolled_ids)
    return Backlog(ledger, len(ledger.committed), rolled, elapsed)


# -- offered load: events at a fixed rate, for the latency figures ------------------------------


@dataclass
class RateRun:
    topic: str
    offered_rate: float
    per_transaction: int
    commits: dict[bytes, float] = field(default_factory=dict)  # event id -> commit wall time
    ledger: Ledger = field(default_factory=Ledger)
    started_wall: float = 0.0
    elapsed_s: float = 0.0
    late_transactions: int = 0  # started more than 5 ms after their scheduled time
    max_behind_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        return len(self.commits) / self.elapsed_s if self.elapsed_s else 0.0


def per_transaction_for(rate: float) -> int:
    """One event per transaction up to 1,000/s; above that, 1,000 transactions/s carry them."""
    return max(1, math.ceil(rate / 1000))


@dataclass(frozen=True)
class RatePlan:
    url: str
    topic: str
    rate: float  # events/s offered
    duration: float
    mode: str = "table"
    processes: int = 1  # writer processes: one Python process cannot offer 1,000 commits/s here
    threads: int = 16  # per process: each mostly waits for its commit
    keys: int = 160
    rollback_every: int = 500  # every n-th transaction rolls back (phantom check)

    @property
    def per_transaction(self) -> int:
        return per_transaction_for(self.rate)

    @property
    def transactions(self) -> int:
        return max(1, round(self.duration * self.rate / self.per_transaction))


def _rate_threads(plan: RatePlan, index: int, ready: Callable[[], float], run: RateRun) -> None:
    """Writer process `index`: its threads take slots index, index + processes, ... of the
    schedule; `ready()` is called once all are connected and returns the start (monotonic)."""
    tx_rate = plan.rate / plan.per_transaction
    lock = threading.Lock()
    slots = iter(range(index, plan.transactions, plan.processes))
    box = outbox.Outbox(mode=plan.mode)  # type: ignore[arg-type]
    start: list[float] = []
    barrier = threading.Barrier(plan.threads, action=lambda: start.append(ready()))
    writers = plan.processes * plan.threads

    def writer(number: int) -> None:
        ring = KeyRing(number, writers, plan.keys)
        try:
            with psycopg.connect(plan.url) as conn:
                barrier.wait(timeout=120)
                while True:
                    with lock:
                        slot = next(slots, None)
                    if slot is None:
                        return
                    due = start[0] + slot / tx_rate
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    behind = time.monotonic() - due
                    events = ring.events(plan.topic, plan.per_transaction)
                    box.publish(conn, *events)
                    ids = [event.id.bytes for event in events]
                    if plan.rollback_every and (slot + 1) % plan.rollback_every == 0:
                        conn.rollback()
                        with lock:
                            run.ledger.add((), ids)
                        continue
                    conn.commit()
                    committed_at = time.time()
                    with lock:
                        run.ledger.add(ids)
                        for event_id in ids:
                            run.commits[event_id] = committed_at
                        if behind > 0.005:
                            run.late_transactions += 1
                        run.max_behind_s = max(run.max_behind_s, behind)
        except Exception as exc:  # reported with the run: a writer failure voids the figure
            barrier.abort()
            with lock:
                run.errors.append(f"writer {number}: {exc!r}")

    first = index * plan.threads
    workers = [threading.Thread(target=writer, args=(first + i,), name=f"rate-{first + i}")
               for i in range(plan.threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


_COMMIT = struct.Struct("<16sd")


def _rate_worker(plan: RatePlan, index: int, ready: Any, go: Any, at: Any, out: str) -> None:
    """A writer process: report ready, wait for the common start, write, save what it did."""
    run = RateRun(plan.topic, plan.rate, plan.per_transaction)

    def wait_for_start() -> float:
        ready.put(index)
        go.wait(120)
        return float(at.value)

    _rate_threads(plan, index, wait_for_start, run)
    Path(out, f"commits-{index}.bin").write_bytes(
        b"".join(_COMMIT.pack(i, t) for i, t in run.commits.items()))
    Path(out, f"rolled-{index}.bin").write_bytes(b"".join(run.ledger.rolled_back))
    Path(out, f"stats-{index}.json").write_text(json.dumps({
        "late": run.late_transactions, "behind": run.max_behind_s, "errors": run.errors}))


def write_at_rate(plan: RatePlan) -> RateRun:
    """Offer `plan.rate` events/s for `plan.duration` s on an open-loop schedule: a slow commit
    does not slow the offered load, the next transactions start on time on other threads (and,
    from 500 transactions/s, in other processes: the writer's own CPU would cap the rate).

    The commit time of an event is the wall clock when its commit returned to the writer.
    """
    run = RateRun(plan.topic, plan.rate, plan.per_transaction)
    if plan.processes == 1:
        started: list[float] = []

        def now() -> float:
            started.append(time.monotonic() + 0.05)
            run.started_wall = time.time() + 0.05
            return started[0]

        _rate_threads(plan, 0, now, run)
        run.elapsed_s = max(time.monotonic() - started[0], 1e-9) if started else 1e-9
        return run
    context = multiprocessing.get_context("spawn")
    ready, go, at = context.Queue(), context.Event(), context.Value("d", 0.0)
    with tempfile.TemporaryDirectory(prefix="bench-rate-") as out:
        workers = [
            context.Process(target=_rate_worker, args=(plan, i, ready, go, at, out),
                            name=f"rate-writer-{i}")
            for i in range(plan.processes)]
        for worker in workers:
            worker.start()
        try:
            for _ in workers:
                ready.get(timeout=120)  # every process connected: the clock starts together
            # CLOCK_MONOTONIC is one clock for every process of the machine.
            at.value = start = time.monotonic() + 0.1
            run.started_wall = time.time() + 0.1
            go.set()
            for worker in workers:
                worker.join()
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()
            ready.close()
            ready.join_thread()
        run.elapsed_s = max(time.monotonic() - start, 1e-9)
        for i, worker in enumerate(workers):
            if worker.exitcode != 0:
                run.errors.append(f"rate writer process {i} exited with {worker.exitcode}")
                continue
            for event_id, committed_at in _COMMIT.iter_unpack(
                    Path(out, f"commits-{i}.bin").read_bytes()):
                run.commits[event_id] = committed_at
            run.ledger.add(run.commits.keys(), _ids(Path(out, f"rolled-{i}.bin").read_bytes()))
            stats = json.loads(Path(out, f"stats-{i}.json").read_text())
            run.late_transactions += stats["late"]
            run.max_behind_s = max(run.max_behind_s, stats["behind"])
            run.errors += stats["errors"]
    return run


def percentiles(values: Sequence[float], points: Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of `values` (already in the unit wanted)."""
    ordered = sorted(values)
    if not ordered:
        return {}
    found = {}
    for point in points:
        rank = max(1, math.ceil(point / 100 * len(ordered)))
        found[f"p{point:g}"] = ordered[rank - 1]
    return found
