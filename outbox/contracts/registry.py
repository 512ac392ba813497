"""Typed events: classes declared as events of an aggregate (`@outbox.event_type`), the registry
that knows them, and the conversion between a model instance and an `outbox.Event` (no I/O).

A declared class is a pydantic model (pydantic 2, the `outbox-relay[pydantic]` extra) or a
dataclass (no dependency; `outbox.contracts.shapes` checks it). Its version travels in the
event's own header `event_version`, so a consumer can tell the shapes of one type apart.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from outbox.contracts import shapes
from outbox.contracts.shapes import EventValidationError
from outbox.errors import ConfigurationError, InvalidEventError

VERSION_HEADER = "event_version"

T = TypeVar("T", bound=type)

Kind = Literal["pydantic", "dataclass"]


def _pydantic_base() -> type | None:
    # Never imported here: a class can only be a pydantic model if pydantic is already loaded.
    module = sys.modules.get("pydantic")
    base = getattr(module, "BaseModel", None)
    return base if isinstance(base, type) else None


def _kind(cls: type) -> Kind:
    base = _pydantic_base()
    if base is not None and issubclass(cls, base):
        if not hasattr(cls, "model_json_schema"):
            raise ConfigurationError(f"{cls.__qualname__}: typed events need pydantic 2")
        return "pydantic"
    if dataclasses.is_dataclass(cls):
        return "dataclass"
    raise ConfigurationError(
        f"{cls.__qualname__} is neither a pydantic model nor a dataclass; "
        "@outbox.event_type declares one of those"
    )


@dataclass(frozen=True)
class EventType:
    """What the registry knows of one declared class."""

    name: str
    aggregate: str
    version: int
    model: type
    kind: Kind
    id_field: str | None = None
    description: str | None = None

    # -- JSON ----------------------------------------------------------------------------------

    def json_schema(self) -> dict[str, Any]:
        if self.kind == "pydantic":
            schema: dict[str, Any] = self.model.model_json_schema()  # type: ignore[attr-defined]
            return schema
        return shapes.json_schema(self.model)

    def dump(self, instance: Any) -> Any:
        """The JSON value of `instance`, validated: what a consumer of this type will accept."""
        if not isinstance(instance, self.model):
            raise InvalidEventError(
                f"expected a {self.model.__qualname__}, got {type(instance).__name__}")
        try:
            if self.kind == "dataclass":
                return shapes.dump(instance)
            data = typing.cast(Any, instance).model_dump(mode="json")
            # A model changed after construction (no validate_assignment) may no longer be
            # valid: checking its dump is what the consumer will do with the payload.
            self.load(data)
            return data
        except EventValidationError as exc:
            raise EventValidationError(
                f"invalid {self.name} v{self.version} ({self.model.__qualname__}): {exc}"
            ) from exc

    def load(self, data: Any) -> Any:
        """An instance from a decoded JSON value; EventValidationError when it does not fit."""
        if self.kind == "dataclass":
            return shapes.load(self.model, data)
        try:
            return self.model.model_validate(data)  # type: ignore[attr-defined]
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise EventValidationError(_pydantic_errors(exc)) from exc

    def decode(self, payload: bytes) -> Any:
        try:
            data = json.loads(payload)
        except ValueError as exc:
            raise EventValidationError(f"the payload is not valid JSON: {exc}") from exc
        return self.load(data)

    # -- events --------------------------------------------------------------------------------

    def aggregate_id_of(self, instance: Any) -> str:
        if self.id_field is None:
            raise InvalidEventError(
                f"{self.name} declares no id_field: pass aggregate_id= to outbox.Event.of"
            )
        value = getattr(instance, self.id_field)
        if value is None or isinstance(value, bool) or value == "":
            raise InvalidEventError(
                f"{self.name}.{self.id_field} (the aggregate id) is {value!r}")
        return str(value)


def _field_names(entry: EventType) -> set[str]:
    if entry.kind == "dataclass":
        return {f.name for f in dataclasses.fields(entry.model)}
    return set(getattr(entry.model, "model_fields", {}))


def _pydantic_errors(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "the payload"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


@dataclass
class EventRegistry:
    """The event types an application publishes and consumes.

    `outbox.event_type` registers into the module-level `default_registry`; an application that
    wants its own (several services in one process, tests) makes one and uses its
    `event_type` method. `consumed` notes what typed handlers handle, for the AsyncAPI document.
    """

    title: str = "outbox events"
    _by_class: dict[type, EventType] = field(default_factory=dict, repr=False)
    _by_name: dict[tuple[str, int], EventType] = field(default_factory=dict, repr=False)
    consumed: dict[tuple[str, int], set[str]] = field(default_factory=dict, repr=False)

    def event_type(
        self,
        name: str,
        *,
        aggregate: str,
        version: int = 1,
        id_field: str | None = None,
        description: str | None = None,
    ) -> Callable[[T], T]:
        """Declare the decorated pydantic model or dataclass as the event `name` (version
        `version`) of aggregate type `aggregate`. `id_field` names the field that holds the
        aggregate id, so `outbox.publish(conn, model)` needs nothing else."""
        for label, value in (("name", name), ("aggregate", aggregate)):
            if not isinstance(value, str) or not value or value.isspace():
                raise ConfigurationError(f"event_type {label} must be a non-empty string")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigurationError(f"event_type version={version!r} must be an integer >= 1")

        def declare(cls: T) -> T:
            self.register(EventType(name, aggregate, version, cls, _kind(cls), id_field,
                                    description or _doc(cls)))
            return cls

        return declare

    def register(self, entry: EventType) -> None:
        key = (entry.name, entry.version)
        if entry.model in _ENTRIES:
            # One declaration per class: `publish(conn, model)` must know which one applies.
            raise ConfigurationError(f"{entry.model.__qualname__} is already an event type")
        if key in self._by_name:
            raise ConfigurationError(
                f"{entry.name} version {entry.version} is already declared "
                f"(by {self._by_name[key].model.__qualname__})")
        if entry.id_field is not None and entry.id_field not in _field_names(entry):
            raise ConfigurationError(
                f"{entry.model.__qualname__}: id_field={entry.id_field!r} is not one of its fields")
        # Built now, so an unsupported field type fails when the class is declared.
        try:
            entry.json_schema()
        except ConfigurationError:
            raise
        except Exception as exc:  # pydantic's own, e.g. a forward reference not yet defined
            raise ConfigurationError(
                f"{entry.model.__qualname__}: its JSON Schema cannot be built: {exc}") from exc
        self._by_class[entry.model] = entry
        self._by_name[key] = entry
        # Where instances find their entry without being told the registry.
        _ENTRIES[entry.model] = entry
        _REGISTRIES[entry.model] = self

    def entry(self, model: type) -> EventType:
        try:
            return self._by_class[model]
        except KeyError:
            raise ConfigurationError(
                f"{model.__qualname__} is not declared in this registry") from None

    def get(self, name: str, version: int) -> EventType | None:
        return self._by_name.get((name, version))

    def note_consumed(self, entry: EventType, consumer: str) -> None:
        self.consumed.setdefault((entry.name, entry.version), set()).add(consumer)

    def __iter__(self) -> Iterator[EventType]:
        return iter(sorted(self._by_name.values(), key=lambda e: (e.aggregate, e.name, e.version)))

    def __len__(self) -> int:
        return len(self._by_name)


# Every declared class, whichever registry it is in: `outbox.publish(conn, model)` needs it.
_ENTRIES: dict[type, EventType] = {}
_REGISTRIES: dict[type, EventRegistry] = {}


def _doc(cls: type) -> str | None:
    doc = cls.__doc__
    # A dataclass without a docstring gets a generated signature as its __doc__.
    if not doc or (dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}(")):
        return None
    return " ".join(doc.split())


default_registry = EventRegistry()


# `@outbox.event_type(...)`: declare a class in the default registry.
event_type = default_registry.event_type


def entry_of(model: type) -> EventType | None:
    return _ENTRIES.get(model)


def registry_of(model: type) -> EventRegistry | None:
    return _REGISTRIES.get(model)


def event_fields(
    instance: Any,
    aggregate_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[EventType, str, Any, dict[str, str]]:
    """(entry, aggregate id, JSON payload, headers) of a model instance: what `Event.of` needs."""
    entry = _ENTRIES.get(type(instance))
    if entry is None:
        raise InvalidEventError(
            f"expected outbox.Event or an instance of a class declared with "
            f"@outbox.event_type, got {type(instance).__name__}")
    payload = entry.dump(instance)
    if aggregate_id is None:
        aggregate_id = entry.aggregate_id_of(instance)
    merged = dict(headers or {})
    merged[VERSION_HEADER] = str(entry.version)
    return entry, aggregate_id, payload, merged
