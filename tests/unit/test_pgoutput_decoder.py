"""OutboxDecoder: captured pgoutput streams (tests/unit/data) -> outbox events per transaction."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import uuid
from typing import Any

import pytest

from outbox.columns import ColumnMapping
from outbox.errors import ConfigurationError, InvalidEventError
from outbox.record import OutboxRecord, decode_message
from relay.wal import decoder as decoder_module
from relay.wal.decoder import OutboxDecoder, WalCommit, WalEvent, WalItem, WalRejected
from relay.wal.errors import PgOutputDecodeError, WalError
from relay.wal.pgoutput import (
    Begin,
    Commit,
    Insert,
    Message,
    PgOutputParser,
    Relation,
    TupleData,
)
from tests.unit.test_pgoutput import captures, frames


@pytest.fixture(autouse=True, params=["native", "python"])
def row_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the compiled row reader (native/, `make native`) and with the
    pure-Python one the decoder falls back to when it is not built: both give the same answers."""
    if request.param == "python":
        monkeypatch.setattr(decoder_module, "native", None)
    elif decoder_module.native is None:
        pytest.skip("the compiled row reader is not built (`make native` needs cargo)")
    return str(request.param)


def run(scenario: str, decoder: OutboxDecoder | None = None) -> list[WalItem]:
    decoder = decoder or OutboxDecoder()
    parser = PgOutputParser()
    items = []
    for lsn, frame in frames(scenario):
        item = decoder.feed(lsn, parser.decode(frame))
        if item is not None:
            items.append(item)
    assert not decoder.in_transaction
    return items


def run_raw(scenario: str, decoder: OutboxDecoder) -> list[WalItem]:
    """As the WAL source feeds the decoder: Insert messages as bytes (the fast path)."""
    parser = PgOutputParser()
    items = []
    for lsn, frame in frames(scenario):
        if frame[0] == ord("I") and not parser.in_stream_block:
            item = decoder.feed_insert(lsn, frame, parser.decode)
        else:
            item = decoder.feed(lsn, parser.decode(frame))
        if item is not None:
            items.append(item)
    return items


