"""What the synchronous and the asyncio consumer share: configuration, handlers, counters,
and the bookkeeping after a batch (which offsets it resolved, which dead letters it needs)."""

from __future__ import annotations

import logging
import signal
import threading
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar, Unpack

from outbox.consumer.commands import CommandRoutes
from outbox.consumer.config import ConsumerConfig, ConsumerOptions
from outbox.consumer.engine import BatchReport, DeadLetterRequest, Outcome
from outbox.consumer.errors import HandlerExhaustedError
from outbox.consumer.kafka_io import KafkaGateway
from outbox.consumer.message import Message, Received
from outbox.errors import ConfigurationError
from outbox.mongo import MongoOutbox
from outbox.writer import Outbox

log = logging.getLogger("outbox.consumer")

H = TypeVar("H", bound=Callable[..., Any])
F = TypeVar("F", bound=Callable[..., Any])
# What handlers are: `handler(session_or_connection, message)`, plain or a coroutine function.
Handler = Callable[[Any, Message], None]
AsyncHandler = Callable[[Any, Message], Awaitable[None]]


@dataclass
class ConsumerStats:
    """Counters of a consumer: of one `run()` (its return value) or of its lifetime (`stats`)."""

    processed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    retries: int = 0
    ignored: int = 0
    store_retries: int = 0
    batches: int = 0
    # ordering="sequence": messages dead-lettered because the number before theirs never came.
    sequence_gaps: int = 0

    @property
    def resolved(self) -> int:
        """Messages done with: applied, skipped as duplicates or unhandled, or dead-lettered."""
        return self.processed + self.duplicates + self.dead_lettered + self.ignored

    def copy(self) -> ConsumerStats:
        return ConsumerStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def since(self, earlier: ConsumerStats) -> ConsumerStats:
        return ConsumerStats(
            **{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)}
        )


class HandlerRegistry(Generic[H]):
    """Handlers by event type, and the default one for every other type."""

    def __init__(self, check: Callable[[Callable[..., Any]], None]) -> None:
        self._by_type: dict[str, H] = {}
        self._default: H | None = None
        self._check = check

    def add(self, event_types: Sequence[str], function: H) -> H:
        self._check(function)
        for event_type in event_types:
            if not isinstance(event_type, str) or not event_type:
                raise ConfigurationError(f"event type {event_type!r} must be a non-empty string")
            if event_type in self._by_type:
                raise ConfigurationError(f"a handler for {event_type!r} is already registered")
        for event_type in event_types:
            self._by_type[event_type] = function
        return function

    def set_default(self, function: H) -> H:
        self._check(function)
        if self._default is not None:
            raise ConfigurationError("a default handler is already registered")
        self._default = function
        return function

    def lookup(self, message: Message) -> H | None:
        return self._by_type.get(message.event_type, self._default)

    def has(self, message: Message) -> bool:
        return self.lookup(message) is not None

    def empty(self) -> bool:
        return not self._by_type and self._default is None


