"""What `outbox verify` runs: the validated settings and the fault schedule (no I/O)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from relay.sinks.kafka.settings import admin_settings, producer_settings

SOURCES = ("postgres-poll", "postgres-wal", "mongo-poll", "mongo-stream")
FAULTS = ("relay-kill", "relay-stop", "connection-drop")
# Every scratch object's name starts with this, so that leftovers of a verify process that was
# itself killed with SIGKILL are easy to find (docs/operations.md).
PREFIX = "outbox_verify_"


def parse_faults(text: str) -> tuple[str, ...]:
    """`relay-kill,relay-stop` -> the faults, in the order given; unknown names refused."""
    faults = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ConfigurationError(
            f"--faults: unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    return faults


_QUIET = logging.getLogger("relay.verify.kafka")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@dataclass(frozen=True)
class KafkaAccess:
    """How verify and its relay reach the brokers: the bootstrap servers and the relay's
    librdkafka settings (TLS, SASL), validated as the relay validates them."""

    bootstrap: str
    settings: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for _, value in self.settings:
            if any(c.isspace() for c in value):
                raise ConfigurationError(
                    "--kafka-setting: a value with spaces cannot be passed on to the relay")
        self.producer()

    def producer(self) -> dict[str, str]:
        return producer_settings(self.bootstrap, dict(self.settings))

    def client_config(self) -> dict[str, Any]:
        """Connection and security settings for verify's admin client and topic reader."""
        # librdkafka's connection errors would flood stderr over the progress line; what
        # matters reaches verify as an error of the call (broker check, topic, reader).
        return {**admin_settings(self.producer(), dict(self.settings)), "logger": _QUIET}

    def environment(self) -> dict[str, str]:
        """The relay's variables for the same brokers."""
        env = {"OUTBOX_KAFKA_BOOTSTRAP": self.bootstrap}
        if self.settings:
            # A multiple option's variable is split at whitespace (hence no spaces in values).
            env["OUTBOX_KAFKA_SETTINGS"] = " ".join(f"{k}={v}" for k, v in self.settings)
        return env


@dataclass(frozen=True)
class ScratchNames:
    """The names of everything a run creates: table (and the tables derived from it), slot,
    publication, topic. One random suffix per run: two runs never share anything."""

    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    schema: str = "public"

    @property
    def table(self) -> str:
        return f"{PREFIX}{self.suffix}"

    @property
    def schema_names(self) -> SchemaNames:
        # The inbox table comes with the migrations: a name of its own, never the app's inbox.
        return SchemaNames(self.schema, self.table, inbox_table=f"{self.table}_inbox")

    @property
    def slot(self) -> str:
        return self.table

    @property
    def publication(self) -> str:
        return self.table

    @property
    def topic(self) -> str:
        return f"outbox-verify-{self.suffix}"

    @property
    def application_name(self) -> str:
        """The relay's connections are found by it (connection-drop)."""
        return f"outbox-verify-relay-{self.suffix}"


@dataclass(frozen=True)
class VerifyPlan:
    source: str
    duration: float  # seconds of writing
    rate: float  # events per second offered
    faults: tuple[str, ...] = ()
    schema: str = "public"
    keys: int = 100
    writers: int = 4  # threads, each with its own connection and its own keys
    rollback_every: int = 10  # every n-th transaction of a writer rolls back
    drain_timeout: float = 120.0  # after writing: how long the relay may take to catch up
    stall_timeout: float = 30.0  # ... and how long it may deliver nothing new meanwhile

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigurationError(
                f"--source {self.source!r} is not one of {', '.join(SOURCES)}")
        if not 1.0 <= self.duration <= 24 * 3600:
            raise ConfigurationError(
                f"--duration {self.duration:g}s: give between 1 s and 24 h")
        if not 0 < self.rate <= 100_000:
            raise ConfigurationError(f"--rate {self.rate:g}: give between 1 and 100000 events/s")
        for fault in self.faults:
            if fault not in FAULTS:
                raise ConfigurationError(f"--faults: unknown fault {fault!r}")
        if self.mongo and "connection-drop" in self.faults:
            raise ConfigurationError(
                "--faults connection-drop ends the relay's PostgreSQL sessions; it does not "
                f"apply to {self.source}")
        SchemaNames(self.schema)

    @property
    def wal(self) -> bool:
        return self.source == "postgres-wal"

    @property
    def mongo(self) -> bool:
        return self.source.startswith("mongo-")

    def fault_times(self) -> list[tuple[float, str]]:
        """When each fault is injected (seconds after the writers start), and which: the faults
        asked for in turn, about one every 8 s but each at least once, all inside the writing
        time and none in its first or last tenth (the relay is busy, not starting or idle)."""
        if not self.faults:
            return []
        count = max(len(self.faults), int(self.duration // 8))
        first, last = 0.1 * self.duration, 0.85 * self.duration
        step = (last - first) / count
        return [(first + step * (i + 0.5), self.faults[i % len(self.faults)])
                for i in range(count)]

    def stop_pause(self) -> float:
        """How long relay-stop keeps the relay stopped."""
        return min(3.0, max(0.5, self.duration / 10))

    def long_transaction(self) -> tuple[float, float]:
        """(start, end) of the one long transaction, seconds after the writers start: it begins
        early and commits late, after many later transactions (a polling relay that read by
        position alone would skip its rows)."""
        start, end = 0.05 * self.duration, 0.75 * self.duration
        if self.mongo:
            # MongoDB ends a transaction after 60 s (transactionLifetimeLimitSeconds).
            end = min(end, start + 30.0)
        return start, end