def expected(scenario: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = captures()[scenario]["events"]
    return events


def as_dict(record: OutboxRecord) -> dict[str, Any]:
    return {
        "id": str(record.id),
        "aggregate_type": record.aggregate_type,
        "aggregate_id": record.aggregate_id,
        "event_type": record.event_type,
        "payload_hex": record.payload.hex(),
        "content_type": record.content_type,
        "headers": dict(record.headers),
        "topic": record.topic,
        "created_at": record.created_at.isoformat() if record.created_at else None,
    }


def events(items: list[WalItem]) -> list[dict[str, Any]]:
    return [as_dict(item.record) for item in items if isinstance(item, WalEvent)]


def same_instant(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return dt.datetime.fromisoformat(recorded["created_at"]) == dt.datetime.fromisoformat(
        wanted["created_at"]
    )


@pytest.mark.parametrize("scenario", ["table_insert_binary", "table_insert_text"])
def test_inserted_rows_become_the_events_that_were_written(scenario: str) -> None:
    items = run(scenario)
    got, wanted = events(items), expected(scenario)
    assert len(got) == len(wanted) == 4
    for recorded, written in zip(got, wanted, strict=True):
        assert same_instant(recorded, written)
        assert {**recorded, "created_at": None} == {**written, "created_at": None}
    assert got[1]["topic"] == "orders.special"
    assert bytes.fromhex(got[2]["payload_hex"]) == b"\x00\xffraw"
    assert got[2]["content_type"] == "x/bin"


def test_each_transaction_ends_with_its_commit_position() -> None:
    items = run("table_insert_binary")
    assert [type(i).__name__ for i in items] == [
        "WalEvent", "WalEvent", "WalEvent", "WalCommit", "WalEvent", "WalCommit"
    ]
    commits = [i for i in items if isinstance(i, WalCommit)]
    raw_commits = [m for m in map(PgOutputParser().decode, (f for _, f in frames(
        "table_insert_binary"))) if isinstance(m, Commit)]
    assert [(c.commit_lsn, c.end_lsn) for c in commits] == [
        (m.commit_lsn, m.end_lsn) for m in raw_commits
    ]
    assert [c.events for c in commits] == [3, 1]
    first_xid = commits[0].xid
    assert all(i.xid == first_xid for i in items[:3])
    # Events carry their change's LSN, which lies before the commit.
    event_lsns = [i.lsn for i in items[:3] if isinstance(i, WalEvent)]
    assert event_lsns == sorted(event_lsns) and event_lsns[-1] < commits[0].commit_lsn


def test_events_are_handed_out_before_their_transaction_commits() -> None:
    # Large transactions must not be held in memory: each insert yields its event at once.
    decoder = OutboxDecoder()
    parser = PgOutputParser()
    first_event_at = commit_at = None
    for position, (lsn, frame) in enumerate(frames("table_insert_binary")):
        item = decoder.feed(lsn, parser.decode(frame))
        if isinstance(item, WalEvent) and first_event_at is None:
            first_event_at = position
            assert decoder.in_transaction
        if isinstance(item, WalCommit) and commit_at is None:
            commit_at = position
    assert first_event_at is not None and commit_at is not None
    assert first_event_at < commit_at


def test_messages_with_the_prefix_become_events() -> None:
    items = run("message")
    wanted = expected("message")
    got = events(items)
    assert len(got) == 2
    for recorded, written in zip(got, wanted, strict=True):
        assert recorded == written


def test_other_prefixes_are_ignored_and_bad_content_is_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="relay.wal.decoder"):
        items = run("message")
    commits = [i for i in items if isinstance(i, WalCommit)]
    # second transaction: only an 'other-prefix' message; third: content that is not an event
    assert [(c.events, c.rejected) for c in commits] == [(2, 0), (0, 0), (0, 1)]
    rejected = [i for i in items if isinstance(i, WalRejected)]
    assert len(rejected) == 1
    assert rejected[0].source == "message outbox"
    assert "too short" in rejected[0].reason
    assert rejected[0].raw == {"content": b"\x09\xff"}
    # A non-transactional message would be sent even if its transaction rolled back.
    assert any("non-transactional" in r.getMessage() for r in caplog.records)


def test_message_prefix_none_ignores_all_messages() -> None:
    items = run("message", OutboxDecoder(message_prefix=None))
    assert all(isinstance(i, WalCommit) and i.events == 0 for i in items)


def test_relation_changes_are_followed_while_streaming() -> None:
    items = run("alter_table")
    got, wanted = events(items), expected("alter_table")
    assert [g["id"] for g in got] == [w["id"] for w in wanted[:3]]
    assert got[2]["topic"] is None  # the column was dropped: optional, so the event stays
    rejected = [i for i in items if isinstance(i, WalRejected)]
    assert len(rejected) == 1
    assert "'event_type'" in rejected[0].reason and rejected[0].source == "public.outbox"
    assert rejected[0].raw["kind"] == b"OrderCreated"


def test_truncate_is_ignored() -> None:
    items = run("truncate")
    assert [e["id"] for e in events(items)] == [w["id"] for w in expected("truncate")]
    assert sum(isinstance(i, WalCommit) for i in items) == 4


def test_updates_and_deletes_are_ignored_and_an_inserted_then_deleted_row_is_an_event() -> None:
    items = run("update_delete")
    got = events(items)
    assert [g["id"] for g in got] == [w["id"] for w in expected("update_delete")]
    assert len(got) == 4  # three plus the Debezium-style insert-then-delete
    assert bytes.fromhex(got[2]["payload_hex"]) == bytes.fromhex(
        expected("update_delete")[2]["payload_hex"]
    )


@pytest.mark.parametrize("scenario", ["debezium_binary", "debezium_text"])
def test_debezium_columns(scenario: str) -> None:
    decoder = OutboxDecoder(table="outbox_dbz", columns=ColumnMapping.debezium())
    got = [i.record for i in run(scenario, decoder) if isinstance(i, WalEvent)]
    wanted = expected(scenario)
    assert [str(r.id) for r in got] == [w["id"] for w in wanted]
    for record, written in zip(got, wanted, strict=True):
        # jsonb stores JSON in its own normal form: same value, maybe other spacing/order.
        assert json.loads(record.payload) == json.loads(bytes.fromhex(written["payload_hex"]))
        assert record.content_type == "application/json"
        assert record.headers == {} and record.topic is None and record.created_at is None
        assert (record.aggregate_type, record.aggregate_id, record.event_type) == (
            written["aggregate_type"], written["aggregate_id"], written["event_type"]
        )


def test_only_the_configured_table_is_read() -> None:
    items = run("table_insert_binary", OutboxDecoder(table="another", message_prefix=None))
    assert [type(i) for i in items] == [WalCommit, WalCommit]
    items = run("table_insert_binary", OutboxDecoder(schema="elsewhere"))
    assert not any(isinstance(i, WalEvent) for i in items)


@pytest.mark.parametrize("scenario", ["custom_type", "origin"])
def test_custom_types_and_origins_do_not_disturb_events(scenario: str) -> None:
    assert [e["id"] for e in events(run(scenario))] == [w["id"] for w in expected(scenario)]


def test_streamed_transactions_are_refused() -> None:
    with pytest.raises(WalError, match="streaming"):
        run("streamed")


# -- rows that are not valid events -------------------------------------------------------------


def relation_and_insert() -> tuple[Relation, Insert]:
    messages = [PgOutputParser().decode(f) for _, f in frames("table_insert_binary")]
    relation = next(m for m in messages if isinstance(m, Relation))
    insert = next(m for m in messages if isinstance(m, Insert))
    return relation, insert


def changed_row(change: dict[str, bytes | None]) -> tuple[Relation, Insert, OutboxDecoder]:
    """The captured Insert with `change` applied (None: a null column), and a decoder that
    has seen its Relation inside an open transaction (xid 7)."""
    relation, insert = relation_and_insert()
    names = [c.name for c in relation.columns]
    values = list(insert.new.values)
    kinds = list(insert.new.kinds)
    for name, value in change.items():
        values[names.index(name)] = value
        kinds[names.index(name)] = "n" if value is None else "b"
    decoder = OutboxDecoder()
    decoder.feed(0, Begin(1, 0, 7))
    decoder.feed(0, relation)
    row = TupleData("".join(kinds), tuple(values))
    return relation, dataclasses.replace(insert, new=row), decoder


def feed_row(change: dict[str, bytes | None]) -> WalItem | None:
    _, insert, decoder = changed_row(change)
    return decoder.feed(99, insert)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": None}, "'id' of public.outbox cannot be read: it is null"),
        ({"id": b"\x01\x02"}, "'id'"),
        ({"headers": b"\x01[1, 2]"}, "headers must be a JSON object of strings"),
        ({"headers": b"\x01{not json"}, "'headers'"),
        ({"headers": b"\x02{}"}, "jsonb binary format version"),
        ({"aggregate_type": b"\xff\xfe"}, "'aggregate_type'"),
    ],
)
def test_invalid_rows_are_rejected_with_a_reason(change: dict[str, bytes | None],
                                                 reason: str) -> None:
    item = feed_row(change)
    assert isinstance(item, WalRejected)
    assert reason in item.reason
    assert (item.xid, item.lsn, item.source) == (7, 99, "public.outbox")
    assert set(change) <= set(item.raw)


