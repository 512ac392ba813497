"""Turns decoded pgoutput messages into outbox events, transaction by transaction, without I/O."""

from __future__ import annotations

import datetime as dt
import json
import logging
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple, cast

import relay.native
from outbox.columns import ColumnMapping
from outbox.errors import ConfigurationError, InvalidEventError
from outbox.event import BYTES_CONTENT_TYPE, JSON_CONTENT_TYPE, TEXT_CONTENT_TYPE
from outbox.identifiers import check_identifier
from outbox.ids import UUID_BY_SLOTS, uuid_from_int, uuid_from_text
from outbox.record import OutboxRecord, decode_message
from relay.wal.errors import PgOutputDecodeError, WalError
from relay.wal.pgoutput import (
    PG_EPOCH,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
)

logger = logging.getLogger(__name__)

# The compiled row reader (relay/native.py) when it is built, else None: the pure-Python reader
# below does the same work. Tests set it to None to run both on the same cases
# (tests/unit/test_pgoutput_decoder.py).
native: Any = relay.native.module

# Without streaming (the relay never asks for it), pgoutput sends a transaction only after it
# committed, whole and in commit order; so an event may be published as soon as it is decoded,
# and nothing of a large transaction has to be held in memory. The slot may be acknowledged up
# to a transaction's `WalCommit.end_lsn` only once all of its events, and all earlier ones, are.

# Items are cheap to build: one is made per event. WalEvent is a named tuple; the others are
# slotted dataclasses, not frozen ones (a frozen dataclass costs three times as much to build).
# Treat them all as immutable.


class WalEvent(NamedTuple):
    """An outbox event of a committed transaction; `lsn` is its change's (or message's) LSN."""

    record: OutboxRecord
    xid: int
    lsn: int


@dataclass(slots=True)
class WalRejected:
    """A change of the outbox that is not a valid event: park it with `reason`, do not publish.

    `raw` holds what was read: the row's columns (text or binary form, as sent) or, for a
    logical decoding message, `{"content": ...}`.
    """

    xid: int
    lsn: int
    source: str
    reason: str
    raw: Mapping[str, bytes | None] = field(default_factory=dict)


@dataclass(slots=True)
class WalCommit:
    """The end of a transaction. Acknowledge `end_lsn` once every event before it is in Kafka."""

    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int
    events: int
    rejected: int
    # Changes of the outbox not read: the transaction was acknowledged before (skip_below).
    skipped: int = 0


WalItem = WalEvent | WalRejected | WalCommit


# -- column values -----------------------------------------------------------------------------
# A converter turns one column value (bytes, in the form its kind says: 'b' binary send format,
# 't' text output) into an event field. Converters are chosen once per relation version and
# pattern of column kinds, so the per-row work is a list of plain calls. Types are known by OID
# (pg_type.dat); a type not listed here is read as text, which is right for text-like types and
# domains over them in both forms.

_BYTEA, _INT8, _INT2, _INT4, _JSON = 17, 20, 21, 23, 114
_TIMESTAMP, _TIMESTAMPTZ, _UUID, _JSONB = 1114, 1184, 2950, 3802
_INTEGERS = (_INT2, _INT4, _INT8)
_INFINITY = (2**63 - 1, -(2**63))

Converter = Callable[[Any], Any]
_json_decode = json.JSONDecoder().decode
_UUID_TYPE = uuid.UUID


def _identity(raw: bytes) -> bytes:
    return raw


def _jsonb_binary(raw: bytes) -> bytes:
    if raw[:1] != b"\x01":
        raise ValueError(f"jsonb binary format version {raw[:1]!r} is not supported")
    return raw[1:]


def _bytea_text(raw: bytes) -> bytes:
    if raw[:2] != b"\\x":
        raise ValueError("bytea in escape format; use binary mode or bytea_output = 'hex'")
    return bytes.fromhex(raw[2:].decode("ascii"))


def _uuid_binary(raw: bytes) -> uuid.UUID:
    if len(raw) != 16:
        raise ValueError("a binary uuid needs 16 bytes")
    return uuid_from_int(int.from_bytes(raw))


