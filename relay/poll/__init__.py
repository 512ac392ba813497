"""The PostgreSQL polling source: committed rows of the outbox table, read in position order."""

from __future__ import annotations

from relay.poll.cursor import PollCursor, Snapshot
from relay.poll.relay import PollConfig, PollSource, check_schema, poll_gauges, polling_relay

__all__ = [
    "PollConfig", "PollCursor", "PollSource", "Snapshot", "check_schema", "poll_gauges",
    "polling_relay",
]
