"""Commands and replies over Kafka, through the outbox: asynchronous request/response.

A command is an `outbox.Event` with an explicit topic (its destination) and headers that say
what it is: `message_type: command`, `command_type`, `correlation_id` (the command's own id) and,
unless the command is one-way, `reply_to` (the topic its reply goes to). `send` records it in the
caller's transaction, as `outbox.publish` does, so a command exists if and only if its
transaction committed.

The receiving service handles it with `@consumer.command(type)` (outbox.consumer.commands): the
handler's return value becomes the reply, written through the receiver's outbox in the
handler's own transaction, with `message_type: reply`, `correlation_id` (the command id),
`command_type` and `reply_outcome` (`success` or `failure`). The sending service applies replies
with `@consumer.reply(type)`.

This module is the wire format and the sending side; it does no I/O of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack, overload

from outbox.errors import InvalidEventError
from outbox.event import Event
from outbox.ids import uuid7
from outbox.writer import Outbox, default_outbox

if TYPE_CHECKING:
    from outbox.consumer.message import Message
    from outbox.writer import AsyncTarget, SyncTarget

# Header names and values: the contract between sender, handler and reply handler.
MESSAGE_TYPE = "message_type"
COMMAND_TYPE = "command_type"
REPLY_TO = "reply_to"
CORRELATION_ID = "correlation_id"
REPLY_OUTCOME = "reply_outcome"
FAILURE_REASON = "failure_reason"
COMMAND = "command"
REPLY = "reply"
SUCCESS = "success"
FAILURE = "failure"
HEADERS = frozenset({MESSAGE_TYPE, COMMAND_TYPE, REPLY_TO, CORRELATION_ID, REPLY_OUTCOME,
                     FAILURE_REASON})
# Header values are short strings: a failure reason longer than this is cut.
MAX_REASON = 2000

Outcome = Literal["success", "failure"]


def reply_event_type(command_type: str) -> str:
    """The event type of the replies to `command_type` commands (what `@consumer.reply` routes
    on): `AuthorizeCard` -> `AuthorizeCard.reply`."""
    return f"{command_type}.reply"


def _own_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    own = dict(headers or {})
    taken = sorted(HEADERS & own.keys())
    if taken:
        raise InvalidEventError(f"headers {taken} are set by outbox.commands; choose other names")
    return own


class CommandOptions(TypedDict, total=False):
    """The optional arguments of `command` and `send`."""

    reply_to: str | None
    aggregate_type: str | None
    aggregate_id: str | None
    headers: Mapping[str, str] | None
    content_type: str | None


def command(
    command_type: str, payload: Any = None, *, destination: str,
    **options: Unpack[CommandOptions],
) -> Event:
    """The command as an outbox `Event`, for `send` or for writers that take events (e.g.
    `outbox.mongo.publish`). Raises InvalidEventError before anything is written.

    `destination` is the Kafka topic of the command; `reply_to` the topic its reply goes to
    (None: a one-way command, no reply). The Kafka key is `aggregate_id`, by default the
    command id: pass the id of the entity the command is about (an order id) to keep the
    commands about one entity, and their replies, in order. `aggregate_type` defaults to
    `command_type`; `headers` are the command's own (not the ones this module sets).
    """
    reply_to = options.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not reply_to):
        raise InvalidEventError(
            f"reply_to must be a non-empty topic name or None, got {reply_to!r}")
    if not isinstance(destination, str) or not destination:
        raise InvalidEventError(
            f"destination must be a non-empty topic name, got {destination!r}")
    command_id = uuid7()
    own = _own_headers(options.get("headers"))
    own[MESSAGE_TYPE] = COMMAND
    own[COMMAND_TYPE] = command_type
    own[CORRELATION_ID] = str(command_id)
    if reply_to is not None:
        own[REPLY_TO] = reply_to
    aggregate_type, aggregate_id = options.get("aggregate_type"), options.get("aggregate_id")
    return Event(
        aggregate_type=command_type if aggregate_type is None else aggregate_type,
        aggregate_id=str(command_id) if aggregate_id is None else aggregate_id,
        event_type=command_type,
        payload=payload,
        headers=own,
        topic=destination,
        content_type=options.get("content_type"),
        id=command_id,
    )


@overload
def send(target: SyncTarget, command_type: str, payload: Any = ..., *, destination: str,
         outbox: Outbox | None = ..., **options: Unpack[CommandOptions]) -> uuid.UUID: ...


@overload
def send(target: AsyncTarget, command_type: str, payload: Any = ..., *, destination: str,
         outbox: Outbox | None = ..., **options: Unpack[CommandOptions]
         ) -> Awaitable[uuid.UUID]: ...


def send(
    target: SyncTarget | AsyncTarget, command_type: str, payload: Any = None, *,
    destination: str, outbox: Outbox | None = None, **options: Unpack[CommandOptions],
) -> uuid.UUID | Awaitable[uuid.UUID]:
    """Record a command in `target`'s current transaction (as `outbox.publish`; never
    commits) and return its id, the `correlation_id` its reply will carry. For an asyncio
    target the result is awaitable. See `command` for the arguments; `outbox` is the
    configuration to write with (default `outbox.default_outbox`)."""
    event = command(command_type, payload, destination=destination, **options)
    written = (outbox or default_outbox).publish(target, event)
    if isinstance(written, list):
        return event.id
    return _after(written, event.id)


async def _after(written: Awaitable[object], command_id: uuid.UUID) -> uuid.UUID:
    await written
    return command_id


# -- what a command handler returns ---------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """Return it from a command handler to reply with a failure (the handler's writes are
    committed all the same: return it before writing anything if nothing should change).
    `reason` goes in the `failure_reason` header, `payload` is the reply's payload."""

    reason: str
    payload: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason:
            raise InvalidEventError(f"a Failure needs a non-empty reason, got {self.reason!r}")


