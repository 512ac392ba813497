"""The polling source: reads committed rows of the outbox table in position order; the core
(relay/core/loop.py) publishes them, then the source deletes (or marks) them."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from outbox import migrate
from outbox.columns import ColumnMapping, PayloadType
from outbox.conninfo import libpq_url, redact
from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from outbox.record import OutboxRecord
from relay import catalog, parked, queries
from relay.core.holds import KeyHolds
from relay.core.loop import RelayCore
from relay.core.ports import Cadence, Refused, Sink, while_open
from relay.errors import FatalRelayError, SourceUnavailableError
from relay.poll.cursor import PollCursor, Snapshot
from relay.published import (
    PURGE_CHUNKS_PER_TURN,
    backlog_gauges,
    expire_interval,
    kept_topic,
    purge_expired,
)
from relay.shard_metrics import shard_probe
from relay.shards import RelayMembership, RunStop, ShardLeases, shard_count, touch
from relay.sinks.kafka.sink import DEFAULT_TOPIC_TEMPLATE, PublisherConfig, kafka_sink
from relay.sinks.kafka.topic_limits import TopicLimits
from relay.stats import RelayStats

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PollConfig:
    db_url: str = field(repr=False)  # holds the password
    names: SchemaNames = field(default_factory=SchemaNames)
    # The table's layout; for a Debezium table, check_schema reads the payload's type from it.
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    # Rows per read: larger pages gain little throughput here and cost memory (each row is a
    # Python object until Kafka acknowledges it).
    batch_size: int = 1000
    # Events sent but not yet acknowledged by Kafka: bounds memory while the broker is slow.
    max_in_flight: int = 10_000
    # Fallback when no NOTIFY arrives (e.g. a long transaction held the window back).
    poll_interval: float = 1.0
    # Acknowledged rows are deleted in batches at least this often.
    ack_interval: float = 0.05
    keep_published: dt.timedelta | None = None
    # The relay's topic template: kept rows store the topic their event was sent to.
    topic_template: str = DEFAULT_TOPIC_TEMPLATE
    standby_interval: float = 2.0
    # On stop: how long to wait for outstanding deliveries before exiting without their ack.
    shutdown_timeout: float = 30.0
    # A sharded outbox (relay/shards.py): run as one of several relays, each publishing the
    # shards it holds; `shard_count` is read from the table at start-up (check_schema).
    sharded: bool = False
    shard_lease: float = 10.0
    shard_count: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size > 0,
            "max_in_flight": self.max_in_flight >= self.batch_size,
            "poll_interval": self.poll_interval > 0,
            "ack_interval": self.ack_interval >= 0,
            "standby_interval": self.standby_interval > 0,
            # Checked a quarter of the lease apart, and a relay reads at least every poll
            # interval: a lease shorter than that would end healthy sessions.
            "shard_lease": self.shard_lease >= max(1.0, 2 * self.poll_interval),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigurationError(
                    f"{name}={getattr(self, name)!r} is out of range"
                    + (" (must be >= batch_size)" if name == "max_in_flight" else "")
                    + (" (must be at least 1s and twice the poll interval)"
                       if name == "shard_lease" else "")
                )
        if self.keep_published is not None and self.keep_published <= dt.timedelta(0):
            raise ConfigurationError("keep_published must be a positive duration")

    @property
    def leader_key(self) -> int:
        """Advisory lock key of this outbox table: one active relay per table."""
        name = f"outbox-relay:{self.names.schema}.{self.names.table}".encode()
        return zlib.crc32(name) - 2**31


def connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(f"cannot connect to PostgreSQL: {redact(str(exc))}") from exc


def row_record(row: tuple[Any, ...]) -> OutboxRecord:
    """The event of a row as the page queries of relay/sql/poll.sql select it."""
    headers = row[8]
    return OutboxRecord(
        created_at=row[9],
        id=row[1],
        aggregate_type=row[2],
        aggregate_id=row[3],
        event_type=row[4],
        topic=row[5],
        payload=row[6],
        content_type=row[7],
        headers=json.loads(headers) if headers != "{}" else {},
    )


class PollSource:
    """The polling source (relay/core/ports.py `Source`): committed rows in position order.

    One relay is active per outbox table: a session advisory lock elects it, the others wait as
    standbys. A row is deleted (or marked) only once its delivery succeeded; the row's position
    is its token. On a sharded outbox (`leases` given: relay/shards.py) the relay holds
    some shards instead, reads only their rows, and its run ends when they should be spread
    again.
    """

    name = "postgres-poll"
    latency_per_event = True
    read_waits = False
    after_failure = "unacknowledged events will be sent again"

    def __init__(
        self, config: PollConfig, stats: RelayStats, leases: ShardLeases | None = None
    ) -> None:
        self.config = config
        self.stats = stats
        self.cadence = Cadence(room=config.batch_size, max_in_flight=config.max_in_flight,
                               ack_interval=config.ack_interval,
                               shutdown_timeout=config.shutdown_timeout)
        self.caught_up = False
        self._last_expire = 0.0
        self._queries: dict[str, sql.Composed] = {}
        self._conn: psycopg.Connection[Any] | None = None
        self._listener: psycopg.Connection[Any] | None = None
        self._cursor = PollCursor()
        self.leases = leases
        self._reads = {name: f"{name}_sharded" if leases is not None else name
                       for name in ("fetch_late", "fetch_page")}

    def _query(self, name: str) -> Any:
        # Composed once per relay: a mapped table's queries are not cached by relay.queries.
        found = self._queries.get(name)
        if found is None:
            found = self._queries[name] = poll_query(self.config, name)
        return found

    @property
    def conn(self) -> psycopg.Connection[Any]:
        return while_open(self._conn)

    @contextlib.contextmanager
    def open(self, stop: threading.Event) -> Iterator[bool]:
        try:
            with connect(self.config.db_url) as conn, connect(self.config.db_url) as listener:
                self._conn, self._listener = conn, listener
                self.stats.source_connected = True
                try:
                    leading = (self._lead(conn, stop) if self.leases is None
                               else self.leases.claim(conn, stop))
                    self.stats.leader = leading
                    if leading:
                        listener.execute(self._query("listen"))
                        log.info("polling relay active", extra={
                            "event": "relay_active", "source": self.name,
                            "table": f"{self.config.names.schema}.{self.config.names.table}"})
                    yield leading
                finally:
                    self.stats.leader = False
                    self.stats.source_connected = False
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc

    def _lead(self, conn: psycopg.Connection[Any], stop: threading.Event) -> bool:
        """Wait as a standby until this relay holds the table's advisory lock."""
        announced = False
        while not stop.is_set():
            row = conn.execute(self._query("try_leadership"), {"key": self.config.leader_key})
            if row.fetchone() == (True,):
                self.stats.leader = True
                return True
            if not announced:
                log.info("another relay is active on this outbox; waiting as standby",
                         extra={"event": "relay_standby"})
                announced = True
            stop.wait(self.config.standby_interval)
        return False

    def held_keys(self) -> KeyHolds:
        return parked.held_keys(self.conn, self.config.names)

    def read(self, sink: Sink[int], park: Callable[[Refused], None], busy: bool) -> int:
        if self.leases is not None and self.leases.check(self.conn, may_end=True):
            self.caught_up = False  # the run ends: no idle work, the core drains
            return 0
        limit = self.config.batch_size
        rows = self._read(self.conn, self._cursor, limit)
        send = sink.send
        for row in rows:
            if row[6] is None:  # a Debezium payload may be null; the WAL relay parks it too
                park(Refused(row[0], "the payload column is null"))
            else:
                send(row_record(row), row[0])
        self.caught_up = len(rows) < limit
        return len(rows)

    def _read(
        self, conn: psycopg.Connection[Any], cursor: PollCursor, limit: int
    ) -> list[tuple[Any, ...]]:
        """Late rows and the next page, from one snapshot, in one round trip."""
        late_cur = None
        reads = self._reads
        shards = list(self.leases.held) if self.leases is not None else None
        with conn.pipeline():
            conn.execute(self._query("begin_snapshot"))
            snapshot_cur = conn.execute(self._query("snapshot"))
            late = cursor.late_rows()
            if late is not None:
                late_cur = conn.execute(self._query(reads["fetch_late"]), {
                    "ceiling": late.ceiling, "xmax": late.snapshot.xmax,
                    "in_progress": list(late.snapshot.in_progress), "shards": shards})
            page_cur = conn.execute(self._query(reads["fetch_page"]), {
                "after": cursor.after, "limit": limit, "shards": shards})
            conn.execute(self._query("end_snapshot"))
        if self.leases is not None:
            # psycopg ends a pipeline with a flush request after its sync, and the server arms
            # its idle-session timer only at a sync: without one more statement a relay that
            # hangs now would keep its shards' leases for ever.
            touch(conn, self.config.names)
        xmax, in_progress = snapshot_cur.fetchone() or ("0", [])
        late_rows = late_cur.fetchall() if late_cur is not None else []
        page = page_cur.fetchall()
        cursor.advance(Snapshot(xmax, tuple(in_progress)), [row[0] for row in page])
        return late_rows + page

    def apply(self, delivered: list[int], refused: list[Refused]) -> None:
        """Park rows that can never be published; delete (or mark) the delivered ones."""
        conn = self.conn
        for parking in refused:
            conn.execute(self._query("park"), {"position": parking.token,
                                               "reason": parking.reason})
        if delivered:
            name = "mark_published" if self.config.keep_published else "delete_published"
            conn.execute(self._query(name), {"positions": delivered})

    def confirm(self, *, final: bool) -> None:
        """Nothing to confirm: a row's removal is its acknowledgement."""

    def where(self, token: int) -> Mapping[str, object]:
        return {"position": token}

    def keep_alive(self) -> None:
        """Nothing to keep alive unsharded (the connections idle between statements); sharded,
        the sessions are touched within their lease while the sink is slow."""
        if self.leases is not None:
            self.leases.check(self.conn, may_end=False)

    def on_caught_up(self) -> None:
        """Delete kept rows past their retention, at most once a minute (it scans the table);
        a large purge goes on over the next turns, new events first."""
        keep = self.config.keep_published
        if keep is None or time.monotonic() - self._last_expire < expire_interval(keep):
            return
        _, finished = purge_expired(self.conn, self.config.names, keep, PURGE_CHUNKS_PER_TURN)
        if finished:
            self._last_expire = time.monotonic()

    def wait_for_more(self, stop: threading.Event) -> None:
        """Wait for a notification of new rows (or the poll interval, for a late commit)."""
        assert self._listener is not None
        if stop.is_set():
            return
        for _ in self._listener.notifies(timeout=self.config.poll_interval, stop_after=1):
            pass

    def finish(self, unacknowledged: int) -> None:
        log.info("polling relay stopped", extra={
            "event": "relay_stopped", "unacknowledged": unacknowledged})

    def abandon(self, *, blocked: bool) -> None:
        if blocked:  # the rows not acknowledged stay: the next relay sends them again
            log.info("polling relay stopped while Kafka was unavailable",
                     extra={"event": "relay_stopped"})


