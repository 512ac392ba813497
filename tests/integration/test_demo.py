"""The README's main command, in a short mode: the demo's verdict must hold."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from pymongo import MongoClient

from outbox.conninfo import libpq_url
from tests.support.pg import drop_database
from tests.support.services import Services

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("source", ["postgres-wal", "postgres-poll", "mongo-poll", "mongo-stream"])
def test_demo_short_run_reaches_a_good_verdict(services: Services, source: str) -> None:
    prefix = f"demo_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OUTBOX_DB_URL": services.db_url,
           "OUTBOX_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
           "OUTBOX_MONGO_URL": services.mongo_url}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "demo", "--source", source, "--duration", "8", "--rate", "15",
             "--prefix", prefix],
            capture_output=True, text=True, env=env, timeout=300,
        )
    finally:
        for suffix in ("orders", "billing"):
            drop_database(libpq_url(services.db_url), f"{prefix}_{suffix}")
        with MongoClient(services.mongo_url) as mongo:
            mongo.drop_database(f"{prefix}_orders")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "relay killed with SIGKILL" in result.stdout
    assert "VERDICT: OK" in result.stdout
    # The billing step: commands sent and replies applied, live and in the verdict.
    assert "replies applied" in result.stdout
    assert "every approved order charged by command" in result.stdout