def _uuid_text(raw: bytes) -> uuid.UUID:
    return uuid_from_text(raw.decode())


def _int_text(raw: bytes) -> str:
    return str(int.from_bytes(raw, "big", signed=True))


def _uuid_string(raw: bytes) -> str:
    return str(_UUID_TYPE(bytes=raw))


def _headers(text: str) -> dict[str, str]:
    value = _json_decode(text)
    if type(value) is not dict:
        raise ValueError("headers must be a JSON object of strings")
    for item in value.values():
        if type(item) is not str:
            raise ValueError("headers must be a JSON object of strings")
    return value


# Most events of a service carry the same few header sets: parse each set once. Bounded; the
# records share one read-only view of each set, so no event can change another's headers.
_HEADERS_MEMO: dict[bytes, Mapping[str, str]] = {}
_HEADERS_MEMO_SIZE = 1024
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def _memo_headers(raw: bytes, text: Callable[[bytes], str]) -> Mapping[str, str]:
    found = _HEADERS_MEMO.get(raw)
    if found is None:
        parsed = _headers(text(raw))
        found = MappingProxyType(parsed) if parsed else _NO_HEADERS
        if len(_HEADERS_MEMO) >= _HEADERS_MEMO_SIZE:
            _HEADERS_MEMO.clear()
        _HEADERS_MEMO[raw] = found
    return found


def _jsonb_text(raw: bytes) -> str:
    return _jsonb_binary(raw).decode()


def _headers_jsonb(raw: bytes) -> Mapping[str, str]:
    return _memo_headers(raw, _jsonb_text)


def _headers_text(raw: bytes) -> Mapping[str, str]:
    return _memo_headers(raw, bytes.decode)


def _timestamp_binary(raw: bytes) -> dt.datetime | None:
    micros = int.from_bytes(raw, "big", signed=True)
    if micros in _INFINITY:
        return None
    return PG_EPOCH + dt.timedelta(0, 0, micros)


def _timestamp_text(raw: bytes) -> dt.datetime | None:
    text = raw.decode()
    if text in ("infinity", "-infinity"):
        return None
    value = dt.datetime.fromisoformat(text)
    # timestamp without time zone: the outbox writes UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _converter(name: str, type_oid: int, binary: bool) -> Converter:
    """How to read event field `name` from a column of type `type_oid` sent in that form."""
    if name == "id":
        return _uuid_binary if binary and type_oid == _UUID else _uuid_text
    if name == "payload":
        if type_oid == _BYTEA:
            return _identity if binary else _bytea_text
        return _jsonb_binary if binary and type_oid == _JSONB else _identity
    if name == "headers":
        return _headers_jsonb if binary and type_oid == _JSONB else _headers_text
    if name == "created_at":
        if binary and type_oid in (_TIMESTAMPTZ, _TIMESTAMP):
            return _timestamp_binary
        return _timestamp_text
    if binary and type_oid in _INTEGERS:
        return _int_text
    if binary and type_oid == _UUID:
        return _uuid_string
    if binary and type_oid == _JSONB:
        return _jsonb_text
    return bytes.decode


# OutboxRecord's fields in the order of its constructor (records are built positionally, the
# cheapest call); every event needs the first five, the others have defaults in the table.
_RECORD_FIELDS = OutboxRecord._fields
_REQUIRED = frozenset(("id", "aggregate_type", "aggregate_id", "event_type", "payload"))
# At most this many patterns of null columns are remembered per table version.
_MAX_READERS = 64

Fields = tuple[tuple[int, Converter], ...]
"""(column index, converter) of each OutboxRecord field, in field order."""


class Reader:
    """Reads an OutboxRecord from a row's column values: one straight call per field."""

    __slots__ = ("fields", "read")

    def __init__(self, fields: Fields) -> None:
        self.fields = fields
        self.read = _compile(fields)


_new_tuple = tuple.__new__


