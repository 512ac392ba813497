"""The source registry: each source's connection, its own settings, and refusals at start-up."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from outbox.errors import ConfigurationError
from relay import sources
from relay.settings import RelaySettings

CONNECTIONS = {"db_url": "postgresql://h/db", "mongo_url": "mongodb://h/db",
               "collections": ("orders",)}


def settings(source: str, **values: Any) -> RelaySettings:
    return RelaySettings(source=source, kafka_bootstrap="k:9092", **{**CONNECTIONS, **values})


def test_every_source_has_a_wiring_and_doctor_checks_the_postgres_ones() -> None:
    assert sources.NAMES == ("postgres-poll", "postgres-wal", "mongo-poll", "mongo-stream")
    for source in sources.SOURCES.values():
        assert source.factory.startswith("relay.") and source.factory.endswith(".factory")
        assert source.reads <= set(sources.OWN_SETTINGS)
    assert set(sources.OWN_SETTINGS) == set().union(*(s.reads for s in sources.SOURCES.values()))
    from relay import doctor

    assert doctor.SOURCES == ("postgres-poll", "postgres-wal")


@pytest.mark.parametrize(("source", "missing", "message"), [
    ("postgres-poll", "db_url", "source postgres-poll needs db_url (--db / OUTBOX_DB_URL)"),
    ("postgres-wal", "db_url", "source postgres-wal needs db_url (--db / OUTBOX_DB_URL)"),
    ("mongo-poll", "mongo_url",
     "source mongo-poll needs mongo_url (--mongo / OUTBOX_MONGO_URL)"),
    ("mongo-stream", "collections",
     "source mongo-stream needs collections (--collections a,b)"),
])
def test_a_source_without_its_connection_refuses_to_start(
    source: str, missing: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        settings(source, **{missing: None if missing != "collections" else ()})
    assert str(refused.value) == message


@pytest.mark.parametrize(("source", "values", "message"), [
    ("mongo-poll", {"columns": "debezium"},
     "columns='debezium' applies to the postgres-* sources only"),
    ("postgres-wal", {"columns": "debezium", "table_less": True},
     "columns='debezium' with table_less: a table-less relay reads no table"),
    ("postgres-poll", {"columns": "debezium", "table_less": True},
     "columns='debezium' with table_less: a table-less relay reads no table"),
])
def test_a_table_layout_a_source_cannot_read_is_refused_at_start_up(
    source: str, values: dict[str, Any], message: str
) -> None:
    own = {} if source.startswith("mongo") else {"collections": ()}
    with pytest.raises(ConfigurationError, match="^" + message.replace("*", r"\*")):
        settings(source, **{**own, **values})


@pytest.mark.parametrize(("source", "values", "message"), [
    ("postgres-poll", {"slot": "mine"},
     "slot='mine' applies to the postgres-wal source only; the postgres-poll source ignores it"),
    ("postgres-poll", {"table_less": True},
     "table_less=True applies to the postgres-wal source only"),
    ("postgres-poll", {"collections": ("a", "b")},
     "collections='a,b' applies to the mongo-* sources only"),
    ("postgres-wal", {"collections": ("a",)}, "collections='a' applies to the mongo-* sources"),
    ("mongo-stream", {"keep_published": dt.timedelta(days=7)},
     "keep_published='604800s' applies to the postgres-* sources only"),
    ("mongo-poll", {"schema": "app"}, "schema='app' applies to the postgres-* sources only"),
    ("mongo-stream", {"publication": "p"}, "publication='p' applies to the postgres-wal"),
])
def test_another_sources_setting_is_named_in_a_warning_at_start_up(
    source: str, values: dict[str, Any], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A warning, not a refusal: a shared environment may set it for several relays, and the
    # relay starts as it did before the registry.
    own = {} if source.startswith("mongo") else {"collections": ()}
    with caplog.at_level("WARNING", logger="relay.sources"):
        chosen = settings(source, **{**own, **values})
    assert chosen.source == source
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(message)]
    assert {getattr(r, "event", None) for r in caplog.records} == {"setting_ignored"}


def test_defaults_and_both_connections_are_accepted_by_every_source() -> None:
    # An environment may hold both URLs (.local/stack.env does); the tuning settings apply to
    # the sources that have them.
    for name in sources.NAMES:
        own = {} if name.startswith("mongo") else {"collections": ()}
        chosen = settings(name, batch_size=500, poll_interval=0.5, **own)
        assert chosen.source == name
    wal = settings("postgres-wal", collections=(), slot="s", publication="p", table_less=True,
                   message_prefix="billing", keep_published=dt.timedelta(days=1))
    assert wal.slot == "s"


def test_the_wal_source_batches_for_throughput() -> None:
    assert sources.get("postgres-wal").kafka_defaults == {"linger.ms": "5"}
    assert sources.get("postgres-poll").kafka_defaults == {}
