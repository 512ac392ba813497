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
# `user:password@host` without a scheme (a --db missing its `postgresql://`).
_BARE_USERINFO = re.compile(r"(^|[\s\"'=/])([^:/?#@\s\"']+):[^@/\s\"']*@")
# libpq's refusals of a malformed connection string quote the string, or the part it choked on,
# which may be the password: the quoted part goes, the reason stays.
_LIBPQ_ECHO = re.compile(
    r'(missing "=" after ").*(" in connection info string)'
    r'|(unexpected spaces found in ").*(", use percent-encoded)'
    r'|(invalid percent-encoded token: ").*(")')


def libpq_url(url: str) -> str:
    """`postgresql+psycopg://...` (SQLAlchemy) -> `postgresql://...` (libpq)."""
    return _DRIVER_SUFFIX.sub(lambda m: f"{m[1]}://", url)


def redact(text: str) -> str:
    """Hide passwords in URLs, conninfo strings and `key=value` settings inside `text`."""
    text = _LIBPQ_ECHO.sub(lambda m: "***".join(g for g in m.groups() if g is not None), text)
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    text = _BARE_USERINFO.sub(r"\1\2:***@", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    return _KEYWORD_SECRET.sub(r"\1***", text)
