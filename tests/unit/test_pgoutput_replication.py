"""The WAL source's decisions without a server: feedback positions, slot checks, errors."""

from __future__ import annotations

import struct

import psycopg
import pytest

from outbox.errors import ConfigurationError, OutboxError
from relay.wal import slots
from relay.wal._translate import translate
from relay.wal.errors import (
    PublicationMismatchError,
    PublicationMissingError,
    ReplicationConnectionError,
    ReplicationPermissionError,
    SlotInUseError,
    SlotInvalidatedError,
    SlotMismatchError,
    SlotMissingError,
    WalError,
)
from relay.wal.lsn import format_lsn, parse_lsn
from relay.wal.protocol import Feedback, Keepalive, parse_keepalive, status_update
from relay.wal.source import WalSourceConfig, idle_position

# -- LSNs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0/0", "0/16B3748", "16/B374D848", "FFFFFFFF/FFFFFFFF"])
def test_lsn_round_trip(text: str) -> None:
    assert format_lsn(parse_lsn(text)) == text


def test_lsn_value() -> None:
    assert parse_lsn("16/B374D848") == 0x16_B374D848
    assert parse_lsn("0/a") == 10


@pytest.mark.parametrize("text", ["", "16", "16/", "x/1", "1/2/3", "123456789/0"])
def test_invalid_lsn(text: str) -> None:
    with pytest.raises(ConfigurationError, match="log sequence number"):
        parse_lsn(text)
    with pytest.raises(ConfigurationError):
        format_lsn(-1)


# -- frames and feedback -------------------------------------------------------------------------


def test_status_update_layout() -> None:
    frame = status_update(write=3, flush=2, apply=1, now_us=12345, reply=True)
    assert frame == b"r" + struct.pack(">QQQqB", 3, 2, 1, 12345, 1)


def test_keepalive_parsing() -> None:
    frame = b"k" + struct.pack(">QqB", 0x1234, 99, 1)
    assert parse_keepalive(frame) == Keepalive(0x1234, 99, True)


def reported(frame: bytes) -> tuple[int, int, int, bool]:
    write, flush, apply, _, reply = struct.unpack_from(">QQQqB", frame, 1)
    return write, flush, apply, bool(reply)


def test_a_keepalive_reply_never_confirms_what_the_caller_did_not() -> None:
    feedback = Feedback()
    feedback.received = 500
    feedback.on_keepalive(Keepalive(wal_end=900, send_time_us=0, reply_requested=True))
    assert feedback.status_due(now=0.0, interval=10.0)
    # Flush 0 is "invalid" to the server: it leaves the slot where it is.
    assert reported(feedback.status(now=0.0, now_us=0)) == (900, 0, 0, False)
    assert not feedback.reply_due
    feedback.confirm(400)
    feedback.on_keepalive(Keepalive(wal_end=1000, send_time_us=0, reply_requested=True))
    assert reported(feedback.status(now=1.0, now_us=0)) == (1000, 400, 400, False)


def test_confirmed_position_never_moves_back() -> None:
    feedback = Feedback()
    assert feedback.confirm(700)
    assert not feedback.confirm(300)
    assert not feedback.confirm(700)
    assert feedback.confirmed == 700


def test_status_is_due_after_the_interval() -> None:
    feedback = Feedback()
    assert feedback.status_due(now=0.0, interval=10.0)  # never sent
    feedback.status(now=5.0, now_us=0)
    assert not feedback.status_due(now=14.9, interval=10.0)
    assert feedback.status_due(now=15.0, interval=10.0)


# -- the idle-advance rule -------------------------------------------------------------------------


def test_idle_source_moves_to_the_servers_wal_end_when_everything_is_acknowledged() -> None:
    assert idle_position(in_transaction=False, last_commit_end=100, confirmed=100,
                         server_wal_end=5000) == 5000
    assert idle_position(in_transaction=False, last_commit_end=0, confirmed=0,
                         server_wal_end=5000) == 5000


