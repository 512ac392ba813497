"""A pass over a collection's pending documents in _id order, one page at a time, without I/O."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from typing import Any

from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp

# BSON's comparison order of types. A query's `$gt` only matches values of the same bracket, so
# a pass that reaches the end of one bracket goes on with `$type` of the brackets after it.
BRACKETS: tuple[tuple[str, ...], ...] = (
    ("minKey",),
    ("null",),
    ("int", "long", "double", "decimal"),
    ("symbol", "string"),
    ("object",),
    ("array",),
    ("binData",),
    ("objectId",),
    ("bool",),
    ("date",),
    ("timestamp",),
    ("regex",),
    ("maxKey",),
)


def bracket_of(value: Any) -> int | None:
    """The index in BRACKETS of a decoded BSON value, None for a type this does not know."""
    kinds: tuple[tuple[type | tuple[type, ...], int], ...] = (
        (MinKey, 0),
        (type(None), 1),
        (bool, 8),  # before int: bool is an int in Python
        ((int, float, Int64, Decimal128), 2),
        (str, 3),
        (Mapping, 4),
        (list, 5),
        ((Binary, bytes, uuid.UUID), 6),
        (ObjectId, 7),
        (dt.datetime, 9),
        (Timestamp, 10),
        ((Regex, re.Pattern), 11),
        (MaxKey, 12),
    )
    for kind, index in kinds:
        if isinstance(value, kind):
            return index
    return None


class Sweep:
    """One collection's position in the current pass: where the next page starts.

    Pages are read in _id order with `_id > last`, so a document updated meanwhile is neither
    skipped nor read twice within a pass, and documents whose events are still in flight do not
    starve the others (the next page starts after them).
    """

    def __init__(self, collection: str, *, embedded: bool) -> None:
        self.collection = collection
        self.embedded = embedded
        self.passes = 0
        self._after: Any = None
        self._started = False
        self._types: tuple[str, ...] | None = None

    @property
    def at_start(self) -> bool:
        return not self._started

    def restart(self) -> None:
        self._after, self._started, self._types = None, False, None

    def id_filter(self) -> dict[str, Any]:
        """The condition on _id of the next page."""
        if self._types is not None:
            return {"_id": {"$type": list(self._types)}}
        if self._started:
            return {"_id": {"$gt": self._after}}
        return {}

    def advance(self, last_id: Any, *, more: bool) -> bool:
        """After a page: `last_id` is the _id of the last document handled, `more` whether the
        page was full (or cut short) so documents may follow. Returns True when the pass is
        complete."""
        if more:
            self._after, self._started, self._types = last_id, True, None
            return False
        if self._started and self._types is None:
            bracket = bracket_of(self._after)
            later = tuple(t for b in BRACKETS[(bracket or len(BRACKETS)) + 1 :] for t in b)
            if bracket is not None and later:
                self._types = later
                return False
        self.passes += 1
        self.restart()
        return True
