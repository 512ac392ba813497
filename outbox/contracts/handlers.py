"""Typed handlers: `@consumer.handler(OrderCreated)` gets the model instead of the raw message.

The handler the consumer registers is a wrapper that picks the declared class by the event's
`event_version` header, decodes and validates the payload, and calls the application's
function with the instance. A payload that does not fit, or a version no class here declares,
raises `RejectMessage`: dead-lettered at once (no retry can cure it) with the validation error
as the dead letter's reason.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from outbox.consumer.errors import RejectMessage
from outbox.consumer.message import Message
from outbox.contracts.registry import VERSION_HEADER, EventType, entry_of, registry_of
from outbox.contracts.shapes import EventValidationError
from outbox.contracts.wire import JSON_SCHEMA_CONTENT_TYPE, json_body
from outbox.errors import ConfigurationError


def entries_for(classes: Sequence[type]) -> list[EventType]:
    entries = []
    for cls in classes:
        entry = entry_of(cls)
        if entry is None:
            raise ConfigurationError(
                f"{getattr(cls, '__qualname__', cls)!r} is not declared with @outbox.event_type")
        entries.append(entry)
    return entries


def _wants_message(function: Callable[..., Any]) -> bool:
    """(session, event) or (session, event, message): told by the function's parameters."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


class TypedDispatch:
    """Chooses the declared class of a message and decodes it (no I/O)."""

    def __init__(self, entries: Sequence[EventType]) -> None:
        self.by_name: dict[str, dict[int, EventType]] = {}
        for entry in entries:
            self.by_name.setdefault(entry.name, {})[entry.version] = entry

    def decode(self, message: Message) -> Any:
        versions = self.by_name.get(message.event_type, {})
        raw = message.headers.get(VERSION_HEADER)
        if raw is None:
            # From a writer that predates typed events: only one declared shape can be meant.
            if len(versions) != 1:
                raise RejectMessage(
                    f"{message.event_type} without an {VERSION_HEADER} header, and this handler "
                    f"takes versions {sorted(versions)}")
            entry = next(iter(versions.values()))
        else:
            try:
                entry = versions[int(raw)]
            except (ValueError, KeyError):
                raise RejectMessage(
                    f"{message.event_type} {VERSION_HEADER} {raw[:20]!r} is unknown here "
                    f"(this handler takes versions {sorted(versions)})") from None
        try:
            payload = message.payload
            if message.content_type == JSON_SCHEMA_CONTENT_TYPE:
                # Written by SchemaRegistryFormats.json: the model checks it, no registry needed.
                payload = json_body(payload)
            return entry.decode(payload)
        except EventValidationError as exc:
            raise RejectMessage(
                f"invalid {entry.name} v{entry.version} ({entry.model.__qualname__}): {exc}"
            ) from exc


def typed_handler(
    classes: Sequence[type], function: Callable[..., Any], consumer: str
) -> tuple[list[str], Callable[..., Any]]:
    """(event type names, the handler to register) for `function` handling `classes`."""
    entries = entries_for(classes)
    dispatch = TypedDispatch(entries)
    with_message = _wants_message(function)
    for entry in entries:
        registry = registry_of(entry.model)
        if registry is not None:
            registry.note_consumed(entry, consumer)

    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(function):
        async def async_wrapper(session: Any, message: Message) -> None:
            event = dispatch.decode(message)
            if with_message:
                await function(session, event, message)
            else:
                await function(session, event)

        wrapper = async_wrapper
    else:
        def sync_wrapper(session: Any, message: Message) -> None:
            event = dispatch.decode(message)
            if with_message:
                function(session, event, message)
            else:
                function(session, event)

        wrapper = sync_wrapper
    functools.update_wrapper(wrapper, function)
    # update_wrapper copies __wrapped__, which would make inspect see the original (sync or
    # async) signature; the consumer checks the wrapper itself.
    wrapper.__dict__.pop("__wrapped__", None)
    return list(dispatch.by_name), wrapper
