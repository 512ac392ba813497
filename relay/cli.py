"""The relay daemon's commands of `outbox`: `relay`, `slot`, `parked`, `status`, `doctor`, `verify`.

They are registered on the library's `app` (outbox.cli, which has `migrate`, `dlq`, `inbox`), and
this module's `main` is the `outbox` console script: one command, every sub-command, while the
library never imports the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from outbox.cli import (
    ColumnsOption,
    DbOption,
    SchemaOption,
    TableOption,
    app,
    connect,
    guarded,
)
from outbox.cli import (
    main as outbox_main,
)
from outbox.cli_errors import fail
from outbox.conninfo import redact
from outbox.errors import ConfigurationError, OutboxError
from outbox.names import SchemaNames


def _load_config_file(ctx: typer.Context, path: Path | None) -> Path | None:
    """Read the TOML file into click's default map: CLI > environment > file > defaults."""
    if path is None:
        return None
    from outbox.config_files import read_toml_section

    allowed = [p.name for p in ctx.command.params if p.name and p.name != "config"]
    try:
        values = read_toml_section(path, "relay", allowed)
    except OutboxError as exc:
        raise typer.BadParameter(str(exc)) from exc
    for name in ("collections", "kafka_setting"):
        if isinstance(values.get(name), str) and name == "kafka_setting":
            values[name] = [values[name]]
        elif isinstance(values.get(name), list) and name == "collections":
            values[name] = ",".join(values[name])
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


