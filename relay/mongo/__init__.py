"""MongoDB relay sources: mongo-poll (finds pending documents) and mongo-stream (change streams)."""

from __future__ import annotations

from relay.mongo.config import MongoRelayConfig
from relay.mongo.engine import lease_owner
from relay.mongo.errors import LeadershipLostError, ResumeTokenInvalidError
from relay.mongo.poll import MongoPollRelay
from relay.mongo.store import MongoStore, OutboxStore, check_source, mongo_gauges
from relay.mongo.stream import MongoStreamRelay

__all__ = [
    "LeadershipLostError",
    "MongoPollRelay",
    "MongoRelayConfig",
    "MongoStore",
    "MongoStreamRelay",
    "OutboxStore",
    "ResumeTokenInvalidError",
    "check_source",
    "lease_owner",
    "mongo_gauges",
]
