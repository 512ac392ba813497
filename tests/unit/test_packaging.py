"""The wheel ships every package, the SQL files and the migrations."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_python_package_is_listed_for_the_wheel() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(path.parent.relative_to(REPO).parts)
        for top in ("outbox", "relay")
        for path in (REPO / top).rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert config["package-dir"]["outbox.migrations"] == "migrations"
    assert (REPO / "migrations" / "__init__.py").exists()


def test_sql_files_are_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = config["package-data"]
    for package in ("outbox.sql", "relay.sql", "outbox.migrations"):
        assert package in config["packages"] and "*.sql" in data[package]
    assert list((REPO / "relay" / "sql").glob("*.sql"))
    assert list((REPO / "migrations").glob("0001_*.sql"))


def test_the_library_never_imports_the_daemon() -> None:
    """Layers point one way: `relay` builds on `outbox`, never the reverse (the daemon's
    commands are registered by relay.cli)."""
    import ast

    found = []
    for path in [*(REPO / "outbox").rglob("*.py"), *(REPO / "migrations").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(REPO)}: {name}" for name in names
                      if name == "relay" or name.startswith("relay.")]
    assert found == []
