"""Named SQL blocks in `.sql` files (`-- name: x` starts a block): the one convention for the
project's SQL, used by the library (`outbox/sql/`) and the daemon (`relay/sql/`, relay.queries).

Names in braces are identifiers from SchemaNames (or the caller's own psycopg.sql pieces),
composed with psycopg.sql; values are always bound parameters.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from psycopg import sql

from outbox.names import SchemaNames

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@functools.cache
def blocks(package: str, filename: str) -> dict[str, str]:
    """The blocks of `<package>/sql/<filename>`, by name."""
    text = resources.files(package).joinpath("sql", filename).read_text(encoding="utf-8")
    parts = _BLOCK.split(text)
    return {name: _without_comment_lines(body)
            for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _without_comment_lines(body: str) -> str:
    # The comments are for the reader of the file; the server need not parse them, and
    # SQLAlchemy's text() would take a `:word` in one for a parameter.
    return "\n".join(line for line in body.strip().splitlines()
                     if not line.lstrip().startswith("--"))


def block(package: str, filename: str, name: str) -> sql.SQL:
    """Block `name` of `<package>/sql/<filename>`, for the caller to fill in with `.format()`
    (its names as sql.Identifier, never as text)."""
    return sql.SQL(blocks(package, filename)[name])


def compose(
    package: str, filename: str, name: str, names: SchemaNames, /, **extra: sql.Composable
) -> sql.Composed:
    """Block `name` with the identifiers of `names` and the caller's `extra` placeholders."""
    return block(package, filename, name).format(**names.identifiers(), **extra)
