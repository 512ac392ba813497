"""One `outbox verify` run: check the rights, create the scratch outbox, write, run the relay
under faults, read the topic back, judge with the ledger, and remove everything it made."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from outbox.conninfo import libpq_url, redact
from relay.doctor import try_replication_connection
from relay.verify import mongo, privileges
from relay.verify.ledger import Verdict
from relay.verify.plan import KafkaAccess, ScratchNames, VerifyPlan
from relay.verify.progress import Progress
from relay.verify.reader import TopicReader
from relay.verify.relayproc import ChildRelay, relay_environment
from relay.verify.scratch import Scratch, check_broker, terminate_relay
from relay.verify.workload import PostgresWorkload, Workload

# A relay that ends on its own this often is not being verified but restarted.
MAX_OWN_EXITS = 3

EXIT_HELD, EXIT_NOT_HELD, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class Refused(Exception):
    """`outbox verify` cannot run here; nothing was created."""


@dataclass
class Recovery:
    """One fault: from its end (restart, SIGCONT, sessions ended) until Kafka held every event
    committed before that moment and the first one committed after it (the relay is back, not
    merely done with what it had read before the fault)."""

    fault: str
    at: float  # seconds after the writers started
    ended: float = 0.0  # monotonic
    pending: set[str] = field(default_factory=set)
    next_index: int = 0  # the first event committed after the fault, in commit order
    took: float | None = None
    note: str = ""


@dataclass
class Report:
    plan: VerifyPlan
    names: ScratchNames
    verdict: Verdict | None = None
    recoveries: list[Recovery] = field(default_factory=list)
    relay_starts: int = 0
    relay_exits: list[int] = field(default_factory=list)
    relay_stop_code: int | None = None
    problems: list[str] = field(default_factory=list)  # the run could not be judged
    cleanup: list[str] = field(default_factory=list)  # what could not be removed
    interrupted: bool = False
    relay_log: Path | None = None

    @property
    def held(self) -> bool:
        return (not self.interrupted and not self.problems and self.verdict is not None
                and self.verdict.held)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_HELD if self.held else EXIT_NOT_HELD

    def reasons(self) -> list[str]:
        found = list(self.problems)
        if self.verdict is not None:
            found += self.verdict.reasons()
        return found

    def slowest(self) -> Recovery | None:
        done = [r for r in self.recoveries if r.took is not None]
        return max(done, key=lambda r: r.took or 0.0) if done else None

    def render(self) -> str:
        plan, lines = self.plan, []
        faults = ", ".join(plan.faults) or "none"
        lines.append(f"outbox verify: {plan.source}, {plan.duration:g} s at {plan.rate:g} events/s,"
                     f" faults: {faults}")
        where = (f"database {self.names.table}" if plan.mongo
                 else f"table {self.names.schema}.{self.names.table}")
        lines.append(f"  scratch: {where}, topic {self.names.topic}"
                     + (f", slot {self.names.slot}" if plan.wal else ""))
        if self.interrupted:
            lines.append("interrupted: no verdict")
        v = self.verdict
        if v is not None:
            doubt = f", {v.in_doubt} in doubt (commit interrupted)" if v.in_doubt else ""
            lines += [
                f"  committed   {v.committed:,} events ({v.rolled_back:,} rolled back{doubt})",
                f"  delivered   {v.delivered:,} messages",
                f"  lost        {v.lost:,}",
                f"  phantom     {v.phantom:,}",
                f"  duplicates  {v.dup:,} (allowed: at least once)",
                "  order       " + (f"kept for all {v.keys:,} keys" if not v.disordered_keys
                                    else f"BROKEN for {len(v.disordered_keys):,} keys"),
            ]
        lines.append(f"  relay       started {self.relay_starts} time(s)"
                     + (f", exited on its own with {self.relay_exits}" if self.relay_exits else "")
                     + (f", clean stop exit code {self.relay_stop_code}"
                        if self.relay_stop_code is not None else ""))
        for r in self.recoveries:
            took = f"recovered in {r.took:.2f} s" if r.took is not None else "not recovered"
            note = f" ({r.note})" if r.note else ""
            lines.append(f"  fault       {r.fault} at {r.at:.1f} s: {took}{note}")
        slowest = self.slowest()
        if slowest is not None:
            lines.append(f"  slowest recovery {slowest.took:.2f} s ({slowest.fault} at "
                         f"{slowest.at:.1f} s)")
        if self.cleanup:
            lines.append("  NOT removed: " + "; ".join(self.cleanup))
        else:
            lines.append("  removed everything it created")
        if not self.interrupted:
            if self.held:
                lines.append("verdict: PASS (nothing lost, nothing phantom, per-key order kept)")
            else:
                lines.append("verdict: FAIL")
                lines += [f"  - {reason}" for reason in self.reasons()]
                if self.relay_log is not None and self.relay_starts:
                    lines.append(f"  relay log kept at {self.relay_log}")
        return "\n".join(lines)


def preflight(plan: VerifyPlan, url: str, kafka: KafkaAccess, names: ScratchNames) -> None:
    """Raise Refused naming everything missing; creates nothing."""
    missing = (mongo.preflight(url, stream=plan.source == "mongo-stream") if plan.mongo
               else _postgres_missing(plan, url, names))
    broker = check_broker(kafka)
    if broker:
        missing.append(broker)
    if missing:
        raise Refused("cannot verify here, nothing was created:\n"
                      + "\n".join(f"  - {m}" for m in missing))


def _postgres_missing(plan: VerifyPlan, db_url: str, names: ScratchNames) -> list[str]:
    try:
        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=10) as conn:
            facts = privileges.gather(conn, names.schema_names)
    except psycopg.Error as exc:
        raise Refused(f"cannot connect to the database: {redact(str(exc).strip())}") from exc
    missing = privileges.missing(facts, names.schema_names, wal=plan.wal)
    if plan.wal and (facts.superuser or facts.replication):
        # The role may replicate; pg_hba.conf may still refuse the relay's connection.
        refused = try_replication_connection(db_url)
        if refused:
            missing.append(f"a replication connection to this database is refused: {refused}")
    return missing


class _Run:
    """The moving parts of one run and the loop that drives them (see `run`)."""

    def __init__(self, plan: VerifyPlan, url: str, kafka: KafkaAccess, names: ScratchNames,
                 progress: Progress, stop: threading.Event, workdir: Path) -> None:
        self.plan, self.db_url, self.kafka, self.names = plan, url, kafka, names
        self.progress, self.stop = progress, stop
        self.report = Report(plan, names)
        self.relay = ChildRelay(relay_environment(plan.source, url, kafka, names),
                                workdir / "relay.log")
        schedule: dict[str, Any] = dict(
            rate=plan.rate, duration=plan.duration, writers=plan.writers, keys=plan.keys,
            rollback_every=plan.rollback_every, long_transaction=plan.long_transaction(),
            stop=stop)
        self.workload: Workload[Any] = (
            mongo.MongoWorkload(url, names, **schedule) if plan.mongo
            else PostgresWorkload(url, names.schema, names.table, names.topic, **schedule))
        self.reader: TopicReader | None = None
        self.paused_until: float | None = None
        self.faults = plan.fault_times()

    # -- faults -----------------------------------------------------------------------------

    def _begin_recovery(self, fault: str, at: float, note: str = "") -> None:
        seen = self.reader.seen if self.reader else set()
        committed = self.workload.committed_snapshot()
        pending = {i for i in committed if i not in seen}
        self.report.recoveries.append(
            Recovery(fault, at, time.monotonic(), pending, len(committed), note=note))

    def _inject(self, fault: str, at: float) -> None:
        """Do the fault, then say so (a reader of the progress sees it done)."""
        if fault == "relay-kill":
            self.relay.kill()
            self.relay.start()
            self._begin_recovery(fault, at)
            self.progress.note(f"  {at:5.1f} s  {fault}: killed and started again")
        elif fault == "relay-stop":
            self.relay.pause()
            self.paused_until = time.monotonic() + self.plan.stop_pause()
            self.report.recoveries.append(Recovery(fault, at))  # begins at SIGCONT
            self.progress.note(f"  {at:5.1f} s  {fault}: stopped for "
                               f"{self.plan.stop_pause():.1f} s")
        else:
            note = ""
            try:
                with psycopg.connect(libpq_url(self.db_url), autocommit=True,
                                     connect_timeout=10) as conn:
                    ended, found = terminate_relay(conn, self.names)
                note = f"{ended} of {found} session(s) ended"
            except psycopg.errors.InsufficientPrivilege:
                note = ("skipped: this role may not end the relay's sessions "
                        "(needs membership of pg_signal_backend)")
            except psycopg.Error as exc:
                note = f"skipped: {redact(str(exc).strip())}"
            self._begin_recovery(fault, at, note)
            self.progress.note(f"  {at:5.1f} s  {fault}: {note}")

    def _resume_if_due(self, now: float) -> None:
        if self.paused_until is not None and now >= self.paused_until:
            self.relay.resume()
            self.paused_until = None
            stopped = self.report.recoveries[-1]
            self.report.recoveries.pop()
            self._begin_recovery(stopped.fault, stopped.at,
                                 f"stopped for {self.plan.stop_pause():.1f} s")

    def _track_recoveries(self, now: float, *, final: bool = False) -> None:
        """`final`: the writers are done and all is delivered; a fault with no event committed
        after it recovered when its pending events arrived (already counted)."""
        seen = self.reader.seen if self.reader else set()
        for recovery in self.report.recoveries:
            if recovery.took is not None or not recovery.ended:
                continue
            recovery.pending = {i for i in recovery.pending if i not in seen}
            if recovery.pending:
                continue
            following = self.workload.committed_at(recovery.next_index)
            if (following is not None and following in seen) or final:
                recovery.took = now - recovery.ended

    # -- the loop ---------------------------------------------------------------------------

    def _drained(self) -> bool:
        assert self.reader is not None
        if len(self.reader.seen) < self.workload.committed_count():
            return False
        seen = self.reader.seen
        return all(i in seen for i in self.workload.committed_snapshot())

    def _relay_state(self) -> str:
        if self.paused_until is not None:
            return "stopped"
        return "running" if self.relay.alive() else "down"

    def drive(self) -> None:
        assert self.reader is not None
        plan, workload, reader = self.plan, self.workload, self.reader
        writing_done: float | None = None
        seen_count, last_delivery = 0, time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            at = now - workload.started
            code = self.relay.exited()
            if code is not None:
                self.progress.note(f"  {at:5.1f} s  the relay exited on its own (code {code})")
                if len(self.relay.exits) >= MAX_OWN_EXITS:
                    self.report.problems.append(
                        f"the relay exited on its own {len(self.relay.exits)} times (codes "
                        f"{self.relay.exits}); its log ends with:\n{self.relay.log_tail()}")
                    return
                self.relay.start()
            self._resume_if_due(now)
            if self.faults and at >= self.faults[0][0] and self.paused_until is None:
                self._inject(self.faults.pop(0)[1], at)
            self._track_recoveries(now)
            if reader.error:
                self.report.problems.append(f"reading the topic failed: {reader.error}")
                return
            committed = workload.committed_count()
            self.progress.update(
                f"{min(at, plan.duration):5.1f}/{plan.duration:g} s  committed {committed:,}  "
                f"in Kafka {len(reader.seen):,}  behind {max(0, committed - len(reader.seen)):,}"
                f"  relay {self._relay_state()}  faults {len(self.report.recoveries)}/"
                f"{len(plan.fault_times())}")
            if workload.done() and not self.faults and self.paused_until is None:
                if writing_done is None:
                    writing_done = now
                    self.progress.note(f"  {at:5.1f} s  writers done: {committed:,} events "
                                       "committed; waiting for the relay to deliver them")
                if self._drained():
                    self._track_recoveries(time.monotonic(), final=True)
                    return
                if len(reader.seen) != seen_count:
                    seen_count, last_delivery = len(reader.seen), now
                if now - writing_done > plan.drain_timeout:
                    self.progress.note(f"  the relay did not deliver everything within "
                                       f"{plan.drain_timeout:g} s")
                    return
                if now - last_delivery > plan.stall_timeout:
                    self.progress.note(f"  nothing new reached Kafka for {plan.stall_timeout:g} "
                                       f"s with {committed - len(reader.seen):,} event(s) missing")
                    return
            self.stop.wait(0.1)

    def execute(self, scratch: Scratch | mongo.MongoScratch) -> None:
        report = self.report
        scratch.create()
        self.progress.note(f"created {scratch.describe()}")
        if self.stop.is_set():
            report.interrupted = True
            return
        self.reader = TopicReader(self.kafka, self.names.topic)
        self.reader.start()
        self.relay.start()
        self.workload.start()
        self.progress.note(f"writing {self.plan.rate:g} events/s for {self.plan.duration:g} s "
                           f"({self.workload.per_transaction} per transaction, every "
                           f"{self.plan.rollback_every}th rolled back, one long transaction); "
                           f"relay: {self.plan.source} as a child process")
        try:
            self.drive()
        finally:
            report.interrupted = self.stop.is_set()
            self.stop.set()  # writers still running (interrupted, or a problem) stop now
            self.workload.join(30)
            if self.paused_until is not None:
                self.relay.resume()
            report.relay_stop_code = self.relay.stop()
            report.relay_starts = self.relay.starts
            report.relay_exits = self.relay.exits
        report.problems += self.workload.errors
        if report.interrupted:
            return
        self.reader.finish()
        if self.reader.error:
            report.problems.append(f"reading the topic back failed: {self.reader.error}")
        if self.reader.unreadable:
            report.problems.append(f"{self.reader.unreadable} message(s) without an id header")
        report.verdict = self.workload.ledger.check(self.reader.delivered)


def run(
    plan: VerifyPlan, url: str, kafka: KafkaAccess, progress: Progress,
    stop: threading.Event,
    names: ScratchNames | None = None,
) -> Report:
    """Preflight (Refused: nothing made), then the run; everything made is removed at the end,
    also when `stop` is set (SIGINT/SIGTERM) or something fails. `url`: the PostgreSQL
    conninfo, or for the MongoDB sources the MongoDB URL."""
    names = names or ScratchNames(schema=plan.schema)
    preflight(plan, url, kafka, names)
    workdir = Path(tempfile.mkdtemp(prefix="outbox-verify-"))
    scratch = (mongo.MongoScratch(url, kafka, names) if plan.mongo
               else Scratch(url, kafka, names, wal=plan.wal))
    job = _Run(plan, url, kafka, names, progress, stop, workdir)
    try:
        job.execute(scratch)
    except Exception as exc:
        job.report.problems.append(f"the run failed: {redact(str(exc)) or type(exc).__name__}")
    finally:
        job.relay.stop()
        if job.reader is not None:
            job.reader.close()
        progress.note("removing the scratch objects")
        job.report.cleanup = scratch.remove()
    report = job.report
    if report.held or report.interrupted:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        report.relay_log = workdir / "relay.log"
    return report