@pytest.mark.parametrize(
    ("in_transaction", "last_commit_end", "confirmed", "server_wal_end"),
    [
        (True, 100, 100, 5000),  # a transaction is half read
        (False, 300, 100, 5000),  # a transaction handed out is not acknowledged yet
        (False, 100, 100, 100),  # nothing new
        (False, 100, 6000, 5000),  # already further
    ],
)
def test_idle_source_stays_put_otherwise(
    in_transaction: bool, last_commit_end: int, confirmed: int, server_wal_end: int
) -> None:
    assert idle_position(in_transaction=in_transaction, last_commit_end=last_commit_end,
                         confirmed=confirmed, server_wal_end=server_wal_end) is None


# -- slot and publication checks -----------------------------------------------------------------


def status(**changes: object) -> slots.SlotStatus:
    base: dict[str, object] = {
        "slot_name": "relay", "plugin": "pgoutput", "slot_type": "logical", "database": "app",
        "temporary": False, "active": False, "active_pid": None, "wal_status": "reserved",
        "restart_lsn": 100, "confirmed_flush_lsn": 200, "retained_bytes": 10,
        "safe_wal_size": None, "two_phase": False,
    }
    base.update(changes)
    return slots.SlotStatus(**base)  # type: ignore[arg-type]


def test_a_healthy_slot_passes() -> None:
    assert slots.check_slot(status(), "relay", "app") == status()


def test_missing_slot_says_what_to_do() -> None:
    with pytest.raises(SlotMissingError, match="does not exist") as caught:
        slots.check_slot(None, "relay", "app")
    assert "never creates a slot" in str(caught.value)
    # The commands that do it, not the manual procedure from before `outbox slot recover`.
    assert "`outbox slot create`" in str(caught.value)
    assert "`outbox slot recover`" in str(caught.value)
    assert "--on-slot-loss recover" in str(caught.value)
    assert "polling source" not in str(caught.value)


def test_invalidated_slot_says_what_happened() -> None:
    with pytest.raises(SlotInvalidatedError, match="max_slot_wal_keep_size") as caught:
        slots.check_slot(status(wal_status="lost"), "relay", "app")
    assert "0/C8" in str(caught.value)  # events after the confirmed position are gone
    assert "`outbox slot recover`" in str(caught.value)
    assert "polling source" not in str(caught.value)


def test_slot_in_use_names_the_other_process() -> None:
    with pytest.raises(SlotInUseError, match="4242") as caught:
        slots.check_slot(status(active=True, active_pid=4242), "relay", "app")
    assert caught.value.active_pid == 4242
    assert "standby" in str(caught.value)


@pytest.mark.parametrize(
    "changes",
    [{"plugin": "test_decoding"}, {"slot_type": "physical", "plugin": None},
     {"database": "other"}],
)
def test_slot_of_another_kind_or_database_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(SlotMismatchError):
        slots.check_slot(status(**changes), "relay", "app")


def published(columns: tuple[str, ...] | None = None,
              row_filter: str | None = None) -> slots.PublishedTable:
    return slots.PublishedTable("public", "outbox", columns, row_filter)


def test_publication_checks() -> None:
    table = ("public", "outbox")
    with pytest.raises(PublicationMissingError, match="`outbox slot create`") as missing:
        slots.check_publication(None, "relay", table)
    assert "relay.wal.source.setup" not in str(missing.value)
    empty = slots.PublicationInfo("relay", False, True, ())
    assert slots.check_publication(empty, "relay", None) is empty  # table-less mode
    with pytest.raises(PublicationMismatchError, match="ADD TABLE public.outbox"):
        slots.check_publication(empty, "relay", table)
    no_inserts = slots.PublicationInfo("relay", False, False, (published(),))
    with pytest.raises(PublicationMismatchError):
        slots.check_publication(no_inserts, "relay", table)
    everything = slots.PublicationInfo("relay", True, True, ())
    assert slots.check_publication(everything, "relay", table, ["id"]) is everything