def _compile(fields: Fields) -> Callable[[tuple[bytes | None, ...]], OutboxRecord]:
    # Unrolled for the nine fields of OutboxRecord (tests/unit/test_pgoutput_decoder.py checks
    # the count): per row, no loop, no list, and the tuple made without the named tuple's
    # Python-level __new__. This runs once per event.
    (i0, c0), (i1, c1), (i2, c2), (i3, c3), (i4, c4), (i5, c5), (i6, c6), (i7, c7), (i8, c8) = (
        fields
    )

    def read(values: tuple[bytes | None, ...]) -> OutboxRecord:
        return _new_tuple(OutboxRecord, (
            c0(values[i0]), c1(values[i1]), c2(values[i2]), c3(values[i3]), c4(values[i4]),
            c5(values[i5]), c6(values[i6]), c7(values[i7]), c8(values[i8]),
        ))

    return read


def _constant(value: Any) -> Converter:
    return lambda _raw: value


def _empty_headers(_raw: Any) -> Mapping[str, str]:
    return _NO_HEADERS


def _default_content_type(payload_oid: int | None) -> str:
    if payload_oid in (_JSON, _JSONB):
        return JSON_CONTENT_TYPE
    if payload_oid == _BYTEA or payload_oid is None:
        return BYTES_CONTENT_TYPE
    return TEXT_CONTENT_TYPE


FastReader = Callable[[bytes, int], OutboxRecord | None]
_U32 = struct.Struct(">I")


def _fast_reader(
    count: int, columns: Mapping[str, tuple[int, int]], default_content_type: str
) -> FastReader:
    """Reads a record straight from an Insert message's bytes (the tuple at `offset`) when
    every column comes in binary form or null, the relay's usual case: one pass, no TupleData.
    Returns None when it cannot (text or unchanged-TOAST columns, a required column null, a
    short message): the caller then takes the general path, which also says what is wrong.
    """
    slots = [-1] * count  # the record field of each column, -1 for columns it does not use
    converters: list[Converter] = [_identity] * count
    for slot, name in enumerate(_RECORD_FIELDS):
        if name in columns:
            index, type_oid = columns[name]
            slots[index], converters[index] = slot, _converter(name, type_oid, True)
    plan = tuple(zip(slots, converters, strict=True))
    required = frozenset(i for i, name in enumerate(_RECORD_FIELDS) if name in _REQUIRED)
    defaults: list[Any] = [
        default_content_type if name == "content_type"
        else _NO_HEADERS if name == "headers" else None
        for name in _RECORD_FIELDS
    ]
    if native is not None:
        return _native_reader(plan, required, defaults)
    unpack_length = _U32.unpack_from

    def read(data: bytes, offset: int) -> OutboxRecord | None:
        if ((data[offset] << 8) | data[offset + 1]) != count:
            return None
        offset += 2
        values = defaults.copy()
        for slot, convert in plan:
            kind = data[offset]
            if kind == 0x62:  # 'b': Int32 length, then the value in binary form
                start = offset + 5
                offset = start + unpack_length(data, offset + 1)[0]
                if slot >= 0:
                    values[slot] = convert(data[start:offset])
            elif kind == 0x6E and slot not in required:  # 'n': null
                offset += 1
            else:
                return None
        if offset > len(data):
            return None
        return _new_tuple(OutboxRecord, values)

    return read


def _native_codes() -> dict[Converter, int]:
    """The converters the compiled reader does itself (the others it calls)."""
    assert native is not None
    return {_identity: native.BYTES, bytes.decode: native.TEXT, _jsonb_binary: native.JSONB,
            _timestamp_binary: native.TIMESTAMP, _uuid_binary: native.UUID}


def _native_reader(
    plan: tuple[tuple[int, Converter], ...], required: frozenset[int], defaults: list[Any]
) -> FastReader:
    """The same reader, compiled (native/src/lib.rs): the same records, None in the same cases
    (its own conversions decline what the Python converters would raise on), the same errors
    from the converters it calls."""
    assert native is not None
    codes = _native_codes()
    columns = [(slot, codes.get(convert, native.CALL), convert) for slot, convert in plan]
    # Ids as outbox.ids builds them: by their slots where that was checked to work here.
    uuid_fast = (uuid.UUID, uuid.SafeUUID.unknown) if UUID_BY_SLOTS else None
    return cast(FastReader, native.RowReader(
        columns, [slot in required for slot in range(len(defaults))], defaults, OutboxRecord,
        _new_tuple, uuid_from_int, dt.UTC, uuid_fast).read)


