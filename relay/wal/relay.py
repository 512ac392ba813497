"""The log-tailing source: pgoutput changes of the outbox, for the relay core; the slot is
confirmed only after Kafka acknowledged (relay/core/loop.py drives it)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

import relay.native
from outbox import migrate
from outbox.conninfo import libpq_url, redact
from outbox.names import SchemaNames
from relay import catalog, parked
from relay.core.holds import KeyHolds
from relay.core.loop import RelayCore
from relay.core.ports import Cadence, Refused, Sink, while_open
from relay.core.watermark import Group, Watermark
from relay.errors import FatalRelayError, SourceUnavailableError
from relay.published import backlog_gauges, kept_topic
from relay.shards import shard_count
from relay.sinks.kafka.sink import DEFAULT_TOPIC_TEMPLATE, PublisherConfig, kafka_sink, topic_sql
from relay.sinks.kafka.topic_limits import TopicLimits
from relay.stats import RelayStats
from relay.wal import groups, position, recovery_state, slots
from relay.wal.budget import SlotBudget
from relay.wal.cleanup import TableCleaner
from relay.wal.decoder import WalCommit, WalEvent, WalRejected
from relay.wal.errors import (
    SlotInUseError,
    SlotInvalidatedError,
    SlotMissingError,
    SlotRecoveryPendingError,
)
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
    # The relay's topic template: kept rows store the topic their event was sent to.
    topic_template: str = DEFAULT_TOPIC_TEMPLATE
    # A lost slot: "stop" the relay, or "recover" it (relay/wal/recovery.py).
    on_slot_loss: str = "stop"
    # Bytes of WAL the slot may retain before the relay reports it (relay/wal/budget.py).
    max_slot_wal: int | None = None
    # A sharded outbox (relay/wal/sharded.py): one of several relays, each streaming the shard
    # groups it leases; the shard and group counts are read at start-up (check_setup).
    sharded: bool = False
    shard_lease: float = 10.0
    shard_count: int | None = None
    groups: int | None = None
    # Set for one group's stream: the shards whose rows its cleaner removes.
    shards: tuple[int, ...] | None = None

    def group(self, group: int) -> WalRelayConfig:
        """The config that streams shard group `group` (relay/wal/groups.py)."""
        assert self.shard_count is not None and self.groups is not None
        return dataclasses.replace(
            self, source=groups.group_config(self.source, self.shard_count, self.groups, group),
            shards=groups.group_shards(self.shard_count, self.groups, group))


class WalRelaySource:
    """The WAL source (relay/core/ports.py `Source`): pgoutput changes of the outbox, in commit
    order. A transaction is a group of the watermark (relay/core/watermark.py): the slot is
    confirmed up to the newest transaction done with all before it, once the position is
    recorded and, in table mode, its rows are removed from the outbox table
    (relay/wal/cleanup.py). Transactions acknowledged before, as recorded or `remembered` by
    this process, are skipped when the server sends them again (relay/wal/position.py)."""

    name = "postgres-wal"
    # Observed per transaction when it is done (see confirm): cheaper than per event.
    latency_per_event = False
    read_waits = True  # on the replication stream
    after_failure = "the relay restarts from the slot's confirmed position"

    def __init__(self, config: WalRelayConfig, stats: RelayStats,
                 remembered: position.Remembered | None = None) -> None:
        self.config = config
        self.stats = stats
        self.remembered = remembered if remembered is not None else position.Remembered()
        self.skipped = 0  # events of transactions acknowledged before, not sent again
        self.cadence = Cadence(room=1, max_in_flight=config.max_in_flight, ack_interval=0.0,
                               shutdown_timeout=config.shutdown_timeout)
        self.caught_up = False
        self.transactions: Watermark[WalCommit] = Watermark()
        self._source: WalSource | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._cleaner: TableCleaner | None = None
        # Without a cleaner (no rows to remove) the position is recorded here, at most once
        # per status interval: the last done transaction not recorded yet, and what was.
        self._unrecorded: WalCommit | None = None
        self._recorded = 0
        self._record_at = 0.0
        self._budget = SlotBudget(
            config.source.slot, config.max_slot_wal, stats,
            give_up=config.on_slot_loss == "recover") if config.max_slot_wal else None

    @property
    def source(self) -> WalSource:
        return while_open(self._source)

    @property
    def conn(self) -> psycopg.Connection[Any]:
        return while_open(self._conn)

    @contextlib.contextmanager
    def open(self, stop: threading.Event) -> Iterator[bool]:
        # Its errors declare what follows (relay/wal/errors.py): a lost connection restarts,
        # a missing slot or publication stops the daemon.
        self._refuse_unfinished_recovery()
        source = open_as_standby(self.config.db_url, self.config.source, stop,
                                 retry_interval=self.config.standby_retry)
        if source is None:
            yield False
            return
        try:
            with source, psycopg.connect(libpq_url(self.config.db_url), autocommit=True) as conn:
                self._source, self._conn = source, conn
                self.stats.source_connected = self.stats.leader = True
                self._skip_acknowledged(conn)
                self._cleaner = self._start_cleaner(conn)
                if self._budget is not None:
                    self._budget.check(conn)  # a slot over budget already is reported at once
                log.info("WAL relay streaming", extra={
                    "event": "relay_active", "source": self.name,
                    "slot": self.config.source.slot, "from": format_lsn(source.acknowledged_lsn),
                    # the compiled hot path (`make native`), or the pure-Python one
                    "native": relay.native.module is not None})
                yield True
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc
        finally:
            self.stats.source_connected = self.stats.leader = False

    def _refuse_unfinished_recovery(self) -> None:
        slot = self.config.source.slot
        try:
            with psycopg.connect(libpq_url(self.config.db_url), autocommit=True,
                                 connect_timeout=10) as conn:
                started = recovery_state.pending(conn, self.config.names, slot)
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc
        if started is not None:
            raise SlotRecoveryPendingError(
                f"a recovery of replication slot {slot} began at {started.isoformat()} and did "
                "not finish: streaming from the slot now would skip events. Run `outbox slot "
                "recover` (or the relay with --on-slot-loss recover)")

    def _skip_acknowledged(self, conn: psycopg.Connection[Any]) -> None:
        """Skip what the server sends again although Kafka has it: the transactions up to the
        position recorded for the slot, or remembered from this process's earlier runs."""
        identity = self.source.stream.identity
        recorded = position.recorded(conn, self.config.names, self.config.source.slot)
        below = position.skip_below(identity, recorded, self.remembered.position)
        slot_at = self.source.stream.slot_at_start.confirmed_flush_lsn or 0
        self.source.decoder.skip_below = below
        if below > slot_at:
            log.info("skipping the transactions up to %s, acknowledged before: the slot "
                     "resumes at %s", format_lsn(below), format_lsn(slot_at), extra={
                         "event": "wal_skip_acknowledged", "slot": self.config.source.slot,
                         "skip_below": format_lsn(below), "slot_at": format_lsn(slot_at)})

    def _start_cleaner(self, conn: psycopg.Connection[Any]) -> TableCleaner | None:
        """The remover of published rows (which records the position with them), unless there
        is no table (table-less mode) or its rows carry no transaction id to find them by (a
        mapped layout, e.g. Debezium's, whose writers delete their rows themselves)."""
        table = self.config.source.table
        if table is None:
            return None
        columns = slots.table_columns(conn, (self.config.source.schema, table))
        if "txid" not in columns:
            log.warning("published rows stay in the outbox table: it has no txid column", extra={
                "event": "table_not_cleaned", "table": f"{self.config.source.schema}.{table}"})
            return None
        cleaner = TableCleaner(
            self.config.db_url, self.config.names, self._origin(), self.config.keep_published,
            kept_topic(self.config.topic_template, self.config.source.columns),
            self.config.shards)
        cleaner.start()
        return cleaner

    def _origin(self) -> position.Origin:
        return position.Origin.of(self.config.source.slot, self.source.stream.identity)

    def held_keys(self) -> KeyHolds:
        return parked.held_keys(self.conn, self.config.names)

    def read(self, sink: Sink[Group[WalCommit]], park: Callable[[Refused], None],
             busy: bool) -> int:
        items = self.source.poll(0.002 if busy else 0.2)
        sent = 0
        send, event_sent = sink.send, self.transactions.sent
        for item in items:
            if type(item) is WalEvent:  # nearly every item: the cheapest test first
                send(item.record, event_sent())
                sent += 1
            elif isinstance(item, WalCommit):
                self.transactions.close(item)
                if item.skipped:
                    self.skipped += item.skipped
                    self.stats.wal_skipped += item.skipped
            elif isinstance(item, WalRejected):
                # Not an event of any transaction's count: parked at once, by its raw change.
                parked.park_raw(self.conn, self.config.names,
                                {"source": item.source, **item.raw}, item.reason)
                self.stats.parked += 1
                log.error("unreadable outbox change parked", extra={
                    "event": "event_parked", "reason": item.reason, "lsn": format_lsn(item.lsn)})
        self.caught_up = not items
        return sent

    def apply(self, delivered: list[Group[WalCommit]], refused: list[Refused]) -> None:
        """Refused events are parked by their record; then they, and the delivered ones, are
        done in their transactions."""
        transactions = self.transactions
        for parking in refused:
            assert parking.record is not None  # the sink refuses records
            parked.park_record(self.conn, self.config.names, parking.record, parking.reason)
            transactions.done(parking.token)
        for transaction in delivered:  # once per event: the watermark's `done`, inlined
            transaction.outstanding -= 1
        transactions.outstanding -= len(delivered)

    def confirm(self, *, final: bool) -> None:
        """Hand done transactions to the cleaner, then confirm the slot up to what is safe:
        done, the position recorded, and in table mode its rows removed."""
        done = self.transactions.pop_done()
        cleaner = self._cleaner
        if done:
            last = done[-1].position
            assert last is not None  # closed groups have their commit
            commits = []  # (xid, commit LSN) of those whose rows leave the table
            for transaction in done:
                commit = transaction.position
                assert commit is not None
                if transaction.events:
                    self.stats.delivered_transaction(
                        transaction.events, commit.commit_time_us / 1e6 + PG_EPOCH_UNIX)
                    commits.append((commit.xid, commit.commit_lsn))
                elif commit.skipped:
                    # Acknowledged by an earlier run, whose cleaner may not have removed its
                    # rows yet: removing them again is harmless, leaving them is not.
                    commits.append((commit.xid, commit.commit_lsn))
            if cleaner is not None:
                cleaner.done(commits, last.end_lsn, last.commit_time_us)
            else:
                self._unrecorded = last
            identity = self.source.stream.identity
            self.remembered.note(position.Position(
                last.end_lsn, identity.system_id, identity.timeline))
        if cleaner is not None:
            cleaner.check()
            confirm = cleaner.cleaned_lsn
        else:
            confirm = self._record(final)
        if self._budget is not None:
            self._budget.check(self.conn)
        source = self.source
        if confirm > source.acknowledged_lsn:
            source.acknowledge(confirm)

    def _record(self, final: bool) -> int:
        """Without a cleaner: record the newest done transaction (at the status interval, and
        at the end), on this thread; returns how far the position is recorded. One short
        statement a second: a thread of its own would cost the drain more than it saves."""
        commit = self._unrecorded
        now = time.monotonic()
        if commit is not None and (final or now >= self._record_at):
            position.record(self.conn, self.config.names, self._origin(), commit.end_lsn,
                            commit.commit_time_us)
            self._recorded, self._unrecorded = commit.end_lsn, None
            self._record_at = now + self.config.source.status_interval
        return self._recorded

    def where(self, token: Group[WalCommit]) -> Mapping[str, object]:
        return {}

    def keep_alive(self) -> None:
        self.source.heartbeat()  # keep the replication session alive while Kafka is slow
        if self._budget is not None:
            self._budget.check(self.conn)  # the broker away is when the slot grows

    def on_caught_up(self) -> None:
        """Nothing to do: the cleaner purges kept rows on its own thread."""

    def wait_for_more(self, stop: threading.Event) -> None:
        """Nothing to do: `read` waits on the replication stream."""

    def finish(self, unacknowledged: int) -> None:
        if self._cleaner is not None:
            self._cleaner.close(self.config.shutdown_timeout, finish=True)
            self.confirm(final=True)
        log.info("WAL relay stopped", extra={
            "event": "relay_stopped", "unacknowledged": unacknowledged, "skipped": self.skipped,
            "confirmed": format_lsn(self.source.acknowledged_lsn)})

    def abandon(self, *, blocked: bool) -> None:
        if blocked:
            # Nothing unacknowledged is confirmed: the next relay sends it again from the slot.
            if self._cleaner is not None:
                self._cleaner.close(self.config.shutdown_timeout, finish=True)
            log.info("WAL relay stopped while Kafka was unavailable", extra={
                "event": "relay_stopped", "confirmed": format_lsn(self.source.acknowledged_lsn)})
        elif self._cleaner is not None:
            self._cleaner.close(1.0, finish=False)


