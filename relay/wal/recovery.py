"""Recovery from a lost replication slot: a new slot, and first the events it cannot send.

Why the outbox table is enough: in table mode the WAL relay removes (or marks) a row only once
Kafka acknowledged its event, and confirms the slot only after that (relay/wal/cleanup.py). So
whatever happened to the slot (dropped, invalidated by max_slot_wal_keep_size, lost in a
failover), the rows still unpublished in the table are every event that may not have reached
Kafka. A new slot is created with an exported snapshot, whose consistent point splits them in
two: those committed before it are visible in the snapshot and are published here, from the
table, by the relay core (like the polling relay); those committed after it come from the new
slot. Nothing falls between. Rows sent but not yet removed when the slot was lost are sent
again: duplicates, bounded by the relay's in-flight events; never a loss.

While a recovery runs it is recorded in the database (relay/wal/recovery_state.py): a recovery that
dies half-way leaves a new slot behind whose consistent point lies after unpublished rows, so
no relay streams from it until a recovery ran to the end (it then drops and recreates it).
Table-less mode (events only in the WAL) has no table to recover from: refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from outbox.conninfo import libpq_url, redact
from relay import queries
from relay.core.loop import RelayCore
from relay.core.ports import Refused, Sink
from relay.errors import FatalRelayError, SourceUnavailableError
from relay.poll.relay import PollConfig, PollSource, connect, row_record
from relay.published import kept_topic
from relay.sinks.kafka.sink import PublisherConfig, kafka_sink
from relay.sinks.kafka.topic_limits import TopicLimits
from relay.stats import RelayStats
from relay.wal import recovery_state, slots
from relay.wal.budget import SlotBudgetExceededError
from relay.wal.errors import (
    SlotError,
    SlotInUseError,
    SlotInvalidatedError,
    SlotMissingError,
    SlotRecoveryPendingError,
)
from relay.wal.lsn import format_lsn, parse_lsn
from relay.wal.position import Remembered
from relay.wal.relay import WalRelayConfig
from relay.wal.stream import replication_connection

log = logging.getLogger(__name__)

# How long a recovery waits for a slot's walsender to go away before calling the slot in use.
RELEASE_SECONDS = 10.0


class RecoveryRefusedError(FatalRelayError):
    """The slot cannot be recovered without losing events, or there is nothing to recover."""


class RecoveryInterrupted(SourceUnavailableError):
    """The recovery stopped before the end; it runs again (from the start) next time."""


@dataclass(frozen=True)
class Acknowledged:
    """How far the lost slot's relay had acknowledged, as it recorded (relay/wal/relay.py)."""

    lsn: int
    committed_at: dt.datetime | None  # the commit time of the last acknowledged transaction


def acknowledged(conn: psycopg.Connection[Any], config: WalRelayConfig) -> Acknowledged | None:
    row = conn.execute(queries.query("recovery.sql", "acknowledged", config.names),
                       {"slot": config.source.slot}).fetchone()
    if row is None or row[0] is None:
        return None
    return Acknowledged(parse_lsn(row[0]), row[1])


@dataclass(frozen=True)
class RecoveryReport:
    slot: str
    consistent_lsn: int  # events committed after it come from the new slot
    republished: int  # events published from the table
    parked: int
    by_topic: dict[str, int]
    seconds: float
    # The last position the lost slot's relay had acknowledged, as recorded (None: unknown).
    acknowledged: Acknowledged | None

    def summary(self) -> str:
        topics = ", ".join(f"{topic}: {count}" for topic, count in sorted(self.by_topic.items()))
        known = (f"last acknowledged {format_lsn(self.acknowledged.lsn)}"
                 if self.acknowledged else "no acknowledged position recorded")
        return (f"recovered slot {self.slot}: {self.republished} events republished from the "
                f"outbox table ({topics or 'none'}), {self.parked} parked, in "
                f"{self.seconds:.1f} s; {known}; the slot streams from "
                f"{format_lsn(self.consistent_lsn)}")


