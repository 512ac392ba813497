"""`Consumer`: the synchronous idempotent consumer (SQLAlchemy, psycopg or pymongo)."""

from __future__ import annotations

import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Unpack

import psycopg
import psycopg_pool
from pymongo.database import Database
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

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
from outbox.consumer.mongo import MongoStore
from outbox.consumer.stores import (
    InboxStore,
    InboxTransaction,
    PsycopgStore,
    SqlAlchemyStore,
    translate,
)
from outbox.errors import ConfigurationError, OutboxError, UnsupportedTargetError

log = logging.getLogger("outbox.consumer")

Handler = Callable[[Any, Message], None]


def sync_store(db: Any, mongo: Any, config: ConsumerConfig) -> InboxStore:
    """The store for `db=` or `mongo=`, as given to `Consumer`."""
    if (db is None) == (mongo is None):
        raise ConfigurationError("pass exactly one of db= (PostgreSQL) and mongo= (MongoDB)")
    store: InboxStore
    if mongo is not None:
        if not isinstance(mongo, Database):
            raise UnsupportedTargetError(
                f"mongo= must be a pymongo Database, not {type(mongo).__name__}"
            )
        store = MongoStore(mongo, config.name, config.inbox_table)
    elif isinstance(db, InboxStore):
        # A store of one's own (or outbox.consumer.testing.MemoryInbox).
        store = db
    elif isinstance(db, Engine | sessionmaker):
        store = SqlAlchemyStore(db, config.name, config.names)
    elif isinstance(db, psycopg_pool.ConnectionPool | psycopg.Connection | str):
        return PsycopgStore(db, config.name, config.names, pipeline=config.pipeline)
    else:
        raise UnsupportedTargetError(
            "db= must be a SQLAlchemy Engine or sessionmaker, a psycopg_pool.ConnectionPool, a "
            f"psycopg Connection or a conninfo string, not {type(db).__name__} "
            "(use AsyncConsumer for asyncio engines and connections)"
        )
    if config.pipeline:
        raise ConfigurationError("pipeline=True needs a psycopg database (pool or conninfo)")
    return store


class SyncDriver:
    """Carries out the engine's steps against a synchronous store."""

    def __init__(
        self,
        store: InboxStore,
        consumer: ConsumerBase[Handler],
        stop: threading.Event,
    ) -> None:
        self._store = store
        self._consumer = consumer
        self._stop = stop

    def run(self, items: Sequence[Received]) -> BatchReport:
        config = self._consumer.config
        handlers = self._consumer.handlers
        engine = BatchEngine(items, config.retry, handlers.has)
        steps = engine.run()
        tx: InboxTransaction | None = None
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
                        handler(tx.handle, step.message)
                    except Exception as exc:
                        reply = self._handler_failed(step.message, exc)
                elif isinstance(step, Begin):
                    try:
                        tx = self._store.begin()
                    except Exception as exc:
                        throw = self._store_failed(exc, "opening a transaction")
                elif isinstance(step, Claim):
                    assert tx is not None
                    try:
                        reply = tx.claim(step.ids)
                    except Exception as exc:
                        tx.rollback()
                        tx = None
                        throw = self._store_failed(exc, "inserting into the inbox")
                elif isinstance(step, Commit):
                    assert tx is not None
                    current, tx = tx, None
                    try:
                        current.commit()
                    except Exception as exc:
                        throw = self._commit_failed(exc)
                    else:
                        if config.on_commit is not None:
                            config.on_commit(step.messages)
                elif isinstance(step, Rollback):
                    if tx is not None:
                        tx.rollback()
                        tx = None
                elif isinstance(step, Sleep):
                    log_sleep(config.name, step)
                    reply = not self._stop.wait(step.seconds)
        finally:
            if tx is not None:
                tx.rollback()
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

    def _commit_failed(self, error: Exception) -> BaseException:
        if self._store.is_transient(error):
            return StoreUnavailable(error)
        log.warning("commit rejected", extra={
            "event": "commit_rejected", "consumer": self._consumer.config.name,
            "error": f"{type(error).__name__}: {error}",
        })
        return CommitRejected(error)


