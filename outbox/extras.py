"""Optional dependencies, imported only when the feature that needs them is used.

`pip install outbox-relay` serves sync users; SQLAlchemy's asyncio layer needs greenlet, which
SQLAlchemy does not install by itself: that comes with the `asyncio` extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from outbox.errors import MissingExtraError

ASYNCIO_EXTRA = "outbox-relay[asyncio]"


def is_sqlalchemy_asyncio(value: object) -> bool:
    """True for objects of SQLAlchemy's asyncio layer, told apart without importing it."""
    return any(cls.__module__.startswith("sqlalchemy.ext.asyncio")
               for cls in type(value).__mro__)


def sqlalchemy_asyncio() -> ModuleType:
    """`sqlalchemy.ext.asyncio`, or an error that names the extra to install."""
    try:
        module = importlib.import_module("sqlalchemy.ext.asyncio")
        importlib.import_module("greenlet")
    except ImportError as exc:
        raise MissingExtraError(
            f"SQLAlchemy's asyncio support needs greenlet: pip install '{ASYNCIO_EXTRA}' "
            f"({exc})"
        ) from exc
    return module
