"""A decoder, without I/O, of PostgreSQL's pgoutput logical replication messages (protocol 1-2)."""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from dataclasses import dataclass

from relay.wal.errors import PgOutputDecodeError, UnknownMessageError

# Reference: PostgreSQL manual, "Logical Replication Message Formats" (protocol versions 1 and 2;
# version 3 adds only the two-phase messages, which this relay never requests). Every integer
# is big-endian; strings are NUL-terminated; timestamps are microseconds since 2000-01-01 UTC.

_I16 = struct.Struct(">h")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time
_STREAM_COMMIT = struct.Struct(">IBQQq")  # xid, then as _COMMIT
_STREAM_START = struct.Struct(">IB")  # xid, first-segment flag
_STREAM_ABORT = struct.Struct(">II")  # xid, subtransaction xid
_MESSAGE_HEAD = struct.Struct(">BQ")  # flags, LSN
_TRUNCATE_HEAD = struct.Struct(">iB")  # relation count, options
_COLUMN_TYPE = struct.Struct(">Ii")  # type OID, type modifier
_Q = struct.Struct(">Q")

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
PG_EPOCH_UNIX = 946_684_800  # PG_EPOCH as a Unix time

# The message classes are slotted dataclasses but not frozen: they are built once per change
# (a million times in a backlog) and a frozen dataclass costs three times as much to build.
# Treat them as immutable all the same.

# Column kinds inside TupleData.
KIND_TEXT = "t"
KIND_BINARY = "b"
KIND_NULL = "n"
KIND_UNCHANGED_TOAST = "u"

_TRUNCATE_CASCADE = 1
_TRUNCATE_RESTART_IDENTITY = 2
_MESSAGE_TRANSACTIONAL = 1


def pg_timestamp(microseconds: int) -> dt.datetime:
    """A protocol timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + dt.timedelta(microseconds=microseconds)


@dataclass(slots=True)
class TupleData:
    """The columns of one row: `kinds[i]` is t (text), b (binary), n (null) or u (unchanged
    TOAST value, not sent); `values[i]` holds the bytes for t and b, else None."""

    kinds: str
    values: tuple[bytes | None, ...]


@dataclass(slots=True)
class Begin:
    final_lsn: int
    commit_time_us: int
    xid: int

    @property
    def commit_time(self) -> dt.datetime:
        return pg_timestamp(self.commit_time_us)


@dataclass(slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int

    @property
    def commit_time(self) -> dt.datetime:
        return pg_timestamp(self.commit_time_us)


@dataclass(slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(slots=True)
class RelationColumn:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]
    xid: int | None = None


@dataclass(slots=True)
class Type:
    oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(slots=True)
class Insert:
    relation_oid: int
    new: TupleData
    xid: int | None = None


@dataclass(slots=True)
class Update:
    relation_oid: int
    new: TupleData
    old: TupleData | None = None  # the whole old row (REPLICA IDENTITY FULL)
    key: TupleData | None = None  # the old key, when the key changed
    xid: int | None = None


@dataclass(slots=True)
class Delete:
    relation_oid: int
    old: TupleData | None = None
    key: TupleData | None = None
    xid: int | None = None


@dataclass(slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None = None


@dataclass(slots=True)
class Message:
    """A logical decoding message (pg_logical_emit_message)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(slots=True)
class StreamStop:
    pass


@dataclass(slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int


@dataclass(slots=True)
class StreamAbort:
    xid: int
    subxid: int


PgOutputMessage = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message
    | StreamStart | StreamStop | StreamCommit | StreamAbort
)

Buffer = bytes | memoryview


def decode(data: Buffer, *, streamed: bool = False) -> PgOutputMessage:
    """Decode one pgoutput message (the payload of one XLogData frame).

    `streamed` tells that the message lies between Stream Start and Stream Stop: there, the
    data messages carry the transaction id first. `PgOutputParser` tracks that for you.
    """
    if type(data) is not bytes:
        # One copy of the frame is cheaper than slicing a memoryview and copying each value.
        data = bytes(data)
    if not data:
        raise PgOutputDecodeError("empty pgoutput message")
    kind = data[0]
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise _unknown(kind)
    try:
        return decoder(data, streamed)
    except (struct.error, IndexError, ValueError) as exc:  # ValueError: bad UTF-8 among others
        raise PgOutputDecodeError(
            f"malformed pgoutput {chr(kind)!r} message of {len(data)} bytes: {exc}"
        ) from exc


