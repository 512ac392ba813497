"""`outbox status`: the outbox's state now (backlog, parked events, leader, slot), read-only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from outbox.names import SchemaNames
from relay import queries
from relay.wal import slots
from relay.wal.groups import find_groups, group_key, group_name
from relay.wal.lsn import format_lsn, parse_lsn


@dataclass(frozen=True)
class TableAccess:
    """A table of the outbox schema and what the connecting role may do with it."""

    name: str
    exists: bool
    select: bool = False
    insert: bool = False
    update: bool = False
    delete: bool = False
    owned: bool = False  # the role owns it (or is a member of its owner): it may drop it


@dataclass(frozen=True)
class Backlog:
    pending: int
    oldest_age_seconds: float | None


@dataclass(frozen=True)
class ParkedSummary:
    count: int
    oldest: dt.datetime | None


@dataclass(frozen=True)
class Leader:
    """The session that holds the polling relay's advisory lock."""

    pid: int
    since: dt.datetime | None  # None when the role may not see other roles' sessions
    client: str | None
    application: str | None


@dataclass(frozen=True)
class ShardReport:
    """One shard of a sharded outbox: the session holding its lease, its backlog."""

    shard: int
    owner_pid: int | None
    owner_client: str | None
    pending: int
    oldest_age_seconds: float | None


@dataclass(frozen=True)
class Shards:
    relays: int  # relays running on the outbox (their membership locks)
    shards: tuple[ShardReport, ...]


@dataclass(frozen=True)
class SlotReport:
    name: str
    status: slots.SlotStatus | None  # None: there is no such slot
    current_lsn: int | None
    wal_budget: int | None = None  # the relay's --max-slot-wal, when given

    @property
    def over_budget(self) -> bool | None:
        """Whether the slot retains more WAL than the budget (None: no budget, or unknown)."""
        retained = self.status.retained_bytes if self.status is not None else None
        if self.wal_budget is None or retained is None:
            return None
        return retained > self.wal_budget

    @property
    def lag_bytes(self) -> int | None:
        """WAL written since the relay's last confirmed position."""
        return slot_lag(self.status, self.current_lsn)


@dataclass(frozen=True)
class PublicationReport:
    name: str
    info: slots.PublicationInfo | None
    table: tuple[str, str]

    @property
    def covers_table(self) -> bool:
        return self.info is not None and self.info.covers(self.table)


@dataclass(frozen=True)
class KafkaReport:
    bootstrap: str
    brokers: int = 0
    cluster_id: str | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class OutboxStatus:
    database: str
    schema: str
    table: str
    backlog: Backlog | None = None
    last_published: dt.datetime | None = None
    parked: ParkedSummary | None = None
    leader: Leader | None = None
    shards: Shards | None = None  # a sharded outbox (`outbox migrate up --shards N`)
    slot: SlotReport | None = None
    # WAL relays over shard groups (`outbox slot create --shard-groups G`): each group's slot.
    groups: tuple[SlotReport, ...] = ()
    publication: PublicationReport | None = None
    kafka: KafkaReport | None = None
    # Why a section above is missing (no table, no privilege), by section name.
    unavailable: Mapping[str, str] = field(default_factory=dict)


# -- decisions without I/O --------------------------------------------------------------------


