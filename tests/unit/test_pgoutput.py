"""The pgoutput decoder against frames captured from PostgreSQL 15 (tests/unit/data)."""

from __future__ import annotations

import contextlib
import json
import struct
import uuid
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from relay.wal import pgoutput
from relay.wal.errors import PgOutputDecodeError, UnknownMessageError
from relay.wal.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    PgOutputParser,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
)

DATA = Path(__file__).parent / "data" / "pgoutput_pg15.json"


@cache
def captures() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DATA.read_text())
    scenarios: dict[str, Any] = data["scenarios"]
    return scenarios


def frames(scenario: str) -> list[tuple[int, bytes]]:
    return [(f["lsn"], bytes.fromhex(f["hex"])) for f in captures()[scenario]["frames"]]


def decoded(scenario: str) -> list[PgOutputMessage]:
    parser = PgOutputParser()
    return [parser.decode(frame) for _, frame in frames(scenario)]


def kinds(scenario: str) -> Counter[str]:
    return Counter(type(m).__name__ for m in decoded(scenario))


def test_captures_come_from_a_real_server() -> None:
    data = json.loads(DATA.read_text())
    assert data["server"].startswith("PostgreSQL 15")
    assert len(data["scenarios"]) >= 10


@pytest.mark.parametrize("scenario", sorted(captures()))
def test_every_captured_frame_decodes(scenario: str) -> None:
    messages = decoded(scenario)
    assert len(messages) == len(captures()[scenario]["frames"])


def test_inserts_into_the_outbox_table_are_framed_by_begin_and_commit() -> None:
    messages = decoded("table_insert_binary")
    assert [type(m) for m in messages] == [
        Begin, Relation, Insert, Insert, Insert, Commit, Begin, Insert, Commit
    ]
    begin, commit = messages[0], messages[5]
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    # Begin announces the commit's LSN; the commit frame ends after it.
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_time_us == commit.commit_time_us
    assert begin.commit_time.tzinfo is not None
    assert frames("table_insert_binary")[5][0] == commit.end_lsn


def test_relation_lists_the_outbox_columns_with_their_types() -> None:
    relation = decoded("table_insert_binary")[1]
    assert isinstance(relation, Relation)
    assert (relation.namespace, relation.name, relation.replica_identity) == (
        "public", "outbox", "d"
    )
    columns = {c.name: c.type_oid for c in relation.columns}
    assert columns.items() >= {
        "position": 20, "id": 2950, "aggregate_type": 25, "aggregate_id": 25,
        "event_type": 25, "topic": 25, "payload": 17, "content_type": 25, "headers": 3802,
        "created_at": 1184, "txid": 5069,
    }.items()
    assert [c.name for c in relation.columns if c.is_key] == ["position"]


def column_index(scenario: str) -> dict[str, int]:
    relation = next(m for m in decoded(scenario) if isinstance(m, Relation))
    return {c.name: i for i, c in enumerate(relation.columns)}


def test_binary_tuple_data_carries_the_send_format() -> None:
    event = captures()["table_insert_binary"]["events"][0]
    insert = decoded("table_insert_binary")[2]
    assert isinstance(insert, Insert)
    assert insert.xid is None
    row, at = insert.new, column_index("table_insert_binary")
    assert len(row.kinds) == len(row.values) == len(at)
    assert row.kinds[at["topic"]] == pgoutput.KIND_NULL and row.values[at["topic"]] is None
    assert set(row.kinds) == {pgoutput.KIND_BINARY, pgoutput.KIND_NULL}
    assert row.values[at["position"]] == struct.pack(">q", 1)
    assert row.values[at["id"]] == uuid.UUID(event["id"]).bytes
    assert row.values[at["payload"]] == bytes.fromhex(event["payload_hex"])  # bytea: raw
    assert (row.values[at["headers"]] or b"")[:1] == b"\x01"  # jsonb: version 1, then text


def test_text_tuple_data_carries_the_output_format() -> None:
    event = captures()["table_insert_text"]["events"][0]
    insert = decoded("table_insert_text")[2]
    assert isinstance(insert, Insert)
    assert set(insert.new.kinds) == {pgoutput.KIND_TEXT, pgoutput.KIND_NULL}
    at = column_index("table_insert_text")
    assert insert.new.values[at["id"]] == event["id"].encode()
    assert insert.new.values[at["payload"]] == b"\\x" + event["payload_hex"].encode()


def test_logical_decoding_messages_keep_prefix_content_and_transactionality() -> None:
    messages = [m for m in decoded("message") if isinstance(m, Message)]
    assert [(m.prefix, m.transactional) for m in messages] == [
        ("outbox", True), ("outbox", True), ("outbox", False), ("other-prefix", True),
        ("outbox", True),
    ]
    assert messages[3].content == b"ignored"
    assert messages[4].content == b"\x09\xff"
    assert all(m.lsn > 0 and m.xid is None for m in messages)


def test_relation_is_sent_again_after_alter_table() -> None:
    relations = [m for m in decoded("alter_table") if isinstance(m, Relation)]
    names = [[c.name for c in r.columns] for r in relations]
    assert len({r.oid for r in relations}) == 1
    assert "note" not in names[0] and "note" in names[1]
    assert "topic" in names[1] and "topic" not in names[2]
    assert "event_type" in names[2] and "kind" in names[3] and "event_type" not in names[3]


def test_truncate_lists_relations_and_options() -> None:
    truncates = [m for m in decoded("truncate") if isinstance(m, Truncate)]
    relation = next(m for m in decoded("truncate") if isinstance(m, Relation))
    assert [(t.relation_oids, t.cascade, t.restart_identity) for t in truncates] == [
        ((relation.oid,), False, False),
        ((relation.oid,), True, True),
    ]