class ConsumerBase(Generic[H]):
    """Configuration, handler registration and counters; subclasses add the run loop."""

    def __init__(
        self,
        *,
        name: str,
        kafka: Mapping[str, Any],
        topics: Sequence[str],
        **options: Unpack[ConsumerOptions],
    ) -> None:
        self.config = ConsumerConfig(
            name=name,
            kafka=dict(kafka),
            # A lone string is refused by the config, not split into one-letter topics.
            topics=topics if isinstance(topics, str) else list(topics),
            **options,
        )
        self.handlers: HandlerRegistry[H] = HandlerRegistry(self._check_handler)
        self.commands = CommandRoutes(self.handlers.add)
        self._stats = ConsumerStats()
        self._running = False

    # -- registration ------------------------------------------------------------------------------

    def _check_handler(self, function: Callable[..., Any]) -> None:
        if not callable(function):
            raise ConfigurationError(f"a handler must be callable, not {function!r}")

    def handler(self, *event_types: str | type) -> Callable[[H], H]:
        """Register the decorated function for `event_types` (at least one): event type names,
        or classes declared with `@outbox.event_type`, whose handlers get the validated model
        (`handler(session, event)` or `handler(session, event, message)`)."""
        if not event_types:
            raise ConfigurationError(
                "handler() needs at least one event type; use default_handler for the rest"
            )
        classes = [t for t in event_types if isinstance(t, type)]
        if classes and len(classes) != len(event_types):
            raise ConfigurationError("handler() takes event type names or classes, not both")

        def register(function: H) -> H:
            if not classes:
                return self.handlers.add(typing.cast(tuple[str, ...], event_types), function)
            from outbox.contracts.handlers import typed_handler

            names, wrapper = typed_handler(classes, function, self.config.name)
            self.handlers.add(names, typing.cast(H, wrapper))
            return function

        return register

    def command(self, *command_types: str, outbox: Outbox | MongoOutbox | None = None
                ) -> Callable[[F], F]:
        """Register the decorated function as the handler of commands of `command_types`
        (outbox.commands): `handler(session, message)` returns the reply's payload, or an
        `outbox.commands.Failure`; the reply is written through `outbox` (default: the default
        outbox of the consumer's database) in the handler's transaction, to the command's
        reply_to."""
        if not command_types:
            raise ConfigurationError("command() needs at least one command type")

        def register(function: F) -> F:
            self.commands.command(command_types, function, outbox)
            return function

        return register

    def reply(self, *command_types: str) -> Callable[[F], F]:
        """Register the decorated function as the handler of the replies to commands of
        `command_types`: `handler(session, reply: outbox.commands.Reply)`, applied exactly
        once (the reply's dedup row is in its transaction)."""
        if not command_types:
            raise ConfigurationError("reply() needs at least one command type")

        def register(function: F) -> F:
            self.commands.reply(command_types, function)
            return function

        return register

    def default_handler(self, function: H) -> H:
        """Register the handler of every event type that has no handler of its own. Without
        one, such messages are acknowledged without a transaction and counted as ignored."""
        return self.handlers.set_default(function)

    @property
    def stats(self) -> ConsumerStats:
        """Counters since this consumer was made."""
        return self._stats.copy()

    @property
    def running(self) -> bool:
        return self._running

    # -- shared steps of the run loop ------------------------------------------------------------

    def _gateway(self) -> KafkaGateway:
        config = self.config
        return KafkaGateway(
            consumer_settings=config.consumer_settings(),
            producer_settings=config.producer_settings(),
            topics=config.topics,
            name=config.name,
            dead_letter_template=config.dead_letter_topic,
            validate_json=config.validate_json,
        )

    def _account(self, items: Sequence[Received], report: BatchReport, gateway: KafkaGateway,
                 ) -> None:
        """Counters and logs of a finished batch; resolve everything but the dead letters."""
        stats = self._stats
        stats.batches += 1
        stats.processed += report.count(Outcome.PROCESSED)
        stats.duplicates += report.count(Outcome.DUPLICATE)
        stats.ignored += report.count(Outcome.IGNORED)
        stats.retries += report.retries
        stats.store_retries += report.store_retries
        stats.sequence_gaps += report.sequence_gaps
        for index, outcome in report.outcomes.items():
            if outcome is not Outcome.DEAD_LETTER:
                gateway.tracker.resolved(items[index].position)
            if outcome is Outcome.DUPLICATE:
                message = items[index].message
                log.info("duplicate skipped", extra={
                    "event": "duplicate_skipped", "consumer": self.config.name,
                    "event_id": str(message.id) if message else None,
                    "topic": items[index].position.topic,
                    "partition": items[index].position.partition,
                    "offset": items[index].position.offset,
                })

    def _log_held(self, items: Sequence[Received], report: BatchReport,
                  new: Sequence[int]) -> None:
        """ordering="sequence": a message held behind a gap, once (it is offered again with
        every batch until the missing number arrives or its wait ends)."""
        for index in new:
            position = items[index].position
            log.info("held behind a sequence gap", extra={
                "event": "sequence_gap_held", "consumer": self.config.name,
                "topic": position.topic, "partition": position.partition,
                "offset": position.offset, "reason": report.held[index],
                "gap_timeout": self.config.gap_timeout,
            })

    def _dead_lettered(self, requests: Sequence[DeadLetterRequest],
                       results: Sequence[str | None], gateway: KafkaGateway) -> list[
                           DeadLetterRequest]:
        """Resolve the acknowledged dead letters; returns those still to send."""
        pending = []
        for request, error in zip(requests, results, strict=True):
            position = request.received.position
            if error is None:
                gateway.tracker.resolved(position)
                self._stats.dead_lettered += 1
                log.warning("message dead-lettered", extra={
                    "event": "dead_lettered", "consumer": self.config.name,
                    "topic": position.topic, "partition": position.partition,
                    "offset": position.offset, "reason": request.reason,
                    "attempts": request.attempts,
                    "event_id": str(request.received.event_id or ""),
                })
            else:
                pending.append(request)
                log.error("dead letter not acknowledged", extra={
                    "event": "dead_letter_failed", "consumer": self.config.name,
                    "topic": position.topic, "partition": position.partition,
                    "offset": position.offset, "error": error,
                })
        return pending

    def _exhausted(self, report: BatchReport) -> HandlerExhaustedError | None:
        if report.exhausted is None:
            return None
        position = report.exhausted.received.position
        return HandlerExhaustedError(
            f"the handler failed {report.exhausted.attempts} times on "
            f"{position.topic}[{position.partition}]@{position.offset}: "
            f"{report.exhausted.reason}; the consumer stopped (retry on_exhausted='stop')"
        )

    def _log_started(self) -> None:
        log.info("consumer started", extra={
            "event": "consumer_started", "consumer": self.config.name,
            "topics": ",".join(self.config.topics), "batch_size": self.config.batch_size,
        })

    def _log_stopped(self, stats: ConsumerStats) -> None:
        log.info("consumer stopped", extra={
            "event": "consumer_stopped", "consumer": self.config.name,
            "processed": stats.processed, "duplicates": stats.duplicates,
            "dead_lettered": stats.dead_lettered, "retries": stats.retries,
        })


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