class PgOutputParser:
    """Decodes a pgoutput stream in order, remembering whether a streamed block is open."""

    __slots__ = ("_streamed",)

    def __init__(self) -> None:
        self._streamed = False

    @property
    def in_stream_block(self) -> bool:
        return self._streamed

    def decode(self, data: Buffer) -> PgOutputMessage:
        message = decode(data, streamed=self._streamed)
        kind = type(message)
        if kind is StreamStart or kind is StreamStop:  # one type test per message: the hot path
            self._streamed = kind is StreamStart
        return message


# -- the message decoders ----------------------------------------------------------------------

_TWO_PHASE = {ord("b"), ord("P"), ord("K"), ord("r"), ord("p")}


def _unknown(kind: int) -> UnknownMessageError:
    if kind in _TWO_PHASE:
        return UnknownMessageError(
            f"pgoutput sent a two-phase commit message {chr(kind)!r}; this relay does not "
            "request two_phase, so the slot was probably created with two_phase enabled: "
            "create the relay's slot without it"
        )
    shown = repr(chr(kind)) if 32 <= kind < 127 else f"0x{kind:02x}"
    return UnknownMessageError(
        f"unknown pgoutput message type {shown}: the server speaks a protocol version this "
        "relay does not decode (it requests proto_version 1)"
    )


def _cstring(data: bytes, offset: int) -> tuple[str, int]:
    """The NUL-terminated UTF-8 string at `offset`, and the offset after its NUL."""
    end = data.find(0, offset)
    if end < 0:
        raise PgOutputDecodeError("a string in a pgoutput message has no terminating NUL")
    return data[offset:end].decode(), end + 1


def _tuple(data: bytes, offset: int) -> tuple[TupleData, int]:
    count = (data[offset] << 8) | data[offset + 1]  # Int16; above 1664 columns is impossible
    if count > 0x7FFF:
        raise PgOutputDecodeError(f"tuple data with a negative column count {count - 0x10000}")
    offset += 2
    kinds = bytearray(count)
    values: list[bytes | None] = []
    append = values.append
    unpack_length = _U32.unpack_from
    # The hot loop of the relay: one pass per column of every inserted row.
    for index in range(count):
        kind = kinds[index] = data[offset]
        if kind == 0x62 or kind == 0x74:  # 'b' binary, 't' text: Int32 length, then bytes
            start = offset + 5
            offset = start + unpack_length(data, offset + 1)[0]
            append(data[start:offset])
        elif kind == 0x6E or kind == 0x75:  # 'n' null, 'u' unchanged TOAST: no value
            offset += 1
            append(None)
        else:
            raise PgOutputDecodeError(f"unknown column kind 0x{kind:02x} in tuple data")
    if offset > len(data):
        raise PgOutputDecodeError("a column value runs past the end of the message")
    return TupleData(kinds.decode("ascii"), tuple(values)), offset


def _xid(data: bytes, streamed: bool) -> tuple[int | None, int]:
    if streamed:
        return _U32.unpack_from(data, 1)[0], 5
    return None, 1


def _begin(data: bytes, streamed: bool) -> Begin:
    final_lsn, commit_time, xid = _BEGIN.unpack_from(data, 1)
    return Begin(final_lsn, commit_time, xid)


def _commit(data: bytes, streamed: bool) -> Commit:
    flags, commit_lsn, end_lsn, commit_time = _COMMIT.unpack_from(data, 1)
    return Commit(flags, commit_lsn, end_lsn, commit_time)


def _origin(data: bytes, streamed: bool) -> Origin:
    (commit_lsn,) = _Q.unpack_from(data, 1)
    name, _ = _cstring(data, 9)
    return Origin(commit_lsn, name)


