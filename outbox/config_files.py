"""Settings from files, read only at the CLI edge: a TOML file, and `OUTBOX_*_FILE` secrets."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

from outbox.errors import ConfigurationError

PREFIX = "OUTBOX_"
FILE_SUFFIX = "_FILE"


def apply_secret_files(environ: MutableMapping[str, str]) -> list[str]:
    """For each `OUTBOX_X_FILE` set while `OUTBOX_X` is not, read `OUTBOX_X` from that file
    (Docker and Kubernetes secrets are mounted as files). Returns the variables filled in."""
    filled = []
    for name in sorted(environ):
        if not (name.startswith(PREFIX) and name.endswith(FILE_SUFFIX)):
            continue
        target = name[: -len(FILE_SUFFIX)]
        if target in environ:
            continue
        path = Path(environ[name])
        try:
            environ[target] = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"{name}={path}: cannot read the file: {exc.strerror}"
            ) from exc
        filled.append(target)
    return filled


def read_toml_section(path: Path, section: str, allowed: Iterable[str]) -> dict[str, Any]:
    """The `[section]` table of a TOML file; keys are the command's option names (dashes or
    underscores). Unknown keys are refused, naming the file and the key."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from exc
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"config file {path}: [{section}] must be a table")
    known = set(allowed)
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigurationError(
                f"config file {path}: unknown setting {section}.{key}; "
                f"known: {', '.join(sorted(known))}")
        values[name] = value
    return values


__all__ = ["apply_secret_files", "read_toml_section"]