def leader_lock_parts(key: int) -> tuple[int, int]:
    """(classid, objid) under which pg_locks shows `pg_try_advisory_lock(key)` (a bigint)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def slot_lag(status: slots.SlotStatus | None, current_lsn: int | None) -> int | None:
    if status is None or status.confirmed_flush_lsn is None or current_lsn is None:
        return None
    return max(0, current_lsn - status.confirmed_flush_lsn)


def table_access(rows: Sequence[tuple[Any, ...]]) -> dict[str, TableAccess]:
    return {str(row[0]): TableAccess(str(row[0]), *map(bool, row[1:])) for row in rows}


def why_unreadable(access: TableAccess | None, schema: str, role: str) -> str | None:
    """None when `access` allows reading the table, else the reason, with the fix."""
    if access is None or not access.exists:
        name = access.name if access else "?"
        return f"table {schema}.{name} does not exist: run `outbox migrate up`"
    if not access.select:
        return f"role {role} may not read {schema}.{access.name}"
    return None


# -- gathering (I/O) --------------------------------------------------------------------------


def _query(names: SchemaNames, name: str) -> Any:
    return queries.query("ops.sql", name, names)


def read_tables(
    conn: psycopg.Connection[Any], names: SchemaNames, extra: Sequence[str] = ()
) -> dict[str, TableAccess]:
    tables = [names.table, names.parked_table, *extra]
    rows = conn.execute(
        _query(names, "tables"), {"tables": tables, "schema": names.schema}
    ).fetchall()
    return table_access(rows)


def gather(
    conn: psycopg.Connection[Any],
    names: SchemaNames,
    *,
    leader_key: int,
    slot: str,
    publication: str,
    wal_budget: int | None = None,
) -> OutboxStatus:
    """Read the outbox's state with `conn` (autocommit); sections the role cannot read are
    listed in `unavailable` instead of failing the whole report."""
    role = str((conn.execute(_query(names, "current_role")).fetchone() or ("?",))[0])
    access = read_tables(conn, names, [names.shards_table])
    unavailable: dict[str, str] = {}
    backlog = last_published = parked = None

    reason = why_unreadable(access.get(names.table), names.schema, role)
    if reason is None:
        count, age = conn.execute(_query(names, "backlog")).fetchone() or (0, None)
        backlog = Backlog(int(count), float(age) if age is not None else None)
        row = conn.execute(_query(names, "last_published")).fetchone()
        last_published = row[0] if row else None
    else:
        unavailable["backlog"] = reason

    reason = why_unreadable(access.get(names.parked_table), names.schema, role)
    if reason is None:
        count, oldest = conn.execute(_query(names, "parked")).fetchone() or (0, None)
        parked = ParkedSummary(int(count), oldest)
    else:
        unavailable["parked"] = reason

    leader = read_leader(conn, names, leader_key)
    groups = find_groups(conn, publication)
    shards = None
    if access.get(names.shards_table, TableAccess("", False)).exists:
        reason = why_unreadable(access.get(names.shards_table), names.schema, role) or (
            why_unreadable(access.get(names.table), names.schema, role))
        if reason is None:
            shards = read_shards(conn, names, leader_key, groups)
        else:
            unavailable["shards"] = reason
    current = current_wal_lsn(conn, names)
    slot_report: SlotReport | None = SlotReport(slot, slots.slot_status(conn, slot), current,
                                                wal_budget)
    group_reports = read_groups(conn, names, slot, groups, wal_budget, current)
    if group_reports and slot_report is not None and slot_report.status is None:
        slot_report = None  # the groups' slots are the relays' own
    publication_report = PublicationReport(
        publication, slots.publication_info(conn, publication), (names.schema, names.table)
    )
    return OutboxStatus(
        database=describe_connection(conn),
        schema=names.schema,
        table=names.table,
        backlog=backlog,
        last_published=last_published,
        parked=parked,
        leader=leader,
        shards=shards,
        slot=slot_report,
        groups=group_reports,
        publication=publication_report,
        unavailable=unavailable,
    )


def describe_connection(conn: psycopg.Connection[Any]) -> str:
    """`dbname on host:port as user`: where a report comes from, never with the password."""
    info = conn.info
    return f"{info.dbname} on {info.host}:{info.port} as {info.user}"


def read_leader(conn: psycopg.Connection[Any], names: SchemaNames, key: int) -> Leader | None:
    classid, objid = leader_lock_parts(key)
    row = conn.execute(_query(names, "leader"), {"classid": classid, "objid": objid}).fetchone()
    return Leader(int(row[0]), row[1], row[2], row[3]) if row else None


def read_shards(
    conn: psycopg.Connection[Any], names: SchemaNames, key: int, groups: int = 0
) -> Shards:
    """Each shard's owner (its lease lock, relay/shards.py) and backlog. With WAL shard groups
    (`groups`), a shard's owner is the holder of its group's lease (relay/wal/groups.py)."""
    from relay.shards import read_locks, survey_of

    locks = read_locks(conn, names, group_key(names) if groups else key)
    survey = survey_of(locks)
    clients = {int(row[1]): row[2] for row in locks}
    reports = []
    for shard, pending, age in conn.execute(_query(names, "shard_backlog")).fetchall():
        owner = survey.owners.get(int(shard) % groups if groups else int(shard))
        reports.append(ShardReport(int(shard), owner, clients.get(owner) if owner else None,
                                   int(pending), float(age) if age is not None else None))
    return Shards(survey.relays, tuple(reports))


def read_groups(
    conn: psycopg.Connection[Any], names: SchemaNames, slot: str, groups: int,
    wal_budget: int | None = None, current: int | None = None,
) -> tuple[SlotReport, ...]:
    """Each WAL shard group's slot (`outbox slot create --shard-groups G`), in group order;
    `current`: the server's WAL position, read here when not given."""
    if not groups:
        return ()
    if current is None:
        current = current_wal_lsn(conn, names)
    return tuple(SlotReport(name, slots.slot_status(conn, name), current, wal_budget)
                 for name in (group_name(slot, group) for group in range(groups)))


