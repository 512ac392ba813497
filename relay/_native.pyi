"""Types of the compiled hot path (native/src/lib.rs), built by `make native` with cargo."""

from collections.abc import Callable, Sequence
from typing import Any

CALL: int
BYTES: int
TEXT: int
JSONB: int
TIMESTAMP: int
UUID: int

class RowReader:
    def __init__(
        self,
        plan: Sequence[tuple[int, int, Callable[[bytes], Any]]],
        required: Sequence[bool],
        defaults: Sequence[Any],
        record_type: type,
        tuple_new: Callable[..., Any],
        uuid_from_int: Callable[[int], Any],
        utc: Any,
        uuid_fast: tuple[type, Any] | None = None,
    ) -> None: ...
    def read(self, data: bytes, offset: int) -> Any: ...

class HeaderBuilder:
    def __init__(self, uuid_type: type, fields: tuple[int, int, int, int, int]) -> None: ...
    def __call__(self, record: tuple[Any, ...]) -> list[tuple[str, str | bytes | None]]: ...

class MessageReader:
    def __init__(
        self,
        record_type: type,
        tuple_new: Callable[..., Any],
        no_headers: Any,
        uuid_from_int: Callable[[int], Any],
        utc: Any,
        uuid_fast: tuple[type, Any] | None = None,
    ) -> None: ...
    def read(self, content: bytes) -> Any: ...
