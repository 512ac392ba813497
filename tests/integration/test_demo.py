"""The README's main command, in a short mode: the demo's verdict must hold."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg import sql

from tests.support.services import Services

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("source", ["postgres-poll"])
def test_demo_short_run_reaches_a_good_verdict(services: Services, source: str) -> None:
    prefix = f"demo_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OUTBOX_DB_URL": services.db_url,
           "OUTBOX_KAFKA_BOOTSTRAP": services.kafka_bootstrap}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "demo", "--source", source, "--duration", "8", "--rate", "15",
             "--prefix", prefix],
            capture_output=True, text=True, env=env, timeout=300,
        )
    finally:
        with psycopg.connect(services.db_url, autocommit=True) as admin:
            for suffix in ("orders", "billing"):
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(f"{prefix}_{suffix}")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "relay killed with SIGKILL" in result.stdout
    assert "VERDICT: OK" in result.stdout