def polling_relay(
    config: PollConfig, publisher_config: PublisherConfig, stats: RelayStats,
    topic_limits: TopicLimits | None = None,
) -> RelayCore[int]:
    """The polling relay: the core driving a PollSource into the Kafka sink."""
    return RelayCore(PollSource(config, stats), kafka_sink(publisher_config, stats, topic_limits),
                     stats)


class ShardedRelay:
    """A polling relay over a sharded outbox (relay/shards.py): runs of the core, each
    over the shards it claimed, one after another until the daemon stops. A run ends (drained)
    when its source gives its shards up to spread them again; the relay's membership lasts
    across runs."""

    def __init__(
        self, config: PollConfig, publisher_config: PublisherConfig, stats: RelayStats,
        topic_limits: TopicLimits | None = None,
    ) -> None:
        self.config = config
        self.publisher_config = publisher_config
        self.stats = stats
        self.topic_limits = topic_limits
        self.source: PollSource | None = None
        stats.gauges["shards_held"] = lambda: len(self._held())
        stats.labelled["shards"] = shard_probe(config.db_url, config.names, config.leader_key,
                                               self._held)

    def _held(self) -> tuple[int, ...]:
        return self.source.leases.held if self.source and self.source.leases else ()

    def run(self, stop: threading.Event) -> None:
        config = self.config
        membership = RelayMembership(config.db_url, config.names, config.leader_key,
                                     config.shard_lease)
        previous: tuple[int, ...] = ()
        try:
            while not stop.is_set():
                run_stop = RunStop(stop)
                # The shards of the run before first: a rebalance moves only what must move.
                leases = ShardLeases(config.names, config.leader_key, config.shard_count or 0,
                                     config.shard_lease, config.shutdown_timeout, membership,
                                     run_stop.set, previous)
                self.source = PollSource(config, self.stats, leases)
                sink = kafka_sink(self.publisher_config, self.stats, self.topic_limits)
                RelayCore(self.source, sink, self.stats).run(run_stop)
                previous = leases.held
        finally:
            self.source = None
            membership.close()


