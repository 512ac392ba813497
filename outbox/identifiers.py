"""Validation of SQL identifiers that come from configuration (schema, table, slot names)."""

from __future__ import annotations

import re

from outbox.errors import ConfigurationError

# PostgreSQL truncates identifiers at 63 bytes; we refuse instead so that two configured
# names can never silently collide. Quoting (psycopg.sql.Identifier) still happens everywhere.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_identifier(value: str, setting: str) -> str:
    """Return `value` if it is a plain identifier, else raise naming the setting."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ConfigurationError(
            f"{setting}={value!r} is not a valid name: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return value