def reply_for(command_message: Message, result: Any) -> Event | None:
    """The reply to `command_message` for a handler's `result` (a `Failure`, or the success
    payload), or None for a one-way command."""
    reply_to = command_message.headers.get(REPLY_TO)
    if not reply_to:
        return None
    command_type = command_message.headers.get(COMMAND_TYPE) or command_message.event_type
    headers = {
        MESSAGE_TYPE: REPLY,
        COMMAND_TYPE: command_type,
        CORRELATION_ID: str(command_message.id),
    }
    if isinstance(result, Failure):
        headers[REPLY_OUTCOME] = FAILURE
        headers[FAILURE_REASON] = result.reason[:MAX_REASON]
        payload = result.payload
    else:
        headers[REPLY_OUTCOME] = SUCCESS
        payload = result
    return Event(
        # The command's aggregate and key: the replies about one entity stay in order.
        aggregate_type=command_message.aggregate_type or command_type,
        aggregate_id=command_message.aggregate_id or str(command_message.id),
        event_type=reply_event_type(command_type),
        payload=payload,
        headers=headers,
        topic=reply_to,
    )


def is_command(message: Message) -> bool:
    return message.headers.get(MESSAGE_TYPE) == COMMAND


def check_command(message: Message) -> None:
    """Refuse a message that is not a command (it is dead-lettered): a plain event of the same
    type on the command topic has nobody to reply to and must not be taken for a command."""
    if not is_command(message):
        raise InvalidEventError(
            f"message {message.id} of type {message.event_type!r} is not a command (no header "
            f"{MESSAGE_TYPE}: {COMMAND}); send commands with outbox.commands.send"
        )


# -- what a reply handler receives ----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A reply as `@consumer.reply` handlers see it: `command_id` is the id `send` returned."""

    command_id: uuid.UUID
    command_type: str
    outcome: Outcome
    reason: str | None
    message: Message

    @property
    def ok(self) -> bool:
        return self.outcome == SUCCESS

    @property
    def payload(self) -> bytes:
        return self.message.payload

    def json(self) -> Any:
        return self.message.json()

    @classmethod
    def of(cls, message: Message) -> Reply:
        """Read a reply; raises InvalidEventError when `message` is not one."""
        headers = message.headers
        if headers.get(MESSAGE_TYPE) != REPLY:
            raise InvalidEventError(
                f"message {message.id} of type {message.event_type!r} is not a reply (no header "
                f"{MESSAGE_TYPE}: {REPLY})"
            )
        try:
            command_id = uuid.UUID(headers.get(CORRELATION_ID, ""))
        except ValueError:
            raise InvalidEventError(
                f"reply {message.id} has no valid {CORRELATION_ID} header: "
                f"{headers.get(CORRELATION_ID)!r}"
            ) from None
        outcome = headers.get(REPLY_OUTCOME)
        if outcome not in (SUCCESS, FAILURE):
            raise InvalidEventError(
                f"reply {message.id} has {REPLY_OUTCOME}={outcome!r}; expected success or failure"
            )
        return cls(
            command_id=command_id,
            command_type=headers.get(COMMAND_TYPE, ""),
            outcome="success" if outcome == SUCCESS else "failure",
            reason=headers.get(FAILURE_REASON),
            message=message,
        )


__all__ = [
    "COMMAND",
    "CORRELATION_ID",
    "CommandOptions",
    "Failure",
    "Reply",
    "command",
    "reply_event_type",
    "send",
]
