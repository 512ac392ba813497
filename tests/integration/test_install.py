"""The package as a user installs it: the wheel, in a clean virtualenv, without and with extras.

The suite itself runs in a virtualenv with every development dependency, which hid that a plain
install could not publish (SQLAlchemy's asyncio layer needs greenlet, which only `[dev]` had).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Not in git: the wheel's build makes them from aio.py and aio_stores.py (setup.py's build_sync).
GENERATED = {"outbox/consumer/runner.py", "outbox/consumer/stores.py"}

# The README's sync publish (the demo's OrderService, reduced to its outbox part) and the
# consumer import, run by the clean venv's interpreter against the test's database.
SYNC_USER = textwrap.dedent("""
    import sys
    import psycopg
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    import outbox
    from outbox.consumer import Consumer  # noqa: F401  the import alone used to fail

    engine = create_engine(sys.argv[1])
    with Session(engine) as session, session.begin():
        outbox.publish(session, outbox.Event(
            aggregate_type="Order", aggregate_id="1", event_type="OrderCreated",
            payload={"orderId": 1}))
    print("published")
""")

# Without the `asyncio` extra, the asyncio path must say which extra to install.
ASYNC_WITHOUT_EXTRA = textwrap.dedent("""
    from outbox.consumer import AsyncConsumer
    from outbox.errors import MissingExtraError
    try:
        AsyncConsumer(name="c", topics=["t"], kafka={"bootstrap.servers": "127.0.0.1:1"},
                      db=type("AsyncEngine", (), {"__module__": "sqlalchemy.ext.asyncio.engine"})())
    except MissingExtraError as exc:
        assert "outbox-relay[asyncio]" in str(exc), exc
        print("refused")
""")

ASYNC_USER = textwrap.dedent("""
    import asyncio, sys
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    import outbox
    from outbox.consumer import AsyncConsumer  # noqa: F401

    async def main() -> None:
        engine = create_async_engine(sys.argv[1])
        async with AsyncSession(engine) as session, session.begin():
            await outbox.publish(session, outbox.Event(
                aggregate_type="Order", aggregate_id="2", event_type="OrderCreated",
                payload={"orderId": 2}))
        await engine.dispose()
        print("published")

    asyncio.run(main())
