"""`outbox replay`: republish retained (published) events that match a filter, per key in their
original commit order, with their own ids and a header `replayed: true`.

The retained rows (`--keep-published`) are read as a `Source` (relay/core/ports.py) and driven
into the Kafka sink by the relay core, as slot recovery drives unpublished rows
(relay/wal/recovery.py): the same producer settings, topic resolution, size limits and delivery
triage as the relay. Nothing is written to the database: replay is at least once by nature, and
a rerun sends again what an interrupted run sent; idempotent consumers skip the events they
applied already (the same ids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from outbox.columns import ColumnMapping
from outbox.conninfo import libpq_url, redact
from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from outbox.record import OutboxRecord
from relay import catalog, queries
from relay.core.holds import KeyHolds
from relay.core.loop import RelayCore
from relay.core.ports import Cadence, Refused, Sink, while_open
from relay.errors import FatalRelayError, SourceUnavailableError
from relay.poll.relay import PollConfig, check_schema, event_select_list, row_record
from relay.sinks.kafka.settings import valid_topic
from relay.sinks.kafka.sink import PublisherConfig, check_topic_template, kafka_sink, topic_for
from relay.sinks.kafka.topic_limits import TopicLimits
from relay.stats import RelayStats

log = logging.getLogger(__name__)

REPLAYED_HEADER = ("replayed", "true")


class ReplayRefusedError(FatalRelayError):
    """The replay cannot run as asked; nothing was sent."""


@dataclass(frozen=True)
class ReplayFilter:
    """Which retained events to replay: every given criterion must match (an event id list or
    an aggregate id list matches any of its values). `since`/`until` bound the event's
    `created_at` (its writing transaction's time), `since` included, `until` excluded."""

    aggregate_type: str | None = None
    aggregate_ids: tuple[str, ...] = ()
    event_ids: tuple[uuid.UUID, ...] = ()
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    everything: bool = False  # --all: no criterion is needed

    def __post_init__(self) -> None:
        if self.everything and not self.empty:
            raise ConfigurationError(
                "--all replays every retained event: give it alone, or give filters without it")
        if not self.everything and self.empty:
            raise ConfigurationError(
                "no filter given: pass --aggregate-type, --aggregate-id, --event-id, --since or "
                "--until, or --all to replay every retained event")
        if self.aggregate_type == "" or "" in self.aggregate_ids:
            raise ConfigurationError("--aggregate-type and --aggregate-id may not be empty")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ConfigurationError(f"--{name} {value.isoformat()} has no time zone")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ConfigurationError(
                f"--since {self.since.isoformat()} is not before --until {self.until.isoformat()}")

    @property
    def empty(self) -> bool:
        return (self.aggregate_type is None and not self.aggregate_ids and not self.event_ids
                and self.since is None and self.until is None)

    @classmethod
    def parse(
        cls, *, aggregate_type: str | None = None, aggregate_ids: list[str] | None = None,
        event_ids: list[str] | None = None, since: str | None = None, until: str | None = None,
        everything: bool = False,
    ) -> ReplayFilter:
        """From the command line's text; a bad UUID or time is named in the error."""
        return cls(aggregate_type=aggregate_type, aggregate_ids=tuple(aggregate_ids or ()),
                   event_ids=tuple(_event_id(text) for text in event_ids or ()),
                   since=_instant(since, "since"), until=_instant(until, "until"),
                   everything=everything)

    def params(self) -> dict[str, Any]:
        return {
            "aggregate_type": self.aggregate_type,
            "aggregate_ids": list(self.aggregate_ids),
            "event_ids": [str(event_id) for event_id in self.event_ids],
            "since": self.since,
            "until": self.until,
        }


def _event_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise ConfigurationError(f"--event-id {text!r} is not a UUID") from None


def _instant(text: str | None, option: str) -> dt.datetime | None:
    """ISO 8601; a time without an offset is UTC (said in --help)."""
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigurationError(
            f"--{option} {text!r} is not an ISO 8601 time like 2026-12-08T09:30:00Z") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class ReplayConfig:
    db_url: str = field(repr=False)  # holds the password
    filter: ReplayFilter
    names: SchemaNames = field(default_factory=SchemaNames)
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    # Every event goes to this topic instead of its own (a consumer's private topic).
    to_topic: str | None = None
    # The relay's --topic-template: where an event without a topic of its own was published.
    topic_template: str = "{aggregate_type}"
    batch_size: int = 1000
    max_in_flight: int = 10_000
    shutdown_timeout: float = 30.0
    # Seconds between progress lines (count, rate, ETA).
    progress_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.to_topic is not None and not valid_topic(self.to_topic):
            raise ConfigurationError(
                f"--to-topic {self.to_topic!r} is not a valid Kafka topic name "
                "(letters, digits, '.', '_', '-'; at most 249)")
        check_topic_template(self.topic_template)
        if self.columns.created_at is None and (self.filter.since or self.filter.until):
            raise ConfigurationError(
                "--since/--until filter on the event's creation time, and this table layout "
                "has no created_at column")


@dataclass
class ReplayReport:
    matched: int  # retained events that match, when the replay began
    by_topic: dict[str, int]  # sent (acknowledged by Kafka), or would be sent with dry_run
    refused: int  # refused by Kafka for good (not replayed; logged)
    seconds: float
    complete: bool
    dry_run: bool = False

    @property
    def sent(self) -> int:
        return sum(self.by_topic.values())

    def summary(self) -> str:
        topics = ", ".join(f"{topic}: {count}" for topic, count in sorted(self.by_topic.items()))
        if self.dry_run:
            return f"dry run: would replay {self.matched} event(s) ({topics or 'none'})"
        verb = "replayed" if self.complete else "interrupted after replaying"
        refused = f", {self.refused} refused by Kafka" if self.refused else ""
        return (f"{verb} {self.sent} of {self.matched} event(s) in {self.seconds:.1f} s "
                f"({topics or 'none'}){refused}")


def check(config: ReplayConfig) -> ReplayConfig:
    """Refuse, before anything is sent, a table that does not exist or keeps nothing to
    replay; returns the config with the payload type of a mapped table read from it."""
    poll = check_schema(PollConfig(db_url=config.db_url, names=config.names,
                                   columns=config.columns))
    names = config.names
    with _connect(config.db_url) as conn:
        types = catalog.column_types(conn, catalog.qualified(conn, names, names.table))
    if "commit_lsn" not in types:
        raise ReplayRefusedError(
            f"table {names.schema}.{names.table} has no column commit_lsn, the commit order "
            "replay follows: run `outbox migrate up` (migration 0005) first")
    return dataclasses.replace(config, columns=poll.columns)


class Progress:
    """Log lines on a long replay: events sent so far, the rate, the time left."""

    def __init__(self, total: int, interval: float) -> None:
        self.total = total
        self.interval = interval
        self.started = self._last = time.monotonic()

    def tick(self, sent: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = sent / elapsed
        eta = (self.total - sent) / rate if rate > 0 else None
        left = round(eta, 1) if eta is not None else None
        log.info("replayed %d of %d events (%.0f/s, %s s left)", sent, self.total, rate,
                 "?" if left is None else f"{left:.0f}",
                 extra={"event": "replay_progress", "sent": sent, "total": self.total,
                        "rate": round(rate, 1), "eta_seconds": left})


class ReplaySource:
    """The matching retained rows in commit order (relay/sql/replay.sql), from one snapshot and
    a server-side cursor; every event is sent with the `replayed` header. Answers are counted,
    never written: the rows stay as they are. The run ends (`ended` is set) once every row was
    sent and answered."""

    name = "replay"
    latency_per_event = False  # the events are old: their age says nothing about the relay
    read_waits = False
    after_failure = ("run the replay again: it sends every matching event again, and "
                     "consumers skip those they applied")

    def __init__(self, config: ReplayConfig, stats: RelayStats, ended: threading.Event) -> None:
        self.config = config
        self.stats = stats
        self.cadence = Cadence(room=config.batch_size, max_in_flight=config.max_in_flight,
                               ack_interval=0.5, shutdown_timeout=config.shutdown_timeout)
        self.caught_up = False
        self.complete = False
        self.matched = 0
        self.refused = 0
        self._ended = ended
        self._cursor: psycopg.ServerCursor[Any] | None = None
        self._progress: Progress | None = None

    @contextlib.contextmanager
    def open(self, stop: threading.Event) -> Iterator[bool]:
        config = self.config
        try:
            with _connect(config.db_url) as conn:
                conn.execute(queries.query("replay.sql", "begin_snapshot", config.names))
                self.matched = sum(routes(conn, config).values())
                self._progress = Progress(self.matched, config.progress_interval)
                log.info("replaying %d retained events", self.matched, extra={
                    "event": "replay_started", "matched": self.matched})
                with conn.cursor(name="outbox_replay") as cursor:
                    cursor.itersize = config.batch_size
                    cursor.execute(matching(config, "events"), config.filter.params())
                    self._cursor = cursor
                    self.stats.source_connected = True
                    yield True
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc
        finally:
            self._cursor = None
            self.stats.source_connected = False

    def held_keys(self) -> KeyHolds:
        """None: the live relay's parked events do not hold back a replay of older ones."""
        return KeyHolds()

    def read(self, sink: Sink[int], park: Callable[[Refused], None], busy: bool) -> int:
        rows = while_open(self._cursor).fetchmany(self.config.batch_size)
        to_topic = self.config.to_topic
        send = sink.send
        for row in rows:
            if row[6] is None:
                park(Refused(row[0], "the payload column is null"))
                continue
            record = row_record(row)
            send(record._replace(headers={**record.headers, REPLAYED_HEADER[0]:
                                          REPLAYED_HEADER[1]},
                                 topic=to_topic or record.topic), row[0])
        self.caught_up = len(rows) < self.config.batch_size
        if self._progress is not None:
            self._progress.tick(self.sent)
        return len(rows)

    @property
    def sent(self) -> int:
        return sum(self.stats.published.values())

    def apply(self, delivered: list[int], refused: list[Refused]) -> None:
        """Nothing to write: a refused event is only counted (and logged by the core)."""
        self.refused += len(refused)

    def confirm(self, *, final: bool) -> None:
        """Nothing to confirm: a replay keeps no position (a rerun starts over)."""

    def where(self, token: int) -> Mapping[str, object]:
        return {"position": token, "replay": True}

    def keep_alive(self) -> None:
        """Nothing: the cursor's connection idles between fetches."""

    def on_caught_up(self) -> None:
        """Nothing: replay keeps no retention of its own."""

    def wait_for_more(self, stop: threading.Event) -> None:
        """Every matching row was sent and answered: the replay is over."""
        self.complete = True
        self._ended.set()

    def finish(self, unacknowledged: int) -> None:
        if unacknowledged or not self.complete:
            self.complete = False
        if self._progress is not None:
            self._progress.tick(self.sent, force=True)

    def abandon(self, *, blocked: bool) -> None:
        self.complete = False


def routes(conn: psycopg.Connection[Any], config: ReplayConfig) -> dict[str, int]:
    """The matching events counted per topic they go to (the dry run's answer)."""
    counts: Counter[str] = Counter()
    to_topic = config.to_topic
    for topic, aggregate_type, aggregate_id, event_type, count in conn.execute(
            matching(config, "routes"), config.filter.params()):
        route = OutboxRecord(uuid.UUID(int=0), aggregate_type, aggregate_id, event_type, b"",
                             "", topic=topic)
        counts[to_topic or topic_for(route, config.topic_template)] += count
    return dict(counts)


def matching(config: ReplayConfig, shape: str) -> sql.Composed:
    """relay/sql/replay.sql `matching` as the events in order, or their routes counted."""
    columns = config.columns

    def column(name: str | None, default: str) -> sql.Composable:
        return sql.Identifier("t", name) if name is not None else sql.SQL(default)

    routing = [column(columns.topic, "NULL::text"), column(columns.aggregate_type, ""),
               column(columns.aggregate_id, ""), column(columns.event_type, "")]
    if shape == "events":
        select_list: sql.Composable = sql.SQL("t.position, {}").format(
            event_select_list(columns))
        tail: sql.Composable = sql.SQL("ORDER BY t.commit_lsn NULLS FIRST, t.position")
    else:
        select_list = sql.SQL(", ").join([*routing, sql.SQL("count(*)")])
        tail = sql.SQL("GROUP BY 1, 2, 3, 4")
    return queries.compose(
        "replay.sql", "matching", config.names, select_list=select_list, tail=tail,
        aggregate_type=routing[1], aggregate_id=routing[2], id=column(columns.id, ""),
        created_at=column(columns.created_at, "NULL::timestamptz"))


def dry_run(config: ReplayConfig) -> ReplayReport:
    started = time.monotonic()
    with _connect(config.db_url) as conn:
        by_topic = routes(conn, config)
    return ReplayReport(sum(by_topic.values()), by_topic, 0, time.monotonic() - started,
                        complete=True, dry_run=True)


def replay(
    config: ReplayConfig, publisher: PublisherConfig, stop: threading.Event,
    *, topic_limits: TopicLimits | None = None, stats: RelayStats | None = None,
) -> ReplayReport:
    """Send the matching events through the relay core and the Kafka sink until all were
    answered or `stop` is set (SIGINT/SIGTERM: what was sent is counted, the rest is not)."""
    started = time.monotonic()
    stats = stats if stats is not None else RelayStats(source="replay")
    if publisher.topic_template != config.topic_template:
        raise ConfigurationError("the replay's topic template and its publisher's differ")
    source = ReplaySource(config, stats, stop)
    RelayCore(source, kafka_sink(publisher, stats, topic_limits), stats).run(stop)
    report = ReplayReport(source.matched, {t: c for t, c in stats.published.items() if c},
                          source.refused, time.monotonic() - started, source.complete)
    log.info(report.summary(), extra={"event": "replay_finished", "sent": report.sent,
                                      "matched": report.matched, "complete": report.complete})
    return report


def _connect(db_url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(f"cannot connect to PostgreSQL: {redact(str(exc))}") from exc