def test_optional_columns_may_be_null() -> None:
    item = feed_row({"topic": None, "content_type": None, "headers": None, "created_at": None})
    assert isinstance(item, WalEvent)
    assert item.record.topic is None and item.record.created_at is None
    assert item.record.content_type == "application/octet-stream"  # bytea payload
    assert item.record.headers == {}


def test_infinite_timestamps_become_none() -> None:
    item = feed_row({"created_at": (2**63 - 1).to_bytes(8, "big")})
    assert isinstance(item, WalEvent) and item.record.created_at is None


def test_protocol_violations_are_errors() -> None:
    relation, insert = relation_and_insert()
    decoder = OutboxDecoder()
    with pytest.raises(PgOutputDecodeError, match="before its Relation"):
        decoder.feed(0, insert)
    decoder.feed(0, relation)
    with pytest.raises(PgOutputDecodeError, match="outside a transaction"):
        decoder.feed(0, insert)
    decoder.feed(0, Begin(1, 0, 5))
    with pytest.raises(PgOutputDecodeError, match="began inside"):
        decoder.feed(0, Begin(2, 0, 6))


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="nothing to read"):
        OutboxDecoder(table=None, message_prefix=None)
    with pytest.raises(ConfigurationError):
        OutboxDecoder(table="bad-name")
    with pytest.raises(ConfigurationError, match="NUL"):
        OutboxDecoder(message_prefix="a\x00b")


