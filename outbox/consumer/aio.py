"""`AsyncConsumer`: the idempotent consumer for asyncio applications (SQLAlchemy, psycopg or
pymongo), with `async def` handlers. Its decisions are in `engine` (a batch) and `schedule` (the
run loop); this module only carries them out.

The asyncio consumer is the one written by hand; the synchronous `Consumer`
(outbox.consumer.runner) is generated from this file by tools/async_to_sync.py
(`make sync-code`). What truly differs between the two (the stop event, signals, the thread that
calls Kafka) is in `waiting.py`, written there for both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Unpack

from outbox.consumer.aio_stores import AsyncInboxStore, AsyncInboxTransaction, async_store
from outbox.consumer.base import AsyncHandler, ConsumerBase, ConsumerStats
from outbox.consumer.commands import check as check_commands
from outbox.consumer.commands import check_async as check_commands_async
from outbox.consumer.config import ConsumerOptions
from outbox.consumer.engine import (
    BatchEngine,
    BatchReport,
    Begin,
    Claim,
    Commit,
    Handle,
    ReadSequences,
    Rollback,
    SaveSequences,
    Sleep,
)
from outbox.consumer.errors import ConsumerError
from outbox.consumer.kafka_io import KafkaGateway
from outbox.consumer.message import Received
from outbox.consumer.schedule import PurgeSchedule, RunLimits, dead_letter_delay
from outbox.consumer.sequencing import GapHolds
from outbox.consumer.tracing import process_span
from outbox.consumer.waiting import AsyncRunContext, AsyncStopEvent, wait_async
from outbox.errors import ConfigurationError

log = logging.getLogger("outbox.consumer")


class AsyncDriver:
    """Carries out the engine's steps against a store: the I/O of a batch, no decisions."""

    def __init__(
        self, store: AsyncInboxStore, consumer: ConsumerBase[AsyncHandler], stop: AsyncStopEvent
    ) -> None:
        self._store = store
        self._consumer = consumer
        self._stop = stop

    async def run(self, items: Sequence[Received], expired: frozenset[int] = frozenset(),
                  ) -> BatchReport:
        config = self._consumer.config
        handlers = self._consumer.handlers
        commands = self._consumer.commands
        steps = BatchEngine(items, config.retry, handlers.has,
                            is_transient=self._store.is_transient, consumer=config.name,
                            sequence=config.ordering == "sequence", expired=expired,
                            last_word=commands.has_failure_reply).run()
        tx: AsyncInboxTransaction | None = None
        reply: Any = None
        throw: BaseException | None = None
        try:
            while True:
                try:
                    step = steps.throw(throw) if throw is not None else steps.send(reply)
                except StopIteration as done:
                    report: BatchReport = done.value
                    return report
                reply, throw = None, None
                if isinstance(step, Handle):
                    assert tx is not None
                    handler = handlers.lookup(step.message)
                    assert handler is not None
                    try:
                        with process_span(step.message, config.name):
                            if step.exhausted is None:
                                await handler(tx.handle, step.message)
                            else:
                                await commands.failure_reply(
                                    tx.handle, step.message, step.exhausted)
                    except Exception as exc:
                        reply = exc
                elif isinstance(step, Begin):
                    try:
                        tx = await self._store.begin()
                    except Exception as exc:
                        throw = exc
                elif isinstance(step, Claim | ReadSequences | SaveSequences):
                    assert tx is not None
                    try:
                        reply = await _in_transaction(tx, step)
                    except Exception as exc:
                        throw = exc
                elif isinstance(step, Commit):
                    assert tx is not None
                    current, tx = tx, None
                    try:
                        await current.commit()
                    except Exception as exc:
                        throw = exc
                    else:
                        commands.committed(step.messages)
                        if config.on_commit is not None:
                            config.on_commit(step.messages)
                elif isinstance(step, Rollback):
                    if tx is not None:
                        await tx.rollback()
                        tx = None
                elif isinstance(step, Sleep):
                    reply = not await wait_async(self._stop, step.seconds)
        finally:
            if tx is not None:
                await tx.rollback()
            steps.close()


async def _in_transaction(
    tx: AsyncInboxTransaction, step: Claim | ReadSequences | SaveSequences
) -> Any:
    """The store call of a step made inside the open transaction; its reply."""
    if isinstance(step, Claim):
        return await tx.claim(step.ids)
    if isinstance(step, ReadSequences):
        return await tx.read_sequences(step.keys)
    await tx.save_sequences(dict(step.numbers))
    return None