def test_a_row_filter_would_hide_events() -> None:
    info = slots.PublicationInfo("relay", False, True, (published(row_filter="(id IS NULL)"),))
    with pytest.raises(PublicationMismatchError, match="Remove the row filter"):
        slots.check_publication(info, "relay", ("public", "outbox"))


def test_the_column_list_must_hold_every_column_the_relay_reads() -> None:
    info = slots.PublicationInfo("relay", False, True, (published(("id", "payload")),))
    table = ("public", "outbox")
    assert slots.check_publication(info, "relay", table, ["id", "payload"]) is info
    with pytest.raises(PublicationMismatchError, match="topic"):
        slots.check_publication(info, "relay", table, ["id", "payload", "topic"])


@pytest.mark.parametrize("name", ["Relay", "relay-1", "", "a" * 64, "1;drop"])
def test_slot_names_are_validated(name: str) -> None:
    with pytest.raises(ConfigurationError):
        slots.check_slot_name(name)


# -- driver errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (psycopg.errors.ObjectInUse('replication slot "s" is active for PID 7'), SlotInUseError),
        (psycopg.errors.UndefinedObject('replication slot "s" does not exist'), SlotMissingError),
        (psycopg.errors.UndefinedObject('publication "p" does not exist'),
         PublicationMissingError),
        (psycopg.errors.ObjectNotInPrerequisiteState(
            'cannot read from logical replication slot "s": This slot has been invalidated'),
         SlotInvalidatedError),
        (psycopg.errors.InsufficientPrivilege("must be superuser or replication role"),
         ReplicationPermissionError),
        (psycopg.errors.InvalidAuthorizationSpecification("no pg_hba.conf entry"),
         ReplicationPermissionError),
        (psycopg.OperationalError("connection failed: FATAL:  must be superuser or replication"
                                  " role to start walsender"), ReplicationPermissionError),
        (psycopg.OperationalError('FATAL:  no pg_hba.conf entry for replication connection'
                                  ' from host "10.0.0.1", user "relay"'),
         ReplicationPermissionError),
        (psycopg.OperationalError("server closed the connection unexpectedly"),
         ReplicationConnectionError),
        (psycopg.errors.AdminShutdown("terminating connection"), ReplicationConnectionError),
        (psycopg.errors.SyntaxError("syntax error"), WalError),
    ],
)
def test_driver_errors_are_translated(error: psycopg.Error, expected: type[WalError]) -> None:
    translated = translate(error, "doing it", slot="s", publication="p")
    assert type(translated) is expected
    assert isinstance(translated, OutboxError)
    assert str(translated).startswith("doing it failed: ")


def test_passwords_do_not_leak_into_errors() -> None:
    error = psycopg.OperationalError(
        'connection to "postgresql://relay:s3cret@db/app" failed: password=s3cret'
    )
    assert "s3cret" not in str(translate(error, "connecting"))


# -- configuration -------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = WalSourceConfig(slot="relay", publication="relay")
    assert config.qualified_table == ("public", "outbox")
    assert config.message_prefix == "outbox" and config.binary
    assert config.published_columns == (
        "id", "aggregate_type", "aggregate_id", "event_type", "topic", "payload",
        "content_type", "headers", "created_at",
    )
    assert WalSourceConfig(slot="r", publication="r", table=None).published_columns == ()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slot": "Relay"}, "lower-case"),
        ({"publication": "a b"}, "publication"),
        ({"table": None, "message_prefix": None}, "read nothing"),
        ({"message_prefix": ""}, "message_prefix"),
        ({"status_interval": 0}, "status_interval"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_invalid_config_fails_at_start(changes: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"slot": "relay", "publication": "relay", **changes}
    with pytest.raises(ConfigurationError, match=message):
        WalSourceConfig(**settings)  # type: ignore[arg-type]
