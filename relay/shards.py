"""Several relays over one sharded outbox (`outbox migrate up --shards N`, `outbox relay
--shards`): which relay publishes which shards, and when shards move. The polling relays lease
shards (relay/poll/relay.py); the WAL relays lease shard groups, each a publication and a slot
(relay/wal/sharded.py), under a lock key of their own. The same rules hold for both; "shard"
below is a group for the WAL relays.

PostgreSQL does the coordination, with session advisory locks of the outbox's table key:

- **a shard's lease** is the lock (table key, shard), taken by a relay on the connection that
  reads and deletes the shard's rows. The lock lives exactly as long as that session: a shard is
  never read by two relays at once, and a new owner starts only once the old owner's session
  has ended. A relay gives its shards up only at the end of a run, after the core's drain.
- **liveness** is the lock (table key, -backend pid) each running relay holds on a membership
  connection of its own (kept across runs, so a rebalancing relay is not counted out); the live
  relays are counted in pg_locks. Nothing is written: no heartbeat table to clean up.
- **the lease bound**: the sessions are set to end when idle for longer than the lease
  (`idle_session_timeout`; the one holding shards the lease plus the shutdown timeout, the
  longest a drain waits for Kafka with it idle), and a relay touches them every quarter of the
  lease. A relay that dies releases its locks at once (the server sees the connection close);
  one that hangs or is cut off loses them after the lease and the shutdown timeout. The others
  look every quarter of the lease (at their next read, within a poll interval of it).
- **spreading**: each relay aims at ceil(N / live) shards. One that holds more, or fewer while
  a shard is free, ends its run (drain, apply, release everything) and claims again up to its
  aim: its previous shards first (only the surplus moves), then free ones from a place of its
  own (its pid), so relays do not all try the same shard. One that gets none is a standby.

Per-key order holds because a key is in one shard (the hash of its aggregate_id) and a shard has
one owner at a time that publishes its rows in position order.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox import migrate
from outbox.conninfo import libpq_url, redact
from outbox.errors import ConfigurationError
from outbox.names import SchemaNames
from relay import queries
from relay.errors import FatalRelayError, SourceUnavailableError

log = logging.getLogger(__name__)

# The relays look at the shards' owners this many times per lease.
CHECKS_PER_LEASE = 4


# -- decisions without I/O --------------------------------------------------------------------


def aim(shards: int, live: int) -> int:
    """How many shards one of `live` relays holds at most."""
    return math.ceil(shards / max(live, 1))


@dataclass(frozen=True)
class Survey:
    """The advisory locks of one outbox: each shard's owner (a backend pid), the live relays."""

    owners: Mapping[int, int]  # shard -> pid of the session holding its lease
    relays: int  # membership locks: relays running on this outbox

    def free(self, shards: int) -> list[int]:
        return [shard for shard in range(shards) if shard not in self.owners]


def survey_of(rows: Sequence[tuple[Any, ...]]) -> Survey:
    """A Survey from the `shard_locks` rows (second key as an unsigned oid, pid, ...)."""
    owners: dict[int, int] = {}
    relays = 0
    for objid, pid, *_ in rows:
        if int(objid) >= 2**31:  # a negative second key: a relay's membership
            relays += 1
        else:
            owners[int(objid)] = int(pid)
    return Survey(owners, relays)


def to_claim(
    survey: Survey, shards: int, start: int, prefer: Collection[int] = ()
) -> list[int]:
    """Free shards in the order to try them: those in `prefer` (the relay's previous run's, so
    that a rebalance moves only what must move), then from `start` on (spreads the claims of
    relays starting together)."""
    free = survey.free(shards)
    free.sort(key=lambda shard: (shard not in prefer, (shard - start) % shards))
    return free


def why_rebalance(survey: Survey, shards: int, held: int) -> str | None:
    """Why a relay holding `held` shards should give them up and claim again (None: stay)."""
    target = aim(shards, survey.relays)
    if held > target:
        return f"{survey.relays} relays share {shards} shards: at most {target} each, {held} held"
    free = len(survey.free(shards))
    if held < target and free:
        return f"{free} shard(s) without an owner, {held} held of {target}"
    return None


def lock_parts(key: int) -> int:
    """The classid under which pg_locks shows the first int4 key of a two-key lock."""
    return key & 0xFFFF_FFFF


# -- sessions ---------------------------------------------------------------------------------


def shard_count(conn: psycopg.Connection[Any], names: SchemaNames) -> int | None:
    """How many shards the outbox has (None: not sharded), as a relay reads it at start-up. A
    role granted its rights before the outbox was sharded may not read the shards table yet:
    that is named, with the fix, instead of a bare "permission denied"."""
    try:
        return migrate.shard_count(conn, names)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise FatalRelayError(
            f"role {conn.info.user} may not read {names.schema}.{names.shards_table}, where a "
            "sharded outbox keeps its shard count: run deploy/roles.sql again after sharding "
            "(it grants the relay roles SELECT on it)") from exc


def touch(conn: psycopg.Connection[Any], names: SchemaNames) -> None:
    """A statement on a lease's session: the server's idle timer starts again."""
    conn.execute(queries.query("shards.sql", "touch", names))


def lease_setting(lease: float) -> str:
    """idle_session_timeout for a lease, in milliseconds."""
    return str(max(1, round(lease * 1000)))


def read_survey(conn: psycopg.Connection[Any], names: SchemaNames, key: int) -> Survey:
    """The shards' owners and the relays running on the outbox of table key `key`, now."""
    return survey_of(read_locks(conn, names, key))


