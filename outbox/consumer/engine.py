"""The consumer's decisions for one batch, as a generator of steps that sync and asyncio drivers
carry out: claim, handle, commit, retry, dead-letter. No I/O happens here.

A batch runs optimistically in one transaction: claim every event id (one statement), call the
handlers, commit. When a handler raises, the transaction is rolled back whole and the batch is
cut at that message: the messages before it run again in their own transaction, the failing one
is retried alone with backoff (then dead-lettered), the rest go on. No savepoints are needed,
so the common case costs no extra round trip per message, and no message is applied twice,
because every commit carries the inbox rows of exactly the messages it applied.

With ordering="sequence" the transaction first reads each aggregate's last applied number
(`ReadSequences`) and judges the numbered messages (outbox/consumer/sequencing.py): duplicates
are skipped unclaimed, gaps are left out of the transaction (held, or dead-lettered once their
wait is over), and the new numbers are saved (`SaveSequences`) before the commit.

The engine also classifies what its driver reports: a store failure that a retry may cure
(the store's `is_transient`) is retried without limit, a rejected commit splits the batch, any
other store failure ends the run as the project's exception (`store_rules.translate`); and it
logs each of these decisions, so that the sync and asyncio consumers log them alike.
"""

from __future__ import annotations

import enum
import logging
import random as _random
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from outbox.consumer.message import Message, Received
from outbox.consumer.policy import RetryPolicy, Verdict, describe
from outbox.consumer.sequencing import (
    AggregateKey,
    SequenceCheck,
    aggregate_key,
    gap_reason,
    in_sequence_order,
    sequence_of,
)
from outbox.consumer.sequencing import Verdict as SequenceVerdict
from outbox.consumer.store_rules import translate
from outbox.errors import OutboxError

log = logging.getLogger("outbox.consumer")

# Store failures (connection lost, serialization failure) are retried without limit: a database
# outage is backpressure, not a reason to dead-letter. The wait grows like a handler retry's.
_STORE_BACKOFF_CAP = 16


# -- steps: what the engine asks its driver to do -------------------------------------------------


# Begin, Claim and Commit are store calls: when one raises, the driver throws that exception
# into the engine (`steps.throw(exc)`), which decides what it means.


@dataclass(frozen=True, slots=True)
class Begin:
    """Open a transaction (and get a connection/session for it). Reply: None."""


@dataclass(frozen=True, slots=True)
class Claim:
    """Insert `(consumer, id)` for each id, skipping existing rows. Reply: the ids inserted."""

    ids: tuple[uuid.UUID, ...]


@dataclass(frozen=True, slots=True)
class ReadSequences:
    """ordering="sequence": read (and lock until the transaction ends) the last applied number
    of each aggregate. Reply: {(aggregate_type, aggregate_id): number} for those that have one."""

    keys: tuple[AggregateKey, ...]


@dataclass(frozen=True, slots=True)
class SaveSequences:
    """ordering="sequence": store these last applied numbers in the open transaction. Reply:
    None."""

    numbers: tuple[tuple[AggregateKey, int], ...]


@dataclass(frozen=True, slots=True)
class Handle:
    """Call the message's handler in the open transaction. Reply: None, or the exception the
    handler raised.

    With `exhausted` (the reason the handler failed for good), call the message's last word
    instead: a command's failure reply (outbox.consumer.commands), in the transaction that
    claims the dead letter's dedup row."""

    message: Message
    exhausted: str | None = None


