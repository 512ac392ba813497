"""MongoDB helpers for tests."""

from __future__ import annotations

import urllib.parse


def with_database(url: str, name: str) -> str:
    """`url` with its default database replaced by `name`."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
