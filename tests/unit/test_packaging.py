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