@dataclass(frozen=True, slots=True)
class Commit:
    """Commit the open transaction, which applied `messages`; the driver then calls the
    consumer's `on_commit`. Reply: None."""

    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Rollback:
    """Roll back and release the open transaction; must not fail. Reply: None."""


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait before the next try. Reply: True to go on, False when the consumer is stopping."""

    seconds: float
    why: str
    message: Message | None = None
    failures: int = 0
    error: str = ""


Step = Begin | Claim | ReadSequences | SaveSequences | Handle | Commit | Rollback | Sleep


class StoreUnavailable(Exception):
    """Begin, Claim, Commit or a handler failed transiently and the transaction is gone (a
    commit in doubt is safe to redo: the inbox rows tell)."""


class CommitRejected(Exception):
    """The commit failed for good (e.g. a deferred constraint); the transaction is rolled back
    and the culprit is unknown."""


# -- the result ----------------------------------------------------------------------------------


class Outcome(enum.Enum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"  # no handler for its event type
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class DeadLetterRequest:
    index: int
    received: Received
    reason: str
    attempts: int


@dataclass
class BatchReport:
    """What happened to each message of a batch (by index); absent = unresolved (stopping)."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)
    dead_letters: list[DeadLetterRequest] = field(default_factory=list)
    retries: int = 0
    store_retries: int = 0
    stopped: bool = False
    exhausted: DeadLetterRequest | None = None
    # ordering="sequence": messages held behind a gap (index -> why), left unresolved, and how
    # many were dead-lettered because their wait was over.
    held: dict[int, str] = field(default_factory=dict)
    sequence_gaps: int = 0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for value in self.outcomes.values() if value is outcome)


class _Stopping(Exception):
    """Unwinds the engine when the driver says the consumer is stopping."""