def test_updates_and_deletes_decode_key_old_and_unchanged_toast() -> None:
    messages = decoded("update_delete")
    updates = [m for m in messages if isinstance(m, Update)]
    deletes = [m for m in messages if isinstance(m, Delete)]
    assert len(updates) == 4 and len(deletes) == 3
    # The payload of the third event is stored out of line and did not change: not sent.
    toast, payload = updates[1], column_index("update_delete")["payload"]
    assert toast.new.kinds[payload] == pgoutput.KIND_UNCHANGED_TOAST
    assert toast.new.values[payload] is None
    # Changing the primary key sends the old key; REPLICA IDENTITY FULL the whole old row.
    assert updates[2].key is not None and updates[2].key.kinds[0] == "b"
    assert updates[3].old is not None and set(updates[3].old.kinds) <= {"b", "n"}
    key = deletes[0].key
    assert key is not None and key.kinds[0] == "b" and set(key.kinds[1:]) == {"n"}
    assert deletes[1].old is not None and deletes[1].key is None


def test_type_and_origin_messages() -> None:
    custom = decoded("custom_type")
    type_message = next(m for m in custom if isinstance(m, Type))
    assert (type_message.namespace, type_message.name) == ("public", "mood")
    relation = next(m for m in custom if isinstance(m, Relation))
    assert {c.name: c.type_oid for c in relation.columns}["mood"] == type_message.oid
    origin = next(m for m in decoded("origin") if isinstance(m, Origin))
    assert origin.name == "capture_origin" and origin.commit_lsn == 0x12345678


def test_streamed_transactions_carry_xids_and_stream_markers() -> None:
    messages = decoded("streamed")
    starts = [m for m in messages if isinstance(m, StreamStart)]
    assert [s.first_segment for s in starts] == [True, False]
    xid = starts[0].xid
    assert all(s.xid == xid for s in starts)
    abort = next(m for m in messages if isinstance(m, StreamAbort))
    assert abort.xid == xid and abort.subxid != xid  # the savepoint that rolled back
    # Changes carry the xid of their (sub)transaction; ROLLBACK TO keeps the savepoint, so the
    # rows after it belong to a third one.
    inside = Counter(m.xid for m in messages if isinstance(m, Insert | Relation))
    assert {xid, abort.subxid} < set(inside)
    commit = messages[-1]
    assert isinstance(commit, StreamCommit) and commit.xid == xid
    assert commit.commit_lsn < commit.end_lsn
    assert sum(isinstance(m, StreamStop) for m in messages) == 2


def test_parser_tracks_stream_blocks() -> None:
    parser = PgOutputParser()
    seen = []
    for _, frame in frames("streamed"):
        message = parser.decode(frame)
        seen.append((type(message).__name__, parser.in_stream_block))
    assert seen[0] == ("StreamStart", True)
    assert ("StreamStop", False) in seen
    assert not parser.in_stream_block


def test_a_streamed_insert_needs_the_stream_flag() -> None:
    insert = next(f for _, f in frames("streamed") if f[:1] == b"I")
    assert isinstance(pgoutput.decode(insert, streamed=True), Insert)
    # Read without the flag, the xid is taken for the relation OID: it must not pass silently.
    with pytest.raises(PgOutputDecodeError):
        pgoutput.decode(insert)


def test_unknown_message_type_is_a_clear_error() -> None:
    with pytest.raises(UnknownMessageError, match="unknown pgoutput message type 'Z'"):
        pgoutput.decode(b"Zabc")
    with pytest.raises(UnknownMessageError, match="0xff"):
        pgoutput.decode(b"\xff")
    with pytest.raises(UnknownMessageError, match="two_phase"):
        pgoutput.decode(b"P" + bytes(40))
    with pytest.raises(PgOutputDecodeError, match="empty"):
        pgoutput.decode(b"")


@pytest.mark.parametrize("scenario", ["table_insert_binary", "message", "alter_table",
                                      "update_delete", "origin", "custom_type", "truncate"])
def test_truncated_frames_raise_decode_errors(scenario: str) -> None:
    for _, frame in frames(scenario):
        for cut in range(1, len(frame)):
            with pytest.raises(PgOutputDecodeError):
                pgoutput.decode(frame[:cut])


def test_corrupted_frames_decode_or_raise_decode_errors_only() -> None:
    for _, frame in frames("table_insert_binary") + frames("message"):
        for position in range(1, len(frame)):
            corrupt = bytearray(frame)
            corrupt[position] ^= 0xA5
            with contextlib.suppress(PgOutputDecodeError):
                pgoutput.decode(bytes(corrupt))


def test_decoder_accepts_memoryview_without_copying_the_frame() -> None:
    for _, frame in frames("table_insert_binary") + frames("message"):
        view = memoryview(bytearray(b"pad" + frame))[3:]
        assert pgoutput.decode(view) == pgoutput.decode(frame)


def test_long_prefixes_and_names_are_read_whole() -> None:
    prefix = "p" * 300
    content = b"payload"
    frame = (
        b"M" + struct.pack(">BQ", 1, 42) + prefix.encode() + b"\x00"
        + struct.pack(">I", len(content)) + content
    )
    message = pgoutput.decode(frame)
    assert message == Message(True, 42, prefix, content)
    with pytest.raises(PgOutputDecodeError, match="NUL"):
        pgoutput.decode(b"M" + struct.pack(">BQ", 1, 42) + b"x" * 500)