def wal_relay(
    config: WalRelayConfig, publisher_config: PublisherConfig, stats: RelayStats,
    topic_limits: TopicLimits | None = None, remembered: position.Remembered | None = None,
) -> RelayCore[Group[WalCommit]]:
    """The WAL relay: the core driving a WalRelaySource into the Kafka sink. `remembered`:
    the process's memory of what was acknowledged, shared by its runs."""
    return RelayCore(WalRelaySource(config, stats, remembered),
                     kafka_sink(publisher_config, stats, topic_limits), stats)


def check_setup(config: WalRelayConfig) -> WalRelayConfig:
    """At start-up: the slot and publication exist and fit, the parked table exists. Sharded:
    the outbox is, and its shard groups' slots exist; the config to run with (their counts)."""
    try:
        with psycopg.connect(libpq_url(config.db_url), autocommit=True,
                             connect_timeout=10) as conn:
            if config.sharded:
                config = _with_groups(conn, config)
            # In use by another relay: this one starts as its standby (open_as_standby waits).
            # Lost, with recovery on: the relay recovers it first (relay/wal/recovery.py).
            tolerated: tuple[type[Exception], ...] = (SlotInUseError,)
            if config.on_slot_loss == "recover":
                tolerated += (SlotMissingError, SlotInvalidatedError)
            database = slots.current_database(conn)
            for slot in _slots_of(config):
                with contextlib.suppress(*tolerated):
                    slots.check_slot(slots.slot_status(conn, slot), slot, database)
            parked_table = catalog.qualified(conn, config.names, config.names.parked_table)
            parked_exists = catalog.table_exists(conn, parked_table)
            missing = _missing_cleanup_rights(conn, config) if parked_exists else None
            unrecordable = _position_problem(conn, config) if parked_exists else None
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
    if unrecordable:
        raise FatalRelayError(unrecordable)
    return config


