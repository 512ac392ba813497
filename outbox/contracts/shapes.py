"""Dataclass events without pydantic: their JSON Schema, and a checked conversion to and from
JSON values (no I/O).

Deliberately small: the field types an event needs (str, int, float, bool, None, Any, list[T],
dict[str, T], unions, Literal, Enum, datetime, date, UUID, Decimal, nested dataclasses). Any
other annotation is refused when the class is declared, not when the first event is sent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any

from outbox.errors import ConfigurationError, InvalidEventError


class EventValidationError(InvalidEventError):
    """The event does not match its declared type; nothing was written."""


_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as exc:
        raise ConfigurationError(
            f"the annotations of {cls.__qualname__} cannot be resolved: {exc}"
        ) from exc


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    # Cached: resolving the annotations costs more than converting a whole event.
    hints = _hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


# -- JSON Schema ------------------------------------------------------------------------------


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of dataclass `cls`; nested dataclasses go to `$defs`."""
    defs: dict[str, dict[str, Any]] = {}
    schema = _object_schema(cls, defs)
    if defs:
        schema["$defs"] = defs
    return schema


def _object_schema(cls: type, defs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    properties = {f.name: _schema(tp, defs, f"{cls.__qualname__}.{f.name}")
                  for f, tp in _fields(cls)}
    schema: dict[str, Any] = {"title": cls.__name__, "type": "object", "properties": properties}
    required = [f.name for f, _ in _fields(cls) if _required(f)]
    if required:
        schema["required"] = required
    return schema


def _schema(tp: Any, defs: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    if tp is Any:
        return {}
    if tp is None or tp is type(None):
        return {"type": "null"}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if tp is dt.datetime:
        return {"type": "string", "format": "date-time"}
    if tp is dt.date:
        return {"type": "string", "format": "date"}
    if tp is uuid.UUID:
        return {"type": "string", "format": "uuid"}
    if tp is decimal.Decimal:
        return {"type": "string", "pattern": r"^-?\d+(\.\d+)?$"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [member.value for member in tp]}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: a dataclass may refer to itself
            defs[name] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{name}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": _schema(args[0], defs, where)}
    if origin is dict and len(args) == 2 and args[0] is str:
        return {"type": "object", "additionalProperties": _schema(args[1], defs, where)}
    if _is_union(tp):
        return {"anyOf": [_schema(arg, defs, where) for arg in args]}
    raise ConfigurationError(
        f"{where}: the type {tp!r} is not supported in a dataclass event; use str, int, float, "
        "bool, None, Any, list[T], dict[str, T], a union, Literal, an Enum, datetime, date, UUID, "
        "Decimal or another dataclass (or a pydantic model)"
    )


# -- values -------------------------------------------------------------------------------------


def dump(value: Any) -> dict[str, Any]:
    """The JSON object of dataclass instance `value`, checked against its annotations."""
    return typing.cast(dict[str, Any], _convert(value, type(value), "", dumping=True))


def load(cls: type, data: Any) -> Any:
    """An instance of dataclass `cls` from a decoded JSON value; EventValidationError says which
    field is wrong. Unknown keys are ignored (a newer writer may have added fields)."""
    return _convert(data, cls, "", dumping=False)


def _fail(path: str, expected: str, value: Any) -> EventValidationError:
    where = path or "the payload"
    return EventValidationError(
        f"{where}: expected {expected}, got {type(value).__name__} {_short(value)}"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def _convert(value: Any, tp: Any, path: str, *, dumping: bool) -> Any:
    """One walk for both directions: `dumping` turns Python values into JSON ones, otherwise
    JSON values into Python ones; either way each value is checked against `tp`."""
    if tp is Any:
        return value
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise _fail(path, "null", value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, "a boolean", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(path, "an integer", value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _fail(path, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(path, "a string", value)
    for python_type, parse, expected in _TEXT_TYPES:
        if tp is python_type:
            if dumping:
                if isinstance(value, python_type) and _aware(value):
                    return str(value) if python_type is not dt.datetime else value.isoformat()
                raise _fail(path, expected, value)
            if isinstance(value, str):
                try:
                    parsed = parse(value)
                except (ValueError, ArithmeticError):
                    raise _fail(path, expected, value) from None
                if _aware(parsed):
                    return parsed
            raise _fail(path, expected, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if dumping:
            if isinstance(value, tp):
                return value.value
        else:
            try:
                return tp(value)
            except ValueError:
                pass
        raise _fail(path, f"one of {[m.value for m in tp]}", value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _convert_object(value, tp, path, dumping=dumping)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and True in args and 1 in args):
            return value
        raise _fail(path, f"one of {list(args)}", value)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(path, "an array", value)
        return [_convert(item, args[0], _join(path, i), dumping=dumping)
                for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _fail(path, "an object with string keys", value)
        return {k: _convert(v, args[1], _join(path, k), dumping=dumping)
                for k, v in value.items()}
    if _is_union(tp):
        errors = []
        for arg in args:
            try:
                return _convert(value, arg, path, dumping=dumping)
            except EventValidationError as exc:
                errors.append(str(exc))
        raise EventValidationError(" / ".join(errors))
    raise _fail(path, repr(tp), value)  # unreachable for declared classes: checked by json_schema


def _convert_object(value: Any, cls: type, path: str, *, dumping: bool) -> Any:
    fields = _fields(cls)
    if dumping:
        if type(value) is not cls:
            raise _fail(path, cls.__name__, value)
        return {f.name: _convert(getattr(value, f.name), tp, _join(path, f.name), dumping=True)
                for f, tp in fields}
    if not isinstance(value, dict):
        raise _fail(path, f"an object ({cls.__name__})", value)
    kwargs = {}
    for f, tp in fields:
        if f.name in value:
            kwargs[f.name] = _convert(value[f.name], tp, _join(path, f.name), dumping=False)
        elif _required(f):
            raise EventValidationError(f"{_join(path, f.name)}: the field is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ check of the application's own
        raise EventValidationError(f"{path or cls.__name__}: {exc}") from exc


def _aware(value: Any) -> bool:
    # A naive datetime would be read back in whatever zone the consumer runs in.
    return not isinstance(value, dt.datetime) or value.tzinfo is not None


_TEXT_TYPES: tuple[tuple[type, Callable[[str], Any], str], ...] = (
    (dt.datetime, dt.datetime.fromisoformat, "a timezone-aware ISO 8601 date-time"),
    (dt.date, dt.date.fromisoformat, "an ISO 8601 date"),
    (uuid.UUID, uuid.UUID, "a UUID"),
    (decimal.Decimal, decimal.Decimal, "a decimal number as a string"),
)
