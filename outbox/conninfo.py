"""Connection strings: accept SQLAlchemy-style URLs; redact secrets before anything logs them."""

from __future__ import annotations

import re

_DRIVER_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+[a-z0-9_]+://", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/?#@\s]*):[^@/\s]*@")
_KEYWORD_SECRET = re.compile(
    r"((?:password|sslpassword|sasl\.password|ssl\.key\.password)\s*[=:]\s*)('[^']*'|\S+)",
    re.IGNORECASE,
)
_QUERY_SECRET = re.compile(r"([?&](?:password|sslpassword)=)[^&\s]*", re.IGNORECASE)


def libpq_url(url: str) -> str:
    """`postgresql+psycopg://...` (SQLAlchemy) -> `postgresql://...` (libpq)."""
    return _DRIVER_SUFFIX.sub(lambda m: f"{m[1]}://", url)


def redact(text: str) -> str:
    """Hide passwords in URLs, conninfo strings and `key=value` settings inside `text`."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    return _KEYWORD_SECRET.sub(r"\1***", text)
