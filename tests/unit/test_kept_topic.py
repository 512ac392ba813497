"""What a relay keeping published rows stores as their topic, and what it says when it cannot
(relay/sinks/kafka/sink.py `topic_sql`, relay/published.py); the SQL itself is checked against
PostgreSQL in tests/integration/test_kept_topic.py."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from outbox.columns import ColumnMapping
from relay.published import kept_topic, warn_topic_not_kept
from relay.sinks.kafka.sink import topic_sql

KEEP = dt.timedelta(days=1)


@pytest.mark.parametrize(("template", "columns"), [
    ("{event_type:.3}", ColumnMapping()),
    ("{aggregate_id!r}", ColumnMapping()),
    ("{aggregate_type}", ColumnMapping.debezium()),
], ids=["format-spec", "conversion", "no-topic-column"])
def test_what_sql_would_not_mirror_is_not_stored(
    template: str, columns: ColumnMapping, caplog: pytest.LogCaptureFixture
) -> None:
    assert topic_sql(template, columns) is None
    assert kept_topic(template, columns).as_string() == ""
    with caplog.at_level(logging.WARNING, logger="relay.published"):
        warn_topic_not_kept(template, columns, KEEP)
    assert [r.event for r in caplog.records] == ["kept_without_topic"]  # type: ignore[attr-defined]
    assert "--topic-template" in caplog.records[0].getMessage()


def test_a_compiled_template_is_stored_silently(caplog: pytest.LogCaptureFixture) -> None:
    assert kept_topic("{aggregate_type}", ColumnMapping()).as_string() == (
        ', "topic" = coalesce(nullif("topic", \'\'), "aggregate_type")')
    with caplog.at_level(logging.WARNING, logger="relay.published"):
        warn_topic_not_kept("{aggregate_type}-{aggregate_id}", ColumnMapping(), KEEP)
        warn_topic_not_kept("{aggregate_id!r}", ColumnMapping(), None)  # nothing is kept
    assert caplog.records == []