def log_sleep(consumer: str, step: Sleep) -> None:
    message = step.message
    log.warning(
        "retrying after a failure",
        extra={
            "event": step.why, "consumer": consumer, "delay": round(step.seconds, 3),
            "failures": step.failures, "error": step.error,
            "event_id": str(message.id) if message else None,
        },
    )


class Consumer(ConsumerBase[Handler]):
    """Applies each event exactly once: dedup row and handler writes in one transaction, then
    the Kafka offset. Handlers are `handler(session_or_connection, message) -> None`.

    `db` is a SQLAlchemy Engine or sessionmaker (handlers get a Session), a
    psycopg_pool.ConnectionPool, psycopg Connection or conninfo string (handlers get the
    Connection); or `mongo` is a pymongo Database (handlers get the ClientSession). Other
    keyword arguments are those of `ConsumerConfig`.
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
        self._store = sync_store(db, mongo, self.config)
        self._stop = threading.Event()
        self._next_purge = 0.0

    def _check_handler(self, function: Callable[..., Any]) -> None:
        super()._check_handler(function)
        if inspect.iscoroutinefunction(function):
            raise ConfigurationError(
                f"handler {function.__name__} is a coroutine function: use AsyncConsumer"
            )

    def stop(self) -> None:
        """Ask `run()` to return once the current batch is done (a message waiting for its
        retry is left for redelivery). Safe from any thread or signal handler; a stop() before
        run() makes that run return at once."""
        self._stop.set()

    def run(self, max_messages: int | None = None, timeout: float | None = None) -> ConsumerStats:
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
        restore = self._install_signals()
        try:
            self._store.check()
            gateway = self._gateway()
            try:
                self._loop(gateway, max_messages, timeout)
            finally:
                gateway.close()
        finally:
            # Connections the store opened itself (conninfo) are closed; the next run reopens.
            self._store.close()
            restore()
            self._running = False
            self._stop.clear()
        stats = self._stats.since(before)
        self._log_stopped(stats)
        return stats

    def _install_signals(self) -> Callable[[], None]:
        # Signal handlers can only be installed from the main thread; elsewhere stop() is the
        # way out, and the application keeps its own handlers.
        if not on_main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: self.stop())

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _loop(self, gateway: KafkaGateway, max_messages: int | None,
              timeout: float | None) -> None:
        config = self.config
        driver = SyncDriver(self._store, self, self._stop)
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        gateway.subscribe()
        self._log_started()
        while not self._stop.is_set():
            limit = self._fetch_limit(max_messages, done)
            if limit == 0:
                break
            wait = config.poll_timeout
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            self._maybe_purge()
            items = gateway.fetch(limit, wait)
            if not items:
                continue
            report = driver.run(items)
            self._account(items, report, gateway)
            self._send_dead_letters(report, gateway)
            gateway.commit()
            done += len(report.outcomes)
            exhausted = self._exhausted(report)
            if exhausted is not None:
                raise exhausted
            if report.stopped:
                break

    def _send_dead_letters(self, report: BatchReport, gateway: KafkaGateway) -> None:
        pending = report.dead_letters
        failures = 0
        while pending:
            results = gateway.dead_letter(pending)
            pending = self._dead_lettered(pending, results, gateway)
            if not pending:
                return
            failures += 1
            # Kafka is away: wait and try again; the offsets stay uncommitted meanwhile.
            if self._stop.wait(self.config.retry.delay(min(failures, 16))):
                log.warning("stopping with unacknowledged dead letters", extra={
                    "event": "dead_letters_abandoned", "consumer": self.config.name,
                    "count": len(pending),
                })
                return

    def _maybe_purge(self) -> None:
        config = self.config
        if config.purge_older_than is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + config.purge_every.total_seconds()
        try:
            deleted = self._store.purge(config.purge_older_than, consumer=config.name)
        except Exception as exc:
            # The purge is housekeeping: it must not stop the consumer.
            log.warning("inbox purge failed", extra={"event": "inbox_purge_failed",
                                                     "error": str(exc)})
            return
        log.info("inbox purged", extra={"event": "inbox_purged", "consumer": config.name,
                                        "deleted": deleted})