def test_ids_are_uuids() -> None:
    item = run("table_insert_binary")[0]
    assert isinstance(item, WalEvent) and isinstance(item.record.id, uuid.UUID)


def test_the_compiled_row_reader_covers_every_record_field() -> None:
    # relay.wal.decoder._compile unrolls one call per OutboxRecord field.
    assert len(OutboxRecord._fields) == 9
    item = feed_row({})
    assert isinstance(item, WalEvent)
    assert all(getattr(item.record, name) is not None or name == "topic"
               for name in OutboxRecord._fields)


def test_events_with_the_same_headers_share_one_read_only_mapping() -> None:
    first, second = feed_row({}), feed_row({})
    assert isinstance(first, WalEvent) and isinstance(second, WalEvent)
    assert first.record.headers == second.record.headers
    assert first.record.headers is second.record.headers  # parsed once
    with pytest.raises(TypeError):
        first.record.headers["tenant"] = "changed"  # type: ignore[index]


# -- Insert messages read straight from their bytes (WalSource's fast path) -----------------------


DEBEZIUM = {"table": "outbox_dbz", "columns": ColumnMapping.debezium()}


@pytest.mark.parametrize(
    ("scenario", "options"),
    [("table_insert_binary", {}), ("table_insert_text", {}), ("alter_table", {}),
     ("update_delete", {}), ("custom_type", {}), ("origin", {}),
     ("debezium_binary", DEBEZIUM), ("debezium_text", DEBEZIUM)],
)
def test_inserts_read_from_bytes_equal_the_general_path(
    scenario: str, options: dict[str, Any]
) -> None:
    general = run(scenario, OutboxDecoder(**options))
    fast = run_raw(scenario, OutboxDecoder(**options))
    assert fast == general
    assert any(isinstance(item, WalEvent) for item in fast)


def encode_insert(relation_oid: int, row: TupleData) -> bytes:
    """The pgoutput bytes of an Insert of `row` (protocol 1, outside a streamed block)."""
    out = bytearray(b"I" + relation_oid.to_bytes(4, "big") + b"N")
    out += len(row.kinds).to_bytes(2, "big")
    for kind, value in zip(row.kinds, row.values, strict=True):
        out += kind.encode()
        if value is not None:
            out += len(value).to_bytes(4, "big") + value
    return bytes(out)


def feed_row_bytes(change: dict[str, bytes | None]) -> WalItem | None:
    relation, insert, decoder = changed_row(change)
    data = encode_insert(relation.oid, insert.new)
    return decoder.feed_insert(99, data, PgOutputParser().decode)


def test_encoded_insert_matches_the_captured_bytes() -> None:
    relation, insert = relation_and_insert()
    captured = next(f for _, f in frames("table_insert_binary") if f[0] == ord("I"))
    assert encode_insert(relation.oid, insert.new) == captured


@pytest.mark.parametrize(
    "change",
    [{"id": None}, {"id": b"\x01\x02"}, {"headers": b"\x01[1, 2]"}, {"headers": b"\x02{}"},
     {"aggregate_type": b"\xff\xfe"}, {"aggregate_id": b"a\xc3"}, {"payload": None},
     {"topic": None, "content_type": None, "headers": None, "created_at": None},
     {"topic": "t\u00e9st \u2603".encode()},
     {"created_at": (2**63 - 1).to_bytes(8, "big")},
     {"created_at": (-(2**63)).to_bytes(8, "big", signed=True)},
     {"created_at": b"\x00\x01"}],
)
def test_rows_read_from_bytes_are_judged_as_by_the_general_path(
    change: dict[str, bytes | None],
) -> None:
    assert feed_row_bytes(change) == feed_row(change)


