"""`AsyncConsumer`: the idempotent consumer for asyncio applications; same decisions as
`Consumer` (outbox.consumer.engine), awaited store calls and `async def` handlers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, Unpack

import psycopg
import psycopg_pool
from pymongo.asynchronous.database import AsyncDatabase

from outbox import extras
from outbox.consumer.aio_stores import (
    AsyncInboxStore,
    AsyncInboxTransaction,
    AsyncMongoStore,
    AsyncPsycopgStore,
    AsyncSqlAlchemyStore,
)
from outbox.consumer.base import STOP_SIGNALS, ConsumerBase, ConsumerStats, on_main_thread
from outbox.consumer.config import ConsumerConfig, ConsumerOptions
from outbox.consumer.engine import (
    BatchEngine,
    BatchReport,
    Begin,
    Claim,
    Commit,
    CommitRejected,
    Handle,
    HandlerFailure,
    Rollback,
    Sleep,
    StoreUnavailable,
)
from outbox.consumer.errors import ConsumerError
from outbox.consumer.kafka_io import KafkaGateway
from outbox.consumer.message import Message, Received
from outbox.consumer.runner import log_sleep
from outbox.consumer.stores import translate
from outbox.errors import ConfigurationError, OutboxError, UnsupportedTargetError

log = logging.getLogger("outbox.consumer")

AsyncHandler = Callable[[Any, Message], Awaitable[None]]
T = TypeVar("T")


def async_store(db: Any, mongo: Any, config: ConsumerConfig) -> AsyncInboxStore:
    """The store for `db=` or `mongo=`, as given to `AsyncConsumer`."""
    if (db is None) == (mongo is None):
        raise ConfigurationError("pass exactly one of db= (PostgreSQL) and mongo= (MongoDB)")
    store: AsyncInboxStore
    if mongo is not None:
        if not isinstance(mongo, AsyncDatabase):
            raise UnsupportedTargetError(
                f"mongo= must be a pymongo AsyncDatabase, not {type(mongo).__name__}"
            )
        store = AsyncMongoStore(mongo, config.name, config.inbox_table)
    elif extras.is_sqlalchemy_asyncio(db):  # AsyncEngine or async_sessionmaker
        store = AsyncSqlAlchemyStore(db, config.name, config.names)
    elif isinstance(db, psycopg_pool.AsyncConnectionPool | psycopg.AsyncConnection | str):
        return AsyncPsycopgStore(db, config.name, config.names, pipeline=config.pipeline)
    else:
        raise UnsupportedTargetError(
            "db= must be a SQLAlchemy AsyncEngine or async_sessionmaker, a "
            "psycopg_pool.AsyncConnectionPool, a psycopg AsyncConnection or a conninfo string, "
            f"not {type(db).__name__}"
        )
    if config.pipeline:
        raise ConfigurationError("pipeline=True needs a psycopg database (pool or conninfo)")
    return store


class AsyncDriver:
    """Carries out the engine's steps against an asyncio store."""

    def __init__(self, store: AsyncInboxStore, consumer: AsyncConsumer) -> None:
        self._store = store
        self._consumer = consumer

    async def run(self, items: Sequence[Received]) -> BatchReport:
        config = self._consumer.config
        handlers = self._consumer.handlers
        steps = BatchEngine(items, config.retry, handlers.has).run()
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
                        await handler(tx.handle, step.message)
                    except Exception as exc:
                        reply = self._handler_failed(step.message, exc)
                elif isinstance(step, Begin):
                    try:
                        tx = await self._store.begin()
                    except Exception as exc:
                        throw = self._store_failed(exc, "opening a transaction")
                elif isinstance(step, Claim):
                    assert tx is not None
                    try:
                        reply = await tx.claim(step.ids)
                    except Exception as exc:
                        await tx.rollback()
                        tx = None
                        throw = self._store_failed(exc, "inserting into the inbox")
                elif isinstance(step, Commit):
                    assert tx is not None
                    current, tx = tx, None
                    try:
                        await current.commit()
                    except Exception as exc:
                        throw = (StoreUnavailable(exc) if self._store.is_transient(exc)
                                 else CommitRejected(exc))
                    else:
                        if config.on_commit is not None:
                            config.on_commit(step.messages)
                elif isinstance(step, Rollback):
                    if tx is not None:
                        await tx.rollback()
                        tx = None
                elif isinstance(step, Sleep):
                    log_sleep(config.name, step)
                    reply = not await self._consumer.wait_stop(step.seconds)
        finally:
            if tx is not None:
                await tx.rollback()
            steps.close()

    def _handler_failed(self, message: Message, error: Exception) -> HandlerFailure:
        transient = self._store.is_transient(error)
        log.warning("handler failed", extra={
            "event": "handler_failed", "consumer": self._consumer.config.name,
            "event_id": str(message.id), "event_type": message.event_type,
            "topic": message.topic, "partition": message.partition, "offset": message.offset,
            "error": f"{type(error).__name__}: {error}", "transient": transient,
        })
        return HandlerFailure(error, transient)

    def _store_failed(self, error: Exception, what: str) -> BaseException:
        if self._store.is_transient(error):
            return StoreUnavailable(error)
        if isinstance(error, OutboxError):
            raise error
        raise translate(error, what) from error


