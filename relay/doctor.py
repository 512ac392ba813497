"""`outbox doctor`: pre-flight checks of the database, the relay's role and Kafka, with fixes."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from outbox import migrate as migrations
from outbox.conninfo import libpq_url, redact
from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES
from relay import queries, sources
from relay.sinks.kafka.settings import (
    LIBRDKAFKA_MESSAGE_MAX_BYTES,
    admin_settings,
    producer_settings,
    valid_topic,
)
from relay.status import TableAccess, current_wal_lsn, read_tables, slot_lag
from relay.wal import slots
from relay.wal.errors import (
    SlotInUseError,
    SlotInvalidatedError,
    SlotMismatchError,
    WalError,
)
from relay.wal.lsn import format_lsn
from relay.wal.source import WalSourceConfig

SOURCES = tuple(name for name, source in sources.SOURCES.items() if source.doctor)
# Room above the payload for the key, the headers (id, event_type, aggregate_type,
# content_type, traceparent, the event's own) and the record batch framing.
RECORD_OVERHEAD_BYTES = 16 * 1024
ROLES_SCRIPT = "deploy/roles.sql"


class Level(enum.StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    name: str
    level: Level
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class DoctorOptions:
    """What the relay will be run with; the checks compare the setup against it."""

    source: str = "postgres-poll"
    names: SchemaNames = field(default_factory=SchemaNames)
    slot: str = "outbox_relay"
    publication: str = "outbox_relay"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    topics: tuple[str, ...] = ()
    partitions: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigurationError(
                f"source={self.source!r}: doctor checks {' or '.join(SOURCES)}")
        if self.max_payload_bytes <= 0:
            raise ConfigurationError(
                f"max_payload_bytes={self.max_payload_bytes} must be a positive number of bytes")
        if self.partitions is not None and self.partitions <= 0:
            raise ConfigurationError(f"partitions={self.partitions} must be positive")
        if self.partitions is not None and not self.topics:
            raise ConfigurationError("partitions needs the topics to check (--topics a,b)")
        bad = [topic for topic in self.topics if not valid_topic(topic)]
        if bad:
            raise ConfigurationError(f"topics: {', '.join(map(repr, bad))} are not topic names")
        if self.source == "postgres-wal":
            slots.check_slot_name(self.slot)
            WalSourceConfig(self.slot, self.publication, self.names.schema, self.names.table)

    @property
    def wal(self) -> bool:
        return self.source == "postgres-wal"


# -- facts: what the checks look at, gathered at the edges ------------------------------------


@dataclass(frozen=True)
class RoleFacts:
    name: str
    superuser: bool
    replication: bool
    can_login: bool
    schema_exists: bool
    schema_usage: bool


@dataclass(frozen=True)
class DatabaseFacts:
    database: str
    settings: Mapping[str, str]  # pg_settings name -> setting (max_slot_wal_keep_size in MB)
    slots_used: int
    senders_used: int
    role: RoleFacts
    tables: Mapping[str, TableAccess]
    migrations: tuple[migrations.MigrationState, ...] | None  # None: not readable by the role
    slot: slots.SlotStatus | None = None
    current_lsn: int | None = None
    publication: slots.PublicationInfo | None = None
    table_columns: tuple[str, ...] = ()
    # Outcome of opening a replication connection (WAL only): None means it worked.
    replication_error: str | None = None


@dataclass(frozen=True)
class TopicFacts:
    name: str
    exists: bool
    partitions: int | None = None
    max_message_bytes: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class KafkaFacts:
    bootstrap: str
    error: str | None = None  # the broker could not be reached
    brokers: int = 0
    cluster_id: str | None = None
    broker_config: Mapping[str, str] = field(default_factory=dict)
    config_error: str | None = None  # describe_configs failed (e.g. not authorised)
    topics: Mapping[str, TopicFacts] = field(default_factory=dict)
    producer_max_bytes: int = LIBRDKAFKA_MESSAGE_MAX_BYTES


# -- checks: plain functions from facts to results --------------------------------------------


def _fix(names: SchemaNames, block: str, **parts: sql.Composable) -> str:
    """The statement of a fix (relay/sql/doctor.sql), names quoted as PostgreSQL reads them."""
    return queries.compose("doctor.sql", block, names, **parts).as_string()


def _role(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _bytes(count: int) -> str:
    return f"{count} bytes ({count / 1024 / 1024:.2f} MiB)"


def _grant(names: SchemaNames, role: str, privileges: Sequence[str], table: str) -> str:
    return _fix(names, "grant", role=_role(role), relation=sql.Identifier(table),
                privileges=sql.SQL(", ").join(map(sql.SQL, privileges)))


def check_wal_level(db: DatabaseFacts) -> CheckResult:
    level = db.settings.get("wal_level", "?")
    if level == "logical":
        return CheckResult("wal_level", Level.OK, "logical")
    return CheckResult(
        "wal_level", Level.FAIL,
        f"wal_level is {level}: logical decoding needs 'logical'",
        f"{_fix(SchemaNames(), 'set_wal_level')}; then restart PostgreSQL (managed services: "
        "rds.logical_replication = 1, cloudsql.logical_decoding = on)",
    )


def check_replication_slots(db: DatabaseFacts, options: DoctorOptions) -> CheckResult:
    total = int(db.settings.get("max_replication_slots", "0"))
    used = db.slots_used
    if db.slot is not None:
        return CheckResult("replication slots", Level.OK,
                           f"{used} of {total} in use, including {options.slot!r}")
    if total - used < 1:
        return CheckResult(
            "replication slots", Level.FAIL,
            f"no free replication slot for {options.slot!r}: {used} of {total} in use",
            "raise max_replication_slots (needs a restart), or drop slots nothing reads from "
            f"({_fix(options.names, 'list_slots')})",
        )
    return CheckResult("replication slots", Level.OK, f"{used} of {total} in use, room for one")


def check_wal_senders(db: DatabaseFacts) -> CheckResult:
    total = int(db.settings.get("max_wal_senders", "0"))
    used = db.senders_used
    streaming = db.slot is not None and db.slot.active
    # A relay that is not streaming yet needs a sender; a restarting relay needs one more while
    # the server has not yet noticed that the old connection is gone (wal_sender_timeout).
    needed = 0 if streaming else 1
    free = total - used
    summary = f"{used} of {total} in use"
    if free < needed:
        return CheckResult(
            "wal senders", Level.FAIL, f"no free WAL sender for the relay: {summary}",
            "raise max_wal_senders (needs a restart)",
        )
    if free < needed + 1:
        return CheckResult(
            "wal senders", Level.WARN,
            f"{summary}: no room for a reconnect while the old connection times out",
            "raise max_wal_senders (needs a restart) so that a restarted relay or a standby "
            "taking over finds a free sender",
        )
    return CheckResult("wal senders", Level.OK, summary)


def check_wal_keep_size(db: DatabaseFacts) -> CheckResult:
    value = db.settings.get("max_slot_wal_keep_size")
    if value is None:
        return CheckResult(
            "max_slot_wal_keep_size", Level.WARN,
            "this server has no max_slot_wal_keep_size (before PostgreSQL 13): a stopped relay "
            "makes it keep WAL without limit",
            "upgrade, or alert on the slot lag (`outbox status`, outbox_slot_lag_bytes)",
        )
    if value == "-1":
        return CheckResult(
            "max_slot_wal_keep_size", Level.WARN,
            "-1 (unbounded): while the relay is stopped or behind, the server keeps WAL for "
            "its slot until the disk is full",
            f"{_fix(SchemaNames(), 'set_wal_keep_size')} (sized to the disk; reload), and "
            "alert on the slot lag; see docs/operations.md, WAL slot safety",
        )
    limit = int(value) * 1024 * 1024
    return CheckResult(
        "max_slot_wal_keep_size", Level.OK,
        f"{_bytes(limit)}: a relay stopped for longer than that loses its slot "
        "(recovery: docs/operations.md)",
    )


def check_schema(db: DatabaseFacts, options: DoctorOptions) -> CheckResult:
    names = options.names
    migrate = "outbox migrate up --db URL (as the schema's owner), before deploying the relay"
    if not db.role.schema_exists:
        return CheckResult("outbox schema", Level.FAIL,
                           f"schema {names.schema!r} does not exist", migrate)
    table = db.tables.get(names.table)
    if table is None or not table.exists:
        return CheckResult("outbox schema", Level.FAIL,
                           f"table {names.schema}.{names.table} does not exist", migrate)
    if db.migrations is None:
        return CheckResult(
            "outbox schema", Level.WARN,
            f"role {db.role.name} may not read {names.schema}.{names.migrations_table}, so the "
            "applied migrations are unknown",
            f"{_grant(names, db.role.name, ['SELECT'], names.migrations_table)} "
            f"({ROLES_SCRIPT} does), or run `outbox migrate status` as the owner",
        )
    pending = [state.migration for state in db.migrations if not state.applied]
    if pending:
        listed = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        return CheckResult("outbox schema", Level.FAIL,
                           f"pending migration(s): {listed}", migrate)
    return CheckResult("outbox schema", Level.OK,
                       f"{names.schema}.{names.table}: all {len(db.migrations)} migrations applied")


# What the polling relay does: reads and deletes (or marks) outbox rows; parks events with
# INSERT ... ON CONFLICT DO UPDATE, which needs SELECT and UPDATE on the parked table too.
POLL_PRIVILEGES: tuple[tuple[str, str, bool], ...] = (
    ("table", "SELECT", True),
    ("table", "DELETE", True),
    ("table", "UPDATE", False),  # only with keep_published
    ("parked", "INSERT", True),
    ("parked", "SELECT", True),
    ("parked", "UPDATE", True),
)
# What the WAL relay does with the tables: deletes the rows it published (DELETE needs SELECT
# for its WHERE; with keep_published it marks them first: UPDATE (published_at, commit_lsn, topic),
# column privileges, which deploy/roles.sql grants and start-up checks); parks events with
# INSERT ... ON CONFLICT DO NOTHING; records how far Kafka acknowledged in its slot's row of the
# position table (INSERT ... ON CONFLICT DO UPDATE, read back at start: SELECT).
WAL_PRIVILEGES: tuple[tuple[str, str, bool], ...] = (
    ("table", "SELECT", True),
    ("table", "DELETE", True),
    ("parked", "INSERT", True),
    ("parked", "SELECT", True),
    ("position", "SELECT", True),
    ("position", "INSERT", True),
    ("position", "UPDATE", True),
)


def check_table_privileges(db: DatabaseFacts, options: DoctorOptions) -> CheckResult | None:
    """None when the tables are missing (check_schema reports that)."""
    names = options.names
    role = db.role.name
    suggested = "outbox_relay_wal" if options.wal else "outbox_relay_poll"
    if not db.role.schema_usage:
        if not db.role.schema_exists:
            return None
        return CheckResult(
            "privileges", Level.FAIL,
            f"role {role} has no USAGE on schema {names.schema}",
            f"{_fix(names, 'grant_usage', role=_role(role))} "
            f"({ROLES_SCRIPT}: role {suggested})",
        )
    tables = {"table": names.table, "parked": names.parked_table}
    if options.wal:
        tables["position"] = names.position_table
    access = {key: db.tables.get(name) for key, name in tables.items()}
    if any(a is None or not a.exists for a in access.values()):
        return None
    missing: dict[str, list[str]] = {}
    optional: list[str] = []
    for key, privilege, required in WAL_PRIVILEGES if options.wal else POLL_PRIVILEGES:
        table_access = access[key]
        assert table_access is not None
        if not getattr(table_access, privilege.lower()):
            if required:
                missing.setdefault(tables[key], []).append(privilege)
            else:
                optional.append(f"{privilege} on {names.schema}.{tables[key]}")
    if missing:
        text = "; ".join(f"{', '.join(p)} on {names.schema}.{t}" for t, p in missing.items())
        grants = " ".join(f"{_grant(names, role, p, t)};" for t, p in missing.items())
        return CheckResult("privileges", Level.FAIL, f"role {role} lacks {text}",
                           f"{grants} ({ROLES_SCRIPT}: role {suggested})")
    if optional:
        return CheckResult(
            "privileges", Level.WARN,
            f"role {role} lacks {', '.join(optional)}: needed only to keep published rows "
            "(--keep-published)",
            _grant(names, role, ["UPDATE"], names.table),
        )
    return CheckResult("privileges", Level.OK,
                       f"role {role} may read, delete and park outbox events"
                       + (" and record its position" if options.wal else ""))


def check_replication_role(db: DatabaseFacts) -> CheckResult:
    role = db.role
    if role.replication or role.superuser:
        return CheckResult("replication role", Level.OK, f"role {role.name} has REPLICATION")
    return CheckResult(
        "replication role", Level.FAIL,
        f"role {role.name} lacks the REPLICATION attribute: it cannot stream from a slot",
        f"{_fix(SchemaNames(), 'grant_replication', role=_role(role.name))} "
        f"({ROLES_SCRIPT}: role outbox_relay_wal)",
    )


def check_replication_connection(db: DatabaseFacts) -> CheckResult:
    if db.replication_error is None:
        return CheckResult("replication connection", Level.OK,
                           "a replication connection to this database works")
    return CheckResult(
        "replication connection", Level.FAIL,
        f"cannot open a replication connection: {db.replication_error}",
        "give the role LOGIN REPLICATION and allow it in pg_hba.conf (logical replication "
        "connections match the database's own lines, not the `replication` keyword)",
    )


def check_least_privilege(db: DatabaseFacts, options: DoctorOptions) -> CheckResult:
    role = db.role.name
    names = options.names
    suggested = "outbox_relay_wal" if options.wal else "outbox_relay_poll"
    fix = f"run the relay as a least-privilege role ({ROLES_SCRIPT}: {suggested})"
    if db.role.superuser:
        return CheckResult("least privilege", Level.WARN,
                           f"role {role} is a superuser: a leaked relay password exposes "
                           "the whole cluster", fix)
    table = db.tables.get(names.table)
    if table is not None and table.owned:
        return CheckResult("least privilege", Level.WARN,
                           f"role {role} owns {names.schema}.{names.table} and could drop it",
                           fix)
    return CheckResult("least privilege", Level.OK,
                       f"role {role} is neither a superuser nor the outbox table's owner")


def check_publication(db: DatabaseFacts, options: DoctorOptions) -> CheckResult:
    name, names = options.publication, options.names
    table = (names.schema, names.table)
    publication = sql.Identifier(name)
    create = _fix(names, "create_publication", publication=publication)
    info = db.publication
    if info is None:
        return CheckResult(
            "publication", Level.FAIL, f"publication {name!r} does not exist",
            f"as the table's owner: {create}; (setup step, docs/operations.md)",
        )
    if not info.covers(table):
        return CheckResult(
            "publication", Level.FAIL,
            f"publication {name!r} does not publish inserts into {names.schema}.{names.table}: "
            "the relay would never see its events",
            f"{_fix(names, 'add_to_publication', publication=publication)}; "
            f"{_fix(names, 'publish_inserts', publication=publication)}",
        )
    wanted = WalSourceConfig(options.slot, name, names.schema, names.table).published_columns
    needed = [column for column in wanted if column in db.table_columns]
    try:
        slots.check_publication(info, name, table, needed)
    except WalError as exc:
        return CheckResult(
            "publication", Level.FAIL, str(exc),
            f"{_fix(names, 'drop_publication', publication=publication)}; {create}",
        )
    return CheckResult("publication", Level.OK,
                       f"{name!r} publishes inserts into {names.schema}.{names.table}")


def check_slot(db: DatabaseFacts, options: DoctorOptions) -> CheckResult:
    name = options.slot
    status = db.slot
    if status is None:
        return CheckResult(
            "replication slot", Level.FAIL, f"slot {name!r} does not exist",
            "after the publication, as a role with REPLICATION: "
            f"{_fix(options.names, 'create_slot', slot=sql.Literal(name))}; if a relay "
            "used this slot before, recover the events it missed first (docs/operations.md)",
        )
    lag = slot_lag(status, db.current_lsn)
    where = "" if status.confirmed_flush_lsn is None else (
        f", confirmed at {format_lsn(status.confirmed_flush_lsn)}"
        + (f", {_bytes(lag)} behind" if lag is not None else ""))
    try:
        slots.check_slot(status, name, db.database)
    except SlotInUseError:
        state = f"in use by pid {status.active_pid} (a relay streams from it)"
    except SlotInvalidatedError:
        return CheckResult(
            "replication slot", Level.FAIL,
            f"slot {name!r} was invalidated (wal_status lost): events after its confirmed "
            "position cannot be read from the log any more",
            "recover the events with the polling source, then drop and re-create the slot "
            "(docs/operations.md, when the slot is lost)",
        )
    except SlotMismatchError as exc:
        return CheckResult("replication slot", Level.FAIL, str(exc),
                           "configure another slot name (--slot / OUTBOX_SLOT)")
    else:
        state = "free (no relay streams from it now)"
    if status.wal_status in ("extended", "unreserved"):
        return CheckResult(
            "replication slot", Level.WARN,
            f"slot {name!r} is {state}, wal_status {status.wal_status}{where}: it keeps more "
            "WAL than max_wal_size" + (" and is about to be invalidated"
                                       if status.wal_status == "unreserved" else ""),
            "start or fix the relay so it catches up; see `outbox status` for the lag",
        )
    return CheckResult("replication slot", Level.OK, f"{name!r} is {state}{where}")


def database_checks(db: DatabaseFacts, options: DoctorOptions) -> list[CheckResult]:
    results: list[CheckResult | None] = []
    if options.wal:
        results += [
            check_wal_level(db),
            check_replication_slots(db, options),
            check_wal_senders(db),
            check_wal_keep_size(db),
        ]
    results.append(check_schema(db, options))
    if options.wal:
        results += [check_replication_role(db), check_replication_connection(db)]
    results.append(check_table_privileges(db, options))
    results.append(check_least_privilege(db, options))
    if options.wal:
        results += [check_publication(db, options), check_slot(db, options)]
    return [result for result in results if result is not None]


def unreachable_database(error: str) -> CheckResult:
    return CheckResult(
        "database", Level.FAIL, f"cannot connect: {redact(error)}",
        "check --db / OUTBOX_DB_URL (or OUTBOX_DB_URL_FILE), the network path and pg_hba.conf",
    )


def check_broker(kafka: KafkaFacts) -> CheckResult:
    if kafka.error is not None:
        return CheckResult(
            "kafka broker", Level.FAIL, f"cannot reach {kafka.bootstrap}: {kafka.error}",
            "check --kafka / OUTBOX_KAFKA_BOOTSTRAP, the network path, and the security "
            "settings (--kafka-setting security.protocol=SASL_SSL, sasl.mechanism=...)",
        )
    cluster = f", cluster {kafka.cluster_id}" if kafka.cluster_id else ""
    return CheckResult("kafka broker", Level.OK,
                       f"{kafka.bootstrap}: {kafka.brokers} broker(s){cluster}")


def check_topics(kafka: KafkaFacts, options: DoctorOptions) -> list[CheckResult]:
    results = []
    auto_create = kafka.broker_config.get("auto.create.topics.enable") == "true"
    default_partitions = kafka.broker_config.get("num.partitions")
    for name in options.topics:
        label = f"topic {name}"
        topic = kafka.topics.get(name, TopicFacts(name, exists=False))
        create = (f"kafka-topics.sh --create --topic {name} --partitions "
                  f"{options.partitions or '<N>'} --replication-factor 3")
        if topic.error is not None:
            results.append(CheckResult(label, Level.FAIL, topic.error,
                                       "grant the relay's principal DESCRIBE and WRITE on it"))
        elif not topic.exists:
            if auto_create and (options.partitions is None
                                or str(options.partitions) == default_partitions):
                results.append(CheckResult(
                    label, Level.WARN,
                    f"does not exist; the broker creates it on first use with "
                    f"num.partitions={default_partitions}", f"create it on purpose: {create}"))
            else:
                why = (" (auto-creation would give it "
                       f"{default_partitions} partition(s))") if auto_create else ""
                results.append(CheckResult(label, Level.FAIL, f"does not exist{why}", create))
        elif options.partitions is not None and topic.partitions != options.partitions:
            results.append(CheckResult(
                label, Level.FAIL,
                f"has {topic.partitions} partition(s), {options.partitions} expected",
                f"kafka-topics.sh --alter --topic {name} --partitions {options.partitions} "
                "(increase only; keys then map to other partitions, so drain consumers first)"))
        else:
            results.append(CheckResult(label, Level.OK, f"{topic.partitions} partition(s)"))
    return results


def check_message_size(kafka: KafkaFacts, options: DoctorOptions) -> CheckResult:
    """Every limit on the way must take the largest event the writers accept: else such events
    are refused by Kafka and parked."""
    wanted = options.max_payload_bytes + RECORD_OVERHEAD_BYTES
    limits: list[tuple[int, str, str]] = [(
        kafka.producer_max_bytes, "the relay's producer message.max.bytes",
        f"--kafka-setting message.max.bytes={wanted} on the relay",
    )]
    broker_limit = kafka.broker_config.get("message.max.bytes")
    if broker_limit is not None:
        limits.append((int(broker_limit), "the broker's message.max.bytes",
                       f"message.max.bytes={wanted} in the brokers' configuration"))
    for topic in kafka.topics.values():
        if topic.max_message_bytes is not None:
            limits.append((
                topic.max_message_bytes, f"topic {topic.name}'s max.message.bytes",
                f"kafka-configs.sh --alter --entity-type topics --entity-name {topic.name} "
                f"--add-config max.message.bytes={wanted}"))
    if broker_limit is None and not any(t.max_message_bytes for t in kafka.topics.values()):
        return CheckResult(
            "message size", Level.WARN,
            f"cannot read the broker's message.max.bytes: {kafka.config_error or 'unknown'}",
            "check message.max.bytes (broker) and max.message.bytes (topics) by hand: they must "
            f"be at least {wanted} (the maximum payload plus {RECORD_OVERHEAD_BYTES} bytes)",
        )
    smallest = min(value for value, _, _ in limits)
    too_small = [(value, what, how) for value, what, how in limits if value < wanted]
    if not too_small:
        return CheckResult(
            "message size", Level.OK,
            f"every limit (smallest {smallest} bytes) takes payloads of "
            f"{options.max_payload_bytes} bytes plus key and headers",
        )
    found = "; ".join(f"{what} is {value}" for value, what, _ in too_small)
    fix = (f"raise: {'; '.join(how for _, _, how in too_small)}; or lower the writers' "
           f"Outbox(max_payload_bytes=...) and --max-payload-bytes to <= "
           f"{max(0, smallest - RECORD_OVERHEAD_BYTES)}")
    if smallest < options.max_payload_bytes:
        return CheckResult(
            "message size", Level.FAIL,
            f"{found} bytes, below the maximum payload of {options.max_payload_bytes} bytes: "
            "larger events are refused and parked", fix)
    return CheckResult(
        "message size", Level.WARN,
        f"{found} bytes: less than {RECORD_OVERHEAD_BYTES} bytes above the maximum payload of "
        f"{options.max_payload_bytes} bytes for the key and headers; events near the maximum "
        "may be parked", fix)


def kafka_checks(kafka: KafkaFacts | None, options: DoctorOptions) -> list[CheckResult]:
    if kafka is None:
        return [CheckResult("kafka broker", Level.WARN, "not checked",
                            "pass --kafka / OUTBOX_KAFKA_BOOTSTRAP")]
    broker = check_broker(kafka)
    if broker.level is Level.FAIL:
        return [broker]
    return [broker, *check_topics(kafka, options), check_message_size(kafka, options)]


def failed(results: Sequence[CheckResult]) -> bool:
    return any(result.level is Level.FAIL for result in results)


def render(results: Sequence[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for result in results:
        lines.append(f"{result.level.value:<4}  {result.name:<{width}}  {redact(result.message)}")
        if result.fix and result.level is not Level.OK:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {redact(result.fix)}")
    counts = {level: sum(r.level is level for r in results) for level in Level}
    lines.append(", ".join(f"{counts[level]} {level.value}" for level in Level))
    return "\n".join(lines)


def as_json(results: Sequence[CheckResult]) -> list[dict[str, Any]]:
    return [
        {"check": r.name, "level": r.level.value, "message": redact(r.message),
         "fix": redact(r.fix) if r.fix else None}
        for r in results
    ]


# -- gathering (I/O) --------------------------------------------------------------------------


def _query(names: SchemaNames, name: str) -> Any:
    return queries.query("ops.sql", name, names)


def inspect_database(conn: psycopg.Connection[Any], options: DoctorOptions) -> DatabaseFacts:
    """Read what the checks need with `conn` (autocommit, the relay's own role)."""
    names = options.names
    settings = {
        str(name): str(setting)
        for name, setting, _unit in conn.execute(_query(names, "settings")).fetchall()
    }
    slots_used, senders_used = conn.execute(_query(names, "replication_usage")).fetchone() or (0, 0)
    row = conn.execute(_query(names, "role"), {"schema": names.schema}).fetchone()
    assert row is not None
    role = RoleFacts(str(row[0]), *map(bool, row[1:]))
    tables = read_tables(conn, names, [names.migrations_table, names.position_table])
    tracking = tables.get(names.migrations_table)
    states: tuple[migrations.MigrationState, ...] | None = None
    if role.schema_usage and (tracking is None or not tracking.exists or tracking.select):
        states = tuple(migrations.status(conn, names))
    facts = DatabaseFacts(
        database=slots.current_database(conn),
        settings=settings,
        slots_used=int(slots_used),
        senders_used=int(senders_used),
        role=role,
        tables=tables,
        migrations=states,
    )
    if not options.wal:
        return facts
    return replace(
        facts,
        slot=slots.slot_status(conn, options.slot),
        current_lsn=current_wal_lsn(conn, names),
        publication=slots.publication_info(conn, options.publication),
        table_columns=slots.table_columns(conn, (names.schema, names.table)),
    )


def try_replication_connection(url: str) -> str | None:
    """Open a logical replication connection as the relay does; None if it works."""
    try:
        with psycopg.connect(
            libpq_url(url), replication="database", autocommit=True, connect_timeout=10
        ) as conn:
            conn.execute(_query(SchemaNames(), "identify_system"))
    except psycopg.Error as exc:
        return redact(str(exc).strip()) or type(exc).__name__
    return None


def _kafka_error(exc: BaseException) -> str:
    error = exc.args[0] if exc.args else exc
    text = error.str() if hasattr(error, "str") else str(error)
    return redact(str(text))


def inspect_kafka(
    bootstrap: str,
    kafka_settings: Mapping[str, str] | None = None,
    *,
    topics: Sequence[str] = (),
    timeout: float = 10.0,
    allow_unsafe: bool = False,
) -> KafkaFacts:
    """Reach the brokers with the relay's connection settings and read what the checks need."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # not re-exported
        AdminClient,
        ConfigResource,
        ResourceType,
    )

    # Validated exactly as the relay does (refused keys, required values).
    producer = producer_settings(bootstrap, kafka_settings, allow_unsafe=allow_unsafe)
    producer_max = int(producer.get("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES))
    config = admin_settings(producer, kafka_settings or {})
    # librdkafka's connection errors go to this logger, not to stderr over the report.
    config["logger"] = logging.getLogger("relay.doctor.kafka")
    admin = AdminClient(config)
    try:
        # All topics, not just ours: asking for one by name may auto-create it.
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return KafkaFacts(bootstrap, error=_kafka_error(exc), producer_max_bytes=producer_max)
    found: dict[str, TopicFacts] = {}
    for name in topics:
        topic = metadata.topics.get(name)
        if topic is None:
            found[name] = TopicFacts(name, exists=False)
        elif topic.error is not None:
            found[name] = TopicFacts(name, exists=True, error=_kafka_error(
                KafkaException(topic.error)))
        else:
            found[name] = TopicFacts(name, exists=True, partitions=len(topic.partitions))
    broker_config: dict[str, str] = {}
    config_error = None
    resources = [ConfigResource(ResourceType.BROKER, str(broker_id))
                 for broker_id in list(metadata.brokers)[:1]]
    resources += [ConfigResource(ResourceType.TOPIC, name)
                  for name, topic in found.items() if topic.exists and topic.error is None]
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout) if resources else {}
        for resource, future in futures.items():
            entries = future.result(timeout=timeout)
            if resource.restype == ResourceType.BROKER:
                broker_config = {key: str(entries[key].value) for key in (
                    "message.max.bytes", "auto.create.topics.enable", "num.partitions")
                    if key in entries and entries[key].value is not None}
            elif "max.message.bytes" in entries:
                name = resource.name
                found[name] = TopicFacts(
                    name, True, found[name].partitions, int(entries["max.message.bytes"].value))
    except KafkaException as exc:
        config_error = _kafka_error(exc)
    return KafkaFacts(
        bootstrap,
        brokers=len(metadata.brokers),
        cluster_id=metadata.cluster_id,
        broker_config=broker_config,
        config_error=config_error,
        topics=found,
        producer_max_bytes=producer_max,
    )


def run(
    db_url: str,
    options: DoctorOptions,
    kafka: Callable[[], KafkaFacts] | None = None,
) -> list[CheckResult]:
    """Every check for `options.source`: the database's (as the role of `db_url`), then
    Kafka's when `kafka` gathers its facts."""
    results: list[CheckResult] = []
    try:
        with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=10) as conn:
            facts = inspect_database(conn, options)
    except psycopg.OperationalError as exc:
        results.append(unreachable_database(str(exc)))
    else:
        if options.wal:
            allowed = facts.role.replication or facts.role.superuser
            facts = replace(facts, replication_error=try_replication_connection(db_url)
                            if allowed else "the role lacks REPLICATION")
        results += database_checks(facts, options)
    results += kafka_checks(kafka() if kafka is not None else None, options)
    return results
