"""What a run of the consumer needs from its flavour, beside the core and the stores: the stop
event and waiting on it, the stop signals, the thread that calls Kafka, and which handlers fit.

As psycopg's waiting.py, this is the one module where the synchronous and the asyncio ways are
written side by side on purpose, because they do not translate into each other (a
threading.Event against an asyncio.Event set through the loop, signal.signal against
loop.add_signal_handler, librdkafka called in place against in a worker thread). aio.py uses
`AsyncRunContext`; runner.py, generated from it, uses `RunContext`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from outbox.consumer.base import STOP_SIGNALS, on_main_thread
from outbox.errors import ConfigurationError

T = TypeVar("T")

# What a driver waits on between tries.
StopEvent = threading.Event
AsyncStopEvent = asyncio.Event


def _nothing() -> None:
    """Nothing to restore."""


def wait(event: threading.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if `event` is set (the consumer is stopping)."""
    return event.wait(seconds)


async def wait_async(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if `event` is set (the consumer is stopping)."""
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


class RunContext:
    """The synchronous consumer's: a threading.Event that stop() sets from any thread or signal
    handler, and librdkafka called in the consumer's own thread."""

    # A poll in librdkafka returns on its own time: poll_timeout as configured.
    longest_poll: float | None = None

    def __init__(self) -> None:
        self._event = threading.Event()
        self._restore: Callable[[], None] = _nothing

    @staticmethod
    def check_handler(function: Callable[..., Any]) -> None:
        if inspect.iscoroutinefunction(function):
            raise ConfigurationError(
                f"handler {function.__name__} is a coroutine function: use AsyncConsumer"
            )

    @property
    def event(self) -> threading.Event:
        return self._event

    def stop(self) -> None:
        self._event.set()

    def wait(self, seconds: float) -> bool:
        return wait(self._event, seconds)

    def kafka(self, call: Callable[..., T], *args: Any) -> T:
        return call(*args)

    def start(self) -> None:
        # Signal handlers can only be installed from the main thread; elsewhere stop() is the
        # way out, and the application keeps its own handlers.
        if not on_main_thread():
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: self.stop())

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        self._restore = restore

    def finish(self) -> None:
        """Restore the signal handlers; a stop() of this run does not stop the next."""
        restore, self._restore = self._restore, _nothing
        restore()
        self._event.clear()


class AsyncRunContext:
    """The asyncio consumer's: an asyncio.Event made in the running loop (a stop() before the
    run is remembered), and librdkafka called in one worker thread, so that the event loop
    never blocks on it."""

    # Short waits in the worker thread keep stop() responsive: the thread cannot be woken.
    longest_poll: float | None = 0.5

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._stop_early = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._restore: Callable[[], None] = _nothing

    @staticmethod
    def check_handler(function: Callable[..., Any]) -> None:
        if not inspect.iscoroutinefunction(function):
            raise ConfigurationError(
                f"handler {getattr(function, '__name__', function)!r} must be an async def "
                "function for AsyncConsumer"
            )

    @property
    def event(self) -> asyncio.Event:
        assert self._event is not None, "only while the consumer runs"
        return self._event

    def stop(self) -> None:
        self._stop_early = True
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, seconds: float) -> bool:
        return await wait_async(self.event, seconds)

    async def kafka(self, call: Callable[..., T], *args: Any) -> T:
        # librdkafka's consumer is not thread-safe: one worker thread makes every call.
        assert self._loop is not None and self._thread is not None
        return await self._loop.run_in_executor(self._thread, call, *args)

    def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        if self._stop_early:
            self._event.set()
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="outbox-consumer-kafka"
        )
        if not on_main_thread():
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self.stop)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Unix
            return

        def restore() -> None:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

        self._restore = restore

    def finish(self) -> None:
        """Stop the Kafka thread and restore the signal handlers; a stop() of this run does
        not stop the next."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._thread = None
        restore, self._restore = self._restore, _nothing
        restore()
        self._event = None
        self._stop_early = False
        self._loop = None