""")


# With the `otel` extra, the active span's traceparent goes into the event's headers.
OTEL_USER = textwrap.dedent("""
    import sys
    import psycopg
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    import outbox

    span = NonRecordingSpan(SpanContext(
        trace_id=0x0af7651916cd43dd8448eb211c80319c, span_id=0xb7ad6b7169203331,
        is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    token = context.attach(trace.set_span_in_context(span))
    with psycopg.connect(sys.argv[1]) as conn:
        outbox.publish(conn, outbox.Event("Order", "3", "OrderCreated", {"orderId": 3}))
    context.detach(token)
    print("published")
""")

# MongoDB users need no extra: events embedded in the aggregate's document, in a transaction.
MONGO_USER = textwrap.dedent("""
    import sys
    from pymongo import MongoClient
    from outbox import Event
    from outbox import mongo as outbox_mongo

    client = MongoClient(sys.argv[1])
    orders = client.get_default_database().orders
    orders.insert_one({"_id": "seed"})  # the collection exists before the transaction
    with client.start_session() as session, session.start_transaction():
        orders.insert_one(outbox_mongo.new_document(
            {"_id": "o1"}, Event("Order", "o1", "OrderCreated", {"orderId": 1})), session=session)
    print(len(orders.find_one({"_id": "o1"})["_outbox"]))
""")


# Typed events need no extra as dataclasses; pydantic models come with `outbox-relay[pydantic]`.
TYPED_USER = textwrap.dedent("""
    import dataclasses, sys
    import psycopg
    import outbox

    @outbox.event_type("OrderPaid", aggregate="Order", id_field="order_id")
    @dataclasses.dataclass
    class OrderPaid:
        order_id: int
        cents: int

    if len(sys.argv) > 2:
        import pydantic

        @outbox.event_type("OrderShipped", aggregate="Order", id_field="order_id")
        class OrderShipped(pydantic.BaseModel):
            order_id: int

        extra = [OrderShipped(order_id=5)]
    else:
        extra = []
    with psycopg.connect(sys.argv[1]) as conn:
        outbox.publish(conn, OrderPaid(order_id=4, cents=100), *extra)
    print("published")
""")


# Schema Registry formats need `outbox-relay[schema-registry]`: without it, an error names it.
SCHEMA_REGISTRY_WITHOUT_EXTRA = textwrap.dedent("""
    from outbox.contracts.schema_registry import SchemaRegistryFormats
    from outbox.errors import MissingExtraError
    try:
        SchemaRegistryFormats("http://127.0.0.1:9").avro(
            "Order", "1", "OrderPlaced", {}, '{"type": "record", "name": "E", "fields": []}')
    except MissingExtraError as exc:
        assert "outbox-relay[schema-registry]" in str(exc), exc
        print("refused")
""")


def run(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=600, cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def run_as_user(venv: Path, code: str, *args: str, cwd: Path) -> str:
    """Run `code` with the venv's interpreter, from a script in `cwd` (outside the repository,
    so that the installed package is the one imported); returns what it printed, stripped."""
    script = cwd / "user_code.py"
    script.write_text(code)
    return run(venv / "bin" / "python", script, *args, cwd=cwd).strip()


def sqlalchemy_url(conninfo: str) -> str:
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import URL

    params = conninfo_to_dict(conninfo)
    return URL.create(
        "postgresql+psycopg", username=str(params.get("user")),
        password=str(params["password"]) if params.get("password") else None,
        host=str(params.get("host")), port=int(str(params.get("port", 5432))),
        database=str(params.get("dbname"))).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of the tree: setuptools' build/ directory in a working copy could carry
    # files that git no longer has.
    # The generated modules are left out too, as in a clean clone: the build must make them.
    source = tmp_path_factory.mktemp("source") / "outbox-relay"
    patterns = shutil.ignore_patterns(
        ".git", ".venv", ".local", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory).relative_to(REPO)
        return set(patterns(directory, names)) | {
            name for name in names if (here / name).as_posix() in GENERATED}

    shutil.copytree(REPO, source, ignore=ignore)
    assert not any((source / target).exists() for target in GENERATED)
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out, source)
    (found,) = out.glob("outbox_relay-*.whl")
    return found


def test_the_wheel_carries_the_generated_sync_modules(wheel: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "async_to_sync", REPO / "tools" / "async_to_sync.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    assert {pair.target for pair in script.PAIRS} == GENERATED
    with zipfile.ZipFile(wheel) as archive:
        for pair in script.PAIRS:
            assert archive.read(pair.target).decode() == script.convert(pair), pair.target


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A virtualenv with nothing but `pip install outbox-relay` (no extras)."""
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel)
    return venv


def venv_with(tmp_path_factory: pytest.TempPathFactory, wheel: Path, extra: str) -> Path:
    venv = tmp_path_factory.mktemp(f"venv-{extra}")
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", f"{wheel}[{extra}]")
    return venv


@pytest.mark.timeout(900)
def test_plain_install_publishes_with_a_sync_session_and_imports_the_consumer(
    clean_venv: Path, empty_db_url: str, tmp_path: Path
) -> None:
    python = clean_venv / "bin" / "python"
    assert subprocess.run([python, "-c", "import greenlet"], capture_output=True).returncode != 0, \
        "greenlet is installed: this venv does not show what a plain install has"
    # Outside the repository, so that the installed package is the one imported.
    run(clean_venv / "bin" / "outbox", "migrate", "up", "--db", empty_db_url, cwd=tmp_path)
    url = sqlalchemy_url(empty_db_url)
    assert run_as_user(clean_venv, SYNC_USER, url, cwd=tmp_path) == "published"
    assert run_as_user(clean_venv, ASYNC_WITHOUT_EXTRA, cwd=tmp_path) == "refused"

    import psycopg

    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute("SELECT aggregate_id, event_type FROM outbox").fetchall()
    assert rows == [("1", "OrderCreated")]


