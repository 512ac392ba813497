"""The `outbox` command: migrations, the relay daemon, operations; a thin layer over the library."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import psycopg
import typer

from outbox import migrate as migrations
from outbox.conninfo import libpq_url, redact
from outbox.errors import OutboxError
from outbox.names import SchemaNames

app = typer.Typer(
    name="outbox",
    help="Transactional outbox: apply the schema, run the relay that publishes events to Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
migrate_app = typer.Typer(help="Create and evolve the outbox tables (versioned SQL).",
                          no_args_is_help=True)
app.add_typer(migrate_app, name="migrate")

DbOption = Annotated[
    str,
    typer.Option("--db", envvar="OUTBOX_DB_URL", show_envvar=True,
                 help="PostgreSQL URL of the application's database."),
]
SchemaOption = Annotated[
    str, typer.Option(envvar="OUTBOX_SCHEMA", show_envvar=True, help="Schema of the outbox.")
]
TableOption = Annotated[
    str, typer.Option(envvar="OUTBOX_TABLE", show_envvar=True, help="Name of the outbox table.")
]

T = TypeVar("T")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(code)


def explain(exc: BaseException) -> str:
    """The exception and its causes, one per line, most specific last."""
    lines = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    while cause is not None:
        lines.append(f"  caused by: {cause}")
        cause = cause.__cause__
    return "\n".join(lines)


def guarded(action: Callable[[], T]) -> T:
    """Run a library call; turn the project's and the drivers' errors into a readable exit."""
    try:
        return action()
    except (OutboxError, psycopg.Error) as exc:
        fail(explain(exc))
        raise AssertionError("unreachable") from exc


def connect(db: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(libpq_url(db), connect_timeout=10)
    except psycopg.Error as exc:
        fail(f"cannot connect to the database: {exc}")
        raise AssertionError("unreachable") from exc


@migrate_app.command("up")
def migrate_up(
    db: DbOption, schema: SchemaOption = "public", table: TableOption = "outbox"
) -> None:
    """Apply pending migrations (in one transaction, under an advisory lock)."""
    names = guarded(lambda: SchemaNames(schema, table))
    with connect(db) as conn:
        applied = guarded(lambda: migrations.up(conn, names))
    for migration in applied:
        typer.echo(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        typer.echo("schema is up to date")


@migrate_app.command("status")
def migrate_status(
    db: DbOption, schema: SchemaOption = "public", table: TableOption = "outbox"
) -> None:
    """Show applied and pending migrations; exit 3 when some are pending."""
    names = guarded(lambda: SchemaNames(schema, table))
    with connect(db) as conn:
        states = guarded(lambda: migrations.status(conn, names))
    for state in states:
        m = state.migration
        where = f"applied {state.applied_at}" if state.applied else "pending"
        typer.echo(f"{m.version:04d}_{m.name:30} {where}")
    if not all(state.applied for state in states):
        raise typer.Exit(3)


@migrate_app.command("sql")
def migrate_sql(schema: SchemaOption = "public", table: TableOption = "outbox") -> None:
    """Print the SQL of every migration (for Alembic or another migration tool)."""
    names = guarded(lambda: SchemaNames(schema, table))
    typer.echo(guarded(lambda: migrations.render_all(names)))


# Sub-commands that live in their own modules are registered here, one line each.


def main() -> None:
    app(prog_name="outbox")


if __name__ == "__main__":
    main()