def test_a_text_column_takes_the_general_path() -> None:
    relation, insert, decoder = changed_row({})
    column = [c.name for c in relation.columns].index("event_type")
    kinds = insert.new.kinds[:column] + "t" + insert.new.kinds[column + 1:]
    row = TupleData(kinds, insert.new.values)
    item = decoder.feed_insert(99, encode_insert(relation.oid, row), PgOutputParser().decode)
    assert isinstance(item, WalEvent)
    assert item.record.event_type.encode() == insert.new.values[column]


def test_binary_rows_are_read_without_the_general_path() -> None:
    def refuse(data: bytes) -> Any:
        raise AssertionError("the general path was taken")

    decoder, parser = OutboxDecoder(), PgOutputParser()
    read = 0
    for lsn, frame in frames("table_insert_binary"):
        if frame[0] == ord("I"):
            read += isinstance(decoder.feed_insert(lsn, frame, refuse), WalEvent)
        else:
            decoder.feed(lsn, parser.decode(frame))
    assert read == 4


@pytest.mark.parametrize("micros", [
    0, -1, 1, 86_400_000_000 - 1, 86_400_000_000, -86_400_000_000,
    # 1970-01-01, 1900-03-01, 2000-02-29, 2024-02-29 23:59:59.999999, 2100-03-01, 0001-01-01,
    # 9999-12-31 23:59:59.999999: leap years, centuries and the ends of datetime's range
    -946_684_800_000_000, -3_153_427_200_000_000, 5_011_200_000_000,
    762_479_999_999_999, 3_160_857_600_000_000, -63_082_281_600_000_000,
    252_455_615_999_999_999,
])
def test_binary_timestamps_read_from_bytes_equal_the_general_path(micros: int) -> None:
    change = {"created_at": micros.to_bytes(8, "big", signed=True)}
    fast, general = feed_row_bytes(change), feed_row(change)
    assert fast == general
    assert isinstance(fast, WalEvent) and fast.record.created_at is not None
    assert fast.record.created_at.tzinfo is dt.UTC


def test_timestamps_beyond_datetime_are_an_error_on_both_paths() -> None:
    # Year 10000 and later: PostgreSQL has them, Python's datetime does not.
    change = {"created_at": (252_455_616_000_000_000).to_bytes(8, "big", signed=True)}
    with pytest.raises(OverflowError):
        feed_row(change)
    with pytest.raises(OverflowError):
        feed_row_bytes(change)


def outcome(feed: Any) -> tuple[object, ...]:
    """What a feed returned, or which error it raised with what message."""
    try:
        return ("item", feed())
    except Exception as exc:
        return ("error", type(exc), str(exc))


@pytest.mark.parametrize("cut", [1, 2, 7, 20, 60])
def test_a_short_insert_message_is_judged_by_the_general_path(cut: int) -> None:
    relation, insert, decoder = changed_row({})
    data = encode_insert(relation.oid, insert.new)[:-cut]
    fast = outcome(lambda: decoder.feed_insert(99, data, PgOutputParser().decode))
    _, _, other = changed_row({})
    general = outcome(lambda: other.feed(99, PgOutputParser().decode(data)))
    assert fast == general
    assert fast[0] == "error"


def test_a_row_with_another_column_count_is_judged_by_the_general_path() -> None:
    relation, insert, decoder = changed_row({})
    row = TupleData(insert.new.kinds + "n", (*insert.new.values, None))
    fast = outcome(lambda: decoder.feed_insert(
        99, encode_insert(relation.oid, row), PgOutputParser().decode))
    _, _, other = changed_row({})
    assert fast == outcome(lambda: other.feed(99, Insert(relation.oid, row)))


def test_the_compiled_reader_is_built_where_cargo_is(row_reader: str) -> None:
    # `make install` / `make test` build it (native/); a silent build failure would leave
    # every drain on the slower path.
    if row_reader == "python" or shutil.which("cargo") is None:
        pytest.skip("about the compiled reader, which needs cargo")
    assert decoder_module.native is not None, "run `make native`"