def current_wal_lsn(conn: psycopg.Connection[Any], names: SchemaNames) -> int | None:
    try:
        row = conn.execute(_query(names, "wal_position")).fetchone()
    except psycopg.errors.ObjectNotInPrerequisiteState:
        return None  # a standby server during recovery has no current WAL position to write
    return parse_lsn(row[0]) if row else None


# -- rendering --------------------------------------------------------------------------------


def human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(moment: dt.datetime, now: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S%z} ({human_age((now - moment).total_seconds())} ago)"


def rows(status: OutboxStatus, now: dt.datetime | None = None) -> list[tuple[str, str]]:
    """The report as (label, value) lines."""
    now = now or dt.datetime.now(dt.UTC)
    out: list[tuple[str, str]] = [
        ("database", status.database),
        ("outbox table", f"{status.schema}.{status.table}"),
    ]
    gone = status.unavailable
    if status.backlog is not None:
        out.append(("backlog", f"{status.backlog.pending} unpublished event(s)"))
        age = status.backlog.oldest_age_seconds
        out.append(("oldest pending", f"{human_age(age)} old" if age is not None else "-"))
        kept = status.last_published
        out.append(("last published", _when(kept, now) if kept
                    else "- (no published row kept: see --keep-published)"))
    else:
        out.append(("backlog", f"unavailable: {gone.get('backlog', '?')}"))
    if status.parked is not None:
        parked = f"{status.parked.count} event(s)"
        if status.parked.oldest is not None:
            parked += f", oldest parked {_when(status.parked.oldest, now)}"
        out.append(("parked", parked + (" -> `outbox parked list`" if status.parked.count else "")))
    else:
        out.append(("parked", f"unavailable: {gone.get('parked', '?')}"))
    if status.leader is not None:
        leader = f"pid {status.leader.pid}"
        if status.leader.client:
            leader += f" from {status.leader.client}"
        if status.leader.since:
            leader += f", connected {_when(status.leader.since, now)}"
        out.append(("polling relay", f"active: {leader}"))
    elif status.shards is not None:
        out += _shard_rows(status.shards)
    else:
        out.append(("polling relay", "none holds the leader lock"))
    if "shards" in gone:
        out.append(("shards", f"unavailable: {gone['shards']}"))
    if status.slot is not None:
        out += _slot_rows(status.slot)
    for group, report in enumerate(status.groups):
        out.append((f"shard group {group}", _group_row(report)))
    if status.publication is not None:
        pub = status.publication
        if pub.info is None:
            text = f"{pub.name}: does not exist"
        else:
            covers = "covers" if pub.covers_table else "does NOT cover"
            text = f"{pub.name}: {covers} inserts into {pub.table[0]}.{pub.table[1]}"
        out.append(("publication", text))
    if status.kafka is not None:
        kafka = status.kafka
        if kafka.reachable:
            text = f"{kafka.bootstrap}: reachable, {kafka.brokers} broker(s)"
            if kafka.cluster_id:
                text += f", cluster {kafka.cluster_id}"
        else:
            text = f"{kafka.bootstrap}: UNREACHABLE ({kafka.error})"
        out.append(("kafka", text))
    return out


def _shard_rows(shards: Shards) -> list[tuple[str, str]]:
    owned = sum(report.owner_pid is not None for report in shards.shards)
    out = [("shards", f"{len(shards.shards)}, {owned} owned, {shards.relays} relay(s) running")]
    for report in shards.shards:
        owner = "no owner" if report.owner_pid is None else f"pid {report.owner_pid}" + (
            f" from {report.owner_client}" if report.owner_client else "")
        backlog = f"backlog {report.pending}"
        if report.oldest_age_seconds is not None:
            backlog += f", oldest {human_age(report.oldest_age_seconds)} old"
        out.append((f"shard {report.shard}", f"{owner}, {backlog}"))
    return out