def _native_message_reader() -> Callable[[bytes], OutboxRecord | None] | None:
    """The compiled reader of table-less events (native/src/lib.rs `MessageReader`): the
    writer's shape only, the same record `decode_message` makes; None when it is not built."""
    if native is None:
        return None
    uuid_fast = (uuid.UUID, uuid.SafeUUID.unknown) if UUID_BY_SLOTS else None
    reader = native.MessageReader(
        OutboxRecord, _new_tuple, OutboxRecord._field_defaults["headers"], uuid_from_int,
        dt.UTC, uuid_fast)
    return cast(Callable[[bytes], OutboxRecord | None], reader.read)


class _TablePlan:
    """How to read events from the rows of one version (Relation message) of the outbox table."""

    __slots__ = ("column_names", "columns", "default_content_type", "fast_read", "problem",
                 "readers", "source")

    def __init__(self, relation: Relation, mapping: ColumnMapping) -> None:
        self.source = f"{relation.namespace}.{relation.name}"
        self.column_names = tuple(column.name for column in relation.columns)
        position = {name: i for i, name in enumerate(self.column_names)}
        # event field -> (column index, type OID) for the mapped columns the table has
        self.columns: dict[str, tuple[int, int]] = {}
        missing = []
        for name, column in mapping.present().items():
            if column in position:
                index = position[column]
                self.columns[name] = (index, relation.columns[index].type_oid)
            elif name in _REQUIRED:
                missing.append(column)
        payload = self.columns.get("payload")
        self.default_content_type = _default_content_type(payload[1] if payload else None)
        self.problem = None
        if missing:
            self.problem = (
                f"{self.source} has no column {', '.join(repr(m) for m in missing)} (was the "
                "table altered?); the relay's column mapping needs it"
            )
        self.readers: dict[str, Reader | str] = {}
        self.fast_read = (
            None if self.problem else
            _fast_reader(len(relation.columns), self.columns, self.default_content_type)
        )

    def reader(self, kinds: str) -> Reader | str:
        """The converters for rows whose columns come in `kinds`, or why such rows are invalid."""
        found = self.readers.get(kinds)
        if found is None:
            if len(self.readers) >= _MAX_READERS:
                self.readers.clear()
            found = self.readers[kinds] = self._build(kinds)
        return found

    def _build(self, kinds: str) -> Reader | str:
        if self.problem is not None:
            return self.problem
        fields: list[tuple[int, Converter]] = []
        for name in _RECORD_FIELDS:
            index, type_oid = self.columns.get(name, (-1, 0))
            kind = kinds[index] if 0 <= index < len(kinds) else "n"
            if kind == "n" or index < 0:
                if name in _REQUIRED:
                    return f"column for {name!r} of {self.source} cannot be read: it is null"
                if name == "content_type":
                    fields.append((0, _constant(self.default_content_type)))
                elif name == "headers":
                    fields.append((0, _empty_headers))
                else:
                    fields.append((0, _constant(None)))
            elif kind == "u":
                return f"column for {name!r} of {self.source} was not sent (unchanged TOAST)"
            else:
                fields.append((index, _converter(name, type_oid, kind == "b")))
        return Reader(tuple(fields))

    def explain(self, reader: Reader, values: tuple[bytes | None, ...]) -> str:
        """Which field of a row could not be read, and why (the slow path, for rejects only)."""
        for name, (index, convert) in zip(_RECORD_FIELDS, reader.fields, strict=True):
            try:
                convert(values[index])
            except (ValueError, TypeError, IndexError) as exc:
                return f"column for {name!r} of {self.source} cannot be read: {exc}"
        return f"a row of {self.source} is not a valid event"


# -- the decoder -------------------------------------------------------------------------------