@app.command("relay")
def relay_command(
    config: Annotated[Path | None, typer.Option(
        "--config", envvar="OUTBOX_CONFIG", show_envvar=True, is_eager=True,
        callback=_load_config_file,
        help="TOML file with a [relay] table of these options (below CLI and environment).",
    )] = None,
    source: Annotated[str, typer.Option(
        envvar="OUTBOX_SOURCE", show_envvar=True,
        help="postgres-poll | postgres-wal | mongo-poll | mongo-stream")] = "postgres-poll",
    db: Annotated[str | None, typer.Option(
        "--db", envvar="OUTBOX_DB_URL", show_envvar=True,
        help="PostgreSQL URL (postgres-* sources).")] = None,
    mongo: Annotated[str | None, typer.Option(
        "--mongo", envvar="OUTBOX_MONGO_URL", show_envvar=True,
        help="MongoDB URL naming the database (mongo-* sources).")] = None,
    collections: Annotated[str, typer.Option(
        envvar="OUTBOX_COLLECTIONS", show_envvar=True,
        help="Comma-separated collections holding embedded events (mongo-* sources).")] = "",
    kafka: Annotated[str, typer.Option(
        "--kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP", show_envvar=True,
        help="Kafka bootstrap servers.")] = "",
    kafka_setting: Annotated[list[str] | None, typer.Option(
        "--kafka-setting", envvar="OUTBOX_KAFKA_SETTINGS", show_envvar=True,
        help="librdkafka producer setting key=value (repeatable), e.g. security.protocol=SSL.",
    )] = None,
    allow_unsafe_kafka_settings: Annotated[bool, typer.Option(
        envvar="OUTBOX_ALLOW_UNSAFE_KAFKA_SETTINGS", show_envvar=True,
        help="Allow librdkafka settings that run commands or load libraries.")] = False,
    topic_template: Annotated[str, typer.Option(
        envvar="OUTBOX_TOPIC_TEMPLATE", show_envvar=True,
        help="Topic of events without an explicit topic.")] = "{aggregate_type}",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    columns: ColumnsOption = "native",
    batch_size: Annotated[int | None, typer.Option(
        envvar="OUTBOX_BATCH_SIZE", show_envvar=True,
        help="Events read per query (default: the source's own).")] = None,
    poll_interval: Annotated[str, typer.Option(
        envvar="OUTBOX_POLL_INTERVAL", show_envvar=True,
        help="Fallback poll interval when no notification arrives.")] = "1s",
    keep_published: Annotated[str | None, typer.Option(
        envvar="OUTBOX_KEEP_PUBLISHED", show_envvar=True,
        help="Keep published rows this long (e.g. 7d) instead of deleting them.")] = None,
    log_format: Annotated[str, typer.Option(
        envvar="OUTBOX_LOG_FORMAT", show_envvar=True, help="json | human | auto")] = "auto",
    log_level: Annotated[str, typer.Option(
        envvar="OUTBOX_LOG_LEVEL", show_envvar=True)] = "INFO",
    slot: Annotated[str, typer.Option(
        envvar="OUTBOX_SLOT", show_envvar=True,
        help="Logical replication slot (postgres-wal).")] = "outbox_relay",
    publication: Annotated[str, typer.Option(
        envvar="OUTBOX_PUBLICATION", show_envvar=True,
        help="Publication covering the outbox table (postgres-wal).")] = "outbox_relay",
    message_prefix: Annotated[str, typer.Option(
        envvar="OUTBOX_MESSAGE_PREFIX", show_envvar=True,
        help="Prefix of table-less events written with mode='message' (postgres-wal).",
    )] = "outbox",
    table_less: Annotated[bool, typer.Option(
        envvar="OUTBOX_TABLE_LESS", show_envvar=True,
        help="postgres-wal: read only mode='message' events (slot created with --table-less).",
    )] = False,
    on_slot_loss: Annotated[str, typer.Option(
        envvar="OUTBOX_ON_SLOT_LOSS", show_envvar=True,
        help="postgres-wal: stop | recover. A lost slot stops the relay, or is recovered from "
             "the outbox table (as `outbox slot recover`) and the relay goes on.")] = "stop",
    max_slot_wal: Annotated[str | None, typer.Option(
        envvar="OUTBOX_MAX_SLOT_WAL", show_envvar=True,
        help="postgres-wal: WAL the slot may retain (e.g. 8GB) before the relay reports it; "
             "with --on-slot-loss recover it then drops its slot and recovers.")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        envvar="OUTBOX_METRICS_PORT", show_envvar=True,
        help="Serve /metrics, /healthz, /readyz and the operator console (/) on this port.",
    )] = None,
    metrics_host: Annotated[str, typer.Option(
        envvar="OUTBOX_METRICS_HOST", show_envvar=True,
        help="Address of the metrics port (0.0.0.0 in containers).")] = "127.0.0.1",
    console_token: Annotated[str | None, typer.Option(
        envvar="OUTBOX_CONSOLE_TOKEN", show_envvar=True,
        help="Lets the console redrive parked events for requests with this token (at least "
             "16 characters); without it the console is read-only.")] = None,
    console_token_file: Annotated[str | None, typer.Option(
        envvar="OUTBOX_CONSOLE_TOKEN_FILE", show_envvar=True,
        help="File whose first line is the console token (a mounted secret).")] = None,
    stall_timeout: Annotated[str, typer.Option(
        envvar="OUTBOX_STALL_TIMEOUT", show_envvar=True,
        help="/readyz fails when events are in flight and none was acknowledged for this "
             "long.")] = "60s",
    shutdown_timeout: Annotated[float, typer.Option(
        envvar="OUTBOX_SHUTDOWN_TIMEOUT", show_envvar=True,
        help="Seconds to wait for outstanding deliveries on SIGTERM.")] = 30.0,
    shards: Annotated[bool, typer.Option(
        "--shards", envvar="OUTBOX_SHARDS", show_envvar=True,
        help="postgres-poll on a sharded outbox (`outbox migrate up --shards N`): one of "
             "several relays, each publishing the shards it holds.")] = False,
    shard_lease: Annotated[str, typer.Option(
        envvar="OUTBOX_SHARD_LEASE", show_envvar=True,
        help="postgres-poll --shards: a relay gone (hung or cut off) for this long, plus "
             "--shutdown-timeout, loses its shards to the others (a dead one at once).",
    )] = "10s",
    relay_id_header: Annotated[str | None, typer.Option(
        envvar="OUTBOX_RELAY_ID_HEADER", show_envvar=True,
        help="Kafka header naming the relay run that published each message "
             "(host:pid:run), e.g. outbox-relay.")] = None,
    print_config: Annotated[bool, typer.Option(
        help="Print the effective settings (secrets redacted) and exit.")] = False,
) -> None:
    """Run the relay daemon: publish committed events to Kafka until SIGTERM/SIGINT."""
    from outbox.kafka_safety import parse_kafka_settings
    from relay import logs
    from relay import main as relay_main
    from relay.settings import RelaySettings, parse_duration, parse_size, read_token_file

    def build() -> RelaySettings:
        token = console_token
        if console_token_file is not None:
            token = read_token_file(console_token_file, "console_token_file")
            # OUTBOX_CONSOLE_TOKEN_FILE also fills OUTBOX_CONSOLE_TOKEN (config_files.py):
            # the same token twice is fine, two different ones are a mistake.
            if console_token is not None and console_token != token:
                raise ConfigurationError(
                    "console_token and console_token_file are both given: keep one")
        return RelaySettings(
            source=source,
            db_url=db,
            mongo_url=mongo,
            collections=tuple(c.strip() for c in collections.split(",") if c.strip()),
            kafka_bootstrap=kafka,
            kafka_settings=parse_kafka_settings(kafka_setting or []),
            allow_unsafe_kafka_settings=allow_unsafe_kafka_settings,
            topic_template=topic_template,
            schema=schema,
            table=table,
            columns=columns,
            batch_size=batch_size,
            poll_interval=parse_duration(poll_interval, "poll_interval").total_seconds(),
            keep_published=parse_duration(keep_published, "keep_published")
            if keep_published else None,
            slot=slot,
            publication=publication,
            message_prefix=message_prefix,
            table_less=table_less,
            on_slot_loss=on_slot_loss,
            max_slot_wal=parse_size(max_slot_wal, "max_slot_wal") if max_slot_wal else None,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            shutdown_timeout=shutdown_timeout,
            shards=shards,
            shard_lease=parse_duration(shard_lease, "shard_lease").total_seconds(),
            relay_id_header=relay_id_header,
            stall_timeout=parse_duration(stall_timeout, "stall_timeout").total_seconds(),
            console_token=token,
        )

    settings = guarded(build)
    if print_config:
        import json

        typer.echo(json.dumps(settings.redacted(), indent=2))
        return
    try:
        logs.setup(log_level, log_format)
    except ValueError as exc:
        fail(str(exc))
    relay_main.tune_garbage_collector()
    guarded(lambda: relay_main.run(settings))