def check_recoverable(conn: psycopg.Connection[Any], config: WalRelayConfig) -> None:
    """Refuse what recovery cannot do without a silent gap: no table (table-less mode), or a
    table whose published rows are not tracked (a mapped layout without the bookkeeping
    columns, whose writers or jobs remove rows: nothing says which reached Kafka)."""
    source = config.source
    if source.table is None:
        raise RecoveryRefusedError(
            f"slot {source.slot} streams table-less events (pg_logical_emit_message): they "
            "exist only in the WAL, and the WAL the lost slot held is gone, so there is no table "
            "to recover them from. Create a new slot with `outbox slot create --table-less`; "
            "events written while the slot was lost cannot be recovered")
    columns = slots.table_columns(conn, (source.schema, source.table))
    if not columns:
        raise RecoveryRefusedError(f"table {source.schema}.{source.table} does not exist")
    # The new slot streams through the same publication: it must serve the relay first.
    needed = [column for column in source.published_columns if column in columns]
    slots.check_publication(slots.publication_info(conn, source.publication),
                            source.publication, (source.schema, source.table), needed)
    if not {"txid", "published_at", "position"} <= set(columns):
        known = acknowledged(conn, config)
        since = (f"since {known.committed_at.isoformat()} (the last acknowledged commit)"
                 if known and known.committed_at else "since the relay started")
        raise RecoveryRefusedError(
            f"table {source.schema}.{source.table} does not track which rows were published "
            f"(no position, txid and published_at columns), so the events committed {since} "
            "up to now are a window recovery cannot account for: it may have reached Kafka or "
            "not. Add the columns (`outbox migrate up --columns debezium`) before relying on "
            "recovery; for now, recreate the slot and replay that window from your own source")


class CatchUpSource(PollSource):
    """The rows unpublished in the new slot's snapshot, in position order (the polling
    relay's order), delivered and removed like the polling relay's; `complete` once every one
    was read. Reads on the snapshot's connection, writes on a connection of its own."""

    name = "postgres-wal recovery"

    def __init__(self, config: PollConfig, stats: RelayStats,
                 reader: psycopg.Connection[Any], stop: threading.Event,
                 ended: threading.Event, consistent_lsn: int = 0) -> None:
        super().__init__(config, stats)
        self._reader = reader
        self._consistent_lsn = consistent_lsn
        self._stop = stop  # the daemon's (or the command's) stop
        self._ended = ended  # the core's stop: set when everything was read, or on `stop`
        self._after = 0
        self.complete = False
        self._mark = queries.compose(
            "recovery.sql", "mark_recovered", config.names,
            set_topic=kept_topic(config.topic_template, config.columns))

    @contextlib.contextmanager
    def open(self, stop: threading.Event) -> Iterator[bool]:
        try:
            with connect(self.config.db_url) as conn:
                self._conn = conn
                self.stats.source_connected = True
                yield True
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc
        finally:
            self.stats.source_connected = False

    def read(self, sink: Sink[int], park: Callable[[Refused], None], busy: bool) -> int:
        self._check_stop()
        limit = self.config.batch_size
        rows = self._reader.execute(
            self._query("fetch_page"), {"after": self._after, "limit": limit}).fetchall()
        if rows:
            self._after = rows[-1][0]
        send = sink.send
        for row in rows:
            if row[6] is None:
                park(Refused(row[0], "the payload column is null"))
            else:
                send(row_record(row), row[0])
        self.caught_up = len(rows) < limit
        return len(rows)

    def apply(self, delivered: list[int], refused: list[Refused]) -> None:
        """As the polling relay; kept rows are marked with the new slot's consistent point as
        their commit order (`outbox replay`): they committed before it, and after every row the
        lost slot's relay had marked."""
        if not (delivered and self.config.keep_published):
            super().apply(delivered, refused)
            return
        super().apply([], refused)
        self.conn.execute(self._mark, {"positions": delivered,
                                       "lsn": format_lsn(self._consistent_lsn)})

    def keep_alive(self) -> None:
        self._check_stop()

    def on_caught_up(self) -> None:
        """Nothing: kept rows are purged by the relay afterwards."""

    def wait_for_more(self, stop: threading.Event) -> None:
        """Everything was read and settled: the catch-up is over."""
        self.complete = True
        self._ended.set()

    def finish(self, unacknowledged: int) -> None:
        if unacknowledged:
            self.complete = False

    def abandon(self, *, blocked: bool) -> None:
        self.complete = False

    def _check_stop(self) -> None:
        if self._stop.is_set():
            self._ended.set()