class AsyncConsumer(ConsumerBase[AsyncHandler]):
    """Applies each event exactly once: dedup row and handler writes in one transaction, then
    the Kafka offset. Handlers are `async def handler(session_or_connection, message) -> None`.

    `db` is a SQLAlchemy AsyncEngine or async_sessionmaker (handlers get the AsyncSession), a
    psycopg_pool.AsyncConnectionPool, psycopg AsyncConnection or conninfo string (handlers get
    the AsyncConnection); or `mongo` is a pymongo AsyncDatabase (handlers get the
    AsyncClientSession). Other keyword arguments are those of `ConsumerConfig`.
    """

    def __init__(
        self,
        *,
        name: str,
        kafka: Mapping[str, Any],
        topics: Sequence[str],
        db: Any = None,
        mongo: Any = None,
        **options: Unpack[ConsumerOptions],
    ) -> None:
        super().__init__(name=name, kafka=kafka, topics=topics, **options)
        self._store = async_store(db, mongo, self.config)
        self.commands.database = mongo  # command handlers' replies go there on MongoDB
        self._purges = PurgeSchedule(self.config.purge_older_than, self.config.purge_every)
        self._context = AsyncRunContext()

    def _check_handler(self, function: Callable[..., Any]) -> None:
        super()._check_handler(function)
        AsyncRunContext.check_handler(function)

    def stop(self) -> None:
        """Ask `run()` to return once the current batch is done (a message waiting for its
        retry is left for redelivery). Safe from any thread or signal handler; a stop() before
        run() makes that run return at once."""
        self._context.stop()

    async def wait_stop(self, seconds: float) -> bool:
        """Wait up to `seconds` while running; True if the consumer is stopping."""
        return await self._context.wait(seconds)

    async def run(
        self, max_messages: int | None = None, timeout: float | None = None
    ) -> ConsumerStats:
        """Consume until `stop()`, SIGTERM/SIGINT, `max_messages` resolved messages or `timeout`
        seconds, whichever comes first; returns the counters of this run."""
        if self._running:
            raise ConsumerError("this consumer is already running")
        if self.handlers.empty():
            raise ConfigurationError("no handler is registered")
        if max_messages is not None and max_messages < 1:
            raise ConfigurationError(f"max_messages={max_messages} must be >= 1")
        self._running = True
        before = self._stats.copy()
        kafka = self._context.kafka
        self._context.start()
        try:
            await self._store.check()
            if True:  # ASYNC
                await check_commands_async(self.commands, self._store.begin)
            else:
                check_commands(self.commands, self._store.begin)
            gateway = await kafka(self._gateway)
            try:
                await self._run_loop(gateway, max_messages, timeout)
            finally:
                await kafka(gateway.close)
        finally:
            # Connections the store opened itself (conninfo) are closed; the next run reopens.
            try:
                await self._store.close()
            finally:
                self._context.finish()
                self._running = False
        stats = self._stats.since(before)
        self._log_stopped(stats)
        return stats

    async def _run_loop(
        self, gateway: KafkaGateway, max_messages: int | None, timeout: float | None
    ) -> None:
        config = self.config
        kafka = self._context.kafka
        stop = self._context.event
        driver = AsyncDriver(self._store, self, stop)
        limits = RunLimits(batch_size=config.batch_size, poll_timeout=config.poll_timeout,
                           max_messages=max_messages, timeout=timeout, now=time.monotonic(),
                           longest_poll=self._context.longest_poll)
        # ordering="sequence": messages waiting for a missing number (sequencing.py).
        holds = GapHolds(config.gap_timeout)
        await kafka(gateway.subscribe)
        self._log_started()
        while not stop.is_set():
            fetch = limits.next_fetch(time.monotonic())
            if fetch is None:
                break
            await self._maybe_purge()
            fetched = await kafka(gateway.fetch, fetch.limit,
                                  holds.wait(fetch.wait, time.monotonic()))
            holds.forget(gateway.assignment)
            batch = holds.next_batch(fetched, time.monotonic())
            items = batch.items
            if not items:
                continue
            report = await driver.run(items, batch.expired)
            self._log_held(items, report, holds.settle(items, report.held, time.monotonic()))
            self._account(items, report, gateway)
            await self._send_dead_letters(report, gateway)
            await kafka(gateway.commit)
            limits.resolved(len(report.outcomes))
            exhausted = self._exhausted(report)
            if exhausted is not None:
                raise exhausted
            if report.stopped:
                break

    async def _send_dead_letters(self, report: BatchReport, gateway: KafkaGateway) -> None:
        pending = report.dead_letters
        failures = 0
        while pending:
            results = await self._context.kafka(gateway.dead_letter, pending)
            pending = self._dead_lettered(pending, results, gateway)
            if not pending:
                return
            failures += 1
            # Kafka is away: wait and try again; the offsets stay uncommitted meanwhile.
            if await self.wait_stop(dead_letter_delay(self.config.retry, failures)):
                log.warning("stopping with unacknowledged dead letters", extra={
                    "event": "dead_letters_abandoned", "consumer": self.config.name,
                    "count": len(pending),
                })
                return

    async def _maybe_purge(self) -> None:
        config = self.config
        older_than = self._purges.due(time.monotonic())
        if older_than is None:
            return
        try:
            deleted = await self._store.purge(older_than, consumer=config.name)
        except Exception as exc:
            # The purge is housekeeping: it must not stop the consumer.
            log.warning("inbox purge failed", extra={"event": "inbox_purge_failed",
                                                     "error": str(exc)})
            return
        log.info("inbox purged", extra={"event": "inbox_purged", "consumer": config.name,
                                        "deleted": deleted})
