"""`AsyncConsumer`: the idempotent consumer for asyncio applications (SQLAlchemy, psycopg or
pymongo), with `async def` handlers. Its decisions are in `engine` (a batch) and `schedule` (the run
loop); this module only carries them out.

The asyncio consumer is the one written by hand; the synchronous `Consumer`
(outbox.consumer.runner) is generated from this file by tools/async_to_sync.py
(`make sync-code`). Where the two truly differ (the stop event, signals, the thread that calls
Kafka), an `if True:  # ASYNC` block holds both.
"""

from __future__ import annotations

import inspect
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, Unpack

from outbox.consumer.aio_stores import AsyncInboxStore, AsyncInboxTransaction, async_store
from outbox.consumer.base import (
    STOP_SIGNALS,
    AsyncHandler,
    ConsumerBase,
    ConsumerStats,
    on_main_thread,
)
from outbox.consumer.config import ConsumerOptions
from outbox.consumer.engine import (
    BatchEngine,
    BatchReport,
    Begin,
    Claim,
    Commit,
    Handle,
    Rollback,
    Sleep,
)
from outbox.consumer.errors import ConsumerError
from outbox.consumer.kafka_io import KafkaGateway
from outbox.consumer.message import Received
from outbox.consumer.schedule import PurgeSchedule, RunLimits, dead_letter_delay
from outbox.errors import ConfigurationError

