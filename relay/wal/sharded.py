"""WAL relays over a sharded outbox (`outbox relay --source postgres-wal --shards`): each leases
shard groups (relay/wal/groups.py) as the polling relays lease shards (relay/shards.py), and
streams the slot of every group it holds.

A run of the relay claims up to its aim of the groups on one session (the run's leases), then
streams each held group with a core of its own (relay/core/loop.py: a WalRelaySource on the
group's slot, a Kafka producer), one thread per group; the run's thread checks the leases every
eighth of the lease. The run ends when the daemon stops, when the groups should be spread
again, or when a group's core fails (the others then stop too and the error goes to the
supervisor, which restarts the relay): every core drains (Kafka's answers, the rows deleted,
the slot confirmed), its replication session closes, and only then does the session holding
the leases close. So a group's next owner finds its slot free, confirmed up to what was
published, and streams on from there: nothing is replayed from scratch. Were a slot still in
use (the old owner's session not yet gone), the new owner waits for it as a WAL standby does.
A slot is streamed by one session at a time (PostgreSQL's rule), so a group is never published
by two relays at once, whatever the leases say.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from outbox.conninfo import libpq_url, redact
from relay.core.loop import RelayCore
from relay.errors import SourceUnavailableError
from relay.shard_metrics import shard_probe
from relay.shards import CHECKS_PER_LEASE, RelayMembership, ShardLeases
from relay.sinks.kafka.sink import PublisherConfig, kafka_sink
from relay.sinks.kafka.topic_limits import TopicLimits
from relay.stats import RelayStats
from relay.wal.groups import group_key
from relay.wal.relay import WalRelayConfig, WalRelaySource

log = logging.getLogger(__name__)


class ShardedWalRelay:
    """The daemon's relay (relay/daemon.py `Relay`) for `--source postgres-wal --shards`: runs,
    each streaming the groups it claimed, one after another until the daemon stops."""

    def __init__(
        self, config: WalRelayConfig, publisher_config: PublisherConfig, stats: RelayStats,
        topic_limits: TopicLimits | None = None,
    ) -> None:
        assert config.groups is not None  # found at start-up (check_setup)
        self.config = config
        self.publisher_config = publisher_config
        self.stats = stats
        self.topic_limits = topic_limits
        self.key = group_key(config.names)
        self.held: tuple[int, ...] = ()
        stats.gauges["shards_held"] = lambda: len(self.held)  # groups, for a WAL relay
        stats.labelled["shards"] = shard_probe(config.db_url, config.names, self.key,
                                               lambda: self.held, groups=config.groups,
                                               slot=config.source.slot)

    def run(self, stop: threading.Event) -> None:
        config = self.config
        membership = RelayMembership(config.db_url, config.names, self.key, config.shard_lease)
        previous: tuple[int, ...] = ()
        try:
            while not stop.is_set():
                run_end = threading.Event()
                # The groups of the run before first: a rebalance moves only what must move.
                leases = ShardLeases(config.names, self.key, config.groups or 0,
                                     config.shard_lease, config.shutdown_timeout, membership,
                                     run_end.set, previous)
                self._run(leases, stop, run_end)
                previous = leases.held
        finally:
            self.held = ()
            membership.close()

    def _run(self, leases: ShardLeases, stop: threading.Event, run_end: threading.Event) -> None:
        try:
            conn = psycopg.connect(libpq_url(self.config.db_url), autocommit=True,
                                   connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc
        with conn:  # the session holding the run's leases: closed last
            try:
                if not leases.claim(conn, stop):
                    return
            except psycopg.OperationalError as exc:
                raise SourceUnavailableError(f"lost PostgreSQL: {redact(str(exc))}") from exc
            self.held = leases.held
            failures: list[BaseException] = []
            threads = [threading.Thread(
                target=self._stream, args=(group, run_end, failures),
                name=f"outbox-wal-group-{group}", daemon=True) for group in leases.held]
            for thread in threads:
                thread.start()
            try:
                self._watch(conn, leases, stop, run_end)
            finally:
                run_end.set()
                for thread in threads:
                    thread.join()
                self.held = ()
            if failures:
                raise failures[0]

    def _watch(
        self, conn: psycopg.Connection[Any], leases: ShardLeases, stop: threading.Event,
        run_end: threading.Event,
    ) -> None:
        """Until the run ends: the daemon's stop ends it, and the leases are checked (their
        session touched) often enough for their check every quarter of the lease."""
        try:
            while not run_end.wait(leases.lease / (2 * CHECKS_PER_LEASE)):
                if stop.is_set():
                    return
                leases.check(conn, may_end=True)
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(
                f"lost PostgreSQL (shard group leases): {redact(str(exc))}") from exc

    def _stream(self, group: int, run_end: threading.Event, failures: list[BaseException]) -> None:
        """One group's core until the run ends; its error ends the run."""
        try:
            source = WalRelaySource(self.config.group(group), self.stats)
            sink = kafka_sink(self.publisher_config, self.stats, self.topic_limits)
            RelayCore(source, sink, self.stats).run(run_end)
        except BaseException as exc:
            log.info("a shard group's stream failed: the relay's run ends", extra={
                "event": "shard_group_failed", "group": group, "error": redact(str(exc))})
            failures.append(exc)
            run_end.set()