parked_app = typer.Typer(help="Events the relay could never publish.", no_args_is_help=True)
app.add_typer(parked_app, name="parked")


ParkedDbOption = Annotated[
    str | None,
    typer.Option("--db", envvar="OUTBOX_DB_URL", show_envvar=True,
                 help="PostgreSQL URL (postgres-* sources)."),
]
ParkedMongoOption = Annotated[
    str | None,
    typer.Option("--mongo", envvar="OUTBOX_MONGO_URL", show_envvar=True,
                 help="MongoDB URL naming the database (mongo-* sources)."),
]
ParkedCollectionsOption = Annotated[
    str, typer.Option(envvar="OUTBOX_COLLECTIONS", show_envvar=True,
                      help="The relay's --collections (mongo-* sources).")
]


def _mongo_parked(mongo: str, collections: str) -> Any:
    from relay.mongo.config import MongoRelayConfig
    from relay.mongo.parked import ParkedEvents

    names = tuple(name.strip() for name in collections.split(",") if name.strip())
    return ParkedEvents(guarded(lambda: MongoRelayConfig(url=mongo, collections=names)))


def _one_source(db: str | None, mongo: str | None) -> None:
    if (db is None) == (mongo is None):
        fail("give either --db (PostgreSQL) or --mongo (MongoDB)")


@parked_app.command("list")
def parked_list(
    db: ParkedDbOption = None,
    mongo: ParkedMongoOption = None,
    collections: ParkedCollectionsOption = "",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    limit: Annotated[int, typer.Option(help="Show at most this many.")] = 100,
) -> None:
    """Show parked events by key, in the order they were parked, with the reason."""
    _one_source(db, mongo)
    lines: list[tuple[str | None, str]] = []  # (key, line)
    if mongo is not None:
        with _mongo_parked(mongo, collections) as store:
            for entry in guarded(lambda: store.entries(limit)):
                key = f"{entry.aggregate_type}/{entry.aggregate_id}" if entry.key else None
                kept = "" if entry.complete else "  (kept without its payload: not re-queueable)"
                lines.append((key, f"{entry.uuid or entry.event_id}  {entry.event_type}  in "
                              f"{entry.collection} {entry.document_id!r}  parked "
                              f"{entry.parked_at:%Y-%m-%d %H:%M:%S}  reason: {entry.reason}{kept}"))
    else:
        from relay import parked

        names = guarded(lambda: SchemaNames(schema, table))
        with connect(db or "") as conn:
            events = guarded(lambda: parked.list_parked(conn, names, limit))
        for event in events:
            key = None if event.unreadable else f"{event.aggregate_type}/{event.aggregate_id}"
            what = ("unreadable change (see its raw column)" if event.unreadable else
                    f"{event.id}  {event.event_type}  {event.payload_bytes} bytes")
            lines.append((key, f"#{event.parked_id}  {what}  parked "
                          f"{event.parked_at:%Y-%m-%d %H:%M:%S}  reason: {event.reason}"))
    if not lines:
        typer.echo("no parked events")
    shown: str | None = ""
    for key, line in lines:
        if key != shown:
            typer.echo(f"key {key}:" if key is not None else "without a key:")
            shown = key
        typer.echo(f"  {line}")


