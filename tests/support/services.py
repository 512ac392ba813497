"""Where test services come from: OUTBOX_TEST_* variables, testcontainers, or the local stack."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Services:
    db_url: str
    kafka_bootstrap: str
    mongo_url: str
    origin: str  # "environment", "testcontainers" or "local stack"
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def local_stack(self) -> bool:
        return self.origin == "local stack"

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            cleanup()


def from_environment() -> Services | None:
    names = ("OUTBOX_TEST_DB_URL", "OUTBOX_TEST_KAFKA_BOOTSTRAP", "OUTBOX_TEST_MONGO_URL")
    values = [os.environ.get(name) for name in names]
    if not any(values):
        return None
    missing = [name for name, value in zip(names, values, strict=True) if not value]
    if missing:
        # Mixing sources is allowed: what is not given comes from the local stack.
        local = from_local_stack()
        defaults = (local.db_url, local.kafka_bootstrap, local.mongo_url)
        values = [v or d for v, d in zip(values, defaults, strict=True)]
        return Services(*[str(v) for v in values], origin="environment + local stack")
    return Services(*[str(v) for v in values], origin="environment")


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def from_testcontainers() -> Services:  # pragma: no cover - needs a Docker engine
    from testcontainers.kafka import KafkaContainer
    from testcontainers.mongodb import MongoDbContainer
    from testcontainers.postgres import PostgresContainer

    postgres = PostgresContainer("postgres:16", driver=None).with_command(
        "postgres -c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=64"
    )
    kafka = KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft()
    mongo = MongoDbContainer("mongo:7").with_command("--replSet rs0 --bind_ip_all")
    for container in (postgres, kafka, mongo):
        container.start()
    mongo.exec('mongosh --quiet --eval "rs.initiate()"')
    host, port = mongo.get_container_host_ip(), mongo.get_exposed_port(27017)
    services = Services(
        db_url=postgres.get_connection_url(),
        kafka_bootstrap=kafka.get_bootstrap_server(),
        mongo_url=f"mongodb://{host}:{port}/outbox?directConnection=true",
        origin="testcontainers",
    )
    services.cleanups += [postgres.stop, kafka.stop, mongo.stop]
    return services


def from_local_stack() -> Services:
    from deploy.local import stack

    settings = stack.up()
    return Services(
        db_url=settings["OUTBOX_DB_URL"],
        kafka_bootstrap=settings["OUTBOX_KAFKA_BOOTSTRAP"],
        mongo_url=settings["OUTBOX_MONGO_URL"],
        origin="local stack",
    )


def discover() -> Services:
    return from_environment() or (
        from_testcontainers() if docker_answers() else from_local_stack()
    )
