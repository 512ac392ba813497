"""Benchmarks written as their own scripts (consumer rate, MongoDB drain), run and folded in."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.env import REPO, Stack


class ExternalError(Exception):
    """The script failed or printed no JSON result."""


def run_module(
    module: str, args: list[str], env: dict[str, str], log: Path, timeout: float
) -> dict[str, Any]:
    """`python -m module args`; its last stdout line that is a JSON object is the result.

    The child's CPU seconds are added as `cpu_s_script` (it runs alone: no relay meanwhile).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("ab") as err:
        completed = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=REPO, env={**os.environ, **env},
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, timeout=timeout,
            check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = completed.stdout.decode(errors="replace")
    if completed.returncode != 0:
        tail = log.read_text(errors="replace").strip()[-800:]
        raise ExternalError(f"{module} exited with {completed.returncode}: {tail}")
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            result["cpu_s_script"] = round(
                after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
            return result
    raise ExternalError(f"{module} printed no JSON result: {output.strip()[-300:]}")


def consumer_rate(
    stack: Stack, messages: int, log: Path, timeout: float, *, pipeline: bool = False
) -> dict[str, Any]:
    """bench/consumer_rate.py: messages/s through the idempotent consumer, one row each;
    `pipeline`: the consumer's psycopg pipeline mode (Consumer(pipeline=True))."""
    if not (REPO / "bench" / "consumer_rate.py").exists():
        return {"available": False, "reason": "bench/consumer_rate.py is not there yet"}
    env = {"OUTBOX_DB_URL": stack.db_url, "OUTBOX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap}
    args = ["--messages", str(messages), *(["--pipeline"] if pipeline else [])]
    result = run_module("bench.consumer_rate", args, env, log, timeout)
    processed = int(result.get("processed", -1))
    rows = int(result.get("rows", -1))
    duplicates = int(result.get("duplicates", 0))
    # Its ledger: every message handled once, its row committed, nothing skipped as a dup.
    result["ledger"] = {
        "committed": messages, "processed": processed, "rows": rows,
        "lost": max(0, messages - rows), "phantom": max(0, rows - messages),
        "held": processed == messages and rows == messages and duplicates == 0,
    }
    result["available"] = True
    return result


def mongo_drain(
    stack: Stack, relay_source: str, events: int, log: Path, timeout: float
) -> dict[str, Any]:
    """bench/mongo_drain.py: drain of pending events embedded in documents (10 per document, as
    in the MongoDB issue), for one source; its relay runs in its process (no RSS of its own)."""
    env = {"OUTBOX_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "OUTBOX_MONGO_URL": stack.mongo_url or ""}
    documents = max(1, events // 10)
    args = ["--sources", relay_source, "--events", str(events), "--documents", str(documents)]
    result = run_module("bench.mongo_drain", args, env, log, timeout)
    lost = int(result.get("lost", -1))
    disorder = int(result.get("order_violations", 0))
    result["available"] = True
    result["events_per_s"] = result.get("events_per_second")
    # Its ledger: every event delivered, order per document kept (no rollbacks in this model).
    result["ledger"] = {
        "committed": int(result.get("events", 0)), "lost": lost, "phantom": 0,
        "dup": int(result.get("dup", 0)), "disordered_keys": disorder,
        "held": lost == 0 and disorder == 0,
    }
    return result