def read_locks(
    conn: psycopg.Connection[Any], names: SchemaNames, key: int
) -> list[tuple[Any, ...]]:
    """The `shard_locks` rows: (second key, pid, client address, application name)."""
    return conn.execute(queries.query("shards.sql", "shard_locks", names),
                        {"classid": lock_parts(key)}).fetchall()


def refuse_running_relays(conn: psycopg.Connection[Any], names: SchemaNames, key: int) -> None:
    """Raise while a relay of the outbox runs (or holds a shard): `outbox shards resize`."""
    survey = read_survey(conn, names, key)
    running = max(survey.relays, len(set(survey.owners.values())))
    if running:
        raise ConfigurationError(
            f"{running} relay(s) of {names.schema}.{names.table} are running: stop every relay "
            "of the outbox first (SIGTERM: each drains), resize, then start them again")


class RelayMembership:
    """This relay's membership of the outbox's relays: a session holding (table key, -pid)
    while the daemon runs; it reads the owners of the shards (`survey`)."""

    def __init__(self, db_url: str, names: SchemaNames, key: int, lease: float) -> None:
        self._url = db_url
        self._names = names
        self._key = key
        self._lease = lease
        self._conn: psycopg.Connection[Any] | None = None
        self.pid = 0  # of the membership session: a relay's place among the shards

    def survey(self) -> Survey:
        """The shards' owners and the live relays now (joining first, if not yet a member)."""
        try:
            return read_survey(self._joined(), self._names, self._key)
        except psycopg.OperationalError as exc:
            self.close()
            raise SourceUnavailableError(
                f"lost PostgreSQL (relay membership): {redact(str(exc))}") from exc

    def _joined(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = psycopg.connect(libpq_url(self._url), autocommit=True, connect_timeout=10)
        conn.execute(queries.query("shards.sql", "lease", self._names),
                     {"lease": lease_setting(self._lease)})
        conn.execute(queries.query("shards.sql", "join_relays", self._names), {"key": self._key})
        self._conn, self.pid = conn, conn.info.backend_pid
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ShardLeases:
    """The shards one run of a sharded relay holds: claimed on the connection that reads them
    (`claim`), checked every quarter of the lease (`check`), released with that connection."""

    def __init__(
        self, names: SchemaNames, key: int, shards: int, lease: float, drain: float,
        membership: RelayMembership, end_run: Callable[[], None],
        prefer: Collection[int] = (),
    ) -> None:
        self.names = names
        self.key = key
        self.shards = shards
        self.lease = lease
        # The session holding the shards idles during the run's drain (the core waits for
        # Kafka's answers, up to the shutdown timeout): it may stay idle that much longer, so
        # that a slow drain keeps its shards until it is over.
        self.drain = drain
        self.membership = membership
        self.held: tuple[int, ...] = ()
        self._end_run = end_run
        self._prefer = prefer
        self._check_every = lease / CHECKS_PER_LEASE
        self._next_check = 0.0

    def _query(self, name: str) -> Any:
        return queries.query("shards.sql", name, self.names)

    def claim(self, conn: psycopg.Connection[Any], stop: threading.Event) -> bool:
        """Wait as a standby until this relay holds shards: up to its aim of the free ones.
        True once it holds some, False if stopped first."""
        conn.execute(self._query("lease"), {"lease": lease_setting(self.lease + self.drain)})
        announced = False
        while not stop.is_set():
            survey = self.membership.survey()
            start = self.membership.pid % self.shards
            target, held = aim(self.shards, survey.relays), list[int]()
            for shard in to_claim(survey, self.shards, start, self._prefer):
                if len(held) == target:
                    break
                row = conn.execute(self._query("try_shard"),
                                   {"key": self.key, "shard": shard}).fetchone()
                if row == (True,):
                    held.append(shard)
            if held:
                self.held = tuple(sorted(held))
                self._next_check = time.monotonic() + self._check_every
                log.info("relay holds shards", extra={
                    "event": "shards_claimed", "shards": list(self.held),
                    "relays": survey.relays, "shard_count": self.shards})
                return True
            if not announced:
                log.info("other relays hold every shard this relay may take; waiting as standby",
                         extra={"event": "relay_standby", "relays": survey.relays})
                announced = True
            touch(conn, self.names)  # a standby's session lives on too
            stop.wait(self._check_every)
        return False

    def check(self, conn: psycopg.Connection[Any], *, may_end: bool) -> bool:
        """Every quarter of the lease: touch the session, check the leases are still its own,
        and (`may_end`) end the run when the shards should be spread again (True then)."""
        if time.monotonic() < self._next_check:
            return False
        self._next_check = time.monotonic() + self._check_every
        touch(conn, self.names)
        survey = self.membership.survey()
        mine = conn.info.backend_pid
        lost = [shard for shard in self.held if survey.owners.get(shard) != mine]
        if lost:  # the server ended the session's locks: never read those shards again
            raise SourceUnavailableError(f"lost the lease of shard(s) {lost}")
        reason = why_rebalance(survey, self.shards, len(self.held))
        if reason is None or not may_end:
            return False
        log.info("giving shards up to spread them again", extra={
            "event": "shards_rebalance", "shards": list(self.held), "reason": reason})
        self._end_run()
        return True


class RunStop(threading.Event):
    """The stop of one run of a sharded relay: the daemon's stop, or the run's own end, set by
    its source (on the run's thread) to give its shards up after the core's drain."""

    def __init__(self, daemon_stop: threading.Event) -> None:
        super().__init__()
        self._daemon_stop = daemon_stop

    def is_set(self) -> bool:
        return self._daemon_stop.is_set() or super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        # Only this run's thread sets the run's own end, never while it waits here.
        if super().is_set():
            return True
        return self._daemon_stop.wait(timeout) or super().is_set()
