"""`outbox dlq replay` and `outbox inbox purge`: operations of the idempotent consumer."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

import psycopg
import typer

from outbox.cli_errors import explain, fail, not_empty
from outbox.errors import ConfigurationError, OutboxError
from outbox.kafka_safety import parse_kafka_settings
from outbox.names import SchemaNames

dlq_app = typer.Typer(help="Dead letters of the idempotent consumer.", no_args_is_help=True)
inbox_app = typer.Typer(help="The idempotent consumer's dedup table.", no_args_is_help=True)

_DURATION = re.compile(r"(\d+)\s*(w|d|h|m|s)")
_UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_duration(text: str) -> dt.timedelta:
    """`7d`, `12h`, `1d12h`, `30m`, `90s`, `2w` -> timedelta."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(f"{n}{u}" for n, u in parts) != compact:
        raise ConfigurationError(
            f"duration {text!r} is not understood: write e.g. 7d, 12h, 1d12h, 30m or 90s"
        )
    seconds = sum(int(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ConfigurationError(f"duration {text!r} must be positive")
    return dt.timedelta(seconds=seconds)


def _kafka_settings(bootstrap: str, settings: list[str] | None) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, **parse_kafka_settings(settings or [])}


KafkaOption = Annotated[
    str,
    typer.Option("--kafka", envvar="OUTBOX_KAFKA_BOOTSTRAP", show_envvar=True,
                 help="Kafka bootstrap servers (host:port,...)."),
]
KafkaSettingOption = Annotated[
    list[str] | None,
    typer.Option("-X", "--kafka-setting", envvar="OUTBOX_KAFKA_SETTINGS", show_envvar=True,
                 help="A librdkafka setting key=value (repeatable), e.g. security.protocol=SSL."),
]


@dlq_app.command("replay")
def dlq_replay(
    kafka: KafkaOption,
    topic: Annotated[str, typer.Option(envvar="OUTBOX_DLQ_TOPIC", show_envvar=True,
                                       help="The dead-letter topic to replay, e.g. Order.dlq.")],
    max_messages: Annotated[int | None, typer.Option(
        "--max", envvar="OUTBOX_DLQ_MAX", show_envvar=True, min=1,
        help="Replay at most this many dead letters.")] = None,
    group: Annotated[str, typer.Option(
        envvar="OUTBOX_DLQ_GROUP", show_envvar=True,
        help="Consumer group that remembers how far the replay went.")] = "outbox-dlq-replay",
    to: Annotated[str | None, typer.Option(
        envvar="OUTBOX_DLQ_TO", show_envvar=True,
        help="Publish to this topic instead of each dead letter's original topic.")] = None,
    idle_timeout: Annotated[float, typer.Option(
        envvar="OUTBOX_DLQ_IDLE_TIMEOUT", show_envvar=True,
        help="Stop after this many seconds without a message.")] = 10.0,
    kafka_setting: KafkaSettingOption = None,
) -> None:
    """Re-publish dead letters to their original topic with their original headers."""
    # The consumer package (SQLAlchemy, pymongo) loads only when a command runs, not with
    # `outbox` itself, so that the relay process stays small.
    from outbox.consumer.replay import replay

    try:
        result = replay(
            _kafka_settings(kafka, kafka_setting), topic, max_messages=max_messages,
            group=group, target_topic=to, idle_timeout=idle_timeout,
        )
    except OutboxError as exc:
        fail(explain(exc))
        return
    typer.echo(f"replayed {result.replayed} dead letters from {topic}"
               + (f", skipped {result.skipped} without an original topic" if result.skipped
                  else ""))


@inbox_app.command("purge")
def inbox_purge(
    older_than: Annotated[str, typer.Option(
        envvar="OUTBOX_INBOX_OLDER_THAN", show_envvar=True,
        help="Delete dedup rows older than this (7d, 12h, 1d12h, ...). Keep it above the "
             "topics' retention, or a redelivered message may apply twice.")],
    db: Annotated[str | None, typer.Option(
        "--db", envvar="OUTBOX_DB_URL", show_envvar=True, callback=not_empty,
        help="PostgreSQL URL of the consumer's database.")] = None,
    mongo: Annotated[str | None, typer.Option(
        "--mongo", envvar="OUTBOX_MONGO_URL", show_envvar=True,
        help="MongoDB URL naming the consumer's database (instead of --db).")] = None,
    consumer: Annotated[str | None, typer.Option(
        envvar="OUTBOX_CONSUMER", show_envvar=True,
        help="Only this consumer's rows (default: every consumer's).")] = None,
    schema: Annotated[str, typer.Option(
        envvar="OUTBOX_SCHEMA", show_envvar=True, help="Schema of the inbox table.")] = "public",
    inbox_table: Annotated[str, typer.Option(
        envvar="OUTBOX_INBOX_TABLE", show_envvar=True,
        help="Name of the inbox table (MongoDB: collection).")] = "outbox_inbox",
) -> None:
    """Delete old dedup rows of the idempotent consumer."""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    from outbox.consumer.mongo import MongoStore
    from outbox.consumer.stores import PsycopgStore

    try:
        age = parse_duration(older_than)
        if (db is None) == (mongo is None):
            raise ConfigurationError("give exactly one of --db and --mongo")
        names = SchemaNames(schema=schema, inbox_table=inbox_table)
        if db is not None:
            store = PsycopgStore(db, consumer or "-", names)
            try:
                deleted = store.purge(age, consumer=consumer)
            finally:
                store.close()
        else:
            assert mongo is not None
            client: MongoClient[Any] = MongoClient(mongo, serverSelectionTimeoutMS=10_000)
            try:
                database = client.get_default_database()
                deleted = MongoStore(database, consumer or "-", inbox_table).purge(
                    age, consumer=consumer)
            finally:
                client.close()
    except (OutboxError, psycopg.Error, PyMongoError) as exc:
        fail(explain(exc))
        return
    typer.echo(f"deleted {deleted} dedup rows older than {older_than}")
