"""The relay's sources by name, each with what is its own: the connection it needs, the settings
it reads (another source's setting is ignored with a warning, a table layout refused), its Kafka
defaults, and its daemon wiring in `relay/<source>/factory.py`: its config from the settings,
its start-up checks, its gauges and the relay it runs.

Adding a source is a package with such a factory module and an entry here. The packages are
imported only when a relay of theirs starts: a PostgreSQL relay never loads pymongo, and the
reverse.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from outbox.errors import ConfigurationError

if TYPE_CHECKING:
    from relay.daemon import Relay
    from relay.settings import RelaySettings
    from relay.sinks.kafka.sink import PublisherConfig
    from relay.sinks.kafka.topic_limits import TopicLimits
    from relay.stats import RelayStats

log = logging.getLogger(__name__)

Gauges = dict[str, Callable[[], float | None]]

# What the daemon needs to start a source, with the option that gives it.
_NEEDS = {
    "db_url": "--db / OUTBOX_DB_URL",
    "mongo_url": "--mongo / OUTBOX_MONGO_URL",
    "collections": "--collections a,b",
}
# The settings that only some sources read, in the order they are checked. A source given one
# it does not read, at another value than the default, says so at start-up (a warning: a
# shared environment may set them for several relays; the relay starts as it always did), and
# for those in REFUSED_ELSEWHERE it refuses to start. Not among them: the connection URLs (an
# environment may well hold both, as .local/stack.env does), and batch_size and poll_interval,
# which tune the sources that have them (`--relay-env OUTBOX_BATCH_SIZE=...` of the benchmark
# applies to every source it runs; the WAL source streams and has neither).
OWN_SETTINGS = ("columns", "schema", "keep_published", "slot", "publication", "message_prefix",
                "table_less", "on_slot_loss", "max_slot_wal", "collections", "shards",
                "shard_lease")
_POSTGRES = frozenset({"columns", "schema", "keep_published"})
# A table layout on a source that reads no table: refused, as it always was. Shards on a source
# that cannot share an outbox: refused, it would publish every shard beside the sharded relays.
REFUSED_ELSEWHERE = frozenset({"columns", "shards"})

# The WAL relay drains a backlog at up to ~90,000 events/s: waiting 5 ms (not the default 1) to
# fill batches sends it in fewer, larger produce requests, cutting the CPU librdkafka and the
# broker spend per event (relay 13.9 -> 12.1 us/event, drain +15% on a 2-core machine shared
# with PostgreSQL and Kafka). It adds up to 5 ms of latency: p99 5.7 ms at 1,000 events/s.
WAL_KAFKA_DEFAULTS: Mapping[str, str] = {"linger.ms": "5"}


class Wiring(Protocol):
    """What `relay/<source>/factory.py` provides."""

    def config(self, settings: RelaySettings) -> Any:
        """The source's own config object, with its defaults and its validation."""

    def check(self, config: Any, source: Source) -> Any:
        """Fail fast on a wrong setup (tables, slot, privileges); the config to run with."""

    def gauges(self, config: Any) -> Gauges:
        """The source's gauges of the metrics endpoint (backlog, lag)."""

    def relay_factory(self, settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
        """Check the source once and return a maker of relays (relay.main)."""


@dataclass(frozen=True)
class Source:
    """One source of the registry: checked with the settings (`require`, `refuse_others`),
    then run through its factory module (`config`, `check`, `gauges`, `prepare`)."""

    name: str
    needs: tuple[str, ...]  # of _NEEDS
    reads: frozenset[str]  # of OWN_SETTINGS
    factory: str  # the module of its Wiring
    kafka_defaults: Mapping[str, str] = field(default_factory=dict)
    doctor: bool = False  # `outbox doctor` has checks for it
    # Combinations of its own settings it refuses.
    rules: Callable[[RelaySettings], None] | None = None

    @property
    def wiring(self) -> Wiring:
        return cast(Wiring, importlib.import_module(self.factory))

    def require(self, settings: RelaySettings) -> None:
        """Refuse settings that lack what this source needs to start."""
        for setting in self.needs:
            if not getattr(settings, setting):
                raise ConfigurationError(
                    f"source {self.name} needs {setting} ({_NEEDS[setting]})")

    def refuse_others(self, settings: RelaySettings) -> None:
        """Refuse (or warn of) the settings of other sources, and combinations this one
        cannot run."""
        defaults = _defaults(settings)
        for setting in OWN_SETTINGS:
            value = getattr(settings, setting)
            if setting not in self.reads and value != defaults[setting]:
                message = f"{setting}={_shown(value)!r} applies to the {_readers(setting)} only"
                if setting in REFUSED_ELSEWHERE:
                    raise ConfigurationError(message)
                log.warning(f"{message}; the {self.name} source ignores it", extra={
                    "event": "setting_ignored", "setting": setting, "source": self.name})
        if self.rules is not None:
            self.rules(settings)

    def config(self, settings: RelaySettings) -> Any:
        return self.wiring.config(settings)

    def check(self, config: Any) -> Any:
        return self.wiring.check(config, self)

    def gauges(self, config: Any) -> Gauges:
        return self.wiring.gauges(config)

    def prepare(
        self, settings: RelaySettings, stats: RelayStats
    ) -> tuple[Any, PublisherConfig, TopicLimits]:
        """What every relay of this source runs with: its checked config, the Kafka side with
        its defaults, and the topic limits the daemon keeps across the relay's restarts. Its
        gauges are registered in `stats`."""
        from relay.sinks.kafka.sink import topic_limits_for

        config = self.check(self.config(settings))
        publisher = settings.publisher(self.kafka_defaults)
        stats.gauges.update(self.gauges(config))
        return config, publisher, topic_limits_for(publisher)

    def relay_factory(self, settings: RelaySettings, stats: RelayStats) -> Callable[[], Relay]:
        return self.wiring.relay_factory(settings, stats)


def _table_less_rules(settings: RelaySettings) -> None:
    if settings.columns != "native" and settings.table_less:
        raise ConfigurationError(
            f"columns={settings.columns!r} with table_less: a table-less relay reads no table")


def _poll_rules(settings: RelaySettings) -> None:
    _table_less_rules(settings)
    if settings.shards and settings.columns != "native":
        raise ConfigurationError(
            f"shards with columns={settings.columns!r}: only the native outbox can be sharded")


def _wal_rules(settings: RelaySettings) -> None:
    _table_less_rules(settings)
    if settings.on_slot_loss not in ("stop", "recover"):
        raise ConfigurationError(
            f"on_slot_loss={settings.on_slot_loss!r}: choose stop or recover")
    if settings.on_slot_loss == "recover" and settings.table_less:
        raise ConfigurationError(
            "on_slot_loss='recover' with table_less: table-less events exist only in the WAL, "
            "so a lost slot's events cannot be recovered from a table; use on_slot_loss='stop'")


SOURCES: dict[str, Source] = {source.name: source for source in (
    Source("postgres-poll", ("db_url",), _POSTGRES | {"shards", "shard_lease"},
           "relay.poll.factory", doctor=True, rules=_poll_rules),
    Source("postgres-wal", ("db_url",),
           _POSTGRES | {"slot", "publication", "message_prefix", "table_less", "on_slot_loss",
                        "max_slot_wal"},
           "relay.wal.factory", kafka_defaults=WAL_KAFKA_DEFAULTS, doctor=True,
           rules=_wal_rules),
    # --table names the outbox collection of outbox.mongo.publish for these sources.
    Source("mongo-poll", ("mongo_url", "collections"), frozenset({"collections"}),
           "relay.mongo.factory"),
    Source("mongo-stream", ("mongo_url", "collections"), frozenset({"collections"}),
           "relay.mongo.factory"),
)}
NAMES: tuple[str, ...] = tuple(SOURCES)


def get(name: str) -> Source:
    """The source named `name` (validated with the settings)."""
    return SOURCES[name]


def _readers(setting: str) -> str:
    """`postgres-* sources`, `postgres-wal source`: the sources that read `setting`."""
    names = [source.name for source in SOURCES.values() if setting in source.reads]
    families = {name.split("-")[0] for name in names}
    family = next(iter(families))
    if len(families) == 1 and len(names) > 1 and len(names) == sum(
            other.startswith(f"{family}-") for other in SOURCES):
        return f"{family}-* sources"
    return f"{' and '.join(names)} source" + ("s" if len(names) > 1 else "")


def _shown(value: Any) -> Any:
    if isinstance(value, dt.timedelta):
        return f"{value.total_seconds():g}s"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


def _defaults(settings: RelaySettings) -> dict[str, Any]:
    return {item.name: item.default if item.default_factory is dataclasses.MISSING
            else item.default_factory() for item in dataclasses.fields(settings)}