class OutboxDecoder:
    """Feeds on (lsn, pgoutput message) pairs in stream order; returns the outbox item, if any.

    table: the outbox table (`schema.table`) whose inserts are events, or None (table-less).
    message_prefix: the prefix of logical decoding messages that are events, or None.
    Updates, deletes, truncates, other tables and other prefixes are ignored. A Relation
    message replaces what is known of a table's columns, so ALTER TABLE while streaming is
    followed.
    """

    def __init__(
        self,
        *,
        schema: str = "public",
        table: str | None = "outbox",
        columns: ColumnMapping | None = None,
        message_prefix: str | None = "outbox",
    ) -> None:
        check_identifier(schema, "schema")
        if table is not None:
            check_identifier(table, "table")
        if table is None and message_prefix is None:
            raise ConfigurationError("set a table, a message_prefix, or both: nothing to read")
        if message_prefix is not None and (not message_prefix or "\x00" in message_prefix):
            raise ConfigurationError("message_prefix must be a non-empty string without NUL")
        self.table = (schema, table) if table is not None else None
        self.columns = columns or ColumnMapping()
        self.message_prefix = message_prefix
        # Relation OID -> how to read it; None for relations that are not the outbox table.
        self._relations: dict[int, _TablePlan | None] = {}
        self._xid: int | None = None
        self._read_message = _native_message_reader() if message_prefix is not None else None
        self._events = 0
        self._rejected = 0
        self.last_commit_end = 0
        # Transactions whose commit starts below this LSN are in Kafka already (relay/wal/
        # position.py): their changes are dropped. While one is read, its xid is here and not
        # in _xid, which sends its inserts off the fast path to where they are dropped: the
        # usual path pays nothing per event for this.
        self.skip_below = 0
        self._skipping: int | None = None
        self._skipped = 0

    @property
    def in_transaction(self) -> bool:
        return self._xid is not None or self._skipping is not None

    def feed(self, lsn: int, message: PgOutputMessage) -> WalItem | None:
        # Most frequent first: this runs once per change.
        if isinstance(message, Insert):
            return self._insert(lsn, message)
        if isinstance(message, Message):
            return self._message(lsn, message)
        if isinstance(message, Begin):
            if self.in_transaction:
                raise PgOutputDecodeError(
                    f"transaction {message.xid} began inside transaction "
                    f"{self._xid if self._xid is not None else self._skipping}"
                )
            self._events = self._rejected = self._skipped = 0
            if message.final_lsn < self.skip_below:
                self._skipping = message.xid
            else:
                self._xid = message.xid
            return None
        if isinstance(message, Commit):
            return self._commit(message)
        if isinstance(message, Relation):
            self._relation(message)
            return None
        if isinstance(message, Update | Delete | Origin | Type):
            return None
        if isinstance(message, Truncate):
            if any(self._relations.get(oid) for oid in message.relation_oids):
                logger.info(
                    "the outbox table was truncated; its events were already read",
                    extra={"action": "wal.decoder.truncate"},
                )
            return None
        if isinstance(message, StreamStart | StreamStop | StreamCommit | StreamAbort):
            raise WalError(
                "the server streams an in-progress transaction, but the relay does not request "
                "streaming (it could publish events of a transaction that then aborts)"
            )
        raise PgOutputDecodeError(f"unexpected pgoutput message {message!r}")

    # -- transactions ------------------------------------------------------------------------------

    def _current_xid(self, what: str) -> int:
        if self._xid is None:
            raise PgOutputDecodeError(f"{what} arrived outside a transaction")
        return self._xid

    def _commit(self, message: Commit) -> WalCommit:
        if self._skipping is not None:
            xid, self._skipping = self._skipping, None
        else:
            xid = self._current_xid("a Commit")
            self._xid = None
        self.last_commit_end = message.end_lsn
        return WalCommit(
            xid,
            message.commit_lsn,
            message.end_lsn,
            message.commit_time_us,
            self._events,
            self._rejected,
            self._skipped,
        )

    def _skip(self, what: str) -> None:
        """A change outside `_xid`: dropped in a skipped transaction, else an error."""
        if self._skipping is None:
            raise PgOutputDecodeError(f"{what} arrived outside a transaction")
        self._skipped += 1

    # -- table mode --------------------------------------------------------------------------------

    def _relation(self, relation: Relation) -> None:
        if self.table != (relation.namespace, relation.name):
            self._relations[relation.oid] = None
            return
        plan = _TablePlan(relation, self.columns)
        previous = self._relations.get(relation.oid)
        if previous is not None and previous.column_names != plan.column_names:
            logger.info(
                "columns of %s changed: %s",
                plan.source,
                ", ".join(plan.column_names),
                extra={"action": "wal.decoder.relation_changed"},
            )
        if plan.problem:
            logger.error(plan.problem, extra={"action": "wal.decoder.relation_unusable"})
        self._relations[relation.oid] = plan

    def _insert(self, lsn: int, message: Insert) -> WalItem | None:
        try:
            plan = self._relations[message.relation_oid]
        except KeyError:
            raise PgOutputDecodeError(
                f"an Insert into relation {message.relation_oid} came before its Relation message"
            ) from None
        if plan is None:
            return None
        xid = self._xid
        if xid is None:
            self._skip("an Insert")
            return None
        row = message.new
        reader = plan.readers.get(row.kinds) or plan.reader(row.kinds)
        if type(reader) is str:
            return self._reject(xid, lsn, plan.source, reader, _raw_row(plan, row))
        assert not isinstance(reader, str)
        values = row.values
        try:
            record = reader.read(values)
        except (ValueError, TypeError, IndexError):
            reason = plan.explain(reader, values)
            return self._reject(xid, lsn, plan.source, reason, _raw_row(plan, row))
        self._events += 1
        return _new_tuple(WalEvent, (record, xid, lsn))

    def feed_insert(
        self, lsn: int, data: bytes, decode: Callable[[bytes], PgOutputMessage]
    ) -> WalItem | None:
        """An Insert message outside a streamed block, as bytes: the usual row is read straight
        from them; any other goes through `decode` and `feed`, which handle every case."""
        plan = self._relations.get(_U32.unpack_from(data, 1)[0])
        xid = self._xid
        if plan is not None and plan.fast_read is not None and xid is not None and (
            data[5] == 0x4E  # 'N': a new tuple follows
        ):
            try:
                record = plan.fast_read(data, 6)
            except (ValueError, TypeError, IndexError, struct.error):
                record = None  # the general path says which column, and rejects the row
            if record is not None:
                self._events += 1
                return _new_tuple(WalEvent, (record, xid, lsn))
        return self.feed(lsn, decode(data))

    # -- table-less mode ---------------------------------------------------------------------------

    def _message(self, lsn: int, message: Message) -> WalItem | None:
        if message.prefix != self.message_prefix:
            return None
        if not message.transactional:
            # Emitted even if its transaction rolled back: publishing it could publish an event
            # of an aborted transaction. The outbox writer never emits these.
            logger.warning(
                "ignored a non-transactional logical decoding message with prefix %r at %X",
                message.prefix,
                lsn,
                extra={"action": "wal.decoder.non_transactional_message"},
            )
            return None
        xid = self._xid
        if xid is None:
            self._skip("a transactional message")
            return None
        content = message.content
        # The compiled reader takes the writer's own shape; anything else (and every error)
        # is the Python decoder's.
        read = self._read_message
        record = read(content) if read is not None and type(content) is bytes else None
        if record is None:
            try:
                record = decode_message(content)
            except InvalidEventError as exc:
                return self._reject(
                    xid, lsn, f"message {message.prefix}", str(exc), {"content": content})
        self._events += 1
        return _new_tuple(WalEvent, (record, xid, message.lsn or lsn))

    def _reject(
        self, xid: int, lsn: int, source: str, reason: str, raw: Mapping[str, bytes | None]
    ) -> WalRejected:
        self._rejected += 1
        return WalRejected(xid, lsn, source, reason, raw)


def _raw_row(plan: _TablePlan, row: TupleData) -> dict[str, bytes | None]:
    # Every column as sent, so that a parked row can be inspected and repaired.
    return dict(zip(plan.column_names, row.values, strict=False))
