"""Shard groups: the WAL relay over a sharded outbox (`outbox slot create --shard-groups G`).

A replication slot is streamed by one session at a time and decodes the whole database's WAL,
so a slot per shard would cost N decoders: the N shards are dealt into G groups instead, shard s
into group s % G (a group's shards spread over the hash range, and groups differ in size by one
shard at most). Group k has a publication `<publication>_g<k>` that publishes the inserts of its
shards only (a row filter on the `shard` column: PostgreSQL 15 evaluates it in the walsender,
so a group's slot never sends another group's rows; a filter on INSERT needs no replica
identity) and a slot `<slot>_g<k>`. The relays lease groups as the polling relays lease shards
(relay/shards.py), under a lock key of their own; a group that moves keeps its slot, and its new
owner streams on from the slot's confirmed position.

G is recorded by the publications that exist: the relay and `outbox slot status` find
`<publication>_g0` .. `_g<G-1>`. Here: the dealing, names and filters (no I/O), and the admin
steps that create, find and drop the groups.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from relay.wal.errors import PublicationMissingError

if TYPE_CHECKING:
    from relay.wal.source import WalSourceConfig

# What the row filter of a group's publication reads.
SHARD_COLUMN = "shard"


def group_key(names: SchemaNames) -> int:
    """Advisory lock key of the outbox's shard groups: another than the polling relays' (whose
    second keys are shards), so that a group's lease never reads as a shard's."""
    name = f"outbox-relay-wal-groups:{names.schema}.{names.table}".encode()
    return zlib.crc32(name) - 2**31


def group_name(name: str, group: int) -> str:
    """The slot or publication of group `group`: `<name>_g<group>`."""
    return f"{name}_g{group}"


def check_groups(groups: int, shards: int) -> None:
    """Refuse a group count the outbox's shards cannot fill."""
    if not 1 <= groups <= shards:
        raise ConfigurationError(
            f"--shard-groups {groups}: give 1 to {shards} (the outbox has {shards} shards; "
            "each group holds at least one)")


def group_shards(shards: int, groups: int, group: int) -> tuple[int, ...]:
    """The shards of group `group` of `groups`, over an outbox of `shards` shards."""
    return tuple(range(group, shards, groups))


def row_filter(shards: tuple[int, ...]) -> sql.Composed:
    """The publication's WHERE clause for these shards."""
    return sql.SQL("WHERE ({} IN ({}))").format(
        sql.Identifier(SHARD_COLUMN), sql.SQL(", ").join(map(sql.Literal, shards)))


def catalog_filter(shards: tuple[int, ...]) -> str:
    """The row filter as pg_publication_tables shows it once PostgreSQL normalised it: what a
    group's publication must have (after a resize of the outbox it no longer matches)."""
    if len(shards) == 1:
        return f"({SHARD_COLUMN} = {shards[0]})"
    return f"({SHARD_COLUMN} = ANY (ARRAY[{', '.join(map(str, shards))}]))"


def group_numbers(names: list[str], publication: str) -> set[int]:
    """The groups among these publication names."""
    pattern = re.compile(re.escape(publication) + r"_g(0|[1-9][0-9]*)")
    return {int(match.group(1)) for name in names if (match := pattern.fullmatch(name))}


def count_groups(names: list[str], publication: str) -> int:
    """G from the names of the publications that start with `<publication>_g` (0: none), or an
    error when some group is missing."""
    found = group_numbers(names, publication)
    if not found:
        return 0
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
        raise PublicationMissingError(
            f"publications of shard groups {', '.join(group_name(publication, g) for g in missing)}"
            f" are missing (found {len(found)} of {max(found) + 1}): drop the groups with "
            "`outbox slot drop --shard-groups` and create them again")
    return max(found) + 1


def find_groups(conn: psycopg.Connection[Any], publication: str) -> int:
    """The number of shard groups set up for `publication` (0: none)."""
    from relay.wal.slots import publications_named

    return count_groups(publications_named(conn, f"{publication}_g"), publication)


def group_config(
    config: WalSourceConfig, shards: int, groups: int, group: int
) -> WalSourceConfig:
    """What group `group` streams: its slot and publication, its row filter. No logical
    decoding messages: they bypass publications, so every group's slot would see each one."""
    if config.table is None:
        raise ConfigurationError("a sharded outbox is a table: --table-less has no shards")
    return dataclasses.replace(
        config, slot=group_name(config.slot, group),
        publication=group_name(config.publication, group), message_prefix=None,
        row_filter=catalog_filter(group_shards(shards, groups, group)))


def setup_groups(
    conn: psycopg.Connection[Any], config: WalSourceConfig, shards: int, groups: int
) -> list[int]:
    """Create every group's publication and slot (`outbox slot create --shard-groups G`);
    their consistent points. On an error, those created are dropped again."""
    from relay.wal.source import setup, teardown

    check_groups(groups, shards)
    done: list[WalSourceConfig] = []
    positions: list[int] = []
    try:
        for group in range(groups):
            mine = group_config(config, shards, groups, group)
            positions.append(setup(conn, mine, row_filter(group_shards(shards, groups, group))))
            done.append(mine)
    except BaseException:
        for created in done:
            teardown(conn, created)
        raise
    return positions


def teardown_groups(conn: psycopg.Connection[Any], config: WalSourceConfig) -> int:
    """Drop every group's slot and publication; how many groups there were."""
    from relay.wal.slots import publications_named
    from relay.wal.source import teardown

    found = group_numbers(publications_named(conn, f"{config.publication}_g"), config.publication)
    for group in sorted(found):
        teardown(conn, dataclasses.replace(
            config, slot=group_name(config.slot, group),
            publication=group_name(config.publication, group)))
    return len(found)