def check_schema(config: PollConfig) -> PollConfig:
    """Fail at start-up, with the fix, when the outbox schema is missing or out of date.

    Returns the config to run with: for a table of another layout, its column mapping with
    the payload type read from the table. Whether the table is sharded is a relay's question
    (check_shards), not a reader's: `outbox replay` reads a sharded table as any other.
    """
    names = config.names
    setup = migrate.command(names, config.columns.layout)
    with connect(config.db_url) as conn:
        missing = [name for name in (names.table, names.parked_table)
                   if not catalog.table_exists(conn, catalog.qualified(conn, names, name))]
        if config.columns.is_native or names.table in missing:
            types: dict[str, str] = {}
        else:
            types = catalog.column_types(conn, catalog.qualified(conn, names, names.table))
    if config.columns.is_native:
        if missing:
            raise FatalRelayError(
                f"table(s) {', '.join(missing)} missing in schema {names.schema!r}: "
                f"run `{setup}` first")
        return config
    if names.table in missing:
        raise FatalRelayError(
            f"table {names.schema}.{names.table} does not exist: with --columns "
            f"{config.columns.layout or 'mapped'} it is the application's own outbox table, "
            f"given the relay's bookkeeping by `{setup}`")
    # The bookkeeping first: a Debezium table that was never migrated lacks it and the parked
    # table both, and the columns are what the message has to explain.
    bookkeeping = [c for c in ("position", "txid", "published_at") if c not in types]
    if bookkeeping:
        raise FatalRelayError(
            f"table {names.schema}.{names.table} has no column {', '.join(bookkeeping)}: the "
            "polling relay needs them to read events in insertion order without skipping late "
            f"commits; run `{setup}` to add them (writers of the table's own columns keep "
            "working)")
    if missing:
        raise FatalRelayError(
            f"table {names.parked_table} missing in schema {names.schema!r}: run `{setup}` "
            "first")
    columns = config.columns
    absent = [c for c in columns.present().values() if c not in types]
    if absent:
        raise FatalRelayError(
            f"table {names.schema}.{names.table} has no column {', '.join(absent)}, which "
            f"--columns {columns.layout or 'mapped'} reads")
    payload_type = _payload_type(types[columns.payload])
    if payload_type is None:
        raise FatalRelayError(
            f"column {columns.payload} of {names.schema}.{names.table} is "
            f"{types[columns.payload]}: the relay reads a payload of type jsonb, json, text, "
            "varchar or bytea")
    return dataclasses.replace(
        config, columns=dataclasses.replace(columns, payload_type=payload_type))