@parked_app.command("retry")
def parked_retry(
    ids: Annotated[list[str] | None, typer.Argument(
        help="Event ids: their keys' parked events are re-queued (default: every key).")] = None,
    db: ParkedDbOption = None,
    mongo: ParkedMongoOption = None,
    collections: ParkedCollectionsOption = "",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
) -> None:
    """Re-queue parked events once the cause is fixed (e.g. the topic's message size): every
    parked event of a key, in the order they were parked, ahead of the key's newer events."""
    import uuid

    _one_source(db, mongo)
    try:
        wanted = [uuid.UUID(value) for value in ids] if ids else None
    except ValueError as exc:
        fail(f"not an event id: {exc}")
    if mongo is not None:
        with _mongo_parked(mongo, collections) as store:
            moved = guarded(lambda: store.retry(wanted))
    else:
        from relay import parked

        names = guarded(lambda: SchemaNames(schema, table))
        with connect(db or "") as conn:
            moved = guarded(lambda: parked.retry(conn, names, wanted))
    typer.echo(f"re-queued {len(moved)} event(s)")


OptionalKafkaOption = Annotated[
    str | None,
    typer.Option("--kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP", show_envvar=True,
                 help="Kafka bootstrap servers; without it the broker is not checked."),
]
KafkaSettingOption = Annotated[
    list[str] | None,
    typer.Option("--kafka-setting", envvar="OUTBOX_KAFKA_SETTINGS", show_envvar=True,
                 help="librdkafka setting key=value (repeatable): the relay's TLS/SASL settings."),
]
SlotOption = Annotated[
    str, typer.Option(envvar="OUTBOX_SLOT", show_envvar=True,
                      help="Logical replication slot of the WAL relay.")
]
PublicationOption = Annotated[
    str, typer.Option(envvar="OUTBOX_PUBLICATION", show_envvar=True,
                      help="Publication of the WAL relay.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
KafkaTimeoutOption = Annotated[float, typer.Option(
    envvar="OUTBOX_KAFKA_TIMEOUT", show_envvar=True, help="Seconds to wait for the broker.")]
AllowUnsafeOption = Annotated[bool, typer.Option(
    envvar="OUTBOX_ALLOW_UNSAFE_KAFKA_SETTINGS", show_envvar=True,
    help="Allow librdkafka settings that run commands or load libraries.")]


@app.command("status")
def status_command(
    db: DbOption,
    kafka: OptionalKafkaOption = None,
    kafka_setting: KafkaSettingOption = None,
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    slot: SlotOption = "outbox_relay",
    publication: PublicationOption = "outbox_relay",
    kafka_timeout: KafkaTimeoutOption = 10.0,
    allow_unsafe_kafka_settings: AllowUnsafeOption = False,
    as_json: JsonOption = False,
    max_slot_wal: Annotated[str | None, typer.Option(
        envvar="OUTBOX_MAX_SLOT_WAL", show_envvar=True,
        help="The WAL relay's --max-slot-wal: the slot's retained WAL is shown against it.",
    )] = None,
) -> None:
    """Show the backlog, oldest pending event, parked events, leader, slot state and lag."""
    import dataclasses
    import json

    from outbox.kafka_safety import parse_kafka_settings
    from relay import doctor, status
    from relay.poll.relay import PollConfig
    from relay.settings import parse_size

    names = guarded(lambda: SchemaNames(schema, table))
    budget = guarded(lambda: parse_size(max_slot_wal, "--max-slot-wal")) if max_slot_wal else None
    leader_key = PollConfig(db_url=db, names=names).leader_key
    with connect(db) as conn:
        conn.autocommit = True  # read-only report: no transaction to hold open
        report = guarded(lambda: status.gather(
            conn, names, leader_key=leader_key, slot=slot, publication=publication,
            wal_budget=budget))
    if kafka:
        facts = guarded(lambda: doctor.inspect_kafka(
            kafka, parse_kafka_settings(kafka_setting or []), timeout=kafka_timeout,
            allow_unsafe=allow_unsafe_kafka_settings))
        report = dataclasses.replace(report, kafka=status.KafkaReport(
            kafka, facts.brokers, facts.cluster_id, facts.error))
    if as_json:
        typer.echo(redact(json.dumps(status.as_json(report), indent=2)))
    else:
        typer.echo(redact(status.render(report)))


@app.command("doctor")
def doctor_command(
    db: DbOption,
    kafka: OptionalKafkaOption = None,
    kafka_setting: KafkaSettingOption = None,
    allow_unsafe_kafka_settings: AllowUnsafeOption = False,
    source: Annotated[str, typer.Option(
        envvar="OUTBOX_SOURCE", show_envvar=True,
        help="postgres-poll | postgres-wal: which relay the checks are for.")] = "postgres-poll",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    slot: SlotOption = "outbox_relay",
    publication: PublicationOption = "outbox_relay",
    max_payload_bytes: Annotated[int | None, typer.Option(
        envvar="OUTBOX_MAX_PAYLOAD_BYTES", show_envvar=True,
        help="Largest payload the writers accept (Outbox.max_payload_bytes; default 1 MiB).",
    )] = None,
    topics: Annotated[str, typer.Option(
        envvar="OUTBOX_DOCTOR_TOPICS", show_envvar=True,
        help="Comma-separated topics that must exist.")] = "",
    partitions: Annotated[int | None, typer.Option(
        envvar="OUTBOX_DOCTOR_PARTITIONS", show_envvar=True,
        help="Partitions each of --topics must have.")] = None,
    kafka_timeout: KafkaTimeoutOption = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Check the setup before going live: one line per check (OK, WARN, FAIL) with a fix.
    Run it with the relay's own --db URL, so that its role's privileges are checked. Exits 1
    when a check fails."""
    import json

    from outbox.kafka_safety import parse_kafka_settings
    from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES
    from relay import doctor

    def options() -> doctor.DoctorOptions:
        return doctor.DoctorOptions(
            source=source,
            names=SchemaNames(schema, table),
            slot=slot,
            publication=publication,
            max_payload_bytes=max_payload_bytes or DEFAULT_MAX_PAYLOAD_BYTES,
            topics=tuple(t.strip() for t in topics.split(",") if t.strip()),
            partitions=partitions,
        )

    checked = guarded(options)
    settings = guarded(lambda: parse_kafka_settings(kafka_setting or []))
    gather_kafka = None
    if kafka:
        def gather_kafka() -> doctor.KafkaFacts:
            return doctor.inspect_kafka(
                kafka, settings, topics=checked.topics, timeout=kafka_timeout,
                allow_unsafe=allow_unsafe_kafka_settings)
    results = guarded(lambda: doctor.run(db, checked, gather_kafka))
    if as_json:
        typer.echo(json.dumps(doctor.as_json(results), indent=2))
    else:
        typer.echo(doctor.render(results))
    if doctor.failed(results):
        raise typer.Exit(1)


@app.command("verify")
def verify_command(
    kafka: Annotated[str, typer.Option(
        "--kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP", show_envvar=True,
        help="Kafka bootstrap servers (verify creates and deletes a topic of its own).")],
    db: Annotated[str | None, typer.Option(
        "--db", envvar="OUTBOX_DB_URL", show_envvar=True,
        help="PostgreSQL URL (postgres-* sources): the role needs the relay's rights and may "
             "create a table.")] = None,
    kafka_setting: KafkaSettingOption = None,
    source: Annotated[str, typer.Option(
        envvar="OUTBOX_SOURCE", show_envvar=True,
        help="postgres-poll | postgres-wal | mongo-poll | mongo-stream",
    )] = "postgres-poll",
    mongo: Annotated[str | None, typer.Option(
        "--mongo", envvar="OUTBOX_MONGO_URL", show_envvar=True,
        help="MongoDB URL (mongo-* sources): verify works in a scratch database of its own on "
             "that server.")] = None,
    schema: Annotated[str, typer.Option(
        envvar="OUTBOX_SCHEMA", show_envvar=True,
        help="Schema of the scratch tables (postgres-* sources).")] = "public",
    duration: Annotated[str, typer.Option(
        envvar="OUTBOX_VERIFY_DURATION", show_envvar=True,
        help="How long the writers write (e.g. 60s, 5m).")] = "60s",
    rate: Annotated[float, typer.Option(
        envvar="OUTBOX_VERIFY_RATE", show_envvar=True,
        help="Events per second the writers offer.")] = 500.0,
    faults: Annotated[str, typer.Option(
        envvar="OUTBOX_VERIFY_FAULTS", show_envvar=True,
        help="Comma-separated faults done to the relay while it runs: relay-kill (SIGKILL and "
             "restart), relay-stop (SIGSTOP, SIGCONT), connection-drop (its database sessions "
             "ended with pg_terminate_backend).")] = "",
) -> None:
    """Prove the relay's guarantees on this database, role and broker: a scratch outbox table
    (MongoDB: database) and topic (removed afterwards, also on Ctrl-C), writers with rollbacks
    and a long transaction, the relay as a child process under the faults asked for, and a
    ledger verdict. Exit 0 only when nothing was lost, nothing phantom and per-key order was
    kept; 1 when not; 2 when it cannot run here (nothing is created then); 130 when
    interrupted."""
    import threading

    from outbox.kafka_safety import parse_kafka_settings
    from relay.daemon import stop_on_signals
    from relay.settings import parse_duration
    from relay.verify.plan import KafkaAccess, VerifyPlan, parse_faults
    from relay.verify.progress import Progress
    from relay.verify.run import EXIT_REFUSED, Refused, run

    try:
        plan = VerifyPlan(
            source=source,
            duration=parse_duration(duration, "--duration").total_seconds(),
            rate=rate,
            faults=parse_faults(faults),
            schema=schema,
        )
        access = KafkaAccess(kafka, tuple(parse_kafka_settings(kafka_setting or []).items()))
    except OutboxError as exc:
        fail(str(exc), EXIT_REFUSED)
    url = mongo if plan.mongo else db
    if not url:
        fail(f"--source {plan.source} needs " + ("--mongo" if plan.mongo else "--db"),
             EXIT_REFUSED)
    stop = threading.Event()
    progress = Progress(every=2.0)
    with stop_on_signals(stop):
        try:
            report = run(plan, url, access, progress, stop)
        except Refused as exc:
            fail(str(exc), EXIT_REFUSED)
    typer.echo(redact(report.render()))
    raise typer.Exit(report.exit_code)


slot_app = typer.Typer(
    help="The WAL relay's publication and replication slot (an admin step, before the relay).",
    no_args_is_help=True)
app.add_typer(slot_app, name="slot")


def _wal_config(
    slot: str, publication: str, schema: str, table: str, table_less: bool,
    columns: str = "native",
) -> Any:
    from outbox.columns import ColumnMapping
    from relay.wal.source import WalSourceConfig

    if table_less and columns != "native":
        raise ConfigurationError(
            f"--columns {columns} with --table-less: a table-less setup publishes no table")
    return WalSourceConfig(slot=slot, publication=publication, schema=schema,
                           table=None if table_less else table,
                           columns=ColumnMapping.for_layout(columns))


@slot_app.command("create")
def slot_create(
    db: DbOption,
    slot: SlotOption = "outbox_relay",
    publication: PublicationOption = "outbox_relay",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    columns: ColumnsOption = "native",
    table_less: Annotated[bool, typer.Option(
        help="Only pg_logical_emit_message events: the publication covers no table.")] = False,
) -> None:
    """Create the publication (the outbox table's event columns only) and the pgoutput slot."""
    from relay.wal import format_lsn, setup

    config = guarded(
        lambda: _wal_config(slot, publication, schema, table, table_less, columns))
    with connect(db) as conn:
        conn.autocommit = True
        position = guarded(lambda: setup(conn, config))
    typer.echo(f"created publication {publication} and slot {slot}; events committed after "
               f"{format_lsn(position)} will be relayed")


@slot_app.command("status")
def slot_status_command(db: DbOption, slot: SlotOption = "outbox_relay") -> None:
    """Show the slot: active, WAL status, confirmed position, WAL it retains."""
    from relay.wal import format_lsn, slots

    with connect(db) as conn:
        status = guarded(lambda: slots.slot_status(conn, slot))
    if status is None:
        fail(f"slot {slot} does not exist: create it with `outbox slot create`")
        return
    confirmed = format_lsn(status.confirmed_flush_lsn) if status.confirmed_flush_lsn else "-"
    typer.echo(f"slot {status.slot_name}: active={status.active} pid={status.active_pid} "
               f"wal_status={status.wal_status} confirmed={confirmed} "
               f"retained_bytes={status.retained_bytes}")


@slot_app.command("drop")
def slot_drop(
    db: DbOption,
    slot: SlotOption = "outbox_relay",
    publication: PublicationOption = "outbox_relay",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
) -> None:
    """Drop the slot and the publication (the server frees the WAL the slot kept)."""
    from relay.wal import teardown

    config = guarded(lambda: _wal_config(slot, publication, schema, table, False))
    with connect(db) as conn:
        conn.autocommit = True
        guarded(lambda: teardown(conn, config))
    typer.echo(f"dropped slot {slot} and publication {publication}")



@slot_app.command("recover")
def slot_recover(
    db: DbOption,
    kafka: Annotated[str, typer.Option(
        "--kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP", show_envvar=True,
        help="Kafka bootstrap servers.")],
    kafka_setting: KafkaSettingOption = None,
    topic_template: Annotated[str, typer.Option(
        envvar="OUTBOX_TOPIC_TEMPLATE", show_envvar=True,
        help="The relay's --topic-template: where republished events go (with "
             "--keep-published, stored in their kept rows).",
    )] = "{aggregate_type}",
    slot: SlotOption = "outbox_relay",
    publication: PublicationOption = "outbox_relay",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    columns: ColumnsOption = "native",
    keep_published: Annotated[str | None, typer.Option(
        envvar="OUTBOX_KEEP_PUBLISHED", show_envvar=True,
        help="The relay's --keep-published: republished rows are marked, not deleted.")] = None,
    table_less: Annotated[bool, typer.Option(
        envvar="OUTBOX_TABLE_LESS", show_envvar=True,
        help="The relay's --table-less (refused: there is no table to recover from).")] = False,
) -> None:
    """Recover a lost (dropped or invalidated) slot: create it anew, publish every event that
    may not have reached Kafka from the outbox table, and leave the relay ready to stream."""
    import threading

    from outbox.kafka_safety import parse_kafka_settings
    from relay import logs
    from relay.daemon import stop_on_signals
    from relay.settings import RelaySettings, parse_duration
    from relay.sinks.kafka.sink import topic_limits_for
    from relay.sources import WAL_KAFKA_DEFAULTS
    from relay.stats import RelayStats
    from relay.wal import factory
    from relay.wal.recovery import recover

    settings = guarded(lambda: RelaySettings(
        source="postgres-wal", db_url=db, kafka_bootstrap=kafka,
        kafka_settings=parse_kafka_settings(kafka_setting or []),
        topic_template=topic_template, schema=schema, table=table, columns=columns,
        keep_published=parse_duration(keep_published, "keep_published")
        if keep_published else None,
        slot=slot, publication=publication, table_less=table_less))
    logs.setup("INFO", "auto")
    publisher = settings.publisher(WAL_KAFKA_DEFAULTS)
    stats = RelayStats(source="postgres-wal")
    stop = threading.Event()
    with stop_on_signals(stop):
        report = guarded(lambda: recover(factory.config(settings), publisher, stats, stop,
                                         topic_limits=topic_limits_for(publisher)))
    if report is None:
        if stop.is_set():
            fail("stopped before the recovery began")
        typer.echo(f"slot {slot} is healthy and no recovery is pending: nothing to recover")
        return
    typer.echo(report.summary())


shards_app = typer.Typer(help="A sharded outbox (`outbox migrate up --shards N`).",
                         no_args_is_help=True)
app.add_typer(shards_app, name="shards")


@shards_app.command("resize")
def shards_resize(
    db: DbOption,
    shards: Annotated[int | None, typer.Option(
        "--shards", envvar="OUTBOX_SHARD_COUNT", show_envvar=True,
        help="The new shard count.")] = None,
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
) -> None:
    """Give a sharded outbox another shard count: every row's shard is computed again, in one
    transaction with the outbox locked (writers wait). Refused while a relay of it runs."""
    from outbox import migrate
    from relay.poll.relay import PollConfig
    from relay.poll.shards import refuse_running_relays

    names = guarded(lambda: SchemaNames(schema, table))
    if shards is None:
        fail("give the new count with --shards M")
    key = PollConfig(db_url=db, names=names).leader_key
    with connect(db) as conn:
        old = guarded(lambda: migrate.resize_shards(
            conn, names, shards, check=lambda locked: refuse_running_relays(locked, names, key)))
    if old == shards:
        typer.echo(f"{schema}.{table} has {shards} shards already: nothing to do")
    else:
        typer.echo(f"resized {schema}.{table} from {old} to {shards} shards")


@app.command("replay")
def replay_command(
    db: Annotated[str | None, typer.Option(
        "--db", envvar="OUTBOX_DB_URL", show_envvar=True,
        help="PostgreSQL URL of the database whose outbox table keeps published events.")] = None,
    kafka: Annotated[str | None, typer.Option(
        "--kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP", show_envvar=True,
        help="Kafka bootstrap servers (not needed with --dry-run).")] = None,
    aggregate_type: Annotated[str | None, typer.Option(
        envvar="OUTBOX_REPLAY_AGGREGATE_TYPE", show_envvar=True,
        help="Only events of this aggregate type.")] = None,
    aggregate_id: Annotated[list[str] | None, typer.Option(
        envvar="OUTBOX_REPLAY_AGGREGATE_IDS", show_envvar=True,
        help="Only events of this aggregate id (repeatable).")] = None,
    event_id: Annotated[list[str] | None, typer.Option(
        envvar="OUTBOX_REPLAY_EVENT_IDS", show_envvar=True,
        help="Only the event with this id (UUID, repeatable).")] = None,
    since: Annotated[str | None, typer.Option(
        envvar="OUTBOX_REPLAY_SINCE", show_envvar=True,
        help="Only events created at or after this ISO 8601 time (UTC without an offset).",
    )] = None,
    until: Annotated[str | None, typer.Option(
        envvar="OUTBOX_REPLAY_UNTIL", show_envvar=True,
        help="Only events created before this ISO 8601 time (UTC without an offset).")] = None,
    to_topic: Annotated[str | None, typer.Option(
        envvar="OUTBOX_REPLAY_TO_TOPIC", show_envvar=True,
        help="Send every event to this topic instead of its own.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", envvar="OUTBOX_REPLAY_DRY_RUN", show_envvar=True,
        help="Print how many events would be sent per topic; send nothing.")] = False,
    everything: Annotated[bool, typer.Option(
        "--all", envvar="OUTBOX_REPLAY_ALL", show_envvar=True,
        help="Replay every retained event (refused without a filter otherwise).")] = False,
    mongo: Annotated[str | None, typer.Option(
        "--mongo", envvar="OUTBOX_MONGO_URL", show_envvar=True,
        help="MongoDB, without --db: refused (the Mongo sources keep no published events).",
    )] = None,
    kafka_setting: KafkaSettingOption = None,
    allow_unsafe_kafka_settings: AllowUnsafeOption = False,
    topic_template: Annotated[str, typer.Option(
        envvar="OUTBOX_TOPIC_TEMPLATE", show_envvar=True,
        help="The relay's --topic-template then: the topic of kept events that store none (kept "
             "by an earlier release, or by a template with a conversion or format spec).",
    )] = "{aggregate_type}",
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    columns: ColumnsOption = "native",
    log_format: Annotated[str, typer.Option(
        envvar="OUTBOX_LOG_FORMAT", show_envvar=True, help="json | human | auto")] = "auto",
) -> None:
    """Republish retained (--keep-published) events that match, per key in their original
    commit order, with the same event ids and a header `replayed: true`. Safe to interrupt and
    run again: events are sent again, and idempotent consumers skip what they applied."""
    import threading

    from outbox.columns import ColumnMapping
    from outbox.kafka_safety import parse_kafka_settings
    from relay import logs, replay
    from relay.daemon import stop_on_signals
    from relay.sinks.kafka.sink import PublisherConfig, topic_limits_for

    if mongo is not None and db is None:
        fail("outbox replay --mongo: the MongoDB sources keep no published events (each is "
             "pulled from its document's list once Kafka acknowledged it, and there is no "
             "--keep-published for them), so there is nothing to replay from; replay from "
             "Kafka itself (consumer offsets, or a topic with longer retention)")
    if db is None:
        fail("--db (OUTBOX_DB_URL) is required")
    url: str = db

    def configure() -> replay.ReplayConfig:
        wanted = replay.ReplayFilter.parse(
            aggregate_type=aggregate_type, aggregate_ids=aggregate_id, event_ids=event_id,
            since=since, until=until, everything=everything)
        return replay.ReplayConfig(
            db_url=url, filter=wanted, names=SchemaNames(schema, table),
            columns=ColumnMapping.for_layout(columns), to_topic=to_topic,
            topic_template=topic_template)

    config = guarded(configure)
    publisher = None
    if not dry_run:
        if not kafka:
            fail("--kafka (OUTBOX_KAFKA_BOOTSTRAP) is required, unless --dry-run")
        publisher = guarded(lambda: PublisherConfig(
            bootstrap_servers=kafka or "", topic_template=topic_template,
            kafka_settings=parse_kafka_settings(kafka_setting or []),
            allow_unsafe_kafka_settings=allow_unsafe_kafka_settings))
        guarded(publisher.producer_settings)
    logs.setup("INFO", log_format)
    config = guarded(lambda: replay.check(config))
    if publisher is None:
        typer.echo(guarded(lambda: replay.dry_run(config)).summary())
        return
    sending: PublisherConfig = publisher
    stop = threading.Event()
    with stop_on_signals(stop):
        report = guarded(lambda: replay.replay(config, sending, stop,
                                               topic_limits=topic_limits_for(sending)))
    typer.echo(report.summary())
    if not report.complete:
        fail("the replay did not finish: run it again (events are sent again; consumers skip "
             "those they applied)")


def main() -> None:
    """The `outbox` console script: the library's main, on the app that now has every command."""
    outbox_main()


if __name__ == "__main__":
    main()

