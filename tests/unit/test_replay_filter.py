"""`outbox replay`'s filter and settings: bad input is refused with what is wrong, before any
connection is made."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from outbox.columns import ColumnMapping
from outbox.errors import ConfigurationError
from relay.replay import ReplayConfig, ReplayFilter


def test_an_empty_filter_is_refused_unless_all() -> None:
    with pytest.raises(ConfigurationError, match="no filter given"):
        ReplayFilter.parse()
    assert ReplayFilter.parse(everything=True).params()["aggregate_ids"] == []


def test_all_with_a_filter_is_ambiguous_and_refused() -> None:
    with pytest.raises(ConfigurationError, match="--all replays every retained event"):
        ReplayFilter.parse(everything=True, aggregate_type="Order")


@pytest.mark.parametrize(("given", "message"), [
    ({"event_ids": ["42"]}, "--event-id '42' is not a UUID"),
    ({"since": "8 Dec"}, "--since '8 Dec' is not an ISO 8601 time"),
    ({"until": "2026-12-08T25:00"}, "--until '2026-12-08T25:00' is not an ISO 8601 time"),
    ({"since": "2026-12-08T10:00Z", "until": "2026-12-08T10:00Z"}, "is not before --until"),
    ({"aggregate_type": ""}, "may not be empty"),
])
def test_bad_values_are_named(given: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ReplayFilter.parse(**given)  # type: ignore[arg-type]


def test_times_without_an_offset_are_utc_and_z_is_accepted() -> None:
    wanted = ReplayFilter.parse(since="2026-12-08T09:00", until="2026-12-08T10:00:00Z")
    assert wanted.since == dt.datetime(2026, 12, 8, 9, tzinfo=dt.UTC)
    assert wanted.until == dt.datetime(2026, 12, 8, 10, tzinfo=dt.UTC)


def test_event_ids_are_parsed_and_sent_as_text() -> None:
    event_id = uuid.uuid4()
    wanted = ReplayFilter.parse(event_ids=[f" {event_id} "], aggregate_ids=["1", "2"])
    assert wanted.params()["event_ids"] == [str(event_id)]
    assert wanted.params()["aggregate_ids"] == ["1", "2"]


def test_an_invalid_target_topic_or_template_is_refused() -> None:
    everything = ReplayFilter.parse(everything=True)
    with pytest.raises(ConfigurationError, match="not a valid Kafka topic name"):
        ReplayConfig(db_url="postgresql://", filter=everything, to_topic="a b")
    with pytest.raises(ConfigurationError, match="topic_template"):
        ReplayConfig(db_url="postgresql://", filter=everything, topic_template="{tenant}")


def test_a_time_window_needs_a_created_at_column() -> None:
    window = ReplayFilter.parse(since="2026-12-08T09:00Z")
    with pytest.raises(ConfigurationError, match="no created_at column"):
        ReplayConfig(db_url="postgresql://", filter=window, columns=ColumnMapping.debezium())