def check_shards(config: PollConfig) -> PollConfig:
    """A sharded outbox needs sharded relays (--shards), and --shards a sharded outbox: one
    relay taking the table's lead and others holding shards would publish rows twice at once."""
    names = config.names
    with connect(config.db_url) as conn:
        count = shard_count(conn, names)
    if config.sharded and count is None:
        raise FatalRelayError(
            f"--shards: table {names.schema}.{names.table} is not sharded; run "
            f"`{migrate.command(names)} --shards N` first (docs/operations.md)")
    if not config.sharded and count is not None:
        raise FatalRelayError(
            f"table {names.schema}.{names.table} is sharded ({count} shards): run every relay "
            "of it with --shards")
    if count == 0:
        raise FatalRelayError(f"table {names.shards_table} lists no shard")
    return dataclasses.replace(config, shard_count=count)


# Payload column types the relay can read (format_type's spelling), and how it reads them.
_PAYLOAD_TYPES: dict[str, PayloadType] = {
    "jsonb": "jsonb", "json": "json", "text": "text", "bytea": "bytea"}


def _payload_type(declared: str) -> PayloadType | None:
    """The payload type of a column declared as `declared` (format_type), if readable."""
    if declared.startswith(("character varying", "character(")):
        return "text"  # read as text: the relay takes its UTF-8 bytes
    return _PAYLOAD_TYPES.get(declared)