@pytest.mark.timeout(900)
def test_plain_install_runs_outbox_verify_without_the_repository(
    clean_venv: Path, empty_db_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """`outbox verify` needs nothing of tests/ or bench/: its relay child is the installed one."""
    outbox_cli = clean_venv / "bin" / "outbox"
    assert "--faults" in run(outbox_cli, "verify", "--help", cwd=tmp_path)
    out = run(outbox_cli, "verify", "--db", empty_db_url, "--kafka", kafka_bootstrap,
              "--duration", "4s", "--rate", "50", "--faults", "relay-kill", cwd=tmp_path)
    assert "verdict: PASS" in out
    assert "removed everything it created" in out


@pytest.mark.timeout(900)
def test_asyncio_extra_publishes_with_an_async_session(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, empty_db_url: str, tmp_path: Path
) -> None:
    venv = venv_with(tmp_path_factory, wheel, "asyncio")
    run(venv / "bin" / "outbox", "migrate", "up", "--db", empty_db_url, cwd=tmp_path)
    url = sqlalchemy_url(empty_db_url)
    assert run_as_user(venv, ASYNC_USER, url, cwd=tmp_path) == "published"

    import psycopg

    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute("SELECT aggregate_id, event_type FROM outbox").fetchall()
    assert rows == [("2", "OrderCreated")]


@pytest.mark.timeout(900)
def test_plain_install_writes_events_embedded_in_a_mongodb_document(
    clean_venv: Path, mongo_url: str, tmp_path: Path
) -> None:
    import urllib.parse
    import uuid

    from pymongo import MongoClient

    name = f"install_{uuid.uuid4().hex[:8]}"
    url = urllib.parse.urlunsplit(urllib.parse.urlsplit(mongo_url)._replace(path=f"/{name}"))
    try:
        assert run_as_user(clean_venv, MONGO_USER, url, cwd=tmp_path) == "1"
    finally:
        with MongoClient(url) as client:
            client.drop_database(name)


@pytest.mark.timeout(900)
def test_otel_extra_puts_the_active_span_into_the_event_headers(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, empty_db_url: str, tmp_path: Path
) -> None:
    venv = venv_with(tmp_path_factory, wheel, "otel")
    run(venv / "bin" / "outbox", "migrate", "up", "--db", empty_db_url, cwd=tmp_path)
    assert run_as_user(venv, OTEL_USER, empty_db_url, cwd=tmp_path) == "published"

    import psycopg

    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute("SELECT headers->>'traceparent' FROM outbox").fetchall()
    assert rows == [("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",)]


@pytest.mark.timeout(900)
def test_local_mongo_extra_installs_a_runnable_mongodb_substitute(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, tmp_path: Path
) -> None:
    venv = venv_with(tmp_path_factory, wheel, "local-mongo")
    shown = run(venv / "bin" / "python", "-m", "secantus", "--help", cwd=tmp_path)
    assert "--storage-path" in shown and "--port" in shown


@pytest.mark.timeout(900)
def test_plain_install_publishes_dataclass_events_and_writes_asyncapi_json(
    clean_venv: Path, empty_db_url: str, tmp_path: Path
) -> None:
    python = clean_venv / "bin" / "python"
    # (pydantic may be there all the same: recent typer releases depend on it.)
    assert subprocess.run([python, "-c", "import yaml"], capture_output=True).returncode != 0
    run(clean_venv / "bin" / "outbox", "migrate", "up", "--db", empty_db_url, cwd=tmp_path)
    assert run_as_user(clean_venv, TYPED_USER, empty_db_url, cwd=tmp_path) == "published"
    (tmp_path / "shop_events.py").write_text(TYPED_USER.split("if len(sys.argv)")[0])
    document = run(clean_venv / "bin" / "outbox", "asyncapi", "--app", "shop_events",
                   "--format", "json", cwd=tmp_path)
    assert '"OrderPaid.v1"' in document
    refused = subprocess.run([clean_venv / "bin" / "outbox", "asyncapi", "--app", "shop_events"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 1 and "outbox-relay[asyncapi]" in refused.stderr
    assert run_as_user(clean_venv, SCHEMA_REGISTRY_WITHOUT_EXTRA, cwd=tmp_path) == "refused"

    import psycopg

    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute("SELECT event_type, headers->>'event_version' FROM outbox").fetchall()
    assert rows == [("OrderPaid", "1")]


@pytest.mark.timeout(900)
def test_pydantic_extra_publishes_pydantic_events(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, empty_db_url: str, tmp_path: Path
) -> None:
    venv = venv_with(tmp_path_factory, wheel, "pydantic")
    run(venv / "bin" / "outbox", "migrate", "up", "--db", empty_db_url, cwd=tmp_path)
    assert run_as_user(venv, TYPED_USER, empty_db_url, "pydantic", cwd=tmp_path) == "published"

    import psycopg

    with psycopg.connect(empty_db_url) as conn:
        rows = conn.execute("SELECT event_type FROM outbox ORDER BY event_type").fetchall()
    assert rows == [("OrderPaid",), ("OrderShipped",)]
