"""Commands and replies on the consumer: `@consumer.command(type)` handlers, whose return value is
written as the reply through the outbox in the handler's own transaction (the one that holds the
command's dedup row), and `@consumer.reply(type)` handlers, which apply replies exactly once.

A command handler is registered as an ordinary handler of the command's type, wrapped: the
consumer's engine claims the dedup row, calls the wrapper, commits; so a redelivered command is
a duplicate and writes no second reply. When a command's handler fails for good (its message is
dead-lettered), the engine asks for the command's "last word" (`failure_reply`) in a transaction
of its own that claims the dedup row and writes a failure reply, before the dead letter goes out:
the sender never waits on silence.

Sync and asyncio alike: a wrapper has the flavour of the function it wraps (the consumer checks
it as any handler), and so does the failure reply it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import CollectionInvalid

from outbox import commands as wire
from outbox import mongo as outbox_mongo
from outbox import sql_blocks
from outbox.consumer.errors import RejectMessage
from outbox.consumer.message import Message
from outbox.errors import ConfigurationError, InvalidEventError, SchemaMissingError
from outbox.event import Event
from outbox.writer import Outbox

log = logging.getLogger("outbox.consumer")

# Replies kept for `wait_for_reply` callers that ask after the reply came in.
RECENT_REPLIES = 10_000

Register = Callable[[Sequence[str], Any], Any]
# Where replies are written: None is the default of the consumer's database (outbox.Outbox()
# for PostgreSQL, outbox.mongo.MongoOutbox() for MongoDB).
Writer = Outbox | outbox_mongo.MongoOutbox | None


def _reject(exc: InvalidEventError) -> RejectMessage:
    # Not a command / not a reply: no retry can cure it, dead-letter at once.
    return RejectMessage(str(exc))


class CommandRoutes:
    """The command and reply handlers of one consumer, and the replies awaited in-process."""

    def __init__(self, register: Register) -> None:
        self._register = register
        self._outboxes: dict[str, Writer] = {}  # by command type handled here
        # The consumer's MongoDB database (mongo=), where replies go through outbox.mongo.
        self.database: Any = None
        self._reply_types: set[str] = set()
        self._lock = threading.Lock()
        self._waiters: dict[uuid.UUID, list[asyncio.Future[wire.Reply]]] = {}
        self._recent: OrderedDict[uuid.UUID, wire.Reply] = OrderedDict()

    # -- registration ------------------------------------------------------------------------------

    def command(self, command_types: Sequence[str], function: Callable[..., Any],
                outbox: Writer) -> Callable[..., Any]:
        writer = outbox
        if writer is not None and not isinstance(writer, Outbox | outbox_mongo.MongoOutbox):
            raise ConfigurationError(
                f"outbox= must be an outbox.Outbox or outbox.mongo.MongoOutbox, not {writer!r}")
        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(function):

            async def handle_async(handle: Any, message: Message) -> None:
                result = await function(handle, _checked_command(message))
                reply = wire.reply_for(message, result)
                if reply is not None:
                    await self._write(writer, handle, reply)

            wrapper = handle_async
        else:

            def handle(handle: Any, message: Message) -> None:
                result = function(handle, _checked_command(message))
                reply = wire.reply_for(message, result)
                if reply is not None:
                    self._write(writer, handle, reply)

            wrapper = handle
        wrapper.__name__ = getattr(function, "__name__", "command_handler")
        self._register(command_types, wrapper)
        for command_type in command_types:
            self._outboxes[command_type] = writer
        return function

    def reply(self, command_types: Sequence[str], function: Callable[..., Any]
              ) -> Callable[..., Any]:
        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(function):

            async def apply_async(handle: Any, message: Message) -> None:
                await function(handle, _reply(message))

            wrapper = apply_async
        else:

            def apply(handle: Any, message: Message) -> None:
                function(handle, _reply(message))

            wrapper = apply
        wrapper.__name__ = getattr(function, "__name__", "reply_handler")
        reply_types = [wire.reply_event_type(t) for t in _types(command_types)]
        self._register(reply_types, wrapper)
        self._reply_types.update(reply_types)
        return function

    @property
    def handles_commands(self) -> bool:
        return bool(self._outboxes)

    # -- the engine's questions ------------------------------------------------------------------

    def has_failure_reply(self, message: Message) -> bool:
        """Whether a dead-lettered `message` needs a failure reply first: a command handled
        here that names a reply topic."""
        return (message.event_type in self._outboxes and wire.is_command(message)
                and bool(message.headers.get(wire.REPLY_TO)))

    def failure_reply(self, handle: Any, message: Message, reason: str) -> Any:
        """Write the failure reply of a dead-lettered command in `handle`'s transaction; an
        awaitable for an asyncio handle (as `Outbox.publish`)."""
        writer = self._outboxes[message.event_type]
        reply = wire.reply_for(message, wire.Failure(f"dead-lettered: {reason}"))
        assert reply is not None  # has_failure_reply checked reply_to
        log.warning("command failed for good: failure reply", extra={
            "event": "command_failure_reply", "event_id": str(message.id),
            "event_type": message.event_type, "reason": reason,
        })
        return self._write(writer, handle, reply)

    def _write(self, writer: Writer, handle: Any, reply: Event) -> Any:
        """Write `reply` in `handle`'s transaction (an awaitable for an asyncio handle)."""
        if isinstance(handle, ClientSession):
            mongo = writer if isinstance(writer, outbox_mongo.MongoOutbox) else None
            return (mongo or outbox_mongo.default_outbox).publish(
                self.database, reply, session=handle)
        return (writer if isinstance(writer, Outbox) else default_pg_outbox()).publish(
            handle, reply)

    def committed(self, messages: Sequence[Message]) -> None:
        """After a commit: wake whoever awaits the replies it applied."""
        if not self._reply_types:
            return
        for message in messages:
            if message.event_type not in self._reply_types:
                continue
            try:
                reply = wire.Reply.of(message)
            except InvalidEventError:
                continue
            with self._lock:
                self._recent[reply.command_id] = reply
                while len(self._recent) > RECENT_REPLIES:
                    self._recent.popitem(last=False)
                waiters = self._waiters.pop(reply.command_id, [])
            for future in waiters:
                try:
                    future.get_loop().call_soon_threadsafe(_resolve, future, reply)
                except RuntimeError:
                    # The waiter's event loop is closed: nobody is left to tell, and the
                    # commit that applied the reply must not fail for it.
                    continue

    # -- in-process request/response --------------------------------------------------------------

    async def wait_for_reply(self, command_id: uuid.UUID, timeout: float) -> wire.Reply:
        """The reply to `command_id` once this consumer has applied it (TimeoutError after
        `timeout` seconds). Only replies of types with a `@consumer.reply` handler are seen,
        and only by this process: the durable way to act on a reply is the reply handler."""
        if not self._reply_types:
            raise ConfigurationError("wait_for_reply needs a @consumer.reply handler")
        future: asyncio.Future[wire.Reply] = asyncio.get_running_loop().create_future()
        with self._lock:
            known = self._recent.get(command_id)
            if known is not None:
                return known
            self._waiters.setdefault(command_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            with self._lock:
                waiting = self._waiters.get(command_id, [])
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._waiters.pop(command_id, None)

    # -- start-up --------------------------------------------------------------------------------

    def check_statements(self, handle: Any) -> list[str]:
        """The statements that prove the outbox tables of the command handlers are there, for
        the transaction `handle`. On MongoDB: the outbox collection is made if missing (a
        transaction may not create it), and the asyncio consumer is refused."""
        writers = list(dict.fromkeys(self._outboxes.values()))
        if isinstance(handle, AsyncClientSession):
            raise ConfigurationError(
                "AsyncConsumer with mongo= cannot handle commands: their replies are written "
                "with outbox.mongo, which is synchronous; use Consumer (it can apply replies)"
            )
        if isinstance(handle, ClientSession):
            if any(isinstance(w, Outbox) for w in writers):
                raise ConfigurationError("a MongoDB consumer writes replies with an "
                                         "outbox.mongo.MongoOutbox, not an outbox.Outbox")
            assert isinstance(self.database, Database)
            for writer in writers:
                mongo = writer if isinstance(writer, outbox_mongo.MongoOutbox) else None
                name = (mongo or outbox_mongo.default_outbox).collection
                if name not in self.database.list_collection_names():
                    # Made meanwhile by another process: as good.
                    with contextlib.suppress(CollectionInvalid):
                        self.database.create_collection(name)
            return []
        checks = []
        for writer in writers:
            if isinstance(writer, outbox_mongo.MongoOutbox):
                raise ConfigurationError("a PostgreSQL consumer writes replies with an "
                                         "outbox.Outbox, not an outbox.mongo.MongoOutbox")
            pg = writer or default_pg_outbox()
            if pg.mode == "table":
                checks.append(_check_table(pg))
        return checks


def default_pg_outbox() -> Outbox:
    # Read at call time: an application may set outbox.writer.default_outbox at start-up.
    from outbox import writer

    return writer.default_outbox


def _types(command_types: Sequence[str]) -> Sequence[str]:
    for command_type in command_types:
        if not isinstance(command_type, str) or not command_type:
            raise ConfigurationError(f"command type {command_type!r} must be a non-empty string")
    return command_types


def _resolve(future: asyncio.Future[wire.Reply], reply: wire.Reply) -> None:
    if not future.done():
        future.set_result(reply)


def _checked_command(message: Message) -> Message:
    try:
        wire.check_command(message)
    except InvalidEventError as exc:
        raise _reject(exc) from exc
    return message


def _reply(message: Message) -> wire.Reply:
    try:
        return wire.Reply.of(message)
    except InvalidEventError as exc:
        raise _reject(exc) from exc


def _check_table(pg: Outbox) -> str:
    relation = sql.Identifier(pg.schema, pg.table).as_string(None)
    return sql_blocks.block("outbox", "writer.sql", "check_table").format(
        relation=sql.Literal(relation)).as_string(None)


def _execute(handle: Any, statement: str) -> Any:
    """Run `statement` on a psycopg connection or a SQLAlchemy session (an awaitable for
    asyncio ones)."""
    if isinstance(handle, psycopg.Connection | psycopg.AsyncConnection):
        return handle.execute(statement)
    from sqlalchemy import text

    return handle.execute(text(statement))


def _missing(exc: BaseException) -> bool:
    from outbox.consumer.store_rules import UNDEFINED_TABLE, sqlstate

    return sqlstate(exc) == UNDEFINED_TABLE


_MISSING = ("command handlers reply through the outbox, and this database has no outbox table: "
            "run `outbox migrate up --db URL` on the command handlers' database")
_DENIED = ("command handlers reply through the outbox, and the consumer's role may not INSERT "
           "into the outbox table: give its login the writer's right too (deploy/roles.sql: "
           "GRANT <prefix>_app TO the consumer's login)")


def _checked(allowed: Any) -> None:
    if not allowed:
        raise ConfigurationError(_DENIED)


def check(routes: CommandRoutes, begin: Callable[[], Any]) -> None:
    """At start-up: the outbox the replies go to exists in the consumer's database, and the
    consumer may write into it."""
    if not routes.handles_commands:
        return
    tx = begin()
    try:
        for statement in routes.check_statements(tx.handle):
            try:
                result = _execute(tx.handle, statement)
            except Exception as exc:
                if _missing(exc):
                    raise SchemaMissingError(_MISSING) from exc
                raise
            if isinstance(tx.handle, psycopg.Connection):
                row = result.fetchone()
                _checked(row and row[0])
            else:
                _checked(result.scalar())
    finally:
        tx.rollback()


async def check_async(routes: CommandRoutes, begin: Callable[[], Awaitable[Any]]) -> None:
    """`check` for the asyncio consumer."""
    if not routes.handles_commands:
        return
    tx = await begin()
    try:
        for statement in routes.check_statements(tx.handle):
            try:
                result = await _execute(tx.handle, statement)
            except Exception as exc:
                if _missing(exc):
                    raise SchemaMissingError(_MISSING) from exc
                raise
            if isinstance(tx.handle, psycopg.AsyncConnection):
                row = await result.fetchone()
                _checked(row and row[0])
            else:
                _checked(result.scalar())  # SQLAlchemy's result is buffered: not awaited
    finally:
        await tx.rollback()
