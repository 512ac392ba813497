"""Which transactions a new WAL stream may skip (relay/wal/position.py), without a server."""

from __future__ import annotations

from relay.wal.position import Position, Remembered, skip_below
from relay.wal.stream import SystemIdentity

SERVER = SystemIdentity(system_id="7000000000000000001", timeline=1, wal_position=10_000,
                        database="orders")


def at(lsn: int, system: str = SERVER.system_id, timeline: int = 1) -> Position:
    return Position(lsn, system, timeline)


def test_the_greatest_known_position_on_this_server_wins() -> None:
    assert skip_below(SERVER, at(500), at(900)) == 900
    assert skip_below(SERVER, at(900), None) == 900
    assert skip_below(SERVER, None, None) == 0
    assert skip_below(SERVER) == 0


def test_a_position_of_another_server_is_ignored() -> None:
    # A dump restored on a new server: its LSNs start over and repeat the old ones.
    assert skip_below(SERVER, at(900, system="7000000000000000002")) == 0
    assert skip_below(SERVER, at(900, system="7000000000000000002"), at(300)) == 300


def test_a_position_of_another_timeline_is_ignored() -> None:
    # A failover or a point-in-time recovery: the new timeline forks below the old position.
    assert skip_below(SERVER, at(900, timeline=2)) == 0
    promoted = SystemIdentity(SERVER.system_id, 2, 10_000, "orders")
    assert skip_below(promoted, at(900, timeline=1)) == 0
    assert skip_below(promoted, at(900, timeline=2)) == 900


def test_a_position_beyond_what_the_server_has_written_is_ignored() -> None:
    # The server's files were restored from a copy older than the position (same identity).
    assert skip_below(SERVER, at(SERVER.wal_position + 1)) == 0
    assert skip_below(SERVER, at(SERVER.wal_position)) == SERVER.wal_position


def test_a_position_without_a_server_is_not_a_position() -> None:
    # What a slot recovery records (the new slot's consistent point) names no server.
    assert skip_below(SERVER, None) == 0


def test_memory_keeps_the_newest_position_and_follows_a_new_timeline() -> None:
    memory = Remembered()
    memory.note(at(500))
    memory.note(at(400))  # an older report never moves it back
    assert memory.position == at(500)
    memory.note(at(700))
    assert memory.position == at(700)
    memory.note(at(100, timeline=2))  # after a failover: the old timeline's position is moot
    assert memory.position == at(100, timeline=2)