def _position_problem(conn: psycopg.Connection[Any], config: WalRelayConfig) -> str | None:
    """Why the relay could not record its position (relay/wal/position.py), or None."""
    table = catalog.qualified(conn, config.names, config.names.position_table)
    columns = catalog.column_types(conn, table) if catalog.table_exists(conn, table) else {}
    if "acknowledged_system" not in columns:
        setup = migrate.command(config.names, config.source.columns.layout)
        return (f"table {table} is missing or out of date: run `{setup}` first (the WAL relay "
                "records there how far Kafka acknowledged)")
    for privilege in ("SELECT", "INSERT", "UPDATE"):
        if not catalog.may(conn, table, privilege):
            return (f"the WAL relay's role may not {privilege} {table}: it records there how "
                    "far Kafka acknowledged; grant it as deploy/roles.sql does")
    return None


def _with_groups(conn: psycopg.Connection[Any], config: WalRelayConfig) -> WalRelayConfig:
    """The shard and group counts of a sharded relay, or why it cannot run."""
    names = config.names
    count = shard_count(conn, names)
    if count is None:
        raise FatalRelayError(
            f"--shards: table {names.schema}.{names.table} is not sharded; run "
            f"`{migrate.command(names)} --shards N` first (docs/operations.md)")
    found = groups.find_groups(conn, config.source.publication)
    if not found:
        raise FatalRelayError(
            f"--shards: no shard group of publication {config.source.publication} exists: "
            "create them with `outbox slot create --shard-groups G` (docs/operations.md)")
    if found > count:
        raise FatalRelayError(
            f"{found} shard groups of publication {config.source.publication} but "
            f"{count} shards: drop the groups and create them again")
    config = dataclasses.replace(config, shard_count=count, groups=found)
    for group in range(found):  # each group's publication selects its shards' rows
        source = config.group(group).source
        slots.check_publication(slots.publication_info(conn, source.publication),
                                source.publication, source.qualified_table,
                                row_filter=source.row_filter)
    return config


