"""Per-aggregate sequence numbers of `Outbox(sequence=True)`: the counter statement, and how a
batch's numbers are spread over its events (no I/O).

Numbers come from one counter row per aggregate, bumped in the caller's transaction before the
events are inserted: the row lock serialises the writers of one aggregate until they commit, so
numbers have no gap over committed transactions, and (the outbox position being taken after the
lock) same-aggregate events get increasing positions in commit order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import sql

from outbox import statements
from outbox.errors import InvalidEventError
from outbox.record import OutboxRecord

# The Kafka header (and the key in the event's headers) that carries the number.
SEQUENCE_HEADER = "sequence"

AggregateKey = tuple[str, str]


@functools.cache
def next_sequences(schema: str, table: str, placeholder: statements.Placeholder) -> str:
    """Block next_sequences of writer.sql for the counter of `schema.table`."""
    return statements.writer_block(
        "next_sequences", schema, table,
        sequence_table=sql.Identifier(f"{table}_sequence"),
        types=placeholder("types", "text"),
        ids=placeholder("ids", "text"),
        counts=placeholder("counts", "bigint"),
    )


def counts(records: Sequence[OutboxRecord]) -> dict[AggregateKey, int]:
    """Events per aggregate, in a fixed (sorted) order: every writer locks counter rows in the
    same order, so two transactions numbering the same aggregates wait instead of deadlocking."""
    found: dict[AggregateKey, int] = {}
    for record in records:
        if SEQUENCE_HEADER in record.headers:
            raise InvalidEventError(
                f"{record.event_type} event {record.id} has its own {SEQUENCE_HEADER!r} header; "
                "with Outbox(sequence=True) the writer numbers events itself"
            )
        key = (record.aggregate_type, record.aggregate_id)
        found[key] = found.get(key, 0) + 1
    return dict(sorted(found.items()))


def parameters(batch: dict[AggregateKey, int]) -> dict[str, Any]:
    return {
        "types": [key[0] for key in batch],
        "ids": [key[1] for key in batch],
        "counts": list(batch.values()),
    }


def numbered(
    records: Sequence[OutboxRecord],
    batch: dict[AggregateKey, int],
    returned: Iterable[Sequence[Any]],
) -> list[OutboxRecord]:
    """`records` with their numbers in the `sequence` header, from the counter rows `returned`
    (aggregate_type, aggregate_id, last number): an aggregate's events of the batch take the
    numbers up to its last one, in the order given."""
    following: dict[AggregateKey, int] = {}
    for aggregate_type, aggregate_id, last in returned:
        key = (aggregate_type, aggregate_id)
        following[key] = int(last) - batch[key] + 1
    out = []
    for record in records:
        key = (record.aggregate_type, record.aggregate_id)
        number = following[key]
        following[key] = number + 1
        out.append(record._replace(headers={**record.headers, SEQUENCE_HEADER: str(number)}))
    return out
