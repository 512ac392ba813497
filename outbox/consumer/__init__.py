"""The idempotent consumer: apply each Kafka event exactly once (dedup row in its transaction)."""

from __future__ import annotations

from outbox.consumer.aio import AsyncConsumer
from outbox.consumer.base import ConsumerStats
from outbox.consumer.config import ConsumerConfig, ConsumerOptions
from outbox.consumer.errors import (
    ConsumerError,
    HandlerCommitError,
    HandlerExhaustedError,
    InboxMissingError,
    InboxStoreError,
    KafkaConsumeError,
    RejectMessage,
    ReplayError,
)
from outbox.consumer.message import Message
from outbox.consumer.policy import RetryPolicy
from outbox.consumer.runner import Consumer

__all__ = [
    "AsyncConsumer",
    "Consumer",
    "ConsumerConfig",
    "ConsumerError",
    "ConsumerOptions",
    "ConsumerStats",
    "HandlerCommitError",
    "HandlerExhaustedError",
    "InboxMissingError",
    "InboxStoreError",
    "KafkaConsumeError",
    "Message",
    "RejectMessage",
    "ReplayError",
    "RetryPolicy",
]