def _slots_of(config: WalRelayConfig) -> list[str]:
    """The slots the relay streams: its own, or each shard group's."""
    if config.groups is None:
        return [config.source.slot]
    return [groups.group_name(config.source.slot, group) for group in range(config.groups)]


def _missing_cleanup_rights(conn: psycopg.Connection[Any], config: WalRelayConfig) -> str | None:
    """What the role lacks to remove published rows (table mode), or None."""
    if config.source.table is None:
        return None
    columns = slots.table_columns(conn, (config.source.schema, config.source.table))
    if "txid" not in columns:
        return None  # nothing to find its rows by: they are left alone (see _cleaner)
    table = catalog.qualified(conn, config.names, config.names.table)
    wanted: list[tuple[str, str | None]] = [("DELETE", None)]
    if config.keep_published is not None:
        if "commit_lsn" not in columns:
            raise FatalRelayError(
                f"table {table} has no column commit_lsn, which --keep-published marks (the "
                "commit order `outbox replay` follows): run "
                f"`{migrate.command(config.names, config.source.columns.layout)}` first")
        wanted += [("UPDATE", "published_at"), ("UPDATE", "commit_lsn")]
        if topic_sql(config.topic_template, config.source.columns) is not None:
            assert config.source.columns.topic is not None
            wanted.append(("UPDATE", config.source.columns.topic))
    for privilege, column in wanted:
        if not catalog.may(conn, table, privilege, column):
            return f"{privilege} {table}" + (f" ({column})" if column else "")
    return None


def wal_gauges(config: WalRelayConfig) -> dict[str, Callable[[], float | None]]:
    """Slot lag and confirmed position, and in table mode the backlog, for the metrics
    endpoint."""

    def statuses() -> list[slots.SlotStatus]:
        with psycopg.connect(libpq_url(config.db_url), connect_timeout=5,
                             autocommit=True) as conn:
            found = [slots.slot_status(conn, slot) for slot in _slots_of(config)]
        return [status for status in found if status is not None]

    # Over shard groups: the slot that retains most, and is furthest behind.
    def retained() -> float | None:
        values = [s.retained_bytes for s in statuses() if s.retained_bytes is not None]
        return float(max(values)) if values else None

    def confirmed() -> float | None:
        values = [s.confirmed_flush_lsn for s in statuses() if s.confirmed_flush_lsn]
        return float(min(values)) if values else None

    gauges: dict[str, Callable[[], float | None]] = {
        "slot_retained_wal_bytes": retained, "slot_confirmed_lsn": confirmed}
    if config.source.table is not None and config.source.columns.is_native:
        # rows the relay has not removed yet: the backlog
        gauges.update(backlog_gauges(config.db_url, config.names))
    return gauges