@pytest.mark.parametrize("by_slots", [True, False])
def test_ids_read_from_bytes_are_whole_uuids(
    by_slots: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built by their slots (as outbox.ids does where that works) or by the constructor.
    monkeypatch.setattr(decoder_module, "UUID_BY_SLOTS", by_slots and decoder_module.UUID_BY_SLOTS)
    for raw in (bytes(16), b"\xff" * 16, uuid.uuid4().bytes, bytes(range(1, 17))):
        item = feed_row_bytes({"id": raw})
        assert isinstance(item, WalEvent)
        made, expected = item.record.id, uuid.UUID(bytes=raw)
        assert type(made) is uuid.UUID
        assert (made, str(made), hash(made), made.version, made.is_safe, made.bytes) == (
            expected, str(expected), hash(expected), expected.version, expected.is_safe,
            expected.bytes)


# -- table-less events: the compiled reader takes the writer's shape, the rest is Python's ------

_WRITTEN = OutboxRecord(uuid.UUID("01a2538e-5cd5-705a-a43b-6ffd3ee4dcde"), "Order", "42",
                        "OrderCreated", b'{"a":1}', "application/json",
                        created_at=dt.datetime(2026, 12, 8, 2, 49, 28, 533141, tzinfo=dt.UTC))


def header_of(record: OutboxRecord, **changes: object) -> bytes:
    """A message whose JSON header is the writer's with `changes` (a value of a key; None drops
    the key), re-encoded compactly in the writer's key order."""
    content = record.encode_message()
    length = int.from_bytes(content[1:5], "big")
    header = json.loads(content[5:5 + length])
    for key, value in changes.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return b"\x01" + len(encoded).to_bytes(4, "big") + encoded + record.payload


def feed_message(content: bytes) -> WalItem | None:
    decoder = OutboxDecoder(table=None)
    decoder.feed(0, Begin(1, 0, 7))
    return decoder.feed(5, Message(True, 5, "outbox", content))


def expected_item(content: bytes) -> WalItem:
    try:
        return WalEvent(decode_message(content), 7, 5)
    except InvalidEventError as exc:
        return WalRejected(7, 5, "message outbox", str(exc), {"content": content})


WRITER_SHAPES = [
    _WRITTEN,
    _WRITTEN._replace(topic="orders.v1", created_at=None),
    _WRITTEN._replace(topic=""),
    _WRITTEN._replace(created_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)),
    _WRITTEN._replace(created_at=dt.datetime(1, 1, 1, tzinfo=dt.UTC)),
    _WRITTEN._replace(aggregate_type="Caf\u00e9 \u2603", aggregate_id="a/b c", payload=b""),
    _WRITTEN._replace(id=uuid.UUID(int=0), content_type="application/octet-stream"),
    _WRITTEN._replace(id=uuid.UUID(int=2**128 - 1)),
]


@pytest.mark.parametrize("record", WRITER_SHAPES)
def test_messages_of_the_writer_are_read_as_the_python_decoder_reads_them(
    record: OutboxRecord, row_reader: str
) -> None:
    content = record.encode_message()
    item = feed_message(content)
    assert item == expected_item(content) == WalEvent(record, 7, 5)
    assert isinstance(item, WalEvent)
    assert item.record.headers is OutboxRecord._field_defaults["headers"]
    assert type(item.record.id) is uuid.UUID and str(item.record.id) == str(record.id)
    if item.record.created_at is not None:
        assert item.record.created_at.tzinfo is dt.UTC
    if row_reader == "native":  # read by the compiled reader, not declined to Python
        decoder = OutboxDecoder(table=None)
        assert decoder._read_message is not None
        assert decoder._read_message(content) == record