class AsyncConsumer(ConsumerBase[AsyncHandler]):
    """`Consumer` for asyncio: `async def handler(session_or_connection, message)`.

    `db` is a SQLAlchemy AsyncEngine or async_sessionmaker (handlers get an AsyncSession), a
    psycopg_pool.AsyncConnectionPool, psycopg AsyncConnection or conninfo string (handlers get
    the AsyncConnection); or `mongo` is a pymongo AsyncDatabase (handlers get the
    AsyncClientSession). Kafka calls run in one worker thread, so the event loop never blocks
    on librdkafka.
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
        self._stop: asyncio.Event | None = None
        self._stop_early = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kafka_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._next_purge = 0.0

    def _check_handler(self, function: Callable[..., Any]) -> None:
        super()._check_handler(function)
        if not inspect.iscoroutinefunction(function):
            raise ConfigurationError(
                f"handler {getattr(function, '__name__', function)!r} must be an async def "
                "function for AsyncConsumer"
            )

    def stop(self) -> None:
        """As `Consumer.stop`; callable from any thread."""
        self._stop_early = True
        loop, event = self._loop, self._stop
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    async def wait_stop(self, seconds: float) -> bool:
        """Wait up to `seconds`; True if the consumer is stopping."""
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _kafka(self, call: Callable[..., T], *args: Any) -> T:
        # librdkafka's consumer is not thread-safe: one worker thread makes every call.
        assert self._loop is not None and self._kafka_thread is not None
        return await self._loop.run_in_executor(self._kafka_thread, call, *args)

    async def run(self, max_messages: int | None = None,
                  timeout: float | None = None) -> ConsumerStats:
        """As `Consumer.run`, awaited."""
        if self._running:
            raise ConsumerError("this consumer is already running")
        if self.handlers.empty():
            raise ConfigurationError("no handler is registered")
        if max_messages is not None and max_messages < 1:
            raise ConfigurationError(f"max_messages={max_messages} must be >= 1")
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_early:
            self._stop.set()
        before = self._stats.copy()
        restore = self._install_signals()
        self._kafka_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="outbox-consumer-kafka"
        )
        try:
            await self._store.check()
            gateway = await self._kafka(self._gateway)
            try:
                await self._run_loop(gateway, max_messages, timeout)
            finally:
                await self._kafka(gateway.close)
        finally:
            await self._store.close()
            self._kafka_thread.shutdown(wait=True)
            self._kafka_thread = None
            restore()
            self._running = False
            self._stop = None
            self._stop_early = False
            self._loop = None
        stats = self._stats.since(before)
        self._log_stopped(stats)
        return stats

    def _install_signals(self) -> Callable[[], None]:
        if not on_main_thread() or self._loop is None:
            return lambda: None
        loop = self._loop
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self.stop)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Unix
            return lambda: None

        def restore() -> None:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

        return restore

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _run_loop(self, gateway: KafkaGateway, max_messages: int | None,
                        timeout: float | None) -> None:
        config = self.config
        driver = AsyncDriver(self._store, self)
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        await self._kafka(gateway.subscribe)
        self._log_started()
        while not self._stopping():
            limit = self._fetch_limit(max_messages, done)
            if limit == 0:
                break
            # Short waits in the worker thread keep stop() responsive.
            wait = min(config.poll_timeout, 0.5)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            await self._maybe_purge()
            items = await self._kafka(gateway.fetch, limit, wait)
            if not items:
                continue
            report = await driver.run(items)
            self._account(items, report, gateway)
            await self._send_dead_letters(report, gateway)
            await self._kafka(gateway.commit)
            done += len(report.outcomes)
            exhausted = self._exhausted(report)
            if exhausted is not None:
                raise exhausted
            if report.stopped:
                break

    async def _send_dead_letters(self, report: BatchReport, gateway: KafkaGateway) -> None:
        pending = report.dead_letters
        failures = 0
        while pending:
            results = await self._kafka(gateway.dead_letter, pending)
            pending = self._dead_lettered(pending, results, gateway)
            if not pending:
                return
            failures += 1
            if await self.wait_stop(self.config.retry.delay(min(failures, 16))):
                log.warning("stopping with unacknowledged dead letters", extra={
                    "event": "dead_letters_abandoned", "consumer": self.config.name,
                    "count": len(pending),
                })
                return

    async def _maybe_purge(self) -> None:
        config = self.config
        if config.purge_older_than is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + config.purge_every.total_seconds()
        try:
            deleted = await self._store.purge(config.purge_older_than, consumer=config.name)
        except Exception as exc:
            log.warning("inbox purge failed", extra={"event": "inbox_purge_failed",
                                                     "error": str(exc)})
            return
        log.info("inbox purged", extra={"event": "inbox_purged", "consumer": config.name,
                                        "deleted": deleted})
