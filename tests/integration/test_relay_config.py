"""Relay settings: CLI > environment > TOML file > defaults; secret files; start-up validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def relay_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run([sys.executable, "-m", "relay.cli", "relay", *args],
                          capture_output=True, text=True, env={**clean, **(env or {})},
                          timeout=60)


def effective(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    result = relay_cli(*args, "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_cli_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[relay]\nbatch-size = 300\npoll_interval = "3s"\ntable = "events"\n'
                      'kafka = "file:9092"\ndb = "postgresql://file@h/db"\n')
    env = {"OUTBOX_CONFIG": str(config), "OUTBOX_BATCH_SIZE": "200"}
    shown = effective("--batch-size", "100", env={**env, "OUTBOX_TABLE": "env_events"})
    assert shown["batch_size"] == 100  # CLI
    assert shown["table"] == "env_events"  # environment over file
    assert shown["poll_interval"] == 3.0  # file over default
    assert shown["kafka_bootstrap"] == "file:9092"
    assert shown["schema"] == "public"  # default
    assert effective(env=env)["batch_size"] == 200


def test_secrets_come_from_files_and_are_redacted(tmp_path: Path) -> None:
    secret = tmp_path / "db-url"
    secret.write_text("postgresql://relay:Very-Secret-1@db:5432/orders\n")
    result = relay_cli("--kafka", "k:9092", "--kafka-setting", "sasl.password=Kafka-Secret-2",
                       "--print-config", env={"OUTBOX_DB_URL_FILE": str(secret)})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["db_url"] == "postgresql://relay:***@db:5432/orders"
    assert "Very-Secret-1" not in result.stdout and "Kafka-Secret-2" not in result.stdout
    missing = relay_cli("--print-config", env={"OUTBOX_DB_URL_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 1 and "OUTBOX_DB_URL_FILE" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "kafka-connect"], "source='kafka-connect'"),
        (["--table", "bad name"], "table='bad name' is not a valid name"),
        (["--kafka-setting", "plugin.library.paths=/tmp/x.so"], "plugin.library.paths"),
        (["--kafka-setting", "acks=1"], "guarantees"),
        (["--kafka-setting", "novalue"], "must look like key=value"),
        (["--topic-template", "{tenant}"], "tenant"),
        (["--poll-interval", "soon"], "not a duration"),
        (["--keep-published", "0s"], "keep_published=0s must be a positive duration"),
        # The header would come after the event's own: a consumer reading the last one would
        # take the relay run for the event's number, version, trace or command fields.
        (["--relay-id-header", "sequence"], "relay_id_header='sequence': the toolkit's own"),
        (["--relay-id-header", "traceparent"], "relay_id_header='traceparent'"),
        (["--relay-id-header", "reply_to"], "relay_id_header='reply_to'"),
        (["--relay-id-header", "dlq.error"], "relay_id_header='dlq.error'"),
        (["--log-level", "LOUD"], "--log-level 'LOUD': choose DEBUG, INFO, WARNING, ERROR"),
        (["--log-format", "xml", "--print-config"], "--log-format 'xml': choose json, human"),
        (["--source", "postgres-wal", "--keep-published", "0"],
         "keep_published=0s must be a positive duration"),
        (["--source", "mongo-poll", "--mongo", "mongodb://h/db"], "needs collections"),
        (["--source", "mongo-poll", "--mongo", "mongodb://h/db", "--collections", "a",
          "--columns", "debezium"],
         "columns='debezium' applies to the postgres-* sources only"),
    ],
)
def test_invalid_settings_fail_at_start_up_naming_the_setting(
    args: list[str], message: str
) -> None:
    result = relay_cli("--db", "postgresql://h/db", "--kafka", "k:9092", *args)
    assert result.returncode == 1
    assert message in result.stderr


def test_tls_and_sasl_settings_pass_through(tmp_path: Path) -> None:
    shown = effective(
        "--db", "postgresql://h/db", "--kafka", "k:9093",
        "--kafka-setting", "security.protocol=SASL_SSL",
        "--kafka-setting", "sasl.mechanism=SCRAM-SHA-512",
        "--kafka-setting", "sasl.username=relay",
        "--kafka-setting", "sasl.password=pw",
        "--kafka-setting", f"ssl.ca.location={tmp_path / 'ca.pem'}",
    )
    assert shown["kafka_settings"] == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "relay", "sasl.password": "***",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
    }


@pytest.mark.parametrize("db", [
    "app:Hunter-Secret-7@127.0.0.1:1/orders",  # no scheme
    "postgresql://app:Hunter Secret-7@127.0.0.1:1/orders",  # a blank in the password
    "postgresql://app:Hunter%zzSecret-7@127.0.0.1:1/orders",  # a bad percent-escape
])
@pytest.mark.parametrize("command", [
    ["replay", "--all", "--dry-run"],
    ["slot", "recover", "--kafka", "127.0.0.1:1"],
    ["shards", "resize", "--shards", "2"],
    ["migrate", "up", "--shards", "2"],
    ["status"],
])
def test_a_malformed_db_url_is_refused_without_printing_its_password(
    command: list[str], db: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    result = subprocess.run([sys.executable, "-m", "relay.cli", *command, "--db", db],
                            capture_output=True, text=True, env=clean, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert "Secret-7" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [
    ["replay", "--all", "--dry-run"],
    ["slot", "recover", "--kafka", "127.0.0.1:1"],
    ["shards", "resize", "--shards", "2"],
    ["migrate", "up"],
    ["status"],
    ["parked", "list"],
    ["relay", "--kafka", "127.0.0.1:1"],
    ["inbox", "purge", "--older-than", "7d"],
    ["verify", "--kafka", "127.0.0.1:1"],
])
def test_an_empty_db_url_is_refused_rather_than_taken_for_the_local_default(
    command: list[str]
) -> None:
    # `--db "$ADMIN_URL"` with the variable unset: libpq would connect to the local server's
    # default database as the login user, and e.g. migrate it.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PG"))}
    result = subprocess.run([sys.executable, "-m", "relay.cli", *command, "--db", ""],
                            capture_output=True, text=True, env=clean, timeout=60)
    assert result.returncode != 0
    assert "--db" in result.stderr and "is empty" in result.stderr, result.stderr
    assert "socket" not in result.stderr  # no attempt to connect
