"""Translation of psycopg errors met by the WAL source into the project's exception tree."""

from __future__ import annotations

import psycopg

from outbox.conninfo import redact
from relay.wal.errors import (
    PublicationMissingError,
    ReplicationConnectionError,
    ReplicationPermissionError,
    SlotInUseError,
    SlotInvalidatedError,
    SlotMissingError,
    WalError,
)

_PERMISSION_HINT = (
    "The role needs LOGIN and REPLICATION (slots, streaming), a pg_hba.conf line allowing "
    "replication connections to this database, and for setup CREATE on the database plus "
    "ownership of the outbox table (publication)"
)


def translate(
    exc: psycopg.Error, action: str, slot: str | None = None, publication: str | None = None
) -> WalError:
    """The WalError to raise (from `exc`) for a driver error met while doing `action`."""
    detail = redact(str(exc).strip()) or type(exc).__name__
    message = f"{action} failed: {detail}"
    state = exc.sqlstate or ""
    # Errors while connecting come without a SQLSTATE: recognise the server's messages.
    refused = "superuser or replication role" in detail or (
        "pg_hba.conf" in detail and "replication" in detail
    )
    if state == "42501" or state.startswith("28") or refused:
        return ReplicationPermissionError(f"{message}. {_PERMISSION_HINT}")
    if state == "55006" or isinstance(exc, psycopg.errors.ObjectInUse):
        return SlotInUseError(
            f"{message}. Another process streams from replication slot {slot!r}; this relay "
            "waits as a standby and retries"
        )
    if state == "55000" and "invalidated" in detail:
        return SlotInvalidatedError(
            f"{message}. The slot lost WAL it needed (max_slot_wal_keep_size): recover the "
            "events committed after its confirmed position, then drop and re-create the slot"
        )
    if state == "42704":
        if publication is not None and "publication" in detail:
            return PublicationMissingError(
                f"{message}. Create publication {publication!r} in the relay's setup step"
            )
        if slot is not None and "slot" in detail:
            return SlotMissingError(
                f"{message}. Create the slot in the relay's setup step; if it existed before, "
                "recover the events committed after its last confirmed position first"
            )
    # Class 08 (connection), 57 (shutdown, cancel), 53 (resources), no SQLSTATE at all (socket
    # errors): the server or the network went away; reconnecting later may succeed.
    if not state or state[:2] in ("08", "57", "53", "58", "XX") or isinstance(
        exc, psycopg.OperationalError
    ):
        return ReplicationConnectionError(message)
    return WalError(message)