# Queries of poll.sql that name event columns; a table of another layout has `_mapped` twins.
_MAPPED_QUERIES = frozenset(("fetch_late", "fetch_page", "park", "backlog"))


def poll_query(config: PollConfig, name: str) -> sql.Composed:
    """Block `name` of relay/sql/poll.sql for the layout of this table."""
    if name == "mark_published":
        return queries.compose("poll.sql", name, config.names,
                               set_topic=kept_topic(config.topic_template, config.columns))
    if config.columns.is_native or name not in _MAPPED_QUERIES:
        return queries.query("poll.sql", name, config.names)
    return queries.compose("poll.sql", f"{name}_mapped", config.names,
                           **_mapped_columns(config.columns))


def _mapped_columns(columns: ColumnMapping) -> dict[str, sql.Composable]:
    """The event columns of a mapped table as select lists in `row_record`'s order (after
    position): what the table lacks gets the default the WAL relay gives it; the payload is
    read as its bytes (JSON and text: their UTF-8 encoding, as the WAL relay sends them)."""

    def column(name: str | None, default: str) -> sql.Composable:
        return sql.Identifier(name) if name is not None else sql.SQL(default)

    payload = sql.Identifier(columns.payload)
    first = [
        sql.Identifier(columns.id), sql.Identifier(columns.aggregate_type),
        sql.Identifier(columns.aggregate_id), sql.Identifier(columns.event_type),
        column(columns.topic, "NULL::text"),
        payload if columns.payload_type == "bytea"
        else sql.SQL("convert_to({}::text, 'UTF8')").format(payload),
        sql.Identifier(columns.content_type) if columns.content_type is not None
        else sql.Literal(columns.default_content_type),
    ]
    created_at = column(columns.created_at, "NULL::timestamptz")
    headers = sql.Identifier(columns.headers) if columns.headers is not None else None
    return {
        "event_columns": sql.SQL(", ").join([
            *first,
            sql.SQL("{}::text").format(headers) if headers is not None else sql.Literal("{}"),
            created_at]),
        "parked_columns": sql.SQL(", ").join([
            *first, headers if headers is not None else sql.SQL("'{}'::jsonb"), created_at]),
        "payload": payload,
        "oldest": sql.SQL("min({})").format(created_at) if columns.created_at is not None
        else sql.SQL("NULL::timestamptz"),
    }


def event_select_list(columns: ColumnMapping) -> sql.Composable:
    """The event columns of the table, as the page queries select them after position (what
    `row_record` reads): for `outbox replay`, which reads published rows the same way."""
    return _mapped_columns(columns)["event_columns"]


def poll_gauges(config: PollConfig) -> dict[str, Callable[[], float | None]]:
    """Backlog gauges for the metrics endpoint."""
    mapped = None if config.columns.is_native else poll_query(config, "backlog")
    return backlog_gauges(config.db_url, config.names, mapped)
