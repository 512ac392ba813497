"""Configuration validation and secret redaction: pure logic, no services."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import outbox
from outbox.conninfo import libpq_url, redact
from outbox.names import SchemaNames
from relay.sinks.kafka.settings import producer_settings, valid_topic
from relay.sinks.kafka.sink import PublisherConfig, kafka_headers, topic_for


@pytest.mark.parametrize("name", ["", "1abc", "a-b", 'x"y', "a" * 64, "outbox; DROP TABLE t"])
def test_invalid_identifiers_are_refused_with_the_setting_name(name: str) -> None:
    with pytest.raises(outbox.ConfigurationError, match="table="):
        outbox.Outbox(table=name)


def test_derived_names_must_fit_postgres_limit() -> None:
    with pytest.raises(outbox.ConfigurationError, match="too long"):
        SchemaNames(table="t" * 60)


def test_modes_and_mappings_are_validated() -> None:
    with pytest.raises(outbox.ConfigurationError, match="mode="):
        outbox.Outbox(mode="queue")  # type: ignore[arg-type]
    with pytest.raises(outbox.ConfigurationError, match="column mapping"):
        outbox.Outbox(mode="message", columns=outbox.ColumnMapping.debezium())
    with pytest.raises(outbox.ConfigurationError, match="max_payload_bytes"):
        outbox.Outbox(max_payload_bytes=0)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://app:hunter2@db:5432/orders", "hunter2"),
        ("host=db user=app password=hunter2 dbname=orders", "hunter2"),
        ("host=db password='hunter 2' dbname=orders", "hunter 2"),
        ("mongodb://app:hunter2@m1,m2/orders?replicaSet=rs0", "hunter2"),
        ("sasl.password=hunter2", "hunter2"),
        ("postgresql://db/orders?password=hunter2&sslmode=require", "hunter2"),
        # libpq's refusals of a malformed --db quote the string, or the part it choked on.
        ('missing "=" after "app:hunter2@db/orders" in connection info string', "hunter2"),
        ('missing "=" after "//app:hun"ter2@db/orders" in connection info string', "ter2"),
        ('unexpected spaces found in "hunter 2", use percent-encoded spaces (%20) instead',
         "hunter 2"),
        ('invalid percent-encoded token: "hunter%zz2"', "hunter%zz2"),
        ("app:hunter2@db:5432/orders", "hunter2"),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert "***" in redacted


def test_sqlalchemy_urls_become_libpq_urls() -> None:
    assert libpq_url("postgresql+psycopg://u:p@h/db") == "postgresql://u:p@h/db"
    assert libpq_url("postgresql://u:p@h/db") == "postgresql://u:p@h/db"


def test_producer_keeps_idempotence_and_refuses_unsafe_settings() -> None:
    settings = producer_settings("127.0.0.1:9092", {"linger.ms": "20", "security.protocol": "SSL"})
    assert settings["enable.idempotence"] == "true" and settings["acks"] == "all"
    assert settings["linger.ms"] == "20" and settings["security.protocol"] == "SSL"
    with pytest.raises(outbox.ConfigurationError, match="sasl.kerberos.kinit.cmd"):
        producer_settings("k:9092", {"sasl.kerberos.kinit.cmd": "rm -rf /"})
    with pytest.raises(outbox.ConfigurationError, match="plugin.library.paths"):
        producer_settings("k:9092", {"plugin.library.paths": "/tmp/evil.so"})
    assert "plugin.library.paths" in producer_settings(
        "k:9092", {"plugin.library.paths": "monitoring-interceptor"}, allow_unsafe=True
    )
    with pytest.raises(outbox.ConfigurationError, match="guarantees"):
        producer_settings("k:9092", {"acks": "1"})
    with pytest.raises(outbox.ConfigurationError, match="empty"):
        producer_settings(" ", {})


def test_topic_template_is_checked_at_start_up() -> None:
    with pytest.raises(outbox.ConfigurationError, match="tenant"):
        PublisherConfig("k:9092", topic_template="{tenant}.{aggregate_type}")
    with pytest.raises(outbox.ConfigurationError, match="malformed"):
        PublisherConfig("k:9092", topic_template="{aggregate_type")


def test_topic_and_headers_follow_the_contract() -> None:
    event = outbox.Event("Order", "42", "OrderCreated", {"a": 1}, headers={"tenant": "eu"})
    (record,) = outbox.Outbox().records([event])
    assert topic_for(record, "outbox.event.{aggregate_type}") == "outbox.event.Order"
    headers = dict(kafka_headers(record))
    assert headers == {
        "id": str(event.id),
        "event_type": "OrderCreated",
        "aggregate_type": "Order",
        "content_type": "application/json",
        "tenant": "eu",
        **({"traceparent": headers["traceparent"]} if "traceparent" in headers else {}),
    }
    assert valid_topic("outbox.event.Order")
    assert not valid_topic("bad topic") and not valid_topic("..")


@pytest.mark.parametrize(("own", "linger"), [({}, "5"), ({"linger.ms": "0"}, "0")])
def test_wal_relay_batches_for_throughput_unless_told_otherwise(
    own: dict[str, str], linger: str
) -> None:
    from relay.settings import RelaySettings
    from relay.wal.factory import WAL_KAFKA_DEFAULTS

    settings = RelaySettings(source="postgres-wal", kafka_bootstrap="127.0.0.1:9092",
                             db_url="postgresql://127.0.0.1/db", kafka_settings=own)
    assert settings.publisher(WAL_KAFKA_DEFAULTS).producer_settings()["linger.ms"] == linger
    assert settings.publisher().producer_settings()["linger.ms"] == own.get("linger.ms", "1")


def test_stall_timeout_must_be_positive_and_is_refused_at_start_up() -> None:
    from outbox.errors import ConfigurationError
    from relay.settings import RelaySettings

    with pytest.raises(ConfigurationError, match="stall_timeout"):
        RelaySettings(source="postgres-poll", db_url="postgresql://u@127.0.0.1/db",
                      kafka_bootstrap="127.0.0.1:9092", stall_timeout=0)


def test_layouts_name_their_mapping_and_their_migrations() -> None:
    from outbox import migrate

    debezium = outbox.ColumnMapping.for_layout("debezium")
    assert debezium == outbox.ColumnMapping.debezium() and debezium.layout == "debezium"
    assert outbox.ColumnMapping.for_layout("native").layout == "native"
    with pytest.raises(outbox.ConfigurationError, match="choose one of native, debezium"):
        outbox.ColumnMapping.for_layout("debezum")
    # The Debezium series replaces only the file that creates the table.
    native, other = migrate.available(), migrate.available("debezium")
    assert [m.version for m in other] == [m.version for m in native]
    assert other[0].name == "poll_bookkeeping" and other[1:] == native[1:]
    assert migrate.command(SchemaNames()) == "outbox migrate up --db URL"
    assert migrate.command(SchemaNames("app", "outboxevent"), "debezium") == (
        "outbox migrate up --db URL --columns debezium --table outboxevent --schema app")


def test_columns_setting_is_refused_where_it_means_nothing() -> None:
    from relay.settings import RelaySettings

    base = {"kafka_bootstrap": "k:9092", "db_url": "postgresql://h/db"}
    with pytest.raises(outbox.ConfigurationError, match="columns='x'"):
        RelaySettings(source="postgres-poll", columns="x", **base)
    with pytest.raises(outbox.ConfigurationError, match="table_less"):
        RelaySettings(source="postgres-wal", columns="debezium", table_less=True, **base)
    assert RelaySettings(source="postgres-wal", columns="debezium", **base).column_mapping == (
        outbox.ColumnMapping.debezium())


@pytest.mark.parametrize(("text", "size"), [("64kB", 64 << 10), ("512MB", 512 << 20),
                                            ("8GB", 8 << 30), ("4096", 4096)])
def test_wal_budgets_read_like_postgresql_sizes(text: str, size: int) -> None:
    from relay.settings import parse_size

    assert parse_size(text, "max_slot_wal") == size


@pytest.mark.parametrize("text", ["", "0", "8 gigs", "-1MB", "1.5GB"])
def test_a_wal_budget_that_is_not_a_size_is_refused_by_name(text: str) -> None:
    from relay.settings import parse_size

    with pytest.raises(outbox.ConfigurationError, match="max_slot_wal="):
        parse_size(text, "max_slot_wal")


def test_slot_loss_policy_is_checked_at_start_up() -> None:
    from relay.settings import RelaySettings

    wal = {"source": "postgres-wal", "db_url": "postgresql://x@h/db", "kafka_bootstrap": "k:9092"}
    with pytest.raises(outbox.ConfigurationError, match="choose stop or recover"):
        RelaySettings(**wal, on_slot_loss="ignore")
    with pytest.raises(outbox.ConfigurationError, match="exist only in the WAL"):
        RelaySettings(**wal, on_slot_loss="recover", table_less=True)
    assert RelaySettings(**wal, on_slot_loss="recover").on_slot_loss == "recover"


def test_readyz_details_the_slot_budget_without_failing_on_it() -> None:
    from relay.metrics import readiness
    from relay.stats import RelayStats

    stats = RelayStats(source="postgres-wal", leader=True, source_connected=True,
                       broker_connected=True)
    ready, detail = readiness(stats, stall_seconds=60)
    assert ready and "slot_over_wal_budget" not in detail  # no budget: nothing to say
    stats.slot_over_budget, stats.slot_retained_bytes = True, 5 << 20
    ready, detail = readiness(stats, stall_seconds=60)
    assert ready  # still correct; the disk is what is at risk
    assert detail["slot_over_wal_budget"] is True
    assert detail["slot_retained_wal_bytes"] == 5 << 20


# Options that choose how a command prints, not what it works on: no environment variable.
OUTPUT_OPTIONS = {("relay", "print_config"), ("status", "as_json"), ("doctor", "as_json"),
                  ("migrate sql", "since"), ("migrate sql", "with_tracking"),
                  ("parked list", "limit")}


def test_every_setting_of_every_command_reads_an_outbox_variable_shown_in_help() -> None:
    # An operator's OUTBOX_TABLE_LESS=true reached the relay and `slot recover` but not
    # `slot create`, which then made a publication over the table.
    import typer.main

    from relay.cli import app

    def commands(command: Any, path: str) -> Iterator[tuple[str, Any]]:
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, f"{path} {name}".strip())
        if not hasattr(command, "commands"):
            yield path, command

    missing = [
        (path, param.name)
        for path, command in commands(typer.main.get_command(app), "")
        for param in command.params
        if param.param_type_name == "option" and param.name != "help"
        and (path, param.name) not in OUTPUT_OPTIONS
        and not (str(param.envvar or "").startswith("OUTBOX_") and param.show_envvar)]
    assert missing == []
