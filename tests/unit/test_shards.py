"""Sharded polling relays (relay/poll/shards.py): the decisions, without a server."""

from __future__ import annotations

import threading

import pytest

from outbox.errors import ConfigurationError
from relay.poll.relay import PollConfig
from relay.poll.shards import RunStop, Survey, aim, survey_of, to_claim, why_rebalance
from relay.settings import RelaySettings


def test_each_relay_aims_at_its_even_share_rounded_up() -> None:
    assert [aim(12, live) for live in (1, 2, 3, 4, 5, 12, 13)] == [12, 6, 4, 3, 3, 1, 1]
    assert aim(12, 0) == 12  # not yet counted itself: it still claims


def test_survey_reads_shard_owners_and_relay_memberships_from_the_lock_rows() -> None:
    # Second keys as pg_locks shows them: unsigned oids; a relay's -pid is above 2**31.
    rows = [(0, 101, None, None), (5, 102, None, None), (2**32 - 101, 90, None, None),
            (2**32 - 102, 91, None, None)]
    survey = survey_of(rows)
    assert survey.owners == {0: 101, 5: 102}
    assert survey.relays == 2
    assert survey.free(6) == [1, 2, 3, 4]


def test_claims_try_the_previous_shards_first_then_from_the_relays_own_place() -> None:
    survey = Survey(owners={0: 1, 1: 1}, relays=3)
    assert to_claim(survey, 12, start=7) == [7, 8, 9, 10, 11, 2, 3, 4, 5, 6]
    assert to_claim(survey, 12, start=7, prefer=(1, 3, 4)) == [3, 4, 7, 8, 9, 10, 11, 2, 5, 6]


@pytest.mark.parametrize(("owners", "relays", "held", "moves"), [
    ({s: 1 for s in range(12)}, 1, 12, False),  # alone: everything
    ({s: 1 for s in range(12)}, 2, 12, True),  # a relay joined: give half up
    ({s: 1 if s < 4 else 2 for s in range(12)}, 3, 4, False),  # even
    ({s: 1 for s in range(4)}, 2, 4, True),  # a relay died: its shards are free, take them
    ({s: 1 if s < 3 else 2 for s in range(12)}, 5, 3, False),  # 3,9: the other gives up
])
def test_a_relay_rebalances_when_it_holds_too_many_or_too_few_with_free_shards(
    owners: dict[int, int], relays: int, held: int, moves: bool
) -> None:
    assert (why_rebalance(Survey(owners, relays), 12, held) is not None) == moves


def test_a_run_stop_follows_the_daemon_and_ends_one_run_alone() -> None:
    daemon = threading.Event()
    run = RunStop(daemon)
    assert not run.is_set() and not run.wait(0.01)
    run.set()
    assert run.is_set() and run.wait(10) and not daemon.is_set()
    second = RunStop(daemon)
    assert not second.is_set()
    daemon.set()
    assert second.is_set() and second.wait(10)


def test_shard_lease_must_leave_room_for_a_read_and_sharding_needs_the_native_layout() -> None:
    with pytest.raises(ConfigurationError, match="shard_lease"):
        PollConfig(db_url="postgresql://x", shard_lease=1.5, poll_interval=1.0)
    with pytest.raises(ConfigurationError, match="only the native outbox"):
        RelaySettings(source="postgres-poll", kafka_bootstrap="k:9092", db_url="postgresql://x",
                      shards=True, columns="debezium")
    with pytest.raises(ConfigurationError, match="shards=True applies to the postgres-poll"):
        RelaySettings(source="postgres-wal", kafka_bootstrap="k:9092", db_url="postgresql://x",
                      shards=True)


def test_the_relay_id_header_may_not_replace_an_event_header() -> None:
    from relay.sinks.kafka.sink import PublisherConfig, relay_run_id

    with pytest.raises(ConfigurationError, match="relay_id_header='id'"):
        PublisherConfig(bootstrap_servers="k:9092", relay_id_header="id")
    with pytest.raises(ConfigurationError, match="relay_id_header=''"):
        PublisherConfig(bootstrap_servers="k:9092", relay_id_header="")
    first, second = relay_run_id(), relay_run_id()
    assert first.rsplit(":", 1)[0] == second.rsplit(":", 1)[0] and first != second
