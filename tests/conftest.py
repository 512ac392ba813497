"""Fixtures: real PostgreSQL, Kafka and MongoDB servers, with one database/topic set per test.

Services come from OUTBOX_TEST_DB_URL / OUTBOX_TEST_KAFKA_BOOTSTRAP / OUTBOX_TEST_MONGO_URL when
set, else from testcontainers when a Docker engine answers, else from the local stack
(`python -m deploy.local up`, started on demand).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox import migrate
from outbox.conninfo import libpq_url
from outbox.names import SchemaNames
from tests.support.pg import drop_database
from tests.support.services import Services, discover

# One template per test session, so that sessions run side by side against one server do not
# drop each other's template.
TEMPLATE_DB = f"outbox_test_template_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    found = discover()
    yield found
    found.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return ["services: from OUTBOX_TEST_* variables, else testcontainers, else the local stack"]


def with_database(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(libpq_url(url), dbname=dbname)


@pytest.fixture(scope="session")
def pg_admin_url(services: Services) -> str:
    return libpq_url(services.db_url)


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> Iterator[str]:
    """A database with every migration applied; each test's database is a copy of it."""
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(TEMPLATE_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    with psycopg.connect(with_database(pg_admin_url, TEMPLATE_DB)) as conn:
        migrate.up(conn, SchemaNames())
    yield TEMPLATE_DB
    drop_database(pg_admin_url, TEMPLATE_DB)


def copy_of_template(admin_url: str, template: str, prefix: str = "test") -> str:
    """A new database with the outbox schema migrated (a copy of `template`); returns its name.
    The caller drops it (tests.support.pg.drop_database)."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
    return name


@pytest.fixture
def db_name(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    name = copy_of_template(pg_admin_url, pg_template)
    yield name
    drop_database(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url: str, db_name: str) -> str:
    """A psycopg URL of a fresh database with the outbox schema migrated."""
    return with_database(pg_admin_url, db_name)


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database without the outbox schema."""
    name = f"empty_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_database(pg_admin_url, name)
    drop_database(pg_admin_url, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url) as connection:
        yield connection


@pytest.fixture(scope="session")
def kafka_bootstrap(services: Services) -> str:
    return services.kafka_bootstrap


@pytest.fixture(scope="session")
def mongo_url(services: Services) -> str:
    return services.mongo_url


@pytest.fixture
def private_kafka(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Kafka broker of this test alone, for tests that stop and start it."""
    if not services.local_stack:
        pytest.skip("fault tests start private servers from the local stack's binaries; "
                    f"services here come from {services.origin}")
    from deploy.local.kafka import KafkaService

    broker = KafkaService(tmp_path_factory.mktemp("kafka"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def private_postgres(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, str]]:
    """A PostgreSQL server of this test alone (migrated), for tests that restart it."""
    if not services.local_stack:
        pytest.skip("fault tests start private servers from the local stack's binaries; "
                    f"services here come from {services.origin}")
    from deploy.local.postgres import PostgresService

    server = PostgresService(tmp_path_factory.mktemp("postgres"))
    url = server.start()["OUTBOX_DB_URL"]
    with psycopg.connect(url) as conn:
        migrate.up(conn, SchemaNames())
    yield server, url
    server.discard()
