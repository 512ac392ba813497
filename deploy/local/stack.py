"""Starts, stops and reports the local stack, and writes `.local/stack.env` for clients."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from deploy.local._common import ServiceError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / ".local"


class Service(Protocol):
    name: str

    def start(self) -> dict[str, str]: ...

    def stop(self) -> None: ...

    def status(self) -> str | None: ...


def services(root: Path) -> dict[str, Service]:
    # Imported here so that `status` works even when an optional client library is missing.
    from deploy.local.kafka import KafkaService
    from deploy.local.mongo import MongoService
    from deploy.local.postgres import PostgresService

    found: list[Service] = [PostgresService(root), KafkaService(root), MongoService(root)]
    return {service.name: service for service in found}


def select(root: Path, names: Sequence[str]) -> list[Service]:
    available = services(root)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ServiceError(", ".join(unknown), f"unknown service; choose from {sorted(available)}")
    return [available[name] for name in (names or list(available))]


def up(root: Path = DEFAULT_ROOT, names: Sequence[str] = ()) -> dict[str, str]:
    """Start the services (those already running are left alone) and write stack.env."""
    root.mkdir(parents=True, exist_ok=True)
    settings = read_env(root)
    for service in select(root, names):
        settings.update(service.start())
    write_env(root, settings)
    return settings


def down(root: Path = DEFAULT_ROOT, names: Sequence[str] = ()) -> None:
    for service in reversed(select(root, names)):
        service.stop()


def status(root: Path = DEFAULT_ROOT) -> dict[str, str | None]:
    return {name: service.status() for name, service in services(root).items()}


def env_path(root: Path) -> Path:
    return root / "stack.env"


def read_env(root: Path = DEFAULT_ROOT) -> dict[str, str]:
    try:
        lines = env_path(root).read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def write_env(root: Path, settings: dict[str, str]) -> None:
    body = "".join(f"{key}={value}\n" for key, value in sorted(settings.items()))
    path = env_path(root)
    path.write_text("# written by `python -m deploy.local up`; local stack only\n" + body)
    path.chmod(0o600)
