"""Structured logs: JSON lines (default off a terminal) or a human format; secrets redacted."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from outbox.conninfo import redact
from outbox.errors import ConfigurationError

# Attributes every LogRecord has; anything else was passed through `extra=` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        when = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        line = f"{when} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check(level: str = "INFO", fmt: str = "auto") -> None:
    """Refuse a log level or format by the option's name (at start-up, before --print-config)."""
    if str(level).upper() not in LEVELS:
        raise ConfigurationError(f"--log-level {level!r}: choose {', '.join(LEVELS)}")
    if fmt not in ("json", "human", "auto"):
        raise ConfigurationError(f"--log-format {fmt!r}: choose json, human or auto")


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    """Install one stderr handler on the root logger. fmt: json, human, or auto (tty: human)."""
    check(level, fmt)
    if fmt == "auto":
        fmt = "human" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