def _relation(data: bytes, streamed: bool) -> Relation:
    xid, offset = _xid(data, streamed)
    (oid,) = _U32.unpack_from(data, offset)
    namespace, offset = _cstring(data, offset + 4)
    name, offset = _cstring(data, offset)
    identity = chr(data[offset])
    (count,) = _I16.unpack_from(data, offset + 1)
    if count < 0:
        raise PgOutputDecodeError(f"a Relation message with a negative column count {count}")
    offset += 3
    columns = []
    for _ in range(count):
        flags = data[offset]
        column, offset = _cstring(data, offset + 1)
        type_oid, modifier = _COLUMN_TYPE.unpack_from(data, offset)
        offset += 8
        columns.append(RelationColumn(column, type_oid, modifier, bool(flags & 1)))
    return Relation(oid, namespace, name, identity, tuple(columns), xid)


def _type(data: bytes, streamed: bool) -> Type:
    xid, offset = _xid(data, streamed)
    (oid,) = _U32.unpack_from(data, offset)
    namespace, offset = _cstring(data, offset + 4)
    name, _ = _cstring(data, offset)
    return Type(oid, namespace, name, xid)


def _insert(data: bytes, streamed: bool) -> Insert:
    if streamed:
        xid: int | None = _U32.unpack_from(data, 1)[0]
        offset = 5
    else:
        xid, offset = None, 1
    (oid,) = _U32.unpack_from(data, offset)
    if data[offset + 4] != 0x4E:  # 'N'
        raise PgOutputDecodeError("an Insert message does not carry a new tuple ('N')")
    new, _ = _tuple(data, offset + 5)
    return Insert(oid, new, xid)


def _update(data: bytes, streamed: bool) -> Update:
    xid, offset = _xid(data, streamed)
    (oid,) = _U32.unpack_from(data, offset)
    offset += 4
    old = key = None
    marker = data[offset]
    if marker == 0x4F:  # 'O': the old row
        old, offset = _tuple(data, offset + 1)
        marker = data[offset]
    elif marker == 0x4B:  # 'K': the old key
        key, offset = _tuple(data, offset + 1)
        marker = data[offset]
    if marker != 0x4E:
        raise PgOutputDecodeError("an Update message does not carry a new tuple ('N')")
    new, _ = _tuple(data, offset + 1)
    return Update(oid, new, old, key, xid)


def _delete(data: bytes, streamed: bool) -> Delete:
    xid, offset = _xid(data, streamed)
    (oid,) = _U32.unpack_from(data, offset)
    marker = data[offset + 4]
    row, _ = _tuple(data, offset + 5)
    if marker == 0x4F:
        return Delete(oid, old=row, xid=xid)
    if marker == 0x4B:
        return Delete(oid, key=row, xid=xid)
    raise PgOutputDecodeError(f"a Delete message has an unknown tuple marker 0x{marker:02x}")


def _truncate(data: bytes, streamed: bool) -> Truncate:
    xid, offset = _xid(data, streamed)
    count, options = _TRUNCATE_HEAD.unpack_from(data, offset)
    oids = struct.unpack_from(f">{count}I", data, offset + 5)
    return Truncate(
        oids,
        bool(options & _TRUNCATE_CASCADE),
        bool(options & _TRUNCATE_RESTART_IDENTITY),
        xid,
    )


def _message(data: bytes, streamed: bool) -> Message:
    xid, offset = _xid(data, streamed)
    flags, lsn = _MESSAGE_HEAD.unpack_from(data, offset)
    prefix, offset = _cstring(data, offset + 9)
    (length,) = _U32.unpack_from(data, offset)
    offset += 4
    if offset + length > len(data):
        raise PgOutputDecodeError("a logical decoding message runs past the end of its frame")
    content = data[offset : offset + length]
    return Message(bool(flags & _MESSAGE_TRANSACTIONAL), lsn, prefix, content, xid)


def _stream_start(data: bytes, streamed: bool) -> StreamStart:
    xid, first = _STREAM_START.unpack_from(data, 1)
    return StreamStart(xid, bool(first))


def _stream_stop(data: bytes, streamed: bool) -> StreamStop:
    return StreamStop()


def _stream_commit(data: bytes, streamed: bool) -> StreamCommit:
    return StreamCommit(*_STREAM_COMMIT.unpack_from(data, 1))


def _stream_abort(data: bytes, streamed: bool) -> StreamAbort:
    return StreamAbort(*_STREAM_ABORT.unpack_from(data, 1))


_DECODERS: dict[int, Callable[[bytes, bool], PgOutputMessage]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("S"): _stream_start,
    ord("E"): _stream_stop,
    ord("c"): _stream_commit,
    ord("A"): _stream_abort,
}