def recover(
    config: WalRelayConfig,
    publisher: PublisherConfig,
    stats: RelayStats,
    stop: threading.Event,
    *,
    topic_limits: TopicLimits | None = None,
    wait: bool = False,
) -> RecoveryReport | None:
    """Recover the slot: drop it if it is left over (invalidated, or made by a recovery that
    did not finish), create it anew, publish the rows the new slot cannot send, and clear the
    record of the recovery. Returns None if the slot is healthy and no recovery is pending.
    `wait`: wait while another process holds the outbox (a relay's recovery); else refuse."""
    started = time.monotonic()
    source = config.source
    with _connect(config.db_url) as conn:
        check_recoverable(conn, config)
        if not wait and not _broker_reachable(publisher, stop, once=True):
            raise RecoveryRefusedError(
                f"Kafka at {publisher.bootstrap_servers} does not answer: the recovery needs it "
                "to publish the missed events; nothing was changed")
        with recovery_state.lock(conn, config.names, source.slot, wait=wait, stop=stop) as held:
            if not held:
                return None  # stopped while waiting
            status = _released(conn, source.slot, wait=wait)
            pending = recovery_state.pending(conn, config.names, source.slot)
            if status is not None and status.active:
                raise SlotInUseError(
                    f"replication slot {source.slot!r} is in use by server process "
                    f"{status.active_pid}: a relay streams from it, it is not lost",
                    active_pid=status.active_pid)
            if status is not None and not status.lost and pending is None:
                return None
            known = acknowledged(conn, config)
            recovery_state.begin(conn, config.names, source.slot)
            if status is not None:
                slots.drop_slot(conn, source.slot)  # the server frees its WAL now
            if wait and not _broker_reachable(publisher, stop):
                return None  # stopped first; the recovery stays pending
            log.warning("recovering lost replication slot", extra={
                "event": "slot_recovery_started", "slot": source.slot,
                "wal_status": status.wal_status if status else "missing",
                "acknowledged": format_lsn(known.lsn) if known else None})
            consistent, republished, parked_count, by_topic = _catch_up(
                config, publisher, stats, stop, topic_limits)
            recovery_state.end(conn, config.names, source.slot, format_lsn(consistent))
    report = RecoveryReport(source.slot, consistent, republished, parked_count, by_topic,
                            time.monotonic() - started, known)
    log.warning(report.summary(), extra={
        "event": "slot_recovered", "slot": source.slot, "republished": republished,
        "consistent_lsn": format_lsn(consistent)})
    return report


def _released(conn: psycopg.Connection[Any], slot: str, *, wait: bool) -> slots.SlotStatus | None:
    """The slot's status; with `wait`, once its walsender is gone (a relay that just ended its
    session, the relay's own one when it gives up its slot, is released a moment later)."""
    deadline = time.monotonic() + (RELEASE_SECONDS if wait else 0)
    while True:
        status = slots.slot_status(conn, slot)
        if status is None or not status.active or time.monotonic() >= deadline:
            return status
        time.sleep(0.1)


def _broker_reachable(publisher: PublisherConfig, stop: threading.Event, *,
                      once: bool = False) -> bool:
    """Wait until Kafka answers (False if `stop` comes first, or after one try with `once`): a
    recovery holds a snapshot open while it publishes, so it starts only once it can publish."""
    from confluent_kafka import KafkaException, Producer

    producer = Producer(publisher.producer_settings())
    announced = False
    while not stop.is_set():
        try:
            producer.list_topics(timeout=5.0)
            return True
        except KafkaException:
            if once:
                return False
            if not announced:
                log.warning("waiting for Kafka to recover the slot", extra={
                    "event": "slot_recovery_waiting"})
                announced = True
    return False