if True:  # ASYNC
    import asyncio
    import concurrent.futures
    # librdkafka's calls block their thread: they run in a worker thread, with short waits
    # there so that stop() is heard soon.
    _LONGEST_POLL: float | None = 0.5


    async def _wait(event: asyncio.Event, seconds: float) -> bool:
        """Wait up to `seconds`; True if `event` is set (the consumer is stopping)."""
        try:
            await asyncio.wait_for(event.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

else:
    import threading
    # stop() sets the event from any thread; a poll in librdkafka returns on its own time.
    _LONGEST_POLL = None


    def _wait(event: threading.Event, seconds: float) -> bool:
        """Wait up to `seconds`; True if `event` is set (the consumer is stopping)."""
        return event.wait(seconds)


log = logging.getLogger("outbox.consumer")

T = TypeVar("T")


class AsyncDriver:
    """Carries out the engine's steps against a store: the I/O of a batch, no decisions."""

    def __init__(
        self, store: AsyncInboxStore, consumer: ConsumerBase[AsyncHandler],
        stop: Any,  # the consumer's stop event: an asyncio.Event, a threading.Event
    ) -> None:
        self._store = store
        self._consumer = consumer
        self._stop = stop

    async def run(self, items: Sequence[Received]) -> BatchReport:
        config = self._consumer.config
        handlers = self._consumer.handlers
        steps = BatchEngine(items, config.retry, handlers.has,
                            is_transient=self._store.is_transient, consumer=config.name).run()
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
                        reply = exc
                elif isinstance(step, Begin):
                    try:
                        tx = await self._store.begin()
                    except Exception as exc:
                        throw = exc
                elif isinstance(step, Claim):
                    assert tx is not None
                    try:
                        reply = await tx.claim(step.ids)
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
                        if config.on_commit is not None:
                            config.on_commit(step.messages)
                elif isinstance(step, Rollback):
                    if tx is not None:
                        await tx.rollback()
                        tx = None
                elif isinstance(step, Sleep):
                    reply = not await _wait(self._stop, step.seconds)
        finally:
            if tx is not None:
                await tx.rollback()
            steps.close()


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
        self._purges = PurgeSchedule(self.config.purge_older_than, self.config.purge_every)
        if True:  # ASYNC
            # The event is made by run(), in the running loop; a stop() before sets the flag.
            self._stop: asyncio.Event | None = None
            self._stop_early = False
            self._loop: asyncio.AbstractEventLoop | None = None
            self._kafka_thread: concurrent.futures.ThreadPoolExecutor | None = None
        else:
            self._stop = threading.Event()

    if True:  # ASYNC

        def _check_handler(self, function: Callable[..., Any]) -> None:
            super()._check_handler(function)
            if not inspect.iscoroutinefunction(function):
                raise ConfigurationError(
                    f"handler {getattr(function, '__name__', function)!r} must be an async def "
                    "function for AsyncConsumer"
                )

        def stop(self) -> None:
            """Ask `run()` to return once the current batch is done (a message waiting for its
            retry is left for redelivery). Safe from any thread or signal handler; a stop()
            before run() makes that run return at once."""
            self._stop_early = True
            loop, event = self._loop, self._stop
            if loop is not None and event is not None:
                loop.call_soon_threadsafe(event.set)

        def _stop_event(self) -> asyncio.Event:
            assert self._stop is not None, "only while running"
            return self._stop

        async def _kafka(self, call: Callable[..., T], *args: Any) -> T:
            # librdkafka's consumer is not thread-safe: one worker thread makes every call.
            assert self._loop is not None and self._kafka_thread is not None
            return await self._loop.run_in_executor(self._kafka_thread, call, *args)

        def _started(self) -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            if self._stop_early:
                self._stop.set()
            self._kafka_thread = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="outbox-consumer-kafka"
            )

        def _finished(self) -> None:
            if self._kafka_thread is not None:
                self._kafka_thread.shutdown(wait=True)
            self._kafka_thread = None
            self._stop = None
            self._stop_early = False
            self._loop = None

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

    else:
        def _check_handler(self, function: Callable[..., Any]) -> None:
            super()._check_handler(function)
            if inspect.iscoroutinefunction(function):
                raise ConfigurationError(
                    f"handler {function.__name__} is a coroutine function: use AsyncConsumer"
                )

        def stop(self) -> None:
            """Ask `run()` to return once the current batch is done (a message waiting for its
            retry is left for redelivery). Safe from any thread or signal handler; a stop()
            before run() makes that run return at once."""
            self._stop.set()

        def _stop_event(self) -> threading.Event:
            return self._stop

        def _kafka(self, call: Callable[..., T], *args: Any) -> T:
            return call(*args)

        def _started(self) -> None:
            """Nothing to set up: the stop event lives as long as the consumer."""

        def _finished(self) -> None:
            self._stop.clear()

        def _install_signals(self) -> Callable[[], None]:
            # Signal handlers can only be installed from the main thread; elsewhere stop() is
            # the way out, and the application keeps its own handlers.
            if not on_main_thread():
                return lambda: None
            previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            for sig in STOP_SIGNALS:
                signal.signal(sig, lambda signum, frame: self.stop())

            def restore() -> None:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

            return restore

    async def wait_stop(self, seconds: float) -> bool:
        """Wait up to `seconds` while running; True if the consumer is stopping."""
        return await _wait(self._stop_event(), seconds)

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
        self._started()
        before = self._stats.copy()
        restore = self._install_signals()
        try:
            await self._store.check()
            gateway = await self._kafka(self._gateway)
            try:
                await self._run_loop(gateway, max_messages, timeout)
            finally:
                await self._kafka(gateway.close)
        finally:
            # Connections the store opened itself (conninfo) are closed; the next run reopens.
            try:
                await self._store.close()
            finally:
                self._finished()
                restore()
                self._running = False
        stats = self._stats.since(before)
        self._log_stopped(stats)
        return stats

    async def _run_loop(
        self, gateway: KafkaGateway, max_messages: int | None, timeout: float | None
    ) -> None:
        config = self.config
        stop = self._stop_event()
        driver = AsyncDriver(self._store, self, stop)
        limits = RunLimits(batch_size=config.batch_size, poll_timeout=config.poll_timeout,
                           max_messages=max_messages, timeout=timeout, now=time.monotonic(),
                           longest_poll=_LONGEST_POLL)
        await self._kafka(gateway.subscribe)
        self._log_started()
        while not stop.is_set():
            fetch = limits.next_fetch(time.monotonic())
            if fetch is None:
                break
            await self._maybe_purge()
            items = await self._kafka(gateway.fetch, fetch.limit, fetch.wait)
            if not items:
                continue
            report = await driver.run(items)
            self._account(items, report, gateway)
            await self._send_dead_letters(report, gateway)
            await self._kafka(gateway.commit)
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
            results = await self._kafka(gateway.dead_letter, pending)
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
