"""The log-tailing relay: pgoutput changes of the outbox -> Kafka, slot confirmed after acks."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from outbox import migrate
from outbox.conninfo import libpq_url, redact
from outbox.names import SchemaNames
from relay import catalog, parked
from relay.errors import (
    FatalRelayError,
    SourceUnavailableError,
    StoppedWhileBlocked,
)
from relay.holds import HoldRefresh, log_parked
from relay.outcomes import FailureLatch
from relay.published import backlog_gauges
from relay.publisher import (
    Delivery,
    KafkaPublisher,
    PublisherConfig,
    topic_limits_for,
    waiting,
)
from relay.stats import RelayStats
from relay.topic_limits import TopicLimits
from relay.wal import slots
from relay.wal.acks import CommitTracker, Transaction
from relay.wal.cleanup import TableCleaner
from relay.wal.decoder import WalCommit, WalEvent, WalRejected
from relay.wal.errors import SlotInUseError
from relay.wal.lsn import format_lsn
from relay.wal.pgoutput import PG_EPOCH_UNIX
from relay.wal.source import WalSource, WalSourceConfig, open_as_standby

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WalRelayConfig:
    db_url: str = field(repr=False)  # holds the password
    source: WalSourceConfig
    names: SchemaNames  # where the parked table is
    # Events handed to Kafka and not yet acknowledged: bounds memory while Kafka is slow.
    # 5,000 is ~50 ms of a full-speed drain, several produce batches: Kafka stays busy, and the
    # relay's peak RSS stays under 70 MB (50,000 let it reach 130 MB when the broker was slow
    # to start; 10,000 gave 63-79 MB and a slower drain).
    max_in_flight: int = 5_000
    standby_retry: float = 5.0
    shutdown_timeout: float = 30.0
    # Published rows are deleted; with this, marked (published_at) and deleted once this old.
    keep_published: dt.timedelta | None = None


class WalRelay:
    """Runs until `stop`; raises a RelayError whose `restart` says whether to start again from
    the slot (relay/errors.py)."""

    def __init__(
        self,
        config: WalRelayConfig,
        publisher_config: PublisherConfig,
        stats: RelayStats,
        topic_limits: TopicLimits | None = None,
    ) -> None:
        self.config = config
        self.publisher_config = publisher_config
        self.stats = stats
        self.tracker = CommitTracker()
        self._refused: list[tuple[Transaction, Delivery]] = []
        self._published = stats.published
        self.failures = FailureLatch(stats)
        # What the topics accept, and which need their events sent alone: the daemon keeps one
        # across restarts (relay/wal/factory.py).
        self.topic_limits = topic_limits or topic_limits_for(publisher_config)

    def _on_delivered(self, transaction: Transaction, topic: str) -> None:
        # Once per event: count it and settle its transaction; the latency is observed per
        # transaction when the slot is confirmed (see _settle).
        self._published[topic] += 1
        self.tracker.event_done(transaction)

    def _on_delivery(self, transaction: Transaction, delivery: Delivery) -> None:
        if delivery.error is None:
            self._on_delivered(transaction, delivery.topic)
        elif delivery.permanent:
            self._refused.append((transaction, delivery))  # parked before it counts as done
        else:
            self.failures.failed(delivery)

    def run(self, stop: threading.Event) -> None:
        # Its errors declare what follows (relay/wal/errors.py): a lost connection restarts,
        # a missing slot or publication stops the daemon.
        source = open_as_standby(self.config.db_url, self.config.source, stop,
                                 retry_interval=self.config.standby_retry)
        if source is None:
            return
        try:
            with source, psycopg.connect(libpq_url(self.config.db_url), autocommit=True) as conn:
                self.stats.source_connected = self.stats.leader = True
                self._stream(source, conn, stop)
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc
        finally:
            self.stats.source_connected = self.stats.leader = False

    def _stream(
        self, source: WalSource, conn: psycopg.Connection[Any], stop: threading.Event
    ) -> None:
        publisher: KafkaPublisher[Transaction] = KafkaPublisher(
            self.publisher_config, self._on_delivery, on_delivered=self._on_delivered,
            on_broker_state=lambda up: setattr(self.stats, "broker_connected", up),
            # Kafka's queue full: status updates keep the session alive, a stop ends the wait.
            on_wait=waiting(stop, source.heartbeat),
            holds=parked.held_keys(conn, self.config.names), limits=self.topic_limits)
        publisher.broker_reachable(timeout=5.0)
        refresh_holds = HoldRefresh(lambda: parked.held_keys(conn, self.config.names), publisher)
        cleaner = self._cleaner(conn)
        log.info("WAL relay streaming", extra={
            "event": "relay_active", "source": "postgres-wal", "slot": self.config.source.slot,
            "from": format_lsn(source.acknowledged_lsn)})
        try:
            while not stop.is_set():
                if self.tracker.outstanding < self.config.max_in_flight:
                    wait = 0.002 if self.tracker.outstanding else 0.2
                    self._handle(source, conn, publisher, source.poll(wait))
                else:
                    source.heartbeat()  # keep the replication session alive while Kafka is slow
                    publisher.poll(0.05)
                publisher.poll(0)
                self._settle(source, conn, cleaner)
                self.stats.in_flight = self.tracker.outstanding
                if not self.tracker.outstanding:
                    self.stats.progressed()
                    refresh_holds()
            remaining = publisher.flush(self.config.shutdown_timeout)
            self._settle(source, conn, cleaner)
            if cleaner is not None:
                cleaner.close(self.config.shutdown_timeout, finish=True)
                self._settle(source, conn, cleaner)
            log.info("WAL relay stopped", extra={
                "event": "relay_stopped", "unacknowledged": remaining,
                "confirmed": format_lsn(source.acknowledged_lsn)})
        except StoppedWhileBlocked:
            # Nothing unacknowledged is confirmed: the next relay sends it again from the slot.
            publisher.purge()
            if cleaner is not None:
                cleaner.close(self.config.shutdown_timeout, finish=True)
            log.info("WAL relay stopped while Kafka was unavailable", extra={
                "event": "relay_stopped", "confirmed": format_lsn(source.acknowledged_lsn)})
        except BaseException:
            publisher.purge()
            if cleaner is not None:
                cleaner.close(1.0, finish=False)
            raise

    def _cleaner(self, conn: psycopg.Connection[Any]) -> TableCleaner | None:
        """The remover of published rows, unless there is no table (table-less mode) or its
        rows carry no transaction id to find them by (a mapped layout, e.g. Debezium's, whose
        writers delete their rows themselves)."""
        table = self.config.source.table
        if table is None:
            return None
        columns = slots.table_columns(conn, (self.config.source.schema, table))
        if "txid" not in columns:
            log.warning("published rows stay in the outbox table: it has no txid column", extra={
                "event": "table_not_cleaned", "table": f"{self.config.source.schema}.{table}"})
            return None
        cleaner = TableCleaner(self.config.db_url, self.config.names, self.config.keep_published)
        cleaner.start()
        return cleaner

    def _handle(
        self,
        source: WalSource,
        conn: psycopg.Connection[Any],
        publisher: KafkaPublisher[Transaction],
        items: list[WalEvent | WalRejected | WalCommit],
    ) -> None:
        sent = 0
        send, event_sent = publisher.send, self.tracker.event_sent
        for item in items:
            if type(item) is WalEvent:  # nearly every item: the cheapest test first
                send(item.record, event_sent())
                sent += 1
            elif isinstance(item, WalCommit):
                self.tracker.committed(item.end_lsn, item.commit_time_us, item.xid)
            elif isinstance(item, WalRejected):
                parked.park_raw(conn, self.config.names, {"source": item.source, **item.raw},
                                item.reason)
                self.stats.parked += 1
                log.error("unreadable outbox change parked", extra={
                    "event": "event_parked", "reason": item.reason, "lsn": format_lsn(item.lsn)})
        if sent:
            self.stats.batches += 1
            self.stats.batch_events += sent

    def _settle(
        self, source: WalSource, conn: psycopg.Connection[Any], cleaner: TableCleaner | None
    ) -> None:
        """Park refused events, hand acknowledged transactions to the cleaner, then confirm
        what is safe (acknowledged, and its rows removed); fail on a lost delivery."""
        for transaction, delivery in self._refused:
            parked.park_record(conn, self.config.names, delivery.record, delivery.error or "")
            self.stats.parked += 1
            self.stats.progressed()
            log_parked(delivery.error or "", id=str(delivery.record.id))
            self.tracker.event_done(transaction)
        self._refused.clear()
        done = self.tracker.pop_done()
        confirm = 0
        if done and done[-1].end_lsn is not None:  # always set once committed
            for transaction in done:
                if transaction.events:
                    self.stats.delivered_transaction(
                        transaction.events, transaction.commit_time_us / 1e6 + PG_EPOCH_UNIX)
            if cleaner is None:
                confirm = done[-1].end_lsn
            else:
                cleaner.done([t.xid for t in done if t.events], done[-1].end_lsn)
        if cleaner is not None:
            cleaner.check()
            confirm = cleaner.cleaned_lsn
        if confirm > source.acknowledged_lsn:
            source.acknowledge(confirm)
        self.failures.raise_if_failed("the relay restarts from the slot's confirmed position")


def check_setup(config: WalRelayConfig) -> None:
    """At start-up: the slot and publication exist and fit, the parked table exists."""
    try:
        with psycopg.connect(libpq_url(config.db_url), autocommit=True,
                             connect_timeout=10) as conn:
            # In use by another relay: this one starts as its standby (open_as_standby waits).
            with contextlib.suppress(SlotInUseError):
                slots.check_slot(slots.slot_status(conn, config.source.slot),
                                 config.source.slot, slots.current_database(conn))
            parked_table = catalog.qualified(conn, config.names, config.names.parked_table)
            parked_exists = catalog.table_exists(conn, parked_table)
            missing = _missing_cleanup_rights(conn, config) if parked_exists else None
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(f"cannot connect to PostgreSQL: {redact(str(exc))}") from exc
    if not parked_exists:
        setup = migrate.command(config.names, config.source.columns.layout)
        raise FatalRelayError(
            f"table {parked_table} is missing: run `{setup}` first "
            "(the WAL relay parks unpublishable events there)")
    if missing:
        raise FatalRelayError(
            f"the WAL relay's role may not {missing}: it removes the rows it published from the "
            "outbox table; grant it as deploy/roles.sql does")


def _missing_cleanup_rights(conn: psycopg.Connection[Any], config: WalRelayConfig) -> str | None:
    """What the role lacks to remove published rows (table mode), or None."""
    if config.source.table is None:
        return None
    if "txid" not in slots.table_columns(conn, (config.source.schema, config.source.table)):
        return None  # nothing to find its rows by: they are left alone (see _cleaner)
    table = catalog.qualified(conn, config.names, config.names.table)
    wanted: list[tuple[str, str | None]] = [("DELETE", None)]
    if config.keep_published is not None:
        wanted.append(("UPDATE", "published_at"))
    for privilege, column in wanted:
        if not catalog.may(conn, table, privilege, column):
            return f"{privilege} {table}" + (f" ({column})" if column else "")
    return None


def wal_gauges(config: WalRelayConfig) -> dict[str, Callable[[], float | None]]:
    """Slot lag and confirmed position, and in table mode the backlog, for the metrics
    endpoint."""

    def status() -> slots.SlotStatus | None:
        with psycopg.connect(libpq_url(config.db_url), connect_timeout=5,
                             autocommit=True) as conn:
            return slots.slot_status(conn, config.source.slot)

    def retained() -> float | None:
        found = status()
        return float(found.retained_bytes) if found and found.retained_bytes is not None else None

    def confirmed() -> float | None:
        found = status()
        return float(found.confirmed_flush_lsn) if found and found.confirmed_flush_lsn else None

    gauges: dict[str, Callable[[], float | None]] = {
        "slot_retained_wal_bytes": retained, "slot_confirmed_lsn": confirmed}
    if config.source.table is not None and config.source.columns.is_native:
        # rows the relay has not removed yet: the backlog
        gauges.update(backlog_gauges(config.db_url, config.names))
    return gauges