@pytest.mark.parametrize("content", [
    header_of(_WRITTEN, headers={"tenant": "eu"}),  # not the compiled reader's shape
    header_of(_WRITTEN, aggregate_id='with "quotes" and \\ backslash'),
    header_of(_WRITTEN, event_type="line\nbreak"),
    header_of(_WRITTEN, id=str(_WRITTEN.id).upper()),
    header_of(_WRITTEN, id="01a2538e5cd5705aa43b6ffd3ee4dcde"),
    header_of(_WRITTEN, id="01a2538e-5cd5-705a-a43b-6ffd3ee4dcdg"),
    header_of(_WRITTEN, aggregate_type=""),
    header_of(_WRITTEN, event_type=None),
    header_of(_WRITTEN, topic=None),
    header_of(_WRITTEN, created_at="2026-12-08T02:49:28.533+00:00"),
    header_of(_WRITTEN, created_at="2026-12-08T02:49:28+02:00"),
    header_of(_WRITTEN, created_at="2026-13-08T02:49:28+00:00"),
    header_of(_WRITTEN, created_at="2026-02-30T02:49:28.000001+00:00"),
    header_of(_WRITTEN, created_at="2026-12-08T24:00:00+00:00"),
    header_of(_WRITTEN, created_at=""),
    _WRITTEN.encode_message().replace(b'"id":', b'"id" :'),
    b"\x02" + _WRITTEN.encode_message()[1:],
    _WRITTEN.encode_message()[:30],
    b"\x01\x00\x00\x10\x00{}",
    b"\x01",
])
def test_other_messages_are_judged_by_the_python_decoder(content: bytes) -> None:
    assert feed_message(content) == expected_item(content)
def commits_of(scenario: str) -> list[Commit]:
    return [m for m in map(PgOutputParser().decode, (f for _, f in frames(scenario)))
            if isinstance(m, Commit)]


@pytest.mark.parametrize("feed", [run, run_raw])
def test_transactions_acknowledged_before_are_skipped_whole(feed: Any) -> None:
    first, second = commits_of("table_insert_binary")
    decoder = OutboxDecoder()
    decoder.skip_below = first.end_lsn  # the first transaction was acknowledged
    items = feed("table_insert_binary", decoder)
    assert [type(i).__name__ for i in items] == ["WalCommit", "WalEvent", "WalCommit"]
    skipped, sent = (i for i in items if isinstance(i, WalCommit))
    # Still closed by its commit (the slot moves past it), with nothing to publish.
    assert (skipped.end_lsn, skipped.events, skipped.skipped) == (first.end_lsn, 0, 3)
    assert (sent.end_lsn, sent.events, sent.skipped) == (second.end_lsn, 1, 0)
    assert events(items) == expected("table_insert_binary")[3:]
    assert not decoder.in_transaction


@pytest.mark.parametrize("feed", [run, run_raw])
def test_a_transaction_committed_at_the_position_itself_is_not_skipped(feed: Any) -> None:
    first, _ = commits_of("table_insert_binary")
    decoder = OutboxDecoder()
    # A position below the commit's end: the commit record starts at or after it, so the
    # transaction ends after the position and was not acknowledged.
    for below in (first.commit_lsn, first.commit_lsn - 1, 0):
        decoder = OutboxDecoder()
        decoder.skip_below = below
        assert events(feed("table_insert_binary", decoder)) == expected("table_insert_binary")
    decoder = OutboxDecoder()
    decoder.skip_below = first.commit_lsn + 1
    assert len(events(feed("table_insert_binary", decoder))) == 1


def test_a_skipped_transaction_is_still_a_transaction_until_its_commit() -> None:
    decoder = OutboxDecoder()
    decoder.skip_below = 1 << 62
    parser = PgOutputParser()
    seen_open = False
    for lsn, frame in frames("table_insert_binary"):
        message = parser.decode(frame)
        assert decoder.feed(lsn, message) is None or isinstance(message, Commit)
        seen_open = seen_open or decoder.in_transaction
        if isinstance(message, Begin):
            # Idle-time slot advances (relay/wal/source.py) wait for its commit too.
            assert decoder.in_transaction
    assert seen_open and not decoder.in_transaction


def test_skipped_messages_of_table_less_writers() -> None:
    commits = commits_of("message")
    decoder = OutboxDecoder(table=None)
    decoder.skip_below = commits[-1].end_lsn  # all acknowledged: the bad message is not parked
    items = run("message", decoder)
    assert [type(i).__name__ for i in items] == ["WalCommit"] * len(commits)
    assert [i.skipped for i in items if isinstance(i, WalCommit)] == [2, 0, 1]
    assert not events(items)
