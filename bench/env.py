"""Where the benchmark's services come from, and a description of the machine it runs on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import confluent_kafka
import psycopg

from outbox.conninfo import libpq_url

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stack:
    """The services under test. `db_url` may create databases (the suite makes its own)."""

    db_url: str
    kafka_bootstrap: str
    mongo_url: str | None
    origin: str
    # Server processes, when they are the local stack's: their CPU time is accounted per phase.
    postgres_pid: int | None = None
    kafka_pid: int | None = None
    kafka_version: str | None = None


def _local_status() -> dict[str, str | None]:
    try:
        from deploy.local import stack

        return stack.status()
    except Exception:  # status is informative only; a broken stack shows up when connecting
        return {}


def _pid_in(text: str | None) -> int | None:
    match = re.search(r"\bpid (\d+)", text or "")
    return int(match[1]) if match else None


def setting(name: str, given: str | None = None) -> str | None:
    """A service URL: the option given, else the OUTBOX_* variable, else `.local/stack.env`."""
    from deploy.local.stack import read_env

    return given or os.environ.get(name) or read_env().get(name)


def discover(db: str | None, kafka: str | None, mongo: str | None) -> Stack:
    """Options first, then OUTBOX_* variables, then the local stack's `.local/stack.env`."""
    from deploy.local.stack import read_env

    local = read_env()
    found = {
        "OUTBOX_DB_URL": setting("OUTBOX_DB_URL", db),
        "OUTBOX_KAFKA_BOOTSTRAP": setting("OUTBOX_KAFKA_BOOTSTRAP", kafka),
        "OUTBOX_MONGO_URL": setting("OUTBOX_MONGO_URL", mongo),
    }
    db_url, bootstrap = found["OUTBOX_DB_URL"], found["OUTBOX_KAFKA_BOOTSTRAP"]
    if not db_url or not bootstrap:
        raise SystemExit(
            "bench: no PostgreSQL/Kafka: pass --db and --kafka, set OUTBOX_DB_URL and "
            "OUTBOX_KAFKA_BOOTSTRAP, or start the local stack (`python -m deploy.local up`)"
        )
    is_local = (
        db_url == local.get("OUTBOX_DB_URL")
        and bootstrap == local.get("OUTBOX_KAFKA_BOOTSTRAP")
    )
    status = _local_status() if is_local else {}
    kafka_status = status.get("kafka") or ""
    version = re.search(r"Apache Kafka (\S+)", kafka_status)
    return Stack(
        db_url=libpq_url(db_url),
        kafka_bootstrap=bootstrap,
        mongo_url=found["OUTBOX_MONGO_URL"],
        origin="local stack" if is_local else "given",
        postgres_pid=_pid_in(status.get("postgres")),
        kafka_pid=_pid_in(kafka_status),
        kafka_version=version[1] if version else None,
    )


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: the machine is shared, so every phase records it."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _server_version(db_url: str) -> str | None:
    try:
        with psycopg.connect(db_url, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error:
        return None
    return str(row[0]) if row else None


def _relay_native() -> bool:
    import relay.native

    return relay.native.module is not None


def machine(stack: Stack) -> dict[str, Any]:
    """CPU, memory and software versions, and the commit of the project that was measured."""
    status = _git("status", "--porcelain")
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_mb": _memory_mb(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql": _server_version(stack.db_url),
        "kafka": stack.kafka_version or "unknown (not the local stack)",
        "librdkafka": confluent_kafka.libversion()[0],
        "confluent_kafka": str(getattr(confluent_kafka, "__version__", "")),
        "psycopg": psycopg.__version__,
        # The relay runs from this tree: whether its compiled hot path (`make native`) is built.
        "relay_native": _relay_native(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "services": stack.origin,
    }