def _catch_up(
    config: WalRelayConfig, publisher: PublisherConfig, stats: RelayStats,
    stop: threading.Event, topic_limits: TopicLimits | None,
) -> tuple[int, int, int, dict[str, int]]:
    """Create the slot with its snapshot and publish the rows unpublished in it; returns the
    consistent point, the events published and parked, and the counts per topic."""
    source = config.source
    with replication_connection(config.db_url) as replication, _connect(config.db_url) as reader:
        consistent, snapshot = _create_slot_with_snapshot(replication, source.slot)
        # The snapshot lives while the replication connection stays idle: import it first.
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        poll = PollConfig(db_url=config.db_url, names=config.names, columns=source.columns,
                          keep_published=config.keep_published,
                          topic_template=publisher.topic_template,
                          shutdown_timeout=config.shutdown_timeout)
        ended = threading.Event()
        catch_up = CatchUpSource(poll, stats, reader, stop, ended, consistent)
        before = dict(stats.published)
        parked_before = stats.parked
        RelayCore(catch_up, kafka_sink(publisher, stats, topic_limits), stats).run(ended)
        reader.execute("COMMIT")
    if not catch_up.complete:
        raise RecoveryInterrupted(
            f"the recovery of slot {source.slot} stopped before every unpublished row was "
            "published; it starts again from the beginning next time")
    by_topic = {topic: count - before.get(topic, 0) for topic, count in stats.published.items()
                if count - before.get(topic, 0)}
    return consistent, sum(by_topic.values()), stats.parked - parked_before, by_topic


def _create_slot_with_snapshot(
    replication: psycopg.Connection[Any], slot: str
) -> tuple[int, str]:
    """CREATE_REPLICATION_SLOT with an exported snapshot: (consistent point, snapshot name).
    The server waits for every running transaction to end first, like `create_slot`."""
    # EXPORT_SNAPSHOT: the spelling every supported server (10 to 17) accepts.
    query = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL {} EXPORT_SNAPSHOT").format(
        sql.Identifier(slots.check_slot_name(slot)), sql.Identifier(slots.PLUGIN))
    try:
        row = replication.execute(query).fetchone()
    except psycopg.errors.DuplicateObject as exc:
        raise SlotError(f"replication slot {slot!r} exists again: another process created "
                        "it during the recovery") from exc
    assert row is not None
    return parse_lsn(str(row[1])), str(row[2])


def _connect(db_url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(f"cannot connect to PostgreSQL: {redact(str(exc))}") from exc




class HealingRelay:
    """The WAL relay with `--on-slot-loss recover`: a lost slot (missing, invalidated, given
    up over its WAL budget, or left by an unfinished recovery) is recovered, then the relay
    streams on. Every other error goes to the supervisor as usual."""

    def __init__(self, config: WalRelayConfig, publisher: PublisherConfig, stats: RelayStats,
                 limits: TopicLimits | None, remembered: Remembered | None = None) -> None:
        self.config = config
        self.publisher = publisher
        self.stats = stats
        self.limits = limits
        self.remembered = remembered

    def run(self, stop: threading.Event) -> None:
        from relay.wal.relay import wal_relay

        slot = self.config.source.slot
        while not stop.is_set():
            try:
                wal_relay(self.config, self.publisher, self.stats, self.limits,
                          self.remembered).run(stop)
                return
            except LOST_SLOT as exc:
                log.error("replication slot %s lost: recovering it from the outbox table", slot,
                          extra={"event": "slot_lost", "slot": slot, "error": redact(str(exc))})
                if isinstance(exc, SlotBudgetExceededError):
                    self._give_up_slot()
            report = recover(self.config, self.publisher, self.stats, stop,
                             topic_limits=self.limits, wait=True)
            if report is not None:
                self.stats.slot_recoveries += 1

    def _give_up_slot(self) -> None:
        """Recorded as a recovery first: the slot is dropped by `recover`, and if this process
        dies before, the next relay finds the recovery pending."""
        with _connect(self.config.db_url) as conn:
            recovery_state.begin(conn, self.config.names, self.config.source.slot)


LOST_SLOT = (SlotMissingError, SlotInvalidatedError, SlotRecoveryPendingError,
             SlotBudgetExceededError)
