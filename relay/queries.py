"""Named SQL blocks loaded from `relay/sql/*.sql` (`-- name: x` starts a block).

Names in braces are identifiers from SchemaNames, composed with psycopg.sql; values are always
bound parameters.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from psycopg import sql

from outbox.names import SchemaNames

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@functools.cache
def _blocks(filename: str) -> dict[str, str]:
    text = resources.files("relay").joinpath("sql", filename).read_text(encoding="utf-8")
    parts = _BLOCK.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@functools.cache
def query(filename: str, name: str, names: SchemaNames) -> sql.Composed:
    """Block `name` of `relay/sql/<filename>` with the identifiers of `names` filled in."""
    return sql.SQL(_blocks(filename)[name]).format(**names.identifiers())


def compose(filename: str, name: str, names: SchemaNames, **extra: sql.Composable) -> sql.Composed:
    """Block `name` with the identifiers of `names` and the caller's `extra` placeholders
    (composed with psycopg.sql too); not cached: the caller keeps what it builds."""
    return sql.SQL(_blocks(filename)[name]).format(**names.identifiers(), **extra)