def _group_row(report: SlotReport) -> str:
    """A shard group's slot on one line: its state, confirmed position, lag."""
    status = report.status
    if status is None:
        return f"slot {report.name}: does not exist"
    state = f"active (pid {status.active_pid})" if status.active else "inactive"
    confirmed = status.confirmed_flush_lsn
    lag = report.lag_bytes
    return (f"slot {report.name}: {state}, confirmed "
            f"{format_lsn(confirmed) if confirmed is not None else '-'}, lag "
            f"{human_bytes(lag) if lag is not None else '-'}")


def _slot_rows(report: SlotReport) -> list[tuple[str, str]]:
    status = report.status
    if status is None:
        return [("replication slot", f"{report.name}: does not exist")]
    state = f"active (pid {status.active_pid})" if status.active else "inactive"
    out = [("replication slot", f"{report.name}: {state}, wal_status {status.wal_status or '-'}")]
    confirmed = status.confirmed_flush_lsn
    out.append(("confirmed flush LSN", format_lsn(confirmed) if confirmed is not None else "-"))
    lag = report.lag_bytes
    out.append(("slot lag", human_bytes(lag) if lag is not None else "-"))
    if status.retained_bytes is not None:
        retained = human_bytes(status.retained_bytes)
        if report.wal_budget is not None:
            verdict = "OVER BUDGET" if report.over_budget else "within budget"
            retained += f" of {human_bytes(report.wal_budget)} (--max-slot-wal): {verdict}"
        out.append(("retained WAL", retained))
    if status.safe_wal_size is not None:
        out.append(("WAL before invalidation", human_bytes(status.safe_wal_size)))
    return out


def render(status: OutboxStatus, now: dt.datetime | None = None) -> str:
    lines = rows(status, now)
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in lines)


def as_json(status: OutboxStatus) -> dict[str, Any]:
    """The report for machines: plain JSON types, LSNs as PostgreSQL prints them."""
    slot = _slot_json(status.slot) if status.slot is not None else None
    publication: dict[str, Any] | None = None
    if status.publication is not None:
        publication = {
            "name": status.publication.name,
            "exists": status.publication.info is not None,
            "covers_table": status.publication.covers_table,
        }
    leader = asdict(status.leader) if status.leader else None
    if leader is not None and leader["since"] is not None:
        leader["since"] = leader["since"].isoformat()
    return {
        "database": status.database,
        "schema": status.schema,
        "table": status.table,
        "backlog": status.backlog.pending if status.backlog else None,
        "oldest_pending_age_seconds": status.backlog.oldest_age_seconds
        if status.backlog else None,
        "last_published_at": status.last_published.isoformat()
        if status.last_published else None,
        "parked": status.parked.count if status.parked else None,
        "oldest_parked_at": status.parked.oldest.isoformat()
        if status.parked and status.parked.oldest else None,
        "leader": leader,
        "shards": {"relays": status.shards.relays,
                   "shards": [asdict(report) for report in status.shards.shards]}
        if status.shards else None,
        "slot": slot,
        "shard_groups": [_slot_json(report) for report in status.groups],
        "publication": publication,
        "kafka": asdict(status.kafka) | {"reachable": status.kafka.reachable}
        if status.kafka else None,
        "unavailable": dict(status.unavailable),
    }


def _slot_json(report: SlotReport) -> dict[str, Any]:
    found = report.status
    return {
        "name": report.name,
        "exists": found is not None,
        "active": found.active if found else False,
        "active_pid": found.active_pid if found else None,
        "wal_status": found.wal_status if found else None,
        "confirmed_flush_lsn": format_lsn(found.confirmed_flush_lsn)
        if found and found.confirmed_flush_lsn is not None else None,
        "lag_bytes": report.lag_bytes,
        "retained_bytes": found.retained_bytes if found else None,
        "safe_wal_size": found.safe_wal_size if found else None,
        "wal_budget_bytes": report.wal_budget,
        "over_wal_budget": report.over_budget,
    }
