"""Commands and replies without services: the wire format (outbox.commands) and the consumer's
command/reply handlers driven against the in-memory inbox, with an in-memory outbox."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest

from outbox import InvalidEventError, Outbox, commands
from outbox.consumer import Consumer, Message, RetryPolicy
from outbox.consumer.engine import BatchReport, Outcome
from outbox.consumer.message import Received, parse
from outbox.consumer.runner import SyncDriver
from outbox.consumer.testing import MemoryInbox, MemorySession
from outbox.event import Event
from relay.sinks.kafka.sink import kafka_headers

KAFKA = {"bootstrap.servers": "127.0.0.1:9"}
FAST = RetryPolicy(tries=3, base_delay=0.0, max_delay=0.0, jitter=0.0)


class MemoryOutbox(Outbox):
    """Records published events as effects of the in-memory transaction."""

    def publish(self, target: Any, *events: Event) -> Any:
        assert isinstance(target, MemorySession)
        for event in events:
            target.add(event)
        return [event.id for event in events]


def as_received(event: Event, offset: int = 0) -> Received:
    """The event as the consumer receives it from Kafka (the relay's headers)."""
    record = Outbox().records([event])[0]
    return parse(event.topic or event.aggregate_type, 0, offset,
                 event.aggregate_id.encode(), record.payload, kafka_headers(record))


# -- the wire format ------------------------------------------------------------------------------


def test_a_command_is_an_event_with_its_destination_and_headers() -> None:
    event = commands.command("AuthorizeCard", {"amount": 5}, destination="accounting.commands",
                             reply_to="orders.replies", headers={"tenant": "eu"})
    assert event.topic == "accounting.commands"
    assert event.event_type == event.aggregate_type == "AuthorizeCard"
    assert event.aggregate_id == str(event.id)  # the key defaults to the command id
    assert event.headers == {"tenant": "eu", "message_type": "command",
                             "command_type": "AuthorizeCard", "correlation_id": str(event.id),
                             "reply_to": "orders.replies"}
    keyed = commands.command("AuthorizeCard", destination="a", aggregate_type="Order",
                             aggregate_id="42")
    assert (keyed.aggregate_type, keyed.aggregate_id) == ("Order", "42")
    one_way = commands.command("Notify", destination="a")
    assert "reply_to" not in one_way.headers


@pytest.mark.parametrize("bad", [
    {"destination": ""}, {"destination": "a", "reply_to": ""},
    {"destination": "a", "headers": {"correlation_id": "x"}},
])
def test_bad_commands_are_refused_before_anything_is_written(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidEventError):
        commands.command("AuthorizeCard", **bad)


def test_replies_carry_the_command_id_outcome_and_key() -> None:
    command = as_received(commands.command("AuthorizeCard", destination="a", reply_to="r",
                                           aggregate_type="Order", aggregate_id="42")).message
    assert command is not None
    success = commands.reply_for(command, {"auth": "ok"})
    assert success is not None
    assert (success.topic, success.aggregate_id, success.event_type) == (
        "r", "42", "AuthorizeCard.reply")
    reply = commands.Reply.of(as_received(success).message)  # type: ignore[arg-type]
    assert reply.command_id == command.id and reply.ok and reply.json() == {"auth": "ok"}
    failure = commands.reply_for(command, commands.Failure("card declined", {"code": 51}))
    assert failure is not None
    reply = commands.Reply.of(as_received(failure).message)  # type: ignore[arg-type]
    assert (reply.ok, reply.reason, reply.json()) == (False, "card declined", {"code": 51})
    one_way = as_received(commands.command("Notify", destination="a")).message
    assert one_way is not None and commands.reply_for(one_way, None) is None


def test_a_failure_needs_a_reason() -> None:
    with pytest.raises(InvalidEventError):
        commands.Failure("")


# -- handlers on the consumer ------------------------------------------------------------------


class Harness:
    def __init__(self, **options: Any) -> None:
        self.store = MemoryInbox("accounting")
        self.consumer = Consumer(name="accounting", kafka=KAFKA, topics=["a"], db=self.store,
                                 retry=FAST, **options)
        self.stop = threading.Event()

    def run(self, items: list[Received]) -> BatchReport:
        return SyncDriver(self.store, self.consumer, self.stop).run(items)

    def replies(self) -> list[commands.Reply]:
        return [commands.Reply.of(as_received(e).message)  # type: ignore[arg-type]
                for e in self.store.effects if isinstance(e, Event)]


def command_record(n: int, reply_to: str | None = "r") -> Received:
    return as_received(commands.command("AuthorizeCard", {"n": n}, destination="a",
                                        reply_to=reply_to), offset=n)


def test_the_reply_is_written_with_the_handlers_writes_and_only_once() -> None:
    h = Harness()

    @h.consumer.command("AuthorizeCard", outbox=MemoryOutbox())
    def authorize(session: MemorySession, message: Message) -> Any:
        n = message.json()["n"]
        session.add(n)
        return commands.Failure("declined") if n % 2 else {"n": n}

    items = [command_record(n) for n in range(4)]
    assert h.run(items).count(Outcome.PROCESSED) == 4
    assert h.store.commits == 1  # the writes, the replies and the dedup rows together
    replies = h.replies()
    assert [r.command_id for r in replies] == [i.event_id for i in items]
    assert [r.ok for r in replies] == [True, False, True, False]
    # Redelivered: duplicates, no second reply.
    assert h.run(items).count(Outcome.DUPLICATE) == 4
    assert len(h.replies()) == 4


def test_a_one_way_command_has_no_reply() -> None:
    h = Harness()
    h.consumer.command("AuthorizeCard", outbox=MemoryOutbox())(
        lambda session, message: session.add("done"))
    assert h.run([command_record(0, reply_to=None)]).count(Outcome.PROCESSED) == 1
    assert h.store.effects == ["done"]


def test_a_command_whose_handler_keeps_failing_gets_a_failure_reply_and_a_dead_letter() -> None:
    committed: list[Message] = []
    h = Harness(on_commit=committed.extend)

    @h.consumer.command("AuthorizeCard", outbox=MemoryOutbox())
    def authorize(session: MemorySession, message: Message) -> None:
        session.add("lost")
        raise RuntimeError("bank unreachable")

    items = [command_record(0)]
    report = h.run(items)
    assert report.outcomes == {0: Outcome.DEAD_LETTER}
    assert [d.attempts for d in report.dead_letters] == [3]
    [reply] = h.replies()
    assert reply.command_id == items[0].event_id and not reply.ok
    assert reply.reason is not None and "bank unreachable" in reply.reason
    assert "lost" not in h.store.effects and committed == []
    # Redelivered after the failure reply committed: handled already, nothing more.
    report = h.run(items)
    assert report.outcomes == {0: Outcome.DUPLICATE} and report.dead_letters == []
    assert len(h.replies()) == 1


def test_an_event_that_is_not_a_command_is_dead_lettered_at_once_without_reply() -> None:
    h = Harness()
    h.consumer.command("AuthorizeCard", outbox=MemoryOutbox())(lambda s, m: None)
    event = Event("Order", "1", "AuthorizeCard", {"n": 1}, topic="a")
    report = h.run([as_received(event)])
    assert report.outcomes == {0: Outcome.DEAD_LETTER}
    assert [d.attempts for d in report.dead_letters] == [1]
    assert h.replies() == []


def test_reply_handlers_get_the_command_id_and_waiters_wake_after_the_commit() -> None:
    h = Harness()
    got: list[commands.Reply] = []

    @h.consumer.reply("AuthorizeCard")
    def on_reply(session: MemorySession, reply: commands.Reply) -> None:
        got.append(reply)
        session.add(reply.command_id)

    command = command_record(0).message
    assert command is not None
    reply_event = commands.reply_for(command, {"ok": 1})
    assert reply_event is not None

    async def scenario() -> commands.Reply:
        waiting = asyncio.ensure_future(h.consumer.commands.wait_for_reply(command.id, 5))
        thread = threading.Thread(target=h.run, args=([as_received(reply_event)],))
        # Scheduled after the waiter's first step, which registers it.
        asyncio.get_running_loop().call_soon(thread.start)
        result = await waiting
        thread.join()
        return result

    reply = asyncio.run(scenario())
    assert reply.command_id == command.id and [r.command_id for r in got] == [command.id]
    assert h.store.effects == [command.id]
    # Asked after it came in: the recent replies answer.
    assert asyncio.run(h.consumer.commands.wait_for_reply(command.id, 0.01)) == reply
    with pytest.raises(TimeoutError):
        asyncio.run(h.consumer.commands.wait_for_reply(uuid.uuid4(), 0.01))


def test_command_and_reply_need_types() -> None:
    from outbox.errors import ConfigurationError

    h = Harness()
    with pytest.raises(ConfigurationError):
        h.consumer.command()
    with pytest.raises(ConfigurationError):
        h.consumer.reply()
    with pytest.raises(ConfigurationError):
        h.consumer.reply("")(lambda s, r: None)


def test_a_failure_reply_whose_commit_is_lost_is_written_again_once() -> None:
    h = Harness()

    @h.consumer.command("AuthorizeCard", outbox=MemoryOutbox())
    def authorize(session: MemorySession, message: Message) -> None:
        raise RuntimeError("bank unreachable")

    # The handler's tries never commit: the next commit is the failure reply's.
    h.store.fail_next["commit"] = True
    report = h.run([command_record(0)])
    assert report.store_retries == 1
    assert report.outcomes == {0: Outcome.DEAD_LETTER} and len(report.dead_letters) == 1
    assert [r.ok for r in h.replies()] == [False]
