"""The PostgreSQL polling source: committed rows of the outbox table, read in position order."""

from __future__ import annotations

from relay.poll.cursor import PollCursor, Snapshot
from relay.poll.relay import PollConfig, PollingRelay, check_schema, poll_gauges

__all__ = ["PollConfig", "PollCursor", "PollingRelay", "Snapshot", "check_schema", "poll_gauges"]