class BatchEngine:
    """Decides, step by step, how a batch of received messages is applied exactly once."""

    def __init__(
        self,
        items: Sequence[Received],
        policy: RetryPolicy,
        has_handler: Callable[[Message], bool],
        rand: Callable[[], float] = _random.random,
        *,
        is_transient: Callable[[BaseException], bool] = lambda error: False,
        consumer: str = "",
        sequence: bool = False,
        expired: frozenset[int] = frozenset(),
        last_word: Callable[[Message], bool] = lambda message: False,
    ) -> None:
        self.items = items
        self.policy = policy
        self.has_handler = has_handler
        self.rand = rand
        self.is_transient = is_transient
        self.consumer = consumer
        self.last_word = last_word
        self.report = BatchReport()
        # ordering="sequence": index -> (aggregate, number) of the numbered messages; the
        # indices of held messages whose wait is over.
        self.sequence = sequence
        self.expired = expired
        self._numbers: dict[int, tuple[AggregateKey, int]] = {}
        # Numbered messages without a handler: judged (and their number saved), not handled.
        self._unhandled: set[int] = set()

    def run(self) -> Generator[Step, Any, BatchReport]:
        work: list[int] = []
        for index, item in enumerate(self.items):
            if item.message is None:
                self._dead_letter(index, item.problem or "unreadable message", attempts=0)
            elif not self.has_handler(item.message):
                if self.sequence and self._note_number(index, item.message, unhandled=True):
                    # Its number counts all the same: the aggregate's next one follows it.
                    work.append(index)
                else:
                    self.report.outcomes[index] = Outcome.IGNORED
            elif self.sequence and not self._note_number(index, item.message):
                continue
            else:
                work.append(index)
        if self._numbers:
            work = in_sequence_order(work, self._numbers)
        try:
            yield from self._run(work)
        except _Stopping:
            self.report.stopped = True
        return self.report

    # -- internals -------------------------------------------------------------------------------

    def _message(self, index: int) -> Message:
        message = self.items[index].message
        assert message is not None  # only readable messages are ever in `work`
        return message

    def _note_number(self, index: int, message: Message, unhandled: bool = False) -> bool:
        """Notes the message's number. False when it takes no part in the batch: its number is
        unreadable (dead-lettered; ignored when no handler takes it), or no handler takes it and
        it has no number."""
        try:
            number = sequence_of(message)
        except ValueError as exc:
            if not unhandled:
                self._dead_letter(index, str(exc), attempts=0)
            return False
        if number is None:
            return not unhandled
        self._numbers[index] = (aggregate_key(message), number)
        if unhandled:
            self._unhandled.add(index)
        return True

    def _judge(self, work: list[int]) -> Generator[Step, Any, tuple[
            list[int], dict[int, Outcome], dict[int, str], SequenceCheck | None]]:
        """ordering="sequence", in the open transaction: which of `work` to apply (the rest are
        duplicates by number, or gaps: index -> reason)."""
        numbered = [index for index in work if index in self._numbers]
        if not numbered:
            return work, {}, {}, None
        keys = tuple(dict.fromkeys(self._numbers[index][0] for index in numbered))
        last = yield from self._store(ReadSequences(keys), "reading the sequence numbers")
        check = SequenceCheck(last)
        apply: list[int] = []
        skipped: dict[int, Outcome] = {}
        gaps: dict[int, str] = {}
        for index in work:
            if index not in self._numbers:
                apply.append(index)
                continue
            key, number = self._numbers[index]
            verdict, expected = check.judge(key, number)
            if verdict is SequenceVerdict.NEXT:
                apply.append(index)
            elif verdict is SequenceVerdict.DUPLICATE:
                skipped[index] = Outcome.DUPLICATE
            else:
                gaps[index] = gap_reason(key, expected, number)
        return apply, skipped, gaps, check

    def _settle_gaps(self, gaps: dict[int, str]) -> None:
        for index, reason in gaps.items():
            if index in self.expired:
                self._dead_letter(index, reason, attempts=0)
                self.report.sequence_gaps += 1
            else:
                self.report.held[index] = reason

    def _dead_letter(self, index: int, reason: str, attempts: int) -> None:
        request = DeadLetterRequest(index, self.items[index], reason, attempts)
        self.report.dead_letters.append(request)
        self.report.outcomes[index] = Outcome.DEAD_LETTER

    def _store(self, step: Begin | Claim | ReadSequences | SaveSequences | Commit, what: str,
               ) -> Generator[Step, Any, Any]:
        """Yield a store call; what its failure means: retry (transient), a rejected commit,
        or the end of the run as the project's exception."""
        try:
            return (yield step)
        except Exception as exc:
            if self.is_transient(exc):
                raise StoreUnavailable(exc) from exc
            if isinstance(step, Commit):
                log.warning("commit rejected", extra={
                    "event": "commit_rejected", "consumer": self.consumer,
                    "error": f"{type(exc).__name__}: {exc}",
                })
                raise CommitRejected(exc) from exc
            if isinstance(exc, OutboxError):
                raise
            raise translate(exc, what) from exc

    def _handler_failed(self, message: Message, error: BaseException) -> bool:
        """Logs the failure; True if it came from the store (connection lost, serialization
        failure): retried without counting a try."""
        transient = self.is_transient(error)
        log.warning("handler failed", extra={
            "event": "handler_failed", "consumer": self.consumer,
            "event_id": str(message.id), "event_type": message.event_type,
            "topic": message.topic, "partition": message.partition, "offset": message.offset,
            "error": f"{type(error).__name__}: {error}", "transient": transient,
        })
        return transient

    def _sleep(self, step: Sleep) -> Sleep:
        message = step.message
        log.warning("retrying after a failure", extra={
            "event": step.why, "consumer": self.consumer, "delay": round(step.seconds, 3),
            "failures": step.failures, "error": step.error,
            "event_id": str(message.id) if message else None,
        })
        return step

    def _run(self, work: list[int]) -> Generator[Step, Any, None]:
        while work:
            failure = yield from self._transaction(work)
            if failure is None:
                return
            position, error = failure
            if position:
                # The messages before the failing one did succeed: apply them without it.
                yield from self._run(work[:position])
            yield from self._retry_alone(work[position], error)
            work = work[position + 1 :]

    def _transaction(
        self, work: list[int], exhausted: str | None = None
    ) -> Generator[Step, Any, tuple[int, BaseException] | None]:
        """Apply `work` in one transaction. Returns None once committed, or (position in
        `work`, error) of the first failing handler, with everything rolled back. With
        `exhausted`, `work` is one message that failed for good and gets its last word."""
        store_failures = 0
        while True:
            outcomes: dict[int, Outcome] = {}
            gaps: dict[int, str] = {}
            try:
                yield from self._store(Begin(), "opening a transaction")
                # A last word (a command's failure reply) comes after the message was judged
                # next and failed for good: its number stays unapplied, like any dead letter's.
                apply, outcomes, gaps, check = (
                    (yield from self._judge(work)) if self.sequence and exhausted is None
                    else (work, {}, {}, None))
                ids = tuple(dict.fromkeys(
                    self._message(i).id for i in apply if i not in self._unhandled))
                claimed: set[uuid.UUID] = set(
                    (yield from self._store(Claim(ids), "inserting into the inbox")))
                applied: list[Message] = []
                for position, index in enumerate(work):
                    if index in outcomes or index in gaps:
                        continue
                    if index in self._unhandled:
                        outcomes[index] = Outcome.IGNORED
                        continue
                    message = self._message(index)
                    if message.id not in claimed:
                        outcomes[index] = Outcome.DUPLICATE
                        continue
                    # The same id twice in one batch: the first one applies it.
                    claimed.discard(message.id)
                    failure: BaseException | None = yield Handle(message, exhausted)
                    if failure is not None:
                        yield Rollback()
                        if self._handler_failed(message, failure):
                            raise StoreUnavailable(failure)
                        return position, failure
                    outcomes[index] = Outcome.PROCESSED
                    applied.append(message)
                if check is not None and check.changed:
                    # In the transaction of the dedup rows: both or neither.
                    yield from self._store(
                        SaveSequences(tuple(check.changed.items())), "saving sequence numbers")
                if applied or (check is not None and check.changed):
                    # A last word applies no message: on_commit gets none for it.
                    done = tuple(applied) if exhausted is None else ()
                    yield from self._store(Commit(done), "committing")
                else:
                    # Only duplicates: there is nothing to commit.
                    yield Rollback()
            except StoreUnavailable as exc:
                # Whatever of the transaction is left (after a failed claim) goes first.
                yield Rollback()
                store_failures += 1
                self.report.store_retries += 1
                delay = self.policy.delay(min(store_failures, _STORE_BACKOFF_CAP), self.rand())
                cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
                sleep = Sleep(delay, "store_retry", None, store_failures, describe(cause))
                if not (yield self._sleep(sleep)):
                    raise _Stopping from None
                continue
            except CommitRejected as exc:
                cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
                if len(work) == 1:
                    return 0, cause
                # Which message broke the commit is unknown: halve the batch until the culprit
                # is alone (a few transactions, not one per message); halves keep their order.
                middle = len(work) // 2
                yield from self._run(work[:middle])
                yield from self._run(work[middle:])
                return None
            self.report.outcomes.update(outcomes)
            self._settle_gaps(gaps)
            return None

    def _retry_alone(self, index: int, error: BaseException) -> Generator[Step, Any, None]:
        failures = 1
        message = self._message(index)
        while True:
            decision = self.policy.decide(failures, error, self.rand())
            if decision.verdict is Verdict.DEAD_LETTER:
                if self.last_word(message):
                    # A command's failure reply, committed with its dedup row before the dead
                    # letter goes out; if the row was there already (handled elsewhere in the
                    # meantime) there is nothing to dead-letter.
                    yield from self._transaction([index], exhausted=describe(error))
                    if self.report.outcomes.get(index) is Outcome.DUPLICATE:
                        return
                self._dead_letter(index, describe(error), failures)
                return
            if decision.verdict is Verdict.STOP:
                self.report.exhausted = DeadLetterRequest(
                    index, self.items[index], describe(error), failures
                )
                raise _Stopping
            self.report.retries += 1
            go_on = yield self._sleep(
                Sleep(decision.delay, "handler_retry", message, failures, describe(error)))
            if not go_on:
                raise _Stopping
            failures += 1
            failure = yield from self._transaction([index])
            if failure is None:
                return
            error = failure[1]
