"""The relay's sources by name: where each one's daemon wiring lives (`relay_factory` of its
package's `factory` module). Adding a source is a package with a `factory.relay_factory`, and a
line here. Imported lazily: a PostgreSQL relay never loads pymongo, and the reverse.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.daemon import Relay
    from relay.settings import RelaySettings
    from relay.stats import RelayStats

    RelayFactory = Callable[[RelaySettings, RelayStats], Callable[[], Relay]]

# name -> the module whose `relay_factory` builds it
SOURCES: dict[str, str] = {
    "postgres-poll": "relay.poll.factory",
    "postgres-wal": "relay.wal.factory",
    "mongo-poll": "relay.mongo.factory",
    "mongo-stream": "relay.mongo.factory",
}
NAMES: tuple[str, ...] = tuple(SOURCES)


def factory_of(name: str) -> RelayFactory:
    """The source's relay factory (its name was validated with the settings)."""
    factory: RelayFactory = importlib.import_module(SOURCES[name]).relay_factory
    return factory
