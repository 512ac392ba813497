"""The library's commands of `outbox`: migrations, dead letters, the inbox.

The relay daemon's commands (`relay`, `slot`, `parked`, `status`, `doctor`) are registered on the
same `app` by `relay.cli`, which is what the `outbox` console script runs: the library never
depends on the daemon.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import psycopg
import typer

from outbox import migrate as migrations
from outbox.cli_errors import explain, fail
from outbox.conninfo import libpq_url
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

ColumnsOption = Annotated[
    str, typer.Option(
        "--columns", envvar="OUTBOX_COLUMNS", show_envvar=True,
        help="Layout of the outbox table: native (created by `outbox migrate up`) or debezium "
             "(Debezium's id, aggregatetype, aggregateid, type, payload).")
]

ShardsOption = Annotated[
    int | None, typer.Option(
        "--shards", envvar="OUTBOX_SHARD_COUNT", show_envvar=True,
        help="Make the outbox sharded: N shards by a hash of aggregate_id, for several polling "
             "relays (`outbox relay --shards`). Fixed once applied (docs/operations.md).")
]

T = TypeVar("T")


def guarded(action: Callable[[], T]) -> T:
    """Run a library call; turn the project's and the drivers' errors into a readable exit."""
    try:
        return action()
    except (OutboxError, psycopg.Error) as exc:
        fail(explain(exc))


def connect(db: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(libpq_url(db), connect_timeout=10)
    except psycopg.Error as exc:
        fail(f"cannot connect to the database: {exc}")


@migrate_app.command("up")
def migrate_up(
    db: DbOption, schema: SchemaOption = "public", table: TableOption = "outbox",
    columns: ColumnsOption = "native", shards: ShardsOption = None,
) -> None:
    """Apply pending migrations (in one transaction, under an advisory lock). With --columns
    debezium, the table exists already (Debezium's): what the polling relay needs is added.
    With --shards N, the outbox becomes sharded (once; another N later is refused)."""
    names = guarded(lambda: SchemaNames(schema, table))
    guarded(lambda: migrations.available(columns))
    guarded(lambda: migrations.check_shards(shards, columns))
    with connect(db) as conn:
        applied = guarded(lambda: migrations.up(conn, names, columns, shards))
    for migration in applied:
        typer.echo(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        typer.echo("schema is up to date")


@migrate_app.command("status")
def migrate_status(
    db: DbOption, schema: SchemaOption = "public", table: TableOption = "outbox",
    columns: ColumnsOption = "native",
) -> None:
    """Show applied and pending migrations; exit 3 when some are pending."""
    names = guarded(lambda: SchemaNames(schema, table))
    guarded(lambda: migrations.available(columns))
    with connect(db) as conn:
        states = guarded(lambda: migrations.status(conn, names, columns))
    for state in states:
        m = state.migration
        where = f"applied {state.applied_at}" if state.applied else "pending"
        typer.echo(f"{m.version:04d}_{m.name:30} {where}")
    if not all(state.applied for state in states):
        raise typer.Exit(3)


@migrate_app.command("sql")
def migrate_sql(
    schema: SchemaOption = "public",
    table: TableOption = "outbox",
    columns: ColumnsOption = "native",
    since: Annotated[int, typer.Option(
        help="Only migrations after this version (what a new outbox-relay release added).")] = 0,
    with_tracking: Annotated[bool, typer.Option(
        help="Also record them in outbox_migrations, so `migrate status` sees them.")] = False,
    shards: ShardsOption = None,
) -> None:
    """Print the SQL of the migrations (for Alembic or another migration tool)."""
    names = guarded(lambda: SchemaNames(schema, table))
    typer.echo(guarded(lambda: migrations.render_all(
        names, since=since, with_tracking=with_tracking, columns=columns, shards=shards)))


# Sub-commands that live in their own modules are registered here, one line each.
from outbox.consumer_cli import dlq_app, inbox_app  # noqa: E402 - sub-apps registered below
from outbox.contracts.cli import asyncapi_command  # noqa: E402

app.add_typer(dlq_app, name="dlq")
app.add_typer(inbox_app, name="inbox")
app.command("asyncapi")(asyncapi_command)


def main() -> None:
    """`python -m outbox.cli`: the library's commands alone (the console script is relay.cli's)."""
    from outbox.config_files import apply_secret_files

    try:
        apply_secret_files(os.environ)
    except OutboxError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    app(prog_name="outbox")


if __name__ == "__main__":
    main()
