"""How every `outbox` command reports a failure: the cause chain, redacted, and exit code 1."""

from __future__ import annotations

from typing import NoReturn

import typer

from outbox.conninfo import redact


def explain(exc: BaseException) -> str:
    """The exception and its causes, one per line, most specific last."""
    lines = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    while cause is not None:
        lines.append(f"  caused by: {cause}")
        cause = cause.__cause__
    return "\n".join(lines)


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code)


def not_empty(value: str | None) -> str | None:
    """An option's callback: refuse an empty URL before anything connects. `--db "$URL"` with
    the variable unset is empty, and libpq would take it for the local server's default
    database (the login user's), which a command could then change."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty (an unset variable?): give the database URL")
    return value
